"""QuantizedWeight: packing, quantize -> dequantize against an independent reading, files."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lorart
from lorart.quant import NF4_VALUES, QuantizedWeight, code_table, pack_codes, unpack_codes


def _dequant_by_loops(qw: QuantizedWeight) -> torch.Tensor:
    """An independent, element-by-element reading of the documented layout."""
    n, k = qw.shape
    table = {"asym": [float(q) for q in range(16)], "sym": [float(q - 8) for q in range(16)],
             "nf4": list(NF4_VALUES)}[qw.scheme]
    out = torch.empty(n, k, dtype=torch.float64)
    q = qw.qweight.tolist()
    s = qw.scales.double().tolist()
    o = qw.offsets.double().tolist() if qw.offsets is not None else None
    for row in range(n):
        for col in range(k):
            byte = q[row][col // 2]
            code = (byte >> 4) if col % 2 else (byte & 15)
            g = col // qw.group_size
            out[row, col] = s[row][g] * table[code] + (o[row][g] if o is not None else 0.0)
    return out


@pytest.mark.parametrize("scheme", ["asym", "sym", "nf4"])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
def test_dequantize_matches_layout(scheme, group_size):
    w = torch.randn(5, 2 * group_size)
    qw = lorart.quantize(w, group_size=group_size, scheme=scheme)
    assert qw.qweight.shape == (5, group_size) and qw.qweight.dtype == torch.uint8
    expected = _dequant_by_loops(qw)
    # dequantize computes in float32: products of fp16 scales and 4-bit codes are exact
    # in float32, so only the final offset addition rounds.
    torch.testing.assert_close(qw.dequantize(torch.float64), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scheme,max_rel", [("asym", 0.5 / 15), ("sym", 1 / 8), ("nf4", 0.17)])
def test_quantize_error_is_bounded_by_the_grid(scheme, max_rel):
    """Round-to-nearest: within half a grid step (sym: Q4_0 clips the far side by 1/8)."""
    w = torch.randn(64, 256) * 3
    qw = lorart.quantize(w, group_size=64, scheme=scheme, scale_dtype=torch.float32)
    err = (qw.dequantize() - w).abs().view(64, 4, 64).amax(-1)
    span = w.view(64, 4, 64)
    span = span.amax(-1) - span.amin(-1) if scheme == "asym" else span.abs().amax(-1)
    assert torch.all(err <= max_rel * span * 1.0001 + 1e-6)


def test_sym_keeps_the_largest_magnitude_exact():
    w = torch.randn(8, 32)
    qw = lorart.quantize(w, group_size=32, scheme="sym", scale_dtype=torch.float32)
    idx = w.abs().argmax(-1)
    rows = torch.arange(8)
    torch.testing.assert_close(qw.dequantize()[rows, idx], w[rows, idx], rtol=1e-6, atol=0)


def test_constant_group_is_exact():
    w = torch.full((3, 64), 0.25)
    for scheme in ("asym", "sym", "nf4"):
        torch.testing.assert_close(lorart.quantize(w, 32, scheme).dequantize(), w)


_EVEN_CODES = st.lists(st.integers(0, 15), min_size=2, max_size=64).filter(
    lambda c: len(c) % 2 == 0)


@given(codes=_EVEN_CODES)
@settings(max_examples=50, deadline=None)
def test_pack_unpack_roundtrip(codes):
    t = torch.tensor([codes], dtype=torch.int64)
    packed = pack_codes(t)
    assert packed.shape == (1, len(codes) // 2)
    assert torch.equal(unpack_codes(packed), t)
    assert int(packed[0, 0]) == codes[0] | (codes[1] << 4)  # low nibble = even k


@given(
    n=st.integers(1, 6),
    groups=st.integers(1, 3),
    group_size=st.sampled_from([32, 64]),
    scheme=st.sampled_from(["asym", "sym", "nf4"]),
    scale=st.floats(1e-3, 1e3),
)
@settings(max_examples=40, deadline=None)
def test_quantize_idempotent(n, groups, group_size, scheme, scale):
    """Quantizing an already-quantized weight reproduces it (codes are on the grid)."""
    w = torch.randn(n, groups * group_size) * scale
    once = lorart.quantize(w, group_size, scheme, scale_dtype=torch.float32).dequantize()
    twice = lorart.quantize(once, group_size, scheme, scale_dtype=torch.float32).dequantize()
    torch.testing.assert_close(twice, once, rtol=1e-5, atol=1e-5 * scale)


def test_code_tables():
    assert code_table("asym").tolist() == list(range(16))
    assert code_table("sym").tolist() == list(range(-8, 8))
    assert code_table("nf4").tolist() == pytest.approx(NF4_VALUES)


def test_save_load_roundtrip(tmp_path):
    for scheme in ("asym", "nf4"):
        qw = lorart.quantize(torch.randn(7, 128), 64, scheme)
        qw.save(tmp_path / f"{scheme}.safetensors")
        back = QuantizedWeight.load(tmp_path / f"{scheme}.safetensors")
        assert back.scheme == scheme and back.group_size == 64 and back.shape == qw.shape
        assert torch.equal(back.dequantize(), qw.dequantize())


def test_load_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"qweight": torch.zeros(2, 16, dtype=torch.uint8)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not a lorart quantized weight"):
        QuantizedWeight.load(tmp_path / "x.safetensors")


def test_to_and_nbytes():
    qw = lorart.quantize(torch.randn(4, 256), 128, "asym")
    assert qw.nbytes() == 4 * 128 + 2 * (4 * 2 * 2)
    assert qw.to("cpu").device.type == "cpu"
    assert qw.in_features == 256 and qw.out_features == 4


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        (dict(group_size=48), ValueError, "group_size must be one of"),
        (dict(group_size=64, k=96), ValueError, "not divisible by group_size"),
        (dict(scheme="int3"), ValueError, "scheme must be one of"),
        (dict(scale_dtype=torch.bfloat16), TypeError, "scale_dtype"),
    ],
)
def test_quantize_bad_input(kwargs, err, match):
    k = kwargs.pop("k", 128)
    with pytest.raises(err, match=match):
        lorart.quantize(torch.randn(4, k), **kwargs)


def test_quantize_rejects_non_float_and_non_2d():
    with pytest.raises(TypeError, match="floating point"):
        lorart.quantize(torch.ones(4, 64, dtype=torch.int32), 32)
    with pytest.raises(TypeError, match="2-D"):
        lorart.quantize(torch.randn(64), 32)


def test_quantized_weight_checks_its_parts():
    qw = lorart.quantize(torch.randn(4, 64), 32, "asym")
    with pytest.raises(ValueError, match="scales must have shape"):
        QuantizedWeight(qw.qweight, qw.scales[:, :1], qw.offsets, 32, "asym")
    with pytest.raises(ValueError, match="offsets must be given"):
        QuantizedWeight(qw.qweight, qw.scales, None, 32, "asym")
    with pytest.raises(TypeError, match="uint8"):
        QuantizedWeight(qw.qweight.int(), qw.scales, qw.offsets, 32, "asym")


# ------------------------------------------------------------------ 8-bit layout
def _dequant8_by_loops(qw: QuantizedWeight) -> torch.Tensor:
    """An independent, element-by-element reading of the documented int8 layout."""
    n, k = qw.shape
    out = torch.empty(n, k, dtype=torch.float64)
    q, s = qw.qweight.tolist(), qw.scales.double().tolist()
    o = qw.offsets.double().tolist() if qw.offsets is not None else None
    for row in range(n):
        for col in range(k):
            g = col // qw.group_size
            out[row, col] = s[row][g] * q[row][col] + (o[row][g] if o is not None else 0.0)
    return out


@pytest.mark.parametrize("group_size", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("with_offsets", [False, True])
def test_int8_layout(group_size, scale_dtype, with_offsets):
    n, k = 5, 2 * group_size
    codes = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    scales = torch.rand(n, k // group_size).to(scale_dtype)
    offsets = torch.randn(n, k // group_size).to(scale_dtype) if with_offsets else None
    qw = QuantizedWeight(codes, scales, offsets, group_size, "int8")
    assert qw.shape == (n, k) and qw.bits == 8
    per_group = (2 if with_offsets else 1) * scales.element_size()
    assert qw.nbytes() == n * k + per_group * scales.numel()
    torch.testing.assert_close(qw.dequantize(torch.float64), _dequant8_by_loops(qw),
                               rtol=1e-6, atol=1e-6)
    assert torch.equal(qw.rows(torch.tensor([3, 0])).dequantize(), qw.dequantize()[[3, 0]])


@pytest.mark.parametrize("group_size", [16, 64])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
def test_int8_quantize_error_is_half_a_step(group_size, scale_dtype):
    w = torch.randn(16, 4 * group_size) * 2
    qw = lorart.quantize(w, group_size, "int8", scale_dtype=scale_dtype)
    assert qw.qweight.dtype == torch.int8 and qw.offsets is None
    assert int(qw.codes().abs().max()) == 127
    step = qw.scales.float().repeat_interleave(group_size, 1)
    assert torch.all((qw.dequantize() - w).abs() <= 0.5 * step * 1.0001 + 1e-7)


def test_int8_group_16_only_for_8_bits():
    with pytest.raises(ValueError, match="4-bit"):
        lorart.quantize(torch.randn(2, 64), 16, "asym")
    assert lorart.quantize(torch.randn(2, 64), 16, "int8").group_size == 16


def test_int8_checks_its_parts():
    qw = lorart.quantize(torch.randn(4, 64), 32, "int8")
    with pytest.raises(TypeError, match="int8"):
        QuantizedWeight(qw.qweight.view(torch.uint8), qw.scales, None, 32, "int8")
    with pytest.raises(TypeError, match="uint8"):  # 4-bit schemes keep their packed bytes
        QuantizedWeight(qw.qweight, qw.scales, None, 32, "sym")
    with pytest.raises(ValueError, match="scales must have shape"):
        QuantizedWeight(qw.qweight, qw.scales[:, :1], None, 32, "int8")
    with pytest.raises(ValueError, match="no 16-entry code table"):
        code_table("int8")


@pytest.mark.parametrize("with_offsets", [False, True])
def test_int8_save_load_roundtrip(tmp_path, with_offsets):
    qw = lorart.quantize(torch.randn(7, 64), 16, "int8", scale_dtype=torch.float32)
    if with_offsets:
        qw = QuantizedWeight(qw.qweight, qw.scales, torch.randn_like(qw.scales), 16, "int8")
    qw.save(tmp_path / "w.safetensors")
    back = QuantizedWeight.load(tmp_path / "w.safetensors")
    assert back.scheme == "int8" and back.group_size == 16 and back.shape == qw.shape
    assert torch.equal(back.dequantize(), qw.dequantize())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("scheme", ["asym", "sym", "nf4", "int8"])
def test_quantize_refuses_non_finite_weights(bad, scheme):
    w = torch.randn(4, 64)
    w[2, 17] = bad
    with pytest.raises(ValueError, match=r"NaN or infinite.*\[2, 17\]"):
        lorart.quantize(w, 32, scheme)
