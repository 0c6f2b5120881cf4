"""The kimik2 test suite, for now in this one file (conftest.py holds the shared set-up): model,
optimizer, data and training, each checked against an independent reference where one exists (the
published Kimi-K2 / DeepSeek-V3 numbers and tensor list, transformers' DeepseekV3ForCausalLM,
torch.optim.Muon and torch.optim.AdamW, explicit computations) and by hypothesis properties.

    python -m pytest                              the CI run (derandomized hypothesis profile "ci")
    HYPOTHESIS_PROFILE=dev python -m pytest       many more random examples, for bug hunting

Cross-checks against transformers skip when it is not installed. The published Kimi-K2 config.json
and checkpoint tensor list the model is compared with are in reference/. Multi-process tests launch
torchrun (gloo, CPU); their workers are at the bottom of this file (python test_kimik2.py WORKER
ARGS, under torchrun).
"""
import copy
import errno
import glob
import inspect
import io
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import types
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings, strategies as st
from torch import nn

import bench
import data
import train
from kimik2 import (PRESETS, Config, Gate, KimiK2, count_params, flops_per_token, heads_cost,
                    kv_cache_bytes_per_token, main)
from muonclip import (MuonClip, causal_max_logits, find_attention_modules, fused_blocks, mark_fused, muon_update,
                      newton_schulz, qk_clip_gamma, qk_clip_mha_, record_max_logits_, rms_matching_scale, split_params)

from conftest import HERE, run_alone, torchrun

_HERE = HERE


# ==================================================================================================
# Each library file copies alone
#
# kimik2.py and muonclip.py are each copied alone into an empty folder and run there in a fresh
# interpreter (that folder as working directory, PYTHONPATH unset), so nothing else of this project
# can be imported. kimik2.py carries muonclip.py's exact max logit and MLA clip rule for that (the
# one repetition between the two files); a test keeps each pair equal.
# ==================================================================================================

# ==================================================================================================
# kimik2.py: the model
#
# Tests of kimik2.py: published sizes, transformers cross-checks, absorbed-cache generation,
# max-logit tracking and QK-Clip, the router and its bias update, the hub layout.
# ==================================================================================================

_MODEL_REFERENCE = os.path.join(_HERE, "reference")  # published Kimi-K2 facts (reference/README.md)


def _model_config(**overrides) -> Config:
    """The one tiny model config of this file: 3 layers (1 dense), 16 experts top-4, YaRN off; the
    overrides replace fields (num_attention_heads sets num_key_value_heads with it, as MLA needs)."""
    base = dict(vocab_size=61, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24,
                kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
                n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1,
                first_k_dense_replace=1, n_group=1, topk_group=1, routed_scaling_factor=2.5,
                rope_theta=10000.0, max_position_embeddings=256)
    if "num_attention_heads" in overrides:
        base["num_key_value_heads"] = overrides["num_attention_heads"]
    return Config(**{**base, **overrides})


_MODEL_YARN = dict(type="yarn", factor=8.0, beta_fast=32.0, beta_slow=1.0, mscale=1.0,
                   mscale_all_dim=1.0, original_max_position_embeddings=16)


def _model_random(config: Config, seed: int = 0) -> KimiK2:
    """A model with non-trivial router biases and norm weights, so a wrong layout would show."""
    torch.manual_seed(seed)
    model = KimiK2(config)
    with torch.no_grad():
        for gate in model.moe_gates():
            gate.e_score_correction_bias.normal_(0, 0.1)
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def _model_explicit_logits(attn, x, cos, sin):
    """Scaled pre-softmax causal logits (B, H, T, S) written out by MLA's naive form, plus v (B, H, S, Dv)."""
    with torch.no_grad():
        q, k, v = attn.qkv(x, cos, sin)
        return attn.causal_logits(q, k), v


# ----------------------------------------------------------------------------------------------
# Published sizes

def test_published_parameter_counts_and_heads_cost():
    k2, v3 = count_params(Config.from_preset("kimi-k2")), count_params(Config.from_preset("deepseek-v3"))
    assert k2["total"] == 1_026_408_232_448  # the model numbers of the published K2 checkpoint
    assert 1.02e12 <= k2["total"] <= 1.05e12
    # convention: activated includes embedding and lm_head; published 32.6B and 37B
    assert abs(k2["activated"] / 32.6e9 - 1) < 0.03
    assert abs(k2["activated_no_input_embedding"] / 31.7e9 - 1) < 0.005  # 31.7B without the input embedding
    assert abs(v3["total"] / 671e9 - 1) < 0.005
    assert abs(v3["activated"] / 37e9 - 1) < 0.03
    assert k2["total"] / v3["total"] == pytest.approx(1.54, abs=0.02)  # report: +54% total
    assert k2["activated"] / v3["activated"] == pytest.approx(0.87, abs=0.01)  # report: -13%
    cost = heads_cost(Config.from_preset("kimi-k2"), 128)
    assert 0.75 <= cost["end_of_context"] <= 0.90 and 0.75 <= cost["prefill_average"] <= 0.90
    assert kv_cache_bytes_per_token(Config.from_preset("kimi-k2"), 1)["absorbed"] == 61 * 576


def test_cli_json_reports_kimi_k2(capsys):
    main(["--preset", "kimi-k2", "--json"])
    report = json.loads(capsys.readouterr().out)["kimi-k2"]
    assert report["total"] == 1_026_408_232_448 and report["sparsity"] == 48
    assert 0.75 <= report["heads_128_cost"]["end_of_context"] <= 0.90


def test_count_params_equals_instantiated_tiny_model():
    config = Config.from_preset("tiny")
    model = KimiK2(config)
    biases = sum(g.e_score_correction_bias.numel() for g in model.moe_gates())
    assert count_params(config)["total"] == model.num_params() + biases
    # 6N-style: training FLOPs are 3x forward; attention adds per key
    assert flops_per_token(config, 10, training=True) == 3 * flops_per_token(config, 10)
    assert flops_per_token(config, 11) > flops_per_token(config, 10)


def test_routed_experts_sweep_keeps_activated_params_fixed_apart_from_the_router():
    """K2 report sec. 2.3's sparsity scaling: more routed experts, the same activated experts. One
    field changed, the configs stay valid, and only the router (E * (D + 1) per MoE layer) adds to
    the activated count."""
    tiny = Config.from_preset("tiny").to_dict()
    counts = {E: count_params(Config(**{**tiny, "n_routed_experts": E})) for E in (8, 16, 32, 48, 64)}
    D, layers = tiny["hidden_size"], counts[8]["moe_layers"]
    assert len({c["activated"] - c["router"] for c in counts.values()}) == 1
    for E, c in counts.items():
        assert c["router"] == layers * E * (D + 1)
        assert c["total"] - counts[8]["total"] == layers * (E - 8) * (c["routed_expert"] + D + 1)


def _model_reference_tensors():
    """(name, numel) of the published K2 checkpoint's model tensors, ranges expanded."""
    out = {}
    with open(os.path.join(_MODEL_REFERENCE, "kimi-k2-instruct.weights.tsv")) as f:
        next(f)
        for line in f:
            name, shape, _ = line.rstrip("\n").split("\t")
            if name.endswith("weight_scale_inv") or name.endswith("rotary_emb.inv_freq"):
                continue
            names = [name]
            for part in ("layers", "experts"):
                expanded = []
                for n in names:
                    head, sep, tail = n.partition(f"{part}.")
                    index, dot, rest = tail.partition(".")
                    if sep and "-" in index:
                        lo, hi = map(int, index.split("-"))
                        expanded += [f"{head}{part}.{i}.{rest}" for i in range(lo, hi + 1)]
                    else:
                        expanded.append(n)
                names = expanded
            numel = math.prod(int(s) for s in shape.split(","))
            out.update({n: numel for n in names})
    return out


def test_hub_layout_matches_published_k2_tensor_list():
    reference = _model_reference_tensors()
    with torch.device("meta"):
        model = KimiK2(Config.from_preset("kimi-k2"))
    ours = {name: t.numel() for name, t in model.hub_state_dict().items()}
    assert ours == reference
    assert sum(ours.values()) == count_params(model.config)["total"]


# ----------------------------------------------------------------------------------------------
# Config

def test_from_json_reads_published_kimi_k2_config():
    published = Config.from_json(os.path.join(_MODEL_REFERENCE, "kimi-k2-instruct.config.json"))
    assert published == Config.from_preset("kimi-k2")


def test_config_round_trips_through_dict_and_json(tmp_path):
    for name in PRESETS:
        config = Config.from_preset(name)
        assert Config(**config.to_dict()) == config
        (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
        assert Config.from_json(str(tmp_path / "config.json")) == config


@pytest.mark.parametrize("field, overrides", [
    ("n_routed_experts", dict(n_routed_experts=15, n_group=4, topk_group=2)),
    ("topk_group", dict(n_group=4, topk_group=5)),
    ("num_experts_per_tok", dict(n_group=4, topk_group=1, num_experts_per_tok=5)),
    ("qk_rope_head_dim", dict(qk_rope_head_dim=5)),
    ("hidden_size", dict(hidden_size=0)),
    ("num_key_value_heads", dict(num_key_value_heads=2)),
    ("first_k_dense_replace", dict(first_k_dense_replace=4)),
    ("rope_scaling", dict(rope_scaling={"type": "linear", "factor": 2.0})),
    ("q_lora_rank", dict(q_lora_rank=-1)),
    ("num_hidden_layers", dict(num_hidden_layers=2.5)),
    ("n_routed_experts", dict(n_routed_experts=True)),
    ("routed_scaling_factor", dict(routed_scaling_factor="2.5")),
    ("aux_loss_alpha", dict(aux_loss_alpha=None)),
    ("norm_topk_prob", dict(norm_topk_prob=1)),
    ("rope_scaling", dict(rope_scaling="yarn")),
    ("rope_scaling", dict(rope_scaling={**_MODEL_YARN, "factor": "8"})),
])
def test_invalid_config_raises_naming_the_field(field, overrides):
    with pytest.raises(ValueError, match=rf"^Config\.{field}="):
        _model_config(**overrides)


@pytest.mark.parametrize("field, value, conflicting", [
    ("n_routed_experts", 4, "num_experts_per_tok"),  # tiny routes each token to 8 experts
    ("num_attention_heads", 8, "num_key_value_heads"),
    ("n_group", 3, "n_routed_experts"),
    ("num_hidden_layers", 0, "num_hidden_layers"),
])
def test_one_field_override_error_names_the_field_and_its_conflict(field, value, conflicting):
    """A sweep sets one field of a preset (train.py --set FIELD=VALUE); a value that conflicts with
    another field fails naming both."""
    with pytest.raises(ValueError, match=rf"^Config\.{conflicting}=") as err:
        Config(**{**Config.from_preset("tiny").to_dict(), field: value})
    assert field in str(err.value) and "\n" not in str(err.value)


def test_unknown_preset_raises_naming_it_and_the_choices():
    with pytest.raises(ValueError, match=r"^preset='kimi-k3': unknown preset, choose one of ") as err:
        Config.from_preset("kimi-k3")
    assert all(repr(name) in str(err.value) for name in PRESETS)


# ----------------------------------------------------------------------------------------------
# Cross-check against transformers, both directions

_MODEL_CROSS_CHECK_CONFIGS = {
    "groups-yarn-2dense": dict(n_group=4, topk_group=2, first_k_dense_replace=2, rope_scaling=_MODEL_YARN),
    "k2-shape": dict(routed_scaling_factor=2.827, rope_theta=50000.0),
    "no-q-lora-tied": dict(q_lora_rank=None, tie_word_embeddings=True, n_group=2, topk_group=1,
                           num_experts_per_tok=2, rope_scaling={**_MODEL_YARN, "beta_fast": 1.0}),
}


@pytest.mark.parametrize("name", sorted(_MODEL_CROSS_CHECK_CONFIGS))
def test_logits_match_transformers_both_directions(name, tmp_path):
    transformers = pytest.importorskip("transformers")
    config = _model_config(**_MODEL_CROSS_CHECK_CONFIGS[name])
    ours = _model_random(config).eval()
    x = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    ours.save_pretrained(str(tmp_path / "ours"))
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(str(tmp_path / "ours")).eval()
    with torch.no_grad():
        expected = ours(x)[0]
        assert (theirs(x).logits - expected).abs().max() <= 1e-4
        theirs.save_pretrained(str(tmp_path / "theirs"))
        back = KimiK2.from_pretrained(str(tmp_path / "theirs")).eval()
        assert (back(x)[0] - expected).abs().max() <= 1e-4


def test_from_pretrained_lists_missing_and_unexpected_keys(tmp_path):
    from safetensors.torch import load_file, save_file
    model = _model_random(_model_config())
    model.save_pretrained(str(tmp_path))
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"], tensors["model.norm.weight"]
    tensors["model.layers.0.self_attn.extra.weight"] = torch.zeros(1)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError) as err:
        KimiK2.from_pretrained(str(tmp_path))
    message = str(err.value)
    for key in ("model.layers.1.mlp.experts.3.up_proj.weight", "model.norm.weight",
                "model.layers.0.self_attn.extra.weight"):
        assert key in message


def test_save_pretrained_is_atomic_with_the_permissions_of_a_new_file(tmp_path, monkeypatch):
    import safetensors.torch
    model = _model_random(_model_config())
    old_umask = os.umask(0o022)
    try:
        model.save_pretrained(str(tmp_path))
    finally:
        os.umask(old_umask)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    for name in ("config.json", "model.safetensors"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o644, name
    saved = (tmp_path / "model.safetensors").read_bytes()

    def fail_half_way(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", fail_half_way)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]  # no temp file left
    assert (tmp_path / "model.safetensors").read_bytes() == saved


def test_save_load_round_trip_is_exact(tmp_path):
    model = _model_random(_model_config(n_group=2, topk_group=1))
    model.save_pretrained(str(tmp_path))
    loaded = KimiK2.from_pretrained(str(tmp_path))
    assert loaded.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


# ----------------------------------------------------------------------------------------------
# Generation with the absorbed latent cache

@pytest.mark.parametrize("form", ["absorbed", "naive", "naive-sdpa"])
def test_cached_decoding_logits_equal_full_forward(form, monkeypatch):
    """Prefill, then one token at a time, then two at once: the absorbed latent cache and the naive
    per-head cache (written-out attention, and SDPA with an explicit causal mask as on CUDA) give
    the full forward's logits."""
    import kimik2
    monkeypatch.setattr(kimik2, "fused_attention_available", lambda q: form == "naive-sdpa")
    model = _model_random(_model_config(rope_scaling=_MODEL_YARN, n_group=2, topk_group=1)).eval()
    x = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(x)[0]
        caches = model.new_caches(2, 20, naive=form != "absorbed")
        if form == "absorbed":
            assert caches[0].shape == (2, 20, 16 + 4)  # kv_lora_rank + qk_rope_head_dim per token
        else:
            assert [t.shape for t in caches[0]] == [(2, 4, 20, 8 + 4), (2, 4, 20, 6)]  # every head's k, v
        prefill = model(x[:, :13], caches=caches, start_pos=0)[0]
        steps = [model(x[:, t:t + 1], caches=caches, start_pos=t)[0] for t in range(13, 18)]
        steps.append(model(x[:, 18:20], caches=caches, start_pos=18)[0])
    assert (torch.cat([prefill, *steps], 1) - full).abs().max() <= 1e-4


def test_greedy_generate_follows_full_forward_argmax():
    model = _model_random(_model_config()).eval()
    prompt = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(3))
    out = model.generate(prompt, 6, temperature=0)
    assert out.shape == (2, 11) and torch.equal(out[:, :5], prompt)
    with torch.no_grad():
        assert torch.equal(model(out[:, :-1])[0][:, 4:].argmax(-1), out[:, 5:])
    torch.manual_seed(0)
    sampled = model.generate(prompt, 4, temperature=0.7, top_k=3)
    assert sampled.shape == (2, 9) and torch.equal(sampled[:, :5], prompt)
    with torch.no_grad():  # every sampled token lies among the 3 likeliest after its prefix
        top3 = model(sampled[:, :-1])[0][:, 4:].topk(3, -1).indices  # (B, 4, 3)
    assert (top3 == sampled[:, 5:, None]).any(-1).all()


# ----------------------------------------------------------------------------------------------
# Max-logit tracking and QK-Clip (the MuonClip surface)

def _model_attention_input(config, batch, length, seed, scale):
    torch.manual_seed(seed)
    model = _model_random(config, seed)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_b_proj.weight.mul_(scale)
    attn = model.model.layers[0].self_attn
    x = torch.randn(batch, length, config.hidden_size)
    cos, sin = model.model.rotary_emb(0, length)
    return model, attn, x, cos, sin


@settings(deadline=None)
@given(heads=st.integers(1, 4), batch=st.integers(1, 3), length=st.integers(1, 24),
       seed=st.integers(0, 2**16), scale=st.floats(0.1, 30.0), yarn=st.booleans())
def test_tracked_max_logits_equal_explicit_causal_max(heads, batch, length, seed, scale, yarn):
    config = _model_config(num_attention_heads=heads, rope_scaling=_MODEL_YARN if yarn else None)
    model, attn, x, cos, sin = _model_attention_input(config, batch, length, seed, scale)
    attn.train()
    out = attn(x, cos, sin)
    logits, v = _model_explicit_logits(attn, x, cos, sin)
    # the explicit logits are the ones the attention really used
    y = (logits.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, -1)  # (B, T, H*Dv)
    assert torch.allclose(attn.o_proj(y), out, atol=1e-5)
    expected = logits.amax(dim=(0, 2, 3))  # (H,)
    assert torch.allclose(attn.max_logits, expected, rtol=1e-5, atol=1e-5)


def test_written_out_and_sdpa_attention_agree_in_output_grads_and_max_logits(monkeypatch):
    """The CPU's written-out attention (max read from its logits) and the SDPA path used where a
    fused kernel exists (max from the separate chunked pass, here forced into small chunks) agree."""
    import kimik2
    config = _model_config()
    chunked = kimik2.causal_max_logits
    monkeypatch.setattr(kimik2, "causal_max_logits", lambda q, k, scale: chunked(q, k, scale, chunk_size=5))
    results = []
    for fused in (False, True):
        monkeypatch.setattr(kimik2, "fused_attention_available", lambda q, f=fused: f)
        model, attn, x, cos, sin = _model_attention_input(config, 3, 17, 0, 20.0)
        attn.train()
        x.requires_grad_()
        out = attn(x, cos, sin)
        out.square().sum().backward()
        results.append((out.detach(), x.grad, attn.q_b_proj.weight.grad, attn.max_logits.clone()))
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(results[0][3]).all()


@settings(deadline=None)
@given(seed=st.integers(0, 2**16), length=st.integers(1, 16))
def test_eval_and_no_grad_forwards_leave_max_logits_alone(seed, length):
    model, attn, x, cos, sin = _model_attention_input(_model_config(), 2, length, seed, 1.0)
    attn.eval()
    attn(x, cos, sin)
    assert torch.isneginf(attn.max_logits).all()
    attn.train()
    with torch.no_grad():
        attn(x, cos, sin)
    assert torch.isneginf(attn.max_logits).all()
    attn.track_max_logits = False
    attn(x, cos, sin)
    assert torch.isneginf(attn.max_logits).all()


@settings(deadline=None)
@given(seed=st.integers(0, 2**16), forwards=st.integers(2, 4))
def test_max_logits_keep_running_max_until_reset(seed, forwards):
    model, attn, _, cos, sin = _model_attention_input(_model_config(), 1, 8, seed, 1.0)
    attn.train()
    running = torch.full((attn.num_heads,), float("-inf"))
    for i in range(forwards):
        x = torch.randn(2, 8, 32) * (i + 1)
        attn(x, cos, sin)
        running = torch.maximum(running, _model_explicit_logits(attn, x, cos, sin)[0].amax(dim=(0, 2, 3)))
        assert torch.allclose(attn.max_logits, running, rtol=1e-5, atol=1e-5)
    attn.reset_max_logits_()
    assert torch.isneginf(attn.max_logits).all()


def _model_attention_inputs(model):
    """Forward pre-hooks that keep each attention module's input (x, cos, sin), in layer order;
    returns (inputs, hooks)."""
    inputs = []
    hooks = [attn.register_forward_pre_hook(lambda m, args: inputs.append(args[:3]))
             for attn in model.attention_modules()]
    return inputs, hooks


def test_model_training_forward_feeds_every_layer():
    """A whole-model training forward records, in every layer, the per-head max of that layer's
    causal logits on the input it actually got, with no autograd history."""
    model = _model_random(_model_config()).train()
    x = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(4))
    inputs, hooks = _model_attention_inputs(model)
    model(x, x)[1].backward()
    for hook in hooks:
        hook.remove()
    assert len(inputs) == model.config.num_hidden_layers
    for attn, (h, cos, sin) in zip(model.attention_modules(), inputs):
        expected = _model_explicit_logits(attn, h.detach(), cos, sin)[0].amax(dim=(0, 2, 3))  # (H,)
        assert torch.allclose(attn.max_logits, expected, rtol=1e-5, atol=1e-5)
        assert not attn.max_logits.requires_grad


def test_reset_step_statistics_clears_max_logits_and_expert_loads():
    """reset_step_statistics_ forgets the forwards before it: afterwards every max_logits is -inf and
    every expert_load 0, and the next training forward records only its own statistics."""
    model = _model_random(_model_config()).train()
    small, large = (torch.randint(0, 61, (2, n), generator=torch.Generator().manual_seed(n)) for n in (6, 12))

    def statistics():
        return ([attn.max_logits.clone() for attn in model.attention_modules()],
                [gate.expert_load.clone() for gate in model.moe_gates()])
    model(small)
    alone = statistics()
    model.reset_step_statistics_()
    model(large)
    assert all((load > 0).any() for load in statistics()[1])
    model.reset_step_statistics_()
    assert all(torch.isneginf(m).all() for m in statistics()[0])
    assert all((load == 0).all() for load in statistics()[1])
    model(small)
    for a, b in zip(alone[0] + alone[1], statistics()[0] + statistics()[1]):
        assert torch.equal(a, b)


