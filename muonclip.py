"""MuonClip: Muon for hidden matrices, AdamW for the rest, then per-head QK-Clip (Kimi-K2).

Kimi-K2 (arXiv 2507.20534, section 2.1) trains with MuonClip: the Muon optimizer in Moonlight's form
("Muon is Scalable for LLM Training", arXiv 2502.16982) followed, after every update, by QK-Clip,
which rescales the query/key weights of any attention head whose largest pre-softmax logit of the
step exceeded tau, so that the same input would now give at most tau. This file is the algorithm,
top to bottom: pure functions first (Newton-Schulz, the RMS-matching scale, the clip factors, the
clip rule for ordinary attention, the parameter split), then the optimizer class that does the
bookkeeping. It imports only torch, so it can be copied alone into any project.

    opt = MuonClip.for_model(model, lr=2e-4, weight_decay=0.1, qk_clip_tau=100.0)
    loss.backward(); opt.step(); opt.zero_grad()
    opt.clip_stats  # {'max_logits': (L, H) before clipping, 'heads_clipped': scalar} - no host sync

Features
- Muon: Nesterov momentum 0.95 (M = mu*M + G, input G + mu*M), Newton-Schulz orthogonalisation
  (5 quintic steps in bf16, on the wide orientation), update scaled by 0.2*sqrt(max(A, B)) so its
  RMS matches AdamW's and one lr and weight decay serve both halves; decoupled weight decay.
- Stacked weights (E, A, B), e.g. MoE experts, are E matrices, each orthogonalised on its own; all
  matrices of the same shape, across parameters, go through one batched Newton-Schulz call.
- AdamW (betas 0.9, 0.95) for everything that is not a hidden matrix; same maths as torch.optim.AdamW.
- QK-Clip for every module with the attention surface below; per-head factor gamma = tau / S_h only
  for heads with S_h > tau (others are multiplied by exactly 1, so they stay bitwise the same), no
  per-head host sync. `qk_clip_mha_` is the rule for ordinary multi-head / grouped-query attention.
- Distributed (torchrun): under DDP the (L, H) max-logit matrix is all-reduced with MAX in one
  collective, so all replicas clip alike. Under FSDP2 (`fully_shard`, DTensor parameters) Muon
  gathers each matrix for Newton-Schulz and keeps its own shard (stacked experts sharded on the expert
  dim need no gather); momentum and AdamW state are local shards. On one process all of it is a no-op.
  Under DDP pass broadcast_buffers=False, or rank 0's max_logits overwrite every other rank's running
  max at each forward and micro-batches seen only by other ranks are lost.
- Updates and clips act in place on the parameters, which should be the fp32 master weights (use
  autocast for bf16 compute; clipping a bf16 copy while an fp32 master stays would undo the clip).

Where Muon must NOT be used (split_params sends these to AdamW)
- Embeddings: a lookup table, not a linear map; each step's gradient touches only the rows of the
  tokens seen, and orthogonalising spreads that update over every row (rare tokens drift). Its rows
  are independent vectors, so the "steepest descent under the spectral norm" argument behind Muon
  does not apply.
- The output head: also a table of independent per-token vectors (often tied to the embedding);
  Keller Jordan's and Moonlight's experiments train it better with AdamW.
- Vectors (norm gains, biases, the router bias): Newton-Schulz needs a matrix; a vector has no
  singular-value structure to whiten. (K2's router bias is a buffer moved by the load rule, not by
  any optimizer.)
- Several maps stored in one tensor (a fused QKV weight, an expert stack) must not be orthogonalised
  as one matrix: that couples maps that are independent. Stacks along a leading dim are handled
  here; a fused QKV must be split into its blocks by the caller.

The attention surface QK-Clip talks to (duck-typed; the module has it, this file does not import it)
- `num_heads` int; `max_logits`: (num_heads,) fp32 tensor, the running max over every training
  forward since the last reset of the head's scaled, causal pre-softmax logits, -inf when reset.
- `qk_clip_(gamma)`: gamma (num_heads,) tensor; rescale in place, without grad, so that the head's
  logits on the same input are multiplied by gamma_h (MLA: q_nope and k_nope rows by sqrt(gamma),
  q_rope rows by gamma, the shared rope key and the values untouched). Must scale only the local rows
  when its weights are DTensor shards.
- optional `reset_max_logits_()`; without it max_logits is filled with -inf here.

Run the tests: `python -m pytest test_muonclip.py -q`.
"""
import math
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
    """Approximate orthogonalisation U V^T of each matrix G = U S V^T.

    G: (..., A, B), leading dims are a batch of independent matrices. Returns (..., A, B) in `dtype`.
    Works on the wide orientation (A <= B) so X X^T is the small Gram matrix.
    """
    a, b, c = NS_COEFFICIENTS
    X = G.to(dtype).reshape(-1, *G.shape[-2:])                  # (N, A, B)
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT                                                  # (N, B, A), now wide
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
    """0.2 * sqrt(max(A, B)) for an (..., A, B) weight (Moonlight, eq. 4).

    An orthogonal A x B update has RMS 1/sqrt(max(A, B)); this scale gives it RMS 0.2, the typical RMS
    of an AdamW update, so Muon can reuse AdamW's learning rate and weight decay.
    """
    return 0.2 * math.sqrt(max(shape[-2], shape[-1]))


