"""Compare finished train.py runs: the tables and plots of experiments (c) and (d) in the README.

Runs that differ only in --seed form one group; a group is named by the settings that differ
between groups. Prints a Markdown table of total and activated parameters, final validation loss
(mean and per seed), its change against the first group, and the training FLOPs each group's mean
validation curve needs to reach a target loss (the highest final mean loss, so every group reaches
it), with the ratio to the fewest.

    python experiments/summarize.py runs/sparsity/e{8,16,32,64,128}-s{0,1,2} --plot assets/exp-c-sparsity.png

A run folder that holds fixed_val.json (written by experiments/sparsity.py: the final model scored
on the same validation batches whatever the seed) reports that loss as its final loss; the curves
and FLOPs-to-target always come from the validation losses train.py logged.
"""
import argparse
import glob
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repository's modules, importable from any working directory
import train  # noqa: E402  (first: it sets OMP_WAIT_POLICY=PASSIVE before torch loads; see train.py)
import torch  # noqa: E402

import data  # noqa: E402
from kimik2 import Config, KimiK2, count_params, flops_per_token  # noqa: E402
from train_run import pyplot, read_metrics  # noqa: E402

# -----------------------------------------------------------------------------------------------
# Running a sweep: train.py once per run folder, then the final model on fixed validation batches

# train.py's settings shared by the runs of experiments (c)-(d) (README): 200 steps, evaluated every 25
SWEEP = ["--max-steps", "200", "--eval-interval", "25", "--ckpt-interval", "200", "--keep-ckpts", "1",
         "--sample-tokens", "0"]
VAL_SEED = 0  # the fixed validation batches: the same for every run, whatever its --seed


def finished(run_dir) -> bool:
    return os.path.exists(os.path.join(run_dir, "hf", "model.safetensors"))


def train(run_dir, train_args):
    """python train.py TRAIN_ARGS --out RUN_DIR, its output in RUN_DIR.log, unless RUN_DIR holds a
    finished run; a stopped one is resumed from its checkpoint."""
    if finished(run_dir):
        return
    started = glob.glob(os.path.join(run_dir, "ckpt_*.pt"))
    command = [sys.executable, os.path.join(ROOT, "train.py"), *train_args, "--out", run_dir,
               "--resume" if started else "--overwrite"]
    print(" ".join(command), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(run_dir)), exist_ok=True)
    with open(f"{run_dir}.log", "w") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
    if code:
        raise SystemExit(f"train.py stopped with status {code} for {run_dir}: see {run_dir}.log")


def train_all(runs: dict, jobs=1):
    """train() every {run_dir: train.py args}, `jobs` at a time (on 2 cores with jobs=2, give each
    run one thread: OMP_NUM_THREADS=1)."""
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(lambda item: train(*item), runs.items()))


def validation_tokens(run_config):
    """The validation tokens a run was evaluated on, chosen as train.py's load_data chooses them."""
    cache = run_config.get("data_cache", "data_cache")
    if run_config.get("val_data"):
        return data.load_tokens(data.prepare(cache, sources=run_config["val_data"], val_fraction=0.0), "train")
    sources = None if run_config["data"] == "embedded" else run_config["data"]
    return data.load_tokens(data.prepare(cache, sources=sources, val_fraction=0.05), "val")


