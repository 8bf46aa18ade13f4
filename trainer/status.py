"""`ddpm status [--release NAME] [-n NAMESPACE]`: where a release's training run stands, from the user's kubeconfig.

It reads, with the user's own rights (trainer.rbac.STATUS_CALLS): the release's training workload, found by the
chart's labels (app.kubernetes.io/instance=<release>, app.kubernetes.io/component=train, helm/templates/_helpers.tpl
and _run.tpl) among the kinds the chart creates; the training pods by the same labels, each placed at its node rank
by the label its controller adds (Job and JobSet: batch.kubernetes.io/job-completion-index, Kubernetes >= 1.28;
PyTorchJob: training.kubeflow.org/replica-type and replica-index, the Master being rank 0 when the job has one, else
worker-0); and the Events rank 0 posted on the workload (trainer.events), whose `ddpm-trainer/*` annotations give the
step, loss, ETA, checkpoint and scores -- never their prose. Events live for the API server's --event-ttl (1 h by
default) after their last write, so an old, quiet run shows no progress.

Exit status: 0 pending/running/suspended/succeeded, 2 when the workload failed, 1 when it cannot be found or read.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

from trainer import events as ev
from trainer import kube
from trainer.errors import Outcome
from trainer.workload_state import FAILED, WorkloadStatus, workload_status

# The status's outcomes: shown; the workload or the API could not be read (a retry may help); the workload failed.
STATUS_OK, STATUS_UNKNOWN, STATUS_FAILED = Outcome.OK, Outcome.FAILED, Outcome.REFUSED
INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
# The JobSet controller's label naming a pod's replicated Job (jobset api/jobset/v1alpha2 jobset_types.go).
REPLICATED_JOB_LABEL = "jobset.sigs.k8s.io/replicatedjob-name"
REPLICA_TYPE_LABEL, REPLICA_INDEX_LABEL = "training.kubeflow.org/replica-type", "training.kubeflow.org/replica-index"


def release_selector(release: str) -> str:
    return f"app.kubernetes.io/instance={release},app.kubernetes.io/component=train"


@dataclass(frozen=True)
class PodRow:
    rank: str
    name: str
    phase: str
    restarts: int
    node: str
    container: str
    created: str


@dataclass
class Progress:
    """What the workload's Events say, newest first where it matters."""

    step: int | None = None
    total_steps: int | None = None
    at: str = ""  # lastTimestamp of the event that gave the step
    loss: str | None = None
    eta_seconds: int | None = None
    checkpoint: str | None = None
    resumed_from: str | None = None
    scores: dict = field(default_factory=dict)
    scores_step: int | None = None
    preemptions: int = 0
    completed: str | None = None  # output dir
    error: str | None = None  # the newest Failed/Diverged/Stalled
    warning: str | None = None  # the newest evaluation whose samples were non-finite


def status(release: str, namespace: str | None, *, environ: Mapping[str, str] | None = None, out=None,
           context: str | None = None) -> Outcome:
    def say(line: str = "") -> None:
        print(line, file=out or sys.stdout)  # the stdout of the call, not of the import

    try:
        cluster = kube.connect(environ, in_cluster_only=False, context=context)
    except kube.NotConfigured as e:
        say(f"error: no Kubernetes access: {e}")
        return STATUS_UNKNOWN
    try:
        return _report(cluster, release, namespace or cluster.namespace, say)
    except (kube.Refused, kube.Unreachable, kube.ApiFailure, kube.NotFound) as e:
        say(f"error: cannot read release {release!r} through {cluster.source}: {e}")
        return STATUS_UNKNOWN
    finally:
        cluster.close()


def _report(cluster: kube.Cluster, release: str, namespace: str, say) -> Outcome:
    found = find_workload(cluster, release, namespace)
    if found is None:
        say(f"error: no training workload of release {release!r} in namespace {namespace!r} "
            f"(no {', '.join(k.kind for k in kube.CHART_WORKLOAD_KINDS)} labelled {release_selector(release)})")
        return STATUS_UNKNOWN
    kind, obj = found
    state = workload_status(kind.kind, obj)
    name = obj["metadata"]["name"]
    selector = release_selector(release)
    pods = pod_rows(kind.kind, kube.list_objects(cluster, kube.POD, namespace, label_selector=selector),
                    master=has_master(obj))
    progress = read_progress(kube.list_objects(cluster, kube.EVENT, namespace,
                                               field_selector=f"involvedObject.uid={obj['metadata']['uid']}"))
    for line in render(release, namespace, kind, name, state, pods, progress):
        say(line)
    return STATUS_FAILED if state.state == FAILED else STATUS_OK


