"""
Train Kimi-K2 (small) from scratch: one loop a reader can follow in one pass, with what a real run needs.

Follows the Kimi K2 technical report (arXiv 2507.20534): MuonClip, i.e. Muon with QK-Clip after every
update (§2.1), and the WSD learning-rate schedule (warm-up, constant, cosine decay to 0.1x; §2.4); and
DeepSeek-V3's auxiliary-loss-free router balancing (a bias update after every optimizer step, with the
expert loads of all micro-batches and all ranks).

Features: gradient accumulation; DDP, or FSDP2 with --fsdp, under torchrun (gloo on CPU, NCCL on CUDA)
with a global batch that does not depend on the number of processes; float32, bfloat16 autocast, or
float16 with a grad scaler (CUDA); torch.compile; an exact --resume; fine-tuning from a checkpoint
(--init-from); non-finite steps skipped, and a diverging run stopped; a run folder with config.json,
metrics.jsonl, checkpoints, plot.png and a Hugging Face layout export (hf/, model and byte tokenizer).

The run folder is train_run.py's, which this file imports when a run starts (copy both, with kimik2.py,
muonclip.py and data.py; `--help` needs only the card files): one writer per folder, a manifest of what
train.py wrote, verified checkpoints and metrics, pruning that never deletes the best checkpoint,
signals, and one error boundary. Its docstring states the invariants; this file holds the loop, from
config to cleanup, in nanoGPT's order.

    python train.py                                    # tiny preset, embedded corpus, minutes on 2 CPU cores
    python train.py --resume                           # continue a stopped run exactly (here runs/tiny)
    python train.py --init-from runs/tiny/ckpt_0000600.pt --out runs/ft --data my.jsonl   # fine-tune
    torchrun --nproc_per_node=2 train.py --fsdp        # FSDP2 on 2 processes, same global batch
    python train.py --qk-clip-tau 0                    # plain Muon, no QK-Clip
    python train.py --help                             # every option
"""
import os

# OpenMP threads wait for each other at the end of every parallel op. By default they spin while they
# wait, and on a machine where other processes compete for the cores a spinning thread keeps its
# descheduled peer from running: a tiny training step with 2 threads took 8.5x longer beside a busy
# process than with passive waiting, and passive waiting was also faster on the (shared) quiet machine
# (`python bench.py --threads-study`, README "Performance"). OpenMP reads the policy once, when torch
# loads, hence before the imports; an OMP_WAIT_POLICY already set in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import dataclasses
import json
import math
import signal
import sys
import time
import typing
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.nn.parallel import DistributedDataParallel as DDP

import data
from kimik2 import PRESETS, Config, KimiK2
from muonclip import MuonClip


def fail(message):
    """Stop with one line naming the option or file at fault (exit status 1), as train_run.fail does."""
    raise SystemExit(f"train.py: error: {message}")


def run_folder():
    """train_run.py (lock, manifest, checkpoints, signals, error boundary), imported when a run starts."""
    try:
        import train_run
    except ModuleNotFoundError as e:
        if e.name != "train_run":
            raise
        fail("the run folder lives in train_run.py: copy it beside train.py")
    return train_run


# -----------------------------------------------------------------------------
# config: every option, validated where argparse can name it

number = data.number
POSITIVE_INT, COUNT = number(int, 1), number(int, 0)
POSITIVE, NON_NEGATIVE, FRACTION = number(float, 0, above=True), number(float, 0), number(float, 0, 1)