def test_qk_clip_scales_each_head_logits_by_gamma():
    model, attn, x, cos, sin = _model_attention_input(_model_config(), 2, 10, 0, 5.0)
    before = _model_explicit_logits(attn, x, cos, sin)[0]
    kv_a, kv_b = attn.kv_a_proj_with_mqa.weight.clone(), attn.kv_b_proj.weight.clone()
    gamma = torch.tensor([1.0, 0.5, 0.01, 0.9])
    attn.qk_clip_(gamma)
    after = _model_explicit_logits(attn, x, cos, sin)[0]
    finite = torch.isfinite(before)
    assert torch.allclose(after[finite], (before * gamma[None, :, None, None])[finite], atol=1e-5, rtol=1e-4)
    assert torch.equal(attn.kv_a_proj_with_mqa.weight, kv_a)  # shared k_rope untouched
    v_rows = kv_b.unflatten(0, (4, -1))[:, attn.nope:]
    assert torch.equal(attn.kv_b_proj.weight.unflatten(0, (4, -1))[:, attn.nope:], v_rows)  # v untouched
    tau = 3.0
    attn.qk_clip_((tau / before.amax(dim=(0, 2, 3))).clamp(max=1.0))
    assert _model_explicit_logits(attn, x, cos, sin)[0].max() <= tau * (1 + 1e-5)


