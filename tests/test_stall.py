"""trainer/stall.py: the stall deadline. Its arithmetic with a clock the test moves, its thread with an exit the test
records, and real runs that hang where a run hangs (a step, an evaluation, a save) or only go slowly."""

from __future__ import annotations

import re
import subprocess
import sys
import threading

import pytest

from conftest import REPO, TINY, clean_env
from kube_proxy import kube_server, pod_env, put_training_run  # noqa: F401 (fixture)
from trainer.errors import EXIT_STALLED
from trainer.signals import SIGNALS
from trainer.stall import STALL_MARGIN_S, StallWatchdog


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_the_deadline_counts_from_the_last_progress_and_names_the_phase():
    clock = Clock()
    watchdog = StallWatchdog(60, clock=clock)
    watchdog.start("training")
    assert watchdog.check(clock.now + 59.9) is None
    assert watchdog.check(clock.now + 60).startswith(
        "no progress for 60 s during training (last progress: the start of the step loop, stall_timeout_seconds 60)")
    clock.now += 50
    watchdog.progress("optimizer update 7")
    assert watchdog.check(clock.now + 59.9) is None
    with watchdog.phase("the save of checkpoint-7"):
        message = watchdog.check(clock.now + 61)
    assert message == ("no progress for 61 s during the save of checkpoint-7 (last progress: optimizer update 7, "
                       f"stall_timeout_seconds 60); exiting {EXIT_STALLED}: a hung collective (a peer stuck) or a "
                       "hung volume; a retry resumes from the newest checkpoint")
    assert "during training" in watchdog.check(clock.now + 61), "the phase is restored"
    watchdog.ticker("a sampler step of an evaluation")()
    assert "last progress: a sampler step of an evaluation" in watchdog.check(clock.now + 60)


@pytest.mark.parametrize("timeout", [None, 0])
def test_off(timeout):
    watchdog = StallWatchdog(timeout)
    watchdog.start("training")
    assert watchdog.check(1e12) is None and watchdog._thread is None


def test_ranks_other_than_0_wait_longer_so_rank_0_reports():
    assert StallWatchdog(600, rank=0).deadline_s == 600
    assert StallWatchdog(600, rank=3).deadline_s == 600 + STALL_MARGIN_S
    assert StallWatchdog(2, rank=1).deadline_s == 4


def test_the_thread_reports_and_exits_124_at_the_deadline(monkeypatch):
    monkeypatch.setattr(SIGNALS, "_exiting_with", None)  # the watchdog marks the process as leaving with 124
    exited, reports = threading.Event(), []
    codes = []

    def exit(code):
        codes.append(code)
        exited.set()

    watchdog = StallWatchdog(0.2, on_stall=reports.append, exit=exit)
    watchdog.start("training")
    assert exited.wait(timeout=30)
    assert codes == [EXIT_STALLED] and reports[0].startswith("no progress for 0 s during training")
    watchdog._thread.join(timeout=5)
    assert SIGNALS.stopping  # from now on a signal keeps the code (trainer.signals)


def test_a_process_already_stopping_is_left_to_its_grace(monkeypatch):
    """After a SIGTERM the grace watchdog (trainer.signals) ends the process with 143; the stall deadline must not
    replace that code with 124."""
    monkeypatch.setattr(SIGNALS, "received", 15)
    codes = []
    watchdog = StallWatchdog(0.1, exit=codes.append)
    watchdog.start("training")
    watchdog._thread.join(timeout=30)
    assert not watchdog._thread.is_alive() and codes == []


def train(tmp_path, *faults, env=None, **flags):
    args = [*TINY, "--output_dir", tmp_path / "out", "--max_train_steps", 4, "--builtin_num_images", 8,
            "--logging_steps", 1, "--checkpointing_steps", 2, "--save_image_epochs", 100, "--eval_quality_images", 0]
    args += [item for name, value in flags.items() for item in (f"--{name}", value)]
    return subprocess.run([sys.executable, "tests/fault_driver.py", *faults, "train", *map(str, args)], cwd=REPO,
                          env=clean_env(**(env or {})), capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("hang, phase, last", [
    ("update-3", "training", "checkpoint-2 saved"),  # a save finishing is progress too
    ("eval", "an evaluation", "a sampler step of an evaluation"),
    ("checkpoint", "the save of checkpoint-2", "optimizer update 2"),
])
def test_a_run_that_hangs_ends_with_124_a_stalled_event_and_the_phase(kube_server, tmp_path, hang, phase, last):
    run = put_training_run(kube_server, "Job", nodes=1)
    env = pod_env(kube_server, kube_server.write_service_account(tmp_path / "sa"), run)
    proc = train(tmp_path, "--hang", hang, env=env, stall_timeout_seconds=3)
    assert proc.returncode == EXIT_STALLED, proc.stderr
    message = proc.stderr.strip().splitlines()[-1]
    assert re.match(rf"no progress for \d+ s during {phase} \(last progress: {last}, stall_timeout_seconds 3\); "
                    rf"exiting {EXIT_STALLED}", message), proc.stderr
    assert "Traceback" not in proc.stderr and "File " in proc.stderr  # the threads' stacks: where it hung
    stalled = [e for e in kube_server.events() if e["reason"] == "Stalled"]
    assert {e["involvedObject"]["kind"] for e in stalled} == {"Pod", "Job"}
    assert all(e["type"] == "Warning" and message in e["message"] for e in stalled)

    from test_status import ddpm_status

    _, lines = ddpm_status(kube_server, tmp_path)
    assert f"error       Stalled: {message}" in lines


@pytest.mark.slow
def test_a_slow_evaluation_is_progress_not_a_stall(tmp_path):
    """Each sampler step takes 5 s and the evaluation 10 s, over the 8 s deadline: every sampler step is progress."""
    proc = train(tmp_path, "--hang", "slow-eval:5", stall_timeout_seconds=8)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "training_complete.json").is_file()
