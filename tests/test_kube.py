"""trainer/kube.py: configuration (in-cluster and kubeconfig), errors, owner resolution and workload states, against a
real API server (tests/kube_proxy.py); and trainer/rbac.py, the declaration of every API call (API_CALLS; trainer_calls
and wait_calls per pod identity), against the requests the code made."""

from __future__ import annotations

import io
import threading

import pytest

from kube_proxy import (KubeProxy, closed_port, condition, kube_server, pod_env, put_training_run,  # noqa: F401
                       workload)
from trainer import kube, rbac
from trainer.events import MilestoneEvents
from trainer.status import STATUS_OK, status
from trainer.wait import WAIT_OK, wait_for_training
from trainer.workload_state import workload_status

# ---- identity ------------------------------------------------------------------------------------------------------


def test_pod_identity_from_the_downward_api_and_the_charts_workload():
    env = {"POD_NAME": "ddpm-train-0-abcde", "POD_NAMESPACE": "ml", "POD_UID": "u-1",
           "TRAINING_WORKLOAD": "PyTorchJob/ddpm-train"}
    assert kube.PodRef.from_env(env) == kube.PodRef(
        "ddpm-train-0-abcde", "ml", "u-1", kube.WorkloadRef("PyTorchJob", "ddpm-train"))
    bare = kube.PodRef.from_env({"POD_NAME": "p", "POD_NAMESPACE": "ml"})
    assert bare == kube.PodRef("p", "ml", None, None)
    assert kube.PodRef.from_env({"POD_NAME": "p"}) is None
    assert kube.PodRef.from_env({}) is None
    with pytest.raises(ValueError, match="not <Kind>/<name>"):
        kube.PodRef.from_env({"POD_NAME": "p", "POD_NAMESPACE": "ml", "TRAINING_WORKLOAD": "Job/a/b"})


def test_no_environment_variable_read_starts_with_ddpm():
    """The trainer rejects unknown DDPM_* variables as config, so the cluster's variables must not use the prefix."""
    names = [kube.SERVICE_ACCOUNT_DIR_ENV, kube.WORKLOAD_ENV, "POD_NAME", "POD_NAMESPACE", "POD_UID"]
    assert not [n for n in names if n.startswith("DDPM_")]


# ---- connection ----------------------------------------------------------------------------------------------------


def test_in_cluster_config_uses_the_service_account_folder(kube_server, tmp_path):
    sa = kube_server.write_service_account(tmp_path / "sa", namespace="ml")
    cluster = kube.connect(kube_server.in_cluster_env(sa), in_cluster_only=True)
    assert (cluster.source, cluster.namespace) == ("in-cluster", "ml")
    assert kube.list_objects(cluster, kube.POD, "ml") == []
    [request] = kube_server.requests
    assert request.token == (sa / "token").read_text() and request.namespace == "ml"


def test_in_cluster_only_never_falls_back_to_a_kubeconfig(kube_server, tmp_path):
    env = {"KUBECONFIG": str(kube_server.write_kubeconfig(tmp_path / "config"))}
    with pytest.raises(kube.NotConfigured, match="not in a pod"):
        kube.connect(env, in_cluster_only=True)
    assert kube.connect(env, in_cluster_only=False).source == f"kubeconfig {tmp_path}/config"


def test_kubeconfig_may_list_several_files_like_kubectl(kube_server, tmp_path):
    config = kube_server.write_kubeconfig(tmp_path / "config", namespace=None)
    env = {"KUBECONFIG": f"{tmp_path}/missing:{config}"}
    cluster = kube.connect(env, in_cluster_only=False)
    assert cluster.namespace == "default"  # the context names none
    assert kube.list_objects(cluster, kube.JOB, "default") == []


@pytest.mark.parametrize("broken, error, match", [
    ("token", kube.NotConfigured, "Service token file does not exist"),
    ("ca", kube.NotConfigured, "Service certification file does not exist"),
    ("wrong-token", kube.Refused, "401 Unauthorized"),
    ("other-ca", kube.Unreachable, "CERTIFICATE_VERIFY_FAILED"),  # the mounted CA is what the server is checked with
    ("absent", kube.Unreachable, "refused"),
])
def test_configuration_and_transport_problems_are_typed(kube_server, tmp_path, broken, error, match):
    sa = kube_server.write_service_account(tmp_path / "sa")
    env = kube_server.in_cluster_env(sa)
    if broken == "token":
        (sa / "token").unlink()
    elif broken == "ca":
        (sa / "ca.crt").unlink()
    elif broken == "wrong-token":
        (sa / "token").write_text("not-the-token")
    elif broken == "other-ca":
        with KubeProxy() as other:
            (sa / "ca.crt").write_bytes(other.ca_pem)
    else:
        env["KUBERNETES_SERVICE_PORT"] = str(closed_port())
    with pytest.raises(error, match=match):
        kube.list_objects(kube.connect(env, in_cluster_only=True), kube.POD, "default")


