"""`ddpm push` (trainer/hub.py) against a local fake Hub (tests/fake_hub.py): a real training run, then the real CLI
as a subprocess talking HTTP to HF_ENDPOINT, and the server's copy compared byte for byte with output_dir.

The push subprocess runs without HF_HUB_OFFLINE (conftest sets it for this process): huggingface_hub 2.4 refuses
every request while it is set, uploads included (OfflineModeIsEnabled from its request hook). HF_HUB_DISABLE_XET=1
makes it use the preupload / LFS batch / commit API the fake Hub speaks instead of Xet storage (hf_xet is installed).
"""

from __future__ import annotations

import secrets
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import TINY, clean_env, ddpm
from fake_hub import FakeHub
from trainer.errors import EXIT_CONFIG, EXIT_FAILED

TOKEN = "hf_" + secrets.token_hex(16)  # unique per test session, so any leak is unmistakable
REPO = "fake-user/ddpm-tiny"
# What a push sends by default: the pipeline, the model card, the resolved config and the LAST grid of two.
EXPECTED = [
    "README.md", "model_index.json", "samples/0001.png", "scheduler/scheduler_config.json", "training_config.yaml",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hub") / "run"
    # 8 images / batch 4 = 2 steps per epoch; 4 steps = 2 epochs, so two sample grids (0000, 0001).
    ddpm("train", *TINY, "--output_dir", out, "--builtin_num_images", "8", "--max_train_steps", "4",
         "--save_image_epochs", "1", "--checkpointing_steps", "100", "--logging_steps", "2")
    assert (out / "samples" / "0000.png").is_file() and (out / "samples" / "0001.png").is_file()
    assert any((out / "checkpoints").iterdir()) and any((out / "logs").rglob("events.out.tfevents.*"))
    return out


@pytest.fixture
def hub():
    with FakeHub(tokens=(TOKEN,)) as server:
        yield server


def push_env(hub: FakeHub, **extra) -> dict:
    env = clean_env(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_TOKEN=TOKEN, NO_PROXY="127.0.0.1", **extra)
    env.pop("HF_HUB_OFFLINE", None)
    return env


def push(*args, env: dict) -> tuple[int, str, str]:
    proc = ddpm("push", *args, env=env, check=False)
    assert TOKEN not in proc.stdout + proc.stderr, "the token was printed"
    return proc.returncode, proc.stdout, proc.stderr


def files_under(out: Path, folder: str) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in (out / folder).rglob("*") if p.is_file())


def assert_same_bytes(hub: FakeHub, repo_id: str, out: Path, paths: list[str]) -> None:
    repo = hub.repos[repo_id]
    assert sorted(repo.files) == sorted(paths)
    for path in paths:
        assert repo.files[path] == (out / path).read_bytes(), f"{path} differs"


@pytest.mark.slow
def test_push_uploads_pipeline_card_config_and_last_grid_and_is_idempotent(run, hub, tmp_path):
    # The same config sources as `ddpm train`: here a YAML file through DDPM_CONFIG_FILE.
    config = tmp_path / "push.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(run), "hub_model_id": REPO, "hub_private_repo": True}))
    code, stdout, stderr = push(env=push_env(hub, DDPM_CONFIG_FILE=config))
    assert code == 0, stderr

    assert_same_bytes(hub, REPO, run, EXPECTED)  # no checkpoints/, no logs/, no samples/0000.png
    repo = hub.repos[REPO]
    assert repo.private and hub.create_payloads[0]["visibility"] == "private"
    assert set(repo.lfs) == {"unet/diffusion_pytorch_model.safetensors", "samples/0001.png"}  # went through LFS
    assert stdout.strip().splitlines()[-1] == f"pushed: {hub.url}/{REPO}"
    api_calls = [r for r in hub.api_requests() if not r.path.startswith("/lfs-storage/")]
    assert api_calls and all(r.authorization == f"Bearer {TOKEN}" for r in api_calls)

    # Again, with --config this time: succeeds, sends no content, makes no new commit.
    before = len(hub.requests)
    code, stdout, stderr = push("--config", config, env=push_env(hub))
    assert code == 0, stderr
    assert len(repo.commits) == 1
    assert not [r for r in hub.requests[before:] if r.method == "PUT" or "/commit/" in r.path]
    assert_same_bytes(hub, REPO, run, EXPECTED)


