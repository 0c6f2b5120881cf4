"""Tests of train.py and train_run.py as programs: real runs, in subprocesses and in-process, on real
files, processes and signals. Resume after SIGKILL, SIGINT, SIGTERM and SIGHUP, atomic and verified
checkpoints, a full disk, runs never lost to a rerun, checks before anything is built or written,
DDP / FSDP2 against one process, gradient accumulation, divergence, the hf/ export, fine-tuning
(--init-from), the run folder's invariants (train_run.py's docstring) and a fault-injection run.

Runs on CPU in float32 with tiny settings (a 2-layer, 8-expert cut of the tiny preset; 8 steps of
4 x 32 tokens). Training subprocesses run with one thread each, and so do the in-process runs compared
with them: PyTorch's multi-threaded CPU kernels can differ in the last bit between two identical runs on
a loaded machine, and exact resume is about train.py, not about them. Metrics of two such runs are
compared bitwise: the same kernels run on the same inputs in the same order, which any CPU repeats.
Process start-ups (torch's import, torchrun's rendezvous) are most of a tiny run's time: a test runs
in this process wherever a subprocess proves nothing more, and the two-process runs share one launch.
"""
import errno
import importlib.util
import glob
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

import data
import train
import train_run
from conftest import HERE, run_alone, torchrun
from kimik2 import Config, KimiK2, count_params

pytestmark = pytest.mark.slow

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
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


