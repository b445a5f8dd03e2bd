"""Which files a policy path consists of, and reading them within the limits.

A policy is one YAML file, or a directory of them: every ``*.yaml`` and ``*.yml`` in it, sorted
by name. Entries starting with a dot are skipped and symlinks are followed, which is how a
Kubernetes ConfigMap or projected volume lays its keys out (``name.yaml -> ..data/name.yaml``,
``..data -> ..2026_12_02_10_00_00.123``): the visible names are the keys, the dot entries the
machinery that swaps them all at once.

The limits follow from that volume: one ConfigMap holds at most 1 MiB (1,048,576 bytes, keys
included), so one file may have ``MAX_FILE_BYTES`` (the rest is left for the key names and the
object's metadata), and a directory ``MAX_TOTAL_BYTES`` in all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from extauthz.errors import PolicyError, Problem

__all__ = [
    "MAX_FILE_BYTES",
    "MAX_TOTAL_BYTES",
    "SUFFIXES",
    "Source",
    "policy_files",
    "read",
    "read_one",
]

MAX_FILE_BYTES = 1_000_000
MAX_TOTAL_BYTES = 16 * 1024 * 1024
SUFFIXES = (".yaml", ".yml")

_SPLIT = "split its rules over more files"


@dataclass(frozen=True, slots=True)
class Source:
    """One policy file's text, named as the operator named it (not its symlink target)."""

    name: str
    text: str


def policy_files(path: Path) -> list[Path]:
    """The files ``path`` consists of: itself when it is not a directory, else its ``*.yaml``
    and ``*.yml`` entries (symlinks followed, dot entries skipped) sorted by name. Never
    raises: a directory that cannot be listed has no files (``read`` says why), so a watcher
    can call this on every poll."""
    if not path.is_dir():
        return [path]
    try:
        names = sorted(os.listdir(path))
    except OSError:
        return []
    return [
        path / name
        for name in names
        if not name.startswith(".") and name.endswith(SUFFIXES) and (path / name).is_file()
    ]


def read(path: Path) -> list[Source]:
    """The text of every file of the policy at ``path``, each at most ``MAX_FILE_BYTES`` and
    all together at most ``MAX_TOTAL_BYTES``, UTF-8. Raises ``PolicyError`` naming each file
    that cannot be used and the limit it breaks."""
    files = policy_files(path)
    if path.is_dir() and not files:
        try:
            os.listdir(path)
            message = "holds no *.yaml or *.yml file"
        except OSError as exc:
            message = f"cannot read: {exc.strerror or exc}"
        fix = "put the policy's YAML files in this directory, or name the policy file"
        raise PolicyError([Problem(str(path), "", "", message, fix=fix)])
    problems: list[Problem] = []
    sources: list[Source] = []
    total = 0
    for file in files:
        source, size = _read(file)
        total += size
        if isinstance(source, Problem):
            problems.append(source)
        else:
            sources.append(source)
    if total > MAX_TOTAL_BYTES:
        problems.append(
            Problem(
                str(path),
                "",
                "",
                f"its files hold {total:,} bytes, over the {MAX_TOTAL_BYTES:,}-byte limit "
                "of a whole policy",
                fix="remove rules that are no longer needed; a policy this large is hard to review",
            )
        )
    if problems:
        raise PolicyError(problems)
    return sources


def read_one(path: Path) -> Source:
    """The text of one policy file, within ``MAX_FILE_BYTES``. Raises ``PolicyError``."""
    source, _size = _read(path)
    if isinstance(source, Problem):
        raise PolicyError([source])
    return source


def _read(file: Path) -> tuple[Source | Problem, int]:
    # One byte over the limit is read, to tell "too large" without reading a huge file.
    name = str(file)
    try:
        with file.open("rb") as fh:
            data = fh.read(MAX_FILE_BYTES + 1)
            size = max(os.fstat(fh.fileno()).st_size, len(data))
    except OSError as exc:
        return Problem(name, "", "", f"cannot read: {exc.strerror or exc}"), 0
    if len(data) > MAX_FILE_BYTES:
        message = f"larger than {MAX_FILE_BYTES:,} bytes, the limit of one policy file"
        fix = f"{_SPLIT} of at most {MAX_FILE_BYTES:,} bytes each (one per ConfigMap)"
        return Problem(name, "", "", message, fix=fix), size
    try:
        return Source(name, data.decode("utf-8")), size
    except UnicodeDecodeError:
        return Problem(name, "", "", "not UTF-8", fix="save the file as UTF-8"), size
