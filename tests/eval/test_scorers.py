"""Hand-worked cases for every rule of fastllava/eval/scorers.py (LLaVA's VQA / GQA / POPE / ScienceQA
scoring). Each expected value is derived by hand from the rule named in the test, not by running the
scorer on another input."""

from __future__ import annotations

import pytest

from fastllava.eval.scorers import (
    gqa_match,
    gqa_prediction,
    normalize_vqa_answer,
    pope_metrics,
    pope_yes_no,
    scienceqa_choice,
    scienceqa_letter,
    textvqa_question,
    vqa_accuracy,
)

# ----------------------------------------------------------------------------- normalize_vqa_answer


@pytest.mark.parametrize("raw, expected", [
    ("Yes", "yes"),                      # lower-cased
    ("1,000", "1000"),                   # commas deleted first (so EvalAI's digit-comma rule never fires)
    ("red, white", "red white"),
    ("yes?", "yes"),                     # "?" deleted
    ("x?y", "xy"),
    ("man's hat", "man 's hat"),         # "'s" split off its word
    ("red\nwhite\tblue", "red white blue"),  # newline and tab become spaces
    ("  red   car  ", "red car"),        # words re-joined by single spaces
    ("x'y", "x'y"),                      # apostrophe is not punctuation here
    ("3:30", "3:30"),                    # nor is ":"
    ("50%", "50%"),                      # nor "%"
])
def test_normalize_basic_rules(raw, expected):
    assert normalize_vqa_answer(raw) == expected


MARKS = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", "!"]


@pytest.mark.parametrize("mark", MARKS)
def test_normalize_mark_between_letters_becomes_space(mark):
    # The mark touches no space anywhere: every occurrence is replaced by a space.
    assert normalize_vqa_answer(f"x{mark}y") == "x y"


@pytest.mark.parametrize("mark", MARKS)
def test_normalize_mark_touching_a_space_is_deleted_everywhere(mark):
    # " z" follows the second mark, so the mark touches a space: ALL its occurrences are deleted,
    # including the one between x and y.
    assert normalize_vqa_answer(f"x{mark}y {mark}z") == "xy z"


def test_normalize_mark_rule_looks_at_text_before_any_mark_was_handled():
    # "/" (handled before "-") becomes a space, which puts a space next to the first "-". The "-" rule
    # still looks at the original text, where no "-" touches a space: both "-" become spaces.
    assert normalize_vqa_answer("x/-y z-w") == "x y z w"


def test_normalize_hyphen_examples():
    assert normalize_vqa_answer("t-shirt") == "t shirt"
    assert normalize_vqa_answer("t-shirt - red") == "tshirt red"


@pytest.mark.parametrize("raw, expected", [
    ("yes.", "yes"),          # a period not followed by a digit is deleted
    ("5.", "5"),              # ... even after a digit (EvalAI's lookbehind typo: only (?!\d) acts)
    ("3.5", "3.5"),           # followed by a digit: kept
    ("v.2", "v.2"),
    ("e.g", "eg"),
    ("yes" + "." * 32, "yes"),   # 32 periods: all deleted
    ("yes" + "." * 33, "yes."),  # re.UNICODE (32) passed as `count`: only the first 32 go
])
def test_normalize_period_rule(raw, expected):
    assert normalize_vqa_answer(raw) == expected


@pytest.mark.parametrize("raw, expected", [
    ("two", "2"), ("Two dogs", "2 dogs"), ("none", "0"), ("zero", "0"), ("ten", "10"),
    ("eleven", "eleven"),     # only zero..ten and none are mapped
    ("two.", "2"),            # period deleted before the word lookup
])
def test_normalize_number_words(raw, expected):
    assert normalize_vqa_answer(raw) == expected


@pytest.mark.parametrize("raw, expected", [
    ("the cat", "cat"), ("The Cat", "cat"), ("a dog and an apple", "dog and apple"),
    ("a", ""),                # nothing left
    ("one cat", "1 cat"),     # "one" is a number word, not an article
])
def test_normalize_articles(raw, expected):
    assert normalize_vqa_answer(raw) == expected


