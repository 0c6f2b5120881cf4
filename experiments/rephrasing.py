"""Experiment (e): rephrasing against repetition, pretrained on biographies, fine-tuned on questions.

K2 report sec. 2.2: rewriting knowledge text beats repeating it. On SimpleQA (short factual
questions, scored by accuracy) 10 rephrasings x 1 epoch scored 28.94, one rephrasing x 10 epochs
27.39, the raw text x 10 epochs 23.76. This is that measurement at CPU scale, in the design of
"Physics of Language Models, Part 3.1" (Allen-Zhu and Li, 2023): synthetic people with five
attributes (birth date, birth city, university, major, employer), stated in short biographies;
a model pretrained on the biographies, then fine-tuned to answer questions about half of the
people, is asked about the other half. Physics 3.1 finds that knowledge pretrained from one fixed
text per person "may be memorized but not extractable" by later fine-tuning, and that rewritten
and permuted biographies make it extractable.

1. Pretraining, the only difference between the arms. Equal tokens (the same number of steps of
   16 x 128 tokens, at most one pass over any arm's text), every fact stated k times:
   - raw:        each biography in its original form (the original template of every attribute,
                 fixed sentence order), k times;
   - rephrased1: one rewritten biography per person (templates and sentence order drawn), k times
                 (the report's middle row);
   - rephrased:  k different biographies per person, the original among them, once each.
2. The gate: each pretrained model completes its own training biographies (one of its texts per
   person, cut before each fact, the earlier sentences as context). The target is >= 90% exact;
   a model that has not memorised the facts cannot show whether they are extractable.
3. Fine-tuning, identical in every arm: questions about the first half of the people in two
   question forms, k passes, started from the pretrained weights (`train.py --init-from`).
4. Scores of the fine-tuned model:
   - ft_seen:   the fine-tuning questions themselves (in-distribution accuracy);
   - qa:        the same two question forms about the other half, the test people, whose facts the
                model saw in biographies only;
   - qa_unseen: a third question form per attribute that no training text uses, built only from
                words every arm's training text contains.

Metrics, per question: exact match (greedy decoding gives exactly " VALUE."; computed by teacher
forcing: greedy decoding reproduces a string exactly when each token is the argmax given the ones
before it) and the person contrast: whether the true value's answer has a lower loss (summed over
its tokens) than every other value the same attribute takes among the people asked about. A model
that knows the values of an attribute but not who has which wins with probability 1 / (number of
distinct values), the chance printed beside it. The seed sets the people, the texts and train.py's
seed.

    python experiments/rephrasing.py data --out runs/rephrase/data      # one seed's corpora and question sets
    OMP_NUM_THREADS=1 python experiments/rephrasing.py run --pilot --jobs 2 --out runs/rephrase-pilot
    OMP_NUM_THREADS=1 nice python experiments/rephrasing.py run --jobs 2 --out runs/rephrase   # 40 people, k 120
    python experiments/rephrasing.py report --out runs/rephrase --plot assets/exp-e-rephrase.png

Sizes: the pilot (20 people, k 60, seed 0) is 3 x 171 training steps of 16 x 128 tokens; the full
run (40 people, k 120, seeds 0 1 2) 9 x 585 steps, about an hour on two quiet cores.

`run` writes each seed's data, pretrains every (arm, seed), scores the gate, fine-tunes, scores,
and prints the table; scores go to OUT/scores.json. Run folders OUT/pre-<arm>-s<seed> and
OUT/ft-<arm>-s<seed> (a finished one is kept, a stopped one resumed); each train.py command is
printed before it starts, its output in the folder's .log. `report --out OUT` prints the table of
OUT/scores.json again.
"""
import argparse
import json
import random
import re
import shlex
from pathlib import Path

import summarize  # first: it puts the repository's modules on the path, and train.py's thread policy
import torch
import torch.nn.functional as F

