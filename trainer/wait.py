"""`ddpm wait-for-training`: the push Job's init container waits for the training workload to finish.

With API access (the chart's Role: get/watch on the workload kind) it watches the workload: succeeded and the
completion marker matches -> 0; failed -> the workload's reason and message, 2 at once (waiting or retrying cannot
help: the Job controller has given up); pending, running or suspended -> keep waiting until the deadline (1).
Without access (no service account token, 401/403, API unreachable) it says so in one line and polls the completion
marker every `poll_seconds` until the deadline, as the chart's shell loop did.

The workload's states come from trainer.workload_state (its docstring names each kind's condition types). A watch is
the API's way to wait without polling
(https://kubernetes.io/docs/reference/using-api/api-concepts/#efficient-detection-of-changes): GET gives the object and its resourceVersion, a watch from there streams each change; a watch ends after its
timeoutSeconds or with 410 Gone when that version is too old, and either way the object is read again.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping

from trainer import kube
from trainer.errors import Outcome
from trainer.workload_state import FAILED, SUCCEEDED, workload_status

# The wait's outcomes: the workload finished with this config's run; the deadline passed (a retry may help); the
# workload failed (the Job controller has given up: waiting or retrying cannot help).
WAIT_OK, WAIT_TIMEOUT, WAIT_FAILED = Outcome.OK, Outcome.FAILED, Outcome.REFUSED
MAX_WATCH_SECONDS = 300  # one watch request at most this long; then the object is read again


def wait_for_training(workload: str, namespace: str | None, marker_matches: Callable[[], tuple[bool, str]], *,
                      poll_seconds: float, timeout_seconds: float, environ: Mapping[str, str] | None = None,
                      say: Callable[[str], None] = print, context: str | None = None) -> Outcome:
    """`workload` is "<Kind>/<name>" (raises ValueError otherwise). `marker_matches()` -> (matches, description),
    e.g. the completion marker's run and step against the config's. Returns WAIT_OK, WAIT_TIMEOUT or WAIT_FAILED."""
    ref = kube.WorkloadRef.parse(workload)
    deadline = time.monotonic() + timeout_seconds
    waiter = _Waiter(ref, marker_matches, poll_seconds, timeout_seconds, deadline, say)
    try:
        cluster = kube.connect(environ, in_cluster_only=False, context=context)
    except kube.NotConfigured as e:
        say(f"no Kubernetes API access ({e}); polling the completion marker every {poll_seconds:g}s instead")
        return waiter.poll_marker()
    try:
        return waiter.watch(cluster, namespace or cluster.namespace)
    except (kube.Refused, kube.Unreachable, kube.NotConfigured) as e:
        say(f"cannot read {ref} through the Kubernetes API ({e}); "
            f"polling the completion marker every {poll_seconds:g}s instead")
        return waiter.poll_marker()
    finally:
        cluster.close()


class _Waiter:
    def __init__(self, ref: kube.WorkloadRef, marker_matches, poll_seconds: float, timeout_seconds: float,
                 deadline: float, say):
        self.ref, self.kind = ref, kube.WORKLOAD_KINDS[ref.kind]
        self.marker_matches, self.poll_seconds, self.timeout_seconds = marker_matches, poll_seconds, timeout_seconds
        self.deadline, self.say = deadline, say
        self._last_said: str | None = None
        self.last_seen = "not read yet"  # the workload's state, for the timeout message

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def tell(self, line: str) -> None:
        """Say a line once, not again while nothing changes."""
        if line != self._last_said:
            self._last_said = line
            self.say(line)

    def timed_out(self, why: str) -> Outcome:
        self.say(f"timed out after {self.timeout_seconds:g}s waiting for {self.ref}: {why}")
        return WAIT_TIMEOUT

    def poll_marker(self) -> Outcome:
        while True:
            matches, why = self.marker_matches()
            if matches:
                self.say(f"completion marker matches: {why}")
                return WAIT_OK
            if self.remaining() <= 0:
                return self.timed_out(why)
            self.tell(f"waiting for the completion marker: {why}")
            time.sleep(min(self.poll_seconds, self.remaining()))  # the poll interval itself

    def watch(self, cluster: kube.Cluster, namespace: str) -> Outcome:
        """Raises Refused/Unreachable for the caller to fall back to the marker."""
        while True:
            try:
                obj = kube.get_object(cluster, self.kind, namespace, self.ref.name)
            except kube.NotFound:
                obj = None
            if (decided := self.decide(obj)) is not None:
                return decided
            if self.remaining() <= 0:
                return self.timed_out(f"it is {self.last_seen}")
            if obj is None:  # not created yet: nothing to watch from
                time.sleep(min(self.poll_seconds, self.remaining()))
                continue
            try:
                for version in kube.watch_object(cluster, self.kind, namespace, self.ref.name,
                                                 resource_version=obj["metadata"].get("resourceVersion"),
                                                 timeout_seconds=max(1, math.ceil(min(self.remaining(),
                                                                                      MAX_WATCH_SECONDS)))):
                    if (decided := self.decide(version)) is not None:
                        return decided
            except (kube.NotFound, kube.ApiFailure):  # deleted, or 410 Gone / a server error: read it again
                time.sleep(min(self.poll_seconds, max(0.0, self.remaining())))

    def decide(self, obj: dict | None) -> Outcome | None:
        """The outcome when the wait is over, else None (and a line when the state changed)."""
        if obj is None:
            matches, why = self.marker_matches()
            if matches:  # finished and already cleaned up (ttlSecondsAfterFinished)
                self.say(f"{self.ref} not found, but the completion marker matches: {why}")
                return WAIT_OK
            self.last_seen = "not found"
            self.tell(f"{self.ref} not found yet; waiting for it")
            return None
        status = workload_status(self.ref.kind, obj)
        self.last_seen = status.describe()
        if status.state == FAILED:
            self.say(f"{self.ref} failed: {': '.join(p for p in (status.reason, status.message) if p) or 'no reason'}")
            return WAIT_FAILED
        if status.state == SUCCEEDED:
            matches, why = self.marker_matches()
            if matches:
                self.say(f"{self.ref} succeeded; completion marker matches: {why}")
                return WAIT_OK
            # The pods are done, so only a slow shared volume can still change the marker.
            self.say(f"{self.ref} succeeded but the completion marker does not match yet: {why}")
            return self.poll_marker()
        self.tell(f"{self.ref} is {status.describe()}; waiting")
        return None
