"""The model-free parts of `sdrt calibrate`, on hand-worked cases: the judge's verdict, Eq. 5 with
both orders, Eq. 6's difficult/easy split, the ROUGE-L filter, balancing and the pools' update; the
role templates; a pool read as a dataset."""

from __future__ import annotations

import json

import pytest

from sdrt_cli import calibration
from sdrt_cli.assessment import Assessment
from sdrt_cli.errors import SdrtError


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The scores for Assistant 1 and 2 are 8 and 6, respectively.", (8.0, 6.0)),
        ("the scores for assistant 1 and 2 are [7] and [9], respectively", (7.0, 9.0)),
        ("**The scores for Assistant 1 and 2 are 7.5 and 3**", (7.5, 3.0)),
        ("Reasoning...\nThe scores for Assistant 1 and\n2 are 10/10 and 4/10.", (10.0, 4.0)),
        ("The scores for Assistant 1 and Assistant 2 are 5 and 5.", (5.0, 5.0)),
        ("The score for Assistant 1 and 2 is: 2, 9", (2.0, 9.0)),
        # the same verdict twice is still one verdict
        ("The scores for Assistant 1 and 2 are 8 and 6. To repeat: the scores for Assistant 1 and 2 are 8 and 6.", (8.0, 6.0)),
    ],
)
def test_the_verdict_sentence_is_read_through_formatting(text, expected):
    assert calibration.parse_judge_scores(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Assistant 1 is better.",
        "The scores for Assistant 1 and 2 are [Assistant 1 score] and [Assistant 2 score], respectively.",  # the template echoed
        "The scores for Assistant 1 and 2 are 11 and 6.",  # off the 1-10 scale
        "The scores for Assistant 1 and 2 are 0 and 6.",
        "Assistant 1: 8, Assistant 2: 6",  # not the asked-for sentence: not guessed
        "The scores for Assistant 1 and 2 are 8 and 6. The scores for Assistant 1 and 2 are 3 and 9.",  # two verdicts disagree
    ],
)
def test_an_unreadable_verdict_is_none(text):
    assert calibration.parse_judge_scores(text) is None


def test_eq5_averages_both_orders_with_positions_exchanged():
    # teacher first: teacher 8, student 4; student first: student 6, teacher 9
    result = calibration.judge(
        "The scores for Assistant 1 and 2 are 8 and 4.",
        "The scores for Assistant 1 and 2 are 6 and 9.",
    )
    assert result.parsed == 2
    assessment = result.assessment()
    assert assessment == Assessment(teacher=8.5, student=5.0)
    # Eq. 6: (|5 - 8.5| + 1) / 8.5
    assert assessment.difficulty() == pytest.approx(4.5 / 8.5)


def test_one_unreadable_order_excludes_the_instruction():
    result = calibration.judge("The scores for Assistant 1 and 2 are 8 and 4.", "I cannot decide.")
    assert result.parsed == 1
    assert result.assessment() is None


@pytest.mark.parametrize(
    "teacher, student, tau, difficult",
    [
        (1, 1, 0.33, True),  # both poor: (0 + 1) / 1 = 1
        (9, 9, 0.33, False),  # both good: 1 / 9 = 0.11
        (9, 6, 0.33, True),  # (3 + 1) / 9 = 0.444
        (10, 8, 0.33, False),  # 3 / 10 = 0.3
        (10, 10, 0.0, True),  # tau 0: everything is difficult
        (1, 1, 1.0, True),  # S = 1 reaches tau 1
        (9, 6, 1.0, False),
    ],
)
def test_difficult_means_eq6_at_least_tau(teacher, student, tau, difficult):
    assert calibration.is_difficult(Assessment(teacher, student), tau) is difficult


def test_rouge_l_filter_rejects_near_copies_of_any_instruction_of_the_image():
    others = [("c-1", "What is the value of the red bar?"), ("c-2", "Which bar is the tallest?")]
    # 7 of 8 words in order with c-1: F = 7/8 >= 0.7
    accepted, reason = calibration.diversity_check("What is the value of the blue bar?", others)
    assert not accepted and "c-1" in reason and "0.88" in reason
    accepted, reason = calibration.diversity_check("How many bars are shorter than ten?", others)
    assert accepted and reason is None
    # exactly at the limit is rejected: "a b c d e f g" vs "a b c d e x y z" -> LCS 5, P 5/8, R 5/7
    assert calibration.rouge_l("a b c d e f g", "a b c d e x y z") == pytest.approx(2 * (5 / 8) * (5 / 7) / (5 / 8 + 5 / 7))
    assert calibration.diversity_check("q", [], limit=0.7) == (True, None)


def test_the_generated_question_is_its_first_line_without_a_label():
    assert calibration.clean_generated_question('\n Created Question: "How tall is bar B?"\nAnswer: 4') == "How tall is bar B?"
    assert calibration.clean_generated_question("   \n  ") == ""


def test_balance_samples_as_many_easy_as_difficult_reproducibly():
    easy = [f"e{i}" for i in range(10)]
    first = calibration.balance(3, easy, seed=0, iteration=1)
    assert len(first) == 3 and first == sorted(first, key=easy.index)
    assert calibration.balance(3, easy, seed=0, iteration=1) == first
    assert calibration.balance(20, easy, seed=0, iteration=1) == easy  # fewer easy than difficult: all of them
    assert calibration.balance(0, easy, seed=0, iteration=1) == easy  # nothing difficult (tau = 1): easy alone
    assert calibration.balance(2, [], seed=0, iteration=1) == []


