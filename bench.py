"""Benchmarks of kimik2 against its peers, measured in one run on one machine, reported as ratios.

What it measures (each figure the median over --reps repetitions after --warmup, and every A/B pair
timed round-robin, A B A B ..., so that load from other processes hits both sides alike):
  1. training step (forward, backward, optimizer step) tokens/s on `tiny`: kimik2 + MuonClip against
     transformers' DeepseekV3ForCausalLM built from kimik2's own save_pretrained (same config, same
     weights, checked to give the same logits) + torch.optim.Muon / torch.optim.AdamW
  2. optimizer step time: MuonClip against torch.optim.Muon + torch.optim.AdamW on kimik2's parameters
  3. exact max-logit tracking: training step with MLA.track_max_logits True against False
  4. bfloat16 autocast against float32 on the CPU (and whether the CPU has bf16 instructions)
  5. MFU: training FLOPs/s over the float32 (and bfloat16) torch.mm peak measured in this run
     and what bounds 4 and 5 on tiny, measured: the matmul share of tiny's step (torch.profiler),
     and the same training step at WIDE (hidden 512, 2 layers), where the matrices are wide enough
     for the matmul units, fp32 against bf16 and its MFU
  6. peak memory of a training step (VmHWM of a fresh subprocess, or CUDA max_memory_allocated)
  7. decoding at a long context: the absorbed latent cache (model.generate's path) against a full
     per-head K/V cache, tokens/s and cache bytes per token
  9. MuonClip's optimizer step with its default Newton-Schulz precision (muonclip.default_ns_dtype)
     against float32 and bf16 given explicitly
  10. Newton-Schulz variants (Keller Jordan's quintic, Polar Express, Gram Newton-Schulz) on K2's
     matrix shapes / 16: time, and the worst max |sigma - 1| of the output against an SVD
  11. the optimizer step of `tiny` under torchrun --nproc_per_node 2 (DDP, FSDP2; one thread per
     process) against the same model's 1-process step: the work shared out (muonclip_dist.py: under
     DDP each process updates its share, ZeRO-1; under FSDP2 each Newton-Schulz unit on one process)
     beside every process orthogonalising everything (MuonClip(distribute=False)); and the step's
     phases on 1 and 2 processes (momentum and update, Newton-Schulz, exchange, AdamW, QK-Clip, the rest)
  12. (--ns-variant-losses) the default training run's losses with each Newton-Schulz variant
  13. (python bench.py rephrase) data.py's rephrasing pairs/s by concurrency against a fake server
  On CUDA also: the `small` preset's bf16 training MFU against the GPU's measured bf16 matmul peak.
  Every MuonClip here uses train.py's Newton-Schulz precision (printed in the header).

What runs where. The rows are chosen from what the machine has (rows_to_skip; the header prints the
choice): on a CPU without bf16 instructions (no avx512_bf16 or amx_bf16) bf16 matmul is emulated,
10-20x slower than fp32, so every CPU bf16 measurement (row 4, row 5's bf16 peak and MFU, the bounds'
bf16 steps, row 9's and row 10's bf16) is skipped with that reason rather than timing the emulation;
row 1 needs transformers, the CUDA row a GPU. Each timed comparison stops starting repetitions once
it has run --budget seconds (after one warm-up and one timed round), so a slow or busy machine gets
fewer repetitions rather than a longer wait. Every row is printed as soon as it is measured, with the
seconds it took, and a long one prints progress lines on stderr; with --json the rows go to stderr
and the JSON object (with each row's seconds) comes at the end on stdout.

The reference optimizer. torch.optim.Muon takes only 2-D parameters; a stack of E expert matrices
enters it as E leaf 2-D views that share the stack's storage (transformers' fused gate_up_proj
(E, 2I, D) as 2E views, its gate and up halves, so each matrix is orthogonalised on its own exactly as
MuonClip does), with gradients that are views of the stack's gradient. Embeddings, the output head and
vectors go to AdamW (foreach), as in muonclip.split_params. Both sides use the same lr, weight decay,
momentum 0.95 with Nesterov, and Moonlight's 0.2*sqrt(max(A, B)) update scale.

MFU convention: the peak is train.measure_peak_flops, the one train.py divides by: the fastest of
several timings of square matmuls (n = 512, 1024, 2048 on a CPU), measured in this run;
FLOPs per training token = kimik2.flops_per_token(training=True): 3x the forward's
2 FLOPs per multiply-add of the activated matmul weights plus naive-MLA attention over the average
causal context (T+1)/2; elementwise work is not counted. Time is the whole step, optimizer included.

    python bench.py                 the table (docs/performance.md: how long, on which machines)
    python bench.py --json          one JSON object (the rows stream to stderr meanwhile)
    python bench.py --reps 5 --warmup 1 --decode-context 1024   quicker, noisier
    python bench.py --ns-variant-losses 100   row 12 alone: train.py cut to 100 steps with each
                                    Newton-Schulz variant (one thread), the logged losses
    python bench.py rephrase        row 13 alone: data.py's rephrasing pairs/s by concurrency against a fake
                                    OpenAI-compatible server on 127.0.0.1 (python bench.py rephrase --help)
    python bench.py --distributed   row 11 alone: the optimizer step on 1 and 2 processes and its phases
    python bench.py --threads-study row 8 alone: train.py's step with 1 thread, 2 threads, and 2 threads
                                    waiting passively (OMP_WAIT_POLICY=PASSIVE, train.py's default), each
                                    alone and beside a busy 2-thread process that the bench starts
"""
import os

# as train.py (see its note; row 8 measures why): OpenMP threads wait passively, unless the environment says otherwise
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import collections
import contextlib
import datetime
import functools
import http.server
import itertools
import json
import multiprocessing
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

import data
from kimik2 import Config, KimiK2
from muonclip import NS_VARIANTS, MuonClip, default_ns_dtype, newton_schulz, split_params
from train import build_optimizer, measure_peak_flops, parse_args as parse_train_args

# Targets for the 2-core CPU (ratios within one run)
TARGETS = {
    "train_speedup_vs_transformers": (">=", 1.5),
    "optimizer_time_ratio_vs_torch": ("<=", 0.5),
    "tracking_overhead": ("<=", 0.10),
    "bf16_speedup": (">=", 1.3),
    "mfu_fp32_tiny": (">", 0.40),
}
LR, WEIGHT_DECAY = 1e-2, 0.1  # train.py's defaults for tiny


# ----------------------------------------------------------------------------------------------
# Timing

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def race(fns: dict, reps: int, warmup: int, device=torch.device("cpu"), budget_s=None, label=None) -> dict:
    """Median seconds per call of each fn, timed round-robin (A B A B ...) after `warmup` rounds (a
    fn that returns a float reports its own seconds: the time of work done in another process).
    With budget_s, no round starts once the rounds so far took that long, except one warm-up round
    (if any) and one timed round: a slow or busy machine gets fewer repetitions, not a longer wait.
    With label, a progress line (stderr) every PROGRESS_S seconds."""
    times = {name: [] for name in fns}
    start = last_note = time.perf_counter()
    warm = timed = 0
    while timed < reps:
        warming = warm < warmup
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            took = fn()                            # a float: the seconds fn measured itself (elsewhere)
            _sync(device)
            if not warming:
                times[name].append(took if isinstance(took, float) else time.perf_counter() - t0)
        warm, timed = (warm + 1, timed) if warming else (warm, timed + 1)
        now = time.perf_counter()
        if budget_s is not None and now - start > budget_s:
            if timed:
                break
            warm = warmup                          # past the budget while warming up: one timed round
        if label and now - last_note > PROGRESS_S and timed < reps:
            progress(f"{label}: {warm} warm-up and {timed} timed rounds of {warmup} + {reps}, {now - start:.0f} s")
            last_note = now
    return {name: statistics.median(ts) for name, ts in times.items()}


PROGRESS_S = 10.0  # seconds between progress lines of a long measurement


def progress(text):
    """A progress line on stderr (the table or the JSON object stays on stdout)."""
    print(f"... {text}", file=sys.stderr, flush=True)


def cpu_bf16_flags():
    """The bf16 instruction-set flags this x86 CPU reports (AVX512-BF16 dot products, AMX tiles), or
    None where /proc/cpuinfo has no x86 flags to read (macOS, ARM)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(re.search(r"^flags\s*:(.*)$", f.read(), re.M)[1].split())
    except (OSError, TypeError):
        return None
    return sorted(flags & {"avx512_bf16", "amx_bf16"})


def bf16_support() -> tuple:
    """(whether this CPU multiplies bf16 natively, how that was judged). Without bf16 instructions a
    bf16 matmul is emulated (a 12x128x128 bmm: 65 ms against 3.3 ms in fp32 on an AVX2 EPYC), so a
    bf16 row would time the emulation. Where there are no x86 flags, judged as muonclip judges its
    Newton-Schulz precision: by timing bf16 against fp32 matmul once."""
    flags = cpu_bf16_flags()
    if flags is None:
        fast = default_ns_dtype("cpu") == torch.bfloat16
        return fast, f"bf16 matmul {'faster' if fast else 'not faster'} than fp32 when timed"
    return bool(flags), ", ".join(flags) if flags else "no avx512_bf16 or amx_bf16 instructions"


def rows_to_skip(bf16_native: bool, bf16_how: str, cuda: bool, transformers_version) -> dict:
    """Why each optional part of the bench is skipped on this machine (None: it runs). "bf16" covers
    every CPU bf16 measurement: row 4's autocast step, row 5's bf16 matmul peak and MFU, the bounds'
    bf16 steps at tiny and at hidden 512, row 9's bf16 Newton-Schulz and row 10's bf16 variants."""
    return dict(
        transformers=None if transformers_version else "transformers is not installed",
        bf16=None if bf16_native else f"bf16 on this CPU would time an emulation ({bf16_how})",
        cuda=None if cuda else "no CUDA device")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return re.search(r"^model name\s*:\s*(.*)$", f.read(), re.M)[1]
    except (OSError, TypeError):
        return platform.processor() or "unknown CPU"


# ----------------------------------------------------------------------------------------------
# Models, batches, optimizers

def build_kimik2(preset: str, seed: int = 0, device="cpu") -> KimiK2:
    torch.manual_seed(seed)
    return KimiK2(Config.from_preset(preset)).to(device)


def make_batch(config: Config, batch: int, seq_len: int, device="cpu", seed: int = 1):
    """Random tokens (B, T+1) split into inputs and next-token targets, each (B, T)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (batch, seq_len + 1), generator=g)
    return tokens[:, :-1].to(device), tokens[:, 1:].to(device)


