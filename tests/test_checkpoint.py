"""Checkpoint integrity (issue 9 section 3): the manifest, damage of every kind named, fallback to the newest intact
checkpoint, exit 2 when none is intact, another model refused, a full disk reported, nothing half-published."""

import json

import pytest
import torch
from accelerate import Accelerator

from conftest import TINY, ddpm
from trainer import checkpoint
from trainer.checkpoint import TrainState
from trainer.config import TrainingConfig
from trainer.errors import EXIT_CONFIG, CheckpointError, OutputDirError
from trainer.run_dir import RunDir, all_finite, disk_full, record_start, write_marker


def resume_of(config: TrainingConfig) -> checkpoint.Resume:
    return checkpoint.resolve_resume(config.resume_from_checkpoint, RunDir.of(config))


class Averaged:
    """Stands in for the EMA: a registered object whose state holds tensors (saved as custom_checkpoint_0.pkl)."""

    def __init__(self, value):
        self.shadow = [value.clone()]

    def state_dict(self):
        return {"shadow_params": self.shadow, "decay": 0.99}

    def load_state_dict(self, state):
        self.shadow = state["shadow_params"]


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def save(accelerator, out, step, weight=1.0, limit=None):
    model = torch.nn.Linear(4, 4)
    torch.nn.init.constant_(model.weight, weight)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    accelerator._models, accelerator._optimizers, accelerator._custom_objects = [], [], []
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(Averaged(model.weight.detach()))
    return checkpoint.save_checkpoint(accelerator, TrainState(global_step=step, model={"preset": "small"}), RunDir(out), limit)


@pytest.fixture
def three(accelerator, tmp_path):
    for step in (2, 4, 6):
        save(accelerator, tmp_path, step)
    return tmp_path


def test_manifest_covers_every_file_and_an_intact_checkpoint_verifies(three):
    folder = three / "checkpoints" / "checkpoint-6"
    manifest = json.loads((folder / checkpoint.MANIFEST).read_text())["files"]
    on_disk = {p.name for p in folder.iterdir()} - {checkpoint.MANIFEST}
    assert set(manifest) == on_disk and {"model.safetensors", "optimizer.bin", "random_states_0.pkl",
                                         "custom_checkpoint_0.pkl", checkpoint.STATE_FILE} <= on_disk
    assert all(entry["size"] == (folder / name).stat().st_size and len(entry["sha256"]) == 64
               for name, entry in manifest.items())
    assert checkpoint.damage(folder) == ""


def _rewrite_manifest(folder):
    """A damaged file whose manifest was (re)written after it: only the content check can catch it."""
    (folder / checkpoint.MANIFEST).unlink()
    checkpoint.write_manifest(folder)


DAMAGE = {
    "truncated": (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:100]),
                  "model.safetensors is 100 bytes, the manifest says"),
    "overwritten": (lambda f: (f / "optimizer.bin").write_bytes(b"\0" * (f / "optimizer.bin").stat().st_size),
                    "optimizer.bin does not match its SHA-256"),
    "missing": (lambda f: (f / "random_states_0.pkl").unlink(), "random_states_0.pkl is missing"),
    "unreadable_rng": (lambda f: ((f / "random_states_0.pkl").write_bytes(b"not a pickle"), _rewrite_manifest(f)),
                       "random_states_0.pkl cannot be read"),
    "no_manifest": (lambda f: (f / checkpoint.MANIFEST).unlink(), "no manifest.json"),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damage_is_named_and_the_newest_intact_checkpoint_is_used(three, kind):
    harm, named = DAMAGE[kind]
    newest = three / "checkpoints" / "checkpoint-6"
    harm(newest)
    assert named in checkpoint.damage(newest)
    resume = resume_of(TrainingConfig(output_dir=three))
    assert resume.path == three / "checkpoints" / "checkpoint-4"
    assert [(p.name, named in why) for p, why in resume.damaged] == [("checkpoint-6", True)]
    checkpoint.set_aside(resume.damaged)
    assert [p.name for p in checkpoint.complete_checkpoints(RunDir(three))] == ["checkpoint-2", "checkpoint-4"]
    assert (three / "checkpoints" / "damaged-checkpoint-6").is_dir(), "kept for a post-mortem"


