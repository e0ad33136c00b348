"""The model's projection: padding 2-3 fp32 rows to 4 (a faster CPU GEMM kernel) changes nothing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from inferstack.engine.models.layers import linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("with_bias", [False, True])
def test_each_row_equals_its_own_projection(rows: int, dtype: torch.dtype, with_bias: bool) -> None:
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 64, generator=g).to(dtype)
    w = torch.randn(96, 64, generator=g).to(dtype)
    b = torch.randn(96, generator=g).to(dtype) if with_bias else None
    out = linear(x, w, b)
    assert out.shape == (rows, 96) and out.dtype == dtype and out.is_contiguous()
    for i in range(rows):
        torch.testing.assert_close(out[i], F.linear(x[i:i + 1], w, b)[0], rtol=1e-5 if dtype == torch.float32 else 2e-2,
                                   atol=1e-5 if dtype == torch.float32 else 2e-2)
