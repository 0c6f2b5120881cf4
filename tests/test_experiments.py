"""Tests of experiments/: the sweep summary of (c) and (d), and experiment (e)'s corpora and scoring.

The sweep summary (groups, FLOPs to a target loss, fixed validation batches, logged losses and load
imbalance) and experiment (e)'s corpora, run plan and scoring: what each arm pretrains on, that the
arms train on equal tokens and fine-tune alike, that unseen question forms use only training words,
and the exact-match and person-contrast metrics. No real training: models are tiny and random, or
stand-ins with known logits.

    python -m pytest -q tests/test_experiments.py
"""
import json
import os
import sys

import pytest
import torch
from torch import nn

from conftest import HERE

sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "experiments"))
import data  # noqa: E402
from kimik2 import PRESETS, Config, KimiK2, count_params, flops_per_token  # noqa: E402
import rephrasing  # noqa: E402
import summarize  # noqa: E402

def _run_folder(folder, experts, seed, val_losses, eval_every=10):
    """A finished train.py run folder as summarize reads it, with these validation losses."""
    model = {**PRESETS["tiny"], "n_routed_experts": experts}
    folder.mkdir()
    steps = [eval_every * i for i in range(len(val_losses))]
    (folder / "config.json").write_text(json.dumps({"model": model, "seed": seed, "out": str(folder), "seq_len": 128,
                                                    "tokens_per_step": 2048, "max_steps": steps[-1], "lr": 0.01}))
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "val_loss": v}) + "\n"
                                                  for s, v in zip(steps, val_losses)) +
                                          json.dumps({"step": steps[-1], "load_imbalance": 1.5 + seed}) + "\n")


def test_summarize_groups_seeds_and_finds_the_flops_to_reach_the_target_loss(tmp_path, capsys):
    _run_folder(tmp_path / "a0", 8, 0, [3.0, 2.1, 1.9])
    _run_folder(tmp_path / "a1", 8, 1, [3.0, 1.9, 1.7])     # group n_routed_experts=8: mean 3, 2, 1.8
    _run_folder(tmp_path / "b0", 64, 0, [3.0, 2.4, 1.2])
    _run_folder(tmp_path / "b1", 64, 1, [3.0, 2.2, 1.0])    # group 64: mean 3, 2.3, 1.1
    rows = summarize.summarize([str(tmp_path / n) for n in ("a0", "a1", "b0", "b1")])
    assert [r["label"] for r in rows] == ["n_routed_experts=8", "n_routed_experts=64"]
    assert [r["seeds"] for r in rows] == [[0, 1], [0, 1]]
    assert rows[0]["activated"] == count_params(Config(**{**PRESETS["tiny"], "n_routed_experts": 8}))["activated"]
    # target: the higher final mean loss (1.8); group 8 reaches it at step 20, group 64 at
    # step 10 + 10 * (2.3 - 1.8) / (2.3 - 1.1) by linear interpolation; same FLOPs per step
    flops_per_step = [flops_per_token(Config(**{**PRESETS["tiny"], "n_routed_experts": e}), 64.5, training=True) * 2048
                      for e in (8, 64)]
    assert rows[0]["to_target"] == pytest.approx(20 * flops_per_step[0])
    assert rows[1]["to_target"] == pytest.approx((10 + 10 * 0.5 / 1.2) * flops_per_step[1])
    table = capsys.readouterr().out
    assert "| n_routed_experts=64 | 0, 1 |" in table and "1.1000 | 1.2000, 1.0000 | -38.89%" in table
    # the figures the README quotes from the logs: each seed's logged final loss and load imbalance
    assert rows[0]["logged"] == [1.9, 1.7] and rows[0]["imbalance"] == [1.5, 2.5]
    assert f"| {flops_per_step[1] / 2048 / 1e6:.2f}M | 1.2000, 1.0000 | 1.5, 2.5 |" in table


