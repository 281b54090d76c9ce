"""A lean batch-1 decoder for Llama-family transformers models patched by lorart.

``LlamaDecoder(model)`` reads the model's weights once (no copies of the norms or the
embedding; q/k/v and gate/up concatenated into one fused kernel each, see
``DecodeLinear``) and runs the Llama forward itself:

    x = embed[token]
    for each layer:
        h        = rms_norm(x)
        q, k, v  = qkv(h)                       one fused 4-bit GEMV (+ LoRA)
        q, k     = rope(q, k, pos)              x·cos + roll(x, d/2)·sin±  (HF's rotate_half)
        cache[pos] = k, v                       static cache [n_kv, max_len, d], no re-allocation
        x        = o(sdpa(q, cache[:pos+1])) + x     residual passed as the kernel's bias (1 row)
        x        = down(silu(gate(h2)) · up(h2)) + x with h2 = rms_norm(x)
    logits = lm_head(rms_norm(x))

Why not transformers' own forward: at batch 1 a SmolLM2 step is ~210 small GEMVs of
25-60 us each, and the HF module tree, the op surface's checks and the dynamic cache
added more Python time per step than the kernels took (profile in benchmarks/RESULTS.md,
section "Batch-1 decode"). The same arithmetic is kept: float32 activations, HF's rope
tables (``model.model.rotary_emb``), ``F.scaled_dot_product_attention`` with GQA;
``tests/test_decode_runner.py`` checks the logits against transformers'.

A ``DecodeSession`` holds the per-call state (KV cache, position, adapter), so one
decoder serves concurrent calls with different adapters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import tensor_version
from .cplan import build_plan
from .linear import BoundLinear, DecodeLinear

_ROPE_TYPES = ("default", "linear", "llama3")
ACTIVATIONS = ("float32", "int16", "int8")  # static tables; "dynamic" changes per length


def unsupported(model: nn.Module) -> str | None:
    """Why ``model`` cannot run on ``LlamaDecoder`` (``None`` when it can)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) != "llama":
        return "only transformers Llama models (config.model_type == 'llama') are supported"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
        return "expected model.model.layers and model.lm_head (LlamaForCausalLM)"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act={config.hidden_act!r} (only silu)"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "pretraining_tp != 1"
    rope_type = getattr(inner.rotary_emb, "rope_type", "default")
    if rope_type not in _ROPE_TYPES:
        return f"rope_type={rope_type!r} (supported: {_ROPE_TYPES})"
    if model.training:
        return "model is in training mode"
    return _unsupported_linears(model)


