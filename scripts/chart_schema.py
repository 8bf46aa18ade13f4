"""Write helm/values.schema.json: the chart's own values, the trainer's TrainingConfig and the Kubernetes types.

Generated rather than hand-written so it cannot drift from its two sources of truth:
- `config` is `TrainingConfig.model_json_schema()` (trainer/config.py), so a new trainer field is settable with
  `--set config.<field>=...` as soon as this runs (`make chart-schema`); tests/test_chart_render.py fails when the
  committed file is stale.
- Kubernetes-typed values (affinity, tolerations, resources, env, volumes, securityContexts, ...) reuse the strict Kubernetes
  JSON schemas shipped by kubernetes-validate for KUBERNETES_VERSION, so a typo inside them fails at install too.

Every object has `additionalProperties: false`, so `helm install --set gpuz=8` fails instead of being ignored.

Usage: python scripts/chart_schema.py [--check]
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_PATH = ROOT / "helm" / "values.schema.json"
KUBERNETES_VERSION = "1.37.0"  # the one version the tests validate rendered manifests against, too

# Kubernetes definitions the values refer to, by their OpenAPI names.
K8S = "io.k8s.api.core.v1."
K8S_TYPES = ["Affinity", "Toleration", "EnvVar", "ResourceRequirements", "LocalObjectReference", "PodSecurityContext",
             "SecurityContext", "TopologySpreadConstraint", "EnvFromSource", "Volume", "VolumeMount", "Container"]

# `helm --set config.learning_rate=3e-4` gives the string "3e-4" (helm only parses integers and booleans), which
# the trainer's pydantic model converts; so number fields also take a string that spells a number.
NUMBER_STRING = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$"

DNS_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"  # a Kubernetes label value (63 characters at most)


def ref(name: str) -> dict:
    return {"$ref": f"#/$defs/{name}"}


def obj(properties: dict, required: list[str] | None = None, description: str | None = None) -> dict:
    schema: dict = {"type": "object", "additionalProperties": False, "properties": properties}
    if required:
        schema["required"] = required
    if description:
        schema["description"] = description
    return schema


def string(description: str, **extra) -> dict:
    return {"type": "string", "description": description, **extra}


def integer(description: str, **extra) -> dict:
    return {"type": "integer", "description": description, **extra}


def boolean(description: str) -> dict:
    return {"type": "boolean", "description": description}


QUANTITY = {
    "description": "a Kubernetes quantity, e.g. 16Gi",
    "oneOf": [{"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?([EPTGMK]i?|[mkMGTPE]|[eE][0-9]+)?$"}, {"type": "integer", "minimum": 0}],
}


def container_resources(description: str) -> dict:
    return {**ref(K8S + "ResourceRequirements"), "description": description}


def nullable(schema: dict, description: str | None = None) -> dict:
    """`null` (the chart's "inherit" or "none") or the schema."""
    out: dict = {"anyOf": [{"type": "null"}, schema]}
    if description:
        out["description"] = description
    return out


def k8s(name: str, description: str | None = None) -> dict:
    return {**ref(K8S + name), **({"description": description} if description else {})}


def array_of(name: str, description: str | None = None) -> dict:
    return {"type": "array", "items": ref(K8S + name), **({"description": description} if description else {})}


STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
SECONDS = {"type": "integer", "minimum": 1}


def component_scheduling(description: str) -> dict:
    """nodeSelector/tolerations/affinity/imagePullSecrets of TensorBoard, the push and the test pod: null inherits."""
    return {
        "nodeSelector": nullable(STRING_MAP, f"node labels of the {description}; null: none"),
        "tolerations": nullable(array_of("Toleration"), f"tolerations of the {description}; null: the training pods'"),
        "affinity": nullable(k8s("Affinity"), f"affinity of the {description}; null: none"),
        "imagePullSecrets": nullable(array_of("LocalObjectReference"),
                                     f"image pull secrets of the {description}; null: imagePullSecrets"),
    }


def chart_values(config_schema: dict) -> dict:
    """The chart's values, one entry per key of values.yaml."""
    return obj(
        {
            "nameOverride": string("overrides the chart name in resource names", pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?)?$"),
            "fullnameOverride": string("overrides the resource-name prefix and the folder on the volume",
                                       pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?)?$", maxLength=40),
            "image": obj(
                {
                    "repository": string("image repository", minLength=1),
                    "tag": string("image tag; empty: the chart's appVersion"),
                    "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"], "description": "image pull policy"},
                },
                required=["repository", "tag", "pullPolicy"],
            ),
            "imagePullSecrets": array_of("LocalObjectReference"),
            "backend": {"enum": ["job", "jobset", "pytorchjob", "trainjob"], "description": "how the training pods are run"},
            "checkAPIVersions": boolean("fail when the cluster does not serve the backend's API"),
            "gpus": integer("total GPUs for the run", minimum=1),
            "gpusPerNode": integer("GPUs on each node", minimum=1),
            "config": config_schema,
            # failures, retries, deadlines
            "backoffLimit": nullable({"type": "integer", "minimum": 0},
                                     "failed pods the run survives (preemptions not counted); null: per node x nodes"),
            "backoffLimitPerNode": integer("failures allowed per node when backoffLimit is null", minimum=0),
            "maxRestarts": integer("torchrun worker-group restarts inside a pod", minimum=0),
            "rendezvousTimeoutSeconds": integer("seconds the c10d rendezvous waits for every node", minimum=60),
            "masterPort": integer("c10d rendezvous store port on node 0", minimum=1, maximum=65535),
            "terminationGracePeriodSeconds": integer("seconds between SIGTERM and SIGKILL", minimum=1),
            "preemptionNoticeSeconds": integer("seconds the node gives a pod on preemption; 0: not set", minimum=0),
            "activeDeadlineSeconds": nullable(SECONDS, "deadline of the training workload; null: none"),
            "ttlSecondsAfterFinished": nullable({"type": "integer", "minimum": 0},
                                                "seconds before a finished workload is deleted; null: kept"),
            # queueing
            "queueName": string("Kueue LocalQueue (label kueue.x-k8s.io/queue-name); empty: not queued",
                                pattern=LABEL_VALUE, maxLength=63),
            "workloadPriorityClassName": string("Kueue WorkloadPriorityClass (label kueue.x-k8s.io/priority-class)",
                                                pattern=LABEL_VALUE, maxLength=63),
            "jobLabels": {**STRING_MAP, "description": "more labels on the training workload"},
            "jobAnnotations": {**STRING_MAP, "description": "annotations on the training workload"},
            "jobset": obj(
                {
                    "exclusiveTopology": string("node label whose domains each hold one JobSet's training pods; "
                                                "empty: none", pattern=r"^([A-Za-z0-9][-A-Za-z0-9_./]*)?$"),
                },
                required=["exclusiveTopology"],
                description="settings of the jobset backend",
            ),
            "elastic": obj(
                {
                    "enabled": boolean("train on minNodes..maxNodes nodes (torchrun --nnodes MIN:MAX)"),
                    "minNodes": integer("fewest nodes the run trains on", minimum=1),
                    "maxNodes": nullable({"type": "integer", "minimum": 1},
                                         "most nodes; null: gpus / gpusPerNode"),
                },
                required=["enabled", "minNodes"],
                description="elastic training (job, jobset and pytorchjob backends)",
            ),
            "kubeflow": obj(
                {
                    "schedulingPolicy": obj(
                        {
                            "minAvailable": integer("pods that must start together", minimum=1),
                            "queue": string("Volcano queue"),
                            "priorityClass": string("PriorityClass of the PodGroup"),
                            "minResources": {"type": "object", "additionalProperties": QUANTITY},
                            "scheduleTimeoutSeconds": integer("seconds to wait for the gang", minimum=1),
                        },
                        description="PyTorchJob runPolicy.schedulingPolicy (Volcano / coscheduling)",
                    ),
                    "trainingRuntime": obj(
                        {
                            "create": boolean("create a namespaced TrainingRuntime for the TrainJob"),
                            "maxRestarts": integer("JobSet restarts after the training Job failed", minimum=0),
                            "podGroupPolicy": obj(
                                {
                                    "coscheduling": obj({"scheduleTimeoutSeconds": integer("seconds", minimum=1)}),
                                    "volcano": {"type": "object"},
                                },
                                description="podGroupPolicy of the created TrainingRuntime",
                            ),
                        },
                        required=["create", "maxRestarts", "podGroupPolicy"],
                    ),
                    "runtimeName": string("(Cluster)TrainingRuntime of the TrainJob", minLength=1),
                    "runtimeKind": {"enum": ["ClusterTrainingRuntime", "TrainingRuntime"]},
                },
                required=["trainingRuntime", "runtimeName", "runtimeKind"],
            ),
            # the training pods
            "resources": container_resources("CPU and memory of each training pod (the chart adds nvidia.com/gpu); "
                                              "empty: defaultResources per process"),
            "defaultResources": obj(
                {
                    "cpuPerProcess": {"type": "number", "exclusiveMinimum": 0, "description": "CPU cores per process"},
                    "memoryGiBPerProcess": {"type": "number", "exclusiveMinimum": 0,
                                            "description": "GiB per process, on top of /dev/shm"},
                },
                required=["cpuPerProcess", "memoryGiBPerProcess"],
            ),
            "shm": obj(
                {
                    "sizeLimit": {"anyOf": [{"type": "string", "maxLength": 0}, QUANTITY],
                                  "description": "size of /dev/shm; empty: perProcessGiB x processes"},
                    "perProcessGiB": {"type": "number", "exclusiveMinimum": 0, "description": "GiB of /dev/shm per process"},
                },
                required=["sizeLimit", "perProcessGiB"],
            ),
            "nodeSelector": STRING_MAP,
            "tolerations": array_of("Toleration"),
            "affinity": k8s("Affinity"),
            "topologySpreadConstraints": array_of("TopologySpreadConstraint"),
            "priorityClassName": string("PriorityClass of the training pods"),
            "runtimeClassName": string("RuntimeClass of the training pods"),
            "extraEnv": array_of("EnvVar"),
            "envFrom": array_of("EnvFromSource"),
            "extraVolumes": array_of("Volume"),
            "extraVolumeMounts": array_of("VolumeMount"),
            "initContainers": array_of("Container"),
            "podAnnotations": STRING_MAP,
            "podLabels": STRING_MAP,
            "serviceAccount": obj(
                {
                    "create": boolean("create a ServiceAccount for the training and TensorBoard pods"),
                    "name": string("its name; empty: the fullname (or `default` when not created)",
                                   pattern=r"^([a-z0-9]([-.a-z0-9]*[a-z0-9])?)?$"),
                    "annotations": STRING_MAP,
                },
                required=["create", "name", "annotations"],
            ),
            "rbac": obj(
                {"create": boolean("create Roles for the training pods (Events) and the push (watch the workload)")},
                required=["create"],
            ),
            "podSecurityContext": k8s("PodSecurityContext", "pod securityContext of every pod"),
            "containerSecurityContext": k8s("SecurityContext", "securityContext of every container"),
            # storage
            "storage": obj(
                {
                    "existingClaim": string("existing PersistentVolumeClaim to use", pattern=r"^([a-z0-9]([-.a-z0-9]*[a-z0-9])?)?$"),
                    "size": QUANTITY,
                    "storageClass": string("StorageClass of the created claim; empty: the default"),
                    "accessModes": {
                        "type": "array", "minItems": 1, "uniqueItems": True,
                        "items": {"enum": ["ReadWriteMany", "ReadWriteOnce", "ReadWriteOncePod"]},
                    },
                    "keep": boolean("keep the created claim on helm uninstall"),
                    "fixOwnership": boolean("chown the release's folder before training (root init container)"),
                },
                required=["existingClaim", "size", "storageClass", "accessModes", "keep", "fixOwnership"],
            ),
            # TensorBoard, push, tests
            "tensorboard": obj(
                {
                    "enabled": boolean("run TensorBoard"),
                    "mode": {"type": "string", "enum": ["sidecar", "deployment"],
                             "description": "sidecar: in the training pods (rank 0's behind the Service); deployment: "
                                            "a Deployment of its own (ReadWriteMany storage only)"},
                    "port": integer("TensorBoard Service port", minimum=1, maximum=65535),
                    "image": obj(
                        {
                            "repository": string("TensorBoard image; empty: the training image"),
                            "tag": string("its tag; empty: the chart's appVersion"),
                        },
                        required=["repository", "tag"],
                    ),
                    "resources": container_resources("resources of the TensorBoard container"),
                    **component_scheduling("TensorBoard pod"),
                },
                required=["enabled", "mode", "port", "image"],
            ),
            "push": obj(
                {
                    "enabled": boolean("push the pipeline to the Hub when training completes"),
                    "mode": {"type": "string", "enum": ["trainer", "job"],
                             "description": "trainer: rank 0 pushes at the end of training; job: a Job of its own "
                                            "(ReadWriteMany storage only)"},
                    "tokenSecret": string("existing Secret with the Hub token", pattern=r"^([a-z0-9]([-.a-z0-9]*[a-z0-9])?)?$"),
                    "tokenSecretKey": string("key of the token in that Secret", minLength=1),
                    "pollSeconds": integer("seconds between checks for the completion marker", minimum=1),
                    "waitTimeoutSeconds": integer("seconds ddpm wait-for-training waits", minimum=1),
                    "deadlineSeconds": integer("seconds ddpm push may take", minimum=1),
                    "activeDeadlineSeconds": nullable(SECONDS, "deadline of the push Job; null: wait + push + 600"),
                    "backoffLimit": integer("retries of the push Job", minimum=0),
                    "serviceAccountName": string("ServiceAccount of the push pod; empty: one the chart creates",
                                                 pattern=r"^([a-z0-9]([-.a-z0-9]*[a-z0-9])?)?$"),
                    "resources": container_resources("resources of the push container"),
                    **component_scheduling("push pod"),
                },
                required=["enabled", "mode", "tokenSecret", "tokenSecretKey", "pollSeconds", "waitTimeoutSeconds",
                          "deadlineSeconds"],
            ),
            "tests": obj(
                {
                    "image": string("image of the helm test pod (needs sh and wget)", minLength=1),
                    **component_scheduling("test pod"),
                },
                required=["image"],
            ),
            # Helm adds this key to the values of every chart; it must be allowed.
            "global": {"type": "object"},
        },
        required=["image", "backend", "checkAPIVersions", "gpus", "gpusPerNode", "config", "storage", "tensorboard",
                  "push", "podSecurityContext", "containerSecurityContext", "serviceAccount", "rbac", "kubeflow",
                  "jobset", "elastic", "shm", "defaultResources", "tests"],
    )


