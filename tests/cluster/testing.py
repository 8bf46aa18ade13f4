"""What the chart's end-to-end tests do on the test cluster: a namespace per test, a release installed with helm, and
waiting for what the controllers write (conditions, pods, Events), always with a deadline and a message that says
what was seen instead."""

from __future__ import annotations

import json
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cluster import Cluster, find_tool
from cluster.api import ApiError, path_of

CHART = Path(__file__).resolve().parents[2] / "helm"
POLL_S = 0.5  # how often a wait reads the API again


def wait_for(what: str, check: Callable[[], object], timeout_s: float, describe: Callable[[], str] = lambda: ""):
    """check() until it returns something truthy (returned), or fail after timeout_s saying what was seen."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}\n{describe()}")
        time.sleep(POLL_S)  # the controllers act asynchronously: nothing to wait on but the API's answer


def delete_namespace(cluster: Cluster, name: str, timeout_s: float = 180) -> None:
    """Delete a test's namespace and wait until its pods are gone (their GPUs and volumes released); the namespace
    controller removes the rest, and the namespace, while the next test runs."""
    try:
        cluster.api.delete(path_of("api/v1/namespaces", None, name))
    except ApiError as e:
        if e.status != 404:
            raise
    wait_for(f"the pods of namespace {name} to be deleted",
             lambda: not cluster.api.get(path_of("api/v1/pods", name))["items"], timeout_s)


def namespace(cluster: Cluster, prefix: str, pod_security: str | None = "restricted") -> str:
    """A fresh namespace; with `pod_security`, the Pod Security admission enforces that level in it."""
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    labels = {"pod-security.kubernetes.io/enforce": pod_security,
              "pod-security.kubernetes.io/enforce-version": "latest"} if pod_security else {}
    cluster.api.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                              "metadata": {"name": name, "labels": labels}})
    wait_for(f"the default ServiceAccount of {name}",
             lambda: cluster.api.exists(path_of("api/v1/serviceaccounts", name, "default")), 60)
    return name


@dataclass
class Release:
    cluster: Cluster
    name: str
    namespace: str
    values: dict = field(default_factory=dict)

    @property
    def fullname(self) -> str:
        """The chart's resource-name prefix (ddpm.fullname): the release name, or <release>-ddpm."""
        return self.name if "ddpm" in self.name else f"{self.name}-ddpm"

    @property
    def workload(self) -> str:
        return f"{self.fullname}-train"

    @property
    def claim(self) -> str:
        return f"{self.fullname}-data"

    def _values_file(self) -> Path:
        path = self.cluster.root / f"values-{self.namespace}-{self.name}.yaml"
        path.write_text(yaml.safe_dump(self.values))
        return path

    def install(self, *extra: str) -> str:
        return self.cluster.helm("install", self.name, str(CHART), "-n", self.namespace, "-f",
                                 str(self._values_file()), *extra).stdout

    def upgrade(self, *extra: str) -> str:
        return self.cluster.helm("upgrade", self.name, str(CHART), "-n", self.namespace, *extra).stdout

    def uninstall(self) -> str:
        return self.cluster.helm("uninstall", self.name, "-n", self.namespace, "--wait").stdout

    # ---- reading the cluster ----------------------------------------------------------------------------------------
    def get(self, kind_path: str, name: str) -> dict | None:
        try:
            return self.cluster.api.get(path_of(kind_path, self.namespace, name))
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def list(self, kind_path: str, **params) -> list[dict]:
        return self.cluster.api.get(path_of(kind_path, self.namespace), **params).get("items", [])

    def pods(self, component: str = "train") -> list[dict]:
        selector = f"app.kubernetes.io/instance={self.name},app.kubernetes.io/component={component}"
        return self.list("api/v1/pods", labelSelector=selector)

    def list_pods_of_claim(self) -> list[dict]:
        """Every pod in the namespace that mounts this release's claim."""
        return [p for p in self.list("api/v1/pods") if any(
            (v.get("persistentVolumeClaim") or {}).get("claimName") == self.claim for v in p["spec"].get("volumes") or [])]

    def newest_checkpoint(self) -> int:
        """The newest complete checkpoint's step on the volume (0: none yet)."""
        pvc = self.get("api/v1/persistentvolumeclaims", self.claim) or {}
        if not (pvc.get("spec") or {}).get("volumeName"):
            return 0  # not bound yet: no pod has started
        folder = self.volume_folder(self.claim) / self.fullname / "output" / "checkpoints"
        steps = [int(p.name.split("-")[1]) for p in folder.glob("checkpoint-*")] if folder.is_dir() else []
        return max(steps, default=0)

    def events(self, involved: str | None = None) -> list[dict]:
        items = self.list("api/v1/events")
        return [e for e in items if involved is None or e["involvedObject"]["name"] == involved]

    def reasons(self, involved: str | None = None) -> list[str]:
        return [e["reason"] for e in sorted(self.events(involved), key=lambda e: e.get("lastTimestamp") or "")]

    def describe(self) -> str:
        """What a person would look at when a wait fails: pods, workloads and recent Events."""
        out = self.cluster.kubectl("-n", self.namespace, "get", "pods,jobs,pvc", "-o", "wide", check=False).stdout
        events = self.cluster.kubectl("-n", self.namespace, "get", "events", "--sort-by=.lastTimestamp",
                                      check=False).stdout
        states = []
        for pod in self.list("api/v1/pods"):
            for status in (pod.get("status") or {}).get("containerStatuses") or []:
                state = status.get("state") or {}
                terminated = state.get("terminated") or {}
                states.append(f"{pod['metadata']['name']}/{status['name']}: phase {pod['status'].get('phase')}, "
                              f"{next(iter(state), '?')} exit {terminated.get('exitCode')} "
                              f"{terminated.get('reason', '')} restarts {status.get('restartCount')}")
        logs = ["\n".join(states)]
        for pod in self.list("api/v1/pods"):
            for container in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]:
                result = self.cluster.kubectl("-n", self.namespace, "logs", pod["metadata"]["name"], "-c",
                                              container["name"], "--tail=30", check=False)
                logs.append(f"--- {pod['metadata']['name']}/{container['name']}\n{result.stdout}{result.stderr}")
        return f"{out}\n{events[-6000:]}\n" + "\n".join(logs)

    def condition(self, kind_path: str, name: str, kind: str) -> dict | None:
        obj = self.get(kind_path, name) or {}
        return next((c for c in (obj.get("status") or {}).get("conditions") or []
                     if c["type"] == kind and c["status"] == "True"), None)

    def wait_condition(self, kind_path: str, name: str, kinds: tuple[str, ...], timeout_s: float) -> dict:
        """The first of `kinds` (e.g. Complete or Failed) to become True."""
        def check():
            return next((c for k in kinds if (c := self.condition(kind_path, name, k))), None)

        return wait_for(f"{name} to be {' or '.join(kinds)}", check, timeout_s, self.describe)

    def volume_folder(self, claim: str) -> Path:
        """The host folder behind a claim (what the pods see at the claim's mountPath)."""
        pvc = self.get("api/v1/persistentvolumeclaims", claim)
        pv = self.cluster.api.get(path_of("api/v1/persistentvolumes", None, pvc["spec"]["volumeName"]))
        spec = pv["spec"]
        if "local" in spec:
            return Path(spec["local"]["path"])
        return self.cluster.kubelet.nfs_root / spec["nfs"]["path"].lstrip("/")

    def logs(self, pod: str, container: str, *extra: str) -> str:
        return self.cluster.kubectl("-n", self.namespace, "logs", pod, "-c", container, *extra).stdout