def test_flops_to_reach_interpolates_and_says_never():
    curve = [(0, 3.0), (10, 2.0), (20, 1.0)]
    assert summarize.flops_to_reach(curve, 2.5) == pytest.approx(5)
    assert summarize.flops_to_reach(curve, 1.0) == pytest.approx(20)
    assert summarize.flops_to_reach(curve, 3.5) == 0  # already below at the first evaluation
    assert summarize.flops_to_reach(curve, 0.5) is None
    assert summarize.flops_to_reach([(0, 3.0), (10, 1.0), (20, 2.0)], 1.5) == pytest.approx(7.5)  # the first crossing


def test_summarize_reports_the_fixed_batch_loss_and_refuses_a_mix(tmp_path, capsys):
    for name, seed, fixed in (("a0", 0, 1.5), ("a1", 1, 1.7)):
        _run_folder(tmp_path / name, 8, seed, [3.0, 2.0])
        (tmp_path / name / "fixed_val.json").write_text(json.dumps({"val_loss": fixed}))
    rows = summarize.summarize([str(tmp_path / "a0"), str(tmp_path / "a1")])
    assert rows[0]["finals"] == [1.5, 1.7] and rows[0]["final"] == pytest.approx(1.6)
    _run_folder(tmp_path / "a2", 8, 2, [3.0, 2.0])  # no fixed_val.json: its final loss is another measurement
    with pytest.raises(SystemExit, match="some runs of all runs have fixed_val.json"):
        summarize.summarize([str(tmp_path / n) for n in ("a0", "a1", "a2")])


def test_summarize_groups_runs_of_train_py_versions_that_differ_only_in_unset_options(tmp_path):
    """A run of an older train.py (an option since removed, left unset) and of a newer one (an
    option added, left unset) are one group; an option set in one run only tells groups apart."""
    for name, seed, extra in (("old", 0, {"plot": None}), ("new", 1, {"val_seed": None}),
                              ("other", 2, {"val_seed": 0})):
        _run_folder(tmp_path / name, 8, seed, [3.0, 2.0])
        config = json.loads((tmp_path / name / "config.json").read_text())
        (tmp_path / name / "config.json").write_text(json.dumps({**config, **extra}))
    rows = summarize.summarize([str(tmp_path / n) for n in ("old", "new", "other")])
    assert [(r["label"], r["seeds"]) for r in rows] == [("val_seed=None", [0, 1]), ("val_seed=0", [2])]


def test_summarize_refuses_an_unfinished_run(tmp_path):
    _run_folder(tmp_path / "a0", 8, 0, [3.0, 2.0])
    config = json.loads((tmp_path / "a0" / "config.json").read_text())
    (tmp_path / "a0" / "config.json").write_text(json.dumps({**config, "max_steps": 50}))
    with pytest.raises(SystemExit, match="a0 has not finished"):
        summarize.summarize([str(tmp_path / "a0")])


def test_fixed_validation_batches_do_not_depend_on_the_run_seed(tmp_path):
    """Two runs that differ only in --seed are scored on the same batches: same model, same loss."""
    (tmp_path / "val.jsonl").write_text("".join(json.dumps({"text": f"document {i}: " + "abc " * 30}) + "\n"
                                                for i in range(6)))
    config = Config(**{**PRESETS["tiny"], "num_hidden_layers": 1, "n_routed_experts": 4, "num_experts_per_tok": 2})
    torch.manual_seed(0)
    model = KimiK2(config)
    losses = []
    for seed in (0, 1):
        run = tmp_path / f"run{seed}"
        model.save_pretrained(str(run / "hf"))
        (run / "config.json").write_text(json.dumps({"seed": seed, "batch_size": 4, "seq_len": 32, "data": "x",
                                                     "val_data": [str(tmp_path / "val.jsonl")],
                                                     "data_cache": str(tmp_path / "cache")}))
        losses.append(summarize.fixed_val_loss(str(run))["val_loss"])
        assert json.loads((run / "fixed_val.json").read_text())["val_loss"] == losses[-1]
    assert losses[0] == losses[1]
    tokens = summarize.validation_tokens(json.loads((tmp_path / "run0" / "config.json").read_text()))
    sampler = data.BatchSampler(tokens, 4, 32, seed=summarize.VAL_SEED)
    batches = sampler.windows // 4
    with torch.no_grad():
        expected = sum(model.eval()(*sampler.next())[1].item() for _ in range(batches)) / batches
    assert losses[0] == pytest.approx(expected, rel=1e-6)


