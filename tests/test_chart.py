"""The Helm chart in helm/, proven with real tools: the real helm binary, the strict Kubernetes JSON schemas of every
minor in the chart's kubeVersion range (kubernetes-validate), the Kubeflow SDKs' own PyTorchJob, TrainJob and
TrainingRuntime models and kubeflow-trainer-api's JobSet models, and the trainer's own list of API calls
(trainer/kube.py role_rules) for the Roles. Offline; no cluster. docs/KUBERNETES.md states what each test here proves.

helm is found on PATH (`make test` puts .tools/bin first); without it these tests fail rather than skip.
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm"
RELEASE = "ddpm"
PREEMPTED, CONFIG_ERROR, DIVERGED, UNEXPECTED = 143, 2, 3, 1  # the trainer's exit codes (README "Exit codes")
BACKEND_APIS = {  # what --api-versions must announce for each backend (helm template has no cluster to ask)
    "job": [],
    "jobset": ["jobset.x-k8s.io/v1alpha2/JobSet"],
    "pytorchjob": ["kubeflow.org/v1/PyTorchJob"],
    "trainjob": ["trainer.kubeflow.org/v1alpha1/TrainJob", "trainer.kubeflow.org/v1alpha1/TrainingRuntime"],
}
RWX = {"storage": {"accessModes": ["ReadWriteMany"], "storageClass": "standard-rwx"}}
BACKENDS = {"job": "Job", "jobset": "JobSet", "pytorchjob": "PyTorchJob", "trainjob": "TrainJob"}  # backend -> kind


def kubernetes_minors() -> list[str]:
    """The newest schema of every minor from the chart's kubeVersion floor to the newest kubernetes-validate has."""
    floor = re.search(r">=\s*1\.(\d+)", yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"]).group(1)
    newest: dict[int, str] = {}
    for version in kubernetes_validate.utils.all_versions():
        major, minor, _ = (int(p) for p in version.split("."))
        if major == 1 and minor >= int(floor):
            newest[minor] = max(newest.get(minor, version), version, key=lambda v: tuple(map(int, v.split("."))))
    return [newest[m] for m in sorted(newest)]


KUBERNETES_VERSIONS = kubernetes_minors()


def helm_binary() -> str:
    helm = shutil.which("helm")
    if helm is None:
        pytest.fail("helm is not on PATH: run `make .tools/bin/helm` and put .tools/bin on PATH (`make test` does)")
    return helm


def run_helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm_binary(), *args], capture_output=True, text=True, timeout=60)


def values_args(values: dict, tmp: Path | None = None) -> list[str]:
    """Values go in as a file (JSON is YAML), so types are exactly what the test wrote."""
    if not values:
        return []
    text = json.dumps(values)
    path = Path(tmp or "/tmp") / f"values-{abs(hash(text))}.json"
    path.write_text(text)
    return ["--values", str(path)]


def api_args(values: dict) -> list[str]:
    return [arg for api in BACKEND_APIS.get(values.get("backend", "job"), []) for arg in ("--api-versions", api)]


@functools.lru_cache(maxsize=None)
def _render(values_json: str, apis: bool) -> tuple[dict, ...]:
    values = json.loads(values_json)
    result = run_helm("template", RELEASE, str(CHART), *values_args(values), *(api_args(values) if apis else []))
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def render(values: dict | None = None, apis: bool = True) -> list[dict]:
    """The chart's objects; the backend's Kubeflow APIs are announced unless apis=False. Rendered once per values."""
    return copy.deepcopy(list(_render(json.dumps(values or {}, sort_keys=True), apis)))


def render_error(values: dict, apis: bool = True) -> str:
    result = run_helm("template", RELEASE, str(CHART), *values_args(values), *(api_args(values) if apis else []))
    assert result.returncode != 0, "expected the chart to refuse these values"
    return result.stderr


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str, component: str | None = None) -> dict:
    found = [d for d in by_kind(docs, kind)
             if component is None or d["metadata"]["labels"].get("app.kubernetes.io/component") == component]
    assert len(found) == 1, f"expected one {kind} {component or ''}, got {len(found)}"
    return found[0]


def merge(*parts: dict) -> dict:
    out: dict = {}
    for part in parts:
        for key, value in part.items():
            out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# ---- the matrix -------------------------------------------------------------------------------------------------

PUSH_ON = {"push": {"enabled": True, "tokenSecret": "hf-token"}, "config": {"hub_model_id": "me/ddpm-butterflies"}}
TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
BUSY = {  # the values people change: resources, scheduling, env, identity, an existing claim, queueing
    "storage": {"existingClaim": "shared-data", "accessModes": ["ReadWriteMany"]},
    "resources": {"requests": {"cpu": "16", "memory": "96Gi"}, "limits": {"memory": "128Gi"}},
    "tolerations": [TOLERATION],
    "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["a"]}]}]}}},
    "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                                   "whenUnsatisfiable": "ScheduleAnyway",
                                   "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "train"}}}],
    "imagePullSecrets": [{"name": "regcred"}],
    "extraEnv": [{"name": "NCCL_DEBUG", "value": "INFO"}],
    "envFrom": [{"configMapRef": {"name": "nccl-settings"}}],
    "extraVolumes": [{"name": "datasets", "persistentVolumeClaim": {"claimName": "datasets", "readOnly": True}}],
    "extraVolumeMounts": [{"name": "datasets", "mountPath": "/datasets", "readOnly": True}],
    "initContainers": [{"name": "warm-cache", "image": "busybox:1.37.0", "command": ["true"],
                        "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True,
                                            "capabilities": {"drop": ["ALL"]},
                                            "seccompProfile": {"type": "RuntimeDefault"}}}],
    "podAnnotations": {"example.com/team": "vision"},
    "podLabels": {"example.com/cost-center": "research"},
    "queueName": "gpu-queue",
    "workloadPriorityClassName": "research",
    "jobLabels": {"example.com/team": "vision"},
    "jobAnnotations": {"example.com/owner": "vision-team"},
    "serviceAccount": {"annotations": {"iam.gke.io/gcp-service-account": "ddpm@p.iam.gserviceaccount.com"}},
    "runtimeClassName": "nvidia",
    "priorityClassName": "training",
    "activeDeadlineSeconds": 604800,
    "ttlSecondsAfterFinished": 86400,
    "shm": {"sizeLimit": "32Gi"},
    "tensorboard": {"image": {"repository": "ghcr.io/example/ddpm-tensorboard"}},
    "config": {"train_batch_size": 32, "learning_rate": "3e-4", "dataset_name": "huggan/smithsonian_butterflies_subset"},
}


# TensorBoard and the push as pods of their own, which mount the volume themselves: ReadWriteMany storage only.
OWN_PODS = {"tensorboard": {"mode": "deployment"}, "push": {"mode": "job"}}
PUSH_JOB = merge(PUSH_ON, OWN_PODS)


def case_values(backend: str, gpus: int, push: bool, busy: bool, stock: bool = False) -> dict:
    """On a single-node volume the defaults (TensorBoard a sidecar, rank 0 pushes); on shared storage (several
    nodes, BUSY's existing ReadWriteMany claim) a push is the push Job and TensorBoard a Deployment. The stock
    TrainJob runtime cannot take the sidecar: there TensorBoard is always a Deployment, on shared storage."""
    shared = gpus > 8 or busy or stock
    return merge(
        {"backend": backend, "gpus": gpus}, RWX if shared and not busy else {},
        PUSH_ON if push else {}, OWN_PODS if shared and (push or stock) else {}, BUSY if busy else {},
        {"kubeflow": {"trainingRuntime": {"create": False}}} if stock else {},
    )


MATRIX = {
    f"{backend}-gpus{gpus}-push{'On' if push else 'Off'}-{'busy' if busy else 'plain'}": case_values(backend, gpus, push, busy)
    for backend, gpus, push, busy in itertools.product(["job", "pytorchjob", "trainjob"], [1, 8, 16], [False, True], [False, True])
}
# The JobSet shares the Job's pod spec and push pod: 1 and 2 nodes, each with and without the push and the busy values.
MATRIX.update({
    f"jobset-gpus{gpus}-push{'On' if push else 'Off'}-{'busy' if busy else 'plain'}": case_values("jobset", gpus, push, busy)
    for gpus, push, busy in [(1, False, False), (1, True, True), (16, True, False), (16, False, True)]
})
# Elastic (4 nodes, down to 2: accumulation 3 keeps a global batch every count divides) and queued, per backend.
ELASTIC = merge({"gpus": 32, "elastic": {"enabled": True, "minNodes": 2}, "config": {"gradient_accumulation_steps": 3}}, RWX)
for _backend in ("job", "jobset", "pytorchjob"):
    MATRIX[f"{_backend}-elastic-queued"] = merge(ELASTIC, PUSH_JOB, {"backend": _backend, "queueName": "gpu-queue"})
# The stock ClusterTrainingRuntime takes only what runtimePatches allow (no priority, runtime class, spread, ...).
STOCK_ALLOWED = {k: v for k, v in BUSY.items() if k not in (
    "priorityClassName", "runtimeClassName", "topologySpreadConstraints", "initContainers", "envFrom",
    "ttlSecondsAfterFinished")}
