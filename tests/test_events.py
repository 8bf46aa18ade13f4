"""trainer/events.py against a real API server (tests/kube_proxy.py: kube-apiserver, with the faults a test asks for),
reached as a pod reaches it: the in-cluster variables and a service-account folder (token, ca.crt, namespace) at
K8S_SERVICE_ACCOUNT_DIR.

The MilestoneEvents methods are called as the training loop calls them; the requests the code made and the Events the
server then holds are the assertion."""

from __future__ import annotations

import json
import logging
import time

import kubernetes_validate
import pytest

from kube_proxy import TOKEN, KubeProxy, closed_port, kube_server, pod_env, put_training_run  # noqa: F401 (fixture)
from trainer import events as ev
from trainer.errors import EXIT_DIVERGED
from trainer.events import MilestoneEvents

A = ev.ANNOTATION_PREFIX
CKPT = "/data/runs/ddpm/checkpoints/checkpoint-{}"


class Clock:
    """A monotonic clock the test moves, for the checkpoint rate limit."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def warnings_from(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "trainer.events" and r.levelno >= logging.WARNING]


def posted(fake: KubeProxy) -> list[tuple[str, str, str]]:
    """(verb, involved kind, reason) of every Event write, in the order the server received them."""
    out, by_name = [], {e["metadata"]["name"]: e for e in fake.events()}
    for r in fake.requests:
        if r.resource == "events" and r.verb in ("create", "patch"):
            event = r.body if r.verb == "create" else by_name[r.name]
            out.append((r.verb, event["involvedObject"]["kind"], event["reason"]))
    return out


def short_run(events: MilestoneEvents, clock: Clock) -> None:
    """What the loop does in a 6-step run with a checkpoint every 2 steps and an evaluation at step 4."""
    events.started(global_batch=8, processes=2, step=0, total_steps=6, resumed_from=None)
    events.checkpoint(2, 6, CKPT.format(2), loss=0.52, eta_seconds=40)  # posted
    clock.now += 10
    events.checkpoint(4, 6, CKPT.format(4), loss=0.41, eta_seconds=20)  # within 60 s: held back
    events.evaluated(4, {"swd_mean": 512.25, "color_w1": 7.5})
    clock.now += 5
    events.checkpoint(6, 6, CKPT.format(6), loss=0.33, eta_seconds=0)  # replaces step 4, still held back
    events.completed(6, "/data/runs/ddpm")  # posts the held-back checkpoint first


def test_short_run_posts_each_milestone_on_the_pod_and_the_job_in_order(kube_server, tmp_path):
    run = put_training_run(kube_server, "Job")
    clock = Clock()
    events = MilestoneEvents(pod_env(kube_server, kube_server.write_service_account(tmp_path / "sa"), run),
                       checkpoint_interval_s=60, clock=clock)
    short_run(events, clock)
    assert events.close(timeout_s=10)

    steps = [("create", "Pod", "RunStarted"), ("create", "Job", "RunStarted"),
             ("create", "Pod", "CheckpointSaved"), ("create", "Job", "CheckpointSaved"),
             ("create", "Pod", "EvaluationDone"), ("create", "Job", "EvaluationDone"),
             ("patch", "Pod", "CheckpointSaved"), ("patch", "Job", "CheckpointSaved"),  # the same Event, count 2
             ("create", "Pod", "Completed"), ("create", "Job", "Completed")]
    assert posted(kube_server) == steps
    assert kube_server.calls() == {("", "pods", "get"), ("", "events", "create"), ("", "events", "patch")}
    assert all(r.token == TOKEN for r in kube_server.requests)  # the mounted token, over TLS with the mounted CA

    pod_meta, job_meta = run.pods[0]["metadata"], run.workload["metadata"]
    held = kube_server.events()
    assert {e["involvedObject"]["uid"] for e in held} == {pod_meta["uid"], job_meta["uid"]}
    for event in held:
        assert event["metadata"]["namespace"] == "default" == event["involvedObject"]["namespace"]
        assert event["source"] == {"component": "ddpm-trainer"} and event["reportingInstance"] == pod_meta["name"]
    on_job = {e["reason"]: e for e in held if e["involvedObject"]["kind"] == "Job"}
    assert on_job["RunStarted"]["involvedObject"] == {
        "apiVersion": "batch/v1", "kind": "Job", "name": job_meta["name"], "namespace": "default",
        "uid": job_meta["uid"]}
    assert on_job["RunStarted"]["message"] == "training started at step 0/6: global batch 8 (2 processes)"
    assert on_job["RunStarted"]["metadata"]["annotations"] == {
        A + "step": "0", A + "total-steps": "6", A + "global-batch": "8", A + "processes": "2", A + "resumed-from": ""}
    checkpoint = on_job["CheckpointSaved"]
    assert checkpoint["count"] == 2 and checkpoint["type"] == "Normal"
    assert checkpoint["metadata"]["annotations"] == {
        A + "step": "6", A + "total-steps": "6", A + "checkpoint": CKPT.format(6), A + "loss": "0.33",
        A + "eta-seconds": "0"}
    assert checkpoint["message"] == f"checkpoint saved at step 6/6: {CKPT.format(6)}, loss 0.33, eta 0:00:00"
    assert json.loads(on_job["EvaluationDone"]["metadata"]["annotations"][A + "scores"]) == {
        "swd_mean": 512.25, "color_w1": 7.5}
    assert on_job["Completed"]["metadata"]["annotations"] == {A + "step": "6", A + "output-dir": "/data/runs/ddpm"}
    assert TOKEN not in json.dumps(held)


@pytest.mark.parametrize("version", ["1.31.0", "1.37.0"])  # the chart's oldest Kubernetes, and the newest schema
def test_posted_events_and_patches_are_valid_core_v1_events(kube_server, tmp_path, version):
    run = put_training_run(kube_server, "Job", nodes=1)
    clock = Clock()
    events = MilestoneEvents(pod_env(kube_server, kube_server.write_service_account(tmp_path / "sa"), run), clock=clock)
    short_run(events, clock)
    events.preempted(6, CKPT.format(6))
    events.failed("x" * 5000)
    assert events.close(timeout_s=10)
    writes = [r for r in kube_server.requests if r.resource == "events"]
    assert {r.content_type for r in writes if r.verb == "patch"} == {"application/strategic-merge-patch+json"}
    for request in writes:
        if request.verb == "create":
            kubernetes_validate.validate(request.body, version, strict=True)
            assert len(request.body["message"]) <= ev.MAX_MESSAGE
    for event in kube_server.events():  # what the patches made of them
        kubernetes_validate.validate(event, version, strict=True)


def test_rate_limit_posts_the_newest_checkpoint_after_the_interval(kube_server, tmp_path):
    run = put_training_run(kube_server, "Job", nodes=1)
    clock = Clock()
    events = MilestoneEvents(pod_env(kube_server, kube_server.write_service_account(tmp_path / "sa"), run),
                       checkpoint_interval_s=30, clock=clock)
    for step in range(1, 11):  # a checkpoint every 5 s for 50 s
        events.checkpoint(step, 10, CKPT.format(step))
        clock.now += 5
    assert events.close(timeout_s=10)
    [on_pod] = [e for e in kube_server.events() if e["involvedObject"]["kind"] == "Pod"]
    # posted at t=0 (step 1) and t=30 (step 7); step 10 held back, then posted by close()
    assert on_pod["count"] == 3 and on_pod["metadata"]["annotations"][A + "step"] == "10"
    assert [r.verb for r in kube_server.requests if r.resource == "events"] == ["create", "create"] + ["patch"] * 4


def test_resumed_preempted_diverged_and_failed_are_warnings_with_their_details(kube_server, tmp_path):
    run = put_training_run(kube_server, "Job", nodes=1)
    events = MilestoneEvents(pod_env(kube_server, kube_server.write_service_account(tmp_path / "sa"), run))
    events.started(global_batch=16, processes=1, step=4, total_steps=6, resumed_from=CKPT.format(4))
    events.preempted(5, CKPT.format(5))
    events.diverged(6, "5 consecutive non-finite losses\nTraceback ...")
    events.failed("RuntimeError: CUDA out of memory\n  at line 3")
    assert events.close(timeout_s=10)
    on_pod = {e["reason"]: e for e in kube_server.events() if e["involvedObject"]["kind"] == "Pod"}
    assert on_pod["RunStarted"]["message"] == (
        f"training resumed from {CKPT.format(4)} at step 4/6: global batch 16 (1 process)")
    assert on_pod["RunStarted"]["metadata"]["annotations"][A + "resumed-from"] == CKPT.format(4)
    assert {r: e["type"] for r, e in on_pod.items()} == {
        "RunStarted": "Normal", "Preempted": "Warning", "Diverged": "Warning", "Failed": "Warning"}
    assert on_pod["Preempted"]["metadata"]["annotations"] == {A + "step": "5", A + "checkpoint": CKPT.format(5)}
    assert on_pod["Diverged"]["message"] == "training diverged at step 6: 5 consecutive non-finite losses"
    assert on_pod["Failed"]["message"] == "training failed: RuntimeError: CUDA out of memory"
    assert on_pod["Failed"]["metadata"]["annotations"] == {A + "error": "RuntimeError: CUDA out of memory"}


NAN = "8 of 8 images sampled with ddim 2 steps eta 1, UNet bf16 hold NaN/inf values; none was saved or scored"


def test_nonfinite_samples_are_warnings_one_per_run_of_evaluations_and_one_when_the_run_is_refused(kube_server,
                                                                                                   tmp_path):
    run = put_training_run(kube_server, "Job", nodes=1)
    events = MilestoneEvents(pod_env(kube_server, kube_server.write_service_account(tmp_path / "sa"), run))
    events.nonfinite_samples(4, NAN + ". Causes: ...\nmore")
    events.nonfinite_samples(6, NAN)  # the same Event, count 2
    events.nonfinite_samples(6, "2 of 2 images sampled with ddpm 2 steps, UNet fp32 hold NaN/inf values", True)
    assert events.close(timeout_s=10)
    assert [(verb, reason) for verb, kind, reason in posted(kube_server) if kind == "Pod"] == [
        ("create", "NonFiniteSamples"), ("patch", "NonFiniteSamples"), ("create", "NonFiniteSamples")]
    evaluation, final = [e for e in kube_server.events() if e["involvedObject"]["kind"] == "Pod"]
    assert (evaluation["type"], evaluation["count"]) == ("Warning", 2)
    assert evaluation["message"] == f"evaluation at step 6: {NAN}"
    assert evaluation["metadata"]["annotations"] == {A + "step": "6", A + "error": NAN}
    assert final["type"] == "Warning" and final["message"] == (
        "the saved pipeline's check at step 6: 2 of 2 images sampled with ddpm 2 steps, UNet fp32 hold NaN/inf values")
    assert final["metadata"]["annotations"][A + "final"] == "true"
    assert "NonFiniteSamples" in ev.REASONS


@pytest.mark.parametrize("kind, workload_env", [("TrainJob", True), ("TrainJob", False), ("PyTorchJob", True)])
def test_events_go_to_the_owning_workload_through_the_owner_chain(kube_server, tmp_path, kind, workload_env):
    run = put_training_run(kube_server, kind)
    env = pod_env(kube_server, kube_server.write_service_account(tmp_path / "sa"), run, workload_env=workload_env)
    events = MilestoneEvents(env)
    events.started(global_batch=8, processes=2, step=0, total_steps=6, resumed_from=None)
    assert events.close(timeout_s=10)
    involved = [e["involvedObject"] for e in kube_server.events()]
    top = run.workload["metadata"]
    assert [(o["kind"], o["uid"]) for o in involved] == [("Pod", run.pods[0]["metadata"]["uid"]), (kind, top["uid"])]
    assert involved[1]["apiVersion"] == run.workload["apiVersion"]
    reads = [(r.resource, r.name) for r in kube_server.requests if r.verb == "get"]
    if kind == "TrainJob":  # pod -> Job -> JobSet -> TrainJob: the two in between are read, the TrainJob is not
        assert reads == [("pods", run.pods[0]["metadata"]["name"]), ("jobs", f"{top['name']}-node-0"),
                         ("jobsets", top["name"])]
    else:  # the PyTorchJob's operator owns the pod directly
        assert reads == [("pods", run.pods[0]["metadata"]["name"])]


def test_a_wrong_training_workload_still_posts_on_the_pod(kube_server, tmp_path, caplog):
    run = put_training_run(kube_server, "Job", nodes=1)
    env = pod_env(kube_server, kube_server.write_service_account(tmp_path / "sa"), run) | {
        "TRAINING_WORKLOAD": "PyTorchJob/someone-else"}
    events = MilestoneEvents(env)
    events.completed(6, "/data/runs/ddpm")
    assert events.close(timeout_s=10)
    assert [e["involvedObject"]["kind"] for e in kube_server.events()] == ["Pod"]
    assert warnings_from(caplog) == [
        "Kubernetes events on the pod only: TRAINING_WORKLOAD=PyTorchJob/someone-else does not own pod "
        f"{run.pods[0]['metadata']['name']} (its owners: Job/ddpm-train)"]


def test_outside_a_pod_nothing_is_posted_and_one_info_line_says_so(kube_server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="trainer.events")
    env = kube_server.in_cluster_env(kube_server.write_service_account(tmp_path / "sa"))  # no POD_NAME: not a pod
    events = MilestoneEvents(env)
    short_run(events, Clock())
    assert events.close(timeout_s=1)
    assert kube_server.requests == []
    assert [r.getMessage() for r in caplog.records if r.name == "trainer.events"] == [
        "Kubernetes events: not in a pod (POD_NAME/POD_NAMESPACE unset), none posted"]
    silent = MilestoneEvents.off()  # other ranks
    silent.started(global_batch=8, processes=2, step=0, total_steps=6, resumed_from=None)
    assert silent.close() and len(caplog.records) == 1


@pytest.mark.parametrize("deny, expected_requests", [
    ("all", [("", "pods", "get")]),  # the Role is missing altogether
    ("events", [("", "pods", "get"), ("", "events", "create")]),  # pods readable, events not
])
def test_refused_turns_events_off_with_one_warning_and_no_further_requests(kube_server, tmp_path, caplog, deny,
                                                                            expected_requests):
    run = put_training_run(kube_server, "Job", nodes=1)
    if deny == "all":
        kube_server.deny_all = True
    else:
        kube_server.deny(("", "events", "create"))
    events = MilestoneEvents(pod_env(kube_server, kube_server.write_service_account(tmp_path / "sa"), run))
    short_run(events, Clock())
    assert events.close(timeout_s=10)
    assert [r.call for r in kube_server.requests] == expected_requests
    [warning] = warnings_from(caplog)
    assert warning.startswith("Kubernetes events off: 403 ") and "forbidden" in warning
    assert kube_server.events() == []


def test_no_service_account_token_turns_events_off_with_one_warning(kube_server, tmp_path, caplog):
    run = put_training_run(kube_server, "Job", nodes=1)
    sa = kube_server.write_service_account(tmp_path / "sa")
    (sa / "token").unlink()  # automountServiceAccountToken: false
    events = MilestoneEvents(pod_env(kube_server, sa, run))
    short_run(events, Clock())
    assert events.close(timeout_s=10)
    assert kube_server.requests == []
    [warning] = warnings_from(caplog)
    assert warning.startswith("Kubernetes events off: in-cluster config from ") and "token" in warning


def test_absent_api_server_turns_events_off_with_one_warning(kube_server, tmp_path, caplog):
    run = put_training_run(kube_server, "Job", nodes=1)
    env = pod_env(kube_server, kube_server.write_service_account(tmp_path / "sa"), run)
    env["KUBERNETES_SERVICE_PORT"] = str(closed_port())
    events = MilestoneEvents(env)
    short_run(events, Clock())
    assert events.close(timeout_s=10)
    [warning] = warnings_from(caplog)
    assert warning.startswith("Kubernetes events off: ") and "refused" in warning.lower()


def test_a_timed_out_call_turns_events_off_with_one_warning(api_server, tmp_path, caplog):
    with KubeProxy(api_server, hang=True) as fake:
        run = put_training_run(fake, "Job", nodes=1)
        events = MilestoneEvents(pod_env(fake, fake.write_service_account(tmp_path / "sa"), run),
                           request_timeout=(1.0, 0.2))
        short_run(events, Clock())
        assert events.close(timeout_s=10)  # the read timeout (0.2 s) ends the only call; the rest is drained
        assert len(fake.requests) == 1
    [warning] = warnings_from(caplog)
    assert warning.startswith("Kubernetes events off: ") and "timed out" in warning


def test_a_hanging_api_server_never_blocks_the_caller(api_server, tmp_path, caplog):
    with KubeProxy(api_server, hang=True) as fake:
        run = put_training_run(fake, "Job", nodes=1)
        # the default timeouts: the events thread stays stuck in its first call for the whole test
        events = MilestoneEvents(pod_env(fake, fake.write_service_account(tmp_path / "sa"), run), queue_size=64)
        start = time.monotonic()
        for step in range(1000):
            events.evaluated(step, {"swd_mean": 1.0})
        posting = time.monotonic() - start
        start = time.monotonic()
        flushed = events.close(timeout_s=0.5)
        closing = time.monotonic() - start
        assert posting < 0.5, f"1,000 posts took {posting:.3f}s"
        assert not flushed and 0.4 < closing < 1.0, f"close(0.5) took {closing:.3f}s"
        assert events.dropped == 1000 - 64
    events._thread.join(timeout=10)  # the stopped server closed the hung connection: the thread gives up
    assert not events._thread.is_alive()
    assert len(warnings_from(caplog)) == 1


def test_numpy_scores_and_tensor_losses_become_plain_numbers(kube_server, tmp_path):
    import numpy as np
    import torch

    run = put_training_run(kube_server, "Job", nodes=1)
    events = MilestoneEvents(pod_env(kube_server, kube_server.write_service_account(tmp_path / "sa"), run))
    events.evaluated(4, {"swd_mean": np.float32(512.25)})
    events.checkpoint(4, 6, CKPT.format(4), loss=torch.tensor(0.5))
    assert events.close(timeout_s=10)
    notes = [e["metadata"]["annotations"] for e in kube_server.events() if e["involvedObject"]["kind"] == "Pod"]
    assert notes[0][A + "scores"] == '{"swd_mean": 512.25}' and notes[1][A + "loss"] == "0.5"


# ---- a real `ddpm train` as a pod runs it ---------------------------------------------------------------------------

def train_in_pod(tmp_path, env: dict, *extra, faults: tuple = ()) -> "subprocess.CompletedProcess":
    """`ddpm train` as the pod runs it; `faults` are tests/fault_driver.py's options (then it runs through it)."""
    import subprocess
    import sys

    from conftest import REPO, TINY, clean_env

    args = [*TINY, "--output_dir", tmp_path / "out", "--max_train_steps", "4", "--checkpointing_steps", "2",
            "--save_image_epochs", "1", "--eval_quality_images", "4", "--logging_steps", "2",
            "--builtin_num_images", "8", *extra]
    entry = ["tests/fault_driver.py", *faults] if faults else ["-m", "trainer"]
    return subprocess.run([sys.executable, *entry, "train", *map(str, args)], cwd=REPO,
                          env=clean_env(**env), capture_output=True, text=True)


