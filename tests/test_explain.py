"""``extauthz explain``: one decision traced phase by phase, from flags or a recorded request."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from clikit import in_process
from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf import json_format

from extauthz.decision.jose import generate_signing_key
from extauthz.demo.idp import Idp
from extauthz.policy.compiler import load_policy
from extauthz.policy.loader import assemble, load_issuer_keys
from extauthz.serve.edge import check_input
from extauthz.tools.explain import explain

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "policy.yaml"

ORDERS = "spiffe://cluster.local/ns/shop/sa/orders"
BILLING = "spiffe://cluster.local/ns/shop/sa/billing"
PROFILE_HOST = "profile.shop.svc.cluster.local"
PROFILE_AUD = "spiffe://cluster.local/ns/shop/sa/profile"
READ_FLAGS = ["--workload", ORDERS, "--host", PROFILE_HOST, "--path", "/v1/customers/42"]


def run(*args: str | Path, real: bool = False) -> subprocess.CompletedProcess[str]:
    """``explain ARGS``; ``real`` runs the installed entry point in a child process."""
    if not real:
        return in_process("explain", *args)
    return subprocess.run(
        [sys.executable, "-m", "extauthz", "explain", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def explain_json(*args: str | Path) -> dict[str, Any]:
    result = run(*args, "--format", "json")
    doc: dict[str, Any] = json.loads(result.stdout)
    # The exit code is the verdict: 0 allow, 1 deny (2 is for input it cannot use).
    assert result.returncode == (0 if doc["decision"] == "allow" else 1), result.stderr
    return doc


# --- simulated requests from flags -----------------------------------------------------------


def test_text_names_the_picked_rule_and_why_others_were_passed_over() -> None:
    result = run(
        "--policy", EXAMPLE, *READ_FLAGS, "--scope", "profile.read profile.write", real=True
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "orders-read-profile: picked" in out
    assert "orders-update-address: passed over" in out
    assert "method GET is not in ['PUT']" in out
    assert "path /v1/customers/42 matches none of ['/v1/customers/{id}/address']" in out
    assert "checkout-charge-payment: passed over" in out
    assert "host 'profile.shop.svc.cluster.local' is not 'payments.shop.svc.cluster.local'" in out
    assert f"caller {ORDERS} is not among" in out
    assert "decision   allow (allowed, HTTP 200), rule orders-read-profile" in out
    assert f"aud: {PROFILE_AUD}" in out
    assert "scope: profile.read\n" in out  # narrowed: profile.write is not granted


def test_json_structure() -> None:
    doc = explain_json("--policy", EXAMPLE, *READ_FLAGS, "--scope", "profile.read")
    assert set(doc) >= {
        "decision", "reason", "http_status", "detail", "shadow", "rule", "token", "caller",
        "request", "candidates", "claims",
    }  # fmt: skip
    assert doc["decision"] == "allow"
    assert doc["reason"] == "allowed"
    assert doc["http_status"] == 200
    assert doc["shadow"] is False
    assert doc["rule"] == "orders-read-profile"
    assert doc["caller"] == ORDERS
    assert doc["token"]["present"] is True
    assert doc["token"]["issuer_id"] == "corp-idp"
    assert doc["token"]["alg"] == "ES256"
    assert len(doc["token"]["keys_tried"]) == 1
    assert doc["request"]["normalised_path"] == "/v1/customers/42"
    verdicts = {c["rule"]: (c["verdict"], c["because"]) for c in doc["candidates"]}
    assert verdicts["orders-read-profile"] == ("picked", [])
    assert verdicts["orders-update-address"][0] == "passed over"
    assert len(verdicts["orders-update-address"][1]) == 2
    assert verdicts["checkout-charge-payment"][0] == "passed over"
    assert len(verdicts["checkout-charge-payment"][1]) == 4
    claims = doc["claims"]
    assert claims["aud"] == PROFILE_AUD
    assert claims["scope"] == "profile.read"
    assert claims["act"] == {"sub": ORDERS}
    assert claims["exp"] - claims["iat"] == 30


def test_no_token_gives_token_missing() -> None:
    doc = explain_json("--policy", EXAMPLE, *READ_FLAGS, "--no-token")
    assert doc["decision"] == "deny"
    assert doc["reason"] == "token_missing"
    assert doc["http_status"] == 401
    assert doc["token"] == {"present": False, "header": "authorization"}
    assert doc["claims"] is None
    text = run("--policy", EXAMPLE, *READ_FLAGS, "--no-token").stdout
    assert "no bearer token" in text
    assert "decision   deny (token_missing, HTTP 401)" in text


def test_method_and_missing_scope() -> None:
    doc = explain_json(
        "--policy", EXAMPLE, *READ_FLAGS, "--method", "PUT", "--scope", "profile.read"
    )
    # PUT on the profile itself: no rule has it
    assert doc["reason"] == "no_rule"
    doc = explain_json(
        "--policy",
        EXAMPLE,
        "--workload",
        ORDERS,
        "--host",
        PROFILE_HOST,
        "--path",
        "/v1/customers/42/address",
        "--method",
        "PUT",
        "--scope",
        "profile.read",
    )
    assert doc["reason"] == "insufficient_scope"
    assert doc["rule"] == "orders-update-address"
    assert "profile.write" in doc["detail"]


def test_certificate_and_claims_flags() -> None:
    doc = explain_json(
        "--policy",
        EXAMPLE,
        *READ_FLAGS,
        "--claims",
        json.dumps({"sub": "alice", "scope": "profile.read"}),
        "--certificate",
    )
    assert doc["claims"]["sub"] == "alice"
    assert set(doc["claims"]["cnf"]) == {"x5t#S256"}


def test_now_sets_the_decision_time() -> None:
    now = time.time()
    doc = explain_json(
        "--policy", EXAMPLE, *READ_FLAGS, "--scope", "profile.read", "--now", str(now)
    )
    assert doc["reason"] == "allowed"
    assert doc["claims"]["iat"] == int(now)


def test_incomplete_flags_exit_2() -> None:
    result = run("--policy", EXAMPLE, "--workload", ORDERS)
    assert result.returncode == 2
    assert "--request" in result.stderr


# --- a recorded CheckRequest -----------------------------------------------------------------


def record_check_request(
    workdir: Path, idp: Idp, *, principal: str, scope: str = "profile.read profile.write"
) -> Path:
    """A CheckRequest as Envoy sends it, serialised as protobuf JSON."""
    message = external_auth_pb2.CheckRequest()
    attrs = message.attributes
    attrs.source.principal = principal
    http = attrs.request.http
    http.id = "8735581211430520710"
    http.method = "GET"
    http.host = PROFILE_HOST
    http.path = "/v1/customers/42?expand=orders"
    http.scheme = "https"
    http.protocol = "HTTP/1.1"
    token = idp.token(now=time.time(), scope=scope)
    for name, value in {
        ":authority": PROFILE_HOST,
        ":method": "GET",
        ":path": http.path,
        ":scheme": "https",
        "authorization": f"Bearer {token}",
        "user-agent": "orders/1.0",
        "x-request-id": "5c0a7c4e-0000-4000-8000-000000000000",
    }.items():
        http.headers[name] = value
    path = workdir / f"request-{principal.rsplit('/', 1)[1]}.json"
    path.write_text(json_format.MessageToJson(message), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Idp]:
    """A copy of the example policy with the JWKS of a throwaway issuer next to it."""
    work = tmp_path_factory.mktemp("explain")
    shutil.copy(EXAMPLE, work / "policy.yaml")
    idp = Idp("https://idp.example.com")
    idp.write_jwks(work / "issuers" / "corp-idp.json")
    return work, idp


def test_recorded_request_names_the_rule_and_allowed(recorded: tuple[Path, Idp]) -> None:
    work, idp = recorded
    request = record_check_request(work, idp, principal=ORDERS)
    result = run("--policy", work / "policy.yaml", "--request", request)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "orders-read-profile: picked" in result.stdout
    assert "decision   allow (allowed, HTTP 200), rule orders-read-profile" in result.stdout

    doc = explain_json("--policy", work / "policy.yaml", "--request", request)
    assert doc["rule"] == "orders-read-profile"
    assert doc["reason"] == "allowed"
    assert doc["caller"] == ORDERS
    assert doc["token"]["issuer_id"] == "corp-idp"
    assert doc["token"]["keys_tried"] == [idp.key.kid]
    assert doc["request"]["normalised_path"] == "/v1/customers/42"
    assert doc["claims"]["scope"] == "profile.read"
    assert doc["claims"]["authorization_details"][0] == {
        "type": "http_request",
        "method": "GET",
        "host": PROFILE_HOST,
        "path": "/v1/customers/42",
    }


def test_recorded_request_from_the_wrong_workload_is_no_rule(
    recorded: tuple[Path, Idp],
) -> None:
    work, idp = recorded
    request = record_check_request(work, idp, principal=BILLING)
    doc = explain_json("--policy", work / "policy.yaml", "--request", request)
    assert doc["decision"] == "deny"
    assert doc["reason"] == "no_rule"
    assert doc["rule"] is None
    assert doc["claims"] is None
    read = next(c for c in doc["candidates"] if c["rule"] == "orders-read-profile")
    assert read["verdict"] == "passed over"
    assert read["because"] == [f"caller {BILLING} is not among [{ORDERS!r}]"]
    text = run("--policy", work / "policy.yaml", "--request", request).stdout
    assert "decision   deny (no_rule, HTTP 403)" in text


def test_recorded_request_far_in_the_future_is_token_expired(
    recorded: tuple[Path, Idp],
) -> None:
    work, idp = recorded
    request = record_check_request(work, idp, principal=ORDERS)
    later = time.time() + 30 * 24 * 3600
    doc = explain_json("--policy", work / "policy.yaml", "--request", request, "--now", str(later))
    assert doc["reason"] == "token_expired"
    assert doc["http_status"] == 401
    assert doc["claims"] is None


def test_recorded_request_signed_by_an_unknown_key_is_key_unknown(
    recorded: tuple[Path, Idp],
) -> None:
    work, _ = recorded
    impostor = Idp("https://idp.example.com")  # same iss, a key the JWKS does not have
    request = record_check_request(work, impostor, principal=ORDERS)
    doc = explain_json("--policy", work / "policy.yaml", "--request", request)
    assert doc["decision"] == "deny"
    assert doc["reason"] == "key_unknown"
    assert doc["token"]["keys_tried"] == []


def test_recorded_request_in_process_matches_the_cli(recorded: tuple[Path, Idp]) -> None:
    work, idp = recorded
    request = record_check_request(work, idp, principal=ORDERS)
    message = json_format.Parse(request.read_text(), external_auth_pb2.CheckRequest())
    policy = load_policy(work / "policy.yaml")
    snap = assemble(policy, load_issuer_keys(policy), [generate_signing_key()])
    result = explain(check_input(message), snap, time.time())
    assert result.decision.allowed
    assert result.decision.rule is not None
    assert result.decision.rule.id == "orders-read-profile"
    assert [c["verdict"] for c in result.candidates] == ["picked", "passed over", "passed over"]


def test_missing_request_file_exits_2(tmp_path: Path) -> None:
    result = run("--policy", EXAMPLE, "--request", tmp_path / "missing.json")
    assert result.returncode == 2
    assert "missing.json" in result.stderr


def test_malformed_request_file_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "req.json"
    bad.write_text("{not json", encoding="utf-8")
    result = run("--policy", EXAMPLE, "--request", bad)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_no_token_wins_over_issuer() -> None:
    doc = explain_json(
        "--policy", EXAMPLE, *READ_FLAGS, "--no-token", "--issuer", "corp-idp", "--scope", "x"
    )
    assert doc["reason"] == "token_missing"


def test_claims_that_are_not_an_object_exit_2() -> None:
    result = run("--policy", EXAMPLE, *READ_FLAGS, "--claims", "[1, 2]")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
