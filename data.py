"""Kimi-K2 data: an offline corpus, a byte tokenizer, exact resumable batches, and K2's rephrasing.

Kimi K2 (tech report, SPEC section 6) pre-trains on web text, code, mathematics and knowledge and
raises the *token utility* of scarce high-quality text by rephrasing it with another LLM: prompts of
diverse styles and perspectives, long documents rewritten chunk by chunk with each chunk conditioned
on what was already rewritten, every chunk checked for fidelity to its source, maths rewritten as
"learning notes" and non-English maths translated. This file is the data side of the reference
implementation:

- A default corpus that every Python installation already carries, so `python train.py` works
  offline: code (standard-library sources), knowledge (pydoc topics and API docstrings) and
  mathematics (generated problems with worked step-by-step solutions, reproducible from a seed).
  User corpora: files or folders of .txt, .md, .py and .jsonl (field "text"). Per-domain mixture
  weights.
- `ByteTokenizer`: 256 ids, lossless for any Unicode text through UTF-8; `eos` is 0 (see the class).
  Any object with `encode`, `decode`, `vocab_size`, `eos` (the `Tokenizer` protocol) plugs in.
- `prepare`: tokenise once into memory-mapped token files, train/validation split by document,
  cached under a hash of inputs and settings, written atomically.
- `BatchSampler`: batches that are a pure function of (seed, step), so a resumed run sees exactly
  the batches it would have seen; the global batch does not depend on the number of DDP processes.
- `unigram_entropy`: the loss of a model that ignores context, the baseline val loss must beat.
- `rephrase_chunkwise` with `STYLES`, `fidelity`, and three generation backends: `ChatEndpoint`
  (any OpenAI-compatible server, standard library only), `CheckpointGenerator` (a trained kimik2
  checkpoint) or any Python callable `generate(messages) -> str`.

Run:
    python data.py stats [--data [DOMAIN=]PATH ...] [--cache-dir data_cache]
    python data.py rephrase INPUT... --endpoint http://localhost:8000/v1 --model NAME \
        --styles 2 --out rephrased.jsonl
    python data.py renderings --problems 210 --k 8 --heldout 100 --out runs/rephrase/data
Sources: "builtin" (all three default domains), "builtin:code", "builtin:knowledge", "builtin:math",
or "[DOMAIN=]PATH" for a file or folder (domain "user" when not named).
"""
import argparse
import ast
import hashlib
import http.client
import json
import math
import os
import random
import re
import shutil
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import torch

# -----------------------------------------------------------------------------------------------
# Tokenizer


class Tokenizer(Protocol):
    """What `prepare`, the samplers and the kimik2 backend need from a tokenizer."""
    vocab_size: int
    eos: int  # id written after every document

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: 256 ids, no training, lossless for any Unicode text.

    eos is 0, the NUL byte. A 256-entry vocabulary has no free id, and the model's tiny preset has
    vocab_size 256, so rather than growing the vocabulary to 257 we spend the one byte that text
    practically never contains. A NUL inside a document still round-trips exactly; the model merely
    reads it as a document boundary. `decode` replaces invalid UTF-8 (a model can emit any byte
    sequence) with U+FFFD.
    """
    vocab_size = 256
    eos = 0

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


# -----------------------------------------------------------------------------------------------
# Documents: the built-in corpus and user files

STDLIB = Path(sysconfig.get_paths()["stdlib"])
STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "_bundled"}
USER_SUFFIXES = {".txt", ".md", ".py", ".jsonl"}
CODE_BYTES = 2_000_000       # standard-library source used as the code domain (of about 12 MB)
KNOWLEDGE_BYTES = 2_000_000  # cap on pydoc topics + docstrings (about 2 MB are available)
MATH_PROBLEMS = 6_000        # generated worked problems, about 1.5 MB before duplicates are dropped
MAX_PROBLEMS_LISTED = 20     # bad lines named in the report; all of them are counted


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
    split_documents: int = 0      # longer than max_doc_chars: cut at paragraph/sentence boundaries
    duplicate_documents: int = 0  # exact repeats dropped, so no text is both train and val
    problems: list = field(default_factory=list)

    def problem(self, where: str, what: str):
        if len(self.problems) < MAX_PROBLEMS_LISTED:
            self.problems.append(f"{where}: {what}")


def _stdlib_files(seed: int) -> list[Path]:
    """The standard library's own .py files (no tests, no installed packages), in a seeded order."""
    paths = []
    for root, dirs, files in os.walk(STDLIB):
        dirs[:] = sorted(d for d in dirs if d not in STDLIB_SKIP)
        paths += [Path(root, f) for f in sorted(files) if f.endswith(".py")]
    random.Random(seed).shuffle(paths)
    return paths