def _model_dtensor_clip_worker(out_path):
    """torchrun worker: qk_clip_ on weights sharded over 2 ranks (rows 15 and 21: uneven shards)
    must equal the unsharded result."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    config = _model_config(num_attention_heads=3, qk_nope_head_dim=3, qk_rope_head_dim=2, v_head_dim=4)
    torch.manual_seed(0)
    reference = KimiK2(config).model.layers[0].self_attn
    sharded = KimiK2(config).model.layers[0].self_attn
    sharded.load_state_dict(reference.state_dict())
    for name in ("q_b_proj", "kv_b_proj"):
        linear = getattr(sharded, name)
        linear.weight = torch.nn.Parameter(distribute_tensor(linear.weight.detach(), mesh, [Shard(0)]))
    gamma = torch.tensor([0.25, 1.0, 0.64])
    reference.qk_clip_(gamma)
    sharded.qk_clip_(gamma)
    ok = all(torch.equal(getattr(sharded, n).weight.full_tensor(), getattr(reference, n).weight)
             for n in ("q_b_proj", "kv_b_proj"))
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            f.write("ok" if ok else "mismatch")
    dist.destroy_process_group()


def test_qk_clip_scales_only_local_rows_of_dim0_sharded_dtensor(tmp_path):
    out = tmp_path / "result"
    run = torchrun([os.path.abspath(__file__), "model-dtensor-clip", str(out)])
    assert run.returncode == 0, run.stderr[-2000:]
    assert out.read_text() == "ok"


# ----------------------------------------------------------------------------------------------
# Router and balancing

@settings(deadline=None)
@given(seed=st.integers(0, 2**16), groups=st.sampled_from([1, 2, 4, 8]), data=st.data())
def test_routing_respects_groups_and_weights_come_from_unbiased_scores(seed, groups, data):
    E = 32
    topk_group = data.draw(st.integers(1, groups))
    K = data.draw(st.integers(1, min(8, topk_group * E // groups)))
    config = _model_config(n_routed_experts=E, n_group=groups, topk_group=topk_group, num_experts_per_tok=K)
    torch.manual_seed(seed)
    gate = Gate(config)
    torch.nn.init.normal_(gate.weight, 0, 0.5)
    gate.e_score_correction_bias.normal_(0, 0.5)
    x = torch.randn(40, config.hidden_size)
    weights, experts, _ = gate(x, batch=1)
    scores = torch.sigmoid(x @ gate.weight.T)  # (N, E)
    biased = scores + gate.e_score_correction_bias
    group_score = biased.view(40, groups, -1).topk(2 if groups > 1 else 1, -1).values.sum(-1)  # (N, G)
    kept = group_score.topk(topk_group, -1).indices  # (N, topk_group)
    chosen_group = experts // (E // groups)  # (N, K)
    assert (chosen_group[:, :, None] == kept[:, None, :]).any(-1).all()  # never a masked group
    allowed = torch.zeros(40, groups, dtype=torch.bool).scatter_(1, kept, True).repeat_interleave(E // groups, 1)
    best = biased.masked_fill(~allowed, float("-inf")).topk(K, -1).values
    assert torch.allclose(biased.gather(1, experts).sort(-1).values, best.sort(-1).values)  # top-K biased
    s = scores.gather(1, experts)
    assert torch.allclose(weights, s / s.sum(-1, keepdim=True) * config.routed_scaling_factor, atol=1e-6)


@settings(deadline=None)
@given(seed=st.integers(0, 2**16))
def test_bias_update_reduces_imbalance_of_skewed_router(seed):
    config = _model_config(num_hidden_layers=1, first_k_dense_replace=0, n_routed_experts=16,
                           num_experts_per_tok=2)
    torch.manual_seed(seed)
    model = KimiK2(config).train()
    gate = next(model.moe_gates())
    with torch.no_grad():
        gate.weight[:3] += 0.1  # three experts favoured by every (positive) token below
    x = torch.randn(512, config.hidden_size).abs()
    imbalance = []
    for _ in range(40):
        gate(x, batch=1)
        load, bias = gate.expert_load.clone(), gate.e_score_correction_bias.clone()
        imbalance.append(model.update_router_bias_(0.01)[0].item())
        # b_i += bias_update_speed * sign(mean load - load_i)
        assert torch.equal(gate.e_score_correction_bias, bias + 0.01 * torch.sign(load.mean() - load))
    assert (gate.expert_load == 0).all()
    assert imbalance[0] > 3.0  # skewed to start with
    assert min(imbalance[-10:]) < 0.6 * imbalance[0]


def _model_router_bias_worker(out_dir):
    """torchrun worker: each rank counts different expert loads; update_router_bias_ must act on
    their sum, the same on every rank."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = KimiK2(_model_config(num_hidden_layers=3, first_k_dense_replace=1))
    for i, gate in enumerate(model.moe_gates()):
        gate.expert_load.copy_(_model_rank_loads(rank, i, gate.expert_load.numel()))
    imbalance = model.update_router_bias_(0.01)
    biases = torch.stack([gate.e_score_correction_bias for gate in model.moe_gates()])
    torch.save({"imbalance": imbalance, "biases": biases}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _model_rank_loads(rank, layer, E):
    """Loads such that each rank alone would move the biases differently from the two together."""
    g = torch.Generator().manual_seed(100 * layer + rank)
    return torch.randint(0, 20, (E,), generator=g).float() + (rank == 0) * 30 * (torch.arange(E) < E // 4)


def test_router_bias_update_sums_expert_loads_over_processes(tmp_path):
    run = torchrun([os.path.abspath(__file__), "model-router-bias", str(tmp_path)])
    assert run.returncode == 0, run.stderr[-2000:]
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.manual_seed(0)
    model = KimiK2(_model_config(num_hidden_layers=3, first_k_dense_replace=1))
    for i, gate in enumerate(model.moe_gates()):
        E = gate.expert_load.numel()
        gate.expert_load.copy_(_model_rank_loads(0, i, E) + _model_rank_loads(1, i, E))
        alone = torch.sign(_model_rank_loads(0, i, E).mean() - _model_rank_loads(0, i, E))
        assert not torch.equal(alone, torch.sign(gate.expert_load.mean() - gate.expert_load))
    imbalance = model.update_router_bias_(0.01)
    biases = torch.stack([gate.e_score_correction_bias for gate in model.moe_gates()])
    for result in results:
        assert torch.equal(result["biases"], biases) and torch.allclose(result["imbalance"], imbalance)


def test_expert_load_counts_training_tokens_only():
    """Eval and no-grad forwards count nothing; a training forward counts, per expert, the tokens the
    gate sent to it."""
    model = _model_random(_model_config())
    x = torch.randint(0, 61, (2, 8))
    model.eval()(x)
    with torch.no_grad():
        model.train()(x)
    assert all((g.expert_load == 0).all() for g in model.moe_gates())
    chosen = {}

    def keep_choices(gate, args, out):
        chosen[gate] = out[1]  # (N, K)
    hooks = [gate.register_forward_hook(keep_choices) for gate in model.moe_gates()]
    model.train()(x)
    for hook in hooks:
        hook.remove()
    for gate in model.moe_gates():
        E = gate.expert_load.numel()
        assert torch.equal(gate.expert_load, torch.bincount(chosen[gate].flatten(), minlength=E).float())
        assert gate.expert_load.sum() == 2 * 8 * model.config.num_experts_per_tok


@pytest.mark.parametrize("use_reference", [False, True])
def test_moe_equals_per_token_sum_over_chosen_experts(use_reference):
    """Both of Experts' paths compute y[n] = shared(x[n]) + sum_k w[n, k] * expert_{e[n, k]}(x[n])."""
    model = _model_random(_model_config()).eval()
    moe = model.model.layers[1].mlp
    moe.experts.use_reference = use_reference
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        y, _ = moe(x)
        flat = x.view(10, 32)
        weights, experts, _ = moe.gate(flat, batch=2)
        ex = moe.experts
        for n in range(10):
            ref = moe.shared_experts(flat[n])
            for w, e in zip(weights[n], experts[n]):
                h = F.silu(ex.gate_proj[e] @ flat[n]) * (ex.up_proj[e] @ flat[n])
                ref = ref + w * (ex.down_proj[e] @ h)
            assert torch.allclose(y.view(10, 32)[n], ref, atol=1e-6)


@pytest.mark.parametrize("switch", ["use_reference", "no_grouped_mm_kernel"])
def test_grouped_fast_path_equals_reference_loop_in_values_and_grads(monkeypatch, switch):
    """The fast path (sort_by_expert -> grouped_swiglu) computes what forward_reference states, in
    the loss and every gradient. The loop runs when selected, and where F.grouped_mm has no kernel
    (CUDA float32/float16), which the second case simulates."""
    import kimik2
    model = _model_random(_model_config())
    x = torch.randint(0, 61, (2, 9))
    calls, grouped_mm = [], F.grouped_mm
    monkeypatch.setattr(F, "grouped_mm", lambda *a, **kw: calls.append(1) or grouped_mm(*a, **kw))
    results = []
    for reference in (False, True):
        if switch == "use_reference":
            for m in model.modules():
                if isinstance(m, kimik2.Experts):
                    m.use_reference = reference
        else:
            monkeypatch.setattr(kimik2, "grouped_mm_supported", lambda device, dtype, r=reference: not r)
        model.zero_grad()
        calls.clear()
        _, loss = model(x, x)
        loss.backward()
        assert bool(calls) != reference  # the path asked for ran
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, atol=1e-6)
    for a, b in zip(grads_a, grads_b):
        assert torch.allclose(a, b, atol=1e-6)


def test_routed_experts_follow_bf16_autocast_and_padding_changes_no_result(monkeypatch):
    """Under CPU bf16 autocast the grouped matmuls (which have no autocast rule) get bf16 inputs, as
    nn.Linear does, with runs padded to RUN_MULTIPLE rows; the result stays the float32 one to bf16
    precision, and without padding (RUN_MULTIPLE=1) it is the same computation."""
    import kimik2
    model = _model_random(_model_config())
    experts = model.model.layers[1].mlp.experts
    x = torch.randn(40, 32)
    weights = torch.rand(40, 2)
    chosen = torch.rand(40, experts.gate_proj.shape[0]).topk(2, -1).indices  # (N, K)
    seen = []
    grouped_mm = F.grouped_mm

    def spy(a, b, offs):
        seen.append((a.dtype, b.dtype, a.shape[0], offs.tolist()))
        return grouped_mm(a, b, offs=offs)
    monkeypatch.setattr(F, "grouped_mm", spy)
    want = experts(x, weights, chosen)
    calls_fp32 = len(seen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = experts(x, weights, chosen)
        seen_bf16 = seen[calls_fp32:]
        monkeypatch.setattr(kimik2, "RUN_MULTIPLE", 1)
        unpadded = experts(x, weights, chosen)
    assert got.dtype == torch.float32
    assert seen_bf16 and all(a == b == torch.bfloat16 for a, b, *_ in seen_bf16)
    rows, offs = seen_bf16[0][2:]
    assert rows % kimik2.RUN_MULTIPLE == 0 and all(o % kimik2.RUN_MULTIPLE == 0 for o in offs)
    assert torch.allclose(got, want, rtol=2e-2, atol=2e-3)
    assert torch.allclose(got, unpadded, atol=1e-6)


def test_sequence_balance_loss_adds_to_training_loss_only():
    """Training loss = cross entropy + aux_loss_alpha * sum over MoE layers of the sequence-wise
    balance loss (DeepSeek-V3 report eq. 17-20), computed here per sequence from each gate's input
    and choices: f_i = E / (K T) * (tokens of the sequence routed to i), P_i = mean over its tokens of
    s_i / sum_j s_j, loss = mean over sequences of sum_i f_i P_i. Eval loss is the cross entropy."""
    config = _model_config(aux_loss_alpha=0.1)
    model = _model_random(config)
    B, T, E, K = 3, 10, config.n_routed_experts, config.num_experts_per_tok
    x = torch.randint(0, 61, (B, T))
    seen = []
    hooks = [gate.register_forward_hook(lambda m, args, out: seen.append((m, args[0].detach(), out[1])))
             for gate in model.moe_gates()]
    logits, loss = model.train()(x, x)
    for hook in hooks:
        hook.remove()
    balance = 0.0
    for gate, h, experts in seen:
        scores = torch.sigmoid(h @ gate.weight.detach().T).view(B, T, E)
        for b in range(B):
            chosen = experts.view(B, T * K)[b]
            f = torch.tensor([(chosen == i).sum().item() for i in range(E)]) * E / (K * T)
            p = (scores[b] / scores[b].sum(-1, keepdim=True)).mean(0)
            balance += (f * p).sum() / B
    ce = F.cross_entropy(logits.flatten(0, 1), x.flatten())
    assert len(seen) == config.num_hidden_layers - config.first_k_dense_replace
    assert torch.allclose(loss, ce + config.aux_loss_alpha * balance, rtol=1e-5)
    loss.backward()
    assert next(model.moe_gates()).weight.grad.abs().sum() > 0
    with torch.no_grad():
        logits, eval_loss = model.eval()(x, x)
    assert torch.allclose(eval_loss, F.cross_entropy(logits.flatten(0, 1), x.flatten()))


# ==================================================================================================
# muonclip.py: the optimizer
#
# Tests for muonclip.py: the file copied alone, Muon vs torch.optim.Muon, AdamW vs torch.optim.AdamW,
# Newton-Schulz, the parameter split, QK-Clip on MLA (kimik2) and on a plain MHA/GQA model defined
# here, gradient accumulation, muon_update and fused blocks, causal_max_logits against an explicit
# max, the errors and warnings that replace silent no-ops, the torch-only recipes of docs/muonclip.md
# (a nanoGPT-style fused model among them). Its companions are tested in tests/: test_muonclip_hf.py
# (transformers families, Trainer, the transformers recipes), test_muonclip_dist.py (DDP / FSDP2
# under torchrun, with and without muonclip_dist.py), test_muonclip_ns.py (the NS variants).
# Bitwise comparisons here are of one kernel on the same inputs (a stack and its experts form one
# batch; a resumed run repeats the same operations); batched against single products: tolerances.
# ==================================================================================================

# ------------------------------------------------------------------------- copied alone

def test_muonclip_alone_steps_and_clips_a_small_attention_model(tmp_path):
    """muonclip.py alone on a model defined in the script with the QK-Clip surface (num_heads,
    max_logits, qk_clip_): one MuonClip.for_model step with tau between the two largest head maxima
    clips exactly the largest head. Against the same step without the clip, that head's q and k rows
    are scaled by sqrt(tau / S_h) and every other weight is bitwise the same. No companion is
    imported (run_alone checks the project modules loaded)."""
    script = """
import copy, math, os, sys
import torch
import torch.nn.functional as F
from torch import nn
from muonclip import MuonClip, qk_clip_mha_
torch.set_num_threads(1)


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.register_buffer("max_logits", torch.full((num_heads,), -math.inf), persistent=False)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = (p(x).view(B, T, self.num_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        logits = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5
        logits = logits.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf)
        if self.training and torch.is_grad_enabled():
            torch.maximum(self.max_logits, logits.detach().amax(dim=(0, 2, 3)), out=self.max_logits)
        return self.o_proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D))

    def qk_clip_(self, gamma):
        qk_clip_mha_(self.q_proj.weight, self.k_proj.weight, gamma, self.num_heads)


class LM(nn.Module):
    def __init__(self, vocab=32, dim=16, heads=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.attn = Attention(dim, heads)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx):
        return self.lm_head(self.attn(self.embed(idx)))


torch.manual_seed(0)
model = LM()
x = torch.randint(0, 32, (2, 12))
runs = {}
for tau in (None, "between"):
    m = copy.deepcopy(model)
    F.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
    S = m.attn.max_logits.clone()
    top2 = S.topk(2).values
    opt = MuonClip.for_model(m, lr=0.02, weight_decay=0.1,
                             qk_clip_tau=None if tau is None else float(top2.mean()))
    opt.step()
    runs[tau] = m, opt.clip_stats, S
(plain, plain_stats, S), (clipped, stats, _) = runs[None], runs["between"]
h = int(S.argmax())
gamma = float(S.topk(2).values.mean() / S[h])
assert int(stats["heads_clipped"]) == 1 and int(plain_stats["heads_clipped"]) == 0
assert torch.equal(stats["max_logits"][0], S) and torch.isneginf(clipped.attn.max_logits).all()
for name, p in clipped.named_parameters():
    q = dict(plain.named_parameters())[name]
    if name in ("attn.q_proj.weight", "attn.k_proj.weight"):
        rows = slice(4 * h, 4 * h + 4)  # head h's rows (head_dim 4)
        assert torch.allclose(p[rows], q[rows] * math.sqrt(gamma), rtol=1e-6), name
        p, q = torch.cat([p[:rows.start], p[rows.stop:]]), torch.cat([q[:rows.start], q[rows.stop:]])
    assert torch.equal(p, q), name
assert not torch.equal(plain.attn.q_proj.weight, model.attn.q_proj.weight)  # the step did move the weights
assert not {"muonclip_hf", "muonclip_dist", "muonclip_ns"} & set(sys.modules)
"""
    assert run_alone(tmp_path, "muonclip.py", script).endswith("ok\n")


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

    def embed_input(self, idx):
        return self.embed(idx)

    def forward(self, idx, targets):
        x = self.embed_input(idx)
        for layer in self.layers:
            x = layer(x)
        logits = self.lm_head(self.norm(x))
        return logits, F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


# ----------------------------------------------------------------------------------- helpers

def _muon_mla_model(seed, heads=2, q_lora_rank=16, rope_scaling=None, layers=2, init=0.3):
    """A kimik2 model from the one test config (_model_config), 4 experts top-2, K2's rope base."""
    torch.manual_seed(seed)
    config = _model_config(num_hidden_layers=layers, num_attention_heads=heads, q_lora_rank=q_lora_rank,
                           rope_scaling=rope_scaling, initializer_range=init, v_head_dim=8,
                           n_routed_experts=4, num_experts_per_tok=2, routed_scaling_factor=2.827,
                           rope_theta=50000.0, max_position_embeddings=4096)
    return KimiK2(config)


def _muon_model(kind, seed):
    if kind == "mla":
        return _muon_mla_model(seed)
    torch.manual_seed(seed)
    return _MuonLM()


def _muon_forward_max_logits(model, idx):
    """Each attention module's per-head max logit on idx with the current weights, (L, H)."""
    model.train()
    for m in find_attention_modules(model):
        m.max_logits.fill_(-math.inf)
    with torch.enable_grad():
        model(idx, idx)
    out = torch.stack([m.max_logits.clone() for m in find_attention_modules(model)])
    for m in find_attention_modules(model):
        m.max_logits.fill_(-math.inf)
    return out


def _muon_record_attention_inputs(model, idx):
    """Run a training forward and keep every attention module's input (args, kwargs)."""
    modules, inputs = find_attention_modules(model), []
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
    for m, (args, kwargs) in zip(find_attention_modules(model), inputs):
        m.train()
        m.max_logits.fill_(-math.inf)
        with torch.enable_grad():
            m(*args, **kwargs)
        out.append(m.max_logits.clone())
        m.max_logits.fill_(-math.inf)
    return torch.stack(out)


def _muon_tau_between(max_logits, index):
    """A tau strictly between two distinct positive head maxima, so some heads clip and some do not;
    None where the index picks no such gap."""
    s = max_logits.flatten().sort().values
    i = index % (s.numel() - 1)
    return float((s[i] + s[i + 1]) / 2) if s[i] < s[i + 1] and s[i] > 0 else None


def _muon_clip_case(model, idx, pick):
    """Record each attention module's input, choose tau between two head maxima, snapshot the
    weights, and take one clip-only step: (inputs, tau, weights, max logits before, optimizer)."""
    inputs = _muon_record_attention_inputs(model, idx)
    tau = _muon_tau_between(_muon_replay_max_logits(model, inputs), pick)
    assume(tau is not None)
    weights = _muon_snapshot(model)
    before, opt = _muon_clip_only_step(model, idx, tau)
    return inputs, tau, weights, before, opt


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
        assert (newton_schulz(g, dtype=torch.bfloat16).float() - ref.float()).abs().max() < 1e-2


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
    """A batch is n independent matrices: each one's result is its own NS, up to fp32 rounding.
    Not bitwise: BLAS does not promise that a batched and a single product round alike (an AVX2
    EPYC differs by 4.8e-7 at n=2, 5x17); NS outputs are O(1), so 1e-5 is far below any mix-up."""
    g = torch.randn(n, rows, cols, generator=torch.Generator().manual_seed(seed))
    batched, single = newton_schulz(g, dtype=torch.float32), torch.stack([newton_schulz(m, dtype=torch.float32) for m in g])
    assert (batched - single).abs().max() < 1e-5


def test_optimizer_batches_by_shape_with_the_same_kernel_on_the_same_inputs():
    """orthogonalise_by_shape runs one newton_schulz call per (A, B) shape on the concatenated units
    (stacks, parts, separate weights alike); each result is bitwise its slice of that one call, the
    same kernel on the same inputs, which holds on any CPU. This is what keeps the bitwise tests
    below exact: a stack and its experts as separate weights form the same batch."""
    import muonclip
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(s, generator=gen) for s in [(12, 20), (3, 12, 20), (20, 12), (12, 20)]]
    calls = []
    ns = lambda stack: calls.append(stack) or newton_schulz(stack, dtype=torch.float32)   # noqa: E731
    out = muonclip.orthogonalise_by_shape(inputs, [None] * 4, ns)
    assert [tuple(c.shape) for c in calls] == [(5, 12, 20), (1, 20, 12)]
    together = newton_schulz(torch.cat([inputs[0][None], inputs[1], inputs[3][None]]), dtype=torch.float32)
    assert torch.equal(out[0], together[0]) and torch.equal(out[1], together[1:4]) and torch.equal(out[3], together[4])
    assert torch.equal(out[2], newton_schulz(inputs[2][None], dtype=torch.float32)[0])


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


@pytest.mark.parametrize("flags, faster, expected", [
    ({"avx2", "fma"}, True, torch.float32),              # x86 without bf16 instructions: emulated bf16
    ({"avx512f", "avx512_bf16"}, False, torch.bfloat16),
    ({"amx_bf16"}, False, torch.bfloat16),
    (None, True, torch.bfloat16),                        # no x86 flags to read: the timing decides
    (None, False, torch.float32)])
def test_default_ns_precision_follows_the_device(monkeypatch, flags, faster, expected):
    """ns_dtype=None: bf16 on CUDA and on a CPU with bf16 matmul, float32 elsewhere; the optimizer's
    step with the default is bitwise its step with that precision given explicitly."""
    import muonclip
    monkeypatch.setattr(muonclip, "_cpu_flags", lambda: flags)
    monkeypatch.setattr(muonclip, "_bf16_matmul_is_faster", lambda: faster)
    muonclip.default_ns_dtype.cache_clear()
    try:
        assert muonclip.default_ns_dtype("cuda") == torch.bfloat16
        assert muonclip.default_ns_dtype("cpu") == expected
        weights = []
        for ns_dtype in (None, expected):
            p = torch.randn(16, 24, generator=torch.Generator().manual_seed(0), requires_grad=True)
            p.grad = torch.randn(16, 24, generator=torch.Generator().manual_seed(1))
            MuonClip([{"params": [p], "use_muon": True}], lr=0.1, qk_clip_tau=None, ns_dtype=ns_dtype).step()
            weights.append(p.detach())
        assert torch.equal(*weights)
    finally:
        muonclip.default_ns_dtype.cache_clear()


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


def test_group_without_use_muon_is_rejected_saying_what_model_would_do():
    """Groups without use_muon need model= to be split by role; a framework that builds the
    optimizer from (class, kwargs) may have dropped it (transformers' Trainer pops "model": see
    tests/test_muonclip_hf.py), and the message says so."""
    with pytest.raises(ValueError, match="use_muon.*pass model=.*may have dropped model="):
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
    inputs, tau, weights, before, opt = _muon_clip_case(model, idx, pick)
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
    inputs, tau, weights, before, opt = _muon_clip_case(model, idx, pick)
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
    assert tau is not None
    opt = MuonClip.for_model(model, lr=0.05, weight_decay=0.1, qk_clip_tau=tau)
    twin_opt = MuonClip.for_model(twin, lr=0.05, weight_decay=0.1, qk_clip_tau=None)
    for m, o in ((model, opt), (twin, twin_opt)):
        m(idx, idx)[1].backward()
        o.step()
    assert int(opt.clip_stats["heads_clipped"]) > 0 and int(twin_opt.clip_stats["heads_clipped"]) == 0
    assert torch.equal(opt.clip_stats["max_logits"], twin_opt.clip_stats["max_logits"])  # same statistic
    assert all((m.max_logits == -math.inf).all() for m in opt.attention_modules + twin_opt.attention_modules)
    differ = {n for (n, p), q in zip(model.named_parameters(), twin.parameters()) if not torch.equal(p, q)}
    assert differ and all(".q_proj." in n or ".k_proj." in n for n in differ)


def test_after_a_real_step_each_head_logits_are_its_factor_times_the_updated_weights_logits():
    """What holds with lr > 0 (K2's Algorithm 1: S measured in the forward, the clip applied after
    the update): each layer replayed on the input its max came from has logits sqrt(gamma_h *
    smallest gamma of its key group) times those of the updated, unclipped weights (a twin run
    without the clip), so <= tau only where the update did not raise them."""
    model = _muon_model("mha", 5)
    twin = copy.deepcopy(model)
    idx = torch.randint(0, 61, (2, 8), generator=torch.Generator().manual_seed(5))
    inputs = _muon_record_attention_inputs(model, idx)
    tau = _muon_tau_between(_muon_replay_max_logits(model, inputs), 2)
    opt = MuonClip.for_model(model, lr=0.05, weight_decay=0.1, qk_clip_tau=tau, ns_dtype=torch.float32)
    twin_opt = MuonClip.for_model(twin, lr=0.05, weight_decay=0.1, qk_clip_tau=None, ns_dtype=torch.float32)
    for m, o in ((model, opt), (twin, twin_opt)):
        m(idx, idx)[1].backward()
        o.step()
    S = opt.clip_stats["max_logits"]                                       # (L, H), before the update
    gamma = qk_clip_gamma(S, tau)
    group_min = gamma.view(-1, 2, 2).amin(-1).repeat_interleave(2, -1)     # 2 query heads per key head
    updated = _muon_replay_max_logits(twin, inputs)
    after = _muon_replay_max_logits(model, inputs)
    assert (S > tau).any() and not torch.allclose(updated, S, rtol=1e-3)  # the update moved the logits
    assert torch.allclose(after, updated * (gamma * group_min).sqrt(), rtol=1e-5)
    smallest = (S > tau) & (gamma == group_min)
    assert not torch.allclose(after[smallest], torch.full_like(after[smallest], tau), rtol=1e-4)  # not exactly tau


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


def test_qk_clip_tau_none_scales_nothing_but_still_reports_and_resets_the_statistic():
    """Contract C2: with tau None, clip_stats still holds the reduced (L, H) max logits and 0 heads
    clipped, and the modules' statistic is reset, so a trainer never reduces it itself."""
    model = _muon_model("mla", 1)
    idx = torch.randint(0, 61, (2, 8), generator=torch.Generator().manual_seed(1))
    expected = _muon_forward_max_logits(model, idx)
    weights = _muon_snapshot(model)
    opt = MuonClip.for_model(model, lr=0.0, weight_decay=0.0, qk_clip_tau=None)
    model(idx, idx)[1].backward()
    opt.step()
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert torch.equal(opt.clip_stats["max_logits"], expected)
    assert opt.clip_stats["heads_clipped"].dtype == torch.long and int(opt.clip_stats["heads_clipped"]) == 0
    assert all((m.max_logits == -math.inf).all() for m in opt.attention_modules)


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


# ---------------------------------------------------------- 6. the pure Muon update and fused blocks

@pytest.mark.parametrize("ns_dtype", [torch.float32, torch.bfloat16])
def test_optimizer_step_is_muon_update_per_parameter(ns_dtype):
    """The class only batches: its parameters (a matrix, a stack, tall or wide, several sharing a
    shape) end bitwise where muon_update on the same list puts them (the same batches: same kernel,
    same inputs), over several steps of momentum; each is where muon_update on it alone puts it, and
    -lr * (0.2 sqrt(max(A, B)) NS(G + mu M) + wd W) per step, up to rounding (a batched product need
    not round as a single one; bf16 NS: up to a bf16 ulp of the update, 2^-8 * lr * 0.2 sqrt(20) * 3)."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(12, 20), (20, 12), (12, 20), (3, 8, 5), (7, 7)]
    params = [torch.randn(s, generator=gen, requires_grad=True) for s in shapes]
    together, alone = [p.detach().clone() for p in params], [p.detach().clone() for p in params]
    formula = [p.detach().clone() for p in params]
    together_bufs, bufs = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    formula_bufs = [torch.zeros_like(p) for p in params]
    ns = lambda stack: newton_schulz(stack, dtype=ns_dtype)   # noqa: E731
    lr, wd = 0.05, 0.1
    opt = MuonClip([{"params": params, "use_muon": True}], lr=lr, weight_decay=wd, qk_clip_tau=None,
                   ns_dtype=ns_dtype)
    for _ in range(3):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        muon_update(together, grads, together_bufs, lr, wd, ns=ns)
        for w, g, b in zip(alone, grads, bufs):
            muon_update([w], [g], [b], lr, wd, ns=ns)
        for i, (g, b) in enumerate(zip(grads, formula_bufs)):
            b.mul_(0.95).add_(g)
            o = newton_schulz(g + 0.95 * b, dtype=ns_dtype).float()
            formula[i] = formula[i] * (1 - lr * wd) - lr * rms_matching_scale(g.shape) * o
    tolerance = 1e-6 if ns_dtype == torch.float32 else 2 ** -8 * lr * 0.2 * 20 ** 0.5 * 3
    for p, t, w, f in zip(params, together, alone, formula):
        assert torch.equal(p.detach(), t)
        assert (p.detach() - w).abs().max() < tolerance and (p.detach() - f).abs().max() < tolerance


def _muon_fused_linear(rows, cols, sizes):
    layer = nn.Linear(cols, rows, bias=False)
    mark_fused(layer, sizes)
    return layer


def test_fused_weight_is_orthogonalised_block_by_block():
    """A (3D, D) fused QKV weight declared with mark_fused gets the update of three separate (D, D)
    weights (each block orthogonal on its own, scaled by its own shape), not the (3D, D) one; a
    fused expert gate/up (E, 2I, D) likewise per expert and per block."""
    torch.manual_seed(0)
    D, E, I = 8, 3, 5
    fused = nn.ModuleDict({"qkv": _muon_fused_linear(3 * D, D, [D] * 3)})
    experts = nn.Module()
    experts.gate_up = nn.Parameter(torch.randn(E, 2 * I, D))
    mark_fused(experts, [I, I], "gate_up")
    fused["experts"] = experts
    plain = copy.deepcopy(fused)                                # the declaration survives deepcopy
    assert fused_blocks(plain)[id(plain["qkv"].weight)].sizes == (D, D, D)
    separate = [m.detach().clone().requires_grad_() for m in fused["qkv"].weight.split(D)]
    separate += [m.detach().clone().requires_grad_() for m in experts.gate_up.split(I, 1)]
    grads = [torch.randn(3 * D, D), torch.randn(E, 2 * I, D)]
    for p, g in zip((fused["qkv"].weight, experts.gate_up), grads):
        p.grad = g.clone()
    for p, g in zip(separate, [*grads[0].split(D), *grads[1].split(I, 1)]):
        p.grad = g.clone()
    MuonClip(fused, lr=0.1, qk_clip_tau=None, ns_dtype=torch.float32).step()
    MuonClip([{"params": separate, "use_muon": True}], lr=0.1, qk_clip_tau=None, ns_dtype=torch.float32).step()
    assert torch.allclose(fused["qkv"].weight, torch.cat(separate[:3]), atol=1e-6)
    assert torch.allclose(experts.gate_up, torch.cat(separate[3:], 1), atol=1e-6)
    block_sv = torch.linalg.svdvals(newton_schulz(grads[0][:D] * 1.95, dtype=torch.float32))
    whole_sv = torch.linalg.svdvals(newton_schulz(grads[0] * 1.95, dtype=torch.float32)[:D])
    assert (block_sv - 1).abs().max() < 0.35 and (whole_sv - 1).abs().max() > 0.35   # whole: q block not orthogonal
    with pytest.raises(ValueError, match="sum to the rows"):
        mark_fused(nn.Linear(4, 6), [2, 2])


# ---------------------------------------------------------------- 7. the exact max logit

@given(batch=st.integers(1, 2), kv_heads=st.integers(1, 3), group=st.integers(1, 3), tq=st.integers(1, 9),
       extra=st.integers(0, 4), dim=st.integers(1, 6), mask=st.sampled_from(["none", "padding", "bool", "additive"]),
       causal=st.booleans(), chunk=st.sampled_from([None, 1, 3]), seed=st.integers(0, 2 ** 16))
@settings(deadline=None)
def test_causal_max_logits_equals_explicit_masked_max(batch, kv_heads, group, tq, extra, dim, mask, causal,
                                                      chunk, seed):
    gen = torch.Generator().manual_seed(seed)
    H, tk = kv_heads * group, tq + extra
    q, k = torch.randn(batch, H, tq, dim, generator=gen), torch.randn(batch, kv_heads, tk, dim, generator=gen)
    scale = 0.3
    logits = (q.double() @ k.double().repeat_interleave(group, 1).mT) * scale            # (B, H, Tq, Tk)
    visible = torch.ones(batch, H, tq, tk, dtype=torch.bool)
    if causal:
        visible &= torch.arange(tk) <= torch.arange(tq)[:, None] + extra
    given_mask = None
    if mask == "padding":
        given_mask = torch.rand(batch, tk, generator=gen) < 0.7                           # (B, Tk)
        visible &= given_mask[:, None, None, :]
    elif mask in ("bool", "additive"):
        keep = torch.rand(batch, 1, tq, tk, generator=gen) < 0.7                           # (B, 1, Tq, Tk)
        visible &= keep
        bias = torch.randn(batch, 1, tq, tk, generator=gen)
        given_mask = keep if mask == "bool" else bias.masked_fill(~keep, torch.finfo(torch.float32).min)
        if mask == "additive":
            logits = logits + bias.double()
    expected = logits.masked_fill(~visible, -math.inf).amax(dim=(0, 2, 3)).float()        # (H,)
    got = causal_max_logits(q, k, scale, causal=causal, attention_mask=given_mask, chunk_size=chunk)
    assert got.shape == (H,) and got.dtype == torch.float32
    assert torch.equal(got.isinf(), expected.isinf())
    finite = expected.isfinite()
    assert torch.allclose(got[finite], expected[finite], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- 8. no silent no-ops

def test_tau_without_attention_modules_raises_naming_the_surface_and_the_hf_helper():
    with pytest.raises(ValueError, match="num_heads, max_logits, qk_clip_.*attach_qk_clip"):
        MuonClip.for_model(nn.Sequential(nn.Linear(4, 4)), lr=0.01, weight_decay=0.0, qk_clip_tau=100.0)
    MuonClip.for_model(nn.Sequential(nn.Linear(4, 4)), lr=0.01, weight_decay=0.0, qk_clip_tau=None)


def test_attention_module_without_num_heads_fails_at_construction():
    model = _MuonLM()
    del model.layers[1].attn.num_heads
    with pytest.raises(ValueError, match="_MuonAttention needs an integer `num_heads`"):
        MuonClip.for_model(model, lr=0.01, weight_decay=0.0)


def test_use_muon_is_validated_in_add_param_group_and_groups_without_it_split_by_model():
    model = _MuonLM()
    opt = MuonClip([{"params": [model.embed.weight], "use_muon": False}], lr=0.01, qk_clip_tau=None)
    with pytest.raises(ValueError, match="use_muon"):
        opt.add_param_group({"params": [model.lm_head.weight]})
    with pytest.raises(ValueError, match="stacks of matrices.*\\(2, 3, 3, 3\\)"):
        opt.add_param_group({"params": [torch.zeros(2, 3, 3, 3, requires_grad=True)], "use_muon": True})
    # Trainer's weight-decay groups: no use_muon; model= splits each by role, keeping its options
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = MuonClip([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                   lr=0.01, model=model)
    muon, _ = split_params(model)
    assert [(g["use_muon"], g["weight_decay"]) for g in opt.param_groups] == [(True, 0.1), (False, 0.1), (False, 0.0)]
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in muon}
    assert len(opt.attention_modules) == len(model.layers)


def test_non_fp32_parameters_warn():
    with pytest.warns(UserWarning, match="bfloat16.*fp32 master"):
        MuonClip.for_model(_MuonLM().to(torch.bfloat16), lr=0.01, weight_decay=0.1)


def test_head_is_found_by_structure_and_conv_kernels_go_to_adamw():
    """Only the model's own output head is a table: a hidden layer named `head` or `output` deep in
    the model is a matrix for Muon; a conv kernel is neither a matrix nor a stack: AdamW."""
    model = nn.Module()
    model.embed = nn.Embedding(10, 8)
    model.conv = nn.Conv1d(8, 8, 3)
    model.block = nn.ModuleDict({"head": nn.Linear(8, 8), "output": nn.Linear(8, 8)})
    model.output = nn.Linear(8, 10)
    muon, adamw = (set(map(id, ps)) for ps in split_params(model))
    assert muon == {id(model.block.head.weight), id(model.block.output.weight)}
    assert {id(model.output.weight), id(model.conv.weight), id(model.embed.weight)} <= adamw


def test_fused_weight_of_unknown_layout_warns_with_the_line_that_declares_it():
    """for_model declares the fused weights whose layout it can read (nn.MultiheadAttention's
    in_proj_weight) and, for one only named as fused, warns with a mark_fused line; that line,
    run as printed, declares it, and the warning stops."""
    import warnings
    model = nn.Module()
    model.mha = nn.MultiheadAttention(8, 2)
    model.block = nn.Module()
    model.block.qkv = nn.Linear(8, 24)
    with pytest.warns(UserWarning, match=r"block\.qkv\.weight \(24, 8\) is named as fused") as caught:
        MuonClip.for_model(model, lr=0.01, weight_decay=0.0, qk_clip_tau=None)
    assert fused_blocks(model)[id(model.mha.in_proj_weight)].sizes == (8, 8, 8)
    line = re.search(r"muonclip\.mark_fused\(.*?, 'weight'\)", str(caught[0].message)).group(0)
    assert line == "muonclip.mark_fused(model.get_submodule('block.qkv'), [8, 8, 8], 'weight')"
    exec(line, {"muonclip": sys.modules["muonclip"], "model": model})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MuonClip.for_model(model, lr=0.01, weight_decay=0.0, qk_clip_tau=None)
    assert fused_blocks(model)[id(model.block.qkv.weight)].sizes == (8, 8, 8)


def test_fused_layout_along_the_wrong_dimension_names_the_fix():
    """GPT-2's c_attn weight is (D, 3D) (Conv1D, y = x @ W): row blocks of it are refused, at the
    declaration and at the clip, naming the column layout; the column layout is accepted."""
    conv = nn.Module()
    conv.weight = nn.Parameter(torch.zeros(8, 24))
    with pytest.raises(ValueError, match=r"mark_fused: blocks \[8, 8, 8\] must sum to the rows of weight "
                                         r"\(8, 24\) \(they sum to its columns: ColumnBlocks"):
        mark_fused(conv, [8] * 3)
    with pytest.raises(ValueError, match=r"qk_clip_fused_mha_: .* \(they sum to its columns"):
        sys.modules["muonclip"].qk_clip_fused_mha_(conv.weight, torch.ones(2), 2, [8] * 3)
    assert type(mark_fused(conv, [8] * 3, columns=True)).__name__ == "ColumnBlocks"


class _MuonGivenQK(nn.Module):
    """An attention module with the QK-Clip surface whose forward records the statistic of q and k
    given as they are, and whose clip rule scales them (the weights are q and k themselves)."""

    def __init__(self, q, k):
        super().__init__()
        self.num_heads, self.q, self.k = 1, nn.Parameter(q), nn.Parameter(k)
        self.register_buffer("max_logits", torch.full((1,), -math.inf), persistent=False)

    def forward(self):
        record_max_logits_(self, self.q[None, None, None], self.k[None, None, None], 1.0)   # (1, 1, 1, 4)
        return (self.q * self.k).sum()

    def qk_clip_(self, gamma):
        qk_clip_mha_(self.q.data, self.k.data, gamma, 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_statistic_under_cpu_autocast_clips_a_logit_just_above_tau(dtype):
    """q.k = 1 + 1 + 1 + 0.0021 (exact in bf16 and fp16 inputs) = 3.0021: under the caller's bf16
    autocast a matmul would round it to 3.0 and the head would not be clipped at tau 3.0; the
    statistic is float32 from the q and k the kernel uses, so it is 3.0021 and the head is clipped."""
    q = torch.tensor([1.0, 1.0, 1.0, 0.0021]).to(dtype).float()
    module = _MuonGivenQK(q, torch.ones(4))
    expected = float((q.double() * 1.0).sum())
    opt = MuonClip([{"params": list(module.parameters()), "use_muon": False}], lr=0.0, weight_decay=0.0,
                   qk_clip_tau=3.0, attention_modules=[module])
    with torch.autocast("cpu", dtype=dtype):
        if dtype == torch.bfloat16:                                  # what a matmul under autocast gives
            assert float(q[None] @ torch.ones(4, 1)) == 3.0
        module().backward()
    opt.step()
    assert abs(float(opt.clip_stats["max_logits"][0, 0]) - expected) < 1e-6 and expected > 3.002
    assert int(opt.clip_stats["heads_clipped"]) == 1


def test_a_2d_expert_stack_warns_with_the_line_that_declares_it_per_expert():
    """DBRX stores E experts' (I, D) matrices as one (E*I, D) parameter: MuonClip warns (the count
    E taken from the model's config) with a mark_fused line; run as printed, it makes each expert's
    update its own, as E separate matrices (each with its own RMS scale)."""
    import warnings
    torch.manual_seed(0)
    model = nn.Module()
    model.config = types.SimpleNamespace(num_local_experts=4)
    model.experts = nn.Module()
    model.experts.w1 = nn.Parameter(torch.randn(4 * 6, 8))
    with pytest.warns(UserWarning, match=r"experts\.w1 \(24, 8\) is named as a 2-D stack of experts") as caught:
        MuonClip.for_model(model, lr=0.1, weight_decay=0.0, qk_clip_tau=None)
    line = re.search(r"muonclip\.mark_fused\(.*?, 'w1'\)", str(caught[0].message)).group(0)
    assert line == "muonclip.mark_fused(model.get_submodule('experts'), [6] * 4, 'w1')"
    exec(line, {"muonclip": sys.modules["muonclip"], "model": model})
    separate = [m.detach().clone().requires_grad_() for m in model.experts.w1.split(6)]
    grad = torch.randn(24, 8)
    model.experts.w1.grad = grad.clone()
    for p, g in zip(separate, grad.split(6)):
        p.grad = g.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MuonClip.for_model(model, lr=0.1, weight_decay=0.0, qk_clip_tau=None, ns_dtype=torch.float32).step()
    MuonClip([{"params": separate, "use_muon": True}], lr=0.1, weight_decay=0.0, qk_clip_tau=None,
             ns_dtype=torch.float32).step()
    assert torch.allclose(model.experts.w1, torch.cat(separate), atol=1e-6)


def test_import_muonclip_needs_only_torch():
    """transformers blocked: import muonclip and a MuonClip step still work; the HF helper alone fails."""
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import torch, muonclip\n"
            "m = torch.nn.Linear(4, 4); m.weight.grad = torch.ones(4, 4)\n"
            "muonclip.MuonClip.for_model(m, lr=0.1, weight_decay=0.0, qk_clip_tau=None).step()\n"
            "try:\n    muonclip.attach_qk_clip(m)\nexcept ImportError:\n    print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=_HERE, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# ---------------------------------------------------------- 9. README recipes and nanoGPT-style

def _muon_readme_recipes():
    """The python blocks of the README section "MuonClip in your model", in order."""
    with open(os.path.join(_HERE, "docs", "muonclip.md")) as f:
        section = f.read().split("## MuonClip in your model", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def _muon_run_recipe(index):
    namespace = {"__name__": f"readme_recipe_{index + 1}"}
    exec(compile(_muon_readme_recipes()[index], f"README.md recipe {index + 1}", "exec"), namespace)
    return namespace


@pytest.mark.parametrize("index", [0, 1])
def test_readme_muonclip_recipes_run(index):
    """docs/muonclip.md's recipes 1 and 2 (torch only; 3 and 4, with transformers, run in
    tests/test_muonclip_hf.py), as printed: every layer's statistic is fed."""
    assert len(_muon_readme_recipes()) == 4
    opt = _muon_run_recipe(index)["opt"]
    assert len(opt.attention_modules) == 2 and opt.clip_stats["max_logits"].shape == (2, 4)
    assert opt.clip_stats["max_logits"].isfinite().all()


