"""No host reads inside a training micro-step, and the model under fake tensors.

A host read (`int(t)`, `.item()`, `.tolist()`, a boolean mask, `nonzero`, `repeat_interleave` without
output_size, ...) stalls the CPU behind the GPU on every call: the launch queue drains and FSDP's
prefetch waits. `HostReads` is a TorchDispatchMode that records every such op during one forward +
backward of the tiny Llava (torch backends, i.e. the code path the CPU runs and the GPU path's torch
glue), looking inside fastllava's custom ops too (it runs their implementations under itself), plus
every Tensor.tolist call (which reads memory without dispatching any op). The loop reads the step's
statistics once per optimizer step, from the host-side batch; checks live in PackedBatch.check.

The second half runs the same micro-step with the model built under FakeTensorMode on a real batch
(how a 7B plan is made without a GPU), FlopCounterMode counting fastllava's ops by their formulas.
"""

import dataclasses

import pytest
import torch
from tiny_llava import VOCAB, make_samples, pack
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from fastllava.batch import IGNORE_INDEX
from fastllava.flops import FlopModel, pack_stats
from fastllava.model import Llava
from fastllava.ops import varlen_attention
from fastllava.ops._library import IMPLS
from fastllava.ops.merge_visual_tokens import merge_visual_tokens_reference
from fastllava.testing import TORCH_BACKENDS, tiny_config, tiny_model
from fastllava.train.freeze import set_trainable

aten = torch.ops.aten
fl = torch.ops.fastllava


def _bool_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


class HostReads(TorchDispatchMode):
    """Records ops that read tensor values on the host or whose output shape depends on them."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def reads(self, func, args, kwargs) -> bool:
        if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
                    aten._index_put_impl_.default):
            return _bool_index(args[1])  # integer indices have static shapes; a mask becomes nonzero()
        if func is aten.repeat_interleave.Tensor:
            return kwargs.get("output_size") is None
        return torch.Tag.data_dependent_output in func.tags or torch.Tag.dynamic_output_shape in func.tags

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.reads(func, args, kwargs):
            self.found.append(str(func))
        impl = IMPLS.get(func._schema.name)
        if impl is not None:  # a fastllava op: look inside
            with self:
                return impl(*args, **kwargs)
        return func(*args, **kwargs)

    def record_tolist(self, monkeypatch):
        tolist = torch.Tensor.tolist

        def recorded(t):
            self.found.append("Tensor.tolist")
            return tolist(t)

        monkeypatch.setattr(torch.Tensor, "tolist", recorded)


def micro_step(model, batch):
    out = model(batch)
    out.loss_sum.backward()
    return out


def recorded_micro_step(model, batch, monkeypatch):
    """(the host reads HostReads found, the output) of one micro_step."""
    recorder = HostReads()
    recorder.record_tolist(monkeypatch)
    with recorder:
        out = micro_step(model, batch)
    monkeypatch.undo()
    return recorder.found, out


@pytest.mark.parametrize("stage", ["align", "finetune"])
def test_training_micro_step_reads_nothing_on_the_host(stage, monkeypatch):
    model = tiny_model()
    set_trainable(model, stage)
    found, out = recorded_micro_step(model, pack(make_samples(), model.num_image_tokens), monkeypatch)
    assert found == []
    assert torch.isfinite(out.loss_sum)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None for p in trained)
    assert (model.language_model.embed_tokens.weight.grad is not None) == (stage == "finetune")


def test_the_recorder_sees_host_reads_inside_and_outside_ops(monkeypatch):
    """The test above can fail: a count check by value, a boolean mask, and a host read inside a custom
    op's implementation (the Triton interpreter path validates cu_seqlens on the host) are all caught."""
    recorder = HostReads()
    recorder.record_tolist(monkeypatch)
    ids = torch.tensor([5, 7, 7, 2])
    with recorder:
        merge_visual_tokens_reference(ids, torch.randn(9, 4), torch.randn(2, 4), 7)
    assert "aten._local_scalar_dense.default" in recorder.found
    assert "aten.masked_scatter.default" not in recorder.found  # static shape: a scatter is fine
    recorder.found.clear()
    with recorder:
        ids[ids > 4]
    assert recorder.found == ["aten.index.Tensor"]
    recorder.found.clear()
    q = torch.randn(6, 2, 64)
    with recorder:
        varlen_attention(q, q, q, torch.tensor([0, 2, 6], dtype=torch.int32), 4, backend="triton")
    assert "Tensor.tolist" in recorder.found


