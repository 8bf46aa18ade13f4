#!/usr/bin/env python3
"""Builds the test cluster's binaries from the Go modules under tests/cluster/ into a cache folder keyed by version.

    python3 tests/cluster/build.py [--cache-root DIR] [--force] [--only-kubeplane]

The key hashes every go.mod, go.sum and non-test *.go file under tests/cluster/, this script, and the Go version and
platform: the same sources on the same machine build once and are reused (a clean clone included, as Go's own caches
are). The folder is ${XDG_CACHE_HOME:-~/.cache}/ddpm-trainer/cluster/<key>/:

    bin/kubeplane                 etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubelet-streams
    bin/render-manifests          kustomize (the library) for the operators' install overlays
    bin/<operator>                jobset, kueue, trainer, trainer-jobset, training-operator
    operators/<name>/{crds,webhooks,namespaces,other}/*.json   the operator's install overlay rendered, one object a file
    operators/<name>/config/      the config file template (ours) and upstream's default config file, for reference
    manifest.json                 what is there and how to run each operator (see tests/cluster/README.md)

It is built in a temporary folder and renamed when complete, under a lock: a killed build leaves nothing that looks
complete, and two builds at once wait for each other. Progress goes to stderr; the last line on stdout is the folder.
An operator that fails to build (a module the proxy does not serve) is recorded in the manifest with the error, and
the others are still built; only kubeplane failing fails the script.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FORMAT = 1  # manifest.json's format; bump on an incompatible change
KEEP_BUILDS = 3  # complete builds kept under the cache root (the most recently used), older ones are removed

# Static, stripped, path-independent binaries, as upstream releases build them (CGO off: no C toolchain needed).
GO_ENV = {"CGO_ENABLED": "0"}
GO_BUILD = ["go", "build", "-trimpath", "-buildvcs=false", "-mod=readonly"]
LDFLAGS = ["-s", "-w"]


def log(message: str) -> None:
    print(f"[cluster build] {message}", file=sys.stderr, flush=True)


def go_env() -> dict:
    out = subprocess.run(["go", "env", "-json", "GOVERSION", "GOOS", "GOARCH", "GOMODCACHE"],
                         check=True, capture_output=True, text=True, cwd=HERE).stdout
    return json.loads(out)


def source_key(env: dict) -> str:
    """sha256 over the sources that decide the output, and the toolchain; the first 16 hex digits."""
    digest = hashlib.sha256(f"format {FORMAT}\n{env['GOVERSION']} {env['GOOS']}/{env['GOARCH']}\n".encode())
    files = [Path(__file__).resolve()]
    for path in sorted(HERE.rglob("*")):
        if path.name in ("go.mod", "go.sum") or (path.suffix == ".go" and not path.name.endswith("_test.go")):
            files.append(path)
    for path in files:
        digest.update(f"{path.relative_to(HERE)}\n".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def module_info(module_dir: Path, module: str) -> dict:
    """Version and module-cache folder of a dependency of the module in module_dir (downloads it if needed)."""
    out = subprocess.run(["go", "mod", "download", "-json", module], capture_output=True, text=True, cwd=module_dir)
    info = json.loads(out.stdout) if out.stdout.strip() else {}
    if out.returncode != 0 or info.get("Error"):
        raise BuildError(f"{module}: {info.get('Error') or out.stderr.strip()}")
    return info


def required_version(module_dir: Path, module: str) -> str:
    out = subprocess.run(["go", "list", "-m", "-f", "{{if .Replace}}{{.Replace.Version}}{{else}}{{.Version}}{{end}}",
                          module], capture_output=True, text=True, cwd=module_dir)
    if out.returncode != 0:
        raise BuildError(out.stderr.strip())
    return out.stdout.strip()


class BuildError(Exception):
    pass


def go_build(module_dir: Path, out: Path, packages: list[str], ldflags: list[str]) -> float:
    """One `go build` of several main packages (shared compilation); returns the seconds it took."""
    start = time.monotonic()
    cmd = [*GO_BUILD, f"-ldflags={' '.join(LDFLAGS + ldflags)}", "-o", f"{out}{os.sep}", *packages]
    log(f"{module_dir.relative_to(HERE)}: {' '.join(cmd)}")
    proc = subprocess.run(cmd, cwd=module_dir, env={**os.environ, **GO_ENV}, capture_output=True, text=True)
    for line in proc.stderr.splitlines():
        if not line.startswith("go: downloading"):
            print(f"    {line}", file=sys.stderr)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise BuildError(f"go build in {module_dir.relative_to(HERE)} failed (exit {proc.returncode}):\n{tail}")
    seconds = time.monotonic() - start
    log(f"{module_dir.relative_to(HERE)}: built in {seconds:.0f} s")
    return seconds


# ---- the control plane ---------------------------------------------------------------------------------------

def build_kubeplane(out: Path) -> dict:
    kubernetes = required_version(HERE, "k8s.io/kubernetes")
    etcd = required_version(HERE, "go.etcd.io/etcd/server/v3")
    listed = subprocess.run(["go", "list", "-m", "-json", "k8s.io/kubernetes"], capture_output=True, text=True, cwd=HERE)
    released = json.loads(listed.stdout or "{}").get("Time", "1970-01-01T00:00:00Z")  # the tag's time, from the proxy
    major, minor = re.match(r"v(\d+)\.(\d+)\.", kubernetes).groups()
    # What hack/lib/version.sh stamps into a release: the API server reports it at /version (helm's kubeVersion
    # checks and `kubectl version` read it) and clients send it in their User-Agent.
    ldflags = []
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        ldflags += [f"-X {package}.gitVersion={kubernetes}", f"-X {package}.gitMajor={major}",
                    f"-X {package}.gitMinor={minor}", f"-X {package}.gitTreeState=clean",
                    f"-X {package}.gitCommit=", f"-X {package}.buildDate={released}"]
    seconds = go_build(HERE, out / "bin", ["./cmd/kubeplane", "./cmd/render-manifests"], ldflags)
    return {
        "binary": "bin/kubeplane",
        "components": ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet-streams"],
        "usage": "bin/kubeplane COMPONENT ARGS (or a symlink named after the component); `kubeplane version`",
        "versions": {"kubernetes": kubernetes, "etcd": etcd},
        "build_seconds": round(seconds, 1),
    }


# ---- the operators -------------------------------------------------------------------------------------------
# Each runs outside the cluster against the API server as an ordinary process. Placeholders, filled by the harness
# with string.Template: ${kubeconfig} (an admin kubeconfig), ${work_dir} (an empty folder of this operator's own),
# ${webhook_port}, ${health_port} (free loopback ports), and each operator's own "values" (defaults given).

JOBSET_CONFIG = """\
# JobSet's Configuration (config.jobset.x-k8s.io/v1alpha1, api/config/v1alpha1 in its module) for a process outside
# the cluster: written by tests/cluster/build.py, not copied; upstream's default is upstream-controller_manager_config.yaml.
apiVersion: config.jobset.x-k8s.io/v1alpha1
kind: Configuration
leaderElection:
  leaderElect: false
