"""What a case is timed with: each lorart backend and the baselines a user would otherwise run.

An :class:`Impl` turns a case's inputs into a zero-argument callable (the timed call;
for ``fwd`` it returns ``y [M, N]``), or a string saying why it cannot run this case
(that string becomes a "skipped" row, so a missing baseline is visible, not silent).

Baselines:

- ``peft_unfused``: plain torch, PEFT's arithmetic: ``x@W.T + s*((x@A.T)@B.T)``; a 4-bit
  base is dequantized (in the activation dtype) then multiplied, every call; a mixed
  batch loops over the adapters present, as PEFT's ``_mixed_batch_forward`` does (their
  rows found once per batch: :func:`adapter_groups`).
- ``peft``: PEFT's own ``LoraModel`` over an ``nn.Linear`` (dense bases only), with its
  ``adapter_names`` mixed batch. PEFT's defaults are kept (``autocast_adapter_dtype``
  keeps adapters in float32 under a bf16 base), since that is what users get.
- ``torch_int4``: torch's int4 weight-only matmul for the base
  (``_weight_int4pack_mm_for_cpu`` on CPU, ``_weight_int4pack_mm`` on CUDA) plus the
  unfused LoRA terms; forward only (no autograd for it).
- ``cublas_base``: GPU only, ``x@W.T`` in bf16, the base alone with no LoRA at all: the
  cost floor of the dense layer.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..adapters import AdapterStack
from .cases import LayerCase
from .inputs import SCALE, LayerInputs, dequantize_like_torch

Prepared = Callable[[], object] | str
# Largest N·K the torch reference backend is timed on: it builds int64 codes and a float32
# copy of W per call (~12 bytes per weight; several GB at 70B shapes) and took ~4 s a call
# on llama3-8b.gate_up (117M weights) on the 2-core dev machine. It is the correctness
# fallback, not a performance path, so the full suite times it on the attention-sized
# layers only (4096x4096, 4096x6144, 3584x4608).
REFERENCE_MAX_ELEMENTS = 1 << 25


@dataclass(frozen=True)
class Impl:
    """One way to run a case. ``kind`` is ``lorart`` or ``baseline``."""

    name: str
    kind: str
    prepare: Callable[[LayerCase, LayerInputs, torch.device], Prepared]
    backend: str | None = None  # the lorart backend forced while this impl runs


@contextlib.contextmanager
def forced_backend(name: str | None):
    """Set ``LORART_BACKEND`` (read by the op surface on every call) for a block."""
    if name is None:
        yield
        return
    old = os.environ.get("LORART_BACKEND")
    os.environ["LORART_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LORART_BACKEND", None)
        else:
            os.environ["LORART_BACKEND"] = old


# --------------------------------------------------------------------------- lorart
def _trainable_stack(stack: AdapterStack) -> AdapterStack:
    a = stack.a.detach().clone().requires_grad_()
    b = stack.b.detach().clone().requires_grad_()
    return AdapterStack(a, b, stack.rank_offsets, stack.scales, list(stack.rank_offsets_list))


def _lorart_prepare(backend_name: str):
    def prepare(case: LayerCase, inp: LayerInputs, device: torch.device) -> Prepared:
        import lorart
        from lorart.backend import LoRAArgs, get_backend

        try:
            backend = get_backend(backend_name)
        except (RuntimeError, ValueError) as exc:
            return str(exc)
        if backend_name == "triton" and device.type != "cuda":
            return "triton on CPU runs in the interpreter, which is not a performance path"
        if backend_name == "torch" and case.shape.n * case.shape.k > REFERENCE_MAX_ELEMENTS:
            return ("the torch reference dequantizes W in float32 via int64 codes; too big "
                    "for this shape (not a performance path)")
        stack = inp.stack
        lora = LoRAArgs(stack.a, stack.b, stack.rank_offsets_list,
                        [float(s) for s in stack.scales.tolist()])
        why = backend.unsupported(inp.x, inp.base, lora)
        if why is not None:
            return f"backend {backend_name!r} does not run this case: {why}"
        base = inp.base
        train = case.direction == "train"
        x = inp.x.detach().requires_grad_(train)
        stack = _trainable_stack(stack) if train else stack
        if inp.batch is None:  # one adapter for every row: the single-adapter op
            a, b, scale = stack.adapter(0)

            def forward():
                return lorart.lora_linear(x, base, a, b, scale)
        else:
            batch = inp.batch

            def forward():
                return lorart.multi_lora_linear(x, base, stack, batch)

        if not train:
            return forward
        dy = inp.dy
        leaves = (x, stack.a, stack.b)

        def step():
            for t in leaves:
                t.grad = None
            forward().backward(dy)

        return step

    return prepare


# --------------------------------------------------------------------------- baselines
def adapter_groups(ids: torch.Tensor | None,
                   adapters: int) -> list[tuple[int, torch.Tensor | None]]:
    """``[(s, rows using s)]`` per adapter present (``[(0, None)]``: every row, adapter 0).
    Found once per batch, so a timed call does no host sync (a CUDA graph can capture it):
    kinder to the baseline than PEFT, which finds the rows on every call."""
    if ids is None:
        return [(0, None)]
    groups = [(s, (ids == s).nonzero().squeeze(1)) for s in range(adapters)]
    return [(s, rows) for s, rows in groups if rows.numel()]


def unfused_lora(x: torch.Tensor, y: torch.Tensor, adapters, groups) -> torch.Tensor:
    """``y += c_s·(x Aₛᵀ) Bₛᵀ`` per adapter group (PEFT style), ``adapters[s] = (A, B, c)``."""
    for s, rows in groups:
        a, b, scale = adapters[s]
        if rows is None:
            y = y + scale * ((x @ a.T) @ b.T)
        else:
            # in place, like PEFT's result[rows] += ...; y is a fresh matmul output
            y.index_add_(0, rows, scale * ((x[rows] @ a.T) @ b.T))
    return y


def _adapter_list(case: LayerCase, inp: LayerInputs, train: bool):
    out = []
    for s in range(case.adapters):
        a, b, _ = inp.stack.adapter(s)
        out.append((a.detach().clone().requires_grad_(train),
                    b.detach().clone().requires_grad_(train), SCALE))
    return out


def _with_grad_step(case, inp, forward, leaves):
    if case.direction != "train":
        return forward
    dy = inp.dy

    def step():
        for t in leaves:
            t.grad = None
        forward().backward(dy)

    return step


def _peft_unfused(case: LayerCase, inp: LayerInputs, device: torch.device) -> Prepared:
    train = case.direction == "train"
    x = inp.x.detach().requires_grad_(train)
    adapters = _adapter_list(case, inp, train)
    groups = adapter_groups(inp.ids, case.adapters)
    if inp.qweight is not None:
        qw, dtype = inp.qweight, inp.x.dtype

        def base_out():
            return x @ dequantize_like_torch(qw, dtype).T
    else:
        w = inp.weight

        def base_out():
            return x @ w.T

    def forward():
        return unfused_lora(x, base_out(), adapters, groups)

    return _with_grad_step(case, inp, forward, [x] + [t for a, b, _ in adapters for t in (a, b)])


def _peft(case: LayerCase, inp: LayerInputs, device: torch.device) -> Prepared:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return "peft is not installed (pip install peft)"
    if case.base != "dense":
        return ("PEFT's LoRA over a 4-bit base needs bitsandbytes on CUDA; "
                "peft_unfused is the dequantize-then-matmul equivalent")
    if case.direction == "train" and inp.ids is not None:
        return "PEFT refuses adapter_names (mixed batches) in training mode"
    k, n = case.shape.k, case.shape.n

    class OneLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(k, n, bias=False, device=device, dtype=inp.x.dtype)

        def forward(self, x):
            return self.proj(x)

    module = OneLinear()
    with torch.no_grad():
        module.proj.weight.copy_(inp.weight)
    config = LoraConfig(r=case.rank, lora_alpha=SCALE * case.rank, target_modules=["proj"],
                        lora_dropout=0.0)
    model = get_peft_model(module, config, adapter_name="a0")
    for s in range(1, case.adapters):
        model.add_adapter(f"a{s}", config)
    layer = model.base_model.model.proj
    with torch.no_grad():
        for s in range(case.adapters):
            a, b, _ = inp.stack.adapter(s)
            layer.lora_A[f"a{s}"].weight.copy_(a)
            layer.lora_B[f"a{s}"].weight.copy_(b)
    train = case.direction == "train"
    model.train(train)
    x = inp.x.detach().requires_grad_(train)
    if inp.ids is None:
        def forward():
            return model(x)
    else:
        names = [f"a{i}" for i in inp.ids.tolist()]

        def forward():
            return model(x, adapter_names=names)

    leaves = [x] + [p for p in model.parameters() if p.requires_grad]
    return _with_grad_step(case, inp, forward, leaves)


def _int4_pack(case: LayerCase, inp: LayerInputs, device: torch.device):
    """torch's packed int4 weight and ``scales_and_zeros [K/g, N, 2]`` for ``inp.qweight``.

    torch dequantizes ``(q - 8)·scale + zero``; lorart's asym is ``q·scale + offset``,
    so ``zero = offset + 8·scale``.
    """
    qw = inp.qweight
    dtype = inp.x.dtype
    scales = qw.scales.float().T
    zeros = (qw.offsets.float() + 8 * qw.scales.float()).T
    scales_and_zeros = torch.stack((scales, zeros), dim=-1).to(dtype).contiguous()
    n, k = qw.shape
    # unpack via uint8 (not QuantizedWeight.codes(), which is int64: 8 bytes a weight)
    codes = torch.stack((qw.qweight & 15, qw.qweight >> 4), dim=-1).view(n, k).to(torch.int32)
    if device.type == "cuda":
        # CUDA takes uint8 [N, K/2] with the even k in the HIGH nibble (torchao's order).
        byte_codes = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
        packed = torch.ops.aten._convert_weight_to_int4pack(byte_codes.contiguous(), 8)
        mm = torch.ops.aten._weight_int4pack_mm
    else:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu
    return packed, scales_and_zeros, mm


def _torch_int4(case: LayerCase, inp: LayerInputs, device: torch.device) -> Prepared:
    if inp.qweight is None:
        return "the base is dense; torch_int4 runs 4-bit bases"
    if inp.qweight.scheme != "asym":
        return f"scheme {inp.qweight.scheme!r} is not expressible as torch's int4 (q-8)·s+z"
    if case.direction != "fwd":
        return "torch's int4 matmul has no backward"
    if device.type == "cuda" and inp.x.dtype != torch.bfloat16:
        return "torch's CUDA int4 matmul takes bfloat16 activations"
    try:
        packed, scales_and_zeros, mm = _int4_pack(case, inp, device)
        x = inp.x
        mm(x, packed, case.group_size, scales_and_zeros)  # fail here, not in the timer
    except (RuntimeError, AttributeError) as exc:
        return f"torch int4 kernel unavailable here: {str(exc).splitlines()[0][:160]}"
    adapters = _adapter_list(case, inp, False)
    groups, g = adapter_groups(inp.ids, case.adapters), case.group_size

    def forward():
        return unfused_lora(x, mm(x, packed, g, scales_and_zeros), adapters, groups)

    return forward


def _cublas_base(case: LayerCase, inp: LayerInputs, device: torch.device) -> Prepared:
    if device.type != "cuda":
        return "GPU only"
    if case.direction != "fwd":
        return "forward only"
    x, w = inp.x, inp.weight

    def forward():
        return x @ w.T

    return forward


BASELINES = (
    Impl("peft_unfused", "baseline", _peft_unfused),
    Impl("peft", "baseline", _peft),
    Impl("torch_int4", "baseline", _torch_int4),
    Impl("cublas_base", "baseline", _cublas_base),
)
# cublas_base is the base alone (no LoRA): a floor, not an alternative; it gets a
# speedup column on GPU like the others, read with that in mind.
BASE_ONLY = {"cublas_base"}
LORART_BACKENDS = ("cpu", "cuda", "triton", "torch")


def all_impls(device: torch.device) -> list[Impl]:
    """Baselines first (the first one's output is the check for the others), then lorart."""
    impls = list(BASELINES)
    if device.type != "cuda":
        impls = [i for i in impls if i.name != "cublas_base"]
    impls += [Impl(f"lorart:{b}", "lorart", _lorart_prepare(b), backend=b)
              for b in LORART_BACKENDS]
    return impls