def _loosen_numbers(node):
    """Let every `"type": "number"` also take a string spelling a number (see NUMBER_STRING)."""
    if isinstance(node, dict):
        if node.get("type") == "number":
            node["type"] = ["number", "string"]
            node["pattern"] = NUMBER_STRING
        for value in node.values():
            _loosen_numbers(value)
    elif isinstance(node, list):
        for value in node:
            _loosen_numbers(value)


def _drop_keys(node, keys):
    if isinstance(node, dict):
        for key in keys:
            node.pop(key, None)
        for value in node.values():
            _drop_keys(value, keys)
    elif isinstance(node, list):
        for value in node:
            _drop_keys(value, keys)


def config_schema() -> dict:
    sys.path.insert(0, str(ROOT))
    from trainer.config import TrainingConfig

    schema = copy.deepcopy(TrainingConfig.model_json_schema())
    # "title" repeats the field name; "format: path" is pydantic's own, not a JSON Schema format.
    for prop in schema["properties"].values():
        prop.pop("title", None)
    _drop_keys(schema, ["format"])
    _loosen_numbers(schema)
    schema["properties"]["output_dir"]["description"] = (
        "run folder; default: /data/<fullname>/output on the volume (must be under /data/)"
    )
    schema["properties"]["output_dir"].pop("default", None)
    result = {
        "type": "object",
        "additionalProperties": False,
        "description": "the trainer's TrainingConfig (trainer/config.py); unset fields keep the trainer's defaults",
        "properties": schema["properties"],
    }
    if "$defs" in schema:  # nested models, should TrainingConfig ever get any
        raise SystemExit("TrainingConfig has nested models; teach scripts/chart_schema.py to merge their $defs")
    return result


