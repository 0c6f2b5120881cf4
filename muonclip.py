"""MuonClip: Muon for hidden matrices, AdamW for the rest, then per-head QK-Clip (Kimi-K2).

Kimi-K2 (arXiv 2507.20534, sec. 2.1) trains with MuonClip: the Muon optimizer in Moonlight's form
("Muon is Scalable for LLM Training", arXiv 2502.16982, sec. 2) followed, after every update, by
QK-Clip (K2 report sec. 2.1, Algorithm 1): each attention head whose largest pre-softmax logit of the
step S_h exceeded tau gets its query/key weights rescaled by gamma_h = tau / S_h. This file is the
algorithm, top to bottom: pure functions first (Newton-Schulz, the Muon update, the clip rules, the
exact max logit), then the parameter split, the Hugging Face adapter, and the optimizer class, which
only does bookkeeping, shape batching and the distributed parts. It imports only torch (transformers
only inside `attach_qk_clip`), so it can be copied alone into any project.

    opt = MuonClip.for_model(model, lr=2e-4, weight_decay=0.1, qk_clip_tau=100.0)
    loss.backward(); opt.step(); opt.zero_grad()
    opt.clip_stats  # {'max_logits': (L, H) before clipping, 'heads_clipped': scalar} - no host sync

Features
- Muon (`muon_update`): momentum M = mu*M + G, Nesterov input G + mu*M (mu 0.95), Newton-Schulz
  orthogonalisation (5 quintic steps in bf16, on the wide orientation), update scaled by
  0.2*sqrt(max(A, B)) so its RMS matches AdamW's and one lr and weight decay serve both halves
  (Moonlight eq. 4); decoupled weight decay.
- Stacked weights (E, A, B), e.g. MoE experts, are E matrices, each orthogonalised on its own; a
  fused weight declared with `mark_fused` (a (3D, D) QKV, a fused gate/up) is orthogonalised block by
  block. All matrices of the same shape, across parameters, go through one batched Newton-Schulz call.
- AdamW (betas 0.9, 0.95) for everything that is not a hidden matrix; same maths as torch.optim.AdamW.
- QK-Clip for every module with the attention surface below; per-head factor gamma = tau / S_h only
  for heads with S_h > tau (others are multiplied by exactly 1, so they stay bitwise the same), no
  per-head host sync. Rules: `qk_clip_mha_` (multi-head / grouped-query), `qk_clip_fused_mha_` (one
  fused q|k|v tensor), `qk_clip_mla_` (DeepSeek's multi-head latent attention).
- `causal_max_logits`: the exact per-head max logit, chunked (memory-bounded), for modules whose
  attention kernel (SDPA, flash) does not expose its logits; `record_max_logits_` feeds a module's
  statistic from it on training forwards only. `attach_qk_clip(model)` gives a transformers decoder
  (Llama, Mistral, Qwen2, DeepseekV3, ...) the whole surface in one call.
- `clip_stats` is filled after every step, also with qk_clip_tau=None (then nothing is scaled and
  heads_clipped is 0), whenever attention modules are known: the max logits are reduced and reset
  by `reduce_max_logits_`, which a trainer with another optimizer can call itself.
- Distributed (torchrun): under DDP the (L, H) max-logit matrix is all-reduced with MAX in one
  collective, so all replicas clip alike. Under FSDP2 (`fully_shard`, DTensor
  parameters) Muon gathers each matrix for Newton-Schulz and keeps its own shard (stacked experts
  sharded on the expert dim need no gather); momentum and AdamW state are local shards. On one
  process all of it is a no-op. Under DDP pass broadcast_buffers=False, or rank 0's max_logits
  overwrite every other rank's running max at each forward and micro-batches seen only by other
  ranks are lost.
- Parameters should be fp32 master weights (use autocast for bf16 compute). The optimizer warns on
  other dtypes rather than keeping fp32 copies itself: a bf16 weight loses every update smaller than
  half its ulp (2^-9 relative: weight decay at lr*wd = 1e-3 does nothing), and a master copy here
  would double the memory of callers that keep one already (AMP, FSDP2 mixed precision) and would
  undo the clip of the copy those callers run.

What post-clip <= tau guarantees (K2 report sec. 2.1): for each layer, on the very input its max was
measured on, the clipped head's logits are multiplied by gamma_h (MLA, MHA) or by
sqrt(gamma_h * min gamma of its key group) <= gamma_h (GQA), so they are <= tau, right after the clip.
It does not promise that a later forward stays below tau: the next update moves the weights again,
and clipping layer l changes the input of layer l+1, so an end-to-end re-forward may exceed tau; the
report's claim is that the max logits stay bounded over training.

Where Muon must NOT be used (split_params sends these to AdamW)
- Embeddings: a lookup table, not a linear map; each step's gradient touches only the rows of the
  tokens seen, and orthogonalising spreads that update over every row (rare tokens drift). Its rows
  are independent vectors, so the "steepest descent under the spectral norm" argument behind Muon
  does not apply.
- The output head: also a table of independent per-token vectors (often tied to the embedding);
  Keller Jordan's and Moonlight's experiments train it better with AdamW. It is found by structure,
  not by any name deep in the model: `model.get_output_embeddings()` where the model has it
  (transformers), else a direct child of the model named lm_head / output / head, or a tied weight.
- Vectors (norm gains, biases, the router bias): Newton-Schulz needs a matrix; a vector has no
  singular-value structure to whiten. (K2's router bias is a buffer moved by the load rule, not by
  any optimizer.)
- Convolution kernels (nn.Conv1d/2d/3d weights): neither a matrix nor a stack of independent
  matrices; this file sends them to AdamW, and a Muon group refuses tensors of more than 3 dims.
- Several maps stored in one tensor (a fused QKV weight, a fused gate/up) must not be orthogonalised
  as one matrix: that couples maps that are independent. Declare the blocks with `mark_fused`.

The attention surface QK-Clip talks to (duck-typed; the module has it, this file does not import it)
- `num_heads` int; `max_logits`: (num_heads,) fp32 tensor, the running max over every training
  forward since the last reset of the head's scaled, masked pre-softmax logits, -inf when reset.
- `qk_clip_(gamma)`: gamma (num_heads,) tensor; rescale in place, without grad, so that the head's
  logits on the same input are multiplied by gamma_h (or at most gamma_h, GQA). Must scale only the
  local rows when its weights are DTensor shards.
- optional `reset_max_logits_()`; without it max_logits is filled with -inf here.
The README's "MuonClip in your model" section shows the surface for an own module, a nanoGPT-style
fused model and a transformers model with Trainer.

Run the tests: `python -m pytest test_kimik2.py -k "muon or clip or newton"`.
"""
import functools
import inspect
import math
import sys
import warnings
from collections import defaultdict

import torch
import torch.distributed as dist
from torch import nn

if dist.is_available():
    from torch.distributed.tensor import DTensor, Replicate
else:
    DTensor = ()  # isinstance(x, ()) is False: no tensor is ever a DTensor

# Keller Jordan's quintic: the coefficients maximise the slope at zero, so 5 steps push every
# singular value into roughly [0.7, 1.2] instead of converging exactly to 1.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


# ----------------------------------------------------------------------------------- Muon maths

