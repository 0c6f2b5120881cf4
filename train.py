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
layout export (hf/, model and byte tokenizer).

No run is lost: one process writes a run folder (it holds train.lock; a second one is refused, naming
it); train_files.json lists what train.py wrote there, and a folder holding anything else is refused,
so a user's files are never touched; a run folder that holds checkpoints is continued with --resume or
started over only with --overwrite, which deletes only what is listed; a resume from an older checkpoint
moves the newer ones aside; a checkpoint is checked byte for byte (its zip CRCs) before it is loaded;
Ctrl-C (SIGINT) or SIGTERM checkpoints at the next step boundary, prints the command that continues
the run and exits with status 130; a full disk or an unusable --out stops with one line naming the
path and leaves no temporary file.

    python train.py                                    # tiny preset, embedded corpus, minutes on 2 CPU cores
    python train.py --resume                           # continue a stopped run exactly (here runs/tiny)
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
import atexit
import dataclasses
import fcntl
import glob
import json
import math
import random
import re
import shlex
import shutil
import signal
import sys
import time
import typing
import zipfile
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.nn.parallel import DistributedDataParallel as DDP

import data
from kimik2 import PRESETS, Config, KimiK2
from muonclip import MuonClip

# Options a checkpoint's run must share with the resuming run: they change what "step N" means.
RESUME_MUST_MATCH = ("init_from", "model", "optimizer", "batch_size", "seq_len", "data", "val_data", "val_seed", "dtype")
CHECKPOINT_KEYS = {"step", "model", "optimizer", "optimizer_per_rank", "scaler", "sampler", "rng", "config",
                   "window", "bad_steps"}
INTERRUPTED = 130  # exit status after a SIGINT or SIGTERM stop (128 + SIGINT, as a shell reports Ctrl-C)


def fail(message):
    """Stop with a one-line message naming the option or file at fault (exit status 1)."""
    raise SystemExit(f"train.py: error: {message}")


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
            print(*a)


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
# the run folder: one writer, and a list of what train.py wrote there

MANIFEST = "train_files.json"  # the files train.py wrote in the run folder
LOCK = "train.lock"  # held by the process writing the run folder; its one line names that process
CHECKPOINT_NAME = re.compile(r"ckpt_(\d{7})\.pt")
_held_locks = {}  # lock path -> descriptor: a later main() in the same process (tests) takes its own lock over


