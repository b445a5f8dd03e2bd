"""Faults under load, through the real Envoy (issue "Hardening", item 3).

Many callers at once (six workload certificates, six users with different scope sets, valid and
hostile requests) are driven through Envoy from a thread pool while the sidecar is restarted,
its signing key rotated, its policy swapped ConfigMap-style and its issuer's JWKS server taken
down. The upstream records every header line of every request it receives, with the arrival
time, and the test then checks everything it received against the test's own table of what the
policy allows:

- only minted tokens reach the upstream (one ``authorization``, our issuer, ``at+jwt``,
  verified with the JWKS the sidecar published), never a subject token;
- each minted token belongs to the request that carried its subject token (joined by
  ``x-test-id``): the same ``sub``, the caller's SPIFFE ID and certificate thumbprint, the
  request's method, host and path, the rule's audience and exactly the scopes that rule grants
  to that subject; every ``jti`` is unique;
- no request the policy denies was allowed, and an allowed request failed only while the sidecar
  was down; nothing sent while it was down reached the upstream.

Each scenario runs once per front (ids ``grpc`` and ``http``): Envoy checking over ext_authz
gRPC (envoy.yaml) or over its HTTP authorization service (envoy-http.yaml), with the same
checks. Every loop is bounded in requests and in time; everything runs on 127.0.0.1.
"""

from __future__ import annotations

import http.client
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import corekit as k
import pytest
from opskit import (
    QUICK,
    AtomicDir,
    JwksServer,
    Metrics,
    Slice,
    published_jwks,
    statusz,
    verifies,
    wait_for,
    write_key,
)

from extauthz.decision.jose import CompactJWS, generate_signing_key, parse_compact
from extauthz.demo.echo import EchoServer
from extauthz.demo.envoy import FRONTS
from extauthz.demo.idp import Idp
from extauthz.demo.pki import Pki, make_pki, x5t_s256
from extauthz.demo.stack import ISSUER, SidecarProcess, https_request, mtls_context

MARK = "x-test-id"

pytestmark = pytest.mark.envoy
EXCHANGE_ISSUER = "https://exchange.shop.svc"
SUBJECT_AUDIENCE = "https://shop.example.com"
PROFILE = "profile.shop.svc.cluster.local"
PAYMENTS = "payments.shop.svc.cluster.local"
REPORTS = "reports.shop.svc.cluster.local"
ACTIVATION_DELAY = 1.0
SIDECAR_ARGS = [
    "--poll-interval",
    "0.2",
    "--key-activation-delay",
    str(ACTIVATION_DELAY),
    *QUICK,
]

# Six workload identities. `intruder` has a certificate from the mesh CA (Envoy accepts it),
# with the path of `reports` but another trust domain.
WORKLOADS = {
    "orders": "spiffe://cluster.local/ns/shop/sa/orders",
    "checkout": "spiffe://cluster.local/ns/shop/sa/checkout",
    "billing": "spiffe://cluster.local/ns/shop/sa/billing",
    "reports": "spiffe://cluster.local/ns/analytics/sa/reports",
    "search": "spiffe://cluster.local/ns/shop/sa/search",
    "intruder": "spiffe://evil.example/ns/analytics/sa/reports",
}

# Users: distinct subjects and scope sets; dave and erin lack what most rules require.
USERS = {
    "alice": frozenset({"profile.read", "email", "orders.read"}),
    "bob": frozenset({"payments.charge", "profile.read"}),
    "carol": frozenset({"reports.read", "reports.export", "invoices.read"}),
    "dave": frozenset({"orders.read"}),
    "erin": frozenset({"email", "profile.write", "invoices.read"}),
    "frank": frozenset(
        {"profile.read", "payments.charge", "reports.read", "invoices.read", "email"}
    ),
}

USER_WEIGHTS = {"alice": 2, "bob": 2, "carol": 2, "dave": 1, "erin": 1, "frank": 3}

# --- the test's own table of what the policy allows ------------------------------------------


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    callers: frozenset[str]  # workload names
    method: str
    host: str
    kind: str  # the endpoint kind (below) whose paths the rule's template matches
    require: frozenset[str]
    grant: frozenset[str]
    audience: str
    ttl: int
    yaml: str


