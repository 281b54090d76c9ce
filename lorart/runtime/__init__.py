"""Lean inference paths over lorart's fused kernels.

    LlamaDecoder / DecodeSession   batch-1 Llama forward with a static KV cache
    cplan.build_plan               the one-token step as ONE C++ call (csrc/cpu/decode_plan.cpp),
                                   optionally with int16/int8 activations (csrc/cpu/decode_q8.*)
    DecodeLinear                   layer groups (q/k/v, gate/up) bound once to the kernel
    enable_fast_generate           ``model.generate`` through the decoder when it can
"""

from .generate import FastGenerate, enable_fast_generate, greedy_generate
from .linear import BoundLinear, DecodeLinear
from .llama import DecodeSession, LlamaDecoder

__all__ = ["BoundLinear", "DecodeLinear", "DecodeSession", "FastGenerate", "LlamaDecoder",
           "enable_fast_generate", "greedy_generate"]
