"""bf16_linear against its reference: M in each regime (streamed with all rows in register
blocks of 4, blocked fp32 GEMM) and at their edges, batch independence (bitwise) up to 64 rows (STREAM_ROWS), awkward K / N, bias on and off, 3-D inputs, fp32
weights (at::linear), opcheck."""

from __future__ import annotations

import pytest
import torch

from _helpers import assert_close
from vllm_hybrid_neuron.ops import bf16_linear, bf16_linear_ref
from vllm_hybrid_neuron.ops.bf16_linear import STREAM_ROWS


def _inputs(M, N, K, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    return x, w, b


@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 7, 8, 9, 17, 24, 25, 64, 65, 70])
@pytest.mark.parametrize("N,K", [(1, 16), (7, 40), (129, 1536), (1536, 3072), (64, 17)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_bf16_against_reference(M, N, K, bias):
    x, w, b = _inputs(M, N, K, torch.bfloat16, bias, seed=M * 31 + N)
    got = bf16_linear(x, w, b)
    assert got.dtype == torch.bfloat16 and got.shape == (M, N)
    ref = bf16_linear_ref(x, w, b)
    # fp32 accumulation in both; one bf16 rounding of the result apart at most.
    assert_close(got, ref, torch.bfloat16, name=f"M{M} N{N} K{K}")
    # Every regime accumulates in fp32 and rounds once (half a bf16 ulp) from the fp32 result.
    exact = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
    torch.testing.assert_close(got.float(), exact, atol=1e-3, rtol=2 ** -8)


@pytest.mark.parametrize("M", [1, 4, 8, 16])
def test_fp32_weights_use_at_linear(M):
    x, w, b = _inputs(M, 96, 80, torch.float32, True)
    assert_close(bf16_linear(x, w, b), bf16_linear_ref(x, w, b), torch.float32)


def test_leading_dims_and_empty_batch():
    x, w, b = _inputs(6, 48, 64, torch.bfloat16, True)
    got = bf16_linear(x.view(2, 3, 64), w, b)
    assert got.shape == (2, 3, 48)
    assert_close(got.view(6, 48), bf16_linear_ref(x, w, b), torch.bfloat16)
    assert bf16_linear(x[:0], w, b).shape == (0, 48)


def test_each_weight_row_is_used():
    """A wrong row or K offset shows: every output equals one known dot product."""
    K, N = 48, 10
    w = torch.zeros(N, K, dtype=torch.bfloat16)
    for n in range(N):
        w[n, (5 * n) % K] = n + 1
    x = torch.arange(1, K + 1, dtype=torch.bfloat16)[None].repeat(3, 1)
    expected = torch.tensor([(n + 1) * ((5 * n) % K + 1) for n in range(N)], dtype=torch.float32)
    expected = expected.to(torch.bfloat16).float()  # the exact sums, rounded once to bf16
    torch.testing.assert_close(bf16_linear(x, w).float(), expected.expand(3, N), atol=0, rtol=0)


@pytest.mark.parametrize("M", [1, 8, 12, 40])
def test_opcheck(M):
    x, w, b = _inputs(M, 40, 64, torch.bfloat16, True)
    torch.library.opcheck(torch.ops.vllm_hybrid_neuron.bf16_linear, (x, w, b))


def test_blocked_gemm_crosses_weight_blocks():
    """Prefill sizes convert the weight 512 rows at a time when K = 4096: 3 blocks here."""
    x, w, b = _inputs(30, 1100, 4096, torch.bfloat16, True, seed=5)
    exact = torch.nn.functional.linear(x.float(), w.float(), b.float())
    torch.testing.assert_close(bf16_linear(x, w, b).float(), exact, atol=1e-3, rtol=2 ** -8)


# (1000, 384) and (2048, 1536): shapes where an M-dependent kernel (fp32 GEMM above 4 rows, a
# planted break) did change some rows' bits; the small ones cover tails.
@pytest.mark.parametrize("N,K", [(1000, 384), (2048, 1536), (7, 40), (64, 17)],
                         ids=lambda v: str(v))
def test_rows_do_not_depend_on_the_batch(N, K):
    """Up to STREAM_ROWS rows (decode batches, speculative verification, short prefills) a
    row's result is bitwise the same whichever rows share its call: a verification step's
    token gets the bits its plain decode step would get."""
    x, w, b = _inputs(STREAM_ROWS, N, K, torch.bfloat16, True, seed=5)
    alone = torch.cat([bf16_linear(x[i:i + 1], w, b) for i in range(STREAM_ROWS)])
    for M in (2, 3, 4, 5, 8, 11, 16, 24, 25, 40, STREAM_ROWS):
        assert torch.equal(bf16_linear(x[:M], w, b), alone[:M]), M
