"""The fast tier of the kimik2 tests: the card files' concepts (kimik2.py, muonclip.py, data.py,
train.py), each checked against an independent reference where one exists (the published Kimi-K2 /
DeepSeek-V3 numbers and tensor list, transformers' DeepseekV3ForCausalLM, torch.optim.Muon and
torch.optim.AdamW, explicit computations) and by hypothesis properties, and each card file copied
alone into an empty folder. The companions, subprocess and torchrun runs are tested in tests/.

    python -m pytest test_kimik2.py               this tier
    python -m pytest                              everything (what CI runs)
    HYPOTHESIS_PROFILE=dev python -m pytest       many more random examples, for bug hunting

Cross-checks against transformers skip when it is not installed. The published Kimi-K2 config.json
and checkpoint tensor list the model is compared with are in reference/.
"""
import copy
import inspect
import io
import json
import math
import os
import random
import re
import sys
import tempfile
import types
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings, strategies as st
from torch import nn

import bench
import data
import train
from kimik2 import (PRESETS, Config, Gate, KimiK2, count_params, flops_per_token, heads_cost,
                    kv_cache_bytes_per_token)
from muonclip import (MuonClip, causal_max_logits, find_attention_modules, fused_blocks, mark_fused, muon_update,
                      newton_schulz, qk_clip_gamma, qk_clip_mha_, record_max_logits_, rms_matching_scale, split_params)

from conftest import HERE, run_alone

_HERE = HERE


# ==================================================================================================
# Each library file copies alone
#
# kimik2.py and muonclip.py are each copied alone into an empty folder and run there in a fresh
# interpreter (that folder as working directory, PYTHONPATH unset), so nothing else of this project
# can be imported. kimik2.py carries the few lines of muonclip.py that MLA runs (and its own atomic
# writer, data.py's twin) for that; each names its twin, and a test keeps each pair equal by behaviour.
# ==================================================================================================

def test_kimik2_alone_trains_clips_generates_and_round_trips(tmp_path):
    """kimik2.py alone: a training forward and backward feed max_logits and expert_load,
    reset_step_statistics_ clears them, qk_clip_ scales the first layer's maxima by gamma on the
    same input, generate follows the full forward's argmax, and the hub files load back (safetensors
    is imported by save_pretrained, not before)."""
    script = """
import os, sys
import torch
import kimik2
torch.set_num_threads(1)
torch.manual_seed(0)
model = kimik2.KimiK2(kimik2.Config.from_preset("tiny")).train()
x = torch.randint(0, 256, (2, 16))

def training_forward():
    model.reset_step_statistics_()
    model(x[:, :-1], x[:, 1:])[1].backward()
    return torch.stack([attn.max_logits.clone() for attn in model.attention_modules()])  # (L, H)

before = training_forward()
assert torch.isfinite(before).all()
assert all(g.expert_load.sum() == 2 * 15 * model.config.num_experts_per_tok for g in model.moe_gates())
model.reset_step_statistics_()
assert all(torch.isneginf(attn.max_logits).all() for attn in model.attention_modules())
assert all((g.expert_load == 0).all() for g in model.moe_gates())
gamma = torch.tensor([1.0, 0.5, 0.25, 0.8])
for attn in model.attention_modules():
    attn.qk_clip_(gamma)
after = training_forward()  # the first layer sees the same input, so its maxima scale by gamma
assert torch.allclose(after[0], before[0] * gamma, rtol=1e-5), (after[0], before[0] * gamma)
model.eval()
out = model.generate(x[:, :4], 6, temperature=0)
with torch.no_grad():
    assert torch.equal(model(out[:, :-1])[0][:, 3:].argmax(-1), out[:, 4:])
assert "safetensors" not in sys.modules
model.save_pretrained("hub")
with torch.no_grad():
    assert torch.equal(kimik2.KimiK2.from_pretrained("hub").eval()(x)[0], model(x)[0])
"""
    assert run_alone(tmp_path, "kimik2.py", script).endswith("ok\n")


