"""Hugging Face adapters for muonclip.py: MuonClip on transformers decoders (companion file).

    import muonclip_hf                       # beside muonclip.py; needs transformers (5.x) to attach
    muonclip_hf.attach_qk_clip(model)        # every attention layer gets the QK-Clip surface
    opt = muonclip.MuonClip.for_model(model, lr=2e-3, weight_decay=0.1, qk_clip_tau=100.0)
    Trainer(..., optimizer_cls_and_kwargs=muonclip_hf.trainer_optimizer(lr=2e-3, weight_decay=0.1))

attach_qk_clip and trainer_optimizer are also reachable as muonclip.attach_qk_clip and
muonclip.trainer_optimizer (muonclip.py imports this file on first use). What it does per family,
and what it refuses: docs/muonclip.md, "MuonClip in your model". transformers is imported only
inside the functions that need it.
"""
import functools
import inspect
import math
import sys

import torch
from torch import nn

import muonclip
from muonclip import (ColumnBlocks, RowBlocks, is_training_forward, mark_fused, qk_clip_fused_mha_, qk_clip_mha_,
                      qk_clip_mla_, record_max_logits_)

# ---------------------------------------------------------------------------- fused layouts

def _qkv_layout(m):
    """(projection, layout [q, k, v], number of key heads) of an attention module whose q, k and v
    come out of one projection in a layout read from the module itself, else None. The layouts
    are transformers' (read in each model's modeling file): GPT-2, Phi-3, DBRX, Falcon, GPT-NeoX.
    The projection may be wrapped (PEFT: base_layer); _output_tensors judges the wrapper."""
    c_attn = getattr(m, "c_attn", None)
    if type(_base(c_attn)).__name__ == "Conv1D" and hasattr(m, "split_size") and not getattr(m, "is_cross_attention", 0):
        return c_attn, ColumnBlocks([m.split_size] * 3), m.num_heads      # GPT-2: y = x @ W, W (D, 3D)
    qkv = getattr(m, "qkv_proj", None) or getattr(m, "Wqkv", None)
    if isinstance(_base(qkv), nn.Linear) and hasattr(m, "num_key_value_heads") and hasattr(m, "head_dim"):
        kv_rows = m.num_key_value_heads * m.head_dim                     # Phi-3, DBRX: [q | k | v]
        return qkv, RowBlocks([_base(qkv).out_features - 2 * kv_rows, kv_rows, kv_rows]), m.num_key_value_heads
    qkv = getattr(m, "query_key_value", None)
    if isinstance(_base(qkv), nn.Linear) and hasattr(m, "new_decoder_architecture"):  # Falcon
        H, hd = m.num_heads, m.head_dim
        if m.new_decoder_architecture:                           # per key head: [its query heads | k | v]
            return qkv, RowBlocks([H // m.num_kv_heads * hd, hd, hd], groups=m.num_kv_heads), m.num_kv_heads
        if m.multi_query:                                        # [all queries | the key | the value]
            return qkv, RowBlocks([H * hd, hd, hd]), 1
        return qkv, RowBlocks([hd] * 3, groups=H), H             # per head [q | k | v]
    if isinstance(_base(qkv), nn.Linear) and hasattr(m, "head_size"):  # GPT-NeoX: per head [q | k | v]
        H = _base(qkv).out_features // (3 * m.head_size)
        return qkv, RowBlocks([m.head_size] * 3, groups=H), H
    return None


def _base(proj):
    """The layer a PEFT wrapper wraps (base_layer), else proj itself."""
    return getattr(proj, "base_layer", proj)


def _known_fused_layouts(m):
    """[(module, parameter name, layout)] for the fused weights of module m (itself or its direct
    children) whose layout can be read from m."""
    found = _qkv_layout(m)
    known = [(_base(found[0]), "weight", found[1])] if found else []
    w = getattr(m, "gate_up_proj", None)
    if isinstance(w, nn.Parameter) and w.dim() == 3 and hasattr(m, "is_transposed"):    # transformers experts
        inner = w.shape[-1 if m.is_transposed else -2] // 2
        sizes, groups = ([inner, inner], 1) if getattr(m, "is_concatenated", True) else ([1, 1], inner)
        known.append((m, "gate_up_proj", (ColumnBlocks if m.is_transposed else RowBlocks)(sizes, groups)))
    if isinstance(_base(w), nn.Linear) and _base(w).out_features % 2 == 0:    # Phi-3, GLM: gate, up = out.chunk(2)
        known.append((_base(w), "weight", RowBlocks([_base(w).out_features // 2] * 2)))
    stacks = [getattr(m, n, None) for n in ("w1", "v1", "w2")]
    if hasattr(m, "moe_num_experts") and all(isinstance(p, nn.Parameter) and p.dim() == 2 for p in stacks):
        # DBRX's experts: w1, v1, w2 each (E*I, D), expert e = rows e*I:(e+1)*I (w2 used transposed)
        known += [(m, n, RowBlocks([m.ffn_hidden_size] * m.moe_num_experts)) for n in ("w1", "v1", "w2")]
    return known


def mark_known_fused(model):
    """muonclip.mark_known_fused, knowing transformers' layouts too: the q|k|v projections of GPT-2
    (Conv1D columns), Phi-3, GPT-NeoX and Falcon (rows, see RowBlocks), a transformers experts
    gate_up_proj in each of its four layouts (rows or columns, [gate | up] or alternating), an
    nn.Linear gate_up_proj as [gate | up]. Weights already declared keep their declaration; then
    muonclip.mark_known_fused declares torch's own and warns for what is left. attach_qk_clip calls
    it; call it yourself to train a transformers model without the clip. Returns {qualified
    parameter name: layout} it declared."""
    names = {m: n for n, m in model.named_modules()}
    declared = {}
    for m in model.modules():
        for owner, name, layout in _known_fused_layouts(m):
            if name not in owner.__dict__.get("muon_blocks", {}):
                declared[f"{names[owner]}.{name}".lstrip(".")] = mark_fused(owner, layout.sizes, name,
                                                                              columns=layout.dim == -1,
                                                                              groups=layout.groups)
    return {**declared, **muonclip.mark_known_fused(model)}


# ------------------------------------------------------------------------- attention modules

_ATTENTION = "muonclip_qk_clip"


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
    - any of these with PEFT LoRA on the projections (attached before or after get_peft_model): the
      same rule on what the forward reads, W x + s B A x (W's and B's rows alike; _output_tensors).
    Refused, with the reason: any other QK-norm (Qwen3, Gemma3: one gain of head_dim shared by all
    heads; StableLM's per-head LayerNorm: a bias after the gain), Falcon with ALiBi (the position
    bias is added to q.k and does not scale with the weights), a clamp after the projections (OLMo's,
    DBRX's clip_qkv), anything between a scaled weight and q or k (DoRA, other wrappers, quantized or
    offloaded weights, parametrizations, hooks: checked here, when MuonClip is built and at every
    clip), cross-attention, an unknown class (pass `rules`), flex_attention (its BlockMask cannot be
    read).

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
    AttentionInterface.register(_ATTENTION, _attention)
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
            rule, names = (functools.partial(rules[what], m), ()) if what in rules else _clip_rule(name, m)
            inline = hasattr(m, "_split_heads") and hasattr(m, "new_decoder_architecture")   # Falcon
            if not inline and not _calls_attention_interface(m):
                raise ValueError(f"attach_qk_clip: {name} ({what}) does not compute attention through "
                                 "transformers' ALL_ATTENTION_FUNCTIONS, so its logits cannot be read; give it "
                                 "the surface by hand (muonclip.record_max_logits_ in its forward)")
            _check_clip(m, f"{name} ({what})", names)
            m.check_qk_clip = functools.partial(_check_clip, m, f"{name} ({what})", names)
            m.qk_clip_ = functools.partial(_checked_clip_, m, f"{name} ({what})", names, rule)
            m.num_heads = m.config.num_attention_heads
            device = next(m.parameters()).device
            m.register_buffer("max_logits", torch.full((m.num_heads,), -math.inf, device=device),
                              persistent=False)
            if inline:
                m.register_forward_pre_hook(_record_inline, with_kwargs=True)
            else:
                m.config = _AttentionConfigView(m.config)
        found.append(m)
    if not found:
        raise ValueError(f"attach_qk_clip: no attention module it can read (a class name ending in 'Attention', "
                         f"with a config) in {type(model).__name__}; give yours the surface by hand (docs/muonclip.md, "
                         "\"MuonClip in your model\", recipe 1)")
    return found


def trainer_optimizer(**kwargs):
    """MuonClip for transformers' Trainer: Trainer(..., optimizer_cls_and_kwargs=
    muonclip.trainer_optimizer(lr=2e-3, weight_decay=0.1, qk_clip_tau=100.0)).

    Returns (factory, kwargs): Trainer calls the factory, then its result with (its model, **kwargs),
    so MuonClip gets the model itself (roles, fused blocks, attention modules) and kwargs is never
    changed: the same pair serves a second Trainer (a resume). The form (MuonClip, {"model": model,
    ...}) works once: Trainer removes "model" from the very dict it is given. Trainer saves the
    optimizer's state from one process, so under DDP only Newton-Schulz is shared out
    (distribute="newton_schulz"): every process keeps the whole state, and rank 0's is complete."""
    return (lambda: muonclip.MuonClip), {"distribute": "newton_schulz", **kwargs}


def _clip_rule(name, m):
    """(qk_clip_(gamma), the names of the projections it scales) of a transformers attention module,
    or the reason it cannot have one."""
    what = f"{name} ({type(m).__name__})"
    q_norm, k_norm = (next((getattr(m, n) for n in names if getattr(m, n, None) is not None), None)
                      for names in (("q_norm", "q_layernorm"), ("k_norm", "k_layernorm")))
    if q_norm is not None or k_norm is not None:
        H, hd = m.config.num_attention_heads, m.head_dim
        Hkv = getattr(m.config, "num_key_value_heads", H)
        if _gain_scales_each_row(q_norm, H * hd) and _gain_scales_each_row(k_norm, Hkv * hd):
            return functools.partial(_qk_clip_norm_gains_, q_norm, k_norm, Hkv), ()   # OLMo2, Cohere
        raise ValueError(
            f"{what} normalises q and k after the projections (QK-norm) with no gain that scales each head's "
            "output on its own (Qwen3, Gemma3: one gain of head_dim shared by all heads; StableLM: a LayerNorm "
            "bias after the gain): the norm undoes any scaling of q_proj/k_proj, so QK-Clip cannot cap its "
            "logits; train it with qk_clip_tau=None")
    if getattr(m, "is_cross_attention", False):
        raise ValueError(f"{what} is cross-attention (queries from the decoder, keys from the encoder states), "
                         "which attach_qk_clip does not handle; give its modules the surface by hand (docs/muonclip.md, "
                         "\"MuonClip in your model\", recipe 1) or train with qk_clip_tau=None")
    if hasattr(m, "kv_b_proj"):
        return functools.partial(_qk_clip_mla_, m), (_mla_q_name(m), "kv_b_proj")
    if all(getattr(m, proj, None) is not None for proj in ("q_proj", "k_proj")):
        # key heads from the shapes (q and k share head_dim): GPT-J's, OPT's configs do not name them
        kv_heads = _out_features(m, "k_proj") * m.config.num_attention_heads // _out_features(m, "q_proj")
        return functools.partial(_qk_clip_mha_, m, kv_heads), ("q_proj", "k_proj")
    fused = _qkv_layout(m)
    if fused is not None and getattr(m.config, "alibi", False):
        raise ValueError(f"{what} uses ALiBi: its logits are (q.k + a position bias) * scale, and the bias does "
                         "not scale with the weights, so QK-Clip cannot scale the head's logits by gamma; train "
                         "it with qk_clip_tau=None")
    if fused is not None:
        proj, layout, kv_heads = fused
        name = next(n for n, child in m.named_children() if child is proj)
        return functools.partial(_qk_clip_fused_, m, name, layout, kv_heads), (name,)
    raise ValueError(f"{what} has neither separate q_proj/k_proj, a known fused q|k|v projection nor MLA's "
                     "kv_b_proj: pass its clip rule, attach_qk_clip(model, rules={" + type(m).__name__ +
                     ": fn(module, gamma)}) (docs/muonclip.md, \"MuonClip in your model\", recipe 4)")


def _calls_attention_interface(m):
    """Whether the module's forward dispatches through transformers' attention registry (what the
    config view relies on); a class whose source cannot be read is taken at its word."""
    try:
        return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(type(m).forward)
    except (OSError, TypeError):
        return True


class _AttentionConfigView:
    """An attention module's view of the model config: every field is the config's own, except the
    attention implementation, which routes the module's attention call through _attention."""
    _attn_implementation = _ATTENTION

    def __init__(self, config):
        object.__setattr__(self, "wrapped", config)

    def __getattr__(self, name):                 # only for names not found on the view itself
        if name == "wrapped":                    # not yet set (unpickling, deepcopy)
            raise AttributeError(name)
        return getattr(self.wrapped, name)

    def __setattr__(self, name, value):
        setattr(self.wrapped, name, value)


def _attention(module, query, key, value, attention_mask, *args, **kwargs):
    """The registered wrapper: record the exact max logit, then run the model's own attention."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    config = module.config.wrapped
    if is_training_forward(module):
        scale = kwargs.get("scaling")
        scale = query.shape[-1] ** -0.5 if scale is None else scale
        record_max_logits_(module, query, key, scale,
                           **_visibility(module, query, key, attention_mask, config, kwargs))
    if config._attn_implementation == "eager" and getattr(module, "reorder_and_upcast_attn", False):
        return module._upcast_and_reordered_attn(query, key, value, attention_mask)   # GPT-2's eager option
    eager = sys.modules[type(module).__module__].eager_attention_forward
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager)
    return attention(module, query, key, value, attention_mask, *args, **kwargs)


def _record_inline(m, args, kwargs):
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
    visibility = _visibility(m, q, k, call.get("attention_mask"), m.config,
                                {"position_ids": call.get("position_ids")})
    record_max_logits_(m, q, k, m.inv_norm_factor, **visibility)


def _visibility(module, query, key, mask, config, kwargs):
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


# The rules below apply muonclip's rule to ones, which gives its factor per output feature, and scale
# by it what the forward reads (_scale_outputs_): one path for plain layers and LoRA-wrapped ones.

@torch.no_grad()
def _qk_clip_mha_(m, kv_heads, gamma):
    q, k = (torch.ones(_out_features(m, name), device=gamma.device) for name in ("q_proj", "k_proj"))
    qk_clip_mha_(q, k, gamma, kv_heads)
    _scale_outputs_(m, "q_proj", q)
    _scale_outputs_(m, "k_proj", k)


@torch.no_grad()
def _qk_clip_fused_(m, name, layout, num_kv_heads, gamma):
    factor = torch.ones(_out_features(m, name), device=gamma.device)
    qk_clip_fused_mha_(factor, gamma, num_kv_heads, layout)
    _scale_outputs_(m, name, factor)


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


def _qk_clip_norm_gains_(q_norm, k_norm, num_kv_heads, gamma):
    """The gain of a QK-norm comes after the normalisation: scaling head h's gain entries scales
    its q (k) exactly, where scaling q_proj's rows would be divided out."""
    qk_clip_mha_(q_norm.weight, k_norm.weight, gamma, num_kv_heads)


@torch.no_grad()
def _qk_clip_mla_(m, gamma):
    q, kv = (torch.ones(_out_features(m, name), device=gamma.device) for name in (_mla_q_name(m), "kv_b_proj"))
    qk_clip_mla_(q, kv, gamma, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim)
    _scale_outputs_(m, _mla_q_name(m), q)
    _scale_outputs_(m, "kv_b_proj", kv)


def _mla_q_name(m):
    return "q_proj" if getattr(m, "q_proj", None) is not None else "q_b_proj"     # without / with a q LoRA


# ------------------------------------------------ what sits between the scaled weights and the logits

def _output_tensors(m, name):
    """[(tensor, its output-feature dim)] of projection m.<name> as the forward reads them: an
    nn.Linear's weight rows and bias, a Conv1D's weight columns and bias and, under PEFT LoRA (output
    W x + s B A x), every adapter's B rows too: scaling all of them by f along those dims
    scales the output by f (the frozen W is rescaled as well). Anything else between the weights and
    the output (DoRA, another wrapper, a parametrization, a quantized or offloaded weight, hooks) is
    refused in one line naming it. Checked when attached, when MuonClip is built, and at every clip."""
    proj, where, lora = getattr(m, name), f"attach_qk_clip: {type(m).__name__}.{name}", []
    if hasattr(proj, "base_layer") and hasattr(proj, "lora_B"):                 # PEFT LoRA
        adapters = list(proj.lora_B)           # all of them, so each one's W + s B A scales alike
        if any(proj.use_dora.get(a, False) for a in adapters):
            raise ValueError(f"{where} is PEFT DoRA: its magnitude vector renormalises each row, so scaling the "
                             "weights cannot scale q or k; use LoRA (use_dora=False) or train with qk_clip_tau=None")
        lora = [(t, 0) for a in adapters for t in (proj.lora_B[a].weight, proj.lora_B[a].bias) if t is not None]
        proj = proj.base_layer
    kind = type(proj).__name__
    if type(proj) is not nn.Linear and kind not in ("Conv1D", "FalconLinear"):     # both: y = x W^T (+ b), W as is
        raise ValueError(f"{where} is a {type(proj).__module__}.{kind}, not an nn.Linear (a quantized layer, or a wrapper other than PEFT "
                         "LoRA): QK-Clip cannot scale what its forward computes; train it with qk_clip_tau=None, or "
                         "give the class a rule (attach_qk_clip(model, rules=...))")
    w = proj.weight
    if not (type(w) is nn.Parameter or isinstance(w, muonclip.DTensor)) or not w.is_floating_point() or w.is_meta:
        raise ValueError(f"{where}.weight is a {type(w).__name__} of {w.dtype} on {w.device} (quantized, offloaded "
                         "or a tensor subclass): scaling it in place cannot scale q or k; train with qk_clip_tau=None")
    hooks = [*proj._forward_pre_hooks.values(), *proj._forward_hooks.values()]   # (a parametrization: a class)
    if hooks:
        what = ", ".join(type(h).__name__ for h in hooks)
        raise ValueError(f"{where} has {what} on its forward, which may rewrite its weight or output, so the "
                         "scaled weight may not be what it computes with; remove it or train with qk_clip_tau=None")
    dim = 1 if kind == "Conv1D" else 0                                    # Conv1D: y = x @ W, W (in, out)
    return [(w, dim)] + ([(proj.bias, 0)] if proj.bias is not None else []) + lora


def _out_features(m, name):
    w, dim = _output_tensors(m, name)[0]
    return w.shape[dim]


def _scale_outputs_(m, name, factor):
    """Output feature i of m.<name> times factor[i], in what the forward reads (_output_tensors)."""
    for t, dim in _output_tensors(m, name):
        muonclip._scale_rows_(t if dim == 0 else t.mT, factor)


def _check_clip(m, what, names):
    """The clip of module m can take effect: no clamp after the projections, nothing between the
    weights it scales and the logits (_output_tensors). Cheap: attribute reads."""
    clamp = getattr(m, "clip_qkv", None)
    clamp = getattr(m.config, "clip_qkv", None) if clamp is None else clamp
    if clamp is not None:
        raise ValueError(f"attach_qk_clip: {what} clamps q, k and v to [-{clamp}, {clamp}] after the projections "
                         f"(clip_qkv={clamp}), so scaling their weights cannot lower a saturated logit; load the "
                         "model with clip_qkv=None, or train with qk_clip_tau=None")
    for name in names:
        _output_tensors(m, name)


def _checked_clip_(m, what, names, rule, gamma):
    _check_clip(m, what, names)
    rule(gamma)
