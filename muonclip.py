"""MuonClip: Muon for hidden matrices, AdamW for the rest, then per-head QK-Clip (Kimi-K2).

Kimi-K2 (arXiv 2507.20534, sec. 2.1) trains with MuonClip: Muon in Moonlight's form ("Muon is
Scalable for LLM Training", arXiv 2502.16982, sec. 2) followed, after every update, by QK-Clip (K2
report sec. 2.1, Algorithm 1). Needs torch only (transformers only inside `attach_qk_clip`): copy it
alone into any project.

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
  be coupled; declare the blocks with `mark_fused` and each is orthogonalised on its own.
A stack (E, A, B), e.g. MoE experts, is E independent matrices.

The attention surface QK-Clip talks to (duck-typed; the module has it, this file does not import it)
- `num_heads` int; `max_logits`: (num_heads,) fp32 tensor, the running max over every training
  forward since the last reset of the head's scaled, masked pre-softmax logits, -inf when reset
  (`record_max_logits_` feeds it from `causal_max_logits` when the kernel hides its logits).
- `qk_clip_(gamma)`: gamma (num_heads,); rescale in place, without grad, so that the head's logits
  on the same input are multiplied by gamma_h (or at most gamma_h, GQA); under FSDP2 only the local
  rows. Rules: `qk_clip_mha_`, `qk_clip_fused_mha_`, `qk_clip_mla_`.
- optional `reset_max_logits_()`; without it max_logits is filled with -inf here.
`attach_qk_clip(model)` gives a transformers decoder (Llama, Qwen2, DeepseekV3, ...) the whole surface.
"""
import functools
import inspect
import itertools
import math
import sys
import time
import warnings
from collections import defaultdict

import torch
import torch.distributed as dist
from torch import nn

if dist.is_available():
    from torch.distributed.tensor import DTensor, Replicate
else:
    DTensor = ()  # isinstance(x, ()) is False: no tensor is ever a DTensor

# ----------------------------------------------------------------------------------- Muon maths

