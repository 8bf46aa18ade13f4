"""Shared helpers for tests that run training as real processes."""

import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO, clean_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_cmd(nproc: int, args) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "trainer", "train", *map(str, args)]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", "-m", "trainer", "train", *map(str, args)]


def run_train(nproc: int, args, env=None, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run(train_cmd(nproc, args), capture_output=True, text=True, cwd=REPO, env=env or clean_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once, as when a pod's container dies. torchrun starts each
    worker in its own session, so killing torchrun's process group alone would leave the workers running."""
    descendants = psutil.Process(pid).children(recursive=True)
    for p in [psutil.Process(pid), *descendants]:
        p.kill()
    psutil.wait_procs(descendants)  # not `pid` itself: its exit status belongs to the caller's Popen


def run_until(nproc: int, args, needle: str, sig: int) -> tuple[int, str]:
    """Start training, read its output line by line, and send `sig` to the whole process group once a line
    contains `needle`. Returns (exit code, all output)."""
    proc = subprocess.Popen(train_cmd(nproc, args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=REPO, env=clean_env(), start_new_session=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if needle in line:
            if sig == signal.SIGKILL:
                kill_tree(proc.pid)
            else:
                proc.send_signal(sig)
            break
    rest, _ = proc.communicate()
    return proc.returncode, "".join(seen) + (rest or "")


def scalar_series(path: Path, tag: str) -> dict[int, float]:
    """step -> value from one events file, or from every events file under a folder (later files win)."""
    files = sorted(path.rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime) if path.is_dir() else [path]
    series = {}
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            series.update({e.step: e.value for e in acc.Scalars(tag)})
    return series


def event_files(out: Path) -> list[Path]:
    return sorted((out / "logs").rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)


def ema_weights(checkpoint: Path) -> list[torch.Tensor]:
    state = torch.load(checkpoint / "custom_checkpoint_0.pkl", weights_only=False)
    return state["shadow_params"]


def assert_same_run(a, b, first_step, last_step):
    final = f"checkpoint-{last_step}"
    wa, wb = weights(a / "checkpoints" / final / "model.safetensors"), weights(b / "checkpoints" / final / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "UNet weights differ"
    ea, eb = ema_weights(a / "checkpoints" / final), ema_weights(b / "checkpoints" / final)
    assert all(torch.equal(x, y) for x, y in zip(ea, eb)), "EMA weights differ"
    la = scalar_series(event_files(a)[-1], "loss")
    lb = scalar_series(event_files(b)[-1], "loss")  # the resumed process's own log
    steps = range(first_step, last_step + 1)
    assert [la[s] for s in steps] == [lb[s] for s in steps]
    assert scalar_series(event_files(a)[-1], "lr")[last_step] == scalar_series(event_files(b)[-1], "lr")[last_step]
