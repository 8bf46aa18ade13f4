"""What lands in output_dir besides checkpoints: the resolved config, the pipeline, the model card, the marker.

Layout (the tutorial's, plus run metadata):
  model_index.json, unet/, scheduler/   DDPMPipeline.save_pretrained (EMA weights)
  README.md                              model card
  samples/<epoch:04d>.png                sample grids
  logs/                                  TensorBoard
  checkpoints/checkpoint-<step>/         full training state (trainer.checkpoint)
  training_config.yaml                   the resolved config of this run
  training_complete.json                 written last, when the run finished (the push Job waits for it)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import yaml
from huggingface_hub import ModelCard, ModelCardData

from trainer.config import RESOLVED_CONFIG_NAME, RUN_IDENTITY_FIELDS, ConfigError, TrainingConfig, config_yaml

COMPLETE_MARKER = "training_complete.json"


def _identity(values: dict) -> dict:
    return {k: values.get(k) for k in RUN_IDENTITY_FIELDS}


def check_output_dir(config: TrainingConfig) -> bool:
    """Read-only check run on every rank. Returns True when an old, different run must be cleared first."""
    out = Path(config.output_dir)
    if not out.exists() or not any(out.iterdir()):
        return False
    saved = out / RESOLVED_CONFIG_NAME
    mine = _identity(json.loads(config.model_dump_json()))
    if saved.is_file():
        theirs = _identity(yaml.safe_load(saved.read_text()) or {})
        diff = [f"{k}: {theirs[k]!r} -> {mine[k]!r}" for k in RUN_IDENTITY_FIELDS if theirs[k] != mine[k]]
        if not diff:
            return False  # the same run: resume or continue in place
        what = f"holds a different run ({'; '.join(diff)})"
    else:
        what = f"is not empty and holds no {RESOLVED_CONFIG_NAME} (not a ddpm-trainer run)"
    if not config.overwrite_output_dir:
        raise ConfigError([
            f"output_dir {out} {what}; choose another output_dir, or set overwrite_output_dir true to delete it"
        ])
    return True


def clear_output_dir(config: TrainingConfig) -> None:
    for child in Path(config.output_dir).iterdir():
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


def preflight(config: TrainingConfig, checkpoint_bytes: int) -> None:
    """Fail before training if output_dir cannot be written or cannot hold one more checkpoint."""
    out = Path(config.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ConfigError([f"output_dir {out} is not writable: {e}; fix the volume's permissions (fsGroup) or path"]) from e
    free = shutil.disk_usage(out).free
    if free < checkpoint_bytes:
        raise ConfigError([
            f"output_dir {out} has {free / 2**20:.0f} MiB free but a checkpoint needs about "
            f"{checkpoint_bytes / 2**20:.0f} MiB; free space or use a bigger volume"
        ])


def write_resolved_config(config: TrainingConfig) -> Path:
    path = Path(config.output_dir) / RESOLVED_CONFIG_NAME
    path.write_text(config_yaml(config))
    return path


def save_pipeline(config: TrainingConfig, unet, scheduler) -> None:
    from diffusers import DDPMPipeline

    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(config.output_dir)


def write_model_card(config: TrainingConfig, last_grid: Path | None, global_step: int) -> Path:
    hub_dataset = not (config.dataset_name.startswith("builtin:") or config.dataset_name == "imagefolder")
    data = ModelCardData(
        library_name="diffusers",
        license="apache-2.0",
        tags=["pytorch", "diffusers", "unconditional-image-generation", "ddpm-trainer"],
        datasets=[config.dataset_name] if hub_dataset else None,
    )
    grid = f"![samples]({last_grid.relative_to(config.output_dir).as_posix()})\n" if last_grid else ""
    content = f"""---
{data.to_yaml()}
---

# {config.hub_repo_id}

An unconditional image diffusion model (DDPM) trained with ddpm-trainer on `{config.dataset_name}`
at {config.image_size}x{config.image_size} for {global_step} optimizer steps.

{grid}
## Usage

```python
from diffusers import DDPMPipeline

pipeline = DDPMPipeline.from_pretrained("{config.hub_repo_id}")
image = pipeline().images[0]
```

## Training configuration

```yaml
{config_yaml(config).strip()}
```
"""
    path = Path(config.output_dir) / "README.md"
    ModelCard(content).save(path)
    return path


def write_complete_marker(config: TrainingConfig, global_step: int, epoch: int) -> Path:
    path = Path(config.output_dir) / COMPLETE_MARKER
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"global_step": global_step, "epoch": epoch, "finished_at": time.time()}))
    os.replace(tmp, path)
    return path