@pytest.fixture(scope="module")
def _muon_nanogpt():
    return _muon_run_recipe(1)["GPT"]


def _muon_clipped_training(model, steps, batches, tau, lr=0.02):
    """steps of MuonClip (fp32 NS) at tau; returns the heads clipped per step."""
    opt = MuonClip.for_model(model, lr=lr, weight_decay=0.1, qk_clip_tau=tau, ns_dtype=torch.float32)
    clipped = []
    for step in range(steps):
        x = batches[step % len(batches)]
        model(x, x)[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        clipped.append(int(opt.clip_stats["heads_clipped"]))
    return clipped


def test_nanogpt_style_fused_model_trains_with_clip_and_post_clip_logits_never_exceed_tau(_muon_nanogpt):
    torch.manual_seed(0)
    model = _muon_nanogpt()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 64, (4, 16), generator=gen) for _ in range(4)]
    tau = float(_muon_forward_max_logits(model, batches[0]).median())
    assert sum(_muon_clipped_training(model, 20, batches, tau)) > 0
    inputs = _muon_record_attention_inputs(model, batches[1])
    before = _muon_replay_max_logits(model, inputs)
    tau = float(before.median())
    weights = _muon_snapshot(model)
    _, opt = _muon_clip_only_step(model, batches[1], tau)
    after = _muon_replay_max_logits(model, inputs)
    clipped = before > tau
    assert clipped.any() and (after <= tau * (1 + 1e-5)).all()
    assert torch.allclose(after[clipped], torch.full_like(after[clipped], tau), rtol=1e-5)   # MHA: exactly tau
    assert torch.equal(after[~clipped], before[~clipped])
    for name, p in model.named_parameters():               # only the q and k blocks of c_attn move
        if "c_attn" in name:                                # weight (3D, D) or bias (3D,): rows [q | k | v]
            v_rows = slice(2 * p.shape[0] // 3, None)
            assert torch.equal(p[v_rows], weights[name][v_rows]), name
            assert not torch.equal(p, weights[name]), name
        else:
            assert torch.equal(p, weights[name]), name


# ==================================================================================================
# data.py: corpus, tokenizer, sampler, rephrasing
#
# Tests of data.py: the offline corpus, the byte tokenizer, the document split, the exact sampler,
# and K2's chunk-wise rephrasing against a real chat-completions server on 127.0.0.1 (bench.py's
# fake server), its deadlines, its output lock and the files it must not touch.
# ==================================================================================================

_DATA_PY = Path(data.__file__)


# -----------------------------------------------------------------------------------------------
# Corpus, tokenizer, preparation


@pytest.fixture(scope="module")
def _data_default_corpus(tmp_path_factory):
    cache = tmp_path_factory.mktemp("data_cache")
    real_connect = socket.socket.connect

    def offline(*args):
        raise AssertionError("prepare() tried to use the network")

    socket.socket.connect = offline  # the default corpus must build with no network at all
    try:
        return cache, data.prepare(cache)
    finally:
        socket.socket.connect = real_connect


def test_default_corpus_builds_offline_with_three_nontrivial_domains(_data_default_corpus):
    cache, info = _data_default_corpus
    assert set(info["stats"]) == {"code", "knowledge", "math"}
    for domain, s in info["stats"].items():
        assert s["bytes"] > 500_000, domain
        assert s["train_docs"] > 10 and s["val_docs"] >= 1, domain
    train, val = data.load_tokens(info, "train"), data.load_tokens(info, "val")
    assert len(train) == info["tokens"]["train"] and len(val) == info["tokens"]["val"]
    assert train.dtype == np.uint8 and info["eos"] == 0 and info["vocab_size"] == 256
    docs = sum(s["train_docs"] + s["val_docs"] for s in info["stats"].values())
    assert int((np.asarray(train) == 0).sum() + (np.asarray(val) == 0).sum()) == docs  # one eos each
    assert data.describe_load_report(info) == ""  # nothing skipped: train.py logs no line


def test_stats_command_prints_every_domain_and_reuses_the_cache(_data_default_corpus, capsys):
    cache, info = _data_default_corpus
    assert data.main(["stats", "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    for domain in ("code", "knowledge", "math"):
        assert re.search(rf"^{domain}\s+[\d,]+\s+[\d,]+\s+[\d,]+\s+[\d,]+", out, re.M), out
    assert "unigram entropy" in out and "(reused)" in out and info["key"] in out


@given(st.text())
def test_byte_tokenizer_round_trips_any_unicode(text):
    tok = data.ByteTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def _data_write_docs(folder: Path, texts):
    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(texts):
        (folder / f"doc{i:03d}.txt").write_text(text, encoding="utf-8")


@given(st.lists(st.integers(1, 300), min_size=2, max_size=40), st.floats(0.05, 0.6),
       st.integers(0, 2**16), st.integers(1, 16), st.integers(1, 4))
@settings(deadline=None)
def test_validation_documents_never_appear_in_training_batches(lengths, val_fraction, seed, seq_len, batch):
    # Document i is written in its own two-letter alphabet, so every byte names its document.
    rng = random.Random(seed)
    alphabets = [(chr(33 + 2 * i), chr(34 + 2 * i)) for i in range(len(lengths))]
    texts = ["".join(rng.choice(a) for _ in range(n)) for a, n in zip(alphabets, lengths)]
    with tempfile.TemporaryDirectory() as tmp:
        _data_write_docs(Path(tmp, "docs"), texts)
        info = data.prepare(Path(tmp, "cache"), [str(Path(tmp, "docs"))], val_fraction=val_fraction, seed=seed)
        train, val = data.load_tokens(info, "train"), data.load_tokens(info, "val")
        val_bytes = set(np.asarray(val).tolist()) - {0}
        train_bytes = set(np.asarray(train).tolist()) - {0}
        assert not val_bytes & train_bytes
        assert val_bytes, "two or more documents: at least one goes to validation"
        for a in alphabets:  # by document: each document is wholly on one side
            assert {ord(c) for c in a} & train_bytes.union(val_bytes)
            assert not ({ord(a[0]), ord(a[1])} & train_bytes and {ord(a[0]), ord(a[1])} & val_bytes)
        if len(train) > seq_len:
            sampler = data.BatchSampler(train, batch, seq_len, seed)
            for _ in range(sampler.windows // batch + 2):  # more than an epoch
                x, y = sampler.next()
                assert not set(torch.cat([x, y]).flatten().tolist()) & val_bytes


def test_domain_weights_set_the_training_mixture(tmp_path):
    _data_write_docs(tmp_path / "a", [f"alpha document {i} " * 20 for i in range(30)])
    _data_write_docs(tmp_path / "b", [f"beta document {i} " * 20 for i in range(30)])
    sources = [f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}"]
    info = data.prepare(tmp_path / "cache", sources, weights={"a": 3, "b": 1}, val_fraction=0.1)
    a, b = info["stats"]["a"], info["stats"]["b"]
    assert a["train_tokens"] / b["train_tokens"] == pytest.approx(3, rel=0.1)
    assert a["epochs"] > 1 > b["epochs"]  # up-weighted domain repeats, down-weighted is cut
    assert a["val_docs"] == b["val_docs"] == 3  # validation keeps the natural corpus
    dropped = data.prepare(tmp_path / "cache", sources, weights={"a": 1, "b": 0}, val_fraction=0.1)
    assert dropped["stats"]["b"]["train_tokens"] == 0 and dropped["stats"]["a"]["epochs"] > 1
    with pytest.raises(ValueError, match="'b'"):
        data.prepare(tmp_path / "cache", sources, weights={"a": 1})


def test_cache_is_reused_and_rebuilt_only_when_inputs_change(tmp_path):
    _data_write_docs(tmp_path / "docs", [f"text number {i}\n" * 5 for i in range(10)])
    src = [str(tmp_path / "docs")]
    first = data.prepare(tmp_path / "cache", src)
    again = data.prepare(tmp_path / "cache", src)
    assert not first["cached"] and again["cached"] and again["key"] == first["key"]
    changed_settings = data.prepare(tmp_path / "cache", src, val_fraction=0.3)
    assert not changed_settings["cached"] and changed_settings["key"] != first["key"]
    (tmp_path / "docs" / "doc003.txt").write_text("new content, different size\n")
    changed_input = data.prepare(tmp_path / "cache", src)
    assert not changed_input["cached"] and changed_input["key"] not in (first["key"], changed_settings["key"])
    assert not list((tmp_path / "cache").glob("tmp-*"))  # built aside, renamed into place


def test_empty_non_utf8_enormous_and_bad_json_inputs_are_counted_not_fatal(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "empty.txt").write_bytes(b"")
    (d / "blank.md").write_text("  \n\n ")
    (d / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me br\u00fbl\u00e9e".encode("latin-1"))
    rng = random.Random(0)
    huge_line = " ".join(map(str, range(350_000)))  # one 2.3 MB line
    (d / "huge.txt").write_text(huge_line)
    (d / "nospace.py").write_text("".join(rng.choices("xyz", k=250_000)))
    lines = [json.dumps({"text": "a good record"}), "{not json", json.dumps({"title": "no text"}),
             "", json.dumps({"text": "".join(rng.choices("abc", k=300_000))}), json.dumps({"text": ""})]
    (d / "records.jsonl").write_bytes("\n".join(lines).encode() + b"\n" + b'{"text": "bad \xff byte"}\n')
    info = data.prepare(tmp_path / "cache", [str(d)], max_doc_chars=100_000)
    report = info["load_report"]
    assert report["files"] == 6
    assert report["empty_documents"] == 3  # empty.txt, blank.md, the jsonl record with ""
    assert report["non_utf8_files"] == 1
    assert report["bad_json_lines"] == 3  # "{not json", no "text", the non-UTF-8 line
    assert report["split_documents"] == 3  # huge.txt, nospace.py, the 300 kB record
    assert report["duplicate_documents"] == 0
    assert any("records.jsonl:2:" in p for p in report["problems"])
    assert any("records.jsonl:7:" in p for p in report["problems"])
    tokens = np.concatenate([data.load_tokens(info, "train"), data.load_tokens(info, "val")])
    n_docs = report["documents"]
    expected = len(huge_line) + 250_000 + 300_000 + len("a good record") + len("caf\ufffd cr\ufffdme br\ufffdl\ufffde".encode())
    assert len(tokens) == expected + n_docs  # every byte kept, one eos per document
    assert "caf\ufffd" in data.ByteTokenizer().decode(tokens.tolist())


@given(st.text(st.sampled_from("ab .!?\n\t")) | st.text(), st.integers(1, 200))
def test_split_chunks_is_lossless_and_bounded(text, max_chars):
    chunks = data.split_chunks(text, max_chars)
    assert "".join(chunks) == text
    assert all(0 < len(c) <= max_chars for c in chunks)


def test_split_chunks_cuts_at_paragraphs_then_sentences():
    paragraphs = [f"Paragraph {i} has one sentence. And a second one." for i in range(6)]
    chunks = data.split_chunks("\n\n".join(paragraphs), 120)
    assert all(c.endswith("\n\n") for c in chunks[:-1])
    long_paragraph = " ".join(f"Sentence {i} is here." for i in range(30))
    assert all(c.endswith(". ") for c in data.split_chunks(long_paragraph, 100)[:-1])


def test_math_problems_are_reproducible_and_their_answers_are_right():
    docs = data.math_documents(400, seed=1)
    assert [d.text for d in docs] == [d.text for d in data.math_documents(400, seed=1)]
    assert [d.text for d in docs] != [d.text for d in data.math_documents(400, seed=2)]
    checked = 0
    for doc in docs:
        answer = doc.text.rsplit("Answer: ", 1)[1]
        if m := re.match(r"Problem: Compute ([\d+\-*/() ]+?)( and simplify)?\.\n", doc.text):
            assert Fraction(eval(m[1])).limit_denominator(10**6) == Fraction(answer)
        elif m := re.match(r"Problem: Solve (.+) = (-?\d+) for x\.", doc.text):
            x = int(answer.removeprefix("x = "))
            assert eval(re.sub(r"(\d)x", r"\1*x", m[1]), {"x": x}) == int(m[2])
        elif m := re.match(r"Problem: Solve (.+x\^2.*) = 0\.", doc.text):
            for root in re.findall(r"x = (-?\d+)", answer):
                assert eval(re.sub(r"(\d)x", r"\1*x", m[1].replace("^", "**")), {"x": int(root)}) == 0
        else:
            continue
        checked += 1
    assert checked > 100


# -----------------------------------------------------------------------------------------------
# Sampler and entropy


@given(st.integers(20, 400), st.integers(1, 4), st.integers(1, 9), st.integers(0, 1000),
       st.integers(0, 12), st.integers(1, 12))
def test_restored_sampler_yields_the_batches_of_one_that_never_stopped(n, batch, seq_len, seed, stop, more):
    tokens = np.random.default_rng(seed).integers(0, 256, n).astype(np.uint8)
    never_stopped = data.BatchSampler(tokens, batch, seq_len, seed)
    expected = [never_stopped.next() for _ in range(stop + more)][stop:]
    first = data.BatchSampler(tokens, batch, seq_len, seed)
    for _ in range(stop):
        first.next()
    state = json.loads(json.dumps(first.state_dict()))  # as it would travel through a checkpoint
    resumed = data.BatchSampler(tokens, batch, seq_len, seed)
    resumed.load_state_dict(state)
    for x_expected, y_expected in expected:
        x, y = resumed.next()
        assert torch.equal(x, x_expected) and torch.equal(y, y_expected)


def test_sampler_targets_are_inputs_shifted_and_each_window_is_used_once_per_epoch():
    tokens = np.arange(1000, dtype=np.int64)  # token value == position
    sampler = data.BatchSampler(tokens, 4, 16, seed=3)
    x, y = sampler.next()
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)
    starts = x[:, 0].tolist()
    while len(starts) < sampler.windows:
        starts += sampler.next()[0][:, 0].tolist()
    epoch = starts[:sampler.windows]
    assert len(set(epoch)) == len(epoch)  # no window twice in an epoch
    assert len({s % 16 for s in epoch}) == 1  # one shift per epoch: windows tile the stream
    with pytest.raises(ValueError, match="seq_len"):
        sampler.load_state_dict({**sampler.state_dict(), "seq_len": 8})


@pytest.mark.parametrize("world_size", [2, 4])
def test_global_batch_does_not_depend_on_the_number_of_processes(world_size):
    tokens = np.random.default_rng(0).integers(0, 256, 5000).astype(np.uint8)
    single = data.BatchSampler(tokens, 8, 32, seed=7)
    ranks = [data.BatchSampler(tokens, 8, 32, seed=7, rank=r, world_size=world_size) for r in range(world_size)]
    for _ in range(5):
        x, y = single.next()
        parts = [s.next() for s in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts])) and torch.equal(y, torch.cat([p[1] for p in parts]))


def test_unigram_entropy_is_in_nats_per_token():
    assert data.unigram_entropy(np.arange(256, dtype=np.uint8).repeat(3)) == pytest.approx(np.log(256))
    assert data.unigram_entropy(np.full(100, 7, np.uint8)) == 0.0
    tokens = np.random.default_rng(0).integers(0, 50, 10_000)
    p = np.bincount(tokens) / len(tokens)
    assert data.unigram_entropy(tokens, chunk=777) == pytest.approx(-(p[p > 0] * np.log(p[p > 0])).sum())


# -----------------------------------------------------------------------------------------------
# Rephrasing: fidelity, styles, and a real HTTP server


def test_fidelity_scores_drift_and_missing_numbers():
    source = "The Eiffel Tower is 330 metres tall and was finished in 1889 in Paris."
    assert data.fidelity(source, source)["similarity"] == pytest.approx(1.0)
    faithful = data.fidelity(source, "Finished in 1889, the Eiffel Tower in Paris is 330 metres tall.")
    unrelated = data.fidelity(source, "Bananas are yellow and rich in potassium.")
    assert faithful["similarity"] > data.MIN_SIMILARITY["lexical"] > unrelated["similarity"]
    assert faithful["numbers_kept"] == 1.0
    assert data.fidelity(source, "The Eiffel Tower in Paris is 330 metres tall.")["missing_numbers"] == ["1889"]
    same_vector = data.EmbeddingFidelity(lambda texts: [[1.0, 0.0]] * len(texts))
    assert data.fidelity("a", "b", same_vector)["similarity"] == pytest.approx(1.0)


def test_styles_cover_k2_perspectives_maths_notes_and_translation():
    assert len(data.GENERAL_STYLES) >= 6 and {"learning_note", "translate_en"} <= set(data.STYLES)
    maths = data.Document("math", "m", "Solve 2x + 1 = 5.")
    assert data.styles_for(maths, 3)[0] == "learning_note" and len(set(data.styles_for(maths, 3))) == 3
    russian = data.Document("math", "r", "Решите уравнение 2x + 1 = 5.")
    assert data.styles_for(russian, 2) == ["translate_en", "learning_note"]
    names = [data.styles_for(data.Document("user", f"d{i}", "text"), 1)[0] for i in range(60)]
    assert set(names) == set(data.GENERAL_STYLES)  # spread over the corpus


@pytest.fixture(scope="module")
def _data_server():
    with bench.FakeChatServer() as server:  # the rephrasing bench's server, scripted per model name
        yield server


def _data_endpoint(server, model, **kw):
    return data.ChatEndpoint(server.url, model, **{"timeout": 2.0, "retries": 2, "backoff": 0.01, **kw})


def _data_requests(server, model):
    return [r for r in server.requests if r["model"] == model]


def test_chunks_keep_their_order_and_each_prompt_carries_the_rewrite_so_far(_data_server):
    paragraphs = [f"Paragraph {i} says that {i} squared is {i * i}." for i in range(5)]
    result = data.rephrase_chunkwise("\n\n".join(paragraphs), "textbook",
                                     _data_endpoint(_data_server, "order"), max_chunk_chars=60)
    assert result.text == "\n\n".join("In other words: " + p for p in paragraphs)
    assert [c["status"] for c in result.chunks] == ["ok"] * 5
    prompts = [r["messages"][-1]["content"] for r in _data_requests(_data_server, "order")]
    assert [bench.source_of(r["messages"]) for r in _data_requests(_data_server, "order")] == paragraphs
    assert "<rewritten>" not in prompts[0]
    for k in range(1, 5):  # autoregressive: everything rewritten so far is in the next prompt
        context = re.search(r"<rewritten>\n(.*)\n</rewritten>", prompts[k], re.S)[1]
        assert context.strip() == "\n\n".join("In other words: " + p for p in paragraphs[:k])


def test_failed_fidelity_check_is_retried_with_feedback_then_kept_or_dropped(_data_server):
    doc = "The bridge opened in 1932.\n\nIt is 1149 metres long."
    _data_server.scripts["retry"] = ["echo", "garbage"]  # first chunk fine, second drifts once
    result = data.rephrase_chunkwise(doc, "encyclopedia", _data_endpoint(_data_server, "retry"), max_chunk_chars=30)
    assert [c["attempts"] for c in result.chunks] == [1, 2]
    assert [c["status"] for c in result.chunks] == ["ok", "ok"]
    retry_prompt = _data_requests(_data_server, "retry")[-1]["messages"][-1]["content"]
    assert "drifted" in retry_prompt and "missing numbers 1149" in retry_prompt
    for policy, expected in (("keep", "It is 1149 metres long."), ("drop", "")):
        model = f"drift-{policy}"
        _data_server.scripts[model] = ["echo"] + ["garbage"] * 3
        result = data.rephrase_chunkwise(doc, "qa", _data_endpoint(_data_server, model),
                                         max_chunk_chars=30, retries=2, on_fail=policy)
        assert result.chunks[1]["attempts"] == 3
        assert result.chunks[1]["status"] == {"keep": "kept_original", "drop": "dropped"}[policy]
        assert result.chunks[1]["similarity"] < data.MIN_SIMILARITY["lexical"]  # the score is recorded
        assert result.text == ("In other words: The bridge opened in 1932.\n\n" + expected).strip()


@pytest.mark.parametrize("failure, message", [("500", "HTTP 500: .*scripted 500"), ("429", "HTTP 429"),
                                              ("hang", "timed out"), ("badjson", "malformed"),
                                              ("drop", "RemoteDisconnected")])
def test_server_errors_are_retried_then_reported(_data_server, failure, message):
    timeout = 0.5 if failure == "hang" else 2.0
    _data_server.scripts[f"flaky-{failure}"] = [failure, failure]
    messages = data.rephrase_messages("One sentence.", "qa")
    reply = _data_endpoint(_data_server, f"flaky-{failure}", timeout=timeout)(messages)
    assert reply == "In other words: One sentence."
    assert len(_data_requests(_data_server, f"flaky-{failure}")) == 3
    _data_server.scripts[f"down-{failure}"] = [failure] * 3
    with pytest.raises(data.GenerationError, match=f"after 3 attempts.*{message}"):
        _data_endpoint(_data_server, f"down-{failure}", timeout=timeout)(messages)


def test_other_client_errors_fail_at_once_with_status_and_body(_data_server):
    _data_server.scripts["bad-request"] = ["400"]
    with pytest.raises(data.GenerationError, match="HTTP 400: .*scripted 400"):
        _data_endpoint(_data_server, "bad-request")(data.rephrase_messages("x", "qa"))
    assert len(_data_requests(_data_server, "bad-request")) == 1


@pytest.mark.parametrize("concurrency, delay", [(1, 0.05), (4, 0.25)])
def test_killed_rephrase_run_resumes_with_each_document_and_style_exactly_once(_data_server, tmp_path,
                                                                                concurrency, delay):
    texts = [f"Document {i} opens here. It has 2 sentences.\n\nAnd a second paragraph, number {i}." for i in range(6)]
    _data_write_docs(tmp_path / "docs", texts)
    out = tmp_path / "out.jsonl"
    model = f"slow-{concurrency}"
    _data_server.delay[model] = delay
    command = [sys.executable, str(_DATA_PY), "rephrase", str(tmp_path / "docs"), "--endpoint", _data_server.url,
               "--model", model, "--styles", "2", "--out", str(out), "--max-chunk-chars", "50",
               "--timeout", "5", "--backoff", "0.01", "--concurrency", str(concurrency)]
    run = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while (not out.exists() or out.read_bytes().count(b"\n") < 2) and time.time() < deadline:
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)
    run.wait()
    records_at_kill = out.read_bytes().count(b"\n")
    assert 2 <= records_at_kill < 12, "the kill must land mid-run"
    with open(out, "ab") as f:
        f.write(b'{"id": "half a rec')  # what a kill in the middle of a write leaves
    finished = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    assert "ETA" in finished.stderr and "chunks" in finished.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    keys = [(r["id"], r["style"]) for r in records]
    assert len(keys) == len(set(keys)) == 12
    assert {k[0] for k in keys} == {str(tmp_path / "docs" / f"doc{i:03d}.txt") for i in range(6)}
    assert all(r["text"].startswith("In other words:") and r["similarity_min"] > 0 for r in records)
    assert _data_server.max_inflight[model] == concurrency  # the pairs really were concurrent
    assert re.search(rf"pairs {12 - records_at_kill}/{12 - records_at_kill}, documents 6/6", finished.stderr)


def test_checkpoint_backend_prompts_kimik2_generate_and_stops_at_eos(monkeypatch):
    seen = {}

    class FakeModel:
        config = types.SimpleNamespace(max_position_embeddings=64)

        def to(self, device):
            return self

        def eval(self):
            return self

        def generate(self, input_ids, max_new_tokens, temperature=1.0, top_k=None):
            seen["prompt"] = data.ByteTokenizer().decode(input_ids[0].tolist())
            reply = torch.tensor([list(b"rewritten") + [0] + list(b"junk")])
            return torch.cat([input_ids, reply], dim=1)

    fake = types.SimpleNamespace(KimiK2=types.SimpleNamespace(from_pretrained=lambda path: FakeModel()))
    monkeypatch.setitem(sys.modules, "kimik2", fake)
    generate = data.CheckpointGenerator("some/dir", max_new_tokens=16)
    assert generate(data.rephrase_messages("A source chunk.", "qa")) == "rewritten"
    assert len(seen["prompt"]) == 64 - 16 and seen["prompt"].endswith("</source>\n\nassistant: ")


def test_checkpoint_backend_replies_with_kimik2s_greedy_continuation(tmp_path):
    torch.manual_seed(0)
    config = Config(**{**Config.from_preset("tiny").to_dict(), "num_hidden_layers": 2, "n_routed_experts": 4,
                       "num_experts_per_tok": 2})
    KimiK2(config).save_pretrained(str(tmp_path))
    messages = data.rephrase_messages("Hi.", "qa")
    reply = data.CheckpointGenerator(str(tmp_path), max_new_tokens=8, temperature=0)(messages)
    # The reference: the same prompt, greedy by full forwards without a cache, cut at eos, decoded.
    model = KimiK2.from_pretrained(str(tmp_path)).eval()
    tokenizer = data.ByteTokenizer()
    ids = tokenizer.encode("".join(f"{m['role']}: {m['content']}\n\n" for m in messages) + "assistant: ")
    new = []
    with torch.no_grad():
        for _ in range(8):
            new.append(int(model(torch.tensor([ids + new]))[0][0, -1].argmax()))
    expected = tokenizer.decode(new[:new.index(tokenizer.eos)] if tokenizer.eos in new else new)
    assert reply == expected


def _data_pairs(texts, domain="user"):
    return [(data.Document(domain, f"doc{i}", text), "qa") for i, text in enumerate(texts)]


def _data_records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_shards_partition_the_pairs_of_a_single_run(_data_server, tmp_path):
    _data_write_docs(tmp_path / "docs", [f"Fact {i}: the answer is {i * 7}." for i in range(9)])
    common = ["rephrase", str(tmp_path / "docs"), "--endpoint", _data_server.url, "--model", "shards",
              "--styles", "2", "--concurrency", "2", "--backoff", "0.01"]
    assert data.main(common + ["--out", str(tmp_path / "all.jsonl")]) == 0
    single = {(r["id"], r["style"]): r["text"] for r in _data_records(tmp_path / "all.jsonl")}
    shards = []
    for i in range(3):
        assert data.main(common + ["--shard", f"{i}/3", "--out", str(tmp_path / f"shard{i}.jsonl")]) == 0
        shards.append({(r["id"], r["style"]): r["text"] for r in _data_records(tmp_path / f"shard{i}.jsonl")})
    assert len(single) == 18 and all(shards)
    assert sum(len(s) for s in shards) == len(single)  # no overlap
    assert {k: v for s in shards for k, v in s.items()} == single  # no gap, same records


def test_retry_after_from_one_request_pauses_every_worker(_data_server, tmp_path):
    _data_server.scripts["pause"] = ["429-wait"]  # the first request is told to come back in 1 s
    _data_server.delay["pause"] = 0.02
    texts = [f"Short document {i}.\n\nIts second paragraph." for i in range(8)]
    generate = _data_endpoint(_data_server, "pause", backoff=0.01)
    summary = data.rephrase_corpus(_data_pairs(texts), generate, tmp_path / "out.jsonl", concurrency=4,
                                   log=lambda line: None, max_chunk_chars=30)
    assert summary["records"] == 8 and summary["ok"] == 16 and summary["error"] is None
    times = [t for model, t in _data_server.arrivals if model == "pause"]
    refused = times[0]
    # Requests already on the wire finish; after that nobody sends until Retry-After has passed
    # (a per-worker backoff of 0.01 s would send dozens in this window).
    assert not [t for t in times if refused + 0.3 < t < refused + 0.95]
    assert _data_server.max_inflight["pause"] > 1


def test_progress_eta_counts_wall_time_of_concurrent_pairs():
    pairs = _data_pairs(["x" * 100] * 8)
    now = [0.0]
    progress = data._Progress(pairs, pairs, clock=lambda: now[0])
    now[0] = 1.0  # four pairs in flight together finish after one second
    lines = [progress.done(doc, 2) for doc, _ in pairs[:4]]
    assert "pairs 4/8, documents 4/8, chunks 8 | 8.00 chunks/s | ETA 00:00:01" in lines[-1]


def test_embedding_fidelity_retries_its_endpoint_and_drives_retry_and_policy(_data_server):
    doc = "The bridge opened in 1932.\n\nIt is 1149 metres long."
    _data_server.scripts["emb"] = ["500", "badjson", "short"]  # three bad replies, then good ones
    measure = data.EmbeddingFidelity(data.EmbeddingEndpoint(_data_server.url, "emb", timeout=2.0, retries=3,
                                                             backoff=0.01))
    result = data.rephrase_chunkwise(doc, "qa", _data_endpoint(_data_server, "emb-chat"), max_chunk_chars=30,
                                     measure=measure)
    assert [c["status"] for c in result.chunks] == ["ok", "ok"]
    assert all(c["measure"] == "embedding" and c["similarity"] == pytest.approx(1.0) for c in result.chunks)
    assert len(_data_requests(_data_server, "emb")) == 3 + 2  # the failures were retried
    _data_server.scripts["emb-drift"] = ["echo"] + ["garbage"] * 3
    result = data.rephrase_chunkwise(doc, "qa", _data_endpoint(_data_server, "emb-drift"), max_chunk_chars=30,
                                     measure=measure, retries=2, on_fail="drop")
    assert [c["status"] for c in result.chunks] == ["ok", "dropped"] and result.chunks[1]["attempts"] == 3
    assert result.chunks[1]["similarity"] < data.MIN_SIMILARITY["embedding"]
    assert "drifted" in _data_requests(_data_server, "emb-drift")[-1]["messages"][-1]["content"]
    assert result.text == "In other words: The bridge opened in 1932."
    _data_server.scripts["emb-down"] = ["short"] * 4
    broken = data.EmbeddingEndpoint(_data_server.url, "emb-down", timeout=2.0, retries=3, backoff=0.01)
    with pytest.raises(data.GenerationError, match="after 4 attempts.*malformed.*1 vectors.*for 2 texts"):
        data.fidelity("a", "b", data.EmbeddingFidelity(broken))


@pytest.mark.parametrize("answer", ['{"keeps_every_fact": "yes", "missing": []}', "YES",
                                    '{"keeps_every_fact": false, "missing": []}',
                                    '{"keeps_every_fact": true, "missing": [], "note": "fine"}', "[true]"])
def test_judge_verdicts_are_parsed_strictly(answer):
    with pytest.raises(ValueError):
        data.parse_verdict(answer)


def test_llm_judge_rejects_malformed_answers_and_its_findings_drive_the_retry(_data_server):
    judge = data.JudgeFidelity(_data_endpoint(_data_server, "judge"), retries=2)
    _data_server.scripts["judge"] = ["judge-text", "judge-inconsistent"]  # two rejected answers, then valid
    result = data.rephrase_chunkwise("The bridge opened in 1932.", "qa", _data_endpoint(_data_server, "judged"),
                                     measure=judge)
    assert result.chunks[0]["status"] == "ok" and result.chunks[0]["measure"] == "llm_judge"
    asks = _data_requests(_data_server, "judge")
    assert len(asks) == 3 and "rejected" in asks[-1]["messages"][-1]["content"]
    for policy, status in (("keep", "kept_original"), ("drop", "dropped")):
        model = f"judged-drift-{policy}"
        _data_server.scripts[model] = ["garbage"] * 3
        result = data.rephrase_chunkwise("The bridge opened in 1932.", "qa", _data_endpoint(_data_server, model),
                                         measure=judge, retries=2, on_fail=policy)
        assert result.chunks[0]["status"] == status and result.chunks[0]["attempts"] == 3
        assert result.chunks[0]["judge_missing"] == ["all of: The bridge opened in 1932."]
        retry = _data_requests(_data_server, model)[-1]["messages"][-1]["content"]
        assert "facts lost: all of: The bridge opened in 1932." in retry
    _data_server.scripts["judge-broken"] = ["judge-text"] * 3
    broken = data.JudgeFidelity(_data_endpoint(_data_server, "judge-broken"), retries=2)
    with pytest.raises(data.GenerationError, match="no valid verdict in 3 answers; last: not a JSON object"):
        data.fidelity("a", "b", broken)


def test_empty_and_invalid_unicode_replies_are_reported_never_silent(_data_server, tmp_path, capsys):
    _data_write_docs(tmp_path / "docs", ["Alpha has 1 fact.", "Beta has 2 facts."])
    common = ["rephrase", str(tmp_path / "docs"), "--endpoint", _data_server.url, "--backoff", "0.01",
              "--fidelity-retries", "1"]
    _data_server.scripts["empty"] = ["empty"] * 4
    assert data.main(common + ["--model", "empty", "--out", str(tmp_path / "empty.jsonl")]) == 0
    err = capsys.readouterr().err
    assert "chunks: 0 rewritten, 2 kept their original text" in err and "4 empty replies" in err
    assert "warning: no chunk was rewritten" in err
    assert [c["empty_replies"] for r in _data_records(tmp_path / "empty.jsonl") for c in r["chunks"]] == [2, 2]
    _data_server.scripts["surrogate"] = ["surrogate"] * 2
    assert data.main(common + ["--model", "surrogate", "--out", str(tmp_path / "bad.jsonl")]) == 0
    assert "2 replies with invalid Unicode repaired" in capsys.readouterr().err
    assert all(r["text"].startswith("In other words \ufffd:") for r in _data_records(tmp_path / "bad.jsonl"))


def test_bad_encoding_lines_and_unsupported_files_are_counted_and_described(tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    lines = [json.dumps({"text": f"good record {i}"}) for i in range(60)]
    lines.insert(40, '{"text": "half an emoji \\udc80 here"}')  # valid JSON, no UTF-8 exists for it
    (d / "records.jsonl").write_text("\n".join(lines) + "\n")
    (d / "paper.pdf").write_bytes(b"%PDF-1.4")
    info = data.prepare(tmp_path / "cache", [str(d)])
    report = info["load_report"]
    assert report["bad_encoding_lines"] == 1 and report["unsupported_files"] == 1 and report["documents"] == 60
    line = data.describe_load_report(info)
    assert "\n" not in line and "1 bad encoding lines" in line and "1 unsupported files" in line
    assert "records.jsonl:41" in line and "paper.pdf" in line
    assert data.main(["stats", "--data", str(d), "--cache-dir", str(tmp_path / "cache")]) == 0
    assert "bad_encoding_lines 1" in capsys.readouterr().out


def test_a_single_file_corpus_gets_validation_text_cut_from_its_end(tmp_path):
    text = "\n\n".join(f"Paragraph {i}: " + "words and more words. " * 20 for i in range(40))
    (tmp_path / "one_big.txt").write_text(text)
    info = data.prepare(tmp_path / "cache", [str(tmp_path / "one_big.txt")], val_fraction=0.1)
    tok = data.ByteTokenizer()
    train = tok.decode(data.load_tokens(info, "train").tolist()).rstrip("\0")
    val = tok.decode(data.load_tokens(info, "val").tolist()).rstrip("\0")
    assert train + val == text  # nothing lost, nothing in both
    assert val.startswith("Paragraph ") and 0.1 <= len(val) / len(text) <= 0.2  # cut at a paragraph


def test_a_full_disk_while_caching_names_the_path_and_leaves_the_previous_state(tmp_path, monkeypatch, capsys):
    _data_write_docs(tmp_path / "docs", [f"text number {i}\n" * 5 for i in range(10)])
    src, cache = [str(tmp_path / "docs")], tmp_path / "cache"
    previous = data.prepare(cache, src)
    (tmp_path / "docs" / "doc003.txt").write_text("changed, so a new cache entry is built\n")

    def full_disk(path, *args):
        path.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(data, "_write_tokens", full_disk)
    with pytest.raises(OSError) as failure:
        data.prepare(cache, src)
    assert failure.value.errno == errno.ENOSPC and str(cache) in failure.value.filename
    assert [p.name for p in cache.iterdir()] == [previous["key"]]  # no tmp-<key>-<pid> left
    assert data.main(["stats", "--data", *src, "--cache-dir", str(cache)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "No space left on device" in err and str(cache) in err


@pytest.mark.parametrize("case, fragment", [
    ("missing path", "nowhere': no such file or folder"),
    ("builtin:physics", "unknown built-in domain(s) ['physics']"),
    ("--styles 9", "argument --styles: must be an integer in [1, 7], got '9'"),
    ("--styles -2", "argument --styles: must be an integer in [1, 7], got '-2'"),
    ("--styles 0", "argument --styles: must be an integer in [1, 7], got '0'"),
    ("record-less --out", "out.jsonl:1: not a rephrase record"),
    ("folder --out", "not a file"),
    ("empty folder", "no .txt/.md/.py/.jsonl files in"),
    ("unsupported only", "no .txt/.md/.py/.jsonl files in"),
    ("--shard 3/3", "argument --shard: expected I/N with 0 <= I < N, got '3/3'"),
    ("--concurrency 0", "argument --concurrency: must be an integer >= 1, got '0'"),
    ("bad weight", "weight 'lots' is not a number >= 0"),
])
def test_bad_command_line_input_gives_one_line_naming_it(case, fragment, tmp_path, capsys):
    _data_write_docs(tmp_path / "docs", ["One document."])
    (tmp_path / "empty").mkdir()
    (tmp_path / "pdfs").mkdir()
    (tmp_path / "pdfs" / "a.pdf").write_bytes(b"%PDF")
    (tmp_path / "out.jsonl").write_text("not a record\n")
    rephrase = ["rephrase", "--endpoint", "http://127.0.0.1:9/v1", "--out", str(tmp_path / "new.jsonl")]
    argv = {"missing path": rephrase + [str(tmp_path / "nowhere")],
            "builtin:physics": ["stats", "--data", "builtin:physics", "--cache-dir", str(tmp_path / "c")],
            "--styles 9": rephrase + [str(tmp_path / "docs"), "--styles", "9"],
            "--styles -2": rephrase + [str(tmp_path / "docs"), "--styles", "-2"],
            "--styles 0": rephrase + [str(tmp_path / "docs"), "--styles", "0"],
            "record-less --out": rephrase + [str(tmp_path / "docs"), "--out", str(tmp_path / "out.jsonl")],
            "folder --out": rephrase + [str(tmp_path / "docs"), "--out", str(tmp_path / "empty")],
            "empty folder": rephrase + [str(tmp_path / "empty")],
            "unsupported only": ["stats", "--data", str(tmp_path / "pdfs"), "--cache-dir", str(tmp_path / "c")],
            "--shard 3/3": rephrase + [str(tmp_path / "docs"), "--shard", "3/3"],
            "--concurrency 0": rephrase + [str(tmp_path / "docs"), "--concurrency", "0"],
            "bad weight": ["stats", "--data", f"k:lots={tmp_path / 'docs'}", "--cache-dir", str(tmp_path / "c")],
            }[case]
    try:
        code = data.main(argv)
    except SystemExit as e:  # argparse: usage, then one error line
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err
    assert fragment in err.splitlines()[-1], err
    assert not (tmp_path / "new.jsonl").exists() or not (tmp_path / "new.jsonl").read_bytes()


def test_rephrased_output_trains_as_its_own_domain_with_its_stated_weight(_data_server, tmp_path):
    # corpus -> rephrase -> stats -> train: the fake rephraser ("upper") writes the source in
    # capitals, so every training byte tells which domain it came from.
    rng = random.Random(0)
    _data_write_docs(tmp_path / "docs", [" ".join("".join(rng.choices("ab", k=5)) for _ in range(40))
                                         for _ in range(30)])
    out = tmp_path / "rephrased.jsonl"
    assert data.main(["rephrase", str(tmp_path / "docs"), "--endpoint", _data_server.url, "--model", "upper",
                      "--out", str(out), "--concurrency", "4", "--backoff", "0.01"]) == 0
    sources = [f"knowledge={tmp_path / 'docs'}", f"rephrased:3={out}"]
    info = data.prepare(tmp_path / "cache", sources, val_fraction=0.1)
    assert info["load_report"]["documents"] == 60 and info["stats"]["rephrased"]["val_docs"] == 3
    sampler = data.BatchSampler(data.load_tokens(info, "train"), 8, 64, seed=1)
    drawn = np.concatenate([sampler.next()[0].flatten().numpy() for _ in range(100)])
    lower, upper = np.isin(drawn, [ord("a"), ord("b")]).sum(), np.isin(drawn, [ord("A"), ord("B")]).sum()
    assert upper / lower == pytest.approx(3, rel=0.1)  # drawn in proportion to the weights 1 : 3
    with pytest.raises(data.DataError, match="already has weight 3"):
        data.prepare(tmp_path / "cache", sources + [f"rephrased:2={out}"])
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**train.Config.from_preset("tiny").to_dict(), "num_hidden_layers": 1,
                                  "n_routed_experts": 4, "num_experts_per_tok": 2}))
    train.main(["--data", *sources, "--data-cache", str(tmp_path / "cache"), "--config", str(config),
                "--out", str(tmp_path / "run"), "--max-steps", "2", "--warmup-steps", "1", "--batch-size", "2",
                "--seq-len", "32", "--eval-interval", "2", "--eval-iters", "1", "--sample-tokens", "0",
                "--dtype", "float32", "--device", "cpu", "--peak-flops", "1e9"])
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") >= 2


def test_bench_throughput_is_bounded_by_the_fake_servers_latency_and_capacity():
    latency, capacity = 0.05, 2
    rows = bench.bench_rephrase(levels=(1, 2, 4), latency=latency, capacity=capacity, chunks_per_doc=1)
    by = {r["concurrency"]: r for r in rows}
    assert sorted(by) == [1, 2, 4] and all(r["pairs"] == 20 and r["cpu_ms_per_chunk"] > 0 for r in rows)
    for concurrency, row in by.items():  # each pair holds one of `capacity` slots for `latency` seconds
        assert row["pairs_per_s"] <= min(concurrency, capacity) / latency
    assert by[2]["pairs_per_s"] > 1.4 * by[1]["pairs_per_s"]  # two in flight overlap their waits


# -----------------------------------------------------------------------------------------------
# Nothing lost: one writer per output, a user's files untouched, deadlines, bad paths


def _data_rephrase_command(docs, out, server, model, *extra):
    return [sys.executable, str(_DATA_PY), "rephrase", str(docs), "--endpoint", server.url, "--model", model,
            "--out", str(out), "--max-chunk-chars", "50", "--timeout", "5", "--backoff", "0.01", *extra]


def _data_wait_for(condition, seconds=60):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def test_a_second_rephrase_on_one_out_is_refused_naming_the_holder_and_a_dead_ones_lock_is_taken_over(
        _data_server, tmp_path):
    _data_write_docs(tmp_path / "docs", [f"Document {i} says {i}.\n\nIts paragraph {i}." for i in range(6)])
    out, lock = tmp_path / "out.jsonl", tmp_path / "out.jsonl.lock"
    _data_server.delay["locked"] = 1.0  # slow enough that the first run is still going when the second starts
    command = _data_rephrase_command(tmp_path / "docs", out, _data_server, "locked", "--styles", "2")
    first = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    try:
        _data_wait_for(lambda: out.exists() and out.read_bytes().count(b"\n") >= 1)
        second = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert second.returncode == 2
        message = second.stderr.strip()
        assert "\n" not in message and f"pid {first.pid} " in message and "data.py rephrase" in message
        assert str(out) in message
        first.send_signal(signal.SIGKILL)  # the holder dies: its lock file stays, its lock does not
    finally:
        first.kill()
        first.wait()
    assert lock.exists() and f"pid {first.pid} " in lock.read_text()
    _data_server.delay["locked"] = 0.0
    assert data.main(command[2:]) == 0
    keys = [(r["id"], r["style"]) for r in _data_records(out)]
    assert len(keys) == len(set(keys)) == 12  # every pair once: the refused run wrote nothing
    assert not lock.exists()


def test_an_interrupted_rephrase_exits_130_in_one_line_and_the_same_command_resumes(_data_server, tmp_path):
    _data_write_docs(tmp_path / "docs", [f"Document {i} says {i}." for i in range(6)])
    out = tmp_path / "out.jsonl"
    _data_server.delay["interrupted"] = 1.0
    command = _data_rephrase_command(tmp_path / "docs", out, _data_server, "interrupted", "--concurrency", "2")
    run = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    _data_wait_for(lambda: out.exists() and out.read_bytes().count(b"\n") >= 1)
    run.send_signal(signal.SIGINT)  # two pairs are in flight: they are dropped, not half-written
    err = run.communicate(timeout=30)[1].strip().splitlines()
    assert run.returncode == 130 and "Traceback" not in "\n".join(err)
    assert err[-1] == "data.py rephrase: interrupted; what was written stays, and the same command resumes"
    written = _data_records(out)  # every line whole
    assert 1 <= len(written) < 6 and not Path(f"{out}.lock").exists()
    _data_server.delay["interrupted"] = 0.0
    assert data.main(command[2:]) == 0
    records = _data_records(out)
    assert records[:len(written)] == written and len({r["id"] for r in records}) == len(records) == 6


@pytest.mark.parametrize("content", [b"my notes\nthe last line has no newline", b"",
                                     b'{"id": "x", "style": "qa"}\nnot a record\n',
                                     json.dumps({"text": "a training record"}).encode() + b"\n"])
def test_rephrase_refuses_an_out_that_is_not_its_own_before_writing_a_byte(_data_server, tmp_path, content,
                                                                             capsys):
    _data_write_docs(tmp_path / "docs", ["One fact: 7."])
    out = tmp_path / "notes.txt"
    out.write_bytes(content)
    code = data.main(["rephrase", str(tmp_path / "docs"), "--endpoint", _data_server.url, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    if not content:  # an empty file holds nothing to lose: it becomes the output
        assert code == 0 and len(_data_records(out)) == 1
        return
    assert code == 2 and "\n" not in err and f"{out}:" in err and "not a rephrase record" in err, err
    assert out.read_bytes() == content and not Path(f"{out}.lock").exists()


def test_a_users_file_named_like_the_lock_is_left_alone(_data_server, tmp_path, capsys):
    _data_write_docs(tmp_path / "docs", ["One fact: 7."])
    lock = tmp_path / "out.jsonl.lock"
    lock.write_text("my lock-picking notes")
    code = data.main(["rephrase", str(tmp_path / "docs"), "--endpoint", _data_server.url,
                      "--out", str(tmp_path / "out.jsonl")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and str(lock) in err and "not a lock of this command" in err
    assert lock.read_text() == "my lock-picking notes" and not (tmp_path / "out.jsonl").exists()


def test_a_trickling_server_fails_at_the_request_deadline(_data_server):
    _data_server.scripts["trickle"] = ["trickle"]  # about 90 bytes at one per 0.3 s: no read ever times out
    endpoint = _data_endpoint(_data_server, "trickle", timeout=1.0, retries=0)
    start = time.monotonic()
    with pytest.raises(data.GenerationError, match="timed out: no complete reply within the 1 s deadline"):
        endpoint(data.rephrase_messages("One sentence.", "qa"))
    assert time.monotonic() - start < 2.5


def test_each_retry_and_each_pause_is_logged_in_one_line(_data_server):
    _data_server.scripts["logged"] = ["500", "429-wait", "cut"]
    lines = []
    reply = _data_endpoint(_data_server, "logged", retries=3, log=lines.append)(data.rephrase_messages("Hi.", "qa"))
    assert reply == "In other words: Hi."
    assert len(lines) == 3 and all("\n" not in line and _data_server.url in line for line in lines)
    assert "attempt 1/4: HTTP 500" in lines[0] and "every request to it pauses 0.01 s" in lines[0]
    assert "attempt 2/4: HTTP 429" in lines[1] and "pauses 1 s, as the server asked (Retry-After)" in lines[1]
    assert "attempt 3/4: IncompleteRead" in lines[2] and "retrying in 0.04 s" in lines[2]


def test_a_reply_far_longer_than_its_chunk_is_rejected_and_the_record_says_so(_data_server, tmp_path, capsys):
    _data_server.scripts["runaway"] = ["huge"]  # a 1 MB "rewrite" of a 30-character chunk, then a good one
    result = data.rephrase_chunkwise("The bridge opened in 1932.", "qa", _data_endpoint(_data_server, "runaway"))
    assert result.text == "In other words: The bridge opened in 1932."
    assert result.chunks[0]["attempts"] == 2 and result.chunks[0]["long_replies"] == 1
    assert "far longer than a rewrite of this 26-character part" in \
        _data_requests(_data_server, "runaway")[-1]["messages"][-1]["content"]
    _data_write_docs(tmp_path / "docs", ["The bridge opened in 1932."])
    _data_server.scripts["runaway-always"] = ["huge"] * 3
    out = tmp_path / "out.jsonl"
    assert data.main(["rephrase", str(tmp_path / "docs"), "--endpoint", _data_server.url, "--model", "runaway-always",
                      "--max-tokens", "77", "--out", str(out)]) == 0
    [record] = _data_records(out)
    assert record["text"] == "The bridge opened in 1932." and record["chunks"][0]["status"] == "kept_original"
    assert record["chunks"][0]["long_replies"] == 3
    assert "3 far longer than their chunk" in capsys.readouterr().err
    assert {r["max_tokens"] for r in _data_requests(_data_server, "runaway-always")} == {77}


def test_an_interrupted_cache_build_leaves_nothing_the_next_build_keeps(tmp_path):
    # A build killed while it writes its temporary folder; the next prepare() removes that folder.
    _data_write_docs(tmp_path / "docs", [f"document {i} " + "words and more words. " * 70_000 for i in range(4)])
    cache = tmp_path / "cache"
    code = f"import data; data.prepare({str(cache)!r}, [{str(tmp_path / 'docs')!r}])"
    build = subprocess.Popen([sys.executable, "-c", code], cwd=_HERE)
    try:
        _data_wait_for(lambda: list(cache.glob("tmp-*")) or build.poll() is not None)
        build.send_signal(signal.SIGKILL)
    finally:
        build.kill()
        build.wait()
    [stale] = list(cache.glob("tmp-*"))
    alive = cache / stale.name.replace(f"-{build.pid}@", "-1@")  # a build whose process (init) still runs
    alive.mkdir()
    info = data.prepare(cache, [str(tmp_path / "docs")])
    assert not stale.exists() and alive.exists()
    assert sorted(p.name for p in cache.iterdir()) == sorted([alive.name, info["key"]])


def _data_without_root_override():
    """The command prefix under which a mode-000 file cannot be read: none for a user; for root (who
    reads anything), setpriv without the capabilities that override file permissions."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: no file is unreadable")
    return ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search", "--"]


def test_an_unreadable_data_file_is_named_as_such(tmp_path):
    path = tmp_path / "unreadable.txt"
    path.write_text("secret")
    path.chmod(0)
    done = subprocess.run([*_data_without_root_override(), sys.executable, str(_DATA_PY), "stats", "--data", str(path),
                           "--cache-dir", str(tmp_path / "cache")], capture_output=True, text=True, timeout=60)
    err = done.stderr.strip()
    assert done.returncode == 2 and "\n" not in err and "Traceback" not in err, err
    assert f"data.py stats: data source '{path}': {path} cannot be read (Permission denied)" == err
    path.chmod(0o644)
    assert path.read_text() == "secret" and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("case, message", [
    ("fifo", "pipe.txt is a FIFO (named pipe), not a file or folder"),
    ("loop", "loop.txt is a symlink loop, not a file or folder"),
    ("broken link", "broken.txt is a broken symbolic link (to nowhere.txt), not a file or folder"),
])
def test_a_data_path_that_is_no_file_is_named_for_what_it_is(tmp_path, case, message, capsys):
    path = tmp_path / {"fifo": "pipe.txt", "loop": "loop.txt", "broken link": "broken.txt"}[case]
    if case == "fifo":
        os.mkfifo(path)  # opened, it would block forever
    elif case == "loop":
        os.symlink(tmp_path / "other.txt", path)
        os.symlink(path, tmp_path / "other.txt")
    else:
        os.symlink("nowhere.txt", path)
    assert data.main(["stats", "--data", str(path), "--cache-dir", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.endswith(message), err


def test_bad_entries_in_a_folder_are_skipped_and_counted_and_nul_bytes_reported(tmp_path):
    d = tmp_path / "in"
    _data_write_docs(d, ["A good document.", "Another one."])
    (d / "unreadable.txt").write_text("secret")
    (d / "unreadable.txt").chmod(0)
    os.mkfifo(d / "pipe.txt")  # read, it would block forever
    os.symlink(d / "b.txt", d / "a.txt")
    os.symlink(d / "a.txt", d / "b.txt")
    (d / "nul.txt").write_bytes(b"before\0after\0")
    done = subprocess.run([*_data_without_root_override(), sys.executable, str(_DATA_PY), "stats", "--data", str(d),
                           "--cache-dir", str(tmp_path / "cache")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    loader = re.search(r"^loader: (.*)$", done.stdout, re.M)[1]
    assert "unreadable_files 1" in loader and "unsupported_files 3" in loader and "nul_bytes 2" in loader
    for where, why in (("unreadable.txt", "cannot be read (Permission denied); skipped"),
                       ("pipe.txt", "a FIFO (named pipe); skipped"), ("a.txt", "a symlink loop; skipped"),
                       ("nul.txt", "2 NUL characters, which the byte tokenizer reads as end of document")):
        assert re.search(rf"^  \S*{re.escape(where)}: {re.escape(why)}$", done.stdout, re.M), (where, done.stdout)
    info = data.prepare(tmp_path / "cache2", [str(d / "nul.txt")], val_fraction=0)
    assert "2 nul bytes" in data.describe_load_report(info)
    tokens = np.concatenate([data.load_tokens(info, "train"), data.load_tokens(info, "val")])
    assert data.ByteTokenizer().decode(tokens.tolist()) == "before\0after\0\0"  # kept, then the eos


# ==================================================================================================
# train.py: the training program
#
# Tests of train.py: exact resume after SIGKILL and after SIGINT, atomic checkpoints (also on a full
# disk), runs never lost to a rerun, resume checks before anything is built, DDP / FSDP2 against one
# process, gradient accumulation, non-finite steps, the hf/ export through transformers' Auto classes,
# and one-line errors that name the bad option, file or path. No run lost: one writer per run folder,
# a user's own files never touched, a resume from an older checkpoint keeping the newer ones, corrupt
# checkpoint bytes named, and any number of signals during a checkpoint write.
#
# Runs on CPU in float32 with tiny settings (a 2-layer, 8-expert cut of the tiny preset; 8 steps of
# 4 x 32 tokens). Training subprocesses run with one thread each: PyTorch's multi-threaded CPU kernels
# can differ in the last bit between two identical runs on a loaded machine, and exact resume is about
# train.py, not about them.
# ==================================================================================================

# Wall-clock fields of a metrics record; everything else must repeat exactly.
_TRAIN_TIMING_KEYS = {"tokens_per_s", "mfu", "elapsed_s"}
_TRAIN_STEPS = 8
_TRAIN_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _train_args(out, setup, *extra):
    """A tiny CPU run: every step logged, evaluated every 3 and checkpointed every 2 steps."""
    cache, config = setup
    return ["--out", str(out), "--data-cache", str(cache), "--config", str(config), "--max-steps", str(_TRAIN_STEPS),
            "--batch-size", "4", "--seq-len", "32", "--warmup-steps", "3", "--log-interval", "1",
            "--eval-interval", "3", "--eval-iters", "2", "--ckpt-interval", "2", "--sample-tokens", "8",
            "--dtype", "float32", "--device", "cpu", "--peak-flops", "1e9", *extra]


def _train_run(args, nproc=1, timeout=300):
    """train.py ARGS in a subprocess (under torchrun for nproc 2), which must succeed."""
    assert nproc in (1, 2)
    if nproc == 1:
        done = subprocess.run([sys.executable, "train.py", *args], cwd=_HERE, capture_output=True,
                              text=True, timeout=timeout, env=_TRAIN_ENV)
    else:
        done = torchrun(["train.py", *args], env=_TRAIN_ENV)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _train_metrics(out, timing=False):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return records if timing else [{k: v for k, v in r.items() if k not in _TRAIN_TIMING_KEYS} for r in records]


def _train_losses(out):
    return [(r["step"], r["loss"] if "loss" in r else r["val_loss"]) for r in _train_metrics(out)]


@pytest.fixture(scope="module")
def train_setup(tmp_path_factory):
    """(data cache shared by every run of this module, model config.json)."""
    folder = tmp_path_factory.mktemp("train_setup")
    config = {**train.Config.from_preset("tiny").to_dict(), "num_hidden_layers": 2, "n_routed_experts": 8,
              "num_experts_per_tok": 2}
    with open(folder / "config.json", "w") as f:
        json.dump(config, f)
    return folder / "data_cache", folder / "config.json"


@pytest.fixture(scope="module")
def train_reference(tmp_path_factory, train_setup):
    """One uninterrupted single-process run that the other runs are compared with."""
    out = tmp_path_factory.mktemp("reference")
    return out, _train_run(_train_args(out, train_setup)).stdout


def test_run_folder_holds_config_metrics_checkpoints_export(train_reference):
    out, stdout = train_reference
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["model"]["num_hidden_layers"] == 2 and config["batch_size"] == 4
    records = _train_metrics(out, timing=True)
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == list(range(1, _TRAIN_STEPS + 1))
    assert [r["step"] for r in records if "val_loss" in r] == [0, 3, 6, _TRAIN_STEPS]
    assert all(r["tokens_per_s"] > 0 and r["mfu"] > 0 for r in train_records)
    assert train_records[-1]["loss"] < train_records[0]["loss"]
    ckpts = sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, "ckpt_*.pt")))
    assert ckpts == ["ckpt_0000006.pt", "ckpt_0000008.pt"]  # the last --keep-ckpts 2
    assert os.path.exists(os.path.join(out, "hf", "config.json"))
    # the manifest lists every file of the run, and nothing else
    written = {str(p.relative_to(out)) for p in Path(out).rglob("*") if p.is_file()} - {train.MANIFEST, train.LOCK}
    assert set(json.loads((Path(out) / train.MANIFEST).read_text())["files"]) == written
    assert (Path(out) / train.LOCK).read_text() == ""  # an orderly end lets go of the lock and its line
    assert "final val loss" in stdout and "unigram entropy" in stdout


def test_resume_after_sigkill_logs_exactly_the_uninterrupted_metrics(tmp_path, train_setup, train_reference):
    reference, _ = train_reference
    # an arbitrary step between checkpoints, at least two steps before the end: the kill lands once a
    # line follows that step's record, and must land before the final export even on a loaded machine
    kill_after = random.Random(5).randint(3, _TRAIN_STEPS - 3)
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "train.py", *_train_args(out, train_setup)], cwd=_HERE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_TRAIN_ENV)
    metrics, deadline = out / "metrics.jsonl", time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any('"loss"' in line and json.loads(line)["step"] >= kill_after
                                    for line in metrics.read_text().splitlines()[:-1]):
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(out / "hf"), "killed too late"
    for path in glob.glob(str(out / "ckpt_*.pt")):  # every checkpoint on disk is whole
        assert train.load_checkpoint(path)["step"] >= 2
    resumed = _train_run(_train_args(out, train_setup, "--resume"))
    assert _train_metrics(out) == _train_metrics(reference)
    # the killed run's lock is taken over, in one line naming the process that held it
    assert f"--out {out}: the lock of pid {proc.pid} (" in resumed.stdout
    assert "which has ended, is taken over" in resumed.stdout


def test_checkpoint_is_never_half_written(tmp_path, monkeypatch):
    first = {"step": 1, "model": {"w": torch.ones(3)}}
    good = train.save_checkpoint(first, train.RunFolder(str(tmp_path)), keep=2)

    def torch_save_killed_midway(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # the process dies while writing

    monkeypatch.setattr(torch, "save", torch_save_killed_midway)
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint({"step": 2, "model": {"w": torch.zeros(3)}}, train.RunFolder(str(tmp_path)), keep=2)
    assert glob.glob(str(tmp_path / "ckpt_*.pt")) == [good]
    assert torch.equal(torch.load(good, weights_only=True)["model"]["w"], torch.ones(3))


def test_checkpoints_beyond_keep_are_removed_and_only_those_train_py_wrote(tmp_path):
    users = tmp_path / "ckpt_0000000.pt"  # named like a checkpoint, but not written by this run
    users.write_bytes(b"the user's own")
    folder = train.RunFolder(str(tmp_path))
    for step in range(1, 5):
        train.save_checkpoint({"step": step}, folder, keep=2)
    assert sorted(os.listdir(tmp_path)) == ["ckpt_0000000.pt", "ckpt_0000003.pt", "ckpt_0000004.pt", train.MANIFEST]
    assert users.read_bytes() == b"the user's own"
    assert json.loads((tmp_path / train.MANIFEST).read_text())["files"] == ["ckpt_0000003.pt", "ckpt_0000004.pt"]


@pytest.mark.parametrize("mode", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_two_processes_with_accumulation_match_one_process(tmp_path, train_setup, train_reference, mode):
    """2 ranks x 2 micro-steps x 1 sequence is the reference's global batch of 4: same loss curve."""
    reference, _ = train_reference
    done = _train_run(_train_args(tmp_path, train_setup, "--grad-accum", "2", *mode), nproc=2)
    assert "FutureWarning" not in done.stderr, done.stderr  # DDP's broadcast_buffers deprecation, once per rank
    ours, theirs = _train_losses(tmp_path), _train_losses(reference)
    assert [s for s, _ in ours] == [s for s, _ in theirs]
    assert max(abs(a - b) for (_, a), (_, b) in zip(ours, theirs)) < 1e-4
    # Redo the last two steps from the step-6 checkpoint (FSDP: every rank's optimizer shard). DDP
    # repeats them bit for bit; FSDP2 to float32 rounding (2e-7 measured on the last val loss).
    os.remove(tmp_path / "ckpt_0000008.pt")
    _train_run(_train_args(tmp_path, train_setup, "--grad-accum", "2", *mode, "--resume"), nproc=2)
    again = _train_losses(tmp_path)
    assert [s for s, _ in again] == [s for s, _ in ours]
    assert max(abs(a - b) for (_, a), (_, b) in zip(again, ours)) < 1e-5


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, train_setup, monkeypatch):
    forward = train.KimiK2.forward

    def nan_loss(self, input_ids, targets=None, **kw):
        logits, loss = forward(self, input_ids, targets, **kw)
        return logits, (loss * float("nan") if self.training else loss)

    monkeypatch.setattr(train.KimiK2, "forward", nan_loss)
    with pytest.raises(SystemExit, match="3 non-finite steps in a row"):
        train.main(_train_args(tmp_path, train_setup, "--max-bad-steps", "3"))
    records = _train_metrics(tmp_path)
    assert [r["step"] for r in records if "skipped" in r] == [1, 2, 3]
    assert not any("loss" in r and "skipped" not in r for r in records)


def test_non_finite_model_is_never_checkpointed(tmp_path, train_setup, monkeypatch):
    step = train.MuonClip.step

    def poisoning_step(self, closure=None):
        step(self, closure)
        self.param_groups[0]["params"][0].data.fill_(float("nan"))

    monkeypatch.setattr(train.MuonClip, "step", poisoning_step)
    with pytest.raises(SystemExit, match="non-finite weights"):
        train.main(_train_args(tmp_path, train_setup, "--ckpt-interval", "1"))
    assert not glob.glob(str(tmp_path / "ckpt_*"))


@pytest.mark.parametrize("argv, named", [
    (["--preset", "huge"], "--preset"),
    (["--batch-size", "0"], "--batch-size"),
    (["--lr", "-1"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--decay-frac", "1.5"], "--decay-frac"),
    (["--schedule", "linear"], "--schedule"),
    (["--optimizer", "sgd"], "--optimizer"),
    (["--dtype", "float64"], "--dtype"),
])
def test_bad_options_fail_naming_the_option(argv, named, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    assert f"argument {named}" in capsys.readouterr().err


@pytest.mark.parametrize("argv, named", [
    (["--data", "/no/such/corpus.txt"], "/no/such/corpus.txt"),
    (["--dtype", "float16"], "--dtype float16"),
    (["--batch-size", "6", "--grad-accum", "4"], "--batch-size 6"),
    (["--seq-len", "100000"], "--seq-len 100000"),
    (["--config", "/no/such/config.json"], "/no/such/config.json"),
    (["--fsdp"], "--fsdp"),
    (["--resume"], "--resume"),
])
def test_bad_settings_fail_naming_them(tmp_path, train_setup, argv, named):
    with pytest.raises(SystemExit, match=named.replace(".", r"\.")) as e:
        train.main(_train_args(tmp_path, train_setup, *argv))
    assert str(e.value).startswith("train.py: error:")


def test_corrupt_checkpoint_fails_naming_the_file(tmp_path, train_setup):
    bad = tmp_path / "ckpt_0000002.pt"
    bad.write_bytes(b"\x00garbage, not a zip archive")
    with pytest.raises(SystemExit, match=f"cannot read checkpoint {bad}: not a whole checkpoint"):
        train.main(_train_args(tmp_path / "run", train_setup, "--resume", str(bad)))


def _train_build_nothing(monkeypatch):
    """Make building the data or the model fail loudly: the checks before them must stop the run."""
    def built(*a, **k):
        raise AssertionError("built something before the check")
    monkeypatch.setattr(train.data, "prepare", built)
    monkeypatch.setattr(train, "KimiK2", built)


def test_resume_with_incompatible_config_fails_naming_the_field_and_builds_nothing(tmp_path, train_setup,
                                                                                   train_reference, monkeypatch):
    reference, _ = train_reference
    ckpt = sorted(glob.glob(os.path.join(reference, "ckpt_*.pt")))[-1]  # step 8
    out = tmp_path / "run"
    _train_build_nothing(monkeypatch)
    with pytest.raises(SystemExit, match=r"different --seq-len \(32, this run: 16\)"):
        train.main(_train_args(out, train_setup, "--seq-len", "16", "--resume", ckpt))
    with pytest.raises(SystemExit, match="different --optimizer"):
        train.main(_train_args(out, train_setup, "--optimizer", "adamw", "--resume", ckpt))
    # the precision changes the losses as much as any option checked here (bfloat16 autocast runs on CPU)
    with pytest.raises(SystemExit, match=r"different --dtype \('float32', this run: 'bfloat16'\)$"):
        train.main([*_train_args(out, train_setup, "--resume", ckpt), "--dtype", "bfloat16"])
    other = tmp_path / "three_layers.json"
    other.write_text(json.dumps({**json.load(open(train_setup[1])), "num_hidden_layers": 3}))
    with pytest.raises(SystemExit, match=r"different --preset/--config: num_hidden_layers 2 \(this run: 3\)$"):
        train.main([*_train_args(out, train_setup, "--resume", ckpt), "--config", str(other)])
    with pytest.raises(SystemExit, match=r"is at step 8, past --max-steps 5 \(give --max-steps 8 or more\)"):
        train.main(_train_args(out, train_setup, "--max-steps", "5", "--resume", ckpt))
    assert os.listdir(out) == [train.LOCK]  # nor was the run folder written: only locked


def _train_snapshot(folder):
    """Every file's bytes, but the lock's line, which names whichever process last held the folder."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(Path(folder).rglob("*"))
            if p.is_file() and p.name != train.LOCK}


def test_rerun_without_resume_keeps_the_earlier_run(tmp_path, train_setup, train_reference, monkeypatch):
    reference, _ = train_reference
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = _train_snapshot(run)
    _train_build_nothing(monkeypatch)
    with pytest.raises(SystemExit, match=f"--out {run} holds an earlier run .*ckpt_0000008.pt.*--resume.*--overwrite"):
        train.main(_train_args(run, train_setup))
    assert _train_snapshot(run) == before
    # --overwrite is the explicit way to start over: the earlier checkpoints, metrics and export go
    args = train.parse_args(_train_args(run, train_setup, "--overwrite"))
    setup = train.Setup(False, 0, 1, torch.device("cpu"), torch.float32, 4)
    assert train.prepare_run_folder(args, train.RunFolder(str(run)), None, None, {"run": "new"}, setup) == []
    assert sorted(os.listdir(run)) == ["config.json", "metrics.jsonl", train.LOCK, train.MANIFEST]
    assert (run / "metrics.jsonl").read_text() == ""


def test_sigint_checkpoints_then_resume_logs_exactly_the_uninterrupted_metrics(tmp_path, train_setup, train_reference):
    reference, _ = train_reference
    out = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, "train.py", *_train_args(out, train_setup)], cwd=_HERE, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_TRAIN_ENV)
    metrics, deadline = out / "metrics.jsonl", time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any('"loss"' in line and json.loads(line)["step"] >= 3
                                    for line in metrics.read_text().splitlines()[:-1]):
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == train.INTERRUPTED, stderr
    assert "Traceback" not in stderr and not os.path.exists(out / "hf")
    stopped = int(re.search(r"stopped by SIGINT after step (\d+), checkpointed", stdout)[1])
    assert stopped < _TRAIN_STEPS and os.path.exists(out / f"ckpt_{stopped:07d}.pt")
    command = stdout.rpartition("continue with: ")[2].split()
    assert command[:2] == ["python", "train.py"] and command[-2:] == ["--resume", str(out / f"ckpt_{stopped:07d}.pt")]
    _train_run(command[2:])
    assert _train_metrics(out) == _train_metrics(reference)


@pytest.mark.parametrize("failure", ["torch.save", "fsync"])
def test_full_disk_during_checkpoint_leaves_the_previous_one_and_no_temporary_file(tmp_path, monkeypatch, failure):
    folder = train.RunFolder(str(tmp_path))
    good = train.save_checkpoint({"step": 1, "model": {"w": torch.ones(3)}}, folder, keep=2)
    if failure == "torch.save":  # torch's own error for a full disk: /dev/full answers every write with ENOSPC
        save = torch.save
        monkeypatch.setattr(torch, "save", lambda obj, f: (f.write(b"PK\x03\x04 partial"), save(obj, open("/dev/full", "wb"))))
    else:
        def fsync_full(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(os, "fsync", fsync_full)
    with pytest.raises(SystemExit, match=f"--out {tmp_path}: cannot write checkpoint .*ckpt_0000002.pt: No space left on device$"):
        train.save_checkpoint({"step": 2, "model": {"w": torch.zeros(3)}}, folder, keep=2)
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(good), train.MANIFEST]
    assert torch.equal(torch.load(good, weights_only=True)["model"]["w"], torch.ones(3))


def _flip_tensor_bytes(path):
    """64 bytes inside the largest tensor record overwritten, as by a failing disk: the zip still opens."""
    import zipfile
    with zipfile.ZipFile(path) as archive:
        record = max(archive.infolist(), key=lambda info: info.file_size)
    raw = bytearray(path.read_bytes())
    start = record.header_offset + 30 + len(record.filename) + len(record.extra) + record.file_size // 2  # in its data
    raw[start:start + 64] = bytes(b ^ 0xFF for b in raw[start:start + 64])
    path.write_bytes(bytes(raw))


_NOT_WHOLE = r"not a whole checkpoint \(empty, cut short, or not a zip archive\)"


@pytest.mark.parametrize("corrupt, reason", [
    (lambda p: p.write_bytes(p.read_bytes()[:5000]), _NOT_WHOLE),  # cut short
    (lambda p: p.write_bytes(b""), _NOT_WHOLE),
    (lambda p: p.write_bytes(random.Random(0).randbytes(5000)), _NOT_WHOLE),
    (_flip_tensor_bytes, r"corrupt bytes \(record archive/data/\d+ fails its CRC-32 check\)"),
], ids=["cut", "empty", "random", "flipped"])
def test_corrupt_newest_checkpoint_names_the_older_good_one(tmp_path, train_setup, train_reference, corrupt, reason):
    reference, _ = train_reference
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    newest = run / "ckpt_0000008.pt"
    corrupt(newest)
    before = _train_snapshot(run)
    with pytest.raises(SystemExit) as e:
        train.main(_train_args(run, train_setup, "--resume"))
    message = str(e.value)
    assert re.fullmatch(f"train.py: error: --resume: cannot read checkpoint {newest}: {reason}; the older checkpoint "
                        f"next to it reads \\(step 6\\): --resume {run / 'ckpt_0000006.pt'}", message), message
    assert "\n" not in message and "torch" not in message and "mmap" not in message  # torch's words never reach the user
    assert _train_snapshot(run) == before


def _train_users_files(folder):
    """A folder of the user's own files, with names train.py also writes."""
    (folder / "hf").mkdir(parents=True)
    for name in ("config.json", "plot.png", "hf/model.safetensors", "ckpt_best.pt", "notes"):
        (folder / name).write_text(f"the user's {name}")


@pytest.mark.parametrize("extra", [[], ["--overwrite"], ["--resume"]], ids=["run", "overwrite", "resume"])
def test_a_folder_with_files_train_py_did_not_write_is_refused_and_left_untouched(tmp_path, train_setup, train_reference,
                                                                                  monkeypatch, extra):
    reference, _ = train_reference
    users, run = tmp_path / "users", tmp_path / "run"
    _train_users_files(users)
    shutil.copytree(reference, run)
    (run / "notes.txt").write_text("the user's note in a train.py run folder")
    _train_build_nothing(monkeypatch)
    for out, foreign in ((users, users / "ckpt_best.pt"), (run, run / "notes.txt")):
        before = _train_snapshot(out)
        with pytest.raises(SystemExit, match=f"^train.py: error: --out {out} holds files that are not train.py's "
                                             f"\\(not listed in its {train.MANIFEST}\\), e.g. {foreign}: .*choose an empty "
                                             f"or new --out$"):
            train.main(_train_args(out, train_setup, *extra))
        assert _train_snapshot(out) == before and not (users / train.LOCK).exists()
    before = _train_snapshot(users)
    monkeypatch.chdir(users)  # --out . where the user keeps their files
    with pytest.raises(SystemExit, match=r"--out \. holds files that are not train.py's .*, e\.g\. \./ckpt_best\.pt:"):
        train.main(_train_args(".", train_setup, *extra))
    assert _train_snapshot(users) == before and not (users / train.LOCK).exists()


def test_overwrite_deletes_what_train_py_wrote_and_nothing_else(tmp_path, train_setup, train_reference):
    reference, _ = train_reference
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    cache = run / "data_cache"  # another program's folder inside --out is neither foreign nor ours
    shutil.copytree(train_setup[0], cache)
    cached = _train_snapshot(cache)
    args = _train_args(run, train_setup, "--overwrite", "--max-steps", "1", "--sample-tokens", "0", "--keep-ckpts", "1")
    args[args.index("--data-cache") + 1] = str(cache)
    _train_run(args)
    assert _train_snapshot(cache) == cached
    left = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and cache not in p.parents)
    assert left == sorted(["ckpt_0000001.pt", "config.json", "metrics.jsonl", "plot.png", train.LOCK, train.MANIFEST,
                           *[str(p.relative_to(reference)) for p in Path(reference, "hf").iterdir()]])
    assert [r["step"] for r in _train_metrics(run) if "loss" in r] == [1]


def test_one_writer_per_run_folder_names_the_holder(tmp_path, train_setup, train_reference):
    """A run holds its folder: a second run, also a torchrun job, stops in one line naming the holder's pid
    and command before writing anything, and the first run ends as if alone."""
    reference, _ = train_reference
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "train.py", *_train_args(out, train_setup)], cwd=_HERE,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_TRAIN_ENV)
    lock, deadline = out / train.LOCK, time.time() + 120
    while time.time() < deadline and not (lock.exists() and lock.read_text().endswith("\n")):
        time.sleep(0.01)
    first.send_signal(signal.SIGSTOP)  # holding the lock, wherever it is in its run
    try:
        before = _train_snapshot(out)
        second = subprocess.run([sys.executable, "train.py", *_train_args(out, train_setup, "--seed", "7")], cwd=_HERE,
                                capture_output=True, text=True, timeout=120, env=_TRAIN_ENV)
        job = torchrun(["train.py", *_train_args(out, train_setup, "--seed", "7")], env=_TRAIN_ENV)
        assert _train_snapshot(out) == before
    finally:
        first.send_signal(signal.SIGCONT)
    assert "Traceback" not in second.stderr
    assert 'train.py", line' not in job.stderr  # torchrun adds its own report of a failed worker, no train.py traceback
    for refused in (second, job):
        assert refused.returncode != 0
        holder = f"train.py: error: --out {out} is in use by pid {first.pid} (python"
        assert any(line.startswith(holder) and "train.py --out" in line for line in refused.stderr.splitlines()), refused.stderr
    assert first.wait(timeout=240) == 0, first.stderr.read()
    assert _train_metrics(out) == _train_metrics(reference)


def test_resume_from_an_older_checkpoint_keeps_the_newer_run_and_continues_its_own(tmp_path, train_setup, train_reference):
    """--resume of ckpt 6 in a finished run: ckpt 8, its metrics, plot and export move aside (never deleted,
    never pruned); a SIGTERM's "continue with" resumes this run's newest checkpoint; metrics and the final
    loss are those of the uninterrupted run."""
    reference, stdout = train_reference
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    proc = subprocess.Popen([sys.executable, "train.py", *_train_args(run, train_setup, "--keep-ckpts", "1",
                                                                      "--resume", str(run / "ckpt_0000006.pt"))],
                            cwd=_HERE, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**_TRAIN_ENV, "PYTHONUNBUFFERED": "1"})
    lines = []
    while not lines or lines[-1] and not lines[-1].startswith(("step 7/8", "final val loss")):  # "": the run ended
        lines.append(proc.stdout.readline())
    proc.send_signal(signal.SIGTERM)  # in the loop: it stops after step 7 or 8, with a checkpoint
    out, err = proc.communicate(timeout=120)
    out = "".join(lines) + out
    assert proc.returncode == train.INTERRUPTED and "Traceback" not in err, err
    aside = run / "after_step_6"
    assert f"the newer checkpoints (ckpt_0000008.pt) and their metrics, plot and export are kept in {aside}\n" in out
    assert (aside / "ckpt_0000008.pt").read_bytes() == Path(reference, "ckpt_0000008.pt").read_bytes()
    assert (aside / "hf" / "model.safetensors").read_bytes() == Path(reference, "hf", "model.safetensors").read_bytes()
    assert _train_metrics(aside) == [r for r in _train_metrics(reference) if r["step"] > 6]
    kept = _train_snapshot(aside)
    command = out.rpartition("continue with: ")[2].split()
    stopped = int(re.search(r"stopped by SIGTERM after step (\d+)", out)[1])
    assert command[-2:] == ["--resume", str(run / f"ckpt_{stopped:07d}.pt")]
    finished = _train_run(command[2:])
    assert _train_metrics(run) == _train_metrics(reference)
    final = re.compile(r"final val loss [\d.]+")
    assert final.search(finished.stdout)[0] == final.search(stdout)[0]
    assert _train_snapshot(aside) == kept
    assert sorted(p.name for p in run.glob("ckpt_*.pt")) == ["ckpt_0000008.pt"]  # --keep-ckpts 1 of this run's own


def test_signals_during_a_checkpoint_write_exit_130_and_leave_it_whole(tmp_path, train_setup):
    """Ctrl-C, Ctrl-C, SIGTERM, Ctrl-C while ckpt 2 is written (torch.save slowed so that they land in it):
    the write completes, then the run stops with status 130 and one line, no traceback, no temporary file."""
    out = tmp_path / "run"
    slowed = ("import runpy, sys, time, torch\n"
              "save = torch.save\n"
              "class Slow:\n"
              "    def __init__(self, f): self.f = f\n"
              "    def write(self, b): time.sleep(0.02); return self.f.write(b)\n"
              "    def flush(self): self.f.flush()\n"
              "torch.save = lambda obj, f: save(obj, Slow(f))\n"
              f"sys.argv = ['train.py', *{_train_args(out, train_setup)!r}]\n"
              "runpy.run_path('train.py', run_name='__main__')\n")
    proc = subprocess.Popen([sys.executable, "-c", slowed], cwd=_HERE, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=_TRAIN_ENV)
    tmp, deadline = out / "ckpt_0000002.pt.tmp", time.time() + 240
    while time.time() < deadline and proc.poll() is None and not tmp.exists():
        time.sleep(0.005)
    for sig in (signal.SIGINT, signal.SIGINT, signal.SIGTERM, signal.SIGINT):
        proc.send_signal(sig)
        time.sleep(0.05)
    assert tmp.exists(), "the signals did not all land during the write"
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == train.INTERRUPTED, stderr
    assert stderr.strip() == "train.py: interrupted"
    assert sorted(p.name for p in out.iterdir()) == ["ckpt_0000002.pt", "config.json", "metrics.jsonl", train.LOCK,
                                                     train.MANIFEST]
    assert train.load_checkpoint(str(out / "ckpt_0000002.pt"))["step"] == 2


@pytest.mark.parametrize("make, argv, named", [
    (lambda d: (d / "f").write_text("x"), ["--out", "{d}/f"], "--out {d}/f: exists and is not a folder"),
    (lambda d: (d / "f").write_text("x"), ["--out", "{d}/f/run"], "--out {d}/f/run: cannot write {d}/f/run: Not a directory"),
    (lambda d: (d / "f").write_text("x"), ["--data-cache", "{d}/f", "--data", "{d}/f"], "--data-cache {d}/f/"),
    (lambda d: None, ["--resume", "--overwrite"], "argument --overwrite: not allowed with --resume"),
])
def test_bad_run_folders_fail_in_one_line_naming_the_path(tmp_path, train_setup, make, argv, named):
    make(tmp_path)
    argv = [a.format(d=tmp_path) for a in argv]
    done = subprocess.run([sys.executable, "train.py", *_train_args(tmp_path / "run", train_setup), *argv], cwd=_HERE,
                          capture_output=True, text=True, timeout=120, env=_TRAIN_ENV)
    assert done.returncode in (1, 2) and "Traceback" not in done.stderr
    assert named.format(d=tmp_path) in done.stderr.strip().splitlines()[-1], done.stderr


def test_hf_export_loads_in_auto_tokenizer_and_generates_as_kimik2(train_reference):
    transformers = pytest.importorskip("transformers", reason="transformers not installed: the HF export is checked against it")
    hf = os.path.join(train_reference[0], "hf")
    tokenizer, ours = transformers.AutoTokenizer.from_pretrained(hf), data.ByteTokenizer()
    for text in ["Kimi-K2 \u00e9t\u00e9 \u65e5\u672c \U0001f389", " two  spaces\n\ttab", "nul\x00inside", "<0x41>"]:
        ids = tokenizer(text)["input_ids"]
        assert ids == ours.encode(text) and tokenizer.decode(ids) == text
    assert tokenizer.eos_token_id == ours.eos == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(hf)
    prompt = tokenizer("def main(", return_tensors="pt")["input_ids"]  # (1, 9)
    theirs = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None)[0, prompt.shape[1]:]
    mine = KimiK2.from_pretrained(hf).generate(prompt, 12, temperature=0)[0, prompt.shape[1]:]
    assert theirs.tolist() == mine.tolist()
    assert tokenizer.decode(theirs) == ours.decode(mine.tolist())


def test_wsd_schedule_warms_up_holds_then_decays_to_min_ratio():
    args = train.parse_args(["--max-steps", "100", "--warmup-steps", "10", "--decay-frac", "0.2",
                             "--lr", "1.0", "--min-lr-ratio", "0.1"])
    lrs = [train.lr_at(step, args) for step in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == 1.0  # linear warm-up to the peak
    assert all(lr == 1.0 for lr in lrs[10:80])  # constant
    assert all(a > b for a, b in zip(lrs[80:], lrs[81:]))  # cosine decay ...
    assert train.lr_at(100, args) == pytest.approx(0.1)  # ... to min_lr_ratio x peak


def test_val_seed_scores_runs_of_different_seeds_on_the_same_batches():
    """--val-seed fixes which validation batches are scored, so runs of different --seed compare on
    the same batches; without it each seed scores its own batches."""
    torch.manual_seed(0)
    model = _model_random(_model_config(), seed=0)
    val_tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, 4096).astype(np.uint16)
    setup = train.Setup(distributed=False, rank=0, world=1, device=torch.device("cpu"), dtype=torch.float32,
                        micro_batch=2)

    def val_loss(*argv):
        args = train.parse_args(["--batch-size", "2", "--seq-len", "16", "--eval-iters", "2", *argv])
        return train.estimate_val_loss(model, val_tokens, args, setup)

    assert val_loss("--seed", "1", "--val-seed", "0") == val_loss("--seed", "2", "--val-seed", "0")
    assert val_loss("--seed", "1") != val_loss("--seed", "2")
    assert val_loss("--seed", "0") == val_loss("--seed", "5", "--val-seed", "0")


# --------------------------------------------------------------------------------------------------
# Experiments: --set and --val-data


def _run_model_config(tmp_path, train_setup, *overrides):
    """The model config a one-step train.py run with these --set overrides actually trained."""
    train.main(_train_args(tmp_path, train_setup, "--max-steps", "1", "--sample-tokens", "0",
                           *[a for o in overrides for a in ("--set", o)]))
    with open(tmp_path / "config.json") as f:
        return Config(**json.load(f)["model"])


def test_set_routed_experts_keeps_activated_params_and_adds_whole_experts(tmp_path, train_setup):
    base = Config(**json.loads(train_setup[1].read_text()))
    wider = _run_model_config(tmp_path, train_setup, "n_routed_experts=16")
    assert (wider.n_routed_experts, wider.num_experts_per_tok, wider.moe_intermediate_size) == \
        (16, base.num_experts_per_tok, base.moe_intermediate_size)
    before, after = count_params(base), count_params(wider)
    added, layers, D = 16 - base.n_routed_experts, before["moe_layers"], base.hidden_size
    # each added expert: its three projections, plus its router row and bias in every MoE layer;
    # a token still runs num_experts_per_tok of them, so only the router grows what it activates
    assert after["total"] - before["total"] == layers * added * (3 * base.moe_intermediate_size * D + D + 1)
    assert after["activated"] - before["activated"] == layers * added * (D + 1)


def test_set_doubles_heads_and_keeps_every_per_head_dim(tmp_path, train_setup):
    base = Config(**json.loads(train_setup[1].read_text()))
    H = base.num_attention_heads
    doubled = _run_model_config(tmp_path, train_setup, f"num_attention_heads={2 * H}", f"num_key_value_heads={2 * H}")
    dims = ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "q_lora_rank", "kv_lora_rank", "hidden_size")
    assert doubled.num_attention_heads == 2 * H
    assert [getattr(doubled, d) for d in dims] == [getattr(base, d) for d in dims]
    # per layer and added head: a q_b_proj slice, a kv_b_proj slice and an o_proj slice
    per_head = (base.q_lora_rank * base.qk_head_dim + base.kv_lora_rank * (base.qk_nope_head_dim + base.v_head_dim)
                + base.v_head_dim * base.hidden_size)
    grown = count_params(doubled)["total"] - count_params(base)["total"]
    assert grown == base.num_hidden_layers * H * per_head


@pytest.mark.parametrize("override, named", [
    ("n_routed_expert=64", "'n_routed_expert' is not a Config field"),
    ("n_routed_experts=1.5", "Config field n_routed_experts takes int, got '1.5'"),
    ("norm_topk_prob=maybe", "Config field norm_topk_prob takes bool"),
    ("rope_scaling=[1]", "Config field rope_scaling takes dict"),
    ("routed_scaling_factor=x", "Config field routed_scaling_factor takes float"),
])
def test_set_rejects_unknown_fields_and_bad_values_naming_the_field(override, named, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--set", override])
    err = capsys.readouterr().err
    assert "argument --set" in err and named in err


def test_set_parses_values_by_field_type():
    args = train.parse_args(["--set", "q_lora_rank=none", "--set", "tie_word_embeddings=True",
                             "--set", "rope_theta=1e4", "--set", 'rope_scaling={"type": "yarn"}'])
    assert args.set == [("q_lora_rank", None), ("tie_word_embeddings", True), ("rope_theta", 1e4),
                        ("rope_scaling", {"type": "yarn"})]


def test_set_that_breaks_the_config_fails_naming_the_field(tmp_path, train_setup):
    with pytest.raises(SystemExit, match=r"--set num_attention_heads=8: Config\.num_key_value_heads"):
        train.main(_train_args(tmp_path, train_setup, "--set", "num_attention_heads=8"))


def test_val_data_is_the_whole_validation_set_and_all_of_data_trains(tmp_path, train_setup, monkeypatch):
    train_texts = [f"training document {i}: " + "the quick brown fox " * 5 for i in range(20)]
    val_texts = ["held-out one: " + "lorem ipsum dolor " * 6, "held-out two: " + "sit amet elit " * 8]
    for name, texts in (("train.jsonl", train_texts), ("val.jsonl", val_texts)):
        (tmp_path / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    seen = []

    class Recording(data.BatchSampler):
        def __init__(self, tokens, *args, **kwargs):
            seen.append(bytes(np.asarray(tokens)).split(b"\0")[:-1])  # documents, eos-separated
            super().__init__(tokens, *args, **kwargs)

    monkeypatch.setattr(train.data, "BatchSampler", Recording)
    train.main(_train_args(tmp_path / "run", train_setup, "--max-steps", "1", "--sample-tokens", "0",
                           "--data", str(tmp_path / "train.jsonl"), "--val-data", str(tmp_path / "val.jsonl")))
    trained, *evaluated = seen  # the training sampler, then one fresh sampler per evaluation
    assert sorted(trained) == sorted(t.encode() for t in train_texts)  # none held back for validation
    assert evaluated and all(sorted(v) == sorted(t.encode() for t in val_texts) for v in evaluated)


# ==================================================================================================
# Experiments: experiments/ (the README's experiments (a)-(e))
#
# The sweep summary (groups, FLOPs to a target loss, fixed validation batches) and experiment (e)'s
# corpora and scoring: what each arm trains on, what no arm trains on, and that only answer tokens
# are scored. No training runs: models are tiny and random, or stand-ins with known logits.
# ==================================================================================================

sys.path.insert(0, os.path.join(_HERE, "experiments"))
import rephrasing  # noqa: E402
import summarize  # noqa: E402


def _run_folder(folder, experts, seed, val_losses, eval_every=10):
    """A finished train.py run folder as summarize reads it, with these validation losses."""
    model = {**PRESETS["tiny"], "n_routed_experts": experts}
    folder.mkdir()
    steps = [eval_every * i for i in range(len(val_losses))]
    (folder / "config.json").write_text(json.dumps({"model": model, "seed": seed, "out": str(folder), "seq_len": 128,
                                                    "tokens_per_step": 2048, "max_steps": steps[-1], "lr": 0.01}))
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "val_loss": v}) + "\n"
                                                  for s, v in zip(steps, val_losses)))


