"""The Kubernetes API as trainer/kube.py reaches it in the unit tests of events, wait-for-training, `ddpm status`, the
stall deadline and kube.py: a real kube-apiserver (tests/cluster/apiserver.py: etcd and the API server, no controllers
or nodes), behind a small HTTPS proxy of ours that adds the faults a real server cannot be made to show on demand.

Every plain answer is the real server's: authentication of the bearer token, validation of Events, pods, Jobs and the
operators' custom resources (their CRDs' schemas), label and field selectors, strategic merge patches, watches (with
their resourceVersion semantics), 404 for what does not exist. A test sets the objects' states itself, as the
controllers would (`put`: the object created, its status written through the status subresource).

What the proxy adds, and only on request: every request hanging until the proxy stops (`hang = True`), calls refused
with the API server's 403 (`deny`, `deny_all`; what the chart's real Roles refuse is tested by the real authorizer in
tests/test_cluster_job.py), a resource answered 404 as when its CRD is not installed (`uninstalled`: the CRDs are
cluster-wide, shared by every test of the worker), and `closed_port()` for an absent API server. It also records
every request the code made, with its (group, resource, verb) as the authorizer names it (GET on a name: get; on a
collection: list, or watch with ?watch=true; POST create; PATCH patch), so a test can assert exactly what was called.

TLS: the in-cluster loader only builds https URLs, so the proxy presents a certificate for 127.0.0.1 signed by a test
CA (trustme); `write_service_account` and `write_kubeconfig` hand that CA to the client, as a cluster does. The proxy
verifies the API server's own certificate and passes the bearer token through.
"""

from __future__ import annotations

import copy
import json
import socket
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import trustme
import urllib3
import yaml

from cluster.api import ApiError as UpstreamError

TOKEN = "test-sa-token-" + uuid.uuid4().hex  # unique per session, so a leak into a message is unmistakable
# kind -> (group, version, plural) of everything the tests create
KINDS = {
    "Pod": ("", "v1", "pods"),
    "Event": ("", "v1", "events"),
    "Job": ("batch", "v1", "jobs"),
    "PyTorchJob": ("kubeflow.org", "v1", "pytorchjobs"),
    "JobSet": ("jobset.x-k8s.io", "v1alpha2", "jobsets"),
    "TrainJob": ("trainer.kubeflow.org", "v1alpha1", "trainjobs"),
}


def collection(kind: str, namespace: str) -> str:
    group, version, plural = KINDS[kind]
    return f"{'/apis/' + group if group else '/api'}/{version}/namespaces/{namespace}/{plural}"


def api_version(kind: str) -> str:
    group, version, _ = KINDS[kind]
    return f"{group}/{version}" if group else version


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    group: str | None
    resource: str | None
    verb: str | None
    namespace: str | None
    name: str | None
    token: str | None
    status: int = 0
    content_type: str | None = None
    body: dict | None = None

    @property
    def call(self) -> tuple[str, str, str]:
        return self.group, self.resource, self.verb


class Fault(Exception):
    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


