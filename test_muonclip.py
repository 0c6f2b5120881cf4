"""Tests for muonclip.py: Muon vs torch.optim.Muon, AdamW vs torch.optim.AdamW, Newton-Schulz, the
parameter split, QK-Clip on MLA (kimik2) and on a plain MHA/GQA model defined here, gradient
accumulation, and 2-process DDP / FSDP2 runs (torchrun, gloo on CPU).

Run: python -m pytest test_muonclip.py -q
The distributed worker lives at the bottom: python test_muonclip.py muonclip-dist OUT_DIR (under torchrun).
"""
import copy
import io
import math
import os
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hypothesis import assume, given, settings, strategies as st
from torch import nn

from muonclip import MuonClip, newton_schulz, qk_clip_mha_, rms_matching_scale, split_params


# ------------------------------------------------------------- a plain MHA/GQA model with the surface

class _MuonAttention(nn.Module):
    """Causal grouped-query attention with explicit logits, tracking max_logits for QK-Clip."""

    def __init__(self, dim, num_heads, num_kv_heads, head_dim):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        # no q/k biases: a key bias only adds q.b_k, constant over keys, so its gradient is pure
        # rounding noise that AdamW would blow up into rank-dependent steps
        self.q_proj = nn.Linear(dim, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, dim, bias=False)
        self.register_buffer("max_logits", torch.full((num_heads,), -math.inf), persistent=False)

    def forward(self, x):
        B, T, _ = x.shape
        H, G, hd = self.num_heads, self.num_heads // self.num_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, hd).transpose(1, 2)                             # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, -1, hd).transpose(1, 2).repeat_interleave(G, 1)    # (B, H, T, hd)
        v = self.v_proj(x).view(B, T, -1, hd).transpose(1, 2).repeat_interleave(G, 1)    # (B, H, T, hd)
        logits = (q @ k.transpose(-2, -1)) * hd ** -0.5                                  # (B, H, T, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        logits = logits.masked_fill(~causal, -math.inf)
        if self.training and torch.is_grad_enabled():
            torch.maximum(self.max_logits, logits.detach().amax(dim=(0, 2, 3)), out=self.max_logits)
        y = logits.softmax(-1) @ v                                                       # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * hd))

    def qk_clip_(self, gamma):
        qk_clip_mha_(self.q_proj.weight, self.k_proj.weight, gamma, self.num_kv_heads)