def test_summarize_groups_seeds_and_finds_the_flops_to_reach_the_target_loss(tmp_path, capsys):
    _run_folder(tmp_path / "a0", 8, 0, [3.0, 2.1, 1.9])
    _run_folder(tmp_path / "a1", 8, 1, [3.0, 1.9, 1.7])     # group n_routed_experts=8: mean 3, 2, 1.8
    _run_folder(tmp_path / "b0", 64, 0, [3.0, 2.4, 1.2])
    _run_folder(tmp_path / "b1", 64, 1, [3.0, 2.2, 1.0])    # group 64: mean 3, 2.3, 1.1
    rows = summarize.summarize([str(tmp_path / n) for n in ("a0", "a1", "b0", "b1")])
    assert [r["label"] for r in rows] == ["n_routed_experts=8", "n_routed_experts=64"]
    assert [r["seeds"] for r in rows] == [[0, 1], [0, 1]]
    assert rows[0]["activated"] == count_params(Config(**{**PRESETS["tiny"], "n_routed_experts": 8}))["activated"]
    # target: the higher final mean loss (1.8); group 8 reaches it at step 20, group 64 at
    # step 10 + 10 * (2.3 - 1.8) / (2.3 - 1.1) by linear interpolation; same FLOPs per step
    flops_per_step = [flops_per_token(Config(**{**PRESETS["tiny"], "n_routed_experts": e}), 64.5, training=True) * 2048
                      for e in (8, 64)]
    assert rows[0]["to_target"] == pytest.approx(20 * flops_per_step[0])
    assert rows[1]["to_target"] == pytest.approx((10 + 10 * 0.5 / 1.2) * flops_per_step[1])
    table = capsys.readouterr().out
    assert "| n_routed_experts=64 | 0, 1 |" in table and "1.1000 | 1.2000, 1.0000 | -38.89%" in table


