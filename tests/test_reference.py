"""The reference semantics itself: the formula, its backward, gradcheck in float64."""

from __future__ import annotations

import pytest
import torch

import lorart
from lorart import reference


def _naive(x, w, bias, adapters, ids):
    """Row by row, straight from the definition in DESIGN.md."""
    rows = []
    for i in range(x.shape[0]):
        y = x[i] @ w.T + (bias if bias is not None else 0)
        if ids[i] >= 0:
            a, b, c = adapters[ids[i]]
            y = y + c * ((x[i] @ a.T) @ b.T)
        rows.append(y)
    return torch.stack(rows) if rows else x.new_zeros(0, w.shape[0])


@pytest.mark.parametrize("m", [0, 1, 5])
def test_multi_forward_matches_definition(m):
    k, n = 13, 11
    ranks = [1, 4, 7]
    x = torch.randn(m, k, dtype=torch.float64)
    w = torch.randn(n, k, dtype=torch.float64)
    bias = torch.randn(n, dtype=torch.float64)
    adapters = [(torch.randn(r, k, dtype=torch.float64), torch.randn(n, r, dtype=torch.float64),
                 0.5 + s) for s, r in enumerate(ranks)]
    stack = lorart.AdapterStack.from_list(adapters)
    ids = torch.randint(-1, 3, (m,))
    got = reference.lora_forward(x, w, bias, stack.a, stack.b, stack.rank_offsets_list,
                                 stack.scales.tolist(), ids)
    torch.testing.assert_close(got, _naive(x, w, bias, adapters, ids.tolist()))


def test_backward_matches_autograd_of_forward():
    k, n, m = 9, 6, 7
    x = torch.randn(m, k, dtype=torch.float64, requires_grad=True)
    w = torch.randn(n, k, dtype=torch.float64)
    stack = lorart.AdapterStack.from_list(
        [(torch.randn(r, k, dtype=torch.float64), torch.randn(n, r, dtype=torch.float64), 0.7)
         for r in (2, 3)])
    a = stack.a.clone().requires_grad_(True)
    b = stack.b.clone().requires_grad_(True)
    ids = torch.tensor([0, 1, -1, 1, 0, 0, -1])
    y = reference.lora_forward(x, w, None, a, b, stack.rank_offsets_list, [0.7, 0.7], ids)
    dy = torch.randn_like(y)
    y.backward(dy)
    dx, da, db = reference.lora_backward(dy, x.detach(), w, a.detach(), b.detach(),
                                         stack.rank_offsets_list, [0.7, 0.7], ids)
    torch.testing.assert_close(dx, x.grad)
    torch.testing.assert_close(da, a.grad)
    torch.testing.assert_close(db, b.grad)


def test_gradcheck_through_op_surface(monkeypatch):
    """float64 gradcheck of the public op (torch backend: the reference backward)."""
    monkeypatch.setenv("LORART_BACKEND", "torch")
    k, n = 5, 4
    x = torch.randn(3, k, dtype=torch.float64, requires_grad=True)
    w = torch.randn(n, k, dtype=torch.float64)
    a = torch.randn(2, k, dtype=torch.float64, requires_grad=True)
    b = torch.randn(n, 2, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(n, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, a, b, bias: lorart.lora_linear(x, w, a, b, 0.25, bias), (x, a, b, bias))


def test_gradcheck_multi_through_op_surface(monkeypatch):
    monkeypatch.setenv("LORART_BACKEND", "torch")
    k, n = 4, 3
    stack = lorart.AdapterStack.from_list(
        [(torch.randn(r, k, dtype=torch.float64), torch.randn(n, r, dtype=torch.float64), 1.5)
         for r in (1, 3)])
    x = torch.randn(4, k, dtype=torch.float64, requires_grad=True)
    w = torch.randn(n, k, dtype=torch.float64)
    ids = torch.tensor([1, -1, 0, 1])

    def f(x, a, b):
        s = lorart.AdapterStack(a, b, stack.rank_offsets, stack.scales)
        return lorart.multi_lora_linear(x, w, s, ids)

    a = stack.a.clone().requires_grad_(True)
    b = stack.b.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (x, a, b))


def test_quantized_base_uses_dequantized_weight():
    w = torch.randn(8, 64)
    qw = lorart.quantize(w, 32, "nf4")
    x = torch.randn(3, 64)
    got = reference.lora_forward(x, qw, None, None, None, [0], [], None)
    torch.testing.assert_close(got, x @ qw.dequantize().T)


def test_dense_weight_gradient_when_it_requires_grad(monkeypatch):
    monkeypatch.setenv("LORART_BACKEND", "torch")
    x = torch.randn(3, 5)
    w = torch.randn(4, 5, requires_grad=True)
    lorart.lora_linear(x, w, None, None).sum().backward()
    torch.testing.assert_close(w.grad, torch.ones(3, 4).T @ x)


@pytest.mark.parametrize("with_offsets", [False, True])
def test_int8_base_uses_dequantized_weight(with_offsets):
    from lorart.quant import QuantizedWeight

    qw = lorart.quantize(torch.randn(8, 64), 16, "int8")
    if with_offsets:
        qw = QuantizedWeight(qw.qweight, qw.scales, torch.randn_like(qw.scales), 16, "int8")
    x = torch.randn(3, 64)
    got = reference.lora_forward(x, qw, None, None, None, [0], [], None)
    torch.testing.assert_close(got, x @ qw.dequantize().T)
