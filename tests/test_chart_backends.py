"""The training workload of each backend as rendered: the Indexed Job, the JobSet (leader first), the PyTorchJob and
the TrainJob with its TrainingRuntime; the c10d rendezvous, the retry budget, deadlines, failure policies and elastic
runs. How the controllers act on these objects is tested on the real controllers (tests/test_cluster_*.py); what
is here are the rendered settings, and the decisions no cluster test makes yet.
"""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from trainer.errors import EXIT_CONFIG, EXIT_DIVERGED, EXIT_FAILED, EXIT_PREEMPTED, EXIT_STALLED

from chart import (
    BACKENDS, CHART, ELASTIC, KUBERNETES_VERSIONS, MATRIX, PUSH_JOB, PUSH_ON, RELEASE, RWX, by_kind, env_of,
    kubernetes_problems, merge, nodes_and_procs, one, render, render_error, run_helm, training_pods, values_args,
)



@pytest.mark.parametrize("case", sorted(c for c in MATRIX if c.startswith("pytorchjob")))
def test_pytorchjob_runs_workers_with_the_operators_c10d_rendezvous(case):
    values = MATRIX[case]
    doc = one(render(values), "PyTorchJob")
    nodes, procs = nodes_and_procs(values)
    spec = doc["spec"]
    assert spec["nprocPerNode"] == str(procs)
    # Workers only: the webhook requires a Worker with elasticPolicy; a Master would add static env and an
    # init container without a securityContext (training-operator release-1.9 pytorch/initcontainer.go).
    assert set(spec["pytorchReplicaSpecs"]) == {"Worker"}
    worker = spec["pytorchReplicaSpecs"]["Worker"]
    assert worker["replicas"] == nodes and worker["restartPolicy"] == "ExitCode"
    # ExitCode fails the job on 1-127 and recreates the pod on 128-255 (training-operator IsRetryableExitCode; the
    # recreation after a preemption is tested on the real operator, tests/test_cluster_kubeflow.py)
    assert max(EXIT_FAILED, EXIT_CONFIG, EXIT_DIVERGED, EXIT_STALLED) < 128 <= EXIT_PREEMPTED
    elastic = spec["elasticPolicy"]
    min_nodes = values["elastic"]["minNodes"] if values.get("elastic", {}).get("enabled") else nodes
    assert elastic["rdzvBackend"] == "c10d" and (elastic["minReplicas"], elastic["maxReplicas"]) == (min_nodes, nodes)
    assert elastic["rdzvHost"] == f"{RELEASE}-train-worker-0" and elastic["rdzvId"] == RELEASE
    assert elastic["rdzvConf"] == [{"key": "join_timeout", "value": "1800"}, {"key": "read_timeout", "value": "1800"}]
    assert spec["runPolicy"]["cleanPodPolicy"] == "Running"
    container = worker["template"]["spec"]["containers"][0]
    assert container["name"] == "pytorch"  # the operator injects env into, and reads exit codes of, this container
    port = next(p for p in container["ports"] if p["name"] == "pytorchjob-port")
    assert port["containerPort"] == elastic["rdzvPort"] == 29500
    assert container["resources"]["limits"]["nvidia.com/gpu"] == procs
    assert not any(e["name"].startswith("PET_") for e in container["env"]), "the operator injects PET_*"
    assert "restartPolicy" not in worker["template"]["spec"], "set per replica; the operator overwrites it"


