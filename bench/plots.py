"""The time-to-quality plots of docs/PERFORMANCE.md, from bench/results/ttq.json (matplotlib, PNG, small files).

    python bench/plots.py [--results bench/results/ttq.json] [--out docs]

- ttq_score.png: SWD and colour W1 against wall time (launch to last step), both loops, one column per dataset;
- ttq_loss.png: each loop's logged training loss at the longest budget against wall time (ours logs its own
  objective: with v-prediction and Min-SNR weights it is not the tutorial's noise MSE, so compare shapes, not levels);
- ttq_grids_<dataset>.png: the 16-image grids (ddpm sample, seed 0) of both loops at every budget, side by side.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COLORS = {"tutorial": "#d62728", "ours": "#1f77b4"}
LABELS = {"tutorial": "tutorial loop", "ours": "ddpm train (defaults)"}


def running_mean(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to `window` values (the curve is readable without hiding its trend)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def log_seconds_axis(ax, seconds: list[float]) -> None:
    """A log time axis labelled in plain seconds at round values."""
    from matplotlib.ticker import NullFormatter, NullLocator

    ax.set_xscale("log")
    lo, hi = min(seconds) / 1.3, max(seconds) * 1.3
    ax.set_xlim(lo, hi)
    ticks = [t for t in (10, 20, 30, 60, 100, 150, 300, 600, 1000, 2000) if lo <= t <= hi] or [round(lo), round(hi)]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())


def plot_scores(result: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    names = list(result["datasets"])
    fig, axes = plt.subplots(2, len(names), figsize=(4.2 * len(names), 6.2), squeeze=False)
    for col, name in enumerate(names):
        d = result["datasets"][name]
        for row, (key, label) in enumerate((("swd_mean", "SWD (x1e3), lower is better"),
                                            ("color_w1", "colour W1 (grey levels)"))):
            ax = axes[row][col]
            for loop in ("tutorial", "ours"):
                xs = [b[loop]["train_s"] for b in d["budgets"]]
                ys = [b[loop][key] for b in d["budgets"]]
                ax.plot(xs, ys, "o-", color=COLORS[loop], label=LABELS[loop])
            if key == "swd_mean":
                target = d["summary"]["tutorial_score"]
                ax.axhline(target, color=COLORS["tutorial"], ls=":", lw=1,
                           label=f"tutorial at {d['summary']['tutorial_budget']:.0f} s")
                ax.set_title(name)
            log_seconds_axis(ax, [b[loop]["train_s"] for b in d["budgets"] for loop in ("tutorial", "ours")])
            ax.set_xlabel("wall time, launch to last step (s)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3, which="both")
            if row == 0 and col == 0:
                ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_loss(result: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    names = list(result["datasets"])
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.2), squeeze=False)
    for col, name in enumerate(names):
        longest = max(result["datasets"][name]["budgets"], key=lambda b: b["budget_s"])
        ax = axes[0][col]
        for loop in ("tutorial", "ours"):
            points = longest[loop]["loss"]
            window = 50 if loop == "tutorial" else 5  # the tutorial logs every step, ours every 10
            ax.plot([p[1] for p in points], running_mean([p[2] for p in points], window), color=COLORS[loop],
                    label=LABELS[loop], lw=1)
        ax.set_title(f"{name}, {longest['budget_s']:.0f} s budget")
        ax.set_xlabel("wall time (s)")
        ax.set_ylabel("training loss (each loop's own objective)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_grids(result: dict, name: str, path: Path) -> None:
    import matplotlib.pyplot as plt
    from PIL import Image

    budgets = result["datasets"][name]["budgets"]
    fig, axes = plt.subplots(2, len(budgets), figsize=(1.9 * len(budgets), 4.1), squeeze=False)
    for col, b in enumerate(budgets):
        for row, loop in enumerate(("tutorial", "ours")):
            ax = axes[row][col]
            grid = b[loop].get("grid")
            if grid and Path(grid).exists():
                ax.imshow(Image.open(grid))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{b['budget_s']:.0f} s: SWD {b[loop]['swd_mean']:.0f}", fontsize=8)
            if col == 0:
                ax.set_ylabel(LABELS[loop], fontsize=8)
    fig.suptitle(f"{name}: equal budgets (DDIM 50, seed 0)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plots(result: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "ttq_score.png", out / "ttq_loss.png"]
    plot_scores(result, paths[0])
    plot_loss(result, paths[1])
    for name in result["datasets"]:
        paths.append(out / f"ttq_grids_{name}.png")
        plot_grids(result, name, paths[-1])
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "ttq.json")
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    args = parser.parse_args(argv)
    for path in write_plots(json.loads(args.results.read_text()), args.out):
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
