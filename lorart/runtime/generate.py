"""``model.generate`` through ``LlamaDecoder`` when the call is batch-1 greedy decoding.

``enable_fast_generate(model)`` (done by ``lorart.from_gguf``) replaces the instance's
``generate`` by a ``FastGenerate`` wrapper. A call takes the lean path when it is
what the decoder computes exactly as transformers would:

- one sequence (``input_ids [1, T]``, attention mask absent or all ones);
- greedy (``do_sample`` false, one beam) and no logits processor other than
  ``min_new_tokens``; only the keyword arguments in ``_ACCEPTED`` are given and the
  generation config (a ``generation_config=`` argument completed from the model's, as
  transformers does, else the model's) differs from transformers' defaults only in
  fields of ``_CONFIG_FIELDS_OK`` or by switching something off;
- one adapter for the whole model: ``adapter_names=[name]``, or the active adapter
  set the same in every layer that has it (or none).

Anything else goes to the wrapped ``generate`` unchanged (transformers' loop).
``LORART_FAST_DECODE=0`` turns the lean path off. The decode steps round activations to
16 bits per group of 32
(``DEFAULT_ACTIVATIONS``: logits within ~7e-5 of float32, measured): so the tokens equal
transformers' except where two logits tie within that; ``LORART_DECODE_ACTIVATIONS=float32``
(or ``enable_fast_generate(model, activations="float32")``) keeps float32 throughout,
``int8`` is llama.cpp's rounding (faster, less exact).
"""

from __future__ import annotations

import copy
import os
import threading

import torch
from torch import nn

from ..layers import BASE_ADAPTER, LoRALinear
from .llama import ACTIVATIONS, LlamaDecoder, decoder_signature, unsupported

_ACCEPTED = {"max_new_tokens", "min_new_tokens", "max_length", "do_sample", "num_beams",
             "attention_mask", "pad_token_id", "eos_token_id", "bos_token_id", "use_cache",
             "temperature", "top_p", "top_k", "streamer"}
_CONFIG_FIELDS_OK = {"bos_token_id", "eos_token_id", "pad_token_id", "max_length",
                     "max_new_tokens", "min_new_tokens", "do_sample", "num_beams",
                     "temperature", "top_p", "top_k", "use_cache", "transformers_version",
                     "_from_model_config"}
_NO_ADAPTER = object()  # "cannot serve this adapter setup": fall back
# The decode steps' activations (see LlamaDecoder): "int16" rounds each linear layer's
# input to 16 bits per group of 32 for integer dot products (AVX512-VNNI; elsewhere the
# float32 kernels run). Measured on SmolLM2 Q4_1 (2026-12-03, 40 teacher-forced steps):
# logits within 7.3e-5 relative RMS of the float32 path and the same argmax at every step
# (llama.cpp's 8-bit activations: 2.5e-2, one flip), ~1.3x the float32 path's tok/s.
# "float32" keeps transformers' arithmetic exactly; "int8" is llama.cpp's rounding (2.2e-2).
DEFAULT_ACTIVATIONS = "int16"


def _generation_config(model: nn.Module, given):
    """The generation config a ``generate`` call runs with: ``given`` with its unset
    (``None``) fields taken from the model's, as transformers' ``generate`` completes it
    (``GenerationConfig.update(..., defaults_only=True)``), or the model's own. ``None``
    when that cannot be done here (the call then takes transformers' loop)."""
    if given is None:
        return model.generation_config
    try:
        merged = copy.deepcopy(given)
        merged.update(**model.generation_config.to_dict(), defaults_only=True,
                      allow_custom_entries=True)
    except (TypeError, AttributeError):  # another transformers: leave it to its loop
        return None
    return merged