def kubernetes_defs() -> dict:
    import kubernetes_validate

    path = (Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
            / f"v{KUBERNETES_VERSION}-local-strict" / "_definitions.json")
    all_defs = json.loads(path.read_text())["$defs"]
    wanted: dict = {}

    def visit(name: str) -> None:
        if name in wanted:
            return
        definition = copy.deepcopy(all_defs[name])
        wanted[name] = definition
        text = json.dumps(definition)
        for target in re.findall(r'"\$ref": "[^"#]*#/\$defs/([^"]+)"', text):
            visit(target)

    for name in K8S_TYPES:
        visit(K8S + name)
    text = json.dumps(wanted)
    text = re.sub(r'"\$ref": "[^"#]*#/\$defs/', '"$ref": "#/$defs/', text)
    return dict(sorted(json.loads(text).items()))


def build() -> dict:
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "ddpm chart values",
        "$comment": "Generated by scripts/chart_schema.py (make chart-schema); do not edit by hand.",
    }
    schema.update(chart_values(config_schema()))
    schema["$defs"] = kubernetes_defs()
    return schema


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=False) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed schema is out of date")
    args = parser.parse_args()
    text = render()
    if args.check:
        if SCHEMA_PATH.read_text() != text:
            print(f"{SCHEMA_PATH.relative_to(ROOT)} is out of date: run `make chart-schema`", file=sys.stderr)
            return 1
        return 0
    SCHEMA_PATH.write_text(text)
    print(f"wrote {SCHEMA_PATH.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