def _rule(
    id: str,
    callers: set[str],
    method: str,
    host: str,
    kind: str,
    require: set[str],
    grant: set[str],
    audience: str,
    ttl: int,
    *,
    workloads: str,
    path: str,
) -> Rule:
    yaml = f"""
  - id: {id}
    purpose: {id} (fault tests)
    match:
      workloads: [{workloads}]
      host: {host}
      methods: [{method}]
      paths: ["{path}"]
      issuers: [corp-idp]
    require: {{scopes: [{", ".join(sorted(require))}]}}
    grant:
      audience: {audience}
      scopes: [{", ".join(sorted(grant))}]
      ttl: {ttl}s
"""
    return Rule(
        id,
        frozenset(callers),
        method,
        host,
        kind,
        frozenset(require),
        frozenset(grant),
        audience,
        ttl,
        yaml,
    )


ORDERS_READ = _rule(
    "orders-read-profile",
    {"orders"},
    "GET",
    PROFILE,
    "profile",
    {"profile.read"},
    {"profile.read", "email"},
    "spiffe://cluster.local/ns/shop/sa/profile",
    30,
    workloads=WORKLOADS["orders"],
    path="/v1/customers/{id}",
)
CHECKOUT_CHARGE = _rule(
    "checkout-charge",
    {"checkout"},
    "POST",
    PAYMENTS,
    "charge",
    {"payments.charge"},
    {"payments.charge"},
    "spiffe://cluster.local/ns/shop/sa/payments",
    15,
    workloads=WORKLOADS["checkout"],
    path="/v1/charges",
)
BILLING_INVOICES = _rule(
    "billing-invoices",
    {"billing"},
    "GET",
    PROFILE,
    "invoices",
    {"invoices.read"},
    {"invoices.read", "profile.read"},
    "spiffe://cluster.local/ns/shop/sa/profile",
    20,
    workloads=WORKLOADS["billing"],
    path="/v1/customers/{id}/invoices",
)
ANALYTICS_REPORTS = _rule(
    "analytics-reports",
    {"reports"},  # the pattern below; `intruder` is in another trust domain
    "GET",
    REPORTS,
    "report",
    {"reports.read"},
    {"reports.read", "reports.export"},
    "spiffe://cluster.local/ns/analytics/sa/reporting",
    60,
    workloads="spiffe://cluster.local/ns/analytics/sa/*",
    path="/v1/reports/**",
)
SEARCH_READ = _rule(
    "search-read-profile",
    {"search"},
    "GET",
    PROFILE,
    "profile",
    {"profile.read"},
    {"profile.read"},
    "spiffe://cluster.local/ns/shop/sa/profile",
    10,
    workloads=WORKLOADS["search"],
    path="/v1/customers/{id}",
)

# The policy before and after the reload: the reload drops the analytics rule (narrowing) and
# lets search read profiles (widening).
V1 = (ORDERS_READ, CHECKOUT_CHARGE, BILLING_INVOICES, ANALYTICS_REPORTS)
V2 = (ORDERS_READ, CHECKOUT_CHARGE, BILLING_INVOICES, SEARCH_READ)


def policy_text(rules: Sequence[Rule], jwks: str) -> str:
    return f"""apiVersion: extauthz/v1
kind: ExchangePolicy
exchange:
  issuer: {EXCHANGE_ISSUER}
  tokenType: access_token
  maxTtl: 300s
trustedIssuers:
  - id: corp-idp
    issuer: {ISSUER}
    jwks: {jwks}
    audiences: [{SUBJECT_AUDIENCE}]
    algorithms: [ES256]
workloads:
  trustDomains: [cluster.local]
rules:""" + "".join(r.yaml for r in rules)


# Variants of a request. The first three carry a valid subject token (the policy decides);
# the others are refused whatever the policy says.
VARIANTS = {
    "fresh": 40,  # a token signed for this request
    "cached": 25,  # the user's long-lived token, reused (subject cache)
    "smuggle": 10,  # plus copies of the token in other credential headers
    "none": 5,  # no authorization header
    "tampered": 7,  # valid signature, for other content
    "expired": 6,
    "double": 7,  # two authorization headers
}
VALID_VARIANTS = {"fresh", "cached", "smuggle"}

