"""Experiment (a): attention-logit explosion without QK-Clip, and MuonClip holding it (K2 report
sec. 2.1). `tiny`, 300 steps of 16 x 128 tokens at lr 3e-2 without weight decay, once without
QK-Clip and once with tau = 30 (the threshold of K2's small ablation):

    python train.py --qk-clip-tau 0  --lr 3e-2 --weight-decay 0 --max-steps 300 --eval-interval 50 --out runs/exp-a-noclip
    python train.py --qk-clip-tau 30 --lr 3e-2 --weight-decay 0 --max-steps 300 --eval-interval 50 --out runs/exp-a-clip30

    python experiments/logits.py --plot assets/exp-a-logits.png   # both runs (unless finished), the table, the plot

The table: the logged max attention logit (each step's maximum before that step's clip) at a few
steps and over the run, head clips, final validation loss, and the final model's max logit on
held-out text: the fixed validation batches of summarize.fixed_val_loss, through a training-mode
forward, which is where the model records its per-head max logit (no update follows).
"""
import argparse
import json
import math
import os

import summarize  # first: it puts the repository's modules on the path, and train.py's thread policy
import torch

import data
from data import number
from kimik2 import KimiK2
from train_run import pyplot, read_metrics

RUNS = {"no clip": ("runs/exp-a-noclip", "0"), "MuonClip, tau 30": ("runs/exp-a-clip30", "30")}
STEPS = (70, 130, 190, 280)


def held_out_max_logit(run_dir, batches=8) -> float:
    """The largest attention logit of the final model over `batches` fixed validation batches."""
    with open(os.path.join(run_dir, "config.json")) as f:
        run_config = json.load(f)
    model = KimiK2.from_pretrained(os.path.join(run_dir, "hf")).train()  # max logits are tracked in training forwards
    sampler = data.BatchSampler(summarize.validation_tokens(run_config), run_config["batch_size"],
                                run_config["seq_len"], seed=summarize.VAL_SEED)
    with torch.enable_grad():
        for _ in range(batches):
            model(sampler.next()[0])
    return max(m.max_logits.max().item() for m in model.attention_modules())


def row(run_dir) -> dict:
    records = read_metrics(os.path.join(run_dir, "metrics.jsonl"), math.inf)
    logged = {r["step"]: r["max_logit"] for r in records if "max_logit" in r}
    return {"at steps": [logged.get(s) for s in STEPS], "highest": max(logged.values()),
            "clips": sum(r["heads_clipped"] for r in records if "heads_clipped" in r),
            "final val loss": [r["val_loss"] for r in records if "val_loss" in r][-1],
            "held-out max logit": held_out_max_logit(run_dir)}


def plot(path: str):
    """Both runs' logged max attention logit per step, with tau, and their validation losses."""
    if (plt := pyplot(path)) is None:
        return
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for name, (folder, tau) in RUNS.items():
        records = read_metrics(os.path.join(folder, "metrics.jsonl"), math.inf)
        ax[0].plot(*zip(*[(r["step"], r["max_logit"]) for r in records if "max_logit" in r]), label=name)
        ax[1].plot(*zip(*[(r["step"], r["val_loss"]) for r in records if "val_loss" in r]), "o-", ms=3, label=name)
    ax[0].axhline(30, color="k", linestyle="--", linewidth=0.8, label="tau 30")
    ax[0].set(title="max attention logit (logged before each step's clip)", xlabel="step", yscale="log")
    ax[1].set(title="validation loss, nats/token", xlabel="step")
    for a in ax:
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=number(int, 1), default=1, help="runs at a time (with OMP_NUM_THREADS=1 each)")
    p.add_argument("--plot", help="PNG of both runs' max logits and validation losses (needs matplotlib)")
    args = p.parse_args(argv)
    common = ["--lr", "3e-2", "--weight-decay", "0", "--max-steps", "300", "--eval-interval", "50"]
    summarize.train_all({folder: ["--qk-clip-tau", tau, *common] for folder, tau in RUNS.values()}, args.jobs)
    rows = {name: row(folder) for name, (folder, _) in RUNS.items()}
    print("| | " + " | ".join(rows) + " |\n|---|" + "---|" * len(rows))
    print(f"| max attention logit at step {' / '.join(map(str, STEPS))} | " +
          " | ".join(" / ".join(f"{v:.0f}" for v in r["at steps"]) for r in rows.values()) + " |")
    for key, fmt in (("highest", ".1f"), ("held-out max logit", ".1f"), ("clips", ",d"), ("final val loss", ".4f")):
        print(f"| {key} | " + " | ".join(format(r[key], fmt) for r in rows.values()) + " |")
    if args.plot:
        plot(args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
