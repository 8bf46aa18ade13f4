import numpy as np
import pytest
import torch
from PIL import Image

from trainer import data, data_cache
from trainer.builtin_data import ButterflyImages, render_butterfly
from trainer.config import TrainingConfig


def test_builtin_is_deterministic_symmetric_and_distinct():
    a, b = ButterflyImages(1000, 32), ButterflyImages(1000, 32)
    assert len(a) == 1000
    assert np.array_equal(np.asarray(a[123]), np.asarray(b[123]))
    arrays = [np.asarray(a[i]) for i in range(0, 1000, 7)]
    for arr in arrays:
        assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8
        assert np.array_equal(arr, arr[:, ::-1]), "left-right symmetric"
    assert len({arr.tobytes() for arr in arrays}) == len(arrays), "distinct"
    # all 1000 distinct, cheaply: hash every image at a small size
    assert len({render_butterfly(i, 8).tobytes() for i in range(1000)}) == 1000


def test_builtin_has_plain_background_and_a_coloured_figure():
    img = np.asarray(render_butterfly(5, 64)).astype(int)
    corners = np.stack([img[0, 0], img[0, -1], img[-1, 0], img[-1, -1]])
    assert (corners == corners[0]).all(), "plain background"
    figure = np.abs(img - corners[0]).sum(-1) > 60
    assert 0.1 < figure.mean() < 0.8
    assert img[figure].std(0).mean() > 10, "the wings are coloured, not one flat shade"


@pytest.mark.parametrize("size", [8, 24, 128])
def test_builtin_any_size(size):
    assert render_butterfly(0, size).size == (size, size)


def make_folder(root):
    root.mkdir()
    arr = np.zeros((40, 30, 3), dtype=np.uint8)
    arr[:, 15:] = 255  # black left half, white right half: the range must reach about -1 and 1
    rgb = Image.fromarray(arr)
    rgb.save(root / "rgb.jpg")
    rgb.convert("L").save(root / "gray.png")
    rgb.convert("RGBA").save(root / "rgba.png")
    rgb.convert("P").save(root / "palette.png")
    rgb.convert("CMYK").save(root / "cmyk.jpg")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    return root


def test_imagefolder_converts_modes_and_skips_corrupt(tmp_path):
    folder = make_folder(tmp_path / "imgs")
    config = TrainingConfig(dataset_name="imagefolder", train_data_dir=folder, image_size=16)
    source = data.load_image_source(config)
    assert len(source) == 5
    assert len(source.skipped) == 1 and "corrupt.png" in source.skipped[0]
    dataset = data.TrainDataset(source, data.build_transform(config))
    batch = data.to_model_range(torch.stack([dataset[i] for i in range(len(dataset))]))
    assert batch.shape == (5, 3, 16, 16)
    assert batch.min() >= -1 and batch.max() <= 1 and batch.min() < -0.9 and batch.max() > 0.9


def test_center_crop_keeps_aspect(tmp_path):
    config = TrainingConfig(image_size=8, center_crop=True)
    img = Image.new("RGB", (40, 20), "red")
    img.paste(Image.new("RGB", (5, 20), "blue"), (0, 0))  # a blue band at the left edge: cropped away
    out = data.to_model_range(data.build_transform(config)(img))
    assert out.shape == (3, 8, 8)
    red = torch.tensor([1.0, -1.0, -1.0])[:, None, None]
    assert torch.allclose(out, red.expand(3, 8, 8), atol=0.02)
    squashed = data.to_model_range(data.build_transform(TrainingConfig(image_size=8))(img))  # the tutorial's Resize((s, s)) keeps it
    assert squashed[2, :, 0].mean() > 0


