"""trainer/status.py (`ddpm status`) through a kubeconfig, against objects on a real API server (tests/kube_proxy.py). The Events
it reads are the ones trainer.events posts in the cluster, so the two are tested together."""

from __future__ import annotations

import io

import pytest

from kube_proxy import condition, kube_server, pod_env, put_training_run  # noqa: F401 (fixture)
from trainer.errors import EXIT_FAILED, exit_code
from trainer.events import MilestoneEvents
from trainer.status import STATUS_FAILED, STATUS_OK, STATUS_UNKNOWN, status

CKPT = "/data/runs/ddpm/checkpoints/checkpoint-{}"


def ddpm_status(fake, tmp_path, release: str = "ddpm", namespace: str | None = None, **env) -> tuple[int, list[str]]:
    kubeconfig = fake.write_kubeconfig(tmp_path / "kubeconfig", namespace="default")
    out = io.StringIO()
    code = status(release, namespace, environ={"KUBECONFIG": str(kubeconfig)} | env, out=out)
    return code, out.getvalue().splitlines()


def post(fake, tmp_path, run, rank_pod: int = 0, **calls) -> None:
    """Rank 0 posts in the cluster (service account), as the training loop does."""
    events = MilestoneEvents(pod_env(fake, fake.write_service_account(tmp_path / "sa"), run, rank=rank_pod),
                       checkpoint_interval_s=0)
    for method, args in calls.items():
        for one in args:
            getattr(events, method)(*one)
    assert events.close(timeout_s=10)


def as_of(fake, reason: str) -> str:
    return [e for e in fake.events() if e["reason"] == reason and e["involvedObject"]["kind"] != "Pod"][-1][
        "lastTimestamp"]


def test_a_running_job_with_a_restarted_pod_and_a_preemption(kube_server, tmp_path):
    run = put_training_run(kube_server, "Job", restarts={1: 2})
    # The first rank-0 process: started, a checkpoint, preempted; its replacement resumed, checkpointed, evaluated.
    post(kube_server, tmp_path, run, started=[(8, 2, 0, 6, None)], checkpoint=[(2, 6, CKPT.format(2), 0.52, 40.0)],
         preempted=[(3, CKPT.format(3))])
    post(kube_server, tmp_path, run, started=[(8, 2, 3, 6, CKPT.format(3))],
         checkpoint=[(4, 6, CKPT.format(4), 0.41, 20.4)], evaluated=[(4, {"swd_mean": 512.25, "color_w1": 7.5})])
    code, lines = ddpm_status(kube_server, tmp_path)
    pod0, pod1 = (p["metadata"]["name"] for p in run.pods)
    width = len(pod0)
    assert code == STATUS_OK
    assert lines == [
        "release ddpm in namespace default",
        "workload    Job/ddpm-train: running",
        "pods",
        f"  rank  {'pod'.ljust(width)}  phase    restarts  node",
        f"  0     {pod0}  Running  0         node-0",
        f"  1     {pod1}  Running  2         node-1",
        f"progress    step 4/6 (66%), loss 0.41, eta 0:00:20 (as of {as_of(kube_server, 'CheckpointSaved')})",
        f"resumed     from {CKPT.format(3)}",
        f"checkpoint  {CKPT.format(4)}",
        "evaluation  step 4: color_w1 7.5, swd_mean 512.2",
        "preemptions 1",
        "next",
        f"  kubectl -n default logs -f --tail=-1 {pod0} -c trainer",
        "  kubectl -n default port-forward svc/ddpm-tensorboard 6006:6006   # then http://localhost:6006",
        "  kubectl -n default describe job ddpm-train",
    ]
    assert kube_server.calls() >= {("batch", "jobs", "list"), ("", "pods", "list"), ("", "events", "list")}


def test_a_failed_run_exits_2_with_the_reason_and_the_trainers_error(kube_server, tmp_path):
    message = "Container trainer for pod default/ddpm-train-0-x exited with 3, matching FailJob rule at index 0"
    run = put_training_run(kube_server, "Job", release="exp1", nodes=1, phases={0: "Failed"},
                           conditions=[condition("Failed", "PodFailurePolicy", message)])
    post(kube_server, tmp_path, run, started=[(4, 1, 0, 6, None)], diverged=[(5, "5 consecutive non-finite losses")])
    code, lines = ddpm_status(kube_server, tmp_path, release="exp1")
    assert code == STATUS_FAILED
    assert lines[1] == f"workload    Job/exp1-ddpm-train: failed (PodFailurePolicy: {message})"
    assert f"  0     {run.pods[0]['metadata']['name']}  Failed  0         node-0" in lines
    assert "progress    step 0/6 (0%)" in lines[5]  # the last step an event gave: the start
    assert "error       Diverged: 5 consecutive non-finite losses" in lines
    assert "  kubectl -n default port-forward svc/exp1-ddpm-tensorboard 6006:6006   # then http://localhost:6006" \
        in lines


