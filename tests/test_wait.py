"""trainer/wait.py (`ddpm wait-for-training`) against a real API server (tests/kube_proxy.py): in-cluster (the push Job's service
account) and through a kubeconfig; the completion marker check is a fake that counts its calls."""

from __future__ import annotations

import threading
import time

import pytest

from kube_proxy import KubeProxy, closed_port, condition, kube_server, put_training_run  # noqa: F401 (fixture)
from trainer.errors import EXIT_FAILED, exit_code
from trainer.wait import WAIT_FAILED, WAIT_OK, WAIT_TIMEOUT, wait_for_training


class Marker:
    """Stands in for the check of output_dir/training_complete.json: False `misses` times, then True (or never)."""

    def __init__(self, misses: int = 0, never: bool = False):
        self.misses, self.never, self.calls = misses, never, 0

    def __call__(self) -> tuple[bool, str]:
        self.calls += 1
        if self.never or self.calls <= self.misses:
            return False, "no training_complete.json in /data/runs/ddpm"
        return True, "run 3f2a at step 6"


def in_cluster(fake: KubeProxy, tmp_path) -> dict:
    return fake.in_cluster_env(fake.write_service_account(tmp_path / "sa"))


def wait(env: dict, workload: str, marker: Marker, lines: list, **kwargs) -> int:
    options = {"poll_seconds": 0.01, "timeout_seconds": 10.0} | kwargs
    return wait_for_training(workload, None, marker, environ=env, say=lines.append, **options)


def complete_after_watch_starts(fake: KubeProxy, run, conditions: list[dict]) -> threading.Thread:
    """Once the waiter watches, the controller marks the workload finished (as the API would stream it)."""

    def finish():
        assert fake.wait_for_watches(1)
        fake.put(run.workload | {"status": {"conditions": conditions}})

    thread = threading.Thread(target=finish)
    thread.start()
    return thread


@pytest.mark.parametrize("kind, done", [("Job", "Complete"), ("PyTorchJob", "Succeeded"), ("TrainJob", "Complete")])
def test_succeeded_workload_and_matching_marker_exit_0(kube_server, tmp_path, kind, done):
    run = put_training_run(kube_server, kind, conditions=[condition("Running")] if kind == "PyTorchJob" else [])
    finisher = complete_after_watch_starts(kube_server, run, [condition(done)])
    lines, marker = [], Marker()
    assert wait(in_cluster(kube_server, tmp_path), run.ref, marker, lines) == WAIT_OK
    finisher.join()
    assert lines == [f"{run.ref} is running{' (Running)' if kind == 'PyTorchJob' else ''}; waiting",
                     f"{run.ref} succeeded; completion marker matches: run 3f2a at step 6"]
    assert marker.calls == 1
    assert [r.verb for r in kube_server.requests] == ["get", "watch"]


def test_through_a_kubeconfig_an_already_finished_workload_needs_one_read(kube_server, tmp_path):
    run = put_training_run(kube_server, "Job", namespace="ml", conditions=[condition("Complete")])
    env = {"KUBECONFIG": str(kube_server.write_kubeconfig(tmp_path / "config", namespace="ml"))}
    lines = []
    assert wait(env, run.ref, Marker(), lines) == WAIT_OK
    assert [(r.call, r.namespace) for r in kube_server.requests] == [(("batch", "jobs", "get"), "ml")]


def test_failed_workload_exits_2_at_once_with_its_reason(kube_server, tmp_path):
    message = "Container trainer for pod default/ddpm-train-0-x exited with 3, matching FailJob rule at index 0"
    run = put_training_run(kube_server, "Job", conditions=[condition("FailureTarget", "PodFailurePolicy", message)])
    lines, marker = [], Marker(never=True)
    start = time.monotonic()
    assert wait(in_cluster(kube_server, tmp_path), run.ref, marker, lines, timeout_seconds=60) == WAIT_FAILED
    assert time.monotonic() - start < 5
    assert lines == [f"Job/ddpm-train failed: PodFailurePolicy: {message}"]
    assert marker.calls == 0


def test_failure_while_watching_exits_2(kube_server, tmp_path):
    run = put_training_run(kube_server, "PyTorchJob", conditions=[condition("Running")])
    message = "PyTorchJob ddpm-train is failed because 1 Master replica(s) failed."
    finisher = complete_after_watch_starts(kube_server, run, [condition("Running", status="False"),
                                                              condition("Failed", "PyTorchJobFailed", message)])
    lines = []
    assert wait(in_cluster(kube_server, tmp_path), run.ref, Marker(), lines) == WAIT_FAILED
    finisher.join()
    assert lines[-1] == f"PyTorchJob/ddpm-train failed: PyTorchJobFailed: {message}"


def test_suspended_then_deadline_exits_1(kube_server, tmp_path):
    run = put_training_run(kube_server, "Job", conditions=[condition("Suspended", "JobSuspended", "Job suspended")])
    lines = []
    assert wait(in_cluster(kube_server, tmp_path), run.ref, Marker(), lines, timeout_seconds=0.5) == WAIT_TIMEOUT
    assert lines == ["Job/ddpm-train is suspended (JobSuspended: Job suspended); waiting",
                     "timed out after 0.5s waiting for Job/ddpm-train: it is suspended (JobSuspended: Job suspended)"]


