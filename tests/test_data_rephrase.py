"""The corpus-scale rephrasing client (data_rephrase.py) against a real chat-completions server on
127.0.0.1 (bench.py's fake server) and in real processes: backends, retries and deadlines, resume
after kills and signals, content keys, shards, the output lock, files it must not touch.

    python -m pytest -q tests/test_data_rephrase.py
"""
import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import bench
import data
import data_rephrase
import train
from conftest import HERE, run_alone
from kimik2 import Config, KimiK2

DATA_PY = Path(HERE, "data.py")


def test_data_rephrase_py_copied_with_data_py_rephrases_a_corpus_and_runs_data_py_stats(tmp_path):
    out = run_alone(tmp_path, ["data.py", "data_rephrase.py"], """
import json, data, data_rephrase
from pathlib import Path
Path("doc.txt").write_text("One fact: 7.")
pairs = [(data.Document("user", "doc.txt", "One fact: 7."), "qa")]
summary = data_rephrase.rephrase_corpus(pairs, lambda m: "The fact: 7.", "out.jsonl", log=lambda line: None)
assert summary["records"] == 1 and data_rephrase.rephrase_corpus is data_rephrase.rephrase_corpus
[record] = [json.loads(line) for line in open("out.jsonl")]
assert record["text"] == "The fact: 7."
assert data.main(["stats", "--data", "out.jsonl", "--cache-dir", "cache"]) == 0  # data.py's command line
""")
    assert out.strip().endswith("ok")


def write_docs(folder: Path, texts):
    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(texts):
        (folder / f"doc{i:03d}.txt").write_text(text, encoding="utf-8")


@pytest.fixture(scope="module")
def server():
    with bench.FakeChatServer() as server:  # the rephrasing bench's server, scripted per model name
        yield server


def chat_endpoint(server, model, **kw):
    return data_rephrase.ChatEndpoint(server.url, model, **{"timeout": 2.0, "retries": 2, "backoff": 0.01, **kw})


def requests_of(server, model):
    return [r for r in server.requests if r["model"] == model]


def make_pairs(texts, domain="user"):
    return [(data.Document(domain, f"doc{i}", text), "qa") for i, text in enumerate(texts)]


def read_records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def rephrase_command(docs, out, server, model, *extra):
    return [sys.executable, str(DATA_PY), "rephrase", str(docs), "--endpoint", server.url, "--model", model,
            "--out", str(out), "--max-chunk-chars", "50", "--timeout", "5", "--backoff", "0.01", *extra]


def wait_for(condition, seconds=60):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


@pytest.mark.parametrize("failure, message", [("500", "HTTP 500: .*scripted 500"), ("429", "HTTP 429"),
                                              ("hang", "timed out"), ("badjson", "malformed"),
                                              ("drop", "RemoteDisconnected")])
def test_server_errors_are_retried_then_reported(server, failure, message):
    timeout = 0.5 if failure == "hang" else 2.0
    server.scripts[f"flaky-{failure}"] = [failure, failure]
    messages = data.rephrase_messages("One sentence.", "qa")
    reply = chat_endpoint(server, f"flaky-{failure}", timeout=timeout)(messages)
    assert reply == "In other words: One sentence."
    assert len(requests_of(server, f"flaky-{failure}")) == 3
    server.scripts[f"down-{failure}"] = [failure] * 3
    with pytest.raises(data.GenerationError, match=f"after 3 attempts.*{message}"):
        chat_endpoint(server, f"down-{failure}", timeout=timeout)(messages)


def test_other_client_errors_fail_at_once_with_status_and_body(server):
    server.scripts["bad-request"] = ["400"]
    with pytest.raises(data.GenerationError, match="HTTP 400: .*scripted 400"):
        chat_endpoint(server, "bad-request")(data.rephrase_messages("x", "qa"))
    assert len(requests_of(server, "bad-request")) == 1


