"""Kimi-K2 in one file of plain PyTorch: the DeepSeek-V3 architecture (multi-head latent attention,
a fine-grained mixture of experts with a bias-corrected router) at any size, from the published
1.04T-parameter config down to the 3M-parameter `tiny` that trains on a laptop CPU.

Papers: Kimi K2 technical report (arXiv 2507.20534, "K2 report"); DeepSeek-V3 technical report
(arXiv 2412.19437, "DeepSeek-V3 report"); DeepSeek-V2 (arXiv 2405.04434, where MLA is introduced);
YaRN (arXiv 2309.00071). The logits equal transformers' DeepseekV3ForCausalLM on the same weights.

Run:  python kimik2.py                       Kimi-K2 vs DeepSeek-V3 sizes (kimik2_sizes.py's table)
      python train.py                        train `tiny` with MuonClip (train.py)

Needs torch only (safetensors for the hub files, imported where they are read and written) and
nothing else of this project: it copies alone into another one. In forward order: Config; RMSNorm,
YaRN rotary; MLA (naive and weight-absorbed forms, each head's exact max logit and QK-Clip's rule
for MuonClip, muonclip.py); SwiGLU, the router (Gate), the routed experts; the decoder, generation
and the hub layout; then the config's validation and presets, and the size arithmetic.
"""
import copy
import dataclasses
import json
import math
import os
import re
import uuid
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

if dist.is_available():  # QK-Clip scales only the rows a rank holds of an FSDP2 (DTensor) weight
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
else:
    DTensor = ()  # isinstance(x, ()) is False: no tensor is ever a DTensor

# Shape legend used in comments: B batch, T query tokens, S key tokens (the cache length when
# decoding), H heads, D hidden size, N tokens (B*T), E routed experts, K experts per token,
# G expert groups, I expert width, P rows of the sorted expert runs, n_e tokens of expert e,
# L MoE layers, C kv_lora_rank (latent), Dn qk_nope_head_dim, Dr qk_rope_head_dim, Dv v_head_dim.


# ----------------------------------------------------------------------------------------------
# Config

@dataclass
class Config:
    """Kimi-K2's shape by default (its published config.json, YaRN included, is PRESETS["kimi-k2"],
    after the model); every value is checked when built (check_config: one line naming the field)."""
    # trunk
    vocab_size: int = 163840                 # tokens in the vocabulary
    hidden_size: int = 7168                  # residual stream width D
    intermediate_size: int = 18432           # dense MLP width (layers < first_k_dense_replace)
    moe_intermediate_size: int = 2048        # width I of one routed / shared expert
    num_hidden_layers: int = 61              # decoder blocks
    rms_norm_eps: float = 1e-6               # RMSNorm epsilon
    tie_word_embeddings: bool = False        # lm_head shares embed_tokens' weight
    initializer_range: float = 0.02          # std of the normal init
    # mla
    num_attention_heads: int = 64            # query heads H
    num_key_value_heads: int = 64            # MLA: equal to num_attention_heads
    q_lora_rank: int | None = 1536           # query latent rank (None: direct q_proj, as V2-Lite)
    kv_lora_rank: int = 512                  # key/value latent rank C (cached when decoding)
    qk_nope_head_dim: int = 128              # per-head q/k part without rope
    qk_rope_head_dim: int = 64               # per-head q part (and shared k part) with rope
    v_head_dim: int = 128                    # per-head value width
    # moe
    n_routed_experts: int = 384              # routed experts E
    num_experts_per_tok: int = 8             # experts per token K
    n_shared_experts: int = 1                # shared expert width in units of moe_intermediate_size
    first_k_dense_replace: int = 1           # leading layers with a dense MLP instead of MoE
    n_group: int = 1                         # expert groups for group-limited routing
    topk_group: int = 1                      # groups a token may route to
    routed_scaling_factor: float = 2.827     # multiplies the normalised routing weights
    norm_topk_prob: bool = True              # normalise the top-k weights to sum 1
    aux_loss_alpha: float = 0.0              # sequence-wise balance loss coefficient (0: off)
    # rope / yarn
    rope_theta: float = 50000.0              # RoPE base
    rope_scaling: dict | None = None         # YaRN parameters (HF "rope_scaling" dict) or None
    max_position_embeddings: int = 131072    # longest supported context

    @property
    def qk_head_dim(self) -> int:  # Dn + Dr: the width of one query or key head
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def __post_init__(self):
        check_config(self)

    @classmethod
    def from_preset(cls, name: str) -> "Config":
        if name not in PRESETS:
            raise ValueError(f"preset={name!r}: unknown preset, choose one of {sorted(PRESETS)}")
        return cls(**copy.deepcopy(PRESETS[name]))

    @classmethod
    def from_json(cls, path: str) -> "Config":
        """Read a Hugging Face config.json (DeepSeek-V3, Kimi-K2 `kimi_k2`, or transformers 5's
        `rope_parameters` form); fields this model does not use are ignored."""
        with open(path) as f:
            d = json.load(f)
        model_type = d.get("model_type", "deepseek_v3")
        if model_type not in ("deepseek_v3", "kimi_k2"):
            raise ValueError(f"model_type={model_type!r}: expected 'deepseek_v3' or 'kimi_k2'")
        rope = d.get("rope_parameters")
        if rope is not None:  # transformers 5 folds rope_theta and the scaling into one dict
            rope = dict(rope)
            d["rope_theta"] = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
            kind = rope.pop("rope_type", rope.pop("type", "default"))
            d["rope_scaling"] = None if kind == "default" else {"type": kind, **rope}
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Building blocks

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32, scale in the input dtype (as DeepSeek's and transformers' code do)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x)


def yarn_mscale(factor: float, mscale: float) -> float:
    """YaRN's attention temperature m = 0.1 * mscale * ln(factor) + 1 (YaRN paper: sqrt(1/t) =
    0.1 ln(s) + 1, with DeepSeek's mscale multiplier); 1 when the context is not stretched."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


class RotaryEmbedding(nn.Module):
    """RoPE on the qk_rope_head_dim part. YaRN ("NTK-by-parts") blends the original frequencies (high:
    extrapolated) with those divided by the factor (low: interpolated) over a ramp between the
    beta_fast and beta_slow correction dims; cos and sin carry the mscale / mscale_all_dim
    temperature ratio (1 in K2 and DeepSeek-V3, whose temperature is in MLA's softmax_scale)."""

    def __init__(self, config: Config):
        super().__init__()
        dim, base = config.qk_rope_head_dim, config.rope_theta
        inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # (Dr/2,)
        self.attention_factor = 1.0  # scales cos/sin; YaRN: mscale / mscale_all_dim temperatures
        ys = config.rope_scaling
        if ys is not None:
            factor, orig = ys["factor"], ys["original_max_position_embeddings"]
            beta_fast, beta_slow = ys.get("beta_fast", 32.0), ys.get("beta_slow", 1.0)  # YaRN defaults

            def correction_dim(rotations):  # dimension whose wavelength fits `rotations` times in orig
                return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))
            low = max(math.floor(correction_dim(beta_fast)), 0)
            high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
            ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
            inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
            self.attention_factor = (yarn_mscale(factor, ys.get("mscale", 1.0))
                                     / yarn_mscale(factor, ys.get("mscale_all_dim", 0.0)))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, start: int, length: int):
        pos = torch.arange(start, start + length, device=self.inv_freq.device, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq)  # (T, Dr/2)
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor


