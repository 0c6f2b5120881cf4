"""muonclip_hf.py: MuonClip on transformers decoders (attach_qk_clip, the family table of
docs/muonclip.md, Trainer, the transformers recipes). Skips without transformers (Trainer tests
without accelerate).

    python -m pytest tests/test_muonclip_hf.py

The Trainer worker lives at the bottom of this file (python tests/test_muonclip_hf.py WORKER ARGS).
"""
import math
import os
import re
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import muonclip_hf
from conftest import run_alone, torchrun
from kimik2 import KimiK2
from muonclip import MuonClip, causal_max_logits, muon_update, newton_schulz, qk_clip_gamma
from muonclip_hf import attach_qk_clip, trainer_optimizer
from test_kimik2 import (_muon_clip_only_step, _muon_forward_max_logits, _muon_mla_model, _muon_record_attention_inputs,
                         _muon_replay_max_logits, _muon_run_recipe, _muon_snapshot)

def _muon_hf_config(kind):
    """(model class name, config) of a tiny random decoder of each family; 4 query heads."""
    import transformers
    llama = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, initializer_range=0.2)
    gpt = dict(vocab_size=61, num_hidden_layers=2, num_attention_heads=4, initializer_range=0.2)
    falcon = dict(hidden_size=32, alibi=False, **gpt)
    moe = dict(num_local_experts=4, num_experts_per_tok=2)
    model, config, fields = {
        "llama": ("LlamaForCausalLM", "LlamaConfig", llama),
        "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", llama),
        "mistral": ("MistralForCausalLM", "MistralConfig", dict(sliding_window=4, **llama)),
        "mixtral": ("MixtralForCausalLM", "MixtralConfig", dict(**moe, **llama)),
        "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(head_dim=8, query_pre_attn_scalar=12, sliding_window=4,
                                                              attn_logit_softcapping=2.0, **llama)),
        "gpt_oss": ("GptOssForCausalLM", "GptOssConfig", dict(head_dim=8, sliding_window=4, **moe, **llama)),
        "qwen2_moe": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=2,
                                                                    moe_intermediate_size=16,
                                                                    shared_expert_intermediate_size=16, **llama)),
        "starcoder2": ("Starcoder2ForCausalLM", "Starcoder2Config", llama),
        "phi": ("PhiForCausalLM", "PhiConfig", dict(partial_rotary_factor=0.5, **llama)),
        "gptj": ("GPTJForCausalLM", "GPTJConfig", dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, vocab_size=61,
                                                       initializer_range=0.2)),
        "opt": ("OPTForCausalLM", "OPTConfig", dict(hidden_size=32, ffn_dim=48, word_embed_proj_dim=32, dropout=0.0,
                                                    attention_dropout=0.0, **gpt)),
        "olmo2": ("Olmo2ForCausalLM", "Olmo2Config", llama),
        "cohere": ("CohereForCausalLM", "CohereConfig", dict(use_qk_norm=True, **llama)),
        "stablelm": ("StableLmForCausalLM", "StableLmConfig", dict(qk_layernorm=True, **llama)),
        "phi3": ("Phi3ForCausalLM", "Phi3Config", dict(pad_token_id=0, **llama)),
        "deepseek_v3": ("DeepseekV3ForCausalLM", "DeepseekV3Config", dict(
            q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4,
            num_experts_per_tok=2, first_k_dense_replace=1, moe_intermediate_size=16, n_group=1, topk_group=1,
            **{**llama, "num_key_value_heads": 4})),
        "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, vocab_size=61,
                                                       initializer_range=0.2, scale_attn_by_inverse_layer_idx=True,
                                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
        "gpt_neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig", dict(hidden_size=32, intermediate_size=48, rotary_pct=0.5,
                                                                 **gpt)),
        "falcon_grouped": ("FalconForCausalLM", "FalconConfig", dict(new_decoder_architecture=True, num_kv_heads=2,
                                                                     **falcon)),
        "falcon_multi_query": ("FalconForCausalLM", "FalconConfig", dict(new_decoder_architecture=False,
                                                                         multi_query=True, **falcon)),
        "falcon_mha": ("FalconForCausalLM", "FalconConfig", dict(new_decoder_architecture=False, multi_query=False,
                                                                 **falcon)),
        "falcon_alibi": ("FalconForCausalLM", "FalconConfig", dict(falcon, alibi=True)),
        "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(head_dim=8, **llama)),
        "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig", dict(head_dim=8, num_experts=4, num_experts_per_tok=2,
                                                                    moe_intermediate_size=16, **llama)),
        "codegen": ("CodeGenForCausalLM", "CodeGenConfig", dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
                                                                vocab_size=61)),
        "bloom": ("BloomForCausalLM", "BloomConfig", dict(hidden_size=32, n_layer=2, n_head=4, vocab_size=61)),
        "mpt": ("MptForCausalLM", "MptConfig", dict(d_model=32, n_heads=4, n_layers=2, vocab_size=61)),
        "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(head_dim=8, query_pre_attn_scalar=8, **llama)),
        "granite": ("GraniteForCausalLM", "GraniteConfig", dict(attention_multiplier=0.9, **llama)),
        "granitemoe": ("GraniteMoeForCausalLM", "GraniteMoeConfig", dict(attention_multiplier=0.9, **moe, **llama)),
        "olmo": ("OlmoForCausalLM", "OlmoConfig", llama),
        "olmo_clip_qkv": ("OlmoForCausalLM", "OlmoConfig", dict(clip_qkv=0.3, **llama)),
        "nemotron": ("NemotronForCausalLM", "NemotronConfig", dict(partial_rotary_factor=0.5, **llama)),
        "glm": ("GlmForCausalLM", "GlmConfig", dict(head_dim=8, pad_token_id=0, **llama)),
        "glm4": ("Glm4ForCausalLM", "Glm4Config", dict(head_dim=8, pad_token_id=0, **llama)),
        "cohere2": ("Cohere2ForCausalLM", "Cohere2Config", dict(sliding_window=4, **llama)),
        "gemma": ("GemmaForCausalLM", "GemmaConfig", dict(head_dim=8, **llama)),
        "helium": ("HeliumForCausalLM", "HeliumConfig", dict(head_dim=8, **llama)),
        # DBRX clamps q, k, v in every forward (transformers 5.24's fails with clip_qkv=None): refused
        "dbrx": ("DbrxForCausalLM", "DbrxConfig", dict(
            d_model=32, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=61, initializer_range=0.2,
            attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
            ffn_config=dict(moe_num_experts=4, moe_top_k=2, ffn_hidden_size=16))),
    }[kind]
    return model, getattr(transformers, config)(**fields)


