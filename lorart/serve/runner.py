"""The model runner: ONE forward per engine step over a packed, ragged set of tokens.

A step packs ``T`` tokens from ``S`` sequences back to back (no padding): the decode
token of each running sequence and the prefill chunk of each new one. Every token has
its own position and adapter. The runner calls the model's own modules (embedding,
RMSNorms, rotary embedding, activation, output layer); each LoRA-patched projection
runs as one ``multi_lora_linear`` call over all ``T`` rows with the layer's own base
weight and the engine's resident adapter slots (``ResidentSlots``: packed, ragged
ranks, one ``AdapterBatch`` shared by all layers). Attention reads/writes a
``PagedKVCache``: a prefill chunk attends over its own sequence's cached keys (one
``scaled_dot_product_attention`` per chunk, causal mask); all decode tokens of a step go
through ONE masked call per layer (their keys gathered and padded to the longest
context: attention only — the linear layers never see padding). Per-sequence calls cost
~40 calls per layer at 40 sequences; on a busy CPU each parallel region costs far more
than the arithmetic. Logits are computed only for the rows that sample.

Supported: Llama-family decoder-only models as transformers builds them
(``LlamaForCausalLM``, ``MistralForCausalLM`` without sliding window, ``Qwen2ForCausalLM``):
``model.model.{embed_tokens, layers[i].{input_layernorm, self_attn.{q,k,v,o}_proj,
post_attention_layernorm, mlp.{gate,up,down}_proj, mlp.act_fn}, norm, rotary_emb}``
and ``model.lm_head``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import AdapterBatch
from ..layers import LoRALinear
from ..ops import lora_linear, multi_lora_linear
from .kv_cache import PagedKVCache

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def embedding_dtype_device(embed: nn.Module) -> tuple[torch.dtype, torch.device]:
    """Hidden-state dtype and device of an input embedding: an ``nn.Embedding``'s weight, or a
    ``lorart.embedding.QuantizedEmbedding`` (packed, no float ``.weight``; ``.dtype`` is what
    it outputs)."""
    weight = embed.__dict__.get("_parameters", {}).get("weight")
    if weight is not None:
        return weight.dtype, weight.device
    return embed.dtype, embed.qweight.device


@dataclass
class SeqChunk:
    """One sequence's tokens in a step: packed rows ``start : start + length`` hold its
    positions ``context_len - length .. context_len - 1``; ``kv_slots [context_len]`` are
    the cache slots of all its positions (those of this chunk included)."""

    start: int
    length: int
    context_len: int
    kv_slots: torch.Tensor


@dataclass
class StepBatch:
    """Everything one forward needs (built by the engine, shared by all layers).

    token_ids    [T] int64   packed tokens of all sequences
    positions    [T] int64   their positions within their sequences
    write_slots  [T] int64   KV-cache slot each token's K/V is written to
    seqs         S x SeqChunk
    adapters     AdapterBatch over the T rows (resident-slot segment ids, -1 = base), or None
    sample_rows  [R] int64   rows whose logits are returned (usually each sequence's last)
    """

    token_ids: torch.Tensor
    positions: torch.Tensor
    write_slots: torch.Tensor
    seqs: list[SeqChunk]
    adapters: AdapterBatch | None
    sample_rows: torch.Tensor


def check_supported(model: nn.Module) -> None:
    """Raise ``ValueError`` naming what is missing when the runner cannot drive ``model``."""
    inner = getattr(model, "model", None)
    for attr in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if inner is None or not hasattr(inner, attr):
            raise ValueError(f"model must be a Llama-family *ForCausalLM (model.model.{attr} "
                             f"not found in {type(model).__name__})")
    if not hasattr(model, "lm_head"):
        raise ValueError(f"model must have an lm_head ({type(model).__name__} has none)")
    cfg = model.config
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        raise ValueError("sliding-window attention is not supported by the serving runner")
    attn = inner.layers[0].self_attn
    for extra in ("q_norm", "k_norm"):
        if hasattr(attn, extra):
            raise ValueError(f"attention with {extra} (e.g. Qwen3) is not supported by the "
                             f"serving runner yet")


class ModelRunner:
    """Drives a Llama-family model one packed step at a time (see module doc).

    ``slots`` (optional) is a ``ResidentSlots`` mapping each LoRA-patched projection
    to its packed ``AdapterStack``; without it (or with ``batch.adapters is None``)
    every projection runs base-only.
    """

    def __init__(self, model: nn.Module, kv: PagedKVCache, slots=None) -> None:
        check_supported(model)
        self.model = model
        self.kv = kv
        self.slots = slots
        inner = model.model
        self.layers = list(inner.layers)
        attn = self.layers[0].self_attn
        cfg = model.config
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(attn, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
        self.scaling = float(getattr(attn, "scaling", self.head_dim ** -0.5))
        # [(layer index, {proj name: module})] resolved once, not per step
        self.proj = [{p: layer.get_submodule(p) for p in PROJECTIONS} for layer in self.layers]
        self.proj_paths = [{p: f"model.layers.{i}.{p}" for p in PROJECTIONS}
                           for i in range(len(self.layers))]
        self.dtype = embedding_dtype_device(inner.embed_tokens)[0]
        # Base-only steps (no adapter in the step): q/k/v and gate/up each as ONE kernel
        # call over a concatenated base, bound once (lorart.runtime.DecodeLinear, as the
        # batch-1 decoder; the layers then hold views of it, so it is not a second copy).
        self.fused = [self._fuse(i) for i in range(len(self.layers))]

    def _fuse(self, layer_idx: int) -> dict:
        """``{"qkv": BoundLinear | None, "gate_up": ...}`` for one layer (None: the layers
        cannot be concatenated, e.g. not plain ``LoRALinear`` or a tensor-parallel shard)."""
        from ..runtime.linear import DecodeLinear

        out = {}
        for group, names in (("qkv", PROJECTIONS[:3]), ("gate_up", PROJECTIONS[4:6])):
            mods = [self.proj[layer_idx][p] for p in names]
            out[group] = None
            if any(type(m) is not LoRALinear or getattr(m, "tp_group", None) is not None
                   for m in mods):
                continue
            try:
                out[group] = DecodeLinear(mods, self.dtype).bind(None)
            except (ValueError, TypeError):  # bases of different kinds
                pass
        return out

    @staticmethod
    def kv_shape(model: nn.Module) -> tuple[int, int, int]:
        """``(num_layers, num_kv_heads, head_dim)`` of the cache ``model`` needs."""
        cfg = model.config
        attn = model.model.layers[0].self_attn
        head_dim = getattr(attn, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
        return len(model.model.layers), cfg.num_key_value_heads, head_dim

    # ------------------------------------------------------------------ projections
    def _linear(self, layer_idx: int, name: str, x: torch.Tensor,
                adapters: AdapterBatch | None) -> torch.Tensor:
        """``x [T, K] -> [T, N]``: base + each row's resident adapter in one op call."""
        module = self.proj[layer_idx][name]
        stack = None
        if adapters is not None and self.slots is not None and isinstance(module, LoRALinear):
            stack = self.slots.stack(self.proj_paths[layer_idx][name])
        if not isinstance(module, LoRALinear):
            return module(x)
        base, bias = _base_and_bias(module, x)
        if stack is None:
            # A LoRALinear called without ids would apply its *active* adapter (set by a
            # user of the same model); the engine wants the bare base here.
            return lora_linear(x, base, None, None, bias=bias)
        return multi_lora_linear(x, base, stack, adapters, bias)

    # ------------------------------------------------------------------ forward
    @torch.inference_mode()
    def forward(self, batch: StepBatch) -> torch.Tensor:
        """Logits ``[R, V]`` (float32) for ``batch.sample_rows``; writes K/V of all T tokens."""
        inner = self.model.model
        ids = batch.adapters
        h = inner.embed_tokens(batch.token_ids)                    # [T, H]
        cos, sin = inner.rotary_emb(h, batch.positions[None])      # [1, T, D] each
        cos, sin = cos[0, :, None, :], sin[0, :, None, :]          # [T, 1, D]
        t = h.shape[0]
        decode_plan = self._decode_plan(batch.seqs)
        base_only = ids is None or self.slots is None
        nq, nkv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        for i, layer in enumerate(self.layers):
            x = layer.input_layernorm(h)
            fused = self.fused[i] if base_only else {}
            if fused.get("qkv") is not None:
                q, k, v = fused["qkv"](x).split([nq, nkv, nkv], dim=-1)
            else:
                q, k, v = (self._linear(i, f"self_attn.{p}_proj", x, ids) for p in "qkv")
            q = q.view(t, self.num_heads, self.head_dim)
            k = k.view(t, self.num_kv_heads, self.head_dim)
            v = v.view(t, self.num_kv_heads, self.head_dim)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            self.kv.k[i].index_copy_(0, batch.write_slots, k.to(self.kv.k[i].dtype))
            self.kv.v[i].index_copy_(0, batch.write_slots, v.to(self.kv.v[i].dtype))
            attn = self._attention(i, q, batch.seqs, decode_plan)   # [T, heads * D]
            h = h + self._linear(i, "self_attn.o_proj", attn, ids)
            x = layer.post_attention_layernorm(h)
            mlp = layer.mlp
            if fused.get("gate_up") is not None:
                gate, up = fused["gate_up"](x).chunk(2, dim=-1)
            else:
                gate = self._linear(i, "mlp.gate_proj", x, ids)
                up = self._linear(i, "mlp.up_proj", x, ids)
            h = h + self._linear(i, "mlp.down_proj", mlp.act_fn(gate) * up, ids)
        last = inner.norm(h.index_select(0, batch.sample_rows))    # [R, H]
        return self.model.lm_head(last).float()                     # [R, V]

    @staticmethod
    def _decode_plan(seqs: list[SeqChunk]):
        """For the single-token (decode) sequences, built once per step and shared by all
        layers: ``(rows [Sd], slots [Sd, Cmax], mask [Sd, 1, 1, Cmax])`` so their attention
        is ONE call per layer (keys padded to the longest context, masked) instead of one
        per sequence; ``None`` when there are none."""
        dec = [s for s in seqs if s.length == 1]
        if not dec:
            return None
        cmax = max(s.context_len for s in dec)
        slots = torch.zeros(len(dec), cmax, dtype=torch.int64)
        mask = torch.zeros(len(dec), 1, 1, cmax, dtype=torch.bool)
        for i, s in enumerate(dec):
            slots[i, :s.context_len] = s.kv_slots
            mask[i, ..., :s.context_len] = True
        rows = torch.tensor([s.start for s in dec], dtype=torch.int64)
        return rows, slots, mask

    def _attention(self, layer_idx: int, q: torch.Tensor, seqs: list[SeqChunk],
                   decode_plan) -> torch.Tensor:
        """Causal attention of each sequence's rows over its cached keys: ``[T, heads*D]``."""
        out = torch.empty(q.shape[0], self.num_heads * self.head_dim, dtype=q.dtype,
                          device=q.device)
        kc, vc = self.kv.k[layer_idx], self.kv.v[layer_idx]
        gqa = self.num_kv_heads != self.num_heads
        if decode_plan is not None:
            rows, slots, mask = decode_plan
            sd, cmax = slots.shape
            qs = q.index_select(0, rows)[:, :, None, :]                        # [Sd, h, 1, D]
            flat = slots.reshape(-1)
            ks = kc.index_select(0, flat).view(sd, cmax, self.num_kv_heads, self.head_dim)
            vs = vc.index_select(0, flat).view(sd, cmax, self.num_kv_heads, self.head_dim)
            o = F.scaled_dot_product_attention(qs, ks.transpose(1, 2).to(q.dtype),
                                               vs.transpose(1, 2).to(q.dtype), attn_mask=mask,
                                               scale=self.scaling, enable_gqa=gqa)
            out.index_copy_(0, rows, o.reshape(sd, -1))
        for s in seqs:
            if s.length == 1 and decode_plan is not None:
                continue
            qs = q[s.start:s.start + s.length].transpose(0, 1)[None]           # [1, h, L, D]
            ks = kc.index_select(0, s.kv_slots).to(q.dtype).transpose(0, 1)[None]  # [1, kv, C, D]
            vs = vc.index_select(0, s.kv_slots).to(q.dtype).transpose(0, 1)[None]
            mask = None
            if s.length > 1:  # query j sits at position C - L + j: it sees keys 0..C-L+j
                qpos = torch.arange(s.context_len - s.length, s.context_len)
                mask = torch.arange(s.context_len)[None, :] <= qpos[:, None]     # [L, C]
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=self.scaling,
                                               enable_gqa=gqa)
            out[s.start:s.start + s.length] = o[0].transpose(0, 1).reshape(s.length, -1)
        return out


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _base_and_bias(module: LoRALinear, x: torch.Tensor):
    """The layer's base weight (dense ``[N, K]`` in x's dtype, or ``QuantizedWeight``) and bias."""
    base, bias = module.base, module.bias
    if isinstance(base, torch.Tensor) and base.dtype != x.dtype:
        base = base.to(x.dtype)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    return base, bias