def test_nonfinite_weights_are_never_loaded_silently(accelerator, tmp_path):
    save(accelerator, tmp_path, 2)
    save(accelerator, tmp_path, 4, weight=float("nan"))  # a valid manifest over NaN weights
    problem = checkpoint.damage(tmp_path / "checkpoints" / "checkpoint-4")
    assert "NaN/inf values" in problem
    assert resume_of(TrainingConfig(output_dir=tmp_path)).path.name == "checkpoint-2"


@pytest.mark.parametrize("mode", ["auto", "latest"])
def test_no_intact_checkpoint_is_exit_2_listing_each(three, mode):
    for step, kind in ((2, "missing"), (4, "truncated"), (6, "overwritten")):
        DAMAGE[kind][0](three / "checkpoints" / f"checkpoint-{step}")
    with pytest.raises(CheckpointError) as caught:
        resume_of(TrainingConfig(output_dir=three, resume_from_checkpoint=mode))
    text = str(caught.value)
    assert caught.value.exit_code == EXIT_CONFIG
    assert "checkpoint-6: optimizer.bin does not match" in text and "checkpoint-4: model.safetensors is" in text
    assert "checkpoint-2: random_states_0.pkl is missing" in text


def test_auto_starts_fresh_only_when_there_are_none(tmp_path, three):
    assert resume_of(TrainingConfig(output_dir=tmp_path / "new")).path is None
    with pytest.raises(CheckpointError, match="latest: no checkpoint"):
        resume_of(TrainingConfig(output_dir=tmp_path / "new", resume_from_checkpoint="latest"))
    assert resume_of(TrainingConfig(output_dir=three, resume_from_checkpoint="none")).path is None
    damaged = three / "checkpoints" / "checkpoint-4"
    DAMAGE["missing"][0](damaged)
    with pytest.raises(CheckpointError, match="checkpoint-4 cannot be used: random_states_0.pkl is missing"):
        resume_of(TrainingConfig(output_dir=three, resume_from_checkpoint=str(damaged)))


def test_incomplete_saves_are_never_resumed_and_are_removed(three):
    tmp = three / "checkpoints" / ".tmp-checkpoint-9"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"partial")
    assert resume_of(TrainingConfig(output_dir=three)).path.name == "checkpoint-6"
    checkpoint.remove_incomplete(RunDir(three))
    assert not tmp.exists()


def test_rotation_keeps_the_newest(accelerator, tmp_path):
    for step in (1, 2, 3, 4):
        save(accelerator, tmp_path, step, limit=2)
    assert [p.name for p in checkpoint.complete_checkpoints(RunDir(tmp_path))] == ["checkpoint-3", "checkpoint-4"]