@torch.no_grad()
def fixed_val_loss(run_dir, max_batches=None) -> dict:
    """The final model's mean loss over fixed validation batches: one pass over the validation
    windows in the order of seed VAL_SEED (at most max_batches batches), the same batches for every
    run of the same data, so runs that differ in --seed are compared on the same text (train.py's
    own evaluation draws its batches with --seed). Written to RUN_DIR/fixed_val.json."""
    with open(os.path.join(run_dir, "config.json")) as f:
        run_config = json.load(f)
    model = KimiK2.from_pretrained(os.path.join(run_dir, "hf")).eval()
    sampler = data.BatchSampler(validation_tokens(run_config), run_config["batch_size"], run_config["seq_len"],
                                seed=VAL_SEED)
    batches = min(sampler.windows // sampler.batch_size, max_batches or math.inf)
    loss = sum(model(*sampler.next())[1].item() for _ in range(batches)) / batches
    result = {"val_loss": loss, "batches": batches, "val_seed": VAL_SEED,
              "tokens": batches * sampler.batch_size * sampler.seq_len}
    data.write_atomically(os.path.join(run_dir, "fixed_val.json"), lambda f: json.dump(result, f))
    return result


# -----------------------------------------------------------------------------------------------
# Summarizing finished runs

# Settings that tell runs apart without making them different experiments.
NOT_A_SETTING = {"seed", "out", "resume", "overwrite", "set", "log_interval", "ckpt_interval", "keep_ckpts",
                 "sample_tokens", "peak_flops", "data_cache"}


def settings(run_config: dict) -> dict:
    """A run's config.json flattened to {name: value}, model fields as model.NAME. Options left unset
    (None) are dropped, so runs of train.py versions that differ only in options nobody set (one
    without --val-seed, one with --plot) compare equal; a setting missing from one run counts as unset."""
    flat = {k: json.dumps(v) for k, v in run_config.items()
            if k != "model" and k not in NOT_A_SETTING and v is not None}
    return {**flat, **{f"model.{k}": json.dumps(v) for k, v in run_config["model"].items()}}


def flops_to_reach(curve, target):
    """The first training FLOPs at which a [(flops, val loss)] curve is at or below target, linear
    between evaluations; None if it never gets there."""
    for (f0, l0), (f1, l1) in zip(curve, curve[1:]):
        if l1 <= target:
            return f0 + (f1 - f0) * (l0 - target) / (l0 - l1) if l0 > target else f0
    return None


def read_run(folder: str):
    """(config.json, [(step, logged val loss)], final loss on fixed batches or None, last logged router
    load imbalance (max/mean load of the worst layer) or None) of a finished run."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            run_config = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"summarize: {folder} is not a train.py run folder ({e})")
    records = read_metrics(os.path.join(folder, "metrics.jsonl"), math.inf)
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    imbalance = [r["load_imbalance"] for r in records if "load_imbalance" in r]
    if not val or val[-1][0] != run_config["max_steps"]:
        raise SystemExit(f"summarize: {folder} has not finished (no validation loss at step {run_config['max_steps']})")
    final = None
    if os.path.exists(fixed := os.path.join(folder, "fixed_val.json")):
        with open(fixed) as f:
            final = json.load(f)["val_loss"]
    return run_config, val, final, imbalance[-1] if imbalance else None


def summarize(run_dirs, plot_path=None):
    """Group, print the table, plot; returns the rows (label, seeds, total, activated, flops_per_token,
    finals, logged (each seed's last logged val loss), imbalance (each seed's last logged load
    imbalance), curve [(FLOPs, mean logged val loss)], final, to_target)."""
    runs = [(folder, *read_run(folder)) for folder in run_dirs]
    runs = [(folder, run_config, settings(run_config), val, (fixed, imbalance))
            for folder, run_config, val, fixed, imbalance in runs]
    differ = sorted({k for r in runs for k in r[2]} - {k for k in runs[0][2] if len({r[2].get(k) for r in runs}) == 1})
    groups = {}
    for folder, run_config, flat, val, extra in runs:
        label = ", ".join(f"{k.removeprefix('model.')}={json.loads(flat.get(k, 'null'))}" for k in differ) or "all runs"
        groups.setdefault(label, []).append((run_config, val, extra))
    rows = []
    for label, members in groups.items():
        run_config = members[0][0]
        config = Config(**run_config["model"])
        counts = count_params(config)
        per_token = flops_per_token(config, (run_config["seq_len"] + 1) / 2, training=True)  # mean over a sequence
        flops_per_step = per_token * run_config["tokens_per_step"]
        steps = [s for s, _ in members[0][1]]
        if any([s for s, _ in val] != steps for _, val, _ in members):
            raise SystemExit(f"summarize: the runs of {label} were evaluated at different steps")
        if len({fixed is None for *_, (fixed, _) in members}) > 1:
            raise SystemExit(f"summarize: some runs of {label} have fixed_val.json and some do not")
        mean = [sum(val[i][1] for _, val, _ in members) / len(members) for i in range(len(steps))]
        finals = [val[-1][1] if fixed is None else fixed for _, val, (fixed, _) in members]
        rows.append(dict(label=label, seeds=[c["seed"] for c, *_ in members], total=counts["total"],
                         activated=counts["activated"], flops_per_token=per_token, finals=finals,
                         logged=[val[-1][1] for _, val, _ in members],
                         imbalance=[imbalance for *_, (_, imbalance) in members], final=sum(finals) / len(finals),
                         curve=[(s * flops_per_step, l) for s, l in zip(steps, mean)]))
    target = max(row["curve"][-1][1] for row in rows)
    for row in rows:
        row["to_target"] = flops_to_reach(row["curve"], target)
    fewest = min(row["to_target"] for row in rows)
    first = rows[0]["final"]
    print(f"| runs | seeds | total params | activated params | final val loss (mean) | per seed | vs first | "
          f"training FLOPs to logged val loss {target:.4f} | ratio | training FLOPs/token | "
          f"logged final val loss, per seed | final load imbalance, per seed |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['label']} | {', '.join(map(str, row['seeds']))} | {row['total']:,} | {row['activated']:,} | "
              f"{row['final']:.4f} | {', '.join(f'{v:.4f}' for v in row['finals'])} | "
              f"{100 * (row['final'] / first - 1):+.2f}% | {row['to_target']:.3g} | {row['to_target'] / fewest:.2f} | "
              f"{row['flops_per_token'] / 1e6:.2f}M | {', '.join(f'{v:.4f}' for v in row['logged'])} | "
              f"{', '.join('-' if v is None else f'{v:.1f}' for v in row['imbalance'])} |")
    if plot_path:
        plot(rows, target, plot_path)
    return rows



def sweep(runs: dict, jobs=1, plot_path=None):
    """The whole of a seed sweep: train every run (train_all), score each final model on the fixed
    validation batches (fixed_val_loss), then print the summary table (and plot)."""
    train_all(runs, jobs)
    for folder in runs:
        fixed_val_loss(folder)
    return summarize(list(runs), plot_path)


def plot(rows, target, path):
    if (plt := pyplot(path)) is None:
        return
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for row in rows:
        ax[0].plot(*zip(*row["curve"]), "o-", ms=3, label=row["label"])
    ax[0].axhline(target, color="k", linestyle="--", linewidth=0.8, label=f"target {target:.3f}")
    ax[0].set(title="logged validation loss (mean over seeds)", xlabel="training FLOPs", ylabel="nats/token",
              xscale="log")
    ax[0].set_ylim(top=min(ax[0].get_ylim()[1], 2 * target))
    ax[0].legend(fontsize=7)
    for i, row in enumerate(rows):
        ax[1].plot([i] * len(row["finals"]), row["finals"], "o", color=f"C{i}")
    ax[1].plot(range(len(rows)), [row["final"] for row in rows], "k-", linewidth=0.8)
    ax[1].set_xticks(range(len(rows)), [row["label"] for row in rows], rotation=20, fontsize=7, ha="right")
    ax[1].set(title="final validation loss (each seed; line: mean)", ylabel="nats/token")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="finished train.py run folders")
    p.add_argument("--plot", metavar="PNG", help="where to write the plot (needs matplotlib)")
    args = p.parse_args(argv)
    summarize(args.runs, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
