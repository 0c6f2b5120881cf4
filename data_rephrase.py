"""Kimi-K2 rephrasing at corpus scale: the client that runs `data.rephrase_chunkwise` over a corpus.

data.py holds K2's rephrasing itself (the prompts, chunking, chunk-wise rewriting, fidelity; K2
report, arXiv 2507.20534, sec. 2.2); this companion holds what a real run over many documents needs:

- Generation backends: `ChatEndpoint` and `EmbeddingEndpoint` for any OpenAI-compatible server
  (standard library only, a deadline per request, retries with backoff, 429/5xx pausing every
  worker), `CheckpointGenerator` for a trained kimik2 checkpoint, or any callable
  `generate(messages) -> str`.
- `rephrase_corpus`: the (document, style) pairs (`styles_for`) and their shards, concurrent
  requests, one crash-safe writer, one process per output file (a lock beside it), a file that is
  not its own refused untouched, progress with an ETA. Records are keyed by content
  (`rephrase_key`: the source text, style, prompt and chunking), carry the shard plan and check
  themselves (`record_line`), so resume does exactly the missing work and verifies what it reads.
- The command lines: its own (also reached as `python data.py rephrase ...`) and data.py's (`main`,
  also `data.main`: `stats` and `rephrase`), and the one error boundary they run in (`error_boundary`:
  one line per failure, signals, no API key ever printed).

Run:
    python data_rephrase.py SOURCE... --endpoint http://localhost:8000/v1 --model NAME \
        --styles 2 --concurrency 16 [--shard I/N] [--fidelity lexical|embedding|llm_judge] \
        [--timeout SECONDS] [--max-tokens N] --out rephrased.jsonl
Sources as in data.py ("builtin", "[DOMAIN=]PATH"). Throughput: `python bench.py rephrase`.
"""
import argparse
import hashlib
import http.client
import itertools
import json
import math
import os
import re
import shlex
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import data
from data import (GENERAL_STYLES, MIN_SIMILARITY, RECORD_START, RULES, STYLES, ByteTokenizer, CorruptFile, DataError,
                  Document, EmbeddingFidelity, GenerationError, JudgeFidelity, LexicalFidelity, LoadReport,
                  _lone_surrogates, checked_record, confined, load_documents, number, rephrase_chunkwise)


