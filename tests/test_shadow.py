"""Shadow mode: decide and log, enforce nothing; the request goes upstream exactly as it came.

A shadow rule (``mode: shadow`` on the rule) or a shadow policy (top-level ``mode: shadow``)
computes the full decision, including the claims it would mint, but signs nothing and mutates
no header. Unit tests drive ``decide`` and the edge; the end-to-end tests run the real Envoy,
once per front (ids ``grpc`` and ``http``) with the same assertions.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.rpc import code_pb2

from extauthz.decision.pipeline import Decision
from extauthz.demo.envoy import FRONTS
from extauthz.demo.stack import Mesh
from extauthz.policy.compiler import compile_policy
from extauthz.serve.decision_log import record
from extauthz.serve.edge import check_response
from extauthz.tools.simulate import SimRequest, Simulator

ROOT = Path(__file__).resolve().parent.parent
BASE = (ROOT / "examples" / "policy.yaml").read_text(encoding="utf-8")

ORDERS = "spiffe://cluster.local/ns/shop/sa/orders"
BILLING = "spiffe://cluster.local/ns/shop/sa/billing"
PROFILE_HOST = "profile.shop.svc.cluster.local"
PROFILE_AUD = "spiffe://cluster.local/ns/shop/sa/profile"
READ = "orders-read-profile"
UPDATE = "orders-update-address"
BROAD = "profile.read profile.write"


def shadow_rule_policy() -> str:
    """The example policy with ``mode: shadow`` on orders-read-profile only."""
    marker = "      ttl: 30s\n"
    assert BASE.index(marker) < BASE.index(f"id: {UPDATE}")
    return BASE.replace(marker, marker + "    mode: shadow\n", 1)


def shadow_policy() -> str:
    text = BASE.replace("kind: ExchangePolicy\n", "kind: ExchangePolicy\nmode: shadow\n", 1)
    assert text != BASE
    return text


SHADOW_RULE = shadow_rule_policy()
SHADOW_POLICY = shadow_policy()


def simulator(text: str) -> Simulator:
    return Simulator(compile_policy(text, source="policy.yaml"))


def read_request(**overrides: Any) -> SimRequest:
    fields: dict[str, Any] = {
        "workload": ORDERS,
        "method": "GET",
        "host": PROFILE_HOST,
        "path": "/v1/customers/42",
        "issuer": "corp-idp",
        "claims": {"scope": BROAD},
    }
    fields.update(overrides)
    return SimRequest(**fields)


# A second credential header beside the bearer token: an enforced allow removes it.
CREDENTIAL_HEADERS = {"x-forwarded-access-token": "opaque"}


def update_request(**overrides: Any) -> SimRequest:
    return read_request(method="PUT", path="/v1/customers/42/address", **overrides)


def decide(sim: Simulator, req: SimRequest) -> Decision:
    now = time.time()
    return sim.decide(sim.check_input(req, now), now)


def assert_passes_untouched(decision: Decision) -> None:
    response = check_response(decision)
    assert response.status.code == code_pb2.OK
    assert response.HasField("ok_response")
    assert not response.HasField("denied_response")
    ok = response.ok_response
    assert list(ok.headers) == []
    assert list(ok.headers_to_remove) == []
    assert list(ok.response_headers_to_add) == []
    assert list(ok.query_parameters_to_set) == []
    assert list(ok.query_parameters_to_remove) == []
    assert response.dynamic_metadata.fields["shadow"].string_value == "true"


def minted_header_names(decision: Decision) -> tuple[set[str], set[str]]:
    ok = check_response(decision).ok_response
    return {h.header.key for h in ok.headers}, set(ok.headers_to_remove)


# --- unit: a shadow rule ---------------------------------------------------------------------


def test_enforced_rule_mutates_headers_as_a_baseline() -> None:
    """The same request under the unmodified policy does set and remove headers, so the
    shadow assertions below would notice an enforced response."""
    decision = decide(simulator(BASE), read_request(headers=CREDENTIAL_HEADERS))
    assert decision.allowed and not decision.shadow and decision.token
    set_, removed = minted_header_names(decision)
    assert set_ == {"authorization"}
    assert "x-forwarded-access-token" in removed


def test_shadow_rule_computes_the_decision_but_mints_nothing() -> None:
    decision = decide(simulator(SHADOW_RULE), read_request())
    assert decision.allowed
    assert decision.shadow is True
    assert decision.token is None
    assert decision.rule is not None and decision.rule.id == READ
    claims = decision.claims
    assert claims is not None  # what would have been minted, for the decision log
    assert claims["aud"] == PROFILE_AUD
    assert claims["scope"] == "profile.read"
    assert claims["jti"]
    assert_passes_untouched(decision)
    meta = check_response(decision).dynamic_metadata.fields
    assert meta["rule"].string_value == READ
    assert meta["jti"].string_value == claims["jti"]


def test_shadow_rule_deny_also_passes_untouched_and_records_the_reason() -> None:
    decision = decide(simulator(SHADOW_RULE), read_request(claims={"scope": "email"}))
    assert not decision.allowed
    assert decision.reason.code == "insufficient_scope"
    assert decision.shadow is True
    assert decision.rule is not None and decision.rule.id == READ
    assert_passes_untouched(decision)
    line = record(decision, 0.001, "r1", time.time())
    assert (line["decision"], line["reason"], line["shadow"]) == (
        "deny",
        "insufficient_scope",
        True,
    )


def test_decision_log_line_for_a_shadow_allow_has_the_would_be_token() -> None:
    decision = decide(simulator(SHADOW_RULE), read_request())
    line = record(decision, 0.001, "r1", time.time())
    assert line["decision"] == "allow"
    assert line["shadow"] is True
    assert line["rule"] == READ
    assert line["aud"] == PROFILE_AUD
    assert decision.claims is not None
    assert line["jti"] == decision.claims["jti"]


# --- unit: a shadow policy -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        pytest.param(read_request(issuer=None), "token_missing", id="no-token"),
        pytest.param(read_request(workload=BILLING), "no_rule", id="wrong-workload"),
        pytest.param(read_request(expires_in=-3600), "token_expired", id="expired"),
        pytest.param(
            read_request(workload="spiffe://partner.example/ns/shop/sa/orders"),
            "workload_untrusted",
            id="untrusted-domain",
        ),
    ],
)
def test_shadow_policy_passes_denied_requests_untouched(request_: SimRequest, reason: str) -> None:
    enforced = decide(simulator(BASE), request_)
    assert enforced.reason.code == reason
    assert check_response(enforced).HasField("denied_response")

    decision = decide(simulator(SHADOW_POLICY), request_)
    assert not decision.allowed
    assert decision.reason.code == reason  # the deny is still what the log records
    assert decision.shadow is True
    assert decision.token is None
    assert_passes_untouched(decision)
    line = record(decision, 0.001, "r1", time.time())
    assert (line["decision"], line["reason"], line["shadow"]) == ("deny", reason, True)


def test_shadow_policy_allow_mints_nothing() -> None:
    decision = decide(simulator(SHADOW_POLICY), update_request())
    assert decision.allowed
    assert decision.shadow is True
    assert decision.token is None
    assert decision.claims is not None and decision.claims["scope"] == "profile.write"
    assert_passes_untouched(decision)


# --- unit: shadow and enforce side by side ---------------------------------------------------


def test_shadow_enforce_mix_only_the_shadow_rule_passes_untouched() -> None:
    sim = simulator(SHADOW_RULE)

    shadowed = decide(sim, read_request())
    assert shadowed.shadow
    assert_passes_untouched(shadowed)

    enforced = decide(sim, update_request(headers=CREDENTIAL_HEADERS))
    assert enforced.allowed
    assert enforced.shadow is False
    assert enforced.token
    set_, removed = minted_header_names(enforced)
    assert set_ == {"authorization"}
    assert "x-forwarded-access-token" in removed

    refused = decide(sim, update_request(claims={"scope": "profile.read"}))
    assert refused.reason.code == "insufficient_scope"
    assert refused.shadow is False
    response = check_response(refused)
    assert response.HasField("denied_response")
    assert response.denied_response.status.code == 403

    # requests no rule matches are not the shadow rule's: still enforced
    for req, reason in (
        (read_request(workload=BILLING), "no_rule"),
        (read_request(issuer=None), "token_missing"),
    ):
        decision = decide(sim, req)
        assert decision.reason.code == reason
        assert decision.shadow is False
        assert check_response(decision).HasField("denied_response")


# --- end to end through the real Envoy -------------------------------------------------------

MARK = "x-test-id"


@pytest.fixture(scope="module", params=FRONTS)
def mesh(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Mesh]:
    """One mesh per front, with the shadow rule policy."""
    front: str = request.param
    workdir = tmp_path_factory.mktemp(f"shadow-mesh-{front}")
    with Mesh(workdir, policy_text=SHADOW_RULE, front=front) as running:
        yield running


def send(mesh: Mesh, *, method: str, path: str, headers: dict[str, str]) -> tuple[int, Any]:
    """One request through Envoy; returns the status and what the upstream received for it."""
    mark = uuid.uuid4().hex
    response = mesh.request(
        "orders", method=method, path=path, host=PROFILE_HOST, headers={MARK: mark, **headers}
    )
    arrived = [r for r in mesh.echo.requests if r.headers.get(MARK) == mark]
    assert len(arrived) <= 1
    return response.status, arrived[0] if arrived else None


def log_entry(mesh: Mesh, path: str, method: str) -> dict[str, Any]:
    entries = [
        d for d in mesh.sidecar.decisions() if d.get("path") == path and d.get("method") == method
    ]
    assert entries, mesh.sidecar.decisions()
    return entries[-1]


@pytest.mark.envoy
def test_end_to_end_shadow_rule_forwards_the_original_credentials(mesh: Mesh) -> None:
    subject = mesh.idp.token(now=time.time(), scope=BROAD)
    sent = {
        "authorization": f"Bearer {subject}",
        "x-forwarded-access-token": subject,
    }

    # baseline: the enforced rule on the same host replaces and strips credentials
    status, enforced = send(mesh, method="PUT", path="/v1/customers/42/address", headers=sent)
    assert status == 200
    assert enforced is not None
    assert enforced.headers["authorization"] != f"Bearer {subject}"
    assert "x-forwarded-access-token" not in enforced.headers

    status, upstream = send(mesh, method="GET", path="/v1/customers/42", headers=sent)
    assert status == 200
    assert upstream is not None
    assert upstream.headers["authorization"] == f"Bearer {subject}"  # unchanged
    assert upstream.headers["x-forwarded-access-token"] == subject  # not stripped
    # nothing injected: every header either was sent or is one Envoy also adds when enforcing
    envoy_added = set(enforced.headers) - set(sent) - {MARK}
    assert set(upstream.headers) - set(sent) - {MARK} <= envoy_added
    assert "txn-token" not in upstream.headers
    # nor does any of the check's own answer travel upstream, enforced or not
    for received in (enforced, upstream):
        assert not [h for h in received.headers if h.startswith(("x-extauthz", "x-envoy-auth"))]

    entry = log_entry(mesh, "/v1/customers/42", "GET")
    assert entry["decision"] == "allow"
    assert entry["reason"] == "allowed"
    assert entry["shadow"] is True
    assert entry["rule"] == READ
    assert entry["aud"] == PROFILE_AUD
    assert entry["scopes"] == "profile.read"
    assert entry["jti"]
    assert all(entry["jti"] not in v for v in upstream.headers.values())
    assert subject not in str(entry)

    enforced_entry = log_entry(mesh, "/v1/customers/42/address", "PUT")
    assert enforced_entry["shadow"] is False
    assert enforced_entry["decision"] == "allow"


@pytest.mark.envoy
def test_end_to_end_shadow_rule_lets_a_would_be_deny_through(mesh: Mesh) -> None:
    subject = mesh.idp.token(now=time.time(), scope="email")
    path = "/v1/customers/7"
    status, upstream = send(
        mesh, method="GET", path=path, headers={"authorization": f"Bearer {subject}"}
    )
    assert status == 200
    assert upstream is not None
    assert upstream.headers["authorization"] == f"Bearer {subject}"
    entry = log_entry(mesh, path, "GET")
    assert (entry["decision"], entry["reason"], entry["shadow"]) == (
        "deny",
        "insufficient_scope",
        True,
    )
    assert entry["jti"] is None


@pytest.mark.envoy
def test_end_to_end_enforced_deny_still_blocks(mesh: Mesh) -> None:
    subject = mesh.idp.token(now=time.time(), scope="profile.read")
    status, upstream = send(
        mesh,
        method="PUT",
        path="/v1/customers/9/address",
        headers={"authorization": f"Bearer {subject}"},
    )
    assert status == 403
    assert upstream is None
