"""Cluster access through the official `kubernetes` client: configuration, calls, owner resolution. Every call as RBAC
sees it (the chart's Roles are made from that table) is trainer.rbac; a workload's state from its status is
trainer.workload_state.

Used by trainer.events (rank 0 posts Events), trainer.wait (the push Job's init container) and trainer.status
(`ddpm status` on a laptop). Every call has short timeouts and no retries, and fails with a typed `KubeError`, so a
caller can decide to give up without ever blocking training.

What this relies on (Kubernetes docs and sources):
- In-cluster access: https://kubernetes.io/docs/tasks/run-application/access-api-from-pod/ -- KUBERNETES_SERVICE_HOST
  and _PORT plus the service-account token, ca.crt and namespace files; the client's
  `kubernetes/config/incluster_config.py` (InClusterConfigLoader takes the token/CA paths and the environ) and
  `kube_config.py` (KUBECONFIG holds one or more paths separated by ':'; the client reads it at import time, so it is
  read here from the caller's environ instead).
- Owners: https://kubernetes.io/docs/concepts/overview/working-with-objects/owners-dependents/ -- an object's
  `metadata.ownerReferences` entry with `controller: true` is the object that manages it, and carries its
  apiVersion, kind, name and uid (namespace = the dependent's). The Job controller owns its pods; the JobSet
  controller (jobset.x-k8s.io) owns its Jobs; the Kubeflow Trainer v2 controller owns the JobSet of a TrainJob; the
  Training Operator v1 owns a PyTorchJob's pods directly.
- Request verbs: https://kubernetes.io/docs/reference/access-authn-authz/authorization/#determine-the-request-verb --
  GET on one object is `get`, on a collection `list`, with ?watch=true `watch`; POST `create`; PATCH `patch`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# Short enough that a hung API server costs the events thread seconds, not minutes: (connect, read) in seconds.
REQUEST_TIMEOUT = (3.0, 5.0)
DEFAULT_SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
SERVICE_ACCOUNT_DIR_ENV = "K8S_SERVICE_ACCOUNT_DIR"  # not DDPM_*: the trainer rejects unknown DDPM_* variables
WORKLOAD_ENV = "TRAINING_WORKLOAD"  # "<Kind>/<name>", a literal the chart sets on the training and push pods


class KubeError(Exception):
    """Any failure to reach or use the API. The subclasses say whether trying again could help."""


class NotConfigured(KubeError):
    """No in-cluster service account and no kubeconfig (or an unusable one)."""


class Refused(KubeError):
    """401/403: the credentials are wrong or lack the RBAC rule."""


class Unreachable(KubeError):
    """Connection refused, TLS failure or timeout."""


class NotFound(KubeError):
    """404: the object (or its resource type: a CRD that is not installed) does not exist."""


class NotOwner(KubeError):
    """TRAINING_WORKLOAD does not own this pod (a chart or environment mistake)."""


class ApiFailure(KubeError):
    """Any other HTTP error status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Kind:
    kind: str
    group: str  # "" for the core group
    version: str
    plural: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


POD = Kind("Pod", "", "v1", "pods")
EVENT = Kind("Event", "", "v1", "events")
JOB = Kind("Job", "batch", "v1", "jobs")
PYTORCHJOB = Kind("PyTorchJob", "kubeflow.org", "v1", "pytorchjobs")
JOBSET = Kind("JobSet", "jobset.x-k8s.io", "v1alpha2", "jobsets")
TRAINJOB = Kind("TrainJob", "trainer.kubeflow.org", "v1alpha1", "trainjobs")
WORKLOAD_KINDS = {k.kind: k for k in (JOB, PYTORCHJOB, JOBSET, TRAINJOB)}
# The owners between a training pod and each workload kind, which owner resolution reads (GET) to go up a level.
OWNERS_BELOW = {"Job": (), "PyTorchJob": (), "JobSet": (JOB,), "TrainJob": (JOB, JOBSET)}
# What `ddpm status` lists to find a release's workload: the kinds the chart creates.
CHART_WORKLOAD_KINDS = (JOB, PYTORCHJOB, TRAINJOB, JOBSET)

# ---- which pod and workload ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkloadRef:
    """A workload named by kind and name, as in TRAINING_WORKLOAD=Job/ddpm-train."""

    kind: str
    name: str

    @classmethod
    def parse(cls, text: str) -> "WorkloadRef":
        kind, sep, name = text.strip().partition("/")
        if not sep or not name or "/" in name:
            raise ValueError(f"workload {text!r} is not <Kind>/<name>")
        if kind not in WORKLOAD_KINDS:
            raise ValueError(f"workload kind {kind!r} is not one of {', '.join(WORKLOAD_KINDS)}")
        return cls(kind, name)

    def __str__(self) -> str:
        return f"{self.kind}/{self.name}"


