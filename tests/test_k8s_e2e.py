"""End to end on Kubernetes without a cluster: the chart's own rendered pods run as real local processes.

helm renders the chart (backend job, 2 nodes x 1 process, push on, a tiny CPU config). For each pod the test does
what the Job controller and the kubelet would do, and nothing more:
  - env: the image's ENV (the Dockerfile's last stage); KUBERNETES_SERVICE_HOST/_PORT (and KUBERNETES_PORT*) of the
    API server's `kubernetes` Service, which the kubelet gives every pod whatever enableServiceLinks says (kubernetes
    pkg/kubelet/kubelet_pods.go getServiceEnvVarMap: the master services of the default namespace always, the
    namespace's own Services only with service links), here pointing at the fake API server; the service links of
    the release's ClusterIP Services (unless the pod sets enableServiceLinks: false); the container's envFrom and env
    in order, valueFrom resolved (fieldRef, secretKeyRef from a fake Secret, configMapKeyRef) and $(VAR) expanded; an
    Indexed Job's JOB_COMPLETION_INDEX (a fieldRef on the pod's completion-index annotation, as the Job controller
    adds it).
  - volumes: each volumeMount's mountPath becomes a local folder: a PVC is one folder shared by every pod, a
    ConfigMap or Secret its data written as files, an emptyDir a fresh folder, a projected volume its sources' files
    (a serviceAccountToken: the token the fake API server accepts for the pod's ServiceAccount; the kube-root-ca.crt
    ConfigMap, which Kubernetes' root-ca-cert-publisher puts in every namespace: the fake's CA; downwardAPI items:
    the pod's fields). The spec's paths are absolute (/data, /etc/ddpm, the token folder), so every mountPath prefix
    in env values, command/args and ConfigMap files is rewritten to its folder.
  - the API server: tests/fake_kube.py's FakeKube holds what the controllers would create: the training Job (from the
    render, then marked Complete as the Job controller would when both pods exited 0) and its pods with their
    controller ownerReference, so rank 0 finds its workload; each ServiceAccount has its own token, and every call a
    pod made must be allowed by the rendered Role bound to its ServiceAccount (RBAC evaluated as the API server does
    for these verbs, resourceNames included).
  - network: the pod DNS names the headless Service gives (<job>-<index>.<subdomain>) resolve to 127.0.0.1; the
    rendezvous port is a free port, set with the chart's own masterPort value.
  - the image's /opt/venv is the test's venv (PATH) with this checkout's `trainer` first on PYTHONPATH (the image is
    built from this checkout, whichever checkout the venv was installed from); each pod gets a fresh HOME /
    working directory.
  - emptyDirs (/tmp, HOME, /dev/shm) are fresh folders: paths under their mountPaths in env and args point there,
    which is what a read-only root filesystem leaves writable.
Not emulated: securityContext (the processes run as this user; readOnlyRootFilesystem is not enforced), resources
(nvidia.com/gpu is ignored: the chart has no CPU mode, the processes simply run on CPU), restarts and
podFailurePolicy, and every API object or verb the code does not use. Both pods share this machine's hostname, so
torch's c10d rendezvous may give either of them rank 0 (on a cluster, pod 0's name sorts first).

The Hub endpoint goes in through the chart's extraEnv, as for anyone with a mirror; HF_HUB_DISABLE_XET=1 because the
fake Hub (tests/fake_hub.py) speaks the LFS protocol, not Xet.
"""

from __future__ import annotations

import copy
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fake_hub import FakeHub
from fake_kube import FakeKube, condition, owner

