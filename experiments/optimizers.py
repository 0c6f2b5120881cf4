"""Experiment (b): MuonClip against AdamW at equal tokens. `tiny`, 200 steps of 16 x 128 tokens
(410k tokens), weight decay 0.1, the WSD schedule, each optimizer at three learning rates, one seed;
then AdamW at its best rate given twice the tokens. `--optimizer adamw` is train.py's MuonClip with
every parameter in its AdamW group, so only the update rule differs. Each run is

    python train.py --optimizer OPT --lr LR --max-steps 200 --eval-interval 50 --sample-tokens 0 --out runs/exp-b-OPT-LR

    OMP_NUM_THREADS=1 python experiments/optimizers.py --jobs 2 --plot assets/exp-b-optimizers.png
        # every run not yet finished, then the table and the validation curves of both optimizers
"""
import argparse
import json
import math
import os

import summarize  # first: it puts the repository's modules on the path, and train.py's thread policy
from data import number
from train_run import pyplot, read_metrics

GRID = {"muonclip": ("3e-3", "1e-2", "3e-2"), "adamw": ("1e-3", "3e-3", "1e-2")}
LONGER = ("adamw", "3e-3", 400)  # AdamW at its best rate with twice the tokens


def val_curve(run_dir) -> list[tuple[int, float]]:
    return [(r["step"], r["val_loss"]) for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"), math.inf)
            if "val_loss" in r]


def final_val_loss(run_dir) -> float:
    return val_curve(run_dir)[-1][1]


def plot(runs: dict, path: str):
    """Validation loss against training tokens, every run: MuonClip solid, AdamW dashed."""
    if (plt := pyplot(path)) is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (opt, lr, steps), folder in runs.items():
        steps_, losses = zip(*val_curve(folder))
        ax.plot([s * tokens_per_step(folder) for s in steps_], losses, "-" if opt == "muonclip" else "--",
                marker="o", ms=3, label=f"{opt}, lr {lr}" + (f", {steps} steps" if steps != 200 else ""))
    ax.set(xlabel="training tokens", ylabel="validation loss, nats/token", ylim=(1.3, 2.6),
           title="(b) MuonClip (solid) against AdamW (dashed), tiny, one seed")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def tokens_per_step(folder) -> int:
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)["tokens_per_step"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=number(int, 1), default=1, help="runs at a time (with OMP_NUM_THREADS=1 each)")
    p.add_argument("--plot", help="PNG of both optimizers' validation curves (needs matplotlib)")
    args = p.parse_args(argv)
    runs = {(opt, lr, 200): f"runs/exp-b-{opt}-{lr}" for opt, lrs in GRID.items() for lr in lrs}
    runs[LONGER] = "runs/exp-b-{}-{}-{}steps".format(*LONGER)
    summarize.train_all({folder: ["--optimizer", opt, "--lr", lr, "--max-steps", str(steps), "--eval-interval", "50",
                                  "--sample-tokens", "0"] for (opt, lr, steps), folder in runs.items()}, args.jobs)
    rates = sorted({lr for lrs in GRID.values() for lr in lrs}, key=float)
    print("| | " + " | ".join(f"lr {lr}" for lr in rates) + " |\n|---|" + "---|" * len(rates))
    for opt, lrs in GRID.items():
        print(f"| {opt} | " + " | ".join(f"{final_val_loss(runs[(opt, lr, 200)]):.4f}" if lr in lrs else ""
                                         for lr in rates) + " |")
    print("{} at lr {} for {} steps: {:.4f}".format(*LONGER, final_val_loss(runs[LONGER])))
    if args.plot:
        plot(runs, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
