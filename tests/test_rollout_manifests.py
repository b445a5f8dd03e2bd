"""Rollout safety of the shipped manifests: the shutdown order and its timings, the
disruption budget, topology spread, the Istio overlay's NetworkPolicy, and that Envoy lists
exactly the extauthz workers that run."""

from __future__ import annotations

import re
from typing import Any

import yaml
from test_deploy import (
    ENVOY_DIR,
    ROOT,
    SIDECAR,
    container,
    flags,
    needs_kubectl,
    one,
    pod_spec,
    port_of,
    render,
    validate_doc,
)

from extauthz.cli import parser


def authz_ports(config: dict[str, Any]) -> list[int]:
    (cluster,) = [c for c in config["static_resources"]["clusters"] if c["name"] == "extauthz"]
    return [
        lb["endpoint"]["address"]["socket_address"]["port_value"]
        for group in cluster["load_assignment"]["endpoints"]
        for lb in group["lb_endpoints"]
    ]


def test_top_level_envoy_lists_the_workers_serve_starts_by_default() -> None:
    args = parser().parse_args(["serve", "--policy", "p.yaml", "--signing-key", "k"])
    base = port_of(args.grpc_address)
    for name in ("envoy.yaml", "extauthz/assets/envoy.yaml"):
        config = yaml.safe_load((ROOT / name).read_text())
        assert authz_ports(config) == [base + i for i in range(args.workers)], name


@needs_kubectl
def test_sidecar_envoy_lists_the_workers_the_manifest_starts() -> None:
    args = flags(container(pod_spec(render("example")), SIDECAR)["args"])
    base, workers = port_of(args["--grpc-address"]), int(args["--workers"])
    config = yaml.safe_load((ENVOY_DIR / "sidecar.yaml").read_text())
    assert authz_ports(config) == [base + i for i in range(workers)]


@needs_kubectl
def test_shutdown_order_fits_the_grace_period() -> None:
    spec = pod_spec(render("example"))
    envoy = flags(container(spec, "envoy")["args"])
    drain = float(envoy["--drain-time-s"])
    assert envoy["--drain-strategy"] == "immediate"
    script = container(spec, "app")["lifecycle"]["preStop"]["exec"]["command"][-1]
    admin = yaml.safe_load((ENVOY_DIR / "sidecar.yaml").read_text())["admin"]
    assert f'"127.0.0.1", {admin["address"]["socket_address"]["port_value"]}' in script
    assert "/healthcheck/fail" in script and "/drain_listeners?graceful" in script
    (wait,) = re.findall(r"time\.sleep\((\d+)\)", script)
    # The application outlives Envoy's drain; extauthz is stopped last (a native sidecar).
    assert float(wait) > drain
    sidecar = flags(container(spec, SIDECAR)["args"])
    extauthz_stop = float(sidecar.get("--drain-delay", "1")) + float(sidecar.get("--grace", "10"))
    assert float(wait) + extauthz_stop < spec["terminationGracePeriodSeconds"]
    assert [c["name"] for c in spec["initContainers"]] == [SIDECAR, "envoy"]
    base = pod_spec(render("base"))
    assert container(base, "app")["lifecycle"]["preStop"]["sleep"]["seconds"] > 0


@needs_kubectl
def test_disruption_budget_and_spread() -> None:
    for name in ("base", "example", "example-istio"):
        docs = render(name)
        labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
        budget = one(docs, "PodDisruptionBudget")
        validate_doc(budget)
        assert budget["spec"]["maxUnavailable"] == 1
        assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
        spread = pod_spec(docs)["topologySpreadConstraints"]
        assert {c["topologyKey"] for c in spread} == {
            "topology.kubernetes.io/zone",
            "kubernetes.io/hostname",
        }
        for constraint in spread:
            assert constraint["whenUnsatisfiable"] == "ScheduleAnyway"
            assert constraint["labelSelector"]["matchLabels"].items() <= labels.items()


@needs_kubectl
def test_istio_overlay_admits_only_mesh_ports() -> None:
    docs = render("example-istio")
    policy = one(docs, "NetworkPolicy")
    validate_doc(policy)
    allowed = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    app_port = container(pod_spec(docs), "app")["ports"][0]["containerPort"]
    assert allowed == {app_port, 15008, 15020, 15090}
    sidecar = flags(container(pod_spec(docs), SIDECAR)["args"])
    assert port_of(sidecar["--grpc-address"]) not in allowed
