"""trainer.run_dir: the one owner of output_dir's layout and of the run's files in it."""

import dataclasses

import pytest

from trainer import outputs
from trainer.config import TrainingConfig
from trainer.errors import OutputDirError
from trainer.run_dir import RunDir, marker_matches, record_start
from trainer.setup import with_global_batch


def test_every_path_of_the_layout_is_an_entry_the_output_dir_policy_knows_as_ours(tmp_path):
    """A path the run writes that trainer.outputs did not count as ours would make our own folder 'not ours'."""
    run_dir = RunDir(tmp_path)
    paths = [run_dir.config_file, run_dir.history_file, run_dir.marker_file, run_dir.lock_file, run_dir.model_card,
             run_dir.samples, run_dir.logs, run_dir.checkpoints, run_dir.data_cache, run_dir.unet,
             run_dir.checkpoint(3).parent, run_dir.grid(7).parent]
    assert {p.relative_to(tmp_path).parts[0] for p in paths} <= outputs.OUR_ENTRIES
    assert run_dir.grid(7).name == "0007.png" and outputs.WRITTEN_INSIDE["samples"].fullmatch("0007.png")


def test_the_data_cache_lives_in_output_dir_unless_data_cache_dir_says_elsewhere(tmp_path):
    assert RunDir.of(TrainingConfig(output_dir=tmp_path / "run")).data_cache == tmp_path / "run" / "data_cache"
    shared = RunDir.of(TrainingConfig(output_dir=tmp_path / "run", data_cache_dir=tmp_path / "shared"))
    assert shared.data_cache == tmp_path / "shared"


@pytest.mark.parametrize("content", ["image_size: [16\n", "- just\n- a list\n", b"\xff\xfe binary"])
def test_an_unreadable_saved_config_is_the_same_exit_2_for_every_reader(tmp_path, content):
    """One reader of training_config.yaml: the output_dir check, the global batch and the push gate agree."""
    config = TrainingConfig(output_dir=tmp_path, model_preset="small", image_size=16)
    run_dir = RunDir(tmp_path)
    run_dir.config_file.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(OutputDirError, match="training_config.yaml") as caught:
        run_dir.saved_config()
    assert caught.value.exit_code == 2
    with pytest.raises(OutputDirError, match="training_config.yaml"):
        outputs.plan_output_dir(config, run_dir)
    with pytest.raises(OutputDirError, match="training_config.yaml"):
        with_global_batch(config, run_dir, 1)
    (tmp_path / "training_complete.json").write_text("{}")
    matches, why = marker_matches(config, run_dir)
    assert not matches and "training_config.yaml" in why


def test_the_run_keeps_its_global_batch_from_either_record(tmp_path):
    """The rule "a run keeps the global batch it started with" is read from training_config.yaml, or from the
    history when a start stopped between its two records; another run never inherits it."""
    run_dir = RunDir(tmp_path)
    started = TrainingConfig(output_dir=tmp_path, train_batch_size=4, global_batch_size=16)
    record_start(started, run_dir, 0, environ={})
    same = TrainingConfig(output_dir=tmp_path, train_batch_size=4)
    assert run_dir.run_global_batch(same) == 16
    run_dir.config_file.unlink()
    assert run_dir.run_global_batch(same) == 16, "the history says it too"
    assert run_dir.run_global_batch(same.model_copy(update={"seed": 7})) is None, "another run"
    assert marker_matches(same, run_dir)[1].startswith("no completion marker")


def test_last_grid_is_the_newest_of_ours_by_number(tmp_path):
    run_dir = RunDir(tmp_path)
    assert run_dir.last_grid() is None
    run_dir.samples.mkdir()
    for name in ("9999.png", "10000.png", "my.png", "1.png", ".tmp-20000.png"):
        (run_dir.samples / name).write_bytes(b"png")
    assert run_dir.last_grid() == run_dir.samples / "10000.png"


def test_the_pipeline_mismatch_names_what_changed(tmp_path):
    run_dir = RunDir(tmp_path)
    (tmp_path / "model_index.json").write_text("{}")
    run_dir.unet.mkdir()
    (run_dir.unet / "config.json").write_text('{"sample_size": 16}')
    marker = {"pipeline": run_dir.pipeline_hashes()}
    assert run_dir.pipeline_mismatch(marker) == "" and run_dir.unet_config() == {"sample_size": 16}
    (run_dir.unet / "config.json").write_text('{"sample_size": 32}')
    assert run_dir.pipeline_mismatch(marker) == "unet/config.json changed since the run finished"
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text("{}")
    assert "unexpected ['scheduler/scheduler_config.json']" in run_dir.pipeline_mismatch(marker)


def test_a_run_dir_is_a_value_built_once(tmp_path):
    run_dir = RunDir.of(TrainingConfig(output_dir=tmp_path))
    with pytest.raises(dataclasses.FrozenInstanceError):
        run_dir.root = tmp_path / "elsewhere"
