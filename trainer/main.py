"""The `ddpm` entry point: signal handling first, then (and only then) the heavy imports of the CLI."""

from __future__ import annotations

import sys

from trainer.errors import Stopped, exit_code
from trainer.signals import SIGNALS


def entrypoint() -> None:
    SIGNALS.install()  # before torch/diffusers load: a SIGTERM during imports still exits with its code
    try:
        from trainer.cli import outcome_of

        outcome = outcome_of(sys.argv[1:])
    except Stopped as e:  # raised by the handler before the CLI's own handling was reached (imports)
        print(str(e), file=sys.stderr, flush=True)
        outcome = e.outcome
    if "trainer.distributed" in sys.modules:  # under torchrun: leave the process group before exiting
        from trainer.distributed import leave_process_group

        leave_process_group(outcome)
    sys.exit(exit_code(outcome))
