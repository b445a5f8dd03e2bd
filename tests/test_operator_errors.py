"""Operator mistakes, as real processes: each is one line on stderr and exit code 2, never a
traceback, and nothing is left listening."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from extauthz.decision.jose import generate_signing_key
from extauthz.demo.idp import Idp
from extauthz.demo.stack import ISSUER, free_port
from extauthz.policy.loader import write_private_key

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "policy.yaml"


def extauthz(*args: str | Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "extauthz", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def one_line_and_exit_2(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """The process said one thing, on one line, and exited 2."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    reasons = [line for line in lines if line.startswith("extauthz: ")]
    assert len(reasons) == 1, lines
    for needle in needles:
        assert needle in reasons[0], reasons[0]
    # Anything else is the sidecar's own log, one line per message, never a stack.
    assert all(" INFO " in line or " WARNING " in line for line in lines if line not in reasons)
    return reasons[0]


@pytest.fixture
def setup(tmp_path: Path) -> Path:
    """A policy whose JWKS exists and a signing key readable by its owner only."""
    Idp(ISSUER).write_jwks(tmp_path / "issuers" / "corp-idp.json")
    (tmp_path / "policy.yaml").write_text(EXAMPLE.read_text())
    write_private_key(generate_signing_key(), tmp_path / "key.pem")
    return tmp_path


def serve(setup: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return extauthz(
        "serve",
        "--policy",
        setup / "policy.yaml",
        "--signing-key",
        setup / "key.pem",
        "--no-decision-log",
        *args,
    )


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


def test_busy_grpc_port(setup: Path, busy_port: int) -> None:
    result = serve(setup, "--grpc-address", f"127.0.0.1:{busy_port}", "--admin-address", "")
    one_line_and_exit_2(result, f"cannot listen on 127.0.0.1:{busy_port}", "in use")


def test_busy_admin_port(setup: Path, busy_port: int) -> None:
    grpc_port = free_port()
    result = serve(
        setup,
        "--grpc-address",
        f"127.0.0.1:{grpc_port}",
        "--admin-address",
        f"127.0.0.1:{busy_port}",
    )
    one_line_and_exit_2(result, f"cannot listen on 127.0.0.1:{busy_port}", "in use")
    # The gRPC port it had bound is free again.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", grpc_port))


@pytest.mark.parametrize(
    ("flag", "value", "needle"),
    [
        ("--grpc-address", "nonsense", "is not host:port"),
        ("--grpc-address", "127.0.0.1:99999", "the port must be 0 to 65535"),
        ("--admin-address", "127.0.0.1:-1", "is not host:port"),
        ("--poll-interval", "0", "must be from 0.1 to 3600"),
        ("--poll-interval", "-1", "must be from 0.1 to 3600"),
        ("--poll-interval", "nan", "must be from 0.1 to 3600"),
        ("--grace", "-1", "must be from 0 to 3600"),
        ("--grace", "inf", "must be from 0 to 3600"),
        ("--drain-delay", "1e9", "must be from 0 to 3600"),
        ("--key-activation-delay", "-5", "must be from 0 to 86400"),
        ("--workers", "0", "must be from 1 to 64"),
        ("--workers", "two", "is not a number"),
        ("--subject-cache-size", "-1", "must be from 0 to 1e+07"),
    ],
)
def test_flag_out_of_range(setup: Path, flag: str, value: str, needle: str) -> None:
    one_line_and_exit_2(serve(setup, flag, value), flag, needle)


def test_status_with_a_malformed_address() -> None:
    one_line_and_exit_2(extauthz("status", "--admin-address", "nonsense"), "is not host:port")


def test_signing_key_readable_by_others_is_refused(setup: Path) -> None:
    key = setup / "key.pem"
    os.chmod(key, 0o644)
    result = serve(setup, "--grpc-address", "127.0.0.1:0", "--admin-address", "")
    one_line_and_exit_2(result, "readable or writable by others", "0644", "chmod o-rwx")


def test_group_readable_signing_key_is_accepted(setup: Path) -> None:
    """As a Kubernetes Secret mounted with ``fsGroup`` and ``defaultMode: 0440`` is."""
    os.chmod(setup / "key.pem", 0o440)
    result = extauthz(
        "explain",
        "--policy",
        setup / "policy.yaml",
        "--signing-key",
        setup / "key.pem",
        "--workload",
        "spiffe://cluster.local/ns/shop/sa/orders",
        "--host",
        "profile.shop.svc.cluster.local",
        "--path",
        "/v1/customers/1",
        "--scope",
        "profile.read",
    )
    assert result.returncode == 0, result.stderr


def test_explain_into_a_closed_pipe_says_nothing() -> None:
    """``extauthz explain ... | head -1``: the reader leaves early; no BrokenPipeError."""
    command = [sys.executable, "-m", "extauthz", "explain", "--policy", str(EXAMPLE)]
    command += ["--workload", "spiffe://cluster.local/ns/shop/sa/orders"]
    command += ["--host", "profile.shop.svc.cluster.local", "--path", "/v1/customers/1"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()  # before a single byte is read
        stderr = proc.stderr.read().decode()
        proc.wait(30)
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"attributes": {"requets": {}}}, "requets"),
        ({"atributes": {}}, "atributes"),
    ],
)
def test_explain_refuses_unknown_request_fields(
    tmp_path: Path, fields: dict[str, object], needle: str
) -> None:
    """A typo would replay another request than the one meant."""
    request = tmp_path / "req.json"
    request.write_text(json.dumps(fields))
    result = extauthz("explain", "--policy", EXAMPLE, "--request", request)
    one_line_and_exit_2(result, str(request), needle)


