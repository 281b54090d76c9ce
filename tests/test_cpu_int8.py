"""The C++ kernels of the 8-bit (``int8``) layout against ``lorart.reference``, every ISA.

Forward through both paths (decode GEMV, many-row buffered), fp32 and bf16, group sizes
16..256, fp16/fp32 scales, with and without offsets, odd shapes, 1-3 adapters with -1
rows, bias; the C++ dequantizer exactly against ``QuantizedWeight.dequantize``; the
backward and a layer through the op surface; torch.compile / opcheck of the custom op.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close

import lorart
from lorart import reference
from lorart.backend import LoRAArgs
from lorart.backend.base import SCHEME_IDS, buffer
from lorart.quant import GROUP_SIZES_8BIT, QuantizedWeight

cpu = pytest.importorskip("lorart.backend.cpu", reason="lorart._C not built")
from lorart.backend import cpu_int8  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16)
PATHS = {"decode": 1 << 30, "many": 0}


def int8_forward(x, qw, bias, a, b, rank_offsets, lora_scales, ids,
                 decode_max_rows=cpu_int8.INT8_DECODE_MAX_ROWS):
    """The cpu backend's op with an 8-bit weight (scheme 3), as ``CpuBackend.forward`` calls
    it, with the decode/many-row crossover forced."""
    return torch.ops.lorart.cpu_lora_forward(
        x, qw.qweight, qw.scales, qw.offsets, SCHEME_IDS["int8"], qw.group_size, bias, a, b,
        rank_offsets, lora_scales, ids, decode_max_rows)


def _int8_weight(n, k, g, scale_dtype=torch.float16, offsets=False) -> QuantizedWeight:
    qw = lorart.quantize(torch.randn(n, k), g, "int8", scale_dtype=scale_dtype)
    if offsets:  # e.g. GGUF Q5_1/Q5_K: codes and an offset per group
        qw = QuantizedWeight(qw.qweight, qw.scales, (torch.randn(n, k // g) * 0.1).to(scale_dtype),
                             g, "int8")
    return qw


def _lora(ranks, k, n, dtype) -> LoRAArgs:
    offs = [0]
    for r in ranks:
        offs.append(offs[-1] + r)
    return LoRAArgs(torch.randn(offs[-1], k).to(dtype) * 0.1, torch.randn(n, offs[-1]).to(dtype),
                    offs, [0.5 + i for i in range(len(ranks))])


def _check(x, qw, bias, lora, ids, path):
    got = int8_forward(
        x, qw, bias, None if lora is None else lora.a, None if lora is None else lora.b,
        [0] if lora is None else lora.rank_offsets, [] if lora is None else lora.scales, ids,
        decode_max_rows=PATHS[path])
    expected = reference.lora_forward(
        x, qw, bias, None if lora is None else lora.a, None if lora is None else lora.b,
        [0] if lora is None else lora.rank_offsets, [] if lora is None else lora.scales, ids)
    assert got.dtype == x.dtype and got.shape == expected.shape
    assert_close(got, expected, x.dtype)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 5, 13])
@pytest.mark.parametrize("g,scale_dtype,offsets", [(16, torch.float32, False),
                                                   (32, torch.float16, True),
                                                   (64, torch.float16, False),
                                                   (128, torch.float32, True),
                                                   (256, torch.float16, False)])
def test_forward_matches_reference(isa, path, dtype, m, g, scale_dtype, offsets):
    n, k = 37, 2 * g
    qw = _int8_weight(n, k, g, scale_dtype, offsets)
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n).to(dtype)
    lora = _lora([3, 1, 8], k, n, dtype)
    ids = torch.tensor([(i % 4) - 1 for i in range(m)], dtype=torch.int32)  # -1, 0, 1, 2
    _check(x, qw, bias, lora, ids, path)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("n,k,m", [(1, 16, 1), (2, 48, 7), (65, 80, 2), (130, 272, 9)])
def test_odd_shapes_base_only_and_single_adapter(isa, path, n, k, m):
    qw = _int8_weight(n, k, 16, torch.float32, offsets=True)
    x = torch.randn(m, k)
    _check(x, qw, None, None, None, path)
    _check(x, qw, None, _lora([5], k, n, torch.float32), None, path)  # every row adapter 0


def test_zero_rows_and_strided_x(isa):
    qw = _int8_weight(9, 64, 32)
    assert int8_forward(torch.randn(0, 64), qw, None, None, None, [0], [], None).shape == (0, 9)
    x = torch.randn(4, 128)[:, ::2]  # non-contiguous rows
    _check(x, qw, None, None, None, "decode")


@pytest.mark.parametrize("g", GROUP_SIZES_8BIT)
@pytest.mark.parametrize("offsets", [False, True])
def test_cpp_dequantize(isa, g, offsets):
    qw = _int8_weight(11, 2 * g, g, torch.float16, offsets)
    expected = qw.dequantize()
    got = cpu_int8.int8_dequantize(qw, torch.float32)
    # fma(q, s, o) rounds once where dequantize rounds twice: at most 1 ulp apart
    assert_close(got, expected, torch.float32)
    if not offsets:  # no addition: both are the exact product
        assert torch.equal(got, expected)
    assert torch.equal(cpu_int8.int8_dequantize(qw, torch.bfloat16), got.to(torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES)
def test_backend_forward_and_backward_through_the_op_surface(monkeypatch, dtype):
    """The automatic choice for CPU tensors is the cpu backend; its gradients for an
    8-bit base (dense backward on the C++-dequantized W) equal the reference's."""
    monkeypatch.setenv("LORART_BACKEND", "cpu")
    qw = _int8_weight(24, 64, 16, torch.float32, offsets=True)
    x = torch.randn(5, 64).to(dtype).requires_grad_(True)
    a = (torch.randn(4, 64) * 0.1).to(dtype).requires_grad_(True)
    b = torch.randn(24, 4).to(dtype).requires_grad_(True)
    y = lorart.lora_linear(x, qw, a, b, 0.5)
    dy = torch.randn_like(y)
    y.backward(dy)
    expected = reference.lora_forward(x.detach(), qw, None, a.detach(), b.detach(), [0, 4], [0.5],
                                      None)
    assert_close(y.detach(), expected, dtype)
    dx, da, db = reference.lora_backward(dy, x.detach(), qw, a.detach(), b.detach(), [0, 4], [0.5],
                                         None)
    assert_close(x.grad, dx, dtype)
    assert_close(a.grad, da, dtype)
    assert_close(b.grad, db, dtype)


