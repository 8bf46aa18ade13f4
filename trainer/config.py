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
import reprlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    CliSettingsSource,
    EnvSettingsSource,
    InitSettingsSource,
    SettingsConfigDict,
)

from trainer.errors import ConfigError

ENV_PREFIX = "DDPM_"
CONFIG_FILE_ENV = "DDPM_CONFIG_FILE"

# Bounds on a config file (issue 17): a config is a few dozen `field: value` lines, so anything near these limits is
# the wrong file or an attack (a YAML alias bomb of 300 bytes expands to hundreds of millions of values).
MAX_CONFIG_BYTES = 1 << 20  # read at most this much (parsing 1 MiB takes under a second)
MAX_CONFIG_VALUES = 10_000  # YAML values once aliases are expanded
MAX_ECHO_CHARS = 200  # of a rejected value shown back in an error message

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
        None, "device peak TFLOP/s for the MFU scalar; default from a table of common GPUs (trainer/perf.py)", gt=0)

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


def _read_config_file(path: Path, origin: str) -> tuple[dict | None, list[str]]:
    """The YAML mapping in `path`, or None and the reason, worded for the user. The file is opened and read once
    (a pipe, `<(envsubst < t.yaml)` or /dev/stdin, cannot be read twice) and at most MAX_CONFIG_BYTES of it."""
    where = f"config file {path} (from {origin})"
    if path.is_dir():
        return None, [f"{where} is a directory; give the YAML file inside it"]
    if not path.exists():
        return None, [f"{where} does not exist"]
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        return None, [f"{where} cannot be read: {e.strerror or e}"]
    if len(data) > MAX_CONFIG_BYTES:
        return None, [f"{where} is larger than 1 MiB; a config is a few dozen `field: value` lines: is it the right "
                      "file?"]
    try:
        raw = _parse_yaml(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        return None, [f"{where} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8 YAML"]
    except yaml.YAMLError as e:
        return None, [f"{where} is not valid YAML: {e}"]
    except ConfigFileTooLarge as e:
        return None, [f"{where} {e}"]
    raw = raw or {}
    if not isinstance(raw, dict):
        return None, [f"{where} must be a mapping of field: value, got {type(raw).__name__}"]
    return raw, []


class ConfigFileTooLarge(Exception):
    """A YAML document that would expand (through aliases) or nest beyond what a config can be."""


MAX_CONFIG_DEPTH = 32  # nested collections; a config has one level (libyaml's composer recurses in C: no limit)


def _parse_yaml(text: str):
    """yaml.safe_load, refusing a document nested deeper than MAX_CONFIG_DEPTH or of more than MAX_CONFIG_VALUES
    values once its aliases are expanded. A first pass over the parser's events (no recursion, ~0.3 s for 1 MiB)
    bounds the depth and the number of nodes; then the node graph is composed (aliases stay shared references
    there) and its expanded size counted before anything is constructed."""
    loader_class = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: ~4x faster on a large file
    loader = loader_class(text)
    try:
        depth = events = 0
        while loader.check_event():
            event = loader.get_event()
            events += 1
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_CONFIG_DEPTH:
                    raise ConfigFileTooLarge(f"nests collections more than {MAX_CONFIG_DEPTH} deep; a config is a flat "
                                             "mapping of field: value")
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
            if events > 2 * MAX_CONFIG_VALUES + 10:
                raise ConfigFileTooLarge(f"holds more than {MAX_CONFIG_VALUES:,} values; a config is a flat mapping "
                                         "of field: value")
    finally:
        loader.dispose()
    loader = loader_class(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, MAX_CONFIG_VALUES) > MAX_CONFIG_VALUES:
            raise ConfigFileTooLarge(f"expands to more than {MAX_CONFIG_VALUES:,} values (YAML anchors and aliases "
                                     "repeat whole subtrees); a config is a flat mapping of field: value")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _expanded_size(root, limit: int) -> int:
    """How many values `root` stands for with every alias expanded (counting stops past `limit`; a node that
    contains itself, `a: &a [*a]`, counts as past it). Each node's size is computed once (memoised): a node reached
    through an alias is counted again, but not walked again."""

    def children(node) -> list:
        if isinstance(node, yaml.MappingNode):
            return [item for pair in node.value for item in pair]
        return list(node.value) if isinstance(node, yaml.SequenceNode) else []

    sizes: dict[int, int] = {}
    walking: set[int] = set()  # the nodes whose subtree is being walked: meeting one again is a cycle
    stack = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if children_done:
            walking.discard(id(node))
            sizes[id(node)] = min(limit + 1, 1 + sum(sizes[id(child)] for child in children(node)))
        elif id(node) in walking:
            return limit + 1
        elif id(node) not in sizes:
            walking.add(id(node))
            stack.append((node, True))
            stack.extend((child, False) for child in children(node) if id(child) not in sizes)
    return sizes[id(root)]


_ECHO = reprlib.Repr()  # bounded at every level, so a huge or deeply shared value costs microseconds
_ECHO.maxlevel, _ECHO.maxlist, _ECHO.maxdict = 2, 4, 4
_ECHO.maxstring = _ECHO.maxother = _ECHO.maxlong = MAX_ECHO_CHARS


def _shown(value: Any) -> str:
    """repr(value), bounded: a rejected value is echoed so the user can find it, never megabytes of it."""
    text = _ECHO.repr(value)
    return text if len(text) <= MAX_ECHO_CHARS else text[:MAX_ECHO_CHARS - 3] + "..."


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
        origin = "--config" if getattr(parsed, "config", None) else CONFIG_FILE_ENV
        raw, file_problems = _read_config_file(Path(config_file), origin)
        problems += file_problems
        if raw is not None:
            for key in raw:
                if key not in FIELDS:
                    problems.append(f"unknown key '{key}' in {config_file}{_suggest(str(key))}")
            known = InitSettingsSource(TrainingConfig, raw)()  # the mapping read above: the file is not read again
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
            given = f" (got {_shown(err['input'])} from {sources.get(field, '?')})" if "input" in err else ""
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
    from trainer.model import unet_build_problem, unet_config

    where = f"model_config_name_or_path {config.model_config_name_or_path}"
    try:
        blocks = unet_config(config)["down_block_types"]
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError([f"{where}: cannot read a UNet2DModel config: {e}"]) from e
    if config.model_config_name_or_path and (problem := unet_build_problem(config)):
        raise ConfigError([f"{where}: diffusers cannot build a UNet2DModel from it ({problem})"])
    return 2 ** (len(blocks) - 1)


def repo_id_problem(repo_id: str) -> str | None:
    """Why `repo_id` is not a Hub repo id ('name' or 'owner/name'), in huggingface_hub's words; None if it is."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        return str(e).split(". Use `repo_type`")[0]
    return None


IMAGEFOLDER_HINT = "for a folder of images use dataset_name: imagefolder with train_data_dir: <the folder>"


def dataset_name_problems(name: str) -> list[str]:
    """A Hub dataset id, deliberately not a path: datasets.load_dataset would read a local folder of that name
    instead (or fail with a traceback for a path that does not exist)."""
    if name == "imagefolder" or name.startswith("builtin:"):
        return []
    if repo_id_problem(name):
        return [f"dataset_name '{name}' is not a Hub dataset id (name or owner/name: letters, digits, '-', '_', "
                f"'.'); {IMAGEFOLDER_HINT}"]
    if Path(name).exists():
        return [f"dataset_name '{name}' is also a local folder here, which datasets would read instead of the Hub "
                f"dataset; {IMAGEFOLDER_HINT}, or run from another folder to use the Hub dataset"]
    return []


def hub_repo_id_problems(config: TrainingConfig, pushing: bool) -> list[str]:
    """hub_model_id when set, and the repo id a push would use (the tutorial's rule: output_dir's name)."""
    if not (pushing or config.hub_model_id):
        return []
    problem = repo_id_problem(config.hub_repo_id)
    if problem is None:
        return []
    what = (f"hub_model_id '{config.hub_model_id}'" if config.hub_model_id else
            f"the Hub repo id '{config.hub_repo_id}' (output_dir's name, as hub_model_id is not set)")
    return [f"{what} is not a valid Hub repo id ({problem}); set hub_model_id to name or owner/name"]


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
    problems += dataset_name_problems(config.dataset_name)
    problems += hub_repo_id_problems(config, pushing=config.push_to_hub)
    if config.global_batch_size is not None and config.global_batch_size % config.train_batch_size:
        problems.append(f"global_batch_size {config.global_batch_size} must be a multiple of train_batch_size "
                        f"{config.train_batch_size} (it is split into micro-batches of that size)")
    problems += time_to_quality_problems(config)
    if config.eval_quality_images == 1:
        problems.append("eval_quality_images must be 0 (off) or at least 2 (a distance between sets of images)")
    problems += sampler_steps_problems("num_inference_steps", config.num_inference_steps, config.ddpm_num_steps,
                                       f"ddpm_num_steps {config.ddpm_num_steps}")
    if config.resume_from_checkpoint not in ("auto", "latest", "none") and not Path(config.resume_from_checkpoint).is_dir():
        problems.append(
            f"resume_from_checkpoint '{config.resume_from_checkpoint}' is not a checkpoint folder; use auto, latest, none or a path"
        )
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        problems.append(f"output_dir {out} is a file, not a folder; choose a folder path (it is created if missing)")
    return problems


def sampler_steps_problems(steps_name: str, steps: int, timesteps: int, timesteps_are: str) -> list[str]:
    """Both samplers' set_timesteps (diffusers' DDIMScheduler and DDPMScheduler, every timestep_spacing) raise
    when asked for more steps than the schedule has timesteps; anything in [1, timesteps] runs."""
    if steps > timesteps:
        return [f"{steps_name} {steps} exceeds {timesteps_are}: a sampler takes at most one step per diffusion "
                f"timestep; use at most {timesteps}"]
    return []


def time_to_quality_problems(config: TrainingConfig) -> list[str]:
    problems = []
    if config.zero_terminal_snr and config.prediction_type == "epsilon":
        problems.append("zero_terminal_snr needs prediction_type v_prediction or sample: at the last timestep the "
                        "input is pure noise, so predicting the noise says nothing about the image")
    if config.max_train_seconds is not None and config.lr_scheduler not in BUDGET_LR_SCHEDULES:
        problems.append(f"lr_scheduler {config.lr_scheduler} cannot follow a time budget (max_train_seconds); use "
                        f"one of {', '.join(BUDGET_LR_SCHEDULES)}")
    return problems


BUDGET_LR_SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup")


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
