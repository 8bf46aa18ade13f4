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

from trainer.config import RUN_IDENTITY_FIELDS, RUN_LENGTH_FIELDS, TrainingConfig
from trainer.errors import OutputDirError
from trainer.run_dir import RunDir

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
