"""output_dir safety, "exit 2 writes nothing", the run record and the completion marker (issue 9 sections 1, 2, 4)."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import TINY, clean_env, ddpm
from trainer import outputs
from trainer.config import TrainingConfig
from trainer.errors import EXIT_CONFIG, OutputDirError
from trainer.run_dir import RunDir, marker_matches, record_start, write_marker


def plan_for(config: TrainingConfig, config_file: Path | None = None) -> outputs.OutputPlan:
    return outputs.plan_output_dir(config, RunDir.of(config), config_file)


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under root with its bytes (None for folders): a snapshot to compare before and after."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def project(root: Path) -> Path:
    """A user's project folder: images they care about and a file of notes."""
    (root / "images").mkdir(parents=True)
    for i in range(6):
        Image.fromarray(np.full((16, 16, 3), 40 * i, dtype=np.uint8)).save(root / "images" / f"{i}.png")
    (root / "notes.txt").write_text("three weeks of notes")
    return root


# ---- 1. output_dir can never delete what is not ours ------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("output_dir", ["", "."])
def test_overwrite_in_a_project_folder_deletes_nothing(tmp_path, output_dir):
    """The issue's report: `--output_dir '' --overwrite_output_dir true` inside a project folder deleted the
    user's images and notes. Now: exit 2, every file as it was."""
    root = project(tmp_path)
    before = tree(root)
    proc = ddpm("train", "--output_dir", output_dir, "--overwrite_output_dir", "true", "--dataset_name",
                "imagefolder", "--train_data_dir", "images", "--model_preset", "small", "--image_size", "16",
                cwd=root, check=False)
    assert proc.returncode == EXIT_CONFIG, proc.stderr
    assert "Traceback" not in proc.stderr
    expected = "output_dir: Value error, must not be empty" if output_dir == "" else "contains train_data_dir images"
    assert expected in proc.stderr
    assert tree(root) == before


def test_empty_output_dir_is_a_config_error():
    with pytest.raises(ValueError, match="must not be empty"):
        TrainingConfig(output_dir="")


def run_folder(out: Path, **changes) -> TrainingConfig:
    """A folder that holds a finished run of ours (its config and the usual layout)."""
    config = TrainingConfig(output_dir=out, model_preset="small", image_size=16, **changes)
    (out / "samples").mkdir(parents=True)
    (out / "samples" / "0000.png").write_bytes(b"png")
    (out / "checkpoints" / "checkpoint-5").mkdir(parents=True)
    RunDir.of(config).write_config(config)
    return config


def test_a_folder_that_is_not_ours_is_never_cleared(tmp_path):
    out = tmp_path / "out"
    run_folder(out)
    (out / "thesis.tex").write_text("mine")
    config = TrainingConfig(output_dir=out, model_preset="small", image_size=32, overwrite_output_dir=True)
    with pytest.raises(OutputDirError, match=r"also holds files that are not a ddpm-trainer run's \(thesis.tex\)"):
        plan_for(config)


def test_overwrite_clears_only_our_run_and_keeps_the_data_cache(tmp_path):
    out = tmp_path / "out"
    run_folder(out)
    (out / "data_cache").mkdir()
    (out / "data_cache" / "x.npy").write_bytes(b"cache")
    config = TrainingConfig(output_dir=out, model_preset="small", image_size=32, overwrite_output_dir=True)
    plan = plan_for(config)
    assert plan.action == "clear" and "image_size: 16 -> 32" in plan.reason
    outputs.clear_output_dir(RunDir.of(config))
    assert sorted(p.name for p in out.iterdir()) == ["data_cache"]
    assert (out / "data_cache" / "x.npy").read_bytes() == b"cache"