# Our certificates in certDir, not its cert-controller's (which would sign for the Service's DNS name only).
internalCertManagement:
  enable: false
webhook:
  host: 127.0.0.1
  port: ${webhook_port}
  certDir: ${work_dir}/certs
metrics:
  bindAddress: "0"
health:
  healthProbeBindAddress: 127.0.0.1:${health_port}
"""

KUEUE_CONFIG = """\
# Kueue's Configuration (config.kueue.x-k8s.io/v1beta2, apis/config/v1beta2 in its module) for a process outside
# the cluster: written by tests/cluster/build.py, not copied; upstream's default is upstream-controller_manager_config.yaml.
apiVersion: config.kueue.x-k8s.io/v1beta2
kind: Configuration
namespace: kueue-system
leaderElection:
  leaderElect: false
# Our certificates in webhook.certDir. With this off Kueue also reads a metrics certificate from the fixed path
# /etc/kueue/metrics/certs (see the manifest's fixed_paths), even though metrics are not served.
internalCertManagement:
  enable: false
webhook:
  host: 127.0.0.1
  port: ${webhook_port}
  certDir: ${work_dir}/certs
metrics:
  bindAddress: "0"
health:
  healthProbeBindAddress: 127.0.0.1:${health_port}
featureGates:
  # The visibility API server (an aggregated APIService on its own port with certificates from the fixed /visibility).
  VisibilityOnDemand: false
