"""Transaction-token mode in the policy and its tools: what compiles, what lint explains,
what ``policy diff`` calls widening, and the shipped example with its cases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from clikit import in_process

from extauthz.errors import PolicyError
from extauthz.policy.compiler import compile_policy
from extauthz.tools.diff import NARROWS, WIDENS, diff_policies
from extauthz.tools.lint import lint_text

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "transaction-tokens.yaml"
CASES = ROOT / "examples" / "transaction-tokens.tests.yaml"
BASE = EXAMPLE.read_text(encoding="utf-8")
TTS = """
  - id: shop-tts
    issuer: https://tts.shop.svc
    jwks: {file: issuers/corp-idp.json}
    algorithms: [ES256]
    tokenTypes: [txntoken+jwt]
"""


def edit(old: str, new: str, text: str = BASE) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


def problems(text: str) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        compile_policy(text, source="policy.yaml", base_dir=EXAMPLE.parent)
    return [f"{p.field}: {p.message}" for p in caught.value.problems]


def with_tts(text: str = BASE) -> str:
    return edit("\nworkloads:", TTS + "\nworkloads:", text)


def test_the_example_compiles_with_the_trust_domain_and_hop_modes() -> None:
    policy = compile_policy(BASE, source="policy.yaml", base_dir=EXAMPLE.parent)
    assert policy.exchange.trust_domain == "cluster.local"
    assert [r.txn for r in policy.rules] == ["", "replace", "pass"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            edit("  trustDomain: cluster.local", ""),
            "exchange.trustDomain: is required",
            id="trust-domain-missing",
        ),
        pytest.param(
            edit("trustDomain: cluster.local", "trustDomain: spiffe://cluster.local"),
            "exchange.trustDomain: 'spiffe://cluster.local' is not a trust domain name",
            id="trust-domain-not-a-name",
        ),
        pytest.param(
            edit("txnToken: pass", "txnToken: forward"),
            "txnToken: must be replace or pass",
            id="txn-mode-unknown",
        ),
        pytest.param(
            edit("txnToken: pass", "reexchange: true"),
            "reexchange: is for access tokens; an inner hop's rule says txnToken",
            id="reexchange-in-txn-mode",
        ),
        pytest.param(
            edit("    txnToken: pass\n", ""),
            "match.issuers: 'exchange' is not a trusted issuer id",
            id="own-tokens-need-a-txn-rule",
        ),
        pytest.param(
            edit("      issuers: [exchange]                  #", "      issuers: [corp-idp] #"),
            "match.issuers: 'corp-idp': a txnToken rule takes Txn-Tokens of: exchange",
            id="txn-rule-takes-no-bearer",
        ),
        pytest.param(
            edit(
                "audience: spiffe://cluster.local/ns/shop/sa/payments",
                "audience: payments",
            ),
            "grant.audience: names the workload the Txn-Token is for: not a valid SPIFFE ID",
            id="audience-not-a-workload",
        ),
        pytest.param(
            with_tts(
                edit(
                    "issuers: [corp-idp]\n    require: {scopes: [checkout",
                    "issuers: [shop-tts]\n    require: {scopes: [checkout",
                )
            ),
            "match.issuers: 'shop-tts' issues Txn-Tokens: only a txnToken rule takes them",
            id="tts-in-a-first-hop-rule",
        ),
        pytest.param(
            with_tts().replace("tokenTypes: [txntoken+jwt]", "tokenTypes: [txntoken+jwt, at+jwt]"),
            "tokenTypes: a transaction token service's tokenTypes is [txntoken+jwt] only",
            id="tts-mixed-types",
        ),
        pytest.param(
            with_tts().replace(
                "    tokenTypes: [txntoken+jwt]",
                "    tokenTypes: [txntoken+jwt]\n    audiences: [x]",
            ),
            "audiences: must be [cluster.local], the exchange's trustDomain",
            id="tts-other-audience",
        ),
    ],
)
def test_mistakes_are_one_problem_each(text: str, expected: str) -> None:
    found = problems(text)
    assert any(p.startswith(expected) for p in found), found
    assert len(found) == 1, found


def test_txn_tokens_and_the_tts_are_refused_in_access_token_mode() -> None:
    access = edit("tokenType: transaction_token", "tokenType: access_token")
    found = problems(with_tts(access))
    assert "exchange.trustDomain: goes with tokenType transaction_token only" in found
    assert "tokenTypes: txntoken+jwt goes with exchange.tokenType transaction_token" in found
    assert "txnToken: goes with exchange.tokenType transaction_token only" in found


def test_a_tts_with_its_keys_may_feed_an_inner_hop() -> None:
    text = with_tts(
        edit("issuers: [exchange]                  #", "issuers: [exchange, shop-tts] #")
    )
    policy = compile_policy(text, source="policy.yaml", base_dir=EXAMPLE.parent)
    tts = policy.issuers["shop-tts"]
    assert tts.transaction_token_service and tts.audiences == frozenset({"cluster.local"})
    assert policy.rules[1].issuers == frozenset({"exchange", "shop-tts"})


def test_lint_explains_the_trust_domain_and_the_pass_hop() -> None:
    findings = lint_text(BASE, source=str(EXAMPLE), base_dir=EXAMPLE.parent)
    by_check = {f.check: f for f in findings}
    domain = by_check["txn-trust-domain"]
    assert domain.severity == "info" and "cluster.local" in domain.message
    assert (
        domain.line
        == BASE.splitlines().index(
            next(line for line in BASE.splitlines() if line.startswith("  trustDomain:"))
        )
        + 1
    )
    assert by_check["txn-pass"].rule == "ledger-record"
    assert not [f for f in findings if f.severity != "info"]


def test_diff_calls_pass_and_another_trust_domain_widening() -> None:
    def changes(new: str) -> set[tuple[str, str, str | None]]:
        old = compile_policy(BASE, source="a.yaml", base_dir=EXAMPLE.parent)
        found = diff_policies(old, compile_policy(new, source="b.yaml", base_dir=EXAMPLE.parent))
        return {(c.effect, c.kind, c.rule) for c in found}

    to_pass = edit("txnToken: replace ", "txnToken: pass ")
    assert changes(to_pass) == {(WIDENS, "txn-token-mode-changed", "payments-charge")}
    to_replace = edit("txnToken: pass", "txnToken: replace")
    assert changes(to_replace) == {(NARROWS, "txn-token-mode-changed", "ledger-record")}
    other = edit("trustDomain: cluster.local", "trustDomain: prod.example")
    assert changes(other) == {(WIDENS, "trust-domain-changed", None)}


def test_the_shipped_cases_pass_with_full_coverage() -> None:
    result = in_process("policy", "test", EXAMPLE, CASES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6 passed, 0 failed" in result.stdout
    assert "rule coverage: 3/3 rules reached" in result.stdout


def test_explain_shows_the_txn_token_and_the_pass() -> None:
    result = in_process(
        "explain",
        "--policy", EXAMPLE,
        "--workload", "spiffe://cluster.local/ns/shop/sa/payments",
        "--method", "POST",
        "--host", "ledger.shop.svc.cluster.local",
        "--path", "/v1/entries",
        "--issuer", "exchange",
        "--scope", "payments.charge",
        "--format", "json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["decision"] == "allow" and doc["rule"] == "ledger-record"
    assert doc["token"]["header"] == "txn-token" and doc["token"]["typ"] == "txntoken+jwt"
    assert doc["claims"] is None
    text = in_process(
        "explain", "--policy", EXAMPLE, "--workload", "spiffe://cluster.local/ns/shop/sa/payments",
        "--method", "POST", "--host", "ledger.shop.svc.cluster.local", "--path", "/v1/entries",
        "--issuer", "exchange", "--scope", "payments.charge",
    )  # fmt: skip
    assert "goes on as received (txnToken: pass)" in text.stdout


def test_exchange_as_a_simulated_issuer_needs_transaction_token_mode(tmp_path: Path) -> None:
    policy = ROOT / "examples" / "policy.yaml"
    result = in_process(
        "explain", "--policy", policy, "--workload", "spiffe://cluster.local/ns/shop/sa/orders",
        "--host", "profile.shop.svc.cluster.local", "--path", "/v1/customers/1",
        "--issuer", "exchange",
    )  # fmt: skip
    assert result.returncode == 2
    assert "transaction_token only" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