def build_transformers_twin(model: KimiK2):
    """transformers' DeepseekV3ForCausalLM from kimik2's hub export: same config, same weights."""
    from transformers import DeepseekV3ForCausalLM
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        twin = DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.float32)
    x, _ = make_batch(model.config, 2, 32)
    model.eval(), twin.eval()
    with torch.no_grad():
        ours, theirs = model(x)[0], twin(x).logits
    if not torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4):
        raise RuntimeError(f"transformers twin disagrees: max |dlogits| {(ours - theirs).abs().max():.2e}")
    model.train(), twin.train()
    return twin


class ReferenceOptimizer:
    """torch.optim.Muon on the hidden matrices + torch.optim.AdamW (foreach) on the rest.

    matrices: (parameter, row_blocks) pairs; a 3-D (E, A, B) stack enters Muon as E * row_blocks leaf
    2-D views sharing its storage (row_blocks=2 splits transformers' fused gate_up_proj into gate and
    up); before each step their .grad are set to the matching views of the stack's gradient."""

    def __init__(self, matrices, others, lr=LR, weight_decay=WEIGHT_DECAY):
        self.params = [p for p, _ in matrices] + list(others)
        self.views = []  # (stack, index, row slice, 2-D leaf view)
        muon_params = []
        for p, row_blocks in matrices:
            if p.ndim == 2:
                muon_params.append(p)
                continue
            rows = p.shape[1] // row_blocks
            for e in range(p.shape[0]):
                for b in range(row_blocks):
                    view = p.detach()[e, b * rows:(b + 1) * rows].requires_grad_()
                    self.views.append((p, e, slice(b * rows, (b + 1) * rows), view))
                    muon_params.append(view)
        self.muon = torch.optim.Muon(muon_params, lr=lr, weight_decay=weight_decay, momentum=0.95,
                                     nesterov=True, adjust_lr_fn="match_rms_adamw")
        self.adamw = torch.optim.AdamW(others, lr=lr, betas=(0.9, 0.95), eps=1e-8,
                                       weight_decay=weight_decay, foreach=True)

    def step(self):
        for p, e, rows, view in self.views:
            view.grad = p.grad[e, rows]
        self.muon.step()
        self.adamw.step()

    def zero_grad(self):
        for p in self.params:
            p.grad = None
        for *_, view in self.views:
            view.grad = None


def reference_for_kimik2(model: KimiK2) -> ReferenceOptimizer:
    """The reference on kimik2's parameters, split by the same roles as MuonClip's."""
    muon, adamw = split_params(model)
    return ReferenceOptimizer([(p, 1) for p in muon], adamw)


def reference_for_transformers(twin) -> ReferenceOptimizer:
    """The reference on transformers' parameters, roles from split_params; its fused expert
    gate_up_proj (E, 2I, D) enters as gate and up halves."""
    muon, adamw = split_params(twin)
    fused = {id(p) for name, p in twin.named_parameters() if name.endswith("gate_up_proj")}
    return ReferenceOptimizer([(p, 2 if id(p) in fused else 1) for p in muon], adamw)


def muonclip_for(model: KimiK2, **kw) -> MuonClip:
    """MuonClip as train.py makes it (lr, weight decay, Newton-Schulz precision), kw overriding."""
    ns_dtype = train_ns_dtype(next(model.parameters()).device)
    return MuonClip.for_model(model, lr=LR, weight_decay=WEIGHT_DECAY, **{"ns_dtype": ns_dtype, **kw})


def train_step_fn(model, opt, x, y, autocast_dtype=None, transformers_model=False):
    """One forward + backward + optimizer step (opt None: forward + backward only). The loss is the
    same fp32 cross entropy on both models (transformers' own labels path would shift the targets a
    second time)."""
    device_type = x.device.type
    autocast = (torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype
                else contextlib.nullcontext())

    def step():
        with autocast:
            if transformers_model:
                logits = model(x).logits
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            else:
                loss = model(x, y)[1]
        loss.backward()
        if opt is None:
            model.zero_grad(set_to_none=True)
        else:
            opt.step()
            opt.zero_grad()
    return step


def step_with_grads(opt, grads: dict):
    """An optimizer step on fixed gradients {parameter: gradient}, set afresh before each step."""
    def step():
        for p, g in grads.items():
            p.grad = g
        opt.step()
    return step


def set_tracking(model: KimiK2, on: bool):
    for attn in model.attention_modules():
        attn.track_max_logits = on


# ----------------------------------------------------------------------------------------------
# 7. Decoding: absorbed latent cache against a full per-head K/V cache

class Decoder:
    """Greedy decoding state on one of MLA's two caches (kimik2's naive/absorbed pair): the
    absorbed latent cache, C + Dr numbers per token and layer (what model.generate runs), or with
    naive=True every head's K and V, H * (Dn+Dr + Dv) per token and layer."""

    def __init__(self, model: KimiK2, batch: int, max_len: int, naive: bool):
        self.model = model
        self.caches = model.new_caches(batch, max_len, naive=naive)

    def nbytes(self) -> int:
        tensors = [t for c in self.caches for t in (c if isinstance(c, tuple) else (c,))]
        return sum(t.numel() * t.element_size() for t in tensors)

    @torch.no_grad()
    def __call__(self, ids, start: int):
        """ids (B, T) at positions start.. -> logits of the last position (B, V)."""
        return self.model(ids, caches=self.caches, start_pos=start)[0][:, -1]


def bench_decode(model: KimiK2, context: int, new_tokens: int, reps: int, budget_s=None) -> dict:
    """Greedy decoding of new_tokens after a random prompt of `context` tokens, batch 1; the timed
    part is the decoding (the prefill is not timed). Both caches must produce the same tokens. No
    repetition starts past budget_s seconds."""
    model.eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(2))
    max_len = context + new_tokens
    out, times, start = {}, {"absorbed": [], "full": []}, time.perf_counter()
    for _ in range(reps):
        if times["full"] and budget_s is not None and time.perf_counter() - start > budget_s:
            break
        for name in ("absorbed", "full"):
            cache = Decoder(model, 1, max_len, naive=name == "full")
            ids, tokens = cache(prompt, 0).argmax(-1, keepdim=True), []
            t0 = time.perf_counter()
            for pos in range(context, max_len):
                tokens.append(ids)
                ids = cache(ids, pos).argmax(-1, keepdim=True)
            times[name].append(time.perf_counter() - t0)
            out[name] = dict(tokens=torch.cat(tokens, 1), cache_bytes_per_token=cache.nbytes() / max_len)
    generated = model.generate(prompt, new_tokens, temperature=0)[:, context:]
    if not (torch.equal(out["absorbed"]["tokens"], generated) and torch.equal(out["full"]["tokens"], generated)):
        raise RuntimeError("decoders disagree with model.generate's greedy tokens")
    model.train()
    return {name: dict(tokens_per_s=new_tokens / statistics.median(times[name]),
                       cache_bytes_per_token=out[name]["cache_bytes_per_token"]) for name in times}


# ----------------------------------------------------------------------------------------------
# What bounds bf16's gain and MFU on tiny: the matmul share of a step, and a wider model

# tiny with hidden 512 (4x) and its attention and expert widths scaled alike, 2 layers (one dense,
# one MoE), so that one step takes about a second: matrices wide enough for the matmul units
WIDE = dict(hidden_size=512, intermediate_size=1536, moe_intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=8, q_lora_rank=256, kv_lora_rank=128,
            qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64)
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm"}


