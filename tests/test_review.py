"""``extauthz review``: the per-rule figures of decision logs, and ``--suggest``'s narrowed
policy. Logs both made up line by line (exact counts, every odd line) and made for real: the
decisions of a Sidecar with a DecisionLog, in process, through the gRPC edge."""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import corekit as k
import edgekit
import pytest
import yaml

from extauthz.cli import _Parser
from extauthz.demo.idp import Idp
from extauthz.policy.compiler import load_policy
from extauthz.serve.decision_log import DecisionLog
from extauthz.serve.grpc_front import GrpcEdge
from extauthz.serve.sidecar import Sidecar
from extauthz.tools import review
from extauthz.tools.diff import NARROWS, NEUTRAL, WIDENS, diff_policies
from extauthz.tools.lint import ERROR, lint_file

OPS = "spiffe://cluster.local/ns/ops/sa/*"
SHOP = "spiffe://cluster.local/ns/shop/sa/*"
CATALOG_HOST = "catalog.shop.svc.cluster.local"
V2_FIELDS = {"v", "decision_id", "policy_revision", "policy_generation", "trace_id"}
RealLog = tuple[Path, list[dict[str, Any]]]  # the log file and its lines


# --- running the command -----------------------------------------------------------------------


@dataclasses.dataclass
class Ran:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def parser() -> argparse.ArgumentParser:
    """The top-level parser as cli.py builds it (its _Parser: argument errors in one line)."""
    top = _Parser(prog="extauthz")
    sub = top.add_subparsers(dest="command", required=True, parser_class=_Parser)
    review.add_parser(sub)
    return top