def train_metrics(out, timing=False):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return records if timing else [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def train_losses(out):
    return [(r["step"], r["loss"] if "loss" in r else r["val_loss"]) for r in train_metrics(out)]


@pytest.fixture(scope="module")
def train_setup(tmp_path_factory):
    """(data cache shared by every run of this module, model config.json)."""
    folder = tmp_path_factory.mktemp("train_setup")
    config = {**Config.from_preset("tiny").to_dict(), "num_hidden_layers": 2, "n_routed_experts": 8,
              "num_experts_per_tok": 2}
    (folder / "config.json").write_text(json.dumps(config))
    return folder / "data_cache", folder / "config.json"


@pytest.fixture(scope="module")
def train_reference(tmp_path_factory, train_setup):
    """One uninterrupted single-process run that the other runs are compared with."""
    out = tmp_path_factory.mktemp("reference")
    return out, run_train(train_args(out, train_setup)).stdout


PLOT_METRICS = train_run.plot_metrics


@pytest.fixture(autouse=True)
def no_plot(monkeypatch):
    """In-process runs here skip drawing plot.png (about a second a run, the slowest part of a tiny
    run): the subprocess runs draw it, and the tests that look at it ask for `plot`."""
    monkeypatch.setattr(train_run, "plot_metrics", lambda records, tau, folder: None)


@pytest.fixture
def plot(monkeypatch):
    monkeypatch.setattr(train_run, "plot_metrics", PLOT_METRICS)


@pytest.fixture
def one_thread():
    """An in-process run compared bitwise with a subprocess run (OMP_NUM_THREADS=1): one thread, so
    that the same kernels run on the same inputs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_run_folder_holds_config_metrics_checkpoints_export(train_reference):
    out, stdout = train_reference
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["model"]["num_hidden_layers"] == 2 and config["batch_size"] == 4
    records = train_metrics(out, timing=True)
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == list(range(1, STEPS + 1))
    assert [r["step"] for r in records if "val_loss" in r] == [0, 3, 6, STEPS]
    assert all(r["tokens_per_s"] > 0 and r["mfu"] > 0 for r in train_records)
    assert train_records[-1]["loss"] < train_records[0]["loss"]
    ckpts = sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, "ckpt_*.pt")))
    assert ckpts == ["ckpt_0000006.pt", "ckpt_0000008.pt"]  # the last --keep-ckpts 2
    assert os.path.exists(os.path.join(out, "hf", "config.json"))
    # the manifest lists every file of the run, and nothing else
    written = {str(p.relative_to(out)) for p in Path(out).rglob("*") if p.is_file()} - {train_run.MANIFEST, train_run.LOCK}
    manifest = json.loads((Path(out) / train_run.MANIFEST).read_text())
    assert set(manifest["files"]) == written
    # each with the length and SHA-256 of what was written (metrics.jsonl, appended, through the checkpoints)
    assert all(manifest["files"][name] == data.digest(Path(out, name)) for name in written - {"metrics.jsonl"})
    assert os.path.exists(os.path.join(out, "plot.png")) == HAVE_MATPLOTLIB
    assert (Path(out) / train_run.LOCK).read_text() == ""  # an orderly end lets go of the lock and its line
    assert "final val loss" in stdout and "unigram entropy" in stdout


def test_checkpoint_is_never_half_written(tmp_path, monkeypatch):
    first = {"step": 1, "model": {"w": torch.ones(3)}}
    good = train_run.save_checkpoint(first, train_run.RunFolder(str(tmp_path)), keep=2)

    def torch_save_killed_midway(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # the process dies while writing

    monkeypatch.setattr(torch, "save", torch_save_killed_midway)
    with pytest.raises(KeyboardInterrupt):
        train_run.save_checkpoint({"step": 2, "model": {"w": torch.zeros(3)}}, train_run.RunFolder(str(tmp_path)), keep=2)
    assert glob.glob(str(tmp_path / "ckpt_*.pt")) == [good]
    assert torch.equal(torch.load(good, weights_only=True)["model"]["w"], torch.ones(3))


def test_checkpoints_beyond_keep_are_removed_and_only_those_train_py_wrote(tmp_path):
    users = tmp_path / "ckpt_0000000.pt"  # named like a checkpoint, but not written by this run
    users.write_bytes(b"the user's own")
    folder = train_run.RunFolder(str(tmp_path))
    for step in range(1, 5):
        train_run.save_checkpoint({"step": step}, folder, keep=2)
    assert sorted(os.listdir(tmp_path)) == ["ckpt_0000000.pt", "ckpt_0000003.pt", "ckpt_0000004.pt", train_run.MANIFEST]
    assert users.read_bytes() == b"the user's own"
    assert sorted(json.loads((tmp_path / train_run.MANIFEST).read_text())["files"]) == ["ckpt_0000003.pt", "ckpt_0000004.pt"]


def _two_processes_worker(folder, cache, config):
    """Under torchrun (2 ranks, OMP_NUM_THREADS=1): DDP, then FSDP2, each with 2 micro-steps, each run
    then resumed in a copy of its folder from which its last checkpoint is removed. One launch serves
    both tests, in one process group: one set up again after a teardown can read the stale addresses
    that the last one left in torchrun's store, so train.main's set-up and teardown are skipped here."""
    train_run.plot_metrics = lambda records, tau, folder: None  # plot.png: see `no_plot`
    dist.init_process_group("gloo")
    destroy, dist.init_process_group = dist.destroy_process_group, lambda *args, **kwargs: None
    dist.destroy_process_group = dist.barrier
    folder = Path(folder) / os.environ["TORCHELASTIC_RUN_ID"]  # a fresh folder if torchrun tries again
    for mode in ("ddp", "fsdp"):
        run, again = folder / mode, folder / f"{mode}-resumed"
        argv = ["--grad-accum", "2", *(["--fsdp"] if mode == "fsdp" else [])]
        train.main(train_args(run, (cache, config), *argv))
        if os.environ["RANK"] == "0":
            shutil.copytree(run, again)
            os.remove(again / "ckpt_0000008.pt")
        dist.barrier()
        train.main(train_args(again, (cache, config), *argv, "--resume"))
    if os.environ["RANK"] == "0":
        (folder / "done").touch()
    dist.barrier()  # drain gloo before the process group goes (see train.py)
    destroy()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, train_setup):
    """(the folder of the DDP and FSDP2 runs and their resumes, torchrun's stderr)."""
    folder = tmp_path_factory.mktemp("two_processes")
    done = torchrun([os.path.relpath(__file__, HERE), "two-processes", str(folder), *map(str, train_setup)],
                    env=ENV, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return next(p for p in folder.iterdir() if (p / "done").exists()), done.stderr


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_with_accumulation_match_one_process(two_processes, train_reference, mode):
    """2 ranks x 2 micro-steps x 1 sequence is the reference's global batch of 4: same loss curve."""
    reference, _ = train_reference
    folder, stderr = two_processes
    assert "FutureWarning" not in stderr, stderr  # DDP's broadcast_buffers deprecation, once per rank
    ours, theirs = train_losses(folder / mode), train_losses(reference)
    assert [s for s, _ in ours] == [s for s, _ in theirs]
    assert max(abs(a - b) for (_, a), (_, b) in zip(ours, theirs)) < 1e-4
    # The last two steps redone from the step-6 checkpoint (FSDP: every rank's optimizer shard). DDP
    # repeats them bit for bit; FSDP2 to float32 rounding (2e-7 measured on the last val loss).
    again = train_losses(folder / f"{mode}-resumed")
    assert [s for s, _ in again] == [s for s, _ in ours]
    assert max(abs(a - b) for (_, a), (_, b) in zip(again, ours)) < 1e-5


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, train_setup, monkeypatch):
    forward = train.KimiK2.forward

    def nan_loss(self, input_ids, targets=None, **kw):
        logits, loss = forward(self, input_ids, targets, **kw)
        return logits, (loss * float("nan") if self.training else loss)

    monkeypatch.setattr(train.KimiK2, "forward", nan_loss)
    with pytest.raises(SystemExit, match=r"the loss diverged, 3 steps in a row up to step 3 \(non-finite\); no checkpoint from before it"):
        train.main(train_args(tmp_path, train_setup, "--max-bad-steps", "3"))
    records = train_metrics(tmp_path)
    assert [r["step"] for r in records if "skipped" in r] == [1, 2, 3]
    assert not any("loss" in r and "skipped" not in r for r in records)


def test_non_finite_model_is_never_checkpointed(tmp_path, train_setup, monkeypatch):
    step = train.MuonClip.step

    def poisoning_step(self, closure=None):
        step(self, closure)
        self.param_groups[0]["params"][0].data.fill_(float("nan"))

    monkeypatch.setattr(train.MuonClip, "step", poisoning_step)
    with pytest.raises(SystemExit, match="non-finite weights"):
        train.main(train_args(tmp_path, train_setup, "--ckpt-interval", "1"))
    assert not glob.glob(str(tmp_path / "ckpt_*"))


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
        train.main(train_args(tmp_path / "run", train_setup, *argv))
    assert str(e.value).startswith("train.py: error:")
    assert not (tmp_path / "run").exists()  # refused before anything was written: not even the folder


@pytest.mark.parametrize("corrupt, reason", [
    (lambda p: p.write_bytes(b"\x00garbage, not a zip archive"), r"not a whole checkpoint"),
    (lambda p: flip_tensor_bytes(p), r"corrupt bytes \(record archive/data/\d+ fails its CRC-32 check\)"),
], ids=["garbage", "flipped"])
def test_corrupt_checkpoint_without_a_manifest_is_named_by_its_zip_crcs(tmp_path, train_setup, train_reference,
                                                                        corrupt, reason):
    """A checkpoint copied away from its run folder has no recorded digest: its zip CRC-32s are checked."""
    bad = tmp_path / "ckpt_0000008.pt"
    shutil.copy(Path(train_reference[0], "ckpt_0000008.pt"), bad)
    corrupt(bad)
    with pytest.raises(SystemExit, match=f"cannot read checkpoint {bad}: {reason}"):
        train.main(train_args(tmp_path / "run", train_setup, "--resume", str(bad)))


def build_nothing(monkeypatch):
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
    build_nothing(monkeypatch)
    with pytest.raises(SystemExit, match=r"different --seq-len \(32, this run: 16\)"):
        train.main(train_args(out, train_setup, "--seq-len", "16", "--resume", ckpt))
    with pytest.raises(SystemExit, match="different --optimizer"):
        train.main(train_args(out, train_setup, "--optimizer", "adamw", "--resume", ckpt))
    # the precision changes the losses as much as any option checked here (bfloat16 autocast runs on CPU)
    with pytest.raises(SystemExit, match=r"different --dtype \('float32', this run: 'bfloat16'\)$"):
        train.main([*train_args(out, train_setup, "--resume", ckpt), "--dtype", "bfloat16"])
    other = tmp_path / "three_layers.json"
    other.write_text(json.dumps({**json.load(open(train_setup[1])), "num_hidden_layers": 3}))
    with pytest.raises(SystemExit, match=r"different --preset/--config: num_hidden_layers 2 \(this run: 3\)$"):
        train.main([*train_args(out, train_setup, "--resume", ckpt), "--config", str(other)])
    with pytest.raises(SystemExit, match=r"is at step 8, past --max-steps 5 \(give --max-steps 8 or more\)"):
        train.main(train_args(out, train_setup, "--max-steps", "5", "--resume", ckpt))
    assert not out.exists()  # every check came before the run folder was even created


def snapshot(folder):
    """Every file's bytes, but the lock's line, which names whichever process last held the folder."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(Path(folder).rglob("*"))
            if p.is_file() and p.name != train_run.LOCK}


def test_rerun_without_resume_keeps_the_earlier_run(tmp_path, train_setup, train_reference, monkeypatch):
    reference, _ = train_reference
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = snapshot(run)
    build_nothing(monkeypatch)
    with pytest.raises(SystemExit, match=f"--out {run} holds an earlier run .*ckpt_0000008.pt.*--resume.*--overwrite"):
        train.main(train_args(run, train_setup))
    assert snapshot(run) == before
    # --overwrite is the explicit way to start over: the earlier checkpoints, metrics and export go
    args = train.parse_args(train_args(run, train_setup, "--overwrite"))
    setup = train.Setup(False, 0, 1, torch.device("cpu"), torch.float32, 4)
    folder = train_run.RunFolder(str(run))
    assert train_run.check_run_folder(args, folder, None, None) == []
    train_run.prepare_run_folder(args, folder, None, None, [], {"run": "new"}, setup)
    assert sorted(os.listdir(run)) == ["config.json", "metrics.jsonl", train_run.LOCK, train_run.MANIFEST]
    assert (run / "metrics.jsonl").read_text() == ""


@pytest.mark.parametrize("failure", ["torch.save", "fsync"])
def test_full_disk_during_checkpoint_leaves_the_previous_one_and_no_temporary_file(tmp_path, monkeypatch, failure):
    folder = train_run.RunFolder(str(tmp_path))
    good = train_run.save_checkpoint({"step": 1, "model": {"w": torch.ones(3)}}, folder, keep=2)
    if failure == "torch.save":  # torch's own error for a full disk: /dev/full answers every write with ENOSPC
        save = torch.save
        monkeypatch.setattr(torch, "save", lambda obj, f: (f.write(b"PK\x03\x04 partial"), save(obj, open("/dev/full", "wb"))))
    else:
        def fsync_full(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(os, "fsync", fsync_full)
    with pytest.raises(SystemExit, match=f"--out {tmp_path}: cannot write checkpoint .*ckpt_0000002.pt: No space left on device$"):
        train_run.save_checkpoint({"step": 2, "model": {"w": torch.zeros(3)}}, folder, keep=2)
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(good), train_run.MANIFEST]
    assert torch.equal(torch.load(good, weights_only=True)["model"]["w"], torch.ones(3))


def flip_tensor_bytes(path):
    """64 bytes inside the largest tensor record overwritten, as by a failing disk: the zip still opens."""
    import zipfile
    with zipfile.ZipFile(path) as archive:
        record = max(archive.infolist(), key=lambda info: info.file_size)
    raw = bytearray(path.read_bytes())
    start = record.header_offset + 30 + len(record.filename) + len(record.extra) + record.file_size // 2  # in its data
    raw[start:start + 64] = bytes(b ^ 0xFF for b in raw[start:start + 64])
    path.write_bytes(bytes(raw))


CUT = r"checkpoint {newest} is {size} bytes, but \d+ were written: it was cut short or changed after it was written"


@pytest.mark.parametrize("corrupt, reason", [
    (lambda p: p.write_bytes(p.read_bytes()[:5000]), CUT.replace("{size}", "5000")),
    (lambda p: p.write_bytes(b""), CUT.replace("{size}", "0")),
    (lambda p: p.write_bytes(p.read_bytes() + b"\0"), CUT.replace("{size}", "\\d+")),
    (flip_tensor_bytes, r"checkpoint {newest} fails its SHA-256 check: its bytes changed after it was written"),
], ids=["cut", "empty", "grown", "flipped"])
def test_corrupt_newest_checkpoint_names_the_older_good_one(tmp_path, train_setup, train_reference, corrupt, reason):
    """Checked against the length and SHA-256 the manifest recorded when it was written."""
    reference, _ = train_reference
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    newest = run / "ckpt_0000008.pt"
    corrupt(newest)
    before = snapshot(run)
    with pytest.raises(SystemExit) as e:
        train.main(train_args(run, train_setup, "--resume"))
    message = str(e.value)
    assert re.fullmatch(f"train.py: error: --resume: {reason.replace('{newest}', str(newest))}; the older checkpoint "
                        f"next to it reads \\(step 6\\): --resume {run / 'ckpt_0000006.pt'}", message), message
    assert "\n" not in message and "torch" not in message and "mmap" not in message  # torch's words never reach the user
    assert snapshot(run) == before


def users_files(folder):
    """A folder of the user's own files, with names train.py also writes."""
    (folder / "hf").mkdir(parents=True)
    for name in ("config.json", "plot.png", "hf/model.safetensors", "ckpt_best.pt", "notes"):
        (folder / name).write_text(f"the user's {name}")


@pytest.mark.parametrize("extra", [[], ["--overwrite"], ["--resume"]], ids=["run", "overwrite", "resume"])
def test_a_folder_with_files_train_py_did_not_write_is_refused_and_left_untouched(tmp_path, train_setup, train_reference,
                                                                                  monkeypatch, extra):
    reference, _ = train_reference
    users, run = tmp_path / "users", tmp_path / "run"
    users_files(users)
    shutil.copytree(reference, run)
    (run / "notes.txt").write_text("the user's note in a train.py run folder")
    build_nothing(monkeypatch)
    for out, foreign in ((users, users / "ckpt_best.pt"), (run, run / "notes.txt")):
        before = snapshot(out)
        with pytest.raises(SystemExit, match=f"^train.py: error: --out {out} holds files that are not train.py's "
                                             f"\\(not listed in its {train_run.MANIFEST}\\), e.g. {foreign}: .*choose an empty "
                                             f"or new --out$"):
            train.main(train_args(out, train_setup, *extra))
        assert snapshot(out) == before and not (users / train_run.LOCK).exists()
    before = snapshot(users)
    monkeypatch.chdir(users)  # --out . where the user keeps their files
    with pytest.raises(SystemExit, match=r"--out \. holds files that are not train.py's .*, e\.g\. \./ckpt_best\.pt:"):
        train.main(train_args(".", train_setup, *extra))
    assert snapshot(users) == before and not (users / train_run.LOCK).exists()


def test_overwrite_deletes_what_train_py_wrote_and_nothing_else(tmp_path, train_setup, train_reference, plot):
    reference, _ = train_reference
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    cache = run / "data_cache"  # another program's folder inside --out is neither foreign nor ours
    shutil.copytree(train_setup[0], cache)
    cached = snapshot(cache)
    args = train_args(run, train_setup, "--overwrite", "--max-steps", "1", "--sample-tokens", "0", "--keep-ckpts", "1")
    args[args.index("--data-cache") + 1] = str(cache)
    train.main(args)
    assert snapshot(cache) == cached
    left = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and cache not in p.parents)
    plot = ["plot.png"] if HAVE_MATPLOTLIB else []  # matplotlib is optional (requirements.txt leaves it out)
    assert left == sorted(["ckpt_0000001.pt", "config.json", "metrics.jsonl", *plot, train_run.LOCK, train_run.MANIFEST,
                           *[str(p.relative_to(reference)) for p in Path(reference, "hf").iterdir()]])
    assert [r["step"] for r in train_metrics(run) if "loss" in r] == [1]


def test_one_writer_per_run_folder_names_the_holder(tmp_path, train_setup, train_reference):
    """A run holds its folder: a second run, also a torchrun job, stops in one line naming the holder's pid
    and command before writing anything, and the first run ends as if alone."""
    reference, _ = train_reference
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "train.py", *train_args(out, train_setup)], cwd=HERE,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    lock, deadline = out / train_run.LOCK, time.time() + 120
    while time.time() < deadline and not (lock.exists() and lock.read_text().endswith("\n")):
        time.sleep(0.01)
    first.send_signal(signal.SIGSTOP)  # holding the lock, wherever it is in its run
    try:
        before = snapshot(out)
        with pytest.raises(SystemExit) as second:  # a second run in this process (one thread, no subprocess)
            train.main(train_args(out, train_setup, "--seed", "7"))
        job = torchrun(["train.py", *train_args(out, train_setup, "--seed", "7")], env=ENV)
        assert snapshot(out) == before
    finally:
        first.send_signal(signal.SIGCONT)
    assert 'train.py", line' not in job.stderr  # torchrun adds its own report of a failed worker, no train.py traceback
    holder = f"train.py: error: --out {out} is in use by pid {first.pid} (python"
    assert str(second.value).startswith(holder) and "train.py --out" in str(second.value), second.value
    assert job.returncode != 0
    assert any(line.startswith(holder) and "train.py --out" in line for line in job.stderr.splitlines()), job.stderr
    assert first.wait(timeout=240) == 0, first.stderr.read()
    assert train_metrics(out) == train_metrics(reference)


