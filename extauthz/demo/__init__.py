"""``extauthz demo``: one narrated token exchange through a real Envoy, on loopback.

It makes a throwaway CA, workload certificates and an issuer key, starts the sidecar with the
example policy, a real Envoy with the project's envoy.yaml and an echo upstream, sends a few
requests as workloads carrying a user token, and shows what the client sent beside what the
upstream received. Everything it starts is stopped, and its files removed, when it ends.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from extauthz.decision.jose import CompactJWS, parse_compact, parse_jwks, verify_signature
from extauthz.demo.stack import Mesh, http_get

HOST = "profile.shop.svc.cluster.local"


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    says: str
    workload: str
    method: str
    path: str
    token: dict[str, Any] | None  # Idp.token keyword arguments; None sends no token


SCENARIOS = (
    Scenario(
        "allowed",
        "orders reads a customer profile with a broad user token",
        "orders",
        "GET",
        "/v1/customers/42",
        {"scope": "profile.read profile.write orders.read email", "ttl": 3600},
    ),
    Scenario(
        "wrong-workload",
        "billing tries the same call: no rule names it",
        "billing",
        "GET",
        "/v1/customers/42",
        {"scope": "profile.read profile.write", "ttl": 3600},
    ),
    Scenario(
        "missing-scope",
        "orders calls with a token that lacks profile.read",
        "orders",
        "GET",
        "/v1/customers/42",
        {"scope": "orders.read email", "ttl": 3600},
    ),
    Scenario(
        "expired-token",
        "orders calls with a token that expired ten minutes ago",
        "orders",
        "GET",
        "/v1/customers/42",
        {"scope": "profile.read", "ttl": -600},
    ),
    Scenario(
        "no-token", "orders calls without any token", "orders", "GET", "/v1/customers/42", None
    ),
)


def run_demo(*, as_json: bool = False, keep: bool = False, front: str = "grpc") -> int:
    workdir = Path(tempfile.mkdtemp(prefix="extauthz-demo-"))
    say = (lambda *a: None) if as_json else print
    try:
        say("extauthz demo: starting a CA, an issuer, the sidecar, Envoy and an echo upstream ...")
        with Mesh(workdir, front=front) as mesh:
            status, body = http_get(mesh.sidecar.admin_port, "/.well-known/jwks.json")
            if status != 200:
                raise RuntimeError("the sidecar does not publish its JWKS")
            jwks = json.loads(body)
            say(
                f"  Envoy listens with mTLS on 127.0.0.1:{mesh.listen_port}; the sidecar's "
                f"{front} front on 127.0.0.1:{mesh.sidecar.authz_port}\n"
            )
            results = [_run(mesh, scenario, jwks) for scenario in SCENARIOS]
            for scenario, result in zip(SCENARIOS, results, strict=True):
                say(_narrate(scenario, result))
        if as_json:
            print(json.dumps({"requests": results, "jwks": jwks}, indent=2))
            return 0
        leaks = [r["name"] for r in results if _leaked(r)]
        if leaks:
            print(f"The original token reached the upstream in: {', '.join(leaks)}")
            return 1
        allowed = sum(1 for r in results if "upstream_headers" in r)
        print(
            f"{len(results)} requests through the real Envoy, {allowed} allowed: the upstream "
            "only ever received narrowed tokens."
        )
        return 0
    except (RuntimeError, OSError) as exc:
        print(f"extauthz demo: failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if keep:
            print(f"(work directory kept: {workdir})", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _run(mesh: Mesh, scenario: Scenario, jwks: dict[str, Any]) -> dict[str, Any]:
    headers = {"x-demo-request": scenario.name}
    token = None
    if scenario.token is not None:
        token = mesh.idp.token(now=time.time(), **scenario.token)
        headers["authorization"] = f"Bearer {token}"
    seen_before = len(mesh.echo.requests)
    response = mesh.request(
        scenario.workload, method=scenario.method, path=scenario.path, host=HOST, headers=headers
    )
    arrived = [
        r
        for r in mesh.echo.requests[seen_before:]
        if r.headers.get("x-demo-request") == scenario.name
    ]
    result: dict[str, Any] = {
        "name": scenario.name,
        "workload": mesh.pki.workloads[scenario.workload].spiffe_id,
        "method": scenario.method,
        "path": scenario.path,
        "status": response.status,
        "subject_token": token,
        "subject_claims": parse_compact(token).claims if token else None,
    }
    if response.status >= 400:
        try:
            result["error"] = response.json().get("error")
        except ValueError:
            result["error"] = None
    if arrived:
        upstream = arrived[-1].headers
        result["upstream_headers"] = upstream
        minted = upstream.get("authorization", "").removeprefix("Bearer ")
        if minted:
            jws = parse_compact(minted)
            result["minted_claims"] = dict(jws.claims)
            result["minted_header"] = dict(jws.header)
            result["minted_verifies"] = _verifies(jws, jwks)
    return result


def _leaked(result: dict[str, Any]) -> bool:
    subject = result.get("subject_token")
    headers = result.get("upstream_headers") or {}
    return bool(subject) and any(subject in value for value in headers.values())


def _verifies(jws: CompactJWS, jwks: dict[str, Any]) -> bool:
    keys = parse_jwks(json.dumps(jwks).encode())
    alg = jws.header.get("alg", "")
    return any(verify_signature(jws, k, alg) for k in keys.candidates(jws.header.get("kid"), alg))


def _claims_lines(claims: dict[str, Any] | None) -> list[str]:
    if not claims:
        return ["(none)"]
    return [f"{k}: {json.dumps(v)}" for k, v in claims.items()]


def _narrate(scenario: Scenario, result: dict[str, Any]) -> str:
    width = 58
    title = f"== {scenario.name}: {scenario.says}"
    lines = [
        title,
        f"   {scenario.method} https://{HOST}{scenario.path} as {result['workload']}",
        f"   Envoy answered {result['status']}"
        + (f" ({result['error']})" if result.get("error") else ""),
    ]
    left = ["client sent (subject token claims):", *_claims_lines(result["subject_claims"])]
    if "upstream_headers" in result:
        right = [
            "upstream received (narrowed token claims):",
            *_claims_lines(result.get("minted_claims")),
        ]
        right.append(f"verifies against the exchange JWKS: {result.get('minted_verifies')}")
        right.append(f"original token reached upstream: {'YES' if _leaked(result) else 'no'}")
    else:
        right = ["upstream received:", "nothing (the request was denied)"]
    rows = max(len(left), len(right))
    left += [""] * (rows - len(left))
    right += [""] * (rows - len(right))
    for a, b in zip(left, right, strict=True):
        a = a if len(a) <= width else a[: width - 3] + "..."
        lines.append(f"   {a:<{width}} | {b}")
    return "\n".join(lines) + "\n"