@pytest.mark.slow
def test_a_training_run_posts_its_milestones_and_is_unaffected_when_the_api_is_not(kube_server, tmp_path):
    run = put_training_run(kube_server, "Job", nodes=1)
    env = pod_env(kube_server, kube_server.write_service_account(tmp_path / "sa"), run)
    proc = train_in_pod(tmp_path / "ok", env)
    assert proc.returncode == 0, proc.stderr
    reasons = [reason for verb, kind, reason in posted(kube_server) if kind == "Job" and verb == "create"]
    assert reasons[0] == "RunStarted" and reasons[-1] == "Completed", reasons
    assert {"CheckpointSaved", "EvaluationDone"} <= set(reasons)
    assert [r for _, kind, r in posted(kube_server) if kind == "Pod" and r == "RunStarted"], "on the pod too"
    started = next(e for e in kube_server.events() if e["reason"] == "RunStarted")
    assert started["metadata"]["annotations"][A + "global-batch"] == "4"

    # The same run against an API that refuses, then one that never answers: it trains the same, exits 0, warns once.
    reference = step_line(proc.stdout)
    kube_server.deny_all = True
    start = time.monotonic()
    refused = train_in_pod(tmp_path / "refused", env)
    refused_s = time.monotonic() - start
    assert refused.returncode == 0 and refused.stderr.count("Kubernetes events off") == 1, refused.stderr
    assert step_line(refused.stdout) == reference
    with KubeProxy(kube_server.upstream, hang=True) as hanging:
        run = put_training_run(hanging, "Job", nodes=1)
        env = pod_env(hanging, hanging.write_service_account(tmp_path / "sa2"), run)
        start = time.monotonic()
        stuck = train_in_pod(tmp_path / "hang", env)
        elapsed = time.monotonic() - start
    assert stuck.returncode == 0 and stuck.stderr.count("Kubernetes events off") == 1, stuck.stderr
    assert step_line(stuck.stdout) == reference
    # A hanging API costs at most the events' own timeouts at start and close, not a slower loop (the same run
    # against a refusing API, just before, is the yardstick: the machine's load affects both alike).
    assert elapsed < refused_s + 30, (elapsed, refused_s)


