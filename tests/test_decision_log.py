"""The decision log, version 2: every field of version 1, and the decision's id (the same one
Envoy gets in its dynamic metadata), the policy revision and generation, the trace id, and the
request as it came for a request denied before it was read. Through the real Sidecar and both
fronts' edges, in process."""

from __future__ import annotations

import dataclasses
import io
import json
from typing import Any

import corekit as k
import edgekit
import pytest
from envoy.service.auth.v3 import external_auth_pb2

from extauthz.serve import http_edge
from extauthz.serve.decision_log import DecisionLog, trace_id
from extauthz.serve.grpc_front import GrpcEdge
from extauthz.serve.http_edge import HttpEdge
from extauthz.serve.sidecar import Sidecar

V1_FIELDS = {
    "time", "decision", "shadow", "reason", "rule", "purpose", "caller", "sub", "iss", "aud",
    "scopes", "jti", "txn", "method", "host", "path", "request_id", "detail", "latency_ms",
}  # fmt: skip
V2_FIELDS = {"v", "decision_id", "policy_revision", "policy_generation", "trace_id"}
V2_FIELDS |= {"rule_file"}
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE}-00f067aa0ba902b7-01"


def check(front: str, req: edgekit.Request, generation: int = 3) -> tuple[dict[str, Any], str]:
    """One check through a Sidecar with a real DecisionLog: its log line, and the decision id
    Envoy receives in the answer."""
    world = k.make_world()
    stream = io.StringIO()
    sidecar = Sidecar(DecisionLog(stream), clock=lambda: k.NOW)
    sidecar.install(dataclasses.replace(world.snap, generation=generation))
    if front == "grpc":
        raw = sidecar.check(edgekit.grpc_wire(req), GrpcEdge())
        answer = external_auth_pb2.CheckResponse.FromString(raw)
        sent = answer.dynamic_metadata.fields["decision_id"].string_value
    else:
        raw = sidecar.check(edgekit.http_wire(req), HttpEdge())
        sent = edgekit.parse_one(raw).header(http_edge.DECISION_HEADER) or ""
    sidecar.decision_log.flush()
    line = json.loads(stream.getvalue())
    assert line["policy_revision"] == world.snap.policy.digest[:16]
    return line, sent


def _token() -> str:
    return k.make_world().token()


@pytest.mark.parametrize("front", ["grpc", "http"])
def test_an_allow_logs_every_field_and_the_id_envoy_gets(front: str) -> None:
    world = k.make_world()
    req = edgekit.request(world.token(), headers={"traceparent": TRACEPARENT})
    # The allow needs the world's own issuer keys: use its snapshot.
    stream = io.StringIO()
    sidecar = Sidecar(DecisionLog(stream), clock=lambda: k.NOW)
    sidecar.install(dataclasses.replace(world.snap, generation=7))
    if front == "grpc":
        answer = external_auth_pb2.CheckResponse.FromString(
            sidecar.check(edgekit.grpc_wire(req), GrpcEdge())
        )
        assert answer.HasField("ok_response")
        sent = answer.dynamic_metadata.fields["decision_id"].string_value
    else:
        response = edgekit.parse_one(sidecar.check(edgekit.http_wire(req), HttpEdge()))
        assert response.status == 200
        sent = response.header(http_edge.DECISION_HEADER) or ""
    sidecar.decision_log.flush()
    line = json.loads(stream.getvalue())
    assert set(line) == V1_FIELDS | V2_FIELDS
    assert line["decision"] == "allow" and line["v"] == 2
    assert len(sent) >= 16 and line["decision_id"] == sent
    assert line["policy_generation"] == 7
    assert line["policy_revision"] == world.snap.policy.digest[:16]
    assert line["trace_id"] == TRACE


@pytest.mark.parametrize("front", ["grpc", "http"])
def test_an_early_deny_carries_the_request_as_it_came(front: str) -> None:
    req = edgekit.request(path="/v1/customers/42?access_token=secret", headers={})
    line, sent = check(front, req)
    assert line["reason"] == "token_missing"
    assert (line["method"], line["host"], line["path"]) == ("GET", k.HOST, "/v1/customers/42")
    assert line["caller"] == k.ORDERS
    assert line["decision_id"] == sent and sent
    assert "secret" not in json.dumps(line)
    assert line["trace_id"] is None


@pytest.mark.parametrize("front", ["grpc", "http"])
def test_ids_differ_per_decision(front: str) -> None:
    req = edgekit.request(headers={})
    ids = {check(front, req)[1] for _ in range(3)}
    assert len(ids) == 3


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (TRACEPARENT, TRACE),
        (f" {TRACEPARENT} ", TRACE),
        (f"00-{'0' * 32}-00f067aa0ba902b7-01", None),
        (f"00-{TRACE.upper()}-00f067aa0ba902b7-01", None),
        (f"00-{TRACE}-00f067aa0ba902b7", None),
        ("garbage", None),
        ("", None),
        (None, None),
    ],
)
def test_trace_id_is_read_strictly(header: str | None, expected: str | None) -> None:
    assert trace_id(header) == expected


def test_a_raw_host_and_path_are_cut_to_size() -> None:
    req = edgekit.request(host="h" * 400, path="/" + "p" * 3000, headers={})
    line, _ = check("grpc", req)
    assert line["reason"] == "token_missing"
    assert len(line["host"]) == 256 and len(line["path"]) == 1024


def test_without_a_loaded_policy_the_revision_is_unknown() -> None:
    stream = io.StringIO()
    sidecar = Sidecar(DecisionLog(stream), clock=lambda: k.NOW)
    raw = sidecar.check(edgekit.grpc_wire(edgekit.request(_token())), GrpcEdge())
    assert external_auth_pb2.CheckResponse.FromString(raw).HasField("denied_response")
    sidecar.decision_log.flush()
    line = json.loads(stream.getvalue())
    assert line["reason"] == "not_ready"
    assert line["policy_revision"] is None and line["policy_generation"] is None
    assert line["decision_id"]
