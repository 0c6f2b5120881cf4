"""Tests of kimik2.py: published sizes, transformers cross-checks, absorbed-cache generation,
max-logit tracking and QK-Clip, the router and its bias update, the hub layout.

Run: python -m pytest -q test_model.py   (transformers cross-checks skip when it is absent)
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from kimik2 import (PRESETS, Config, Gate, KimiK2, count_params, flops_per_token, heads_cost,
                    kv_cache_bytes_per_token, main)

_MODEL_HERE = os.path.dirname(os.path.abspath(__file__))
_MODEL_REFERENCE = os.path.join(_MODEL_HERE, "..", "shared", "reference")


def _model_config(**overrides) -> Config:
    """A random-test-sized model: 3 layers (1 dense), 16 experts top-4, YaRN off."""
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
    """Scaled pre-softmax causal logits (B, H, T, S) computed explicitly, plus v (B, H, S, Dv)."""
    B, T, _ = x.shape
    q_nope, q_rope = attn._query(x, cos, sin)  # (B, T, H, Dn), (B, T, H, Dr)
    c_kv, k_rope = attn._latent(x, cos, sin)  # (B, T, C), (B, T, Dr)
    k_nope, v = attn.kv_b_proj(c_kv).unflatten(-1, (attn.num_heads, -1)).split([attn.nope, attn.v_dim], -1)
    logits = (torch.einsum("bthd,bshd->bhts", q_nope, k_nope)
              + torch.einsum("bthr,bsr->bhts", q_rope, k_rope)) * attn.softmax_scale  # (B, H, T, S)
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    return logits.masked_fill(future, float("-inf")), v.transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# Published sizes

def test_published_parameter_counts_and_heads_cost():
    k2, v3 = count_params(Config.from_preset("kimi-k2")), count_params(Config.from_preset("deepseek-v3"))
    assert k2["total"] == 1_026_408_232_448  # the K2 checkpoint's model numbers (SPEC 1)
    assert 1.02e12 <= k2["total"] <= 1.05e12
    # convention: activated includes embedding and lm_head; published 32.6B and 37B
    assert abs(k2["activated"] / 32.6e9 - 1) < 0.03
    assert abs(k2["activated_no_input_embedding"] / 31.7e9 - 1) < 0.005  # SPEC 1: 31.7B without embedding
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


def _model_reference_tensors():
    """(name, numel) of the published K2 checkpoint's model tensors, ranges expanded."""
    path = os.path.join(_MODEL_REFERENCE, "kimi-k2-instruct.weights.tsv")
    if not os.path.exists(path):
        pytest.skip("reference tensor list absent")
    out = {}
    with open(path) as f:
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
    path = os.path.join(_MODEL_REFERENCE, "kimi-k2-instruct.config.json")
    if not os.path.exists(path):
        pytest.skip("reference config absent")
    assert Config.from_json(path) == Config.from_preset("kimi-k2")


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
])
def test_invalid_config_raises_naming_the_field(field, overrides):
    with pytest.raises(ValueError, match=field):
        _model_config(**overrides)


def test_unknown_preset_raises():
    with pytest.raises(ValueError, match="preset"):
        Config.from_preset("kimi-k3")


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


def test_save_load_round_trip_is_exact(tmp_path):
    model = _model_random(_model_config(n_group=2, topk_group=1))
    model.save_pretrained(str(tmp_path))
    loaded = KimiK2.from_pretrained(str(tmp_path))
    assert loaded.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


# ----------------------------------------------------------------------------------------------
# Generation with the absorbed latent cache

def test_absorbed_cache_logits_equal_full_forward():
    model = _model_random(_model_config(rope_scaling=_MODEL_YARN, n_group=2, topk_group=1)).eval()
    x = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(x)[0]
        caches = model.new_caches(2, 20)
        assert caches[0].shape == (2, 20, 16 + 4)  # kv_lora_rank + qk_rope_head_dim per token
        prefill = model(x[:, :13], caches=caches, start_pos=0)[0]
        steps = [model(x[:, t:t + 1], caches=caches, start_pos=t)[0] for t in range(13, 20)]
    assert (torch.cat([prefill, *steps], 1) - full).abs().max() <= 1e-4