# Every family attach_qk_clip clips: its key heads per layer, and its eager-only families.
_MUON_HF_KEY_HEADS = {"llama": 2, "qwen2": 2, "mistral": 2, "mixtral": 2, "gemma2": 2, "gpt_oss": 2, "olmo2": 2,
                      "cohere": 2, "qwen2_moe": 2, "starcoder2": 2, "phi": 2, "gptj": 4, "opt": 4, "phi3": 2, "deepseek_v3": 4, "gpt2": 4, "gpt_neox": 4, "falcon_grouped": 2,
                      "falcon_multi_query": 1, "falcon_mha": 4, "granite": 2, "granitemoe": 2, "olmo": 2, "nemotron": 2,
                      "glm": 2, "glm4": 2, "cohere2": 2, "gemma": 2, "helium": 2}
_MUON_HF_EAGER_ONLY = ("gemma2", "gpt_oss", "bloom", "mpt")     # soft-capping, sinks, ALiBi: no sdpa in transformers


def _muon_hf_model(kind, attn="sdpa", layers=2):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    name, config = _muon_hf_config(kind)
    config.num_hidden_layers = layers
    config._attn_implementation = "eager" if kind in _MUON_HF_EAGER_ONLY else attn
    model = getattr(transformers, name)(config)
    if kind == "qwen2":
        with torch.no_grad():                              # non-zero q/k biases, so the bias rule shows
            for layer in model.model.layers:
                layer.self_attn.q_proj.bias.normal_(0, 0.3)
                layer.self_attn.k_proj.bias.normal_(0, 0.3)
    return model


class _MuonHFAdapter(nn.Module):
    """model(x, x) -> (logits, loss) for a transformers causal LM, as the helpers above call it, with
    a fixed padding mask if given."""

    def __init__(self, hf, attention_mask=None):
        super().__init__()
        self.hf, self.attention_mask = hf, attention_mask

    def forward(self, idx, targets, attention_mask=None):
        mask = self.attention_mask if attention_mask is None else attention_mask
        out = self.hf(input_ids=idx, attention_mask=mask, labels=targets, use_cache=False)
        return out.logits, out.loss


def _muon_hf_padding(batch, length, seed):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 61, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :2] = 0                                          # left padding
    mask[batch // 2:, -5:] = 0                               # right padding, half the rows
    return idx, mask


def _muon_hf_spy_qk(monkeypatch, model):
    """[(query, key)] each attention layer attends with, in layer order: caught at torch's SDPA, or
    at the modeling file's eager function (the eager-only families)."""
    seen = []
    if model.config._attn_implementation == "eager":
        modeling = sys.modules[type(model).__module__]
        eager = modeling.eager_attention_forward
        monkeypatch.setattr(modeling, "eager_attention_forward", lambda module, q, k, *a, **kw: (
            seen.append((q.detach(), k.detach())), eager(module, q, k, *a, **kw))[1])
    else:
        sdpa = F.scaled_dot_product_attention
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda q, k, *a, **kw: (
            seen.append((q.detach(), k.detach())), sdpa(q, k, *a, **kw))[1])
    return seen


