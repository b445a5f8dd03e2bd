"""The shipped Envoy configs and the extauthz they run beside agree on the worker ports: as
many endpoints in the `extauthz` cluster as worker processes listen, at the ports they listen
on. An extra endpoint would stay unhealthy forever (and alert); a missing one would never get
a check."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from test_deploy import render

from extauthz.cli import parser

ROOT = Path(__file__).resolve().parent.parent


def extauthz_ports(config: dict[str, Any]) -> list[int]:
    (cluster,) = [c for c in config["static_resources"]["clusters"] if c["name"] == "extauthz"]
    return [
        e["endpoint"]["address"]["socket_address"]["port_value"]
        for group in cluster["load_assignment"]["endpoints"]
        for e in group["lb_endpoints"]
    ]


def worker_ports(args: list[str]) -> list[int]:
    """The gRPC ports `extauthz ARGS` listens on: base, base+1, ... one per worker."""
    parsed = parser().parse_args(args)
    base = int(parsed.grpc_address.rsplit(":", 1)[1])
    return [base + i for i in range(parsed.workers)]


def test_envoy_yaml_lists_the_one_port_plain_serve_listens_on() -> None:
    config = yaml.safe_load((ROOT / "envoy.yaml").read_text())
    assert extauthz_ports(config) == worker_ports(["serve", "--policy", "p.yaml"]) == [9191]


def test_the_sidecar_envoy_lists_exactly_the_pods_workers() -> None:
    config = yaml.safe_load((ROOT / "deploy" / "envoy" / "sidecar.yaml").read_text())
    pod = next(d for d in render("example") if d["kind"] == "Deployment")["spec"]["template"]
    (extauthz,) = [c for c in pod["spec"]["initContainers"] if c["name"] == "extauthz"]
    ports = worker_ports(extauthz["args"])
    assert len(ports) >= 2  # the pod runs workers: the check is not one endpoint against one
    assert extauthz_ports(config) == ports
