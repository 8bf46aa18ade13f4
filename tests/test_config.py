import pytest
import yaml

from conftest import clean_env, ddpm
from trainer.cli import build_parser
from trainer.config import TrainingConfig
from trainer.config_loading import load_config
from trainer.errors import EXIT_CONFIG, ConfigError


def load(argv, environ=None):
    parser, sources = build_parser()
    args, unknown = parser.parse_known_args(["train", *argv])
    return load_config(args, unknown, sources["train"], environ=environ or {})


def test_tutorial_fields_are_kept():
    tutorial = {"image_size", "train_batch_size", "eval_batch_size", "num_epochs", "gradient_accumulation_steps",
                "learning_rate", "lr_warmup_steps", "save_image_epochs", "save_model_epochs", "mixed_precision",
                "output_dir", "push_to_hub", "hub_model_id", "hub_private_repo", "overwrite_output_dir", "seed"}
    assert tutorial <= set(TrainingConfig.model_fields)


def test_precedence_default_file_env_cli(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train_batch_size: 8\nlearning_rate: 0.002\nseed: 1\nnum_epochs: 3\n")
    env = {"DDPM_CONFIG_FILE": str(cfg), "DDPM_LEARNING_RATE": "0.003", "DDPM_SEED": "2"}
    config, sources = load(["--seed", "3"], env)
    assert (config.train_batch_size, config.learning_rate, config.seed, config.num_epochs) == (8, 0.003, 3, 3)
    assert config.image_size == 128
    assert sources["image_size"] == "default"
    assert sources["train_batch_size"] == "file"
    assert sources["learning_rate"] == "env"
    assert sources["seed"] == "cli"


def test_config_flag_beats_env_file(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("seed: 10\n")
    b.write_text("seed: 20\n")
    config, _ = load(["--config", str(b)], {"DDPM_CONFIG_FILE": str(a)})
    assert config.seed == 20


def test_all_problems_reported_at_once_with_suggestions(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lerning_rate: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load(["--train_bach_size", "3", "--num_epochs", "0", "--model_preset", "small", "--image_size", "30"],
             {"DDPM_CONFIG_FILE": str(cfg), "DDPM_SEEED": "1"})
    text = str(e.value)
    assert "unknown key 'lerning_rate'" in text and "did you mean 'learning_rate'" in text
    assert "DDPM_SEEED (did you mean 'seed'?)" in text
    assert "--train_bach_size (did you mean 'train_batch_size'?)" in text
    assert "num_epochs" in text and "greater than 0" in text
    assert "image_size 30 must be a multiple of 8" in text  # cross-field check runs despite the other errors
    assert len(e.value.problems) == 5


@pytest.mark.parametrize("argv,needle", [
    (["--model_preset", "tutorial", "--image_size", "48"], "multiple of 32"),
    (["--mixed_precision", "fp16"], "fp16 needs a CUDA GPU"),
    (["--dataset_name", "imagefolder"], "needs train_data_dir"),
    (["--resume_from_checkpoint", "/nonexistent/ckpt"], "not a checkpoint folder"),
])
def test_cross_field_checks(argv, needle):
    with pytest.raises(ConfigError, match=needle):
        load(argv)


def test_push_without_model_id_uses_output_dir_name():
    config, _ = load(["--push_to_hub", "true", "--output_dir", "runs/my-butterflies"])
    assert config.hub_repo_id == "my-butterflies"


def test_cli_exit_2_and_nothing_written(tmp_path):
    out = tmp_path / "out"
    proc = ddpm("train", "--output_dir", out, "--imgae_size", "32", "--learning_rate", "abc", check=False,
                env=clean_env(DDPM_NUM_EPOCH="2"))
    assert proc.returncode == EXIT_CONFIG
    assert "--imgae_size (did you mean 'image_size'?)" in proc.stderr
    assert "DDPM_NUM_EPOCH (did you mean 'num_epochs'?)" in proc.stderr
    assert "learning_rate" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_config_command_prints_sources(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("image_size: 64\n")
    proc = ddpm("config", "--config", cfg, "--seed", "7", env=clean_env(DDPM_EVAL_BATCH_SIZE="9"))
    lines = {line.split(":")[0]: line for line in proc.stdout.splitlines()}
    assert lines["image_size"].endswith("# file") and "64" in lines["image_size"]
    assert lines["seed"].endswith("# cli") and "7" in lines["seed"]
    assert lines["eval_batch_size"].endswith("# env") and "9" in lines["eval_batch_size"]
    assert lines["num_epochs"].endswith("# default")
    assert yaml.safe_load(proc.stdout)["image_size"] == 64  # still valid YAML


def test_kubernetes_service_link_variables_are_not_config():
    env = {"DDPM_TENSORBOARD_SERVICE_HOST": "10.0.0.1", "DDPM_TENSORBOARD_SERVICE_PORT": "6006",
           "DDPM_TENSORBOARD_PORT": "tcp://10.0.0.1:6006", "DDPM_TENSORBOARD_PORT_6006_TCP_ADDR": "10.0.0.1",
           "DDPM_WORKERS_SERVICE_PORT_HTTP": "80", "DDPM_SEED": "3"}
    config, _ = load(["--image_size", "32"], env)
    assert config.seed == 3


# ---- every user-fixable error is exit 2 with a message (issue 9 section 9) -----------------------------------------

def test_every_field_declares_its_part_in_a_run():
    from trainer.config import FIELDS, RUN_ROLES, run_role

    roles = {name: run_role(name) for name in FIELDS}
    assert {name for name, role in roles.items() if role not in RUN_ROLES} == set()
    assert roles["image_size"] == "identity" and roles["max_train_steps"] == "length"
    assert roles["max_grad_norm"] == "setting" and roles["lr_scheduler"] == "identity"


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_config_rejects_a_seed_train_cannot_use(seed, capsys):
    from trainer.cli import main

    assert main(["config", "--seed", seed]) == 2
    err = capsys.readouterr().err
    assert "seed" in err and ("greater than or equal to 0" in err or "less than or equal to 4294967295" in err)


def test_config_file_problems_are_named(tmp_path):
    folder = tmp_path / "conf"
    folder.mkdir()
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("dataset_name: caf\xe9\n".encode("latin-1"))
    cases = {folder: "is a directory; give the YAML file inside it", tmp_path / "nope.yaml": "does not exist",
             latin1: "is not UTF-8 text", "/proc/self/mem": "cannot be read"}
    for path, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            load(["--config", str(path)])


def test_output_dir_that_is_a_file_is_exit_2(tmp_path, capsys):
    from trainer.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["train", "--output_dir", str(blocker)]) == 2
    assert f"output_dir {blocker} is a file, not a folder" in capsys.readouterr().err
    assert blocker.read_text() == "x"


def test_sample_rejects_bad_values_before_loading_anything(tmp_path, capsys):
    from trainer.cli import main

    out_file = tmp_path / "out.png"
    out_file.write_text("x")
    assert main(["sample", "--model", str(tmp_path), "--num_inference_steps", "0", "--batch-size", "0", "--out",
                 str(out_file)]) == 2
    stderr = capsys.readouterr().err
    for message in ("not a DDPMPipeline folder", "--num_inference_steps must be at least 1, got 0",
                    "--batch-size must be at least 1, got 0", f"--out {out_file} is a file"):
        assert message in stderr


# ---- issue 17: a config is read once, and what is read and echoed is bounded ---------------------------------------

def feed_fifo(path, text: str):
    """A named pipe whose first reader gets `text` and any later reader nothing, like `<(envsubst < t.yaml)`."""
    import os
    import threading

    os.mkfifo(path)

    def write():
        for i in range(3):  # a second open of the path (a re-read) gets an empty pipe
            with open(path, "w") as f:
                f.write(text if i == 0 else "")

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


def release_fifo(path):
    """Unblock a writer still waiting for a reader."""
    import os

    for _ in range(3):
        try:
            os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
        except OSError:
            break


def test_a_config_from_a_pipe_is_read_once(tmp_path):
    fifo = tmp_path / "config.fifo"
    feed_fifo(fifo, "image_size: 16\nmodel_preset: small\n")
    try:
        config, sources = load(["--config", str(fifo)])
    finally:
        release_fifo(fifo)
    assert (config.image_size, config.model_preset) == (16, "small")
    assert sources["image_size"] == sources["model_preset"] == "file"


def test_process_substitution_and_stdin_configs_are_not_replaced_by_the_defaults(tmp_path):
    """The red team's commands: `--config <(envsubst < t.yaml)` and `DDPM_CONFIG_FILE=/dev/stdin` fed by a pipe."""
    import subprocess
    import sys

    from conftest import REPO

    (tmp_path / "t.yaml").write_text("image_size: 16\nmodel_preset: small\n")
    script = (f"{sys.executable} -m trainer config --config <(cat t.yaml) && echo --- && "
              f"cat t.yaml | DDPM_CONFIG_FILE=/dev/stdin {sys.executable} -m trainer config")
    env = clean_env(PYTHONPATH=str(REPO))
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    for output in proc.stdout.split("---\n"):
        values = yaml.safe_load(output)
        assert (values["image_size"], values["model_preset"]) == (16, "small"), output


def test_launch_refuses_a_config_its_workers_cannot_read_again(tmp_path, monkeypatch):
    """torchrun's workers read the config again: from a pipe they would get nothing (or block), so it is refused."""
    from trainer import cli, launch

    monkeypatch.setattr(launch, "launch", lambda *a: pytest.fail("torchrun must not start"))
    for i, via_env in enumerate((False, True)):
        fifo = tmp_path / f"config-{i}.fifo"
        feed_fifo(fifo, "image_size: 16\nmodel_preset: small\n")
        if via_env:
            monkeypatch.setenv("DDPM_CONFIG_FILE", str(fifo))
        try:
            with pytest.raises(ConfigError, match="not a regular file") as caught:
                cli.run_command(["launch", *([] if via_env else ["--config", str(fifo)])])
        finally:
            release_fifo(fifo)
        assert caught.value.exit_code == EXIT_CONFIG and str(fifo) in str(caught.value)
        assert "write it to a file" in str(caught.value)


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    names = "abcdefghijklmnop"
    lines = [f"{names[0]}: &{names[0]} [{', '.join(['x'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"{names[i]}: &{names[i]} [{', '.join([f'*{names[i - 1]}'] * width)}]")
    lines.append(f"seed: *{names[levels - 1]}")
    return "\n".join(lines) + "\n"


def timed_cli(argv, timeout=120):
    """(exit code, seconds inside trainer.cli.main, stderr) of `argv` in a child process, so that a config which
    takes minutes (or gigabytes) fails the test after `timeout` instead of hanging it."""
    import json
    import subprocess
    import sys

    from conftest import REPO

    code = ("import json, sys, time\nimport torch, trainer.model\nfrom trainer.cli import main\n"  # imports not timed
            "start = time.monotonic()\n"
            f"code = main({argv!r})\nprint(json.dumps([code, time.monotonic() - start]))")
    try:
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                              env=clean_env(PYTHONPATH=str(REPO)))
    except subprocess.TimeoutExpired:
        pytest.fail(f"ddpm {' '.join(argv)} still running after {timeout} s")
    code, seconds = json.loads(proc.stdout.strip().splitlines()[-1])
    return code, seconds, proc.stderr


def test_a_yaml_alias_bomb_is_refused_fast_with_a_short_message(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb())
    assert len(bomb.read_bytes()) < 400  # 9**9 = 387 million values once expanded
    code, seconds, err = timed_cli(["config", "--config", str(bomb)])
    assert code == EXIT_CONFIG and seconds < 2, (code, seconds)
    assert len(err) < 4096, f"{len(err)} bytes of error message"
    assert "expands to more than" in err and str(bomb) in err and "Traceback" not in err


def test_a_yaml_alias_inside_its_own_anchor_is_refused(tmp_path):
    cfg = tmp_path / "loop.yaml"
    cfg.write_text("seed: &s [1, *s]\n")  # PyYAML builds a list that contains itself
    with pytest.raises(ConfigError, match="expands to more than"):
        load(["--config", str(cfg)])
    cfg.write_text("a: &a [x, y]\nb: [*a, *a, {k: *a}]\nseed: 3\n")  # shared, not recursive: only unknown keys
    with pytest.raises(ConfigError) as caught:
        load(["--config", str(cfg)])
    assert [p.split(" in ")[0] for p in caught.value.problems] == ["unknown key 'a'", "unknown key 'b'"]


def test_an_oversized_config_file_is_refused_without_parsing_it(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("".join(f"key_{i}: {'v' * 80}\n" for i in range(120_000)))  # ~10 MB
    code, seconds, err = timed_cli(["config", "--config", str(big)])
    assert code == EXIT_CONFIG and seconds < 2, (code, seconds)
    assert "larger than 1 MiB" in err and len(err) < 4096


def test_an_echoed_value_is_truncated(tmp_path, capsys):
    from trainer.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"image_size: {'9' * 5000}x\nseed: [{', '.join(['123456789'] * 5000)}]\n")
    assert main(["config", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "image_size" in err and "seed" in err and "from file" in err
    assert len(err) < 2048, err[:500]


# ---- issue 17 case 11: a number that is not finite is not a setting ------------------------------------------------

FLOAT_FIELDS = [name for name, info in TrainingConfig.model_fields.items() if "float" in str(info.annotation)]


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e999"])
def test_non_finite_numbers_are_rejected_in_every_float_field(value, tmp_path):
    assert {"learning_rate", "max_train_seconds", "preemption_grace_seconds", "peak_tflops"} <= set(FLOAT_FIELDS)
    for name in FLOAT_FIELDS:
        with pytest.raises(ConfigError) as caught:
            load([f"--{name}={value}"])
        assert any(p.startswith(f"{name}: ") and "finite" in p and "from cli" in p for p in caught.value.problems), \
            caught.value.problems
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_train_seconds: .inf\n")  # YAML's own spelling of infinity
    with pytest.raises(ConfigError, match=r"max_train_seconds: .*finite.*from file"):
        load(["--config", str(cfg)], {"DDPM_LEARNING_RATE": "inf"})


@pytest.mark.parametrize("argv,flag", [
    (["push", "--retry-delay", "inf"], "--retry-delay"),
    (["push", "--deadline-seconds", "nan"], "--deadline-seconds"),
    (["push", "--request-timeout", "inf"], "--request-timeout"),
    (["wait-for-training", "--workload", "Job/x", "--poll-seconds", "nan"], "--poll-seconds"),
    (["wait-for-training", "--workload", "Job/x", "--timeout-seconds", "nan"], "--timeout-seconds"),
    (["sample", "--model", "/nonexistent", "--out", "/nonexistent/out", "--eta", "nan"], "--eta"),
])
def test_non_finite_flag_values_are_exit_2_naming_the_flag(argv, flag, capsys, tmp_path, monkeypatch):
    from trainer import hub, wait
    from trainer.cli import main

    monkeypatch.setattr(hub, "push", lambda *a, **k: pytest.fail("must not start pushing"))
    monkeypatch.setattr(wait, "wait_for_training", lambda *a, **k: pytest.fail("must not start waiting"))
    assert main([*argv, "--output_dir", str(tmp_path / "run")] if argv[0] != "sample" else argv) == 2
    err = capsys.readouterr().err
    assert f"{flag} must be a finite number" in err, err


# ---- issue 17 case 12: sampler settings are checked with the config, not at the first grid -------------------------

@pytest.mark.parametrize("argv,message", [
    (["--num_inference_steps", "1001"], "num_inference_steps 1001 exceeds ddpm_num_steps 1000"),
    (["--ddpm_num_steps", "10"], "num_inference_steps 50 exceeds ddpm_num_steps 10"),
    (["--ddpm_num_steps", "10", "--eval_scheduler", "ddpm"], "num_inference_steps 50 exceeds ddpm_num_steps 10"),
])
def test_more_sampler_steps_than_diffusion_timesteps_is_a_config_error(argv, message):
    with pytest.raises(ConfigError, match=message):
        load(argv)
    load([*argv, "--num_inference_steps", argv[1] if argv[0] == "--ddpm_num_steps" else "1000"])  # the bound is fine


def test_train_with_more_sampler_steps_than_timesteps_is_exit_2_and_writes_nothing(tmp_path, capsys):
    from conftest import TINY
    from trainer.cli import main

    out = tmp_path / "run"
    assert main(["train", *TINY, "--output_dir", str(out), "--ddpm_num_steps", "10", "--num_inference_steps", "11",
                 "--max_train_steps", "2", "--eval_quality_images", "0"]) == 2
    assert "num_inference_steps 11 exceeds ddpm_num_steps 10" in capsys.readouterr().err
    assert not out.exists()


def tiny_pipeline(folder, num_train_timesteps=1000):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from trainer.model import SMALL_UNET

    unet = UNet2DModel(**SMALL_UNET, sample_size=16)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=num_train_timesteps)).save_pretrained(folder)
    return folder


def test_sample_with_more_steps_than_the_models_timesteps_is_exit_2_before_sampling(tmp_path, capsys):
    from trainer.cli import main

    model, out = tiny_pipeline(tmp_path / "model", num_train_timesteps=20), tmp_path / "out"
    for scheduler in ("ddim", "ddpm"):
        assert main(["sample", "--model", str(model), "--num_inference_steps", "21", "--scheduler", scheduler,
                     "--num-images", "1", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "--num_inference_steps 21 exceeds the model's 20 diffusion timesteps" in err, err
        assert not out.exists()


# ---- issue 17 case 16: user input that ended in a traceback with exit 1 -------------------------------------------

def no_traceback_exit_2(argv, capsys) -> str:
    from trainer.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: " in err, err
    return err


@pytest.mark.parametrize("content,message", [
    ("{bad", "is not JSON"),
    ("[1, 2]", "is not a JSON object"),
    ('{"down_block_types": "DownBlock2D", "up_block_types": "UpBlock2D"}', "down_block_types must be a list"),
    ('{"down_block_types": ["Nope2D"], "up_block_types": ["UpBlock2D"]}', "diffusers cannot build a UNet2DModel"),
    ('{"down_block_types": ["DownBlock2D"], "up_block_types": ["UpBlock2D"], "block_out_channels": 5}',
     "diffusers cannot build a UNet2DModel"),
])
def test_a_bad_unet_config_file_is_exit_2_naming_the_file(content, message, tmp_path, capsys):
    from conftest import TINY

    unet = tmp_path / "unet.json"
    unet.write_text(content)
    out = tmp_path / "run"
    err = no_traceback_exit_2(["train", *TINY, "--output_dir", str(out), "--model_config_name_or_path", str(unet)],
                              capsys)
    assert f"model_config_name_or_path {unet}" in err and message in err, err
    assert not out.exists()


@pytest.mark.parametrize("name", ["../../etc", "./missing", "/nonexistent/images", "~/images", "a/b/c"])
def test_a_path_as_dataset_name_is_exit_2_pointing_to_imagefolder(name, tmp_path, capsys):
    out = tmp_path / "run"
    err = no_traceback_exit_2(["train", "--model_preset", "small", "--image_size", "16", "--output_dir", str(out),
                               "--dataset_name", name], capsys)
    assert f"dataset_name '{name}' is not a Hub dataset id" in err
    assert "dataset_name: imagefolder" in err and "train_data_dir" in err
    assert not out.exists()


def test_a_local_folder_shadowing_a_hub_id_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "butterflies").mkdir()  # datasets.load_dataset("butterflies") would read this folder, not the Hub
    err = no_traceback_exit_2(["config", "--dataset_name", "butterflies"], capsys)
    assert "dataset_name 'butterflies' is also a local folder" in err and "train_data_dir" in err


@pytest.mark.parametrize("argv,message", [
    (["--hub_model_id", "bad id/with space"], "hub_model_id 'bad id/with space' is not a valid Hub repo id"),
    (["--push_to_hub", "true", "--hub_model_id", "a/b/c"], "hub_model_id 'a/b/c' is not a valid Hub repo id"),
    (["--push_to_hub", "true", "--output_dir", "runs/my run"],
     "the Hub repo id 'my run' (output_dir's name, as hub_model_id is not set) is not a valid Hub repo id"),
])
def test_an_invalid_hub_repo_id_is_exit_2_before_training(argv, message, tmp_path, capsys, monkeypatch):
    from conftest import TINY

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")  # the push would be allowed to start
    err = no_traceback_exit_2(["train", *TINY, "--max_train_steps", "2", *argv], capsys)
    assert message in err, err
    assert "hf_not_a_real_token" not in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "ddpm-butterflies-128").exists()


@pytest.mark.parametrize("index", ["{not json", '{"_class_name": "DDPMPipeline", "unet": ["diffusers", "Nope"]}',
                                   '["DDPMPipeline"]'])
def test_sample_from_a_broken_pipeline_folder_is_exit_2(index, tmp_path, capsys):
    model = tiny_pipeline(tmp_path / "model")
    (model / "model_index.json").write_text(index)
    out = tmp_path / "out"
    err = no_traceback_exit_2(["sample", "--model", str(model), "--num_inference_steps", "2", "--num-images", "1",
                               "--out", str(out)], capsys)
    assert f"--model {model} cannot be loaded as a DDPMPipeline" in err
    assert not out.exists()


def test_push_checks_the_repo_id_it_would_create(tmp_path, capsys, monkeypatch):
    from trainer import hub

    monkeypatch.setattr(hub, "push", lambda *a, **k: pytest.fail("must not start pushing"))
    err = no_traceback_exit_2(["push", "--output_dir", str(tmp_path / "my run")], capsys)
    assert "the Hub repo id 'my run' (output_dir's name, as hub_model_id is not set) is not a valid Hub repo id" in err
