"""Tests of data.py: the offline corpus, the byte tokenizer, the document split, the exact sampler,
and K2's chunk-wise rephrasing against a real chat-completions server on 127.0.0.1."""
import http.server
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import data

_DATA_PY = Path(data.__file__)


# -----------------------------------------------------------------------------------------------
# Corpus, tokenizer, preparation


@pytest.fixture(scope="module")
def _data_default_corpus(tmp_path_factory):
    cache = tmp_path_factory.mktemp("data_cache")
    real_connect = socket.socket.connect

    def offline(*args):
        raise AssertionError("prepare() tried to use the network")

    socket.socket.connect = offline  # the default corpus must build with no network at all
    try:
        return cache, data.prepare(cache)
    finally:
        socket.socket.connect = real_connect


def test_default_corpus_builds_offline_with_three_nontrivial_domains(_data_default_corpus):
    cache, info = _data_default_corpus
    assert set(info["stats"]) == {"code", "knowledge", "math"}
    for domain, s in info["stats"].items():
        assert s["bytes"] > 500_000, domain
        assert s["train_docs"] > 10 and s["val_docs"] >= 1, domain
    train, val = data.load_tokens(info, "train"), data.load_tokens(info, "val")
    assert len(train) == info["tokens"]["train"] and len(val) == info["tokens"]["val"]
    assert train.dtype == np.uint8 and info["eos"] == 0 and info["vocab_size"] == 256
    docs = sum(s["train_docs"] + s["val_docs"] for s in info["stats"].values())
    assert int((np.asarray(train) == 0).sum() + (np.asarray(val) == 0).sum()) == docs  # one eos each


