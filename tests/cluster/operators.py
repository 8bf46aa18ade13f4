"""The operators the chart's backends need, built from their Go modules (tests/cluster/build.py) and started on the
test cluster from the build's manifest.json, as its `operator_recipe` says (tests/cluster/README.md):

1. its namespaces and CRDs (server-side apply), each CRD Established;
2. a webhook serving certificate signed by the cluster CA (the training operator: a CA of its own in the Secret its
   cert-controller keeps), the files and fixed paths it reads;
3. the manager process, in the cluster's network namespace and a private mount namespace (tests/cluster/podexec.py:
   the fixed paths some managers read, e.g. /etc/kueue/metrics/certs, are mounted there, not written on the host),
   ready when its health endpoint answers;
4. its webhook configurations (and converting CRDs) with `clientConfig.service` replaced by the manager's address.

JobSet 0.10.1 (the chart's floor) and the JobSet 0.12.0 Kubeflow Trainer 2.3 installs share a CRD: `ensure` stops a
conflicting one first.
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import json
import string
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cluster.controlplane import Process

PODEXEC = Path(__file__).with_name("podexec.py")
FIRST_WEBHOOK_PORT, FIRST_HEALTH_PORT = 9443, 8081


def substitute(value, values: dict[str, str]):
    if isinstance(value, str):
        return string.Template(value).substitute(values)
    if isinstance(value, list):
        return [substitute(v, values) for v in value]
    if isinstance(value, dict):
        return {substitute(k, values): substitute(v, values) for k, v in value.items()}
    return value


def own_ca_secret(spec: dict) -> tuple[dict[str, bytes], bytes]:
    """The Secret the training operator's cert-controller keeps as is (its `cert_secret` in the manifest says why):
    a CA of its own with the DNS name it checks, no ExtKeyUsage, an RSA key in PKCS#1, and a serving certificate for
    its Service name and 127.0.0.1, both valid well beyond its 90-day renewal horizon."""
    import ipaddress

    now = dt.datetime.now(dt.timezone.utc)
    days = dt.timedelta(days=spec.get("min_valid_days", 91) + 30)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, spec["ca_dns_names"][0])])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + days).add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.SubjectAlternativeName([x509.DNSName(d) for d in spec["ca_dns_names"]]), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    names = [x509.DNSName(d) for d in spec["dns_names"]] + [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                                                    spec["dns_names"][0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + days)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False).sign(ca_key, hashes.SHA256()))

    def pem_key(k) -> bytes:
        return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                               serialization.NoEncryption())

    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    return ({"ca.crt": ca_pem, "ca.key": pem_key(ca_key), "tls.crt": cert.public_bytes(serialization.Encoding.PEM),
             "tls.key": pem_key(key)}, ca_pem)


@dataclass
class Operator:
    name: str
    entry: dict
    cluster: "object"  # cluster.Cluster
    index: int
    process: Process | None = None
    webhooks: list[tuple[str, str]] = field(default_factory=list)  # (kind, name) applied

    @property
    def assets(self) -> Path:
        return self.cluster.assets

    def start(self) -> None:
        cluster, entry = self.cluster, self.entry
        work = cluster.root / "operators" / self.name
        work.mkdir(parents=True, exist_ok=True)
        values = {**entry.get("values", {}), "kubeconfig": str(cluster.plane.internal_kubeconfig),
                  "work_dir": str(work), "webhook_port": str(FIRST_WEBHOOK_PORT + self.index),
                  "health_port": str(FIRST_HEALTH_PORT + self.index)}
        for path in entry.get("namespaces", []) + entry.get("crds", []):
            self.apply(self.assets / path)
        for path in entry.get("crds", []):
            self.wait_established(json.loads((self.assets / path).read_text())["metadata"]["name"])

        cert_dir = Path(substitute(entry["cert_dir"], values))
        cert_dir.mkdir(parents=True, exist_ok=True)
        if entry.get("cert_secret"):
            secret, self.ca_pem = own_ca_secret(entry["cert_secret"])
            cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=json.dumps({
                "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": entry["cert_secret"]["name"], "namespace": entry["cert_secret"]["namespace"]},
                "data": {k: base64.b64encode(v).decode() for k, v in secret.items()}}))
            (cert_dir / "tls.crt").write_bytes(secret["tls.crt"])
            (cert_dir / "tls.key").write_bytes(secret["tls.key"])
        else:
            pair = cluster.plane.ca.issue(f"webhook-{self.name}", common_name=self.name, server=True,
                                          ips=tuple(entry["webhook_cert"]["ip_addresses"]),
                                          dns=tuple(entry["webhook_cert"]["dns_names"]))
            (cert_dir / "tls.crt").write_bytes(pair.cert.read_bytes())
            (cert_dir / "tls.key").write_bytes(pair.key.read_bytes())
            self.ca_pem = cluster.plane.ca.pem
        for target, template in entry.get("files", {}).items():
            Path(substitute(target, values)).write_text(
                substitute((self.assets / template).read_text(), values))

        mounts = [{"source": str(cert_dir), "target": path if not Path(path).suffix else str(Path(path).parent),
                   "read_only": True} for path in entry.get("fixed_paths", {})]
        spec = {"hostname": self.name, "root": str(work / "rootfs"), "mounts": mounts, "keep": [],
                "env": {"PATH": "/usr/bin:/bin", **substitute(entry.get("env", {}), values)},
                "argv": [str(self.assets / entry["binary"]), *substitute(entry["args"], values)], "workdir": str(work)}
        (work / "rootfs").mkdir(exist_ok=True)
        (work / "spec.json").write_text(json.dumps(spec))
        self.process = Process(self.name, cluster.network.command(
            ["unshare", "--mount", "--uts", "--", sys.executable, str(PODEXEC), str(work / "spec.json")]),
            cluster.plane.logs / f"operator-{self.name}.log")
        self.process.start()
        self.wait_ready(substitute(entry["ready_url"], values))

        port = values["webhook_port"]
        for path in entry.get("webhooks", []):
            self.apply(self.assets / path, self.rewrite, port)
        converting = {ref["file"] for ref in entry.get("service_refs", []) if ref["kind"] == "CustomResourceDefinition"}
        for path in sorted(converting):
            self.apply(self.assets / path, self.rewrite, port)

    def wait_established(self, crd: str, timeout_s: float = 60.0) -> None:
        """Until the API server serves the CRD's kind (condition Established)."""
        from cluster.testing import wait_for

        def established() -> bool:
            obj = self.cluster.api.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd}")
            return any(c["type"] == "Established" and c["status"] == "True"
                       for c in (obj.get("status") or {}).get("conditions") or [])

        wait_for(f"CRD {crd} Established", established, timeout_s)

    def wait_ready(self, url: str, timeout_s: float = 60.0) -> None:
        def ask() -> bool:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    return response.status == 200
            except OSError:
                return False

        deadline = time.monotonic() + timeout_s
        while not self.cluster.network.call(ask):
            if not self.process.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"operator {self.name} not ready; its log ends:\n{self.process.tail(40)}")
            time.sleep(0.25)  # a starting manager: nothing to wait on but its answer

    def rewrite(self, obj: dict, port: str) -> dict:
        """Every clientConfig.service naming one of this operator's webhook Services -> its address here."""
        services = {(s["namespace"], s["name"]) for s in self.entry.get("webhook_service", [])}
        ca = base64.b64encode(self.ca_pem).decode()

        def fix(client: dict) -> None:
            service = client.get("service")
            if service and (service.get("namespace"), service.get("name")) in services:
                client.pop("service")
                client["url"] = f"https://127.0.0.1:{port}{service.get('path', '')}"
                client["caBundle"] = ca

        obj = copy.deepcopy(obj)
        for webhook in obj.get("webhooks") or []:
            fix(webhook["clientConfig"])
        conversion = ((obj.get("spec") or {}).get("conversion") or {}).get("webhook") or {}
        if conversion.get("clientConfig"):
            fix(conversion["clientConfig"])
        if obj["kind"] in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
            self.webhooks.append((obj["kind"], obj["metadata"]["name"]))
        return obj

    def apply(self, path: Path, transform=None, *args) -> None:
        obj = json.loads(path.read_text())
        if transform is not None:
            obj = transform(obj, *args)
        self.cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=json.dumps(obj))

    def stop(self) -> None:
        for kind, name in reversed(self.webhooks):  # they fail closed: gone before the server is
            self.cluster.kubectl("delete", kind.lower(), name, "--ignore-not-found", check=False)
        self.webhooks.clear()
        if self.process is not None:
            self.process.stop()


