"""Tests of train.py as a program: real runs in subprocesses and in-process, on real files and signals.

Runs on CPU in float32 with tiny settings (a 2-layer, 8-expert cut of the tiny preset; a few steps of
4 x 32 tokens). Training subprocesses run with one thread each: PyTorch's multi-threaded CPU kernels
can differ in the last bit between two identical runs on a loaded machine, and exact resume is about
train.py, not about them. Comparisons of losses between two such runs are bitwise: the same kernels
run on the same inputs in the same order, which any CPU repeats.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
import train
from conftest import HERE

# Wall-clock fields of a metrics record; everything else must repeat exactly.
TIMING_KEYS = {"tokens_per_s", "mfu", "elapsed_s"}
STEPS = 8
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def train_args(out, setup, *extra, config=True):
    """A tiny CPU run: every step logged, evaluated every 3 and checkpointed every 2 steps."""
    cache, config_path = setup
    return ["--out", str(out), "--data-cache", str(cache), *(["--config", str(config_path)] if config else []),
            "--max-steps", str(STEPS), "--batch-size", "4", "--seq-len", "32", "--warmup-steps", "3",
            "--log-interval", "1", "--eval-interval", "3", "--eval-iters", "2", "--ckpt-interval", "2",
            "--sample-tokens", "8", "--dtype", "float32", "--device", "cpu", "--peak-flops", "1e9", *extra]


def run_train(args, timeout=300):
    """train.py ARGS in a subprocess, which must succeed."""
    done = subprocess.run([sys.executable, "train.py", *args], cwd=HERE, capture_output=True, text=True,
                          timeout=timeout, env=ENV)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def metrics(out, timing=False):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return records if timing else [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(data cache shared by every run of this module, model config.json)."""
    folder = tmp_path_factory.mktemp("train_setup")
    config = {**train.Config.from_preset("tiny").to_dict(), "num_hidden_layers": 2, "n_routed_experts": 8,
              "num_experts_per_tok": 2}
    (folder / "config.json").write_text(json.dumps(config))
    return folder / "data_cache", folder / "config.json"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, setup):
    """One uninterrupted single-process run that the other runs are compared with."""
    out = tmp_path_factory.mktemp("reference")
    return out, run_train(train_args(out, setup)).stdout


# --------------------------------------------------------------------------------------------------
# --init-from: a fine-tuning run starts from a checkpoint's weights, with everything else fresh


def test_init_from_starts_a_new_run_with_the_checkpoints_weights_and_fresh_state(tmp_path, setup, reference,
                                                                               monkeypatch):
    source = Path(reference[0], "ckpt_0000008.pt")
    saved = torch.load(source, weights_only=True)["model"]
    seen = {}
    build_optimizer = train.build_optimizer

    def capture(args, raw_model, *rest):  # the weights the first step will update
        seen.update({k: v.clone() for k, v in raw_model.state_dict().items()})
        return build_optimizer(args, raw_model, *rest)

    monkeypatch.setattr(train, "build_optimizer", capture)
    out = tmp_path / "finetune"
    args = train_args(out, setup, "--init-from", str(source), "--max-steps", "2", "--seed", "7", config=False)
    train.main(args)
    assert seen.keys() == saved.keys() and all(torch.equal(seen[k], saved[k]) for k in saved)  # a copy: bitwise
    config = json.loads((out / "config.json").read_text())
    assert config["init_source"] == {"path": str(source), "step": 8, **data.digest(source)}
    assert config["model"] == torch.load(source, weights_only=True)["config"]["model"]
    # step 0, the schedule's first warm-up step, and a fresh optimizer: every AdamW state counts 2 steps, not 10
    first = next(r for r in metrics(out) if "loss" in r)
    assert first["step"] == 1 and first["lr"] == train.lr_at(0, train.parse_args(args))
    ckpt = train.load_checkpoint(str(out / "ckpt_0000002.pt"))
    assert ckpt["step"] == 2 and ckpt["sampler"] != torch.load(source, weights_only=True)["sampler"]
    adam_steps = {int(s["step"]) for s in ckpt["optimizer"]["state"].values() if "step" in s}
    assert adam_steps == {2}
    assert sorted(p.name for p in out.glob("ckpt_*.pt")) == ["ckpt_0000002.pt"]


