"""KV-cache generation against independent references: transformers' generate (greedy, token for token),
a full no-cache recompute of every step's logits, and the same prompts alone / batched / reordered."""

import random

import pytest
import torch

from fastllava import Llava, PackedBatch
from fastllava.generate import Generator
from fastllava.testing import TINY_IMAGE_TOKEN as IMG
from fastllava.testing import TORCH_BACKENDS, tiny_config, tiny_hf_llava, tiny_model

P = 4  # image positions of the tiny model (28 px, 14 px patches)


def _prompt(g, n_text, n_images, *, split=None):
    """BOS, text, image tokens at the front or (split) in the middle; random pixels."""
    text = torch.randint(3, IMG, (n_text,), generator=g).tolist()
    images = [IMG] * n_images
    ids = [1] + (images + text if split is None else text[:split] + images + text[split:])
    pixels = torch.randn(n_images, 3, 28, 28, generator=g) if n_images else None
    return {"input_ids": ids, "pixel_values": pixels}


def _prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [_prompt(g, 3 + (7 * i) % 23, i % 3, split=(i % 4) or None) for i in range(n)]


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    hf = tiny_hf_llava(tiny_config(text={"num_key_value_heads": 2}))
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    hf.save_pretrained(path)
    return hf, Llava.from_pretrained(path, backends=TORCH_BACKENDS).eval()


def _hf_greedy(hf, prompt, max_new_tokens, eos):
    ids = torch.tensor(prompt["input_ids"])
    ids = ids.repeat_interleave(torch.where(ids == IMG, P, 1))[None]
    kwargs = {} if prompt["pixel_values"] is None else {"pixel_values": prompt["pixel_values"]}
    out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                      do_sample=False, eos_token_id=eos, **kwargs)[0, ids.shape[1]:].tolist()
    return out[:-1] if eos is not None and out and out[-1] == eos else out


def test_greedy_matches_transformers_generate(hf_and_ours):
    hf, ours = hf_and_ours
    g = torch.Generator().manual_seed(1)
    prompts = [
        _prompt(g, 12, 1),  # one image, single turn
        _prompt(g, 30, 1, split=20),  # image after earlier turns (multi-turn)
        _prompt(g, 9, 2, split=4),  # two images
        _prompt(g, 15, 0),  # text only
    ]
    ours_out = ours.generate(prompts, max_new_tokens=12)
    for prompt, got in zip(prompts, ours_out):
        assert got == _hf_greedy(hf, prompt, 12, None)
    # Early EOS: the id a prompt greedily produces third ends it there on both sides.
    for prompt, free_run in zip(prompts, ours_out):
        eos = free_run[2]
        got = ours.generate([prompt], max_new_tokens=12, eos_token_id=eos)[0]
        assert got == free_run[: free_run.index(eos)]
        assert got == _hf_greedy(hf, prompt, 12, eos)


def test_cached_logits_equal_full_recompute():
    model = tiny_model(tiny_config(text={"num_key_value_heads": 2}))
    prompts = _prompts(6)
    events = {e.index: e for e in Generator(model, max_batch_size=3, prefill_tokens=40).stream(
        prompts, max_new_tokens=8, return_logits=True) if e.done}
    out = model.generate(prompts, max_new_tokens=8)
    for i, prompt in enumerate(prompts):
        logits = events[i].logits
        assert logits.shape == (8, model.config.text.vocab_size)
        ids = prompt["input_ids"] + out[i]
        batch = PackedBatch.from_samples([{"input_ids": ids, "labels": ids, "pixel_values": prompt["pixel_values"]}],
                                         image_token_id=IMG, num_image_tokens=P)
        with torch.no_grad():
            full = model(batch, return_logits=True, compute_loss=False).logits[-9:]  # prompt end + 8 choices
        err = ((logits - full[:8]).abs().max() / full.abs().max()).item()
        assert err <= 1e-5, f"prompt {i}: cached vs recomputed logits differ by {err:.2e}"


@pytest.mark.slow
def test_batch_invariance_alone_batched_any_order():
    model = tiny_model(tiny_config(text={"num_key_value_heads": 2}))
    prompts = _prompts(64, seed=3)
    alone = [model.generate([p], max_new_tokens=10)[0] for p in prompts]
    assert model.generate(prompts, max_new_tokens=10) == alone
    order = list(range(64))
    random.Random(0).shuffle(order)
    shuffled = model.generate([prompts[i] for i in order], max_new_tokens=10, max_batch_size=7, prefill_tokens=50)
    assert [shuffled[order.index(i)] for i in range(64)] == alone


def test_sampling_is_seeded_per_prompt():
    model = tiny_model()
    prompts = _prompts(5)
    a = model.generate(prompts, max_new_tokens=6, temperature=1.0, seed=7)
    assert a[0] == model.generate(prompts[:1], max_new_tokens=6, temperature=1.0, seed=7)[0]
    # A prompt's draws come from (seed, its index): the same list in batches of 2 gets what it gets in one
    # batch of 5, though its prompts share batches with others and finish in another order.
    reversed_ = prompts[::-1]
    in_twos = model.generate(reversed_, max_new_tokens=6, temperature=1.0, seed=7, max_batch_size=2)
    assert in_twos == model.generate(reversed_, max_new_tokens=6, temperature=1.0, seed=7)
    assert in_twos[2] == a[2]  # the middle prompt keeps index 2, so its stream
    assert a != model.generate(prompts, max_new_tokens=6, temperature=1.0, seed=8)
    greedy = model.generate(prompts, max_new_tokens=6)
    # A nucleus this small keeps only the most likely token: sampling becomes greedy.
    assert model.generate(prompts, max_new_tokens=6, temperature=1.0, top_p=1e-6) == greedy


def test_stop_sequences_and_streaming():
    model = tiny_model()
    prompt = _prompts(1)[0]
    free = model.generate([prompt], max_new_tokens=10)[0]
    stop = free[3:5]
    assert model.generate([prompt], max_new_tokens=10, stop=[stop])[0] == free[:3]
    # Streamed tokens are final: the two tokens that might start the stop sequence are held back.
    events = list(Generator(model).stream([prompt], max_new_tokens=10, stop=[[free[5], 9999]]))
    assert sum((e.tokens for e in events), []) == free
    assert [e.done for e in events][-1] and not any(e.done for e in events[:-1])
    assert model.generate([prompt], max_new_tokens=0) == [[]]


def test_bad_prompts_are_named():
    model = tiny_model()
    with pytest.raises(ValueError, match="prompt 1: 1 image tokens .* but 0 images"):
        model.generate([{"input_ids": [1, 5], "pixel_values": None}, {"input_ids": [1, IMG, 5]}], max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt 0: input_ids is empty"):
        model.generate([{"input_ids": []}], max_new_tokens=2)