def matmul_share(step, steps: int = 2) -> float:
    """Fraction of a step's CPU time spent inside matmul kernels (torch.profiler self time). The
    profiler's per-op overhead makes the share a slight underestimate for steps of many small ops."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS) / total


def bench_bounds(steps: dict, seconds: dict, flops_per_token, peaks, args) -> dict:
    """tiny: the matmul share of its fp32 (and bf16) steps. With the non-matmul time as it is, bf16
    can speed a step up by at most fp32 step / fp32 non-matmul time, and MFU is at most MFU / share
    (MuonClip's Newton-Schulz matmuls count as matmul time but not as model FLOPs, so both bounds
    are generous); MFU's target needs the non-matmul time down to matmul time * (bound / target - 1).
    wide: the same training step (and forward + backward alone) at WIDE, fp32 (and bf16). `steps`
    and `peaks` hold "bf16" only where bf16 runs (rows_to_skip)."""
    share = {dtype: matmul_share(step) for dtype, step in steps.items()}
    matmul_s, other_s = seconds["fp32"] * share["fp32"], seconds["fp32"] * (1 - share["fp32"])
    mfu_bound = flops_per_token * args.batch_size * args.seq_len / matmul_s / peaks["fp32"]
    tiny = dict(matmul_share_fp32=share["fp32"], matmul_share_bf16=share.get("bf16"),
                bf16_speedup_bound=seconds["fp32"] / other_s, mfu_fp32_bound=mfu_bound,
                non_matmul_ms=other_s * 1e3,
                non_matmul_ms_for_mfu_target=max(0.0, matmul_s * (mfu_bound / TARGETS["mfu_fp32_tiny"][1] - 1)) * 1e3)
    config = Config(**{**Config.from_preset(args.preset).to_dict(), **WIDE})
    torch.manual_seed(0)
    model = KimiK2(config)
    x, y = make_batch(config, args.batch_size, args.seq_len)
    opt = muonclip_for(model)
    fns = {"fp32": train_step_fn(model, opt, x, y), "fp32 fwd+bwd": train_step_fn(model, None, x, y)}
    if "bf16" in steps:
        fns.update({"bf16": train_step_fn(model, opt, x, y, autocast_dtype=torch.bfloat16),
                    "bf16 fwd+bwd": train_step_fn(model, None, x, y, autocast_dtype=torch.bfloat16)})
    t = race(fns, reps=max(1, args.reps // 2), warmup=args.warmup, budget_s=args.budget, label="hidden 512 steps")
    flops = model.estimate_flops_per_token(args.seq_len) * x.numel()
    wide = dict(config=WIDE, fp32_ms=t["fp32"] * 1e3, fwd_bwd_fp32_ms=t["fp32 fwd+bwd"] * 1e3,
                mfu_fp32=flops / t["fp32"] / peaks["fp32"], mfu_fp32_fwd_bwd=flops / t["fp32 fwd+bwd"] / peaks["fp32"])
    if "bf16" in steps:
        wide.update(bf16_ms=t["bf16"] * 1e3, fwd_bwd_bf16_ms=t["bf16 fwd+bwd"] * 1e3,
                    bf16_speedup=t["fp32"] / t["bf16"], fwd_bwd_bf16_speedup=t["fp32 fwd+bwd"] / t["bf16 fwd+bwd"],
                    mfu_bf16=flops / t["bf16"] / peaks["bf16"])
    return dict(tiny=tiny, wide=wide)


# ----------------------------------------------------------------------------------------------
# 6. Peak memory of a training step, in a fresh process

def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+)", f.read(), re.M)[1])


def memory_worker(which: str, preset: str, batch: int, seq_len: int, steps: int = 3) -> dict:
    """Run in a subprocess: one warm-up step (allocates optimizer state), then per step reset the
    high-water mark (Linux: write 5 to /proc/self/clear_refs) and take the step's peak above the
    resident set before it; the median over `steps`. On CUDA: torch.cuda.max_memory_allocated alike."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_kimik2(preset, device=device)
    x, y = make_batch(model.config, batch, seq_len, device)
    if which == "transformers":
        model = build_transformers_twin(model.cpu()).to(device)
        step = train_step_fn(model, reference_for_transformers(model), x, y, transformers_model=True)
    else:
        step = train_step_fn(model, muonclip_for(model), x, y)
    step()
    peaks, bases = [], []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
            bases.append(torch.cuda.memory_allocated())
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated())
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            bases.append(_proc_status_kib("VmRSS") * 1024)
            step()
            peaks.append(_proc_status_kib("VmHWM") * 1024)
    return dict(peak_bytes=statistics.median(peaks),
                step_bytes=statistics.median(p - b for p, b in zip(peaks, bases)),
                how="torch.cuda.max_memory_allocated" if device.type == "cuda" else "VmHWM (fresh process)")


