"""Signals at any moment (issue 9 section 7): SIGTERM during imports, the data scan, the cache build, the final
save, or twice in a row exits 143 with nothing half-written; SIGINT checkpoints like SIGTERM and exits 130.

tests/fault_driver.py makes the process signal itself at the exact point under test, so no timing is guessed."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, TINY, clean_env
from trainer import checkpoint
from trainer.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED
from trainer.run_dir import RunDir

pytestmark = pytest.mark.slow


def drive(fault: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tests/fault_driver.py", "--signal", fault, "train", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, env=clean_env())


def files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def test_sigterm_during_imports_exits_143_with_nothing_written(tmp_path):
    proc = drive("import", *TINY, "--output_dir", tmp_path / "out")
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr
    assert "SIGTERM received: stopped before training started" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_sigterm_during_the_data_scan_exits_143_with_nothing_written(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 60 * i, dtype=np.uint8)).save(images / f"{i}.png")
    out = tmp_path / "out"
    proc = drive("scan", *TINY, "--output_dir", out, "--dataset_name", "imagefolder", "--train_data_dir", images,
                 "--data_cache", "false", "--train_batch_size", "2")
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr
    assert not out.exists(), files(out)


def test_sigterm_twice_during_the_cache_build_leaves_no_half_written_cache(tmp_path):
    out = tmp_path / "out"
    proc = drive("cache:TERM:2", *TINY, "--output_dir", out)
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr
    assert proc.stderr.count("SIGTERM received: stopping") == 1, "the second signal changes nothing"
    assert not out.exists(), files(out)  # not the cache's .tmp file, not the lock, not the folder


def test_sigterm_during_the_final_save_exits_143_and_the_retry_completes(tmp_path):
    out = tmp_path / "out"
    args = [*TINY, "--output_dir", out, "--max_train_steps", "3", "--save_image_epochs", "100",
            "--eval_quality_images", "0"]
    proc = drive("final_save", *args)
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr
    assert "the retry marks the run complete" in proc.stderr
    assert not (out / "training_complete.json").exists(), "never marked complete when stopped"
    assert [c.name for c in checkpoint.complete_checkpoints(RunDir(out))] == ["checkpoint-3"]
    assert not list(out.glob(".tmp-*")), "the pipeline save finished or left nothing"
    retry = subprocess.run([sys.executable, "-m", "trainer", "train", *map(str, args)], capture_output=True,
                           text=True, cwd=REPO, env=clean_env())
    assert retry.returncode == 0, retry.stderr
    assert json.loads((out / "training_complete.json").read_text())["global_step"] == 3


@pytest.mark.parametrize("signame,code", [("TERM:2", EXIT_PREEMPTED), ("INT", EXIT_INTERRUPTED)])
def test_a_signal_in_training_checkpoints_then_exits_with_its_code(tmp_path, signame, code):
    out = tmp_path / "out"
    proc = drive(f"step-2:{signame}", *TINY, "--output_dir", out, "--max_train_steps", "50",
                 "--checkpointing_steps", "1000", "--save_image_epochs", "100", "--eval_quality_images", "0")
    assert proc.returncode == code, proc.stderr
    assert "checkpoint saved at step 2" in proc.stderr
    assert [c.name for c in checkpoint.complete_checkpoints(RunDir(out))] == ["checkpoint-2"]
    assert checkpoint.damage(out / "checkpoints" / "checkpoint-2") == ""


def test_sigterm_during_an_evaluation_checkpoints_within_a_sampler_step_and_the_retry_resumes(tmp_path):
    """Issue 17 case 4: a 300-step evaluation used to ignore SIGTERM until the grace period killed the process, with
    no checkpoint of the steps done (the retry started at 0). Now sampling stops at its next step, the steps done
    are checkpointed, and the exit is 143; the retry resumes there and finishes."""
    out = tmp_path / "out"
    args = [*TINY, "--output_dir", out, "--max_train_steps", "12", "--save_image_epochs", "1",
            "--eval_batch_size", "8", "--num_inference_steps", "300", "--eval_quality_images", "0",
            "--checkpointing_steps", "100", "--preemption_grace_seconds", "600"]
    proc = drive("eval", *args)
    assert proc.returncode == EXIT_PREEMPTED, proc.stdout + proc.stderr
    after = int(proc.stderr.split("sampler steps after the signal: ")[1].split()[0])
    assert after <= 1, f"{after} sampler steps ran after SIGTERM"
    assert "evaluation interrupted" in proc.stderr and "checkpoint saved at step 8" in proc.stderr, proc.stderr
    assert [p.name for p in checkpoint.complete_checkpoints(RunDir(out))] == ["checkpoint-8"]
    assert not list((out / "samples").glob("*.png")), "an interrupted evaluation writes no grid"

    retry = subprocess.run([sys.executable, "-m", "trainer", "train", *map(str, args)], capture_output=True,
                           text=True, cwd=REPO, env=clean_env())
    assert retry.returncode == 0, retry.stderr
    assert "resumed from" in retry.stdout and "at step 8" in retry.stdout, retry.stdout
    assert json.loads((out / "training_complete.json").read_text())["global_step"] == 12
