"""Answer scorers of LLaVA-1.5's benchmarks, reproducing LLaVA's own evaluation code rule for rule.

Each rule below names the LLaVA file (github.com/haotian-liu/LLaVA) it reproduces:

* `normalize_vqa_answer`, `vqa_accuracy`: `llava/eval/m4c_evaluator.py` (EvalAIAnswerProcessor and
  TextVQAAccuracyEvaluator). The same normalizer is applied to VQAv2 and VizWiz answers before upload by
  `scripts/convert_vqav2_for_submission.py` and `scripts/convert_vizwiz_for_submission.py`.
* `gqa_prediction`, `gqa_match`: `scripts/convert_gqa_for_eval.py`, followed by GQA's official `eval.py`,
  which counts a prediction correct when it equals the gold answer string.
* `pope_yes_no`, `pope_metrics`: `llava/eval/eval_pope.py`.
* `scienceqa_letter`, `scienceqa_choice`: `llava/eval/eval_science_qa.py` (its answer parsing and
  `get_pred_idx`). `scienceqa_subsets`, `scienceqa_breakdown`: the ScienceQA paper's table columns, as
  ScienceQA's `tools/evaluate_acc.py` (github.com/lupantech/ScienceQA) computes them.
  `scienceqa_ensemble`: the "GPT-4 as the judge" rule of `llava/eval/eval_science_qa_gpt4_requery.py`.
* `textvqa_question`: `llava/eval/eval_textvqa.py` (`prompt_processor`, which finds the annotation a
  prediction belongs to).
* `mme_yes_no`, `mme_scores`: LLaVA's `playground/data/eval/MME/convert_answer_to_mme.py` (from eval.zip)
  writes one `<subtask>.txt` per subtask; MME's `eval_tool/calculation.py` scores them.
* `mmbench_option`, `mmbench_circular`: LLaVA only writes the submission
  (`scripts/convert_mmbench_for_submission.py`); the OpenCompass server scores it with CircularEval. These
  follow the first public release of that evaluator (VLMEvalKit, Dec 2023: `vlmeval/utils/matching_util.py`
  `can_infer`, `vlmeval/eval/multiple_choice.py` `prefetch_sub_data`) in its `exact_matching` mode: no
  ChatGPT matching.
* `seed_correct`, `seed_accuracy`: `scripts/convert_seed_for_submission.py`.
* `parse_two_scores`, `llava_bench_summary`: `llava/eval/eval_gpt_review_bench.py` and
  `llava/eval/summarize_gpt_review.py` (LLaVA-Bench, judged through fastllava.eval.judge).
* `mmvet_parse_score`, `mmvet_totals`: the official `mm-vet_evaluator` of github.com/yuweihao/MM-Vet.

The quirks of those files are kept on purpose (they change published numbers); each is commented where it
is reproduced.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from typing import Iterable, Mapping, Sequence

log = logging.getLogger(__name__)

__all__ = [
    "MME_COGNITION", "MME_PERCEPTION", "llava_bench_summary", "mme_scores", "mme_yes_no", "mmbench_circular",
    "mmbench_option", "mmvet_parse_score", "mmvet_totals", "parse_two_scores", "seed_accuracy", "seed_correct",
    "gqa_match",
    "gqa_prediction",
    "normalize_vqa_answer",
    "pope_metrics",
    "pope_yes_no",
    "SCIENCEQA_SUBSETS",
    "scienceqa_breakdown",
    "scienceqa_choice",
    "scienceqa_ensemble",
    "scienceqa_letter",
    "scienceqa_subsets",
    "textvqa_question",
    "vqa_accuracy",
]

# ---------------------------------------------------------------------------------------------------
# VQA answer normalization (m4c_evaluator.py, EvalAIAnswerProcessor)
# ---------------------------------------------------------------------------------------------------

# Word -> contracted form, applied to whole words after article removal. The table is EvalAI's, as
# m4c_evaluator.py carries it, including its oddities: "somebody'd" maps to "somebodyd" (backwards), and
# keys that can never match because words are lower-cased before the lookup ("Im", "Ive", "Id've",
# "I'dve") or because "'s" was split off earlier ("let's", "she's", "ow's'at", "'ow'sat").
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've",
    "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've",
    "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}

# Number words up to ten (and "none") become digits; nothing else does ("eleven" stays a word).
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})

# The punctuation marks handled one by one. "," and "?" are in EvalAI's list too but were already deleted
# by the first step, so they are left out here; "." has its own rule; "'", ":", "*", "%", "$", "#", "&"
# and the like are not punctuation for this normalizer and survive.
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", "!")

# EvalAI writes the period rule as `(?!<=\d)(\.)(?!\d)`, meaning "a period not between digits", but the
# first group is a negative LOOKAHEAD for the text "<=digit" (a typo for the lookbehind `(?<!\d)`); at the
# period's own position that text can never start, so only `(?!\d)` acts: every period not followed by a
# digit is deleted, even after a digit ("5." -> "5") -- "3.5" and "v.2" keep theirs.
_PERIOD = re.compile(r"\.(?!\d)")
# m4c_evaluator.py calls `PERIOD_STRIP.sub("", text, re.UNICODE)`: the flag lands in `count`, and
# re.UNICODE == 32, so at most the first 32 such periods of an answer are deleted.
_PERIOD_MAX = 32


def normalize_vqa_answer(answer: str) -> str:
    """An answer as EvalAI's VQA processor normalizes it (m4c_evaluator.py, EvalAIAnswerProcessor).

    In order: lower-case; delete "," and "?"; split "'s" off its word ("what's" -> "what 's", which is
    why "what's" and "whats" do NOT normalize alike); newlines/tabs to spaces; strip. Then each mark of
    `_PUNCTUATION`: deleted everywhere when it touches a space anywhere in the answer, else replaced by a
    space everywhere ("t-shirt" -> "t shirt", "x - y" -> "x  y"). Then the period rule (see `_PERIOD`).
    Then per whitespace-separated word: number words to digits, articles dropped, contractions restored;
    words re-joined by single spaces.

    EvalAI's digit-comma rule (`(?<=\\d)(\\,)+(?=\\d)`, "delete instead of space when the answer has a
    comma between digits") never fires in m4c_evaluator.py's order of steps, since commas are gone by
    then, so it has no counterpart here.
    """
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    # Which rule a mark gets depends on the text BEFORE any mark was handled, not on the running result.
    before = text
    for mark in _PUNCTUATION:
        touches_space = (mark + " ") in before or (" " + mark) in before
        text = text.replace(mark, "" if touches_space else " ")
    text = _PERIOD.sub("", text, count=_PERIOD_MAX)
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """VQA soft accuracy of one prediction, in [0, 1], as TextVQAAccuracyEvaluator computes it
    (m4c_evaluator.py); LLaVA scores TextVQA with it (VQAv2 and VizWiz are scored by their servers).

    Prediction and every human answer are normalized with `normalize_vqa_answer` (all of them, always;
    the official VQA evaluation script normalizes only where the human answers disagree, and without
    the "," / "?" / "'s" first step). For each human answer i
    the prediction scores min(1, m_i / 3), m_i = how many of the OTHER answers equal it; the result is
    the mean over i. So with 10 answers, k of them matching: k=0 -> 0, 1 -> 0.3, 2 -> 0.6, 3 -> 0.9,
    k >= 4 -> 1. Duplicate human answers count once per occurrence.

    LLaVA asserts exactly 10 human answers; any non-empty list is accepted here (leave-one-out over all).
    """
    if not gt_answers:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer")
    pred = normalize_vqa_answer(prediction)
    matches = [normalize_vqa_answer(a) == pred for a in gt_answers]
    total = sum(matches)
    # Leaving out answer i removes one match exactly when answer i itself matched.
    return sum(min(1.0, (total - m) / 3) for m in matches) / len(matches)


# ---------------------------------------------------------------------------------------------------
# TextVQA: which annotation a prediction belongs to (eval_textvqa.py, prompt_processor)
# ---------------------------------------------------------------------------------------------------


def textvqa_question(prompt: str) -> str:
    """The question inside a TextVQA prompt, lower-cased, as eval_textvqa.py's prompt_processor finds it.

    LLaVA matches a prediction to its annotation by (question_id, this question) == (image_id,
    question.lower()) of TextVQA_0.5.1_val.json. Prompt shapes: "OCR tokens: ... Question: Q Short
    answer:" -> Q; three lines with "Reference OCR token: " in them -> the first line, or the second where
    the prompt starts with the OCR line; two lines -> the first. Anything else raises ValueError (LLaVA
    asserts).
    """
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        found = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        if found is None:
            raise ValueError("an 'OCR tokens: ' prompt without 'Question: ... Short answer:'")
        question = found.group(1)
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        raise ValueError(
            "expected 'question\\nReference OCR token: ...\\ninstruction' (3 lines) or "
            f"'question\\ninstruction' (2 lines), got {len(lines)} line(s)"
        )
    return question.lower()


# ---------------------------------------------------------------------------------------------------
# GQA (convert_gqa_for_eval.py + GQA's eval.py)
# ---------------------------------------------------------------------------------------------------


def gqa_prediction(text: str) -> str:
    """A model answer as convert_gqa_for_eval.py writes it for GQA's eval.py: every trailing "." removed,
    then lower-cased. Nothing else: no whitespace strip, no article or punctuation handling."""
    return text.rstrip(".").lower()


def gqa_match(prediction: str, answer: str) -> bool:
    """Whether GQA's eval.py counts `prediction` (the raw model answer) correct against the gold `answer`:
    exact string equality after LLaVA's conversion (`gqa_prediction`). "Yes." matches "yes"; "the man"
    does not match "man"; "yes " (trailing space) does not match "yes"."""
    return gqa_prediction(prediction) == answer


# ---------------------------------------------------------------------------------------------------
# POPE (eval_pope.py)
# ---------------------------------------------------------------------------------------------------


def pope_yes_no(text: str) -> str:
    """"yes" or "no" read from a model answer as eval_pope.py reads it.

    Only the text before the first "." counts; commas are deleted; the rest is split on single spaces
    (not on newlines or other whitespace), and the answer is "no" when one of those pieces is exactly
    "No", "no" or "not" -- anything else is "yes". So "No, there is not." -> no; "Yes, there is no dog"
    -> no; "NO" -> yes; "Not at all" -> yes ("Not" is not in the list); "no!" -> yes; "" -> yes.
    """
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """POPE metrics of one split, as eval_pope.py computes them, in percent (0-100).

    predictions[i] is the raw model answer (parsed by `pope_yes_no`), labels[i] its label; "yes" is the
    positive class, and any label other than "no" counts as "yes" (eval_pope.py's rule). Returns
    accuracy, precision, recall and f1 of "yes", and yes_ratio (share of "yes" predictions).
    Where eval_pope.py would divide by zero (no "yes" predicted, no "yes" label, or precision and recall
    both 0) the metric is 0 here instead of an exception.
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if not predictions:
        raise ValueError("pope_metrics needs at least one prediction")
    tp = fp = tn = fn = 0
    for prediction, label in zip(predictions, labels):
        said_yes = pope_yes_no(prediction) == "yes"
        is_yes = label != "no"
        if said_yes:
            tp, fp = (tp + 1, fp) if is_yes else (tp, fp + 1)
        else:
            fn, tn = (fn + 1, tn) if is_yes else (fn, tn + 1)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": 100.0 * (tp + tn) / len(predictions),
        "precision": 100.0 * precision,
        "recall": 100.0 * recall,
        "f1": 100.0 * f1,
        "yes_ratio": 100.0 * (tp + fp) / len(predictions),
    }


