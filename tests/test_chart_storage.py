"""The shared volume: the default claim, storage that could not bind refused at install, and who mounts it. On a
single-node (ReadWriteOnce) volume only the training pods do (TensorBoard is their sidecar, rank 0 pushes); on
ReadWriteMany storage TensorBoard and the push may run as pods of their own.
"""

from __future__ import annotations

import pytest
import yaml

from chart import (
    BUSY, PUSH_JOB, PUSH_ON, RELEASE, RWX, TOLERATION, by_kind, merge, one, pod_templates, render, render_error,
    training_pods,
)


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


def claims(docs: list[dict]) -> dict[str, set[str]]:
    """Claim name -> the pod templates that mount it."""
    mounted: dict[str, set[str]] = {}
    for doc in docs:
        for where, template in pod_templates(doc):
            for volume in template["spec"].get("volumes", []):
                if "persistentVolumeClaim" in volume:
                    mounted.setdefault(volume["persistentVolumeClaim"]["claimName"], set()).add(where)
    return mounted


def claimants(docs: list[dict]) -> list[str]:
    """Every pod template that mounts a claim."""
    return sorted(where for pods in claims(docs).values() for where in pods)


def test_shared_storage_for_several_nodes():
    """Two nodes' pods (one Indexed Job of 2) mount one ReadWriteMany claim: the chart's, from the class named, or
    the user's existing one (then the chart creates none)."""
    docs = render(merge({"gpus": 16}, RWX))
    assert one(docs, "Job", "train")["spec"]["completions"] == 2
    pvc = one(docs, "PersistentVolumeClaim")
    assert (pvc["spec"]["accessModes"], pvc["spec"]["storageClassName"]) == (["ReadWriteMany"], "standard-rwx")
    assert claims(docs) == {pvc["metadata"]["name"]: {f"Job/{RELEASE}-train"}}
    docs = render({"gpus": 16, "storage": {"existingClaim": "shared", "accessModes": ["ReadWriteMany"]}})
    assert not by_kind(docs, "PersistentVolumeClaim")
    assert claims(docs) == {"shared": {f"Job/{RELEASE}-train"}}


@pytest.mark.parametrize("mode", ["ReadWriteOnce", "ReadWriteOncePod"])
def test_on_a_single_node_volume_only_the_training_pods_mount_it(mode):
    """WaitForFirstConsumer binds a ReadWriteOnce volume where its first pod lands: any other pod mounting it could
    take it to a node the trainer cannot use (the 0.3 deadlock); ReadWriteOncePod admits one pod at all. TensorBoard
    is a native sidecar of the training pod and rank 0 pushes; the Service shows rank 0's sidecar."""
    docs = render(merge(PUSH_ON, {"storage": {"accessModes": [mode]}}))
    assert one(docs, "PersistentVolumeClaim")["spec"]["accessModes"] == [mode]
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