# (workload, endpoint kind). Pairs a rule names appear four times, so about two thirds of the
# requests are for a rule; the others are requests no rule covers.
INTENTS = [
    *[("orders", "profile")] * 4,
    *[("checkout", "charge")] * 4,
    *[("billing", "invoices")] * 4,
    *[("reports", "report")] * 4,
    *[("search", "profile")] * 4,
    ("billing", "profile"),
    ("orders", "charge"),
    ("checkout", "profile"),
    ("search", "invoices"),
    ("intruder", "report"),
    ("intruder", "profile"),
    ("orders", "address"),
    ("orders", "profile-put"),
    ("reports", "profile"),
    ("orders", "profile-other-host"),
]


def expected(
    rules: Sequence[Rule], workload: str, method: str, host: str, kind: str, user: str
) -> tuple[Rule, frozenset[str]] | None:
    """The rule and minted scopes the table allows for a valid token, or None (deny)."""
    for rule in rules:
        if (workload in rule.callers and rule.method == method) and (
            rule.host == host and rule.kind == kind
        ):
            scopes = USERS[user]
            granted = scopes & rule.grant
            if rule.require <= scopes and granted:
                return rule, granted
            return None
    return None


# --- the slice: the echo upstream (it keeps raw header lines and arrival times), the sidecar
# and Envoy ------------------------------------------------------------------------------------


def mesh_slice(workdir: Path, pki: Pki, policy: Path, keys: Sequence[Path], front: str) -> Slice:
    sidecar = SidecarProcess(
        policy, keys, workdir / "sidecar", extra_args=SIDECAR_ARGS, front=front
    )
    return Slice(workdir, sidecar, pki=pki)


# --- the load: many callers, each request tagged -------------------------------------------


@dataclass(slots=True)
class Sent:
    id: str
    source: str  # "load" or "probe" (sent by the scenario itself)
    workload: str
    user: str
    variant: str
    kind: str
    method: str
    host: str
    path: str  # as sent
    upstream_path: str  # as Envoy forwards it: normalised, query kept
    norm: str  # normalised, without query: the minted req.path
    headers: list[tuple[str, str]]
    tokens: tuple[str, ...]  # every subject token the request carried
    subject: Mapping[str, Any] | None  # claims of its subject token, when that one is valid
    t_send: float = 0.0
    t_done: float = 0.0
    status: int = 0
    error: str | None = None


def endpoint(kind: str, n: int, shape: int) -> tuple[str, str, str, str, str]:
    """(method, host, path as sent, path as forwarded, normalised path without query)."""
    customer = f"/v1/customers/{n}"
    if kind in ("profile", "profile-put", "profile-other-host"):
        method = "PUT" if kind == "profile-put" else "GET"
        host = PAYMENTS if kind == "profile-other-host" else PROFILE
        if shape == 1:
            return method, host, f"{customer}?trace={n}", f"{customer}?trace={n}", customer
        if shape == 2:  # Envoy resolves the dot segment before the check
            return method, host, f"/v1/customers/x/../{n}", customer, customer
        return method, host, customer, customer, customer
    if kind == "charge":  # one path for every charge: the query tells them apart upstream
        path = f"/v1/charges?order={n}"
        return "POST", PAYMENTS, path, path, "/v1/charges"
    path = {
        "invoices": f"{customer}/invoices",
        "address": f"{customer}/address",
        "report": f"/v1/reports/2026/{n}",
    }[kind]
    host = REPORTS if kind == "report" else PROFILE
    return "GET", host, path, path, path


