"""Load generators: processes that each keep N requests in flight over asyncio.

``grpc``: grpc.aio channels (one HTTP/2 connection per target, as Envoy keeps per worker)
sending pre-serialised CheckRequests; an allow is a response with an ``ok_response``.
``https``: one mTLS keep-alive HTTP/1.1 connection per request in flight to Envoy; an allow is
a 200. Tokens are signed before the window: ``repeat`` cycles a few (cached after first use),
``fresh`` gives every request its own, ``once`` sends each token once and stops (to fill a
cache). Every process starts at one time on the shared monotonic clock and counts
what completes inside the window only; the parent reads the CPU time of the sampled server
processes and of the whole machine over the same window.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import ssl
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
        return response.status.code == 0 and response.HasField("ok_response")

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
