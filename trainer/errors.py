"""Outcomes, their exit codes, and the errors a user can act on. Library code raises these or returns an outcome; only
the CLI turns them into exit codes, through EXIT_CODES.

A Kubernetes Job (podFailurePolicy), a Kubeflow operator (ExitCode restart policy: 1-127 permanent, 128-255
retryable) and a shell all act on the exit code, so each error class carries the one outcome that says what to do.
"""

from __future__ import annotations

from enum import Enum


class Outcome(Enum):
    """How a command ended, in the terms a scheduler acts on. EXIT_CODES below is the one place that turns an
    outcome into an exit code; errors carry their outcome, commands return one (trainer.cli)."""

    OK = "ok"  # finished (train), uploaded (push), the workload succeeded (wait-for-training), ...
    FAILED = "failed"  # an unexpected or transient error (network), a wait that timed out: a retry may help
    REFUSED = "refused"  # bad configuration or input, or a workload that failed: retrying cannot help
    DIVERGED = "diverged"  # non-finite losses, weights or samples: retrying cannot help
    STALLED = "stalled"  # no progress for stall_timeout_seconds (trainer/stall.py): a retry may help but counts
    PREEMPTED = "preempted"  # SIGTERM or a lost peer (checkpoint saved if training had started): retry to resume
    INTERRUPTED = "interrupted"  # SIGINT (Ctrl-C), checkpoint saved if training had started


# The one mapping (README: Fault tolerance, exit codes). A Kubeflow operator's ExitCode restart policy treats 1-127
# as permanent and 128-255 as retryable, hence 143 (128 + SIGTERM) for a preemption and 124 (< 128) for a stall.
EXIT_CODES: dict[Outcome, int] = {
    Outcome.OK: 0,
    Outcome.FAILED: 1,
    Outcome.REFUSED: 2,
    Outcome.DIVERGED: 3,
    Outcome.STALLED: 124,  # as GNU timeout
    Outcome.PREEMPTED: 143,  # 128 + SIGTERM
    Outcome.INTERRUPTED: 130,  # 128 + SIGINT
}
_OUTCOMES = {code: outcome for outcome, code in EXIT_CODES.items()}


def exit_code(outcome: Outcome) -> int:
    return EXIT_CODES[outcome]


def outcome_of_exit_code(code: int) -> Outcome:
    """A child process's exit code read back (`ddpm launch`'s workers); any code not in the mapping (a crash, a
    process killed by a signal: negative) is FAILED."""
    return _OUTCOMES.get(code, Outcome.FAILED)


EXIT_OK = exit_code(Outcome.OK)
EXIT_FAILED = exit_code(Outcome.FAILED)
EXIT_CONFIG = exit_code(Outcome.REFUSED)
EXIT_DIVERGED = exit_code(Outcome.DIVERGED)
EXIT_STALLED = exit_code(Outcome.STALLED)
EXIT_PREEMPTED = exit_code(Outcome.PREEMPTED)
EXIT_INTERRUPTED = exit_code(Outcome.INTERRUPTED)


def causes(error: BaseException | None):
    """The error and what caused it, outermost first (libraries wrap: huggingface_hub an HTTP error in a RuntimeError,
    safetensors an OSError in its own error); each once, so a cycle in the chain ends."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


class DdpmError(Exception):
    """An error with a message for the user and the outcome that tells a scheduler what to do."""

    outcome = Outcome.FAILED
    prefix = "error: "  # how the CLI introduces the message

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    @property
    def exit_code(self) -> int:
        return exit_code(self.outcome)

    def __str__(self) -> str:
        return self.message


class UserError(DdpmError):
    """Something the user must fix; retrying the same command cannot help (exit 2)."""

    outcome = Outcome.REFUSED


class ConfigError(UserError):
    """Bad configuration: every problem found, listed at once."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in self.problems))


class DataError(UserError):
    """The dataset cannot be used as configured; the message says what to do."""


class CheckpointError(UserError):
    """No usable checkpoint where one is required (all damaged, another model, missing path)."""


class OutputDirError(UserError):
    """output_dir cannot be used: not ours to delete, held by another run, not writable, or full."""


class LaunchError(UserError):
    """`ddpm launch` got environment values it cannot turn into a torchrun command."""


class PushError(UserError):
    """`ddpm push` cannot upload this run (incomplete, mismatched, no token, token refused)."""


class TransientError(DdpmError):
    """The network or a service failed in a way a later retry may not (exit 1)."""


class PushFailed(TransientError):
    """The Hub kept failing (or the push deadline passed); `ddpm push` is safe to run again."""


class PeerLost(DdpmError):
    """A collective or the store failed after this process had completed an optimizer update: another process of
    the gang is gone (preempted, its node lost). Not this process's fault, so exit 143 like a preemption: `ddpm
    launch` restarts its workers without using up a restart, and every rank resumes from the newest checkpoint.
    The same failure before any update stays exit 1 (counted): a network that never works must not retry forever."""

    outcome = Outcome.PREEMPTED
    prefix = ""


class Diverged(DdpmError):
    """Too many consecutive non-finite losses, or non-finite weights where a model would be written (exit 3)."""

    outcome = Outcome.DIVERGED


class NonFiniteSamples(DdpmError):
    """Sampled images hold NaN/inf values: they are never quantised, saved or scored (exit 3)."""

    outcome = Outcome.DIVERGED

    def __init__(self, sampler: str, bad: int, checked: int):
        self.sampler, self.bad, self.checked = sampler, bad, checked
        super().__init__(
            f"{bad} of {checked} images sampled with {sampler} hold NaN/inf values; none was saved or scored. "
            "Causes: non-finite weights, an fp16 overflow (sample in bf16 or fp32), or a scheduler config that cannot "
            "sample its first step (prediction_type epsilon with rescale_betas_zero_snr)")


class Stopped(BaseException):
    """A signal stopped the run; a checkpoint was written if training had started. Exit 143 (SIGTERM) or 130.

    A BaseException, like KeyboardInterrupt: the signal handler may raise it anywhere, and a library's broad
    `except Exception` (an image decoder's, say) must not mistake it for a corrupt file and carry on."""

    def __init__(self, message: str, outcome: Outcome):
        super().__init__(message)
        self.message, self.outcome = message, outcome

    @property
    def exit_code(self) -> int:
        return exit_code(self.outcome)

    def __str__(self) -> str:
        return self.message
