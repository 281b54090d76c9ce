"""4- and 8-bit group-quantized weights: the packed layouts every lorart kernel reads.

Layout of a 4-bit ``QuantizedWeight`` (schemes ``asym``, ``sym``, ``nf4``) for a base
weight ``W [N, K]`` (out, in), groups of ``group_size`` consecutive values along K:

    qweight  uint8 [N, K // 2]          byte j of row n: code of k = 2j in the low
                                         nibble, code of k = 2j + 1 in the high nibble
    scales   float16|float32 [N, K // g]
    offsets  like scales, ``asym`` only (``None`` for ``sym`` and ``nf4``)

    W[n, k] = scales[n, k // g] * table[q(n, k)] + offsets[n, k // g]

with ``table`` = ``[0..15]`` (asym), ``[-8..7]`` (sym) or the 16 NF4 values (nf4).
Rows of W stay contiguous along K, so a decode kernel streams each row once; the
same arithmetic lives in ``csrc/common/quant_math.h`` for the C++ and CUDA kernels.

The 8-bit layout (scheme ``int8``) keeps one signed code a byte, rows contiguous:

    qweight  int8 [N, K]                 code of (n, k) at [n, k]
    scales   float16|float32 [N, K // g]
    offsets  like scales, or ``None``    (optional for ``int8``)

    W[n, k] = scales[n, k // g] * q(n, k) + offsets[n, k // g]     (+ 0 without offsets)

Symmetric int8 (``quantize(..., scheme="int8")``, GGUF Q8_0) has no offsets. With
float32 scales (and offsets) it holds GGUF's 5-, 6- and 8-bit blocks exactly: Q5_0
(q − 16), Q5_1/Q5_K (q in 0..31 plus an offset), Q6_K (q − 32, groups of 16), Q8_0
(see ``lorart.convert.gguf``). Group sizes: 32..256 for 4 bits (the C++/CUDA kernels'
unit), 16..256 for 8 bits (Q6_K's sub-blocks are 16 values).

Scales are float16 by default (GGUF and GPTQ store float16, so their conversion is
exact); float32 is kept where the source has it (bitsandbytes absmax, GPTQ
zero-points folded into offsets) so converters never round.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

SCHEMES = ("asym", "sym", "nf4")  # the 4-bit schemes (kept as before for their users)
SCHEMES_8BIT = ("int8",)
ALL_SCHEMES = SCHEMES + SCHEMES_8BIT
GROUP_SIZES = (32, 64, 128, 256)  # 4-bit
GROUP_SIZES_8BIT = (16, 32, 64, 128, 256)
SCALE_DTYPES = (torch.float16, torch.float32)

# The 16 NormalFloat-4 values of QLoRA (Dettmers et al. 2023); same as quant_math.h.
NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171638489,
    0.44070982933044434,
    0.56261700391769409,
    0.72295683622360229,
    1.0,
)

_FORMAT = "lorart.q4"  # files of either bit width (the name predates the 8-bit layout)
_FORMAT_VERSION = "1"


def code_table(scheme: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The value each 4-bit code stands for before scaling, ``[16]`` float32."""
    check_scheme(scheme)
    if scheme not in SCHEMES:
        raise ValueError(f"scheme {scheme!r} has no 16-entry code table (8-bit codes are "
                         f"their own values)")
    if scheme == "asym":
        values = torch.arange(16, dtype=torch.float32)
    elif scheme == "sym":
        values = torch.arange(16, dtype=torch.float32) - 8
    else:
        values = torch.tensor(NF4_VALUES, dtype=torch.float32)
    return values.to(device)


def check_scheme(scheme: str) -> None:
    if scheme not in ALL_SCHEMES:
        raise ValueError(f"scheme must be one of {ALL_SCHEMES}, got {scheme!r}")


def bits_of(scheme: str) -> int:
    """Bits a code of ``scheme`` takes: 8 for ``int8``, else 4."""
    check_scheme(scheme)
    return 8 if scheme == "int8" else 4