def test_init_from_evaluates_the_checkpoints_model_and_resumes_exactly_without_its_source(tmp_path, setup, reference):
    """The fine-tuning run's step-0 validation loss is the source run's at its step 8 (same weights,
    data, batches and kernels: bitwise); a resume of the fine-tuning run from its own checkpoint logs
    exactly its uninterrupted metrics, and no longer needs the source checkpoint."""
    ref_out, _ = reference
    source = tmp_path / "source" / "ckpt_0000008.pt"
    source.parent.mkdir()
    source.write_bytes(Path(ref_out, "ckpt_0000008.pt").read_bytes())
    out = tmp_path / "finetune"
    args = train_args(out, setup, "--init-from", str(source), "--max-steps", "4", config=False)
    run_train(args)
    whole = metrics(out)
    assert whole[0] == {"step": 0, "val_loss": next(r["val_loss"] for r in metrics(ref_out) if r["step"] == 8
                                                     and "val_loss" in r)}
    source.unlink()
    run_train([*args, "--resume", str(out / "ckpt_0000002.pt")])
    assert metrics(out) == whole


@pytest.mark.parametrize("extra, named", [
    (["--set", "num_hidden_layers=3"], r"--set num_hidden_layers=3: changes model\.layers\.2\.\S+ from None to \(128,\)"),
    (["--set", "moe_intermediate_size=96"], r"--set moe_intermediate_size=96: changes model\.layers\.1\.mlp\.experts"),
    (["--init-from", "/no/such/ckpt.pt"], "--init-from: no such checkpoint: /no/such/ckpt.pt"),
])
def test_init_from_refuses_what_does_not_fit_before_anything_is_built(tmp_path, setup, reference, monkeypatch,
                                                                      extra, named):
    source = str(Path(reference[0], "ckpt_0000008.pt"))

    def built(*a, **k):
        raise AssertionError("built something before the check")
    monkeypatch.setattr(train.data, "prepare", built)
    monkeypatch.setattr(train, "build_model", built)
    with pytest.raises(SystemExit, match=f"^train.py: error: {named}"):
        train.main(train_args(tmp_path / "run", setup, "--init-from", source, *extra, config=False))


def test_init_from_keeps_settable_fields_and_refuses_a_model_source_or_folder(tmp_path, setup, reference, capsys):
    source = str(Path(reference[0], "ckpt_0000008.pt"))
    for extra, named in ((["--preset", "tiny"], "argument --preset: not allowed with --init-from"),
                         (["--config", str(setup[1])], "argument --config: not allowed with --init-from")):
        with pytest.raises(SystemExit):
            train.parse_args(["--init-from", source, "--out", str(tmp_path), *extra])
        assert named in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--init-from", source])
    assert "argument --init-from: give --out" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=f"--init-from {source}: a checkpoint of --out {reference[0]} itself"):
        train.main(train_args(reference[0], setup, "--init-from", source, config=False))
    # resuming a fine-tuning run without its --init-from is named as that, not as a model difference
    out = tmp_path / "finetune"
    args = train_args(out, setup, "--init-from", source, "--max-steps", "2", "--set", "rope_theta=5000",
                      "--sample-tokens", "0", config=False)
    train.main(args)
    assert json.loads((out / "config.json").read_text())["model"]["rope_theta"] == 5000
    with pytest.raises(SystemExit, match=rf"--resume: \S+ was trained with a different --init-from \('{source}', "
                                         r"this run: None\)$"):
        train.main(train_args(out, setup, "--max-steps", "2", "--resume"))
