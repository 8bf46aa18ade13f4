"""Dynamic volume provisioning for the test cluster: an external provisioner of our own, as a CSI driver's
external-provisioner sidecar would act (kubernetes-csi/external-provisioner; the PV controller's part is
pkg/controller/volume/persistentvolume/pv_controller.go: it marks a claim of a class with an out-of-tree provisioner
with the `volume.kubernetes.io/storage-provisioner` annotation and binds the PV the provisioner creates).

Two StorageClasses, like a cloud's:
- `standard` (the default class): ReadWriteOnce, WaitForFirstConsumer, each volume a folder pinned to the node the
  scheduler chose for the claim's first pod (a `local` PV with required node affinity), as a zonal disk is pinned
  to its zone. So the real scheduler's VolumeBinding decides placement: every later pod of that claim can only run on
  that node, and a pod that needs a GPU elsewhere stays Pending.
- `shared`: ReadWriteMany, a folder every node mounts (an `nfs` PV that the process kubelet maps to a shared folder),
  standing in for NFS, Filestore, EFS or Azure Files.
Reclaim policy Delete: when a claim is deleted, its PV and folder go too.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

from cluster.api import Api, ApiError, Informer, path_of

PROVISIONER = "ddpm-test.local/folders"
PVCS, PVS = "api/v1/persistentvolumeclaims", "api/v1/persistentvolumes"
CLASSES = "apis/storage.k8s.io/v1/storageclasses"
SELECTED_NODE = "volume.kubernetes.io/selected-node"
NFS_SERVER = "nfs.ddpm-test.local"


def storage_classes() -> list[dict]:
    def storage_class(name: str, default: bool, mode: str) -> dict:
        annotations = {"storageclass.kubernetes.io/is-default-class": "true"} if default else {}
        return {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
                "metadata": {"name": name, "annotations": annotations, "labels": {"ddpm-test/access": mode}},
                "provisioner": PROVISIONER, "reclaimPolicy": "Delete", "volumeBindingMode": "WaitForFirstConsumer",
                "allowVolumeExpansion": False}

    return [storage_class("standard", True, "ReadWriteOnce"), storage_class("shared", False, "ReadWriteMany")]


class Provisioner:
    def __init__(self, api: Api, root: Path, nfs_root: Path, network):
        self.api, self.root, self.nfs_root, self.network = api, root, nfs_root, network
        self.stopping = threading.Event()
        self.classes: dict[str, dict] = {}
        self.lock = threading.Lock()
        self.log = open(root / "provisioner.log", "a", buffering=1)

    def start(self) -> "Provisioner":
        self.network.call(self._create_classes)
        for kind_path, handler in ((PVCS, self.on_claim), (PVS, self.on_volume)):
            self.network.thread(Informer(self.api, kind_path, handler, self.stopping.is_set).run,
                                f"provisioner-{kind_path}")
        return self

    def _create_classes(self) -> None:
        for sc in storage_classes():
            try:
                self.api.create("/" + CLASSES, sc)
            except ApiError as e:
                if e.status != 409:
                    raise
            self.classes[sc["metadata"]["name"]] = sc

    def stop(self) -> None:
        self.stopping.set()

    def on_claim(self, kind: str, claim: dict) -> None:
        if kind == "DELETED":
            return
        spec, meta = claim["spec"], claim["metadata"]
        sc = self.classes.get(spec.get("storageClassName") or "")
        if sc is None or spec.get("volumeName") or (claim.get("status") or {}).get("phase") == "Bound":
            return
        node = (meta.get("annotations") or {}).get(SELECTED_NODE)
        if sc["volumeBindingMode"] == "WaitForFirstConsumer" and not node:
            return  # not yet: the scheduler picks the node with the claim's first pod
        with self.lock:
            self.provision(claim, sc, node)

    def provision(self, claim: dict, sc: dict, node: str | None) -> None:
        meta, spec = claim["metadata"], claim["spec"]
        name = f"pvc-{meta['uid']}"
        if self.api.exists(path_of(PVS, None, name)):
            return
        shared = sc["metadata"]["name"] == "shared"
        if shared:
            folder = self.nfs_root / "exports" / name
            source = {"nfs": {"server": NFS_SERVER, "path": f"/exports/{name}"}}
            affinity = {}
        else:
            folder = self.root / "disks" / name
            source = {"local": {"path": str(folder)}}
            affinity = {"nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}]}}}
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o777)
        volume = {"apiVersion": "v1", "kind": "PersistentVolume",
                  "metadata": {"name": name, "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER},
                               "labels": {"ddpm-test/folder": "true"}},
                  "spec": {"capacity": {"storage": spec["resources"]["requests"]["storage"]},
                           "accessModes": spec["accessModes"], "volumeMode": spec.get("volumeMode", "Filesystem"),
                           "persistentVolumeReclaimPolicy": sc["reclaimPolicy"],
                           "storageClassName": sc["metadata"]["name"],
                           "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                                        "namespace": meta["namespace"], "name": meta["name"], "uid": meta["uid"]},
                           **source, **affinity}}
        try:
            self.api.create("/" + PVS, volume)
            self.log.write(f"provisioned {name} for {meta['namespace']}/{meta['name']} on {node or 'every node'}\n")
        except ApiError as e:
            if e.status != 409:
                self.log.write(f"provisioning {name} failed: {e}\n")

    def on_volume(self, kind: str, volume: dict) -> None:
        meta, spec = volume["metadata"], volume["spec"]
        if (meta.get("annotations") or {}).get("pv.kubernetes.io/provisioned-by") != PROVISIONER:
            return
        released = (volume.get("status") or {}).get("phase") == "Released"
        if kind == "DELETED" or not released or spec.get("persistentVolumeReclaimPolicy") != "Delete":
            return
        folder = Path(spec["local"]["path"]) if "local" in spec else \
            self.nfs_root / spec["nfs"]["path"].lstrip("/")
        shutil.rmtree(folder, ignore_errors=True)
        try:
            self.api.delete(path_of(PVS, None, meta["name"]))
            self.log.write(f"deleted {meta['name']} (its claim was deleted)\n")
        except ApiError as e:
            if e.status != 404:
                self.log.write(f"deleting {meta['name']} failed: {e}\n")
