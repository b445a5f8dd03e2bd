"""``extauthz policy paths``: the trust paths of a policy as json, markdown, dot and html.

The dot text is laid out by the real Graphviz and the html page is loaded in a real headless
Chromium: both are Debian packages ``.ci/run`` installs. Without them these tests skip, except
under CI (``CI`` set), where a missing tool fails them.
"""

from __future__ import annotations

import argparse
import html
import io
import json
import os
import re
import shutil
import subprocess
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import corekit as k
import pytest

from extauthz.policy.compiler import load_policy
from extauthz.tools import paths
from extauthz.tools.lint import MAX_WORKLOADS_PER_RULE

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = [ROOT / "examples" / "policy.yaml", ROOT / "examples" / "transaction-tokens.yaml"]
LEDGER = "spiffe://cluster.local/ns/shop/sa/ledger"
LEDGER_HOST = "ledger.shop.svc.cluster.local"
SHOP_PATTERN = "spiffe://cluster.local/ns/shop/sa/*"
# Policy text a renderer must escape: markup, quotes, backslashes, table pipes, emphasis.
NASTY = 'Shows <script>alert("x")</script> & a \\N "quoted" | *table* \\ path'


def policy_paths(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    """``extauthz policy paths ARGV`` through a parser wired as cli.py wires it, in-process."""
    top = argparse.ArgumentParser(prog="extauthz")
    sub = top.add_subparsers(dest="command", required=True)
    policy_sub = sub.add_parser("policy").add_subparsers(dest="policy_command", required=True)
    paths.add_parser(policy_sub)
    args = top.parse_args(["policy", "paths", *map(str, argv)])
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = args.func(args)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def ok(*argv: str | Path) -> str:
    done = policy_paths(*argv)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    return done.stdout


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    """An operator mistake: exit 2, nothing on stdout, one line on stderr."""
    assert done.returncode == 2, done
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("extauthz: "), done.stderr
    return lines[0]


def tool(*names: str, package: str) -> str:
    """The path of the first of ``names`` on PATH; else fail under CI, skip elsewhere."""
    for name in names:
        found = shutil.which(name)
        if found is not None:
            return found
    message = f"{names[0]} is not installed (Debian package {package}; .ci/run installs it)"
    if "CI" in os.environ:
        pytest.fail(message)
    pytest.skip(message)


def dot_svg(dot_text: str) -> str:
    done = subprocess.run(
        [tool("dot", package="graphviz"), "-Tsvg"],
        input=dot_text,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "<svg" in done.stdout
    return done.stdout


def browse(page: Path, profile: Path) -> tuple[str, list[str]]:
    """The DOM a headless Chromium built from ``page``, and the console lines it logged."""
    chromium = tool("chromium", "chromium-browser", package="chromium")
    done = subprocess.run(
        [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
         "--v=0", f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=90, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if re.search(r"CONSOLE|Uncaught", line)]
    return done.stdout, console


# --- a policy built to be flagged, with every condition a rule can have -----------------------

MANY = [f"spiffe://cluster.local/ns/batch/sa/job-{i}" for i in range(MAX_WORKLOADS_PER_RULE + 1)]
TEN = [f"spiffe://cluster.local/ns/cron/sa/job-{i}" for i in range(MAX_WORKLOADS_PER_RULE)]


def flagged_doc() -> dict[str, Any]:
    """ORDERS reaches two audiences by name (and a third through SHOP_PATTERN), CHECKOUT one
    by name and one through the pattern; one rule has 11 callers, one exactly the limit."""
    nasty = k.rule_doc(
        "checkout-read-profile",
        workloads=[k.CHECKOUT],
        paths=["/v1/customers/{id}/basket"],
        mode="shadow",
        active={"from": "2026-12-01T00:00:00Z", "until": "2026-12-04T18:00:00Z"},
    )
    nasty["purpose"] = NASTY
    nasty["require"]["claims"] = {"tenant": 'a"b\\c', "azp": ["web", "app"]}
    return k.policy_doc(
        [
            k.rule_doc(),  # orders-read-profile: ORDERS -> PROFILE
            charge("orders-charge", [k.ORDERS], "/v1/charges"),
            charge("many-callers", MANY, "/v1/refunds"),
            charge("ten-callers", TEN, "/v1/payouts"),
            nasty,
            k.rule_doc(
                "shop-ledger",
                workloads=[SHOP_PATTERN],
                host=LEDGER_HOST,
                paths=["/v1/entries"],
                audience=LEDGER,
            ),
        ]
    )


def charge(rule_id: str, workloads: list[str], path: str) -> dict[str, Any]:
    return k.rule_doc(
        rule_id,
        workloads=workloads,
        host=k.PAYMENTS_HOST,
        methods=["POST"],
        paths=[path],
        require=["payments.charge"],
        audience=k.PAYMENTS,
        scopes=["payments.charge"],
        ttl="15s",
    )


@pytest.fixture
def flagged(tmp_path: Path) -> Path:
    k.Idp(k.IDP_ISS).write_jwks(tmp_path / k.JWKS_FILE)
    path = tmp_path / "policy.yaml"
    path.write_text(k.dump(flagged_doc()), encoding="utf-8")
    return path


# --- json -----------------------------------------------------------------------------------


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_json_has_every_rule_with_its_callers_audience_and_grant(example: Path) -> None:
    doc = json.loads(ok(example, "--format", "json"))
    policy = load_policy(example)
    assert doc["policy"]["digest"] == policy.digest
    assert doc["policy"]["token_type"] == policy.exchange.token_type
    assert doc["policy"]["trust_domain"] == policy.exchange.trust_domain
    assert [p["rule"] for p in doc["paths"]] == [r.id for r in policy.rules]
    for rule, path in zip(policy.rules, doc["paths"], strict=True):
        assert path["purpose"] == rule.purpose
        assert path["callers"] == list(rule.workloads)
        assert path["audience"] == rule.grant.audience
        assert path["scopes"] == sorted(rule.grant.scopes)
        assert path["ttl"] == rule.grant.ttl and path["issuers"] == sorted(rule.issuers)
        assert rule.id in doc["by_audience"][rule.grant.audience]["rules"]
        for caller in rule.workloads:
            assert rule.grant.audience in doc["by_caller"][caller]["audiences"]
    assert doc["flags"] == []
    assert set(doc["fan_in"]) == {r.grant.audience for r in policy.rules}


def test_json_of_the_shop_example_groups_by_audience_and_caller() -> None:
    doc = json.loads(ok(EXAMPLES[0], "--format", "json"))
    assert doc["by_audience"] == {
        k.PAYMENTS: {"rules": ["checkout-charge-payment"], "callers": [k.CHECKOUT]},
        k.PROFILE: {"rules": ["orders-read-profile", "orders-update-address"],
                    "callers": [k.ORDERS]},
    }  # fmt: skip
    assert doc["fan_in"][k.PROFILE] == {"rules": 2, "callers": 1}
    assert doc["fan_out"][k.ORDERS] == {"audiences": 1, "rules": 2}
    first = doc["paths"][0]
    assert first["host"] == k.PROFILE_HOST and first["methods"] == ["GET"]
    assert first["paths"] == ["/v1/customers/{id}"] and first["require_scopes"] == ["profile.read"]
    assert first["window"] == {"from": None, "until": None}
    assert (first["mode"], first["txn"], first["reexchange"]) == ("enforce", "bearer", False)


def test_json_of_the_transaction_example_names_each_hop() -> None:
    doc = json.loads(ok(EXAMPLES[1], "--format", "json"))
    hops = {p["rule"]: (p["txn"], p["issuers"]) for p in doc["paths"]}
    assert hops == {
        "checkout-start": ("bearer", ["corp-idp"]),
        "payments-charge": ("replace", ["exchange"]),
        "ledger-record": ("pass", ["exchange"]),
    }
    assert doc["policy"]["trust_domain"] == "cluster.local"


def test_json_flags_many_callers_and_callers_reaching_several_audiences(flagged: Path) -> None:
    doc = json.loads(ok(flagged, "--format", "json"))
    flags = {(f["check"], f.get("rule") or f.get("caller")): f for f in doc["flags"]}
    assert set(flags) == {
        ("workloads-broad", "many-callers"),
        ("exchange-path-shared", k.ORDERS),
        ("exchange-path-shared", k.CHECKOUT),
    }  # ten-callers is at the limit; the pattern itself reaches one audience
    assert flags["workloads-broad", "many-callers"]["count"] == MAX_WORKLOADS_PER_RULE + 1
    assert flags["workloads-broad", "many-callers"]["limit"] == MAX_WORKLOADS_PER_RULE
    assert flags["exchange-path-shared", k.ORDERS]["count"] == 3
    orders, checkout = doc["by_caller"][k.ORDERS], doc["by_caller"][k.CHECKOUT]
    assert orders["audiences"] == [k.PAYMENTS, k.PROFILE]
    assert orders["reach"] == [LEDGER, k.PAYMENTS, k.PROFILE]
    assert checkout["matched_by"] == [SHOP_PATTERN] and checkout["audiences"] == [k.PROFILE]
    assert doc["by_caller"][SHOP_PATTERN]["pattern"] is True
    assert doc["fan_out"][k.CHECKOUT] == {"audiences": 2, "rules": 1}
    assert doc["fan_in"][k.PAYMENTS] == {"rules": 3, "callers": 1 + len(MANY) + len(TEN)}


def test_json_spells_out_the_conditions_window_and_mode(flagged: Path) -> None:
    doc = json.loads(ok(flagged, "--format", "json"))
    path = next(p for p in doc["paths"] if p["rule"] == "checkout-read-profile")
    assert path["purpose"] == NASTY
    assert path["window"] == {"from": "2026-12-01T00:00:00Z", "until": "2026-12-04T18:00:00Z"}
    assert path["mode"] == "shadow"
    assert path["claims"] == ["tenant = 'a\"b\\\\c'", "azp is one of ['web', 'app']"]
    assert path["conditions"] == [
        "requires scopes profile.read",
        *(f"requires claim {c}" for c in path["claims"]),
        "active from 2026-12-01T00:00:00Z",
        "active until 2026-12-04T18:00:00Z",
        "shadow mode: decided and logged, not enforced",
    ]


# --- markdown and dot -----------------------------------------------------------------------


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_markdown_has_every_rule_and_purpose_in_its_tables(example: Path) -> None:
    text = ok(example)  # md is the default
    policy = load_policy(example)
    for rule in policy.rules:
        assert rule.id in text and rule.purpose in text
    audiences = {r.grant.audience for r in policy.rules}
    callers = {w for r in policy.rules for w in r.workloads}
    assert text.count("\n### Audience ") == len(audiences)
    assert text.count("\n### Caller ") == len(callers)


def test_markdown_escapes_policy_text_and_shows_the_flags(flagged: Path) -> None:
    text = ok(flagged, "--format", "md")
    assert "<script>" not in text and "\\<script\\>" in text
    assert "**workloads-broad**" in text and "**exchange-path-shared**" in text
    row = next(line for line in text.splitlines() if line.startswith("| checkout-read-profile"))
    assert len(re.findall(r"(?<!\\)\|", row)) == 9  # eight columns: the purpose's pipe escaped


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_dot_is_a_graph_graphviz_lays_out(example: Path) -> None:
    text = ok(example, "--format", "dot")
    svg = dot_svg(text)
    for rule in load_policy(example).rules:
        assert f"rule {rule.id}" in html.unescape(svg)  # dot spells '-' as &#45;


def test_dot_escapes_labels_and_marks_flagged_nodes(flagged: Path) -> None:
    text = ok(flagged, "--format", "dot")
    assert re.fullmatch(r"(?s)digraph trust_paths \{\n.*\n\}\n", text)
    ids = set(re.findall(r"^  (\w+) \[", text, re.MULTILINE)) - {"graph", "node", "edge"}
    assert all(re.fullmatch(r"[icra]\d+", i) for i in ids)
    assert "\\\\N" in text and '\\"quoted\\"' in text  # \N is no dot escape here
    red = [line for line in text.splitlines() if 'fontcolor="#b00020"' in line]
    assert len(red) == 3  # the flagged ones: many-callers, ORDERS and CHECKOUT
    assert all(any(s in line for line in red) for s in ("many-callers", k.ORDERS, k.CHECKOUT))
    svg = dot_svg(text)
    assert "<script" not in svg  # the purpose is text in the drawing, not markup
    shown = html.unescape(svg)  # dot spells '-' as &#45;
    assert "<script>" in shown and "\\N" in shown and "(!) workloads-broad" in shown


# --- html in a real browser -----------------------------------------------------------------


@pytest.mark.parametrize("which", ["policy.yaml", "transaction-tokens.yaml", "flagged"])
def test_html_page_loads_in_a_browser_with_the_graph_and_no_console_error(
    which: str, flagged: Path, tmp_path: Path
) -> None:
    source = flagged if which == "flagged" else ROOT / "examples" / which
    page = tmp_path / "page.html"
    assert ok(source, "--format", "html", "--out", page) == ""
    text = page.read_text(encoding="utf-8")
    assert "<script" not in text.lower() and 'http-equiv="Content-Security-Policy"' in text
    dom, console = browse(page, tmp_path / "profile")
    assert console == []
    assert "<svg" in dom
    for rule in load_policy(source).rules:
        assert rule.id in dom and f'id="rule-{rule.id}"' in dom
    if which == "flagged":
        assert "<script" not in dom and "&lt;script&gt;" in dom
        assert "exchange-path-shared" in dom and 'class="flag"' in dom


def test_the_console_check_sees_a_page_error(tmp_path: Path) -> None:
    """The browser test's control: a page with errors, and an external load the page's CSP
    refuses, do show on the console lines it reads."""
    page = tmp_path / "bad.html"
    page.write_text(
        '<!DOCTYPE html><meta http-equiv="Content-Security-Policy" content="default-src \'none\'">'
        '<img src="http://example.invalid/x.png"><p>x</p>',
        encoding="utf-8",
    )
    _dom, console = browse(page, tmp_path / "profile")
    assert any("Content Security Policy" in line for line in console), console


def test_tools_fail_under_ci_and_skip_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="graphviz"):
        tool("dot", package="graphviz")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="chromium"):
        tool("chromium", "chromium-browser", package="chromium")


# --- operator mistakes ----------------------------------------------------------------------


def test_a_missing_policy_is_one_line_and_exit_2(tmp_path: Path) -> None:
    line = one_line_error(policy_paths(tmp_path / "nope.yaml"))
    assert "nope.yaml" in line and "cannot read" in line


def test_a_broken_policy_is_one_line_and_exit_2(tmp_path: Path) -> None:
    doc = k.policy_doc([k.rule_doc(ttl="1h"), k.rule_doc("second", audience="*")])
    (tmp_path / "policy.yaml").write_text(k.dump(doc), encoding="utf-8")
    line = one_line_error(policy_paths(tmp_path / "policy.yaml", "--format", "json"))
    assert "more problem(s)" in line
    (tmp_path / "junk.yaml").write_text("rules: [unclosed\n", encoding="utf-8")
    assert "junk.yaml" in one_line_error(policy_paths(tmp_path / "junk.yaml"))


def test_html_without_graphviz_names_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    page = tmp_path / "page.html"
    line = one_line_error(policy_paths(EXAMPLES[0], "--format", "html", "--out", page))
    assert "graphviz" in line and not page.exists()


def test_out_writes_the_file_or_says_why_not(tmp_path: Path) -> None:
    out = tmp_path / "paths.json"
    assert ok(EXAMPLES[0], "--format", "json", "--out", out) == ""
    assert json.loads(out.read_text(encoding="utf-8"))["paths"]
    line = one_line_error(policy_paths(EXAMPLES[0], "--out", tmp_path / "no" / "dir" / "x.md"))
    assert "cannot write" in line


def test_run_takes_a_namespace_as_the_cli_passes_it(capsys: pytest.CaptureFixture[str]) -> None:
    args = argparse.Namespace(policy=str(EXAMPLES[1]), format="dot", out=None)
    assert paths.run(args) == 0
    assert capsys.readouterr().out.startswith("digraph trust_paths {")