class RunFolder:
    """--out and the list of the files train.py wrote there (MANIFEST). A name is listed before its file
    is written, and MANIFEST is replaced atomically, so a kill at any moment leaves every file of the
    run listed. Only listed files are ever replaced, moved or deleted; a folder holding anything else
    is refused. A name ending in "/" claims a whole folder while it is written (the hf/ export)."""

    def __init__(self, path, exempt=()):
        self.path = path
        self.exempt = {os.path.realpath(p) for p in exempt}  # folders of other programs (a --data-cache inside --out)
        self.read_manifest()

    def read_manifest(self):
        self.files, self.listed = set(), False
        with suppress(OSError, ValueError, KeyError, TypeError):
            with open(self.join(MANIFEST)) as f:
                manifest = json.load(f)
            if manifest["written_by"] == "train.py":
                self.files, self.listed = set(manifest["files"]), True

    def join(self, name):
        return os.path.join(self.path, name)

    def ours(self, name):
        if name == MANIFEST:
            return self.listed
        name = name.removesuffix(".tmp")  # data.write_atomically's temporary file of a listed name
        return name == LOCK or name in self.files or any(name.startswith(f) for f in self.files if f.endswith("/"))

    def names(self):
        """Every file, link or other non-folder entry under the folder, as a relative path, in order (lazily:
        a check of a user's large folder stops at its first file)."""
        for folder, dirs, names in os.walk(self.path):
            links = [d for d in dirs if os.path.islink(os.path.join(folder, d))]
            dirs[:] = sorted(d for d in dirs if d not in links and os.path.realpath(os.path.join(folder, d)) not in self.exempt)
            yield from (os.path.relpath(os.path.join(folder, n), self.path) for n in sorted(names + links))

    def take(self, command):
        """Lock the folder, then check it: None, or the one line that says why train.py may not write here
        (rank 0 only). The lock (LOCK, held until this process ends: the kernel lets go of it then, also
        after SIGKILL) comes first, so that no other run writes between the check and this run's writes;
        a folder refused for holding files train.py did not write is left as it was."""
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            return f"--out {self.path}: exists and is not a folder"
        lock = os.path.realpath(self.join(LOCK))
        with suppress(KeyError):
            os.close(_held_locks.pop(lock))
        created = not os.path.exists(lock)
        try:
            os.makedirs(self.path, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            return f"--out {self.path}: cannot write {e.filename}: {e.strerror}"
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(fd)
            os.close(fd)
            return f"--out {self.path} is in use by {holder}: wait for it or stop it, or choose another --out"
        self.read_manifest()
        if foreign := next((n for n in self.names() if not self.ours(n)), None):
            if created:
                os.remove(lock)
            os.close(fd)
            return (f"--out {self.path} holds files that are not train.py's (not listed in its {MANIFEST}), e.g. "
                    f"{self.join(foreign)}: train.py never writes beside them; move them, or choose an empty or new --out")
        if previous := os.pread(fd, 4096, 0).decode(errors="replace").strip():  # a killed holder's line
            print(f"--out {self.path}: the lock of {previous}, which has ended, is taken over")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} ({command})\n".encode(), 0)
        atexit.register(lambda: fd in _held_locks.values() and os.ftruncate(fd, 0))  # an orderly end empties it
        _held_locks[lock] = fd  # open for the life of the process: closing it would let go
        return None

    @staticmethod
    def _holder(fd):
        for _ in range(100):  # the holder writes its line once it has checked the folder
            if line := os.pread(fd, 4096, 0).decode(errors="replace").strip():
                return line
            time.sleep(0.01)
        return "another process"

    def claim(self, *names):
        """List `names` as train.py's before they are written."""
        if not self.files.issuperset(names):
            self.files.update(names)
            self._save()

    def forget(self, *names):
        self.files.difference_update(names)
        self._save()

    def _save(self):
        data.write_atomically(self.join(MANIFEST),
                              lambda f: json.dump({"written_by": "train.py", "files": sorted(self.files)}, f, indent=1))
        self.listed = True

    def write(self, name, write, mode="w"):
        self.claim(name)
        os.makedirs(os.path.dirname(self.join(name)), exist_ok=True)
        data.write_atomically(self.join(name), write, mode)

    def remove(self, *names):
        """Delete listed files (and the folders they leave empty), then unlist them."""
        for name in names:
            if name.endswith("/"):
                shutil.rmtree(self.join(name), ignore_errors=True)
            else:
                with suppress(FileNotFoundError):
                    os.remove(self.join(name))
            parent = os.path.dirname(name.rstrip("/"))
            while parent:
                with suppress(OSError):  # not empty: something else is still in it
                    os.rmdir(self.join(parent))
                parent = os.path.dirname(parent)
        self.forget(*names)

    def move(self, names, folder):
        """Move listed files into the subfolder `folder`, keeping their relative names."""
        moved = {name: os.path.join(folder, name) for name in names}
        self.claim(*moved.values())
        for old, new in moved.items():
            os.makedirs(os.path.dirname(self.join(new.rstrip("/"))), exist_ok=True)
            with suppress(FileNotFoundError):
                os.rename(self.join(old), self.join(new))
        self.forget(*moved)

    def checkpoints(self):
        """[(step, name)] of the checkpoints train.py wrote at the top of the folder, oldest first."""
        return sorted((int(m[1]), n) for n in self.files if (m := CHECKPOINT_NAME.fullmatch(n)) and os.path.exists(self.join(n)))


def open_run_folder(args, setup):
    """--out, checked and locked by rank 0; every rank stops with rank 0's line when it may not be used."""
    folder = RunFolder(args.out, exempt=[args.data_cache])
    problem = folder.take(command_line(setup.world, sys.argv[1:])) if setup.master else None
    if setup.distributed:
        box = [problem]
        dist.broadcast_object_list(box, src=0)
        problem = box[0]
    if problem:
        fail(problem)
    return folder


def read_metrics(path, upto_step, after=False):
    """The records of steps <= upto_step (> upto_step when `after`); a line cut short by a kill is dropped."""
    records = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if (record["step"] > upto_step) == after:
                    records.append(record)
    return records