def _stderr(line: str):
    """One line on stderr in one write: print() writes the text and the newline apart, and a signal
    raised between the two (error_boundary's KeyboardInterrupt) would glue the next line onto it."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


# -----------------------------------------------------------------------------------------------
# Generation backends: anything with __call__(messages) -> str. The HTTP ones use the standard
# library only.

MAX_REPLY_BYTES = 16 << 20  # far above any reply to one chunk, or one embedding pair (about 100 kB)


class OpenAIEndpoint:
    """One route of an OpenAI-compatible server (vLLM, llama.cpp's server, Ollama, ...) through
    http.client: POST JSON, parse the reply. `timeout` is a deadline for the whole request, not
    for each read: a server that trickles one byte a second is abandoned at the deadline like one
    that hangs. Retries with exponential backoff on 429, 5xx, dropped or refused connections,
    missed deadlines and malformed or oversized replies (`MAX_REPLY_BYTES`), each retry logged in one
    line; any other status fails at once with its status and body. A 429 or 5xx pauses every thread
    that shares this object, for Retry-After seconds when the server says so (logged): concurrent
    workers back off together instead of hammering a server that asked them to slow down. `url` is
    the API base (".../v1") or the full route; `log(line)` receives the retry and pause lines."""
    route = ""

    def __init__(self, url, model, api_key=None, timeout=120.0, retries=5, backoff=1.0, max_backoff=60.0,
                 log=_stderr):
        self.url = url.rstrip("/")
        if not self.url.endswith(self.route):
            self.url += self.route
        self.parts = urllib.parse.urlsplit(self.url)
        if self.parts.scheme not in ("http", "https") or not self.parts.hostname:
            raise DataError(f"endpoint {url!r}: not an http:// or https:// URL")
        if api_key and (not api_key.isprintable() or any(c.isspace() for c in api_key)):  # never echoed back
            raise DataError("--api-key: the key holds a space, a newline or another unprintable character "
                            "(pasted with its line end?)")
        self.model, self.api_key, self.timeout, self.retries = model, api_key, timeout, retries
        self.backoff, self.max_backoff, self.log = backoff, max_backoff, log
        self._lock = threading.Lock()
        self._paused_until = 0.0  # time.monotonic() before which no request is sent

    def _pause(self, seconds: float):
        with self._lock:
            self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    def _wait_for_pause(self):
        while (delay := self._paused_until - time.monotonic()) > 0:
            time.sleep(delay)

    def _exchange(self, payload: bytes, headers: dict) -> tuple[int, object, bytes]:
        """One POST, answered or abandoned within `timeout` seconds: (status, headers, body). A
        socket timeout bounds each read, not their sum, so a timer shuts the socket at the deadline,
        which ends whatever read is in progress; TimeoutError then says so."""
        https = self.parts.scheme == "https"
        conn = (http.client.HTTPSConnection if https else http.client.HTTPConnection)(
            self.parts.hostname, self.parts.port, timeout=self.timeout)
        expired, sockets = threading.Event(), []  # the socket is kept: the response may outlive conn.sock

        def expire():
            expired.set()
            for sock in sockets:
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

        timer = threading.Timer(self.timeout, expire)
        timer.start()
        try:
            conn.connect()
            sockets.append(conn.sock)
            if expired.is_set():  # the deadline passed while connecting, before the timer saw a socket
                raise TimeoutError
            path = self.parts.path + (f"?{self.parts.query}" if self.parts.query else "")
            conn.request("POST", path, payload, headers)
            response = conn.getresponse()
            if (response.length or 0) > MAX_REPLY_BYTES:
                raise ValueError(f"a reply of {response.length} bytes (at most {MAX_REPLY_BYTES})")
            # all Content-Length bytes (else IncompleteRead); without a length, the limit and one byte more
            body = response.read() if response.length is not None else response.read(MAX_REPLY_BYTES + 1)
            if len(body) > MAX_REPLY_BYTES:
                raise ValueError(f"a reply of more than {MAX_REPLY_BYTES} bytes")
        except (OSError, http.client.HTTPException):
            if expired.is_set():
                raise TimeoutError(f"timed out: no complete reply within the {self.timeout:g} s deadline") from None
            raise
        finally:
            timer.cancel()
            conn.close()
        if expired.is_set():  # a read cut short by the shutdown may still have looked complete
            raise TimeoutError(f"timed out: no complete reply within the {self.timeout:g} s deadline")
        return response.status, response.headers, body

    def post(self, body: dict, parse: Callable[[dict], object]):
        """POST body (plus "model"), return parse(reply JSON); parse raises ValueError, KeyError,
        IndexError or TypeError on a reply it cannot use, which is retried like a server error."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        payload = json.dumps({"model": self.model, **body}).encode()
        for attempt in range(self.retries + 1):
            wait, pause = min(self.max_backoff, self.backoff * 2 ** attempt), ""
            self._wait_for_pause()
            try:
                status, reply_headers, reply = self._exchange(payload, headers)
                if status < 300:
                    return parse(json.loads(reply))
                error = f"HTTP {status}: {_one_line(reply[:500].decode('utf-8', errors='replace'))}"
                if status != 429 and status < 500:
                    raise GenerationError(f"{self.url}: {error}")
                # the server is overloaded or failing: every thread waits, as long as it asks if it does
                if (retry_after := reply_headers.get("Retry-After") or "").isdigit():
                    wait, pause = min(self.max_backoff, float(retry_after)), "as the server asked (Retry-After)"
                else:
                    pause = "backing off"
            except (OSError, http.client.HTTPException) as e:  # refused, dropped, past the deadline
                error = _one_line(f"{type(e).__name__}: {e}")
            except (ValueError, KeyError, IndexError, TypeError) as e:  # not the JSON we expect
                error = _one_line(f"malformed response ({type(e).__name__}: {e})")
            if attempt == self.retries:
                raise GenerationError(f"{self.url}: gave up after {attempt + 1} attempts; last: {error}")
            if pause:
                self.log(f"{self.url}: attempt {attempt + 1}/{self.retries + 1}: {error}; every request to it "
                         f"pauses {wait:g} s, {pause}")
                self._pause(wait)
            else:
                self.log(f"{self.url}: attempt {attempt + 1}/{self.retries + 1}: {error}; retrying in {wait:g} s")
                time.sleep(wait)


class ChatEndpoint(OpenAIEndpoint):
    """The rephraser (or judge) behind an OpenAI-compatible /chat/completions route. A reply with
    a lone surrogate (JSON "\\ud83d", half an emoji; no UTF-8 exists for it) has it replaced by
    U+FFFD and is counted in `repaired_replies`: never fatal, always reported."""
    route = "/chat/completions"

    def __init__(self, url, model, temperature=0.7, max_tokens=None, **options):
        super().__init__(url, model, **options)
        self.temperature, self.max_tokens = temperature, max_tokens
        self.repaired_replies = 0

    def _content(self, reply: dict) -> str:
        content = reply["choices"][0]["message"]["content"]
        if not isinstance(content, str):
            raise TypeError(f"content is {type(content).__name__}")
        if _lone_surrogates(content):
            with self._lock:
                self.repaired_replies += 1
            content = "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in content)
        return content

    def __call__(self, messages: list[dict]) -> str:
        body = {"messages": messages, "temperature": self.temperature}
        if self.max_tokens:
            body["max_tokens"] = self.max_tokens
        return self.post(body, self._content)


class EmbeddingEndpoint(OpenAIEndpoint):
    """An OpenAI-compatible /embeddings route (vLLM, llama.cpp, Ollama serve one) as the embed
    function of `EmbeddingFidelity`: texts -> one vector each, with the retries of `OpenAIEndpoint`."""
    route = "/embeddings"

    def __call__(self, texts: list[str]) -> list[list[float]]:
        def vectors(reply):
            rows = sorted(reply["data"], key=lambda row: row["index"])
            out = [[float(x) for x in row["embedding"]] for row in rows]
            if len(out) != len(texts) or len({len(v) for v in out}) != 1 or not out[0]:
                sizes = sorted({len(v) for v in out})
                raise ValueError(f"{len(out)} vectors of sizes {sizes} for {len(texts)} texts")
            if not np.isfinite(out).all():
                raise ValueError("non-finite embedding")
            return out
        return self.post({"input": texts}, vectors)


class CheckpointGenerator:
    """A trained kimik2 checkpoint (save_pretrained folder) as the rephraser, through its own
    `generate`. The chat messages become a plain "role: content" prompt, since a byte-level model
    has no chat template; generation stops at max_new_tokens or eos."""

    def __init__(self, path, max_new_tokens=512, temperature=0.7, top_k=50, tokenizer=None, device="cpu"):
        import kimik2  # only this backend needs the model code
        self.model = kimik2.KimiK2.from_pretrained(path).to(device).eval()
        self.tokenizer = tokenizer or ByteTokenizer()
        self.max_new_tokens, self.temperature, self.top_k = max_new_tokens, temperature, top_k
        self.device = device

    def __call__(self, messages: list[dict]) -> str:
        prompt = "".join(f"{m['role']}: {m['content']}\n\n" for m in messages) + "assistant: "
        room = max(1, self.model.config.max_position_embeddings - self.max_new_tokens)
        ids = self.tokenizer.encode(prompt)[-room:]  # the end of the prompt holds the chunk
        with torch.no_grad():
            out = self.model.generate(torch.tensor([ids], device=self.device), self.max_new_tokens,
                                      temperature=self.temperature, top_k=self.top_k)
        new = out[0, len(ids):].tolist()
        if self.tokenizer.eos in new:
            new = new[:new.index(self.tokenizer.eos)]
        return self.tokenizer.decode(new)


# The (document, style) pairs and their shards, one writer per output, concurrent requests


# -----------------------------------------------------------------------------------------------
# The (document, style) pairs and their shards, one writer per output, concurrent requests

def _is_english(text: str) -> bool:
    """Crude script test: most letters ASCII. Non-Latin scripts are caught; French or German pass
    as English (a language identifier would do better and is one more dependency)."""
    letters = [c for c in text[:4000] if c.isalpha()]
    return not letters or sum(c.isascii() for c in letters) >= 0.8 * len(letters)


def styles_for(doc: Document, n: int) -> list[str]:
    """n distinct styles for a document: translate_en first for non-English text, learning_note for
    maths, then general styles in a rotation that starts at a hash of the text, so the styles are
    spread evenly over a corpus and stable across reruns, renames and reorderings."""
    if not 1 <= n <= len(GENERAL_STYLES):
        raise DataError(f"--styles: between 1 and {len(GENERAL_STYLES)} styles per document, got {n}")
    special = [] if _is_english(doc.text) else ["translate_en"]
    if doc.domain == "math":
        special.append("learning_note")
    start = int(hashlib.sha1(doc.text.encode()).hexdigest(), 16) % len(GENERAL_STYLES)
    rotation = GENERAL_STYLES[start:] + GENERAL_STYLES[:start]
    return (special + rotation)[:n]


def record_line(record: dict) -> bytes:
    """A rephrase record (its "key" first) as one JSON line that checks itself: its last field,
    "check", is the SHA-256 (16 hex digits) of the line's bytes before it."""
    body = json.dumps(record, ensure_ascii=False).encode()[:-1]
    return body + b', "check": "' + hashlib.sha256(body).hexdigest()[:16].encode() + b'"}\n'


def rephrase_key(text: str, style: str, max_chunk_chars: int, context_chars: int) -> str:
    """What a record is keyed by: a digest of its source text, the style, that style's prompt (its
    instruction and the rules) and the chunking settings. Resume matches records by this key, so
    it does exactly the missing work whatever the input's order, path or edits: an edited text
    gets a new key, hence a new rewrite, and its old record is not reused."""
    settings = [text, style, STYLES[style], RULES, max_chunk_chars, context_chars]
    return hashlib.sha256(json.dumps(settings, ensure_ascii=False).encode()).hexdigest()[:32]


def in_shard(key: str, shard: tuple[int, int]) -> bool:
    """Whether the record `key` belongs to shard (index, count): a hash of the key, so the count
    shards partition any corpus (no overlap, no gap) and a pair's shard does not move when other
    documents are added, reordered or renamed."""
    index, count = shard
    return int(hashlib.sha1(key.encode()).hexdigest(), 16) % count == index


def _command_line() -> str:
    """This process's command, an --api-key's value replaced by *** (the lock file is at rest;
    argparse also takes the option abbreviated, as --api)."""
    argv = [Path(sys.executable).name, *sys.argv]
    is_key = [len(a.partition("=")[0]) > 2 and "--api-key".startswith(a.partition("=")[0]) for a in argv]
    for i, arg in enumerate(argv):
        if is_key[i] and "=" in arg:
            argv[i] = arg.partition("=")[0] + "=***"
        elif i and is_key[i - 1] and "=" not in argv[i - 1]:
            argv[i] = "***"
    return shlex.join(argv)


@contextmanager
def exclusive_output(out: Path):
    """Hold `<out>.lock` for as long as the block runs, so that one process at a time writes `out`.

    The lock is fcntl's: the kernel releases it when its process dies however it dies, so the lock
    file of a killed run is simply taken over. It holds the holder's pid and command, and a second
    process gets DataError naming them. The file is removed on the way out; a process that opened it
    just before then finds its lock on a removed file and tries again on the new one (POSIX only).
    A symbolic link, or a file of the user's, by that name is refused, not written through."""
    import fcntl  # the one POSIX-only import of this file, so that `import data_rephrase` works everywhere
    lock_path = confined(out.parent, f"{out.name}.lock")
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as e:
            raise DataError(f"--out {out}: cannot create its lock file {lock_path} ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", errors="replace").strip() or "another process"
            os.close(fd)
            raise DataError(f"--out {out} is being written by {holder}; wait for it, or give another --out") from None
        with suppress(FileNotFoundError):
            if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)
    if (mine := os.pread(fd, 4096, 0)) and not re.match(rb"pid \d+ \(", mine):
        os.close(fd)  # a file of the user's that happens to have this name: not ours to overwrite
        raise DataError(f"--out {out}: {lock_path} exists and is not a lock of this command; move it")
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} ({_command_line()})".encode())
        yield
    finally:
        with suppress(FileNotFoundError):
            os.remove(lock_path)
        os.close(fd)