def apply_rotary(x, cos, sin):
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... as DeepSeek's code does; x (B, T, h, Dr)."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # each (B, T, h, Dr/2)
    cos, sin = cos[:, None, :], sin[:, None, :]  # (T, 1, Dr/2)
    return torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), -1).flatten(-2).type_as(x)

# ----------------------------------------------------------------------------------------------
# Multi-head latent attention

def future_mask(T: int, S: int, device=None) -> torch.Tensor:
    """(T, S) True where key j lies after query i, for T queries that are the last T of S
    positions (a cache holding S - T earlier tokens): query i sees key j iff j <= i + S - T."""
    return torch.ones(T, S, dtype=torch.bool, device=device).triu(S - T + 1)


class MLA(nn.Module):
    """Multi-head latent attention (DeepSeek-V2 sec. 2.1; DeepSeek-V3 report sec. 2.1.1, eq. 1-11).

    Queries come from a low-rank latent c_q (q_a_proj, q_a_layernorm, q_b_proj); every head's key
    and value come from one latent c_kv of C numbers per token (kv_a_proj_with_mqa, kv_a_layernorm,
    kv_b_proj), except the rope part of the key: one vector k_rope shared by all heads.
    logit = (q_nope.k_nope + q_rope.k_rope) * softmax_scale. Two forms give the same output
    (DeepSeek's naive/absorb pair):
      naive     per-head q, k, v (qkv): training, and decoding with new_cache(naive=True), which
                caches every head's k and v, H * (Dn+Dr + Dv) numbers per token and layer
      absorbed  W_UK folded into the query and W_UV into the output (DeepSeek-V2 sec. 2.1.2):
                new_cache() caches [c_kv, k_rope], C + Dr per token and layer (K2: 576, not 20480)

    MuonClip's surface (K2 report sec. 2.1; muonclip.py's docstring): `num_heads`; `max_logits` (H,)
    fp32, each head's running max of the scaled causal logits over the training forwards since the
    last reset_max_logits_() (-inf), exact under autocast (track_max_logits=False skips it); and
    qk_clip_(gamma), which applies the factors qk_clip_factors(gamma) hands out."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.num_heads = H = config.num_attention_heads
        self.nope, self.rope, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        D, qk = config.hidden_size, config.qk_head_dim
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, config.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = nn.Linear(config.q_lora_rank, H * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, config.kv_lora_rank + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(config.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(config.kv_lora_rank, H * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, D, bias=False)
        # qk_head_dim^-0.5 * m^2, m YaRN's temperature from mscale_all_dim (DeepSeek-V3's code; = 1/t in YaRN)
        self.softmax_scale = qk ** -0.5
        if config.rope_scaling is not None:
            m = yarn_mscale(config.rope_scaling["factor"], config.rope_scaling.get("mscale_all_dim", 0.0))
            self.softmax_scale *= m * m
        self.track_max_logits = True
        self.register_buffer("max_logits", torch.full((H,), float("-inf")), persistent=False)

    # -- projections shared by the two forms --
    def _query(self, x, cos, sin):
        q = self.q_proj(x) if self.config.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rope = q.unflatten(-1, (self.num_heads, -1)).split([self.nope, self.rope], -1)  # (B,T,H,Dn),(B,T,H,Dr)
        return q_nope, apply_rotary(q_rope, cos, sin)

    def _latent(self, x, cos, sin):
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope], -1)  # (B,T,C),(B,T,Dr)
        k_rope = apply_rotary(k_rope.unsqueeze(2), cos, sin).squeeze(2)  # (B, T, Dr): one key for all heads
        return self.kv_a_layernorm(c_kv), k_rope

    def forward(self, x, cos, sin, cache=None, start_pos=0):
        """x (B, T, D) at positions start_pos.. -> (B, T, D). cache: None, or one from new_cache:
        a latent tensor runs the absorbed form, a (k, v) pair of per-head caches the naive form."""
        if isinstance(cache, torch.Tensor):
            return self.forward_absorbed(x, cos, sin, cache, start_pos)
        return self.forward_naive(x, cos, sin, cache, start_pos)

    # -- the naive form --
    def qkv(self, x, cos, sin):
        """Per-head q, k (B, H, T, Dn+Dr) and v (B, H, T, Dv) of x (B, T, D)."""
        (B, T, _), H = x.shape, self.num_heads
        q_nope, q_rope = self._query(x, cos, sin)
        c_kv, k_rope = self._latent(x, cos, sin)
        k_nope, v = self.kv_b_proj(c_kv).unflatten(-1, (H, -1)).split([self.nope, self.v_dim], -1)  # (B,T,H,Dn),(B,T,H,Dv)
        q = torch.cat([q_nope, q_rope], -1).transpose(1, 2)  # (B, H, T, Dn+Dr)
        k = torch.cat([k_nope, k_rope.unsqueeze(2).expand(B, T, H, self.rope)], -1).transpose(1, 2)  # (B, H, T, Dn+Dr)
        return q, k, v.transpose(1, 2)  # v (B, H, T, Dv)

    def causal_logits(self, q, k):
        """The scaled pre-softmax logits q.k * softmax_scale (B, H, T, S) of q (B, H, T, Dn+Dr) and
        k (B, H, S, Dn+Dr), -inf where the key lies after the query; in float32 whatever the
        autocast, as fused kernels and SDPA's unfused math keep them for 16-bit q and k."""
        future = future_mask(q.shape[2], k.shape[2], q.device)  # (T, S)
        with torch.autocast(q.device.type, enabled=False):
            logits = q.float() @ k.float().transpose(-2, -1)  # (B, H, T, S)
        return logits.mul_(self.softmax_scale).masked_fill_(future, float("-inf"))

    def forward_naive(self, x, cos, sin, cache=None, start_pos=0):
        """softmax(causal_logits(q, k)) v per head, heads concatenated, o_proj; with a (k, v) cache
        (new_cache(naive=True)) this call's k and v are stored at start_pos.. and all are attended."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x, cos, sin)
        if cache is not None:
            (k_cache, v_cache), end = cache, start_pos + T
            k_cache[:, :, start_pos:end], v_cache[:, :, start_pos:end] = k, v
            k, v = k_cache[:, :, :end], v_cache[:, :, :end]  # (B, H, S, Dn+Dr), (B, H, S, Dv)
        y = self._attention(q, k, v, track=self.track_max_logits and is_training_forward(self))
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.num_heads * self.v_dim))  # (B, T, H*Dv) -> (B, T, D)

    def _attention(self, q, k, v, track: bool):
        """(B, H, T, Dn+Dr), (B, H, S, Dn+Dr), (B, H, S, Dv) -> (B, H, T, Dv); with track, records
        this forward's max logits. A fused SDPA kernel where one exists for MLA's unequal q/k and v
        widths (CUDA), the max from an exact pass; on the CPU SDPA would run this same math unfused
        (in float32), so it is written out and its logits give the max for free."""
        if fused_attention_available(q):
            if track:
                self._update_max_logits(q, k)
            T, S = q.shape[2], k.shape[2]
            mask = dict(is_causal=True) if T == S else dict(attn_mask=~future_mask(T, S, q.device))
            return F.scaled_dot_product_attention(q, k, v, scale=self.softmax_scale, **mask)
        logits = self.causal_logits(q, k)  # (B, H, T, S) float32
        if track:
            self._update_max_logits(q, k, logits)
        with torch.autocast(q.device.type, enabled=False):
            return (logits.softmax(-1) @ v.float()).type_as(v)  # (B, H, T, Dv)

    # -- MuonClip's surface: the exact max logit and QK-Clip for MLA (K2 report sec. 2.1) --
    @torch.no_grad()
    def _update_max_logits(self, q, k, logits=None):
        """The one place max_logits is written: its running max with this forward's per-head max of
        the scaled causal logits, float32 from the q and k the attention used: read off `logits`, or
        an exact pass behind a fused kernel, whose log-sum-exp is only an upper bound (up to ln S)."""
        step_max = causal_max_logits(q, k, self.softmax_scale) if logits is None else logits.amax(dim=(0, 2, 3))
        torch.maximum(self.max_logits, step_max, out=self.max_logits)

    def reset_max_logits_(self):
        self.max_logits.fill_(float("-inf"))

    def qk_clip_factors(self, gamma: torch.Tensor):
        """QK-Clip's rule for MLA (the twin of muonclip.py's qk_clip_mla_): the row factors that scale
        head h's logits by exactly gamma_h. q_nope and k_nope rows * sqrt(gamma_h), q_rope rows *
        gamma_h; the rope key (shared by all heads: kv_a_proj_with_mqa) and the v rows stay. gamma
        (H,) -> factors of the query weight's rows (H*(Dn+Dr),) and of kv_b_proj's (H*(Dn+Dv),)."""
        H, root = self.num_heads, gamma.sqrt()[:, None]  # (H, 1)
        q_rows = torch.cat([root.expand(H, self.nope), gamma[:, None].expand(H, self.rope)], 1)  # (H, Dn+Dr)
        kv_rows = torch.cat([root.expand(H, self.nope), torch.ones_like(root).expand(H, self.v_dim)], 1)  # (H, Dn+Dv)
        return q_rows.flatten(), kv_rows.flatten()

    @torch.no_grad()
    def qk_clip_(self, gamma: torch.Tensor):
        """Scale the query and key weights in place by qk_clip_factors(gamma), gamma_h = min(1, tau /
        S_h) from MuonClip after each update. Under FSDP2 each rank scales the rows it holds."""
        q_rows, kv_rows = self.qk_clip_factors(gamma.detach().float())
        _scale_rows_(self.q_proj.weight if self.config.q_lora_rank is None else self.q_b_proj.weight, q_rows)
        _scale_rows_(self.kv_b_proj.weight, kv_rows)

    # -- decoding caches, and the weight-absorbed form (DeepSeek-V3's inference code) --
    def new_cache(self, batch: int, max_len: int, naive: bool = False, device=None, dtype=None):
        """An empty decoding cache for forward(..., cache=). Absorbed (default): the normalised
        latent and the rotated k_rope, C + Dr numbers per token, (B, S_max, C+Dr). naive=True:
        every head's k (B, H, S_max, Dn+Dr) and v (B, H, S_max, Dv)."""
        w = self.kv_a_proj_with_mqa.weight
        device, dtype = device or w.device, dtype or w.dtype
        if naive:
            return (torch.zeros(batch, self.num_heads, max_len, self.nope + self.rope, device=device, dtype=dtype),
                    torch.zeros(batch, self.num_heads, max_len, self.v_dim, device=device, dtype=dtype))
        return torch.zeros(batch, max_len, self.kv_lora_rank + self.rope, device=device, dtype=dtype)

    def forward_absorbed(self, x, cos, sin, cache, start_pos):
        """Attention in latent space: q_nope.k_nope = (q_nope W_UK).c_kv and the output's per-head
        values are W_UV (probs.c_kv), so only [c_kv, k_rope] is cached (stored at start_pos..)."""
        B, T, _ = x.shape
        H, end = self.num_heads, start_pos + x.shape[1]
        q_nope, q_rope = self._query(x, cos, sin)
        c_kv, k_rope = self._latent(x, cos, sin)
        cache[:, start_pos:end] = torch.cat([c_kv, k_rope], -1)  # (B, T, C+Dr)
        c_kv, k_rope = cache[:, :end].split([self.kv_lora_rank, self.rope], -1)  # (B,S,C),(B,S,Dr)
        w_uk, w_uv = self.kv_b_proj.weight.unflatten(0, (H, -1)).split([self.nope, self.v_dim], 1)  # (H,Dn,C),(H,Dv,C)
        q_latent = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)  # (B, T, H, C)
        scores = (torch.einsum("bthc,bsc->bhts", q_latent, c_kv)
                  + torch.einsum("bthr,bsr->bhts", q_rope, k_rope)).float() * self.softmax_scale  # (B, H, T, S)
        probs = scores.masked_fill(future_mask(T, end, x.device), float("-inf")).softmax(-1).type_as(x)
        o_latent = torch.einsum("bhts,bsc->bthc", probs, c_kv)  # (B, T, H, C)
        y = torch.einsum("bthc,hdc->bthd", o_latent, w_uv)  # (B, T, H, Dv)
        return self.o_proj(y.reshape(B, T, H * self.v_dim))  # (B, T, D)


