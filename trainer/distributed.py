"""What makes one process run the same code path as many.

Rank and world size come from the launcher's environment through Accelerate (torchrun/`accelerate launch` set
RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR...). Decisions only one process may take (the output_dir lock, which
checkpoint is intact) are taken by rank 0 and shared, errors included, so no rank waits in a collective for a rank
that has already given up.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable, TypeVar

from trainer.errors import DdpmError, Outcome, exit_code
from trainer.signals import SIGNALS

T = TypeVar("T")


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


class ErrorOnMainProcess(DdpmError):
    """Raised on the other ranks when rank 0's decision failed; rank 0 prints the message, they stay quiet."""

    def __init__(self, message: str, outcome: Outcome):
        super().__init__(message)
        self.outcome = outcome


def decided_by_main(accelerator, decide: Callable[[], T]) -> T:
    """Run `decide` on rank 0 only; every rank returns its result, or raises when rank 0's decision failed."""
    from accelerate.utils import broadcast_object_list

    result, failure = None, None
    if accelerator.is_main_process:
        try:
            result = decide()
        except DdpmError as e:
            failure = e
    if accelerator.num_processes > 1:
        box = [(result, (str(failure), failure.outcome) if failure else None)]
        broadcast_object_list(box, from_process=0)
        result, shared = box[0]
        if shared:
            SIGNALS.exiting(shared[1])  # every rank leaves with this outcome, whichever one torchrun sees exit first
        if shared and not accelerator.is_main_process:
            raise ErrorOnMainProcess(*shared)
    if failure is not None:
        raise failure
    return result


def any_process(accelerator, flag: bool) -> bool:
    """Whether `flag` is true on any rank (a collective: every rank must call it at the same step)."""
    if accelerator.num_processes == 1:
        return flag
    import torch

    return accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum").item() > 0


def sum_over_processes(accelerator, values: list[float]) -> list[float]:
    """Each value summed over the ranks (a collective: every rank must call it at the same step)."""
    if accelerator.num_processes == 1:
        return list(values)
    import torch

    return accelerator.reduce(torch.tensor(values, dtype=torch.float32, device=accelerator.device), "sum").tolist()


def communication_failure(error: BaseException) -> BaseException | None:
    """The torch.distributed communication failure in `error` or the errors it was raised from, if any: NCCL raises
    DistBackendError, the store and its network DistStoreError/DistNetworkError (all DistError), gloo a plain
    RuntimeError from its transport ('[.../gloo/transport/tcp/pair.cc:545] Read error ...: Connection reset by peer',
    'Connection closed by peer', 'Timed out waiting ... for recv operation to complete')."""
    dist = sys.modules.get("torch.distributed")
    seen = 0
    while error is not None and seen < 10:  # the chain is short; the bound guards against a cycle
        if (dist is not None and isinstance(error, dist.DistError)) or (
                isinstance(error, RuntimeError) and "/gloo/transport/" in str(error)):
            return error
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


def leave_process_group(outcome: Outcome) -> None:
    """At the end of a process that joined a process group: leave it and exit at once with the code of `outcome`.

    Left to the interpreter's shutdown, the gloo group's threads can be destroyed while still joinable ('terminate
    called without an active exception': SIGABRT) once the other rank has gone, and the shutdown is slow enough for
    torchrun, which stops the remaining ranks when one exits, to SIGTERM it meanwhile. It happens after a successful
    run too (seen in test_sample_grid_is_identical_for_any_world_size: rank 1 aborted after "done", torchrun exited
    1, which a Job counts as a failure). Everything the run writes is closed by then (trackers, lock, checkpoints,
    the pipeline); only the interpreter's teardown is skipped."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    if outcome != Outcome.OK:
        SIGNALS.exiting(outcome)
    try:
        dist.destroy_process_group()
    except Exception as e:  # a peer already gone can make the group's teardown complain; the exit code stands
        print(f"leaving the process group: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code(outcome))
