"""The distributed step of muonclip.py (companion file): under torchrun, the optimizer's work shared
out among the processes.

Copied beside muonclip.py it is used without a word: MuonClip.step asks muonclip_dist.group_steps
for its (muon_step, adamw_step, share) whenever torch.distributed runs more than one process.
Without it every process orthogonalises everything (correct, said once).

- Replicated parameters (DDP): ZeRO-1 (_ShareOut; Moonlight sec. 3 keeps each process's share of the
  optimizer state alike). Each process owns a contiguous run of the Muon matrices (balanced by
  Newton-Schulz FLOPs) and of the AdamW tensors (balanced by size), runs the whole update on them
  alone (momentum, Newton-Schulz, weight decay, RMS scale; AdamW) and keeps only their state;
  all-to-alls hand every process the updated weights, each part leaving as soon as it is updated.
  state_dict() joins the shares (collective: every process calls it, as train.py does), so a
  checkpoint loads on any number of processes. A trainer that saves one process's state_dict()
  alone (transformers' Trainer under DDP) needs MuonClip(distribute="newton_schulz"): every process
  then keeps the whole state and only Newton-Schulz is shared out, as under FSDP2 below.
- FSDP2 (DTensor parameters): each process already holds only its shard of each tensor, gradient and
  state. Units (a matrix, an expert of a stack, a block of a fused weight) go to processes by greedy
  bin-packing of their Newton-Schulz FLOPs (Megatron-Core's way); the rows travel in packed
  all-to-alls (torchtitan's DistMuon): each owner receives its units' rows, each process receives
  only its shard of each result. The state stays per process (a checkpoint resumes on as many).
With float32 Newton-Schulz a run on several processes ends where one process does.
"""
import functools
import itertools
import math

import torch
import torch.distributed as dist

from muonclip import (DTensor, _full, _local_part, default_ns_dtype, muon_update, orthogonalise_by_shape,
                      rms_matching_scale)


def group_steps(optimizer):
    """(muon_step, adamw_step, share) for MuonClip.step under torchrun: the first two are f(group,
    params with a gradient), share() runs once after every group. Replicated parameters (DDP):
    ZeRO-1 (_ShareOut), each process updating its share; FSDP2's DTensors (or distribute=
    "newton_schulz"): each process steps what it holds (under FSDP2 its shards and their state), and
    orthogonalise_across_ranks brings each Newton-Schulz unit to one process."""
    if optimizer.distribute != "newton_schulz" and not any(
            isinstance(p, DTensor) for group in optimizer.param_groups for p in group["params"]):
        return _ShareOut(optimizer).steps()
    plans = {}                                    # _ExchangePlan per parameter list, built once

    def muon_step(group, params):
        dtype = group["ns_dtype"] or default_ns_dtype(params[0].device.type)
        optimizer._muon_step(group, params, functools.partial(orthogonalise_across_ranks, params=params,
                                                              dtype=dtype, plans=plans))
    return muon_step, optimizer._adamw_step, lambda: None


# ------------------------------------------------------------- ZeRO-1 for replicated parameters

def _share(t, rows):
    """The rows of t (dim 0) one process updates: all of t (rows is slice(None)) or a slice."""
    return t if rows == slice(None) else t[rows]