def fused_attention_available(q) -> bool:
    """Whether SDPA has a fused kernel for MLA's q/k width Dn+Dr != v width Dv: CUDA's memory-efficient
    and cuDNN kernels do; the CPU's flash kernel needs equal widths (else: the unfused math)."""
    return q.device.type != "cpu"


# ----------------------------------------------------------------------------------------------
# What MLA shares with muonclip.py: the few lines of it MLA and the Gate run, so that this file copies
# alone. Each names its twin; test_twins_of_kimik2_and_muonclip_behave_alike keeps the pairs equal.

# twin of muonclip.py's is_training_forward
def is_training_forward(module) -> bool:
    """Whether this forward feeds max_logits and expert_load: train mode with grad enabled. Eval and
    no-grad forwards never do: S is the max of the training step (K2 report sec. 2.1), and the
    router's bias update balances the tokens trained on."""
    return module.training and torch.is_grad_enabled()


# twin of muonclip.py's causal_max_logits, for MLA's case: one key head per query head, causal
# visibility, no mask
@torch.no_grad()
def causal_max_logits(q, k, scale, *, chunk_size=None):
    """Per-head max over batch, query and key positions of the scaled causal logit scale * q.k:
    q (B, H, T, Dn+Dr) the last T of S positions, k (B, H, S, Dn+Dr) -> (H,) float32, exact under
    any autocast: float32 from the q and k the kernel receives, so no 16-bit rounding hides a head
    above tau. Queries go in chunks of `chunk_size` rows (default: about 2^24 logits per chunk)."""
    (B, H, T, _), S = q.shape, k.shape[2]
    rows = chunk_size or max(1, (1 << 24) // max(1, B * H * S))
    keys = torch.arange(S, device=q.device)
    out = torch.full((H,), -math.inf, device=q.device)
    with torch.autocast(q.device.type, enabled=False):
        k_t = k.float().transpose(-2, -1)  # (B, H, Dn+Dr, S)
        for i in range(0, T, rows):
            s = (q[:, :, i:i + rows].float() @ k_t) * scale  # (B, H, r, S)
            future = keys > torch.arange(i, i + s.shape[2], device=q.device)[:, None] + (S - T)  # (r, S)
            out = torch.maximum(out, s.masked_fill(future, -math.inf).amax(dim=(0, 2, 3)))
    return out  # (H,)


# twin of muonclip.py's _scale_rows_ (with its _local and _local_part folded in)
def _scale_rows_(w, row_factor):
    """w (rows, ...) *= row_factor (rows,) in place; on a DTensor (FSDP2) the rows held here, no communication."""
    factor = row_factor.to(w.dtype).view(-1, *([1] * (w.dim() - 1))).expand(w.shape)  # like w
    if isinstance(w, DTensor) and any(pl.is_shard() and type(pl) is not Shard for pl in w.placements):
        factor = distribute_tensor(factor, w.device_mesh, w.placements, src_data_rank=None).to_local()  # strided
    elif isinstance(w, DTensor):  # DTensor cuts a Shard as torch.chunk does, per mesh dim, empty past the last chunk
        for size, i, pl in zip(w.device_mesh.shape, w.device_mesh.get_coordinate(), w.placements):
            if pl.is_shard():
                factor = (*factor.chunk(size, pl.dim), *[factor.narrow(pl.dim, 0, 0)] * size)[i]
    (w.to_local() if isinstance(w, DTensor) else w).mul_(factor)


# ----------------------------------------------------------------------------------------------
# Feed-forward and mixture of experts

def swiglu(x, gate, up, down):
    """The SwiGLU feed-forward down(silu(gate(x)) * up(x)), weights as nn.Linear stores them:
    gate, up (I, D), down (D, I); x (..., D) -> (..., D)."""
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


class MLP(nn.Module):
    """SwiGLU: the dense layers and the shared expert."""

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x):
        return swiglu(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)


