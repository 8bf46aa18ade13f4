"""The chart's default backend (`job`) on a real control plane: helm installs the chart into kube-apiserver, the Job
controller creates the pods, the scheduler binds them (GPU capacity, taints, WaitForFirstConsumer volumes), and the
process kubelet runs each container as a local process (tests/cluster/kubelet.py).

No image is pulled: the pods run the command the pod spec names (`ddpm launch`) with the Dockerfile's environment and
this checkout's venv as the image's /opt/venv (tests/cluster/images.py), so what runs is the code under test. Two
one-GPU nodes (gpus=2, gpusPerNode=1) share a ReadWriteMany volume (the `shared` class); the training is tiny and on
CPU.
"""

from __future__ import annotations

import json

import pytest

from cluster.api import path_of
from cluster.testing import Release, delete_namespace, evict, namespace, wait_for
from conftest import CLUSTER_GROUP

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group(CLUSTER_GROUP)]

JOBS = "apis/batch/v1/jobs"
# 64 images, batch 4 per process x 2 processes: 8 steps per epoch. Small enough for seconds of CPU per step.
TINY = {"model_preset": "small", "image_size": 16, "builtin_num_images": 64, "train_batch_size": 4,
        "eval_batch_size": 4, "num_inference_steps": 2, "dataloader_num_workers": 0, "lr_warmup_steps": 2,
        "eval_quality_images": 0, "logging_steps": 2, "checkpointing_steps": 4, "save_image_epochs": 2,
        "max_train_steps": 16}


@pytest.fixture
def make_namespace(cluster):
    """A namespace for the test, deleted (and its pods gone, GPUs freed) when it ends."""
    made = []

    def make(prefix: str, pod_security: str | None = "restricted") -> str:
        made.append(namespace(cluster, prefix, pod_security))
        return made[-1]

    yield make
    for name in made:
        delete_namespace(cluster, name)


def values(**overrides) -> dict:
    config = dict(TINY, **overrides.pop("config", {}))
    base = {"gpus": 2, "gpusPerNode": 1, "config": config,
            "storage": {"storageClass": "shared", "accessModes": ["ReadWriteMany"], "size": "1Gi"},
            "extraEnv": [{"name": "OMP_NUM_THREADS", "value": "1"}, {"name": "HF_HUB_OFFLINE", "value": "1"}]}
    base.update(overrides)
    return base


def rank0_pod(release: Release) -> dict:
    pods = [p for p in release.pods() if p["metadata"]["labels"].get("batch.kubernetes.io/job-completion-index") == "0"]
    return max(pods, key=lambda p: p["metadata"]["creationTimestamp"])


def marker(release: Release) -> dict:
    output = release.volume_folder(release.claim) / release.fullname / "output"
    return json.loads((output / "training_complete.json").read_text())


def test_install_trains_to_completion_with_logs_events_tensorboard_and_helm_test(cluster, make_namespace):
    """Install as the README says, into a namespace whose Pod Security admission enforces `restricted`: every pod of
    the install is admitted, the two training pods land on the two GPU nodes, train together and complete;
    `kubectl logs` (through the API server and the kubelet's log endpoint) shows rank 0's progress lines, the run's
    Events are on the Job, TensorBoard runs, `helm test` passes, and `helm uninstall` keeps the claim."""
    ns = make_namespace("install")
    release = Release(cluster, "ddpm", ns, values())
    release.install()
    release.wait_condition(JOBS, release.workload, ("Complete", "Failed"), 300)
    assert release.condition(JOBS, release.workload, "Complete"), release.describe()

    pods = release.pods()
    assert sorted(p["spec"]["nodeName"] for p in pods) == ["gpu-node-0", "gpu-node-1"], release.describe()
    assert all(p["status"]["phase"] == "Succeeded" for p in pods)
    rank0 = rank0_pod(release)["metadata"]["name"]
    log = release.logs(rank0, "trainer")
    assert "step 16/16" in log and "done: 16 steps" in log, log[-2000:]
    assert marker(release)["global_step"] == 16

    ours = release.reasons(release.workload)
    for reason in ("RunStarted", "CheckpointSaved", "Completed"):
        assert reason in ours, ours

    tensorboard = wait_for("a ready TensorBoard pod", lambda: [
        p for p in release.pods("tensorboard") if any(c["type"] == "Ready" and c["status"] == "True"
                                                      for c in p["status"].get("conditions") or [])], 120,
        release.describe)
    assert tensorboard
    test = cluster.helm("test", "ddpm", "-n", ns, "--logs", check=False)
    assert test.returncode == 0 and "TensorBoard answers" in test.stdout, test.stdout + test.stderr

    release.uninstall()
    claim = release.get("api/v1/persistentvolumeclaims", release.claim)
    assert claim is not None and claim["status"]["phase"] == "Bound", "helm uninstall must keep the volume"
    assert release.get(JOBS, release.workload) is None


