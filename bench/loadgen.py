"""Load generators: processes that each keep N requests in flight over asyncio, and wrk.

``grpc``: grpc.aio channels (one HTTP/2 connection per target, as Envoy keeps per worker)
sending pre-serialised CheckRequests; an allow is a response with an ``ok_response``.
``https``: one mTLS keep-alive HTTP/1.1 connection per request in flight to Envoy; an allow is
a 200. Tokens are signed before the window: ``repeat`` cycles a few (cached after first use),
``fresh`` gives every request its own, ``once`` sends each token once and stops (to fill a
cache). Every process starts at one time on the shared monotonic clock and counts
what completes inside the window only; the parent reads the CPU time of the sampled server
processes and of the whole machine over the same window.

``run_wrk``: wrk (Debian package ``wrk``; ``apt-get install wrk``) with ``wrk_check.lua``, one
thread keeping C keep-alive HTTP/1.1 connections to a client-side Envoy (``servers.ClientEnvoy``,
which originates the mTLS wrk cannot), each request with a pre-signed subject token from a file.
The Lua script counts, on the same monotonic clock, only the 200s completing inside the window;
the parent reads the CPU of every sampled process (wrk's own included) over that window.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import shutil
import signal
import ssl
import subprocess
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from envoy.service.auth.v3.external_auth_pb2 import CheckResponse

from bench.fixtures import Target, check_request, sign_tokens
from bench.stats import summary_us
from extauthz.policy.loader import load_signing_key

CHECK_METHOD = "/envoy.service.auth.v3.Authorization/Check"
CLK_TCK = os.sysconf("SC_CLK_TCK")
Send = Callable[[bytes], Awaitable[bool]]


# --- in the generator process ---------------------------------------------------------------


def _child(conn: Any) -> None:
    while (spec := conn.recv()) is not None:
        try:
            asyncio.run(_session(spec, conn))
        except Exception as exc:  # reported, so the parent fails with the reason
            conn.send({"error": f"{type(exc).__name__}: {exc}"})


def _payloads(spec: dict[str, Any]) -> list[bytes]:
    target = Target(**spec["target"])
    tokens = sign_tokens(load_signing_key(Path(spec["issuer_key_file"])), spec["pool"])
    if spec["kind"] == "grpc":
        return [check_request(target, t, spec["cert_pem"]).SerializeToString() for t in tokens]
    head = f"{target.method} {target.path} HTTP/1.1\r\nHost: {target.host}\r\n"
    return [f"{head}Authorization: Bearer {t}\r\nAccept: */*\r\n\r\n".encode() for t in tokens]


class _Grpc:
    """One grpc.aio channel, one HTTP/2 connection as Envoy keeps per worker, calling Check."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.aio.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)])
        self.call = self.channel.unary_unary(
            CHECK_METHOD, response_deserializer=CheckResponse.FromString
        )

    async def open(self) -> None:
        await asyncio.wait_for(self.channel.channel_ready(), 15)

    async def send(self, payload: bytes) -> bool:
        response = await self.call(payload, timeout=10)
        return bool(response.status.code == 0 and response.HasField("ok_response"))

    async def close(self) -> None:
        await self.channel.close()


