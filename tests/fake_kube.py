"""A local stand-in for the Kubernetes API server: a real HTTPS server on 127.0.0.1 (a thread) answering the calls
trainer/kube.py makes through the official client, reached through the in-cluster configuration
(KUBERNETES_SERVICE_HOST/PORT, token and CA files) or a kubeconfig, in the unit tests of events, wait-for-training,
`ddpm status`, the stall deadline and kube.py.

What it is for: what a real server cannot be made to do on demand, for the trainer's best-effort API use: every
request hanging until the server stops (`hang = True`), calls refused with 403 (`deny`, `deny_all`), a resource that
is not served (`uninstalled`: 404, like a missing CRD), and `closed_port()` for an absent API server. The chart on a
real API server, with its real authorizer and controllers, is tested in tests/test_cluster_*.py. The plain API
behaviour below (objects, owner chains, watches, Events) is still what these unit tests read and write through; it
could move to the real control plane (tests/cluster) where a test needs no fault.

  GET   /api/v1/namespaces/<ns>/pods/<name>                    get
  GET   /api/v1/namespaces/<ns>/pods?labelSelector=...         list
  POST  /api/v1/namespaces/<ns>/events                         create (409 if the name exists)
  PATCH /api/v1/namespaces/<ns>/events/<name>                  patch (strategic/merge patch of plain fields)
  GET   /api/v1/namespaces/<ns>/events?fieldSelector=...       list
  GET   /apis/batch/v1/namespaces/<ns>/jobs[/<name>]           get, list, watch (?watch=true)
  GET   /apis/kubeflow.org/v1/.../pytorchjobs[/<name>]          likewise; also jobset.x-k8s.io/v1alpha2 jobsets and
                                                               trainer.kubeflow.org/v1alpha1 trainjobs
Verbs are named as the API server's authorizer names them (GET on a name: get; on a collection: list, or watch with
?watch=true; POST create; PATCH patch). A watch streams one JSON event per chunk (chunked transfer encoding, as the
real server does), ADDED for what exists at the start, MODIFIED for each later change, until timeoutSeconds.

TLS: the in-cluster loader only builds https URLs, so the server presents a certificate for 127.0.0.1 signed by a
test CA (trustme); `write_service_account` and `write_kubeconfig` hand that CA to the client, as a cluster does.
Every request is recorded in `requests` with its (group, resource, verb) and bearer token.
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
import yaml

TOKEN = "fake-sa-token-" + uuid.uuid4().hex  # unique per session, so a leak into a message is unmistakable
# (group, plural) -> (apiVersion, kind) of everything the fake serves
RESOURCES = {
    ("", "pods"): ("v1", "Pod"),
    ("", "events"): ("v1", "Event"),
    ("batch", "jobs"): ("batch/v1", "Job"),
    ("kubeflow.org", "pytorchjobs"): ("kubeflow.org/v1", "PyTorchJob"),
    ("jobset.x-k8s.io", "jobsets"): ("jobset.x-k8s.io/v1alpha2", "JobSet"),
    ("trainer.kubeflow.org", "trainjobs"): ("trainer.kubeflow.org/v1alpha1", "TrainJob"),
}
KIND_RESOURCE = {kind: (group, plural) for (group, plural), (_, kind) in RESOURCES.items()}
VERBS = {("", "pods"): {"get", "list"}, ("", "events"): {"create", "patch", "list"}}  # others: get, list, watch


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


class ApiError(Exception):
    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


def closed_port() -> int:
    """A port nothing listens on: an absent API server (connection refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class FakeKube:
    tokens: set[str] = field(default_factory=lambda: {TOKEN})
    hang: bool = False  # every request waits until stop(): a server that accepts and never answers
    requests: list[Request] = field(default_factory=list)
    denied: set[tuple[str, str, str]] = field(default_factory=set)  # (group, resource, verb) answered 403
    deny_all: bool = False
    uninstalled: set[tuple[str, str]] = field(default_factory=set)  # (group, plural) answered 404, like a missing CRD

    def __post_init__(self):
        self.objects: dict[tuple[str, str, str, str], dict] = {}  # (group, plural, namespace, name) -> object
        self._rv = 0
        self._changed = threading.Condition()
        self._stopping = threading.Event()
        self.watches = 0  # watches that have sent their initial state
        self._ca = trustme.CA()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

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

    def start(self) -> "FakeKube":
        fake = self

        class Handler(_Handler):
            kube = fake

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        # The handshake happens in the request's own thread, so a slow client cannot stall accept().
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True,
                                                  do_handshake_on_connect=False)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fake-kube", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # releases hanging requests and ends watches
        with self._changed:
            self._changed.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = None

    def __enter__(self) -> "FakeKube":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def deny(self, *calls: tuple[str, str, str]) -> None:
        self.denied.update(calls)

    def put(self, obj: dict) -> dict:
        """Store (or replace) an object as the API server would hold it: uid, resourceVersion, creationTimestamp."""
        obj = copy.deepcopy(obj)
        group, plural = KIND_RESOURCE[obj["kind"]]
        meta = obj.setdefault("metadata", {})
        key = (group, plural, meta.setdefault("namespace", "default"), meta["name"])
        with self._changed:
            old = self.objects.get(key)
            meta.setdefault("uid", (old or {}).get("metadata", {}).get("uid") or str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", _now())
            self._rv += 1
            meta["resourceVersion"] = str(self._rv)
            self.objects[key] = obj
            self._changed.notify_all()
        return copy.deepcopy(obj)

    def events(self) -> list[dict]:
        """Every Event held, in the order they were created (a dict keeps insertion order; a patch keeps the place)."""
        with self._changed:
            return [copy.deepcopy(o) for (g, p, _, _), o in self.objects.items() if (g, p) == ("", "events")]

    def calls(self) -> set[tuple[str, str, str]]:
        return {r.call for r in self.requests if r.verb}

    def wait_for_watches(self, count: int, timeout: float = 10.0) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.watches >= count, timeout)

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
                         context: str = "fake") -> Path:
        ca = path.parent / "fake-kube-ca.crt"
        ca.write_bytes(self.ca_pem)
        ctx = {"cluster": "fake", "user": "fake"} | ({"namespace": namespace} if namespace else {})
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": context,
            "clusters": [{"name": "fake", "cluster": {"server": self.url, "certificate-authority": str(ca)}}],
            "users": [{"name": "fake", "user": {"token": token}}],
            "contexts": [{"name": context, "context": ctx}],
        }))
        return path

    # ---- the API -----------------------------------------------------------------------------------------------
    def route(self, request: Request) -> tuple[str, dict | None]:
        """("json", body) for a plain answer or ("watch", None) for a watch; raises ApiError."""
        if request.token not in self.tokens:
            raise ApiError(401, "Unauthorized", "Unauthorized")
        key = (request.group, request.resource)
        if request.resource is None or key not in RESOURCES or key in self.uninstalled:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        allowed = VERBS.get(key, {"get", "list", "watch"})
        if request.verb not in allowed:
            raise ApiError(405, "MethodNotAllowed", f"the fake does not serve {request.verb} {request.resource}")
        if self.deny_all or request.call in self.denied:
            # the API server's wording (k8s.io/apiserver/pkg/endpoints/handlers/responsewriters/errors.go)
            resource = f"{request.resource}.{request.group}" if request.group else request.resource
            named = f' "{request.name}"' if request.name else ""
            raise ApiError(403, "Forbidden", f'{resource}{named} is forbidden: User "system:serviceaccount:'
                                             f'{request.namespace}:ddpm" cannot {request.verb} resource '
                                             f'"{request.resource}" in API group "{request.group}" in the '
                                             f'namespace "{request.namespace}"')
        if request.verb == "get":
            return "json", self._get(request)
        if request.verb == "list":
            items = self._select(request)
            api_version, kind = RESOURCES[key]
            return "json", {"apiVersion": api_version, "kind": f"{kind}List",
                            "metadata": {"resourceVersion": str(self._rv)}, "items": items}
        if request.verb == "watch":
            return "watch", None
        if request.verb == "create":
            return "json", self._create(request)
        return "json", self._patch(request)

    def _get(self, request: Request) -> dict:
        obj = self.objects.get((request.group, request.resource, request.namespace, request.name))
        if obj is None:
            raise ApiError(404, "NotFound", f'{request.resource} "{request.name}" not found')
        return copy.deepcopy(obj)

    def _select(self, request: Request) -> list[dict]:
        labels = _selector(request.query.get("labelSelector"))
        fields = _selector(request.query.get("fieldSelector"))
        with self._changed:
            matching = [o for (g, p, ns, _), o in sorted(self.objects.items())
                        if (g, p, ns) == (request.group, request.resource, request.namespace)
                        and all((o["metadata"].get("labels") or {}).get(k) == v for k, v in labels.items())
                        and all(str(_dotted(o, k)) == v for k, v in fields.items())]
            return copy.deepcopy(matching)

    def _create(self, request: Request) -> dict:
        body = request.body or {}
        meta = body.get("metadata") or {}
        involved = body.get("involvedObject") or {}
        problems = [m for bad, m in (
            (not meta.get("name"), "metadata.name: Required value"),
            (meta.get("namespace", request.namespace) != request.namespace, "metadata.namespace does not match"),
            (involved.get("namespace") != request.namespace, "involvedObject.namespace does not match"),
            (not involved.get("kind") or not involved.get("name"), "involvedObject: kind and name required"),
            (not body.get("reason"), "reason: Required value"),
            (body.get("type") not in ("Normal", "Warning"), "type: must be Normal or Warning"),
        ) if bad]
        if problems:
            raise ApiError(422, "Invalid", "Event is invalid: " + "; ".join(problems))
        if (request.group, request.resource, request.namespace, meta["name"]) in self.objects:
            raise ApiError(409, "AlreadyExists", f'events "{meta["name"]}" already exists')
        body = dict(body, apiVersion="v1", kind="Event")
        body["metadata"] = dict(meta, namespace=request.namespace)
        return self.put(body)

    def _patch(self, request: Request) -> dict:
        if request.content_type not in ("application/strategic-merge-patch+json", "application/merge-patch+json"):
            raise ApiError(415, "UnsupportedMediaType", f"the fake does not apply {request.content_type}")
        current = self._get(request)
        return self.put(_merge_patch(current, request.body or {}))

    def stream_watch(self, request: Request, send) -> None:
        """Send the matching objects' versions as watch events until timeoutSeconds or stop()."""
        deadline = time.monotonic() + float(request.query.get("timeoutSeconds") or 1800)
        since = int(request.query.get("resourceVersion") or 0)
        sent: dict[str, int] = {}  # name -> resourceVersion sent
        first = True
        while not self._stopping.is_set():
            for obj in self._select(request):
                rv, name = int(obj["metadata"]["resourceVersion"]), obj["metadata"]["name"]
                if rv > max(since, sent.get(name, 0)):
                    kind = "ADDED" if first and since == 0 else "MODIFIED"
                    send(json.dumps({"type": kind, "object": obj}).encode() + b"\n")
                    sent[name] = rv
            with self._changed:
                if first:
                    self.watches += 1
                    self._changed.notify_all()
                    first = False
                seen = self._rv
                self._changed.wait_for(lambda: self._rv != seen or self._stopping.is_set(),
                                       max(0.0, deadline - time.monotonic()))
            if time.monotonic() >= deadline:
                return


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _selector(text: str | None) -> dict[str, str]:
    pairs = [part.replace("==", "=").split("=", 1) for part in (text or "").split(",") if part]
    return {k.strip(): v.strip() for k, v in pairs}