def completed_keys(out: Path, plan: str) -> tuple[set[str], int | None]:
    """The keys of the records in `out` (the output of earlier runs of this command, or no file),
    each record verified (`data.checked_record`), and where a last line cut short by a kill starts
    (None when there is none). Raises DataError naming the line, before a byte of the file is
    changed, for anything this command did not write as it is now: a line that is not a rephrase
    record (a user's notes.txt, an older format), a record whose check fails (bytes changed since),
    a record of another shard plan than `plan` ("I/N"). A last line without its newline that begins
    like a record is what a kill mid-write leaves: the caller cuts it off and its pair is redone."""
    if not out.exists():
        return set(), None
    if not out.is_file():
        raise DataError(f"--out {out}: not a file")
    data = out.read_bytes()
    end = data.rfind(b"\n") + 1
    keys, lineno = set(), 0
    for lineno, line in enumerate(data[:end].split(b"\n")[:-1], 1):
        where = f"--out {out}:{lineno}"
        try:
            record = checked_record(line)
        except CorruptFile as e:
            raise DataError(f"{where}: {e}; delete that line (this command then redoes it)") from None
        if record is None:
            raise DataError(f"{where}: not a rephrase record, so not an output of this command; give another "
                            "--out (the file is left as it was)")
        if record.get("shard") != plan:
            raise DataError(f"--shard: {out} holds the records of shard {record.get('shard')}, this run is shard "
                            f"{plan}; give each shard plan its own --out (the file is left as it was)")
        keys.add(record["key"])
    partial = data[end:]
    if partial and not (partial.startswith(RECORD_START) or RECORD_START.startswith(partial)):
        raise DataError(f"--out {out}:{lineno + 1}: a last line without a newline that is not a rephrase "
                        "record, so not an output of this command; give another --out (the file is left as it was)")
    return keys, end if partial else None