@pytest.mark.parametrize("concurrency, delay", [(1, 0.05), (4, 0.25)])
def test_killed_rephrase_run_resumes_with_each_document_and_style_exactly_once(server, tmp_path, capsys,
                                                                                concurrency, delay):
    texts = [f"Document {i} opens here. It has 2 sentences.\n\nAnd a second paragraph, number {i}." for i in range(6)]
    write_docs(tmp_path / "docs", texts)
    out = tmp_path / "out.jsonl"
    model = f"slow-{concurrency}"
    server.delay[model] = delay
    command = [sys.executable, str(DATA_PY), "rephrase", str(tmp_path / "docs"), "--endpoint", server.url,
               "--model", model, "--styles", "2", "--out", str(out), "--max-chunk-chars", "50",
               "--timeout", "5", "--backoff", "0.01", "--concurrency", str(concurrency)]
    run = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while (not out.exists() or out.read_bytes().count(b"\n") < 2) and time.time() < deadline:
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)
    run.wait()
    records_at_kill = out.read_bytes().count(b"\n")
    assert 2 <= records_at_kill < 12, "the kill must land mid-run"
    with open(out, "ab") as f:
        f.write(b'{"key": "half a rec')  # what a kill in the middle of a write leaves
    assert data.main(command[2:]) == 0  # the same command resumes (in this process: no second start-up)
    finished = capsys.readouterr()
    assert "ETA" in finished.err and "chunks" in finished.err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    keys = [(r["id"], r["style"]) for r in records]
    assert len(keys) == len(set(keys)) == 12
    assert {k[0] for k in keys} == {str(tmp_path / "docs" / f"doc{i:03d}.txt") for i in range(6)}
    assert all(r["text"].startswith("In other words:") and r["similarity_min"] > 0 for r in records)
    assert server.max_inflight[model] >= concurrency  # the pairs really were concurrent (a retry may add one)
    assert re.search(rf"pairs {12 - records_at_kill}/{12 - records_at_kill}, documents 6/6", finished.err)


def test_checkpoint_backend_prompts_kimik2_generate_and_stops_at_eos(monkeypatch):
    seen = {}

    class FakeModel:
        config = types.SimpleNamespace(max_position_embeddings=64)

        def to(self, device):
            return self

        def eval(self):
            return self

        def generate(self, input_ids, max_new_tokens, temperature=1.0, top_k=None):
            seen["prompt"] = data.ByteTokenizer().decode(input_ids[0].tolist())
            reply = torch.tensor([list(b"rewritten") + [0] + list(b"junk")])
            return torch.cat([input_ids, reply], dim=1)

    fake = types.SimpleNamespace(KimiK2=types.SimpleNamespace(from_pretrained=lambda path: FakeModel()))
    monkeypatch.setitem(sys.modules, "kimik2", fake)
    generate = data_rephrase.CheckpointGenerator("some/dir", max_new_tokens=16)
    assert generate(data.rephrase_messages("A source chunk.", "qa")) == "rewritten"
    assert len(seen["prompt"]) == 64 - 16 and seen["prompt"].endswith("</source>\n\nassistant: ")


def test_checkpoint_backend_replies_with_kimik2s_greedy_continuation(tmp_path):
    torch.manual_seed(0)
    config = Config(**{**Config.from_preset("tiny").to_dict(), "num_hidden_layers": 2, "n_routed_experts": 4,
                       "num_experts_per_tok": 2})
    KimiK2(config).save_pretrained(str(tmp_path))
    messages = data.rephrase_messages("Hi.", "qa")
    reply = data_rephrase.CheckpointGenerator(str(tmp_path), max_new_tokens=8, temperature=0)(messages)
    # The reference: the same prompt, greedy by full forwards without a cache, cut at eos, decoded.
    model = KimiK2.from_pretrained(str(tmp_path)).eval()
    tokenizer = data.ByteTokenizer()
    ids = tokenizer.encode("".join(f"{m['role']}: {m['content']}\n\n" for m in messages) + "assistant: ")
    new = []
    with torch.no_grad():
        for _ in range(8):
            new.append(int(model(torch.tensor([ids + new]))[0][0, -1].argmax()))
    expected = tokenizer.decode(new[:new.index(tokenizer.eos)] if tokenizer.eos in new else new)
    assert reply == expected


def test_shards_partition_the_pairs_of_a_single_run(server, tmp_path):
    write_docs(tmp_path / "docs", [f"Fact {i}: the answer is {i * 7}." for i in range(9)])
    common = ["rephrase", str(tmp_path / "docs"), "--endpoint", server.url, "--model", "shards",
              "--styles", "2", "--concurrency", "2", "--backoff", "0.01"]
    assert data.main(common + ["--out", str(tmp_path / "all.jsonl")]) == 0
    single = {(r["id"], r["style"]): r["text"] for r in read_records(tmp_path / "all.jsonl")}
    shards = []
    for i in range(3):
        assert data.main(common + ["--shard", f"{i}/3", "--out", str(tmp_path / f"shard{i}.jsonl")]) == 0
        shards.append({(r["id"], r["style"]): r["text"] for r in read_records(tmp_path / f"shard{i}.jsonl")})
    assert len(single) == 18 and all(shards)
    assert sum(len(s) for s in shards) == len(single)  # no overlap
    assert {k: v for s in shards for k, v in s.items()} == single  # no gap, same records


