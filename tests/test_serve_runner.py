"""The packed model runner against the HF model's own forward (same weights, adapters)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close

import lorart
from lorart.adapters import AdapterBatch
from lorart.serve import adapter_weights as aw
from lorart.serve.kv_cache import BlockAllocator, PagedKVCache
from lorart.serve.resident import ResidentSlots
from lorart.serve.runner import ModelRunner, SeqChunk, StepBatch
from lorart.serve.testing import projection_paths, random_adapter, tiny_llama, write_peft_dir


def _setup(tmp_path, quantize=None, kv_heads=2):
    model = tiny_llama(quantize=quantize, kv_heads=kv_heads)
    shapes = {p: (model.get_submodule(p).out_features, model.get_submodule(p).in_features)
              for p in projection_paths(model)}
    slots = ResidentSlots(shapes, num_slots=3, max_rank=8)
    for slot, (rank, targets) in enumerate([(4, None), (8, ("q_proj", "v_proj", "down_proj"))]):
        tensors, config = random_adapter(model, rank, seed=slot, targets=targets)
        path = write_peft_dir(tmp_path / f"a{slot}", tensors, config)
        lorart.load_adapter(model, path, f"a{slot}")
        slots.write(slot, aw.read_dir(f"a{slot}", path, model, shapes))
    n_layers, n_kv, head_dim = ModelRunner.kv_shape(model)
    kv = PagedKVCache(n_layers, n_kv, head_dim, num_blocks=32, block_size=4)
    return model, ModelRunner(model, kv, slots), kv, slots


@pytest.mark.parametrize("quantize", [None, "asym"])
def test_runner_matches_hf_forward_prefill_and_decode(tmp_path, quantize):
    """Three sequences (adapter a0, a1, base) prefilled together in one packed step with
    odd lengths, then decoded together: every sampled row equals HF's last logits."""
    model, runner, kv, slots = _setup(tmp_path, quantize)
    names = ["a0", "a1", "__base__"]
    segs = [slots.segment(0), slots.segment(1), -1]
    prompts = [torch.randint(3, 96, (n,)).tolist() for n in (7, 1, 5)]
    tables = [kv.allocator.allocate(3) for _ in prompts]
    for step in range(3):
        tokens, pos, write, seqs, ids, rows = [], [], [], [], [], []
        for p, table, seg in zip(prompts, tables, segs):
            new = p if step == 0 else p[-1:]
            start = len(p) - len(new)
            slots_all = kv.slots(table, 0, len(p))
            seqs.append(SeqChunk(len(tokens), len(new), len(p), slots_all))
            tokens += new
            pos += range(start, len(p))
            write.append(slots_all[start:])
            ids += [seg] * len(new)
            rows.append(len(tokens) - 1)
        batch = StepBatch(torch.tensor(tokens), torch.tensor(pos), torch.cat(write), seqs,
                          AdapterBatch(torch.tensor(ids), slots.num_segments),
                          torch.tensor(rows))
        logits = runner.forward(batch)
        with torch.no_grad():
            for i, (p, name) in enumerate(zip(prompts, names)):
                ref = model(torch.tensor([p]), adapter_names=[name]).logits[0, -1]
                assert_close(logits[i], ref, factor=10, what=f"step {step} seq {i}")
        for p, row in zip(prompts, logits):
            p.append(int(row.argmax()))


def test_runner_chunked_prefill_equals_whole_prefill(tmp_path):
    """A prompt prefilled in chunks of 3 over several steps gives HF's logits."""
    model, runner, kv, slots = _setup(tmp_path)
    prompt = torch.randint(3, 96, (11,)).tolist()
    table = kv.allocator.allocate(3)
    done = 0
    while done < len(prompt):
        n = min(3, len(prompt) - done)
        all_slots = kv.slots(table, 0, done + n)
        batch = StepBatch(torch.tensor(prompt[done:done + n]), torch.arange(done, done + n),
                          all_slots[done:], [SeqChunk(0, n, done + n, all_slots)],
                          AdapterBatch(torch.full((n,), slots.segment(1)), slots.num_segments),
                          torch.tensor([n - 1]))
        logits = runner.forward(batch)
        done += n
    with torch.no_grad():
        ref = model(torch.tensor([prompt]), adapter_names=["a1"]).logits[0, -1]
    assert_close(logits[0], ref, factor=10)


def test_resident_slot_rewrite_leaves_other_slots(tmp_path):
    """Writing a new adapter into slot 1 does not change slot 0's stack rows."""
    model, runner, kv, slots = _setup(tmp_path)
    path = projection_paths(model)[0]
    before = slots.stack(path).adapter(0)[0].clone()
    tensors, config = random_adapter(model, 2, seed=9)
    shapes = {p: (model.get_submodule(p).out_features, model.get_submodule(p).in_features)
              for p in projection_paths(model)}
    slots.write(1, aw.from_tensors("x", tensors, config, model, shapes))
    assert torch.equal(slots.stack(path).adapter(0)[0], before)
    assert slots.stack(path).ranks[2] == 2 and slots.stack(path).ranks[0] == 4
    slots.clear(1)
    assert slots.stack(path).ranks[2] == 0


def test_block_allocator_never_overcommits():
    alloc = BlockAllocator(4)
    a = alloc.allocate(3)
    assert alloc.allocate(2) is None and alloc.num_free == 1
    alloc.free(a)
    assert alloc.num_free == 4 and sorted(alloc.allocate(4)) == [0, 1, 2, 3]
