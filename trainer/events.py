"""Best-effort Kubernetes Events for the run's milestones, so `kubectl describe` and `kubectl get events` show them.

Rank 0 creates one `MilestoneEvents`; each milestone (started, checkpoint, evaluated, non-finite samples, preempted,
diverged, stalled, failed, completed) becomes one core/v1 Event on this pod and one on the workload that owns it
(trainer.kube.resolve_workload), with a human message and machine-readable annotations (`ddpm-trainer/<key>`) that `ddpm status` reads instead of
parsing prose.

Never in the way of training: the methods only put a record on a bounded queue (dropped and counted when full) and a
daemon thread talks to the API with short timeouts. The first refusal (401/403), timeout or connection error logs ONE
warning ("Kubernetes events off: ...") and the thread stops calling the API; outside a pod (no POD_NAME /
POD_NAMESPACE from the downward API) nothing starts and one info line says so. Messages hold only what the caller
passes, never environment values.

Event fields, from the API reference (https://kubernetes.io/docs/reference/kubernetes-api/cluster-resources/event-v1/)
and client-go's recorder (k8s.io/client-go/tools/record/event.go, events_cache.go): the Event lives in the involved
object's namespace; involvedObject carries apiVersion, kind, name, namespace and uid (`kubectl describe` selects
events by all four of kind, name, namespace, uid); the name is "<object>.<unix nanoseconds, hex>"; a repeated event
is not created again but patched: count + 1, lastTimestamp, message. The legacy fields (source, first/lastTimestamp,
count) are used, not eventTime/series, because the API server only checks the newer fields' consistency rules when
eventTime is set. The API server keeps an Event for --event-ttl (1 h by default) after its last write.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone

from trainer import kube

log = logging.getLogger(__name__)

COMPONENT = "ddpm-trainer"  # source.component / reportingComponent
ANNOTATION_PREFIX = "ddpm-trainer/"
MAX_MESSAGE = 1024  # the API's limit for events.k8s.io notes; core/v1 messages are kept as short

# Reasons: stable CamelCase strings, part of the interface (`ddpm status`, alerts, `kubectl get events`).
RUN_STARTED = "RunStarted"
CHECKPOINT_SAVED = "CheckpointSaved"
EVALUATION_DONE = "EvaluationDone"
PREEMPTED = "Preempted"
DIVERGED = "Diverged"
FAILED = "Failed"
COMPLETED = "Completed"
NON_FINITE_SAMPLES = "NonFiniteSamples"  # an evaluation's images, or the saved pipeline's, held NaN/inf
STALLED = "Stalled"  # no progress for stall_timeout_seconds: the process ended (exit 124)
REASONS = (RUN_STARTED, CHECKPOINT_SAVED, EVALUATION_DONE, NON_FINITE_SAMPLES, PREEMPTED, DIVERGED, FAILED, STALLED,
           COMPLETED)

# Annotation keys (without ANNOTATION_PREFIX); every value is a string, numbers in Python's repr.
STEP, TOTAL_STEPS = "step", "total-steps"
GLOBAL_BATCH, PROCESSES, RESUMED_FROM = "global-batch", "processes", "resumed-from"
CHECKPOINT, LOSS, ETA_SECONDS = "checkpoint", "loss", "eta-seconds"
SCORES = "scores"  # a JSON object, e.g. {"swd_mean": 123.4, "color_w1": 5.6}
OUTPUT_DIR, ERROR = "output-dir", "error"
FINAL = "final"  # "true" on the NonFiniteSamples that stopped the run


@dataclass(frozen=True)
class Milestone:
    reason: str
    type: str  # Normal or Warning
    message: str
    annotations: dict[str, str]
    repeats: bool = False  # one Event per object whose count grows (CheckpointSaved, EvaluationDone)


def _annotations(**values) -> dict[str, str]:
    """Keyword names use underscores; keys use dashes. None values are left out."""
    return {ANNOTATION_PREFIX + k.replace("_", "-"): str(v) for k, v in values.items() if v is not None}


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return ""
    minutes, secs = divmod(max(0, int(seconds)), 60)
    return f", eta {minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0][:MAX_MESSAGE]


_CLOSE = object()


class MilestoneEvents:
    """Posts the run's milestones as Events from a background thread. Every method returns at once."""

    def __init__(self, environ: Mapping[str, str] | None = None, *, post: bool = True,
                 checkpoint_interval_s: float = 60.0, queue_size: int = 256,
                 request_timeout: tuple[float, float] = kube.REQUEST_TIMEOUT, clock=time.monotonic):
        """`post` False: a silent no-op (ranks other than 0), whatever the environment says."""
        self.checkpoint_interval_s = checkpoint_interval_s  # at most one CheckpointSaved per interval
        self.dropped = 0  # milestones not posted because the queue was full
        self._clock = clock
        self._lock = threading.Lock()
        self._last_checkpoint_at: float | None = None
        self._pending_checkpoint: Milestone | None = None  # the newest rate-limited one, posted later
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._pod: kube.PodRef | None = None
        self._off = True  # until the thread starts; for good once the API refused or could not be reached
        self._closed = False
        self._thread: threading.Thread | None = None
        self._warned_other = False
        if not post:
            return
        env = dict(os.environ if environ is None else environ)
        try:
            self._pod = kube.PodRef.from_env(env)
        except ValueError as e:  # a malformed TRAINING_WORKLOAD: the chart's bug, not a reason to stop training
            log.warning("Kubernetes events off: %s", e)
            return
        if self._pod is None:
            log.info("Kubernetes events: not in a pod (POD_NAME/POD_NAMESPACE unset), none posted")
            return
        self._off = False
        self._thread = threading.Thread(target=self._run, args=(env, request_timeout), name="k8s-events",
                                        daemon=True)
        self._thread.start()

    @classmethod
    def off(cls) -> "MilestoneEvents":
        """A silent no-op, for ranks other than 0."""
        return cls(post=False)

    # ---- milestones --------------------------------------------------------------------------------------------
    def started(self, global_batch: int, processes: int, step: int, total_steps: int,
                resumed_from: str | None) -> None:
        what = f"resumed from {resumed_from} at step" if resumed_from else "started at step"
        self._post(Milestone(RUN_STARTED, "Normal",
                             f"training {what} {step}/{total_steps}: global batch {global_batch} "
                             f"({processes} process{'es' if processes != 1 else ''})",
                             _annotations(step=step, total_steps=total_steps, global_batch=global_batch,
                                          processes=processes, resumed_from=resumed_from or "")))

    def checkpoint(self, step: int, total_steps: int, path: str, loss: float | None = None,
                   eta_seconds: float | None = None) -> None:
        """Rate-limited: within `checkpoint_interval_s` of the last one posted, only the newest is kept, and posted
        with the next one after the interval or before any final milestone or close()."""
        loss = None if loss is None else float(loss)
        loss_text = f", loss {loss:.4g}" if loss is not None else ""
        milestone = Milestone(CHECKPOINT_SAVED, "Normal",
                              f"checkpoint saved at step {step}/{total_steps}: {path}{loss_text}{_eta(eta_seconds)}",
                              _annotations(step=step, total_steps=total_steps, checkpoint=path, loss=loss,
                                           eta_seconds=None if eta_seconds is None else round(eta_seconds)),
                              repeats=True)
        now = self._clock()
        with self._lock:
            if self._last_checkpoint_at is not None and now - self._last_checkpoint_at < self.checkpoint_interval_s:
                self._pending_checkpoint = milestone
                return
            self._last_checkpoint_at, self._pending_checkpoint = now, None
        self._post(milestone)

    def evaluated(self, step: int, scores: Mapping[str, float]) -> None:
        scores = {k: float(v) for k, v in scores.items()}  # numpy/torch scalars are not JSON
        shown = ", ".join(f"{k} {v:.4g}" for k, v in scores.items())
        self._post(Milestone(EVALUATION_DONE, "Normal", f"evaluation at step {step}: {shown}",
                             _annotations(step=step, scores=json.dumps(scores, sort_keys=True)), repeats=True))

    def nonfinite_samples(self, step: int, message: str, final: bool = False) -> None:
        """A Warning: at an evaluation (training goes on; one Event whose count grows) or, `final`, when the saved
        pipeline's check refused to mark the run complete."""
        what = "the saved pipeline's check" if final else "evaluation"
        milestone = Milestone(NON_FINITE_SAMPLES, "Warning", f"{what} at step {step}: {_first_line(message)}",
                              _annotations(step=step, error=_first_line(message), final="true" if final else None),
                              repeats=not final)
        if final:
            self._final(milestone)
        else:
            self._post(milestone)

    def preempted(self, step: int, checkpoint: str) -> None:
        self._final(Milestone(PREEMPTED, "Warning",
                              f"preempted at step {step}: checkpoint {checkpoint} saved; the retry resumes from it",
                              _annotations(step=step, checkpoint=checkpoint)))

    def diverged(self, step: int, message: str) -> None:
        self._final(Milestone(DIVERGED, "Warning", f"training diverged at step {step}: {_first_line(message)}",
                              _annotations(step=step, error=_first_line(message))))

    def stalled(self, step: int, message: str) -> None:
        self._final(Milestone(STALLED, "Warning", f"training stalled at step {step}: {_first_line(message)}",
                              _annotations(step=step, error=_first_line(message))))

    def failed(self, error_first_line: str) -> None:
        self._final(Milestone(FAILED, "Warning", f"training failed: {_first_line(error_first_line)}",
                              _annotations(error=_first_line(error_first_line))))

    def completed(self, step: int, output_dir: str) -> None:
        self._final(Milestone(COMPLETED, "Normal", f"training completed at step {step}; the model is in {output_dir}",
                              _annotations(step=step, output_dir=output_dir)))

    def close(self, timeout_s: float = 5.0) -> bool:
        """Post what is queued within `timeout_s` and stop the thread. True when everything queued was handled."""
        if self._thread is None or self._closed:
            return True
        self._flush_pending()
        self._closed = True
        deadline = time.monotonic() + timeout_s
        try:
            self._queue.put(_CLOSE, timeout=timeout_s)  # waits only if the queue is full (the thread is stuck)
        except queue.Full:
            pass
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self.dropped:
            log.info("Kubernetes events: %d dropped (queue full)", self.dropped)
        return not self._thread.is_alive()

    # ---- the caller's side -------------------------------------------------------------------------------------
    def _final(self, milestone: Milestone) -> None:
        self._flush_pending()
        self._post(milestone)

    def _flush_pending(self) -> None:
        with self._lock:
            pending, self._pending_checkpoint = self._pending_checkpoint, None
        if pending is not None:
            self._post(pending)

    def _post(self, milestone: Milestone) -> None:
        if self._off or self._closed:
            return
        try:
            self._queue.put_nowait(milestone)
        except queue.Full:
            self.dropped += 1

    # ---- the thread's side -------------------------------------------------------------------------------------
    def _run(self, environ: dict, request_timeout: tuple[float, float]) -> None:
        try:
            self._serve(environ, request_timeout)
        except Exception as e:  # never a traceback from this thread into the training log: one warning, then off
            self._turn_off(f"{type(e).__name__}: {e}")
            while not self._closed or not self._queue.empty():  # drain, so close() never waits for room
                try:
                    if self._queue.get(timeout=0.1) is _CLOSE:
                        break
                except queue.Empty:
                    continue

    def _serve(self, environ: dict, request_timeout: tuple[float, float]) -> None:
        try:
            cluster = kube.connect(environ, in_cluster_only=True, request_timeout=request_timeout)
            targets = self._targets(cluster)
        except kube.KubeError as e:
            return self._turn_off(e)
        series: dict[tuple[str, str], tuple[str, int]] = {}  # (object uid or name, reason) -> (event name, count)
        while True:
            try:  # once closed, only what is queued is handled (close() may not have found room for _CLOSE)
                item = self._queue.get(block=not self._closed)
            except queue.Empty:
                break
            if item is _CLOSE or (self._off and self._closed):
                break
            if self._off:
                continue  # drain
            for target in targets:
                try:
                    self._send(cluster, target, item, series)
                except (kube.Refused, kube.Unreachable, kube.NotConfigured) as e:
                    self._turn_off(e)
                    break
                except kube.KubeError as e:  # 409, 422, 5xx: this event is lost, the next may work
                    if not self._warned_other:
                        self._warned_other = True
                        log.warning("Kubernetes event %s not posted: %s", item.reason, e)
        cluster.close()

    def _targets(self, cluster: kube.Cluster) -> list[kube.ObjectRef]:
        try:
            pod, workload = kube.resolve_workload(cluster, self._pod)
        except kube.NotOwner as e:  # a wrong TRAINING_WORKLOAD: the pod's own events still help
            log.warning("Kubernetes events on the pod only: %s", e)
            uid = self._pod.uid
            return [kube.ObjectRef(kube.POD.api_version, kube.POD.kind, self._pod.name, self._pod.namespace, uid)]
        return [pod] + ([workload] if workload else [])

    def _turn_off(self, error: Exception) -> None:
        self._off = True
        log.warning("Kubernetes events off: %s; training goes on without them", error)

    def _send(self, cluster: kube.Cluster, target: kube.ObjectRef, item: Milestone, series: dict) -> None:
        now = _timestamp()
        key = (target.uid or target.name, item.reason)
        if item.repeats and key in series:
            name, count = series[key]
            try:
                kube.patch_event(cluster, target.namespace, name, {
                    "count": count + 1, "lastTimestamp": now, "message": item.message[:MAX_MESSAGE],
                    "metadata": {"annotations": item.annotations}})
                series[key] = (name, count + 1)
                return
            except kube.NotFound:  # expired (event TTL): start a new one
                pass
        name = f"{target.name}.{_unique_nanoseconds():x}"
        kube.create_event(cluster, target.namespace, {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": name, "namespace": target.namespace, "annotations": item.annotations},
            "involvedObject": target.as_involved_object(),
            "reason": item.reason, "message": item.message[:MAX_MESSAGE], "type": item.type,
            "source": {"component": COMPONENT}, "reportingComponent": COMPONENT,
            "reportingInstance": self._pod.name,
            "firstTimestamp": now, "lastTimestamp": now, "count": 1})
        if item.repeats:
            series[key] = (name, 1)


def _timestamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


_last_ns = 0
_ns_lock = threading.Lock()


def _unique_nanoseconds() -> int:
    """client-go's event name suffix (UnixNano), made strictly increasing so two events never share a name."""
    global _last_ns
    with _ns_lock:
        _last_ns = max(time.time_ns(), _last_ns + 1)
        return _last_ns
