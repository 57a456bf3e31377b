"""PyTorch's weight-only int8/int4 CPU kernels against a dequantised float32 matmul (``blockrt/packed_kernels.py``):
blockrt's stored int4/int8 maps onto them exactly (zero term 0), up to float summation order."""

from __future__ import annotations

import pytest
import torch

from blockrt.int4 import dequantize_int4, quantize_int4
from blockrt.packed_kernels import (
    int4_layout,
    int4_scales_and_zeros,
    int4_supported,
    int4_to_kernel,
    int8_supported,
    linear_int4,
    linear_int8,
)
from blockrt.quantize import dequantize_int8, quantize_int8

pytestmark = pytest.mark.timeout(60)

F32_ATOL = 1e-4  # float32 summation order over K <= 512 of products ~0.1 (measured <= 1e-5)
BF16_MIN_COS = 0.999  # bfloat16 activations and scales against the float32 reference (measured > 0.9999)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


@pytest.mark.parametrize("n,k,group", [(64, 256, 128), (208, 128, 32), (16, 512, 256), (96, 192, 64)])
def test_int4_kernel_equals_dequantised_matmul(n, k, group):
    torch.manual_seed(n + k)
    w, x, bias = torch.randn(n, k), torch.randn(5, k), torch.randn(n)
    packed, scales = quantize_int4(w, group)
    ref = x @ dequantize_int4(packed, scales, (n, k)).T + bias  # (5, N)
    y = linear_int4(x, int4_to_kernel(packed), group, int4_scales_and_zeros(scales), bias)
    assert y.shape == ref.shape and y.dtype == torch.float32
    torch.testing.assert_close(y, ref, atol=F32_ATOL, rtol=0)
    xb = x.bfloat16()
    yb = linear_int4(xb, int4_to_kernel(packed), group, int4_scales_and_zeros(scales, torch.bfloat16))
    assert yb.dtype == torch.bfloat16 and _cos(yb, ref - bias) > BF16_MIN_COS


def test_int4_kernel_takes_leading_dims_and_strided_inputs():
    torch.manual_seed(1)
    w, x = torch.randn(32, 64), torch.randn(64, 6).T.reshape(2, 3, 64)  # (2, 3, K), not contiguous
    packed, scales = quantize_int4(w, 32)
    y = linear_int4(x, int4_to_kernel(packed), 32, int4_scales_and_zeros(scales))
    torch.testing.assert_close(y, x @ dequantize_int4(packed, scales, (32, 64)).T, atol=F32_ATOL, rtol=0)


def test_int4_kernel_nibbles_are_a_permutation_of_blockrts():
    torch.manual_seed(2)
    packed, _ = quantize_int4(torch.randn(80, 64), 32)
    kernel = int4_to_kernel(packed)
    assert kernel.shape == packed.shape and kernel.dtype == torch.uint8
    counts = [torch.bincount(torch.cat([b & 15, b >> 4]).flatten().long(), minlength=16) for b in (packed, kernel)]
    assert torch.equal(*counts)
    assert not torch.equal(kernel, packed)  # a different order: storing blockrt's bytes as is would be wrong


def test_int4_kernel_refuses_rows_not_a_multiple_of_16():
    packed, _ = quantize_int4(torch.randn(24, 64), 32)
    assert not int4_supported((24, 64)) and int4_supported((32, 64)) and not int4_supported((32, 4, 16))
    with pytest.raises(ValueError, match="multiple of 16"):
        int4_to_kernel(packed)


def test_int4_layout_names_the_cpu_capability():
    assert int4_layout() == torch.backends.cpu.get_cpu_capability().lower() != ""


@pytest.mark.parametrize("n,k", [(64, 256), (24, 112)])
def test_int8_kernel_equals_dequantised_matmul(n, k):
    torch.manual_seed(n)
    w, x, bias = torch.randn(n, k), torch.randn(3, 2, k), torch.randn(n)
    q, scale = quantize_int8(w)
    ref = x @ dequantize_int8(q, scale).T + bias  # (3, 2, N)
    y = linear_int8(x, q, scale, bias)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, atol=F32_ATOL, rtol=0)
    yb = linear_int8(x.bfloat16(), q, scale.bfloat16())
    assert yb.dtype == torch.bfloat16 and _cos(yb, ref - bias) > BF16_MIN_COS


def test_int8_kernel_refuses_16_bit_activations_when_k_is_not_a_multiple_of_16():
    q, scale = quantize_int8(torch.randn(24, 100))
    assert int8_supported((24, 100), torch.float32) and not int8_supported((24, 100), torch.bfloat16)
    x = torch.randn(2, 100)
    torch.testing.assert_close(linear_int8(x, q, scale), x @ dequantize_int8(q, scale).T, atol=F32_ATOL, rtol=0)
    with pytest.raises(ValueError, match="multiple of 16"):
        linear_int8(torch.randn(2, 100).bfloat16(), q, scale.bfloat16())