def test_resume_from_an_older_checkpoint_keeps_the_newer_run_and_continues_its_own(tmp_path, train_setup, train_reference,
                                                                                   one_thread, capsys):
    """--resume of ckpt 6 in a finished run: ckpt 8, its metrics, plot and export move aside (never deleted,
    never pruned); a SIGTERM's "continue with" resumes this run's newest checkpoint; metrics and the final
    loss are those of the uninterrupted run."""
    reference, stdout = train_reference
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    proc = subprocess.Popen([sys.executable, "train.py", *train_args(run, train_setup, "--keep-ckpts", "1",
                                                                      "--resume", str(run / "ckpt_0000006.pt"))],
                            cwd=HERE, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**ENV, "PYTHONUNBUFFERED": "1"})
    lines = []
    while not lines or lines[-1] and not lines[-1].startswith(("step 7/8", "final val loss")):  # "": the run ended
        lines.append(proc.stdout.readline())
    proc.send_signal(signal.SIGTERM)  # in the loop: it stops after step 7 or 8, with a checkpoint
    out, err = proc.communicate(timeout=120)
    out = "".join(lines) + out
    assert proc.returncode == train_run.INTERRUPTED and "Traceback" not in err, err
    aside = run / "after_step_6"
    assert f"the newer checkpoints (ckpt_0000008.pt) and their metrics, plot and export are kept in {aside}\n" in out
    assert (aside / "ckpt_0000008.pt").read_bytes() == Path(reference, "ckpt_0000008.pt").read_bytes()
    assert (aside / "hf" / "model.safetensors").read_bytes() == Path(reference, "hf", "model.safetensors").read_bytes()
    assert train_metrics(aside) == [r for r in train_metrics(reference) if r["step"] > 6]
    kept = snapshot(aside)
    command = out.rpartition("continue with: ")[2].split()
    stopped = int(re.search(r"stopped by SIGTERM after step (\d+)", out)[1])
    assert command[-2:] == ["--resume", str(run / f"ckpt_{stopped:07d}.pt")]
    capsys.readouterr()
    train.main(command[2:])  # in this process, with one thread as the subprocesses: bitwise the same
    assert train_metrics(run) == train_metrics(reference)
    final = re.compile(r"final val loss [\d.]+")
    assert final.search(capsys.readouterr().out)[0] == final.search(stdout)[0]
    assert snapshot(aside) == kept
    # --keep-ckpts 1 of this run's own, and the one with the best validation loss (never pruned)
    val = {r["step"]: r["val_loss"] for r in train_metrics(run) if "val_loss" in r}
    assert sorted(p.name for p in run.glob("ckpt_*.pt")) == sorted({"ckpt_0000008.pt", f"ckpt_{min((6, 8), key=val.get):07d}.pt"})