def _docstring_document(path: Path, source: str) -> str | None:
    """pydoc-like text from one module: its docstring, then every public class and function's
    signature and docstring. Parsed with `ast`, never imported (importing runs code)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    module = ".".join(path.relative_to(STDLIB).with_suffix("").parts).removesuffix(".__init__")
    parts = [ast.get_docstring(tree) or ""]

    def visit(node, prefix):
        for child in node.body:
            if not isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if child.name.startswith("_"):
                continue
            doc = ast.get_docstring(child)
            signature = "" if isinstance(child, ast.ClassDef) else f"({ast.unparse(child.args)})"
            if doc:
                parts.append(f"{prefix}{child.name}{signature}\n    " + doc.replace("\n", "\n    "))
            if isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")

    visit(tree, "")
    if not any(parts):
        return None
    return "\n\n".join([f"Help on module {module}:"] + [p for p in parts if p])


def stdlib_documents(seed=0, code_bytes=CODE_BYTES, knowledge_bytes=KNOWLEDGE_BYTES):
    """The code and knowledge domains, from disjoint sets of standard-library files so that no
    docstring is both a code document and a knowledge document. Returns (code, knowledge)."""
    from pydoc_data.topics import topics
    code, knowledge = [], []
    used_code = 0
    used_knowledge = 0
    for key in sorted(topics):
        if used_knowledge < knowledge_bytes:
            knowledge.append(Document("knowledge", f"pydoc:{key}", topics[key]))
            used_knowledge += len(topics[key])
    for path in _stdlib_files(seed):
        if used_code >= code_bytes and used_knowledge >= knowledge_bytes:
            break
        source = path.read_text(encoding="utf-8", errors="replace")
        if used_code < code_bytes:
            code.append(Document("code", str(path.relative_to(STDLIB)), source))
            used_code += len(source)
        elif (doc := _docstring_document(path, source)) is not None:
            knowledge.append(Document("knowledge", f"docstrings:{path.relative_to(STDLIB)}", doc))
            used_knowledge += len(doc)
    return code, knowledge


# Mathematics: each generator returns (problem, steps, answer) from a random.Random; a problem's
# text depends only on (seed, index), so the corpus is reproducible and grows without reshuffling.

def _linear(terms) -> str:
    """Render [(3, "x"), (-1, "y"), (5, "")] as '3x - y + 5'; zero terms are dropped."""
    out = ""
    for coef, var in terms:
        if coef == 0:
            continue
        body = f"{'' if abs(coef) == 1 and var else abs(coef)}{var}"
        out = (("-" if coef < 0 else "") + body) if not out else f"{out} {'-' if coef < 0 else '+'} {body}"
    return out or "0"


def _p(n) -> str:
    """A number as a factor: negative numbers in brackets."""
    return f"({n})" if n < 0 else f"{n}"


def _nonzero(rng, lo, hi, exclude=()):
    return rng.choice([i for i in range(lo, hi + 1) if i != 0 and i not in exclude])


def _order_of_operations(rng):
    a, b, c, d = (rng.randint(2, 20) for _ in range(4))
    form = rng.randrange(4)
    if form == 0:
        return (f"Compute {a} + {b} * {c}.",
                [f"Multiplication comes before addition: {b} * {c} = {b * c}.",
                 f"Then {a} + {b * c} = {a + b * c}."], f"{a + b * c}")
    if form == 1:
        return (f"Compute ({a} + {b}) * {c}.",
                [f"Work inside the brackets first: {a} + {b} = {a + b}.",
                 f"Then {a + b} * {c} = {(a + b) * c}."], f"{(a + b) * c}")
    if form == 2:
        return (f"Compute {a} * {b} - {c} * {d}.",
                [f"Do both multiplications first: {a} * {b} = {a * b} and {c} * {d} = {c * d}.",
                 f"Then {a * b} - {c * d} = {a * b - c * d}."], f"{a * b - c * d}")
    return (f"Compute {a} - {b * c} / {c}.",
            [f"Division comes before subtraction: {b * c} / {c} = {b}.",
             f"Then {a} - {b} = {a - b}."], f"{a - b}")


def _fractions(rng):
    b, d = rng.randint(2, 12), rng.randint(2, 12)
    a, c = rng.randint(1, 2 * b), rng.randint(1, 2 * d)
    op = rng.choice("+-*")
    if op == "*":
        num, den, result = a * c, b * d, Fraction(a, b) * Fraction(c, d)
        steps = [f"Multiply numerators and denominators: ({a} * {c}) / ({b} * {d}) = {num}/{den}."]
    else:
        den = math.lcm(b, d)
        na, nc = a * (den // b), c * (den // d)
        num = na + nc if op == "+" else na - nc
        result = Fraction(a, b) + Fraction(c, d) if op == "+" else Fraction(a, b) - Fraction(c, d)
        steps = [f"The least common denominator of {b} and {d} is {den}.",
                 f"Rewrite both fractions over {den}: {a}/{b} = {na}/{den} and {c}/{d} = {nc}/{den}.",
                 f"{'Add' if op == '+' else 'Subtract'} the numerators: {na} {op} {nc} = {num}, "
                 f"giving {num}/{den}."]
    g = math.gcd(num, den)
    steps.append(f"Divide numerator and denominator by their greatest common divisor {g}: "
                 f"{num}/{den} = {result}." if g > 1 else f"{num}/{den} is already in lowest terms.")
    return f"Compute {a}/{b} {op} {c}/{d} and simplify.", steps, f"{result}"


def _linear_equation(rng):
    x, a, b = rng.randint(-12, 12), _nonzero(rng, -9, 9, exclude=(1,)), _nonzero(rng, -30, 30)
    c = a * x + b
    move = f"Subtract {b} from" if b > 0 else f"Add {-b} to"
    return (f"Solve {_linear([(a, 'x'), (b, '')])} = {c} for x.",
            [f"{move} both sides: {_linear([(a, 'x')])} = {c - b}.",
             f"Divide both sides by {a}: x = {c - b} / {_p(a)} = {x}.",
             f"Check: {a} * {_p(x)} + {_p(b)} = {a * x} + {_p(b)} = {c}, as required."], f"x = {x}")


def _linear_system(rng):
    x, y = rng.randint(-9, 9), rng.randint(-9, 9)
    b1, a2 = _nonzero(rng, -5, 5), _nonzero(rng, -5, 5)
    b2 = rng.choice([v for v in range(-5, 6) if v != a2 * b1])  # keeps the system solvable
    c1, c2 = x + b1 * y, a2 * x + b2 * y
    k, rhs = b2 - a2 * b1, c2 - a2 * c1
    substituted = f"{a2} * ({_linear([(c1, ''), (-b1, 'y')])})"
    if b2:
        substituted += f" {'+' if b2 > 0 else '-'} {_linear([(abs(b2), 'y')])}"
    return (f"Solve the system {_linear([(1, 'x'), (b1, 'y')])} = {c1} and "
            f"{_linear([(a2, 'x'), (b2, 'y')])} = {c2}.",
            [f"From the first equation, x = {_linear([(c1, ''), (-b1, 'y')])}.",
             f"Substitute into the second: {substituted} = {c2}.",
             f"Expand and collect the y terms: {k}y = {c2} - {_p(a2 * c1)} = {rhs}.",
             f"So y = {rhs} / {_p(k)} = {y}.",
             f"Then x = {c1} - {_p(b1)} * {_p(y)} = {x}.",
             f"Check: {a2} * {_p(x)} + {_p(b2)} * {_p(y)} = {c2}, as required."], f"x = {x}, y = {y}")


def _quadratic(rng):
    r, s = sorted((rng.randint(-15, 15), rng.randint(-15, 15)))
    a, b, c = rng.choice((1, 1, 2, 3, 4, 5)), -(r + s), r * s
    roots = f"x = {r} or x = {s}" if r != s else f"x = {r}"
    monic = _linear([(1, 'x^2'), (b, 'x'), (c, '')])
    return (f"Solve {_linear([(a, 'x^2'), (a * b, 'x'), (a * c, '')])} = 0.",
            ([f"Divide both sides by {a}: {monic} = 0."] if a > 1 else []) +
            [f"Look for two numbers whose product is {c} and whose sum is {b}: {-r} and {-s}.",
             f"So the equation factors as ({_linear([(1, 'x'), (-r, '')])})"
             f"({_linear([(1, 'x'), (-s, '')])}) = 0.",
             f"A product is zero only when one of its factors is zero, so {roots}."], roots)


def _percentages(rng):
    p, n = rng.randrange(5, 100, 5), 20 * rng.randint(2, 60)
    part = p * n // 100  # exact: p is a multiple of 5 and n of 20
    form = rng.randrange(3)
    if form == 0:
        return (f"What is {p}% of {n}?",
                [f"{p}% means {p}/100 = {p / 100:g}.", f"{p / 100:g} * {n} = {part}."], f"{part}")
    if form == 1:
        up = rng.random() < 0.5
        new = n + part if up else n - part
        return (f"A jacket costs ${n}. Its price {'rises' if up else 'falls'} by {p}%. "
                "What is the new price?",
                [f"{p}% of {n} is {p}/100 * {n} = {part}.",
                 f"The new price is {n} {'+' if up else '-'} {part} = {new}."], f"${new}")
    return (f"{part} is what percent of {n}?",
            [f"Divide the part by the whole: {part} / {n} = {part / n:g}.",
             f"Multiply by 100 to get a percentage: {part / n:g} * 100 = {p}%."], f"{p}%")


def _gcd_lcm(rng):
    g = rng.randint(2, 15)
    a, b = sorted((g * rng.randint(2, 20), g * rng.randint(21, 40)), reverse=True)
    steps, x, y = ["Use Euclid's algorithm: divide, then divide the divisor by the remainder."], a, b
    while y:
        q, r = divmod(x, y)
        steps.append(f"{x} = {q} * {y} + {r}.")
        x, y = y, r
    steps += [f"The last nonzero remainder is {x}, so gcd({a}, {b}) = {x}.",
              f"lcm({a}, {b}) = {a} * {b} / {x} = {a * b // x}."]
    return (f"Find the greatest common divisor and the least common multiple of {a} and {b}.",
            steps, f"gcd = {x}, lcm = {a * b // x}")


def _speed_and_mean(rng):
    if rng.random() < 0.5:
        who, slowest, fastest = rng.choice((("A cyclist", 8, 30), ("A car", 40, 130), ("A train", 60, 300)))
        v, t = rng.randint(slowest, fastest), rng.randint(2, 12)
        return (f"{who} covers {v * t} km in {t} hours at a constant speed. What is the speed?",
                ["Speed is distance divided by time.", f"{v * t} / {t} = {v}."], f"{v} km/h")
    values = [rng.randint(1, 99) for _ in range(rng.choice((4, 5)))]
    total = sum(values)
    return (f"Find the mean of {', '.join(map(str, values))}.",
            [f"Add the values: {' + '.join(map(str, values))} = {total}.",
             f"Divide by how many there are: {total} / {len(values)} = {total / len(values):g}."],
            f"{total / len(values):g}")


MATH_KINDS = [_order_of_operations, _fractions, _linear_equation, _linear_system, _quadratic,
              _percentages, _gcd_lcm, _speed_and_mean]


def math_documents(n=MATH_PROBLEMS, seed=0) -> list[Document]:
    """n worked problems; problem i depends only on (seed, i)."""
    docs = []
    for i in range(n):
        rng = random.Random(f"{seed}:{i}")
        problem, steps, answer = rng.choice(MATH_KINDS)(rng)
        lines = [f"Problem: {problem}", "", "Solution:"]
        lines += [s if s.startswith("Check:") else f"Step {k}: {s}" for k, s in enumerate(steps, 1)]
        docs.append(Document("math", f"math#{i}", "\n".join(lines + ["", f"Answer: {answer}"])))
    return docs


# Renderings: one maths problem in several surface forms, for the experiment "rephrasing against
# repetition" (K2 report sec. 2.2). A word problem is a set of givens, a question and its working;
# a rendering chooses the names, the order of the givens, one of three wordings and a layout (the
# worked form of `math_documents`, question-answer, answer first, or a learning note). These are
# template rewrites, not LLM rephrasings: `data.py rephrase --style learning_note` writes the LLM
# version of the same corpus with a served model.

NAMES = ("Ada", "Ben", "Chen", "Dara", "Emil", "Fatima", "Goran", "Hana", "Ines", "Jonas", "Kofi",
         "Lena", "Mateo", "Noor", "Olga", "Priya")
TRAIN_NAMES, HELDOUT_NAMES = NAMES[:12], NAMES[12:]  # held-out renderings use names training never sees
TRAIN_WORDINGS, HELDOUT_WORDING = (0, 1), 2          # likewise the third wording
LAYOUTS = ("worked", "qa", "answer_first", "note")


def _shopping(rng):
    n, price, item = rng.randint(2, 9), rng.randint(2, 19), rng.choice(("notebook", "pencil", "ticket", "mango"))
    cost = n * price
    paid = next(v for v in (20, 50, 100, 200) if v >= cost)
    return dict(key=("shopping", *sorted((n, price))), answer=f"${paid - cost}",
                givens=[(f"{{a}} buys {n} {item}s at ${price} each.",
                         f"Each {item} costs ${price}, and {{a}} takes {n} of them.",
                         f"{n} {item}s at ${price} apiece go into {{a}}'s basket."),
                        (f"{{a}} pays with a ${paid} note.", f"{{a}} hands over ${paid}.",
                         f"The cashier is given ${paid}.")],
                question=("How much change does {a} get?", "What change should {a} receive?",
                          "Find the change."),
                steps=[f"The {item}s cost {n} * {price} = ${cost}.",
                       f"The change is {paid} - {cost} = ${paid - cost}."],
                idea="the total cost is the count times the unit price; the change is the payment minus it")


def _journey(rng):
    (v1, t1), (v2, t2) = ((5 * rng.randint(4, 24), rng.randint(1, 5)) for _ in range(2))
    legs = [(f"{{a}} drives for {t} hours at {v} km/h.", f"For {t} hours, {{a}} keeps a speed of {v} km/h.",
             f"At {v} km/h, {{a}} is on the road for {t} hours.") for v, t in ((v1, t1), (v2, t2))]
    return dict(key=("journey", *sorted(((v1, t1), (v2, t2)))), answer=f"{v1 * t1 + v2 * t2} km", givens=legs,
                question=("How far does {a} drive in total?", "What total distance does {a} cover?",
                          "Find the total distance."),
                steps=[f"At {v1} km/h for {t1} hours: {v1} * {t1} = {v1 * t1} km.",
                       f"At {v2} km/h for {t2} hours: {v2} * {t2} = {v2 * t2} km.",
                       f"In total {v1 * t1} + {v2 * t2} = {v1 * t1 + v2 * t2} km."],
                idea="distance is speed times time, and the distances of the parts add up")


def _ages(rng):
    young, gap = rng.randint(5, 40), rng.randint(1, 20)
    total = 2 * young + gap
    return dict(key=("ages", young, gap), answer=f"{young}",
                givens=[(f"{{a}} is {gap} years older than {{b}}.", f"{{b}} is {gap} years younger than {{a}}.",
                         f"Between {{a}} and {{b}} there are {gap} years, {{a}} being the elder."),
                        (f"{{a}} and {{b}} are {total} years old together.",
                         f"The ages of {{a}} and {{b}} add up to {total}.",
                         f"Adding the ages of {{b}} and {{a}} gives {total}.")],
                question=("How old is {b}?", "What is the age of {b}?", "Find the younger one's age."),
                steps=[f"Twice {{b}}'s age is {total} - {gap} = {2 * young}.",
                       f"So {{b}} is {2 * young} / 2 = {young} years old."],
                idea="remove the gap from the sum and what is left is twice the younger age")


def _scores(rng):
    scores = [rng.randint(40, 100) for _ in range(rng.choice((3, 4)))]
    mean = f"{sum(scores) / len(scores):g}"
    return dict(key=("scores", *sorted(scores)), answer=mean,
                givens=[(f"On test {i} {{a}} scored {s}.", f"{{a}}'s mark in test {i} was {s}.",
                         f"Test {i} gave {{a}} {s} points.") for i, s in enumerate(scores, 1)],
                question=("What is {a}'s mean score?", "What is the average of {a}'s marks?",
                          "Find the mean of the tests."),
                steps=[f"Add the scores: {' + '.join(map(str, scores))} = {sum(scores)}.",
                       f"Divide by the {len(scores)} tests: {sum(scores)} / {len(scores)} = {mean}."],
                idea="the mean is the sum divided by the count")


WORD_PROBLEM_KINDS = [_shopping, _journey, _ages, _scores]


def render(problem: dict, names, wording: int, order, layout: str) -> str:
    """One surface form of `problem`: names (a, b), its givens in `order` in wording 0-2, a layout."""
    a, b = names
    givens = [problem["givens"][g][wording].format(a=a, b=b) for g in order]
    question = problem["question"][wording].format(a=a, b=b)
    steps = [s.format(a=a, b=b) for s in problem["steps"]]
    statement, answer = " ".join(givens + [question]), problem["answer"]
    if layout == "worked":  # the layout of math_documents
        return "\n".join([f"Problem: {statement}", "", "Solution:"] +
                         [f"Step {k}: {s}" for k, s in enumerate(steps, 1)] + ["", f"Answer: {answer}"])
    if layout == "qa":
        return f"Q: {statement}\nA: {' '.join(steps)} So the answer is {answer}."
    if layout == "answer_first":
        return f"The answer is {answer}.\nThe question: {statement}\nWhy: {' '.join(steps)}"
    return "\n".join(["Learning note", "Given:"] + [f"- {g}" for g in givens] +
                     [f"Asked: {question}", f"Key idea: {problem['idea']}.", "Working:"] +
                     [f"- {s}" for s in steps] + [f"Result: {answer}"])


def word_problems(n: int, seed=0, start=0, exclude=()) -> list[dict]:
    """n distinct word problems from index `start` on, problem i depending only on (seed, i);
    problems whose key is in `exclude`, or repeats an earlier one, are skipped. The key is the
    kind and its numbers up to order (5 items at $3 and 3 at $5 are one problem, as are two
    journeys with the same legs).
    Each carries its original names and its index."""
    problems, seen, i = [], set(exclude), start
    while len(problems) < n:
        rng = random.Random(f"words:{seed}:{i}")
        problem = rng.choice(WORD_PROBLEM_KINDS)(rng)
        if problem["key"] not in seen:
            seen.add(problem["key"])
            problems.append({**problem, "names": tuple(rng.sample(TRAIN_NAMES, 2)), "index": i})
        i += 1
    return problems


def renderings(problem: dict, k: int, heldout=False) -> list[str]:
    """k distinct renderings of `problem`. Training side: the original (its names, the givens in
    order, wording 0, worked layout) first, then random names, orders, wordings 0-1 and layouts.
    Held-out side: names and the wording that no training rendering uses, any order and layout."""
    rng = random.Random(f"render:{problem['key']}:{heldout}")
    n = len(problem["givens"])
    texts = [] if heldout else [render(problem, problem["names"], 0, range(n), "worked")]
    for _ in range(100 * k):  # every kind has far more than k forms; the bound only stops a bad k
        if len(texts) == k:
            return texts
        names = rng.sample(HELDOUT_NAMES if heldout else TRAIN_NAMES, 2)
        wording = HELDOUT_WORDING if heldout else rng.choice(TRAIN_WORDINGS)
        text = render(problem, names, wording, rng.sample(range(n), n), rng.choice(LAYOUTS))
        if text not in texts:
            texts.append(text)
    raise ValueError(f"k={k}: problem {problem['key']} has fewer distinct renderings")


def rendering_corpora(problems: int, k: int, heldout: int, seed=0, heldout_renderings=2) -> dict:
    """The text sets of the experiment: "original" (each training problem in its original form,
    once), "renderings" (k distinct renderings of each, the original among them), "heldout" (other
    problems, never one of the training ones, each in heldout_renderings unseen renderings) and
    "heldout_original" (the same held-out problems in their original form)."""
    train = word_problems(problems, seed)
    test = word_problems(heldout, seed, start=problems, exclude={p["key"] for p in train})
    return {"original": [renderings(p, 1)[0] for p in train],
            "renderings": [text for p in train for text in renderings(p, k)],
            "heldout": [text for p in test for text in renderings(p, heldout_renderings, heldout=True)],
            "heldout_original": [renderings(p, 1)[0] for p in test]}


def run_renderings(args) -> int:
    """Write the sets of `rendering_corpora` as NAME.jsonl (field "text") into args.out."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, texts in rendering_corpora(args.problems, args.k, args.heldout, args.seed).items():
        path, tmp = out / f"{name}.jsonl", out / f".{name}.jsonl.tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tokens = sum(len(t.encode()) + 1 for t in texts)  # byte tokens plus one eos per document
        print(f"{path}: {len(texts):,} documents, {tokens:,} byte tokens")
    return 0


