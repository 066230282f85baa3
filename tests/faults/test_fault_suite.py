"""The fault suite end to end. `make test` runs the short plan; `make faults` runs the long one
(DIFFQUEUE_FAULTS=long). The table goes to the terminal and, when DIFFQUEUE_FAULTS_REPORT names a file,
into that file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.faults.suite import LONG, SHORT, FaultSuite


@pytest.mark.timeout(1800)
def test_nothing_lost_nothing_run_twice_under_faults(tiny_model_dirs, tiny_lora, webhook_secret, tmp_path, capsys):
    plan = LONG if os.environ.get("DIFFQUEUE_FAULTS") == "long" else SHORT
    with FaultSuite(plan, tmp_path, tiny_model_dirs["sd"], tiny_lora, webhook_secret) as suite:
        report = suite.run()
    table = report.table()
    with capsys.disabled():
        print("\n" + table)
    if path := os.environ.get("DIFFQUEUE_FAULTS_REPORT"):
        Path(path).write_text(table + "\n")

    assert report.lost == [], f"jobs without a terminal result: {[report.expected[j] for j in report.lost]}"
    assert report.run_twice == [], "no job finished twice"
    assert report.unexpected == [], "\n".join(report.unexpected[:20])
    assert report.webhooks_delivered == report.webhooks_expected
    assert report.bad_signatures == 0
    assert len(report.recoveries) == len(plan.faults)
    outcomes = report.outcome_counts()
    assert outcomes["failed (out_of_memory)"] == plan.oom_jobs
    assert outcomes["failed (invalid_message)"] == plan.undecodable