@contextmanager
def paused(cluster: Cluster, release: "Release", final_step: int):
    """Every running training pod of the release paused (SIGSTOP to each of its processes, as a paused container)
    until the block ends (SIGCONT): the run cannot advance while the test reads its state or preempts one of its
    pods, so a preemption lands mid-run however fast this machine trains. Fails if the run had already reached
    `final_step` (its last checkpoint) before it was paused."""
    pods = [p["metadata"]["name"] for p in release.pods() if p["status"].get("phase") == "Running"]
    for pod in pods:
        cluster.kubelet.signal_pod(release.namespace, pod, signal.SIGSTOP)
    try:
        step = release.newest_checkpoint()
        assert step < final_step, f"the run reached step {step} of {final_step} before it was paused: lengthen it"
        yield pods
    finally:
        for pod in pods:
            with suppress(KeyError):  # deleted meanwhile
                cluster.kubelet.signal_pod(release.namespace, pod, signal.SIGCONT)


def evict_paused(cluster: Cluster, release: "Release", pod: str) -> None:
    """Evict `pod` of a paused run (inside paused()), and wait until the kubelet has sent its processes SIGTERM: the
    first thing they see when the run resumes is the preemption."""
    evict(cluster, release.namespace, pod)
    wait_for(f"the kubelet stopping {pod}", lambda: cluster.kubelet.stop_signalled(release.namespace, pod), 60,
             release.describe)


def resumed(release: "Release") -> bool:
    """Rank 0 posted a RunStarted Event for a start from a checkpoint (trainer.events)."""
    return any(e["reason"] == "RunStarted" and "training resumed from" in e["message"] for e in release.events())