def _clock(seconds: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(seconds)) if math.isfinite(seconds) else "?"


class _Progress:
    """Pairs, documents and chunks done, the rate and the ETA of a run. The ETA divides the text
    left by the text done per second of wall time since the start, so it stays right however many
    pairs are in flight and in whatever order they finish."""

    def __init__(self, pairs, todo, clock=time.monotonic):
        self.clock, self.start = clock, clock()
        self.pairs, self.chars_left = len(todo), sum(len(doc.text) for doc, _ in todo)
        self.left_per_doc = Counter(doc.name for doc, _ in todo)
        self.docs = len({doc.name for doc, _ in pairs})
        self.docs_done = self.docs - len(self.left_per_doc)
        self.pairs_done = self.chars_done = self.chunks_done = 0

    def done(self, doc: Document, chunks: int) -> str:
        self.pairs_done += 1
        self.chars_done += len(doc.text)
        self.chunks_done += chunks
        self.left_per_doc[doc.name] -= 1
        self.docs_done += self.left_per_doc[doc.name] == 0
        elapsed = self.clock() - self.start
        eta = (self.chars_left - self.chars_done) * elapsed / self.chars_done if self.chars_done else math.inf
        return (f"rephrase: pairs {self.pairs_done}/{self.pairs}, documents {self.docs_done}/{self.docs}, "
                f"chunks {self.chunks_done} | {self.chunks_done / max(elapsed, 1e-9):.2f} chunks/s | "
                f"ETA {_clock(eta)}")


