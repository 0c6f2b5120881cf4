"""MuonClip: Muon for hidden matrices, AdamW for the rest, then per-head QK-Clip (Kimi-K2).

Kimi-K2 (arXiv 2507.20534, sec. 2.1) trains with MuonClip: Muon in Moonlight's form ("Muon is
Scalable for LLM Training", arXiv 2502.16982, sec. 2) followed, after every update, by QK-Clip (K2
report sec. 2.1, Algorithm 1). Needs torch only: copy this file alone into any project.

    opt = MuonClip.for_model(model, lr=2e-4, weight_decay=0.1, qk_clip_tau=100.0)
    loss.backward(); opt.step(); opt.zero_grad()
    opt.clip_stats  # {'max_logits': (L, H) before clipping, 'heads_clipped': scalar} - no host sync

The rule (`muon_update`, the code the optimizer runs), for each hidden matrix W (A, B) with gradient G:
    M <- mu M + G;  O = NewtonSchulz(G + mu M);  W <- W (1 - lr wd) - lr 0.2 sqrt(max(A, B)) O
(mu 0.95, Nesterov; 0.2 sqrt(max(A, B)) matches AdamW's update RMS, so one lr and weight decay serve
both halves, Moonlight eq. 4). Every other parameter gets AdamW (betas 0.9, 0.95). Then QK-Clip: each
head whose largest pre-softmax logit of the step S_h exceeded tau gets its query/key weights rescaled
so that its logits shrink by gamma_h = tau / S_h; other heads are multiplied by exactly 1.

Where Muon must NOT be used (split_params sends these to AdamW)
- Embeddings and the output head: tables of independent per-token vectors, not linear maps; each
  step touches only the rows of the tokens seen, and orthogonalising spreads that over every row.
- Vectors (norm gains, biases) and convolution kernels: no matrix to orthogonalise.
- Several maps in one tensor (a fused QKV, a fused gate/up): orthogonalised as one matrix they would
  be coupled; declare the blocks with `mark_fused` and each is orthogonalised on its own. A stack
  (E, A, B) of MoE experts is E independent matrices; a 2-D stack (E*I, D) is declared with mark_fused.

The attention surface QK-Clip talks to (duck-typed; the module has it, this file does not import it)
- `num_heads` int; `max_logits`: (num_heads,) fp32 tensor, the running max over every training
  forward since the last reset of the head's scaled, masked pre-softmax logits, -inf when reset
  (`record_max_logits_` feeds it from `causal_max_logits` when the kernel hides its logits).
- `qk_clip_(gamma)`: gamma (num_heads,); rescale in place, without grad, so that the head's logits
  on the same input are multiplied by gamma_h (or at most gamma_h, GQA); under FSDP2 only the local
  rows. Rules: `qk_clip_mha_`, `qk_clip_fused_mha_`, `qk_clip_mla_`.
- optional `reset_max_logits_()` (without it max_logits is filled with -inf here); optional
  `check_qk_clip()`: raises where the clip could not take effect (MuonClip calls it when built).

Companions (each imports this file, never the reverse at module level): muonclip_hf.py
(`attach_qk_clip`: the surface for transformers decoders; `trainer_optimizer`; both also as
muonclip.X), muonclip_dist.py (under torchrun each Newton-Schulz unit orthogonalised on one process;
without it every process orthogonalises everything, correctly), muonclip_ns.py (NS variants).
"""
import functools
import math
import time
import warnings

import torch
import torch.distributed as dist
from torch import nn

if dist.is_available():
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
else:
    DTensor = ()  # isinstance(x, ()) is False: no tensor is ever a DTensor

# ----------------------------------------------------------------------------------- Muon maths

