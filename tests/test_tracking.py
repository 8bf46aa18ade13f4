"""trainer/tracking.py: the status line's total and ETA follow whichever limit ends the run first, max_train_steps
or the max_train_seconds budget (issue 16: a 150 s run logged `step 640/5600 ... eta 0:17:22` one second before it
ended). Time is a fake clock the test moves: no sleeps."""

import io

from trainer.budget import TrainClock
from trainer.tracking import Tracker


class Accelerator:
    """What Tracker uses of Accelerate's: the main process, and log() (TensorBoard), recorded."""

    is_main_process = True

    def __init__(self):
        self.logged = []

    def log(self, values, step):
        self.logged.append((step, values))


class Timer:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


SCALARS = {"loss": 0.5, "lr": 1e-3}


def tracker(total_steps: int, budget_s: float | None, start_step: int = 0, spent_before: float = 0.0):
    clock, timer, stream = TrainClock(budget_s, spent_before), Timer(), io.StringIO()
    return Tracker(Accelerator(), total_steps, start_step, stream, clock=clock, timer=timer), clock, timer, stream


def log_at(t: Tracker, clock: TrainClock, timer: Timer, step: int, seconds: float) -> str:
    """Log `step` when this process has run `seconds`; the training clock adds what earlier processes spent."""
    timer.now = seconds
    clock.agree(clock.before + seconds)  # as the loop does before each log: the agreed training seconds
    t.log(step, 0, dict(SCALARS), images_per_step=16)
    return t.stream.getvalue().splitlines()[-1]


def test_a_time_budget_that_ends_the_run_first_sets_the_total_and_the_eta():
    t, clock, timer, _ = tracker(5600, 150.0)
    # 0.25 s per step: the budget ends the run at step 600 (150 s), long before step 5600 (1400 s)
    line = log_at(t, clock, timer, 320, 80.0)
    assert line.startswith("step 320/600 epoch 0 ") and line.endswith(" eta 0:01:10")
    assert t.last_eta_s == 70.0  # what the CheckpointSaved Event reports
    line = log_at(t, clock, timer, 596, 149.0)
    assert line.startswith("step 596/600 ") and line.endswith(" eta 0:00:01")
    line = log_at(t, clock, timer, 600, 150.0)  # the budget is spent: this is the last step
    assert line.startswith("step 600/600 ") and line.endswith(" eta 0:00:00")


def test_steps_that_end_the_run_first_keep_the_step_total_and_eta():
    for budget in (None, 10_000.0):
        t, clock, timer, _ = tracker(5600, budget)
        line = log_at(t, clock, timer, 320, 80.0)
        assert line.startswith("step 320/5600 ") and line.endswith(" eta 0:22:00")  # 5280 steps x 0.25 s
        assert t.last_eta_s == 1320.0


def test_a_resumed_budget_counts_the_seconds_spent_before():
    # resumed at step 400 with 100 s of the budget spent (TrainState.training_seconds)
    t, clock, timer, _ = tracker(5600, 150.0, start_step=400, spent_before=100.0)
    line = log_at(t, clock, timer, 420, 5.0)  # 20 steps in 5 s of this process, 105 s in all
    assert line.startswith("step 420/600 ") and line.endswith(" eta 0:00:45")