def _worst(chunks) -> dict:
    """A record's summary scores: the lowest similarity and numbers_kept over its chunks."""
    return dict(similarity_min=min((c["similarity"] for c in chunks), default=1.0),
                numbers_kept_min=min((c["numbers_kept"] for c in chunks), default=1.0))


def _append_record(f, record: dict):
    """One write of one whole line (`data.record_line`: it carries its own check), flushed and
    fsynced before the pair counts as done: a kill leaves at most a partial last line, which
    `completed_keys` finds and the next run cuts off. A failed write (a full disk) raises OSError
    naming the file."""
    try:
        f.write(record_line(record))
        f.flush()
        os.fsync(f.fileno())
    except OSError as e:
        raise OSError(e.errno, f"appending a record failed: {e.strerror}", f.name) from e


def rephrase_corpus(pairs, generate, out, *, concurrency=1, model="", shard=(0, 1), log=_stderr, **options) -> dict:
    """Rephrase every (Document, style) pair of shard (index, count) whose record is not yet in
    `out` (JSON lines, one record per pair, keyed by `rephrase_key`; a text given twice in one
    style is rewritten once).

    One process at a time writes `out` (`exclusive_output`), and only to a file of its own whose
    every record passes its check and was written under the same shard plan (`completed_keys`):
    anything else is refused before a byte is written. Up to `concurrency` pairs are in flight on
    worker threads; the chunks of one pair stay sequential (each chunk's prompt carries the rewrite
    so far, `rephrase_chunkwise` with `options`). This thread is the only writer (`_append_record`),
    so a SIGKILL at any moment, then the same call, leaves each pair exactly once and no partial
    line. A GenerationError stops new pairs, the pairs in flight are finished and written, and the
    summary's "error" names it. Other exceptions propagate after the same drain. Returns the
    summary: new records, chunks ok / kept_original / dropped, empty and overlong replies, error.
    """
    out, plan = Path(out), f"{shard[0]}/{shard[1]}"
    try:
        confined(out.parent, out.name)
    except ValueError:
        raise DataError(f"--out {out} is a symbolic link that leads out of its folder; give the file's own path") from None
    settings = {**rephrase_chunkwise.__kwdefaults__, **options}
    keyed = {}  # key -> (document, style)
    for doc, style in pairs:
        key = rephrase_key(doc.text, style, settings["max_chunk_chars"], settings["context_chars"])
        if in_shard(key, shard):
            keyed.setdefault(key, (doc, style))
    with exclusive_output(out):
        done, torn = completed_keys(out, plan)
        todo = {key: pair for key, pair in keyed.items() if key not in done}
        log(f"rephrase: shard {plan}: {len({doc.name for doc, _ in keyed.values()})} documents, {len(keyed)} "
            f"(document, style) pairs, {len(keyed) - len(todo)} already in {out}; {concurrency} in flight")
        if stale := len(done - set(keyed)):
            log(f"rephrase: {stale} records in {out} rewrite texts or settings that are not in this run's input; "
                "they stay (training reads them)")
        if torn is not None:  # what a kill mid-write left: cut off, its pair redone
            os.truncate(out, torn)
        with open(out, "ab") as f:
            return _rephrase_pairs(keyed, todo, generate, f, plan, model, log, concurrency, options)


