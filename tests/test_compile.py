"""torch.compile(fullgraph=True) over a patched layer, on every backend available here.

Each backend's kernels are ``torch.library`` custom ops with fake implementations
(``lorart::cpu_lora_*``, ``triton_lora_*``, ``cuda_lora_decode``), so dynamo traces a
``LoRALinear`` into one graph without breaks: per-row adapters (an ``AdapterBatch``
given explicitly: routes set by ``lorart.route`` are not read inside a compiled region)
and the active adapter. Triton runs in its interpreter on CPU tensors; the CUDA backend
needs a GPU (its op is covered by ``test_cuda_backend.py``'s fake-tensor test). The torch
reference skips adapters no row uses (``bool(rows.any())``, a data-dependent branch), so
it compiles with graph breaks, not ``fullgraph``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close
from torch import nn

import lorart

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _layer(scheme):
    layer = lorart.LoRALinear.from_linear(nn.Linear(64, 48).to(DEVICE), scheme, group_size=32)
    for i, name in enumerate("abc"):
        layer.add_adapter(name, 2 + 3 * i, init_lora_weights=False)
    return layer


@pytest.mark.parametrize("backend,scheme", [("cpu", "asym"), ("cpu", None), ("torch", "nf4"),
                                            ("triton", "sym"), ("cpu", "int8"),
                                            ("triton", "int8")])
def test_compiled_layer_equals_eager(monkeypatch, backend, scheme):
    if backend == "cpu" and DEVICE != "cpu" or not lorart.backends()[backend][0]:
        pytest.skip(f"backend {backend} is not available here")
    monkeypatch.setenv("LORART_BACKEND", backend)
    torch._dynamo.reset()
    layer = _layer(scheme)
    batch = lorart.AdapterBatch(torch.tensor([0, -1, 2, 1, 0], device=DEVICE), 3)

    def fn(x, batch):
        return torch.relu(layer(x, adapter_ids=batch)) + layer(x)

    x = torch.randn(5, 64, device=DEVICE)
    with torch.no_grad():
        compiled = torch.compile(fn, fullgraph=backend != "torch")
        assert_close(compiled(x, batch), fn(x, batch))


@pytest.mark.parametrize("scheme", ["asym", "int8"])
def test_triton_ops_pass_opcheck(scheme):
    if not lorart.backends()["triton"][0]:
        pytest.skip("triton is not available")
    from lorart.backend.triton.backend import _flat

    qw = lorart.quantize(torch.randn(7, 64), 32, scheme).to(DEVICE)
    stack = lorart.AdapterStack.from_list([(torch.randn(r, 64), torch.randn(7, r), 0.5)
                                           for r in (2, 5)]).to(DEVICE)
    batch = lorart.AdapterBatch(torch.tensor([0, -1, 1], device=DEVICE), 2)
    x, dy = torch.randn(3, 64, device=DEVICE), torch.randn(3, 7, device=DEVICE)
    args = _flat(qw, None, stack.lora_args(), batch)
    torch.library.opcheck(torch.ops.lorart.triton_lora_forward, (x, *args))
    torch.library.opcheck(torch.ops.lorart.triton_lora_backward, (dy, x, *args, True, True))