def test_stats_command_prints_every_domain_and_reuses_the_cache(_data_default_corpus, capsys):
    cache, info = _data_default_corpus
    assert data.main(["stats", "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    for domain in ("code", "knowledge", "math"):
        assert re.search(rf"^{domain}\s+[\d,]+\s+[\d,]+\s+[\d,]+\s+[\d,]+", out, re.M), out
    assert "unigram entropy" in out and "(reused)" in out and info["key"] in out


@given(st.text())
def test_byte_tokenizer_round_trips_any_unicode(text):
    tok = data.ByteTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def _data_write_docs(folder: Path, texts):
    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(texts):
        (folder / f"doc{i:03d}.txt").write_text(text, encoding="utf-8")


@given(st.lists(st.integers(1, 300), min_size=2, max_size=40), st.floats(0.05, 0.6),
       st.integers(0, 2**16), st.integers(1, 16), st.integers(1, 4))
@settings(deadline=None)
def test_validation_documents_never_appear_in_training_batches(lengths, val_fraction, seed, seq_len, batch):
    # Document i is written in its own two-letter alphabet, so every byte names its document.
    rng = random.Random(seed)
    alphabets = [(chr(33 + 2 * i), chr(34 + 2 * i)) for i in range(len(lengths))]
    texts = ["".join(rng.choice(a) for _ in range(n)) for a, n in zip(alphabets, lengths)]
    with tempfile.TemporaryDirectory() as tmp:
        _data_write_docs(Path(tmp, "docs"), texts)
        info = data.prepare(Path(tmp, "cache"), [str(Path(tmp, "docs"))], val_fraction=val_fraction, seed=seed)
        train, val = data.load_tokens(info, "train"), data.load_tokens(info, "val")
        val_bytes = set(np.asarray(val).tolist()) - {0}
        train_bytes = set(np.asarray(train).tolist()) - {0}
        assert not val_bytes & train_bytes
        assert val_bytes, "two or more documents: at least one goes to validation"
        for a in alphabets:  # by document: each document is wholly on one side
            assert {ord(c) for c in a} & train_bytes.union(val_bytes)
            assert not ({ord(a[0]), ord(a[1])} & train_bytes and {ord(a[0]), ord(a[1])} & val_bytes)
        if len(train) > seq_len:
            sampler = data.BatchSampler(train, batch, seq_len, seed)
            for _ in range(sampler.windows // batch + 2):  # more than an epoch
                x, y = sampler.next()
                assert not set(torch.cat([x, y]).flatten().tolist()) & val_bytes


def test_domain_weights_set_the_training_mixture(tmp_path):
    _data_write_docs(tmp_path / "a", [f"alpha document {i} " * 20 for i in range(30)])
    _data_write_docs(tmp_path / "b", [f"beta document {i} " * 20 for i in range(30)])
    sources = [f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}"]
    info = data.prepare(tmp_path / "cache", sources, weights={"a": 3, "b": 1}, val_fraction=0.1)
    a, b = info["stats"]["a"], info["stats"]["b"]
    assert a["train_tokens"] / b["train_tokens"] == pytest.approx(3, rel=0.1)
    assert a["epochs"] > 1 > b["epochs"]  # up-weighted domain repeats, down-weighted is cut
    assert a["val_docs"] == b["val_docs"] == 3  # validation keeps the natural corpus
    dropped = data.prepare(tmp_path / "cache", sources, weights={"a": 1, "b": 0}, val_fraction=0.1)
    assert dropped["stats"]["b"]["train_tokens"] == 0 and dropped["stats"]["a"]["epochs"] > 1
    with pytest.raises(ValueError, match="'b'"):
        data.prepare(tmp_path / "cache", sources, weights={"a": 1})


def test_cache_is_reused_and_rebuilt_only_when_inputs_change(tmp_path):
    _data_write_docs(tmp_path / "docs", [f"text number {i}\n" * 5 for i in range(10)])
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
    report = info["report"]
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


@given(st.text(st.sampled_from("ab .!?\n\t")) | st.text(), st.integers(1, 200))
def test_split_chunks_is_lossless_and_bounded(text, max_chars):
    chunks = data.split_chunks(text, max_chars)
    assert "".join(chunks) == text
    assert all(0 < len(c) <= max_chars for c in chunks)


def test_split_chunks_cuts_at_paragraphs_then_sentences():
    paragraphs = [f"Paragraph {i} has one sentence. And a second one." for i in range(6)]
    chunks = data.split_chunks("\n\n".join(paragraphs), 120)
    assert all(c.endswith("\n\n") for c in chunks[:-1])
    long_paragraph = " ".join(f"Sentence {i} is here." for i in range(30))
    assert all(c.endswith(". ") for c in data.split_chunks(long_paragraph, 100)[:-1])


def test_math_problems_are_reproducible_and_their_answers_are_right():
    docs = data.math_documents(400, seed=1)
    assert [d.text for d in docs] == [d.text for d in data.math_documents(400, seed=1)]
    assert [d.text for d in docs] != [d.text for d in data.math_documents(400, seed=2)]
    checked = 0
    for doc in docs:
        answer = doc.text.rsplit("Answer: ", 1)[1]
        if m := re.match(r"Problem: Compute ([\d+\-*/() ]+?)( and simplify)?\.\n", doc.text):
            assert Fraction(eval(m[1])).limit_denominator(10**6) == Fraction(answer)
        elif m := re.match(r"Problem: Solve (.+) = (-?\d+) for x\.", doc.text):
            x = int(answer.removeprefix("x = "))
            assert eval(re.sub(r"(\d)x", r"\1*x", m[1]), {"x": x}) == int(m[2])
        elif m := re.match(r"Problem: Solve (.+x\^2.*) = 0\.", doc.text):
            for root in re.findall(r"x = (-?\d+)", answer):
                assert eval(re.sub(r"(\d)x", r"\1*x", m[1].replace("^", "**")), {"x": int(root)}) == 0
        else:
            continue
        checked += 1
    assert checked > 100


# -----------------------------------------------------------------------------------------------
# Sampler and entropy


@given(st.integers(20, 400), st.integers(1, 4), st.integers(1, 9), st.integers(0, 1000),
       st.integers(0, 12), st.integers(1, 12))
def test_restored_sampler_yields_the_batches_of_one_that_never_stopped(n, batch, seq_len, seed, stop, more):
    tokens = np.random.default_rng(seed).integers(0, 256, n).astype(np.uint8)
    never_stopped = data.BatchSampler(tokens, batch, seq_len, seed)
    expected = [never_stopped.next() for _ in range(stop + more)][stop:]
    first = data.BatchSampler(tokens, batch, seq_len, seed)
    for _ in range(stop):
        first.next()
    state = json.loads(json.dumps(first.state_dict()))  # as it would travel through a checkpoint
    resumed = data.BatchSampler(tokens, batch, seq_len, seed)
    resumed.load_state_dict(state)
    for x_expected, y_expected in expected:
        x, y = resumed.next()
        assert torch.equal(x, x_expected) and torch.equal(y, y_expected)


def test_sampler_targets_are_inputs_shifted_and_each_window_is_used_once_per_epoch():
    tokens = np.arange(1000, dtype=np.int64)  # token value == position
    sampler = data.BatchSampler(tokens, 4, 16, seed=3)
    x, y = sampler.next()
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)
    starts = x[:, 0].tolist()
    while len(starts) < sampler.windows:
        starts += sampler.next()[0][:, 0].tolist()
    epoch = starts[:sampler.windows]
    assert len(set(epoch)) == len(epoch)  # no window twice in an epoch
    assert len({s % 16 for s in epoch}) == 1  # one shift per epoch: windows tile the stream
    with pytest.raises(ValueError, match="seq_len"):
        sampler.load_state_dict({**sampler.state_dict(), "seq_len": 8})


@pytest.mark.parametrize("world_size", [2, 4])
def test_global_batch_does_not_depend_on_the_number_of_processes(world_size):
    tokens = np.random.default_rng(0).integers(0, 256, 5000).astype(np.uint8)
    single = data.BatchSampler(tokens, 8, 32, seed=7)
    ranks = [data.BatchSampler(tokens, 8, 32, seed=7, rank=r, world_size=world_size) for r in range(world_size)]
    for _ in range(5):
        x, y = single.next()
        parts = [s.next() for s in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts])) and torch.equal(y, torch.cat([p[1] for p in parts]))


