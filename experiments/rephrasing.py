"""Experiment (e): rephrasing against repetition, measured as recall of facts.

K2 report sec. 2.2: rewriting knowledge text beats repeating it. On SimpleQA (short factual
questions, scored by accuracy) 10 rephrasings x 1 epoch scored 28.94, one rephrasing x 10 epochs
27.39, the raw text x 10 epochs 23.76. This is that measurement at CPU scale, in the setting of
"Physics of Language Models, Part 3.1" (Allen-Zhu and Li, 2023): synthetic people with five
attributes (birth date, birth city, university, major, employer), stated in short biographies.

The arms train on the same number of tokens (the same number of steps of 16 x 128 tokens, at most
one pass over any arm's text), and state every fact k times:

- raw:        each biography in its original form (the original template of every attribute,
              fixed sentence order), repeated k times;
- rephrased1: one rewritten biography per person (other templates, other sentence order),
              repeated k times (the report's middle row);
- rephrased:  k different biographies per person, the original among them, once each.

Every arm also trains on the same question-answer pages, k times: questions about the first half
of the people in two question forms (Physics 3.1's mixed training: the model learns what a question
asks from them). Nothing else differs between the arms: page sizes, the order of pages
and which person shares a page with whom come from the same seeded shuffles.

Scored on the other half of the people only, whose facts the model saw in biographies alone:

- qa:           questions in the two trained question forms (as asked of the first half);
- qa_unseen:    a third question form that no training text of any arm uses;
- bio_original: the original biography sentence, cut before the fact (the form raw repeats);
- bio_unseen:   a biography sentence form that no arm's training text uses;
- qa_seen:      (a check that the format was learned) trained questions about the first half.

For each question: the loss of the answer's tokens (nats/token, mean over questions) and whether
greedy decoding gives exactly the answer and its closing ".". Exact match is computed by teacher
forcing: greedy decoding reproduces a string exactly when every token of it is the argmax given
the tokens before it, so one forward pass per question decides it.

    python experiments/rephrasing.py data --out runs/rephrase/data      # the corpora and question sets
    OMP_NUM_THREADS=1 python experiments/rephrasing.py run --seeds 0 1 2 --jobs 3 --out runs/rephrase \
        --plot assets/exp-e-rephrase.png

`run` writes the data, trains every (arm, seed) with `python train.py` (a finished run is kept, a
stopped one resumed), scores each final model and prints one Markdown table per question set.
Run folders: runs/rephrase/<arm>-s<seed>; scores: runs/rephrase/scores.json. The train.py command of
each run is printed before it starts.
"""
import argparse
import json
import math
import random
from pathlib import Path

import summarize  # first: it puts the repository's modules on the path, and train.py's thread policy
import torch
import torch.nn.functional as F

import data
from kimik2 import KimiK2
from train import _pyplot

TOKENS_PER_STEP = 16 * 128  # train.py's default batch of 16 sequences of 128 tokens

# -----------------------------------------------------------------------------------------------
# People and their facts

FIRST = ("Anna", "Bruno", "Clara", "Dmitri", "Elif", "Farid", "Greta", "Hugo", "Ilse", "Jamal", "Keiko",
         "Luca", "Marta", "Nils", "Oona", "Pavel", "Quinn", "Rosa", "Sami", "Tove", "Umar", "Vera",
         "Wim", "Xenia", "Yusuf", "Zofia")
LAST = ("Abbott", "Berger", "Castillo", "Dahl", "Eklund", "Fischer", "Gallo", "Horvat", "Ivanova",
        "Jensen", "Kowalski", "Lindqvist", "Moreau", "Novak", "Okafor", "Petrov", "Quist", "Romano",
        "Silva", "Tanaka", "Urban", "Varga", "Weber", "Yilmaz", "Zeller")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")