def run(*argv: str | Path, stdin: bytes | None = None) -> Ran:
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.stdout", out)
        mp.setattr("sys.stderr", err)
        if stdin is not None:
            mp.setattr("sys.stdin", io.TextIOWrapper(io.BufferedReader(io.BytesIO(stdin))))
        try:
            args = parser().parse_args(["review", *map(str, argv)])
            code = args.func(args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return Ran(code, out.getvalue(), err.getvalue())


def one_line_exit_2(ran: Ran, *needles: str) -> None:
    assert ran.code == 2, ran
    assert "Traceback" not in ran.err
    lines = ran.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("extauthz: "), lines
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert ran.out == ""


def by_id(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {rule["id"]: rule for rule in report["rules"]}


# --- the policy --------------------------------------------------------------------------------


def policy_document() -> dict[str, Any]:
    """Five rules: one allowed to one of its two callers and granting one of its two scopes,
    one only ever denied, one never reached, one of two patterns (one never matched), and a
    shadow rule."""
    return k.policy_doc(
        [
            k.rule_doc(
                "orders-read-profile",
                workloads=(k.ORDERS, k.CHECKOUT),
                scopes=("profile.read", "profile.email"),
            ),
            k.rule_doc(
                "orders-update-profile",
                methods=("PUT",),
                require=("profile.write",),
                scopes=("profile.write",),
            ),
            k.rule_doc(
                "checkout-charge",
                workloads=(k.CHECKOUT,),
                host=k.PAYMENTS_HOST,
                methods=("POST",),
                paths=("/v1/charges",),
                require=("payments.charge",),
                audience=k.PAYMENTS,
                scopes=("payments.charge",),
            ),
            k.rule_doc(
                "shop-catalog",
                workloads=(SHOP, OPS),
                host=CATALOG_HOST,
                paths=("/v1/items/**",),
                require=("catalog.read",),
                audience="spiffe://cluster.local/ns/shop/sa/catalog",
                scopes=("catalog.read",),
            ),
            k.rule_doc("orders-audit", paths=("/v1/audit/{id}",), mode="shadow"),
        ]
    )


@dataclasses.dataclass
class Setup:
    dir: Path
    policy: Path
    doc: dict[str, Any]
    world: k.World


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    doc = policy_document()
    world = k.make_world(doc)
    (tmp_path / "policy.yaml").write_text(k.dump(doc))
    world.idp.write_jwks(tmp_path / k.JWKS_FILE)
    assert load_policy(tmp_path / "policy.yaml").digest == world.snap.policy.digest
    return Setup(tmp_path, tmp_path / "policy.yaml", doc, world)


# --- real decision logs ------------------------------------------------------------------------


class Clock:
    """The sidecar's clock: 10 s on per decision, from corekit's NOW (tokens live 600 s)."""

    def __init__(self) -> None:
        self.now = k.NOW

    def __call__(self) -> float:
        self.now += 10
        return self.now


def traffic(world: k.World) -> list[tuple[str, edgekit.Request]]:
    """(what it is, the request): 3 + 2 + 1 + 2 + 2 decisions."""
    read = world.token()
    catalog = world.token(scope="catalog.read")
    nothing = world.token(scope="other.scope")
    return [
        *[("allow orders-read-profile", edgekit.request(read)) for _ in range(3)],
        *[("deny orders-update-profile", edgekit.request(read, method="PUT")) for _ in range(2)],
        (
            "allow shop-catalog",
            edgekit.request(catalog, host=CATALOG_HOST, path="/v1/items/a/b", principal=k.PROFILE),
        ),
        ("shadow allow orders-audit", edgekit.request(read, path="/v1/audit/7")),
        ("shadow deny orders-audit", edgekit.request(nothing, path="/v1/audit/7")),
        ("no rule", edgekit.request(read, path="/v1/nowhere")),
        ("no token", edgekit.request()),
    ]


def decide_all(
    world: k.World, requests: list[tuple[str, edgekit.Request]], clock: Clock | None = None
) -> list[dict[str, Any]]:
    """The decision log lines of ``requests``, decided by a Sidecar on ``world``."""
    stream = io.StringIO()
    sidecar = Sidecar(DecisionLog(stream), clock=clock or Clock())
    sidecar.install(dataclasses.replace(world.snap, generation=1))
    for _what, req in requests:
        sidecar.check(edgekit.grpc_wire(req), GrpcEdge())
    sidecar.decision_log.flush()
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.fixture
def real_log(setup: Setup) -> RealLog:
    lines = decide_all(setup.world, traffic(setup.world))
    path = setup.dir / "decisions.log"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path, lines


def test_the_real_log_is_what_the_traffic_says(real_log: RealLog) -> None:
    _, lines = real_log
    assert [(x["decision"], x["shadow"], x["rule"], x["reason"]) for x in lines] == [
        *[("allow", False, "orders-read-profile", "allowed")] * 3,
        *[("deny", False, "orders-update-profile", "insufficient_scope")] * 2,
        ("allow", False, "shop-catalog", "allowed"),
        ("allow", True, "orders-audit", "allowed"),
        ("deny", True, "orders-audit", "insufficient_scope"),
        ("deny", False, None, "no_rule"),
        ("deny", False, None, "token_missing"),
    ]


def test_the_report_of_real_decisions(setup: Setup, real_log: RealLog) -> None:
    log, lines = real_log
    ran = run("--policy", setup.policy, log, "--format", "json")
    assert ran.code == 0 and ran.err == ""
    report = ran.json()
    revision = setup.world.snap.policy.digest[:16]
    assert report["policy"] == {"source": str(setup.policy), "revision": revision, "rules": 5}
    assert report["window"] == {
        "since": None,
        "from": lines[0]["time"],
        "to": lines[-1]["time"],
        "lines": 10,
    }
    rules = by_id(report)
    assert list(rules) == [
        "orders-read-profile",
        "orders-update-profile",
        "checkout-charge",
        "shop-catalog",
        "orders-audit",
    ]
    no_shadow = {"allowed": 0, "denied": 0, "deny_reasons": {}}
    assert rules["orders-read-profile"] == {
        "id": "orders-read-profile",
        "purpose": "test rule orders-read-profile",
        "mode": "enforce",
        "allowed": 3,
        "denied": 0,
        "callers_seen": {k.ORDERS: 3},
        "callers_other": 0,
        "callers_unseen": [k.CHECKOUT],
        "scopes_granted": {"profile.read": 3},
        "scopes_never_granted": ["profile.email"],
        "last_used": lines[2]["time"],
        "deny_reasons": {},
        "shadow": no_shadow,
    }
    update = rules["orders-update-profile"]
    assert (update["allowed"], update["denied"], update["last_used"]) == (0, 2, None)
    assert update["deny_reasons"] == {"insufficient_scope": 2}
    assert update["callers_seen"] == {k.ORDERS: 2} and update["callers_unseen"] == []
    assert update["scopes_never_granted"] == ["profile.write"]
    charge = rules["checkout-charge"]
    assert (charge["allowed"], charge["denied"], charge["callers_seen"]) == (0, 0, {})
    assert charge["callers_unseen"] == [k.CHECKOUT]
    catalog = rules["shop-catalog"]
    assert catalog["allowed"] == 1 and catalog["callers_seen"] == {k.PROFILE: 1}
    assert catalog["callers_unseen"] == [OPS]  # the shop pattern matched, the ops one never
    assert catalog["scopes_granted"] == {"catalog.read": 1}
    assert catalog["scopes_never_granted"] == []
    assert catalog["last_used"] == lines[5]["time"]
    audit = rules["orders-audit"]
    assert audit["mode"] == "shadow"
    assert (audit["allowed"], audit["denied"]) == (0, 0)  # shadow decisions are counted apart
    assert audit["shadow"] == {
        "allowed": 1,
        "denied": 1,
        "deny_reasons": {"insufficient_scope": 1},
    }
    # ... and still count as use: what the rule would grant once enforced.
    assert audit["callers_seen"] == {k.ORDERS: 2} and audit["last_used"] == lines[6]["time"]
    assert audit["scopes_granted"] == {"profile.read": 1}
    assert report["unused_rules"] == ["checkout-charge"]
    assert report["never_allowed"] == ["orders-update-profile"]
    assert report["without_rule"] == {
        "lines": 2,
        "deny_reasons": {"no_rule": 1, "token_missing": 1},
    }
    assert report["unknown_rules"] == {}
    assert report["revisions"] == {"current": revision, "counted": 10, "other": {}}
    assert (report["malformed"], report["skipped"]) == (0, 0)
    assert "suggestion" not in report


def test_since_keeps_the_lines_from_then_on(setup: Setup, real_log: RealLog) -> None:
    log, lines = real_log
    # Line i was decided at NOW + 10 (i + 1): from the fifth on, by time and by duration.
    fifth = lines[4]["time"]
    assert fifth == "2023-11-14T22:14:10.000Z"
    absolute = run("--policy", setup.policy, log, "--format", "json", "--since", fifth).json()
    now = k.NOW + 100 + 60  # the last line is NOW + 100; 110 s before now is NOW + 50
    relative = run(
        "--policy", setup.policy, log, "--format", "json", "--since", "110s", "--now", str(now)
    ).json()
    for report in (absolute, relative):
        assert report["window"]["lines"] == 6 and report["skipped"] == 4
        assert report["window"]["from"] == fifth
        rules = by_id(report)
        assert rules["orders-read-profile"]["allowed"] == 0
        assert rules["orders-update-profile"]["deny_reasons"] == {"insufficient_scope": 1}
        assert "orders-read-profile" in report["unused_rules"]
    assert absolute["window"]["since"] == fifth
    later = run("--policy", setup.policy, log, "--format", "json", "--since", "2m", "--now",
                str(k.NOW + 100 + 121)).json()  # fmt: skip
    assert later["window"]["lines"] == 0 and later["skipped"] == 10
    assert later["window"]["from"] is None and later["window"]["to"] is None


def test_lines_of_another_revision_are_counted_apart(setup: Setup, real_log: RealLog) -> None:
    log, _ = real_log
    # The same traffic decided under another document (one purpose reworded).
    doc = policy_document()
    doc["rules"][0]["purpose"] = "test rule orders-read-profile, reworded"
    world = k.make_world(doc, idp=setup.world.idp)
    other = decide_all(world, traffic(world))
    older = world.snap.policy.digest[:16]
    v1 = {key: value for key, value in other[0].items() if key not in V2_FIELDS}
    with log.open("a") as fh:
        fh.writelines(json.dumps(line) + "\n" for line in [*other, v1, v1])
    report = run("--policy", setup.policy, log, "--format", "json").json()
    assert report["revisions"] == {
        "current": setup.world.snap.policy.digest[:16],
        "counted": 10,
        "other": {older: 10, "unknown": 2},
    }
    assert report["window"]["lines"] == 22
    assert by_id(report)["orders-read-profile"]["allowed"] == 3  # not 3 + 3 + 2


def test_suggest_narrows_to_what_was_used(setup: Setup, real_log: RealLog) -> None:
    log, _ = real_log
    out = setup.dir / "narrowed.yaml"
    report = run("--policy", setup.policy, log, "--format", "json", "--suggest", out).json()
    suggestion = report["suggestion"]
    assert suggestion["changed"] is True and suggestion["note"] == ""
    assert suggestion["removed_rules"] == ["orders-update-profile", "checkout-charge"]
    assert suggestion["removed_workloads"] == {
        "orders-read-profile": [k.CHECKOUT],
        "shop-catalog": [OPS],
    }
    assert suggestion["removed_scopes"] == {"orders-read-profile": ["profile.email"]}
    assert suggestion["kept"] == []
    # It compiles, lints (JWKS files read, as serve would) with no error, and only narrows.
    old, new = load_policy(setup.policy), load_policy(out)
    assert [f for f in lint_file(out) if f.severity == ERROR] == []
    changes = diff_policies(old, new)
    assert changes and all(c.effect == NARROWS for c in changes), changes
    assert sorted((c.kind, c.rule, c.detail) for c in changes) == [
        ("rule-removed", "checkout-charge", "no longer grants anything"),
        ("rule-removed", "orders-update-profile", "no longer grants anything"),
        ("scopes-removed", "orders-read-profile", "profile.email"),
        ("workloads-removed", "orders-read-profile", k.CHECKOUT),
        ("workloads-removed", "shop-catalog", OPS),
    ]
    assert [c["kind"] for c in suggestion["changes"]] == [c.kind for c in changes]
    # Everything else is as written, and the JWKS path (OUT is beside the policy) too.
    written = yaml.safe_load(out.read_text())
    expected = policy_document()
    del expected["rules"][1:3]
    expected["rules"][0]["match"]["workloads"] = [k.ORDERS]
    expected["rules"][0]["grant"]["scopes"] = ["profile.read"]
    expected["rules"][1]["match"]["workloads"] = [SHOP]
    assert written == expected
    # The narrowed policy still lets the same traffic through, decided the same way.
    world = k.make_world(written, idp=setup.world.idp)
    again = decide_all(world, traffic(world))
    wanted = [x for x in real_log[1] if x["rule"] != "orders-update-profile"]
    got = [x for x in again if x["reason"] != "no_rule" or x["path"] != "/v1/customers/42"]
    assert [(x["decision"], x["rule"], x["scopes"]) for x in got] == [
        (x["decision"], x["rule"], x["scopes"]) for x in wanted
    ]


def test_suggest_elsewhere_rewrites_the_jwks_path(setup: Setup, real_log: RealLog) -> None:
    log, _ = real_log
    (setup.dir / "out").mkdir()
    out = setup.dir / "out" / "narrowed.yaml"
    report = run("--policy", setup.policy, log, "--format", "json", "--suggest", out).json()
    assert report["suggestion"]["changed"]
    jwks = yaml.safe_load(out.read_text())["trustedIssuers"][0]["jwks"]
    assert jwks == {"file": "../issuers/corp-idp.json"}
    assert [f for f in lint_file(out) if f.severity == ERROR] == []  # the JWKS file loads
    changes = diff_policies(load_policy(setup.policy), load_policy(out))
    assert not [c for c in changes if c.effect == WIDENS]
    assert [c.kind for c in changes if c.effect == NEUTRAL] == ["issuer-jwks-changed"]


def test_text_and_md_name_every_rule(setup: Setup, real_log: RealLog) -> None:
    log, _ = real_log
    out = setup.dir / "narrowed.yaml"
    for output in ("text", "md"):
        ran = run("--policy", setup.policy, log, "--format", output, "--suggest", out)
        assert ran.code == 0 and ran.err == ""
        for rule in setup.doc["rules"]:
            assert rule["id"] in ran.out, (output, rule["id"])
        assert "checkout-charge" in ran.out.split("unused")[-1]
    md = run("--policy", setup.policy, log, "--format", "md").out
    table = [line for line in md.splitlines() if line.startswith("| `")]
    assert len(table) == 2 * len(setup.doc["rules"])  # the rules table and the usage table
    assert "| `checkout-charge` **unused** |" in md
    text = run("--policy", setup.policy, log).out  # text is the default
    assert "rule orders-read-profile (enforce)" in text
    assert f"callers never seen: {k.CHECKOUT}" in text
    assert "scopes never granted: profile.email" in text


# --- made-up lines -----------------------------------------------------------------------------

SIMPLE = """\
apiVersion: extauthz/v1
kind: ExchangePolicy
exchange: {issuer: "https://exchange.shop.svc", maxTtl: 300s}
trustedIssuers:
  - {id: corp-idp, issuer: "https://idp.example.com", jwks: {file: issuers/corp-idp.json},
     audiences: ["https://shop.example.com"], algorithms: [ES256]}
workloads: {trustDomains: [cluster.local]}
rules:
  # the one used rule
  - id: read
    purpose: The order service reads a profile
    match: {workloads: ["spiffe://cluster.local/ns/shop/sa/orders",
                        "spiffe://cluster.local/ns/team/*/**"],
            host: profile.shop.svc.cluster.local, methods: [GET],
            paths: ["/v1/customers/{id}"], issuers: [corp-idp]}
    require: {scopes: [profile.read]}
    grant: {audience: "spiffe://cluster.local/ns/shop/sa/profile",
            scopes: [profile.read, profile.email], ttl: 30s}
  - id: write
    purpose: The order service updates a profile
    match: {workloads: ["spiffe://cluster.local/ns/shop/sa/orders"],
            host: profile.shop.svc.cluster.local, methods: [PUT],
            paths: ["/v1/customers/{id}"], issuers: [corp-idp]}
    require: {scopes: [profile.write]}
    grant: {audience: "spiffe://cluster.local/ns/shop/sa/profile", scopes: [profile.write],
            ttl: 30s}
"""


@pytest.fixture
def simple(tmp_path: Path) -> Path:
    (tmp_path / "policy.yaml").write_text(SIMPLE)
    Idp(k.IDP_ISS).write_jwks(tmp_path / k.JWKS_FILE)
    return tmp_path / "policy.yaml"


def revision(path: Path) -> str:
    return load_policy(path).digest[:16]


def line(revision: str | None, **fields: Any) -> dict[str, Any]:
    """A v2 decision log line (v1 when ``revision`` is None) with the fields review reads."""
    out: dict[str, Any] = {
        "time": "2026-12-02T18:00:00.123Z",
        "decision": "allow",
        "shadow": False,
        "reason": "allowed",
        "rule": "read",
        "caller": "spiffe://cluster.local/ns/shop/sa/orders",
        "scopes": "profile.read",
        "latency_ms": 0.2,
    }
    if revision is not None:
        out.update(v=2, decision_id="x", policy_revision=revision, policy_generation=1)
    out.update(fields)
    return out


def write(path: Path, rows: list[Any], opener: Callable[..., Any] = open) -> Path:
    with opener(path, "wt", encoding="utf-8") as fh:
        for row in rows:
            fh.write(row if isinstance(row, str) else json.dumps(row))
            fh.write("\n")
    return path


def made_up(rev: str) -> Iterator[dict[str, Any]]:
    for i in range(40):
        yield line(rev, time=f"2026-12-02T18:00:{i:02d}.000Z")
    yield line(rev, caller="spiffe://cluster.local/ns/team/a/sa/b", scopes="profile.read")
    yield line(rev, decision="deny", reason="insufficient_scope", scopes=None)
    yield line(rev, decision="deny", reason="claim_mismatch", scopes=None)
    yield line(rev, decision="deny", reason="insufficient_scope", scopes=None)
    yield line(rev, rule="gone", decision="deny", reason="insufficient_scope")
    yield line(rev, rule=None, decision="deny", reason="no_rule", scopes=None)


def test_made_up_lines_plain_and_gzip_count_the_same(simple: Path) -> None:
    rows = list(made_up(revision(simple)))
    plain = write(simple.parent / "a.log", rows)
    zipped = write(simple.parent / "b.log.gz", rows, gzip.open)
    unnamed = write(simple.parent / "c.log", rows, gzip.open)  # gzip told by its bytes
    reports = [
        run("--policy", simple, p, "--format", "json").json() for p in (plain, zipped, unnamed)
    ]
    assert reports[0] == reports[1] == reports[2]
    report = reports[0]
    read = by_id(report)["read"]
    assert (read["allowed"], read["denied"]) == (41, 3)
    assert read["deny_reasons"] == {"insufficient_scope": 2, "claim_mismatch": 1}
    assert list(read["deny_reasons"]) == ["insufficient_scope", "claim_mismatch"]
    assert read["callers_seen"] == {
        "spiffe://cluster.local/ns/shop/sa/orders": 43,
        "spiffe://cluster.local/ns/team/a/sa/b": 1,
    }
    assert read["callers_unseen"] == []
    assert read["scopes_granted"] == {"profile.read": 41}
    assert read["scopes_never_granted"] == ["profile.email"]
    assert read["last_used"] == "2026-12-02T18:00:39.000Z"
    assert report["unused_rules"] == ["write"]
    assert report["unknown_rules"] == {"gone": 1}
    assert report["without_rule"] == {"lines": 1, "deny_reasons": {"no_rule": 1}}
    assert report["window"] == {
        "since": None,
        "from": "2026-12-02T18:00:00.000Z",
        "to": "2026-12-02T18:00:39.000Z",
        "lines": 46,
    }
    assert report["revisions"]["counted"] == 46 and report["malformed"] == 0
    # Two files are one window; the second's lines are added to the first's.
    both = run("--policy", simple, plain, zipped, "--format", "json").json()
    assert by_id(both)["read"]["allowed"] == 82 and both["window"]["lines"] == 92


def test_bad_lines_are_counted_not_fatal(simple: Path) -> None:
    rev = revision(simple)
    bad: list[Any] = [
        "not json",
        "[1, 2]",
        '"a string"',
        line(rev, time=None),
        line(rev, time="2026-12-02 18:00:00"),
        line(rev, time=1764698400),
        line(rev, decision="maybe"),
        line(rev, decision=["allow"]),
        line(rev, shadow="yes"),
        line(rev, rule=["read"]),
        line(rev, caller={"id": 1}),
        line(rev, scopes=["profile.read"]),
        line(rev, policy_revision=7),
        json.dumps(line(rev))[:-1],  # cut short
        json.dumps(line(rev, detail="x" * review.MAX_LINE_BYTES)),  # longer than any real line
    ]
    good = [line(rev), "", "   ", line(rev)]
    path = simple.parent / "bad.log"
    write(path, [*bad, *good])
    with path.open("ab") as fh:  # not UTF-8
        fh.write(b'{"time": "\xff\xfe"}\n')
    report = run("--policy", simple, path, "--format", "json").json()
    assert report["malformed"] == len(bad) + 1
    assert report["window"]["lines"] == 2 and by_id(report)["read"]["allowed"] == 2


def test_stdin_and_shadow_and_v1_lines(simple: Path) -> None:
    rev = revision(simple)
    rows = [
        line(rev),
        line(rev, shadow=True),
        line(rev, shadow=True, decision="deny", reason="insufficient_scope", scopes=None),
        line(None),  # v1: no revision
        line("0123456789abcdef"),
    ]
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    for payload in (data, gzip.compress(data)):
        report = run("--policy", simple, "-", "--format", "json", stdin=payload).json()
        read = by_id(report)["read"]
        assert (read["allowed"], read["denied"]) == (1, 0)
        assert read["shadow"] == {
            "allowed": 1,
            "denied": 1,
            "deny_reasons": {"insufficient_scope": 1},
        }
        assert read["scopes_granted"] == {"profile.read": 2}  # the would-be grant counts
        assert report["revisions"]["other"] == {"0123456789abcdef": 1, "unknown": 1}
        assert report["revisions"]["counted"] == 3


def test_callers_a_pattern_admits_are_sampled(simple: Path) -> None:
    rev = revision(simple)
    many = review.CALLER_SAMPLE + 25
    rows = [line(rev, caller=f"spiffe://cluster.local/ns/team/t{i}/sa/x") for i in range(many)] + [
        line(rev, caller="spiffe://cluster.local/ns/team/t0/sa/x")
    ]
    report = run("--policy", simple, write(simple.parent / "p.log", rows), "--format", "json")
    read = by_id(report.json())["read"]
    assert len(read["callers_seen"]) == review.CALLER_SAMPLE
    assert read["callers_seen"]["spiffe://cluster.local/ns/team/t0/sa/x"] == 2
    assert read["callers_other"] == 25
    # The exact caller never came, the pattern matched: only the exact ID is unseen.
    assert read["callers_unseen"] == ["spiffe://cluster.local/ns/shop/sa/orders"]


def test_capped_tables_count_the_rest_as_more(simple: Path) -> None:
    rows = [line(f"{i:016x}") for i in range(review.MAX_KEYS + 3)]
    report = run("--policy", simple, write(simple.parent / "r.log", rows), "--format", "json")
    other = report.json()["revisions"]["other"]
    assert len(other) == review.MAX_KEYS + 1 and other[review.MORE] == 3


def test_suggest_of_made_up_lines(simple: Path) -> None:
    rows = list(made_up(revision(simple)))
    out = simple.parent / "narrowed.yaml"
    report = run("--policy", simple, write(simple.parent / "a.log", rows), "--format", "json",
                 "--suggest", out).json()  # fmt: skip
    suggestion = report["suggestion"]
    assert suggestion["removed_rules"] == ["write"]
    assert suggestion["removed_scopes"] == {"read": ["profile.email"]}
    assert suggestion["removed_workloads"] == {}  # the pattern matched a caller
    new = load_policy(out)
    assert [r.id for r in new.rules] == ["read"]
    assert new.rules[0].grant.scopes == {"profile.read"}
    assert not [c for c in diff_policies(load_policy(simple), new) if c.effect != NARROWS]


OVERLAP = SIMPLE.replace(
    "rules:\n",
    """rules:
  - id: team-read
    purpose: Any team service reads a profile
    match: {workloads: ["spiffe://cluster.local/ns/shop/sa/*"],
            host: profile.shop.svc.cluster.local, methods: [GET],
            paths: ["/v1/customers/{id}"], issuers: [corp-idp]}
    require: {scopes: [profile.read]}
    grant: {audience: "spiffe://cluster.local/ns/shop/sa/profile",
            scopes: [profile.read, profile.admin.write], ttl: 30s}
""",
)


def test_a_rule_that_overlaps_another_is_kept(tmp_path: Path) -> None:
    """Without ``read`` (exact caller) its requests would go to ``team-read`` (pattern), which
    grants more: neither is removed, nor their callers; scopes are still narrowed."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(OVERLAP)
    rev = revision(policy)
    rows = [
        line(rev, rule="team-read", caller="spiffe://cluster.local/ns/shop/sa/cart"),
        line(rev, rule="write", caller="spiffe://cluster.local/ns/shop/sa/orders",
             scopes="profile.write"),
    ]  # fmt: skip
    out = tmp_path / "narrowed.yaml"
    report = run("--policy", policy, write(tmp_path / "a.log", rows), "--format", "json",
                 "--suggest", out).json()  # fmt: skip
    suggestion = report["suggestion"]
    assert report["unused_rules"] == ["read"]
    assert suggestion["removed_rules"] == []
    assert suggestion["removed_scopes"] == {"team-read": ["profile.admin.write"]}
    assert [k["rule"] for k in suggestion["kept"]] == ["read"]
    assert "team-read" in suggestion["kept"][0]["why"]
    new = load_policy(out)
    assert [r.id for r in new.rules] == ["team-read", "read", "write"]
    assert not [c for c in diff_policies(load_policy(policy), new) if c.effect != NARROWS]


def test_a_pass_hop_keeps_its_scopes(simple: Path) -> None:
    rows = [line(revision(simple), scopes=None)]  # a txnToken: pass hop logs no scopes
    out = simple.parent / "narrowed.yaml"
    report = run("--policy", simple, write(simple.parent / "a.log", rows), "--format", "json",
                 "--suggest", out).json()  # fmt: skip
    assert by_id(report)["read"]["scopes_never_granted"] is None
    assert report["suggestion"]["removed_scopes"] == {}
    assert load_policy(out).rules[0].grant.scopes == {"profile.read", "profile.email"}


def test_when_nothing_would_be_left_the_policy_is_kept(simple: Path) -> None:
    out = simple.parent / "narrowed.yaml"
    empty = write(simple.parent / "empty.log", [])
    ran = run("--policy", simple, empty, "--format", "json", "--suggest", out)
    assert ran.code == 0
    report = ran.json()
    assert report["unused_rules"] == ["read", "write"]
    assert report["window"] == {"since": None, "from": None, "to": None, "lines": 0}
    assert report["suggestion"]["changed"] is False
    assert "every rule" in report["suggestion"]["note"]
    assert out.read_text() == SIMPLE  # as written, comments and all
    text = run("--policy", simple, empty, "--suggest", out).out
    assert "unchanged" in text


def test_an_alias_shared_by_two_rules_is_edited_in_one(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    shared = SIMPLE.replace(
        '    grant: {audience: "spiffe://cluster.local/ns/shop/sa/profile",\n'
        "            scopes: [profile.read, profile.email], ttl: 30s}",
        '    grant: &g {audience: "spiffe://cluster.local/ns/shop/sa/profile",\n'
        "            scopes: [profile.read, profile.write], ttl: 30s}",
    ).replace(
        '    grant: {audience: "spiffe://cluster.local/ns/shop/sa/profile", '
        "scopes: [profile.write],\n            ttl: 30s}",
        "    grant: *g",
    )
    assert "*g" in shared
    policy.write_text(shared)
    rev = revision(policy)
    rows = [line(rev), line(rev, rule="write", scopes="profile.write")]
    out = tmp_path / "narrowed.yaml"
    report = run("--policy", policy, write(tmp_path / "a.log", rows), "--format", "json",
                 "--suggest", out).json()  # fmt: skip
    assert report["suggestion"]["removed_scopes"] == {
        "read": ["profile.write"],
        "write": ["profile.read"],
    }
    new = {r.id: r.grant.scopes for r in load_policy(out).rules}
    assert new == {"read": {"profile.read"}, "write": {"profile.write"}}
    assert "&" not in out.read_text()


def test_a_window_and_claims_survive_the_rewrite(tmp_path: Path) -> None:
    """YAML reads an unquoted time as a datetime; written back, it is the same instant."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        SIMPLE.replace(
            "    require: {scopes: [profile.read]}\n",
            '    require: {scopes: [profile.read], claims: {tid: "{id}", azp: [a, b]}}\n'
            "    active: {from: 2026-01-01T00:00:00.5Z, until: 2099-01-01T00:00:00+02:00}\n",
        )
    )
    old = load_policy(policy)
    assert old.rules[0].active_from is not None and old.rules[0].claims
    out = tmp_path / "narrowed.yaml"
    report = run("--policy", policy, write(tmp_path / "a.log", [line(revision(policy))]),
                 "--format", "json", "--suggest", out).json()  # fmt: skip
    assert report["suggestion"]["changed"]
    new = load_policy(out)
    read = new.rules[0]
    assert (read.active_from, read.active_until) == (old.rules[0].active_from,
                                                     old.rules[0].active_until)  # fmt: skip
    assert read.claims == old.rules[0].claims
    kinds = {c.kind for c in diff_policies(old, new)}
    assert kinds == {"rule-removed", "scopes-removed", "workloads-removed"}  # the pattern


