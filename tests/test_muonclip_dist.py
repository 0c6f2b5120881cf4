"""muonclip.py under torchrun (gloo, CPU, 2 processes): DDP and FSDP2 against one process, with
muonclip_dist.py beside it (each Newton-Schulz unit orthogonalised once across the processes) and
without it (muonclip.py copied alone: every process orthogonalises everything, said once).

    python -m pytest tests/test_muonclip_dist.py

Two torchrun launches: one of 2 processes runs every 2-process check of this file and of
test_muonclip_zero.py (two_process_results, once per pytest session; python
tests/test_muonclip_dist.py two OUT), and one runs muonclip.py copied alone, then with its companion.
Each one-process run a check compares with is computed once (_one_process).
"""
import functools
import io
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from conftest import HERE, torchrun
from muonclip import MuonClip, mark_fused, newton_schulz
from test_kimik2 import _MuonLM, _muon_mla_model, _muon_model

pytestmark = pytest.mark.slow


def _ns_batches_alike(params):
    """Whether this CPU's float32 Newton-Schulz gives every matrix of a batch bitwise what a smaller
    batch gives it, for every matrix shape (A, B) among params (a probe of 4 random matrices)."""
    gen = torch.Generator().manual_seed(0)
    for shape in {tuple(p.shape[-2:]) for p in params.values() if p.dim() >= 2}:
        g = torch.randn(4, *shape, generator=gen)
        whole = newton_schulz(g, dtype=torch.float32)
        if not all(torch.equal(whole[:k], newton_schulz(g[:k], dtype=torch.float32)) for k in (1, 2, 3)):
            return False
    return True


# ------------------------------------------------------------- with muonclip_dist.py beside it

_MUON_DIST_STEPS, _MUON_DIST_MICRO, _MUON_DIST_BATCH, _MUON_DIST_T = 2, 2, 4, 8


def _muon_wrap(raw, kind, wrap, world, ns_dtype=torch.float32):
    """raw under DDP or FSDP2 (wrap None: itself), and its MuonClip (low tau, fp32 NS)."""
    model = raw
    if wrap == "ddp":
        # broadcast_buffers=False: rank 0's max_logits would overwrite the other ranks' running max
        model = nn.parallel.DistributedDataParallel(raw, broadcast_buffers=False)
    elif wrap == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (world,))
        for layer in (raw.model.layers if kind == "mla" else raw.layers):
            fully_shard(layer, mesh=mesh)
        fully_shard(raw, mesh=mesh)
    tau = {"mha": 0.9, "mla": 4.5}[kind]                  # between the heads' initial maxima
    return model, MuonClip.for_model(raw, lr=0.02, weight_decay=0.1, qk_clip_tau=tau, ns_dtype=ns_dtype)


def _muon_train(kind, wrap=None, rank=0, world=1):
    """A few MuonClip steps (2 micro-batches each) on this rank's share of a fixed global batch;
    returns the full parameters and the number of heads clipped per step."""
    raw = _muon_model(kind, 0)
    model, opt = _muon_wrap(raw, kind, wrap, world)
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


class _MuonFusedLM(_MuonLM):
    """_MuonLM with fused residual branches: a (21, 24) weight of row blocks (5, 7, 9), which FSDP2's
    row shards (11 + 10 rows) cut inside a block, a (24, 21) weight of column blocks (10, 11), and a
    (24, 24) weight of row blocks (12, 12), one whole block in each of the 2 row shards."""

    def __init__(self):
        super().__init__()
        self.fused_in, self.fused_out = nn.Linear(24, 21, bias=False), nn.Linear(21, 24, bias=False)
        self.fused_halves = nn.Linear(24, 24, bias=False)
        mark_fused(self.fused_in, [5, 7, 9])
        mark_fused(self.fused_out, [10, 11], columns=True)   # every row shard cuts through both blocks
        mark_fused(self.fused_halves, [12, 12])

    def embed_input(self, idx):
        x = self.embed(idx)
        x = x + self.fused_out(F.gelu(self.fused_in(x)))
        return x + self.fused_halves(F.gelu(x))


