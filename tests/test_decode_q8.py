"""The int8/int16-activation one-row GEMV (csrc/cpu/decode_q8.cpp, the decoder's
``activations="int16"`` default and ``"int8"``) against a float64 reference — the
dequantized weight times the rounded input — scalar and AVX512-VNNI, on odd shapes (K
tails of 32/64/96 in the 128-k chunks), every layout."""

from __future__ import annotations

import pytest
import torch

from lorart import _C, quant
from lorart.backend.base import buffer

PATHS = [False] + ([True] if _C.cpu_has_vnni() else [])


def rounded_x(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """``x̂ [K]`` float64: x rounded per group of 32 to ``bits`` (d = max|x|/127, or /32767
    for 16 bits; round half to even in float32, as the kernel), then ``d · q``."""
    xg = x.view(-1, 32)
    d = xg.abs().amax(1) / (127 if bits == 8 else 32767)
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    q = torch.round(xg * inv[:, None])
    return (q.to(torch.float64) * d.to(torch.float64)[:, None]).reshape(-1)


def q8_reference(w: quant.QuantizedWeight, x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """``y [N]``: the dequantized weight times the rounded input, in float64 (what
    llama.cpp's Q8 dot products compute: scales and offsets both meet the rounded x)."""
    return w.dequantize(torch.float32).to(torch.float64) @ rounded_x(x, bits)


def _run(w: quant.QuantizedWeight, x: torch.Tensor, vnni: bool, bits: int) -> torch.Tensor:
    y = torch.empty(w.shape[0])
    _C.cpu_q8_gemv(n=w.shape[0], k=w.shape[1], int8=w.scheme == "int8",
                   codes=buffer(w.qweight), scales=buffer(w.scales), offsets=buffer(w.offsets),
                   scales_f16=w.scales.dtype == torch.float16, sym=w.scheme == "sym",
                   x=buffer(x), y=buffer(y), vnni=vnni, bits=bits)
    return y


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("vnni", PATHS)
@pytest.mark.parametrize("scheme", ["asym", "sym", "int8"])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,k", [(1, 32), (7, 64), (133, 96), (37, 160), (64, 576), (5, 1536)])
def test_q8_gemv_matches_reference(bits, vnni, scheme, scale_dtype, n, k):
    torch.manual_seed(n * 1000 + k)
    dense = torch.randn(n, k)
    w = quant.quantize(dense, group_size=32, scheme=scheme, scale_dtype=scale_dtype)
    x = torch.randn(k) * torch.linspace(0.1, 3, k)  # groups of different ranges
    x[:32] = 0  # an all-zero group: d = 0
    want = q8_reference(w, x, bits)
    got = _run(w, x, vnni, bits).to(torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    # and the rounding of x is a small error against the float32 product (16 bits: tiny)
    exact = x.to(torch.float64) @ w.dequantize(torch.float32).to(torch.float64).T
    bound = 0.02 if bits == 8 else 2e-4
    assert (got - exact).abs().max() <= bound * exact.abs().max() + 1e-4


def test_q8_gemv_refuses_bad_k():
    w = torch.zeros(4, 24, dtype=torch.int8)
    s = torch.ones(4, 1)
    x, y = torch.zeros(24), torch.zeros(4)
    with pytest.raises(ValueError, match="multiple of 32"):
        _C.cpu_q8_gemv(n=4, k=24, int8=True, codes=buffer(w), scales=buffer(s),
                       offsets=(0, 0), scales_f16=False, sym=False, x=buffer(x), y=buffer(y),
                       vnni=False)
