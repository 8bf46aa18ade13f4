"""Queued runs on the real control plane with Kueue v0.17.1 (`waitForPodsReady` on, timeout 5 minutes), built from
its Go module and started from the build's manifest (tests/cluster/operators.py), with its webhooks: a cluster
admin's ResourceFlavor and ClusterQueue, the namespace's LocalQueue, and the chart's `queueName`."""

from __future__ import annotations

import json

import pytest

from cluster.testing import Release, marker, values, wait_for
from conftest import CLUSTER_GROUP

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group(CLUSTER_GROUP)]

JOBS = "apis/batch/v1/jobs"
JOBSETS = "apis/jobset.x-k8s.io/v1alpha2/jobsets"
WORKLOADS = "apis/kueue.x-k8s.io/v1beta2/workloads"


@pytest.fixture
def queue(cluster, make_namespace):
    """Kueue running, a ClusterQueue with the cluster's two GPUs, and a namespace with its LocalQueue `gpu-queue`."""
    cluster.operators.ensure("kueue")
    ns = make_namespace("queued")
    objects = [
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": "gpus"}},
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ClusterQueue", "metadata": {"name": "gpus"},
         "spec": {"namespaceSelector": {}, "resourceGroups": [{
             "coveredResources": ["cpu", "memory", "nvidia.com/gpu"],
             "flavors": [{"name": "gpus", "resources": [{"name": "cpu", "nominalQuota": 64},
                                                         {"name": "memory", "nominalQuota": "512Gi"},
                                                         {"name": "nvidia.com/gpu", "nominalQuota": 2}]}]}]}},
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue", "metadata": {"name": "gpu-queue",
                                                                                 "namespace": ns},
         "spec": {"clusterQueue": "gpus"}},
    ]
    cluster.kubectl("apply", "--server-side", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                                          "items": objects}))
    return ns


def admitted(release: Release) -> list[dict]:
    return [w for w in release.list(WORKLOADS) if any(
        c["type"] == "Admitted" and c["status"] == "True" for c in (w.get("status") or {}).get("conditions") or [])]


def test_a_queued_job_is_admitted_and_an_upgrade_of_the_running_release_does_not_stop_it(cluster, queue):
    """Issue 19 point 10: the chart no longer renders `suspend: true` for a queued run; Kueue's webhook suspends the
    Job when it is created and Kueue resumes it on admission. A `helm upgrade --reuse-values` of the running release
    (Helm 4: server-side apply) then leaves `suspend` to Kueue: the Job keeps running, its pods are not deleted, and
    it completes."""
    release = Release(cluster, "ddpm", queue, values(queueName="gpu-queue", config={"max_train_steps": 40}))
    hold = cluster.kubelet.hold(r"^ddpm-train-1-")  # the run cannot end while the upgrade happens
    try:
        release.install()
        wait_for("Kueue's admission", lambda: admitted(release), 120, release.describe)
        pods = wait_for("the Job's pods", lambda: len(release.pods()) == 2 and release.pods(), 120, release.describe)
        assert release.get(JOBS, release.workload)["spec"]["suspend"] is False
        release.upgrade("--reuse-values", "--set", "config.logging_steps=4")
        job = release.get(JOBS, release.workload)
        assert job["spec"]["suspend"] is False, "the upgrade suspended the running Job"
        assert {p["metadata"]["uid"] for p in release.pods()} == {p["metadata"]["uid"] for p in pods}
    finally:
        hold()
    release.wait_condition(JOBS, release.workload, ("Complete", "Failed"), 400)
    assert release.condition(JOBS, release.workload, "Complete"), release.describe()
    assert marker(release)["global_step"] == 40


def test_a_queued_jobset_passes_wait_for_pods_ready_and_completes(cluster, queue):
    """Issue 19 point 5: with the JobSet backend, Kueue counts the pods of every replicated Job of the JobSet and,
    with waitForPodsReady, evicts a workload whose pods are not all Ready in time. The chart's JobSet has no
    replicated Job that waits for training (the push used to be one, created only after training: never Ready), so
    the admitted workload gets PodsReady and the run completes without being evicted."""
    cluster.operators.ensure("jobset")
    release = Release(cluster, "ddpm", queue, values(backend="jobset", queueName="gpu-queue",
                                                     config={"max_train_steps": 24}))
    release.install()
    workload = wait_for("the workload's PodsReady", lambda: [
        w for w in admitted(release) if any(c["type"] == "PodsReady" and c["status"] == "True"
                                            for c in w["status"].get("conditions") or [])], 300, release.describe)[0]
    assert sum(ps["count"] for ps in workload["spec"]["podSets"]) == 2
    release.wait_condition(JOBSETS, release.workload, ("Completed", "Failed"), 400)
    assert release.condition(JOBSETS, release.workload, "Completed"), release.describe()
    evicted = [c for w in release.list(WORKLOADS) for c in w["status"].get("conditions") or []
               if c["type"] == "Evicted" and c["status"] == "True"]
    assert not evicted, evicted
