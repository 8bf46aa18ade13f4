"""Queueing and gang scheduling: Kueue's labels on the workload (its controller's behaviour is tested on real Kueue
in tests/test_cluster_kueue.py), and the PyTorchJob's and TrainingRuntime's gang-scheduling policies.
"""

from __future__ import annotations

import pytest

from chart import BACKENDS, RWX, merge, one, render, render_error


def test_gang_scheduling_policy_for_pytorchjob_only():
    policy = {"minAvailable": 2, "queue": "training", "scheduleTimeoutSeconds": 600}
    job = one(render(merge(RWX, {"backend": "pytorchjob", "gpus": 16, "kubeflow": {"schedulingPolicy": policy}})), "PyTorchJob")
    assert job["spec"]["runPolicy"]["schedulingPolicy"] == policy
    assert "kubeflow.schedulingPolicy is a PyTorchJob setting" in render_error({"kubeflow": {"schedulingPolicy": policy}})
    assert "for a Job or JobSet use Kueue (queueName)" in render_error({"backend": "jobset",
                                                                         "kubeflow": {"schedulingPolicy": policy}})
    runtime = one(render({"backend": "trainjob", "kubeflow": {"trainingRuntime": {"podGroupPolicy": {"volcano": {}}}}}),
                  "TrainingRuntime")
    assert runtime["spec"]["podGroupPolicy"] == {"volcano": {}}


@pytest.mark.parametrize("backend,kind", sorted(BACKENDS.items()))
def test_queued_runs_carry_kueues_labels_and_leave_suspend_to_kueue(backend, kind):
    """Kueue reads kueue.x-k8s.io/queue-name and kueue.x-k8s.io/priority-class on the workload object (kueue
    pkg/controller/constants QueueLabel, WorkloadPriorityClassLabel). The chart never writes `suspend`: Kueue's
    webhook suspends the workload and Kueue resumes it, so a `helm upgrade` of a running release cannot stop it."""
    docs = render({"backend": backend, "queueName": "gpu-queue", "workloadPriorityClassName": "research"})
    workload = one(docs, kind, "train")
    labels = workload["metadata"]["labels"]
    assert (labels["kueue.x-k8s.io/queue-name"], labels["kueue.x-k8s.io/priority-class"]) == ("gpu-queue", "research")
    assert "suspend" not in workload["spec"] and "suspend" not in workload["spec"].get("runPolicy", {})
    for doc in docs:  # only the workload is queued: not the push Job, not the pods
        if doc is not workload:
            assert not [k for k in doc["metadata"].get("labels", {}) if k.startswith("kueue.x-k8s.io/")], doc["kind"]
    plain = one(render({"backend": backend}), kind, "train")
    assert not [k for k in plain["metadata"]["labels"] if k.startswith("kueue.x-k8s.io/")]
    assert plain["spec"].get("suspend") is None