def test_explain_exit_code_is_the_verdict() -> None:
    base = ["explain", "--policy", str(EXAMPLE), "--workload"]
    base += ["spiffe://cluster.local/ns/shop/sa/orders", "--host"]
    base += ["profile.shop.svc.cluster.local", "--path", "/v1/customers/1"]
    assert extauthz(*base, "--scope", "profile.read").returncode == 0
    assert extauthz(*base, "--scope", "orders.read").returncode == 1
    assert extauthz(*base, "--no-token").returncode == 1


def test_a_policy_without_rules_starts_with_a_warning(setup: Path) -> None:
    text = (setup / "policy.yaml").read_text()
    head = text[: text.index("rules:")]
    (setup / "policy.yaml").write_text(head + "rules: []\n")
    admin = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "extauthz",
            "serve",
            "--policy",
            str(setup / "policy.yaml"),
            "--signing-key",
            str(setup / "key.pem"),
            "--grpc-address",
            "127.0.0.1:0",
            "--admin-address",
            f"127.0.0.1:{admin}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "has no rules" in line:
                break
        assert "every request is denied" in lines[-1], lines
    finally:
        proc.terminate()
        proc.wait(30)


def test_http_front_with_trusted_hops_warns_at_start(tmp_path: Path) -> None:
    """The HTTP front sees only the XFCC element the local Envoy sets, so hops the policy
    trusts cannot vouch for anyone there: serve says so once, at start, and still serves."""
    from extauthz.demo.stack import SidecarProcess

    text = EXAMPLE.read_text(encoding="utf-8")
    hops = "  xfcc: {trustedHops: [spiffe://cluster.local/ns/edge/sa/gateway]}\n"
    policy = tmp_path / "policy.yaml"
    policy.write_text(text.replace("  trustDomains:", hops + "  trustDomains:", 1))
    Idp(ISSUER).write_jwks(tmp_path / "issuers" / "corp-idp.json")
    key = tmp_path / "key.pem"
    write_private_key(generate_signing_key(), key)
    with SidecarProcess(policy, [key], tmp_path / "s", front="http") as sidecar:
        log = sidecar.log.read_text()
    assert "--http-address: the policy names XFCC trusted hops" in log
    plain = tmp_path / "plain"
    with SidecarProcess(EXAMPLE, [key], plain, front="http") as sidecar:
        assert "trusted hops" not in sidecar.log.read_text()