def newton_schulz(G, steps=5, eps=1e-7, dtype=torch.bfloat16):
    """Approximate orthogonalisation U V^T of each matrix G = U S V^T (Moonlight sec. 2).

    G: (..., A, B), leading dims are a batch of independent matrices. Returns (..., A, B) in `dtype`.
    The one place that handles orientation: a tall G is worked on transposed, so X X^T is always
    the small Gram matrix.
    """
    a, b, c = NS_COEFFICIENTS
    X = G.to(dtype).reshape(-1, *G.shape[-2:])                  # (N, A, B)
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT.contiguous()                                     # (N, B, A), now wide (and laid out so)
    # Frobenius norm >= spectral norm, so every singular value starts in [0, 1]
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT                                              # (N, small, small)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)               # b*A + c*A@A
        X = torch.baddbmm(X, B, X, beta=a)                        # a*X + B@X
    if tall:
        X = X.mT
    return X.reshape(G.shape)


def rms_matching_scale(shape):
    """0.2 * sqrt(max(A, B)) for an (..., A, B) weight (Moonlight eq. 4).

    An orthogonal A x B update has RMS 1/sqrt(max(A, B)); this scale gives it RMS 0.2, the typical RMS
    of an AdamW update, so Muon can reuse AdamW's learning rate and weight decay.
    """
    return 0.2 * math.sqrt(max(shape[-2], shape[-1]))


def muon_momentum_(grad, momentum_buffer, beta=0.95, nesterov=True):
    """M = beta*M + G in place (Moonlight's sum form); returns the Newton-Schulz input, G + beta*M
    with Nesterov, else M. torch.optim.Muon keeps an EMA instead, a scale Newton-Schulz removes."""
    momentum_buffer.mul_(beta).add_(grad)
    return grad.add(momentum_buffer, alpha=beta) if nesterov else momentum_buffer


def muon_update(grad, momentum_buffer, beta=0.95, nesterov=True, ns_steps=5, ns_dtype=torch.bfloat16):
    """The Muon update of one matrix, or a stack (..., A, B) of independent ones: the step to
    subtract (times lr) from the weight, before weight decay. Updates momentum_buffer in place.
    MuonClip.step computes this, batched over every matrix of the same shape (it passes the scale
    as the add's alpha, -lr * scale, so the product is rounded once)."""
    x = muon_momentum_(grad, momentum_buffer, beta, nesterov)
    return newton_schulz(x, ns_steps, dtype=ns_dtype).to(grad.dtype) * rms_matching_scale(x.shape)


# ------------------------------------------------------------------------------- QK-Clip maths

def qk_clip_gamma(max_logits, tau):
    """Per-head factors gamma_h = min(1, tau / S_h) (K2 report sec. 2.1): tau / S_h where S_h > tau,
    else exactly 1 (also for -inf and NaN)."""
    return torch.where(max_logits > tau, tau / max_logits, torch.ones_like(max_logits))