def closed_port() -> int:
    """A port nothing listens on: an absent API server (connection refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class KubeProxy:
    upstream: object | None = None  # cluster.apiserver.ApiServer; None: a proxy that only hangs or is never reached
    hang: bool = False  # every request waits until stop(): a server that accepts and never answers
    requests: list[Request] = field(default_factory=list)
    denied: set[tuple[str, str, str]] = field(default_factory=set)  # (group, resource, verb) answered 403
    deny_all: bool = False
    uninstalled: set[tuple[str, str]] = field(default_factory=set)  # (group, plural) answered 404, like a missing CRD

    def __post_init__(self):
        self._changed = threading.Condition()
        self._stopping = threading.Event()
        self.watches = 0  # watches the API server has accepted
        self._streams: set = set()  # open upstream watch responses, closed by stop()
        self._created_events: list[tuple[str, str]] = []  # (namespace, name), in the order they were created
        self.namespaces: set[str] = set()  # every namespace a test wrote to or the code called in
        self._ca = trustme.CA()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._http = None
        if self.upstream is not None:
            context = ssl.create_default_context(cafile=str(self.upstream.ca.cert_path))
            self._http = urllib3.PoolManager(ssl_context=context, maxsize=8, retries=False)

    # ---- control, for tests ------------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_pem(self) -> bytes:
        return self._ca.cert_pem.bytes()

    def start(self) -> "KubeProxy":
        proxy = self

        class Handler(_Handler):
            kube = proxy

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        # The handshake happens in the request's own thread, so a slow client cannot stall accept().
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True,
                                                  do_handshake_on_connect=False)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="kube-proxy",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # releases hanging requests
        with self._changed:
            for stream in list(self._streams):  # ends the watches still open
                stream.shutdown()  # urllib3 >= 2.3: unblocks the thread reading it
            self._changed.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = None

    def __enter__(self) -> "KubeProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        if self.upstream is not None:
            self.clean()

    def deny(self, *calls: tuple[str, str, str]) -> None:
        self.denied.update(calls)

    def put(self, obj: dict) -> dict:
        """Create `obj` on the API server as its controller would have (or, if one of its kind and name exists, only
        replace its status): the object, then its status through the status subresource. Returns it as stored (uid,
        resourceVersion, ...)."""
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        namespace, name = meta.setdefault("namespace", "default"), meta["name"]
        self._ensure_namespace(namespace)
        status = obj.pop("status", None)
        path = collection(obj["kind"], namespace)
        api = self.upstream.api
        try:
            stored = api.get(f"{path}/{name}")  # it exists (a test passing back what put returned): a status update
        except UpstreamError as e:
            if e.status != 404:
                raise
            stored = api.create(path, obj)
        if status is not None:
            if obj["kind"] == "Job":
                status = finished_job_status(status)
            stored = api.request("PUT", f"{path}/{name}/status", dict(stored, status=status))
        return stored

    def _ensure_namespace(self, namespace: str) -> None:
        """The namespace and its `default` service account (the ServiceAccount admission plugin refuses a pod without
        it, and no controller here creates it)."""
        if namespace in self.namespaces:
            return
        for path, body in (("/api/v1/namespaces", {"metadata": {"name": namespace}}),
                           (f"/api/v1/namespaces/{namespace}/serviceaccounts", {"metadata": {"name": "default"}})):
            try:
                self.upstream.api.create(path, body)
            except UpstreamError as e:
                if e.status != 409:
                    raise
        self.namespaces.add(namespace)

    def events(self) -> list[dict]:
        """Every Event held, in the order they were created (a patch keeps its place)."""
        order = {key: i for i, key in enumerate(self._created_events)}
        held = self.upstream.api.get("/api/v1/events").get("items") or []
        held = [{"apiVersion": "v1", "kind": "Event", **e} for e in held]  # a list's items carry neither
        return sorted(held, key=lambda e: (order.get((e["metadata"]["namespace"], e["metadata"]["name"]), len(order)),
                                          int(e["metadata"]["resourceVersion"])))

    def calls(self) -> set[tuple[str, str, str]]:
        return {r.call for r in self.requests if r.verb}

    def wait_for_watches(self, count: int, timeout: float = 10.0) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.watches >= count, timeout)

    def clean(self) -> None:
        """Delete what the test left in its namespaces (no controller or garbage collector does it here)."""
        api = self.upstream.api
        for namespace in self.namespaces | {r.namespace for r in self.requests if r.namespace}:
            for kind in KINDS:
                try:
                    # Background: the default for Jobs (orphan) adds a finalizer only a garbage collector removes
                    api.request("DELETE", collection(kind, namespace),
                                params={"gracePeriodSeconds": "0", "propagationPolicy": "Background"})
                except UpstreamError as e:
                    if e.status != 404:
                        raise

    def write_service_account(self, folder: Path, namespace: str = "default", token: str = TOKEN) -> Path:
        """What the kubelet mounts at /var/run/secrets/kubernetes.io/serviceaccount."""
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "token").write_text(token)
        (folder / "ca.crt").write_bytes(self.ca_pem)
        (folder / "namespace").write_text(namespace)
        return folder

    def in_cluster_env(self, service_account: Path) -> dict[str, str]:
        return {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(self.port),
                "K8S_SERVICE_ACCOUNT_DIR": str(service_account), "NO_PROXY": "127.0.0.1"}

    def write_kubeconfig(self, path: Path, namespace: str | None = "default", token: str = TOKEN,
                         context: str = "test") -> Path:
        ca = path.parent / "kube-proxy-ca.crt"
        ca.write_bytes(self.ca_pem)
        ctx = {"cluster": "test", "user": "test"} | ({"namespace": namespace} if namespace else {})
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": context,
            "clusters": [{"name": "test", "cluster": {"server": self.url, "certificate-authority": str(ca)}}],
            "users": [{"name": "test", "user": {"token": token}}],
            "contexts": [{"name": context, "context": ctx}],
        }))
        return path

    # ---- the faults ----------------------------------------------------------------------------------------------
    def fault(self, request: Request) -> Fault | None:
        if request.resource is not None and (request.group, request.resource) in self.uninstalled:
            return Fault(404, "NotFound", "the server could not find the requested resource")
        if self.deny_all or request.call in self.denied:
            # the API server's wording (k8s.io/apiserver/pkg/endpoints/handlers/responsewriters/errors.go)
            resource = f"{request.resource}.{request.group}" if request.group else request.resource
            named = f' "{request.name}"' if request.name else ""
            return Fault(403, "Forbidden", f'{resource}{named} is forbidden: User "system:serviceaccount:'
                                           f'{request.namespace}:ddpm" cannot {request.verb} resource '
                                           f'"{request.resource}" in API group "{request.group}" in the '
                                           f'namespace "{request.namespace}"')
        return None


def _parse(method: str, raw_path: str, headers) -> Request:
    parts = urlsplit(raw_path)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    segments = [s for s in parts.path.split("/") if s]
    auth = headers.get("Authorization") or ""
    token = auth[len("Bearer "):] if auth.lower().startswith("bearer ") else None
    group = namespace = resource = name = verb = None
    if segments[:2] == ["api", "v1"]:
        group, rest = "", segments[2:]
    elif segments[:1] == ["apis"] and len(segments) >= 3:
        group, rest = segments[1], segments[3:]
    else:
        rest = []
    if len(rest) >= 3 and rest[0] == "namespaces" and len(rest) <= 4:
        namespace, resource = rest[1], rest[2]
        name = rest[3] if len(rest) == 4 else None
        watch = (query.get("watch") or "").lower() in ("true", "1", "t")  # Go strconv.ParseBool
        verb = {"GET": "get" if name else ("watch" if watch else "list"), "POST": "create", "PATCH": "patch",
                "PUT": "update", "DELETE": "delete"}.get(method)
    return Request(method, parts.path, query, group, resource, verb, namespace, name, token,
                   content_type=(headers.get("Content-Type") or "").split(";")[0] or None)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as two writes: no 40 ms delayed-ACK stall between
    kube: KubeProxy

    def setup(self) -> None:
        super().setup()
        try:
            self.connection.do_handshake()
        except (ssl.SSLError, OSError):
            self.close_connection = True

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except (ssl.SSLError, ConnectionError):
            self.close_connection = True

    def _serve(self) -> None:
        request = _parse(self.command, self.path, self.headers)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        request.body = json.loads(raw) if raw else None
        self.kube.requests.append(request)
        if self.kube.hang:
            self.kube._stopping.wait()  # until the test stops the proxy
            self.close_connection = True
            return
        fault = self.kube.fault(request)
        if fault is not None:
            request.status = fault.status
            return self._send(fault.status, "application/json", json.dumps({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": fault.message,
                "reason": fault.reason, "code": fault.status}).encode())
        headers = {k: v for k in ("Authorization", "Content-Type", "Accept", "User-Agent")
                   if (v := self.headers.get(k))}
        watch = request.verb == "watch"
        response = self.kube._http.request(
            self.command, self.kube.upstream.url + self.path, body=raw or None, headers=headers,
            preload_content=not watch, timeout=urllib3.Timeout(connect=5.0, read=None if watch else 30.0))
        request.status = response.status
        if request.namespace:
            self.kube.namespaces.add(request.namespace)
        if request.resource == "events" and request.verb == "create" and response.status == 201:
            self.kube._created_events.append((request.namespace, json.loads(response.data)["metadata"]["name"]))
        if not watch or response.status != 200:
            return self._send(response.status, response.headers.get("Content-Type", "application/json"),
                              response.data if not watch else response.read())
        self._relay_watch(response)

    def _send(self, status: int, content_type: str, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _relay_watch(self, response) -> None:
        """The API server's watch stream, chunk by chunk as it arrives (one JSON event per line)."""
        self.send_response(200)
        self.send_header("Content-Type", response.headers.get("Content-Type", "application/json"))
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        with self.kube._changed:
            self.kube._streams.add(response)
            self.kube.watches += 1
            self.kube._changed.notify_all()
        try:
            for chunk in response.read_chunked(decode_content=True):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        except (ConnectionError, ssl.SSLError, OSError, urllib3.exceptions.HTTPError):
            self.close_connection = True
        finally:
            with self.kube._changed:
                self.kube._streams.discard(response)
            response.release_conn()

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _serve

    def log_message(self, format, *args) -> None:  # the request log is `KubeProxy.requests`, not stderr
        pass


