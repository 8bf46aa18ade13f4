"""The cluster's network: its own network namespace, a pod bridge, one network namespace per pod, and a proxy that
makes the API server reachable from the host.

Why: pods need addresses of their own that the API accepts (EndpointSlices refuse loopback addresses), their own
ports (every training pod's TensorBoard listens on 6006, every node's pod may bind the rendezvous port), and the
cluster must not touch the host's network or collide with another cluster on the same machine. So, as a CNI bridge
plugin would set it up on a node:
- the cluster namespace (held by a `sleep` process made with `unshare --net`) holds the bridge `cni0` with the
  node address 10.244.0.1/16; the control plane, the kubelet's threads and its streaming server live there;
- each pod gets a namespace of its own (its sandbox, held like a pause container), a veth pair with one end on the
  bridge and `eth0` (10.244.x.y/16) inside, and a default route via the node address;
- the host reaches the API server through a TCP proxy on the host's loopback (the kubeconfig's server), so kubectl,
  helm and `ddpm status` run on the host as they would against a remote cluster.
Nothing is configured on the host itself.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import socket
import subprocess
import threading
from pathlib import Path

CLONE_NEWNET = 0x40000000
NODE_IP = "10.244.0.1"
POD_NETWORK = ipaddress.ip_network("10.244.0.0/16")

_libc = ctypes.CDLL(None, use_errno=True)


def setns(path: str) -> None:
    """Move the calling thread (only it) into the network namespace at `path`; processes it starts are born there."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns {path}: {os.strerror(errno)}")
    finally:
        os.close(fd)


def ip(*args: str, netns_pid: int | None = None) -> None:
    prefix = ["nsenter", f"--net=/proc/{netns_pid}/ns/net", "--"] if netns_pid else []
    result = subprocess.run([*prefix, "ip", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {result.stderr.strip()}")


class Holder:
    """A process that keeps a new network namespace alive (the pause container's job)."""

    def __init__(self):
        # setpriv --pdeathsig: gone with the thread that made it, so a killed test run leaves no namespace behind
        self.popen = subprocess.Popen(["setpriv", "--pdeathsig", "KILL", "--", "unshare", "--net", "--", "sleep",
                                       "infinity"], stdin=subprocess.DEVNULL, start_new_session=True)
        self.pid = self.popen.pid
        self.path = f"/proc/{self.pid}/ns/net"
        # unshare has moved itself into the new namespace once its namespace link differs from ours
        mine = os.readlink("/proc/thread-self/ns/net")  # the calling thread may have entered another namespace
        while os.readlink(self.path) == mine:
            if self.popen.poll() is not None:
                raise OSError(f"unshare --net failed (exit {self.popen.returncode})")
            threading.Event().wait(0.005)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


class ClusterNetwork:
    def __init__(self):
        self.holder = Holder()
        self.path = self.holder.path
        ip("link", "set", "lo", "up", netns_pid=self.holder.pid)
        ip("link", "add", "cni0", "type", "bridge", netns_pid=self.holder.pid)
        ip("addr", "add", f"{NODE_IP}/{POD_NETWORK.prefixlen}", "dev", "cni0", netns_pid=self.holder.pid)
        ip("link", "set", "cni0", "up", netns_pid=self.holder.pid)
        self._next = int(ipaddress.ip_address("10.244.1.0"))
        self._lock = threading.Lock()
        self._proxies: list[socket.socket] = []

    def command(self, argv: list[str]) -> list[str]:
        """argv run in the cluster's namespace."""
        return ["nsenter", f"--net={self.path}", "--", *argv]

    def enter(self) -> None:
        """Call first thing in a thread that must act inside the cluster (the kubelet's)."""
        setns(self.path)

    def thread(self, target, name: str, *args) -> threading.Thread:
        def run():
            self.enter()
            target(*args)

        thread = threading.Thread(target=run, name=name, daemon=True)
        thread.start()
        return thread

    def call(self, fn, *args):
        """fn(*args) run inside the cluster's namespace (in a thread of its own); its result or its exception."""
        outcome = {}

        def run():
            try:
                outcome["value"] = fn(*args)
            except BaseException as e:  # handed back to the caller as is
                outcome["error"] = e

        self.thread(run, "in-cluster-call").join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome.get("value")

    def allocate(self) -> str:
        with self._lock:
            self._next += 1
            if self._next % 256 in (0, 255):
                self._next += 2
            address = ipaddress.ip_address(self._next)
        if address not in POD_NETWORK:
            raise OSError("the pod network 10.244.0.0/16 is full")
        return str(address)

    def proxy(self, port: int, host_port: int = 0) -> int:
        """Forward host 127.0.0.1:<returned port> to 127.0.0.1:`port` in the cluster's namespace."""
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", host_port))
        listener.listen(64)
        self._proxies.append(listener)

        def accept():
            while True:
                try:
                    client, _ = listener.accept()
                except OSError:
                    return
                self.thread(self._relay, "proxy-relay", client, port)

        threading.Thread(target=accept, name="proxy-accept", daemon=True).start()
        return listener.getsockname()[1]

    @staticmethod
    def _relay(client: socket.socket, port: int) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", port), timeout=10)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)

        def pipe(a: socket.socket, b: socket.socket):
            try:
                while data := a.recv(65536):
                    b.sendall(data)
            except OSError:
                pass
            finally:
                for s in (a, b):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        other = threading.Thread(target=pipe, args=(upstream, client), daemon=True)
        other.start()
        pipe(client, upstream)
        other.join()
        client.close()
        upstream.close()

    def stop(self) -> None:
        for listener in self._proxies:
            listener.close()
        self.holder.stop()


class PodSandbox:
    """A pod's network namespace: eth0 on the cluster bridge with the pod's address. Created from a thread inside the
    cluster namespace (the veth's outer end must be created there)."""

    _lock = threading.Lock()  # one veth pair at a time: the kernel names the peer in our namespace first

    def __init__(self, address: str, name: str):
        self.address = address
        self.holder = Holder()
        self.path = self.holder.path
        outer, inner = "veth" + name[-11:], "ceth" + name[-11:]
        with self._lock:
            ip("link", "add", outer, "type", "veth", "peer", "name", inner, "netns", str(self.holder.pid))
            ip("link", "set", outer, "master", "cni0", "up")
        for args in (("link", "set", inner, "name", "eth0"), ("link", "set", "lo", "up"),
                     ("addr", "add", f"{address}/{POD_NETWORK.prefixlen}", "dev", "eth0"),
                     ("link", "set", "eth0", "up"), ("route", "add", "default", "via", NODE_IP)):
            ip(*args, netns_pid=self.holder.pid)

    def command(self, argv: list[str]) -> list[str]:
        return ["nsenter", f"--net={self.path}", "--", *argv]

    def stop(self) -> None:
        self.holder.stop()  # the veth pair goes with the namespace


def unique_suffix(uid: str) -> str:
    return uid.replace("-", "")[:11]


__all__ = ["ClusterNetwork", "PodSandbox", "NODE_IP", "Path"]
