"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager and kube-scheduler, built
from their Go modules (tests/cluster/build.py), started as ordinary processes with generated certificates.

The API server runs what a managed cluster runs that matters here: x509 client-certificate and service-account token
authentication, `--authorization-mode=Node,RBAC` (so a Role that lacks a verb really refuses), the default admission
chain (ServiceAccount, PodSecurity, DefaultStorageClass, ...), bound service-account tokens (TokenRequest) verified
against the signing key, and the kubelet proxy (`kubectl logs`, `kubectl port-forward`) to the process kubelet's
streaming server with its serving certificate verified. The controller manager runs its default controllers (Job,
Deployment, ReplicaSet, EndpointSlice, PersistentVolume binder, garbage collector, PodGC, node lifecycle, TTL after
finished, root CA publisher, ...), the scheduler its default profile (NodeResourcesFit on nvidia.com/gpu, taints,
VolumeBinding with WaitForFirstConsumer, inter-pod affinity, preemption).

Deviations from a production cluster, all on purpose: etcd speaks plain HTTP on loopback and skips fsync (its data is
thrown away); every controller uses the admin identity (--use-service-account-credentials=false); no kube-proxy and
no cluster DNS (the process kubelet resolves names, tests/cluster/kubelet.py). Everything runs in the cluster's own
network namespace (tests/cluster/network.py), so the components listen on their standard ports there (etcd 2379,
the API server 6443 on the node address 10.244.0.1, which its `kubernetes` Service then points at) and the host
reaches the API server through a proxy on a free loopback port.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from cluster import pki
from cluster.network import NODE_IP, ClusterNetwork

ASSETS_ENV = "KUBE_TEST_ASSETS"  # the folder tests/cluster/build.py prints: bin/kubeplane, operators/, manifest.json
SERVICE_CIDR = "10.96.0.0/16"
ISSUER = "https://kubernetes.default.svc.cluster.local"
STARTUP_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dies_with_parent(argv: list[str]) -> list[str]:
    """argv run so that the kernel kills it when the thread that started it goes (PR_SET_PDEATHSIG through setpriv):
    a test run that is killed, or a harness that crashes, leaves no control plane or pod running."""
    return ["setpriv", "--pdeathsig", "KILL", "--", *argv]


def assets_dir(explicit: Path | None = None) -> Path:
    folder = explicit or (Path(os.environ[ASSETS_ENV]) if os.environ.get(ASSETS_ENV) else None)
    if folder is None or not (folder / "bin" / "kubeplane").is_file():
        raise FileNotFoundError(f"no control-plane binaries: set {ASSETS_ENV} to the folder `python "
                                "tests/cluster/build.py` prints (make test and make cluster do this)")
    return folder