def _rephrase_pairs(keyed, todo, generate, f, plan, model, log, concurrency, options) -> dict:
    """`rephrase_corpus`'s loop: workers rewrite, this thread appends each finished record to f."""
    measure = (options.get("measure") or LexicalFidelity()).name  # the judge of every chunk, recorded
    progress, failure = _Progress(list(keyed.values()), list(todo.values())), None
    summary = Counter(ok=0, kept_original=0, dropped=0, records=0, empty_replies=0, long_replies=0)
    pool, running, queue = ThreadPoolExecutor(concurrency, thread_name_prefix="rephrase"), {}, iter(todo.items())
    try:
        while True:
            if failure is None:  # keep the workers fed: up to two pairs each, queued or running
                for key, (doc, style) in itertools.islice(queue, 2 * concurrency - len(running)):
                    future = pool.submit(rephrase_chunkwise, doc.text, style, generate, **options)
                    running[future] = key, doc, style
            if not running:
                break
            for future in wait(running, return_when=FIRST_COMPLETED)[0]:
                key, doc, style = running.pop(future)
                try:
                    result = future.result()
                except Exception as e:
                    failure = failure or (doc, style, e)
                    for queued in [other for other in running if other.cancel()]:  # never started
                        running.pop(queued)
                    continue
                _append_record(f, dict(key=key, id=doc.name, style=style, shard=plan, model=model, measure=measure,
                                       text=result.text, **_worst(result.chunks), chunks=result.chunks))
                summary.update([c["status"] for c in result.chunks] + ["records"])
                for c in result.chunks:
                    summary.update(empty_replies=c["empty_replies"], long_replies=c["long_replies"])
                log(progress.done(doc, len(result.chunks)))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # only an interrupt leaves pairs in flight: dropped
    if failure and not isinstance(failure[2], GenerationError):
        raise failure[2]
    return dict(summary, error=f"{failure[0].name} ({failure[1]}): {failure[2]}" if failure else None)


# -----------------------------------------------------------------------------------------------
# Command line

def _shard(text):
    """An argparse type: "I/N" with 0 <= I < N -> (I, N)."""
    m = re.fullmatch(r"(\d+)/(\d+)", text)
    if not m or not int(m[1]) < int(m[2]):
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N, got {text!r}")
    return int(m[1]), int(m[2])


def _generator(args):
    """The rephrasing backend of the command line, and the model name its records carry."""
    if args.checkpoint:
        return CheckpointGenerator(args.checkpoint), f"kimik2:{args.checkpoint}"
    if args.endpoint:
        generate = ChatEndpoint(args.endpoint, args.model, temperature=args.temperature,
                                max_tokens=args.max_tokens, **_http(args))
        return generate, args.model
    raise DataError("give --endpoint URL --model NAME, or --checkpoint DIR")


def _http(args) -> dict:
    return dict(api_key=args.api_key, timeout=args.timeout, retries=args.retries, backoff=args.backoff)


def _measure(args):
    """The fidelity measure chosen by --fidelity."""
    if args.fidelity == "lexical":
        return LexicalFidelity()
    if args.fidelity == "embedding":
        url = args.embedding_endpoint or (args.endpoint or "").rstrip("/").removesuffix(ChatEndpoint.route)
        if not url:
            raise DataError("--fidelity embedding: give --embedding-endpoint URL (or --endpoint)")
        return EmbeddingFidelity(EmbeddingEndpoint(url, args.embedding_model, **_http(args)))
    if not args.endpoint:
        raise DataError("--fidelity llm_judge: the judge is asked through --endpoint; give it")
    judge = ChatEndpoint(args.endpoint, args.judge_model or args.model, temperature=0.0, **_http(args))
    return JudgeFidelity(judge)


