"""Path normalisation and templates: we must match the path the upstream will route, or refuse."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extauthz.decision import paths
from extauthz.decision.paths import MAX_PATH, PARAM, REST, join, normalise, parse_template


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/", ("",)),
        ("/a/b", ("a", "b")),
        ("/a?x=1", ("a",)),
        ("/a?x=/../../admin", ("a",)),
        ("/a#frag", ("a",)),
        ("/a/b?x#y", ("a", "b")),
    ],
)
def test_query_and_fragment_are_dropped(raw: str, expected: tuple[str, ...]) -> None:
    """Envoy's request.http.path carries the query; only the path is matched."""
    assert normalise(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/a/./b", ("a", "b")),
        ("/a/../b", ("b",)),
        ("/a/b/../../c", ("c",)),
        ("/a/.", ("a", "")),
        ("/a/..", ("",)),
        ("/a/b/..", ("a", "")),
        ("/./a", ("a",)),
    ],
)
def test_dot_segments_are_resolved(raw: str, expected: tuple[str, ...]) -> None:
    """RFC 3986 remove_dot_segments: what the upstream will resolve, we resolve first."""
    assert normalise(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/a/%2e/b", ("a", "b")),
        ("/a/%2E%2E/b", ("b",)),
        ("/a/%2e%2e", ("",)),
        ("/v1/admin/%2e%2e/customers/1", ("v1", "customers", "1")),
    ],
)
def test_encoded_dots_are_dot_segments(raw: str, expected: tuple[str, ...]) -> None:
    """'%2e' is an unreserved '.', so '/%2e%2e/' climbs like '/../' once decoded upstream."""
    assert normalise(raw) == expected


@pytest.mark.parametrize("raw", ["/..", "/../a", "/a/../..", "/%2e%2e/a", "/a/%2E%2E/%2e%2e"])
def test_climbing_above_the_root_is_unsafe(raw: str) -> None:
    """A '..' at the root has no single meaning; refusing beats guessing."""
    assert normalise(raw) is None


@pytest.mark.parametrize("raw", ["/a%2Fb", "/a%2fb", "/a%5Cb", "/a%5cb", "/a%3Bb", "/a%3bb"])
def test_escaped_separators_are_unsafe(raw: str) -> None:
    """An escaped '/' (or '\\', ';') would split differently upstream."""
    assert normalise(raw) is None


@pytest.mark.parametrize("raw", ["/admin;x", "/a/b;jsessionid=1", "/;/a"])
def test_semicolon_is_unsafe(raw: str) -> None:
    """Servlet containers strip ';params', so '/admin;x' reaches '/admin'."""
    assert normalise(raw) is None


@pytest.mark.parametrize("raw", ["/a\\b", "/a\\..\\admin", "\\a"])
def test_backslash_is_unsafe(raw: str) -> None:
    """Some upstreams treat '\\' as '/'."""
    assert normalise(raw) is None


@pytest.mark.parametrize("raw", ["/caf\u00e9", "/\u0430dmin", "/a/\u2025", "/\uff0e\uff0e/a"])
def test_non_ascii_is_unsafe(raw: str) -> None:
    """Unicode lookalikes and full-width dots normalise differently per upstream."""
    assert normalise(raw) is None


@pytest.mark.parametrize("raw", ["/a\x00b", "/a\tb", "/a b", "/a%00", "/a%0a", "/a%7F", "/a%25"])
def test_control_characters_and_escaped_percent_are_unsafe(raw: str) -> None:
    """Raw controls and spaces, and escapes decoding to a control or '%' (double decoding)."""
    assert normalise(raw) is None


@pytest.mark.parametrize("raw", ["/a%", "/a%2", "/a%zz", "/a%g0"])
def test_broken_escapes_are_unsafe(raw: str) -> None:
    """A '%' not followed by two hex digits has no meaning."""
    assert normalise(raw) is None


@pytest.mark.parametrize("raw", ["", "a/b", "?x=1", "#f", "*", "http://h/a"])
def test_not_origin_form_is_unsafe(raw: str) -> None:
    """Only an absolute path is a request path we can match."""
    assert normalise(raw) is None


def test_overlong_path_is_unsafe() -> None:
    """Bounded work per request."""
    assert normalise("/" + "a" * (MAX_PATH - 1)) is not None
    assert normalise("/" + "a" * MAX_PATH) is None


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("//a//b", ("a", "b")),
        ("/a///b", ("a", "b")),
        ("//", ("",)),
        ("/a//", ("a", "")),
    ],
)
def test_duplicate_slashes_merge(raw: str, expected: tuple[str, ...]) -> None:
    """'//' is one separator, so '//admin' cannot dodge a '/admin' rule."""
    assert normalise(raw) == expected


