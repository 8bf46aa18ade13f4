"""`make cluster` / `make cluster-down`: the test cluster, started by hand in the background.

    python -m cluster up --root .cluster      # prints `export KUBECONFIG=<path>` as its last line
    python -m cluster down --root .cluster

`up` starts a daemon (`serve`) that runs the cluster until `down` sends it SIGTERM; its log is <root>/cluster.log.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

READY, PID, LOG = "ready", "cluster.pid", "cluster.log"


def serve(root: Path) -> int:
    from cluster import Cluster

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    cluster = Cluster(root)
    try:
        cluster.start()
        (root / READY).write_text(str(cluster.kubeconfig))
        print(f"cluster up in {cluster.startup_seconds:.1f}s; kubeconfig {cluster.kubeconfig}", flush=True)
        while not stop.wait(1.0):
            cluster.plane.check_alive()
    finally:
        cluster.stop()
        (root / READY).unlink(missing_ok=True)
        (root / PID).unlink(missing_ok=True)
    return 0


def running_pid(root: Path) -> int | None:
    try:
        pid = int((root / PID).read_text())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def up(root: Path, timeout_s: float = 180.0) -> int:
    root.mkdir(parents=True, exist_ok=True)
    root = root.resolve()
    if running_pid(root):
        print(f"a cluster is already running from {root} (pid {running_pid(root)}); `make cluster-down` stops it")
        print(f"export KUBECONFIG={(root / READY).read_text()}")
        return 0
    (root / READY).unlink(missing_ok=True)
    with open(root / LOG, "ab") as log:
        daemon = subprocess.Popen([sys.executable, "-m", "cluster", "serve", "--root", str(root)],
                                  stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  cwd=Path(__file__).resolve().parent.parent, start_new_session=True)
    (root / PID).write_text(str(daemon.pid))
    deadline = time.monotonic() + timeout_s
    while not (root / READY).exists():
        if daemon.poll() is not None or time.monotonic() > deadline:
            print(f"the cluster did not start; see {root / LOG}", file=sys.stderr)
            daemon.kill()
            return 1
        time.sleep(0.5)  # waiting for the daemon's ready file: nothing else to wait on
    print(f"cluster running (pid {daemon.pid}, log {root / LOG}); stop it with `make cluster-down`")
    print(f"export KUBECONFIG={(root / READY).read_text()}")
    return 0


def down(root: Path, timeout_s: float = 120.0) -> int:
    pid = running_pid(root)
    if pid is None:
        print(f"no cluster running from {root}")
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while running_pid(root) and time.monotonic() < deadline:
        time.sleep(0.5)  # the daemon stops its pods and components in order
    if running_pid(root):
        os.killpg(pid, signal.SIGKILL)
    print("cluster stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("up", "down", "serve"))
    parser.add_argument("--root", type=Path, default=Path(".cluster"), help="state folder (default .cluster)")
    args = parser.parse_args(argv)
    return {"up": up, "down": down, "serve": serve}[args.command](args.root)


if __name__ == "__main__":
    sys.exit(main())