def _muon_hf_hand_max(kind, config, layer, q, k, mask, real_queries_only=True):
    """Per-head max of scale * q.k over causal, in-window positions whose key (and query) is a real
    token, in float64 from the q and k the kernel received: the scale and window from the family's
    config as its modeling file sets them."""
    H, T = q.shape[1], q.shape[2]
    scale = config.query_pre_attn_scalar ** -0.5 if kind == "gemma2" else q.shape[-1] ** -0.5
    scale = config.attention_multiplier if kind in ("granite", "granitemoe") else scale
    scale = 1.0 if kind == "opt" else scale                       # OPT scales q before attending
    scale /= layer + 1 if kind == "gpt2" else 1                   # scale_attn_by_inverse_layer_idx
    i, j = torch.arange(T)[:, None], torch.arange(T)
    visible = j <= i                                              # (T, T)
    types, window = getattr(config, "layer_types", None), getattr(config, "sliding_window", None)
    if window is not None and (types is None or types[layer] == "sliding_attention"):
        visible = visible & (i - j < window)
    real = mask.bool()                                            # (B, T)
    visible = visible & real[:, None, :] & (real[:, :, None] if real_queries_only else True)   # (B, T, T)
    logits = (q.double() @ k.double().repeat_interleave(H // k.shape[1], 1).mT) * scale         # (B, H, T, T)
    return logits.masked_fill(~visible[:, None], -math.inf).amax(dim=(0, 2, 3))


@pytest.mark.parametrize("kind, attn", [(kind, "eager" if kind in _MUON_HF_EAGER_ONLY else "sdpa")
                                        for kind in sorted(_MUON_HF_KEY_HEADS)] +
                         [(kind, "eager") for kind in ("llama", "qwen2", "phi3", "gpt2", "gpt_neox")])
def test_hf_family_records_the_max_logit_of_real_tokens(kind, attn, monkeypatch):
    """The statistic is the max over causal, in-window positions of real tokens (keys and queries:
    padding rows do not count) of scale * q.k, computed here from the q and k the model attends
    with and the family's own scale and window (Gemma2: before the soft-cap); eval and no-grad
    forwards do not feed it."""
    model = _muon_hf_model(kind, attn)
    modules = attach_qk_clip(model)
    seen = _muon_hf_spy_qk(monkeypatch, model)
    idx, mask = _muon_hf_padding(6, 9, 0)
    model.train()
    model(input_ids=idx, attention_mask=mask)
    assert len(seen) == len(modules) == 2
    padded_rows_count = []
    for layer, (m, (q, k)) in enumerate(zip(modules, seen)):
        expected = _muon_hf_hand_max(kind, model.config, layer, q, k, mask)
        assert torch.allclose(m.max_logits.double(), expected, rtol=1e-5, atol=1e-6), (layer, m.max_logits, expected)
        padded_rows_count.append(_muon_hf_hand_max(kind, model.config, layer, q, k, mask, real_queries_only=False))
    # on this batch (seed 0: half the rows right-padded) some head's max would come from a padded row
    assert (torch.stack(padded_rows_count) > torch.stack([m.max_logits for m in modules])).any()
    if kind == "gemma2":                                          # the soft-cap bounds what softmax sees, not S
        assert torch.stack([m.max_logits for m in modules]).max() > model.config.attn_logit_softcapping
    before = torch.stack([m.max_logits.clone() for m in modules])
    model.eval()
    model(input_ids=idx, attention_mask=mask)                               # eval: not fed
    with torch.no_grad():
        model.train()(input_ids=idx)                                        # no grad: not fed
    assert torch.equal(torch.stack([m.max_logits for m in modules]), before)


def _muon_hf_fused_maps(kind):
    """{parameter name: [map]} of each family's fused weights, read off its modeling file: a map takes
    a tensor shaped like the weight and returns that map's matrix (or expert stack)."""
    def rows(*sizes):
        ends = np.cumsum((0,) + sizes)
        return [lambda w, a=a, b=b: w[..., a:b, :] for a, b in zip(ends[:-1], ends[1:])]

    def per_group(groups, *sizes):                               # rows: `groups` x [block 0 | block 1 | ...]
        ends = np.cumsum((0,) + sizes)
        return [lambda w, a=a, b=b: w.unflatten(0, (groups, -1))[:, a:b].flatten(0, 1)
                for a, b in zip(ends[:-1], ends[1:])]

    layers = range(2)
    return {
        "gpt2": {f"transformer.h.{l}.attn.c_attn.weight": [lambda w, i=i: w[:, 32 * i:32 * (i + 1)]
                                                             for i in range(3)]  # Conv1D (in, out): column blocks
                 for l in layers},
        "phi3": {**{f"model.layers.{l}.self_attn.qkv_proj.weight": rows(32, 16, 16) for l in layers},
                 **{f"model.layers.{l}.mlp.gate_up_proj.weight": rows(48, 48) for l in layers}},
        "gpt_neox": {f"gpt_neox.layers.{l}.attention.query_key_value.weight": per_group(4, 8, 8, 8) for l in layers},
        "falcon_grouped": {f"transformer.h.{l}.self_attention.query_key_value.weight": per_group(2, 16, 8, 8)
                           for l in layers},
        "falcon_multi_query": {f"transformer.h.{l}.self_attention.query_key_value.weight": rows(32, 8, 8)
                               for l in layers},
        "falcon_mha": {f"transformer.h.{l}.self_attention.query_key_value.weight": per_group(4, 8, 8, 8)
                       for l in layers},
        "mixtral": {f"model.layers.{l}.mlp.experts.gate_up_proj": rows(48, 48) for l in layers},
        "gpt_oss": {f"model.layers.{l}.mlp.experts.gate_up_proj": [lambda w: w[..., ::2], lambda w: w[..., 1::2]]
                    for l in layers},                             # (E, D, 2I), gate and up columns alternate
        "deepseek_v3": {"model.layers.1.mlp.experts.gate_up_proj": rows(16, 16)},
        "qwen2_moe": {f"model.layers.{l}.mlp.experts.gate_up_proj": rows(16, 16) for l in layers},
        "glm": {f"model.layers.{l}.mlp.gate_up_proj.weight": rows(48, 48) for l in layers},
        "glm4": {f"model.layers.{l}.mlp.gate_up_proj.weight": rows(48, 48) for l in layers},
        "granitemoe": {f"model.layers.{l}.block_sparse_moe.experts.gate_up_proj": rows(48, 48) for l in layers},
        "dbrx": {**{f"transformer.blocks.{l}.norm_attn_norm.attn.Wqkv.weight": rows(32, 16, 16) for l in layers},
                 **{f"transformer.blocks.{l}.ffn.experts.mlp.{w}": rows(16, 16, 16, 16)      # (E*I, D): per expert
                    for l in layers for w in ("w1", "v1", "w2")}},
    }.get(kind, {})


def _clip_at_the_median_head(model):
    """A clip-only step at the median head's max logit on a padded batch: (max logits before, after,
    tau, the parameters before the step, the optimizer)."""
    idx, mask = _muon_hf_padding(3, 9, 2)
    adapter = _MuonHFAdapter(model, mask)
    inputs = _muon_record_attention_inputs(adapter, idx)
    before = _muon_replay_max_logits(adapter, inputs)
    tau = float(before.median())
    weights = _muon_snapshot(model)
    _, opt = _muon_clip_only_step(adapter, idx, tau)
    return before, _muon_replay_max_logits(adapter, inputs), tau, weights, opt


@pytest.mark.parametrize("kind", sorted(_MUON_HF_KEY_HEADS))
def test_hf_family_post_clip_logits_never_exceed_tau(kind):
    """A clip-only step at tau between the heads' maxima: each layer replayed on the (padded) input
    its max came from has logits scaled by sqrt(gamma_h * smallest gamma of the key group) (MLA:
    gamma_h), so <= tau; only q/k weights (or OLMo2's q/k norm gains) move, v maps stay."""
    model = _muon_hf_model(kind)
    attach_qk_clip(model)
    before, after, tau, weights, opt = _clip_at_the_median_head(model)
    gamma, kv = qk_clip_gamma(before, tau), _MUON_HF_KEY_HEADS[kind]                   # (L, H)
    group_min = gamma.view(-1, kv, 4 // kv).amin(-1).repeat_interleave(4 // kv, -1)    # (L, H)
    factor = gamma if kind == "deepseek_v3" else (gamma * group_min).sqrt()
    assert (before > tau).any() and (after <= tau * (1 + 1e-5)).all()
    assert torch.allclose(after, before * factor, rtol=1e-5, atol=1e-6)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, weights[n])}
    qk = r"\.(q|k|qkv|q_b|kv_b)_proj\.|c_attn|query_key_value|[qk]_norm"
    assert moved and all(re.search(qk, n) for n in moved), moved
    params = dict(model.named_parameters())
    for name, maps in _muon_hf_fused_maps(kind).items():
        if len(maps) == 3:                                        # q | k | v: the v map is untouched
            assert torch.equal(maps[2](params[name]), maps[2](weights[name])), name


def _muon_first_update(g):
    """muon_update's first step direction for one matrix (stack) g: -(W after a step at lr 1 from 0)."""
    w = torch.zeros_like(g)
    muon_update([w], [g.clone()], [torch.zeros_like(g)], 1.0, ns=lambda x: newton_schulz(x, dtype=torch.float32))
    return -w


@pytest.mark.parametrize("kind", sorted(k for k in [*_MUON_HF_KEY_HEADS, "dbrx"] if _muon_hf_fused_maps(k)))
def test_hf_family_fused_weights_are_orthogonalised_map_by_map(kind):
    """muonclip_hf.mark_known_fused (no attach_qk_clip: training without the clip) declares each
    family's fused weights: one step moves each map (as the modeling file splits it) by its own Muon
    update, not by the update of the whole weight as one matrix."""
    model = _muon_hf_model(kind)
    muonclip_hf.mark_known_fused(model)
    maps = _muon_hf_fused_maps(kind)
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(0)
    grads = {name: torch.randn(params[name].shape, generator=gen) for name in maps}
    start = {name: params[name].detach().clone() for name in maps}
    opt = MuonClip.for_model(model, lr=0.1, weight_decay=0.0, qk_clip_tau=None, ns_dtype=torch.float32)
    for name, p in params.items():
        p.grad = grads.get(name)
    opt.step()
    for name, split in maps.items():
        step = params[name].detach() - start[name]
        for piece in split:
            g = piece(grads[name])
            assert torch.allclose(piece(step), -0.1 * _muon_first_update(g), atol=1e-5), name
        whole = -0.1 * _muon_first_update(grads[name])
        assert not torch.allclose(step, whole, atol=1e-3), name


def test_hf_flash_visibility_is_what_flash_attends():
    """Under flash attention transformers passes no 4-D mask: a (B, T) padding mask or None, with
    packed documents in position_ids and a sliding window as kwargs. The visibility handed to
    causal_max_logits is causal & same document & inside the window & key and query not padding."""
    module = types.SimpleNamespace(is_causal=True)
    config = types.SimpleNamespace(_attn_implementation="flash_attention_2")
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 9, 8, generator=gen), torch.randn(2, 2, 9, 8, generator=gen)
    i, j = torch.arange(9)[:, None], torch.arange(9)
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 7, 8]])
    doc = (positions == 0).cumsum(-1)                                                   # (B, T)
    padding = torch.ones(2, 9, dtype=torch.bool)
    padding[1, :3] = padding[0, -3:] = False                                            # left, right padding
    cases = [(None, dict(position_ids=positions), (j <= i) & (doc[:, :, None] == doc[:, None, :])),
             (padding, dict(sliding_window=4), (j <= i) & (i - j < 4) & padding[:, None, :] & padding[:, :, None])]
    for mask, kwargs, visible in cases:
        got = causal_max_logits(q, k, 0.5, **muonclip_hf._visibility(module, q, k, mask, config, kwargs))
        logits = (q @ k.repeat_interleave(2, 1).mT) * 0.5                                # (B, H, T, T)
        expected = logits.masked_fill(~visible.expand(2, 9, 9)[:, None], -math.inf).amax(dim=(0, 2, 3))
        assert torch.allclose(got, expected, rtol=1e-6)


