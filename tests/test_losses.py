"""``lorart.losses.linear_cross_entropy`` against the unfused loss with a float64 reference:
losses and gradients (hidden, weight, bias), ignore-index rows, tied weights, label
smoothing, 4-bit heads, chunking, bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import TOLERANCE, assert_close
from torch import nn

import lorart
from lorart.losses import IGNORE_INDEX, linear_cross_entropy

DTYPES = [torch.float32, torch.bfloat16]


def _inputs(n: int, h: int, v: int, dtype, ignore_frac: float = 0.3, bias: bool = False):
    hidden = torch.randn(n, h).to(dtype)
    weight = (torch.randn(v, h) / h**0.5).to(dtype)
    b = (torch.randn(v) * 0.1).to(dtype) if bias else None
    targets = torch.randint(0, v, (n,))
    targets[torch.rand(n) < ignore_frac] = IGNORE_INDEX
    return hidden, weight, b, targets


def _unfused(hidden, weight, bias, targets, eps=0.0, reduction="none"):
    """The path the fused loss replaces: all logits, then cross-entropy in float32+."""
    logits = nn.functional.linear(hidden, weight, bias)
    upcast = logits.double() if hidden.dtype == torch.float64 else logits.float()
    return nn.functional.cross_entropy(upcast, targets, ignore_index=IGNORE_INDEX,
                                       label_smoothing=eps, reduction=reduction)


def _grads(fn, hidden, weight, bias, targets, upstream, **kw):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None
              for t in (hidden, weight, bias)]
    out = fn(*leaves, targets, **kw)
    (out * upstream.to(out.dtype)).sum().backward() if out.dim() else out.backward()
    return out.detach(), [t.grad if t is not None else None for t in leaves]


def _err(a, ref):
    return (a.double() - ref).abs().max().item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("n,h,v,chunk", [(37, 16, 133, 5), (64, 24, 1000, None), (7, 8, 50, 64)])
def test_matches_float64_reference_and_unfused(dtype, eps, bias, n, h, v, chunk):
    hidden, weight, b, targets = _inputs(n, h, v, dtype, bias=bias)
    upstream = torch.rand(n)  # a per-row weighting, like the per-adapter means of a mixed batch

    def fused(hd, w, bb, t):
        return linear_cross_entropy(hd, w, t, bb, label_smoothing=eps, chunk_rows=chunk)

    ref_loss, ref_grads = _grads(lambda *a: _unfused(*a, eps=eps),
                                 *[None if t is None else t.double() for t in (hidden, weight, b)],
                                 targets, upstream)
    got_loss, got_grads = _grads(fused, hidden, weight, b, targets, upstream)
    plain_loss, plain_grads = _grads(lambda *a: _unfused(*a, eps=eps), hidden, weight, b,
                                     targets, upstream)
    assert got_loss.dtype == torch.float32
    assert bool((got_loss[targets == IGNORE_INDEX] == 0).all())
    assert_close(got_loss, ref_loss, dtype, what="loss")
    # flash-attention's rule: at most ~2x the error of plain torch in the same dtype
    assert _err(got_loss, ref_loss) <= 2 * _err(plain_loss, ref_loss) + TOLERANCE[dtype] * 1e-2
    for name, g, r, pl in zip(("hidden", "weight", "bias"), got_grads, ref_grads, plain_grads):
        if r is None:
            continue
        assert g.dtype == dtype, name
        assert_close(g, r, dtype, what=f"grad {name}")
        # + one rounding: ∂loss_i/∂hidden_i is stored in the compute dtype in the forward
        # and scaled by the incoming per-row gradient in the backward
        ulp = torch.finfo(dtype).eps * r.abs().max().item()
        assert _err(g, r) <= 2 * _err(pl, r) + ulp, name
    assert bool((got_grads[0][targets == IGNORE_INDEX] == 0).all())


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reductions_match_torch(reduction):
    hidden, weight, b, targets = _inputs(29, 12, 77, torch.float64, bias=True)
    got = linear_cross_entropy(hidden, weight, targets, b, reduction=reduction, chunk_rows=4)
    assert_close(got, _unfused(hidden, weight, b, targets, reduction=reduction), torch.float64)
    assert got.dim() == 0


def test_tied_weights_get_both_gradients():
    """Embedding and output layer share W: its gradient sums both uses."""
    v, h, n = 60, 10, 21
    emb = nn.Embedding(v, h).double()
    ids, targets = torch.randint(0, v, (n,)), torch.randint(0, v, (n,))
    targets[::4] = IGNORE_INDEX
    grads = []
    for fused in (False, True):
        emb.weight.grad = None
        hidden = torch.tanh(emb(ids))
        if fused:
            loss = linear_cross_entropy(hidden, emb.weight, targets, reduction="mean",
                                        chunk_rows=6)
        else:
            loss = _unfused(hidden, emb.weight, None, targets, reduction="mean")
        loss.backward()
        grads.append(emb.weight.grad.clone())
    assert_close(grads[1], grads[0], torch.float64)
    assert grads[1].abs().sum() > 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantized_head_through_the_op_surface(dtype):
    v, h, n = 96, 64, 19
    qw = lorart.quantize(torch.randn(v, h) / 8, group_size=32, scheme="asym")
    dense = qw.dequantize(torch.float64)
    hidden = torch.randn(n, h).to(dtype)
    targets = torch.randint(0, v, (n,))
    targets[3] = IGNORE_INDEX
    ref_loss, (ref_dh, _, _) = _grads(_unfused, hidden.double(), dense, None, targets,
                                      torch.ones(n))
    got_loss, (got_dh, _, _) = _grads(lambda hd, w, bb, t: linear_cross_entropy(
        hd, qw, t, chunk_rows=8), hidden, None, None, targets, torch.ones(n))
    assert_close(got_loss, ref_loss, dtype, what="loss")
    assert_close(got_dh, ref_dh, dtype, what="grad hidden")


def test_module_heads():
    v, h = 40, 8
    linear = nn.Linear(h, v).double()
    hidden, targets = torch.randn(5, 3, h).double(), torch.randint(0, v, (5, 3))
    got = linear_cross_entropy(hidden, linear, targets)
    assert got.shape == (5, 3)
    ref = _unfused(hidden.reshape(15, h), linear.weight, linear.bias, targets.reshape(15))
    assert_close(got.reshape(15), ref, torch.float64)
    layer = lorart.LoRALinear.from_linear(nn.Linear(h, v, bias=False).double())
    assert_close(linear_cross_entropy(hidden, layer, targets).reshape(15),
                 _unfused(hidden.reshape(15, h), layer.weight, None, targets.reshape(15)),
                 torch.float64)
    layer.add_adapter("a", r=2)
    with pytest.raises(TypeError, match="LoRA adapters in use"):
        linear_cross_entropy(hidden, layer, targets)


@pytest.mark.parametrize("scheme,group", [("int8", 32), ("asym", 32)])
def test_packed_output_layers_of_gguf_models_are_fused(scheme, group):
    """``from_gguf`` models end in a ``TiedQuantizedLinear`` (SmolLM2: 8-bit, tied to the
    embedding) or a ``QuantizedLinear``: the fused loss must take them (it fell back to
    full [P, V] logits before), equal to cross-entropy on the module's own logits."""
    from lorart.embedding import QuantizedEmbedding, QuantizedLinear, TiedQuantizedLinear
    from lorart.train.engine import fusable_head

    v, h, n = 96, 64, 21
    qw = lorart.quantize(torch.randn(v, h) / 8, group, scheme)
    hidden = torch.randn(n, h, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    for head in (TiedQuantizedLinear(QuantizedEmbedding(qw)), QuantizedLinear(qw)):
        assert fusable_head(head)
        got = linear_cross_entropy(hidden, head, targets, chunk_rows=8)
        (got_dh,) = torch.autograd.grad(got.sum(), hidden)
        ref = nn.functional.cross_entropy(head(hidden).float(), targets, reduction="none")
        (ref_dh,) = torch.autograd.grad(ref.sum(), hidden)
        assert_close(got, ref, torch.float32, what=f"{type(head).__name__} loss")
        assert_close(got_dh, ref_dh, torch.float32, what=f"{type(head).__name__} grad")


def test_no_logits_tensor_is_kept_for_backward():
    """The autograd graph holds [P, H]-sized tensors, never [P, V] logits."""
    n, h, v = 64, 16, 4096
    hidden, weight, _, targets = _inputs(n, h, v, torch.float32, ignore_frac=0.0)
    hidden.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t,
                                                  lambda t: t):
        loss = linear_cross_entropy(hidden, weight, targets, reduction="mean", chunk_rows=8)
    loss.backward()
    assert saved and max(saved) <= n * h


def test_bad_input_is_rejected():
    hidden, weight, _, targets = _inputs(4, 8, 10, torch.float32)
    with pytest.raises(ValueError, match="weight must be"):
        linear_cross_entropy(hidden, weight[:, :5], targets)
    with pytest.raises(TypeError, match="dtype"):
        linear_cross_entropy(hidden, weight.double(), targets)
    with pytest.raises(ValueError, match="targets must be in"):
        linear_cross_entropy(hidden, weight, torch.full((4,), 10))
    with pytest.raises(ValueError, match="leading shape"):
        linear_cross_entropy(hidden, weight, targets[:3])
    with pytest.raises(ValueError, match="label_smoothing"):
        linear_cross_entropy(hidden, weight, targets, label_smoothing=1.0)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, targets, reduction="avg")
    with pytest.raises(ValueError, match="chunk_rows"):
        linear_cross_entropy(hidden, weight, targets, chunk_rows=0)