def _unsupported_linears(model: nn.Module) -> str | None:
    """The decoder reads each projection's whole weight: only the plain layer classes it
    knows (not subclasses), and none that holds a shard of a tensor-parallel layer."""
    from ..embedding import QuantizedLinear, TiedQuantizedLinear
    from ..layers import LoRALinear

    known = (LoRALinear, QuantizedLinear, TiedQuantizedLinear, nn.Linear)
    linears = [("lm_head", model.lm_head)]
    for i, layer in enumerate(model.model.layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        for owner, names in ((attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                             (mlp, ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                linears.append((f"layers.{i}.{name}", getattr(owner, name, None)))
    for name, m in linears:
        if type(m) not in known:
            return f"{name} is a {type(m).__name__} (expected one of lorart's linear layers)"
        if getattr(m, "tp_group", None) is not None:
            return f"{name} is a tensor-parallel shard"
    return None


class _Layer:
    """The weights of one decoder layer, read from the transformers module."""

    def __init__(self, layer: nn.Module, dtype: torch.dtype) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.attn_norm = layer.input_layernorm.weight.detach()
        self.attn_eps = layer.input_layernorm.variance_epsilon
        self.mlp_norm = layer.post_attention_layernorm.weight.detach()
        self.mlp_eps = layer.post_attention_layernorm.variance_epsilon
        self.qkv = DecodeLinear([attn.q_proj, attn.k_proj, attn.v_proj], dtype)
        self.o = DecodeLinear([attn.o_proj], dtype)
        self.gate_up = DecodeLinear([mlp.gate_proj, mlp.up_proj], dtype)
        self.down = DecodeLinear([mlp.down_proj], dtype)
        self.scaling = attn.scaling

    def groups(self) -> tuple[DecodeLinear, ...]:
        return self.qkv, self.o, self.gate_up, self.down


class LlamaDecoder:
    """Batch-1 forward of a Llama model over lorart's fused kernels (see module doc).

    Args:
        model: a transformers ``LlamaForCausalLM`` (eval mode), typically from
            ``lorart.from_gguf``; its linear layers may be ``LoRALinear`` (4-bit or
            dense) or ``nn.Linear``.
        dtype: activation dtype; float32 (the model's own) by default.
        activations: ``"float32"`` (transformers' arithmetic, the default), ``"int16"`` or
            ``"int8"``: the one-token step rounds each linear layer's input to 16 / 8 bits
            per group of 32 and runs integer dot products (``cplan.py``; int8 is llama.cpp's
            rounding); prefill stays float32. ``FastGenerate`` uses ``"int16"``.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.float32,
                 activations: str = "float32") -> None:
        why = unsupported(model)
        if why is not None:
            raise ValueError(f"LlamaDecoder cannot run this model: {why}")
        if activations not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
        self.activations = activations
        config, inner = model.config, model.model
        self.model = model
        self.dtype = dtype
        self.n_head = config.num_attention_heads
        self.n_kv = getattr(config, "num_key_value_heads", None) or self.n_head
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_head
        self.hidden = config.hidden_size
        self.vocab = config.vocab_size
        self.embed_tokens = inner.embed_tokens
        self.layers = [_Layer(layer, dtype) for layer in inner.layers]
        self.norm = inner.norm.weight.detach()
        self.norm_eps = inner.norm.variance_epsilon
        self.lm_head = DecodeLinear([model.lm_head], dtype)
        self.rotary = inner.rotary_emb
        self.device = self.norm.device
        self._rope = torch.empty(0)
        self._paths = {id(m): name for name, m in model.named_modules()}
        self.signature = decoder_signature(model)

    # ------------------------------------------------------------------ tables
    def rope_tables(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin± [length, head_dim]``: rope as ``x·cos + roll(x, d/2)·sin±``.

        ``sin±`` is HF's ``sin`` with its first half negated, so that
        ``roll(x, d/2)·sin±`` equals HF's ``rotate_half(x)·sin``.
        """
        if self._rope.shape[0] < length:
            grow = max(length, 2 * self._rope.shape[0], 256)
            pos = torch.arange(grow, device=self.device)[None]
            probe = torch.empty(0, dtype=self.dtype, device=self.device)
            with torch.no_grad():
                cos, sin = self.rotary(probe, pos)
            half = self.head_dim // 2
            sign = torch.ones(self.head_dim, dtype=self.dtype, device=self.device)
            sign[:half] = -1
            self._rope = torch.stack([cos[0].to(self.dtype), sin[0].to(self.dtype) * sign])
        return self._rope[0], self._rope[1]

    def session(self, max_len: int, adapter=None) -> DecodeSession:
        """Per-call state for up to ``max_len`` positions with ``adapter``: None, the name
        of an adapter the model holds, or tensors by module path (an object with
        ``.layers = {"model.layers.0.self_attn.q_proj": (A, B, scale), ...}``, as the
        serving engine's ``AdapterWeights``)."""
        return DecodeSession(self, max_len, adapter)

    def bind(self, group: DecodeLinear, adapter) -> BoundLinear:
        """``group`` bound to ``adapter`` (see :meth:`session`)."""
        if adapter is None or isinstance(adapter, str):
            return group.bind(adapter)
        layers = adapter.layers
        return group.bind_parts(adapter, [layers.get(self._paths.get(id(m)))
                                          for m in group.modules])


class DecodeSession:
    """One sequence being decoded: static KV cache, position and adapter.

    ``forward(tokens)`` appends ``tokens [T]`` to the sequence and returns the logits
    ``[T, vocab]`` of every new position (or only the last with ``last_only=True``).
    """

    def __init__(self, decoder: LlamaDecoder, max_len: int, adapter) -> None:
        d = decoder
        self.decoder = d
        self.max_len = max_len
        self.pos = 0
        shape = (len(d.layers), 2, 1, d.n_kv, max_len, d.head_dim)
        self.cache = torch.zeros(shape, dtype=d.dtype, device=d.device)
        self.bound: list[tuple[BoundLinear, ...]] = [
            tuple(d.bind(g, adapter) for g in layer.groups()) for layer in d.layers]
        self.lm_head = d.lm_head.bind(None)
        self.cos, self.sin = d.rope_tables(max_len)
        # Everything the one-token step reads per layer, unpacked once.
        self._plan = [(layer.attn_norm, layer.attn_eps, layer.mlp_norm, layer.mlp_eps,
                       layer.scaling, *bound, cache[0], cache[1])
                      for layer, bound, cache in zip(d.layers, self.bound, self.cache)]
        embed = d.embed_tokens
        self._embed = (embed.weight if type(embed) is nn.Embedding and embed.weight.dtype
                       == d.dtype else None)
        # The one-token step as one C++ call where every part allows it (cplan.py).
        self.compiled = build_plan(self)

    @torch.no_grad()
    def step(self, token: int) -> torch.Tensor:
        """Logits ``[1, vocab]`` after appending one token: the decode hot path.

        The same arithmetic as :meth:`forward` with ``T = 1``, with fewer torch calls
        (no transposes, masks or chunk bookkeeping): at SmolLM2's size each torch call
        is a few microseconds against ~25 us for a whole 576x576 4-bit GEMV.
        """
        d = self.decoder
        pos = self.pos
        if pos >= self.max_len:
            raise ValueError(f"sequence of {pos + 1} tokens exceeds the session's max_len "
                             f"{self.max_len}")
        nh, nkv, hd, hidden = d.n_head, d.n_kv, d.head_dim, (d.hidden,)
        nq, end, half, gqa = nh + nkv, pos + 1, d.head_dim // 2, nh != nkv
        if self._embed is not None:
            x = self._embed[token].unsqueeze(0)  # [1, H], a row of the table (no copy)
        else:
            x = d.embed_tokens(torch.tensor([token], device=d.device)).to(d.dtype)
        if self.compiled is not None:  # the same step in C++; x is overwritten there
            logits = self.compiled(x[0].clone() if self._embed is not None else x[0], pos)
            self.pos = end
            return logits
        cos, sin = self.cos[pos], self.sin[pos]
        for (attn_norm, attn_eps, mlp_norm, mlp_eps, scaling, qkv, o, gate_up, down,
             k_cache, v_cache) in self._plan:
            y = qkv(F.rms_norm(x, hidden, attn_norm, attn_eps)).view(nq + nkv, hd)
            qk = y[:nq]
            qk = torch.addcmul(qk * cos, qk.roll(half, -1), sin)  # rope on q and k heads
            k_cache[0, :, pos] = qk[nh:]
            v_cache[0, :, pos] = y[nq:]
            attn = F.scaled_dot_product_attention(
                qk[:nh].view(1, nh, 1, hd), k_cache[:, :, :end], v_cache[:, :, :end],
                scale=scaling, enable_gqa=gqa)
            x = o(attn.view(1, nh * hd), residual=x)
            gu = gate_up(F.rms_norm(x, hidden, mlp_norm, mlp_eps))
            inter = gu.shape[1] // 2
            x = down(F.silu(gu[:, :inter]).mul_(gu[:, inter:]), residual=x)
        self.pos = end
        return self.lm_head(F.rms_norm(x, hidden, d.norm, d.norm_eps))

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, last_only: bool = True) -> torch.Tensor:
        d = self.decoder
        t = tokens.shape[0]
        start, end = self.pos, self.pos + t
        if end > self.max_len:
            raise ValueError(f"sequence of {end} tokens exceeds the session's max_len "
                             f"{self.max_len}")
        nh, nkv, hd = d.n_head, d.n_kv, d.head_dim
        x = d.embed_tokens(tokens).to(d.dtype)  # [T, H]
        cos, sin = self.cos[start:end], self.sin[start:end]  # [T, hd]
        # One causal mask for the chunk when it attends to earlier positions as well.
        mask = None
        if t > 1 and start > 0:
            mask = torch.ones(t, end, dtype=torch.bool, device=x.device).tril(start)
        for layer, (qkv, o, gate_up, down), cache in zip(d.layers, self.bound, self.cache):
            h = F.rms_norm(x, (d.hidden,), layer.attn_norm, layer.attn_eps)
            y = qkv(h).view(t, nh + 2 * nkv, hd)
            qk = y[:, : nh + nkv]
            qk = qk * cos[:, None] + qk.roll(hd // 2, -1) * sin[:, None]  # rope on q and k
            cache[0, 0, :, start:end] = qk[:, nh:].transpose(0, 1)
            cache[1, 0, :, start:end] = y[:, nh + nkv:].transpose(0, 1)
            q = qk[:, :nh].transpose(0, 1).unsqueeze(0)  # [1, nh, T, hd]
            attn = F.scaled_dot_product_attention(
                q, cache[0, :, :, :end], cache[1, :, :, :end], attn_mask=mask,
                is_causal=t > 1 and start == 0, scale=layer.scaling, enable_gqa=nh != nkv)
            x = o(attn[0].transpose(0, 1).reshape(t, nh * hd), residual=x)
            h = F.rms_norm(x, (d.hidden,), layer.mlp_norm, layer.mlp_eps)
            g, u = gate_up(h).split(gate_up.out_features // 2, dim=-1)
            x = down(F.silu(g).mul_(u), residual=x)
        self.pos = end
        if last_only:
            x = x[-1:]
        return self.lm_head(F.rms_norm(x, (d.hidden,), d.norm, d.norm_eps))


def decoder_signature(model: nn.Module) -> tuple:
    """What a built ``LlamaDecoder`` depends on: the identity and version of every base
    weight it copied. A changed signature (merge, ``.to()``, new weights) means rebuild."""
    from ..layers import LoRALinear

    if unsupported(model) is not None:  # e.g. sharded by tensor parallelism since built
        return ("unsupported", id(model))
    sig = [id(getattr(model, "lm_head", None)),
           id(getattr(getattr(model, "model", None), "embed_tokens", None))]
    for m in model.modules():
        if isinstance(m, LoRALinear):
            t = m.qweight if m.is_quantized else m.weight
            sig.append((id(m), id(t), tensor_version(t), m.disabled, tuple(m.merged)))
        elif isinstance(m, nn.Linear):
            sig.append((id(m), id(m.weight), tensor_version(m.weight)))
    return tuple(sig)