for _gpus, _push in itertools.product([1, 16], [False, True]):
    MATRIX[f"trainjob-stock-gpus{_gpus}-push{'On' if _push else 'Off'}"] = merge(
        case_values("trainjob", _gpus, _push, False, stock=True), STOCK_ALLOWED if _gpus > 8 else {})


def nodes_and_procs(values: dict) -> tuple[int, int]:
    gpus, per_node = values.get("gpus", 1), values.get("gpusPerNode", 8)
    return (gpus // per_node, per_node) if gpus > per_node else (1, gpus)


@pytest.mark.parametrize("case", sorted(MATRIX))
def test_helm_lint(case, tmp_path):
    # helm lint cannot announce API versions: the API check is switched off for it (and tested on its own below).
    values = merge(MATRIX[case], {"checkAPIVersions": False})
    result = run_helm("lint", "--strict", str(CHART), *values_args(values, tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr


# ---- every rendered object against the strict schemas of every Kubernetes minor, and the operators' models --------

def pod_templates(doc: dict) -> list[tuple[str, dict]]:
    """(where, PodTemplateSpec-shaped dict) for every pod an object creates."""
    kind = doc["kind"]
    if kind in ("Job", "Deployment"):
        return [(f"{kind}/{doc['metadata']['name']}", doc["spec"]["template"])]
    if kind == "Pod":
        return [(f"Pod/{doc['metadata']['name']}", {"metadata": doc["metadata"], "spec": doc["spec"]})]
    if kind == "PyTorchJob":
        return [(f"PyTorchJob/{role}", spec["template"]) for role, spec in doc["spec"]["pytorchReplicaSpecs"].items()]
    if kind == "TrainingRuntime":
        return [(f"TrainingRuntime/{rjob['name']}", rjob["template"]["spec"]["template"])
                for rjob in doc["spec"]["template"]["spec"]["replicatedJobs"]]
    if kind == "JobSet":
        return [(f"JobSet/{rjob['name']}", rjob["template"]["spec"]["template"]) for rjob in doc["spec"]["replicatedJobs"]]
    if kind == "TrainJob":
        found = []
        for patch in doc["spec"].get("runtimePatches", []):
            for rjob in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
                found.append((f"TrainJob/{rjob['name']}", rjob["template"]["spec"]["template"]))
        return found
    return []


def full_pod_templates(docs: list[dict]) -> list[tuple[str, dict]]:
    """Pods whose whole spec the chart writes (the stock runtime's patch is only a part of a pod)."""
    return [(w, t) for d in docs if d["kind"] != "TrainJob" for w, t in pod_templates(d)]


def training_pods(docs: list[dict]) -> list[tuple[str, dict]]:
    return [(w, t) for d in docs if d["kind"] in ("Job", "JobSet", "PyTorchJob", "TrainingRuntime", "TrainJob")
            for w, t in pod_templates(d) if t["metadata"]["labels"].get("app.kubernetes.io/component") == "train"]


def validate_kubernetes(doc: dict, version: str) -> None:
    kubernetes_validate.validate(doc, version, strict=True)


def kubernetes_problems(docs: list[dict], version: str) -> list[str]:
    problems = []
    for doc in docs:
        if doc["kind"] == "JobSet":  # its Jobs are whole batch/v1 JobTemplateSpecs: checked as the Jobs they become
            checks = [(f"JobSet/{rjob['name']}/Job", {"apiVersion": "batch/v1", "kind": "Job",
                                                     "metadata": {"name": "check", **rjob["template"].get("metadata", {})},
                                                     "spec": rjob["template"]["spec"]})
                      for rjob in doc["spec"]["replicatedJobs"]]
        elif doc["apiVersion"].startswith(("kubeflow.org/", "trainer.kubeflow.org/")):
            # CRDs: their pod templates still get the full Kubernetes check, as PodTemplates.
            checks = [(where, {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": t})
                      for where, t in pod_templates(doc)]
            if doc["kind"] == "TrainingRuntime":  # and so does its Job (backoffLimit, podFailurePolicy)
                for rjob in doc["spec"]["template"]["spec"]["replicatedJobs"]:
                    spec = copy.deepcopy(rjob["template"]["spec"])
                    spec.update(completions=1, parallelism=1, completionMode="Indexed")
                    checks.append((f"TrainingRuntime/{rjob['name']}/Job", {"apiVersion": "batch/v1", "kind": "Job",
                                                                          "metadata": {"name": "check"}, "spec": spec}))
        else:
            checks = [(f"{doc['kind']}/{doc['metadata']['name']}", doc)]
        for where, obj in checks:
            try:
                validate_kubernetes(obj, version)
            except kubernetes_validate.ValidationError as e:
                problems.append(f"{version} {where}: {e.message} at {list(e.absolute_path)}")
    return problems


def test_kubernetes_versions_cover_the_chart_range():
    minors = [int(v.split(".")[1]) for v in KUBERNETES_VERSIONS]
    assert minors[0] == 31 and minors == list(range(31, minors[-1] + 1)) and minors[-1] >= 37, KUBERNETES_VERSIONS


@pytest.mark.parametrize("case", sorted(MATRIX))
def test_every_object_validates_strictly_on_every_minor(case):
    docs = render(MATRIX[case])
    problems = [p for version in KUBERNETES_VERSIONS for p in kubernetes_problems(docs, version)]
    assert not problems, "\n".join(problems)
    for doc in docs:  # the Kubeflow objects against their SDKs' models, too
        if doc["kind"] == "PyTorchJob":
            check_pytorchjob(doc)
        elif doc["kind"] == "TrainJob":
            check_trainjob(doc)
        elif doc["kind"] == "TrainingRuntime":
            check_training_runtime(doc)
        elif doc["kind"] == "JobSet":
            check_jobset(doc)


def test_strict_kubernetes_validation_catches_a_misspelt_field():
    job = one(render(), "Job", "train")
    job["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_kubernetes(job, KUBERNETES_VERSIONS[0])


def test_pod_failure_policy_validates_on_the_oldest_minor_only_with_a_condition_status():
    """1.31-1.34 require `status` in onPodConditions; the chart sets it (the issue's 1.31 failure)."""
    job = one(render(), "Job", "train")
    del job["spec"]["podFailurePolicy"]["rules"][2]["onPodConditions"][0]["status"]
    with pytest.raises(kubernetes_validate.ValidationError, match="status"):
        validate_kubernetes(job, "1.31.0")


# ---- Kubeflow objects against their SDKs' models ----------------------------------------------------------------

def _leaves(node, path=()):
    """(path, value) of every scalar; numbers canonicalised, since SDKs turn quantities 8 into "8" or "8.0"."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _leaves(value, (*path, index))
    else:
        text = str(node)
        try:
            text = repr(float(text)) if not isinstance(node, bool) else text
        except ValueError:
            pass
        yield path, text


def assert_round_trip(original: dict, back: dict, model: str) -> None:
    """The models ignore keys they do not know; a key lost in the round trip is a field the model lacks."""
    lost = set(_leaves(original)) - set(_leaves(back))
    added = set(_leaves(back)) - set(_leaves(original))
    assert not lost and not added, (
        f"{model} does not round-trip: unknown or mistyped fields {sorted(lost)}; changed {sorted(added)}"
    )


def check_pytorchjob(doc: dict) -> None:
    """kubeflow-training's OpenAPI client: deserialise as the SDK does for API responses, serialise back."""
    from kubeflow.training import ApiClient

    client = ApiClient()

    class Response:
        data = json.dumps(doc)

    job = client.deserialize(Response, "KubeflowOrgV1PyTorchJob")  # raises ValueError on a missing required field
    assert type(job).__name__ == "KubeflowOrgV1PyTorchJob"
    assert_round_trip(doc, client.sanitize_for_serialization(job), "KubeflowOrgV1PyTorchJob")


def check_trainjob(doc: dict) -> None:
    """kubeflow-trainer-api's pydantic models: from_dict validates types (StrictInt, StrictStr...), to_dict back."""
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    job = TrainerV1alpha1TrainJob.from_dict(doc)  # raises pydantic.ValidationError on a wrong type
    assert_round_trip(doc, job.to_dict(), "TrainerV1alpha1TrainJob")


def check_training_runtime(doc: dict) -> None:
    """The TrainingRuntime, JobSet template (JobsetV1alpha2*) included, against kubeflow-trainer-api's models."""
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainingRuntime

    runtime = TrainerV1alpha1TrainingRuntime.from_dict(doc)
    assert_round_trip(doc, runtime.to_dict(), "TrainerV1alpha1TrainingRuntime")


def check_jobset(doc: dict) -> None:
    """The JobSet against kubeflow-trainer-api's JobsetV1alpha2JobSet (the JobSet API the Trainer ships)."""
    from kubeflow_trainer_api.models import JobsetV1alpha2JobSet

    jobset = JobsetV1alpha2JobSet.from_dict(doc)
    assert_round_trip(doc, jobset.to_dict(), "JobsetV1alpha2JobSet")


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


def test_kubeflow_checks_catch_a_misspelt_field():
    pytorchjob = one(render(case_values("pytorchjob", 16, False, False)), "PyTorchJob")
    bad = copy.deepcopy(pytorchjob)
    bad["spec"]["nprocsPerNode"] = bad["spec"].pop("nprocPerNode")
    with pytest.raises(AssertionError, match="nprocsPerNode"):
        check_pytorchjob(bad)
    bad = copy.deepcopy(pytorchjob)
    bad["spec"]["elasticPolicy"]["rdzvEndpoint"] = "x:1"
    with pytest.raises(AssertionError, match="rdzvEndpoint"):
        check_pytorchjob(bad)

    docs = render(case_values("trainjob", 16, False, False))
    bad = one(docs, "TrainJob")
    bad["spec"]["trainer"]["numNode"] = bad["spec"]["trainer"].pop("numNodes")
    with pytest.raises(AssertionError, match="numNode"):
        check_trainjob(bad)
    bad = one(docs, "TrainJob")
    bad["spec"]["trainer"]["numNodes"] = "2"
    with pytest.raises(Exception, match="numNodes|num_nodes"):
        check_trainjob(bad)
    bad = one(docs, "TrainingRuntime")
    bad["spec"]["template"]["spec"]["failurePolicy"]["maxRestart"] = 1
    with pytest.raises(AssertionError, match="maxRestart"):
        check_training_runtime(bad)


# ---- the rendezvous and the pods' identity --------------------------------------------------------------------

def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


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


@pytest.mark.parametrize("case", sorted(MATRIX))
def test_no_env_looks_like_trainer_config(case):
    """The trainer rejects unknown DDPM_* variables: the chart sets only DDPM_CONFIG_FILE."""
    docs = render(MATRIX[case])
    containers = [c for _, t in full_pod_templates(docs) for c in t["spec"]["containers"] + t["spec"].get("initContainers", [])]
    containers += [d["spec"]["trainer"] for d in by_kind(docs, "TrainJob")]
    names = {e["name"] for c in containers for e in c.get("env", [])}
    assert {n for n in names if n.startswith("DDPM_")} <= {"DDPM_CONFIG_FILE"}


# ---- failures per backend: the rendered settings, run through each controller's decision -----------------------

def job_policy_action(spec: dict, container: str, exit_code: int | None = None, condition: str | None = None) -> str:
    """What the Job controller does with a failed pod: the first matching podFailurePolicy rule, else Count."""
    for rule in spec["podFailurePolicy"]["rules"]:
        codes = rule.get("onExitCodes")
        if codes and exit_code is not None and codes.get("containerName", container) == container:
            if (exit_code in codes["values"]) == (codes["operator"] == "In"):
                return rule["action"]
        for pattern in rule.get("onPodConditions", []):
            if condition == pattern["type"] and pattern.get("status", "True") == "True":
                return rule["action"]
    return "Count"


def operator_decision(replica: dict, exit_code: int) -> str:
    """training-operator release-1.9 common/pod.go: ExitCode restarts 128-255 (IsRetryableExitCode), fails 1-127."""
    if replica["restartPolicy"] == "ExitCode":
        return "Recreate" if exit_code >= 128 else "FailJob"
    return "Recreate" if replica["restartPolicy"] in ("OnFailure", "Always") else "Count"


# (exit code or condition, what docs/KUBERNETES.md's table says happens)
FAILURES = [
    (UNEXPECTED, "counted"), (CONFIG_ERROR, "fails the run"), (DIVERGED, "fails the run"),
    (PREEMPTED, "not counted"), (137, "counted"), ("DisruptionTarget", "not counted"),
]


@pytest.mark.parametrize("event,expected", FAILURES)
def test_failure_table_job(event, expected):
    spec = one(render(), "Job", "train")["spec"]
    action = job_policy_action(spec, "trainer", **({"condition": event} if isinstance(event, str) else {"exit_code": event}))
    assert {"Count": "counted", "FailJob": "fails the run", "Ignore": "not counted"}[action] == expected


@pytest.mark.parametrize("event,expected", FAILURES)
def test_failure_table_trainjob(event, expected):
    """The runtime's Job decides as the `job` backend; a Job failed by its podFailurePolicy fails the JobSet."""
    runtime = one(render({"backend": "trainjob"}), "TrainingRuntime")
    rjob = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]
    action = job_policy_action(rjob, "node", **({"condition": event} if isinstance(event, str) else {"exit_code": event}))
    assert {"Count": "counted", "FailJob": "fails the run", "Ignore": "not counted"}[action] == expected
    assert rjob["template"]["spec"]["restartPolicy"] == "Never", "podFailurePolicy needs restartPolicy Never"
    policy = runtime["spec"]["template"]["spec"]["failurePolicy"]
    [rule] = policy["rules"]
    assert rule["action"] == "FailJobSet" and rule["onJobFailureReasons"] == ["PodFailurePolicy"]
    assert policy["restartStrategy"] == "BlockingRecreate" and policy["maxRestarts"] == 0


@pytest.mark.parametrize("event,expected", [(e, x) for e, x in FAILURES if not isinstance(e, str)])
def test_failure_table_pytorchjob(event, expected):
    """ExitCode: 1-127 permanent, 128-255 recreated and never counted (docs/KUBERNETES.md)."""
    worker = one(render({"backend": "pytorchjob"}), "PyTorchJob")["spec"]["pytorchReplicaSpecs"]["Worker"]
    decision = operator_decision(worker, event)
    if event in (CONFIG_ERROR, DIVERGED, UNEXPECTED):
        assert decision == "FailJob"
    else:
        assert decision == "Recreate"


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


def test_config_map_carries_the_config_and_the_per_release_paths():
    docs = render(merge(BUSY, {"config": {"max_train_steps": 1000, "mixed_precision": "bf16"}}))
    config = yaml.safe_load(one(docs, "ConfigMap")["data"]["config.yaml"])
    assert config["output_dir"] == f"/data/{RELEASE}/output"
    assert config["data_cache_dir"] == f"/data/{RELEASE}/data-cache", "outside the run: reused by the next one"
    assert config["train_batch_size"] == 32 and config["max_train_steps"] == 1000
    assert float(config["learning_rate"]) == 3e-4
    pod = one(docs, "Job", "train")["spec"]["template"]["spec"]
    env = env_of(pod["containers"][0])
    assert env["DDPM_CONFIG_FILE"] == "/etc/ddpm/config.yaml"
    assert env["HF_HOME"] == f"/data/{RELEASE}/hf-cache"
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/etc/ddpm"]["name"]]["configMap"]["name"] == one(docs, "ConfigMap")["metadata"]["name"]
    assert volumes[mounts["/data"]["name"]]["persistentVolumeClaim"]["claimName"] == "shared-data"
    shm = volumes[mounts["/dev/shm"]["name"]]["emptyDir"]
    assert shm == {"medium": "Memory", "sizeLimit": "32Gi"}
    assert not by_kind(docs, "PersistentVolumeClaim"), "existingClaim: the chart creates no claim"


def test_every_trainer_field_can_be_set_from_values():
    sys.path.insert(0, str(ROOT))
    from trainer.config import TrainingConfig

    schema = json.loads((CHART / "values.schema.json").read_text())
    assert set(schema["properties"]["config"]["properties"]) == set(TrainingConfig.model_fields)
    result = run_helm("template", RELEASE, str(CHART), "--set", "config.train_batch_size=32",
                      "--set", "config.learning_rate=1e-4", "--set", "config.dataset_name=huggan/x",
                      "--show-only", "templates/configmap.yaml")
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(yaml.safe_load(result.stdout)["data"]["config.yaml"])
    assert TrainingConfig(**config).train_batch_size == 32
    assert TrainingConfig(**config).learning_rate == 1e-4


def test_values_schema_is_in_sync_with_the_trainer_config():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "chart_schema.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_termination_grace_covers_the_preemption_checkpoint():
    job = one(render({"config": {"preemption_grace_seconds": 200}, "terminationGracePeriodSeconds": 260}), "Job", "train")
    assert job["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 260
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    sys.path.insert(0, str(ROOT))
    from trainer.config import TrainingConfig

    assert values["terminationGracePeriodSeconds"] > TrainingConfig.model_fields["preemption_grace_seconds"].default
    # On Spot nodes the node's notice is the real limit: the grace must fit inside it.
    render({"preemptionNoticeSeconds": 15, "config": {"preemption_grace_seconds": 10}})
    assert "does not fit in the node's preemption notice" in render_error({"preemptionNoticeSeconds": 15})


# ---- storage -----------------------------------------------------------------------------------------------------

def test_default_storage_binds_on_a_stock_cluster():
    """ReadWriteOnce from the default class (GKE standard-rwo, EKS gp2/gp3, AKS managed-csi all provide it)."""
    pvc = one(render(), "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"] and "storageClassName" not in pvc["spec"]


@pytest.mark.parametrize("values,message", [
    ({"gpus": 16}, "gpus=16 needs 2 nodes sharing the volume"),
    ({"gpus": 16, "storage": {"existingClaim": "mine"}}, "storage.existingClaim of a ReadWriteMany claim"),
    ({"storage": {"accessModes": ["ReadWriteMany"]}}, "which on GKE (standard-rwo), EKS (gp2/gp3) and AKS (managed-csi) cannot provide it"),
    ({"tensorboard": {"mode": "deployment"}}, "tensorboard.mode=deployment mounts the volume from a pod of its own, "
                                              "which needs ReadWriteMany storage"),
    (merge(PUSH_JOB, {"storage": {"accessModes": ["ReadWriteOncePod"]}}),
     "push.mode=job mounts the volume from a pod of its own, which needs ReadWriteMany storage"),
])
def test_storage_that_would_not_bind_fails_at_install(values, message):
    error = render_error(values)
    assert message in error
    if "gpus" in values:  # the message names every way out
        for fix in ("standard-rwx", "efs-sc", "azurefile-csi", "NFS", "storage.existingClaim", "one node"):
            assert fix in error


def test_shared_storage_for_several_nodes():
    render(merge({"gpus": 16}, RWX))
    render({"gpus": 16, "storage": {"existingClaim": "shared", "accessModes": ["ReadWriteMany"]}})
    render({"storage": {"accessModes": ["ReadWriteOncePod"]}, "tensorboard": {"enabled": False}})


def claimants(docs: list[dict]) -> list[str]:
    """Every pod template (container-level detail aside) that mounts the release's claim."""
    return [where for d in docs for where, t in pod_templates(d)
            if any("persistentVolumeClaim" in v for v in t["spec"].get("volumes", []))]


def test_on_a_single_node_volume_only_the_training_pods_mount_it():
    """WaitForFirstConsumer binds a ReadWriteOnce volume where its first pod lands: any other pod mounting it could
    take it to a node the trainer cannot use (the 0.3 deadlock). TensorBoard is a native sidecar of the training pod
    and rank 0 pushes; the Service shows rank 0's sidecar."""
    docs = render(PUSH_ON)
    assert claimants(docs) == [f"Job/{RELEASE}-train"]
    assert not by_kind(docs, "Deployment") and [j["metadata"]["name"] for j in by_kind(docs, "Job")] == [f"{RELEASE}-train"]
    pod = one(docs, "Job", "train")["spec"]["template"]["spec"]
    [sidecar] = pod["initContainers"]
    assert sidecar["name"] == "tensorboard" and sidecar["restartPolicy"] == "Always", "a native sidecar"
    assert {m["mountPath"]: m.get("readOnly", False) for m in sidecar["volumeMounts"]}["/data"] is True
    assert sidecar["command"][:3] == ["tensorboard", "--logdir", f"/data/{RELEASE}/output/logs"]
    assert sidecar["livenessProbe"]["httpGet"] == {"path": "/", "port": 6006}, "a hung TensorBoard is restarted"
    service = one(docs, "Service", "tensorboard")["spec"]
    assert service["selector"] == {"app.kubernetes.io/name": "ddpm", "app.kubernetes.io/instance": RELEASE,
                                   "app.kubernetes.io/component": "train",
                                   "batch.kubernetes.io/job-completion-index": "0"}, "rank 0's pod"
    assert yaml.safe_load(one(docs, "ConfigMap")["data"]["config.yaml"])["push_to_hub"] is True


@pytest.mark.parametrize("backend,rank0", [
    ("jobset", {"jobset.sigs.k8s.io/replicatedjob-name": "leader"}),
    ("pytorchjob", {"training.kubeflow.org/replica-type": "worker", "training.kubeflow.org/replica-index": "0"}),
    ("trainjob", {"jobset.sigs.k8s.io/replicatedjob-name": "node", "jobset.sigs.k8s.io/job-index": "0",
                  "batch.kubernetes.io/job-completion-index": "0"}),
])
def test_tensorboard_service_selects_rank_0_of_every_backend(backend, rank0):
    """The labels each controller puts on node 0's pod (the TensorBoard sidecar the Service shows)."""
    docs = render(merge({"backend": backend, "gpus": 16}, RWX))
    selector = one(docs, "Service", "tensorboard")["spec"]["selector"]
    assert selector == {"app.kubernetes.io/name": "ddpm", "app.kubernetes.io/instance": RELEASE,
                        "app.kubernetes.io/component": "train", **rank0}
    for _, template in training_pods(docs):
        assert [c["name"] for c in template["spec"]["initContainers"]] == ["tensorboard"]


def test_only_the_training_pods_tolerate_the_gpu_taint():
    """GKE taints GPU nodes nvidia.com/gpu:NoSchedule. The training pods tolerate it; TensorBoard's Deployment, the
    push Job and the test pod need no GPU and do not, so they never hold (or keep up) a GPU node."""
    docs = render(merge(RWX, PUSH_JOB, {"gpus": 16}))
    for where, template in full_pod_templates(docs):
        tolerations = template["spec"].get("tolerations", [])
        if template["metadata"]["labels"]["app.kubernetes.io/component"] == "train":
            assert TOLERATION in tolerations, where
        else:
            assert not tolerations, where


def test_shared_volume_lets_tensorboard_and_push_run_as_pods_of_their_own():
    values = merge(PUSH_JOB, RWX, {"gpus": 16, "tolerations": [TOLERATION], "nodeSelector": {"pool": "gpu"}})
    docs = render(values)
    assert sorted(claimants(docs)) == [f"Deployment/{RELEASE}-tensorboard", f"Job/{RELEASE}-push", f"Job/{RELEASE}-train"]
    assert all(not t["spec"].get("initContainers") for _, t in training_pods(docs)), "no sidecar"
    deployment = one(docs, "Deployment")["spec"]["template"]
    assert deployment["metadata"]["annotations"] == {"cluster-autoscaler.kubernetes.io/safe-to-evict": "true"}
    assert one(docs, "Service", "tensorboard")["spec"]["selector"]["app.kubernetes.io/component"] == "tensorboard"
    assert "push_to_hub" not in yaml.safe_load(one(docs, "ConfigMap")["data"]["config.yaml"]), "the Job pushes"
    for pod in (deployment["spec"], one(docs, "Job", "push")["spec"]["template"]["spec"]):
        assert not {"affinity", "nodeSelector", "tolerations"} & set(pod), "a CPU node will do"
    own = merge(values, {"push": {"nodeSelector": {"pool": "cpu"}, "tolerations": [TOLERATION],
                                  "affinity": {"nodeAffinity": BUSY["affinity"]["nodeAffinity"]}}})
    pod = one(render(own), "Job", "push")["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "cpu"} and pod["tolerations"] == [TOLERATION]
    assert "nodeAffinity" in pod["affinity"]


def test_ownership_fix_is_opt_in_and_the_only_non_restricted_container():
    assert not [c for _, t in training_pods(render()) for c in t["spec"].get("initContainers", [])
                if c["name"] == "fix-ownership"]
    for backend in BACKENDS:
        docs = render({"backend": backend, "storage": {"fixOwnership": True}})
        for where, template in training_pods(docs):
            init = template["spec"]["initContainers"][0]
            assert init["name"] == "fix-ownership"
            assert init["securityContext"]["runAsUser"] == 0
            assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN", "FOWNER", "DAC_OVERRIDE"]}
            assert init["command"][-1] == f"/data/{RELEASE}" and "chown 1000:1000" in init["command"][2]
            problems = restricted_problems(where, template["spec"])
            assert problems and all("fix-ownership" in p for p in problems), problems
    assert "storage.fixOwnership" in render_error({"backend": "trainjob", "storage": {"fixOwnership": True},
                                                   "kubeflow": {"trainingRuntime": {"create": False}}})


# ---- resources and QoS -----------------------------------------------------------------------------------------

def quantity(text) -> float:
    match = re.fullmatch(r"([0-9.eE+-]+?)(Ki|Mi|Gi|Ti|k|M|G|T|m)?", str(text))
    factor = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
              "Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "Ti": 2 ** 40}[match.group(2)]
    return float(match.group(1)) * factor


def qos_class(spec: dict) -> str:
    """Kubernetes' GetPodQOS (pkg/apis/core/helper/qos), after API defaulting (a missing request = its limit)."""
    requests, limits, guaranteed = {}, {}, True
    for container in spec.get("initContainers", []) + spec["containers"]:
        resources = container.get("resources", {})
        c_limits = {k: quantity(v) for k, v in resources.get("limits", {}).items() if k in ("cpu", "memory")}
        c_requests = {**c_limits, **{k: quantity(v) for k, v in resources.get("requests", {}).items() if k in ("cpu", "memory")}}
        for name, value in c_requests.items():
            if value:
                requests[name] = requests.get(name, 0) + value
        for name, value in c_limits.items():
            if value:
                limits[name] = limits.get(name, 0) + value
        if set(c_limits) != {"cpu", "memory"}:
            guaranteed = False
    if not requests and not limits:
        return "BestEffort"
    return "Guaranteed" if guaranteed and requests == limits else "Burstable"


@pytest.mark.parametrize("case", sorted(MATRIX))
def test_no_pod_is_best_effort(case):
    docs = render(MATRIX[case])
    for where, template in full_pod_templates(docs):
        assert qos_class(template["spec"]) != "BestEffort", where
    for trainjob in by_kind(docs, "TrainJob"):
        assert qos_class({"containers": [{"resources": trainjob["spec"]["trainer"]["resourcesPerNode"]}]}) != "BestEffort"


@pytest.mark.parametrize("gpus,cpu,memory,shm", [(1, "2", "10Gi", "2Gi"), (4, "8", "40Gi", "8Gi"), (8, "16", "80Gi", "16Gi")])
def test_default_training_resources_cover_shm_and_limit_memory(gpus, cpu, memory, shm):
    pod = one(render({"gpus": gpus}), "Job", "train")["spec"]["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert resources["requests"] == {"cpu": cpu, "memory": memory}
    assert resources["limits"] == {"memory": memory, "nvidia.com/gpu": gpus}
    assert next(v for v in pod["volumes"] if v["name"] == "dshm")["emptyDir"]["sizeLimit"] == shm
    assert quantity(memory) >= quantity(shm) + gpus * 2 ** 30
    assert qos_class(pod) == "Burstable"


def test_guaranteed_qos_when_asked_for():
    resources = {"requests": {"cpu": "8", "memory": "48Gi"}, "limits": {"cpu": "8", "memory": "48Gi"}}
    pod = one(render({"resources": resources}), "Job", "train")["spec"]["template"]["spec"]
    assert qos_class(pod) == "Burstable", "the TensorBoard sidecar's resources count towards the pod's class"
    sidecar = {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "1", "memory": "1Gi"}}
    pod = one(render({"resources": resources, "tensorboard": {"resources": sidecar}}), "Job", "train")
    assert qos_class(pod["spec"]["template"]["spec"]) == "Guaranteed"


@pytest.mark.parametrize("values,message", [
    ({"resources": {"requests": {"cpu": "4"}}}, "resources sets no memory"),
    ({"resources": {"requests": {"memory": "8Gi"}}, "shm": {"sizeLimit": "8Gi"}},
     "resources.requests.memory=8Gi does not cover /dev/shm (shm.sizeLimit 8Gi, counted as the pod's memory) plus 1Gi for each of the 1 processes: request at least 9Gi"),
    ({"gpus": 8, "resources": {"limits": {"memory": "20Gi"}}}, "request at least 24Gi"),
])
def test_memory_that_cannot_hold_shm_fails_at_install(values, message):
    assert message in render_error(values)


# ---- scheduling, identity and pod knobs on every pod -------------------------------------------------------------

@pytest.mark.parametrize("case", sorted(c for c in MATRIX if "busy" in c or ("stock" in c and "gpus16" in c)))
def test_tolerations_and_pull_secrets_reach_every_pod(case):
    """The training pods take the GPU toleration; TensorBoard, the push and the test pod none (they stay off GPU
    nodes); every pod the global pull secrets."""
    docs = render(MATRIX[case])
    pods = [(w, t) for d in docs for w, t in pod_templates(d)]
    assert len(pods) >= 2
    for where, template in pods:
        train = template["metadata"]["labels"]["app.kubernetes.io/component"] == "train"
        assert template["spec"].get("tolerations") == ([TOLERATION] if train else None), where
        assert template["spec"].get("imagePullSecrets") == [{"name": "regcred"}], where


def test_components_can_override_pull_secrets_and_tensorboard_image():
    docs = render(merge(PUSH_JOB, RWX, {"imagePullSecrets": [{"name": "regcred"}],
                                        "tensorboard": {"imagePullSecrets": [], "image": {"repository": "r/tb", "tag": "1"}},
                                        "tests": {"imagePullSecrets": [{"name": "hub"}]}}))
    tensorboard = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert "imagePullSecrets" not in tensorboard and tensorboard["containers"][0]["image"] == "r/tb:1"
    assert one(docs, "Pod")["spec"]["imagePullSecrets"] == [{"name": "hub"}]
    assert one(docs, "Job", "push")["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    pod = one(render(), "Job", "train")["spec"]["template"]["spec"]
    assert pod["initContainers"][0]["image"] == pod["containers"][0]["image"], "the sidecar: the training image"
    sidecar = one(render({"tensorboard": {"image": {"repository": "r/tb"}}}), "Job", "train")
    assert sidecar["spec"]["template"]["spec"]["initContainers"][0]["image"] == "r/tb:0.1.0"


@pytest.mark.parametrize("backend,kind", sorted(BACKENDS.items()))
def test_job_labels_reach_the_workload_and_pod_labels_the_pods(backend, kind):
    docs = render(merge(BUSY, {"backend": backend}))
    workload = one(docs, kind, "train")
    assert workload["metadata"]["labels"]["example.com/team"] == "vision"
    assert workload["metadata"]["annotations"] == {"example.com/owner": "vision-team"}
    assert "example.com/cost-center" not in workload["metadata"]["labels"]
    for _, template in training_pods(docs):
        assert template["metadata"]["labels"]["example.com/cost-center"] == "research"
        assert "kueue.x-k8s.io/queue-name" not in template["metadata"]["labels"]


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


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_pod_knobs_reach_the_training_pods(backend):
    docs = render(merge(BUSY, {"backend": backend}))
    [(where, template)] = training_pods(docs)
    spec = template["spec"]
    assert spec["runtimeClassName"] == "nvidia" and spec["priorityClassName"] == "training"
    assert spec["topologySpreadConstraints"] == BUSY["topologySpreadConstraints"]
    assert spec["serviceAccountName"] == RELEASE and spec["automountServiceAccountToken"] is False
    assert [c["name"] for c in spec["initContainers"]] == ["warm-cache", "tensorboard"], "the sidecar after the user's"
    container = spec["containers"][0]
    assert container["envFrom"] == BUSY["envFrom"]
    assert {"name": "datasets", "mountPath": "/datasets", "readOnly": True} in container["volumeMounts"]
    assert any(v["name"] == "datasets" for v in spec["volumes"])
    account = one(docs, "ServiceAccount")
    assert account["metadata"]["annotations"] == BUSY["serviceAccount"]["annotations"]
    assert account["automountServiceAccountToken"] is False, "no pod of this account gets the default token"


def test_an_existing_service_account_is_used_as_is():
    docs = render({"serviceAccount": {"create": False, "name": "workload-identity"}})
    assert not by_kind(docs, "ServiceAccount")
    assert one(docs, "Job", "train")["spec"]["template"]["spec"]["serviceAccountName"] == "workload-identity"


# ---- the push ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,kind,group,resource", [
    ("job", "Job", "batch", "jobs"), ("jobset", "JobSet", "jobset.x-k8s.io", "jobsets"),
    ("pytorchjob", "PyTorchJob", "kubeflow.org", "pytorchjobs"), ("trainjob", "TrainJob", "trainer.kubeflow.org", "trainjobs")])
def test_push_job_waits_for_this_run_with_deadlines(backend, kind, group, resource):
    docs = render(merge(PUSH_JOB, RWX, {"backend": backend}))
    push = one(docs, "Job", "push")
    assert not push["metadata"].get("annotations", {}).get("helm.sh/hook"), "a hook would block helm install"
    assert push["spec"]["activeDeadlineSeconds"] == 1209600 + 3600 + 600
    pod = push["spec"]["template"]["spec"]
    wait, = pod["initContainers"]
    assert wait["command"] == ["ddpm", "wait-for-training", "--workload", f"{kind}/{RELEASE}-train",
                               "--poll-seconds", "30", "--timeout-seconds", "1209600"]
    assert env_of(wait)["DDPM_CONFIG_FILE"] == "/etc/ddpm/config.yaml"
    assert env_of(wait)["HF_TOKEN"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}, "a misspelt Secret fails at once"
    assert {m["mountPath"]: m.get("readOnly", False) for m in wait["volumeMounts"]}["/data"] is True
    container, = pod["containers"]
    assert container["command"] == ["ddpm", "push", "--deadline-seconds", "3600"]
    assert env_of(container)["HF_TOKEN"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}
    # It follows only its own workload's state: get, then watch (trainer/wait.py), through a token of its own.
    assert pod["serviceAccountName"] == f"{RELEASE}-push" and pod["automountServiceAccountToken"] is False
    assert api_access_of(pod, wait) and not api_access_of(pod, container), "the upload gets no API token"
    role = one(docs, "Role", "push")
    assert role["rules"] == [{"apiGroups": [group], "resources": [resource], "resourceNames": [f"{RELEASE}-train"],
                              "verbs": ["get", "watch"]}]
    binding = one(docs, "RoleBinding", "push")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"][0]["name"] == f"{RELEASE}-push"


def test_push_deadlines_are_values():
    docs = render(merge(PUSH_JOB, RWX, {"push": {"pollSeconds": 5, "waitTimeoutSeconds": 7200, "deadlineSeconds": 900,
                                                 "activeDeadlineSeconds": 9000, "serviceAccountName": "pusher"}}))
    push = one(docs, "Job", "push")
    assert push["spec"]["activeDeadlineSeconds"] == 9000
    pod = push["spec"]["template"]["spec"]
    assert pod["initContainers"][0]["command"][-4:] == ["--poll-seconds", "5", "--timeout-seconds", "7200"]
    assert pod["containers"][0]["command"][-1] == "900"
    assert pod["serviceAccountName"] == "pusher" and not [r for r in by_kind(docs, "Role")
                                                          if r["metadata"]["labels"]["app.kubernetes.io/component"] == "push"], \
        "the user's account, no RBAC"
    assert "push.activeDeadlineSeconds=100 must be larger" in render_error(
        merge(PUSH_JOB, RWX, {"push": {"activeDeadlineSeconds": 100}}))


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_by_default_rank_0_pushes_at_the_end_of_training(backend):
    """push.mode=trainer: the trainer's config asks for the push (push_to_hub), the training container gets the
    token from the Secret, and nothing else is created for it: no push Job, ServiceAccount or Role."""
    docs = render(merge(PUSH_ON, {"backend": backend}))
    config = yaml.safe_load(one(docs, "ConfigMap")["data"]["config.yaml"])
    assert config["push_to_hub"] is True and config["hub_model_id"] == "me/ddpm-butterflies"
    assert not [d for d in docs if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "push"]
    assert "push_to_hub" not in yaml.safe_load(one(render({"backend": backend}), "ConfigMap")["data"]["config.yaml"])


# ---- versions ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("values,missing", [
    ({"backend": "jobset"}, ["jobset.x-k8s.io/v1alpha2/JobSet"]),
    ({"backend": "pytorchjob"}, ["kubeflow.org/v1/PyTorchJob"]),
    ({"backend": "trainjob"}, ["trainer.kubeflow.org/v1alpha1/TrainJob", "trainer.kubeflow.org/v1alpha1/TrainingRuntime"]),
    ({"backend": "trainjob", "kubeflow": {"trainingRuntime": {"create": False}}, "tensorboard": {"enabled": False}},
     ["trainer.kubeflow.org/v1alpha1/TrainJob"]),
])
def test_kubeflow_backends_need_their_api(values, missing):
    error = render_error(values, apis=False)
    for api in missing:
        assert f"needs the API {api}, which this cluster does not serve" in error
        assert f"helm template --api-versions {api}" in error
    assert {"jobset": "JobSet >= 0.10", "pytorchjob": "Training Operator >= 1.8", "trainjob": "Trainer >= 2.3"}[
        values["backend"]] in error
    render(values)  # with --api-versions
    render(merge(values, {"checkAPIVersions": False}), apis=False)


def test_job_backend_needs_no_operator():
    render({}, apis=False)


# ---- NOTES ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,expected", [
    ("job", "-l batch.kubernetes.io/job-name=ddpm-train,batch.kubernetes.io/job-completion-index=0"),
    ("pytorchjob", "-l training.kubeflow.org/job-name=ddpm-train,training.kubeflow.org/replica-type=worker,"
                   "training.kubeflow.org/replica-index=0"),
    ("trainjob", "-c node -l jobset.sigs.k8s.io/jobset-name=ddpm-train,jobset.sigs.k8s.io/replicatedjob-name=node,"
                 "jobset.sigs.k8s.io/job-index=0,batch.kubernetes.io/job-completion-index=0"),
    ("jobset", "-c trainer -l jobset.sigs.k8s.io/jobset-name=ddpm-train,jobset.sigs.k8s.io/replicatedjob-name=leader"),
])
def test_notes_print_this_release_commands(backend, expected):
    # `helm install --dry-run` cannot announce API versions: the check is off here (tested on its own above).
    values = merge({"backend": backend, "gpus": 16, "checkAPIVersions": False}, RWX, PUSH_JOB)
    notes = install_notes(values)
    assert f"kubectl -n vision logs -f --tail=-1 {expected}" in notes, "rank 0's log"
    assert "kubectl -n vision port-forward svc/ddpm-tensorboard 6006:6006" in notes
    assert "kubectl -n vision logs -f job/ddpm-push -c push" in notes
    assert "/data/ddpm/output" in notes
    # the run's milestones: rank 0's Events on the workload
    kind = BACKENDS[backend].lower()
    assert "ddpm status --release ddpm -n vision" in notes
    assert f"kubectl -n vision describe {kind} ddpm-train" in notes
    assert "kubectl -n vision get events --field-selector involvedObject.name=ddpm-train" in notes


def install_notes(values: dict) -> str:
    result = run_helm("install", RELEASE, str(CHART), "--dry-run=client", "--namespace", "vision", *values_args(values))
    assert result.returncode == 0, result.stderr
    return result.stdout.split("NOTES:", 1)[1]


def test_notes_of_the_default_layout_say_where_tensorboard_and_the_push_are():
    notes = install_notes(PUSH_ON)
    assert "TensorBoard (a sidecar of rank 0's training pod: while the run trains)" in notes
    assert "Rank 0 pushes the model to https://huggingface.co/me/ddpm-butterflies at the end of training" in notes
    assert "job/ddpm-push" not in notes
    later = install_notes({})
    assert "install with --set push.enabled=true --set push.tokenSecret=hf-token" in later
    assert "--set push.mode=job" in install_notes(RWX), "on shared storage a push Job can be added by upgrade"


def test_runtime_patch_manager_is_a_stable_domain_prefixed_name():
    """The Trainer's webhook requires a domain-prefixed path (IsDomainPrefixedPath); the field is immutable."""
    docs = render({"backend": "trainjob", "kubeflow": {"trainingRuntime": {"create": False}},
                   "tensorboard": {"enabled": False}})
    manager = one(docs, "TrainJob")["spec"]["runtimePatches"][0]["manager"]
    host, _, path = manager.partition("/")
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*", host) and path
    assert "0.1.0" not in manager and yaml.safe_load((CHART / "Chart.yaml").read_text())["version"] not in manager


# ---- bad values fail at install, with the intended message -------------------------------------------------------

@pytest.mark.parametrize("values,message", [
    ({"gpuz": 8}, "additional properties 'gpuz' not allowed"),
    ({"config": {"train_batchsize": 8}}, "additional properties 'train_batchsize' not allowed"),
    ({"config": {"mixed_precision": "fp8"}}, "mixed_precision"),
    ({"config": {"learning_rate": "fast"}}, "learning_rate"),
    ({"backend": "mpijob"}, "backend"),
    ({"gpus": 0}, "gpus"),
    ({"tolerations": [{"keyy": "gpu"}]}, "additional properties 'keyy' not allowed"),
    ({"resources": {"limit": {"cpu": 1}}}, "additional properties 'limit' not allowed"),
    ({"podSecurityContext": {"runAsUsr": 0}}, "additional properties 'runAsUsr' not allowed"),
    ({"containerSecurityContext": {"capabilities": {"ad": ["IPC_LOCK"]}}}, "additional properties 'ad' not allowed"),
    ({"storage": {"sizee": "1Gi"}}, "additional properties 'sizee' not allowed"),
    ({"storage": {"accessModes": ["ReadOnlyMany"]}}, "accessModes"),
    ({"push": {"enabled": "yes"}}, "push"),
    ({"tensorboard": {"tolerations": [{"operatr": "Exists"}]}}, "additional properties 'operatr' not allowed"),
    ({"extraVolumes": [{"name": "x", "hostPth": {}}]}, "additional properties 'hostPth' not allowed"),
    ({"kubeflow": {"schedulingPolicy": {"minAvailble": 1}}}, "additional properties 'minAvailble' not allowed"),
    ({"elastic": {"minNode": 2}}, "additional properties 'minNode' not allowed"),
    ({"jobset": {"exclusiveTopolgy": "zone"}}, "additional properties 'exclusiveTopolgy' not allowed"),
    ({"queueName": "Not A Label!"}, "queueName"),
    ({"rbac": {"create": "yes"}}, "rbac"),
])
def test_schema_rejects(values, message):
    assert message in render_error(values)


@pytest.mark.parametrize("values,message", [
    ({"gpus": 12}, "gpus=12 is more than one node's gpusPerNode=8, so it must be a multiple of it (e.g. 8 or 16)"),
    ({"push": {"enabled": True}}, "push.enabled needs the Hub repo: set config.hub_model_id"),
    ({"push": {"enabled": True}}, "push.enabled needs push.tokenSecret"),
    ({"terminationGracePeriodSeconds": 60}, "terminationGracePeriodSeconds=60 must be larger than config.preemption_grace_seconds=90"),
    ({"config": {"preemption_grace_seconds": 300}}, "must be larger than config.preemption_grace_seconds=300"),
    ({"preemptionNoticeSeconds": 30}, "the steps since the last periodic checkpoint (config.checkpointing_steps) are lost"),
    ({"resources": {"limits": {"nvidia.com/gpu": 2}}}, "resources.limits must not set nvidia.com/gpu"),
    ({"config": {"output_dir": "/tmp/run"}}, "config.output_dir=/tmp/run is not on the volume"),
    ({"config": {"data_cache_dir": "/cache"}}, "config.data_cache_dir=/cache is not on the volume"),
    ({"backend": "trainjob", "priorityClassName": "high", "kubeflow": {"trainingRuntime": {"create": False}}},
     "priorityClassName cannot reach the pods of the stock runtime ClusterTrainingRuntime/torch-distributed"),
    ({"backend": "trainjob", "backoffLimit": 3, "kubeflow": {"trainingRuntime": {"create": False}}}, "backoffLimit cannot reach"),
    ({"backend": "pytorchjob", "backoffLimit": 0}, "backoffLimit=0 with backend=pytorchjob fails the PyTorchJob at its first failed pod"),
    ({"extraEnv": [{"name": "HF_TOKEN", "value": "hf_leak"}]}, "extraEnv HF_TOKEN has a literal value"),
    ({"extraEnv": [{"name": "DDPM_SEED", "value": "1"}]}, "extraEnv DDPM_SEED: DDPM_* variables are TrainingConfig fields, set them as config.seed"),
    ({"podSecurityContext": {"runAsUser": 0}}, "podSecurityContext.runAsUser must not be 0"),
    ({"jobLabels": {"kueue.x-k8s.io/queue-name": "q"}}, "jobLabels must not set kueue.x-k8s.io/queue-name: set queueName"),
    ({"jobLabels": {"kueue.x-k8s.io/priority-class": "p"}}, "set workloadPriorityClassName"),
    ({"workloadPriorityClassName": "high"}, "workloadPriorityClassName is a Kueue priority, which only a queued run has"),
    ({"jobset": {"exclusiveTopology": "topology.kubernetes.io/zone"}}, "jobset.exclusiveTopology is a JobSet setting"),
    ({"backend": "jobset", "fullnameOverride": "1-run"}, "which the JobSet webhook refuses"),
    ({"serviceAccount": {"create": False}}, "rbac.create would bind the trainer's Role to the namespace's `default`"),
    (merge(ELASTIC, {"backend": "trainjob"}), "elastic.enabled is not possible with backend=trainjob"),
    ({"elastic": {"enabled": True}}, "elastic.minNodes=1 must be below the 1 node(s)"),
    (merge(ELASTIC, {"elastic": {"maxNodes": 8}}), "elastic.maxNodes=8 but gpus=32 with gpusPerNode=8 makes 4 pods"),
])
def test_impossible_combinations_fail(values, message):
    assert message in render_error(values)


def test_all_problems_are_reported_at_once():
    error = render_error({"gpus": 12, "push": {"enabled": True}, "terminationGracePeriodSeconds": 30})
    assert "INVALID VALUES (5 problems)" in error  # gpus, storage for 2 nodes, hub repo, token, grace
    assert error.count("\n  - ") == 5


# ---- security ----------------------------------------------------------------------------------------------------

ALLOWED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}


def restricted_problems(where: str, spec: dict) -> list[str]:
    """The Pod Security Standard "restricted" profile (v1.37), checked on one pod spec."""
    problems = []
    pod_sc = spec.get("securityContext", {})
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            problems.append(f"{where}: {key}")
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= ALLOWED_VOLUMES:
            problems.append(f"{where}: volume {volume['name']} of type {kinds - ALLOWED_VOLUMES}")
    if pod_sc.get("runAsUser") == 0:
        problems.append(f"{where}: pod runAsUser 0")
    containers = spec.get("containers", []) + spec.get("initContainers", [])
    if not containers:
        problems.append(f"{where}: no containers")
    for c in containers:
        sc = c.get("securityContext", {})
        name = f"{where}/{c['name']}"
        if not (sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True):
            problems.append(f"{name}: runAsNonRoot is not true")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            problems.append(f"{name}: runAsUser 0")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation is not false")
        if sc.get("privileged"):
            problems.append(f"{name}: privileged")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            problems.append(f"{name}: capabilities do not drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: adds capabilities {caps['add']}")
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccompProfile {seccomp}")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            problems.append(f"{name}: hostPort")
    return problems


@pytest.mark.parametrize("case", sorted(MATRIX))
def test_every_pod_meets_restricted_with_a_read_only_root(case):
    docs = render(MATRIX[case])
    pods = full_pod_templates(docs)
    assert len(pods) >= 2
    problems = [p for where, t in pods for p in restricted_problems(where, t["spec"])]
    trainer_env = {k: v for d in by_kind(docs, "TrainJob") for k, v in env_of(d["spec"]["trainer"]).items()}
    for where, template in pods:
        spec = template["spec"]
        if "fsGroup" not in spec.get("securityContext", {}) and not where.startswith("Pod/"):
            problems.append(f"{where}: no fsGroup, the volume would not be writable")
        if spec.get("automountServiceAccountToken") is not False:
            problems.append(f"{where}: the default API token is mounted (only explicit projected tokens)")
        mounts_by_volume = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec["containers"] + spec.get("initContainers", []):
            if c["name"] == "warm-cache":  # the user's own init container (BUSY)
                continue
            if c.get("securityContext", {}).get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}/{c['name']}: writable root filesystem")
            writable = {m["mountPath"] for m in c.get("volumeMounts", [])
                        if "emptyDir" in mounts_by_volume.get(m["name"], {})}
            home = {**(trainer_env if where.startswith("TrainingRuntime/") else {}), **env_of(c)}.get("HOME")
            if c["name"] != "wget" and not ({"/tmp", home} <= writable):
                problems.append(f"{where}/{c['name']}: /tmp and HOME={home} must be writable emptyDirs")
    assert not problems, "\n".join(problems)