_MUON_EXACT_STEPS, _MUON_EXACT_RESUME = 4, 2


def _muon_exact_model(kind, wrap, world, ns_dtype):
    torch.manual_seed(0)
    raw = _muon_mla_model(0) if kind == "mla" else _MuonFusedLM()
    return (raw, *_muon_wrap(raw, kind, wrap, world, ns_dtype))


def _muon_exact_steps(model, opt, steps):
    """Steps with the whole batch on every rank: DDP's and FSDP2's gradient mean over 2 equal
    gradients is exact, so any difference from one process is the optimizer's. Returns the number
    of matrices that went through Newton-Schulz on this rank at each step."""
    counts = []
    for step in steps:
        x = torch.randint(0, 61, (2, 8), generator=torch.Generator().manual_seed(step))
        model(x, x)[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        counts.append(opt.newton_schulz_matrices)
    return counts


def _muon_full_params(raw):
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in raw.named_parameters()}


def _muon_exact(kind, wrap=None, world=1, ns_dtype=torch.float32):
    """_MUON_EXACT_STEPS steps; then the same run resumed from a checkpoint (through bytes) taken
    after _MUON_EXACT_RESUME steps. Returns (full parameters, resumed run's, NS counts)."""
    raw, model, opt = _muon_exact_model(kind, wrap, world, ns_dtype)
    counts = _muon_exact_steps(model, opt, range(_MUON_EXACT_RESUME))
    buffer = io.BytesIO()
    torch.save({"model": raw.state_dict(), "opt": opt.state_dict()}, buffer)
    counts += _muon_exact_steps(model, opt, range(_MUON_EXACT_RESUME, _MUON_EXACT_STEPS))
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=False)
    twin_raw, twin, twin_opt = _muon_exact_model(kind, wrap, world, ns_dtype)
    twin_raw.load_state_dict(checkpoint["model"])
    twin_opt.load_state_dict(checkpoint["opt"])
    _muon_exact_steps(twin, twin_opt, range(_MUON_EXACT_RESUME, _MUON_EXACT_STEPS))
    return _muon_full_params(raw), _muon_full_params(twin_raw), counts


def _two_process_worker(out_dir):
    """Every 2-process check's runs, this file's and test_muonclip_zero.py's, in one launch."""
    import test_muonclip_zero
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    for kind in ("mha", "mla"):
        for wrap in ("ddp", "fsdp"):
            result = _muon_train(kind, wrap, rank, world)
            torch.save(result, os.path.join(out_dir, f"{kind}-{wrap}-{rank}.pt"))
            torch.save(_muon_exact(kind, wrap, world), os.path.join(out_dir, f"exact-{kind}-{wrap}-{rank}.pt"))
    for wrap in ("ddp", "fsdp"):
        torch.save(_muon_exact("mha", wrap, world, torch.bfloat16), os.path.join(out_dir, f"bf16-{wrap}-{rank}.pt"))
    test_muonclip_zero.worker(out_dir)
    dist.barrier()
    os._exit(0)  # every file is written; gloo can hang at teardown (PyTorch issue 56297)


