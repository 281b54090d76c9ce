"""The ``cuda`` backend (csrc/cuda decode kernels): status, input checks, the op's fake
implementation and the C++ boundary's argument validation run everywhere; the kernels
themselves are checked against ``lorart.reference`` only where a CUDA GPU is present
(the same file runs unchanged there).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import assert_close

import lorart
from lorart import AdapterStack, quantize, reference
from lorart.backend.base import LoRAArgs
from lorart.backend.cuda import MAX_ROWS, CudaBackend

HAS_GPU = torch.cuda.is_available()
HAS_MODULE = importlib.util.find_spec("lorart._C_cuda") is not None
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
needs_module = pytest.mark.skipif(not HAS_MODULE, reason="lorart._C_cuda is not built")


# ------------------------------------------------------------------ runs on every machine
@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU report")
def test_status_without_gpu_is_unavailable_with_reason():
    ok, why = lorart.backends()["cuda"]
    assert ok is False
    assert "unverified on a GPU" in why
    assert ("no CUDA GPU" in why) or ("not built" in why), why


def test_status_always_says_unverified():
    ok, why = CudaBackend().status()
    assert "unverified on a GPU" in why
    if not HAS_GPU:
        assert not ok


def test_unsupported_cpu_tensors():
    backend = CudaBackend()
    x = torch.randn(3, 64, dtype=torch.float16)
    why = backend.unsupported(x, torch.randn(5, 64, dtype=torch.float16), None)
    assert why is not None and "CUDA tensors" in why
    qw = quantize(torch.randn(5, 64), group_size=32, scheme="nf4")
    assert "CUDA tensors" in backend.unsupported(x, qw, None)


def test_forced_backend_without_gpu_is_a_clear_error(monkeypatch):
    if HAS_GPU:
        pytest.skip("checks the no-GPU error")
    monkeypatch.setenv("LORART_BACKEND", "cuda")
    x = torch.randn(2, 32, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="cuda"):
        lorart.lora_linear(x, torch.randn(4, 32, dtype=torch.float16), None, None)


def _fake_args(quantized: bool, m: int, n: int, k: int, dtype, lora: bool):
    dev = "cuda"
    x = torch.empty(m, k, dtype=dtype, device=dev)
    if quantized:
        weight = torch.empty(n, k // 2, dtype=torch.uint8, device=dev)
        scales = torch.empty(n, k // 32, dtype=torch.float16, device=dev)
    else:
        weight, scales = torch.empty(n, k, dtype=dtype, device=dev), None
    a = b = offs = sc = ids = None
    if lora:
        a = torch.empty(24, k, dtype=dtype, device=dev)
        b = torch.empty(n, 24, dtype=dtype, device=dev)
        offs = torch.empty(3, dtype=torch.int64, device=dev)
        sc = torch.empty(2, dtype=torch.float32, device=dev)
        ids = torch.empty(m, dtype=torch.int32, device=dev)
    return (x, weight, scales, scales if quantized else None, None, a, b, offs, sc, ids,
            32, 0, 16 if lora else 0)


@pytest.mark.parametrize("quantized", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fake_implementation_shapes(quantized, dtype):
    """torch.compile traces the op through its fake implementation: shape and dtype."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        args = _fake_args(quantized, 5, 37, 64, dtype, lora=True)
        y = torch.ops.lorart.cuda_lora_decode(*args)
        assert tuple(y.shape) == (5, 37) and y.dtype == dtype and y.device.type == "cuda"


def _empty(*shape, dtype=torch.float16):
    return torch.empty(*shape, dtype=dtype, device="cuda")