@pytest.mark.parametrize("raw, expected", [
    ("dont", "don't"), ("isnt", "isn't"), ("Wont", "won't"), ("yall'll", "y'all'll"),
    ("whats", "what's"),
    ("what's", "what 's"),          # "'s" split off first, so "what's" != "whats" after normalization
    ("Im", "im"),                   # the table's "Im" key can never match a lower-cased word
    ("somebody'd", "somebodyd"),    # the table maps this one backwards
    ("'ows'at", "'ow's'at"),
])
def test_normalize_contractions(raw, expected):
    assert normalize_vqa_answer(raw) == expected


# ----------------------------------------------------------------------------- vqa_accuracy


@pytest.mark.parametrize("k, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_leave_one_out(k, expected):
    # k of 10 answers match. The k subsets leaving out a match see k-1 matches, the others k:
    # k=1: (1*0 + 9*1/3)/10 = 0.3; k=2: (2*1/3 + 8*2/3)/10 = 0.6; k=3: (3*2/3 + 7*1)/10 = 0.9; k=4: 1.
    gts = ["cat"] * k + ["dog"] * (10 - k)
    assert vqa_accuracy("cat", gts) == pytest.approx(expected)


def test_vqa_accuracy_normalizes_prediction_and_every_answer():
    # "Two", "2", "two." and "the 2" all normalize to "2": 4 matches -> 1.0; "2 " alone is 1 match.
    gts = ["Two", "2", "two.", "the 2", "3", "3", "3", "3", "3", "3"]
    assert vqa_accuracy("2", gts) == pytest.approx(1.0)
    assert vqa_accuracy("Three!", gts) == pytest.approx(1.0)  # "three" -> "3", "!" -> space: 6 matches
    assert vqa_accuracy("four", gts) == 0.0


def test_vqa_accuracy_duplicate_answers_count_per_occurrence():
    gts = ["yes", "yes", "yes", "no", "no", "no", "no", "no", "no", "no"]
    assert vqa_accuracy("yes", gts) == pytest.approx(0.9)   # 3 matches
    assert vqa_accuracy("No.", gts) == pytest.approx(1.0)   # 7 matches


def test_vqa_accuracy_other_lengths_leave_one_out():
    # One answer: leaving it out leaves no match -> 0 even for an exact match.
    assert vqa_accuracy("cat", ["cat"]) == 0.0
    # Four identical answers: every subset of 3 has 3 matches -> 1.
    assert vqa_accuracy("cat", ["cat"] * 4) == 1.0
    with pytest.raises(ValueError):
        vqa_accuracy("cat", [])


# ----------------------------------------------------------------------------- textvqa_question


def test_textvqa_question_shapes():
    ocr = "What is the brand?\nReference OCR token: DAKOTA, DIGITAL\nAnswer the question using a single word or phrase."
    assert textvqa_question(ocr) == "what is the brand?"
    empty_ocr = "Whats this?\nReference OCR token: \nAnswer the question using a single word or phrase."
    assert textvqa_question(empty_ocr) == "whats this?"
    assert textvqa_question("Reference OCR token: A, B\nWho Is It?\nAnswer briefly.") == "who is it?"
    assert textvqa_question("What Color?\nAnswer the question using a single word or phrase.") == "what color?"
    assert textvqa_question("OCR tokens: a, b. Question: What Is Written? Short answer:") == "what is written?"
    for bad in ["one line", "a\nb\nc", "a\nb\nc\nd", "OCR tokens: a, b."]:
        with pytest.raises(ValueError):
            textvqa_question(bad)


# ----------------------------------------------------------------------------- GQA


def test_gqa_prediction_conversion():
    assert gqa_prediction("Yes.") == "yes"
    assert gqa_prediction("Yes...") == "yes"         # every trailing period
    assert gqa_prediction("U.S.A.") == "u.s.a"       # inner periods stay
    assert gqa_prediction("Yes. ") == "yes. "        # the period is not trailing; no strip


def test_gqa_match_is_exact_after_conversion():
    assert gqa_match("Woman", "woman")
    assert gqa_match("No.", "no")
    assert not gqa_match("The woman", "woman")       # no article removal
    assert not gqa_match(" yes", "yes")              # no whitespace strip
    assert not gqa_match("yes", "Yes")               # the gold answer is compared as given
    assert not gqa_match("Two", "2")                 # no number mapping


# ----------------------------------------------------------------------------- POPE


@pytest.mark.parametrize("text, expected", [
    ("Yes", "yes"), ("No", "no"), ("no", "no"), ("No.", "no"),
    ("No, there is not.", "no"),
    ("Yes, there is no dog", "no"),          # "no" anywhere in the first sentence
    ("There is not a cat.", "no"),           # "not" counts
    ("Yes. No", "yes"),                      # only the text before the first "." counts
    ("NO", "yes"),                           # only "No", "no", "not"
    ("Not at all", "yes"),                   # "Not" is not in the list
    ("no!", "yes"),                          # "!" stays attached
    ("no,", "no"),                           # commas are deleted
    ("Yes\nno", "yes"),                      # split on spaces only: "Yes\nno" is one piece
    ("None", "yes"),
    ("", "yes"),
])
def test_pope_yes_no(text, expected):
    assert pope_yes_no(text) == expected


def test_pope_metrics_hand_worked():
    preds = ["Yes", "No", "Yes, there is a dog.", "No.", "yes", "There is not a cat."]
    labels = ["yes", "yes", "no", "no", "yes", "no"]
    # parsed: yes no yes no yes no -> TP 2 (1st, 5th), FN 1 (2nd), FP 1 (3rd), TN 2 (4th, 6th)
    m = pope_metrics(preds, labels)
    assert m["accuracy"] == pytest.approx(400 / 6)
    assert m["precision"] == pytest.approx(200 / 3)
    assert m["recall"] == pytest.approx(200 / 3)
    assert m["f1"] == pytest.approx(200 / 3)
    assert m["yes_ratio"] == pytest.approx(50.0)
    assert set(m) == {"accuracy", "precision", "recall", "f1", "yes_ratio"}


def test_pope_metrics_any_label_but_no_is_positive():
    assert pope_metrics(["yes"], ["maybe"]) == {"accuracy": 100.0, "precision": 100.0, "recall": 100.0,
                                                "f1": 100.0, "yes_ratio": 100.0}


def test_pope_metrics_zero_instead_of_division_error():
    # No "yes" predicted: eval_pope.py divides 0 by 0 for precision; 0 here.
    m = pope_metrics(["No", "No"], ["yes", "no"])
    assert m == {"accuracy": 50.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}
    with pytest.raises(ValueError):
        pope_metrics(["Yes"], ["yes", "no"])
    with pytest.raises(ValueError):
        pope_metrics([], [])


# ----------------------------------------------------------------------------- ScienceQA


@pytest.mark.parametrize("text, n, expected", [
    ("A", 2, 0), ("B", 2, 1), ("E", 5, 4),
    ("E", 4, -1),                            # a letter beyond the options
    ("C. lynx", 4, 2),                       # letter + ". " + anything
    ("C.", 4, -1),                           # too short for the ". " rule, no sentence: FAILED
    ("C.x", 4, -1),                          # "." not followed by a space
    ("The answer is B.", 3, 1),
    ("The answer is D, lynx", 4, 3),         # the regex's "." is any character
    ("The answer is B", 3, -1),              # ... but there must be one
    ("The answer is A. The answer is B.", 3, -1),  # two sentences: FAILED
    ("The answer is F.", 5, -1),             # parses to F, not an option
    ("I think the answer is B.", 3, -1),     # case-sensitive "The"
    ("B. x The answer is C.", 3, 1),         # the ". " rule comes first
    ("a", 2, -1), (" A", 2, -1), ("A ", 2, -1), ("AB", 2, -1), ("", 2, -1),
    ("FAILED", 4, -1),                       # LLaVA's text for a missing prediction
])
def test_scienceqa_choice(text, n, expected):
    assert scienceqa_choice(text, n) == expected


def test_scienceqa_letter():
    assert scienceqa_letter("B. apostrophe") == "B"
    assert scienceqa_letter("The answer is Z!") == "Z"
    assert scienceqa_letter("D.") == "FAILED"
    assert scienceqa_letter("FAILED") == "FAILED"