class _ShareOut:
    """ZeRO-1 (Moonlight sec. 3, each process keeping and updating only its share of the optimizer
    state) for replicated parameters, as under DDP: every process holds the same averaged gradients.

    Each parameter, or each matrix of an (E, A, B) stack, belongs to one process (_share_out): the
    Muon ones in contiguous runs balanced by Newton-Schulz cost, the AdamW ones balanced by size, so
    a process owns whole tensors except where a run ends inside a stack (a slice of its experts). A
    process runs the whole Muon update (muon_update: momentum, Newton-Schulz, weight decay, RMS scale)
    and AdamW (MuonClip._adamw_step) on what it owns only, and sends its updated weights to every
    other process in a few all-to-alls (_Runs), started as the parts are done and waited for in
    share(). Each process keeps the state of its share alone; state_dict() joins them into the state
    one process keeps (collective: call it on every process, as train.py does), so a checkpoint loads
    on any number of processes, and load_state_dict keeps this process's share."""

    def __init__(self, optimizer):
        self.opt, self.rank, self.world = optimizer, dist.get_rank(), dist.get_world_size()
        self.rows = {}                            # parameter -> per rank: its rows (a slice) or None
        for group in optimizer.param_groups:
            self._share_out(group)
        self.plans = {}                           # (kind, parameters) -> _Runs, built at the first step
        self.in_flight = []                       # this step's all-to-alls, until share(): receive()
        self._check_replicas()
        optimizer.register_state_dict_post_hook(self._join_state)
        optimizer.register_load_state_dict_pre_hook(self._keep_share)
        for p in list(optimizer.state):           # a state loaded before the first step is whole
            share = self._share_of_state(p, optimizer.state[p])
            if share is None:
                del optimizer.state[p]
            else:
                optimizer.state[p] = share

    def steps(self):
        return self.muon_step, self.adamw_step, self.share

    def _params(self):
        return [p for group in self.opt.param_groups for p in group["params"]]

    def _share_out(self, group):
        """Per parameter of the group, the rows each rank updates: items (a tensor, or one matrix of a
        non-fused stack) cut into `world` contiguous runs of equal cost, an item to the run its middle
        falls in."""
        items = []                                # (parameter, rows, cost)
        for p in group["params"]:
            layout = self.opt._blocks.get(id(p))
            if group["use_muon"] and p.ndim == 3 and layout is None:
                items += [(p, 1, _ns_cost(p.shape[-2:]))] * p.shape[0]
            elif group["use_muon"]:
                parts = _parts(torch.empty(p.shape, device="meta"), layout)
                items.append((p, None, sum(math.prod(q.shape[:-2]) * _ns_cost(q.shape[-2:]) for q in parts)))
            else:
                items.append((p, None, p.numel()))
        for (p, rows, _), owner in zip(items, _contiguous_runs([cost for *_, cost in items], self.world)):
            shares = self.rows.setdefault(p, [None] * self.world)
            if rows is None:
                shares[owner] = slice(None)
            else:                                 # one more matrix of a stack, after the ones before
                start = sum(s.stop - s.start for s in shares if s is not None)
                shares[owner] = slice(shares[owner].start if shares[owner] else start, start + 1)
        for p, shares in self.rows.items():
            if p.ndim == 3 and shares.count(None) == self.world - 1:
                self.rows[p] = [s if s is None else slice(None) for s in shares]   # a whole stack

    def _check_replicas(self):
        """Every process must step the same parameters (data-parallel replicas); checked once."""
        params = self._params()
        _require_replicas([len(params), sum(p.numel() for p in params)], params[0].device, self.world,
                          "parameters", "tensors", "sharing the step out")

    def muon_step(self, group, params):
        """The Muon update of this process's share, in runs (_Runs): each run's updated weights start
        travelling to the other processes while the next run is orthogonalised."""
        runs = self._runs(params, True)
        for k, run in enumerate(run[self.rank] for run in runs.runs):
            if run:
                grads = [_share(p.grad, rows) for p, rows in run]
                for (p, _), g in zip(run, grads):
                    if not self.opt.state[p]:
                        self.opt.state[p]["momentum_buffer"] = torch.zeros_like(g)
                muon_update([_share(p, rows) for p, rows in run], grads,
                            [self.opt.state[p]["momentum_buffer"] for p, _ in run], group["lr"], group["weight_decay"],
                            group["momentum"], group["nesterov"], functools.partial(self.opt._newton_schulz, group),
                            [self.opt._blocks.get(id(p)) for p, _ in run], [p.shape for p, _ in run])
            self.in_flight.append(runs.send(k))

    def adamw_step(self, group, params):
        mine = [p for p in params if self.rows[p][self.rank] is not None]
        if mine:
            self.opt._adamw_step(group, mine)
        runs = self._runs(params, False)
        self.in_flight += [runs.send(k) for k in range(len(runs.runs))]

    def share(self):
        """Every process's updated weights in place on every other: the runs' all-to-alls are waited
        for, in the order they started, and their weights copied where they belong."""
        in_flight, self.in_flight = self.in_flight, []
        for receive in in_flight:
            receive()

    def _runs(self, params, muon):
        key = (muon, *((id(p), p.dtype) for p in params))
        if key not in self.plans:
            self.plans[key] = _Runs(params, self.rows, self.rank, self.world, muon)
        return self.plans[key]

    def _share_of_state(self, p, state):
        """Of p's whole state (as one process keeps it), what this process keeps: None if it updates
        none of p, p's momentum rows of its share."""
        rows = self.rows[p][self.rank]
        if rows is None:
            return None
        buffer = state.get("momentum_buffer")
        if rows != slice(None) and buffer is not None and buffer.shape == p.shape:
            return {**state, "momentum_buffer": buffer[rows].clone()}
        return state

    def _join_state(self, optimizer, state_dict):
        """state_dict's post-hook: the processes' shares joined into one state (all-gather)."""
        everyone = [None] * self.world
        dist.all_gather_object(everyone, {i: {k: v.cpu() if torch.is_tensor(v) else v for k, v in s.items()}
                                          for i, s in state_dict["state"].items()})
        state = {}
        for i, p in enumerate(self._params()):
            for r, states in enumerate(everyone):
                if i not in states:
                    continue
                s = {k: v.to(p.device) if torch.is_tensor(v) else v for k, v in states[i].items()}
                if "momentum_buffer" in s and self.rows[p][r] != slice(None):
                    whole = state.setdefault(i, {"momentum_buffer": p.new_zeros(p.shape)})["momentum_buffer"]
                    whole[self.rows[p][r]] = s["momentum_buffer"]
                else:
                    state[i] = s
        return {**state_dict, "state": state}

    def _keep_share(self, optimizer, state_dict):
        """load_state_dict's pre-hook: of a whole state, the share this process updates."""
        params = self._params()
        shares = {i: self._share_of_state(params[int(i)], s) for i, s in state_dict["state"].items()}
        return {**state_dict, "state": {i: s for i, s in shares.items() if s is not None}}


