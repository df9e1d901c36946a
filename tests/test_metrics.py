"""Official metrics on hand-worked cases; every number below is worked out in the comment beside it."""

from __future__ import annotations

import json
import random

import pytest

from sdrt_cli.data import Dataset, Example
from sdrt_cli.errors import SdrtError
from sdrt_cli.metrics import aggregate, check_scorable, get_metric, metric_names, write_submission
from sdrt_cli.metrics.anls import anls_score
from sdrt_cli.metrics.mmmu import domain_of, extract_numbers, fallback_rng, parse_multiple_choice, parse_open
from sdrt_cli.metrics.relaxed import relaxed_correct


def example(answers, example_id="q1", **metadata) -> Example:
    return Example(id=example_id, images=[], question="?", answers=list(answers), metadata=metadata)


# ---------------------------------------------------------------- lookup


def test_registry_names_and_did_you_mean():
    assert set(metric_names()) >= {"anls", "relaxed_accuracy", "yes_no_accuracy", "mmmu", "exact"}
    with pytest.raises(SdrtError, match=r"unknown metric 'ansl'.*Did you mean 'anls'\?"):
        get_metric("ansl")


# ---------------------------------------------------------------- ANLS


@pytest.mark.parametrize(
    "prediction, answers, expected",
    [
        ("Hello   World", ["hello world"], 1.0),  # case and repeated spaces are normalised away
        # normalised "ab" vs "abc": distance 1; denominator is the RAW length max(3, len("  ab  ")=6)
        ("  ab  ", ["abc"], 1 - 1 / 6),
        ("ab", ["abcd"], 0.5),  # distance 2 / 4 = 0.5 -> similarity exactly 0.5 is kept
        ("ab", ["abcde"], 0.0),  # distance 3 / 5 -> similarity 0.4 < 0.5 -> 0
        ("", ["abc"], 0.0),  # empty prediction: distance 3 / 3
        ("", [""], 1.0),  # both empty: the official script counts distance 0
        ("1990", ["12/02/1990", "1990", "feb 1990"], 1.0),  # best over several gold answers
        ("feb 199", ["12/02/1990", "feb 1990"], 1 - 1 / 8),  # one insertion against "feb 1990"
        # "straße".upper() is "STRASSE": the raw-length denominator is 7, distance ß->s + insert e = 2
        ("strasse", ["straße"], 1 - 2 / 7),
    ],
)
def test_anls_hand_worked(prediction, answers, expected):
    assert anls_score(prediction, answers) == pytest.approx(expected)
    assert get_metric("anls").score(prediction, example(answers)) == pytest.approx(expected)


def test_anls_parse_records_the_stripped_text():
    assert get_metric("anls").parse("  Form 7 \n", example(["x"])) == "Form 7"


# ---------------------------------------------------------------- relaxed accuracy


@pytest.mark.parametrize(
    "prediction, target, expected",
    [
        ("12", "12.5", True),  # |12 - 12.5| / 12.5 = 0.04
        ("11.8", "12.5", False),  # 0.7 / 12.5 = 0.056
        ("95", "100", True),  # exactly 5% is still right
        ("45%", "0.45", True),  # a trailing % divides by 100
        ("0.45", "45%", True),
        ("45", "45%", False),  # 45 against 0.45
        ("0", "0", True),  # zero target: exact string match
        ("0.0", "0", False),  # ... so a numerically equal "0.0" is wrong
        ("0.01", "0", False),
        ("1,000", "1000", False),  # float() refuses thousands separators -> string match fails
        ("1,000", "1,000", True),
        ("Yes", "yes", True),  # words: case-insensitive exact match
        ("yes.", "yes", False),
        ("", "5", False),  # empty prediction
        (" 12\n", "12", True),  # decoded generations keep surrounding whitespace; stripped
        ("-5.1", "-5", True),  # negative target: relative change 0.1 / 5 = 0.02
    ],
)
def test_relaxed_correct_hand_worked(prediction, target, expected):
    assert relaxed_correct(prediction, target) is expected


def test_relaxed_accuracy_takes_the_best_gold_answer():
    metric = get_metric("relaxed_accuracy")
    assert metric.score("7", example(["5", "7.2"])) == 1.0  # 2/5 = 0.4 against the first, 0.2/7.2 = 0.028 the second
    assert metric.score("3", example(["5", "7.2"])) == 0.0  # 0.4 and 0.58
    assert metric.score("yes", example(["No", "Yes"])) == 1.0
    # years are numbers too: 2100 is within 5% of 2018 (82 / 2018 = 0.041), as pix2struct scores it
    assert metric.score("2100", example(["2018"])) == 1.0


