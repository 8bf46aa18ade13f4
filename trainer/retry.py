"""Retries with exponential backoff (tenacity), and a deadline for work that may hang below every timeout.

Which errors are worth retrying is the caller's to say (trainer.hub: connection problems, HTTP 408/429/5xx). The
whole push, create_repo + upload_folder, is one action here: huggingface_hub's own `http_backoff` retries single
requests only (its LFS uploads). Ours on top of tenacity: the server's Retry-After, and no retry whose wait would end
past the push's deadline.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from trainer.errors import causes

MAX_RETRY_DELAY_S = 60.0  # the backoff doubles from the base delay up to this


def status_code(error: BaseException) -> int | None:
    """The HTTP status anywhere in the exception chain, if the error came from a response."""
    for cause in causes(error):
        status = getattr(getattr(cause, "response", None), "status_code", None)
        if status is not None:
            return status
    return None


def retry_after_s(error: BaseException) -> float | None:
    for cause in causes(error):
        response = getattr(cause, "response", None)
        headers = getattr(response, "headers", None) or {}
        value = next((str(v).strip() for k, v in headers.items() if k.lower() == "retry-after"), "")
        if value.isdigit():
            return float(value)
    return None


def with_retries(action: Callable[[], object], attempts: int, base_delay_s: float, log: Callable[[str], None],
                 retryable: Callable[[BaseException], bool], sleep: Callable[[float], None] = time.sleep,
                 deadline: float | None = None):
    """Run `action`; after an error that is `retryable` wait (the backoff, or the server's Retry-After if longer)
    and rerun it, `attempts` times at most. No retry starts whose wait would end after `deadline`
    (time.monotonic()): the last error is raised instead. The error raised carries `attempts` (how many were made)
    and, when the deadline stopped it, `deadline = True`, for the message."""
    backoff = wait_exponential(multiplier=base_delay_s, max=MAX_RETRY_DELAY_S)  # base, 2 base, 4 base, ...

    def wait(state: RetryCallState) -> float:
        return max(backoff(state), min(retry_after_s(state.outcome.exception()) or 0.0, MAX_RETRY_DELAY_S))

    def past_deadline(state: RetryCallState) -> bool:
        late = deadline is not None and time.monotonic() + wait(state) >= deadline
        if late:
            state.outcome.exception().deadline = True
        return late

    def before_sleep(state: RetryCallState) -> None:
        log(f"transient error ({describe(state.outcome.exception())}); retry {state.attempt_number}/{attempts - 1} "
            f"in {state.next_action.sleep:g}s")

    retrying = Retrying(stop=stop_after_attempt(attempts) | past_deadline, wait=wait, sleep=sleep, reraise=True,
                        retry=retry_if_exception(lambda e: isinstance(e, Exception) and retryable(e)),
                        before_sleep=before_sleep)
    for attempt in retrying:
        with attempt:
            try:
                return action()
            except Exception as error:
                error.attempts = attempt.retry_state.attempt_number
                raise


def describe(error: BaseException) -> str:
    first_line = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
    status = status_code(error)
    return f"HTTP {status}: {first_line}" if status else first_line


def within(deadline: float, action: Callable[[], object]):
    """Run `action` in a daemon thread and give up at `deadline` (monotonic) with TimeoutError: a request stuck
    below the HTTP timeouts (DNS, a TLS handshake) must not hold the process past its deadline."""
    outcome: dict = {}

    def run():
        try:
            outcome["value"] = action()
        except BaseException as e:  # handed to the waiting thread as is
            outcome["error"] = e

    worker = threading.Thread(target=run, daemon=True, name="deadline")
    worker.start()
    worker.join(max(0.0, deadline - time.monotonic()))
    if worker.is_alive():
        raise TimeoutError
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
