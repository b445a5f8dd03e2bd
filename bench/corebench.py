"""In-process measurements: ``decision.pipeline.decide`` alone, its phases, and JOSE crypto.

No gRPC, no sockets: each call is timed with ``time.perf_counter_ns`` around exactly the
function under test. Sizes are interleaved round by round so that a burst of noise on this
shared machine hits every size alike; the figure reported per size is the median over rounds
of each round's p50 (and p99, mean), with the pooled samples' percentiles beside it.
"""

from __future__ import annotations

import gc
import io
import secrets
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.fixtures import Setup, Target, check_request, sign_tokens, write_setup
from bench.stats import median, percentile, summary_us


def _new_id() -> str:
    return secrets.token_urlsafe(16)  # what the server's new_jti does


class CoreFixture:
    """A compiled policy of N rules, a Snapshot trusting a throwaway issuer, and the input that
    matches the policy's last rule."""

    def __init__(self, setup: Setup) -> None:
        from extauthz.policy.compiler import load_policy
        from extauthz.policy.loader import load_signing_key
        from extauthz.tools.simulate import self_signed_pem

        started = time.perf_counter()
        self.policy = load_policy(setup.policy)
        self.compile_s = time.perf_counter() - started
        self.setup = setup
        self.target: Target = setup.target
        self.issuer_key = load_signing_key(setup.issuer_key_file)
        self.signing_key = load_signing_key(setup.signing_key_file)
        self.cert_pem = self_signed_pem(self.target.workload, time.time())
        self.cache_size = 10_000
        self.snapshot = self.fresh_snapshot()

    def fresh_snapshot(self, cache_size: int | None = None) -> Any:
        from extauthz.decision.authenticate import LruSubjectCache
        from extauthz.policy.loader import assemble, load_issuer_keys

        size = self.cache_size if cache_size is None else cache_size
        self.cache = LruSubjectCache(size)
        return assemble(self.policy, load_issuer_keys(self.policy), [self.signing_key])

    def check_input(self, token: str) -> Any:
        from extauthz.decision.pipeline import CheckInput

        t = self.target
        return CheckInput(
            method=t.method,
            host=t.host,
            path=t.path,
            headers={
                ":authority": t.host,
                ":method": t.method,
                ":path": t.path,
                ":scheme": "https",
                "authorization": f"Bearer {token}",
                "user-agent": "extauthz-bench/1",
                "x-request-id": "bench",
                "x-forwarded-proto": "https",
            },
            principal=t.workload,
            peer_certificate=self.cert_pem,
            request_id="bench",
        )


def _time_decisions(fx: CoreFixture, inputs: Sequence[Any]) -> tuple[list[int], int]:
    from extauthz.decision.pipeline import decide

    clock, pc = time.time, time.perf_counter_ns
    snap, cache = fx.snapshot, fx.cache
    samples: list[int] = []
    append = samples.append
    denied = 0
    for inp in inputs:
        now = clock()
        t0 = pc()
        decision = decide(inp, snap, now, _new_id, cache)
        t1 = pc()
        append(t1 - t0)
        if decision.token is None:
            denied += 1
    return samples, denied


CHUNK = 100


def _lookup_ns(fx: CoreFixture, iterations: int = 20_000) -> float | None:
    """p50 of the compiled table lookup alone, in ns (None if its API changed)."""
    from extauthz.decision.authorize import request_of

    try:
        inp = fx.check_input("x")
        request = request_of(inp.method, inp.host, inp.path)
        policy, t = fx.policy, fx.target
        args = (request.host, request.method, request.segments, t.workload, "corp-idp")  # type: ignore[union-attr]
        if policy.find_rule(*args) is None:
            return None
        pc = time.perf_counter_ns
        samples = []
        for _ in range(iterations):
            t0 = pc()
            policy.find_rule(*args)
            samples.append(pc() - t0)
    except Exception:  # noqa: BLE001 - the package changes under us; report no figure
        return None
    samples.sort()
    return percentile(samples, 50)


def _round_summary(rounds: list[list[int]], denied: int) -> dict[str, Any]:
    pooled = [x for r in rounds for x in r]
    per_round = [summary_us(r) for r in rounds]
    return {
        "p50_us": median([r["p50_us"] for r in per_round]),
        "p99_us": median([r["p99_us"] for r in per_round]),
        "mean_us": median([r["mean_us"] for r in per_round]),
        "rounds_p50_us": [r["p50_us"] for r in per_round],
        "pooled": summary_us(pooled),
        "iterations": len(pooled),
        "denied": denied,
    }