@pytest.mark.parametrize("case", sorted(c for c in MATRIX if c.startswith("trainjob")))
def test_trainjob_and_its_runtime(case):
    values = MATRIX[case]
    docs = render(values)
    doc = one(docs, "TrainJob")
    nodes, procs = nodes_and_procs(values)
    trainer = doc["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (nodes, procs)
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == procs
    env = env_of(trainer)
    reserved = {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"}
    assert not reserved & set(env), "the Trainer's webhook refuses these (TorchRunReservedEnvNames)"
    assert env["PET_RDZV_BACKEND"] == "c10d"
    assert env["PET_RDZV_ENDPOINT"] == f"{RELEASE}-train-node-0-0.{RELEASE}-train:29500"
    if "stock" in case:
        assert doc["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                             "name": "torch-distributed"}
        assert not by_kind(docs, "TrainingRuntime")
        [patch] = doc["spec"]["runtimePatches"]
        assert patch["manager"] == "ddpm-trainer/helm-chart"
        return
    runtime = one(docs, "TrainingRuntime")
    assert doc["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime",
                                         "name": runtime["metadata"]["name"]}
    assert "runtimePatches" not in doc["spec"], "the runtime is the chart's own: nothing to patch"
    assert runtime["spec"]["mlPolicy"] == {"numNodes": nodes, "torch": {}}
    [rjob] = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    assert rjob["name"] == "node"
    assert rjob["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    assert rjob["template"]["spec"]["template"]["spec"]["containers"][0]["name"] == "node"


@pytest.mark.parametrize("gpus,nodes,procs", [(1, 1, 1), (8, 1, 8), (16, 2, 8), (32, 4, 8)])
def test_indexed_job_shape_and_c10d_rendezvous(gpus, nodes, procs):
    docs = render(merge({"gpus": gpus}, RWX if nodes > 1 else {}))
    job = one(docs, "Job", "train")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == nodes
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    service = next(s for s in by_kind(docs, "Service") if s["spec"].get("clusterIP") == "None")
    assert pod["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["publishNotReadyAddresses"] is True
    labels = spec["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
    container = pod["containers"][0]
    assert container["command"] == ["ddpm", "launch"]
    env = env_of(container)
    assert env["PET_NNODES"] == str(nodes) and env["PET_NPROC_PER_NODE"] == str(procs)
    # c10d on pod 0's stable name; `ddpm launch` adds is_host from JOB_COMPLETION_INDEX.
    assert env["PET_RDZV_BACKEND"] == "c10d"
    assert env["PET_RDZV_ENDPOINT"] == f"{job['metadata']['name']}-0.{service['metadata']['name']}:29500"
    assert env["PET_RDZV_ID"] == RELEASE, "stable per release: a replaced pod joins the same rendezvous"
    assert env["PET_MAX_RESTARTS"] == "3"
    # the c10d store's read_timeout too (60 s in torch), or a pod whose pod 0 starts late exits 1
    assert env["PET_RDZV_CONF"] == "join_timeout=1800,read_timeout=1800"
    assert not {"PET_MASTER_ADDR", "PET_MASTER_PORT", "PET_NODE_RANK"} & set(env), "static rendezvous leftovers"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == procs
    assert next(p for p in container["ports"] if p["name"] == "rendezvous")["containerPort"] == 29500


def test_rendezvous_timeout_outlasts_node_autoscaling_and_is_a_value():
    assert yaml.safe_load((CHART / "values.yaml").read_text())["rendezvousTimeoutSeconds"] >= 1800
    values = {"rendezvousTimeoutSeconds": 3600, "maxRestarts": 5}
    conf = "join_timeout=3600,read_timeout=3600"
    assert env_of(one(render(values), "Job", "train")["spec"]["template"]["spec"]["containers"][0])[
        "PET_RDZV_CONF"] == conf
    elastic = one(render(merge(values, {"backend": "pytorchjob"})), "PyTorchJob")["spec"]["elasticPolicy"]
    assert elastic["rdzvConf"] == [{"key": "join_timeout", "value": "3600"}, {"key": "read_timeout", "value": "3600"}]
    assert elastic["maxRestarts"] == 5
    trainer = one(render(merge(values, {"backend": "trainjob"})), "TrainJob")["spec"]["trainer"]
    assert env_of(trainer)["PET_RDZV_CONF"] == conf and env_of(trainer)["PET_MAX_RESTARTS"] == "5"
    jobset = one(render(merge(values, {"backend": "jobset"})), "JobSet")["spec"]["replicatedJobs"]
    assert [env_of(r["template"]["spec"]["template"]["spec"]["containers"][0])["PET_RDZV_CONF"] for r in jobset] == [
        f"{conf},is_host=true"]


@pytest.mark.parametrize("backend,kind", sorted(BACKENDS.items()))
def test_every_training_container_knows_its_pod_and_workload(backend, kind):
    docs = render({"backend": backend})
    envs = [env_of(t["spec"]["containers"][0]) for _, t in training_pods(docs)]
    if backend == "trainjob":
        envs = [env_of(one(docs, "TrainJob")["spec"]["trainer"])]  # the runtime's container gets it from here
    for env in envs:
        assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
        assert env["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
        assert env["POD_UID"] == {"fieldRef": {"fieldPath": "metadata.uid"}}
        assert env["TRAINING_WORKLOAD"] == f"{kind}/{RELEASE}-train"


def exit_code_rules(spec: dict) -> list[tuple[str, str, list[int]]]:
    """(action, container, exit codes) of a Job's podFailurePolicy, in order."""
    rules = [r for r in spec["podFailurePolicy"]["rules"] if "onExitCodes" in r]
    assert all(r["onExitCodes"]["operator"] == "In" for r in rules)
    return [(r["action"], r["onExitCodes"]["containerName"], r["onExitCodes"]["values"]) for r in rules]


@pytest.mark.parametrize("backend", ["job", "trainjob"])
def test_pod_failure_policy_acts_on_the_trainers_exit_codes(backend):
    """The Job (and the TrainingRuntime's Job) fails at once on a config error or divergence, replaces a preempted pod
    uncounted (143, or the DisruptionTarget condition), and counts anything else (exit 1, a stall's 124, an OOM kill).
    The codes are trainer/errors.py's; the real Job controller acting on this policy (exit 2 fails, 137 counted, an
    eviction uncounted) is tests/test_cluster_job.py, and the Trainer's runtime on a preemption
    tests/test_cluster_kubeflow.py."""
    docs = render({"backend": backend})
    if backend == "job":
        job, container = one(docs, "Job", "train")["spec"], "trainer"
    else:
        runtime = one(docs, "TrainingRuntime")["spec"]["template"]["spec"]
        job, container = runtime["replicatedJobs"][0]["template"]["spec"], "node"
        # a Job failed by its podFailurePolicy fails the JobSet; other Job failures recreate it up to maxRestarts
        assert runtime["failurePolicy"] == {"maxRestarts": 0, "restartStrategy": "BlockingRecreate", "rules": [
            {"name": "ConfigErrorOrDivergence", "action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"],
             "targetReplicatedJobs": ["node"]}]}
    assert job["template"]["spec"]["restartPolicy"] == "Never", "podFailurePolicy needs restartPolicy Never"
    assert exit_code_rules(job) == [("FailJob", container, [EXIT_CONFIG, EXIT_DIVERGED]),
                                    ("Ignore", container, [EXIT_PREEMPTED])]
    [conditions] = [r for r in job["podFailurePolicy"]["rules"] if "onPodConditions" in r]
    assert conditions == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}


@pytest.mark.parametrize("backend,nodes", [("job", 1), ("job", 4), ("jobset", 2), ("pytorchjob", 2), ("trainjob", 2)])
def test_retry_budget_scales_with_the_nodes(backend, nodes):
    docs = render(merge({"backend": backend, "gpus": 8 * nodes}, RWX if nodes > 1 else {}))
    limits = {"job": lambda: one(docs, "Job", "train")["spec"]["backoffLimit"],
              "jobset": lambda: one(docs, "JobSet")["spec"]["failurePolicy"]["maxRestarts"],
              "pytorchjob": lambda: one(docs, "PyTorchJob")["spec"]["runPolicy"]["backoffLimit"],
              "trainjob": lambda: one(docs, "TrainingRuntime")["spec"]["template"]["spec"]["replicatedJobs"][0][
                  "template"]["spec"]["backoffLimit"]}
    # a JobSet restart recreates every node at once: its budget is per gang, not x nodes (192 at 256 GPUs)
    assert limits[backend]() == (6 if backend == "jobset" else 6 * nodes)
    assert one(render({"backoffLimit": 9}), "Job", "train")["spec"]["backoffLimit"] == 9


def test_deadlines_and_ttl_reach_every_workload():
    # Large enough that Helm's float64 numbers would print as 1.2096e+06 if a template forgot to make them integers.
    day = 86400
    values = {"activeDeadlineSeconds": 14 * day, "ttlSecondsAfterFinished": 30 * day,
              "terminationGracePeriodSeconds": 1200000, "maxRestarts": 1000000}
    job = one(render(values), "Job", "train")["spec"]
    assert (job["activeDeadlineSeconds"], job["ttlSecondsAfterFinished"]) == (14 * day, 30 * day)
    assert job["template"]["spec"]["terminationGracePeriodSeconds"] == 1200000
    run_policy = one(render(merge(values, {"backend": "pytorchjob"})), "PyTorchJob")["spec"]["runPolicy"]
    assert (run_policy["activeDeadlineSeconds"], run_policy["ttlSecondsAfterFinished"]) == (14 * day, 30 * day)
    docs = render(merge(values, {"backend": "trainjob"}))
    assert one(docs, "TrainJob")["spec"]["activeDeadlineSeconds"] == 14 * day
    assert one(docs, "TrainingRuntime")["spec"]["template"]["spec"]["ttlSecondsAfterFinished"] == 30 * day
    assert env_of(one(docs, "TrainJob")["spec"]["trainer"])["PET_MAX_RESTARTS"] == "1000000"
    jobset = one(render(merge(values, {"backend": "jobset"})), "JobSet")["spec"]
    node = jobset["replicatedJobs"][0]["template"]["spec"]
    assert (jobset["ttlSecondsAfterFinished"], node["activeDeadlineSeconds"]) == (30 * day, 14 * day)
    for backend in BACKENDS:
        assert not kubernetes_problems(render(merge(values, {"backend": backend})), KUBERNETES_VERSIONS[-1])
    assert "activeDeadlineSeconds" not in one(render(), "Job", "train")["spec"]


def test_runtime_patch_manager_is_a_stable_domain_prefixed_name():
    """The Trainer's webhook requires a domain-prefixed path (IsDomainPrefixedPath); the field is immutable."""
    docs = render({"backend": "trainjob", "kubeflow": {"trainingRuntime": {"create": False}},
                   "tensorboard": {"enabled": False}})
    manager = one(docs, "TrainJob")["spec"]["runtimePatches"][0]["manager"]
    host, _, path = manager.partition("/")
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*", host) and path
    assert "0.1.0" not in manager and yaml.safe_load((CHART / "Chart.yaml").read_text())["version"] not in manager


@pytest.mark.parametrize("case", sorted(c for c in MATRIX if c.startswith("jobset")))
def test_jobset_runs_the_leader_first_with_the_c10d_rendezvous_on_it(case):
    """Node 0 is the replicated Job `leader` (<jobset>-leader-0-0 on the JobSet's Service <jobset>, which hosts the
    store and is Ready once it answers); the other nodes are `workers`, created after it (startupPolicy InOrder).
    "leader" sorts before "workers", so node 0 is rank 0."""
    values = MATRIX[case]
    docs = render(values)
    jobset = one(docs, "JobSet")
    nodes, procs = nodes_and_procs(values)
    spec = jobset["spec"]
    assert spec["network"] == {"enableDNSHostnames": True, "publishNotReadyAddresses": True}
    assert [(r["name"], r["replicas"], r["template"]["spec"]["completions"]) for r in spec["replicatedJobs"]] == [
        ("leader", 1, 1), *([("workers", 1, nodes - 1)] if nodes > 1 else [])]
    assert spec.get("startupPolicy") == ({"startupPolicyOrder": "InOrder"} if nodes > 1 else None)
    assert spec["successPolicy"] == {"operator": "All", "targetReplicatedJobs": ["leader"]}, "rank 0 done: run done"
    assert spec["failurePolicy"]["maxRestarts"] == 6 and spec["failurePolicy"]["restartStrategy"] == "BlockingRecreate"
    nnodes = f"{values['elastic']['minNodes']}:{nodes}" if values.get("elastic", {}).get("enabled") else str(nodes)
    for rjob in spec["replicatedJobs"]:
        job = rjob["template"]["spec"]
        assert (job["completionMode"], job["parallelism"]) == ("Indexed", job["completions"])
        assert job["backoffLimit"] == 0, "every counted failure goes to the JobSet's failurePolicy"
        pod = job["template"]["spec"]
        assert pod["restartPolicy"] == "Never", "else JobSet's webhook defaults OnFailure and podFailurePolicy is refused"
        assert "subdomain" not in pod, "the JobSet controller sets it"
        container = pod["containers"][0]
        assert container["name"] == "trainer" and container["command"] == ["ddpm", "launch"]
        env = env_of(container)
        assert env["PET_NNODES"] == nnodes and env["PET_NPROC_PER_NODE"] == str(procs)
        assert env["PET_RDZV_BACKEND"] == "c10d"
        assert env["PET_RDZV_ENDPOINT"] == f"{RELEASE}-train-leader-0-0.{RELEASE}-train:29500"
        leader = rjob["name"] == "leader"
        assert env["PET_RDZV_CONF"].endswith(f",is_host={str(leader).lower()}"), "the store is the leader's"
        assert ("readinessProbe" in container) == leader
        if leader:
            assert container["readinessProbe"]["tcpSocket"] == {"port": "rendezvous"}
        assert env["TRAINING_WORKLOAD"] == f"JobSet/{RELEASE}-train"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == procs
        # `ddpm status` finds the JobSet by the chart's labels; its child Jobs must not look like more workloads.
        assert "app.kubernetes.io/component" not in rjob["template"].get("metadata", {}).get("labels", {})
    assert jobset["metadata"]["labels"]["app.kubernetes.io/component"] == "train"


def test_jobset_has_no_replicated_job_that_waits_for_training():
    """Kueue's waitForPodsReady counts every replicated Job's pods: a push Job created only after training (0.3's
    in-JobSet push) never became Ready. The push is rank 0's, or the separate push Job beside the JobSet."""
    for values in (PUSH_ON, merge(PUSH_JOB, RWX)):
        docs = render(merge(values, {"backend": "jobset", "gpus": 16}, RWX))
        rjobs = one(docs, "JobSet")["spec"]["replicatedJobs"]
        assert [r["name"] for r in rjobs] == ["leader", "workers"]
        assert not [r for r in rjobs if "dependsOn" in r]
    assert one(render(merge(PUSH_JOB, RWX, {"backend": "jobset"})), "Job", "push")


def test_jobset_exclusive_placement_is_per_topology_domain():
    docs = render(merge(RWX, {"backend": "jobset", "gpus": 16,
                              "jobset": {"exclusiveTopology": "topology.kubernetes.io/zone"}}))
    for node in one(docs, "JobSet")["spec"]["replicatedJobs"]:
        assert node["template"]["metadata"]["annotations"] == {
            "alpha.jobset.sigs.k8s.io/exclusive-topology": "topology.kubernetes.io/zone"}
    assert "metadata" not in one(render({"backend": "jobset"}), "JobSet")["spec"]["replicatedJobs"][0]["template"]


def job_controller(spec: dict, container: str, event) -> tuple[str, str] | None:
    """What the Job controller does with one failed pod of `spec`: None when it is replaced without counting, else
    the Job's Failed condition (reason, message) once the failure ends the Job. Ported from kubernetes
    pkg/controller/job/pod_failure_policy.go matchPodFailurePolicy (its messages verbatim) and job_controller.go
    (a counted failure past backoffLimit: BackoffLimitExceeded)."""
    namespace, pod = "vision", f"{RELEASE}-train-node-0-1-x7k2p"
    for index, rule in enumerate(spec["podFailurePolicy"]["rules"]):
        codes = rule.get("onExitCodes")
        if codes and isinstance(event, int) and codes.get("containerName", container) == container \
                and (event in codes["values"]) == (codes["operator"] == "In"):
            if rule["action"] == "FailJob":
                return "PodFailurePolicy", (f"Container {container} for pod {namespace}/{pod} failed with exit code "
                                            f"{event} matching FailJob rule at index {index}")
            return None if rule["action"] == "Ignore" else _counted(spec)
        for pattern in rule.get("onPodConditions", []):
            if event == pattern["type"] and pattern.get("status", "True") == "True":
                if rule["action"] == "FailJob":
                    return "PodFailurePolicy", (f"Pod {namespace}/{pod} has condition {event} matching FailJob rule "
                                                f"at index {index}")
                return None if rule["action"] == "Ignore" else _counted(spec)
    return _counted(spec)


def _counted(spec: dict) -> tuple[str, str] | None:
    return ("BackoffLimitExceeded", "Job has reached the specified backoff limit") if spec["backoffLimit"] == 0 else None


def jobset_action(jobset: dict, replicated_job: str, reason: str, message: str) -> str:
    """The JobSet controller's choice for a failed child Job: the first rule whose reasons, message patterns (RE2;
    these patterns mean the same in Python's re) and target replicated Jobs match, else RestartJobSet
    (jobset v0.10.0 pkg/controllers/failure_policy.go ruleIsApplicable, defaultFailurePolicyRuleAction)."""
    for rule in jobset["spec"]["failurePolicy"].get("rules", []):
        if rule.get("onJobFailureReasons") and reason not in rule["onJobFailureReasons"]:
            continue
        if rule.get("onJobFailureMessagePatterns") and not any(re.search(p, message)
                                                               for p in rule["onJobFailureMessagePatterns"]):
            continue
        if rule.get("targetReplicatedJobs") and replicated_job not in rule["targetReplicatedJobs"]:
            continue
        return rule["action"]
    return "RestartJobSet"


def jobset_outcome(jobset: dict, event) -> str:
    """What a failed pod of the leader (node 0) does to the run."""
    leader = jobset["spec"]["replicatedJobs"][0]
    job = leader["template"]["spec"]
    failure = job_controller(job, job["template"]["spec"]["containers"][0]["name"], event)
    if failure is None:
        return "not counted"  # the Job replaced the pod itself
    return {"FailJobSet": "fails the run", "RestartJobSet": "counted",
            "RestartJobSetAndIgnoreMaxRestarts": "not counted"}[jobset_action(jobset, leader["name"], *failure)]


# What no cluster test shows yet, through ports of the two controllers' decisions (a preemption of a fixed-size gang,
# recreated uncounted, is tests/test_cluster_jobset.py on the real JobSet controller): a config error or divergence
# fails the JobSet at once, a crash is a counted gang restart, and an elastic run's preempted pod is replaced alone.
JOBSET_FAILURES = [(EXIT_CONFIG, "fails the run"), (EXIT_DIVERGED, "fails the run"), (EXIT_FAILED, "counted"),
                   (137, "counted"), (EXIT_PREEMPTED, "not counted"), ("DisruptionTarget", "not counted")]


@pytest.mark.parametrize("elastic,event,expected", [(False, e, x) for e, x in JOBSET_FAILURES if x != "not counted"]
                         + [(True, e, x) for e, x in JOBSET_FAILURES])
def test_failure_table_jobset(elastic, event, expected):
    values = merge(ELASTIC, {"backend": "jobset"}) if elastic else {"backend": "jobset"}
    assert jobset_outcome(one(render(values), "JobSet"), event) == expected


def test_jobset_without_message_patterns_never_loops_on_a_config_error():
    """A JobSet older than 0.10 drops onJobFailureMessagePatterns (structural pruning): the first rule then fails the
    run on any podFailurePolicy failure. A preemption fails the run instead of restarting it; exit 2 never loops."""
    jobset = one(render({"backend": "jobset"}), "JobSet")
    for rule in jobset["spec"]["failurePolicy"]["rules"]:
        rule.pop("onJobFailureMessagePatterns", None)
    assert jobset_outcome(jobset, EXIT_CONFIG) == jobset_outcome(jobset, EXIT_DIVERGED) == "fails the run"
    assert jobset_outcome(jobset, EXIT_PREEMPTED) == "fails the run"
    assert jobset_outcome(jobset, EXIT_FAILED) == "counted"


def test_jobset_deadline_fails_the_run_and_its_rules_have_valid_names():
    jobset = one(render({"backend": "jobset", "activeDeadlineSeconds": 3600}), "JobSet")
    assert jobset_action(jobset, "leader", "DeadlineExceeded", "Job was active longer than specified deadline") == "FailJobSet"
    names = [r["name"] for r in jobset["spec"]["failurePolicy"]["rules"]]
    assert len(set(names)) == len(names) and all(re.fullmatch(r"[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?", n) for n in names)


@pytest.mark.parametrize("backend", ["job", "jobset", "pytorchjob"])
def test_elastic_runs_on_min_to_max_nodes_with_a_global_batch_every_count_divides(backend):
    values = merge(ELASTIC, {"backend": backend})
    docs = render(values)
    config = yaml.safe_load(one(docs, "ConfigMap")["data"]["config.yaml"])
    assert config["global_batch_size"] == 16 * 3 * 4 * 8, "train_batch_size x accumulation x maxNodes x procs"
    for nodes in range(2, 5):  # what the trainer will compute at every start: a whole accumulation
        assert config["global_batch_size"] % (16 * nodes * 8) == 0
    if backend == "pytorchjob":
        job = one(docs, "PyTorchJob")["spec"]
        assert (job["elasticPolicy"]["minReplicas"], job["elasticPolicy"]["maxReplicas"]) == (2, 4)
        assert job["pytorchReplicaSpecs"]["Worker"]["replicas"] == 4
        return
    if backend == "jobset":
        jobset = one(docs, "JobSet")["spec"]
        # the leader (rank 0) completing completes the JobSet; the workers still around are then removed
        assert jobset["successPolicy"] == {"operator": "All", "targetReplicatedJobs": ["leader"]}
        assert [r["template"]["spec"]["completions"] for r in jobset["replicatedJobs"]] == [1, 3]
        for rjob in jobset["replicatedJobs"]:
            job = rjob["template"]["spec"]
            # elastic: a preempted pod is replaced alone, the others go on (no gang restart)
            assert [r["action"] for r in job["podFailurePolicy"]["rules"]] == ["FailJob", "Ignore", "Ignore"]
            assert env_of(job["template"]["spec"]["containers"][0])["PET_NNODES"] == "2:4"
        return
    job = one(docs, "Job", "train")["spec"]
    assert job["completions"] == job["parallelism"] == 4
    assert env_of(job["template"]["spec"]["containers"][0])["PET_NNODES"] == "2:4"
    # pod 0 (rank 0) succeeding completes the Job; a pod still pending then is removed instead of failing it
    assert job["successPolicy"] == {"rules": [{"succeededIndexes": "0"}]}


def test_fixed_size_runs_get_no_global_batch_or_success_policy():
    docs = render(merge({"gpus": 32}, RWX))
    assert "global_batch_size" not in yaml.safe_load(one(docs, "ConfigMap")["data"]["config.yaml"])
    job = one(docs, "Job", "train")["spec"]
    assert "successPolicy" not in job and env_of(job["template"]["spec"]["containers"][0])["PET_NNODES"] == "4"


def test_elastic_refuses_node_counts_that_cannot_split_the_global_batch():
    error = render_error(merge(ELASTIC, {"config": {"gradient_accumulation_steps": 1}}))
    assert ("config.global_batch_size=512 cannot be split into whole micro-batches of config.train_batch_size=16 "
            "over 3 node(s) (elastic: any count from 2 to 4) with 8 process(es) each (the trainer would exit 2): "
            "set config.gradient_accumulation_steps=3 (a global batch of 16 x 3 x 4 x 8 = 1536)") in error
    # a lower bound whose counts all divide is offered when there is one
    error = render_error(merge(RWX, {"gpus": 64, "elastic": {"enabled": True, "minNodes": 2}}))
    assert "over 3, 5, 6, 7 node(s)" in error and "or set elastic.minNodes=" not in error
    error = render_error(merge(RWX, {"gpus": 40, "elastic": {"enabled": True, "minNodes": 2},
                                     "config": {"gradient_accumulation_steps": 4}}))
    assert "over 3 node(s)" in error
    assert "set config.gradient_accumulation_steps=12 (a global batch of 16 x 12 x 5 x 8 = 7680), or set " \
           "elastic.minNodes=4" in error


def test_a_global_batch_the_user_sets_is_kept_and_checked():
    """config.global_batch_size is a TrainingConfig field once the trainer has it (values.schema.json's `config` is
    generated from TrainingConfig); the chart's own checks are tested here without the schema."""
    def template(values: dict) -> subprocess.CompletedProcess:
        return run_helm("template", RELEASE, str(CHART), "--skip-schema-validation", *values_args(values))

    good = template(merge(ELASTIC, {"config": {"global_batch_size": 3072}}))
    assert good.returncode == 0, good.stderr
    config = yaml.safe_load(next(d for d in yaml.safe_load_all(good.stdout) if d and d["kind"] == "ConfigMap")
                            ["data"]["config.yaml"])
    assert config["global_batch_size"] == 3072
    bad = template(merge(ELASTIC, {"config": {"global_batch_size": 1000}}))
    assert "set config.global_batch_size to a multiple of 1536 = train_batch_size 16 x 8 processes per node x 12 " \
           "(e.g. 1536)" in bad.stderr
    fixed = template(merge(RWX, {"gpus": 16, "config": {"global_batch_size": 100}}))
    assert "config.global_batch_size=100 cannot be split into whole micro-batches of config.train_batch_size=16 " \
           "over 2 node(s) with 8 process(es) each" in fixed.stderr
