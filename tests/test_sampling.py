"""trainer.sampling: no step count, eta, schedule or eval precision makes a sample non-finite, and the arithmetic is
checked on every CPU, not left to one machine's rounding.

The defect (issue 16, diffusers #5969): DDIM's direction coefficient is sqrt(1 - a_prev - std^2) with
std = eta * sqrt(variance). At eta 1 on a zero-terminal-SNR schedule (a_t = 0 at the first step) the argument is 0
in exact arithmetic, and float32 rounding of the sqrt/pow made it one ulp negative, so NaN, on an AMD EPYC at
8, 10, 30, 40 and 250 steps and never on the Intel Xeon the tests were written on. So the tests below never rely
on the rounding of the machine they run on: they assert a margin many ulps wide, and they make rounding go
against the sampler on purpose (`adverse_rounding`)."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from trainer.config import TrainingConfig
from trainer.model import build_noise_scheduler, build_unet
from trainer.sampling import eval_scheduler, sample_images

EPS = torch.finfo(torch.float32).eps
MARGIN_EPS = 16  # the direction's argument must clear 0 by this many float32 eps of (1 - a_prev)
ADVERSE_ULPS = 4  # how far adverse_rounding pushes the variance up: more than any CPU's pow/sqrt is off
EPYC_NAN_STEPS = (8, 10, 30, 40, 250)  # the step counts that gave NaN samples on the AMD EPYC (issue 16)


def config(**fields) -> TrainingConfig:
    return TrainingConfig(model_preset="small", image_size=16, **fields)


# Every schedule a config can produce (zero SNR on: trailing; off: diffusers' default leading), and linspace,
# the third spacing a foreign scheduler config can carry.
SCHEDULES = {
    f"zero_snr={zero_snr},{spacing}": dict(
        build_noise_scheduler(config(zero_terminal_snr=zero_snr)).config, timestep_spacing=spacing)
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
    real = DDIMScheduler._get_variance

    def nudged(self, timestep, prev_timestep):
        variance = real(self, timestep, prev_timestep)
        up = variance
        for _ in range(ADVERSE_ULPS):
            up = torch.nextafter(up, torch.tensor(float("inf")))
        return torch.where(variance > 0, up, variance)

    monkeypatch.setattr(DDIMScheduler, "_get_variance", nudged)


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


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return build_unet(config()).eval()


@pytest.mark.parametrize("kind,precision", [("ddim", "no"), ("ddim", "bf16"), ("ddpm", "no")])
def test_real_samples_at_the_epyc_step_counts_are_finite_and_not_black(unet, kind, precision, adverse_rounding):
    """An untrained small UNet at 16 px with the default schedule (zero SNR, v-prediction, trailing), eta 1, at the
    step counts that gave all-NaN (black) grids on the EPYC, with rounding pushed against the sampler: every image
    is finite (a NaN one would raise) and has some colour (a NaN image quantises to black)."""
    scheduler = eval_scheduler(kind, build_noise_scheduler(config()).config)
    for steps in EPYC_NAN_STEPS:
        images = sample_images(unet, scheduler, range(2), seed=0, num_inference_steps=steps, eta=1.0,
                               precision=precision)
        assert images.shape == (2, 16, 16, 3) and images.dtype == torch.uint8
        assert (images.flatten(1).amax(1) > 0).all(), f"{kind} {steps} steps {precision}: a black image"