class _Runs:
    """How _ShareOut ships one parameter list's updated weights: per dtype, each process's share (its
    (parameter, rows) pieces, in order) cut into `count` contiguous runs of about equal size, and run
    k of every process travelling in the k-th all-to-all, so a process sends each run as soon as it
    is updated (Muon: while it orthogonalises the next) and all runs are waited for at share(). Built
    once per list."""

    RUNS = 4                                      # Muon runs per dtype: transfers hidden behind the next run's work

    def __init__(self, params, rows, rank, world, pipelined):
        self.rank, self.world, self.device = rank, world, params[0].device
        self.runs, self.dtypes = [], []           # per all-to-all: per rank, its [(parameter, rows)]
        shapes = {s: i for i, s in enumerate(dict.fromkeys(tuple(p.shape[-2:]) for p in params))}
        for dtype in dict.fromkeys(p.dtype for p in params):
            # same-shape pieces side by side, so a run's Newton-Schulz stays a few batched calls
            order = sorted(range(len(params)), key=lambda i: (shapes[tuple(params[i].shape[-2:])], i))
            shares = [[(params[i], rows[params[i]][r]) for i in order
                       if params[i].dtype == dtype and rows[params[i]][r] is not None] for r in range(world)]
            count = min(self.RUNS, max(map(len, shares))) if pipelined else 1
            cut = [[[] for _ in range(count)] for _ in range(world)]
            for r, pieces in enumerate(shares):
                for piece, k in zip(pieces, _contiguous_runs([_share(p, s).numel() for p, s in pieces], count)):
                    cut[r][k].append(piece)
            kept = [k for k in range(count) if any(cut[r][k] for r in range(world))]
            self.runs += [[cut[r][k] for r in range(world)] for k in kept]
            self.dtypes += [dtype] * len(kept)
        # elements per run and rank: what each all-to-all receives from each process
        self.sizes = [[sum(_share(p, rows).numel() for p, rows in pieces) for pieces in run] for run in self.runs]

    def send(self, k):
        """Start run k's all-to-all (this process's updated pieces to every other). Returns receive():
        waits, then copies the other processes' pieces into this process's parameters."""
        run, rank = self.runs[k], self.rank
        mine = [_share(p, rows) for p, rows in run[rank]]
        sizes = [0 if r == rank else n for r, n in enumerate(self.sizes[k])]
        wait = _exchange([[] if r == rank else mine for r in range(self.world)], sizes, self.dtypes[k], self.device)

        def receive():
            for r, buffer in enumerate(wait()):
                if r != rank:
                    views = [_share(p, rows) for p, rows in run[r]]
                    for t, values in zip(views, buffer.split([t.numel() for t in views])):
                        t.copy_(values.view(t.shape))
        return receive


