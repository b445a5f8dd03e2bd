"""Shared fixtures for the tests that run real processes on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def example_policy_text() -> str:
    """The shipped example policy (examples/policy.yaml), as text."""
    return (ROOT / "examples" / "policy.yaml").read_text(encoding="utf-8")
