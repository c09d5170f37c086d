"""Batched generation for Llava: one packed prefill per wave of prompts, KV-cache decoding, continuous
batching.

Prefill: the prompts admitted together run as ONE packed sequence (cu_seqlens, positions restarting at
0 per prompt, the vision tower once per image), exactly the training forward; each layer also stores
its post-RoPE keys and values in the prompt's cache slot. No prompt is padded, so a prompt's numbers do
not depend on which prompts share its wave (up to the matmul's own row-independence: fp32 on CPU gives
the same tokens alone and in a batch of 64, tested).
Decode: one token per running sequence per step; its query attends over its own slot
(fastllava.ops.decode_attention).
Continuous batching: a sequence that finishes frees its slot at once and waiting prompts are prefilled
into free slots, at most `prefill_tokens` prompt tokens per prefill, so one long answer does not hold a
batch hostage.

Shape legend: T tokens of a forward, R rows whose logits are needed, V vocabulary.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import torch

from ..batch import IGNORE_INDEX, PackedBatch
from .kv_cache import CacheStep, KVCache
from .sampling import next_tokens, prompt_generator

# Decode attention backend for each varlen attention backend a model may be built with.
_DECODE_BACKEND = {"triton": "triton", "torch": "torch", "flash_attn": "flash_attn"}


@dataclass
class Event:
    """What Generator.stream yields: tokens of prompt `index` that are final (no stop sequence can still
    swallow them), in order; `done` on the prompt's last event. With return_logits, the last event's
    `logits` holds the fp32 logits of every choice the prompt made, (n, V), row k the logits its k-th
    token (stop and EOS tokens included) was chosen from."""

    index: int
    tokens: list[int]
    done: bool
    logits: torch.Tensor | None = None


@dataclass
class GenerationStats:
    """Counts and wall clock of the Generator's last run (prefill and decode forwards apart)."""

    prompts: int = 0
    prefill_tokens: int = 0  # prompt positions run (images expanded)
    prefill_seconds: float = 0.0
    prefill_forwards: int = 0
    decode_tokens: int = 0  # tokens fed in decode steps
    decode_seconds: float = 0.0
    decode_steps: int = 0


@dataclass
class _Running:
    index: int
    slot: int
    length: int  # positions already in the cache
    generator: torch.Generator | None
    last: int = -1  # the newest chosen token, fed to the next decode step
    generated: list[int] = field(default_factory=list)
    pending: int = 0  # trailing tokens of `generated` not yet emitted (a stop sequence may still match)
    logits: list[torch.Tensor] = field(default_factory=list)


@dataclass
class _EndRules:
    """When a sequence ends and which of its tokens are final (a stop sequence may still swallow the last
    `holdback` ones)."""

    max_new_tokens: int
    eos: set[int]
    stops: list[list[int]]
    holdback: int
    return_logits: bool

    @classmethod
    def make(cls, max_new_tokens: int, eos_token_id, stop, return_logits: bool) -> "_EndRules":
        if max_new_tokens < 0:
            raise ValueError(f"need max_new_tokens >= 0, got {max_new_tokens}")
        eos = set() if eos_token_id is None else {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
        stops = [list(s) for s in stop or ()]
        if any(not s for s in stops):
            raise ValueError("stop: an empty stop sequence")
        holdback = max((len(s) for s in stops), default=1) - 1
        return cls(max_new_tokens, eos, stops, holdback, return_logits)

    def accept(self, seq: _Running, logits_V: torch.Tensor, token: int) -> Event | None:
        """Record `token` as seq's next choice; the Event of what became final, or None."""
        if self.return_logits:
            seq.logits.append(logits_V)
        done = token in self.eos
        if not done:
            seq.generated.append(token)
            seq.pending += 1
            matched = next((s for s in self.stops if seq.generated[-len(s):] == s), None)
            if matched is not None:
                del seq.generated[-len(matched):]
                seq.pending -= len(matched)
                done = True
            done = done or len(seq.generated) >= self.max_new_tokens
        emit = seq.pending if done else max(0, seq.pending - self.holdback)
        tokens = seq.generated[len(seq.generated) - seq.pending:][:emit]
        seq.pending -= emit
        if not (tokens or done):
            return None
        return Event(seq.index, tokens, done, torch.stack(seq.logits) if self.return_logits and done else None)


def _check_prompts(prompts: Sequence[dict], image_token_id: int, num_image_tokens: int, anyres=None) -> list[int]:
    """Expanded length of every prompt; ValueError naming the prompt for anything malformed. anyres: the model's
    grid (LlavaConfig.anyres), where each image's token count comes from its image_sizes entry."""
    lengths = []
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, dict) or "input_ids" not in prompt:
            raise ValueError(f"prompt {i}: expected a dict with 'input_ids' (and 'pixel_values'), got {type(prompt).__name__}")
        ids = list(prompt["input_ids"])
        if not ids:
            raise ValueError(f"prompt {i}: input_ids is empty")
        pixels = prompt.get("pixel_values")
        n_images = ids.count(image_token_id)
        n_pixels = 0 if pixels is None else pixels.shape[0]
        if anyres is None:
            if n_images != n_pixels:
                raise ValueError(f"prompt {i}: {n_images} image tokens (id {image_token_id}) but {n_pixels} images "
                                 "in pixel_values (one image token per image)")
            lengths.append(len(ids) + n_images * (num_image_tokens - 1))
            continue
        sizes = list(prompt.get("image_sizes") or ())
        tiles = sum(anyres.num_tiles(hw) for hw in sizes)
        if len(sizes) != n_images or tiles != n_pixels:
            raise ValueError(f"prompt {i}: {n_images} image tokens (id {image_token_id}), {len(sizes)} image_sizes "
                             f"and {n_pixels} rows of pixel_values; an AnyRes model needs one (height, width) per "
                             f"image and their {tiles} tiles")
        lengths.append(len(ids) - n_images + sum(anyres.num_tokens(hw) for hw in sizes))
    return lengths


