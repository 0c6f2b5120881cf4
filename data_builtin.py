"""The built-in corpus of data.py: the standard library's code and documentation, and generated maths.

`python train.py` trains offline on it: data.py's source "builtin" (all three domains) or
"builtin:code", "builtin:knowledge", "builtin:math" (comma-separated for several) reads it from here.
Code is the running Python's own standard library (tests and installed packages left out), knowledge
its pydoc topics and the docstrings of other standard-library modules (parsed, never imported), maths
worked problems generated from a seed (a problem's text depends only on (seed, index)). A companion
of data.py: copy it beside data.py, which imports it when a "builtin" source is loaded.

Run:
    python data.py stats --data builtin:math     (documents, bytes and tokens per domain)
"""
import ast
import math
import os
import random
import sysconfig
from fractions import Fraction
from pathlib import Path

from data import DataError, Document

# -----------------------------------------------------------------------------------------------
# Code and knowledge: the standard library's own sources, documentation topics and docstrings

STDLIB = Path(sysconfig.get_paths()["stdlib"])
STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "_bundled"}
CODE_BYTES = 2_000_000       # standard-library source used as the code domain (of about 12 MB)
KNOWLEDGE_BYTES = 2_000_000  # cap on pydoc topics + docstrings (about 2 MB are available)
MATH_PROBLEMS = 6_000        # generated worked problems, about 1.5 MB before duplicates are dropped


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


# -----------------------------------------------------------------------------------------------
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


# -----------------------------------------------------------------------------------------------
# The "builtin" source of data.py

BUILTIN_DOMAINS = ("code", "knowledge", "math")


def builtin_documents(spec: str, seed: int) -> list[Document]:
    """'builtin' or 'builtin:DOMAIN[,DOMAIN]' -> the built-in corpus's documents."""
    domains = (spec.partition(":")[2] or ",".join(BUILTIN_DOMAINS)).split(",")
    if unknown := sorted(set(domains) - set(BUILTIN_DOMAINS)):
        raise DataError(f"data source {spec!r}: unknown built-in domain(s) {unknown}; "
                        f"the built-in domains are {', '.join(BUILTIN_DOMAINS)}")
    docs = []
    if "code" in domains or "knowledge" in domains:
        code, knowledge = stdlib_documents(seed)
        docs += (code if "code" in domains else []) + (knowledge if "knowledge" in domains else [])
    if "math" in domains:
        docs += math_documents(seed=seed)
    return docs