def test_greedy_generate_follows_full_forward_argmax():
    model = _model_random(_model_config()).eval()
    prompt = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(3))
    out = model.generate(prompt, 6, temperature=0)
    assert out.shape == (2, 11) and torch.equal(out[:, :5], prompt)
    with torch.no_grad():
        assert torch.equal(model(out[:, :-1])[0][:, 4:].argmax(-1), out[:, 5:])
    sampled = model.generate(prompt, 4, temperature=0.7, top_k=3)
    assert sampled.shape == (2, 9)


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
    results = []
    for fused in (False, True):
        monkeypatch.setattr(kimik2, "fused_attention_available", lambda q, f=fused: f)
        model, attn, x, cos, sin = _model_attention_input(config, 3, 17, 0, 20.0)
        attn.train()
        chunked = attn._update_max_logits
        monkeypatch.setattr(attn, "_update_max_logits", lambda q, k: chunked(q, k, chunk_elems=3 * 4 * 17 * 5))
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


def test_model_training_forward_feeds_every_layer():
    model = _model_random(_model_config()).train()
    x = torch.randint(0, 61, (2, 12))
    model(x, x)[1].backward()
    for attn in model.attention_modules():
        assert torch.isfinite(attn.max_logits).all() and not attn.max_logits.requires_grad


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
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           os.path.abspath(__file__), "model-dtensor-clip", str(out)]
    run = subprocess.run(cmd, timeout=120, cwd=_MODEL_HERE, capture_output=True, text=True)
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
        imbalance.append(model.update_router_bias_(0.01)[0].item())
    assert (gate.expert_load == 0).all()
    assert imbalance[0] > 3.0  # skewed to start with
    assert min(imbalance[-10:]) < 0.6 * imbalance[0]


def test_expert_load_counts_training_tokens_only():
    model = _model_random(_model_config())
    x = torch.randint(0, 61, (2, 8))
    model.eval()(x)
    with torch.no_grad():
        model.train()(x)
    assert all((g.expert_load == 0).all() for g in model.moe_gates())
    model.train()(x)
    for gate in model.moe_gates():
        assert gate.expert_load.sum() == 2 * 8 * model.config.num_experts_per_tok


def test_moe_dispatch_equals_per_token_loop():
    model = _model_random(_model_config()).eval()
    moe = model.model.layers[1].mlp
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


def test_grouped_mm_and_per_expert_loop_dispatch_agree_in_values_and_grads(monkeypatch):
    """The per-expert loop (CUDA float32/float16) and the grouped matmul (CPU, bf16) compute the same."""
    import kimik2
    model = _model_random(_model_config())
    x = torch.randint(0, 61, (2, 9))
    results = []
    for grouped in (True, False):
        monkeypatch.setattr(kimik2, "grouped_mm_supported", lambda t, g=grouped: g)
        model.zero_grad()
        _, loss = model(x, x)
        loss.backward()
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
    config = _model_config(aux_loss_alpha=0.1)
    model = _model_random(config)
    x = torch.randint(0, 61, (3, 10))
    logits, loss = model.train()(x, x)
    ce = F.cross_entropy(logits.flatten(0, 1), x.flatten())
    assert loss > ce  # f_i, P_i >= 0 and sum_i f_i = E, so the balance loss is positive
    loss.backward()
    assert next(model.moe_gates()).weight.grad.abs().sum() > 0
    with torch.no_grad():
        logits, eval_loss = model.eval()(x, x)
    assert torch.allclose(eval_loss, F.cross_entropy(logits.flatten(0, 1), x.flatten()))


if __name__ == "__main__":
    if sys.argv[1] == "model-dtensor-clip":
        _model_dtensor_clip_worker(sys.argv[2])
