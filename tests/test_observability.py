"""Operating the sidecar: inputs that reload on their own (a broken policy never holds back a
key change, nor the reverse), a pod that cannot load its inputs at start waits not ready
instead of crash-looping, and ``--workers`` metrics (per-worker process metrics under a stable
label, no ``pid`` label, a reload counted once, restarts counted).

Real ``extauthz serve`` processes on 127.0.0.1; every wait is a poll with a deadline."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opskit import (
    CHANNEL_OPTIONS,
    QUICK,
    AtomicDir,
    Checker,
    Metrics,
    http_status,
    minted,
    published_jwks,
    statusz,
    wait_for,
    write_key,
    write_policy,
)
from prometheus_client.parser import text_string_to_metric_families
from test_policy_dir import team_dir
from test_workers import start_workers

from extauthz.decision.jose import generate_signing_key, private_key_pem
from extauthz.demo.idp import Idp
from extauthz.demo.stack import ISSUER, SidecarProcess, http_get
from extauthz.serve.runtime import Runtime

POLL = 0.5
FAST = ["--poll-interval", str(POLL), "--key-activation-delay", "0", *QUICK]
# Within one poll interval, plus what a loaded machine adds to a process's tick.
ONE_TICK = POLL + 2.0


def published(admin: int) -> set[str]:
    return {k["kid"] for k in published_jwks(admin)["keys"]}


def input_ok(admin: int, kind: str, issuer: str = "") -> float:
    return Metrics.scrape(admin).value("extauthz_input_ok", input=kind, issuer=issuer)


def test_a_key_removed_while_the_policy_is_broken_stops_signing(
    tmp_path: Path, example_policy_text: str
) -> None:
    policy, idp = write_policy(tmp_path, example_policy_text)
    keep, compromised = generate_signing_key(), generate_signing_key()
    secret = AtomicDir(tmp_path / "keys")
    # b.pem sorts last: at start it is the key that signs.
    secret.publish(
        {"a.pem": private_key_pem(keep), "b.pem": private_key_pem(compromised)}, mode=0o600
    )
    with SidecarProcess(policy, [secret.root], tmp_path / "s", extra_args=FAST) as sidecar:
        admin = sidecar.admin_port
        checker = Checker(sidecar.grpc_port)
        try:
            assert minted(checker.check(idp.token(now=time.time()))).header["kid"] == (
                compromised.kid
            )
            policy.write_text(example_policy_text + "\nbroken: [\n")
            wait_for(lambda: input_ok(admin, "policy") == 0, 10, what="the policy to fail")

            secret.publish({"a.pem": private_key_pem(keep)}, mode=0o600)
            removed = time.monotonic()
            wait_for(lambda: published(admin) == {keep.kid}, ONE_TICK, what="b withdrawn")
            assert time.monotonic() - removed <= ONE_TICK
            for _ in range(5):
                token = minted(checker.check(idp.token(now=time.time())))
                assert token.header["kid"] == keep.kid
            scraped = Metrics.scrape(admin)
            status = statusz(admin)
        finally:
            checker.close()

    # The broken policy is still reported as broken, and the last good one still decides.
    assert scraped.value("extauthz_input_ok", input="policy", issuer="") == 0
    assert scraped.value("extauthz_input_ok", input="signing_keys", issuer="") == 1
    assert scraped.value("extauthz_reloads_total", input="policy", result="failure") >= 1
    assert scraped.value("extauthz_reloads_total", input="signing_keys", result="success") == 2
    assert scraped.value("extauthz_signing_key_info", kid=compromised.kid) == 0
    assert scraped.value("extauthz_signing_key_info", kid=keep.kid, active="true") == 1
    assert scraped.value("extauthz_ready") == 1
    assert "policy" in status["last_reload_error"]
    assert status["published_kids"] == [keep.kid]


def test_a_broken_key_file_never_blocks_a_policy_change(
    tmp_path: Path, example_policy_text: str
) -> None:
    policy, idp = write_policy(tmp_path, example_policy_text)
    key = generate_signing_key()
    secret = AtomicDir(tmp_path / "keys")
    secret.publish({"a.pem": private_key_pem(key)}, mode=0o600)
    with SidecarProcess(policy, [secret.root], tmp_path / "s", extra_args=FAST) as sidecar:
        admin = sidecar.admin_port
        checker = Checker(sidecar.grpc_port)
        try:
            secret.publish({"a.pem": private_key_pem(key), "b.pem": b"not a key"}, mode=0o600)
            wait_for(lambda: input_ok(admin, "signing_keys") == 0, 10, what="the keys to fail")
            before = statusz(admin)["policy"]["rules"]
            # The policy without its rules: orders' allowed request becomes no_rule.
            head = example_policy_text.split("\nrules:\n", 1)[0]
            policy.write_text(head + "\nrules: []\n")
            wait_for(lambda: statusz(admin)["policy"]["rules"] == 0, ONE_TICK, what="new policy")
            response = checker.check(idp.token(now=time.time()))
            status = statusz(admin)
        finally:
            checker.close()
    assert before > 0
    assert http_status(response) == 403
    assert status["published_kids"] == [key.kid]  # the last good keys
    assert "b.pem" in status["last_reload_error"]
    assert status["last_reload_error"].count(";") == 0  # only the keys are failing


def test_retry_at_start_waits_not_ready_and_serves_once_the_inputs_load(
    tmp_path: Path, example_policy_text: str
) -> None:
    policy, idp = write_policy(tmp_path, example_policy_text)
    policy.write_text("exchange: [\n")  # a ConfigMap pushed broken
    keys = tmp_path / "keys"  # a Secret not mounted yet
    sidecar = SidecarProcess(policy, [keys], tmp_path / "s", extra_args=[*FAST, "--retry-at-start"])
    sidecar.workdir.mkdir(parents=True)
    with sidecar.decision_log.open("ab") as out, sidecar.log.open("ab") as err:
        proc = subprocess.Popen(sidecar.command(), stdout=out, stderr=err)
    channel = grpc.insecure_channel(f"127.0.0.1:{sidecar.grpc_port}", options=CHANNEL_OPTIONS)
    try:
        health = health_pb2_grpc.HealthStub(channel)

        def serving() -> int:
            try:
                return int(health.Check(health_pb2.HealthCheckRequest(), timeout=1).status)
            except grpc.RpcError:
                return -1

        wait_for(lambda: serving() == health_pb2.HealthCheckResponse.NOT_SERVING, 15, what="up")
        # Several ticks later it is still running, still not ready, and says why.
        time.sleep(3 * POLL)
        assert proc.poll() is None
        assert http_get(sidecar.admin_port, "/readyz")[0] == 503
        scraped = Metrics.scrape(sidecar.admin_port)
        assert scraped.value("extauthz_ready") == 0
        assert scraped.value("extauthz_input_ok", input="policy") == 0
        assert scraped.value("extauthz_input_ok", input="signing_keys") == 0
        assert scraped.value("extauthz_reloads_total", input="policy", result="failure") >= 2
        checker = Checker(sidecar.grpc_port)
        try:
            refused = checker.check(idp.token(now=time.time()))
            assert http_status(refused) == 503  # not_ready: fail closed

            policy.write_text(example_policy_text)
            keys.mkdir()
            write_key(generate_signing_key(), keys / "a.pem")
            wait_for(lambda: http_get(sidecar.admin_port, "/readyz")[0] == 200, 10, what="ready")
            wait_for(lambda: serving() == health_pb2.HealthCheckResponse.SERVING, 5, what="SERVING")
            assert http_status(checker.check(idp.token(now=time.time()))) == 200
        finally:
            checker.close()
    finally:
        channel.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    log = sidecar.log.read_text()
    # One line per distinct failure, not one per tick.
    assert log.count("policy: load failed") == 1, log


def test_without_retry_at_start_a_broken_policy_still_exits_2(
    tmp_path: Path, example_policy_text: str
) -> None:
    policy, _idp = write_policy(tmp_path, example_policy_text)
    policy.write_text("exchange: [\n")
    key = write_key(generate_signing_key(), tmp_path / "key.pem")
    sidecar = SidecarProcess(policy, [key], tmp_path / "s", extra_args=FAST)
    done = subprocess.run(sidecar.command(), capture_output=True, timeout=30, check=False)
    assert done.returncode == 2
    assert b"Traceback" not in done.stderr


def test_workers_metrics_per_worker_once_per_reload_and_restarts(
    tmp_path: Path, example_policy_text: str
) -> None:
    running = start_workers(tmp_path, example_policy_text, FAST, "grpc")
    policy, sidecar = running.sidecar.policy, running.sidecar
    try:
        admin = sidecar.admin_port
        first = Metrics.scrape(admin)
        labels = {s.labels.get("worker") for s in first.matching("process_cpu_seconds_total")}
        assert labels == {"0", "1", "supervisor"}
        for name in ("process_resident_memory_bytes", "process_start_time_seconds"):
            assert {s.labels["worker"] for s in first.matching(name)} == labels
        assert not [s for s in first.samples if "pid" in s.labels]
        assert first.value("extauthz_worker_up") == 2
        assert first.value("extauthz_reloads_total", input="policy", result="success") == 1

        generation = statusz(admin)["generation"]
        policy.write_text(example_policy_text + "\n# a comment changes the digest\n")
        wait_for(lambda: statusz(admin)["generation"] > generation, 10, what="the reload")
        reloaded = Metrics.scrape(admin)
        # Three processes loaded it; the reload is counted once.
        assert reloaded.value("extauthz_reloads_total", input="policy", result="success") == 2

        (started,) = first.matching("process_start_time_seconds", worker="0")
        os.kill(statusz(admin)["workers"][0]["pid"], signal.SIGKILL)
        wait_for(
            lambda: Metrics.scrape(admin).value("extauthz_worker_restarts_total", worker="0") == 1,
            10,
            what="the restart to be counted",
        )
        wait_for(lambda: statusz(admin)["ready"], 15, what="the worker back")
        after = Metrics.scrape(admin)
    finally:
        sidecar.stop()
    (restarted,) = after.matching("process_start_time_seconds", worker="0")
    assert restarted.value > started.value
    assert after.value("extauthz_worker_restarts_total", worker="1") == 0
    assert {s.labels["worker"] for s in after.matching("process_cpu_seconds_total")} == labels
    assert not [s for s in after.samples if "pid" in s.labels]


# --- in process: a Runtime on real files ----------------------------------------------------


def test_a_broken_jwks_file_keeps_that_issuers_last_keys_and_blocks_nothing_else(
    tmp_path: Path, example_policy_text: str
) -> None:
    policy, idp = write_policy(tmp_path, example_policy_text)
    keys = tmp_path / "keys"
    keys.mkdir()
    first = generate_signing_key()
    write_key(first, keys / "a.pem")
    installed: list[object] = []
    runtime = Runtime(installed.append, policy, [keys], key_activation_delay=0)
    runtime.load_initial()
    good = runtime.snapshot
    assert good is not None
    corp = good.issuer_keys["corp-idp"]

    jwks = tmp_path / "issuers" / "corp-idp.json"
    jwks.write_text("{not json")
    second = generate_signing_key()
    write_key(second, keys / "b.pem")
    policy.write_text(example_policy_text + "\n# changed\n")
    asyncio.run(runtime.check())

    snap = runtime.snapshot
    assert snap is not None
    assert snap.policy.digest != good.policy.digest  # the policy change went through
    assert {k.kid for k in snap.signing_keys} == {first.kid, second.kid}  # and the keys
    assert snap.issuer_keys["corp-idp"] == corp  # the issuer keeps its last good keys
    states = dict(runtime.input_states())
    assert states["jwks", "corp-idp"].ok is False
    assert states["jwks", "corp-idp"].failures == 1
    assert states["policy", ""].ok and states["signing_keys", ""].ok
    assert runtime.last_error is not None and "corp-idp" in runtime.last_error

    idp.write_jwks(jwks)
    asyncio.run(runtime.check())
    assert dict(runtime.input_states())["jwks", "corp-idp"].ok
    assert runtime.last_error is None


def test_strict_start_raises_the_first_broken_input(
    tmp_path: Path, example_policy_text: str
) -> None:
    policy, _idp = write_policy(tmp_path, example_policy_text)
    (tmp_path / "issuers" / "corp-idp.json").write_text("[]")
    (tmp_path / "keys").mkdir()
    write_key(generate_signing_key(), tmp_path / "keys" / "a.pem")
    runtime = Runtime(lambda _s: None, policy, [tmp_path / "keys"])
    with pytest.raises(Exception, match="corp-idp"):
        runtime.load_initial()
    relaxed = Runtime(lambda _s: None, policy, [tmp_path / "keys"])
    relaxed.load_initial(strict=False)
    # Policy and keys loaded: it serves, and the issuer without keys is denied (key_unknown).
    assert relaxed.ready()
    assert relaxed.snapshot is not None and "corp-idp" not in relaxed.snapshot.issuer_keys


def test_every_exported_metric_is_documented(tmp_path: Path, example_policy_text: str) -> None:
    """docs/operations.md's metrics table against a real scrape, both ways, with workers
    (whose scrape has every family the single process has, and the workers' own)."""
    table = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    section = table.split("## Metrics\n", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(extauthz_\w+)` \|", section, re.MULTILINE))
    running = start_workers(tmp_path, example_policy_text, FAST, "grpc")
    try:
        status, body = http_get(running.admin, "/metrics")
    finally:
        running.sidecar.stop()
    assert status == 200
    exported = {
        family.name + ("_total" if family.type == "counter" else "")
        for family in text_string_to_metric_families(body.decode())
        if family.name.startswith("extauthz_")
    }
    assert exported == documented


def test_a_policy_directory_reloads_when_one_file_is_edited_in_place(tmp_path: Path) -> None:
    """The policy input is every file of the directory: rewriting one team's file (same
    inode, so the directory itself does not change) is a reload."""
    policy = team_dir(tmp_path / "policy")
    idp = Idp(ISSUER)
    idp.write_jwks(policy / "issuers" / "corp-idp.json")
    key = write_key(generate_signing_key(), tmp_path / "key.pem")
    with SidecarProcess(policy, [key], tmp_path / "s", extra_args=FAST) as sidecar:
        checker = Checker(sidecar.grpc_port)
        try:
            assert http_status(checker.check(idp.token(now=time.time()))) == 200
            rules = statusz(sidecar.admin_port)["policy"]["rules"]
            with (policy / "orders.yaml").open("r+") as team_file:  # in place
                team_file.truncate(0)
                team_file.write("rules: []\n")
            wait_for(
                lambda: statusz(sidecar.admin_port)["policy"]["rules"] < rules,
                10,
                what="the edited file to reload",
            )
            assert http_status(checker.check(idp.token(now=time.time()))) == 403
        finally:
            checker.close()
