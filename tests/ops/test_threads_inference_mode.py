"""vLLM runs its model under torch.inference_mode() with several threads: the C++ ops
must work there too (at::parallel_for's pool threads do not inherit InferenceMode)."""

from __future__ import annotations

import torch

from vllm_hybrid_neuron.ops import chunk_gated_delta_rule, mamba_chunk_scan_combined_varlen


def _ssd_inputs(T=300, H=4, P=16, G=1, N=16, chunk=64):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    cu = torch.tensor([0, 130, T], dtype=torch.int32)
    # chunk boundaries per sequence, the metadata vLLM builds
    bounds, seq_idx = [0], []
    for s, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        for start in range(a, b, chunk):
            bounds.append(min(start + chunk, b))
            seq_idx.append(s)
    cu_chunks = torch.tensor(bounds, dtype=torch.int32)
    last = torch.tensor([seq_idx.index(1) - 1, len(seq_idx) - 1], dtype=torch.int32)
    return dict(x=r(T, H, P), dt=r(T, H), A=-torch.rand(H, generator=g), B=r(T, G, N),
                C=r(T, G, N), chunk_size=chunk, cu_seqlens=cu, cu_chunk_seqlens=cu_chunks,
                last_chunk_indices=last, seq_idx=torch.tensor(seq_idx, dtype=torch.int32),
                out=torch.empty(T, H, P), D=r(H), dt_bias=r(H), dt_softplus=True)


def test_ops_run_multithreaded_under_inference_mode():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            kw = _ssd_inputs()
            states = mamba_chunk_scan_combined_varlen(**kw)
            assert torch.isfinite(states).all() and torch.isfinite(kw["out"]).all()
            T, H, HV, K = 200, 2, 4, 32
            g = torch.Generator().manual_seed(1)
            q, k = (torch.randn(1, T, H, K, generator=g) for _ in range(2))
            v = torch.randn(1, T, HV, K, generator=g)
            gate = -torch.rand(1, T, HV, generator=g)
            beta = torch.rand(1, T, HV, generator=g)
            o, final = chunk_gated_delta_rule(
                q, k, v, gate, beta, output_final_state=True,
                cu_seqlens=torch.tensor([0, 70, T], dtype=torch.int32),
                use_qk_l2norm_in_kernel=True)
            assert torch.isfinite(o).all() and final.shape == (2, HV, K, K)
    finally:
        torch.set_num_threads(threads)
