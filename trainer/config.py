"""TrainingConfig: one typed object built from defaults < YAML file < DDPM_* env < CLI flags.

The tutorial's 16 fields keep their names and meaning. `load_config` runs pydantic-settings' own sources
(YAML, env, CLI) separately so it can remember where every value came from (`ddpm config`), reject unknown keys
with a suggestion, and report every problem at once.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    CliSettingsSource,
    EnvSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

ENV_PREFIX = "DDPM_"
CONFIG_FILE_ENV = "DDPM_CONFIG_FILE"
RESOLVED_CONFIG_NAME = "training_config.yaml"  # written into output_dir at start


class ConfigError(Exception):
    """Bad user configuration. The message lists every problem; the CLI exits with status 2."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


class TrainingConfig(BaseSettings):
    model_config = SettingsConfigDict(extra="forbid", validate_default=True, frozen=True)

    # --- the tutorial's fields -------------------------------------------------------------------
    image_size: int = Field(128, gt=0, description="side of the square training images, in pixels")
    train_batch_size: int = Field(16, gt=0, description="images per process per micro-batch")
    eval_batch_size: int = Field(16, gt=0, description="images in each sample grid")
    num_epochs: int = Field(50, gt=0, description="passes over the dataset (ignored if max_train_steps is set)")
    gradient_accumulation_steps: int = Field(1, gt=0, description="micro-batches per optimizer update")
    learning_rate: float = Field(1e-4, gt=0, description="peak learning rate after warmup")
    lr_warmup_steps: int = Field(500, ge=0, description="warmup length in optimizer updates")
    save_image_epochs: int = Field(10, gt=0, description="write a sample grid every N epochs (and at the end)")
    save_model_epochs: int = Field(30, gt=0, description="save the pipeline every N epochs (and at the end)")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        "no", description="autocast precision; fp16 needs CUDA, bf16 works on CUDA and modern CPUs"
    )
    output_dir: Path = Field(Path("ddpm-butterflies-128"), description="run folder: pipeline, samples, logs, checkpoints")
    push_to_hub: bool = Field(False, description="upload the final pipeline with `ddpm push`")
    hub_model_id: str | None = Field(None, description="Hub repo id; default: output_dir's name (the tutorial's rule)")
    hub_private_repo: bool | None = Field(None, description="create the Hub repo private")
    overwrite_output_dir: bool = Field(
        False, description="allow starting a different run in a non-empty output_dir (its old run is deleted)"
    )
    seed: int = Field(0, description="seeds init, data order, noise and sample grids")

    # --- data ------------------------------------------------------------------------------------
    dataset_name: str = Field(
        "builtin:butterflies",
        description="'builtin:butterflies' (offline), 'imagefolder' (with train_data_dir) or a Hub dataset id",
    )
    train_data_dir: Path | None = Field(None, description="folder of images when dataset_name is imagefolder")
    builtin_num_images: int = Field(1000, gt=0, description="size of the built-in dataset")
    center_crop: bool = Field(False, description="center-crop to a square before resizing")
    random_flip: bool = Field(True, description="random horizontal flips (drawn per step from the seed)")
    dataloader_num_workers: int | None = Field(
        None, ge=0, description="DataLoader workers per process; default 0 with data_cache, else from the CPUs this process may use"
    )
    data_cache: bool = Field(
        True, description="decode+resize every image once into a uint8 array on disk, memory-mapped by all ranks and later runs"
    )
    data_cache_dir: Path | None = Field(
        None, description="where data_cache lives; default <output_dir>/data_cache (a shared volume path reuses it across runs)"
    )

    # --- length ----------------------------------------------------------------------------------
    max_train_steps: int | None = Field(None, gt=0, description="optimizer updates; overrides num_epochs when set")

    # --- model and objective ---------------------------------------------------------------------
    model_preset: Literal["tutorial", "small"] = Field(
        "tutorial", description="'tutorial': the tutorial's UNet (~114M params); 'small': ~3M params for CPU"
    )
    model_config_name_or_path: str | None = Field(
        None, description="UNet2DModel config (folder or config.json) overriding model_preset"
    )
    ddpm_num_steps: int = Field(1000, gt=0, description="diffusion timesteps of the DDPMScheduler")
    ddpm_beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = Field(
        "linear", description="DDPMScheduler beta schedule"
    )
    prediction_type: Literal["epsilon", "sample", "v_prediction"] = Field(
        "epsilon", description="what the UNet predicts; the loss is MSE against it"
    )

    # --- optimisation ----------------------------------------------------------------------------
    lr_scheduler: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
    ] = Field("cosine", description="diffusers get_scheduler name; counts optimizer updates")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1 (torch default, as the tutorial)")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2")
    adam_weight_decay: float = Field(1e-2, ge=0, description="AdamW decoupled weight decay")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW epsilon")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping when gradients sync")
    use_ema: bool = Field(True, description="keep an EMA of the weights; samples and the pipeline use it")
    ema_max_decay: float = Field(0.9999, gt=0, le=1, description="EMAModel decay ceiling")
    ema_min_decay: float = Field(0.0, ge=0, le=1, description="EMAModel decay floor")
    ema_inv_gamma: float = Field(1.0, gt=0, description="EMAModel warmup inv_gamma")
    ema_power: float = Field(0.75, gt=0, description="EMAModel warmup power (3/4 for long runs)")
    ema_update_after_step: int = Field(0, ge=0, description="EMAModel starts averaging after N updates")

    # --- evaluation ------------------------------------------------------------------------------
    eval_scheduler: Literal["ddim", "ddpm"] = Field("ddim", description="sampler for the sample grids")
    num_inference_steps: int = Field(50, gt=0, description="sampler steps for the sample grids")
    ddim_eta: float = Field(
        1.0, ge=0, le=1, description="DDIM noise: 1 stochastic (forgiving early in training), 0 deterministic"
    )
    eval_mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        "bf16", description="autocast precision for sampling grids (bf16: ~2x faster on CPU with AVX-512 bf16 and on GPUs)"
    )
    eval_quality_images: int = Field(
        32, ge=0, description="images scored at each evaluation (sliced Wasserstein distance to as many training "
        "images, TensorBoard quality/*; README: Sample quality); the grid is the first eval_batch_size of them; 0: off",
    )

    # --- speed (docs/PERFORMANCE.md has the measurements behind each default) ---------------------
    optimizer_impl: Literal["fused", "foreach"] = Field(
        "fused", description="AdamW kernel; fused also skips non-finite updates on device, foreach needs a host sync for that"
    )
    channels_last: bool = Field(False, description="NHWC memory format for the UNet and its inputs")
    torch_compile: bool = Field(False, description="torch.compile the UNet (compile time is logged separately)")
    sdpa_attention: bool = Field(
        True, description="attention through torch's scaled_dot_product_attention kernels; false: diffusers' plain matmul processor"
    )
    allow_tf32: bool = Field(True, description="CUDA: TF32 matmuls/convolutions for fp32 work (Ampere and newer)")
    cudnn_benchmark: bool = Field(True, description="CUDA: let cuDNN pick the fastest convolution kernels for the fixed shapes")
    peak_tflops: float | None = Field(
        None, gt=0, description="device peak TFLOP/s for the MFU scalar; default from a table of common GPUs (trainer/perf.py)"
    )

    # --- logging ---------------------------------------------------------------------------------
    logging_steps: int = Field(10, gt=0, description="optimizer updates between status lines / scalars")

    # --- checkpoints and fault tolerance (README: Fault tolerance) -------------------------------
    checkpointing_steps: int = Field(500, gt=0, description="save full training state every N updates")
    checkpoints_total_limit: int | None = Field(3, gt=0, description="keep the newest K checkpoints")
    resume_from_checkpoint: str = Field(
        "auto", description="'auto' (newest if any), 'latest' (must exist), 'none', or a checkpoint path"
    )
    preemption_grace_seconds: float = Field(
        90.0, gt=0, description="after SIGTERM, exit within this many seconds even if the checkpoint is not done"
    )
    max_nonfinite_steps: int = Field(20, gt=0, description="stop after N consecutive NaN/inf losses")
    process_group_timeout_seconds: int = Field(1800, gt=0, description="torch.distributed collective timeout")

    # --- derived values --------------------------------------------------------------------------
    @property
    def hub_repo_id(self) -> str:
        """The tutorial's rule: hub_model_id, else the output folder's name."""
        return self.hub_model_id or Path(self.output_dir).name

    @property
    def logging_dir(self) -> Path:
        return Path(self.output_dir) / "logs"

    @property
    def resolved_data_cache_dir(self) -> Path:
        return Path(self.data_cache_dir or Path(self.output_dir) / "data_cache")

    def global_batch_size(self, world_size: int) -> int:
        return self.train_batch_size * self.gradient_accumulation_steps * world_size

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, **_sources):
        # load_config() runs the real sources itself (to track provenance); the constructor takes values only.
        return (init_settings,)


