"""evaluate_vqa: prompts hold exactly the question being asked (never its answer), decoding is greedy and
stops at </s>, and scoring per question type is exact - checked with fake models whose answers we know."""

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
    """Answers from a lookup keyed by (the image's pixels, the last question of the prompt), spelled one
    token per forward through (T, V) logits at each sample's last position; `wrong` answers a fixed
    word for the question types named there."""

    def __init__(self, tokenizer, samples, image_folder, wrong=()):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tok = tokenizer
        self.config = SimpleNamespace(
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            num_image_tokens=NUM_IMAGE_TOKENS,
            vision=SimpleNamespace(image_size=IMAGE_SIZE),
        )
        self.answers = {}
        for s in samples:
            key = None
            if "image" in s:
                key = self._image_key(load_image(image_folder / s["image"], mode="pad", size=IMAGE_SIZE))
            turns = s["conversations"]
            for human, gpt, qtype in zip(turns[0::2], turns[1::2], s["question_types"]):
                answer = "red" if qtype in wrong else gpt["value"]
                self.answers[(key, human["value"].replace("<image>\n", ""))] = answer
        self.forwards = 0

    @staticmethod
    def _image_key(pixels):
        return round(float(pixels.double().sum()), 3)

    def forward(self, batch, return_logits=False):
        assert return_logits
        self.forwards += 1
        logits = torch.zeros(batch.num_tokens, len(self.tok))
        bounds = batch.cu_seqlens.tolist()
        image_ix = 0
        for start, end in zip(bounds[:-1], bounds[1:]):
            ids = batch.input_ids[start:end]
            n_img = int((ids == self.config.image_token_id).sum()) // NUM_IMAGE_TOKENS
            key = self._image_key(batch.pixel_values[image_ix]) if n_img else None
            image_ix += n_img
            text = self.tok.decode(ids, skip_special_tokens=False)
            prompt, sep, generated = text.rpartition("ASSISTANT:")
            assert sep and "</s>" not in generated, text  # the prompt stops right before an answer
            question = prompt.rpartition("USER: ")[2].replace("<image>", "").strip()
            answer_ids = self.tok(" " + self.answers[(key, question)], add_special_tokens=False)["input_ids"]
            done = len(self.tok(generated, add_special_tokens=False)["input_ids"]) if generated else 0
            nxt = answer_ids[done] if done < len(answer_ids) else self.tok.eos_token_id
            logits[end - 1, nxt] = 1.0
        return SimpleNamespace(logits=logits)


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
    # Batched decoding: a forward per token of the longest answer per batch, not per question.
    n_batches = -(-r["num_questions"] // 16)
    longest = max(len(tok(" " + t["value"], add_special_tokens=False)["input_ids"])
                  for s in samples for t in s["conversations"][1::2])
    assert model.forwards <= n_batches * (longest + 1)  # + 1 for </s>


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


def test_max_new_tokens_cuts_a_model_that_never_stops(demo):
    paths, tok, samples = demo

    class Babbler(FakeModel):
        def forward(self, batch, return_logits=False):
            self.forwards += 1
            logits = torch.zeros(batch.num_tokens, len(tok))
            logits[:, tok.convert_tokens_to_ids("▁red")] = 1.0
            return SimpleNamespace(logits=logits)

    model = Babbler(tok, samples[:3], paths.image_folder)
    r = evaluate_vqa(model, samples[:3], paths.image_folder, tok, "vicuna_v1", max_new_tokens=3)
    assert model.forwards == 3
    assert r["correct"] == 0 and r["mistakes"][0]["answer"] == "red red red"


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
