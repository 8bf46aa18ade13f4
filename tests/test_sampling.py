"""trainer.sampling: no step count, eta, schedule or eval precision makes a sample non-finite, and the arithmetic is
checked on every CPU, not left to one machine's rounding.

The defect (issue 16, diffusers #5969): DDIM's direction coefficient is sqrt(1 - a_prev - std^2) with
std = eta * sqrt(variance). At eta 1 on a zero-terminal-SNR schedule (a_t = 0 at the first step) the argument is 0
in exact arithmetic, and float32 rounding of the sqrt/pow made it one ulp negative, so NaN, on an AMD EPYC at
8, 10, 30, 40 and 250 steps and never on the Intel Xeon the tests were written on. So the tests below never rely
on the rounding of the machine they run on: they assert a margin many ulps wide, and they make rounding go
against the sampler on purpose (`adverse_rounding`)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler

from conftest import REPO, TINY, clean_env
from fault_driver import adversely_rounded
from helpers import free_port, scalar_series
from trainer import data, quality
from trainer.cli import main
from trainer.config import TrainingConfig
from trainer.errors import EXIT_DIVERGED, NonFiniteSamples
from trainer.model import build_noise_scheduler, build_unet
from trainer.sampling import denoise, eval_scheduler, image_generators, sample_images

EPS = torch.finfo(torch.float32).eps
MARGIN_EPS = 16  # the direction's argument must clear 0 by this many float32 eps of (1 - a_prev)
ADVERSE_ULPS = 4  # how far adverse_rounding pushes the variance up: more than any CPU's pow/sqrt is off
EPYC_NAN_STEPS = (8, 10, 30, 40, 250)  # the step counts that gave NaN samples on the AMD EPYC (issue 16)


def config(**fields) -> TrainingConfig:
    return TrainingConfig(model_preset="small", image_size=16, **fields)


def schedule(zero_snr: bool = True, **overrides) -> dict:
    """The training scheduler's config for zero_terminal_snr, with `overrides`. Every value is passed explicitly:
    from_config drops the ones a config lists as defaults (`_use_default_values`), overrides included."""
    values = {k: v for k, v in build_noise_scheduler(config(zero_terminal_snr=zero_snr)).config.items()
              if not k.startswith("_")}
    return dict(DDPMScheduler(**{**values, **overrides}).config)


# Every schedule a config can produce (zero SNR on: trailing; off: diffusers' default leading), and linspace,
# the third spacing a foreign scheduler config can carry.
SCHEDULES = {
    f"zero_snr={zero_snr},{spacing}": schedule(zero_snr, timestep_spacing=spacing)
    for zero_snr, spacing in ((True, "trailing"), (False, "leading"), (True, "leading"), (False, "trailing"),
                              (True, "linspace"))
}


def ddim_steps(scheduler: DDIMScheduler) -> tuple[torch.Tensor, torch.Tensor]:
    """Every distinct (t, prev_t) DDIMScheduler.step meets for num_inference_steps 1..num_train_timesteps (about
    13,000 of the 500,000 steps: they repeat), prev_t as step computes it."""
    total = scheduler.config.num_train_timesteps
    pairs = set()
    for n in range(1, total + 1):
        scheduler.set_timesteps(n)
        pairs.update((t, t - total // n) for t in scheduler.timesteps.tolist())
    t, prev = torch.tensor(sorted(pairs)).T
    return t, prev


@pytest.fixture
def adverse_rounding(monkeypatch):
    """Every CPU rounds as badly as the EPYC did, and worse: DDIM's variance comes out ADVERSE_ULPS ulps too large,
    so std^2 exceeds 1 - a_prev wherever the margin is thinner than that. An exact 0 (the last step, a_prev = 1)
    stays 0: 0 * x is exact on every IEEE machine."""
    monkeypatch.setattr(DDIMScheduler, "_get_variance", adversely_rounded(DDIMScheduler._get_variance, ADVERSE_ULPS))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_ddim_direction_clears_zero_by_a_margin_at_every_step_count_and_eta(schedule):
    """For num_inference_steps 1..1000 and eta 0, 0.5 and 1: the argument of DDIMScheduler.step's
    `(1 - alpha_prod_t_prev - std_dev_t**2) ** 0.5` (diffusers scheduling_ddim.py, step 6), with the variance of the
    very scheduler our sampler steps with, is at least MARGIN_EPS float32 eps of 1 - a_prev: no CPU's last-bit
    rounding can take it below 0. Plain DDIMScheduler fails this at eta 1 (its margin is 0, give or take an ulp)."""
    sampler = eval_scheduler("ddim", SCHEDULES[schedule])
    t, prev = ddim_steps(sampler)
    variance = torch.stack([sampler._get_variance(int(a), int(b)) for a, b in zip(t, prev)])
    a_prev = torch.where(prev >= 0, sampler.alphas_cumprod[prev.clamp(min=0)], sampler.final_alpha_cumprod)
    assert variance.dtype == a_prev.dtype == torch.float32
    for eta in (0.0, 0.5, 1.0):
        std = eta * variance**0.5
        argument = 1 - a_prev - std**2
        short = argument < MARGIN_EPS * EPS * (1 - a_prev)
        assert not short.any(), (
            f"eta {eta}: {int(short.sum())} steps within {MARGIN_EPS} eps of a NaN, e.g. t={t[short][:5].tolist()} "
            f"prev={prev[short][:5].tolist()} argument={argument[short][:5].tolist()}")


@pytest.mark.parametrize("schedule", [s for s in SCHEDULES if "zero_snr=True" in s])
def test_ddim_first_step_is_finite_at_every_step_count_when_rounding_goes_against_it(schedule, adverse_rounding):
    """The real DDIMScheduler.step of our sampler, at the first (pure-noise) timestep of every step count 1..1000,
    eta 1, with the variance pushed ADVERSE_ULPS ulps up: finite. Plain diffusers gives NaN here at every count
    whose first step is t=999."""
    sampler = eval_scheduler("ddim", SCHEDULES[schedule])
    generator = torch.Generator().manual_seed(0)
    sample, output = torch.randn(2, 1, 2, 2, generator=generator), torch.randn(2, 1, 2, 2, generator=generator)
    bad = []
    for n in range(1, sampler.config.num_train_timesteps + 1):
        sampler.set_timesteps(n)
        step = sampler.step(output, sampler.timesteps[0], sample, eta=1.0, generator=generator).prev_sample
        if not torch.isfinite(step).all():
            bad.append(n)
    assert not bad, f"NaN at num_inference_steps {bad[:20]} ({len(bad)} in all)"


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_ddpm_coefficients_are_finite_at_every_step_count(schedule):
    """DDPMScheduler (the `ddpm` eval sampler and the saved pipeline's own) takes no square root of a difference:
    its variance is clamped to >= 1e-20 and a_t / a_prev >= 0. Checked over every step the counts 1..1000 meet,
    with the scheduler's own _get_variance; the x0 coefficients are finite for every prediction type the config
    accepts with this schedule (epsilon at a_t = 0 divides by 0: config validation refuses it, and a foreign model
    folder that has it is caught by the non-finite check)."""
    scheduler = DDPMScheduler.from_config(SCHEDULES[schedule])
    total = scheduler.config.num_train_timesteps
    for n in range(1, total + 1):
        scheduler.set_timesteps(n)
        timesteps = scheduler.timesteps
        prev = torch.cat([timesteps[1:], torch.tensor([-1])])
        a_t = scheduler.alphas_cumprod[timesteps]
        a_prev = torch.where(prev >= 0, scheduler.alphas_cumprod[prev.clamp(min=0)], scheduler.one)
        current_alpha = a_t / a_prev
        coefficients = [a_prev**0.5 * (1 - current_alpha) / (1 - a_t), current_alpha**0.5 * (1 - a_prev) / (1 - a_t)]
        if n in (1, 10, 250, total):  # the scheduler's own variance (a scalar call per step)
            coefficients.append(torch.stack([scheduler._get_variance(int(t)) ** 0.5 for t in timesteps]))
        if scheduler.config.rescale_betas_zero_snr:
            coefficients.append(a_t**0.5)  # v_prediction's and sample's x0 from x_t
        else:
            coefficients.append(1 / a_t**0.5)  # epsilon's
        for c in coefficients:
            assert torch.isfinite(c).all(), (n, c)


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_every_step_count_gives_exactly_that_many_timesteps_all_in_range(kind, schedule):
    """Our samplers, for num_inference_steps 1..1000: exactly that many timesteps, strictly decreasing, none below
    0. diffusers' trailing spacing takes np.arange(T, 0, -T/n), which float rounding makes one element too long for
    some n (at T=1000 with the default schedule: 61, 103, 121, ... 124 counts for DDIM): a last timestep of -1 that
    indexes alphas_cumprod[-1], the pure-noise end, so those counts sample silently wrong. Arithmetic, no model:
    the same on every CPU."""
    sampler = eval_scheduler(kind, SCHEDULES[schedule])
    wrong = []
    for n in range(1, sampler.config.num_train_timesteps + 1):
        sampler.set_timesteps(n)
        t = sampler.timesteps
        if len(t) != n or int(t.min()) < 0 or not bool((t[:-1] > t[1:]).all()):
            wrong.append((n, len(t), int(t.min())))
    assert not wrong, f"{len(wrong)} step counts give wrong timesteps, e.g. (n, len, min) {wrong[:5]}"


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return build_unet(config()).eval()


@pytest.mark.parametrize("kind,precision", [("ddim", "no"), ("ddim", "bf16"), ("ddpm", "no")])
def test_real_samples_at_the_epyc_step_counts_are_finite_and_not_black(unet, kind, precision, adverse_rounding):
    """An untrained small UNet at 16 px with the default schedule (zero SNR, v-prediction, trailing), eta 1, at the
    step counts that gave all-NaN (black) grids on the EPYC (DDPM without the 250), with rounding pushed against the
    sampler: every image is finite (a NaN one would raise) and has some colour (a NaN image quantises to black)."""
    scheduler = eval_scheduler(kind, schedule())
    for steps in EPYC_NAN_STEPS if kind == "ddim" else EPYC_NAN_STEPS[:-1]:  # DDPM's arithmetic: checked above
        images = sample_images(unet, scheduler, range(2), seed=0, num_inference_steps=steps, eta=1.0,
                               precision=precision)
        assert images.shape == (2, 16, 16, 3) and images.dtype == torch.uint8
        assert (images.flatten(1).amax(1) > 0).all(), f"{kind} {steps} steps {precision}: a black image"


@pytest.mark.parametrize("zero_snr,prediction_type", [(True, "v_prediction"), (True, "sample"), (False, "epsilon"),
                                                      (False, "v_prediction"), (False, "sample")])
def test_real_samples_of_every_schedule_and_prediction_type_the_config_accepts(zero_snr, prediction_type,
                                                                            adverse_rounding):
    """Both samplers, eta 1, 8 steps, rounding against the sampler: finite images with colour."""
    torch.manual_seed(0)
    unet = build_unet(config(zero_terminal_snr=zero_snr, prediction_type=prediction_type)).eval()
    for kind in ("ddim", "ddpm"):
        scheduler = eval_scheduler(kind, schedule(zero_snr, prediction_type=prediction_type))
        images = sample_images(unet, scheduler, range(2), seed=0, num_inference_steps=8, eta=1.0)
        assert (images.flatten(1).amax(1) > 0).all(), f"{kind}: a black image"


# ---- the loop is the stock pipelines' loop --------------------------------------------------------------------------

def stock(pipeline_cls, unet, scheduler, steps, **extra) -> torch.Tensor:
    pipeline = pipeline_cls(unet=unet, scheduler=scheduler)
    pipeline.register_modules(scheduler=scheduler)  # DDIMPipeline's __init__ converts it to a plain DDIMScheduler
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(batch_size=2, generator=image_generators(0, range(2)), num_inference_steps=steps,
                    output_type="pt", **extra).images


@pytest.mark.parametrize("kind,eta", [("ddim", 1.0), ("ddim", 0.5), ("ddim", 0.0), ("ddpm", None)])
def test_denoise_draws_exactly_what_the_stock_pipeline_draws(unet, kind, eta):
    """Our loop with a sampler gives bit for bit what DDIMPipeline/DDPMPipeline give with that sampler (the same
    generators), before their clamp; sample_images quantises it as the pipelines' numpy output quantises."""
    scheduler = eval_scheduler(kind, schedule())
    extra = {"eta": eta} if kind == "ddim" else {}
    ours = denoise(unet, scheduler, image_generators(0, range(2)), num_inference_steps=10, **extra)
    theirs = stock(DDIMPipeline if kind == "ddim" else DDPMPipeline, unet, scheduler, 10, **extra)
    assert torch.equal((ours / 2 + 0.5).clamp(0, 1), theirs)
    quantised = torch.from_numpy((theirs.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8))
    assert torch.equal(sample_images(unet, scheduler, range(2), seed=0, num_inference_steps=10, **extra), quantised)


def test_the_variance_margin_changes_samples_by_far_less_than_a_grey_level(unet):
    """Against plain DDIMScheduler where it is finite (eta 0.5): the same images to ~1e-6; at eta 0 exactly."""
    for eta, tolerance in ((0.5, 1e-5), (0.0, 0.0)):
        ours = denoise(unet, eval_scheduler("ddim", schedule()), image_generators(0, range(2)), num_inference_steps=10,
                       eta=eta)
        plain = stock(DDIMPipeline, unet, DDIMScheduler.from_config(schedule()), 10, eta=eta)
        assert ((ours / 2 + 0.5).clamp(0, 1) - plain).abs().max() <= tolerance


# ---- non-finite samples are an error --------------------------------------------------------------------------------

def broken_unet(value: float):
    """The small UNet with every output pixel `value` (NaN or inf) through conv_out's bias."""
    torch.manual_seed(0)
    broken = build_unet(config()).eval()
    with torch.no_grad():
        broken.conv_out.bias.fill_(value)
    return broken


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_non_finite_samples_raise_before_they_are_quantised(kind, value):
    unclipped = schedule(clip_sample=False)  # clipping x0 would turn an inf into 1
    with pytest.raises(NonFiniteSamples) as caught:
        sample_images(broken_unet(value), eval_scheduler(kind, unclipped), range(3), seed=0, num_inference_steps=10,
                      batch_size=2, precision="bf16")
    assert (caught.value.bad, caught.value.checked) == (2, 2)  # the first chunk of 2 stops it
    assert f"2 of 2 images sampled with {kind} 10 steps" in str(caught.value) and "UNet bf16" in str(caught.value)
    assert caught.value.exit_code == EXIT_DIVERGED


def test_quantising_and_scoring_refuse_non_finite_images():
    for value in (float("nan"), float("inf"), -float("inf")):
        images = torch.zeros(2, 3, 8, 8)
        images[1, 0, 3, 3] = value
        with pytest.raises(ValueError, match="NaN/inf"):
            data.to_uint8(images)
        with pytest.raises(ValueError, match="uint8"):  # the metric takes quantised images only
            quality.swd(images.permute(0, 2, 3, 1), images.permute(0, 2, 3, 1))


def save_pipeline(folder, unet, **overrides) -> None:
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**{k: v for k, v in schedule(**overrides).items()
                                                       if not k.startswith("_")})).save_pretrained(folder)


