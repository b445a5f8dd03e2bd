"""Coverage-guided fuzzing (atheris / libFuzzer) of extauthz's parsers of outside input.

Not part of the test suite (pytest only collects ``test_*.py``) and atheris is not a declared
dependency. To run one target (see docs/security.md):

    .venv/bin/pip install atheris
    .venv/bin/python tests/fuzz/fuzz_extauthz.py decide -max_total_time=300 corpus/decide/

Targets: policy, compact, jwks, xfcc, spiffe, paths, decide. Each enforces the same contract
as tests/test_fuzz.py: only the documented exception may escape (and ``decide`` never allows a
token it cannot have verified). A crash writes the input to ``crash-*`` for a regression test.
"""

from __future__ import annotations

import contextlib
import json
import sys

import atheris

with atheris.instrument_imports():
    from extauthz.decision import paths
    from extauthz.decision.identity import parse_spiffe_id, parse_xfcc
    from extauthz.decision.jose import (
        TokenFormatError,
        generate_issuer_key,
        generate_signing_key,
        jwks_document,
        parse_compact,
        parse_jwks,
    )
    from extauthz.decision.pipeline import CheckInput, decide
    from extauthz.errors import KeyLoadError, PolicyError
    from extauthz.policy.compiler import compile_policy
    from extauthz.policy.loader import assemble

NOW = 1_700_000_000
POLICY_TEXT = """\
apiVersion: extauthz/v1
kind: ExchangePolicy
exchange: {issuer: https://exchange.shop.svc}
trustedIssuers:
  - id: corp-idp
    issuer: https://idp.example.com
    jwks: {file: corp-idp.json}
    audiences: [https://shop.example.com]
    algorithms: [ES256]
workloads:
  trustDomains: [cluster.local]
  xfcc: {trustedHops: [spiffe://cluster.local/ns/edge/sa/gateway]}
rules:
  - id: orders-read-profile
    purpose: Orders shows the customer's profile on an order page
    match:
      workloads: [spiffe://cluster.local/ns/shop/sa/orders]
      host: profile.shop.svc.cluster.local
      methods: [GET]
      paths: ["/v1/customers/{id}"]
      issuers: [corp-idp]
    require: {scopes: [profile.read]}
    grant: {audience: spiffe://cluster.local/ns/shop/sa/profile, scopes: [profile.read], ttl: 30s}
"""


def fuzz_policy(data: bytes) -> None:
    text = atheris.FuzzedDataProvider(data).ConsumeUnicodeNoSurrogates(len(data))
    with contextlib.suppress(PolicyError):
        compile_policy(text)


def fuzz_compact(data: bytes) -> None:
    text = atheris.FuzzedDataProvider(data).ConsumeUnicodeNoSurrogates(len(data))
    with contextlib.suppress(TokenFormatError):
        parse_compact(text)


def fuzz_jwks(data: bytes) -> None:
    with contextlib.suppress(KeyLoadError):
        parse_jwks(data)


def fuzz_xfcc(data: bytes) -> None:
    text = atheris.FuzzedDataProvider(data).ConsumeUnicodeNoSurrogates(len(data))
    with contextlib.suppress(ValueError):
        parse_xfcc(text)


def fuzz_spiffe(data: bytes) -> None:
    text = atheris.FuzzedDataProvider(data).ConsumeUnicode(len(data))
    parsed = parse_spiffe_id(text)
    if parsed is not None:
        assert parse_spiffe_id(str(parsed)) == parsed


def fuzz_paths(data: bytes) -> None:
    text = atheris.FuzzedDataProvider(data).ConsumeUnicode(len(data))
    segments = paths.normalise(text)
    if segments is not None:
        assert paths.normalise(paths.join(segments)) == segments
        assert not any(s in (".", "..") or "/" in s or ";" in s for s in segments)


_SNAP = None


def fuzz_decide(data: bytes) -> None:
    global _SNAP
    if _SNAP is None:
        idp = generate_issuer_key("ES256")
        keys = parse_jwks(json.dumps(jwks_document([idp])).encode())
        _SNAP = assemble(compile_policy(POLICY_TEXT), {"corp-idp": keys}, [generate_signing_key()])
    fdp = atheris.FuzzedDataProvider(data)

    def text() -> str:
        return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 300))

    inp = CheckInput(
        method=text(),
        host=text(),
        path=text(),
        headers={"authorization": text(), "x-forwarded-client-cert": text()},
        principal=text(),
        peer_certificate=text(),
    )
    decision = decide(inp, _SNAP, NOW, lambda: "jti")
    assert not decision.allowed, decision  # the fuzzer cannot forge an ES256 signature


TARGETS = {
    "policy": fuzz_policy,
    "compact": fuzz_compact,
    "jwks": fuzz_jwks,
    "xfcc": fuzz_xfcc,
    "spiffe": fuzz_spiffe,
    "paths": fuzz_paths,
    "decide": fuzz_decide,
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer options] [corpus]")
    target = TARGETS[sys.argv.pop(1)]
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