def prepare_run_folder(args, folder, ckpt, ckpt_path, run_config, setup):
    """Make --out ready and return the metrics records kept from before. A folder that holds an
    earlier run is never reused silently: --resume continues it, --overwrite deletes what train.py
    wrote there first. A resumed run keeps the records up to its checkpoint's step; what a resume
    from an older checkpoint would replace (newer checkpoints, their metrics, plot and hf/ export)
    is moved into a subfolder, never deleted."""
    earlier = folder.checkpoints()
    if earlier and not (args.resume or args.overwrite):
        fail(f"--out {args.out} holds an earlier run (checkpoints up to {earlier[-1][1]}): "
             f"continue it with --resume, start over with --overwrite, or choose another --out")
    from_elsewhere = ckpt and os.path.realpath(os.path.dirname(ckpt_path) or ".") != os.path.realpath(args.out)
    if from_elsewhere and folder.files:
        fail(f"--resume {ckpt_path}: a checkpoint of another run folder, and --out {args.out} holds a run of its "
             f"own: resume into a new --out")
    metrics = "metrics.jsonl"
    step = ckpt["step"] if ckpt else 0
    records = read_metrics(folder.join(metrics), step) if ckpt else []
    if not setup.master:
        return records
    try:
        folder.remove(*[n for n in folder.names() if n.endswith(".tmp") and folder.ours(n)])  # a kill's leftovers
        if args.overwrite:
            folder.remove(*folder.files)
        if ckpt and (newer := [name for s, name in earlier if s > step]):
            aside, tries = f"after_step_{step}", 1
            while os.path.exists(folder.join(aside)):  # resumed from this step before
                aside, tries = f"after_step_{step}_{tries + 1}", tries + 1
            later = read_metrics(folder.join(metrics), step, after=True)
            folder.write(os.path.join(aside, metrics), lambda f: f.writelines(json.dumps(r) + "\n" for r in later))
            folder.move([*newer, *sorted(n for n in folder.files if n == "plot.png" or n.startswith("hf/"))], aside)
            setup.log(f"--resume {ckpt_path}: the newer checkpoints ({', '.join(newer)}) and their metrics, plot and "
                      f"export are kept in {folder.join(aside)}")
        folder.write(metrics, lambda f: f.writelines(json.dumps(r) + "\n" for r in records))
        folder.write("config.json", lambda f: json.dump(run_config, f, indent=2))
    except OSError as e:
        fail(f"--out {args.out}: cannot write {e.filename}: {e.strerror}")
    return records


# -----------------------------------------------------------------------------
# checkpoints and resume

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