def test_an_evicted_training_pod_is_replaced_without_counting_and_the_run_resumes(cluster, make_namespace):
    """Evict one training pod mid-run (the Eviction API: DisruptionTarget, SIGTERM, the pod's grace period): the
    trainer checkpoints and exits 143, the Job's podFailurePolicy ignores it (status.failed stays 0) and creates a
    replacement, both nodes rendezvous again, resume from the newest checkpoint and finish at the same final step."""
    ns = make_namespace("evict")
    release = Release(cluster, "ddpm", ns, values(config={"max_train_steps": 40, "checkpointing_steps": 4}))
    release.install()
    wait_for("a checkpoint", lambda: "CheckpointSaved" in release.reasons(release.workload), 300, release.describe)
    victim = next(p for p in release.pods() if p["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"] == "1")
    evict(cluster, ns, victim["metadata"]["name"])

    release.wait_condition(JOBS, release.workload, ("Complete", "Failed"), 400)
    job = release.get(JOBS, release.workload)
    assert release.condition(JOBS, release.workload, "Complete"), release.describe()
    assert job["status"].get("failed", 0) == 0, f"a preemption was counted: {job['status']}\n{release.describe()}"
    old = [p for p in release.pods() if p["metadata"]["uid"] == victim["metadata"]["uid"]]
    if old:  # kept until the Job is deleted: terminal, with the condition the eviction added
        conditions = {c["type"]: c for c in old[0]["status"].get("conditions") or []}
        assert conditions["DisruptionTarget"]["reason"] == "EvictionByEvictionAPI"
        code = old[0]["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"]
        assert code == 143, f"the evicted trainer exited {code}, not 143"
    assert len(release.pods()) >= 2
    log = release.logs(rank0_pod(release)["metadata"]["name"], "trainer")
    assert "resumed from" in log, log[-3000:]
    assert marker(release)["global_step"] == 40


def test_a_config_error_fails_the_job_at_once_and_a_crash_is_retried(cluster, make_namespace):
    """Exit 2 (here: resume_from_checkpoint latest with no checkpoint) matches the FailJob rule: the Job fails with
    reason PodFailurePolicy after the first pods, no retry. A container killed like an OOM kill (137) is a counted
    failure: the Job replaces the pod and the run still completes."""
    ns = make_namespace("fail")
    bad = Release(cluster, "bad", ns, values(config={"resume_from_checkpoint": "latest"}))
    bad.install()
    failed = bad.wait_condition(JOBS, bad.workload, ("Failed", "Complete"), 300)
    assert failed["type"] == "Failed" and failed["reason"] == "PodFailurePolicy", failed
    assert "exit code 2" in failed["message"], failed["message"]
    job = bad.get(JOBS, bad.workload)
    assert job["status"].get("failed", 0) <= 2 and len(bad.pods()) <= 2, "a config error was retried"

    crash = Release(cluster, "crash", ns, values(config={"max_train_steps": 40}))
    crash.install()
    wait_for("a checkpoint", lambda: "CheckpointSaved" in crash.reasons(crash.workload), 300, crash.describe)
    victim = next(p for p in crash.pods() if p["status"]["phase"] == "Running")
    cluster.kubelet.kill_container(ns, victim["metadata"]["name"], "trainer")
    crash.wait_condition(JOBS, crash.workload, ("Complete", "Failed"), 400)
    assert crash.condition(JOBS, crash.workload, "Complete"), crash.describe()
    assert crash.get(JOBS, crash.workload)["status"].get("failed", 0) >= 1, "the crash was not counted"


def test_restricted_pod_security_is_enforced_by_the_api_server(cluster, make_namespace):
    """The namespaces above admit the default install under `restricted`; here the same admission refuses what it
    must: the opt-in ownership fix runs as root with CHOWN, which the Job controller cannot create there."""
    ns = make_namespace("psa")
    release = Release(cluster, "ddpm", ns, values(storage={"storageClass": "shared", "accessModes": ["ReadWriteMany"],
                                                         "size": "1Gi", "fixOwnership": True}))
    release.install()
    refused = wait_for("the Job controller's FailedCreate", lambda: [
        e for e in release.events(release.workload) if e["reason"] == "FailedCreate"], 120, release.describe)
    assert "violates PodSecurity \"restricted" in refused[0]["message"], refused[0]["message"]
    assert release.pods() == []
