"""Load generators: separate processes, each keeping N requests in flight over asyncio.

Two kinds of client, both as cheap per request as Python allows so that the server, not the
generator, is what gets measured:

- ``grpc``: a ``grpc.aio`` channel (one HTTP/2 connection, as Envoy keeps per worker) calling
  ``/envoy.service.auth.v3.Authorization/Check`` with pre-serialised CheckRequest bytes; every
  response is parsed and counted as an allow only if it carries an ``ok_response``.
- ``https``: one TLS keep-alive HTTP/1.1 connection per in-flight request to Envoy's mTLS
  listener, presenting a workload certificate; a response counts as an allow only if it is 200.

Tokens are signed before the timed window: ``repeat`` cycles a handful of tokens (the sidecar
caches them after first use), ``fresh`` gives every request its own token (a pool sized by the
caller; a request that had to reuse one is counted in ``reused``), ``once`` sends each token
of the pool exactly once and stops (to fill a cache).

Each run: ``prepare`` (sign tokens, build payloads, connect) on every process, then ``go`` with
one start time on the shared monotonic clock; requests before ``start + warmup`` are not
counted; the window is ``duration`` long; no request is started after it. Each process reports
completions in the window, their latencies and its own CPU time over the window, so the caller
can tell whether the generator was the bottleneck.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.stats import summary_us

CHECK_METHOD = "/envoy.service.auth.v3.Authorization/Check"
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
READY_TIMEOUT = 120.0


# --- the child process ----------------------------------------------------------------------


def _child(conn: Any) -> None:
    while True:
        try:
            spec = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if spec is None:
            return
        try:
            asyncio.run(_session(spec, conn))
        except Exception as exc:  # noqa: BLE001 - report, so the parent can fail clearly
            conn.send({"error": f"{type(exc).__name__}: {exc}"})


def _payloads(spec: dict[str, Any]) -> list[bytes]:
    from bench.fixtures import Target, check_request, sign_tokens
    from extauthz.policy.loader import load_signing_key

    target = Target(**spec["target"])
    key = load_signing_key(Path(spec["issuer_key_file"]))
    tokens = sign_tokens(key, spec["pool"])
    if spec["kind"] == "grpc":
        cert = spec["cert_pem"]
        return [check_request(target, t, cert).SerializeToString() for t in tokens]
    return [
        (
            f"{target.method} {target.path} HTTP/1.1\r\nHost: {target.host}\r\n"
            f"Authorization: Bearer {t}\r\nUser-Agent: extauthz-bench/1\r\n"
            "Accept: */*\r\n\r\n"
        ).encode("ascii")
        for t in tokens
    ]


class _Counters:
    def __init__(self) -> None:
        self.latencies: list[int] = []
        self.completed = 0
        self.errors = 0
        self.denied = 0
        self.sent = 0
        self.error_samples: list[str] = []

    def error(self, text: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 3:
            self.error_samples.append(text[:200])


async def _session(spec: dict[str, Any], conn: Any) -> None:
    started = time.monotonic()
    pool = _payloads(spec) if spec["pool"] else []
    kind = spec["kind"]
    lanes = spec["concurrency"]
    channels: list[Any] = []
    connections: list[Any] = []
    if kind == "grpc":
        import grpc

        opts = [("grpc.enable_http_proxy", 0)]
        channels = [grpc.aio.insecure_channel(t, options=opts) for t in spec["targets"]]
        for ch in channels:
            await asyncio.wait_for(ch.channel_ready(), 15)
        calls = [ch.unary_unary(CHECK_METHOD) for ch in channels]
    else:
        ctx = ssl.create_default_context(cafile=spec["ca"])
        ctx.load_cert_chain(spec["cert"], spec["key"])
        port = int(spec["targets"][0])

        async def connect() -> Any:
            return await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost"),
                15,
            )

        connections = [await connect() for _ in range(lanes)]
    conn.send({"ready": True, "pool": len(pool), "prepare_s": round(time.monotonic() - started, 3)})
    go = conn.recv()
    start_ns, warmup_ns, duration_ns = go["start_ns"], go["warmup_ns"], go["duration_ns"]
    window_start, window_end = start_ns + warmup_ns, start_ns + warmup_ns + duration_ns
    counters = _Counters()
    once = spec["mode"] == "once"
    next_index = [0]
    cpu: dict[str, float] = {}

    def take() -> bytes | None:
        i = next_index[0]
        next_index[0] = i + 1
        if once and i >= len(pool):
            return None
        return pool[i % len(pool)]

    async def sampler() -> None:
        await _sleep_until(window_start)
        cpu["start"] = time.process_time()
        await _sleep_until(window_end)
        cpu["end"] = time.process_time()

    async def grpc_lane(i: int) -> None:
        from envoy.service.auth.v3 import external_auth_pb2

        parse = external_auth_pb2.CheckResponse.FromString
        call = calls[i % len(calls)]
        now, pc = time.monotonic_ns, time.perf_counter_ns
        await _sleep_until(start_ns)
        while True:
            t = now()
            if t >= window_end and not once:
                return
            payload = take()
            if payload is None:
                return
            counters.sent += 1
            t0 = pc()
            try:
                raw = await call(payload, timeout=10)
            except Exception as exc:  # noqa: BLE001 - grpc.aio errors, counted
                if window_start <= now() < window_end or once:
                    counters.error(f"{type(exc).__name__}: {exc}")
                continue
            t1 = pc()
            done = now()
            if once or window_start <= done < window_end:
                response = parse(raw)
                if response.status.code != 0 or not response.HasField("ok_response"):
                    counters.denied += 1
                else:
                    counters.completed += 1
                    counters.latencies.append(t1 - t0)

    async def https_lane(i: int) -> None:
        reader, writer = connections[i]
        now, pc = time.monotonic_ns, time.perf_counter_ns
        await _sleep_until(start_ns)
        while True:
            t = now()
            if t >= window_end and not once:
                break
            payload = take()
            if payload is None:
                break
            counters.sent += 1
            t0 = pc()
            try:
                writer.write(payload)
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head[9:12])
                lower = head.lower()
                at = lower.find(b"content-length:")
                length = int(lower[at + 15 : lower.find(b"\r\n", at)]) if at >= 0 else 0
                if length:
                    await reader.readexactly(length)
                closing = b"connection: close" in lower
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                if window_start <= now() < window_end:
                    counters.error(f"{type(exc).__name__}: {exc}")
                writer.close()
                reader, writer = await connect()
                continue
            t1 = pc()
            done = now()
            if window_start <= done < window_end:
                if status == 200:
                    counters.completed += 1
                    counters.latencies.append(t1 - t0)
                else:
                    counters.denied += 1
                    if len(counters.error_samples) < 3:
                        counters.error_samples.append(f"HTTP {status}")
            if closing:
                writer.close()
                reader, writer = await connect()
        writer.close()

    lane = grpc_lane if kind == "grpc" else https_lane
    budget = (window_end - time.monotonic_ns()) / 1e9 + 20
    watch = asyncio.ensure_future(sampler())
    tasks = [asyncio.ensure_future(lane(i)) for i in range(lanes)]
    timed_out = False
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), budget)
    except TimeoutError:
        timed_out = True
    if not watch.done():  # "once" ends when the pool is sent, maybe before the window does
        watch.cancel()
        cpu.setdefault("start", time.process_time())
        cpu["end"] = time.process_time()
    for ch in channels:
        await ch.close()
    conn.send(
        {
            "completed": counters.completed,
            "denied": counters.denied,
            "errors": counters.errors,
            "error_samples": counters.error_samples,
            "sent": counters.sent,
            "pool": len(pool),
            "reused": max(0, counters.sent - len(pool)) if pool else 0,
            "latencies_ns": counters.latencies,
            "cpu_s": round(cpu.get("end", 0.0) - cpu.get("start", 0.0), 3),
            "timed_out": timed_out,
        }
    )


async def _sleep_until(t_ns: int) -> None:
    delay = (t_ns - time.monotonic_ns()) / 1e9
    if delay > 0:
        await asyncio.sleep(delay)


# --- the parent side ------------------------------------------------------------------------


def process_cpu_s(pid: int) -> float | None:
    """utime + stime of a process, in seconds, from /proc."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy_s() -> float | None:
    """CPU seconds the whole machine spent busy (all cores, everything but idle and iowait)."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / CLK_TCK


def children_of(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as fh:
                out += [int(x) for x in fh.read().split()]
    except OSError:
        pass
    return out


def vm_status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak) of a process, in MiB, from /proc/<pid>/status."""
    out: dict[str, float] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                name, _, value = line.partition(":")
                if name in ("VmRSS", "VmHWM"):
                    out[name] = round(int(value.split()[0]) / 1024, 1)
    except OSError:
        pass
    return out