# Presence turns it on: an admitted workload whose pods are not all Ready within timeout is evicted and requeued.
waitForPodsReady:
  timeout: ${pods_ready_timeout}
  blockAdmission: ${block_admission}
integrations:
  frameworks:
  - batch/job
  - jobset.x-k8s.io/jobset
  - kubeflow.org/pytorchjob
  - trainer.kubeflow.org/trainjob
"""

TRAINER_CONFIG = """\
# The Kubeflow Trainer's Configuration (config.trainer.kubeflow.org/v1alpha1, pkg/apis/config/v1alpha1 in its module)
# for a process outside the cluster: written by tests/cluster/build.py, not copied; upstream's default is
# upstream-controller_manager_config.yaml. The webhook's certificate folder is controller-runtime's default,
# k8s-webhook-server/serving-certs under TMPDIR, which the manifest's env sets to the work folder.
apiVersion: config.trainer.kubeflow.org/v1alpha1
kind: Configuration
leaderElection:
  leaderElect: false
certManagement:
  enable: false
webhook:
  host: 127.0.0.1
  port: ${webhook_port}
metrics:
  bindAddress: "0"
health:
  healthProbeBindAddress: 127.0.0.1:${health_port}
  readinessEndpointName: readyz
  livenessEndpointName: healthz
