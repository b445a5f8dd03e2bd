"""The two policy rollout modes of the shipped manifests, rendered with the real kustomize
(`kubectl kustomize`): hot reload keeps one ConfigMap name, progressive names it by content so
a policy change is a rolling update; and in both, a pod whose policy does not load waits not
ready (``--retry-at-start``, a startup probe that does not ask for readiness) instead of
crash-looping."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_deploy import DEPLOYMENTS, KUBECTL, render

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
POLICY_NAME = "extauthz-policy"


def kustomize(directory: Path) -> list[dict[str, Any]]:
    if KUBECTL is None:
        pytest.skip("kubectl is not on PATH, so the kustomizations cannot be rendered")
    done = subprocess.run(
        [KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def deployment(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == "Deployment"]
    return found


def policy_volume(dep: dict[str, Any]) -> str:
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    name: str = volumes["policy"]["configMap"]["name"]
    return name


def policy_configmaps(docs: list[dict[str, Any]]) -> list[str]:
    return [
        d["metadata"]["name"]
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith(POLICY_NAME)
    ]


def sidecar(dep: dict[str, Any]) -> dict[str, Any]:
    (found,) = [
        c for c in dep["spec"]["template"]["spec"]["initContainers"] if c["name"] == "extauthz"
    ]
    return found


@pytest.mark.parametrize("name", ["example", "example-istio"])
def test_hot_reload_keeps_one_configmap_name(name: str) -> None:
    docs = render(name)
    assert policy_configmaps(docs) == [POLICY_NAME]
    assert policy_volume(deployment(docs)) == POLICY_NAME


def test_progressive_names_the_policy_by_content_so_a_change_rolls_the_pods(
    tmp_path: Path,
) -> None:
    shutil.copytree(ROOT / "deploy", tmp_path / "deploy")  # the components reach across it
    copy = tmp_path / "deploy" / "kubernetes"
    overlay = copy / "overlays" / "progressive"
    before = kustomize(overlay)
    (name,) = policy_configmaps(before)
    assert name.startswith(POLICY_NAME + "-")
    assert policy_volume(deployment(before)) == name

    policy = copy / "base" / "policy" / "policy.yaml"
    policy.write_text(policy.read_text() + "\n# a reviewed change\n")
    after = kustomize(overlay)
    (changed,) = policy_configmaps(after)
    assert changed != name and changed.startswith(POLICY_NAME + "-")
    old, new = deployment(before), deployment(after)
    assert policy_volume(new) == changed
    # The pod template differs in the ConfigMap's name and nothing else: a rolling update.
    for dep in (old, new):
        for volume in dep["spec"]["template"]["spec"]["volumes"]:
            if volume["name"] == "policy":
                volume["configMap"]["name"] = POLICY_NAME
    assert old["spec"]["template"] == new["spec"]["template"]

    spec = new["spec"]
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0  # halt, never shrink
    assert spec["progressDeadlineSeconds"] > 0
    assert spec["minReadySeconds"] > 0
    # The hot-reload overlays are unaffected by the copy's change.
    assert policy_configmaps(kustomize(copy / "overlays" / "example")) == [POLICY_NAME]


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_a_pod_whose_policy_does_not_load_waits_not_ready(name: str) -> None:
    container = sidecar(deployment(render(name)))
    assert "--retry-at-start" in container["args"]
    startup = "\n".join(container["startupProbe"]["exec"]["command"])
    readiness = "\n".join(container["readinessProbe"]["exec"]["command"])
    # Started means the process answers; only readiness waits for the policy and the keys,
    # so a bad policy leaves the pod up and not ready, and the kubelet never restarts it.
    assert "/healthz" in startup and "/readyz" not in startup
    assert "/readyz" in readiness
