"""lorart.distributed pieces that need no second process: the communication accounting
(against hand-counted bytes), the slicing of packed quantized weights, and the errors
raised before a process group exists."""

from __future__ import annotations

import pytest
import torch
from test_patch import tiny_llama

import lorart
import lorart.distributed
from lorart.distributed import accounting, shard


def test_accounting_llama2_7b_by_hand():
    """Llama-2-7B, P=2, r=16, fp16: base = two all-reduces of 4096 values, each rank sends
    2·(P−1)/P·8192 B; LoRA = 5 all-gathers of r/P values ((P−1)·16 B each) + 2 all-reduces
    of r values (2·(P−1)/P·32 B each)."""
    shapes = accounting.llama_shapes(4096, 11008, 32, 32)
    full = accounting.comm_per_token(shapes, 16, 2, "fully_sharded")
    rep = accounting.comm_per_token(shapes, 16, 2, "replicated_a")
    assert full.base_bytes == rep.base_bytes == 2 * 8192
    assert full.lora_bytes == 5 * 16 + 2 * 32
    assert rep.lora_bytes == 0
    # adapter values a rank holds: fully sharded = half of every A and B
    values = sum(16 * k + n * 16 for n, k in shapes.values())
    assert full.adapter_bytes_per_rank == values // 2 * 2
    assert rep.adapter_bytes_per_rank > full.adapter_bytes_per_rank
    # rank 5 on 2 ranks: column layers send the padded 6/2 = 3 values
    assert accounting.collective_sizes(shard.COLUMN, 4096, 5, 2, "fully_sharded", 2) == \
        [("all_gather", 6, True)]
    with pytest.raises(ValueError, match="layout must be one of"):
        accounting.comm_per_token(shapes, 16, 2, "ring")


@pytest.mark.parametrize("scheme,group", [("asym", 32), ("nf4", 64), ("int8", 16)])
@pytest.mark.parametrize("kind", [shard.COLUMN, shard.ROW])
def test_quantized_shards_dequantize_to_the_dense_slices(scheme, group, kind):
    w = torch.randn(48, 256)
    qw = lorart.quantize(w, group, scheme)
    dense = qw.dequantize()
    parts = [shard.shard_base(qw, kind, 4, p).dequantize() for p in range(4)]
    assert torch.equal(torch.cat(parts, 0 if kind == shard.COLUMN else 1), dense)


def test_group_split_is_refused():
    qw = lorart.quantize(torch.randn(8, 192), 32, "asym")
    with pytest.raises(ValueError, match="would split a quantization group"):
        shard.check_layer("x.down_proj", shard.ROW, 8, 192, qw, 4)  # 48 columns a rank
    shard.check_layer("x.down_proj", shard.ROW, 8, 192, qw, 2)  # 96 = 3 groups: fine


def test_tensor_parallel_needs_a_process_group():
    m = tiny_llama()
    with pytest.raises(RuntimeError, match="torch.distributed initialized"):
        lorart.distributed.tensor_parallel(m)


def test_serve_tensor_parallel_outside_torchrun_exits_2(monkeypatch, capsys):
    from lorart.commands import serve

    monkeypatch.delenv("RANK", raising=False)
    assert serve.main(["--tensor-parallel", "--port", "0"]) == 2
    assert "start it with torchrun" in capsys.readouterr().err