DAYS, YEARS = range(1, 29), range(1950, 2000)
VALUES = {
    "birth_city": ("Lisbon", "Krakow", "Osaka", "Nairobi", "Lima", "Oslo", "Porto", "Tbilisi", "Hanoi",
                   "Quito", "Dublin", "Tunis", "Perth", "Bergen", "Seville", "Leipzig", "Turin", "Austin",
                   "Calgary", "Mumbai"),
    "university": ("Ashford University", "Birchwood College", "Coldwater Institute", "Dunmore University",
                   "Elmstead College", "Fairhaven University", "Glenrock Institute", "Highmoor University",
                   "Ironbridge College", "Juniper University", "Kingsreach Institute", "Larchfield College",
                   "Millbrook University", "Northgate Institute", "Oakhurst University", "Pinecrest College"),
    "major": ("chemistry", "economics", "geology", "linguistics", "mathematics", "philosophy", "physics",
              "statistics", "architecture", "astronomy", "botany", "history", "music", "nursing",
              "sociology", "zoology"),
    "employer": ("Alder Systems", "Bluefin Foods", "Cobalt Motors", "Delta Textiles", "Ember Energy",
                 "Falcon Logistics", "Granite Bank", "Harbor Media", "Indigo Pharma", "Jasper Robotics",
                 "Kestrel Airlines", "Lumen Optics", "Meridian Insurance", "Nimbus Software",
                 "Orchid Hotels", "Pioneer Steel"),
}
ATTRIBUTES = ("birth_date", "birth_city", "university", "major", "employer")


def people(n: int, seed=0) -> list[dict]:
    """n people with distinct full names, each attribute drawn independently and uniformly."""
    rng = random.Random(f"people:{seed}")
    names = rng.sample([f"{f} {s}" for f in FIRST for s in LAST], n)
    return [{"name": name,
             "birth_date": f"{rng.choice(MONTHS)} {rng.choice(DAYS)}, {rng.choice(YEARS)}",
             **{a: rng.choice(VALUES[a]) for a in ATTRIBUTES[1:]}} for name in names]


# -----------------------------------------------------------------------------------------------
# Forms: every sentence names the person and ends with the fact, so a 128-token window that cuts
# a biography still pairs each fact with its owner, and every form can be scored as "prompt, then
# the fact". Per attribute: template 0 is the original form, 1-4 the rewrites, the last one is held
# out of every arm's training text.

BIO_TEMPLATES = {
    "birth_date": ("{name}'s birth date is {value}.", "{name} was born on {value}.", "{name}'s birthday is {value}.",
                   "{name}'s life began on {value}.", "{name} was delivered on {value}.",
                   "{name} first saw the light of day on {value}."),
    "birth_city": ("{name} was born in {value}.", "{name} is a native of {value}.", "{name} comes from {value}.",
                   "{name}'s birthplace is {value}.", "{name} grew up in {value}.", "{name}'s home town is {value}."),
    "university": ("{name} graduated from {value}.", "{name} studied at {value}.", "{name} was educated at {value}.",
                   "{name} attended {value}.", "{name} was a student at {value}.",
                   "{name} holds a degree from {value}."),
    "major": ("{name} chose to study {value}.", "{name} majored in {value}.", "{name} took a degree in {value}.",
              "{name} specialised in {value}.", "{name}'s field was {value}.", "{name}'s main subject was {value}."),
    "employer": ("{name} is employed by {value}.", "{name} works for {value}.", "{name} has a job at {value}.",
                 "{name}'s employer is {value}.", "{name} earns a living at {value}.",
                 "{name} draws a salary from {value}."),
}
QUESTIONS = {  # two trained forms, then the held-out one
    "birth_date": ("When was {name} born?", "What is the birth date of {name}?", "On which day was {name} born?"),
    "birth_city": ("Where was {name} born?", "Which city is {name} from?", "In what city did {name} come into being?"),
    "university": ("Which university did {name} attend?", "Where did {name} study?",
                   "Name the university of {name}."),
    "major": ("What did {name} major in?", "What was the field of study of {name}?", "Which subject did {name} read?"),
    "employer": ("Which company does {name} work for?", "Who employs {name}?", "Name the employer of {name}."),
}
ORIGINAL, HELD_OUT = 0, -1  # template indices: the form raw repeats; the form no arm trains on
REWRITE_FORMS = len(BIO_TEMPLATES["birth_date"]) - 1  # biography forms 0-4 are trained (by rephrased)
TRAINED_QUESTIONS = (0, 1)  # question forms asked of the first half of the people in training
ARMS = ("raw", "rephrased1", "rephrased")