def test_missing_and_empty_folder_errors(tmp_path):
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_image_source(TrainingConfig(dataset_name="imagefolder", train_data_dir=tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match="holds no images"):
        data.load_image_source(TrainingConfig(dataset_name="imagefolder", train_data_dir=tmp_path / "empty"))


def test_all_corrupt_is_an_error(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "bad.png").write_bytes(b"garbage")
    with pytest.raises(data.DataError, match="no readable images"):
        data.load_image_source(TrainingConfig(dataset_name="imagefolder", train_data_dir=tmp_path / "d"))


def test_hub_id_offline_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(data.DataError) as e:
        data.load_image_source(TrainingConfig(dataset_name="huggan/smithsonian_butterflies_subset"))
    assert "HF_HUB_OFFLINE" in str(e.value) and "imagefolder" in str(e.value)


def test_workers_follow_affinity_not_node(monkeypatch):
    monkeypatch.setattr(data.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7, 8})
    assert data.available_cpus() <= 9
    monkeypatch.setattr(data, "available_cpus", lambda: 9)
    assert data.default_num_workers(local_world_size=1) == 8
    assert data.default_num_workers(local_world_size=4) == 1
    monkeypatch.setattr(data, "available_cpus", lambda: 1)
    assert data.default_num_workers(local_world_size=1) == 0


def test_data_cache_matches_decoding_and_is_reused(tmp_path):
    folder = make_folder(tmp_path / "imgs")
    config = TrainingConfig(dataset_name="imagefolder", train_data_dir=folder, image_size=16,
                            output_dir=tmp_path / "run")
    decoded = data.TrainDataset(data.load_image_source(config), data.build_transform(config))

    source = data.load_image_source(config, scan=False)
    cached, built = data_cache.cached_dataset(config, source)
    assert built and len(cached) == len(decoded) == 5
    assert len(source.skipped) == 1 and "corrupt.png" in source.skipped[0], "the build pass finds corrupt files"
    for i in range(5):
        assert cached[i].dtype == torch.uint8 and torch.equal(cached[i], decoded[i]), "same pixels as decoding"

    again, built = data_cache.cached_dataset(config, data.load_image_source(config, scan=False))
    assert not built and torch.equal(again[4], cached[4]), "a second run maps the same file"
    other = TrainingConfig(dataset_name="imagefolder", train_data_dir=folder, image_size=8, output_dir=tmp_path / "run")
    assert data_cache.cache_path(other, source) != data_cache.cache_path(config, source), "size is part of the key"
    (folder / "new.png").write_bytes((folder / "gray.png").read_bytes())
    assert data_cache.cache_path(config, data.load_image_source(config, scan=False)) != data_cache.cache_path(
        config, source), "new files make a new cache"


def test_failed_cache_build_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    config = TrainingConfig(image_size=8, builtin_num_images=8, data_cache_dir=tmp_path / "cache")
    real_write = data_cache._write

    def disk_full(config, source, tmp):
        real_write(config, source, tmp)  # the whole array is on disk under its temporary name...
        raise OSError(28, "No space left on device")  # ...when the sidecar cannot be written

    monkeypatch.setattr(data_cache, "_write", disk_full)
    with pytest.raises(data.DataError, match="cannot write the data cache .* data_cache_dir"):
        data_cache.cached_dataset(config, data.load_image_source(config, scan=False))
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.setattr(data_cache, "_write", real_write)
    assert data_cache.cached_dataset(config, data.load_image_source(config, scan=False))[1]


def test_training_with_and_without_the_cache_is_identical(tmp_path):
    """The cache changes where pixels come from, not the pixels: the same run, bit for bit."""
    from conftest import TINY
    from helpers import run_train, scalar_series, weights

    outs = {}
    for cache in ("true", "false"):
        outs[cache] = tmp_path / cache
        log = run_train(1, [*TINY, "--max_train_steps", "3", "--logging_steps", "1", "--data_cache", cache,
                            "--save_image_epochs", "100", "--eval_quality_images", "0", "--output_dir", outs[cache]])
        assert ("data cache off" in log.stdout) == (cache == "false")
    assert scalar_series(outs["true"] / "logs", "loss") == scalar_series(outs["false"] / "logs", "loss")
    a, b = (weights(o / "unet" / "diffusion_pytorch_model.safetensors") for o in outs.values())
    assert all(torch.equal(a[k], b[k]) for k in a)