def test_unigram_entropy_is_in_nats_per_token():
    assert data.unigram_entropy(np.arange(256, dtype=np.uint8).repeat(3)) == pytest.approx(np.log(256))
    assert data.unigram_entropy(np.full(100, 7, np.uint8)) == 0.0
    tokens = np.random.default_rng(0).integers(0, 50, 10_000)
    p = np.bincount(tokens) / len(tokens)
    assert data.unigram_entropy(tokens, chunk=777) == pytest.approx(-(p[p > 0] * np.log(p[p > 0])).sum())


# -----------------------------------------------------------------------------------------------
# Rephrasing: fidelity, styles, and a real HTTP server


def test_fidelity_scores_drift_and_missing_numbers():
    source = "The Eiffel Tower is 330 metres tall and was finished in 1889 in Paris."
    assert data.fidelity(source, source)["similarity"] == pytest.approx(1.0)
    faithful = data.fidelity(source, "Finished in 1889, the Eiffel Tower in Paris is 330 metres tall.")
    unrelated = data.fidelity(source, "Bananas are yellow and rich in potassium.")
    assert faithful["similarity"] > data.MIN_SIMILARITY > unrelated["similarity"]
    assert faithful["numbers_kept"] == 1.0
    assert data.fidelity(source, "The Eiffel Tower in Paris is 330 metres tall.")["missing_numbers"] == ["1889"]
    assert data.fidelity("a", "b", embed=lambda t: [1.0, 0.0])["similarity"] == pytest.approx(1.0)


def test_styles_cover_k2_perspectives_maths_notes_and_translation():
    assert len(data.GENERAL_STYLES) >= 6 and {"learning_note", "translate_en"} <= set(data.STYLES)
    maths = data.Document("math", "m", "Solve 2x + 1 = 5.")
    assert data.styles_for(maths, 3)[0] == "learning_note" and len(set(data.styles_for(maths, 3))) == 3
    russian = data.Document("math", "r", "Решите уравнение 2x + 1 = 5.")
    assert data.styles_for(russian, 2) == ["translate_en", "learning_note"]
    names = [data.styles_for(data.Document("user", f"d{i}", "text"), 1)[0] for i in range(60)]
    assert set(names) == set(data.GENERAL_STYLES)  # spread over the corpus


