"""What-if measurements behind docs/performance.md's suggestions, without touching the package.

``python -m bench.experiments [VARIANT ...] [--repeats 3] [--seconds 3]`` starts each variant
as its own process, drives it like the direct-gRPC benchmark (warm: repeated subject tokens,
32 in flight, 2 generator processes; the variants are interleaved repeat by repeat) and
prints the median throughput and server CPU per request. Variants patch the running process
only (monkeypatching before ``extauthz serve`` starts), so each one is an estimate of a
change, not the change itself:

- ``serve``: ``extauthz serve`` as shipped (the benchmark's "warm").
- ``serve-nolog``: ``--no-decision-log``.
- ``serve-nometrics``: Prometheus accounting (``Sidecar._account``) made a no-op.
- ``serve-freesign``: ``SigningKey.sign`` returns a ready token: the upper bound of a
  minted-token cache that always hits.
- ``serve-sync``: the same Sidecar behind ``grpc.server`` (threads) instead of ``grpc.aio``.
- ``floor``: bench.floor, the allow-all handler on grpc.aio (the benchmark's floor).
- ``floor-sync``: the allow-all handler behind ``grpc.server`` (threads).
- ``floor-raw``: grpc.aio, a generic handler answering pre-serialised bytes (no protobuf
  parsing or serialising at all): what the transport alone costs.

``python -m bench.experiments --reload`` instead measures a hot reload under load: a
10,000-rule ``extauthz serve`` under warm load (8 in flight), once without and once with a
SIGHUP (which recompiles the policy in a thread of the serving process) 2 s into the window.

``python -m bench.experiments --memory`` compares the resident memory of a process that
compiled a 10,000-rule policy itself with one that received the same compiled Policy pickled
from a child that compiled it (both with the server's modules imported).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.fixtures import Setup, client_pki, write_setup
from bench.loadgen import Generators, split
from bench.scenarios import REPEAT_POOL, Client
from bench.servers import LOOPBACK, Proc, free_port
from bench.stats import median

SERVE_VARIANTS = ("serve", "serve-nolog", "serve-nometrics", "serve-freesign", "serve-sync")
FLOOR_VARIANTS = ("floor", "floor-sync", "floor-raw")


# --- the server side (run in the child process) -------------------------------------------


def _patch(variant: str) -> None:
    if variant == "serve-nometrics":
        from extauthz.serve import server

        server.Sidecar._account = lambda self, decision, elapsed: None  # type: ignore[method-assign]
    elif variant == "serve-freesign":
        from extauthz.decision import jose

        ready: dict[str, str] = {}
        original = jose.SigningKey.sign

        def sign(self: Any, claims: Any, typ: str) -> str:
            if self.kid not in ready:
                ready[self.kid] = original(self, claims, typ)
            return ready[self.kid]

        jose.SigningKey.sign = sign  # type: ignore[method-assign]
    elif variant == "serve-sync":
        from extauthz.serve import server

        server.GrpcFront = _SyncFront  # type: ignore[misc,assignment]


class _SyncFront:
    """GrpcFront's interface over the threaded ``grpc.server``."""

    def __init__(self, sidecar: Any) -> None:
        from concurrent import futures

        import grpc
        from envoy.service.auth.v3 import external_auth_pb2_grpc
        from grpc_health.v1 import health, health_pb2_grpc

        class Service(external_auth_pb2_grpc.AuthorizationServicer):
            def Check(self, request: Any, context: Any) -> Any:  # noqa: N802
                return sidecar.check(request)

        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=8), options=[("grpc.so_reuseport", 0)]
        )
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(Service(), self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)

    async def start(self, address: str) -> int:
        port = self.server.add_insecure_port(address)
        self.server.start()
        await self.set_serving(True)
        return port

    async def set_serving(self, serving: bool) -> None:
        from grpc_health.v1 import health_pb2

        status = health_pb2.HealthCheckResponse.SERVING if serving else 2
        for name in ("", "envoy.service.auth.v3.Authorization"):
            self.health.set(name, status)

    async def stop(self, grace: float, drain_delay: float = 0.0) -> None:
        self.server.stop(grace).wait()