# ---- objects as the controllers would create them ----------------------------------------------------------------
def owner(obj: dict) -> dict:
    """A controller ownerReference to `obj`, as the Job/JobSet/Trainer/Training-Operator controllers set them."""
    return {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "name": obj["metadata"]["name"],
            "uid": obj["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}


CONTAINER = {"name": "trainer", "image": "ddpm-trainer:test"}


def pod_template(container: str = "trainer") -> dict:
    return {"spec": {"restartPolicy": "Never", "containers": [dict(CONTAINER, name=container)]}}


def minimal_spec(kind: str) -> dict:
    """A spec the API server (and the operator's CRD schema) accepts, as small as the kind allows."""
    return {
        "Job": {"template": pod_template()},
        "PyTorchJob": {"pytorchReplicaSpecs": {"Worker": {"replicas": 1, "template": pod_template("pytorch")}}},
        "JobSet": {"replicatedJobs": [{"name": "node", "replicas": 1,
                                       "template": {"spec": {"template": pod_template()}}}]},
        "TrainJob": {"runtimeRef": {"name": "torch-distributed"}},
    }[kind]


def workload(kind: str, name: str, namespace: str = "default", *, labels: dict | None = None,
             conditions: list[dict] | None = None, status: dict | None = None, owned_by: dict | None = None,
             spec: dict | None = None) -> dict:
    meta = {"name": name, "namespace": namespace, "labels": labels or {}}
    if owned_by is not None:
        meta["ownerReferences"] = [owner(owned_by)]
    return {"apiVersion": api_version(kind), "kind": kind, "metadata": meta, "spec": spec or minimal_spec(kind),
            "status": dict(status or {}, conditions=conditions or [])}


def finished_job_status(status: dict) -> dict:
    """A Job status with a Complete or Failed condition, completed with what the Job controller writes alongside it
    and the API server requires (k8s.io/kubernetes pkg/apis/batch/validation: validateJobStatusUpdate): a start time,
    no active pods, SuccessCriteriaMet or FailureTarget before the terminal condition, and a completion time when
    Complete."""
    conditions = status.get("conditions") or []
    done = {c["type"] for c in conditions if c.get("status") == "True"} & {"Complete", "Failed"}
    if not done:
        return status
    first = "SuccessCriteriaMet" if "Complete" in done else "FailureTarget"
    if first not in {c["type"] for c in conditions}:
        terminal = next(c for c in conditions if c["type"] in done)
        conditions = [dict(terminal, type=first)] + conditions
    now = _now()
    return {k: v for k, v in status.items() if k != "active"} | {
        "conditions": conditions, "startTime": status.get("startTime") or now,
        **({"completionTime": status.get("completionTime") or now} if "Complete" in done else {})}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def condition(type_: str, reason: str = "", message: str = "", status: str = "True") -> dict:
    return {"type": type_, "status": status, "reason": reason or type_, "message": message,
            "lastTransitionTime": _now()}


def pod(name: str, namespace: str = "default", *, labels: dict | None = None, owned_by: dict | None = None,
        phase: str = "Running", restarts: int = 0, node: str = "node-a", container: str = "trainer") -> dict:
    meta = {"name": name, "namespace": namespace, "labels": labels or {}}
    if owned_by is not None:
        meta["ownerReferences"] = [owner(owned_by)]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
            "spec": pod_template(container)["spec"] | {"nodeName": node},
            "status": {"phase": phase, "containerStatuses": [
                {"name": container, "image": "ddpm-trainer:test", "imageID": "", "ready": phase == "Running",
                 "restartCount": restarts}]}}


INDEX_LABEL = "batch.kubernetes.io/job-completion-index"


def chart_labels(release: str) -> dict[str, str]:
    """The labels the chart puts on the training workload and its pod template (helm/templates/_helpers.tpl)."""
    return {"app.kubernetes.io/name": "ddpm", "app.kubernetes.io/instance": release,
            "app.kubernetes.io/component": "train"}


@dataclass
class TrainingRun:
    workload: dict
    pods: list[dict]

    @property
    def ref(self) -> str:
        return f"{self.workload['kind']}/{self.workload['metadata']['name']}"


def put_training_run(fake: KubeProxy, kind: str, *, release: str = "ddpm", namespace: str = "default",
                     nodes: int = 2, name: str | None = None, conditions: list[dict] | None = None,
                     restarts: dict[int, int] | None = None, phases: dict[int, str] | None = None,
                     master: bool = True) -> TrainingRun:
    """A training workload of `kind` named as the chart names it, the objects its controllers create in between,
    and one pod per node rank with the labels those controllers add. Pod 0 is rank 0. A PyTorchJob has a Master
    replica and Workers, or with `master=False` Workers only (what the chart renders: worker-0 hosts the
    rendezvous)."""
    name = name or (release if "ddpm" in release else f"{release}-ddpm") + "-train"
    labels, restarts, phases = chart_labels(release), restarts or {}, phases or {}
    status = {  # what each controller reports while the pods run
        "Job": {"active": nodes},
        "PyTorchJob": {"replicaStatuses": {"Worker": {"active": nodes}}} if not master else
                      {"replicaStatuses": {"Master": {"active": 1}} | ({"Worker": {"active": nodes - 1}}
                                                                       if nodes > 1 else {})},
        "TrainJob": {"jobsStatus": [{"name": "node", "active": nodes, "ready": nodes, "succeeded": 0, "failed": 0,
                                     "suspended": 0}]},
        "JobSet": {"replicatedJobsStatus": [{"name": "node", "active": 1, "ready": 1, "succeeded": 0, "failed": 0,
                                             "suspended": 0}]},
    }[kind]
    top = workload(kind, name, namespace, labels=labels, conditions=conditions, status=status)
    if kind == "PyTorchJob":  # the replica specs as the operator's API has them (pod templates left out)
        replicas = {"Master": 1, "Worker": nodes - 1} if master else {"Worker": nodes}
        top["spec"] = {"pytorchReplicaSpecs": {role: {"replicas": n, "template": pod_template("pytorch")}
                                               for role, n in replicas.items() if n}}
    top = fake.put(top)
    pods = []
    if kind == "PyTorchJob":
        for rank in range(nodes):
            role, index = ("master", 0) if master and rank == 0 else ("worker", rank - 1 if master else rank)
            pod_labels = labels | {"training.kubeflow.org/job-name": name, "training.kubeflow.org/replica-type": role,
                                   "training.kubeflow.org/replica-index": str(index),
                                   "training.kubeflow.org/operator-name": "pytorchjob-controller"}
            pods.append(fake.put(pod(f"{name}-{role}-{index}", namespace, labels=pod_labels, owned_by=top,
                                     restarts=restarts.get(rank, 0), phase=phases.get(rank, "Running"),
                                     node=f"node-{rank}", container="pytorch")))
        return TrainingRun(top, pods)
    job = top
    if kind in ("TrainJob", "JobSet"):  # TrainJob -> JobSet (same name) -> Job <jobset>-<replicatedJob>-<index>
        jobset = top if kind == "JobSet" else fake.put(workload("JobSet", name, namespace, owned_by=top))
        job = fake.put(workload("Job", f"{name}-node-0", namespace, owned_by=jobset, status={"active": nodes}))
    for rank in range(nodes):
        pod_labels = labels | {"batch.kubernetes.io/job-name": job["metadata"]["name"], INDEX_LABEL: str(rank)}
        if kind in ("TrainJob", "JobSet"):
            pod_labels |= {"jobset.sigs.k8s.io/jobset-name": name, "jobset.sigs.k8s.io/replicatedjob-name": "node"}
        pods.append(fake.put(pod(f"{job['metadata']['name']}-{rank}-{uuid.uuid4().hex[:5]}", namespace,
                                 labels=pod_labels, owned_by=job, restarts=restarts.get(rank, 0),
                                 phase=phases.get(rank, "Running"), node=f"node-{rank}",
                                 container="node" if kind == "TrainJob" else "trainer")))
    return TrainingRun(top, pods)


def pod_env(fake: KubeProxy, service_account: Path, run: TrainingRun, rank: int = 0,
            workload_env: bool = True) -> dict[str, str]:
    """The environment of rank `rank`'s trainer container: in-cluster API access, the downward API's POD_NAME,
    POD_NAMESPACE and POD_UID, and the chart's TRAINING_WORKLOAD."""
    meta = run.pods[rank]["metadata"]
    env = fake.in_cluster_env(service_account) | {"POD_NAME": meta["name"], "POD_NAMESPACE": meta["namespace"],
                                                  "POD_UID": meta["uid"]}
    return env | ({"TRAINING_WORKLOAD": run.ref} if workload_env else {})


def undeclared_calls(fake: KubeProxy) -> set[tuple[str, str, str]]:
    """Calls the server saw that trainer.rbac.API_CALLS does not declare."""
    from trainer.rbac import API_CALLS

    return {(g, r, v) for g, r, v in fake.calls() if v not in API_CALLS.get((g, r), ())}


@pytest.fixture
def kube_server(api_server):
    """The API as the code reaches it (a KubeProxy in front of this worker's API server); afterwards, every call the
    code made must be one trainer.rbac.API_CALLS declares, and what the test created is deleted."""
    proxy = KubeProxy(api_server).start()
    try:
        yield proxy
    finally:
        proxy.stop()
        proxy.clean()
    assert not undeclared_calls(proxy), f"calls not in trainer.rbac.API_CALLS: {undeclared_calls(proxy)}"