def test_a_hanging_server_costs_one_read_timeout(tmp_path):
    with KubeProxy(hang=True) as fake:
        cluster = kube.connect(fake.in_cluster_env(fake.write_service_account(tmp_path / "sa")), in_cluster_only=True,
                               request_timeout=(1.0, 0.2))
        with pytest.raises(kube.Unreachable, match="timed out"):
            kube.get_object(cluster, kube.JOB, "default", "ddpm-train")
        assert len(fake.requests) == 1  # no retry


# ---- owners and states ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, expected", [("Job", "Job"), ("PyTorchJob", "PyTorchJob"), ("TrainJob", "TrainJob"),
                                            ("JobSet", "JobSet")])
def test_owner_resolution_without_training_workload_goes_to_the_top_known_owner(kube_server, tmp_path, kind,
                                                                                expected):
    run = put_training_run(kube_server, kind, nodes=1)
    env = pod_env(kube_server, kube_server.write_service_account(tmp_path / "sa"), run, workload_env=False)
    cluster = kube.connect(env, in_cluster_only=True)
    pod, owner = kube.resolve_workload(cluster, kube.PodRef.from_env(env))
    assert (pod.kind, pod.uid) == ("Pod", run.pods[0]["metadata"]["uid"])
    assert (owner.kind, owner.name, owner.uid) == (expected, "ddpm-train", run.workload["metadata"]["uid"])


def test_a_bare_pod_has_no_workload(kube_server, tmp_path):
    from kube_proxy import TrainingRun, pod

    run = TrainingRun(workload={}, pods=[kube_server.put(pod("debug"))])
    env = pod_env(kube_server, kube_server.write_service_account(tmp_path / "sa"), run, workload_env=False)
    assert kube.resolve_workload(kube.connect(env, in_cluster_only=True), kube.PodRef.from_env(env))[1] is None


@pytest.mark.parametrize("kind, conditions, status, expected", [
    ("Job", [], {}, ("pending", "")),
    ("Job", [], {"active": 2}, ("running", "")),
    ("Job", [condition("Suspended", "JobSuspended")], {}, ("suspended", "JobSuspended")),
    ("Job", [condition("FailureTarget", "BackoffLimitExceeded")], {"active": 1}, ("failed", "BackoffLimitExceeded")),
    ("Job", [condition("Failed", "DeadlineExceeded")], {}, ("failed", "DeadlineExceeded")),
    ("Job", [condition("SuccessCriteriaMet"), condition("Complete", "CompletionsReached")], {},
     ("succeeded", "CompletionsReached")),
    ("Job", [condition("Suspended", status="False")], {"active": 1}, ("running", "")),
    ("PyTorchJob", [condition("Created"), condition("Running")], {}, ("running", "Running")),
    ("PyTorchJob", [condition("Running", status="False"), condition("Restarting", "PyTorchJobRestarting")], {},
     ("running", "PyTorchJobRestarting")),
    ("PyTorchJob", [condition("Running", status="False"), condition("Succeeded", "PyTorchJobSucceeded")], {},
     ("succeeded", "PyTorchJobSucceeded")),
    ("PyTorchJob", [condition("Failed", "PyTorchJobFailed")], {}, ("failed", "PyTorchJobFailed")),
    ("PyTorchJob", [condition("Suspended", "PyTorchJobSuspended")], {}, ("suspended", "PyTorchJobSuspended")),
    ("JobSet", [condition("Completed", "AllJobsCompleted")], {}, ("succeeded", "AllJobsCompleted")),
    ("JobSet", [condition("Failed", "FailedJobs")], {}, ("failed", "FailedJobs")),
    ("JobSet", [], {"replicatedJobsStatus": [{"name": "node", "active": 1}]}, ("running", "")),
    ("TrainJob", [condition("Complete", "JobsCompleted")], {}, ("succeeded", "JobsCompleted")),
    ("TrainJob", [condition("Failed", "JobsFailed", "jobset failed")], {}, ("failed", "JobsFailed")),
    ("TrainJob", [condition("Suspended", "Suspended")], {}, ("suspended", "Suspended")),
    ("TrainJob", [], {"jobsStatus": [{"name": "node", "active": 0}]}, ("pending", "")),
])
def test_workload_states_from_conditions(kind, conditions, status, expected):
    state = workload_status(kind, workload(kind, "w", conditions=conditions, status=status))
    assert (state.state, state.reason) == expected


# ---- the declaration of every call ---------------------------------------------------------------------------------


def flatten(calls: rbac.Calls) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for (group, resource), verbs in calls.items() for verb in verbs}