@pytest.mark.parametrize("index, bad, match", [
    (0, lambda: _empty(5, 32), "qweight"),  # x's K no longer matches qweight [N, K/2]
    (2, lambda: _empty(37, 1), "scales"),
    (3, lambda: None, "offsets"),  # scheme asym needs offsets
    (6, lambda: _empty(5, 24), "lora_b"),
    (9, lambda: _empty(2, dtype=torch.int32), "adapter_ids"),
    (12, lambda: 25, "max_rank"),
])
def test_fake_implementation_rejects_bad_shapes(index, bad, match):
    """The op checks shapes host-side (also under torch.compile's fake tensors)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        args = list(_fake_args(True, 5, 37, 64, torch.float16, lora=True))
        args[index] = bad()
        with pytest.raises(ValueError, match=match):
            torch.ops.lorart.cuda_lora_decode(*args)


def _decode_kwargs(**over):
    kw = dict(y=256, x=256, weight=256, scales=256, offsets=256, bias=0, lora_b=0, lora_t=0,
              rank_offsets=0, adapter_ids=0, m=4, n=64, k=128, ldb=0, ldt=0, group_size=32,
              scheme=0, quantized=True, scales_f32=False, act=0, stream=0)
    kw.update(over)
    return kw


@needs_module
@pytest.mark.parametrize("over, match", [
    ({"m": 0}, "rows"),
    ({"m": MAX_ROWS + 1}, "rows"),
    ({"group_size": 48}, "group_size"),
    ({"k": 96, "group_size": 64}, "multiple of group_size"),
    ({"scheme": 4}, "scheme"),
    ({"group_size": 16}, "group_size"),  # groups of 16 are for int8 codes only
    ({"scheme": 3, "group_size": 16, "k": 120}, "multiple of group_size"),
    ({"offsets": 0}, "offsets"),
    ({"scheme": 1}, "offsets"),
    ({"weight": 264}, "aligned"),
    ({"x": 258}, "aligned"),
    ({"lora_b": 256}, "lora_t"),
    ({"lora_b": 256, "lora_t": 256}, "rank_offsets"),
    ({"act": 2}, "act"),
])
def test_decode_boundary_rejects_bad_arguments(over, match):
    """The C++ launcher checks everything before any CUDA call, so this runs without a GPU."""
    from lorart import _C_cuda

    with pytest.raises(ValueError, match=match):
        _C_cuda.lora_decode(**_decode_kwargs(**over))


def test_int8_weight_reaches_the_op_as_scheme_3():
    """An 8-bit ``QuantizedWeight`` goes to the decode op as int8 codes [N, K], scheme 3,
    offsets optional, groups from 16 (checked through the fake implementation)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lorart.quant import QuantizedWeight

    seen = []
    real = torch.ops.lorart.cuda_lora_decode
    with FakeTensorMode():
        for offsets in (False, True):
            n, k, g = 37, 48, 16
            scales = _empty(n, k // g, dtype=torch.float32)
            qw = QuantizedWeight(_empty(n, k, dtype=torch.int8), scales,
                                 _empty(n, k // g, dtype=torch.float32) if offsets else None,
                                 g, "int8")
            stack_a, stack_b = _empty(8, k), _empty(n, 8)
            lora = LoRAArgs(stack_a, stack_b, [0, 3, 8], [1.0, 0.5])
            lora._device_meta = (_empty(3, dtype=torch.int64), _empty(2, dtype=torch.float32))
            x = _empty(5, k)
            assert CudaBackend().unsupported(x, qw, lora) is None
            y = CudaBackend().forward(x, qw, None, lora, _empty(5, dtype=torch.int32))
            assert tuple(y.shape) == (5, n) and y.dtype == torch.float16
            args = (x, qw.qweight, qw.scales, qw.offsets, None, None, None, None, None, None)
            seen.append(tuple(real(*args, g, 3, 0).shape))
            for bad_args, match in (
                    ((x, _empty(n, k // 2, dtype=torch.int8)), "int8 codes"),
                    ((x, qw.qweight), "scheme must be 3")):
                with pytest.raises(ValueError, match=match):
                    real(*bad_args, qw.scales, qw.offsets, None, None, None, None, None, None,
                         g, 0 if match.startswith("scheme") else 3, 0)
    assert seen == [(5, 37), (5, 37)]


@needs_module
def test_shrink_boundary_rejects_bad_arguments():
    from lorart import _C_cuda

    kw = dict(t=256, x=256, lora_a=256, rank_offsets=256, lora_scales=256, adapter_ids=0, m=2,
              k=64, ldt=16, act=0, stream=0)
    with pytest.raises(ValueError, match="rows"):
        _C_cuda.lora_shrink(**(kw | {"m": 17}))
    with pytest.raises(ValueError, match="required"):
        _C_cuda.lora_shrink(**(kw | {"lora_scales": 0}))


@needs_module
def test_module_reports_versions():
    from lorart import _C_cuda

    assert _C_cuda.runtime_version() >= 11000
    assert _C_cuda.driver_version() >= 0
    assert _C_cuda.MAX_ROWS == MAX_ROWS


# ------------------------------------------------------------------ kernels (GPU only)
SCHEMES = ("asym", "sym", "nf4")
DTYPES = (torch.float16, torch.bfloat16)


def _stack(n: int, k: int, ranks, dtype, device) -> AdapterStack:
    adapters = [(torch.randn(r, k), 0.3 * torch.randn(n, r), 0.5 + 0.25 * i)
                for i, r in enumerate(ranks)]
    return AdapterStack.from_list(adapters).to(device, dtype)


def _ids(m: int, num_adapters: int, device) -> torch.Tensor:
    """Mixed adapters with base-only rows: 0, 1, ..., S-1, -1, cycling (M=1 uses one)."""
    return ((torch.arange(m) + 1) % (num_adapters + 1) - 1).to(torch.int32).to(device)


def _reference(x, base, bias, stack, ids):
    return reference.lora_forward(x.float(), base, None if bias is None else bias.float(),
                                  stack.a.float(), stack.b.float(), stack.rank_offsets_list,
                                  [float(s) for s in stack.scales.tolist()], ids)


def _lora_args(stack) -> LoRAArgs:
    return LoRAArgs(stack.a, stack.b, stack.rank_offsets_list,
                    [float(s) for s in stack.scales.tolist()])


@needs_gpu
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size, scale_dtype", [(32, torch.float16), (64, torch.float32),
                                                     (128, torch.float16),
                                                     (256, torch.float32)])
@pytest.mark.parametrize("m, n", [(1, 37), (3, 133), (8, 16), (9, 1), (16, 257)])
def test_quantized_decode_matches_reference(scheme, dtype, group_size, scale_dtype, m, n):
    dev = torch.device("cuda")
    k = group_size * 3  # odd number of groups; not a multiple of the 128-k chunk for g=32
    qw = quantize(torch.randn(n, k), group_size, scheme, scale_dtype).to(dev)
    x = torch.randn(m, k, device=dev).to(dtype)
    bias = torch.randn(n, device=dev).to(dtype)
    stack = _stack(n, k, (3, 16, 1), dtype, dev)
    ids = _ids(m, stack.num_adapters, dev)
    y = CudaBackend().forward(x, qw, bias, _lora_args(stack), ids)
    expected = _reference(x, qw, bias, stack, ids)
    assert_close(y, expected, dtype, what=f"{scheme} g{group_size} M={m} N={n}")
    base_only = reference.lora_forward(x.float(), qw, bias.float(), None, None, [0], [], None)
    # the adapters must matter, or this test could not catch a broken LoRA epilogue
    assert (expected - base_only).abs().max() > 0.02 * expected.abs().max()


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size, scale_dtype, offsets", [
    (16, torch.float32, False), (16, torch.float16, True), (32, torch.float16, False),
    (64, torch.float32, True), (128, torch.float16, False), (256, torch.float32, True)])
@pytest.mark.parametrize("m, n", [(1, 37), (5, 133), (16, 257)])
def test_int8_decode_matches_reference(dtype, group_size, scale_dtype, offsets, m, n):
    """The 8-bit layout (GGUF Q8_0 / Q6_K / Q5_x): K = 5 groups, so with g=16 a lane's
    32 k straddle groups and K (80) ends inside a 128-k chunk and inside a lane."""
    from lorart.quant import QuantizedWeight

    dev = torch.device("cuda")
    k = group_size * 5
    qw = quantize(torch.randn(n, k), group_size, "int8", scale_dtype)
    if offsets:
        qw = QuantizedWeight(qw.qweight, qw.scales, (0.1 * torch.randn(qw.scales.shape))
                             .to(scale_dtype), group_size, "int8")
    qw = qw.to(dev)
    x = torch.randn(m, k, device=dev).to(dtype)
    bias = torch.randn(n, device=dev).to(dtype)
    stack = _stack(n, k, (3, 16, 1), dtype, dev)
    ids = _ids(m, stack.num_adapters, dev)
    y = CudaBackend().forward(x, qw, bias, _lora_args(stack), ids)
    assert_close(y, _reference(x, qw, bias, stack, ids), dtype,
                 what=f"int8 g{group_size} offsets={offsets} M={m} N={n}")


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [7, 37, 133, 136, 2049, 4096])  # odd K: narrow path; % 8: wide
@pytest.mark.parametrize("m", [1, 5, 16])
def test_dense_decode_matches_reference(dtype, k, m):
    dev = torch.device("cuda")
    n = 45
    w = (0.1 * torch.randn(n, k, device=dev)).to(dtype)
    x = torch.randn(m, k, device=dev).to(dtype)
    stack = _stack(n, k, (8, 2), dtype, dev)
    ids = _ids(m, stack.num_adapters, dev)
    y = CudaBackend().forward(x, w, None, _lora_args(stack), ids)
    assert_close(y, _reference(x, w, None, stack, ids), dtype, what=f"dense K={k} M={m}")


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_unaligned_views_and_base_only(dtype):
    """Views at odd offsets take the copy (quantized) or narrow-load (dense) path."""
    dev = torch.device("cuda")
    m, n, k = 4, 29, 256
    storage = torch.randn(m * k + 1, device=dev).to(dtype)
    x = storage[1:].view(m, k)  # 2-byte offset: not 16-byte aligned
    qw = quantize(torch.randn(n, k), 64, "asym").to(dev)
    y = CudaBackend().forward(x, qw, None, None, None)
    expected = reference.lora_forward(x.float(), qw, None, None, None, [0], [], None)
    assert_close(y, expected, dtype, what="quantized, unaligned x, no adapters")
    w = torch.randn(n, k, device=dev).to(dtype)
    y = CudaBackend().forward(x, w, None, None, None)
    assert_close(y, x.float() @ w.float().T, dtype, what="dense, unaligned x")


