"""The gRPC front's answers are encoded from parts built once per rule: they must be exactly
the CheckResponse a protobuf-built message would be, field for field. A Txn-Token passed on as
received is answered alike by both fronts."""

from __future__ import annotations

import corekit as k
import edgekit
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf import struct_pb2, wrappers_pb2
from google.rpc import code_pb2, status_pb2

from extauthz.decision.authenticate import Subject
from extauthz.decision.model import Rule
from extauthz.decision.pipeline import Decision
from extauthz.decision.reasons import Reason
from extauthz.serve import http_edge
from extauthz.serve.edge import check_response, encode_deny, encode_response
from extauthz.serve.grpc_front import GrpcEdge

TOKEN = "eyJhbGciOiJFUzI1NiJ9." + "x" * 700 + ".sig"  # long enough for 2-byte lengths


@pytest.fixture(scope="module")
def rule() -> Rule:
    world = k.make_world(k.policy_doc([k.rule_doc("orders-read-profile")]))
    return world.snap.policy.rules[0]


def expected_allow(
    header: str, value: str, strip: tuple[str, ...], meta: dict[str, str]
) -> external_auth_pb2.CheckResponse:
    option = base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=header, value=value),
        append=wrappers_pb2.BoolValue(value=False),
    )
    metadata = struct_pb2.Struct()
    metadata.update(meta)
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code_pb2.OK),
        ok_response=external_auth_pb2.OkHttpResponse(
            headers=[option], headers_to_remove=list(strip)
        ),
        dynamic_metadata=metadata,
    )


@pytest.mark.parametrize("strip", [(), ("proxy-authorization",), ("txn-token", "x-id-token")])
def test_an_allow_is_the_message_protobuf_would_build(rule: Rule, strip: tuple[str, ...]) -> None:
    claims = {"jti": "j-1", "aud": "a"}
    decision = Decision(Reason.ALLOWED, rule=rule, claims=claims, token=TOKEN, strip_headers=strip)
    meta = {"reason": "allowed", "rule": rule.id, "jti": "j-1"}
    assert check_response(decision) == expected_allow(
        "authorization", "Bearer " + TOKEN, strip, meta
    )
    assert GrpcEdge().respond(decision) == encode_response(decision)


def test_a_transaction_token_goes_in_its_own_header_with_its_txn(rule: Rule) -> None:
    claims = {"jti": "j-2", "txn": "t-2"}
    decision = Decision(Reason.ALLOWED, rule=rule, claims=claims, token=TOKEN, header="txn-token")
    meta = {"reason": "allowed", "rule": rule.id, "jti": "j-2", "txn": "t-2"}
    assert check_response(decision) == expected_allow("txn-token", TOKEN, (), meta)


def test_a_shadow_allow_changes_nothing_and_says_so(rule: Rule) -> None:
    decision = Decision(Reason.ALLOWED, rule=rule, claims={"jti": "j-3"}, shadow=True)
    response = check_response(decision)
    assert response.status.code == code_pb2.OK
    assert response.HasField("ok_response")
    assert response.ok_response == external_auth_pb2.OkHttpResponse()
    fields = {k: v.string_value for k, v in response.dynamic_metadata.fields.items()}
    assert fields == {"reason": "allowed", "rule": rule.id, "jti": "j-3", "shadow": "true"}


def test_an_allow_without_a_token_is_an_internal_error_deny(rule: Rule) -> None:
    response = check_response(Decision(Reason.ALLOWED, rule=rule))
    assert response.HasField("denied_response")
    assert response.denied_response.status.code == 500
    assert response.status.code == code_pb2.UNAVAILABLE


@pytest.mark.parametrize("reason", [r for r in Reason if r is not Reason.ALLOWED])
def test_every_deny_is_encoded_once_and_parses(reason: Reason) -> None:
    assert encode_deny(reason) is encode_deny(reason)
    response = external_auth_pb2.CheckResponse.FromString(encode_deny(reason, "r-1"))
    assert response.HasField("denied_response") and not response.HasField("ok_response")
    assert response.denied_response.status.code == reason.http_status
    assert response.dynamic_metadata.fields["reason"].string_value == reason.code
    assert response.dynamic_metadata.fields["rule"].string_value == "r-1"
    assert response.status.code != code_pb2.OK


def test_the_request_id_is_x_request_id_on_both_fronts() -> None:
    """The decision log joins a check to the request the upstream receives by x-request-id;
    Envoy's stream id stands in only when the request has none."""
    from envoy.service.auth.v3 import attribute_context_pb2

    from extauthz.serve.edge import check_input
    from extauthz.serve.http_edge import HttpCheck
    from extauthz.serve.http_edge import check_input as http_check_input

    def grpc_request(headers: dict[str, str]) -> external_auth_pb2.CheckRequest:
        ctx = attribute_context_pb2.AttributeContext
        http = ctx.HttpRequest(id="stream-7", method="GET", host="h", path="/", headers=headers)
        return external_auth_pb2.CheckRequest(attributes=ctx(request=ctx.Request(http=http)))

    with_id = check_input(grpc_request({"x-request-id": "rid-1"}))
    without = check_input(grpc_request({}))
    assert not isinstance(with_id, Exception) and not isinstance(without, Exception)
    assert getattr(with_id, "request_id", None) == "rid-1"
    assert getattr(without, "request_id", None) == "stream-7"
    check = HttpCheck("GET", "/check/")
    check.add_header("x-request-id", "rid-1")
    assert getattr(http_check_input(check), "request_id", None) == "rid-1"


def test_a_clients_long_request_id_is_cut_in_the_decision_log() -> None:
    """x-request-id is the client's to choose: the log keeps the first 128 characters."""
    from extauthz.serve.decision_log import MAX_REQUEST_ID, record

    line = record(Decision(Reason.NO_RULE), 0.001, "r" * 10_000, 1.0)
    assert line["request_id"] == "r" * MAX_REQUEST_ID
    assert record(Decision(Reason.NO_RULE), 0.001, "", 1.0)["request_id"] is None


def _passed(rule: Rule) -> Decision:
    """An inner hop's ``txnToken: pass``: the received Txn-Token goes on, nothing is minted."""
    subject = Subject(
        "exchange", k.EXCHANGE_ISS, "alice", 1, frozenset(), (), None, None, txn="t-9"
    )
    strip = ("authorization", "proxy-authorization")
    return Decision(
        Reason.ALLOWED, rule=rule, subject=subject, strip_headers=strip, passthrough=True
    )


def test_a_passed_txn_token_sets_no_header_and_removes_the_other_credentials(rule: Rule) -> None:
    decision = _passed(rule)
    response = check_response(decision)
    assert response.status.code == code_pb2.OK
    assert list(response.ok_response.headers) == []
    assert list(response.ok_response.headers_to_remove) == [
        "authorization",
        "proxy-authorization",
    ]
    fields = {key: v.string_value for key, v in response.dynamic_metadata.fields.items()}
    assert fields == {"reason": "allowed", "rule": rule.id, "txn": "t-9"}


def test_the_http_front_passes_a_txn_token_the_same_way(rule: Rule) -> None:
    answer = edgekit.parse_one(http_edge.check_response(_passed(rule)))
    assert answer.status == 200
    assert answer.header("x-envoy-auth-headers-to-remove") == "authorization,proxy-authorization"
    assert answer.header("txn-token") is None and answer.header("authorization") is None
    assert answer.header(http_edge.TXN_HEADER) == "t-9"
    assert answer.header(http_edge.REASON_HEADER) == "allowed"