def find_workload(cluster: kube.Cluster, release: str, namespace: str) -> tuple[kube.Kind, dict] | None:
    """The newest workload labelled as the release's training run, among the kinds the chart creates. A kind the
    user may not list is skipped unless nothing is found (then that refusal is the answer)."""
    found, refused = [], None
    for kind in kube.CHART_WORKLOAD_KINDS:
        try:
            items = kube.list_objects(cluster, kind, namespace, label_selector=release_selector(release))
        except kube.NotFound:  # that operator's CRD is not installed
            continue
        except kube.Refused as e:
            refused = refused or e
            continue
        # A TrainJob's JobSet (or a JobSet's Job) may carry the release's labels too: the workload is the top one.
        found += [(kind, item) for item in items if not any(
            ref.get("controller") and ref.get("kind") in kube.WORKLOAD_KINDS
            for ref in item["metadata"].get("ownerReferences") or [])]
    if not found and refused:
        raise refused
    return max(found, key=lambda f: f[1]["metadata"].get("creationTimestamp") or "", default=None)


def has_master(workload: dict) -> bool:
    """Whether a PyTorchJob has a Master replica (spec.pytorchReplicaSpecs, keyed by replica type: kubeflow/
    training-operator pkg/apis/kubeflow.org/v1 pytorch_types.go). The chart's has Workers only."""
    specs = (workload.get("spec") or {}).get("pytorchReplicaSpecs") or {}
    return any(role.lower() == "master" for role in specs)


def node_rank(kind: str, labels: Mapping[str, str], master: bool = False) -> str:
    """A pod's node rank from its controller's labels. PyTorchJob: with a Master replica it is rank 0 and worker i
    is i + 1; without one (the chart's elastic Workers-only job) worker i is rank i: worker-0 hosts the rendezvous,
    and its name sorts first (docs/KUBERNETES.md, Failures per backend). Indexed Job pods (a Job, a TrainJob's
    JobSet) are their completion index, except the chart's JobSet's `workers`, which follow its one-pod `leader`."""
    if kind == "PyTorchJob":
        role, index = labels.get(REPLICA_TYPE_LABEL, "").lower(), labels.get(REPLICA_INDEX_LABEL)
        if role == "master":
            return "0"
        if role == "worker" and index and index.isdigit():
            return str(int(index) + 1 if master else int(index))
        return "?"
    index = labels.get(INDEX_LABEL, "?")
    if labels.get(REPLICATED_JOB_LABEL) == "workers" and index.isdigit():
        return str(int(index) + 1)  # the chart's JobSet: node 0 is the `leader` Job's pod, worker i is node i + 1
    return index


def pod_rows(kind: str, pods: list[dict], master: bool = False) -> list[PodRow]:
    rows = []
    for pod in pods:
        meta, spec, st = pod["metadata"], pod.get("spec") or {}, pod.get("status") or {}
        statuses = st.get("containerStatuses") or []
        waiting = [s["state"]["waiting"].get("reason") for s in statuses
                   if (s.get("state") or {}).get("waiting", {}).get("reason")]
        phase = "Terminating" if meta.get("deletionTimestamp") else st.get("phase") or "Unknown"
        container = ((spec.get("containers") or [{}])[0]).get("name") or ""
        rows.append(PodRow(node_rank(kind, meta.get("labels") or {}, master), meta["name"],
                           f"{phase} ({waiting[0]})" if waiting else phase,
                           sum(s.get("restartCount") or 0 for s in statuses), spec.get("nodeName") or "-",
                           container, meta.get("creationTimestamp") or ""))
    return sorted(rows, key=lambda r: (int(r.rank) if r.rank.isdigit() else 1 << 30, r.created, r.name))


def _ours(event: dict) -> bool:
    return event.get("reportingComponent") == ev.COMPONENT and event.get("reason") in ev.REASONS


