"""deploy/monitoring: the alerting rules pass `promtool check rules` and their unit tests pass
`promtool test rules` (promtool from Debian's `prometheus` package, installed by .ci/run); every
alert has a case where it fires and one where it does not, and a broken rule fails them; every
metric the rules and the dashboard name exists in a real scrape of `extauthz serve` (single
process and workers) and of a real Envoy after a check; the scrape paths match the pods."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from test_deploy import render
from test_workers import start_workers

from extauthz.demo.stack import Mesh, SidecarProcess, http_get

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "deploy" / "monitoring"
RULES = MONITORING / "prometheusrule.yaml"
RULE_TESTS = MONITORING / "rules.test.yaml"
DASHBOARD = MONITORING / "dashboard.json"
PROMTOOL = shutil.which("promtool")
# A metric name, not a label name (those are followed by a matcher: =, !=, =~ or !~).
NAME = re.compile(r"(?<!\$)\b((?:extauthz|envoy|process)_[a-z0-9_]+)\b(?!\s*(?:=|!=|!~))")


def promtool() -> str:
    if PROMTOOL is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing: .ci/run installs Debian's prometheus package")
        pytest.skip("promtool is not on PATH (apt-get install prometheus)")
    return PROMTOOL


def rule_spec(text: str | None = None) -> dict[str, Any]:
    doc = yaml.safe_load(text if text is not None else RULES.read_text())
    assert doc["kind"] == "PrometheusRule"
    spec: dict[str, Any] = doc["spec"]
    return spec


def run_rule_tests(directory: Path, spec: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """The shipped unit tests against ``spec``, laid out as the file's comment says."""
    (directory / "extauthz-rules.yaml").write_text(yaml.safe_dump(spec))
    shutil.copy(RULE_TESTS, directory / "rules.test.yaml")
    return subprocess.run(
        [promtool(), "test", "rules", "rules.test.yaml"],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def alerts() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for g in rule_spec()["groups"] for r in g["rules"] if "alert" in r}


