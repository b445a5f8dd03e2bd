"""Keeping the Snapshot current: hot reload of the policy, signing keys and issuer JWKS.

Kubernetes updates a mounted ConfigMap or Secret by writing a new timestamped directory and
renaming the ``..data`` symlink over to it, so a file's path stays the same while the file it
resolves to changes. We poll: each tick stats every input by its resolved path; when anything
differs we read and compile everything again in a worker thread, off the request path, and
swap the Snapshot in one assignment. A bad update is logged and counted and changes nothing.

Which key signs: key files sorted by path; the last one signs once it has been published (seen
by this process) for ``key_activation_delay`` seconds, the one before it until then. Keys
present when the process starts count as already published. Every loaded key is published.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import pickle
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from extauthz.decision.jose import SigningKey
from extauthz.decision.model import Policy, Snapshot
from extauthz.errors import ExtauthzError, KeyLoadError, PolicyError, Problem
from extauthz.policy.compiler import load_policy
from extauthz.policy.loader import Inputs, assemble, key_files, policy_files, read_inputs
from extauthz.serve import metrics
from extauthz.serve.jwks_remote import RemoteJwks

log = logging.getLogger("extauthz.reload")
FIRST_FETCH_WAIT = 10.0


# Above this size a policy is compiled in a child process: compiling 10,000 rules holds the
# GIL for seconds (long enough for Envoy's check timeout to fire during a reload) and peaks
# near 200 MB that CPython never hands back; the child's pickled result loads in a fraction
# of that time and memory.
ISOLATE_POLICY_BYTES = 256 * 1024


def load_policy_isolated(path: Path) -> Policy:
    try:
        size = sum(file.stat().st_size for file in policy_files(path))
    except OSError:
        size = 0  # the compiler says what is wrong
    if size < ISOLATE_POLICY_BYTES:
        return load_policy(path)
    proc = subprocess.run(
        [sys.executable, "-m", "extauthz.serve.compile_child", str(path)],
        capture_output=True,
        timeout=300,
        check=False,
    )
    if proc.returncode != 0:
        tail = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
        problem = Problem(str(path), "", "", f"the policy compiler process failed: {tail[0]}")
        raise PolicyError([problem])
    # Our own child's pickle of our own types: the policy text never reaches it as code.
    ok, payload = pickle.loads(proc.stdout)  # noqa: S301
    if not ok:
        raise PolicyError(payload)
    return payload  # type: ignore[no-any-return]


def release_memory() -> None:
    """Hand freed heap back to the OS after a reload (glibc keeps it otherwise)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _stat(path: Path) -> tuple[Any, ...]:
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
        return (str(path), real, st.st_ino, st.st_mtime_ns, st.st_size)
    except OSError as exc:
        return (str(path), "missing", exc.errno)


