"""Bad input to the op surface: a clear error naming the argument, before any kernel."""

from __future__ import annotations

import pytest
import torch

import lorart

K, N, R = 64, 12, 4


@pytest.fixture
def parts():
    return dict(x=torch.randn(3, K), w=torch.randn(N, K), a=torch.randn(R, K),
                b=torch.randn(N, R))


def _stack(n_adapters=3):
    return lorart.AdapterStack.from_list(
        [(torch.randn(R, K), torch.randn(N, R), 1.0) for _ in range(n_adapters)])


@pytest.mark.parametrize(
    "change,err,match",
    [
        (dict(x=torch.randn(3, K + 1)), ValueError, "x has K=65"),
        (dict(a=torch.randn(R, K + 1)), ValueError,
         rf"lora_a must be \[r, K\] = \[{R}, {K}\]; got \[{R}, {K + 1}\]$"),
        (dict(a=torch.randn(K, R)), ValueError,
         rf"lora_a must be \[r, K\] = \[{R}, {K}\]; got \[{K}, {R}\] — transposed\?"),
        (dict(b=torch.randn(N, R + 1)), ValueError, r"lora_b must be \[N, r\]"),
        (dict(b=torch.randn(N + 1, R)), ValueError, r"lora_b must be \[N, r\]"),
        (dict(b=torch.randn(R, N)), ValueError, "lora_b .* transposed"),
        (dict(a=torch.randn(R, K, dtype=torch.float64)), TypeError, "lora_a dtype"),
        (dict(w=torch.randn(N, K).bfloat16()), TypeError, "base weight dtype"),
        (dict(w=torch.randn(N, K, 1)), ValueError, "base must be a weight"),
        (dict(w="W"), TypeError, "base must be a tensor"),
        (dict(x=torch.ones(3, K, dtype=torch.int64)), TypeError, "x must be float32"),
        (dict(x=torch.tensor(1.0)), ValueError, "at least one dimension"),
        (dict(a=None), ValueError, "both be given"),
    ],
)
def test_lora_linear_bad_input(parts, change, err, match):
    p = {**parts, **change}
    with pytest.raises(err, match=match):
        lorart.lora_linear(p["x"], p["w"], p["a"], p["b"], 0.5)


def test_bad_bias_and_scale(parts):
    p = parts
    with pytest.raises(ValueError, match=r"bias must be \[N\] = "):
        lorart.lora_linear(p["x"], p["w"], p["a"], p["b"], 0.5, bias=torch.randn(N + 1))
    with pytest.raises(TypeError, match="scale must be a Python number"):
        lorart.lora_linear(p["x"], p["w"], p["a"], p["b"], torch.tensor(0.5))


def test_quantized_base_k_mismatch():
    qw = lorart.quantize(torch.randn(N, 2 * K), 32)
    with pytest.raises(ValueError, match="in_features=128"):
        lorart.lora_linear(torch.randn(2, K), qw, None, None)


@pytest.mark.parametrize(
    "ids,err,match",
    [
        (torch.tensor([0, 1, 3]), ValueError, r"-1\.\.2"),
        (torch.tensor([0, -2, 1]), ValueError, r"-1\.\.2"),
        (torch.tensor([0, 1]), ValueError, "one id per row"),
        (torch.tensor([0.0, 1.0, 2.0]), TypeError, "int32 or int64"),
        (torch.tensor([[0, 1, 2]]), ValueError, "1-D"),
        ("012", TypeError, "adapter_ids must be"),
    ],
)
def test_multi_bad_ids(parts, ids, err, match):
    with pytest.raises(err, match=match):
        lorart.multi_lora_linear(parts["x"], parts["w"], _stack(), ids)


def test_out_of_range_id_never_reaches_a_backend(parts, monkeypatch):
    """The check runs before dispatch: a backend that would read by the id is never called."""
    import lorart.ops as ops

    called = []
    monkeypatch.setattr(ops, "select_backend", lambda *a: called.append(1))
    with pytest.raises(ValueError):
        lorart.multi_lora_linear(parts["x"], parts["w"], _stack(), torch.tensor([0, 5, 1]))
    assert not called