def test_promtool_checks_the_rules(tmp_path: Path) -> None:
    rules = tmp_path / "extauthz-rules.yaml"
    rules.write_text(yaml.safe_dump(rule_spec()))
    done = subprocess.run(
        [promtool(), "check", "rules", str(rules)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in done.stdout


def test_promtool_runs_the_rule_unit_tests(tmp_path: Path) -> None:
    done = run_rule_tests(tmp_path, rule_spec())
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_has_a_case_that_fires_and_one_that_does_not() -> None:
    cases = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in cases:
        for check in case["alert_rule_test"]:
            (fires if check["exp_alerts"] else quiet).add(check["alertname"])
    assert fires == set(alerts()) == quiet
    for name, rule in alerts().items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        anchor = rule["annotations"]["runbook"].split("#", 1)[1]
        assert anchor == f"runbook-{name.lower()}", name


def test_a_broken_rule_fails_its_unit_test(tmp_path: Path) -> None:
    """The unit tests are not vacuous: the internal_error alert made blind (a threshold no
    increase reaches) and the not-ready alert slowed down both fail."""
    text = RULES.read_text()
    for broken in (
        text.replace('{reason="internal_error"}[5m])) > 0', '{reason="internal_error"}[5m])) > 5'),
        text.replace(
            "expr: extauthz_ready == 0\n          for: 5m",
            "expr: extauthz_ready == 0\n          for: 30m",
        ),
    ):
        assert broken != text
        workdir = tmp_path / str(len(list(tmp_path.iterdir())))
        workdir.mkdir()
        done = run_rule_tests(workdir, rule_spec(broken))
        assert done.returncode != 0, done.stdout
        assert "FAILED" in done.stdout + done.stderr


def names_in(expressions: list[str]) -> set[str]:
    return {m for e in expressions for m in NAME.findall(e)}


def dashboard_expressions() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert "datasource" in variables
    exprs = []
    ids = []
    for panel in dash["panels"]:
        ids.append(panel["id"])
        assert panel["title"] and panel["targets"], panel.get("title")
        assert panel["datasource"]["uid"] == "${datasource}"
        for target in panel["targets"]:
            assert target["expr"].strip()
            assert set(re.findall(r"\$(\w+)", target["expr"])) <= variables | {"__rate_interval"}
            exprs.append(target["expr"])
    assert len(ids) == len(set(ids))
    for variable in dash["templating"]["list"]:
        if variable["type"] == "query":
            exprs.append(variable["definition"])
    return exprs


def exported(text: str) -> set[str]:
    """Every sample name of a scrape, and every family's (a counter family with no sample yet,
    such as the JWKS fetches of a policy without URL issuers, still names its series)."""
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        if family.type == "counter":
            names.add(family.name + "_total")
        names.update(sample.name for sample in family.samples)
    return names


@pytest.fixture(scope="module")
def scrapes(tmp_path_factory: pytest.TempPathFactory, example_policy_text: str) -> dict[str, str]:
    """/metrics of a real single-process and a real --workers 2 extauthz, and Envoy's
    /stats/prometheus after a check went through its ext_authz filter."""
    out: dict[str, str] = {}
    workdir = tmp_path_factory.mktemp("monitoring")
    mesh = Mesh(workdir / "mesh", sidecar_args=["--no-decision-log", "--drain-delay", "0"])
    mesh.start()
    try:
        assert mesh.envoy is not None
        assert mesh.request("orders").status == 401  # one check: no token
        out["single"] = http_get(mesh.sidecar.admin_port, "/metrics")[1].decode()
        status, body = http_get(mesh.envoy.admin_port, "/stats/prometheus")
        assert status == 200
        out["envoy"] = body.decode()
    finally:
        mesh.stop()
    running = start_workers(
        workdir / "workers",
        example_policy_text,
        ["--no-decision-log", "--drain-delay", "0"],
        "grpc",
    )
    sidecar: SidecarProcess = running.sidecar
    try:
        out["workers"] = http_get(sidecar.admin_port, "/metrics")[1].decode()
    finally:
        sidecar.stop()
    return out


@pytest.mark.envoy
def test_every_metric_the_rules_and_the_dashboard_name_is_exported(
    scrapes: dict[str, str],
) -> None:
    rule_exprs = [r["expr"] for r in alerts().values()]
    wanted = names_in(rule_exprs) | names_in(dashboard_expressions())
    assert {n for n in wanted if n.startswith("extauthz_")} >= {
        "extauthz_input_ok",
        "extauthz_decisions_total",
        "extauthz_worker_restarts_total",
    }
    ours = exported(scrapes["workers"])
    envoy = exported(scrapes["envoy"])
    missing = sorted(n for n in wanted if n not in (envoy if n.startswith("envoy_") else ours))
    assert missing == []
    # Without workers the same names exist, but for the workers' own.
    single = exported(scrapes["single"])
    only_workers = {n for n in wanted if n.startswith("extauthz_worker")}
    assert sorted(n for n in wanted if n.startswith("extauthz_") and n not in single) == sorted(
        only_workers
    )


def test_the_scrape_paths_match_the_pods() -> None:
    """The PodMonitor's port is one the plain-Envoy pod declares; the Istio pod's
    prometheus.io annotations point at the extauthz admin port it listens on (istio-agent
    scrapes it through localhost)."""
    monitor = yaml.safe_load((MONITORING / "podmonitor.yaml").read_text())
    pod = next(d for d in render("example") if d["kind"] == "Deployment")["spec"]["template"]
    ports = {
        p["name"]
        for c in pod["spec"]["containers"] + pod["spec"]["initContainers"]
        for p in c.get("ports", [])
    }
    endpoints = monitor["spec"]["podMetricsEndpoints"]
    assert {e["port"] for e in endpoints} <= ports
    assert {e["path"] for e in endpoints} == {"/metrics", "/stats/prometheus"}
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()

    istio = next(d for d in render("example-istio") if d["kind"] == "Deployment")
    template = istio["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    extauthz = next(c for c in template["spec"]["initContainers"] if c["name"] == "extauthz")
    admin = next(a for a in extauthz["args"] if a.startswith("--admin-address="))
    assert admin == f"--admin-address=127.0.0.1:{annotations['prometheus.io/port']}"
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"


def test_the_monitoring_kustomization_packages_rules_monitor_and_dashboard() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on PATH")
    done = subprocess.run(
        [kubectl, "kustomize", str(MONITORING)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    docs = [d for d in yaml.safe_load_all(done.stdout) if d]
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"PrometheusRule", "PodMonitor", "ConfigMap"}
    assert kinds["PrometheusRule"]["spec"] == rule_spec()
    dashboard = kinds["ConfigMap"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["extauthz.json"]) == json.loads(DASHBOARD.read_text())