def test_signals_during_a_checkpoint_write_exit_130_and_leave_it_whole(tmp_path, train_setup):
    """Ctrl-C, Ctrl-C, SIGTERM, Ctrl-C while ckpt 2 is written (torch.save slowed so that they land in
    it: its ~420 writes take 5 ms each, 2 s in all, the signals 0.2 s): the write completes, then the
    run stops with status 130 and one line, no traceback, no temporary file."""
    out = tmp_path / "run"
    slowed = ("import runpy, sys, time, torch\n"
              "save = torch.save\n"
              "class Slow:\n"
              "    def __init__(self, f): self.f = f\n"
              "    def write(self, b): time.sleep(0.005); return self.f.write(b)\n"
              "    def flush(self): self.f.flush()\n"
              "torch.save = lambda obj, f: save(obj, Slow(f))\n"
              f"sys.argv = ['train.py', *{train_args(out, train_setup)!r}]\n"
              "runpy.run_path('train.py', run_name='__main__')\n")
    proc = subprocess.Popen([sys.executable, "-c", slowed], cwd=HERE, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=ENV)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not list(out.glob(".ckpt_0000002.pt.*.tmp")):
        time.sleep(0.005)
    for sig in (signal.SIGINT, signal.SIGINT, signal.SIGTERM, signal.SIGINT):
        proc.send_signal(sig)
        time.sleep(0.05)
    assert list(out.glob(".ckpt_0000002.pt.*.tmp")), "the signals did not all land during the write"
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == train_run.INTERRUPTED, stderr
    assert stderr.strip() == "train.py: stopped by SIGINT at once (a second Ctrl-C), after the checkpoint being " \
                             "written: continue with --resume"
    assert sorted(p.name for p in out.iterdir()) == ["ckpt_0000002.pt", "config.json", "metrics.jsonl", train_run.LOCK,
                                                     train_run.MANIFEST]
    assert train_run.load_checkpoint(str(out / "ckpt_0000002.pt"))["step"] == 2