def test_non_finite_samples_show_as_a_warning_and_as_the_error_when_they_stopped_the_run(kube_server, tmp_path):
    run = put_training_run(kube_server, "Job", nodes=1)
    nan = "4 of 4 images sampled with ddim 10 steps eta 1, UNet bf16 hold NaN/inf values"
    post(kube_server, tmp_path, run, started=[(4, 1, 0, 6, None)], nonfinite_samples=[(2, nan), (4, nan)])
    code, lines = ddpm_status(kube_server, tmp_path)
    assert code == STATUS_OK and f"warning     NonFiniteSamples at step 4: {nan}" in lines
    assert not [line for line in lines if line.startswith("error")]
    post(kube_server, tmp_path, run, nonfinite_samples=[(6, "2 of 2 images sampled with ddpm 10 steps", True)])
    _, lines = ddpm_status(kube_server, tmp_path)
    assert "error       NonFiniteSamples: 2 of 2 images sampled with ddpm 10 steps" in lines


def test_a_stalled_run_shows_the_stall_as_the_error(kube_server, tmp_path):
    run = put_training_run(kube_server, "Job", nodes=1)
    stall = "no progress for 3600 s during an evaluation (last progress: a sampler step of an evaluation, ...)"
    post(kube_server, tmp_path, run, started=[(4, 1, 0, 6, None)], stalled=[(3, stall)])
    code, lines = ddpm_status(kube_server, tmp_path)
    assert code == STATUS_OK and f"error       Stalled: {stall}" in lines
    [event] = [e for e in kube_server.events() if e["reason"] == "Stalled" and e["involvedObject"]["kind"] == "Job"]
    assert event["type"] == "Warning" and event["message"] == f"training stalled at step 3: {stall}"


def test_a_completed_pytorchjob_ranks_master_then_workers(kube_server, tmp_path):
    run = put_training_run(kube_server, "PyTorchJob", nodes=3, conditions=[condition("Succeeded")],
                           phases={0: "Succeeded", 1: "Succeeded", 2: "Succeeded"})
    post(kube_server, tmp_path, run, started=[(12, 3, 0, 6, None)], checkpoint=[(6, 6, CKPT.format(6), 0.3, 0.0)],
         completed=[(6, "/data/runs/ddpm")])
    code, lines = ddpm_status(kube_server, tmp_path, namespace="default")
    assert code == STATUS_OK
    assert lines[1] == "workload    PyTorchJob/ddpm-train: succeeded (Succeeded)"
    assert [line.split()[:2] for line in lines[4:7]] == [
        ["0", "ddpm-train-master-0"], ["1", "ddpm-train-worker-0"], ["2", "ddpm-train-worker-1"]]
    assert lines[7].startswith("progress    step 6/6 (100%), loss 0.3 (as of ")  # no ETA once completed
    assert "completed   model in /data/runs/ddpm" in lines
    assert "  kubectl -n default logs -f --tail=-1 ddpm-train-master-0 -c pytorch" in lines


def test_a_worker_only_pytorchjob_ranks_worker_i_as_node_rank_i(kube_server, tmp_path):
    """The chart's PyTorchJob has Workers only (an elasticPolicy; a Master would add an init container that
    "restricted" rejects): worker-0 hosts the rendezvous and is node rank 0, not 1."""
    run = put_training_run(kube_server, "PyTorchJob", nodes=3, master=False)
    code, lines = ddpm_status(kube_server, tmp_path)
    assert code == STATUS_OK
    assert [line.split()[:2] for line in lines[4:7]] == [
        ["0", "ddpm-train-worker-0"], ["1", "ddpm-train-worker-1"], ["2", "ddpm-train-worker-2"]]
    assert run.pods[0]["metadata"]["name"] == "ddpm-train-worker-0"
    assert "  kubectl -n default logs -f --tail=-1 ddpm-train-worker-0 -c pytorch" in lines