def run_core(
    sizes: Sequence[int],
    workdir: Path,
    *,
    warm_iterations: int,
    cold_iterations: int,
    rounds: int,
    log: Callable[[str], None] = print,
    before_timing: Callable[[], None] | None = None,
    profile_calls: int = 3000,
) -> dict[str, Any]:
    fixtures: dict[int, CoreFixture] = {}
    for n in sizes:
        fixtures[n] = CoreFixture(write_setup(workdir / f"core-{n}", n))
        log(f"  core: {n} rules compiled in {fixtures[n].compile_s:.2f}s")
    if before_timing is not None:
        before_timing()  # e.g. wait until a server compiling in parallel is idle again
    warm: dict[int, list[list[int]]] = {n: [] for n in sizes}
    cold: dict[int, list[list[int]]] = {n: [] for n in sizes}
    denied = {("warm", n): 0 for n in sizes} | {("cold", n): 0 for n in sizes}
    for r in range(rounds):
        # Sizes alternate every CHUNK decisions (starting with a different one each time), so
        # a burst from another process on this shared machine lands on every size alike.
        warm_inputs, cold_inputs = {}, {}
        for n in sizes:
            fx = fixtures[n]
            # warm: one token, verified once before timing; every decision is a cache hit
            warm_inputs[n] = fx.check_input(sign_tokens(fx.issuer_key, 1)[0])
            _time_decisions(fx, [warm_inputs[n]] * 100)
            # cold: a fresh, pre-signed token every decision: every lookup misses
            tokens = sign_tokens(fx.issuer_key, cold_iterations)
            cold_inputs[n] = [fx.check_input(t) for t in tokens]
            warm[n].append([])
            cold[n].append([])
        gc.collect()
        for kind, per_size, total in (
            ("warm", warm_inputs, warm_iterations),
            ("cold", cold_inputs, cold_iterations),
        ):
            for chunk, start in enumerate(range(0, total, CHUNK)):
                order = list(sizes[chunk % len(sizes) :]) + list(sizes[: chunk % len(sizes)])
                for n in order:
                    if kind == "warm":
                        batch = [per_size[n]] * min(CHUNK, total - start)
                    else:
                        batch = per_size[n][start : start + CHUNK]
                    samples, bad = _time_decisions(fixtures[n], batch)
                    (warm if kind == "warm" else cold)[n][-1].extend(samples)
                    denied[(kind, n)] += bad
        log(f"  core: round {r + 1}/{rounds} done")
    lookups = {str(n): _lookup_ns(fixtures[n]) for n in sizes}
    out: dict[str, Any] = {
        "method": (
            "decide(CheckInput, Snapshot, now, new_id) timed alone with perf_counter_ns; the "
            "input matches the policy's last rule and carries the peer certificate (as Envoy "
            "sends it with include_peer_certificate); warm = the same subject token every time "
            "(SubjectCache hit), cold = a fresh pre-signed token every time (miss: parse + "
            "ES256 verify); both sign the narrowed token (ES256). Sizes alternate every "
            f"{CHUNK} decisions. Figures: median over rounds of each round's p50/p99/mean; "
            "rule_lookup_p50_ns: Policy.find_rule alone for the same request."
        ),
        "rounds": rounds,
        "sizes": {},
    }
    for n in sizes:
        out["sizes"][str(n)] = {
            "compile_s": round(fixtures[n].compile_s, 3),
            "warm": _round_summary(warm[n], denied[("warm", n)]),
            "cold": _round_summary(cold[n], denied[("cold", n)]),
            "rule_lookup_p50_ns": lookups[str(n)],
        }
    largest = fixtures[max(sizes)]
    out["phases"] = phases(
        largest, iterations=max(200, warm_iterations // 2), profile_calls=profile_calls
    )
    out["phases"]["rules"] = max(sizes)
    return out


def _p50_us(fn: Callable[[], Any], iterations: int) -> float:
    pc = time.perf_counter_ns
    samples = []
    for _ in range(50):
        fn()
    gc.collect()
    for _ in range(iterations):
        t0 = pc()
        fn()
        samples.append(pc() - t0)
    samples.sort()
    return round(percentile(samples, 50) / 1000, 2)


def phases(fx: CoreFixture, *, iterations: int, profile_calls: int = 3000) -> dict[str, Any]:
    """p50 of the steps of one warm decision that have a stable public API, and of the work
    around it in Sidecar.check, each timed alone (so the parts only roughly add up), plus a
    cProfile of warm decisions for everything in between. A step whose API changed is
    reported as an error, never fails the run."""
    from extauthz.decision import pipeline as core
    from extauthz.decision.jose import parse_compact, verify_signature
    from extauthz.serve.decision_log import DecisionLog
    from extauthz.serve.edge import check_input, check_response
    from extauthz.serve.grpc_front import GrpcEdge
    from extauthz.serve.sidecar import Sidecar

    snap = fx.snapshot
    token = sign_tokens(fx.issuer_key, 1)[0]
    inp = fx.check_input(token)
    now = time.time()
    decision = core.decide(inp, snap, now, _new_id, fx.cache)
    if decision.token is None:
        return {"error": f"the warm input is denied: {decision.reason}"}
    claims, typ = decision.claims, snap.policy.exchange.typ
    jws = parse_compact(token)
    issuer_public = fx.issuer_key.public()
    pb_request = check_request(fx.target, token, fx.cert_pem)
    sink = io.StringIO()
    sidecar = Sidecar(DecisionLog(sink))
    sidecar.install(snap)
    grpc_edge = GrpcEdge()
    log = DecisionLog(sink)

    def log_line() -> None:
        log.write(decision, 0.0001, "bench", now)
        sink.seek(0)
        sink.truncate()

    def sidecar_check() -> None:
        sidecar.check(pb_request, grpc_edge)
        sink.seek(0)
        sink.truncate()

    def thumbprint() -> Any:
        from extauthz.decision.identity import certificate_thumbprint

        return certificate_thumbprint(inp.peer_certificate)

    steps: dict[str, Callable[[], Any]] = {
        "decide (warm, total)": lambda: core.decide(inp, snap, now, _new_id, fx.cache),
        "sign narrowed token (ES256)": lambda: snap.signing_key.sign(claims, typ),
        "certificate_thumbprint (peer cert)": thumbprint,
        "cold only: parse_compact": lambda: parse_compact(token),
        "cold only: verify_signature (ES256)": lambda: verify_signature(
            jws, issuer_public, "ES256"
        ),
        "edge.check_input (protobuf -> CheckInput)": lambda: check_input(pb_request),
        "edge.check_response (Decision -> protobuf)": lambda: check_response(decision),
        "decision log line (json + write)": log_line,
        "Sidecar.check (warm, total, no gRPC)": sidecar_check,
    }
    p50: dict[str, float | None] = {}
    errors: dict[str, str] = {}
    for name, fn in steps.items():
        try:
            p50[name] = _p50_us(fn, iterations)
        except Exception as exc:  # noqa: BLE001 - the package changes under us; report it
            p50[name] = None
            errors[name] = f"{type(exc).__name__}: {exc}"
    out: dict[str, Any] = {
        "method": "p50 of each step alone, same warm input as the core benchmark",
        "iterations": iterations,
        "p50_us": p50,
        "profile_decide_warm": profile(
            lambda: core.decide(inp, snap, now, _new_id, fx.cache), profile_calls
        ),
    }
    if errors:
        out["errors"] = errors
    return out


def profile(fn: Callable[[], Any], calls: int, top: int = 14) -> list[dict[str, Any]]:
    """cProfile ``calls`` runs of ``fn``; the functions with the most cumulative time, per call
    of ``fn``. Profiling inflates small Python functions; read the shares, not the absolutes."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    stats = pstats.Stats(profiler)
    rows = []
    total = stats.total_tt  # type: ignore[attr-defined]
    for (filename, line, name), (_cc, ncalls, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        short = filename.rsplit("site-packages/", 1)[-1].rsplit("/work/main/", 1)[-1]
        rows.append(
            {
                "function": f"{short}:{line}({name})",
                "calls_per_op": round(ncalls / calls, 2),
                "self_share": round(tottime / total, 3) if total else None,
                "cum_share": round(cumtime / total, 3) if total else None,
            }
        )
    rows.sort(key=lambda r: r["cum_share"] or 0, reverse=True)
    # The outermost frames (the lambda, decide itself) are ~1.0; keep them, they anchor the rest.
    return rows[:top]


def run_crypto(iterations: int, rsa_iterations: int) -> dict[str, Any]:
    """Sign (JSON + base64url + signature) and verify (signature only, and with parsing) per
    algorithm, through extauthz.decision.jose exactly as the exchange does it."""
    from bench.fixtures import subject_claims
    from extauthz.decision.jose import generate_issuer_key, parse_compact, verify_signature

    out: dict[str, Any] = {}
    for alg in ("ES256", "EdDSA", "RS256"):
        key = generate_issuer_key(alg)
        public = key.public()
        claims = subject_claims()
        n = rsa_iterations if alg.startswith("RS") else iterations
        token = key.sign(claims, "at+jwt")
        jws = parse_compact(token)
        assert verify_signature(jws, public, alg)
        sign_ns = _samples(lambda k=key, c=claims: k.sign(c, "at+jwt"), n)
        verify_ns = _samples(lambda j=jws, p=public, a=alg: verify_signature(j, p, a), n)
        parse_verify_ns = _samples(
            lambda t=token, p=public, a=alg: verify_signature(parse_compact(t), p, a), n
        )
        sign, verify = summary_us(sign_ns), summary_us(verify_ns)
        out[alg] = {
            "sign": sign,
            "verify": verify,
            "parse_and_verify": summary_us(parse_verify_ns),
            "sign_per_s": round(1e6 / sign["mean_us"]) if sign["mean_us"] else None,
            "verify_per_s": round(1e6 / verify["mean_us"]) if verify["mean_us"] else None,
            "token_bytes": len(token),
        }
    return out


def _samples(fn: Callable[[], Any], n: int) -> list[int]:
    pc = time.perf_counter_ns
    for _ in range(min(50, n)):
        fn()
    gc.collect()
    out = []
    for _ in range(n):
        t0 = pc()
        fn()
        out.append(pc() - t0)
    return out
