"""`ddpm push`: upload a finished run's pipeline, model card and last sample grid to the Hugging Face Hub.

What goes up (paths relative to output_dir, the layout trainer/outputs.py writes):
  model_index.json, unet/, scheduler/   the DDPMPipeline
  README.md                              the model card
  training_config.yaml                   the resolved config of the run
  samples/<last epoch>.png               the newest sample grid only (the one the model card shows)
  checkpoints/, logs/                    only with --include-checkpoints / --include-logs

The token comes only from $HF_TOKEN and never appears in output: every message printed here, tracebacks included,
goes through `_redact`. Pushing is idempotent: the repo is created with exist_ok, and huggingface_hub leaves out of
the commit every file whose content the repo already holds, so a second push of the same run changes nothing.
Transient failures (connection errors, HTTP 408/429/5xx) are retried with exponential backoff. The whole
create_repo + upload_folder is retried; that resumes cleanly because content the Hub already has is not re-sent.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from trainer.config import RESOLVED_CONFIG_NAME, TrainingConfig
from trainer.distributed import EXIT_CONFIG, EXIT_FAILED, EXIT_OK
from trainer.outputs import COMPLETE_MARKER

TOKEN_ENV = "HF_TOKEN"
TOKEN_HELP = (
    "create a write token at https://huggingface.co/settings/tokens and export HF_TOKEN=hf_... "
    "(on Kubernetes: the Secret named by push.tokenSecret, key push.tokenSecretKey)"
)
PIPELINE_FOLDERS = ("unet", "scheduler")  # with model_index.json: what DDPMPipeline.save_pretrained writes
MAX_RETRY_DELAY_S = 60.0  # the backoff doubles from the base delay up to this


class PushError(Exception):
    """Something the user must fix (incomplete run, missing or refused token): exit code 2, retrying cannot help."""


class PushFailed(Exception):
    """The Hub kept failing after every retry: exit code 1 (a Job may retry the whole push later)."""


@dataclass(frozen=True)
class PushOptions:
    dry_run: bool = False
    include_checkpoints: bool = False
    include_logs: bool = False
    max_attempts: int = 5  # tries of the whole upload, the first one included
    retry_delay_s: float = 2.0  # wait before the first retry; doubles each time, up to MAX_RETRY_DELAY_S


# ---- what to upload ----------------------------------------------------------------------------------------------

def _files_under(out: Path, folder: str) -> list[str]:
    root = out / folder
    return sorted(p.relative_to(out).as_posix() for p in root.rglob("*") if p.is_file()) if root.is_dir() else []


def last_sample_grid(out: Path) -> str | None:
    """samples/<epoch>.png with the highest epoch, compared as numbers."""
    samples = out / "samples"
    grids = [p for p in samples.glob("*.png") if p.stem.isdigit()] if samples.is_dir() else []
    return max(grids, key=lambda p: int(p.stem)).relative_to(out).as_posix() if grids else None


def check_complete(out: Path) -> dict:
    """The run's completion marker ({global_step, epoch, ...}); PushError saying what to do when there is none."""
    marker = out / COMPLETE_MARKER
    if not marker.is_file():
        raise PushError(
            f"the run in {out} is not complete: {marker} does not exist (rank 0 writes it last, when training "
            f"finishes). Wait for the run to end, or finish it with `ddpm train` and the same config, then push "
            f"again; if the run is elsewhere, set output_dir to its folder."
        )
    if not (out / "model_index.json").is_file():
        raise PushError(f"{out} has {COMPLETE_MARKER} but no model_index.json: no pipeline to push")
    try:
        return json.loads(marker.read_text())
    except ValueError:
        return {}


def allow_patterns_for(paths: list[str]) -> list[str]:
    """upload_folder selects files by fnmatch patterns; an escaped path is a pattern that matches only itself."""
    return [glob.escape(p) for p in paths]


def upload_plan(config: TrainingConfig, options: PushOptions) -> list[str]:
    """Exactly the files upload_folder will send: paths relative to output_dir, sorted."""
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

    out = Path(config.output_dir)
    wanted = ["model_index.json", *(f for folder in PIPELINE_FOLDERS for f in _files_under(out, folder))]
    wanted += [name for name in ("README.md", RESOLVED_CONFIG_NAME) if (out / name).is_file()]
    if grid := last_sample_grid(out):
        wanted.append(grid)
    if options.include_checkpoints:  # complete ones only: .tmp-checkpoint-* is a save that never finished
        wanted += [f for f in _files_under(out, "checkpoints") if not f.split("/")[1].startswith(".tmp-")]
    if options.include_logs:
        wanted += _files_under(out, "logs")
    # upload_folder's own filter, with the patterns push() gives it: the plan is what it really selects.
    return list(filter_repo_objects(sorted(set(wanted)), allow_patterns=allow_patterns_for(wanted),
                                    ignore_patterns=DEFAULT_IGNORE_PATTERNS))


# ---- retries -----------------------------------------------------------------------------------------------------