class _MuonBlock(nn.Module):
    def __init__(self, dim, num_heads, num_kv_heads, head_dim, hidden):
        super().__init__()
        self.attn_norm, self.mlp_norm = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.attn = _MuonAttention(dim, num_heads, num_kv_heads, head_dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class _MuonLM(nn.Module):
    def __init__(self, vocab=61, dim=24, layers=2, num_heads=4, num_kv_heads=2, head_dim=6, hidden=37,
                 tie=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(_MuonBlock(dim, num_heads, num_kv_heads, head_dim, hidden)
                                    for _ in range(layers))
        self.norm = nn.RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.embed.weight

    def forward(self, idx, targets):
        x = self.embed(idx)
        for layer in self.layers:
            x = layer(x)
        logits = self.lm_head(self.norm(x))
        return logits, F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


# ----------------------------------------------------------------------------------- helpers

def _muon_mla_model(seed, heads=2, q_lora_rank=16, rope_scaling=None, layers=2, init=0.3):
    from kimik2 import Config, KimiK2
    torch.manual_seed(seed)
    config = Config(**{**Config.from_preset("tiny").to_dict(),
                       "vocab_size": 61, "hidden_size": 32, "intermediate_size": 48,
                       "moe_intermediate_size": 16, "num_hidden_layers": layers,
                       "num_attention_heads": heads, "num_key_value_heads": heads,
                       "q_lora_rank": q_lora_rank, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
                       "qk_rope_head_dim": 4, "v_head_dim": 8, "n_routed_experts": 4,
                       "num_experts_per_tok": 2, "first_k_dense_replace": 1,
                       "rope_scaling": rope_scaling, "initializer_range": init})
    return KimiK2(config)


def _muon_model(kind, seed):
    if kind == "mla":
        return _muon_mla_model(seed)
    torch.manual_seed(seed)
    return _MuonLM()


def _muon_attention_modules(model):
    return [m for m in model.modules() if hasattr(m, "max_logits") and hasattr(m, "qk_clip_")]


def _muon_forward_max_logits(model, idx):
    """Each attention module's per-head max logit on idx with the current weights, (L, H)."""
    model.train()
    for m in _muon_attention_modules(model):
        m.max_logits.fill_(-math.inf)
    with torch.enable_grad():
        model(idx, idx)
    out = torch.stack([m.max_logits.clone() for m in _muon_attention_modules(model)])
    for m in _muon_attention_modules(model):
        m.max_logits.fill_(-math.inf)
    return out


def _muon_record_attention_inputs(model, idx):
    """Run a training forward and keep every attention module's input (args, kwargs)."""
    modules, inputs = _muon_attention_modules(model), []
    hooks = [m.register_forward_pre_hook(lambda m, a, kw: inputs.append((a, kw)), with_kwargs=True)
             for m in modules]
    _muon_forward_max_logits(model, idx)
    for h in hooks:
        h.remove()
    return inputs


def _muon_replay_max_logits(model, inputs):
    """Each attention module's per-head max logit on its recorded input, (L, H). QK-Clip's promise is
    per layer: clipping layer l changes what layer l+1 sees, so the whole-model forward is not it."""
    out = []
    for m, (args, kwargs) in zip(_muon_attention_modules(model), inputs):
        m.train()
        m.max_logits.fill_(-math.inf)
        with torch.enable_grad():
            m(*args, **kwargs)
        out.append(m.max_logits.clone())
        m.max_logits.fill_(-math.inf)
    return torch.stack(out)


def _muon_tau_between(max_logits, index):
    """A tau strictly between two distinct head maxima, so some heads clip and some do not."""
    s = max_logits.flatten().sort().values
    i = index % (s.numel() - 1)
    assume(bool(s[i] < s[i + 1]) and float(s[i]) > 0)
    return float((s[i] + s[i + 1]) / 2)


def _muon_snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ------------------------------------------------------------------- 1. the halves vs torch.optim

def _muon_run_pair(shapes, ns_dtype, steps=10, lr=0.02, wd=0.1):
    torch.manual_seed(0)
    ours = [torch.randn(s, requires_grad=True) for s in shapes]
    ref = [p.detach().clone().requires_grad_() for p in ours]
    opt = MuonClip([{"params": ours, "use_muon": True}], lr=lr, weight_decay=wd, momentum=0.95,
                   nesterov=True, qk_clip_tau=None, ns_dtype=ns_dtype)
    ref_opt = torch.optim.Muon(ref, lr=lr, weight_decay=wd, momentum=0.95, nesterov=True,
                               adjust_lr_fn="match_rms_adamw")
    for _ in range(steps):
        for p, q in zip(ours, ref):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
    return max((p - q).abs().max().item() for p, q in zip(ours, ref))


_MUON_SHAPES = [(32, 48), (48, 32), (40, 40), (32, 48), (8, 64)]


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
def test_muon_half_matches_torch_muon_exactly_with_fp32_newton_schulz(monkeypatch):
    """Same maths, NS in fp32 on both sides: torch's EMA momentum is (1 - mu) times our sum, a scale
    Newton-Schulz's normalisation removes, so only fp32 rounding is left (1e-6 after 10 steps)."""
    import torch.optim._muon as torch_muon
    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz",
                        lambda g, coeffs, steps, eps: newton_schulz(g, steps, eps, dtype=torch.float32))
    assert _muon_run_pair(_MUON_SHAPES, torch.float32) < 1e-6


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
def test_muon_half_matches_torch_muon_within_bf16_newton_schulz_noise():
    """Default bf16 NS on both sides. torch feeds (1 - mu) * (our input) into bf16, which rounds
    differently, and 5 bf16 NS iterations then differ per entry by up to ~17% of the update's RMS
    (measured; bf16 keeps 8 bits). The update's RMS is 0.2 * lr, so after 10 steps the weights may
    differ by at most 10 * 0.2 * lr * 0.3 = 0.012; measured ~1e-3 since the errors do not add up."""
    lr = 0.02
    diff = _muon_run_pair(_MUON_SHAPES, torch.bfloat16, lr=lr)
    assert diff < 10 * 0.2 * lr * 0.3
    assert diff > 0   # not trivially equal: the bf16 path really is in use


def test_newton_schulz_equals_torch_reference_on_one_matrix():
    import torch.optim._muon as torch_muon
    torch.manual_seed(0)
    for shape in [(24, 40), (40, 24)]:
        g = torch.randn(shape)
        ref = torch_muon._zeropower_via_newtonschulz(g, (3.4445, -4.7750, 2.0315), 5, 1e-7)
        assert (newton_schulz(g).float() - ref.float()).abs().max() < 1e-2


def test_adamw_half_matches_torch_adamw():
    torch.manual_seed(0)
    ours = [torch.randn(s, requires_grad=True) for s in [(10,), (7, 3), (5,), (4, 4, 2)]]
    ref = [p.detach().clone().requires_grad_() for p in ours]
    opt = MuonClip([{"params": ours, "use_muon": False}], lr=0.01, weight_decay=0.1, qk_clip_tau=None)
    ref_opt = torch.optim.AdamW(ref, lr=0.01, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    for step in range(10):
        for i, (p, q) in enumerate(zip(ours, ref)):
            # parameter 2 misses its gradient on two steps: its bias correction must lag behind
            p.grad = None if (i == 2 and step in (3, 4)) else torch.randn_like(p)
            q.grad = None if p.grad is None else p.grad.clone()
        opt.step()
        ref_opt.step()
    assert max((p - q).abs().max().item() for p, q in zip(ours, ref)) < 1e-6


def test_one_learning_rate_gives_muon_update_the_rms_of_adamw():
    """First Muon step, no weight decay: the update's RMS is 0.2 * lr * (RMS of NS output * sqrt(max))."""
    torch.manual_seed(0)
    p = torch.zeros(64, 256, requires_grad=True)
    p.grad = torch.randn(64, 256)
    MuonClip([{"params": [p], "use_muon": True}], lr=1.0, weight_decay=0.0, qk_clip_tau=None).step()
    expected = newton_schulz(p.grad * 1.95).float() * rms_matching_scale(p.shape)   # G + mu*M, M = G
    assert torch.allclose(-p.detach(), expected, atol=1e-6)
    assert 0.15 < p.detach().pow(2).mean().sqrt() < 0.25        # ~0.2: what AdamW's update RMS is


# ------------------------------------------------------------------------------ 2. Newton-Schulz

@given(batch=st.sampled_from([(), (1,), (3,), (2, 2)]), rows=st.integers(2, 48),
       cols=st.integers(2, 48), cond=st.floats(1.0, 30.0), seed=st.integers(0, 2 ** 16),
       dtype=st.sampled_from([torch.bfloat16, torch.float32]))
@settings(deadline=None)
def test_newton_schulz_singular_values_in_band_around_one(batch, rows, cols, cond, seed, dtype):
    """Inputs with singular values spread over a factor `cond` (a full-rank gradient; NS cannot
    lift singular values that are ~0): 5 quintic steps put all of them in [0.6, 1.25]."""
    gen = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(*batch, rows, k, generator=gen))      # (..., rows, k)
    v, _ = torch.linalg.qr(torch.randn(*batch, cols, k, generator=gen))      # (..., cols, k)
    s = torch.exp(torch.rand(*batch, k, generator=gen) * math.log(cond))     # (..., k) in [1, cond]
    g = u @ torch.diag_embed(s) @ v.mT                                       # (..., rows, cols)
    out = newton_schulz(g, dtype=dtype)
    assert out.shape == g.shape and out.dtype == dtype
    sv = torch.linalg.svdvals(out.float())
    assert sv.min() > 0.6 and sv.max() < 1.25, (sv.min(), sv.max())


@given(n=st.integers(1, 6), rows=st.integers(2, 40), cols=st.integers(2, 40), seed=st.integers(0, 99))
@settings(deadline=None)
def test_newton_schulz_batched_equals_per_matrix(n, rows, cols, seed):
    g = torch.randn(n, rows, cols, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(newton_schulz(g), torch.stack([newton_schulz(m) for m in g]))


def test_expert_stack_is_orthogonalised_per_expert():
    """An (E, A, B) parameter gets the same update as E separate (A, B) parameters, and not the
    update of the stack taken as one (E*A, B) matrix."""
    torch.manual_seed(0)
    stack = torch.randn(4, 16, 24, requires_grad=True)
    separate = [m.detach().clone().requires_grad_() for m in stack]
    grad = torch.randn(4, 16, 24)
    stack.grad = grad.clone()
    for p, g in zip(separate, grad):
        p.grad = g.clone()
    MuonClip([{"params": [stack], "use_muon": True}], lr=0.1, qk_clip_tau=None).step()
    MuonClip([{"params": separate, "use_muon": True}], lr=0.1, qk_clip_tau=None).step()
    assert torch.equal(stack.detach(), torch.stack([p.detach() for p in separate]))
    as_one = newton_schulz(grad.reshape(64, 24)).reshape(4, 16, 24).float()
    per_expert = newton_schulz(grad).float()
    assert (as_one - per_expert).abs().max() > 0.1


# ------------------------------------------------------------------------------ parameter split

def test_split_params_sends_embeddings_head_norms_biases_to_adamw():
    model = _muon_mla_model(0)
    muon, adamw = split_params(model)
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names, adamw_names = {names[id(p)] for p in muon}, {names[id(p)] for p in adamw}
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= adamw_names
    assert all(p.ndim == 1 for n, p in model.named_parameters() if "norm" in n and n in adamw_names)
    assert "model.layers.1.mlp.experts.gate_proj" in muon_names          # (E, I, H) stack
    assert "model.layers.1.mlp.gate.weight" in muon_names                # router matrix
    assert "model.layers.0.self_attn.q_b_proj.weight" in muon_names
    assert len(muon) + len(adamw) == len(list(model.parameters()))

    tied = _MuonLM(tie=True)
    muon, adamw = split_params(tied)
    assert any(p is tied.embed.weight for p in adamw) and not any(p is tied.embed.weight for p in muon)
    assert any(p is tied.layers[0].mlp[0].bias for p in adamw)
    assert all(p.ndim >= 2 for p in muon) and len(muon) == 2 * 6        # q, k, v, o, mlp in, mlp out


def test_for_model_finds_attention_modules_and_groups():
    model = _muon_mla_model(0, layers=3)
    opt = MuonClip.for_model(model, lr=1e-3, weight_decay=0.1)
    assert len(opt.attention_modules) == 3
    assert [g["use_muon"] for g in opt.param_groups] == [True, False]


def test_group_without_use_muon_is_rejected():
    with pytest.raises(ValueError, match="use_muon"):
        MuonClip([{"params": [torch.zeros(2, 2, requires_grad=True)]}])


# ------------------------------------------------------------------------------------- 3. QK-Clip

def _muon_clip_only_step(model, idx, tau):
    """One step with lr = 0, so the weights change only by QK-Clip; returns (S before, opt)."""
    opt = MuonClip.for_model(model, lr=0.0, weight_decay=0.0, qk_clip_tau=tau)
    model.train()
    model(idx, idx)[1].backward()
    before = torch.stack([m.max_logits.clone() for m in opt.attention_modules])
    opt.step()
    return before, opt


@given(seed=st.integers(0, 2 ** 16), heads=st.integers(1, 4), q_lora=st.sampled_from([None, 16]),
       yarn=st.booleans(), T=st.integers(4, 12), batch=st.integers(1, 2), pick=st.integers(0, 100))
@settings(deadline=None)
def test_post_clip_logits_never_exceed_tau_mla(seed, heads, q_lora, yarn, T, batch, pick):
    rope_scaling = dict(type="yarn", factor=4.0, original_max_position_embeddings=8, beta_fast=32.0,
                        beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0) if yarn else None
    model = _muon_mla_model(seed, heads=heads, q_lora_rank=q_lora, rope_scaling=rope_scaling)
    idx = torch.randint(0, 61, (batch, T), generator=torch.Generator().manual_seed(seed))
    inputs = _muon_record_attention_inputs(model, idx)
    tau = _muon_tau_between(_muon_replay_max_logits(model, inputs), pick)
    weights = _muon_snapshot(model)
    before, opt = _muon_clip_only_step(model, idx, tau)
    clipped = before > tau                                                 # (L, H)
    assert torch.equal(opt.clip_stats["max_logits"], before)
    assert opt.clip_stats["heads_clipped"].dtype == torch.long
    assert int(opt.clip_stats["heads_clipped"]) == int(clipped.sum())

    after = _muon_replay_max_logits(model, inputs)
    assert (after <= tau * (1 + 1e-5)).all()
    assert torch.allclose(after[clipped], torch.full_like(after[clipped], tau), rtol=1e-4)  # not over-clipped
    assert torch.equal(after[~clipped], before[~clipped])

    nope, rope, v = 8, 4, 8
    for layer, attn in enumerate(opt.attention_modules):
        prefix = f"model.layers.{layer}.self_attn."
        q_name = prefix + ("q_proj.weight" if q_lora is None else "q_b_proj.weight")
        for h in range(heads):
            q_rows = slice(h * (nope + rope), (h + 1) * (nope + rope))
            k_rows = slice(h * (nope + v), h * (nope + v) + nope)
            v_rows = slice(h * (nope + v) + nope, (h + 1) * (nope + v))
            new_q, new_kv = dict(model.named_parameters())[q_name], attn.kv_b_proj.weight
            assert torch.equal(new_kv[v_rows], weights[prefix + "kv_b_proj.weight"][v_rows])
            same = torch.equal(new_q[q_rows], weights[q_name][q_rows]) and \
                torch.equal(new_kv[k_rows], weights[prefix + "kv_b_proj.weight"][k_rows])
            assert same != bool(clipped[layer, h])
    q_or_kv_b = ("q_b_proj.weight", "q_proj.weight", "kv_b_proj.weight")
    for name, p in model.named_parameters():            # incl. kv_a_proj_with_mqa (shared k_rope)
        if not name.endswith(q_or_kv_b):
            assert torch.equal(p, weights[name]), name


@given(seed=st.integers(0, 2 ** 16), kv_heads=st.integers(1, 3), group=st.integers(1, 3),
       head_dim=st.sampled_from([4, 8]), T=st.integers(3, 10), pick=st.integers(0, 100))
@settings(deadline=None)
def test_post_clip_logits_never_exceed_tau_mha_gqa(seed, kv_heads, group, head_dim, T, pick):
    torch.manual_seed(seed)
    model = _MuonLM(num_heads=kv_heads * group, num_kv_heads=kv_heads, head_dim=head_dim)
    idx = torch.randint(0, 61, (2, T), generator=torch.Generator().manual_seed(seed))
    inputs = _muon_record_attention_inputs(model, idx)
    tau = _muon_tau_between(_muon_replay_max_logits(model, inputs), pick)
    weights = _muon_snapshot(model)
    before, opt = _muon_clip_only_step(model, idx, tau)
    clipped = before > tau                                                 # (L, H)

    after = _muon_replay_max_logits(model, inputs)
    assert (after <= tau * (1 + 1e-5)).all()
    # head h's logits scale by sqrt(gamma_h * smallest gamma of its key group)
    gamma = torch.where(clipped, tau / before, torch.ones_like(before))   # (L, H)
    group_min = gamma.view(-1, kv_heads, group).amin(-1).repeat_interleave(group, -1)  # (L, H)
    assert torch.allclose(after, before * (gamma * group_min).sqrt(), rtol=1e-4)
    group_clipped = clipped.view(-1, kv_heads, group).any(-1)              # (L, Hkv)
    params = dict(model.named_parameters())
    for layer in range(len(model.layers)):
        q_new = params[f"layers.{layer}.attn.q_proj.weight"].view(kv_heads * group, head_dim, -1)
        q_old = weights[f"layers.{layer}.attn.q_proj.weight"].view(kv_heads * group, head_dim, -1)
        for h in range(kv_heads * group):                                  # query rows: own head only
            assert torch.equal(q_new[h], q_old[h]) != bool(clipped[layer, h]), (layer, h)
        k_new = params[f"layers.{layer}.attn.k_proj.weight"].view(kv_heads, head_dim, -1)
        k_old = weights[f"layers.{layer}.attn.k_proj.weight"].view(kv_heads, head_dim, -1)
        for g in range(kv_heads):                                          # key rows: whole group
            assert torch.equal(k_new[g], k_old[g]) != bool(group_clipped[layer, g]), (layer, g)
    for name, p in model.named_parameters():                               # v, o, mlp, norms ...
        if not (".q_proj." in name or ".k_proj." in name):
            assert torch.equal(p, weights[name]), name


@given(kv_heads=st.integers(1, 3), group=st.integers(1, 3), seed=st.integers(0, 2 ** 16))
@settings(deadline=None)
def test_qk_clip_mha_scales_each_heads_logits_by_its_gamma(kv_heads, group, seed):
    """The rule on weights and biases directly: head h's logits (x W_q + b_q)_h . (x W_k + b_k)_g(h)
    become sqrt(gamma_h * min gamma of group g) times what they were, never more than gamma_h;
    a key group whose gammas are all 1 is bitwise unchanged."""
    gen = torch.Generator().manual_seed(seed)
    H, hd, dim = kv_heads * group, 4, 12
    w_q, w_k = torch.randn(H * hd, dim, generator=gen), torch.randn(kv_heads * hd, dim, generator=gen)
    b_q, b_k = torch.randn(H * hd, generator=gen), torch.randn(kv_heads * hd, generator=gen)
    gamma = torch.where(torch.rand(H, generator=gen) < 0.5, torch.rand(H, generator=gen), torch.ones(H))
    x = torch.randn(5, dim, generator=gen)

    def logits():                                                           # (H, 5, 5)
        q = (x @ w_q.T + b_q).view(5, H, hd).transpose(0, 1)                # (H, 5, hd)
        k = (x @ w_k.T + b_k).view(5, kv_heads, hd).transpose(0, 1)         # (Hkv, 5, hd)
        return q @ k.repeat_interleave(group, 0).transpose(-2, -1)

    before, old_k = logits(), w_k.clone()
    qk_clip_mha_(w_q, w_k, gamma, kv_heads)
    qk_clip_mha_(b_q, b_k, gamma, kv_heads)
    factor = (gamma * gamma.view(kv_heads, group).amin(1).repeat_interleave(group)).sqrt()  # (H,)
    assert (factor <= gamma + 1e-7).all()
    assert torch.allclose(logits(), before * factor[:, None, None], rtol=1e-4, atol=1e-4)
    untouched = (gamma.view(kv_heads, group) == 1).all(1)                  # (Hkv,)
    for g in range(kv_heads):
        same = torch.equal(w_k.view(kv_heads, hd, dim)[g], old_k.view(kv_heads, hd, dim)[g])
        assert same == bool(untouched[g])


def test_clip_acts_after_the_update_and_only_on_heads_above_tau():
    """With lr > 0: the clipped run equals the unclipped twin except in rows of heads above tau."""
    model = _muon_model("mha", 3)
    twin = copy.deepcopy(model)
    idx = torch.randint(0, 61, (2, 8), generator=torch.Generator().manual_seed(3))
    tau = _muon_tau_between(_muon_forward_max_logits(model, idx), 3)
    opt = MuonClip.for_model(model, lr=0.05, weight_decay=0.1, qk_clip_tau=tau)
    twin_opt = MuonClip.for_model(twin, lr=0.05, weight_decay=0.1, qk_clip_tau=None)
    for m, o in ((model, opt), (twin, twin_opt)):
        m(idx, idx)[1].backward()
        o.step()
    assert int(opt.clip_stats["heads_clipped"]) > 0 and twin_opt.clip_stats == {}
    assert all((m.max_logits == -math.inf).all() for m in opt.attention_modules)          # reset
    assert all((m.max_logits > -math.inf).all() for m in _muon_attention_modules(twin))   # untouched
    differ = {n for (n, p), q in zip(model.named_parameters(), twin.parameters()) if not torch.equal(p, q)}
    assert differ and all(".q_proj." in n or ".k_proj." in n for n in differ)


# ---------------------------------------------------------------------- 4. gradient accumulation

@pytest.mark.parametrize("kind", ["mha", "mla"])
def test_max_logit_statistic_covers_every_micro_batch(kind):
    """Two micro-batches; the step's max comes from the first one for some head and the clip uses it."""
    model = _muon_model(kind, 0)
    gen = torch.Generator().manual_seed(0)
    micro = [torch.randint(0, 61, (2, 8), generator=gen) for _ in range(2)]
    inputs = [_muon_record_attention_inputs(model, x) for x in micro]
    first, last = (_muon_replay_max_logits(model, i) for i in inputs)
    if not (first > last).any():
        micro, inputs, first, last = micro[::-1], inputs[::-1], last, first
    assert (first > last).any()
    tau = float(torch.maximum(first, last).min()) / 2                      # every head clips
    opt = MuonClip.for_model(model, lr=0.0, weight_decay=0.0, qk_clip_tau=tau)
    for x in micro:
        (model(x, x)[1] / len(micro)).backward()
    opt.step()
    assert torch.equal(opt.clip_stats["max_logits"], torch.maximum(first, last))
    after = torch.maximum(*(_muon_replay_max_logits(model, i) for i in inputs))
    assert (after <= tau * (1 + 1e-5)).all()


def test_qk_clip_tau_none_turns_clipping_off():
    model = _muon_model("mla", 1)
    idx = torch.randint(0, 61, (2, 8), generator=torch.Generator().manual_seed(1))
    weights = _muon_snapshot(model)
    opt = MuonClip.for_model(model, lr=0.0, weight_decay=0.0, qk_clip_tau=None)
    model(idx, idx)[1].backward()
    opt.step()
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert opt.clip_stats == {}


def test_state_dict_round_trip_resumes_bitwise():
    model = _muon_model("mha", 5)
    x = torch.randint(0, 61, (2, 8), generator=torch.Generator().manual_seed(5))

    def train(m, opt, steps):
        for _ in range(steps):
            m(x, x)[1].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    opt = MuonClip.for_model(model, lr=0.02, weight_decay=0.1, qk_clip_tau=0.9)
    train(model, opt, 2)
    buffer = io.BytesIO()                              # through bytes, as a checkpoint on disk
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    twin = _muon_model("mha", 6)
    twin.load_state_dict(checkpoint["model"])
    twin_opt = MuonClip.for_model(twin, lr=0.02, weight_decay=0.1, qk_clip_tau=0.9)
    twin_opt.load_state_dict(checkpoint["opt"])
    train(model, opt, 2)
    train(twin, twin_opt, 2)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


# -------------------------------------------------------------------------- 5. DDP and FSDP2

_MUON_DIST_STEPS, _MUON_DIST_MICRO, _MUON_DIST_BATCH, _MUON_DIST_T = 3, 2, 4, 8


def _muon_train(kind, wrap=None, rank=0, world=1):
    """A few MuonClip steps (2 micro-batches each, low tau, fp32 NS) on this rank's share of a fixed
    global batch; returns the full parameters and the number of heads clipped per step."""
    model = _muon_model(kind, 0)
    raw = model
    if wrap == "ddp":
        # broadcast_buffers=False: rank 0's max_logits would overwrite the other ranks' running max
        model = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    elif wrap == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (world,))
        for layer in (raw.model.layers if kind == "mla" else raw.layers):
            fully_shard(layer, mesh=mesh)
        fully_shard(raw, mesh=mesh)
    tau = {"mha": 0.9, "mla": 4.5}[kind]                  # between the heads' initial maxima
    opt = MuonClip.for_model(raw, lr=0.02, weight_decay=0.1, qk_clip_tau=tau, ns_dtype=torch.float32)
    gen = torch.Generator().manual_seed(1234)
    share = _MUON_DIST_BATCH // world
    clipped = []
    for _ in range(_MUON_DIST_STEPS):
        for micro in range(_MUON_DIST_MICRO):
            x = torch.randint(0, 61, (_MUON_DIST_BATCH, _MUON_DIST_T), generator=gen)
            x = x[rank * share:(rank + 1) * share]
            last = micro == _MUON_DIST_MICRO - 1
            if wrap == "ddp" and not last:
                with model.no_sync():
                    (model(x, x)[1] / _MUON_DIST_MICRO).backward()
            else:
                (model(x, x)[1] / _MUON_DIST_MICRO).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        clipped.append(int(opt.clip_stats["heads_clipped"]))
    params = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
              for n, p in raw.named_parameters()}
    return params, clipped


