"""MuonClip's step shared out among processes (muonclip_dist.py, ZeRO-1 under DDP): each process keeps
and updates only its share of the Muon momentum and the AdamW state, and state_dict() joins the shares
into the state one process keeps, so a checkpoint moves between 1, 2 and 3 processes.

    python -m pytest tests/test_muonclip_zero.py

Two torchrun launches in all: the 2-process work runs in the one launch of 2 processes that
test_muonclip_dist.py's checks share (two_process_results), the 3-process work in one launch of its
own (python tests/test_muonclip_zero.py zero OUT CHECKPOINT). The workers train a small KimiK2 with
the whole batch on every process and rank 0's gradient taken by all (rank_0s_gradient), so every
process's gradient is one process's and any difference is the optimizer's. Weights and state are
compared with one process's to 1e-6, not bitwise: each process batches a different set of matrices
into its Newton-Schulz calls, and BLAS does not promise that a matrix's product rounds alike in every
batch. Across the processes of one run the weights are compared bitwise: the owner of each matrix
computes it and the others copy its bytes.
"""
import copy
import os
import sys

import pytest
import torch
import torch.distributed as dist

from conftest import torchrun
from test_muonclip_dist import two_process_results

STEPS, CHECKPOINT_AT = 4, 2
# 5 experts per stack, 3 layers: the runs of matrices the processes own end inside stacks
CONFIG = dict(vocab_size=61, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
              num_attention_heads=2, num_key_value_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
              qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=5, num_experts_per_tok=2, n_shared_experts=1,
              first_k_dense_replace=1, max_position_embeddings=64)


def rank_0s_gradient(state, bucket):
    """DDP communication hook: every process takes rank 0's gradient. All compute the same one here,
    and a mean of 3 equal floats is not always that float (3g / 3), so this keeps it exact."""
    return dist.broadcast(bucket.buffer(), src=0, async_op=True).get_future().then(lambda fut: fut.value()[0])


def make(world, distribute=True, fsdp=False, tau=100.0):
    """(model, what steps it, optimizer): a fresh small KimiK2 and MuonClip, under DDP (or FSDP2) on
    several processes."""
    from kimik2 import Config, KimiK2
    from muonclip import MuonClip
    torch.manual_seed(0)
    model = KimiK2(Config(**CONFIG))
    if fsdp and world > 1:                        # the layers' parameters become DTensors sharded by rows
        from torch.distributed.fsdp import fully_shard
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    opt = MuonClip.for_model(model, lr=0.02, weight_decay=0.1, qk_clip_tau=tau, ns_dtype=torch.float32,
                             distribute=distribute)
    if world == 1 or fsdp:
        return model, model, opt
    wrapped = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    wrapped.register_comm_hook(None, rank_0s_gradient)
    return model, wrapped, opt


