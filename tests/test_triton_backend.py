"""The Triton backend against ``lorart.reference``.

Without a GPU these run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set by
conftest) on CPU tensors; on a GPU machine the same file runs the compiled kernels on
CUDA tensors. Shapes are tiny because the interpreter is slow; every scheme, dtype and
path (fused one-adapter, fused BGMV gather, SGMV split, backward) runs at least once.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import assert_close

import lorart
from lorart import AdapterBatch, AdapterStack, reference
from lorart.backend import get_backend
from lorart.backend.triton import TritonBackend, configs
from lorart.quant import QuantizedWeight

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _use_triton(monkeypatch):
    monkeypatch.setenv("LORART_BACKEND", "triton")


def make_base(kind: str, n: int, k: int, dtype: torch.dtype):
    """``kind``: "dense" or "<scheme>-g<group>-<fp16|fp32 scales>", plus "-off" for an
    ``int8`` weight with offsets (as GGUF Q5_1 / Q5_K convert)."""
    w = torch.randn(n, k, device=DEVICE) / k**0.5
    if kind == "dense":
        return w.to(dtype)
    scheme, group, scale, *extra = kind.split("-")
    scale_dtype = torch.float16 if scale == "fp16" else torch.float32
    qw = lorart.quantize(w, int(group[1:]), scheme, scale_dtype)
    if extra == ["off"]:
        offsets = (torch.randn(qw.scales.shape, device=DEVICE) * 0.05).to(scale_dtype)
        qw = QuantizedWeight(qw.qweight, qw.scales, offsets, qw.group_size, scheme)
    return qw


def make_stack(ranks: list[int], n: int, k: int, dtype: torch.dtype,
               capacity: int | None = None) -> AdapterStack:
    adapters = [(torch.randn(r, k, device=DEVICE) / k**0.5,
                 torch.randn(n, r, device=DEVICE) / max(r, 1)**0.5,
                 0.5 + 0.25 * i) for i, r in enumerate(ranks)]
    adapters = [(a.to(dtype), b.to(dtype), s) for a, b, s in adapters]
    return AdapterStack.from_list(adapters, capacity=capacity)


def popularity_ids(kind: str, m: int, s: int) -> torch.Tensor:
    """Adapter ids per row: distinct, identical, zipf-like or skewed popularity, with -1s."""
    if kind == "distinct":
        ids = torch.arange(m) % s
    elif kind == "identical":
        ids = torch.full((m,), s - 1)
    elif kind == "zipf":
        weights = 1.0 / torch.arange(1, s + 1, dtype=torch.float64)
        ids = torch.multinomial(weights, m, replacement=True)
    else:  # skewed: almost all rows on adapter 0, a few elsewhere
        ids = torch.zeros(m, dtype=torch.int64)
        ids[::5] = torch.randint(0, s, (len(ids[::5]),))
    ids = ids.clone()
    ids[1::7] = -1  # base-only rows mixed in
    return ids.to(torch.int32).to(DEVICE)


def reference_forward(x, base, bias, stack: AdapterStack, ids):
    return reference.lora_forward(x.float(), base if not isinstance(base, torch.Tensor)
                                  else base.float(), None if bias is None else bias.float(),
                                  stack.a.float(), stack.b.float(), stack.rank_offsets_list,
                                  stack.scales.tolist(), ids)


# ------------------------------------------------------------------------ registry surface
def test_status_and_device_rules(monkeypatch):
    backend = TritonBackend()
    ok, why = backend.status()
    assert ok, why
    x = torch.randn(2, 32)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET" in backend.unsupported(x, x, None)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    # As in a fresh process (on a GPU machine the kernels may already be compiled).
    monkeypatch.delitem(sys.modules, "lorart.backend.triton.fused_linear", raising=False)
    assert backend.unsupported(x, x, None) is None
    assert "float64" in backend.unsupported(x.double(), x.double(), None)


def test_cpu_tensors_refused_when_kernels_were_built_for_a_gpu(monkeypatch):
    import types

    fake = types.SimpleNamespace(fused_lora_linear_kernel=object())  # not interpreted
    monkeypatch.setitem(sys.modules, "lorart.backend.triton.fused_linear", fake)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(2, 32)
    assert "before the first Triton call" in TritonBackend().unsupported(x, x, None)


def test_status_without_triton(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "triton" else real(name, *a))
    ok, why = TritonBackend().status()
    assert not ok and "triton" in why


def test_import_touches_neither_triton_nor_a_gpu():
    code = ("import sys, lorart, lorart.backend.triton as t; t.TritonBackend(); "
            "assert 'triton' not in sys.modules, 'triton imported'; "
            "import torch; assert not torch.cuda.is_initialized()")
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------ forward
# (base kind, dtype, N, K, rank): odd dense K/N, quantized K = group multiples and odd N,
# all schemes, group sizes 32..256 (16 for int8, with K = 48 ending inside a 32-wide K
# block), fp16/fp32 scales, int8 with and without offsets, ranks 1..128.
SINGLE_CASES = [
    ("dense", torch.float32, 7, 37, 1),
    ("dense", torch.bfloat16, 37, 7, 16),
    ("dense", torch.float16, 33, 40, 5),
    ("asym-g32-fp16", torch.bfloat16, 19, 64, 8),
    ("asym-g256-fp32", torch.float32, 5, 256, 128),
    ("sym-g64-fp32", torch.float16, 21, 128, 3),
    ("sym-g32-fp16", torch.bfloat16, 7, 96, 16),
    ("nf4-g128-fp16", torch.float32, 9, 128, 64),
    ("nf4-g32-fp32", torch.bfloat16, 11, 64, 2),
    ("int8-g16-fp32", torch.float32, 13, 48, 4),
    ("int8-g32-fp16-off", torch.bfloat16, 7, 96, 16),
    ("int8-g256-fp16", torch.float16, 9, 256, 33),
    ("int8-g64-fp32-off", torch.float16, 17, 128, 1),
]


@pytest.mark.parametrize("kind,dtype,n,k,rank", SINGLE_CASES)
def test_single_adapter_forward(kind, dtype, n, k, rank):
    m = 5
    base = make_base(kind, n, k, dtype)
    stack = make_stack([rank], n, k, dtype)
    a, b, scale = stack.adapter(0)
    x = torch.randn(3, m, k, device=DEVICE).to(dtype)  # leading dims flatten to 15 rows
    bias = torch.randn(n, device=DEVICE).to(dtype)
    y = lorart.lora_linear(x, base, a, b, scale, bias)
    ref = reference_forward(x.reshape(-1, k), base, bias, stack, None)
    assert y.dtype == dtype
    assert_close(y.reshape(-1, n), ref, dtype)


@pytest.mark.parametrize("kind,dtype,m", [("int8-g16-fp16-off", torch.float16, 70),
                                          ("int8-g128-fp32", torch.bfloat16, 33)])
def test_int8_many_rows_single_adapter(kind, dtype, m):
    """Prefill-sized tiles (32..64 x 64..128) over 8-bit codes, one adapter for all rows."""
    n, k = 29, 256
    base = make_base(kind, n, k, dtype)
    stack = make_stack([7], n, k, dtype)
    a, b, scale = stack.adapter(0)
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    assert configs.forward_path(m, True, False, True) == "fused"
    assert configs.fused_forward_blocks(configs.bucket_rows(m), n, k, base.group_size, False,
                                        7).m > 16
    y = lorart.lora_linear(x, base, a, b, scale)
    assert_close(y, reference_forward(x, base, None, stack, None), dtype)


@pytest.mark.parametrize("kind,dtype", [("dense", torch.float32), ("asym-g32-fp16",
                                                                      torch.float16)])
def test_base_only_forward(kind, dtype):
    n, k = 13, 64
    base = make_base(kind, n, k, dtype)
    x = torch.randn(6, k, device=DEVICE).to(dtype)
    y = lorart.lora_linear(x, base, None, None)
    assert_close(y, reference.lora_forward(x.float(), base if kind != "dense" else base.float(),
                                           None, None, None, [0], [], None), dtype)


# (popularity, rows, base kind, dtype, ranks): rows <= DECODE_MAX_ROWS take the fused BGMV
# path, more rows the SGMV split path; both see ragged ranks and -1 rows.
MULTI_CASES = [
    ("distinct", 4, "dense", torch.float32, [1, 7, 16]),
    ("zipf", 16, "asym-g64-fp16", torch.bfloat16, [8, 3, 20, 1]),
    ("identical", 3, "nf4-g32-fp32", torch.float16, [4, 33]),
    ("skewed", 9, "sym-g128-fp16", torch.float32, [2, 5, 9]),
    ("distinct", 37, "dense", torch.bfloat16, [1, 7, 16]),
    ("zipf", 45, "asym-g32-fp32", torch.float32, [8, 3, 20, 1, 64]),
    ("identical", 24, "nf4-g64-fp16", torch.bfloat16, [4, 33]),
    ("skewed", 40, "sym-g32-fp32", torch.float16, [2, 5, 9]),
    ("zipf", 7, "int8-g16-fp16-off", torch.float32, [3, 12]),
    ("skewed", 33, "int8-g128-fp32", torch.bfloat16, [5, 1, 8]),
]


@pytest.mark.parametrize("pattern,m,kind,dtype,ranks", MULTI_CASES)
def test_multi_adapter_forward(pattern, m, kind, dtype, ranks):
    n, k = (23, 128) if kind != "dense" else (37, 7)
    base = make_base(kind, n, k, dtype)
    stack = make_stack(ranks, n, k, dtype, capacity=sum(ranks) + 3)  # spare rank rows
    ids = popularity_ids(pattern, m, len(ranks))
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    bias = torch.randn(n, device=DEVICE).to(dtype) if m % 2 else None
    y = lorart.multi_lora_linear(x, base, stack, ids, bias)
    assert_close(y, reference_forward(x, base, bias, stack, ids), dtype)


@pytest.mark.parametrize("multi,kind", [(False, "asym-g32-fp16"), (True, "asym-g32-fp16"),
                                        (False, "int8-g16-fp32-off")])
def test_decode_split_k(multi, kind):
    """Decode grids split K (fp32 partials + a reduce launch); bias is added exactly once.
    The int8 g16 case also has K blocks of two groups each (a scale per column)."""
    n, k, m = 21, 512, 3
    group = int(kind.split("-")[1][1:])
    blocks = configs.fused_forward_blocks(configs.bucket_rows(m), n, k, group, multi, 16)
    assert blocks.split_k > 1 and blocks.k >= group
    base = make_base(kind, n, k, torch.bfloat16)
    stack = make_stack([16, 5] if multi else [16], n, k, torch.bfloat16)
    x = torch.randn(m, k, device=DEVICE).to(torch.bfloat16)
    bias = torch.randn(n, device=DEVICE).to(torch.bfloat16)
    if multi:
        ids = torch.tensor([1, -1, 0], dtype=torch.int32, device=DEVICE)
        y = lorart.multi_lora_linear(x, base, stack, ids, bias)
    else:
        ids = None
        a, b, scale = stack.adapter(0)
        y = lorart.lora_linear(x, base, a, b, scale, bias)
    assert_close(y, reference_forward(x, base, bias, stack, ids), torch.bfloat16)


def test_paths_are_the_documented_ones():
    assert configs.forward_path(1, True, True, True) == "fused_gather"
    assert configs.forward_path(configs.DECODE_MAX_ROWS + 1, True, True, True) == "split"
    assert configs.forward_path(4096, True, False, True) == "fused"
    assert configs.forward_path(4096, False, False, True) == "split"
    assert configs.forward_path(4096, False, False, False) == "library"


def test_fused_gather_and_split_agree_on_the_same_batch():
    """Both multi-adapter paths, called directly on one batch, match the reference."""
    from lorart.backend.triton.fused_linear import fused_forward

    n, k, m = 19, 64, 20
    base = make_base("asym-g32-fp16", n, k, torch.float32)
    stack = make_stack([3, 17, 6], n, k, torch.float32)
    ids = popularity_ids("zipf", m, 3)
    x = torch.randn(m, k, device=DEVICE)
    lora = stack.lora_args()
    ref = reference_forward(x, base, None, stack, ids)
    assert_close(fused_forward(x, base, None, lora, ids, gather=True), ref, torch.float32)
    batch = AdapterBatch(ids, 3)
    backend = get_backend("triton")
    assert_close(backend.forward(x, base, None, lora, batch), ref, torch.float32)


def test_single_adapter_rank_above_one_block_takes_the_split_path():
    n, k, rank = 9, 32, 130
    base = make_base("dense", n, k, torch.float32)
    stack = make_stack([rank], n, k, torch.float32)
    a, b, scale = stack.adapter(0)
    x = torch.randn(3, k, device=DEVICE)
    assert_close(lorart.lora_linear(x, base, a, b, scale), reference_forward(x, base, None,
                                                                            stack, None),
                 torch.float32)


@pytest.mark.parametrize("m", [0, 5, 30])
def test_all_rows_base_only_or_no_rows(m):
    n, k = 11, 32
    base = make_base("sym-g32-fp16", n, k, torch.float16)
    stack = make_stack([4, 2], n, k, torch.float16)
    ids = torch.full((m,), -1, dtype=torch.int32, device=DEVICE)
    x = torch.randn(m, k, device=DEVICE).to(torch.float16)
    y = lorart.multi_lora_linear(x, base, stack, ids)
    assert y.shape == (m, n)
    assert_close(y, reference_forward(x, base, None, stack, ids), torch.float16)


def test_strided_bias_and_transposed_quantized_tensors():
    n, k = 10, 64
    qw = make_base("asym-g32-fp32", n, k, torch.float32)
    # Same values, non-contiguous storage (as a converter's transpose may leave them).
    qw.scales = qw.scales.T.contiguous().T
    qw.offsets = qw.offsets.T.contiguous().T
    assert not qw.scales.is_contiguous()
    bias = torch.randn(2 * n, device=DEVICE)[::2]
    stack = make_stack([3], n, k, torch.float32)
    a, b, scale = stack.adapter(0)
    x = torch.randn(4, k, device=DEVICE)
    y = lorart.lora_linear(x, qw, a, b, scale, bias)
    assert_close(y, reference_forward(x, qw, bias, stack, None), torch.float32)


def test_zero_rows_single_adapter():
    base = make_base("dense", 7, 16, torch.float32)
    stack = make_stack([3], 7, 16, torch.float32)
    a, b, scale = stack.adapter(0)
    assert lorart.lora_linear(torch.randn(0, 16, device=DEVICE), base, a, b, scale).shape == (
        0, 7)


def test_segments_computed_once_per_batch():
    n, k, m = 9, 32, 24
    base = make_base("dense", n, k, torch.float32)
    stack = make_stack([2, 3], n, k, torch.float32)
    batch = AdapterBatch(popularity_ids("zipf", m, 2), 2)
    calls = []
    real = batch.segments
    batch.segments = lambda: calls.append(1) or real()
    x = torch.randn(m, k, device=DEVICE)
    for _ in range(2):  # two "layers" of one batch
        y = lorart.multi_lora_linear(x, base, stack, batch)
    assert len(calls) == 2 and batch._segments is not None  # reused, computed once
    assert_close(y, reference_forward(x, base, None, stack, batch.ids), torch.float32)


# ------------------------------------------------------------------------ backward
BACKWARD_CASES = [
    # (base kind, dtype, rows, ranks or None for lora_linear, N, K)
    ("dense", torch.float32, 6, None, 7, 37),
    ("asym-g32-fp16", torch.bfloat16, 20, None, 9, 64),
    ("nf4-g64-fp32", torch.float32, 5, [3, 8], 13, 64),
    ("sym-g32-fp16", torch.float16, 21, [1, 16, 5], 10, 96),
    ("dense", torch.bfloat16, 18, [4, 2, 7], 17, 24),
    ("int8-g16-fp32-off", torch.float32, 7, [2, 6], 11, 48),
    ("int8-g32-fp16", torch.bfloat16, 19, None, 9, 64),
    ("int8-g64-fp16-off", torch.float16, 6, [3, 2], 10, 128),
]


@pytest.mark.parametrize("kind,dtype,m,ranks,n,k", BACKWARD_CASES)
def test_backward_matches_reference(kind, dtype, m, ranks, n, k):
    base = make_base(kind, n, k, dtype)
    multi = ranks is not None
    stack = make_stack(ranks or [6], n, k, dtype, capacity=sum(ranks or [6]) + 2)
    # The last adapter gets no rows: its gradient must be exactly zero.
    ids = popularity_ids("zipf", m, max(len(stack.ranks) - 1, 1)) if multi else None
    x = torch.randn(m, k, device=DEVICE).to(dtype).requires_grad_()
    a_leaf = stack.a.detach().clone().requires_grad_()
    b_leaf = stack.b.detach().clone().requires_grad_()
    stack.a, stack.b = a_leaf, b_leaf
    if multi:
        y = lorart.multi_lora_linear(x, base, stack, ids)
    else:
        r = stack.ranks[0]
        y = lorart.lora_linear(x, base, a_leaf[:r], b_leaf[:, :r], float(stack.scales[0]))
    dy = torch.randn_like(y)
    y.backward(dy)
    dx, da, db = reference.lora_backward(
        dy.float(), x.detach().float(), base if kind != "dense" else base.float(),
        a_leaf.detach().float(), b_leaf.detach().float(), stack.rank_offsets_list,
        stack.scales.tolist(), ids)
    assert_close(x.grad, dx, dtype, what="dx")
    assert_close(a_leaf.grad, da, dtype, what="da")
    assert_close(b_leaf.grad, db, dtype, what="db")
    if multi:
        lo = stack.rank_offsets_list[-2]
        assert torch.all(a_leaf.grad[lo:] == 0) and torch.all(b_leaf.grad[:, lo:] == 0)


def test_backward_need_flags_direct():
    n, k, m = 8, 32, 5
    base = make_base("asym-g32-fp32", n, k, torch.float32)
    stack = make_stack([3, 5], n, k, torch.float32)
    lora = stack.lora_args()
    ids = torch.tensor([1, -1, 0, 1, 1], dtype=torch.int32, device=DEVICE)
    x = torch.randn(m, k, device=DEVICE)
    dy = torch.randn(m, n, device=DEVICE)
    backend = get_backend("triton")
    dx, da, db = backend.backward(dy, x, base, lora, ids, True, False)
    assert da is None and db is None
    ref = reference.lora_backward(dy, x, base, stack.a, stack.b, stack.rank_offsets_list,
                                  stack.scales.tolist(), ids)
    assert_close(dx, ref[0], torch.float32)
    dx, da, db = backend.backward(dy, x, base, lora, ids, False, True)
    assert dx is None
    assert_close(da, ref[1], torch.float32)
    assert_close(db, ref[2], torch.float32)


# ------------------------------------------------------------------------ bad input
def test_out_of_range_id_never_reaches_the_launcher(monkeypatch):
    from lorart.backend.triton import fused_linear, sgmv

    reached = []

    def trap(*args, **kwargs):
        reached.append(1)
        raise AssertionError("a Triton launcher ran with unvalidated ids")

    monkeypatch.setattr(fused_linear, "fused_forward", trap)
    monkeypatch.setattr(sgmv, "shrink", trap)
    monkeypatch.setattr(TritonBackend, "forward", trap)
    base = make_base("dense", 6, 16, torch.float32)
    stack = make_stack([2, 2], 6, 16, torch.float32)
    x = torch.randn(4, 16, device=DEVICE)
    for bad in ([0, 2, 1, 0], [0, -2, 1, 0]):
        ids = torch.tensor(bad, dtype=torch.int32, device=DEVICE)
        with pytest.raises(ValueError, match="adapter_ids"):
            lorart.multi_lora_linear(x, base, stack, ids)
    assert not reached
