"""The roofline arithmetic of ``lorart bench`` against hand-computed values."""

import pytest

from lorart.bench import roofline

# Llama-2-7B q_proj: W [4096, 4096], asym 4-bit, group 128, float16 scales and offsets.
N = K = 4096


def test_q4_weight_bytes_by_hand():
    codes = 4096 * 4096 // 2  # 8_388_608: two codes a byte
    groups = 4096 * 4096 // 128  # 131_072 groups
    assert roofline.q4_weight_bytes(N, K, 128, 2, True) == codes + groups * 4 == 8_912_896
    assert roofline.q4_weight_bytes(N, K, 128, 2, False) == 8_650_752  # sym: no offsets
    assert roofline.q4_weight_bytes(N, K, 32, 4, True) == 8_388_608 + 524_288 * 8


def test_dense_and_adapter_bytes_by_hand():
    assert roofline.dense_weight_bytes(N, K, 2) == 33_554_432
    # A [16, 4096] + B [4096, 16] in bf16
    assert roofline.adapter_bytes(N, K, [16], 2) == 16 * 8192 * 2 == 262_144
    # two adapters used, ragged ranks 8 and 64, fp32
    assert roofline.adapter_bytes(384, 256, [8, 64], 4) == 72 * 640 * 4 == 184_320


def test_decode_forward_one_row():
    # packed weight + adapter + x [1, 4096] + y [1, 4096] in bf16
    nbytes = roofline.layer_bytes(1, N, K, 8_912_896, [16], 2)
    assert nbytes == 8_912_896 + 262_144 + 8_192 + 8_192 == 9_191_424
    # 2·M·N·K + 2·M·r·(K + N) = 33_554_432 + 262_144
    assert roofline.layer_flops(1, N, K, [(1, 16)]) == 33_816_576


def test_mixed_batch_flops_count_only_rows_of_each_adapter():
    # gate_up of Llama-2-7B: K=4096, N=11008; 32 rows: 20 on a rank-8 adapter,
    # 12 on a rank-64 one. Σ m_s·r_s = 160 + 768 = 928; K + N = 15104.
    base = 2 * 32 * 11008 * 4096  # 2_885_681_152
    fwd = roofline.layer_flops(32, 11008, 4096, [(20, 8), (12, 64)], "fwd")
    bwd = roofline.layer_flops(32, 11008, 4096, [(20, 8), (12, 64)], "bwd")
    assert fwd == base + 2 * 15104 * 928 == 2_913_714_176
    assert bwd == base + 4 * 15104 * 928 == 2_941_747_200
    assert roofline.layer_flops(32, 11008, 4096, [(20, 8), (12, 64)], "train") == fwd + bwd
    # rows on no adapter (id -1) cost only the base
    assert roofline.layer_flops(32, 11008, 4096, [], "fwd") == base


def test_backward_bytes_by_hand():
    # tiny dense bf16 layer [384, 256], 8 rows, one rank-8 adapter:
    # W 196_608 + A,B read and dA,dB written 2·10_240 + dy 6_144 + x and dx 2·4_096
    w = roofline.dense_weight_bytes(384, 256, 2)
    assert roofline.layer_bytes(8, 384, 256, w, [8], 2, direction="bwd") == 231_424
    fwd = roofline.layer_bytes(8, 384, 256, w, [8], 2, direction="fwd")
    assert fwd == 196_608 + 10_240 + 4_096 + 6_144
    assert roofline.layer_bytes(8, 384, 256, w, [8], 2, direction="train") == fwd + 231_424


def test_fp32_adapters_on_bf16_activations():
    nbytes = roofline.layer_bytes(1, N, K, 0, [16], act_bytes=2, lora_bytes=4)
    assert nbytes == 16 * 8192 * 4 + 2 * 4096 * 2


def test_roofline_seconds_takes_the_binding_limit():
    assert roofline.roofline_seconds(1e9, 1e9, 1e10, 1e11) == pytest.approx(0.1)  # memory
    assert roofline.roofline_seconds(1e6, 1e12, 1e10, 1e11) == pytest.approx(10.0)  # compute


@pytest.mark.parametrize("call, match", [
    (lambda: roofline.q4_weight_bytes(4, 100, 32), "divisible"),
    (lambda: roofline.layer_flops(1, 4, 4, [(1, 8)], "sideways"), "direction"),
    (lambda: roofline.layer_bytes(1, 4, 4, 0, [8], 2, direction="up"), "direction"),
    (lambda: roofline.layer_flops(2, 4, 4, [(2, 8), (1, 8)]), "more than M"),
    (lambda: roofline.roofline_seconds(1, 1, 0, 1), "positive"),
])
def test_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