def test_flops_to_reach_interpolates_and_says_never():
    curve = [(0, 3.0), (10, 2.0), (20, 1.0)]
    assert summarize.flops_to_reach(curve, 2.5) == pytest.approx(5)
    assert summarize.flops_to_reach(curve, 1.0) == pytest.approx(20)
    assert summarize.flops_to_reach(curve, 3.5) == 0  # already below at the first evaluation
    assert summarize.flops_to_reach(curve, 0.5) is None
    assert summarize.flops_to_reach([(0, 3.0), (10, 1.0), (20, 2.0)], 1.5) == pytest.approx(7.5)  # the first crossing


def test_summarize_reports_the_fixed_batch_loss_and_refuses_a_mix(tmp_path, capsys):
    for name, seed, fixed in (("a0", 0, 1.5), ("a1", 1, 1.7)):
        _run_folder(tmp_path / name, 8, seed, [3.0, 2.0])
        (tmp_path / name / "fixed_val.json").write_text(json.dumps({"val_loss": fixed}))
    rows = summarize.summarize([str(tmp_path / "a0"), str(tmp_path / "a1")])
    assert rows[0]["finals"] == [1.5, 1.7] and rows[0]["final"] == pytest.approx(1.6)
    _run_folder(tmp_path / "a2", 8, 2, [3.0, 2.0])  # no fixed_val.json: its final loss is another measurement
    with pytest.raises(SystemExit, match="some runs of all runs have fixed_val.json"):
        summarize.summarize([str(tmp_path / n) for n in ("a0", "a1", "a2")])