def _muon_hf_unknown_attention():
    """A Llama whose first attention module has lost q_proj for a fused `wqkv` of unknown layout."""
    model = _muon_hf_model("llama")
    attn = model.model.layers[0].self_attn
    attn.wqkv = nn.Linear(32, 64, bias=False)
    del attn.q_proj
    return model


@pytest.mark.parametrize("kind, reason", [
    ("qwen3", r"QK-norm\) with no gain that scales each head.*undoes any scaling.*qk_clip_tau=None"),
    ("gemma3", r"QK-norm\) with no gain that scales each head.*undoes any scaling.*qk_clip_tau=None"),
    ("stablelm", r"QK-norm\) with no gain that scales each head.*undoes any scaling.*qk_clip_tau=None"),
    ("qwen3_moe", r"QK-norm\) with no gain that scales each head.*undoes any scaling.*qk_clip_tau=None"),
    ("codegen", r"CodeGenAttention\) has neither.*rules=\{CodeGenAttention: fn\(module, gamma\)\}"),
    ("bloom", r"no attention module it can read.*recipe 1"),
    ("mpt", r"no attention module it can read.*recipe 1"),
    ("falcon_alibi", r"ALiBi.*bias does not scale with the weights"),
    ("olmo_clip_qkv", r"clamps q, k and v to \[-0.3, 0.3\] after the projections \(clip_qkv=0.3\).*clip_qkv=None"),
    ("dbrx", r"clamps q, k and v to \[-8.0, 8.0\].*clip_qkv=None"),
    ("unknown", r"LlamaAttention\) has neither.*rules=\{LlamaAttention: fn\(module, gamma\)\}.*recipe 4"),
])
@pytest.mark.filterwarnings("ignore:MuonClip.*is named as fused")   # wqkv: unknown on purpose
def test_hf_refusals_name_the_reason_and_the_way_out(kind, reason):
    model = _muon_hf_unknown_attention() if kind == "unknown" else _muon_hf_model(kind)
    with pytest.raises(ValueError, match=reason):
        attach_qk_clip(model)


