"""The run's record in output_dir: which config each part of the run used, the run's id, and the completion marker.

- config_history.jsonl: one line per start that changed anything (a new run, an extension, a changed setting on
  resume), with the step from which it applies, so a run that changed `max_grad_norm` half-way says so.
- The run id: a hash of what the run trains and for how long (identity and length fields), the time it started and
  the Kubernetes workload it runs in, if any. Resuming keeps it; a new run or an extension gets a new one.
- training_complete.json: removed when training starts, written last when it has finished, with the run id, the
  final step and a SHA-256 of every pipeline file. `ddpm push` and `ddpm wait-for-training` upload or accept a
  pipeline only if it is the one the marker describes, so a push can never send the model of a run that has since
  been extended or replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from trainer.config import RESOLVED_CONFIG_NAME, RUN_IDENTITY_FIELDS, RUN_LENGTH_FIELDS, TrainingConfig
from trainer.outputs import (COMPLETE_MARKER, HISTORY_NAME, PIPELINE_ENTRIES, sha256_file, temporary,
                             write_resolved_config)

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


def kubernetes_identity(environ: dict[str, str] | None = None) -> dict[str, str]:
    environ = os.environ if environ is None else environ
    return {key: environ[var] for key, var in KUBERNETES_ENV.items() if environ.get(var)}


def read_history(output_dir: Path) -> list[dict]:
    path = Path(output_dir) / HISTORY_NAME
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a crash mid-append: the others still tell the story
    return entries


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    started_at: str
    changes: dict  # field -> [old, new] since the previous start, empty when nothing changed or the run is new


def begin(config: TrainingConfig, step: int, environ: dict[str, str] | None = None,
          branch: dict | None = None) -> RunRecord:
    """Rank 0, once every check has passed and before training: record the config in effect from `step` (and the
    rollback it continues, `branch`: trainer.checkpoint), write training_config.yaml and remove the completion
    marker. Returns the run's id (kept on resume)."""
    out = Path(config.output_dir)
    values, digest = config_values(config), run_digest(config)
    kubernetes = kubernetes_identity(environ)
    history = read_history(out)
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
        with open(out / HISTORY_NAME, "a") as f:
            f.write(_json(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
    write_resolved_config(config)
    (out / COMPLETE_MARKER).unlink(missing_ok=True)
    return RunRecord(run_id, started_at, changes)


# ---- the completion marker --------------------------------------------------------------------------------------

def pipeline_files(output_dir: Path) -> list[str]:
    out = Path(output_dir)
    files = []
    for entry in PIPELINE_ENTRIES:
        path = out / entry
        files += [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [p.relative_to(out).as_posix() for p in files]


def pipeline_hashes(output_dir: Path) -> dict[str, str]:
    return {name: sha256_file(Path(output_dir) / name) for name in pipeline_files(output_dir)}


def write_marker(config: TrainingConfig, record: RunRecord, global_step: int, epoch: int,
                 environ: dict[str, str] | None = None) -> Path:
    """Written last, after the pipeline: its presence means the run finished and the pipeline is its result."""
    out = Path(config.output_dir)
    marker = {"run_id": record.run_id, "run_started_at": record.started_at, "run_digest": run_digest(config),
              "global_step": global_step, "epoch": epoch, "finished_at": time.time(),
              "kubernetes": kubernetes_identity(environ), "pipeline": pipeline_hashes(out)}
    path, tmp = out / COMPLETE_MARKER, out / temporary(COMPLETE_MARKER)
    tmp.write_text(json.dumps(marker, indent=1))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_marker(output_dir: Path) -> dict | None:
    """The marker, or None when there is none (or it is unreadable: then the run is not known to be complete)."""
    try:
        marker = json.loads((Path(output_dir) / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def pipeline_mismatch(output_dir: Path, marker: dict) -> str:
    """'' when the pipeline files are exactly those the marker lists, else what differs."""
    expected = marker.get("pipeline") or {}
    present = pipeline_files(output_dir)
    if not expected:
        return "the marker lists no pipeline files (written by an older ddpm-trainer?)"
    missing = sorted(set(expected) - set(present))
    extra = sorted(set(present) - set(expected))
    if missing or extra:
        return f"pipeline files differ from the marker's (missing {missing or 'none'}, unexpected {extra or 'none'})"
    changed = [name for name in sorted(expected) if sha256_file(Path(output_dir) / name) != expected[name]]
    return f"{', '.join(changed)} changed since the run finished" if changed else ""


def marker_matches(config: TrainingConfig, workload: str | None = None) -> tuple[bool, str]:
    """For the push gate: whether output_dir holds the finished result of the run this config describes
    (same identity and length, and when `workload` is given, trained by that Kubernetes workload)."""
    out = Path(config.output_dir)
    marker = read_marker(out)
    if marker is None:
        return False, f"no completion marker in {out} yet"
    if config.global_batch_size is None:  # as the trainer resolved it: the run's own (trainer.setup.with_global_batch)
        import yaml

        try:
            saved = yaml.safe_load((out / RESOLVED_CONFIG_NAME).read_text()) or {}
        except (OSError, ValueError):
            saved = {}
        config = config.model_copy(update={"global_batch_size": saved.get("global_batch_size")})
    if marker.get("run_digest") != run_digest(config):
        return False, (f"{out / COMPLETE_MARKER} is from another run or length (run {marker.get('run_id')}, step "
                       f"{marker.get('global_step')}); waiting for this config's run to finish")
    trained_by = (marker.get("kubernetes") or {}).get("workload")
    if workload and trained_by and trained_by != workload:
        return False, f"the marker was written by {trained_by}, not {workload}; waiting"
    mismatch = pipeline_mismatch(out, marker)
    if mismatch:
        return False, f"the pipeline does not match the completion marker: {mismatch}"
    return True, f"run {marker['run_id']} finished at step {marker['global_step']}"
