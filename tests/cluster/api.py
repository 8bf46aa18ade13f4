"""A small JSON client for the API server, for the process kubelet and the provisioner (test infrastructure).

The `kubernetes` package's typed models are skipped on purpose: a kubelet reads and writes raw objects (status
patches, subresources) and an informer needs only list + watch.
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlencode

import urllib3

STRATEGIC = "application/strategic-merge-patch+json"
MERGE = "application/merge-patch+json"


class ApiError(Exception):
    def __init__(self, status: int, body: dict | str, what: str):
        self.status, self.body = status, body
        message = body.get("message") if isinstance(body, dict) else str(body)
        super().__init__(f"{what}: HTTP {status}: {message}")


class Api:
    def __init__(self, server: str, ca: Path, cert: Path, key: Path):
        self.server = server.rstrip("/")
        context = ssl.create_default_context(cafile=str(ca))
        context.load_cert_chain(str(cert), str(key))
        self.http = urllib3.PoolManager(ssl_context=context, maxsize=16, retries=False)

    def request(self, method: str, path: str, body=None, *, params: dict | None = None,
                content_type: str = "application/json", timeout: float = 15.0) -> dict:
        url = self.server + path + ("?" + urlencode(params) if params else "")
        data = json.dumps(body).encode() if body is not None else None
        response = self.http.request(method, url, body=data, headers={"Content-Type": content_type,
                                                                       "Accept": "application/json"},
                                     timeout=urllib3.Timeout(connect=5.0, read=timeout))
        try:
            payload = json.loads(response.data or b"{}")
        except ValueError:
            payload = response.data.decode(errors="replace")
        if response.status >= 400:
            raise ApiError(response.status, payload, f"{method} {path}")
        return payload

    def get(self, path: str, **params) -> dict:
        return self.request("GET", path, params=params or None)

    def create(self, path: str, body: dict) -> dict:
        return self.request("POST", path, body)

    def patch(self, path: str, body: dict, content_type: str = STRATEGIC) -> dict:
        return self.request("PATCH", path, body, content_type=content_type)

    def delete(self, path: str, body: dict | None = None) -> dict:
        return self.request("DELETE", path, body)

    def exists(self, path: str) -> bool:
        try:
            self.get(path)
            return True
        except ApiError as e:
            if e.status == 404:
                return False
            raise

    def watch(self, path: str, resource_version: str, timeout_s: int = 60) -> Iterator[dict]:
        """The watch events after `resource_version`, until the server ends the watch (timeoutSeconds)."""
        url = self.server + path + "?" + urlencode({"watch": "1", "resourceVersion": resource_version,
                                                   "timeoutSeconds": str(timeout_s), "allowWatchBookmarks": "true"})
        response = self.http.request("GET", url, preload_content=False,
                                     timeout=urllib3.Timeout(connect=5.0, read=timeout_s + 30))
        try:
            if response.status >= 400:
                raise ApiError(response.status, response.data.decode(errors="replace"), f"WATCH {path}")
            buffer = b""
            for chunk in response.stream(65536, decode_content=True):
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        yield json.loads(line)
        finally:
            response.release_conn()


def path_of(kind_path: str, namespace: str | None = None, name: str | None = None, sub: str | None = None) -> str:
    """e.g. path_of("api/v1/pods", "default", "p", "status") -> /api/v1/namespaces/default/pods/p/status."""
    prefix, _, plural = kind_path.rpartition("/")
    path = f"/{prefix}" + (f"/namespaces/{quote(namespace)}" if namespace else "") + f"/{plural}"
    if name:
        path += f"/{quote(name)}"
    if sub:
        path += f"/{sub}"
    return path


class Informer:
    """List, then watch from the list's resourceVersion; on a dropped watch or 410 Gone, list again. Calls
    `handle(type, object)` with ADDED/MODIFIED/DELETED for every change, and `synced()` after each full list."""

    def __init__(self, api: Api, kind_path: str, handle, stopped, synced=None):
        self.api, self.kind_path, self.handle, self.stopped, self.synced = api, kind_path, handle, stopped, synced
        self.known: dict[str, dict] = {}  # uid -> object

    def _handle(self, kind: str, obj: dict) -> None:
        try:
            self.handle(kind, obj)
        except Exception:  # one bad object must not stop the informer; the handler's owner logs it
            import traceback

            traceback.print_exc()

    def run(self) -> None:
        while not self.stopped():
            try:
                listing = self.api.get("/" + self.kind_path)
                seen = {}
                for item in listing.get("items", []):
                    seen[item["metadata"]["uid"]] = item
                for uid, old in list(self.known.items()):
                    if uid not in seen:
                        self._handle("DELETED", old)
                for uid, item in seen.items():
                    self._handle("MODIFIED" if uid in self.known else "ADDED", item)
                self.known = seen
                if self.synced:
                    self.synced()
                version = listing["metadata"]["resourceVersion"]
                while not self.stopped():
                    for event in self.api.watch("/" + self.kind_path, version, timeout_s=30):
                        kind, obj = event["type"], event["object"]
                        if kind == "ERROR":
                            raise ApiError(obj.get("code", 500), obj, f"WATCH {self.kind_path}")
                        version = obj["metadata"]["resourceVersion"]
                        if kind == "BOOKMARK":
                            continue
                        uid = obj["metadata"]["uid"]
                        if kind == "DELETED":
                            self.known.pop(uid, None)
                        else:
                            self.known[uid] = obj
                        self._handle(kind, obj)
                        if self.stopped():
                            return
            except (ApiError, urllib3.exceptions.HTTPError, OSError, ValueError):
                if self.stopped():
                    return
                time.sleep(0.5)  # the API server restarting or a watch expired: list again shortly
