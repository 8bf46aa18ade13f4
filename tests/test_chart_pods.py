"""What every pod gets: resources and QoS, scheduling (tolerations, pull secrets), labels, identity and the pod
knobs users set.
"""

from __future__ import annotations

import re

import pytest

from chart import (
    BACKENDS, BUSY, MATRIX, PUSH_JOB, RELEASE, RWX, TOLERATION, by_kind, full_pod_templates, merge, one,
    pod_templates, render, render_error, training_pods,
)


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
