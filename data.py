"""Kimi-K2 data: K2's rephrasing of scarce text, and the training data (corpus, tokenizer, batches).

Kimi K2 (K2 report, arXiv 2507.20534, sec. 2.2) pre-trains on web text, code, mathematics and
knowledge and raises the *token utility* of scarce high-quality text by rephrasing it with another
LLM: prompts of diverse styles and perspectives, long documents rewritten chunk by chunk with each
chunk conditioned on what was already rewritten, every chunk checked for fidelity to its source,
maths rewritten as "learning notes" and non-English maths translated. In reading order:

- Rephrasing: the prompts (`STYLES`, `rephrase_messages`), `split_chunks`, `rephrase_chunkwise`
  (chunk by chunk, the rewrite so far in each prompt, failures retried with their reason), and
  `fidelity` (a lexical, an embedding or an LLM-judge measure, and "every number survives"). Any
  callable `generate(messages) -> str` is the rephraser.
- The training data: `ByteTokenizer` (256 ids, lossless; any object with `encode`, `decode`,
  `vocab_size`, `eos` plugs in); documents from files or folders of .txt, .md, .py and .jsonl
  (field "text"), everything odd counted in a `LoadReport`, bad input a `DataError` naming it;
  `prepare`: split by document, per-domain mixture weights, tokenised once into memory-mapped files
  cached under a hash of inputs and settings, each checked (length, SHA-256) before use;
  `BatchSampler`: batches that are a pure function of (seed, step), so a resumed run sees exactly
  the batches it would have seen, on any number of DDP processes; `unigram_entropy`, the loss val
  loss must beat. Shared with train.py: `number`, `write_atomically`, `digest`/`verify`, `confined`.

Companions, copied beside this file: data_builtin.py, the built-in corpus (the standard library's
code and documentation, generated maths: `python train.py` works offline), and data_rephrase.py,
the corpus-scale rephrasing client and the command line:
    python data.py stats [--data SOURCE ...] [--cache-dir data_cache]
    python data.py rephrase ...        (= python data_rephrase.py ...)
Sources: "builtin" (all three default domains), "builtin:code", "builtin:knowledge", "builtin:math",
or "[DOMAIN[:WEIGHT]=]PATH" for a file or folder (domain "user" when not named), a rephrase output
among them: `knowledge=docs/ rephrased:0.5=rephrased.jsonl`. Weights: see `prepare`.
"""
from __future__ import annotations  # the rephrasing half comes first and names Document, defined below

import argparse
import errno
import hashlib
import json
import math
import os
import random
import re
import shutil
import socket
import stat
import sys
import threading
from collections import Counter
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import torch

# -----------------------------------------------------------------------------------------------
# Rephrasing (K2 report sec. 2.2): prompts of diverse styles and perspectives

STYLES = {  # style and perspective instructions; the first seven are for any text
    "encyclopedia": "Rewrite the text as a neutral, well-organised encyclopedia article.",
    "textbook": "Rewrite the text as a passage of a university textbook that teaches it, "
                "defining each term before using it.",
    "qa": "Rewrite the text as the questions a careful reader would ask, each followed by its answer.",
    "dialogue": "Rewrite the text as a conversation in which a teacher explains it to a curious student.",
    "expert_notes": "Rewrite the text as the concise working notes of an expert who uses this "
                    "material every day.",
    "plain_language": "Rewrite the text so that a motivated 14-year-old can follow it: short "
                      "sentences and everyday words, but the same content.",
    "journalist": "Rewrite the text as a science journalist's explanation for a general audience.",
    "learning_note": "The text is mathematics. Rewrite it as a student's learning note: the problem, "
                     "the key idea, every step of the working with its reason, and a check of the result.",
    "translate_en": "Translate the text into English. Keep formulas, code, numbers and names unchanged.",
}
GENERAL_STYLES = [s for s in STYLES if s not in ("learning_note", "translate_en")]
RULES = ("Keep every fact, name, number and formula of the source and add nothing that is not in "
         "it. Reply with the rewritten text only.")

def rephrase_messages(source: str, style: str, context: str = "", feedback: str = "") -> list[dict]:
    """The chat prompt for one chunk: style instruction, the rewrite so far, the chunk, and on a
    retry what was wrong with the previous attempt ("drifted from the source (...)", "was empty")."""
    user = ""
    if context:
        user += ("The rewrite so far (continue it; do not repeat it):\n"
                 f"<rewritten>\n{context}\n</rewritten>\n\n")
    user += f"Rewrite this next part of the source:\n<source>\n{source}\n</source>"
    if feedback:
        user += f"\n\nYour previous attempt {feedback}. Stay faithful to the source."
    return [{"role": "system", "content": f"You rewrite text for a training corpus. {STYLES[style]} {RULES}"},
            {"role": "user", "content": user}]


# -----------------------------------------------------------------------------------------------
# Chunks: long documents are rewritten piece by piece

