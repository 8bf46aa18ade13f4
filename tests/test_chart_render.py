"""The chart's values and what it prints: helm lint, values.yaml and values.schema.json in step with the trainer's
TrainingConfig and documented, the ConfigMap, the API-version check per backend, NOTES.txt, and bad values refused at
install with the intended message, every problem at once.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import yaml

from trainer.config import TrainingConfig

from chart import (
    BACKENDS, BUSY, CHART, ELASTIC, MATRIX, PUSH_JOB, PUSH_ON, RELEASE, ROOT, RWX, by_kind, env_of,
    full_pod_templates, merge, one, render, render_error, run_helm, values_args,
)


@pytest.mark.parametrize("case", sorted(MATRIX))
def test_helm_lint(case, tmp_path):
    # helm lint cannot announce API versions: the API check is switched off for it (and tested on its own below).
    values = merge(MATRIX[case], {"checkAPIVersions": False})
    result = run_helm("lint", "--strict", str(CHART), *values_args(values, tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("case", sorted(MATRIX))
def test_no_env_looks_like_trainer_config(case):
    """The trainer rejects unknown DDPM_* variables: the chart sets only DDPM_CONFIG_FILE."""
    docs = render(MATRIX[case])
    containers = [c for _, t in full_pod_templates(docs) for c in t["spec"]["containers"] + t["spec"].get("initContainers", [])]
    containers += [d["spec"]["trainer"] for d in by_kind(docs, "TrainJob")]
    names = {e["name"] for c in containers for e in c.get("env", [])}
    assert {n for n in names if n.startswith("DDPM_")} <= {"DDPM_CONFIG_FILE"}


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
    assert values["terminationGracePeriodSeconds"] > TrainingConfig.model_fields["preemption_grace_seconds"].default
    # On Spot nodes the node's notice is the real limit: the grace must fit inside it.
    render({"preemptionNoticeSeconds": 15, "config": {"preemption_grace_seconds": 10}})
    assert "does not fit in the node's preemption notice" in render_error({"preemptionNoticeSeconds": 15})


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
    """Installed where the cluster serves no CRD at all (no --api-versions announced, checkAPIVersions on): only
    built-in kinds, the workload a batch/v1 Job."""
    builtin = {"v1", "batch/v1", "apps/v1", "rbac.authorization.k8s.io/v1"}
    for values in ({}, merge(PUSH_JOB, RWX, {"gpus": 16})):  # the defaults; every optional part on
        docs = render(values, apis=False)
        assert {d["apiVersion"] for d in docs} <= builtin, sorted({d["apiVersion"] for d in docs} - builtin)
        assert one(docs, "Job", "train")["apiVersion"] == "batch/v1"


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


def test_trainer_defaults_the_chart_computes_with():
    fields = TrainingConfig.model_fields
    assert (fields["train_batch_size"].default, fields["gradient_accumulation_steps"].default) == (16, 1), \
        "helm/templates/_run.tpl ddpm.trainBatchSize / ddpm.gradientAccumulation must follow the trainer"