# Keller Jordan's quintic: the coefficients maximise the slope at zero, so 5 steps push every
# singular value into roughly [0.7, 1.2] instead of converging exactly to 1.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(G, steps=5, eps=1e-7, dtype=None, variant="jordan"):
    """Approximate orthogonalisation U V^T of each matrix G = U S V^T (Moonlight sec. 2).

    G: (..., A, B), leading dims are a batch of independent matrices. Returns (..., A, B) in `dtype`
    (None: default_ns_dtype of G's device). The one place that handles orientation: a tall G is
    worked on transposed, so X X^T is always the small Gram matrix. variant: "jordan" (Keller
    Jordan's quintic every step, the one this file runs); others are muonclip_ns.py's.
    """
    if variant != "jordan":
        import muonclip_ns                                        # Polar Express, Gram: for measuring
        return muonclip_ns.newton_schulz(G, steps, eps, dtype, variant)
    X = G.to(dtype or default_ns_dtype(G.device.type)).reshape(-1, *G.shape[-2:])   # (N, A, B)
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT.contiguous()                                     # (N, B, A), now wide (and laid out so)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)            # Frobenius >= spectral: all sigma in [0, 1]
    a, b, c = NS_COEFFICIENTS
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


@torch.no_grad()
def muon_update(weights, grads, momentum_buffers, lr, weight_decay=0.0, beta=0.95, nesterov=True,
                ns=newton_schulz, layouts=None, shapes=None, orthogonalise=None):
    """One Muon step on a list of weights, in place (Moonlight sec. 2, eq. 4): the rule, batched.

        M <- beta M + G;  O = NS(G + beta M) per matrix;  W <- W (1 - lr wd) - lr 0.2 sqrt(max(A, B)) O

    Each weight is a matrix (A, B), a stack (E, A, B) of independent matrices (e.g. MoE experts), or a
    fused tensor with a layout (see RowBlocks) whose parts are orthogonalised and scaled each on its
    own. ns: the Newton-Schulz applied to an (N, A, B) batch of units. orthogonalise(inputs, layouts,
    ns) -> directions: orthogonalise_by_shape by default; under torchrun the optimizer passes one that
    works on this process's shards of weights of full `shapes`. momentum_buffers are updated in place.
    torch.optim.Muon keeps an EMA momentum instead of the sum, a scale Newton-Schulz removes.
    """
    layouts = layouts or [None] * len(weights)
    shapes = shapes or [w.shape for w in weights]
    torch._foreach_mul_(momentum_buffers, beta)
    torch._foreach_add_(momentum_buffers, grads)                                  # M <- beta M + G
    inputs = torch._foreach_add(grads, momentum_buffers, alpha=beta) if nesterov else momentum_buffers
    directions = (orthogonalise or orthogonalise_by_shape)(inputs, layouts, ns)
    torch._foreach_mul_(weights, 1 - lr * weight_decay)           # decoupled weight decay
    for w, d, layout, shape in zip(weights, directions, layouts, shapes):
        # a fused weight's parts carry their own scales; otherwise the scale rides on alpha, so
        # -lr * scale * O is rounded once (a bf16 O is added as if upcast first)
        w.add_(d, alpha=-lr * (1.0 if layout is not None else rms_matching_scale(shape)))


def orthogonalise_by_shape(inputs, layouts, ns):
    """Each input's direction for muon_update, in its dtype: `ns` of every unit (each matrix of a
    stack, each part of a fused layout), all units of one (A, B) shape in one batched call. A fused
    input's parts are scaled each by its own rms_matching_scale and joined by the layout."""
    parts = [layout.split(x) if layout is not None else [x] for x, layout in zip(inputs, layouts)]
    units = [q for ps in parts for q in ps]                       # (..., A, B) each
    by_shape = {}                                                 # (A, B) -> indices into units
    for i, q in enumerate(units):
        by_shape.setdefault(tuple(q.shape[-2:]), []).append(i)
    done = [None] * len(units)
    for shape, members in by_shape.items():
        stack = torch.cat([units[i].reshape(-1, *shape) for i in members])        # (N, A, B)
        counts = [math.prod(units[i].shape[:-2]) for i in members]                # matrices per unit
        for i, o in zip(members, ns(stack).split(counts)):
            done[i] = o.reshape(units[i].shape)
    done, directions = iter(done), []
    for x, ps, layout in zip(inputs, parts, layouts):
        outs = [next(done).to(x.dtype) for _ in ps]
        directions.append(outs[0] if layout is None else
                          layout.join([o * rms_matching_scale(o.shape) for o in outs]))
    return directions


