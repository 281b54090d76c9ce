"""Backend registry: which kernels run an op, chosen at call time.

Automatic choice per device: CPU tensors use the ``cpu`` (C++) backend, CUDA tensors
the ``triton`` backend (``cuda`` where measurements say it is faster), and anything
a compiled backend does not cover falls back to the ``torch`` reference.
``LORART_BACKEND=torch|cpu|triton|cuda`` forces one; forcing a backend that cannot
run the inputs is an error, never a silent fallback.

Backends are imported lazily and an import failure degrades to a warning, so
``import lorart`` works without a compiler, Triton or a GPU.
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch

from .base import Backend, Base, LoRAArgs

__all__ = ["Backend", "LoRAArgs", "available_backends", "get_backend", "select_backend"]

# name -> "module:Class", in automatic-preference order per device below.
_REGISTRY = {
    "torch": "lorart.backend.torch_backend:TorchBackend",
    "cpu": "lorart.backend.cpu:CpuBackend",
    "triton": "lorart.backend.triton:TritonBackend",
    "cuda": "lorart.backend.cuda:CudaBackend",
}
_AUTO_ORDER = {"cpu": ("cpu", "torch"), "cuda": ("triton", "torch")}
_LOADED: dict[str, Backend | str] = {}


def _load(name: str) -> Backend | str:
    """The backend instance, or a string saying why it could not be loaded."""
    if name not in _LOADED:
        module_name, cls_name = _REGISTRY[name].split(":")
        try:
            module = importlib.import_module(module_name)
            _LOADED[name] = getattr(module, cls_name)()
        except Exception as exc:  # degrade, never fail the import of lorart
            reason = f"{type(exc).__name__}: {exc}"
            if name == "cpu":
                warnings.warn(f"lorart: C++ CPU kernels unavailable ({reason}); "
                              f"using the torch reference", stacklevel=3)
            _LOADED[name] = reason
    return _LOADED[name]


def get_backend(name: str) -> Backend:
    """The named backend; ``ValueError`` if unknown, ``RuntimeError`` if unavailable."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; expected one of {sorted(_REGISTRY)}")
    backend = _load(name)
    if isinstance(backend, str):
        raise RuntimeError(f"backend {name!r} is not available: {backend}")
    ok, why = backend.status()
    if not ok:
        raise RuntimeError(f"backend {name!r} is not available: {why}")
    return backend


def available_backends() -> dict[str, tuple[bool, str]]:
    """``{name: (available, reason)}`` for every backend lorart knows."""
    out = {}
    for name in _REGISTRY:
        backend = _load(name)
        out[name] = (False, backend) if isinstance(backend, str) else backend.status()
    return out


def select_backend(x: torch.Tensor, base: Base, lora: LoRAArgs | None) -> Backend:
    """The backend for these (already validated) inputs; see the module doc."""
    forced = os.environ.get("LORART_BACKEND", "").strip().lower()
    if forced and forced != "auto":
        backend = get_backend(forced)
        why = backend.unsupported(x, base, lora)
        if why is not None:
            raise RuntimeError(f"LORART_BACKEND={forced} cannot run these inputs: {why}")
        return backend
    for name in _AUTO_ORDER.get(x.device.type, ("torch",)):
        backend = _load(name)
        if isinstance(backend, str) or not backend.status()[0]:
            continue
        if backend.unsupported(x, base, lora) is None:
            return backend
    return get_backend("torch")