def test_retry_after_from_one_request_pauses_every_worker(server, tmp_path):
    server.scripts["pause"] = ["429-wait"]  # the first request is told to come back in 1 s
    server.delay["pause"] = 0.02
    texts = [f"Short document {i}.\n\nIts second paragraph." for i in range(8)]
    generate = chat_endpoint(server, "pause", backoff=0.01)
    summary = data_rephrase.rephrase_corpus(make_pairs(texts), generate, tmp_path / "out.jsonl", concurrency=4,
                                   log=lambda line: None, max_chunk_chars=30)
    assert summary["records"] == 8 and summary["ok"] == 16 and summary["error"] is None
    times = [t for model, t in server.arrivals if model == "pause"]
    refused = times[0]
    # Requests already on the wire finish; after that nobody sends until Retry-After has passed
    # (a per-worker backoff of 0.01 s would send dozens in this window).
    assert not [t for t in times if refused + 0.3 < t < refused + 0.95]
    assert server.max_inflight["pause"] > 1


def test_progress_eta_counts_wall_time_of_concurrent_pairs():
    pairs = make_pairs(["x" * 100] * 8)
    now = [0.0]
    progress = data_rephrase._Progress(pairs, pairs, clock=lambda: now[0])
    now[0] = 1.0  # four pairs in flight together finish after one second
    lines = [progress.done(doc, 2) for doc, _ in pairs[:4]]
    assert "pairs 4/8, documents 4/8, chunks 8 | 8.00 chunks/s | ETA 00:00:01" in lines[-1]


def test_empty_and_invalid_unicode_replies_are_reported_never_silent(server, tmp_path, capsys):
    write_docs(tmp_path / "docs", ["Alpha has 1 fact.", "Beta has 2 facts."])
    common = ["rephrase", str(tmp_path / "docs"), "--endpoint", server.url, "--backoff", "0.01",
              "--fidelity-retries", "1"]
    server.scripts["empty"] = ["empty"] * 4
    assert data.main(common + ["--model", "empty", "--out", str(tmp_path / "empty.jsonl")]) == 0
    err = capsys.readouterr().err
    assert "chunks: 0 rewritten, 2 kept their original text" in err and "4 empty replies" in err
    assert "warning: no chunk was rewritten" in err
    assert [c["empty_replies"] for r in read_records(tmp_path / "empty.jsonl") for c in r["chunks"]] == [2, 2]
    server.scripts["surrogate"] = ["surrogate"] * 2
    assert data.main(common + ["--model", "surrogate", "--out", str(tmp_path / "bad.jsonl")]) == 0
    assert "2 replies with invalid Unicode repaired" in capsys.readouterr().err
    assert all(r["text"].startswith("In other words \ufffd:") for r in read_records(tmp_path / "bad.jsonl"))


@pytest.mark.parametrize("case, fragment", [
    ("missing path", "nowhere': no such file or folder"),
    ("builtin:physics", "unknown built-in domain(s) ['physics']"),
    ("--styles 9", "argument --styles: must be an integer in [1, 7], got '9'"),
    ("--styles -2", "argument --styles: must be an integer in [1, 7], got '-2'"),
    ("--styles 0", "argument --styles: must be an integer in [1, 7], got '0'"),
    ("record-less --out", "out.jsonl:1: not a rephrase record"),
    ("folder --out", "not a file"),
    ("empty folder", "no .txt/.md/.py/.jsonl files in"),
    ("unsupported only", "no .txt/.md/.py/.jsonl files in"),
    ("--shard 3/3", "argument --shard: expected I/N with 0 <= I < N, got '3/3'"),
    ("--concurrency 0", "argument --concurrency: must be an integer >= 1, got '0'"),
    ("bad weight", "weight 'lots' is not a number >= 0"),
])
def test_bad_command_line_input_gives_one_line_naming_it(case, fragment, tmp_path, capsys):
    write_docs(tmp_path / "docs", ["One document."])
    (tmp_path / "empty").mkdir()
    (tmp_path / "pdfs").mkdir()
    (tmp_path / "pdfs" / "a.pdf").write_bytes(b"%PDF")
    (tmp_path / "out.jsonl").write_text("not a record\n")
    rephrase = ["rephrase", "--endpoint", "http://127.0.0.1:9/v1", "--out", str(tmp_path / "new.jsonl")]
    argv = {"missing path": rephrase + [str(tmp_path / "nowhere")],
            "builtin:physics": ["stats", "--data", "builtin:physics", "--cache-dir", str(tmp_path / "c")],
            "--styles 9": rephrase + [str(tmp_path / "docs"), "--styles", "9"],
            "--styles -2": rephrase + [str(tmp_path / "docs"), "--styles", "-2"],
            "--styles 0": rephrase + [str(tmp_path / "docs"), "--styles", "0"],
            "record-less --out": rephrase + [str(tmp_path / "docs"), "--out", str(tmp_path / "out.jsonl")],
            "folder --out": rephrase + [str(tmp_path / "docs"), "--out", str(tmp_path / "empty")],
            "empty folder": rephrase + [str(tmp_path / "empty")],
            "unsupported only": ["stats", "--data", str(tmp_path / "pdfs"), "--cache-dir", str(tmp_path / "c")],
            "--shard 3/3": rephrase + [str(tmp_path / "docs"), "--shard", "3/3"],
            "--concurrency 0": rephrase + [str(tmp_path / "docs"), "--concurrency", "0"],
            "bad weight": ["stats", "--data", f"k:lots={tmp_path / 'docs'}", "--cache-dir", str(tmp_path / "c")],
            }[case]
    try:
        code = data.main(argv)
    except SystemExit as e:  # argparse: usage, then one error line
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err
    assert fragment in err.splitlines()[-1], err
    assert not (tmp_path / "new.jsonl").exists() or not (tmp_path / "new.jsonl").read_bytes()


