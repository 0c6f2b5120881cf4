"""bench.py on any machine: which rows it measures from what the CPU has, the time budget that bounds a
row, and rows printed as they are measured (the table on stdout, or with --json on stderr).

    python -m pytest tests/test_bench.py

The CPU's bf16 flags are masked by replacing bench.cpu_bf16_flags, so the bf16 rows' decision is
checked both ways on whatever machine runs the tests.
"""
import json
import time

import pytest
import torch

import bench

BF16_ROWS = ("4 bf16 autocast", "MFU bf16", "NS variants, K2 shapes / 16, bfloat16")


def test_bf16_rows_are_skipped_on_a_cpu_without_bf16_instructions(monkeypatch):
    monkeypatch.setattr(bench, "cpu_bf16_flags", lambda: [])
    native, how = bench.bf16_support()
    skip = bench.rows_to_skip(native, how, cuda=False, transformers_version="5.0")
    assert not native
    assert "emulation" in skip["bf16"] and "avx512_bf16" in skip["bf16"]
    assert skip["transformers"] is None and skip["cuda"] == "no CUDA device"


@pytest.mark.parametrize("flags", [["avx512_bf16"], ["amx_bf16"], ["amx_bf16", "avx512_bf16"]])
def test_bf16_rows_are_measured_on_a_cpu_with_bf16_instructions(monkeypatch, flags):
    monkeypatch.setattr(bench, "cpu_bf16_flags", lambda: flags)
    native, how = bench.bf16_support()
    assert native and how == ", ".join(flags)
    assert bench.rows_to_skip(native, how, cuda=True, transformers_version=None) == dict(
        transformers="transformers is not installed", bf16=None, cuda=None)


@pytest.mark.parametrize("ns_dtype", [torch.float32, torch.bfloat16])
def test_without_x86_flags_bf16_is_judged_as_muonclip_judges_it(monkeypatch, ns_dtype):
    # macOS and ARM report no x86 flags: the bench follows muonclip.default_ns_dtype, which times bf16
    monkeypatch.setattr(bench, "cpu_bf16_flags", lambda: None)
    monkeypatch.setattr(bench, "default_ns_dtype", lambda device_type: ns_dtype)
    native, how = bench.bf16_support()
    assert native == (ns_dtype == torch.bfloat16) and "timed" in how


def test_a_comparison_stops_at_its_budget_with_at_least_one_timed_round():
    calls = {"a": 0, "b": 0}

    def slow(name):
        def fn():
            calls[name] += 1
            time.sleep(0.05)
        return fn
    t = bench.race({"a": slow("a"), "b": slow("b")}, reps=100, warmup=1, budget_s=0.0)
    assert calls == {"a": 2, "b": 2}                   # one warm-up round, one timed round, then the budget
    assert 0.04 < t["a"] < 1 and 0.04 < t["b"] < 1
    calls.update(a=0, b=0)
    bench.race({"a": slow("a"), "b": slow("b")}, reps=3, warmup=5, budget_s=0.0)
    assert calls == {"a": 2, "b": 2}                   # past the budget while warming up: one timed round
    calls.update(a=0, b=0)
    bench.race({"a": slow("a"), "b": slow("b")}, reps=3, warmup=2, budget_s=None)
    assert calls == {"a": 5, "b": 5}


def test_the_default_command_bounds_every_comparison():
    # `python bench.py --json --threads 1`: every race in run() gets args.budget
    args = bench.parse_args(["--json", "--threads", "1"])
    assert args.json and args.threads == 1 and 0 < args.budget <= 60


def test_rows_stream_to_stderr_with_json_and_the_object_comes_last(capsys):
    report = bench.Report(as_json=True)
    report.add("optimizer", dict(muonclip_ms=10.0, torch_muon_adamw_ms=40.0, ratio=0.25))
    out, err = capsys.readouterr()
    assert out == "" and "2 optimizer step MuonClip / torch Muon+AdamW" in err and "met" in err
    report.add("bf16", dict(skipped="bf16 on this CPU would time an emulation (none)"))
    out, err = capsys.readouterr()
    assert out == "" and "skipped: bf16 is emulated" in err and "n/a" in err
    assert report.res["targets"]["optimizer_time_ratio_vs_torch"]["met"] is True
    assert report.res["targets"]["bf16_speedup"]["met"] is None
    json.dumps(report.res)                                        # the final object is JSON