def test_summarize_groups_runs_of_train_py_versions_that_differ_only_in_unset_options(tmp_path):
    """A run of an older train.py (an option since removed, left unset) and of a newer one (an
    option added, left unset) are one group; an option set in one run only tells groups apart."""
    for name, seed, extra in (("old", 0, {"plot": None}), ("new", 1, {"val_seed": None}),
                              ("other", 2, {"val_seed": 0})):
        _run_folder(tmp_path / name, 8, seed, [3.0, 2.0])
        config = json.loads((tmp_path / name / "config.json").read_text())
        (tmp_path / name / "config.json").write_text(json.dumps({**config, **extra}))
    rows = summarize.summarize([str(tmp_path / n) for n in ("old", "new", "other")])
    assert [(r["label"], r["seeds"]) for r in rows] == [("val_seed=None", [0, 1]), ("val_seed=0", [2])]


def test_summarize_refuses_an_unfinished_run(tmp_path):
    _run_folder(tmp_path / "a0", 8, 0, [3.0, 2.0])
    config = json.loads((tmp_path / "a0" / "config.json").read_text())
    (tmp_path / "a0" / "config.json").write_text(json.dumps({**config, "max_steps": 50}))
    with pytest.raises(SystemExit, match="a0 has not finished"):
        summarize.summarize([str(tmp_path / "a0")])


