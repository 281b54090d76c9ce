"""LoRALinear against the plain formula y = x Wᵀ + b + c (x Aᵀ) Bᵀ, per row."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import assert_close
from torch import nn

import lorart
from lorart import AdapterBatch, LoRALinear, quantize
from lorart.layers import AdapterRegistry


def _expected(x, w, bias, adapters, ids):
    """Reference in float64: ``adapters`` = list of (A, B, scale); ``ids`` per row (-1 base)."""
    x2 = x.reshape(-1, x.shape[-1]).double()
    y = x2 @ w.double().T
    if bias is not None:
        y = y + bias.double()
    for i, s in enumerate(ids):
        if s >= 0:
            a, b, c = adapters[s]
            y[i] += c * (x2[i] @ a.double().T) @ b.double().T
    return y.reshape(*x.shape[:-1], w.shape[0])


def _layer(n=37, k=64, bias=True, dtype=torch.float32, ranks=(3, 8, 5), rslora=(False,) * 3):
    lin = nn.Linear(k, n, bias=bias, dtype=dtype)
    layer = LoRALinear.from_linear(lin)
    for i, (r, rs) in enumerate(zip(ranks, rslora)):
        layer.add_adapter(f"a{i}", r, lora_alpha=2.0 * r + i, use_rslora=rs,
                          init_lora_weights=False)
    return lin, layer


def _adapters(layer):
    return [(layer.lora_A[n].detach(), layer.lora_B[n].detach(), layer.scaling(n))
            for n in layer.adapter_names]


def test_scaling_plain_and_rslora():
    _, layer = _layer(ranks=(4, 9), rslora=(False, True))
    assert layer.scaling("a0") == pytest.approx(8.0 / 4)
    assert layer.scaling("a1") == pytest.approx(19.0 / math.sqrt(9))


def test_peft_init_keeps_output_and_random_init_changes_it():
    lin = nn.Linear(32, 16)
    layer = LoRALinear.from_linear(lin)
    layer.add_adapter("zero", 4)  # PEFT init: B = 0
    x = torch.randn(5, 32)
    assert torch.equal(layer.lora_B["zero"], torch.zeros(16, 4))
    assert layer.lora_A["zero"].abs().sum() > 0
    assert_close(layer(x), lin(x))
    layer.add_adapter("rand", 4, init_lora_weights=False)
    layer.set_adapter("rand")
    assert (layer(x) - lin(x)).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_single_active_adapter_and_none(dtype, bias):
    lin, layer = _layer(bias=bias, dtype=dtype)
    x = torch.randn(2, 7, 64, dtype=dtype)
    adapters = _adapters(layer)
    w, b = lin.weight.detach(), None if lin.bias is None else lin.bias.detach()
    for s, name in enumerate(layer.adapter_names):
        layer.set_adapter(name)
        assert_close(layer(x), _expected(x, w, b, adapters, [s] * 14), dtype)
    layer.set_adapter(None)
    assert_close(layer(x), _expected(x, w, b, adapters, [-1] * 14), dtype)
    layer.set_adapter("a1")
    layer.disabled = True
    assert_close(layer(x), _expected(x, w, b, adapters, [-1] * 14), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_per_row_adapter_ids(dtype):
    lin, layer = _layer(dtype=dtype)
    ids = [2, -1, 0, 1, 1, 2, -1, 0, 2]
    x = torch.randn(9, 64, dtype=dtype)
    expected = _expected(x, lin.weight.detach(), lin.bias.detach(), _adapters(layer), ids)
    assert_close(layer(x, adapter_ids=ids), expected, dtype)
    batch = AdapterBatch(torch.tensor(ids), 3)
    assert_close(layer(x, adapter_ids=batch), expected, dtype)
    with pytest.raises(ValueError, match="adapter_ids"):
        layer(x, adapter_ids=[0, 3] + ids[2:])


def test_per_row_ids_one_call_no_python_loop(monkeypatch):
    """Per-row forward is ONE multi_lora_linear call with all adapters in the stack."""
    _, layer = _layer()
    calls = []
    real = lorart.layers.multi_lora_linear

    def spy(x, base, stack, ids, bias=None):
        calls.append(stack.num_adapters)
        return real(x, base, stack, ids, bias)

    monkeypatch.setattr(lorart.layers, "multi_lora_linear", spy)
    layer(torch.randn(6, 64), adapter_ids=[0, 1, 2, 0, -1, 1])
    assert calls == [3]


def test_layer_missing_some_registry_adapters_maps_ids():
    """Global ids cover adapters this layer lacks: those rows get the base only."""
    registry = AdapterRegistry()
    lin1, lin2 = nn.Linear(48, 20), nn.Linear(48, 20)
    l1 = LoRALinear.from_linear(lin1, registry=registry)
    l2 = LoRALinear.from_linear(lin2, registry=registry)
    l1.add_adapter("p", 4, init_lora_weights=False)
    l2.add_adapter("q", 6, init_lora_weights=False)
    l1.add_adapter("q", 2, init_lora_weights=False)
    assert registry.names == ["p", "q"]
    ids = [0, 1, -1, 1, 0]  # global: p=0, q=1
    x = torch.randn(5, 48)
    exp1 = _expected(x, lin1.weight.detach(), lin1.bias.detach(), _adapters(l1), ids)
    assert_close(l1(x, adapter_ids=ids), exp1)
    # l2 has only q (its local index 0): rows using p run the base
    exp2 = _expected(x, lin2.weight.detach(), lin2.bias.detach(), _adapters(l2),
                     [-1, 0, -1, 0, -1])
    assert_close(l2(x, adapter_ids=ids), exp2)


@pytest.mark.parametrize("scheme", ["asym", "sym", "nf4"])
def test_quantized_base(scheme):
    lin = nn.Linear(128, 24)
    layer = LoRALinear.from_linear(lin, quantize_scheme=scheme, group_size=64)
    assert layer.is_quantized and layer.weight is None
    assert lin.weight.numel() == 0  # the float weight was freed
    layer.add_adapter("a", 5, init_lora_weights=False)
    layer.add_adapter("b", 3, lora_alpha=7, init_lora_weights=False)
    w = quantize(nn.Linear(128, 24).weight, 64, scheme)  # shape check of the helper
    assert w.shape == layer.base.shape
    w = layer.base.dequantize()
    x = torch.randn(6, 128)
    ids = [1, 0, -1, 1, 0, 0]
    assert_close(layer(x, adapter_ids=ids),
                 _expected(x, w, lin.bias.detach(), _adapters(layer), ids))
    assert layer.weight_nbytes() < 128 * 24 * 4 / 6


def test_conv1d_weight_in_out():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(nf=30, nx=40)
    nn.init.normal_(conv.weight)
    nn.init.normal_(conv.bias)
    layer = LoRALinear.from_linear(conv)
    assert (layer.out_features, layer.in_features) == (30, 40) and layer.fan_in_fan_out
    layer.add_adapter("a", 4, init_lora_weights=False)
    x = torch.randn(3, 5, 40)
    exp = _expected(x, conv.weight.detach().T, conv.bias.detach(), _adapters(layer), [0] * 15)
    assert_close(layer(x), exp)
    layer.set_adapter(None)
    assert_close(layer(x), conv(x))


def test_gradients_reach_each_adapter():
    lin, layer = _layer(ranks=(3, 5, 2))
    ids = [0, 2, 2, -1, 1, 0, 1]
    x = torch.randn(7, 64, requires_grad=True)
    dy = torch.randn(7, 37)
    (layer(x, adapter_ids=ids) * dy).sum().backward()
    params = {n: (layer.lora_A[n], layer.lora_B[n]) for n in layer.adapter_names}
    # the same loss through the plain formula, with fresh leaves
    leaves = {n: (a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_())
              for n, (a, b) in params.items()}
    x2 = x.detach().clone().requires_grad_()
    y = x2 @ lin.weight.detach().T + lin.bias.detach()
    rows = []
    for i, s in enumerate(ids):
        row = y[i]
        if s >= 0:
            n = layer.adapter_names[s]
            a, b = leaves[n]
            row = row + layer.scaling(n) * (x2[i] @ a.T) @ b.T
        rows.append(row)
    (torch.stack(rows) * dy).sum().backward()
    assert_close(x.grad, x2.grad)
    for n in params:
        assert_close(params[n][0].grad, leaves[n][0].grad, what=f"dA {n}")
        assert_close(params[n][1].grad, leaves[n][1].grad, what=f"dB {n}")


def test_stack_cached_and_rebuilt_on_change():
    _, layer = _layer()
    with torch.no_grad():
        s1, _ = layer.adapter_stack(torch.float32, "cpu")
        s2, _ = layer.adapter_stack(torch.float32, "cpu")
        assert s1 is s2
        layer.lora_B["a1"].add_(1.0)  # in-place change (optimizer step, load_state_dict)
        s3, _ = layer.adapter_stack(torch.float32, "cpu")
        assert s3 is not s2
        assert torch.equal(s3.adapter(1)[1], layer.lora_B["a1"])
        layer.add_adapter("new", 2)
        s4, _ = layer.adapter_stack(torch.float32, "cpu")
        assert s4.num_adapters == 4 and s4.ranks == [3, 8, 5, 2]


def test_merge_unmerge_dense():
    lin, layer = _layer()
    layer.set_adapter("a1")
    x = torch.randn(4, 64)
    before = layer(x)
    w0 = lin.weight.detach().clone()
    layer.merge("a1")
    assert_close(layer(x), before)
    assert not torch.equal(lin.weight, w0)  # the delta went into the base
    with pytest.raises(RuntimeError, match="merged"):
        layer(x, adapter_ids=[0, 1, 2, -1])
    layer.unmerge("a1")
    assert_close(lin.weight.detach(), w0)
    assert_close(layer(x), before)


def test_merge_quantized_needs_requantize_and_warns():
    lin = nn.Linear(64, 16)
    layer = LoRALinear.from_linear(lin, quantize_scheme="asym", group_size=32)
    layer.add_adapter("a", 4, init_lora_weights=False)
    x = torch.randn(3, 64)
    before = layer(x)
    with pytest.raises(ValueError, match="requantize=True"):
        layer.merge("a")
    with pytest.warns(UserWarning, match="lossy"):
        layer.merge("a", requantize=True)
    assert layer.is_quantized
    err = (layer(x) - before).abs().max()
    assert 0 < err < 0.1 * before.abs().max()


def test_bad_arguments():
    _, layer = _layer()
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter("a0", 4)
    with pytest.raises(ValueError, match="r must be"):
        layer.add_adapter("z", 0)
    with pytest.raises(ValueError, match=r"lora_a must be \[r, in_features\] = \[2, 64\]; "
                                         r"got \[3, 64\]$"):
        layer.add_adapter("z", 2, lora_a=torch.randn(3, 64), lora_b=torch.randn(37, 2))
    with pytest.raises(ValueError, match=r"lora_a must be \[r, in_features\] = \[2, 64\]; "
                                         r"got \[64, 2\] — transposed\?"):
        layer.add_adapter("z", 2, lora_a=torch.randn(64, 2), lora_b=torch.randn(37, 2))
    with pytest.raises(ValueError, match="unknown adapter"):
        layer.set_adapter("nope")
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRALinear.from_linear(nn.Conv2d(3, 3, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="group_size"):
            LoRALinear.from_linear(nn.Linear(40, 8), quantize_scheme="asym", group_size=32)


def test_base_linear_matches_linear_and_keeps_its_parameters():
    """BaseLinear: lorart's kernels at inference, torch's autograd when training."""
    from lorart.layers import BaseLinear

    linear = torch.nn.Linear(37, 11)
    wrapped = BaseLinear.wrap(linear)
    assert wrapped.weight is linear.weight and wrapped.bias is linear.bias
    x = torch.randn(3, 5, 37)
    with torch.no_grad():
        expected = linear(x)
        got = wrapped(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    xg = x.clone().requires_grad_(True)
    wrapped(xg).sum().backward()
    torch.testing.assert_close(xg.grad, linear.weight.detach().sum(0).expand_as(x))
