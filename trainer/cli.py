"""`ddpm` command line: parsing and exit codes only; the work lives in the modules it calls."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from trainer.config import TrainingConfig
from trainer.config_loading import (CONFIG_FILE_ENV, build_cli_parser, hub_repo_id_problems, load_config,
                                    sampler_steps_problems)
from trainer.run_dir import config_yaml
from trainer.errors import ConfigError, DdpmError, Outcome, Stopped, exit_code
from trainer.run_dir import CONFIG_NAME, PIPELINE_INDEX, RunDir

EPILOG = """Config sources, lowest to highest: defaults < --config FILE (or $DDPM_CONFIG_FILE) < DDPM_<FIELD> env < --<field> VALUE.
Exit codes: 0 done, 1 unexpected or network error (retry), 2 bad configuration/input, 3 diverged (non-finite
losses, weights or samples), 124 stalled (no progress for stall_timeout_seconds; retry), 143 preempted by SIGTERM
(checkpoint saved) or a peer process lost (retry resumes), 130 interrupted by Ctrl-C (checkpoint saved)."""


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="ddpm", description="Train unconditional DDPMs.", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cli_sources = {}
    for name, help_text in (("train", "train a model (resumes automatically)"),
                            ("config", "print the effective config and where each value comes from")):
        sub = commands.add_parser(name, help=help_text, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
        cli_sources[name] = build_cli_parser(sub)

    push = commands.add_parser(
        "push", help="upload the finished run (pipeline, model card, last sample grid) to the Hub",
        description="Uploads output_dir's pipeline, model card, resolved config and last sample grid to the Hub repo "
                    "hub_model_id (created if needed, private per hub_private_repo). The token is read from $HF_TOKEN "
                    "only. Safe to run again.", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli_sources["push"] = build_cli_parser(push)
    push.add_argument("--dry-run", action="store_true", help="list what would be uploaded; contact nothing")
    push.add_argument("--include-checkpoints", action="store_true", help="also upload checkpoints/ (full training state)")
    push.add_argument("--include-logs", action="store_true", help="also upload logs/ (TensorBoard)")
    push.add_argument("--max-attempts", type=int, default=5, metavar="N",
                      help="tries of the upload when the Hub fails transiently (connection, 429, 5xx); default 5")
    push.add_argument("--retry-delay", type=float, default=2.0, metavar="SECONDS",
                      help="wait before the first retry; doubles after each (exponential backoff); default 2")
    push.add_argument("--deadline-seconds", type=float, default=3600.0, metavar="SECONDS",
                      help="give up (exit 1) when the whole push, retries included, takes longer; default 3600")
    push.add_argument("--request-timeout", type=float, default=60.0, metavar="SECONDS",
                      help="each HTTP request's read/write timeout (connect: 10 s); default 60")

    evaluate = commands.add_parser(
        "eval", help="score a DDPMPipeline's samples against the training images (sliced Wasserstein distance)",
        description="Samples --num-images images from the DDPMPipeline folder --model as the training loop's evaluation "
                    "does (eval_scheduler, num_inference_steps, ddim_eta, eval_mixed_precision, seed) and compares them "
                    "with as many images of the configured dataset (dataset_name, train_data_dir, ...) at the model's "
                    "sample_size: sliced Wasserstein distance per Laplacian-pyramid level, x1e3, lower is better "
                    "(README: Sample quality). The config is read from the usual sources; when neither --config nor "
                    f"${CONFIG_FILE_ENV} is given, the run's own {CONFIG_NAME} in --model is used if present.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli_sources["eval"] = build_cli_parser(evaluate)
    evaluate.add_argument("--model", required=True, type=Path, help="a DDPMPipeline folder, e.g. a run's output_dir")
    evaluate.add_argument("--num-images", "--num_images", dest="num_images", type=int, default=64, metavar="N",
                          help="generated and real images compared (at least 2; default 64)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object instead of the report")

    wait = commands.add_parser(
        "wait-for-training", help="wait until the training workload finished and its completion marker matches",
        description="The push Job's init container. With Kubernetes API access it watches the training workload: "
                    "exit 0 when it succeeded and output_dir's completion marker is this config's run, 2 at once when "
                    "it failed (with its reason). Without access it polls the marker. Exit 1 at the deadline.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli_sources["wait-for-training"] = build_cli_parser(wait)
    wait.add_argument("--workload", metavar="KIND/NAME", help="the training workload, e.g. Job/ddpm-train "
                      "(default: $TRAINING_WORKLOAD)")
    wait.add_argument("--namespace", "-n", help="its namespace (default: the pod's)")
    wait.add_argument("--poll-seconds", type=float, default=30.0, metavar="SECONDS", help="marker checks; default 30")
    wait.add_argument("--timeout-seconds", type=float, default=7 * 24 * 3600.0, metavar="SECONDS",
                      help="give up (exit 1) after this long; default 7 days")
    wait.add_argument("--context", help="kubeconfig context (outside a cluster)")

    status = commands.add_parser(
        "status", help="a training release on the cluster: state, pods per rank, progress, preemptions",
        description="Reads the release's training workload, its pods and its Events through your kubeconfig. "
                    "Exit 0 running or done, 2 when the run failed, 1 when it cannot be found or read.")
    status.add_argument("--release", default="ddpm", help="the Helm release name; default ddpm")
    status.add_argument("--namespace", "-n", help="default: the kubeconfig context's namespace")
    status.add_argument("--context", help="kubeconfig context")

    commands.add_parser(
        "launch", help="container entrypoint: torchrun from PET_*/JOB_COMPLETION_INDEX env, then `ddpm train`",
        description="Runs `torchrun ... -m trainer train ARGS`: every argument after `launch` (an optional leading "
                    "`--` is dropped) goes to `ddpm train` unchanged.", add_help=False)

    sample = commands.add_parser("sample", help="sample images from any DDPMPipeline folder")
    sample.add_argument("--model", required=True, type=Path, help="a DDPMPipeline folder (save_pretrained output)")
    sample.add_argument("--num-images", "--num_images", dest="num_images", type=int, default=16)
    sample.add_argument("--num_inference_steps", "--num-inference-steps", dest="num_inference_steps", type=int, default=50)
    sample.add_argument("--scheduler", choices=("ddim", "ddpm"), default="ddim")
    sample.add_argument("--eta", type=float, default=1.0, help="DDIM noise: 1 stochastic, 0 deterministic")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=32)
    sample.add_argument("--out", required=True, type=Path, help="folder for the PNGs and grid.png")
    return parser, cli_sources


def _load(args, unknown, cli_sources) -> tuple[TrainingConfig, dict]:
    return load_config(args, unknown, cli_sources[args.command])


def config_file_of(args) -> Path | None:
    import os

    given = getattr(args, "config", None) or os.environ.get(CONFIG_FILE_ENV)
    return Path(given) if given else None


def cmd_train(config: TrainingConfig, config_file: Path | None) -> Outcome:
    from trainer.loop import train

    train(config, config_file=config_file)
    return Outcome.OK


def cmd_launch(train_args: list[str]) -> Outcome:
    from trainer.launch import launch

    # Validate once here (same sources as the workers will see) so a bad config fails fast with exit 2.
    parser, cli_sources = build_parser()
    args, unknown = parser.parse_known_args(["train", *train_args])
    config_file = config_file_of(args)
    if config_file is not None and config_file.exists() and not (config_file.is_file() or config_file.is_dir()):
        # Each torchrun worker reads the config again, and a pipe (<(...), /dev/stdin) can be read only once.
        raise ConfigError([f"config file {config_file} is not a regular file (a pipe such as <(...) or /dev/stdin?): "
                           "`ddpm launch` starts workers that each read it again, and a pipe gives its content only "
                           "once; write it to a file first, e.g. envsubst < t.yaml > run.yaml"])
    config, _ = load_config(args, unknown, cli_sources["train"])
    return launch(train_args, config.preemption_grace_seconds)


def cmd_push(config: TrainingConfig, args) -> Outcome:
    from trainer.hub import PushOptions, push

    problems = [f"--max-attempts must be at least 1, got {args.max_attempts}"] if args.max_attempts < 1 else []
    problems += not_finite(("--retry-delay", args.retry_delay), ("--deadline-seconds", args.deadline_seconds),
                           ("--request-timeout", args.request_timeout))
    problems += [f"--retry-delay must be >= 0, got {args.retry_delay}"] if args.retry_delay < 0 else []
    problems += [f"--deadline-seconds must be > 0, got {args.deadline_seconds}"] if args.deadline_seconds <= 0 else []
    problems += [f"--request-timeout must be > 0, got {args.request_timeout}"] if args.request_timeout <= 0 else []
    problems += hub_repo_id_problems(config, pushing=True)
    if problems:
        raise ConfigError(problems)
    push(config, RunDir.of(config), PushOptions(dry_run=args.dry_run, include_checkpoints=args.include_checkpoints,
                             include_logs=args.include_logs, max_attempts=args.max_attempts,
                             retry_delay_s=args.retry_delay, deadline_s=args.deadline_seconds,
                             request_timeout_s=args.request_timeout))
    return Outcome.OK


def not_finite(*flags: tuple[str, float]) -> list[str]:
    """A problem for each (flag, value) that is inf or nan: argparse's float() accepts them, and nan passes every
    comparison a range check makes."""
    return [f"{flag} must be a finite number, got {value}" for flag, value in flags if not math.isfinite(value)]


def cmd_sample(args) -> Outcome:
    problems = not_a_pipeline(args.model)
    for flag, value in (("--num-images", args.num_images), ("--num_inference_steps", args.num_inference_steps),
                        ("--batch-size", args.batch_size)):
        if value < 1:
            problems.append(f"{flag} must be at least 1, got {value}")
    problems += not_finite(("--eta", args.eta))
    if math.isfinite(args.eta) and not 0 <= args.eta <= 1:
        problems.append(f"--eta must be between 0 and 1, got {args.eta}")
    if args.out.exists() and not args.out.is_dir():
        problems.append(f"--out {args.out} is a file; give a folder (it is created if missing)")
    if problems:
        raise ConfigError(problems)

    import torch

    from trainer.sampling import eval_scheduler, sample_images, save_images, to_grid

    pipeline = load_pipeline(args.model)
    timesteps = getattr(pipeline.scheduler.config, "num_train_timesteps", None)
    if not isinstance(timesteps, int) or timesteps < 1:
        raise ConfigError([f"--model {args.model}: its scheduler config has no num_train_timesteps ({timesteps!r})"])
    problems = sampler_steps_problems("--num_inference_steps", args.num_inference_steps, timesteps,
                                      f"the model's {timesteps} diffusion timesteps")
    if problems:
        raise ConfigError(problems)
    pipeline.to("cuda" if torch.cuda.is_available() else "cpu")
    scheduler = eval_scheduler(args.scheduler, pipeline.scheduler.config)
    images = sample_images(pipeline.unet, scheduler, range(args.num_images), seed=args.seed,
                           num_inference_steps=args.num_inference_steps, eta=args.eta, batch_size=args.batch_size)
    paths = save_images(images, args.out)
    to_grid(images).save(args.out / "grid.png")
    print(f"wrote {len(paths)} images and {args.out / 'grid.png'}")
    return Outcome.OK


def not_a_pipeline(model: Path) -> list[str]:
    return [] if RunDir(model).has_pipeline() else [
        f"--model {model} is not a DDPMPipeline folder (no {PIPELINE_INDEX})"]


def load_pipeline(model: Path):
    """DDPMPipeline.from_pretrained(model), or a ConfigError saying why not: the folder is the user's input (a broken
    model_index.json, a missing or unreadable component), and loading it again cannot help."""
    from diffusers import DDPMPipeline

    try:
        return DDPMPipeline.from_pretrained(model)
    except Exception as e:  # diffusers raises OSError, ValueError, TypeError, AttributeError... for a broken folder
        reason = (str(e).strip().splitlines() or [""])[0][:300]
        raise ConfigError([f"--model {model} cannot be loaded as a DDPMPipeline ({type(e).__name__}: {reason}); "
                           "give a folder written by save_pretrained, e.g. a finished run's output_dir"]) from e


def cmd_eval(args, unknown, cli_source) -> Outcome:
    import json
    import os

    from trainer.evaluate import eval_config, evaluate_pipeline, format_report

    problems = not_a_pipeline(args.model)
    problems += [f"--num-images must be at least 2, got {args.num_images}"] if args.num_images < 2 else []
    if problems:
        raise ConfigError(problems)
    model = RunDir(args.model)
    if args.config is None and CONFIG_FILE_ENV not in os.environ and model.config_file.is_file():
        args.config = str(model.config_file)  # the run's own config: its data, sampler and seed
    config, sources = load_config(args, unknown, cli_source)
    result = evaluate_pipeline(args.model, eval_config(config, sources, model), args.num_images)
    print(json.dumps(result) if args.json else format_report(result), flush=True)
    return Outcome.OK


def cmd_wait(config: TrainingConfig, args) -> Outcome:
    import os

    from trainer.run_dir import marker_matches
    from trainer.wait import wait_for_training

    workload = args.workload or os.environ.get("TRAINING_WORKLOAD", "")
    problems = [] if "/" in workload else [f"--workload {workload!r} must be KIND/NAME, e.g. Job/ddpm-train (or set "
                                           "$TRAINING_WORKLOAD)"]
    problems += not_finite(("--poll-seconds", args.poll_seconds), ("--timeout-seconds", args.timeout_seconds))
    problems += [f"--poll-seconds must be > 0, got {args.poll_seconds}"] if args.poll_seconds <= 0 else []
    problems += [f"--timeout-seconds must be > 0, got {args.timeout_seconds}"] if args.timeout_seconds <= 0 else []
    if problems:
        raise ConfigError(problems)
    try:
        run_dir = RunDir.of(config)
        return wait_for_training(workload, args.namespace, lambda: marker_matches(config, run_dir, workload),
                                 poll_seconds=args.poll_seconds, timeout_seconds=args.timeout_seconds,
                                 say=lambda line: print(line, flush=True), context=args.context)
    except ValueError as e:
        raise ConfigError([str(e)]) from e


def cmd_status(args) -> Outcome:
    from trainer.status import status

    return status(args.release, args.namespace, context=args.context)


def run_command(argv: list[str]) -> Outcome:
    if argv[:1] == ["launch"]:  # everything after `launch` belongs to `ddpm train`, verbatim
        rest = argv[1:]
        return cmd_launch(rest[1:] if rest[:1] == ["--"] else rest)
    parser, cli_sources = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command == "sample":
        if unknown:
            raise ConfigError([f"unrecognized arguments: {' '.join(unknown)}"])
        return cmd_sample(args)
    if args.command == "eval":
        return cmd_eval(args, unknown, cli_sources["eval"])
    if args.command == "status":
        if unknown:
            raise ConfigError([f"unrecognized arguments: {' '.join(unknown)}"])
        return cmd_status(args)
    config, sources = _load(args, unknown, cli_sources)
    if args.command == "config":
        sys.stdout.write(config_yaml(config, sources))
        return Outcome.OK
    if args.command == "push":
        return cmd_push(config, args)
    if args.command == "wait-for-training":
        return cmd_wait(config, args)
    return cmd_train(config, config_file_of(args))


def outcome_of(argv: list[str]) -> Outcome:
    """The one place where errors become outcomes and messages (with the HF token redacted)."""
    from trainer.distributed import ErrorOnMainProcess
    from trainer.hf_token import redact

    from trainer.signals import SIGNALS

    try:
        return run_command(list(argv))
    except ErrorOnMainProcess as e:
        SIGNALS.exiting(e.outcome)
        return e.outcome  # rank 0 prints it
    except DdpmError as e:
        SIGNALS.exiting(e.outcome)  # a signal while printing (torchrun stopping this rank) keeps this outcome
        print(redact(f"{e.prefix}{e}"), file=sys.stderr, flush=True)
        return e.outcome
    except Stopped as e:
        print(redact(str(e)), file=sys.stderr, flush=True)
        return e.outcome


def main(argv: list[str] | None = None) -> int:
    """`ddpm` as a function: the exit code of `argv`'s outcome (trainer.errors.EXIT_CODES)."""
    return exit_code(outcome_of(sys.argv[1:] if argv is None else argv))