@dataclass
class Load:
    """One measured run's aggregate."""

    throughput: float
    latency: dict[str, Any]
    completed: int
    denied: int
    errors: int
    reused: int
    generator_cpu: list[float]  # per generator process, fraction of one core over the window
    server_cpu: dict[str, float]  # per sampled process name, fraction of one core
    machine_cpu: float | None  # the whole machine's busy cores over the window
    duration_s: float
    error_samples: list[str]
    timed_out: bool

    def to_json(self) -> dict[str, Any]:
        cpu_total = sum(self.server_cpu.values())
        foreign = None
        if self.machine_cpu is not None and self.server_cpu:
            foreign = self.machine_cpu - cpu_total - sum(self.generator_cpu)
        return {
            "throughput_rps": round(self.throughput, 1),
            **{k: v for k, v in self.latency.items() if k != "n"},
            "completed": self.completed,
            "denied": self.denied,
            "errors": self.errors,
            "reused_tokens": self.reused,
            "generator_cpu_cores": [round(c, 2) for c in self.generator_cpu],
            "server_cpu_cores": {k: round(v, 2) for k, v in self.server_cpu.items()},
            "machine_busy_cores": (
                round(self.machine_cpu, 2) if self.machine_cpu is not None else None
            ),
            # what other processes on this shared machine used meanwhile (approximate)
            "other_cpu_cores": round(max(0.0, foreign), 2) if foreign is not None else None,
            "server_cpu_us_per_request": (
                round(cpu_total * self.duration_s / self.completed * 1e6, 1)
                if self.completed
                else None
            ),
            **({"error_samples": self.error_samples} if self.error_samples else {}),
            **({"timed_out": True} if self.timed_out else {}),
        }