def split_chunks(text: str, max_chars: int) -> list[str]:
    """Split text into chunks of at most max_chars, at paragraph breaks where possible, else at
    sentence ends, else at whitespace, else anywhere. Lossless: "".join(chunks) == text; each
    chunk keeps its trailing separator."""
    pieces = []
    parts = re.split(r"(\n[ \t]*\n\s*)", text)  # paragraphs and the blank lines after them
    for para in ("".join(parts[i:i + 2]) for i in range(0, len(parts), 2)):
        if len(para) <= max_chars:
            pieces.append(para)
            continue
        sentences = re.split(r"(?<=[.!?])(\s+)", para)
        for sentence in ("".join(sentences[i:i + 2]) for i in range(0, len(sentences), 2)):
            while len(sentence) > max_chars:  # one enormous sentence or line: cut at whitespace
                cut = max(sentence.rfind(" ", max_chars // 2, max_chars),
                          sentence.rfind("\n", max_chars // 2, max_chars)) + 1 or max_chars
                pieces.append(sentence[:cut])
                sentence = sentence[cut:]
            pieces.append(sentence)
    chunks, current, size = [], [], 0  # pieces joined once per chunk: growing a string is quadratic
    for piece in filter(None, pieces):
        if current and size + len(piece) > max_chars:
            chunks.append("".join(current))
            current, size = [], 0
        current.append(piece)
        size += len(piece)
    return chunks + ["".join(current)] if current else chunks


# -----------------------------------------------------------------------------------------------
# Chunk-wise autoregressive rewriting

@dataclass
class Rephrased:
    text: str
    chunks: list  # per chunk: index, chars, attempts, status, empty_replies, long_replies, the fidelity score


def _tail(text: str, n: int) -> str:
    """The last n characters of text, starting at a word boundary."""
    if len(text) <= n:
        return text
    tail = text[-n:]
    return tail[tail.find(" ") + 1:] if " " in tail else tail


def max_rewrite_chars(source: str) -> int:
    """The longest rewrite a chunk allows. The report's styles reword and restructure (a dialogue or
    a learning note runs to two or three times its source); a reply past four times its source plus
    a paragraph is a model that did not stop, or a server that sent something else, not a rewrite."""
    return 4 * len(source) + 500


def _rewrite_chunk(source, style, context, generate, measure, threshold, min_numbers_kept, retries):
    """Up to retries + 1 attempts at one chunk, each failure named in the next prompt. An empty
    reply, or one longer than `max_rewrite_chars` allows, is a failed attempt (and is not scored).
    Returns (the rewrite, "" when every attempt failed; the last attempt's score; attempts;
    {"empty_replies": n, "long_replies": n})."""
    feedback, rejected = "", Counter(empty_replies=0, long_replies=0)
    for attempt in range(1, retries + 2):
        rewrite = generate(rephrase_messages(source, style, context, feedback)).strip()
        if not rewrite or len(rewrite) > max_rewrite_chars(source):
            rejected["long_replies" if rewrite else "empty_replies"] += 1
            score = dict(measure=measure.name, similarity=0.0, **_numbers_kept(source, ""))
            feedback = (f"was {len(rewrite)} characters long, far longer than a rewrite of this "
                        f"{len(source)}-character part can be" if rewrite else "was empty")
            continue
        score = fidelity(source, rewrite, measure)
        if score["similarity"] >= threshold and score["numbers_kept"] >= min_numbers_kept:
            return rewrite, score, attempt, rejected
        feedback = _drift(score)
    return "", score, attempt, rejected


def rephrase_chunkwise(doc: str, style: str, generate: Callable[[list[dict]], str], *,
                       max_chunk_chars=2000, context_chars=3000, measure=None, min_similarity=None,
                       min_numbers_kept=1.0, retries=2, on_fail="keep") -> Rephrased:
    """Rewrite `doc` in `style` chunk by chunk, as K2 rephrases long documents (K2 report sec. 2.2).

    The document is split at paragraph/sentence boundaries into chunks of at most max_chunk_chars
    (`split_chunks`); each chunk is rewritten with the last context_chars of the already rewritten
    text in its prompt, so the rewrite continues coherently; the rewrites are joined in order with
    the source's separators. Every rewrite is checked against its chunk (`fidelity` with `measure`,
    lexical by default): below min_similarity (default `min_similarity_for(measure, style)`) or
    min_numbers_kept, or empty, or far too long (`max_rewrite_chars`), it is retried up to `retries`
    times with the failure named in the prompt; then on_fail="keep" keeps the source chunk and
    "drop" leaves it out. `generate(messages) -> str` is any backend; its errors propagate.
    """
    if on_fail not in ("keep", "drop"):
        raise ValueError(f"on_fail must be 'keep' or 'drop', got {on_fail!r}")
    measure = measure or LexicalFidelity()
    threshold = min_similarity_for(measure.name, style) if min_similarity is None else min_similarity
    out, chunks = "", []
    for index, piece in enumerate(split_chunks(doc, max_chunk_chars)):
        source = piece.strip()
        if not source:
            continue
        rewrite, score, attempts, rejected = _rewrite_chunk(source, style, _tail(out, context_chars), generate,
                                                            measure, threshold, min_numbers_kept, retries)
        status = "ok" if rewrite else "kept_original" if on_fail == "keep" else "dropped"
        rewrite = rewrite or (source if on_fail == "keep" else "")
        if rewrite:
            out += rewrite + (piece[len(piece.rstrip()):] or " ")  # the source's separator
        chunks.append(dict(index=index, chars=len(source), attempts=attempts, status=status, **rejected, **score))
    return Rephrased(out.strip(), chunks)


# -----------------------------------------------------------------------------------------------
# Fidelity: a measure maps (source, rewrite) to {"similarity": s, ...} and passes a chunk when s
# reaches its threshold; every measure is combined with the "every number survives" check.

MIN_SIMILARITY = {  # pass thresholds per measure, for any style not listed in STYLE_MIN_SIMILARITY
    "lexical": 0.25,    # TF-IDF cosine: faithful rewrites with many synonyms score low
    "embedding": 0.80,  # cosine of sentence embeddings; paraphrases score ~0.85-0.95 with common
                        # embedding models, unrelated text far lower; calibrate per model
    "llm_judge": 1.0,   # 1 = the judge says every fact is kept, 0 = it says some are not
}
STYLE_MIN_SIMILARITY = {("lexical", "translate_en"): 0.0}  # word overlap across languages means nothing


def min_similarity_for(measure: str, style: str) -> float:
    return STYLE_MIN_SIMILARITY.get((measure, style), MIN_SIMILARITY[measure])


def _ngrams(text: str, n: int) -> dict[str, int]:
    words = re.findall(r"\w+", text.lower())
    counts = {}
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            gram = " ".join(words[i:i + k])
            counts[gram] = counts.get(gram, 0) + 1
    return counts


def tfidf_cosine(a: str, b: str, n: int = 2) -> float:
    """Cosine of word 1..n-gram TF-IDF vectors (sublinear tf, smoothed idf over the pair: a term in
    only one text weighs more than a shared one)."""
    ca, cb = _ngrams(a, n), _ngrams(b, n)

    def vector(counts, other):
        return {g: (1 + math.log(c)) * (math.log(3 / (2 + (g in other))) + 1) for g, c in counts.items()}

    va, vb = vector(ca, cb), vector(cb, ca)
    dot = sum(w * vb[g] for g, w in va.items() if g in vb)
    norm = math.sqrt(sum(w * w for w in va.values()) * sum(w * w for w in vb.values()))
    return dot / norm if norm else float(a.strip() == b.strip())


class LexicalFidelity:
    """The offline default: TF-IDF cosine of word 1-2 grams. It is lexical, so a faithful rewrite
    with many synonyms scores low (hence a low threshold) and a negated or reordered claim with the
    same words scores high; it compares nothing across languages (translate_en checks numbers only)."""
    name = "lexical"

    def __call__(self, source: str, rewrite: str) -> dict:
        return {"similarity": tfidf_cosine(source, rewrite)}


class EmbeddingFidelity:
    """Semantic similarity as the report describes it: the cosine of the two texts' embeddings.
    `embed(texts) -> vectors` is any embedding function, e.g. an `EmbeddingEndpoint`."""
    name = "embedding"

    def __init__(self, embed: Callable[[list[str]], Sequence[Sequence[float]]]):
        self.embed = embed

    def __call__(self, source: str, rewrite: str) -> dict:
        u, v = np.asarray(self.embed([source, rewrite]), float)
        return {"similarity": float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v) or 1.0))}