def in_cluster_calls(fake: KubeProxy, tmp_path, kind: str) -> tuple[set, set]:
    """Everything the chart's pods do for a backend whose workload is `kind`, in its own namespace, per pod identity:
    rank 0's Events (two checkpoints: create, then patch), and the push Job's wait (get, then watch until it
    succeeds)."""
    namespace = kind.lower()
    run = put_training_run(fake, kind, namespace=namespace)
    env = pod_env(fake, fake.write_service_account(tmp_path / kind, namespace=namespace), run)
    events = MilestoneEvents(env, checkpoint_interval_s=0)
    events.started(global_batch=8, processes=2, step=0, total_steps=4, resumed_from=None)
    events.checkpoint(2, 4, "/data/c-2")
    events.checkpoint(4, 4, "/data/c-4")
    assert events.close(timeout_s=10)
    training = {r.call for r in fake.requests if r.namespace == namespace}

    before, watches = len(fake.requests), fake.watches

    def succeed():
        assert fake.wait_for_watches(watches + 1)
        done = {"Job": "Complete", "PyTorchJob": "Succeeded", "JobSet": "Completed", "TrainJob": "Complete"}[kind]
        fake.put(run.workload | {"status": {"conditions": [condition(done)]}})

    finisher = threading.Thread(target=succeed)
    finisher.start()
    assert wait_for_training(run.ref, None, lambda: (True, "matches"), poll_seconds=0.01, timeout_seconds=10,
                             environ=env, say=lambda line: None) == WAIT_OK
    finisher.join()
    return training, {r.call for r in fake.requests[before:] if r.namespace == namespace}


def test_api_calls_declare_exactly_what_the_code_calls(kube_server, tmp_path):
    """Per pod identity, no more and no less: the training pods never read or watch the workload (only the push's
    wait-for-training does), so their Role need not grant it."""
    seen_in_cluster = set()
    for kind in kube.WORKLOAD_KINDS:
        training, waiting = in_cluster_calls(kube_server, tmp_path, kind)
        assert training == flatten(rbac.trainer_calls(kind)), kind
        assert waiting == flatten(rbac.wait_calls(kind)), kind
        seen_in_cluster |= training | waiting

    config = kube_server.write_kubeconfig(tmp_path / "kubeconfig", namespace="job")
    before = len(kube_server.requests)
    assert status("ddpm", None, environ={"KUBECONFIG": str(config)}, out=io.StringIO()) == STATUS_OK
    seen_status = {r.call for r in kube_server.requests[before:]}
    assert seen_status == flatten(rbac.STATUS_CALLS)

    assert seen_in_cluster | seen_status == kube_server.calls() == flatten(rbac.API_CALLS)


def test_the_roles_for_each_backend():
    """The rules the chart's Roles must hold, spelled out: the training pods' (helm/templates/rbac.yaml) and the
    push Job's (its wait-for-training container)."""
    assert rbac.trainer_calls("Job") == {("", "events"): {"create", "patch"}, ("", "pods"): {"get"}}
    assert rbac.trainer_calls("PyTorchJob") == {("", "events"): {"create", "patch"}, ("", "pods"): {"get"}}
    assert rbac.trainer_calls("JobSet") == {("", "events"): {"create", "patch"}, ("", "pods"): {"get"},
                                            ("batch", "jobs"): {"get"}}
    assert rbac.trainer_calls("TrainJob") == {("", "events"): {"create", "patch"}, ("", "pods"): {"get"},
                                              ("batch", "jobs"): {"get"}, ("jobset.x-k8s.io", "jobsets"): {"get"}}
    assert rbac.wait_calls("Job") == {("batch", "jobs"): {"get", "watch"}}
    assert rbac.wait_calls("PyTorchJob") == {("kubeflow.org", "pytorchjobs"): {"get", "watch"}}
    assert rbac.wait_calls("JobSet") == {("jobset.x-k8s.io", "jobsets"): {"get", "watch"}}
    assert rbac.wait_calls("TrainJob") == {("trainer.kubeflow.org", "trainjobs"): {"get", "watch"}}


def test_role_rules_are_the_calls_as_rbac_rules():
    assert rbac.role_rules(rbac.trainer_calls("JobSet")) == [
        {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]},
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get"]},
    ]
    assert rbac.role_rules(rbac.wait_calls("Job")) == [
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "watch"]}]


@pytest.mark.parametrize("token", [b"\xff\xfe\x00\x01SECRET", b"SECRET\nSECRET", b"SECRET\x00", b"SECRET SECRET",
                                   b"SECRET\n"])
def test_a_token_file_that_is_not_a_token_is_not_configured(kube_server, tmp_path, token):
    """A binary or multi-line token file (a wrong Secret key, a key file mounted as the token) was a
    UnicodeDecodeError or, inside the HTTP client, a ValueError: tracebacks where NotConfigured is the contract."""
    sa = kube_server.write_service_account(tmp_path / "sa")
    (sa / "token").write_bytes(token)
    with pytest.raises(kube.NotConfigured, match="token") as caught:
        kube.list_objects(kube.connect(kube_server.in_cluster_env(sa), in_cluster_only=True), kube.POD, "default")
    assert "SECRET" not in str(caught.value)  # never the token itself
    kubeconfig = kube_server.write_kubeconfig(tmp_path / "kubeconfig", token=token.decode("latin-1"))
    with pytest.raises(kube.NotConfigured, match="token"):
        kube.list_objects(kube.connect({"KUBECONFIG": str(kubeconfig)}, in_cluster_only=False), kube.POD, "default")
    assert kube_server.requests == []