def check_group_size(group_size: int, k: int | None = None, bits: int = 4) -> None:
    allowed = GROUP_SIZES_8BIT if bits == 8 else GROUP_SIZES
    if group_size not in allowed:
        raise ValueError(f"group_size must be one of {allowed} for {bits}-bit weights, got "
                         f"{group_size!r}")
    if k is not None and k % group_size != 0:
        raise ValueError(
            f"in_features K={k} is not divisible by group_size={group_size}; "
            f"choose a group_size that divides K"
        )


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """Pack codes ``[N, K]`` (integers 0..15, K even) into bytes ``[N, K // 2]``."""
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_codes(qweight: torch.Tensor) -> torch.Tensor:
    """Unpack bytes ``[N, K // 2]`` into codes ``[N, K]`` (int64, 0..15)."""
    low = (qweight & 15).to(torch.int64)
    high = (qweight >> 4).to(torch.int64)
    return torch.stack((low, high), dim=-1).reshape(qweight.shape[0], 2 * qweight.shape[1])


@dataclass
class QuantizedWeight:
    """A group-quantized base weight ``W [N, K]`` in lorart's packed layout (module doc).

    Attributes:
        qweight: 4-bit: ``[N, K // 2]`` uint8, two codes a byte (low nibble = even k);
            ``int8``: ``[N, K]`` int8, one code a byte.
        scales: ``[N, K // group_size]`` float16 or float32.
        offsets: like ``scales`` for ``asym`` (required) and ``int8`` (optional);
            ``None`` for ``sym`` and ``nf4``.
        group_size: values along K sharing one scale (32..256; 16..256 for ``int8``).
        scheme: ``"asym"``, ``"sym"``, ``"nf4"`` or ``"int8"``.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor | None
    group_size: int
    scheme: str

    def __post_init__(self) -> None:
        bits = bits_of(self.scheme)
        want = (torch.int8, "[N, K]") if bits == 8 else (torch.uint8, "[N, K/2]")
        if self.qweight.dtype != want[0] or self.qweight.dim() != 2:
            raise TypeError(
                f"qweight must be a 2-D {want[0]} tensor {want[1]} for scheme "
                f"{self.scheme!r}, got {self.qweight.dtype} of shape {tuple(self.qweight.shape)}"
            )
        n, k = self.shape
        check_group_size(self.group_size, k, bits)
        groups = k // self.group_size
        for name in ("scales", "offsets"):
            t = getattr(self, name)
            if t is None:
                continue
            if t.dtype not in SCALE_DTYPES:
                raise TypeError(f"{name} must be float16 or float32, got {t.dtype}")
            if tuple(t.shape) != (n, groups):
                raise ValueError(f"{name} must have shape [N, K/group_size]=[{n}, {groups}], "
                                 f"got {tuple(t.shape)}")
            if t.device != self.qweight.device:
                raise ValueError(f"{name} is on {t.device} but qweight is on "
                                 f"{self.qweight.device}")
        if self.scheme != "int8" and (self.offsets is None) != (self.scheme != "asym"):
            raise ValueError("offsets must be given for scheme 'asym', may be given for "
                             "'int8', and are not allowed for 'sym' and 'nf4'")
        if self.offsets is not None and self.offsets.dtype != self.scales.dtype:
            raise TypeError("offsets and scales must share a dtype")

    # ----------------------------------------------------------------- properties
    @property
    def bits(self) -> int:
        """4 or 8: bits per code."""
        return bits_of(self.scheme)

    @property
    def shape(self) -> torch.Size:
        """``(N, K)``: out_features, in_features."""
        return torch.Size((self.out_features, self.in_features))

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def in_features(self) -> int:
        per_byte = 1 if self.scheme == "int8" else 2
        return per_byte * self.qweight.shape[1]

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def nbytes(self) -> int:
        """Bytes held: packed codes plus scales and offsets."""
        total = self.qweight.numel() * self.qweight.element_size()
        total += self.scales.numel() * self.scales.element_size()
        if self.offsets is not None:
            total += self.offsets.numel() * self.offsets.element_size()
        return total

    # ----------------------------------------------------------------- conversion
    def codes(self) -> torch.Tensor:
        """Unpacked codes ``[N, K]`` int64 (4-bit: 0..15; int8: -128..127)."""
        if self.scheme == "int8":
            return self.qweight.to(torch.int64)
        return unpack_codes(self.qweight)

    def relayout(self, scheme: str, group_size: int, scale_dtype: torch.dtype,
                 offsets: bool) -> QuantizedWeight:
        """The same weight in another layout, exactly (``dequantize()`` equal bit for bit,
        up to the sign of a zero): groups split into smaller ones by repeating their scale,
        float16 scales widened to float32, zero offsets added, and 4-bit ``asym``/``sym``
        codes widened to ``int8``. What cannot be exact raises ``ValueError`` (NF4 codes,
        fewer bits, larger groups, narrower scales, dropping offsets)."""
        same = (scheme, group_size, scale_dtype, offsets) == (
            self.scheme, self.group_size, self.scales.dtype, self.offsets is not None)
        if same:
            return self
        why = None
        if scheme != self.scheme and (scheme != "int8" or self.scheme == "nf4"):
            why = f"scheme {self.scheme!r} codes cannot be written as {scheme!r}"
        elif self.group_size % group_size:
            why = f"group {self.group_size} cannot be split into groups of {group_size}"
        elif scale_dtype not in SCALE_DTYPES or (self.scales.dtype == torch.float32
                                                 and scale_dtype != torch.float32):
            why = f"{self.scales.dtype} scales cannot be held as {scale_dtype}"
        elif self.offsets is not None and not offsets:
            why = "offsets cannot be dropped"
        if why is not None:
            raise ValueError(f"cannot relayout {self!r} exactly: {why}")
        repeat = self.group_size // group_size
        scales = self.scales.to(scale_dtype).repeat_interleave(repeat, dim=1)
        offs = None
        if offsets:
            offs = (torch.zeros_like(scales) if self.offsets is None
                    else self.offsets.to(scale_dtype).repeat_interleave(repeat, dim=1))
        qweight = self.qweight
        if scheme == "int8" and self.scheme != "int8":  # table[q] of asym/sym is an integer
            qweight = code_table(self.scheme, qweight.device)[self.codes()].to(torch.int8)
        return QuantizedWeight(qweight, scales, offs, group_size, scheme)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight ``[N, K]``, computed in float32 and cast to ``dtype``."""
        return dequantize_rows(self.qweight, self.scales, self.offsets, self.group_size,
                               self.scheme).to(dtype)

    def rows(self, index: torch.Tensor) -> QuantizedWeight:
        """The weight of rows ``index`` (``W[index]``), still packed (an embedding lookup)."""
        return QuantizedWeight(self.qweight[index], self.scales[index],
                               None if self.offsets is None else self.offsets[index],
                               self.group_size, self.scheme)

    def to(self, device: torch.device | str) -> QuantizedWeight:
        """A copy on ``device`` (the packed layout is the same everywhere)."""
        return QuantizedWeight(
            self.qweight.to(device),
            self.scales.to(device),
            None if self.offsets is None else self.offsets.to(device),
            self.group_size,
            self.scheme,
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        """The packed tensors by name (``qweight``, ``scales`` and maybe ``offsets``)."""
        out = {"qweight": self.qweight, "scales": self.scales}
        if self.offsets is not None:
            out["offsets"] = self.offsets
        return out

    def metadata(self) -> dict[str, str]:
        return {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "scheme": self.scheme,
            "bits": str(self.bits),
            "group_size": str(self.group_size),
            "shape": json.dumps(list(self.shape)),
        }

    def save(self, path: str | Path) -> None:
        """Write the packed tensors and layout metadata to a safetensors file."""
        from safetensors.torch import save_file

        tensors = {k: v.contiguous().cpu() for k, v in self.tensors().items()}
        save_file(tensors, str(path), metadata=self.metadata())

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> QuantizedWeight:
        """Read a file written by :meth:`save` (safetensors only; nothing is unpickled)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if meta.get("format") != _FORMAT:
                raise ValueError(f"{path} is not a lorart quantized weight (format="
                                 f"{meta.get('format')!r}, expected {_FORMAT!r})")
            names = set(f.keys())
            offsets = f.get_tensor("offsets") if "offsets" in names else None
            qw = cls(f.get_tensor("qweight"), f.get_tensor("scales"), offsets,
                     int(meta["group_size"]), meta["scheme"])
        if list(qw.shape) != json.loads(meta["shape"]):
            raise ValueError(f"{path}: stored shape {meta['shape']} does not match tensors")
        return qw

    def __repr__(self) -> str:
        n, k = self.shape
        return (f"QuantizedWeight(shape=[{n}, {k}], scheme={self.scheme!r}, "
                f"offsets={self.offsets is not None}, "
                f"group_size={self.group_size}, scale_dtype={self.scales.dtype}, "
                f"device={self.device})")


def dequantize_rows(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
                    group_size: int, scheme: str) -> torch.Tensor:
    """float32 ``[N, K]`` from packed parts (the arithmetic of the module doc: a multiply,
    then an add, both in float32, so GGUF's dequantizer is matched bit for bit)."""
    if scheme == "int8":
        values = qweight.to(torch.float32)
    else:
        values = code_table(scheme, qweight.device)[unpack_codes(qweight)]
    n, k = values.shape  # explicit sizes: -1 is ambiguous for zero rows
    w = values.view(n, k // group_size, group_size) * scales.float().unsqueeze(-1)
    if offsets is not None:
        w = w + offsets.float().unsqueeze(-1)
    return w.reshape(n, k)


def quantize(
    w: torch.Tensor,
    group_size: int = 128,
    scheme: str = "asym",
    scale_dtype: torch.dtype = torch.float16,
) -> QuantizedWeight:
    """Quantize a dense weight ``w [N, K]`` to 4 or 8 bits, round to nearest.

    ``asym``: per group ``scale = (max - min) / 15``, ``offset = min``.
    ``sym``: GGUF Q4_0's rule, ``scale = m / -8`` where ``m`` is the group's value of
    largest magnitude (so ``m`` itself is exact). ``nf4``: ``scale = absmax``, nearest
    NF4 value. ``int8``: GGUF Q8_0's rule, ``scale = absmax / 127``, codes in -127..127,
    no offsets. NaN or infinite weights are refused (``ValueError``). Codes are chosen
    against the *stored* (rounded) scales, so ``dequantize`` is the best reconstruction
    the stored scales allow.
    """
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise TypeError(f"w must be a 2-D tensor [N, K], got {type(w).__name__} "
                        f"{tuple(getattr(w, 'shape', ()))}")
    if not w.is_floating_point():
        raise TypeError(f"w must be floating point, got {w.dtype}")
    check_scheme(scheme)
    n, k = w.shape
    check_group_size(group_size, k, bits_of(scheme))
    if scale_dtype not in SCALE_DTYPES:
        raise TypeError(f"scale_dtype must be float16 or float32, got {scale_dtype}")
    finite = torch.isfinite(w.detach())
    if not bool(finite.all()):
        bad = (~finite).nonzero()[0].tolist()
        raise ValueError(f"w has {int((~finite).sum())} NaN or infinite values (first at "
                         f"[{bad[0]}, {bad[1]}]: {w[bad[0], bad[1]].item()}); cannot quantize")
    groups = w.detach().float().reshape(n, k // group_size, group_size)
    offsets = None
    if scheme == "int8":
        scale = (groups.abs().amax(-1) / 127).to(scale_dtype)
        s = scale.float().unsqueeze(-1)
        s = torch.where(s == 0, torch.ones_like(s), s)
        codes = torch.round(groups / s).clamp(-127, 127).to(torch.int8).reshape(n, k)
        return QuantizedWeight(codes.contiguous(), scale.contiguous(), None, group_size, scheme)
    if scheme == "asym":
        lo, hi = groups.amin(-1), groups.amax(-1)
        scale = ((hi - lo) / 15).to(scale_dtype)
        offset = lo.to(scale_dtype)
        s = scale.float().unsqueeze(-1)
        s = torch.where(s == 0, torch.ones_like(s), s)
        codes = torch.round((groups - offset.float().unsqueeze(-1)) / s).clamp(0, 15)
        offsets = offset
    elif scheme == "sym":
        idx = groups.abs().argmax(-1, keepdim=True)
        m = groups.gather(-1, idx).squeeze(-1)
        scale = (m / -8).to(scale_dtype)
        s = scale.float().unsqueeze(-1)
        s = torch.where(s == 0, torch.ones_like(s), s)
        codes = torch.round(groups / s + 8).clamp(0, 15)
    else:
        absmax = groups.abs().amax(-1)
        scale = absmax.to(scale_dtype)
        s = scale.float().unsqueeze(-1)
        s = torch.where(s == 0, torch.ones_like(s), s)
        table = code_table("nf4", w.device)
        codes = (groups / s).unsqueeze(-1).sub(table).abs().argmin(-1)
    packed = pack_codes(codes.reshape(n, k).to(torch.uint8))
    return QuantizedWeight(packed.contiguous(), scale.contiguous(), offsets, group_size, scheme)
