"""The chart's default backend (`job`) on a real control plane: helm installs the chart into kube-apiserver, the Job
controller creates the pods, the scheduler binds them (GPU capacity, taints, WaitForFirstConsumer volumes), the real
authorizer checks every API call against the chart's Roles, and the process kubelet runs each container as a local
process (tests/cluster/kubelet.py).

No image is pulled: the pods run the command the pod spec names (`ddpm launch`) with the Dockerfile's environment and
this checkout's venv as the image's /opt/venv (tests/cluster/images.py), so what runs is the code under test. The
training is tiny and on CPU; the cluster has four one-GPU nodes and a CPU node (tests/cluster/__init__.py).
"""

from __future__ import annotations

import datetime as dt
import json
import signal

import pytest

from cluster.testing import (
    SHARED, Release, ddpm_status, evict_paused, marker, paused, port_forward_get, ready, token_secret, values, wait_for, with_hub,
)
from conftest import CLUSTER_GROUP

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group(CLUSTER_GROUP)]

JOBS = "apis/batch/v1/jobs"


def stamp(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def rank0_pod(release: Release) -> dict:
    pods = [p for p in release.pods() if p["metadata"]["labels"].get("batch.kubernetes.io/job-completion-index") == "0"]
    return max(pods, key=lambda p: p["metadata"]["creationTimestamp"])


def test_install_trains_to_completion_with_logs_events_tensorboard_push_and_helm_test(cluster, make_namespace, hub):
    """Install as the README says (two nodes, a ReadWriteMany volume, TensorBoard and the push as pods of their own),
    into a namespace whose Pod Security admission enforces `restricted`: every pod is admitted; node 1's image pull
    is held, and while node 0 waits for it in the rendezvous, TensorBoard answers through `kubectl port-forward` and
    `helm test`, and the push Job waits; then both train together and complete. `kubectl logs` (through the API
    server and the kubelet's log endpoint) shows rank 0's progress lines, rank 0's Events are on the Job (posted with
    the chart's Role, through the real authorizer), the push Job's `ddpm wait-for-training` (with its own Role)
    lets the upload start only after training completed, and `helm uninstall` keeps the claim."""
    ns = make_namespace("install")
    token_secret(cluster, ns)
    release = Release(cluster, "ddpm", ns, with_hub(values(tensorboard={"mode": "deployment"}), hub,
                                                    "fake-user/ddpm-e2e", "job"))
    release_node1 = cluster.kubelet.hold(r"^ddpm-train-1-")
    release.install()

    tensorboard = wait_for("TensorBoard's pod Ready", lambda: [
        p for p in release.pods("tensorboard") if ready(p, "tensorboard")], 180, release.describe)
    assert tensorboard
    assert port_forward_get(cluster, ns, "svc/ddpm-tensorboard", 6006) == 200
    test = cluster.helm("test", "ddpm", "-n", ns, "--logs", check=False)
    assert test.returncode == 0 and "TensorBoard answers" in test.stdout, test.stdout + test.stderr
    assert release.get(JOBS, release.workload)["status"].get("succeeded", 0) == 0
    assert not hub.repos, "the push ran before training"
    release_node1()

    release.wait_condition(JOBS, release.workload, ("Complete", "Failed"), 400)
    assert release.condition(JOBS, release.workload, "Complete"), release.describe()
    pods = release.pods()
    nodes = {p["spec"]["nodeName"] for p in pods}
    assert len(nodes) == 2 and all(n.startswith("gpu-node-") for n in nodes), release.describe()
    rank0 = rank0_pod(release)["metadata"]["name"]
    log = release.logs(rank0, "trainer")
    assert "step 16/16" in log and "done: 16 steps" in log, log[-2000:]
    assert marker(release)["global_step"] == 16
    ours = release.reasons(release.workload)
    for reason in ("RunStarted", "CheckpointSaved", "Completed"):
        assert reason in ours, ours

    push = release.wait_condition(JOBS, "ddpm-push", ("Complete", "Failed"), 300)
    assert push["type"] == "Complete", release.describe()
    waited = release.logs(release.pods("push")[0]["metadata"]["name"], "wait-for-training")
    assert f"Job/{release.workload} succeeded; completion marker matches" in waited, waited
    assert "model_index.json" in hub.repos["fake-user/ddpm-e2e"].files

    release.uninstall()
    claim = release.get("api/v1/persistentvolumeclaims", release.claim)
    assert claim is not None and claim["status"]["phase"] == "Bound", "helm uninstall must keep the volume"
    assert release.get(JOBS, release.workload) is None


def test_the_default_install_on_a_single_node_volume_cannot_deadlock_and_rank_0_pushes(cluster, make_namespace, hub):
    """Issue 19 point 2. The default install: one node, the default StorageClass (ReadWriteOnce, WaitForFirstConsumer,
    each volume pinned to the node of its first pod, as a zonal disk), TensorBoard and the push on. The GPU nodes are
    cordoned while it is created, so whatever pod the scheduler can place first goes to the CPU node: in chart 0.3
    that was TensorBoard, which took the volume there, and the trainer then waited forever for a GPU on a node that
    has none. Now only training pods mount the claim (TensorBoard is their sidecar, rank 0 pushes), the run starts
    once a GPU node is schedulable, TensorBoard answers while it trains, and the model reaches the Hub."""
    ns = make_namespace("rwo")
    token_secret(cluster, ns)
    release = Release(cluster, "ddpm", ns, with_hub(values(gpus=1, storage={"size": "1Gi"}, config={
        "train_batch_size": 8}), hub, "fake-user/ddpm-rwo", "trainer"))
    gpu_nodes = [n["metadata"]["name"] for n in cluster.api.get("/api/v1/nodes")["items"]
                 if "nvidia.com/gpu" in n["status"]["capacity"]]
    for node in gpu_nodes:
        cluster.kubectl("cordon", node)
    try:
        release.install()
        claimants = wait_for("the release's pods", release.list_pods_of_claim, 60, release.describe)
        # Nothing could be placed: no pod holds the volume on the CPU node.
        wait_for("the scheduler's verdict", lambda: [e for e in release.events() if e["reason"] == "FailedScheduling"],
                 60, release.describe)
        assert all(p["metadata"]["labels"]["app.kubernetes.io/component"] == "train" for p in claimants), [
            p["metadata"]["name"] for p in claimants]
        assert release.get("api/v1/persistentvolumeclaims", release.claim)["status"]["phase"] == "Pending"
    finally:
        for node in gpu_nodes:
            cluster.kubectl("uncordon", node)

    # The trainer is frozen (SIGSTOP) as soon as it runs, so the run cannot end before TensorBoard is looked at.
    pod = wait_for("rank 0's pod Running", lambda: [p for p in release.pods() if p["status"].get("phase") == "Running"],
                   180, release.describe)[0]
    cluster.kubelet.kill_container(ns, pod["metadata"]["name"], "trainer", signal.SIGSTOP)
    try:
        wait_for("rank 0's TensorBoard sidecar Ready", lambda: [
            p for p in release.pods() if ready(p, "tensorboard")], 180, release.describe)
        assert pod["spec"]["nodeName"].startswith("gpu-node-")
        assert port_forward_get(cluster, ns, "svc/ddpm-tensorboard", 6006) == 200
    finally:
        cluster.kubelet.kill_container(ns, pod["metadata"]["name"], "trainer", signal.SIGCONT)
    release.wait_condition(JOBS, release.workload, ("Complete", "Failed"), 400)
    assert release.condition(JOBS, release.workload, "Complete"), release.describe()
    log = release.logs(pod["metadata"]["name"], "trainer")
    assert "pushed:" in log, log[-2000:]
    assert "model_index.json" in hub.repos["fake-user/ddpm-rwo"].files
    done = release.list("api/v1/pods", labelSelector="app.kubernetes.io/component=train")[0]
    assert done["status"]["phase"] == "Succeeded", "TensorBoard must end with the run, not keep the GPU node"


def test_evicted_training_pods_are_replaced_uncounted_and_the_run_resumes(cluster, make_namespace):
    """Issue 18 point 3 and issue 19 point 4. Evict one training pod mid-run (the Eviction API: DisruptionTarget,
    SIGTERM, the pod's grace period), twice in a row, more often than torchrun's in-pod restarts (maxRestarts=1):
    each time the trainer checkpoints and exits 143, the Job's podFailurePolicy ignores it and creates a
    replacement, the surviving pod's workers restart without spending a restart, and both resume from the newest
    checkpoint; the run finishes at the same final step with no failure counted."""
    ns = make_namespace("evict")
    release = Release(cluster, "ddpm", ns, values(maxRestarts=1, config={"max_train_steps": 60,
                                                                          "checkpointing_steps": 4}))
    release.install()
    victims, last = [], 0
    for round_ in range(2):
        last = wait_for(f"a checkpoint after step {last}", lambda: (n := release.newest_checkpoint()) > last and n,
                        300, release.describe)
        with paused(cluster, release, 60):  # mid-run however fast this machine trains
            victim = next(p for p in release.pods() if p["status"].get("phase") == "Running" and
                          p["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"] == "1")
            evict_paused(cluster, release, victim["metadata"]["name"])
        victims.append(victim["metadata"]["uid"])
        wait_for("the evicted pod's replacement running", lambda: any(
            p["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"] == "1"
            and p["metadata"]["uid"] not in victims and p["status"].get("phase") == "Running"
            for p in release.pods()), 300, release.describe)

    release.wait_condition(JOBS, release.workload, ("Complete", "Failed"), 600)
    job = release.get(JOBS, release.workload)
    assert release.condition(JOBS, release.workload, "Complete"), release.describe()
    assert job["status"].get("failed", 0) == 0, f"a preemption was counted: {job['status']}\n{release.describe()}"
    for pod in release.pods():
        if pod["metadata"]["uid"] in victims:
            conditions = {c["type"]: c for c in pod["status"].get("conditions") or []}
            assert conditions["DisruptionTarget"]["reason"] == "EvictionByEvictionAPI"
            code = pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"]
            assert code == 143, f"the evicted trainer exited {code}, not 143"
    log = release.logs(rank0_pod(release)["metadata"]["name"], "trainer")
    assert log.count("resumed from") >= 1, log[-3000:]
    assert marker(release)["global_step"] == 60


def test_a_config_error_fails_the_job_at_once_and_a_crash_is_retried(cluster, make_namespace):
    """Exit 2 (here: resume_from_checkpoint latest with no checkpoint) matches the FailJob rule: the Job fails with
    reason PodFailurePolicy after the first pods, no retry. A container killed like an OOM kill (137) is a counted
    failure: the Job replaces the pod and the run still completes."""
    ns = make_namespace("fail")
    bad = Release(cluster, "bad", ns, values(config={"resume_from_checkpoint": "latest"}))
    crash = Release(cluster, "crash", ns, values(config={"max_train_steps": 40}))
    bad.install()
    crash.install()  # side by side: the cluster has a GPU for each pod of both
    failed = bad.wait_condition(JOBS, bad.workload, ("Failed", "Complete"), 300)
    assert failed["type"] == "Failed" and failed["reason"] == "PodFailurePolicy", failed
    assert "exit code 2" in failed["message"], failed["message"]
    job = bad.get(JOBS, bad.workload)
    assert job["status"].get("failed", 0) <= 2 and len(bad.pods()) <= 2, "a config error was retried"

    wait_for("a checkpoint", lambda: "CheckpointSaved" in crash.reasons(crash.workload), 300, crash.describe)
    with paused(cluster, crash, 40):  # mid-run however fast this machine trains
        victim = next(p for p in crash.pods() if p["status"]["phase"] == "Running")
        cluster.kubelet.kill_container(ns, victim["metadata"]["name"], "trainer")
    crash.wait_condition(JOBS, crash.workload, ("Complete", "Failed"), 400)
    assert crash.condition(JOBS, crash.workload, "Complete"), crash.describe()
    assert crash.get(JOBS, crash.workload)["status"].get("failed", 0) >= 1, "the crash was not counted"


LATE_S = 180


@pytest.fixture(scope="module", autouse=True)
def late_peer(cluster):
    """The late-peer run of the test below, installed when this module starts: its three minutes of waiting overlap
    the tests in between (the cluster has GPUs for it and one more two-node run). Its pod names are its own, so the
    kubelet's hold reaches no other test's pods."""
    from cluster.testing import delete_namespace, namespace

    ns = namespace(cluster, "late")
    release = Release(cluster, "late", ns, values())
    cluster.kubelet.delay(rf"^{release.workload}-0-", LATE_S)
    release.install()
    yield release
    delete_namespace(cluster, ns)


def test_a_peer_that_starts_three_minutes_late_still_joins(late_peer):
    """Issue 18 point 3, issue 19 point 3. Node 0, which hosts the rendezvous store, starts three minutes after node
    1 (a new GPU node, a slow image pull): node 1 waits for it (the chart's rendezvous timeouts hold end to end: c10d
    read_timeout, not only join_timeout) instead of exiting 1, and the run completes with no failure counted."""
    release = late_peer
    release.wait_condition(JOBS, release.workload, ("Complete", "Failed"), 600)
    job = release.get(JOBS, release.workload)
    assert release.condition(JOBS, release.workload, "Complete"), release.describe()
    assert job["status"].get("failed", 0) == 0, f"the early peer failed: {job['status']}\n{release.describe()}"
    by_index = {p["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"]: p for p in release.pods()}
    assert by_index["1"]["status"]["containerStatuses"][0]["restartCount"] == 0
    started = {i: stamp(pod["status"]["containerStatuses"][0]["state"]["terminated"]["startedAt"])
               for i, pod in by_index.items()}
    assert (started["0"] - started["1"]).total_seconds() >= LATE_S - 10, started


def test_restricted_pod_security_is_enforced_by_the_api_server(cluster, make_namespace):
    """The namespaces above admit every pod of the chart under `restricted`; here the same admission refuses what it
    must: the opt-in ownership fix runs as root with CHOWN, which the Job controller cannot create there."""
    ns = make_namespace("psa")
    release = Release(cluster, "ddpm", ns, values(storage={**SHARED, "fixOwnership": True}))
    release.install()
    refused = wait_for("the Job controller's FailedCreate", lambda: [
        e for e in release.events(release.workload) if e["reason"] == "FailedCreate"], 120, release.describe)
    assert "violates PodSecurity \"restricted" in refused[0]["message"], refused[0]["message"]
    assert release.pods() == []


def test_status_and_the_chart_roles_against_the_real_authorizer(cluster, make_namespace):
    """`ddpm status` from a laptop with a user whose Role grants exactly what it calls (trainer.rbac.STATUS_CALLS), and
    the training pods' ServiceAccount allowed exactly the calls the trainer makes, as the API server itself lists
    them (`kubectl auth can-i --list`). A user without the Events permission is refused, and says so."""
    from trainer import rbac

    ns = make_namespace("status")
    release = Release(cluster, "ddpm", ns, values(gpus=1, storage={"size": "1Gi"}))
    release.install()
    release.wait_condition(JOBS, release.workload, ("Complete", "Failed"), 400)

    rules = [{"apiGroups": [group], "resources": [resource], "verbs": sorted(verbs)}
             for (group, resource), verbs in sorted(rbac.STATUS_CALLS.items())]
    cluster.kubectl("-n", ns, "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "status", "namespace": ns},
         "rules": rules},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": "status", "namespace": ns},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "status"},
         "subjects": [{"kind": "User", "name": "alice", "apiGroup": "rbac.authorization.k8s.io"}]}]}))
    alice = cluster.plane.user_kubeconfig("alice", namespace=ns)
    result = ddpm_status(cluster, ns, alice)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Job/ddpm-train" in result.stdout and "completed" in result.stdout, result.stdout
    bob = cluster.plane.user_kubeconfig("bob", namespace=ns)
    refused = ddpm_status(cluster, ns, bob)
    assert refused.returncode == 1 and "forbidden" in refused.stdout.lower(), refused.stdout

    # What the API server grants the training pods' ServiceAccount beyond what every account has (the namespace's
    # `default` one, bound to nothing, e.g. reading ClusterTrustBundles), as `kubectl auth can-i --list` asks it: a
    # SelfSubjectRulesReview as that account, read as JSON rather than from the table's columns.
    def rules_of(account: str) -> dict:
        review = json.loads(cluster.kubectl(
            "create", "--validate=false", "-o", "json", "-f", "-", f"--as=system:serviceaccount:{ns}:{account}",
            input=json.dumps({"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectRulesReview",
                              "spec": {"namespace": ns}})).stdout)
        rules = {}
        for rule in review["status"]["resourceRules"]:
            for group in rule.get("apiGroups") or []:
                for resource in rule.get("resources") or []:
                    rules.setdefault((group, resource), set()).update(rule["verbs"])
        return rules

    everyone = rules_of("default")
    granted = {key: verbs - everyone.get(key, set()) for key, verbs in rules_of("ddpm").items()}
    granted = {key: verbs for key, verbs in granted.items() if verbs}
    expected = {key: set(verbs) for key, verbs in rbac.trainer_calls("Job").items()}
    assert granted == expected, f"the API server grants {granted}, the trainer calls {expected}"

