"""The process kubelet: the one component of the test cluster that is not Kubernetes' own.

It registers Nodes (GPU nodes with `nvidia.com/gpu` capacity and the GPU taint, like a GKE GPU node pool, and CPU
nodes), renews their Leases, and runs every container of every pod the real scheduler binds to them as a local
process (tests/cluster/podexec.py: its own mount and UTS namespaces, volumes bind-mounted at their mountPaths, the
pod's hostname). It does what the kubelet does that the chart and the controllers depend on, read from
pkg/kubelet (kubelet_pods.go, status/status_manager.go, kuberuntime/kuberuntime_container.go, prober/,
nodeshutdown/) of Kubernetes v1.37:

- environment: the `kubernetes` Service variables always, the namespace's Service links unless enableServiceLinks
  is false, envFrom, then env in order with $(VAR) expansion and valueFrom (fieldRef, resourceFieldRef,
  configMapKeyRef, secretKeyRef); command/args over the image's ENTRYPOINT/CMD with $(VAR) expansion;
- volumes: PVC (the bound PV's folder, tests/cluster/provisioner.py), configMap, secret, emptyDir, hostPath,
  downwardAPI and projected (a bound service-account token from the TokenRequest API, a ConfigMap such as
  kube-root-ca.crt, downward API items), with items, subPath and readOnly;
- init containers in order, native sidecars (init containers with restartPolicy Always) started and kept running,
  then the containers; restartPolicy Never/OnFailure/Always with the kubelet's back-off; readiness, liveness and
  startup probes (httpGet, tcpSocket, exec);
- status: phase, the conditions the Job, Deployment and EndpointSlice controllers read (PodReadyToStartContainers,
  Initialized, ContainersReady, Ready), container states with exit codes and reasons, pod IP;
- deletion: SIGTERM to each container's main process, SIGKILL to everything it started after the grace period,
  the pod moved to a terminal phase (Failed unless every container exited 0) and then deleted with grace 0, as the
  kubelet does since PodDisruptionConditions; a node shutdown (a Spot reclaim) adds the DisruptionTarget condition
  (reason TerminationByKubelet) and fails the pods with reason Terminated (nodeshutdown_manager_linux.go);
- logs and port-forward through the API server: the streaming server (`kubeplane kubelet-streams`, Go) serves the
  kubelet API's endpoints from the state this kubelet writes (log files, pod IPs).

Networking (tests/cluster/network.py): each pod has its own network namespace and address on the cluster's bridge,
as with a CNI bridge plugin; `hostNetwork` pods share the node's. There is no cluster DNS: each
namespace has a hosts file, bind-mounted at /etc/hosts in its pods and rewritten in place as pods and Services
change, with each pod's FQDN (<hostname>.<subdomain>.<ns>.svc.cluster.local and its shorter forms) and each
Service's name pointing at a ready endpoint (headless: every one). A pod's own line comes first, so
`socket.getfqdn()` in a pod returns its own FQDN, as with kube-dns (torch's c10d rendezvous orders nodes by it).

Not emulated (said where it matters): resources and cgroups (nvidia.com/gpu is only a number the scheduler counts;
processes run on the CPU), runAsUser/fsGroup (processes run as the kubelet's user, root), image pulls (tests/cluster/
images.py), token refresh (tokens live 1 h; no test runs that long).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import urllib3

from cluster.api import Api, ApiError, Informer, path_of
from cluster.images import Images
from cluster.network import NODE_IP, ClusterNetwork, PodSandbox, unique_suffix

PODS, SERVICES, NODES = "api/v1/pods", "api/v1/services", "api/v1/nodes"
LEASES = "apis/coordination.k8s.io/v1/leases"
PODEXEC = Path(__file__).with_name("podexec.py")
KUBELET_VERSION = "v1.37.2"
LEASE_SECONDS, RENEW_SECONDS = 40, 10
BACKOFF_START_S, BACKOFF_MAX_S = 10.0, 300.0  # kuberuntime's container restart back-off
TICK_S = 0.2  # how often a pod worker looks at its processes and probes
SHUTDOWN_MESSAGE = "Pod was terminated in response to imminent node shutdown."


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class NodeSpec:
    name: str
    gpus: int = 0
    cpu: str = "16"
    memory: str = "128Gi"
    labels: dict[str, str] = field(default_factory=dict)
    taints: list[dict] = field(default_factory=list)


def gpu_node(name: str, gpus: int = 1, zone: str = "zone-a", **kwargs) -> NodeSpec:
    """A node of a GPU pool as GKE makes them: the GPU count, its product label and the nvidia.com/gpu taint."""
    return NodeSpec(name, gpus=gpus, labels={"cloud.google.com/gke-nodepool": "gpu-pool",
                                             "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
                                             "topology.kubernetes.io/zone": zone},
                    taints=[{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}], **kwargs)


def cpu_node(name: str, zone: str = "zone-a", **kwargs) -> NodeSpec:
    return NodeSpec(name, labels={"cloud.google.com/gke-nodepool": "default-pool",
                                  "topology.kubernetes.io/zone": zone}, **kwargs)


# ---- $(VAR) expansion (third_party/forked/golang/expansion as the kubelet uses it) ---------------------------------
def expand(text: str, env: dict[str, str]) -> str:
    out, i = [], 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("$(", i):
            end = text.find(")", i + 2)
            name = text[i + 2:end] if end >= 0 else None
            if name is not None and name in env:
                out.append(env[name])
            else:
                out.append(text[i:end + 1] if end >= 0 else text[i:])
            i = end + 1 if end >= 0 else len(text)
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


QUANTITY = re.compile(r"^([0-9.eE+-]+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
FACTORS = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def quantity(text: str) -> float:
    match = QUANTITY.match(str(text))
    if not match:
        raise ValueError(f"not a quantity: {text}")
    return float(match[1]) * FACTORS[match[2]]


class SetupError(Exception):
    """A pod cannot start yet (a missing ConfigMap, an unbound claim): retried, reported as the kubelet does."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