class _Https:
    """One keep-alive mTLS connection to Envoy, opened again after an error."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.port = int(spec["targets"][0])
        self.ctx = ssl.create_default_context(cafile=spec["ca"])
        self.ctx.load_cert_chain(spec["cert"], spec["key"])

    async def open(self) -> None:
        opening = asyncio.open_connection("127.0.0.1", self.port, ssl=self.ctx,
                                          server_hostname="localhost")  # fmt: skip
        self.reader, self.writer = await asyncio.wait_for(opening, 15)

    async def send(self, payload: bytes) -> bool:
        try:
            self.writer.write(payload)
            head = (await self.reader.readuntil(b"\r\n\r\n")).lower()
            at = head.find(b"content-length:")
            await self.reader.readexactly(
                int(head[at + 15 : head.find(b"\r\n", at)]) if at >= 0 else 0
            )
        except (OSError, asyncio.IncompleteReadError, ValueError):
            await self.close()
            await self.open()
            raise
        return head.startswith(b"http/1.1 200")

    async def close(self) -> None:
        self.writer.close()


async def _session(spec: dict[str, Any], conn: Any) -> None:
    pool = _payloads(spec)
    if spec["kind"] == "grpc":  # HTTP/2: every lane of this process shares the channels
        connections: list[Any] = [_Grpc(target) for target in spec["targets"]]
    else:
        connections = [_Https(spec) for _ in range(spec["concurrency"])]
    for connection in connections:
        await connection.open()
    senders = [connections[i % len(connections)].send for i in range(spec["concurrency"])]
    conn.send({"ready": True})
    go = conn.recv()
    start, begin = go["start_ns"], go["start_ns"] + go["warmup_ns"]
    end = begin + go["duration_ns"]
    once = spec["mode"] == "once"
    counts = {"sent": 0, "completed": 0, "denied": 0, "errors": 0}
    latencies: list[int] = []
    errors: list[str] = []

    async def lane(send: Send) -> None:
        await _sleep_until(start)
        while (counts["sent"] < len(pool)) if once else (time.monotonic_ns() < end):
            payload = pool[counts["sent"] % len(pool)]
            counts["sent"] += 1
            t0, error = time.perf_counter_ns(), ""
            try:
                allowed: bool | None = await send(payload)
            except Exception as exc:  # grpc.aio and socket errors alike: counted, not fatal
                allowed, error = None, f"{type(exc).__name__}: {exc}"[:200]
            elapsed = time.perf_counter_ns() - t0
            if once or begin <= time.monotonic_ns() < end:
                counts["errors" if allowed is None else "completed" if allowed else "denied"] += 1
                if allowed:
                    latencies.append(elapsed)
                elif allowed is None and len(errors) < 3:
                    errors.append(error)

    async def cpu_in_window() -> float:
        await _sleep_until(begin)
        before = time.process_time()
        await _sleep_until(end)
        return time.process_time() - before

    cpu = asyncio.ensure_future(cpu_in_window())
    budget = (end - time.monotonic_ns()) / 1e9 + 20
    await asyncio.wait_for(asyncio.gather(*map(lane, senders)), budget)
    cpu_s = 0.0 if once else await cpu
    cpu.cancel()  # a "once" run ends when its pool does, maybe long before its window
    for connection in connections:
        await connection.close()
    reused = max(0, counts["sent"] - len(pool)) if spec["mode"] == "fresh" else 0
    conn.send(counts | {"errors_seen": errors, "reused": reused, "latencies_ns": latencies,
                        "cpu_s": cpu_s})  # fmt: skip


async def _sleep_until(t_ns: int) -> None:
    await asyncio.sleep(max(0.0, (t_ns - time.monotonic_ns()) / 1e9))


# --- /proc: what the processes under test used ----------------------------------------------


def process_cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy (all cores; everything but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / CLK_TCK


def children_of(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that has just exited
            out += [int(x) for x in (task / "children").read_text().split()]
    return out


def vm_status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (the peak) of a process, in MiB."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    return {k: round(int(fields[k].split()[0]) / 1024, 1) for k in ("VmRSS", "VmHWM")}


def _cpu_over(
    pids: dict[str, int], begin: float, duration: float
) -> tuple[dict[str, float], float]:
    """Cores each process (name -> pid) and the whole machine used from ``begin`` on."""
    time.sleep(max(0.0, begin - time.monotonic()))
    before, busy = {name: process_cpu_s(pid) for name, pid in pids.items()}, machine_busy_s()
    time.sleep(max(0.0, begin + duration - time.monotonic()))
    used = {name: (process_cpu_s(pid) - before[name]) / duration for name, pid in pids.items()}
    return used, (machine_busy_s() - busy) / duration


# --- the parent side ------------------------------------------------------------------------


class Generators:
    """Generator processes, spawned once (grpc must not be forked) and reused by every run;
    leaving the ``with`` stops them."""

    def __init__(self, processes: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conns, self._procs = [], []
        for _ in range(processes):
            parent, child = ctx.Pipe()
            self._procs.append(ctx.Process(target=_child, args=(child,), daemon=True))
            self._procs[-1].start()
            child.close()
            self._conns.append(parent)

    def _recv(self, conn: Any, timeout: float) -> dict[str, Any]:
        if not conn.poll(timeout):
            raise RuntimeError(f"a load generator did not answer within {timeout:.0f}s")
        reply: dict[str, Any] = conn.recv()
        if "error" in reply:
            raise RuntimeError(f"load generator failed: {reply['error']}")
        return reply

    def run(self, specs: Sequence[dict[str, Any]], *, warmup: float, duration: float,
            sample: dict[str, int] | None = None) -> dict[str, Any]:  # fmt: skip
        """One spec per generator process; ``sample`` names the processes (name -> pid) whose
        CPU time counts as the server's."""
        conns = self._conns[: len(specs)]
        for conn, spec in zip(conns, specs, strict=True):
            conn.send(spec)
        for conn in conns:  # each has signed its tokens and connected
            self._recv(conn, 120)
        start_ns = time.monotonic_ns() + 200_000_000
        for conn in conns:
            conn.send({"start_ns": start_ns, "warmup_ns": int(warmup * 1e9),
                       "duration_ns": int(duration * 1e9)})  # fmt: skip
        server, busy = _cpu_over(sample, start_ns / 1e9 + warmup, duration) if sample else ({}, 0)
        replies = [self._recv(conn, warmup + duration + 60) for conn in conns]
        completed = sum(r["completed"] for r in replies)
        generators = [r["cpu_s"] / duration for r in replies]
        latency = summary_us([x for r in replies for x in r["latencies_ns"]])
        server_cpu = sum(server.values())
        return {
            "throughput_rps": round(completed / duration, 1),
            **{k: v for k, v in latency.items() if k != "n"},
            **{k: sum(r[k] for r in replies) for k in ("completed", "denied", "errors", "reused")},
            "server_cpu_us_per_request": (
                round(server_cpu * duration / completed * 1e6, 1) if completed and sample else None
            ),
            "server_cpu_cores": {k: round(v, 2) for k, v in server.items()},
            "generator_cpu_cores": [round(c, 2) for c in generators],
            # what other processes on this shared machine used meanwhile (approximate)
            "other_cpu_cores": (
                round(max(0.0, busy - server_cpu - sum(generators)), 2) if sample else None
            ),
            "error_samples": [e for r in replies for e in r["errors_seen"]][:5],
        }

    def __enter__(self) -> Generators:
        return self

    def __exit__(self, *exc: object) -> None:
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.send(None)
        for proc in self._procs:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)


