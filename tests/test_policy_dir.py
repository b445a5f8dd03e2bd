"""A policy from a directory of files: one file with the shared sections, one per team with its
rules, compiled as one table; the Kubernetes ConfigMap layout; the limits; every policy tool."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from clikit import in_process

from bench.fixtures import policy_files as bench_policy_files
from extauthz.decision.jose import generate_signing_key
from extauthz.errors import PolicyError
from extauthz.policy import sources
from extauthz.policy.compiler import load_policy, read_policy_text
from extauthz.policy.loader import policy_files, read_inputs, write_private_key
from extauthz.serve.decision_log import record
from extauthz.serve.runtime import load_policy_isolated
from extauthz.tools.simulate import SimRequest, Simulator

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "policy.yaml"
BASE = EXAMPLE.read_text(encoding="utf-8")
HEAD, _, RULES = BASE.partition("rules:\n")
# The example's rules, one block each ("  - id: ..." up to the next one).
BLOCKS = ["  - id:" + block for block in RULES.split("  - id:")[1:]]
ORDERS = "rules:\n" + "".join(BLOCKS[:2])
CHECKOUT = "rules:\n" + BLOCKS[2]
NOW = 1_800_000_000.0


def layout(directory: Path, files: dict[str, str]) -> Path:
    """A policy directory: the given files, and the example's issuer JWKS beside them."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "examples" / "issuers", directory / "issuers", dirs_exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text, encoding="utf-8")
    return directory


def team_dir(directory: Path, **more: str) -> Path:
    files = {"00-shared.yaml": HEAD, "orders.yaml": ORDERS, "checkout.yaml": CHECKOUT}
    more_files = {name.replace("_yaml", ".yaml").replace("_", "-"): t for name, t in more.items()}
    return layout(directory, files | more_files)


def problems(path: Path) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    return [str(p) for p in caught.value.problems]


def test_a_directory_compiles_to_the_same_table_as_the_one_file(tmp_path: Path) -> None:
    directory = team_dir(tmp_path / "policy")
    policy, single = load_policy(directory), load_policy(EXAMPLE)
    assert sorted(r.id for r in policy.rules) == sorted(r.id for r in single.rules)
    assert policy.files == tuple(
        str(directory / n) for n in ("00-shared.yaml", "checkout.yaml", "orders.yaml")
    )
    by_id = {r.id: r for r in policy.rules}
    assert by_id["checkout-charge-payment"].file == str(directory / "checkout.yaml")
    assert by_id["checkout-charge-payment"].line == 2
    assert by_id["orders-update-address"].file == str(directory / "orders.yaml")
    found = policy.find_rule(
        "payments.shop.svc.cluster.local",
        "POST",
        ("v1", "charges"),
        "spiffe://cluster.local/ns/shop/sa/checkout",
        "corp-idp",
    )
    assert found is not None and found.id == "checkout-charge-payment"
    # The revision is of the files' names and texts, not of where they are mounted.
    elsewhere = shutil.copytree(directory, tmp_path / "mounted" / "elsewhere")
    assert load_policy(elsewhere).digest == policy.digest
    # The JWKS path is relative to the directory, as it is to a single file's directory.
    assert policy.issuers["corp-idp"].jwks.file == directory / "issuers" / "corp-idp.json"


def test_files_are_read_sorted_by_name_yml_too_dot_entries_and_others_skipped(
    tmp_path: Path,
) -> None:
    directory = team_dir(tmp_path / "p")
    (directory / "orders.yaml").rename(directory / "b-orders.yml")
    (directory / ".hidden.yaml").write_text("not: [valid", encoding="utf-8")
    (directory / "README.md").write_text("# notes\n", encoding="utf-8")
    (directory / "sub.yaml").mkdir()
    names = [p.name for p in policy_files(directory)]
    assert names == ["00-shared.yaml", "b-orders.yml", "checkout.yaml"]
    assert len(load_policy(directory).rules) == 3
    assert policy_files(directory / "00-shared.yaml") == [directory / "00-shared.yaml"]