def _decode(data: bytes, where: str, report: LoadReport) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        report.non_utf8_files += 1
        report.problem(where, f"not UTF-8 ({e.reason} at byte {e.start}); bad bytes replaced")
        return data.decode("utf-8", errors="replace")


def _file_documents(path: Path, domain: str, report: LoadReport):
    report.files += 1
    if path.suffix != ".jsonl":
        yield Document(domain, str(path), _decode(path.read_bytes(), str(path), report))
        return
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):  # a huge line is read whole: one record, one document
            where = f"{path}:{lineno}"
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
                report.bad_json_lines += 1
                report.problem(where, f"bad JSON line skipped ({type(e).__name__}: {str(e)[:80]})")
                continue
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                report.bad_json_lines += 1
                report.problem(where, 'line skipped: not an object with a string field "text"')
                continue
            yield Document(domain, where, record["text"])


def _source_files(spec: str) -> tuple[str, list[Path]]:
    """'[DOMAIN=]PATH' -> (domain, files). Folders contribute their .txt/.md/.py/.jsonl files; a
    file named explicitly is read whatever its suffix."""
    domain, _, path = spec.rpartition("=") if not Path(spec).exists() else ("", "", spec)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data source {spec!r}: no such file or folder")
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix in USER_SUFFIXES)
    return domain or "user", files