def evict(cluster: Cluster, namespace: str, pod: str) -> None:
    """The Eviction API, as `kubectl drain` and the cluster autoscaler use it: the API server adds the
    DisruptionTarget condition and deletes the pod with its grace period."""
    cluster.api.create(path_of("api/v1/pods", namespace, pod, "eviction"),
                       {"apiVersion": "policy/v1", "kind": "Eviction",
                        "metadata": {"name": pod, "namespace": namespace}})


def as_json(text: str) -> dict:
    return json.loads(text)


# ---- the values the end-to-end tests install with ------------------------------------------------------------------
TOKEN = "hf_" + secrets.token_hex(16)  # the Hub write token of the tests' Secret (and the fake Hub's)
# 64 images, batch 4 per process x 2 processes: 8 steps per epoch. Seconds of CPU per step.
TINY = {"model_preset": "small", "image_size": 16, "builtin_num_images": 64, "train_batch_size": 4,
        "eval_batch_size": 4, "num_inference_steps": 2, "dataloader_num_workers": 0, "lr_warmup_steps": 2,
        "eval_quality_images": 0, "logging_steps": 2, "checkpointing_steps": 4, "save_image_epochs": 2,
        "max_train_steps": 16}
SHARED = {"storageClass": "shared", "accessModes": ["ReadWriteMany"], "size": "1Gi"}  # the cluster's RWX class
ENV = [{"name": "OMP_NUM_THREADS", "value": "1"}, {"name": "HF_HUB_OFFLINE", "value": "1"}]


def values(gpus: int = 2, storage: dict | None = None, config: dict | None = None, **overrides) -> dict:
    """Two one-GPU nodes on the shared volume, the tiny config; `overrides` are more chart values."""
    return {"gpus": gpus, "gpusPerNode": 1, "config": dict(TINY, **(config or {})),
            "storage": storage if storage is not None else SHARED, "extraEnv": list(ENV), **overrides}


def with_hub(base: dict, hub, repo: str, mode: str) -> dict:
    """`base` with the push on (`mode` trainer or job) to the fake Hub, token from the Secret `hf-token`."""
    base["config"]["hub_model_id"] = repo
    base["push"] = {"enabled": True, "mode": mode, "tokenSecret": "hf-token", "pollSeconds": 2}
    base["extraEnv"] = [e for e in base["extraEnv"] if e["name"] != "HF_HUB_OFFLINE"] + [
        {"name": "HF_ENDPOINT", "value": hub.url}, {"name": "HF_HUB_DISABLE_XET", "value": "1"}]
    return base


def token_secret(cluster: Cluster, ns: str) -> None:
    cluster.kubectl("-n", ns, "create", "secret", "generic", "hf-token", f"--from-literal=token={TOKEN}")


def marker(release: "Release") -> dict:
    """The completion marker the run wrote on the volume."""
    output = release.volume_folder(release.claim) / release.fullname / "output"
    return json.loads((output / "training_complete.json").read_text())


def ready(pod: dict, container: str) -> bool:
    statuses = (pod.get("status") or {}).get("initContainerStatuses", []) + \
        (pod.get("status") or {}).get("containerStatuses", [])
    return any(s["name"] == container and s.get("ready") for s in statuses)


def port_forward_get(cluster: Cluster, ns: str, target: str, port: int) -> int:
    """`kubectl port-forward <target> :<port>` (through the API server and the kubelet's port-forward endpoint), then
    GET / through it: the HTTP status."""
    forward = subprocess.Popen([find_tool("kubectl"), "-n", ns, "port-forward", target, f":{port}"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cluster.env())
    try:
        line = forward.stdout.readline()
        found = re.search(r"127\.0\.0\.1:(\d+)", line)
        assert found, f"kubectl port-forward {target}: {line}{forward.stdout.read() if forward.poll() is not None else ''}"
        with urllib.request.urlopen(f"http://127.0.0.1:{int(found[1])}/", timeout=30) as response:
            return response.status
    finally:
        forward.terminate()
        forward.wait()


def ddpm_status(cluster: Cluster, ns: str, kubeconfig: Path | None = None,
                release: str = "ddpm") -> subprocess.CompletedProcess:
    """`ddpm status` run from the host as a user would, with the admin's kubeconfig unless another is given."""
    return subprocess.run([sys.executable, "-m", "trainer", "status", "--release", release, "-n", ns],
                          capture_output=True, text=True,
                          env=cluster.env(KUBECONFIG=str(kubeconfig or cluster.kubeconfig)))


def status_ranks(result: subprocess.CompletedProcess) -> dict[str, str]:
    """The pod table of `ddpm status`'s output: pod name -> the node rank it shows."""
    return {line.split()[1]: line.split()[0] for line in result.stdout.splitlines()
            if line.strip()[:1].isdigit() or line.strip().startswith("? ")}
