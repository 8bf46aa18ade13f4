"""The cluster's certificates and kubeconfigs, generated fresh for each cluster (nothing is committed or reused).

What a kubeadm cluster has, reduced to what this one uses (https://kubernetes.io/docs/setup/best-practices/certificates/):
- one CA that signs every serving and client certificate (kubeadm has separate CAs for etcd and the front proxy; etcd
  here listens on loopback without TLS, and the aggregation layer is not used);
- the API server's serving certificate, valid for 127.0.0.1, localhost and the `kubernetes` Service's names;
- client certificates: the CN is the user name and each O a group (the x509 authenticator), so `system:masters`
  is the cluster admin, and a user without groups gets exactly what RBAC grants it;
- the service-account signing key pair (--service-account-signing-key-file / --service-account-key-file);
- serving certificates for the kubelet's streaming server and the operators' webhooks (IP 127.0.0.1).
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = dt.timedelta(days=2)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class Pair:
    """A certificate and its key, as files."""

    cert: Path
    key: Path


class CertificateAuthority:
    def __init__(self, folder: Path, name: str = "ddpm-test-cluster-ca"):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.key = _key()
        now = dt.datetime.now(dt.timezone.utc)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + VALIDITY)
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                  content_commitment=False, key_encipherment=False,
                                                  data_encipherment=False, key_agreement=False,
                                                  encipher_only=False, decipher_only=False), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.cert_path = folder / "ca.crt"
        self.cert_path.write_bytes(_pem_cert(self.cert))
        (folder / "ca.key").write_bytes(_pem_key(self.key))

    @property
    def pem(self) -> bytes:
        return _pem_cert(self.cert)

    def issue(self, name: str, *, common_name: str, groups: tuple[str, ...] = (), ips: tuple[str, ...] = (),
              dns: tuple[str, ...] = (), server: bool = False, client: bool = False) -> Pair:
        key = _key()
        now = dt.datetime.now(dt.timezone.utc)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                             *(x509.NameAttribute(NameOID.ORGANIZATION_NAME, g) for g in groups)])
        usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(self.cert.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + VALIDITY)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage(usages), critical=False))
        names = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips] + [x509.DNSName(d) for d in dns]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        pair = Pair(self.folder / f"{name}.crt", self.folder / f"{name}.key")
        pair.cert.write_bytes(_pem_cert(cert))
        pair.key.write_bytes(_pem_key(key))
        pair.key.chmod(0o600)
        return pair


def service_account_keys(folder: Path) -> tuple[Path, Path]:
    """The token signing key (private) and its public half (what the API server verifies tokens with)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private, public = folder / "sa.key", folder / "sa.pub"
    private.write_bytes(_pem_key(key))
    private.chmod(0o600)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def write_kubeconfig(path: Path, server: str, ca: CertificateAuthority, user: str, credentials: Pair | str,
                     namespace: str = "default") -> Path:
    """A kubeconfig for one user: a client certificate, or a bearer token (a service account's)."""
    if isinstance(credentials, Pair):
        auth = {"client-certificate-data": base64.b64encode(credentials.cert.read_bytes()).decode(),
                "client-key-data": base64.b64encode(credentials.key.read_bytes()).decode()}
    else:
        auth = {"token": credentials}
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": user, "preferences": {},
        "clusters": [{"name": "ddpm-test", "cluster": {"server": server,
                                                       "certificate-authority-data": base64.b64encode(ca.pem).decode()}}],
        "users": [{"name": user, "user": auth}],
        "contexts": [{"name": user, "context": {"cluster": "ddpm-test", "user": user, "namespace": namespace}}],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path
