"""Signing keys: rotation while tokens are minted and verified downstream, which key signs at
start, stable kids across restarts, and ``extauthz keys generate``."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from clikit import in_process
from opskit import (
    QUICK,
    AtomicDir,
    Checker,
    minted,
    published_jwks,
    statusz,
    verifies,
    wait_for,
    write_key,
    write_policy,
)

from extauthz.decision.jose import generate_signing_key, private_key_pem, thumbprint
from extauthz.demo.stack import SidecarProcess
from extauthz.policy.loader import load_signing_key


class Verifier(threading.Thread):
    """A downstream service: takes each minted token and verifies it against the sidecar's
    published JWKS, which it caches and fetches again only for a kid it does not know."""

    def __init__(self, checker: Checker, admin_port: int, subject: str) -> None:
        super().__init__(daemon=True)
        self.checker, self.admin_port, self.subject = checker, admin_port, subject
        self.jwks: dict[str, Any] = published_jwks(admin_port)
        self.fetches = 1
        # (monotonic time the Check was sent, kid of the minted token, verified)
        self.seen: list[tuple[float, str, bool]] = []
        self.errors: list[str] = []
        self.stopped = threading.Event()

    def kids(self) -> set[str]:
        return {k["kid"] for k in self.jwks["keys"]}

    def run(self) -> None:
        end = time.monotonic() + 20
        while not self.stopped.is_set() and len(self.seen) < 5000 and time.monotonic() < end:
            sent = time.monotonic()
            try:
                token = minted(self.checker.check(self.subject))
            except Exception as exc:  # noqa: BLE001 - any failure is a finding
                self.errors.append(repr(exc))
                continue
            kid = token.header["kid"]
            if kid not in self.kids():
                self.jwks = published_jwks(self.admin_port)
                self.fetches += 1
            self.seen.append((sent, kid, verifies(token, self.jwks)))
            time.sleep(0.002)

    def count(self) -> int:
        return len(self.seen)

    def finish(self) -> None:
        self.stopped.set()
        self.join(timeout=10)
        assert not self.is_alive()


def test_rotation_without_a_failed_verification(tmp_path: Path, example_policy_text: str) -> None:
    policy, idp = write_policy(tmp_path, example_policy_text)
    old, new = generate_signing_key(), generate_signing_key()
    secret = AtomicDir(tmp_path / "keys")  # a mounted Secret
    secret.publish({"a.pem": private_key_pem(old)}, mode=0o600)
    extra = ["--key-activation-delay", "1", "--poll-interval", "0.2", *QUICK]
    sidecar = SidecarProcess(policy, [secret.root], tmp_path / "s", extra_args=extra)
    sidecar.start()
    checker = Checker(sidecar.grpc_port)
    verifier = Verifier(checker, sidecar.admin_port, idp.token(now=time.time()))
    try:
        admin = sidecar.admin_port
        assert verifier.kids() == {old.kid}
        verifier.start()
        wait_for(lambda: verifier.count() >= 5, 5, what="tokens signed with a")

        secret.publish({"a.pem": private_key_pem(old), "b.pem": private_key_pem(new)}, mode=0o600)
        wait_for(
            lambda: new.kid in {k["kid"] for k in published_jwks(admin)["keys"]},
            3,
            what="b to be published",
            interval=0.02,
        )
        b_published = time.monotonic()
        wait_for(lambda: any(kid == new.kid for _, kid, _ in verifier.seen), 5, what="b to sign")
        switched = verifier.count()
        wait_for(lambda: verifier.count() >= switched + 5, 5, what="more tokens signed with b")

        secret.publish({"b.pem": private_key_pem(new)}, mode=0o600)
        wait_for(
            lambda: {k["kid"] for k in published_jwks(admin)["keys"]} == {new.kid},
            3,
            what="a to be withdrawn",
        )
        removed = verifier.count()
        wait_for(lambda: verifier.count() >= removed + 5, 5, what="tokens after a was removed")
        status = statusz(admin)
    finally:
        verifier.finish()
        checker.close()
        sidecar.stop()

    assert verifier.errors == []
    assert [seen for seen in verifier.seen if not seen[2]] == []
    kids = [kid for _, kid, _ in verifier.seen]
    assert kids[0] == old.kid
    assert kids[-1] == new.kid
    first_b = kids.index(new.kid)
    assert set(kids[:first_b]) == {old.kid}
    assert set(kids[first_b:]) == {new.kid}, "a signed again after b took over"
    # b was published before anything was signed with it, and a kept signing meanwhile.
    first_b_sent = verifier.seen[first_b][0]
    assert b_published < first_b_sent
    assert any(sent > b_published and kid == old.kid for sent, kid, _ in verifier.seen)
    assert status["signing_kid"] == new.kid
    assert status["published_kids"] == [new.kid]
    assert verifier.fetches == 2  # once at start, once on b's first token


def test_keys_present_at_start(tmp_path: Path, example_policy_text: str) -> None:
    policy, idp = write_policy(tmp_path, example_policy_text)
    keys = tmp_path / "keys"
    keys.mkdir()
    older = write_key(generate_signing_key(), keys / "2026-11.pem")
    newer = write_key(generate_signing_key("EdDSA"), keys / "2026-12.pem")
    older_kid, newer_kid = load_signing_key(older).kid, load_signing_key(newer).kid
    # A long activation delay: keys present at start count as published already.
    extra = ["--key-activation-delay", "600", *QUICK]

    def observe(key_args: list[Path], name: str) -> tuple[str, str, list[str]]:
        sidecar = SidecarProcess(policy, key_args, tmp_path / name, extra_args=extra)
        with sidecar:
            checker = Checker(sidecar.grpc_port)
            try:
                token = minted(checker.check(idp.token(now=time.time())))
            finally:
                checker.close()
            jwks = published_jwks(sidecar.admin_port)
            assert verifies(token, jwks)
            for jwk in jwks["keys"]:
                assert jwk["kid"] == thumbprint(jwk)
                assert "d" not in jwk
            status = statusz(sidecar.admin_port)
            assert status["signing_kid"] == token.header["kid"]
            return token.header["kid"], token.header["alg"], sorted(k["kid"] for k in jwks["keys"])

    first = observe([keys], "first")
    assert first == (newer_kid, "EdDSA", sorted([older_kid, newer_kid]))
    # Restarted, and with the files named in the other order: the same kids, the same signer.
    assert observe([newer, older], "second") == first


def test_keys_generate_eddsa(tmp_path: Path, example_policy_text: str) -> None:
    out = tmp_path / "keys" / "signing.pem"
    out.parent.mkdir()
    args = ["keys", "generate", "--alg", "EdDSA", "--out", str(out)]
    # A child process: the mode is the one another process sees on the file it left behind.
    result = subprocess.run(
        [sys.executable, "-m", "extauthz", *args],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    public = json.loads(result.stdout)
    assert "d" not in public
    assert (public["kty"], public["crv"], public["alg"]) == ("OKP", "Ed25519", "EdDSA")
    assert public["kid"] == thumbprint(public) == load_signing_key(out).kid

    pem = out.read_bytes()
    again = in_process(*args)
    assert again.returncode != 0
    assert "refusing to overwrite" in again.stderr
    assert out.read_bytes() == pem

    policy, idp = write_policy(tmp_path, example_policy_text)
    with SidecarProcess(policy, [out], tmp_path / "s", extra_args=QUICK) as sc:
        checker = Checker(sc.grpc_port)
        try:
            token = minted(checker.check(idp.token(now=time.time())))
        finally:
            checker.close()
        assert token.header["alg"] == "EdDSA"
        assert token.header["kid"] == public["kid"]
        assert verifies(token, published_jwks(sc.admin_port))
