"""SIGTERM (eviction, preemption, `kubectl delete`) and SIGINT (Ctrl-C), handled for the whole life of a process.

Installed first thing, before the heavy imports (`trainer.main`), and never removed, so a signal at any moment ends
the process with its documented code: 143 for SIGTERM (a retry resumes), 130 for SIGINT. Two modes:

- `raise` (the default: imports, config, data scan, cache build, model setup): the handler raises `Stopped`, so
  the code being interrupted unwinds through its own cleanup (a half-built cache file is deleted) and the CLI
  exits with the code.
- `defer` (the training loop and its saves, `with signals.deferred():`): the handler only records the signal; the
  loop finishes its step, writes one checkpoint and raises `Stopped` itself, so no save is ever cut in half.

Either way a watchdog thread ends the process with the same code `grace_seconds` after the first signal if the
orderly stop has not happened by then (a hung collective, a slow volume): the newest complete checkpoint is still
intact, since every save is atomic. A second signal while stopping changes nothing.

Once the process is exiting with a code of its own (`exiting(code)`: an error, agreed by every rank or not), a
signal no longer changes it: torchrun SIGTERMs the remaining ranks as soon as one has exited, and a rank still
printing the same error would otherwise report 143 (retry) or be killed (-15) instead of 2.

Standard library only: this module must be importable before torch.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager

from trainer.errors import Outcome, Stopped, exit_code

OUTCOMES = {signal.SIGTERM: Outcome.PREEMPTED, signal.SIGINT: Outcome.INTERRUPTED}
DEFAULT_GRACE_SECONDS = 90.0  # until the config's preemption_grace_seconds is known


class Signals:
    def __init__(self) -> None:
        self.received: int | None = None  # the first signal's number
        self.grace_seconds = DEFAULT_GRACE_SECONDS
        self._defer = 0  # nesting depth of deferred()
        self._installed = False
        self._exiting_with: Outcome | None = None  # set by exiting(): what this process is already leaving with

    def install(self) -> "Signals":
        if not self._installed and threading.current_thread() is threading.main_thread():
            for signum in OUTCOMES:
                signal.signal(signum, self._handle)
            self._installed = True
        return self

    @property
    def outcome(self) -> Outcome | None:
        return OUTCOMES.get(self.received) if self.received is not None else None

    @property
    def stopping(self) -> bool:
        """A signal arrived, or the process is leaving with a code of its own: its end is already under way."""
        return self.received is not None or self._exiting_with is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""

    @contextmanager
    def deferred(self):
        """Inside: a signal is only recorded; the caller checks `received` at safe points."""
        self._defer += 1
        try:
            yield self
        finally:
            self._defer -= 1

    def stopped(self, what: str) -> Stopped:
        """The error to raise after an orderly stop, e.g. stopped('checkpoint saved at step 12'). On a rank that
        stops because another rank got the signal (torchrun sends it to all of them), it reads as SIGTERM."""
        signum = self.received if self.received is not None else signal.SIGTERM
        outcome = OUTCOMES[signum]
        return Stopped(f"{signal.Signals(signum).name} received: {what}; exiting with {exit_code(outcome)}"
                       + (" to be retried" if signum == signal.SIGTERM else ""), outcome)

    def exiting(self, outcome: Outcome) -> None:
        """This process is on its way out with `outcome`: from now on a signal only starts the grace watchdog."""
        self._exiting_with = outcome

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            return  # already stopping: a second signal must not interrupt the cleanup or the save
        self.received = signum
        if self._exiting_with is not None:
            print(f"{signal.Signals(signum).name} received while exiting with {exit_code(self._exiting_with)}: the "
                  "code stays",
                  file=sys.stderr, flush=True)
            threading.Thread(target=self._watchdog, daemon=True, name="signal-grace").start()
            return
        mode = "finishing this step, then saving a checkpoint" if self._defer else "stopping"
        print(f"{signal.Signals(signum).name} received: {mode} (grace {self.grace_seconds:.0f}s)",
              file=sys.stderr, flush=True)
        threading.Thread(target=self._watchdog, daemon=True, name="signal-grace").start()
        if not self._defer:
            raise self.stopped("stopped before training started, nothing half-written")

    def _watchdog(self) -> None:
        deadline = time.monotonic() + self.grace_seconds
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(left)  # the grace period itself, not a race workaround
        code = exit_code(self.outcome if self._exiting_with is None else self._exiting_with)
        print(f"grace of {self.grace_seconds:.0f}s after {self.name} exceeded; exiting {code} "
              "without a new checkpoint (the newest complete one is intact)", file=sys.stderr, flush=True)
        os._exit(code)


SIGNALS = Signals()  # one per process: signal handlers are process-wide