FIELDS = tuple(TrainingConfig.model_fields)

# Fields that define what a run trains; a different value means a different run (see check_output_dir).
RUN_IDENTITY_FIELDS = (
    "image_size", "train_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_warmup_steps",
    "mixed_precision", "seed", "dataset_name", "train_data_dir", "builtin_num_images", "center_crop",
    "random_flip", "model_preset", "model_config_name_or_path", "ddpm_num_steps", "ddpm_beta_schedule",
    "prediction_type", "lr_scheduler", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon",
    "use_ema",
)


# Kubernetes injects "service link" variables for every Service in the namespace: a Service named ddpm-tensorboard
# gives DDPM_TENSORBOARD_SERVICE_HOST, DDPM_TENSORBOARD_PORT_6006_TCP... They are not config and must not be rejected.
_SERVICE_LINK = re.compile(r"^DDPM_[A-Z0-9_]+_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT(_\d+_(TCP|UDP|SCTP)(_PROTO|_PORT|_ADDR)?)?)$")


def _suggest(name: str, choices=FIELDS) -> str:
    close = difflib.get_close_matches(name.lower(), choices, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def build_cli_parser(parser: argparse.ArgumentParser) -> CliSettingsSource:
    """Add `--config` and one `--<field> VALUE` flag per field to `parser` (pydantic-settings' CLI)."""
    parser.add_argument("--config", metavar="FILE", help=f"YAML config file (or ${CONFIG_FILE_ENV})")
    return CliSettingsSource(
        TrainingConfig, root_parser=parser, cli_implicit_flags=False, cli_hide_none_type=True,
        cli_avoid_json=True, formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def load_config(
    parsed: argparse.Namespace | None = None,
    unknown_args: list[str] | None = None,
    cli_source: CliSettingsSource | None = None,
    environ: dict[str, str] | None = None,
) -> tuple[TrainingConfig, dict[str, str]]:
    """Merge defaults < YAML < env < CLI. Returns the config and each field's source; raises ConfigError."""
    environ = dict(os.environ if environ is None else environ)
    problems: list[str] = []
    layers: list[tuple[str, dict[str, Any]]] = []

    config_file = getattr(parsed, "config", None) or environ.get(CONFIG_FILE_ENV)
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            problems.append(f"config file {path} does not exist (from {'--config' if parsed and parsed.config else CONFIG_FILE_ENV})")
        else:
            try:
                raw = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as e:
                raw = None
                problems.append(f"config file {path} is not valid YAML: {e}")
            if raw is not None and not isinstance(raw, dict):
                problems.append(f"config file {path} must be a mapping of field: value, got {type(raw).__name__}")
            elif raw is not None:
                for key in raw:
                    if key not in FIELDS:
                        problems.append(f"unknown key '{key}' in {path}{_suggest(str(key))}")
                known = YamlConfigSettingsSource(TrainingConfig, yaml_file=path)()
                layers.append(("file", {k: v for k, v in known.items() if k in FIELDS}))

    for var in sorted(environ):
        if var.upper().startswith(ENV_PREFIX) and var.upper() != CONFIG_FILE_ENV and not _SERVICE_LINK.match(var):
            field = var[len(ENV_PREFIX):].lower()
            if field not in FIELDS:
                problems.append(f"unknown environment variable {var}{_suggest(field)}")
    env_values = EnvSettingsSource(TrainingConfig, env_prefix=ENV_PREFIX, case_sensitive=False)
    env_values.env_vars = {k.lower(): v for k, v in environ.items()}  # read the given mapping, not os.environ
    layers.append(("env", {k: v for k, v in env_values().items() if k in FIELDS}))

    previous = ""
    for arg in unknown_args or []:
        if arg.startswith("-"):
            flag = arg.lstrip("-").split("=", 1)[0]
            problems.append(f"unknown flag {arg.split('=', 1)[0]}{_suggest(flag.replace('-', '_'))}")
        elif not (previous.startswith("-") and "=" not in previous):  # not the value of an unknown flag
            problems.append(f"unexpected argument '{arg}' (flags take the form --field VALUE)")
        previous = arg
    if cli_source is not None and parsed is not None:
        cli_values = cli_source(parsed_args=parsed)()
        layers.append(("cli", {k: v for k, v in cli_values.items() if k in FIELDS and v is not None}))

    merged: dict[str, Any] = {}
    sources = {name: "default" for name in FIELDS}
    for source, values in layers:
        for key, value in values.items():
            merged[key] = value
            sources[key] = source

    config = None
    try:
        config = TrainingConfig(**merged)
    except ValidationError as e:
        for err in e.errors():
            field = ".".join(str(p) for p in err["loc"])
            given = f" (got {err['input']!r} from {sources.get(field, '?')})" if "input" in err else ""
            problems.append(f"{field}: {err['msg']}{given}")
        # Still run the cross-field checks, with the invalid fields at their defaults, to report everything at once.
        bad = {str(err["loc"][0]) for err in e.errors() if err["loc"]}
        try:
            problems += cross_field_problems(TrainingConfig(**{k: v for k, v in merged.items() if k not in bad}))
        except ValidationError:
            pass
    if config is not None:
        problems += cross_field_problems(config)
    if problems:
        raise ConfigError(problems)
    return config, sources


def downsampling_factor(config: TrainingConfig) -> int:
    """How many times the UNet halves the image: image_size must be a multiple of this."""
    from trainer.model import unet_config

    try:
        blocks = unet_config(config)["down_block_types"]
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError([f"model_config_name_or_path: cannot read a UNet2DModel config: {e}"]) from e
    return 2 ** (len(blocks) - 1)


def cross_field_problems(config: TrainingConfig) -> list[str]:
    import torch

    problems = []
    try:
        factor = downsampling_factor(config)
        if config.image_size % factor:
            problems.append(
                f"image_size {config.image_size} must be a multiple of {factor} for this UNet "
                f"({factor.bit_length() - 1} down-sampling blocks); try {max(factor, round(config.image_size / factor) * factor)}"
            )
    except ConfigError as e:
        problems += e.problems
    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        problems.append("mixed_precision fp16 needs a CUDA GPU; on CPU use bf16 or no")
    if config.eval_mixed_precision == "fp16" and not torch.cuda.is_available():
        problems.append("eval_mixed_precision fp16 needs a CUDA GPU; on CPU use bf16 or no")
    if config.dataset_name == "imagefolder" and config.train_data_dir is None:
        problems.append("dataset_name imagefolder needs train_data_dir (a folder of images)")
    if config.train_data_dir is not None and config.dataset_name not in ("imagefolder",):
        problems.append(f"train_data_dir is set but dataset_name is '{config.dataset_name}'; set dataset_name: imagefolder")
    if config.dataset_name.startswith("builtin:") and config.dataset_name != "builtin:butterflies":
        problems.append(f"unknown built-in dataset '{config.dataset_name}'; the built-in dataset is builtin:butterflies")
    if config.eval_quality_images == 1:
        problems.append("eval_quality_images must be 0 (off) or at least 2 (a distance between sets of images)")
    if config.eval_scheduler == "ddpm" and config.num_inference_steps > config.ddpm_num_steps:
        problems.append(f"num_inference_steps {config.num_inference_steps} exceeds ddpm_num_steps {config.ddpm_num_steps}")
    if config.resume_from_checkpoint not in ("auto", "latest", "none") and not Path(config.resume_from_checkpoint).is_dir():
        problems.append(
            f"resume_from_checkpoint '{config.resume_from_checkpoint}' is not a checkpoint folder; use auto, latest, none or a path"
        )
    return problems


def config_yaml(config: TrainingConfig, sources: dict[str, str] | None = None) -> str:
    """The effective config as YAML; with sources, each line ends with '# <source>'."""
    values = json.loads(config.model_dump_json())
    if sources is None:
        return yaml.safe_dump(values, sort_keys=False)
    width = max(len(yaml.safe_dump({k: v}).strip()) for k, v in values.items())
    lines = []
    for key, value in values.items():
        line = yaml.safe_dump({key: value}, default_flow_style=True, width=10_000).strip().strip("{}")
        lines.append(f"{line:<{width}}  # {sources[key]}")
    return "\n".join(lines) + "\n"


def read_config_file(path: Path) -> dict[str, Any]:
    return yaml.safe_load(Path(path).read_text()) or {}
