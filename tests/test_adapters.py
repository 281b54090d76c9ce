"""AdapterStack packing (ragged ranks, spare capacity) and AdapterBatch metadata."""

from __future__ import annotations

import pytest
import torch

import lorart


def _adapters(ranks, k=10, n=6):
    return [(torch.randn(r, k), torch.randn(n, r), 0.1 * (i + 1)) for i, r in enumerate(ranks)]


def test_from_list_packs_ragged_ranks_without_padding():
    adapters = _adapters([1, 5, 3])
    stack = lorart.AdapterStack.from_list(adapters)
    assert stack.rank_offsets_list == [0, 1, 6, 9]
    assert stack.a.shape == (9, 10) and stack.b.shape == (6, 9)
    assert stack.ranks == [1, 5, 3]
    for s, (a, b, c) in enumerate(adapters):
        got_a, got_b, got_c = stack.adapter(s)
        assert torch.equal(got_a, a) and torch.equal(got_b, b) and got_c == pytest.approx(c)


def test_add_uses_spare_capacity_and_keeps_others():
    adapters = _adapters([2, 3])
    stack = lorart.AdapterStack.from_list(adapters, capacity=16)
    a_storage = stack.a.data_ptr()
    new = _adapters([4])[0]
    assert stack.add(*new) == 2
    assert stack.a.data_ptr() == a_storage  # no re-layout: written into free rows
    assert stack.rank_offsets_list == [0, 2, 5, 9]
    assert torch.equal(stack.adapter(2)[0], new[0])
    assert torch.equal(stack.adapter(0)[1], adapters[0][1])
    stack.add(*_adapters([12])[0])  # beyond capacity: grows
    assert stack.ranks == [2, 3, 4, 12] and stack.a.shape[0] >= 21


def test_stack_rejects_mismatches():
    with pytest.raises(ValueError, match="rank mismatch"):
        lorart.AdapterStack.from_list([(torch.randn(2, 10), torch.randn(6, 3), 1.0)])
    with pytest.raises(ValueError, match=r"adapters\[1\] is for a \[6, 11\] layer"):
        lorart.AdapterStack.from_list(_adapters([2]) + _adapters([2], k=11))
    with pytest.raises(ValueError, match="at least one"):
        lorart.AdapterStack.from_list([])
    with pytest.raises(IndexError):
        lorart.AdapterStack.from_list(_adapters([2])).adapter(1)


def test_multi_with_spare_capacity_matches_single(monkeypatch):
    monkeypatch.setenv("LORART_BACKEND", "torch")
    adapters = _adapters([3, 2])
    stack = lorart.AdapterStack.from_list(adapters, capacity=32)
    x, w = torch.randn(4, 10), torch.randn(6, 10)
    y = lorart.multi_lora_linear(x, w, stack, [1, 1, 0, -1])
    a, b, c = adapters[1]
    torch.testing.assert_close(y[0], lorart.lora_linear(x[:1], w, a, b, c)[0])
    torch.testing.assert_close(y[3], x[3] @ w.T)


def test_segments_group_rows_by_adapter():
    batch = lorart.AdapterBatch(torch.tensor([2, -1, 0, 2, 0, -1, 2]), num_adapters=3)
    order, starts, seg_adapter = batch.segments()
    assert starts.tolist() == [0, 2, 4, 4, 7]
    assert seg_adapter.tolist() == [-1, 0, 1, 2]
    ids = batch.ids[order].tolist()
    assert ids == [-1, -1, 0, 0, 2, 2, 2]
    assert order.tolist() == [1, 5, 2, 4, 0, 3, 6]  # stable
    assert batch.segments() is batch.segments()  # computed once per batch
