"""/metrics after a scripted set of Checks against a fresh sidecar: exact counts per decision,
reason and rule, minted tokens, latency buckets, cache hits and misses, and the gauges."""

from __future__ import annotations

import math
import time
from pathlib import Path

from opskit import QUICK, RULE, Checker, Metrics, http_status, minted, statusz, write_key

from extauthz import __version__
from extauthz.decision.jose import generate_signing_key
from extauthz.demo.idp import Idp
from extauthz.demo.stack import ISSUER, SidecarProcess


def test_metrics_after_scripted_checks(tmp_path: Path, example_policy_text: str) -> None:
    idp = Idp(ISSUER)
    idp.write_jwks(tmp_path / "issuers" / "corp-idp.json")
    policy = tmp_path / "policy.yaml"
    policy.write_text(example_policy_text)
    key = generate_signing_key()
    key_file = write_key(key, tmp_path / "signing-key.pem")
    started_at = time.time()
    with SidecarProcess(policy, [key_file], tmp_path / "s", extra_args=QUICK) as sidecar:
        before = Metrics.scrape(sidecar.admin_port)
        checker = Checker(sidecar.grpc_port)
        try:
            repeated = idp.token(now=time.time())
            outsider = idp.token(now=time.time())
            script = [
                ("orders", repeated, 200),  # subject cache: miss
                ("orders", repeated, 200),  # hit
                ("orders", idp.token(now=time.time()), 200),  # miss
                ("billing", outsider, 403),  # no_rule; miss
                ("billing", outsider, 403),  # no_rule; hit
                ("orders", None, 401),  # token_missing; no lookup
                ("orders", idp.token(now=time.time(), scope="email"), 403),  # miss
            ]
            for workload, token, status in script:
                response = checker.check(token, workload=workload)
                assert http_status(response) == status
                if status == 200:
                    assert minted(response).header["kid"] == key.kid
        finally:
            checker.close()
        after = Metrics.scrape(sidecar.admin_port)
        status = statusz(sidecar.admin_port)

    # Every series an alert reads exists from the start, at 0.
    assert {s.value for s in before.matching("extauthz_decisions_total")} == {0}
    started = {
        (s.labels["decision"], s.labels["reason"], s.labels["rule"])
        for s in before.matching("extauthz_decisions_total")
    }
    assert {("deny", "internal_error", ""), ("allow", "allowed", RULE)} <= started
    assert before.matching("extauthz_tokens_minted_total", rule=RULE)[0].value == 0
    assert before.matching("extauthz_cache_requests_total", result="hit")[0].value == 0
    decisions = {
        (s.labels["decision"], s.labels["reason"], s.labels["rule"]): s.value
        for s in after.matching("extauthz_decisions_total", shadow="false")
        if s.value
    }
    assert decisions == {
        ("allow", "allowed", RULE): 3,
        ("deny", "no_rule", ""): 2,
        ("deny", "token_missing", ""): 1,
        ("deny", "insufficient_scope", RULE): 1,
    }
    assert after.value("extauthz_decisions_total", shadow="true") == 0
    assert after.value("extauthz_tokens_minted_total") == 3
    assert after.value("extauthz_tokens_minted_total", rule=RULE) == 3

    assert after.value("extauthz_decision_duration_seconds_count") == 7
    buckets = {
        float(s.labels["le"]): s.value
        for s in after.matching("extauthz_decision_duration_seconds_bucket")
    }
    for bound in (0.00005, 0.0001, 0.00025, 0.0005, 0.001):
        assert bound in buckets, f"no bucket le={bound}"
    assert buckets[math.inf] == 7
    counts = [buckets[b] for b in sorted(buckets)]
    assert counts == sorted(counts)  # cumulative

    assert after.value("extauthz_cache_requests_total", cache="subject", result="hit") == 2
    assert after.value("extauthz_cache_requests_total", cache="subject", result="miss") == 4

    assert after.value("extauthz_policy_generation") == 1
    assert after.value("extauthz_policy_rules") == 3
    assert after.value("extauthz_signing_key_info", kid=key.kid, active="true") == 1
    assert after.value("extauthz_signing_key_info", active="true") == 1
    assert after.value("extauthz_ready") == 1
    # The first load of each input counts as one success; nothing failed.
    for kind, issuer in (("policy", ""), ("signing_keys", ""), ("jwks", "corp-idp")):
        labels = {"input": kind, "issuer": issuer}
        assert after.value("extauthz_reloads_total", **labels, result="success") == 1
        assert after.matching("extauthz_reloads_total", **labels, result="failure")[0].value == 0
        assert after.value("extauthz_input_ok", **labels) == 1
        stamp = after.value("extauthz_last_reload_success_timestamp_seconds", **labels)
        assert started_at <= stamp <= time.time()
    assert after.value("extauthz_policy_info", revision=status["policy"]["sha256"][:16]) == 1
    (build,) = after.matching("extauthz_build_info")
    assert build.labels["version"] == __version__ and build.labels["python"]
    assert not [s for s in after.samples if "pid" in s.labels]
