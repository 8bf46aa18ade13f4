"""The Kubeflow backends on the real control plane, with their operators built from their Go modules and started
from the build's manifest (tests/cluster/operators.py): `pytorchjob` on the Kubeflow training operator v1.8.1 (the
chart's floor), `trainjob` on the Kubeflow Trainer v2.3.0 with the JobSet v0.12.0 it installs, each with its
webhooks. Pods run as in tests/test_cluster_job.py."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cluster.testing import Release, evict_paused, marker, paused, resumed, values, wait_for
from conftest import CLUSTER_GROUP

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group(CLUSTER_GROUP)]

PYTORCHJOBS = "apis/kubeflow.org/v1/pytorchjobs"
TRAINJOBS = "apis/trainer.kubeflow.org/v1alpha1/trainjobs"
JOBSETS = "apis/jobset.x-k8s.io/v1alpha2/jobsets"


def test_pytorchjob_trains_survives_a_preemption_and_status_ranks_worker_0_first(cluster, make_namespace):
    """backend=pytorchjob: the operator creates the Workers with the elasticPolicy's c10d settings (worker-0 hosts the
    store); evicting worker-1 mid-run ends its trainer with 143, which restartPolicy ExitCode treats as retryable: the
    operator recreates the pod, the workers rendezvous again, resume and the PyTorchJob succeeds. `ddpm status`
    (issue 19 point 12) shows worker-0 as rank 0."""
    cluster.operators.ensure("training-operator")
    ns = make_namespace("pytorchjob")
    release = Release(cluster, "ddpm", ns, values(backend="pytorchjob", config={"max_train_steps": 40}))
    release.install()
    wait_for("a checkpoint", lambda: release.newest_checkpoint() > 0, 300, release.describe)
    with paused(cluster, release, 40):  # mid-run however fast this machine trains
        status = subprocess.run([sys.executable, "-m", "trainer", "status", "--release", "ddpm", "-n", ns],
                                capture_output=True, text=True, env=cluster.env())
        rows = {line.split()[1]: line.split()[0] for line in status.stdout.splitlines()
                if line.startswith("  ") and "ddpm-train-worker-" in line}
        assert rows.get("ddpm-train-worker-0") == "0" and rows.get("ddpm-train-worker-1") == "1", status.stdout
        evict_paused(cluster, release, "ddpm-train-worker-1")
    done = release.wait_condition(PYTORCHJOBS, release.workload, ("Succeeded", "Failed"), 600)
    assert done["type"] == "Succeeded", release.describe()
    assert resumed(release), release.describe()
    assert marker(release)["global_step"] == 40


def test_trainjob_installs_on_the_trainers_webhook_trains_and_survives_a_preemption(cluster, make_namespace):
    """backend=trainjob (issue 19 point 1): `helm install` succeeds with the Trainer's webhook running, which refuses
    a TrainJob whose runtime does not exist yet: the chart's TrainingRuntime is a pre-install hook, created before
    the TrainJob (Helm orders kinds it does not know alphabetically, TrainJob first). The Trainer turns the TrainJob
    into a JobSet; an evicted pod is replaced without counting (the runtime's Job podFailurePolicy) and the run
    completes."""
    cluster.operators.ensure("trainer")
    ns = make_namespace("trainjob")
    release = Release(cluster, "ddpm", ns, values(backend="trainjob", config={"max_train_steps": 40}))
    release.install()
    wait_for("a checkpoint", lambda: release.newest_checkpoint() > 0, 300, release.describe)
    with paused(cluster, release, 40):  # mid-run however fast this machine trains
        victim = next(p for p in release.pods() if p["status"].get("phase") == "Running"
                      and p["metadata"]["labels"].get("batch.kubernetes.io/job-completion-index") == "1")
        evict_paused(cluster, release, victim["metadata"]["name"])
    done = release.wait_condition(TRAINJOBS, release.workload, ("Complete", "Failed"), 600)
    assert done["type"] == "Complete", release.describe()
    assert resumed(release), release.describe()
    jobs = release.list("apis/batch/v1/jobs")
    assert all(job["status"].get("failed", 0) == 0 for job in jobs), [job["status"] for job in jobs]
    assert marker(release)["global_step"] == 40
