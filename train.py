"""
Train Kimi-K2 (small) from scratch: one loop a reader can follow in one pass, with what a real run needs.

Follows the Kimi K2 technical report (arXiv 2507.20534): MuonClip, i.e. Muon with QK-Clip after every
update (§2.1), and the WSD learning-rate schedule (warm-up, constant, cosine decay to 0.1x; §2.4); and
DeepSeek-V3's auxiliary-loss-free router balancing (a bias update after every optimizer step, with the
expert loads of all micro-batches and all ranks).

Features: gradient accumulation; DDP, or FSDP2 with --fsdp, under torchrun (gloo on CPU, NCCL on CUDA)
with a global batch that does not depend on the number of processes; float32, bfloat16 autocast, or
float16 with a grad scaler (CUDA); torch.compile; atomic checkpoints and an exact --resume; non-finite
steps skipped; a run folder with config.json, metrics.jsonl, checkpoints, plot.png and a Hugging Face
layout export (hf/).

    python train.py                                    # tiny preset, embedded corpus, ~5 min on 2 CPU cores
    python train.py --out runs/tiny --resume           # continue a stopped run exactly
    torchrun --nproc_per_node=2 train.py --fsdp        # FSDP2 on 2 processes, same global batch
    python train.py --qk-clip-tau 0                    # plain Muon, no QK-Clip
    python train.py --help                             # every option
"""
import argparse
import dataclasses
import glob
import json
import math
import os
import random
import time
import typing
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.nn.parallel import DistributedDataParallel as DDP

import data
from kimik2 import PRESETS, Config, KimiK2, count_params, flops_per_token
from muonclip import MuonClip

# Options a checkpoint's run must share with the resuming run: they change what "step N" means.
RESUME_MUST_MATCH = ("model", "optimizer", "batch_size", "seq_len", "data")


def fail(message):
    """Stop with a one-line message naming the option or file at fault (exit status 1)."""
    raise SystemExit(f"train.py: error: {message}")


# -----------------------------------------------------------------------------
# config: every option, validated where argparse can name it