def bench_memory(which: str, preset: str, batch: int, seq_len: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-worker", which, "--preset", preset,
           "--batch-size", str(batch), "--seq-len", str(seq_len)]
    # glibc keeps freed heap memory resident, so VmRSS before a step would depend on what ran
    # earlier; with every allocation >= 64 KiB served by mmap, a freed tensor leaves the resident
    # set at once and the step's peak above its start repeats to within a percent
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    if done.returncode:
        raise RuntimeError(f"memory worker failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# CUDA: the small preset in bf16

def bench_cuda_small(args) -> dict:
    device = torch.device("cuda")
    model = build_kimik2("small", device=device)
    x, y = make_batch(model.config, args.cuda_batch_size, args.seq_len_cuda, device)
    step = train_step_fn(model, muonclip_for(model), x, y, autocast_dtype=torch.bfloat16)
    seconds = race({"step": step}, reps=args.reps, warmup=args.warmup, device=device)["step"]
    tokens_per_s = x.numel() / seconds
    peak = measure_peak_flops(torch.bfloat16, device)
    flops = model.estimate_flops_per_token(x.shape[1])
    return dict(gpu=torch.cuda.get_device_name(), batch=list(x.shape), tokens_per_s=tokens_per_s,
                bf16_peak_flops=peak, mfu=tokens_per_s * flops / peak)


# ----------------------------------------------------------------------------------------------
# 8. Threads and the OpenMP wait policy, on a quiet machine and beside a busy one

# Each setting is applied in a fresh process: OpenMP reads its environment once, when torch loads.
THREAD_SETTINGS = {
    "1 thread": {"OMP_NUM_THREADS": "1"},
    "2 threads": {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "ACTIVE"},
    "2 threads, passive wait": {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"},
}
BUSY_PROCESS = ("import torch; torch.set_num_threads(2); a = torch.ones(512, 512)\n"
                "while True: a @ a")  # another job on the machine: a 2-thread torch matmul loop


def _default_wait_policy() -> dict:
    """This environment without OMP_WAIT_POLICY: OpenMP's default, as another user's process has."""
    return {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}


def start_busy_process() -> subprocess.Popen:
    """BUSY_PROCESS as another user would run it: OpenMP's default wait policy, not this file's."""
    return subprocess.Popen([sys.executable, "-c", BUSY_PROCESS], env=_default_wait_policy())


def step_worker(preset: str, batch: int, seq_len: int, reps: int, budget_s: float = 30.0) -> dict:
    """Run in a subprocess: train.py's step (tiny, MuonClip, fp32) timed `reps` times after one
    warm-up step, or as many as fit in budget_s; the median and the fastest step."""
    model = build_kimik2(preset)
    x, y = make_batch(model.config, batch, seq_len)
    step = train_step_fn(model, muonclip_for(model), x, y)
    step()
    times, t_end = [], time.perf_counter() + budget_s
    while len(times) < reps and (len(times) < 2 or time.perf_counter() < t_end):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return dict(median_ms=statistics.median(times) * 1e3, best_ms=min(times) * 1e3, steps=len(times),
                threads=torch.get_num_threads())


def bench_threads(args) -> dict:
    """The training step under each of THREAD_SETTINGS, alone and beside BUSY_PROCESS, settings
    interleaved (A B C A B C) so drifting load from elsewhere hits them alike; per setting the
    median over rounds of each round's median step time."""
    def worker(env):
        cmd = [sys.executable, os.path.abspath(__file__), "--step-worker", "--preset", args.preset,
               "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--reps", str(args.reps)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **env})
        if done.returncode:
            raise RuntimeError(f"step worker failed: {done.stderr[-2000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    res = dict(torch=torch.__version__, cores=os.cpu_count(), preset=args.preset,
               batch=[args.batch_size, args.seq_len], load_average_at_start=os.getloadavg())
    for condition in ("quiet", "busy"):
        busy = start_busy_process() if condition == "busy" else None
        try:
            rounds = {name: [] for name in THREAD_SETTINGS}
            for _ in range(args.rounds):
                for name, env in THREAD_SETTINGS.items():
                    rounds[name].append(worker(env)["median_ms"])
        finally:
            if busy:
                busy.kill()
                busy.wait()
        res[condition] = {name: statistics.median(ms) for name, ms in rounds.items()}
    res["load_average_at_end"] = os.getloadavg()
    return res


def print_threads(res):
    print(f"train step ({res['preset']}, batch {res['batch'][0]} x {res['batch'][1]}, MuonClip, fp32), torch "
          f"{res['torch']}, {res['cores']} cores; load average (1, 5, 15 min) "
          f"{', '.join(f'{x:.1f}' for x in res['load_average_at_start'])} at start, "
          f"{', '.join(f'{x:.1f}' for x in res['load_average_at_end'])} at end")
    print(f"{'setting':26s} {'quiet ms':>9s} {'busy ms':>9s} {'busy/quiet':>11s} {'quiet/best':>11s} {'busy/best':>10s}")
    best = {c: min(res[c].values()) for c in ("quiet", "busy")}
    for name in THREAD_SETTINGS:
        q, b = res["quiet"][name], res["busy"][name]
        print(f"{name:26s} {q:9.0f} {b:9.0f} {b / q:11.2f} {q / best['quiet']:11.2f} {b / best['busy']:10.2f}")


# ----------------------------------------------------------------------------------------------
# 9-11. MuonClip at scale: Newton-Schulz precision, variants, and the step under torchrun

@functools.lru_cache(maxsize=None)
def train_ns_dtype(device=torch.device("cpu")) -> torch.dtype:
    """The Newton-Schulz precision of train.py's optimizer on this device (read off the optimizer
    train.build_optimizer makes, so the bench times what train.py runs)."""
    opt = build_optimizer(parse_train_args([]), torch.nn.Linear(4, 4), None, types.SimpleNamespace(device=device))
    return opt.param_groups[0]["ns_dtype"] or default_ns_dtype(device.type)


def bench_ns_precision(model, grads, reps, warmup, with_bf16, budget_s=None) -> dict:
    """Row 9: MuonClip.for_model's default Newton-Schulz precision against float32 (and bf16, where
    bf16 runs) given explicitly, one optimizer step each on the same parameters and gradients, round-robin."""
    dtypes = {"default": None, "float32": torch.float32, **({"bfloat16": torch.bfloat16} if with_bf16 else {})}
    opts = {name: muonclip_for(model, ns_dtype=dtype) for name, dtype in dtypes.items()}
    t = race({name: step_with_grads(opt, grads) for name, opt in opts.items()}, reps, warmup, budget_s=budget_s)
    return dict(default_dtype=str(default_ns_dtype("cpu")).removeprefix("torch."),
                **{f"{name}_ms": s * 1e3 for name, s in t.items()})


# K2's Muon matrices (hidden 7168, q LoRA 1536, kv LoRA 512, 64 heads of 128 + 64 / 128, expert width
# 2048, dense width 18432) with every dim / 16, as (count, A, B): the shapes one K2 layer orthogonalises
K2_SHAPES_16 = {"q_a_proj": (1, 96, 448), "q_b_proj": (1, 768, 96), "kv_a_proj": (1, 36, 448),
                "kv_b_proj": (1, 1024, 32), "o_proj": (1, 448, 512), "expert gate/up": (16, 128, 448),
                "expert down": (16, 448, 128), "dense up": (1, 1152, 448)}


def bench_ns_variants(dtype, reps, budget_s=None) -> dict:
    """Row 10: each newton_schulz variant on K2_SHAPES_16: median time of orthogonalising every shape
    once (one batched call per shape) and the worst max |sigma - 1| over the shapes, sigma the
    singular values (SVD in float64) of the output, for inputs whose singular values spread
    log-uniformly over [1e-3, 1] (a gradient's spectrum decays over orders of magnitude)."""
    gen = torch.Generator().manual_seed(0)
    inputs = []
    for count, a, b in K2_SHAPES_16.values():
        k = min(a, b)
        u, _ = torch.linalg.qr(torch.randn(count, a, k, generator=gen))
        v, _ = torch.linalg.qr(torch.randn(count, b, k, generator=gen))
        s = torch.logspace(-3, 0, k)[torch.randperm(k, generator=gen)]
        inputs.append(u @ torch.diag_embed(s.expand(count, k)) @ v.mT)
    out = {}
    fns = {v: (lambda v=v: [newton_schulz(g, dtype=dtype, variant=v) for g in inputs]) for v in NS_VARIANTS}
    t = race(fns, reps, 1, budget_s=budget_s, label=f"Newton-Schulz variants in {dtype}")
    for variant in NS_VARIANTS:
        error = max((torch.linalg.svdvals(newton_schulz(g, dtype=dtype, variant=variant).double()) - 1).abs().max().item()
                    for g in inputs)
        out[variant] = dict(ms=t[variant] * 1e3, max_sigma_error=error)
    return out


class PhaseTimer:
    """Exclusive seconds per phase of MuonClip's step, by wrapping the functions that do each phase
    (PHASES): a wrapped call's time less that of the wrapped calls inside it. What no phase covers
    (Python, DTensor and state bookkeeping, index copies) is the step's time less their sum."""

    def __init__(self):
        self.seconds, self.stack, self.on = collections.defaultdict(float), [], False

    def wrap(self, phase, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if not self.on:
                return fn(*args, **kwargs)
            start = time.perf_counter()
            self.stack.append(0.0)
            try:
                return fn(*args, **kwargs)
            finally:
                inner, spent = self.stack.pop(), time.perf_counter() - start
                self.seconds[phase] += spent - inner
                if self.stack:
                    self.stack[-1] += spent
        return timed

    def install(self):
        """Wrap PHASES' functions where they are looked up at call time (module globals, class attributes)."""
        import importlib
        for module, name, phase in PHASES:
            try:
                owner = importlib.import_module(module)
            except ImportError:                        # muonclip_dist.py absent: no exchange to time
                continue
            *path, attr = name.split(".")
            for part in path:
                owner = getattr(owner, part)
            if hasattr(owner, attr):
                setattr(owner, attr, self.wrap(phase, getattr(owner, attr)))


# (module, function, phase), muonclip's first (muonclip_dist, imported here after them, takes the wrapped
# muon_update from muonclip): muon_update's own time is the momentum, weight decay and update (Newton-
# Schulz and any exchange inside it are timed as theirs); the exchange is the all-to-alls and the
# packing around them (FSDP2: the units' rows to their owners and the results back; DDP: the updated
# weights every other process sent)
PHASES = [("muonclip", "muon_update", "momentum and update"), ("muonclip", "newton_schulz", "Newton-Schulz"),
          ("muonclip_dist", "_exchange", "exchange"), ("muonclip_dist", "_ShareOut.share", "exchange"),
          ("muonclip_dist", "orthogonalise_across_ranks", "exchange"),
          ("muonclip", "MuonClip._adamw_step", "AdamW"), ("muonclip", "MuonClip._qk_clip", "QK-Clip")]
PHASE_NAMES = list(dict.fromkeys(phase for *_, phase in PHASES)) + ["bookkeeping"]


SCRATCH_FLOATS = 16 << 20  # 64 MiB, twice a large L3: written before each timed step of row 11, so every
#                            step starts with the caches as cold as a backward leaves them


def _store(port):
    return torch.distributed.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=600))


def alone_worker(port: int, preset: str, batch: int, seq_len: int):
    """Row 11's one process: `preset` stepped by MuonClip on the whole batch's gradients, one thread,
    in a process of its own (its own allocator and caches), each step when the 2-process launch's
    rank 0 asks through the launcher's TCPStore ("go{i}": "time", "phases" or "stop"), so it is
    timed in turn with the 2-process steps while their processes wait. Reports each step's wall
    and CPU ms (and with "phases" PhaseTimer's) as "done{i}"."""
    torch.set_num_threads(1)
    timer = PhaseTimer()
    timer.install()
    store = _store(port)
    model = build_kimik2(preset)
    model(*make_batch(model.config, batch, seq_len))[1].backward()
    opt, scratch = muonclip_for(model, ns_dtype=train_ns_dtype()), torch.zeros(SCRATCH_FLOATS)
    for i in itertools.count():
        store.wait([f"go{i}"])
        what = store.get(f"go{i}").decode()
        if what == "stop":
            return
        scratch.add_(1.0)
        timer.seconds.clear()
        timer.on = what == "phases"
        start, start_cpu = time.perf_counter(), time.process_time()
        opt.step()
        took, used = time.perf_counter() - start, time.process_time() - start_cpu
        timer.on = False
        phases = {p: timer.seconds[p] * 1e3 for p in PHASE_NAMES[:-1]}
        store.set(f"done{i}", json.dumps(dict(ms=took * 1e3, cpu_ms=used * 1e3,
                                              phases_ms={**phases, PHASE_NAMES[-1]: took * 1e3 - sum(phases.values())})))


