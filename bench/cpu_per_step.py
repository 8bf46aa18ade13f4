"""CPU seconds per training step of either loop, which other processes on a shared machine barely move (wall-clock
images/s does not survive another session's test suite on 2 cores; docs/PERFORMANCE.md, issue 20).

Runs the given training command in this process with Accelerate's `Accelerator.log` wrapped: every logged `loss`
records the main thread's CPU time (`time.thread_time`), and the steady window is bench/run.py's (from the first
logged step at or after 20% of the run to the last). Set OMP_NUM_THREADS=1 so that the whole step runs on the main
thread. The last line printed is one JSON object: cpu_ms_per_step, wall_ms_per_step, window.

    OMP_NUM_THREADS=1 python bench/cpu_per_step.py --steps 40 --shift 1 bench/tutorial_loop.py --data DIR ...
    OMP_NUM_THREADS=1 python bench/cpu_per_step.py --steps 40 -m trainer train --max_train_steps 40 ...

--shift 1 for the tutorial loop, which logs its 0-based step before counting it (as bench/run.py aligns it).
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
import time

import accelerate

from run import steady_window


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, required=True, help="the run's optimizer updates")
    parser.add_argument("--shift", type=int, default=0, help="added to each logged step")
    parser.add_argument("-m", dest="module", help="run this module as __main__ (else the first argument is a script)")
    args, command = parser.parse_known_args()
    marks: dict[int, tuple[float, float]] = {}
    log = accelerate.Accelerator.log

    def timed_log(self, values, step=None, log_kwargs=None):
        if "loss" in values:
            marks[step + args.shift] = (time.thread_time(), time.perf_counter())
        return log(self, values, step=step, log_kwargs=log_kwargs or {})

    accelerate.Accelerator.log = timed_log
    try:
        if args.module:
            sys.argv = [args.module, *command]
            runpy.run_module(args.module, run_name="__main__", alter_sys=True)
        else:
            sys.argv = command
            runpy.run_path(command[0], run_name="__main__")
    except SystemExit as e:
        if e.code:
            raise
    cpu = steady_window([(step, at[0]) for step, at in marks.items()], args.steps)
    wall = steady_window([(step, at[1]) for step, at in marks.items()], args.steps)
    print(json.dumps({"cpu_ms_per_step": cpu["seconds_per_step"] * 1e3, "wall_ms_per_step": wall["seconds_per_step"] * 1e3,
                      "window": [cpu["first_step"], cpu["last_step"]]}), flush=True)


if __name__ == "__main__":
    main()
