"""`ddpm train` as a user runs it, then `ddpm sample` and stock diffusers on what it wrote."""

import json

import numpy as np
import pytest
import yaml
from diffusers import DDPMPipeline
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import ddpm
from trainer.errors import EXIT_CONFIG

pytestmark = pytest.mark.slow  # every test here runs ddpm or torchrun as subprocesses


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_args_module):
    out = tmp_path_factory.mktemp("run") / "out"
    # 32 images / batch 4 = 8 steps per epoch; 12 steps = 2 epochs (the second one partial)
    proc = ddpm("train", *tiny_args_module, "--output_dir", out, "--max_train_steps", "12", "--logging_steps", "3",
                "--save_image_epochs", "1", "--checkpointing_steps", "5")
    return out, proc


@pytest.fixture(scope="module")
def tiny_args_module():
    from conftest import TINY

    return list(TINY)


def scalars(logdir):
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_outputs_layout(run):
    out, _ = run
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == ["0000.png", "0001.png"]
    grid = Image.open(out / "samples" / "0001.png")
    assert grid.size == (2 * 16, 2 * 16)  # eval_batch_size 4 -> 2x2
    resolved = yaml.safe_load((out / "training_config.yaml").read_text())
    assert resolved["max_train_steps"] == 12 and resolved["image_size"] == 16
    assert json.loads((out / "training_complete.json").read_text())["global_step"] == 12
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-10", "checkpoint-12", "checkpoint-5"]


def test_tensorboard_scalars_images_and_config(run):
    out, _ = run
    logdirs = [p.parent for p in (out / "logs").rglob("events.out.tfevents.*")]
    assert len(logdirs) == 2, "the run's scalars, and the hparams summary Accelerate writes beside them"
    [acc] = [a for a in map(scalars, logdirs) if "loss" in a.Tags()["scalars"]]
    tags = acc.Tags()
    for tag in ("loss", "lr", "grad_norm", "images_per_sec", "epoch"):
        assert tag in tags["scalars"], tag
    assert [e.step for e in acc.Scalars("loss")] == [3, 6, 9, 12]
    assert all(np.isfinite(e.value) and e.value > 0 for e in acc.Scalars("loss"))
    assert [e.value for e in acc.Scalars("epoch")] == [0, 0, 1, 1]
    assert "samples" in tags["images"]
    assert any("config" in t for t in tags["tensors"])
    [hparams] = [a for a in map(scalars, logdirs) if "loss" not in a.Tags()["scalars"]]
    assert hparams.summary_metadata, "the config as TensorBoard hparams"


def test_model_card(run):
    out, _ = run
    card = (out / "README.md").read_text()
    assert "library_name: diffusers" in card
    assert "unconditional-image-generation" in card
    assert "builtin:butterflies" in card
    assert "samples/0001.png" in card
    assert "image_size: 16" in card


def test_console_is_plain_lines_without_carriage_returns(run):
    _, proc = run
    assert "\r" not in proc.stdout and "\r" not in proc.stderr
    status = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert len(status) == 4
    assert status[-1].startswith("step 12/12 epoch 1 loss ")
    for field in (" lr ", " img/s ", " eta "):
        assert field in status[0]
    assert "global batch 4 = 4 per process x 1 accumulation x 1 processes" in proc.stdout
    assert "8 steps/epoch | 12 total steps" in proc.stdout
    assert "parameters" in proc.stdout


def test_stock_diffusers_loads_and_samples(run):
    out, _ = run
    pipeline = DDPMPipeline.from_pretrained(out)
    images = pipeline(batch_size=1, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 16, 16, 3)


def test_pipeline_holds_the_ema_weights(run):
    import torch
    from safetensors.torch import load_file

    out, _ = run
    pipeline_weights = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    raw_weights = load_file(out / "checkpoints" / "checkpoint-12" / "model.safetensors")
    name = "conv_in.weight"
    assert not torch.equal(pipeline_weights[name], raw_weights[name]), "pipeline must use EMA, not raw weights"


def test_sample_command(run, tmp_path):
    out, _ = run
    dest = tmp_path / "samples"
    ddpm("sample", "--model", out, "--num-images", "3", "--num_inference_steps", "2", "--seed", "1", "--out", dest)
    assert sorted(p.name for p in dest.iterdir()) == ["00000.png", "00001.png", "00002.png", "grid.png"]
    again = tmp_path / "again"
    ddpm("sample", "--model", out, "--num-images", "3", "--num_inference_steps", "2", "--seed", "1",
         "--scheduler", "ddpm", "--out", again)
    assert np.asarray(Image.open(again / "grid.png")).shape == (32, 32, 3)


def test_sample_command_bad_model(tmp_path):
    proc = ddpm("sample", "--model", tmp_path, "--out", tmp_path / "o", check=False)
    assert proc.returncode == EXIT_CONFIG and "not a DDPMPipeline folder" in proc.stderr


def test_different_run_in_same_output_dir_is_refused(run, tmp_path):
    out, _ = run
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    proc = ddpm("train", "--model_preset", "small", "--image_size", "24", "--output_dir", out, check=False)
    assert proc.returncode == EXIT_CONFIG
    assert "holds a different run" in proc.stderr and "image_size: 16 -> 24" in proc.stderr
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before, "nothing lost or added"


def test_foreign_output_dir_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    proc = ddpm("train", "--model_preset", "small", "--image_size", "16", "--output_dir", tmp_path, check=False)
    assert proc.returncode == EXIT_CONFIG and "not a ddpm-trainer run" in proc.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine"