@pytest.mark.parametrize("stage", ["align", "finetune"])
def test_micro_step_under_fake_tensors_counts_flops(stage):
    """The model built under FakeTensorMode on a real PackedBatch (built outside, as a planner does) runs
    forward + backward; FlopCounterMode sees fastllava's ops and counts them by their formulas, which
    agree with fastllava/flops.py's attention term."""
    batch = pack(make_samples(), 4)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        model = Llava(tiny_config(), TORCH_BACKENDS)  # values do not matter: no init_weights
        set_trainable(model, stage)
        with FlopCounterMode(display=False) as counter:
            out = micro_step(model, batch)
        assert isinstance(out.loss_sum, torch._subclasses.fake_tensor.FakeTensor) and out.loss_sum.fake_mode is mode
        assert model.projector.linears[0].weight.grad is not None
    counts = counter.get_flop_counts()["Global"]
    cfg = model.config
    tokens, sum_sq, images = pack_stats(batch)
    assert counts[fl.varlen_attention] + counts[fl.varlen_attention_backward] == (
        FlopModel.build(cfg, stage).llm_attn_coeff * sum_sq)
    n, c, d = images * model.num_image_tokens, cfg.vision.hidden_size, cfg.text.hidden_size
    assert counts[fl.fused_mlp_projector] == 2 * n * c * d + 2 * n * d * d
    # projector backward: dW2 and the activation gradient, dW1; no dx (the vision tower is frozen)
    assert counts[fl.fused_mlp_projector_backward] == 2 * n * d * d * 2 + 2 * n * c * d
    assert counts[fl.fused_linear_cross_entropy] == 2 * tokens * d * cfg.text.vocab_size


def test_pack_invariants_are_checked_where_the_pack_is_built():
    """What the ops no longer check in the forward, PackedBatch.check (run by from_samples) does once."""
    batch = pack(make_samples(), 4)
    batch.check(vocab_size=VOCAB)
    ids = batch.input_ids.clone()
    ids[0] = VOCAB
    labels = batch.labels.clone()
    labels[-1] = -5
    bad = [
        (dict(max_seqlen=batch.max_seqlen + 1), "max_seqlen"),
        (dict(cu_seqlens=batch.cu_seqlens.flip(0)), "cu_seqlens"),
        (dict(position_ids=torch.arange(batch.num_tokens)), "position_ids"),
        (dict(pixel_values=batch.pixel_values[1:]), "image placeholders"),
        (dict(input_ids=ids), "token ids"),
        (dict(labels=labels), "labels"),
    ]
    for change, message in bad:
        with pytest.raises(ValueError, match=message):
            dataclasses.replace(batch, **change).check(vocab_size=VOCAB)


def test_shifted_labels_with_empty_samples():
    """index_fill_ instead of the boolean mask it replaced: the same targets, empty samples included."""
    empty = {"input_ids": torch.zeros(0, dtype=torch.long), "labels": torch.zeros(0, dtype=torch.long),
             "pixel_values": None}
    s = make_samples()
    for samples in ([empty, s[0], empty, s[1]], [s[1], empty], [empty, empty]):
        batch = pack(samples, 4)
        expected = torch.full_like(batch.labels, IGNORE_INDEX)
        expected[:-1] = batch.labels[1:]
        last = batch.cu_seqlens[1:].long() - 1
        expected[last[last >= 0]] = IGNORE_INDEX
        assert torch.equal(batch.shifted_labels(), expected)