class Gate(nn.Module):
    """The DeepSeek-V3 router (DeepSeek-V3 report sec. 2.1.2, eq. 13-16), its whole rule:
      selection  scores s = sigmoid(W x) in fp32; the top-k experts by s + b, b the
                 e_score_correction_bias (fp32, no gradient); with n_group > 1 only among the
                 topk_group groups whose top-2 biased scores sum highest (group-limited routing)
      weights    the unbiased s of the chosen experts, normalised to sum 1, * routed_scaling_factor
      balance    expert_load counts the training tokens sent to each expert; update_bias_ balances
                 from that count (KimiK2.update_router_bias_ sums it over processes), no aux loss
    and the optional sequence-wise balance loss (eq. 17-20) when aux_loss_alpha > 0."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        E = config.n_routed_experts
        self.weight = nn.Parameter(torch.empty(E, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(E, dtype=torch.float32))
        self.register_buffer("expert_load", torch.zeros(E, dtype=torch.float32), persistent=False)

    def forward(self, x, batch: int):
        """x (N, D) with N = batch * T. Returns weights (N, K) fp32, experts (N, K) long, and the
        sequence-wise balance loss (None unless training with aux_loss_alpha > 0)."""
        c = self.config
        N, E, K, G = x.shape[0], c.n_routed_experts, c.num_experts_per_tok, c.n_group
        scores = F.linear(x.float(), self.weight.float()).sigmoid()  # (N, E) fp32
        biased = scores.detach() + self.e_score_correction_bias  # (N, E): selection only, no gradient
        if G > 1:
            group_scores = biased.view(N, G, E // G).topk(2, dim=-1).values.sum(-1)  # (N, G)
            keep = group_scores.topk(c.topk_group, dim=-1).indices  # (N, topk_group)
            masked = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)  # (N, G)
            biased = biased.masked_fill(masked.repeat_interleave(E // G, dim=1), float("-inf"))  # (N, E)
        experts = biased.topk(K, dim=-1).indices  # (N, K)
        weights = scores.gather(1, experts)  # (N, K): unbiased scores
        if c.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        weights = weights * c.routed_scaling_factor
        if is_training_forward(self):
            self.expert_load += torch.bincount(experts.flatten(), minlength=E)  # (E,)
        aux = self._sequence_balance_loss(scores, experts, batch) if self.training and c.aux_loss_alpha > 0 else None
        return weights, experts, aux

    @torch.no_grad()
    def update_bias_(self, bias_update_speed: float) -> torch.Tensor:
        """Auxiliary-loss-free load balancing (DeepSeek-V3 report sec. 2.1.2), after an optimizer
        step: b_i += bias_update_speed * sign(mean load - load_i) (the report's gamma, 0.001; here
        gamma names QK-Clip's factor only), from the load counted since the last update, then reset.
        Returns the imbalance max(load) / mean(load) before the update."""
        load, mean = self.expert_load, self.expert_load.mean()
        imbalance = load.max() / mean.clamp_min(1e-9)
        self.e_score_correction_bias += bias_update_speed * torch.sign(mean - load)
        load.zero_()
        return imbalance

    def _sequence_balance_loss(self, scores, experts, batch):
        """sum_i f_i * P_i per sequence, averaged over sequences; f_i = E/(K*T) * tokens routed to
        i, P_i = mean over tokens of s_i / sum_j s_j (DeepSeek-V3 report eq. 17-20)."""
        E, K, T = self.config.n_routed_experts, self.config.num_experts_per_tok, scores.shape[0] // batch
        routed = torch.zeros(batch, T * K, E, device=scores.device).scatter_(
            2, experts.view(batch, T * K, 1), 1.0).sum(1)  # (B, E) tokens of each sequence per expert
        f = routed * E / (K * T)  # (B, E)
        p = (scores / scores.sum(-1, keepdim=True)).view(batch, T, E).mean(1)  # (B, E)
        return (f * p).sum(-1).mean()


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """F.grouped_mm has kernels (with backward) on the CPU, and on CUDA for bfloat16 only;
    torch.compile (torch 2.13) accepts it in bfloat16 only."""
    return dtype == torch.bfloat16 or device.type == "cpu" and not torch.compiler.is_compiling()


def matmul_dtype(x) -> torch.dtype:
    """The dtype autocast runs a matmul on x in (x's own outside autocast). F.grouped_mm has no
    autocast rule, so the grouped path casts for it, as autocast does for nn.Linear and torch.mm."""
    on = torch.is_autocast_enabled(x.device.type)
    return torch.get_autocast_dtype(x.device.type) if on else x.dtype


# Rows each expert's run is padded to a multiple of in 16-bit matmuls: routing changes the run lengths
# every step, and CPU bfloat16 matmuls (oneDNN) build a kernel per new shape, ~0.6 ms each (Sapphire
# Rapids, torch 2.13). float32 (MKL) has no such cost: unpadded there. Zero rows change no result.
RUN_MULTIPLE = 32


def sort_by_expert(weights, experts, num_experts: int, multiple: int):
    """The fast path's first piece: one row per token-expert pair, grouped into one run per expert,
    in expert order, each padded with zero rows to a multiple of `multiple`. No host sync: the row
    count P is a bound fixed by the shapes, not the routing. weights, experts (N, K) -> token (P,),
    each row's token (N on padding rows); w (P, 1), its routing weight (0 on padding rows); ends
    (E,), where each run ends (the last takes the slack)."""
    (N, K), E, R = experts.shape, num_experts, multiple
    sorted_experts, order = experts.flatten().sort(stable=True)  # (N*K,) pairs grouped by expert
    counts = torch.bincount(sorted_experts, minlength=E)  # (E,) pairs per expert
    pad = (-counts) % R  # (E,) zero rows after each run, up to a multiple of R
    # each pair moves down by the padding of the runs before it
    row = torch.arange(N * K, device=experts.device) + (pad.cumsum(0) - pad)[sorted_experts]  # (N*K,)
    P = math.ceil((N * K + E * (R - 1)) / R) * R  # >= (counts + pad).sum() whatever the routing
    ends = (counts + pad).cumsum(0)  # (E,)
    ends[-1] = P
    token = torch.full((P,), N, device=experts.device).index_copy_(0, row, order // K)  # (P,)
    w = weights.new_zeros(P, 1).index_copy_(0, row, weights.flatten()[order, None])  # (P, 1)
    return token, w, ends


class Experts(nn.Module):
    """E routed SwiGLU experts, stored stacked: gate_proj, up_proj (E, I, D), down_proj (E, D, I).

    What they compute (the routed sum of DeepSeek-V3 report eq. 12), for token n sent by the Gate
    to experts[n, k] with weights[n, k]:
        y[n] = sum_k weights[n, k] * expert_{experts[n, k]}(x[n]),   expert_e = swiglu with e's weights.
    forward_reference says it as DeepSeek-V3's inference code does, a loop over the experts with
    tokens. forward_grouped computes the same as sort_by_expert then grouped_swiglu: one grouped
    matmul per projection, no host sync. forward takes it where F.grouped_mm has kernels (the CPU;
    CUDA in bfloat16) and the loop elsewhere, or always when `use_reference` is set."""

    def __init__(self, config: Config):
        super().__init__()
        E, D, I = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_proj = nn.Parameter(torch.empty(E, I, D))
        self.up_proj = nn.Parameter(torch.empty(E, I, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, I))
        self.use_reference = False

    def forward(self, x, weights, experts):
        """x (N, D), weights (N, K), experts (N, K) -> (N, D)."""
        if self.use_reference or not grouped_mm_supported(x.device, matmul_dtype(x)):
            return self.forward_reference(x, weights, experts)
        return self.forward_grouped(x, weights, experts)

    def forward_reference(self, x, weights, experts):
        """For each expert with tokens: y[idx] += expert(x[idx]) * weights[idx, top]. One sort finds
        every expert's tokens, so the loop waits for the host once (not once per expert)."""
        E, K = self.gate_proj.shape[0], experts.shape[1]
        pairs = experts.flatten().argsort(stable=True)  # (N*K,) token-slot pairs n*K + k, by expert
        counts = torch.bincount(experts.flatten(), minlength=E).tolist()  # the host sync
        weights = weights.type_as(x)
        y = torch.zeros_like(x)  # (N, D)
        # E pair runs (n_e,), each expert's (I, D), (I, D), (D, I) weights: unbind the stacks once (its
        # backward is one stack; indexing per expert would build a stack-sized zero gradient each)
        for e, (p, gate, up, down) in enumerate(zip(pairs.split(counts), self.gate_proj.unbind(0),
                                                    self.up_proj.unbind(0), self.down_proj.unbind(0))):
            if counts[e]:
                idx, top = p // K, p % K  # (n_e,) the tokens routed to e, and which of their K picks it is
                y.index_add_(0, idx, swiglu(x[idx], gate, up, down) * weights[idx, top, None])
        return y

    def forward_grouped(self, x, weights, experts):
        """The fast path: sort_by_expert, gather the rows' tokens, grouped_swiglu, add rows back."""
        N, E = x.shape[0], self.gate_proj.shape[0]
        dtype = matmul_dtype(x)
        token, w, ends = sort_by_expert(weights, experts, E, 1 if dtype == torch.float32 else RUN_MULTIPLE)
        # index_select rather than indexing: the same rows, 2.4x faster on the CPU, and its backward is
        # an index_add_ rather than indexing's accumulating index_put_
        xs = F.pad(x, (0, 0, 0, 1)).index_select(0, token).to(dtype)  # (P, D); x's extra row N is zeros
        ys = self.grouped_swiglu(xs, w, ends.to(torch.int32))  # (P, D)
        return x.new_zeros(N + 1, x.shape[1]).index_add_(0, token, ys.type_as(x))[:N]  # row N: padding

    def grouped_swiglu(self, xs, w, offs):
        """The fast path's second piece: every expert's SwiGLU on its run of rows, times the rows'
        routing weights. xs (P, D) in runs ending at offs (E,) int32, w (P, 1) -> (P, D)."""
        # gate and up as one grouped matmul: half the calls, and one input gradient instead of a sum of two
        gate_up = torch.cat([self.gate_proj, self.up_proj], 1).to(xs.dtype).mT  # (E, D, 2I)
        down = self.down_proj.to(xs.dtype).mT  # (E, I, D)
        g, u = F.grouped_mm(xs, gate_up, offs=offs).chunk(2, -1)  # (P, I) each
        h = F.silu(g) * u  # (P, I)
        # the routing weight multiplies the I-wide hidden rather than the D-wide output: fewer FLOPs
        return F.grouped_mm(h * w.type_as(h), down, offs=offs)  # (P, I) -> (P, D)


class MoE(nn.Module):
    """The DeepSeekMoE layer (DeepSeek-V3 report sec. 2.1.2, eq. 12): the shared expert on every
    token plus the K routed experts the Gate picks, weighted: y = shared(x) + Experts(x)."""

    def __init__(self, config: Config):
        super().__init__()
        self.gate = Gate(config)
        self.experts = Experts(config)
        self.shared_experts = MLP(config.hidden_size, config.n_shared_experts * config.moe_intermediate_size)

    def forward(self, x):
        B, T, D = x.shape
        x = x.view(B * T, D)  # (N, D)
        weights, experts, aux = self.gate(x, batch=B)  # (N, K) each
        y = self.experts(x, weights, experts) + self.shared_experts(x)
        return y.view(B, T, D), aux  # (N, D) -> (B, T, D)


# ----------------------------------------------------------------------------------------------
# The model

class Block(nn.Module):
    def __init__(self, config: Config, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLA(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = layer_idx >= config.first_k_dense_replace
        self.mlp = MoE(config) if self.is_moe else MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, cos, sin, cache=None, start_pos=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, start_pos)
        h = self.post_attention_layernorm(x)
        h, aux = self.mlp(h) if self.is_moe else (self.mlp(h), None)
        return x + h, aux


class Transformer(nn.Module):
    """The hub's `model.` prefix: embeddings, decoder blocks, final norm."""

    def __init__(self, config: Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(self, input_ids, caches=None, start_pos=0):
        x = self.embed_tokens(input_ids)  # (B, T, D)
        cos, sin = self.rotary_emb(start_pos, input_ids.shape[1])
        aux_total = None
        for i, layer in enumerate(self.layers):
            x, aux = layer(x, cos, sin, None if caches is None else caches[i], start_pos)
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
        return self.norm(x), aux_total


class KimiK2(nn.Module):
    """The causal LM: forward (training and cached decoding), what the trainer and MuonClip call
    (router balancing, attention modules, FLOPs), generation, then the Hugging Face hub layout."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.model = Transformer(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if not self.lm_head.weight.is_meta:  # count_params' meta model: nothing to draw (and slow)
            self.apply(self._init_weights)

    def _init_weights(self, module):
        """Every matrix ~ N(0, initializer_range) as in the hub models; norms 1; router bias 0."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding, Gate)):
            nn.init.normal_(module.weight, 0.0, std)
        elif isinstance(module, Experts):
            for p in module.parameters():
                nn.init.normal_(p, 0.0, std)

    def forward(self, input_ids, targets=None, caches=None, start_pos=0):
        """input_ids (B, T) at positions start_pos.. -> logits (B, T, V), loss (fp32 cross entropy,
        targets -1 ignored, + aux_loss_alpha * the sequence balance loss in training) or None."""
        x, aux = self.model(input_ids, caches, start_pos)
        logits = self.lm_head(x)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)
        if aux is not None:
            loss = loss + self.config.aux_loss_alpha * aux
        return logits, loss

    # -- what the trainer and MuonClip call --
    def moe_gates(self):
        return (layer.mlp.gate for layer in self.model.layers if layer.is_moe)

    def update_router_bias_(self, bias_update_speed: float) -> torch.Tensor:
        """Gate.update_bias_ on every MoE layer, from the loads of the whole step: each data-parallel
        process counts its own tokens, so they are summed over the processes first (one all_reduce
        for all layers, none on one process). Returns max/mean load per MoE layer before, (L,)."""
        gates = list(self.moe_gates())
        if gates and dist.is_available() and dist.is_initialized():
            loads = torch.stack([gate.expert_load for gate in gates])  # (L, E)
            dist.all_reduce(loads, op=dist.ReduceOp.SUM)
            for gate, load in zip(gates, loads):
                gate.expert_load.copy_(load)
        return torch.stack([gate.update_bias_(bias_update_speed) for gate in gates]) if gates else torch.zeros(0)

    def attention_modules(self):
        return [layer.self_attn for layer in self.model.layers]

    def reset_step_statistics_(self):
        """Forget what the training forwards since the last step counted: every attention module's
        max_logits back to -inf, every gate's expert_load to 0 (e.g. when a step is skipped)."""
        for attn in self.attention_modules():
            attn.reset_max_logits_()
        for gate in self.moe_gates():
            gate.expert_load.zero_()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def estimate_flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token for MFU, averaged over a causal sequence of seq_len."""
        return flops_per_token(self.config, (seq_len + 1) / 2, training=True)

    # -- generation --
    def new_caches(self, batch: int, max_len: int, naive: bool = False):
        """One decoding cache per layer (MLA.new_cache): latent, or every head's k and v (naive)."""
        return [layer.self_attn.new_cache(batch, max_len, naive) for layer in self.model.layers]

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None):
        """Sample max_new_tokens after input_ids (B, T0) from the absorbed latent cache (0: greedy)."""
        B, T0 = input_ids.shape
        caches = self.new_caches(B, T0 + max_new_tokens)
        out, pos, step_ids = input_ids, 0, input_ids
        for _ in range(max_new_tokens):
            logits = self(step_ids, caches=caches, start_pos=pos)[0][:, -1].float()  # (B, V)
            pos += step_ids.shape[1]
            if temperature == 0:
                step_ids = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                step_ids = torch.multinomial(logits.softmax(-1), 1)  # (B, 1)
            out = torch.cat([out, step_ids], 1)
        return out

    # -- the Hugging Face hub layout --
    def save_pretrained(self, directory: str):
        """config.json (model_type deepseek_v3) + model.safetensors with the hub's key names:
        routed experts unstacked to model.layers.{i}.mlp.experts.{e}.{proj}.weight. Each file is
        written atomically, with the permissions of any new file (0644 under umask 022)."""
        from safetensors.torch import save_file
        os.makedirs(directory, exist_ok=True)
        config = {**self.config.to_dict(),  # and what the hub's DeepseekV3 config.json carries beyond it:
                  "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "hidden_act": "silu",
                  "attention_bias": False, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
                  "num_nextn_predict_layers": 0, "rope_interleave": True,
                  "torch_dtype": str(self.lm_head.weight.dtype).removeprefix("torch.")}

        def write_config(path):
            with open(path, "w") as f:
                json.dump(config, f, indent=2)
        _write_atomically(os.path.join(directory, "config.json"), write_config)
        tensors = {name: t.contiguous() for name, t in self.hub_state_dict().items()}
        _write_atomically(os.path.join(directory, "model.safetensors"),
                          lambda path: save_file(tensors, path, metadata={"format": "pt"}))

    def hub_state_dict(self) -> dict:
        """state_dict under the hub's names: stacked experts split into experts.{e}.{proj}.weight, a
        tied head stored once (as embed_tokens)."""
        tensors = {}
        for name, tensor in self.state_dict().items():
            prefix, _, proj = name.rpartition(".")
            if prefix.endswith("mlp.experts"):
                tensors.update({f"{prefix}.{e}.{proj}.weight": w for e, w in enumerate(tensor.unbind(0))})
            elif not (self.config.tie_word_embeddings and name == "lm_head.weight"):
                tensors[name] = tensor
        return tensors

    @classmethod
    def from_pretrained(cls, directory: str) -> "KimiK2":
        """Load a hub-layout directory (ours or transformers' save_pretrained). Multi-token-prediction
        layers (index >= num_hidden_layers) and rotary buffers are skipped; any other difference in
        keys raises ValueError listing the missing and unexpected ones."""
        from safetensors.torch import load_file
        config = Config.from_json(os.path.join(directory, "config.json"))
        model, state, experts = cls(config), {}, {}
        for name, tensor in [item for f in sorted(os.listdir(directory)) if f.endswith(".safetensors")
                             for item in load_file(os.path.join(directory, f)).items()]:
            layer = re.match(r"model\.layers\.(\d+)\.", name)
            if name.endswith("rotary_emb.inv_freq") or (layer and int(layer[1]) >= config.num_hidden_layers):
                continue
            expert = re.fullmatch(r"(.*\.mlp\.experts)\.(\d+)\.(\w+)\.weight", name)
            if expert:
                experts.setdefault(f"{expert[1]}.{expert[3]}", {})[int(expert[2])] = tensor
            else:
                state[name] = tensor
        expected = model.state_dict()
        E, missing, unexpected = config.n_routed_experts, [], []
        for name, per_expert in experts.items():  # stack experts 0..E-1 into our (E, ., .) tensor
            prefix, _, proj = name.rpartition(".")
            absent = [e for e in range(E) if e not in per_expert]
            missing += [f"{prefix}.{e}.{proj}.weight" for e in absent]
            unexpected += [f"{prefix}.{e}.{proj}.weight" for e in per_expert if e >= E]
            state[name] = None if absent else torch.stack([per_expert[e] for e in range(E)])
        if config.tie_word_embeddings and "model.embed_tokens.weight" in state:
            state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
        missing += [re.sub(r"\.mlp\.experts\.(\w+)$", rf".mlp.experts.[0-{E - 1}].\1.weight", name)
                    for name in expected if name not in state]  # a whole stack: every expert absent
        unexpected += [k for k in state if k not in expected]
        if missing or unexpected:
            raise ValueError(f"checkpoint layout differs: missing keys {sorted(missing)}, "
                             f"unexpected keys {sorted(unexpected)}")
        model.load_state_dict(state)
        return model


# twin of data.py's write_atomically, with its guarantees: this one gives `write` a path, as
# safetensors' save_file wants, and it copies alone with this file
def _write_atomically(path: str, write):
    """Replace `path` with what write(tmp) writes at tmp, in one step (a new temporary file beside it,
    fsync, rename, fsync of the folder): a reader or a kill sees the old file or the new one, never
    half, and a failure leaves no temporary file. The file gets a new file's mode (0666 less the
    umask), also where `write` made a private one (safetensors' save_file: mkstemp, 0600)."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    mode = os.fstat(fd).st_mode & 0o777
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------------------------
# Config validation and presets

def check_config(c: Config):
    """Reject a bad value, however the fields were set (preset, config.json, an override of one
    field), with a one-line ValueError naming the field and any field it conflicts with."""
    def reject(name, why):
        raise ValueError(f"Config.{name}={getattr(c, name)!r}: {why}")

    def integer(v):
        return isinstance(v, int) and not isinstance(v, bool)

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    types = [  # (fields, test, what a value must be): checked first, so the rules below can compute
        (("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
          "num_attention_heads", "num_key_value_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
          "v_head_dim", "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group",
          "max_position_embeddings"), lambda v: integer(v) and v > 0, "must be a positive integer"),
        (("n_shared_experts", "first_k_dense_replace"), lambda v: integer(v) and v >= 0,
         "must be a non-negative integer"),
        (("rms_norm_eps", "routed_scaling_factor", "rope_theta", "initializer_range"),
         lambda v: number(v) and v > 0, "must be a positive number"),
        (("aux_loss_alpha",), lambda v: number(v) and v >= 0, "must be a number >= 0"),
        (("norm_topk_prob", "tie_word_embeddings"), lambda v: isinstance(v, bool), "must be true or false"),
        (("q_lora_rank",), lambda v: v is None or integer(v) and v > 0, "must be a positive integer or None"),
        (("rope_scaling",), lambda v: v is None or isinstance(v, dict), "must be a dict of YaRN parameters or None")]
    for names, ok, why in types:
        for name in (name for name in names if not ok(getattr(c, name))):
            reject(name, why)
    H, E, G, yarn = c.num_attention_heads, c.n_routed_experts, c.n_group, c.rope_scaling
    reach = c.topk_group * (E // G)  # the experts a token may reach
    rules = [  # (broken, field, why), in this order
        (c.num_key_value_heads != H, "num_key_value_heads",
         f"MLA has one latent per token: must equal num_attention_heads={H} (set both)"),
        (c.qk_rope_head_dim % 2, "qk_rope_head_dim", "RoPE rotates pairs; must be even"),
        (c.first_k_dense_replace > c.num_hidden_layers, "first_k_dense_replace",
         f"must lie in [0, num_hidden_layers={c.num_hidden_layers}]"),
        (E % G, "n_routed_experts", f"must be divisible by n_group={G}"),
        (G > 1 and E // G < 2, "n_group", f"groups of n_routed_experts/n_group={E // G} expert; group scores "
                                          "sum each group's top-2 experts, so groups need >= 2"),
        (c.topk_group > G, "topk_group", f"must be <= n_group={G}"),
        (c.num_experts_per_tok > reach, "num_experts_per_tok", f"more than the {reach} experts a token may "
         f"reach (topk_group={c.topk_group} of n_group={G} groups, n_routed_experts={E})"),
        (yarn is not None and yarn.get("type", yarn.get("rope_type")) != "yarn", "rope_scaling",
         "only YaRN scaling ({'type': 'yarn', ...}) is supported"),
        (yarn is not None and not (number(yarn.get("factor")) and yarn["factor"] > 0), "rope_scaling",
         "YaRN needs a positive 'factor'"),
        (yarn is not None and "original_max_position_embeddings" not in yarn, "rope_scaling",
         "YaRN needs 'original_max_position_embeddings'")]
    for bad, name, why in rules:
        if bad:
            reject(name, why)


# Presets: K2's published config.json, every other one as the fields it changes (as minGPT's table).
# Sizes: total / activated parameters as count_params counts them (activated: one token's path,
# embedding and lm_head included); the K2 report says 1.04T / 32.6B for K2, 671B / 37B for DeepSeek-V3.
_KIMI_K2 = dict(  # moonshotai/Kimi-K2-Instruct config.json: 1.03T total / 32.9B activated
    vocab_size=163840, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
    num_hidden_layers=61, num_attention_heads=64, num_key_value_heads=64, q_lora_rank=1536,
    kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    n_routed_experts=384, num_experts_per_tok=8, n_shared_experts=1, first_k_dense_replace=1,
    n_group=1, topk_group=1, routed_scaling_factor=2.827, norm_topk_prob=True, aux_loss_alpha=0.001,
    rope_theta=50000.0, max_position_embeddings=131072, rms_norm_eps=1e-6, tie_word_embeddings=False,
    initializer_range=0.02,
    rope_scaling=dict(type="yarn", factor=32.0, beta_fast=1.0, beta_slow=1.0, mscale=1.0,
                      mscale_all_dim=1.0, original_max_position_embeddings=4096),
)
# what the scaled-down presets share: data.py's byte vocabulary, a 4k context without YaRN, no
# sequence-wise balance loss (the bias update balances the experts alone)
_SCALED_DOWN = dict(vocab_size=256, max_position_embeddings=4096, rope_scaling=None, aux_loss_alpha=0.0)
PRESETS = {
    "kimi-k2": _KIMI_K2,
    # deepseek-ai/DeepSeek-V3 config.json without the MTP layer: 671B total / 37.6B activated
    "deepseek-v3": {**_KIMI_K2, "vocab_size": 129280, "num_attention_heads": 128,
                    "num_key_value_heads": 128, "n_routed_experts": 256, "first_k_dense_replace": 3,
                    "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5, "rope_theta": 10000.0,
                    "max_position_embeddings": 163840,
                    "rope_scaling": {**_KIMI_K2["rope_scaling"], "factor": 40.0, "beta_fast": 32.0}},
    # K2's shape at CPU scale, train.py's default: 2.9M total / 1.1M activated
    "tiny": {**_KIMI_K2, **_SCALED_DOWN,
             "hidden_size": 128, "intermediate_size": 384, "moe_intermediate_size": 64, "num_hidden_layers": 4,
             "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 64, "kv_lora_rank": 32,
             "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32, "n_routed_experts": 32},
    # one-GPU scale, fine-grained experts at sparsity 16: 448M total / 58.7M activated
    "small": {**_KIMI_K2, **_SCALED_DOWN,
              "hidden_size": 768, "intermediate_size": 2048, "moe_intermediate_size": 128, "num_hidden_layers": 12,
              "num_attention_heads": 12, "num_key_value_heads": 12, "q_lora_rank": 384, "kv_lora_rank": 256,
              "qk_nope_head_dim": 64, "qk_rope_head_dim": 32, "v_head_dim": 64, "n_routed_experts": 128},
}


# ----------------------------------------------------------------------------------------------
# Size arithmetic

def count_params(config: Config) -> dict:
    """Parameter counts of the real modules, built on the meta device (no memory, seconds).
    `total`: every parameter plus the router biases (as the published checkpoint counts). `activated`:
    what one token uses, all but the routed experts it does not select, embedding and lm_head in;
    `activated_no_input_embedding` without embed_tokens (31.7B for K2), `activated_no_embedding`
    without lm_head either; `matmul_activated` the activated weights that multiply (no embedding,
    norms or router bias); `router` E * (D + 1) per MoE layer, the only activated part that grows
    with n_routed_experts (the K2 report's sparsity scaling, sec. 2.3)."""
    with torch.device("meta"):
        model = KimiK2(config)
    gates = list(model.moe_gates())
    total = model.num_params() + sum(g.e_score_correction_bias.numel() for g in gates)
    embedding = model.model.embed_tokens.weight.numel()
    head = 0 if config.tie_word_embeddings else model.lm_head.weight.numel()
    per_expert = 3 * config.moe_intermediate_size * config.hidden_size
    idle = len(gates) * (config.n_routed_experts - config.num_experts_per_tok) * per_expert
    norms = sum(m.weight.numel() for m in model.modules() if isinstance(m, RMSNorm))
    activated = total - idle
    router = sum(g.weight.numel() + g.e_score_correction_bias.numel() for g in gates)
    return dict(total=total, activated=activated, activated_no_input_embedding=activated - embedding,
                activated_no_embedding=activated - embedding - head, embedding=embedding, lm_head=head,
                routed_expert=per_expert, moe_layers=len(gates), router=router,
                matmul_activated=activated - embedding - norms - len(gates) * config.n_routed_experts)


def flops_per_token(config: Config, context_len: float, training: bool = False) -> float:
    """FLOPs for one token that attends to context_len keys, 2 per multiply-add: 2 * matmul_activated
    (projections, router, chosen and shared experts, lm_head) plus naive-MLA attention, 2 * H *
    (Dn+Dr + Dv) per key and layer; no elementwise work. training=True: 3x forward (the 6N
    convention). For a whole causal sequence of length L, pass (L+1)/2."""
    attention = 2 * config.num_attention_heads * (config.qk_head_dim + config.v_head_dim) * context_len
    forward = 2 * count_params(config)["matmul_activated"] + config.num_hidden_layers * attention
    return 3 * forward if training else forward


def kv_cache_bytes_per_token(config: Config, bytes_per_number: int = 2) -> dict:
    """Decoding cache per token over all layers (bf16 by default): the absorbed form keeps
    C + Dr numbers per layer, the naive form H * (Dn+Dr + Dv)."""
    L, H = config.num_hidden_layers, config.num_attention_heads
    return dict(absorbed=L * (config.kv_lora_rank + config.qk_rope_head_dim) * bytes_per_number,
                full=L * H * (config.qk_head_dim + config.v_head_dim) * bytes_per_number)


def heads_cost(config: Config, heads: int, context_len: int = 131072) -> dict:
    """Relative change in forward FLOPs per token when num_attention_heads becomes `heads` (K2
    report sec. 2.3: 128 heads instead of 64 cost +83% at a 128k context): for the token at the end
    of the context, and averaged over a causal prefill of that length."""
    other = Config(**{**config.to_dict(), "num_attention_heads": heads, "num_key_value_heads": heads})
    end = flops_per_token(other, context_len) / flops_per_token(config, context_len) - 1
    mean_len = (context_len + 1) / 2
    prefill = flops_per_token(other, mean_len) / flops_per_token(config, mean_len) - 1
    return dict(heads=heads, context_len=context_len, end_of_context=end, prefill_average=prefill)


if __name__ == "__main__":  # the size table is kimik2_sizes.py's
    import kimik2_sizes
    kimik2_sizes.main()
