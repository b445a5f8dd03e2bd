"""Issuer JWKS fetched from URLs, in the background, never on the request path.

Each URL issuer has a task that fetches on start, then every ``refresh`` seconds, and sooner
when a request named a kid we do not have (at most once per ``UNKNOWN_KID_INTERVAL``). A failed
fetch keeps the keys we had (stale beats none while the issuer is unreachable) and retries with
backoff. Fetches run in a thread with a timeout and a size cap.

Time comes in from outside: ``RemoteJwks`` takes its clocks and the wait between fetches as
parameters (the real ones by default), so a test can move time on instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from extauthz.decision.jose import MAX_JWKS_BYTES, IssuerKeys, parse_jwks
from extauthz.decision.model import TrustedIssuer
from extauthz.errors import KeyLoadError

log = logging.getLogger("extauthz.jwks")
UNKNOWN_KID_INTERVAL = 5.0  # seconds between refetches triggered by unknown kids
RETRY_MIN = 1.0

Clock = Callable[[], float]
# Returns once ``event`` is set or ``timeout`` seconds have passed, whichever comes first.
Wait = Callable[[asyncio.Event, float], Awaitable[None]]


async def wait_or_timeout(event: asyncio.Event, timeout: float) -> None:
    """The real ``Wait``: the event loop's timer."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout=timeout)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        # A JWKS URL that redirects could be steered elsewhere; issuers publish a stable URL.
        return None


_OPENER = urllib.request.build_opener(_NoRedirects())


def fetch_jwks(url: str, timeout: float, *, monotonic: Clock = time.monotonic) -> IssuerKeys:
    """One fetch. ``timeout`` bounds the whole fetch, not each read: a server trickling bytes
    is cut off at the deadline (give or take one read of at most ``timeout``)."""
    deadline = monotonic() + timeout
    request = urllib.request.Request(  # noqa: S310 - the scheme is checked at policy load
        url, headers={"Accept": "application/json", "User-Agent": "extauthz"}
    )
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            if response.status != 200:
                raise KeyLoadError(f"{url}: HTTP {response.status}")
            chunks: list[bytes] = []
            size = 0
            while size <= MAX_JWKS_BYTES:
                if monotonic() > deadline:
                    raise KeyLoadError(f"{url}: no complete answer within {timeout}s")
                chunk = response.read1(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            data = b"".join(chunks)
    except urllib.error.HTTPError as exc:
        raise KeyLoadError(f"{url}: HTTP {exc.code}") from exc
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise KeyLoadError(f"{url}: {reason}") from exc
    return parse_jwks(data)


@dataclass(frozen=True, slots=True)
class _Source:
    url: str
    refresh: float
    timeout: float


class RemoteJwks:
    """Keeps the keys of every URL issuer fresh and reports each change to its subscribers.

    ``monotonic`` paces the unknown-kid refetches and the first-fetch deadline, ``wall`` stamps
    each success (reported on the admin port) and ``wait`` is the pause between fetches. The
    fetch itself keeps real time: its timeout is the network's.
    """

    def __init__(
        self,
        *,
        monotonic: Clock = time.monotonic,
        wall: Clock = time.time,
        wait: Wait = wait_or_timeout,
    ) -> None:
        self._monotonic = monotonic
        self._wall = wall
        self._wait = wait
        # Set after every fetch attempt, so first_fetch() need not poll.
        self._attempted = asyncio.Event()
        self._subscribers: list[Callable[[], None]] = []
        self.keys: dict[str, IssuerKeys] = {}
        self.last_success: dict[str, float] = {}
        self.last_error: dict[str, str] = {}
        # Fetch attempts by (issuer id, "success" | "failure"), from 0 for every URL issuer.
        self.fetches: dict[tuple[str, str], int] = {}
        self._sources: dict[str, _Source] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._last_forced: dict[str, float] = {}

    def subscribe(self, on_change: Callable[[], None]) -> None:
        """Call ``on_change`` whenever an issuer's keys change."""
        self._subscribers.append(on_change)

    def configure(self, issuers: Iterable[TrustedIssuer]) -> None:
        """Follow the policy: start tasks for new URL issuers, stop removed ones. Keys of an
        issuer whose URL did not change are kept."""
        wanted = {
            i.id: _Source(i.jwks.url, i.jwks.refresh, i.jwks.timeout)
            for i in issuers
            if i.jwks.url is not None
        }
        for ident in list(self._sources):
            new = wanted.get(ident)
            if new == self._sources[ident]:
                continue
            self._tasks.pop(ident).cancel()
            self._wake.pop(ident, None)
            old = self._sources.pop(ident)
            if new is None or new.url != old.url:
                self.keys.pop(ident, None)
                self.last_error.pop(ident, None)
                self.last_success.pop(ident, None)
            if new is None:
                self.fetches.pop((ident, "success"), None)
                self.fetches.pop((ident, "failure"), None)
        for ident, source in wanted.items():
            if ident not in self._sources:
                for result in ("success", "failure"):
                    self.fetches.setdefault((ident, result), 0)
                self._sources[ident] = source
                self._wake[ident] = asyncio.Event()
                self._tasks[ident] = asyncio.create_task(self._run(ident, source))

    async def first_fetch(self, deadline: float) -> None:
        """Wait (up to ``deadline`` seconds) until every URL issuer was tried once."""
        end = self._monotonic() + deadline
        while any(i not in self.keys and i not in self.last_error for i in self._sources):
            left = end - self._monotonic()
            if left <= 0:
                return
            self._attempted.clear()
            await self._wait(self._attempted, left)

    def unknown_kid(self, issuer_id: str) -> None:
        """A request named a key we do not have: fetch again soon, but not for every request."""
        wake = self._wake.get(issuer_id)
        if wake is None:
            return
        now = self._monotonic()
        if now - self._last_forced.get(issuer_id, -1e9) >= UNKNOWN_KID_INTERVAL:
            self._last_forced[issuer_id] = now
            wake.set()

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._sources.clear()

    def _count(self, ident: str, result: str) -> None:
        self.fetches[ident, result] = self.fetches.get((ident, result), 0) + 1

    async def _run(self, ident: str, source: _Source) -> None:
        failures = 0
        while True:
            try:
                try:
                    keys = await asyncio.to_thread(fetch_jwks, source.url, source.timeout)
                except KeyLoadError:
                    raise
                except Exception as exc:  # noqa: BLE001 - the refresh loop must go on
                    raise KeyLoadError(f"unexpected {type(exc).__name__}") from exc
            except KeyLoadError as exc:
                failures += 1
                self.last_error[ident] = str(exc)
                self._count(ident, "failure")
                stale = "keeping the keys we had" if ident in self.keys else "no keys yet"
                log.warning("JWKS fetch for issuer %s failed (%s): %s", ident, stale, exc)
                wait = min(source.refresh, RETRY_MIN * 2 ** min(failures, 8))
            else:
                failures = 0
                self.last_error.pop(ident, None)
                self.last_success[ident] = self._wall()
                self._count(ident, "success")
                if self.keys.get(ident) != keys:
                    self.keys[ident] = keys
                    for on_change in self._subscribers:
                        on_change()
                wait = source.refresh
            self._attempted.set()
            wake = self._wake[ident]
            await self._wait(wake, wait)
            wake.clear()