def run_rephrase(args) -> int:
    generate, model = _generator(args)
    measure = _measure(args)
    report = LoadReport()
    docs = load_documents(args.inputs, max_doc_chars=args.max_doc_chars, report=report)
    for problem in report.problems:
        _stderr(f"rephrase: {problem}")
    pairs = [(doc, style) for doc in docs for style in (args.style or styles_for(doc, args.styles))]
    summary = rephrase_corpus(pairs, generate, args.out, concurrency=args.concurrency, model=model, shard=args.shard,
                              measure=measure, min_similarity=args.min_similarity,
                              max_chunk_chars=args.max_chunk_chars, retries=args.fidelity_retries,
                              on_fail=args.on_fail)
    repaired = generate.repaired_replies if isinstance(generate, ChatEndpoint) else 0
    print(f"rephrase: {summary['records']} new records in {args.out}; chunks: {summary['ok']} rewritten, "
          f"{summary['kept_original']} kept their original text and {summary['dropped']} dropped after "
          f"failing the {measure.name} fidelity check; {summary['empty_replies']} empty replies, "
          f"{summary['long_replies']} far longer than their chunk; "
          f"{repaired} replies with invalid Unicode repaired", file=sys.stderr)
    if summary["kept_original"] + summary["dropped"] and not summary["ok"]:
        print("rephrase: warning: no chunk was rewritten; check the endpoint, the model and --fidelity",
              file=sys.stderr)
    if summary["error"]:
        _stderr(f"rephrase: {summary['error']}\nrephrase: rerun the same command to resume")
        return 1
    return 0


def _parser(prog: str) -> argparse.ArgumentParser:
    rephrase = argparse.ArgumentParser(prog=prog, description="Rewrite documents with an LLM (K2 rephrasing, "
                                       "arXiv 2507.20534 sec. 2.2), one JSON line per (document, style).")
    rephrase.add_argument("inputs", nargs="+", help="[DOMAIN=]PATH or builtin[:DOMAIN]")
    rephrase.add_argument("--endpoint", help="OpenAI-compatible API base, e.g. http://localhost:8000/v1")
    rephrase.add_argument("--model", default="default", help="model name sent to the endpoint")
    rephrase.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    rephrase.add_argument("--checkpoint", help="a kimik2 save_pretrained folder instead of an endpoint")
    rephrase.add_argument("--styles", type=number(int, 1, len(GENERAL_STYLES)), default=1,
                          help="styles per document (see styles_for)")
    rephrase.add_argument("--style", action="append", choices=sorted(STYLES),
                          help="use exactly these styles (repeatable) instead of --styles")
    rephrase.add_argument("--out", required=True, help="JSON lines, one per (document, style)")
    rephrase.add_argument("--concurrency", type=number(int, 1), default=1,
                          help="(document, style) pairs in flight")
    rephrase.add_argument("--shard", type=_shard, default=(0, 1), help="I/N: rephrase only shard I of N (see in_shard)")
    rephrase.add_argument("--fidelity", choices=tuple(MIN_SIMILARITY), default="lexical",
                          help="the fidelity measure (see MIN_SIMILARITY for the thresholds)")
    rephrase.add_argument("--min-similarity", type=number(float, -1, 1),
                          help="pass threshold (default: per measure and style)")
    rephrase.add_argument("--embedding-endpoint", help="for --fidelity embedding (default: --endpoint)")
    rephrase.add_argument("--embedding-model", default="default", help="embedding model name")
    rephrase.add_argument("--judge-model", help="for --fidelity llm_judge (default: --model)")
    rephrase.add_argument("--max-chunk-chars", type=number(int, 1), default=2000)
    rephrase.add_argument("--max-doc-chars", type=number(int, 1), default=1_000_000)
    rephrase.add_argument("--fidelity-retries", type=number(int, 0), default=2)
    rephrase.add_argument("--on-fail", choices=("keep", "drop"), default="keep")
    rephrase.add_argument("--timeout", type=number(float, 0.001), default=120.0,
                          help="seconds per request, the whole reply included (a deadline, not per read)")
    rephrase.add_argument("--max-tokens", type=number(int, 1),
                          help="sent as max_tokens: the most tokens the server generates per reply")
    rephrase.add_argument("--retries", type=number(int, 0), default=5)
    rephrase.add_argument("--backoff", type=number(float, 0), default=1.0)
    rephrase.add_argument("--temperature", type=number(float, 0), default=0.7)
    return rephrase


def rephrase_main(argv=None, prog="data_rephrase.py") -> int:
    args = _parser(prog).parse_args(argv)
    return error_boundary(prog, lambda: run_rephrase(args), secrets=[args.api_key])


# -----------------------------------------------------------------------------------------------
# data.py's command line (`python data.py stats|rephrase ...`) and the error boundary of both

