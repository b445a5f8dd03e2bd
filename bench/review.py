"""``extauthz review`` over a generated decision log: lines per second and peak memory.

``run_review`` writes the benchmark's generated policy (``fixtures.write_setup``: one rule per
workload) and a decision log of ``lines`` version 2 lines for it, shaped as the sidecar writes
them (every field, in its order, at a real line's length): mostly allows spread over four
fifths of the rules (the rest is never used), denies of a rule, denies without one, lines of
an older revision and a few malformed ones. It then runs ``review --format json`` on it in a
child process and reads that process's own figures: the time ``run`` took (the interpreter's
start and imports left out, as they do not grow with the log) and its peak RSS
(``VmHWM`` of ``/proc/self/status`` at its end: its own peak since exec, which
``ru_maxrss`` is not, as Linux carries the parent's size at fork across exec).
"""

from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import IO, Any

import orjson

from bench.fixtures import write_setup
from extauthz.policy.compiler import load_policy

__all__ = ["run_review", "write_log"]

RULES = 1000
START = 1_796_169_600  # 2026-12-02T00:00:00Z
STEP_MS = 7  # between two lines: 1,000,000 lines are about two hours

_CHILD = """
import argparse, io, json, resource, sys, time
from contextlib import redirect_stdout
from extauthz.tools import review
top = argparse.ArgumentParser()
review.add_parser(top.add_subparsers())
args = top.parse_args(["review", *sys.argv[1:]])
out = io.StringIO()
started = time.perf_counter()
with redirect_stdout(out):
    code = args.func(args)
elapsed = time.perf_counter() - started
report = json.loads(out.getvalue())


def hwm_kb():
    # VmHWM belongs to this process's own memory since exec; ru_maxrss would also hold the
    # parent's resident size at fork, which Linux carries across exec.
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


print(json.dumps({
    "code": code,
    "elapsed_s": elapsed,
    "lines": report["window"]["lines"],
    "malformed": report["malformed"],
    "unused": len(report["unused_rules"]),
    "maxrss_kb": hwm_kb(),
}))
"""


def _line_pool(revision: str, rules: int, size: int = 4096) -> list[bytes]:
    """Distinct lines without their time (``"time": ...,`` is put in front of each)."""
    rng = random.Random(7)  # noqa: S311 - test data, not secrets
    used = max(1, rules * 4 // 5)
    pool = []
    for _ in range(size):
        i = rng.randrange(used)
        roll = rng.random()
        rule: str | None = f"r{i:05d}"
        caller = f"spiffe://cluster.local/ns/bench/sa/w{i}"
        decision, reason, scopes, detail, rev = "allow", "allowed", "bench.read", None, revision
        if roll < 0.06:
            decision, reason, scopes = "deny", "insufficient_scope", None
            detail = "missing required scopes: bench.read"
        elif roll < 0.09:
            decision, reason, scopes, rule = "deny", "no_rule", None, None
        elif roll < 0.10:
            decision, reason, scopes, rule = "deny", "token_missing", None, None
        elif roll < 0.11:
            rev = "0123456789abcdef"  # a revision before this one
        allow = decision == "allow"
        line = {
            "decision": decision,
            "shadow": False,
            "reason": reason,
            "rule": rule,
            "purpose": f"bench rule {i}" if rule else None,
            "caller": caller,
            "sub": f"user-{rng.randrange(10_000)}" if reason != "token_missing" else None,
            "iss": "https://idp.example.com" if reason != "token_missing" else None,
            "aud": f"spiffe://cluster.local/ns/bench/sa/up{i % 100}" if allow else None,
            "scopes": scopes,
            "jti": uuid.UUID(int=rng.getrandbits(128)).hex[:22] if allow else None,
            "txn": None,
            "method": "GET",
            "host": f"svc{i % 100}.bench.svc.cluster.local",
            "path": f"/v1/r{i}/42",
            "request_id": str(uuid.UUID(int=rng.getrandbits(128))),
            "detail": detail,
            "latency_ms": round(rng.uniform(0.05, 0.9), 3),
            "v": 2,
            "decision_id": uuid.UUID(int=rng.getrandbits(128)).hex[:16],
            "policy_revision": rev,
            "policy_generation": 1,
            "trace_id": uuid.UUID(int=rng.getrandbits(128)).hex if roll > 0.5 else None,
        }
        pool.append(orjson.dumps(line)[1:] + b"\n")  # without its "{"
    return pool


def write_log(path: Path, revision: str, lines: int, rules: int = RULES) -> None:
    """``lines`` decision log lines for the generated policy of ``revision``; gzip when the
    name ends in ``.gz``. One line in 100,000 is malformed."""
    pool = _line_pool(revision, rules)
    fh: IO[bytes]
    if path.suffix == ".gz":
        fh = gzip.open(path, "wb", compresslevel=1)  # noqa: SIM115
    else:
        fh = path.open("wb", buffering=1 << 20)
    with fh:
        second, prefix = -1, b""
        chunk: list[bytes] = []
        for n in range(lines):
            millis = START * 1000 + n * STEP_MS
            if millis // 1000 != second:
                second = millis // 1000
                stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
                prefix = b'{"time":"' + stamp.encode() + b"."
            if n % 100_000 == 99_999:
                chunk.append(b'{"time": "garbage"\n')
            else:
                chunk.append(b'%s%03dZ",' % (prefix, millis % 1000) + pool[n % len(pool)])
            if len(chunk) >= 10_000:
                fh.write(b"".join(chunk))
                chunk.clear()
        fh.write(b"".join(chunk))


def run_review(workdir: Path, lines: int = 1_000_000, *, compress: bool = False) -> dict[str, Any]:
    """Time ``extauthz review`` over a generated log of ``lines`` lines (gzip with
    ``compress``): ``review_lines_per_s`` and ``review_rss_mb`` (peak, of the child)."""
    workdir.mkdir(parents=True, exist_ok=True)
    setup = write_setup(workdir, RULES)
    revision = load_policy(setup.policy).digest[:16]
    log = workdir / ("decisions.log.gz" if compress else "decisions.log")
    write_log(log, revision, lines)
    try:
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, "--policy", str(setup.policy), str(log),
             "--format", "json"],
            capture_output=True,
            text=True,
            check=False,
            cwd=Path(__file__).resolve().parent.parent,
        )  # fmt: skip
    finally:
        log.unlink(missing_ok=True)  # hundreds of MB
    if done.returncode != 0:
        raise RuntimeError(f"review failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    expected = lines - lines // 100_000
    if figures["code"] != 0 or figures["lines"] != expected:
        raise RuntimeError(f"review read {figures['lines']} lines of {expected}: {figures}")
    return {
        "review_lines_per_s": round(lines / figures["elapsed_s"]),
        "review_rss_mb": round(figures["maxrss_kb"] / 1024, 1),
        "review_lines": lines,
        "review_s": round(figures["elapsed_s"], 3),
    }


if __name__ == "__main__":
    import argparse
    import tempfile

    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--lines", type=int, default=1_000_000)
    cli.add_argument("--gzip", action="store_true")
    options = cli.parse_args()
    with tempfile.TemporaryDirectory(prefix="extauthz-review-bench-") as tmp:
        result = run_review(Path(tmp), options.lines, compress=options.gzip)
    print(json.dumps(result))
