"""`ddpm push`: upload a finished run's pipeline, model card and last sample grid to the Hugging Face Hub.

What goes up (paths relative to output_dir, the layout of trainer/run_dir.py):
  model_index.json, unet/, scheduler/   the DDPMPipeline
  README.md                              the model card
  training_config.yaml                   the resolved config of the run
  samples/<last epoch>.png               the newest sample grid only (the one the model card shows)
  checkpoints/, logs/                    only with --include-checkpoints / --include-logs

Only a finished run is pushed, and only the pipeline its completion marker describes (trainer.run_dir: same
run id, same step, the same SHA-256 for every pipeline file, all weights finite), so a run that has been extended
or replaced since can never send its old or half-written model.

The token comes only from $HF_TOKEN and never appears in output: every message printed here, tracebacks included,
goes through trainer.hf_token's redaction. Pushing is idempotent: the repo is created with exist_ok, and huggingface_hub leaves out of
the commit every file whose content the repo already holds, so a second push of the same run changes nothing.

Nothing waits forever: every HTTP request has connect and read timeouts (huggingface_hub's own client has none by
default), transient failures (connection errors, timeouts, HTTP 408/429/5xx) are retried with exponential backoff,
and the whole push has a deadline after which it stops with exit 1 (the retries and the deadline: trainer.retry). The whole create_repo + upload_folder is
retried; that resumes cleanly because content the Hub already has is not re-sent (huggingface_hub's own
`http_backoff` already retries the single LFS uploads inside it).
"""

from __future__ import annotations

import glob
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from trainer.config import TrainingConfig
from trainer.errors import DdpmError, PushError, PushFailed, causes
from trainer.hf_token import TOKEN_ENV, TOKEN_HELP, redact_token, token as hf_token
from trainer.retry import describe, status_code, with_retries, within
from trainer.run_dir import (CHECKPOINT_NAME, CHECKPOINTS_NAME, CONFIG_NAME, LOGS_NAME, MODEL_CARD_NAME,
                             PIPELINE_FOLDERS, PIPELINE_INDEX, RunDir, all_finite)



CONNECT_TIMEOUT_S = 10.0  # to open a connection to the Hub


@dataclass(frozen=True)
class PushOptions:
    dry_run: bool = False
    include_checkpoints: bool = False
    include_logs: bool = False
    max_attempts: int = 5  # tries of the whole upload, the first one included
    retry_delay_s: float = 2.0  # wait before the first retry; doubles each time, up to MAX_RETRY_DELAY_S
    deadline_s: float = 3600.0  # the whole push, retries included
    request_timeout_s: float = 60.0  # each HTTP read/write: a server that stops answering fails the attempt


# ---- what to upload ----------------------------------------------------------------------------------------------

def _files_under(out: Path, folder: str) -> list[str]:
    root = out / folder
    return sorted(p.relative_to(out).as_posix() for p in root.rglob("*") if p.is_file()) if root.is_dir() else []


def check_complete(run_dir: RunDir) -> dict:
    """The completion marker of the run in `run_dir`, checked against what would be uploaded; PushError saying what
    to do when the run is not finished, or when the pipeline is not the one the marker describes."""
    out = run_dir.root
    marker = run_dir.read_marker()
    if marker is None:
        raise PushError(
            f"the run in {out} is not complete: {run_dir.marker_file} does not exist (rank 0 writes it last, when "
            f"training finishes). Wait for the run to end, or finish it with `ddpm train` and the same config, then "
            f"push again; if the run is elsewhere, set output_dir to its folder.")
    if not run_dir.has_pipeline():
        raise PushError(f"{out} has {run_dir.marker_file.name} but no {PIPELINE_INDEX}: no pipeline to push")
    history = run_dir.read_history()
    if history and history[-1].get("run_id") != marker.get("run_id"):
        raise PushError(f"the completion marker is from run {marker.get('run_id')} but {out} now holds run "
                        f"{history[-1].get('run_id')} (started {history[-1].get('run_started_at')}), which has not "
                        "finished; wait for it to finish and push again")
    mismatch = run_dir.pipeline_mismatch(marker)
    if mismatch:
        raise PushError(f"the pipeline in {out} is not the one the completion marker describes (run "
                        f"{marker.get('run_id')}, step {marker.get('global_step')}): {mismatch}. A newer training may "
                        "be writing there: wait for it to finish, then push again")
    from safetensors.torch import load_file

    for weights in sorted(run_dir.unet.glob("*.safetensors")):
        if not all_finite(load_file(weights).values()):
            raise PushError(f"{weights} holds NaN/inf weights; refusing to push a broken model")
    return marker


