"""Each speed switch (issue 5) changes how the step runs, not what it computes: the loss curve of a short run
matches the default to floating-point rounding, and the checkpoints stay interchangeable."""

import pytest
import torch

from conftest import TINY
from helpers import run_train, scalar_series, weights

ARGS = [*TINY, "--max_train_steps", "4", "--logging_steps", "1", "--learning_rate", "1e-3", "--lr_warmup_steps", "1",
        "--save_image_epochs", "100", "--eval_quality_images", "0", "--checkpointing_steps", "2"]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("default") / "out"
    run_train(1, [*ARGS, "--output_dir", out, "--peak_tflops", "0.5"])
    return out


def final_weights(out):
    return weights(out / "checkpoints" / "checkpoint-4" / "model.safetensors")


@pytest.mark.parametrize("switch", [
    ["--channels_last", "true"],
    ["--optimizer_impl", "foreach"],
    ["--sdpa_attention", "false"],
    ["--torch_compile", "true", "--channels_last", "true"],  # the slow one (~1-2 min of compiling on 2 cores)
], ids=["channels_last", "foreach", "no-sdpa", "compile"])
@pytest.mark.slow
def test_switch_keeps_the_loss_curve(default_run, tmp_path, switch):
    out = tmp_path / "out"
    run_train(1, [*ARGS, *switch, "--output_dir", out])
    base, other = scalar_series(default_run / "logs", "loss"), scalar_series(out / "logs", "loss")
    assert base.keys() == other.keys() == {1, 2, 3, 4}
    assert max(abs(base[s] - other[s]) for s in base) < 1e-4, (base, other)
    a, b = final_weights(default_run), final_weights(out)
    assert a.keys() == b.keys(), "same checkpoint layout (no _orig_mod. prefixes from torch.compile)"
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-3
    if "--torch_compile" in switch:
        # a compiled run's checkpoint resumes in an eager run (a pod restarted without compile, say)
        resumed = run_train(1, [*ARGS, "--max_train_steps", "5", "--output_dir", out])
        assert "resumed from" in resumed.stdout and "at step 4" in resumed.stdout


def test_flops_per_image_match_a_real_forward_backward():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from trainer.config import TrainingConfig
    from trainer.model import build_unet
    from trainer.model import training_flops_per_image

    config = TrainingConfig(model_preset="small", image_size=16, train_batch_size=3)
    unet = build_unet(config)
    # The math attention backend runs as counted matmuls (the CPU flash kernel is not in flop_counter's registry).
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        unet(torch.randn(3, 3, 16, 16), torch.tensor([1, 500, 999]), return_dict=False)[0].sum().backward()
    assert training_flops_per_image(config) == pytest.approx(counter.get_total_flops() / 3, rel=1e-6)
    assert training_flops_per_image(config.model_copy(update={"image_size": 32})) == pytest.approx(
        4 * training_flops_per_image(config), rel=0.01), "convolution work grows with the pixel count"


@pytest.mark.slow
def test_throughput_scalars(default_run):
    """images/s, achieved TFLOP/s, MFU (here against --peak_tflops 0.5) and the data-wait share are logged."""
    scalars = {tag: scalar_series(default_run / "logs", tag)
               for tag in ("images_per_sec", "tflops_per_sec", "mfu", "data_wait_share")}
    assert all(scalars[tag].keys() == {1, 2, 3, 4} for tag in scalars)
    for step in (2, 3, 4):
        assert scalars["images_per_sec"][step] > 0
        assert scalars["mfu"][step] == pytest.approx(scalars["tflops_per_sec"][step] / 0.5, rel=1e-4)
        assert 0 <= scalars["data_wait_share"][step] < 1
