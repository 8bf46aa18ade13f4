"""Checkpoints, exact resume after SIGKILL, SIGTERM preemption, the NaN guard, preflight (issue 3)."""

import json
import signal
import subprocess
import sys

import pytest
import torch

from conftest import REPO, TINY, clean_env
from helpers import assert_same_run, ema_weights, run_train, run_until, scalar_series, weights
from trainer import checkpoint
from trainer.config import ConfigError, TrainingConfig
from trainer.distributed import EXIT_DIVERGED, EXIT_PREEMPTED
from trainer.outputs import preflight

# 32 images, batch 4, accumulation 2: 4 optimizer steps per epoch. K=6 is mid-epoch 1; 2K=12 ends epoch 2.
K = 6
RESUME_ARGS = [*TINY, "--gradient_accumulation_steps", "2", "--max_train_steps", str(2 * K), "--logging_steps", "1",
               "--checkpointing_steps", str(K), "--learning_rate", "1e-3", "--save_image_epochs", "100"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "out"
    run_train(1, [*RESUME_ARGS, "--output_dir", out])
    return out


def test_exact_resume_after_sigkill(straight_run, tmp_path):
    out = tmp_path / "out"
    args = [*RESUME_ARGS, "--output_dir", out]
    code, log = run_until(1, args, f"(step {K})", signal.SIGKILL)
    assert code == -signal.SIGKILL, log
    assert (out / "checkpoints" / f"checkpoint-{K}").is_dir()
    assert not (out / "training_complete.json").exists()

    resumed = run_train(1, args)  # the same command, as a restarted pod would run it
    assert f"resumed from {out / 'checkpoints' / f'checkpoint-{K}'} at step {K} epoch 1" in resumed.stdout
    assert_same_run(straight_run, out, K + 1, 2 * K)


def test_checkpoint_contents_and_rotation(straight_run, tmp_path):
    ckpt = straight_run / "checkpoints" / f"checkpoint-{2 * K}"
    names = {p.name for p in ckpt.iterdir()}
    # model, optimizer, EMA + LR scheduler (custom), RNG of rank 0, and our step/epoch record
    assert {"model.safetensors", "optimizer.bin", "custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl",
            "random_states_0.pkl", checkpoint.STATE_FILE} <= names
    assert json.loads((ckpt / checkpoint.STATE_FILE).read_text())["global_step"] == 2 * K

    out = tmp_path / "rot"
    run_train(1, [*TINY, "--max_train_steps", "5", "--checkpointing_steps", "1", "--checkpoints_total_limit", "2",
                  "--output_dir", out, "--save_image_epochs", "100"])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-5"]


def test_incomplete_checkpoint_is_never_resumed(tmp_path):
    root = checkpoint.checkpoints_dir(tmp_path)
    (root / "checkpoint-3").mkdir(parents=True)
    (root / "checkpoint-3" / checkpoint.STATE_FILE).write_text("{}")
    (root / ".tmp-checkpoint-9").mkdir()  # a save that crashed half-way
    (root / ".tmp-checkpoint-9" / "model.safetensors").write_bytes(b"partial")
    (root / "checkpoint-7").mkdir()  # no state file: not complete
    config = TrainingConfig(output_dir=tmp_path)
    assert checkpoint.resolve_resume(config) == root / "checkpoint-3"
    checkpoint.remove_incomplete(tmp_path)
    assert not (root / ".tmp-checkpoint-9").exists() and (root / "checkpoint-3").exists()
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        checkpoint.resolve_resume(TrainingConfig(output_dir=tmp_path / "empty", resume_from_checkpoint="latest"))
    assert checkpoint.resolve_resume(TrainingConfig(output_dir=tmp_path, resume_from_checkpoint="none")) is None


def test_failed_save_keeps_previous_checkpoint(tmp_path):
    """A save that dies (here: the disk fills up while writing) leaves the previous checkpoint loadable."""
    code = r"""
import sys
from pathlib import Path
import torch
from accelerate import Accelerator
from trainer import checkpoint
from trainer.checkpoint import TrainState
out = Path(sys.argv[1])
acc = Accelerator(cpu=True)
model = acc.prepare(torch.nn.Linear(2, 2))
state = TrainState(global_step=1)
checkpoint.save_checkpoint(acc, state, out, total_limit=1)
real = acc.save_state
def full_disk(path):
    Path(path, "model.safetensors").write_bytes(b"half")
    raise OSError(28, "No space left on device")
acc.save_state = full_disk
state.global_step = 2
checkpoint.save_checkpoint(acc, state, out, total_limit=1)
"""
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=REPO,
                          env=clean_env())
    assert proc.returncode != 0 and "No space left on device" in proc.stderr
    config = TrainingConfig(output_dir=tmp_path)
    assert checkpoint.resolve_resume(config) == tmp_path / "checkpoints" / "checkpoint-1"
    assert (tmp_path / "checkpoints" / "checkpoint-1" / "model.safetensors").stat().st_size > 100