# Keller Jordan's quintic ("jordan"): the coefficients maximise the slope at zero, so 5 steps push
# every singular value into roughly [0.7, 1.2] instead of converging exactly to 1.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
# Polar Express (arXiv 2505.16932, Algorithm 1): a different minimax-optimal quintic per iteration,
# each divided by a safety factor 1.01 (a / 1.01, b / 1.01^3, c / 1.01^5; the last one, which later
# iterations repeat, is left as is) so that bf16 rounding cannot push a singular value past the
# interval the next polynomial was fitted on; the input is normalised by 1.01 * its norm likewise.
_POLAR_EXPRESS_SAFETY = 1.01
POLAR_EXPRESS_COEFFICIENTS = tuple(
    [(a / _POLAR_EXPRESS_SAFETY, b / _POLAR_EXPRESS_SAFETY ** 3, c / _POLAR_EXPRESS_SAFETY ** 5) for a, b, c in (
        (8.28721201814563, -23.595886519098837, 17.300387312530933),
        (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
        (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
        (3.3184196573706015, -2.488488024314874, 0.51004894012372),
        (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
        (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
        (1.8750014808534479, -1.2500016453999487, 0.3750001645474248))]
    + [(1.875, -1.25, 0.375)])
# "gram": the Polar Express polynomials applied through the small Gram matrix (Dao-AILab's Gram
# Newton-Schulz): after this many iterations the accumulated transform is applied and the Gram matrix
# recomputed from the result, so rounding in the (A, A) products cannot build up over all steps.
GRAM_RESTART = 2
NS_VARIANTS = ("jordan", "polar_express", "gram")


@functools.lru_cache(maxsize=None)
def default_ns_dtype(device_type):
    """The Newton-Schulz precision used when the caller does not choose one (ns_dtype=None).

    bfloat16 on CUDA (as reference Muon) and on a CPU with bf16 matmul instructions; float32 on every
    other CPU, where bf16 matmul is emulated and about 10x slower than float32. The CPU is judged by
    the flags Linux reports for x86 (avx512_bf16, amx_bf16), else (macOS, ARM) by timing bf16 against
    float32 matmul once per process. Pass ns_dtype=torch.float32 or torch.bfloat16 to choose yourself."""
    if device_type == "cuda":
        return torch.bfloat16
    if device_type != "cpu":
        return torch.float32
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
    """Whether a batch of (128, 128) products runs faster in bf16 than in float32 (best of 5)."""
    x = torch.randn(8, 128, 128)
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        y = x.to(dtype)
        torch.bmm(y, y)                                           # the first call warms up
        times = []
        for _ in range(5):
            start = time.perf_counter()
            torch.bmm(y, y)
            times.append(time.perf_counter() - start)
        best[dtype] = min(times)
    return best[torch.bfloat16] < best[torch.float32]


def newton_schulz(G, steps=5, eps=1e-7, dtype=None, variant="jordan"):
    """Approximate orthogonalisation U V^T of each matrix G = U S V^T (Moonlight sec. 2).

    G: (..., A, B), leading dims are a batch of independent matrices. Returns (..., A, B) in `dtype`
    (None: default_ns_dtype of G's device). The one place that handles orientation: a tall G is
    worked on transposed, so X X^T is always the small Gram matrix. variant: "jordan" (Keller
    Jordan's quintic every step), "polar_express" (the per-step quintics of arXiv 2505.16932) or
    "gram" (the same per-step quintics, iterated on the Gram matrix; see _gram_iterations).
    """
    if variant not in NS_VARIANTS:
        raise ValueError(f"newton_schulz: variant {variant!r} is not one of {NS_VARIANTS}")
    X = G.to(dtype or default_ns_dtype(G.device.type)).reshape(-1, *G.shape[-2:])   # (N, A, B)
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT.contiguous()                                     # (N, B, A), now wide (and laid out so)
    # Frobenius norm >= spectral norm, so every singular value starts in [0, 1]
    if variant == "jordan":
        X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
        coefficients = [NS_COEFFICIENTS] * steps
    else:
        X = X / (X.norm(dim=(-2, -1), keepdim=True) * _POLAR_EXPRESS_SAFETY + eps)
        table = POLAR_EXPRESS_COEFFICIENTS
        coefficients = [table[min(i, len(table) - 1)] for i in range(steps)]
    if variant == "gram":
        X = _gram_iterations(X, coefficients)
    else:
        for a, b, c in coefficients:
            A = X @ X.mT                                          # (N, small, small)
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)           # b*A + c*A@A
            X = torch.baddbmm(X, B, X, beta=a)                    # a*X + B@X
    if tall:
        X = X.mT
    return X.reshape(G.shape)


def _gram_iterations(X, coefficients):
    """The quintic steps X <- p(X X^T) X with p(R) = a I + b R + c R^2, carried out on the (N, m, m)
    Gram matrix R of the wide (N, m, n) X: with X_t = Q_t X_0, Q <- P Q and R <- P R P (P is a
    polynomial in R, so symmetric and commuting with it), and X = Q X_0 at the end. Each step costs
    O(m^3) instead of O(m^2 n), a gain when n >> m; restarted after GRAM_RESTART steps."""
    eye = torch.eye(X.size(-2), dtype=X.dtype, device=X.device)
    Q, R = None, X @ X.mT                                         # Q None: the identity
    for i, (a, b, c) in enumerate(coefficients):
        if i == GRAM_RESTART and Q is not None:
            X, Q = Q @ X, None
            R = X @ X.mT
        P = torch.baddbmm(R, R, R, beta=b, alpha=c) + a * eye     # a I + b R + c R^2, (N, m, m)
        Q = P if Q is None else P @ Q
        R = P @ R @ P
    return X if Q is None else Q @ X


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


@torch.no_grad()
def muon_update(weights, grads, momentum_buffers, lr, weight_decay=0.0, beta=0.95, nesterov=True,
                 ns_steps=5, ns_dtype=None, ns_variant="jordan", layouts=None, shapes=None,
                 orthogonalise=None):
    """One Muon step on a list of weights, in place (Moonlight sec. 2, eq. 4): the rule, batched.

        M <- beta M + G;  O = NS(G + beta M) per matrix;  W <- W (1 - lr wd) - lr 0.2 sqrt(max(A, B)) O

    Each weight is a matrix (A, B), a stack (E, A, B) of independent matrices (e.g. MoE experts), or a
    fused tensor with a layout (see RowBlocks) whose split parts are orthogonalised and scaled each on
    its own. The Newton-Schulz units are every matrix of every stack and part; all units of one shape
    go through one batched newton_schulz call (orthogonalise_by_shape). MuonClip.step calls this with
    the local shards of its parameters, their full `shapes`, and an `orthogonalise` that shares the
    units out among the processes. momentum_buffers are updated in place.
    """
    layouts = layouts or [None] * len(weights)
    shapes = shapes or [w.shape for w in weights]
    inputs = [muon_momentum_(g, m, beta, nesterov) for g, m in zip(grads, momentum_buffers)]
    dtype = ns_dtype or default_ns_dtype(weights[0].device.type)
    ns = functools.partial(newton_schulz, steps=ns_steps, dtype=dtype, variant=ns_variant)
    directions = (orthogonalise or orthogonalise_by_shape)(inputs, layouts, ns)
    torch._foreach_mul_(weights, 1 - lr * weight_decay)           # decoupled weight decay
    for w, d, layout, shape in zip(weights, directions, layouts, shapes):
        # a fused weight's parts carry their own scales; otherwise the scale rides on alpha, so
        # -lr * scale * O is rounded once (a bf16 O is added as if upcast first)
        w.add_(d, alpha=-lr * (1.0 if layout is not None else rms_matching_scale(shape)))


def orthogonalise_by_shape(inputs, layouts, ns):
    """Each input's direction for muon_update: `ns` applied to every unit, one call per unit shape.
    A plain input's direction is its units' NS output; a fused input's is its parts' outputs, each
    times its own rms_matching_scale, joined by the layout."""
    parts = [_parts(x, layout) for x, layout in zip(inputs, layouts)]
    flat = [q for ps in parts for q in ps]
    done = iter(ns_by_shape(flat, ns))
    return [_direction([next(done) for _ in ps], layout, x.dtype) for x, ps, layout in zip(inputs, parts, layouts)]


def ns_by_shape(tensors, ns):
    """ns of every tensor (..., A, B), batched: all matrices of one (A, B) go through one call.
    Returns results shaped like the inputs (in ns's dtype). Batching does not change a result: on the
    CPU a matrix's NS is bitwise the same alone or in any batch (a test checks this)."""
    by_shape = defaultdict(list)                                  # (A, B) -> indices into tensors
    for i, t in enumerate(tensors):
        by_shape[tuple(t.shape[-2:])].append(i)
    out = [None] * len(tensors)
    for shape, members in by_shape.items():
        stack = torch.cat([tensors[i].reshape(-1, *shape) for i in members])   # (N, A, B)
        counts = [math.prod(tensors[i].shape[:-2]) for i in members]           # matrices per tensor
        for i, o in zip(members, ns(stack).split(counts)):
            out[i] = o.reshape(tensors[i].shape)
    return out


def _parts(x, layout):
    """The independent parts of x: its layout's split, or x itself (a matrix or a stack)."""
    return layout.split(x) if layout is not None else [x]


def _direction(outputs, layout, dtype):
    """A weight's direction from its parts' NS outputs (see orthogonalise_by_shape)."""
    if layout is None:
        return outputs[0].to(dtype)
    return layout.join([o.to(dtype) * rms_matching_scale(o.shape) for o in outputs])



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
    training forwards only (is_training_forward): the one place this file raises the statistic;
    reduce_max_logits_ is the one that resets it."""
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

# twin of kimik2.py's _local (kimik2.py copies alone; a test keeps the two equal)
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


# twin of kimik2.py's _local_part (kimik2.py copies alone; a test keeps the two equal)
def _local_part(full, p):
    """The part of `full` (shaped like p) that this rank holds under p's placements; no comm."""
    if not isinstance(p, DTensor):
        return full
    replicated = DTensor.from_local(full, p.device_mesh, [Replicate()] * p.device_mesh.ndim)
    return replicated.redistribute(p.device_mesh, p.placements).to_local()


def _flat_ranges(p, world):
    """[(lo, hi)] per rank: the positions of p's flattened full tensor that each rank holds (a
    replicated tensor: all of them on every rank; FSDP2's Shard(0): torch.chunk's rows), or None
    for placements the exchange does not read (a mesh other than the whole world in rank order)."""
    n = p.numel()
    if not isinstance(p, DTensor):
        return [(0, n)] * world
    mesh, (placement, *more) = p.device_mesh, p.placements
    if more or mesh.mesh.flatten().tolist() != list(range(world)):
        return None
    if placement.is_replicate():
        return [(0, n)] * world
    if not (placement.is_shard() and placement.dim == 0):
        return None
    rows = p.shape[0]
    chunk, row = -(-rows // world), n // max(rows, 1)
    return [(min(r * chunk, rows) * row, min((r + 1) * chunk, rows) * row) for r in range(world)]


def _assign_owners(costs, holders, world):
    """Greedy bin-packing (longest first) of the units' NS costs onto ranks: each unit goes to the
    least-loaded rank, on a tie to the rank that holds its data. Deterministic: every rank computes
    the same assignment from the same list."""
    load, owners = [0.0] * world, [0] * len(costs)
    for u in sorted(range(len(costs)), key=lambda u: -costs[u]):
        owners[u] = min(range(world), key=lambda r: (load[r], r != holders[u], r))
        load[owners[u]] += costs[u]
    return owners


def _ns_cost(shape):
    """FLOPs of one Newton-Schulz step on an (A, B) matrix, up to a constant: m^2 (2n + m), m <= n."""
    m, n = sorted(shape)
    return m * m * (2 * n + m)


def _exchange(send, recv_sizes, dtype, device):
    """One all-to-all of packed buffers: send[r] (1-D tensors) goes to rank r; returns per source
    rank the 1-D buffer it sent here. It travels as bytes: gloo moves no bf16 or int16."""
    size = torch.empty(0, dtype=dtype).element_size()
    pieces = [t.reshape(-1) for ts in send for t in ts]
    out = torch.empty(sum(recv_sizes), dtype=dtype, device=device)
    data = torch.cat(pieces) if pieces else out.new_empty(0)
    dist.all_to_all_single(out.view(torch.uint8), data.view(torch.uint8),
                           output_split_sizes=[n * size for n in recv_sizes],
                           input_split_sizes=[sum(t.numel() for t in ts) * size for ts in send])
    return list(out.split(list(recv_sizes)))


class _Moves:
    """dst[to] = src[frm] for fixed 1-D index tensors: as slice copies when the indices run in long
    contiguous stretches (a block of rows is one stretch), else as one indexed copy."""

    def __init__(self, to, frm):
        self.size = to.numel()
        breaks = (((to[1:] - to[:-1]) != 1) | ((frm[1:] - frm[:-1]) != 1)).nonzero().flatten() + 1
        starts, ends = [0, *breaks.tolist()], [*breaks.tolist(), self.size]
        self.runs = None
        if self.size and self.size >= 32 * len(starts):
            self.runs = [(int(to[a]), int(frm[a]), b - a) for a, b in zip(starts, ends)]
        self.to, self.frm = to, frm

    def __call__(self, dst, src):
        if self.runs is None:
            dst[self.to] = src[self.frm]
            return
        for t, f, n in self.runs:
            dst[t:t + n] = src[f:f + n]

    def packed(self, src):
        """src[frm] as a new 1-D tensor (with to = 0, 1, ...)."""
        out = src.new_empty(self.size)
        self(out, src)
        return out


class _ExchangePlan:
    """Who orthogonalises which unit, and which elements orthogonalise_across_ranks moves where, for
    one list of parameters on this rank. It depends only on shapes, layouts and placements, so it is
    built once and reused at every step (int64 indices of the sharded elements this rank holds or owns).

    Units are (tensor, part, matrix of the part, (A, B)) in the same order on every rank. Sharded
    tensors (FSDP2's Shard(0)) move by index: `local` is the concatenation of this rank's flattened
    shards, `owned` that of its own units' elements; replicated tensors (DDP) move whole units."""

    def __init__(self, params, layouts, ranges, rank, device):
        world = dist.get_world_size()
        self.gathered = [r is None for r in ranges]          # placements read whole (see _flat_ranges)
        ranges = [[(0, p.numel())] * world if r is None else r for r, p in zip(ranges, params)]
        self.units, self.sharded = [], [any(r != (0, p.numel()) for r in rs) for p, rs in zip(params, ranges)]
        self.of_tensor = [[] for _ in params]     # per tensor: its units by part, [[u, ...] per part]
        positions = {}                            # sharded tensor -> per part (matrices, A*B) flat positions
        for i, (p, layout) in enumerate(zip(params, layouts)):
            for j, part in enumerate(_parts(torch.empty(p.shape, device="meta"), layout)):
                count = math.prod(part.shape[:-2])
                self.of_tensor[i].append(list(range(len(self.units), len(self.units) + count)))
                self.units += [(i, j, k, tuple(part.shape[-2:])) for k in range(count)]
            if self.sharded[i]:
                idx = torch.arange(p.numel(), device=device).view(p.shape)
                positions[i] = [q.reshape(q.shape[:-2].numel(), -1) for q in _parts(idx, layout)]
        base = dict(zip(positions, itertools.accumulate(
            [0] + [ranges[i][rank][1] - ranges[i][rank][0] for i in positions])))   # offset of each shard in `local`

        def held(u, r):                           # positions (in the unit) of its elements that rank r holds
            i, j, k, _ = self.units[u]
            lo, hi = ranges[i][r]
            pos = positions[i][j][k]
            return ((pos >= lo) & (pos < hi)).nonzero().flatten()
        # every rank must list the same units (data-parallel replicas); checked once per plan
        signature = torch.tensor([len(self.units), sum(p.numel() for p in params)], device=device)
        everyone = [torch.empty_like(signature) for _ in range(world)]
        dist.all_gather(everyone, signature)
        if any(not torch.equal(s, signature) for s in everyone):
            raise RuntimeError(
                f"MuonClip: the processes step different Muon parameters ((units, elements) per rank: "
                f"{[s.tolist() for s in everyone]}); sharing Newton-Schulz out needs data-parallel "
                "replicas (DDP, FSDP2); for other layouts pass distribute=False")
        holders = [next((r for r in range(world) if held(u, r).numel()), -1) if self.sharded[i] else -1
                   for u, (i, *_) in enumerate(self.units)]
        self.owners = _assign_owners([_ns_cost(shape) for *_, shape in self.units], holders, world)
        self.mine = [u for u, o in enumerate(self.owners) if o == rank]
        owned = [u for u in self.mine if self.sharded[self.units[u][0]]]
        self.offsets = dict(zip(owned, itertools.accumulate([0] + [math.prod(self.units[u][3]) for u in owned])))
        self.owned_size = sum(math.prod(self.units[u][3]) for u in owned)

        def in_local(u, r):                       # where rank r's elements of unit u sit in its `local`
            i, j, k, _ = self.units[u]
            return base[i] + positions[i][j][k][held(u, r)] - ranges[i][r][0]
        empty = torch.empty(0, dtype=torch.long, device=device)
        cat = lambda ts: torch.cat([empty, *ts])  # noqa: E731
        sharded_units = [u for u, (i, *_) in enumerate(self.units) if self.sharded[i]]
        packed = lambda index: _Moves(torch.arange(index.numel(), device=device), index)  # noqa: E731
        unpack = lambda index: _Moves(index, torch.arange(index.numel(), device=device))  # noqa: E731
        # 1. inputs: my elements of units others own -> them; theirs of my units -> `owned`
        self.send_inputs = [packed(cat([in_local(u, rank) for u in sharded_units if self.owners[u] == r != rank]))
                            for r in range(world)]
        self.receive_inputs = [unpack(cat([self.offsets[u] + held(u, s) for u in owned]) if s != rank else empty)
                               for s in range(world)]
        own_local, own_owned = cat([in_local(u, rank) for u in owned]), cat([self.offsets[u] + held(u, rank) for u in owned])
        self.own_inputs, self.own_results = _Moves(own_owned, own_local), _Moves(own_local, own_owned)
        # 2. results: of my units, the elements each rank holds -> it; of theirs, mine -> my `local`
        self.send_results = [packed(cat([self.offsets[u] + held(u, r) for u in owned]) if r != rank else empty)
                             for r in range(world)]
        self.receive_results = [unpack(cat([in_local(u, rank) for u in sharded_units if self.owners[u] == s != rank]))
                                for s in range(world)]
        self.whole_units = [[u for u in range(len(self.units)) if self.owners[u] == s != rank
                             and not self.sharded[self.units[u][0]]] for s in range(world)]
        self.local_size = sum(ranges[i][rank][1] - ranges[i][rank][0] for i in positions)
        # a fused sharded tensor's parts carry their own scales (see _direction): per local element
        self.scales = torch.ones(self.local_size, device=device)
        for u in sharded_units:
            i, j, k, shape = self.units[u]
            if layouts[i] is not None:
                self.scales[in_local(u, rank)] = rms_matching_scale(shape)


def orthogonalise_across_ranks(inputs, layouts, ns, *, params, dtype, plans):
    """orthogonalise_by_shape for data-parallel processes: each unit (a matrix, an expert, a part of a
    fused layout) orthogonalised on exactly one rank, and each rank given the part it holds.

    Units go to ranks by _assign_owners (balanced by NS cost); a rank batches its own units by shape.
    Two all-to-alls of packed buffers: under FSDP2 (Shard(0) DTensors) the first brings each owner
    the rows of its units that other ranks hold, and the second sends each rank only its shard of
    every result; replicated tensors (DDP) need only the second, in which each rank receives the whole
    results it did not compute. `inputs` are this rank's shards of `params`; directions come back
    shaped like them. Other placements are gathered whole first (as every rank did before). `plans`
    caches the _ExchangePlan of each parameter list.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    key = (dtype, *((id(p), tuple(p.shape), id(layout)) for p, layout in zip(params, layouts)))
    if key not in plans:
        plans[key] = _ExchangePlan(params, layouts, [_flat_ranges(p, world) for p in params], rank, inputs[0].device)
    plan = plans[key]
    inputs = [_full(x, p) if g else x for x, p, g in zip(inputs, params, plan.gathered)]
    device = inputs[0].device
    sharded = [x for x, s in zip(inputs, plan.sharded) if s]
    local = torch.cat([x.reshape(-1).to(dtype) for x in sharded]) if sharded else torch.empty(0, dtype=dtype, device=device)
    whole = [None if s else _parts(x, layout) for x, layout, s in zip(inputs, layouts, plan.sharded)]

    def unit(parts, u):                           # unit u of a replicated tensor, from its parts
        _, j, k, shape = plan.units[u]
        return parts[j].reshape(-1, *shape)[k]

    # 1. inputs to owners (only sharded tensors are not whole on their owner)
    owned = torch.empty(plan.owned_size, dtype=dtype, device=device)
    if any(plan.sharded):
        received = _exchange([[moves.packed(local)] for moves in plan.send_inputs],
                             [moves.size for moves in plan.receive_inputs], dtype, device)
        for moves, values in zip(plan.receive_inputs, received):
            moves(owned, values)
    plan.own_inputs(owned, local)
    unit_inputs = [owned[plan.offsets[u]:plan.offsets[u] + math.prod(plan.units[u][3])].view(plan.units[u][3])
                   if plan.sharded[plan.units[u][0]] else unit(whole[plan.units[u][0]], u) for u in plan.mine]
    results = dict(zip(plan.mine, ns_by_shape(unit_inputs, ns)))

    # 2. results to every rank that holds a part of them: whole for replicated tensors, else its shard
    for u in plan.offsets:
        owned[plan.offsets[u]:plan.offsets[u] + results[u].numel()] = results[u].reshape(-1)
    whole_mine = [u for u in plan.mine if not plan.sharded[plan.units[u][0]]]
    send = [[] if r == rank else [plan.send_results[r].packed(owned), *(results[u] for u in whole_mine)]
            for r in range(world)]
    sizes = [moves.size + sum(math.prod(plan.units[u][3]) for u in us)
             for moves, us in zip(plan.receive_results, plan.whole_units)]
    directions_local = torch.empty(plan.local_size, dtype=dtype, device=device)
    plan.own_results(directions_local, owned)
    for s, buffer in enumerate(_exchange(send, sizes, dtype, device)):
        if s == rank:
            continue
        n = plan.receive_results[s].size
        plan.receive_results[s](directions_local, buffer[:n])
        counts = [math.prod(plan.units[u][3]) for u in plan.whole_units[s]]
        results.update((u, b.view(plan.units[u][3])) for u, b in zip(plan.whole_units[s], buffer[n:].split(counts)))

    directions, offset = [], 0
    for i, (x, p, layout) in enumerate(zip(inputs, params, layouts)):
        if plan.sharded[i]:
            n = x.numel()
            d = directions_local[offset:offset + n].to(x.dtype)
            if layout is not None:
                d = d * plan.scales[offset:offset + n].to(x.dtype)
            directions.append(d.view(x.shape))
            offset += n
            continue
        d = _direction([torch.stack([results[u] for u in us]).reshape(q.shape)
                        for us, q in zip(plan.of_tensor[i], whole[i])], layout, x.dtype)
        directions.append(_local_part(d, p) if plan.gathered[i] else d)
    return directions


def orthogonalise_everywhere(inputs, layouts, ns, *, params):
    """orthogonalise_by_shape on every rank for every unit (MuonClip(distribute=False), the way
    before orthogonalise_across_ranks; kept to measure against): FSDP2 shards whose matrices are
    split are gathered whole, and each rank keeps its own part of the result."""
    gather = [_matrices_are_split(p) for p in params]
    whole = [_full(x, p) if g else x for x, p, g in zip(inputs, params, gather)]
    directions = orthogonalise_by_shape(whole, layouts, ns)
    return [_local_part(d, p) if g else d for d, p, g in zip(directions, params, gather)]


# ---------------------------------------------------------------------------------- the optimizer

class MuonClip(torch.optim.Optimizer):
    """Muon + AdamW in one optimizer, followed by QK-Clip on the attention modules.

    params: a model (roles from split_params, attention modules and fused blocks found in it: what
      for_model does, and what transformers' Trainer passes for optimizer_cls_and_kwargs=(MuonClip,
      {"model": model, ...})), or parameter groups. A group with `use_muon` (bool) keeps it; a group
      without one (e.g. Trainer's weight-decay groups) is split by role, which needs model=.
    lr: one learning rate for both halves (Muon updates are RMS-matched to AdamW's).
    weight_decay: decoupled, W -= lr * weight_decay * W, both halves.
    momentum, nesterov, ns_steps: Muon. betas, eps: AdamW.
    ns_dtype: Newton-Schulz precision; None: default_ns_dtype (bf16 on CUDA and on CPUs with fast bf16
      matmul, float32 elsewhere). ns_variant: newton_schulz's variant ("jordan", the default).
    distribute: with several processes, orthogonalise each unit on one rank and share the results
      (orthogonalise_across_ranks); False: every rank orthogonalises everything (the way before).
    qk_clip_tau: logit cap (K2: 100); None turns the clip off (the statistic is still reduced,
      reset and reported in clip_stats). With tau set and no attention module it raises.
    attention_modules: modules with the surface in the module docstring; default: found in model.
    model: the model the groups come from, for roles, fused blocks and attention modules.

    Distributed (torchrun): on one process every collective below is skipped. Under DDP and FSDP2
    (`fully_shard`, DTensor parameters) each Newton-Schulz unit is orthogonalised on one rank and the
    results shared (orthogonalise_across_ranks); momentum and AdamW state are this rank's shards, as
    its gradients. The (L, H) max-logit matrix is all-reduced with MAX in one collective, so every
    replica clips alike. Under DDP pass broadcast_buffers=False, or rank 0's max_logits overwrite the
    other ranks' running max at each forward and micro-batches seen only by other ranks are lost.
    Parameters should be fp32 master weights (autocast for bf16 compute): a bf16 weight loses every
    update below half its ulp (weight decay at lr*wd = 1e-3 does nothing), so other dtypes warn; a
    master copy kept here would double the memory of callers that keep one (AMP, FSDP2 mixed
    precision) and would undo the clip of the copy they run.
    """

    def __init__(self, params, lr=2e-4, weight_decay=0.1, momentum=0.95, nesterov=True, ns_steps=5,
                 betas=(0.9, 0.95), eps=1e-8, qk_clip_tau=100.0, attention_modules=None,
                 ns_dtype=None, model=None, ns_variant="jordan", distribute=True):
        if isinstance(params, nn.Module):
            model, params = params, None
        self._muon_ids = {id(p) for p in split_params(model)[0]} if model is not None else None
        if model is not None:
            mark_known_fused(model)                       # declares known fused layouts, warns for others
        self._blocks = fused_blocks(model) if model is not None else {}
        if params is None:
            params = [{"params": [p for p in model.parameters() if p.requires_grad]}]
        if ns_variant not in NS_VARIANTS:
            raise ValueError(f"ns_variant {ns_variant!r} is not one of {NS_VARIANTS}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_steps=ns_steps, ns_dtype=ns_dtype, ns_variant=ns_variant, betas=betas, eps=eps)
        self.distribute = distribute
        self._exchange_plans = {}                 # orthogonalise_across_ranks' plan per parameter list
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
        self.qk_clip_tau = qk_clip_tau
        self.clip_stats = {}
        low = {p.dtype for g in self.param_groups for p in g["params"]
               if p.is_floating_point() and p.dtype != torch.float32}
        if low:
            warnings.warn(f"MuonClip: parameters in {sorted(map(str, low))}, not float32: updates below half "
                          "an ulp are lost (bf16: weight decay at lr*wd = 1e-3 does nothing); keep fp32 "
                          "master weights and use autocast", stacklevel=2)

    def __setstate__(self, state):                # a checkpoint from before ns_variant existed
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("ns_variant", "jordan")

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
                                 "model= so MuonClip can split the group by role (split_params). With "
                                 "Trainer(optimizer_cls_and_kwargs=(MuonClip, kwargs)): Trainer removes \"model\" "
                                 "from the kwargs dict it is given, so a second Trainer given the same dict gets "
                                 "none; use muonclip.trainer_optimizer(...), which any number of Trainers can share")
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
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self._muon_step if group["use_muon"] else self._adamw_step)(group, params)
        if self.attention_modules:
            self._qk_clip()
        return loss

    def _muon_step(self, group, params):
        """muon_update on this rank's shards, its Newton-Schulz units shared out among the processes."""
        grads = [_local(p.grad) for p in params]
        for p, g in zip(params, grads):
            if not self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(g)
        dtype = group["ns_dtype"] or default_ns_dtype(grads[0].device.type)
        if self.distribute and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            orthogonalise = functools.partial(orthogonalise_across_ranks, params=params, dtype=dtype,
                                              plans=self._exchange_plans)
        else:
            orthogonalise = functools.partial(orthogonalise_everywhere, params=params)

        def counted(inputs, layouts, ns):         # counts the matrices that go through ns here
            def ns_counted(stack):
                self.newton_schulz_matrices += stack.shape[0]
                return ns(stack)
            return orthogonalise(inputs, layouts, ns_counted)
        muon_update([_local(p) for p in params], grads, [self.state[p]["momentum_buffer"] for p in params],
                    group["lr"], group["weight_decay"], group["momentum"], group["nesterov"], group["ns_steps"],
                    dtype, group["ns_variant"], layouts=[self._blocks.get(id(p)) for p in params],
                    shapes=[p.shape for p in params], orthogonalise=counted)

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
        gamma per head, every module called (unclipped heads get exactly 1: no host sync).

        What it guarantees, exactly: S_h was measured in the forward, before this step's update, and
        the clip scales the *updated* weights (Algorithm 1). So for each layer, on the very input S_h
        was measured on, a clipped head's logits become gamma_h (MLA, MHA) or sqrt(gamma_h * min gamma
        of its key group) <= gamma_h (GQA) times the logits of the updated, unclipped weights. That is
        <= tau when the update did not raise the head's max (always for a clip-only step, lr = 0); if
        the updated weights' max on that input is S'_h, the clipped max is tau * S'_h / S_h (MLA, MHA).
        A later forward may exceed tau too (clipping layer l changes the input of layer l+1); the
        report's claim is that the max logits stay bounded over training."""
        max_logits = reduce_max_logits_(self.attention_modules)  # (L, H)
        if self.qk_clip_tau is None:
            clipped = torch.zeros((), dtype=torch.long, device=max_logits.device)
        else:
            gamma = qk_clip_gamma(max_logits, self.qk_clip_tau)  # (L, H)
            for m, g in zip(self.attention_modules, gamma):
                m.qk_clip_(g[:m.num_heads])
            clipped = (max_logits > self.qk_clip_tau).sum()
        self.clip_stats = {"max_logits": max_logits, "heads_clipped": clipped}