def dist_worker(wrap: str, preset: str, batch: int, seq_len: int, reps: int, alone_port: int, phase_steps: int = 5):
    """Run under torchrun, one thread per process: one forward + backward of `preset` on this rank's
    share of the batch, then MuonClip steps on those gradients, timed between barriers, round-robin
    between distribute=True (each process updating its share), distribute=False (every process
    orthogonalising every unit, the way before), under DDP the floor (each share's update with
    nothing sent), and one process alone (alone_worker, asked by rank 0 while the processes here
    wait: so it is timed in turn with them; on a shared machine separate launches of it differed by
    up to 30%). Every step starts with the caches flushed, as after a backward. Then phase_steps
    more steps with PhaseTimer on, alone and distribute=True (each phase's ms per step averaged
    over the ranks), and the CPU time of each kind of step (every thread of the process: gloo's
    work shows there). Rank 0 prints the result as one JSON line; every process then exits at once
    (os._exit)."""
    torch.set_num_threads(1)
    timer = PhaseTimer()
    timer.install()                               # (before muonclip_dist imports muonclip's functions)
    import muonclip_dist
    torch.distributed.init_process_group("gloo")
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    model = raw = build_kimik2(preset)
    if wrap == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(raw, broadcast_buffers=False)
    elif wrap == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for layer in raw.model.layers:
            fully_shard(layer)
        fully_shard(raw)
    x, y = make_batch(raw.config, batch // world, seq_len)
    model(x, y)[1].backward()
    dtype = train_ns_dtype()
    opts = {"new": muonclip_for(raw, ns_dtype=dtype), "old": muonclip_for(raw, ns_dtype=dtype, distribute=False)}
    if wrap == "ddp":                             # the floor: each process's share of the update, nothing sent
        opts["floor"] = muonclip_for(raw, ns_dtype=dtype)
    store, asked = (_store(alone_port) if rank == 0 else None), itertools.count()

    def alone(what):                              # the step of the process alone, on rank 0's word
        if rank != 0:
            return None
        i = next(asked)
        store.set(f"go{i}", what)
        if what != "stop":
            store.wait([f"done{i}"])
            return json.loads(store.get(f"done{i}"))

    def step(name):                               # this rank's part of a step of opts[name]
        send = muonclip_dist._Runs.send
        if name == "floor":                       # (the weights drift apart: this optimizer is only timed)
            muonclip_dist._Runs.send = lambda runs, k: (lambda: None)
        try:
            opts[name].step()
        finally:
            muonclip_dist._Runs.send = send
    scratch = torch.zeros(SCRATCH_FLOATS)

    def timed(name):
        def run():
            scratch.add_(1.0)
            torch.distributed.barrier()
            took = step(name) if name != "alone" else alone("time")
            torch.distributed.barrier()
            return took and took["ms"] / 1e3
        return run
    t = race({name: timed(name) for name in [*opts, "alone"]}, reps, 2)
    phases, cpu = {}, {}
    for name in [name for name in ("new", "floor") if name in opts]:
        own = used = 0.0                          # this rank's step time (without the barriers), and its CPU time
        timer.seconds.clear()
        timer.on = name != "floor"
        for _ in range(phase_steps):
            scratch.add_(1.0)
            torch.distributed.barrier()
            start, start_cpu = time.perf_counter(), time.process_time()
            step(name)
            own, used = own + time.perf_counter() - start, used + time.process_time() - start_cpu
        timer.on = False
        ms = torch.tensor([timer.seconds[p] for p in PHASE_NAMES[:-1]] + [own - sum(timer.seconds.values()), used],
                          dtype=torch.float64) * 1e3 / phase_steps
        torch.distributed.all_reduce(ms)
        ms /= world
        phases[name], cpu[name] = dict(zip(PHASE_NAMES, ms[:-1].tolist())), ms[-1].item()
    if rank == 0:
        steps = [alone("phases") for _ in range(phase_steps)]
        phases["alone"] = {p: statistics.mean(s["phases_ms"][p] for s in steps) for p in PHASE_NAMES}
        cpu["alone"] = statistics.mean(s["cpu_ms"] for s in steps)
        alone("stop")
        res = dict(ns_dtype=str(dtype).removeprefix("torch."), world=world,
                   ns_matrices=opts["new"].newton_schulz_matrices, **{f"{k}_ms": v * 1e3 for k, v in t.items()},
                   phases_ms=phases["new"], alone_phases_ms=phases["alone"], cpu_ms=cpu)
        print(json.dumps(res), flush=True)
    # gloo can deadlock a process at teardown while it frees a finished collective's tensors (PyTorch
    # issue 56297), here when DDP's reducer goes: the result is out, so leave without the teardown
    os._exit(0)


def kill_tree(pid):
    """SIGKILL a process and every descendant, found by parent pid in /proc before any dies: torchrun
    starts its workers in sessions of their own, so killing the launcher's group leaves them holding
    its pipes, and communicate() would wait for good (conftest.torchrun uses it too)."""
    children = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], []))
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def bench_distributed(args) -> dict:
    """Row 11: the optimizer step of `tiny` under torchrun --nproc_per_node 2 (DDP, FSDP2; gloo, one
    thread per process) against the same model's step in one process with one thread (alone_worker,
    beside each launch and timed in turn with it)."""
    def run(cmd):
        # gloo can deadlock a worker at interpreter exit after its work is done (PyTorch issue
        # 56297): a run whose result is printed counts, the hung launcher and workers are killed
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})

    def launch(wrap):
        store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                           timeout=datetime.timedelta(seconds=600))
        shape = ["--preset", args.preset, "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
        alone = run([sys.executable, os.path.abspath(__file__), "--alone-worker", str(store.port), *shape])
        # 3x the repetitions: the steps are short, and the ratio is the noisiest figure on a shared machine
        proc = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    os.path.abspath(__file__), "--dist-worker", wrap, "--alone-port", str(store.port), *shape,
                    "--reps", str(3 * args.reps)])
        for _ in range(300):                      # at most 300 s, and no longer than the one-process worker lives:
            try:                                  # rank 0 would wait for its answer until the store's timeout
                stdout, stderr = proc.communicate(timeout=1)
                break
            except subprocess.TimeoutExpired:     # (a retried communicate() loses no output)
                if alone.poll() not in (None, 0):
                    break
        if proc.poll() is None:
            kill_tree(proc.pid)
            stdout, stderr = proc.communicate()
        kill_tree(alone.pid)                      # done ("stop"), or stuck if the launch failed
        alone_err = alone.communicate()[1]
        result = [line for line in stdout.splitlines() if line.startswith("{")]
        if not result:
            raise RuntimeError(f"distributed worker ({wrap}) failed: {stderr[-2000:]}\n"
                               f"one-process worker (exit status {alone.returncode}): {alone_err[-1000:]}")
        return json.loads(result[0])
    res = {wrap: launch(wrap) for wrap in ("ddp", "fsdp")}
    res["load_average"] = os.getloadavg()
    return res


# train.py with MuonClip's Newton-Schulz variant replaced, in a subprocess: argv[1] the variant, the rest train.py's
_TRAIN_WITH_VARIANT = """
import functools, sys, muonclip, train
init = muonclip.MuonClip.__init__
muonclip.MuonClip.__init__ = functools.partialmethod(lambda self, *a, **k: init(self, *a, **{"ns_variant": sys.argv[1], **k}))
train.main(sys.argv[2:])
"""


def bench_ns_variant_losses(steps: int) -> dict:
    """Row 12 (--ns-variant-losses STEPS): the default train.py run cut to STEPS optimizer steps with
    each Newton-Schulz variant (one thread), its logged training and validation losses."""
    out = {}
    for variant in NS_VARIANTS:
        with tempfile.TemporaryDirectory() as d:
            cmd = [sys.executable, "-c", _TRAIN_WITH_VARIANT, variant, "--max-steps", str(steps), "--out", d]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=os.path.dirname(os.path.abspath(__file__)))
            if done.returncode:
                raise RuntimeError(f"train.py with {variant} failed: {done.stderr[-2000:]}")
            with open(os.path.join(d, "metrics.jsonl")) as f:
                records = [json.loads(line) for line in f]
        out[variant] = dict(loss={r["step"]: r["loss"] for r in records if "loss" in r},
                            val_loss={r["step"]: r["val_loss"] for r in records if "val_loss" in r})
    out["load_average"] = os.getloadavg()
    return out


# ----------------------------------------------------------------------------------------------
# 13. Rephrasing throughput: data.rephrase_corpus against a fake OpenAI-compatible server
#
# The fake server is also the one the tests of data.py talk to: one server, scripted per model name.

def source_of(messages) -> str:
    """The <source> chunk of a rephrasing prompt (data.rephrase_messages)."""
    return re.search(r"<source>\n(.*)\n</source>", messages[-1]["content"], re.S)[1]


def bag_of_words(text: str) -> list:
    """The fake embedding model: word counts hashed into 64 dimensions, the fake rephraser's prefix
    ignored, so that its faithful echo scores 1 and an unrelated text about 0."""
    vector = [0.0] * 64
    for word in re.findall(r"\w+", text.removeprefix("In other words: ").lower()):
        vector[sum(map(ord, word)) % 64] += 1
    return vector


def verdict(messages, action: str) -> str:
    """The fake judge: every fact is kept when the rewrite contains the source; the actions
    "judge-text" and "judge-inconsistent" are malformed answers."""
    if action == "judge-text":
        return "Looks faithful to me."
    if action == "judge-inconsistent":
        return json.dumps({"keeps_every_fact": True, "missing": ["a fact"]})
    source = re.search(r"<source>\n(.*)\n</source>", messages[1]["content"], re.S)[1]
    keeps = source in re.search(r"<rewrite>\n(.*)\n</rewrite>", messages[1]["content"], re.S)[1]
    return json.dumps({"keeps_every_fact": keeps, "missing": [] if keeps else [f"all of: {source}"]})


