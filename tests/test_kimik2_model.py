"""kimik2.py's multi-process behaviour, under torchrun (2 processes, gloo on CPU): QK-Clip on
FSDP2-style sharded (DTensor) weights scales only the rows each rank holds, alike in kimik2.py and
its twin in muonclip.py; the router's bias update acts on the expert loads summed over processes.

    python -m pytest tests/test_kimik2_model.py
The workers run one after the other in one torchrun launch (its start-up costs seconds) and one
process group, as `python tests/test_kimik2_model.py workers OUT`.
"""
import os
import sys

import pytest
import torch
import torch.distributed as dist

from conftest import torchrun
from kimik2 import Config, KimiK2

HERE = os.path.abspath(__file__)
pytestmark = pytest.mark.slow  # torchrun runs


def _config(**overrides) -> Config:
    """A tiny config: 3 layers (1 dense), 16 experts top-4, YaRN off."""
    return Config(**{**dict(vocab_size=61, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24,
                            kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
                            n_routed_experts=16, num_experts_per_tok=4, first_k_dense_replace=1,
                            routed_scaling_factor=2.5, rope_theta=10000.0, max_position_embeddings=256),
                     **overrides})


def _dtensor_clip_worker(out_path):
    """qk_clip_ on weights sharded over 2 ranks (rows 15 and 21: uneven shards) must equal the
    unsharded result, and so must muonclip.qk_clip_mla_ (its twin) on the same sharded weights."""
    import muonclip
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    config = _config(num_attention_heads=3, num_key_value_heads=3, qk_nope_head_dim=3, qk_rope_head_dim=2,
                     v_head_dim=4)
    torch.manual_seed(0)
    reference = KimiK2(config).model.layers[0].self_attn
    sharded = KimiK2(config).model.layers[0].self_attn
    sharded.load_state_dict(reference.state_dict())
    for name in ("q_b_proj", "kv_b_proj"):
        linear = getattr(sharded, name)
        linear.weight = torch.nn.Parameter(distribute_tensor(linear.weight.detach(), mesh, [Shard(0)]))
    twin = [distribute_tensor(getattr(reference, n).weight.detach().clone(), mesh, [Shard(0)])
            for n in ("q_b_proj", "kv_b_proj")]
    gamma = torch.tensor([0.25, 1.0, 0.64])
    muonclip.qk_clip_mla_(*twin, gamma, reference.nope, reference.rope, reference.v_dim)
    reference.qk_clip_(gamma)
    sharded.qk_clip_(gamma)
    ok = all(torch.equal(getattr(sharded, n).weight.full_tensor(), getattr(reference, n).weight)
             and torch.equal(t.full_tensor(), getattr(reference, n).weight)
             for n, t in zip(("q_b_proj", "kv_b_proj"), twin))
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            f.write("ok" if ok else "mismatch")


def _workers(out_dir):
    dist.init_process_group("gloo")  # one for both: one set up again after a teardown can read stale addresses
    _dtensor_clip_worker(os.path.join(out_dir, "dtensor-clip"))
    _router_bias_worker(out_dir)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The folder where the workers of one torchrun launch left their results."""
    out = tmp_path_factory.mktemp("two_ranks")
    run = torchrun([HERE, "workers", str(out)])
    assert run.returncode == 0, run.stderr[-2000:]
    return out


def test_qk_clip_scales_only_local_rows_of_dim0_sharded_dtensor(two_ranks):
    assert (two_ranks / "dtensor-clip").read_text() == "ok"


def _rank_loads(rank, layer, E):
    """Loads such that each rank alone would move the biases differently from the two together."""
    g = torch.Generator().manual_seed(100 * layer + rank)
    return torch.randint(0, 20, (E,), generator=g).float() + (rank == 0) * 30 * (torch.arange(E) < E // 4)


def _router_bias_worker(out_dir):
    """Each rank counts different expert loads; update_router_bias_ must act on their sum, the same
    on every rank."""
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = KimiK2(_config())
    for i, gate in enumerate(model.moe_gates()):
        gate.expert_load.copy_(_rank_loads(rank, i, gate.expert_load.numel()))
    imbalance = model.update_router_bias_(0.01)
    biases = torch.stack([gate.e_score_correction_bias for gate in model.moe_gates()])
    torch.save({"imbalance": imbalance, "biases": biases}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_router_bias_update_sums_expert_loads_over_processes(two_ranks):
    results = [torch.load(two_ranks / f"rank{r}.pt") for r in range(2)]
    torch.manual_seed(0)
    model = KimiK2(_config())
    for i, gate in enumerate(model.moe_gates()):
        E = gate.expert_load.numel()
        gate.expert_load.copy_(_rank_loads(0, i, E) + _rank_loads(1, i, E))
        alone = torch.sign(_rank_loads(0, i, E).mean() - _rank_loads(0, i, E))
        assert not torch.equal(alone, torch.sign(gate.expert_load.mean() - gate.expert_load))
    imbalance = model.update_router_bias_(0.01)
    biases = torch.stack([gate.e_score_correction_bias for gate in model.moe_gates()])
    for result in results:
        assert torch.equal(result["biases"], biases) and torch.allclose(result["imbalance"], imbalance)


if __name__ == "__main__":
    {"workers": _workers}[sys.argv[1]](sys.argv[2])