def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_float(text):
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _non_negative_float(text):
    value = float(text)
    if not value >= 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _fraction(text):
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _config_override(text):
    """'FIELD=VALUE' -> (FIELD, VALUE) with VALUE typed by the Config field: int, float, true/false,
    none where the field allows None, JSON for a dict."""
    name, _, raw = text.partition("=")
    kinds = {f.name: typing.get_args(f.type) or (f.type,) for f in dataclasses.fields(Config)}
    if name not in kinds:
        raise argparse.ArgumentTypeError(f"{text!r}: {name!r} is not a Config field (see python kimik2.py --preset tiny --json)")
    if raw.lower() == "none" and type(None) in kinds[name]:
        return name, None
    kind = next(k for k in kinds[name] if k is not type(None))
    try:
        if kind is bool:
            value = {"true": True, "false": False}[raw.lower()]
        elif kind is dict:
            value = json.loads(raw)
            if not isinstance(value, dict):
                raise ValueError
        else:
            value = kind(raw)
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r}: Config field {name} takes {kind.__name__}, got {raw!r}") from None
    return name, value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--preset", default="tiny", choices=list(PRESETS), help="model preset")
    g.add_argument("--config", metavar="FILE", help="model config.json (Hugging Face field names); replaces --preset")
    g.add_argument("--aux-loss-alpha", type=_non_negative_float,
                   help="sequence-wise balance loss coefficient (DeepSeek-V3: 1e-4); default: the config's")
    g.add_argument("--router-bias-speed", type=_non_negative_float, default=1e-3,
                   help="gamma of the loss-free balancing update b_i += gamma*sign(mean_load - load_i) (DeepSeek-V3: 0.001)")
    g.add_argument("--set", type=_config_override, action="append", default=[], metavar="FIELD=VALUE",
                   help="override one field of the preset/--config (repeatable), e.g. --set n_routed_experts=64")
    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", metavar="[DOMAIN=]PATH",
                   help="files or folders of .txt/.md/.py/.jsonl, or builtin[:code,knowledge,math]; default: the embedded corpus")
    g.add_argument("--val-data", nargs="+", metavar="[DOMAIN=]PATH",
                   help="validation sources held out from training: validation uses only these, and all of --data trains")
    g.add_argument("--data-cache", default="data_cache", metavar="DIR", help="where tokenised corpora are cached")
    g.add_argument("--batch-size", type=_positive_int, default=16,
                   help="global batch in sequences per optimizer step, whatever the number of processes")
    g.add_argument("--seq-len", type=_positive_int, default=128, help="tokens per sequence")
    g.add_argument("--grad-accum", type=_positive_int, default=1,
                   help="micro-steps per optimizer step; each process runs batch/(grad_accum*processes) sequences per micro-step")
    g = p.add_argument_group("optimization")
    g.add_argument("--max-steps", type=_positive_int, default=600, help="optimizer steps")
    g.add_argument("--max-tokens", type=_positive_int, help="token budget; replaces --max-steps")
    g.add_argument("--optimizer", default="muonclip", choices=["muonclip", "adamw"],
                   help="muonclip: Muon on hidden matrices, AdamW on the rest; adamw: AdamW on everything")
    g.add_argument("--lr", type=_positive_float, default=1e-2, help="peak learning rate (K2: 2e-4 at 1T scale)")
    g.add_argument("--schedule", default="wsd", choices=["wsd", "cosine"],
                   help="wsd: warm-up, constant, cosine decay over the last --decay-frac of steps (K2); cosine: warm-up then cosine")
    g.add_argument("--warmup-steps", type=_non_negative_int, default=30, help="linear warm-up steps (K2: 500)")
    g.add_argument("--decay-frac", type=_fraction, default=0.3, help="wsd: fraction of steps spent decaying")
    g.add_argument("--min-lr-ratio", type=_fraction, default=0.1, help="final lr / peak lr (K2: 2e-5 / 2e-4)")
    g.add_argument("--weight-decay", type=_non_negative_float, default=0.1, help="decoupled weight decay (K2: 0.1)")
    g.add_argument("--qk-clip-tau", type=_non_negative_float, default=100.0,
                   help="QK-Clip threshold on each head's max attention logit (K2: 100); 0 disables the clip")
    g.add_argument("--max-bad-steps", type=_positive_int, default=5,
                   help="stop after this many non-finite steps in a row (each one is skipped)")
    g = p.add_argument_group("system")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when present")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="bfloat16: autocast (CPU, CUDA); float16: autocast + grad scaler (CUDA only); auto: bfloat16 on CUDA, float32 on CPU")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--fsdp", action="store_true", help="under torchrun, shard with FSDP2 (fully_shard) instead of DDP")
    g.add_argument("--seed", type=int, default=1337, help="seed for the initial weights and the batches")
    g.add_argument("--peak-flops", type=_positive_float,
                   help="peak FLOP/s of one device for MFU; default: measured with a dense matmul in the training dtype")
    g = p.add_argument_group("run folder")
    g.add_argument("--out", default=None, metavar="DIR", help="run folder; default: runs/<preset>")
    g.add_argument("--resume", nargs="?", const="latest", metavar="CKPT",
                   help="continue from CKPT, or from the newest checkpoint in --out")
    g.add_argument("--log-interval", type=_positive_int, default=10, help="steps between progress lines and metrics records")
    g.add_argument("--eval-interval", type=_positive_int, default=100, help="steps between validation losses")
    g.add_argument("--eval-iters", type=_positive_int, default=8, help="batches per validation loss")
    g.add_argument("--ckpt-interval", type=_positive_int, default=100, help="steps between checkpoints")
    g.add_argument("--keep-ckpts", type=_positive_int, default=2, help="checkpoints kept in the run folder")
    g.add_argument("--sample-tokens", type=_non_negative_int, default=300, help="length of the final sample")
    g.add_argument("--summarize", nargs="+", metavar="RUN_DIR",
                   help="train nothing: tabulate and plot finished runs (final val loss, params, FLOPs to a target loss)")
    g.add_argument("--plot", metavar="PNG", help="with --summarize: where to write the plot")
    args = p.parse_args(argv)
    if args.plot and not args.summarize:
        p.error("argument --plot: only with --summarize")
    if args.out is None:
        args.out = os.path.join("runs", args.preset if args.config is None else "custom")
    return args


# -----------------------------------------------------------------------------
# lr schedule