def load_documents(sources=("builtin",), seed=0, max_doc_chars=1_000_000, report=None):
    """Every document of `sources` (see the module docstring), non-empty, at most max_doc_chars
    long (longer ones are cut at paragraph or sentence boundaries into several documents)."""
    report = report if report is not None else LoadReport()
    docs = []
    for spec in map(str, sources):
        if spec.startswith("builtin"):
            domains = (spec.partition(":")[2] or "code,knowledge,math").split(",")
            if unknown := set(domains) - {"code", "knowledge", "math"}:
                raise ValueError(f"unknown built-in domain(s) {sorted(unknown)} in source {spec!r}")
            if "code" in domains or "knowledge" in domains:
                code, knowledge = stdlib_documents(seed)
                docs += (code if "code" in domains else []) + (knowledge if "knowledge" in domains else [])
            if "math" in domains:
                docs += math_documents(seed=seed)
            continue
        domain, files = _source_files(spec)
        for path in files:
            docs += _file_documents(path, domain, report)
    kept = []
    for doc in docs:
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

def split_by_document(docs, val_fraction, seed):
    """Per domain, the documents whose seeded hash ranks lowest go to validation:
    round(val_fraction * n) of them, at least one if the domain has two or more documents and
    val_fraction > 0, never all of them. Hash ranking keeps a document's side stable when others
    are added or removed."""
    by_domain = {}
    for doc in docs:
        by_domain.setdefault(doc.domain, []).append(doc)
    train, val = [], []
    for domain in sorted(by_domain):
        ranked = sorted(by_domain[domain], key=lambda d: hashlib.sha1(f"{seed}\0{d.text}".encode()).digest())
        n = len(ranked)
        n_val = min(n - 1, max(round(val_fraction * n), 1 if val_fraction > 0 and n >= 2 else 0))
        val += ranked[:n_val]
        train += ranked[n_val:]
    return train, val