def train(wrapped, opt, steps):
    """Returns the number of heads QK-Clip clipped at each step."""
    clipped = []
    for step in steps:
        x = torch.randint(0, CONFIG["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(step))
        wrapped(x, x)[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        clipped.append(int(opt.clip_stats["heads_clipped"]))
    return clipped


# between the heads' max logits of the first steps (about 0.017-0.021): QK-Clip clips some heads
FSDP_TAU = 0.019


def fsdp_run(world):
    """STEPS steps under FSDP2 (one process: unwrapped) with QK-Clip active: the full weights and
    the heads clipped per step."""
    model, wrapped, opt = make(world, fsdp=True, tau=FSDP_TAU)
    clipped = train(wrapped, opt, range(STEPS))
    return dict(weights={n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                         for n, p in model.named_parameters()}, clipped=clipped)


def held(opt):
    """What this process keeps: {parameter index: {state key: elements}}."""
    index = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    return {index[id(p)]: {k: v.numel() for k, v in s.items() if torch.is_tensor(v)} for p, s in opt.state.items()}


def run(world, checkpoint=None):
    """STEPS steps (or, from a checkpoint taken at CHECKPOINT_AT, the rest). Returns this process's
    weights, the joined state after CHECKPOINT_AT and after STEPS steps, and what it kept."""
    model, wrapped, opt = make(world)
    out = {}
    if checkpoint is None:
        train(wrapped, opt, range(CHECKPOINT_AT))
        out["checkpoint"] = copy.deepcopy(dict(model=model.state_dict(), opt=opt.state_dict()))  # not live views
    else:
        model.load_state_dict(checkpoint["model"])
        opt.load_state_dict(checkpoint["opt"])
    train(wrapped, opt, range(CHECKPOINT_AT, STEPS))
    out.update(weights={n: p.detach().clone() for n, p in model.named_parameters()}, held=held(opt),
               state=opt.state_dict())
    return out


def worker(out_dir, checkpoint=None):
    """Under torchrun (the process group initialised): a run from scratch, and one resumed from
    `checkpoint` (default: this run's own at CHECKPOINT_AT); on 2 processes also a run that shares
    only Newton-Schulz out, whose rank 0 saves its state_dict() alone; on 3 processes also FSDP2."""
    rank, world = dist.get_rank(), dist.get_world_size()
    fresh = run(world)
    torch.save(fresh, os.path.join(out_dir, f"run-{world}-{rank}.pt"))
    checkpoint = torch.load(checkpoint, weights_only=False) if checkpoint else copy.deepcopy(fresh["checkpoint"])
    torch.save(run(world, checkpoint), os.path.join(out_dir, f"resumed-{world}-{rank}.pt"))
    if world == 2:
        model, wrapped, opt = make(world, distribute="newton_schulz")
        train(wrapped, opt, range(STEPS))
        result = dict(weights={n: p.detach().clone() for n, p in model.named_parameters()}, held=held(opt),
                      state=opt.state_dict() if rank == 0 else None)
        torch.save(result, os.path.join(out_dir, f"ns-{world}-{rank}.pt"))
    if world == 3:
        torch.save(fsdp_run(world), os.path.join(out_dir, f"fsdp-{world}-{rank}.pt"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process in this interpreter; 2 processes (a run, and one resumed from its own checkpoint);
    3 processes (a run, and one resumed from the 2 processes' checkpoint); one process resumed from
    the 3 processes' checkpoint."""
    out = tmp_path_factory.mktemp("zero")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = {"run-1-0": run(1), "fsdp-1-0": fsdp_run(1)}
        results.update((name.removesuffix(".pt"), r) for name, r in two_process_results(tmp_path_factory).items()
                       if name.startswith(("run-", "resumed-", "ns-")))
        torch.save(results["run-2-0"]["checkpoint"], out / "ckpt-2.pt")
        done = torchrun([os.path.abspath(__file__), "zero", str(out), str(out / "ckpt-2.pt")],
                        env={**os.environ, "OMP_NUM_THREADS": "1"}, nproc=3)
        assert done.returncode == 0, done.stderr[-4000:]
        results.update({f.stem: torch.load(f, weights_only=False) for f in out.glob("*-3-*.pt")})
        results["resumed-1-0"] = run(1, copy.deepcopy(results["run-3-0"]["checkpoint"]))  # loading aliases it
    finally:
        torch.set_num_threads(threads)
    return results


def assert_close_states(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i, s in a["state"].items():
        assert s.keys() == b["state"][i].keys(), i
        for k, v in s.items():
            if torch.is_tensor(v):
                assert v.shape == b["state"][i][k].shape and (v - b["state"][i][k]).abs().max() <= 1e-6, (i, k)
            else:
                assert v == b["state"][i][k], (i, k)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_the_shared_out_state_joins_into_one_processs_state(runs, world):
    single = runs["run-1-0"]
    for rank in range(world):
        r = runs[f"run-{world}-{rank}"]
        assert_close_states(r["checkpoint"]["opt"], single["checkpoint"]["opt"])
        assert_close_states(r["state"], single["state"])
        for name, w in single["weights"].items():
            assert torch.equal(r["weights"][name], runs[f"run-{world}-0"]["weights"][name]), name
            assert (r["weights"][name] - w).abs().max() <= 1e-6, name


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_each_process_keeps_only_its_share_of_the_state(runs, world):
    """Every AdamW parameter's state on exactly one process; the Muon momentum split with no element
    kept twice (a stack may be cut between processes, the only tensors two processes share)."""
    single = runs["run-1-0"]["held"]
    shares = [runs[f"run-{world}-{rank}"]["held"] for rank in range(world)]
    assert all(len(s) < len(single) for s in shares)
    for i, state in single.items():
        for key, n in state.items():
            assert sum(s.get(i, {}).get(key, 0) for s in shares) == n, (i, key)
        if "exp_avg" in state:
            assert sum(i in s for s in shares) == 1, i


@pytest.mark.slow
@pytest.mark.parametrize("resumed", ["resumed-2-0", "resumed-2-1", "resumed-3-0", "resumed-3-1", "resumed-3-2",
                                     "resumed-1-0"])
def test_a_checkpoint_resumes_on_1_2_and_3_processes(runs, resumed):
    """2 processes' checkpoint resumed on 2 and on 3, 3 processes' on 1: each ends where one process
    does, its shares of the state joined into one process's."""
    single = runs["run-1-0"]
    assert_close_states(runs[resumed]["state"], single["state"])
    for name, w in single["weights"].items():
        assert (runs[resumed]["weights"][name] - w).abs().max() <= 1e-6, name


@pytest.mark.slow
def test_fsdp2_on_3_processes_ends_where_one_process_does(runs):
    """FSDP2 on 3 processes (rows of every matrix split 3 ways, 5 experts per stack as 2 + 2 + 1:
    each process orthogonalises its whole experts where they lie and shares out the split matrices),
    QK-Clip scaling each process's own rows: the same heads clipped at every step as on one process,
    every process's full weights equal, and within 1e-6 of one process's (FSDP2 averages 3 equal
    gradients, which need not round back to the gradient)."""
    single = runs["fsdp-1-0"]
    assert sum(single["clipped"]) > 0
    for rank in range(3):
        r = runs[f"fsdp-3-{rank}"]
        assert r["clipped"] == single["clipped"]
        for name, w in single["weights"].items():
            assert torch.equal(r["weights"][name], runs["fsdp-3-0"]["weights"][name]), name
            assert (r["weights"][name] - w).abs().max() <= 1e-6, name


@pytest.mark.slow
def test_sharing_only_newton_schulz_keeps_the_whole_state_on_every_process(runs):
    """distribute="newton_schulz" (for trainers that save one process's state): each process keeps
    all of it, and rank 0's state_dict() alone (no collective, else the run would hang) is whole."""
    single = runs["run-1-0"]
    for rank in (0, 1):
        r = runs[f"ns-2-{rank}"]
        assert r["held"] == single["held"]
        for name, w in single["weights"].items():
            assert torch.equal(r["weights"][name], runs["ns-2-0"]["weights"][name]), name
            assert (r["weights"][name] - w).abs().max() <= 1e-6, name
    assert_close_states(runs["ns-2-0"]["state"], single["state"])


if __name__ == "__main__" and sys.argv[1] == "zero":
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    worker(*sys.argv[2:])
    dist.barrier()
    os._exit(0)  # every file is written; gloo can hang at teardown (PyTorch issue 56297)
