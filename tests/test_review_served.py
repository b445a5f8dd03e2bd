"""``review`` and ``policy paths`` on what a real ``extauthz serve`` logged behind a real
Envoy: the shipped example policy, traffic allowed and denied, then the review of its log and
a suggestion that ``policy diff`` calls narrowing only."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from clikit import in_process

from extauthz.demo.stack import WORKLOADS, Mesh

pytestmark = pytest.mark.envoy
PROFILE_HOST = "profile.shop.svc.cluster.local"


def test_review_of_a_served_log(tmp_path: Path) -> None:
    with Mesh(tmp_path / "mesh") as mesh:
        now = time.time()
        good = mesh.idp.token(now=now, scope="profile.read email")
        for _ in range(3):
            sent = mesh.request(
                "orders",
                host=PROFILE_HOST,
                path="/v1/customers/42",
                headers={"authorization": f"Bearer {good}"},
            )
            assert sent.status == 200
        denied = mesh.request(
            "billing",
            host=PROFILE_HOST,
            path="/v1/customers/42",
            headers={"authorization": f"Bearer {good}"},
        )
        assert denied.status == 403
        lines = mesh.sidecar.decisions()
        log = mesh.sidecar.decision_log
        policy = mesh.policy
        assert len(lines) == 4 and all(line["decision_id"] for line in lines)
        report = in_process("review", "--policy", policy, log, "--format", "json")
        assert report.returncode == 0, report.stderr
        doc = json.loads(report.stdout)
        rules = {r["id"]: r for r in doc["rules"]}
        read = rules["orders-read-profile"]
        assert read["allowed"] == 3 and read["callers_seen"] == {WORKLOADS["orders"]: 3}
        assert read["scopes_granted"] == {"profile.read": 3}
        assert doc["window"]["lines"] == 4
        assert doc["without_rule"]["lines"] == 1
        assert doc["revisions"]["other"] == {}
        unused = set(doc["unused_rules"])
        assert "orders-read-profile" not in unused and unused
        out = tmp_path / "mesh" / "narrowed.yaml"
        suggested = in_process("review", "--policy", policy, log, "--suggest", out)
        assert suggested.returncode == 0, suggested.stderr
        diff = in_process("policy", "diff", policy, out, "--format", "json")
        assert diff.returncode == 0, diff.stdout
        changes = json.loads(diff.stdout)["changes"]
        assert changes and {c["effect"] for c in changes} <= {"narrows", "neutral"}
        paths = in_process("policy", "paths", policy, "--format", "md")
        assert paths.returncode == 0 and "orders-read-profile" in paths.stdout
