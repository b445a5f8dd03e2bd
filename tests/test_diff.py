"""``extauthz policy diff OLD NEW``: every change classified; anything that widens exits 3."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from clikit import EXTRA_RULE, in_process

from extauthz.demo.idp import Idp
from extauthz.policy.compiler import compile_policy
from extauthz.tools.diff import NARROWS, NEUTRAL, WIDENS, Change, diff_policies

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "policy.yaml"
BASE = EXAMPLE.read_text(encoding="utf-8")

READ = "orders-read-profile"
READ_GRANT_SCOPES = "      scopes: [profile.read]\n      ttl: 30s"
ORDERS_WL = "workloads: [spiffe://cluster.local/ns/shop/sa/orders]"


PARTNER_ISSUER = """  - id: partner-idp
    issuer: https://partner.example.com
    jwks: {file: issuers/partner-idp.json}
    audiences: [https://shop.example.com]
    algorithms: [ES256]

workloads:"""


def edit(old: str, new: str, text: str = BASE, count: int = 1) -> str:
    assert text.count(old) >= count, f"{old!r} not in the policy"
    return text.replace(old, new, count)


def changes(old_text: str, new_text: str) -> list[Change]:
    old = compile_policy(old_text, source="old.yaml")
    new = compile_policy(new_text, source="new.yaml")
    return diff_policies(old, new)


def diff_cli(
    tmp_path: Path, old: str, new: str, *args: str, real: bool = False
) -> subprocess.CompletedProcess[str]:
    """``policy diff`` on two policy texts; ``real`` runs the installed entry point."""
    a, b = tmp_path / "old.yaml", tmp_path / "new.yaml"
    # The JWKS files the policies name are read as serve reads them.
    shutil.copytree(EXAMPLE.parent / "issuers", tmp_path / "issuers", dirs_exist_ok=True)
    Idp("https://partner.example.com").write_jwks(tmp_path / "issuers" / "partner-idp.json")
    a.write_text(old, encoding="utf-8")
    b.write_text(new, encoding="utf-8")
    if not real:
        return in_process("policy", "diff", a, b, *args)
    return subprocess.run(
        [sys.executable, "-m", "extauthz", "policy", "diff", str(a), str(b), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


WIDER_SCOPES = edit(
    READ_GRANT_SCOPES, "      scopes: [profile.read, profile.write]\n      ttl: 30s"
)


def test_widened_scopes_exit_3_and_name_rule_and_scopes_text(tmp_path: Path) -> None:
    result = diff_cli(tmp_path, BASE, WIDER_SCOPES, real=True)
    assert result.returncode == 3, result.stdout + result.stderr
    assert f"WIDENS   scopes-added: rule {READ}: profile.write" in result.stdout
    assert "1 change(s) WIDEN what the policy grants" in result.stdout


def test_widened_scopes_exit_3_and_name_rule_and_scopes_json(tmp_path: Path) -> None:
    result = diff_cli(tmp_path, BASE, WIDER_SCOPES, "--format", "json")
    assert result.returncode == 3, result.stdout + result.stderr
    doc = json.loads(result.stdout)
    assert doc["widens"] is True
    assert doc["changes"] == [
        {"effect": "widens", "kind": "scopes-added", "rule": READ, "detail": "profile.write"}
    ]


def test_narrowing_only_exits_0_and_is_labelled_narrows(tmp_path: Path) -> None:
    old = WIDER_SCOPES
    new = edit(READ_GRANT_SCOPES, "      scopes: [profile.read]\n      ttl: 10s", text=BASE)
    result = diff_cli(tmp_path, old, new)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert f"narrows  scopes-removed: rule {READ}: profile.write" in lines
    assert f"narrows  ttl-lowered: rule {READ}: 30s -> 10s" in lines
    assert "WIDEN" not in result.stdout

    doc = json.loads(diff_cli(tmp_path, old, new, "--format", "json").stdout)
    assert doc["widens"] is False
    assert {c["effect"] for c in doc["changes"]} == {NARROWS}


def test_rule_added_widens_and_removed_narrows(tmp_path: Path) -> None:
    added = diff_cli(tmp_path, BASE, BASE + EXTRA_RULE)
    assert added.returncode == 3
    assert "WIDENS   rule-added: rule orders-delete-profile: DELETE profile.shop" in added.stdout
    assert "[profile.delete] ttl 15s" in added.stdout
    removed = diff_cli(tmp_path, BASE + EXTRA_RULE, BASE)
    assert removed.returncode == 0
    assert "narrows  rule-removed: rule orders-delete-profile" in removed.stdout


def kinds(found: list[Change]) -> set[tuple[str, str, str | None]]:
    return {(c.effect, c.kind, c.rule) for c in found}


@pytest.mark.parametrize(
    ("new", "expected"),
    [
        pytest.param(
            edit(
                "audience: spiffe://cluster.local/ns/shop/sa/profile",
                "audience: spiffe://cluster.local/ns/shop/sa/profile-v2",
            ),
            {(WIDENS, "audience-changed", READ)},
            id="audience-changed",
        ),
        pytest.param(edit("ttl: 30s", "ttl: 60s"), {(WIDENS, "ttl-raised", READ)}, id="ttl-raised"),
        pytest.param(
            edit(
                ORDERS_WL,
                "workloads: [spiffe://cluster.local/ns/shop/sa/orders, "
                "spiffe://cluster.local/ns/shop/sa/billing]",
            ),
            {(WIDENS, "workloads-added", READ)},
            id="workload-added",
        ),
        pytest.param(
            edit(
                "issuers: [corp-idp]",
                "issuers: [corp-idp, partner-idp]",
                text=edit("\nworkloads:", "\n" + PARTNER_ISSUER),
            ),
            {(WIDENS, "issuer-added", None), (WIDENS, "issuers-added", READ)},
            id="issuer-added",
        ),
        pytest.param(
            edit("maxTtl: 300s", "maxTtl: 600s"),
            {(WIDENS, "max-ttl-raised", None)},
            id="max-ttl-raised",
        ),
        pytest.param(
            edit("kind: ExchangePolicy\n", "kind: ExchangePolicy\nmode: shadow\n"),
            {(WIDENS, "policy-shadow-enabled", None)},
            id="policy-shadow",
        ),
        pytest.param(
            edit("      ttl: 30s\n", "      ttl: 30s\n    mode: shadow\n"),
            {(WIDENS, "shadow-enabled", READ)},
            id="rule-shadow",
        ),
        pytest.param(
            edit("    require: {scopes: [profile.read]}\n", ""),
            {(WIDENS, "required-scopes-removed", READ)},
            id="required-scope-dropped",
        ),
        pytest.param(
            edit("methods: [GET]", "methods: [GET, HEAD]"),
            {(WIDENS, "methods-added", READ)},
            id="method-added",
        ),
        pytest.param(
            edit('paths: ["/v1/customers/{id}"]', 'paths: ["/v1/customers/**"]'),
            {(WIDENS, "paths-added", READ), (NARROWS, "paths-removed", READ)},
            id="path-widened",
        ),
        pytest.param(
            edit(
                "audiences: [https://shop.example.com]",
                "audiences: [https://shop.example.com, https://other.example.com]",
            ),
            {(WIDENS, "issuer-audiences-added", None)},
            id="issuer-audience-added",
        ),
        pytest.param(
            edit(
                "  trustDomains: [cluster.local]\n",
                "  trustDomains: [cluster.local, partner.example]\n",
            ),
            {(WIDENS, "trust-domains-added", None)},
            id="trust-domain-added",
        ),
        pytest.param(
            edit("      ttl: 30s\n", "      ttl: 30s\n    reexchange: true\n"),
            {(WIDENS, "reexchange-changed", READ)},
            id="reexchange-enabled",
        ),
    ],
)
def test_widening_changes(new: str, expected: set[tuple[str, str, str | None]]) -> None:
    found = changes(BASE, new)
    assert kinds(found) == expected
    assert any(c.effect == WIDENS for c in found)


def test_widening_changes_exit_3_through_the_cli(tmp_path: Path) -> None:
    for new in (
        edit("ttl: 30s", "ttl: 60s"),
        edit("maxTtl: 300s", "maxTtl: 600s"),
        edit("kind: ExchangePolicy\n", "kind: ExchangePolicy\nmode: shadow\n"),
        edit(ORDERS_WL, 'workloads: ["spiffe://cluster.local/ns/shop/sa/*"]'),
    ):
        result = diff_cli(tmp_path, BASE, new)
        assert result.returncode == 3, result.stdout
        assert "WIDENS" in result.stdout


def test_shadow_turned_off_and_purpose_reworded_are_neutral(tmp_path: Path) -> None:
    shadowed = edit("kind: ExchangePolicy\n", "kind: ExchangePolicy\nmode: shadow\n")
    reworded = edit(
        "purpose: The order service shows the customer's profile on an order page",
        "purpose: The order service shows a customer's profile next to an order",
    )
    found = changes(shadowed, reworded)
    assert kinds(found) == {
        (NEUTRAL, "policy-shadow-disabled", None),
        (NEUTRAL, "purpose-changed", READ),
    }
    assert diff_cli(tmp_path, shadowed, reworded).returncode == 0


def test_identical_policies_print_no_change(tmp_path: Path) -> None:
    result = diff_cli(tmp_path, BASE, BASE)
    assert result.returncode == 0
    assert "no change" in result.stdout
    doc = json.loads(diff_cli(tmp_path, BASE, BASE, "--format", "json").stdout)
    assert doc == {"changes": [], "widens": False}


def test_comments_and_formatting_are_no_change() -> None:
    reformatted = BASE.replace("# relative to this file", "").replace(
        "require: {scopes: [profile.read]}", "require:\n      scopes: [profile.read]", 1
    )
    assert reformatted != BASE
    assert changes(BASE, reformatted) == []


def test_invalid_policy_exits_2(tmp_path: Path) -> None:
    broken = edit("audience: spiffe://cluster.local/ns/shop/sa/profile", 'audience: "*"')
    for old, new in ((BASE, broken), (broken, BASE)):
        result = diff_cli(tmp_path, old, new)
        assert result.returncode == 2, result.stdout + result.stderr
        assert "audience" in result.stderr
        assert result.stdout == ""


def test_missing_file_exits_2(tmp_path: Path) -> None:
    result = in_process("policy", "diff", EXAMPLE, tmp_path / "x")
    assert result.returncode == 2


# --- the keys a trusted issuer's JWKS file holds -----------------------------------------------


def _with_jwks(directory: Path, keys: list[Idp]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "issuers").mkdir(exist_ok=True)
    jwks = {"keys": [key for idp in keys for key in idp.jwks()["keys"]]}
    (directory / "issuers" / "corp-idp.json").write_text(json.dumps(jwks))
    policy = directory / "policy.yaml"
    policy.write_text(BASE, encoding="utf-8")
    return policy


def test_a_key_added_to_a_trusted_issuer_widens(tmp_path: Path) -> None:
    """Adding a key to a JWKS file adds trust: whoever holds it can mint subject tokens."""
    first, second = Idp("https://idp.example.com"), Idp("https://idp.example.com")
    old = _with_jwks(tmp_path / "old", [first])
    new = _with_jwks(tmp_path / "new", [first, second])
    result = in_process("policy", "diff", "--format", "json", old, new)
    assert result.returncode == 3, result.stdout + result.stderr
    (change,) = [
        c for c in json.loads(result.stdout)["changes"] if c["kind"].startswith("issuer-key")
    ]
    assert change["effect"] == WIDENS and change["kind"] == "issuer-key-added"
    assert second.key.kid in change["detail"]
    back = in_process("policy", "diff", "--format", "json", new, old)
    assert back.returncode == 0
    kinds = {c["kind"]: c["effect"] for c in json.loads(back.stdout)["changes"]}
    assert kinds["issuer-key-removed"] == NARROWS


def test_a_key_replaced_under_the_same_kid_is_seen(tmp_path: Path) -> None:
    first, second = Idp("https://idp.example.com"), Idp("https://idp.example.com")
    old = _with_jwks(tmp_path / "old", [first])
    new = _with_jwks(tmp_path / "new", [second])
    doc = json.loads((new.parent / "issuers" / "corp-idp.json").read_text())
    doc["keys"][0]["kid"] = first.key.kid
    (new.parent / "issuers" / "corp-idp.json").write_text(json.dumps(doc))
    result = in_process("policy", "diff", old, new)
    assert result.returncode == 3 and "issuer-key-added" in result.stdout


def test_keys_from_a_url_are_not_fetched_and_it_says_so(tmp_path: Path) -> None:
    text = BASE.replace(
        "jwks: {file: issuers/corp-idp.json}",
        "jwks: {url: 'https://idp.example.com/jwks.json'}",
    )
    result = diff_cli(tmp_path, text, text)
    assert result.returncode == 0, result.stderr
    assert "issuer-keys-not-compared" in result.stdout and "does not fetch" in result.stdout


def test_an_unreadable_jwks_file_is_exit_2(tmp_path: Path) -> None:
    old = _with_jwks(tmp_path / "old", [Idp("https://idp.example.com")])
    new = _with_jwks(tmp_path / "new", [Idp("https://idp.example.com")])
    (new.parent / "issuers" / "corp-idp.json").write_text("{not json")
    result = in_process("policy", "diff", old, new)
    assert result.returncode == 2 and "corp-idp" in result.stderr