# ---------------------------------------------------------------------------------------------------
# ScienceQA (eval_science_qa.py)
# ---------------------------------------------------------------------------------------------------

_SQA_OPTIONS = ("A", "B", "C", "D", "E")  # eval_science_qa.py's --options default
# "." is any character, so the letter must be followed by something: a bare "The answer is B" at the very
# end does not parse.
_SQA_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def scienceqa_letter(prediction: str) -> str:
    """The option letter eval_science_qa.py parses from an answer, or "FAILED".

    Rules, in order (case-sensitive, no stripping): the whole answer is one of "A".."E"; or it has >= 3
    characters, starts with one of "A".."E" and then ". " ("B. apostrophe"; a bare "B." fails); or "The
    answer is X" followed by any character occurs exactly once, X any upper-case letter (so "F".."Z" can
    come out of this rule). A missing prediction is the text "FAILED" in LLaVA, which parses to "FAILED".
    """
    if prediction in _SQA_OPTIONS:
        return prediction
    if len(prediction) >= 3 and prediction[0] in _SQA_OPTIONS and prediction[1:3] == ". ":
        return prediction[0]
    found = _SQA_ANSWER_IS.findall(prediction)
    return found[0] if len(found) == 1 else "FAILED"


def scienceqa_choice(prediction: str, num_options: int) -> int:
    """The 0-based option a ScienceQA answer picks, or -1 where eval_science_qa.py's parser fails.

    The letter comes from `scienceqa_letter`; as in get_pred_idx, it counts only when it is among the
    first `num_options` of "A".."E", so "FAILED", "E" with 4 options and "F".."Z" all give -1.
    """
    allowed = _SQA_OPTIONS[:num_options]
    letter = scienceqa_letter(prediction)
    return allowed.index(letter) if letter in allowed else -1