def biography(person: dict, forms: dict, order) -> str:
    """One biography: the attributes in `order`, each in its template number forms[attribute]."""
    return " ".join(BIO_TEMPLATES[a][forms[a]].format(name=person["name"], value=person[a]) for a in order)


def original(person: dict) -> str:
    return biography(person, dict.fromkeys(ATTRIBUTES, ORIGINAL), ATTRIBUTES)


def rewrites(person: dict, k: int, seed=0) -> list[str]:
    """k distinct biographies of `person` in trained forms, the original first: each later one draws
    a template per attribute (0-4) and a sentence order."""
    rng = random.Random(f"rewrites:{seed}:{person['name']}")
    bios = [original(person)]
    while len(bios) < k:  # 5^5 forms x 120 orders: a duplicate is rare and simply drawn again
        bio = biography(person, {a: rng.randrange(REWRITE_FORMS) for a in ATTRIBUTES},
                        rng.sample(ATTRIBUTES, len(ATTRIBUTES)))
        if bio not in bios:
            bios.append(bio)
    return bios


def question(person: dict, attribute: str, form: int) -> dict:
    """A question and its answer, " VALUE." after "A:"."""
    return {"attribute": attribute, "prompt": f"Q: {QUESTIONS[attribute][form].format(name=person['name'])}\nA:",
            "answer": f" {person[attribute]}."}


def completion(person: dict, attribute: str, form: int) -> dict:
    """A biography sentence in template `form`, cut before the fact; the answer is " VALUE."."""
    prefix = BIO_TEMPLATES[attribute][form].partition(" {value}")[0]
    return {"attribute": attribute, "prompt": prefix.format(name=person["name"]), "answer": f" {person[attribute]}."}


def pages(passes: list[list[str]], page_size: int, rng: random.Random) -> list[str]:
    """Each pass's entries shuffled and cut into documents of page_size entries: a page groups
    different people each pass, so repeated texts are never identical documents (data.py drops exact
    duplicates), and with one rng seed for every arm the page structure is the same in each."""
    docs = []
    for entries in passes:
        order = rng.sample(range(len(entries)), len(entries))
        docs += ["\n\n".join(entries[i] for i in order[j:j + page_size]) for j in range(0, len(order), page_size)]
    return docs


