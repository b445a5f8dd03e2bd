"""``python -m extauthz.serve.compile_child POLICY``: compile a policy in a process of its own and
write ``pickle((ok, Policy | [Problem, ...]))`` to stdout (see ``runtime.load_policy_isolated``).
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

from extauthz.errors import PolicyError
from extauthz.policy.compiler import load_policy


def main(path: str) -> int:
    try:
        result: tuple[bool, object] = (True, load_policy(Path(path)))
    except PolicyError as exc:
        result = (False, list(exc.problems))
    sys.stdout.buffer.write(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