class FakeChat(http.server.BaseHTTPRequestHandler):
    """A deterministic OpenAI-compatible model. /chat/completions: the <source> chunk rewritten as
    "In other words: ..." (models named "upper...": the chunk in capitals), or, asked with
    data.JUDGE_PROMPT, a verdict (`verdict`); /embeddings: `bag_of_words`. Each request holds one of
    the server's `capacity` slots for its latency (server.delay per model, else server.latency), as a
    real server's batch has room for so many sequences and the rest wait their turn.

    Per model name, server.scripts lists actions to play before echoing: "500", "429", "429-wait"
    (Retry-After: 1), "400", "hang" (1.5 s more), "drop" (no reply), "cut" (half the reply, then the
    connection closes), "badjson", "trickle" (the reply one byte per 0.3 s), "huge" (a 1 MB rewrite),
    "garbage" (an unfaithful rewrite), "empty", "surrogate" (a lone "\\ud83d" in the reply), "short"
    (too few embeddings), "judge-text", "judge-inconsistent". server.requests, .arrivals and
    .max_inflight record what came, when, and how many were in flight at once, per model."""

    def do_POST(self):
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        model = body["model"]
        with server.lock:
            server.requests.append(body)
            server.arrivals.append((model, time.monotonic()))
            server.inflight[model] += 1
            server.max_inflight[model] = max(server.max_inflight[model], server.inflight[model])
            script = server.scripts.get(model, [])
            action = script.pop(0) if script else "echo"
        try:
            with server.slots:
                time.sleep(server.delay.get(model, server.latency) + (1.5 if action == "hang" else 0.0))
            self._answer(body, action)
        finally:
            with server.lock:
                server.inflight[model] -= 1

    def _answer(self, body, action):
        if action == "drop":
            self.close_connection = True
            return
        if action in ("500", "429", "429-wait", "400"):
            payload = json.dumps({"error": {"message": f"scripted {action}"}}).encode()
            self.send_response(int(action[:3]))
            if action.startswith("429"):
                self.send_header("Retry-After", "1" if action == "429-wait" else "0")
        else:
            payload = b"{not json" if action == "badjson" else json.dumps(self._reply(body, action)).encode()
            self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if action == "cut":
            self.wfile.write(payload[:len(payload) // 2])
            self.close_connection = True
        elif action == "trickle":
            for i in range(len(payload)):
                self.wfile.write(payload[i:i + 1])
                self.wfile.flush()
                time.sleep(0.3)
        else:
            self.wfile.write(payload)

    def _reply(self, body, action):
        if self.path.endswith("/embeddings"):
            texts = body["input"][:-1] if action == "short" else body["input"]
            return {"data": [{"index": i, "embedding": bag_of_words(t)} for i, t in enumerate(texts)]}
        messages = body["messages"]
        if messages[0]["content"] == data.JUDGE_PROMPT:
            content = verdict(messages, action)
        elif body["model"].startswith("upper"):
            content = source_of(messages).upper()
        else:
            content = {"garbage": "Bananas are yellow.", "empty": "", "huge": "In other words: " + "x" * 1_000_000,
                       "surrogate": "In other words \ud83d: " + source_of(messages)
                       }.get(action, "In other words: " + source_of(messages))
        return {"choices": [{"message": {"role": "assistant", "content": content}}]}

    def log_message(self, *args):
        pass


class FakeChatServer(http.server.ThreadingHTTPServer):
    """`FakeChat` on 127.0.0.1 (a free port): `with FakeChatServer() as server:` serves it from a
    thread, at server.url."""
    daemon_threads = True
    request_queue_size = 256  # the default backlog of 5 drops connections under 32 clients

    def __init__(self, latency=0.0, capacity=1024):
        super().__init__(("127.0.0.1", 0), FakeChat)
        self.latency, self.slots = latency, threading.BoundedSemaphore(capacity)
        self.lock, self.requests, self.scripts, self.delay = threading.Lock(), [], {}, {}
        self.arrivals, self.inflight, self.max_inflight = [], collections.Counter(), collections.Counter()
        self.url = f"http://127.0.0.1:{self.server_address[1]}/v1"

    def handle_error(self, request, client_address):
        pass  # a reply to a client that gave up (past its deadline, or scripted to) is expected

    def __enter__(self):
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()


def _serve_fake_chat(port, latency, capacity):
    """Child process of `bench_rephrase`: the server, so that the client's CPU time is its own."""
    server = FakeChatServer(latency, capacity)
    port.send(server.server_address[1])
    server.serve_forever()


def bench_rephrase(levels=(1, 4, 16, 32), latency=0.1, capacity=32, chunks_per_doc=2) -> list:
    """Pairs per second of data.rephrase_corpus at each concurrency in `levels`, against `FakeChat`
    in its own process, and the client's CPU time per chunk (all threads, writes and fsyncs
    included). Each level rewrites max(20, 4 * concurrency) documents of chunks_per_doc chunks."""
    docs = [data.Document("bench", f"bench#{i}", "\n\n".join(
        f"Paragraph {k} of document {i} says that {i} times {k} is {i * k}." for k in range(chunks_per_doc)))
        for i in range(max(20, 4 * max(levels)))]
    context = multiprocessing.get_context("fork")
    port, child_end = context.Pipe()
    server = context.Process(target=_serve_fake_chat, args=(child_end, latency, capacity), daemon=True)
    server.start()
    rows = []
    try:
        url = f"http://127.0.0.1:{port.recv()}/v1"
        for concurrency in levels:
            pairs = [(doc, "qa") for doc in docs[:max(20, 4 * concurrency)]]
            generate = data.ChatEndpoint(url, "bench", timeout=30.0, retries=2, backoff=0.1)
            with tempfile.TemporaryDirectory() as tmp:
                wall, cpu = time.perf_counter(), time.process_time()
                summary = data.rephrase_corpus(pairs, generate, Path(tmp, "out.jsonl"), concurrency=concurrency,
                                               log=lambda line: None, max_chunk_chars=80)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if summary["error"] or summary["ok"] != len(pairs) * chunks_per_doc:
                raise RuntimeError(f"bench run failed: {summary}")
            rows.append(dict(concurrency=concurrency, pairs=len(pairs), seconds=round(wall, 3),
                             pairs_per_s=len(pairs) / wall, cpu_ms_per_chunk=1000 * cpu / summary["ok"]))
    finally:
        server.terminate()
        server.join()
    return rows


def rephrase_main(argv) -> int:
    """python bench.py rephrase [--concurrency N ...] [--latency S] [--capacity N] [--chunks N]"""
    p = argparse.ArgumentParser(prog="bench.py rephrase",
                                description="rephrase throughput by concurrency, against a local fake server")
    p.add_argument("--concurrency", type=data.number(int, 1), nargs="+", default=[1, 4, 16, 32])
    p.add_argument("--latency", type=data.number(float, 0), default=0.1, help="seconds per request")
    p.add_argument("--capacity", type=data.number(int, 1), default=32, help="requests served at once")
    p.add_argument("--chunks", type=data.number(int, 1), default=2, help="chunks per document")
    args = p.parse_args(argv)
    rows = bench_rephrase(args.concurrency, args.latency, args.capacity, args.chunks)
    print(f"rephrase throughput: fake server on 127.0.0.1, {args.latency * 1000:g} ms per request, room for "
          f"{args.capacity} at once, {args.chunks} chunks per document; {cpu_name()}; load average "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'concurrency':>11}{'pairs':>7}{'seconds':>9}{'pairs/s':>9}{'speedup':>9}"
          f"{'client CPU ms/chunk':>21}")
    for row in rows:
        print(f"{row['concurrency']:>11}{row['pairs']:>7}{row['seconds']:>9.2f}{row['pairs_per_s']:>9.2f}"
              f"{row['pairs_per_s'] / rows[0]['pairs_per_s']:>8.1f}x{row['cpu_ms_per_chunk']:>21.2f}")
    return 0


# ----------------------------------------------------------------------------------------------
# The run

# ----------------------------------------------------------------------------------------------
# The table: each row's lines (label, value, target name or None, the target's value)

SKIPPED_BF16 = "skipped: bf16 is emulated on this CPU (see the header)"


def _skipped(label, r, target=None):
    return [(label, f"skipped: {r['skipped']}" if not r["skipped"].startswith("bf16") else SKIPPED_BF16, target, None)]


def lines_train(r):
    if "skipped" in r:
        return _skipped("1 train step vs transformers", r, "train_speedup_vs_transformers")
    return [(f"1 train step vs transformers {r['transformers']}",
             f"{r['kimik2_tokens_per_s']:,.0f} vs {r['transformers_tokens_per_s']:,.0f} tok/s = {r['speedup']:.2f}x",
             "train_speedup_vs_transformers", r["speedup"])]


def lines_optimizer(r):
    return [("2 optimizer step MuonClip / torch Muon+AdamW",
             f"{r['muonclip_ms']:.1f} / {r['torch_muon_adamw_ms']:.1f} ms = {r['ratio']:.2f}x",
             "optimizer_time_ratio_vs_torch", r["ratio"])]


def lines_tracking(r):
    return [("3 max-logit tracking overhead",
             f"{r['tracked_ms']:.1f} vs {r['untracked_ms']:.1f} ms = {r['overhead']:+.1%}", "tracking_overhead", r["overhead"])]


def lines_bf16(r):
    if "skipped" in r:
        return _skipped("4 bf16 autocast vs fp32 step", r, "bf16_speedup")
    return [("4 bf16 autocast vs fp32 step", f"{r['bf16_ms']:.1f} vs {r['fp32_ms']:.1f} ms = {r['speedup']:.2f}x",
             "bf16_speedup", r["speedup"])]


def lines_mfu(r):
    out = [("5 MFU fp32 (of fastest fp32 torch.mm)",
            f"{r['fp32_flops'] / 1e9:.1f} / {r['fp32_peak_flops'] / 1e9:.0f} GFLOP/s = {r['fp32']:.1%}", "mfu_fp32_tiny", r["fp32"])]
    label = "  MFU bf16 (of fastest bf16 torch.mm)"
    if "bf16" in r:
        return out + [(label, f"{r['bf16_flops'] / 1e9:.1f} / {r['bf16_peak_flops'] / 1e9:.0f} GFLOP/s = {r['bf16']:.1%}", None, None)]
    return out + [(label, SKIPPED_BF16, None, None)]


def lines_bounds(r):
    t, w = r["tiny"], r["wide"]
    bf16_share = f", bf16 {t['matmul_share_bf16']:.0%}" if t["matmul_share_bf16"] is not None else ""
    wide = (f"bf16 {w['bf16_ms']:.0f} vs fp32 {w['fp32_ms']:.0f} ms = {w['bf16_speedup']:.2f}x (forward+backward "
            f"alone {w['fwd_bwd_bf16_speedup']:.2f}x); MFU fp32 {w['mfu_fp32']:.0%} (forward+backward "
            f"{w['mfu_fp32_fwd_bwd']:.0%}), bf16 {w['mfu_bf16']:.0%}" if "bf16_ms" in w else
            f"fp32 {w['fp32_ms']:.0f} ms (forward+backward {w['fwd_bwd_fp32_ms']:.0f} ms); MFU fp32 "
            f"{w['mfu_fp32']:.0%} (forward+backward {w['mfu_fp32_fwd_bwd']:.0%}); bf16 skipped (emulated)")
    return [("  what bounds 4, 5: matmul share of the step",
             f"fp32 {t['matmul_share_fp32']:.0%}{bf16_share} (profiler); with the rest as is, bf16 <= "
             f"{t['bf16_speedup_bound']:.2f}x and MFU <= {t['mfu_fp32_bound']:.0%}; MFU "
             f"{TARGETS['mfu_fp32_tiny'][1]:.0%} needs the non-matmul {t['non_matmul_ms']:.0f} ms down to "
             f"{t['non_matmul_ms_for_mfu_target']:.0f} ms", None, None),
            (f"  same step at hidden {w['config']['hidden_size']}, {w['config']['num_hidden_layers']} layers", wide, None, None)]


def lines_memory(r):
    k = r["kimik2"]
    line = f"{k['step_bytes'] / 2**20:.0f} MiB above {(k['peak_bytes'] - k['step_bytes']) / 2**20:.0f} MiB"
    if "transformers" in r:
        t = r["transformers"]
        line += f"; transformers {t['step_bytes'] / 2**20:.0f} MiB ({k['step_bytes'] / t['step_bytes']:.2f}x)"
    return [(f"6 peak memory of a step [{k['how']}]", line, None, None)]


def lines_decode(r):
    a, f = r["absorbed"], r["full"]
    return [(f"7 decode at {r['context']} ctx, absorbed vs full K/V",
             f"{a['tokens_per_s']:.0f} vs {f['tokens_per_s']:.0f} tok/s = {a['tokens_per_s'] / f['tokens_per_s']:.2f}x", None, None),
            ("  cache bytes/token (fp32), absorbed vs full",
             f"{a['cache_bytes_per_token']:,.0f} vs {f['cache_bytes_per_token']:,.0f} "
             f"= 1/{f['cache_bytes_per_token'] / a['cache_bytes_per_token']:.1f}", None, None)]


def lines_ns_precision(r):
    bf16 = f" / {r['bfloat16_ms']:.1f}" if "bfloat16_ms" in r else " / (bf16 skipped: emulated)"
    return [(f"9 MuonClip step, NS default ({r['default_dtype']}) / fp32 / bf16",
             f"{r['default_ms']:.1f} / {r['float32_ms']:.1f}{bf16} ms", None, None)]


def lines_ns_variants(r):
    out = []
    for dtype, table in r.items():
        jordan = table["jordan"]["ms"]
        out.append((f"10 NS variants, K2 shapes / 16, {dtype}", ", ".join(
            f"{v} {t['ms']:.0f} ms ({t['ms'] / jordan:.2f}x) |s-1| <= {t['max_sigma_error']:.2f}"
            for v, t in table.items()), None, None))
    if "bfloat16" not in r:
        out.append(("10 NS variants, K2 shapes / 16, bfloat16", SKIPPED_BF16, None, None))
    return out


def lines_distributed(r):
    def ratio(wrap, key):
        return f"{r[wrap][key]:.1f} / {r[wrap]['alone_ms']:.1f} ms = {r[wrap][key] / r[wrap]['alone_ms']:.2f}x"
    lines = []
    for wrap in ("ddp", "fsdp"):
        lines.append((f"11 opt step, 2 procs {wrap.upper()} / 1 proc (1 thread each)",
                      f"new {ratio(wrap, 'new_ms')}; before {r[wrap]['old_ms']:.1f} ms = "
                      f"{r[wrap]['old_ms'] / r[wrap]['alone_ms']:.2f}x (NS {r[wrap]['ns_dtype']})", None, None))
        if "floor_ms" in r[wrap]:
            lines.append((f"   {wrap.upper()}'s floor: each share's update, nothing sent",
                          f"{ratio(wrap, 'floor_ms')} (no exchange can go below it here)", None, None))
        if "cpu_ms" in r[wrap]:                   # process time, every thread (gloo's too)
            cpu = r[wrap]["cpu_ms"]
            lines.append(("   CPU ms per step and process", f"1 proc {cpu['alone']:.1f}; 2 procs {cpu['new']:.1f}" + (
                f", floor {cpu['floor']:.1f}" if "floor" in cpu else ""), None, None))
    lines.append(("   its phases, ms per step (mean of the ranks)", "1 proc / 2 procs DDP / 2 procs FSDP2", None, None))
    return lines + [(f"     {phase}", " / ".join(f"{p[phase]:.1f}" for p in (
        r["ddp"]["alone_phases_ms"], r["ddp"]["phases_ms"], r["fsdp"]["phases_ms"])), None, None) for phase in PHASE_NAMES]


def lines_cuda(r):
    if "skipped" in r:
        return _skipped("CUDA small bf16 MFU", r)
    return [("CUDA small bf16 MFU", f"{r['gpu']}: {r['tokens_per_s']:,.0f} tok/s, {r['mfu']:.1%} of "
             f"{r['bf16_peak_flops'] / 1e12:.0f} TFLOP/s", None, None)]


ROW_LINES = dict(train_vs_transformers=lines_train, optimizer=lines_optimizer, tracking=lines_tracking, bf16=lines_bf16,
                 mfu=lines_mfu, bounds=lines_bounds, memory=lines_memory, decode=lines_decode,
                 ns_precision=lines_ns_precision, ns_variants=lines_ns_variants, distributed=lines_distributed,
                 cuda_small=lines_cuda)


class Report:
    """The bench's results, each row printed as soon as it is measured: the table on stdout, or with
    --json on stderr (the JSON object at the end, on stdout). `res` is that object."""
    WIDTH = 52

    def __init__(self, as_json: bool):
        self.res, self.out = dict(targets={}, row_seconds={}), sys.stderr if as_json else sys.stdout
        self.last = time.perf_counter()

    def print(self, text=""):
        print(text, file=self.out, flush=True)

    def header(self, machine: dict, settings: dict, skipped: dict):
        self.res.update(machine=machine, settings=settings, skipped=skipped)
        self.last = time.perf_counter()
        m, s = machine, settings
        self.print(f"kimik2 bench: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, torch "
                   f"{m['torch']}; bf16: {m['bf16']}; Newton-Schulz in {m['train_ns_dtype']} (as train.py)")
        self.print(f"preset {s['preset']}, batch {s['batch']} x {s['seq_len']} tokens, fp32 unless stated; medians "
                   f"of {s['reps']} reps after {s['warmup']} warm-up (fewer past {s['budget_s']:g} s per row); "
                   f"load average {_load(m['load_average_at_start'])} at start")
        for part, reason in skipped.items():
            self.print(f"{part} rows: " + ("measured" if reason is None else f"skipped: {reason}"))
        self.print()

    def add(self, key: str, value: dict):
        """Store row `key` and print its lines (ROW_LINES), with the verdict of its target if it has
        one; the first line ends with the seconds the row took (since the row before it)."""
        self.res[key] = value
        now = time.perf_counter()
        self.res["row_seconds"][key] = seconds = now - self.last
        self.last = now
        for i, (label, text, target, v) in enumerate(ROW_LINES[key](value)):
            verdict = ""
            if target:
                op, bound = TARGETS[target]
                met = None if v is None else (v >= bound if op == ">=" else v <= bound if op == "<=" else v > bound)
                self.res["targets"][target] = dict(value=v, target=f"{op} {bound}", met=met)
                verdict = f"target {op} {bound}: " + {True: "met", False: "MISSED", None: "n/a"}[met]
            took = f"[{seconds:.0f} s]" if i == 0 else ""
            self.print(f"{label:{self.WIDTH}s}  {text:46s}  {verdict:28s}  {took}".rstrip())

    def finish(self, started: float):
        m = self.res["machine"]
        m["load_average_at_end"], m["wall_s"] = os.getloadavg(), time.perf_counter() - started
        busy = max(m["load_average_at_start"][0], m["load_average_at_end"][0]) > m["cores"]
        self.print(f"\n{m['wall_s']:.0f} s in all; load average {_load(m['load_average_at_end'])} at end"
                   + (" (at start or end above the core count: other processes shared the CPU and the figures are noisy)"
                      if busy else ""))


def _load(avg) -> str:
    return "(1, 5, 15 min) " + ", ".join(f"{x:.1f}" for x in avg)


def run(args, report: Report) -> dict:
    started = time.perf_counter()
    torch.set_num_threads(args.threads or torch.get_num_threads())
    try:
        import transformers
    except ImportError:
        transformers = None
    bf16_native, bf16_how = bf16_support()
    skip = rows_to_skip(bf16_native, bf16_how, torch.cuda.is_available(), transformers and transformers.__version__)
    with_bf16 = skip["bf16"] is None
    report.header(
        dict(cpu=cpu_name(), cores=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
             bf16=bf16_how, bf16_cpu_flags=cpu_bf16_flags(), train_ns_dtype=str(train_ns_dtype()).removeprefix("torch."),
             load_average_at_start=os.getloadavg()),
        dict(preset=args.preset, batch=args.batch_size, seq_len=args.seq_len, reps=args.reps, warmup=args.warmup,
             budget_s=args.budget, lr=LR, weight_decay=WEIGHT_DECAY), skip)
    model = build_kimik2(args.preset)
    x, y = make_batch(model.config, args.batch_size, args.seq_len)
    tokens = x.numel()

    # 1. training step against transformers
    if transformers is None:
        report.add("train_vs_transformers", dict(skipped=skip["transformers"]))
    else:
        twin = build_transformers_twin(model)
        theirs = train_step_fn(twin, reference_for_transformers(twin), x, y, transformers_model=True)
        ours = train_step_fn(model, muonclip_for(model), x, y)
        t = race({"kimik2": ours, "transformers": theirs}, args.reps, args.warmup, budget_s=args.budget,
                 label="row 1, training steps")
        report.add("train_vs_transformers", dict(
            transformers=transformers.__version__,
            kimik2_tokens_per_s=tokens / t["kimik2"], transformers_tokens_per_s=tokens / t["transformers"],
            speedup=t["transformers"] / t["kimik2"]))
        del twin, theirs, ours

    # 2. optimizer step on the same parameters and gradients (kept for row 9)
    opt_model = build_kimik2(args.preset)
    opt_model(x, y)[1].backward()
    grads = {p: p.grad.clone() for p in opt_model.parameters()}
    muonclip, reference = muonclip_for(opt_model), reference_for_kimik2(opt_model)
    t = race({"muonclip": step_with_grads(muonclip, grads), "torch": step_with_grads(reference, grads)},
             args.reps * 2, args.warmup, budget_s=args.budget, label="row 2, optimizer steps")
    report.add("optimizer", dict(muonclip_ms=t["muonclip"] * 1e3, torch_muon_adamw_ms=t["torch"] * 1e3,
                                 ratio=t["muonclip"] / t["torch"]))
    del muonclip, reference

    # 3, 4, 5. tracking, bf16, MFU: kimik2 training steps
    model = build_kimik2(args.preset)
    steps = {"fp32": train_step_fn(model, muonclip_for(model), x, y)}
    if with_bf16:
        steps["bf16"] = train_step_fn(model, muonclip_for(model), x, y, autocast_dtype=torch.bfloat16)

    def untracked():
        set_tracking(model, False)
        steps["fp32"]()
        set_tracking(model, True)
    t = race({**steps, "untracked": untracked}, args.reps, args.warmup, budget_s=args.budget,
             label="rows 3-4, training steps")
    report.add("tracking", dict(tracked_ms=t["fp32"] * 1e3, untracked_ms=t["untracked"] * 1e3,
                                overhead=t["fp32"] / t["untracked"] - 1))
    report.add("bf16", dict(fp32_ms=t["fp32"] * 1e3, bf16_ms=t["bf16"] * 1e3, speedup=t["fp32"] / t["bf16"])
               if with_bf16 else dict(skipped=skip["bf16"]))
    flops_per_token = model.estimate_flops_per_token(args.seq_len)
    peaks = {dtype: measure_peak_flops(getattr(torch, name))
             for dtype, name in (("fp32", "float32"), ("bf16", "bfloat16")) if dtype in steps}
    achieved = {dtype: tokens / t[dtype] * flops_per_token for dtype in peaks}
    report.add("mfu", dict(flops_per_token=flops_per_token,
                           **{f"{d}_peak_flops": peaks[d] for d in peaks}, **{f"{d}_flops": achieved[d] for d in peaks},
                           **{d: achieved[d] / peaks[d] for d in peaks}))
    progress("bounds: profiling the step, then timing it at hidden 512")
    report.add("bounds", bench_bounds(steps, t, flops_per_token, peaks, args))
    del steps

    # 6. peak memory
    memory = {"kimik2": bench_memory("kimik2", args.preset, args.batch_size, args.seq_len)}
    if transformers is not None:
        memory["transformers"] = bench_memory("transformers", args.preset, args.batch_size, args.seq_len)
    report.add("memory", memory)

    # 7. decoding
    progress(f"row 7: decoding {args.decode_tokens} tokens after {args.decode_context} with each cache")
    report.add("decode", dict(context=args.decode_context, new_tokens=args.decode_tokens,
                              **bench_decode(model, args.decode_context, args.decode_tokens, max(1, args.reps // 4),
                                             args.budget)))

    # 9-11. MuonClip at scale
    report.add("ns_precision", bench_ns_precision(opt_model, grads, args.reps,
                                                  args.warmup, with_bf16, args.budget))
    report.add("ns_variants", {str(dtype).removeprefix("torch."): bench_ns_variants(dtype, args.reps, args.budget)
                               for dtype in (torch.float32, *([torch.bfloat16] if with_bf16 else []))})
    progress("row 11: torchrun, 1 and 2 processes")
    report.add("distributed", bench_distributed(args))

    report.add("cuda_small", bench_cuda_small(args) if skip["cuda"] is None else dict(skipped=skip["cuda"]))
    report.finish(started)
    return report.res


def print_ns_variant_losses(res):
    print(f"train.py, 1 thread, each Newton-Schulz variant; load average {', '.join(f'{x:.1f}' for x in res['load_average'])} at end")
    steps = sorted(res["jordan"]["loss"])
    print(f"{'variant':14s} " + " ".join(f"{s:>7d}" for s in steps) + "   val loss at end")
    for variant in NS_VARIANTS:
        r = res[variant]
        print(f"{variant:14s} " + " ".join(f"{r['loss'][s]:7.4f}" for s in steps) + f"   {r['val_loss'][max(r['val_loss'])]:.4f}")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch-size", type=int, default=16, help="train.py's default")
    p.add_argument("--seq-len", type=int, default=128, help="train.py's default")
    p.add_argument("--reps", type=int, default=8, help="timed repetitions per figure (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed repetitions first")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--budget", type=float, default=30.0,
                   help="seconds per timed comparison: no repetition starts past it (at least one is timed)")
    p.add_argument("--decode-context", type=int, default=4000, help="prompt tokens before decoding (tiny: up to 4096 - decode-tokens)")
    p.add_argument("--decode-tokens", type=int, default=32, help="decoded tokens timed")
    p.add_argument("--cuda-batch-size", type=int, default=16)
    p.add_argument("--seq-len-cuda", type=int, default=1024)
    p.add_argument("--threads-study", action="store_true",
                   help="only row 8: the training step under each thread setting, quiet and beside a busy 2-thread process")
    p.add_argument("--rounds", type=int, default=3, help="--threads-study: rounds of the settings (median)")
    p.add_argument("--distributed", action="store_true",
                   help="only row 11: the optimizer step on 1 and 2 processes (DDP, FSDP2) and its phases")
    p.add_argument("--busy", action="store_true",
                   help="only run row 8's competing busy 2-thread process, until killed (to time anything beside it)")
    p.add_argument("--memory-worker", choices=("kimik2", "transformers"), help=argparse.SUPPRESS)
    p.add_argument("--step-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dist-worker", choices=("ddp", "fsdp"), help=argparse.SUPPRESS)
    p.add_argument("--alone-worker", type=int, metavar="PORT", help=argparse.SUPPRESS)
    p.add_argument("--alone-port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--ns-variant-losses", type=int, metavar="STEPS",
                   help="only row 12: train.py cut to STEPS steps with each Newton-Schulz variant, its losses")
    return p.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["rephrase"]:
        return rephrase_main(argv[1:])
    args = parse_args(argv)
    if args.busy:  # this process becomes the busy one, so killing its pid stops the load
        os.execve(sys.executable, [sys.executable, "-c", BUSY_PROCESS], _default_wait_policy())
    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker, args.preset, args.batch_size, args.seq_len)))
        return
    if args.step_worker:
        print(json.dumps(step_worker(args.preset, args.batch_size, args.seq_len, args.reps)))
        return
    if args.dist_worker:
        dist_worker(args.dist_worker, args.preset, args.batch_size, args.seq_len, args.reps, args.alone_port)
    if args.alone_worker:
        return alone_worker(args.alone_worker, args.preset, args.batch_size, args.seq_len)
    if args.ns_variant_losses:
        res = bench_ns_variant_losses(args.ns_variant_losses)
        print(json.dumps(res, indent=2)) if args.json else print_ns_variant_losses(res)
        return
    if args.threads_study:
        res = bench_threads(args)
        print(json.dumps(res, indent=2)) if args.json else print_threads(res)
        return
    if args.distributed:
        report = Report(args.json)
        report.res["load_average_at_start"] = os.getloadavg()
        report.add("distributed", bench_distributed(args))
        report.print(f"load average {_load(report.res['load_average_at_start'])} at start, "
                     f"{_load(os.getloadavg())} at end")
        if args.json:
            print(json.dumps(report.res, indent=2))
        return
    res = run(args, Report(args.json))
    if args.json:
        print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
