"""YAML loading that remembers where things were and refuses duplicate keys.

PyYAML silently keeps the last of two equal keys; in a security policy that hides a typo or
a tampered line, so the loader raises instead. Every mapping is a ``Located`` dict that knows
the line of each key, so errors can point at ``policy.yaml:42``.
"""

from __future__ import annotations

from typing import Any

import yaml

__all__ = ["DuplicateKeyError", "Located", "load"]


class Located(dict[str, Any]):
    """A mapping from the YAML source with 1-based line numbers for itself and its keys."""

    line: int | None = None
    key_lines: dict[str, int]

    def line_of(self, key: str) -> int | None:
        """The line of ``key``, else of the mapping itself."""
        return self.key_lines.get(key, self.line)


class DuplicateKeyError(yaml.MarkedYAMLError):
    """A mapping has the same key twice (PyYAML alone would keep the last one)."""


# libyaml's parser when PyYAML was built with it: a 10,000-rule policy parses in a fraction of
# the pure-Python time. Either way the constructors are SafeLoader's plus ours below.
_Base: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_Base):  # type: ignore[misc]
    pass


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> Located:
    loader.flatten_mapping(node)
    out = Located()
    out.line = node.start_mark.line + 1
    out.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str):
            key = str(key)
        if key in out:
            raise DuplicateKeyError(
                "while constructing a mapping",
                node.start_mark,
                f"found duplicate key {key!r}",
                key_node.start_mark,
            )
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[key] = key_node.start_mark.line + 1
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load(text: str) -> Any:
    """Parse one YAML document. Raises ``yaml.YAMLError`` (with a mark) on bad input."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader derives from SafeLoader