class Runtime:
    """Owns the current Snapshot of a Sidecar and keeps it in step with the files."""

    def __init__(
        self,
        install: Callable[[Snapshot | None], None],
        policy_path: Path,
        key_paths: Sequence[Path],
        *,
        poll_interval: float = 2.0,
        key_activation_delay: float = 60.0,
        clock: Callable[[], float] = time.time,
        dev_key: SigningKey | None = None,
        remote: RemoteJwks | None = None,
    ) -> None:
        self._install = install
        self.policy_path = policy_path
        self.key_paths = list(key_paths)
        self.poll_interval = poll_interval
        self.key_activation_delay = key_activation_delay
        self.clock = clock
        self.dev_key = dev_key
        self.remote = remote or RemoteJwks()
        self.remote.subscribe(self._remote_changed)
        self.loaded: Inputs | None = None
        self.snapshot: Snapshot | None = None
        self.generation = 0
        self.last_error: str | None = None
        self.last_reload: float | None = None
        self._fingerprint: tuple[Any, ...] | None = None
        self._first_seen: dict[str, float] = {}
        self._wake: asyncio.Event | None = None

    # -- reading --

    def _read(self) -> Inputs:
        return read_inputs(
            self.policy_path,
            self.key_paths,
            compile_policy=load_policy_isolated,
            dev_key=self.dev_key,
        )

    def fingerprint(self) -> tuple[Any, ...]:
        watched = [self.policy_path]
        if self.loaded is not None:
            watched += [i.jwks.file for i in self.loaded.policy.issuers.values() if i.jwks.file]
        if self.dev_key is None:
            watched += self.key_paths
            for path in self.key_paths:
                if path.is_dir():
                    watched += key_files([path])
        return tuple(_stat(p) for p in watched)

    def load_initial(self) -> None:
        """Load synchronously before serving; raise (and refuse to start) if anything is bad."""
        self._fingerprint = self.fingerprint()
        loaded = self._read()
        for _path, key in loaded.signing:
            self._first_seen.setdefault(key.kid, float("-inf"))
        self._accept(loaded)
        self._fingerprint = self.fingerprint()

    # -- the loop --

    async def start(self) -> None:
        """Begin fetching URL issuers' keys and wait (bounded) for the first fetch of each, so
        the process does not report SERVING while it could only answer key_unknown."""
        self._wake = asyncio.Event()
        if self.loaded is not None:
            self.remote.configure(self.loaded.policy.issuers.values())
            await self.remote.first_fetch(FIRST_FETCH_WAIT)

    async def run(self, stop: asyncio.Event) -> None:
        if self._wake is None:
            await self.start()
        try:
            while not stop.is_set():
                forced = await self._sleep(stop)
                if stop.is_set():
                    break
                await self.check(force=forced)
        finally:
            await self.remote.close()

    async def _sleep(self, stop: asyncio.Event) -> bool:
        assert self._wake is not None
        waiters = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waiters, timeout=self.poll_interval, return_when="FIRST_COMPLETED")
        finally:
            for waiter in waiters:
                waiter.cancel()
        forced = self._wake.is_set()
        self._wake.clear()
        return forced

    def request_reload(self) -> None:
        """SIGHUP: read everything again now, changed or not."""
        if self._wake is not None:
            self._wake.set()

    async def check(self, *, force: bool = False) -> None:
        fingerprint = await asyncio.to_thread(self.fingerprint)
        if force or fingerprint != self._fingerprint:
            self._fingerprint = fingerprint
            try:
                loaded = await asyncio.to_thread(self._read)
            except ExtauthzError as exc:
                self._failed(exc)
            except Exception as exc:  # noqa: BLE001 - a reload must never end the reload loop
                log.exception("unexpected error while reloading")
                self._failed(KeyLoadError(f"unexpected {type(exc).__name__} while reloading"))
            else:
                now = self.clock()
                for _path, key in loaded.signing:
                    self._first_seen.setdefault(key.kid, now)
                self._accept(loaded)
                # The policy may name other JWKS files now: watch those from here on.
                self._fingerprint = await asyncio.to_thread(self.fingerprint)
        else:
            self._swap()  # a waiting key may have become due to sign

    def _failed(self, exc: ExtauthzError) -> None:
        if isinstance(exc, PolicyError):
            message = f"policy has {len(exc.problems)} problem(s): " + "; ".join(
                str(p) for p in exc.problems[:5]
            )
        else:
            message = str(exc)
        self.last_error = message
        metrics.RELOADS.labels(result="failure").inc()
        log.error("reload failed, keeping generation %d: %s", self.generation, message)

    def _accept(self, loaded: Inputs) -> None:
        if self.loaded is not None and loaded.digest == self.loaded.digest:
            self.last_error = None  # back to the content that loaded: nothing is wrong now
            self._swap()
            return
        self.loaded = loaded
        self.last_error = None
        self.last_reload = self.clock()
        if self.generation > 0:
            metrics.RELOADS.labels(result="success").inc()
        live = {key.kid for _path, key in loaded.signing}
        self._first_seen = {k: v for k, v in self._first_seen.items() if k in live}
        if self._wake is not None:
            self.remote.configure(loaded.policy.issuers.values())
        self._swap()

    def _remote_changed(self) -> None:
        self._swap()

    # -- composing the Snapshot --

    def signing_order(self, loaded: Inputs) -> list[SigningKey]:
        """The active key first, then the rest in path order (all of them are published)."""
        keys = [key for _path, key in loaded.signing]
        now = self.clock()
        due = [
            k for k in keys if self._first_seen.get(k.kid, now) + self.key_activation_delay <= now
        ]
        # If nothing was published long enough (every earlier key was removed at once), sign
        # with the newest rather than not at all.
        active = due[-1] if due else keys[-1]
        return [active, *(k for k in keys if k is not active)]

    def _swap(self) -> None:
        loaded = self.loaded
        if loaded is None:
            return
        order = self.signing_order(loaded)
        issuer_keys = dict(loaded.file_keys)
        for ident, issuer in loaded.policy.issuers.items():
            if issuer.jwks.url is not None and ident in self.remote.keys:
                issuer_keys[ident] = self.remote.keys[ident]
        current = self.snapshot
        if (
            current is not None
            and current.policy is loaded.policy
            and [k.kid for k in current.signing_keys] == [k.kid for k in order]
            and current.issuer_keys == issuer_keys
        ):
            return
        self.generation += 1
        snapshot = replace(assemble(loaded.policy, issuer_keys, order), generation=self.generation)
        self.snapshot = snapshot
        self._install(snapshot)
        if current is None or current.policy is not loaded.policy:
            release_memory()
        metrics.POLICY_GENERATION.set(self.generation)
        metrics.POLICY_RULES.set(len(loaded.policy.rules))
        metrics.set_signing_keys([k.kid for k in order])
        metrics.READY.set(1)
        log.info(
            "generation %d: policy %s (%d rules, sha256 %s), signing kid %s, %d key(s) published",
            self.generation,
            loaded.policy.source,
            len(loaded.policy.rules),
            loaded.policy.digest[:12],
            order[0].kid,
            len(order),
        )
        if not loaded.policy.rules and (current is None or current.policy is not loaded.policy):
            log.warning(
                "the policy %s has no rules: every request is denied (no_rule)",
                loaded.policy.source,
            )

    # -- the admin port's Status --

    def ready(self) -> bool:
        """Whether a policy and a key are loaded."""
        return self.snapshot is not None

    def published_keys(self) -> tuple[SigningKey, ...]:
        """Every key of ours that verifiers should accept (the active one first)."""
        return self.snapshot.signing_keys if self.snapshot is not None else ()

    def status(self) -> dict[str, object]:
        """The status document served at ``/statusz``."""
        snap = self.snapshot
        issuers: dict[str, object] = {}
        if snap is not None:
            for ident, issuer in snap.policy.issuers.items():
                keys = snap.issuer_keys.get(ident)
                issuers[ident] = {
                    "issuer": issuer.issuer,
                    "jwks": str(issuer.jwks),
                    "keys": sorted(keys.by_kid) if keys else [],
                    "last_fetch": self.remote.last_success.get(ident),
                    "last_fetch_error": self.remote.last_error.get(ident),
                }
        return {
            "ready": snap is not None,
            "generation": self.generation,
            "policy": {
                "source": snap.policy.source if snap else str(self.policy_path),
                "sha256": snap.policy.digest if snap else None,
                "rules": len(snap.policy.rules) if snap else 0,
                "shadow": snap.policy.shadow if snap else False,
            },
            "signing_kid": snap.signing_key.kid if snap else None,
            "published_kids": [k.kid for k in snap.signing_keys] if snap else [],
            "issuers": issuers,
            "last_reload": self.last_reload,
            "last_reload_error": self.last_error,
            "pid": os.getpid(),
        }