def test_disk_full_says_so_and_keeps_the_previous_checkpoint(accelerator, tmp_path, monkeypatch):
    save(accelerator, tmp_path, 1)
    real = accelerator.save_state

    def full(path):
        (checkpoint.Path(path) / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(accelerator, "save_state", full)
    with pytest.raises(OutputDirError, match="no space left on device while writing checkpoint checkpoint-2 to .* "
                                             "MiB free, it needs about"):
        checkpoint.save_checkpoint(accelerator, TrainState(global_step=2), RunDir(tmp_path), None, size_estimate=2**20)
    monkeypatch.setattr(accelerator, "save_state", real)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["checkpoint-1"], "no half-written folder left"
    assert resume_of(TrainingConfig(output_dir=tmp_path)).path.name == "checkpoint-1"


def test_disk_full_in_the_safetensors_writer_says_so_and_leaves_no_temporary_folder(accelerator, tmp_path,
                                                                                       monkeypatch):
    """Issue 17 case 13: safetensors reports ENOSPC as SafetensorError (not an OSError), so save_checkpoint let it
    through: a traceback, exit 1, and .tmp-checkpoint-N left behind. The writer Accelerate calls fails as the real
    one does on a full disk (part of the file written, then the error)."""
    import accelerate.utils.other
    from safetensors import SafetensorError

    save(accelerator, tmp_path, 1)

    def full(tensors, filename, metadata=None):
        checkpoint.Path(filename).write_bytes(b"half")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(accelerate.utils.other, "safe_save_file", full)
    with pytest.raises(OutputDirError, match="no space left on device while writing checkpoint checkpoint-6 to .* "
                                             "MiB free, it needs about 1 MiB") as caught:
        checkpoint.save_checkpoint(accelerator, TrainState(global_step=6), RunDir(tmp_path), None, size_estimate=2**20)
    assert caught.value.exit_code == EXIT_CONFIG
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["checkpoint-1"], "no .tmp-checkpoint-6 left"


@pytest.mark.parametrize("message", [
    "Error while serializing: I/O error: Disk quota exceeded (os error 122)",  # EDQUOT
    "Error while serializing: I/O error: File too large (os error 27)",  # EFBIG: a file size limit (ulimit -f)
])
def test_every_kind_of_full_is_recognised_through_the_exception_chain(tmp_path, message):
    from safetensors import SafetensorError


    try:
        try:
            raise SafetensorError(message)
        except SafetensorError as e:
            raise RuntimeError("saving failed") from e  # wrapped by a caller: found through __cause__
    except RuntimeError as e:
        full = disk_full(e, "checkpoint checkpoint-6", tmp_path, 2**20)
    assert full is not None and "no space left on device while writing checkpoint checkpoint-6" in str(full)
    assert disk_full(RuntimeError("unrelated"), "x", tmp_path, 1) is None


def branch_from(out, step):
    """What `ddpm train --resume_from_checkpoint .../checkpoint-<step>` decides and records when it begins."""

    config = TrainingConfig(output_dir=out, resume_from_checkpoint=str(out / "checkpoints" / f"checkpoint-{step}"))
    resume = resume_of(config)
    moved = checkpoint.set_aside_abandoned(resume.abandoned)
    record_start(config, RunDir.of(config), step, environ={}, branch=resume.branch)
    return resume, moved


def names(out):
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def test_rolling_back_sets_the_newer_checkpoints_aside_and_a_retry_continues_the_branch(accelerator, tmp_path):
    """Issue 17 case 3, step by step: resuming an older checkpoint by path left the newer ones in place (auto-resume
    later took the stale checkpoint-8), and a retry of the same command went back to checkpoint-4 again."""
    for step in (4, 8):
        save(accelerator, tmp_path, step)
    resume, moved = branch_from(tmp_path, 4)
    assert resume.path.name == "checkpoint-4" and [p.name for p in moved] == ["abandoned-checkpoint-8"]
    assert names(tmp_path) == ["abandoned-checkpoint-8", "checkpoint-4"]
    for step in (5, 6):  # the branch goes on, checkpoints_total_limit 1: rotation keeps the branch point too
        save(accelerator, tmp_path, step, limit=1)
    assert names(tmp_path) == ["abandoned-checkpoint-8", "checkpoint-4", "checkpoint-6"]
    again, moved = branch_from(tmp_path, 4)  # the same command again, as a Job's retry runs it
    assert again.path.name == "checkpoint-6" and again.abandoned == [] and moved == [], "the branch continues"
    assert resume_of(TrainingConfig(output_dir=tmp_path)).path.name == "checkpoint-6"


def test_a_different_command_in_between_makes_the_same_path_a_new_rollback(accelerator, tmp_path):

    for step in (2, 4):
        save(accelerator, tmp_path, step)
    branch_from(tmp_path, 2)
    save(accelerator, tmp_path, 3)
    record_start(TrainingConfig(output_dir=tmp_path), RunDir(tmp_path), 3, environ={})  # then `auto`: the branch is the run
    save(accelerator, tmp_path, 5, limit=1)
    assert names(tmp_path) == ["abandoned-checkpoint-4", "checkpoint-5"], "no longer kept for a retry"
    save(accelerator, tmp_path, 2)  # a checkpoint-2 again (copied back by the user, say), and back to it
    resume, moved = branch_from(tmp_path, 2)
    assert resume.path.name == "checkpoint-2" and [p.name for p in moved] == ["abandoned-checkpoint-5"]


def test_resuming_another_runs_checkpoint_sets_this_runs_later_ones_aside(accelerator, tmp_path):
    other, out = tmp_path / "other", tmp_path / "out"
    save(accelerator, other, 4)
    for step in (2, 4, 6):
        save(accelerator, out, step)
    config = TrainingConfig(output_dir=out, resume_from_checkpoint=str(other / "checkpoints" / "checkpoint-4"))
    resume = resume_of(config)
    assert resume.path == other / "checkpoints" / "checkpoint-4"
    assert [p.name for p in resume.abandoned] == ["checkpoint-4", "checkpoint-6"], "not this branch's"


def test_a_checkpoint_of_another_model_is_refused_naming_both():
    state = {"model": {"preset": "small", "config": {"block_out_channels": [32, 64], "sample_size": 16}}}
    with pytest.raises(CheckpointError, match=r"model_preset 'small', block_out_channels \[32, 64\].*model_preset "
                                              r"'tutorial', block_out_channels \[128, 256\]"):
        checkpoint.check_model(state, {"block_out_channels": [128, 256], "sample_size": 16},
                               checkpoint.Path("ckpt"), "tutorial")
    checkpoint.check_model(state, state["model"]["config"], checkpoint.Path("ckpt"), "small")  # the same: fine


BRANCH = [*TINY, "--save_image_epochs", "100", "--eval_quality_images", "0", "--logging_steps", "1"]


@pytest.fixture(scope="module")
def finished_at_8(tmp_path_factory):
    """A finished run with checkpoints 4 and 8 (the issue's scenario); tests copy it."""
    out = tmp_path_factory.mktemp("finished") / "out"
    ddpm("train", *BRANCH, "--output_dir", out, "--max_train_steps", "8", "--checkpointing_steps", "4")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-8"]
    return out


@pytest.mark.slow
def test_rolling_back_by_path_keeps_the_new_branch_and_the_command_is_retryable(finished_at_8, tmp_path):
    """Issue 17 case 3, the issue's scenario through the CLI: with checkpoints 4 and 8, `--resume_from_checkpoint
    .../checkpoint-4 --max_train_steps 7 --checkpointing_steps 1` kept the stale checkpoint-8 and rotated
    checkpoint-4 away; the same command again exited 2 (checkpoint-4 gone); auto-resume took checkpoint-8."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(finished_at_8, out, symlinks=True)
    ckpts = out / "checkpoints"
    eight = (ckpts / "checkpoint-8" / checkpoint.MANIFEST).read_text()
    back = [*BRANCH, "--output_dir", out, "--resume_from_checkpoint", ckpts / "checkpoint-4", "--max_train_steps", "7",
            "--checkpointing_steps", "1"]
    first = ddpm("train", *back)
    assert "checkpoint-8 is newer than resume_from_checkpoint" in first.stdout
    assert "set aside as abandoned-checkpoint-8" in first.stdout
    assert f"resumed from {ckpts / 'checkpoint-4'} at step 4" in first.stdout
    assert sorted(p.name for p in ckpts.iterdir()) == ["abandoned-checkpoint-8", "checkpoint-4", "checkpoint-5",
                                                        "checkpoint-6", "checkpoint-7"]
    assert (ckpts / "abandoned-checkpoint-8" / checkpoint.MANIFEST).read_text() == eight, "kept as it was"
    assert json.loads((out / "training_complete.json").read_text())["global_step"] == 7

    retry = ddpm("train", *back)  # the same command, as a retry runs it
    assert f"resumed from {ckpts / 'checkpoint-7'} at step 7" in retry.stdout, retry.stdout
    assert json.loads((out / "training_complete.json").read_text())["global_step"] == 7
    assert resume_of(TrainingConfig(output_dir=out)).path == ckpts / "checkpoint-7", \
        "auto continues the branch the user chose"


@pytest.mark.slow
def test_a_shorter_run_than_the_one_trained_is_refused_not_marked_complete(finished_at_8, tmp_path):
    """Issue 17 case 10: finishing at step 8, then `--max_train_steps 4` left a marker saying complete at step 8
    under a config that says 4 (and the push gate took that pipeline for the 4-step run). Refused, exit 2, with
    output_dir as it was; going back by path is how to end earlier."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(finished_at_8, out, symlinks=True)
    before = {str(p.relative_to(out)): p.read_bytes() if p.is_file() else None for p in sorted(out.rglob("*"))
              if p.name != ".ddpm-train.lock"}  # the lock file's content names its latest holder
    proc = ddpm("train", *BRANCH, "--output_dir", out, "--max_train_steps", "4", check=False)
    assert proc.returncode == EXIT_CONFIG and "Traceback" not in proc.stderr, proc.stderr
    assert "already trained to step 8 (checkpoint-8), past the 4 steps this config asks for" in proc.stderr
    assert "resume_from_checkpoint" in proc.stderr and "max_train_steps to 8 or more" in proc.stderr
    after = {str(p.relative_to(out)): p.read_bytes() if p.is_file() else None for p in sorted(out.rglob("*"))
             if p.name != ".ddpm-train.lock"}
    assert after == before
    assert json.loads((out / "training_complete.json").read_text())["global_step"] == 8


@pytest.mark.slow
def test_training_skips_a_damaged_checkpoint_and_refuses_when_none_is_intact(tmp_path):
    out = tmp_path / "out"
    args = [*TINY, "--output_dir", out, "--checkpointing_steps", "2", "--save_image_epochs", "100",
            "--eval_quality_images", "0", "--logging_steps", "2"]
    ddpm("train", *args, "--max_train_steps", "4")
    model = out / "checkpoints" / "checkpoint-4" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-10])  # the newest checkpoint is cut short
    proc = ddpm("train", *args, "--max_train_steps", "6")
    assert "checkpoint-4 is damaged (model.safetensors is" in proc.stdout
    assert f"resumed from {out / 'checkpoints' / 'checkpoint-2'} at step 2" in proc.stdout
    assert json.loads((out / "training_complete.json").read_text())["global_step"] == 6

    other = tmp_path / "other"  # another model (32 px) resuming this run's checkpoint: refused, naming both
    proc = ddpm("train", *TINY, "--output_dir", other, "--image_size", "32", "--resume_from_checkpoint",
                out / "checkpoints" / "checkpoint-6", check=False)
    assert proc.returncode == EXIT_CONFIG and "holds a different model (model_preset 'small'" in proc.stderr
    assert "sample_size 16) than this run (model_preset 'small', block_out_channels [32, 64, 64, 128], sample_size 32)" \
        in proc.stderr
    assert not other.exists()

    for ckpt in checkpoint.complete_checkpoints(RunDir(out)):
        (ckpt / "optimizer.bin").write_bytes(b"x")
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    proc = ddpm("train", *args, "--max_train_steps", "8", check=False)
    assert proc.returncode == EXIT_CONFIG and "no intact checkpoint" in proc.stderr and "optimizer.bin is 1 bytes" in proc.stderr
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before, "exit 2 changed nothing"



