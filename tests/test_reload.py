"""Hot reload of the policy and issuer JWKS: a real ConfigMap-style ``..data`` swap while
requests flow through Envoy (once per front, ids ``grpc`` and ``http``), SIGHUP, readiness,
and issuer key rotation through the file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from opskit import (
    BILLING_RULE,
    QUICK,
    AtomicDir,
    Checker,
    Metrics,
    Slice,
    deny_error,
    http_status,
    statusz,
    wait_for,
    write_atomic,
    write_key,
)

from extauthz.decision.jose import generate_signing_key, jwks_document
from extauthz.demo.envoy import FRONTS
from extauthz.demo.idp import Idp
from extauthz.demo.stack import ISSUER, SidecarProcess, http_get

BROKEN = ("invalid-yaml", "unknown-field")


def broken_policy(policy_text: str, kind: str) -> str:
    """The policy with the billing rule added, made invalid."""
    widened = policy_text + BILLING_RULE
    if kind == "invalid-yaml":
        return widened + "  - id: [unclosed\n"
    return widened.replace(
        "  - id: billing-read-profile\n", "  - id: billing-read-profile\n    colour: red\n"
    )


def configmap_files(policy_text: str, idp: Idp) -> dict[str, str]:
    return {
        "policy.yaml": policy_text,
        "issuers/corp-idp.json": json.dumps(jwks_document([idp.key])),
    }


class Traffic(threading.Thread):
    """Allowed `orders` reads through Envoy, one after another, until told to stop (bounded:
    at most ``limit`` requests or ``seconds``)."""

    def __init__(self, mesh: Slice, idp: Idp, *, limit: int = 400, seconds: float = 20) -> None:
        super().__init__(daemon=True)
        self.mesh, self.idp = mesh, idp
        self.limit, self.seconds = limit, seconds
        self.statuses: list[int] = []
        self.errors: list[str] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        end = time.monotonic() + self.seconds
        while not self.stopped.is_set() and len(self.statuses) < self.limit:
            if time.monotonic() > end:
                break
            token = self.idp.token(now=time.time())
            try:
                self.statuses.append(self.mesh.request("orders", token).status)
            except OSError as exc:
                self.errors.append(repr(exc))
                self.statuses.append(-1)

    def sent(self) -> int:
        return len(self.statuses)

    def finish(self) -> None:
        self.stopped.set()
        self.join(timeout=15)
        assert not self.is_alive()


def billing_status(mesh: Slice, idp: Idp) -> int:
    return mesh.request("billing", idp.token(now=time.time())).status


@pytest.mark.envoy
@pytest.mark.parametrize("front", FRONTS)
def test_configmap_swap_under_load(tmp_path: Path, example_policy_text: str, front: str) -> None:
    idp = Idp(ISSUER)
    cm = AtomicDir(tmp_path / "cm")
    cm.publish(configmap_files(example_policy_text, idp))
    assert (cm.root / "policy.yaml").is_symlink()
    assert os.readlink(cm.root / "..data").startswith("..2026_01_01")
    key = write_key(generate_signing_key(), tmp_path / "signing-key.pem")
    sidecar = SidecarProcess(
        cm.root / "policy.yaml",
        [key],
        tmp_path / "sidecar",
        extra_args=["--poll-interval", "0.2", *QUICK],
        front=front,
    )
    mesh = Slice(tmp_path / "mesh", sidecar)
    assert mesh.front == front
    mesh.start()
    traffic = Traffic(mesh, idp)
    try:
        admin = sidecar.admin_port
        assert billing_status(mesh, idp) == 403
        assert statusz(admin)["generation"] == 1
        traffic.start()
        wait_for(lambda: traffic.sent() >= 5, 10, what="traffic to flow")

        # 1. a good update adds a rule: billing may read within a few poll intervals.
        widened = example_policy_text + BILLING_RULE
        cm.publish(configmap_files(widened, idp))
        swapped_at = traffic.sent()
        wait_for(lambda: billing_status(mesh, idp) == 200, 5, what="billing allowed", interval=0.1)
        wait_for(lambda: traffic.sent() >= swapped_at + 10, 10, what="traffic after the update")
        good = statusz(admin)
        assert good["generation"] >= 2
        assert good["policy"]["rules"] == 4
        assert good["last_reload_error"] is None
        scraped = Metrics.scrape(admin)
        assert scraped.value("extauthz_reloads_total", result="success") >= 1
        failures_before = scraped.value("extauthz_reloads_total", result="failure")

        # 2. a broken update changes nothing, and says so.
        cm.publish(configmap_files(broken_policy(example_policy_text, "unknown-field"), idp))
        broken_at = traffic.sent()
        wait_for(
            lambda: statusz(admin)["last_reload_error"], 5, what="last_reload_error", interval=0.1
        )
        status = subprocess.run(
            [sys.executable, "-m", "extauthz", "status", "--admin-address", f"127.0.0.1:{admin}"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        assert status.returncode == 0, status.stderr
        doc = json.loads(status.stdout)
        assert doc["ready"] is True
        assert "colour" in doc["last_reload_error"]
        assert doc["generation"] == good["generation"]
        assert doc["policy"]["sha256"] == good["policy"]["sha256"]
        scraped = Metrics.scrape(admin)
        assert scraped.value("extauthz_reloads_total", result="failure") > failures_before
        assert scraped.value("extauthz_policy_generation") == good["generation"]
        for _ in range(3):
            assert billing_status(mesh, idp) == 200
        wait_for(lambda: traffic.sent() >= broken_at + 5, 10, what="traffic after the bad update")
        assert statusz(admin)["generation"] == good["generation"]
    finally:
        traffic.finish()
        mesh.stop()

    # Every orders read was allowed under both policies: none failed around either swap.
    assert traffic.errors == []
    assert Counter(traffic.statuses) == {200: traffic.sent()}
    assert swapped_at < broken_at < traffic.sent()


def test_reverting_a_broken_update_clears_the_error(
    tmp_path: Path, example_policy_text: str
) -> None:
    idp = Idp(ISSUER)
    cm = AtomicDir(tmp_path / "cm")
    cm.publish(configmap_files(example_policy_text, idp))
    key = write_key(generate_signing_key(), tmp_path / "signing-key.pem")
    extra = ["--poll-interval", "0.1", *QUICK]
    with SidecarProcess(cm.root / "policy.yaml", [key], tmp_path / "s", extra_args=extra) as sc:
        cm.publish(configmap_files(broken_policy(example_policy_text, "invalid-yaml"), idp))
        wait_for(lambda: statusz(sc.admin_port)["last_reload_error"], 5, what="the error")
        cm.publish(configmap_files(example_policy_text, idp))  # kubectl rollout undo
        wait_for(
            lambda: statusz(sc.admin_port)["last_reload_error"] is None,
            2,
            what="the error to clear once the files are good again",
        )


def test_sighup_reloads_at_once(tmp_path: Path, example_policy_text: str) -> None:
    idp = Idp(ISSUER)
    idp.write_jwks(tmp_path / "issuers" / "corp-idp.json")
    policy = tmp_path / "policy.yaml"
    policy.write_text(example_policy_text)
    key = write_key(generate_signing_key(), tmp_path / "signing-key.pem")
    extra = ["--poll-interval", "60", *QUICK]
    with SidecarProcess(policy, [key], tmp_path / "s", extra_args=extra) as sidecar:
        checker = Checker(sidecar.grpc_port)
        try:
            assert checker.check(idp.token(now=time.time()), workload="billing").status.code == 7
            # Edited in place (same inode), as an operator with a plain file would.
            with policy.open("a") as fh:
                fh.write(BILLING_RULE)
            assert sidecar._proc is not None
            os.kill(sidecar._proc.pid, signal.SIGHUP)
            wait_for(
                lambda: (
                    http_status(checker.check(idp.token(now=time.time()), workload="billing"))
                    == 200
                ),
                3,
                what="SIGHUP to apply the new rule",
                interval=0.1,
            )
            assert statusz(sidecar.admin_port)["policy"]["rules"] == 4
            assert sidecar.running
        finally:
            checker.close()


@pytest.mark.parametrize("broken", BROKEN)
def test_refuses_to_start_with_a_broken_policy(
    tmp_path: Path, example_policy_text: str, broken: str
) -> None:
    Idp(ISSUER).write_jwks(tmp_path / "issuers" / "corp-idp.json")
    bad = tmp_path / "policy.yaml"
    bad.write_text(broken_policy(example_policy_text, broken))
    key = write_key(generate_signing_key(), tmp_path / "signing-key.pem")
    sidecar = SidecarProcess(bad, [key], tmp_path / "s", extra_args=QUICK)
    result = subprocess.run(sidecar.command(), capture_output=True, text=True, timeout=20)
    assert result.returncode == 2
    assert "cannot start" in result.stderr
    assert str(bad) in result.stderr
    assert {"invalid-yaml": "not valid YAML", "unknown-field": "unknown field"}[broken] in (
        result.stderr
    )


def test_ready_once_loaded(tmp_path: Path, example_policy_text: str) -> None:
    Idp(ISSUER).write_jwks(tmp_path / "issuers" / "corp-idp.json")
    policy = tmp_path / "policy.yaml"
    policy.write_text(example_policy_text)
    key = write_key(generate_signing_key(), tmp_path / "signing-key.pem")
    with SidecarProcess(policy, [key], tmp_path / "s", extra_args=QUICK) as sidecar:
        assert http_get(sidecar.admin_port, "/readyz")[0] == 200
        assert http_get(sidecar.admin_port, "/healthz")[0] == 200
        doc = statusz(sidecar.admin_port)
        assert (doc["ready"], doc["generation"], doc["last_reload_error"]) == (True, 1, None)
        assert Metrics.scrape(sidecar.admin_port).value("extauthz_ready") == 1


def test_issuer_key_rotation_through_the_jwks_file(
    tmp_path: Path, example_policy_text: str
) -> None:
    old, new = Idp(ISSUER), Idp(ISSUER)
    jwks_file = old.write_jwks(tmp_path / "issuers" / "corp-idp.json")
    policy = tmp_path / "policy.yaml"
    policy.write_text(example_policy_text)
    key = write_key(generate_signing_key(), tmp_path / "signing-key.pem")
    extra = ["--poll-interval", "0.1", *QUICK]
    with SidecarProcess(policy, [key], tmp_path / "s", extra_args=extra) as sidecar:
        checker = Checker(sidecar.grpc_port)
        try:
            assert http_status(checker.check(old.token(now=time.time()))) == 200
            denied = checker.check(new.token(now=time.time()))
            assert (http_status(denied), deny_error(denied)) == (401, "key_unknown")

            write_atomic(jwks_file, json.dumps(jwks_document([new.key])))
            wait_for(
                lambda: http_status(checker.check(new.token(now=time.time()))) == 200,
                3,
                what="the new issuer key to be accepted",
            )
            gone = checker.check(old.token(now=time.time()))
            assert (http_status(gone), deny_error(gone)) == (401, "key_unknown")
            issuer = statusz(sidecar.admin_port)["issuers"]["corp-idp"]
            assert issuer["keys"] == [new.key.kid]
        finally:
            checker.close()


def test_jwks_file_key_replaced_under_the_same_kid(
    tmp_path: Path, example_policy_text: str
) -> None:
    def issuer() -> Idp:
        # Issuers often name their keys by date rather than by thumbprint.
        key = generate_signing_key()
        kid = "corp-2026-01"
        return Idp(ISSUER, key=replace(key, kid=kid, public_jwk={**key.public_jwk, "kid": kid}))

    def jwks(idp: Idp) -> str:
        return json.dumps(jwks_document([idp.key]))

    def token(idp: Idp) -> str:
        return idp.token(now=time.time())

    old, new = issuer(), issuer()
    jwks_file = tmp_path / "issuers" / "corp-idp.json"
    jwks_file.parent.mkdir()
    jwks_file.write_text(jwks(old))
    policy = tmp_path / "policy.yaml"
    policy.write_text(example_policy_text)
    key = write_key(generate_signing_key(), tmp_path / "signing-key.pem")
    extra = ["--poll-interval", "0.1", *QUICK]
    with SidecarProcess(policy, [key], tmp_path / "s", extra_args=extra) as sidecar:
        checker = Checker(sidecar.grpc_port)
        try:
            assert http_status(checker.check(token(old))) == 200
            write_atomic(jwks_file, jwks(new))
            wait_for(
                lambda: http_status(checker.check(token(new))) == 200,
                2,
                what="the replaced key to be accepted",
            )
        finally:
            checker.close()
