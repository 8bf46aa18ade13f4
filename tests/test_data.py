import numpy as np
import pytest
import torch
from PIL import Image

from trainer import data, data_cache
from trainer.data import ButterflyImages, render_butterfly
from trainer.config import TrainingConfig
from trainer.errors import EXIT_CONFIG, EXIT_FAILED, TransientError, UserError
from trainer.run_dir import RunDir


def cache_dir(config: TrainingConfig):
    return RunDir.of(config).data_cache  # where setup puts the cache


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
    cached, note = data_cache.cached_dataset(config, source, cache_dir(config))
    assert note == "built now" and len(cached) == len(decoded) == 5
    assert len(source.skipped) == 1 and "corrupt.png" in source.skipped[0], "the build pass finds corrupt files"
    for i in range(5):
        assert cached[i].dtype == torch.uint8 and torch.equal(cached[i], decoded[i]), "same pixels as decoding"

    again, note = data_cache.cached_dataset(config, data.load_image_source(config, scan=False), cache_dir(config))
    assert note == "reused" and torch.equal(again[4], cached[4]), "a second run maps the same file"
    other = TrainingConfig(dataset_name="imagefolder", train_data_dir=folder, image_size=8, output_dir=tmp_path / "run")
    assert data_cache.cache_path(other, source, cache_dir(other)) != data_cache.cache_path(
        config, source, cache_dir(config)), "size is part of the key"
    (folder / "new.png").write_bytes((folder / "gray.png").read_bytes())
    changed = data.load_image_source(config, scan=False)
    assert data_cache.cache_path(config, changed, cache_dir(config)) != data_cache.cache_path(
        config, source, cache_dir(config)), "new files make a new cache"


def test_failed_cache_build_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    config = TrainingConfig(image_size=8, builtin_num_images=8, data_cache_dir=tmp_path / "cache")
    real_write = data_cache._write

    def disk_full(config, source, tmp):
        real_write(config, source, tmp)  # the whole array is on disk under its temporary name...
        raise OSError(28, "No space left on device")  # ...when the sidecar cannot be written

    monkeypatch.setattr(data_cache, "_write", disk_full)
    with pytest.raises(UserError, match="no space left on device while writing the data cache .* MiB free"):
        data_cache.cached_dataset(config, data.load_image_source(config, scan=False), cache_dir(config))
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.setattr(data_cache, "_write", real_write)
    assert data_cache.cached_dataset(config, data.load_image_source(config, scan=False), cache_dir(config))[1] == "built now"


@pytest.mark.slow
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


@pytest.mark.parametrize("damage", ["truncated", "sidecar"])
def test_damaged_cache_is_rebuilt_not_a_crash_on_every_retry(tmp_path, damage):
    config = TrainingConfig(image_size=8, builtin_num_images=8, data_cache_dir=tmp_path / "cache")
    built, _ = data_cache.cached_dataset(config, data.load_image_source(config, scan=False), cache_dir(config))
    expected = [built[i] for i in range(8)]  # copies: the file is damaged in place below
    del built
    path = data_cache.cache_path(config, data.load_image_source(config, scan=False), cache_dir(config))
    if damage == "truncated":  # a node died while the page cache was being written back
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.with_suffix(".json").write_text('{"rows": [0, 1')
    again, note = data_cache.cached_dataset(config, data.load_image_source(config, scan=False), cache_dir(config))
    assert note.startswith("rebuilt: the cache file was damaged")
    assert all(torch.equal(again[i], expected[i]) for i in range(8))
    _, note = data_cache.cached_dataset(config, data.load_image_source(config, scan=False), cache_dir(config))
    assert note == "reused"


