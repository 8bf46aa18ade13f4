"""A training workload's state from its status: pending, running, succeeded, failed or suspended.

Conditions, per controller: Job https://kubernetes.io/docs/concepts/workloads/controllers/job/#terminal-job-conditions
  (JobConditionType Complete, Failed, Suspended, FailureTarget -- FailureTarget is set as soon as the Job is going to
  fail, before its pods are gone); PyTorchJob: kubeflow/training-operator `pkg/apis/kubeflow.org/v1/common_types.go`
  (Created, Running, Restarting, Succeeded, Suspended, Failed); JobSet: kubernetes-sigs/jobset
  `api/jobset/v1alpha2/jobset_types.go` (Completed, Failed, Suspended); TrainJob: kubeflow/trainer
  `pkg/apis/trainer/v1alpha1/trainjob_types.go` (Complete, Failed, Suspended).
Each kind counts its active pods in its own place too: one row per kind says both, so adding a kind is adding a row.
A terminal condition wins over Suspended/Running; without a condition, active pods mean running.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

PENDING, RUNNING, SUCCEEDED, FAILED, SUSPENDED = "pending", "running", "succeeded", "failed", "suspended"


@dataclass(frozen=True)
class KindStates:
    conditions: tuple[tuple[str, str], ...]  # (condition type, state), in the order checked
    active_counts: Callable[[dict], Iterable[dict]]  # the status parts that hold an `active` pod count


KINDS = {
    "Job": KindStates((("Complete", SUCCEEDED), ("Failed", FAILED), ("FailureTarget", FAILED),
                       ("Suspended", SUSPENDED)), lambda status: [status]),
    "PyTorchJob": KindStates((("Succeeded", SUCCEEDED), ("Failed", FAILED), ("Suspended", SUSPENDED),
                              ("Restarting", RUNNING), ("Running", RUNNING)),
                             lambda status: (status.get("replicaStatuses") or {}).values()),
    "JobSet": KindStates((("Completed", SUCCEEDED), ("Failed", FAILED), ("Suspended", SUSPENDED)),
                         lambda status: status.get("replicatedJobsStatus") or []),
    "TrainJob": KindStates((("Complete", SUCCEEDED), ("Failed", FAILED), ("Suspended", SUSPENDED)),
                           lambda status: status.get("jobsStatus") or []),
}


@dataclass(frozen=True)
class WorkloadStatus:
    state: str  # pending | running | succeeded | failed | suspended
    reason: str = ""
    message: str = ""

    def describe(self) -> str:
        detail = ": ".join(part for part in (self.reason, self.message) if part)
        return f"{self.state} ({detail})" if detail else self.state


def workload_status(kind: str, obj: dict) -> WorkloadStatus:
    status = obj.get("status") or {}
    states = KINDS[kind]
    true = {c["type"]: c for c in status.get("conditions") or [] if str(c.get("status")) == "True"}
    for condition_type, state in states.conditions:
        if condition_type in true:
            c = true[condition_type]
            return WorkloadStatus(state, c.get("reason") or condition_type, c.get("message") or "")
    active = any((part.get("active") or 0) > 0 for part in states.active_counts(status))
    return WorkloadStatus(RUNNING if active else PENDING)
