"""Building the rule table, and finding the overlaps that would make a lookup ambiguous.

The table is a trie per (host, method) over the path template's segments; each leaf holds the
rules for that template by (caller, issuer). Two rules that could answer the same request with
equal specificity are an overlap: the compiler refuses them and lint reports the same finding.
Building costs one pass over the rules, so overlap detection is linear in their number.

``overlapping_rules`` finds, in a built table, every pair of rules that some request could
match both of, however differently specific: what lint warns about. It walks the trie against
itself, so only templates that share a compatible prefix are ever compared.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from extauthz.decision import paths
from extauthz.decision.model import SELF_ISSUER_ID, Leaf, Node, Rule, RuleTable, WorkloadPattern

__all__ = ["Overlap", "build_table", "overlapping_rules", "patterns_overlap"]


@dataclass(frozen=True, slots=True)
class Overlap:
    """Two rules that would both answer one request, equally specific."""

    rule: Rule  # the later rule, which is not placed
    other: Rule  # the rule already in the table
    field: str  # "match" (the same exact caller) or "match.workloads" (two patterns)
    message: str


def build_table(rules: Sequence[Rule]) -> tuple[RuleTable, tuple[Overlap, ...]]:
    """The lookup table of ``rules``, and every overlap found while placing them (a rule that
    overlaps is left out of that leaf)."""
    hosts: dict[str, dict[str, Node]] = {}
    overlaps: list[Overlap] = []
    for rule in rules:
        issuer_ids = set(rule.issuers)
        if rule.reexchange:
            issuer_ids.add(SELF_ISSUER_ID)
        for method in sorted(rule.methods):
            root = hosts.setdefault(rule.host, {}).setdefault(method, Node())
            for text in rule.paths:
                leaf = _leaf_for(root, paths.parse_template(text))
                for workload in rule.workloads:
                    for iss in sorted(issuer_ids):
                        overlap = _place(leaf, rule, workload, iss, method)
                        if overlap is not None:
                            overlaps.append(overlap)
    for methods in hosts.values():
        for root in methods.values():
            _sort_patterns(root)
    return RuleTable(hosts), tuple(overlaps)


def _place(leaf: Leaf, rule: Rule, workload: str, iss: str, method: str) -> Overlap | None:
    if "*" not in workload:
        other = leaf.exact.get((workload, iss))
        if other is not None and other.id != rule.id:
            return Overlap(
                rule,
                other,
                "match",
                f"overlaps {_named(other)} on {method} {leaf.template} for {workload} "
                f"with issuer {iss!r}; make them disjoint",
            )
        leaf.exact[(workload, iss)] = rule
        return None
    pattern = WorkloadPattern.parse(workload)
    for other_pattern, other_iss, other in leaf.patterns:
        if other.id == rule.id or other_iss != iss:
            continue
        if other_pattern.specificity == pattern.specificity and patterns_overlap(
            other_pattern.parts, pattern.parts
        ):
            return Overlap(
                rule,
                other,
                "match.workloads",
                f"{workload!r} overlaps {other_pattern.text!r} of {_named(other)} on "
                f"{method} {leaf.template} with issuer {iss!r}, equally specific; "
                "make them disjoint",
            )
    leaf.patterns.append((pattern, iss, rule))
    return None


def _named(rule: Rule) -> str:
    """``rule 'a' (team-a.yaml:12)``: the other rule of an overlap, and where it is written
    (in a policy directory, often another file than the rule reported)."""
    where = rule.located()
    return f"rule {rule.id!r} ({where})" if where else f"rule {rule.id!r}"


def _leaf_for(root: Node, template: paths.Template) -> Leaf:
    node = root
    for seg in template.segments:
        if seg == paths.REST:
            if node.rest is None:
                node.rest = Leaf(template.text, template.segments)
            return node.rest
        if seg == paths.PARAM:
            if node.param is None:
                node.param = Node()
            node = node.param
        else:
            node = node.literal.setdefault(seg, Node())
    if node.leaf is None:
        node.leaf = Leaf(template.text, template.segments)
    return node.leaf


def _sort_patterns(node: Node) -> None:
    for leaf in (node.leaf, node.rest):
        if leaf is not None:
            leaf.patterns.sort(key=lambda entry: entry[0].specificity, reverse=True)
    for child in node.literal.values():
        _sort_patterns(child)
    if node.param is not None:
        _sort_patterns(node.param)


def patterns_overlap(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """Could one SPIFFE ID match both segment patterns?"""
    a_rest, b_rest = a[-1] == "**", b[-1] == "**"
    a_fixed = a[:-1] if a_rest else a
    b_fixed = b[:-1] if b_rest else b
    if not a_rest and not b_rest and len(a) != len(b):
        return False
    if a_rest and not b_rest and len(b) < len(a):
        return False
    if b_rest and not a_rest and len(a) < len(b):
        return False
    for x, y in zip(a_fixed, b_fixed, strict=False):
        if x != "*" and y != "*" and x != y:
            return False
    return True


def overlapping_rules(table: RuleTable) -> list[tuple[Rule, Rule]]:
    """Every pair of rules that one request could match both of: a common host and method,
    path templates some path matches both of, a common issuer and callers some SPIFFE ID
    matches both of. Each pair once, either way round."""
    found: dict[tuple[str, str], tuple[Rule, Rule]] = {}
    for methods in table.hosts.values():
        for root in methods.values():
            for left, right in _overlapping_leaves(root):
                for a, b in _shared_callers(left, right):
                    key = (a.id, b.id) if a.id < b.id else (b.id, a.id)
                    found.setdefault(key, (a, b))
    return list(found.values())


def _overlapping_leaves(root: Node) -> Iterator[tuple[Leaf, Leaf]]:
    """Pairs of leaves whose templates some path matches both of (a leaf with itself too).

    The trie is walked against itself: a pair of nodes at one depth is visited only if the
    prefixes leading to them are compatible (equal literals, or a ``{param}`` against any
    literal but the empty last segment, which ``{param}`` never matches). A ``**`` leaf then
    matches every template under the other node, since it takes zero or more segments."""
    stack = [(root, root)]
    while stack:
        a, b = stack.pop()
        if a.leaf is not None and b.leaf is not None:
            yield a.leaf, b.leaf
        if a.rest is not None:
            yield from ((a.rest, leaf) for leaf in _leaves_under(b))
        if b.rest is not None:
            yield from ((leaf, b.rest) for leaf in _leaves_under(a))
        fewer, more = (a, b) if len(a.literal) <= len(b.literal) else (b, a)
        for seg, child in fewer.literal.items():
            other = more.literal.get(seg)
            if other is not None:
                stack.append((child, other))
        if a.param is not None and b.param is not None:
            stack.append((a.param, b.param))
        if a.param is not None:
            stack.extend((a.param, child) for seg, child in b.literal.items() if seg != "")
        if b.param is not None:
            stack.extend((child, b.param) for seg, child in a.literal.items() if seg != "")


def _leaves_under(node: Node) -> Iterator[Leaf]:
    stack = [node]
    while stack:
        current = stack.pop()
        if current.leaf is not None:
            yield current.leaf
        if current.rest is not None:
            yield current.rest
        stack.extend(current.literal.values())
        if current.param is not None:
            stack.append(current.param)


def _shared_callers(a: Leaf, b: Leaf) -> Iterator[tuple[Rule, Rule]]:
    """Distinct rules of two leaves that one caller with one issuer reaches in both. Exact IDs
    are looked up; patterns are compared with what the other leaf holds for the same issuer,
    as ``build_table`` compares them when placing."""
    fewer, more = (a, b) if len(a.exact) <= len(b.exact) else (b, a)
    for key, rule in fewer.exact.items():
        other = more.exact.get(key)
        if other is not None and other.id != rule.id:
            yield rule, other
    for exact_leaf, pattern_leaf in ((a, b), (b, a)):
        if not pattern_leaf.patterns:
            continue
        for (caller, iss), rule in exact_leaf.exact.items():
            for pattern, pattern_iss, other in pattern_leaf.patterns:
                if pattern_iss == iss and other.id != rule.id and pattern.matches(caller):
                    yield rule, other
    for pattern, iss, rule in a.patterns:
        for other_pattern, other_iss, other in b.patterns:
            if (
                other_iss == iss
                and other.id != rule.id
                and patterns_overlap(pattern.parts, other_pattern.parts)
            ):
                yield rule, other
