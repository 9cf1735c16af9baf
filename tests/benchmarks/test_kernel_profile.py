"""``benchmarks/kernel_profile.py``: kernel names sorted into matmul / attention / other."""

from __future__ import annotations

import pytest
import torch

from benchmarks.kernel_profile import kernel_class, profile_split


@pytest.mark.parametrize("name, label", [
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTT", "matmul"),                      # cuBLAS on Hopper
    ("sm90_xmma_gemm_e4m3bf16_e4m3f32_f32_tn_n_tilesize128x128x128", "matmul"),
    ("void cutlass::device_kernel<f8f8bf16_rowwise_kernel>", "matmul"),           # _scaled_mm row-wise
    ("triton_tem_fused_addmm_0", "matmul"),                                       # inductor GEMM template
    ("aten::addmm", "matmul"),
    ("aten::_scaled_mm", "matmul"),
    ("aten::mkldnn_convolution", "matmul"),
    ("fmha_cutlassF_f16_aligned_64x64_rf_sm80", "attention"),                     # not a plain GEMM
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits>", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("triton_poi_fused_add_clamp_div_mul_0", "other"),                            # an activation quantizer
    ("triton_red_fused_native_layer_norm_1", "other"),
    ("aten::gelu", "other"),
    ("aten::comm_barrier", "other"),
])
def test_kernel_class(name: str, label: str) -> None:
    assert kernel_class(name) == label


def test_profile_split_on_cpu_adds_up() -> None:
    linear = torch.nn.Linear(64, 64)
    x = torch.randn(256, 64)
    q = torch.randn(1, 2, 32, 16)

    def run() -> None:
        for _ in range(3):
            torch.nn.functional.scaled_dot_product_attention(q, q, q)
            torch.nn.functional.gelu(linear(x))

    split = profile_split(run, torch.device("cpu"), top=3)
    ms = split["kernel_ms"]
    assert ms["matmul"] > 0 and ms["attention"] > 0 and ms["other"] > 0
    assert split["matmul_share"] == pytest.approx(ms["matmul"] / sum(ms.values()))
    assert len(split["top_kernels"]) == 3
    assert split["top_kernels"][0]["ms"] >= split["top_kernels"][-1]["ms"]
