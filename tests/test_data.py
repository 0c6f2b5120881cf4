"""data.py's training data on real files and processes: the default corpus, the token cache (reuse,
verification, interrupted and failed builds, a full disk), bad files and folders, the command line's
error boundary. Tiny corpora: the whole file runs in seconds (the default-corpus build aside).

    python -m pytest -q tests/test_data.py
"""
import errno
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import data
from conftest import HERE, run_alone

DATA_PY = Path(HERE, "data.py")


def test_data_py_copied_alone_prepares_and_samples_a_corpus_and_with_data_builtin_py_the_builtin_one(tmp_path):
    """data.py alone (data_builtin.py moved away for the first part): it prepares and samples a corpus,
    and each companion's names fail in one line naming the file to copy; then with data_builtin.py
    beside it, the builtin corpus. One start-up serves both."""
    out = run_alone(tmp_path, ["data.py", "data_builtin.py"], """
import importlib, os, runpy, sys
os.rename("data_builtin.py", "data_builtin.py.away")
import data
from pathlib import Path
Path("docs").mkdir()
for i in range(4):
    Path("docs", f"d{i}.txt").write_text(f"Document {i}. " * 50)
info = data.prepare("cache", ["docs"])
x, y = data.BatchSampler(data.load_tokens(info, "train"), 2, 8).next()
assert x.shape == (2, 8) and data.rephrase_chunkwise("A b.", "qa", lambda m: "A b.").text == "A b."
for name, companion in (("ChatEndpoint", "data_rephrase.py"), ("math_documents", "data_builtin.py")):
    try:
        getattr(data, name)
    except AttributeError as e:
        assert companion in str(e), e
    else:
        raise AssertionError(f"data.{name} without {companion}")
try:
    data.prepare("cache", ["builtin:math"])
except data.DataError as e:
    assert str(e) == 'data source "builtin" lives in data_builtin.py; copy it beside data.py', e
else:
    raise AssertionError("the builtin source without data_builtin.py")
sys.argv = ["data.py", "stats"]  # `python data.py stats`, in this process
try:
    runpy.run_path("data.py", run_name="__main__")
except SystemExit as e:  # Python prints the message on stderr, exit status 1
    assert e.code == "data.py's command line lives in data_rephrase.py; copy it beside data.py", e
else:
    raise AssertionError("python data.py stats without data_rephrase.py")
os.rename("data_builtin.py.away", "data_builtin.py")
importlib.invalidate_caches()
import data_builtin
info = data.prepare("cache", ["builtin:math"])
assert set(info["stats"]) == {"math"} and info["tokens"]["train"] > 100_000
assert data.math_documents is data_builtin.math_documents
""")
    assert out.strip().endswith("ok")


@pytest.fixture(scope="module")
def default_corpus(tmp_path_factory):
    cache = tmp_path_factory.mktemp("data_cache")
    real_connect = socket.socket.connect

    def offline(*args):
        raise AssertionError("prepare() tried to use the network")

    socket.socket.connect = offline  # the default corpus must build with no network at all
    try:
        return cache, data.prepare(cache)
    finally:
        socket.socket.connect = real_connect


def test_default_corpus_builds_offline_with_three_nontrivial_domains(default_corpus):
    cache, info = default_corpus
    assert set(info["stats"]) == {"code", "knowledge", "math"}
    for domain, s in info["stats"].items():
        assert s["bytes"] > 500_000, domain
        assert s["train_docs"] > 10 and s["val_docs"] >= 1, domain
    train, val = data.load_tokens(info, "train"), data.load_tokens(info, "val")
    assert len(train) == info["tokens"]["train"] and len(val) == info["tokens"]["val"]
    assert train.dtype == np.uint8 and info["eos"] == 0 and info["vocab_size"] == 256
    docs = sum(s["train_docs"] + s["val_docs"] for s in info["stats"].values())
    assert int((np.asarray(train) == 0).sum() + (np.asarray(val) == 0).sum()) == docs  # one eos each
    assert data.describe_load_report(info) == ""  # nothing skipped: train.py logs no line