import data
from kimik2 import KimiK2
from train_run import pyplot

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
# a biography still pairs each fact with its owner. Template 0 of each attribute is the original
# form, 1-4 the rewrites.

BIO_TEMPLATES = {
    "birth_date": ("{name}'s birth date is {value}.", "{name} was born on {value}.", "{name}'s birthday is {value}.",
                   "{name}'s life began on {value}.", "{name} was delivered on {value}."),
    "birth_city": ("{name} was born in {value}.", "{name} is a native of {value}.", "{name} comes from {value}.",
                   "{name}'s birthplace is {value}.", "{name} grew up in {value}."),
    "university": ("{name} graduated from {value}.", "{name} studied at {value}.", "{name} was educated at {value}.",
                   "{name} attended {value}.", "{name} was a student at {value}."),
    "major": ("{name} chose to study {value}.", "{name} majored in {value}.", "{name} took a degree in {value}.",
              "{name} specialised in {value}.", "{name}'s field was {value}."),
    "employer": ("{name} is employed by {value}.", "{name} works for {value}.", "{name} has a job at {value}.",
                 "{name}'s employer is {value}.", "{name} earns a living at {value}."),
}
# two forms the fine-tuning asks in, then the unseen form: only words of the fine-tuning questions
QUESTIONS = {
    "birth_date": ("When was {name} born?", "What is the birth date of {name}?", "What is the date {name} was born?"),
    "birth_city": ("Where was {name} born?", "Which city is {name} from?", "What city is {name} from?"),
    "university": ("Which university did {name} attend?", "Where did {name} study?",
                   "What university did {name} attend?"),
    "major": ("What did {name} major in?", "What was the field of study of {name}?", "What field did {name} study?"),
    "employer": ("Which company does {name} work for?", "Who employs {name}?", "Who does {name} work for?"),
}
ORIGINAL = 0  # the template raw repeats
FORMS = len(BIO_TEMPLATES["birth_date"])
TRAINED_QUESTIONS, UNSEEN_QUESTION = (0, 1), 2
ARMS = ("raw", "rephrased1", "rephrased")


def biography(person: dict, forms: dict, order) -> str:
    """One biography: the attributes in `order`, each in its template number forms[attribute]."""
    return " ".join(BIO_TEMPLATES[a][forms[a]].format(name=person["name"], value=person[a]) for a in order)


def original(person: dict) -> str:
    return biography(person, dict.fromkeys(ATTRIBUTES, ORIGINAL), ATTRIBUTES)


def rewrites(person: dict, k: int, seed=0) -> list[str]:
    """k distinct biographies of `person`, the original first: each later one draws a template per
    attribute and a sentence order."""
    rng = random.Random(f"rewrites:{seed}:{person['name']}")
    bios = [original(person)]
    while len(bios) < k:  # 5^5 forms x 120 orders: a duplicate is rare and simply drawn again
        bio = biography(person, {a: rng.randrange(FORMS) for a in ATTRIBUTES}, rng.sample(ATTRIBUTES, len(ATTRIBUTES)))
        if bio not in bios:
            bios.append(bio)
    return bios


def question(person: dict, attribute: str, form: int) -> dict:
    """A question and its answer, " VALUE." after "A:"."""
    return {"name": person["name"], "attribute": attribute,
            "prompt": f"Q: {QUESTIONS[attribute][form].format(name=person['name'])}\nA:",
            "answer": f" {person[attribute]}."}


def recall_items(person: dict, bio: str) -> list[dict]:
    """The gate's items of one biography: the text up to each fact as the prompt, " VALUE." as the answer."""
    items = []
    for a in ATTRIBUTES:
        sentence = next(s for t in BIO_TEMPLATES[a] if (s := t.format(name=person["name"], value=person[a])) in bio)
        end = bio.index(sentence) + len(sentence) - len(f" {person[a]}.")
        items.append({"name": person["name"], "attribute": a, "prompt": bio[:end], "answer": f" {person[a]}."})
    return items