def test_lora_linear_layer_on_int8(monkeypatch):
    monkeypatch.delenv("LORART_BACKEND", raising=False)
    from lorart.layers import LoRALinear

    layer = LoRALinear.from_linear(torch.nn.Linear(64, 40), "int8", group_size=16)
    layer.add_adapter("a", 4, init_lora_weights=False)
    layer.add_adapter("b", 2, init_lora_weights=False)
    x = torch.randn(6, 64)
    ids = torch.tensor([0, 1, -1, 1, 0, 0])
    with torch.no_grad():
        got = layer(x, adapter_ids=ids)
        monkeypatch.setenv("LORART_BACKEND", "torch")
        expected = layer(x, adapter_ids=ids)
    assert_close(got, expected, torch.float32)


def test_custom_op_opcheck_and_compile():
    qw = _int8_weight(16, 32, 16, torch.float32, offsets=True)
    x = torch.randn(3, 32)
    args = (x, qw.qweight, qw.scales, qw.offsets, SCHEME_IDS["int8"], 16, None, None, None, [0],
            [], None, 4)
    torch.library.opcheck(torch.ops.lorart.cpu_lora_forward, args)

    def f(x):
        return int8_forward(x, qw, None, None, None, [0], [], None)

    compiled = torch.compile(f, fullgraph=True)
    assert_close(compiled(x), f(x), torch.float32)


def test_8bit_kernels_follow_the_active_isa(isa):
    """Each ISA runs its own 8-bit kernels; avx512bf16 (bf16 dot products, which the 8-bit
    kernels do not use) runs the avx512 ones, never the scalar fallback."""
    assert lorart._C.int8_isa() == {"avx512bf16": "avx512"}.get(isa, isa)


def test_boundary_rejects_bad_layouts():
    qw = _int8_weight(4, 48, 16)
    x, y = torch.zeros(1, 48), torch.zeros(1, 4)
    with pytest.raises(ValueError, match="group_size"):
        lorart._C.cpu_int8_forward(1, 0, buffer(x), 48, 4, 48, buffer(qw.qweight),
                                   buffer(qw.scales), (0, 0), 2, 24, (0, 0), (0, 0), (0, 0), 0,
                                   [0], [], (0, 0), buffer(y), 4, 4)
    with pytest.raises(ValueError, match="codes"):  # a buffer shorter than its shape says
        lorart._C.cpu_int8_forward(1, 0, buffer(x), 48, 4, 48, buffer(qw.qweight[:2].clone()),
                                   buffer(qw.scales), (0, 0), 2, 16, (0, 0), (0, 0), (0, 0), 0,
                                   [0], [], (0, 0), buffer(y), 4, 4)
