"""``lorart.serve``: a continuous-batching engine serving many LoRA adapters at once.

    from lorart.serve import Engine, SamplingParams, errors

    engine = Engine.from_gguf()              # SmolLM2-135M-Instruct 4-bit
    engine.add_adapter("support", "path/to/peft_dir")
    engine.start()
    handle = engine.submit("Hello", adapter="support", sampling=SamplingParams(max_tokens=32))
    for delta in handle: print(delta.text, end="")
    engine.shutdown()

Layers (each a small module): ``runner`` (one packed forward per step), ``kv_cache``
(paged blocks), ``adapter_pool`` (resident slots / host / disk tiers), ``scheduler``
(FCFS, distinct-adapter cap, fairness), ``sampling``, ``request`` (handles, streaming),
``engine`` (the step loop). The HTTP server (``server``) sits on top of ``Engine``.
"""

from __future__ import annotations

from . import errors
from .types import AdapterInfo, Completion, Delta, EngineMetrics, SamplingParams, Usage


def __getattr__(name: str):
    # Engine and RequestHandle pull in torch/transformers machinery; import on first use.
    if name in ("Engine", "RequestHandle"):
        from . import engine, request

        return {"Engine": engine.Engine, "RequestHandle": request.RequestHandle}[name]
    raise AttributeError(f"module 'lorart.serve' has no attribute {name!r}")


__all__ = [
    "AdapterInfo",
    "Completion",
    "Delta",
    "Engine",
    "EngineMetrics",
    "RequestHandle",
    "SamplingParams",
    "Usage",
    "errors",
]