class FastGenerate:
    """The instance ``generate`` of a lorart-patched Llama model (see module doc)."""

    def __init__(self, model: nn.Module, fallback) -> None:
        self.model = model
        self.fallback = fallback
        self.__wrapped__ = getattr(fallback, "__wrapped__", fallback)
        self.__doc__ = getattr(fallback, "__doc__", None)
        self._lock = threading.Lock()
        self._decoder: LlamaDecoder | None = None
        self.last_path = ""  # "lorart" or "transformers": which loop served the last call
        # LlamaDecoder's activations; None: LORART_DECODE_ACTIVATIONS, else the default.
        self.activations: str | None = None

    def __call__(self, *args, adapter_names=None, **kwargs):
        plan = self._plan(args, kwargs, adapter_names)
        if plan is None:
            self.last_path = "transformers"
            if adapter_names is not None:
                kwargs["adapter_names"] = adapter_names
            return self.fallback(*args, **kwargs)
        self.last_path = "lorart"
        input_ids, adapter, max_new, min_new, eos, streamer = plan
        return greedy_generate(self.decoder(), input_ids, max_new, min_new, eos, adapter,
                               streamer)

    def decoder(self) -> LlamaDecoder:
        """The model's ``LlamaDecoder``, rebuilt when its base weights changed."""
        activations = self.activations or os.environ.get("LORART_DECODE_ACTIVATIONS",
                                                         DEFAULT_ACTIVATIONS).strip()
        with self._lock:
            sig = decoder_signature(self.model)
            if (self._decoder is None or self._decoder.signature != sig
                    or self._decoder.activations != activations):
                self._decoder = LlamaDecoder(self.model, activations=activations)
            return self._decoder

    # ------------------------------------------------------------------ eligibility
    def _plan(self, args, kwargs, adapter_names):
        if os.environ.get("LORART_FAST_DECODE", "1").strip() == "0":
            return None
        model = self.model
        if unsupported(model) is not None:  # (generate never builds a graph: no_grad)
            return None
        kwargs = dict(kwargs)
        if args:
            if len(args) > 1 or "input_ids" in kwargs:
                return None
            kwargs["input_ids"] = args[0]
        input_ids = kwargs.pop("input_ids", None)
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or \
                input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
            return None
        gc = _generation_config(model, kwargs.pop("generation_config", None))
        if gc is None or set(kwargs) - _ACCEPTED:
            return None
        # Fields off (False/None/0) are harmless; any other non-default one may change tokens.
        if any(v for k, v in gc.to_diff_dict().items() if k not in _CONFIG_FIELDS_OK):
            return None
        get = lambda k: kwargs[k] if kwargs.get(k) is not None else getattr(gc, k, None)  # noqa: E731
        if get("do_sample") or (get("num_beams") or 1) != 1 or kwargs.get("use_cache") is False:
            return None
        mask = kwargs.get("attention_mask")
        if mask is not None and (mask.shape != input_ids.shape or not bool(mask.all())):
            return None
        adapter = self._adapter(adapter_names)
        if adapter is _NO_ADAPTER:
            return None
        t = input_ids.shape[1]
        max_new = kwargs.get("max_new_tokens")
        if max_new is None:
            max_length = kwargs.get("max_length")
            if max_length is None:
                max_new = gc.max_new_tokens
                max_length = gc.max_length
            max_new = max_new if max_new is not None else max(0, (max_length or 20) - t)
        min_new = get("min_new_tokens") or 0
        eos = get("eos_token_id")
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        return input_ids, adapter, int(max_new), int(min_new), eos, kwargs.get("streamer")

    def _adapter(self, adapter_names):
        """The one adapter of this call (``None``: base), or ``_NO_ADAPTER``."""
        layers = [m for m in self.model.modules() if isinstance(m, LoRALinear)]
        registry = layers[0].registry if layers else None
        if adapter_names is not None:
            if registry is None or isinstance(adapter_names, str) or len(adapter_names) != 1:
                return _NO_ADAPTER
            name = adapter_names[0]
            registry.index(name)  # unknown names raise, as on transformers' path
            if name is None or name == BASE_ADAPTER:
                return None
            if any(m.disabled or name in m.merged for m in layers if name in m.lora_A):
                return _NO_ADAPTER
            return name
        with_adapters = [m for m in layers if m.lora_A]
        if not with_adapters:
            return None
        if all(m.disabled for m in with_adapters):
            return None if not any(m.merged for m in with_adapters) else _NO_ADAPTER
        if any(m.disabled for m in with_adapters):
            return _NO_ADAPTER
        active = {m.active_adapter for m in with_adapters
                  if m.active_adapter is not None and m.active_adapter not in m.merged}
        if not active:
            return None
        if len(active) > 1:
            return _NO_ADAPTER
        name = active.pop()
        if any(m.active_adapter != name for m in with_adapters if name in m.lora_A):
            return _NO_ADAPTER
        return name


@torch.no_grad()
def greedy_generate(decoder: LlamaDecoder, input_ids: torch.Tensor, max_new_tokens: int,
                    min_new_tokens: int = 0, eos_token_ids=(), adapter: str | None = None,
                    streamer=None) -> torch.Tensor:
    """``[1, T + n]``: ``input_ids [1, T]`` followed by up to ``max_new_tokens`` greedy
    tokens, stopping after an EOS token once ``min_new_tokens`` were generated.
    ``streamer`` (a transformers ``BaseStreamer``) gets what transformers' loop gives it:
    ``put(input_ids [1, T])``, ``put([token])`` per new token, then ``end()``."""
    t = input_ids.shape[1]
    if streamer is not None:
        streamer.put(input_ids.cpu())
    if max_new_tokens <= 0:
        if streamer is not None:
            streamer.end()
        return input_ids
    session = decoder.session(t + max_new_tokens, adapter)
    eos = set(int(e) for e in eos_token_ids)
    eos_index = torch.tensor(sorted(eos), dtype=torch.int64)
    out = [int(v) for v in input_ids[0].tolist()]
    logits = session.forward(input_ids[0].to(decoder.device))[-1]
    for step in range(max_new_tokens):
        if step:
            logits = session.step(out[-1])[0]
        if step < min_new_tokens and eos:
            logits = logits.index_fill(0, eos_index, float("-inf"))
        nxt = int(logits.argmax())
        out.append(nxt)
        if streamer is not None:
            streamer.put(torch.tensor([nxt], dtype=input_ids.dtype))
        if nxt in eos:
            break
    if streamer is not None:
        streamer.end()
    return torch.tensor([out], dtype=input_ids.dtype, device=input_ids.device)


def enable_fast_generate(model: nn.Module, activations: str | None = None) -> FastGenerate:
    """Route ``model.generate`` through the lean decoder when a call allows it.

    ``model`` must already be patched (``lorart.patch``/``from_gguf``); the wrapper
    sits over its ``generate`` and is removed with it by ``lorart.unpatch``.
    ``activations="int8"`` opts into llama.cpp-style int8 activations for the decode steps
    (faster; tokens can differ from transformers' at near-ties), see ``LlamaDecoder``.
    """
    if activations is not None and activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
    current = model.__dict__.get("generate")
    if isinstance(current, FastGenerate):
        if activations is not None:
            current.activations = activations
        return current
    if current is None:
        current = type(model).generate.__get__(model)
    wrapper = FastGenerate(model, current)
    wrapper.activations = activations
    model.__dict__["generate"] = wrapper
    return wrapper
