"""Chunked SSD prefill: C++ kernel vs chunked reference, reference vs the token-by-token recurrence."""

import pytest
import torch
import torch.nn.functional as F

from tests.ops._helpers import assert_close
from vllm_hybrid_neuron.ops import _library
from vllm_hybrid_neuron.ops.ssd import mamba_chunk_scan_combined_varlen, mamba_chunk_scan_combined_varlen_ref

H, P, N, G = 4, 8, 16, 2


def chunk_meta(lens, chunk, computed=None):
    """vLLM-style chunk metadata: chunks never cross sequences; a chunk boundary falls on every
    absolute multiple of `chunk` (prefix-caching alignment, with `computed` tokens before)."""
    cu_chunk, seq_idx, last = [0], [], []
    pos = 0
    for s, L in enumerate(lens):
        done = computed[s] if computed else 0
        end = pos + L
        while pos < end:
            step = min(chunk - (done % chunk), end - pos)
            pos += step
            done += step
            cu_chunk.append(pos)
            seq_idx.append(s)
        last.append(len(seq_idx) - 1)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    return cu, torch.tensor(cu_chunk, dtype=torch.int32), torch.tensor(last), torch.tensor(seq_idx, dtype=torch.int32)


def _inputs(T, dtype, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(T, H, P, dtype=dtype)
    dt = torch.randn(T, H, dtype=dtype)
    A = -torch.rand(H) - 0.1
    B, C = torch.randn(T, G, N, dtype=dtype), torch.randn(T, G, N, dtype=dtype)
    return x, dt, A, B, C


def naive(x, dt, A, B, C, D, z, dt_bias, init, cu):
    """Token-by-token Mamba2 recurrence: h = exp(A dt) h + dt x B^T; y = h C + D x."""
    out = torch.zeros(x.shape)
    finals = []
    for s in range(cu.numel() - 1):
        h = init[s].clone() if init is not None else torch.zeros(H, P, N)
        for t in range(int(cu[s]), int(cu[s + 1])):
            d = F.softplus(dt[t].float() + dt_bias)                        # (H,)
            Bh = B[t].float().repeat_interleave(H // G, 0)                  # (H, N)
            Ch = C[t].float().repeat_interleave(H // G, 0)
            h = torch.exp(A * d)[:, None, None] * h + (d[:, None] * x[t].float())[..., None] * Bh[:, None]
            out[t] = ((h * Ch[:, None]).sum(-1) + D[:, None] * x[t].float()) * F.silu(z[t].float())
        finals.append(h)
    return out, torch.stack(finals)


def test_ref_matches_recurrence():
    lens = [1, 2, 37]
    x, dt, A, B, C = _inputs(sum(lens), torch.float32)
    D, z, dtb = torch.randn(H), torch.randn(sum(lens), H, P), torch.randn(H)
    init = torch.randn(3, H, P, N)
    cu, cuc, last, sidx = chunk_meta(lens, 16)
    out = torch.empty_like(x)
    fin = mamba_chunk_scan_combined_varlen_ref(x, dt, A, B, C, 16, cu, cuc, last, sidx, out, D=D, z=z,
                                               dt_bias=dtb, initial_states=init, dt_softplus=True)
    eo, ef = naive(x, dt, A, B, C, D, z, dtb, init, cu)
    assert_close(out, eo)
    assert_close(fin, ef)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lens,chunk", [([1], 16), ([2], 16), ([33], 16), ([70, 5, 1], 16),
                                        # chunks longer than the kernel's 64-token sub-chunks
                                        ([300, 1, 129], 160), ([64, 65], 256)])
@pytest.mark.parametrize("with_init", [True, False])
@pytest.mark.parametrize("intermediate", [True, False])
def test_fast_vs_ref(dtype, lens, chunk, with_init, intermediate):
    T = sum(lens)
    x, dt, A, B, C = _inputs(T, dtype, seed=len(lens))
    D, z, dtb = torch.randn(H, P), torch.randn(T, H, P, dtype=dtype), torch.randn(H)
    init = torch.randn(len(lens), H, P, N) if with_init else None
    cu, cuc, last, sidx = chunk_meta(lens, chunk, computed=[5 * i for i in range(len(lens))])
    o1, o2 = torch.empty_like(x), torch.empty_like(x)
    kw = dict(D=D, z=z, dt_bias=dtb, initial_states=init, dt_softplus=True, dt_limit=(0.0, 5.0),
              return_intermediate_states=intermediate, state_dtype=torch.float32)
    r1 = mamba_chunk_scan_combined_varlen_ref(x, dt, A, B, C, chunk, cu, cuc, last, sidx, o1, **kw)
    r2 = mamba_chunk_scan_combined_varlen(x, dt, A, B, C, chunk, cu, cuc, last, sidx, o2, **kw)
    assert_close(o2, o1, dtype, "out")
    assert_close(r2, r1, torch.float32 if dtype == torch.float32 else dtype, "states")
    if intermediate:
        assert r2.shape[0] == cuc.numel() - 1


def test_opcheck():
    x, dt, A, B, C = _inputs(20, torch.float32)
    cu, cuc, last, sidx = chunk_meta([12, 8], 8)
    states = torch.empty(cuc.numel() - 1, H, P, N)
    torch.library.opcheck(_library.ops.ssd_chunk_scan,
                          (x, dt, A, B, C, torch.randn(H), None, torch.randn(H), torch.randn(2, H, P, N),
                           cuc, sidx, True, 0.0, float("inf"), torch.empty_like(x), states))
