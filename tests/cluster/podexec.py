"""Start one container's process, as a container runtime would, inside new mount and UTS namespaces.

Run by the process kubelet as `unshare --mount --uts -- PYTHON podexec.py SPEC.json` (as root). It makes the mount
namespace private (nothing propagates back to the host), bind-mounts every volume at its mountPath (read-only where
the pod says so), the image's folders (/opt/venv) and the namespace's hosts file at /etc/hosts, sets the pod's
hostname, changes to the working directory and execs the command with exactly the container's environment. The
host's file system is otherwise visible: a process kubelet isolates names and paths, not a root file system.

Every source is opened (O_PATH) before anything is mounted and mounted through /proc/self/fd, so a volume whose
folder lives under a path that an earlier mount covers (a kubelet root under /tmp, with an emptyDir at /tmp) still
mounts; `keep` paths (this checkout, whose venv the image's /opt/venv points into) are mounted back where a volume
covered them.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import sys

MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18
EXIT_START_ERROR = 128  # what the kubelet reports for a container that could not start (StartError)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p)


def _mount(source: str | None, target: str, flags: int) -> None:
    if _libc.mount(source.encode() if source else None, target.encode(), None, flags, None) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {source} -> {target}: {os.strerror(errno)}")


def _prepare(target: str, is_file: bool) -> None:
    if is_file:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.exists(target):
            open(target, "a").close()
    else:
        os.makedirs(target, exist_ok=True)


def _bind(fd: int, target: str, read_only: bool, is_file: bool) -> None:
    _prepare(target, is_file)
    _mount(f"/proc/self/fd/{fd}", target, MS_BIND | MS_REC)
    if read_only:
        _mount(None, target, MS_REMOUNT | MS_BIND | MS_RDONLY)


def main(spec_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    try:
        _mount(None, "/", MS_REC | MS_PRIVATE)
        mounts = sorted(spec["mounts"], key=lambda m: m["target"].rstrip("/").count("/"))  # parents first
        fds = [os.open(m["source"], os.O_PATH) for m in mounts]
        keep = [(path, os.open(path, os.O_PATH)) for path in spec.get("keep", [])]
        hosts = os.open(spec["hosts"], os.O_PATH) if spec.get("hosts") else None
        for mount, fd in zip(mounts, fds):
            _bind(fd, mount["target"], mount.get("read_only", False), os.path.isfile(mount["source"]))
        targets = [m["target"].rstrip("/") + "/" for m in mounts]
        for path, fd in keep:
            if any((path.rstrip("/") + "/").startswith(t) for t in targets):
                _bind(fd, path, False, False)
        if hosts is not None:
            _bind(hosts, "/etc/hosts", True, True)
        socket.sethostname(spec["hostname"])
    except OSError as e:
        print(f"container setup failed: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_START_ERROR)
    workdir = spec.get("workdir") or "/"
    try:
        os.chdir(workdir)
    except OSError:
        os.chdir("/")
    argv, env = spec["argv"], spec["env"]
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as e:
        print(f'exec: "{argv[0]}": {e.strerror}: executable file not found in $PATH' if e.errno == 2 else
              f'exec: "{argv[0]}": {e}', file=sys.stderr, flush=True)
        sys.exit(EXIT_START_ERROR)


if __name__ == "__main__":
    main(sys.argv[1])
