"""An LLM judge over an OpenAI-compatible chat-completions endpoint, and the two judged scorings of
LLaVA-1.5: LLaVA-Bench-in-the-Wild (LLaVA's `llava/eval/eval_gpt_review_bench.py`) and MM-Vet (the official
`mm-vet_evaluator` of github.com/yuweihao/MM-Vet). Standard library only (urllib).

The API key is read from $FASTLLAVA_JUDGE_API_KEY, else $OPENAI_API_KEY, at each request; it is never
stored on the Judge, logged, written or put in an exception (any text that could echo it is scrubbed).
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable, Mapping, Sequence

from .scorers import mmvet_parse_score, parse_two_scores

log = logging.getLogger(__name__)

KEY_ENV = ("FASTLLAVA_JUDGE_API_KEY", "OPENAI_API_KEY")
_RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class JudgeError(RuntimeError):
    """The judge could not be reached or gave no usable reply; the message names the endpoint (no key)."""


class Judge:
    """A chat-completions client: `Judge(url, model)`. `url` is the endpoint itself (".../chat/completions")
    or an API base such as "https://api.openai.com/v1", to which "/chat/completions" is added. Transient
    failures (connection errors, timeouts, HTTP 408/409/429/5xx, malformed replies) are retried `retries`
    times with exponential backoff; other HTTP errors (401, 404, ...) fail at once. (LLaVA's own client
    retries forever; a bounded retry with an error naming the endpoint is kinder to a batch job.)"""

    def __init__(self, url: str, model: str, *, retries: int = 5, timeout: float = 120.0, backoff: float = 1.0,
                 sleep: Callable[[float], None] = time.sleep):
        url = url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.model, self.retries, self.timeout, self.backoff, self._sleep = model, retries, timeout, backoff, sleep
        parts = urllib.parse.urlsplit(self.url)
        # What messages show: no user:password@ and no query string, where a key could hide.
        host = (parts.hostname or "") + ("" if parts.port is None else f":{parts.port}")
        self.where = urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))

    def __repr__(self) -> str:
        return f"Judge(url={self.where!r}, model={self.model!r})"

    @staticmethod
    def _key() -> str | None:
        return next((os.environ[name] for name in KEY_ENV if os.environ.get(name)), None)

    def _scrub(self, text: str) -> str:
        key = self._key()
        return text.replace(key, "***") if key else text

    def chat(self, messages: Sequence[Mapping[str, str]], *, temperature: float, max_tokens: int) -> str:
        """The reply's text to `messages` ([{"role", "content"}, ...]); raises JudgeError after the retries."""
        body = json.dumps({"model": self.model, "messages": list(messages), "temperature": temperature,
                           "max_tokens": max_tokens}).encode()
        problem = ""
        for attempt in range(1, self.retries + 2):
            headers = {"Content-Type": "application/json"}
            key = self._key()
            if key:
                headers["Authorization"] = f"Bearer {key}"
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    reply = json.loads(response.read().decode("utf-8"))
                content = reply["choices"][0]["message"]["content"]
                return "" if content is None else str(content)  # a refusal without text parses as no score
            except urllib.error.HTTPError as e:
                detail = e.read(300).decode("utf-8", "replace") if e.fp is not None else ""
                problem = self._scrub(f"HTTP {e.code} {e.reason}: {detail}".strip())
                if e.code not in _RETRY_STATUS:
                    raise JudgeError(f"judge at {self.where} (model {self.model}): {problem}") from None
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                problem = self._scrub(f"{type(e).__name__}: {getattr(e, 'reason', e)}")
            except (ValueError, KeyError, IndexError, TypeError) as e:
                problem = self._scrub(f"unexpected reply ({type(e).__name__}: {e})")
            if attempt <= self.retries:
                wait = min(self.backoff * 2 ** (attempt - 1), 60.0)
                log.warning("judge at %s: attempt %d failed (%s); retrying in %.1f s", self.where, attempt, problem, wait)
                self._sleep(wait)
        raise JudgeError(f"judge at {self.where} (model {self.model}) failed after {self.retries + 1} attempts: {problem}")


# ---------------------------------------------------------------------------------------------------
# LLaVA-Bench-in-the-Wild: llava/eval/eval_gpt_review_bench.py with llava/eval/table/rule.json
# ---------------------------------------------------------------------------------------------------

LLAVA_BENCH_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
# rule.json's prompt for llava_bench_conv, llava_bench_detail and llava_bench_complex (the three are the same
# text), role "Assistant".
LLAVA_BENCH_RULE = (
    "We would like to request your feedback on the performance of two AI assistants in response to the user "
    "question displayed above. The user asks the question on observing an image. For your reference, the "
    "visual content in the image is represented with a few sentences describing the image. \nPlease rate the "
    "helpfulness, relevance, accuracy, level of details of their responses. Each assistant receives an overall "
    "score on a scale of 1 to 10, where a higher score indicates better overall performance.\nPlease first "
    "output a single line containing only two values indicating the scores for Assistant 1 and 2, "
    "respectively. The two scores are separated by a space.\nIn the subsequent line, please provide a "
    "comprehensive explanation of your evaluation, avoiding any potential bias and ensuring that the order in "
    "which the responses were presented does not affect your judgment.")
LLAVA_BENCH_RULES = {f"llava_bench_{c}": ("Assistant", LLAVA_BENCH_RULE) for c in ("conv", "detail", "complex")}


