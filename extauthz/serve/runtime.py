"""Keeping the Snapshot current: hot reload of the policy, the signing keys and each issuer's JWKS,
each on its own.

Kubernetes updates a mounted ConfigMap or Secret by writing a new timestamped directory and
renaming the ``..data`` symlink over to it, so a file's path stays the same while the file it
resolves to changes. We poll: each tick stats every input by its resolved path; an input whose
files differ is read again in a worker thread, off the request path, and the Snapshot is
swapped in one assignment. The inputs are independent: the policy, the signing keys, and the
JWKS file of each issuer. A bad update of one is logged and counted, keeps that input's last
good content, and never holds back a good update of another (a compromised key removed from
the Secret stops being published while the policy is broken, and the reverse).

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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from extauthz.decision.jose import IssuerKeys, SigningKey
from extauthz.decision.model import Policy, Snapshot
from extauthz.errors import ExtauthzError, KeyLoadError, PolicyError, Problem
from extauthz.policy.compiler import load_policy
from extauthz.policy.loader import (
    assemble,
    key_files,
    load_jwks_file,
    load_signing_key,
    policy_files,
)
from extauthz.serve.jwks_remote import RemoteJwks
from extauthz.serve.metrics import Collector, RuntimeCollector

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


POLICY = ("policy", "")
SIGNING_KEYS = ("signing_keys", "")
Input = tuple[str, str]  # (kind, issuer id): ("policy", ""), ("signing_keys", ""), ("jwks", id)


@dataclass(slots=True)
class InputState:
    """One input's loads so far: the admin port's status and metrics read these."""

    successes: int = 0
    failures: int = 0
    last_success: float | None = None  # wall-clock time of the last successful load
    error: str | None = None  # why the latest load failed; None once one succeeded

    @property
    def ok(self) -> bool:
        return self.error is None and self.successes > 0


@dataclass(frozen=True, slots=True)
class _Read:
    """The outcome of reading one input: its value, or the error that stopped it."""

    what: Input
    value: object = None
    error: ExtauthzError | None = None


def _describe(exc: ExtauthzError) -> str:
    if isinstance(exc, PolicyError):
        return f"policy has {len(exc.problems)} problem(s): " + "; ".join(
            str(p) for p in exc.problems[:5]
        )
    return str(exc)


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
        # The last good content of each input.
        self.policy: Policy | None = None
        self.signing: tuple[tuple[str, SigningKey], ...] | None = None
        self.file_keys: dict[str, IssuerKeys] = {}
        self.inputs: dict[Input, InputState] = {}
        self.snapshot: Snapshot | None = None
        self.generation = 0
        self.last_reload: float | None = None
        self._seen: dict[Input, tuple[Any, ...]] = {}
        self._first_seen: dict[str, float] = {}
        self._wake: asyncio.Event | None = None
        self._served: asyncio.Event | None = None

    # -- what each input is made of, and reading it --

    def _watched(self, what: Input) -> list[Path]:
        kind, ident = what
        if kind == "policy":
            # A directory's files one by one: one edited in place changes no directory mtime.
            return [self.policy_path, *policy_files(self.policy_path)]
        if kind == "signing_keys":
            if self.dev_key is not None:
                return []
            paths = list(self.key_paths)
            for path in self.key_paths:
                if path.is_dir():
                    paths += key_files([path])
            return paths
        assert self.policy is not None
        file = self.policy.issuers[ident].jwks.file
        return [file] if file is not None else []

    def fingerprint(self, what: Input) -> tuple[Any, ...]:
        return tuple(_stat(p) for p in self._watched(what))

    def _load(self, what: Input) -> object:
        kind, ident = what
        if kind == "policy":
            return load_policy_isolated(self.policy_path)
        if kind == "signing_keys":
            if self.dev_key is not None:
                return (("(dev)", self.dev_key),)
            files = key_files(self.key_paths)
            if not files:
                raise KeyLoadError(
                    "no signing key file found in " + ", ".join(map(str, self.key_paths))
                )
            return tuple((str(path), load_signing_key(path)) for path in files)
        assert self.policy is not None
        file = self.policy.issuers[ident].jwks.file
        assert file is not None
        try:
            return load_jwks_file(file)
        except KeyLoadError as exc:
            raise KeyLoadError(f"trusted issuer {ident}: {exc}") from exc

    def _attempt(self, what: Input) -> _Read:
        try:
            return _Read(what, value=self._load(what))
        except ExtauthzError as exc:
            return _Read(what, error=exc)
        except Exception as exc:  # noqa: BLE001 - a reload must never end the reload loop
            log.exception("unexpected error while reading %s", what[0])
            return _Read(what, error=KeyLoadError(f"unexpected {type(exc).__name__}"))

    def _changed(self, what: Input, force: bool) -> bool:
        fingerprint = self.fingerprint(what)
        if not force and self._seen.get(what) == fingerprint:
            return False
        self._seen[what] = fingerprint
        return True

    def _file_issuers(self) -> list[Input]:
        if self.policy is None:
            return []
        return [
            ("jwks", ident)
            for ident, issuer in sorted(self.policy.issuers.items())
            if issuer.jwks.file is not None
        ]

    # -- loading --

    def load_initial(self, *, strict: bool = True) -> None:
        """Load synchronously before serving. ``strict``: raise (and refuse to start) if any
        input is bad; otherwise log it, stay not ready, and let ``run`` keep trying."""
        for read in self._read_changed(force=True):
            if read.error is not None and strict:
                raise read.error  # the caller says why, once
            self._apply(read, first=True)
        for read in self._read_jwks(force=True):
            if read.error is not None and strict:
                raise read.error
            self._apply(read, first=True)
        self._swap()

    def _read_changed(self, force: bool, again: frozenset[Input] = frozenset()) -> list[_Read]:
        """Read the policy and the signing keys if their files changed (or if ``force``, or
        they are in ``again``). Runs in a worker thread."""
        return [
            self._attempt(what)
            for what in (POLICY, SIGNING_KEYS)
            if self._changed(what, force) or what in again
        ]

    def _read_jwks(self, force: bool) -> list[_Read]:
        """Read the JWKS files, of the issuers of the policy as it is now, that changed.
        Runs in a worker thread."""
        return [self._attempt(w) for w in self._file_issuers() if self._changed(w, force)]

    def _apply(self, read: _Read, *, first: bool = False) -> None:
        """Take one input's new content, or count why it could not be taken."""
        state = self.inputs.setdefault(read.what, InputState())
        now = self.clock()
        kind, ident = read.what
        if read.error is not None:
            state.failures += 1
            error, state.error = state.error, _describe(read.error)
            keeping = "keeping the last good one" if self._has(read.what) else "nothing loaded"
            # A retry that fails the same way again is not news.
            level = logging.ERROR if state.error != error else logging.DEBUG
            log.log(level, "%s: load failed, %s: %s", _name(read.what), keeping, state.error)
            return
        state.successes += 1
        state.error = None
        state.last_success = now
        if kind == "policy":
            policy = read.value
            assert isinstance(policy, Policy)
            if self.policy is None or policy.digest != self.policy.digest:
                self.policy = policy
                self.last_reload = now
                self._follow_issuers()
        elif kind == "signing_keys":
            signing = read.value
            assert isinstance(signing, tuple)
            if self.signing is None or _kids(signing) != _kids(self.signing):
                for _path, key in signing:
                    self._first_seen.setdefault(key.kid, float("-inf") if first else now)
                live = {key.kid for _path, key in signing}
                self._first_seen = {k: v for k, v in self._first_seen.items() if k in live}
                self.signing = signing
                self.last_reload = now
        else:
            keys = read.value
            assert isinstance(keys, IssuerKeys)
            if self.file_keys.get(ident) != keys:
                self.file_keys[ident] = keys
                self.last_reload = now

    def _has(self, what: Input) -> bool:
        kind, ident = what
        if kind == "policy":
            return self.policy is not None
        if kind == "signing_keys":
            return self.signing is not None
        return ident in self.file_keys

    def _follow_issuers(self) -> None:
        """A new policy: forget the JWKS files of issuers it no longer has (or whose file
        changed), so they are read afresh, and follow its URL issuers."""
        assert self.policy is not None
        wanted = set(self._file_issuers())
        for what in [w for w in self.inputs if w[0] == "jwks" and w not in wanted]:
            del self.inputs[what]
        for what in [w for w in self._seen if w[0] == "jwks" and w not in wanted]:
            del self._seen[what]
        self.file_keys = {i: k for i, k in self.file_keys.items() if ("jwks", i) in wanted}
        if self._wake is not None:
            self.remote.configure(self.policy.issuers.values())

    # -- the loop --

    async def start(self) -> None:
        """Begin fetching URL issuers' keys and wait (bounded) for the first fetch of each, so
        the process does not report SERVING while it could only answer key_unknown."""
        self._wake = asyncio.Event()
        self._served = asyncio.Event()
        if self.snapshot is not None:
            self._served.set()
        if self.policy is not None:
            self.remote.configure(self.policy.issuers.values())
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

    async def until_ready(self) -> None:
        """Return once a Snapshot is installed (at once if one is); after ``start``."""
        assert self._served is not None
        await self._served.wait()

    def request_reload(self) -> None:
        """SIGHUP: read everything again now, changed or not."""
        if self._wake is not None:
            self._wake.set()

    async def check(self, *, force: bool = False) -> None:
        """One tick: read the inputs that changed, each on its own, and swap if any did. While
        nothing is served, a policy or keys that never loaded are read again every tick."""
        again = frozenset(
            what for what in (POLICY, SIGNING_KEYS) if self.snapshot is None and not self._has(what)
        )
        for read in await asyncio.to_thread(self._read_changed, force, again):
            self._apply(read)
        for read in await asyncio.to_thread(self._read_jwks, force):
            self._apply(read)
        self._swap()  # also: a waiting key may have become due to sign

    @property
    def last_error(self) -> str | None:
        """Why the latest load of each failing input failed, or None if none is failing."""
        errors = [f"{_name(w)}: {s.error}" for w, s in sorted(self.inputs.items()) if s.error]
        return "; ".join(errors) or None

    def _remote_changed(self) -> None:
        self._swap()

    # -- composing the Snapshot --

    def signing_order(self, signing: Sequence[tuple[str, SigningKey]]) -> list[SigningKey]:
        """The active key first, then the rest in path order (all of them are published)."""
        keys = [key for _path, key in signing]
        now = self.clock()
        due = [
            k for k in keys if self._first_seen.get(k.kid, now) + self.key_activation_delay <= now
        ]
        # If nothing was published long enough (every earlier key was removed at once), sign
        # with the newest rather than not at all.
        active = due[-1] if due else keys[-1]
        return [active, *(k for k in keys if k is not active)]

    def _swap(self) -> None:
        policy, signing = self.policy, self.signing
        if policy is None or signing is None:
            return
        order = self.signing_order(signing)
        issuer_keys = dict(self.file_keys)
        for ident, issuer in policy.issuers.items():
            if issuer.jwks.url is not None and ident in self.remote.keys:
                issuer_keys[ident] = self.remote.keys[ident]
        current = self.snapshot
        if (
            current is not None
            and current.policy is policy
            and [k.kid for k in current.signing_keys] == [k.kid for k in order]
            and current.issuer_keys == issuer_keys
        ):
            return
        self.generation += 1
        snapshot = replace(assemble(policy, issuer_keys, order), generation=self.generation)
        self.snapshot = snapshot
        self._install(snapshot)
        if self._served is not None:
            self._served.set()
        if current is None or current.policy is not policy:
            release_memory()
        log.info(
            "generation %d: policy %s (%d rules, sha256 %s), signing kid %s, %d key(s) published",
            self.generation,
            policy.source,
            len(policy.rules),
            policy.digest[:12],
            order[0].kid,
            len(order),
        )
        if not policy.rules and (current is None or current.policy is not policy):
            log.warning(
                "the policy %s has no rules: every request is denied (no_rule)", policy.source
            )

    # -- the admin port's Status --

    def ready(self) -> bool:
        """Whether a policy and a key are loaded."""
        return self.snapshot is not None

    def published_keys(self) -> tuple[SigningKey, ...]:
        """Every key of ours that verifiers should accept (the active one first)."""
        return self.snapshot.signing_keys if self.snapshot is not None else ()

    def collectors(self) -> list[Collector]:
        """What this process adds to ``/metrics``: the state of its inputs and Snapshot."""
        return [RuntimeCollector(self, self.ready)]

    def input_states(self) -> list[tuple[Input, InputState]]:
        """Every input, URL issuers' JWKS included (their fetches are their loads)."""
        out = sorted(self.inputs.items())
        policy = self.policy
        for ident in sorted(policy.issuers if policy is not None else ()):
            if policy is None or policy.issuers[ident].jwks.url is None:
                continue
            fetches = self.remote.fetches
            out.append(
                (
                    ("jwks", ident),
                    InputState(
                        successes=fetches.get((ident, "success"), 0),
                        failures=fetches.get((ident, "failure"), 0),
                        last_success=self.remote.last_success.get(ident),
                        error=self.remote.last_error.get(ident),
                    ),
                )
            )
        return out

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
            "inputs": [
                {
                    "input": kind,
                    "issuer": ident,
                    "ok": state.ok,
                    "last_success": state.last_success,
                    "error": state.error,
                }
                for (kind, ident), state in self.input_states()
            ],
            "last_reload": self.last_reload,
            "last_reload_error": self.last_error,
            "pid": os.getpid(),
        }


def _name(what: Input) -> str:
    kind, ident = what
    return {"policy": "policy", "signing_keys": "signing keys"}.get(kind, f"JWKS of {ident}")


def _kids(signing: Sequence[tuple[str, SigningKey]]) -> list[tuple[str, str]]:
    return [(path, key.kid) for path, key in signing]