def _muon_dist_worker(out_dir):
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    for kind in ("mha", "mla"):
        for wrap in ("ddp", "fsdp"):
            result = _muon_train(kind, wrap, rank, world)
            torch.save(result, os.path.join(out_dir, f"{kind}-{wrap}-{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def _muon_dist_results():
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               "--nproc_per_node=2", os.path.abspath(__file__), "muonclip-dist", out],
                              capture_output=True, text=True, timeout=300, env=env,
                              cwd=os.path.dirname(os.path.abspath(__file__)))
        assert proc.returncode == 0, proc.stderr[-4000:]
        yield {name: torch.load(os.path.join(out, name)) for name in os.listdir(out)}


@pytest.mark.parametrize("kind", ["mha", "mla"])
@pytest.mark.parametrize("wrap", ["ddp", "fsdp"])
def test_distributed_training_matches_single_process(_muon_dist_results, kind, wrap):
    (rank0, clipped0), (rank1, clipped1) = (_muon_dist_results[f"{kind}-{wrap}-{r}.pt"] for r in (0, 1))
    single, clipped = _muon_train(kind)
    assert sum(clipped) > 0 and clipped0 == clipped1 == clipped    # clipping active, same on all ranks
    assert rank0.keys() == rank1.keys() == single.keys()
    for name in single:
        assert torch.equal(rank0[name], rank1[name]), name
        assert (rank0[name] - single[name]).abs().max() < 1e-5, name


if __name__ == "__main__":
    if sys.argv[1] == "muonclip-dist":
        _muon_dist_worker(sys.argv[2])
