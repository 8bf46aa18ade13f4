"""Exit codes, and the SIGTERM handling every rank shares.

Rank and world size come from the launcher's environment through Accelerate (torchrun/`accelerate launch` set
RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR...), so one process runs the same code path as many.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

# Exit codes (README: Fault tolerance). A Job's podFailurePolicy keys on these.
EXIT_OK = 0
EXIT_FAILED = 1  # an unexpected error
EXIT_CONFIG = 2  # bad configuration or input: retrying cannot help
EXIT_DIVERGED = 3  # too many consecutive non-finite losses: retrying cannot help
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on SIGTERM after saving a checkpoint; retry to resume


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


class Preemption:
    """Records SIGTERM. The loop checks `requested` between steps (agreed across ranks), saves and exits 75.

    If that has not happened `grace_seconds` after the signal (a hung collective, a slow volume), a watchdog
    ends the process with the same code: the newest complete checkpoint is still intact, since saves are atomic.
    """

    def __init__(self, grace_seconds: float):
        self.grace_seconds = grace_seconds
        self.requested = False
        self.received_at: float | None = None
        self._previous = None

    def install(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _on_sigterm(self, signum, frame) -> None:
        if self.requested:
            return
        self.requested, self.received_at = True, time.monotonic()
        print(f"SIGTERM received: finishing this step, then saving a checkpoint (grace {self.grace_seconds:.0f}s)",
              file=sys.stderr, flush=True)
        threading.Thread(target=self._watchdog, daemon=True).start()

    def _watchdog(self) -> None:
        time.sleep(self.grace_seconds)  # the grace period itself, not a race workaround
        print(f"preemption grace of {self.grace_seconds:.0f}s exceeded; exiting without a new checkpoint",
              file=sys.stderr, flush=True)
        os._exit(EXIT_PREEMPTED)