def test_stack_must_fit_layer(parts):
    other = lorart.AdapterStack.from_list([(torch.randn(R, K), torch.randn(N + 2, R), 1.0)])
    with pytest.raises(ValueError, match="stack holds adapters"):
        lorart.multi_lora_linear(parts["x"], parts["w"], other, [0, 0, 0])
    with pytest.raises(TypeError, match="stack dtype"):
        lorart.multi_lora_linear(parts["x"], parts["w"], _stack().to(dtype=torch.float64),
                                 [0, 0, 0])
    with pytest.raises(TypeError, match="must be an AdapterStack"):
        lorart.multi_lora_linear(parts["x"], parts["w"], [parts["a"]], [0, 0, 0])


def test_adapter_batch_validated_for_another_stack(parts):
    batch = lorart.AdapterBatch([0, 1, 2], num_adapters=5)
    with pytest.raises(ValueError, match="validated for 5 adapters"):
        lorart.multi_lora_linear(parts["x"], parts["w"], _stack(3), batch)


def test_unsupported_group_size_rejected():
    with pytest.raises(ValueError, match="group_size must be one of"):
        lorart.quantize(torch.randn(4, 96), 96)


def test_forced_unknown_backend(parts, monkeypatch):
    monkeypatch.setenv("LORART_BACKEND", "fpga")
    with pytest.raises(ValueError, match="unknown backend 'fpga'"):
        lorart.lora_linear(parts["x"], parts["w"], parts["a"], parts["b"])


def test_cpu_binding_checks_buffer_sizes_and_names_arguments():
    """The C++ boundary takes keyword arguments and checks every buffer against the shapes."""
    from lorart import _C
    from lorart.backend.cpu import _buf

    x, w, y = torch.randn(4, 16), torch.randn(8, 16), torch.empty(4, 8)
    kw = dict(m=4, dtype=0, x=_buf(x), ldx=16, n=8, k=16, scheme=-1, weight=_buf(w),
              scales=(0, 0), offsets=(0, 0), scale_dtype=0, group_size=0, bias=(0, 0),
              a=(0, 0), b=(0, 0), total_rank=0, rank_offsets=[0], lora_scales=[],
              adapter_ids=(0, 0), y=_buf(y), ldy=8, decode_max_rows=4)
    _C.cpu_forward(**kw)
    torch.testing.assert_close(y, x @ w.T)
    for name, small, need in (("x", x[:3], "x \\[M, K\\] has 48 elements; the shapes need 64"),
                              ("weight", w[:7], "weight \\[N, K\\] has 112 elements; .* 128"),
                              ("y", y[:3], "y \\[M, N\\] has 24 elements; .* 32")):
        with pytest.raises(ValueError, match=need):
            _C.cpu_forward(**{**kw, name: _buf(small.clone())})
    with pytest.raises(ValueError, match="weight .* is required"):
        _C.cpu_forward(**{**kw, "weight": (0, 0)})
    a, b = torch.randn(3, 16), torch.randn(8, 3)
    with pytest.raises(ValueError, match="b \\[N, R\\] has 21 elements; .* 24"):
        _C.cpu_forward(**{**kw, "a": _buf(a), "b": _buf(b[:7].clone()), "total_rank": 3,
                          "rank_offsets": [0, 3], "lora_scales": [1.0]})
    with pytest.raises(ValueError, match="adapter_ids \\[M\\] has 2 elements; .* 4"):
        _C.cpu_forward(**{**kw, "a": _buf(a), "b": _buf(b), "total_rank": 3,
                          "rank_offsets": [0, 3], "lora_scales": [1.0],
                          "adapter_ids": _buf(torch.zeros(2, dtype=torch.int32))})
    with pytest.raises(TypeError):  # named arguments: a misspelt one is an error
        _C.cpu_forward(**{**kw, "adapter_id": (0, 0)})
