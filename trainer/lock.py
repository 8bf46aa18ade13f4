"""One writer per output_dir: rank 0 of a run holds an exclusive `flock` on output_dir/.ddpm-train.lock for the
whole run, with who holds it (host, pid, start time, pod) written inside.

flock is released by the kernel when the process dies, however it dies, so a crashed or killed trainer never
leaves a stale lock on a local disk. On NFS, Linux emulates flock with POSIX byte-range locks (NFSv4 locks, or
NLM for v3; see flock(2), "NFS details"), so a second client sees the lock too; the server releases a dead client's
lock when its lease expires (NFSv4: 90 s by default). Two limits, documented in the README: a mount with
`local_lock=flock` (or `nolock`) makes the lock node-local, and a node that vanished holds its lock until the
lease expires, so a replacement pod of the same workload waits for that long instead of failing.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from trainer.errors import OutputDirError, TransientError

SAME_WORKLOAD_WAIT_S = 180.0  # two NFSv4 lease periods: a dead predecessor's lock is gone by then
POLL_S = 2.0


class OutputDirLock:
    def __init__(self, path: Path):
        self.path = Path(path)  # RunDir.lock_file
        self.created_file = False
        self._fd: int | None = None

    def acquire(self, holder: dict[str, str], wait_if_same_workload: float = SAME_WORKLOAD_WAIT_S) -> "OutputDirLock":
        """Take the lock or raise OutputDirError naming the holder. A holder from the same Kubernetes workload is
        this run's previous pod (its lock not yet released by the file server): wait for it, then TransientError."""
        self.created_file = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                theirs = _read_holder(fd)
                same = holder.get("workload") and theirs.get("workload") == holder.get("workload") \
                    and theirs.get("namespace") == holder.get("namespace")
                if not same:
                    os.close(fd)
                    raise OutputDirError(
                        f"output_dir {self.path.parent} is in use by another `ddpm train` ({_describe(theirs)}); two "
                        "runs would corrupt each other's checkpoints. Wait for it to end, stop it, or choose another "
                        "output_dir") from None
                deadline = deadline or time.monotonic() + wait_if_same_workload
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise TransientError(
                        f"output_dir {self.path.parent} is still locked by a previous pod of this workload "
                        f"({_describe(theirs)}) after {wait_if_same_workload:.0f}s; retry later") from None
                time.sleep(POLL_S)  # polling a lock held on a file server: nothing to wait on but time
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self, remove: bool = False) -> None:
        """Unlock; `remove` also deletes the lock file (when this run created it and leaves nothing else)."""
        if self._fd is None:
            return
        if remove:
            self.path.unlink(missing_ok=True)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def holder_info(kubernetes: dict[str, str]) -> dict[str, str]:
    return {"host": socket.gethostname(), "pid": str(os.getpid()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), **kubernetes}


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 65536, 0) or b"{}")
    except ValueError:
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "holder unknown"
    text = f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since {holder.get('started', '?')}"
    if holder.get("pod"):
        text += f", pod {holder.get('namespace', '')}/{holder['pod']}"
    return text
