"""One writer per output_dir (issue 9 section 5): a second `ddpm train` exits 2 at once naming the holder; the lock
goes with the process however it dies."""

import json
import signal
import subprocess
import sys

import pytest

from conftest import REPO, TINY, clean_env, ddpm
from trainer.errors import EXIT_CONFIG, OutputDirError, TransientError
from trainer.outputs import OutputDirLock
from trainer.run_dir import LOCK_NAME

HOLD = ("import sys, time\nfrom pathlib import Path\nfrom trainer.outputs import OutputDirLock\nfrom trainer.run_dir import RunDir\n"
        "OutputDirLock(RunDir(Path(sys.argv[1])).lock_file).acquire({'host': 'gpu-node-7', 'pid': '4242', 'started': 'today', "
        "'pod': 'ddpm-train-0-abc', 'namespace': 'vision', 'workload': sys.argv[2]})\n"
        "print('held', flush=True)\nsys.stdin.read()\n")  # holds until stdin closes or it is killed


def holder(out, workload="Job/ddpm-train"):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out), workload], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=REPO, env=clean_env())
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_is_refused_naming_the_holder_and_the_lock_dies_with_it(tmp_path):
    proc = holder(tmp_path)
    with pytest.raises(OutputDirError, match="in use by another `ddpm train` \\(host gpu-node-7, pid 4242, since "
                                             "today, pod vision/ddpm-train-0-abc\\)"):
        OutputDirLock(tmp_path / LOCK_NAME).acquire({"host": "laptop"})
    proc.send_signal(signal.SIGKILL)  # no cleanup runs: the kernel releases the flock
    proc.wait()
    lock = OutputDirLock(tmp_path / LOCK_NAME).acquire({"host": "laptop", "pid": "1"})
    assert json.loads((tmp_path / LOCK_NAME).read_text())["host"] == "laptop"
    lock.release()


def test_a_previous_pod_of_the_same_workload_is_waited_for_not_failed(tmp_path):
    proc = holder(tmp_path, workload="Job/ddpm-train")
    try:
        with pytest.raises(TransientError, match="still locked by a previous pod of this workload"):
            OutputDirLock(tmp_path / LOCK_NAME).acquire({"workload": "Job/ddpm-train", "namespace": "vision"},
                                      wait_if_same_workload=0.0)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_ddpm_train_refuses_a_held_output_dir_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = holder(out)
    try:
        before = sorted(p.name for p in out.iterdir())
        train = ddpm("train", *TINY, "--output_dir", out, "--max_train_steps", "1", check=False)
        assert train.returncode == EXIT_CONFIG and "in use by another `ddpm train` (host gpu-node-7" in train.stderr
        assert sorted(p.name for p in out.iterdir()) == before
    finally:
        proc.kill()
        proc.wait()