@pytest.mark.filterwarnings("ignore:MuonClip.*is named as fused")   # wqkv: unknown on purpose
def test_hf_rules_give_an_unknown_attention_class_its_clip_and_the_statistic_comes_free():
    """attach_qk_clip(model, rules={cls: fn}): fn(module, gamma) is the module's qk_clip_, the
    statistic is read through the attention interface as for a known class."""
    model = _muon_hf_unknown_attention()
    calls = []
    modules = attach_qk_clip(model, rules={"LlamaAttention": lambda m, gamma: calls.append((m, gamma))})
    modules[0].qk_clip_(torch.ones(4))
    assert len(modules) == 2 and calls[0][0] is modules[0] and calls[0][1].shape == (4,)
    calls.clear()
    model = _muon_hf_model("llama")                                # a class it knows: the rule replaces its own
    modules = attach_qk_clip(model, rules={type(model.model.layers[0].self_attn): lambda m, gamma: calls.append(m)})
    opt = MuonClip.for_model(model, lr=0.0, weight_decay=0.0, qk_clip_tau=1e-3)
    model.train()(input_ids=torch.randint(0, 61, (2, 6)), labels=torch.randint(0, 61, (2, 6))).loss.backward()
    opt.step()
    assert calls == modules and opt.clip_stats["max_logits"].isfinite().all()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("how", ["optimizers", "optimizer_cls_and_kwargs"])
def test_hf_model_trains_through_trainer_with_clip_and_post_clip_logits_never_exceed_tau(kind, how, tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    model = _muon_hf_model(kind)
    attach_qk_clip(model)
    adapter = _MuonHFAdapter(model)
    idx, mask = _muon_hf_padding(4, 12, 1)
    tau = float(_muon_forward_max_logits(adapter, idx).median())
    kwargs = dict(lr=0.02, weight_decay=0.1, qk_clip_tau=tau, ns_dtype=torch.float32)
    if how == "optimizers":
        trainer_kw = dict(optimizers=(MuonClip.for_model(model, **kwargs), None))
    else:
        trainer_kw = dict(optimizer_cls_and_kwargs=(MuonClip, {"model": model, **kwargs}))
    data = [{"input_ids": i, "attention_mask": m, "labels": i.masked_fill(m == 0, -100)} for i, m in zip(idx, mask)]
    args = transformers.TrainingArguments(str(tmp_path), max_steps=6, per_device_train_batch_size=4,
                                          report_to="none", save_strategy="no", use_cpu=True,
                                          dataloader_num_workers=0, logging_strategy="no", disable_tqdm=True)
    class CountClips(transformers.TrainerCallback):       # heads_clipped after every optimizer step
        def __init__(self):
            self.clipped = []

        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            self.clipped.append(int(optimizer.optimizer.clip_stats["heads_clipped"]))   # accelerate's wrapper

    counter = CountClips()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[counter], **trainer_kw)
    trainer.train()
    assert len(counter.clipped) == 6 and sum(counter.clipped) > 0

    # after training: a clip-only step, then each layer replayed on the input its max came from
    inputs = _muon_record_attention_inputs(adapter, idx)
    before = _muon_replay_max_logits(adapter, inputs)
    tau = float(before.median())
    _, opt = _muon_clip_only_step(adapter, idx, tau)
    after = _muon_replay_max_logits(adapter, inputs)
    gamma = qk_clip_gamma(before, tau)                                        # (L, H)
    group_min = gamma.view(-1, 2, 2).amin(-1).repeat_interleave(2, -1)      # (L, H), 2 query heads per key
    assert (before > tau).any() and (after <= tau * (1 + 1e-5)).all()
    assert torch.allclose(after, before * (gamma * group_min).sqrt(), rtol=1e-5)
    smallest = (before > tau) & (gamma == group_min)                       # these end exactly at tau
    assert smallest.any() and torch.allclose(after[smallest], torch.full_like(after[smallest], tau), rtol=1e-5)


def _muon_hf_trainer_run(out_dir, world=1, steps=3):
    """A tiny Llama through Trainer with MuonClip (trainer_optimizer, tau low enough to clip): 4
    sequences of equal length, one global batch of 4 per step (4 // world per process); returns
    (parameters, clip_stats of the last step)."""
    import transformers
    model = _muon_hf_model("llama")
    attach_qk_clip(model)
    ids = torch.randint(0, 61, (4, 12), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": i, "labels": i} for i in ids]
    args = transformers.TrainingArguments(out_dir, max_steps=steps, per_device_train_batch_size=4 // world,
                                          report_to="none", save_strategy="no", use_cpu=True, seed=0,
                                          dataloader_num_workers=0, logging_strategy="no", disable_tqdm=True,
                                          ddp_broadcast_buffers=False)   # each rank keeps its own running max
    optimizer = trainer_optimizer(lr=0.02, weight_decay=0.1, qk_clip_tau=2.5, ns_dtype=torch.float32)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizer_cls_and_kwargs=optimizer)
    trainer.train()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, trainer.optimizer.optimizer.clip_stats


def _muon_hf_trainer_worker(out_dir):
    torch.set_num_threads(1)
    params, stats = _muon_hf_trainer_run(out_dir, world=int(os.environ["WORLD_SIZE"]))
    torch.save((params, stats), os.path.join(out_dir, f"rank{os.environ['RANK']}.pt"))