class Load:
    """``threads`` callers sending requests drawn from INTENTS x USERS x VARIANTS until told to
    stop, at most ``limit`` requests and ``seconds`` seconds, pausing ``pace`` between two."""

    def __init__(
        self,
        stack: Slice,
        idp: Idp,
        *,
        seed: int,
        threads: int = 8,
        limit: int = 1500,
        seconds: float = 30.0,
        pace: float = 0.08,
    ) -> None:
        self.stack, self.idp, self.seed = stack, idp, seed
        self.threads, self.limit, self.seconds, self.pace = threads, limit, seconds, pace
        self.stranger = Idp(ISSUER)  # same iss, a key the issuer never published
        self.contexts = {
            name: mtls_context(stack.pki.ca, pair) for name, pair in stack.pki.workloads.items()
        }
        now = time.time()
        self.cached = {
            user: idp.token(sub=user, scope=" ".join(sorted(scopes)), now=now, ttl=3600)
            for user, scopes in USERS.items()
        }
        self.sent: list[Sent] = []
        self._lock = threading.Lock()
        self._next = 0
        self._probes = 0
        self._stop = threading.Event()
        self._pool: ThreadPoolExecutor | None = None
        self._futures: list[Future[None]] = []
        self._deadline = 0.0

    # -- building requests --

    def make(
        self, workload: str, kind: str, user: str, variant: str, *, n: int, shape: int, source: str
    ) -> Sent:
        scope = " ".join(sorted(USERS[user]))

        def fresh(sub: str = user, ttl: int = 600, idp: Idp = self.idp) -> str:
            return idp.token(sub=sub, scope=scope, now=time.time(), ttl=ttl)

        if variant == "cached":
            tokens: tuple[str, ...] = (self.cached[user],)
        elif variant in ("fresh", "smuggle"):
            tokens = (fresh(),)
        elif variant == "expired":
            tokens = (fresh(ttl=-600),)
        elif variant == "tampered":
            one, other = fresh(), fresh(sub="mallory")
            tokens = (one.rsplit(".", 1)[0] + "." + other.rsplit(".", 1)[1],)
        elif variant == "double":
            tokens = (fresh(), fresh())
        elif variant == "stranger":
            tokens = (fresh(idp=self.stranger),)
        else:
            assert variant == "none"
            tokens = ()
        ident = f"{self.seed}-{n}-{uuid.uuid4().hex[:12]}"
        headers = [(MARK, ident), *(("authorization", f"Bearer {t}") for t in tokens)]
        if variant == "smuggle":
            headers += [("x-forwarded-access-token", tokens[0])]
            headers += [("proxy-authorization", f"Bearer {tokens[0]}")]
        method, host, path, upstream_path, norm = endpoint(kind, n, shape)
        subject = parse_compact(tokens[0]).claims if variant in VALID_VARIANTS else None
        return Sent(
            ident,
            source,
            workload,
            user,
            variant,
            kind,
            method,
            host,
            path,
            upstream_path,
            norm,
            headers,
            tokens,
            subject,
        )

    def plan(self, n: int) -> Sent:
        rng = random.Random(f"{self.seed}:{n}")  # noqa: S311 - a reproducible load
        workload, kind = rng.choice(INTENTS)
        user = rng.choices(list(USER_WEIGHTS), weights=list(USER_WEIGHTS.values()))[0]
        variant = rng.choices(list(VARIANTS), weights=list(VARIANTS.values()))[0]
        return self.make(workload, kind, user, variant, n=n, shape=rng.randrange(3), source="load")

    # -- sending --

    def send(self, sent: Sent) -> Sent:
        body = b'{"amount": 1}' if sent.method in ("POST", "PUT") else None
        ctx = self.contexts[sent.workload]
        sent.t_send = time.monotonic()
        try:
            sent.status = https_request(
                self.stack.listen_port,
                ctx,
                method=sent.method,
                path=sent.path,
                host=sent.host,
                headers=sent.headers,
                body=body,
                timeout=5,
            ).status
        except (OSError, http.client.HTTPException) as exc:
            sent.status, sent.error = -1, repr(exc)
        sent.t_done = time.monotonic()
        with self._lock:
            self.sent.append(sent)
        return sent

    def probe(
        self,
        workload: str = "orders",
        kind: str = "profile",
        user: str = "alice",
        variant: str = "fresh",
    ) -> Sent:
        """One request from the scenario itself, recorded and checked like the others."""
        with self._lock:
            self._probes += 1
            n = 1_000_000 + self._probes
        return self.send(self.make(workload, kind, user, variant, n=n, shape=0, source="probe"))

    def _take(self) -> int | None:
        with self._lock:
            if self._next >= self.limit:
                return None
            self._next += 1
            return self._next

    def _worker(self) -> None:
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            n = self._take()
            if n is None:
                return
            self.send(self.plan(n))
            self._stop.wait(self.pace)

    def start(self) -> None:
        self._deadline = time.monotonic() + self.seconds
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="caller")
        self._futures = [self._pool.submit(self._worker) for _ in range(self.threads)]

    def finish(self) -> None:
        """Stop the callers and wait for them (each request has a 5 s timeout)."""
        self._stop.set()
        if self._pool is None:
            return
        pool, self._pool = self._pool, None
        for future in self._futures:
            future.result(timeout=30)  # re-raises a caller's unexpected exception
        pool.shutdown(wait=True)

    # -- progress --

    def done_since(self, since: float) -> int:
        with self._lock:
            return sum(1 for s in self.sent if s.t_send >= since)

    def wait_more(self, count: int, *, at_least: float = 0.0, timeout: float = 15.0) -> None:
        since = time.monotonic()
        wait_for(
            lambda: self.done_since(since) >= count and time.monotonic() - since >= at_least,
            timeout,
            what=f"{count} more requests",
        )

    def records(self) -> list[Sent]:
        with self._lock:
            return list(self.sent)