def _dotted(obj: dict, path: str):
    for part in path.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


def _merge_patch(target: dict, patch: dict) -> dict:
    """RFC 7386 merge patch (the same as a strategic merge patch for maps and scalars, all an Event update uses)."""
    result = copy.deepcopy(target)
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = _merge_patch(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


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
    kube: FakeKube

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
            self.kube._stopping.wait()  # until the test stops the server
            self.close_connection = True
            return
        try:
            kind, payload = self.kube.route(request)
        except ApiError as e:
            request.status = e.status
            return self._json(e.status, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                         "message": e.message, "reason": e.reason, "code": e.status})
        request.status = 201 if request.verb == "create" else 200
        if kind == "watch":
            return self._watch(request)
        self._json(request.status, payload)

    def _json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _watch(self, request: Request) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def send(data: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        try:
            self.kube.stream_watch(request, send)
            self.wfile.write(b"0\r\n\r\n")
        except (ConnectionError, ssl.SSLError, OSError):
            self.close_connection = True

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _serve

    def log_message(self, format, *args) -> None:  # the request log is `FakeKube.requests`, not stderr
        pass


# ---- objects as the controllers would create them ----------------------------------------------------------------
def owner(obj: dict) -> dict:
    """A controller ownerReference to `obj`, as the Job/JobSet/Trainer/Training-Operator controllers set them."""
    return {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "name": obj["metadata"]["name"],
            "uid": obj["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}


def workload(kind: str, name: str, namespace: str = "default", *, labels: dict | None = None,
             conditions: list[dict] | None = None, status: dict | None = None, owned_by: dict | None = None) -> dict:
    group, plural = KIND_RESOURCE[kind]
    api_version = RESOURCES[(group, plural)][0]
    meta = {"name": name, "namespace": namespace, "labels": labels or {}}
    if owned_by is not None:
        meta["ownerReferences"] = [owner(owned_by)]
    return {"apiVersion": api_version, "kind": kind, "metadata": meta, "spec": {},
            "status": dict(status or {}, conditions=conditions or [])}


def condition(type_: str, reason: str = "", message: str = "", status: str = "True") -> dict:
    return {"type": type_, "status": status, "reason": reason or type_, "message": message,
            "lastTransitionTime": _now()}


def pod(name: str, namespace: str = "default", *, labels: dict | None = None, owned_by: dict | None = None,
        phase: str = "Running", restarts: int = 0, node: str = "node-a", container: str = "trainer") -> dict:
    meta = {"name": name, "namespace": namespace, "labels": labels or {}}
    if owned_by is not None:
        meta["ownerReferences"] = [owner(owned_by)]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
            "spec": {"nodeName": node, "containers": [{"name": container, "image": "ddpm-trainer:test"}]},
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


def put_training_run(fake: FakeKube, kind: str, *, release: str = "ddpm", namespace: str = "default",
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
        top["spec"] = {"pytorchReplicaSpecs": {role: {"replicas": n} for role, n in replicas.items() if n}}
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


def pod_env(fake: FakeKube, service_account: Path, run: TrainingRun, rank: int = 0,
            workload_env: bool = True) -> dict[str, str]:
    """The environment of rank `rank`'s trainer container: in-cluster API access, the downward API's POD_NAME,
    POD_NAMESPACE and POD_UID, and the chart's TRAINING_WORKLOAD."""
    meta = run.pods[rank]["metadata"]
    env = fake.in_cluster_env(service_account) | {"POD_NAME": meta["name"], "POD_NAMESPACE": meta["namespace"],
                                                  "POD_UID": meta["uid"]}
    return env | ({"TRAINING_WORKLOAD": run.ref} if workload_env else {})


def undeclared_calls(fake: FakeKube) -> set[tuple[str, str, str]]:
    """Calls the server saw that trainer.rbac.API_CALLS does not declare."""
    from trainer.rbac import API_CALLS

    return {(g, r, v) for g, r, v in fake.calls() if v not in API_CALLS.get((g, r), ())}


@pytest.fixture
def kube_server():
    """A started FakeKube; afterwards, every call the code made must be one trainer.rbac.API_CALLS declares."""
    fake = FakeKube().start()
    try:
        yield fake
    finally:
        fake.stop()
    assert not undeclared_calls(fake), f"calls not in trainer.rbac.API_CALLS: {undeclared_calls(fake)}"
