"""TrainingConfig: the run's settings as one typed, frozen object, each field declaring its part in a run.

The tutorial's 16 fields keep their names and meaning. Loading it from defaults < YAML file < DDPM_* env < CLI flags,
and checking the values against each other, is trainer.config_loading; its YAML form is trainer.run_dir.config_yaml.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

RUN_ROLES = ("identity", "length", "setting")

# Defaults that depend on the model (issue 12; docs/PERFORMANCE.md): the tutorial's 1e-4 with 500 warmup updates was
# tuned for its 114M-parameter UNet at 128 px; the ~3M-parameter `small` UNet learns fastest with a larger step.
# A model_config_name_or_path UNet gets the tutorial's values.
PRESET_DEFAULTS: dict[str, dict[str, float | int]] = {
    "tutorial": {"learning_rate": 1e-4, "lr_warmup_steps": 500},
    "small": {"learning_rate": 1e-3, "lr_warmup_steps": 100},
}


def _field(role: str, default, description: str, **constraints):
    return Field(default, description=description, json_schema_extra={"run": role}, **constraints)


# Every field declares its part in a run (tests/test_config.py checks that each one does):
# - identity: defines what is trained; another value is another run (output_dir refuses it, resume cannot mix them)
# - length: how long it trains; a larger value extends a finished run in place (a new run id, a new marker)
# - setting: how it is trained or reported; may change on resume, and config_history.jsonl records each change
def identity(default, description: str, **constraints):
    return _field("identity", default, description, **constraints)


def length(default, description: str, **constraints):
    return _field("length", default, description, **constraints)


def setting(default, description: str, **constraints):
    return _field("setting", default, description, **constraints)


class TrainingConfig(BaseSettings):
    # allow_inf_nan=False: `inf`/`nan` (and 1e999) are not settings: they passed `gt=0` and printed as null.
    model_config = SettingsConfigDict(extra="forbid", validate_default=True, frozen=True, allow_inf_nan=False)

    # --- the tutorial's fields -------------------------------------------------------------------
    image_size: int = identity(128, "side of the square training images, in pixels", gt=0)
    train_batch_size: int = identity(16, "images per process per micro-batch", gt=0)
    eval_batch_size: int = setting(16, "images in each sample grid", gt=0)
    num_epochs: int = length(50, "passes over the dataset (ignored if max_train_steps is set)", gt=0)
    gradient_accumulation_steps: int = setting(
        1, "micro-batches per optimizer update; derived from global_batch_size once a run has one", gt=0)
    learning_rate: float | None = identity(
        None, "peak learning rate after warmup; default per model_preset (tutorial 1e-4, small 1e-3)", gt=0)
    lr_warmup_steps: int | None = identity(
        None, "warmup length in optimizer updates; default per model_preset (tutorial 500, small 100)", ge=0)
    save_image_epochs: int = setting(10, "write a sample grid every N epochs (and at the end)", gt=0)
    save_model_epochs: int = setting(30, "save the pipeline every N epochs (and at the end)", gt=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = identity(
        "no", "autocast precision; fp16 needs CUDA, bf16 works on CUDA and modern CPUs")
    output_dir: Path = setting(Path("ddpm-butterflies-128"), "run folder: pipeline, samples, logs, checkpoints")
    push_to_hub: bool = setting(False, "at the end of `ddpm train`, upload the run as `ddpm push` does (HF_TOKEN)")
    hub_model_id: str | None = setting(None, "Hub repo id; default: output_dir's name (the tutorial's rule)")
    hub_private_repo: bool | None = setting(None, "create the Hub repo private")
    overwrite_output_dir: bool = setting(
        False, "allow starting a different run in output_dir: deletes the old run (only a ddpm-trainer run or an "
        "empty folder)")
    seed: int = identity(0, "seeds init, data order, noise and sample grids", ge=0, le=2**32 - 1)
    global_batch_size: int | None = identity(
        None, "images per optimizer update over all processes, the run's invariant: gradient_accumulation_steps is "
        "derived from it at every start (global / (train_batch_size x processes)), so a run resumes on another "
        "number of GPUs with the same math; default train_batch_size x gradient_accumulation_steps x processes at "
        "the run's first start, kept by the run afterwards", gt=0)

    # --- data ------------------------------------------------------------------------------------
    dataset_name: str = identity(
        "builtin:butterflies", "'builtin:butterflies' (offline), 'imagefolder' (with train_data_dir) or a Hub dataset id",
        min_length=1)
    train_data_dir: Path | None = identity(None, "folder of images when dataset_name is imagefolder")
    builtin_num_images: int = identity(1000, "size of the built-in dataset", gt=0)
    center_crop: bool = identity(False, "center-crop to a square before resizing")
    random_flip: bool = identity(True, "random horizontal flips (drawn per step from the seed)")
    dataloader_num_workers: int | None = setting(
        None, "DataLoader workers per process; default 0 with data_cache, else from the CPUs this process may use", ge=0)
    data_cache: bool = setting(
        True, "decode+resize every image once into a uint8 array on disk, memory-mapped by all ranks and later runs")
    data_cache_dir: Path | None = setting(
        None, "where data_cache lives; default <output_dir>/data_cache (a shared volume path reuses it across runs)")

    # --- length ----------------------------------------------------------------------------------
    max_train_steps: int | None = length(None, "optimizer updates; overrides num_epochs when set", gt=0)

    # --- model and objective ---------------------------------------------------------------------
    model_preset: Literal["tutorial", "small"] = identity(
        "tutorial", "'tutorial': the tutorial's UNet (~114M params); 'small': ~3M params for CPU")
    model_config_name_or_path: str | None = identity(
        None, "UNet2DModel config (folder or config.json) overriding model_preset")
    ddpm_num_steps: int = identity(1000, "diffusion timesteps of the DDPMScheduler", gt=0)
    ddpm_beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = identity(
        "linear", "DDPMScheduler beta schedule")
    prediction_type: Literal["epsilon", "sample", "v_prediction"] | None = identity(
        None, "what the UNet predicts; the loss is MSE against it; default v_prediction with zero_terminal_snr, "
        "else epsilon")

    # --- optimisation ----------------------------------------------------------------------------
    lr_scheduler: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
    ] = identity("cosine", "diffusers get_scheduler name; counts optimizer updates")
    adam_beta1: float = identity(0.9, "AdamW beta1 (torch default, as the tutorial)", ge=0, lt=1)
    adam_beta2: float = identity(0.999, "AdamW beta2", ge=0, lt=1)
    adam_weight_decay: float = identity(1e-2, "AdamW decoupled weight decay", ge=0)
    adam_epsilon: float = identity(1e-8, "AdamW epsilon", gt=0)
    max_grad_norm: float = setting(1.0, "gradient clipping when gradients sync", gt=0)
    use_ema: bool = identity(True, "keep an EMA of the weights; samples and the pipeline use it")
    ema_max_decay: float = setting(0.9999, "EMAModel decay ceiling", gt=0, le=1)
    ema_min_decay: float = setting(0.0, "EMAModel decay floor", ge=0, le=1)
    ema_inv_gamma: float = setting(1.0, "EMAModel warmup inv_gamma", gt=0)
    ema_power: float = setting(0.75, "EMAModel warmup power (3/4 for long runs)", gt=0)
    ema_update_after_step: int = setting(0, "EMAModel starts averaging after N updates", ge=0)

    # --- time to quality (issue 12; docs/PERFORMANCE.md has the measurement behind each default) ---
    max_train_seconds: float | None = length(
        None, "stop after this many seconds of the step loop (steps, periodic grids and checkpoints; summed over "
        "resumes; startup and the final saves not counted), through the normal end (checkpoint, grid, pipeline, "
        "marker); whichever of this and max_train_steps/num_epochs comes first. The LR schedule then runs over the "
        "budget: its progress is the larger of the step and the time fractions", gt=0)
    loss_weighting: Literal["none", "min_snr"] = identity(
        "none", "per-sample loss weights: 'min_snr' = Min-SNR-gamma (Hang et al. 2023), min(SNR, snr_gamma) "
        "divided by SNR (epsilon), SNR+1 (v_prediction) or 1 (sample); 'none' = plain MSE")
    snr_gamma: float = identity(5.0, "the gamma of loss_weighting min_snr (the paper's 5)", gt=0)
    zero_terminal_snr: bool = identity(
        True, "rescale the betas so the last timestep is pure noise (Lin et al. 2024): fixes the mean-brightness "
        "leak of the linear schedule; needs v_prediction or sample (the default becomes v_prediction) and samples "
        "with trailing timestep spacing (saved in the pipeline's scheduler config)")

    # --- evaluation ------------------------------------------------------------------------------
    eval_scheduler: Literal["ddim", "ddpm"] = setting("ddim", "sampler for the sample grids")
    num_inference_steps: int = setting(50, "sampler steps for the sample grids", gt=0)
    ddim_eta: float = setting(
        1.0, "DDIM noise: 1 stochastic (forgiving early in training), 0 deterministic", ge=0, le=1)
    eval_mixed_precision: Literal["no", "fp16", "bf16"] = setting(
        "bf16", "autocast precision for sampling grids (bf16: ~2x faster on CPU with AVX-512 bf16 and on GPUs)")
    eval_quality_images: int = setting(
        32, "images scored at each evaluation (sliced Wasserstein distance to as many training images, TensorBoard "
        "quality/*; README: Sample quality); the grid is the first eval_batch_size of them; 0: off", ge=0)

    # --- speed (docs/PERFORMANCE.md has the measurements behind each default) ---------------------
    optimizer_impl: Literal["fused", "foreach"] = setting(
        "fused", "AdamW kernel; fused also skips non-finite updates on device, foreach needs a host sync for that")
    channels_last: bool = setting(False, "NHWC memory format for the UNet and its inputs")
    torch_compile: bool = setting(False, "torch.compile the UNet (compile time is logged separately)")
    sdpa_attention: bool = setting(
        True, "attention through torch's scaled_dot_product_attention kernels; false: diffusers' plain matmul processor")
    allow_tf32: bool = setting(True, "CUDA: TF32 matmuls/convolutions for fp32 work (Ampere and newer)")
    cudnn_benchmark: bool = setting(True, "CUDA: let cuDNN pick the fastest convolution kernels for the fixed shapes")
    peak_tflops: float | None = setting(
        None, "device peak TFLOP/s for the MFU scalar; default from a table of common GPUs (trainer/model.py)", gt=0)

    # --- logging ---------------------------------------------------------------------------------
    logging_steps: int = setting(10, "optimizer updates between status lines / scalars", gt=0)

    # --- checkpoints and fault tolerance (README: Fault tolerance) -------------------------------
    checkpointing_steps: int = setting(500, "save full training state every N updates", gt=0)
    checkpoints_total_limit: int | None = setting(3, "keep the newest K checkpoints", gt=0)
    resume_from_checkpoint: str = setting(
        "auto", "'auto' (newest intact one if any, else fresh), 'latest' (one must exist), 'none', or a checkpoint "
        "path", min_length=1)
    preemption_grace_seconds: float = setting(
        90.0, "after SIGTERM, exit within this many seconds even if the checkpoint is not done", gt=0)
    preemption_check_steps: int = setting(
        10, "with several processes, optimizer updates between the checks that agree on a SIGTERM (one small "
        "all-reduce each); keep this x step time well under preemption_grace_seconds", gt=0)
    max_nonfinite_steps: int = setting(20, "stop after N consecutive NaN/inf losses", gt=0)
    process_group_timeout_seconds: int = setting(1800, "torch.distributed collective timeout", gt=0)
    stall_timeout_seconds: float | None = setting(
        3600.0, "end a process whose training makes no progress (an optimizer update, a sampler step of an "
        "evaluation, a save finished) for this long: exit 124, a Warning Event Stalled; counted from the start of the "
        "step loop, not during start-up; null or 0: off", ge=0)

    @field_validator("output_dir", mode="before")
    @classmethod
    def _output_dir_not_empty(cls, value):
        if isinstance(value, str) and not value.strip():
            raise ValueError("must not be empty: give the run folder, e.g. runs/butterflies ('.' for this folder)")
        return value

    @model_validator(mode="after")
    def _fill_dependent_defaults(self):
        """Fields left unset (None) whose default depends on other fields: the LR and its warmup on the model, the
        prediction type on the noise schedule. The resolved config (training_config.yaml) holds the values."""
        preset = "tutorial" if self.model_config_name_or_path else self.model_preset
        filled = {name: value for name, value in PRESET_DEFAULTS[preset].items() if getattr(self, name) is None}
        if self.prediction_type is None:
            filled["prediction_type"] = "v_prediction" if self.zero_terminal_snr else "epsilon"
        for name, value in filled.items():
            object.__setattr__(self, name, value)  # frozen: set once, while validating
        return self

    # --- derived values --------------------------------------------------------------------------
    @property
    def hub_repo_id(self) -> str:
        """The tutorial's rule: hub_model_id, else the output folder's name."""
        return self.hub_model_id or Path(self.output_dir).name

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, **_sources):
        # load_config() runs the real sources itself (to track provenance); the constructor takes values only.
        return (init_settings,)


FIELDS = tuple(TrainingConfig.model_fields)


def run_role(name: str) -> str | None:
    return (TrainingConfig.model_fields[name].json_schema_extra or {}).get("run")


# A field without a role would be silently left out of the run's digest and of the output_dir check: refuse to load.
if undeclared := [name for name in FIELDS if run_role(name) not in RUN_ROLES]:
    raise TypeError(f"TrainingConfig fields without a run role ({', '.join(RUN_ROLES)}): {', '.join(undeclared)}")
RUN_IDENTITY_FIELDS = tuple(name for name in FIELDS if run_role(name) == "identity")  # another value: another run
RUN_LENGTH_FIELDS = tuple(name for name in FIELDS if run_role(name) == "length")