@pytest.mark.slow
def test_a_run_whose_samples_are_nan_posts_warnings_and_never_completed(kube_server, tmp_path):
    """Every evaluation's samples and the saved pipeline's are NaN: a Warning per evaluation (one Event, counted),
    the refusal at the end, exit 3, and never Completed."""
    run = put_training_run(kube_server, "Job", nodes=1)
    env = pod_env(kube_server, kube_server.write_service_account(tmp_path / "sa"), run)
    proc = train_in_pod(tmp_path, env, faults=("--nan-samples", "all"))
    assert proc.returncode == EXIT_DIVERGED, proc.stderr
    on_job = [(verb, reason) for verb, kind, reason in posted(kube_server) if kind == "Job"]
    assert ("create", "Completed") not in on_job and ("create", "EvaluationDone") not in on_job
    assert [p for p in on_job if p[1] == "NonFiniteSamples"] == [
        ("create", "NonFiniteSamples"), ("patch", "NonFiniteSamples"), ("create", "NonFiniteSamples")]
    warnings = {e["metadata"]["annotations"].get(A + "final"): e for e in kube_server.events()
                if e["reason"] == "NonFiniteSamples" and e["involvedObject"]["kind"] == "Job"}
    assert warnings[None]["message"].startswith("evaluation at step 4: 4 of 4 images sampled with ddim 2 steps")
    assert warnings["true"]["message"].startswith("the saved pipeline's check at step 4: 2 of 2 images sampled "
                                                  "with ddpm 2 steps, UNet fp32")


