"""The one reader of what a Snapshot is made of, and the one place a Snapshot is assembled.

``read_inputs`` reads the policy file, every issuer JWKS file it names and the signing key
files, each once, and digests exactly the bytes it read (so a reload can tell "nothing
changed" without reading anything twice). ``assemble`` pairs a policy with issuer keys and our
signing keys. ``serve`` (on start and on every reload), ``explain``, ``simulate``, ``policy
test`` and the tests all build their Snapshots here.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from extauthz.decision.jose import (
    MAX_JWKS_BYTES,
    IssuerKeys,
    SigningKey,
    parse_jwks,
    private_key_pem,
    signing_key_from_pem,
)
from extauthz.decision.model import Policy, Snapshot
from extauthz.errors import KeyLoadError
from extauthz.policy.compiler import load_policy
from extauthz.policy.sources import policy_files

__all__ = [
    "Inputs",
    "assemble",
    "key_files",
    "load_issuer_keys",
    "load_jwks_file",
    "load_signing_key",
    "own_keys",
    "policy_files",
    "read_inputs",
    "write_private_key",
]


@dataclass(frozen=True, slots=True)
class Inputs:
    """Everything read from disk in one go."""

    policy: Policy
    file_keys: Mapping[str, IssuerKeys]  # issuers whose JWKS is a file, by issuer id
    signing: tuple[tuple[str, SigningKey], ...]  # (path, key), sorted by path
    digest: str  # over the contents of every input, to skip no-op reloads


def read_inputs(
    policy_path: Path,
    key_paths: Sequence[Path],
    *,
    compile_policy: Callable[[Path], Policy] = load_policy,
    dev_key: SigningKey | None = None,
) -> Inputs:
    """Read and check every input; raise ``PolicyError`` or ``KeyLoadError`` naming what is
    wrong. ``dev_key`` replaces the key files (``serve --dev``)."""
    policy = compile_policy(policy_path)
    digest = hashlib.sha256(policy.digest.encode())
    file_keys: dict[str, IssuerKeys] = {}
    problems: list[str] = []
    for issuer in sorted(policy.issuers.values(), key=lambda i: i.id):
        if issuer.jwks.file is None:
            continue  # fetched from its URL in the background, never here
        try:
            data = _read_bounded(issuer.jwks.file, MAX_JWKS_BYTES)
            file_keys[issuer.id] = _with_path(issuer.jwks.file, parse_jwks, data)
        except KeyLoadError as exc:
            problems.append(f"trusted issuer {issuer.id}: {exc}")
            continue
        # The key material, not only the kids: a key replaced under the same kid counts.
        digest.update(issuer.id.encode() + b":" + data)
    if problems:
        raise KeyLoadError("; ".join(problems))
    if dev_key is not None:
        signing: tuple[tuple[str, SigningKey], ...] = (("(dev)", dev_key),)
    else:
        files = key_files(key_paths)
        if not files:
            raise KeyLoadError("no signing key file found in " + ", ".join(map(str, key_paths)))
        signing = tuple((str(path), load_signing_key(path)) for path in files)
    for path, key in signing:
        digest.update(f"{path}:{key.kid}".encode())
    return Inputs(policy, file_keys, signing, digest.hexdigest())


def load_issuer_keys(policy: Policy) -> dict[str, IssuerKeys]:
    """The keys of every issuer whose JWKS is a file."""
    problems: list[str] = []
    keys: dict[str, IssuerKeys] = {}
    for issuer in policy.issuers.values():
        if issuer.jwks.file is None:
            continue
        try:
            keys[issuer.id] = load_jwks_file(issuer.jwks.file)
        except KeyLoadError as exc:
            problems.append(f"trusted issuer {issuer.id}: {exc}")
    if problems:
        raise KeyLoadError("; ".join(problems))
    return keys


def assemble(
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


def own_keys(signing: Sequence[SigningKey]) -> IssuerKeys:
    """The public halves of our keys, to verify tokens we minted when they come back."""
    return IssuerKeys({k.kid: k.public() for k in signing}, ())


def key_files(paths: Sequence[Path]) -> list[Path]:
    """Files named directly, and every regular file in directories named (a mounted Secret:
    its ``..data`` machinery starts with a dot and is skipped)."""
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            out.extend(
                path / name
                for name in sorted(os.listdir(path))
                if not name.startswith(".") and (path / name).is_file()
            )
        else:
            out.append(path)
    return sorted(out, key=str)


def load_jwks_file(path: Path) -> IssuerKeys:
    """An issuer's keys from a JWKS file (at most ``MAX_JWKS_BYTES`` are read)."""
    return _with_path(path, parse_jwks, _read_bounded(path, MAX_JWKS_BYTES))


def load_signing_key(path: Path) -> SigningKey:
    """One of our signing keys from a PEM file that only its owner and group may read (a
    Kubernetes Secret mounted with ``fsGroup`` is group-readable)."""
    try:
        with path.open("rb") as fh:
            mode = os.fstat(fh.fileno()).st_mode
            if mode & 0o006:
                raise KeyLoadError(
                    f"{path}: readable or writable by others (mode {mode & 0o777:04o}); "
                    "a signing key must be 0600 or 0640 (chmod o-rwx)"
                )
            data = fh.read()
    except OSError as exc:
        raise KeyLoadError(f"{path}: {exc.strerror or exc}") from exc
    return _with_path(path, signing_key_from_pem, data)


def write_private_key(key: SigningKey, path: Path) -> None:
    """Write a private key readable by its owner only, never briefly wider."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_key_pem(key))


def _read_bounded(path: Path, limit: int) -> bytes:
    # One byte over the limit is read so that the parser can say "too large".
    try:
        with path.open("rb") as fh:
            return fh.read(limit + 1)
    except OSError as exc:
        raise KeyLoadError(f"{path}: {exc.strerror or exc}") from exc


_T = TypeVar("_T")


def _with_path(path: Path, parse: Callable[[bytes], _T], data: bytes) -> _T:
    try:
        return parse(data)
    except KeyLoadError as exc:
        raise KeyLoadError(f"{path}: {exc}") from exc