def test_twins_of_kimik2_and_muonclip_behave_alike():
    """kimik2.py carries the few lines of muonclip.py that MLA and the Gate run, so that it copies
    alone. Each says whose twin it is and computes what its twin computes on the same inputs:
    is_training_forward in every mode; causal_max_logits on MLA's shapes (T queries, the last of S
    keys; chunked or not; 16-bit q and k under bf16 autocast); MLA.qk_clip_ (qk_clip_factors applied by _scale_rows_) against
    muonclip.qk_clip_mla_ on the same weights, with and without a query LoRA, in fp32 and bf16.
    The clip is compared bitwise: both sides take the same sqrt and elementwise products, which
    IEEE rounds alike on any CPU; the max-logit matmuls differ in batch layout, which BLAS does not
    promise to round alike, hence a tolerance there."""
    import kimik2
    import muonclip
    for name in ("is_training_forward", "causal_max_logits", "_scale_rows_"):
        assert f"twin of muonclip.py's {name}" in (inspect.getcomments(inspect.unwrap(getattr(kimik2, name))) or ""), name
    assert "muonclip.py's qk_clip_mla_" in inspect.getdoc(kimik2.MLA.qk_clip_factors)
    module = nn.Linear(1, 1)
    for training, grad in [(True, True), (True, False), (False, True), (False, False)]:
        with torch.set_grad_enabled(grad):
            assert kimik2.is_training_forward(module.train(training)) == muonclip.is_training_forward(module)
    gen = torch.Generator().manual_seed(0)
    for B, H, T, S, D, chunk in [(2, 4, 7, 7, 12, None), (1, 3, 5, 9, 12, 2), (2, 2, 16, 16, 48, 3), (1, 2, 1, 6, 12, None)]:
        q, k = torch.randn(B, H, T, D, generator=gen) * 3, torch.randn(B, H, S, D, generator=gen)
        ours = kimik2.causal_max_logits(q, k, 0.3, chunk_size=chunk)
        theirs = muonclip.causal_max_logits(q, k, 0.3, chunk_size=chunk)
        assert ours.dtype == theirs.dtype == torch.float32 and torch.allclose(ours, theirs, rtol=1e-6, atol=1e-6)
        q, k = q.bfloat16(), k.bfloat16()  # under the caller's autocast both stay float32 of these q, k
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = kimik2.causal_max_logits(q, k, 0.3, chunk_size=chunk)
            theirs = muonclip.causal_max_logits(q, k, 0.3, chunk_size=chunk)
        future = torch.ones(T, S, dtype=torch.bool).triu(S - T + 1)  # key after query
        exact = ((q.double() @ k.double().mT) * 0.3).masked_fill(future, -math.inf).amax(dim=(0, 2, 3))
        assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-6) and torch.allclose(ours.double(), exact, rtol=1e-6)
    for dtype, q_lora_rank in [(torch.float32, 24), (torch.float32, None), (torch.bfloat16, 24)]:
        attn = _model_random(_model_config(q_lora_rank=q_lora_rank)).model.layers[0].self_attn.to(dtype)
        w_q = (attn.q_proj if q_lora_rank is None else attn.q_b_proj).weight
        before = w_q.detach().clone()
        theirs = w_q.detach().clone(), attn.kv_b_proj.weight.detach().clone()
        gamma = torch.tensor([0.3, 1.0, 0.7, 0.05])
        muonclip.qk_clip_mla_(*theirs, gamma, attn.nope, attn.rope, attn.v_dim)
        attn.qk_clip_(gamma)
        assert not torch.equal(w_q, before)
        assert torch.equal(w_q, theirs[0]) and torch.equal(attn.kv_b_proj.weight, theirs[1]), (dtype, q_lora_rank)
    for shape in [(12, 5), (12,), (12, 2, 3)]:
        w, factor = torch.randn(shape, generator=gen), torch.rand(12, generator=gen)
        ours, theirs = w.clone(), w.clone()
        kimik2._scale_rows_(ours, factor)
        muonclip._scale_rows_(theirs, factor)
        assert torch.equal(ours, theirs) and not torch.equal(ours, w)


