"""`ddpm launch`: the container entrypoint. torchrun with its settings from the pod's environment.

torchrun already reads PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT (what the
Kubeflow PyTorchJob and TrainJob operators inject). On a plain Indexed Job the node rank is JOB_COMPLETION_INDEX.
What torchrun does not do, this adds: the worker exit codes survive (2 config, 3 diverged, 75 preempted), so a
Job's podFailurePolicy can tell "retry" from "give up", and SIGTERM gives workers the preemption grace to save.
"""

from __future__ import annotations

import os
import sys
from collections import Counter

from trainer.distributed import EXIT_FAILED, EXIT_OK, EXIT_PREEMPTED

# Seconds torchrun waits, after forwarding SIGTERM, beyond the trainer's own grace before it SIGKILLs workers.
SHUTDOWN_MARGIN_S = 15


def torchrun_argv(environ: dict[str, str], grace_seconds: float, train_args: list[str]) -> list[str]:
    node_rank = environ.get("PET_NODE_RANK") or environ.get("JOB_COMPLETION_INDEX") or "0"
    return [
        f"--nnodes={environ.get('PET_NNODES', '1')}",
        f"--nproc_per_node={environ.get('PET_NPROC_PER_NODE', 'gpu' if _has_cuda() else '1')}",
        f"--node_rank={node_rank}",
        f"--master_addr={environ.get('PET_MASTER_ADDR', '127.0.0.1')}",
        f"--master_port={environ.get('PET_MASTER_PORT', '29500')}",
        f"--shutdown_timeout={int(grace_seconds) + SHUTDOWN_MARGIN_S}",
        "--max_restarts=0",  # the Job (podFailurePolicy/backoffLimit) owns retries, with resume from checkpoints
        "-m", "trainer", "train", *train_args,
    ]


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def exit_code_of(worker_codes: list[int]) -> int:
    """One exit code for the pod: preempted wins (retry); else the workers' common code; else failure."""
    if EXIT_PREEMPTED in worker_codes:
        return EXIT_PREEMPTED
    code, _ = Counter(worker_codes).most_common(1)[0] if worker_codes else (EXIT_FAILED, 0)
    return code if code > 0 else EXIT_FAILED


def launch(train_args: list[str], grace_seconds: float, environ: dict[str, str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    argv = torchrun_argv(dict(os.environ if environ is None else environ), grace_seconds, train_args)
    print("ddpm launch: torchrun " + " ".join(argv), file=sys.stderr, flush=True)
    try:
        run(get_args_parser().parse_args(argv))
    except ChildFailedError as e:
        return exit_code_of([failure.exitcode for failure in e.failures.values()])
    except SignalException:
        return EXIT_PREEMPTED  # workers got SIGTERM and up to the grace period to checkpoint
    return EXIT_OK