def read_progress(events: list[dict]) -> Progress:
    mine = sorted((e for e in events if _ours(e)), key=_event_order)
    progress = Progress()
    for event in mine:  # oldest first: later events overwrite
        notes = {k[len(ev.ANNOTATION_PREFIX):]: v for k, v in (event["metadata"].get("annotations") or {}).items()
                 if k.startswith(ev.ANNOTATION_PREFIX)}
        reason = event["reason"]
        if ev.STEP in notes and reason in (ev.RUN_STARTED, ev.CHECKPOINT_SAVED, ev.PREEMPTED, ev.COMPLETED):
            progress.step, progress.at = int(notes[ev.STEP]), event.get("lastTimestamp") or ""
        if ev.TOTAL_STEPS in notes:
            progress.total_steps = int(notes[ev.TOTAL_STEPS])
        if reason == ev.RUN_STARTED:
            progress.resumed_from = notes.get(ev.RESUMED_FROM) or None
        if reason == ev.CHECKPOINT_SAVED:
            progress.loss = notes.get(ev.LOSS)
            progress.eta_seconds = int(notes[ev.ETA_SECONDS]) if ev.ETA_SECONDS in notes else None
        if reason in (ev.CHECKPOINT_SAVED, ev.PREEMPTED) and ev.CHECKPOINT in notes:
            progress.checkpoint = notes[ev.CHECKPOINT]
        if reason == ev.EVALUATION_DONE and ev.SCORES in notes:
            progress.scores, progress.scores_step = json.loads(notes[ev.SCORES]), int(notes.get(ev.STEP, 0))
        if reason == ev.PREEMPTED:
            progress.preemptions += event.get("count") or 1
        if reason == ev.COMPLETED:
            progress.completed = notes.get(ev.OUTPUT_DIR)
        if reason in (ev.FAILED, ev.DIVERGED, ev.STALLED) or (
                reason == ev.NON_FINITE_SAMPLES and notes.get(ev.FINAL) == "true"):
            progress.error = f"{reason}: {notes.get(ev.ERROR, event.get('message', ''))}"
        elif reason == ev.NON_FINITE_SAMPLES:
            progress.warning = f"{reason} at step {notes.get(ev.STEP, '?')}: {notes.get(ev.ERROR, '')}"
    return progress


def _event_order(event: dict) -> tuple:
    """By last write; within one second, by step (a run's events carry increasing steps)."""
    step = (event["metadata"].get("annotations") or {}).get(ev.ANNOTATION_PREFIX + ev.STEP, "0")
    return event.get("lastTimestamp") or "", int(step) if step.isdigit() else 0


def _clock(seconds: int) -> str:
    minutes, secs = divmod(seconds, 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def render(release: str, namespace: str, kind: kube.Kind, name: str, state: WorkloadStatus,
           pods: list[PodRow], progress: Progress) -> list[str]:
    lines = [f"release {release} in namespace {namespace}", f"workload    {kind.kind}/{name}: {state.describe()}"]
    lines += _pod_table(pods)
    lines += _progress_lines(progress)
    fullname = name[: -len("-train")] if name.endswith("-train") else name
    rank0 = next((p for p in reversed(pods) if p.rank == "0"), None)  # the newest rank-0 pod
    logs = (f"kubectl -n {namespace} logs -f --tail=-1 {rank0.name} -c {rank0.container}" if rank0 else
            f"kubectl -n {namespace} logs -f --tail=-1 -l {release_selector(release)} --prefix")
    forward = f"kubectl -n {namespace} port-forward svc/{fullname}-tensorboard 6006:6006"
    lines += ["next", f"  {logs}", f"  {forward}   # then http://localhost:6006",
              f"  kubectl -n {namespace} describe {kind.kind.lower()} {name}"]
    return lines


def _pod_table(pods: list[PodRow]) -> list[str]:
    if not pods:
        return ["pods        none"]
    header = ("rank", "pod", "phase", "restarts", "node")
    rows = [header] + [(p.rank, p.name, p.phase, str(p.restarts), p.node) for p in pods]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return ["pods"] + ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def _progress_lines(p: Progress) -> list[str]:
    if p.step is None and p.error is None:
        return ["progress    no events from the trainer (not started yet, events off, or older than the event TTL)"]
    lines = []
    if p.step is not None:
        total = f"/{p.total_steps} ({100 * p.step // p.total_steps}%)" if p.total_steps else ""
        details = [f"loss {p.loss}"] if p.loss is not None else []
        details += [f"eta {_clock(p.eta_seconds)}"] if p.eta_seconds is not None and not p.completed else []
        lines.append(f"progress    step {p.step}{total}{', ' + ', '.join(details) if details else ''}"
                     f"{f' (as of {p.at})' if p.at else ''}")
    if p.resumed_from:
        lines.append(f"resumed     from {p.resumed_from}")
    if p.checkpoint:
        lines.append(f"checkpoint  {p.checkpoint}")
    if p.scores:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(p.scores.items()))
        lines.append(f"evaluation  step {p.scores_step}: {shown}")
    lines.append(f"preemptions {p.preemptions}")
    if p.completed:
        lines.append(f"completed   model in {p.completed}")
    if p.warning:
        lines.append(f"warning     {p.warning}")
    if p.error:
        lines.append(f"error       {p.error}")
    return lines