def test_overwrite_deletes_only_what_the_run_wrote_inside_its_folders(tmp_path):
    """Issue 17 case 5: overwrite_output_dir deleted samples/, logs/ and checkpoints/ whole, the user's own files in
    them too. Only what a run writes there is ours: grids samples/<epoch>.png, TensorBoard's files under logs/train,
    checkpoints/[damaged-|abandoned-|.tmp-]checkpoint-<step>."""
    out = tmp_path / "out"
    run_folder(out)
    ours = {"samples/0000.png": "grid", "samples/12345.png": "grid", "logs/train/events.out.tfevents.1.vm.7.0": "tb",
            "logs/train/1796528940.4718294/events.out.tfevents.1.vm.7.1": "tb",
            "logs/train/1796528940.475033/hparams.yml": "tb", "checkpoints/damaged-checkpoint-3.2/model.safetensors": "x",
            "checkpoints/.tmp-checkpoint-7/model.safetensors": "x"}
    users = {"samples/my.png": "mine", "logs/notes.txt": "mine", "logs/train/notes.txt": "mine",
             "checkpoints/my-best/model.safetensors": "mine", "samples/0001.png.bak": "mine"}
    for name, text in {**ours, **users}.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    config = TrainingConfig(output_dir=out, model_preset="small", image_size=32, overwrite_output_dir=True)
    assert plan_for(config).action == "clear"
    outputs.clear_output_dir(RunDir.of(config))
    assert {name: (out / name).read_text() for name in users if (out / name).is_file()} == users
    left = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert left == set(users), "everything the run wrote is gone, the rest is kept"
    assert not (out / "logs" / "train" / "1796528940.475033").exists(), "emptied folders of ours go too"
    (out / "samples" / "0009.png").write_text("grid")
    (out / "samples" / "0010.png").write_text("grid")
    assert RunDir(out).last_grid() == out / "samples" / "0010.png", "the model card shows our last grid, not my.png"


def test_overwrite_refuses_to_delete_the_config_file_or_a_chosen_cache(tmp_path):
    out = tmp_path / "out"
    run_folder(out)
    config_file = out / "my.yaml"
    config_file.write_text("image_size: 16\n")  # the user's own file: resuming with it is fine
    assert plan_for(TrainingConfig(output_dir=out, image_size=16, model_preset="small"),
                                   config_file).action == "continue"
    with pytest.raises(OutputDirError, match=r"also holds files that are not a ddpm-trainer run's \(my.yaml\)"):
        plan_for(TrainingConfig(output_dir=out, image_size=32, model_preset="small",
                                               overwrite_output_dir=True), config_file)
    config_file.unlink()
    ours = out / "training_config.yaml"  # resuming with the run's own config file is fine...
    plan = plan_for(TrainingConfig(output_dir=out, image_size=16, model_preset="small"), ours)
    assert plan.action == "continue"
    with pytest.raises(OutputDirError, match="holds the config file in use"):  # ...clearing it is not
        plan_for(TrainingConfig(output_dir=out, image_size=32, model_preset="small",
                                               overwrite_output_dir=True), ours)
    (out / "data_cache").mkdir()
    with pytest.raises(OutputDirError, match="holds data_cache_dir"):
        plan_for(TrainingConfig(output_dir=out, image_size=32, model_preset="small",
                                               overwrite_output_dir=True, data_cache_dir=out / "data_cache" / "x"))


def test_only_our_own_temporaries_are_removed_at_start(tmp_path):
    """Issue 17 case 6 in output_dir: every top-level `.tmp-*` was taken for an interrupted write of ours and
    deleted at the next start, a user's `.tmp-notes.txt` too. Ours have names of our own."""
    out = tmp_path / "out"
    run_folder(out)
    ours = [out / ".tmp-pipeline" / "unet", out / ".tmp-old-unet", out / ".tmp-training_config.yaml"]
    for path in ours:
        path.mkdir(parents=True) if path.name in ("unet", ".tmp-old-unet") else path.write_text("half")
    (out / ".tmp-notes.txt").write_text("mine")
    assert plan_for(TrainingConfig(output_dir=out, model_preset="small", image_size=16)).action \
        == "continue"
    RunDir(out).remove_temporary()
    assert not any(path.exists() for path in ours) and not (out / ".tmp-pipeline").exists()
    assert (out / ".tmp-notes.txt").read_text() == "mine"
    with pytest.raises(OutputDirError, match=r"not a ddpm-trainer run's \(.tmp-notes.txt\)"):
        plan_for(TrainingConfig(output_dir=out, model_preset="small", image_size=32,
                                               overwrite_output_dir=True))