@dataclass(frozen=True)
class PodRef:
    """This pod, from the downward API (metadata.name, .namespace, .uid) and the chart's TRAINING_WORKLOAD."""

    name: str
    namespace: str
    uid: str | None
    workload: WorkloadRef | None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "PodRef | None":
        env = os.environ if environ is None else environ
        name, namespace = env.get("POD_NAME"), env.get("POD_NAMESPACE")
        if not name or not namespace:
            return None
        workload = env.get(WORKLOAD_ENV)
        return cls(name, namespace, env.get("POD_UID") or None, WorkloadRef.parse(workload) if workload else None)


@dataclass(frozen=True)
class ObjectRef:
    """Enough to be an Event's involvedObject (kubectl describe matches on kind, name, namespace and uid)."""

    api_version: str
    kind: str
    name: str
    namespace: str
    uid: str | None

    def as_involved_object(self) -> dict:
        ref = {"apiVersion": self.api_version, "kind": self.kind, "name": self.name, "namespace": self.namespace}
        return ref | ({"uid": self.uid} if self.uid else {})


# ---- connection ----------------------------------------------------------------------------------------------------
@dataclass
class Cluster:
    """An API client bound to one configuration (never the client's global default)."""

    api_client: object  # kubernetes.client.ApiClient
    namespace: str  # the service account's namespace, or the kubeconfig context's ("default" if it names none)
    source: str  # "in-cluster" or "kubeconfig <path>", for messages
    request_timeout: tuple[float, float] = REQUEST_TIMEOUT  # (connect, read) seconds for every call

    @property
    def core(self):
        from kubernetes import client

        return client.CoreV1Api(self.api_client)

    @property
    def batch(self):
        from kubernetes import client

        return client.BatchV1Api(self.api_client)

    @property
    def custom(self):
        from kubernetes import client

        return client.CustomObjectsApi(self.api_client)

    def close(self) -> None:
        self.api_client.close()


def service_account_dir(environ: Mapping[str, str]) -> Path:
    return Path(environ.get(SERVICE_ACCOUNT_DIR_ENV) or DEFAULT_SERVICE_ACCOUNT_DIR)


def _configuration(environ: Mapping[str, str]):
    from kubernetes import client

    cfg = client.Configuration()
    cfg.retries = False  # urllib3 would retry a timed-out GET 3 times; one bounded try is the contract
    # The client takes its proxy from os.environ and then drops NO_PROXY; use the caller's environ for both.
    cfg.proxy = next((environ[k] for k in ("HTTPS_PROXY", "https_proxy") if environ.get(k)), None)
    cfg.no_proxy = environ.get("NO_PROXY") or environ.get("no_proxy")
    return cfg


def _in_cluster(environ: Mapping[str, str]) -> Cluster:
    from kubernetes import client
    from kubernetes.config.config_exception import ConfigException
    from kubernetes.config.incluster_config import InClusterConfigLoader

    sa = service_account_dir(environ)
    cfg = _configuration(environ)
    cfg.proxy = None  # the API's Service address is never reached through an egress proxy
    try:
        InClusterConfigLoader(token_filename=str(sa / "token"), cert_filename=str(sa / "ca.crt"),
                              environ=environ).load_and_set(cfg)
    except ConfigException as e:
        raise NotConfigured(f"in-cluster config from {sa}: {e}") from e
    except (OSError, UnicodeError) as e:  # unreadable, or not text: a key or binary file mounted as the token
        raise NotConfigured(f"in-cluster config from {sa}: the token file cannot be read as text "
                            f"({type(e).__name__})") from e
    _check_token(cfg, f"in-cluster config from {sa}: the token file")
    namespace_file = sa / "namespace"
    namespace = namespace_file.read_text().strip() if namespace_file.is_file() else environ.get("POD_NAMESPACE")
    return Cluster(client.ApiClient(cfg), namespace or "default", "in-cluster")


def kubeconfig_path(environ: Mapping[str, str]) -> str:
    home = environ.get("HOME") or str(Path.home())
    return environ.get("KUBECONFIG") or os.path.join(home, ".kube", "config")