def lr_at(step, args):
    """Learning rate for optimizer step `step` (0-based)."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    min_lr = args.lr * args.min_lr_ratio
    decay_start = args.warmup_steps if args.schedule == "cosine" else \
        max(args.warmup_steps, round(args.max_steps * (1 - args.decay_frac)))
    if step < decay_start:
        return args.lr
    progress = (step - decay_start) / max(1, args.max_steps - decay_start)
    return min_lr + 0.5 * (args.lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


# -----------------------------------------------------------------------------
# checkpoints: plain tensors and primitives only, so torch.load(weights_only=True) can read them

def rng_state():
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": [np_kind, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    np_kind, np_keys, *rest = state["numpy"]
    np.random.set_state((np_kind, np_keys.numpy().astype(np.uint32), *rest))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def save_checkpoint(ckpt, out_dir, keep):
    """Write ckpt_<step>.pt atomically (temporary file, fsync, rename) and keep the newest `keep`.
    A kill at any moment leaves every ckpt_*.pt complete: the rename is the commit."""
    path = os.path.join(out_dir, f"ckpt_{ckpt['step']:07d}.pt")
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for old in sorted(glob.glob(os.path.join(out_dir, "ckpt_*.pt")))[:-keep]:
        os.remove(old)
    return path


def load_checkpoint(path):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which one
        fail(f"--resume: cannot read checkpoint {path}: {e}")
    missing = {"step", "model", "optimizer", "optimizer_per_rank", "scaler", "sampler", "rng", "config", "window", "bad_steps"} - set(ckpt if isinstance(ckpt, dict) else ())
    if missing:
        fail(f"--resume: {path} is not a train.py checkpoint (missing {', '.join(sorted(missing))})")
    return ckpt


def check_resume_config(saved, current, path):
    for key in RESUME_MUST_MATCH:
        if saved.get(key) != current.get(key):
            option = "--preset/--config" if key == "model" else "--" + key.replace("_", "-")
            fail(f"--resume: {path} was trained with a different {option} "
                 f"({saved.get(key)!r}, this run: {current.get(key)!r})")


# -----------------------------------------------------------------------------
# reporting

def measure_peak_flops(device, dtype, seconds=0.3):
    """FLOP/s of a dense square matmul on this device in the training dtype: the MFU denominator
    when --peak-flops is not given (an achievable peak, so MFU reads higher than against a datasheet)."""
    n = 2048 if device.type == "cuda" else 512
    a = torch.ones(n, n, device=device, dtype=dtype)  # ones: no draw from the RNG the run depends on
    a @ a
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ a
        count += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
    return 2 * n ** 3 * count / (time.perf_counter() - t0)


def _pyplot(what):
    """matplotlib.pyplot on the file-only Agg backend, or None after a one-line hint: matplotlib
    is optional."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"no {what}: pip install matplotlib to get it")
        return None
    return plt