@pytest.mark.slow
def test_push_with_checkpoints_and_logs_to_a_public_repo(run, hub):
    code, _, stderr = push("--output_dir", run, "--hub_model_id", "fake-user/full", "--hub_private_repo", "false",
                           "--include-checkpoints", "--include-logs", env=push_env(hub))
    assert code == 0, stderr
    assert_same_bytes(hub, "fake-user/full", run, EXPECTED + files_under(run, "checkpoints") + files_under(run, "logs"))
    assert not hub.repos["fake-user/full"].private and hub.create_payloads[0]["visibility"] == "public"


@pytest.mark.slow
def test_push_retries_transient_failures(run, hub):
    hub.fail_next(2, 503)  # the first two requests: both create_repo calls
    hub.fail_next(1, 429, path_contains="/commit/")  # and the commit, after the LFS uploads
    code, _, stderr = push("--output_dir", run, "--hub_model_id", REPO, "--retry-delay", "0", env=push_env(hub))
    assert code == 0, stderr
    assert stderr.count("transient error (HTTP 503") == 2 and stderr.count("transient error (HTTP 429") == 1
    assert_same_bytes(hub, REPO, run, EXPECTED)
    assert len(hub.repos[REPO].commits) == 1


@pytest.mark.slow
def test_push_gives_up_after_max_attempts_with_exit_1(run, hub):
    hub.fail_next(5, 503)
    code, _, stderr = push("--output_dir", run, "--hub_model_id", REPO, "--max-attempts", "3", "--retry-delay", "0",
                           env=push_env(hub))
    assert code == EXIT_FAILED
    assert "the Hub still failed after 3 attempts (HTTP 503" in stderr and "run `ddpm push` again" in stderr
    assert REPO not in hub.repos


@pytest.mark.slow
def test_refused_token_is_exit_2_and_says_what_to_do(run, hub):
    hub.refuse_token(TOKEN)
    code, _, stderr = push("--output_dir", run, "--hub_model_id", REPO, "--retry-delay", "0", env=push_env(hub))
    assert code == EXIT_CONFIG
    assert "error: the Hub refused the token in HF_TOKEN (HTTP 401" in stderr
    assert "https://huggingface.co/settings/tokens" in stderr and "Traceback" not in stderr
    assert REPO not in hub.repos


@pytest.mark.slow
def test_push_to_hub_pushes_at_the_end_of_training_like_ddpm_push(hub, tmp_path):
    """The tutorial's push_to_hub: the same upload as `ddpm push`, after the completion marker; without HF_TOKEN it is
    refused before any training."""
    out = tmp_path / "run"
    args = ["train", *TINY, "--output_dir", out, "--builtin_num_images", "8", "--max_train_steps", "2",
            "--save_image_epochs", "1", "--eval_quality_images", "0", "--push_to_hub", "true", "--hub_model_id", REPO]
    env = push_env(hub)
    no_token = {k: v for k, v in env.items() if k != "HF_TOKEN"}
    proc = ddpm(*args, env=no_token, check=False)
    assert proc.returncode == EXIT_CONFIG and "HF_TOKEN is not set" in proc.stderr and not out.exists()
    proc = ddpm(*args, env=env)
    assert TOKEN not in proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == f"pushed: {hub.url}/{REPO}"
    assert_same_bytes(hub, REPO, out, [*[f for f in EXPECTED if f != "samples/0001.png"], "samples/0000.png"])