def gather_training_state(raw_model, optimizer, args, setup):
    """(model state, optimizer state), unsharded, on rank 0 (None elsewhere for FSDP's optimizer).
    Collective: every rank takes part."""
    model_state = get_model_state_dict(raw_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    optim_state = to_cpu(optimizer.state_dict())
    if args.fsdp:  # MuonClip keeps each rank's state for its own shard: rank 0 stores them all
        shards = [None] * setup.world if setup.master else None
        dist.gather_object(optim_state, shards, dst=0)
        optim_state = shards
    return model_state, optim_state


def save_checkpoint(ckpt, folder, keep):
    """Write ckpt_<step>.pt atomically (temporary file, fsync, rename) and keep the newest `keep` of the
    checkpoints train.py wrote in the folder. A kill at any moment leaves every ckpt_*.pt complete: the
    rename is the commit. A failed write (a full disk) removes the temporary file and stops with one
    line naming the path; a model with non-finite weights is never written."""
    if not all(torch.isfinite(v).all() for v in ckpt.get("model", {}).values() if v.is_floating_point()):
        fail(f"step {ckpt['step']}: the model holds non-finite weights; not checkpointing it")
    name = f"ckpt_{ckpt['step']:07d}.pt"
    try:
        folder.write(name, lambda f: torch.save(ckpt, f), mode="wb")
    except (OSError, RuntimeError) as e:
        # torch.save reports a failed write as RuntimeError("... unexpected pos ...") raised while
        # handling the OSError that says what happened
        cause = e if isinstance(e, OSError) else e.__context__
        if isinstance(cause, OSError):
            fail(f"--out {folder.path}: cannot write checkpoint {folder.join(name)}: {cause.strerror or cause}")
        raise
    folder.remove(*[old for _, old in folder.checkpoints()[:-keep]])
    return folder.join(name)


def load_checkpoint(path):
    """A train.py checkpoint, memory-mapped: tensors are read from disk when used. Every byte is first
    checked against the CRC-32 that torch.save's zip archive stores for each record, which torch.load
    never reads. ValueError names what is wrong with the file."""
    try:
        with zipfile.ZipFile(path) as archive:
            corrupt = archive.testzip()
    except OSError as e:
        raise ValueError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    except Exception:  # zipfile's errors for an empty, cut or foreign file are many kinds
        raise ValueError(f"cannot read checkpoint {path}: not a whole checkpoint (empty, cut short, or not a zip "
                         f"archive)") from None
    if corrupt:
        raise ValueError(f"cannot read checkpoint {path}: corrupt bytes (record {corrupt} fails its CRC-32 check)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # a whole zip archive that is not a torch.save file
        raise ValueError(f"cannot read checkpoint {path}: a zip archive, but not one torch.save wrote") from None
    missing = CHECKPOINT_KEYS - set(ckpt if isinstance(ckpt, dict) else ())
    if missing:
        raise ValueError(f"{path} is not a train.py checkpoint (missing {', '.join(sorted(missing))})")
    return ckpt


def open_checkpoint(args):
    """(checkpoint, path) that --resume names, read before anything is built. An unreadable checkpoint
    is named with the newest older one in its folder that reads."""
    if args.resume == "latest":
        ckpts = RunFolder(args.out).checkpoints()
        if not ckpts:
            fail(f"--resume: no checkpoint in --out {args.out}")
        path = os.path.join(args.out, ckpts[-1][1])
    else:
        path = args.resume
        if not os.path.isfile(path):
            fail(f"--resume: no such checkpoint: {path}")
    try:
        ckpt = load_checkpoint(path)
    except ValueError as e:
        fail(f"--resume: {e}{older_checkpoint_hint(path, '--resume')}")
    return ckpt, path


def open_init_source(args):
    """(checkpoint, its record for config.json: path, step, length and SHA-256) that --init-from names,
    read before anything is built."""
    path = args.init_from
    if not os.path.isfile(path):
        fail(f"--init-from: no such checkpoint: {path}")
    if os.path.realpath(os.path.dirname(path) or ".") == os.path.realpath(args.out):
        fail(f"--init-from {path}: a checkpoint of --out {args.out} itself; fine-tune into a new --out")
    try:
        ckpt = load_checkpoint(path)
    except ValueError as e:
        fail(f"--init-from: {e}{older_checkpoint_hint(path, '--init-from')}")
    return ckpt, {"path": os.path.abspath(path), "step": ckpt["step"], **data.digest(path)}


def check_same_shapes(config, source, args):
    """--init-from: stop, naming the --set field and the weight, unless every weight of the source
    checkpoint keeps its shape in this run's model (shapes compared on the meta device: nothing allocated)."""
    def shapes(cfg):
        with torch.device("meta"):
            return {k: tuple(v.shape) for k, v in KimiK2(cfg).state_dict().items()}

    saved = {k: tuple(v.shape) for k, v in source["model"].items()}
    if shapes(config) == saved:
        return
    base = Config(**source["config"]["model"])
    for field, value in args.set:
        with suppress(ValueError, TypeError):  # a field valid only together with another --set
            ours = shapes(dataclasses.replace(base, **{field: value}))
        if ours != saved:
            name = next(k for k in sorted(saved.keys() | ours.keys()) if saved.get(k) != ours.get(k))
            fail(f"--set {field}={value}: changes {name} from {saved.get(name)} to {ours.get(name)}; --init-from "
                 f"keeps the shapes of {args.init_from} (set only fields that keep them)")
    fail(f"--init-from {args.init_from}: the --set fields together change the shapes of its weights")


def older_checkpoint_hint(bad, option):
    folder = os.path.dirname(bad) or "."
    for path in sorted(glob.glob(os.path.join(folder, "ckpt_*.pt")), reverse=True):
        if os.path.basename(path) < os.path.basename(bad):
            with suppress(ValueError):
                step = load_checkpoint(path)["step"]
                return f"; the older checkpoint next to it reads (step {step}): {option} {path}"
    return ""


def check_resume(ckpt, path, current):
    """Stop, naming the first differing field, when the checkpoint's run is not this run's beginning."""
    saved = ckpt["config"]
    for key in RESUME_MUST_MATCH:
        if key == "model":
            fields = [f for f in current["model"] if saved["model"].get(f) != current["model"][f]]
            if fields:
                f = fields[0]
                fail(f"--resume: {path} was trained with a different --preset/--config: {f} "
                     f"{saved['model'].get(f)!r} (this run: {current['model'][f]!r})"
                     + (f", and {len(fields) - 1} more field(s)" if len(fields) > 1 else ""))
        elif saved.get(key) != current.get(key):
            option = "--" + key.replace("_", "-")
            fail(f"--resume: {path} was trained with a different {option} ({saved.get(key)!r}, this run: {current.get(key)!r})")
    if ckpt["step"] > current["max_steps"]:
        fail(f"--resume: {path} is at step {ckpt['step']}, past --max-steps {current['max_steps']} "
             f"(give --max-steps {ckpt['step']} or more)")


def restore(ckpt, path, raw_model, optimizer, scaler, sampler, args, setup):
    """Load every piece of training state; returns (step, statistics window, bad steps in a row)."""
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
    set_rng_state(ckpt["rng"])
    return ckpt["step"], ckpt["window"], ckpt["bad_steps"]


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM ask the loop to stop at the next step boundary, after a checkpoint,
    instead of killing it mid-step. A second SIGINT stops at once (KeyboardInterrupt), except during a
    checkpoint write (`deferred`), which completes first."""

    def __enter__(self):
        self.received, self.deferring, self.urgent = None, False, False
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if signum == self.received == signal.SIGINT:
            self.urgent = True
            if not self.deferring:
                raise KeyboardInterrupt
        self.received = self.received or signum  # torchrun follows a Ctrl-C with SIGTERM: keep the first

    @contextmanager
    def deferred(self):
        """A write no signal interrupts: raised inside torch.save, a KeyboardInterrupt became a torch
        RuntimeError with a traceback; here the write ends, then a second Ctrl-C stops."""
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
        if self.urgent:
            raise KeyboardInterrupt

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def agreed(self, setup):
        """Whether to stop now. Under torchrun every rank must stop at the same step, so the ranks
        agree: one rank's signal stops all of them."""
        stop = torch.tensor(float(self.received is not None), device=setup.device)
        if setup.distributed:
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        return bool(stop)


def command_line(world, argv):
    launcher = ["torchrun", f"--nproc_per_node={world}"] if world > 1 else ["python"]
    return shlex.join([*launcher, "train.py", *argv])


def resume_command(world, ckpt_path):
    """The command line that continues this run from ckpt_path: this one with --resume CKPT instead of
    --resume/--overwrite."""
    argv, kept = sys.argv[1:], []
    i = 0
    while i < len(argv):
        if argv[i] == "--resume" and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            i += 1  # its CKPT
        elif not (argv[i] in ("--resume", "--overwrite") or argv[i].startswith("--resume=")):
            kept.append(argv[i])
        i += 1
    return command_line(world, [*kept, "--resume", ckpt_path])


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


def metrics_writer(path, records, master):
    """write(record): appended to `records` and (rank 0) to metrics.jsonl at once, so that a kill
    loses at most the line being written."""
    def write(record):
        records.append(record)
        if master:
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
    return write


def progress_line(record, max_steps, eta):
    mfu = f"MFU {100 * record['mfu']:.1f}%" + (" (over 100%: the peak was measured low, pass --peak-flops)"
                                               if record["mfu"] > 1 else "")
    return (f"step {record['step']}/{max_steps} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
            f"{record['tokens_per_s']:,.0f} tok/s | {mfu} | max logit {record['max_logit']:.1f} | "
            f"clipped {record['heads_clipped']} | imbalance {record['load_imbalance']:.2f} | "
            f"{record['elapsed_s']:.0f}s, ETA {eta:.0f}s")


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


def export_and_sample(model_state, config, folder, sample_tokens, val_tokens, log):
    """hf/: the final model and the byte tokenizer in the Hugging Face layout (AutoModelForCausalLM
    and AutoTokenizer load it); then a sample continuing the first validation tokens."""
    export = KimiK2(config)  # a plain, unsharded copy for the export and the sample
    export.load_state_dict(model_state)
    tokenizer = data.ByteTokenizer()
    folder.claim("hf/")  # the writers choose the file names: the folder is claimed whole until they are listed
    export.save_pretrained(folder.join("hf"))
    tokenizer.save_pretrained(folder.join("hf"))
    folder.claim(*[name for name in folder.names() if name.startswith("hf" + os.sep)])
    folder.forget("hf/")
    if sample_tokens:
        prompt = torch.from_numpy(val_tokens[:16].astype(np.int64))[None]  # (1, 16)
        sample = export.eval().generate(prompt, sample_tokens, temperature=0.8, top_k=40)
        log("sample (prompt = the first 16 validation tokens):\n" + tokenizer.decode(sample[0].tolist()))


def main(argv=None):
    args = parse_args(argv)

    # -------------------------------------------------------------------------
    # config and init: processes, device, dtype, the run folder; a checkpoint to resume or to start from
    # (--init-from) is read and checked against this run before anything is built
    setup = init_processes(args)
    log = setup.log
    folder = open_run_folder(args, setup)  # rank 0 holds its lock until the process ends
    ckpt, ckpt_path = open_checkpoint(args) if args.resume else (None, None)
    source, source_record = open_init_source(args) if args.init_from and not ckpt else (None, None)
    # a fine-tuning run takes its model config from its source, and from its own checkpoint on resume
    config = model_config(args, base=(ckpt or source)["config"]["model"] if args.init_from else None)
    if source:
        check_same_shapes(config, source, args)
    scaler = torch.amp.GradScaler("cuda", enabled=setup.dtype == torch.float16)
    tokens_per_step = args.batch_size * args.seq_len
    max_steps = args.max_steps = math.ceil(args.max_tokens / tokens_per_step) if args.max_tokens else args.max_steps
    run_config = {**vars(args), "model": config.to_dict(), "data": args.data or "embedded",
                  "processes": setup.world, "micro_batch": setup.micro_batch, "tokens_per_step": tokens_per_step,
                  "dtype": str(setup.dtype).removeprefix("torch."), "device": str(setup.device),
                  "init_source": source_record or (ckpt["config"].get("init_source") if ckpt else None)}
    if ckpt:
        check_resume(ckpt, ckpt_path, run_config)
    records = prepare_run_folder(args, folder, ckpt, ckpt_path, run_config, setup)
    torch.manual_seed(args.seed)  # same seed on every rank: identical initial weights before sharding

    # -------------------------------------------------------------------------
    # data
    train_tokens, val_tokens = load_data(args, setup)
    # batch_size is global: each rank draws its own rows of the same global batch, so step N's batch
    # does not depend on the number of processes or micro-steps.
    train_sampler = data.BatchSampler(train_tokens, args.batch_size, args.seq_len, seed=args.seed, rank=setup.rank,
                                      world_size=setup.world)
    entropy = data.unigram_entropy(train_tokens)

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
    start_step, window, bad_steps, last_ckpt = 0, None, 0, ckpt_path
    if ckpt:
        start_step, window, bad_steps = restore(ckpt, ckpt_path, raw_model, optimizer, scaler, train_sampler, args, setup)
        log(f"resumed from {ckpt_path} at step {start_step}")
        del ckpt
    write_record = metrics_writer(folder.join("metrics.jsonl"), records, setup.master)
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
    with StopSignals() as stop:
        for step in range(start_step, max_steps + 1):  # step = optimizer updates done so far
            stopping = stop.agreed(setup)  # Ctrl-C or SIGTERM: checkpoint this step, then stop
            # Evaluate, then checkpoint, the model after `step` updates; a resumed run did both before it
            # stopped (it evaluates again only where its metrics lack the record: a resume into a new --out).
            resumed_here = step == start_step > 0
            if (step % args.eval_interval == 0 or step == max_steps) and not (
                    resumed_here and any(r["step"] == step and "val_loss" in r for r in records)):
                val_loss = estimate_val_loss(model, val_tokens, args, setup)
                write_record({"step": step, "val_loss": val_loss})
                log(f"step {step}: val loss {val_loss:.4f}")
            if step > 0 and not resumed_here and (step % args.ckpt_interval == 0 or step == max_steps or stopping):
                model_state, optim_state = gather_training_state(raw_model, optimizer, args, setup)
                if setup.master:
                    with stop.deferred():
                        last_ckpt = save_checkpoint(
                            {"step": step, "model": model_state, "optimizer": optim_state,
                             "optimizer_per_rank": args.fsdp, "scaler": scaler.state_dict(),
                             "sampler": train_sampler.state_dict(), "rng": rng_state(),
                             "window": to_cpu(window), "bad_steps": bad_steps, "config": run_config},
                            folder, args.keep_ckpts)
            if step == max_steps or stopping:
                break

            lr = lr_at(step, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, grad_norm = forward_backward(model, raw_model, train_sampler.next(), optimizer, scaler, args, setup)
            # One host sync per step: every rank must agree on skipping, and this is where they learn it.
            finite = bool(torch.isfinite(loss) & torch.isfinite(grad_norm))
            if finite:
                scaler.step(optimizer)  # Muon/AdamW update, then QK-Clip on heads whose max logit > tau
                # the step's (layers, heads) max logits over all micro-batches and ranks, measured
                # before the clip; the optimizer reduces and resets them (also with QK-Clip off)
                stats = optimizer.clip_stats
                imbalance = raw_model.update_router_bias_(args.router_bias_speed)  # loads summed over ranks
                window["max_logits"] = torch.maximum(window["max_logits"], stats["max_logits"].amax(dim=1))
                window["heads_clipped"] += stats["heads_clipped"]
                bad_steps = 0
            else:
                # Drop this step's statistics with its gradient: they were measured on a diverging model.
                raw_model.reset_step_statistics_()
                bad_steps += 1
                write_record({"step": step + 1, "skipped": "non-finite loss or gradient",
                              "loss": loss.item(), "grad_norm": grad_norm.item()})
                log(f"step {step + 1}: non-finite loss {loss.item()} / grad norm {grad_norm.item()}, update skipped")
                if bad_steps >= args.max_bad_steps:
                    fail(f"stopping: {bad_steps} non-finite steps in a row up to step {step + 1} "
                         f"(lower --lr, or use --dtype float32)")
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            steps_timed += 1

            if finite and ((step + 1) % args.log_interval == 0 or step + 1 == max_steps):
                now = time.perf_counter()
                tokens_per_s = tokens_per_step * steps_timed / (now - t_log)
                record = {"step": step + 1, "loss": loss.item(), "lr": lr, "grad_norm": grad_norm.item(),
                          "max_logit": window["max_logits"].max().item(),
                          "max_logit_per_layer": window["max_logits"].tolist(),
                          "heads_clipped": window["heads_clipped"].item(),
                          "load_imbalance": imbalance.max().item() if len(gates) else 1.0,
                          "tokens": (step + 1) * tokens_per_step,
                          # timing: differs from run to run, unlike everything above
                          "tokens_per_s": tokens_per_s, "mfu": flops_per_tok * tokens_per_s / (peak_flops * setup.world),
                          "elapsed_s": now - t_start}
                write_record(record)
                log(progress_line(record, max_steps, eta=(now - t_start) / (step + 1 - start_step) * (max_steps - step - 1)))
                window = new_window(len(attention), setup.device)
                t_log, steps_timed = now, 0

    # -------------------------------------------------------------------------
    # cleanup: export, sample, plot, baseline; or, after a signal, how to continue
    if stopping:
        by = signal.Signals(stop.received).name if stop.received else "a signal to another rank"
        log(f"stopped by {by} after step {step}" +
            (f", checkpointed; continue with: {resume_command(setup.world, last_ckpt)}" if step > 0 else ", before any update"))
    else:
        final_state = get_model_state_dict(raw_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if setup.master:
            export_and_sample(final_state, config, folder, args.sample_tokens, val_tokens, log)
            folder.claim("plot.png")
            plot_metrics(records, tau, folder.join("plot.png"))
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
        raise SystemExit(INTERRUPTED)
    return val_loss


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # before the loop (nothing trained yet to save) or a second Ctrl-C
        print("train.py: interrupted", file=sys.stderr)
        raise SystemExit(INTERRUPTED) from None
    except OSError as e:  # a file the run needs could not be written or read: name it, no traceback
        if e.filename is None:
            raise
        fail(f"{e.filename}: {e.strerror}")