def two_process_results(tmp_path_factory):
    """{file name: result} of the one 2-process launch (_two_process_worker), run on first use in a
    pytest session and read back by every later caller (test_muonclip_zero.py's fixture too)."""
    out = tmp_path_factory.getbasetemp() / "muonclip-two-processes"
    if not (out / "done").exists():
        out.mkdir(exist_ok=True)
        proc = torchrun([os.path.abspath(__file__), "two", str(out)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                        timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        (out / "done").write_text("")
    return {f.name: torch.load(f, weights_only=False) for f in out.glob("*.pt")}


@pytest.fixture(scope="module")
def _muon_dist_results(tmp_path_factory):
    return two_process_results(tmp_path_factory)


@functools.lru_cache(maxsize=None)
def _one_process(run, kind, ns_dtype=torch.float32):
    """The one-process run (`train` or `exact`) that checks compare with, computed once, with one
    thread as the workers (kernels may round differently per thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _muon_train(kind) if run == "train" else _muon_exact(kind, ns_dtype=ns_dtype)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("kind", ["mha", "mla"])
@pytest.mark.parametrize("wrap", ["ddp", "fsdp"])
def test_distributed_training_matches_single_process(_muon_dist_results, kind, wrap):
    (rank0, clipped0), (rank1, clipped1) = (_muon_dist_results[f"{kind}-{wrap}-{r}.pt"] for r in (0, 1))
    single, clipped = _one_process("train", kind)
    assert sum(clipped) > 0 and clipped0 == clipped1 == clipped    # clipping active, same on all ranks
    assert rank0.keys() == rank1.keys() == single.keys()
    for name in single:
        assert torch.equal(rank0[name], rank1[name]), name
        assert (rank0[name] - single[name]).abs().max() < 1e-5, name


@pytest.mark.parametrize("kind", ["mha", "mla"])
@pytest.mark.parametrize("wrap", ["ddp", "fsdp"])
def test_two_processes_orthogonalise_each_matrix_once_and_match_one_process_bitwise(_muon_dist_results, kind, wrap):
    """fp32 NS, the same batch on both ranks: after 4 steps (with QK-Clip active) both ranks' weights
    are bitwise those of one process, so each rank received every result it holds; the matrices that
    went through Newton-Schulz on the two ranks add up, at every step, to the one process's count (no
    unit twice), split between both; a run resumed from the 2-process checkpoint ends bitwise alike.
    The mha model has fused row blocks that FSDP2's row shards cut, and column blocks. Bitwise where
    this CPU's batched Newton-Schulz gives each matrix what a smaller batch gives it (an owner batches
    its own units, one process all of them: BLAS does not promise that), else within 1e-6."""
    (rank0, resumed0, counts0), (rank1, resumed1, counts1) = (
        _muon_dist_results[f"exact-{kind}-{wrap}-{r}.pt"] for r in (0, 1))
    single, single_resumed, counts = _one_process("exact", kind)
    assert rank0.keys() == single.keys()
    same = torch.equal if _ns_batches_alike(single) else (lambda a, b: (a - b).abs().max() < 1e-6)
    for name in single:
        assert torch.equal(single_resumed[name], single[name]), name
        for weights in (rank0, rank1, resumed0, resumed1):
            assert same(weights[name], single[name]), name
    assert [a + b for a, b in zip(counts0, counts1)] == counts and all(c > 0 for c in counts0 + counts1)


@pytest.mark.parametrize("wrap", ["ddp", "fsdp"])
def test_two_processes_with_bf16_newton_schulz_hold_equal_weights(_muon_dist_results, wrap):
    """bf16 NS (its results travel between ranks as bytes): both ranks end with the same weights,
    those of one process up to bf16 NS rounding (0.2 * lr * 4 steps bounds each weight's drift)."""
    (rank0, resumed0, _), (rank1, resumed1, _) = (_muon_dist_results[f"bf16-{wrap}-{r}.pt"] for r in (0, 1))
    single = _one_process("exact", "mha", torch.bfloat16)[0]
    for name in single:
        assert torch.equal(rank0[name], rank1[name]) and torch.equal(resumed0[name], rank0[name]), name
        assert (rank0[name] - single[name]).abs().max() < 0.2 * 0.02 * 4, name


# ------------------------------------------------------------------- copied alone, or with the companion

_ALONE_WORKER = """
import math, os, sys, warnings
import torch, torch.distributed as dist, torch.nn.functional as F
from torch import nn
import muonclip

class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.register_buffer("max_logits", torch.full((num_heads,), -math.inf), persistent=False)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = (p(x).view(B, T, self.num_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        muonclip.record_max_logits_(self, q, k, self.head_dim ** -0.5)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, D))

    def qk_clip_(self, gamma):
        muonclip.qk_clip_mha_(self.q_proj.weight, self.k_proj.weight, gamma, self.num_heads)

class LM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.norm = nn.Embedding(32, 16), nn.LayerNorm(16)
        self.layers = nn.ModuleList(Attention(16, 4) for _ in range(2))
        self.lm_head = nn.Linear(16, 32, bias=False)

    def forward(self, idx):
        x = self.embed(idx)
        for layer in self.layers:
            x = x + layer(x)
        return self.lm_head(self.norm(x))

def train(wrap):
    torch.manual_seed(0)
    raw = LM()
    model = raw
    if wrap == "ddp":
        model = nn.parallel.DistributedDataParallel(raw, broadcast_buffers=False)
    elif wrap == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for layer in raw.layers:
            fully_shard(layer)
        fully_shard(raw)
    opt = muonclip.MuonClip.for_model(raw, lr=0.02, weight_decay=0.1, qk_clip_tau=1.0, ns_dtype=torch.float32,
                                      distribute=wrap is not None)
    counts, clipped = [], 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):                  # the same batch on both processes: DDP's and FSDP2's mean is exact
            x = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(step))
            F.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            counts.append(opt.newton_schulz_matrices)
            clipped += int(opt.clip_stats["heads_clipped"])
    said = [str(w.message) for w in caught if "muonclip_dist.py" in str(w.message)]
    params = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach() for n, p in raw.named_parameters()}
    return params, counts, clipped, said

dist.init_process_group("gloo")
torch.set_num_threads(1)
single, single_counts, single_clipped, _ = train(None)     # distribute=False: this process alone
assert single_clipped > 0
for companion in (False, True):
    if companion:                              # from now on muonclip_dist.py imports, as if copied beside
        sys.path.append(sys.argv[1])
    for wrap in ("ddp", "fsdp"):
        params, counts, clipped, said = train(wrap)
        assert clipped == single_clipped, wrap
        assert len(said) == (0 if companion else 1), (wrap, said)
        for name in single:
            assert (params[name] - single[name]).abs().max() < 1e-6, (wrap, name)
        totals = [torch.tensor(counts)]
        dist.all_reduce(totals[0])
        if companion:                          # each unit once across the two processes
            assert totals[0].tolist() == single_counts and counts != single_counts, (wrap, counts, single_counts)
        else:                                  # every process all of them
            assert counts == single_counts, (wrap, counts, single_counts)
    assert ("muonclip_dist" in sys.modules) == companion
assert os.path.dirname(os.path.abspath(sys.modules["muonclip_dist"].__file__)) == sys.argv[1]
assert not {"muonclip_hf", "muonclip_ns", "kimik2", "test_kimik2", "data", "train", "bench"} & set(sys.modules)
assert os.path.dirname(os.path.abspath(muonclip.__file__)) == os.getcwd()
dist.barrier()
print("ok", dist.is_available(), flush=True)
os._exit(0)                                    # gloo can hang at teardown (PyTorch issue 56297)
"""


def test_copied_muonclip_is_correct_under_ddp_and_fsdp2_and_shares_out_only_with_its_companion(tmp_path):
    """muonclip.py copied alone into an empty folder (PYTHONPATH cleared) trains a model under DDP and
    FSDP2 on 2 processes to the weights of one process (within 1e-6: the same batch on both), with
    every process orthogonalising every matrix and one warning per optimizer that says so; then, in
    the same launch, with muonclip_dist.py importable (copied into a second folder put on sys.path)
    the same run shares each unit out once and says nothing."""
    folder, companion = tmp_path / "alone", tmp_path / "companion"
    folder.mkdir()
    companion.mkdir()
    shutil.copy(os.path.join(HERE, "muonclip.py"), folder)
    shutil.copy(os.path.join(HERE, "muonclip_dist.py"), companion)
    (folder / "worker.py").write_text(_ALONE_WORKER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "worker.py",
           str(companion)]
    for _ in range(2):                         # gloo may hang at exit after the work is done (conftest.torchrun)
        proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=300)
            break
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
    assert stdout.count("ok") == 2, stderr[-4000:]


if __name__ == "__main__" and sys.argv[1] == "two":
    _two_process_worker(sys.argv[2])