# -----------------------------------------------------------------------------------------------
# Experiment (e): pretraining arms, fine-tuning, gate and scores


@pytest.fixture(scope="module")
def bios():
    return rephrasing.corpora(n_people=12, k=6, seed=3, ft_passes=4)


def test_arms_differ_only_in_their_biographies_and_state_each_fact_k_times(bios):
    everyone = bios["people"]
    for arm, docs in bios["pretrain"].items():
        text = "\n".join(docs)
        assert "Q: " not in text, arm  # pretraining is biographies only
        assert len(docs) == len(set(docs)), arm  # no exact duplicate for data.py to drop
        for person in everyone:
            for a in rephrasing.ATTRIBUTES:
                stated = sum(text.count(t.format(name=person["name"], value=person[a]))
                             for t in rephrasing.BIO_TEMPLATES[a])
                assert stated == 6, (arm, person["name"], a)
    entries = {arm: [b for d in docs for b in d.split("\n\n")] for arm, docs in bios["pretrain"].items()}
    assert len(entries["raw"]) == len(entries["rephrased1"]) == len(entries["rephrased"]) == 12 * 6
    assert len(set(entries["raw"])) == len(set(entries["rephrased1"])) == 12  # one text per person, k times
    assert len(set(entries["rephrased"])) == 12 * 6  # k different texts per person, once each
    assert set(entries["raw"]) < set(entries["rephrased"])  # the original is among the rewrites


def test_test_people_are_asked_about_only_after_fine_tuning_on_the_others(bios):
    everyone = bios["people"]
    trained, test = {p["name"] for p in everyone[:6]}, {p["name"] for p in everyone[6:]}
    fine_tuning = "\n".join(bios["finetune"])
    assert not any(name in fine_tuning for name in test) and all(name in fine_tuning for name in trained)
    assert all(q["name"] in test for name in ("qa", "qa_unseen") for q in bios["questions"][name])
    assert all(q["prompt"] + q["answer"] in fine_tuning for q in bios["questions"]["ft_seen"])
    assert {q["name"] for q in bios["questions"]["ft_seen"]} == trained


def test_unseen_question_forms_use_only_words_every_arms_training_text_contains(bios):
    unseen = bios["questions"]["qa_unseen"]
    assert len(unseen) == 6 * len(rephrasing.ATTRIBUTES)
    for arm, docs in bios["pretrain"].items():
        training = "\n".join(docs + bios["finetune"])
        for q in unseen:
            assert rephrasing.words(q["prompt"]) <= rephrasing.words(training), (arm, q["prompt"])
            assert q["prompt"] not in training  # the form itself is new
    # and the form is none of the trained ones, whatever the person
    for a, forms in rephrasing.QUESTIONS.items():
        assert forms[rephrasing.UNSEEN_QUESTION] not in [forms[i] for i in rephrasing.TRAINED_QUESTIONS]


def test_the_gate_asks_each_arm_for_the_facts_of_its_own_training_text(bios):
    for arm, items in bios["gate"].items():
        text = "\n".join(bios["pretrain"][arm])
        assert len(items) == 12 * len(rephrasing.ATTRIBUTES)
        for it in items:
            assert it["prompt"] + it["answer"] in text, arm  # the text up to the fact, then the fact
            assert it["prompt"].startswith(it["name"])
    raw_items = bios["gate"]["raw"]
    assert raw_items[1]["prompt"].endswith("was born in") and "'s birth date is" in raw_items[1]["prompt"]


