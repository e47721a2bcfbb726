"""Prometheus config and rules in ops/prometheus, checked and unit-tested with promtool."""

from __future__ import annotations

import subprocess

import yaml

from .ops_support import OPS
from .ops_support import require_tool

PROMETHEUS = OPS / "prometheus"
RULE_FILES = [
    PROMETHEUS / "rules" / "recording.yml",
    PROMETHEUS / "rules" / "alerts.yml",
]
ALERT_TESTS = PROMETHEUS / "tests" / "alerts_test.yml"


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(require_tool("promtool")), *args],
        capture_output=True,
        text=True,
        cwd=PROMETHEUS,
        timeout=120,
    )


def test_local_config_is_valid():
    completed = promtool("check", "config", "prometheus-local.yml")

    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_rule_files_are_valid():
    completed = promtool("check", "rules", *map(str, RULE_FILES))

    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_alert_unit_tests_pass():
    completed = promtool("test", "rules", str(ALERT_TESTS))

    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_promtool_unit_test_can_fail(tmp_path):
    """A raised threshold makes the firing test fail, so the suite is not vacuous."""
    rules = tmp_path / "rules"
    rules.mkdir()
    tests = tmp_path / "tests"
    tests.mkdir()
    (rules / "recording.yml").write_text(RULE_FILES[0].read_text())
    alerts = (
        RULE_FILES[1]
        .read_text()
        .replace("nv_gpu_memory_total_bytes > 0.9", "nv_gpu_memory_total_bytes > 0.99")
    )
    assert alerts != RULE_FILES[1].read_text()
    (rules / "alerts.yml").write_text(alerts)
    (tests / "alerts_test.yml").write_text(ALERT_TESTS.read_text())

    completed = promtool("test", "rules", str(tests / "alerts_test.yml"))

    assert completed.returncode != 0
    assert "HistometGpuMemoryHigh" in completed.stdout + completed.stderr


def test_every_alert_has_firing_and_silent_test():
    alerts = {
        rule["alert"]
        for group in yaml.safe_load(RULE_FILES[1].read_text())["groups"]
        for rule in group["rules"]
    }
    cases = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    firing = {
        check["alertname"]
        for case in cases
        for check in case["alert_rule_test"]
        if check.get("exp_alerts")
    }
    # A silent case is one whose last evaluation expects no alert.
    silent = {
        case["alert_rule_test"][-1]["alertname"]
        for case in cases
        if not case["alert_rule_test"][-1].get("exp_alerts")
    }

    assert alerts == {
        "HistometTritonDown",
        "HistometInferenceErrors",
        "HistometClientSlideErrors",
        "HistometLatencyP95High",
        "HistometQueueTimeHigh",
        "HistometGpuMemoryHigh",
        "HistometSequencesExpiring",
    }
    assert alerts <= firing, sorted(alerts - firing)
    assert alerts <= silent, sorted(alerts - silent)


def test_alerts_have_runbook_entries():
    runbook = (OPS / "README.md").read_text()
    alerts = [
        rule["alert"]
        for group in yaml.safe_load(RULE_FILES[1].read_text())["groups"]
        for rule in group["rules"]
    ]

    for alert in alerts:
        assert f"### {alert}" in runbook, f"ops/README.md has no section for {alert}"