def test_rephrased_output_trains_as_its_own_domain_with_its_stated_weight(server, tmp_path):
    # corpus -> rephrase -> stats -> train: the fake rephraser ("upper") writes the source in
    # capitals, so every training byte tells which domain it came from.
    rng = random.Random(0)
    write_docs(tmp_path / "docs", [" ".join("".join(rng.choices("ab", k=5)) for _ in range(40))
                                         for _ in range(30)])
    out = tmp_path / "rephrased.jsonl"
    assert data.main(["rephrase", str(tmp_path / "docs"), "--endpoint", server.url, "--model", "upper",
                      "--out", str(out), "--concurrency", "4", "--backoff", "0.01"]) == 0
    sources = [f"knowledge={tmp_path / 'docs'}", f"rephrased:3={out}"]
    info = data.prepare(tmp_path / "cache", sources, val_fraction=0.1)
    assert info["load_report"]["documents"] == 60 and info["stats"]["rephrased"]["val_docs"] == 3
    sampler = data.BatchSampler(data.load_tokens(info, "train"), 8, 64, seed=1)
    drawn = np.concatenate([sampler.next()[0].flatten().numpy() for _ in range(100)])
    lower, upper = np.isin(drawn, [ord("a"), ord("b")]).sum(), np.isin(drawn, [ord("A"), ord("B")]).sum()
    assert upper / lower == pytest.approx(3, rel=0.1)  # drawn in proportion to the weights 1 : 3
    with pytest.raises(data.DataError, match="already has weight 3"):
        data.prepare(tmp_path / "cache", sources + [f"rephrased:2={out}"])
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**train.Config.from_preset("tiny").to_dict(), "num_hidden_layers": 1,
                                  "n_routed_experts": 4, "num_experts_per_tok": 2}))
    train.main(["--data", *sources, "--data-cache", str(tmp_path / "cache"), "--config", str(config),
                "--out", str(tmp_path / "run"), "--max-steps", "2", "--warmup-steps", "1", "--batch-size", "2",
                "--seq-len", "32", "--eval-interval", "2", "--eval-iters", "1", "--sample-tokens", "0",
                "--dtype", "float32", "--device", "cpu", "--peak-flops", "1e9"])
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") >= 2


def test_bench_throughput_is_bounded_by_the_fake_servers_latency_and_capacity():
    latency, capacity = 0.05, 2
    rows = bench.bench_rephrase(levels=(1, 2, 4), latency=latency, capacity=capacity, chunks_per_doc=1)
    by = {r["concurrency"]: r for r in rows}
    assert sorted(by) == [1, 2, 4] and all(r["pairs"] == 20 and r["cpu_ms_per_chunk"] > 0 for r in rows)
    for concurrency, row in by.items():  # each pair holds one of `capacity` slots for `latency` seconds
        assert row["pairs_per_s"] <= min(concurrency, capacity) / latency
    assert by[2]["pairs_per_s"] > 1.4 * by[1]["pairs_per_s"]  # two in flight overlap their waits