def step_line(stdout: str) -> str:
    """The last status line without its timing: loss and learning rate, which must not depend on the API."""
    return [line for line in stdout.splitlines() if line.startswith("step 4/4")][0].split(" img/s")[0]


def test_a_binary_token_file_turns_events_off_with_one_warning_and_no_traceback(kube_server, tmp_path, caplog,
                                                                                monkeypatch):
    import threading

    crashed = []
    monkeypatch.setattr(threading, "excepthook", crashed.append)  # what printed the traceback into the log
    run = put_training_run(kube_server, "Job", nodes=1)
    sa = kube_server.write_service_account(tmp_path / "sa")
    (sa / "token").write_bytes(b"\xff\xfe\x00\x01binary")
    events = MilestoneEvents(pod_env(kube_server, sa, run))
    short_run(events, Clock())
    assert events.close(timeout_s=10)
    assert crashed == [] and kube_server.requests == []
    [warning] = warnings_from(caplog)
    assert warning.startswith("Kubernetes events off: in-cluster config from ") and "token" in warning


def test_an_unexpected_error_in_the_events_thread_turns_events_off(kube_server, tmp_path, caplog, monkeypatch):
    """Whatever the client raises (a token file refreshed into garbage mid-run, a bug), training goes on."""
    import threading

    crashed = []
    monkeypatch.setattr(threading, "excepthook", crashed.append)
    run = put_training_run(kube_server, "Job", nodes=1)

    calls = []

    def broken(*args, **kwargs):
        calls.append(args)
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    monkeypatch.setattr(ev.kube, "create_event", broken)
    events = MilestoneEvents(pod_env(kube_server, kube_server.write_service_account(tmp_path / "sa"), run))
    short_run(events, Clock())
    assert events.close(timeout_s=10)
    assert crashed == []
    [warning] = warnings_from(caplog)
    assert warning.startswith("Kubernetes events off: UnicodeDecodeError: ")
    assert len(calls) == 1, "off after the first failure: the run's later milestones are not tried"
