"""Tests of train.py: exact resume after SIGKILL, atomic checkpoints, DDP / FSDP2 against one process,
gradient accumulation, non-finite steps, and errors that name the bad option or file.

Runs on CPU in float32 with tiny settings (a 2-layer, 8-expert cut of the tiny preset; 8 steps of
4 x 32 tokens). Training subprocesses run with one thread each: PyTorch's multi-threaded CPU kernels
can differ in the last bit between two identical runs on a loaded machine, and exact resume is about
train.py, not about them.
"""
import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import train

_TRAIN_DIR = os.path.dirname(os.path.abspath(__file__))
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
    launcher = [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone"]
    done = subprocess.run(launcher + ["train.py", *args], cwd=_TRAIN_DIR, capture_output=True, text=True,
                          timeout=timeout, env=_TRAIN_ENV)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


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
    stdout = _train_run(_train_args(out, train_setup))
    return out, stdout


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
    assert "final val loss" in stdout and "unigram entropy" in stdout


def test_resume_after_sigkill_logs_exactly_the_uninterrupted_metrics(tmp_path, train_setup, train_reference):
    reference, _ = train_reference
    kill_after = random.Random(5).randint(3, _TRAIN_STEPS - 1)  # an arbitrary step between checkpoints
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "train.py", *_train_args(out, train_setup)], cwd=_TRAIN_DIR,
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
    _train_run(_train_args(out, train_setup, "--resume"))
    assert _train_metrics(out) == _train_metrics(reference)


def test_checkpoint_is_never_half_written(tmp_path, monkeypatch):
    first = {"step": 1, "model": {"w": torch.ones(3)}}
    good = train.save_checkpoint(first, str(tmp_path), keep=2)

    def torch_save_killed_midway(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # the process dies while writing

    monkeypatch.setattr(torch, "save", torch_save_killed_midway)
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint({"step": 2, "model": {"w": torch.zeros(3)}}, str(tmp_path), keep=2)
    assert glob.glob(str(tmp_path / "ckpt_*.pt")) == [good]
    assert torch.equal(torch.load(good, weights_only=True)["model"]["w"], torch.ones(3))


def test_checkpoints_beyond_keep_are_removed(tmp_path):
    for step in range(1, 5):
        train.save_checkpoint({"step": step}, str(tmp_path), keep=2)
    assert sorted(os.listdir(tmp_path)) == ["ckpt_0000003.pt", "ckpt_0000004.pt"]


@pytest.mark.parametrize("mode", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_two_processes_with_accumulation_match_one_process(tmp_path, train_setup, train_reference, mode):
    """2 ranks x 2 micro-steps x 1 sequence is the reference's global batch of 4: same loss curve."""
    reference, _ = train_reference
    _train_run(_train_args(tmp_path, train_setup, "--grad-accum", "2", *mode), nproc=2)
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
    with pytest.raises(SystemExit, match=f"cannot read checkpoint {bad}"):
        train.main(_train_args(tmp_path, train_setup, "--resume", str(bad)))


def test_resume_with_incompatible_config_fails_naming_the_option(tmp_path, train_setup, train_reference):
    reference, _ = train_reference
    ckpt = sorted(glob.glob(os.path.join(reference, "ckpt_*.pt")))[-1]
    with pytest.raises(SystemExit, match=r"different --seq-len \(32, this run: 16\)"):
        train.main(_train_args(tmp_path, train_setup, "--seq-len", "16", "--resume", ckpt))
    with pytest.raises(SystemExit, match="different --optimizer"):
        train.main(_train_args(tmp_path, train_setup, "--optimizer", "adamw", "--resume", ckpt))


def test_wsd_schedule_warms_up_holds_then_decays_to_min_ratio():
    args = train.parse_args(["--max-steps", "100", "--warmup-steps", "10", "--decay-frac", "0.2",
                             "--lr", "1.0", "--min-lr-ratio", "0.1"])
    lrs = [train.lr_at(step, args) for step in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == 1.0  # linear warm-up to the peak
    assert all(lr == 1.0 for lr in lrs[10:80])  # constant
    assert all(a > b for a, b in zip(lrs[80:], lrs[81:]))  # cosine decay ...
    assert train.lr_at(100, args) == pytest.approx(0.1)  # ... to min_lr_ratio x peak