def _chain(error: BaseException | None):
    """The error and what caused it (huggingface_hub wraps HTTP errors, e.g. in RuntimeError for LFS uploads)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def status_code(error: BaseException) -> int | None:
    """The HTTP status anywhere in the exception chain, if the error came from a response."""
    for cause in _chain(error):
        status = getattr(getattr(cause, "response", None), "status_code", None)
        if status is not None:
            return status
    return None


def is_transient(error: BaseException) -> bool:
    """Connection problems, timeouts, HTTP 408/429/5xx: worth retrying. Not other 4xx, not offline mode."""
    import httpx2
    from huggingface_hub.errors import OfflineModeIsEnabled

    for cause in _chain(error):
        if isinstance(cause, OfflineModeIsEnabled):
            return False
        if isinstance(cause, (httpx2.TransportError, ConnectionError, TimeoutError)):
            return True
    status = status_code(error)
    return status is not None and (status in (408, 429) or status >= 500)


def retry_after_s(error: BaseException) -> float | None:
    for cause in _chain(error):
        response = getattr(cause, "response", None)
        headers = getattr(response, "headers", None) or {}
        value = next((str(v).strip() for k, v in headers.items() if k.lower() == "retry-after"), "")
        if value.isdigit():
            return float(value)
    return None


def backoff_delays(attempts: int, base_s: float, cap_s: float = MAX_RETRY_DELAY_S) -> list[float]:
    """The waits before attempts 2..attempts: base, 2 base, 4 base, ..., at most cap_s."""
    return [min(cap_s, base_s * 2**i) for i in range(max(attempts - 1, 0))]


def with_retries(action: Callable[[], object], attempts: int, base_delay_s: float, log: Callable[[str], None],
                 sleep: Callable[[float], None] = time.sleep):
    """Run `action`; after a transient error wait (the backoff, or the server's Retry-After if longer) and rerun it."""
    delays = backoff_delays(attempts, base_delay_s)
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except Exception as error:
            if attempt == attempts or not is_transient(error):
                raise
            delay = max(delays[attempt - 1], min(retry_after_s(error) or 0.0, MAX_RETRY_DELAY_S))
            log(f"transient error ({describe(error)}); retry {attempt}/{attempts - 1} in {delay:g}s")
            sleep(delay)


# ---- the push ----------------------------------------------------------------------------------------------------

def _redact(text: str, token: str | None) -> str:
    return text.replace(token, "<HF_TOKEN>") if token else text


def describe(error: BaseException) -> str:
    first_line = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
    status = status_code(error)
    return f"HTTP {status}: {first_line}" if status else first_line


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def push(config: TrainingConfig, options: PushOptions, environ: dict[str, str] | None = None) -> int:
    """`ddpm push`. Returns the exit code; prints every message itself, with the token redacted."""
    environ = dict(os.environ if environ is None else environ)
    token = environ.get(TOKEN_ENV, "").strip() or None

    def say(message: str, stream=None) -> None:
        print(_redact(message, token), file=stream or sys.stdout, flush=True)

    try:
        return _push(config, options, token, say)
    except PushError as e:
        say(f"error: {e}", sys.stderr)
        return EXIT_CONFIG
    except PushFailed as e:
        say(f"error: {e}", sys.stderr)
        return EXIT_FAILED
    except Exception as e:  # unexpected: print the traceback (it helps), but it must not carry the token either
        say("".join(traceback.format_exception(e)).rstrip(), sys.stderr)
        say(f"error: pushing to {config.hub_repo_id} failed: {describe(e)}; `ddpm push` is safe to run again", sys.stderr)
        return EXIT_FAILED


def _push(config: TrainingConfig, options: PushOptions, token: str | None, say) -> int:
    from huggingface_hub import constants

    out = Path(config.output_dir)
    repo_id = config.hub_repo_id
    marker = check_complete(out)
    files = upload_plan(config, options)
    sizes = {f: (out / f).stat().st_size for f in files}
    visibility = {True: "private", False: "public", None: "default visibility"}[config.hub_private_repo]
    what = f"{len(files)} files ({_size(sum(sizes.values()))}) from {out} to {constants.ENDPOINT}/{repo_id} ({visibility})"

    if options.dry_run:
        say(f"dry run: would create {repo_id} if it does not exist and upload {what}:")
        for f in files:
            say(f"  {f}  ({_size(sizes[f])})")
        say(f"{TOKEN_ENV} is {'set' if token else 'NOT set (the real push would fail)'}. Nothing was sent.")
        return EXIT_OK

    if token is None:
        raise PushError(f"{TOKEN_ENV} is not set; {TOKEN_HELP}")
    if constants.HF_HUB_OFFLINE:
        raise PushError("HF_HUB_OFFLINE is set, so huggingface_hub will not contact the Hub; unset it to push")

    from huggingface_hub import HfApi
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()  # plain log lines: pods and CI are not terminals
    api = HfApi(token=token, library_name="ddpm-trainer")
    step = marker.get("global_step")
    message = f"Upload DDPM pipeline{f' after {step} steps' if step is not None else ''} with ddpm-trainer"
    say(f"pushing {what}")

    def upload():
        url = api.create_repo(repo_id=repo_id, private=config.hub_private_repo, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=out, allow_patterns=allow_patterns_for(files),
                                   commit_message=message)
        return url, commit

    try:
        url, commit = with_retries(upload, options.max_attempts, options.retry_delay_s, lambda m: say(m, sys.stderr))
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
            raise PushFailed(
                f"the Hub still failed after {options.max_attempts} attempts ({describe(e)}); run `ddpm push` again "
                f"later: it resumes, content already uploaded is not sent again"
            ) from None
        raise
    say(f"{repo_id} is at commit {commit.oid}")
    say(f"pushed: {url}")
    return EXIT_OK