"""


def controller_runtime_recipe(config: str | None, extra_args: list[str] = ()) -> dict:
    args = ["--kubeconfig=${kubeconfig}", "--zap-log-level=2"]
    if config:
        args.insert(0, "--config=${work_dir}/config.yaml")
    return {"args": args + list(extra_args), "env": {}, "ready_url": "http://127.0.0.1:${health_port}/readyz"}


OPERATORS = [
    {
        "name": "jobset",
        "module_dir": "operators/jobset",
        "module": "sigs.k8s.io/jobset",
        "package": "sigs.k8s.io/jobset",
        "version_vars": ["sigs.k8s.io/jobset/pkg/version.GitVersion"],
        "render": "config/default",
        "config": JOBSET_CONFIG,
        "upstream_config": "config/components/manager/controller_manager_config.yaml",
        "cert_dir": "${work_dir}/certs",
        "notes": ["JobSet v0.10.0 is not served by the module proxy (403); v0.10.1 is the chart's floor here."],
    },
    {
        "name": "kueue",
        "module_dir": "operators/kueue",
        "module": "sigs.k8s.io/kueue",
        "package": "sigs.k8s.io/kueue/cmd/kueue",
        "version_vars": ["sigs.k8s.io/kueue/pkg/version.GitVersion"],
        "render": "config/default",
        "config": KUEUE_CONFIG,
        "values": {"pods_ready_timeout": "5m", "block_admission": "false"},
        "upstream_config": "config/components/manager/controller_manager_config.yaml",
        "cert_dir": "${work_dir}/certs",
        "fixed_paths": {
            "/etc/kueue/metrics/certs": "tls.crt and tls.key must exist (any valid pair, e.g. the webhook's) when "
                                        "internalCertManagement is off: cmd/kueue/main.go reads them at start-up "
                                        "(certwatcher.New) and exits if they are missing; metrics are not served."},
        "skip_apply": ["APIService (visibility server, disabled by VisibilityOnDemand=false)"],
        "notes": ["Its webhook configuration sends every Pod, Deployment and StatefulSet created outside kube-system "
                  "and kueue-system to Kueue (noop handlers for integrations that are off), failurePolicy Fail: "
                  "apply it only while Kueue runs, and delete it before stopping Kueue.",
                  "CRDs localqueues, clusterqueues, cohorts, workloads, multikueueclusters convert v1beta1<->v1beta2 "
                  "through its webhook (/convert): rewrite their spec.conversion clientConfig too."],
    },
    {
        "name": "trainer",
        "module_dir": "operators/trainer",
        "module": "github.com/kubeflow/trainer/v2",
        "package": "github.com/kubeflow/trainer/v2/cmd/trainer-controller-manager",
        "version_vars": [],
        "render": {"namespace": "kubeflow-system",
                   "resources": ["manifests/overlays/manager/namespace.yaml", "manifests/base/crds",
                                 "manifests/base/manager", "manifests/base/rbac", "manifests/base/webhook"]},
        "extra_renders": {"runtimes": "manifests/base/runtimes"},
        "config": TRAINER_CONFIG,
        "upstream_config": "manifests/base/manager/controller_manager_config.yaml",
        "cert_dir": "${work_dir}/k8s-webhook-server/serving-certs",
        "env": {"TMPDIR": "${work_dir}"},
        "requires": ["trainer-jobset"],
        "notes": ["A TrainJob runs as a JobSet: start trainer-jobset (JobSet v0.12.0, the version Trainer v2.3.0 "
                  "installs: manifests/third-party/jobset) with its CRDs and webhooks first.",
                  "runtimes/ holds upstream's ClusterTrainingRuntimes (manifests/base/runtimes), optional."],
    },
    {
        # JobSet as Trainer v2.3.0 pairs it (its go.mod requires v0.12.0), built in the Trainer's module.
        "name": "trainer-jobset",
        "module_dir": "operators/trainer",
        "module": "sigs.k8s.io/jobset",
        "package": "sigs.k8s.io/jobset",
        "version_vars": ["sigs.k8s.io/jobset/pkg/version.GitVersion"],
        "render": "config/default",
        "config": JOBSET_CONFIG,
        "upstream_config": "config/components/manager/controller_manager_config.yaml",
        "cert_dir": "${work_dir}/certs",
        "conflicts": ["jobset"],
        "notes": ["The same CRD, webhook configuration names and Service as `jobset`: run one of the two."],
    },
    {
        "name": "training-operator",
        "module_dir": "operators/training-operator",
        "module": "github.com/kubeflow/training-operator",
        "package": "github.com/kubeflow/training-operator/cmd/training-operator.v1",
        "version_vars": [],
        "render": "manifests/overlays/standalone",
        "config": None,
        "extra_args": ["--metrics-bind-address=0", "--health-probe-bind-address=127.0.0.1:${health_port}",
                       "--webhook-server-port=${webhook_port}", "--leader-elect=false"],
        "cert_dir": "${work_dir}/k8s-webhook-server/serving-certs",
        "env": {"TMPDIR": "${work_dir}", "MY_POD_NAMESPACE": "kubeflow"},
        # v1.8 cannot turn its cert-controller off (pkg/cert/cert.go): it validates the Secret below and keeps it
        # when valid, then injects ca.crt into the ValidatingWebhookConfiguration `validator.training-operator...`.
        "cert_secret": {
            "namespace": "kubeflow", "name": "training-operator-webhook-cert",
            "keys": ["ca.crt", "ca.key", "tls.crt", "tls.key"],
            "ca_key_format": "RSA, PKCS#1 PEM (BEGIN RSA PRIVATE KEY; `openssl genrsa -traditional`)",
            "ca_dns_names": ["training-operator-ca"],
            "dns_names": ["training-operator.kubeflow.svc"],
            "min_valid_days": 91,
            "why": "open-policy-agent/cert-controller v0.10.1 keeps the Secret only if ca.crt verifies as its own "
                   "leaf for DNS name training-operator-ca (so: a CA of its own with that DNS SAN and no "
                   "ExtKeyUsage), tls.crt verifies under ca.crt for training-operator.kubeflow.svc with ServerAuth, "
                   "and both stay valid 90 days ahead; otherwise it replaces both with certificates for the "
                   "Service name only, which the API server calling https://127.0.0.1 rejects. It parses ca.key "
                   "as PKCS#1 RSA only, or it never reports ready."},
        "fixed_paths": {
            "/tmp/k8s-webhook-server/serving-certs/tls.crt": "must exist: the cert-controller waits for this fixed "
                                                             "path (the Secret mounted in a pod) before it reports "
                                                             "ready; the webhook server itself reads "
                                                             "${work_dir}/k8s-webhook-server/serving-certs (TMPDIR)."},
        "notes": ["All its schemes (TFJob, PyTorchJob, MPIJob, XGBoostJob, MXJob, PaddleJob) are on, as upstream "
                  "deploys it: apply all its CRDs."],
    },
]


def write_overlay(folder: Path, module_root: Path, spec: dict | str) -> Path:
    """The kustomization to render: upstream's own overlay, or ours listing upstream folders (for an overlay that
    names a remote resource, which cannot be fetched here)."""
    if isinstance(spec, str):
        return module_root / spec
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["apiVersion: kustomize.config.k8s.io/v1beta1", "kind: Kustomization",
             f"namespace: {spec['namespace']}", "resources:"]
    # Relative paths: kustomize takes a folder outside the overlay only as a relative one.
    lines += [f"- {os.path.relpath(module_root / resource, folder)}" for resource in spec["resources"]]
    (folder / "kustomization.yaml").write_text("\n".join(lines) + "\n")
    return folder


def render(out: Path, target: Path, kustomization: Path) -> dict:
    proc = subprocess.run([str(out / "bin" / "render-manifests"), "-o", str(target), str(kustomization)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"rendering {kustomization}: {proc.stderr.strip()}")
    return json.loads(proc.stdout)


def build_operator_binaries(out: Path, module_dir: str, specs: list[dict]) -> dict[str, dict]:
    """Builds the operators of one module in one `go build`; returns each one's entry so far (version, module
    folder, build time, or the error)."""
    entries = {spec["name"]: {"module": spec["module"], "status": "failed"} for spec in specs}
    try:
        ldflags = []
        for spec in specs:
            entry = entries[spec["name"]]
            entry["version"] = required_version(HERE / module_dir, spec["module"])
            entry["module_dir"] = module_info(HERE / module_dir, f"{spec['module']}@{entry['version']}")["Dir"]
            ldflags += [f"-X {var}={entry['version']}" for var in spec["version_vars"]]
        staging = out / ".bin" / module_dir
        seconds = go_build(HERE / module_dir, staging, [spec["package"] for spec in specs], ldflags)
        for spec in specs:
            (staging / spec["package"].rsplit("/", 1)[-1]).rename(out / "bin" / spec["name"])
            entries[spec["name"]].update(status="built", build_seconds=round(seconds, 1),
                                         built_with=[s["name"] for s in specs])
    except BuildError as err:
        for spec in specs:
            entries[spec["name"]]["error"] = str(err)
        log(f"{module_dir}: FAILED: {err}")
    return entries


def describe_operator(out: Path, spec: dict, entry: dict) -> dict:
    """Renders the operator's install overlay and completes its manifest entry (how to run it)."""
    name = spec["name"]
    if entry["status"] != "built":
        return entry
    try:
        module_root = Path(entry["module_dir"])
        folder = out / "operators" / name
        index = render(out, folder, write_overlay(out / ".overlays" / name, module_root, spec["render"]))
        for extra, path in spec.get("extra_renders", {}).items():
            render(out, folder / extra, module_root / path)
        config_dir = folder / "config"
        config_dir.mkdir(parents=True, exist_ok=True)
        files = {}
        if spec["config"]:
            (config_dir / "config.yaml.tmpl").write_text(spec["config"])
            files["${work_dir}/config.yaml"] = f"operators/{name}/config/config.yaml.tmpl"
        if spec.get("upstream_config"):
            shutil.copyfile(module_root / spec["upstream_config"], config_dir / "upstream-controller_manager_config.yaml")

        def files_of(folder_name: str) -> list[str]:
            return [f"operators/{name}/{o['file']}" for o in index["objects"] if o["file"].startswith(folder_name + "/")]

        refs = [r for r in index["service_refs"] if r["kind"] != "APIService"]
        services = sorted({(r["namespace"], r["service"]) for r in refs})
        recipe = controller_runtime_recipe(spec["config"], spec.get("extra_args", []))
        entry.update({
            "status": "ok",
            "binary": f"bin/{name}",
            "args": recipe["args"],
            "env": spec.get("env", {}),
            "values": spec.get("values", {}),
            "files": files,
            "cert_dir": spec["cert_dir"],
            "ready_url": recipe["ready_url"],
            "namespaces": files_of("namespaces"),
            "crds": files_of("crds"),
            "webhooks": files_of("webhooks"),
            "webhook_service": [{"namespace": ns, "name": svc} for ns, svc in services],
            "webhook_cert": {"ip_addresses": ["127.0.0.1"],
                             "dns_names": [f"{svc}.{ns}.svc" for ns, svc in services]},
            "service_refs": [{**r, "file": f"operators/{name}/{r['file']}"} for r in refs],
            "other": files_of("other"),
            "requires": spec.get("requires", []),
            "conflicts": spec.get("conflicts", []),
            "fixed_paths": spec.get("fixed_paths", {}),
            "notes": spec.get("notes", []),
        })
        if "cert_secret" in spec:
            entry["cert_secret"] = spec["cert_secret"]
        if spec.get("skip_apply"):
            entry["skip_apply"] = spec["skip_apply"]
        if spec.get("extra_renders"):
            entry["extra"] = {extra: sorted(f"operators/{name}/{extra}/{p.relative_to(folder / extra)}"
                                            for p in (folder / extra).rglob("*.json"))
                              for extra in spec["extra_renders"]}
    except BuildError as err:
        entry.update(status="failed", error=str(err))
        log(f"{name}: FAILED: {err}")
    return entry