def mix_domains(train, weights, seed):
    """Resample training documents so that domain d holds weights[d] / sum(weights) of the training
    text (UTF-8 bytes, total unchanged): whole documents in a seeded order, cycled when a domain is
    up-weighted past its size (extra epochs, as K2 does with its rephrased knowledge), cut short when
    it is down-weighted. Weight 0 drops a domain from training."""
    by_domain = {}
    for doc in train:
        by_domain.setdefault(doc.domain, []).append(doc)
    if missing := sorted(set(by_domain) - set(weights)):
        raise ValueError(f"weights has no entry for domain(s) {missing}; got {sorted(weights)}")
    total = sum(len(d.text.encode()) for d in train)
    norm = sum(weights[d] for d in by_domain)
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


def _tokenizer_fingerprint(tokenizer) -> str:
    """Class, vocabulary, eos and the encoding of a probe text: catches most tokenizer changes."""
    probe = "Kimi K2: ∑ x² = 42 \u00e9\u4e2d\U0001f600 def f(x):\n\treturn x"
    return f"{type(tokenizer).__qualname__}|{tokenizer.vocab_size}|{tokenizer.eos}|{tokenizer.encode(probe)}"


def _cache_key(sources, tokenizer, settings) -> str:
    """Hash of everything the token files depend on. User files enter by (path, size, mtime) like
    make; the built-in corpus by the Python version; this file by its bytes, so any edit of the
    generators or the split rebuilds."""
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(json.dumps([settings, _tokenizer_fingerprint(tokenizer), sys.version, str(STDLIB)]).encode())
    for spec in map(str, sources):
        h.update(spec.encode())
        if not spec.startswith("builtin"):
            for path in _source_files(spec)[1]:
                st = path.stat()
                h.update(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _token_dtype(vocab_size: int):
    return np.uint8 if vocab_size <= 1 << 8 else np.uint16 if vocab_size <= 1 << 16 else np.uint32


def _resolve(info: dict, directory: Path) -> dict:
    return {**info, "dir": str(directory), "train": str(directory / "train.bin"),
            "val": str(directory / "val.bin")}


def prepare(out_dir="data_cache", sources=None, tokenizer=None, val_fraction=0.05, weights=None,
            seed=0, max_doc_chars=1_000_000) -> dict:
    """Tokenise `sources` once into out_dir/<key>/{train,val}.bin and return their description.

    Every document is followed by tokenizer.eos. The split is by document (`split_by_document`), so
    no validation text is ever in the training file; `weights` (domain -> weight) resamples the
    training documents (`mix_domains`); validation keeps every domain at its natural size. The files
    are cached under a hash of the inputs and settings and rebuilt only when one of them changes.
    They are built in a temporary folder and renamed into place, so a killed or concurrent
    `prepare` (one per DDP rank) never leaves or reads half a file.

    Returns a JSON-able dict: "train"/"val" paths, "dtype", "vocab_size", "eos", "tokens" per
    split, "stats" per domain (docs, bytes, tokens per split; "epochs" = training copies per
    document), "report" (`LoadReport`), "key", "cached". Open the files with `load_tokens`.
    """
    tokenizer = tokenizer or ByteTokenizer()
    sources = [str(s) for s in (sources or ["builtin"])]
    settings = dict(val_fraction=val_fraction, weights=weights, seed=seed, max_doc_chars=max_doc_chars)
    key = _cache_key(sources, tokenizer, settings)
    final = Path(out_dir) / key
    if (final / "meta.json").exists():
        return {**_resolve(json.loads((final / "meta.json").read_text()), final), "cached": True}

    report = LoadReport()
    docs, seen = [], set()
    for doc in load_documents(sources, seed, max_doc_chars, report):
        digest = hashlib.sha1(doc.text.encode()).digest()
        if digest in seen:
            report.duplicate_documents += 1
        else:
            seen.add(digest)
            docs.append(doc)
    train, val = split_by_document(docs, val_fraction, seed)
    natural = {}  # training bytes per domain before mixing, for the "epochs" statistic
    for doc in train:
        natural[doc.domain] = natural.get(doc.domain, 0) + len(doc.text.encode())
    if weights is not None:
        train = mix_domains(train, weights, seed)
    random.Random(seed).shuffle(train)  # neighbouring documents in a window come from any domain

    dtype = _token_dtype(tokenizer.vocab_size)
    stats = {d.domain: dict(bytes=0, train_docs=0, train_tokens=0, val_docs=0, val_tokens=0, epochs=0.0)
             for d in docs}
    for doc in docs:
        stats[doc.domain]["bytes"] += len(doc.text.encode())
    for doc in train:
        stats[doc.domain]["epochs"] += len(doc.text.encode()) / natural[doc.domain]
    tmp = Path(out_dir) / f"tmp-{key}-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    for split, split_docs in (("train", train), ("val", val)):
        with open(tmp / f"{split}.bin", "wb") as f:
            for doc in split_docs:
                ids = np.asarray(tokenizer.encode(doc.text) + [tokenizer.eos], dtype=dtype)
                f.write(ids.tobytes())
                stats[doc.domain][f"{split}_docs"] += 1
                stats[doc.domain][f"{split}_tokens"] += len(ids)
    for s in stats.values():
        s["epochs"] = round(s["epochs"], 3)
    info = dict(key=key, dtype=np.dtype(dtype).name, vocab_size=tokenizer.vocab_size,
                eos=tokenizer.eos, sources=sources, settings=settings,
                tokens={s: sum(v[f"{s}_tokens"] for v in stats.values()) for s in ("train", "val")},
                stats=stats, report=asdict(report))
    (tmp / "meta.json").write_text(json.dumps(info, indent=1))
    try:
        os.rename(tmp, final)
    except OSError:  # another process finished the same key first; its files are identical
        shutil.rmtree(tmp, ignore_errors=True)
    return {**_resolve(info, final), "cached": False}


def load_tokens(info: dict, split="train") -> np.ndarray:
    """The split's tokens as a read-only memory map (an empty array for an empty split, which
    np.memmap cannot map)."""
    dtype = np.dtype(info["dtype"])
    path = info[split]
    return np.memmap(path, dtype=dtype, mode="r") if os.path.getsize(path) else np.zeros(0, dtype)


# -----------------------------------------------------------------------------------------------
# Batches


class BatchSampler:
    """Training batches that are a pure function of (seed, step).

    Each epoch cuts the token stream into non-overlapping windows of seq_len + 1 tokens at a
    random shift and visits them in a seeded random order, so every token is used once per epoch
    and nothing but the step counter needs saving: `state_dict()` goes into the checkpoint and
    `load_state_dict()` makes a resumed run see exactly the batches it would have seen.
    `next()` returns (x, y), int64 tensors of shape (B, T), y = x shifted left by one token.

    DDP: `batch_size` is the GLOBAL batch. Rank r of world_size gets the contiguous rows
    [r * b, (r + 1) * b) with b = batch_size // world_size, so the union over ranks is the
    single-process batch and training does not depend on how many processes run it.
    For evaluation build a fresh sampler over the val tokens with a fixed seed each time: the same
    val batches every eval.
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
# Rephrasing (K2 section "token utility"): chunk-wise autoregressive rewriting with fidelity checks

STYLES = {  # style and perspective instructions; the first six are for any text
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
MIN_SIMILARITY = 0.25  # default drift threshold of the lexical measure, see `fidelity`
STYLE_MIN_SIMILARITY = {"translate_en": 0.0}  # word overlap across languages means nothing


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
    chunks = []
    for piece in filter(None, pieces):
        if chunks and len(chunks[-1]) + len(piece) <= max_chars:
            chunks[-1] += piece
        else:
            chunks.append(piece)
    return chunks


def rephrase_messages(source: str, style: str, context: str = "", feedback: str = "") -> list[dict]:
    """The chat prompt for one chunk: style instruction, the rewrite so far, the chunk, and on a
    retry what was wrong with the previous attempt."""
    user = ""
    if context:
        user += ("The rewrite so far (continue it; do not repeat it):\n"
                 f"<rewritten>\n{context}\n</rewritten>\n\n")
    user += f"Rewrite this next part of the source:\n<source>\n{source}\n</source>"
    if feedback:
        user += f"\n\nYour previous attempt drifted from the source ({feedback}). Stay faithful to it."
    return [{"role": "system", "content": f"You rewrite text for a training corpus. {STYLES[style]} {RULES}"},
            {"role": "user", "content": user}]


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


def _numbers(text: str) -> set[str]:
    return {m.replace(",", "") for m in re.findall(r"\d+(?:[.,]\d+)*", text)}


def fidelity(source: str, rewrite: str, embed: Callable[[str], Sequence[float]] | None = None) -> dict:
    """How faithful a rewritten chunk is to its source.

    similarity: TF-IDF cosine of word 1-2 grams by default, or the cosine of `embed(text)` vectors
    when an embedding function is given. numbers_kept: the share of the source's numbers (digits;
    "1,000" == "1000") found in the rewrite. Limits of the default: it is lexical, so a faithful
    rewrite with many synonyms scores low (hence a low threshold) and a negated or reordered claim
    with the same words scores high; it compares nothing across languages (translate_en checks
    numbers only); a number spelled out in words counts as missing.
    """
    if embed is None:
        similarity = tfidf_cosine(source, rewrite)
    else:
        u, v = np.asarray(embed(source), float), np.asarray(embed(rewrite), float)
        similarity = float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v) or 1.0))
    wanted = _numbers(source)
    missing = sorted(wanted - _numbers(rewrite))
    return dict(similarity=round(similarity, 4), missing_numbers=missing,
                numbers_kept=round(1 - len(missing) / len(wanted), 4) if wanted else 1.0)


@dataclass
class Rephrased:
    text: str
    chunks: list  # per chunk: index, chars, similarity, numbers_kept, missing_numbers, attempts, status


def _tail(text: str, n: int) -> str:
    """The last n characters of text, starting at a word boundary."""
    if len(text) <= n:
        return text
    tail = text[-n:]
    return tail[tail.find(" ") + 1:] if " " in tail else tail


def rephrase_chunkwise(doc: str, style: str, generate: Callable[[list[dict]], str], *,
                       max_chunk_chars=2000, context_chars=3000, min_similarity=None,
                       min_numbers_kept=1.0, retries=2, on_fail="keep", embed=None) -> Rephrased:
    """Rewrite `doc` in `style` chunk by chunk, as K2 rephrases long documents.

    The document is split at paragraph/sentence boundaries into chunks of at most max_chunk_chars
    (`split_chunks`); each chunk is rewritten with the last context_chars of the already rewritten
    text in its prompt, so the rewrite continues coherently; the rewrites are joined in order with
    the source's separators. Every rewrite is checked against its chunk (`fidelity`): below
    min_similarity (default per style) or min_numbers_kept it is retried up to `retries` times,
    with the failure named in the prompt; then on_fail="keep" keeps the source chunk and "drop"
    leaves it out. `generate(messages) -> str` is any backend; its errors propagate.
    """
    if on_fail not in ("keep", "drop"):
        raise ValueError(f"on_fail must be 'keep' or 'drop', got {on_fail!r}")
    threshold = STYLE_MIN_SIMILARITY.get(style, MIN_SIMILARITY) if min_similarity is None else min_similarity
    out, chunks = "", []
    for index, piece in enumerate(split_chunks(doc, max_chunk_chars)):
        source = piece.strip()
        if not source:
            continue
        separator = piece[len(piece.rstrip()):] or " "
        feedback = ""
        for attempt in range(1, retries + 2):
            rewrite = generate(rephrase_messages(source, style, _tail(out, context_chars), feedback)).strip()
            score = fidelity(source, rewrite, embed)
            if score["similarity"] >= threshold and score["numbers_kept"] >= min_numbers_kept and rewrite:
                status = "ok"
                break
            feedback = f"similarity {score['similarity']:.2f}"
            if score["missing_numbers"]:
                feedback += f", missing numbers {', '.join(score['missing_numbers'])}"
        else:
            status = "kept_original" if on_fail == "keep" else "dropped"
            rewrite = source if on_fail == "keep" else ""
        if rewrite:
            out += rewrite + separator
        chunks.append(dict(index=index, chars=len(source), attempts=attempt, status=status, **score))
    return Rephrased(out.strip(), chunks)


# Generation backends: anything with __call__(messages) -> str


class GenerationError(RuntimeError):
    """A backend gave up: the message names the endpoint, the HTTP status or error, and the body."""


class ChatEndpoint:
    """An OpenAI-compatible chat-completions server (vLLM, llama.cpp's server, Ollama, ...) through
    urllib. Retries with exponential backoff (honouring Retry-After) on 429, 5xx, dropped or
    refused connections, timeouts and malformed JSON; any other 4xx fails at once with its status
    and body. `url` is the API base (".../v1") or the full ".../chat/completions" address."""

    def __init__(self, url, model, api_key=None, timeout=120.0, retries=5, backoff=1.0,
                 max_backoff=60.0, temperature=0.7, max_tokens=None):
        self.url = url.rstrip("/")
        if not self.url.endswith("/chat/completions"):
            self.url += "/chat/completions"
        self.model, self.api_key, self.timeout, self.retries = model, api_key, timeout, retries
        self.backoff, self.max_backoff = backoff, max_backoff
        self.temperature, self.max_tokens = temperature, max_tokens

    def __call__(self, messages: list[dict]) -> str:
        body = {"model": self.model, "messages": messages, "temperature": self.temperature}
        if self.max_tokens:
            body["max_tokens"] = self.max_tokens
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, json.dumps(body).encode(), headers, method="POST")
        for attempt in range(self.retries + 1):
            wait = min(self.max_backoff, self.backoff * 2 ** attempt)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    reply = json.loads(response.read())
                content = reply["choices"][0]["message"]["content"]
                if not isinstance(content, str):
                    raise TypeError(f"content is {type(content).__name__}")
                return content
            except urllib.error.HTTPError as e:
                try:
                    text = e.read(500).decode("utf-8", errors="replace")
                except OSError:
                    text = ""
                error = f"HTTP {e.code}: {text}"
                if e.code != 429 and e.code < 500:
                    raise GenerationError(f"{self.url}: {error}") from None
                if (e.headers.get("Retry-After") or "").isdigit():
                    wait = min(self.max_backoff, float(e.headers["Retry-After"]))
            except (OSError, http.client.HTTPException) as e:  # refused, dropped, timed out
                error = f"{type(e).__name__}: {e}"
            except (ValueError, KeyError, IndexError, TypeError) as e:  # not the JSON we expect
                error = f"malformed response ({type(e).__name__}: {e})"
            if attempt == self.retries:
                raise GenerationError(f"{self.url}: gave up after {attempt + 1} attempts; last: {error}")
            time.sleep(wait)


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


def _is_english(text: str) -> bool:
    """Crude script test: most letters ASCII. Non-Latin scripts are caught; French or German pass
    as English (a language identifier would do better and is one more dependency)."""
    letters = [c for c in text[:4000] if c.isalpha()]
    return not letters or sum(c.isascii() for c in letters) >= 0.8 * len(letters)


def styles_for(doc: Document, n: int) -> list[str]:
    """n distinct styles for a document: translate_en first for non-English text, learning_note for
    maths, then general styles in a rotation that starts at a hash of the name, so the styles are
    spread evenly over a corpus and stable across reruns."""
    if n > len(GENERAL_STYLES):
        raise ValueError(f"at most {len(GENERAL_STYLES)} styles per document, asked for {n}")
    special = [] if _is_english(doc.text) else ["translate_en"]
    if doc.domain == "math":
        special.append("learning_note")
    start = int(hashlib.sha1(doc.name.encode()).hexdigest(), 16) % len(GENERAL_STYLES)
    rotation = GENERAL_STYLES[start:] + GENERAL_STYLES[:start]
    return (special + rotation)[:n]


# -----------------------------------------------------------------------------------------------
# Command line


def _completed(out: Path) -> set[tuple[str, str]]:
    """(id, style) of every complete record in `out`. A trailing line without its newline is what a
    kill mid-write leaves; it is cut off, and its pair is redone."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(out, "r+b") as f:
            f.truncate(end)
    done = set()
    for lineno, line in enumerate(data[:end].splitlines(), 1):
        try:
            record = json.loads(line)
            done.add((record["id"], record["style"]))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{out}:{lineno}: not a rephrase record ({e}); fix or move the file") from None
    return done


def _clock(seconds: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(seconds)) if math.isfinite(seconds) else "?"


def run_rephrase(args) -> int:
    if args.checkpoint:
        generate, model = CheckpointGenerator(args.checkpoint), f"kimik2:{args.checkpoint}"
    elif args.endpoint:
        generate = ChatEndpoint(args.endpoint, args.model, api_key=args.api_key, timeout=args.timeout,
                                retries=args.retries, backoff=args.backoff, temperature=args.temperature)
        model = args.model
    else:
        raise SystemExit("rephrase: give --endpoint URL --model NAME, or --checkpoint DIR")
    report = LoadReport()
    docs = load_documents(args.inputs, max_doc_chars=args.max_doc_chars, report=report)
    for problem in report.problems:
        print(f"rephrase: {problem}", file=sys.stderr)
    out = Path(args.out)
    done = _completed(out)
    jobs = [(doc, style) for doc in docs for style in (args.style or styles_for(doc, args.styles))]
    todo = [(doc, style) for doc, style in jobs if (doc.name, style) not in done]
    print(f"rephrase: {len(docs)} documents, {len(jobs)} (document, style) pairs, "
          f"{len(jobs) - len(todo)} already in {out}", file=sys.stderr)
    chars_left = sum(len(doc.text) for doc, _ in todo)
    left_per_doc = {}
    for doc, _ in todo:
        left_per_doc[doc.name] = left_per_doc.get(doc.name, 0) + 1
    start, chars_done, chunks_done = time.time(), 0, 0
    docs_total = len({doc.name for doc, _ in jobs})
    docs_done = docs_total - len(left_per_doc)
    with open(out, "ab") as f:
        for pair, (doc, style) in enumerate(todo, 1):
            try:
                result = rephrase_chunkwise(doc.text, style, generate, max_chunk_chars=args.max_chunk_chars,
                                            retries=args.fidelity_retries, on_fail=args.on_fail)
            except GenerationError as e:
                print(f"rephrase: {doc.name} ({style}): {e}\nrephrase: {pair - 1} new records "
                      f"written to {out}; rerun the same command to resume", file=sys.stderr)
                return 1
            record = dict(id=doc.name, style=style, model=model, text=result.text,
                          similarity_min=min((c["similarity"] for c in result.chunks), default=1.0),
                          numbers_kept_min=min((c["numbers_kept"] for c in result.chunks), default=1.0),
                          chunks=result.chunks)
            f.write(json.dumps(record, ensure_ascii=False).encode() + b"\n")  # one write per record
            f.flush()
            os.fsync(f.fileno())  # on disk before we count it done
            chars_done += len(doc.text)
            chunks_done += len(result.chunks)
            left_per_doc[doc.name] -= 1
            docs_done += left_per_doc[doc.name] == 0
            elapsed = time.time() - start
            eta = (chars_left - chars_done) * elapsed / chars_done if chars_done else float("inf")
            print(f"rephrase: pairs {pair}/{len(todo)}, documents {docs_done}/{docs_total}, "
                  f"chunks {chunks_done} | {chunks_done / max(elapsed, 1e-9):.2f} chunks/s | "
                  f"ETA {_clock(eta)}", file=sys.stderr, flush=True)
    return 0


def run_stats(args) -> int:
    info = prepare(args.cache_dir, args.data, val_fraction=args.val_fraction, seed=args.seed)
    print(f"{'domain':<12}{'docs':>9}{'bytes':>13}{'train tokens':>15}{'val tokens':>13}{'epochs':>8}")
    for domain, s in sorted(info["stats"].items()):
        print(f"{domain:<12}{s['train_docs'] + s['val_docs']:>9,}{s['bytes']:>13,}"
              f"{s['train_tokens']:>15,}{s['val_tokens']:>13,}{s['epochs']:>8}")
    train = load_tokens(info, "train")
    print(f"total: {info['tokens']['train']:,} train + {info['tokens']['val']:,} val tokens "
          f"({info['dtype']}, vocab {info['vocab_size']}, eos {info['eos']}); unigram entropy "
          f"{unigram_entropy(train):.3f} nats/token; cache {info['dir']}"
          f"{' (reused)' if info['cached'] else ''}")
    report = {k: v for k, v in info["report"].items() if k != "problems" and v}
    print("loader:", ", ".join(f"{k} {v}" for k, v in report.items()))
    for problem in info["report"]["problems"]:
        print(f"  {problem}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    stats = commands.add_parser("stats", help="documents, bytes and tokens per domain")
    stats.add_argument("--data", nargs="+", default=None, help="sources (default: builtin)")
    stats.add_argument("--cache-dir", default="data_cache")
    stats.add_argument("--val-fraction", type=float, default=0.05)
    stats.add_argument("--seed", type=int, default=0)
    rephrase = commands.add_parser("rephrase", help="rewrite documents with an LLM (K2 rephrasing)")
    rephrase.add_argument("inputs", nargs="+", help="[DOMAIN=]PATH or builtin[:domain]")
    rephrase.add_argument("--endpoint", help="OpenAI-compatible API base, e.g. http://localhost:8000/v1")
    rephrase.add_argument("--model", default="default", help="model name sent to the endpoint")
    rephrase.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    rephrase.add_argument("--checkpoint", help="a kimik2 save_pretrained folder instead of an endpoint")
    rephrase.add_argument("--styles", type=int, default=1, help="styles per document (see styles_for)")
    rephrase.add_argument("--style", action="append", choices=sorted(STYLES),
                          help="use exactly these styles (repeatable) instead of --styles")
    rephrase.add_argument("--out", required=True, help="JSON lines, one per (document, style)")
    rephrase.add_argument("--max-chunk-chars", type=int, default=2000)
    rephrase.add_argument("--max-doc-chars", type=int, default=1_000_000)
    rephrase.add_argument("--fidelity-retries", type=int, default=2)
    rephrase.add_argument("--on-fail", choices=("keep", "drop"), default="keep")
    rephrase.add_argument("--timeout", type=float, default=120.0)
    rephrase.add_argument("--retries", type=int, default=5)
    rephrase.add_argument("--backoff", type=float, default=1.0)
    rephrase.add_argument("--temperature", type=float, default=0.7)
    renders = commands.add_parser("renderings", help="maths word problems in several surface forms (rephrasing experiment)")
    renders.add_argument("--problems", type=int, default=400, help="training problems")
    renders.add_argument("--k", type=int, default=8, help="renderings per training problem")
    renders.add_argument("--heldout", type=int, default=200, help="held-out problems")
    renders.add_argument("--seed", type=int, default=0)
    renders.add_argument("--out", required=True, help="folder for the .jsonl files")
    args = parser.parse_args(argv)
    return {"stats": run_stats, "rephrase": run_rephrase, "renderings": run_renderings}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