def allow_patterns_for(paths: list[str]) -> list[str]:
    """upload_folder selects files by fnmatch patterns; an escaped path is a pattern that matches only itself."""
    return [glob.escape(p) for p in paths]


def upload_plan(run_dir: RunDir, options: PushOptions) -> list[str]:
    """Exactly the files upload_folder will send: paths relative to output_dir, sorted."""
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

    out = run_dir.root
    wanted = [PIPELINE_INDEX, *(f for folder in PIPELINE_FOLDERS for f in _files_under(out, folder))]
    wanted += [name for name in (MODEL_CARD_NAME, CONFIG_NAME) if (out / name).is_file()]
    if grid := run_dir.last_grid():
        wanted.append(grid.relative_to(out).as_posix())
    if options.include_checkpoints:  # complete ones only: not a save that never finished, nor one set aside
        wanted += [f for f in _files_under(out, CHECKPOINTS_NAME) if CHECKPOINT_NAME.fullmatch(f.split("/")[1])]
    if options.include_logs:
        wanted += _files_under(out, LOGS_NAME)
    # upload_folder's own filter, with the patterns push() gives it: the plan is what it really selects.
    return list(filter_repo_objects(sorted(set(wanted)), allow_patterns=allow_patterns_for(wanted),
                                    ignore_patterns=DEFAULT_IGNORE_PATTERNS))


# ---- what is worth retrying -----------------------------------------------------------------------------------

def is_transient(error: BaseException) -> bool:
    """Connection problems, timeouts, HTTP 408/429/5xx: worth retrying. Not other 4xx, not offline mode."""
    import httpx2
    from huggingface_hub.errors import OfflineModeIsEnabled

    for cause in causes(error):
        if isinstance(cause, OfflineModeIsEnabled):
            return False
        if isinstance(cause, (httpx2.TransportError, ConnectionError, TimeoutError)):
            return True
    status = status_code(error)
    return status is not None and (status in (408, 429) or status >= 500)


# ---- the push ----------------------------------------------------------------------------------------------------

