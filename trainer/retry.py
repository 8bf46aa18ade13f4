"""Retries with exponential backoff, and a deadline for work that may hang below every timeout.

Which errors are worth retrying is the caller's to say (trainer.hub: connection problems, HTTP 408/429/5xx). The
whole push, create_repo + upload_folder, is one action here; huggingface_hub's own `http_backoff` retries single
requests only (its LFS uploads), and tenacity is not among the dependencies, so these few lines stay.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

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


def backoff_delays(attempts: int, base_s: float, cap_s: float = MAX_RETRY_DELAY_S) -> list[float]:
    """The waits before attempts 2..attempts: base, 2 base, 4 base, ..., at most cap_s."""
    return [min(cap_s, base_s * 2**i) for i in range(max(attempts - 1, 0))]


def with_retries(action: Callable[[], object], attempts: int, base_delay_s: float, log: Callable[[str], None],
                 retryable: Callable[[BaseException], bool], sleep: Callable[[float], None] = time.sleep,
                 deadline: float | None = None):
    """Run `action`; after an error that is `retryable` wait (the backoff, or the server's Retry-After if longer)
    and rerun it. No retry starts whose wait would end after `deadline` (time.monotonic()): the last error is raised
    instead."""
    delays = backoff_delays(attempts, base_delay_s)
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except Exception as error:
            error.attempts = attempt  # how many were made, for the message
            if attempt == attempts or not retryable(error):
                raise
            delay = max(delays[attempt - 1], min(retry_after_s(error) or 0.0, MAX_RETRY_DELAY_S))
            if deadline is not None and time.monotonic() + delay >= deadline:
                error.deadline = True
                raise
            log(f"transient error ({describe(error)}); retry {attempt}/{attempts - 1} in {delay:g}s")
            sleep(delay)


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