def run_stats(args) -> int:
    """`data.py stats`: documents, bytes and tokens per domain, and what loading skipped."""
    info = data.prepare(args.cache_dir, args.data, val_fraction=args.val_fraction, seed=args.seed)
    print(f"{'domain':<12}{'docs':>9}{'bytes':>13}{'train tokens':>15}{'val tokens':>13}{'epochs':>8}")
    for domain, s in sorted(info["stats"].items()):
        print(f"{domain:<12}{s['train_docs'] + s['val_docs']:>9,}{s['bytes']:>13,}"
              f"{s['train_tokens']:>15,}{s['val_tokens']:>13,}{s['epochs']:>8}")
    train = data.load_tokens(info, "train")
    print(f"total: {info['tokens']['train']:,} train + {info['tokens']['val']:,} val tokens "
          f"({info['dtype']}, vocab {info['vocab_size']}, eos {info['eos']}); unigram entropy "
          f"{data.unigram_entropy(train):.3f} nats/token; cache {info['dir']}"
          f"{' (reused)' if info['cached'] else ''}")
    if info.get("rebuilt"):
        print(f"token cache rebuilt: {info['rebuilt']}")
    report = {k: v for k, v in info["load_report"].items() if k != "problems" and v}
    print("loader:", ", ".join(f"{k} {v}" for k, v in report.items()))
    for problem in info["load_report"]["problems"]:
        print(f"  {problem}")
    return 0


def _data_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=data.__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    stats = commands.add_parser("stats", help="documents, bytes and tokens per domain")
    stats.add_argument("--data", nargs="+", default=None,
                       help="builtin[:DOMAIN] or [DOMAIN[:WEIGHT]=]PATH (default: builtin)")
    stats.add_argument("--cache-dir", default="data_cache")
    stats.add_argument("--val-fraction", type=number(float, 0, 1), default=0.05)
    stats.add_argument("--seed", type=int, default=0)
    commands.add_parser("rephrase", add_help=False,  # handed to rephrase_main before parsing, see main
                        help="rewrite documents with an LLM (K2 rephrasing): data.py rephrase --help")
    return parser


def main(argv=None) -> int:
    """data.py's command line (`data.main`): `stats`, or `rephrase` (this file's own command line)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["rephrase"]:
        return rephrase_main(argv[1:], prog="data.py rephrase")
    args = _data_parser().parse_args(argv)
    return error_boundary(f"data.py {args.command}", lambda: run_stats(args))


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP, raised in the main thread (see `error_boundary`)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum, frame):
    for sig in STOP_SIGNALS:  # the first signal ends the program; more while it cleans up are ignored
        signal.signal(sig, signal.SIG_IGN)
    raise Interrupted(signum)


STOP_SIGNALS = [getattr(signal, s) for s in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, s)]  # no SIGHUP on Windows


def error_boundary(prog: str, run: Callable[[], int], secrets=()) -> int:
    """Run a program's body and turn whatever ends it into an exit code and one line on stderr:
    bad input (DataError, CorruptFile) 2; a file that cannot be read or written (OSError, a full
    disk among them) 1, naming the file; SIGINT, SIGTERM or SIGHUP at any moment 128 + its number
    (what was written stays whole: every writer here is atomic or resumable); anything else 1,
    with the traceback saved to a file whose path the line gives. No string of `secrets` (an API
    key) is ever printed or saved: it is replaced by "***"."""
    def say(line):
        for secret in filter(None, secrets):
            line = line.replace(secret, "***")
        _stderr(f"{prog}: {line}")

    handlers = {sig: signal.signal(sig, _interrupt) for sig in STOP_SIGNALS}
    try:
        return run()
    except (DataError, CorruptFile) as e:
        say(str(e))
        return 2
    except KeyboardInterrupt as e:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        signum = getattr(e, "signum", signal.SIGINT)
        say(f"interrupted ({signal.Signals(signum).name}); what was written stays, and the same command resumes")
        return 128 + signum
    except Exception as e:
        if isinstance(e, OSError) and e.filename is not None:  # a full disk among them
            say(f"{e.filename}: {e.strerror or e}")
            return 1
        say(f"unexpected error: {_one_line(f'{type(e).__name__}: {e}')} ({_save_traceback(prog, secrets)})")
        return 1
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _save_traceback(prog: str, secrets) -> str:
    """The traceback being handled, `secrets` replaced by ***, saved to a new file: where it is."""
    text = traceback.format_exc()
    for secret in filter(None, secrets):
        text = text.replace(secret, "***")
    try:
        fd, saved = tempfile.mkstemp(prefix=f"{prog.split()[0].removesuffix('.py')}-traceback-", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            f.write(text)
    except OSError as e:
        return f"its traceback could not be saved: {e.strerror}"
    return f"traceback saved to {saved}"


def _one_line(text: str, limit=300) -> str:
    """An error text (a server's body may hold anything) as one line of at most `limit` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


def exit_now(code: int):
    """Leave with `code`; after a signal at once, not after the requests still in flight (their
    pairs are redone on resume)."""
    if code >= 128:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    exit_now(rephrase_main())