pytestmark = pytest.mark.slow  # every test here runs ddpm or torchrun as subprocesses

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm"
RELEASE = "ddpm"
TOKEN = "hf_" + secrets.token_hex(16)
SECRETS = {"hf-token": {"token": TOKEN}}  # the Secret the user creates before installing
REPO_ID = "fake-user/ddpm-k8s"
INDEX_KEY = "batch.kubernetes.io/job-completion-index"
NAMESPACE = "default"
# One API token per ServiceAccount of the render (the kubelet mounts a token bound to the pod's ServiceAccount), and
# one for the user running `ddpm status` from a laptop.
SA_TOKENS = {f"{RELEASE}": "sa-train-" + secrets.token_hex(8), f"{RELEASE}-push": "sa-push-" + secrets.token_hex(8)}
USER_TOKEN = "user-" + secrets.token_hex(8)
MILESTONES = ["RunStarted", "CheckpointSaved", "EvaluationDone", "Completed"]  # trainer/events.py, in a short run
# 16 images, batch 4 per process x 2 processes = 2 steps per epoch; 4 steps = 2 epochs (grids 0000 and 0001).
TINY_CONFIG = {
    "model_preset": "small", "image_size": 16, "builtin_num_images": 16, "train_batch_size": 4, "max_train_steps": 4,
    "eval_batch_size": 4, "num_inference_steps": 2, "dataloader_num_workers": 0, "lr_warmup_steps": 2,
    "save_image_epochs": 1, "checkpointing_steps": 2, "logging_steps": 2, "hub_model_id": REPO_ID,
}
PUSHED = ["README.md", "model_index.json", "samples/0001.png", "scheduler/scheduler_config.json",
          "training_config.yaml", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"]


def helm() -> str:
    found = shutil.which("helm") or shutil.which("helm", path=str(ROOT / ".tools" / "bin"))
    if found is None:
        pytest.fail("helm not found on PATH or in .tools/bin; run `make tools`")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render(values: dict, tmp: Path) -> list[dict]:
    path = tmp / "values.json"
    path.write_text(json.dumps(values))
    result = subprocess.run([helm(), "template", RELEASE, str(CHART), "--values", str(path), "--skip-tests"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def image_config(dockerfile: Path) -> tuple[dict[str, str], list[str]]:
    """ENV and ENTRYPOINT of the Dockerfile's last stage (the runtime image)."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    env, entrypoint = {}, []
    for line in text.splitlines():
        instruction, _, rest = line.strip().partition(" ")
        if instruction.upper() == "FROM":
            env, entrypoint = {}, []
        elif instruction.upper() == "ENV":
            env.update(token.split("=", 1) for token in shlex.split(rest))
        elif instruction.upper() == "ENTRYPOINT":
            entrypoint = json.loads(rest)
    return env, entrypoint


class Cluster:
    """The rendered objects plus what the test stands in for: Secrets, one folder per PVC, pod processes, the API
    server (`api`, a started FakeKube)."""

    def __init__(self, objects: list[dict], root: Path, secrets: dict[str, dict[str, str]], api: FakeKube):
        self.objects, self.root, self.secrets, self.api = objects, root, secrets, api
        # ConfigMaps the cluster itself provides in every namespace (root-ca-cert-publisher)
        self.cluster_config_maps = {"kube-root-ca.crt": {"ca.crt": api.ca_pem.decode()}}
        self.image_env, self.entrypoint = image_config(ROOT / "Dockerfile")
        self.processes: list[subprocess.Popen] = []
        self.hosts = self._pod_dns_names()

    def config_map(self, name: str) -> dict[str, str]:
        if name in self.cluster_config_maps:
            return self.cluster_config_maps[name]
        return self.get("ConfigMap", name)["data"]

    def get(self, kind: str, name: str) -> dict:
        found = [o for o in self.objects if o["kind"] == kind and o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name} in the render, got {len(found)}"
        return found[0]

    def job(self, component: str) -> dict:
        [job] = [o for o in self.objects if o["kind"] == "Job"
                 and o["metadata"]["labels"].get("app.kubernetes.io/component") == component]
        return job

    def _pod_dns_names(self) -> dict[str, str]:
        """<job>-<index>.<subdomain> for every Indexed Job pod, checked to be real names first: a headless Service
        called <subdomain> must select the pods and publish them before they are ready."""
        names = {}
        for job in (o for o in self.objects if o["kind"] == "Job" and o["spec"].get("completionMode") == "Indexed"):
            template = job["spec"]["template"]
            subdomain = template["spec"].get("subdomain")
            if not subdomain:
                continue
            service = self.get("Service", subdomain)["spec"]
            assert service.get("clusterIP") == "None" and service.get("publishNotReadyAddresses") is True
            assert service["selector"].items() <= template["metadata"]["labels"].items()
            for index in range(job["spec"]["completions"]):
                names[f"{job['metadata']['name']}-{index}.{subdomain}"] = "127.0.0.1"
        return names

    def api_service_env(self) -> dict[str, str]:
        """The `kubernetes` Service's variables, which every pod gets: here the fake API server's address."""
        host, port = "127.0.0.1", str(self.api.port)
        return {"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port, "KUBERNETES_SERVICE_PORT_HTTPS": port,
                "KUBERNETES_PORT": f"tcp://{host}:{port}", f"KUBERNETES_PORT_{port}_TCP": f"tcp://{host}:{port}",
                f"KUBERNETES_PORT_{port}_TCP_PROTO": "tcp", f"KUBERNETES_PORT_{port}_TCP_PORT": port,
                f"KUBERNETES_PORT_{port}_TCP_ADDR": host}

    def service_links(self) -> dict[str, str]:
        """The env the kubelet gives a pod with service links for each ClusterIP Service of its namespace that exists
        when it starts (helm creates Services before Jobs and Deployments), with made-up cluster IPs."""
        env = {}
        services = [o for o in self.objects if o["kind"] == "Service" and o["spec"].get("clusterIP") != "None"]
        for number, service in enumerate(services, start=10):
            name, ip = service["metadata"]["name"].upper().replace("-", "_"), f"10.96.0.{number}"
            ports = service["spec"]["ports"]
            env[f"{name}_SERVICE_HOST"], env[f"{name}_SERVICE_PORT"] = ip, str(ports[0]["port"])
            env[f"{name}_PORT"] = f"{ports[0].get('protocol', 'TCP').lower()}://{ip}:{ports[0]['port']}"
            for port in ports:
                proto = port.get("protocol", "TCP")
                if "name" in port:
                    env[f"{name}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}"] = str(port["port"])
                prefix = f"{name}_PORT_{port['port']}_{proto}"
                env[prefix] = f"{proto.lower()}://{ip}:{port['port']}"
                env.update({f"{prefix}_PROTO": proto.lower(), f"{prefix}_PORT": str(port["port"]), f"{prefix}_ADDR": ip})
        return env

    def pod(self, job: dict, index: int | None = None) -> "Pod":
        """The pod the Job controller would create (for an Indexed Job: the one with this completion index)."""
        template = copy.deepcopy(job["spec"]["template"])
        name = f"{job['metadata']['name']}-{'' if index is None else f'{index}-'}{secrets.token_hex(3)}"
        labels = template["metadata"].setdefault("labels", {})
        labels["batch.kubernetes.io/job-name"] = job["metadata"]["name"]
        hostname = name
        if index is not None:
            template["metadata"].setdefault("annotations", {})[INDEX_KEY] = str(index)
            labels[INDEX_KEY] = str(index)
            hostname = f"{job['metadata']['name']}-{index}"
            for container in template["spec"].get("initContainers", []) + template["spec"]["containers"]:
                container.setdefault("env", []).append({"name": "JOB_COMPLETION_INDEX", "valueFrom": {
                    "fieldRef": {"fieldPath": f"metadata.annotations['{INDEX_KEY}']"}}})
        return Pod(self, name, hostname, template)


class Pod:
    def __init__(self, cluster: Cluster, name: str, hostname: str, template: dict):
        self.cluster, self.name, self.hostname = cluster, name, hostname
        self.uid = str(uuid.uuid4())
        self.metadata, self.spec = template["metadata"], template["spec"]
        self.dir = cluster.root / "pods" / name
        self.home = self.dir / "home"  # the image's WORKDIR, the ddpm user's home
        self.home.mkdir(parents=True)
        volumes = {v["name"]: self._volume_dir(v) for v in self.spec.get("volumes", [])}
        self.mounts: dict[str, Path] = {}
        for container in self.containers():
            for mount in container.get("volumeMounts", []):
                local = volumes[mount["name"]] / mount.get("subPath", "")
                assert self.mounts.setdefault(mount["mountPath"], local) == local, "one mountPath, two volumes"
        alternatives = sorted(self.mounts, key=len, reverse=True)
        self._paths = re.compile(r"(?<![\w./-])(" + "|".join(map(re.escape, alternatives)) + r")(?=/|$|[^\w.-])") \
            if alternatives else None
        # <pod>.<subdomain>, also with its namespace-qualified suffixes (the test's namespace is "default")
        self._hosts = re.compile(r"(?<![\w.-])(" + "|".join(map(re.escape, cluster.hosts))
                                 + r")(?:\.default(?:\.svc(?:\.cluster\.local)?)?)?(?![\w-])") if cluster.hosts else None
        for volume in self.spec.get("volumes", []):
            self._fill(volume, volumes[volume["name"]])

    def containers(self) -> list[dict]:
        return self.spec.get("initContainers", []) + self.spec["containers"]

    def api_object(self, controller: dict) -> dict:
        """This pod as the API server holds it, owned by `controller` (the Job) as the Job controller sets it."""
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": self.name, "namespace": NAMESPACE, "uid": self.uid,
                             "labels": dict(self.metadata.get("labels", {})),
                             "annotations": dict(self.metadata.get("annotations", {})),
                             "ownerReferences": [owner(controller)]},
                "spec": {"nodeName": "node-0", "serviceAccountName": self.spec.get("serviceAccountName", "default"),
                         "containers": [{"name": c["name"], "image": c["image"]} for c in self.spec["containers"]]},
                "status": {"phase": "Running", "containerStatuses": [
                    {"name": c["name"], "image": c["image"], "imageID": "", "ready": True, "restartCount": 0}
                    for c in self.spec["containers"]]}}

    def container(self, name: str) -> dict:
        [found] = [c for c in self.containers() if c["name"] == name]
        return found

    def localize(self, text: str) -> str:
        """mountPath prefixes -> their local folders, pod DNS names -> 127.0.0.1."""
        if self._paths is not None:
            text = self._paths.sub(lambda m: str(self.mounts[m[1]]), text)
        if self._hosts is not None:
            text = self._hosts.sub(lambda m: self.cluster.hosts[m[1]], text)
        return text

    def _volume_dir(self, volume: dict) -> Path:
        if "persistentVolumeClaim" in volume:
            path = self.cluster.root / "volumes" / volume["persistentVolumeClaim"]["claimName"]
        elif {"configMap", "secret", "emptyDir", "projected"} & volume.keys():
            path = self.dir / "volumes" / volume["name"]
        else:
            pytest.fail(f"volume {volume} is of a kind this emulation does not know")
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _fill(self, volume: dict, path: Path) -> None:
        if "projected" in volume:
            for source in volume["projected"]["sources"]:
                self._fill_projected(source, path)
            return
        if "configMap" in volume:
            data = {key: self.localize(value) for key, value in self.cluster.config_map(volume["configMap"]["name"]).items()}
            self._write_items(data, volume["configMap"], path)
        elif "secret" in volume:
            self._write_items(self.cluster.secrets[volume["secret"]["secretName"]], volume["secret"], path)

    def _fill_projected(self, source: dict, path: Path) -> None:
        if "serviceAccountToken" in source:
            # a token bound to this pod's ServiceAccount (the fake accepts exactly these)
            account = self.spec.get("serviceAccountName", "default")
            (path / source["serviceAccountToken"]["path"]).write_text(SA_TOKENS[account])
        elif "configMap" in source:
            self._write_items(self.cluster.config_map(source["configMap"]["name"]), source["configMap"], path)
        elif "downwardAPI" in source:
            for item in source["downwardAPI"]["items"]:
                (path / item["path"]).write_text(self._field(item["fieldRef"]["fieldPath"]))
        else:
            pytest.fail(f"projected source {source} is not emulated")

    @staticmethod
    def _write_items(data: dict[str, str], source: dict, path: Path) -> None:
        items = source.get("items") or [{"key": key, "path": key} for key in data]
        for item in items:
            (path / item["path"]).parent.mkdir(parents=True, exist_ok=True)
            (path / item["path"]).write_text(data[item["key"]])

    # ---- env and processes, as the kubelet does them -------------------------------------------------------------
    def _field(self, path: str) -> str:
        if m := re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path):
            return self.metadata.get(m[1], {})[m[2]]
        simple = {"metadata.name": self.name, "metadata.namespace": NAMESPACE, "metadata.uid": self.uid,
                  "spec.nodeName": "node-0",
                  "spec.serviceAccountName": self.spec.get("serviceAccountName", "default"),
                  "status.podIP": "127.0.0.1", "status.hostIP": "127.0.0.1"}
        if path not in simple:
            pytest.fail(f"fieldRef {path} is not emulated")
        return simple[path]

    def _value_from(self, source: dict) -> str:
        if "fieldRef" in source:
            return self._field(source["fieldRef"]["fieldPath"])
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            if ref["name"] not in self.cluster.secrets or ref["key"] not in self.cluster.secrets[ref["name"]]:
                pytest.fail(f"pod {self.name}: Secret {ref['name']} key {ref['key']} does not exist "
                            "(the kubelet would refuse to start the container: CreateContainerConfigError)")
            return self.cluster.secrets[ref["name"]][ref["key"]]
        if "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            return self.localize(self.cluster.config_map(ref["name"])[ref["key"]])
        pytest.fail(f"valueFrom {source} is not emulated")

    @staticmethod
    def _expand(text: str, env: dict[str, str]) -> str:
        """Kubernetes' $(VAR) expansion: defined variables are replaced, $$ escapes, the rest stays as written."""
        return re.sub(r"\$\$|\$\(([A-Za-z_][\w.-]*)\)",
                      lambda m: "$" if m[0] == "$$" else env.get(m[1], m[0]), text)

    def env(self, container: dict) -> dict[str, str]:
        env = dict(self.cluster.image_env)
        # host paths of this machine: never rewritten as if they were paths inside the pod (a checkout under /tmp
        # would otherwise land in the pod's /tmp emptyDir)
        host = dict(PATH=f"{Path(sys.executable).parent}:{os.defpath}", HOME=str(self.home), PYTHONPATH=str(ROOT))
        env.update(host, HOSTNAME=self.hostname)
        env.update(self.cluster.api_service_env())
        if self.spec.get("enableServiceLinks", True):
            env.update(self.cluster.service_links())
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                data = self.cluster.config_map(source["configMapRef"]["name"])
            else:
                data = self.cluster.secrets[source["secretRef"]["name"]]
            env.update({source.get("prefix", "") + k: v for k, v in data.items()})
        for item in container.get("env", []):
            env[item["name"]] = self._expand(item["value"], env) if "value" in item else self._value_from(item["valueFrom"])
        local = {key: self.localize(value) for key, value in env.items()}
        return local | {key: value for key, value in host.items() if env[key] == value}

    def start(self, name: str, **popen) -> subprocess.Popen:
        """Run the container's command and args (or the image's ENTRYPOINT) as a local process."""
        container = self.container(name)
        env = self.env(container)
        argv = [self.localize(self._expand(a, env))
                for a in container.get("command", self.cluster.entrypoint) + container.get("args", [])]
        executable = shutil.which(argv[0], path=env["PATH"])
        assert executable, f"{argv[0]} is not on the image's PATH"
        cwd = self.localize(container["workingDir"]) if "workingDir" in container else self.home
        proc = subprocess.Popen([executable, *argv[1:]], env=env, cwd=cwd, start_new_session=True, **popen)
        self.cluster.processes.append(proc)
        return proc


def wait_all(processes: dict[str, subprocess.Popen], logs: dict[str, Path], timeout: float) -> dict[str, int]:
    """Exit codes of all pods. When one fails the others are killed at once (as a failed Job's pods are): a
    survivor would otherwise sit in torchrun's exit barrier for minutes."""
    deadline, codes = time.monotonic() + timeout, {}
    while len(codes) < len(processes):
        for name, proc in processes.items():
            if name in codes:
                continue
            try:
                codes[name] = proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                continue
            if codes[name] != 0:
                for other in processes.values():
                    if other.poll() is None:
                        os.killpg(other.pid, signal.SIGKILL)
                return {n: p.wait() for n, p in processes.items()}
        if time.monotonic() > deadline:
            pytest.fail(f"pods still running after {timeout}s\n" + tails(logs))
    return codes


def tails(logs: dict[str, Path], lines: int = 40) -> str:
    return "\n".join(f"--- {name} ---\n" + "\n".join(path.read_text().splitlines()[-lines:])
                     for name, path in logs.items())


def rbac_denied(objects: list[dict], requests) -> list[str]:
    """Every request a pod's token made that the rendered RBAC does not allow: the Roles bound (by RoleBinding) to
    the token's ServiceAccount, matched as the API server's RBAC authorizer does (rbac/v1 PolicyRule: apiGroups,
    resources, verbs, and resourceNames, which a list or watch satisfies only with a metadata.name field selector;
    Kubernetes docs "Using RBAC Authorization", Referring to resources)."""
    roles = {o["metadata"]["name"]: o["rules"] for o in objects if o["kind"] == "Role"}
    rules_of: dict[str, list[dict]] = {}
    for binding in (o for o in objects if o["kind"] == "RoleBinding"):
        for subject in binding["subjects"]:
            rules_of.setdefault(subject["name"], []).extend(roles[binding["roleRef"]["name"]])
    account_of = {token: account for account, token in SA_TOKENS.items()}
    denied = []
    for r in requests:
        if r.token == USER_TOKEN or not r.verb:
            continue
        name = r.name or (r.query.get("fieldSelector", "").partition("metadata.name=")[2] or None)

        def allows(rule: dict) -> bool:
            if r.group not in rule["apiGroups"] or r.resource not in rule["resources"] or r.verb not in rule["verbs"]:
                return False
            return "resourceNames" not in rule or name in rule["resourceNames"]

        if not any(allows(rule) for rule in rules_of.get(account_of.get(r.token), [])):
            denied.append(f"{account_of.get(r.token, r.token)}: {r.verb} {r.group}/{r.resource} {name or ''}")
    return denied


@pytest.fixture
def hub():
    with FakeHub(tokens=(TOKEN,)) as server:
        yield server


@pytest.fixture
def api():
    with FakeKube(tokens=set(SA_TOKENS.values()) | {USER_TOKEN}) as server:
        yield server


@pytest.fixture
def cluster(hub, api, tmp_path):
    values = {
        "backend": "job", "gpus": 2, "gpusPerNode": 1, "masterPort": free_port(), "config": TINY_CONFIG,
        "push": {"enabled": True, "tokenSecret": "hf-token", "pollSeconds": 1},
        # two nodes share the volume: the chart requires a ReadWriteMany class for that (here: one local folder)
        "storage": {"accessModes": ["ReadWriteMany"], "storageClass": "nfs"},
        "extraEnv": [{"name": "HF_ENDPOINT", "value": hub.url}, {"name": "HF_HUB_DISABLE_XET", "value": "1"}],
    }
    cluster = Cluster(render(values, tmp_path), tmp_path / "cluster", SECRETS, api)
    yield cluster
    for proc in cluster.processes:  # only what this test started, each by its own process group
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_rendered_pods_train_together_then_the_push_job_uploads(cluster, hub, api):
    train_job, push_job = cluster.job("train"), cluster.job("push")
    nodes = train_job["spec"]["completions"]
    assert nodes == 2 and train_job["spec"]["completionMode"] == "Indexed"
    # helm install creates the Job; the Job controller its pods (with their controller ownerReference).
    job = api.put(dict(train_job, metadata=dict(train_job["metadata"], namespace=NAMESPACE), status={"active": nodes}))
    pods = [cluster.pod(train_job, index) for index in range(nodes)]
    for pod in pods:
        api.put(pod.api_object(job))

    # helm install starts the push Job with the training: its init container follows the training Job through the API.
    pusher = cluster.pod(push_job)
    wait_command = pusher.container("wait-for-training")["command"]
    assert wait_command[:4] == ["ddpm", "wait-for-training", "--workload", f"Job/{train_job['metadata']['name']}"]
    waiter = pusher.start("wait-for-training", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert api.wait_for_watches(1, timeout=60), "wait-for-training did not watch the training Job"
    assert waiter.poll() is None, f"wait-for-training ended before training started:\n{waiter.stdout.read()}"

    # One process per index, each the trainer container's own command with the pod's env, volumes and names.
    logs = {pod.name: pod.dir / "trainer.log" for pod in pods}
    trainers = {}
    for pod in pods:
        with logs[pod.name].open("w") as log:
            trainers[pod.name] = pod.start("trainer", stdout=log, stderr=subprocess.STDOUT)
    codes = wait_all(trainers, logs, timeout=300)
    rank0, rank1 = (logs[pod.name].read_text() for pod in pods)
    group = "global batch 8 = 4 per process x 1 accumulation x 2 processes"
    assert (group in rank0) != (group in rank1), "the 2 pods did not train as one 2-process group\n" + tails(logs)
    assert list(codes.values()) == [0] * nodes, tails(logs)

    # What landed on the volume: checkpoints (each with both ranks' RNG state), grids, TensorBoard, the pipeline.
    config = yaml.safe_load(pusher.localize(cluster.get("ConfigMap", f"{RELEASE}-config")["data"]["config.yaml"]))
    out = Path(config["output_dir"])
    marker = out / "training_complete.json"
    assert out.is_relative_to(cluster.root / "volumes")
    assert json.loads(marker.read_text())["global_step"] == 4
    for step in (2, 4):
        checkpoint = out / "checkpoints" / f"checkpoint-{step}"
        for name in ("model.safetensors", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl"):
            assert (checkpoint / name).is_file(), f"{checkpoint / name} missing"
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["0000.png", "0001.png"]
    # The scalars' event file (the tracker may write others, e.g. hparams, beside it).
    accumulators = []
    for events in sorted((out / "logs").rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        accumulators += [accumulator] if "loss" in accumulator.Tags()["scalars"] else []
    [accumulator] = accumulators
    assert [e.step for e in accumulator.Scalars("loss")] == [2, 4]
    for name in ("model_index.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
                 "README.md", "training_config.yaml"):
        assert (out / name).is_file(), f"{name} missing"

    # Both pods exited 0: the Job controller marks the Job Complete; the init container sees it through its watch,
    # checks the marker and ends (the API path, not marker polling); then `ddpm push` uploads to the fake Hub.
    api.put(dict(job, status={"succeeded": nodes, "conditions": [condition("SuccessCriteriaMet"), condition("Complete")]}))
    assert waiter.wait(timeout=60) == 0, waiter.stdout.read()
    wait_output = waiter.stdout.read()
    assert f"Job/{RELEASE}-train succeeded; completion marker matches" in wait_output, wait_output
    assert "polling the completion marker" not in wait_output, wait_output
    push_calls = {r.call for r in api.requests if r.token == SA_TOKENS[f"{RELEASE}-push"]}
    assert push_calls == {("batch", "jobs", "get"), ("batch", "jobs", "watch")}, push_calls
    push = pusher.start("push", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, _ = push.communicate(timeout=180)
    assert push.returncode == 0, output
    assert output.strip().splitlines()[-1] == f"pushed: {hub.url}/{REPO_ID}"
    repo = hub.repos[REPO_ID]
    assert sorted(repo.files) == PUSHED
    for name in PUSHED:
        assert repo.files[name] == (out / name).read_bytes(), f"{name} differs"
    assert not repo.private and len(repo.commits) == 1
    assert all(r.authorization == f"Bearer {TOKEN}" for r in hub.api_requests() if not r.path.startswith("/lfs-storage/"))
    assert TOKEN not in output + rank0 + rank1

    # Every API call a pod made is one the rendered Roles allow its ServiceAccount (the push's get+watch, the
    # trainer's events, pod and workload reads); the upload container never had a token to call with.
    assert not rbac_denied(cluster.objects, api.requests)
    assert not [r for r in api.requests if r.status == 401], "a token the API server does not know"

    # `ddpm status` from a laptop (kubeconfig, the user's own rights) finds the release's finished run.
    bin_path = f"{Path(sys.executable).parent}:{os.defpath}"
    laptop = {"PATH": bin_path, "HOME": str(cluster.root), "PYTHONPATH": str(ROOT),
              "KUBECONFIG": str(api.write_kubeconfig(cluster.root / "kubeconfig", token=USER_TOKEN))}
    status = subprocess.run([shutil.which("ddpm", path=bin_path), "status", "--release", RELEASE, "-n", NAMESPACE],
                            env=laptop, capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"workload    Job/{RELEASE}-train: succeeded" in status.stdout, status.stdout

    # The run's milestones as Events, posted by rank 0 through the chart's own token mount: on its pod and on the
    # Job, in order (the trainer's loop posts them with trainer.events.RunEvents), and `ddpm status` reads them.
    events = api.events()
    on_job = [e["reason"] for e in events if e["involvedObject"]["kind"] == "Job"
              and e["involvedObject"].get("uid") == job["metadata"]["uid"]]
    on_pods = {pod.name: [e["reason"] for e in events if e["involvedObject"]["kind"] == "Pod"
                          and e["involvedObject"].get("uid") == pod.uid] for pod in pods}
    assert on_job == MILESTONES and sorted(on_pods.values()) == [[], MILESTONES], (
        f"Events on Job/{RELEASE}-train: {on_job}; on the pods: {on_pods}; expected {MILESTONES} on the Job and on "
        "rank 0's pod (none at all: the trainer's loop does not post them)")
    assert all(e["source"]["component"] == "ddpm-trainer" for e in events)
    assert "completed   model in" in subprocess.run(status.args, env=laptop, capture_output=True, text=True,
                                                   timeout=60).stdout