# --- operator mistakes -------------------------------------------------------------------------


def test_operator_mistakes_are_one_line_and_exit_2(simple: Path) -> None:
    log = write(simple.parent / "a.log", [line(revision(simple))])
    broken = simple.parent / "broken.yaml"
    broken.write_text(SIMPLE.replace("maxTtl: 300s", "maxTtl: forever"))
    not_yaml = simple.parent / "notyaml.yaml"
    not_yaml.write_text("rules: [\n")
    bad_gzip = simple.parent / "bad.log.gz"
    bad_gzip.write_bytes(gzip.compress(json.dumps([line(None)] * 500).encode())[:-40])
    one_line_exit_2(run("--policy", simple, simple.parent / "missing.log"), "missing.log")
    one_line_exit_2(run("--policy", simple.parent / "nope.yaml", log), "nope.yaml")
    one_line_exit_2(run("--policy", broken, log), "maxTtl")
    one_line_exit_2(run("--policy", not_yaml, log), "YAML")
    one_line_exit_2(run("--policy", simple, simple.parent), "is a directory")
    one_line_exit_2(run("--policy", simple, bad_gzip), "bad.log.gz")
    one_line_exit_2(run("--policy", simple, log, "--since", "yesterday"), "--since")
    one_line_exit_2(run("--policy", simple, log, "--since", "2026-12-01T00:00:00"), "--since")
    one_line_exit_2(run("--policy", simple, log, "--since", "1h", "--now", "nan"), "--now")
    one_line_exit_2(run("--policy", simple, log, "--format", "xml"), "--format")
    one_line_exit_2(run("--policy", simple), "LOG")
    one_line_exit_2(run("--policy", simple, log, "--suggest", simple), "policy itself")
    one_line_exit_2(
        run("--policy", simple, log, "--suggest", simple.parent / "no" / "out.yaml"),
        "not a directory",
    )