def test_stats_command_prints_every_domain_and_reuses_the_cache(default_corpus, capsys):
    cache, info = default_corpus
    assert data.main(["stats", "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    for domain in ("code", "knowledge", "math"):
        assert re.search(rf"^{domain}\s+[\d,]+\s+[\d,]+\s+[\d,]+\s+[\d,]+", out, re.M), out
    assert "unigram entropy" in out and "(reused)" in out and info["key"] in out


def write_docs(folder: Path, texts):
    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(texts):
        (folder / f"doc{i:03d}.txt").write_text(text, encoding="utf-8")


def test_cache_is_reused_and_rebuilt_only_when_inputs_change(tmp_path):
    write_docs(tmp_path / "docs", [f"text number {i}\n" * 5 for i in range(10)])
    src = [str(tmp_path / "docs")]
    first = data.prepare(tmp_path / "cache", src)
    again = data.prepare(tmp_path / "cache", src)
    assert not first["cached"] and again["cached"] and again["key"] == first["key"]
    changed_settings = data.prepare(tmp_path / "cache", src, val_fraction=0.3)
    assert not changed_settings["cached"] and changed_settings["key"] != first["key"]
    (tmp_path / "docs" / "doc003.txt").write_text("new content, different size\n")
    changed_input = data.prepare(tmp_path / "cache", src)
    assert not changed_input["cached"] and changed_input["key"] not in (first["key"], changed_settings["key"])
    assert not list((tmp_path / "cache").glob("tmp-*"))  # built aside, renamed into place


def test_empty_non_utf8_enormous_and_bad_json_inputs_are_counted_not_fatal(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "empty.txt").write_bytes(b"")
    (d / "blank.md").write_text("  \n\n ")
    (d / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me br\u00fbl\u00e9e".encode("latin-1"))
    rng = random.Random(0)
    huge_line = " ".join(map(str, range(350_000)))  # one 2.3 MB line
    (d / "huge.txt").write_text(huge_line)
    (d / "nospace.py").write_text("".join(rng.choices("xyz", k=250_000)))
    lines = [json.dumps({"text": "a good record"}), "{not json", json.dumps({"title": "no text"}),
             "", json.dumps({"text": "".join(rng.choices("abc", k=300_000))}), json.dumps({"text": ""})]
    (d / "records.jsonl").write_bytes("\n".join(lines).encode() + b"\n" + b'{"text": "bad \xff byte"}\n')
    info = data.prepare(tmp_path / "cache", [str(d)], max_doc_chars=100_000)
    report = info["load_report"]
    assert report["files"] == 6
    assert report["empty_documents"] == 3  # empty.txt, blank.md, the jsonl record with ""
    assert report["non_utf8_files"] == 1
    assert report["bad_json_lines"] == 3  # "{not json", no "text", the non-UTF-8 line
    assert report["split_documents"] == 3  # huge.txt, nospace.py, the 300 kB record
    assert report["duplicate_documents"] == 0
    assert any("records.jsonl:2:" in p for p in report["problems"])
    assert any("records.jsonl:7:" in p for p in report["problems"])
    tokens = np.concatenate([data.load_tokens(info, "train"), data.load_tokens(info, "val")])
    n_docs = report["documents"]
    expected = len(huge_line) + 250_000 + 300_000 + len("a good record") + len("caf\ufffd cr\ufffdme br\ufffdl\ufffde".encode())
    assert len(tokens) == expected + n_docs  # every byte kept, one eos per document
    assert "caf\ufffd" in data.ByteTokenizer().decode(tokens.tolist())


def test_bad_encoding_lines_and_unsupported_files_are_counted_and_described(tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    lines = [json.dumps({"text": f"good record {i}"}) for i in range(60)]
    lines.insert(40, '{"text": "half an emoji \\udc80 here"}')  # valid JSON, no UTF-8 exists for it
    (d / "records.jsonl").write_text("\n".join(lines) + "\n")
    (d / "paper.pdf").write_bytes(b"%PDF-1.4")
    info = data.prepare(tmp_path / "cache", [str(d)])
    report = info["load_report"]
    assert report["bad_encoding_lines"] == 1 and report["unsupported_files"] == 1 and report["documents"] == 60
    line = data.describe_load_report(info)
    assert "\n" not in line and "1 bad encoding lines" in line and "1 unsupported files" in line
    assert "records.jsonl:41" in line and "paper.pdf" in line
    assert data.main(["stats", "--data", str(d), "--cache-dir", str(tmp_path / "cache")]) == 0
    assert "bad_encoding_lines 1" in capsys.readouterr().out


def test_a_full_disk_while_caching_names_the_path_and_leaves_the_previous_state(tmp_path, monkeypatch, capsys):
    write_docs(tmp_path / "docs", [f"text number {i}\n" * 5 for i in range(10)])
    src, cache = [str(tmp_path / "docs")], tmp_path / "cache"
    previous = data.prepare(cache, src)
    (tmp_path / "docs" / "doc003.txt").write_text("changed, so a new cache entry is built\n")

    def full_disk(path, *args):
        path.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(data, "_write_tokens", full_disk)
    with pytest.raises(OSError) as failure:
        data.prepare(cache, src)
    assert failure.value.errno == errno.ENOSPC and str(cache) in failure.value.filename
    assert [p.name for p in cache.iterdir()] == [previous["key"]]  # no tmp-<key>-<pid> left
    assert data.main(["stats", "--data", *src, "--cache-dir", str(cache)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "No space left on device" in err and str(cache) in err


def wait_for(condition, seconds=60):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def test_an_interrupted_cache_build_leaves_nothing_the_next_build_keeps(tmp_path):
    # A build killed while it writes its temporary folder; the next prepare() removes that folder.
    write_docs(tmp_path / "docs", [f"document {i} " + "words and more words. " * 70_000 for i in range(4)])
    cache = tmp_path / "cache"
    code = f"import data; data.prepare({str(cache)!r}, [{str(tmp_path / 'docs')!r}])"
    build = subprocess.Popen([sys.executable, "-c", code], cwd=HERE)
    try:
        wait_for(lambda: list(cache.glob("tmp-*")) or build.poll() is not None)
        build.send_signal(signal.SIGKILL)
    finally:
        build.kill()
        build.wait()
    [stale] = list(cache.glob("tmp-*"))
    alive = cache / stale.name.replace(f"-{build.pid}@", "-1@")  # a build whose process (init) still runs
    alive.mkdir()
    info = data.prepare(cache, [str(tmp_path / "docs")])
    assert not stale.exists() and alive.exists()
    assert sorted(p.name for p in cache.iterdir()) == sorted([alive.name, info["key"]])


def without_root_override():
    """The command prefix under which a mode-000 file cannot be read: none for a user; for root (who
    reads anything), setpriv without the capabilities that override file permissions."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: no file is unreadable")
    return ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search", "--"]


def test_an_unreadable_data_file_is_named_as_such(tmp_path):
    path = tmp_path / "unreadable.txt"
    path.write_text("secret")
    path.chmod(0)
    done = subprocess.run([*without_root_override(), sys.executable, str(DATA_PY), "stats", "--data", str(path),
                           "--cache-dir", str(tmp_path / "cache")], capture_output=True, text=True, timeout=60)
    err = done.stderr.strip()
    assert done.returncode == 2 and "\n" not in err and "Traceback" not in err, err
    assert f"data.py stats: data source '{path}': {path} cannot be read (Permission denied)" == err
    path.chmod(0o644)
    assert path.read_text() == "secret" and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("case, message", [
    ("fifo", "pipe.txt is a FIFO (named pipe), not a file or folder"),
    ("loop", "loop.txt is a symlink loop, not a file or folder"),
    ("broken link", "broken.txt is a broken symbolic link (to nowhere.txt), not a file or folder"),
])
def test_a_data_path_that_is_no_file_is_named_for_what_it_is(tmp_path, case, message, capsys):
    path = tmp_path / {"fifo": "pipe.txt", "loop": "loop.txt", "broken link": "broken.txt"}[case]
    if case == "fifo":
        os.mkfifo(path)  # opened, it would block forever
    elif case == "loop":
        os.symlink(tmp_path / "other.txt", path)
        os.symlink(path, tmp_path / "other.txt")
    else:
        os.symlink("nowhere.txt", path)
    assert data.main(["stats", "--data", str(path), "--cache-dir", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.endswith(message), err


def test_bad_entries_in_a_folder_are_skipped_and_counted_and_nul_bytes_reported(tmp_path):
    d = tmp_path / "in"
    write_docs(d, ["A good document.", "Another one."])
    (d / "unreadable.txt").write_text("secret")
    (d / "unreadable.txt").chmod(0)
    os.mkfifo(d / "pipe.txt")  # read, it would block forever
    os.symlink(d / "b.txt", d / "a.txt")
    os.symlink(d / "a.txt", d / "b.txt")
    (d / "nul.txt").write_bytes(b"before\0after\0")
    done = subprocess.run([*without_root_override(), sys.executable, str(DATA_PY), "stats", "--data", str(d),
                           "--cache-dir", str(tmp_path / "cache")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    loader = re.search(r"^loader: (.*)$", done.stdout, re.M)[1]
    assert "unreadable_files 1" in loader and "unsupported_files 3" in loader and "nul_bytes 2" in loader
    for where, why in (("unreadable.txt", "cannot be read (Permission denied); skipped"),
                       ("pipe.txt", "a FIFO (named pipe); skipped"), ("a.txt", "a symlink loop; skipped"),
                       ("nul.txt", "2 NUL characters, which the byte tokenizer reads as end of document")):
        assert re.search(rf"^  \S*{re.escape(where)}: {re.escape(why)}$", done.stdout, re.M), (where, done.stdout)
    info = data.prepare(tmp_path / "cache2", [str(d / "nul.txt")], val_fraction=0)
    assert "2 nul bytes" in data.describe_load_report(info)
    tokens = np.concatenate([data.load_tokens(info, "train"), data.load_tokens(info, "val")])
    assert data.ByteTokenizer().decode(tokens.tolist()) == "before\0after\0\0"  # kept, then the eos


# -----------------------------------------------------------------------------------------------
# Verified on read: the token cache records each file's length and SHA-256 and is checked before use


def tokens_of(info):
    return np.concatenate([data.load_tokens(info, "train"), data.load_tokens(info, "val")]).tobytes()


def flip(path, offset, mask=0x01):
    raw = bytearray(path.read_bytes())
    raw[offset % len(raw)] ^= mask
    path.write_bytes(bytes(raw))


@pytest.fixture
def small_cache(tmp_path):
    write_docs(tmp_path / "docs", [f"Document {i} holds fact {i * 7}.\n" * 20 for i in range(8)])
    write_docs(tmp_path / "other", [f"Another corpus, text {i}.\n" * 30 for i in range(5)])
    src, cache = [str(tmp_path / "docs")], tmp_path / "cache"
    info = data.prepare(cache, src)
    return src, cache, info, tokens_of(info)


@pytest.mark.parametrize("fault, named", [
    ("flip train.bin", "train.bin fails its SHA-256 check"),
    ("cut val.bin to a third", "val.bin is"),
    ("another corpus's files", "belongs to another corpus's cache"),
    ("no meta.json", "has no meta.json"),
    ("edit meta.json", "meta.json fails its check"),
])
def test_a_corrupt_or_half_built_token_cache_is_rebuilt_never_trained_on(small_cache, tmp_path, fault, named):
    src, cache, info, expected = small_cache
    folder = Path(info["dir"])
    if fault == "flip train.bin":
        flip(folder / "train.bin", 5)
    elif fault == "cut val.bin to a third":
        (folder / "val.bin").write_bytes((folder / "val.bin").read_bytes()[:info["files"]["val.bin"]["bytes"] // 3])
    elif fault == "another corpus's files":
        other = data.prepare(tmp_path / "cache2", [str(tmp_path / "other")])
        for name in data.CACHE_FILES:
            shutil.copy(Path(other["dir"], name), folder / name)
    elif fault == "no meta.json":  # a copy that stopped early: it used to block every rebuild
        (folder / "meta.json").unlink()
    else:  # still valid JSON, one number changed
        meta = (folder / "meta.json").read_text()
        (folder / "meta.json").write_text(meta.replace('"val_fraction": 0.05', '"val_fraction": 0.06'))
    again = data.prepare(cache, src)
    assert not again["cached"] and named in again["rebuilt"] and str(folder) in again["rebuilt"]
    line = data.describe_load_report(again)
    assert "\n" not in line and line.startswith("data: token cache rebuilt:") and named in line
    assert tokens_of(again) == expected  # the same tokens as the first build
    assert sorted(p.name for p in cache.iterdir()) == [info["key"]]  # nothing left aside
    assert data.prepare(cache, src)["cached"]


def test_a_token_file_changed_after_prepare_is_refused_naming_it(small_cache):
    src, cache, info, expected = small_cache
    train = Path(info["train"])
    train.write_bytes(train.read_bytes()[:-3])  # cut after prepare verified it: the length is checked on every load
    with pytest.raises(data.CorruptFile, match=f"token file {re.escape(str(train))} is .* bytes, but"):
        data.load_tokens(info, "train")


def test_a_users_files_in_the_cache_are_left_alone(small_cache, tmp_path):
    # Hostile pass: a user's file inside a key folder, and a user's folder named like a stale build.
    src, cache, info, expected = small_cache
    folder = Path(info["dir"])
    (folder / "meta.json").unlink()
    (folder / "notes.txt").write_text("mine")
    stale = cache / f"tmp-{info['key']}-999999999@{socket.gethostname()}"  # no such pid
    stale.mkdir()
    (stale / "thesis.tex").write_text("mine too")
    with pytest.raises(data.DataError, match=f"{re.escape(str(folder))} holds 'notes.txt', which this program did not"):
        data.prepare(cache, src)
    assert (folder / "notes.txt").read_text() == "mine" and (stale / "thesis.tex").read_text() == "mine too"
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "train.bin", "val.bin"]  # nothing moved


def test_each_token_file_is_hashed_once_per_process_and_its_length_checked_on_every_load(small_cache, monkeypatch):
    src, cache, info, expected = small_cache
    hashed, real_digest = [], data.digest
    monkeypatch.setattr(data, "digest", lambda path: hashed.append(Path(path).name) or real_digest(path))
    data._VERIFIED.clear()  # as in a fresh process
    info = data.prepare(cache, src)
    for _ in range(3):
        assert tokens_of(info) == expected
    assert sorted(hashed) == ["train.bin", "val.bin"]


# -----------------------------------------------------------------------------------------------
# One error boundary: signals, unexpected errors, faults at random


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_during_data_preparation_ends_in_one_line_and_leaves_no_half_build(tmp_path, signum):
    write_docs(tmp_path / "docs", [f"document {i} " + "words and more words. " * 40_000 for i in range(6)])
    cache = tmp_path / "cache"
    command = [sys.executable, str(DATA_PY), "stats", "--data", str(tmp_path / "docs"), "--cache-dir", str(cache)]
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: list(cache.glob("tmp-*")) or run.poll() is not None)
    run.send_signal(signum)
    err = run.communicate(timeout=60)[1].strip()
    assert run.returncode == 128 + signum, err
    name = signal.Signals(signum).name
    assert err == f"data.py stats: interrupted ({name}); what was written stays, and the same command resumes"
    assert not list(cache.glob("tmp-*"))  # the temporary folder went with it
    assert data.prepare(cache, [str(tmp_path / "docs")])["tokens"]["train"] > 0


def test_an_unexpected_error_is_one_line_naming_a_saved_traceback(tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("something no one foresaw")

    monkeypatch.setattr(data, "prepare", broken)
    before = signal.getsignal(signal.SIGTERM)
    assert data.main(["stats", "--data", "builtin:math", "--cache-dir", str(tmp_path / "cache")]) == 1
    assert signal.getsignal(signal.SIGTERM) is before  # the boundary puts the handlers back
    err = capsys.readouterr().err.strip()
    m = re.fullmatch(r"data\.py stats: unexpected error: RuntimeError: something no one foresaw "
                     r"\(traceback saved to (\S+)\)", err)
    assert m, err
    saved = Path(m[1]).read_text()
    assert "Traceback" in saved and "in broken" in saved
    Path(m[1]).unlink()


def test_random_faults_in_the_token_cache_end_in_the_same_tokens_or_a_one_line_refusal(tmp_path, monkeypatch):
    # Fault injection: each run starts from a good cache folder, breaks it at random (bytes flipped
    # or cut in any of its files, a file removed, another corpus's files in their place, or a full
    # disk while the rebuild writes), then prepares and loads. Every run must end with the very
    # tokens of a clean build, or in one line naming the file (and then a clean build).
    rng = random.Random(24)
    write_docs(tmp_path / "docs", [f"Document {i} holds fact {i * 7}.\n" * rng.randint(5, 30) for i in range(8)])
    write_docs(tmp_path / "other", [f"Another corpus, text {i}.\n" * 30 for i in range(5)])
    src = [str(tmp_path / "docs")]
    first = data.prepare(tmp_path / "pristine", src)
    expected, key = tokens_of(first), first["key"]
    other = data.prepare(tmp_path / "foreign", [str(tmp_path / "other")])
    outcomes = {}
    for run in range(60):
        cache = tmp_path / f"run{run}"
        shutil.copytree(first["dir"], cache / key)
        target = cache / key / rng.choice(data.CACHE_FILES)
        fault = rng.choice(["flip", "cut", "remove", "foreign", "full disk"])
        if fault == "flip":
            for _ in range(rng.randint(1, 3)):
                flip(target, rng.randrange(target.stat().st_size), 1 << rng.randrange(8))
        elif fault == "cut":
            target.write_bytes(target.read_bytes()[:rng.randrange(target.stat().st_size)])
        elif fault == "remove":
            target.unlink()
        elif fault == "foreign":
            shutil.copy(Path(other["dir"], target.name), target)
        outcome = "same tokens"
        with monkeypatch.context() as patch:
            if fault == "full disk":
                flip(cache / key / "train.bin", 0)  # forces a rebuild, which the disk cannot hold
                budget = rng.randrange(1, 200)

                def full_disk(path, docs, tokenizer, dtype):
                    path.write_bytes(b"\0" * budget)
                    raise OSError(errno.ENOSPC, "No space left on device")
                patch.setattr(data, "_write_tokens", full_disk)
            try:
                info = data.prepare(cache, src)
            except OSError as e:
                assert fault == "full disk" and e.errno == errno.ENOSPC and str(cache) in e.filename
                outcome = "full disk named, then the same tokens"
        if outcome != "same tokens":
            info = data.prepare(cache, src)
        assert tokens_of(info) == expected, (run, fault, target.name)
        assert sorted(p.name for p in cache.iterdir()) == [key]
        outcome += " (rebuilt)" if info.get("rebuilt") else ""
        outcomes[f"{fault}: {outcome}"] = outcomes.get(f"{fault}: {outcome}", 0) + 1
    print(outcomes)
    assert sum(outcomes.values()) == 60 and not any("flip: same tokens" == k for k in outcomes)


def test_kills_at_random_moments_of_a_cache_build_end_in_the_same_tokens(tmp_path):
    rng = random.Random(7)
    write_docs(tmp_path / "docs", [f"document {i} " + "words and more words. " * 20_000 for i in range(4)])
    src = [str(tmp_path / "docs")]
    expected = tokens_of(data.prepare(tmp_path / "reference", src))
    cache = tmp_path / "cache"
    code = f"import data; data.prepare({str(cache)!r}, {src!r})"
    for _ in range(3):
        build = subprocess.Popen([sys.executable, "-c", code], cwd=HERE)
        time.sleep(rng.uniform(0.5, 4.0))
        build.kill()
        build.wait()
        data._VERIFIED.clear()  # as in a fresh process
        assert tokens_of(data.prepare(cache, src)) == expected
        assert [p.name for p in cache.iterdir()] == [data.prepare(cache, src)["key"]]


def test_a_full_disk_under_write_atomically_names_the_file_and_leaves_the_old_one(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text("old")

    def full_disk(f):
        f.write("half")
        raise OSError(errno.ENOSPC, "No space left on device")  # as f.write reports it: no file name

    with pytest.raises(OSError) as failure:
        data.write_atomically(path, full_disk)
    assert failure.value.errno == errno.ENOSPC and failure.value.filename == str(path)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_a_users_jsonl_with_its_own_check_or_key_fields_is_plain_training_text(tmp_path):
    lines = [{"key": "id-1", "text": "A user's record."}, {"text": "Another one.", "check": "0123456789abcdef"}]
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    info = data.prepare(tmp_path / "cache", [str(tmp_path / "mine.jsonl")])
    assert info["load_report"]["documents"] == 2 and info["load_report"]["bad_json_lines"] == 0
