"""Request paths: the one normalisation we trust, and the templates rules match against.

Envoy hands us the raw request target. Upstreams decode and resolve it before routing, so we
must match the path the upstream will see, or refuse. ``normalise`` resolves what has a single
safe meaning and returns None for anything whose meaning depends on the upstream's parser.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

__all__ = [
    "MAX_PATH",
    "PARAM",
    "REST",
    "Segments",
    "Template",
    "join",
    "normalise",
    "parse_template",
    "template_matches",
]

MAX_PATH = 4096

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# What may stand in a path segment once unreserved escapes are decoded. ';' is left out on
# purpose: servlet-style containers strip ";params" from segments, so "/admin;x" would reach
# "/admin" upstream while we matched something else.
_SEGMENT_CHARS = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,=:@%]*")
_HEX = frozenset("0123456789abcdefABCDEF")
_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")

Segments = tuple[str, ...]


# Pure, immutable result; request paths repeat. Kept small: keys are client-chosen strings of
# up to MAX_PATH characters, so the bound is also a memory bound (about 8 MiB at worst).
@functools.lru_cache(maxsize=2048)
def normalise(raw: str) -> Segments | None:
    """Split a raw request target into normalised path segments, or None if unsafe.

    - the query and fragment are dropped (``request.http.path`` carries the query);
    - ``%XX`` escapes of unreserved characters are decoded, others are kept upper-cased; an
      escaped ``/`` or ``\\`` (or any escape that decodes to a control or reserved character
      the upstream could split on) makes the path unsafe;
    - duplicate slashes are merged; ``.`` segments dropped; ``..`` removes the previous segment
      and is unsafe at the root;
    - ``;``, backslashes, control characters and non-ASCII make the path unsafe.

    "/" is ``("",)``; "/a/b" is ``("a", "b")``; a trailing slash keeps an empty last segment.
    """
    if not raw or len(raw) > MAX_PATH:
        return None
    cut = len(raw)
    for sep in "?#":
        at = raw.find(sep)
        if 0 <= at < cut:
            cut = at
    path = raw[:cut]
    if not path.startswith("/"):
        return None
    out: list[str] = []
    parts = path.split("/")[1:]
    last = len(parts) - 1
    for index, part in enumerate(parts):
        seg = _decode_segment(part)
        if seg is None:
            return None
        if seg == "" and index != last:
            continue  # "//" merges
        if seg == ".":
            if index == last:
                out.append("")
            continue
        if seg == "..":
            if not out:
                return None
            out.pop()
            if index == last:
                out.append("")
            continue
        out.append(seg)
    if not out:
        out.append("")
    return tuple(out)


def _decode_segment(part: str) -> str | None:
    if not _SEGMENT_CHARS.fullmatch(part):
        return None
    if "%" not in part:
        return part
    chars: list[str] = []
    i, n = 0, len(part)
    while i < n:
        c = part[i]
        if c != "%":
            chars.append(c)
            i += 1
            continue
        hexpair = part[i + 1 : i + 3]
        if len(hexpair) != 2 or not all(h in _HEX for h in hexpair):
            return None
        decoded = chr(int(hexpair, 16))
        if decoded in _UNRESERVED:
            chars.append(decoded)
        elif decoded in "/\\;" or ord(decoded) < 0x20 or ord(decoded) == 0x7F or decoded == "%":
            return None
        else:
            chars.append("%" + hexpair.upper())
        i += 3
    return "".join(chars)


def join(segments: Segments) -> str:
    """The path of normalised segments."""
    return "/" + "/".join(segments)


# --- templates -------------------------------------------------------------------------------

PARAM = "{}"  # a template segment matching exactly one non-empty segment
REST = "**"  # a final template segment matching zero or more segments


@dataclass(frozen=True, slots=True)
class Template:
    """A compiled path template: literal segments, ``{name}`` (one segment), final ``**``."""

    text: str
    segments: Segments  # literals as they are, PARAM and REST markers for the rest
    params: tuple[tuple[str, int], ...] = ()  # (name, segment index) of each ``{name}``


def parse_template(text: str) -> Template:
    """Compile ``/v1/customers/{id}`` or ``/static/**``. Raises ValueError with the reason."""
    if not text.startswith("/"):
        raise ValueError("must start with '/'")
    if text == "/":
        return Template(text, ("",))
    raw_parts = text[1:].split("/")
    out: list[str] = []
    params: list[tuple[str, int]] = []
    for index, part in enumerate(raw_parts):
        if part == REST:
            if index != len(raw_parts) - 1:
                raise ValueError("'**' may only be the last segment")
            out.append(REST)
        elif _PARAM.fullmatch(part):
            name = part[1:-1]
            if any(name == seen for seen, _ in params):
                raise ValueError(f"parameter {part} appears twice")
            params.append((name, index))
            out.append(PARAM)
        elif "{" in part or "}" in part or "*" in part:
            raise ValueError(f"segment {part!r}: a parameter is a whole segment like {{id}}")
        elif part == "" and index != len(raw_parts) - 1:
            raise ValueError("empty segment ('//')")
        else:
            normal = normalise("/" + part)
            if normal is None or normal != (part,):
                raise ValueError(f"segment {part!r} is not in normal form")
            out.append(part)
    return Template(text, tuple(out), tuple(params))


def template_matches(template: Template, segments: Segments) -> bool:
    """Does one template match a normalised path? (The table does this for all at once.)"""
    for index, want in enumerate(template.segments):
        if want == REST:
            return True
        if index >= len(segments):
            return False
        if want == PARAM:
            if segments[index] == "":
                return False
        elif want != segments[index]:
            return False
    return len(segments) == len(template.segments)
