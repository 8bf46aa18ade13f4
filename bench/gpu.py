"""`make bench-gpu`: the CUDA path of `ddpm train`, checked and measured on one GPU in under 10 minutes.

A CPU-only machine never runs what only a GPU does: fp16 with Accelerate's GradScaler, bf16 autocast on CUDA, TF32,
cuDNN autotuning, fused AdamW on CUDA, torch.compile on CUDA. For bf16 and fp16 this runs `ddpm train` with the
tutorial preset at 128 px (the built-in butterflies, batch 32) and checks:

- loss: every logged loss of a few hundred optimizer updates with the defaults is finite;
- resume: in deterministic mode (cuDNN without autotuning, torch.use_deterministic_algorithms), a run to 2K
  resumed from its checkpoint K in a new process ends with the same weights, EMA and losses, bit for bit, as the
  uninterrupted run; if not, a second uninterrupted run tells whether the GPU run is deterministic at all;
- samples: the trained pipeline draws finite images with DDIM (eta 1) and with its own DDPM scheduler at 1, 8, 10,
  50 and 250 steps, its UNet in fp32 and in the run's precision;
- speed: steady-state images/s (TensorBoard event times, after the first 20% of updates, as `make bench`) and MFU
  against the FLOP count `ddpm train` logs (372 GFLOP per image for the tutorial UNet at 128 px) and the GPU's
  dense peak (trainer/model.py);
then one bf16 run with torch_compile (its first update, compile included, and images/s).

`--quick` runs the same checks on whatever device there is (the CPU here: small preset, 16 px, a few updates, fp32
and bf16, as fp16 needs CUDA) in well under a minute, so the script keeps working without a GPU
(tests/test_bench.py runs it). Children do all the torch work; this orchestrator never imports torch.

    python bench/gpu.py                  # make bench-gpu: writes bench/results/gpu.{json,md}
    python bench/gpu.py --quick --out /tmp/gpu-smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import PYTHON, REPO, fmt, machine_info, read_scalars, run_child, run_json, steady_window  # noqa: E402


@dataclass(frozen=True)
class Mode:
    preset: str
    image_size: int
    batch: int
    images: int  # built-in dataset size
    steps: int  # updates of each speed run
    resume_at: int  # K: the resume check runs to 2K and resumes from K
    precisions: tuple[str, ...]
    sample_steps: tuple[int, ...]
    compile_steps: int  # 0: no torch.compile run


MODES = {
    # 512 images: the built-in dataset renders ~0.05 s per 128-px image on one core, once (a shared data cache)
    "full": Mode("tutorial", 128, 32, 512, 300, 50, ("bf16", "fp16"), (1, 8, 10, 50, 250), 100),
    "quick": Mode("small", 16, 4, 32, 8, 3, ("no", "bf16"), (1, 8, 10), 0),
}
TIME_LIMIT_S = 600  # one GPU, the whole script
SAMPLE_IMAGES = 4


# ---- pure helpers (tests/test_bench.py) ------------------------------------------------------------------------

def train_args(mode: Mode, precision: str, steps: int, out: Path, cache: Path, *, logging_steps: int | None = None,
               checkpointing_steps: int = 1_000_000) -> list:
    """`ddpm train` for one run: periodic grids and scores off (the end still saves, samples and checks)."""
    return ["train", "--model_preset", mode.preset, "--image_size", mode.image_size, "--builtin_num_images",
            mode.images, "--train_batch_size", mode.batch, "--mixed_precision", precision, "--max_train_steps", steps,
            "--logging_steps", logging_steps or max(1, steps // 20), "--save_image_epochs", 100_000,
            "--save_model_epochs", 100_000, "--checkpointing_steps", checkpointing_steps, "--eval_quality_images", 0,
            "--eval_batch_size", 1, "--num_inference_steps", 1, "--data_cache_dir", cache, "--output_dir", out]


def speed(losses: list[tuple[int, float, float]], steps: int, batch: int, flops_per_image: float,
          peak_flops: float | None) -> dict:
    """images/s in the steady window of the (step, wall time, loss) points, and the MFU it implies."""
    window = steady_window([(s, w) for s, w, _ in losses], steps)
    images_per_sec = batch / window["seconds_per_step"]
    return {"images_per_sec": images_per_sec, "window": [window["first_step"], window["last_step"]],
            "tflops_per_sec": flops_per_image * images_per_sec / 1e12,
            "mfu": flops_per_image * images_per_sec / peak_flops if peak_flops else None}


def render(result: dict) -> str:
    m, mode = result["machine"], result["mode"]
    device = result["device"]
    lines = [f"`make bench-gpu` ({result['mode_name']}) on {device if device != 'cpu' else m['cpu']}, torch "
             f"{m['torch']}, diffusers {m['diffusers']}, accelerate {m['accelerate']}; commit {m['git']}; "
             f"{m['date']}; {result['elapsed_s']:.0f} s.",
             "",
             f"{mode['preset']} preset at {mode['image_size']} px, batch {mode['batch']}, "
             f"{result['flops_per_image'] / 1e9:.1f} GFLOP per trained image (forward + backward).",
             "",
             "| run | updates | images/s | TFLOP/s | MFU | first update s | losses finite |",
             "|---|---|---|---|---|---|---|"]
    for name, run in result["runs"].items():
        mfu = f"{100 * run['mfu']:.1f}%" if run.get("mfu") is not None else "n/a"
        finite = "yes" if run["losses_finite"] else "**no**"
        lines.append(f"| {name} | {run['steps']} | {fmt(run.get('images_per_sec'))} | "
                     f"{fmt(run.get('tflops_per_sec'), '.2f')} | {mfu} | {fmt(run.get('first_update_s'))} | {finite} |")
    lines += ["", "| check | result | detail |", "|---|---|---|"]
    lines += [f"| {c['name']} | {'ok' if c['ok'] else '**FAILED**'} | {c['detail']} |" for c in result["checks"]]
    return "\n".join(lines) + "\n"


# ---- the parts -------------------------------------------------------------------------------------------------

def first_update_seconds(log: Path) -> float | None:
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("first update took "):
            return float(line.split()[3])
    return None


def speed_run(mode: Mode, precision: str, work: Path, cache: Path, extra=()) -> dict:
    """`ddpm train` with its defaults (cuDNN autotuning, TF32, fused AdamW); speed() reads its losses later."""
    name = f"{precision}{'-compile' if extra else ''}"
    out = work / name
    steps = mode.compile_steps if extra else mode.steps
    run_child([PYTHON, "-m", "trainer", *train_args(mode, precision, steps, out, cache), *extra], work / f"{name}.log")
    losses = read_scalars(out / "logs")["loss"]
    return {"precision": precision, "steps": steps, "out": str(out),
            "losses_finite": all(math.isfinite(v) for _, _, v in losses),
            "first_update_s": first_update_seconds(work / f"{name}.log")}


def resume_runs(mode: Mode, precision: str, work: Path, cache: Path, names=("a", "b")) -> dict[str, Path]:
    """Deterministic runs to 2K: uninterrupted (a, and a2 on request), and resumed from a's checkpoint K in a new
    process (b). Compared bit for bit by the probe."""
    k = mode.resume_at
    folders = {name: work / f"resume-{precision}-{name}" for name in names}
    for name, out in folders.items():
        if name == "b":
            # a's run up to checkpoint K, as a preempted process would have left it
            shutil.copytree(folders["a"], out, ignore=shutil.ignore_patterns(f"checkpoint-{2 * k}",
                                                                            "training_complete.json"))
        run_child([PYTHON, "bench/gpu.py", "_deterministic", *train_args(
            mode, precision, 2 * k, out, cache, logging_steps=1, checkpointing_steps=k), "--cudnn_benchmark", "false"],
            work / f"{out.name}.log")
    return folders


def failure(error: RuntimeError) -> str:
    """A child's failure for the report: its last meaningful line."""
    lines = [line for line in str(error).splitlines() if line.strip() and not line.startswith("---")]
    return (lines[-1] if lines else str(error))[:300].replace("|", "/")