JUDGE_PROMPT = (
    "You check rewritten text for a training corpus. Decide whether the rewrite keeps every fact of "
    "the source (claims, names, numbers, formulas) without changing, contradicting or adding any; "
    "style and order may differ. Answer with one JSON object and nothing else: "
    '{"keeps_every_fact": true or false, "missing": ["each fact of the source that the rewrite '
    'lost or changed, in a few words"]}. "missing" is empty exactly when keeps_every_fact is true.')


def parse_verdict(answer: str) -> tuple[bool, list[str]]:
    """The judge's answer, strictly: one JSON object with exactly the keys keeps_every_fact (a
    boolean) and missing (strings, empty exactly when the verdict is true). ValueError otherwise."""
    try:
        verdict = json.loads(answer)
    except ValueError:
        raise ValueError("not a JSON object") from None
    if not isinstance(verdict, dict) or set(verdict) != {"keeps_every_fact", "missing"}:
        raise ValueError('not an object with exactly the keys "keeps_every_fact" and "missing"')
    keeps, missing = verdict["keeps_every_fact"], verdict["missing"]
    strings = isinstance(missing, list) and all(isinstance(m, str) for m in missing)
    if not isinstance(keeps, bool) or not strings:
        raise ValueError('"keeps_every_fact" must be true or false and "missing" a list of strings')
    if keeps == bool(missing):
        raise ValueError('"missing" must be empty exactly when "keeps_every_fact" is true')
    return keeps, missing


class GenerationError(RuntimeError):
    """A backend gave up: the message names the endpoint, the HTTP status or error, and the body."""


class JudgeFidelity:
    """An LLM asked whether the rewrite keeps every fact of its source (`JUDGE_PROMPT`), its answer
    parsed strictly (`parse_verdict`). A malformed answer is rejected and the judge asked again, told
    why, up to `retries` times; then GenerationError (a judge that cannot answer is a broken setup,
    like a dead server). similarity is 1.0 or 0.0; judge_missing lists what the judge found lost."""
    name = "llm_judge"

    def __init__(self, generate: Callable[[list[dict]], str], retries: int = 2):
        self.generate, self.retries = generate, retries

    def __call__(self, source: str, rewrite: str) -> dict:
        pair = f"<source>\n{source}\n</source>\n\n<rewrite>\n{rewrite}\n</rewrite>"
        messages = [{"role": "system", "content": JUDGE_PROMPT}, {"role": "user", "content": pair}]
        for attempt in range(self.retries + 1):
            answer = self.generate(messages)
            try:
                keeps, missing = parse_verdict(answer.strip())
            except ValueError as e:
                problem = str(e)
                messages = messages[:2] + [{"role": "assistant", "content": answer},
                                           {"role": "user", "content": f"That answer was rejected: {e}. "
                                                                       "Reply with the JSON object only."}]
                continue
            return {"similarity": float(keeps), "judge_missing": missing}
        raise GenerationError(f"LLM judge: no valid verdict in {self.retries + 1} answers; last: {problem}")


def _numbers(text: str) -> set[str]:
    return {m.replace(",", "") for m in re.findall(r"\d+(?:[.,]\d+)*", text)}


def _numbers_kept(source: str, rewrite: str) -> dict:
    """The share of the source's numbers (digits; "1,000" == "1000") found in the rewrite; a
    number spelled out in words counts as missing."""
    wanted = _numbers(source)
    missing = sorted(wanted - _numbers(rewrite))
    kept = round(1 - len(missing) / len(wanted), 4) if wanted else 1.0
    return dict(numbers_kept=kept, missing_numbers=missing)


def fidelity(source: str, rewrite: str, measure=None) -> dict:
    """How faithful a rewritten chunk is to its source: the measure's name and similarity
    (`LexicalFidelity` by default, `EmbeddingFidelity`, `JudgeFidelity` or any callable with a
    `name`), its extra fields, and numbers_kept / missing_numbers."""
    measure = measure or LexicalFidelity()
    score = measure(source, rewrite)
    return dict(measure=measure.name, similarity=round(score.pop("similarity"), 4),
                **_numbers_kept(source, rewrite), **score)


def _drift(score: dict) -> str:
    """Feedback for the retry prompt: what the failed attempt got wrong."""
    feedback = f"similarity {score['similarity']:.2f}"
    if score["missing_numbers"]:
        feedback += f", missing numbers {', '.join(score['missing_numbers'])}"
    if score.get("judge_missing"):
        feedback += f", facts lost: {'; '.join(score['judge_missing'])}"
    return f"drifted from the source ({feedback})"


# The companions' names are reachable here too (`data.rephrase_corpus`, `data.main`), imported on
# first use: data_rephrase.py (backends, shards, the output lock, resume; the command line and its
# error boundary) and data_builtin.py (the built-in corpus).
COMPANION_NAMES = {
    "data_rephrase": {"OpenAIEndpoint", "ChatEndpoint", "EmbeddingEndpoint", "CheckpointGenerator", "MAX_REPLY_BYTES",
                      "rephrase_corpus", "rephrase_key", "in_shard", "exclusive_output", "completed_keys",
                      "styles_for", "record_line", "main", "run_stats", "error_boundary", "exit_now", "Interrupted",
                      "STOP_SIGNALS"},
    "data_builtin": {"STDLIB", "BUILTIN_DOMAINS", "stdlib_documents", "math_documents", "MATH_KINDS"},
}