# ---- one container ---------------------------------------------------------------------------------------------------
@dataclass
class Container:
    spec: dict
    init: bool = False
    restart_count: int = 0
    popen: subprocess.Popen | None = None
    state: dict = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: dict = field(default_factory=dict)
    started_at: str | None = None
    ready: bool = False
    started: bool = False  # startup probe passed (or none)
    next_start: float = 0.0  # monotonic time of the next allowed (re)start
    probes: dict = field(default_factory=dict)  # kind -> {"next": t, "fails": n, "ok": n}
    log: Path | None = None
    previous_log: Path | None = None
    terminating: bool = False
    stop_signalled: bool = False  # SIGTERM sent by a deletion (after `terminating` is set)

    @property
    def name(self) -> str:
        return self.spec["name"]

    @property
    def sidecar(self) -> bool:
        return self.init and self.spec.get("restartPolicy") == "Always"

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def exit_code(self) -> int | None:
        terminated = self.state.get("terminated")
        return terminated["exitCode"] if terminated else None

    def status(self, image: str) -> dict:
        status = {"name": self.name, "image": image, "imageID": f"process://{image}",
                  "ready": self.ready, "restartCount": self.restart_count, "state": self.state,
                  "started": self.running and self.started}
        if self.popen is not None:
            status["containerID"] = f"process://{self.popen.pid}"
        if self.last_state:
            status["lastState"] = self.last_state
        return status