class Generator:
    """Generates for many prompts with one model. max_batch_size: sequences decoded together (KV-cache
    slots); prefill_tokens: the token budget of one prefill forward (a longer prompt runs alone)."""

    def __init__(self, model, *, max_batch_size: int = 64, prefill_tokens: int = 8192):
        if max_batch_size < 1 or prefill_tokens < 1:
            raise ValueError(f"max_batch_size and prefill_tokens must be >= 1, got {max_batch_size}, {prefill_tokens}")
        self.model, self.max_batch_size, self.prefill_tokens = model, max_batch_size, prefill_tokens
        weight = model.lm_head.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.decode_backend = _DECODE_BACKEND.get(model.backends.attention, "auto")
        self.stats = GenerationStats()

    def generate(self, prompts: Sequence[dict], **kwargs) -> list[list[int]]:
        """Generated ids after each prompt, in input order; keyword arguments as `stream`'s."""
        out: list[list[int]] = [[] for _ in prompts]
        for event in self.stream(prompts, **kwargs):
            out[event.index] += event.tokens
        return out

    @torch.no_grad()
    def stream(self, prompts: Sequence[dict], *, max_new_tokens: int, eos_token_id: int | Iterable[int] | None = None,
               temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
               stop: Sequence[Sequence[int]] | None = None, return_logits: bool = False) -> Iterator[Event]:
        """Events as tokens become final (see Event).

        prompts: dicts {"input_ids": list[int] with ONE image token per image, "pixel_values": (n_images,
          3, S, S) tensor or None}; for an AnyRes model pixel_values holds each image's tiles (n_tiles, 3, S, S)
          and "image_sizes" each image's (height, width) (PackedBatch.from_samples).
        max_new_tokens: most tokens generated per prompt. eos_token_id: id(s) that end a sequence (not
          included). stop: token-id sequences that end a sequence when generated (not included).
        temperature 0 is greedy; otherwise softmax(logits / temperature) restricted to the top_p nucleus,
          drawn from a per-prompt generator seeded by (seed, prompt index).
        """
        config = self.model.config
        lengths = _check_prompts(prompts, config.image_token_id, config.num_image_tokens, config.anyres)
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1; got {temperature}, {top_p}")
        rules = _EndRules.make(max_new_tokens, eos_token_id, stop, return_logits)
        self.stats = GenerationStats(prompts=len(prompts))
        if not prompts or max_new_tokens == 0:
            yield from (Event(i, [], True) for i in range(len(prompts)))
            return
        cache = self._new_cache(max(lengths) + max_new_tokens, len(prompts))
        waiting, free = deque(range(len(prompts))), list(range(cache.num_slots - 1, -1, -1))
        running: list[_Running] = []

        def step(prefill: bool, seqs: list[_Running]) -> Iterator[Event]:
            # Timed up to the choices: choosing reads them on the host, which waits for the device; events
            # are yielded after the clock stops (a consumer printing them is not timed).
            start = time.perf_counter()
            logits_RV = (self._prefill(cache, [prompts[s.index] for s in seqs], seqs) if prefill
                         else self._decode(cache, seqs))
            chosen = next_tokens(logits_RV, temperature=temperature, top_p=top_p,
                                 generators=[s.generator for s in seqs])
            if prefill:
                self.stats.prefill_seconds += time.perf_counter() - start
            else:
                self.stats.decode_seconds += time.perf_counter() - start
            for seq, logits_V, token in zip(seqs, logits_RV, chosen):
                event = rules.accept(seq, logits_V, token)
                if event is not None:
                    yield event
                if event is not None and event.done:
                    running.remove(seq)
                    free.append(seq.slot)
                else:
                    seq.last = token

        while waiting or running:
            wave, budget = [], 0
            while waiting and free and (not wave or budget + lengths[waiting[0]] <= self.prefill_tokens):
                index = waiting.popleft()
                budget += lengths[index]
                generator = None if temperature == 0 else prompt_generator(seed, index, self.device)
                wave.append(_Running(index, free.pop(), lengths[index], generator))
            if wave:
                running += wave
                yield from step(True, wave)
            if running:
                yield from step(False, list(running))

    def _new_cache(self, capacity: int, num_prompts: int) -> KVCache:
        """A cache of min(max_batch_size, num_prompts) slots of `capacity` positions."""
        text = self.model.config.text
        if (text.rope_scaling or {}).get("rope_type") == "dynamic" and capacity > text.max_position_embeddings:
            # transformers rescales dynamic NTK RoPE as the cache grows; a cache holds keys rotated once.
            raise ValueError(f"dynamic RoPE scaling past max_position_embeddings ({text.max_position_embeddings}) "
                             f"is not supported by KV-cache generation (prompt + max_new_tokens = {capacity})")
        # A decode step's own max_seqlen is 1: the window is checked here, against the longest sequence a step
        # attends over (the last token chosen is never fed back).
        text.check_length(capacity - 1, "the longest prompt + max_new_tokens - 1")
        return KVCache(text, min(self.max_batch_size, num_prompts), capacity, dtype=self.dtype, device=self.device)

    def _prefill(self, cache: KVCache, prompts: list[dict], seqs: list[_Running]) -> torch.Tensor:
        """Run a wave of prompts as one pack, filling their slots; (R, V) fp32 logits at each prompt's end."""
        config = self.model.config
        batch = PackedBatch.from_samples(
            [{"input_ids": p["input_ids"], "labels": [IGNORE_INDEX] * len(p["input_ids"]),
              "pixel_values": p.get("pixel_values"), "image_sizes": p.get("image_sizes")} for p in prompts],
            image_token_id=config.image_token_id, num_image_tokens=config.num_image_tokens,
            anyres=config.anyres).to(self.device)
        slots_T = torch.tensor([s.slot for s in seqs], device=self.device).repeat_interleave(
            torch.tensor([s.length for s in seqs], device=self.device))
        step = CacheStep(cache, slots_T, batch.position_ids, decoding=False, backend=self.decode_backend)
        embeds_TD = self.model.embed(batch)
        hidden_TD = self.model.language_model(embeds_TD, batch.position_ids, batch.cu_seqlens, batch.max_seqlen, step)
        logits_RV = self.model.lm_head(hidden_TD[batch.cu_seqlens[1:].long() - 1]).float()
        self.stats.prefill_tokens += batch.num_tokens
        self.stats.prefill_forwards += 1
        return logits_RV

    def _decode(self, cache: KVCache, seqs: list[_Running]) -> torch.Tensor:
        """One token for each running sequence: its last choice goes in at the next position. (R, V) fp32."""
        ids_B = torch.tensor([s.last for s in seqs], device=self.device)
        positions_B = torch.tensor([s.length for s in seqs], device=self.device)
        b = len(seqs)
        cu_seqlens = torch.arange(b + 1, dtype=torch.int32, device=self.device)
        step = CacheStep(cache, torch.tensor([s.slot for s in seqs], device=self.device), positions_B,
                         decoding=True, backend=self.decode_backend)
        # Generated ids are plain text rows of the table (an <image> id generated by the model is no image).
        embeds_BD = self.model.language_model.embed_tokens(ids_B)
        hidden_BD = self.model.language_model(embeds_BD, positions_B, cu_seqlens, 1, step)
        logits_RV = self.model.lm_head(hidden_BD).float()
        for s in seqs:
            s.length += 1
        self.stats.decode_tokens += b
        self.stats.decode_steps += 1
        return logits_RV
