"""Loading the config: defaults < YAML file < DDPM_* env < CLI flags, and every problem with it reported at once.

`load_config` runs pydantic-settings' own sources (YAML, env, CLI) separately so it can remember where every value
came from (`ddpm config`), reject unknown keys with a suggestion, and report every problem at once: the fields'
own constraints (trainer.config) and the checks of values against each other (cross_field_problems).
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import reprlib
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_settings import CliSettingsSource, EnvSettingsSource, InitSettingsSource

from trainer.config import FIELDS, TrainingConfig
from trainer.errors import ConfigError
from trainer.model import downsampling_factor

ENV_PREFIX = "DDPM_"
CONFIG_FILE_ENV = "DDPM_CONFIG_FILE"

# Bounds on a config file (issue 17): a config is a few dozen `field: value` lines, so anything near these limits is
# the wrong file or an attack (a YAML alias bomb of 300 bytes expands to hundreds of millions of values).
MAX_CONFIG_BYTES = 1 << 20  # read at most this much (parsing 1 MiB takes under a second)
MAX_CONFIG_VALUES = 10_000  # YAML values once aliases are expanded
MAX_ECHO_CHARS = 200  # of a rejected value shown back in an error message

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