def pages(passes: list[list[str]], page_size: int, rng: random.Random) -> list[str]:
    """Each pass's entries shuffled and cut into documents of page_size entries: a page groups
    different people each pass, so repeated texts are never identical documents (data.py drops exact
    duplicates)."""
    docs = []
    for entries in passes:
        order = rng.sample(range(len(entries)), len(entries))
        docs += ["\n\n".join(entries[i] for i in order[j:j + page_size]) for j in range(0, len(order), page_size)]
    return docs


def corpora(n_people=40, k=100, seed=0, ft_passes=20, page_size=8) -> dict:
    """{"pretrain": {arm: documents}, "finetune": documents, "gate": {arm: items}, "questions": {set: items},
    "people"}. The first half of the people are asked about in fine-tuning, the second half are the
    test people. An item is {"name", "attribute", "prompt", "answer"}."""
    everyone = people(n_people, seed)
    trained, test = everyone[:n_people // 2], everyone[n_people // 2:]
    bios = {"raw": [[original(p) for p in everyone]] * k,
            "rephrased1": [[rewrites(p, 2, seed)[1] for p in everyone]] * k,
            "rephrased": [list(texts) for texts in zip(*(rewrites(p, k, seed) for p in everyone))]}
    pretrain = {arm: pages(bios[arm], page_size, random.Random(f"bio-pages:{seed}")) for arm in ARMS}
    pick = random.Random(f"gate:{seed}")  # rephrased: one of its k texts per person, drawn
    own = {arm: [bios[arm][pick.randrange(k) if arm == "rephrased" else 0][i] for i in range(n_people)] for arm in ARMS}
    gate = {arm: [it for p, bio in zip(everyone, own[arm]) for it in recall_items(p, bio)] for arm in ARMS}

    def ask(group, forms):
        return [question(p, a, form) for p in group for a in ATTRIBUTES for form in forms]
    finetune = pages([[q["prompt"] + q["answer"] for q in ask(trained, TRAINED_QUESTIONS)]] * ft_passes, page_size,
                     random.Random(f"qa-pages:{seed}"))
    questions = {"ft_seen": ask(trained, TRAINED_QUESTIONS), "qa": ask(test, TRAINED_QUESTIONS),
                 "qa_unseen": ask(test, [UNSEEN_QUESTION])}
    return {"pretrain": pretrain, "finetune": finetune, "gate": gate, "questions": questions, "people": everyone}


def words(text: str) -> set:
    return set(re.findall(r"[A-Za-z]+", text))


def tokens(docs) -> int:
    return sum(len(d.encode()) + 1 for d in docs)  # byte tokens plus one eos per document


def write_jsonl(path: Path, texts):
    data.write_atomically(path, lambda f: f.writelines(json.dumps({"text": t}) + "\n" for t in texts))


def write_data(out: Path, n_people: int, k: int, seed: int, ft_passes: int) -> dict:
    """Writes pretrain-<arm>.jsonl, finetune.jsonl, validation.jsonl (the test people's questions in the
    trained forms: what train.py reports as val loss, the same file for every arm) and items.json;
    returns the token counts of the training files."""
    c = corpora(n_people, k, seed, ft_passes)
    out.mkdir(parents=True, exist_ok=True)
    for arm, docs in c["pretrain"].items():
        write_jsonl(out / f"pretrain-{arm}.jsonl", docs)
    write_jsonl(out / "finetune.jsonl", c["finetune"])
    write_jsonl(out / "validation.jsonl", [q["prompt"] + q["answer"] for q in c["questions"]["qa"]])
    data.write_atomically(out / "items.json", lambda f: json.dump({"gate": c["gate"], "questions": c["questions"]}, f))
    return {**{arm: tokens(docs) for arm, docs in c["pretrain"].items()}, "finetune": tokens(c["finetune"])}


# -----------------------------------------------------------------------------------------------
# Scoring

@torch.no_grad()
def answer_losses(model, pairs, batch=64) -> list[tuple[float, bool]]:
    """(answer loss summed over the answer's tokens, exact match) of each (prompt ids, answer ids) pair.
    Only the answer's tokens are scored; the prompt is context. Right padding is harmless to a causal
    model: no scored position sees a pad."""
    model.eval()
    out = []
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
        exact = ((logits.argmax(-1) == targets) | (targets < 0)).all(1)
        out += list(zip(token_loss.sum(1).tolist(), exact.tolist()))
    return out


def encode(text: str) -> list[int]:
    return list(text.encode())  # data.py's byte tokenizer


def exact_match(model, items) -> float:
    pairs = [(encode(it["prompt"]), encode(it["answer"])) for it in items]
    return sum(exact for _, exact in answer_losses(model, pairs)) / len(items)


def person_contrast(model, items, group: list[dict]) -> tuple[float, float]:
    """(how often the true value's answer loss is below that of every other value the attribute takes
    among `group`, chance): chance is the mean of 1 / (distinct values) over the items."""
    candidates = {a: sorted({p[a] for p in group}) for a in ATTRIBUTES}
    pairs = [(encode(it["prompt"]), encode(f" {v}.")) for it in items for v in candidates[it["attribute"]]]
    losses = iter(loss for loss, _ in answer_losses(model, pairs))
    wins = 0
    for it in items:
        scored = {v: next(losses) for v in candidates[it["attribute"]]}
        true = scored.pop(it["answer"][1:-1])
        wins += all(true < other for other in scored.values())
    return wins / len(items), sum(1 / len(candidates[it["attribute"]]) for it in items) / len(items)


def score_finetuned(model, questions: dict, everyone: list[dict]) -> dict:
    half = len(everyone) // 2
    groups = {"ft_seen": everyone[:half], "qa": everyone[half:], "qa_unseen": everyone[half:]}
    scores = {}
    for name, items in questions.items():
        contrast, chance = person_contrast(model, items, groups[name])
        scores[name] = {"exact_match": exact_match(model, items), "contrast": contrast, "chance": chance,
                        "n": len(items)}
    return scores


# -----------------------------------------------------------------------------------------------
# Driving train.py and reporting

SIZES = {  # the steps follow from the text: one pass over it
    "full": dict(people=40, k=120, ft_passes=20, seeds=[0, 1, 2]),
    "pilot": dict(people=20, k=60, ft_passes=20, seeds=[0]),
}


def final_checkpoint(run_dir: Path) -> Path:
    ckpts = sorted(run_dir.glob("ckpt_*.pt"))
    if not ckpts:
        raise SystemExit(f"{run_dir}: no checkpoint to fine-tune from")
    return ckpts[-1]


def run(args) -> int:
    out = Path(args.out)
    common = ["--sample-tokens", "0", "--keep-ckpts", "1"]
    plan = {}  # seed -> its data folder, steps and question items
    for seed in args.seeds:
        data_dir = out / f"data-s{seed}"
        counts = write_data(data_dir, args.people, args.k, seed, args.ft_passes)
        plan[seed] = dict(dir=data_dir, steps=min(counts[arm] for arm in ARMS) // TOKENS_PER_STEP,
                          ft_steps=counts["finetune"] // TOKENS_PER_STEP, people=people(args.people, seed),
                          items=json.loads((data_dir / "items.json").read_text()))
        print(f"seed {seed}: byte tokens {counts}; every arm pretrains {plan[seed]['steps']} steps and fine-tunes "
              f"{plan[seed]['ft_steps']} steps of {TOKENS_PER_STEP} tokens", flush=True)

    def train_args(seed, data_file, steps, evals):
        return ["--data", str(plan[seed]["dir"] / data_file), "--val-data", str(plan[seed]["dir"] / "validation.jsonl"),
                "--seed", str(seed), "--max-steps", str(steps), "--eval-interval", str(steps // evals),
                "--ckpt-interval", str(steps), *common]
    pre = {(arm, seed): out / f"pre-{arm}-s{seed}" for seed in args.seeds for arm in args.arms}
    summarize.train_all({str(folder): [*train_args(seed, f"pretrain-{arm}.jsonl", plan[seed]["steps"], 4),
                                       *shlex.split(args.train_args)] for (arm, seed), folder in pre.items()},
                        args.jobs)
    scores = {}
    for (arm, seed), folder in pre.items():
        gate = plan[seed]["items"]["gate"][arm]
        model = KimiK2.from_pretrained(str(folder / "hf"))
        scores[f"{arm}-s{seed}"] = {"gate": {"exact_match": exact_match(model, gate), "n": len(gate)}}
        print(f"gate, {folder}: {100 * scores[f'{arm}-s{seed}']['gate']['exact_match']:.1f}% of its own "
              f"biographies' facts recalled exactly", flush=True)
    ft = {(arm, seed): out / f"ft-{arm}-s{seed}" for (arm, seed) in pre}
    summarize.train_all({str(folder): ["--init-from", str(final_checkpoint(pre[(arm, seed)])),
                                       *train_args(seed, "finetune.jsonl", plan[seed]["ft_steps"], 2),
                                       "--lr", str(args.ft_lr), "--warmup-steps", str(plan[seed]["ft_steps"] // 10),
                                       *shlex.split(args.ft_args)] for (arm, seed), folder in ft.items()}, args.jobs)
    for (arm, seed), folder in ft.items():
        model = KimiK2.from_pretrained(str(folder / "hf"))
        scores[f"{arm}-s{seed}"].update(score_finetuned(model, plan[seed]["items"]["questions"], plan[seed]["people"]))
    settings = {key: getattr(args, key) for key in ("people", "k", "ft_passes", "seeds", "arms", "ft_lr", "train_args",
                                                    "ft_args")}
    settings["steps"] = {seed: [plan[seed]["steps"], plan[seed]["ft_steps"]] for seed in args.seeds}
    result = {"settings": settings, "scores": scores}
    data.write_atomically(out / "scores.json", lambda f: json.dump(result, f, indent=1))
    print(report(result))
    if args.plot:
        plot(result, args.plot)
    return 0


def spread(values) -> str:
    """Percent: the mean, then each seed in brackets."""
    mean = f"{100 * sum(values) / len(values):.1f}"
    return mean + (f" ({', '.join(f'{100 * v:.1f}' for v in values)})" if len(values) > 1 else "")


COLUMNS = (("gate", "exact_match"), ("ft_seen", "exact_match"), ("ft_seen", "contrast"), ("qa", "exact_match"),
           ("qa", "contrast"), ("qa_unseen", "exact_match"), ("qa_unseen", "contrast"))


def report(result: dict) -> str:
    """The Markdown table: per arm, percent, mean over seeds and (in brackets) each seed; a contrast
    cell ends with its chance (mean over seeds: the people differ)."""
    s, scores = result["settings"], result["scores"]
    header = {"gate": "gate: own biographies"}
    lines = [f"{s['people']} people, k = {s['k']}, seeds {', '.join(map(str, s['seeds']))}", "",
             "| arm | " + " | ".join(f"{header.get(q, q)} {key.replace('_', ' ')}" for q, key in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for arm in s["arms"]:
        runs = [scores[f"{arm}-s{seed}"] for seed in s["seeds"]]
        cells = []
        for q, key in COLUMNS:
            cells.append(spread([r[q][key] for r in runs]))
            if key == "contrast":
                cells[-1] += f", chance {100 * sum(r[q]['chance'] for r in runs) / len(runs):.1f}"
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, path: str):
    if (plt := pyplot(path)) is None:
        return
    s, scores = result["settings"], result["scores"]
    columns = COLUMNS
    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.8 / len(s["arms"])
    for i, arm in enumerate(s["arms"]):
        x = [n + (i - (len(s["arms"]) - 1) / 2) * width for n in range(len(columns))]
        per_seed = [[100 * scores[f"{arm}-s{seed}"][q][key] for seed in s["seeds"]] for q, key in columns]
        ax.bar(x, [sum(v) / len(v) for v in per_seed], width, label=arm, color=f"C{i}", alpha=0.6)
        for xi, v in zip(x, per_seed):
            ax.plot([xi] * len(v), v, "k.", ms=4)
    first = scores[f"{s['arms'][0]}-s{s['seeds'][0]}"]
    for n, (q, key) in enumerate(columns):
        if key == "contrast":
            ax.plot([n - 0.4, n + 0.4], [100 * first[q]["chance"]] * 2, "k--", linewidth=0.8)
    ax.set_xticks(range(len(columns)), [f"{q}\n{key.replace('_', ' ')}" for q, key in columns], fontsize=8)
    ax.set(title=f"(e): {s['people']} people, k = {s['k']}; bars: mean, dots: seeds, dashes: chance", ylabel="%")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    for name in ("data", "run"):
        c = commands.add_parser(name)
        c.add_argument("--people", type=data.number(int, 4, len(FIRST) * len(LAST)), default=SIZES["full"]["people"],
                       help="people (half of them test people)")
        c.add_argument("--k", type=data.number(int, 2), default=SIZES["full"]["k"],
                       help="repetitions, or rewrites, per biography")
        c.add_argument("--ft-passes", type=data.number(int, 1), default=SIZES["full"]["ft_passes"],
                       help="passes over the fine-tuning questions")
        c.add_argument("--out", required=True, help="data folder (data), or experiment folder (run)")
    commands.choices["data"].add_argument("--seed", type=int, default=0, help="seed of the people and the texts")
    r = commands.choices["run"]
    r.add_argument("--seeds", type=int, nargs="+", default=SIZES["full"]["seeds"],
                   help="seeds of the people, the texts and train.py")
    r.add_argument("--pilot", action="store_true", help=f"the short run: {SIZES['pilot']}")
    r.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    r.add_argument("--ft-lr", type=data.number(float, 0, above=True), default=3e-3,
                   help="fine-tuning peak learning rate")
    r.add_argument("--plot", help="PNG of the scores (needs matplotlib)")
    r.add_argument("--jobs", type=data.number(int, 1), default=1, help="runs at a time")
    r.add_argument("--train-args", default="", help="more train.py options for pretraining, one string "
                   "(e.g. \"--set n_routed_experts=8\"); fine-tuning takes the checkpoint's model")
    r.add_argument("--ft-args", default="", help="more train.py options for fine-tuning, one string")
    rep = commands.add_parser("report")
    rep.add_argument("--out", required=True, help="experiment folder holding scores.json")
    rep.add_argument("--plot", help="PNG of the scores (needs matplotlib)")
    args = p.parse_args(argv)
    try:
        if args.command == "run":
            if args.pilot:
                vars(args).update(SIZES["pilot"])
            return run(args)
        if args.command == "report":
            path = Path(args.out) / "scores.json"
            try:
                result = json.loads(path.read_text())
                table = report(result)
            except (ValueError, KeyError) as e:  # bytes changed, cut short, or another program's JSON
                raise SystemExit(f"{path}: not a scores.json that `run` wrote ({type(e).__name__}: {e})")
            print(table)
            if args.plot:
                plot(result, args.plot)
            return 0
        for name, n in write_data(Path(args.out), args.people, args.k, args.seed, args.ft_passes).items():
            print(f"{name}: {n:,} byte tokens")
        return 0
    except OSError as e:  # --out is a file, or cannot be written
        raise SystemExit(f"--out {args.out}: {e.strerror or e}: {e.filename}")


if __name__ == "__main__":
    raise SystemExit(main())