@needs_gpu
def test_single_adapter_form_and_op_surface(monkeypatch):
    """adapter_ids=None means every row uses adapter 0; the op surface reaches the kernels."""
    monkeypatch.setenv("LORART_BACKEND", "cuda")
    dev, dtype = torch.device("cuda"), torch.bfloat16
    m, n, k = 6, 70, 192
    qw = quantize(torch.randn(n, k), 64, "nf4").to(dev)
    x = torch.randn(m, k, device=dev).to(dtype)
    a = (0.2 * torch.randn(12, k, device=dev)).to(dtype)
    b = (0.2 * torch.randn(n, 12, device=dev)).to(dtype)
    y = lorart.lora_linear(x, qw, a, b, scale=2.0)
    expected = reference.lora_forward(x.float(), qw, None, a.float(), b.float(), [0, 12], [2.0],
                                      None)
    assert_close(y, expected, dtype)
    stack = _stack(n, k, (4, 20), dtype, dev)
    ids = torch.tensor([1, -1, 0, 1, 1, -1], dtype=torch.int32, device=dev)
    y = lorart.multi_lora_linear(x, qw, stack, ids)
    assert_close(y, _reference(x, qw, None, stack, ids), dtype)


@needs_gpu
def test_unsupported_on_gpu():
    backend = CudaBackend()
    dev = torch.device("cuda")
    w = torch.randn(8, 64, device=dev)
    assert "dtype" in backend.unsupported(torch.randn(2, 64, device=dev), w, None)
    x17 = torch.randn(MAX_ROWS + 1, 64, device=dev, dtype=torch.float16)
    assert "rows" in backend.unsupported(x17, w.half(), None)
    assert backend.unsupported(x17[:MAX_ROWS], w.half(), None) is None


@needs_gpu
def test_opcheck():
    dev, dtype = torch.device("cuda"), torch.float16
    m, n, k = 3, 40, 128
    qw = quantize(torch.randn(n, k), 32, "sym").to(dev)
    stack = _stack(n, k, (5,), dtype, dev)
    args = (torch.randn(m, k, device=dev, dtype=dtype), qw.qweight, qw.scales, None, None,
            stack.a, stack.b, stack.rank_offsets.to(dev), stack.scales.to(dev).float(),
            torch.zeros(m, dtype=torch.int32, device=dev), 32, 1, 5)
    torch.library.opcheck(torch.ops.lorart.cuda_lora_decode.default, args)
