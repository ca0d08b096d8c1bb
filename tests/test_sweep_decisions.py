"""The runner's decisions, each alone: what a launch does with a run it finds, what to start
next, what a worker's exit means, when a waited-for run becomes ours, what the index shows,
and when the fit runs. (tests/test_sweep_runner.py runs them together with real workers.)"""

from __future__ import annotations

import pytest

from sweeps.run_result import EXIT_ALREADY_DONE, EXIT_LOCKED
from sweeps.runner import (
    after_exit, after_wait, fit_skip_reason, index_state, initial_status, stale_runs, status_counts, to_launch,
)  # fmt: skip
from sweeps.spec import spec_from_dict


@pytest.mark.parametrize(
    "state, retry, expected",
    [
        ("pending", False, "queued"), ("interrupted", False, "queued"), ("done", False, "done"),
        ("done", True, "done"), ("failed", False, "failed"), ("failed", True, "queued"), ("running", False, "waiting"),
    ],
)  # fmt: skip
def test_initial_status(state, retry, expected):
    assert initial_status(state, retry) == expected


def test_to_launch_takes_the_first_queued_runs_in_spec_order():
    status = {"a": "done", "b": "queued", "c": "running", "d": "queued", "e": "queued"}
    assert to_launch(status, 2) == ["b", "d"]
    assert to_launch(status, 0) == [] and to_launch(status, -1) == []
    assert to_launch(status, 10) == ["b", "d", "e"]


def test_to_launch_takes_the_highest_priority_first_and_spec_order_among_equals():
    status = {"a": "queued", "b": "queued", "c": "done", "d": "queued", "e": "queued"}
    priority = {"a": 1.0, "b": 5.0, "c": 9.0, "d": 5.0}  # e has none: last
    assert to_launch(status, 2, priority=priority) == ["b", "d"]
    assert to_launch(status, 10, priority=priority) == ["b", "d", "a", "e"]


def test_after_exit():
    done, failed = {"status": "done"}, {"status": "failed", "error": "x"}
    assert after_exit(0, done) == ("done", True)
    assert after_exit(1, failed) == ("failed", True)
    assert after_exit(EXIT_LOCKED, None) == ("waiting", False)  # another launch took the lock first
    assert after_exit(EXIT_ALREADY_DONE, done) == ("done", False)  # finished elsewhere: not ours
    assert after_exit(-9, None) == ("lost", True)  # killed before result.json: caller records it
    assert after_exit(0, {"status": "running"}) == ("failed", True)  # exit 0 without "done" is no success


def test_after_wait():
    assert after_wait("done") == "done" and after_wait("failed") == "failed"
    assert after_wait("running") == "waiting"
    assert after_wait("interrupted") == "queued" and after_wait("pending") == "queued"


def test_index_state_reads_the_disk_only_for_runs_not_in_flight():
    def boom():
        raise AssertionError("disk read")

    assert [index_state(s, boom) for s in ("done", "failed", "running", "waiting")] == ["done", "failed", "running", "running"]
    assert index_state("queued", lambda: "interrupted") == "interrupted"
    assert index_state("interrupted", lambda: "pending") == "pending"


def test_status_counts_shows_waiting_as_running():
    assert status_counts({"a": "waiting", "b": "running", "c": "done"}) == {"running": 2, "done": 1}


def test_fit_skip_reason():
    base = {"name": "x", "grid": {"train.seed": [0]}}
    with_fit, without = spec_from_dict({**base, "fit": True}), spec_from_dict(base)
    done, failed = [{"status": "done"}], [{"status": "failed"}]
    assert fit_skip_reason(with_fit, done) is None
    assert fit_skip_reason(with_fit, done, fit=False) == "not requested"  # --no-fit
    assert fit_skip_reason(without, done) == "not requested"
    assert fit_skip_reason(spec_from_dict({**base, "fit": {"enabled": False}}), done) == "not requested"
    assert fit_skip_reason(with_fit, failed) == "skipped: no finished runs"


def test_stale_runs_are_finished_folders_outside_the_spec(tmp_path):
    for name, finished in (("mine", True), ("old", True), ("half", False)):
        (tmp_path / name).mkdir()
        if finished:
            (tmp_path / name / "result.json").write_text("{}")
    (tmp_path / "logs").mkdir()
    assert stale_runs(tmp_path, ["mine"]) == ["old"]
    assert stale_runs(tmp_path / "absent", ["mine"]) == []