def probe(work: Path, spec: dict, name: str = "probe") -> dict:
    """One child for every torch-side check (imports once): FLOPs, bit-for-bit comparisons, samples."""
    path = work / f"{name}.json"
    path.write_text(json.dumps(spec))
    return run_json([PYTHON, "bench/gpu.py", "_probe", path], work / f"{name}.log")


def bench(mode_name: str, out: Path) -> dict:
    mode, start = MODES[mode_name], time.time()
    work = out / "gpu-runs"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cache = work / "data_cache"
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS for the resume check
    runs, checks, resumed = {}, [], {}
    for precision in mode.precisions:
        try:
            if mode_name == "full":
                runs[precision] = speed_run(mode, precision, work, cache)
            resumed[precision] = resume_runs(mode, precision, work, cache)
        except RuntimeError as e:  # a crashed run is a failed check, and the others still run
            checks.append({"name": f"{precision}: training", "ok": False, "detail": failure(e)})
            continue
        if mode_name == "quick":  # no speed to speak of on a CPU: the resume check's first run stands in
            a = resumed[precision]["a"]
            runs[precision] = {"precision": precision, "steps": 2 * mode.resume_at, "out": str(a),
                               "first_update_s": first_update_seconds(work / f"{a.name}.log")}
    k = mode.resume_at
    found = probe(work, {
        "flops": [mode.preset, mode.image_size, mode.batch],
        "compare": {p: [str(f["a"]), str(f["b"]), k, 2 * k] for p, f in resumed.items()},
        "samples": [mode.sample_steps, {p: run["out"] for p, run in runs.items()}]})
    flops, peaks = found["flops"]["flops_per_image"], found["flops"]["peak_flops"]
    for precision, run in runs.items():
        losses = read_scalars(Path(run["out"]) / "logs")["loss"]
        run.update(losses_finite=all(math.isfinite(v) for _, _, v in losses),
                   **speed(losses, run["steps"], mode.batch, flops, peaks.get(precision)))
        checks.append({"name": f"{precision}: losses finite", "ok": run["losses_finite"],
                       "detail": f"{run['steps']} updates"})
    for precision, same in found["compare"].items():
        detail = (f"checkpoint-{k} resumed to {2 * k}: weights, EMA and losses "
                  + ("bit-identical" if same["equal"] else f"differ ({same['differs']})"))
        if not same["equal"]:  # the resume, or the GPU run itself? A second uninterrupted run tells
            try:
                again = resume_runs(mode, precision, work, cache, names=("a2",))["a2"]
                agree = probe(work, {"compare": {precision: [str(resumed[precision]["a"]), str(again), 0, 2 * k]}},
                              f"probe-{precision}-a2")["compare"][precision]["equal"]
                detail += ("; two uninterrupted runs agree, so the resume is at fault" if agree
                           else "; two uninterrupted runs differ too: the GPU run is not deterministic")
            except RuntimeError as e:
                detail += f"; the second uninterrupted run failed: {failure(e)}"
        checks.append({"name": f"{precision}: resume", "ok": same["equal"], "detail": detail})
    for row in found["samples"]:
        checks.append({"name": f"samples: {row['trained']} model, {row['sampler']}, UNet {row['precision']}",
                       "ok": not row["nonfinite"], "detail": f"steps {row['steps']}: " + (
                           "all finite" if not row["nonfinite"] else f"non-finite at {row['nonfinite']}")})
    if mode.compile_steps and time.time() - start < TIME_LIMIT_S - 180:
        try:
            run = runs["bf16-compile"] = speed_run(mode, "bf16", work, cache, extra=("--torch_compile", "true"))
            run.update(speed(read_scalars(Path(run["out"]) / "logs")["loss"], run["steps"], mode.batch, flops,
                             peaks.get("bf16")))
            checks.append({"name": "bf16 + torch.compile: losses finite", "ok": run["losses_finite"],
                           "detail": f"first update (compiling) {fmt(run['first_update_s'])} s"})
        except RuntimeError as e:
            checks.append({"name": "bf16 + torch.compile", "ok": False, "detail": failure(e)})
    elif mode.compile_steps:
        checks.append({"name": "bf16 + torch.compile", "ok": False, "detail": "skipped: the 10-minute budget ran out"})
    return {"mode_name": mode_name, "mode": asdict(mode), "machine": machine_info(), "device": found["flops"]["device"],
            "flops_per_image": flops, "peak_flops": peaks, "runs": runs, "checks": checks,
            "elapsed_s": time.time() - start, "command": " ".join(sys.argv)}