async def _floor(variant: str, port: int) -> None:
    from bench.floor import allow_response, make_sidecar

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if variant == "floor-raw":
        import grpc

        body = allow_response().SerializeToString()

        async def check(request: bytes, context: Any) -> bytes:
            return body

        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        handler = grpc.method_handlers_generic_handler(
            "envoy.service.auth.v3.Authorization",
            {"Check": grpc.unary_unary_rpc_method_handler(check)},
        )
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"{LOOPBACK}:{port}")
        await server.start()
        print("READY", flush=True)
        await stop.wait()
        await server.stop(0.5)
        return
    front: Any
    if variant == "floor-sync":
        front = _SyncFront(make_sidecar())
    else:
        from extauthz.serve.server import GrpcFront

        front = GrpcFront(make_sidecar())
    await front.start(f"{LOOPBACK}:{port}")
    await front.set_serving(True)
    print("READY", flush=True)
    await stop.wait()
    await front.stop(0.5)


# --- the harness ----------------------------------------------------------------------------


class Variant(Proc):
    def __init__(self, variant: str, setup: Setup, workdir: Path) -> None:
        self.variant = variant
        self.port = free_port()
        self.admin_port = free_port()
        self.out = workdir / f"{variant}.out"
        self._out = self.out.open("wb")
        me = [sys.executable, "-m", "bench.experiments"]
        if variant in FLOOR_VARIANTS:
            argv = [*me, "--run-floor", variant, "--port", str(self.port)]
        else:
            argv = [
                *me, "--run-serve", variant, "--",
                "--policy", str(setup.policy), "--signing-key", str(setup.signing_key_file),
                "--grpc-address", f"{LOOPBACK}:{self.port}",
                "--admin-address", f"{LOOPBACK}:{self.admin_port}",
                "--log-level", "WARNING", "--drain-delay", "0", "--grace", "1",
            ]  # fmt: skip
            if variant == "serve-nolog":
                argv.append("--no-decision-log")
        super().__init__(variant, argv, workdir / f"{variant}.log", stdout=self._out)

    def wait_ready(self, timeout: float = 60.0) -> None:
        from extauthz.demo.stack import http_get

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            if self.variant in FLOOR_VARIANTS:
                if self.out.read_text(errors="replace").startswith("READY"):
                    return
            else:
                try:
                    if http_get(self.admin_port, "/readyz", timeout=1.0)[0] == 200:
                        return
                except OSError:
                    pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.variant} not ready:\n{self.tail()}")

    def stop(self, timeout: float = 15.0) -> None:
        super().stop(timeout)
        self._out.close()


def compare(variants: list[str], repeats: int, seconds: float, concurrency: int) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="extauthz-experiments-"))
    setup = write_setup(workdir / "setup", 10)
    client = Client(setup, client_pki(workdir / "pki", setup.target))
    servers = {v: Variant(v, setup, workdir) for v in variants}
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    try:
        for server in servers.values():
            server.wait_ready()
        with Generators(2) as gens:
            for rep in range(repeats):
                for name, server in servers.items():
                    targets = [f"{LOOPBACK}:{server.port}"]
                    specs = [
                        client.spec("grpc", targets, c, "repeat", REPEAT_POOL)
                        for c in split(concurrency, 2)
                    ]
                    load = gens.run(
                        specs, warmup=0.5, duration=seconds, sample={"server": server.pid}
                    )
                    result = load.to_json()
                    if result["denied"] or result["errors"]:
                        raise RuntimeError(f"{name}: requests not allowed: {result}")
                    runs[name].append(result)
                    print(
                        f"  {name:<16} rep {rep + 1}: {result['throughput_rps']:7.0f}/s, server "
                        f"{result['server_cpu_us_per_request']} us CPU/request, other cpu "
                        f"{result['other_cpu_cores']}",
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        name: {
            "throughput_rps": median([r["throughput_rps"] for r in results]),
            "server_cpu_us_per_request": median([r["server_cpu_us_per_request"] for r in results]),
            "p50_us": median([r["p50_us"] for r in results]),
            "runs": results,
        }
        for name, results in runs.items()
    }