def _from_kubeconfig(environ: Mapping[str, str], context: str | None) -> Cluster:
    from kubernetes import client
    from kubernetes.config.config_exception import ConfigException
    from kubernetes.config.kube_config import list_kube_config_contexts, load_kube_config

    path = kubeconfig_path(environ)
    if not any(Path(p).expanduser().is_file() for p in path.split(os.pathsep) if p):
        raise NotConfigured(f"no kubeconfig at {path} (set KUBECONFIG)")
    cfg = _configuration(environ)
    try:
        load_kube_config(config_file=path, context=context, client_configuration=cfg, persist_config=False)
        contexts, active = list_kube_config_contexts(path)
    except (ConfigException, OSError, ValueError, KeyError) as e:
        raise NotConfigured(f"kubeconfig {path}: {e}") from e
    _check_token(cfg, f"kubeconfig {path}: the user's token")
    chosen = next((c for c in contexts if c.get("name") == context), None) if context else active
    namespace = ((chosen or {}).get("context") or {}).get("namespace") or "default"
    return Cluster(client.ApiClient(cfg), namespace, f"kubeconfig {path}")


# A bearer token as the client sends it: "bearer <token>" (RFC 6750's b64token, JWT service-account tokens: printable
# ASCII, no spaces). Anything else fails inside the HTTP client (ValueError: invalid header) or is refused.
_BEARER = re.compile(r"[Bb]earer [\x21-\x7e]+")


def _check_token(cfg, what: str) -> None:
    """NotConfigured when the configured token cannot be a bearer token (binary, several lines, spaces); the
    message never holds the token."""
    value = (cfg.api_key or {}).get("authorization")
    if value is not None and not _BEARER.fullmatch(value):
        raise NotConfigured(f"{what} is not a token: it must be one line of printable ASCII without spaces or a "
                            "trailing newline (a binary or multi-line file, or the wrong Secret key?)")


def connect(environ: Mapping[str, str] | None = None, *, in_cluster_only: bool, context: str | None = None,
            request_timeout: tuple[float, float] = REQUEST_TIMEOUT) -> Cluster:
    """In a pod (KUBERNETES_SERVICE_HOST set): the service account. Otherwise, unless `in_cluster_only`, the
    kubeconfig (KUBECONFIG or ~/.kube/config; `context` as kubectl's --context). Raises NotConfigured."""
    env = os.environ if environ is None else environ
    if env.get("KUBERNETES_SERVICE_HOST"):
        cluster = _in_cluster(env)
    elif in_cluster_only:
        raise NotConfigured("not in a pod: KUBERNETES_SERVICE_HOST is not set")
    else:
        cluster = _from_kubeconfig(env, context)
    cluster.request_timeout = request_timeout
    return cluster


# ---- calls, each translated into KubeError -------------------------------------------------------------------------
@contextmanager
def _translated_errors():
    import urllib3
    from kubernetes.client.exceptions import ApiException

    try:
        yield
    except ApiException as e:
        raise _api_error(e) from e
    except (urllib3.exceptions.HTTPError, OSError) as e:  # refused, reset, TLS, timeouts (retries are off)
        raise Unreachable(f"{type(e).__name__}: {e}") from e
    except UnicodeError as e:  # the in-cluster loader re-reads the token file every minute: now not text
        raise NotConfigured(f"the token file cannot be read as text ({type(e).__name__})") from e


def _call(cluster: Cluster, fn, *args, **kwargs) -> dict:
    """One typed-API call, its answer as the API's JSON. The client's model classes are skipped on purpose: they
    reject objects whose fields they think required (a newer server, an operator's partial status) with ValueError.
    So is its DynamicClient: its discovery (GET /api, /apis, each group; kubernetes/dynamic/discovery.py) sends no
    request timeout and caches into the temp dir, where every call here must be bounded and write nothing."""
    kwargs.setdefault("_request_timeout", cluster.request_timeout)
    with _translated_errors():
        response = fn(*args, _preload_content=False, **kwargs)
        try:
            return json.loads(response.data or b"{}")
        except ValueError as e:
            raise ApiFailure(response.status, f"not JSON from the API: {e}") from e


def _api_error(e) -> KubeError:
    if not e.status:  # the client turns urllib3's SSLError into ApiException(status=0, reason="SSLError\n...")
        return Unreachable(" ".join(str(e.reason or "no answer").split()))
    message = e.reason or ""
    try:
        message = json.loads(e.body).get("message") or message
    except (TypeError, ValueError, AttributeError):
        pass
    text = f"{e.status} {message}".strip()
    if e.status in (401, 403):
        return Refused(text)
    if e.status == 404:
        return NotFound(text)
    return ApiFailure(e.status or 0, text)


def get_object(cluster: Cluster, kind: Kind, namespace: str, name: str) -> dict:
    """One object as the API's JSON (camelCase keys), whatever its kind."""
    if kind == POD:
        return _call(cluster, cluster.core.read_namespaced_pod, name, namespace)
    if kind == JOB:
        return _call(cluster, cluster.batch.read_namespaced_job, name, namespace)
    return _call(cluster, cluster.custom.get_namespaced_custom_object, kind.group, kind.version, namespace,
                 kind.plural, name)