def _size(n: float) -> str:
    for unit in ("B", "kB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def check_can_push(environ: dict[str, str] | None = None) -> None:
    """What a push needs from the environment, checked before minutes of training (push_to_hub) or uploading."""
    from huggingface_hub import constants

    if not hf_token(environ):
        raise PushError(f"{TOKEN_ENV} is not set; {TOKEN_HELP}")
    if constants.HF_HUB_OFFLINE:
        raise PushError("HF_HUB_OFFLINE is set, so huggingface_hub will not contact the Hub; unset it to push")


def use_timeouts(request_timeout_s: float) -> None:
    """huggingface_hub's shared HTTP client has no timeout at all: a server that accepts the connection and never
    answers would hang the push forever. Give every request connect and read/write timeouts."""
    import httpx2
    from huggingface_hub.utils import get_session, set_client_factory

    # The clients made from now on keep huggingface_hub's own request hooks (offline mode, request ids), copied from
    # the session its default factory made: the factory itself is not public.
    hooks = get_session().event_hooks
    timeout = httpx2.Timeout(request_timeout_s, connect=CONNECT_TIMEOUT_S)
    set_client_factory(lambda: httpx2.Client(event_hooks=hooks, follow_redirects=True, timeout=timeout))


def push(config: TrainingConfig, run_dir: RunDir, options: PushOptions, environ: dict[str, str] | None = None,
         say: Callable[[str], None] | None = None) -> str:
    """`ddpm push` (and `push_to_hub` at the end of training). Returns the repo URL; raises PushError (exit 2) or
    PushFailed (exit 1). Every message goes through `redact`."""
    environ = dict(os.environ if environ is None else environ)
    token = hf_token(environ)
    emit = say or (lambda message, stream=None: print(message, file=stream or sys.stdout, flush=True))

    def say(message: str, stream=None) -> None:
        emit(redact_token(message, token), stream)

    try:
        return _push(config, run_dir, options, token, environ, say)
    except DdpmError:
        raise
    except Exception as e:  # unexpected: print the traceback (it helps), but it must not carry the token either
        say(redact_token("".join(traceback.format_exception(e)).rstrip(), token), sys.stderr)
        raise PushFailed(redact_token(f"pushing to {config.hub_repo_id} failed: {describe(e)}; `ddpm push` is safe to run "
                                 "again", token)) from None


def _push(config: TrainingConfig, run_dir: RunDir, options: PushOptions, token: str | None, environ: dict,
          say) -> str:
    from huggingface_hub import constants

    out = run_dir.root
    repo_id = config.hub_repo_id
    marker = check_complete(run_dir)
    files = upload_plan(run_dir, options)
    sizes = {f: (out / f).stat().st_size for f in files}
    visibility = {True: "private", False: "public", None: "default visibility"}[config.hub_private_repo]
    what = f"{len(files)} files ({_size(sum(sizes.values()))}) from {out} to {constants.ENDPOINT}/{repo_id} ({visibility})"

    if options.dry_run:
        say(f"dry run: would create {repo_id} if it does not exist and upload {what}:")
        for f in files:
            say(f"  {f}  ({_size(sizes[f])})")
        say(f"{TOKEN_ENV} is {'set' if token else 'NOT set (the real push would fail)'}. Nothing was sent.")
        return ""
    check_can_push(environ)

    from huggingface_hub import HfApi
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()  # plain log lines: pods and CI are not terminals
    use_timeouts(options.request_timeout_s)
    api = HfApi(token=token, library_name="ddpm-trainer")
    step = marker.get("global_step")
    message = f"Upload DDPM pipeline{f' after {step} steps' if step is not None else ''} with ddpm-trainer"
    say(f"pushing {what} (run {marker.get('run_id')}, step {step}; deadline {options.deadline_s:g}s)")
    deadline = time.monotonic() + options.deadline_s

    def upload():
        url = api.create_repo(repo_id=repo_id, private=config.hub_private_repo, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=out, allow_patterns=allow_patterns_for(files),
                                   commit_message=message)
        return url, commit

    def attempts():
        return with_retries(upload, options.max_attempts, options.retry_delay_s, lambda m: say(m, sys.stderr),
                            retryable=is_transient,
                            deadline=deadline)

    try:
        url, commit = within(deadline, attempts)
    except TimeoutError:
        raise PushFailed(f"the push to {repo_id} did not finish within its deadline of {options.deadline_s:g}s (a Hub "
                         "that stopped answering?); run `ddpm push` again later: it resumes, content already "
                         "uploaded is not sent again") from None
    except Exception as e:
        status = status_code(e)
        if status == 401:
            raise PushError(f"the Hub refused the token in {TOKEN_ENV} (HTTP 401: invalid or expired); {TOKEN_HELP}") from None
        if status == 403:
            raise PushError(
                f"the token in {TOKEN_ENV} may not write to {repo_id} (HTTP 403): use a write token of the repo's owner "
                f"or of a member of its organization, or push to another hub_model_id; {TOKEN_HELP}"
            ) from None
        if is_transient(e):
            made = getattr(e, "attempts", options.max_attempts)
            when = " (the next retry would have passed the deadline)" if getattr(e, "deadline", False) else ""
            raise PushFailed(
                f"the Hub still failed after {made} attempt{'s' if made != 1 else ''}{when} ({describe(e)}); run "
                f"`ddpm push` again later: it resumes, content already uploaded is not sent again"
            ) from None
        raise
    mismatch = run_dir.pipeline_mismatch(marker)
    if mismatch:  # something rewrote the pipeline while it was being read
        raise PushFailed(f"the pipeline in {out} changed during the upload ({mismatch}); the repo may hold a mix. "
                         "Run `ddpm push` again once training there has finished")
    say(f"{repo_id} is at commit {commit.oid}")
    say(f"pushed: {url}")
    return str(url)
