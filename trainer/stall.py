"""The stall deadline: a process whose training makes no progress for `stall_timeout_seconds` ends, exit 124.

Progress is what the loop already does on the host: an optimizer update counted, a sampler step of an evaluation
(or of the saved pipeline's check), a save finished. Each is one `time.monotonic()` stored in an attribute: no device
sync, no collective, nothing per micro-batch. The clock starts with the step loop (StallWatchdog.start), so the
start-up (imports, rendezvous, data scan and cache build, model setup) never counts, and stops before an end-of-run
push (which has its own deadline).

A daemon thread wakes at the deadline. If nothing happened meanwhile, the process is stuck where no error will come
(a collective waiting for a peer that hangs, a volume that stopped answering, a deadlock): it prints every thread's
stack (where it hangs), then one line naming the phase and the last progress, lets rank 0 post a Warning Event
`Stalled` (trainer.events), and exits 124 with os._exit, since the main thread is the one stuck. 124, like GNU
timeout's: a retry may help (another node, a remounted volume) but counts, so a run that stalls every time ends
(trainer/errors.py). Ranks other than 0 wait STALL_MARGIN_S longer, so that rank 0, the one that reports, ends first.
A process already stopping on a signal or leaving with an error is left to its own grace (trainer.signals).
A process blocked inside the kernel (a hard NFS mount) cannot exit until that I/O returns, whatever sends the kill.

Standard library only.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager

from trainer.errors import EXIT_STALLED, Outcome, exit_code
from trainer.signals import SIGNALS

STALL_MARGIN_S = 30.0  # ranks other than 0 wait this much longer (at most the timeout itself), so rank 0 reports


class StallWatchdog:
    def __init__(self, timeout_s: float | None, *, rank: int = 0, on_stall: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, exit: Callable[[int], None] = os._exit):
        self.timeout_s = timeout_s or None  # None or 0: off
        self.deadline_s = None if self.timeout_s is None else (
            self.timeout_s + (min(STALL_MARGIN_S, self.timeout_s) if rank else 0.0))
        self._on_stall, self._clock, self._exit = on_stall, clock, exit
        self._phase = "start-up"
        self._last: tuple[float, str] = (clock(), "the start of the step loop")
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def off(cls) -> "StallWatchdog":
        return cls(None)

    def start(self, phase: str) -> None:
        """Start the clock (the step loop begins) and the thread."""
        self._phase, self._last = phase, (self._clock(), "the start of the step loop")
        if self.deadline_s is not None and self._thread is None:
            self._thread = threading.Thread(target=self._watch, daemon=True, name="stall-watchdog")
            self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def progress(self, what: str) -> None:
        """Something finished: `what` names it for the message ("optimizer update 12")."""
        self._last = (self._clock(), what)  # one tuple assignment: atomic for the watching thread

    def ticker(self, what: str) -> Callable[[], bool]:
        """A sampler's should_stop that never stops and reports each step as progress."""
        def tick() -> bool:
            self.progress(what)
            return False
        return tick

    @contextmanager
    def phase(self, name: str):
        """What the process is doing, for the message; the previous phase again afterwards."""
        previous, self._phase = self._phase, name
        try:
            yield
        finally:
            self._phase = previous

    def check(self, now: float) -> str | None:
        """The stall message when the deadline has passed at `now`, else None."""
        at, what = self._last
        if self.deadline_s is None or now - at < self.deadline_s:
            return None
        return (f"no progress for {now - at:.0f} s during {self._phase} (last progress: {what}, "
                f"stall_timeout_seconds {self.timeout_s:g}); exiting {EXIT_STALLED}: a hung collective (a peer "
                "stuck) or a hung volume; a retry resumes from the newest checkpoint")

    def _watch(self) -> None:
        while not self._stopped.is_set():
            at, _ = self._last
            self._stopped.wait(max(0.05, at + self.deadline_s - self._clock()))  # sleeps until the deadline
            if self._stopped.is_set() or SIGNALS.stopping:
                return
            message = self.check(self._clock())
            if message is None:
                continue
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)  # where it is stuck
            print(message, file=sys.stderr, flush=True)
            SIGNALS.exiting(Outcome.STALLED)
            if self._on_stall is not None:
                try:
                    self._on_stall(message)
                except Exception as e:  # reporting is best effort; the exit is not
                    print(f"stall report failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            self._exit(exit_code(Outcome.STALLED))
            return
