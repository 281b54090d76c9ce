"""Converters from on-disk 4-bit formats to lorart's ``QuantizedWeight`` layout.

Each converter is exact: it moves codes and scales, never re-quantizes.

    gguf   GGUF Q4_0 (sym) / Q4_1 (asym), group 32        ``from_gguf_q4``
    gptq   GPTQ ``qweight``/``qzeros``/``scales`` (no act-order)  ``from_gptq``
    awq    AWQ GEMM ``qweight``/``qzeros``/``scales``           ``from_awq``
    bnb    bitsandbytes NF4 (absmax + packed data)             ``from_bnb_nf4``
"""

from .awq import from_awq
from .bnb import from_bnb_nf4
from .gguf import from_gguf_q4, gguf_row_permutation
from .gptq import from_gptq

__all__ = ["from_awq", "from_bnb_nf4", "from_gguf_q4", "from_gptq", "gguf_row_permutation"]