# ---- children (torch) ------------------------------------------------------------------------------------------

def child_deterministic(args: list[str]) -> None:
    """`ddpm train` with deterministic kernels: cuDNN without autotuning, deterministic algorithms where torch has
    them (warn_only: an op without one still runs, and the comparison then shows it)."""
    import torch

    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)
    from trainer.main import entrypoint

    sys.argv = ["ddpm", *args]
    entrypoint()


def child_flops(preset: str, image_size: int, batch: int) -> dict:
    import torch

    from trainer.config import TrainingConfig
    from trainer.model import PEAK_TFLOPS, training_flops_per_image

    config = TrainingConfig(model_preset=preset, image_size=int(image_size), train_batch_size=int(batch))
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peaks = next((p for key, p in PEAK_TFLOPS if key in name), None)
    # ddpm train's TF32 default: fp32 work runs on TF32 tensor cores
    peak = {"no": peaks["tf32"] * 1e12, "bf16": peaks["mixed"] * 1e12, "fp16": peaks["mixed"] * 1e12} if peaks else {}
    return {"flops_per_image": training_flops_per_image(config), "peak_flops": peak, "device": name}


def child_samples(steps: list[int], trained: dict[str, str]) -> list[dict]:
    """Each trained pipeline ({precision: folder}), sampled with DDIM eta 1 and with its own DDPM scheduler, UNet in
    fp32 and in the precision it trained in, at every step count."""
    import torch
    from diffusers import DDPMPipeline

    from trainer.errors import NonFiniteSamples
    from trainer.sampling import eval_scheduler, sample_images

    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = []
    for precision, folder in trained.items():
        pipeline = DDPMPipeline.from_pretrained(folder).to(device)
        samplers = {"ddim eta 1": eval_scheduler("ddim", pipeline.scheduler.config), "ddpm": pipeline.scheduler}
        for sampler_name, scheduler in samplers.items():
            for unet_precision in dict.fromkeys(("no", precision)):
                bad = []
                for n in steps:
                    try:
                        sample_images(pipeline.unet, scheduler, range(SAMPLE_IMAGES), seed=0, num_inference_steps=n,
                                      eta=1.0, precision=unet_precision)
                    except NonFiniteSamples:
                        bad.append(n)
                results.append({"trained": precision, "sampler": sampler_name,
                                "precision": "fp32" if unet_precision == "no" else unet_precision,
                                "steps": ",".join(map(str, steps)), "nonfinite": bad})
    return results