def config_override(text):
    """An argparse type for --set: 'FIELD=VALUE' -> (FIELD, VALUE), VALUE typed by the Config field
    (int, float, true/false, none where the field allows None, JSON for a dict)."""
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


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--preset", choices=list(PRESETS), help="model preset (default: tiny)")
    g.add_argument("--config", metavar="FILE", help="model config.json (Hugging Face field names); replaces --preset")
    g.add_argument("--init-from", metavar="CKPT",
                   help="fine-tune: start a new run (step 0, fresh optimizer and schedule, its own data, options and "
                        "--out) from the model config and weights of CKPT, a train.py checkpoint; --set may change "
                        "only fields that keep every weight's shape")
    g.add_argument("--aux-loss-alpha", type=NON_NEGATIVE,
                   help="sequence-wise balance loss coefficient (DeepSeek-V3: 1e-4); default: the config's")
    g.add_argument("--router-bias-speed", type=NON_NEGATIVE, default=1e-3,
                   help="gamma of the loss-free balancing update b_i += gamma*sign(mean_load - load_i) (DeepSeek-V3: 0.001)")
    g.add_argument("--set", type=config_override, action="append", default=[], metavar="FIELD=VALUE",
                   help="override one field of the preset/--config (repeatable), e.g. --set n_routed_experts=64")
    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", metavar="[DOMAIN=]PATH",
                   help="files or folders of .txt/.md/.py/.jsonl, or builtin[:code,knowledge,math]; default: the embedded corpus")
    g.add_argument("--val-data", nargs="+", metavar="[DOMAIN=]PATH",
                   help="validation sources held out from training: validation uses only these, and all of --data trains")
    g.add_argument("--data-cache", default="data_cache", metavar="DIR", help="where tokenised corpora are cached")
    g.add_argument("--batch-size", type=POSITIVE_INT, default=16,
                   help="global batch in sequences per optimizer step, whatever the number of processes")
    g.add_argument("--seq-len", type=POSITIVE_INT, default=128, help="tokens per sequence")
    g.add_argument("--grad-accum", type=POSITIVE_INT, default=1,
                   help="micro-steps per optimizer step; each process runs batch/(grad_accum*processes) sequences per micro-step")
    g = p.add_argument_group("optimization")
    g.add_argument("--max-steps", type=POSITIVE_INT, default=600, help="optimizer steps")
    g.add_argument("--max-tokens", type=POSITIVE_INT, help="token budget; replaces --max-steps")
    g.add_argument("--optimizer", default="muonclip", choices=["muonclip", "adamw"],
                   help="muonclip: Muon on hidden matrices, AdamW on the rest; adamw: AdamW on everything")
    g.add_argument("--lr", type=POSITIVE, default=1e-2, help="peak learning rate (K2: 2e-4 at 1T scale)")
    g.add_argument("--schedule", default="wsd", choices=["wsd", "cosine"],
                   help="wsd: warm-up, constant, cosine decay over the last --decay-frac of steps (K2); cosine: warm-up then cosine")
    g.add_argument("--warmup-steps", type=COUNT, default=30, help="linear warm-up steps (K2: 500)")
    g.add_argument("--decay-frac", type=FRACTION, default=0.3, help="wsd: fraction of steps spent decaying")
    g.add_argument("--min-lr-ratio", type=FRACTION, default=0.1, help="final lr / peak lr (K2: 2e-5 / 2e-4)")
    g.add_argument("--weight-decay", type=NON_NEGATIVE, default=0.1, help="decoupled weight decay (K2: 0.1)")
    g.add_argument("--qk-clip-tau", type=NON_NEGATIVE, default=100.0,
                   help="QK-Clip threshold on each head's max attention logit (K2: 100); 0 disables the clip")
    g.add_argument("--max-bad-steps", type=POSITIVE_INT, default=5,
                   help="stop after this many non-finite steps in a row (each one is skipped)")
    g = p.add_argument_group("system")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when present")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="bfloat16: autocast (CPU, CUDA); float16: autocast + grad scaler (CUDA only); auto: bfloat16 on CUDA, float32 on CPU")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--fsdp", action="store_true", help="under torchrun, shard with FSDP2 (fully_shard) instead of DDP")
    g.add_argument("--seed", type=int, default=1337, help="seed for the initial weights and the batches")
    g.add_argument("--val-seed", type=int, default=None,
                   help="seed that picks the validation batches (default: --seed); fix it to compare runs of "
                        "different seeds on the same batches")
    g.add_argument("--peak-flops", type=POSITIVE,
                   help="peak FLOP/s of one device for MFU; default: measured (measure_peak_flops)")
    g = p.add_argument_group("run folder")
    g.add_argument("--out", default=None, metavar="DIR", help="run folder; default: runs/<preset>")
    g.add_argument("--resume", nargs="?", const="latest", metavar="CKPT",
                   help="continue from CKPT, or from the newest checkpoint in --out; checkpoints of --out newer than "
                        "CKPT are moved into --out/after_step_<step of CKPT>/")
    g.add_argument("--overwrite", action="store_true",
                   help="start over in an --out that holds an earlier run: delete what train.py wrote there "
                        "(listed in its train_files.json) first (without --resume or --overwrite such a folder is refused)")
    g.add_argument("--log-interval", type=POSITIVE_INT, default=10, help="steps between progress lines and metrics records")
    g.add_argument("--eval-interval", type=POSITIVE_INT, default=100, help="steps between validation losses")
    g.add_argument("--eval-iters", type=POSITIVE_INT, default=8, help="batches per validation loss")
    g.add_argument("--ckpt-interval", type=POSITIVE_INT, default=100,
                   help="steps between checkpoints (also written at the end and on SIGINT/SIGTERM)")
    g.add_argument("--keep-ckpts", type=POSITIVE_INT, default=2,
                   help="checkpoints kept in the run folder (only those train.py wrote there are ever deleted)")
    g.add_argument("--sample-tokens", type=COUNT, default=300, help="length of the final sample")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume and args.overwrite:
        parser.error("argument --overwrite: not allowed with --resume (continue the run, or start it over)")
    if args.init_from and (args.preset or args.config):
        parser.error(f"argument {'--preset' if args.preset else '--config'}: not allowed with --init-from (the model "
                     f"config is the checkpoint's; change a field with --set)")
    if args.init_from and args.out is None:
        parser.error("argument --init-from: give --out, the fine-tuning run's own folder")
    if not args.init_from:
        args.preset = args.preset or "tiny"
    if args.out is None:
        args.out = os.path.join("runs", "custom" if args.config else args.preset)
    return args


