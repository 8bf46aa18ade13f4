"""UNet2DModel presets, the noise scheduler and the EMA, all built from TrainingConfig, and what a training step of
the UNet costs (FLOPs, MFU)."""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor
from diffusers.training_utils import EMAModel
from torch.utils.flop_counter import FlopCounterMode

from trainer.config import TrainingConfig
from trainer.errors import ConfigError
from trainer.run_dir import RunDir

# The diffusers tutorial's UNet, verbatim (sample_size is set from image_size).
TUTORIAL_UNET: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    layers_per_block=2,
    block_out_channels=(128, 128, 256, 256, 512, 512),
    down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
)

# ~3M parameters: trains in minutes on a 2-core CPU at 32 px; attention at the 8x8 level only.
SMALL_UNET: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    layers_per_block=1,
    block_out_channels=(32, 64, 64, 128),
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    norm_num_groups=16,
)

PRESETS = {"tutorial": TUTORIAL_UNET, "small": SMALL_UNET}


def unet_config(config: TrainingConfig) -> dict[str, Any]:
    """The UNet2DModel kwargs for this run: a preset, or a config file/folder (model_config_name_or_path)."""
    if config.model_config_name_or_path:
        path = Path(config.model_config_name_or_path)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file() and (RunDir(path.parent).unet / "config.json").is_file():
            path = RunDir(path.parent).unet / "config.json"  # a DDPMPipeline folder
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not JSON ({e})") from e
        if not isinstance(raw, dict):
            raise ValueError(f"{path} is not a JSON object of UNet2DModel arguments (it holds a {type(raw).__name__})")
        known = set(UNet2DModel.extract_init_dict(raw)[0])
        kwargs = {k: v for k, v in raw.items() if k in known}
        if "down_block_types" not in kwargs:
            raise ValueError(f"{path} has no down_block_types; is it a UNet2DModel config?")
        for key in ("down_block_types", "up_block_types"):
            blocks = kwargs.get(key, [])
            if not isinstance(blocks, list) or not blocks or not all(isinstance(b, str) for b in blocks):
                raise ValueError(f"{path}: {key} must be a list of block names, e.g. [\"DownBlock2D\", ...], got "
                                 f"{str(blocks)[:100]}")
    else:
        kwargs = dict(PRESETS[config.model_preset])
    kwargs["sample_size"] = config.image_size
    return kwargs


def unet_build_problem(config: TrainingConfig) -> str | None:
    """Why diffusers cannot build this UNet (a model_config_name_or_path file with unknown block names, mismatched
    lengths, wrong types), found by building it on the meta device (no memory, milliseconds); None if it can."""
    import torch

    try:
        with torch.device("meta"):
            UNet2DModel(**unet_config(config))
    except Exception as e:  # diffusers raises ValueError, TypeError, KeyError... for arguments it cannot use
        return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
    return None


def set_backend_flags(config: TrainingConfig) -> None:
    """How the UNet's kernels run on a GPU: TF32 matmuls and convolutions, cuDNN's autotuner."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = config.allow_tf32
        torch.backends.cudnn.benchmark = config.cudnn_benchmark


def build_unet(config: TrainingConfig) -> UNet2DModel:
    unet = UNet2DModel(**unet_config(config))
    if not config.sdpa_attention:  # diffusers' default processor is SDPA (flash/memory-efficient kernels)
        for module in unet.modules():
            if isinstance(module, Attention):
                module.set_processor(AttnProcessor())
    return unet


def build_noise_scheduler(config: TrainingConfig) -> DDPMScheduler:
    """The training schedule, saved with the pipeline. With zero_terminal_snr its config also carries
    rescale_betas_zero_snr and timestep_spacing 'trailing', so every sampler built from it (the loop's grids,
    `ddpm sample`/`eval`, a stock DDPMPipeline.from_pretrained) starts from the pure-noise timestep."""
    zero_snr = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing") if config.zero_terminal_snr else {}
    return DDPMScheduler(
        num_train_timesteps=config.ddpm_num_steps,
        beta_schedule=config.ddpm_beta_schedule,
        prediction_type=config.prediction_type,
        **zero_snr,
    )


def build_ema(config: TrainingConfig, unet: UNet2DModel) -> EMAModel | None:
    if not config.use_ema:
        return None
    return EMAModel(
        unet.parameters(),
        decay=config.ema_max_decay,
        min_decay=config.ema_min_decay,
        update_after_step=config.ema_update_after_step,
        use_ema_warmup=True,
        inv_gamma=config.ema_inv_gamma,
        power=config.ema_power,
        model_cls=UNet2DModel,
        model_config=unet.config,
    )



def downsampling_factor(config: TrainingConfig) -> int:
    """How many times the UNet halves the image: image_size must be a multiple of this."""
    where = f"model_config_name_or_path {config.model_config_name_or_path}"
    try:
        blocks = unet_config(config)["down_block_types"]
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError([f"{where}: cannot read a UNet2DModel config: {e}"]) from e
    if config.model_config_name_or_path and (problem := unet_build_problem(config)):
        raise ConfigError([f"{where}: diffusers cannot build a UNet2DModel from it ({problem})"])
    return 2 ** (len(blocks) - 1)


@dataclass(frozen=True)
class ModelSpec:
    """The run's UNet as a checkpoint records it (a resume refuses another), and its size."""

    preset: str
    config: dict  # the UNet2DModel kwargs, JSON-normalised
    parameters: int

    def recorded(self) -> dict:
        return {"preset": self.preset, "config": self.config}