def test_hf_trainer_on_two_processes_matches_one_process(tmp_path):
    """torchrun --nproc_per_node=2 (gloo, CPU): Trainer wraps the model in DDP and MuonClip
    all-reduces the max logits, so both ranks clip alike and end where one process ends, within
    fp32 rounding (the gradient is averaged over ranks instead of summed in one process)."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    proc = torchrun([os.path.abspath(__file__), "muonclip-hf-trainer", str(tmp_path)], timeout=300,
                     env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    (rank0, stats0), (rank1, stats1) = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    single, stats = _muon_hf_trainer_run(str(tmp_path / "single"))
    assert int(stats["heads_clipped"]) > 0
    assert torch.equal(stats0["max_logits"], stats1["max_logits"])
    assert torch.allclose(stats0["max_logits"], stats["max_logits"], rtol=1e-5)
    for name in single:
        assert torch.equal(rank0[name], rank1[name]), name
        assert (rank0[name] - single[name]).abs().max() < 1e-5, name


def test_hf_trainer_optimizer_pair_serves_a_second_trainer(tmp_path):
    """The (factory, kwargs) pair of trainer_optimizer is never changed by Trainer, so a second
    Trainer (a resume, a new run) takes it as it is."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    model = _muon_hf_model("llama")
    attach_qk_clip(model)
    pair = trainer_optimizer(lr=0.02, weight_decay=0.1, qk_clip_tau=100.0)
    data = [{"input_ids": i, "labels": i} for i in torch.randint(0, 61, (4, 8))]
    args = transformers.TrainingArguments(str(tmp_path), max_steps=1, per_device_train_batch_size=4,
                                          report_to="none", save_strategy="no", use_cpu=True,
                                          logging_strategy="no", disable_tqdm=True)
    for _ in range(2):
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizer_cls_and_kwargs=pair)
        trainer.train()
        assert len(trainer.optimizer.optimizer.attention_modules) == 2
        assert trainer.optimizer.optimizer.distribute == "newton_schulz"  # Trainer saves rank 0's state
    assert pair[1] == dict(distribute="newton_schulz", lr=0.02, weight_decay=0.1, qk_clip_tau=100.0)


def test_hf_deepseek_v3_and_kimik2_train_alike_with_muonclip(tmp_path):
    """One optimizer, two implementations of one model: transformers' DeepseekV3ForCausalLM with
    attach_qk_clip and kimik2.KimiK2, from the same weights and batches, stay equal over steps in
    which heads clip (MLA rule, fused gate/up declared as two blocks, the same roles)."""
    transformers = pytest.importorskip("transformers")
    ours = _muon_mla_model(0, heads=4, layers=2, init=0.2)
    ours.save_pretrained(str(tmp_path / "start"))
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(str(tmp_path / "start"))
    attach_qk_clip(theirs)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 61, (2, 10), generator=gen) for _ in range(2)]
    tau = float(_muon_forward_max_logits(ours, batches[0]).median())
    opts = [MuonClip.for_model(m, lr=0.01, weight_decay=0.1, qk_clip_tau=tau, ns_dtype=torch.float32)
            for m in (ours, theirs)]
    for role in (0, 1):                                          # the same roles: Muon, AdamW
        assert len({sum(p.numel() for p in o.param_groups[role]["params"]) for o in opts}) == 1
    clipped = []
    for step in range(4):
        x = batches[step % 2]
        for model, opt in zip((ours, theirs), opts):
            model.train()
            logits = ours(x)[0] if model is ours else theirs(input_ids=x).logits
            F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        a, b = (o.clip_stats for o in opts)
        assert torch.allclose(a["max_logits"], b["max_logits"], rtol=1e-5, atol=1e-6)
        assert int(a["heads_clipped"]) == int(b["heads_clipped"])
        clipped.append(int(a["heads_clipped"]))
    assert sum(clipped) > 0
    theirs.save_pretrained(str(tmp_path / "theirs"))
    back = KimiK2.from_pretrained(str(tmp_path / "theirs"))
    for (name, p), q in zip(ours.state_dict().items(), back.state_dict().values()):
        assert (p - q).abs().max() < 5e-6, name                # measured 4e-7 after 4 steps


# ----------------------------------------------------------------- the transformers recipes of docs

@pytest.mark.parametrize("index", [2, 3])
def test_docs_transformers_recipes_run(index, tmp_path, monkeypatch):
    """docs/muonclip.md's recipes 3 (Trainer) and 4 (rules= for GPT-BigCode), as printed; after
    recipe 4 a clip-only step scales each head's logits by its factor (one key head for all)."""
    pytest.importorskip("transformers")
    if index == 2:
        pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    monkeypatch.chdir(tmp_path)                          # Trainer writes into its output_dir
    namespace = _muon_run_recipe(index)
    opt = namespace["trainer"].optimizer.optimizer if index == 2 else namespace["opt"]
    assert len(opt.attention_modules) == 2 and opt.clip_stats["max_logits"].shape == (2, 4)
    assert opt.clip_stats["max_logits"].isfinite().all()            # every layer's statistic was fed
    if index == 3:                  # the rule by hand: a clip-only step scales each head by its factor
        model = namespace["model"]
        for m in model.modules():                                    # dropout off, so a replay repeats
            if isinstance(m, nn.Dropout):
                m.p = 0.0
            if hasattr(m, "attn_dropout"):                           # a float in GPT-BigCode
                m.attn_dropout = 0.0
        adapter = _MuonHFAdapter(model)
        idx = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
        inputs = _muon_record_attention_inputs(adapter, idx)
        before = _muon_replay_max_logits(adapter, inputs)
        tau = float(before.median())
        _muon_clip_only_step(adapter, idx, tau)
        gamma = qk_clip_gamma(before, tau)
        after = _muon_replay_max_logits(adapter, inputs)
        assert (before > tau).any() and (after <= tau * (1 + 1e-5)).all()
        one_key_head = (gamma * gamma.amin(-1, keepdim=True)).sqrt()
        assert torch.allclose(after, before * one_key_head, rtol=1e-5)