def test_ddpm_sample_and_eval_exit_3_naming_the_sampler_and_write_nothing(tmp_path, capsys):
    save_pipeline(tmp_path / "model", broken_unet(float("nan")))
    out = tmp_path / "out"
    assert main(["sample", "--model", str(tmp_path / "model"), "--num-images", "4", "--num_inference_steps", "10",
                 "--out", str(out)]) == 3
    err = capsys.readouterr().err
    assert "error: 4 of 4 images sampled with ddim 10 steps eta 1, UNet fp32 hold NaN/inf values" in err
    assert not out.exists() or not list(out.iterdir())
    assert main(["eval", "--model", str(tmp_path / "model"), "--num-images", "4", "--num_inference_steps", "8",
                 "--eval_scheduler", "ddpm", "--eval_mixed_precision", "no", "--builtin_num_images", "8"]) == 3
    assert "4 of 4 images sampled with ddpm 8 steps, UNet fp32 hold NaN/inf values" in capsys.readouterr().err


def test_a_foreign_epsilon_model_on_a_zero_snr_schedule_is_caught_not_crashed_on(unet, tmp_path, capsys):
    """prediction_type epsilon with rescale_betas_zero_snr (config validation refuses it for training) divides by
    sqrt(a_t) = 0 at the first step: with clip_sample (diffusers' default) x0 is clipped and sampling goes on;
    without, the images are NaN and `ddpm sample` says so (exit 3) instead of writing black PNGs."""
    for clip, code in ((True, 0), (False, 3)):
        folder = tmp_path / f"clip-{clip}"
        save_pipeline(folder, unet, prediction_type="epsilon", clip_sample=clip)
        for kind in ("ddim", "ddpm"):
            out = tmp_path / f"out-{clip}-{kind}"
            assert main(["sample", "--model", str(folder), "--num-images", "2", "--num_inference_steps", "4",
                         "--scheduler", kind, "--out", str(out)]) == code
            assert len(list(out.glob("*.png")) if out.exists() else []) == (3 if code == 0 else 0)
    assert "sampled with ddpm 4 steps, UNet fp32 hold NaN/inf values" in capsys.readouterr().err


