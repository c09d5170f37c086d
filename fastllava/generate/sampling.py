"""Choosing the next token from logits: greedy, or temperature + nucleus (top-p) sampling.

Sampling draws from one torch.Generator per prompt, seeded from (seed, the prompt's index), so what a
prompt gets depends on neither the other prompts of the batch nor the order in which they finish.
"""

from __future__ import annotations

import torch


def nucleus_filter(probs_RV: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the smallest set whose probability reaches top_p (the most likely token is
    always kept), then renormalize. (R, V) -> (R, V)."""
    if top_p >= 1.0:
        return probs_RV
    sorted_RV, order_RV = probs_RV.sort(dim=-1, descending=True)
    before_RV = sorted_RV.cumsum(-1) - sorted_RV  # probability mass ranked above each token
    sorted_RV = sorted_RV.masked_fill(before_RV >= top_p, 0.0)
    kept_RV = torch.zeros_like(probs_RV).scatter_(-1, order_RV, sorted_RV)
    return kept_RV / kept_RV.sum(-1, keepdim=True)


def next_tokens(logits_RV: torch.Tensor, *, temperature: float, top_p: float,
                generators: list[torch.Generator] | None) -> list[int]:
    """One token per row of logits (R, V): argmax for temperature 0, else a draw from
    softmax(logits / temperature) restricted to the top_p nucleus, row r from generators[r]."""
    if temperature == 0.0:
        return logits_RV.argmax(-1).tolist()
    probs_RV = nucleus_filter(torch.softmax(logits_RV.float() / temperature, dim=-1), top_p)
    return [int(torch.multinomial(row, 1, generator=g)) for row, g in zip(probs_RV, generators)]


def prompt_generator(seed: int, index: int, device: torch.device) -> torch.Generator:
    """The random stream of prompt `index` under `seed`."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)