@pytest.mark.parametrize("make, argv, named", [
    (lambda d: (d / "f").write_text("x"), ["--out", "{d}/f"], "--out {d}/f: exists and is not a folder"),
    (lambda d: (d / "f").write_text("x"), ["--out", "{d}/f/run"], "--out {d}/f/run: cannot write {d}/f/run: Not a directory"),
    (lambda d: (d / "f").write_text("x"), ["--data-cache", "{d}/f", "--data", "{d}/f"], "--data-cache {d}/f/"),
    (lambda d: None, ["--resume", "--overwrite"], "argument --overwrite: not allowed with --resume"),
])
def test_bad_run_folders_fail_in_one_line_naming_the_path(tmp_path, train_setup, capsys, make, argv, named):
    make(tmp_path)
    argv = [a.format(d=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as e:  # main inside the error boundary, as `python train.py` runs it
        train_run.error_boundary(train.main, [*train_args(tmp_path / "run", train_setup), *argv])
    stderr = capsys.readouterr().err
    # a refusal's line is its SystemExit's (Python prints it, status 1); else the status and stderr's last line
    line = e.value.code if isinstance(e.value.code, str) else stderr.strip().splitlines()[-1]
    assert (isinstance(e.value.code, str) or e.value.code in (1, 2)) and "Traceback" not in stderr
    assert named.format(d=tmp_path) in line and "\n" not in line, stderr


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


# --------------------------------------------------------------------------------------------------
# Experiments: --set and --val-data


def run_model_config(tmp_path, train_setup, *overrides):
    """The model config a one-step train.py run with these --set overrides actually trained."""
    train.main(train_args(tmp_path, train_setup, "--max-steps", "1", "--sample-tokens", "0",
                           *[a for o in overrides for a in ("--set", o)]))
    with open(tmp_path / "config.json") as f:
        return Config(**json.load(f)["model"])


def test_set_routed_experts_keeps_activated_params_and_adds_whole_experts(tmp_path, train_setup):
    base = Config(**json.loads(train_setup[1].read_text()))
    wider = run_model_config(tmp_path, train_setup, "n_routed_experts=16")
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
    doubled = run_model_config(tmp_path, train_setup, f"num_attention_heads={2 * H}", f"num_key_value_heads={2 * H}")
    dims = ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "q_lora_rank", "kv_lora_rank", "hidden_size")
    assert doubled.num_attention_heads == 2 * H
    assert [getattr(doubled, d) for d in dims] == [getattr(base, d) for d in dims]
    # per layer and added head: a q_b_proj slice, a kv_b_proj slice and an o_proj slice
    per_head = (base.q_lora_rank * base.qk_head_dim + base.kv_lora_rank * (base.qk_nope_head_dim + base.v_head_dim)
                + base.v_head_dim * base.hidden_size)
    grown = count_params(doubled)["total"] - count_params(base)["total"]
    assert grown == base.num_hidden_layers * H * per_head


def test_set_that_breaks_the_config_fails_naming_the_field(tmp_path, train_setup):
    with pytest.raises(SystemExit, match=r"--set num_attention_heads=8: Config\.num_key_value_heads"):
        train.main(train_args(tmp_path, train_setup, "--set", "num_attention_heads=8"))


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
    train.main(train_args(tmp_path / "run", train_setup, "--max-steps", "1", "--sample-tokens", "0",
                           "--data", str(tmp_path / "train.jsonl"), "--val-data", str(tmp_path / "val.jsonl")))
    trained, *evaluated = seen  # the training sampler, then one fresh sampler per evaluation
    assert sorted(trained) == sorted(t.encode() for t in train_texts)  # none held back for validation
    assert evaluated and all(sorted(v) == sorted(t.encode() for t in val_texts) for v in evaluated)




# --------------------------------------------------------------------------------------------------
# --init-from: a fine-tuning run starts from a checkpoint's weights, with everything else fresh


def test_init_from_starts_a_new_run_with_the_checkpoints_weights_and_fresh_state(tmp_path, train_setup, train_reference,
                                                                               monkeypatch):
    source = Path(train_reference[0], "ckpt_0000008.pt")
    saved = torch.load(source, weights_only=True)["model"]
    seen = {}
    build_optimizer = train.build_optimizer

    def capture(args, raw_model, *rest):  # the weights the first step will update
        seen.update({k: v.clone() for k, v in raw_model.state_dict().items()})
        return build_optimizer(args, raw_model, *rest)

    monkeypatch.setattr(train, "build_optimizer", capture)
    out = tmp_path / "finetune"
    args = train_args(out, train_setup, "--init-from", str(source), "--max-steps", "2", "--seed", "7", config=False)
    train.main(args)
    assert seen.keys() == saved.keys() and all(torch.equal(seen[k], saved[k]) for k in saved)  # a copy: bitwise
    config = json.loads((out / "config.json").read_text())
    assert config["init_source"] == {"path": str(source), "step": 8, **data.digest(source)}
    assert config["model"] == torch.load(source, weights_only=True)["config"]["model"]
    # step 0, the schedule's first warm-up step, and a fresh optimizer: every AdamW state counts 2 steps, not 10
    first = next(r for r in train_metrics(out) if "loss" in r)
    assert first["step"] == 1 and first["lr"] == train.lr_at(0, train.parse_args(args))
    ckpt = train_run.load_checkpoint(str(out / "ckpt_0000002.pt"))
    assert ckpt["step"] == 2 and ckpt["sampler"] != torch.load(source, weights_only=True)["sampler"]
    adam_steps = {int(s["step"]) for s in ckpt["optimizer"]["state"].values() if "step" in s}
    assert adam_steps == {2}
    assert sorted(p.name for p in out.glob("ckpt_*.pt")) == ["ckpt_0000002.pt"]


def test_init_from_evaluates_the_checkpoints_model_and_resumes_exactly_without_its_source(tmp_path, train_setup, train_reference,
                                                                                          one_thread):
    """The fine-tuning run's step-0 validation loss is the source run's at its step 8 (same weights,
    data, batches and kernels: bitwise); a resume of the fine-tuning run from its own checkpoint logs
    exactly its uninterrupted metrics, and no longer needs the source checkpoint."""
    ref_out, _ = train_reference
    source = tmp_path / "source" / "ckpt_0000008.pt"
    source.parent.mkdir()
    source.write_bytes(Path(ref_out, "ckpt_0000008.pt").read_bytes())
    out = tmp_path / "finetune"
    args = train_args(out, train_setup, "--init-from", str(source), "--max-steps", "4", config=False)
    train.main(args)  # in this process, with one thread as the reference subprocess: bitwise the same
    whole = train_metrics(out)
    assert whole[0] == {"step": 0, "val_loss": next(r["val_loss"] for r in train_metrics(ref_out) if r["step"] == 8
                                                     and "val_loss" in r)}
    source.unlink()
    train.main([*args, "--resume", str(out / "ckpt_0000002.pt")])
    assert train_metrics(out) == whole


@pytest.mark.parametrize("extra, named", [
    (["--set", "num_hidden_layers=3"], r"--set num_hidden_layers=3: changes model\.layers\.2\.\S+ from None to \(128,\)"),
    (["--set", "moe_intermediate_size=96"], r"--set moe_intermediate_size=96: changes model\.layers\.1\.mlp\.experts"),
    (["--init-from", "/no/such/ckpt.pt"], "--init-from: no such checkpoint: /no/such/ckpt.pt"),
])
def test_init_from_refuses_what_does_not_fit_before_anything_is_built(tmp_path, train_setup, train_reference,
                                                                      monkeypatch, extra, named):
    source = str(Path(train_reference[0], "ckpt_0000008.pt"))

    def built(*a, **k):
        raise AssertionError("built something before the check")
    monkeypatch.setattr(train.data, "prepare", built)
    monkeypatch.setattr(train, "build_model", built)
    with pytest.raises(SystemExit, match=f"^train.py: error: {named}"):
        train.main(train_args(tmp_path / "run", train_setup, "--init-from", source, *extra, config=False))


def test_init_from_keeps_settable_fields_and_refuses_a_model_source_or_folder(tmp_path, train_setup, train_reference, capsys):
    source = str(Path(train_reference[0], "ckpt_0000008.pt"))
    for extra, named in ((["--preset", "tiny"], "argument --preset: not allowed with --init-from"),
                         (["--config", str(train_setup[1])], "argument --config: not allowed with --init-from")):
        with pytest.raises(SystemExit):
            train.parse_args(["--init-from", source, "--out", str(tmp_path), *extra])
        assert named in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--init-from", source])
    assert "argument --init-from: give --out" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=f"--init-from {source}: a checkpoint of --out {train_reference[0]} itself"):
        train.main(train_args(train_reference[0], train_setup, "--init-from", source, config=False))
    # resuming a fine-tuning run without its --init-from is named as that, not as a model difference
    out = tmp_path / "finetune"
    args = train_args(out, train_setup, "--init-from", source, "--max-steps", "2", "--set", "rope_theta=5000",
                      "--sample-tokens", "0", config=False)
    train.main(args)
    assert json.loads((out / "config.json").read_text())["model"]["rope_theta"] == 5000
    with pytest.raises(SystemExit, match=rf"--resume: \S+ was trained with a different --init-from \('{source}', "
                                         r"this run: None\)$"):
        train.main(train_args(out, train_setup, "--max-steps", "2", "--resume"))