def test_a_second_rephrase_on_one_out_is_refused_naming_the_holder_and_a_dead_ones_lock_is_taken_over(
        server, tmp_path, capsys):
    write_docs(tmp_path / "docs", [f"Document {i} says {i}.\n\nIts paragraph {i}." for i in range(6)])
    out, lock = tmp_path / "out.jsonl", tmp_path / "out.jsonl.lock"
    server.delay["locked"] = 3.0  # slow enough that the first run is still going when the second starts
    command = rephrase_command(tmp_path / "docs", out, server, "locked", "--styles", "2")
    first = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: out.exists() and out.read_bytes().count(b"\n") >= 1)
        # Hostile pass: a second run (here, in this process) with another shard plan on the same --out
        # is refused by the lock too, before it reads or writes anything.
        assert data.main(command[2:] + ["--shard", "1/2"]) == 2
        message = capsys.readouterr().err.strip()
        assert "\n" not in message and f"pid {first.pid} " in message and "data.py rephrase" in message
        assert str(out) in message
        first.send_signal(signal.SIGKILL)  # the holder dies: its lock file stays, its lock does not
    finally:
        first.kill()
        first.wait()
    assert lock.exists() and f"pid {first.pid} " in lock.read_text()
    server.delay["locked"] = 0.0
    assert data.main(command[2:]) == 0
    keys = [(r["id"], r["style"]) for r in read_records(out)]
    assert len(keys) == len(set(keys)) == 12  # every pair once: the refused run wrote nothing
    assert not lock.exists()


def test_a_line_goes_to_stderr_in_one_write(monkeypatch):
    # print() writes the text and the newline apart: a signal between the two (the stop raised by
    # error_boundary) glued "...ETA 00:00:02" and the "interrupted" line together (seen once in the
    # test below); one write cannot be split
    writes = []
    monkeypatch.setattr(sys, "stderr", types.SimpleNamespace(write=writes.append, flush=lambda: None))
    data_rephrase._stderr("rephrase: pairs 1/2")
    assert writes == ["rephrase: pairs 1/2\n"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_ends_a_rephrase_in_one_line_and_the_same_command_resumes(server, tmp_path, signum):
    write_docs(tmp_path / "docs", [f"Document {i} says {i}." for i in range(6)])
    out, name = tmp_path / "out.jsonl", signal.Signals(signum).name
    model = f"interrupted-{name}"
    server.delay[model] = 1.0
    command = rephrase_command(tmp_path / "docs", out, server, model, "--concurrency", "2")
    run = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: out.exists() and out.read_bytes().count(b"\n") >= 1)
    run.send_signal(signum)  # two pairs are in flight: they are dropped, not half-written
    err = run.communicate(timeout=30)[1].strip().splitlines()
    assert run.returncode == 128 + signum and "Traceback" not in "\n".join(err)
    assert err[-1] == f"data.py rephrase: interrupted ({name}); what was written stays, and the same command resumes"
    written = read_records(out)  # every line whole
    assert 1 <= len(written) < 6 and not Path(f"{out}.lock").exists()
    server.delay[model] = 0.0
    assert data.main(command[2:]) == 0
    records = read_records(out)
    assert records[:len(written)] == written and len({r["id"] for r in records}) == len(records) == 6


@pytest.mark.parametrize("content", [b"my notes\nthe last line has no newline", b"",
                                     b'{"id": "a.txt", "style": "qa", "text": "an older format", "chunks": []}\n',
                                     b'{"id": "x", "style": "qa"}\nnot a record\n',
                                     json.dumps({"text": "a training record"}).encode() + b"\n"])