def test_a_folder_that_only_uses_our_names_is_not_taken_for_our_run(tmp_path, capsys):
    """Issue 17 case 1: with no training_config.yaml, a folder whose every entry had one of our names was taken for
    a run of ours that stopped early: `ddpm train` overwrote the user's README.md and samples/0000.png and exited 0.
    A folder is ours only if it carries our own record of a run."""
    from trainer.cli import main

    user = tmp_path / "u"
    (user / "samples").mkdir(parents=True)
    (user / "README.md").write_text("mine")
    (user / "samples" / "0000.png").write_text("pic")
    (tmp_path / "v" / "data_cache").mkdir(parents=True)  # our names only, but not our cache files either
    (tmp_path / "v" / "data_cache" / "photos.npy").write_text("mine")
    for folder in (user, tmp_path / "v"):
        before = tree(folder)
        code = main(["train", *map(str, TINY), "--output_dir", str(folder), "--max_train_steps", "2"])
        err = capsys.readouterr().err
        assert code == EXIT_CONFIG and f"output_dir {folder} is not empty and is not a ddpm-trainer run" in err, err
        assert tree(folder) == before


@pytest.mark.slow
def test_our_own_folder_that_crashed_before_its_record_still_continues(tmp_path):
    """What a run of ours leaves when it dies (SIGKILL, node loss) after its first writes (the lock, the data cache)
    and before its record: that folder is still ours, and the same command simply continues it."""
    import subprocess
    import sys

    from conftest import REPO

    out = tmp_path / "out"
    args = [*TINY, "--output_dir", out, "--max_train_steps", "1", "--save_image_epochs", "100"]
    code = ("import os, sys; import trainer.setup as setup\n"
            "setup.start_run = lambda *a: os._exit(9)\n"
            "from trainer.main import entrypoint\nsys.argv = ['ddpm', 'train', *sys.argv[1:]]\nentrypoint()\n")
    crash = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=REPO, env=clean_env(),
                           capture_output=True, text=True)
    assert crash.returncode == 9, crash.stderr
    assert sorted(p.name for p in out.iterdir()) == [".ddpm-train.lock", "data_cache"]
    config = TrainingConfig(output_dir=out, model_preset="small", image_size=16)
    assert plan_for(config).action == "continue"
    ddpm("train", *args)
    assert (out / "training_complete.json").is_file()


def recorded_run(out: Path, *args) -> TrainingConfig:
    """The record `ddpm train TINY --output_dir out *args` writes when it begins (its resolved config), as a run of
    ours that the same command continues."""
    from trainer.cli import build_parser
    from trainer.config_loading import load_config
    from trainer.setup import with_global_batch

    parser, sources = build_parser()
    parsed, unknown = parser.parse_known_args(["train", *map(str, TINY), "--output_dir", str(out), *map(str, args)])
    config = with_global_batch(load_config(parsed, unknown, sources["train"])[0], RunDir(out), 1)
    out.mkdir(parents=True, exist_ok=True)
    RunDir(out).write_config(config)
    return config


def outside(tmp_path: Path) -> Path:
    """A user's folder elsewhere: what a link in output_dir must never let a run write into or delete."""
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "0000.png").write_text("my holiday")
    (photos / "checkpoint-1").mkdir()
    (photos / "notes.md").write_text("mine")
    return photos


def test_a_link_in_output_dir_is_never_written_through(tmp_path, capsys):
    """Issue 17 case 2: `ln -s ~/photos out/samples`, and a run replaced photos/0000.png with a sample grid. Now a
    link in our part of output_dir that leads outside it is refused with exit 2 before anything is written."""
    from trainer.cli import main

    photos = outside(tmp_path)
    out = tmp_path / "out"
    recorded_run(out, "--max_train_steps", "1", "--save_image_epochs", "1")
    (out / "samples").symlink_to(photos)
    before, theirs = tree(out), tree(photos)
    code = main(["train", *map(str, TINY), "--output_dir", str(out), "--max_train_steps", "1",
                 "--save_image_epochs", "1"])
    err = capsys.readouterr().err
    assert code == EXIT_CONFIG and f"output_dir {out} holds links that lead outside it (samples -> {photos})" in err, err
    assert tree(photos) == theirs and tree(out) == before


