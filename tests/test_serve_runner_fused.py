"""The runner's fused projection groups (q/k/v and gate/up as one kernel call each, from
lorart.runtime) on base-only steps: same logits as the per-projection calls and as HF."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close
from test_serve_runner import _setup

from lorart.serve.runner import SeqChunk, StepBatch


def _base_step(runner, kv, prompts):
    """Prefill ``prompts`` together in one packed base-only step (``adapters=None``)."""
    tokens, pos, write, seqs, rows = [], [], [], [], []
    for p in prompts:
        table = kv.allocator.allocate(3)
        slots = kv.slots(table, 0, len(p))
        seqs.append(SeqChunk(len(tokens), len(p), len(p), slots))
        tokens += p
        pos += range(len(p))
        write.append(slots)
        rows.append(len(tokens) - 1)
    return runner.forward(StepBatch(torch.tensor(tokens), torch.tensor(pos), torch.cat(write),
                                    seqs, None, torch.tensor(rows)))


@pytest.mark.parametrize("quantize", [None, "asym"])
def test_base_only_step_uses_fused_groups(tmp_path, quantize):
    model, runner, kv, _ = _setup(tmp_path, quantize)
    assert all(f["qkv"] is not None and f["gate_up"] is not None for f in runner.fused)
    prompts = [torch.randint(3, 96, (n,)).tolist() for n in (6, 1, 3)]
    fused = _base_step(runner, kv, prompts)
    calls = []
    for f in runner.fused:  # count the fused calls, then turn them off
        for g in ("qkv", "gate_up"):
            bound = f[g]
            f[g] = (lambda b: lambda x: calls.append(1) or b(x))(bound)
    _base_step(runner, kv, prompts)
    assert len(calls) == 2 * len(runner.fused)
    for f in runner.fused:
        f["qkv"] = f["gate_up"] = None
    separate = _base_step(runner, kv, prompts)
    assert_close(fused, separate, what="fused vs per-projection")
    with torch.no_grad():
        for i, p in enumerate(prompts):
            ref = model(torch.tensor([p]), adapter_names=["__base__"]).logits[0, -1]
            assert_close(fused[i], ref, factor=10, what=f"seq {i} vs HF")


def test_tensor_parallel_shard_is_not_fused(tmp_path):
    from lorart.serve.runner import ModelRunner

    model, runner, kv, slots = _setup(tmp_path)
    model.model.layers[0].mlp.up_proj.tp_group = object()
    runner = ModelRunner(model, kv, slots)
    assert runner.fused[0]["gate_up"] is None and runner.fused[0]["qkv"] is not None