def test_train_py_runs_copied_alone_with_the_files_it_needs(tmp_path):
    """train.py with the three card files it trains: `python train.py --help` answers, and a run asks in
    one line for train_run.py (its run folder); with train_run.py beside them, it trains. Nothing else."""
    out = run_alone(tmp_path, ["train.py", "train_run.py", "kimik2.py", "muonclip.py", "data.py"], """
import contextlib, importlib, io, os, runpy, sys
os.rename("train_run.py", "train_run.py.away")  # first the card files alone
sys.argv = ["train.py", "--help"]
with contextlib.redirect_stdout(io.StringIO()) as printed, contextlib.suppress(SystemExit):
    runpy.run_path("train.py", run_name="__main__")
assert "--resume" in printed.getvalue() and "train_run" not in sys.modules
import train
try:
    train.main(["--out", "run"])
    raise AssertionError("train.py ran without its run folder")
except SystemExit as e:
    assert str(e) == "train.py: error: the run folder lives in train_run.py: copy it beside train.py", e
assert not os.path.exists("run")
os.rename("train_run.py.away", "train_run.py")
importlib.invalidate_caches()
with open("corpus.txt", "w") as f:
    f.write("a copied train.py trains on this line. " * 200)
train.main(["--data", "corpus.txt", "--out", "run", "--set", "num_hidden_layers=1", "--max-steps", "2",
            "--batch-size", "2", "--seq-len", "16", "--eval-iters", "1", "--sample-tokens", "0",
            "--device", "cpu", "--dtype", "float32", "--peak-flops", "1e9"])
assert sorted(__import__("os").listdir("run"))[:2] == ["ckpt_0000002.pt", "config.json"]
""")
    assert out.strip().endswith("ok")


def test_train_fail_and_its_twin_train_run_fail_refuse_alike():
    """train.py keeps its own `fail` so that it copies without train_run.py: the two say the same."""
    for fail in (train.fail, train_run.fail):
        with pytest.raises(SystemExit) as e:
            fail("--lr -1: must be positive")
        assert e.value.code == "train.py: error: --lr -1: must be positive"


# --------------------------------------------------------------------------------------------------
# The run folder's invariants (train_run.py's docstring), one test or more each


def write_manifest(folder, files, signed=True):
    """A manifest as train.py writes it (signed: with its own digest), or as an older train.py did."""
    manifest = {"written_by": "train.py", "files": files if signed else sorted(files), "val_losses": {}}
    if signed:
        manifest["sha256"] = train_run._manifest_digest(manifest)
    (folder / train_run.MANIFEST).write_text(json.dumps(manifest))


def test_pruning_never_deletes_the_best_nor_the_last_checkpoint_before_a_divergence(tmp_path):
    folder = train_run.RunFolder(str(tmp_path))
    val = {1: 3.0, 2: 1.0, 3: 2.0, 4: 4.0, 5: 5.0, 6: None}
    for step, loss in val.items():
        train_run.save_checkpoint({"step": step}, folder, keep=2, val_loss=loss)
    assert sorted(p.name for p in tmp_path.glob("ckpt_*")) == ["ckpt_0000002.pt", "ckpt_0000005.pt", "ckpt_0000006.pt"]
    # a divergence that began at step 7: the checkpoints from 7 on are bad; 6 is the last good one
    for step in (7, 8, 9):
        train_run.save_checkpoint({"step": step}, folder, keep=1, val_loss=None, healthy_before=7)
    assert sorted(p.name for p in tmp_path.glob("ckpt_*")) == ["ckpt_0000002.pt", "ckpt_0000006.pt", "ckpt_0000009.pt"]


def test_a_diverging_run_stops_in_one_line_naming_the_checkpoint_before_it_which_it_kept(tmp_path, train_setup,
                                                                                       train_reference):
    """The issue's case: --resume ... --lr 1e6 on a float32 run, checkpointing every step with --keep-ckpts 1."""
    run = tmp_path / "run"
    shutil.copytree(train_reference[0], run)
    good = (run / "ckpt_0000006.pt").read_bytes()
    with pytest.raises(SystemExit) as e:
        train.main(train_args(run, train_setup, "--resume", str(run / "ckpt_0000006.pt"), "--lr", "1e6",
                              "--max-steps", "20", "--ckpt-interval", "1", "--keep-ckpts", "1", "--max-bad-steps", "3"))
    message = str(e.value)
    assert re.fullmatch(r"train.py: error: stopping: the loss diverged, 3 steps in a row up to step 10 \(.*\); resume "
                        rf"from the newest checkpoint from before it with a lower --lr: --resume {run}/ckpt_0000006.pt",
                        message), message
    assert "--dtype" not in message  # a float32 run is never told to use float32
    assert (run / "ckpt_0000006.pt").read_bytes() == good  # pruning to 1 checkpoint kept it
    assert sorted(p.name for p in run.glob("ckpt_*.pt")) == ["ckpt_0000006.pt", "ckpt_0000009.pt"]


@pytest.mark.parametrize("entry, signed", [("../notes.txt", False), ("../dir/", True), ("/abs/notes.txt", True),
                                           ("link/notes.txt", True)], ids=["dotdot", "dotdot-dir", "absolute", "symlink"])
def test_a_manifest_naming_paths_outside_out_is_refused_and_nothing_is_deleted(tmp_path, train_setup, train_reference,
                                                                             monkeypatch, entry, signed):
    """The issue's case: a train_files.json naming ../notes.txt or ../dir/ (or an absolute path, or a path
    through a symlink leading out) made --overwrite delete outside --out. Now: one line, nothing deleted."""
    outside = tmp_path / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "notes.txt").write_text("the user's notes")
    (outside / "dir" / "keep.txt").write_text("the user's folder")
    run = outside / "run"
    shutil.copytree(train_reference[0], run)
    (run / "link").symlink_to(outside)
    files = json.loads((run / train_run.MANIFEST).read_text())["files"]
    write_manifest(run, {**files, "link": None, entry.replace("/abs", str(outside)): None}, signed)
    before = snapshot(outside)
    build_nothing(monkeypatch)
    for extra in (["--overwrite"], ["--resume"], []):
        with pytest.raises(SystemExit, match=rf"^train.py: error: (--resume: )?{run}/{train_run.MANIFEST} lists .*; "
                                             r"train.py touches nothing outside its --out$"):
            train.main(train_args(run, train_setup, *extra))
        assert snapshot(outside) == before


def test_symlinks_in_the_run_folder_are_unlinked_not_followed(tmp_path, train_setup, train_reference):
    """hf/ replaced by a symlink to the user's folder: removing it removes the link, never what it points to."""
    users = tmp_path / "users"
    users.mkdir()
    (users / "model.safetensors").write_text("the user's model")
    run = tmp_path / "run"
    shutil.copytree(train_reference[0], run)
    shutil.rmtree(run / "hf")
    (run / "hf").symlink_to(users, target_is_directory=True)
    (users / "ckpt.pt").write_text("the user's checkpoint")  # and a checkpoint replaced by a link to theirs
    (run / "ckpt_0000006.pt").unlink()
    (run / "ckpt_0000006.pt").symlink_to(users / "ckpt.pt")
    folder = train_run.RunFolder(str(run))
    folder.remove(*[n for n in folder.files if n.startswith("hf/")], "hf/", "ckpt_0000006.pt")
    assert not (run / "hf").exists() and not (run / "ckpt_0000006.pt").exists()
    assert {p.name: p.read_text() for p in users.iterdir()} == {"model.safetensors": "the user's model",
                                                                 "ckpt.pt": "the user's checkpoint"}