# ---------------------------------------------------------------- yes/no


@pytest.mark.parametrize(
    "prediction, parsed",
    [
        ("Yes.", "yes"),
        ("no, it is not", "no"),
        ("The answer is yes", "yes"),
        ("False", "no"),
        ("Not sure", ""),  # "not" is not "no"
        ("", ""),
        ("maybe", ""),
    ],
)
def test_yes_no_parse(prediction, parsed):
    assert get_metric("yes_no_accuracy").parse(prediction, example(["yes"])) == parsed


def test_yes_no_score_accepts_raw_figureqa_labels():
    metric = get_metric("yes_no_accuracy")
    assert metric.score("Yes", example(["1"])) == 1.0
    assert metric.score("No", example(["0"])) == 1.0
    assert metric.score("No", example(["yes"])) == 0.0
    assert metric.score("", example(["no"])) == 0.0  # an empty answer is never right


# ---------------------------------------------------------------- MMMU multiple choice

OPTIONS = ["cat", "dog", "bird", "fish"]


def mc(prediction, example_id="validation_Biology_1"):
    return parse_multiple_choice(prediction, OPTIONS, fallback_rng(example_id))


@pytest.mark.parametrize(
    "prediction, letter",
    [
        ("B", "B"),
        ("B.", "B"),  # edge punctuation stripped
        ("'B'", "B"),
        ("(B) dog", "B"),  # bracket tier
        ("The answer is (A), no wait, (C)", "C"),  # several in brackets: the last one
        ("(C) B", "C"),  # the bracket tier beats the bare-letter tier
        ("A or B", "B"),  # bare letters between spaces: the last one
        ("I think the animal shown is clearly a dog here", "B"),  # > 5 words: option text
        ("not a cat, the picture shows a dog", "B"),  # several option texts: the last one
    ],
)
def test_mmmu_multiple_choice_tiers(prediction, letter):
    assert mc(prediction) == letter


def test_mmmu_multiple_choice_random_fallback_is_seeded_per_example():
    # "it is a dog" has only 4 words, so the option-text tier does not apply: random fallback
    expected = random.Random("42:validation_Biology_1").choice(["A", "B", "C", "D"])
    assert mc("it is a dog") == expected
    assert mc("I do not know") == expected  # same example, same draw, whatever the text
    # the official script does not strip whitespace: "B.\n" keeps its "." and finds no " B "
    assert mc("B.\n") == expected
    draws = {mc("no idea", example_id=f"validation_Biology_{i}") for i in range(60)}
    assert draws == {"A", "B", "C", "D"}  # a uniform choice over the letters, not a constant


def test_mmmu_multiple_choice_without_options_parses_to_nothing():
    assert parse_multiple_choice("A", [], fallback_rng("x")) == ""


def test_mmmu_metric_multiple_choice_score_and_parse():
    metric = get_metric("mmmu")
    item = example(["B"], "validation_Biology_1", question_type="multiple-choice", options=OPTIONS)
    assert metric.parse("(B) dog", item) == "B"
    assert metric.score("(B) dog", item) == 1.0
    assert metric.score("(C) bird", item) == 0.0


# ---------------------------------------------------------------- MMMU open answers


def test_extract_numbers_official_patterns():
    # comma-grouped first, then scientific, then plain numbers not followed by "," or a digit
    # (so the plain pattern also finds the "567" tail of 1,234,567 and the exponent "8" of 3e8)
    assert extract_numbers("total 1,234,567 and 3e8 or 2.5 and .5") == ["1,234,567", "3e8", "567", "8", "2.5", ".5"]


