"""Start one container's process, as a container runtime would, inside new mount and UTS namespaces.

Run by the process kubelet as `unshare --mount --uts -- PYTHON podexec.py SPEC.json` (as root, in the pod's network
namespace). It never writes to the host's file system; everything happens in the private mount namespace:

1. The container's root: a tmpfs holding a bind mount of each entry of the host's `/` (a symlink stays a symlink),
   then `chroot` into it. So the host's programs, libraries and this checkout are visible, as an image's layers
   would be, and a mount point the host lacks can be created in the tmpfs instead of on the host.
2. A mount point under a host folder that lacks it (/etc/ddpm, /var/run/secrets/..., /home/ddpm, /opt/venv): that
   folder is "shadowed" first, i.e. replaced by a tmpfs holding bind mounts of its entries, and the mount point is
   made in the tmpfs. Inside a volume (an emptyDir at /tmp, the claim at /data), mount points are made in the volume,
   as runtimes do.
3. Every volume at its mountPath (read-only where the pod says so), the image's folders (/opt/venv), the namespace's
   hosts file at /etc/hosts; the pod's hostname; the working directory; then exec of the command with exactly the
   container's environment.

Every source is opened (O_PATH) before anything is mounted and mounted through /proc/self/fd, so a source under a
path an earlier mount covers (a kubelet root under /tmp, with an emptyDir at /tmp) still mounts; `keep` paths (this
checkout, whose venv the image's /opt/venv points into) are mounted back where a volume covered them.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import stat
import sys

MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18
EXIT_START_ERROR = 128  # what the kubelet reports for a container that could not start (StartError)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p)


def _mount(source: str | None, target: str, flags: int, fstype: str | None = None, data: str | None = None) -> None:
    if _libc.mount(source.encode() if source else None, target.encode(), fstype.encode() if fstype else None,
                   flags, data.encode() if data else None) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {source} -> {target}: {os.strerror(errno)}")


def _bind(source: str, target: str, read_only: bool = False) -> None:
    _mount(source, target, MS_BIND | MS_REC)
    if read_only:
        _mount(None, target, MS_REMOUNT | MS_BIND | MS_RDONLY)


def _stub(source: str, target: str) -> None:
    """Create, at `target` on a tmpfs of ours, what a bind of `source` needs (a folder or a file), or copy a
    symlink."""
    info = os.lstat(source)
    if stat.S_ISLNK(info.st_mode):
        os.symlink(os.readlink(source), target)
    elif stat.S_ISDIR(info.st_mode):
        os.mkdir(target)
        _bind(source, target)
    else:
        open(target, "a").close()
        _bind(source, target)


class Root:
    """The container's view of the file system, with the rule for where a missing mount point may be created."""

    def __init__(self):
        self.writable: list[str] = []  # folders (and everything under them) where new entries are ours to make

    def _is_writable(self, folder: str) -> bool:
        return any(folder == w or folder.startswith(w.rstrip("/") + "/") for w in self.writable)

    def assemble(self, new_root: str) -> None:
        """A tmpfs at `new_root` with every entry of the host's / bound in it, and chroot into it."""
        _mount("tmpfs", new_root, 0, "tmpfs", "mode=0755")
        for entry in os.listdir("/"):
            _stub(f"/{entry}", os.path.join(new_root, entry))
        os.chroot(new_root)
        os.chdir("/")
        self.shadowed = ["/"]

    def _shadow(self, folder: str) -> None:
        fd = os.open(folder, os.O_PATH | os.O_DIRECTORY)
        entries = os.listdir(f"/proc/self/fd/{fd}")
        _mount("tmpfs", folder, 0, "tmpfs", "mode=0755")
        for entry in entries:
            _stub(f"/proc/self/fd/{fd}/{entry}", os.path.join(folder, entry))
        self.shadowed.append(folder)

    def _can_create_in(self, folder: str) -> bool:
        return folder in self.shadowed or self._is_writable(folder)

    def ensure(self, target: str, is_file: bool) -> str:
        """The real path of `target`, created (as a mount point) if missing without touching the host."""
        path = "/"
        parts = [p for p in target.split("/") if p]
        for i, part in enumerate(parts):
            following = os.path.join(path, part)
            if os.path.lexists(following):
                path = os.path.realpath(following)
                continue
            if not self._can_create_in(path):
                self._shadow(path)
            if is_file and i == len(parts) - 1:
                open(following, "a").close()
            else:
                os.mkdir(following)
                self.shadowed.append(following)  # a folder of ours: what is under it is ours too
            path = following
        return path

    def mount(self, fd: int, target: str, read_only: bool, is_file: bool) -> None:
        real = self.ensure(target, is_file)
        _bind(f"/proc/self/fd/{fd}", real, read_only)
        self.writable.append(real)


def main(spec_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    try:
        _mount(None, "/", MS_REC | MS_PRIVATE)
        mounts = sorted(spec["mounts"], key=lambda m: m["target"].rstrip("/").count("/"))  # parents first
        sources = [(m, os.open(m["source"], os.O_PATH), os.path.isfile(m["source"])) for m in mounts]
        keep = [(path, os.open(path, os.O_PATH)) for path in spec.get("keep", [])]
        hosts = os.open(spec["hosts"], os.O_PATH) if spec.get("hosts") else None
        root = Root()
        root.assemble(spec["root"])
        for mount, fd, is_file in sources:
            root.mount(fd, mount["target"], mount.get("read_only", False), is_file)
        targets = [m["target"].rstrip("/") + "/" for m in mounts]
        for path, fd in keep:
            if any((path.rstrip("/") + "/").startswith(t) for t in targets):
                root.mount(fd, path, False, False)
        if hosts is not None:
            root.mount(hosts, "/etc/hosts", True, True)
        socket.sethostname(spec["hostname"])
    except OSError as e:
        print(f"container setup failed: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_START_ERROR)
    try:
        os.chdir(spec.get("workdir") or "/")
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