# ---- one pod -------------------------------------------------------------------------------------------------------
class PodWorker(threading.Thread):
    def __init__(self, kubelet: "ProcessKubelet", pod: dict):
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.kubelet, self.api = kubelet, kubelet.api
        self.pod = pod
        self.uid, self.namespace, self.pod_name = meta["uid"], meta["namespace"], meta["name"]
        self.node = kubelet.nodes[pod["spec"]["nodeName"]]
        self.dir = kubelet.root / "pods" / f"{self.namespace}_{self.pod_name}_{self.uid}"
        self.host_network = bool(pod["spec"].get("hostNetwork"))
        self.ip = NODE_IP if self.host_network else kubelet.network.allocate()
        self.sandbox: PodSandbox | None = None
        self.hostname = (pod["spec"].get("hostname") or self.pod_name)[:63]
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.delete_requested: float | None = None  # grace seconds
        self.shutdown_reason: str | None = None
        self.gone = False
        self.phase = "Pending"
        self.reason = self.message = None
        self.mounts: dict[str, str] = {}  # volume name -> host folder/file
        self.inits = [Container(c, init=True) for c in pod["spec"].get("initContainers") or []]
        self.containers = [Container(c) for c in pod["spec"]["containers"]]
        self.start_time = now()
        self.initialized = False
        self.sandbox_ready = False
        self.finished = False

    # -- events from the API --
    def update(self, pod: dict) -> None:
        with self.lock:
            self.pod = pod
            meta = pod["metadata"]
            if meta.get("deletionTimestamp") and self.delete_requested is None:
                self.delete_requested = float(meta.get("deletionGracePeriodSeconds") or 0)
        self.wake.set()

    def removed(self) -> None:
        self.gone = True
        self.delete_requested = 0.0
        self.wake.set()

    def shutdown(self, reason: str = SHUTDOWN_MESSAGE) -> None:
        """Graceful node shutdown: DisruptionTarget, then terminate with the pod's own grace period."""
        with self.lock:
            self.shutdown_reason = reason
            if self.delete_requested is None:
                self.delete_requested = float(self.pod["spec"].get("terminationGracePeriodSeconds", 30))
        self.wake.set()

    # -- the lifecycle --
    def run(self) -> None:
        self.kubelet.network.enter()
        try:
            self._run()
        except Exception as e:  # a bug here must show in the kubelet's log and the pod, and the pod still go away
            self.kubelet.log(f"pod {self.namespace}/{self.pod_name}: worker crashed: {type(e).__name__}: {e}")
            import traceback

            self.kubelet.log(traceback.format_exc())
            self.close_processes()
            self.phase, self.reason, self.message = "Failed", "KubeletError", f"{type(e).__name__}: {e}"
            self.push_status()
            self.wait_for_deletion()
        finally:
            self.finished = True
            if self.sandbox is not None:
                self.sandbox.stop()

    def _run(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.host_network:
            self.sandbox = PodSandbox(self.ip, unique_suffix(self.uid))
        self.kubelet.pod_started(self)
        self.push_status()
        while not self.sandbox_ready:
            if self.delete_requested is not None:
                return self.terminate()
            try:
                self.prepare_volumes()
                self.sandbox_ready = True
            except SetupError as e:
                self.set_waiting(e.reason, e.message)
                self.event("FailedMount" if e.reason != "CreateContainerConfigError" else "Failed", e.message,
                           warning=True, once=True)
                self.push_status()
                self.wake.wait(1.0)
                self.wake.clear()
        self.push_status()
        policy = self.pod["spec"].get("restartPolicy", "Always")
        while True:
            if self.delete_requested is not None:
                return self.terminate()
            changed = self.reap(self.inits + self.containers)  # exits first: a finished process is not restarted blindly
            changed |= self.step_init() if not self.initialized else False
            if self.initialized:
                changed |= self.step_containers(self.containers, policy)
            changed |= self.step_sidecars()
            changed |= self.run_probes()
            if self.initialized and self.all_done(policy):
                self.stop_sidecars()
                self.phase = "Succeeded" if all(c.exit_code == 0 for c in self.containers) else "Failed"
                self.push_status()
                self.kubelet.pod_changed(self)
                return self.wait_for_deletion()
            if self.phase == "Failed":  # an init container failed for good
                self.stop_sidecars()
                self.push_status()
                return self.wait_for_deletion()
            if changed:
                self.update_phase()
                self.push_status()
                self.kubelet.pod_changed(self)
            self.wake.wait(TICK_S)
            self.wake.clear()

    def wait_for_deletion(self) -> None:
        """A terminal pod stays until the API deletes it (Job finalizers, ttl, GC); then the kubelet confirms."""
        while self.delete_requested is None:
            self.wake.wait(5.0)
            self.wake.clear()
        self.finalize()

    def step_init(self) -> bool:
        """Run init containers one after the other; sidecars start and the next one begins."""
        changed = False
        for container in self.inits:
            if container.sidecar:
                if not container.running and container.exit_code is None:
                    changed |= self.start_container(container)
                if not (container.running and container.started):
                    return changed
                continue
            if container.exit_code == 0:
                continue
            if container.running:
                return changed
            if container.exit_code is not None:  # failed
                policy = self.pod["spec"].get("restartPolicy", "Always")
                if policy == "Never":
                    self.phase, self.reason = "Failed", None
                    return True
                if time.monotonic() < container.next_start:
                    return changed
            return changed | self.start_container(container)
        self.initialized = True
        return True

    def step_containers(self, containers: list[Container], policy: str) -> bool:
        changed = False
        for container in containers:
            if container.running or container.terminating:
                continue
            code = container.exit_code
            if time.monotonic() < container.next_start:
                continue
            if code is None or policy == "Always" or (policy == "OnFailure" and code != 0):
                changed |= self.start_container(container)
        return changed

    def step_sidecars(self) -> bool:
        sidecars = [c for c in self.inits if c.sidecar and (c.popen is not None or c.exit_code is not None)]
        changed = False
        for container in sidecars:
            if not container.running and not container.terminating and time.monotonic() >= container.next_start:
                changed |= self.start_container(container)
        return changed

    def reap(self, containers: list[Container]) -> bool:
        changed = False
        for container in containers:
            if container.popen is not None and container.popen.poll() is not None and "running" in container.state:
                self.record_exit(container)
                changed = True
        return changed

    def record_exit(self, container: Container) -> None:
        code = container.popen.returncode
        code = 128 - code if code < 0 else code  # killed by signal N: 128 + N
        start_error = code == 128 and container.started_at is not None and self.log_mentions_start_error(container)
        reason = "StartError" if start_error else ("Completed" if code == 0 else "Error")
        container.state = {"terminated": {"exitCode": code, "reason": reason, "startedAt": container.started_at,
                                          "finishedAt": now(), "containerID": f"process://{container.popen.pid}"}}
        container.ready = False
        delay = min(BACKOFF_MAX_S, BACKOFF_START_S * 2 ** max(0, container.restart_count))
        container.next_start = time.monotonic() + delay
        self.kill_tree(container, signal.SIGKILL)  # what the container started dies with it (its cgroup)

    def log_mentions_start_error(self, container: Container) -> bool:
        try:
            tail = container.log.read_text(errors="replace")[-400:]
        except OSError:
            return False
        return "executable file not found" in tail or "container setup failed" in tail

    def all_done(self, policy: str) -> bool:
        if policy == "Always":
            return False
        for container in self.containers:
            code = container.exit_code
            if container.running or code is None:
                return False
            if policy == "OnFailure" and code != 0:
                return False
        return True

    def update_phase(self) -> None:
        if self.phase in ("Succeeded", "Failed"):
            return
        if self.initialized and any(c.running for c in self.containers):
            self.phase = "Running"

    # -- containers --
    def start_container(self, container: Container) -> bool:
        if self.kubelet.held(self.pod_name, container.name):  # a test's slow image pull: not yet
            if container.popen is None:
                self.set_container_waiting(container, "ContainerCreating", "pulling the image")
            return False
        image = self.kubelet.images.find(container.spec["image"])
        if image is None:
            self.set_container_waiting(container, "ErrImagePull" if container.restart_count == 0 else
                                       "ImagePullBackOff", f"image {container.spec['image']} is not known to the "
                                       "process kubelet (tests/cluster/images.py)")
            self.event("Failed", f"Failed to pull image \"{container.spec['image']}\": not found", warning=True,
                       once=True)
            container.next_start = time.monotonic() + BACKOFF_START_S
            return True
        try:
            env = self.container_env(container.spec, image.env)
        except SetupError as e:
            self.set_container_waiting(container, e.reason, e.message)
            self.event("Failed", e.message, warning=True, once=True)
            container.next_start = time.monotonic() + 1.0
            return True
        argv = self.argv(container.spec, image, env)
        if container.popen is not None:  # a restart: the finished run's state becomes lastState
            container.last_state = container.state
            container.restart_count += 1
            container.previous_log = container.log
        logs = self.dir / "logs" / container.name
        logs.mkdir(parents=True, exist_ok=True)
        container.log = logs / f"{container.restart_count}.log"
        root = self.dir / "rootfs" / container.name
        root.mkdir(parents=True, exist_ok=True)
        spec = {"hostname": self.hostname, "hosts": str(self.kubelet.hosts_file(self.namespace)), "root": str(root),
                "mounts": self.container_mounts(container.spec, image), "keep": self.kubelet.keep_paths,
                "env": env, "argv": argv, "workdir": container.spec.get("workingDir") or image.workdir}
        spec_path = self.dir / f"{container.name}.spec.json"
        spec_path.write_text(json.dumps(spec))
        with open(container.log, "ab") as out:
            argv = ["setpriv", "--pdeathsig", "KILL", "--", "unshare", "--mount", "--uts", "--", sys.executable,
                    str(PODEXEC), str(spec_path)]  # gone with the kubelet, like a node's containers with its power
            container.popen = subprocess.Popen(
                self.sandbox.command(argv) if self.sandbox else argv,
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env={}, start_new_session=True)
        container.started_at = now()
        container.state = {"running": {"startedAt": container.started_at}}
        container.started = "startupProbe" not in container.spec
        container.ready = False
        container.probes = {}
        container.terminating = False
        self.kubelet.write_stream_state(self)
        self.event("Started", f"Started container {container.name}")
        return True

    def set_container_waiting(self, container: Container, reason: str, message: str) -> None:
        container.state = {"waiting": {"reason": reason, "message": message}}

    def set_waiting(self, reason: str, message: str) -> None:
        for container in self.inits + self.containers:
            if container.popen is None:
                self.set_container_waiting(container, reason, message)

    def argv(self, spec: dict, image, env: dict[str, str]) -> list[str]:
        command = spec.get("command")
        args = spec.get("args")
        if command:
            argv = list(command) + list(args or [])
        else:
            argv = list(image.entrypoint) + list(args if args is not None else image.cmd)
        return [expand(a, env) for a in argv]

    def kill_tree(self, container: Container, sig: int) -> None:
        if container.popen is None:
            return
        try:
            root = psutil.Process(container.popen.pid)
            family = root.children(recursive=True) + ([root] if root.is_running() else [])
        except psutil.NoSuchProcess:
            family = []
        # processes that escaped into their own sessions (torchrun's workers) are still children in the tree
        for process in family:
            try:
                process.send_signal(sig)
            except psutil.NoSuchProcess:
                pass

    def stop_container(self, container: Container, grace_s: float) -> None:
        """SIGTERM to the main process, SIGKILL to the whole tree after the grace period (kuberuntime killContainer)."""
        if not container.running:
            return
        container.terminating = True
        self.event("Killing", f"Stopping container {container.name}")
        container.popen.send_signal(signal.SIGTERM)
        container.stop_signalled = True
        try:
            container.popen.wait(max(grace_s, 0.0))
        except subprocess.TimeoutExpired:
            pass
        self.kill_tree(container, signal.SIGKILL)
        container.popen.wait()
        self.record_exit(container)

    def stop_sidecars(self, grace_s: float | None = None) -> None:
        grace = self.grace() if grace_s is None else grace_s
        for container in reversed([c for c in self.inits if c.sidecar]):
            self.stop_container(container, grace)

    def grace(self) -> float:
        return float(self.pod["spec"].get("terminationGracePeriodSeconds", 30))

    def terminate(self) -> None:
        """Deletion or node shutdown: stop the containers (in parallel, each with the grace), then sidecars."""
        grace = self.delete_requested if self.delete_requested is not None else self.grace()
        if self.shutdown_reason:
            self.add_condition({"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet",
                                "message": self.shutdown_reason, "lastTransitionTime": now()})
        deadline = time.monotonic() + grace
        stoppers = [threading.Thread(target=self.stop_container, args=(c, grace)) for c in self.containers
                    + [c for c in self.inits if not c.sidecar]]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join()
        self.stop_sidecars(max(0.0, deadline - time.monotonic()))
        regular = self.containers
        self.phase = "Succeeded" if regular and all(c.exit_code == 0 for c in regular) else "Failed"
        if self.shutdown_reason:
            self.reason, self.message = "Terminated", self.shutdown_reason
        for container in self.inits + self.containers:
            if container.popen is None:
                container.state = {"terminated": {"exitCode": 137, "reason": "ContainerStatusUnknown",
                                                  "message": "The container could not be located when the pod was "
                                                             "terminated", "finishedAt": now()}}
        self.push_status()
        self.kubelet.pod_changed(self)
        if self.shutdown_reason and self.pod["metadata"].get("deletionTimestamp") is None:
            return self.wait_for_deletion()
        self.finalize()

    def finalize(self) -> None:
        """The containers are gone: let the API server remove the pod (grace 0, this pod's uid only)."""
        if not self.gone:
            try:
                self.api.delete(path_of(PODS, self.namespace, self.pod_name),
                                {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                                 "preconditions": {"uid": self.uid}})
            except ApiError as e:
                if e.status not in (404, 409):
                    self.kubelet.log(f"pod {self.namespace}/{self.pod_name}: delete failed: {e}")
        self.kubelet.pod_gone(self)

    # -- probes --
    def run_probes(self) -> bool:
        changed = False
        for container in self.inits + self.containers:
            if not container.running:
                continue
            if container.init and not container.sidecar:
                continue
            for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                probe = container.spec.get(kind)
                if kind == "readinessProbe" and probe is None:
                    ready = container.started
                    if container.ready != ready:
                        container.ready, changed = ready, True
                    continue
                if probe is None or (kind != "startupProbe" and not container.started):
                    continue
                if kind == "startupProbe" and container.started:
                    continue
                changed |= self.probe(container, kind, probe)
        return changed

    def probe(self, container: Container, kind: str, probe: dict) -> bool:
        state = container.probes.setdefault(kind, {"next": time.monotonic() + probe.get("initialDelaySeconds", 0),
                                                   "fails": 0, "ok": 0})
        if time.monotonic() < state["next"]:
            return False
        state["next"] = time.monotonic() + probe.get("periodSeconds", 10)
        ok = self.check(container, probe)
        state["fails"], state["ok"] = (0, state["ok"] + 1) if ok else (state["fails"] + 1, 0)
        if kind == "readinessProbe":
            ready = (container.ready and state["fails"] < probe.get("failureThreshold", 3)) or \
                    (not container.ready and state["ok"] >= probe.get("successThreshold", 1))
            if ready != container.ready:
                container.ready = ready
                if not ready:
                    self.event("Unhealthy", f"Readiness probe failed for {container.name}", warning=True)
                return True
            return False
        if kind == "startupProbe":
            if ok:
                container.started = True
                return True
        if state["fails"] >= probe.get("failureThreshold", 3):
            self.event("Unhealthy", f"{kind.replace('Probe', '').capitalize()} probe failed for {container.name}; "
                       "restarting it", warning=True)
            state["fails"] = 0
            self.stop_container(container, float(probe.get("terminationGracePeriodSeconds") or self.grace()))
            container.next_start = 0.0
            return True
        return False

    def check(self, container: Container, probe: dict) -> bool:
        timeout = float(probe.get("timeoutSeconds", 1))
        try:
            if "httpGet" in probe:
                get = probe["httpGet"]
                port = self.port_number(container, get["port"])
                url = f"{get.get('scheme', 'HTTP').lower()}://{self.ip}:{port}{get.get('path', '/')}"
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    return 200 <= response.status < 400
            if "tcpSocket" in probe:
                port = self.port_number(container, probe["tcpSocket"]["port"])
                with socket.create_connection((self.ip, port), timeout=timeout):
                    return True
            if "exec" in probe:
                result = subprocess.run(["nsenter", "-t", str(container.popen.pid), "-m", "-u", "-n", "--",
                                         *probe["exec"]["command"]], capture_output=True, timeout=timeout)
                return result.returncode == 0
        except (OSError, urllib.error.URLError, subprocess.TimeoutExpired, ValueError):
            return False
        return False

    @staticmethod
    def port_number(container: Container, port) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for declared in container.spec.get("ports") or []:
            if declared.get("name") == port:
                return int(declared["containerPort"])
        raise ValueError(f"no port named {port}")

    # -- status --
    def add_condition(self, condition: dict) -> None:
        try:
            self.api.patch(path_of(PODS, self.namespace, self.pod_name, "status"),
                           {"status": {"conditions": [condition]}})
        except ApiError as e:
            self.kubelet.log(f"pod {self.namespace}/{self.pod_name}: condition {condition['type']} not set: {e}")

    def status(self) -> dict:
        def condition(kind: str, ok: bool) -> dict:
            return {"type": kind, "status": "True" if ok else "False", "lastProbeTime": None,
                    "lastTransitionTime": self.kubelet.transition(self.uid, kind, ok)}

        regular_ready = bool(self.containers) and all(c.ready for c in self.containers)
        sidecars_ready = all(c.ready for c in self.inits if c.sidecar)
        terminal = self.phase in ("Succeeded", "Failed")
        ready = regular_ready and sidecars_ready and not terminal
        status = {
            "phase": self.phase, "hostIP": NODE_IP, "hostIPs": [{"ip": NODE_IP}],
            "podIP": self.ip, "podIPs": [{"ip": self.ip}], "startTime": self.start_time,
            "conditions": [condition("PodReadyToStartContainers", self.sandbox_ready and not terminal),
                           condition("Initialized", self.initialized),
                           condition("ContainersReady", ready), condition("Ready", ready)],
            "containerStatuses": [c.status(c.spec["image"]) for c in self.containers],
        }
        if self.inits:
            status["initContainerStatuses"] = [c.status(c.spec["image"]) for c in self.inits]
        if self.reason:
            status["reason"], status["message"] = self.reason, self.message
        return status

    def push_status(self) -> None:
        try:
            self.api.patch(path_of(PODS, self.namespace, self.pod_name, "status"), {"status": self.status()})
        except ApiError as e:
            if e.status != 404:
                self.kubelet.log(f"pod {self.namespace}/{self.pod_name}: status not written: {e}")
        except (OSError, urllib3.exceptions.HTTPError) as e:  # the API server is gone (the cluster is stopping)
            self.kubelet.log(f"pod {self.namespace}/{self.pod_name}: status not written: {e}")

    def event(self, reason: str, message: str, warning: bool = False, once: bool = False) -> None:
        self.kubelet.event(self.pod, reason, message, warning, once)

    # -- volumes and environment --
    def prepare_volumes(self) -> None:
        for volume in self.pod["spec"].get("volumes") or []:
            if volume["name"] not in self.mounts:
                self.mounts[volume["name"]] = self.volume(volume)

    def volume(self, volume: dict) -> str:
        name = volume["name"]
        folder = self.dir / "volumes" / name
        if "emptyDir" in volume:
            folder.mkdir(parents=True, exist_ok=True)
            return str(folder)
        if "hostPath" in volume:
            path = Path(volume["hostPath"]["path"])
            if volume["hostPath"].get("type") in ("DirectoryOrCreate",):
                path.mkdir(parents=True, exist_ok=True)
            return str(path)
        if "persistentVolumeClaim" in volume:
            return self.claim_folder(volume["persistentVolumeClaim"]["claimName"])
        if "configMap" in volume:
            return self.write_files(folder, self.config_map_files(volume["configMap"]))
        if "secret" in volume:
            return self.write_files(folder, self.secret_files(volume["secret"]))
        if "downwardAPI" in volume:
            return self.write_files(folder, self.downward_files(volume["downwardAPI"].get("items") or []))
        if "projected" in volume:
            files: dict[str, bytes] = {}
            for source in volume["projected"].get("sources") or []:
                if "serviceAccountToken" in source:
                    token = source["serviceAccountToken"]
                    files[token["path"]] = self.token(token).encode()
                elif "configMap" in source:
                    files.update(self.config_map_files(source["configMap"]))
                elif "secret" in source:
                    files.update(self.secret_files(source["secret"]))
                elif "downwardAPI" in source:
                    files.update(self.downward_files(source["downwardAPI"].get("items") or []))
            return self.write_files(folder, files)
        if "nfs" in volume:
            return str(self.kubelet.nfs_root / volume["nfs"]["path"].lstrip("/"))
        raise SetupError("FailedMount", f"volume {name}: this process kubelet mounts no {sorted(volume)} volumes")

    def claim_folder(self, claim: str) -> str:
        try:
            pvc = self.api.get(path_of("api/v1/persistentvolumeclaims", self.namespace, claim))
        except ApiError as e:
            raise SetupError("FailedMount", f"persistentvolumeclaim \"{claim}\" not found ({e.status})") from e
        volume_name = pvc["spec"].get("volumeName")
        if pvc.get("status", {}).get("phase") != "Bound" or not volume_name:
            raise SetupError("FailedMount", f"persistentvolumeclaim \"{claim}\" is not bound")
        pv = self.api.get(path_of("api/v1/persistentvolumes", None, volume_name))
        spec = pv["spec"]
        if "local" in spec:
            return spec["local"]["path"]
        if "hostPath" in spec:
            return spec["hostPath"]["path"]
        if "nfs" in spec:
            return str(self.kubelet.nfs_root / spec["nfs"]["path"].lstrip("/"))
        raise SetupError("FailedMount", f"volume {volume_name} has a source this kubelet cannot mount")

    def config_map_files(self, ref: dict) -> dict[str, bytes]:
        try:
            cm = self.api.get(path_of("api/v1/configmaps", self.namespace, ref["name"]))
        except ApiError as e:
            if ref.get("optional"):
                return {}
            raise SetupError("FailedMount", f"configmap \"{ref['name']}\" not found") from e
        data = {k: v.encode() for k, v in (cm.get("data") or {}).items()}
        data.update({k: base64.b64decode(v) for k, v in (cm.get("binaryData") or {}).items()})
        return self.items(data, ref.get("items"))

    def secret_files(self, ref: dict) -> dict[str, bytes]:
        name = ref.get("secretName") or ref.get("name")
        try:
            secret = self.api.get(path_of("api/v1/secrets", self.namespace, name))
        except ApiError as e:
            if ref.get("optional"):
                return {}
            raise SetupError("FailedMount", f"secret \"{name}\" not found") from e
        data = {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}
        return self.items(data, ref.get("items"))

    @staticmethod
    def items(data: dict[str, bytes], items: list | None) -> dict[str, bytes]:
        if not items:
            return data
        return {item["path"]: data[item["key"]] for item in items if item["key"] in data}

    def downward_files(self, items: list) -> dict[str, bytes]:
        files = {}
        for item in items:
            if "fieldRef" in item:
                files[item["path"]] = self.field(item["fieldRef"]["fieldPath"]).encode()
            elif "resourceFieldRef" in item:
                files[item["path"]] = self.resource_field(item["resourceFieldRef"]).encode()
        return files

    def token(self, source: dict) -> str:
        spec = {"expirationSeconds": int(source.get("expirationSeconds", 3600)),
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": self.pod_name, "uid": self.uid}}
        if source.get("audience"):
            spec["audiences"] = [source["audience"]]
        account = self.pod["spec"].get("serviceAccountName") or "default"
        try:
            answer = self.api.create(path_of("api/v1/serviceaccounts", self.namespace, account, "token"),
                                     {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                                      "spec": spec})
        except ApiError as e:
            raise SetupError("FailedMount", f"cannot get a token for service account {account}: {e}") from e
        return answer["status"]["token"]

    @staticmethod
    def write_files(folder: Path, files: dict[str, bytes]) -> str:
        folder.mkdir(parents=True, exist_ok=True)
        for relative, content in files.items():
            path = folder / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        return str(folder)

    def field(self, path: str) -> str:
        meta, spec = self.pod["metadata"], self.pod["spec"]
        simple = {"metadata.name": meta["name"], "metadata.namespace": meta["namespace"], "metadata.uid": meta["uid"],
                  "spec.nodeName": spec.get("nodeName", ""), "spec.serviceAccountName": spec.get("serviceAccountName", ""),
                  "status.hostIP": NODE_IP, "status.hostIPs": NODE_IP, "status.podIP": self.ip,
                  "status.podIPs": self.ip}
        if path in simple:
            return simple[path]
        match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
        if match:
            return (meta.get(match[1]) or {}).get(match[2], "")
        if path in ("metadata.labels", "metadata.annotations"):
            values = meta.get(path.split(".")[1]) or {}
            return "\n".join(f'{k}="{v}"' for k, v in sorted(values.items()))
        raise SetupError("CreateContainerConfigError", f"unsupported fieldRef {path}")

    def resource_field(self, ref: dict, container: dict | None = None) -> str:
        name = ref.get("containerName")
        spec = container or next((c for c in self.pod["spec"]["containers"] if c["name"] == name),
                                 self.pod["spec"]["containers"][0])
        kind, _, resource = ref["resource"].partition(".")
        value = ((spec.get("resources") or {}).get(kind) or {}).get(resource)
        if value is None:  # no limit: the node's allocatable
            value = {"cpu": self.node.cpu, "memory": self.node.memory}.get(resource, "0")
        divisor = quantity(ref.get("divisor", "1"))
        amount = quantity(value) / divisor
        return str(int(-(-amount // 1)))  # the kubelet rounds up

    def container_env(self, spec: dict, image_env: dict[str, str]) -> dict[str, str]:
        env = dict(image_env)
        env["HOSTNAME"] = self.hostname
        env.update(self.kubelet.service_env(self.namespace, self.pod["spec"].get("enableServiceLinks", True)))
        for source in spec.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "configMapRef" in source:
                data = {k: v.decode() for k, v in self.config_map_files(source["configMapRef"]).items()}
            else:
                data = {k: v.decode(errors="replace") for k, v in self.secret_files(source["secretRef"]).items()}
            env.update({prefix + k: v for k, v in data.items()})
        for item in spec.get("env") or []:
            if "valueFrom" not in item:
                env[item["name"]] = expand(item.get("value", ""), env)
                continue
            source = item["valueFrom"]
            if "fieldRef" in source:
                env[item["name"]] = self.field(source["fieldRef"]["fieldPath"])
            elif "resourceFieldRef" in source:
                env[item["name"]] = self.resource_field(source["resourceFieldRef"], spec)
            elif "configMapKeyRef" in source or "secretKeyRef" in source:
                secret = "secretKeyRef" in source
                ref = source["secretKeyRef" if secret else "configMapKeyRef"]
                try:
                    data = self.secret_files({"secretName": ref["name"]}) if secret else \
                        self.config_map_files({"name": ref["name"]})
                except SetupError:
                    if ref.get("optional"):
                        continue
                    kind = "secret" if secret else "configmap"
                    raise SetupError("CreateContainerConfigError", f"{kind} \"{ref['name']}\" not found") from None
                if ref["key"] not in data:
                    if ref.get("optional"):
                        continue
                    raise SetupError("CreateContainerConfigError",
                                     f"couldn't find key {ref['key']} in {'Secret' if secret else 'ConfigMap'} "
                                     f"{self.namespace}/{ref['name']}")
                env[item["name"]] = data[ref["key"]].decode(errors="replace")
        return env

    def container_mounts(self, spec: dict, image) -> list[dict]:
        mounts = [{"source": source, "target": target, "read_only": True} for target, source in image.mounts]
        for mount in spec.get("volumeMounts") or []:
            source = self.mounts.get(mount["name"])
            if source is None:
                continue
            sub = mount.get("subPath") or ""
            if mount.get("subPathExpr"):
                sub = expand(mount["subPathExpr"], {})
            if sub:
                source = str(Path(source) / sub)
                if not Path(source).exists():
                    Path(source).mkdir(parents=True, exist_ok=True)
            read_only = bool(mount.get("readOnly"))
            volume = next((v for v in self.pod["spec"].get("volumes") or [] if v["name"] == mount["name"]), {})
            if (volume.get("persistentVolumeClaim") or {}).get("readOnly") or any(
                    k in volume for k in ("configMap", "secret", "projected", "downwardAPI")):
                read_only = True
            mounts.append({"source": source, "target": mount["mountPath"], "read_only": read_only})
        return mounts

    def close_processes(self) -> None:
        for container in self.inits + self.containers:
            self.kill_tree(container, signal.SIGKILL)


# ---- the kubelet ---------------------------------------------------------------------------------------------------
class ProcessKubelet:
    def __init__(self, api: Api, root: Path, nodes: list[NodeSpec], images: Images, network: ClusterNetwork, *,
                 apiserver: tuple[str, int], streams_port: int, keep_paths: list[str] = (),
                 nfs_root: Path | None = None):
        self.api, self.root, self.images, self.network = api, root, images, network
        self.apiserver, self.streams_port = apiserver, streams_port
        self.keep_paths = [str(p) for p in keep_paths]
        self.nfs_root = nfs_root or root / "nfs"
        self.nodes: dict[str, NodeSpec] = {}
        self.workers: dict[str, PodWorker] = {}  # pod uid -> worker
        self.services: dict[str, dict] = {}  # uid -> Service
        self.stopping = threading.Event()
        self.lock = threading.RLock()
        self.transitions: dict[tuple[str, str], tuple[bool, str]] = {}
        self.events_sent: set[tuple] = set()
        self.logfile = open(root / "kubelet.log", "a", buffering=1)
        self.threads: list[threading.Thread] = []
        self.leases: set[str] = set()
        self.holds: list[tuple[re.Pattern, str | None, threading.Event]] = []
        for spec in nodes:
            self.nodes[spec.name] = spec
        (root / "streams" / "pods").mkdir(parents=True, exist_ok=True)
        (root / "hosts").mkdir(parents=True, exist_ok=True)

    def log(self, line: str) -> None:
        if not self.logfile.closed:
            self.logfile.write(f"{micro_now()} {line}\n")

    # -- lifecycle --
    def start(self) -> "ProcessKubelet":
        for spec in list(self.nodes.values()):
            self.network.call(self.register, spec)
        for name, target in (("leases", self.lease_loop),
                             ("pods", Informer(self.api, PODS, self.on_pod, self.stopping.is_set).run),
                             ("services", Informer(self.api, SERVICES, self.on_service, self.stopping.is_set).run)):
            self.threads.append(self.network.thread(target, f"kubelet-{name}"))
        return self

    def stop(self) -> None:
        self.stopping.set()
        with self.lock:
            workers = list(self.workers.values())
        for worker in workers:
            worker.close_processes()
            if worker.sandbox is not None:
                worker.sandbox.stop()
        self.logfile.close()

    # -- nodes --
    def register(self, spec: NodeSpec) -> None:
        labels = {"kubernetes.io/hostname": spec.name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                  **spec.labels}
        body = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": spec.name, "labels": labels},
                "spec": {"taints": spec.taints}}
        try:
            self.api.create("/" + NODES, body)
        except ApiError as e:
            if e.status != 409:
                raise
        self.nodes[spec.name] = spec
        self.leases.add(spec.name)
        self.node_status(spec)
        self.renew(spec.name)

    def add_node(self, spec: NodeSpec) -> None:
        self.network.call(self.register, spec)

    def node_status(self, spec: NodeSpec) -> None:
        resources = {"cpu": spec.cpu, "memory": spec.memory, "pods": "110", "ephemeral-storage": "500Gi"}
        if spec.gpus:
            resources["nvidia.com/gpu"] = str(spec.gpus)
        conditions = [{"type": kind, "status": status, "reason": reason, "message": reason,
                       "lastHeartbeatTime": now(), "lastTransitionTime": self.transition(spec.name, kind, True)}
                      for kind, status, reason in (("MemoryPressure", "False", "KubeletHasSufficientMemory"),
                                                   ("DiskPressure", "False", "KubeletHasNoDiskPressure"),
                                                   ("PIDPressure", "False", "KubeletHasSufficientPID"),
                                                   ("Ready", "True", "KubeletReady"))]
        status = {"capacity": resources, "allocatable": resources, "conditions": conditions,
                  "addresses": [{"type": "InternalIP", "address": NODE_IP},
                                {"type": "Hostname", "address": spec.name}],
                  "daemonEndpoints": {"kubeletEndpoint": {"Port": self.streams_port}},
                  "nodeInfo": {"machineID": uuid.uuid5(uuid.NAMESPACE_DNS, spec.name).hex,
                               "systemUUID": str(uuid.uuid5(uuid.NAMESPACE_URL, spec.name)),
                               "bootID": str(uuid.uuid4()), "kernelVersion": os.uname().release,
                               "osImage": "ddpm-trainer process kubelet", "containerRuntimeVersion": "process://1",
                               "kubeletVersion": KUBELET_VERSION, "kubeProxyVersion": "",
                               "operatingSystem": "linux", "architecture": "amd64"}}
        self.api.patch(path_of(NODES, None, spec.name, "status"), {"status": status})

    def renew(self, node: str) -> None:
        path = path_of(LEASES, "kube-node-lease", node)
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": node, "namespace": "kube-node-lease"},
                "spec": {"holderIdentity": node, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": micro_now()}}
        try:
            self.api.patch(path, {"spec": body["spec"]}, content_type="application/merge-patch+json")
        except ApiError as e:
            if e.status != 404:
                raise
            self.api.create(path_of(LEASES, "kube-node-lease"), body)

    def lease_loop(self) -> None:
        beats = 0
        while not self.stopping.wait(RENEW_SECONDS):
            beats += 1
            for node in list(self.leases):
                try:
                    self.renew(node)
                    if beats % 6 == 0:
                        self.node_status(self.nodes[node])
                except (ApiError, OSError) as e:
                    self.log(f"node {node}: heartbeat failed: {e}")

    def shutdown_node(self, name: str, delete_node: bool = True) -> None:
        self.network.call(self._shutdown_node, name, delete_node)

    def _shutdown_node(self, name: str, delete_node: bool) -> None:
        """A Spot reclaim: the node is cordoned, its pods are terminated by the kubelet's graceful node shutdown
        (DisruptionTarget, phase Failed, reason Terminated), then the node is gone (its Lease stops, the Node is
        deleted) and PodGC removes what is left of its pods."""
        self.api.patch(path_of(NODES, None, name), {"spec": {"unschedulable": True}})
        with self.lock:
            workers = [w for w in self.workers.values() if w.node.name == name]
        for worker in workers:
            worker.shutdown()
        for worker in workers:
            while not worker.finished and worker.phase not in ("Succeeded", "Failed"):
                time.sleep(0.1)  # waiting for each pod's own grace period to play out
        if delete_node:
            self.leases.discard(name)
            try:
                self.api.delete(path_of(NODES, None, name))
            except ApiError as e:
                if e.status != 404:
                    raise

    # -- pods --
    def on_pod(self, kind: str, pod: dict) -> None:
        uid = pod["metadata"]["uid"]
        node = pod["spec"].get("nodeName")
        with self.lock:
            worker = self.workers.get(uid)
            if kind == "DELETED":
                if worker is not None:
                    worker.removed()
                return
            if node not in self.nodes:
                return
            if worker is None:
                if pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                    return  # a pod this kubelet finished before (or never ran): nothing to do
                worker = self.workers[uid] = PodWorker(self, pod)
                worker.start()
                return
        worker.update(pod)

    def pod_started(self, worker: PodWorker) -> None:
        self.write_stream_state(worker)
        self.pod_changed(worker)

    def pod_changed(self, worker: PodWorker) -> None:
        self.write_stream_state(worker)
        self.write_hosts(worker.namespace)

    def pod_gone(self, worker: PodWorker) -> None:
        with self.lock:
            self.workers.pop(worker.uid, None)
        (self.root / "streams" / "pods" / worker.namespace / f"{worker.pod_name}.json").unlink(missing_ok=True)
        self.write_hosts(worker.namespace)

    def write_stream_state(self, worker: PodWorker) -> None:
        state = {"uid": worker.uid, "ip": worker.ip, "containers": {
            c.name: {"log": str(c.log) if c.log else None,
                     "previous_log": str(c.previous_log) if c.previous_log else None, "running": c.running}
            for c in worker.inits + worker.containers}}
        folder = self.root / "streams" / "pods" / worker.namespace
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{worker.pod_name}.json.tmp"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, folder / f"{worker.pod_name}.json")

    # -- names: Services and the hosts files --
    def on_service(self, kind: str, service: dict) -> None:
        with self.lock:
            if kind == "DELETED":
                self.services.pop(service["metadata"]["uid"], None)
            else:
                self.services[service["metadata"]["uid"]] = service
        self.write_hosts(service["metadata"]["namespace"])

    def hosts_file(self, namespace: str) -> Path:
        path = self.root / "hosts" / namespace
        if not path.exists():
            self.write_hosts(namespace)
        return path

    def write_hosts(self, namespace: str) -> None:
        with self.lock:
            pods = [w for w in self.workers.values() if w.namespace == namespace]
            services = [s for s in self.services.values() if s["metadata"]["namespace"] == namespace]
            lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
            for w in pods:
                if w.phase in ("Succeeded", "Failed"):
                    continue
                names = [w.hostname]
                subdomain = w.pod["spec"].get("subdomain")
                if subdomain:
                    base = f"{w.hostname}.{subdomain}"
                    names = [f"{base}.{namespace}.svc.cluster.local", f"{base}.{namespace}.svc",
                             f"{base}.{namespace}", base, w.hostname]
                else:
                    names = [f"{w.hostname}.{namespace}.pod.cluster.local", w.hostname]
                lines.append(f"{w.ip}\t" + " ".join(names))
            for service in services:
                lines += self.service_lines(service, pods)
            text = "\n".join(lines) + "\n"
            path = self.root / "hosts" / namespace
            # In place (same inode): the file is bind-mounted at /etc/hosts in running pods.
            with open(path, "a+") as f:
                f.seek(0)
                if f.read() != text:
                    f.seek(0)
                    f.truncate()
                    f.write(text)

    @staticmethod
    def service_lines(service: dict, pods: list[PodWorker]) -> list[str]:
        spec, meta = service["spec"], service["metadata"]
        selector = spec.get("selector")
        if not selector:
            return []
        not_ready_ok = spec.get("publishNotReadyAddresses", False)
        ns, name = meta["namespace"], meta["name"]
        names = f"{name}.{ns}.svc.cluster.local {name}.{ns}.svc {name}.{ns} {name}"
        ips = []
        for w in pods:
            labels = w.pod["metadata"].get("labels") or {}
            if w.phase in ("Succeeded", "Failed") or any(labels.get(k) != v for k, v in selector.items()):
                continue
            ready = w.initialized and all(c.ready for c in w.containers)
            if ready or not_ready_ok:
                ips.append(w.ip)
        return [f"{ip}\t{names}" for ip in ips]

    def service_env(self, namespace: str, links: bool) -> dict[str, str]:
        host, port = self.apiserver
        env = {"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": str(port),
               "KUBERNETES_SERVICE_PORT_HTTPS": str(port), "KUBERNETES_PORT": f"tcp://{host}:{port}",
               f"KUBERNETES_PORT_{port}_TCP": f"tcp://{host}:{port}", f"KUBERNETES_PORT_{port}_TCP_PROTO": "tcp",
               f"KUBERNETES_PORT_{port}_TCP_PORT": str(port), f"KUBERNETES_PORT_{port}_TCP_ADDR": host}
        if not links:
            return env
        with self.lock:
            services = [s for s in self.services.values() if s["metadata"]["namespace"] == namespace]
        for service in services:
            ip = service["spec"].get("clusterIP")
            if not ip or ip == "None":
                continue
            prefix = service["metadata"]["name"].upper().replace("-", "_")
            ports = service["spec"].get("ports") or []
            if not ports:
                continue
            first = ports[0]
            env[f"{prefix}_SERVICE_HOST"], env[f"{prefix}_SERVICE_PORT"] = ip, str(first["port"])
            env[f"{prefix}_PORT"] = f"{first.get('protocol', 'TCP').lower()}://{ip}:{first['port']}"
            for p in ports:
                proto = p.get("protocol", "TCP")
                if p.get("name"):
                    env[f"{prefix}_SERVICE_PORT_{p['name'].upper().replace('-', '_')}"] = str(p["port"])
                key = f"{prefix}_PORT_{p['port']}_{proto}"
                env[key] = f"{proto.lower()}://{ip}:{p['port']}"
                env[f"{key}_PROTO"], env[f"{key}_PORT"], env[f"{key}_ADDR"] = proto.lower(), str(p["port"]), ip
        return env

    # -- bookkeeping --
    def transition(self, key: str, kind: str, value: bool) -> str:
        with self.lock:
            old = self.transitions.get((key, kind))
            if old is None or old[0] != value:
                self.transitions[(key, kind)] = (value, now())
            return self.transitions[(key, kind)][1]

    def event(self, pod: dict, reason: str, message: str, warning: bool, once: bool) -> None:
        meta = pod["metadata"]
        key = (meta["uid"], reason, message)
        if once and key in self.events_sent:
            return
        self.events_sent.add(key)
        stamp = now()
        body = {"apiVersion": "v1", "kind": "Event",
                "metadata": {"name": f"{meta['name']}.{time.time_ns():x}", "namespace": meta["namespace"]},
                "involvedObject": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"],
                                   "namespace": meta["namespace"], "uid": meta["uid"]},
                "reason": reason, "message": message, "type": "Warning" if warning else "Normal",
                "source": {"component": "kubelet", "host": pod["spec"].get("nodeName", "")},
                "reportingComponent": "kubelet", "reportingInstance": pod["spec"].get("nodeName", ""),
                "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1}
        try:
            self.api.create(path_of("api/v1/events", meta["namespace"]), body)
        except (ApiError, OSError, urllib3.exceptions.HTTPError) as e:
            self.log(f"event {reason} for {meta['name']} not posted: {e}")

    # -- what tests do to nodes: slow image pulls --
    def hold(self, pod_pattern: str, container: str | None = None):
        """Containers (all, or `container`) of pods whose name matches `pod_pattern` do not start until the returned
        function is called, as with an image pull that takes that long. Returns the release function."""
        released = threading.Event()
        self.holds.append((re.compile(pod_pattern), container, released))

        def release() -> None:
            released.set()
            with self.lock:
                workers = list(self.workers.values())
            for worker in workers:
                worker.wake.set()

        return release

    def delay(self, pod_pattern: str, seconds: float, container: str | None = None) -> None:
        """hold(), released `seconds` after each matching pod is first seen (a node that pulls slowly)."""
        release = self.hold(pod_pattern, container)
        timer = threading.Timer(seconds, release)
        timer.daemon = True
        timer.start()

    def held(self, pod: str, container: str) -> bool:
        return any(pattern.search(pod) and which in (None, container) and not released.is_set()
                   for pattern, which, released in self.holds)

    def kill_container(self, namespace: str, pod: str, container: str, sig: int = signal.SIGKILL) -> None:
        """What an OOM kill or a segfault does to a container: its processes die at once (exit 128 + sig). Other
        signals (SIGSTOP, SIGCONT) reach every process of the container too."""
        worker = self.worker_of(namespace, pod)
        if worker is None:
            raise KeyError(f"no pod {namespace}/{pod} on this kubelet")
        target = next(c for c in worker.inits + worker.containers if c.name == container)
        worker.kill_tree(target, sig)

    def signal_pod(self, namespace: str, pod: str, sig: int) -> None:
        """`sig` to every process of every running container of the pod: SIGSTOP and SIGCONT pause and resume it, as
        a paused container (tests/cluster/testing.py: paused)."""
        worker = self.worker_of(namespace, pod)
        if worker is None:
            raise KeyError(f"no pod {namespace}/{pod} on this kubelet")
        for container in worker.inits + worker.containers:
            if container.running:
                worker.kill_tree(container, sig)

    def stop_signalled(self, namespace: str, pod: str) -> bool:
        """The pod is being deleted and its containers were sent SIGTERM."""
        worker = self.worker_of(namespace, pod)
        return worker is None or any(c.stop_signalled for c in worker.containers)

    def worker_of(self, namespace: str, name: str) -> PodWorker | None:
        with self.lock:
            return next((w for w in self.workers.values() if w.namespace == namespace and w.pod_name == name), None)


def remove_pod_dirs(root: Path) -> None:
    shutil.rmtree(root / "pods", ignore_errors=True)