def corpora(n_people=40, k=20, seed=0, page_size=8) -> dict:
    """{"texts": {arm: training documents}, "questions": {set: [{"attribute", "prompt", "answer"}]},
    "validation": texts train.py validates on, "people"}. The first half of the people have trained
    questions, the second half are the test people."""
    everyone = people(n_people, seed)
    trained, test = everyone[:n_people // 2], everyone[n_people // 2:]
    qa_entries = [q["prompt"] + q["answer"] for p in trained for a in ATTRIBUTES for form in TRAINED_QUESTIONS
                  for q in [question(p, a, form)]]
    bios = {"raw": [[original(p) for p in everyone]] * k,
            "rephrased1": [[rewrites(p, 2, seed)[1] for p in everyone]] * k,
            "rephrased": [list(texts) for texts in zip(*(rewrites(p, k, seed) for p in everyone))]}
    texts = {arm: pages([qa_entries] * k, page_size, random.Random(f"qa-pages:{seed}")) +
             pages(bios[arm], page_size, random.Random(f"bio-pages:{seed}")) for arm in ARMS}

    def ask(group, make, forms):
        return [make(p, a, form) for p in group for a in ATTRIBUTES for form in forms]
    questions = {"qa": ask(test, question, TRAINED_QUESTIONS), "qa_unseen": ask(test, question, [HELD_OUT]),
                 "bio_original": ask(test, completion, [ORIGINAL]), "bio_unseen": ask(test, completion, [HELD_OUT]),
                 "qa_seen": ask(trained, question, TRAINED_QUESTIONS)}
    # validated on during training, the same for every arm: the test people's trained questions
    validation = [q["prompt"] + q["answer"] for q in questions["qa"]]
    return {"texts": texts, "questions": questions, "validation": validation, "people": everyone}


def write_jsonl(path: Path, records):
    data.write_atomically(path, lambda f: f.writelines(json.dumps(r) + "\n" for r in records))


def write_data(out: Path, n_people: int, k: int, seed: int) -> dict:
    """Writes <arm>.jsonl, validation.jsonl and questions.json into out; returns token counts."""
    c = corpora(n_people, k, seed)
    out.mkdir(parents=True, exist_ok=True)
    tokens = {}
    for arm, docs in c["texts"].items():
        write_jsonl(out / f"{arm}.jsonl", ({"text": d} for d in docs))
        tokens[arm] = sum(len(d.encode()) + 1 for d in docs)  # byte tokens plus one eos per document
    write_jsonl(out / "validation.jsonl", ({"text": t} for t in c["validation"]))
    data.write_atomically(out / "questions.json", lambda f: json.dump(c["questions"], f))
    return tokens


# -----------------------------------------------------------------------------------------------
# Scoring a trained model on a question set

def score(model, items) -> dict:
    """score_tokens on items {"prompt", "answer"} in byte tokens."""
    tokenizer = data.ByteTokenizer()
    return score_tokens(model, [(tokenizer.encode(it["prompt"]), tokenizer.encode(it["answer"])) for it in items])


@torch.no_grad()
def score_tokens(model, pairs, batch=64) -> dict:
    """Mean answer loss (nats per answer token, averaged over questions) and exact-match accuracy
    over (prompt ids, answer ids) pairs. Only the answer's tokens are scored; the prompt is context.
    Right padding is harmless to a causal model: no scored position sees a pad."""
    model.eval()
    losses, exact = [], []
    for i in range(0, len(pairs), batch):
        chunk = pairs[i:i + batch]
        length = max(len(p) + len(a) for p, a in chunk)
        ids = torch.zeros(len(chunk), length, dtype=torch.long)
        targets = torch.full((len(chunk), length), -1, dtype=torch.long)
        for row, (p, a) in enumerate(chunk):
            ids[row, :len(p) + len(a)] = torch.tensor(p + a)
            targets[row, len(p) - 1:len(p) + len(a) - 1] = torch.tensor(a)  # position t predicts token t + 1
        logits, _ = model(ids)
        token_loss = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=-1, reduction="none")
        scored = targets >= 0
        losses += ((token_loss * scored).sum(1) / scored.sum(1)).tolist()
        exact += ((logits.argmax(-1) == targets) | ~scored).all(1).tolist()
    return {"answer_loss": sum(losses) / len(losses), "exact_match": sum(exact) / len(exact), "n": len(pairs)}


def prior_answer_loss(items) -> float:
    """The answer loss of a model that knows the question format and each attribute's list of
    values but nothing about the person: -log(1 / number of values) per answer, spread over its
    tokens, averaged over questions. Above it, a model is confidently wrong."""
    choices = {"birth_date": len(MONTHS) * len(DAYS) * len(YEARS), **{a: len(v) for a, v in VALUES.items()}}
    return sum(math.log(choices[it["attribute"]]) / len(it["answer"].encode()) for it in items) / len(items)


def score_run(run_dir: Path, questions: dict) -> dict:
    model = KimiK2.from_pretrained(str(run_dir / "hf"))
    return {name: score(model, items) for name, items in questions.items()}


# -----------------------------------------------------------------------------------------------
# Driving train.py and reporting

def table(scores: dict, arms, seeds, items, question_set: str) -> str:
    lines = ["| arm | answer loss, mean | per seed | exact match, mean | per seed |", "|---|---|---|---|---|"]
    for arm in arms:
        runs = [scores[f"{arm}-s{s}"][question_set] for s in seeds]
        loss, em = [r["answer_loss"] for r in runs], [r["exact_match"] for r in runs]
        lines.append(f"| {arm} | {sum(loss) / len(loss):.3f} | {', '.join(f'{v:.3f}' for v in loss)} | "
                     f"{100 * sum(em) / len(em):.1f}% | {', '.join(f'{100 * v:.1f}%' for v in em)} |")
    lines.append(f"| knows the lists of values, not the person | {prior_answer_loss(items):.3f} | | | |")
    return "\n".join(lines)


