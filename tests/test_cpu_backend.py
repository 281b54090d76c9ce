"""The C++ ``cpu`` backend against ``lorart.reference``, on every ISA this machine has.

Forward: dense and every 4-bit scheme × group size × scale dtype, fp32 and bf16, odd
shapes, 0/1/3/64 rows through both the decode GEMV and the tiled GEMM path, ranks 1-64,
1-32 adapters with distinct/identical/skewed ids and -1 rows, non-contiguous inputs,
NaN/Inf. Backward: every gradient and the need_* flags. Plus torch.compile and opcheck
of the registered custom ops.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close

import lorart
from lorart import reference
from lorart.adapters import AdapterStack
from lorart.backend import LoRAArgs
from lorart.quant import GROUP_SIZES, SCHEMES

cpu = pytest.importorskip("lorart.backend.cpu", reason="lorart._C not built")

ISAS = cpu.available_isas()  # the `isa` fixture (conftest.py) runs a test on each of them
DTYPES = (torch.float32, torch.bfloat16)
# decode_max_rows values that force each forward path at small shapes.
PATHS = {"decode": 1 << 30, "gemm": 0}


@pytest.fixture(params=list(PATHS))
def path(request, monkeypatch):
    """"decode": every row count runs the streaming decode GEMV; "gemm": none does (on
    avx512bf16 with bf16 x: row streaming below 48 rows, the panel GEMM from 48)."""
    monkeypatch.setattr(cpu, "DECODE_MAX_ROWS", PATHS[request.param])
    monkeypatch.setattr(cpu, "BF16_DECODE_MAX_ROWS", PATHS[request.param])
    monkeypatch.setattr(cpu, "BF16_DENSE_DECODE_MAX_ROWS", PATHS[request.param])
    return request.param


@pytest.fixture
def backend():
    return cpu.CpuBackend()


def _lora(r: int, k: int, n: int, dtype, scale=0.75) -> LoRAArgs:
    return LoRAArgs(torch.randn(r, k).to(dtype), torch.randn(n, r).to(dtype), [0, r], [scale])


def _forward_both(backend, x, base, bias, lora, ids):
    expected = reference.lora_forward(x, base, bias, None if lora is None else lora.a,
                                      None if lora is None else lora.b,
                                      [0] if lora is None else lora.rank_offsets,
                                      [] if lora is None else lora.scales, ids)
    return backend.forward(x, base, bias, lora, ids), expected


# --------------------------------------------------------------------------- registry
def test_backends_reports_cpu_available():
    ok, why = lorart.backends()["cpu"]
    assert ok, why
    assert cpu.isa() in why


def test_unsupported_dtypes_get_a_reason(backend):
    w = torch.randn(7, 8)
    for dtype in (torch.float16, torch.float64):
        why = backend.unsupported(w.to(dtype)[:2], w.to(dtype), None)
        assert why is not None and str(dtype) in why
    assert backend.unsupported(w[:2], w, None) is None


def test_float16_falls_back_to_torch(monkeypatch):
    monkeypatch.delenv("LORART_BACKEND", raising=False)
    x, w = torch.randn(3, 8, dtype=torch.float16), torch.randn(5, 8, dtype=torch.float16)
    assert_close(lorart.lora_linear(x, w, None, None), x.float() @ w.float().T)


def test_isa_env_override():
    """LORART_CPU_ISA picks the initial ISA; one this CPU lacks leaves cpu unavailable."""
    import subprocess
    import sys

    code = "import lorart; print(lorart.backends()['cpu'])"
    env = dict(__import__("os").environ, LORART_CPU_ISA="scalar")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert "(True, 'C++ kernels, scalar of" in out.stdout, out.stdout + out.stderr
    env["LORART_CPU_ISA"] = "sse9"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert "LORART_CPU_ISA=sse9" in out.stdout, out.stdout + out.stderr


def test_isas_match_the_cpu_flags():
    """Each SIMD ISA is offered exactly when /proc/cpuinfo has every feature its TU is
    compiled for (CMakeLists.txt), so a CPU lacking one never runs those instructions."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64") or not __import__("os").path.exists(
            "/proc/cpuinfo"):
        pytest.skip("x86-64 Linux only")
    flags = set(open("/proc/cpuinfo").read().split("flags")[1].split("\n")[0].split())
    need = {"avx2": {"avx2", "fma", "f16c"}}
    need["avx512"] = need["avx2"] | {"avx512f", "avx512bw", "avx512vl", "avx512dq"}
    need["avx512bf16"] = need["avx512"] | {"avx512_bf16"}
    for isa, features in need.items():
        assert (isa in ISAS) == features.issubset(flags), (isa, features - flags)
    assert ISAS[0] == next(i for i in ("avx512bf16", "avx512", "avx2", "scalar") if i in ISAS)