def llava_bench_content(caption: str, question: str, reference: str, answer: str, category: str) -> str:
    """The user message of eval_gpt_review_bench.py: the image's caption as context, the question, the GPT-4
    reference as assistant 1, the model's answer as assistant 2, then the category's rule."""
    role, rule = LLAVA_BENCH_RULES[category]
    return (f"[Context]\n{caption}\n\n[Question]\n{question}\n\n"
            f"[{role} 1]\n{reference}\n\n[End of {role} 1]\n\n"
            f"[{role} 2]\n{answer}\n\n[End of {role} 2]\n\n[System]\n{rule}\n\n")


def judge_llava_bench(judge: Judge, items: Sequence[Mapping], *, max_tokens: int = 1024) -> list[dict]:
    """Review lines as eval_gpt_review_bench.py writes them, one per item {"question_id", "category" (conv,
    detail, complex), "caption", "question", "reference", "reference_id", "answer", "answer_id"}:
    {"id", "question_id", "answer1_id", "answer2_id", "category", "content", "tuple"}. Temperature 0.2 and
    1024 tokens as LLaVA asks of GPT-4."""
    reviews = []
    for i, item in enumerate(items):
        category = "llava_bench_" + item["category"]
        content = llava_bench_content(item["caption"], item["question"], item["reference"], item["answer"], category)
        review = judge.chat([{"role": "system", "content": LLAVA_BENCH_SYSTEM}, {"role": "user", "content": content}],
                            temperature=0.2, max_tokens=max_tokens)
        reviews.append({"id": i + 1, "question_id": item["question_id"], "answer1_id": item["reference_id"],
                        "answer2_id": item["answer_id"], "category": category, "content": review,
                        "tuple": parse_two_scores(review)})
    return reviews


# ---------------------------------------------------------------------------------------------------
# MM-Vet: the official grader's prompt (few-shot table) and retry rule
# ---------------------------------------------------------------------------------------------------

_MEME_GT = ("This meme is poking fun at the fact that the names of the countries Iceland and Greenland are "
            "misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland "
            "is mostly covered in ice and snow. The meme is saying that the person has trust issues because the "
            "names of these countries do not accurately represent their landscapes.")
MMVET_PROMPT = (
    "Compare the ground truth and prediction from AI models, to give a correctness score for the prediction. "
    "<AND> in the ground truth means it is totally right only when all elements in the ground truth are present "
    "in the prediction, and <OR> means it is totally right when any one element in the ground truth is present "
    "in the prediction. The correctness score is 0.0 (totally wrong), 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, "
    "0.9, or 1.0 (totally right). Just complete the last space of the correctness score.\n\n"
    "Question | Ground truth | Prediction | Correctness\n--- | --- | --- | ---\n"
    "What is x in the equation? | -1 <AND> -5 | x = 3 | 0.0\n"
    "What is x in the equation? | -1 <AND> -5 | x = -1 | 0.5\n"
    "What is x in the equation? | -1 <AND> -5 | x = -5 | 0.5\n"
    "What is x in the equation? | -1 <AND> -5 | x = -5 or 5 | 0.5\n"
    "What is x in the equation? | -1 <AND> -5 | x = -1 or x = -5 | 1.0\n"
    f"Can you explain this meme? | {_MEME_GT} | The meme talks about Iceland and Greenland. It's pointing out "
    "that despite their names, Iceland is not very icy and Greenland isn't very green. | 0.4\n"
    f"Can you explain this meme? | {_MEME_GT} | The meme is using humor to point out the misleading nature of "
    "Iceland's and Greenland's names. Iceland, despite its name, has lush green landscapes while Greenland is "
    "mostly covered in ice and snow. The text 'This is why I have trust issues' is a playful way to suggest that "
    "these contradictions can lead to distrust or confusion. The humor in this meme is derived from the "
    "unexpected contrast between the names of the countries and their actual physical characteristics. | 1.0\n")
MMVET_RETRY_SUFFIX = "\nPredict the correctness of the answer (digit): "


def mmvet_question(question: str, ground_truth: str, prediction: str) -> str:
    """The grader's message: the prompt, a blank line, then the sample as a table row with an empty last
    cell; <AND>/<OR> in the ground truth get spaces around them."""
    truth = ground_truth.replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
    return MMVET_PROMPT + "\n" + " | ".join([question, truth, prediction, ""])


def judge_mmvet(judge: Judge, items: Sequence[Mapping]) -> dict[str, dict]:
    """One grading run of the official evaluator over items {"key" ("v1_<n>"), "question", "answer" (ground
    truth), "prediction"}: {key: {"model": [..], "content": [..], "score": [..]}} as its grade file holds.

    Rule: 3 tokens at temperature 0; a reply whose text up to the first space is not a number in [0, 1] is
    asked again with "Predict the correctness of the answer (digit): " appended, at temperature 0, 0.5, 1.0,
    1.5; after that the score is 0.0. (The evaluator makes one more call, at 2.0, whose reply it never
    reads; it is not made here.)"""
    grades = {}
    for item in items:
        message = mmvet_question(item["question"], item["answer"], item["prediction"])
        content = judge.chat([{"role": "user", "content": message}], temperature=0.0, max_tokens=3)
        score = mmvet_parse_score(content)
        for temperature in (0.0, 0.5, 1.0, 1.5):
            if score is not None:
                break
            log.info("MM-Vet %s: reply %r is no score in [0, 1]; asking again", item["key"], content)
            content = judge.chat([{"role": "user", "content": message + MMVET_RETRY_SUFFIX}],
                                 temperature=temperature, max_tokens=3)
            score = mmvet_parse_score(content)
        if score is None:
            log.warning("MM-Vet %s: no score in [0, 1] after 5 replies; graded 0.0 as the evaluator does", item["key"])
            score = 0.0
        grades[item["key"]] = {"model": [judge.model], "content": [content], "score": [score]}
    return grades
