"""evaluate_vqa: prompts hold exactly the question being asked (never its answer), generation is asked for
greedy answers that stop at </s>, and scoring per question type is exact - checked with fake models whose
answers we know (the generator itself is tested in tests/generate)."""

import json
from types import SimpleNamespace

import pytest
import torch

from fastllava.data.images import load_image
from fastllava.demo.world import make_demo_dataset
from fastllava.data.tokenize import load_tokenizer
from fastllava.demo.score import evaluate_vqa, normalize_answer

IMAGE_SIZE = 32
NUM_IMAGE_TOKENS = 4


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    paths = make_demo_dataset(tmp_path_factory.mktemp("vqa") / "d", n_train=20, n_eval=24, seed=1)
    return paths, load_tokenizer(paths.tokenizer_dir), json.loads(paths.eval_json.read_text())


class FakeModel(torch.nn.Module):
    """Answers from a lookup keyed by (the image's pixels, the last question of the prompt), through the
    generator's interface; `wrong` answers a fixed word for the question types named there."""

    def __init__(self, tokenizer, samples, image_folder, wrong=()):
        super().__init__()
        self.tok = tokenizer
        self.config = SimpleNamespace(vision=SimpleNamespace(image_size=IMAGE_SIZE))
        self.answers = {}
        for s in samples:
            key = None
            if "image" in s:
                key = self._image_key(load_image(image_folder / s["image"], mode="pad", size=IMAGE_SIZE)[None])
            turns = s["conversations"]
            for human, gpt, qtype in zip(turns[0::2], turns[1::2], s["question_types"]):
                answer = "red" if qtype in wrong else gpt["value"]
                self.answers[(key, human["value"].replace("<image>\n", ""))] = answer
        self.calls = []

    @staticmethod
    def _image_key(pixels):
        return None if pixels is None else round(float(pixels.double().sum()), 3)

    def generate(self, prompts, *, max_new_tokens, stop, max_batch_size):
        self.calls.append(dict(n=len(prompts), max_new_tokens=max_new_tokens, stop=stop))
        out = []
        for p in prompts:
            text = self.tok.decode(p["input_ids"], skip_special_tokens=False)
            head, sep, rest = text.rpartition("ASSISTANT:")
            assert sep and rest == "", text  # the prompt stops right where the answer starts
            question = head.rpartition("USER: ")[2].replace("<image>", "").strip()
            answer = self.answers[(self._image_key(p["pixel_values"]), question)]
            out.append(self.tok(" " + answer, add_special_tokens=False)["input_ids"][:max_new_tokens])
        return out


def _counts(samples):
    counts = {}
    for s in samples:
        for t in s["question_types"]:
            counts[t] = counts.get(t, 0) + 1
    return counts


def test_oracle_scores_everything(demo):
    paths, tok, samples = demo
    model = FakeModel(tok, samples, paths.image_folder)
    r = evaluate_vqa(model, paths.eval_json, paths.image_folder, tok, "vicuna_v1", batch_size=16)
    counts = _counts(samples)
    assert r["num_questions"] == sum(counts.values()) and r["correct"] == r["num_questions"]
    assert {t: v["total"] for t, v in r["per_type"].items()} == counts
    assert r["accuracy"] == 1.0 and not r["mistakes"]
    assert "overall" in r["table"] and "100.0%" in r["table"]
    # One generator call for all questions, stopping at </s> (the tokenizer's EOS): vicuna_v1's stop rule.
    assert model.calls == [dict(n=r["num_questions"], max_new_tokens=32, stop=[[tok.eos_token_id]])]


def test_wrong_answers_fail_per_type(demo):
    paths, tok, samples = demo
    model = FakeModel(tok, samples, paths.image_folder, wrong=("count", "color"))
    r = evaluate_vqa(model, paths.eval_json, paths.image_folder, tok, "vicuna_v1")
    counts = _counts(samples)
    reds = sum(
        g["value"] == "red"
        for s in samples
        for g, t in zip(s["conversations"][1::2], s["question_types"])
        if t == "color"
    )
    assert r["per_type"]["count"]["correct"] == 0
    assert r["per_type"]["color"]["correct"] == reds < counts["color"]
    for t in ("shape", "position", "text"):
        assert r["per_type"][t]["accuracy"] == 1.0
    assert r["correct"] == r["num_questions"] - counts["count"] - (counts["color"] - reds)
    assert r["mistakes"] and all(m["answer"] == "red" for m in r["mistakes"])


def test_max_new_tokens_cuts_answers(demo):
    paths, tok, samples = demo
    model = FakeModel(tok, samples[:3], paths.image_folder)
    r = evaluate_vqa(model, samples[:3], paths.image_folder, tok, "vicuna_v1", max_new_tokens=1)
    assert model.calls[0]["max_new_tokens"] == 1
    assert all(len(tok(" " + m["answer"], add_special_tokens=False)["input_ids"]) <= 1 for m in r["mistakes"])


def test_normalize_answer():
    assert normalize_answer(" The Top-Left. ") == "top left"
    assert normalize_answer("Three") == normalize_answer("3") == "3"
    assert normalize_answer("a red circle") == "red circle"
    assert normalize_answer("red") != normalize_answer("blue")


def test_bad_input_is_a_clear_error(demo, tmp_path):
    paths, tok, samples = demo
    model = FakeModel(tok, samples[:2], paths.image_folder)
    bad = [{**samples[0], "question_types": ["color"]}]
    with pytest.raises(ValueError, match="question_types"):
        evaluate_vqa(model, bad, paths.image_folder, tok)
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    with pytest.raises(ValueError, match="broken.json"):
        evaluate_vqa(model, broken, paths.image_folder, tok)