def _require_replicas(counts, device, world, what, unit, sharing):
    """Every rank must step the same parameters (data-parallel replicas): compare this rank's counts
    (tensors or units, elements) with every other rank's, and refuse in one line if they differ."""
    signature = torch.tensor(counts, device=device)
    everyone = [torch.empty_like(signature) for _ in range(world)]
    dist.all_gather(everyone, signature)
    if any(not torch.equal(s, signature) for s in everyone):
        raise RuntimeError(
            f"MuonClip: the processes step different {what} (({unit}, elements) per rank: "
            f"{[s.tolist() for s in everyone]}); {sharing} needs data-parallel replicas (DDP, FSDP2); "
            "for other layouts pass distribute=False")


def _parts(x, layout):
    """The independent parts of x: its layout's split, or x itself (a matrix or a stack)."""
    return layout.split(x) if layout is not None else [x]


def _flat_ranges(p, world):
    """[(lo, hi)] per rank: the positions of p's flattened full tensor that each rank holds (a
    replicated tensor: all of them on every rank; FSDP2's Shard(0): torch.chunk's rows), or None
    for placements the exchange does not read (a mesh other than the whole world in rank order)."""
    n = p.numel()
    if not isinstance(p, DTensor):
        return [(0, n)] * world
    mesh, (placement, *more) = p.device_mesh, p.placements
    if more or mesh.mesh.flatten().tolist() != list(range(world)):
        return None
    if placement.is_replicate():
        return [(0, n)] * world
    if not (placement.is_shard() and placement.dim == 0):
        return None
    rows = p.shape[0]
    chunk, row = -(-rows // world), n // max(rows, 1)
    return [(min(r * chunk, rows) * row, min((r + 1) * chunk, rows) * row) for r in range(world)]


def _assign_owners(costs, holders, world):
    """Units' NS costs onto ranks. A unit one rank holds whole (FSDP2: an expert of a stack sharded by
    experts) goes to that rank while it stays within its fair share, so its rows need not move; the
    rest by greedy bin-packing (longest first) onto the least-loaded rank. Deterministic: every rank
    computes the same assignment from the same list."""
    load, owners, fair = [0.0] * world, [-1] * len(costs), sum(costs) / world
    by_cost = sorted(range(len(costs)), key=lambda u: -costs[u])
    for u in by_cost:
        if holders[u] >= 0 and load[holders[u]] + costs[u] <= fair:
            owners[u] = holders[u]
            load[owners[u]] += costs[u]
    for u in by_cost:
        if owners[u] < 0:
            owners[u] = min(range(world), key=lambda r: (load[r], r))
            load[owners[u]] += costs[u]
    return owners


def _contiguous_runs(costs, count):
    """For items of these costs, in order, the run (0 .. count - 1) each belongs to: `count`
    contiguous runs of about equal cost, an item to the run its middle falls in."""
    total, done, runs = sum(costs) or 1, 0, []
    for cost in costs:
        runs.append(min(count - 1, int(count * (done + cost / 2) / total)))
        done += cost
    return runs


def _ns_cost(shape):
    """FLOPs of one Newton-Schulz step on an (A, B) matrix, up to a constant: m^2 (2n + m), m <= n."""
    m, n = sorted(shape)
    return m * m * (2 * n + m)


def _exchange(send, recv_sizes, dtype, device):
    """Start one all-to-all of packed buffers: send[r] (1-D tensors) goes to rank r. Returns wait():
    per source rank the 1-D buffer it sent here, once arrived (the caller may compute meanwhile). It
    travels as bytes: gloo moves no bf16 or int16."""
    size = torch.empty(0, dtype=dtype).element_size()
    pieces = [t.reshape(-1) for ts in send for t in ts]
    out = torch.empty(sum(recv_sizes), dtype=dtype, device=device)
    data = torch.cat(pieces) if pieces else out.new_empty(0)
    work = dist.all_to_all_single(out.view(torch.uint8), data.view(torch.uint8),
                                  output_split_sizes=[n * size for n in recv_sizes],
                                  input_split_sizes=[sum(t.numel() for t in ts) * size for ts in send], async_op=True)

    def wait():
        work.wait()
        return list(out.split(list(recv_sizes)))
    return wait


class _Moves:
    """dst[to] = src[frm] for fixed 1-D index tensors: as slice copies when the indices run in long
    contiguous stretches (a block of rows is one stretch), else as one indexed copy."""

    def __init__(self, to, frm):
        self.size = to.numel()
        breaks = (((to[1:] - to[:-1]) != 1) | ((frm[1:] - frm[:-1]) != 1)).nonzero().flatten() + 1
        starts, ends = [0, *breaks.tolist()], [*breaks.tolist(), self.size]
        self.runs = None
        if self.size and self.size >= 32 * len(starts):
            self.runs = [(int(to[a]), int(frm[a]), b - a) for a, b in zip(starts, ends)]
        self.to, self.frm = to, frm

    def __call__(self, dst, src):
        if self.runs is None:
            dst[self.to] = src[self.frm]
            return
        for t, f, n in self.runs:
            dst[t:t + n] = src[f:f + n]

    def packed(self, src):
        """src[frm] as a new 1-D tensor (with to = 0, 1, ...)."""
        out = src.new_empty(self.size)
        self(out, src)
        return out


class _ExchangePlan:
    """Who orthogonalises which unit, and which elements orthogonalise_across_ranks moves where, for
    one list of parameters on this rank. It depends only on shapes, layouts and placements, so it is
    built once and reused at every step (int64 indices of the sharded elements this rank holds or owns).

    Units are (tensor, part, matrix of the part, (A, B)) in the same order on every rank. A sharded
    tensor (FSDP2's Shard(0)) whose local shard is whole units this rank owns (a stack's whole
    matrices, or a whole matrix), and which no other unit of this rank touches, is `home` (FSDP2's
    experts of a stack sharded by experts): it is orthogonalised where it lies, nothing of it moved
    or copied. Other sharded tensors move by index: `local` is the concatenation of this rank's
    flattened shards of them, `owned` that of its own units' elements; replicated tensors (DDP) move
    whole units."""

    def __init__(self, params, layouts, ranges, rank, device):
        world = dist.get_world_size()
        self.gathered = [r is None for r in ranges]          # placements read whole (see _flat_ranges)
        ranges = [[(0, p.numel())] * world if r is None else r for r, p in zip(ranges, params)]
        self.units, self.sharded = [], [any(r != (0, p.numel()) for r in rs) for p, rs in zip(params, ranges)]
        self.of_tensor = [[] for _ in params]     # per tensor: its units by part, [[u, ...] per part]
        positions = {}                            # sharded tensor -> per part (matrices, A*B) flat positions
        for i, (p, layout) in enumerate(zip(params, layouts)):
            for j, part in enumerate(_parts(torch.empty(p.shape, device="meta"), layout)):
                count = math.prod(part.shape[:-2])
                self.of_tensor[i].append(list(range(len(self.units), len(self.units) + count)))
                self.units += [(i, j, k, tuple(part.shape[-2:])) for k in range(count)]
            if self.sharded[i]:
                idx = torch.arange(p.numel(), device=device).view(p.shape)
                positions[i] = [q.reshape(q.shape[:-2].numel(), -1) for q in _parts(idx, layout)]

        def held(u, r):                           # positions (in the unit) of its elements that rank r holds
            i, j, k, _ = self.units[u]
            lo, hi = ranges[i][r]
            pos = positions[i][j][k]
            return ((pos >= lo) & (pos < hi)).nonzero().flatten()
        # every rank must list the same units (data-parallel replicas); checked once per plan
        _require_replicas([len(self.units), sum(p.numel() for p in params)], device, world,
                          "Muon parameters", "units", "sharing Newton-Schulz out")
        holders = [next((r for r in range(world) if held(u, r).numel() == math.prod(self.units[u][3])), -1)
                   if self.sharded[i] else -1 for u, (i, *_) in enumerate(self.units)]   # the rank holding u whole
        self.owners = _assign_owners([_ns_cost(shape) for *_, shape in self.units], holders, world)

        def at_home(u):                           # u is not here, or here whole and this rank's
            here, size = held(u, rank).numel(), math.prod(self.units[u][3])
            return self.owners[u] == rank and here == size if here or self.owners[u] == rank else True
        # a 2-D tensor's layout reads the whole matrix: at home only if this rank holds all of it or none
        self.home = [self.sharded[i] and all(at_home(u) for us in self.of_tensor[i] for u in us) and (
            p.ndim > 2 or ranges[i][rank][1] - ranges[i][rank][0] in (0, p.numel())) for i, p in enumerate(params)]
        self.home_mine = [i for i, h in enumerate(self.home) if h and ranges[i][rank][1] > ranges[i][rank][0]]
        moved = [i for i in positions if not self.home[i]]
        base = dict(zip(moved, itertools.accumulate(
            [0] + [ranges[i][rank][1] - ranges[i][rank][0] for i in moved])))   # offset of each shard in `local`
        self.mine = [u for u, o in enumerate(self.owners) if o == rank and not self.home[self.units[u][0]]]
        owned = [u for u in self.mine if self.sharded[self.units[u][0]]]
        self.offsets = dict(zip(owned, itertools.accumulate([0] + [math.prod(self.units[u][3]) for u in owned])))
        self.owned_size = sum(math.prod(self.units[u][3]) for u in owned)

        def in_local(u, r):                       # where rank r's elements of unit u sit in its `local`
            i, j, k, _ = self.units[u]
            return base[i] + positions[i][j][k][held(u, r)] - ranges[i][r][0]
        empty = torch.empty(0, dtype=torch.long, device=device)
        cat = lambda ts: torch.cat([empty, *ts])  # noqa: E731
        sharded_units = [u for u, (i, *_) in enumerate(self.units) if self.sharded[i] and not self.home[i]]
        packed = lambda index: _Moves(torch.arange(index.numel(), device=device), index)  # noqa: E731
        unpack = lambda index: _Moves(index, torch.arange(index.numel(), device=device))  # noqa: E731
        # 1. inputs: my elements of units others own -> them; theirs of my units -> `owned`
        self.send_inputs = [packed(cat([in_local(u, rank) for u in sharded_units if self.owners[u] == r != rank]))
                            for r in range(world)]
        self.receive_inputs = [unpack(cat([self.offsets[u] + held(u, s) for u in owned]) if s != rank else empty)
                               for s in range(world)]
        own_local, own_owned = cat([in_local(u, rank) for u in owned]), cat([self.offsets[u] + held(u, rank) for u in owned])
        self.own_inputs, self.own_results = _Moves(own_owned, own_local), _Moves(own_local, own_owned)
        # 2. results: of my units, the elements each rank holds -> it; of theirs, mine -> my `local`
        self.send_results = [packed(cat([self.offsets[u] + held(u, r) for u in owned]) if r != rank else empty)
                             for r in range(world)]
        self.receive_results = [unpack(cat([in_local(u, rank) for u in sharded_units if self.owners[u] == s != rank]))
                                for s in range(world)]
        self.whole_units = [[u for u in range(len(self.units)) if self.owners[u] == s != rank
                             and not self.sharded[self.units[u][0]]] for s in range(world)]
        self.local_size = sum(ranges[i][rank][1] - ranges[i][rank][0] for i in moved)
        # a fused sharded tensor's parts carry their own scales (see orthogonalise_by_shape): per local element
        self.scales = torch.ones(self.local_size, device=device)
        for u in sharded_units:
            i, j, k, shape = self.units[u]
            if layouts[i] is not None:
                self.scales[in_local(u, rank)] = rms_matching_scale(shape)


def orthogonalise_across_ranks(inputs, layouts, ns, *, params, dtype, plans):
    """orthogonalise_by_shape for data-parallel processes: each unit (a matrix, an expert, a part of a
    fused layout) orthogonalised on exactly one rank, and each rank given the part it holds.

    Units go to ranks by _assign_owners (balanced by NS cost); a rank batches its own units by shape.
    Tensors at home on this rank (the plan's `home`: FSDP2's whole experts) are orthogonalised in
    place, last, while the second all-to-all travels. Two all-to-alls of packed buffers: under FSDP2
    (Shard(0) DTensors) the first brings each owner the rows of its units that other ranks hold, and
    the second sends each rank only its shard of every result; replicated tensors (DDP) need only the
    second, in which each rank receives the whole results it did not compute. `inputs` are this rank's
    shards of `params`; directions come back shaped like them. Other placements are gathered whole
    first (as every rank did before). `plans` caches the _ExchangePlan of each parameter list.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    key = (dtype, *((id(p), tuple(p.shape), id(layout)) for p, layout in zip(params, layouts)))
    if key not in plans:
        plans[key] = _ExchangePlan(params, layouts, [_flat_ranges(p, world) for p in params], rank, inputs[0].device)
    plan = plans[key]
    inputs = [_full(x, p) if g else x for x, p, g in zip(inputs, params, plan.gathered)]
    device = inputs[0].device
    moved = [x for x, s, h in zip(inputs, plan.sharded, plan.home) if s and not h]
    local = torch.cat([x.reshape(-1).to(dtype) for x in moved]) if moved else torch.empty(0, dtype=dtype, device=device)
    whole = [None if s else _parts(x, layout) for x, layout, s in zip(inputs, layouts, plan.sharded)]

    def unit(parts, u):                           # unit u of a replicated tensor, from its parts
        _, j, k, shape = plan.units[u]
        return parts[j].reshape(-1, *shape)[k]

    # 1. inputs to owners (only sharded tensors are not whole on their owner)
    owned = torch.empty(plan.owned_size, dtype=dtype, device=device)
    if any(plan.sharded):                         # (a collective: the same test on every rank)
        received = _exchange([[moves.packed(local)] for moves in plan.send_inputs],
                             [moves.size for moves in plan.receive_inputs], dtype, device)()
        for moves, values in zip(plan.receive_inputs, received):
            moves(owned, values)
    plan.own_inputs(owned, local)
    unit_inputs = [owned[plan.offsets[u]:plan.offsets[u] + math.prod(plan.units[u][3])].view(plan.units[u][3])
                   if plan.sharded[plan.units[u][0]] else unit(whole[plan.units[u][0]], u).to(dtype) for u in plan.mine]
    results = dict(zip(plan.mine, orthogonalise_by_shape(unit_inputs, [None] * len(unit_inputs), ns)))

    # 2. results to every rank that holds a part of them (whole for replicated tensors, else its
    # shard), while this rank orthogonalises the tensors at home
    for u in plan.offsets:
        owned[plan.offsets[u]:plan.offsets[u] + results[u].numel()] = results[u].reshape(-1)
    whole_mine = [u for u in plan.mine if not plan.sharded[plan.units[u][0]]]
    send = [[] if r == rank else [plan.send_results[r].packed(owned), *(results[u] for u in whole_mine)]
            for r in range(world)]
    sizes = [moves.size + sum(math.prod(plan.units[u][3]) for u in us)
             for moves, us in zip(plan.receive_results, plan.whole_units)]
    arrived = _exchange(send, sizes, dtype, device)
    at_home = dict(zip(plan.home_mine, orthogonalise_by_shape(
        [inputs[i] for i in plan.home_mine], [layouts[i] for i in plan.home_mine], ns)))
    directions_local = torch.empty(plan.local_size, dtype=dtype, device=device)
    plan.own_results(directions_local, owned)
    for s, buffer in enumerate(arrived()):
        if s == rank:
            continue
        n = plan.receive_results[s].size
        plan.receive_results[s](directions_local, buffer[:n])
        counts = [math.prod(plan.units[u][3]) for u in plan.whole_units[s]]
        results.update((u, b.view(plan.units[u][3])) for u, b in zip(plan.whole_units[s], buffer[n:].split(counts)))

    directions, offset = [], 0
    for i, (x, p, layout) in enumerate(zip(inputs, params, layouts)):
        if plan.home[i]:
            directions.append(at_home[i] if i in at_home else torch.empty_like(x))   # an empty shard: nothing
            continue
        if plan.sharded[i]:
            n = x.numel()
            d = directions_local[offset:offset + n].to(x.dtype)
            if layout is not None:
                d = d * plan.scales[offset:offset + n].to(x.dtype)
            directions.append(d.view(x.shape))
            offset += n
            continue
        outs = [torch.stack([results[u] for u in us]).reshape(q.shape).to(x.dtype)
                for us, q in zip(plan.of_tensor[i], whole[i])]
        d = outs[0] if layout is None else layout.join([o * rms_matching_scale(o.shape) for o in outs])
        directions.append(_local_part(d, p) if plan.gathered[i] else d)
    return directions
