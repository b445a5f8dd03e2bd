"""What the figures were measured on: recorded next to them in every result file."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from typing import Any

LIBRARIES = ("grpcio", "protobuf", "cryptography", "PyJWT", "xds-protos", "prometheus-client")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def envoy_version() -> str | None:
    try:
        from extauthz.demo.envoy import envoy_binary

        out = subprocess.run(
            [envoy_binary(), "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, RuntimeError, subprocess.TimeoutExpired):
        return None
    text = out.stdout.strip().split("version:")[-1].strip()
    return text or None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def describe() -> dict[str, Any]:
    cpu_model = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "libraries": {name: _version(name) for name in LIBRARIES},
        "envoy": envoy_version(),
        "load_average_at_start": load_average(),
    }