@functools.lru_cache(maxsize=None)
def default_ns_dtype(device_type):
    """The Newton-Schulz precision when the caller does not choose one (ns_dtype=None): bfloat16 on
    CUDA (as reference Muon) and on a CPU with bf16 matmul instructions; float32 on every other CPU,
    where bf16 matmul is emulated and about 10x slower. The CPU is judged by the flags Linux reports
    for x86 (avx512_bf16, amx_bf16), else (macOS, ARM) by timing bf16 against float32 matmul once."""
    if device_type != "cpu":
        return torch.bfloat16 if device_type == "cuda" else torch.float32
    flags = _cpu_flags()
    fast = bool(flags & {"avx512_bf16", "amx_bf16"}) if flags is not None else _bf16_matmul_is_faster()
    return torch.bfloat16 if fast else torch.float32


def _cpu_flags():
    """The x86 instruction-set flags of /proc/cpuinfo, or None where there are none to read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return None


def _bf16_matmul_is_faster():
    """Whether a batch of (128, 128) products runs faster in bf16 than in float32 (fastest of 6 runs)."""
    def seconds(y):
        start = time.perf_counter()
        torch.bmm(y, y)
        return time.perf_counter() - start
    x = torch.randn(8, 128, 128)
    return min(seconds(x.bfloat16()) for _ in range(6)) < min(seconds(x) for _ in range(6))


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
    factor = factor.to(w_qkv.dtype).expand(w_qkv.shape) if w_qkv.dim() > 1 else factor.to(w_qkv.dtype).flatten()
    _local(w_qkv).mul_(_local_part(factor, w_qkv))


# twin of kimik2.py's qk_clip_mla_ (kimik2.py copies alone; a test keeps the two equal)
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


# twin of kimik2.py's _scale_rows_ (kimik2.py copies alone; a test keeps the two equal)
def _scale_rows_(w, row_factor):
    """w (rows, ...) *= row_factor (rows,) in place; on a DTensor only the rows this rank holds."""
    factor = row_factor.to(w.dtype).view(-1, *([1] * (w.dim() - 1))).expand(w.shape)  # like w
    _local(w).mul_(_local_part(factor, w))


# ------------------------------------------------------------------- the exact max logit (S_h)

# twin of kimik2.py's causal_max_logits (kimik2.py copies alone; a test keeps the two equal)
@torch.no_grad()
def causal_max_logits(q, k, scale, *, causal=True, attention_mask=None, chunk_size=None):
    """Per-head max over batch, query and key positions of the pre-softmax logit scale * q.k.

    q (B, H, Tq, D), k (B, Hkv, Tk, D) with H % Hkv == 0 (grouped-query: query head h reads key
    head h // (H // Hkv)). Returns (H,) float32, -inf for a head that sees no key. The products are
    float32 from the q and k given (pass the ones the kernel uses), with the caller's autocast off
    (bf16 would round 3.0021 to 3.0). Visibility: with `causal`, key j is visible to query i iff
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
        with torch.autocast(q.device.type, enabled=False):
            s = (qg[:, :, :, i:i + rows].float() @ kt) * scale                # (B, Hkv, G, r, Tk)
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
    """Whether this forward feeds S: training with grad enabled (S is the training step's max)."""
    return module.training and torch.is_grad_enabled()


def record_max_logits_(module, q, k, scale, **visibility):
    """module.max_logits = max(module.max_logits, causal_max_logits(q, k, scale, **visibility)) on
    training forwards (the one place this file raises S; reduce_max_logits_ resets it)."""
    if is_training_forward(module):
        if torch.is_autocast_enabled(q.device.type):             # the kernel casts q and k, so do we
            q, k = (t.to(torch.get_autocast_dtype(q.device.type)) for t in (q, k))
        s = causal_max_logits(q.detach(), k.detach(), scale, **visibility)
        torch.maximum(module.max_logits, s.to(module.max_logits.device), out=module.max_logits)


def reduce_max_logits_(attention_modules, async_op=False):
    """The step's (L, H) fp32 max logits of the modules, MAX-reduced across processes in one
    collective when torch.distributed is initialised, then every module's statistic is reset to
    -inf. Heads beyond a layer's num_heads (if layers differ) are -inf padding. MuonClip.step calls
    it; a trainer that steps another optimizer calls it once per step to log the statistic.
    async_op=True: (max_logits, work), the collective under way; work.wait() (if not None) first."""
    max_logits = nn.utils.rnn.pad_sequence([m.max_logits.detach().float() for m in attention_modules],
                                           batch_first=True, padding_value=-math.inf)
    distributed = dist.is_available() and dist.is_initialized()
    work = dist.all_reduce(max_logits, op=dist.ReduceOp.MAX, async_op=async_op) if distributed else None
    for m in attention_modules:
        if hasattr(m, "reset_max_logits_"):
            m.reset_max_logits_()
        else:
            m.max_logits.fill_(-math.inf)
    return (max_logits, work) if async_op else max_logits


# ------------------------------------------------------------------- fused layouts and roles

class RowBlocks:
    """A fused layout: several maps stored along the rows of one weight (..., rows, B). The rows are
    `groups` repeats of [block 0 | block 1 | ...] of `sizes` rows; map i is its block gathered from
    every group, a (..., groups * sizes[i], B) matrix. groups=1 is plain stacking (nanoGPT's c_attn
    (3D, D): sizes (D, D, D); Phi-3's qkv_proj: (H*hd, Hkv*hd, Hkv*hd); a gate/up: (I, I); a 2-D
    stack of E experts (E*I, D): (I,) * E); GPT-NeoX's query_key_value is per head [q | k | v]:
    sizes (hd, hd, hd), groups H; Falcon's grouped one is per key head [its query heads | k | v]:
    sizes (G*hd, hd, hd), groups Hkv.

    The layout protocol the optimizer reads: split(x) -> the independent matrices (stacks) of x,
    each (..., A_i, B_i); join(parts) -> a tensor shaped like x from parts shaped like split's."""
    dim = -2                                                     # the fused dimension

    def __init__(self, sizes, groups=1):
        self.sizes, self.groups = tuple(int(s) for s in sizes), int(groups)

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


def fused_blocks(model):
    """{id(parameter): layout} for every parameter declared with mark_fused (layout: see RowBlocks)."""
    return {id(getattr(m, name)): layout for m in model.modules()
            for name, layout in getattr(m, "muon_blocks", {}).items()}


# Names under which libraries store several maps in one weight. A weight of this name that no
# declaration covers gets a warning, never a silent orthogonalisation as one matrix.
FUSED_NAMES = ("c_attn", "qkv_proj", "query_key_value", "gate_up_proj", "qkv", "w_pack", "in_proj_weight",
               "wqkv", "Wqkv")


def mark_known_fused(model):
    """Declare torch's fused weights (nn.MultiheadAttention's in_proj_weight, rows [q | k | v]), then
    warn with the mark_fused line for each undeclared matrix named as fused (FUSED_NAMES) or as a 2-D
    expert stack. MuonClip calls it when given the model. Returns {parameter name: layout} declared."""
    declared = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None and \
                "in_proj_weight" not in m.__dict__.get("muon_blocks", {}):
            declared[f"{name}.in_proj_weight".lstrip(".")] = mark_fused(m, [m.embed_dim] * 3, "in_proj_weight")
    blocks, fused_names = fused_blocks(model), {n.lower() for n in FUSED_NAMES}
    config = getattr(model, "config", None)                      # an expert count it names, for the line
    experts = next((getattr(config, f) for f in ("num_local_experts", "num_experts", "n_routed_experts",
                                                  "moe_num_experts") if isinstance(getattr(config, f, None), int)), 0)
    for name, p in model.named_parameters():
        owner, _, pname = name.rpartition(".")
        leaf = owner.rpartition(".")[2] if pname == "weight" else pname
        stack = p.dim() == 2 and pname != "weight" and "expert" in name.lower()     # DBRX's w1: (E*I, D)
        if id(p) in blocks or not (stack or p.dim() >= 2 and leaf.lower() in fused_names):
            continue
        parts, rows = (experts if stack else 2 if "gate" in leaf.lower() else 3), p.shape[-2]
        sizes = (f"[{rows // parts}] * {parts}" if stack else [rows // parts] * parts) if parts and rows % parts == 0 \
            else "[I] * E" if stack else "[the row counts of its maps]"
        warnings.warn(f"MuonClip: {name} {tuple(p.shape)} is named as "
                      f"{'a 2-D stack of experts' if stack else 'fused (several maps in one weight)'} but its layout is "
                      f"unknown, so Muon would orthogonalise it as one matrix; declare its maps, e.g. "
                      f"muonclip.mark_fused(model.get_submodule({owner!r}), {sizes}, {pname!r}) (row blocks; "
                      "columns=True for blocks of columns, groups=n for blocks repeated per head; see RowBlocks; "
                      "a transformers model: muonclip_hf.mark_known_fused(model) knows its families)", stacklevel=3)
    return declared


HEAD_NAMES = ("lm_head", "output", "head")


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
    if callable(getattr(m, "check_qk_clip", None)):
        m.check_qk_clip()                         # e.g. muonclip_hf's: wrappers, clamps, hooks


# ---------------------------------------------------------------------------------- the optimizer

class MuonClip(torch.optim.Optimizer):
    """Muon + AdamW in one optimizer, followed by QK-Clip on the attention modules.

    params: a model (roles from split_params, attention modules and fused blocks found in it: what
      for_model does), or parameter groups. A group with `use_muon` (bool) keeps it; a group without
      one (e.g. a trainer's weight-decay groups) is split by role, which needs model=.
    lr: one learning rate for both halves (Muon updates are RMS-matched to AdamW's).
    weight_decay: decoupled, W -= lr * weight_decay * W, both halves.
    momentum, nesterov, ns_steps: Muon. betas, eps: AdamW.
    ns_dtype: Newton-Schulz precision; None: default_ns_dtype (bf16 on CUDA and on CPUs with fast bf16
      matmul, float32 elsewhere). ns_variant: newton_schulz's variant ("jordan", the default).
    distribute: under torchrun, share the work out (muonclip_dist.py beside this file); "newton_schulz":
      share only that, each process keeping the whole state (for trainers that save one process's
      state); False: every process orthogonalises everything.
    qk_clip_tau: logit cap (K2: 100); None turns the clip off (the statistic is still reduced,
      reset and reported in clip_stats). With tau set and no attention module it raises.
    attention_modules: modules with the surface (module docstring); default: found in model=, the
      model the groups come from (for roles, fused blocks and attention modules).

    Under torchrun see _group_steps (muonclip_dist.py: under DDP each process keeps its share of the
    state, state_dict() is collective); max logits are all-reduced (MAX): every replica clips alike.
    Under DDP pass broadcast_buffers=False, or rank 0's max_logits overwrite the other ranks'.
    Parameters should be fp32 master weights (autocast for bf16 compute): a bf16 weight loses every
    update below half its ulp (weight decay at lr*wd = 1e-3 does nothing), so other dtypes warn.
    """

    def __init__(self, params, lr=2e-4, weight_decay=0.1, momentum=0.95, nesterov=True, ns_steps=5,
                 betas=(0.9, 0.95), eps=1e-8, qk_clip_tau=100.0, attention_modules=None,
                 ns_dtype=None, model=None, ns_variant="jordan", distribute=True):
        if isinstance(params, nn.Module):
            model, params = params, None
        self._muon_ids = {id(p) for p in split_params(model)[0]} if model is not None else None
        if model is not None:
            mark_known_fused(model)                       # torch's own fused layouts; warns for unknown ones
        self._blocks = fused_blocks(model) if model is not None else {}
        if params is None:
            params = [{"params": [p for p in model.parameters() if p.requires_grad]}]
        if ns_variant != "jordan" and ns_variant not in __getattr__("NS_VARIANTS"):   # muonclip_ns.py's
            raise ValueError(f"ns_variant {ns_variant!r} is not one of {__getattr__('NS_VARIANTS')}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_steps=ns_steps, ns_dtype=ns_dtype, ns_variant=ns_variant, betas=betas, eps=eps)
        if distribute not in (True, False, "newton_schulz"):
            raise ValueError(f"distribute must be True, False or 'newton_schulz', not {distribute!r}")
        self.distribute, self._shared = distribute, None
        self.newton_schulz_matrices = 0           # matrices this process orthogonalised in the last step
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
        self.qk_clip_tau, self.clip_stats = qk_clip_tau, {}
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
                raise ValueError("every parameter group needs 'use_muon' (True or False), or pass model= so "
                                 "MuonClip can split the group by role (split_params); a framework that builds "
                                 "the optimizer from a class and a kwargs dict may have dropped model= from it")
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
        self.newton_schulz_matrices = 0
        # the max logits are final: their reduction (under torchrun a collective) runs during the update
        max_logits = reduce_max_logits_(self.attention_modules, async_op=True) if self.attention_modules else None
        muon_step, adamw_step, share = self._group_steps()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params and group["use_muon"]:
                muon_step(group, params)
            elif params:
                adamw_step(group, params)
        share()                                   # under torchrun: the processes' updates to every process
        if max_logits is not None:
            self._qk_clip(*max_logits)
        return loss

    def _muon_step(self, group, params, orthogonalise=None):
        """muon_update on this process's tensors (FSDP2: its shards; split matrices gathered whole)."""
        grads = [_local(p.grad) for p in params]
        for p, g in zip(params, grads):
            if not self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(g)
        if orthogonalise is None and any(isinstance(p, DTensor) for p in params):
            orthogonalise = functools.partial(orthogonalise_everywhere, params=params)
        muon_update([_local(p) for p in params], grads, [self.state[p]["momentum_buffer"] for p in params],
                    group["lr"], group["weight_decay"], group["momentum"], group["nesterov"],
                    functools.partial(self._newton_schulz, group), [self._blocks.get(id(p)) for p in params],
                    [p.shape for p in params], orthogonalise)

    def _newton_schulz(self, group, stack):
        self.newton_schulz_matrices += stack.shape[0]             # (N, A, B): what this process orthogonalised
        return newton_schulz(stack, group["ns_steps"], dtype=group["ns_dtype"], variant=group.get("ns_variant", "jordan"))

    def _adamw_step(self, group, params):
        lr, wd, (beta1, beta2), eps = group["lr"], group["weight_decay"], group["betas"], group["eps"]
        grads = [_local(p.grad) for p in params]
        states = [self.state[p] for p in params]
        for s, g in zip(states, grads):
            if not s:
                s.update(step=0, exp_avg=torch.zeros_like(g), exp_avg_sq=torch.zeros_like(g))
            s["step"] += 1
        exp_avgs, exp_avg_sqs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
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

    def _qk_clip(self, max_logits, work):
        """QK-Clip after the update (K2 report sec. 2.1, Algorithm 1): the step's max logits (L, H),
        reduced once work (None on one process) is done, gamma per head, every module called
        (unclipped heads get exactly 1: no host sync). S_h was measured before the update and the clip
        scales the updated weights, so on that input a clipped head's logits become gamma_h (GQA: <=
        gamma_h) times the updated weights' logits: <= tau when the update did not raise them (always
        for a clip-only step, lr = 0)."""
        if work is not None:
            work.wait()
        if self.qk_clip_tau is None:
            clipped = torch.zeros((), dtype=torch.long, device=max_logits.device)
        else:
            gamma = qk_clip_gamma(max_logits, self.qk_clip_tau)  # (L, H)
            for m, g in zip(self.attention_modules, gamma):
                m.qk_clip_(g[:m.num_heads])
            clipped = (max_logits > self.qk_clip_tau).sum()
        self.clip_stats = {"max_logits": max_logits, "heads_clipped": clipped}

    def _group_steps(self):
        """(muon_step, adamw_step, share): two f(group, params with a gradient), share() after all
        groups. This process's own, or under torchrun muonclip_dist.group_steps (if beside this file).
        Without it (or distribute=False) every process does everything: correct, only not shared out."""
        if not (self.distribute and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self._muon_step, self._adamw_step, lambda: None
        if self._shared is None:
            try:
                import muonclip_dist
            except ImportError:
                warnings.warn("MuonClip: muonclip_dist.py is not beside muonclip.py, so every process "
                              "orthogonalises every matrix (correct, not shared out); copy it beside "
                              "muonclip.py to share the work", stacklevel=3)
                self._shared = (self._muon_step, self._adamw_step, lambda: None)
            else:
                self._shared = muonclip_dist.group_steps(self)
        return self._shared


# ------------------------------------------- processes: DTensor shards, when muonclip_dist is absent

# twin of kimik2.py's _local (kimik2.py copies alone; a test keeps the two equal)
def _local(t):
    """The shard this rank holds (the tensor itself when not a DTensor)."""
    return t.to_local() if isinstance(t, DTensor) else t


# twin of kimik2.py's _local_part (kimik2.py copies alone; a test keeps the two equal)
def _local_part(full, p):
    """The part of `full` (shaped like p) this rank holds, cut as DTensor cuts a Shard (torch.chunk per
    mesh dim, empty past the last chunk): no communication. Strided shards (with tensor parallel): DTensor's."""
    if not isinstance(p, DTensor):
        return full
    if any(pl.is_shard() and type(pl) is not Shard for pl in p.placements):
        return distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
    for size, i, pl in zip(p.device_mesh.shape, p.device_mesh.get_coordinate(), p.placements):
        if pl.is_shard():
            full = (*full.chunk(size, pl.dim), *[full.narrow(pl.dim, 0, 0)] * size)[i]
    return full


def _full(local, p):
    """Gather the full tensor of p's layout from this rank's `local` shard (all-gather)."""
    return DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()).full_tensor()


def _matrices_are_split(p):
    """True when a DTensor shards one of the last two dims, so no rank holds whole matrices.
    FSDP2 shards dim 0: a 2-D weight is split by rows, an (E, A, B) expert stack by experts."""
    return isinstance(p, DTensor) and any(pl.is_shard() and pl.dim % p.ndim >= p.ndim - 2 for pl in p.placements)


def orthogonalise_everywhere(inputs, layouts, ns, *, params):
    """orthogonalise_by_shape of every unit on this process, for its shards `inputs` of `params`: a
    matrix split across processes (FSDP2) is gathered whole; this process keeps its part of the result."""
    gather = [_matrices_are_split(p) for p in params]
    whole = [_full(x, p) if g else x for x, p, g in zip(inputs, params, gather)]
    directions = orthogonalise_by_shape(whole, layouts, ns)
    return [_local_part(d, p) if g else d for d, p, g in zip(directions, params, gather)]


def __getattr__(name):
    """Names documented as muonclip.X that live in a companion (PEP 562): imported on first use."""
    companion = {"attach_qk_clip": "muonclip_hf", "trainer_optimizer": "muonclip_hf",
                 "NS_VARIANTS": "muonclip_ns"}.get(name)
    if companion is None:
        raise AttributeError(f"module 'muonclip' has no attribute {name!r}")
    try:
        return getattr(__import__(companion), name)
    except ModuleNotFoundError as e:
        if e.name != companion:
            raise
        raise ImportError(f"muonclip.{name} lives in {companion}.py: copy it beside muonclip.py") from None