def test_seeds_change_the_people_and_the_texts():
    a, b = rephrasing.corpora(8, 3, seed=0, ft_passes=2), rephrasing.corpora(8, 3, seed=1, ft_passes=2)
    assert [p["name"] for p in a["people"]] != [p["name"] for p in b["people"]]
    assert a["pretrain"]["rephrased"] != b["pretrain"]["rephrased"] and a["finetune"] != b["finetune"]
    assert rephrasing.corpora(8, 3, seed=0, ft_passes=2) == a  # and nothing else does


def test_run_pretrains_every_arm_on_equal_tokens_then_fine_tunes_them_alike(tmp_path, monkeypatch):
    """run() with train.py and the scoring replaced: the arms' pretraining commands differ only in the
    biography file and the folder, none needs more than one pass over its text, and every
    fine-tuning starts from its arm's final checkpoint with the same data and options."""
    planned = []

    def fake_train_all(runs, jobs=1):
        planned.append(runs)
        for folder in runs:
            os.makedirs(folder, exist_ok=True)
            open(os.path.join(folder, "ckpt_0000001.pt"), "w").close()

    monkeypatch.setattr(summarize, "train_all", fake_train_all)
    monkeypatch.setattr(rephrasing.KimiK2, "from_pretrained", classmethod(lambda cls, path: None))
    monkeypatch.setattr(rephrasing, "answer_losses", lambda model, pairs: [(1.0, False)] * len(pairs))  # tested below
    assert rephrasing.main(["run", "--people", "8", "--k", "3", "--ft-passes", "2", "--seeds", "5",
                            "--out", str(tmp_path)]) == 0
    pretraining, fine_tuning = planned

    def without(args, *options):
        return [a for i, a in enumerate(args) if a not in options and (i == 0 or args[i - 1] not in options)]
    assert len({tuple(without(args, "--data")) for args in pretraining.values()}) == 1
    args = next(iter(pretraining.values()))
    steps = int(args[args.index("--max-steps") + 1])
    for arm in rephrasing.ARMS:
        docs = [json.loads(line)["text"] for line in (tmp_path / "data-s5" / f"pretrain-{arm}.jsonl").open()]
        assert steps * rephrasing.TOKENS_PER_STEP <= rephrasing.tokens(docs) < (steps + 1.1) * rephrasing.TOKENS_PER_STEP
    assert len({tuple(without(args, "--init-from")) for args in fine_tuning.values()}) == 1
    for folder, args in fine_tuning.items():
        source = args[args.index("--init-from") + 1]
        assert os.path.dirname(source) == folder.replace("ft-", "pre-")
    scores = json.loads((tmp_path / "scores.json").read_text())["scores"]
    assert set(scores) == {f"{arm}-s5" for arm in rephrasing.ARMS}
    assert set(scores["raw-s5"]) == {"gate", "ft_seen", "qa", "qa_unseen"}


class _Bigram(nn.Module):
    """A stand-in model whose logits at a position depend on that position's token only."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, ids):
        return self.table[ids], None


def _answer_loss(table, prompt, answer):
    """The answer's loss under _Bigram(table), summed over its tokens, by hand."""
    sequence = list((prompt + answer).encode())
    return -sum(torch.log_softmax(table[sequence[i - 1]], -1)[sequence[i]].item()
                for i in range(len(prompt.encode()), len(sequence)))