def test_sigterm_saves_exits_75_and_resumes(tmp_path):
    out = tmp_path / "out"
    args = [*TINY, "--max_train_steps", "400", "--logging_steps", "1", "--checkpointing_steps", "1000",
            "--output_dir", out, "--save_image_epochs", "1000"]
    code, log = run_until(1, args, "step 3/400", signal.SIGTERM)
    assert code == EXIT_PREEMPTED, log
    [ckpt] = checkpoint.complete_checkpoints(out)
    step = int(ckpt.name.split("-")[1])
    assert 3 <= step < 400 and f"preempted at step {step}" in log
    assert max(scalar_series(out / "logs", "loss")) == step  # TensorBoard was flushed up to the last step

    resumed = run_train(1, [*args[:-6], "--max_train_steps", str(step + 2), *args[-4:]])
    assert f"resumed from {ckpt} at step {step}" in resumed.stdout
    assert (out / "training_complete.json").exists()


@pytest.mark.parametrize("impl", ["fused", "foreach"])  # fused skips on device, foreach after a host sync
def test_nonfinite_losses_skip_the_update(tmp_path, impl):
    out = tmp_path / "out"
    args = [*TINY, "--max_train_steps", "6", "--logging_steps", "1", "--checkpointing_steps", "1",
            "--checkpoints_total_limit", "10", "--output_dir", out, "--save_image_epochs", "100",
            "--optimizer_impl", impl]
    # micro-steps 3 and 4 are optimizer steps 4 and 5
    proc = subprocess.run([sys.executable, "tests/nan_driver.py", "3,4", "train", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, env=clean_env())
    assert proc.returncode == 0, proc.stderr
    nonfinite = scalar_series(out / "logs", "nonfinite_steps")
    assert {s: v for s, v in nonfinite.items() if v} == {4: 1.0, 5: 1.0}
    assert "nonfinite 1" in proc.stdout
    ckpts = out / "checkpoints"
    w3, w5, w6 = (weights(ckpts / f"checkpoint-{s}" / "model.safetensors") for s in (3, 5, 6))
    assert all(torch.equal(w3[k], w5[k]) for k in w3), "skipped updates left the weights untouched"
    assert not all(torch.equal(w5[k], w6[k]) for k in w5), "training continued after them"
    assert all(torch.isfinite(t).all() for t in ema_weights(ckpts / "checkpoint-6"))
    assert all(torch.isfinite(t).all() for t in w6.values())


def test_too_many_nonfinite_losses_stop_with_exit_3(tmp_path):
    out = tmp_path / "out"
    args = [*TINY, "--max_train_steps", "50", "--logging_steps", "1", "--checkpointing_steps", "2",
            "--checkpoints_total_limit", "10", "--max_nonfinite_steps", "3", "--output_dir", out,
            "--save_image_epochs", "100"]
    proc = subprocess.run([sys.executable, "tests/nan_driver.py", "4-", "train", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, env=clean_env())
    assert proc.returncode == EXIT_DIVERGED, proc.stderr
    assert "3 consecutive non-finite losses by step 7" in proc.stderr
    latest = checkpoint.complete_checkpoints(out)[-1]
    assert all(torch.isfinite(t).all() for t in weights(latest / "model.safetensors").values())
    assert not (out / "training_complete.json").exists()


def test_preflight_unwritable_and_full(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="not writable"):
        preflight(TrainingConfig(output_dir=blocker / "out"), 1)
    with pytest.raises(ConfigError, match="MiB free but a checkpoint needs"):
        preflight(TrainingConfig(output_dir=tmp_path / "ok"), 2**60)