def test_atomic_writers_of_kimik2_and_data_behave_alike(tmp_path, monkeypatch):
    """kimik2._write_atomically, kept so that kimik2.py copies alone, keeps data.write_atomically's
    guarantees: the bytes written; the mode of a new file under the umask; an fsync of the file and
    then of its folder (the rename made durable); and a write that fails half way leaves the old
    file as it was and no temporary file."""
    import stat
    import kimik2

    def kimik2_writer(path, write):
        def write_path(tmp):  # kimik2's writer hands over a path (safetensors' save_file wants one)
            with open(tmp, "wb") as f:
                write(f)
        kimik2._write_atomically(path, write_path)
    writers = {"kimik2": kimik2_writer, "data": lambda path, write: data.write_atomically(path, write, mode="wb")}
    synced, fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)) or fsync(fd))

    def half_then_fail(f):
        f.write(b"ne")
        raise OSError("disk full")
    for name, writer in writers.items():
        folder = tmp_path / name
        folder.mkdir()
        path = folder / "file.bin"
        old_umask = os.umask(0o027)
        try:
            synced.clear()
            writer(str(path), lambda f: f.write(b"old"))
            assert synced == [False, True], name  # the file, then its folder
            assert path.read_bytes() == b"old" and path.stat().st_mode & 0o777 == 0o640, name
            with pytest.raises(OSError, match="disk full"):
                writer(str(path), half_then_fail)
        finally:
            os.umask(old_umask)
        assert os.listdir(folder) == ["file.bin"] and path.read_bytes() == b"old", name


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


def _model_autocast_forward(monkeypatch, model, x, dtype, fused):
    """A training forward of `model` on x under CPU autocast in `dtype`, the attention forced onto
    the fused path (SDPA, max from the exact pass) or the written-out one. Returns each layer's
    float64 causal max logits (H,), computed from the q and k captured on their way into the
    attention kernel (as it received them, not recomputed from the weights)."""
    import kimik2
    monkeypatch.setattr(kimik2, "fused_attention_available", lambda q: fused)
    captured, attention = [], kimik2.MLA._attention

    def capture(self, q, k, v, track):
        captured.append((self.softmax_scale, q.detach(), k.detach()))
        return attention(self, q, k, v, track)
    monkeypatch.setattr(kimik2.MLA, "_attention", capture)
    with torch.autocast("cpu", dtype=dtype):
        model.train()(x, x)
    monkeypatch.setattr(kimik2.MLA, "_attention", attention)
    expected = []
    for scale, q, k in captured:
        assert q.dtype == k.dtype == dtype  # what the kernel received: 16-bit
        logits = (q.double() @ k.double().transpose(-2, -1)) * scale  # (B, H, T, T)
        future = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).triu(1)
        expected.append(logits.masked_fill(future, -math.inf).amax(dim=(0, 2, 3)))
    return torch.stack(expected)  # (L, H)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("fused", [False, True], ids=["written-out", "fused"])
def test_max_logits_under_autocast_are_float32_of_the_q_and_k_the_kernel_received(monkeypatch, dtype, fused):
    """Issue 25: under autocast the statistic is the float32 max of q.k for the 16-bit q and k the
    attention received, not a 16-bit logit (whose rounding, up to 2^-9 relative in bf16, could hide
    a head above tau): it equals a float64 computation from the captured q and k, on both paths."""
    model = _model_random(_model_config(), seed=5)
    with torch.no_grad():  # logits of a few units, where 16-bit rounding is ~1e-2
        for attn in model.attention_modules():
            attn.q_b_proj.weight.mul_(30.0)
    x = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(6))
    expected = _model_autocast_forward(monkeypatch, model, x, dtype, fused)
    recorded = torch.stack([attn.max_logits for attn in model.attention_modules()]).double()
    assert expected.abs().max() > 1.0
    assert torch.allclose(recorded, expected, rtol=1e-6, atol=1e-6), (recorded - expected).abs().max()