def test_restricted_check_catches_a_weak_pod():
    spec = one(render(), "Job", "train")["spec"]["template"]["spec"]
    spec["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    spec["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    assert len(restricted_problems("Job", spec)) == 2


def test_security_context_overrides_openshift_and_rdma():
    """OpenShift assigns the uid (drop ours); RDMA needs IPC_LOCK (then the namespace needs "baseline")."""
    docs = render({"podSecurityContext": {"runAsUser": None, "runAsGroup": None, "fsGroup": None},
                   "containerSecurityContext": {"capabilities": {"drop": ["ALL"], "add": ["IPC_LOCK"]}}})
    for where, template in full_pod_templates(docs):
        pod_sc = template["spec"]["securityContext"]
        assert not {"runAsUser", "runAsGroup", "fsGroup"} & set(pod_sc) and pod_sc["runAsNonRoot"] is True, where
    container = one(docs, "Job", "train")["spec"]["template"]["spec"]["containers"][0]
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True, "the other defaults stay"


TOKEN_LIKE = re.compile(r"(?i)(token|secret|password|api_?key)")


@pytest.mark.parametrize("case", sorted(c for c in MATRIX if "pushOn" in c))
def test_no_secret_in_config_maps_or_env_literals(case):
    docs = render(MATRIX[case])
    assert not by_kind(docs, "Secret"), "the chart must not create Secrets; the token Secret already exists"
    for cm in by_kind(docs, "ConfigMap"):
        for key, value in cm.get("data", {}).items():
            assert not re.search(r"hf_[A-Za-z0-9]{10,}", value), f"token-like string in ConfigMap {key}"
            assert not TOKEN_LIKE.search(value), f"ConfigMap {cm['metadata']['name']}/{key} mentions a credential"
    for doc in docs:
        for where, template in pod_templates(doc):
            spec = template["spec"]
            for c in spec.get("containers", []) + spec.get("initContainers", []):
                for e in c.get("env", []):
                    if TOKEN_LIKE.search(e["name"]):
                        assert "value" not in e, f"{where}/{c['name']}: {e['name']} is a literal"
                        assert "secretKeyRef" in e["valueFrom"], f"{where}/{c['name']}: {e['name']} not from a Secret"
        if doc["kind"] == "TrainJob":
            for e in doc["spec"]["trainer"].get("env", []):
                assert not (TOKEN_LIKE.search(e["name"]) and "value" in e)


@pytest.mark.parametrize("values", [
    {"push": {"token": "hf_leak"}},
    {"config": {"hub_token": "hf_leak"}},
    {"extraEnv": [{"name": "HF_TOKEN", "value": "hf_leak"}]},
])
def test_a_token_cannot_be_given_as_a_value(values):
    assert "hf_leak" not in "".join(json.dumps(d) for d in _try_render(values))


def _try_render(values: dict) -> list[dict]:
    result = run_helm("template", RELEASE, str(CHART), *values_args(values))
    return [] if result.returncode else [d for d in yaml.safe_load_all(result.stdout) if d]


def token_holders(docs: list[dict]) -> list[str]:
    holders = [f"{where}/{c['name']}" for doc in docs for where, t in pod_templates(doc)
               for c in t["spec"].get("containers", []) + t["spec"].get("initContainers", []) if "HF_TOKEN" in env_of(c)]
    return sorted(holders + [f"TrainJob/{d['metadata']['name']}" for d in by_kind(docs, "TrainJob")
                             if "HF_TOKEN" in env_of(d["spec"]["trainer"])])


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_the_hub_token_reaches_only_the_container_that_pushes(backend):
    """push.mode=job: the push container and its wait-for-training init container (which references it so a
    misspelt Secret fails at once), never the training pods. push.mode=trainer: rank 0 pushes, so the training
    container (every rank's: one pod template), and not TensorBoard."""
    assert token_holders(render(merge(PUSH_JOB, RWX, {"backend": backend}))) == [
        f"Job/{RELEASE}-push/push", f"Job/{RELEASE}-push/wait-for-training"]
    by_trainer = token_holders(render(merge(PUSH_ON, {"backend": backend})))
    assert by_trainer == {"job": [f"Job/{RELEASE}-train/trainer"], "jobset": ["JobSet/leader/trainer"],
                          "pytorchjob": ["PyTorchJob/Worker/pytorch"], "trainjob": [f"TrainJob/{RELEASE}-train"]}[backend]
    assert token_holders(render({"backend": backend})) == []


def test_every_value_is_documented_helm_docs_style():
    """Each value in values.yaml has a `# --` comment (on itself or on the object it belongs to)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, str, bool]] = []  # (indent, key, documented) of the enclosing keys
    undocumented = []
    entries = []
    for number, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z][\w.-]*):(.*)$", line)
        if not match:
            continue
        indent, key, rest = len(match.group(1)), match.group(2), match.group(3).strip()
        previous = number - 1
        while previous >= 0 and lines[previous].strip().startswith("#") and not lines[previous].strip().startswith("# --"):
            previous -= 1
        documented = previous >= 0 and lines[previous].strip().startswith("# --")
        while stack and stack[-1][0] >= indent:
            stack.pop()
        inherited = any(doc for _, _, doc in stack)
        path = ".".join([k for _, k, _ in stack] + [key])
        entries.append((number, indent, path, documented or inherited, rest))
        stack.append((indent, key, documented or inherited))
    for i, (number, indent, path, ok, rest) in enumerate(entries):
        has_children = i + 1 < len(entries) and entries[i + 1][1] > indent and not rest
        if not ok and not has_children:
            undocumented.append(path)
    assert not undocumented, f"values without a `# --` comment: {undocumented}"


def test_every_value_is_in_the_schema():
    """values.yaml and values.schema.json name the same keys (additionalProperties: false catches the rest)."""
    schema = json.loads((CHART / "values.schema.json").read_text())

    def missing(values: dict, node: dict, path: str) -> list[str]:
        found = []
        for key, value in values.items():
            props = node.get("properties", {})
            if key not in props:
                found.append(f"{path}{key}")
            elif isinstance(value, dict) and value and props[key].get("type") == "object" and "properties" in props[key]:
                found += missing(value, props[key], f"{path}{key}.")
        return found

    assert not missing(yaml.safe_load((CHART / "values.yaml").read_text()), schema, "")


# ---- the JobSet backend -------------------------------------------------------------------------------------------

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
    node = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]
    failure = job_controller(node, node["template"]["spec"]["containers"][0]["name"], event)
    if failure is None:
        return "not counted"  # the Job replaced the pod itself
    return {"FailJobSet": "fails the run", "RestartJobSet": "counted",
            "RestartJobSetAndIgnoreMaxRestarts": "not counted"}[jobset_action(jobset, "node", *failure)]


@pytest.mark.parametrize("elastic", [False, True], ids=["fixed", "elastic"])
@pytest.mark.parametrize("event,expected", FAILURES)
def test_failure_table_jobset(event, expected, elastic):
    """docs/KUBERNETES.md's table: fixed size, a preemption recreates the gang without counting; elastic, the Job
    replaces the preempted pod alone and the others go on. Config errors and divergence fail the JobSet at once."""
    values = merge(ELASTIC, {"backend": "jobset"}) if elastic else {"backend": "jobset"}
    jobset = one(render(values), "JobSet")
    assert jobset_outcome(jobset, event) == expected
    if event == PREEMPTED and not elastic:
        node = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]
        assert jobset_action(jobset, "node", *job_controller(node, "trainer", event)) == "RestartJobSetAndIgnoreMaxRestarts"


def test_jobset_without_message_patterns_never_loops_on_a_config_error():
    """A JobSet older than 0.10 drops onJobFailureMessagePatterns (structural pruning): the first rule then fails the
    run on any podFailurePolicy failure. A preemption fails the run instead of restarting it; exit 2 never loops."""
    jobset = one(render({"backend": "jobset"}), "JobSet")
    for rule in jobset["spec"]["failurePolicy"]["rules"]:
        rule.pop("onJobFailureMessagePatterns", None)
    assert jobset_outcome(jobset, CONFIG_ERROR) == jobset_outcome(jobset, DIVERGED) == "fails the run"
    assert jobset_outcome(jobset, PREEMPTED) == "fails the run"
    assert jobset_outcome(jobset, UNEXPECTED) == "counted"


def test_jobset_deadline_fails_the_run_and_its_rules_have_valid_names():
    jobset = one(render({"backend": "jobset", "activeDeadlineSeconds": 3600}), "JobSet")
    assert jobset_action(jobset, "leader", "DeadlineExceeded", "Job was active longer than specified deadline") == "FailJobSet"
    names = [r["name"] for r in jobset["spec"]["failurePolicy"]["rules"]]
    assert len(set(names)) == len(names) and all(re.fullmatch(r"[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?", n) for n in names)


def test_jobset_model_catches_a_misspelt_field():
    bad = one(render({"backend": "jobset"}), "JobSet")
    bad["spec"]["failurePolicy"]["rules"][0]["onJobFailureMessagePattern"] = ["x"]
    with pytest.raises(AssertionError, match="onJobFailureMessagePattern"):
        check_jobset(bad)


# ---- queueing (Kueue) ----------------------------------------------------------------------------------------------

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


# ---- elastic training ----------------------------------------------------------------------------------------------

def test_trainer_defaults_the_chart_computes_with():
    sys.path.insert(0, str(ROOT))
    from trainer.config import TrainingConfig

    fields = TrainingConfig.model_fields
    assert (fields["train_batch_size"].default, fields["gradient_accumulation_steps"].default) == (16, 1), \
        "helm/templates/_run.tpl ddpm.trainBatchSize / ddpm.gradientAccumulation must follow the trainer"


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


# ---- RBAC: exactly the calls the code makes ------------------------------------------------------------------------

def api_access_of(pod: dict, container: dict, env: dict | None = None) -> str | None:
    """The folder where `container` finds an API token, ca.crt and namespace (K8S_SERVICE_ACCOUNT_DIR, from its env or
    `env`), checked to be a projected volume of all three; None when it has none."""
    sys.path.insert(0, str(ROOT))
    from trainer import kube

    folder = {**(env or {}), **env_of(container)}.get(kube.SERVICE_ACCOUNT_DIR_ENV)
    mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == folder]
    if folder is None:
        assert not [m for m in container.get("volumeMounts", []) if m["name"] == "kube-api-access"]
        return None
    [mount] = mounts
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    sources = volume["projected"]["sources"]
    assert {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}} in sources
    assert {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}} in sources
    assert {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}} in sources
    assert mount.get("readOnly") is True
    return folder


@pytest.mark.parametrize("backend,kind", sorted(BACKENDS.items()))
def test_trainer_role_is_exactly_what_the_code_calls(backend, kind):
    sys.path.insert(0, str(ROOT))
    from trainer.kube import role_rules, trainer_calls

    docs = render({"backend": backend})
    role = one(docs, "Role", "train")
    # The training pods never read or watch the workload: only the push Job's wait-for-training does (its own Role).
    assert role["rules"] == role_rules(trainer_calls(kind))
    binding = one(docs, "RoleBinding", "train")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": RELEASE, "namespace": "default"}]
    # the TrainingRuntime's container gets its env from the TrainJob's spec.trainer.env
    trainer_env = env_of(one(docs, "TrainJob")["spec"]["trainer"]) if backend == "trainjob" else {}
    for where, template in training_pods(docs):
        pod = template["spec"]
        assert pod["serviceAccountName"] == RELEASE and pod["automountServiceAccountToken"] is False, where
        assert api_access_of(pod, pod["containers"][0], trainer_env) == "/var/run/secrets/ddpm-trainer/kube-api", where
        assert all(api_access_of(pod, c) is None for c in pod.get("initContainers", [])), where


@pytest.mark.parametrize("backend,kind", sorted(BACKENDS.items()))
def test_push_role_is_exactly_what_wait_for_training_calls(backend, kind):
    """trainer/wait.py reads the workload (get) and watches it (watch): wait_calls, narrowed to the one workload."""
    sys.path.insert(0, str(ROOT))
    from trainer.kube import role_rules, wait_calls

    docs = render(merge(PUSH_JOB, RWX, {"backend": backend}))
    [rule] = one(docs, "Role", "push")["rules"]
    assert [rule] == [r | {"resourceNames": [f"{RELEASE}-train"]} for r in role_rules(wait_calls(kind))]
    assert rule["verbs"] == ["get", "watch"]


@pytest.mark.parametrize("values", [PUSH_ON, merge(PUSH_JOB, RWX)], ids=["sidecar", "own-pods"])
def test_no_token_where_the_api_is_not_used(values):
    """Only the trainer container and the push's wait call the API: not TensorBoard (sidecar or Deployment), not
    the upload, not the test pod."""
    for where, template in full_pod_templates(render(values)):
        pod = template["spec"]
        assert pod.get("automountServiceAccountToken") is False, where
        users = [c["name"] for c in pod["containers"] + pod.get("initContainers", []) if api_access_of(pod, c)]
        assert users == {f"Job/{RELEASE}-train": ["trainer"], f"Job/{RELEASE}-push": ["wait-for-training"]}.get(where, []), where


def test_without_rbac_training_is_unchanged_and_events_are_best_effort():
    """rbac.create=false: no Role or RoleBinding; the pods are the same (trainer/events.py turns events off after
    the first 403 and training goes on; tests/test_events.py)."""
    values = merge(PUSH_JOB, RWX)
    docs = render(merge(values, {"rbac": {"create": False}}))
    assert not by_kind(docs, "Role") and not by_kind(docs, "RoleBinding")
    assert sorted(d["metadata"]["name"] for d in by_kind(docs, "ServiceAccount")) == [RELEASE, f"{RELEASE}-push"]
    assert one(docs, "Job", "train")["spec"] == one(render(values), "Job", "train")["spec"]