@pytest.mark.parametrize("link", ["checkpoints", "README.md", "samples/0001.png", "logs/train", ".ddpm-train.lock",
                                  "data_cache"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_every_link_leading_outside_is_refused_with_or_without_overwrite(tmp_path, link, overwrite):
    photos = outside(tmp_path)
    out = tmp_path / "out"
    run_folder(out)
    (out / "logs").mkdir()
    target = photos if link in ("checkpoints", "logs/train", "data_cache") else photos / "notes.md"
    if (out / link).is_dir():
        shutil.rmtree(out / link)
    (out / link).symlink_to(target)
    before, theirs = tree(out), tree(photos)
    config = TrainingConfig(output_dir=out, model_preset="small", image_size=32 if overwrite else 16,
                            overwrite_output_dir=overwrite)
    with pytest.raises(OutputDirError, match=f"holds links that lead outside it \\({link} -> {target}\\)"):
        plan_for(config)
    assert tree(out) == before and tree(photos) == theirs
    if link == ".ddpm-train.lock":  # the lock-only folder is a new one, and still never written through
        for entry in ("samples", "checkpoints", "training_config.yaml"):
            p = out / entry
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        with pytest.raises(OutputDirError, match="holds links that lead outside it"):
            plan_for(config)


def test_links_that_stay_inside_or_are_not_ours_are_left_alone(tmp_path):
    photos = outside(tmp_path)
    out = tmp_path / "out"
    config = run_folder(out)
    (out / "samples" / "latest.png").symlink_to(out / "samples" / "0000.png")  # stays inside output_dir
    (out / "my-photos").symlink_to(photos)  # the user's own entry: a run never writes there
    assert plan_for(config).action == "continue"
    (out / "logs").symlink_to(out / "logs")  # a loop: where it leads cannot be told, so it is refused
    with pytest.raises(OutputDirError, match="holds links that lead outside it"):
        plan_for(config)


def test_inputs_and_outputs_never_nest(tmp_path):
    images = project(tmp_path) / "images"
    for out, words in ((images, "is the same folder as"), (images / "run", "is inside"), (tmp_path, "contains")):
        config = TrainingConfig(output_dir=out, dataset_name="imagefolder", train_data_dir=images)
        with pytest.raises(OutputDirError, match=f"it {words} train_data_dir"):
            plan_for(config)
    with pytest.raises(OutputDirError, match="inside data_cache_dir"):
        plan_for(TrainingConfig(output_dir=tmp_path / "c" / "run", data_cache_dir=tmp_path / "c"))


def test_a_different_run_without_overwrite_is_refused(tmp_path):
    out = tmp_path / "out"
    run_folder(out)
    with pytest.raises(OutputDirError, match="holds a different run .*image_size: 16 -> 32.*overwrite_output_dir"):
        plan_for(TrainingConfig(output_dir=out, model_preset="small", image_size=32))
    assert plan_for(TrainingConfig(output_dir=out, model_preset="small", image_size=16,
                                                  max_grad_norm=0.5)).action == "continue"


def test_space_preflight_counts_the_checkpoints_the_run_will_keep(tmp_path):
    config = TrainingConfig(output_dir=tmp_path / "run", checkpoints_total_limit=3)
    free = outputs.shutil.disk_usage(tmp_path).free
    with pytest.raises(OutputDirError, match=r"4 more checkpoint\(s\) .* checkpoints_total_limit 3"):
        outputs.check_space(config.output_dir, config.checkpoints_total_limit, free // 4 + 1, 0, existing_checkpoints=0)
    outputs.check_space(config.output_dir, config.checkpoints_total_limit, free // 4 + 1, 0, existing_checkpoints=3)  # 3 exist: one more at a time
    blocker = tmp_path / "file"
    blocker.write_text("x")
    os.chmod(tmp_path, 0o500)
    try:
        if not os.access(tmp_path, os.W_OK):  # root may write anyway: then only the space check applies
            with pytest.raises(OutputDirError, match="not writable"):
                outputs.check_space(config.output_dir, config.checkpoints_total_limit, 1, 0, 0)
    finally:
        os.chmod(tmp_path, 0o700)


# ---- 2. exit 2 writes nothing; the corrected command simply works ------------------------------------------------

@pytest.mark.slow
def test_user_errors_write_nothing_and_the_corrected_command_works(tmp_path, capsys):
    from trainer.cli import main

    root = project(tmp_path)
    empty, corrupt = root / "empty", root / "corrupt"
    empty.mkdir()
    corrupt.mkdir()
    (corrupt / "a.png").write_bytes(b"not an image")
    out = root / "run"
    base = [*TINY, "--output_dir", out, "--max_train_steps", "2", "--eval_quality_images", "0",
            "--train_batch_size", "2"]
    folder = ["--dataset_name", "imagefolder"]
    cases = {
        "typo in train_data_dir": ([*folder, "--train_data_dir", root / "imgaes"], "does not exist"),
        "empty folder": ([*folder, "--train_data_dir", empty], "holds no images"),
        "all corrupt": ([*folder, "--train_data_dir", corrupt], "no readable images"),
        "latest without a checkpoint": ([*folder, "--train_data_dir", root / "images", "--resume_from_checkpoint",
                                         "latest"], "latest: no checkpoint"),
        "missing resume path": ([*folder, "--train_data_dir", root / "images", "--resume_from_checkpoint",
                                 root / "nope"], "is not a checkpoint folder"),
        "Hub dataset not reachable offline": (["--dataset_name", "someone/butterflies"],
                                              "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set"),
    }
    before = tree(root)
    for name, (extra, message) in cases.items():  # in-process: the same CLI, without a new interpreter each time
        code = main(["train", *map(str, base), *map(str, extra)])
        err = capsys.readouterr().err
        assert code == EXIT_CONFIG and message in err, f"{name}: {code}\n{err}"
        assert tree(root) == before, f"{name} left files behind"
    ddpm("train", *base, *folder, "--train_data_dir", root / "images")  # the corrected command
    assert (out / "training_complete.json").is_file()


def test_a_data_error_after_the_cache_was_built_writes_nothing(tmp_path, capsys):
    """Issue 17 case 18: one 1x1 image is smaller than a global batch, an exit 2 found after the data cache was
    built: a new output_dir was left holding data_cache/. Now a new output_dir is not created at all, and an
    existing one (here: with the cache of other images in it) is left exactly as it was."""
    from trainer.cli import main

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((1, 1, 3), dtype=np.uint8)).save(images / "a.png")
    existing = tmp_path / "existing"
    (existing / "data_cache").mkdir(parents=True)
    (existing / "data_cache" / "other-16px-0123456789abcdef.npy").write_bytes(b"another cache")
    before = tree(existing)
    for out in (tmp_path / "new", existing):
        code = main(["train", *map(str, TINY), "--output_dir", str(out), "--dataset_name", "imagefolder",
                     "--train_data_dir", str(images), "--max_train_steps", "1"])
        err = capsys.readouterr().err
        assert code == EXIT_CONFIG and "the dataset (1 images) is smaller than one global batch" in err, err
    assert not (tmp_path / "new").exists()
    assert tree(existing) == before


@pytest.mark.slow
def test_a_read_only_output_dir_is_exit_2_not_writable(tmp_path):
    """Issue 17 case 15: on a read-only volume the lock was taken before the writability check, so `ddpm train`
    died with `OSError EROFS ... .ddpm-train.lock` (exit 1, retried). A read-only bind mount in a mount namespace of
    its own (it goes with the process: nothing global is left behind), through the real CLI."""
    import subprocess
    import sys

    from conftest import REPO

    volume = tmp_path / "volume"
    (volume / "run").mkdir(parents=True)
    logs = tmp_path / "logs"
    logs.mkdir()
    train = [sys.executable, "-m", "trainer", "train", *TINY, "--max_train_steps", "1"]
    runs = "\n".join(f"{' '.join(train)} --output_dir {volume / name} >{logs / name}.out 2>{logs / name}.err; "
                     f"echo $? >{logs / name}.code" for name in ("run", "new"))  # an empty folder; a new one
    script = f"mount --bind {volume} {volume} && mount -o remount,bind,ro {volume} && touch {volume}/probe\n" \
             f"echo $? >{logs}/probe.code\n{runs}\n"
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], cwd=REPO,
                          env=clean_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (logs / "probe.code").read_text().strip() != "0", "the volume was read-only for the trainer"
    for name in ("run", "new"):
        err = (logs / f"{name}.err").read_text()
        assert (logs / f"{name}.code").read_text().strip() == "2", err
        assert f"output_dir {volume / name} is not writable" in err and "Traceback" not in err
    assert tree(volume) == {"run": None}


@pytest.mark.slow
def test_a_file_size_limit_while_saving_a_checkpoint_is_exit_2_and_leaves_no_temporary_folder(tmp_path):
    """Issue 17 case 13 for real: under a file size limit (ulimit -f) the checkpoint's first file fails with EFBIG
    (safetensors: 'File too large (os error 27)'); it was a traceback, exit 1, .tmp-checkpoint-1 left behind."""
    import resource
    import subprocess
    import sys

    from conftest import REPO

    out = tmp_path / "out"
    limit = 2**20  # the data cache, the config and the logs fit; the 12 MB model.safetensors does not

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run([sys.executable, "-m", "trainer", "train", *map(str, TINY), "--output_dir", str(out),
                           "--max_train_steps", "2", "--checkpointing_steps", "1", "--save_image_epochs", "100"],
                          cwd=REPO, env=clean_env(), capture_output=True, text=True, preexec_fn=limited)
    assert proc.returncode == EXIT_CONFIG, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "no space left on device while writing checkpoint checkpoint-1 to" in proc.stderr
    assert "File too large: the file size limit (ulimit -f) is 1 MiB" in proc.stderr
    assert list((out / "checkpoints").iterdir()) == [], "no .tmp-checkpoint-1 left behind"
    assert not (out / "training_complete.json").exists()


def test_any_other_write_that_runs_out_of_room_is_exit_2_saying_so(tmp_path, monkeypatch):
    """Writes without a message of their own (the run record, the marker, TensorBoard's first file): a full disk
    is still the exit-2 disk-full error, not a traceback and exit 1."""
    import errno

    from trainer import loop

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "config_history.jsonl"))

    monkeypatch.setattr(loop, "setup", full)
    with pytest.raises(OutputDirError, match="no space left on device while writing the run's outputs") as caught:
        loop.train(TrainingConfig(output_dir=tmp_path))
    assert caught.value.exit_code == EXIT_CONFIG


