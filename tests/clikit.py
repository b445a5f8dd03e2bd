"""Shared by the CLI tests: running ``extauthz`` in-process, and a rule the example policy
lacks. Each command keeps at most one test through the real entry point in a child process,
where its exit code and output, or what another process sees, is the point."""

from __future__ import annotations

import io
import subprocess
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from extauthz.cli import main


def in_process(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """``extauthz ARGS`` run in this process (fast); same shape as a subprocess result. Any
    other exception propagates: in a child process it would be a traceback."""
    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse refusing the command line
            code = exc.code if isinstance(exc.code, int) else 1
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


# A rule for examples/policy.yaml that no shipped case reaches and that widens its grants.
EXTRA_RULE = """
  - id: orders-delete-profile
    purpose: The order service erases a customer's profile on request
    match:
      workloads: [spiffe://cluster.local/ns/shop/sa/orders]
      host: profile.shop.svc.cluster.local
      methods: [DELETE]
      paths: ["/v1/customers/{id}"]
      issuers: [corp-idp]
    require: {scopes: [profile.delete]}
    grant:
      audience: spiffe://cluster.local/ns/shop/sa/profile
      scopes: [profile.delete]
      ttl: 15s
"""
