"""output_dir as one object: where each of a run's files lives, and every reader and writer of those files.

Layout (the tutorial's, plus the run's record):
  model_index.json, unet/, scheduler/   DDPMPipeline.save_pretrained (EMA weights)
  README.md                              model card
  samples/<epoch:04d>.png                sample grids
  logs/                                  TensorBoard
  checkpoints/checkpoint-<step>/         full training state (trainer.checkpoint writes inside)
  training_config.yaml                   the resolved config in effect now
  config_history.jsonl                   every resolved config of the run, with the step it took effect
  training_complete.json                 written last, when the run finished (the push waits for it)
  data_cache/                            the decoded-image cache, unless data_cache_dir points elsewhere
  .ddpm-train.lock                       held by the running trainer (trainer.outputs.OutputDirLock)

Built once by `ddpm train` (trainer.setup) from the config, and by the commands that read a finished run (`ddpm
push`, `eval`, `sample`, `wait-for-training`). Whether a run may use the folder, and clearing an old one, is
trainer.outputs; what the record means (run id, completion) is the last section here. Every file is written whole
or not at all (a temporary name, then a rename), and a full disk is the exit-2 error that says so.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import resource
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import yaml

from trainer.config import RUN_IDENTITY_FIELDS, RUN_LENGTH_FIELDS, TrainingConfig
from trainer.errors import Diverged, OutputDirError, causes

CONFIG_NAME = "training_config.yaml"
HISTORY_NAME = "config_history.jsonl"
COMPLETE_MARKER = "training_complete.json"
LOCK_NAME = ".ddpm-train.lock"
DATA_CACHE_NAME = "data_cache"
MODEL_CARD_NAME = "README.md"
PIPELINE_INDEX = "model_index.json"
PIPELINE_FOLDERS = ("unet", "scheduler")  # with the index: what DDPMPipeline.save_pretrained writes
PIPELINE_ENTRIES = (PIPELINE_INDEX, *PIPELINE_FOLDERS)
SAMPLES_NAME, LOGS_NAME, CHECKPOINTS_NAME = "samples", "logs", "checkpoints"
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")  # a complete checkpoint's folder (others are .tmp-, damaged-, ...)
TRACKER_RUN_NAME = "train"  # accelerator.init_trackers(TRACKER_RUN_NAME): TensorBoard writes under logs/train/
PIPELINE_TMP = ".tmp-pipeline"  # save_pretrained writes here, then each part is renamed into place
GRID_NAME = re.compile(r"\d{4,}\.png")  # samples/<epoch:04d>.png; a user's samples/my.png is not one of ours


def temporary(name: str) -> str:
    """The name under which `name` (one of our top-level files) is written before it is renamed into place."""
    return f".tmp-{name}"


def replaced(name: str) -> str:
    """Where save_pipeline moves the previous `name` (a pipeline entry) while the new one is renamed in."""
    return f".tmp-old-{name}"


# Half-written entries of ours (atomic writes that were interrupted), by exact name: a user's `.tmp-notes.txt` is
# not ours, so it is neither removed at start nor taken for part of a run.
TEMPORARIES = frozenset({
    PIPELINE_TMP, *map(replaced, PIPELINE_ENTRIES),
    *map(temporary, (CONFIG_NAME, COMPLETE_MARKER, MODEL_CARD_NAME)),
})


@dataclass(frozen=True)
class RunDir:
    root: Path
    data_cache_dir: Path | None = None  # the config's data_cache_dir when the cache lives elsewhere

    @classmethod
    def of(cls, config: TrainingConfig) -> "RunDir":
        return cls(Path(config.output_dir), Path(config.data_cache_dir) if config.data_cache_dir else None)

    # ---- the layout --------------------------------------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.root / CONFIG_NAME

    @property
    def history_file(self) -> Path:
        return self.root / HISTORY_NAME

    @property
    def marker_file(self) -> Path:
        return self.root / COMPLETE_MARKER

    @property
    def lock_file(self) -> Path:
        return self.root / LOCK_NAME

    @property
    def model_card(self) -> Path:
        return self.root / MODEL_CARD_NAME

    @property
    def samples(self) -> Path:
        return self.root / SAMPLES_NAME

    @property
    def logs(self) -> Path:
        return self.root / LOGS_NAME

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS_NAME

    @property
    def data_cache(self) -> Path:
        return self.data_cache_dir or self.root / DATA_CACHE_NAME

    @property
    def unet(self) -> Path:
        return self.root / PIPELINE_FOLDERS[0]

    def has_pipeline(self) -> bool:
        return (self.root / PIPELINE_INDEX).is_file()

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"checkpoint-{step}"  # CHECKPOINT_NAME

    def grid(self, epoch: int) -> Path:
        return self.samples / f"{epoch:04d}.png"

    # ---- the resolved config -------------------------------------------------------------------------------------
    def saved_config(self) -> dict | None:
        """training_config.yaml as a mapping, None when there is none. Unreadable or not a mapping: OutputDirError
        (exit 2), the same for every reader: the user must move it away, nothing here can guess the run."""
        path = self.config_file
        if not path.is_file():
            return None
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise OutputDirError(f"{path} cannot be read ({e}); move it away or choose another output_dir") from e
        if not isinstance(values, dict):
            raise OutputDirError(f"{path} is not a ddpm-trainer config (a YAML mapping); move it away or choose "
                                 "another output_dir")
        return values

    def write_config(self, config: TrainingConfig) -> Path:
        path, tmp = self.config_file, self.root / temporary(CONFIG_NAME)
        tmp.write_text(config_yaml(config))
        os.replace(tmp, path)
        return path

    def run_config(self) -> dict | None:
        """The config of the run recorded here: training_config.yaml, else (a start that stopped between its two
        records) the newest history entry's; None when neither says."""
        saved = self.saved_config()
        if saved is not None:
            return saved
        history = self.read_history()
        return (history[-1].get("config") or None) if history else None

    def run_global_batch(self, config: TrainingConfig) -> int | None:
        """The global batch of the run recorded here when `config` is that run (every other run-defining field
        equal): a run keeps the global batch it started with, whatever the number of processes now."""
        saved = self.run_config() or {}
        mine = json.loads(config.model_dump_json())
        same_run = saved and all(saved.get(k) == mine[k] for k in RUN_IDENTITY_FIELDS if k != "global_batch_size")
        return saved.get("global_batch_size") if same_run else None

    # ---- the history and the completion marker -------------------------------------------------------------------
    def read_history(self) -> list[dict]:
        if not self.history_file.is_file():
            return []
        entries = []
        for line in self.history_file.read_text().splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue  # a line cut short by a crash mid-append: the others still tell the story
        return entries

    def append_history(self, entry: dict) -> None:
        with open(self.history_file, "a") as f:
            f.write(json.dumps(entry, sort_keys=True, separators=(",", ":"), default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_marker(self) -> dict | None:
        """The marker, or None when there is none (or it is unreadable: then the run is not known to be complete)."""
        try:
            marker = json.loads(self.marker_file.read_text())
        except (OSError, ValueError):
            return None
        return marker if isinstance(marker, dict) else None

    def write_marker(self, marker: dict) -> Path:
        path, tmp = self.marker_file, self.root / temporary(COMPLETE_MARKER)
        tmp.write_text(json.dumps(marker, indent=1))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path

    def remove_marker(self) -> None:
        self.marker_file.unlink(missing_ok=True)

    # ---- the pipeline ------------------------------------------------------------------------------------------
    def pipeline_files(self) -> list[str]:
        files = []
        for entry in PIPELINE_ENTRIES:
            path = self.root / entry
            files += [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        return [p.relative_to(self.root).as_posix() for p in files]

    def pipeline_hashes(self) -> dict[str, str]:
        return {name: sha256_file(self.root / name) for name in self.pipeline_files()}

    def pipeline_mismatch(self, marker: dict) -> str:
        """'' when the pipeline files are exactly those the marker lists, else what differs."""
        expected = marker.get("pipeline") or {}
        present = self.pipeline_files()
        if not expected:
            return "the marker lists no pipeline files (written by an older ddpm-trainer?)"
        missing = sorted(set(expected) - set(present))
        extra = sorted(set(present) - set(expected))
        if missing or extra:
            return f"pipeline files differ from the marker's (missing {missing or 'none'}, unexpected {extra or 'none'})"
        changed = [name for name in sorted(expected) if sha256_file(self.root / name) != expected[name]]
        return f"{', '.join(changed)} changed since the run finished" if changed else ""

    def unet_config(self) -> dict:
        return json.loads((self.unet / "config.json").read_text())

    def save_pipeline(self, unet, scheduler) -> None:
        """DDPMPipeline.save_pretrained into a temporary folder, then each part renamed into place: a reader never
        sees a half-written weights file. Refuses non-finite weights: they would be a broken model on the Hub."""
        from diffusers import DDPMPipeline

        if not all_finite(unet.parameters()):
            raise Diverged("the model's weights hold NaN/inf values: no pipeline was saved (lower learning_rate, or "
                           "resume from an earlier checkpoint)")
        tmp = self.root / PIPELINE_TMP
        shutil.rmtree(tmp, ignore_errors=True)
        needed = sum(p.numel() * p.element_size() for p in unet.parameters())
        with writing("the pipeline", self.root, needed, temporary_path=tmp):  # a full disk: the previous one stays
            DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp)
        for name in PIPELINE_ENTRIES:
            target, old = self.root / name, self.root / replaced(name)
            if target.exists():
                os.replace(target, old)
            os.replace(tmp / name, target)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)

    # ---- sample grids and the model card -------------------------------------------------------------------------
    def save_grid(self, grid, epoch: int) -> Path:
        """A sample grid, written whole or not at all (a full disk leaves no half PNG, and says so)."""
        path = self.grid(epoch)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(temporary(path.name))
        with writing(f"sample grid {path.name}", path, 0, temporary_path=tmp):
            grid.save(tmp, format="PNG")
            os.replace(tmp, path)
        return path

    def last_grid(self) -> Path | None:
        """The newest sample grid the run wrote (highest epoch), never a user's image that sits next to them."""
        grids = [p for p in self.samples.glob("*.png") if GRID_NAME.fullmatch(p.name)] if self.samples.is_dir() else []
        return max(grids, key=lambda p: int(p.stem)) if grids else None

    def write_model_card(self, config: TrainingConfig, global_step: int, last_grid: Path | None) -> Path:
        """README.md: what the model is, the last sample grid (`last_grid`), how to load it, the config it used."""
        from huggingface_hub import ModelCard, ModelCardData

        hub_dataset = not (config.dataset_name.startswith("builtin:") or config.dataset_name == "imagefolder")
        data = ModelCardData(
            library_name="diffusers",
            license="apache-2.0",
            tags=["pytorch", "diffusers", "unconditional-image-generation", "ddpm-trainer"],
            datasets=[config.dataset_name] if hub_dataset else None,
        )
        grid = f"![samples]({last_grid.relative_to(self.root).as_posix()})\n" if last_grid else ""
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
        path = self.model_card
        tmp = path.with_name(temporary(path.name))
        with writing("the model card", path, len(content.encode()), temporary_path=tmp):
            ModelCard(content).save(tmp)
            os.replace(tmp, path)
        return path

    def remove_temporary(self) -> None:
        """Leftovers of our interrupted atomic writes at the top of output_dir (checkpoints clean their own)."""
        for name in sorted(TEMPORARIES):
            path = self.root / name
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() and not path.is_symlink() \
                else path.unlink(missing_ok=True)


def config_yaml(config: TrainingConfig, sources: dict[str, str] | None = None) -> str:
    """The effective config as YAML: training_config.yaml's content; with sources (`ddpm config`), each line ends
    with '# <source>'."""
    values = json.loads(config.model_dump_json())
    if sources is None:
        return yaml.safe_dump(values, sort_keys=False)
    width = max(len(yaml.safe_dump({k: v}).strip()) for k, v in values.items())
    lines = []
    for key, value in values.items():
        line = yaml.safe_dump({key: value}, default_flow_style=True, width=10_000).strip().strip("{}")
        lines.append(f"{line:<{width}}  # {sources[key]}")
    return "\n".join(lines) + "\n"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def all_finite(tensors) -> bool:
    import torch

    return all(bool(torch.isfinite(t).all()) for t in tensors)


# ---- a full disk while writing: the exit-2 error that says so ----------------------------------------------------

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no room: on the device, in the quota, under ulimit -f
# torch.save's zip writer reports a failed write without its errno ("unexpected pos ...", "iostream error")
_TORCH_WRITE_FAILED = ("PytorchStreamWriter", "inline_container", "iostream error", "file write failed")


def nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def disk_full(error: BaseException, what: str, path: Path, needed_bytes: int) -> OutputDirError | None:
    """The user-facing error (exit 2) when writing `what` to `path` failed for want of room, else None. Whichever
    library wrote: an OSError's errno, or the errno in the message of an error that wraps it (safetensors raises
    SafetensorError '... (os error 28)'), anywhere in the chain of causes; torch's writer, which loses the errno,
    when the volume or the file size limit leaves less than `needed_bytes`."""
    code = _full_errno(error)
    base = nearest_existing(Path(path))
    free = shutil.disk_usage(base).free
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if code is None and any(marker in text for text in _chain_texts(error) for marker in _TORCH_WRITE_FAILED):
        code = errno.EFBIG if limit != resource.RLIM_INFINITY and limit < needed_bytes else \
            errno.ENOSPC if free < needed_bytes else None
    if code is None:
        return None
    reason = "" if code == errno.ENOSPC else f" ({os.strerror(code)}" + (
        f": the file size limit (ulimit -f) is {_size(limit)})" if code == errno.EFBIG and
        limit != resource.RLIM_INFINITY else ")")
    return OutputDirError(f"no space left on device while writing {what} to {path}{reason}: {free / 2**20:.0f} MiB "
                          f"free, it needs about {needed_bytes / 2**20:.0f} MiB; free space or use a bigger volume"
                          + (", or raise the file size limit" if code == errno.EFBIG else "")
                          + " (the newest complete checkpoint is intact)")


def _size(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def _chain_texts(error: BaseException):
    return [str(e) for e in causes(error)]


def _full_errno(error: BaseException) -> int | None:
    for e in causes(error):
        if getattr(e, "errno", None) in FULL_ERRNOS:
            return e.errno
        text = str(e)
        for code in FULL_ERRNOS:
            if f"os error {code})" in text or os.strerror(code) in text:
                return code
    return None


@contextmanager
def writing(what: str, path: Path, needed_bytes: int = 0, temporary_path: Path | None = None):
    """Around a write into output_dir: a failure removes `temporary_path` (what it was writing), and a full disk
    becomes the exit-2 error that says so instead of a traceback."""
    try:
        yield
    except Exception as e:
        if temporary_path is not None:
            shutil.rmtree(temporary_path, ignore_errors=True) if temporary_path.is_dir() and not \
                temporary_path.is_symlink() else temporary_path.unlink(missing_ok=True)
        full = disk_full(e, what, path, needed_bytes)
        if full is not None:
            raise full from e
        raise

# ---- the run's record: config history, run id, completion marker ------------------------------------------------------
# The run's record in output_dir: which config each part of the run used, the run's id, and the completion marker.
#
# - config_history.jsonl: one line per start that changed anything (a new run, an extension, a changed setting on
#   resume), with the step from which it applies, so a run that changed `max_grad_norm` half-way says so.
# - The run id: a hash of what the run trains and for how long (identity and length fields), the time it started and
#   the Kubernetes workload it runs in, if any. Resuming keeps it; a new run or an extension gets a new one.
# - training_complete.json: removed when training starts, written last when it has finished, with the run id, the
#   final step and a SHA-256 of every pipeline file. `ddpm push` and `ddpm wait-for-training` upload or accept a
#   pipeline only if it is the one the marker describes, so a push can never send the model of a run that has since
#   been extended or replaced.

KUBERNETES_ENV = {"namespace": "POD_NAMESPACE", "pod": "POD_NAME", "pod_uid": "POD_UID",
                  "workload": "TRAINING_WORKLOAD"}  # the chart sets these (downward API and a literal)


def _json(values) -> str:
    return json.dumps(values, sort_keys=True, separators=(",", ":"), default=str)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def config_values(config: TrainingConfig) -> dict:
    return json.loads(config.model_dump_json())


def run_digest(config: TrainingConfig) -> str:
    """What the run trains and for how long: equal digests mean the same target."""
    values = config_values(config)
    wanted = {k: values[k] for k in (*RUN_IDENTITY_FIELDS, *RUN_LENGTH_FIELDS)}
    return hashlib.sha256(_json(wanted).encode()).hexdigest()[:16]


def kubernetes_workload(environ: dict[str, str] | None = None) -> dict[str, str]:
    environ = os.environ if environ is None else environ
    return {key: environ[var] for key, var in KUBERNETES_ENV.items() if environ.get(var)}


@dataclass(frozen=True)
class RecordedStart:
    run_id: str
    started_at: str
    changes: dict  # field -> [old, new] since the previous start, empty when nothing changed or the run is new


def record_start(config: TrainingConfig, run_dir: RunDir, step: int, environ: dict[str, str] | None = None,
                 branch: dict | None = None) -> RecordedStart:
    """Rank 0, once every check has passed and before training: record the config in effect from `step` (and the
    rollback it continues, `branch`: trainer.checkpoint), write training_config.yaml and remove the completion
    marker. Returns the run's id (kept on resume)."""
    values, digest = config_values(config), run_digest(config)
    kubernetes = kubernetes_workload(environ)
    history = run_dir.read_history()
    last = history[-1] if history else None
    if last and last.get("run_digest") == digest:
        run_id, started_at = last["run_id"], last["run_started_at"]
    else:
        started_at = _now()
        seed = _json({"run": digest, "started_at": started_at, "workload": [kubernetes.get("namespace"),
                                                                            kubernetes.get("workload")]})
        run_id = hashlib.sha256(seed.encode()).hexdigest()[:16]
    previous = last["config"] if last else {}
    changes = {k: [previous.get(k), v] for k, v in values.items() if last and previous.get(k) != v}
    if last is None or changes or last.get("run_id") != run_id or last.get("branch") != branch:
        entry = {"step": step, "time": _now(), "run_id": run_id, "run_started_at": started_at, "run_digest": digest,
                 "changes": changes, "config": values, "kubernetes": kubernetes}
        if branch is not None:
            entry["branch"] = branch
        run_dir.append_history(entry)
    run_dir.write_config(config)
    run_dir.remove_marker()
    return RecordedStart(run_id, started_at, changes)


# ---- the completion marker --------------------------------------------------------------------------------------

def write_marker(config: TrainingConfig, run_dir: RunDir, record: RecordedStart, global_step: int, epoch: int,
                 environ: dict[str, str] | None = None) -> Path:
    """Written last, after the pipeline: its presence means the run finished and the pipeline is its result."""
    return run_dir.write_marker({"run_id": record.run_id, "run_started_at": record.started_at, "run_digest": run_digest(config),
              "global_step": global_step, "epoch": epoch, "finished_at": time.time(),
              "kubernetes": kubernetes_workload(environ), "pipeline": run_dir.pipeline_hashes()})


def marker_matches(config: TrainingConfig, run_dir: RunDir, workload: str | None = None) -> tuple[bool, str]:
    """For the push gate: whether output_dir holds the finished result of the run this config describes
    (same identity and length, and when `workload` is given, trained by that Kubernetes workload)."""
    out = run_dir.root
    marker = run_dir.read_marker()
    if marker is None:
        return False, f"no completion marker in {out} yet"
    if config.global_batch_size is None:  # as the trainer resolved it: the run's own (trainer.setup.with_global_batch)
        try:
            config = config.model_copy(update={"global_batch_size": run_dir.run_global_batch(config)})
        except OutputDirError as e:  # the trainer refuses such a folder too: this config's run cannot finish there
            return False, str(e)
    if marker.get("run_digest") != run_digest(config):
        return False, (f"{run_dir.marker_file} is from another run or length (run {marker.get('run_id')}, step "
                       f"{marker.get('global_step')}); waiting for this config's run to finish")
    trained_by = (marker.get("kubernetes") or {}).get("workload")
    if workload and trained_by and trained_by != workload:
        return False, f"the marker was written by {trained_by}, not {workload}; waiting"
    mismatch = run_dir.pipeline_mismatch(marker)
    if mismatch:
        return False, f"the pipeline does not match the completion marker: {mismatch}"
    return True, f"run {marker['run_id']} finished at step {marker['global_step']}"