@pytest.mark.parametrize("target", [train_run.MANIFEST, "metrics.jsonl"])
def test_flipped_bytes_in_the_manifest_or_the_metrics_are_named_and_nothing_changes(tmp_path, train_setup,
                                                                                  train_reference, target):
    run = tmp_path / "run"
    shutil.copytree(train_reference[0], run)
    raw = bytearray((run / target).read_bytes())
    raw[len(raw) // 3] ^= 0x01  # one bit, inside what the checkpoints (or the manifest's digest) cover
    (run / target).write_bytes(bytes(raw))
    before = snapshot(run)
    with pytest.raises(SystemExit) as e:
        train.main(train_args(run, train_setup, "--resume", str(run / "ckpt_0000006.pt")))
    assert f"{run / target} fails its check" in str(e.value) and "\n" not in str(e.value)
    assert snapshot(run) == before


def test_overwrite_with_a_bad_option_refuses_before_deleting_anything(tmp_path, train_setup, train_reference):
    run = tmp_path / "run"
    shutil.copytree(train_reference[0], run)
    before = snapshot(run)
    with pytest.raises(SystemExit, match="--data: .*/no/such/corpus.txt"):
        train.main(train_args(run, train_setup, "--overwrite", "--data", "/no/such/corpus.txt"))
    assert snapshot(run) == before


# --------------------------------------------------------------------------------------------------
# Fault injection: many runs with random faults, each ending in an exact resume or a one-line refusal


def flip_or_cut(path, rng):
    """Flip 1-3 random bytes of the file, or cut it to a random shorter length; returns what was done."""
    raw = bytearray(path.read_bytes())
    if rng.random() < 0.5 and len(raw) > 1:
        size = rng.randrange(len(raw))
        path.write_bytes(bytes(raw[:size]))
        return f"cut to {size} of {len(raw)} bytes"
    for _ in range(rng.randint(1, 3)):
        raw[rng.randrange(len(raw))] ^= rng.randint(1, 255)
    path.write_bytes(bytes(raw))
    return "bytes flipped"


def test_fault_injection_every_fault_ends_in_an_exact_resume_or_a_one_line_refusal(tmp_path, train_setup,
                                                                                  train_reference, monkeypatch, capsys):
    """Runs stopped at step 5 whose files train.py reads back get random faults (byte flips, cuts), then
    --resume; signals land during data preparation, in the loop and during the export; a full disk
    (RLIMIT_FSIZE: the kernel refuses the write) stops a checkpoint write; SIGKILL lands at random
    moments of real processes. Every run must end with the uninterrupted run's metrics, bit for bit
    (after following what a refusal suggests or a stop prints, or rerunning), or in a one-line refusal
    naming the file. In-process runs use one thread, as the reference subprocess does: the same kernels
    on the same inputs, so the comparison is bitwise."""
    rng, threads = random.Random(24), torch.get_num_threads()
    torch.set_num_threads(1)
    expected, outcomes = train_metrics(train_reference[0]), []
    forward_backward, export_hf, prepare = train.forward_backward, train_run.export_hf, data.prepare
    move = train_run.RunFolder.move

    def attempt(out, *extra):
        """(exit status, the one line printed or raised) of train.py in this process."""
        return attempt_argv(train_args(out, train_setup, *extra))

    def attempt_argv(argv):
        monkeypatch.setattr(sys, "argv", ["train.py", *argv])  # what a stop's "continue with" repeats
        try:
            train_run.error_boundary(train.main, argv)
            return 0, ""
        except SystemExit as e:
            if isinstance(e.code, str):  # a refusal
                assert "\n" not in e.code
                return 1, e.code
            out, err = capsys.readouterr()
            # a stop in the loop says so as the last line of its log; anything else, in one line on stderr
            line = err.strip() or out.strip().splitlines()[-1]
            assert len(line.splitlines()) == 1 and "Traceback" not in err, err
            return e.code, line

    def signal_at(signum, where, nth=1):
        """Send `signum` to this process on the nth call of train.py's `where` function."""
        calls = []
        original = {"forward_backward": forward_backward, "export_hf": export_hf, "prepare": prepare, "move": move}[where]

        def hooked(*a, **k):
            calls.append(1)
            if len(calls) == nth:
                os.kill(os.getpid(), signum)
            return original(*a, **k)
        monkeypatch.setattr({"forward_backward": train, "export_hf": train_run, "prepare": train.data,
                             "move": train_run.RunFolder}[where], where, hooked)

    def restore_hooks():
        monkeypatch.setattr(train, "forward_backward", forward_backward)
        monkeypatch.setattr(train_run, "export_hf", export_hf)
        monkeypatch.setattr(train.data, "prepare", prepare)
        monkeypatch.setattr(train_run.RunFolder, "move", move)

    def finish(out, code, line):
        """After a stop, a kill or a full disk: continue (with the command a stop prints; else --resume, or
        the same command where no checkpoint was written), then compare with the reference."""
        if code and (printed := re.search(r" with: (python train\.py .*)$", line)):
            command = shlex.split(printed[1])
            if stopped := re.search(r"after step (\d+), checkpointed", line):
                assert command[-2:] == ["--resume", str(out / f"ckpt_{int(stopped[1]):07d}.pt")], line
            code, line = attempt_argv(command[2:])
        elif code:
            code, line = attempt(out, *(["--resume"] if list(out.glob("ckpt_*.pt")) else []))
        assert code == 0, line
        assert train_metrics(out) == expected, "a silent wrong result"

    try:
        # a run stopped by SIGTERM after step 5, checkpointed: the folder every file fault starts from
        stopped = tmp_path / "stopped"
        signal_at(signal.SIGTERM, "forward_backward", nth=5)
        assert attempt(stopped)[0] == train_run.INTERRUPTED
        restore_hooks()
        targets = ["ckpt_0000005.pt", "ckpt_0000004.pt", train_run.MANIFEST, "metrics.jsonl", "config.json"]
        for trial in range(12):
            run, target = tmp_path / f"file{trial}", targets[trial % len(targets)]
            shutil.copytree(stopped, run)
            fault = flip_or_cut(run / target, rng)
            before = snapshot(run)
            code, line = attempt(run, "--resume")
            outcome = "exact resume"
            if code:  # refused: in one line naming the file, having changed nothing
                assert code == 1 and str(run / target) in line, line
                assert snapshot(run) == before
                outcome = "refused naming it"
                if older := re.search(r"--resume (\S+ckpt_\d+\.pt)$", line):  # what the refusal suggests
                    code, line = attempt(run, "--resume", older[1])
                    outcome += f", then an exact resume from {Path(older[1]).name}"
            if not code:
                assert train_metrics(run) == expected, "a silent wrong result"
            outcomes.append((f"{target}: {fault}", outcome))
        # signals: during data preparation, at a random step of the loop, during the export
        for trial, (signum, where, nth) in enumerate([
                (signal.SIGTERM, "prepare", 1), (signal.SIGHUP, "forward_backward", rng.randint(1, 7)),
                (signal.SIGINT, "forward_backward", rng.randint(1, 7)), (signal.SIGHUP, "export_hf", 1)]):
            run = tmp_path / f"signal{trial}"
            signal_at(signum, where, nth)
            code, line = attempt(run)
            restore_hooks()
            assert code == train_run.INTERRUPTED, line
            finish(run, code, line)
            outcomes.append((f"{signal.Signals(signum).name} in {where} (call {nth})", "stopped in one line, exact resume"))
        # the worst moment of a resume from an older checkpoint: while it moves the newer run aside
        run = tmp_path / "signal_move"
        shutil.copytree(train_reference[0], run)
        signal_at(signal.SIGTERM, "move")
        code, line = attempt(run, "--resume", str(run / "ckpt_0000006.pt"))
        restore_hooks()
        assert code == train_run.INTERRUPTED and (run / "after_step_6" / "ckpt_0000008.pt").exists(), line
        finish(run, code, line)
        outcomes.append(("SIGTERM while a resume moves the newer run aside", "the move completed, exact resume"))
        # a full disk: every file may grow to 1 MB only, so the next checkpoint (4.6 MB) cannot be written
        run = tmp_path / "full"
        shutil.copytree(stopped, run)
        import resource
        limits, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, limits[1]))
        try:
            code, line = attempt(run, "--resume")
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, limits)
            signal.signal(signal.SIGXFSZ, handler)
        assert code == 1 and re.search(rf"cannot write checkpoint {run}/ckpt_0000006.pt: File too large$", line), line
        assert not list(run.glob(".*.tmp"))
        finish(run, code, line)
        outcomes.append(("full disk (RLIMIT_FSIZE) at a checkpoint write", "refused naming it, exact resume"))
    finally:
        torch.set_num_threads(threads)
    # SIGKILL in real processes: once between checkpoints, at least two steps before the end (the kill
    # lands once a line follows that step's record); once at a random moment
    for trial in range(2):
        run, after = tmp_path / f"killed{trial}", rng.randint(3, STEPS - 3) if trial == 0 else rng.randint(1, STEPS - 1)
        proc = subprocess.Popen([sys.executable, "train.py", *train_args(run, train_setup)], cwd=HERE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not (
                (run / "metrics.jsonl").exists() and any('"loss"' in line and json.loads(line)["step"] >= after
                                                         for line in (run / "metrics.jsonl").read_text().splitlines()[:-1])):
            time.sleep(0.01)
        if trial == 0:
            assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(rng.random() * 0.5 * trial)
        proc.kill()
        proc.wait()
        assert trial or not (run / "hf").exists(), "killed too late"
        for path in glob.glob(str(run / "ckpt_*.pt")):  # every checkpoint on disk is whole
            assert train_run.load_checkpoint(path)["step"] >= 2
        resumable = bool(list(run.glob("ckpt_*.pt")))
        lock = run / train_run.LOCK  # names the killed process unless the kill came before the lock or after an orderly end
        held = lock.exists() and lock.read_text().strip() != ""
        assert held or trial, "a kill between checkpoints left no lock naming the process"
        torch.set_num_threads(1)
        capsys.readouterr()
        try:
            finish(run, 1, "killed")
        finally:
            torch.set_num_threads(threads)
        # the killed run's lock is taken over, in one line naming the process that held it
        resumed = capsys.readouterr().out
        if held:
            assert f"--out {run}: the lock of pid {proc.pid} (" in resumed and "which has ended, is taken over" in resumed
        outcomes.append((f"SIGKILL after step {after} + {'resume' if resumable else 'rerun'}", "exact"))
    print(f"\nfault injection: {len(outcomes)} runs")
    for fault, outcome in outcomes:
        print(f"  {fault}: {outcome}")



# --------------------------------------------------------------------------------------------------
# One error boundary: one line naming the file, and the saved traceback


def run_with_file_size_limit(limit, when, argv):
    """train.py in this process, the kernel refusing to grow any file past `limit` bytes (RLIMIT_FSIZE,
    EFBIG: a full disk as the writers see it) from the first call of train_run.`when` on; returns the
    exit status and the one line printed."""
    import resource
    original, limits = getattr(train_run, when), resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel's SIGXFSZ kills the process

    def limited(*a, **k):
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limits[1]))
        return original(*a, **k)
    setattr(train_run, when, limited)
    try:
        train_run.error_boundary(train.main, argv)
    except SystemExit as e:
        return e.code
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
        setattr(train_run, when, original)