def model_spec(config: TrainingConfig) -> ModelSpec:
    kwargs = unet_config(config)
    with torch.device("meta"):  # counted without memory or compute
        parameters = UNet2DModel(**kwargs).num_parameters()
    return ModelSpec(config.model_config_name_or_path or config.model_preset, json.loads(json.dumps(kwargs)),
                     parameters)


@contextmanager
def ema_weights(model, ema: EMAModel | None):
    """Temporarily swap the EMA weights into `model` (for sampling and saving)."""
    if ema is None:
        yield model
        return
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    try:
        yield model
    finally:
        ema.restore(model.parameters())

# ---- step cost: FLOPs and MFU -----------------------------------------------------------------------------------------
# Step cost in FLOPs and model FLOPs utilisation (MFU): achieved FLOP/s over the device's peak.
#
# FLOPs are counted by torch.utils.flop_counter on a meta-device copy of the UNet (no memory, no compute): one
# forward and backward per image, i.e. the matmul/convolution/attention work; normalisation and element-wise ops
# are not counted, as is usual for MFU.

# Dense peak TFLOP/s by device-name substring (vendor datasheets), for mixed precision (bf16/fp16 tensor cores)
# and for fp32 training (TF32 tensor cores when allowed, plain fp32 otherwise). First match wins.
PEAK_TFLOPS = (
    ("H200", {"mixed": 989.0, "tf32": 494.7, "fp32": 66.9}),
    ("H100 PCIe", {"mixed": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("H100", {"mixed": 989.0, "tf32": 494.7, "fp32": 66.9}),  # SXM
    ("A100", {"mixed": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("L40S", {"mixed": 362.0, "tf32": 183.0, "fp32": 91.6}),
    ("L4", {"mixed": 121.0, "tf32": 60.0, "fp32": 30.3}),
    ("A10", {"mixed": 125.0, "tf32": 62.5, "fp32": 31.2}),
)


def training_flops_per_image(config: TrainingConfig) -> float:
    """FLOPs of one training forward+backward per image at config.image_size, counted on a micro-batch of
    train_batch_size (a few FLOPs per batch, e.g. the timestep MLP's weight gradient, do not scale with it)."""
    batch = config.train_batch_size
    with torch.device("meta"):
        unet = build_unet(config)
        x = torch.zeros(batch, unet.config.in_channels, config.image_size, config.image_size)
        t = torch.zeros(batch, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        unet(x, t, return_dict=False)[0].sum().backward()
    return counter.get_total_flops() / batch


def peak_flops(config: TrainingConfig, device: torch.device) -> float | None:
    """The device's dense peak FLOP/s for this run's precision, or None where unknown (CPU, unlisted GPU)."""
    if config.peak_tflops is not None:
        return config.peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    kind = "mixed" if config.mixed_precision != "no" else ("tf32" if config.allow_tf32 else "fp32")
    return next((peaks[kind] * 1e12 for key, peaks in PEAK_TFLOPS if key in name), None)