class Generators:
    """A fixed set of generator processes (spawned once: grpc must not be forked), reused by
    every run. Use as a context manager; ``close`` stops them."""

    def __init__(self, processes: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conns = []
        self._procs = []
        for _ in range(processes):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_child, args=(child,), daemon=True)
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)

    @property
    def size(self) -> int:
        return len(self._procs)

    def _recv(self, conn: Any, timeout: float) -> dict[str, Any]:
        if not conn.poll(timeout):
            raise RuntimeError(f"a load generator did not answer within {timeout:.0f}s")
        reply: dict[str, Any] = conn.recv()
        if "error" in reply:
            raise RuntimeError(f"load generator failed: {reply['error']}")
        return reply

    def run(
        self,
        specs: Sequence[dict[str, Any]],
        *,
        warmup: float,
        duration: float,
        sample: dict[str, int] | None = None,
    ) -> Load:
        """Run one spec per process (the first len(specs) processes) and aggregate.
        ``sample`` names processes (name -> pid) whose CPU time is read over the window."""
        if len(specs) > self.size:
            raise ValueError("more specs than generator processes")
        conns = self._conns[: len(specs)]
        for conn, spec in zip(conns, specs, strict=True):
            conn.send(spec)
        for conn in conns:
            self._recv(conn, READY_TIMEOUT)
        start_ns = time.monotonic_ns() + 200_000_000
        go = {
            "start_ns": start_ns,
            "warmup_ns": int(warmup * 1e9),
            "duration_ns": int(duration * 1e9),
        }
        for conn in conns:
            conn.send(go)
        server_cpu: dict[str, float] = {}
        machine_cpu = None
        if sample:
            window_start = start_ns / 1e9 + warmup
            time.sleep(max(0.0, window_start - time.monotonic()))
            before = {name: process_cpu_s(pid) for name, pid in sample.items()}
            busy_before = machine_busy_s()
            time.sleep(max(0.0, window_start + duration - time.monotonic()))
            after = {name: process_cpu_s(pid) for name, pid in sample.items()}
            busy_after = machine_busy_s()
            if busy_before is not None and busy_after is not None:
                machine_cpu = (busy_after - busy_before) / duration
            for name in sample:
                b, a = before[name], after[name]
                if a is not None and b is not None:
                    server_cpu[name] = (a - b) / duration
        replies = [self._recv(conn, warmup + duration + 60) for conn in conns]
        latencies = [x for r in replies for x in r["latencies_ns"]]
        completed = sum(r["completed"] for r in replies)
        return Load(
            throughput=completed / duration,
            latency=summary_us(latencies),
            completed=completed,
            denied=sum(r["denied"] for r in replies),
            errors=sum(r["errors"] for r in replies),
            reused=sum(r["reused"] for r in replies),
            generator_cpu=[r["cpu_s"] / duration for r in replies],
            server_cpu=server_cpu,
            machine_cpu=machine_cpu,
            duration_s=duration,
            error_samples=[s for r in replies for s in r["error_samples"]][:5],
            timed_out=any(r["timed_out"] for r in replies),
        )

    def close(self) -> None:
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.send(None)
        for proc in self._procs:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)

    def __enter__(self) -> Generators:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def split(total: int, parts: int) -> list[int]:
    """``total`` in-flight requests over ``parts`` processes, as evenly as possible."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts) if base or i < extra]