@pytest.mark.slow
def test_missing_token_is_exit_2_before_any_request(run, hub):
    env = push_env(hub)
    env.pop("HF_TOKEN")
    code, _, stderr = push("--output_dir", run, "--hub_model_id", REPO, env=env)
    assert code == EXIT_CONFIG
    assert "error: HF_TOKEN is not set; create a write token at https://huggingface.co/settings/tokens" in stderr
    assert hub.requests == []


@pytest.mark.slow
def test_incomplete_run_is_exit_2_before_any_request(run, hub, tmp_path):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run, unfinished, ignore=shutil.ignore_patterns("training_complete.json", "checkpoints"))
    code, _, stderr = push("--output_dir", unfinished, "--hub_model_id", REPO, env=push_env(hub))
    assert code == EXIT_CONFIG
    assert f"error: the run in {unfinished} is not complete: {unfinished / 'training_complete.json'} does not exist" in stderr
    assert "Wait for the run to end" in stderr
    assert hub.requests == []


@pytest.mark.slow
def test_dry_run_lists_exactly_the_upload_and_sends_nothing(run, hub):
    env = push_env(hub)
    env.pop("HF_HUB_DISABLE_TELEMETRY", None)  # any header built for a request would even fetch telemetry
    code, stdout, stderr = push("--output_dir", run, "--hub_model_id", REPO, "--dry-run", env=env)
    assert code == 0, stderr
    listed = [line.split()[0] for line in stdout.splitlines() if line.startswith("  ")]
    assert listed == EXPECTED
    assert f"to {hub.url}/{REPO} (default visibility)" in stdout and "Nothing was sent." in stdout
    assert hub.requests == []


@pytest.mark.slow
def test_offline_mode_is_exit_2_with_the_fix(run, hub):
    env = {**push_env(hub), "HF_HUB_OFFLINE": "1"}
    code, _, stderr = push("--output_dir", run, "--hub_model_id", REPO, env=env)
    assert code == EXIT_CONFIG and "HF_HUB_OFFLINE is set" in stderr and "unset it to push" in stderr
    assert hub.requests == []


# ---- in-process: selection, backoff and redaction ------------------------------------------------------------------

