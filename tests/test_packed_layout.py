"""``model.to(dtype)`` on a quantized lorart model keeps the packed layout's dtypes."""

import pytest
import torch
from torch import nn

import lorart
from lorart.reference import lora_forward


@pytest.mark.parametrize("scheme", ["asym", "sym", "nf4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float_cast_keeps_scales_and_offsets(scheme, dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 24))
    lorart.patch(model, quantize=scheme, group_size=32)
    layers = [m for m in model.modules() if isinstance(m, lorart.LoRALinear)]
    before = [(m.qweight.clone(), m.scales.clone(),
               None if m.offsets is None else m.offsets.clone()) for m in layers]
    model.to(dtype)
    for m, (q, s, o) in zip(layers, before, strict=True):
        assert m.qweight.dtype == torch.uint8 and torch.equal(m.qweight, q)
        assert m.scales.dtype == s.dtype and torch.equal(m.scales, s)
        assert (m.offsets is None) == (o is None)
        if o is not None:
            assert m.offsets.dtype == o.dtype and torch.equal(m.offsets, o)
        assert m.bias.dtype == dtype  # ordinary parameters still convert
    x = torch.randn(5, 96, dtype=dtype)
    first = layers[0]
    want = lora_forward(x, first.base, first.bias, None, None, [0], [], None)
    torch.testing.assert_close(first(x), want, rtol=2e-2, atol=2e-2)
    assert model(x).dtype == dtype