def test_documented_names_work_where_the_docs_say_they_live():
    """docs/muonclip.md says muonclip.attach_qk_clip and muonclip.trainer_optimizer: muonclip.py
    serves them from muonclip_hf.py on first use (PEP 562)."""
    import muonclip
    assert muonclip.attach_qk_clip is muonclip_hf.attach_qk_clip
    assert muonclip.trainer_optimizer is muonclip_hf.trainer_optimizer
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        muonclip.nothing_here


def test_muonclip_hf_with_muonclip_alone_attaches_and_steps_a_llama(tmp_path):
    """muonclip_hf.py and muonclip.py copied alone into an empty folder: attach_qk_clip on a tiny
    Llama, MuonClip.for_model, a step that clips; without muonclip_hf.py beside it,
    muonclip.attach_qk_clip fails in one line naming the file to copy; without transformers, it
    fails with transformers' ImportError."""
    pytest.importorskip("transformers")
    script = """
import importlib, os
os.rename("muonclip_hf.py", "muonclip_hf.py.away")  # first muonclip.py alone
import muonclip
try:
    muonclip.attach_qk_clip
    raise AssertionError("muonclip.attach_qk_clip without muonclip_hf.py")
except ImportError as e:
    assert str(e) == 'muonclip.attach_qk_clip lives in muonclip_hf.py: copy it beside muonclip.py', e
os.rename("muonclip_hf.py.away", "muonclip_hf.py")
importlib.invalidate_caches()
import sys, torch
sys.modules["transformers"] = None  # without transformers: muonclip_hf.py imports, attaching needs it
try:
    muonclip.attach_qk_clip(torch.nn.Linear(4, 4))
    raise AssertionError("attach_qk_clip without transformers")
except ImportError as e:
    assert "transformers" in str(e), e
del sys.modules["transformers"]
from transformers import LlamaConfig, LlamaForCausalLM
import muonclip_hf
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2))
assert len(muonclip.attach_qk_clip(model)) == 2
opt = muonclip.MuonClip.for_model(model, lr=1e-2, weight_decay=0.1, qk_clip_tau=1e-3)
idx = torch.randint(0, 64, (2, 12))
model(input_ids=idx, labels=idx).loss.backward()
opt.step()
assert int(opt.clip_stats["heads_clipped"]) == 8
"""
    assert run_alone(tmp_path, ["muonclip.py", "muonclip_hf.py"], script).endswith("ok\n")


# ------------------------------------------ a clip that cannot take effect is refused (issue 25)

def _muon_peft(model, **lora):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"], init_lora_weights=False, **lora)
    return peft.get_peft_model(model, config)


def _muon_lora_clip(model):
    """_clip_at_the_median_head's (before, after, tau), the logit factor each head should get (GQA: its
    own gamma times its group's smallest), and the parameters before the step."""
    before, after, tau, weights, _ = _clip_at_the_median_head(model)
    gamma = qk_clip_gamma(before, tau)
    group_min = gamma.view(-1, 2, 2).amin(-1).repeat_interleave(2, -1)
    return before, after, tau, gamma * group_min, weights


@pytest.mark.parametrize("order", ["attach_then_peft", "peft_then_attach"])
def test_lora_clip_scales_the_effective_query_and_key_weights(order):
    """PEFT LoRA computes q = W x + s B A x: the clip scales the rows of W and of B together, so a
    clip-only step scales each head's logits by its factor (<= tau), in either order of
    attach_qk_clip and get_peft_model. A (and v, o, the MLP) stay; the frozen W is rescaled too,
    which is why the saved adapter alone is not the clipped model (docs/muonclip.md). Before, the
    first order scaled W only (logits stayed above tau), the second was refused."""
    model = _muon_hf_model("llama")
    if order == "attach_then_peft":
        attach_qk_clip(model)
        model = _muon_peft(model)
    else:
        model = _muon_peft(model)
        attach_qk_clip(model)
    before, after, tau, factor, weights = _muon_lora_clip(model)
    assert (before > tau).any() and (after <= tau * (1 + 1e-5)).all()
    assert torch.allclose(after, before * factor.sqrt(), rtol=1e-5, atol=1e-6)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, weights[n])}
    assert any("base_layer" in n for n in moved) and any("lora_B" in n for n in moved)
    assert all(re.search(r"\.[qk]_proj\.(base_layer|lora_B)", n) for n in moved), moved


@pytest.mark.parametrize("case", ["qwen2_biases_lora_bias_checkpointing", "rslora", "second_adapter_active"])
def test_lora_variants_clip_exactly(case):
    """The hostile pass on LoRA: Qwen2 (q/k biases) with LoRA's own bias under gradient
    checkpointing, rsLoRA (scale alpha / sqrt(r)), two adapters with the second active: a clip-only
    step scales each head's logits by its factor; the inactive adapter's B is scaled with W too, so
    switching back to it gives its own effective weight, scaled alike."""
    peft = pytest.importorskip("peft")
    model = _muon_hf_model("qwen2" if case.startswith("qwen2") else "llama")
    if case.startswith("qwen2"):
        model.gradient_checkpointing_enable()
    model = _muon_peft(model, **({"lora_bias": True} if case.startswith("qwen2") else
                                 {"use_rslora": True} if case == "rslora" else {}))
    if case == "second_adapter_active":
        model.add_adapter("second", peft.LoraConfig(r=2, target_modules=["q_proj", "k_proj"], init_lora_weights=False))
        model.set_adapter("second")
    attach_qk_clip(model)
    before, after, tau, factor, weights = _muon_lora_clip(model)
    assert (before > tau).any() and torch.allclose(after, before * factor.sqrt(), rtol=1e-5, atol=1e-6)
    if case == "second_adapter_active":
        assert not all(torch.equal(p, weights[n]) for n, p in model.named_parameters() if "lora_B.default" in n)