@pytest.mark.parametrize("when, file", [("export_hf", "the Hugging Face export {out}/hf: SafetensorError: "),
                                        ("MetricsLog", "{out}/metrics.jsonl: File too large")],
                         ids=["export", "metrics"])
def test_a_full_disk_anywhere_ends_in_one_line_naming_the_file_and_the_saved_traceback(tmp_path, train_setup,
                                                                                      capsys, when, file):
    """The issue's cases: a full disk during the Hugging Face export (SafetensorError, which names no
    file) or a metrics append (an OSError naming no file) ended in a traceback. The export stops with
    the final checkpoint written, and --resume exports again."""
    out = tmp_path / "run"
    limit = 1000 if when == "MetricsLog" else 100_000  # metrics: its third record; export: the weights
    args = train_args(out, train_setup, "--max-steps", "3", "--ckpt-interval", "100", "--sample-tokens", "0")
    assert run_with_file_size_limit(limit, when, args) == 1
    line = capsys.readouterr().err.strip()
    assert re.fullmatch(rf"train.py: error: {re.escape(file.format(out=out))}.*\(traceback in (\S+)\)", line), line
    saved = re.search(r"traceback in (\S+)\)$", line)[1]
    assert "Traceback (most recent call last)" in Path(saved).read_text()
    os.remove(saved)
    if when == "export_hf":
        train.main([*args, "--resume"])
        assert (out / "hf" / "model.safetensors").stat().st_size > limit


def test_a_closed_stdout_does_not_stop_the_run(tmp_path, train_setup):
    """python train.py | head -3: the pipe closes while the run prints; it goes on, and ends as usual."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train.py", *train_args(out, train_setup, "--max-steps", "2")], cwd=HERE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    proc.stdout.close()
    assert proc.wait(timeout=300) == 0 and "Traceback" not in proc.stderr.read()
    assert (out / "hf" / "model.safetensors").exists()


def test_without_matplotlib_there_is_no_plot_and_one_line_says_why(tmp_path, monkeypatch, capsys, plot):
    """matplotlib is optional (requirements.txt leaves it out): the run folder then has no plot.png."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    folder = train_run.RunFolder(str(tmp_path))
    train_run.plot_metrics([{"step": 1, "loss": 1.0, "max_logit_per_layer": [1.0], "heads_clipped": 0,
                             "load_imbalance": 1.0}], 100.0, folder)
    assert capsys.readouterr().out == "no plot.png: pip install matplotlib to get it\n"
    assert os.listdir(tmp_path) == []


def test_a_kill_during_the_manifests_own_write_leaves_a_temporary_file_that_counts_as_train_pys():
    """data.write_atomically's temporary file of train_files.json itself (a SIGKILL between its
    write and its rename) is train.py's leftover, not a user's file: found by the fault injection."""
    import train_run
    folder = train_run.RunFolder.__new__(train_run.RunFolder)
    folder.listed, folder.files = False, {}
    assert folder.ours(f".{train_run.MANIFEST}.2002.139646736808832.tmp")
    assert not folder.ours(train_run.MANIFEST)  # an unlisted manifest is still refused
    assert not folder.ours("notes.txt") and not folder.ours(".notes.txt.1.2.tmp")


if __name__ == "__main__":  # a torchrun worker: python tests/test_train.py WORKER ARGS
    {"two-processes": _two_processes_worker}[sys.argv[1]](*sys.argv[2:])
