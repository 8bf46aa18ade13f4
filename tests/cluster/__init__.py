"""A real Kubernetes control plane with process-run nodes, for the chart's end-to-end tests and `make cluster`.

    cluster = Cluster(root).start()     # etcd, kube-apiserver, kube-controller-manager, kube-scheduler (Go, built by
                                        # tests/cluster/build.py), the kubelet streaming server, the process kubelet
                                        # with its Nodes, and the volume provisioner with its StorageClasses
    cluster.kubectl("get", "nodes")
    cluster.stop()

Everything is Kubernetes' own code except the kubelet (tests/cluster/kubelet.py) and the provisioner
(tests/cluster/provisioner.py), which stand in for containerd and a CSI driver. See docs/KUBERNETES.md "A cluster on
your machine" for what is real and what is not.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from cluster import images as image_defs
from cluster.api import Api, ApiError, path_of
from cluster.controlplane import ControlPlane, Process, assets_dir
from cluster.kubelet import NodeSpec, ProcessKubelet, cpu_node, gpu_node
from cluster.network import NODE_IP, ClusterNetwork
from cluster.operators import Operators
from cluster.provisioner import Provisioner

CHECKOUT = Path(__file__).resolve().parents[2]
PROJECT_IMAGE = "ghcr.io/example/ddpm-trainer"  # the chart's image.repository default


def default_nodes() -> list[NodeSpec]:
    """Four one-GPU nodes of a GPU pool and one CPU node of the default pool, like a small GKE cluster: a test's
    two-node run fits next to one that waits (tests/test_cluster_job.py's late peer)."""
    return [*(gpu_node(f"gpu-node-{i}") for i in range(4)), cpu_node("cpu-node-0")]


def find_tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(CHECKOUT / ".tools" / "bin"))
    if found is None:
        raise FileNotFoundError(f"{name} not found on PATH or in .tools/bin; run `make tools`")
    return found


class Cluster:
    def __init__(self, root: Path, *, assets: Path | None = None, nodes: list[NodeSpec] | None = None,
                 venv: Path | None = None):
        self.root = Path(root)
        self.assets = assets_dir(assets)
        self.network: ClusterNetwork | None = None
        self.plane: ControlPlane | None = None
        self.node_specs = nodes if nodes is not None else default_nodes()
        self.venv = Path(venv or Path(sys.prefix))
        self.images = image_defs.Images({
            PROJECT_IMAGE: image_defs.project_image(CHECKOUT, self.venv),
            "busybox": image_defs.BUSYBOX,
            "docker.io/library/busybox": image_defs.BUSYBOX,
        })
        self.kubelet: ProcessKubelet | None = None
        self.provisioner: Provisioner | None = None
        self.streams: Process | None = None

    @property
    def kubeconfig(self) -> Path:  # the cluster admin's, from the host
        return self.plane.kubeconfig

    def start(self) -> "Cluster":
        started = time.monotonic()
        self.network = network = ClusterNetwork()
        self.plane = plane = ControlPlane(self.root / "control-plane", self.assets, network).start()
        # the host's view (through the proxy) and the cluster components' own (inside its namespace)
        self.api = Api(plane.server, plane.ca.cert_path, plane.admin.cert, plane.admin.key)
        internal = Api(plane.internal_server, plane.ca.cert_path, plane.admin.cert, plane.admin.key)
        kubelet_root = self.root / "kubelet"
        kubelet_root.mkdir(parents=True, exist_ok=True)
        streams_port = 10250  # the kubelet's port
        serving = plane.ca.issue("kubelet-serving", common_name="kubelet", ips=(NODE_IP, "127.0.0.1"), server=True)
        self.streams = Process("kubelet-streams", network.command([
            plane.kubeplane, "kubelet-streams", f"--listen=0.0.0.0:{streams_port}",
            f"--tls-cert-file={serving.cert}", f"--tls-private-key-file={serving.key}",
            f"--client-ca-file={plane.ca.cert_path}", f"--state-dir={kubelet_root / 'streams'}"]),
            plane.logs / "kubelet-streams.log")
        self.streams.start()
        nfs_root = self.root / "nfs"
        self.provisioner = Provisioner(internal, self.root, nfs_root, network).start()
        self.kubelet = ProcessKubelet(internal, kubelet_root, self.node_specs, self.images, network,
                                      apiserver=(NODE_IP, plane.port), streams_port=streams_port,
                                      keep_paths=[str(CHECKOUT), str(self.venv)], nfs_root=nfs_root).start()
        self.wait_until_schedulable()
        self.operators = Operators(self)
        self.startup_seconds = time.monotonic() - started
        return self

    def stop(self) -> None:
        if getattr(self, "operators", None) is not None:
            self.operators.stop()
        if self.kubelet is not None:
            self.kubelet.stop()
        if self.provisioner is not None:
            self.provisioner.stop()
        if self.streams is not None:
            self.streams.stop()
        if self.plane is not None:
            self.plane.stop()
        if self.network is not None:
            self.network.stop()

    def wait_until_schedulable(self, timeout_s: float = 120.0) -> None:
        """Nodes Ready without the not-ready taint (node lifecycle controller), and the default ServiceAccount of the
        default namespace created (serviceaccount controller): a pod created before either would be refused or
        wait."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.plane.check_alive()
            nodes = self.api.get("/api/v1/nodes")["items"]
            tainted = [n["metadata"]["name"] for n in nodes
                       if any(t["key"].startswith("node.kubernetes.io/") for t in n["spec"].get("taints") or [])]
            account = self.api.exists(path_of("api/v1/serviceaccounts", "default", "default"))
            if len(nodes) >= len(self.node_specs) and not tainted and account:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster not schedulable after {timeout_s:.0f}s: nodes {len(nodes)}, "
                                   f"tainted {tainted}, default service account {account}")
            time.sleep(0.25)  # controllers converging: nothing to wait on but their result

    # ---- clients --------------------------------------------------------------------------------------------------
    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DDPM_", "KUBECONFIG"))}
        env.update(self.plane.env())
        env.update(extra)
        return env

    def kubectl(self, *args: str, check: bool = True, timeout: float = 120, kubeconfig: Path | None = None,
                input: str | None = None) -> subprocess.CompletedProcess:
        env = self.env(KUBECONFIG=str(kubeconfig or self.kubeconfig))
        result = subprocess.run([find_tool("kubectl"), *args], capture_output=True, text=True, env=env,
                                timeout=timeout, input=input)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n"
                                 f"{result.stderr}")
        return result

    def helm(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        result = subprocess.run([find_tool("helm"), *args], capture_output=True, text=True, env=self.env(),
                                timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n"
                                 f"{result.stderr}")
        return result


__all__ = ["Api", "ApiError", "Cluster", "NodeSpec", "cpu_node", "gpu_node", "path_of"]