def list_objects(cluster: Cluster, kind: Kind, namespace: str, *, label_selector: str | None = None,
                 field_selector: str | None = None) -> list[dict]:
    selectors = {k: v for k, v in (("label_selector", label_selector), ("field_selector", field_selector)) if v}
    if kind == POD:
        result = _call(cluster, cluster.core.list_namespaced_pod, namespace, **selectors)
    elif kind == EVENT:
        result = _call(cluster, cluster.core.list_namespaced_event, namespace, **selectors)
    elif kind == JOB:
        result = _call(cluster, cluster.batch.list_namespaced_job, namespace, **selectors)
    else:
        result = _call(cluster, cluster.custom.list_namespaced_custom_object, kind.group, kind.version, namespace,
                       kind.plural, **selectors)
    return result.get("items") or []


def watch_object(cluster: Cluster, kind: Kind, namespace: str, name: str, *, resource_version: str | None,
                 timeout_seconds: int) -> Iterator[dict]:
    """The object's new versions (a watch on its collection filtered by name) until the server ends the watch after
    `timeout_seconds`. Raises KubeError (410 Gone as ApiFailure: get the object again and watch from there)."""
    from kubernetes import watch

    if kind == JOB:
        fn, args = cluster.batch.list_namespaced_job, (namespace,)
    else:
        fn, args = cluster.custom.list_namespaced_custom_object, (kind.group, kind.version, namespace, kind.plural)
    kwargs = {"field_selector": f"metadata.name={name}", "timeout_seconds": timeout_seconds, "deserialize": False,
              # the read timeout must outlast the server's own end of the watch
              "_request_timeout": (cluster.request_timeout[0], timeout_seconds + cluster.request_timeout[1])}
    if resource_version:
        kwargs["resource_version"] = resource_version
    stream = watch.Watch().stream(fn, *args, **kwargs)
    while True:
        with _translated_errors():  # the stream sends its request on the first next()
            event = next(stream, None)
        if event is None:
            return
        if event.get("type") in ("ADDED", "MODIFIED"):
            yield event["object"]
        elif event.get("type") == "DELETED":
            raise NotFound(f"{kind.kind} {name} was deleted")


def create_event(cluster: Cluster, namespace: str, body: dict) -> dict:
    return _call(cluster, cluster.core.create_namespaced_event, namespace, body)


def patch_event(cluster: Cluster, namespace: str, name: str, patch: dict) -> dict:
    """A strategic merge patch (the client's choice for a dict body)."""
    return _call(cluster, cluster.core.patch_namespaced_event, name, namespace, patch)


# ---- owners --------------------------------------------------------------------------------------------------------
def controller_of(obj: dict) -> dict | None:
    return next((r for r in obj.get("metadata", {}).get("ownerReferences") or [] if r.get("controller")), None)


def resolve_workload(cluster: Cluster, pod: PodRef) -> tuple[ObjectRef, ObjectRef | None]:
    """(this pod, the workload that owns it) from the pod's controller ownerReferences, going up through the kinds
    above (Pod -> Job -> JobSet -> TrainJob, Pod -> PyTorchJob). With TRAINING_WORKLOAD set, that is the workload
    and only the owners below it are read; a chain that does not reach it raises NotOwner. Without it, the top
    known owner is the workload (None for a bare pod)."""
    obj = get_object(cluster, POD, pod.namespace, pod.name)
    meta = obj["metadata"]
    pod_ref = ObjectRef(POD.api_version, POD.kind, pod.name, pod.namespace, meta.get("uid") or pod.uid)
    found, ref, chain = None, controller_of(obj), []
    while ref is not None and ref["kind"] in WORKLOAD_KINDS:
        found = ObjectRef(ref["apiVersion"], ref["kind"], ref["name"], pod.namespace, ref.get("uid"))
        chain.append(f"{found.kind}/{found.name}")
        if pod.workload and (found.kind, found.name) == (pod.workload.kind, pod.workload.name):
            return pod_ref, found
        if ref["kind"] in ("PyTorchJob", "TrainJob"):
            break  # top-level kinds: nothing this code knows owns them
        ref = controller_of(get_object(cluster, WORKLOAD_KINDS[ref["kind"]], pod.namespace, ref["name"]))
    if pod.workload:
        raise NotOwner(f"{WORKLOAD_ENV}={pod.workload} does not own pod {pod.name} "
                        f"(its owners: {' -> '.join(chain) or 'none'})")
    return pod_ref, found