def test_succeeded_but_marker_behind_polls_the_marker(kube_server, tmp_path):
    run = put_training_run(kube_server, "Job", conditions=[condition("Complete")])
    lines, marker = [], Marker(misses=3)
    assert wait(in_cluster(kube_server, tmp_path), run.ref, marker, lines) == WAIT_OK
    assert marker.calls == 4
    assert lines == ["Job/ddpm-train succeeded but the completion marker does not match yet: no "
                     "training_complete.json in /data/runs/ddpm",
                     "waiting for the completion marker: no training_complete.json in /data/runs/ddpm",
                     "completion marker matches: run 3f2a at step 6"]


def test_a_workload_already_cleaned_up_is_judged_by_the_marker(kube_server, tmp_path):
    lines = []
    assert wait(in_cluster(kube_server, tmp_path), "Job/ddpm-train", Marker(), lines) == WAIT_OK
    assert lines == ["Job/ddpm-train not found, but the completion marker matches: run 3f2a at step 6"]


@pytest.mark.parametrize("marker, expected", [(Marker(misses=3), WAIT_OK), (Marker(never=True), WAIT_TIMEOUT)])
def test_without_rights_falls_back_to_polling_the_marker(kube_server, tmp_path, marker, expected):
    run = put_training_run(kube_server, "Job")
    kube_server.deny(("batch", "jobs", "get"), ("batch", "jobs", "watch"))
    lines = []
    assert wait(in_cluster(kube_server, tmp_path), run.ref, marker, lines, timeout_seconds=0.3) == expected
    assert lines[0].startswith("cannot read Job/ddpm-train through the Kubernetes API (403 jobs.batch")
    assert lines[0].endswith("polling the completion marker every 0.01s instead")
    assert lines[1] == "waiting for the completion marker: no training_complete.json in /data/runs/ddpm"
    assert lines[2] == ("completion marker matches: run 3f2a at step 6" if expected == WAIT_OK else
                        "timed out after 0.3s waiting for Job/ddpm-train: no training_complete.json in /data/runs/ddpm")
    assert len(lines) == 3 and len(kube_server.requests) == 1


def test_without_any_api_access_falls_back_to_polling_the_marker(tmp_path):
    lines = []
    assert wait({"HOME": str(tmp_path)}, "TrainJob/ddpm-train", Marker(misses=1), lines) == WAIT_OK
    assert lines[0] == (f"no Kubernetes API access (no kubeconfig at {tmp_path}/.kube/config (set KUBECONFIG)); "
                        "polling the completion marker every 0.01s instead")


def test_an_unreachable_api_falls_back_to_polling_the_marker(tmp_path):
    with KubeProxy() as fake:
        env = in_cluster(fake, tmp_path) | {"KUBERNETES_SERVICE_PORT": str(closed_port())}
    lines = []
    assert wait(env, "Job/ddpm-train", Marker(), lines) == WAIT_OK
    assert lines[0].startswith("cannot read Job/ddpm-train through the Kubernetes API (")


def test_a_malformed_workload_is_refused():
    with pytest.raises(ValueError, match="not <Kind>/<name>"):
        wait({}, "ddpm-train", Marker(), [])
    with pytest.raises(ValueError, match="kind 'Deployment' is not one of Job, PyTorchJob, JobSet, TrainJob"):
        wait({}, "Deployment/ddpm-train", Marker(), [])


def test_an_unusable_token_falls_back_to_polling_the_marker(kube_server, tmp_path, monkeypatch, capsys):
    sa = kube_server.write_service_account(tmp_path / "sa")
    (sa / "token").write_bytes(b"\xff\xfe\x00\x01binary")
    lines, marker = [], Marker(misses=1)
    assert wait(in_cluster(kube_server, tmp_path / "x") | {"K8S_SERVICE_ACCOUNT_DIR": str(sa)}, "Job/ddpm-train",
                marker, lines) == WAIT_OK
    assert lines[0].startswith("no Kubernetes API access (in-cluster config from ") and "polling" in lines[0]
    assert lines[-1] == "completion marker matches: run 3f2a at step 6" and kube_server.requests == []

    from trainer.cli import main  # the push Job's command: no marker yet, so it waits until its deadline

    for key, value in kube_server.in_cluster_env(sa).items():
        monkeypatch.setenv(key, value)
    assert main(["wait-for-training", "--workload", "Job/ddpm-train", "--output_dir", str(tmp_path / "run"),
                 "--poll-seconds", "0.05", "--timeout-seconds", "0.2"]) == exit_code(WAIT_TIMEOUT) == EXIT_FAILED
    out, err = capsys.readouterr()
    assert "polling the completion marker every 0.05s instead" in out and "timed out after 0.2s" in out
    assert "Traceback" not in out + err