def split(total: int, parts: int) -> list[int]:
    """``total`` in-flight requests over ``parts`` processes, as evenly as possible."""
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts) if base or i < extra]


# --- wrk, through a client-side Envoy ---------------------------------------------------------

WRK_LUA = Path(__file__).with_name("wrk_check.lua")
WRK_MISSING = (
    "wrk is not installed (not on PATH): the parts through a client-side Envoy "
    "(fronts, http_workers) need it. Install it with `apt-get install wrk` (Debian package "
    "wrk), or leave those parts out with --only"
)
WRK_LAUNCH_S = 0.3  # from starting wrk to its first request: it reads its tokens first
SATURATED_CORES = 0.9  # a process (or each core of the machine) this busy holds the rate
BAD_FRACTION = 0.01  # more non-200s and socket errors than this (and 10) fail the run


def wrk_binary() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise RuntimeError(WRK_MISSING)
    return found


def wrk_version() -> str | None:
    try:
        run = subprocess.run([wrk_binary(), "-v"], capture_output=True, text=True, timeout=10)
    except (OSError, RuntimeError, subprocess.SubprocessError):
        return None
    return (run.stdout + run.stderr).split(" [", 1)[0].strip() or None


def write_tokens(path: Path, tokens: Sequence[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(tokens) + "\n", encoding="ascii")
    return path


def run_wrk(port: int, target: Target, tokens: Path, *, fresh: bool, connections: int,
            warmup: float, duration: float, sample: dict[str, int],
            threads: int = 1) -> dict[str, Any]:  # fmt: skip
    """One window of wrk against the plain listener ``port`` of the client-side Envoy.

    ``sample`` names the processes whose CPU is read over the window (name -> pid); wrk's
    own is added as ``wrk``. Names starting ``extauthz`` are the sidecar's processes (or the
    floor's), ``envoy`` the server-side Envoy, ``client_envoy`` the client side. Per process:
    ``cpu_cores`` (CPU seconds per second of window) and ``cpu_us_per_check`` (CPU µs per 200
    completed in the window)."""
    begin = time.monotonic_ns() + int((WRK_LAUNCH_S + warmup) * 1e9)
    end = begin + int(duration * 1e9)
    argv = [wrk_binary(), "-t", str(threads), "-c", str(max(connections, threads)),
            "-d", f"{math.ceil(WRK_LAUNCH_S + warmup + duration) + 60}s", "--timeout", "2s",
            "-s", str(WRK_LUA), f"http://127.0.0.1:{port}/", "--",
            str(tokens), "fresh" if fresh else "repeat", str(begin), str(end),
            target.method, target.path, target.host]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        cores, busy = _cpu_over(sample | {"wrk": proc.pid}, begin / 1e9, duration)
        time.sleep(max(0.0, (end - time.monotonic_ns()) / 1e9 + 0.02))
        proc.send_signal(signal.SIGINT)  # wrk stops, reports and runs done() at once
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = [line for line in out.splitlines() if line.startswith("BENCH-RESULT ")]
    if not lines:
        raise RuntimeError(f"wrk printed no result (exit {proc.returncode}): {err.strip()[:500]}")
    reply = json.loads(lines[-1].split(" ", 1)[1])
    figures = wrk_figures(reply, cores, busy, begin_ns=begin, duration=duration)
    return figures | {
        "connections": max(connections, threads),
        "wrk_stderr": err.strip()[:300] or None,
    }


def wrk_figures(reply: dict[str, Any], cores: dict[str, float], busy: float, *, begin_ns: int,
                duration: float) -> dict[str, Any]:  # fmt: skip
    """One run's figures from what ``wrk_check.lua`` printed and the cores each sampled
    process (and the whole machine) used over the window."""
    rps = reply["completed"] / duration
    statuses: dict[str, int] = {}
    for group in reply["statuses"]:
        for code, n in group.items():
            statuses[code] = statuses.get(code, 0) + n
    invalid = []
    if reply["reused"]:
        invalid.append(f"{reply['reused']} requests reused one of {reply['pool']} tokens")
    if not 0 < reply["first_response_ns"] < begin_ns:
        invalid.append("wrk's first response came after the window opened: no warm-up")
    server = [c for name, c in cores.items() if name.startswith("extauthz")]
    return {
        "throughput_rps": round(rps, 1),
        # wrk's histogram: every response of its run, the warm-up too
        "p50_us": reply["p50_us"],
        "p99_us": reply["p99_us"],
        "completed": reply["completed"],
        "not_200": reply["not_200"],
        "statuses": statuses,
        "socket_errors": reply["socket_errors"],  # over wrk's whole run
        "pool": reply["pool"],
        "reused": reply["reused"],
        "invalid": "; ".join(invalid) or None,
        "cpu_cores": {k: round(v, 3) for k, v in cores.items()},
        "cpu_us_per_check": {k: _per_check(v, rps) for k, v in cores.items()},
        "extauthz_cpu_us_per_check": _per_check(sum(server), rps) if server else None,
        "generator_cpu_cores": round(cores.get("client_envoy", 0.0) + cores.get("wrk", 0.0), 3),
        "machine_busy_cores": round(busy, 2),
        # what other processes on this shared machine used meanwhile (approximate)
        "other_cpu_cores": round(max(0.0, busy - sum(cores.values())), 2),
        # what held the rate: a process near one core (a single event loop, or Envoy's one
        # worker thread), or every core of the machine busy
        "saturated": [name for name, c in cores.items() if c >= SATURATED_CORES]
        + (["machine"] if busy >= SATURATED_CORES * (os.cpu_count() or 1) else []),
    }


def _per_check(cores: float, rps: float) -> float | None:
    return round(cores / rps * 1e6, 1) if rps else None


def too_many_bad(run: dict[str, Any]) -> bool:
    """More than 1% (and more than 10) of the window's answers were not a 200, or failed."""
    bad = run["not_200"] + sum(run["socket_errors"].values())
    return bool(run["completed"] == 0 or bad > max(10, BAD_FRACTION * (run["completed"] + bad)))
