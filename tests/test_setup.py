"""trainer.setup's decisions that need no training run: the run's global batch and the accumulation derived from it."""

import pytest

from trainer.config import TrainingConfig
from trainer.errors import ConfigError
from trainer.run_dir import RunDir
from trainer.setup import with_global_batch


def global_batch(config: TrainingConfig, world: int) -> TrainingConfig:
    return with_global_batch(config, RunDir.of(config), world)


def test_accumulation_is_derived_from_the_global_batch_for_each_process_count():
    config = TrainingConfig(train_batch_size=4, global_batch_size=16)
    assert [global_batch(config, world).gradient_accumulation_steps for world in (1, 2, 4)] == [4, 2, 1]


def test_a_global_batch_that_cannot_be_split_names_the_process_counts_that_can():
    with pytest.raises(ConfigError, match="the global batch of 12 images cannot be split into micro-batches of "
                                          "train_batch_size 4 over 2 processes; process counts that keep it: 1, 3"):
        global_batch(TrainingConfig(train_batch_size=4, global_batch_size=12), 2)


def test_without_one_the_run_keeps_the_global_batch_it_started_with(tmp_path):
    first = global_batch(TrainingConfig(output_dir=tmp_path, train_batch_size=4, gradient_accumulation_steps=2), 2)
    assert (first.global_batch_size, first.gradient_accumulation_steps) == (16, 2)
    RunDir(tmp_path).write_config(first)
    again = global_batch(TrainingConfig(output_dir=tmp_path, train_batch_size=4, gradient_accumulation_steps=2), 1)
    assert (again.global_batch_size, again.gradient_accumulation_steps) == (16, 4), "same run, one process left"
    other = global_batch(TrainingConfig(output_dir=tmp_path, train_batch_size=4, seed=7), 1)
    assert other.global_batch_size == 4, "another run (another seed) does not inherit it"