def test_answer_losses_score_exactly_the_answer_tokens():
    torch.manual_seed(0)
    table = torch.randn(256, 256)
    pairs = [("Q: Who?\nA:", " Ada."), ("Zofia Abbott was born in", " Lima.")]
    encoded = [(list(p.encode()), list(a.encode())) for p, a in pairs]
    result = rephrasing.answer_losses(_Bigram(table), encoded)
    assert [loss for loss, _ in result] == pytest.approx([_answer_loss(table, p, a) for p, a in pairs], rel=1e-5)
    assert [exact for _, exact in result] == [False, False]
    # make the greedy continuation of the second prompt exactly its answer
    sequence = list("".join(pairs[1]).encode())
    for prev, nxt in zip(sequence[len(pairs[1][0]) - 1:], sequence[len(pairs[1][0]):]):
        table[prev, nxt] = 100.0
    assert [exact for _, exact in rephrasing.answer_losses(_Bigram(table), encoded)] == [False, True]
    # changing the prompt's own predictions changes nothing: only answer tokens are scored
    before = rephrasing.answer_losses(_Bigram(table), encoded)
    table[ord("Q"), ord(":")] += 5.0
    assert rephrasing.answer_losses(_Bigram(table), encoded) == before


def test_person_contrast_counts_wins_of_the_true_value_against_the_groups_other_values():
    """A stand-in whose bigram table favours one letter after a space: the value starting with it
    has the lowest answer loss, so exactly the questions whose true value starts with it are won."""
    group = [{"name": n, "birth_city": c, **{a: "x" for a in rephrasing.ATTRIBUTES if a != "birth_city"}}
             for n, c in (("Ada", "Lima"), ("Bo", "Oslo"), ("Cy", "Perth"), ("Di", "Lima"))]
    items = [rephrasing.question(p, "birth_city", 0) for p in group]
    table = torch.zeros(256, 256)
    table[ord(" "), ord("O")] = 10.0  # after " A:" + " ", "O" is far likelier: Oslo wins every comparison
    win, chance = rephrasing.person_contrast(_Bigram(table), items, group)
    assert win == pytest.approx(1 / 4)  # only Bo's question (true value Oslo) is won
    assert chance == pytest.approx(1 / 3)  # three distinct cities: Lima, Oslo, Perth
    # checked by hand for Ada: Oslo's loss is below Lima's, so the true value loses
    prompt = items[0]["prompt"]
    assert _answer_loss(table, prompt, " Oslo.") < _answer_loss(table, prompt, " Lima.")
    # a uniform model ties every value of equal length: a tie is not a win
    assert rephrasing.person_contrast(_Bigram(torch.zeros(256, 256)), items[:1], group[:2])[0] == 0


def test_exact_match_is_greedy_decoding_and_padding_changes_no_score():
    config = Config(**{**PRESETS["tiny"], "num_hidden_layers": 2, "n_routed_experts": 4, "num_experts_per_tok": 2})
    torch.manual_seed(0)
    model = KimiK2(config).eval()
    prompt = list(b"Umar Novak works for")
    greedy = model.generate(torch.tensor([prompt]), 5, temperature=0)[0, len(prompt):].tolist()
    wrong_last = greedy[:-1] + [(greedy[-1] + 1) % 256]
    pairs = [(prompt, greedy), (prompt, wrong_last), (prompt + list(b" the company"), list(b" Lumen Optics."))]
    together = rephrasing.answer_losses(model, pairs)
    alone = [rephrasing.answer_losses(model, [pair])[0] for pair in pairs]
    assert [exact for _, exact in alone] == [True, False, False] == [exact for _, exact in together]
    # a padded batch and one pair at a time run different kernels on different shapes: close, not bitwise
    assert [loss for loss, _ in together] == pytest.approx([loss for loss, _ in alone], rel=1e-4)


def test_report_refuses_a_scores_json_that_run_did_not_write_in_one_line(tmp_path):
    """Flipped bytes, a cut file and another program's JSON each end in one line naming the file."""
    path = tmp_path / "scores.json"
    for bad in (b'{"settings": {"people": 4\xdf', b'{"settings": {"peo', b'{"a": 1}'):
        path.write_bytes(bad)
        with pytest.raises(SystemExit) as stop:
            rephrasing.main(["report", "--out", str(tmp_path)])
        assert str(stop.value).startswith(f"{path}: not a scores.json that `run` wrote (") and "\n" not in str(stop.value)
