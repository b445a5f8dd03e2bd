"""The policy layer: a YAML document in, an immutable ``Policy`` (with its rule table) out.

``compiler`` checks every field and reports every problem at once in one ``PolicyError``;
``table`` builds the lookup trie and finds the overlaps; ``yamlsrc`` parses YAML keeping line
numbers; ``loader`` reads a policy's files from disk and assembles the ``Snapshot`` a decision
reads.
"""

from extauthz.errors import PolicyError, Problem
from extauthz.policy.compiler import (
    compile_document,
    compile_policy,
    load_policy,
    parse_document,
    parse_duration,
)
from extauthz.policy.loader import Inputs, assemble, read_inputs
from extauthz.policy.table import Overlap, build_table, overlapping_rules

__all__ = [
    "Inputs",
    "Overlap",
    "PolicyError",
    "Problem",
    "assemble",
    "build_table",
    "compile_document",
    "compile_policy",
    "load_policy",
    "overlapping_rules",
    "parse_document",
    "parse_duration",
    "read_inputs",
]
