"""The ``extauthz`` command."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from extauthz import __version__
from extauthz.decision.jose import generate_signing_key
from extauthz.decision.model import Snapshot
from extauthz.decision.pipeline import CheckInput
from extauthz.decision.reasons import Deny
from extauthz.demo import run_demo
from extauthz.errors import ExtauthzError, PolicyError
from extauthz.policy.compiler import load_policy
from extauthz.policy.loader import (
    assemble,
    load_issuer_keys,
    load_jwks_file,
    load_signing_key,
    write_private_key,
)
from extauthz.serve.address import is_loopback, split_address
from extauthz.serve.edge import recorded_check_input
from extauthz.tools import paths, review
from extauthz.tools.diff import WIDENS, OwnersError, diff_policies, load_owners
from extauthz.tools.diff import render as render_diff
from extauthz.tools.explain import explain
from extauthz.tools.explain import render as render_explanation
from extauthz.tools.lint import (
    DEFAULT_MAX_WINDOW_DAYS,
    ERROR,
    WARNING,
    LintOptions,
    UnreadablePolicy,
    lint_file,
)
from extauthz.tools.policytest import load_cases, run_cases
from extauthz.tools.policytest import render as render_cases
from extauthz.tools.simulate import SimRequest, Simulator

POLICY_HELP = (
    "policy YAML file, or a directory of them (one file with the shared sections, the others "
    "rules only; a mounted ConfigMap works)"
)

# The serving modules that count metrics are imported inside the commands that use them: with
# ``--workers`` the supervisor must set PROMETHEUS_MULTIPROC_DIR before prometheus_client is
# first imported, since it picks its mode at import time.


def _serve(args: argparse.Namespace) -> int:
    supervising = args.workers > 1 and not args.worker
    metrics_dir = None
    if supervising:
        # Before anything imports prometheus_client: it picks its mode at import time. The
        # workers inherit the variable, so every process writes where the supervisor reads.
        metrics_dir = tempfile.mkdtemp(prefix="extauthz-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        return _serve_with(args, supervising)
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _serve_with(args: argparse.Namespace, supervising: bool) -> int:
    from extauthz.serve.decision_log import DecisionLog
    from extauthz.serve.jwks_remote import RemoteJwks
    from extauthz.serve.process import Addresses, configure_logging, serve_single
    from extauthz.serve.runtime import Runtime
    from extauthz.serve.sidecar import Sidecar

    configure_logging(args.log_level)
    if not args.signing_key and not args.dev:
        return _fail("no signing key: pass --signing-key FILE|DIR (or --dev for a throwaway one)")
    key_paths = [Path(p) for p in args.signing_key or []]
    dev_key = None
    if not key_paths:
        print(
            "extauthz: WARNING: --dev: signing with an ephemeral key made for this process. "
            "Tokens it mints die with it. Never use --dev in production.",
            file=sys.stderr,
        )
        dev_key = generate_signing_key()
        if supervising:
            # Every worker must sign with the key the supervisor publishes.
            key_dir = Path(tempfile.mkdtemp(prefix="extauthz-dev-key-"))
            write_private_key(dev_key, key_dir / "dev.pem")
            key_paths, dev_key = [key_dir / "dev.pem"], None
    remote = RemoteJwks()
    sidecar = Sidecar(
        DecisionLog(None if args.no_decision_log else sys.stdout),
        subject_cache_size=args.subject_cache_size,
        on_unknown_kid=remote.unknown_kid,
    )
    runtime = Runtime(
        # The supervisor decides nothing: its workers load and decide on their own.
        (lambda snapshot: None) if supervising else sidecar.install,
        Path(args.policy),
        key_paths,
        poll_interval=args.poll_interval,
        key_activation_delay=args.key_activation_delay,
        dev_key=dev_key,
        remote=remote,
    )
    try:
        runtime.load_initial(strict=not args.retry_at_start)
    except PolicyError as exc:
        count = len(exc.problems)
        print(f"extauthz: cannot start: the policy has {count} problem(s):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    except ExtauthzError as exc:
        return _fail(f"cannot start: {exc}")
    snapshot = runtime.snapshot
    if args.http_address and snapshot is not None and snapshot.policy.xfcc_trusted_hops:
        print(
            "extauthz: WARNING: --http-address: the policy names XFCC trusted hops, but the "
            "HTTP front sees only the element the local Envoy sets; callers through those hops "
            "are denied there (workload_unidentified). Use the gRPC front for them.",
            file=sys.stderr,
        )
    try:
        if supervising:
            from extauthz.serve.workers import Supervisor, worker_addresses

            addresses = worker_addresses(args.grpc_address, args.workers)
            argv = _worker_argv(args, key_paths)
            supervisor = Supervisor(runtime, argv, addresses, args.http_address or None)
            return asyncio.run(
                supervisor.run(args.admin_address or None, args.grace, args.drain_delay)
            )
        http_socket = None
        if args.http_fd is not None:  # a worker: the supervisor's listening socket
            http_socket = socket.socket(fileno=args.http_fd)
        front = Addresses(
            args.grpc_address,
            args.admin_address or None,
            http=args.http_address if http_socket is None else None,
            http_socket=http_socket,
        )
        asyncio.run(
            serve_single(sidecar, runtime, front, grace=args.grace, drain_delay=args.drain_delay)
        )
    except (OSError, ValueError) as exc:
        return _fail(f"cannot start: {exc}")
    return 0


def _worker_argv(args: argparse.Namespace, key_paths: list[Path]) -> list[str]:
    argv = ["--policy", args.policy]
    for path in key_paths:
        argv += ["--signing-key", str(path)]
    argv += [
        "--poll-interval", str(args.poll_interval),
        "--key-activation-delay", str(args.key_activation_delay),
        "--grace", str(args.grace),
        "--drain-delay", str(args.drain_delay),
        "--subject-cache-size", str(args.subject_cache_size),
        "--log-level", args.log_level,
    ]  # fmt: skip
    if args.no_decision_log:
        argv.append("--no-decision-log")
    if args.retry_at_start:
        argv.append("--retry-at-start")
    return argv


def _keys_generate(args: argparse.Namespace) -> int:
    key = generate_signing_key(args.alg)
    try:
        write_private_key(key, Path(args.out))
    except FileExistsError:
        return _fail(f"{args.out} exists; refusing to overwrite a key")
    except OSError as exc:
        return _fail(f"cannot write {args.out}: {exc.strerror or exc}")
    print(json.dumps(dict(key.public_jwk), indent=2))
    return 0


def _policy_lint(args: argparse.Namespace) -> int:
    options = LintOptions(max_window_days=int(args.max_window_days))
    findings = []
    for name in args.files:
        try:
            findings.extend(lint_file(Path(name), options))
        except UnreadablePolicy as exc:
            print(f"extauthz: cannot read {exc}", file=sys.stderr)
            return 2
    if args.format == "json":
        counts = {
            s: sum(1 for f in findings if f.severity == s) for s in ("error", "warning", "info")
        }
        print(
            json.dumps({"findings": [f.to_json() for f in findings], "summary": counts}, indent=2)
        )
    else:
        for finding in findings:
            print(finding.render())
        errors = sum(1 for f in findings if f.severity == ERROR)
        warnings = sum(1 for f in findings if f.severity == WARNING)
        print(f"{len(args.files)} file(s): {errors} error(s), {warnings} warning(s)")
    failing = {ERROR, WARNING} if args.strict else {ERROR}
    return 1 if any(f.severity in failing for f in findings) else 0


def _policy_test(args: argparse.Namespace) -> int:
    try:
        policy = load_policy(Path(args.policy))
        cases = [case for name in args.cases for case in load_cases(Path(name))]
        report = run_cases(policy, cases)
    except ExtauthzError as exc:
        print(f"extauthz: {exc}", file=sys.stderr)
        return 2
    print(render_cases(report))
    if args.require_coverage and report.uncovered:
        return 1
    return 1 if report.failed else 0


def _policy_diff(args: argparse.Namespace) -> int:
    try:
        old, new = load_policy(Path(args.old)), load_policy(Path(args.new))
        # The JWKS files are part of what a policy trusts: read them as serve would.
        keys = (load_issuer_keys(old), load_issuer_keys(new))
    except ExtauthzError as exc:
        print(f"extauthz: {exc}", file=sys.stderr)
        return 2
    try:
        owners = load_owners(Path(args.owners)) if args.owners else None
    except OwnersError as exc:
        return _fail(str(exc))
    changes = diff_policies(old, new, keys, owners)
    print(render_diff(changes, args.format))
    return 3 if any(c.effect == WIDENS for c in changes) else 0


def _explain(args: argparse.Namespace) -> int:
    now = args.now if args.now is not None else time.time()
    try:
        inp, snap = _explain_input(args, now)
    except (ExtauthzError, ValueError, OSError) as exc:
        print(f"extauthz: {exc}", file=sys.stderr)
        return 2
    result = explain(inp, snap, now)
    if args.format == "json":
        print(json.dumps(result.to_json(), indent=2, default=str))
    else:
        print(render_explanation(result))
    return 0 if result.decision.allowed else 1


def _explain_input(args: argparse.Namespace, now: float) -> tuple[CheckInput, Snapshot]:
    policy = load_policy(Path(args.policy))
    if args.request:
        # The recorded request is Envoy's wire format: the serving layer reads it.
        from extauthz.serve.jwks_remote import fetch_jwks  # (metrics: see _serve_with)

        try:
            inp = recorded_check_input(Path(args.request).read_text())
        except ValueError as exc:
            raise ValueError(f"{args.request}: {exc}") from exc
        if isinstance(inp, Deny):
            raise ValueError(f"{args.request}: {inp.detail}: more than extauthz looks at")
        issuer_keys = {}
        for issuer in policy.issuers.values():
            try:
                if issuer.jwks.file is not None:
                    issuer_keys[issuer.id] = load_jwks_file(issuer.jwks.file)
                elif issuer.jwks.url is not None:
                    issuer_keys[issuer.id] = fetch_jwks(issuer.jwks.url, issuer.jwks.timeout)
            except ExtauthzError as exc:
                print(f"extauthz: note: {exc}", file=sys.stderr)
        keys = [load_signing_key(Path(p)) for p in args.signing_key or []]
        return inp, assemble(policy, issuer_keys, keys or [generate_signing_key()])
    if not (args.workload and args.host and args.path):
        raise ValueError("give --request FILE, or --workload, --host and --path")

    claims = json.loads(args.claims) if args.claims else {}
    if not isinstance(claims, dict):
        raise ValueError("--claims must be a JSON object")
    if args.scope is not None:
        claims["scope"] = args.scope
    sim = Simulator(policy)
    request = SimRequest(
        workload=args.workload,
        method=args.method,
        host=args.host,
        path=args.path,
        issuer=None if args.no_token else (args.issuer or sorted(policy.issuers)[0]),
        claims=claims,
        certificate=args.certificate,
    )
    return sim.check_input(request, now), sim.snapshot


def _status(args: argparse.Namespace) -> int:

    host, port = split_address(args.admin_address)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://{host}:{port}/statusz", timeout=5) as response:
            doc = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return _fail(f"cannot reach the sidecar's admin port {args.admin_address}: {exc}")
    print(json.dumps(doc, indent=2))
    return 0 if doc.get("ready") else 1


def _demo(args: argparse.Namespace) -> int:
    return run_demo(as_json=args.json, keep=args.keep, front=args.front)


def _fail(message: str) -> int:
    print(f"extauthz: {message}", file=sys.stderr)
    return 2


# --- argument types: every value checked when the command line is parsed ---------------------


def _address(*, port_zero: bool) -> Callable[[str], str]:
    """``host:port`` with a port of 1 to 65535 (0, "any free port", where it makes sense)."""

    def parse(text: str) -> str:
        try:
            _host, port = split_address(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not host:port") from None
        low = 0 if port_zero else 1
        if not low <= port <= 65535:
            raise argparse.ArgumentTypeError(f"{text!r}: the port must be {low} to 65535")
        return text

    return parse


def _loopback_address(text: str) -> str:
    address = _address(port_zero=True)(text)
    if not is_loopback(split_address(address)[0]):
        raise argparse.ArgumentTypeError(
            f"{text!r}: the HTTP front trusts the XFCC header the local Envoy sets, so it "
            "listens on loopback only (127.0.0.1, ::1 or localhost)"
        )
    return address


def _optional_address(text: str) -> str:
    return "" if text == "" else _address(port_zero=True)(text)


def _number(kind: type[int] | type[float], low: float, high: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not low <= value <= high:  # NaN fails this too
            raise argparse.ArgumentTypeError(f"{text!r} must be from {low:g} to {high:g}")
        return value

    return parse


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line and exit 2, like every other operator mistake."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("extauthz").strip()
        self.exit(2, f"extauthz: {command + ': ' if command else ''}{message}\n")


def parser() -> argparse.ArgumentParser:
    top = _Parser(
        prog="extauthz",
        description="Envoy ext_authz sidecar: exchanges the caller's token for a narrowed one.",
    )
    top.add_argument("--version", action="version", version=f"extauthz {__version__}")
    sub = top.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = sub.add_parser("serve", help="run the ext_authz gRPC server")
    serve.add_argument("--policy", required=True, help=POLICY_HELP)
    serve.add_argument(
        "--signing-key",
        action="append",
        metavar="FILE",
        help="PEM private key file (EC P-256 or Ed25519), or a directory of them (a mounted "
        "Secret); repeatable. All are published; see docs/operations.md for which one signs",
    )
    serve.add_argument("--grpc-address", default="127.0.0.1:9191", type=_address(port_zero=True))
    serve.add_argument(
        "--admin-address",
        default="127.0.0.1:9102",
        type=_optional_address,
        help="probes and JWKS; empty to disable",
    )
    serve.add_argument(
        "--http-address",
        type=_loopback_address,
        help="also serve Envoy's HTTP ext_authz protocol here (loopback only; envoy-http.yaml)",
    )
    serve.add_argument("--http-fd", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--dev", action="store_true", help="sign with an ephemeral key (unsafe)")
    serve.add_argument(
        "--workers",
        type=_number(int, 1, 64),
        default=1,
        help="processes, 1 to 64; worker i listens on the gRPC port + i",
    )
    serve.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    serve.add_argument(
        "--retry-at-start",
        action="store_true",
        help="if the policy or keys cannot be loaded at start, run not ready and retry every "
        "poll interval instead of exiting 2 (for pods: no crash loop)",
    )
    serve.add_argument(
        "--subject-cache-size",
        type=_number(int, 0, 10_000_000),
        default=10_000,
        help="verified subject tokens remembered per process (0 disables; at most 10,000,000)",
    )
    serve.add_argument(
        "--poll-interval",
        type=_number(float, 0.1, 3600),
        default=2.0,
        help="seconds between checks for changed files, 0.1 to 3600",
    )
    serve.add_argument(
        "--key-activation-delay",
        type=_number(float, 0, 86400),
        default=60.0,
        help="seconds a newly added key is published before it signs, 0 to 86400",
    )
    serve.add_argument(
        "--grace",
        type=_number(float, 0, 3600),
        default=10.0,
        help="seconds to finish in-flight checks on SIGTERM, 0 to 3600",
    )
    serve.add_argument(
        "--drain-delay",
        type=_number(float, 0, 3600),
        default=1.0,
        help="seconds to keep answering while reporting NOT_SERVING on SIGTERM, 0 to 3600",
    )
    serve.add_argument("--no-decision-log", action="store_true", help="do not log decisions")
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    serve.set_defaults(func=_serve)

    keys = sub.add_parser("keys", help="signing key tools")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, parser_class=_Parser)
    gen = keys_sub.add_parser("generate", help="write a new private key, print its public JWK")
    gen.add_argument("--alg", choices=["ES256", "EdDSA"], default="ES256")
    gen.add_argument("--out", required=True, help="where to write the PEM private key (0600)")
    gen.set_defaults(func=_keys_generate)

    policy = sub.add_parser("policy", help="lint, test and diff policies")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True, parser_class=_Parser)
    lint = policy_sub.add_parser("lint", help="report what widens the blast radius of tokens")
    lint.add_argument("files", nargs="+", metavar="POLICY", help=POLICY_HELP)
    lint.add_argument("--strict", action="store_true", help="warnings fail too")
    lint.add_argument(
        "--max-window-days",
        type=_number(int, 1, 3650),
        default=DEFAULT_MAX_WINDOW_DAYS,
        help="flag a rule's active window longer than this (default 30)",
    )
    lint.add_argument("--format", choices=["text", "json"], default="text")
    lint.set_defaults(func=_policy_lint)
    ptest = policy_sub.add_parser("test", help="run reviewed cases against a policy")
    ptest.add_argument("policy", metavar="POLICY", help=POLICY_HELP)
    ptest.add_argument("cases", nargs="+", metavar="CASES")
    ptest.add_argument(
        "--require-coverage", action="store_true", help="fail when a rule is reached by no case"
    )
    ptest.set_defaults(func=_policy_test)
    pdiff = policy_sub.add_parser("diff", help="what a change does to grants; exit 3 if it widens")
    pdiff.add_argument("old", metavar="OLD", help=POLICY_HELP)
    pdiff.add_argument("new", metavar="NEW", help=POLICY_HELP)
    pdiff.add_argument("--format", choices=["text", "json"], default="text")
    pdiff.add_argument(
        "--owners",
        metavar="FILE",
        help="who owns which policy file: 'glob owner...' lines, the last match wins "
        "(docs/policy.md); each change shows its file's owners",
    )
    pdiff.set_defaults(func=_policy_diff)
    paths.add_parser(policy_sub)
    review.add_parser(sub)

    exp = sub.add_parser("explain", help="trace one decision phase by phase")
    exp.add_argument("--policy", required=True, help=POLICY_HELP)
    exp.add_argument("--request", metavar="REQ.json", help="a CheckRequest in protobuf JSON")
    exp.add_argument(
        "--signing-key", action="append", metavar="FILE", help="to recognise re-exchanged tokens"
    )
    exp.add_argument("--workload", help="caller SPIFFE ID (simulated request)")
    exp.add_argument("--method", default="GET")
    exp.add_argument("--host")
    exp.add_argument("--path")
    exp.add_argument("--issuer", help="trusted issuer id that signs the simulated token")
    exp.add_argument("--scope", help="the simulated token's scope claim")
    exp.add_argument("--claims", help="more simulated token claims, as JSON")
    exp.add_argument("--certificate", action="store_true", help="simulate a peer certificate")
    exp.add_argument("--no-token", action="store_true", help="simulate a request without token")
    exp.add_argument("--now", type=_number(float, 0, 1e11), help="decide at this Unix time")
    exp.add_argument("--format", choices=["text", "json"], default="text")
    exp.set_defaults(func=_explain)

    status = sub.add_parser("status", help="ask a running sidecar what it runs")
    status.add_argument("--admin-address", default="127.0.0.1:9102", type=_address(port_zero=False))
    status.set_defaults(func=_status)

    demo = sub.add_parser("demo", help="run a narrated exchange through a real Envoy")
    demo.add_argument("--json", action="store_true", help="print one JSON object instead")
    demo.add_argument("--keep", action="store_true", help="keep the work directory")
    demo.add_argument(
        "--front",
        choices=["grpc", "http"],
        default="grpc",
        help="how Envoy asks extauthz: ext_authz over gRPC (envoy.yaml) or HTTP (envoy-http.yaml)",
    )
    demo.set_defaults(func=_demo)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``extauthz`` command; its exit code."""
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except BrokenPipeError:
        # The reader went away (``extauthz explain ... | head``): nothing left to say to it,
        # and the interpreter must not complain while flushing at exit either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