def test_dora_is_refused_naming_it_and_the_way_out():
    """DoRA renormalises each row by its norm and rescales by a magnitude vector: scaling W and B
    changes nothing, so attach_qk_clip refuses it (and so does MuonClip, if DoRA came after)."""
    with pytest.raises(ValueError, match=r"LlamaAttention.[qk]_proj is PEFT DoRA.*use_dora=False.*qk_clip_tau=None"):
        attach_qk_clip(_muon_peft(_muon_hf_model("llama"), use_dora=True))
    model = _muon_hf_model("llama")
    attach_qk_clip(model)
    model = _muon_peft(model, use_dora=True)
    with pytest.raises(ValueError, match=r"PEFT DoRA"):
        MuonClip.for_model(model, lr=0.0, weight_decay=0.0, qk_clip_tau=1.0)


def test_a_clamp_set_after_attaching_is_refused_at_the_next_clip():
    """OLMo's clip_qkv clamps q and k after the projections: refused when attaching (the family
    table), and checked again at every clip, so a clamp switched on later stops the step in one line
    instead of reporting heads clipped that did not move."""
    model = _muon_hf_model("olmo")
    attach_qk_clip(model)
    opt = MuonClip.for_model(model, lr=0.0, weight_decay=0.0, qk_clip_tau=1e-3)
    model.config.clip_qkv = 0.3
    model.train()(input_ids=torch.randint(0, 61, (2, 6)), labels=torch.randint(0, 61, (2, 6))).loss.backward()
    with pytest.raises(ValueError, match=r"clip_qkv=0.3"):
        opt.step()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_statistic_is_exact_under_cpu_autocast_from_the_q_and_k_the_kernel_receives(dtype, monkeypatch):
    """Under autocast the kernel computes in bf16/fp16 (SDPA casts the q and k it is given, here
    float32 after the rotary embedding); the statistic is float32 from those very q and k (captured
    at the kernel, cast as it casts them), against a float64 hand computation."""
    model = _muon_hf_model("llama")
    modules = attach_qk_clip(model)
    seen = _muon_hf_spy_qk(monkeypatch, model)
    idx, mask = _muon_hf_padding(4, 9, 0)
    with torch.autocast("cpu", dtype=dtype):
        model.train()(input_ids=idx, attention_mask=mask)
    for layer, (m, (q, k)) in enumerate(zip(modules, seen)):
        with torch.autocast("cpu", dtype=dtype):          # SDPA casts what it is given...
            assert F.scaled_dot_product_attention(q, k, k).dtype == dtype
        q, k = q.to(dtype), k.to(dtype)                   # ...so these are what it computes with
        expected = _muon_hf_hand_max("llama", model.config, layer, q, k, mask)
        assert torch.allclose(m.max_logits.double(), expected, rtol=1e-6, atol=1e-7), (m.max_logits, expected)


# ------------------------------------------------------------- the hostile pass: more wrappers

def test_gpt2_with_lora_on_the_fused_conv1d_clips_exactly():
    """GPT-2's c_attn is a Conv1D (y = x @ W) and PEFT wraps it with fan_in_fan_out: the clip scales
    W's q and k columns and B's q and k rows alike, and the v block of both stays."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_muon_hf_model("gpt2"), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False))
    attach_qk_clip(model)
    before, after, tau, weights, _ = _clip_at_the_median_head(model)
    assert (before > tau).any() and torch.allclose(after, before * qk_clip_gamma(before, tau), rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():                  # D = 32: columns (rows of B) [q | k | v]
        clipped = bool((before[int(name.split(".h.")[1][0])] > tau).any()) if ".h." in name else False
        if "c_attn.base_layer.weight" in name:
            assert torch.equal(p[:, 64:], weights[name][:, 64:]) and torch.equal(p, weights[name]) != clipped
        if "c_attn.lora_B" in name:
            assert torch.equal(p[64:], weights[name][64:]) and torch.equal(p, weights[name]) != clipped


@pytest.mark.parametrize("how, reason", [
    ("weight_norm", r"q_proj is a torch.nn.utils.parametrize.ParametrizedLinear, not an nn.Linear"),
    ("forward_hook", r"q_proj has function on its forward"),
    ("quantized", r"q_proj is a torch.ao.nn.quantized.dynamic.modules.linear.Linear, not an nn.Linear"),
    ("offloaded", r"q_proj.weight is a Parameter of torch.float32 on meta"),
    ("ia3", r"[qk]_proj is a peft.tuners.ia3.layer.Linear, not an nn.Linear \(a quantized layer, or a wrapper"),
])
def test_what_rewrites_the_weight_or_the_output_is_refused_naming_it(how, reason):
    """Between q_proj's weight and q: a weight-norm parametrization, a forward hook, a dynamically
    quantized Linear, a weight offloaded to the meta device, PEFT IA3 (a learned scale after the
    layer, a wrapper it does not read): each refused at attach_qk_clip in one line naming it."""
    model = _muon_hf_model("llama")
    attn = model.model.layers[0].self_attn
    if how == "weight_norm":
        nn.utils.parametrizations.weight_norm(attn.q_proj)
    elif how == "forward_hook":
        attn.q_proj.register_forward_hook(lambda mod, args, out: out * 2)
    elif how == "quantized":
        attn.q_proj = torch.ao.nn.quantized.dynamic.Linear(32, 32)
    elif how == "offloaded":
        attn.q_proj.to("meta")
    else:
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(model, peft.IA3Config(target_modules=["q_proj", "k_proj"], feedforward_modules=[]))
    with pytest.raises(ValueError, match=reason):
        attach_qk_clip(model)


if __name__ == "__main__":
    if sys.argv[1] == "muonclip-hf-trainer":
        _muon_hf_trainer_worker(sys.argv[2])