# ------------------------------------------------------------------------------- QK-Clip maths

def qk_clip_gamma(max_logits, tau):
    """Per-head factors: tau / S_h where S_h > tau, else exactly 1 (also for -inf and NaN)."""
    return torch.where(max_logits > tau, tau / max_logits, torch.ones_like(max_logits))


@torch.no_grad()
def qk_clip_mha_(w_q, w_k, gamma, num_kv_heads):
    """QK-Clip for ordinary multi-head / grouped-query attention, in place.

    w_q: (num_heads * head_dim, ...) query projection rows (a weight, or its bias: call once for
    each), head-major. w_k: (num_kv_heads * head_dim, ...) key rows, likewise. gamma: (num_heads,).
    Query head h reads key head g = h // (num_heads // num_kv_heads).

    Rule (SPEC 5): sqrt(gamma_h) on query head h's rows and sqrt(gamma) on its key rows; a key head
    shared by a group takes the smallest gamma of its query heads, k_g *= sqrt(min_g). Head h's
    logits are then multiplied by sqrt(gamma_h * min_g) <= gamma_h, so a clipped head ends at or
    below tau (exactly tau when it has the group's smallest factor), an unclipped head's query rows
    are bitwise untouched, and a group with no clipped head is not touched at all. The price of the
    shared key is that unclipped heads of a clipped group lose a factor sqrt(min_g) too. Plain MHA
    (num_kv_heads == num_heads) is sqrt(gamma_h) on both q and k rows. Weights may be DTensors
    sharded on rows (FSDP2): each rank scales the rows it holds.

    To use it, the attention module also keeps the statistic: a (num_heads,) fp32 buffer max_logits
    at -inf, and after computing the scaled logits (B, H, T, T) with the causal mask at -inf:
        if self.training and torch.is_grad_enabled():    # training forwards only, never eval
            torch.maximum(self.max_logits, logits.detach().amax(dim=(0, 2, 3)).float(),
                          out=self.max_logits)
    """
    num_heads = gamma.numel()
    group_min = gamma.view(num_kv_heads, num_heads // num_kv_heads).amin(dim=1)   # (Hkv,)
    _scale_heads_(w_q, gamma.sqrt())                                               # (H,)
    _scale_heads_(w_k, group_min.sqrt())                                           # (Hkv,)


def _scale_heads_(w, head_factor):
    """w (heads * head_dim, ...) *= head_factor (heads,) repeated over each head's rows."""
    rows = head_factor.to(w.dtype).repeat_interleave(w.shape[0] // head_factor.numel())  # (rows,)
    rows = rows.view(-1, *([1] * (w.dim() - 1))).expand(w.shape)                            # like w
    _local(w).mul_(_local_part(rows, w))


# ------------------------------------------------------------------------------ parameter split

HEAD_NAMES = ("lm_head", "output", "head")


def split_params(model):
    """Split the trainable parameters by role: (muon_params, adamw_params).

    Muon: every parameter with ndim >= 2 (hidden matrices; (E, A, B) stacks are E matrices), except
    AdamW: nn.Embedding weights, the output head (a parameter of a module named lm_head / output /
    head, or any parameter that is also an embedding's weight, i.e. a tied head), and every parameter
    with ndim < 2 (norm gains, biases). Buffers (e.g. a router bias kept as one) are not parameters.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    muon, adamw = [], []
    for name, p in model.named_parameters():                     # tied parameters come once
        if not p.requires_grad:
            continue
        module_name = name.rsplit(".", 1)[0].rsplit(".", 1)[-1] if "." in name else ""
        is_table = id(p) in embeddings or module_name in HEAD_NAMES
        (muon if p.ndim >= 2 and not is_table else adamw).append(p)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    muon_ids, adamw_ids = {id(p) for p in muon}, {id(p) for p in adamw}
    assert not muon_ids & adamw_ids and muon_ids | adamw_ids == trainable, \
        "every trainable parameter must be in exactly one optimizer group"
    return muon, adamw


def find_attention_modules(model):
    """Modules with the QK-Clip surface (`max_logits` and `qk_clip_`), in model order."""
    return [m for m in model.modules() if hasattr(m, "max_logits") and hasattr(m, "qk_clip_")]


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
    """Muon + AdamW in one optimizer, followed by QK-Clip on the attention modules given.

    params: groups (dicts) each with `use_muon` (bool); see split_params / for_model.
    lr: one learning rate for both halves (Muon updates are RMS-matched to AdamW's).
    weight_decay: decoupled, W -= lr * weight_decay * W, both halves.
    momentum, nesterov, ns_steps, ns_dtype: Muon. betas, eps: AdamW.
    qk_clip_tau: logit cap (K2: 100); None turns QK-Clip off.
    attention_modules: modules with the surface described in the module docstring.
    """

    def __init__(self, params, lr=2e-4, weight_decay=0.1, momentum=0.95, nesterov=True, ns_steps=5,
                 betas=(0.9, 0.95), eps=1e-8, qk_clip_tau=100.0, attention_modules=(),
                 ns_dtype=torch.bfloat16):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_steps=ns_steps, ns_dtype=ns_dtype, betas=betas, eps=eps)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if "use_muon" not in group:
                raise ValueError("every parameter group needs 'use_muon' (True or False)")
            if group["use_muon"] and any(p.ndim < 2 for p in group["params"]):
                raise ValueError("Muon groups take matrices (ndim >= 2) only")
        self.qk_clip_tau = qk_clip_tau
        self.attention_modules = list(attention_modules)
        self.clip_stats = {}

    @classmethod
    def for_model(cls, model, lr, weight_decay, qk_clip_tau=100.0, **kw):
        """The whole recipe for one model: role split plus the attention modules found by surface."""
        muon, adamw = split_params(model)
        groups = [{"params": muon, "use_muon": True}, {"params": adamw, "use_muon": False}]
        return cls([g for g in groups if g["params"]], lr=lr, weight_decay=weight_decay,
                   qk_clip_tau=qk_clip_tau, attention_modules=find_attention_modules(model), **kw)

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
        if self.qk_clip_tau is not None and self.attention_modules:
            self._qk_clip()
        return loss

    def _muon_step(self, group, params):
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        grads = [_local(p.grad) for p in params]
        bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(g))
                for p, g in zip(params, grads)]
        torch._foreach_mul_(bufs, mu)
        torch._foreach_add_(bufs, grads)                          # M = mu*M + G
        inputs = torch._foreach_add(grads, bufs, alpha=mu) if group["nesterov"] else bufs

        # Newton-Schulz needs whole matrices: gather only where a matrix dim is sharded
        gather = [_matrices_are_split(p) for p in params]
        whole = [_full(x, p) if g else x for x, p, g in zip(inputs, params, gather)]
        # one batch per matrix shape; a tall (A, B) joins the wide (B, A) batch transposed
        # (the orientation Newton-Schulz works in anyway), cast to ns_dtype by the same copy
        by_shape = defaultdict(list)                              # (small, large) -> indices
        for i, x in enumerate(whole):
            by_shape[tuple(sorted(x.shape[-2:]))].append(i)

        local_params = [_local(p) for p in params]
        torch._foreach_mul_(local_params, 1 - lr * wd)            # decoupled weight decay
        for (small, large), idx in by_shape.items():
            wide = [whole[i].reshape(-1, *whole[i].shape[-2:]) for i in idx]      # (k, A, B)
            wide = [x.mT if x.size(-2) > x.size(-1) else x for x in wide]         # (k, small, large)
            stack = torch.empty(sum(x.size(0) for x in wide), small, large,
                                dtype=group["ns_dtype"], device=wide[0].device)
            ortho = newton_schulz(torch.cat(wide, out=stack), group["ns_steps"],
                                  dtype=group["ns_dtype"])            # (N, small, large)
            updates = []
            for i, o in zip(idx, ortho.split([x.size(0) for x in wide])):
                o = o.mT if whole[i].size(-2) > whole[i].size(-1) else o             # (k, A, B)
                o = o.reshape(whole[i].shape)
                updates.append(_local_part(o, params[i]) if gather[i] else o)
            # the bf16 update is added to the fp32 weight exactly as if upcast first
            torch._foreach_add_([local_params[i] for i in idx], updates,
                                alpha=-lr * rms_matching_scale((small, large)))

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
        modules = self.attention_modules
        # (L, H); heads beyond a layer's num_heads (if layers differ) are -inf padding
        max_logits = nn.utils.rnn.pad_sequence(
            [m.max_logits.detach().float() for m in modules], batch_first=True,
            padding_value=-math.inf)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(max_logits, op=dist.ReduceOp.MAX)    # one collective for all layers
        gamma = qk_clip_gamma(max_logits, self.qk_clip_tau)       # (L, H)
        for m, g in zip(modules, gamma):
            # every module is called: unclipped heads get exactly 1, so no host sync is needed
            m.qk_clip_(g[:m.num_heads])
            if hasattr(m, "reset_max_logits_"):
                m.reset_max_logits_()
            else:
                m.max_logits.fill_(-math.inf)
        self.clip_stats = {"max_logits": max_logits,
                           "heads_clipped": (max_logits > self.qk_clip_tau).sum()}