def test_set_isa_rejects_unknown():
    with pytest.raises(ValueError, match="isa"):
        cpu.set_isa("sse9")


# --------------------------------------------------------------------------- forward
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_quantized_forward(isa, path, backend, dtype, scheme, group_size):
    n, k = 37, 2 * group_size
    # Both scale dtypes, alternating over group sizes (halves the run time).
    scale_dtype = torch.float16 if group_size in (32, 128) else torch.float32
    qw = lorart.quantize(torch.randn(n, k), group_size, scheme, scale_dtype)
    bias = torch.randn(n).to(dtype)
    lora = _lora(5, k, n, dtype)
    for m in (1, 3, 9, 50):
        x = torch.randn(m, k).to(dtype)
        y, expected = _forward_both(backend, x, qw, bias, lora, None)
        assert y.dtype == dtype
        assert_close(y, expected, dtype, what=f"{isa} {path} m={m}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", (1, 7, 37, 133))
@pytest.mark.parametrize("k", (1, 7, 37, 133))
def test_dense_forward_odd_shapes(isa, backend, dtype, n, k, monkeypatch):
    w, bias = torch.randn(n, k).to(dtype), torch.randn(n).to(dtype)
    lora = _lora(3, k, n, dtype)
    for path, rows in PATHS.items():
        monkeypatch.setattr(cpu, "DECODE_MAX_ROWS", rows)
        monkeypatch.setattr(cpu, "BF16_DECODE_MAX_ROWS", rows)
        monkeypatch.setattr(cpu, "BF16_DENSE_DECODE_MAX_ROWS", rows)
        for m in (1, 3, 64):
            x = torch.randn(m, k).to(dtype)
            y, expected = _forward_both(backend, x, w, bias, lora, None)
            assert_close(y, expected, dtype, what=f"{isa} {path} m={m}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_rows_give_empty_output(backend, dtype):
    qw = lorart.quantize(torch.randn(7, 64), 32)
    y = backend.forward(torch.randn(0, 64).to(dtype), qw, None, _lora(2, 64, 7, dtype), None)
    assert y.shape == (0, 7) and y.dtype == dtype
    y = lorart.lora_linear(torch.randn(2, 0, 64).to(dtype), qw, None, None)
    assert y.shape == (2, 0, 7)


@pytest.mark.parametrize("rank", (1, 7, 16, 64))
@pytest.mark.parametrize("m", (1, 3, 64))
def test_single_adapter_ranks_through_lora_linear(isa, monkeypatch, rank, m):
    monkeypatch.setenv("LORART_BACKEND", "cpu")
    n, k = 133, 256
    qw = lorart.quantize(torch.randn(n, k), 64, "nf4")
    x, a, b = torch.randn(m, k), torch.randn(rank, k), torch.randn(n, rank)
    expected = reference.lora_forward(x, qw, None, a, b, [0, rank], [0.5], None)
    assert_close(lorart.lora_linear(x, qw, a, b, 0.5), expected)


def _ids(pattern: str, m: int, s: int) -> torch.Tensor:
    if pattern == "distinct":
        ids = torch.arange(m) % s
    elif pattern == "identical":
        ids = torch.full((m,), s - 1)
    else:  # skewed: most rows on adapter 0, a few on others, some base-only
        ids = torch.where(torch.rand(m) < 0.7, 0, torch.randint(0, s, (m,)))
    ids[torch.rand(m) < 0.2] = -1
    return ids.to(torch.int32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_adapters", (1, 5, 32))
@pytest.mark.parametrize("pattern", ("distinct", "identical", "skewed"))
def test_multi_adapter_forward(isa, path, monkeypatch, dtype, num_adapters, pattern):
    monkeypatch.setenv("LORART_BACKEND", "cpu")
    n, k = 37, 128
    ranks = [1 + (7 * s) % 16 for s in range(num_adapters)]  # ragged, 1..16
    stack = AdapterStack.from_list(
        [(torch.randn(r, k).to(dtype), torch.randn(n, r).to(dtype), 0.1 + s) for s, r in
         enumerate(ranks)], capacity=sum(ranks) + 4)  # spare capacity: R > rank_offsets[-1]
    qw = lorart.quantize(torch.randn(n, k), 32, "asym")
    bias = torch.randn(n).to(dtype)
    for m in (3, 64):
        x, ids = torch.randn(m, k).to(dtype), _ids(pattern, m, num_adapters)
        y = lorart.multi_lora_linear(x, qw, stack, ids, bias)
        expected = reference.lora_forward(x, qw, bias, stack.a, stack.b, stack.rank_offsets_list,
                                          stack.scales.tolist(), ids)
        assert_close(y, expected, dtype, what=f"{isa} {path} m={m}")


@pytest.mark.parametrize("chunk_bytes", (1 << 30, 2048))  # one chunk; chunks of 8 rows
def test_bf16_library_gemm_path(isa, backend, monkeypatch, chunk_bytes):
    monkeypatch.setattr(cpu, "LIBRARY_GEMM_MIN_ROWS", 2)
    monkeypatch.setattr(cpu, "_LIBRARY_CHUNK_BYTES", chunk_bytes)
    n, k = 37, 128
    qw = lorart.quantize(torch.randn(n, k), 64, "nf4")
    bias = torch.randn(n).to(torch.bfloat16)
    lora = LoRAArgs(torch.randn(7, k).bfloat16(), torch.randn(n, 7).bfloat16(), [0, 3, 7],
                    [0.5, 2.0])
    x, ids = torch.randn(5, k).bfloat16(), torch.tensor([0, 1, -1, 1, 0], dtype=torch.int32)
    y, expected = _forward_both(backend, x, qw, bias, lora, ids)
    assert_close(y, expected, torch.bfloat16)
    y, expected = _forward_both(backend, x, qw, None, None, None)
    assert_close(y, expected, torch.bfloat16)


def test_large_shape(backend):
    n, k = 4096, 4096
    qw = lorart.quantize(torch.randn(n, k), 128, "asym")
    lora = _lora(16, k, n, torch.float32, 2.0)
    for m in (1, 17):
        y, expected = _forward_both(backend, torch.randn(m, k), qw, None, lora, None)
        assert_close(y, expected, what=f"m={m}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(isa, monkeypatch, dtype):
    monkeypatch.setenv("LORART_BACKEND", "cpu")
    n, k, r = 37, 64, 4
    qw = lorart.quantize(torch.randn(n, k), 32, "sym")
    x = torch.randn(k, 2, 6).to(dtype).permute(1, 2, 0)  # [2, 6, K], K not contiguous
    a = torch.randn(k, r).to(dtype).T  # [r, K] transposed view
    b = torch.randn(n, 2 * r).to(dtype)[:, ::2]  # strided columns
    bias = torch.randn(2 * n).to(dtype)[::2]
    y = lorart.lora_linear(x, qw, a, b, 0.5, bias)
    expected = reference.lora_forward(x.reshape(-1, k), qw, bias, a, b, [0, r], [0.5], None)
    assert_close(y, expected.reshape(2, 6, n), dtype)
    w = torch.randn(k, n).to(dtype).T  # dense base as a transposed view
    rows = torch.randn(12, 2 * k).to(dtype)[:, :k]  # strided rows
    stack = AdapterStack.from_list([(a.contiguous(), b.contiguous(), 0.5)] * 2)
    ids = torch.tensor([0, 1, -1] * 4, dtype=torch.int32)
    y = lorart.multi_lora_linear(rows, w, stack, ids)
    expected = reference.lora_forward(rows, w, None, stack.a, stack.b, stack.rank_offsets_list,
                                      [0.5, 0.5], ids)
    assert_close(y, expected, dtype)


@pytest.mark.parametrize("base_kind", ("dense", "asym"))
def test_nan_and_inf_propagate_like_torch(isa, path, backend, base_kind):
    n, k = 37, 64
    w = torch.randn(n, k)
    base = w if base_kind == "dense" else lorart.quantize(w, 32, "asym")
    x = torch.randn(5, k)
    x[1, 3] = float("nan")
    x[2, 10] = float("inf")
    x[3, 0], x[3, 1] = float("inf"), float("-inf")
    lora = _lora(2, k, n, torch.float32)
    y, expected = _forward_both(backend, x, base, None, lora, None)
    assert y[1].isnan().all()
    assert torch.equal(y.isinf(), expected.isinf()), "Inf pattern differs"
    assert torch.equal(y[y.isinf()], expected[expected.isinf()])
    assert_close(y, expected)


@pytest.mark.skipif("avx512bf16" not in ISAS, reason="no AVX512-BF16 on this CPU")
@pytest.mark.parametrize("base_kind", ("dense", "asym", "nf4"))
def test_bf16_kernels_deep_wide_ragged(backend, monkeypatch, base_kind):
    """The vdpbf16ps kernels past one 2048-deep panel (forward K, backward N), with odd
    K (dense), N not a multiple of 64, ragged ranks, -1 rows, row streaming and panel."""
    monkeypatch.setattr(cpu, "BF16_DECODE_MAX_ROWS", 0)
    monkeypatch.setattr(cpu, "BF16_DENSE_DECODE_MAX_ROWS", 0)
    previous = cpu.isa()
    cpu.set_isa("avx512bf16")
    try:
        n, k = 2101, 2305 if base_kind == "dense" else 2304
        w = torch.randn(n, k)
        base = (w.bfloat16() if base_kind == "dense"
                else lorart.quantize(w, 128, base_kind, torch.float16))
        ranks = [3, 16, 1, 8]
        stack = AdapterStack.from_list([(torch.randn(r, k).bfloat16(),
                                         torch.randn(n, r).bfloat16(), 0.5 + s)
                                        for s, r in enumerate(ranks)])
        lora = LoRAArgs(stack.a, stack.b, stack.rank_offsets_list, stack.scales.tolist())
        bias = torch.randn(n).bfloat16()
        for m in (5, 53):  # row streaming, panel GEMM (6-row tiles with a tail)
            x, dy = torch.randn(m, k).bfloat16(), torch.randn(m, n).bfloat16()
            ids = _ids("skewed", m, len(ranks))
            y, expected = _forward_both(backend, x, base, bias, lora, ids)
            assert_close(y, expected, torch.bfloat16, what=f"forward m={m}")
            got = backend.backward(dy, x, base, lora, ids, True, True)
            want = reference.lora_backward(dy, x, base, lora.a, lora.b, lora.rank_offsets,
                                           lora.scales, ids)
            for name, g, e in zip(("dx", "da", "db"), got, want):
                assert_close(g, e, torch.bfloat16, what=f"{name} m={m}")
    finally:
        cpu.set_isa(previous)


# --------------------------------------------------------------------------- backward
def _backward_case(dtype, base_kind, m, n=37):
    k = 133 if base_kind == "dense" else 128
    base = (torch.randn(n, k).to(dtype) if base_kind == "dense"
            else lorart.quantize(torch.randn(n, k), 32, base_kind))
    offsets, scales = [0, 3, 3, 11], [0.5, 2.0, 0.25]  # adapter 1 has rank 0
    a, b = torch.randn(13, k).to(dtype), torch.randn(n, 13).to(dtype)  # 2 spare rank rows
    ids = _ids("skewed", m, 3)
    x, dy = torch.randn(m, k).to(dtype), torch.randn(m, n).to(dtype)
    return dy, x, base, LoRAArgs(a, b, offsets, scales), ids


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("base_kind", ("dense", "asym", "sym", "nf4"))
@pytest.mark.parametrize("m", (1, 7, 64))
def test_backward(isa, backend, dtype, base_kind, m):
    dy, x, base, lora, ids = _backward_case(dtype, base_kind, m)
    got = backend.backward(dy, x, base, lora, ids, True, True)
    expected = reference.lora_backward(dy, x, base, lora.a, lora.b, lora.rank_offsets,
                                       lora.scales, ids)
    for name, g, e in zip(("dx", "da", "db"), got, expected):
        assert g.dtype == dtype
        assert_close(g, e, dtype, what=f"{isa} {name}")
    assert not got[1][11:].any() and not got[2][:, 11:].any(), "spare rank rows got gradient"


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_flags_and_single_adapter(isa, backend, dtype):
    dy, x, base, lora, _ = _backward_case(dtype, "asym", 5)
    dx, da, db = backend.backward(dy, x, base, lora, None, True, False)
    assert da is None and db is None
    expected = reference.lora_backward(dy, x, base, lora.a, lora.b, lora.rank_offsets,
                                       lora.scales, None)
    assert_close(dx, expected[0], dtype)
    dx, da, db = backend.backward(dy, x, base, lora, None, False, True)
    assert dx is None
    assert_close(da, expected[1], dtype)
    assert_close(db, expected[2], dtype)
    dx, da, db = backend.backward(dy, x, base, None, None, True, True)
    assert da is None and db is None
    assert_close(dx, reference.lora_backward(dy, x, base, None, None, [0], [], None)[0], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_autograd_through_lora_linear(monkeypatch, dtype):
    n, k, r = 37, 64, 4
    qw = lorart.quantize(torch.randn(n, k), 32, "nf4")
    x0, a0, b0 = torch.randn(3, k).to(dtype), torch.randn(r, k).to(dtype), torch.randn(n, r)
    grads = {}
    for name in ("cpu", "torch"):
        monkeypatch.setenv("LORART_BACKEND", name)
        x, a, b = (t.to(dtype).clone().requires_grad_() for t in (x0, a0, b0))
        lorart.lora_linear(x, qw, a, b, 0.5).float().square().sum().backward()
        grads[name] = (x.grad, a.grad, b.grad)
    for g, e in zip(grads["cpu"], grads["torch"]):
        assert_close(g, e, dtype, factor=2.0)


# --------------------------------------------------------------------------- torch.library
def test_torch_compile_matches_eager(monkeypatch):
    monkeypatch.setenv("LORART_BACKEND", "cpu")
    n, k, r = 37, 128, 8
    qw = lorart.quantize(torch.randn(n, k), 64, "asym")
    a, b, bias = torch.randn(r, k), torch.randn(n, r), torch.randn(n)

    def fn(x):
        return torch.relu(lorart.lora_linear(x, qw, a, b, 0.5, bias)) * 2

    x = torch.randn(2, 3, k)
    compiled = torch.compile(fn)
    assert_close(compiled(x), fn(x))


def test_custom_ops_pass_opcheck():
    n, k = 7, 64
    qw = lorart.quantize(torch.randn(n, k), 32, "asym")
    a, b = torch.randn(4, k), torch.randn(n, 4)
    ids = torch.tensor([0, -1, 1], dtype=torch.int32)
    x, dy = torch.randn(3, k), torch.randn(3, n)
    common = (qw.qweight, qw.scales, qw.offsets, 0, 32)
    lora = (a, b, [0, 2, 4], [0.5, 1.0], ids)
    torch.library.opcheck(torch.ops.lorart.cpu_lora_forward,
                          (x, *common, None, *lora, cpu.DECODE_MAX_ROWS))
    torch.library.opcheck(torch.ops.lorart.cpu_lora_backward, (dy, x, *common, *lora, True, True))