def test_a_kubernetes_configmap_volume_layout_loads_and_swaps(tmp_path: Path) -> None:
    """What the kubelet writes for a ConfigMap (or a projected volume of several): the keys in
    a timestamped directory, ``..data`` pointing at it, and one symlink per key through it."""
    mount = tmp_path / "policy"
    mount.mkdir()
    jwks = tmp_path / "corp-idp.json"
    shutil.copy(ROOT / "examples" / "issuers" / "corp-idp.json", jwks)
    shared = HEAD.replace("{file: issuers/corp-idp.json}", f"{{file: {jwks}}}")

    def publish(stamp: str, files: dict[str, str]) -> None:
        data = mount / f"..{stamp}"
        data.mkdir()
        for name, text in files.items():
            (data / name).write_text(text, encoding="utf-8")
        (mount / "..data_tmp").symlink_to(data.name)
        os.replace(mount / "..data_tmp", mount / "..data")  # the atomic swap
        for name in files:
            if not (mount / name).is_symlink():
                (mount / name).symlink_to(f"..data/{name}")

    first = {"shared.yaml": shared, "team-orders.yaml": ORDERS, "team-checkout.yaml": CHECKOUT}
    publish("2026_12_02_20_00_00.000000001", first)
    assert sorted(os.listdir(mount)) == [
        "..2026_12_02_20_00_00.000000001",
        "..data",
        "shared.yaml",
        "team-checkout.yaml",
        "team-orders.yaml",
    ]
    files = policy_files(mount)
    assert [p.name for p in files] == ["shared.yaml", "team-checkout.yaml", "team-orders.yaml"]
    before = load_policy(mount)
    assert len(before.rules) == 3
    assert {r.file for r in before.rules} == {
        str(mount / "team-checkout.yaml"),
        str(mount / "team-orders.yaml"),
    }
    real_before = [os.path.realpath(p) for p in files]

    publish("2026_12_02_20_05_00.000000002", first | {"team-checkout.yaml": "rules: []\n"})
    after = load_policy(mount)
    assert [r.id for r in after.rules] == ["orders-read-profile", "orders-update-address"]
    assert after.digest != before.digest
    # What a watcher stats: the same names, every one now resolving somewhere else.
    assert policy_files(mount) == files
    assert all(os.path.realpath(p) != r for p, r in zip(files, real_before, strict=True))


def test_a_second_file_with_a_shared_key_is_refused_naming_both(tmp_path: Path) -> None:
    extra = "exchange:\n  issuer: https://other.example.com\nrules: []\n"
    directory = team_dir(tmp_path / "p", z_other_yaml=extra)
    shared_line = HEAD.splitlines().index("exchange:") + 1
    assert problems(directory) == [
        f"{directory / 'z-other.yaml'}:1: exchange: is a shared key, and "
        f"{directory / '00-shared.yaml'}:{shared_line} holds the shared keys already: one file "
        "of a policy directory holds them, the others only `rules`"
    ]


def test_a_rule_id_used_in_two_files_names_both_files_and_lines(tmp_path: Path) -> None:
    again = "rules:\n" + BLOCKS[0].replace("/v1/customers/{id}", "/v2/customers/{id}")
    directory = team_dir(tmp_path / "p", z_again_yaml=again)
    assert problems(directory) == [
        f"{directory / 'z-again.yaml'}:2: rules[0] (orders-read-profile): id: is used by "
        f"another rule ({directory / 'orders.yaml'}:2)"
    ]


def test_an_overlap_between_files_names_both_files_and_lines(tmp_path: Path) -> None:
    twin = "rules:\n" + BLOCKS[0].replace("id: orders-read-profile", "id: orders-read-twin")
    directory = team_dir(tmp_path / "p", z_twin_yaml=twin)
    found = problems(directory)
    assert len(found) == 1
    assert found[0].startswith(
        f"{directory / 'z-twin.yaml'}:4: rules (orders-read-twin): match: overlaps rule "
        f"'orders-read-profile' ({directory / 'orders.yaml'}:2) on GET /v1/customers/{{id}}"
    )


def test_a_rules_file_without_rules_or_with_a_typo_says_so(tmp_path: Path) -> None:
    directory = team_dir(tmp_path / "p", z_empty_yaml="{}\n", z_typo_yaml="rule: []\n")
    assert problems(directory) == [
        f"{directory / 'z-empty.yaml'}:1: rules: is required",
        f"{directory / 'z-typo.yaml'}:1: rule: unknown field `rule`: did you mean `rules`?",
    ]


