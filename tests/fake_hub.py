"""A local stand-in for the Hugging Face Hub: a real HTTP server on 127.0.0.1 answering the calls that
huggingface_hub==2.4.0's `create_repo` and `upload_folder` make (read from its source: hf_api.py, _commit_api.py,
lfs.py), so `ddpm push` can be tested for real, offline, through HF_ENDPOINT.

  GET  /api/agent-harnesses                           telemetry (user-agent agent detection): an empty registry
  GET  /api/whoami-v2                                 the token's user
  POST /api/repos/create                              {name, organization, visibility?} -> {url}; 409 if it exists
  POST /api/validate-yaml                             the model card's metadata block (README.md)
  GET  /api/models/<repo>[/revision/<rev>]            repo_info (create_repo on 401/403; create_commit with no change)
  POST /api/models/<repo>/preupload/<rev>             per file: "regular" or "lfs", and the oid the repo already has
  POST /<repo>.git/info/lfs/objects/batch             LFS batch: an upload + verify action per object not stored yet
  PUT  /lfs-storage/<oid>                             the LFS object itself (stands for the presigned storage URL)
  POST /<repo>.git/info/lfs/objects/verify            the object arrived with that oid and size
  POST /api/models/<repo>/commit/<rev>                NDJSON: header, file (base64), lfsFile (oid), deletedFile

The client must not take the Xet path (hf_xet is installed and huggingface_hub prefers it, for upload_folder as a
whole and for LFS content): run it with HF_HUB_DISABLE_XET=1 so it uses preupload + LFS batch + commit.

A test can make the next N requests fail (`fail_next`) and refuse tokens (`refuse_token`). Files land in
`repos[repo_id].files` as bytes, to be compared byte for byte; every request is logged in `requests`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import yaml

# The Hub's default .gitattributes for a new model repo: these always go through LFS.
LFS_SUFFIXES = (".7z", ".arrow", ".bin", ".bz2", ".ckpt", ".ftz", ".gz", ".h5", ".joblib", ".lfs", ".mlmodel",
                ".model", ".msgpack", ".npy", ".npz", ".onnx", ".ot", ".parquet", ".pb", ".pickle", ".pkl", ".pt",
                ".pth", ".rar", ".safetensors", ".tar", ".tflite", ".tgz", ".wasm", ".xz", ".zip", ".zst")
LFS_MIN_SIZE = 10 * 1024 * 1024  # larger files are LFS whatever their name
USER = "fake-user"
TELEMETRY = "/api/agent-harnesses"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    repo_id: str
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)  # path -> content, LFS files resolved to their content
    lfs: dict[str, str] = field(default_factory=dict)  # path -> sha256 of an LFS file
    commits: list[dict] = field(default_factory=list)  # {oid, summary, paths}

    @property
    def head(self) -> str:
        return self.commits[-1]["oid"] if self.commits else "0" * 40

    def oid(self, path: str) -> str | None:
        """What preupload reports for a path already in the repo: sha256 for LFS files, git blob sha1 otherwise."""
        if path not in self.files:
            return None
        return self.lfs.get(path) or git_blob_sha1(self.files[path])


@dataclass
class Request:
    method: str
    path: str
    status: int
    authorization: str | None


class HubError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class FakeHub:
    def __init__(self, tokens=("hf_fake_write_token",), host: str = "127.0.0.1", advertise: str | None = None):
        self.tokens = set(tokens)  # accepted write tokens
        # 0.0.0.0 in the test cluster's network namespace, advertised as the node's address its pods reach
        self.host, self.advertise = host, advertise
        self.repos: dict[str, Repo] = {}
        self.lfs_storage: dict[str, bytes] = {}  # sha256 -> content, shared by all repos as on the Hub
        self.requests: list[Request] = []
        self.create_payloads: list[dict] = []  # the JSON bodies of repo-create calls (name, organization, visibility)
        self._failures: list[tuple[int, str | None]] = []  # (status, path substring or None) per request to fail
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- control, for tests --------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{self.advertise or host}:{port}"

    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer((self.host, 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fake-hub",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = None

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def fail_next(self, count: int, status: int = 503, path_contains: str | None = None) -> None:
        """Answer the next `count` Hub API requests (whose path contains `path_contains`, if given) with `status`."""
        with self._lock:
            self._failures += [(status, path_contains)] * count

    def refuse_token(self, token: str) -> None:
        self.tokens.discard(token)

    def api_requests(self) -> list[Request]:
        """Every request except the client's telemetry."""
        return [r for r in self.requests if r.path != TELEMETRY]

    # ---- the API -------------------------------------------------------------------------------------------------
    def handle(self, method: str, path: str, headers, body: bytes) -> tuple[int, dict, bytes]:
        if path == TELEMETRY and method == "GET":
            return _json(200, {"standardEnvVars": [], "harnesses": {}})
        with self._lock:
            failure = next((f for f in self._failures if f[1] is None or f[1] in path), None)
            if failure is not None:
                self._failures.remove(failure)
        if failure is not None:
            return _json(failure[0], {"error": f"injected failure {failure[0]}"})
        try:
            return self._route(method, path, headers, body)
        except HubError as e:
            return _json(e.status, {"error": e.message}, {"X-Error-Message": e.message, **e.headers})

    def _user(self, headers, required: bool = True) -> str | None:
        auth = headers.get("Authorization") or ""
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        if token is None and not required:
            return None
        if token not in self.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return USER

    def _repo(self, repo_id: str, headers, write: bool = False) -> Repo:
        repo = self.repos.get(repo_id)
        user = self._user(headers, required=write or (repo is not None and repo.private))
        if repo is None or (repo.private and user is None):
            raise HubError(404, "Repository not found", {"X-Error-Code": "RepoNotFound"})
        if write and not repo_id.startswith(f"{user}/"):
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _route(self, method: str, path: str, headers, body: bytes) -> tuple[int, dict, bytes]:
        if method == "GET" and path == "/api/whoami-v2":
            return _json(200, {"type": "user", "name": self._user(headers),
                               "auth": {"type": "access_token", "accessToken": {"role": "write"}}})
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo(headers, json.loads(body))
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body))
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
            if method == "GET":
                repo = self._repo(m[1], headers)
                return _json(200, {"id": repo.repo_id, "sha": repo.head, "private": repo.private,
                                   "siblings": [{"rfilename": p} for p in sorted(repo.files)]})
        if (m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/([^/]+)", path)) and method == "POST":
            return self._preupload(self._repo(m[1], headers, write=True), json.loads(body))
        if (m := re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)) and method == "POST":
            return self._lfs_batch(self._repo(m[1], headers, write=True), json.loads(body))
        if (m := re.fullmatch(r"/lfs-storage/([0-9a-f]{64})", path)) and method == "PUT":
            return self._lfs_store(m[1], body)
        if (m := re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/verify", path)) and method == "POST":
            self._repo(m[1], headers, write=True)
            obj = json.loads(body)
            if obj["oid"] not in self.lfs_storage or len(self.lfs_storage[obj["oid"]]) != obj["size"]:
                raise HubError(404, f"LFS object {obj['oid']} was not uploaded")
            return _json(200, {})
        if (m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/([^/]+)", path)) and method == "POST":
            if headers.get("Content-Type") != "application/x-ndjson":
                raise HubError(400, "commit payload must be application/x-ndjson")
            return self._commit(self._repo(m[1], headers, write=True), body)
        raise HubError(404, f"fake hub: no route for {method} {path}")

    def _create_repo(self, headers, payload: dict) -> tuple[int, dict, bytes]:
        user = self._user(headers)
        self.create_payloads.append(payload)
        namespace = payload.get("organization") or user
        repo_id = f"{namespace}/{payload['name']}"
        if payload.get("type") not in (None, "model"):
            raise HubError(400, "the fake hub only holds model repos")
        if namespace != user:
            raise HubError(403, f"You don't have the rights to create a repo under {namespace}")
        url = f"{self.url}/{repo_id}"
        if repo_id in self.repos:
            return _json(409, {"error": "You already created this model repo", "url": url})
        if payload.get("visibility") not in (None, "public", "private"):
            raise HubError(400, f"invalid visibility {payload.get('visibility')!r}")
        self.repos[repo_id] = Repo(repo_id, private=payload.get("visibility") == "private")
        return _json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self, payload: dict) -> tuple[int, dict, bytes]:
        content = payload["content"]
        if content.startswith("---"):
            try:
                metadata = yaml.safe_load(content.split("---", 2)[1])
            except (yaml.YAMLError, IndexError) as e:
                return _json(400, {"errors": [{"message": f"invalid YAML: {e}"}], "warnings": []})
            if not isinstance(metadata, dict):
                return _json(400, {"errors": [{"message": "metadata must be a mapping"}], "warnings": []})
        return _json(200, {"errors": [], "warnings": []})

    def _preupload(self, repo: Repo, payload: dict) -> tuple[int, dict, bytes]:
        files = []
        for item in payload["files"]:
            sample = base64.b64decode(item["sample"])
            lfs = item["size"] >= LFS_MIN_SIZE or item["path"].endswith(LFS_SUFFIXES) or "tfevents" in item["path"] \
                or b"\0" in sample  # binary content is refused as a regular git file
            files.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": repo.oid(item["path"])})
        return _json(200, {"files": files, "commitOid": repo.head})

    def _lfs_batch(self, repo: Repo, payload: dict) -> tuple[int, dict, bytes]:
        if payload.get("operation") != "upload" or payload.get("hash_algo", "sha256") != "sha256":
            raise HubError(400, "only sha256 uploads are supported")
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.lfs_storage:  # already stored objects get no actions: nothing to send
                entry["actions"] = {
                    "upload": {"href": f"{self.url}/lfs-storage/{obj['oid']}", "header": {}},
                    "verify": {"href": f"{self.url}/{repo.repo_id}.git/info/lfs/objects/verify", "header": {}},
                }
            objects.append(entry)
        return _json(200, {"transfer": "basic", "objects": objects})

    def _lfs_store(self, oid: str, body: bytes) -> tuple[int, dict, bytes]:
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, f"content does not match oid {oid}")
        self.lfs_storage[oid] = body
        return 200, {"ETag": f'"{oid[:32]}"'}, b""

    def _commit(self, repo: Repo, body: bytes) -> tuple[int, dict, bytes]:
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            raise HubError(400, "commit payload must start with a header line")
        files, lfs, deleted = dict(repo.files), dict(repo.lfs), []
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, "only base64 file content is supported")
                files[value["path"]] = base64.b64decode(value["content"])
                lfs.pop(value["path"], None)
            elif line["key"] == "lfsFile":
                if value["oid"] not in self.lfs_storage:
                    raise HubError(422, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                files[value["path"]], lfs[value["path"]] = self.lfs_storage[value["oid"]], value["oid"]
            elif line["key"] in ("deletedFile", "deletedFolder"):
                gone = [p for p in files if p == value["path"] or p.startswith(value["path"].rstrip("/") + "/")]
                for p in gone:
                    files.pop(p)
                    lfs.pop(p, None)
                deleted += gone
            else:
                raise HubError(400, f"unknown commit operation {line['key']}")
        oid = hashlib.sha1(f"{repo.head}{body!r}".encode()).hexdigest()
        repo.files, repo.lfs = files, lfs
        repo.commits.append({"oid": oid, "summary": lines[0]["value"]["summary"],
                             "paths": [line["value"]["path"] for line in lines[1:]]})
        return _json(200, {"commitUrl": f"{self.url}/{repo.repo_id}/commit/{oid}", "commitOid": oid,
                           "success": True, "pullRequestUrl": None})


def _json(status: int, payload: dict, headers: dict | None = None) -> tuple[int, dict, bytes]:
    return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(payload).encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx uses it; every response carries Content-Length
    fake: FakeHub

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _serve(self) -> None:
        body = self._read_body()
        path = unquote(urlsplit(self.path).path)
        status, headers, payload = self.fake.handle(self.command, path, self.headers, body)
        self.fake.requests.append(Request(self.command, path, status, self.headers.get("Authorization")))
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _serve

    def log_message(self, format, *args) -> None:  # the request log is `FakeHub.requests`, not stderr
        pass