# The ScienceQA paper's table columns (evaluate_acc.py), in its order: subject, context modality, grade.
SCIENCEQA_SUBSETS = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12")
_SQA_SUBJECTS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}
_SQA_GRADES = {f"grade{g}": "G1-6" if g <= 6 else "G7-12" for g in range(1, 13)}


def scienceqa_subsets(problem: Mapping) -> list[str]:
    """The table columns a problems.json entry counts in, as evaluate_acc.py assigns them: its subject
    (NAT, SOC, LAN); TXT when the hint is non-empty and IMG when it names an image (a problem with both
    counts in both), NO when it has neither; G1-6 for grade1..grade6, G7-12 for grade7..grade12. A subject
    or grade outside those values counts in no column of its kind (evaluate_acc.py's filters skip it)."""
    subsets = [_SQA_SUBJECTS[problem.get("subject")]] if problem.get("subject") in _SQA_SUBJECTS else []
    has_text, has_image = bool(problem.get("hint")), bool(problem.get("image"))
    subsets += (["TXT"] if has_text else []) + (["IMG"] if has_image else [])
    if not has_text and not has_image:
        subsets.append("NO")
    if problem.get("grade") in _SQA_GRADES:
        subsets.append(_SQA_GRADES[problem["grade"]])
    return subsets