# ---- the training loop, as a process (tests/fault_driver.py puts the fault where it is needed) ---------------------

def driven(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tests/fault_driver.py", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=clean_env())


LOOP = [*TINY, "--max_train_steps", "16", "--save_image_epochs", "1", "--logging_steps", "8",  # evaluations at 8, 16
        "--eval_quality_images", "8", "--checkpointing_steps", "1000"]


@pytest.mark.slow
def test_a_run_whose_evaluations_sample_nan_saves_no_grid_scores_nothing_and_trains_on(tmp_path):
    out = tmp_path / "out"
    proc = driven("--nan-samples", "eval", "train", *LOOP, "--output_dir", out)
    assert proc.returncode == 0, proc.stderr  # the saved pipeline itself samples finite images: the run completes
    for step in (8, 16):
        assert (f"WARNING: evaluation at step {step}: 8 of 8 images sampled with ddim 2 steps eta 1, UNet bf16 hold "
                "NaN/inf values") in proc.stdout
    assert scalar_series(out / "logs", "eval/nonfinite_images") == {8: 8.0, 16: 8.0}
    assert scalar_series(out / "logs", "quality/swd_mean") == {}  # never a score
    assert not list(out.glob("samples/*.png"))
    assert "samples/" not in (out / "README.md").read_text()  # the model card shows no grid
    assert json.loads((out / "training_complete.json").read_text())["global_step"] == 16
    assert "the saved pipeline samples finite images (2 images, ddpm 2 steps, UNet fp32, its own scheduler)" in \
        proc.stdout


@pytest.mark.slow
def test_with_two_ranks_one_ranks_nan_samples_are_counted_and_no_rank_waits_for_a_gather(tmp_path):
    """Rank 1's share of each evaluation is NaN, rank 0's is not: both ranks learn it in one all-reduce, skip the
    gather together (rank 0 alone in it would hang) and train on."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "tests/fault_driver.py",
                           "--nan-samples", "eval:1", "train", *LOOP, "--max_train_steps", "8", "--output_dir", out],
                          capture_output=True, text=True, cwd=REPO, env=clean_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "WARNING: evaluation at step 4: 4 of 8 images sampled with ddim 2 steps eta 1" in proc.stdout
    assert scalar_series(out / "logs", "eval/nonfinite_images") == {4: 4.0, 8: 4.0}
    assert not list(out.glob("samples/*.png")) and (out / "training_complete.json").exists()


@pytest.mark.slow
def test_a_pipeline_that_samples_nan_with_its_own_scheduler_is_never_marked_complete(tmp_path):
    out = tmp_path / "out"
    proc = driven("--nan-samples", "final", "train", *LOOP, "--output_dir", out)
    assert proc.returncode == EXIT_DIVERGED, proc.stderr
    assert "error: 2 of 2 images sampled with ddpm 2 steps, UNet fp32 hold NaN/inf values" in proc.stderr
    assert not (out / "training_complete.json").exists() and not (out / "README.md").exists()
    assert len(list((out / "samples").glob("*.png"))) == 2  # its evaluations were finite
    # the same run without the fault resumes at its final step and completes the end
    again = driven("train", *LOOP, "--output_dir", out)
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "training_complete.json").read_text())["global_step"] == 16


@pytest.mark.slow
def test_the_issue_reproduction_samples_finite_non_black_grids_when_rounding_goes_against_it(tmp_path):
    """Issue 16's reproduction, smaller (16 px, 10 DDIM steps, eta 1, the zero-SNR defaults), with DDIM's variance
    pushed 4 ulps up in every process: the grids have colour, the scores are not the NaN grid's, and `ddpm eval`
    in fp32 agrees."""
    out = tmp_path / "out"
    proc = driven("--adverse-rounding", "train", *LOOP, "--num_inference_steps", "10", "--output_dir", out)
    assert proc.returncode == 0, proc.stderr
    assert scalar_series(out / "logs", "eval/nonfinite_images") == {8: 0.0, 16: 0.0}
    for grid in sorted((out / "samples").glob("*.png")):
        pixels = np.asarray(Image.open(grid))
        assert pixels.reshape(-1, 3).max(0).min() > 0 and pixels.std() > 5, grid  # colour, not a black grid
    scores = scalar_series(out / "logs", "quality/swd_mean")
    assert sorted(scores) == [8, 16] and all(np.isfinite(list(scores.values())))
    evaluated = driven("--adverse-rounding", "eval", "--model", out, "--num-images", "8", "--json",
                       "--eval_mixed_precision", "no")
    assert evaluated.returncode == 0, evaluated.stderr
    assert np.isfinite(json.loads(evaluated.stdout)["swd_mean"])
