"""The ``extauthz`` command."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .errors import ExtauthzError, PolicyError


def _serve(args: argparse.Namespace) -> int:
    from .decision_log import DecisionLog
    from .jose import generate_signing_key, load_signing_key
    from .loader import build_snapshot
    from .policy import load_policy
    from .server import Addresses, Sidecar, configure_logging, serve

    configure_logging(args.log_level)
    if not args.signing_key and not args.dev:
        return _fail("no signing key: pass --signing-key FILE (or --dev for a throwaway one)")
    try:
        policy = load_policy(Path(args.policy))
        if args.signing_key:
            keys = [load_signing_key(Path(p)) for p in args.signing_key]
        else:
            print(
                "extauthz: WARNING: --dev: signing with an ephemeral key made for this process. "
                "Tokens it mints die with it. Never use --dev in production.",
                file=sys.stderr,
            )
            keys = [generate_signing_key()]
        snapshot = build_snapshot(policy, keys)
    except PolicyError as exc:
        count = len(exc.problems)
        print(f"extauthz: cannot start: the policy has {count} problem(s):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    except ExtauthzError as exc:
        return _fail(f"cannot start: {exc}")
    sidecar = Sidecar(snapshot, DecisionLog(None if args.no_decision_log else sys.stdout))
    try:
        asyncio.run(serve(sidecar, Addresses(args.grpc_address, args.admin_address or None)))
    except OSError as exc:
        return _fail(f"cannot start: {exc}")
    return 0


def _keys_generate(args: argparse.Namespace) -> int:
    from .jose import generate_signing_key, write_private_key

    key = generate_signing_key(args.alg)
    try:
        write_private_key(key, Path(args.out))
    except FileExistsError:
        return _fail(f"{args.out} exists; refusing to overwrite a key")
    except OSError as exc:
        return _fail(f"cannot write {args.out}: {exc.strerror or exc}")
    print(json.dumps(dict(key.public_jwk), indent=2))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(as_json=args.json, keep=args.keep)


def _fail(message: str) -> int:
    print(f"extauthz: {message}", file=sys.stderr)
    return 2


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="extauthz",
        description="Envoy ext_authz sidecar: exchanges the caller's token for a narrowed one.",
    )
    top.add_argument("--version", action="version", version=f"extauthz {__version__}")
    sub = top.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the ext_authz gRPC server")
    serve.add_argument("--policy", required=True, help="policy YAML file")
    serve.add_argument(
        "--signing-key",
        action="append",
        metavar="FILE",
        help="PEM private key (EC P-256 or Ed25519); repeat to publish several, the first signs",
    )
    serve.add_argument("--grpc-address", default="127.0.0.1:9191")
    serve.add_argument(
        "--admin-address", default="127.0.0.1:9102", help="probes and JWKS; empty to disable"
    )
    serve.add_argument("--dev", action="store_true", help="sign with an ephemeral key (unsafe)")
    serve.add_argument("--no-decision-log", action="store_true", help="do not log decisions")
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    serve.set_defaults(func=_serve)

    keys = sub.add_parser("keys", help="signing key tools")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    gen = keys_sub.add_parser("generate", help="write a new private key, print its public JWK")
    gen.add_argument("--alg", choices=["ES256", "EdDSA"], default="ES256")
    gen.add_argument("--out", required=True, help="where to write the PEM private key (0600)")
    gen.set_defaults(func=_keys_generate)

    demo = sub.add_parser("demo", help="run a narrated exchange through a real Envoy")
    demo.add_argument("--json", action="store_true", help="print one JSON object instead")
    demo.add_argument("--keep", action="store_true", help="keep the work directory")
    demo.set_defaults(func=_demo)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