def model_config(args, base=None) -> Config:
    """--preset, --config, or `base` (the model config of --init-from's checkpoint), with
    --aux-loss-alpha and every --set applied."""
    try:
        config = (Config(**base) if base else Config.from_json(args.config) if args.config
                  else Config.from_preset(args.preset))
        if args.aux_loss_alpha is not None:
            config = Config(**{**config.to_dict(), "aux_loss_alpha": args.aux_loss_alpha})
    except (OSError, ValueError, TypeError) as e:
        fail(f"--config {args.config}: {e}" if args.config else f"--aux-loss-alpha: {e}")
    try:
        config = Config(**{**config.to_dict(), **dict(args.set)})
    except (ValueError, TypeError) as e:
        fail(f"--set {' '.join(f'{k}={v}' for k, v in args.set)}: {e}")
    if config.vocab_size < data.ByteTokenizer.vocab_size:
        fail(f"model vocab_size {config.vocab_size} is smaller than the tokenizer's {data.ByteTokenizer.vocab_size}")
    if config.max_position_embeddings < args.seq_len:
        fail(f"--seq-len {args.seq_len} exceeds the model's max_position_embeddings {config.max_position_embeddings}")
    return config


# -----------------------------------------------------------------------------
# init: processes and devices; the data

@dataclass
class Setup:
    """What init decides: the processes, this one's device, the training precision and its share
    of the batch. Under torchrun each process holds its own."""
    distributed: bool
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype
    micro_batch: int  # sequences per process per micro-step

    @property
    def master(self):  # only rank 0 prints and writes
        return self.rank == 0

    def autocast(self):
        return nullcontext() if self.dtype == torch.float32 else torch.autocast(self.device.type, dtype=self.dtype)

    def log(self, *a):
        if self.master:
            try:
                print(*a)
            except OSError:  # stdout is gone (a closed pipe or terminal): the run goes on, its log to /dev/null
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def init_processes(args) -> Setup:
    """torchrun's process group when launched by torchrun, the device, the dtype, the micro-batch."""
    distributed = "RANK" in os.environ  # set by torchrun
    if args.fsdp and not distributed:
        fail("--fsdp needs torchrun (e.g. torchrun --nproc_per_node=2 train.py --fsdp)")
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: CUDA is not available")
    device_type = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device_type == "cuda" else "float32")
    if dtype == "float16" and device_type != "cuda":
        fail("--dtype float16 needs CUDA (its grad scaler is CUDA-only); use bfloat16 or float32 on CPU")
    world = int(os.environ.get("WORLD_SIZE", 1)) if distributed else 1
    if args.batch_size % (args.grad_accum * world):
        fail(f"--batch-size {args.batch_size} must be divisible by --grad-accum {args.grad_accum} x {world} processes")
    if distributed:
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device(device_type, int(os.environ["LOCAL_RANK"])) if device_type == "cuda" else torch.device("cpu")
    else:
        rank, device = 0, torch.device(device_type)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return Setup(distributed, rank, world, device, getattr(torch, dtype), args.batch_size // (args.grad_accum * world))


def prepare_data(sources, val_fraction, option, args, setup):
    """data.prepare's info for `sources`: tokenised once by rank 0 (cached under a hash of the
    inputs), then read by the other ranks; errors name `option` or the cache."""
    try:
        if setup.master:
            prepared = data.prepare(args.data_cache, sources=sources, val_fraction=val_fraction)
        if setup.distributed:
            dist.barrier()
        if not setup.master:
            prepared = data.prepare(args.data_cache, sources=sources, val_fraction=val_fraction)
    except data.DataError as e:  # the input: names the file, line or source
        fail(f"{option}: {e}")
    except OSError as e:  # the cache could not be written (data.prepare removed its temporary folder)
        fail(f"--data-cache {e.filename or args.data_cache}: {e.strerror or e}")
    if skipped := data.describe_load_report(prepared):
        setup.log(f"{option}: {skipped}")
    return prepared


def load_data(args, setup):
    """(train tokens, val tokens), memory-mapped. Validation is a held-out part of --data, or with
    --val-data all of those sources (prepared with nothing held out, so they fill the "train" file)
    while every --data document trains."""
    prepared = prepare_data(args.data, 0.0 if args.val_data else 0.05, "--data", args, setup)
    train_tokens = data.load_tokens(prepared, "train")
    if args.val_data:
        val_tokens = data.load_tokens(prepare_data(args.val_data, 0.0, "--val-data", args, setup), "train")
    else:
        val_tokens = data.load_tokens(prepared, "val")
    for split, tokens in (("train", train_tokens), ("val", val_tokens)):
        if len(tokens) <= args.seq_len:
            option = "--val-data" if split == "val" and args.val_data else "--data"
            fail(f"{option}: the {split} split has {len(tokens)} tokens, fewer than --seq-len {args.seq_len} + 1")
    return train_tokens, val_tokens


# -----------------------------------------------------------------------------
# model and optimizer

def build_model(config, args, setup):
    """(the plain model, the model the loop calls: compiled and/or wrapped for DDP; FSDP2 in place)."""
    raw_model = KimiK2(config).to(setup.device)
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard
        for layer in raw_model.model.layers:
            fully_shard(layer)
        fully_shard(raw_model)  # in place: raw_model's weights are now DTensors sharded on dim 0
    model = torch.compile(raw_model) if args.compile else raw_model
    if setup.distributed and not args.fsdp:
        # No buffer sync in forward: rank 0's buffers would overwrite every rank's own expert_load and
        # max_logits counts, which the router's bias update and MuonClip reduce themselves. (DDP still syncs
        # buffers once here at construction, when they are equal on every rank.)
        model = DDP(model, device_ids=[setup.device.index] if setup.device.type == "cuda" else None,
                    forward_sync_buffers=False)
    return raw_model, model


def build_optimizer(args, raw_model, tau, setup):
    if args.optimizer == "muonclip":
        # Newton-Schulz in bfloat16 on CUDA as reference Muon does; float32 on CPU, where it is 2-3x
        # faster at these sizes and keeps runs on 1 and N processes equal to float32 rounding.
        ns_dtype = torch.bfloat16 if setup.device.type == "cuda" else torch.float32
        return MuonClip.for_model(raw_model, lr=args.lr, weight_decay=args.weight_decay, qk_clip_tau=tau, ns_dtype=ns_dtype)
    # the same class with every parameter on AdamW: the comparison changes the update rule only
    return MuonClip([{"params": list(raw_model.parameters()), "use_muon": False}], lr=args.lr,
                    weight_decay=args.weight_decay, qk_clip_tau=tau, attention_modules=raw_model.attention_modules())


# -----------------------------------------------------------------------------
# eval helper and the training step

@torch.no_grad()
def estimate_val_loss(model, val_tokens, args, setup):
    """Mean loss over --eval-iters validation batches. The same batches at every evaluation (fresh
    sampler, fixed seed), whatever the number of processes or micro-steps: evaluations compare like
    with like, and a resumed run sees exactly what the uninterrupted one saw. Micro-batches keep eval
    memory at the training step's."""
    seed = args.seed if args.val_seed is None else args.val_seed
    sampler = data.BatchSampler(val_tokens, args.batch_size, args.seq_len, seed=seed, rank=setup.rank,
                                world_size=setup.world)
    model.eval()
    total = torch.zeros((), device=setup.device)
    for _ in range(args.eval_iters):
        x, y = (t.view(args.grad_accum, setup.micro_batch, -1).to(setup.device) for t in sampler.next())  # (grad_accum, micro_batch, T)
        for micro in range(args.grad_accum):
            with setup.autocast():
                _, loss = model(x[micro], y[micro])
            total += loss.float()
    model.train()
    if setup.distributed:
        dist.all_reduce(total, op=dist.ReduceOp.AVG)
    return (total / (args.eval_iters * args.grad_accum)).item()


def forward_backward(model, raw_model, batch, optimizer, scaler, args, setup):
    """Accumulate the gradient of the batch's mean loss over --grad-accum micro-steps; returns (the
    loss averaged over ranks, the norm of the whole gradient)."""
    x, y = (t.view(args.grad_accum, setup.micro_batch, -1).to(setup.device) for t in batch)  # (grad_accum, micro_batch, T)
    loss_sum = torch.zeros((), device=setup.device)
    for micro in range(args.grad_accum):
        last = micro == args.grad_accum - 1
        # Gradients are reduced across ranks only on the last micro-step: the others just accumulate.
        sync = model.no_sync() if isinstance(model, DDP) and not last else nullcontext()
        if args.fsdp:
            raw_model.set_requires_gradient_sync(last)
        with sync, setup.autocast():
            _, loss = model(x[micro], y[micro])
            # Divide so the accumulated gradient is that of the mean loss over the whole batch.
            loss = loss / args.grad_accum
        scaler.scale(loss).backward()
        loss_sum += loss.detach().float()
    if setup.distributed:
        dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
    scaler.unscale_(optimizer)  # a no-op unless float16: the norm below is of the true gradient
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in raw_model.parameters() if p.grad is not None])
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor over the shards
        grad_norm = grad_norm.full_tensor()
    return loss_sum, grad_norm


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
# checkpoint contents: what a step's exact continuation needs (train_run.py writes and verifies the file)

