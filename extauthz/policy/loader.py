"""Reading what a Snapshot is made of from disk: the policy, issuer JWKS files, our keys."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from extauthz.decision.jose import IssuerKeys, SigningKey, load_jwks_file, load_signing_key
from extauthz.decision.pipeline import Snapshot
from extauthz.errors import KeyLoadError
from extauthz.policy.compiler import Policy, load_policy


def load_issuer_keys(policy: Policy) -> dict[str, IssuerKeys]:
    problems: list[str] = []
    keys: dict[str, IssuerKeys] = {}
    for issuer in policy.issuers.values():
        if issuer.jwks.file is None:
            continue  # fetched from its URL in the background, never here
        try:
            keys[issuer.id] = load_jwks_file(issuer.jwks.file)
        except KeyLoadError as exc:
            problems.append(f"trusted issuer {issuer.id}: {exc}")
    if problems:
        raise KeyLoadError("; ".join(problems))
    return keys


def own_keys(signing: Sequence[SigningKey]) -> IssuerKeys:
    return IssuerKeys({k.kid: k.public() for k in signing}, ())


def build_snapshot(policy: Policy, signing: Sequence[SigningKey]) -> Snapshot:
    """Load the policy's issuer JWKS files and pair them with our keys."""
    return build_snapshot_from(policy, load_issuer_keys(policy), signing)


def build_snapshot_from(
    policy: Policy, issuer_keys: Mapping[str, IssuerKeys], signing: Sequence[SigningKey]
) -> Snapshot:
    """The first signing key signs; all of them are published and accepted for re-exchange."""
    if not signing:
        raise KeyLoadError("no signing key")
    return Snapshot(
        policy=policy,
        issuer_keys=dict(issuer_keys),
        signing_keys=tuple(signing),
        own_keys=own_keys(signing),
    )


def load_snapshot(policy_path: Path, key_paths: Sequence[Path]) -> Snapshot:
    policy = load_policy(policy_path)
    return build_snapshot(policy, [load_signing_key(p) for p in key_paths])
