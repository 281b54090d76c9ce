"""Every Triton kernel compiles for a Hopper GPU (sm_90), on a machine without one.

The interpreter (``test_triton_backend.py``) checks what the kernels compute, but it is
not the compiler: dynamic loop bounds, 3-D tiles, dot shapes and dtype rules are only
checked when Triton lowers a kernel to PTX and runs ptxas (both ship with triton). This
file does that for one representative specialization per kernel and LoRA mode, so a
kernel that cannot compile never reaches a lent GPU. Nothing is launched.

The compiles run in a child process without TRITON_INTERPRET (this test session sets it
when there is no GPU, and triton fixes interpreter vs compiler when a module is imported):
``python tests/test_triton_compile.py`` is that child.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def test_every_kernel_compiles_for_hopper():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # triton 3.9's default, stated to silence a warning
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    # + reduce, sgmv x3, dX x2 (4-bit, 8-bit)
    assert proc.stdout.count("compiled ") == len(FUSED) + 6, proc.stdout


def _compile(kernel, types: dict[str, str], constexprs: dict):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = dict(types) | {name: "constexpr" for name in constexprs}
    assert list(signature) == kernel.arg_names, "signature out of date with the kernel"
    compiled = triton.compile(ASTSource(kernel, signature, constexprs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    print(f"compiled {kernel.__name__} {constexprs}: shared {compiled.metadata.shared} B",
          flush=True)


def _fused_types(dtype: str, out: str, codes: str) -> dict[str, str]:
    return {"x_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "q_ptr": codes, "s_ptr": "*fp16",
            "o_ptr": "*fp16", "t_ptr": "*fp32", "bias_ptr": f"*{dtype}", "y_ptr": f"*{out}",
            "a_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "ids_ptr": "*i32", "offs_ptr": "*i64",
            "lscale_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "R": "i32",
            "MAX_RANK": "i32", "GROUPS": "i32", "K_PER_SPLIT": "i32"}


# (dtype, scheme (-1 dense; 3 int8), group, offsets, LoRA mode, split-K, blocks M/N/K/R):
# decode and prefill tiles
FUSED = [
    ("bf16", 0, 128, True, 1, 4, (16, 64, 128, 16)),    # decode, asym, one adapter, split-K
    ("bf16", 2, 128, False, 2, 1, (16, 32, 32, 16)),    # decode, nf4, BGMV gather
    ("bf16", 2, 128, False, 1, 8, (16, 64, 128, 16)),   # decode, nf4 table lookup, split-K
    ("fp16", 1, 128, False, 0, 1, (64, 128, 64, 16)),   # prefill base only, sym
    ("fp32", -1, 1, False, 1, 1, (64, 128, 64, 128)),   # dense fp32 (ieee dot), rank block 128
    ("bf16", 3, 16, True, 1, 4, (16, 64, 32, 16)),      # decode, int8 g16 (2 groups a tile)
    ("fp16", 3, 32, False, 2, 1, (16, 32, 32, 16)),     # decode, int8, BGMV gather
    ("bf16", 3, 128, False, 1, 1, (64, 128, 64, 16)),   # prefill, int8, one adapter
]


def compile_fused(dtype, scheme, group, offsets, lora, split, blocks):
    import triton.language as tl

    from lorart.backend.triton import fused_linear

    dot = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}[dtype]
    bm, bn, bk, br = blocks
    codes = "*i8" if scheme == 3 else "*u8"
    _compile(fused_linear.fused_lora_linear_kernel,
             _fused_types(dtype, dtype if split == 1 else "fp32", codes),
             {"QUANT": scheme >= 0, "SCHEME": max(scheme, 0), "GROUP": group,
              "OFFSETS": offsets, "HAS_BIAS": True, "LORA": lora, "SPLIT_K": split, "DOT": dot,
              "PREC": "ieee" if dtype == "fp32" else "tf32", "BLOCK_M": bm, "BLOCK_N": bn,
              "BLOCK_K": bk, "BLOCK_R": br})


def compile_split_k_reduce():
    from lorart.backend.triton import fused_linear

    _compile(fused_linear.splitk_reduce_kernel, {"partial_ptr": "*fp32", "y_ptr": "*bf16",
                                                 "MN": "i32"}, {"SPLIT_K": 4, "BLOCK": 1024})


def compile_sgmv_and_backward():
    import triton.language as tl

    from lorart.backend.triton import backward, sgmv

    blocks = {"DOT": tl.bfloat16, "PREC": "tf32", "BLOCK_M": 64}
    segs = {"order_ptr": "*i64", "starts_ptr": "*i64", "offs_ptr": "*i64"}
    _compile(sgmv.sgmv_shrink_kernel,
             {"inp_ptr": "*bf16", "v_ptr": "*bf16", "out_ptr": "*fp32"} | segs
             | {"C": "i32", "OUT_STRIDE": "i32", "STRIDE_R": "i32", "STRIDE_C": "i32"},
             blocks | {"BLOCK_R": 16, "BLOCK_C": 64})
    _compile(sgmv.sgmv_expand_kernel,
             {"t_ptr": "*fp32", "v_ptr": "*bf16", "y_ptr": "*bf16"} | segs
             | {"scales_ptr": "*fp32", "N": "i32", "T_STRIDE": "i32", "STRIDE_N": "i32",
                "STRIDE_R": "i32"},
             blocks | {"BLOCK_N": 64, "BLOCK_R": 16})
    _compile(sgmv.sgmv_seg_outer_kernel,
             {"left_ptr": "*fp32", "right_ptr": "*bf16", "out_ptr": "*bf16"} | segs
             | {"scales_ptr": "*fp32", "C": "i32", "LEFT_STRIDE": "i32", "OUT_STRIDE_R": "i32",
                "OUT_STRIDE_C": "i32"},
             blocks | {"BLOCK_R": 16, "BLOCK_C": 64})
    for codes, scheme, group, block_k in (("*u8", 0, 64, 64), ("*i8", 3, 16, 32)):
        _compile(backward.dx_base_kernel,
                 {"dy_ptr": "*bf16", "w_ptr": "*bf16", "q_ptr": codes, "s_ptr": "*fp16",
                  "o_ptr": "*fp16", "t_ptr": "*fp32", "dx_ptr": "*fp32", "M": "i32",
                  "N": "i32", "K": "i32", "GROUPS": "i32"},
                 {"QUANT": True, "SCHEME": scheme, "GROUP": group, "OFFSETS": scheme == 0}
                 | blocks | {"BLOCK_N": 64, "BLOCK_K": block_k})


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"
    for case in FUSED:
        compile_fused(*case)
    compile_split_k_reduce()
    compile_sgmv_and_backward()