def _companion(module: str, needed_for: str, error: type[Exception]):
    """The companion module, imported; without it, `error`: one line saying to copy it beside data.py."""
    try:
        return __import__(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        raise error(f"{needed_for} lives in {module}.py; copy it beside data.py") from None


def __getattr__(name):
    for module, names in COMPANION_NAMES.items():
        if name in names:
            return getattr(_companion(module, f"data.{name}", AttributeError), name)
    raise AttributeError(f"module 'data' has no attribute {name!r}")


# -----------------------------------------------------------------------------------------------
# The training data. Tokenizer

class Tokenizer(Protocol):
    """What `prepare`, the samplers and the kimik2 backend need from a tokenizer."""
    vocab_size: int
    eos: int  # id written after every document

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: 256 ids, no training, lossless for any Unicode text. eos is 0, the NUL
    byte: the tiny preset's 256 ids have none free, so the byte text practically never holds is
    spent (a NUL inside a document still round-trips; the model reads it as a document boundary).
    `decode` replaces invalid UTF-8 (a model can emit any byte sequence) with U+FFFD."""
    vocab_size = 256
    eos = 0

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def save_pretrained(self, directory: str):
        """tokenizer.json + tokenizer_config.json for transformers' AutoTokenizer, with the same ids
        and text: a BPE of the 256 byte tokens <0x00>..<0xFF> (id = byte) only, so byte fallback
        spells every character in UTF-8; eos <0x00>. (Invalid UTF-8 decodes differently: U+FFFD
        for every byte of a run that does not decode, where `decode` replaces only the bad bytes.)"""
        byte_token = [f"<0x{b:02X}>" for b in range(256)]
        tokenizer = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
                     "pre_tokenizer": None, "post_processor": None,
                     "decoder": {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}]},
                     "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                               "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": True,
                               "ignore_merges": False, "vocab": {t: b for b, t in enumerate(byte_token)}, "merges": []}}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": byte_token[self.eos],
                  "clean_up_tokenization_spaces": False, "model_max_length": 1 << 30}
        os.makedirs(directory, exist_ok=True)
        for name, obj in (("tokenizer.json", tokenizer), ("tokenizer_config.json", config)):
            write_atomically(os.path.join(directory, name), lambda f: json.dump(obj, f, indent=1))


# -----------------------------------------------------------------------------------------------
# Documents: user files and folders, the load report, bad input

USER_SUFFIXES = {".txt", ".md", ".py", ".jsonl"}
MAX_PROBLEMS_LISTED = 20  # problems named in the report (file:line); all of them are counted


class DataError(ValueError):
    """Bad input: a missing or empty source, a bad option or record. The message names the file,
    line or option."""


@dataclass
class Document:
    domain: str  # "code", "knowledge", "math", or the name a user gave a source
    name: str    # where it came from: a path, "path:line" for .jsonl, "pydoc:topic", "math#17"
    text: str


@dataclass
class LoadReport:
    """What loading met on the way. Nothing here is fatal; all of it is counted."""
    files: int = 0
    documents: int = 0
    empty_documents: int = 0      # empty or blank files and jsonl texts: skipped
    non_utf8_files: int = 0       # undecodable bytes replaced by U+FFFD
    bad_json_lines: int = 0       # unparsable line or no string "text": skipped, listed as file:line
    bad_encoding_lines: int = 0   # a jsonl text with a lone surrogate ("\udc80"): no UTF-8 exists, skipped
    unsupported_files: int = 0    # in a folder: not .txt/.md/.py/.jsonl, or not a regular file
                                  # (a FIFO, a socket, a broken link, a symlink loop): skipped
    unreadable_files: int = 0     # in a folder: a file or subfolder that cannot be read: skipped
    nul_bytes: int = 0            # NUL characters kept in the text: the byte tokenizer's eos id
    split_documents: int = 0      # longer than max_doc_chars: cut at paragraph/sentence boundaries
    duplicate_documents: int = 0  # exact repeats dropped, so no text is both train and val
    problems: list = field(default_factory=list)

    def problem(self, where: str, what: str):
        if len(self.problems) < MAX_PROBLEMS_LISTED:
            self.problems.append(f"{where}: {what}")


LOAD_SKIPS = (  # what describe_load_report counts: input skipped, repaired or to be known
    "empty_documents", "non_utf8_files", "bad_json_lines", "bad_encoding_lines", "unsupported_files",
    "unreadable_files", "nul_bytes")


def describe_load_report(info: dict) -> str:
    """One line on what loading skipped, repaired or found odd (the `LOAD_SKIPS` counts, the first
    problems as file:line examples) and on a token cache rebuilt; "" when there was nothing."""
    report = info["load_report"]
    counts = [f"{report[k]} {k.replace('_', ' ')}" for k in LOAD_SKIPS if report[k]]
    line = f"skipped or repaired {', '.join(counts)} (e.g. {'; '.join(report['problems'][:3])})" if counts else ""
    if info.get("rebuilt"):
        line = f"token cache rebuilt: {info['rebuilt']}" + (f"; {line}" if line else "")
    return f"data: {line}" if line else ""


def _lone_surrogates(text: str) -> int:
    """How many lone UTF-16 surrogates text holds. JSON can carry one ("\\ud83d", half an emoji)
    and Python decodes it into a str that no UTF-8 writer accepts."""
    return sum(0xD800 <= ord(c) <= 0xDFFF for c in text) if not text.isascii() else 0


def _decode(data: bytes, where: str, report: LoadReport) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        report.non_utf8_files += 1
        report.problem(where, f"not UTF-8 ({e.reason} at byte {e.start}); bad bytes replaced")
        return data.decode("utf-8", errors="replace")


def _file_documents(path: Path, domain: str, report: LoadReport):
    try:
        data = path.read_bytes()
    except OSError as e:  # named explicitly, `parse_source` has opened it already: this is a folder's file
        report.unreadable_files += 1
        report.problem(str(path), f"cannot be read ({e.strerror}); skipped")
        return
    report.files += 1
    if path.suffix != ".jsonl":
        yield Document(domain, str(path), _decode(data, str(path), report))
        return
    for lineno, raw in enumerate(data.splitlines(keepends=True), 1):  # a huge line: one record, one document
        where = f"{path}:{lineno}"
        if not raw.strip():
            continue
        try:
            record = checked_record(raw.rstrip(b"\r\n")) or json.loads(raw.decode("utf-8"))
        except CorruptFile as e:  # a rephrase record whose bytes changed since it was written
            raise DataError(f"{where}: {e}; delete the line (the same rephrase command redoes it)") from None
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError (a record cut short by a kill is bad JSON)
            report.bad_json_lines += 1
            report.problem(where, f"bad JSON line skipped ({type(e).__name__}: {str(e)[:80]})")
            continue
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            report.bad_json_lines += 1
            report.problem(where, 'line skipped: not an object with a string field "text"')
        elif _lone_surrogates(record["text"]):
            report.bad_encoding_lines += 1
            report.problem(where, "line skipped: its text has a lone surrogate (invalid Unicode)")
        else:
            yield Document(domain, where, record["text"])


RECORD_START = b'{"key": '  # how every rephrase record line begins (data_rephrase.record_line)
RECORD_CHECK = re.compile(rb'(\{"key": .*), "check": "([0-9a-f]{16})"\}', re.S)


def checked_record(line: bytes) -> dict | None:
    """The rephrase record on `line` (no newline) when its last field, "check", is the SHA-256 (16 hex
    digits) of the bytes before it; None when the line is no such record (a user's JSON line is
    not); CorruptFile when it is one and fails: its bytes changed after it was written."""
    if not (m := RECORD_CHECK.fullmatch(line)):
        return None
    if hashlib.sha256(m[1]).hexdigest()[:16].encode() != m[2]:
        raise CorruptFile("a rephrase record that fails its check: its bytes changed after it was written")
    return json.loads(line)


@dataclass
class Source:
    """One parsed "[DOMAIN[:WEIGHT]=]PATH": the files to read, and (LoadReport field, path, why) per skip."""
    domain: str
    weight: float | None
    files: list
    skipped: list


def _not_a_file(path: Path) -> str | None:
    """Why path, a name met in a folder or given as a source, is no file or folder to read (a broken
    link, a symlink loop, a FIFO, a socket, a device), or None when it is one."""
    try:
        mode = path.stat().st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symlink loop"
        if path.is_symlink():
            return f"a broken symbolic link (to {os.readlink(path)})"
        return None if e.errno == errno.ENOENT else e.strerror
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"


def _folder_files(folder: Path) -> tuple[list, list]:
    """The .txt/.md/.py/.jsonl files under folder, sorted, and (LoadReport field, path, why) for
    everything else met there."""
    files, skipped = [], []

    def unreadable(e: OSError):
        skipped.append(("unreadable_files", e.filename, f"folder cannot be read ({e.strerror}); skipped"))

    for root, dirs, names in os.walk(folder, onerror=unreadable):
        dirs.sort()
        for name in dirs:
            if Path(root, name).is_symlink():  # os.walk does not follow it: a cycle cannot start
                skipped.append(("unsupported_files", str(Path(root, name)), "a link to a folder, not followed"))
        for path in (Path(root, name) for name in sorted(names)):
            if why := _not_a_file(path):
                skipped.append(("unsupported_files", str(path), f"{why}; skipped"))
            elif path.suffix not in USER_SUFFIXES:
                skipped.append(("unsupported_files", str(path), "skipped: not a .txt/.md/.py/.jsonl file"))
            else:
                files.append(path)
    return files, skipped


def parse_source(spec: str) -> Source:
    """'[DOMAIN[:WEIGHT]=]PATH' -> Source (an existing path is taken literally, "=" and all). A file
    named explicitly is read whatever its suffix; one that cannot be read, or a path that is no file
    or folder, is a DataError naming it; a folder, see `_folder_files`."""
    head, _, path = ("", "", spec) if os.path.lexists(spec) else spec.rpartition("=")
    domain, _, weight_text = head.partition(":")
    weight = None
    if weight_text:
        try:
            weight = float(weight_text)
        except ValueError:
            weight = -1.0
        if not 0 <= weight < math.inf:
            raise DataError(f"data source {spec!r}: weight {weight_text!r} is not a number >= 0")
    path = Path(path)
    if why := _not_a_file(path):
        raise DataError(f"data source {spec!r}: {path} is {why}, not a file or folder")
    if not path.exists():
        raise DataError(f"data source {spec!r}: no such file or folder")
    if path.is_file():
        try:
            open(path, "rb").close()
        except OSError as e:
            raise DataError(f"data source {spec!r}: {path} cannot be read ({e.strerror})") from None
        return Source(domain or "user", weight, [path], [])
    files, skipped = _folder_files(path)
    if not files:
        others = f" ({len(skipped)} other entries)" if skipped else ""
        raise DataError(f"data source {spec!r}: no .txt/.md/.py/.jsonl files in {path}{others}")
    return Source(domain or "user", weight, files, skipped)


def _builtin():
    """data_builtin.py, the built-in corpus (files and folders need only data.py)."""
    return _companion("data_builtin", 'data source "builtin"', DataError)


def load_documents(sources=("builtin",), seed=0, max_doc_chars=1_000_000, report=None):
    """Every document of `sources` (see the module docstring), non-empty, at most max_doc_chars
    long (longer ones are cut at paragraph or sentence boundaries into several documents)."""
    report = report if report is not None else LoadReport()
    docs = []
    for spec in map(str, sources):
        if spec.startswith("builtin"):
            docs += _builtin().builtin_documents(spec, seed)
            continue
        source = parse_source(spec)
        for count, where, why in source.skipped:
            setattr(report, count, getattr(report, count) + 1)
            report.problem(where, why)
        for path in source.files:
            docs += _file_documents(path, source.domain, report)
    kept = []
    for doc in docs:
        if nul := doc.text.count("\0"):  # kept, but the byte tokenizer reads each as the end of a document
            report.nul_bytes += nul
            report.problem(doc.name, f"{nul} NUL characters, which the byte tokenizer reads as end of document")
        if not doc.text.strip():
            report.empty_documents += 1
            report.problem(doc.name, "empty document skipped")
        elif len(doc.text) > max_doc_chars:
            report.split_documents += 1
            kept += [Document(doc.domain, f"{doc.name}#part{k}", piece)
                     for k, piece in enumerate(split_chunks(doc.text, max_doc_chars))]
        else:
            kept.append(doc)
    report.documents = len(kept)
    return kept


# -----------------------------------------------------------------------------------------------
# Preparation: split by document, mix domains, tokenise once into memory-mapped files

def _carve_validation(doc: Document, val_fraction: float) -> tuple[Document, Document]:
    """A domain's only document cut in two, so that it has validation text: its end, about
    val_fraction of it (at most twice that), from a paragraph break, else a sentence end, else a
    space, else exactly at (1 - val_fraction) of its characters."""
    text = doc.text
    at = min(len(text) - 1, max(1, round(len(text) * (1 - val_fraction))))
    lo = max(1, at - (len(text) - at))  # the cut lies in [lo, at]: validation gets 1x to 2x its share
    cut = at
    for boundary in (r"\n[ \t]*\n\s*", r"(?<=[.!?])\s+", r"\s+"):
        if ends := [m.end() for m in re.finditer(boundary, text[lo:at])]:
            cut = lo + ends[-1]
            break
    return (Document(doc.domain, f"{doc.name}#train", text[:cut]),
            Document(doc.domain, f"{doc.name}#val", text[cut:]))


def split_by_document(docs, val_fraction, seed):
    """Per domain, the round(val_fraction * n) documents whose seeded hash ranks lowest go to
    validation (at least one when n >= 2 and val_fraction > 0, never all): a document keeps its
    side when others are added or removed. A domain of one document is cut instead, its end to
    validation (`_carve_validation`), so a one-file corpus still trains and validates."""
    by_domain = {}
    for doc in docs:
        by_domain.setdefault(doc.domain, []).append(doc)
    train, val = [], []
    for domain in sorted(by_domain):
        ranked = sorted(by_domain[domain], key=lambda d: hashlib.sha1(f"{seed}\0{d.text}".encode()).digest())
        n = len(ranked)
        if n == 1 and val_fraction > 0 and len(ranked[0].text) >= 2:
            head, tail = _carve_validation(ranked[0], val_fraction)
            train.append(head)
            val.append(tail)
            continue
        n_val = min(n - 1, max(round(val_fraction * n), 1 if val_fraction > 0 and n >= 2 else 0))
        val += ranked[:n_val]
        train += ranked[n_val:]
    return train, val


def mix_domains(train, weights, seed):
    """Resample training documents so that domain d holds weights[d] / sum(weights) of the training
    text (UTF-8 bytes, total unchanged): whole documents in a seeded order, cycled past a domain's
    size (extra epochs, as K2 gives its rephrased knowledge) or cut short; weight 0 drops a domain."""
    by_domain = {}
    for doc in train:
        by_domain.setdefault(doc.domain, []).append(doc)
    if missing := sorted(set(by_domain) - set(weights)):
        raise DataError(f"weights has no entry for domain(s) {missing}; got {sorted(weights)}")
    total = sum(len(d.text.encode()) for d in train)
    norm = sum(weights[d] for d in by_domain)
    if norm <= 0:
        raise DataError(f"the domain weights {weights} leave no training text")
    mixed = []
    for domain in sorted(by_domain):
        docs = by_domain[domain]
        random.Random(f"{seed}:{domain}").shuffle(docs)
        target, taken, i = total * weights[domain] / norm, 0, 0
        while taken < target:
            doc = docs[i % len(docs)]
            mixed.append(doc)
            taken += len(doc.text.encode())
            i += 1
    return mixed


def source_weights(sources, domains, weights=None) -> dict | None:
    """The mixture weights: those stated in the sources ("DOMAIN:WEIGHT=PATH"), every other domain 1,
    and `weights` (domain -> weight) over both; None (natural sizes) when nothing states a weight."""
    stated = {}
    for spec in map(str, sources):
        if not spec.startswith("builtin") and (source := parse_source(spec)).weight is not None:
            if stated.setdefault(source.domain, source.weight) != source.weight:
                raise DataError(f"data source {spec!r}: domain {source.domain!r} already has weight "
                                f"{stated[source.domain]:g}")
    if not stated:
        return weights
    return {**{d: 1.0 for d in domains}, **stated, **(weights or {})}


def _tokenizer_fingerprint(tokenizer) -> str:
    """Class, vocabulary, eos and the encoding of a probe text: catches most tokenizer changes."""
    probe = "Kimi K2: ∑ x² = 42 \u00e9\u4e2d\U0001f600 def f(x):\n\treturn x"
    return f"{type(tokenizer).__qualname__}|{tokenizer.vocab_size}|{tokenizer.eos}|{tokenizer.encode(probe)}"


def _cache_key(sources, tokenizer, settings) -> str:
    """Hash of everything the token files depend on. User files enter by (path, size, mtime) like
    make; the built-in corpus by the Python version and data_builtin.py's bytes; this file by its
    bytes, so any edit of the loader, the generators or the split rebuilds."""
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(json.dumps([settings, _tokenizer_fingerprint(tokenizer), sys.version]).encode())
    for spec in map(str, sources):
        h.update(spec.encode())
        if spec.startswith("builtin"):
            builtin = _builtin()
            h.update(Path(builtin.__file__).read_bytes() + str(builtin.STDLIB).encode())
        else:
            for path in parse_source(spec).files:
                st = path.stat()
                h.update(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _token_dtype(vocab_size: int):
    return np.uint8 if vocab_size <= 1 << 8 else np.uint16 if vocab_size <= 1 << 16 else np.uint32


def _resolve(info: dict, directory: Path) -> dict:
    return {**info, "dir": str(directory), "train": str(directory / "train.bin"),
            "val": str(directory / "val.bin")}


def _write_tokens(path: Path, docs, tokenizer, dtype) -> tuple[list[int], dict]:
    """Each document's tokens then eos, to path, fsynced. Returns the token count per document and
    the file's `digest`, hashed on the way out (the file is not read back)."""
    lengths, h, size = [], hashlib.sha256(), 0
    with open(path, "wb") as f:
        for doc in docs:
            block = np.asarray(tokenizer.encode(doc.text) + [tokenizer.eos], dtype=dtype).tobytes()
            f.write(block)
            h.update(block)
            size += len(block)
            lengths.append(len(block) // dtype.itemsize)
        f.flush()
        os.fsync(f.fileno())
    return lengths, {"bytes": size, "sha256": h.hexdigest()}


def _dedup(docs, report: LoadReport) -> list[Document]:
    """Documents with exact repeats dropped (counted), so no text is both train and val."""
    kept, seen = [], set()
    for doc in docs:
        digest = hashlib.sha1(doc.text.encode()).digest()
        if digest in seen:
            report.duplicate_documents += 1
        else:
            seen.add(digest)
            kept.append(doc)
    return kept


def prepare(out_dir="data_cache", sources=None, tokenizer=None, val_fraction=0.05, weights=None,
            seed=0, max_doc_chars=1_000_000) -> dict:
    """Tokenise `sources` once into out_dir/<key>/{train,val}.bin and return their description.

    Every document is followed by tokenizer.eos. The split is by document (`split_by_document`), so
    no validation text is in the training file; mixture weights (`source_weights`: stated in the
    sources as "DOMAIN:WEIGHT=PATH", or `weights`, domain -> share of the training text) resample
    the training documents (`mix_domains`); validation keeps every domain at its natural size. The
    files are cached under a hash of inputs and settings, rebuilt when one changes or the folder
    fails its check (`_adopt`: never trained on; "rebuilt" says why), and built in a temporary
    folder renamed into place, so a killed or concurrent `prepare` (one per DDP rank) never leaves
    or reads half a file.

    Returns a JSON-able dict: "train"/"val" paths, "dtype", "vocab_size", "eos", "tokens" per
    split, "stats" per domain (docs, bytes, tokens per split; "epochs" = training copies per
    document), "load_report" (`LoadReport`; `describe_load_report` says it in one line), "key",
    "cached", "rebuilt", "files" (each file's `digest`). Open the files with `load_tokens`. Bad
    sources raise DataError; a failed write (a full disk), OSError naming the file.
    """
    tokenizer = tokenizer or ByteTokenizer()
    sources = [str(s) for s in (sources or ["builtin"])]
    settings = dict(val_fraction=val_fraction, weights=weights, seed=seed, max_doc_chars=max_doc_chars)
    key = _cache_key(sources, tokenizer, settings)
    final = confined(out_dir, key)
    _remove_stale_builds(Path(out_dir))
    info, unusable = _adopt(final)
    if info is not None:
        return {**_resolve(info, final), "cached": True}

    report = LoadReport()
    docs = _dedup(load_documents(sources, seed, max_doc_chars, report), report)
    train, val = split_by_document(docs, val_fraction, seed)
    natural = Counter()  # training bytes per domain before mixing, for the "epochs" statistic
    for doc in train:
        natural[doc.domain] += len(doc.text.encode())
    if (weights := source_weights(sources, natural, weights)) is not None:
        train = mix_domains(train, weights, seed)
    random.Random(seed).shuffle(train)  # neighbouring documents in a window come from any domain

    stats = {d.domain: dict(bytes=0, train_docs=0, train_tokens=0, val_docs=0, val_tokens=0, epochs=0.0)
             for d in docs}
    for doc in docs:
        stats[doc.domain]["bytes"] += len(doc.text.encode())
    for doc in train:
        stats[doc.domain]["epochs"] += len(doc.text.encode()) / natural[doc.domain]
    for s in stats.values():
        s["epochs"] = round(s["epochs"], 3)
    info = dict(key=key, dtype=np.dtype(_token_dtype(tokenizer.vocab_size)).name,
                vocab_size=tokenizer.vocab_size, eos=tokenizer.eos, sources=sources, settings=settings,
                stats=stats, load_report=asdict(report))
    info = _write_cache(final, {"train": train, "val": val}, tokenizer, info)
    return {**_resolve(info, final), "cached": False, "rebuilt": unusable}


CACHE_FILES = ("train.bin", "val.bin", "meta.json")  # all that a cache folder holds: nothing else is deleted


def _adopt(final: Path) -> tuple[dict | None, str | None]:
    """(meta.json's info, None) when `final` is a complete cache folder whose every file passes its
    check (meta.json its own and its key, the token files their digests); (None, why not) otherwise,
    and `prepare` rebuilds it; (None, None) when there is no folder. A folder that also holds files
    this program does not write is refused (DataError) before anything is moved."""
    if not final.exists():
        return None, None
    if extra := sorted(set(os.listdir(final)) - set(CACHE_FILES)):
        raise DataError(f"token cache {final} holds {extra[0]!r}, which this program did not write; "
                        "move it (or the folder) away")
    meta = final / "meta.json"
    try:
        info = json.loads(meta.read_bytes())
        if info.pop("check") != _json_check(info):
            return None, f"{meta} fails its check: its bytes changed after it was written"
    except FileNotFoundError:
        return None, f"{final} has no meta.json: a copy or a build that stopped early"
    except (ValueError, KeyError, TypeError, AttributeError):
        return None, f"{meta} is not a meta.json this program wrote"
    if info.get("key") != final.name:
        return None, f"{meta} belongs to another corpus's cache (key {info.get('key')})"
    try:
        for name, expected in info["files"].items():
            verify_once(confined(final, name), expected, "token file")
    except (CorruptFile, FileNotFoundError) as e:
        return None, str(e) if isinstance(e, CorruptFile) else f"{e.filename} is missing"
    return info, None


def _json_check(obj) -> str:
    """The SHA-256 of obj's canonical JSON: what a metadata file carries to check itself."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _remove_stale_builds(cache: Path):
    """Remove the tmp-<key>-<pid>@<host> and old-<key>-<pid>@<host> folders (`_write_cache`), holding
    only cache files, that killed builds on this host left. The host is in the name because a cache
    folder may be shared by machines, where another host's pid says nothing here."""
    host = socket.gethostname()
    for tmp in cache.glob("*-*-*@*"):
        m = re.fullmatch(r"(?:tmp|old)-[0-9a-f]{16}-(\d+)@(.+)", tmp.name)
        if (m and m[2] == host and not _alive(int(m[1])) and tmp.is_dir() and not tmp.is_symlink()
                and set(os.listdir(tmp)) <= set(CACHE_FILES)):
            shutil.rmtree(confined(cache, tmp.name), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: nothing is sent, only whether the process exists is checked
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _write_cache(final: Path, splits: dict, tokenizer, info: dict) -> dict:
    """Each split's tokens, and `info` (completed with token counts, each file's `digest` and its own
    check) as meta.json, fsynced in a temporary folder then renamed to `final`; an unusable folder in
    the way is moved aside first. A failure or a signal removes the temporary folder."""
    stats, dtype = info["stats"], np.dtype(info["dtype"])
    suffix = f"{final.name}-{os.getpid()}@{socket.gethostname()}"
    tmp, old = confined(final.parent, f"tmp-{suffix}"), confined(final.parent, f"old-{suffix}")
    path = tmp
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        info["files"] = {}
        for split, docs in splits.items():
            path = tmp / f"{split}.bin"
            lengths, info["files"][path.name] = _write_tokens(path, docs, tokenizer, dtype)
            for doc, n in zip(docs, lengths):
                stats[doc.domain][f"{split}_docs"] += 1
                stats[doc.domain][f"{split}_tokens"] += n
        info["tokens"] = {split: sum(v[f"{split}_tokens"] for v in stats.values()) for split in splits}
        path = tmp / "meta.json"
        with open(path, "w") as f:
            f.write(json.dumps({**info, "check": _json_check(info)}, indent=1))
            f.flush()
            os.fsync(f.fileno())
        if final.exists() and _adopt(final)[0] is None:  # unusable: replaced (a usable one is another
            with suppress(FileNotFoundError):             # process's identical build, kept below)
                os.rename(final, old)
        with suppress(OSError):  # a usable folder there: another process finished the same key first
            os.rename(tmp, final)
    except OSError as e:
        raise OSError(e.errno, f"writing the token cache failed: {e.strerror or e}", str(e.filename or path)) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return info


_VERIFIED = set()  # (path, inode, size, mtime) of the files whose SHA-256 this process has checked


def verify_once(path, expected: dict, what="file"):
    """`verify`, with the SHA-256 read once per process and file: the length is checked on every
    call, the digest again only when the file was replaced or touched since."""
    st = os.stat(path)
    seen = (os.path.abspath(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if seen in _VERIFIED and st.st_size == expected["bytes"]:
        return
    verify(path, expected, what)
    _VERIFIED.add(seen)


def load_tokens(info: dict, split="train") -> np.ndarray:
    """The split's tokens as a read-only memory map (an empty split, which np.memmap cannot map, as an
    empty array), checked first against what `prepare` recorded: CorruptFile names a changed file."""
    dtype = np.dtype(info["dtype"])
    path = info[split]
    verify_once(path, info["files"][os.path.basename(path)], "token file")
    return np.memmap(path, dtype=dtype, mode="r") if os.path.getsize(path) else np.zeros(0, dtype)


# -----------------------------------------------------------------------------------------------
# Batches

class BatchSampler:
    """Training batches that are a pure function of (seed, step).

    Each epoch cuts the token stream into non-overlapping windows of seq_len + 1 tokens at a
    random shift and visits them in a seeded random order, so every token is used once per epoch
    and only the step counter is saved (`state_dict`): a resumed run sees exactly the batches it
    would have seen. `next()` returns (x, y), int64 (B, T), y = x shifted left by one token.

    DDP: `batch_size` is the GLOBAL batch; rank r of world_size gets the rows [r * b, (r + 1) * b),
    b = batch_size // world_size, so the union over ranks is the single-process batch. For
    evaluation, a fresh sampler over the val tokens with a fixed seed: the same batches every eval.
    """

    def __init__(self, tokens, batch_size, seq_len, seed=0, rank=0, world_size=1):
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by world_size {world_size}")
        if len(tokens) < seq_len + 1:
            raise ValueError(f"need at least seq_len + 1 = {seq_len + 1} tokens, got {len(tokens)}")
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        usable = len(tokens) - 1  # the last token is only ever a target
        self.windows = usable // seq_len  # windows per epoch
        if self.windows >= 2:
            self.windows -= 1  # leave up to a window of slack for the per-epoch shift
        self.max_shift = min(seq_len - 1, usable - self.windows * seq_len)
        self.step = 0
        self._plan = None  # (epoch, shift, window order) of the epoch last used

    def _epoch_plan(self, epoch):
        if self._plan is None or self._plan[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._plan = (epoch, int(rng.integers(0, self.max_shift + 1)), rng.permutation(self.windows))
        return self._plan

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.batch_size // self.world_size
        first = self.step * self.batch_size + self.rank * b  # global index of this rank's first row
        rows = []
        for i in range(first, first + b):
            _, shift, order = self._epoch_plan(i // self.windows)
            start = shift + int(order[i % self.windows]) * self.seq_len
            rows.append(self.tokens[start:start + self.seq_len + 1])
        self.step += 1
        rows = torch.from_numpy(np.stack(rows).astype(np.int64))  # (B, T + 1)
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def state_dict(self) -> dict:
        return dict(seed=self.seed, step=self.step, batch_size=self.batch_size,
                    seq_len=self.seq_len, n_tokens=len(self.tokens))

    def load_state_dict(self, state: dict):
        for name in ("seed", "batch_size", "seq_len", "n_tokens"):
            mine = self.state_dict()[name]
            if state[name] != mine:
                raise ValueError(f"sampler state has {name}={state[name]}, this sampler has {mine}")
        self.step = state["step"]


def unigram_entropy(tokens, chunk=1 << 24) -> float:
    """Entropy of the token frequencies in nats/token: the cross-entropy of the best model that
    ignores context, i.e. the loss a trained model's val loss must beat."""
    counts = np.zeros(0, np.int64)
    for i in range(0, len(tokens), chunk):
        c = np.bincount(np.asarray(tokens[i:i + chunk]))
        if len(c) > len(counts):
            counts = np.pad(counts, (0, len(c) - len(counts)))
        counts[:len(c)] += c
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# -----------------------------------------------------------------------------------------------
# Shared by data.py and train.py: argparse numbers, atomic writes, verified reads, confined paths

def number(cast, low, high=None, *, above=False):
    """An argparse type: cast(text), finite, >= low (> low when `above`) and <= high when given;
    anything else is argparse's one-line error naming the option."""
    wanted = f"{'an integer' if cast is int else 'a finite number'} " + \
        (f"in [{low}, {high}]" if high is not None else f"{'>' if above else '>='} {low}")

    def parse(text):
        try:
            value = cast(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (value > low if above else value >= low) and (high is None or value <= high)):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}")
        return value
    return parse


def write_atomically(path, write, mode="w"):
    """Replace `path` with what write(file) writes, in one step (a new temporary file beside it,
    fsync, rename, fsync of the folder): a reader or a kill at any moment sees the old file or the
    new one, never half of one; a failure leaves no temporary file and an OSError naming `path`.
    Returns the new file's `digest`, for the caller to record where a later read can check it."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        signature = digest(tmp)
        os.replace(tmp, path)
    except OSError as e:
        if e.filename is None:  # a full disk says ENOSPC and nothing more: name the file
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise
    finally:
        with suppress(FileNotFoundError):
            os.remove(tmp)
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return signature


def digest(path, chunk=1 << 22) -> dict:
    """{"bytes": length, "sha256": hex} of a file: what a writer records and a reader checks."""
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            n += len(block)
    return {"bytes": n, "sha256": h.hexdigest()}


class CorruptFile(ValueError):
    """A file that does not match the digest recorded when it was written (its message names it)."""


def verify(path, expected: dict, what="file"):
    """Raise CorruptFile naming `path` unless its length and SHA-256 are `expected` (a `digest`).
    The length is checked first, so a cut file is named without reading it."""
    size = os.path.getsize(path)
    if size != expected["bytes"]:
        raise CorruptFile(f"{what} {path} is {size} bytes, but {expected['bytes']} were written: it was cut "
                          f"short or changed after it was written")
    if digest(path)["sha256"] != expected["sha256"]:
        raise CorruptFile(f"{what} {path} fails its SHA-256 check: its bytes changed after it was written")


def confined(root, name) -> Path:
    """root/name, where `name` is a plain relative path that stays inside `root`: no absolute path,
    no "..", no symlink on the way that leads out. Everything a program deletes, moves or overwrites
    goes through this, so it can never touch a file outside its own folder."""
    rel = Path(name)
    if rel.is_absolute() or not rel.parts or ".." in rel.parts:
        raise ValueError(f"{name!r} is not a plain path inside {root}")
    root = Path(root)
    path = root / rel
    real_root = os.path.realpath(root)
    real = os.path.realpath(path.parent) if path.is_symlink() else os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root:
        raise ValueError(f"{path} leads outside {root} (through a symlink)")
    return path


if __name__ == "__main__":  # `python data.py stats|rephrase ...`
    cli = _companion("data_rephrase", "data.py's command line", SystemExit)
    cli.exit_now(cli.main())