def test_orphaned_cache_files_are_removed_but_a_live_builders_and_the_users_files_are_kept(tmp_path):
    """Issue 17 case 6: any `.tmp-*` with no lock holder was deleted as an orphan, a user's `.tmp-notes.txt` in a
    shared data_cache_dir too. Only our own temporaries (named with CACHE_TEMPORARY_PREFIX) are ours to delete."""
    import fcntl

    from trainer.outputs import CACHE_TEMPORARY_PREFIX

    cache = tmp_path / "cache"
    cache.mkdir()
    dead, live = cache / f"{CACHE_TEMPORARY_PREFIX}host-1-a.npy", cache / f"{CACHE_TEMPORARY_PREFIX}host-2-b.npy"
    dead.write_bytes(b"half a cache")
    live.write_bytes(b"being written")
    users = [cache / ".tmp-notes.txt", cache / ".tmp-host-1-a.npy"]  # the second: what ours looked like before
    for path in users:
        path.write_text("mine")
    with open(live, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # what a running builder holds (another process: flock is per open file)
        assert data_cache.remove_orphans(cache) == [dead]
    assert live.exists() and not dead.exists()
    assert all(path.read_text() == "mine" for path in users)


def test_the_cache_builder_names_its_temporaries_as_ours(tmp_path, monkeypatch):
    from trainer.outputs import CACHE_TEMPORARY_PREFIX

    config = TrainingConfig(image_size=8, builtin_num_images=4, data_cache_dir=tmp_path / "cache")
    seen = []
    real = data_cache._write

    def write(config, source, tmp):
        seen.append(sorted(p.name for p in tmp.parent.iterdir()))
        return real(config, source, tmp)

    monkeypatch.setattr(data_cache, "_write", write)
    data_cache.cached_dataset(config, data.load_image_source(config, scan=False), cache_dir(config))
    [names] = seen
    assert len(names) == 1 and names[0].startswith(CACHE_TEMPORARY_PREFIX)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".tmp")], "none left behind"


def test_all_corrupt_folder_leaves_no_cache(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "bad.png").write_bytes(b"garbage")
    config = TrainingConfig(dataset_name="imagefolder", train_data_dir=tmp_path / "d", image_size=8,
                            data_cache_dir=tmp_path / "cache")
    with pytest.raises(data.DataError, match="no readable images .*bad.png"):
        data_cache.cached_dataset(config, data.load_image_source(config, scan=False), cache_dir(config))
    assert list((tmp_path / "cache").iterdir()) == []