def test_a_directory_without_shared_keys_or_files_is_one_line(tmp_path: Path) -> None:
    directory = layout(tmp_path / "p", {"orders.yaml": ORDERS})
    assert problems(directory) == [
        f"{directory}: no file holds the shared keys (apiVersion, kind, exchange, "
        "trustedIssuers, workloads)"
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert problems(empty) == [f"{empty}: holds no *.yaml or *.yml file"]
    assert policy_files(empty) == []


def test_each_file_has_the_configmap_limit_and_the_whole_a_total_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = "rules:\n" + "#" * sources.MAX_FILE_BYTES + "\n"
    directory = team_dir(tmp_path / "p", z_big_yaml=big)
    assert problems(directory) == [
        f"{directory / 'z-big.yaml'}: larger than 1,000,000 bytes, the limit of one policy file"
    ]
    with pytest.raises(PolicyError) as caught:
        read_policy_text(directory / "z-big.yaml")
    assert "split its rules over more files" in caught.value.problems[0].fix

    monkeypatch.setattr(sources, "MAX_TOTAL_BYTES", 2000)
    total = sum(p.stat().st_size for p in policy_files(team_dir(tmp_path / "q")))
    assert problems(tmp_path / "q") == [
        f"{tmp_path / 'q'}: its files hold {total:,} bytes, over the 2,000-byte limit of a "
        "whole policy"
    ]


def test_ten_thousand_documented_rules_in_configmap_sized_files_load(tmp_path: Path) -> None:
    files, target = bench_policy_files(10_000)
    assert len(files) > 2
    assert all(len(text.encode()) <= sources.MAX_FILE_BYTES for text in files.values())
    # One file could not hold them: the limit is per file, and the directory is the way.
    assert sum(len(text.encode()) for text in files.values()) > 4 * sources.MAX_FILE_BYTES
    directory = layout(tmp_path / "big", files)
    policy = load_policy_isolated(directory)  # large: compiled in a child process
    assert len(policy.rules) == 10_000
    segments = tuple(target.path.split("?")[0].strip("/").split("/"))
    found = policy.find_rule(target.host, "GET", segments, target.workload, "corp-idp")
    assert found is not None and found.id == "r09999"
    assert found.file == str(directory / sorted(files)[-1])


def test_the_decision_log_names_the_rules_file(tmp_path: Path) -> None:
    directory = team_dir(tmp_path / "p")
    sim = Simulator(load_policy(directory))
    request = SimRequest(
        workload="spiffe://cluster.local/ns/shop/sa/checkout",
        method="POST",
        host="payments.shop.svc.cluster.local",
        path="/v1/charges",
        issuer="corp-idp",
        claims={"scope": "payments.charge", "sub": "alice"},
        certificate=True,
    )
    decision = sim.decide(sim.check_input(request, NOW), NOW)
    line = record(decision, 0.001, "req-1", NOW)
    assert line["decision"] == "allow" and line["rule"] == "checkout-charge-payment"
    assert line["rule_file"] == str(directory / "checkout.yaml")


# --- every policy tool takes a directory ----------------------------------------------------


def test_lint_a_directory_reports_each_finding_in_its_own_file(tmp_path: Path) -> None:
    long_ttl = CHECKOUT.replace("ttl: 15s", "ttl: 120s")
    directory = team_dir(tmp_path / "p", checkout_yaml=long_ttl)
    result = in_process("policy", "lint", directory)
    assert result.returncode == 0, result.stdout + result.stderr
    ttl_line = long_ttl.splitlines().index("      ttl: 120s") + 1
    assert (
        f"{directory / 'checkout.yaml'}:{ttl_line}: warning[ttl-long] rule "
        "checkout-charge-payment: grant.ttl:" in result.stdout
    )
    assert result.stdout.splitlines()[-1] == "1 file(s): 0 error(s), 1 warning(s)"

    broken = CHECKOUT.replace("require: {scopes:", "require: {scope:")
    (directory / "checkout.yaml").write_text(broken, encoding="utf-8")
    require_line = next(n for n, t in enumerate(broken.splitlines(), 1) if "require:" in t)
    result = in_process("policy", "lint", directory)
    assert result.returncode == 1
    assert (
        f"{directory / 'checkout.yaml'}:{require_line}: error[invalid-policy] rule "
        "checkout-charge-payment: require.scope: unknown field `scope`: did you mean `scopes`?\n"
        "    fix: rename `scope` to `scopes`"
    ) in result.stdout


def test_policy_test_explain_and_paths_take_a_directory(tmp_path: Path) -> None:
    directory = team_dir(tmp_path / "p")
    cases = ROOT / "examples" / "policy.tests.yaml"
    tested = in_process("policy", "test", directory, cases)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert tested.stdout == in_process("policy", "test", EXAMPLE, cases).stdout

    explained = in_process(
        "explain",
        "--policy",
        directory,
        "--workload",
        "spiffe://cluster.local/ns/shop/sa/checkout",
        "--method",
        "POST",
        "--host",
        "payments.shop.svc.cluster.local",
        "--path",
        "/v1/charges",
        "--scope",
        "payments.charge",
        "--format",
        "json",
        "--now",
        str(NOW),
    )
    assert explained.returncode == 0, explained.stdout + explained.stderr
    doc = json.loads(explained.stdout)
    assert (doc["decision"], doc["rule"]) == ("allow", "checkout-charge-payment")

    mapped = in_process("policy", "paths", "--format", "json", directory)
    assert mapped.returncode == 0, mapped.stderr
    rules = sorted(p["rule"] for p in json.loads(mapped.stdout)["paths"])
    assert rules == sorted(r.id for r in load_policy(EXAMPLE).rules)


def test_shadow_mode_from_the_shared_file_and_a_rules_file(tmp_path: Path) -> None:
    shadow_rule = CHECKOUT.replace("    grant:", "    mode: shadow\n    grant:")
    directory = team_dir(tmp_path / "p", checkout_yaml=shadow_rule)
    by_id = {r.id: r for r in load_policy(directory).rules}
    assert by_id["checkout-charge-payment"].shadow
    assert not by_id["orders-read-profile"].shadow
    (directory / "00-shared.yaml").write_text("mode: shadow\n" + HEAD, encoding="utf-8")
    policy = load_policy(directory)
    assert policy.shadow
    lint = in_process("policy", "lint", "--format", "json", directory)
    shadow = [f for f in json.loads(lint.stdout)["findings"] if f["check"] == "shadow-mode"]
    files = {f["file"] for f in shadow}
    assert files == {str(directory / "00-shared.yaml"), str(directory / "checkout.yaml")}


OWNERS = """# who reviews which policy file
*.yaml        @platform
orders.yaml   @team-orders
checkout.yaml @team-checkout @payments-security
"""


def test_diff_across_directories_names_each_change_file_and_owners(tmp_path: Path) -> None:
    old = team_dir(tmp_path / "old")
    wider = CHECKOUT.replace("scopes: [payments.charge]\n      ttl", "scopes: [payments.charge,")
    wider = CHECKOUT.replace(
        "      scopes: [payments.charge]\n      ttl: 15s",
        "      scopes: [payments.charge, payments.refund]\n      ttl: 15s",
    )
    new = team_dir(
        tmp_path / "new",
        checkout_yaml=wider,
        orders_yaml="rules:\n" + BLOCKS[0],  # orders-update-address removed
    )
    owners = tmp_path / "OWNERS"
    owners.write_text(OWNERS, encoding="utf-8")
    result = in_process("policy", "diff", "--owners", owners, old, new)
    assert result.returncode == 3, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert (
        "WIDENS   scopes-added: rule checkout-charge-payment: payments.refund  "
        f"[{new / 'checkout.yaml'}; owners @team-checkout @payments-security]"
    ) in lines
    assert (
        "narrows  rule-removed: rule orders-update-address: no longer grants anything  "
        f"[{old / 'orders.yaml'}; owners @team-orders]"
    ) in lines
    assert (
        f"file {new / 'checkout.yaml'}: 1 change(s), widens; "
        "owners: @team-checkout @payments-security"
    ) in lines
    assert f"file {old / 'orders.yaml'}: 1 change(s), does not widen; owners: @team-orders" in (
        lines
    )

    doc = json.loads(
        in_process("policy", "diff", "--format", "json", "--owners", owners, old, new).stdout
    )
    added = [c for c in doc["changes"] if c["kind"] == "scopes-added"]
    assert added == [
        {
            "effect": "widens",
            "kind": "scopes-added",
            "rule": "checkout-charge-payment",
            "detail": "payments.refund",
            "file": str(new / "checkout.yaml"),
            "owners": ["@team-checkout", "@payments-security"],
        }
    ]
    assert doc["files"][str(new / "checkout.yaml")] == {
        "owners": ["@team-checkout", "@payments-security"],
        "changes": 1,
        "widens": True,
    }


def test_diff_says_when_a_rule_moved_to_another_file(tmp_path: Path) -> None:
    old = team_dir(tmp_path / "old")
    new = team_dir(
        tmp_path / "new",
        orders_yaml="rules:\n" + BLOCKS[0],
        checkout_yaml=CHECKOUT + "\n" + BLOCKS[1],
    )
    result = in_process("policy", "diff", old, new)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        "         rule-moved: rule orders-update-address: from orders.yaml to checkout.yaml  "
        f"[{new / 'checkout.yaml'}]"
    ) in result.stdout.splitlines()


