"""Where a server's CPU goes under load: ``python -m bench.profile [warm|cold|floor]``.

Starts ``extauthz serve`` (10-rule policy) or the floor, drives it over gRPC with the
benchmark's load generator for ``--seconds``, and samples the server with py-spy (not a
project dependency: ``pip install py-spy``), native frames included. It prints the share of
samples in which each function is on the stack (inclusive) and at the top (self), and
writes the collapsed stacks (flamegraph input) next to ``--out``.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.fixtures import client_pki, write_setup
from bench.loadgen import Generators, split
from bench.scenarios import REPEAT_POOL, Client, Plan, fresh_pool
from bench.servers import Floor, Serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("scenario", choices=["warm", "cold", "floor"], nargs="?", default="warm")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--out", type=Path, default=Path("bench/results/profile.txt"))
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--serve-arg", action="append", default=[], help="extra serve flag")
    parser.add_argument(
        "--native", action="store_true", help="native frames too (pauses the process: slower)"
    )
    args = parser.parse_args(argv)
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).exists():
        print("py-spy not found: pip install py-spy", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="extauthz-profile-"))
    setup = write_setup(workdir / "setup", 10)
    client = Client(setup, client_pki(workdir / "pki", setup.target))
    server: Floor | Serve
    if args.scenario == "floor":
        server = Floor(workdir)
    else:
        server = Serve(setup, workdir, extra=args.serve_arg)
    collapsed = args.out.with_suffix(".collapsed")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        server.wait_ready()
        procs = 2
        plan = Plan((), (), 1, 1.0, args.seconds, procs, procs, (procs,), 0, 1, 0)
        pool = fresh_pool(3000, plan, procs) if args.scenario == "cold" else REPEAT_POOL
        mode = "fresh" if args.scenario == "cold" else "repeat"
        specs = [
            client.spec("grpc", server.grpc_targets, c, mode, pool)
            for c in split(args.concurrency, procs)
        ]
        with Generators(procs) as gens:
            how = ["--native"] if args.native else ["--nonblocking"]
            spy = subprocess.Popen(
                [
                    pyspy, "record", "--pid", str(server.pid), "--rate", str(args.rate),
                    "--duration", str(int(args.seconds)), "--format", "raw", *how,
                    "--output", str(collapsed),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )  # fmt: skip
            time.sleep(0.5)
            load = gens.run(specs, warmup=0.5, duration=args.seconds, sample={"s": server.pid})
            _, err = spy.communicate(timeout=args.seconds + 30)
        if not collapsed.exists():
            print(f"py-spy wrote nothing: {err.decode(errors='replace')}", file=sys.stderr)
            return 1
        report = summarise(collapsed, args.top)
        head = (
            f"{args.scenario}: {load.throughput:.0f} req/s, server "
            f"{load.to_json()['server_cpu_us_per_request']} us CPU per request\n"
        )
        args.out.write_text(head + report, encoding="utf-8")
        print(head + report)
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def summarise(collapsed: Path, top: int) -> str:
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_short(f) for f in stack.split(";")]
        for frame in set(frames):
            inclusive[frame] += count
        own[frames[-1]] += count
    lines = [f"{total} samples (all threads)", "", "inclusive  self    function"]
    for frame, count in inclusive.most_common(top):
        lines.append(f"{count / total:8.1%} {own[frame] / total:6.1%}   {frame}")
    lines += ["", "top by self time:"]
    for frame, count in own.most_common(top // 2):
        lines.append(f"{count / total:8.1%}   {frame}")
    return "\n".join(lines) + "\n"


def _short(frame: str) -> str:
    """``func (path/to/file.py:123)`` -> ``func (file.py)``: one row per function, not per
    line, with the site-packages or repository prefix dropped."""
    head, sep, tail = frame.partition(" (")
    if not sep:
        return frame
    where = tail.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        where = where.rsplit(marker, 1)[-1]
    return f"{head} ({where})"


if __name__ == "__main__":
    raise SystemExit(main())