def test_fixed_validation_batches_do_not_depend_on_the_run_seed(tmp_path):
    """Two runs that differ only in --seed are scored on the same batches: same model, same loss."""
    (tmp_path / "val.jsonl").write_text("".join(json.dumps({"text": f"document {i}: " + "abc " * 30}) + "\n"
                                                for i in range(6)))
    config = Config(**{**PRESETS["tiny"], "num_hidden_layers": 1, "n_routed_experts": 4, "num_experts_per_tok": 2})
    torch.manual_seed(0)
    model = KimiK2(config)
    losses = []
    for seed in (0, 1):
        run = tmp_path / f"run{seed}"
        model.save_pretrained(str(run / "hf"))
        (run / "config.json").write_text(json.dumps({"seed": seed, "batch_size": 4, "seq_len": 32, "data": "x",
                                                     "val_data": [str(tmp_path / "val.jsonl")],
                                                     "data_cache": str(tmp_path / "cache")}))
        losses.append(summarize.fixed_val_loss(str(run))["val_loss"])
        assert json.loads((run / "fixed_val.json").read_text())["val_loss"] == losses[-1]
    assert losses[0] == losses[1]
    tokens = summarize.validation_tokens(json.loads((tmp_path / "run0" / "config.json").read_text()))
    sampler = data.BatchSampler(tokens, 4, 32, seed=summarize.VAL_SEED)
    batches = sampler.windows // 4
    with torch.no_grad():
        expected = sum(model.eval()(*sampler.next())[1].item() for _ in range(batches)) / batches
    assert losses[0] == pytest.approx(expected, rel=1e-6)


@pytest.fixture(scope="module")
def bios():
    return rephrasing.corpora(n_people=40, k=6, seed=3)


def _template_pattern(template):
    """A regex matching any text of a template: a full name for {name}, any fact for {value}."""
    parts = re.split(r"(\{name\}|\{value\})", template)
    return re.compile("".join({"{name}": r"[A-Z][a-z]+ [A-Z][a-z]+", "{value}": r"[^.?\n]+"}.get(p, re.escape(p))
                              for p in parts))


def test_held_out_forms_never_appear_in_any_arms_training_text(bios):
    held_out = [_template_pattern(t[rephrasing.HELD_OUT]) for t in rephrasing.BIO_TEMPLATES.values()] + \
               [_template_pattern(q[rephrasing.HELD_OUT]) for q in rephrasing.QUESTIONS.values()]
    trained = [_template_pattern(t) for ts in rephrasing.BIO_TEMPLATES.values() for t in ts[:rephrasing.REWRITE_FORMS]]
    for arm, docs in bios["texts"].items():
        text = "\n".join(docs)
        assert not any(p.search(text) for p in held_out), arm
    for name in ("qa_unseen", "bio_unseen"):
        asked = [q["prompt"] + q["answer"] for q in bios["questions"][name]]
        assert all(any(p.search(t) for p in held_out) for t in asked)
        assert not any(t in doc for t in asked for docs in bios["texts"].values() for doc in docs)
    # every training sentence of a biography is one of the trained forms
    rephrased = "\n".join(d for d in bios["texts"]["rephrased"] if not d.startswith("Q: "))
    assert sum(len(p.findall(rephrased)) for p in trained) == 40 * 5 * 6


def test_test_people_are_asked_only_about_facts_seen_in_biographies(bios):
    everyone = bios["people"]
    trained, test = {p["name"] for p in everyone[:20]}, {p["name"] for p in everyone[20:]}
    for arm, docs in bios["texts"].items():
        qa_text = "\n".join(d for d in docs if d.startswith("Q: "))
        bio_text = "\n".join(d for d in docs if not d.startswith("Q: "))
        assert not any(name in qa_text for name in test), arm  # no question about a test person trains
        assert all(name in bio_text for name in test | trained)  # every person's biography does
        for person in everyone:  # each fact is stated in the biographies k = 6 times, in every arm
            for a in rephrasing.ATTRIBUTES:
                stated = sum(bio_text.count(t.format(name=person["name"], value=person[a]))
                             for t in rephrasing.BIO_TEMPLATES[a])
                assert stated == 6, (arm, person["name"], a)
    for name in ("qa", "qa_unseen", "bio_original", "bio_unseen"):
        assert all(any(n in q["prompt"] for n in test) for q in bios["questions"][name])
    assert all(any(n in q["prompt"] for n in trained) for q in bios["questions"]["qa_seen"])
    # the one scored form a training text contains: the original biography sentences, which raw repeats
    raw = "\n".join(bios["texts"]["raw"])
    assert all(q["prompt"] + q["answer"] in raw for q in bios["questions"]["bio_original"])


def test_arms_train_on_equal_tokens_and_identical_question_pages(bios, tmp_path):
    texts = bios["texts"]
    qa_pages = {arm: [d for d in docs if d.startswith("Q: ")] for arm, docs in texts.items()}
    assert qa_pages["raw"] == qa_pages["rephrased"] == qa_pages["rephrased1"]
    assert len(qa_pages["raw"]) == len({*qa_pages["raw"]})  # no exact duplicate for data.py to drop
    sizes = {arm: sum(len(d.encode()) + 1 for d in docs) for arm, docs in texts.items()}
    assert max(sizes.values()) / min(sizes.values()) < 1.02, sizes
    for arm, docs in texts.items():
        assert len(docs) == len(set(docs)), arm
    raw_bios = [b for d in texts["raw"] if not d.startswith("Q: ") for b in d.split("\n\n")]
    rephrased_bios = [b for d in texts["rephrased"] if not d.startswith("Q: ") for b in d.split("\n\n")]
    assert len(set(raw_bios)) == 40 and len(raw_bios) == 240  # one text per person, 6 times
    assert len(set(rephrased_bios)) == 240  # 6 different texts per person, once each
    # the files train.py reads hold these documents (run() trains every arm the same number of steps)
    assert rephrasing.write_data(tmp_path, 40, 6, 3) == sizes
    assert [json.loads(line)["text"] for line in (tmp_path / "raw.jsonl").read_text().splitlines()] == texts["raw"]


class _Bigram(nn.Module):
    """A stand-in model whose logits at a position depend on that position's token only."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, ids):
        return self.table[ids], None


def test_answer_scoring_scores_exactly_the_answer_tokens():
    torch.manual_seed(0)
    table = torch.randn(256, 256)
    items = [{"prompt": "Q: Who?\nA:", "answer": " Ada."}, {"prompt": "Zofia Abbott was born in", "answer": " Lima."}]
    result = rephrasing.score(_Bigram(table), items)
    per_item = []
    for it in items:
        p, a = list(it["prompt"].encode()), list(it["answer"].encode())
        sequence = p + a
        logp = [torch.log_softmax(table[sequence[i - 1]], -1)[sequence[i]].item() for i in range(len(p), len(sequence))]
        per_item.append(-sum(logp) / len(a))
    assert result["answer_loss"] == pytest.approx(sum(per_item) / 2, rel=1e-5)
    assert result["exact_match"] == 0 and result["n"] == 2
    # make the greedy continuation of the second prompt exactly its answer: exact match 1 of 2
    sequence = list((items[1]["prompt"] + items[1]["answer"]).encode())
    for prev, nxt in zip(sequence[len(items[1]["prompt"]) - 1:], sequence[len(items[1]["prompt"]):]):
        table[prev, nxt] = 100.0
    assert rephrasing.score(_Bigram(table), items)["exact_match"] == 0.5
    # changing the prompt's own predictions changes nothing: only answer tokens are scored
    before = rephrasing.score(_Bigram(table), items)["answer_loss"]
    table[ord("Q"), ord(":")] += 5.0
    assert rephrasing.score(_Bigram(table), items)["answer_loss"] == before


def test_the_prior_reference_is_a_uniform_bet_over_the_values_spread_over_the_answer_tokens():
    city = {"attribute": "birth_city", "prompt": "Q: Where was Ada Berg born?\nA:", "answer": " Lisbon."}
    date = {"attribute": "birth_date", "prompt": "Ada Berg's birth date is", "answer": " May 1, 1950."}
    assert rephrasing.prior_answer_loss([city]) == pytest.approx(math.log(20) / 8)
    assert rephrasing.prior_answer_loss([city, date]) == pytest.approx((math.log(20) / 8 + math.log(12 * 28 * 50) / 13) / 2)
    people = rephrasing.people(200, seed=1)  # and those are the choices the people are drawn from
    assert {p["birth_city"] for p in people} <= set(rephrasing.VALUES["birth_city"]) and \
        len({p["birth_city"] for p in people}) == 20


def test_exact_match_is_greedy_decoding_and_padding_changes_no_score():
    config = Config(**{**PRESETS["tiny"], "num_hidden_layers": 2, "n_routed_experts": 4, "num_experts_per_tok": 2})
    torch.manual_seed(0)
    model = KimiK2(config).eval()
    prompt = list(b"Umar Novak works for")
    greedy = model.generate(torch.tensor([prompt]), 5, temperature=0)[0, len(prompt):].tolist()
    wrong_last = greedy[:-1] + [(greedy[-1] + 1) % 256]
    pairs = [(prompt, greedy), (prompt, wrong_last), (prompt + list(b" the company"), list(b" Lumen Optics."))]
    together = rephrasing.score_tokens(model, pairs)
    alone = [rephrasing.score_tokens(model, [pair]) for pair in pairs]
    assert [a["exact_match"] for a in alone] == [1, 0, 0] and together["exact_match"] == pytest.approx(1 / 3)
    assert together["answer_loss"] == pytest.approx(sum(a["answer_loss"] for a in alone) / 3, rel=1e-5)


if __name__ == "__main__":
    if sys.argv[1] == "model-dtensor-clip":
        _model_dtensor_clip_worker(sys.argv[2])
    elif sys.argv[1] == "model-router-bias":
        _model_router_bias_worker(sys.argv[2])