def _row(id_, label=None, parent=None):
    return {"id": id_, "parent_id": parent, "label": label}


def test_update_pools_replaces_parents_keeps_unreplaced_difficult_and_balances_easy():
    cache = [_row("a", "difficult"), _row("b", "difficult"), _row("c", "easy"), _row("d", "easy"), _row("e", "easy"), _row("f", None)]
    tuning = [_row(i) for i in "abcdef"]
    accepted = [_row("a~a1", parent="a")]
    update = calibration.update_pools(tuning, cache, accepted, seed=0, iteration=1)
    ids = [row["id"] for row in update.tuning]
    # a replaced by a~a1; b (difficult, no accepted replacement) stays; 2 of 3 easy; f (excluded) stays
    assert "a" not in ids and "a~a1" in ids and "b" in ids and "f" in ids
    assert len(update.sampled_easy) == 2 and set(update.sampled_easy) <= {"c", "d", "e"}
    assert len(ids) == 1 + 1 + 2 + 1
    assert [row["id"] for row in update.cache] == list("abcdef") + ["a~a1"]


def test_the_shipped_role_packs_load(tmp_path):
    from sdrt_cli.roles import builtin_role_packs, load_role_pack

    assert builtin_role_packs()
    for name in builtin_role_packs():
        pack = load_role_pack(name)
        rendered = pack.assessor.render(question="Q?", answer_1="one", answer_2="two")
        assert "Q?" in rendered and "one" in rendered and calibration.parse_judge_scores(rendered) is None
        assert "Q?" in pack.augmentor.render(question="Q?")


ROLE_PACK = """
name = "mine"
version = "1"
description = "d"
[assessor]
system = ""
user = "{question} {answer_1} {answer_2} The scores for Assistant 1 and 2 are X and Y"
[augmentor]
system = "s"
user = "{question}"
"""


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.replace("{answer_2} ", ""), "must contain the {answer_2} placeholder"),
        (lambda t: t.replace('user = "{question}"', 'user = "{question} {answer}"'), "'augmentor.user' uses placeholder {answer}"),
        (lambda t: t.replace("The scores for Assistant 1 and 2 are", "Rate them"), "must ask for the verdict"),
        (lambda t: "extra = 1\n" + t, "'extra' is not a field"),
        (lambda t: t.replace('name = "mine"', 'name = "Mine!"'), "must be a slug"),
        (lambda t: t.replace('system = "s"', 'system = "{question"'), "unbalanced braces"),
        (lambda t: t.replace("[augmentor]", "[augmentorr]"), "'augmentorr' is not a field"),
    ],
)
def test_a_bad_role_pack_is_one_sentence_naming_file_and_field(tmp_path, edit, message):
    from sdrt_cli.roles import load_role_pack

    good = tmp_path / "good.toml"
    good.write_text(ROLE_PACK)
    assert load_role_pack(str(good)).name == "mine"
    bad = tmp_path / "bad.toml"
    bad.write_text(edit(ROLE_PACK))
    with pytest.raises(SdrtError) as info:
        load_role_pack(str(bad))
    assert message in str(info.value) and str(bad) in str(info.value)


def test_an_unknown_role_pack_name_is_refused():
    from sdrt_cli.roles import load_role_pack

    with pytest.raises(SdrtError, match="did you mean 'mmdc'"):
        load_role_pack("mmcd")


def _write_pool(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_pool_reads_as_a_dataset_with_the_source_images_and_no_scoring(tmp_path):
    from sdrt_cli.data import open_dataset

    source = open_dataset("synthetic-charts", split="train", size=6)
    src = list(source)
    pool = tmp_path / "tuning.jsonl"
    _write_pool(pool, [
        {"id": src[2].id, "parent_id": None, "image": {"index": 2, "id": src[2].id}, "question": src[2].question, "origin": "dataset", "status": "accepted"},
        {"id": "x~a1", "parent_id": src[2].id, "image": {"index": 2, "id": src[2].id}, "question": "How many bars?", "origin": "augmented", "status": "accepted"},
        {"id": "y~a1", "parent_id": src[0].id, "image": {"index": 0, "id": src[0].id}, "question": "Nope", "origin": "augmented", "status": "rejected"},
    ])
    data = open_dataset("pool", split=None, pool=str(pool), source="synthetic-charts", source_split="train", size=6)
    examples = list(data)
    assert [e.id for e in examples] == [src[2].id, "x~a1"] and list(data.ids()) == [src[2].id, "x~a1"]
    assert examples[1].question == "How many bars?" and examples[1].answers == []  # no gold for generated questions
    assert examples[0].answers == src[2].answers
    assert examples[1].images[0].tobytes() == src[2].images[0].tobytes()
    assert data.format_question(examples[1]) == source.format_question(src[2]).replace(src[2].question, "How many bars?")
    assert data.metric == source.metric and not data.has_answers


def test_a_pool_whose_image_reference_does_not_match_the_source_is_refused(tmp_path):
    from sdrt_cli.data import open_dataset

    pool = tmp_path / "p.jsonl"
    _write_pool(pool, [{"id": "a", "image": {"index": 1, "id": "not-that-one"}, "question": "Q?"}])
    data = open_dataset("pool", pool=str(pool), source="synthetic-charts", source_split="train", size=3)
    with pytest.raises(SdrtError, match="refers to example 'not-that-one' at index 1"):
        list(data)
    pool.write_text('{"id": "a", "question": "Q?"}\n')
    with pytest.raises(SdrtError, match=r"p.jsonl, line 1: field 'image' is missing"):
        open_dataset("pool", pool=str(pool), source="synthetic-charts", size=3)