@pytest.mark.parametrize(
    "prediction, gold, correct",
    [
        ("The answer is 5", ["5"], True),  # key tail "5" -> 5.0
        ("The answer is 5", ["5.004"], True),  # numbers are compared rounded to 2 decimals
        ("The answer is 5", ["5.01"], False),
        ("Therefore the total is 1,234,567 dollars", ["1234567"], True),  # commas in numbers
        ("The speed is 3e8 m/s", ["300000000"], True),
        ("x = 2 + 3 = 5", ["5"], True),  # "=" counts in the last line
        ("Step 1: a = 3\nSo the result is 7", ["3"], False),  # ... and only in the last line
        ("Step 1: a = 3\nSo the result is 7", ["7"], True),
        ("The disease shown is Hepatitis.", ["hepatitis"], True),  # gold text inside the candidate
        # the shortest tail after "is " is taken, and "hepatit-is b" ends in "is b": the candidate is "b"
        ("The diagnosis is Hepatitis B.", ["hepatitis"], False),
        ("c", ["C"], True),  # one character: padded " c" / "c " on both sides
        ("abc", ["c"], False),  # ... so it does not match inside a word
        ("MgS", ["$MgS$", "MgS"], True),  # several gold answers
        ("", ["5"], False),  # empty prediction
        ("", ["abc"], False),
        # lmms-eval's wrapper scored this 0 (it iterated the characters of the first candidate)
        ("Therefore the answer is 0.5", ["0.5"], True),
    ],
)
def test_mmmu_open_answers(prediction, gold, correct):
    metric = get_metric("mmmu")
    item = example(gold, question_type="open", options=[])
    assert metric.score(prediction, item) == float(correct)


def test_mmmu_open_parse_lists_candidates():
    assert parse_open("Therefore the total is 1,234,567 dollars") == ["1,234,567 dollars", 1234567.0, 567.0]
    assert get_metric("mmmu").parse("so it is 4", example(["4"], question_type="open")) == "4.0"


def test_mmmu_domains():
    assert domain_of("Math") == "Science"
    assert domain_of("Art_Theory") == "Art and Design"
    assert domain_of("Diagnostics_and_Laboratory_Medicine") == "Health and Medicine"
    assert domain_of("Astrology") is None


# ---------------------------------------------------------------- refusal, aggregation, submissions


def test_scoring_an_example_without_answers_is_refused():
    with pytest.raises(SdrtError, match="example 'q9' has no gold answers"):
        get_metric("anls").score("x", example([], "q9"))


class HiddenSplit(Dataset):
    name = "hidden"

    def __iter__(self):
        for i in (3, 1, 2):
            yield Example(id=str(i), images=[], question=f"q{i}")

    @property
    def has_answers(self):
        return False


def test_check_scorable_refuses_hidden_split():
    with pytest.raises(SdrtError, match="hidden split 'test' has no answers"):
        check_scorable(HiddenSplit(split="test"))


def test_write_submission_in_dataset_order(tmp_path):
    dataset = HiddenSplit(split="test")
    path = write_submission(tmp_path / "sub" / "docvqa_test.json", dataset, {"1": "one", "2": "two", "3": "three"})
    assert json.loads(path.read_text()) == [
        {"questionId": 3, "answer": "three"},
        {"questionId": 1, "answer": "one"},
        {"questionId": 2, "answer": "two"},
    ]
    write_submission(path, dataset, ["c", "a", "b"])  # a list follows the dataset's order
    assert [r["answer"] for r in json.loads(path.read_text())] == ["c", "a", "b"]
    assert not list(path.parent.glob(".*tmp"))  # written through a temp file, none left behind


def test_write_submission_needs_every_question(tmp_path):
    with pytest.raises(SdrtError, match=r"lacks answers for 1 of 3 questions \(first: '2'\)"):
        write_submission(tmp_path / "s.json", HiddenSplit(split="test"), {"1": "a", "3": "c"})
    with pytest.raises(SdrtError, match="needs 3 answers in dataset order, got 2"):
        write_submission(tmp_path / "s.json", HiddenSplit(split="test"), ["a", "b"])
    assert not (tmp_path / "s.json").exists()


def test_aggregate_overall_and_categories():
    scores = [1.0, 0.0, 1.0, 1.0]
    categories = [
        {"subset": "human"},
        {"subset": "human"},
        {"subset": "augmented"},
        {"subset": "augmented"},
    ]
    report = aggregate(scores, categories)
    assert report["overall"] == 0.75 and report["count"] == 4
    assert report["categories"]["subset"] == {
        "augmented": {"score": 1.0, "count": 2},
        "human": {"score": 0.5, "count": 2},
    }