def test_rows_print_on_stdout_without_json(capsys):
    bench.Report(as_json=False).add("tracking", dict(tracked_ms=11.0, untracked_ms=10.0, overhead=0.1))
    out, err = capsys.readouterr()
    assert "3 max-logit tracking overhead" in out and "+10.0%" in out and err == ""


@pytest.mark.parametrize("with_bf16", [False, True])
def test_every_row_formats_with_and_without_bf16(with_bf16):
    # the table's lines for a result as run() stores it, bf16 measured or skipped
    skipped = dict(skipped="bf16 on this CPU would time an emulation (none)")
    ns = {"jordan": dict(ms=2.0, max_sigma_error=0.9), "gram": dict(ms=1.0, max_sigma_error=0.8)}
    wide = dict(config=bench.WIDE, fp32_ms=100.0, fwd_bwd_fp32_ms=60.0, mfu_fp32=0.3, mfu_fp32_fwd_bwd=0.5)
    if with_bf16:
        wide.update(bf16_ms=50.0, fwd_bwd_bf16_ms=30.0, bf16_speedup=2.0, fwd_bwd_bf16_speedup=2.0, mfu_bf16=0.2)
    rows = dict(
        bf16=dict(fp32_ms=2.0, bf16_ms=1.0, speedup=2.0) if with_bf16 else skipped,
        mfu=dict(flops_per_token=1.0, fp32_peak_flops=2e9, fp32_flops=1e9, fp32=0.5,
                 **(dict(bf16_peak_flops=4e9, bf16_flops=1e9, bf16=0.25) if with_bf16 else {})),
        bounds=dict(tiny=dict(matmul_share_fp32=0.5, matmul_share_bf16=0.4 if with_bf16 else None,
                              bf16_speedup_bound=2.0, mfu_fp32_bound=0.6, non_matmul_ms=5.0,
                              non_matmul_ms_for_mfu_target=1.0), wide=wide),
        ns_precision=dict(default_dtype="float32", default_ms=1.0, float32_ms=1.0,
                          **(dict(bfloat16_ms=0.5) if with_bf16 else {})),
        ns_variants=dict(float32=ns, **(dict(bfloat16=ns) if with_bf16 else {})))
    for key, value in rows.items():
        text = " ".join(v for line in bench.ROW_LINES[key](value) for v in line[:2])
        assert ("skipped" in text or "(emulated)" in text) != with_bf16, (key, text)


def test_phase_timer_counts_each_phase_without_the_phases_inside_it():
    timer = bench.PhaseTimer()
    inner = timer.wrap("inner", lambda: time.sleep(0.2))
    outer = timer.wrap("outer", lambda: (time.sleep(0.2), inner()))
    outer()
    assert timer.seconds == {}                          # off until asked
    timer.on = True
    outer()
    assert timer.seconds["inner"] >= 0.2 and 0.2 <= timer.seconds["outer"] < 0.35   # 0.4 with inner's time


def test_every_phase_names_a_function_that_exists():
    # PhaseTimer.install skips what it cannot find, so a renamed function would drop out of row 11's
    # phase table without a word
    import importlib
    for module, name, phase in bench.PHASES:
        owner = importlib.import_module(module)
        for part in name.split("."):
            owner = getattr(owner, part)
        assert callable(owner), (module, name, phase)


def test_row_11_prints_every_phase_for_1_and_2_processes():
    phases = {phase: float(i) for i, phase in enumerate(bench.PHASE_NAMES)}
    run = dict(new_ms=50.0, old_ms=90.0, alone_ms=100.0, ns_dtype="float32", phases_ms=phases, alone_phases_ms=phases)
    lines = bench.ROW_LINES["distributed"](dict(ddp=dict(run, floor_ms=60.0), fsdp=dict(run, alone_ms=80.0)))
    text = {label.strip(): value for label, value, *_ in lines}
    assert "= 0.50x" in text["11 opt step, 2 procs DDP / 1 proc (1 thread each)"]
    assert "= 0.60x" in text["DDP's floor: each share's update, nothing sent"]
    assert "50.0 / 80.0 ms = 0.62x" in text["11 opt step, 2 procs FSDP / 1 proc (1 thread each)"]   # its own launch's
    lines = bench.ROW_LINES["distributed"](dict(ddp=dict(run, cpu_ms=dict(alone=98.0, new=61.0, floor=52.0)), fsdp=run))
    assert ("   CPU ms per step and process", "1 proc 98.0; 2 procs 61.0, floor 52.0", None, None) in lines
    assert all(text[phase] == f"{i:.1f} / {i:.1f} / {i:.1f}" for i, phase in enumerate(bench.PHASE_NAMES))
