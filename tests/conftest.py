"""Shared fixtures for the tests that run real processes on loopback, and the ``envoy`` marker's
guard."""

from __future__ import annotations

from pathlib import Path

import pytest

from extauthz.demo import envoy

ROOT = Path(__file__).resolve().parent.parent
_UNPATCH = pytest.StashKey[pytest.MonkeyPatch]()


def _no_envoy() -> str:
    raise AssertionError("this test runs Envoy: mark it with @pytest.mark.envoy")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Keep ``-m "not envoy"`` honest: without the marker, starting or validating Envoy through
    the harness fails (fixtures included, since they are set up after this hook)."""
    if item.get_closest_marker("envoy") is None:
        patch = pytest.MonkeyPatch()
        patch.setattr(envoy, "envoy_binary", _no_envoy)
        item.stash[_UNPATCH] = patch


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    patch = item.stash.get(_UNPATCH, None)
    if patch is not None:
        patch.undo()


@pytest.fixture(scope="session")
def example_policy_text() -> str:
    """The shipped example policy (examples/policy.yaml), as text."""
    return (ROOT / "examples" / "policy.yaml").read_text(encoding="utf-8")