def test_a_pipeline_with_nonfinite_weights_is_never_saved_or_pushed(tmp_path):
    from diffusers import DDPMScheduler, UNet2DModel
    from safetensors.torch import load_file, save_file

    from trainer import hub
    from trainer.errors import Diverged, PushError
    from trainer.model import SMALL_UNET

    unet = UNet2DModel(**SMALL_UNET, sample_size=8)
    config = TrainingConfig(output_dir=tmp_path / "run", image_size=8, model_preset="small")
    (tmp_path / "run").mkdir()
    RunDir.of(config).save_pipeline(unet, DDPMScheduler())  # finite: saved
    with torch.no_grad():
        unet.conv_in.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(Diverged, match="NaN/inf"):
        RunDir.of(config).save_pipeline(unet, DDPMScheduler())
    weights = tmp_path / "run" / "unet" / "diffusion_pytorch_model.safetensors"
    assert all_finite(load_file(weights).values()), "the earlier, finite pipeline is still there"


    record = record_start(config, RunDir.of(config), 0, environ={})
    tampered = load_file(weights)
    tampered["conv_in.weight"][0, 0, 0, 0] = float("inf")
    save_file(tampered, weights)
    write_marker(config, RunDir.of(config), record, 1, 0, environ={})  # even a marker over them does not make them pushable
    with pytest.raises(PushError, match="holds NaN/inf weights"):
        hub.check_complete(RunDir(tmp_path / "run"))


def test_a_checkpoint_damaged_again_is_set_aside_next_to_the_first(three):
    """Issue 17 case 14: with damaged-checkpoint-6 already there (set aside by an earlier start), a new damaged
    checkpoint-6 made os.replace fail with ENOTEMPTY on every start: exit 1, retried forever by a Job."""
    aside = three / "checkpoints" / "damaged-checkpoint-6"
    aside.mkdir()
    (aside / "model.safetensors").write_bytes(b"the first post-mortem")
    DAMAGE["missing"][0](three / "checkpoints" / "checkpoint-6")
    resume = resume_of(TrainingConfig(output_dir=three))
    assert resume.path.name == "checkpoint-4"
    checkpoint.set_aside(resume.damaged)
    assert (aside / "model.safetensors").read_bytes() == b"the first post-mortem", "the first one is kept as it was"
    second = three / "checkpoints" / "damaged-checkpoint-6.2"
    assert (second / checkpoint.STATE_FILE).is_file(), "the second one is kept next to it"
    assert [p.name for p in checkpoint.complete_checkpoints(RunDir(three))] == ["checkpoint-2", "checkpoint-4"]
    assert resume_of(TrainingConfig(output_dir=three)).path.name == "checkpoint-4"