def _data_source_of(messages):
    return re.search(r"<source>\n(.*)\n</source>", messages[-1]["content"], re.S)[1]


class _DataFakeChat(http.server.BaseHTTPRequestHandler):
    """A deterministic chat-completions model: rewrites the <source> chunk as 'In other words: ...'.
    Per model name, server.scripts holds actions to play first: 500, 429, 400, hang, drop, badjson,
    garbage (an unfaithful rewrite)."""

    def do_POST(self):
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with server.lock:
            server.requests.append(body)
            script = server.scripts.get(body["model"], [])
            action = script.pop(0) if script else "echo"
        time.sleep(server.delay.get(body["model"], 0.0))
        if action == "hang":
            time.sleep(1.5)  # well past the client's timeout; the reply goes nowhere
        if action == "drop":
            self.close_connection = True
            return
        if action in ("500", "429", "400"):
            payload = json.dumps({"error": {"message": f"scripted {action}"}}).encode()
            self.send_response(int(action))
            if action == "429":
                self.send_header("Retry-After", "0")
        else:
            content = ("Bananas are yellow." if action == "garbage"
                       else "In other words: " + _data_source_of(body["messages"]))
            payload = b"{not json" if action == "badjson" else json.dumps(
                {"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
            self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def _data_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _DataFakeChat)
    server.daemon_threads = True
    server.handle_error = lambda request, address: None  # a hung reply to a gone client is expected
    server.lock, server.requests, server.scripts, server.delay = threading.Lock(), [], {}, {}
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield server
    server.shutdown()
    server.server_close()


def _data_endpoint(server, model, **kw):
    return data.ChatEndpoint(server.url, model, **{"timeout": 2.0, "retries": 2, "backoff": 0.01, **kw})


def _data_requests(server, model):
    return [r for r in server.requests if r["model"] == model]


def test_chunks_keep_their_order_and_each_prompt_carries_the_rewrite_so_far(_data_server):
    paragraphs = [f"Paragraph {i} says that {i} squared is {i * i}." for i in range(5)]
    result = data.rephrase_chunkwise("\n\n".join(paragraphs), "textbook",
                                     _data_endpoint(_data_server, "order"), max_chunk_chars=60)
    assert result.text == "\n\n".join("In other words: " + p for p in paragraphs)
    assert [c["status"] for c in result.chunks] == ["ok"] * 5
    prompts = [r["messages"][-1]["content"] for r in _data_requests(_data_server, "order")]
    assert [_data_source_of(r["messages"]) for r in _data_requests(_data_server, "order")] == paragraphs
    assert "<rewritten>" not in prompts[0]
    for k in range(1, 5):  # autoregressive: everything rewritten so far is in the next prompt
        context = re.search(r"<rewritten>\n(.*)\n</rewritten>", prompts[k], re.S)[1]
        assert context.strip() == "\n\n".join("In other words: " + p for p in paragraphs[:k])


def test_failed_fidelity_check_is_retried_with_feedback_then_kept_or_dropped(_data_server):
    doc = "The bridge opened in 1932.\n\nIt is 1149 metres long."
    _data_server.scripts["retry"] = ["echo", "garbage"]  # first chunk fine, second drifts once
    result = data.rephrase_chunkwise(doc, "encyclopedia", _data_endpoint(_data_server, "retry"), max_chunk_chars=30)
    assert [c["attempts"] for c in result.chunks] == [1, 2]
    assert [c["status"] for c in result.chunks] == ["ok", "ok"]
    retry_prompt = _data_requests(_data_server, "retry")[-1]["messages"][-1]["content"]
    assert "drifted" in retry_prompt and "missing numbers 1149" in retry_prompt
    for policy, expected in (("keep", "It is 1149 metres long."), ("drop", "")):
        model = f"drift-{policy}"
        _data_server.scripts[model] = ["echo"] + ["garbage"] * 3
        result = data.rephrase_chunkwise(doc, "qa", _data_endpoint(_data_server, model),
                                         max_chunk_chars=30, retries=2, on_fail=policy)
        assert result.chunks[1]["attempts"] == 3
        assert result.chunks[1]["status"] == {"keep": "kept_original", "drop": "dropped"}[policy]
        assert result.chunks[1]["similarity"] < data.MIN_SIMILARITY  # the score is recorded
        assert result.text == ("In other words: The bridge opened in 1932.\n\n" + expected).strip()


@pytest.mark.parametrize("failure, message", [("500", "HTTP 500: .*scripted 500"), ("429", "HTTP 429"),
                                              ("hang", "timed out"), ("badjson", "malformed"),
                                              ("drop", "RemoteDisconnected")])
def test_server_errors_are_retried_then_reported(_data_server, failure, message):
    timeout = 0.5 if failure == "hang" else 2.0
    _data_server.scripts[f"flaky-{failure}"] = [failure, failure]
    messages = data.rephrase_messages("One sentence.", "qa")
    reply = _data_endpoint(_data_server, f"flaky-{failure}", timeout=timeout)(messages)
    assert reply == "In other words: One sentence."
    assert len(_data_requests(_data_server, f"flaky-{failure}")) == 3
    _data_server.scripts[f"down-{failure}"] = [failure] * 3
    with pytest.raises(data.GenerationError, match=f"after 3 attempts.*{message}"):
        _data_endpoint(_data_server, f"down-{failure}", timeout=timeout)(messages)


def test_other_client_errors_fail_at_once_with_status_and_body(_data_server):
    _data_server.scripts["bad-request"] = ["400"]
    with pytest.raises(data.GenerationError, match="HTTP 400: .*scripted 400"):
        _data_endpoint(_data_server, "bad-request")(data.rephrase_messages("x", "qa"))
    assert len(_data_requests(_data_server, "bad-request")) == 1


def test_killed_rephrase_run_resumes_with_each_document_and_style_exactly_once(_data_server, tmp_path):
    texts = [f"Document {i} opens here. It has 2 sentences.\n\nAnd a second paragraph, number {i}." for i in range(6)]
    _data_write_docs(tmp_path / "docs", texts)
    out = tmp_path / "out.jsonl"
    _data_server.delay["slow"] = 0.05
    command = [sys.executable, str(_DATA_PY), "rephrase", str(tmp_path / "docs"), "--endpoint", _data_server.url,
               "--model", "slow", "--styles", "2", "--out", str(out), "--max-chunk-chars", "50",
               "--timeout", "5", "--backoff", "0.01"]
    run = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while (not out.exists() or out.read_bytes().count(b"\n") < 2) and time.time() < deadline:
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)
    run.wait()
    records_at_kill = out.read_bytes().count(b"\n")
    assert 2 <= records_at_kill < 12, "the kill must land mid-run"
    with open(out, "ab") as f:
        f.write(b'{"id": "half a rec')  # what a kill in the middle of a write leaves
    finished = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    assert "ETA" in finished.stderr and "chunks" in finished.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    keys = [(r["id"], r["style"]) for r in records]
    assert len(keys) == len(set(keys)) == 12
    assert {k[0] for k in keys} == {str(tmp_path / "docs" / f"doc{i:03d}.txt") for i in range(6)}
    assert all(r["text"].startswith("In other words:") and r["similarity_min"] > 0 for r in records)


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
    generate = data.CheckpointGenerator("some/dir", max_new_tokens=16)
    assert generate(data.rephrase_messages("A source chunk.", "qa")) == "rewritten"
    assert len(seen["prompt"]) == 64 - 16 and seen["prompt"].endswith("</source>\n\nassistant: ")


def test_checkpoint_backend_runs_a_real_kimik2_checkpoint(tmp_path):
    kimik2 = pytest.importorskip("kimik2")
    torch.manual_seed(0)
    kimik2.KimiK2(kimik2.Config.from_preset("tiny")).save_pretrained(str(tmp_path))
    reply = data.CheckpointGenerator(str(tmp_path), max_new_tokens=4)(data.rephrase_messages("Hi.", "qa"))
    assert isinstance(reply, str) and len(reply) <= 4
