"""Converters from on-disk quantized formats to lorart's ``QuantizedWeight`` layouts.

Each converter is exact: it moves codes and scales, never re-quantizes.

    gguf   GGUF Q4_0/Q4_1/Q4_K -> 4-bit; Q5_0/Q5_1/Q5_K/Q6_K/Q8_0 -> 8-bit
                                                        ``from_gguf_quantized``
           (Q4_0/Q4_1 only, as before:                  ``from_gguf_q4``)
    gptq   GPTQ ``qweight``/``qzeros``/``scales`` (no act-order)  ``from_gptq``
    awq    AWQ GEMM ``qweight``/``qzeros``/``scales``           ``from_awq``
    bnb    bitsandbytes NF4 (absmax + packed data)             ``from_bnb_nf4``
"""

from .awq import from_awq
from .bnb import from_bnb_nf4
from .gguf import from_gguf_q4, from_gguf_quantized, gguf_row_permutation
from .gptq import from_gptq

__all__ = ["from_awq", "from_bnb_nf4", "from_gguf_q4", "from_gguf_quantized", "from_gptq",
           "gguf_row_permutation"]