def test_upload_plan_picks_the_numerically_last_grid_and_complete_checkpoints_only(tmp_path):
    """Not a save that never finished (.tmp-), nor a checkpoint a resume found damaged or a rollback abandoned: those
    are kept on the volume for the user, never published as the run's checkpoints."""
    from trainer.hub import PushOptions, upload_plan
    from trainer.run_dir import RunDir

    for name in ("model_index.json", "unet/config.json", "samples/9999.png", "samples/10000.png", "samples/grid.png",
                 "checkpoints/checkpoint-3/model.safetensors", "checkpoints/.tmp-checkpoint-4/model.safetensors",
                 "checkpoints/damaged-checkpoint-2/model.safetensors",
                 "checkpoints/abandoned-checkpoint-5.2/model.safetensors", "logs/train/events.out.tfevents.1.host"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    run_dir = RunDir(tmp_path)
    assert upload_plan(run_dir, PushOptions()) == ["model_index.json", "samples/10000.png", "unet/config.json"]
    assert upload_plan(run_dir, PushOptions(include_checkpoints=True, include_logs=True)) == [
        "checkpoints/checkpoint-3/model.safetensors", "logs/train/events.out.tfevents.1.host", "model_index.json",
        "samples/10000.png", "unet/config.json"]


class FakeResponse:
    def __init__(self, status: int, headers: dict | None = None):
        self.status_code, self.headers = status, headers or {}


class HTTPFailure(Exception):
    def __init__(self, status: int, headers: dict | None = None):
        super().__init__(f"{status} error")
        self.response = FakeResponse(status, headers)


def test_with_retries_backs_off_exponentially_and_only_on_transient_errors():
    from trainer.hub import is_transient
    from trainer.retry import MAX_RETRY_DELAY_S, with_retries

    errors = [HTTPFailure(503), ConnectionResetError(), HTTPFailure(429, {"Retry-After": "7"}), HTTPFailure(502)]
    slept, logged = [], []

    def action():
        if errors:
            raise errors.pop(0)
        return "done"

    assert with_retries(action, attempts=5, base_delay_s=1, log=logged.append, retryable=is_transient,
                        sleep=slept.append) == "done"
    assert slept == [1, 2, 7, 8]  # the backoff, except where the server's Retry-After asks for longer
    assert len(logged) == 4 and "retry 1/4 in 1s" in logged[0]

    errors = [HTTPFailure(503) for _ in range(5)]
    slept.clear()
    assert with_retries(action, 6, 16, logged.append, is_transient, slept.append) == "done"
    assert slept == [16, 32, MAX_RETRY_DELAY_S, MAX_RETRY_DELAY_S, MAX_RETRY_DELAY_S]  # doubling, capped
    with pytest.raises(HTTPFailure) as caught:  # five errors, four attempts: the last error, counted
        errors = [HTTPFailure(503) for _ in range(5)]
        with_retries(action, 4, 1, logged.append, is_transient, slept.append)
    assert caught.value.attempts == 4

    for permanent in (HTTPFailure(401), HTTPFailure(404), ValueError("bad card")):
        def fail(error=permanent):
            raise error

        slept.clear()
        with pytest.raises(type(permanent)):
            with_retries(fail, 5, 1, logged.append, is_transient, slept.append)
        assert slept == []


def test_unexpected_errors_are_printed_without_the_token(tmp_path, monkeypatch, capsys):
    from huggingface_hub import HfApi, constants

    from trainer import hub
    from trainer.config import TrainingConfig
    from trainer.errors import PushFailed
    from trainer.run_dir import RunDir

    (tmp_path / "model_index.json").write_text("{}")
    monkeypatch.setattr(hub, "check_complete", lambda out: {"global_step": 1})
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def create_repo(self, **kwargs):
        raise RuntimeError(f"server said: bad header Authorization: Bearer {TOKEN}")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    with pytest.raises(PushFailed) as caught:
        hub.push(TrainingConfig(output_dir=tmp_path, hub_model_id=REPO), RunDir(tmp_path), hub.PushOptions(),
                 environ={"HF_TOKEN": TOKEN})
    stdout, stderr = capsys.readouterr()
    assert caught.value.exit_code == EXIT_FAILED
    assert TOKEN not in stdout + stderr + str(caught.value)
    assert "Bearer <HF_TOKEN>" in stderr and "Traceback" in stderr


# ---- nothing hangs (issue 9 section 6) ------------------------------------------------------------------------------

@pytest.fixture
def silent_server():
    """Accepts TCP connections (the kernel completes the handshake) and never answers a byte."""
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


@pytest.mark.parametrize("flags,message", [
    (["--request-timeout", "1", "--max-attempts", "2", "--retry-delay", "0"], "the Hub still failed after 2 attempts"),
    (["--request-timeout", "600", "--deadline-seconds", "3"], "did not finish within its deadline of 3s"),
])
@pytest.mark.slow
def test_a_hub_that_never_answers_fails_with_exit_1_in_bounded_time(run, silent_server, flags, message):
    import time

    env = clean_env(HF_ENDPOINT=silent_server, HF_HUB_DISABLE_XET="1", HF_TOKEN=TOKEN, NO_PROXY="127.0.0.1")
    env.pop("HF_HUB_OFFLINE", None)
    start = time.monotonic()
    code, _, stderr = push("--output_dir", run, "--hub_model_id", REPO, *flags, env=env)
    assert code == EXIT_FAILED and message in stderr, stderr
    assert time.monotonic() - start < 60, "bounded by the timeouts, not by the server"