# --- checking everything the upstream received ------------------------------------------------


@dataclass
class Timeline:
    """What the test did when. ``versions`` gives the policies that may have decided a request
    (one, or both around a reload); in ``outages`` the sidecar was unavailable, so an allowed
    request in flight then may have failed; in ``down`` no sidecar process existed at all."""

    versions: Callable[[Sent], list[Sequence[Rule]]]
    outages: list[tuple[float, float]]
    down: list[tuple[float, float]]


@dataclass
class Report:
    minted: list[tuple[Sent, CompactJWS]]
    counts: Counter[str]
    statuses: Counter[int]
    by_rule: Counter[str]
    problems: list[str]


def _pieces(text: str) -> set[str]:
    out: set[str] = set()
    for part in text.replace(",", " ").split():
        out.update(part.split("."))
    return out


def union_jwks(documents: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    keys: dict[str, Any] = {}
    for document in documents:
        for jwk in document["keys"]:
            keys[jwk["kid"]] = jwk
    return {"keys": list(keys.values())}


def overlaps(sent: Sent, windows: Sequence[tuple[float, float]]) -> bool:
    return any(sent.t_send <= end and sent.t_done >= start for start, end in windows)


def in_window(t: float, windows: Sequence[tuple[float, float]], margin: float = 0.0) -> bool:
    return any(start + margin <= t <= end for start, end in windows)


def check_minted(
    sent: Sent, jws: CompactJWS, jwks: Mapping[str, Any], thumbs: Mapping[str, str], t: Timeline
) -> list[str]:
    where = f"{sent.id} ({sent.workload} {sent.method} {sent.host}{sent.path} {sent.user})"
    claims, problems = jws.claims, []
    if jws.header.get("typ") != "at+jwt" or claims.get("iss") != EXCHANGE_ISSUER:
        problems.append(f"{where}: not a minted token: {jws.header} iss={claims.get('iss')}")
    if not verifies(jws, jwks):
        problems.append(f"{where}: minted token does not verify with the published JWKS")
    if sent.subject is None:
        return [*problems, f"{where}: {sent.variant} request reached the upstream"]
    caller = WORKLOADS[sent.workload]
    want = {
        "sub": sent.subject["sub"],
        "client_id": caller,
        "act": {"sub": caller},
        "authorization_details": [
            {"type": "http_request", "method": sent.method, "host": sent.host, "path": sent.norm}
        ],
        "cnf": {"x5t#S256": thumbs[sent.workload]},
    }
    for name, value in want.items():
        if claims.get(name) != value:
            problems.append(f"{where}: {name} is {claims.get(name)!r}, not {value!r}")
    names = k.MINTED_KEYS
    if set(claims) != names:
        problems.append(f"{where}: claims {sorted(claims)}")
    scopes = set(str(claims.get("scope", "")).split())
    if not scopes or not scopes <= set(sent.subject["scope"].split()):
        problems.append(f"{where}: scope {claims.get('scope')!r} not within the subject's")
    options = [
        e
        for rules in t.versions(sent)
        if (e := expected(rules, sent.workload, sent.method, sent.host, sent.kind, sent.user))
    ]
    if not options:
        problems.append(f"{where}: allowed, but the policy denies it")
    elif not any(
        claims.get("aud") == rule.audience
        and scopes == granted
        and claims.get("exp") == min(sent.subject["exp"], claims.get("iat", 0) + rule.ttl)
        for rule, granted in options
    ):
        problems.append(f"{where}: aud/scope/exp {claims} match no allowing rule {options}")
    return problems


def check_run(
    load: Load, upstream: EchoServer, jwks_documents: Sequence[Mapping[str, Any]], t: Timeline
) -> Report:
    problems: list[str] = []
    sent = load.records()
    by_id = {s.id: s for s in sent}
    assert len(by_id) == len(sent)
    jwks = union_jwks(jwks_documents)
    thumbs = {
        name: x5t_s256(pair.cert.read_bytes()) for name, pair in load.stack.pki.workloads.items()
    }
    # Every part (header, payload, signature) of every subject token sent during the run.
    subject_parts = {part for s in sent for token in s.tokens for part in token.split(".")}

    reached: dict[str, float] = {}
    minted: list[tuple[Sent, CompactJWS]] = []
    jtis: Counter[str] = Counter()
    for received in upstream.requests:
        arrived = received.at
        if in_window(arrived, t.down, margin=0.25):
            problems.append(
                f"the upstream received a request while the sidecar was down: {received.path}"
            )
        marks = received.values(MARK)
        if len(marks) != 1 or marks[0] not in by_id:
            problems.append(f"upstream request with {MARK} {marks}: not one of ours")
            continue
        if marks[0] in reached:
            problems.append(f"{marks[0]} reached the upstream twice")
            continue
        reached[marks[0]] = arrived
        s = by_id[marks[0]]
        leaked = [name for name, value in received.raw_headers if _pieces(value) & subject_parts]
        if leaked:
            problems.append(f"{s.id}: a subject token reached the upstream in {leaked}")
        for name in ("x-forwarded-access-token", "proxy-authorization"):
            if received.values(name):
                problems.append(f"{s.id}: {name} reached the upstream")
        answer = [
            n for n, _ in received.raw_headers if n.startswith(("x-extauthz", "x-envoy-auth"))
        ]
        if answer:
            problems.append(f"{s.id}: the check's answer headers {answer} reached the upstream")
        if (received.method, received.path) != (s.method, s.upstream_path):
            problems.append(f"{s.id}: upstream saw {received.method} {received.path}")
        authorization = received.values("authorization")
        if len(authorization) != 1 or not authorization[0].startswith("Bearer "):
            problems.append(f"{s.id}: {len(authorization)} authorization header(s) upstream")
            continue
        try:
            jws = parse_compact(authorization[0].removeprefix("Bearer "))
        except Exception as exc:  # noqa: BLE001 - any failure is a finding
            problems.append(f"{s.id}: upstream authorization is not a JWS: {exc!r}")
            continue
        problems += check_minted(s, jws, jwks, thumbs, t)
        jtis[str(jws.claims.get("jti"))] += 1
        minted.append((s, jws))
    problems += [f"jti {jti} minted {n} times" for jti, n in jtis.items() if n > 1]

    counts: Counter[str] = Counter()
    by_rule: Counter[str] = Counter()
    statuses = Counter(s.status for s in sent)
    for s in sent:
        ok = 200 <= s.status < 300
        decided = [
            expected(rules, s.workload, s.method, s.host, s.kind, s.user)
            if s.variant in VALID_VARIANTS
            else None
            for rules in t.versions(s)
        ]
        allow_everywhere = all(decided)
        counts["sent"] += 1
        counts[s.source] += 1
        counts["allowed" if ok else "denied"] += 1
        counts["expected-allow" if allow_everywhere else "expected-deny"] += 1
        counts["client-errors"] += s.error is not None
        if ok and decided[-1]:
            by_rule[decided[-1][0].id] += 1
        if ok != (s.id in reached):
            problems.append(
                f"{s.id}: status {s.status} but reached the upstream: {s.id in reached}"
            )
        if ok and not any(decided):
            problems.append(f"{s.id}: {s.status} for {s.variant} {s.workload} {s.kind} {s.user}")
        if overlaps(s, t.outages):
            counts["during-outage"] += 1
        elif allow_everywhere and not ok:
            problems.append(
                f"{s.id}: allowed by the policy but got {s.status} {s.error or ''} "
                f"({s.workload} {s.kind} {s.user} {s.variant}) outside any outage"
            )
        if in_window(s.t_send, t.down):
            counts["sent-while-down"] += 1
            if ok or s.id in reached:
                problems.append(
                    f"{s.id}: sent while the sidecar was down, yet reached the upstream"
                )
    return Report(minted, counts, statuses, by_rule, problems)


def assert_clean(report: Report) -> None:
    if report.problems:
        shown = "\n".join(report.problems[:25])
        pytest.fail(f"{len(report.problems)} problem(s):\n{shown}", pytrace=False)


def kids(document: Mapping[str, Any]) -> set[str]:
    return {jwk["kid"] for jwk in document["keys"]}


def summary(name: str, report: Report, started: float) -> None:
    print(  # shown with -s or -rA: the figures of the run
        f"\n{name}: {dict(report.counts)} statuses={dict(report.statuses)} "
        f"minted={len(report.minted)} by_rule={dict(report.by_rule)} "
        f"{time.monotonic() - started:.1f}s"
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("faults-pki"), WORKLOADS)


@pytest.fixture(scope="module", params=FRONTS)
def front(request: pytest.FixtureRequest) -> str:
    """How Envoy asks the sidecar: ext_authz over gRPC or over HTTP."""
    name: str = request.param
    return name


# --- the tests -------------------------------------------------------------------------------


def test_faults_under_load_with_restart_and_rotation(tmp_path: Path, pki: Pki, front: str) -> None:
    began = time.monotonic()
    idp = Idp(ISSUER)
    idp.write_jwks(tmp_path / "config" / "issuers" / "corp-idp.json")
    policy = tmp_path / "config" / "policy.yaml"
    policy.write_text(policy_text(V1, "{file: issuers/corp-idp.json}"))
    keys = tmp_path / "keys"
    keys.mkdir()
    old, new = generate_signing_key(), generate_signing_key()
    write_key(old, keys / "a-2026-11.pem")
    stack = mesh_slice(tmp_path / "stack", pki, policy, [keys], front)
    load = Load(stack, idp, seed=1)
    admin = stack.sidecar.admin_port
    documents: list[dict[str, Any]] = []
    stack.start()
    try:
        documents.append(published_jwks(admin))
        assert kids(documents[0]) == {old.kid}
        load.start()
        load.wait_more(100)

        # 1. Signing-key rotation: a key file that sorts last is added to the directory.
        added = time.monotonic()
        write_key(new, keys / "b-2026-12.pem")
        wait_for(lambda: new.kid in kids(published_jwks(admin)), 5, what="b to be published")
        documents.append(published_jwks(admin))
        wait_for(lambda: statusz(admin)["signing_kid"] == new.kid, 5, what="b to sign")
        load.wait_more(100)

        # 2. The sidecar goes away and comes back on the same ports.
        stopping = time.monotonic()
        stack.sidecar.stop()
        exited = time.monotonic()
        load.wait_more(30, at_least=0.7)
        restarting = time.monotonic()
        stack.sidecar.start()
        documents.append(published_jwks(admin))

        def allowed_again() -> Sent | None:
            probe = load.probe()
            return probe if probe.status == 200 else None

        again = wait_for(allowed_again, 10, what="Envoy to allow again", interval=0.1)
        assert again is not None
        back = again.t_done
        load.wait_more(150)
        load.finish()
        documents.append(published_jwks(admin))
        ext_authz_errors = stack.envoy.stat("http.ingress.ext_authz.error") if stack.envoy else 0
    finally:
        load.finish()
        stack.stop()

    timeline = Timeline(
        versions=lambda s: [V1], outages=[(stopping, back)], down=[(exited, restarting)]
    )
    report = check_run(load, stack.echo, documents, timeline)
    summary(f"restart+rotation[{front}]", report, began)
    assert_clean(report)

    assert kids(documents[-1]) == {old.kid, new.kid}
    assert report.counts["sent-while-down"] >= 10
    down = [s for s in load.records() if in_window(s.t_send, timeline.down)]
    assert 503 in Counter(s.status for s in down), Counter(s.status for s in down)
    assert ext_authz_errors >= 1
    assert set(report.by_rule) == {r.id for r in V1}, report.by_rule

    # Which key signed what: the old one until the new one had been published for the
    # activation delay, never again afterwards; after the restart only the new one.
    signed = [(s, jws.header["kid"]) for s, jws in report.minted]
    assert {kid for _, kid in signed} == {old.kid, new.kid}
    by_new = [s for s, kid in signed if kid == new.kid]
    by_old = [s for s, kid in signed if kid == old.kid]
    assert min(s.t_done for s in by_new) >= added + ACTIVATION_DELAY
    assert max(s.t_send for s in by_old) <= min(s.t_done for s in by_new)
    assert any(s.t_send > added for s in by_old), "the old key stopped signing at once"
    assert all(kid == new.kid for s, kid in signed if s.t_send > restarting)
    assert any(s.t_send > back for s in by_new)


def test_many_callers_with_jwks_outage_and_reload(tmp_path: Path, pki: Pki, front: str) -> None:
    began = time.monotonic()
    idp = Idp(ISSUER)
    issuer = JwksServer(idp)
    jwks_before = f"{{url: {issuer.url()}, refresh: 10s, timeout: 1s}}"
    jwks_after = f"{{url: {issuer.url()}, refresh: 11s, timeout: 1s}}"  # restarts the fetch task
    configmap = AtomicDir(tmp_path / "configmap")
    configmap.publish({"policy.yaml": policy_text(V1, jwks_before)})
    key = write_key(generate_signing_key(), tmp_path / "signing-key.pem")
    stack = mesh_slice(tmp_path / "stack", pki, configmap.root / "policy.yaml", [key], front)
    issuer.up()
    try:
        stack.start()
        load = Load(stack, idp, seed=2)
        admin = stack.sidecar.admin_port

        def corp() -> dict[str, Any]:
            doc: dict[str, Any] = statusz(admin)["issuers"]["corp-idp"]
            return doc

        wait_for(lambda: corp()["keys"] == [idp.key.kid], 5, what="the first JWKS fetch")
        before = statusz(admin)
        documents = [published_jwks(admin)]
        try:
            load.start()
            load.wait_more(100)

            # 1. The issuer's JWKS server goes down; a token with an unknown kid makes the
            # sidecar try to fetch at once, and the fetch fails.
            issuer_down = time.monotonic()
            issuer.down()
            stranger = load.probe(variant="stranger")
            wait_for(lambda: corp()["last_fetch_error"], 5, what="a failed JWKS fetch")
            load.wait_more(120)

            # 2. A policy reload (ConfigMap ..data swap) while the issuer is still down.
            published = time.monotonic()
            configmap.publish({"policy.yaml": policy_text(V2, jwks_after)})
            wait_for(
                lambda: statusz(admin)["policy"]["sha256"] != before["policy"]["sha256"],
                5,
                what="the reload",
                interval=0.02,
            )
            seen = time.monotonic()
            after = statusz(admin)
            load.wait_more(150)
            load.finish()
            documents.append(published_jwks(admin))
            stale = corp()
            scraped = Metrics.scrape(admin)
        finally:
            load.finish()
    finally:
        stack.stop()
        issuer.down()

    def versions(s: Sent) -> list[Sequence[Rule]]:
        if s.t_done < published:
            return [V1]
        if s.t_send > seen:
            return [V2]
        return [V1, V2]

    timeline = Timeline(versions=versions, outages=[], down=[])
    report = check_run(load, stack.echo, documents, timeline)
    summary(f"jwks-outage+reload[{front}]", report, began)
    assert_clean(report)

    assert stranger.status == 401
    assert after["policy"]["rules"] == len(V2)
    assert after["last_reload_error"] is None
    # Stale keys kept through the outage and the reload, and the fetch is still failing.
    assert stale["keys"] == [idp.key.kid]
    assert stale["last_fetch_error"]
    during = [s for s in load.records() if s.t_send > issuer_down and s.status == 200]
    assert len(during) >= 30
    after_reload = Counter(
        (s.workload, s.kind, s.status) for s in load.records() if s.t_send > seen
    )
    assert after_reload[("search", "profile", 200)] >= 1, after_reload
    assert after_reload[("reports", "report", 200)] == 0
    before_reload = Counter(
        (s.workload, s.kind, s.status) for s in load.records() if s.t_done < published
    )
    assert before_reload[("reports", "report", 200)] >= 1, before_reload
    assert before_reload[("search", "profile", 200)] == 0
    # The sidecar's own count agrees with what the upstream saw.
    allows = scraped.value("extauthz_decisions_total", decision="allow")
    assert allows == len(stack.echo.requests) == report.counts["allowed"]
    assert scraped.value("extauthz_reloads_total", result="success") >= 1
    assert scraped.value("extauthz_jwks_fetches_total", issuer="corp-idp", result="failure") >= 1