def scienceqa_breakdown(problems: Mapping[str, Mapping], correct: Mapping[str, bool]) -> dict[str, float]:
    """Accuracy (percent) per column of the paper's table over `problems` ({pid: problems.json entry}),
    `correct[pid]` saying whether the prediction matched. A column with no problem is left out (evaluate_acc.py
    divides by zero there)."""
    hits, totals = defaultdict(int), defaultdict(int)
    for pid, problem in problems.items():
        for name in scienceqa_subsets(problem):
            totals[name] += 1
            hits[name] += bool(correct[pid])
    return {name: 100.0 * hits[name] / totals[name] for name in SCIENCEQA_SUBSETS if totals[name]}


def scienceqa_ensemble(model_choice: int, language_choice: int, judge_choice: int | None) -> int:
    """The final choice of "GPT-4 as the judge" (eval_science_qa_gpt4_requery.py): the model's choice where
    the language-only model agrees (the judge is not asked: `judge_choice` None); otherwise the judge's
    choice, unless the judge's reply names no valid option (-1), then the model's. Choices are 0-based
    indices, -1 for an unparsed answer; two unparsed answers agree. (LLaVA's script replaces an unparsed
    answer by a random option; here it stays -1, always wrong.)"""
    if judge_choice is None or judge_choice < 0:
        return model_choice
    return judge_choice