def test_a_bad_owners_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    old = team_dir(tmp_path / "old")
    owners = tmp_path / "OWNERS"
    owners.write_text("orders.yaml\n", encoding="utf-8")
    result = in_process("policy", "diff", "--owners", owners, old, old)
    assert result.returncode == 2
    assert result.stderr == (f"extauthz: {owners}:1: expected a file glob and at least one owner\n")


KUBECTL = shutil.which("kubectl")


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not on PATH")
def test_the_multi_team_overlay_projects_one_configmap_per_team_into_one_policy(
    tmp_path: Path,
) -> None:
    overlay = ROOT / "deploy" / "kubernetes" / "overlays" / "multi-team"
    rendered = subprocess.run(
        [str(KUBECTL), "kustomize", str(overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    docs: list[dict[str, Any]] = [d for d in yaml.safe_load_all(rendered) if d]
    maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "policy"]
    assert "configMap" not in volume
    # Lay the projected volume out as the kubelet would, and compile it as serve would.
    mount = tmp_path / "policy"
    for source in volume["projected"]["sources"]:
        data = maps[source["configMap"]["name"]]["data"]
        items = source["configMap"].get("items") or [{"key": k, "path": k} for k in data]
        for item in items:
            (mount / item["path"]).parent.mkdir(parents=True, exist_ok=True)
            (mount / item["path"]).write_text(data[item["key"]], encoding="utf-8")
    (sidecar,) = [c for c in pod["initContainers"] if c["name"] == "extauthz"]
    assert "--policy=/etc/extauthz/policy" in sidecar["args"]
    policy = load_policy(mount)
    assert sorted(r.id for r in policy.rules) == sorted(r.id for r in load_policy(EXAMPLE).rules)
    assert {Path(r.file).name for r in policy.rules} == {"team-orders.yaml", "team-checkout.yaml"}
    assert "extauthz-policy" not in maps
    # Each team's Role may change its own ConfigMap only, named.
    roles = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Role"}
    for team in ("team-orders", "team-checkout"):
        (rule,) = roles[f"extauthz-policy-{team}"]["rules"]
        assert rule["resources"] == ["configmaps"]
        assert rule["resourceNames"] == [f"extauthz-policy-{team}"]
        assert set(rule["verbs"]) <= {"get", "update", "patch"}


def test_serve_reads_a_directory_with_its_keys_as_it_reads_a_file(tmp_path: Path) -> None:
    directory = team_dir(tmp_path / "p")
    key = tmp_path / "key.pem"
    write_private_key(generate_signing_key(), key)
    inputs = read_inputs(directory, [key], compile_policy=load_policy_isolated)
    assert len(inputs.policy.rules) == 3 and set(inputs.file_keys) == {"corp-idp"}
    (directory / "checkout.yaml").write_text("rules: []\n", encoding="utf-8")
    again = read_inputs(directory, [key], compile_policy=load_policy_isolated)
    assert again.digest != inputs.digest and len(again.policy.rules) == 2