def plot_metrics(records, tau, path):
    if (plt := _pyplot("plot.png")) is None:
        return
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    fig, ax = plt.subplots(2, 2, figsize=(11, 7))
    ax[0, 0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    ax[0, 0].plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val")
    ax[0, 0].set(title="loss (nats/token)", xlabel="step")
    ax[0, 0].legend()
    per_layer = np.array([r["max_logit_per_layer"] for r in train])
    for layer in range(per_layer.shape[1] if per_layer.ndim == 2 else 0):
        ax[0, 1].plot([r["step"] for r in train], per_layer[:, layer], label=f"layer {layer}")
    if tau:
        ax[0, 1].axhline(tau, color="k", linestyle="--", label=f"tau = {tau:g}")
    ax[0, 1].set(title="max attention logit per layer (forward pass, before QK-Clip)", xlabel="step")
    ax[0, 1].legend(fontsize=7)
    ax[1, 0].plot([r["step"] for r in train], [r["heads_clipped"] for r in train])
    ax[1, 0].set(title="heads clipped (per log interval)", xlabel="step")
    ax[1, 1].plot([r["step"] for r in train], [r["load_imbalance"] for r in train])
    ax[1, 1].set(title="expert load imbalance (max/mean, worst layer)", xlabel="step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_metrics(path, upto_step):
    """The records of steps <= upto_step; a line cut short by a kill is dropped."""
    records = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record["step"] <= upto_step:
                    records.append(record)
    return records


# Settings that tell runs apart without making them different experiments.
_NOT_A_SETTING = {"seed", "out", "resume", "set", "summarize", "plot", "log_interval", "ckpt_interval", "keep_ckpts",
                  "sample_tokens", "peak_flops"}


def _settings(run_config):
    """A run's config.json flattened to {name: value}, model fields as model.NAME."""
    flat = {k: json.dumps(v) for k, v in run_config.items() if k != "model" and k not in _NOT_A_SETTING}
    return {**flat, **{f"model.{k}": json.dumps(v) for k, v in run_config["model"].items()}}


def _flops_to_reach(curve, target):
    """The first training FLOPs at which a [(flops, val loss)] curve is at or below target, linear
    between evaluations; None if it never gets there."""
    for (f0, l0), (f1, l1) in zip(curve, curve[1:]):
        if l1 <= target:
            return f0 + (f1 - f0) * (l0 - target) / (l0 - l1) if l0 > target else f0
    return None


def summarize(run_dirs, plot_path=None):
    """Compare finished runs (--summarize): runs that differ only in --seed form one group; a group
    is named by the settings that differ between groups. Prints a Markdown table of total and
    activated parameters, final validation loss (mean and per seed), its change against the first
    group, and the training FLOPs each group's mean validation curve needs to reach the target loss
    (the highest final mean loss, so every group reaches it) with their ratio to the fewest.
    Writes the validation curves and final losses to plot_path (needs matplotlib)."""
    runs = []
    for folder in run_dirs:
        try:
            with open(os.path.join(folder, "config.json")) as f:
                run_config = json.load(f)
        except (OSError, ValueError) as e:
            fail(f"--summarize: {folder} is not a train.py run folder ({e})")
        val = [(r["step"], r["val_loss"]) for r in read_metrics(os.path.join(folder, "metrics.jsonl"), math.inf)
               if "val_loss" in r]
        if not val or val[-1][0] != run_config["max_steps"]:
            fail(f"--summarize: {folder} has not finished (no validation loss at step {run_config['max_steps']})")
        runs.append((folder, run_config, _settings(run_config), val))
    differ = sorted(k for k in runs[0][2] if len({r[2].get(k) for r in runs}) > 1)
    groups = {}
    for folder, run_config, settings, val in runs:
        label = ", ".join(f"{k.removeprefix('model.')}={json.loads(settings[k])}" for k in differ) or "all runs"
        groups.setdefault(label, []).append((run_config, val))
    rows = []
    for label, members in groups.items():
        run_config = members[0][0]
        config = Config(**run_config["model"])
        counts = count_params(config)
        flops_per_step = flops_per_token(config, (run_config["seq_len"] + 1) / 2, training=True) * run_config["tokens_per_step"]
        steps = [s for s, _ in members[0][1]]
        if any([s for s, _ in val] != steps for _, val in members):
            fail(f"--summarize: the runs of {label} were evaluated at different steps")
        mean = [sum(val[i][1] for _, val in members) / len(members) for i in range(len(steps))]
        rows.append(dict(label=label, seeds=[c["seed"] for c, _ in members], total=counts["total"],
                         activated=counts["activated"], finals=[val[-1][1] for _, val in members],
                         curve=[(s * flops_per_step, l) for s, l in zip(steps, mean)]))
    target = max(row["curve"][-1][1] for row in rows)
    for row in rows:
        row["to_target"] = _flops_to_reach(row["curve"], target)
    fewest = min(row["to_target"] for row in rows)
    first = rows[0]["curve"][-1][1]
    print(f"| runs | seeds | total params | activated params | final val loss (mean) | per seed | vs first | "
          f"training FLOPs to val loss {target:.4f} | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        final = row["curve"][-1][1]
        print(f"| {row['label']} | {', '.join(map(str, row['seeds']))} | {row['total']:,} | {row['activated']:,} | "
              f"{final:.4f} | {', '.join(f'{v:.4f}' for v in row['finals'])} | {100 * (final / first - 1):+.2f}% | "
              f"{row['to_target']:.3g} | {row['to_target'] / fewest:.2f} |")
    if plot_path:
        _plot_summary(rows, target, plot_path)
    return rows


def _plot_summary(rows, target, path):
    if (plt := _pyplot(path)) is None:
        return
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for row in rows:
        ax[0].plot(*zip(*row["curve"]), "o-", ms=3, label=row["label"])
    ax[0].axhline(target, color="k", linestyle="--", linewidth=0.8, label=f"target {target:.3f}")
    ax[0].set(title="validation loss (mean over seeds)", xlabel="training FLOPs", ylabel="nats/token", xscale="log")
    ax[0].set_ylim(top=min(ax[0].get_ylim()[1], 2 * target))
    ax[0].legend(fontsize=7)
    for i, row in enumerate(rows):
        ax[1].plot([i] * len(row["finals"]), row["finals"], "o", color=f"C{i}")
    ax[1].plot(range(len(rows)), [row["curve"][-1][1] for row in rows], "k-", linewidth=0.8)
    ax[1].set_xticks(range(len(rows)), [row["label"] for row in rows], rotation=20, fontsize=7, ha="right")
    ax[1].set(title="final validation loss (each seed; line: mean)", ylabel="nats/token")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    if args.summarize:
        return summarize(args.summarize, args.plot)

    # -------------------------------------------------------------------------
    # init: processes, device, dtype, seed
    distributed = "RANK" in os.environ  # set by torchrun
    if args.fsdp and not distributed:
        fail("--fsdp needs torchrun (e.g. torchrun --nproc_per_node=2 train.py --fsdp)")
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: CUDA is not available")
    device_type = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    if distributed:
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device(device_type, int(os.environ["LOCAL_RANK"])) if device_type == "cuda" else torch.device("cpu")
    else:
        rank, world, device = 0, 1, torch.device(device_type)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    master = rank == 0  # only rank 0 prints and writes
    log = print if master else (lambda *a, **k: None)
    dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    if dtype_name == "float16" and device.type != "cuda":
        fail("--dtype float16 needs CUDA (its grad scaler is CUDA-only); use bfloat16 or float32 on CPU")
    dtype = getattr(torch, dtype_name)
    autocast = nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    if args.batch_size % (args.grad_accum * world):
        fail(f"--batch-size {args.batch_size} must be divisible by --grad-accum {args.grad_accum} x {world} processes")
    micro_batch = args.batch_size // (args.grad_accum * world)  # sequences per process per micro-step
    tokens_per_step = args.batch_size * args.seq_len
    max_steps = math.ceil(args.max_tokens / tokens_per_step) if args.max_tokens else args.max_steps
    args.max_steps = max_steps  # the schedule reads it
    torch.manual_seed(args.seed)  # same seed on every rank: identical initial weights before sharding

    # -------------------------------------------------------------------------
    # data: tokenised once by rank 0 (cached under a hash of the inputs), memory-mapped by everyone
    os.makedirs(args.out, exist_ok=True)
    val_fraction = 0.0 if args.val_data else 0.05  # with --val-data, every --data document trains
    try:
        if master:
            prepared = data.prepare(args.data_cache, sources=args.data, val_fraction=val_fraction)
        if distributed:
            dist.barrier()
        if not master:
            prepared = data.prepare(args.data_cache, sources=args.data, val_fraction=val_fraction)
    except (OSError, ValueError) as e:
        fail(f"--data: {e}")
    try:  # all of the --val-data documents: prepared with val_fraction 0, they fill its "train" file
        held_out = data.prepare(args.data_cache, sources=args.val_data, val_fraction=0.0) if args.val_data else None
    except (OSError, ValueError) as e:
        fail(f"--val-data: {e}")
    tokenizer = data.ByteTokenizer()
    train_tokens = data.load_tokens(prepared, "train")
    val_tokens = data.load_tokens(held_out, "train") if args.val_data else data.load_tokens(prepared, "val")
    for split, tokens in (("train", train_tokens), ("val", val_tokens)):
        if len(tokens) <= args.seq_len:
            option = "--val-data" if split == "val" and args.val_data else "--data"
            fail(f"{option}: the {split} split has {len(tokens)} tokens, fewer than --seq-len {args.seq_len} + 1")
    # batch_size is global: each rank draws its own rows of the same global batch, so step N's batch
    # does not depend on the number of processes or micro-steps.
    train_sampler = data.BatchSampler(train_tokens, args.batch_size, args.seq_len, seed=args.seed, rank=rank, world_size=world)
    entropy = data.unigram_entropy(train_tokens)

    # -------------------------------------------------------------------------
    # model
    try:
        config = Config.from_json(args.config) if args.config else Config.from_preset(args.preset)
        if args.aux_loss_alpha is not None:
            config = Config(**{**config.to_dict(), "aux_loss_alpha": args.aux_loss_alpha})
    except (OSError, ValueError, TypeError) as e:
        fail(f"--config {args.config}: {e}" if args.config else f"--aux-loss-alpha: {e}")
    try:
        config = Config(**{**config.to_dict(), **dict(args.set)})
    except (ValueError, TypeError) as e:
        fail(f"--set {' '.join(f'{k}={v}' for k, v in args.set)}: {e}")
    if config.vocab_size < tokenizer.vocab_size:
        fail(f"model vocab_size {config.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}")
    if config.max_position_embeddings < args.seq_len:
        fail(f"--seq-len {args.seq_len} exceeds the model's max_position_embeddings {config.max_position_embeddings}")
    raw_model = KimiK2(config).to(device)
    attention = raw_model.attention_modules()
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard
        for layer in raw_model.model.layers:
            fully_shard(layer)
        fully_shard(raw_model)  # in place: raw_model's weights are now DTensors sharded on dim 0
    model = torch.compile(raw_model) if args.compile else raw_model
    if distributed and not args.fsdp:
        # broadcast_buffers=False: rank 0's buffers would overwrite every rank's own expert_load and
        # max_logits counts, which the trainer and the optimizer reduce themselves.
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)

    # -------------------------------------------------------------------------
    # optimizer
    tau = args.qk_clip_tau or None
    if args.optimizer == "muonclip":
        # Newton-Schulz in bfloat16 on CUDA as reference Muon does; float32 on CPU, where it is 2-3x
        # faster at these sizes and keeps runs on 1 and N processes equal to float32 rounding.
        ns_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        optimizer = MuonClip.for_model(raw_model, lr=args.lr, weight_decay=args.weight_decay, qk_clip_tau=tau,
                                       ns_dtype=ns_dtype)
    else:  # the same class with every parameter on AdamW: the comparison changes the update rule only
        optimizer = MuonClip([{"params": list(raw_model.parameters()), "use_muon": False}], lr=args.lr,
                             weight_decay=args.weight_decay, qk_clip_tau=tau, attention_modules=attention)

    run_config = {**vars(args), "model": config.to_dict(), "data": args.data or "embedded",
                  "processes": world, "micro_batch": micro_batch, "tokens_per_step": tokens_per_step,
                  "dtype": dtype_name, "device": str(device)}
    state_options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    start_step, window, bad_steps = 0, None, 0
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    if args.resume:
        ckpts = sorted(glob.glob(os.path.join(args.out, "ckpt_*.pt")))
        path = args.resume if args.resume != "latest" else (ckpts[-1] if ckpts else None)
        if path is None:
            fail(f"--resume: no checkpoint in --out {args.out}")
        if not os.path.isfile(path):
            fail(f"--resume: no such checkpoint: {path}")
        ckpt = load_checkpoint(path)
        check_resume_config(ckpt["config"], run_config, path)
        set_model_state_dict(raw_model, ckpt["model"], options=StateDictOptions(full_state_dict=True))
        if ckpt["optimizer_per_rank"] and not (args.fsdp and len(ckpt["optimizer"]) == world):
            fail(f"--resume: {path} holds FSDP optimizer shards of {len(ckpt['optimizer'])} processes; "
                 f"resume it with --fsdp on as many processes")
        optimizer.load_state_dict(ckpt["optimizer"][rank] if ckpt["optimizer_per_rank"] else ckpt["optimizer"])
        if ckpt["scaler"]:
            scaler.load_state_dict(ckpt["scaler"])
        try:
            train_sampler.load_state_dict(ckpt["sampler"])
        except ValueError as e:
            fail(f"--resume: {path}: {e}")
        set_rng_state(ckpt["rng"])
        start_step, window, bad_steps = ckpt["step"], ckpt["window"], ckpt["bad_steps"]
        log(f"resumed from {path} at step {start_step}")
        del ckpt
    records = read_metrics(metrics_path, start_step) if args.resume else []  # a resumed run drops what it will redo
    if master:
        for stale in glob.glob(os.path.join(args.out, "ckpt_*.pt.tmp")) + \
                ([] if args.resume else glob.glob(os.path.join(args.out, "ckpt_*.pt"))):
            os.remove(stale)  # leftovers of a killed save, or of an earlier run in this folder
        with open(metrics_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        with open(os.path.join(args.out, "config.json"), "w") as f:
            json.dump(run_config, f, indent=2)
    metrics_file = open(metrics_path, "a") if master else None

    def write_record(record):
        records.append(record)
        if master:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

    peak_flops = args.peak_flops or measure_peak_flops(device, dtype)
    flops_per_tok = raw_model.estimate_flops_per_token(args.seq_len)  # training: forward + backward
    n_params = sum(p.numel() for p in raw_model.parameters())  # DTensor numel is the global size
    log(f"{config.num_hidden_layers} layers, {n_params / 1e6:.2f}M parameters; {world} process(es) on {device}, "
        f"{dtype_name}; {tokens_per_step} tokens/step ({args.batch_size} x {args.seq_len}), {max_steps} steps; "
        f"MFU against {peak_flops / 1e9:.1f} GFLOP/s per device "
        f"({'--peak-flops' if args.peak_flops else 'measured dense matmul'})")

    # -------------------------------------------------------------------------
    # eval helper
    @torch.no_grad()
    def estimate_val_loss():
        # The same val batches at every evaluation (fresh sampler, fixed seed), whatever the number of
        # processes or micro-steps: evaluations compare like with like, and a resumed run sees exactly
        # what the uninterrupted one saw. Micro-batches keep eval memory at the training step's.
        sampler = data.BatchSampler(val_tokens, args.batch_size, args.seq_len, seed=args.seed, rank=rank, world_size=world)
        model.eval()
        total = torch.zeros((), device=device)
        for _ in range(args.eval_iters):
            x, y = (t.view(args.grad_accum, micro_batch, -1).to(device) for t in sampler.next())  # (grad_accum, micro_batch, T)
            for micro in range(args.grad_accum):
                with autocast:
                    _, loss = model(x[micro], y[micro])
                total += loss.float()
        model.train()
        if distributed:
            dist.all_reduce(total, op=dist.ReduceOp.AVG)
        return (total / (args.eval_iters * args.grad_accum)).item()

    def max_logit_stats():
        """(layers, heads) max attention logit of this step over all micro-batches and ranks, and
        the number of heads clipped. MuonClip reduces and resets them in step(); with QK-Clip off
        (tau 0) the trainer does it, so the statistic is logged either way."""
        if tau is not None:
            stats = optimizer.clip_stats
            return stats["max_logits"], stats["heads_clipped"]
        logits = torch.stack([m.max_logits for m in attention])
        if distributed:
            dist.all_reduce(logits, op=dist.ReduceOp.MAX)
        for m in attention:
            m.reset_max_logits_()
        return logits, torch.zeros((), dtype=torch.long, device=logits.device)

    # -------------------------------------------------------------------------
    # training loop
    if window is None:  # statistics accumulated between two metrics records
        window = {"max_logits": torch.full((len(attention),), -math.inf), "heads_clipped": torch.zeros((), dtype=torch.long)}
    window = {k: v.to(device) for k, v in window.items()}
    gates = list(raw_model.moe_gates())
    val_loss = next((r["val_loss"] for r in reversed(records) if "val_loss" in r), None)
    t_start = t_log = time.perf_counter()
    steps_timed = 0
    for step in range(start_step, max_steps + 1):  # step = optimizer updates done so far
        # Evaluate, then checkpoint, the model after `step` updates; a resumed run did both before it stopped.
        if step > start_step or step == 0:
            if step % args.eval_interval == 0 or step == max_steps:
                val_loss = estimate_val_loss()
                write_record({"step": step, "val_loss": val_loss})
                log(f"step {step}: val loss {val_loss:.4f}")
            if step > 0 and (step % args.ckpt_interval == 0 or step == max_steps):
                # Gathering unsharded state is collective: every rank takes part, rank 0 writes.
                model_state = get_model_state_dict(raw_model, options=state_options)
                optim_state = to_cpu(optimizer.state_dict())
                if args.fsdp:  # MuonClip keeps each rank's state for its own shard: rank 0 stores them all
                    shards = [None] * world if master else None
                    dist.gather_object(optim_state, shards, dst=0)
                    optim_state = shards
                if master:
                    if not all(torch.isfinite(v).all() for v in model_state.values() if v.is_floating_point()):
                        fail(f"step {step}: the model holds non-finite weights; not checkpointing it")
                    save_checkpoint({"step": step, "model": model_state, "optimizer": optim_state,
                                     "optimizer_per_rank": args.fsdp, "scaler": scaler.state_dict(),
                                     "sampler": train_sampler.state_dict(), "rng": rng_state(),
                                     "window": to_cpu(window), "bad_steps": bad_steps, "config": run_config},
                                    args.out, args.keep_ckpts)
        if step == max_steps:
            break

        lr = lr_at(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = (t.view(args.grad_accum, micro_batch, -1).to(device) for t in train_sampler.next())  # (grad_accum, micro_batch, T)
        loss_sum = torch.zeros((), device=device)
        for micro in range(args.grad_accum):
            last = micro == args.grad_accum - 1
            # Gradients are reduced across ranks only on the last micro-step: the others just accumulate.
            sync = model.no_sync() if isinstance(model, DDP) and not last else nullcontext()
            if args.fsdp:
                raw_model.set_requires_gradient_sync(last)
            with sync, autocast:
                _, loss = model(x[micro], y[micro])
                # Divide so the accumulated gradient is that of the mean loss over the whole batch.
                loss = loss / args.grad_accum
            scaler.scale(loss).backward()
            loss_sum += loss.detach().float()
        if distributed:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
        scaler.unscale_(optimizer)  # a no-op unless float16: the norm below is of the true gradient
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in raw_model.parameters() if p.grad is not None])
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor over the shards
            grad_norm = grad_norm.full_tensor()
        # One host sync per step: every rank must agree on skipping, and this is where they learn it.
        finite = bool(torch.isfinite(loss_sum) & torch.isfinite(grad_norm))
        if finite:
            scaler.step(optimizer)  # Muon/AdamW update, then QK-Clip on heads whose max logit > tau
            logits, clipped = max_logit_stats()
            if distributed and gates:  # every layer's expert loads summed over ranks in one collective
                loads = torch.stack([gate.expert_load for gate in gates])  # (moe layers, E)
                dist.all_reduce(loads, op=dist.ReduceOp.SUM)
                for gate, load in zip(gates, loads):
                    gate.expert_load.copy_(load)
            imbalance = raw_model.update_router_bias_(args.router_bias_speed)
            window["max_logits"] = torch.maximum(window["max_logits"], logits.amax(dim=1))
            window["heads_clipped"] += clipped
            bad_steps = 0
        else:
            # Drop this step's statistics with its gradient: they were measured on a diverging model.
            for m in attention:
                m.reset_max_logits_()
            for gate in gates:
                gate.expert_load.zero_()
            bad_steps += 1
            write_record({"step": step + 1, "skipped": "non-finite loss or gradient",
                          "loss": loss_sum.item(), "grad_norm": grad_norm.item()})
            log(f"step {step + 1}: non-finite loss {loss_sum.item()} / grad norm {grad_norm.item()}, update skipped")
            if bad_steps >= args.max_bad_steps:
                fail(f"stopping: {bad_steps} non-finite steps in a row up to step {step + 1} "
                     f"(lower --lr, or use --dtype float32)")
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        steps_timed += 1

        if finite and ((step + 1) % args.log_interval == 0 or step + 1 == max_steps):
            now = time.perf_counter()
            tokens_per_s = tokens_per_step * steps_timed / (now - t_log)
            eta = (now - t_start) / (step + 1 - start_step) * (max_steps - step - 1)
            record = {"step": step + 1, "loss": loss_sum.item(), "lr": lr, "grad_norm": grad_norm.item(),
                      "max_logit": window["max_logits"].max().item(),
                      "max_logit_per_layer": window["max_logits"].tolist(),
                      "heads_clipped": window["heads_clipped"].item(),
                      "load_imbalance": imbalance.max().item() if len(gates) else 1.0,
                      "tokens": (step + 1) * tokens_per_step,
                      # timing: differs from run to run, unlike everything above
                      "tokens_per_s": tokens_per_s, "mfu": flops_per_tok * tokens_per_s / (peak_flops * world),
                      "elapsed_s": now - t_start}
            write_record(record)
            log(f"step {step + 1}/{max_steps} | loss {record['loss']:.4f} | lr {lr:.2e} | {tokens_per_s:,.0f} tok/s"
                f" | MFU {100 * record['mfu']:.1f}% | max logit {record['max_logit']:.1f} | clipped {record['heads_clipped']}"
                f" | imbalance {record['load_imbalance']:.2f} | {now - t_start:.0f}s, ETA {eta:.0f}s")
            window = {"max_logits": torch.full_like(window["max_logits"], -math.inf), "heads_clipped": torch.zeros_like(window["heads_clipped"])}
            t_log, steps_timed = now, 0

    # -------------------------------------------------------------------------
    # cleanup: export, sample, plot, baseline
    final_state = get_model_state_dict(raw_model, options=state_options)
    if master:
        export = KimiK2(config)  # a plain, unsharded copy for the export and the sample
        export.load_state_dict(final_state)
        export.save_pretrained(os.path.join(args.out, "hf"))
        if args.sample_tokens:
            prompt = torch.from_numpy(val_tokens[:16].astype(np.int64))[None]  # (1, 16)
            sample = export.eval().generate(prompt, args.sample_tokens, temperature=0.8, top_k=40)
            log("sample (prompt = the first 16 validation tokens):\n" + tokenizer.decode(sample[0].tolist()))
        plot_metrics(records, tau, os.path.join(args.out, "plot.png"))
        metrics_file.close()
        verdict = "below" if val_loss < entropy else "NOT below"
        log(f"final val loss {val_loss:.4f} nats/token vs unigram entropy {entropy:.4f} nats/token "
            f"({verdict} the best context-free model); run folder {args.out}")
    if distributed:
        # Drain gloo's worker threads before the process group goes: destroying it (DDP's reducer
        # holds it too) while a worker still needs the GIL to free a finished collective's tensors
        # deadlocks at exit (PyTorch issue 56297; seen here about once in a few dozen runs).
        dist.barrier()
        del model
        dist.destroy_process_group()
    return val_loss


if __name__ == "__main__":
    main()