def test_bf16_autocast_head_just_above_tau_is_recorded_above_it_and_clipped(monkeypatch):
    """Issue 25's case: under bf16 autocast a head whose max logit was 3.0021 was recorded as its bf16
    rounding, 3.0, and not clipped at tau 3.0. Here the logits are scaled to at most 3 and tau is set
    to the bf16 rounding of a head's true max (the largest that rounds down, less than one bf16 step
    below it): the head is recorded at its float64 value, above tau, and a clip-only MuonClip step
    clips it."""
    model = _model_random(_model_config(), seed=5)
    x = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(6))
    first = _model_autocast_forward(monkeypatch, model, x, torch.bfloat16, fused=False)
    with torch.no_grad():  # logits scale with the query: bring the largest to about 3
        for attn in model.attention_modules():
            attn.q_b_proj.weight.mul_(3.0 / float(first.max()))
    model.reset_step_statistics_()
    expected = _model_autocast_forward(monkeypatch, model, x, torch.bfloat16, fused=False)  # (L, H)
    rounded = expected.float().bfloat16().double()  # what a bf16 logit would have recorded
    down = torch.where(rounded < expected, expected, torch.zeros_like(expected))
    assert down.max() > 0, "no head's max rounds down in bf16"
    layer, head = divmod(int(down.argmax()), expected.shape[1])
    tau = float(rounded[layer, head])
    ulp = 2.0 ** (math.floor(math.log2(tau)) - 7)  # bf16's spacing at tau
    assert 1.0 < tau < float(expected[layer, head]) < tau + ulp  # as in the issue: just above tau
    attn = model.attention_modules()[layer]
    rows = slice(head * 12, (head + 1) * 12)  # the head's q rows: Dn + Dr = 8 + 4
    before = attn.q_b_proj.weight[rows].clone()
    opt = MuonClip.for_model(model, lr=0.0, weight_decay=0.0, qk_clip_tau=tau)
    opt.step()  # no gradients: the step is the clip alone
    S = opt.clip_stats["max_logits"]
    assert float(S[layer, head]) > tau
    assert torch.allclose(S.double(), expected, rtol=1e-6, atol=1e-6)
    gamma = tau / float(S[layer, head])
    assert torch.allclose(attn.q_b_proj.weight[rows][8:], before[8:] * gamma, rtol=1e-6)  # q_rope rows
    assert torch.allclose(attn.q_b_proj.weight[rows][:8], before[:8] * math.sqrt(gamma), rtol=1e-6)  # q_nope


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
    imported (run_alone checks the project modules loaded), and transformers is blocked: muonclip.py
    needs torch only."""
    script = """
import copy, math, os, sys
sys.modules["transformers"] = None  # import transformers now fails
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
# data.py: rephrasing, tokenizer, split, sampler
#
# Tests of data.py's concepts: K2's chunk-wise rephrasing and its fidelity measures against a real
# chat-completions server on 127.0.0.1 (bench.py's fake server), the byte tokenizer, the document
# split and mixture, the exact sampler. The corpus-scale client is tested in
# tests/test_data_rephrase.py, the cache and bad input in tests/test_data.py.
# ==================================================================================================

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


def test_a_single_file_corpus_gets_validation_text_cut_from_its_end(tmp_path):
    text = "\n\n".join(f"Paragraph {i}: " + "words and more words. " * 20 for i in range(40))
    (tmp_path / "one_big.txt").write_text(text)
    info = data.prepare(tmp_path / "cache", [str(tmp_path / "one_big.txt")], val_fraction=0.1)
    tok = data.ByteTokenizer()
    train = tok.decode(data.load_tokens(info, "train").tolist()).rstrip("\0")
    val = tok.decode(data.load_tokens(info, "val").tolist()).rstrip("\0")
    assert train + val == text  # nothing lost, nothing in both
    assert val.startswith("Paragraph ") and 0.1 <= len(val) / len(text) <= 0.2  # cut at a paragraph


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
    names = [data.styles_for(data.Document("user", "d", f"text {i}"), 1)[0] for i in range(60)]
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


# ==================================================================================================
# train.py: the training loop
#
# The loop's concepts, fast and in-process: the options and their one-line errors, the WSD schedule,
# --set typed by the Config field, and validation batches fixed by --val-seed. The runs themselves
# (resume, signals, the run folder, fine-tuning, faults) are in tests/test_train.py.
# ==================================================================================================

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