def child_compare(a: str, b: str, first: int, last: int) -> dict:
    """Weights and EMA at checkpoint-`last` and the logged losses of steps first+1..last, bit for bit."""
    import torch
    from safetensors.torch import load_file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    differs = []
    ckpt_a, ckpt_b = (Path(x) / "checkpoints" / f"checkpoint-{last}" for x in (a, b))
    wa, wb = load_file(ckpt_a / "model.safetensors"), load_file(ckpt_b / "model.safetensors")
    if wa.keys() != wb.keys() or not all(torch.equal(wa[k], wb[k]) for k in wa):
        differs.append("weights")
    ema = [torch.load(c / "custom_checkpoint_0.pkl", weights_only=False)["shadow_params"] for c in (ckpt_a, ckpt_b)]
    if not all(torch.equal(x, y) for x, y in zip(*ema)):
        differs.append("EMA")
    losses = []
    for folder in (a, b):  # the newest event file: the run that wrote the last steps (a resumed run's own)
        newest = sorted((Path(folder) / "logs").rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)[-1]
        accumulator = EventAccumulator(str(newest), size_guidance={"scalars": 0})
        accumulator.Reload()
        by_step = {e.step: e.value for e in accumulator.Scalars("loss")}
        losses.append([by_step.get(s) for s in range(first + 1, last + 1)])
    if losses[0] != losses[1] or None in losses[0]:
        differs.append("losses")
    return {"equal": not differs, "differs": ", ".join(differs)}


def child_probe(spec_path: str) -> dict:
    spec = json.loads(Path(spec_path).read_text())
    found = {"compare": {p: child_compare(*args) for p, args in spec.get("compare", {}).items()}}
    if "flops" in spec:
        found["flops"] = child_flops(*spec["flops"])
    if "samples" in spec:
        found["samples"] = child_samples(*spec["samples"])
    return found


def main(argv: list[str]) -> int:
    if argv[:1] == ["_deterministic"]:
        child_deterministic(argv[1:])
        return 0
    if argv[:1] == ["_probe"]:
        print(json.dumps(child_probe(argv[1])))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the CPU smoke mode (small preset, 16 px, fp32/bf16)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    result = bench("quick" if args.quick else "full", args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps(result, indent=1))
    report = render(result)
    (args.out / "gpu.md").write_text(report)
    print(report)
    return 0 if all(c["ok"] for c in result["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