def plot(scores: dict, arms, seeds, questions: dict, path: str):
    if (plt := _pyplot(path)) is None:
        return
    question_sets = list(questions)
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(arms)
    for i, arm in enumerate(arms):
        for j, (key, scale) in enumerate((("exact_match", 100), ("answer_loss", 1))):
            per_seed = [[scale * scores[f"{arm}-s{s}"][q][key] for s in seeds] for q in question_sets]
            x = [n + (i - (len(arms) - 1) / 2) * width for n in range(len(question_sets))]
            ax[j].bar(x, [sum(v) / len(v) for v in per_seed], width, label=arm, color=f"C{i}", alpha=0.6)
            for xi, v in zip(x, per_seed):
                ax[j].plot([xi] * len(v), v, "k.", ms=4)
    ax[1].plot(range(len(question_sets)), [prior_answer_loss(questions[q]) for q in question_sets], "k_", ms=30,
               label="knows the values, not the person")
    for j, title in enumerate(("exact-match accuracy, % (bars: mean; dots: seeds)", "answer loss, nats/token")):
        ax[j].set_xticks(range(len(question_sets)), question_sets, fontsize=8)
        ax[j].set_title(title)
        ax[j].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def run(args) -> int:
    data_dir = Path(args.out) / "data"
    tokens = write_data(data_dir, args.people, args.k, args.seed)
    steps = min(tokens.values()) // TOKENS_PER_STEP  # one pass over the smallest arm's text, at most
    print(f"training text per arm, byte tokens: {tokens}; every arm trains {steps} steps of {TOKENS_PER_STEP} tokens")
    folders = {(arm, seed): str(Path(args.out) / f"{arm}-s{seed}") for seed in args.seeds for arm in args.arms}
    summarize.train_all({folder: ["--data", str(data_dir / f"{arm}.jsonl"), "--val-data", str(data_dir / "validation.jsonl"),
                                  "--seed", str(seed), "--max-steps", str(steps), "--eval-interval", str(steps // 4),
                                  "--ckpt-interval", str(steps // 4), "--keep-ckpts", "1", "--sample-tokens", "0",
                                  *args.train_args]
                         for (arm, seed), folder in folders.items()}, args.jobs)
    questions = json.loads((data_dir / "questions.json").read_text())
    scores = {f"{arm}-s{seed}": score_run(Path(folder), questions) for (arm, seed), folder in folders.items()}
    data.write_atomically(Path(args.out) / "scores.json", lambda f: json.dump(scores, f, indent=1))
    for question_set, items in questions.items():
        print(f"\n{question_set} ({len(items)} questions)\n")
        print(table(scores, args.arms, args.seeds, items, question_set))
    if args.plot:
        plot(scores, args.arms, args.seeds, questions, args.plot)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    for name in ("data", "run"):
        c = commands.add_parser(name)
        c.add_argument("--people", type=data.number(int, 4, len(FIRST) * len(LAST)), default=40,
                       help="people (half of them test people)")
        c.add_argument("--k", type=data.number(int, 2), default=20, help="repetitions, or rewrites, per biography")
        c.add_argument("--seed", type=int, default=0, help="seed of the people and the texts")
        c.add_argument("--out", required=True, help="data folder (data), or experiment folder (run)")
    run_parser = commands.choices["run"]
    run_parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="train.py seeds")
    run_parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    run_parser.add_argument("--plot", help="PNG of the scores (needs matplotlib)")
    run_parser.add_argument("--jobs", type=data.number(int, 1), default=1, help="runs at a time")
    run_parser.add_argument("--train-args", nargs=argparse.REMAINDER, default=[],
                            help="the rest of the line goes to train.py (e.g. --set n_routed_experts=8)")
    args = p.parse_args(argv)
    try:
        if args.command == "run":
            return run(args)
        for arm, n in write_data(Path(args.out), args.people, args.k, args.seed).items():
            print(f"{args.out}/{arm}.jsonl: {n:,} byte tokens")
        return 0
    except OSError as e:  # --out is a file, or cannot be written
        raise SystemExit(f"--out {args.out}: {e.strerror or e}: {e.filename}")


if __name__ == "__main__":
    raise SystemExit(main())
