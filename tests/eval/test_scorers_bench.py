"""The MME, MMBench, SEED-Bench, LLaVA-Bench and MM-Vet scoring rules, each on hand-worked examples."""

from __future__ import annotations

import logging

import pytest

from fastllava.eval.scorers import (
    MME_COGNITION, MME_PERCEPTION, llava_bench_summary, mme_scores, mme_yes_no, mmbench_circular, mmbench_option,
    mmvet_parse_score, mmvet_totals, parse_two_scores, seed_accuracy, seed_correct)


@pytest.mark.parametrize("prediction, label", [
    ("Yes", "yes"), ("no", "no"), ("YES.", "yes"), ("Yes, there is a dog.", "yes"),
    ("Not sure", "no"),          # "no" within the first 4 characters
    ("nope", "no"), ("yesno", "yes"),  # "yes" is looked for first
    ("There is a dog", "other"), ("The answer is yes", "other"),  # only the first 4 characters count
    ("", "other"),
])
def test_mme_yes_no(prediction, label):
    assert mme_yes_no(prediction) == label


def _mme(category, image, answer, prediction):
    return {"category": category, "image": image, "answer": answer, "prediction": prediction}


def test_mme_scores_acc_and_acc_plus(caplog):
    rows = [
        # existence: image 1 both right, image 2 one right -> acc 3/4, acc+ 1/2 -> 75 + 50
        _mme("existence", "e1", "Yes", "Yes"), _mme("existence", "e1", "No", "No"),
        _mme("existence", "e2", "No", "Yes"), _mme("existence", "e2", "Yes", "Yes"),
        # count: "other" is wrong: acc 1/2, acc+ 0 -> 50
        _mme("count", "c1", "Yes", "Maybe"), _mme("count", "c1", "No", "no"),
        # code_reasoning: both right -> 200
        _mme("code_reasoning", "k1", "Yes", "yes"), _mme("code_reasoning", "k1", "No", "No, it is not."),
    ]
    with caplog.at_level(logging.WARNING):
        scores = mme_scores(rows)
    assert scores["subtasks"] == {"existence": 125.0, "count": 50.0, "code_reasoning": 200.0}
    assert scores["perception"] == 175.0 and scores["cognition"] == 200.0
    assert "8 of 10 subtasks have no answers" in caplog.text and "3 of 4" in caplog.text


def test_mme_names_and_checks():
    assert len(MME_PERCEPTION) == 10 and len(MME_COGNITION) == 4 and "OCR" in MME_PERCEPTION
    with pytest.raises(ValueError, match="Yes or No"):
        mme_scores([_mme("OCR", "o1", "Maybe", "yes")])


OPTIONS = {"A": "red", "B": "green", "C": "blue", "D": "yellow"}


@pytest.mark.parametrize("prediction, letter", [
    ("B", "B"), ("B.", "B"), ("B. green", "B"), ("The answer is (C).", "C"), ("D: yellow", "D"),
    ("A cat", "A"),            # a lone capital A reads as the letter, as MMBench's evaluator reads it
    ("E", "E"),                # E is among the letters looked for, and is never right
    ("b", None),               # lower case is no letter; "b" is no option text either
    ("green", "B"),            # no letter: the one option text found in the prediction
    ("It is Green.", "B"),     # option texts match case-insensitively
    ("B or C", None),          # two letters, and no option text
    ("red and green", None),   # two option texts
    ("Sorry, I can't help with images of people yet.", "E"),
])
def test_mmbench_option(prediction, letter):
    assert mmbench_option(prediction, OPTIONS) == letter


def _rot(index, answer, prediction, options=("red", "green", "blue", "yellow")):
    return {"index": index, "answer": answer, "prediction": prediction, **dict(zip("ABCD", options))}


def test_mmbench_circular_needs_every_rotation(caplog):
    rows = [  # question 0: right in all four rotations
        _rot(0, "A", "A"), _rot(1_000_000, "D", "D"), _rot(2_000_000, "C", "C. blue"), _rot(3_000_000, "B", "green"),
        # question 1: wrong in one rotation
        _rot(1, "B", "B"), _rot(1_000_001, "A", "C"),
        # question 2: one rotation names no option: wrong without the server's ChatGPT matching
        _rot(2, "A", "A"), _rot(1_000_002, "D", "I cannot tell"),
    ]
    with caplog.at_level(logging.WARNING):
        assert mmbench_circular(rows) == pytest.approx(100 / 3)
    assert "1 prediction(s) name no option" in caplog.text and "1000002" in caplog.text
    assert mmbench_circular(rows[:4]) == 100.0
    with pytest.raises(ValueError, match="index < 1000000"):
        mmbench_circular(rows[1:4])


