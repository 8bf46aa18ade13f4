"""bench/run.py's pure helpers: the steady-state window, ratios, loss summaries, the Markdown and its splicing into
docs/PERFORMANCE.md. Nothing is trained or timed here (the benchmark itself is `make bench`)."""

import importlib.util
import sys

import pytest

from conftest import REPO

spec = importlib.util.spec_from_file_location("bench_run", REPO / "bench" / "run.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_steady_window_skips_the_warm_up_prefix_and_the_first_interval():
    # ours: logged every 5 updates, 0.5 s/step after a slow first interval
    points = [(5, 110.0)] + [(s, 110.0 + (s - 5) * 0.5) for s in range(10, 101, 5)]
    w = bench.steady_window(points, 100)
    assert (w["first_step"], w["last_step"]) == (20, 100)  # 20% of 100 steps
    assert w["seconds_per_step"] == pytest.approx(0.5)
    # a short run: the first logged interval is still skipped
    w = bench.steady_window([(5, 10.0), (10, 12.0), (15, 13.0), (20, 14.0)], 20)
    assert w["first_step"] == 5 and w["seconds_per_step"] == pytest.approx(4 / 15)


def test_steady_window_needs_two_points_after_the_prefix():
    with pytest.raises(ValueError, match="no steady window"):
        bench.steady_window([(5, 1.0), (10, 2.0)], 100)


def test_startup_is_the_time_before_steady_training_would_have_begun():
    window = {"first_step": 20, "last_step": 100, "t0": 1030.0, "t1": 1070.0, "seconds_per_step": 0.5}
    assert bench.startup_seconds(window, launched=1000.0) == pytest.approx(20.0)


def test_data_wait_share_uses_the_window_steps_only():
    window = {"first_step": 2, "last_step": 4, "t0": 10.0, "t1": 12.0, "seconds_per_step": 1.0}
    waits = [9.0, 9.0, 0.5, 0.25, 9.0]  # waits[k] is step k+1's: steps 3 and 4 are in the window
    assert bench.wait_share(waits, window) == pytest.approx(0.375)
    assert bench.mean_in_window([(2, 0.9), (3, 0.1), (4, 0.3), (5, 0.9)], window) == pytest.approx(0.2)
    assert bench.mean_in_window([], window) is None


def test_median_of_pair_ratios():
    assert bench.median_ratio([(10.0, 20.0), (10.0, 30.0), (10.0, 100.0)]) == pytest.approx(3.0)


def test_loss_summaries():
    tutorial = [(s, 1.0 if s <= 50 else 0.5) for s in range(1, 101)]  # every step
    ours = [(s, 1.0 if s <= 50 else 0.5) for s in range(5, 101, 5)]  # every 5 steps
    for points in (tutorial, ours):
        assert bench.loss_bins(points, 100, 5) == [1.0, 1.0, pytest.approx(0.75), 0.5, 0.5]
        assert bench.tail_mean(points, 100) == 0.5
    assert bench.loss_bins([(10, 1.0)], 100, 5) == [1.0, None, None, None, None]
    assert bench.spread([1.0, 3.0]) == (2.0, pytest.approx(2**0.5))
    assert bench.spread([1.0]) == (1.0, 0.0)


def test_splice_replaces_only_the_generated_section():
    doc = f"# Performance\n\nintro\n\n{bench.BEGIN}\nold table\n{bench.END}\n\n## On paper\ntext\n"
    new = bench.splice(doc, "new table\n")
    assert new == f"# Performance\n\nintro\n\n{bench.BEGIN}\nnew table\n{bench.END}\n\n## On paper\ntext\n"
    assert bench.splice(new, "new table") == new
    appended = bench.splice("# Performance\n", "table")
    assert appended.endswith(f"{bench.BEGIN}\ntable\n{bench.END}\n")


def _fake_result() -> dict:
    def run(ips, wait):
        return {"images_per_sec": ips, "peak_rss_mib": 1000.0, "data_wait_share": wait, "startup_s": 9.0,
                "gpu_max_memory_allocated": None}

    config = {"preset": "small", "image_size": 32, "batch": 16, "precision": "no", "steps": 100, "ratio": 2.0,
              "runs": {"tutorial": [{"load_before": 0.5}], "ours": [{"load_before": 1.5}]},
              "summary": {"tutorial": run(50.0, 0.2), "ours": run(100.0, None)},
              "tail_loss": {"tutorial": (0.3, 0.01), "ours": (0.29, 0.02)},
              "loss_bins": {"tutorial": [[1.0, 0.8, 0.6, 0.4, 0.3]], "ours": [[None, 0.8, 0.6, 0.4, 0.3]]}}
    costs = {"small": {"flops": {"flops_per_image": 1.5e9, "peak_flops": None, "device": "cpu"},
                       "grid_ours": {"seconds": 2.0, "sampler": "ddim 50 steps bf16"},
                       "grid_tutorial": {"no": {"seconds": 40.0, "measured_steps": 1000}}}}
    return {"machine": MACHINE, "command": "python bench/run.py", "elapsed_s": 600.0, "repeats": 1,
            "configs": [config], "costs": costs}


MACHINE = {"date": "2026-11-22T00:00:00+00:00", "cpu": "Test CPU", "cpus": 2, "memory_gib": 24, "torch": "2",
           "diffusers": "0", "accelerate": "1", "datasets": "5", "python": "3.11", "git": "abc", "load_at_start": 0.1}


def test_render_has_every_table():
    md = bench.render(_fake_result())
    assert "Test CPU" in md and "torch 2" in md and "2026-11-22" in md and "0.5 to 1.5" in md
    row = next(line for line in md.splitlines() if line.startswith("| small | 32 | 16 | no |"))
    assert "**2.00x**" in row and "75 / 150" in row and "20.0% / n/a" in row  # GFLOP/s = 1.5 GFLOP x img/s
    assert "| small | 32 | 40.0 s no | 2.0 s | ddim 50 steps bf16 | 20x |" in md
    assert "0.3000 ± 0.0100" in md and "| n/a | 0.8000 |" in md


# ---- time to quality (bench/ttq.py), plots (bench/plots.py), the photo crops (bench/photos.py) -------------------

def _load(name):
    """A bench/ script as a module (the scripts that import bench/run.py put bench/ on sys.path themselves)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


ttq, plots, photos, gpu = _load("ttq"), _load("plots"), _load("photos"), _load("gpu")


def test_tutorial_epochs_fill_the_budget_in_whole_epochs():
    assert ttq.tutorial_epochs(60, 4.7) == 4  # 282 steps of 63 per epoch
    assert ttq.tutorial_epochs(600, 4.7) == 45
    assert ttq.tutorial_epochs(1, 4.7) == 1


def test_where_ours_reaches_the_tutorials_score():
    points = [(60, 700.0), (150, 450.0), (300, 380.0), (600, 300.0)]
    assert ttq.first_budget_reaching(points, 460.0) == 150
    assert ttq.first_budget_reaching(points, 200.0) is None
    assert ttq.crossing_time(points, 700.0) == 60
    # halfway between 700 and 450 in score is halfway between 60 and 150 s in log time
    assert ttq.crossing_time(points, 575.0) == pytest.approx((60 * 150) ** 0.5)
    assert ttq.crossing_time(points, 100.0) is None


def _ttq_result():
    def r(steps, t, swd):
        return {"steps": steps, "train_s": t, "swd_mean": swd, "color_w1": swd / 10, "loss": [(1, 1.0, 1.0)]}

    budgets = [{"budget_s": 60, "tutorial": r(250, 66, 800.0), "ours": r(300, 70, 440.0)},
               {"budget_s": 600, "tutorial": r(2800, 610, 450.0), "ours": r(2900, 612, 250.0)}]
    dataset = {"tutorial_steps_per_s": 4.7, "budgets": budgets, "summary": ttq.summarize(budgets)}
    ablation = {"budget_s": 60, "datasets": {"butterflies": {"defaults": budgets[0]["ours"],
                                                             **{v: r(300, 70, 520.0) for v in ttq.ABLATION}}}}
    return {"machine": MACHINE, "command": "python bench/run.py", "elapsed_s": 3600, "num_images": 64,
            "loads": [0.5, 2.0], "datasets": {"butterflies": dataset}, "ablation": ablation}


def test_ttq_summary_and_markdown():
    result = _ttq_result()
    summary = result["datasets"]["butterflies"]["summary"]
    assert (summary["tutorial_score"], summary["ours_first_budget"]) == (450.0, 60)
    assert summary["speedup"] == pytest.approx(610 / 70)
    md = ttq.render(result)
    assert "| 60 s | 250, 66 s | 800.0 | 80.0 | 300, 70 s | **440.0** | 44.0 |" in md
    assert "first reaches it at the **60 s** budget" in md and "**8.7x** less wall time" in md
    assert "| loss_weighting min_snr (not a default) | 520.0 (+80) | 52.0 |" in md
    assert "load average 0.5 to 2.0" in md
    doc = f"intro\n{ttq.TTQ_BEGIN}\nold\n{ttq.TTQ_END}\ntail\n"
    assert ttq.splice(doc, md) == f"intro\n{ttq.TTQ_BEGIN}\n{md.strip()}\n{ttq.TTQ_END}\ntail\n"


def test_plots_are_written_small(tmp_path):
    pytest.importorskip("matplotlib")
    paths = plots.write_plots(_ttq_result(), tmp_path)
    assert [p.name for p in paths] == ["ttq_score.png", "ttq_loss.png", "ttq_grids_butterflies.png"]
    assert all(0 < p.stat().st_size < 1_000_000 for p in paths)
    assert plots.running_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_photo_crops_are_deterministic_squares_inside_their_photo():
    shapes = [(300, 451), (872, 1000)]
    boxes = photos.crop_boxes(shapes, 50, seed=0)
    assert boxes == photos.crop_boxes(shapes, 50, seed=0) and boxes != photos.crop_boxes(shapes, 50, seed=1)
    for k, top, left, side in boxes:
        h, w = shapes[k]
        assert min(h, w) // 4 <= side <= min(h, w) and top + side <= h and left + side <= w
    assert [b[0] for b in boxes[:4]] == [0, 1, 0, 1]  # photos in turn


# ---- make bench-gpu (bench/gpu.py) -----------------------------------------------------------------------------


def test_gpu_bench_speed_and_mfu_come_from_the_steady_window():
    # logged every 10 updates at 0.02 s per update of 32 images (1,600 images/s) after a slow first interval
    losses = [(10, 100.0, 0.5)] + [(s, 100.0 + (s - 10) * 0.02, 0.4) for s in range(20, 301, 10)]
    result = gpu.speed(losses, 300, 32, 372e9, 989e12)
    assert result["images_per_sec"] == pytest.approx(1600.0) and result["window"] == [60, 300]
    assert result["mfu"] == pytest.approx(372e9 * 1600 / 989e12) and result["tflops_per_sec"] == pytest.approx(595.2)
    assert gpu.speed(losses, 300, 32, 372e9, None)["mfu"] is None  # CPU, or a GPU missing from the peak table


def test_gpu_bench_full_mode_is_the_tutorial_at_128_px_in_bf16_and_fp16_and_counts_372_gflop():
    full = gpu.MODES["full"]
    assert (full.preset, full.image_size, full.precisions) == ("tutorial", 128, ("bf16", "fp16"))
    assert set(full.sample_steps) >= {1, 8, 10, 50, 250} and full.compile_steps
    assert gpu.child_flops("tutorial", 128, full.batch)["flops_per_image"] / 1e9 == pytest.approx(372, abs=1)
    args = gpu.train_args(full, "fp16", 300, "OUT", "CACHE")
    assert args[args.index("--mixed_precision") + 1] == "fp16" and args[args.index("--max_train_steps") + 1] == 300


@pytest.mark.slow
def test_gpu_bench_quick_mode_runs_every_check_on_the_cpu(tmp_path):
    """`python bench/gpu.py --quick`: fp32 and bf16 trainings, a bit-exact resume of each, finite samples of both
    samplers at several step counts, and the report; fp16 is CUDA-only."""
    import json
    import subprocess

    from conftest import clean_env

    proc = subprocess.run([sys.executable, "bench/gpu.py", "--quick", "--out", str(tmp_path)], cwd=REPO,
                          env=clean_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "gpu.json").read_text())
    checks = {c["name"]: c for c in result["checks"]}
    for precision in ("no", "bf16"):
        assert checks[f"{precision}: losses finite"]["ok"]
        assert checks[f"{precision}: resume"]["ok"] and "bit-identical" in checks[f"{precision}: resume"]["detail"]
        for sampler in ("ddim eta 1", "ddpm"):
            check = checks[f"samples: {precision} model, {sampler}, UNet fp32"]
            assert check["ok"] and check["detail"] == "steps 1,8,10: all finite"
        assert result["runs"][precision]["images_per_sec"] > 0
    assert checks["samples: bf16 model, ddim eta 1, UNet bf16"]["ok"]
    assert len(checks) == 4 + 6  # nothing else: no compile run, no fp16, on a CPU
    assert result["device"] == "cpu" and result["runs"]["no"]["mfu"] is None
    assert "| no: resume | ok | checkpoint-3 resumed to 6: weights, EMA and losses bit-identical |" in (
        tmp_path / "gpu.md").read_text()