class Operators:
    def __init__(self, cluster):
        self.cluster = cluster
        self.manifest = json.loads((cluster.assets / "manifest.json").read_text())
        self.running: dict[str, Operator] = {}

    def available(self, name: str) -> tuple[bool, str]:
        entry = self.manifest["operators"].get(name)
        if entry is None:
            return False, f"{name} is not in the build's manifest"
        if entry.get("status") != "ok":
            return False, f"{name} {entry.get('version')} did not build: {entry.get('error', '')[:300]}"
        return True, ""

    def ensure(self, name: str) -> Operator:
        if name in self.running:
            return self.running[name]
        ok, why = self.available(name)
        if not ok:
            raise RuntimeError(why)
        entry = self.manifest["operators"][name]
        for other in entry.get("conflicts", []) + [n for n, e in self.manifest["operators"].items()
                                                   if name in e.get("conflicts", [])]:
            if other in self.running:
                self.running.pop(other).stop()
        for required in entry.get("requires", []):
            self.ensure(required)
        operator = Operator(name, entry, self.cluster, index=list(self.manifest["operators"]).index(name))
        operator.start()
        self.running[name] = operator
        return operator

    def version(self, name: str) -> str:
        return self.manifest["operators"][name]["version"]

    def stop(self) -> None:
        for name in reversed(list(self.running)):
            self.running.pop(name).stop()


def run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True)