def reload_stall(seconds: float = 12.0, rules: int = 10_000) -> dict[str, Any]:
    import os
    import threading

    from bench.servers import Serve

    workdir = Path(tempfile.mkdtemp(prefix="extauthz-reload-"))
    setup = write_setup(workdir / "setup", rules)
    client = Client(setup, client_pki(workdir / "pki", setup.target))
    serve = Serve(setup, workdir)
    out: dict[str, Any] = {"rules": rules, "window_s": seconds}
    try:
        serve.wait_ready(300)
        out["startup_to_ready_s"] = serve.ready_s
        with Generators(2) as gens:
            for label, hup in (("steady", False), ("sighup", True), ("steady_after", False)):
                specs = [
                    client.spec("grpc", serve.grpc_targets, c, "repeat", REPEAT_POOL)
                    for c in split(8, 2)
                ]
                if hup:
                    timer = threading.Timer(2.7, os.kill, (serve.pid, signal.SIGHUP))
                    timer.start()
                load = gens.run(specs, warmup=0.5, duration=seconds, sample={"s": serve.pid})
                out[label] = load.to_json()
                row = out[label]
                print(
                    f"  {label:<13} {row['throughput_rps']:7.0f}/s p50 {row['p50_us']:.0f}us "
                    f"p99 {row['p99_us']:.0f}us max {row['max_us']:.0f}us",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        serve.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return out


_MEMORY_CHILD = """
import gc, pickle, sys, time
from pathlib import Path
import extauthz.serve.runtime, extauthz.serve.server
from extauthz.policy.compiler import load_policy
from bench.loadgen import vm_status
import os
before = vm_status(os.getpid())
started = time.perf_counter()
if sys.argv[1] == "compile":
    policy = load_policy(Path(sys.argv[2]))
    if len(sys.argv) > 3:
        Path(sys.argv[3]).write_bytes(pickle.dumps(policy, protocol=5))
else:
    policy = pickle.loads(Path(sys.argv[2]).read_bytes())
took = time.perf_counter() - started
gc.collect()
print(repr({"rules": len(policy.rules), "seconds": round(took, 2), "before": before,
            "after": vm_status(os.getpid())}))
"""


def memory(rules: int = 10_000) -> dict[str, Any]:
    import ast
    import subprocess

    workdir = Path(tempfile.mkdtemp(prefix="extauthz-memory-"))
    setup = write_setup(workdir / "setup", rules)
    blob = workdir / "policy.pickle"

    def child(*args: str) -> dict[str, Any]:
        done = subprocess.run(
            [sys.executable, "-c", _MEMORY_CHILD, *args],
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        )
        value: dict[str, Any] = ast.literal_eval(done.stdout.strip().splitlines()[-1])
        return value

    try:
        out = {
            "compiled_here": child("compile", str(setup.policy)),
            "compiled_in_child": child("compile", str(setup.policy), str(blob)),
            "pickle_mb": round(blob.stat().st_size / 2**20, 1),
        }
        out["unpickled_here"] = child("load", str(blob))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for key in ("compiled_here", "unpickled_here"):
        print(f"  {key:<15} {out[key]}", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--memory"]:
        out = Path("bench/results/memory.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(memory(), indent=1) + "\n", encoding="utf-8")
        print(f"written {out}")
        return 0
    if argv[:1] == ["--reload"]:
        out = Path("bench/results/reload.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(reload_stall(), indent=1) + "\n", encoding="utf-8")
        print(f"written {out}")
        return 0
    if argv[:1] == ["--run-serve"]:
        variant, rest = argv[1], argv[3:]  # --run-serve VARIANT -- serve flags...
        _patch(variant)
        from extauthz.cli import main as cli

        return int(cli(["serve", *rest]) or 0)
    if argv[:1] == ["--run-floor"]:
        asyncio.run(_floor(argv[1], int(argv[3])))
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.experiments", description=__doc__)
    parser.add_argument("variants", nargs="*", default=[*SERVE_VARIANTS, *FLOOR_VARIANTS])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("bench/results/experiments.json"))
    args = parser.parse_args(argv)
    unknown = set(args.variants) - set(SERVE_VARIANTS) - set(FLOOR_VARIANTS)
    if unknown:
        parser.error(f"unknown variant(s): {', '.join(sorted(unknown))}")
    result = compare(args.variants, args.repeats, args.seconds, args.concurrency)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"concurrency": args.concurrency, "seconds": args.seconds, "variants": result}
    args.out.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    print(f"{'variant':<18}{'req/s':>9}{'server us/req':>15}{'p50 us':>10}")
    for name, row in result.items():
        print(
            f"{name:<18}{row['throughput_rps']:>9.0f}{row['server_cpu_us_per_request']:>15}"
            f"{row['p50_us']:>10.0f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