def gather_training_state(raw_model, optimizer, args, setup):
    """(model state, optimizer state), unsharded, on rank 0 (None elsewhere for FSDP's optimizer).
    Collective: every rank takes part."""
    model_state = get_model_state_dict(raw_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    optim_state = run_folder().to_cpu(optimizer.state_dict())
    if args.fsdp:  # MuonClip keeps each rank's state for its own shard: rank 0 stores them all
        shards = [None] * setup.world if setup.master else None
        dist.gather_object(optim_state, shards, dst=0)
        optim_state = shards
    return model_state, optim_state


def restore(ckpt, path, raw_model, optimizer, scaler, sampler, args, setup):
    """Load every piece of training state; returns (step, statistics window, divergence watch)."""
    set_model_state_dict(raw_model, ckpt["model"], options=StateDictOptions(full_state_dict=True))
    if ckpt["optimizer_per_rank"] and not (args.fsdp and len(ckpt["optimizer"]) == setup.world):
        fail(f"--resume: {path} holds FSDP optimizer shards of {len(ckpt['optimizer'])} processes; "
             f"resume it with --fsdp on as many processes")
    optimizer.load_state_dict(ckpt["optimizer"][setup.rank] if ckpt["optimizer_per_rank"] else ckpt["optimizer"])
    if ckpt["scaler"]:
        scaler.load_state_dict(ckpt["scaler"])
    try:
        sampler.load_state_dict(ckpt["sampler"])
    except ValueError as e:
        fail(f"--resume: {path}: {e}")
    run_folder().set_rng_state(ckpt["rng"])
    return ckpt["step"], ckpt["window"], Divergence(ckpt["bad_steps"], ckpt.get("best_loss", math.inf))


class Divergence:
    """The rule that stops a diverging run. A step diverges when its loss or gradient norm is
    non-finite, or its loss is more than 1 nat above the lowest training loss so far (every token e
    times less likely than at the best): a run given --lr 1e6 sits at ln 256 = 5.5, the loss of a
    uniform guess, while the default run's logged losses never rose 0.5 nat above their best.
    --max-bad-steps such steps in a row stop the run. A non-finite step's update is skipped; a finite
    one is applied (a spike may recover). The checkpoint to resume from is the newest one from before
    the streak began, which pruning keeps (train_run.RunFolder.prune)."""

    def __init__(self, bad_steps=0, best=math.inf):
        self.bad_steps, self.best = bad_steps, best

    def update(self, loss, grad_norm):
        """Count one step's loss; returns whether it diverged."""
        bad = not (math.isfinite(loss) and math.isfinite(grad_norm)) or loss > self.best + 1
        self.bad_steps = self.bad_steps + 1 if bad else 0
        if math.isfinite(loss):
            self.best = min(self.best, loss)
        return bad

    def healthy_before(self, step):
        """The first model (counted in updates) of the current streak: the checkpoints before it are good."""
        return step - self.bad_steps if self.bad_steps else math.inf

    def stop_line(self, step, folder, dtype, non_finite):
        """The one line a diverged run stops with after the update to `step`, naming where to resume."""
        good = [name for s, name in folder.checkpoints() if s < self.healthy_before(step)]
        where = (f"resume from the newest checkpoint from before it with a lower --lr: --resume {folder.join(good[-1])}"
                 if good else "no checkpoint from before it: start over with a lower --lr")
        why = "non-finite" if non_finite else f"over 1 nat above the best loss so far, {self.best:.4f}"
        hint = " (or --dtype float32)" if non_finite and dtype != torch.float32 else ""
        return f"stopping: the loss diverged, {self.bad_steps} steps in a row up to step {step} ({why}); {where}{hint}"


# -----------------------------------------------------------------------------
# reporting
def measure_peak_flops(dtype, device=torch.device("cpu"), sizes=None, trials=5):
    """Peak matmul FLOP/s of one device in `dtype`, the MFU denominator (train.py and bench.py): the
    fastest of `trials` timings of a square n x n matmul for each n in `sizes` (CPU: 512, 1024, 2048,
    where the smaller ones, which stay in cache, are often the fastest; CUDA: 4096, 8192). Other
    processes can only slow a timing down, so the fastest one is the closest to the idle machine's
    peak; a median or a single timing on a busy machine reads low and inflates MFU. An achievable
    peak, not the datasheet's: MFU against it reads higher."""
    sizes = sizes or ((4096, 8192) if device.type == "cuda" else (512, 1024, 2048))
    best = 0.0
    for n in sizes:
        a = torch.ones(n, n, device=device, dtype=dtype)  # ones: no draw from the RNG a run depends on
        a @ a  # warm-up: kernel selection, first-touch allocation
        for _ in range(trials):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            a @ a
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t0))
    return best