# ---- the cache folder ----------------------------------------------------------------------------------------

# The harness's steps for any operator, written into manifest.json (tests/cluster/README.md explains them).
OPERATOR_RECIPE = [
    "values = entry.values + {kubeconfig, work_dir, webhook_port, health_port}; substitute ${...} with "
    "string.Template in args, env, files, cert_dir, ready_url",
    "apply entry.namespaces, then entry.crds with server-side apply (the largest CRDs exceed client-side apply's "
    "256 kB annotation); wait until each CRD is Established (controller-runtime does not start a controller whose "
    "kind is missing from discovery at start-up, and retries only slowly)",
    "write tls.crt/tls.key for entry.webhook_cert (IP 127.0.0.1) into cert_dir; if entry.cert_secret, create that "
    "Secret first with a CA of the operator's own as it describes; provide entry.fixed_paths",
    "write each entry.files template to its key's path; start entry.binary with args and env (os.environ + env)",
    "wait until ready_url answers 200",
    "apply entry.webhooks after replacing every clientConfig.service naming one of entry.webhook_service by "
    "clientConfig.url = https://127.0.0.1:<webhook_port><service.path> and caBundle = base64(PEM of the CA that "
    "signed the webhook certificate); re-apply the CRDs whose spec.conversion.webhook.clientConfig names it, "
    "rewritten the same way (entry.service_refs lists every reference)",
    "to stop: delete the webhook configurations first (failurePolicy Fail), then SIGTERM the process",
]