def _mha_head_factors(gamma, num_kv_heads):
    """(query head factors (H,), key head factors (Hkv,)) of the MHA/GQA rule in qk_clip_mha_."""
    num_heads = gamma.numel()
    group_min = gamma.view(num_kv_heads, num_heads // num_kv_heads).amin(dim=1)   # (Hkv,)
    return gamma.sqrt(), group_min.sqrt()


@torch.no_grad()
def qk_clip_mha_(w_q, w_k, gamma, num_kv_heads):
    """QK-Clip for ordinary multi-head / grouped-query attention, in place.

    w_q: (num_heads * head_dim, ...) query projection rows (a weight, or its bias: call once for
    each), head-major. w_k: (num_kv_heads * head_dim, ...) key rows, likewise. gamma: (num_heads,).
    Query head h reads key head g = h // (num_heads // num_kv_heads).

    Rule (K2 report sec. 2.1 gives it for MHA): sqrt(gamma_h) on query head h's rows and sqrt(gamma) on
    its key rows; a key head shared by a group (GQA) takes the smallest gamma of its query heads,
    k_g *= sqrt(min_g). Head h's logits are then multiplied by sqrt(gamma_h * min_g) <= gamma_h, so a
    clipped head ends at or below tau (exactly tau when it has the group's smallest factor), an
    unclipped head's query rows are bitwise untouched, and a group with no clipped head is not
    touched at all. The price of the shared key is that unclipped heads of a clipped group lose a
    factor sqrt(min_g) too. Plain MHA (num_kv_heads == num_heads) is sqrt(gamma_h) on both q and k
    rows. Weights may be DTensors sharded on rows (FSDP2): each rank scales the rows it holds.
    """
    q_factor, k_factor = _mha_head_factors(gamma, num_kv_heads)
    _scale_rows_(w_q, q_factor.repeat_interleave(w_q.shape[0] // q_factor.numel()))
    _scale_rows_(w_k, k_factor.repeat_interleave(w_k.shape[0] // k_factor.numel()))


@torch.no_grad()
def qk_clip_fused_mha_(w_qkv, gamma, num_kv_heads, layout):
    """qk_clip_mha_ on one fused tensor holding q, k and v, in place; the v block is untouched.

    layout: the fused layout whose split gives [q, k, v] (RowBlocks, ColumnBlocks), or a list of
    row sizes [q, k, v] (plain row stacking: nanoGPT's c_attn weight (3D, D) or bias (3D,): (D, D, D)).
    w_qkv: the fused weight, or its bias (1-D, along the fused dimension). Within the q and k maps
    the heads are consecutive (head-major), as every layout above lays them out."""
    layout = layout if hasattr(layout, "split") else RowBlocks(layout)
    if w_qkv.dim() > 1:
        layout.check(w_qkv, "w_qkv", "qk_clip_fused_mha_")
    n = w_qkv.shape[layout.dim] if w_qkv.dim() > 1 else w_qkv.numel()
    q, k, v = layout.split(torch.ones((n, 1) if layout.dim == -2 else (1, n), device=gamma.device))
    q_factor, k_factor = _mha_head_factors(gamma, num_kv_heads)
    factor = layout.join([q * q_factor.repeat_interleave(q.numel() // q_factor.numel()).view(q.shape),
                          k * k_factor.repeat_interleave(k.numel() // k_factor.numel()).view(k.shape),
                          v])                                                        # (n, 1) or (1, n)
    factor = factor.to(w_qkv.dtype)
    factor = factor.expand(w_qkv.shape) if w_qkv.dim() > 1 else factor.flatten()
    _local(w_qkv).mul_(_local_part(factor, w_qkv))


@torch.no_grad()
def qk_clip_mla_(w_q, w_kv_b, gamma, nope, rope, v_dim):
    """QK-Clip for multi-head latent attention (K2 report sec. 2.1; MLA: DeepSeek-V3 report sec.
    2.1.1), in place.

    w_q: (H * (nope + rope), ...) rows of q_b_proj (or q_proj without a q LoRA), per head [nope | rope];
    w_kv_b: (H * (nope + v_dim), ...) rows of kv_b_proj, per head [k_nope | v]. Head h: q_nope and
    k_nope rows * sqrt(gamma_h), q_rope rows * gamma_h; the rope key (one vector shared by all heads,
    from kv_a_proj_with_mqa) and the values stay. The head's logits q_nope.k_nope + q_rope.k_rope are
    then scaled by exactly gamma_h.
    """
    H, root = gamma.numel(), gamma.sqrt()[:, None]                                  # (H, 1)
    q_rows = torch.cat([root.expand(H, nope), gamma[:, None].expand(H, rope)], 1)   # (H, nope+rope)
    kv_rows = torch.cat([root.expand(H, nope), torch.ones_like(root).expand(H, v_dim)], 1)  # (H, nope+v)
    _scale_rows_(w_q, q_rows.flatten())
    _scale_rows_(w_kv_b, kv_rows.flatten())


def _scale_rows_(w, row_factor):
    """w (rows, ...) *= row_factor (rows,) in place; on a DTensor only the rows this rank holds."""
    factor = row_factor.to(w.dtype).view(-1, *([1] * (w.dim() - 1))).expand(w.shape)  # like w
    _local(w).mul_(_local_part(factor, w))


# ------------------------------------------------------------------- the exact max logit (S_h)

@torch.no_grad()
def causal_max_logits(q, k, scale, *, causal=True, attention_mask=None, chunk_size=None):
    """Per-head max over batch, query and key positions of the pre-softmax logit scale * q.k.

    q (B, H, Tq, D), k (B, Hkv, Tk, D) with H % Hkv == 0 (grouped-query: query head h reads key
    head h // (H // Hkv)). Returns (H,) float32, -inf for a head that sees no key. The products
    accumulate in fp32. Visibility: with `causal`, key j is visible to query i iff
    j <= i + (Tk - Tq) (queries are the last Tq positions); `attention_mask` is either a (B, Tk)
    key padding mask (bool or 0/1, True/1 = keep), or a mask broadcastable to (B, H or 1, Tq, Tk):
    bool (True = keep) or additive float (added to the logits, as eager attention does; -inf or the
    dtype's lowest value = not visible). Memory is bounded by taking queries in chunks of
    `chunk_size` rows (default: about 2^24 logits per chunk). Fused kernels (SDPA, flash) do not
    expose this max, and their log-sum-exp is only an upper bound (up to ln Tk too high).
    """
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if H % Hkv:
        raise ValueError(f"causal_max_logits: {H} query heads do not split into groups of {Hkv} key heads")
    G = H // Hkv
    qg = q.reshape(B, Hkv, G, Tq, D)                                          # (B, Hkv, G, Tq, D)
    kt = k.float()[:, :, None].transpose(-2, -1)                              # (B, Hkv, 1, D, Tk)
    pad = full = None
    if attention_mask is not None and attention_mask.dim() == 2:
        pad = attention_mask.bool()[:, None, None, None, :]                   # (B, 1, 1, 1, Tk)
    elif attention_mask is not None:
        full = attention_mask.reshape(-1, *attention_mask.shape[-3:])         # (B|1, H|1, Tq|1, Tk)
        if full.dtype == torch.bool:
            full = torch.zeros((), device=q.device).masked_fill(~full, -math.inf)
        else:
            full = full.float().masked_fill(full <= torch.finfo(full.dtype).min, -math.inf)
        full = full.reshape(full.shape[0], Hkv if full.shape[1] > 1 else 1, -1, *full.shape[-2:])
    rows = chunk_size or max(1, (1 << 24) // max(1, B * H * Tk))
    keys = torch.arange(Tk, device=q.device)
    out = torch.full((Hkv, G), -math.inf, device=q.device)
    for i in range(0, Tq, rows):
        s = (qg[:, :, :, i:i + rows].float() @ kt) * scale                    # (B, Hkv, G, r, Tk)
        if causal:
            query_pos = torch.arange(i, i + s.shape[-2], device=q.device)[:, None] + (Tk - Tq)
            s = s.masked_fill(keys > query_pos, -math.inf)
        if pad is not None:
            s = s.masked_fill(~pad, -math.inf)
        if full is not None:
            s = s + full[..., i:i + rows, :] if full.shape[-2] > 1 else s + full
        out = torch.maximum(out, s.amax(dim=(0, 3, 4)))
    return out.flatten()                                                      # (H,)


def is_training_forward(module):
    """The one test of "this forward feeds S": module.training with grad enabled. Eval and no-grad
    forwards never feed the statistic (K2 report sec. 2.1: S is the max of the training step)."""
    return module.training and torch.is_grad_enabled()


def record_max_logits_(module, q, k, scale, **visibility):
    """module.max_logits = max(module.max_logits, causal_max_logits(q, k, scale, **visibility)) on
    training forwards only (module.training and grad enabled): eval and no-grad forwards never feed
    the statistic (K2 report sec. 2.1: S is the max of the training step)."""
    if is_training_forward(module):
        s = causal_max_logits(q.detach(), k.detach(), scale, **visibility)
        torch.maximum(module.max_logits, s.to(module.max_logits.device), out=module.max_logits)


def reduce_max_logits_(attention_modules):
    """The step's (L, H) fp32 max logits of the modules, MAX-reduced across processes in one
    collective when torch.distributed is initialised, then every module's statistic is reset to
    -inf. Heads beyond a layer's num_heads (if layers differ) are -inf padding. MuonClip.step calls
    it; a trainer that steps another optimizer calls it once per step to log the statistic."""
    max_logits = nn.utils.rnn.pad_sequence(
        [m.max_logits.detach().float() for m in attention_modules], batch_first=True,
        padding_value=-math.inf)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(max_logits, op=dist.ReduceOp.MAX)
    for m in attention_modules:
        if hasattr(m, "reset_max_logits_"):
            m.reset_max_logits_()
        else:
            m.max_logits.fill_(-math.inf)
    return max_logits


# ------------------------------------------------------------------------------ parameter roles

HEAD_NAMES = ("lm_head", "output", "head")


class RowBlocks:
    """A fused layout: several maps stored along the rows of one weight (..., rows, B). The rows are
    `groups` repeats of [block 0 | block 1 | ...] of `sizes` rows; map i is its block gathered from
    every group, a (..., groups * sizes[i], B) matrix. groups=1 is plain stacking (nanoGPT's c_attn
    (3D, D): sizes (D, D, D); Phi-3's qkv_proj: (H*hd, Hkv*hd, Hkv*hd); a gate/up: (I, I)); GPT-NeoX's
    query_key_value is per head [q | k | v]: sizes (hd, hd, hd), groups H; Falcon's grouped one is per
    key head [its query heads | k | v]: sizes (G*hd, hd, hd), groups Hkv.

    The layout protocol the optimizer reads: split(x) -> the independent matrices (stacks) of x,
    each (..., A_i, B_i); join(parts) -> a tensor shaped like x from parts shaped like split's."""
    dim = -2                                                     # the fused dimension

    def __init__(self, sizes, groups=1):
        self.sizes, self.groups = tuple(int(s) for s in sizes), int(groups)

    def __repr__(self):
        return f"{type(self).__name__}({list(self.sizes)}, groups={self.groups})"

    def check(self, p, name, caller="mark_fused"):
        if p.dim() < 2 or self.groups * sum(self.sizes) != p.shape[self.dim]:
            what, hint = (("rows", "columns: ColumnBlocks, mark_fused(..., columns=True)") if self.dim == -2
                          else ("columns", "rows: RowBlocks, mark_fused without columns=True"))
            other = p.shape[-1] if self.dim == -2 else p.shape[-2] if p.dim() >= 2 else None
            hint = f" (they sum to its {hint})" if self.groups * sum(self.sizes) == other else ""
            repeat = f"{self.groups} x " if self.groups > 1 else ""
            raise ValueError(f"{caller}: {repeat}blocks {list(self.sizes)} must sum to the {what} of {name} "
                             f"{tuple(p.shape)}{hint}")

    def split(self, x):
        grouped = x.unflatten(-2, (self.groups, sum(self.sizes)))                  # (..., groups, rows/groups, B)
        return [b.flatten(-3, -2) for b in grouped.split(self.sizes, dim=-2)]      # (..., groups * size_i, B)

    def join(self, parts):
        return torch.cat([p.unflatten(-2, (self.groups, s)) for p, s in zip(parts, self.sizes)], -2).flatten(-3, -2)


class ColumnBlocks(RowBlocks):
    """RowBlocks along the columns (..., A, groups * sum(sizes)): the maps of a transposed weight,
    e.g. GPT-2's Conv1D c_attn (D, 3D), y = x @ W: sizes (D, D, D); GPT-OSS's experts gate_up_proj
    (E, D, 2I), gate and up columns alternating: sizes (1, 1), groups I. Each map is an (..., A, n_i)
    matrix; Newton-Schulz of a transpose is the transpose of Newton-Schulz, so it is orthogonalised
    as it stands."""
    dim = -1

    def split(self, x):
        return [b.mT for b in super().split(x.mT)]

    def join(self, parts):
        return super().join([p.mT for p in parts]).mT


def mark_fused(module, sizes, name="weight", *, columns=False, groups=1):
    """Declare that module.<name> holds several maps, so Muon orthogonalises each on its own: by
    default `sizes` row blocks ([q | k | v] of nanoGPT's c_attn: (D, D, D); a gate/up: (I, I));
    columns=True for a transposed weight (GPT-2's Conv1D); groups=n for blocks repeated n times
    (interleaved per head or per key head, see RowBlocks). Stored on the module (it survives
    deepcopy and FSDP2's parameter swap); the optimizer reads it when given the model (for_model,
    or model=). Returns the layout."""
    layout = (ColumnBlocks if columns else RowBlocks)(sizes, groups)
    layout.check(getattr(module, name), name)
    module.__dict__.setdefault("muon_blocks", {})[name] = layout
    return layout


# Names under which libraries store several maps in one weight. A weight of this name that no
# declaration covers and whose layout mark_known_fused cannot read gets a warning, never a silent
# orthogonalisation as one matrix.
FUSED_NAMES = ("c_attn", "qkv_proj", "query_key_value", "gate_up_proj", "qkv", "w_pack", "in_proj_weight",
               "wqkv", "Wqkv")


def _qkv_layout(m):
    """(projection, layout [q, k, v], number of key heads) of an attention module whose q, k and v
    come out of one projection in a layout read from the module itself, else None. The layouts
    are transformers' (read in each model's modeling file): GPT-2, Phi-3, Falcon, GPT-NeoX."""
    c_attn = getattr(m, "c_attn", None)
    if type(c_attn).__name__ == "Conv1D" and hasattr(m, "split_size") and not getattr(m, "is_cross_attention", 0):
        return c_attn, ColumnBlocks([m.split_size] * 3), m.num_heads      # GPT-2: y = x @ W, W (D, 3D)
    qkv = getattr(m, "qkv_proj", None)
    if isinstance(qkv, nn.Linear) and hasattr(m, "num_key_value_heads") and hasattr(m, "head_dim"):
        q_rows = qkv.out_features - 2 * m.num_key_value_heads * m.head_dim        # Phi-3: [q | k | v]
        return qkv, RowBlocks([q_rows] + [m.num_key_value_heads * m.head_dim] * 2), m.num_key_value_heads
    qkv = getattr(m, "query_key_value", None)
    if isinstance(qkv, nn.Linear) and hasattr(m, "new_decoder_architecture"):  # Falcon
        H, hd = m.num_heads, m.head_dim
        if m.new_decoder_architecture:                           # per key head: [its query heads | k | v]
            return qkv, RowBlocks([H // m.num_kv_heads * hd, hd, hd], groups=m.num_kv_heads), m.num_kv_heads
        if m.multi_query:                                        # [all queries | the key | the value]
            return qkv, RowBlocks([H * hd, hd, hd]), 1
        return qkv, RowBlocks([hd] * 3, groups=H), H             # per head [q | k | v]
    if isinstance(qkv, nn.Linear) and hasattr(m, "head_size"):  # GPT-NeoX: per head [q | k | v]
        H = qkv.out_features // (3 * m.head_size)
        return qkv, RowBlocks([m.head_size] * 3, groups=H), H
    return None


def _known_fused_layouts(m):
    """[(module, parameter name, layout)] for the fused weights of module m (itself or its direct
    children) whose layout can be read from m."""
    found = _qkv_layout(m)
    known = [(found[0], "weight", found[1])] if found else []
    if isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None:
        known.append((m, "in_proj_weight", RowBlocks([m.embed_dim] * 3)))         # rows [q | k | v]
    w = getattr(m, "gate_up_proj", None)
    if isinstance(w, nn.Parameter) and w.dim() == 3 and hasattr(m, "is_transposed"):    # transformers experts
        inner = w.shape[-1 if m.is_transposed else -2] // 2
        sizes, groups = ([inner, inner], 1) if getattr(m, "is_concatenated", True) else ([1, 1], inner)
        known.append((m, "gate_up_proj", (ColumnBlocks if m.is_transposed else RowBlocks)(sizes, groups)))
    if isinstance(w, nn.Linear) and w.out_features % 2 == 0:    # Phi-3, GLM: gate, up = out.chunk(2)
        known.append((w, "weight", RowBlocks([w.out_features // 2] * 2)))
    return known


def mark_known_fused(model):
    """Declare every fused weight of `model` whose layout can be read from its modules: the q|k|v
    projections of GPT-2 (Conv1D columns), Phi-3, GPT-NeoX and Falcon (rows, see RowBlocks),
    nn.MultiheadAttention's in_proj_weight, a transformers experts gate_up_proj in each of its four
    layouts (rows or columns, [gate | up] or alternating), an nn.Linear gate_up_proj as [gate | up].
    Weights already declared keep their declaration. Then warn, with the line to add, for every
    matrix whose name says fused (FUSED_NAMES) that no declaration covers. MuonClip calls it
    whenever it is given the model. Returns {qualified parameter name: layout} it declared."""
    names = {m: n for n, m in model.named_modules()}
    declared = {}
    for m in model.modules():
        for owner, name, layout in _known_fused_layouts(m):
            if name not in owner.__dict__.get("muon_blocks", {}):
                layout.check(getattr(owner, name), name)
                owner.__dict__.setdefault("muon_blocks", {})[name] = layout
                declared[f"{names[owner]}.{name}".lstrip(".")] = layout
    _warn_undeclared_fused(model)
    return declared


def _warn_undeclared_fused(model):
    """Warn, with the line to add, for each matrix named as fused (FUSED_NAMES) that no declaration
    covers: Muon would orthogonalise its maps together, as one matrix."""
    blocks, fused_names = fused_blocks(model), {n.lower() for n in FUSED_NAMES}
    for name, p in model.named_parameters():
        owner, _, pname = name.rpartition(".")
        leaf = owner.rpartition(".")[2] if pname == "weight" else pname
        if p.dim() < 2 or leaf.lower() not in fused_names or id(p) in blocks:
            continue
        parts, rows = (2 if "gate" in leaf.lower() else 3), p.shape[-2]
        sizes = [rows // parts] * parts if rows % parts == 0 else "[the row counts of its maps]"
        warnings.warn(f"MuonClip: {name} {tuple(p.shape)} is named as fused (several maps in one weight) but its "
                      f"layout is unknown, so Muon would orthogonalise it as one matrix; declare its maps, e.g. "
                      f"for {parts} row blocks: muonclip.mark_fused(model.get_submodule({owner!r}), {sizes}, "
                      f"{pname!r}) (columns=True for blocks of columns, groups=n for blocks repeated per head; "
                      "see RowBlocks)", stacklevel=3)


def fused_blocks(model):
    """{id(parameter): layout} for every parameter declared with mark_fused (layout: see RowBlocks)."""
    return {id(getattr(m, name)): layout for m in model.modules()
            for name, layout in getattr(m, "muon_blocks", {}).items()}


def split_params(model):
    """Split the trainable parameters by role: (muon_params, adamw_params).

    Muon: every parameter with ndim >= 2 (hidden matrices; (E, A, B) stacks are E matrices), except
    AdamW: nn.Embedding weights, the output head (`model.get_output_embeddings()` where defined, else a
    direct child of `model` named lm_head / output / head; a deeper module of that name is a hidden
    layer like any other), any parameter that is also an embedding's weight (a tied head),
    convolution kernels, and every parameter with ndim < 2 (norm gains, biases). Buffers (e.g. a
    router bias kept as one) are not parameters.
    """
    tables = [m for m in model.modules() if isinstance(m, (nn.Embedding, nn.modules.conv._ConvNd))]
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    tables += [head] if head is not None else [m for n, m in model.named_children() if n in HEAD_NAMES]
    not_muon = {id(p) for m in tables for p in m.parameters()}
    muon, adamw = [], []
    for p in model.parameters():                                 # tied parameters come once
        if p.requires_grad:
            (muon if p.ndim >= 2 and id(p) not in not_muon else adamw).append(p)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    muon_ids, adamw_ids = {id(p) for p in muon}, {id(p) for p in adamw}
    assert not muon_ids & adamw_ids and muon_ids | adamw_ids == trainable, \
        "every trainable parameter must be in exactly one optimizer group"
    return muon, adamw


def find_attention_modules(model):
    """Modules with the QK-Clip surface (`max_logits` and `qk_clip_`), in model order."""
    return [m for m in model.modules() if hasattr(m, "max_logits") and hasattr(m, "qk_clip_")]


def _check_attention_module(m):
    """The surface, checked once at construction rather than failing at the first step."""
    what = type(m).__name__
    H = getattr(m, "num_heads", None)
    if not isinstance(H, int) or H < 1:
        raise ValueError(f"attention module {what} needs an integer `num_heads` for QK-Clip (got {H!r})")
    S = getattr(m, "max_logits", None)
    if not isinstance(S, torch.Tensor) or tuple(S.shape) != (H,):
        raise ValueError(f"attention module {what}: `max_logits` must be a ({H},) tensor, one per head")
    if not callable(getattr(m, "qk_clip_", None)):
        raise ValueError(f"attention module {what} has max_logits but no callable `qk_clip_(gamma)`")


# ---------------------------------------------------------------------- transformers models

_HF_ATTENTION = "muonclip_qk_clip"


def attach_qk_clip(model, rules=None):
    """Give every attention module of a transformers decoder the QK-Clip surface; returns them.

    The clip rule, by what the module has (each read from transformers' modeling files):
    - separate q_proj / k_proj (Llama, Mistral, Mixtral, Qwen2, Gemma2, GPT-OSS; GQA, q/k biases):
      qk_clip_mha_ on weights and biases;
    - one fused q|k|v projection (GPT-2's Conv1D c_attn, Phi-3's qkv_proj, GPT-NeoX's and Falcon's
      query_key_value, in the layouts of _qkv_layout): qk_clip_fused_mha_ on that layout, which is
      also declared (mark_known_fused) so Muon orthogonalises q, k and v as separate maps; likewise
      fused gate/up weights (Phi-3's gate_up_proj, experts of Mixtral, DeepseekV3, GPT-OSS);
    - DeepseekV3's MLA (q_b_proj or, without a q LoRA, q_proj; kv_b_proj): qk_clip_mla_, the rule of
      kimik2.MLA;
    - a QK-norm whose gain holds one entry per row of each head and multiplies the normalised
      output (OLMo2: one norm over all heads together; Cohere with use_qk_norm: per head, gains
      (H, hd)): the norm undoes any scale of q_proj's rows, but the gain comes after it, so
      qk_clip_mha_ on the q and k norm gains scales the head's logits (checked on a probe).
    Refused, with the reason: any other QK-norm (Qwen3, Gemma3: one gain of head_dim shared by all
    heads; StableLM's per-head LayerNorm: a bias after the gain), Falcon with ALiBi (the position
    bias is added to q.k and does not scale with the weights), cross-attention, an unknown class
    (pass `rules`), flex_attention (its BlockMask cannot be read).

    rules: {attention class or class name: qk_clip_(module, gamma)}, the public path for a class this
    helper does not know (or to replace its rule): the function rescales the module's weights in
    place (use qk_clip_mha_ / qk_clip_fused_mha_ / qk_clip_mla_). The statistic comes for free when
    the class computes attention through transformers' AttentionInterface (ALL_ATTENTION_FUNCTIONS,
    as nearly every decoder of transformers 5 does); a fused projection also needs mark_fused.

    The statistic, S_h: each module's config is replaced by a view of the model's config whose
    attention implementation is a registered wrapper that, on training forwards, takes the exact
    max (causal_max_logits) of the logits the model's own implementation (eager, sdpa, flash...;
    read from the model's config at every call) computes on the same q, k, scaling and mask (a 4-D
    mask as given; flash's 2-D padding mask, causal flag, sliding window and packed position_ids as
    flash applies them), over the query rows of real tokens only (a query whose own position is
    masked is padding), then calls that implementation unchanged. The model builds its masks with
    its real config, so nothing else changes. Falcon, which computes attention inline, is read by a
    forward pre-hook that takes q and k from the same inputs as its forward (one more no-grad
    projection per layer). What is recorded is scaling * q.k before anything else is applied: for
    Gemma2 the score before the tanh soft-cap (softcap * tanh(s / softcap)). That suits the clip rule: the cap is monotone, so clipping the
    pre-cap score at tau bounds the capped one by softcap * tanh(tau / softcap), and the rule scales
    exactly that pre-cap score by gamma (the cap of a clipped score is not gamma times the cap).
    GPT-OSS's sinks (a learned per-head logit beside the keys, not a q.k product) are not counted.

    What holds after a step: S_h comes from the step's forwards and the clip scales the weights the
    update produced (K2 report, Algorithm 1), so on the input S_h was measured on the head's logits
    are its factor (gamma_h, or sqrt(gamma_h * its key group's smallest gamma)) times those of the
    updated weights: <= tau for a clip-only step, not whenever the update raised them.
    """
    from transformers import AttentionInterface
    AttentionInterface.register(_HF_ATTENTION, _hf_attention)
    if str(model.config._attn_implementation).startswith("flex"):
        raise ValueError("attach_qk_clip: flex_attention's BlockMask cannot be read; load the model "
                         "with attn_implementation='sdpa', 'eager' or a flash one")
    rules = {k if isinstance(k, str) else k.__name__: rule for k, rule in (rules or {}).items()}
    mark_known_fused(model)
    found = []
    for name, m in model.named_modules():
        what = type(m).__name__
        if not (what.rstrip("0123456789").endswith("Attention") and hasattr(m, "config")):
            continue
        if "max_logits" not in m._buffers:                       # a second call changes nothing
            rule = functools.partial(rules[what], m) if what in rules else _hf_clip_rule(name, m)
            inline = hasattr(m, "_split_heads") and hasattr(m, "new_decoder_architecture")   # Falcon
            if not inline and not _hf_calls_attention_interface(m):
                raise ValueError(f"attach_qk_clip: {name} ({what}) does not compute attention through "
                                 "transformers' ALL_ATTENTION_FUNCTIONS, so its logits cannot be read; give it "
                                 "the surface by hand (muonclip.record_max_logits_ in its forward)")
            m.qk_clip_ = rule
            m.num_heads = m.config.num_attention_heads
            device = next(m.parameters()).device
            m.register_buffer("max_logits", torch.full((m.num_heads,), -math.inf, device=device),
                              persistent=False)
            if inline:
                m.register_forward_pre_hook(_hf_record_inline, with_kwargs=True)
            else:
                m.config = _AttentionConfigView(m.config)
        found.append(m)
    if not found:
        raise ValueError(f"attach_qk_clip: no attention module it can read (a class name ending in 'Attention', "
                         f"with a config) in {type(model).__name__}; give yours the surface by hand (README, "
                         "\"MuonClip in your model\", recipe 1)")
    return found


def trainer_optimizer(**kwargs):
    """MuonClip for transformers' Trainer: Trainer(..., optimizer_cls_and_kwargs=
    muonclip.trainer_optimizer(lr=2e-3, weight_decay=0.1, qk_clip_tau=100.0)).

    Returns (factory, kwargs): Trainer calls the factory, then its result with (its model, **kwargs),
    so MuonClip gets the model itself (roles, fused blocks, attention modules) and kwargs is never
    changed: the same pair serves a second Trainer (a resume). The form (MuonClip, {"model": model,
    ...}) works once: Trainer removes "model" from the very dict it is given."""
    return (lambda: MuonClip), kwargs


def _hf_clip_rule(name, m):
    """The qk_clip_ of a transformers attention module, or the reason it cannot have one."""
    what = f"{name} ({type(m).__name__})"
    q_norm, k_norm = (next((getattr(m, n) for n in names if getattr(m, n, None) is not None), None)
                      for names in (("q_norm", "q_layernorm"), ("k_norm", "k_layernorm")))
    if q_norm is not None or k_norm is not None:
        H, hd = m.config.num_attention_heads, m.head_dim
        Hkv = getattr(m.config, "num_key_value_heads", H)
        if _gain_scales_each_row(q_norm, H * hd) and _gain_scales_each_row(k_norm, Hkv * hd):
            return functools.partial(_hf_qk_clip_norm_gains_, q_norm, k_norm, Hkv)   # OLMo2, Cohere
        raise ValueError(
            f"{what} normalises q and k after the projections (QK-norm) with no gain that scales each head's "
            "output on its own (Qwen3, Gemma3: one gain of head_dim shared by all heads; StableLM: a LayerNorm "
            "bias after the gain): the norm undoes any scaling of q_proj/k_proj, so QK-Clip cannot cap its "
            "logits; train it with qk_clip_tau=None")
    if getattr(m, "is_cross_attention", False):
        raise ValueError(f"{what} is cross-attention (queries from the decoder, keys from the encoder states), "
                         "which attach_qk_clip does not handle; give its modules the surface by hand (README, "
                         "\"MuonClip in your model\", recipe 1) or train with qk_clip_tau=None")
    if hasattr(m, "kv_b_proj"):
        return functools.partial(_hf_qk_clip_mla_, m)
    if all(isinstance(getattr(m, proj, None), nn.Linear) for proj in ("q_proj", "k_proj")):
        # key heads from the shapes (q and k share head_dim): GPT-J's, OPT's configs do not name them
        kv_heads = m.k_proj.out_features * m.config.num_attention_heads // m.q_proj.out_features
        return functools.partial(_hf_qk_clip_mha_, m, kv_heads)
    fused = _qkv_layout(m)
    if fused is not None and getattr(m.config, "alibi", False):
        raise ValueError(f"{what} uses ALiBi: its logits are (q.k + a position bias) * scale, and the bias does "
                         "not scale with the weights, so QK-Clip cannot scale the head's logits by gamma; train "
                         "it with qk_clip_tau=None")
    if fused is not None:
        return functools.partial(_hf_qk_clip_fused_, *fused)
    raise ValueError(f"{what} has neither separate q_proj/k_proj, a known fused q|k|v projection nor MLA's "
                     "kv_b_proj: pass its clip rule, attach_qk_clip(model, rules={" + type(m).__name__ +
                     ": fn(module, gamma)}) (README, \"MuonClip in your model\", recipe 4)")


def _hf_calls_attention_interface(m):
    """Whether the module's forward dispatches through transformers' attention registry (what the
    config view relies on); a class whose source cannot be read is taken at its word."""
    try:
        return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(type(m).forward)
    except (OSError, TypeError):
        return True


class _AttentionConfigView:
    """An attention module's view of the model config: every field is the config's own, except the
    attention implementation, which routes the module's attention call through _hf_attention."""
    _attn_implementation = _HF_ATTENTION

    def __init__(self, config):
        object.__setattr__(self, "wrapped", config)

    def __getattr__(self, name):                 # only for names not found on the view itself
        if name == "wrapped":                    # not yet set (unpickling, deepcopy)
            raise AttributeError(name)
        return getattr(self.wrapped, name)

    def __setattr__(self, name, value):
        setattr(self.wrapped, name, value)


def _hf_attention(module, query, key, value, attention_mask, *args, **kwargs):
    """The registered wrapper: record the exact max logit, then run the model's own attention."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    config = module.config.wrapped
    if is_training_forward(module):
        scale = kwargs.get("scaling")
        scale = query.shape[-1] ** -0.5 if scale is None else scale
        record_max_logits_(module, query, key, scale,
                           **_hf_visibility(module, query, key, attention_mask, config, kwargs))
    if config._attn_implementation == "eager" and getattr(module, "reorder_and_upcast_attn", False):
        return module._upcast_and_reordered_attn(query, key, value, attention_mask)   # GPT-2's eager option
    eager = sys.modules[type(module).__module__].eager_attention_forward
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager)
    return attention(module, query, key, value, attention_mask, *args, **kwargs)


def _hf_record_inline(m, args, kwargs):
    """Forward pre-hook of an attention module that computes attention inline (Falcon): q and k as
    its forward makes them from the same inputs (fused projection, head split, rotary), then the max
    of scale * q.k over what its sdpa / eager / flash path masks."""
    if not is_training_forward(m):
        return
    call = inspect.signature(m.forward).bind(*args, **kwargs).arguments
    with torch.no_grad():
        q, k, _ = m._split_heads(m.query_key_value(call["hidden_states"]))      # (B, T, H|Hkv, hd)
        q, k = q.transpose(1, 2), k.transpose(1, 2)                              # (B, H|Hkv, T, hd)
        cos, sin = call["position_embeddings"]
        q, k = sys.modules[type(m).__module__].apply_rotary_pos_emb(q, k, cos, sin)
    visibility = _hf_visibility(m, q, k, call.get("attention_mask"), m.config,
                                {"position_ids": call.get("position_ids")})
    record_max_logits_(m, q, k, m.inv_norm_factor, **visibility)


def _hf_visibility(module, query, key, mask, config, kwargs):
    """causal_max_logits' causal/attention_mask for what the model's implementation masks, on the
    query rows of real tokens: a query whose own position is not visible to it is padding (a
    right-padded row would otherwise count the real keys before it)."""
    if mask is not None and not isinstance(mask, torch.Tensor):
        raise TypeError(f"attach_qk_clip: cannot read an attention mask of type {type(mask).__name__}")
    Tq, Tk = query.shape[2], key.shape[2]
    if (mask is not None and mask.dim() == 4) or config._attn_implementation == "eager":
        if mask is None:
            return dict(causal=False, attention_mask=None)
        # causal, padding, windows: all in the mask, bool (True = keep) or additive (dtype min = masked)
        visible = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min
        real = visible.diagonal(visible.shape[-1] - visible.shape[-2], -2, -1)   # each query's own key
        real = real[..., None]                                                # (B|1, H|1, Tq, 1)
        return dict(causal=False, attention_mask=mask & real if mask.dtype == torch.bool
                    else mask.masked_fill(~real, -math.inf))
    causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if causal is None else causal)
    if mask is None and "flash" not in config._attn_implementation:
        return dict(causal=causal, attention_mask=None)                       # sdpa, no padding
    # a (B, Tk) padding mask, or flash: the window and packed sequences come as kwargs
    i = torch.arange(Tq, device=query.device)[:, None] + (Tk - Tq)            # (Tq, 1)
    j = torch.arange(Tk, device=query.device)                                 # (Tk,)
    keep = (j <= i) if causal else torch.ones(Tq, Tk, dtype=torch.bool, device=query.device)
    window = kwargs.get("sliding_window")
    if window is not None and Tk > window:
        keep = keep & (i - j < window)
    keep = keep[None]                                                         # (1, Tq, Tk)
    positions = kwargs.get("position_ids")
    if mask is None and positions is not None and Tq == Tk:                   # packed documents
        doc = (positions == 0).cumsum(-1)                                     # (B, T)
        keep = keep & (doc[:, :, None] == doc[:, None, :])
    if mask is not None:
        keep = keep & mask.bool()[:, None, :]
        keep = keep & keep.diagonal(Tk - Tq, -2, -1)[..., None]               # real query rows
    return dict(causal=False, attention_mask=keep[:, None])                   # (B|1, 1, Tq, Tk)


def _hf_qk_clip_mha_(m, kv_heads, gamma):
    qk_clip_mha_(m.q_proj.weight, m.k_proj.weight, gamma, kv_heads)
    if m.q_proj.bias is not None:
        qk_clip_mha_(m.q_proj.bias, m.k_proj.bias, gamma, kv_heads)


def _hf_qk_clip_fused_(proj, layout, num_kv_heads, gamma):
    for t in (proj.weight, proj.bias):
        if t is not None:
            qk_clip_fused_mha_(t, gamma, num_kv_heads, layout)


def _gain_scales_each_row(norm, rows):
    """Whether norm has one gain per output row (rows of them, head-major) that multiplies its output,
    tried on a probe: doubling the gain doubles the output (not so for a (1 + w) gain or a bias)."""
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or w.numel() != rows:
        return False
    with torch.no_grad():
        x = torch.randn(2, *w.shape, dtype=w.dtype, device=w.device)
        y = norm(x)
        w.mul_(2)
        twice = norm(x)
        w.div_(2)                                                # exact: powers of two
    return torch.allclose(twice, 2 * y)


def _hf_qk_clip_norm_gains_(q_norm, k_norm, num_kv_heads, gamma):
    """The gain of a QK-norm comes after the normalisation: scaling head h's gain entries scales
    its q (k) exactly, where scaling q_proj's rows would be divided out."""
    qk_clip_mha_(q_norm.weight, k_norm.weight, gamma, num_kv_heads)


def _hf_qk_clip_mla_(m, gamma):
    w_q = m.q_proj.weight if m.q_proj is not None else m.q_b_proj.weight
    qk_clip_mla_(w_q, m.kv_b_proj.weight, gamma, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim)


# ------------------------------------------------------- distributed: DTensor shards <-> full

def _local(t):
    """The shard this rank holds (the tensor itself when not a DTensor)."""
    return t.to_local() if isinstance(t, DTensor) else t


def _matrices_are_split(p):
    """True when a DTensor shards one of the last two dims, so no rank holds whole matrices.

    FSDP2 shards dim 0: a 2-D weight is split by rows, an (E, A, B) expert stack by experts.
    """
    return isinstance(p, DTensor) and any(
        pl.is_shard() and pl.dim % p.ndim >= p.ndim - 2 for pl in p.placements)


def _full(local, p):
    """Gather the full tensor of p's layout from this rank's `local` shard (all-gather)."""
    return DTensor.from_local(local, p.device_mesh, p.placements,
                              shape=p.shape, stride=p.stride()).full_tensor()


def _local_part(full, p):
    """The part of `full` (shaped like p) that this rank holds under p's placements; no comm."""
    if not isinstance(p, DTensor):
        return full
    replicated = DTensor.from_local(full, p.device_mesh, [Replicate()] * p.device_mesh.ndim)
    return replicated.redistribute(p.device_mesh, p.placements).to_local()


# ---------------------------------------------------------------------------------- the optimizer

class MuonClip(torch.optim.Optimizer):
    """Muon + AdamW in one optimizer, followed by QK-Clip on the attention modules.

    params: a model (roles from split_params, attention modules and fused blocks found in it: what
      for_model does, and what transformers' Trainer passes for optimizer_cls_and_kwargs=(MuonClip,
      {"model": model, ...})), or parameter groups. A group with `use_muon` (bool) keeps it; a group
      without one (e.g. Trainer's weight-decay groups) is split by role, which needs model=.
    lr: one learning rate for both halves (Muon updates are RMS-matched to AdamW's).
    weight_decay: decoupled, W -= lr * weight_decay * W, both halves.
    momentum, nesterov, ns_steps, ns_dtype: Muon. betas, eps: AdamW.
    qk_clip_tau: logit cap (K2: 100); None turns the clip off (the statistic is still reduced,
      reset and reported in clip_stats). With tau set and no attention module it raises.
    attention_modules: modules with the surface in the module docstring; default: found in model.
    model: the model the groups come from, for roles, fused blocks and attention modules.
    """

    def __init__(self, params, lr=2e-4, weight_decay=0.1, momentum=0.95, nesterov=True, ns_steps=5,
                 betas=(0.9, 0.95), eps=1e-8, qk_clip_tau=100.0, attention_modules=None,
                 ns_dtype=torch.bfloat16, model=None):
        if isinstance(params, nn.Module):
            model, params = params, None
        self._muon_ids = {id(p) for p in split_params(model)[0]} if model is not None else None
        if model is not None:
            mark_known_fused(model)                       # declares known fused layouts, warns for others
        self._blocks = fused_blocks(model) if model is not None else {}
        if params is None:
            params = [{"params": [p for p in model.parameters() if p.requires_grad]}]
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_steps=ns_steps, ns_dtype=ns_dtype, betas=betas, eps=eps)
        super().__init__(params, defaults)
        if attention_modules is None:
            attention_modules = find_attention_modules(model) if model is not None else ()
        self.attention_modules = list(attention_modules)
        for m in self.attention_modules:
            _check_attention_module(m)
        if qk_clip_tau is not None and not self.attention_modules:
            raise ValueError(
                f"qk_clip_tau={qk_clip_tau} but no attention module has the QK-Clip surface (num_heads, "
                "max_logits, qk_clip_(gamma)): give your attention modules that surface, call "
                "muonclip.attach_qk_clip(model) on a transformers model, or pass qk_clip_tau=None")
        self.qk_clip_tau = qk_clip_tau
        self.clip_stats = {}
        low = {p.dtype for g in self.param_groups for p in g["params"]
               if p.is_floating_point() and p.dtype != torch.float32}
        if low:
            warnings.warn(f"MuonClip: parameters in {sorted(map(str, low))}, not float32: updates below half "
                          "an ulp are lost (bf16: weight decay at lr*wd = 1e-3 does nothing); keep fp32 "
                          "master weights and use autocast", stacklevel=2)

    @classmethod
    def for_model(cls, model, lr, weight_decay, qk_clip_tau=100.0, **kw):
        """The whole recipe for one model: role split, fused blocks and the attention modules."""
        return cls(model, lr=lr, weight_decay=weight_decay, qk_clip_tau=qk_clip_tau, **kw)

    def add_param_group(self, param_group):
        """Validates `use_muon`; a group without it is split by role (needs the model)."""
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        if "use_muon" not in param_group:
            if self._muon_ids is None:
                raise ValueError("every parameter group needs 'use_muon' (True or False), or pass "
                                 "model= so MuonClip can split the group by role (split_params); with "
                                 "Trainer(optimizer_cls_and_kwargs=...), put \"model\": model in the kwargs")
            for use_muon in (True, False):
                part = [p for p in params if (id(p) in self._muon_ids) == use_muon]
                if part:
                    self.add_param_group({**param_group, "params": part, "use_muon": use_muon})
            return
        if not isinstance(param_group["use_muon"], bool):
            raise ValueError(f"'use_muon' must be True or False, not {param_group['use_muon']!r}")
        if param_group["use_muon"]:
            for p in params:
                if not 2 <= p.ndim <= 3:
                    raise ValueError(f"Muon groups take matrices (A, B) or stacks of matrices (E, A, B); got "
                                     f"a tensor of shape {tuple(p.shape)}: send it to AdamW (use_muon=False)")
        super().add_param_group({**param_group, "params": params})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self._muon_step if group["use_muon"] else self._adamw_step)(group, params)
        if self.attention_modules:
            self._qk_clip()
        return loss

    def _muon_step(self, group, params):
        """muon_update for every parameter, with the matrices of one shape in one batched
        Newton-Schulz call; fused parameters contribute one matrix (stack) per declared block."""
        lr, wd = group["lr"], group["weight_decay"]
        grads = [_local(p.grad) for p in params]
        for p, g in zip(params, grads):
            if not self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(g)
        inputs = [muon_momentum_(g, self.state[p]["momentum_buffer"], group["momentum"], group["nesterov"])
                  for p, g in zip(params, grads)]
        # Newton-Schulz needs whole matrices: gather only where a matrix dim is sharded
        gather = [_matrices_are_split(p) for p in params]
        whole = [_full(x, p) if g else x for x, p, g in zip(inputs, params, gather)]
        blocks = [self._blocks[id(p)].split(x) if id(p) in self._blocks else [x]
                  for x, p in zip(whole, params)]
        by_shape = defaultdict(list)                              # (A, B) -> [(param, block)]
        for i, bs in enumerate(blocks):
            for j, b in enumerate(bs):
                by_shape[tuple(b.shape[-2:])].append((i, j))

        local_params = [_local(p) for p in params]
        torch._foreach_mul_(local_params, 1 - lr * wd)            # decoupled weight decay
        ortho = [list(bs) for bs in blocks]                       # -> (orthogonalised block, its scale)
        for shape, members in by_shape.items():
            stack = torch.cat([blocks[i][j].reshape(-1, *shape) for i, j in members])   # (N, A, B)
            out = newton_schulz(stack, group["ns_steps"], dtype=group["ns_dtype"])
            counts = [math.prod(blocks[i][j].shape[:-2]) for i, j in members]         # matrices per block
            for (i, j), o in zip(members, out.split(counts)):
                ortho[i][j] = (o.reshape(blocks[i][j].shape), rms_matching_scale(shape))
        for p, local, parts, g in zip(params, local_params, ortho, gather):
            if len(parts) == 1:  # the scale rides on alpha, as muon_update's -lr * scale
                o, scale = parts[0]                               # (a bf16 o is added as if upcast first)
                local.add_(_local_part(o.to(local.dtype), p) if g else o, alpha=-lr * scale)
                continue
            update = self._blocks[id(p)].join([o.to(local.dtype) * scale for o, scale in parts])
            local.add_(_local_part(update, p) if g else update, alpha=-lr)

    def _adamw_step(self, group, params):
        lr, wd, (beta1, beta2), eps = group["lr"], group["weight_decay"], group["betas"], group["eps"]
        grads = [_local(p.grad) for p in params]
        states = [self.state[p] for p in params]
        for s, g in zip(states, grads):
            if not s:
                s.update(step=0, exp_avg=torch.zeros_like(g), exp_avg_sq=torch.zeros_like(g))
            s["step"] += 1
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        # bias correction, per parameter (a parameter without a gradient on some step lags behind)
        step_sizes = [-lr / (1 - beta1 ** s["step"]) for s in states]
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, [math.sqrt(1 - beta2 ** s["step"]) for s in states])
        torch._foreach_add_(denom, eps)
        local_params = [_local(p) for p in params]
        torch._foreach_mul_(local_params, 1 - lr * wd)
        torch._foreach_addcdiv_(local_params, exp_avgs, denom, step_sizes)

    def _qk_clip(self):
        """QK-Clip after the update (K2 report sec. 2.1, Algorithm 1): the step's reduced max logits,
        gamma per head, every module called (unclipped heads get exactly 1: no host sync)."""
        max_logits = reduce_max_logits_(self.attention_modules)  # (L, H)
        if self.qk_clip_tau is None:
            clipped = torch.zeros((), dtype=torch.long, device=max_logits.device)
        else:
            gamma = qk_clip_gamma(max_logits, self.qk_clip_tau)  # (L, H)
            for m, g in zip(self.attention_modules, gamma):
                m.qk_clip_(g[:m.num_heads])
            clipped = (max_logits > self.qk_clip_tau).sum()
        self.clip_stats = {"max_logits": max_logits, "heads_clipped": clipped}