def test_a_trainjob_is_found_when_the_pytorchjob_crd_is_missing_and_jobs_may_not_be_listed(kube_server, tmp_path):
    kube_server.uninstalled.add(("kubeflow.org", "pytorchjobs"))
    kube_server.deny(("batch", "jobs", "list"))
    put_training_run(kube_server, "TrainJob")
    code, lines = ddpm_status(kube_server, tmp_path)
    assert code == STATUS_OK
    assert lines[1] == "workload    TrainJob/ddpm-train: running"
    assert [line.split()[0] for line in lines[4:6]] == ["0", "1"]
    assert lines[6] == ("progress    no events from the trainer (not started yet, events off, or older than the "
                        "event TTL)")


def test_a_jobset_release_is_found_and_its_pods_ranked(kube_server, tmp_path):
    put_training_run(kube_server, "JobSet")
    code, lines = ddpm_status(kube_server, tmp_path, release="ddpm")
    assert code == STATUS_OK and "workload    JobSet/ddpm-train: running" in lines, lines
    rows = [line.split()[:2] for line in lines if line.strip()[:1].isdigit() and "ddpm-train-node-0-" in line]
    assert [rank for rank, _ in rows] == ["0", "1"] and rows[0][1].startswith("ddpm-train-node-0-0-")


def test_not_found_no_access_and_no_kubeconfig_exit_1(kube_server, tmp_path):
    put_training_run(kube_server, "Job", release="other")
    code, lines = ddpm_status(kube_server, tmp_path, release="ddpm")
    assert code == STATUS_UNKNOWN and lines == [
        "error: no training workload of release 'ddpm' in namespace 'default' (no Job, PyTorchJob, TrainJob, "
        "JobSet labelled app.kubernetes.io/instance=ddpm,app.kubernetes.io/component=train)"]

    kube_server.deny(("batch", "jobs", "list"))
    code, lines = ddpm_status(kube_server, tmp_path, release="other")
    assert code == STATUS_UNKNOWN and len(lines) == 1
    assert lines[0].startswith(f"error: cannot read release 'other' through kubeconfig {tmp_path}/kubeconfig: 403 ")

    out = io.StringIO()
    assert status("ddpm", None, environ={"HOME": str(tmp_path)}, out=out) == STATUS_UNKNOWN
    assert out.getvalue() == f"error: no Kubernetes access: no kubeconfig at {tmp_path}/.kube/config (set KUBECONFIG)\n"


@pytest.mark.parametrize("context, namespace", [(None, "default"), ("other", "ml")])
def test_the_kubeconfig_context_and_its_namespace_are_honoured(kube_server, tmp_path, context, namespace):
    put_training_run(kube_server, "Job", namespace="ml")
    kubeconfig = tmp_path / "kubeconfig"
    kube_server.write_kubeconfig(kubeconfig, namespace="default")
    text = kubeconfig.read_text().replace("contexts:\n", "contexts:\n- name: other\n  context: {cluster: test, "
                                                         "user: test, namespace: ml}\n")
    kubeconfig.write_text(text)
    out = io.StringIO()
    code = status("ddpm", None, environ={"KUBECONFIG": str(kubeconfig)}, out=out, context=context)
    first = out.getvalue().splitlines()[0]
    if context:  # the chosen context's namespace holds the run
        assert (code, first) == (STATUS_OK, "release ddpm in namespace ml")
    else:  # the current context's namespace does not
        assert code == STATUS_UNKNOWN and "in namespace 'default'" in first
    assert {r.namespace for r in kube_server.requests} == {namespace}


def test_a_binary_token_file_is_exit_1_without_a_traceback(kube_server, tmp_path, monkeypatch, capsys):
    from trainer.cli import main

    sa = kube_server.write_service_account(tmp_path / "sa")
    (sa / "token").write_bytes(b"\xff\xfe\x00\x01binary")
    for key, value in kube_server.in_cluster_env(sa).items():
        monkeypatch.setenv(key, value)
    assert main(["status"]) == exit_code(STATUS_UNKNOWN) == EXIT_FAILED
    out, err = capsys.readouterr()
    assert out.startswith("error: no Kubernetes access: in-cluster config from ") and "token" in out
    assert "Traceback" not in out + err