PLACEHOLDERS = {
    "kubeconfig": "an admin kubeconfig (the operators run with cluster-admin rights; their RBAC is under other/)",
    "work_dir": "an empty folder of this operator's own (config file, certificates, TMPDIR)",
    "webhook_port": "a free port for its webhook server on 127.0.0.1",
    "health_port": "a free port for its health probes (ready_url) on 127.0.0.1",
}


def build(final: Path, key: str, env: dict, only_kubeplane: bool) -> None:
    tmp = final.parent / f".tmp-{key}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "bin").mkdir(parents=True)
    start = time.monotonic()
    manifest = {
        "format": FORMAT,
        "key": key,
        "go": env["GOVERSION"],
        "platform": f"{env['GOOS']}/{env['GOARCH']}",
        "kubeplane": build_kubeplane(tmp),
        "placeholders": PLACEHOLDERS,
        "operator_recipe": OPERATOR_RECIPE,
        "operators": {},
    }
    if not only_kubeplane:
        entries: dict[str, dict] = {}
        for module_dir in dict.fromkeys(spec["module_dir"] for spec in OPERATORS):
            entries.update(build_operator_binaries(tmp, module_dir, [s for s in OPERATORS if s["module_dir"] == module_dir]))
        for spec in OPERATORS:
            manifest["operators"][spec["name"]] = describe_operator(tmp, spec, entries[spec["name"]])
    shutil.rmtree(tmp / ".bin", ignore_errors=True)
    shutil.rmtree(tmp / ".overlays", ignore_errors=True)
    manifest["build_seconds"] = round(time.monotonic() - start, 1)
    manifest["built_at"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    manifest["sizes_mb"] = {p.name: round(p.stat().st_size / 2**20, 1) for p in sorted((tmp / "bin").iterdir())}
    if source_key(env) != key.split("-")[0]:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BuildError("the sources changed while they were being built; run again")
    # manifest.json last: its presence marks the folder complete, then one rename publishes it.
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.rename(final)


def prune(root: Path, keep: Path) -> None:
    """Keeps the KEEP_BUILDS most recently used complete builds; others go (a change of sources leaves one each)."""
    builds = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / "manifest.json").exists()]
    builds.sort(key=lambda p: (p / ".last-used").stat().st_mtime if (p / ".last-used").exists() else 0, reverse=True)
    for old in [p for p in builds if p != keep][KEEP_BUILDS - 1:]:
        log(f"removing an older build {old}")
        shutil.rmtree(old, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    parser.add_argument("--cache-root", type=Path, default=Path(cache_home) / "ddpm-trainer" / "cluster")
    parser.add_argument("--force", action="store_true", help="rebuild even when the folder for the key exists")
    parser.add_argument("--only-kubeplane", action="store_true", help="skip the operators (a different key)")
    args = parser.parse_args()
    if shutil.which("go") is None:
        log("`go` is not on PATH: the cluster tests need Go 1.26 and the Go module proxy (docs: tests/cluster/README.md)")
        return 1

    env = go_env()
    key = source_key(env) + ("-kubeplane" if args.only_kubeplane else "")
    root = args.cache_root.resolve()
    final = root / key
    if not args.force and (final / "manifest.json").exists():
        (final / ".last-used").touch()
        print(final)
        return 0
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"another build holds {root / '.lock'}; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        # Whoever held the lock may have built this key; anything half-built under the root is from a killed build.
        if args.force:
            shutil.rmtree(final, ignore_errors=True)
        if not (final / "manifest.json").exists():
            for stale in root.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            shutil.rmtree(final, ignore_errors=True)
            log(f"building {final} (a cold build takes 15-25 minutes on 2 cores; see tests/cluster/README.md)")
            try:
                build(final, key, env, args.only_kubeplane)
            except BuildError as err:
                log(f"FAILED: {err}")
                return 1
        (final / ".last-used").touch()
        prune(root, final)
    print(final)
    return 0


if __name__ == "__main__":
    sys.exit(main())