SAVES_UNDER_A_FILE_SIZE_LIMIT = """
import json, resource, sys
from pathlib import Path
import numpy as np
from diffusers import DDPMScheduler, UNet2DModel
from PIL import Image
from trainer.config import TrainingConfig
from trainer.errors import OutputDirError
from trainer.run_dir import RunDir
from trainer.model import SMALL_UNET

out = Path(sys.argv[1])
config = TrainingConfig(output_dir=out, image_size=8, model_preset="small")
unet = UNet2DModel(**SMALL_UNET, sample_size=8)
RunDir(out).save_pipeline(unet, DDPMScheduler())  # the previous pipeline, saved with room to spare
grid = Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))
resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY))
results = {}
for what, save in (("pipeline", lambda: RunDir(out).save_pipeline(unet, DDPMScheduler())),
                   ("model card", lambda: RunDir(out).write_model_card(config, 7, None)),
                   ("grid", lambda: RunDir(out).save_grid(grid, 3))):
    try:
        save()
        results[what] = "saved"
    except OutputDirError as e:
        results[what] = [e.exit_code, str(e)]
print(json.dumps(results))
"""


@pytest.mark.slow
def test_the_pipeline_model_card_and_grid_under_a_full_disk_say_so_and_leave_nothing_half_written(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-c", SAVES_UNDER_A_FILE_SIZE_LIMIT, str(out)], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.splitlines()[-1])
    for what, where in (("pipeline", "the pipeline"), ("model card", "the model card"), ("grid", "sample grid")):
        code, message = results[what]
        assert code == EXIT_CONFIG and f"no space left on device while writing {where}" in message, message
        assert "File too large" in message
    assert sorted(p.name for p in out.iterdir()) == ["model_index.json", "samples", "scheduler", "unet"], \
        "no temporary left, no half-written README.md"
    assert list((out / "samples").iterdir()) == []
    from diffusers import DDPMPipeline

    DDPMPipeline.from_pretrained(out)  # the previous pipeline is intact


# ---- 4. the run record and the completion marker -----------------------------------------------------------------

def test_run_id_is_kept_on_resume_and_new_for_an_extension_and_history_records_changes(tmp_path):
    config = TrainingConfig(output_dir=tmp_path, max_train_steps=10)
    first = record_start(config, RunDir(tmp_path), step=0, environ={})
    again = record_start(config, RunDir(tmp_path), step=4, environ={})
    assert again.run_id == first.run_id and again.changes == {}
    tuned = record_start(config.model_copy(update={"max_grad_norm": 0.5}), RunDir(tmp_path), step=6, environ={})
    assert tuned.run_id == first.run_id and tuned.changes == {"max_grad_norm": [1.0, 0.5]}
    longer = record_start(config.model_copy(update={"max_grad_norm": 0.5, "max_train_steps": 20}),
                                     RunDir(tmp_path), step=10, environ={})
    assert longer.run_id != first.run_id
    history = RunDir(tmp_path).read_history()
    assert [(h["step"], h["changes"]) for h in history] == [
        (0, {}), (6, {"max_grad_norm": [1.0, 0.5]}), (10, {"max_train_steps": [10, 20]})]
    assert history[-1]["config"]["max_grad_norm"] == 0.5
    assert yaml.safe_load((tmp_path / "training_config.yaml").read_text())["max_train_steps"] == 20


def test_the_workload_is_part_of_the_run_id_and_the_marker(tmp_path):
    config = TrainingConfig(output_dir=tmp_path / "a")
    env = {"POD_NAME": "ddpm-train-0-x", "POD_NAMESPACE": "vision", "TRAINING_WORKLOAD": "Job/ddpm-train"}
    (tmp_path / "a").mkdir()
    record = record_start(config, RunDir.of(config), 0, env)
    assert RunDir(tmp_path / "a").read_history()[0]["kubernetes"] == {
        "pod": "ddpm-train-0-x", "namespace": "vision", "workload": "Job/ddpm-train"}
    (tmp_path / "a" / "model_index.json").write_text("{}")
    marker = json.loads(write_marker(config, RunDir.of(config), record, 3, 0, env).read_text())
    assert marker["kubernetes"]["workload"] == "Job/ddpm-train" and marker["run_id"] == record.run_id
    assert marker_matches(config, RunDir.of(config), "Job/ddpm-train")[0]
    assert not marker_matches(config, RunDir.of(config), "Job/other-train")[0]


def finished_run(out: Path, steps: int = 4) -> list:
    args = [*TINY, "--output_dir", out, "--save_image_epochs", "100", "--eval_quality_images", "0",
            "--checkpointing_steps", "100", "--logging_steps", "2"]
    ddpm("train", *args, "--max_train_steps", steps)
    return args


@pytest.mark.slow
def test_marker_is_removed_when_training_starts_and_an_extension_never_pushes_the_old_model(tmp_path):
    out = tmp_path / "out"
    args = finished_run(out, steps=4)
    marker = json.loads((out / "training_complete.json").read_text())
    assert marker["global_step"] == 4 and set(marker["pipeline"]) >= {"model_index.json",
                                                                       "unet/diffusion_pytorch_model.safetensors"}
    config = TrainingConfig(**yaml.safe_load((out / "training_config.yaml").read_text()))
    assert marker_matches(config, RunDir(out)) == (True, f"run {marker['run_id']} finished at step 4")

    # The extension dies hard (os._exit, as on SIGKILL) in its first update, after it has started training.
    crash = _crash_after_start([*args, "--max_train_steps", "8"])
    assert crash.returncode == 9, crash.stderr
    assert not (out / "training_complete.json").exists(), "the old marker was removed when training started"
    longer = config.model_copy(update={"max_train_steps": 8})
    matches, why = marker_matches(longer, RunDir(out))
    assert not matches and "no completion marker" in why
    push = ddpm("push", "--output_dir", out, "--hub_model_id", "me/x", "--dry-run", check=False)
    assert push.returncode == EXIT_CONFIG and "is not complete" in push.stderr


def _crash_after_start(args):
    """`ddpm train` that dies hard right after its first optimizer update (after the run began)."""
    import subprocess
    import sys

    from conftest import REPO

    code = ("import os, sys; import trainer.loop as loop; real = loop.train_step\n"
            "def step(*a):\n    real(*a)\n    os._exit(9)\n"
            "loop.train_step = step\nfrom trainer.main import entrypoint\nsys.argv = ['ddpm', 'train', *sys.argv[1:]]\n"
            "entrypoint()\n")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True)


@pytest.mark.slow
def test_push_refuses_a_pipeline_that_is_not_the_markers(tmp_path):
    out = tmp_path / "out"
    finished_run(out)
    weights = out / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")  # rewritten after the run finished
    proc = ddpm("push", "--output_dir", out, "--hub_model_id", "me/x", "--dry-run", check=False)
    assert proc.returncode == EXIT_CONFIG
    assert "is not the one the completion marker describes" in proc.stderr
    assert "unet/diffusion_pytorch_model.safetensors changed since the run finished" in proc.stderr