def test_trailing_slash_is_kept() -> None:
    """'/a/' and '/a' are different resources to most upstreams."""
    assert normalise("/a/") == ("a", "")
    assert normalise("/a") == ("a",)
    assert normalise("/a/") != normalise("/a")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/%41%42c", ("ABc",)),
        ("/%7e%7Euser", ("~~user",)),
        ("/a%2Db%5F", ("a-b_",)),
        ("/%61dmin", ("admin",)),
    ],
)
def test_unreserved_escapes_are_decoded(raw: str, expected: tuple[str, ...]) -> None:
    """'/%61dmin' is '/admin' to the upstream, so it must match a '/admin' rule."""
    assert normalise(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/%c3%a9", ("%C3%A9",)),
        ("/a%20b", ("a%20b",)),
        ("/x%3a%40", ("x%3A%40",)),
    ],
)
def test_other_escapes_are_kept_upper_cased(raw: str, expected: tuple[str, ...]) -> None:
    """One spelling per path: '%c3' and '%C3' must not match different rules."""
    assert normalise(raw) == expected


def test_normalisation_is_idempotent() -> None:
    """A normalised path normalises to itself."""
    for raw in ["/a/./b/../c/", "/%61%2e/x", "//a//%7e", "/%c3%a9/b"]:
        once = normalise(raw)
        assert once is not None
        assert normalise(join(once)) == once


def test_join_is_the_inverse_of_split() -> None:
    assert join(("",)) == "/"
    assert join(("a", "b")) == "/a/b"
    assert join(("a", "")) == "/a/"


# --- templates ------------------------------------------------------------------------------


def test_template_params_and_literals() -> None:
    """'{name}' compiles to the one-segment marker; literals stay as they are."""
    t = parse_template("/v1/customers/{id}/orders/{order_id}")
    assert t.segments == ("v1", "customers", PARAM, "orders", PARAM)
    assert t.text == "/v1/customers/{id}/orders/{order_id}"


def test_template_root_and_trailing_slash() -> None:
    assert parse_template("/").segments == ("",)
    assert parse_template("/a/").segments == ("a", "")


def test_rest_only_last() -> None:
    """'**' is a final catch-all, never in the middle."""
    assert parse_template("/static/**").segments == ("static", REST)
    assert parse_template("/**").segments == (REST,)
    with pytest.raises(ValueError, match=r"\*\*"):
        parse_template("/static/**/x")
    with pytest.raises(ValueError):
        parse_template("/**/**")


@pytest.mark.parametrize(
    "text",
    [
        "v1/customers",  # not absolute
        "",  # empty
        "/v1/{id",  # unbalanced
        "/v1/id}",
        "/v1/x{id}",  # a param is a whole segment
        "/v1/{id}x",
        "/v1/{1id}",  # not an identifier
        "/v1/{}",
        "/v1/*",  # '*' is not a path wildcard
        "/v1/a*",
        "/v1/***",
        "/v1//x",  # empty segment
        "/v1/./x",  # not in normal form
        "/v1/../x",
        "/v1/%7e",  # unreserved escape: its normal form is '~'
        "/v1/%2F",  # unsafe
        "/v1/a;b",
        "/v1/caf\u00e9",
    ],
)
def test_bad_template_segments_are_rejected(text: str) -> None:
    """A template that cannot match a normalised path is a policy error, not a dead rule."""
    with pytest.raises(ValueError):
        parse_template(text)


def test_template_literals_are_normal_form() -> None:
    """Every accepted literal equals what normalise makes of it, so exact lookups work."""
    t = parse_template("/a-b/~c/x%C3%A9/{id}")
    literals = [s for s in t.segments if s not in (PARAM, REST)]
    assert literals == ["a-b", "~c", "x%C3%A9"]
    assert paths.normalise("/a-b/~c/x%c3%a9") == ("a-b", "~c", "x%C3%A9")


# --- by property ----------------------------------------------------------------------------

_PATHISH = st.text(alphabet="/.%2eEfF5cCaA;?#\\~-_ ", max_size=30)


@settings(max_examples=300, deadline=None)
@given(st.builds(lambda s: "/" + s, _PATHISH) | _PATHISH)
def test_normalised_paths_are_in_normal_form(raw: str) -> None:
    """Whatever comes in, what comes out has no dot segments, no inner empty segments, no
    separators, no lower-case escapes, and normalises to itself."""
    segments = normalise(raw)
    if segments is None:
        return
    assert segments, "never empty: '/' is ('',)"
    for index, seg in enumerate(segments):
        assert seg not in (".", "..")
        assert seg != "" or index == len(segments) - 1
        assert not set(seg) & set("/\\;?# ")
        for at in [i for i, c in enumerate(seg) if c == "%"]:
            escape = seg[at + 1 : at + 3]
            assert len(escape) == 2 and escape == escape.upper()
    assert normalise(join(segments)) == segments