def test_rephrase_refuses_an_out_that_is_not_its_own_before_writing_a_byte(server, tmp_path, content,
                                                                             capsys):
    write_docs(tmp_path / "docs", ["One fact: 7."])
    out = tmp_path / "notes.txt"
    out.write_bytes(content)
    code = data.main(["rephrase", str(tmp_path / "docs"), "--endpoint", server.url, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    if not content:  # an empty file holds nothing to lose: it becomes the output
        assert code == 0 and len(read_records(out)) == 1
        return
    assert code == 2 and "\n" not in err and f"{out}:" in err and "not a rephrase record" in err, err
    assert out.read_bytes() == content and not Path(f"{out}.lock").exists()


def test_a_users_file_named_like_the_lock_is_left_alone(server, tmp_path, capsys):
    write_docs(tmp_path / "docs", ["One fact: 7."])
    lock = tmp_path / "out.jsonl.lock"
    lock.write_text("my lock-picking notes")
    code = data.main(["rephrase", str(tmp_path / "docs"), "--endpoint", server.url,
                      "--out", str(tmp_path / "out.jsonl")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and str(lock) in err and "not a lock of this command" in err
    assert lock.read_text() == "my lock-picking notes" and not (tmp_path / "out.jsonl").exists()


def test_a_trickling_server_fails_at_the_request_deadline(server):
    server.scripts["trickle"] = ["trickle"]  # about 90 bytes at one per 0.3 s: no read ever times out
    endpoint = chat_endpoint(server, "trickle", timeout=1.0, retries=0)
    start = time.monotonic()
    with pytest.raises(data.GenerationError, match="timed out: no complete reply within the 1 s deadline"):
        endpoint(data.rephrase_messages("One sentence.", "qa"))
    assert time.monotonic() - start < 2.5


def test_each_retry_and_each_pause_is_logged_in_one_line(server):
    server.scripts["logged"] = ["500", "429-wait", "cut"]
    lines = []
    reply = chat_endpoint(server, "logged", retries=3, log=lines.append)(data.rephrase_messages("Hi.", "qa"))
    assert reply == "In other words: Hi."
    assert len(lines) == 3 and all("\n" not in line and server.url in line for line in lines)
    assert "attempt 1/4: HTTP 500" in lines[0] and "every request to it pauses 0.01 s" in lines[0]
    assert "attempt 2/4: HTTP 429" in lines[1] and "pauses 1 s, as the server asked (Retry-After)" in lines[1]
    assert "attempt 3/4: IncompleteRead" in lines[2] and "retrying in 0.04 s" in lines[2]


def test_a_reply_far_longer_than_its_chunk_is_rejected_and_the_record_says_so(server, tmp_path, capsys):
    server.scripts["runaway"] = ["huge"]  # a 1 MB "rewrite" of a 30-character chunk, then a good one
    result = data.rephrase_chunkwise("The bridge opened in 1932.", "qa", chat_endpoint(server, "runaway"))
    assert result.text == "In other words: The bridge opened in 1932."
    assert result.chunks[0]["attempts"] == 2 and result.chunks[0]["long_replies"] == 1
    assert "far longer than a rewrite of this 26-character part" in \
        requests_of(server, "runaway")[-1]["messages"][-1]["content"]
    write_docs(tmp_path / "docs", ["The bridge opened in 1932."])
    server.scripts["runaway-always"] = ["huge"] * 3
    out = tmp_path / "out.jsonl"
    assert data.main(["rephrase", str(tmp_path / "docs"), "--endpoint", server.url, "--model", "runaway-always",
                      "--max-tokens", "77", "--out", str(out)]) == 0
    [record] = read_records(out)
    assert record["text"] == "The bridge opened in 1932." and record["chunks"][0]["status"] == "kept_original"
    assert record["chunks"][0]["long_replies"] == 3
    assert "3 far longer than their chunk" in capsys.readouterr().err
    assert {r["max_tokens"] for r in requests_of(server, "runaway-always")} == {77}


# -----------------------------------------------------------------------------------------------
# Keyed by content, shard plan recorded, records verified on read, no secret at rest


def echo_requests(server, model):
    return len(requests_of(server, model))


def test_resume_is_keyed_by_content_whatever_the_inputs_order_path_or_edits(server, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    texts = [f"Line {i} states fact number {i * 11}." for i in range(6)]
    source = tmp_path / "in.jsonl"

    def write(lines):
        source.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))

    def rephrase(path, model="keyed"):
        before = echo_requests(server, model)
        assert data.main(["rephrase", str(path), "--endpoint", server.url, "--model", model, "--out", "out.jsonl",
                          "--backoff", "0.01"]) == 0
        return echo_requests(server, model) - before

    write(texts)
    assert rephrase(source) == 6
    write(["A new first line, fact 1.", "A new second line, fact 2."] + texts)  # two lines inserted at the top
    assert rephrase(source) == 2
    write(list(reversed(texts)) + ["A new first line, fact 1.", "A new second line, fact 2."])
    assert rephrase("in.jsonl") == 0  # another order, the same input by its relative path: nothing to do
    edited = texts[:3] + ["Line 3 now states fact number 34."] + texts[4:]
    write(edited + ["A new first line, fact 1.", "A new second line, fact 2."])
    assert rephrase(source) == 1  # the edited line gets a new rewrite
    assert "1 records in out.jsonl rewrite texts or settings that are not in this run's input" in capsys.readouterr().err
    records = read_records(tmp_path / "out.jsonl")
    assert len(records) == 9 and len({r["key"] for r in records}) == 9
    by_text = {r["text"]: r for r in records}
    assert "In other words: Line 3 now states fact number 34." in by_text  # not the old rewrite reused
    for r in records:  # every record is the rewrite of the text its key names
        original = r["text"].removeprefix("In other words: ")
        assert r["key"] == data_rephrase.rephrase_key(original, r["style"], 2000, 3000)


def test_another_shard_plan_on_one_out_is_refused_before_any_write(server, tmp_path, capsys):
    write_docs(tmp_path / "docs", [f"Fact {i}: the answer is {i * 7}." for i in range(6)])
    out = tmp_path / "out.jsonl"
    common = ["rephrase", str(tmp_path / "docs"), "--endpoint", server.url, "--backoff", "0.01", "--out", str(out)]
    assert data.main(common + ["--shard", "0/2"]) == 0
    written = out.read_bytes()
    assert {r["shard"] for r in read_records(out)} == {"0/2"}
    capsys.readouterr()
    assert data.main(common + ["--shard", "0/3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"data.py rephrase: --shard: {out} holds the records of shard 0/2, this run is shard 0/3; give "
                   "each shard plan its own --out (the file is left as it was)")
    assert out.read_bytes() == written and not Path(f"{out}.lock").exists()
    assert data.main(common + ["--shard", "0/2"]) == 0 and out.read_bytes() == written  # the same plan: done


def test_a_record_with_flipped_bytes_is_refused_on_resume_and_in_training(server, tmp_path, capsys):
    # Hostile pass: a rephrase output whose bytes changed after it was written.
    write_docs(tmp_path / "docs", [f"Fact {i}: the answer is {i * 7}." for i in range(4)])
    out = tmp_path / "out.jsonl"
    command = ["rephrase", str(tmp_path / "docs"), "--endpoint", server.url, "--backoff", "0.01", "--out", str(out)]
    assert data.main(command) == 0
    lines = out.read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b"the answer is", b"the answer was")  # still valid JSON, still a record
    out.write_bytes(b"\n".join(lines))
    capsys.readouterr()
    assert data.main(command) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"data.py rephrase: --out {out}:2: a rephrase record that fails its check") and "\n" not in err
    with pytest.raises(data.DataError, match=f"{re.escape(str(out))}:2: a rephrase record that fails its check"):
        data.prepare(tmp_path / "cache", [f"rephrased={out}"])
    del lines[1]  # what the message says to do: the same command then redoes exactly that record
    out.write_bytes(b"\n".join(lines))
    assert data.main(command) == 0
    assert len(read_records(out)) == 4 and "1 new records" in capsys.readouterr().err
    assert data.prepare(tmp_path / "cache", [f"rephrased={out}"])["load_report"]["documents"] == 4


def test_no_api_key_is_written_to_any_file_or_printed(server, tmp_path, monkeypatch, capsys):
    secret = "sk-SECRET-2468"
    write_docs(tmp_path / "docs", [f"Document {i} says {i}." for i in range(3)])
    out = tmp_path / "out.jsonl"
    server.delay["keyed-secret"] = 1.0
    command = rephrase_command(tmp_path / "docs", out, server, "keyed-secret", "--api-key", secret)
    run = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    lock = Path(f"{out}.lock")
    wait_for(lambda: lock.exists() and lock.read_text())
    held = lock.read_text()
    err = run.communicate(timeout=60)[1]
    assert run.returncode == 0 and "--api-key '***'" in held, held
    assert secret not in held + err + out.read_text()
    for given in (["--api", secret], [f"--api-k={secret}"], ["--api-key", secret, "--model", "m"]):
        monkeypatch.setattr(sys, "argv", ["data.py", "rephrase", *given])
        assert secret not in data_rephrase._command_line() and "***" in data_rephrase._command_line()
    # A key pasted with its line end used to reach an HTTP header error, and the terminal with it.
    assert data.main(command[2:-1] + [secret + "\n"]) == 2
    assert capsys.readouterr().err.strip() == ("data.py rephrase: --api-key: the key holds a space, a newline or "
                                               "another unprintable character (pasted with its line end?)")

    def broken(*args, **kwargs):
        raise RuntimeError(f"a library that put the key {secret} in its message")

    monkeypatch.setattr(data_rephrase, "rephrase_corpus", broken)
    assert data.main(command[2:]) == 1
    err = capsys.readouterr().err.strip()
    saved = Path(re.search(r"traceback saved to (\S+)\)$", err)[1])
    assert secret not in err + saved.read_text() and "***" in err and "***" in saved.read_text()
    saved.unlink()


def test_a_symbolic_link_named_like_the_lock_is_not_written_through(server, tmp_path, capsys):
    # Hostile pass: <out>.lock is a link to a file elsewhere; opening it would write our pid there.
    write_docs(tmp_path / "docs", ["One fact: 7."])
    elsewhere = tmp_path / "elsewhere.txt"
    (tmp_path / "out.jsonl.lock").symlink_to(elsewhere)
    code = data.main(["rephrase", str(tmp_path / "docs"), "--endpoint", server.url, "--out", str(tmp_path / "out.jsonl")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "cannot create its lock file" in err and "\n" not in err
    assert not elsewhere.exists() and not (tmp_path / "out.jsonl").exists()


def test_a_full_disk_while_appending_names_the_output_and_the_same_command_resumes(server, tmp_path, monkeypatch,
                                                                                    capsys):
    write_docs(tmp_path / "docs", [f"Fact {i}: the answer is {i * 7}." for i in range(4)])
    out = tmp_path / "out.jsonl"
    command = ["rephrase", str(tmp_path / "docs"), "--endpoint", server.url, "--backoff", "0.01", "--out", str(out)]
    real_fsync, calls = os.fsync, []

    def full_disk(fd):
        calls.append(fd)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(data_rephrase.os, "fsync", full_disk)
    assert data.main(command) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"data.py rephrase: {out}: appending a record failed: No space left on device"
    monkeypatch.setattr(data_rephrase.os, "fsync", real_fsync)
    assert data.main(command) == 0
    assert len({r["key"] for r in read_records(out)}) == len(read_records(out)) == 4


def test_random_faults_in_a_rephrase_output_end_in_an_exact_resume_or_a_one_line_refusal(tmp_path, monkeypatch):
    # Fault injection: each run breaks a finished output at random (bytes flipped, the file cut
    # anywhere, a full disk in the middle of a record), then resumes. Every run must end with each
    # record exactly once and each the rewrite of its own text, or in a refusal naming the file and
    # line, before a byte is written.
    rng = random.Random(24)
    docs = [data.Document("user", f"doc{i}", f"Document {i} states that {i} times 3 is {i * 3}.") for i in range(8)]
    pairs = [(doc, "qa") for doc in docs]

    def generate(messages):
        return "Rewritten: " + bench.source_of(messages)

    def run(out):
        return data_rephrase.rephrase_corpus(pairs, generate, out, log=lambda line: None)

    reference = tmp_path / "reference.jsonl"
    run(reference)
    expected = {r["key"]: r["text"] for r in read_records(reference)}
    outcomes = {}
    for i in range(60):
        out = tmp_path / f"out{i}.jsonl"
        raw = reference.read_bytes()
        fault = rng.choice(["flip", "cut", "full disk"])
        if fault == "flip":
            raw = bytearray(raw)
            for _ in range(rng.randint(1, 3)):
                raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
            out.write_bytes(bytes(raw))
        elif fault == "cut":
            out.write_bytes(raw[:rng.randrange(len(raw))])
        else:
            fail_at, real_append = rng.randrange(1, 8), data_rephrase._append_record

            def full_disk(f, record):  # a record cut anywhere, as a write onto a full disk leaves it
                if len(read_records_or_empty(out)) + 1 == fail_at:
                    line = data_rephrase.record_line(record)
                    f.write(line[:rng.randrange(len(line))])
                    f.flush()
                    raise OSError(errno.ENOSPC, "appending a record failed: No space left on device", f.name)
                real_append(f, record)
            with monkeypatch.context() as patch:
                patch.setattr(data_rephrase, "_append_record", full_disk)
                with pytest.raises(OSError, match="No space left") as failure:
                    run(out)
                assert failure.value.filename == str(out)
        before = out.read_bytes()
        try:
            run(out)
        except data.DataError as e:
            assert "\n" not in str(e) and re.match(rf"--out {re.escape(str(out))}:\d+: ", str(e)), str(e)
            assert out.read_bytes() == before  # refused before a byte was written
            outcomes[f"{fault}: refused naming the line"] = outcomes.get(f"{fault}: refused naming the line", 0) + 1
            continue
        records = read_records(out)
        assert {r["key"]: r["text"] for r in records} == expected and len(records) == len(expected), (i, fault)
        outcomes[f"{fault}: exact resume"] = outcomes.get(f"{fault}: exact resume", 0) + 1
    print(outcomes)
    assert sum(outcomes.values()) == 60


def read_records_or_empty(path):
    if not path.exists():
        return []
    return [line for line in path.read_bytes().split(b"\n")[:-1]]


def test_kills_at_random_moments_of_a_rephrase_end_in_an_exact_resume(server, tmp_path):
    rng = random.Random(7)
    write_docs(tmp_path / "docs", [f"Document {i} says {i}.\n\nIts second paragraph, {i * 3}." for i in range(6)])
    out = tmp_path / "out.jsonl"
    server.delay["killed-at-random"] = 0.05
    command = rephrase_command(tmp_path / "docs", out, server, "killed-at-random", "--styles", "2", "--concurrency", "2")
    for _ in range(3):
        run = subprocess.Popen(command, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.5, 4.0))
        run.kill()
        run.wait()
    assert data.main(command[2:]) == 0
    records = read_records(out)
    assert len(records) == len({r["key"] for r in records}) == 12
    assert all(r["text"].startswith("In other words:") for r in records)