# ---------------------------------------------------------------------------------------------------
# MME (eval_tool/calculation.py)
# ---------------------------------------------------------------------------------------------------

# calculation.py's eval_type_dict: the subtask names (its result file names) and their order.
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_yes_no(prediction: str) -> str:
    """"yes", "no" or "other", as calculation.py's parse_pred_ans reads a lower-cased prediction: the whole
    answer "yes"/"no", else the first of "yes", "no" found in its first 4 characters ("Not sure" -> "no")."""
    pred = prediction.lower()
    if pred in ("yes", "no"):
        return pred
    head = pred[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def mme_scores(rows: Sequence[Mapping]) -> dict:
    """MME's scores of rows {"category", "image", "answer" ("Yes"/"No"), "prediction"}.

    Per subtask (calculation.py): acc = questions answered right / questions ("other" is wrong);
    acc+ = images with both questions right / images; score = acc * 100 + acc+ * 100. calculation.py pairs
    consecutive lines of the subtask file as the two questions of one image; here the pairs are the rows
    sharing an image (the same pairs, since llava_mme.jsonl lists an image's two questions together).
    perception / cognition = sum of the 10 / 4 subtask scores. Returns
    {"perception", "cognition", "subtasks": {name: score}}; missing or unknown subtasks are logged.
    """
    by_task: dict[str, list[Mapping]] = defaultdict(list)
    for row in rows:
        by_task[row["category"]].append(row)
    subtasks = {}
    for task, items in by_task.items():
        per_image: dict[str, list[bool]] = defaultdict(list)
        hits = 0
        for row in items:
            truth = str(row["answer"]).lower()
            if truth not in ("yes", "no"):  # calculation.py asserts this
                raise ValueError(f"MME {task} {row['image']}: ground truth must be Yes or No, got {row['answer']!r}")
            right = mme_yes_no(row["prediction"]) == truth
            hits += right
            per_image[row["image"]].append(right)
        odd = [image for image, marks in per_image.items() if len(marks) != 2]
        if odd:
            log.warning("MME %s: %d image(s) without exactly two questions (acc+ needs all of them right): %s",
                        task, len(odd), ", ".join(odd[:5]))
        acc = hits / len(items)
        acc_plus = sum(all(marks) for marks in per_image.values()) / len(per_image)
        subtasks[task] = acc * 100 + acc_plus * 100
    unknown = sorted(set(subtasks) - set(MME_PERCEPTION) - set(MME_COGNITION))
    if unknown:
        log.warning("MME: subtasks outside MME's 14 are not in perception/cognition: %s", ", ".join(unknown))
    totals = {}
    for group, names in (("perception", MME_PERCEPTION), ("cognition", MME_COGNITION)):
        missing = [n for n in names if n not in subtasks]
        if missing and len(missing) < len(names):
            log.warning("MME %s: %d of %d subtasks have no answers and add nothing to the sum: %s",
                        group, len(missing), len(names), ", ".join(missing))
        totals[group] = sum(subtasks[n] for n in names if n in subtasks)
    return {**totals, "subtasks": subtasks}


# ---------------------------------------------------------------------------------------------------
# MMBench (VLMEvalKit's first release: can_infer + CircularEval, exact-matching mode)
# ---------------------------------------------------------------------------------------------------

# can_infer_option answers "E" (never a right answer) for these refusals of Bard's.
_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.")
_MMBENCH_PUNCTUATION = ".()[],:;!*#{}"


def mmbench_option(prediction: str, options: Mapping[str, str]) -> str | None:
    """The option letter MMBench's evaluator reads from `prediction` before any LLM matching, or None.

    1. can_infer_option: punctuation ".()[],:;!*#{}" becomes spaces, the text splits on whitespace; when
       exactly one of the letters A-E stands alone as a word, that letter ("B. cat" -> B; "A cat" -> A, an
       article read as a letter, as the evaluator does; "B or C" -> no answer).
    2. can_infer_text: else, when exactly one option's text (lower-cased) is a substring of the lower-cased
       prediction, that option's letter.
    `options`: letter -> option text of the options present.
    """
    if any(refusal in prediction for refusal in _REFUSALS):
        return "E"
    spaced = prediction
    for ch in _MMBENCH_PUNCTUATION:
        spaced = spaced.replace(ch, " ")
    words = spaced.split()
    letters = [ch for ch in "ABCDE" if ch in words]
    if len(letters) == 1:
        return letters[0]
    lower = prediction.lower()
    found = [letter for letter, text in options.items() if str(text).lower() in lower]
    return found[0] if len(found) == 1 else None


def mmbench_circular(rows: Sequence[Mapping]) -> float:
    """CircularEval accuracy in percent of rows {"index", "answer", "prediction", "A".."D"}.

    MMBench's legacy TSVs hold each question several times with its options rotated; the copies have
    indices index + k * 1_000_000. A question (a row with index < 1_000_000) counts as right only if the
    letter read by `mmbench_option` equals the answer in every row sharing index % 1_000_000. A prediction
    no letter can be read from would go to ChatGPT on the server; without it, it counts as wrong (the
    evaluator's `exact_matching` mode), and such predictions are counted in the log.
    """
    groups: dict[int, list[Mapping]] = defaultdict(list)
    for row in rows:
        groups[int(row["index"]) % 1_000_000].append(row)
    main = sorted({int(row["index"]) for row in rows if int(row["index"]) < 1_000_000})
    if not main:
        raise ValueError("MMBench: no question with index < 1000000 (the unrotated originals) to score")
    right, unmatched = 0, []
    for index in main:
        ok = True
        for row in groups[index]:
            options = {ch: row[ch] for ch in "ABCD" if row.get(ch) is not None}
            letter = mmbench_option(str(row["prediction"]), options)
            if letter is None:
                unmatched.append(int(row["index"]))
            ok = ok and letter == row["answer"]
        right += ok
    if unmatched:
        log.warning("MMBench: %d prediction(s) name no option (the server would ask ChatGPT; counted wrong "
                    "here), indices: %s", len(unmatched), ", ".join(map(str, unmatched[:10])))
    return right / len(main) * 100


# ---------------------------------------------------------------------------------------------------
# SEED-Bench (scripts/convert_seed_for_submission.py)
# ---------------------------------------------------------------------------------------------------

def seed_correct(prediction: str | None, answer: str) -> bool:
    """convert_seed_for_submission.py: right only when the answer text IS the letter ("A" is right,
    "A." and "The answer is A" are not). LLaVA strips its outputs, so surrounding whitespace is dropped."""
    return prediction is not None and prediction.strip() == answer


def seed_accuracy(rows: Iterable[Mapping]) -> dict[str, float]:
    """Percent accuracies of rows {"prediction" (None: unanswered, counted wrong as LLaVA does),
    "answer", "data_type" ("image"/"video"), "question_type" (dimension name)}: "accuracy" over all rows,
    "image_accuracy", "video_accuracy", and one per dimension name."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for row in rows:
        ok = seed_correct(row["prediction"], row["answer"])
        for key in ("accuracy", f"{row['data_type']}_accuracy", row["question_type"]):
            counts[key][0] += ok
            counts[key][1] += 1
    return {key: right / total * 100 for key, (right, total) in counts.items()}


# ---------------------------------------------------------------------------------------------------
# LLaVA-Bench (eval_gpt_review_bench.py, summarize_gpt_review.py)
# ---------------------------------------------------------------------------------------------------

def parse_two_scores(review: str) -> list[float]:
    """eval_gpt_review_bench.py's parse_score: the review's first line, commas made spaces, split on single
    spaces, must be exactly two numbers [reference, answer]; anything else gives [-1, -1] ("8  9" too)."""
    parts = review.split("\n")[0].replace(",", " ").split(" ")
    if len(parts) != 2:
        return [-1.0, -1.0]
    try:
        return [float(parts[0]), float(parts[1])]
    except ValueError:
        return [-1.0, -1.0]


def llava_bench_summary(reviews: Sequence[Mapping]) -> dict[str, float]:
    """summarize_gpt_review.py over review lines {"category", "tuple": [reference, answer]}.

    Per category and for all: the two scores are averaged, each average rounded to 3 decimals, and the
    relative score is round(answer / reference * 100, 1) -- LLaVA's LLaVA-Bench number. Failed parses
    ([-1, -1]) stay in the averages, as LLaVA keeps them (they are counted in the log). Returns "overall",
    one relative score per category without its "llava_bench_" prefix, and "reference_score" /
    "model_score" (round(average * 10, 1), the other two numbers summarize_gpt_review.py prints).
    """
    groups: dict[str, list[Sequence[float]]] = defaultdict(list)
    for review in reviews:
        groups[review["category"]].append(review["tuple"])
        groups["all"].append(review["tuple"])
    failed = sum(1 for review in reviews if list(review["tuple"]) == [-1, -1])
    if failed:
        log.warning("LLaVA-Bench: %d review(s) without two scores count as [-1, -1], as LLaVA counts them", failed)
    out = {}
    for key, pairs in sorted(groups.items()):
        ref, ans = (round(sum(p[i] for p in pairs) / len(pairs), 3) for i in (0, 1))
        name = "overall" if key == "all" else key.removeprefix("llava_bench_")
        if ref == 0:
            log.warning("LLaVA-Bench %s: the reference averages 0; no relative score", key)
            continue
        out[name] = round(ans / ref * 100, 1)
        if key == "all":
            out["reference_score"], out["model_score"] = round(ref * 10, 1), round(ans * 10, 1)
    return out


# ---------------------------------------------------------------------------------------------------
# MM-Vet (mm-vet_evaluator)
# ---------------------------------------------------------------------------------------------------

def mmvet_parse_score(content: str) -> float | None:
    """The grader's score: the reply up to its first space must be a number in [0, 1], else None (the
    evaluator then asks again). NaN is refused too (the evaluator's range check lets it through)."""
    try:
        score = float(content.split(" ")[0].strip())
    except ValueError:
        return None
    return score if 0.0 <= score <= 1.0 else None


def mmvet_totals(scores: Mapping[str, float], capabilities: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """MM-Vet's percent scores: "total" = sum of scores / samples * 100, and per capability (rec, ocr, know,
    gen, spat, math) the same over the samples needing it. The sample counts come from `capabilities`
    (mm-vet.json: every sample); a sample without a score adds 0 (counted in the log)."""
    missing = [key for key in capabilities if key not in scores]
    if missing:
        log.warning("MM-Vet: %d sample(s) without a grade count as 0: %s", len(missing), ", ".join(missing[:10]))
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for key, caps in capabilities.items():
        score = scores.get(key, 0.0)
        for cap in ["total", *set(caps)]:
            sums[cap] += score
            counts[cap] += 1
    return {cap: sums[cap] / counts[cap] * 100 for cap in counts}