def new_window(layers, device=None):
    """The statistics accumulated between two metrics records: max logit per layer, heads clipped."""
    return {"max_logits": torch.full((layers,), -math.inf, device=device),
            "heads_clipped": torch.zeros((), dtype=torch.long, device=device)}


def progress_line(record, max_steps, eta):
    mfu = f"MFU {100 * record['mfu']:.1f}%" + (" (over 100%: the peak was measured low, pass --peak-flops)"
                                               if record["mfu"] > 1 else "")
    return (f"step {record['step']}/{max_steps} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
            f"{record['tokens_per_s']:,.0f} tok/s | {mfu} | max logit {record['max_logit']:.1f} | "
            f"clipped {record['heads_clipped']} | imbalance {record['load_imbalance']:.2f} | "
            f"{record['elapsed_s']:.0f}s, ETA {eta:.0f}s")


def main(argv=None):
    return run(parse_args(argv))


def run(args):
    with run_folder().StopSignals() as stop:  # SIGINT, SIGTERM, SIGHUP: one line at any moment
        return train(args, stop)


def train(args, stop):
    # -------------------------------------------------------------------------
    # config and init: processes, device, dtype; a checkpoint to resume or to start from (--init-from) is
    # read, verified and checked against this run, and the run folder locked and checked, before anything
    # is built or written
    train_run = run_folder()
    setup = init_processes(args)
    log = setup.log
    ckpt, ckpt_path = train_run.open_checkpoint(args) if args.resume else (None, None)
    source, source_record = train_run.open_init_source(args) if args.init_from and not ckpt else (None, None)
    # a fine-tuning run takes its model config from its source, and from its own checkpoint on resume
    config = model_config(args, base=(ckpt or source)["config"]["model"] if args.init_from else None)
    if source:
        train_run.check_same_shapes(config, source, args)
    scaler = torch.amp.GradScaler("cuda", enabled=setup.dtype == torch.float16)
    tokens_per_step = args.batch_size * args.seq_len
    max_steps = args.max_steps = math.ceil(args.max_tokens / tokens_per_step) if args.max_tokens else args.max_steps
    run_config = {**vars(args), "model": config.to_dict(), "data": args.data or "embedded",
                  "processes": setup.world, "micro_batch": setup.micro_batch, "tokens_per_step": tokens_per_step,
                  "dtype": str(setup.dtype).removeprefix("torch."), "device": str(setup.device),
                  "init_source": source_record or (ckpt["config"].get("init_source") if ckpt else None)}
    if ckpt:
        train_run.check_resume(ckpt, ckpt_path, run_config)
    command = train_run.command_line(setup.world, sys.argv[1:])
    folder = train_run.open_run_folder(args, setup, command)  # rank 0 holds its lock until the process ends
    with folder.untaken_on_failure():  # until the first write, a refusal leaves --out as it was
        records = train_run.check_run_folder(args, folder, ckpt, ckpt_path)  # the metrics a resume keeps, verified
        torch.manual_seed(args.seed)  # same seed on every rank: identical initial weights before sharding

        # -------------------------------------------------------------------------
        # data (a bad --data stops the run here, before its folder is written)
        train_tokens, val_tokens = load_data(args, setup)
    # batch_size is global: each rank draws its own rows of the same global batch, so step N's batch
    # does not depend on the number of processes or micro-steps.
    train_sampler = data.BatchSampler(train_tokens, args.batch_size, args.seq_len, seed=args.seed, rank=setup.rank,
                                      world_size=setup.world)
    entropy = data.unigram_entropy(train_tokens)
    with stop.held():  # the first write: a signal takes effect once the folder is consistent
        train_run.prepare_run_folder(args, folder, ckpt, ckpt_path, records, run_config, setup)
    metrics = train_run.MetricsLog(folder, records, setup.master)

    # -------------------------------------------------------------------------
    # model and optimizer
    raw_model, model = build_model(config, args, setup)
    if source:  # fine-tuning: the checkpoint's weights (router biases included); all else starts afresh
        set_model_state_dict(raw_model, source["model"], options=StateDictOptions(full_state_dict=True))
        log(f"--init-from {args.init_from}: the weights of step {source['step']}; step 0, fresh optimizer and schedule")
        del source
    attention, gates = raw_model.attention_modules(), list(raw_model.moe_gates())
    tau = args.qk_clip_tau or None
    optimizer = build_optimizer(args, raw_model, tau, setup)
    start_step, window, divergence, last_ckpt = 0, None, Divergence(), ckpt_path
    if ckpt:
        start_step, window, divergence = restore(ckpt, ckpt_path, raw_model, optimizer, scaler, train_sampler, args, setup)
        log(f"resumed from {ckpt_path} at step {start_step}")
        del ckpt
    peak_flops = args.peak_flops or measure_peak_flops(setup.dtype, setup.device)
    flops_per_tok = raw_model.estimate_flops_per_token(args.seq_len)  # training: forward + backward
    n_params = sum(p.numel() for p in raw_model.parameters())  # DTensor numel is the global size
    log(f"{config.num_hidden_layers} layers, {n_params / 1e6:.2f}M parameters; {setup.world} process(es) on "
        f"{setup.device}, {run_config['dtype']}, {torch.get_num_threads()} threads; {tokens_per_step} tokens/step "
        f"({args.batch_size} x {args.seq_len}), {max_steps} steps; MFU against {peak_flops / 1e9:.1f} GFLOP/s "
        f"per device ({'--peak-flops' if args.peak_flops else 'fastest of several matmul timings'})")

    # -------------------------------------------------------------------------
    # training loop (eval helper: estimate_val_loss; lr schedule: lr_at)
    window = {k: v.to(setup.device) for k, v in (window or new_window(len(attention))).items()}
    val_loss = next((r["val_loss"] for r in reversed(records) if "val_loss" in r), None)
    t_start = t_log = time.perf_counter()
    steps_timed = 0
    with stop.polled():  # a signal stops the loop at the next step boundary, after a checkpoint
        for step in range(start_step, max_steps + 1):  # step = optimizer updates done so far
            stopping = stop.agreed(setup)
            # Evaluate, then checkpoint, the model after `step` updates; a resumed run did both before it
            # stopped (it evaluates again only where its metrics lack the record: a resume into a new --out).
            resumed_here = step == start_step > 0
            evaluated = (step % args.eval_interval == 0 or step == max_steps) and not (
                resumed_here and any(r["step"] == step and "val_loss" in r for r in records))
            if evaluated:
                val_loss = estimate_val_loss(model, val_tokens, args, setup)
                metrics.write({"step": step, "val_loss": val_loss})
                log(f"step {step}: val loss {val_loss:.4f}")
            if step > 0 and not resumed_here and (step % args.ckpt_interval == 0 or step == max_steps or stopping):
                model_state, optim_state = gather_training_state(raw_model, optimizer, args, setup)
                if setup.master:
                    with stop.held():
                        last_ckpt = train_run.save_checkpoint(
                            {"step": step, "model": model_state, "optimizer": optim_state,
                             "optimizer_per_rank": args.fsdp, "scaler": scaler.state_dict(),
                             "sampler": train_sampler.state_dict(), "rng": train_run.rng_state(),
                             "window": train_run.to_cpu(window), "bad_steps": divergence.bad_steps,
                             "best_loss": divergence.best, "metrics": metrics.digest(), "config": run_config},
                            folder, args.keep_ckpts, val_loss if evaluated else None, divergence.healthy_before(step))
            if step == max_steps or stopping:
                break

            lr = lr_at(step, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, grad_norm = forward_backward(model, raw_model, train_sampler.next(), optimizer, scaler, args, setup)
            # One host sync per step: every rank must agree on skipping, and this is where they learn it.
            loss_value, norm_value = torch.stack([loss, grad_norm.to(loss.dtype)]).tolist()
            finite = math.isfinite(loss_value) and math.isfinite(norm_value)
            diverged = divergence.update(loss_value, norm_value)
            if finite:
                scaler.step(optimizer)  # Muon/AdamW update, then QK-Clip on heads whose max logit > tau
                # the step's (layers, heads) max logits over all micro-batches and ranks, measured
                # before the clip; the optimizer reduces and resets them (also with QK-Clip off)
                stats = optimizer.clip_stats
                imbalance = raw_model.update_router_bias_(args.router_bias_speed)  # loads summed over ranks
                window["max_logits"] = torch.maximum(window["max_logits"], stats["max_logits"].amax(dim=1))
                window["heads_clipped"] += stats["heads_clipped"]
            else:
                # Drop this step's statistics with its gradient: they were measured on a diverging model.
                raw_model.reset_step_statistics_()
                metrics.write({"step": step + 1, "skipped": "non-finite loss or gradient",
                               "loss": loss_value, "grad_norm": norm_value})
                log(f"step {step + 1}: non-finite loss {loss_value} / grad norm {norm_value}, update skipped")
            if diverged and divergence.bad_steps >= args.max_bad_steps:
                fail(divergence.stop_line(step + 1, folder, setup.dtype, non_finite=not finite))
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            steps_timed += 1

            if finite and ((step + 1) % args.log_interval == 0 or step + 1 == max_steps):
                now = time.perf_counter()
                tokens_per_s = tokens_per_step * steps_timed / (now - t_log)
                record = {"step": step + 1, "loss": loss_value, "lr": lr, "grad_norm": norm_value,
                          "max_logit": window["max_logits"].max().item(),
                          "max_logit_per_layer": window["max_logits"].tolist(),
                          "heads_clipped": window["heads_clipped"].item(),
                          "load_imbalance": imbalance.max().item() if len(gates) else 1.0,
                          "tokens": (step + 1) * tokens_per_step,
                          # timing: differs from run to run, unlike everything above
                          "tokens_per_s": tokens_per_s, "mfu": flops_per_tok * tokens_per_s / (peak_flops * setup.world),
                          "elapsed_s": now - t_start}
                metrics.write(record)
                log(progress_line(record, max_steps, eta=(now - t_start) / (step + 1 - start_step) * (max_steps - step - 1)))
                window = new_window(len(attention), setup.device)
                t_log, steps_timed = now, 0

    # -------------------------------------------------------------------------
    # cleanup: export, sample, plot, baseline; or, after a signal, how to continue
    if stopping:
        by = signal.Signals(stop.received).name if stop.received else "a signal to another rank"
        log(f"stopped by {by} after step {step}" + (f", checkpointed; continue with: "
                                                    f"{train_run.resume_command(setup.world, last_ckpt)}" if step > 0 else ", before any update"))
    else:
        stop.where = (f"during the export: the final checkpoint is whole; export again with: "
                      f"{train_run.resume_command(setup.world, last_ckpt)}")
        final_state = get_model_state_dict(raw_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if setup.master:
            export = train_run.export_hf(final_state, config, folder)
            if args.sample_tokens:
                prompt = torch.from_numpy(val_tokens[:16].astype(np.int64))[None]  # (1, 16)
                sample = export.eval().generate(prompt, args.sample_tokens, temperature=0.8, top_k=40)
                log("sample (prompt = the first 16 validation tokens):\n" + data.ByteTokenizer().decode(sample[0].tolist()))
            train_run.plot_metrics(records, tau, folder)
            verdict = "below" if val_loss < entropy else "NOT below"
            log(f"final val loss {val_loss:.4f} nats/token vs unigram entropy {entropy:.4f} nats/token "
                f"({verdict} the best context-free model); run folder {args.out}")
    if setup.distributed:
        # Drain gloo's worker threads before the process group goes: destroying it (DDP's reducer
        # holds it too) while a worker still needs the GIL to free a finished collective's tensors
        # deadlocks at exit (PyTorch issue 56297; seen here about once in a few dozen runs).
        dist.barrier()
        del model
        dist.destroy_process_group()
    if stopping:
        raise SystemExit(train_run.INTERRUPTED)
    return val_loss


if __name__ == "__main__":
    args = parse_args()  # --help and a bad option are answered by the card files alone
    run_folder().error_boundary(run, args)
