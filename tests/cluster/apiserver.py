"""A real kube-apiserver with its etcd and nothing else: no controllers, scheduler or nodes, on host loopback ports.

For the unit tests of trainer/kube.py and its users (Events, `ddpm wait-for-training`, `ddpm status`): they read and
write objects the way the trainer does, against the real API machinery (validation of Events, pods and Jobs, label
and field selectors, watches, strategic merge patches, status subresources, the operators' CRD schemas), while each
test sets the objects' states itself, as the controllers would. tests/kube_proxy.py stands in front of it to add the
faults a real server cannot be made to show on demand. Started once per pytest worker (a few seconds); the full
cluster, with controllers and nodes, is tests/cluster/__init__.py.

Authentication: the trainer's requests carry a bearer token, so the server takes the static tokens of
`--token-auth-file` (the test's tokens, in system:masters: what RBAC refuses is tested on the full cluster) and
client certificates for the harness itself. `--endpoint-reconciler-type=none`: with no node address, the `kubernetes`
Service's endpoints would be loopback, which EndpointSlice validation refuses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from cluster import pki
from cluster.api import Api, ApiError
from cluster.controlplane import STARTUP_TIMEOUT_S, Process, free_port, load_manifest
from cluster.testing import wait_for

# The workload kinds the chart creates, from the operators' own CRDs (tests/cluster/build.py renders them).
CRDS = (("jobset", "jobsets.jobset.x-k8s.io"), ("trainer", "trainjobs.trainer.kubeflow.org"),
        ("training-operator", "pytorchjobs.kubeflow.org"))


@dataclass
class ApiServer:
    root: Path
    assets: Path
    tokens: tuple[str, ...]
    processes: list[Process] = field(default_factory=list)

    def start(self) -> "ApiServer":
        self.root.mkdir(parents=True, exist_ok=True)
        ca = self.ca = pki.CertificateAuthority(self.root / "pki")
        serving = ca.issue("apiserver", common_name="kube-apiserver", server=True, ips=("127.0.0.1",),
                           dns=("localhost",))
        admin = ca.issue("admin", common_name="kubernetes-admin", groups=("system:masters",), client=True)
        sa_key, sa_pub = pki.service_account_keys(self.root / "pki")
        token_file = self.root / "tokens.csv"  # token,user,uid,"groups"
        token_file.write_text("".join(f'{t},test-user-{i},uid-{i},"system:masters"\n'
                                      for i, t in enumerate(self.tokens)))
        token_file.chmod(0o600)
        etcd, peer, self.port = free_port(), free_port(), free_port()
        kubeplane = str(self.assets / "bin" / "kubeplane")
        self.processes = [
            Process("etcd", [kubeplane, "etcd", "--name=default", f"--data-dir={self.root / 'etcd'}",
                             f"--listen-client-urls=http://127.0.0.1:{etcd}",
                             f"--advertise-client-urls=http://127.0.0.1:{etcd}",
                             f"--listen-peer-urls=http://127.0.0.1:{peer}",
                             f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                             f"--initial-cluster=default=http://127.0.0.1:{peer}", "--unsafe-no-fsync",
                             "--log-level=warn"], self.root / "etcd.log"),
            Process("kube-apiserver", [
                kubeplane, "kube-apiserver", f"--etcd-servers=http://127.0.0.1:{etcd}", "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1", f"--secure-port={self.port}", "--endpoint-reconciler-type=none",
                f"--tls-cert-file={serving.cert}", f"--tls-private-key-file={serving.key}",
                f"--client-ca-file={ca.cert_path}", f"--token-auth-file={token_file}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={sa_pub}", f"--service-account-signing-key-file={sa_key}",
                "--authorization-mode=RBAC", "--service-cluster-ip-range=10.96.0.0/16", "--profiling=false",
                "--v=0"], self.root / "kube-apiserver.log"),
        ]
        for process in self.processes:
            process.start()
        self.url = f"https://127.0.0.1:{self.port}"
        self.api = Api(self.url, ca.cert_path, admin.cert, admin.key)
        wait_for("kube-apiserver ready", self._ready, STARTUP_TIMEOUT_S, self._logs)
        manifest, body_versions = load_manifest(self.assets), {}
        for operator, crd in CRDS:
            [path] = [p for p in manifest["operators"][operator]["crds"] if p.endswith(f"/{crd}.json")]
            body = json.loads((self.assets / path).read_text())
            body_versions[crd] = next(v["name"] for v in body["spec"]["versions"] if v.get("storage"))
            self.api.request("PATCH", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd}", body,
                             params={"fieldManager": "tests", "force": "true"},
                             content_type="application/apply-patch+yaml")
        for _, crd in CRDS:  # until each kind is served (Established, then its storage initialised: 429 before)
            plural, group = crd.split(".", 1)
            version = body_versions[crd]
            wait_for(f"CRD {crd} served", lambda: self._serves(f"/apis/{group}/{version}/{plural}"), 60, self._logs)
        return self

    def _ready(self) -> bool:
        for process in self.processes:
            if not process.alive():
                raise RuntimeError(f"{process.name} exited; its log ends:\n{process.tail()}")
        try:
            self.api.request("GET", "/readyz", timeout=5)
            return True
        except Exception:  # not listening yet (urllib3's errors), or not ready (ApiError)
            return False

    def _serves(self, path: str) -> bool:
        try:
            self.api.get(path)
            return True
        except ApiError:
            return False

    def _logs(self) -> str:
        return "\n".join(f"{p.name}:\n{p.tail(15)}" for p in self.processes)

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()
