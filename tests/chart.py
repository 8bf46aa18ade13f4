"""Rendering the Helm chart in helm/ for the tests/test_chart_*.py files: the real helm binary (found on PATH; `make
test` puts .tools/bin first, and without it the tests fail rather than skip), the values matrix every file checks,
and the pod templates of each kind the chart renders. docs/KUBERNETES.md states what the chart tests prove.
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from trainer import kube

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm"
RELEASE = "ddpm"
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


def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def api_access_of(pod: dict, container: dict, env: dict | None = None) -> str | None:
    """The folder where `container` finds an API token, ca.crt and namespace (K8S_SERVICE_ACCOUNT_DIR, from its env or
    `env`), checked to be a projected volume of all three; None when it has none."""
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