def test_aggregate_mmmu_micro_averages_subjects_and_domains():
    # Math 2/3, Physics 0/1 -> Science is 2/4 (micro), not the mean of 0.667 and 0 (macro)
    rows = [("Math", 1), ("Math", 1), ("Math", 0), ("Physics", 0), ("Art", 1)]
    scores = [float(s) for _, s in rows]
    categories = [{"subject": subject, "domain": domain_of(subject)} for subject, _ in rows]
    report = aggregate(scores, categories)
    assert report["categories"]["subject"]["Math"]["score"] == pytest.approx(2 / 3)
    assert report["categories"]["domain"]["Science"] == {"score": 0.5, "count": 4}
    assert report["categories"]["domain"]["Art and Design"] == {"score": 1.0, "count": 1}
    assert report["overall"] == pytest.approx(3 / 5)


def test_aggregate_counts_a_question_in_each_of_its_types():
    report = aggregate([1.0, 0.5], [{"question_type": ["form", "handwritten"]}, {"question_type": ["form"]}])
    assert report["categories"]["question_type"]["form"] == {"score": 0.75, "count": 2}
    assert report["categories"]["question_type"]["handwritten"] == {"score": 1.0, "count": 1}


def test_aggregate_edge_cases():
    assert aggregate([]) == {"overall": None, "count": 0, "categories": {}}
    with pytest.raises(SdrtError, match="2 scores but 1 category records"):
        aggregate([1.0, 0.0], [{}])


# ---------------------------------------------------------------- extracted relaxed accuracy (synthetic-charts)

LABELS = ["Agree", "Neutral", "Disagree", "Unsure"]


@pytest.mark.parametrize(
    "prediction, gold, parsed, score",
    [
        ("The pie chart has 4 slices.", "4", "4", 1.0),  # the example: last number 4
        ("4", "4", "4", 1.0),
        ("There are 3 bars, not 4 slices... I count 5.", "4", "5", 0.0),  # the LAST number is read
        ("Agree exceeds Neutral by 12 percentage points.", "12", "12", 1.0),
        ("The share is about 23%.", "23", "23", 1.0),  # % removed: shares are written without it
        ("The value is 1,250.", "1240", "1250", 1.0),  # thousands separator; 10 / 1240 = 0.8% <= 5%
        ("The value is 1,250.", "1000", "1250", 0.0),  # 250 / 1000 = 25%
        ("It went from 2019 to -3.5", "-3.5", "-3.5", 1.0),
        ("I cannot tell.", "4", "", 0.0),  # nothing to read is wrong, not guessed
        ("Yes, it is.", "Yes", "yes", 1.0),
        ("No.", "Yes", "no", 0.0),
        ("The answer is no", "No", "no", 1.0),
        ("Disagree has the highest value.", "Disagree", "Disagree", 1.0),
        ("The highest is disagree, then Agree.", "Disagree", "Disagree", 1.0),  # case-insensitive, first mention
        ("Agree, Neutral, Disagree and Unsure.", "Disagree", "Agree", 0.0),  # listing every label reads the first
        ("Agreement is highest.", "Agree", "", 0.0),  # whole words only: "Agreement" is not "Agree"
    ],
)
def test_extracted_relaxed_accuracy_hand_worked(prediction, gold, parsed, score):
    metric = get_metric("extracted_relaxed_accuracy")
    item = example([gold], candidates=LABELS)
    assert metric.parse(prediction, item) == parsed
    assert metric.score(prediction, item) == score


def test_extracted_relaxed_accuracy_without_candidates_reads_the_gold_words():
    metric = get_metric("extracted_relaxed_accuracy")
    assert metric.score("I think New York.", example(["New York"])) == 1.0
    assert metric.parse("New York, then New", example(["New", "New York"])) == "New York"  # same start: longer wins


def test_extracted_relaxed_accuracy_reads_a_numeric_label_as_a_label():
    metric = get_metric("extracted_relaxed_accuracy")
    item = example(["2019"], candidates=["2018", "2019", "2020"])
    assert metric.parse("The value is highest in 2019, at 45.", item) == "2019"  # not the last number, 45


def test_synthetic_charts_examples_name_their_candidate_labels():
    from sdrt_cli.data import open_dataset

    dataset = open_dataset("synthetic-charts", split="validation", limit=20)
    metric = get_metric(dataset.metric)
    for item in dataset:
        assert item.metadata["candidates"] == list(item.metadata["values"])
        gold = item.answers[0]
        # a sentence around the gold answer reads back as the gold answer
        assert metric.score(f"Looking at the chart, the answer is {gold}.", item) == 1.0, item.id
