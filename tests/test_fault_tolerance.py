"""Exact resume after SIGKILL, SIGTERM preemption, the NaN guard (issue 3); checkpoint integrity is test_checkpoint.py."""

import json
import signal
import subprocess
import sys

import pytest
import torch

from conftest import REPO, TINY, clean_env
from helpers import assert_same_run, ema_weights, run_train, run_until, scalar_series, weights
from trainer import checkpoint
from trainer.errors import EXIT_DIVERGED, EXIT_PREEMPTED
from trainer.run_dir import RunDir

pytestmark = pytest.mark.slow  # every test here runs ddpm or torchrun as subprocesses

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
            "random_states_0.pkl", checkpoint.STATE_FILE, checkpoint.MANIFEST} <= names
    assert json.loads((ckpt / checkpoint.STATE_FILE).read_text())["global_step"] == 2 * K

    out = tmp_path / "rot"
    run_train(1, [*TINY, "--max_train_steps", "5", "--checkpointing_steps", "1", "--checkpoints_total_limit", "2",
                  "--output_dir", out, "--save_image_epochs", "100"])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-5"]


def test_sigterm_saves_exits_143_and_resumes(tmp_path):
    out = tmp_path / "out"
    args = [*TINY, "--max_train_steps", "400", "--logging_steps", "1", "--checkpointing_steps", "1000",
            "--output_dir", out, "--save_image_epochs", "1000"]
    code, log = run_until(1, args, "step 3/400", signal.SIGTERM)
    assert code == EXIT_PREEMPTED, log
    [ckpt] = checkpoint.complete_checkpoints(RunDir(out))
    step = int(ckpt.name.split("-")[1])
    assert 3 <= step < 400 and f"SIGTERM received: checkpoint saved at step {step}; exiting with 143" in log
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
    proc = subprocess.run([sys.executable, "tests/fault_driver.py", "--nan", "3,4", "train", *map(str, args)],
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
    proc = subprocess.run([sys.executable, "tests/fault_driver.py", "--nan", "4-", "train", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, env=clean_env())
    assert proc.returncode == EXIT_DIVERGED, proc.stderr
    assert "3 consecutive non-finite losses by step 7" in proc.stderr
    assert "step 6/50 epoch 0 loss nan" in proc.stdout, "an interval of only non-finite losses logs nan, not 0"
    # losses are NaN from step 5 on; checkpoint-6 was saved during them, so it must not be called intact
    assert "checkpoint-6, was saved during them: resuming from it repeats them" in proc.stderr
    assert "intact" not in proc.stderr
    latest = checkpoint.complete_checkpoints(RunDir(out))[-1]
    assert all(torch.isfinite(t).all() for t in weights(latest / "model.safetensors").values())
    assert not (out / "training_complete.json").exists()
