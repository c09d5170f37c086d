"""Tensors a family's checkpoints store stacked that our model keeps apart (Phi-3's `qkv_proj` and
`gate_up_proj`): split into their parts at load, stacked again at export.

A family declares them (`Family.stacked`): each stacked key with its parts in order and their rows along
dim 0 (a Linear's output features). Our decoder keeps q/k/v and gate/up as separate Linear modules whatever
the family, so the kernels, LoRA targets, freezing and FSDP see the same modules for every decoder. A part is
a row range of the stacked tensor, so the sharded loader still reads only its rank's rows of each part
(`RowReader.narrow`), never the whole stacked tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from . import families
from .keys import ROLE_PREFIX


def stacks(config) -> dict[str, tuple[tuple[str, int], ...]]:
    """Canonical llava-hf key of each stacked tensor of `config`'s tower and decoder -> its parts (canonical
    key, rows), in the order the stacked tensor holds them."""
    table = {}
    for family in families.of(config):
        if family.stacked is not None:
            prefix = ROLE_PREFIX[family.role]
            for key, parts in family.stacked(config).items():
                table[prefix + key] = tuple((prefix + part, rows) for part, rows in parts)
    return table


def stacked_key(config, table=None) -> dict[str, str]:
    """Canonical key of each part -> the canonical key of the tensor it is stacked in (of `table`, default
    stacks(config))."""
    return {part: key for key, parts in (table or stacks(config)).items() for part, _ in parts}


def split(tensors: Iterable[tuple[str, str, object]], config) -> Iterator[tuple[str, str, object]]:
    """(canonical key, source for messages, tensor or RowReader) with each stacked tensor replaced by its parts,
    views of its rows (nothing is read or copied here); a part's source names its rows. ValueError naming the
    source when a stacked tensor's rows are not the sum of its parts' for this config."""
    table = stacks(config)
    for key, source, tensor in tensors:
        parts = table.get(key)
        if parts is None:
            yield key, source, tensor
            continue
        shape = tuple(tensor.shape)
        if not shape or shape[0] != sum(rows for _, rows in parts):
            layout = " + ".join(f"{part.rsplit('.', 2)[-2]} {rows}" for part, rows in parts)
            raise ValueError(f"{source}: shape {shape} but this config stacks {layout} rows there")
        start = 0
        for part, rows in parts:
            yield part, f"{source} rows {start}:{start + rows}", tensor.narrow(0, start, rows)
            start += rows


def stack(tensors: Iterable[tuple[str, torch.Tensor]], config) -> Iterator[tuple[str, torch.Tensor]]:
    """(canonical key, tensor) pairs, consumed one at a time, with the parts of each stacked tensor joined into
    it as soon as all of them have come, in any order: what a checkpoint of the family holds. Only the parts
    of stacked tensors not yet complete are held."""
    table = stacks(config)
    owner = stacked_key(config, table)
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors:
        whole = owner.get(key)
        if whole is None:
            yield key, t
            continue
        got = pending.setdefault(whole, {})
        got[key] = t
        if len(got) == len(table[whole]):
            del pending[whole]
            yield whole, torch.cat([got[part] for part, _ in table[whole]])
    # Every part is a parameter of the model (or a carried tensor split at load), so all of them come.
    assert not pending, {key: sorted(got) for key, got in pending.items()}


def stack_adapters(adapters: dict[str, tuple[torch.Tensor, torch.Tensor]], config):
    """LoRA adapters, canonical weight key -> (A (r, in), B (out, r)), with those of each stacked tensor's parts
    joined into one adapter of the stacked tensor, as PEFT adapts the family's stacked Linear: A the parts' A
    one above the other (n r, in), B block-diagonal (rows, n r), so B A is the parts' B_i A_i stacked, exactly;
    a part without an adapter (not a LoRA target) contributes zero blocks. Returns (the adapters, {stacked key:
    n}): a joined adapter has rank n r, so PEFT must give it alpha n alpha to keep LoRA's scale alpha / r."""
    out = dict(adapters)
    joined = {}
    for key, parts in stacks(config).items():
        present = [out[part] for part, _ in parts if part in out]
        if not present:
            continue
        a0, b0 = present[0]
        a_parts, b_parts = [], []
        for part, rows in parts:
            a, b = out.pop(part, (a0.new_zeros(a0.shape), b0.new_zeros(rows, b0.shape[1])))
            a_parts.append(a)
            b_parts.append(b)
        out[key] = (torch.cat(a_parts), torch.block_diag(*b_parts))
        joined[key] = len(parts)
    return out, joined