def test_run_checks_since_itself_too(simple: Path) -> None:
    """``run`` given a Namespace built without the parser (the engineer's wiring may)."""
    args = argparse.Namespace(
        policy=str(simple), logs=["-"], since="7 days", now=None, format="json", suggest=None
    )
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.stderr", err)
        assert review.run(args) == 2
    assert err.getvalue().count("\n") == 1 and "--since" in err.getvalue()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-12-01T00:00:00Z", "2026-12-01T00:00:00.000Z"),
        ("2026-12-01T01:00:00.1234+01:00", "2026-12-01T00:00:00.124Z"),
        ("2026-12-01T00:00:00.123Z", "2026-12-01T00:00:00.123Z"),
        ("90s", "2026-12-01T23:58:30.000Z"),
        ("30m", "2026-12-01T23:30:00.000Z"),
        ("24h", "2026-12-01T00:00:00.000Z"),
        ("7d", "2026-11-25T00:00:00.000Z"),
        ("2w", "2026-11-18T00:00:00.000Z"),
    ],
)
def test_parse_since(text: str, expected: str) -> None:
    now = 1_796_169_600.0  # 2026-12-02T00:00:00Z
    assert review.parse_since(text, now) == expected


@pytest.mark.parametrize("text", ["", "7", "d", "-7d", "7 d", "7y", "1h30m", "2026-12-01"])
def test_parse_since_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        review.parse_since(text, 1_796_169_600.0)


def test_review_reads_a_policy_directory_against_its_revision(tmp_path: Path) -> None:
    policy = tmp_path / "policy"
    policy.mkdir()
    shared, _, rules = SIMPLE.partition("rules:\n")
    (policy / "00-shared.yaml").write_text(shared)
    (policy / "team.yaml").write_text("rules:\n" + rules)
    Idp(k.IDP_ISS).write_jwks(policy / k.JWKS_FILE)
    rev = revision(policy)
    log = write(tmp_path / "a.log", [line(rev), line(rev), line("0123456789abcdef")])
    doc = run("--policy", policy, log, "--format", "json").json()
    assert doc["rules"][0]["id"] == "read" and doc["rules"][0]["allowed"] == 2
    suggested = run("--policy", policy, log, "--suggest", tmp_path / "out.yaml")
    one_line_exit_2(suggested, "--suggest", "directory")
    assert not (tmp_path / "out.yaml").exists()
