"""The Helm chart in helm/, proven with real tools: the real helm binary, the strict Kubernetes JSON schemas
(kubernetes-validate), and the Kubeflow SDKs' own PyTorchJob and TrainJob models. Offline; no cluster.

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
KUBERNETES_VERSION = "1.37.0"  # the one version every rendered object is validated against (as in chart_schema.py)
PREEMPTED, CONFIG_ERROR, DIVERGED = 75, 2, 3  # the trainer's exit codes


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


@functools.lru_cache(maxsize=None)
def _render(values_json: str) -> tuple[dict, ...]:
    result = run_helm("template", RELEASE, str(CHART), *values_args(json.loads(values_json)))
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def render(values: dict | None = None) -> list[dict]:
    return copy.deepcopy(list(_render(json.dumps(values or {}, sort_keys=True))))


def render_error(values: dict) -> str:
    result = run_helm("template", RELEASE, str(CHART), *values_args(values))
    assert result.returncode != 0, "expected the chart to refuse these values"
    return result.stderr


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str) -> dict:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


# ---- the matrix -------------------------------------------------------------------------------------------------

PUSH_ON = {"push": {"enabled": True, "tokenSecret": "hf-token"}, "config": {"hub_model_id": "me/ddpm-butterflies"}}
BUSY = {  # the values people change: resources, tolerations, scheduling, env, an existing claim
    "storage": {"existingClaim": "shared-data"},
    "resources": {"requests": {"cpu": "16", "memory": "96Gi"}, "limits": {"memory": "128Gi"}},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["a"]}]}]}}},
    "imagePullSecrets": [{"name": "regcred"}],
    "extraEnv": [{"name": "NCCL_DEBUG", "value": "INFO"}],
    "podAnnotations": {"example.com/team": "vision"},
    "shm": {"sizeLimit": "32Gi"},
    "config": {"train_batch_size": 32, "learning_rate": "3e-4", "dataset_name": "huggan/smithsonian_butterflies_subset"},
}


def merge(*parts: dict) -> dict:
    out: dict = {}
    for part in parts:
        for key, value in part.items():
            out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


MATRIX = {
    f"{backend}-gpus{gpus}-push{'On' if push else 'Off'}-{'busy' if busy else 'plain'}": merge(
        {"backend": backend, "gpus": gpus}, PUSH_ON if push else {}, BUSY if busy else {},
        {"priorityClassName": "training"} if busy and backend != "trainjob" else {},  # TrainJob cannot set it
    )
    for backend, gpus, push, busy in itertools.product(
        ["job", "pytorchjob", "trainjob"], [1, 8, 16], [False, True], [False, True]
    )
}


def nodes_and_procs(values: dict) -> tuple[int, int]:
    gpus, per_node = values.get("gpus", 1), values.get("gpusPerNode", 8)
    return (gpus // per_node, per_node) if gpus > per_node else (1, gpus)


@pytest.mark.parametrize("case", sorted(MATRIX))
def test_helm_lint(case, tmp_path):
    result = run_helm("lint", "--strict", str(CHART), *values_args(MATRIX[case], tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr


# ---- every rendered object against the strict Kubernetes schemas ------------------------------------------------

def pod_templates(doc: dict) -> list[tuple[str, dict]]:
    """(where, PodTemplateSpec-shaped dict) for every pod an object creates."""
    kind = doc["kind"]
    if kind in ("Job", "Deployment"):
        return [(f"{kind}/{doc['metadata']['name']}", doc["spec"]["template"])]
    if kind == "Pod":
        return [(f"Pod/{doc['metadata']['name']}", {"metadata": doc["metadata"], "spec": doc["spec"]})]
    if kind == "PyTorchJob":
        return [(f"PyTorchJob/{role}", spec["template"]) for role, spec in doc["spec"]["pytorchReplicaSpecs"].items()]
    if kind == "TrainJob":
        found = []
        for patch in doc["spec"].get("runtimePatches", []):
            for rjob in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
                found.append((f"TrainJob/{rjob['name']}", rjob["template"]["spec"]["template"]))
        return found
    return []


def validate_kubernetes(doc: dict) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("case", sorted(MATRIX))
def test_every_object_validates_strictly(case):
    docs = render(MATRIX[case])
    for doc in docs:
        if doc["apiVersion"].startswith(("kubeflow.org/", "trainer.kubeflow.org/")):
            # CRDs: their pod templates still get the full Kubernetes check, as PodTemplates.
            for where, template in pod_templates(doc):
                try:
                    validate_kubernetes({"apiVersion": "v1", "kind": "PodTemplate",
                                         "metadata": {"name": "check"}, "template": template})
                except kubernetes_validate.ValidationError as e:
                    pytest.fail(f"{where}: {e.message} at {list(e.absolute_path)}")
        else:
            try:
                validate_kubernetes(doc)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {e.message} at {list(e.absolute_path)}")


def test_strict_kubernetes_validation_catches_a_misspelt_field():
    job = one(render(), "Job")
    job["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_kubernetes(job)


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


@pytest.mark.parametrize("case", sorted(c for c in MATRIX if c.startswith("pytorchjob")))
def test_pytorchjob_matches_the_kubeflow_training_model(case):
    values = MATRIX[case]
    doc = one(render(values), "PyTorchJob")
    check_pytorchjob(doc)
    nodes, procs = nodes_and_procs(values)
    specs = doc["spec"]["pytorchReplicaSpecs"]
    assert doc["spec"]["nprocPerNode"] == str(procs)
    assert specs["Master"]["replicas"] == 1
    assert specs.get("Worker", {}).get("replicas", 0) == nodes - 1
    for spec in specs.values():
        container = spec["template"]["spec"]["containers"][0]
        assert container["name"] == "pytorch"  # the operator only injects its env into this container
        assert container["resources"]["limits"]["nvidia.com/gpu"] == procs
        assert not any(e["name"].startswith("PET_") for e in container["env"]), "the operator injects PET_*"


@pytest.mark.parametrize("case", sorted(c for c in MATRIX if c.startswith("trainjob")))
def test_trainjob_matches_the_kubeflow_trainer_model(case):
    values = MATRIX[case]
    doc = one(render(values), "TrainJob")
    check_trainjob(doc)
    nodes, procs = nodes_and_procs(values)
    trainer = doc["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (nodes, procs)
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == procs
    assert doc["spec"]["runtimeRef"]["name"] == "torch-distributed"


def test_kubeflow_checks_catch_a_misspelt_field():
    pytorchjob = one(render({"backend": "pytorchjob", "gpus": 16}), "PyTorchJob")
    bad = copy.deepcopy(pytorchjob)
    bad["spec"]["nprocsPerNode"] = bad["spec"].pop("nprocPerNode")
    with pytest.raises(AssertionError, match="nprocsPerNode"):
        check_pytorchjob(bad)
    bad = copy.deepcopy(pytorchjob)
    bad["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["volumeMount"] = [{"name": "data", "mountPath": "/x"}]
    with pytest.raises(AssertionError, match="volumeMount"):
        check_pytorchjob(bad)

    trainjob = one(render({"backend": "trainjob", "gpus": 16}), "TrainJob")
    bad = copy.deepcopy(trainjob)
    bad["spec"]["trainer"]["numNode"] = bad["spec"]["trainer"].pop("numNodes")
    with pytest.raises(AssertionError, match="numNode"):
        check_trainjob(bad)
    bad = copy.deepcopy(trainjob)
    bad["spec"]["trainer"]["numNodes"] = "2"
    with pytest.raises(Exception, match="numNodes|num_nodes"):
        check_trainjob(bad)


# ---- the `job` backend: what torchrun and the trainer rely on ---------------------------------------------------

def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


@pytest.mark.parametrize("gpus,nodes,procs", [(1, 1, 1), (8, 1, 8), (16, 2, 8), (32, 4, 8)])
def test_indexed_job_shape(gpus, nodes, procs):
    docs = render({"gpus": gpus})
    job = one(docs, "Job")
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
    assert env["PET_MASTER_ADDR"] == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert env["PET_MASTER_PORT"] == "29500"
    assert "PET_NODE_RANK" not in env, "the node rank comes from JOB_COMPLETION_INDEX"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == procs


def test_pod_failure_policy_matches_the_trainer_exit_codes():
    spec = one(render({"backoffLimit": 9}), "Job")["spec"]
    assert spec["backoffLimit"] == 9
    rules = spec["podFailurePolicy"]["rules"]
    container = spec["template"]["spec"]["containers"][0]["name"]

    def action_for(exit_code=None, condition=None):
        for rule in rules:  # Kubernetes applies the first matching rule
            codes = rule.get("onExitCodes")
            if codes and exit_code is not None and codes["containerName"] == container and exit_code in codes["values"]:
                return rule["action"]
            if condition and any(p["type"] == condition for p in rule.get("onPodConditions", [])):
                return rule["action"]
        return "Count"

    assert action_for(PREEMPTED) == "Ignore"
    assert action_for(condition="DisruptionTarget") == "Ignore"
    assert action_for(CONFIG_ERROR) == "FailJob"
    assert action_for(DIVERGED) == "FailJob"
    assert action_for(1) == "Count" and action_for(137) == "Count"


def test_config_map_carries_the_config_and_the_per_release_paths():
    docs = render(merge(BUSY, {"config": {"max_train_steps": 1000, "mixed_precision": "bf16"}}))
    config = yaml.safe_load(one(docs, "ConfigMap")["data"]["config.yaml"])
    assert config["output_dir"] == f"/data/{RELEASE}/output"
    assert config["data_cache_dir"] == f"/data/{RELEASE}/data-cache", "outside the run: reused by the next one"
    assert config["train_batch_size"] == 32 and config["max_train_steps"] == 1000
    assert float(config["learning_rate"]) == 3e-4
    pod = one(docs, "Job")["spec"]["template"]["spec"]
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
    job = one(render({"config": {"preemption_grace_seconds": 200}, "terminationGracePeriodSeconds": 260}), "Job")
    assert job["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 260
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    sys.path.insert(0, str(ROOT))
    from trainer.config import TrainingConfig

    assert values["terminationGracePeriodSeconds"] > TrainingConfig.model_fields["preemption_grace_seconds"].default


# ---- TensorBoard, the push, NOTES ------------------------------------------------------------------------------

def test_tensorboard_reads_this_release_logs_read_only():
    docs = render()
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["tensorboard", "--logdir", f"/data/{RELEASE}/output/logs",
                                    "--host", "0.0.0.0", "--port", "6006"]
    assert all(m["readOnly"] for m in container["volumeMounts"])
    assert pod["volumes"][0]["persistentVolumeClaim"]["readOnly"] is True
    service = next(s for s in by_kind(docs, "Service") if s["metadata"]["name"].endswith("-tensorboard"))
    assert service["spec"]["type"] == "ClusterIP" and service["spec"]["ports"][0]["port"] == 6006
    test_pod = one(docs, "Pod")
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert f"http://{service['metadata']['name']}:6006/" in json.dumps(test_pod)
    assert not by_kind(render({"tensorboard": {"enabled": False}}), "Deployment")


def test_push_job_waits_for_the_marker_then_pushes():
    docs = render(PUSH_ON)
    push = next(j for j in by_kind(docs, "Job") if j["metadata"]["name"].endswith("-push"))
    assert not push["metadata"].get("annotations", {}).get("helm.sh/hook"), "a hook would block helm install"
    pod = push["spec"]["template"]["spec"]
    wait, = pod["initContainers"]
    assert env_of(wait)["MARKER"] == f"/data/{RELEASE}/output/training_complete.json"
    assert "until [ -f" in wait["command"][-1]
    container, = pod["containers"]
    assert container["command"] == ["ddpm", "push"]
    env = env_of(container)
    assert env["HF_TOKEN"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}
    assert env["DDPM_CONFIG_FILE"] == "/etc/ddpm/config.yaml"
    assert not [j for j in by_kind(render(), "Job") if j["metadata"]["name"].endswith("-push")]


@pytest.mark.parametrize("backend,expected", [
    ("job", "batch.kubernetes.io/job-completion-index=0"),
    ("pytorchjob", f"logs -f --tail=-1 {RELEASE}-train-master-0"),
    ("trainjob", f"jobset.sigs.k8s.io/jobset-name={RELEASE}-train"),
])
def test_notes_print_this_release_commands(backend, expected):
    result = run_helm("install", RELEASE, str(CHART), "--dry-run=client", "--namespace", "vision",
                      *values_args(merge({"backend": backend}, PUSH_ON)))
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert expected in notes
    assert "kubectl -n vision port-forward svc/ddpm-tensorboard 6006:6006" in notes
    assert "kubectl -n vision logs -f job/ddpm-push -c push" in notes
    assert "/data/ddpm/output" in notes


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
    ({"securityContext": {"runAsUser": 0, "runAsGroup": 0, "fsGroup": 0}}, "runAsUser"),
    ({"storage": {"sizee": "1Gi"}}, "additional properties 'sizee' not allowed"),
    ({"push": {"enabled": "yes"}}, "push"),
])
def test_schema_rejects(values, message):
    assert message in render_error(values)


@pytest.mark.parametrize("values,message", [
    ({"gpus": 12}, "gpus=12 is more than one node's gpusPerNode=8, so it must be a multiple of it (e.g. 8 or 16)"),
    ({"gpus": 16, "storage": {"accessModes": ["ReadWriteOnce"]}}, "cannot be shared by 2 nodes"),
    ({"push": {"enabled": True}}, "push.enabled needs the Hub repo: set config.hub_model_id"),
    ({"push": {"enabled": True}}, "push.enabled needs push.tokenSecret"),
    ({"terminationGracePeriodSeconds": 60}, "terminationGracePeriodSeconds=60 must be larger than config.preemption_grace_seconds=90"),
    ({"config": {"preemption_grace_seconds": 300}}, "must be larger than config.preemption_grace_seconds=300"),
    ({"resources": {"limits": {"nvidia.com/gpu": 2}}}, "resources.limits must not set nvidia.com/gpu"),
    ({"config": {"output_dir": "/tmp/run"}}, "config.output_dir=/tmp/run is not on the volume"),
    ({"config": {"data_cache_dir": "/cache"}}, "config.data_cache_dir=/cache is not on the volume"),
    ({"backend": "trainjob", "priorityClassName": "high"}, "priorityClassName cannot be set on a TrainJob"),
    ({"extraEnv": [{"name": "HF_TOKEN", "value": "hf_leak"}]}, "extraEnv HF_TOKEN has a literal value"),
])
def test_impossible_combinations_fail(values, message):
    assert message in render_error(values)


def test_all_problems_are_reported_at_once():
    error = render_error({"gpus": 12, "push": {"enabled": True}, "terminationGracePeriodSeconds": 30})
    assert "INVALID VALUES (4 problems)" in error
    assert error.count("\n  - ") == 4


def test_rwo_volume_is_fine_on_one_node():
    render({"gpus": 8, "storage": {"accessModes": ["ReadWriteOnce"]}})


# ---- security ----------------------------------------------------------------------------------------------------

ALLOWED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}


def restricted_problems(where: str, spec: dict) -> list[str]:
    """The Pod Security Standard "restricted" profile (v1.37), checked on one pod spec."""
    problems = []
    pod_sc = spec.get("securityContext", {})
    for key in ("hostNetwork", "hostPID", "hostIPC", "hostUsers"):
        if spec.get(key) and key != "hostUsers":
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
def test_every_pod_meets_restricted(case):
    docs = render(MATRIX[case])
    pods = [(where, t["spec"]) for doc in docs for where, t in pod_templates(doc)]
    assert len(pods) >= 2
    problems = [p for where, spec in pods for p in restricted_problems(where, spec)]
    assert not problems, "\n".join(problems)
    for where, spec in pods:
        if "fsGroup" not in spec.get("securityContext", {}) and not where.startswith("Pod/"):
            problems.append(f"{where}: no fsGroup, the volume would not be writable")
    assert not problems, "\n".join(problems)


def test_restricted_check_catches_a_weak_pod():
    spec = one(render(), "Job")["spec"]["template"]["spec"]
    spec["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    spec["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    assert len(restricted_problems("Job", spec)) == 2


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


def test_token_reaches_only_the_push_container():
    docs = render(PUSH_ON)
    holders = [
        f"{where}/{c['name']}"
        for doc in docs for where, t in pod_templates(doc)
        for c in t["spec"].get("containers", []) + t["spec"].get("initContainers", [])
        if "HF_TOKEN" in env_of(c)
    ]
    assert holders == [f"Job/{RELEASE}-push/push"]


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