def test_hub_dataset_errors_say_whether_a_retry_can_help(monkeypatch):
    """Offline mode without a cached copy, or an id that does not exist: exit 2. The Hub not answering: exit 1.
    The errors are the ones datasets 5.2 raises (seen against a closed port and with HF_HUB_OFFLINE=1: both are
    ConnectionError, told apart by the cause it names; a real unreachable Hub takes ~30 s of datasets' own retries,
    too slow to repeat in every test run)."""
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    config = TrainingConfig(dataset_name="someone/butterflies")
    failures = {
        "missing": DatasetNotFoundError("Dataset 'someone/butterflies' doesn't exist on the Hub"),
        "offline": ConnectionError("Couldn't reach 'someone/butterflies' on the Hub (OfflineModeIsEnabled)"),
        "network": ConnectionError("Couldn't reach 'someone/butterflies' on the Hub (LocalEntryNotFoundError)"),
    }
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    for kind, error in failures.items():
        def fail(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(datasets, "load_dataset", fail)
        with pytest.raises(TransientError if kind == "network" else data.DataError) as caught:
            data.load_image_source(config)
        assert caught.value.exit_code == (EXIT_FAILED if kind == "network" else EXIT_CONFIG), kind



# ---- issue 17 case 9: high-bit-depth greyscale images keep their brightness ---------------------------------------

def test_16_bit_greyscale_images_are_scaled_not_clipped(tmp_path):
    """PIL's convert('RGB') clips I;16 / I values at 255, so 50 % grey in a 16-bit PNG (32768) became white."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    levels = {"black": (0, 0), "grey": (32768, 128), "quarter": (16384, 64), "white": (65535, 255)}
    for name, (value, _) in levels.items():
        image = Image.fromarray(np.full((12, 10), value, dtype=np.uint16))
        assert image.mode == "I;16"
        image.save(folder / f"{name}.png")  # a real 16-bit greyscale PNG
    Image.fromarray(np.full((12, 10), 32768, dtype=np.int32)).save(folder / "grey32.tif")  # mode I
    assert Image.open(folder / "grey.png").mode == "I;16" and Image.open(folder / "grey32.tif").mode == "I"
    Image.fromarray(np.full((12, 10), 0.5, dtype=np.float32)).save(folder / "float.tif")  # mode F: no known range
    config = TrainingConfig(dataset_name="imagefolder", train_data_dir=folder, image_size=8,
                            output_dir=tmp_path / "run")
    expected = {f"{name}.png": want for name, (_, want) in levels.items()} | {"grey32.tif": 128}

    def by_file(source, dataset):
        files = [source.describe(i).rsplit("/", 1)[-1] for i in (source.indices or range(source.length))]
        return {name: dataset[i] for i, name in enumerate(files)}

    source = data.load_image_source(config)  # no cache: decoded on every access
    decoded = by_file(source, data.TrainDataset(source, data.build_transform(config)))
    cached_source = data.load_image_source(config, scan=False)
    cached, _ = data_cache.cached_dataset(config, cached_source, cache_dir(config))
    for images, skipped in ((decoded, source.skipped), (by_file(cached_source, cached), cached_source.skipped)):
        assert {name: int(image.float().mean().round()) for name, image in images.items()} == expected
        assert all(image.shape == (3, 8, 8) and int(image.min()) == int(image.max()) for image in images.values())
        [float_skip] = skipped
        assert "float.tif" in float_skip and "32-bit float" in float_skip


# ---- issue 17 case 8: the cache is checked against the images and against itself ----------------------------------

def zero_body(path):
    """Zero a .npy file's array in place, header kept: the shape still matches, every pixel is wrong."""
    with open(path, "r+b") as f:
        np.lib.format.read_magic(f)
        np.lib.format.read_array_header_1_0(f)
        f.write(b"\0" * (path.stat().st_size - f.tell()))


def test_images_replaced_with_the_same_names_and_times_rebuild_the_cache(tmp_path):
    import os

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, level in enumerate((40, 90, 140, 190)):
        Image.fromarray(np.full((8, 8, 3), level, dtype=np.uint8)).save(folder / f"{i}.bmp")  # size: from shape
    config = TrainingConfig(dataset_name="imagefolder", train_data_dir=folder, image_size=8,
                            output_dir=tmp_path / "run")
    source = data.load_image_source(config, scan=False)
    _, note = data_cache.cached_dataset(config, source, cache_dir(config))
    assert note == "built now"
    stat = (folder / "2.bmp").stat()
    Image.fromarray(np.full((8, 8, 3), 250, dtype=np.uint8)).save(folder / "2.bmp")  # same size, other pixels
    os.utime(folder / "2.bmp", ns=(stat.st_atime_ns, stat.st_mtime_ns))  # rsync -t, a restored backup
    assert (folder / "2.bmp").stat().st_size == stat.st_size
    again = data.load_image_source(config, scan=False)
    assert again.fingerprint == source.fingerprint, "datasets' fingerprint cannot see this"
    cached, note = data_cache.cached_dataset(config, again, cache_dir(config))
    assert note.startswith("rebuilt: the images changed since the cache was built"), note
    decoded = data.TrainDataset(again, data.build_transform(config))
    assert all(torch.equal(cached[i], decoded[i]) for i in range(4))
    assert sorted(int(cached[i][0, 0, 0]) for i in range(4)) == [40, 90, 190, 250]
    assert data_cache.cached_dataset(config, data.load_image_source(config, scan=False), cache_dir(config))[1] == "reused"


@pytest.mark.parametrize("verify_all", [True, False])
def test_a_cache_body_zeroed_in_place_is_rebuilt(tmp_path, monkeypatch, verify_all):
    """Also the built-in dataset's (generated deterministically, but its cache is a file like any other). With a
    cache over FULL_VERIFY_BYTES only a strided sample of blocks is read back (first, last and evenly spaced)."""
    if not verify_all:
        monkeypatch.setattr(data_cache, "FULL_VERIFY_BYTES", 0)
        monkeypatch.setattr(data_cache, "CHECKSUM_BLOCK_BYTES", 3 * 8 * 8 * 4)  # 4 images a block, 4 blocks
        monkeypatch.setattr(data_cache, "SAMPLED_BLOCKS", 1)  # blocks 0, 2 and 3 of 4 are read
    config = TrainingConfig(image_size=8, builtin_num_images=16, data_cache_dir=tmp_path / "cache")
    built, note = data_cache.cached_dataset(config, data.load_image_source(config, scan=False), cache_dir(config))
    expected = [built[i] for i in range(16)]
    del built
    path = data_cache.cache_path(config, data.load_image_source(config, scan=False), cache_dir(config))
    zero_body(path)
    again, note = data_cache.cached_dataset(config, data.load_image_source(config, scan=False), cache_dir(config))
    assert note.startswith("rebuilt: the cache file was damaged (its content does not match its checksum"), note
    assert ("(3 sampled)" in note) == (not verify_all), note
    assert all(torch.equal(again[i], expected[i]) for i in range(16))
    assert data_cache.cached_dataset(config, data.load_image_source(config, scan=False), cache_dir(config))[1] == "reused"