@dataclass
class Process:
    name: str
    argv: list[str]
    log: Path
    popen: subprocess.Popen | None = None

    def start(self, env: dict[str, str] | None = None) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            # Its own session: a Ctrl-C in the terminal that runs `make cluster` does not reach it, and stop() can
            # signal exactly this process.
            self.popen = subprocess.Popen(dies_with_parent(self.argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=env, start_new_session=True)

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout_s: float = 15.0) -> None:
        if not self.alive():
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class ControlPlane:
    """Start with `start()`, stop with `stop()`. `root` holds certificates, etcd's data, logs and kubeconfigs."""

    root: Path
    assets: Path
    network: ClusterNetwork
    processes: dict[str, Process] = field(default_factory=dict)

    def __post_init__(self):
        self.root.mkdir(parents=True, exist_ok=True)
        self.pki_dir = self.root / "pki"
        self.logs = self.root / "logs"
        self.kubeplane = str(self.assets / "bin" / "kubeplane")
        self.etcd_port, self.etcd_peer_port, self.port = 2379, 2380, 6443  # in the cluster's namespace
        self.host_port = self.network.proxy(self.port)
        self.server = f"https://127.0.0.1:{self.host_port}"  # from the host, through the proxy
        self.internal_server = f"https://127.0.0.1:{self.port}"  # inside the cluster's namespace

    # ---- certificates and kubeconfigs -----------------------------------------------------------------------------
    def _make_pki(self) -> None:
        ca = self.ca = pki.CertificateAuthority(self.pki_dir)
        self.serving = ca.issue("apiserver", common_name="kube-apiserver", server=True,
                                ips=("127.0.0.1", NODE_IP, "10.96.0.1"),
                                dns=("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                                     "kubernetes.default.svc.cluster.local"))
        self.kubelet_client = ca.issue("apiserver-kubelet-client", common_name="kube-apiserver-kubelet-client",
                                       groups=("kubeadm:cluster-admins",), client=True)
        self.admin = ca.issue("admin", common_name="kubernetes-admin", groups=("system:masters",), client=True)
        self.sa_key, self.sa_pub = pki.service_account_keys(self.pki_dir)
        self.kubeconfig = pki.write_kubeconfig(self.root / "admin.kubeconfig", self.server, ca, "admin", self.admin)
        # the controllers' and operators' own, inside the cluster's namespace
        self.internal_kubeconfig = pki.write_kubeconfig(self.root / "internal.kubeconfig", self.internal_server, ca,
                                                        "admin", self.admin)

    def user_kubeconfig(self, user: str, groups: tuple[str, ...] = (), namespace: str = "default") -> Path:
        """A kubeconfig for a user with a client certificate: RBAC decides what it may do."""
        pair = self.ca.issue(f"user-{user}", common_name=user, groups=groups, client=True)
        return pki.write_kubeconfig(self.root / f"{user}.kubeconfig", self.server, self.ca, user, pair, namespace)

    def token_kubeconfig(self, name: str, token: str, namespace: str = "default") -> Path:
        return pki.write_kubeconfig(self.root / f"{name}.kubeconfig", self.server, self.ca, name, token, namespace)

    # ---- processes ------------------------------------------------------------------------------------------------
    def _process(self, name: str, *args: str) -> Process:
        process = Process(name, self.network.command([self.kubeplane, name, *args]), self.logs / f"{name}.log")
        self.processes[name] = process
        return process

    def start(self) -> "ControlPlane":
        self._make_pki()
        p = self.pki_dir
        etcd_url, peer_url = f"http://127.0.0.1:{self.etcd_port}", f"http://127.0.0.1:{self.etcd_peer_port}"
        self._process(
            "etcd", "--name=default", f"--data-dir={self.root / 'etcd'}", f"--listen-client-urls={etcd_url}",
            f"--advertise-client-urls={etcd_url}", f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}", f"--initial-cluster=default={peer_url}",
            "--unsafe-no-fsync", "--log-level=warn", "--quota-backend-bytes=2147483648",
        ).start()
        self._process(
            "kube-apiserver", f"--etcd-servers={etcd_url}", "--bind-address=0.0.0.0",
            f"--advertise-address={NODE_IP}", f"--secure-port={self.port}",
            f"--tls-cert-file={self.serving.cert}", f"--tls-private-key-file={self.serving.key}",
            f"--client-ca-file={self.ca.cert_path}",
            f"--service-account-issuer={ISSUER}", f"--service-account-key-file={self.sa_pub}",
            f"--service-account-signing-key-file={self.sa_key}",
            "--authorization-mode=Node,RBAC", f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--kubelet-client-certificate={self.kubelet_client.cert}",
            f"--kubelet-client-key={self.kubelet_client.key}",
            f"--kubelet-certificate-authority={self.ca.cert_path}",
            "--kubelet-preferred-address-types=InternalIP",
            "--allow-privileged=true", "--profiling=false", "--v=1",
        ).start()
        self._wait_ready()
        self._process(
            "kube-controller-manager", f"--kubeconfig={self.internal_kubeconfig}", "--leader-elect=false",
            "--bind-address=127.0.0.1", "--secure-port=10257",
            f"--authentication-kubeconfig={self.internal_kubeconfig}",
            f"--authorization-kubeconfig={self.internal_kubeconfig}",
            f"--root-ca-file={self.ca.cert_path}", f"--service-account-private-key-file={self.sa_key}",
            f"--cluster-signing-cert-file={self.ca.cert_path}", f"--cluster-signing-key-file={p / 'ca.key'}",
            "--use-service-account-credentials=false", "--profiling=false", "--v=1",
        ).start()
        self._process(
            "kube-scheduler", f"--kubeconfig={self.internal_kubeconfig}", "--leader-elect=false",
            "--bind-address=127.0.0.1", "--secure-port=10259",
            f"--authentication-kubeconfig={self.internal_kubeconfig}",
            f"--authorization-kubeconfig={self.internal_kubeconfig}",
            "--profiling=false", "--v=1",
        ).start()
        return self

    def stop(self) -> None:
        for name in ("kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"):
            if name in self.processes:
                self.processes[name].stop()

    def check_alive(self) -> None:
        for process in self.processes.values():
            if not process.alive():
                code = process.popen.returncode if process.popen else None
                raise RuntimeError(f"{process.name} exited ({code}); its log {process.log} ends:\n{process.tail()}")

    # ---- readiness --------------------------------------------------------------------------------------------------
    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca.cert_path))
        context.load_cert_chain(str(self.admin.cert), str(self.admin.key))
        return context

    def get(self, path: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
        request = urllib.request.Request(self.server + path)
        try:
            with urllib.request.urlopen(request, context=self.ssl_context(), timeout=timeout_s) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            self.check_alive()
            try:
                status, body = self.get("/readyz")
                if status == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"kube-apiserver not ready after {STARTUP_TIMEOUT_S:.0f}s; its log ends:\n"
                                   f"{self.processes['kube-apiserver'].tail()}")
            time.sleep(0.25)  # polling a starting server: there is nothing to wait on but its answer

    def env(self) -> dict[str, str]:
        """Environment for kubectl/helm/`ddpm status` as the cluster admin."""
        return {"KUBECONFIG": str(self.kubeconfig)}

    def versions(self) -> dict:
        out = subprocess.run([self.kubeplane, "kube-apiserver", "--version"], capture_output=True, text=True)
        return {"kube-apiserver": out.stdout.strip()}


def memory_rss_mib(plane: ControlPlane) -> dict[str, float]:
    """Resident memory of each component (for the docs' figures)."""
    import psutil

    return {name: psutil.Process(p.popen.pid).memory_info().rss / 2**20
            for name, p in plane.processes.items() if p.alive()}


def load_manifest(assets: Path) -> dict:
    return json.loads((assets / "manifest.json").read_text())


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