def test_mmbench_circular_two_options():
    rows = [{"index": 5, "answer": "B", "prediction": "no", "A": "yes", "B": "no", "C": None, "D": None},
            {"index": 1_000_005, "answer": "A", "prediction": "A", "A": "no", "B": "yes", "C": None, "D": None}]
    assert mmbench_circular(rows) == 100.0


@pytest.mark.parametrize("prediction, right", [
    ("A", True), (" A\n", True), ("A.", False), ("The answer is A", False), ("a", False), (None, False)])
def test_seed_correct_is_exact_letter(prediction, right):
    assert seed_correct(prediction, "A") is right


def test_seed_accuracy():
    rows = [{"prediction": "A", "answer": "A", "data_type": "image", "question_type": "Scene Understanding"},
            {"prediction": "B.", "answer": "B", "data_type": "image", "question_type": "Instances Counting"},
            {"prediction": "C", "answer": "C", "data_type": "video", "question_type": "Action Recognition"},
            {"prediction": None, "answer": "D", "data_type": "video", "question_type": "Action Recognition"}]
    acc = seed_accuracy(rows)
    assert acc["accuracy"] == 50.0 and acc["image_accuracy"] == 50.0 and acc["video_accuracy"] == 50.0
    assert acc["Scene Understanding"] == 100.0 and acc["Instances Counting"] == 0.0 and acc["Action Recognition"] == 50.0


@pytest.mark.parametrize("review, pair", [
    ("8 9\nAssistant 2 is better.", [8.0, 9.0]), ("8,9", [8.0, 9.0]), ("8.5 7", [8.5, 7.0]),
    ("8, 9", [-1, -1]),         # "8  9": splitting on single spaces leaves an empty piece
    ("Scores: 8 9", [-1, -1]), ("a b", [-1, -1]), ("", [-1, -1]), ("10", [-1, -1]),
])
def test_parse_two_scores(review, pair):
    assert parse_two_scores(review) == pair


def test_llava_bench_summary_relative_scores():
    reviews = [{"category": "llava_bench_conv", "tuple": [8.0, 10.0]},
               {"category": "llava_bench_detail", "tuple": [9.0, 6.5]},
               {"category": "llava_bench_complex", "tuple": [8.0, 6.0]}]
    # all: averages 8.333 and 7.5 -> 7.5 / 8.333 = 90.0036 % -> 90.0
    assert llava_bench_summary(reviews) == {"overall": 90.0, "conv": 125.0, "detail": 72.2, "complex": 75.0,
                                            "reference_score": 83.3, "model_score": 75.0}


def test_llava_bench_summary_keeps_failed_parses(caplog):
    reviews = [{"category": "llava_bench_conv", "tuple": [8.0, 6.0]}, {"category": "llava_bench_conv", "tuple": [-1, -1]}]
    with caplog.at_level(logging.WARNING):
        out = llava_bench_summary(reviews)
    assert out["overall"] == round(2.5 / 3.5 * 100, 1)  # (8 - 1) / 2 and (6 - 1) / 2
    assert "1 review(s) without two scores" in caplog.text


@pytest.mark.parametrize("content, score", [
    ("0.5", 0.5), ("1.0", 1.0), ("0.0", 0.0), ("0.7\n", 0.7), ("0.4 because", 0.4),
    ("1.5", None), ("-0.1", None), ("abc", None), (" 0.5", None), ("nan", None), ("", None)])
def test_mmvet_parse_score(content, score):
    assert mmvet_parse_score(content) == score


def test_mmvet_totals_per_capability(caplog):
    caps = {"v1_0": ["ocr", "math"], "v1_1": ["rec"], "v1_2": ["rec", "know"]}
    with caplog.at_level(logging.WARNING):
        totals = mmvet_totals({"v1_0": 0.5, "v1_1": 1.0}, caps)
    assert totals == pytest.approx({"total": 50.0, "ocr": 50.0, "math": 50.0, "rec": 50.0, "know": 0.0})
    assert "1 sample(s) without a grade" in caplog.text and "v1_2" in caplog.text
