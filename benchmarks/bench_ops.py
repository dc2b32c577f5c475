"""Benchmark the plugin's CPU ops against vLLM 0.32's own CPU ops on the same inputs.

Medians of >= 5 runs, 1 and 2 threads, real per-layer shapes (granite-4.0-h-tiny / -small,
Qwen3.5-35B-A3B). Decode ops also report the fraction of the measured in-place read+write memory
bandwidth. Writes benchmarks/results/ops.md and ops.json.

    python benchmarks/bench_ops.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from vllm_hybrid_neuron import ops as V

RESULTS = Path(__file__).parent / "results"
# (nheads, headdim, dstate, ngroups, conv width)
GRANITE = {"granite-4.0-h-tiny": (48, 64, 128, 1, 4), "granite-4.0-h-small": (128, 64, 128, 1, 4)}
QWEN35 = dict(H=16, HV=32, K=128, V=128, width=4)  # Qwen3.5-35B-A3B GDN layer


def median_ms(fn, reps, setup=None):
    times = []
    for _ in range(reps + 1):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[1:])  # first call is warm-up


def inplace_bw_gbs(nbytes, reps=9):
    """Measured in-place read+write bandwidth (GB/s, read + write counted) on a buffer of nbytes."""
    t = torch.randn(max(nbytes // 4, 1 << 20))
    ms = median_ms(lambda: t.mul_(1.0000001), reps)
    return 2 * t.numel() * 4 / (ms * 1e6)


def vllm_ops():
    import vllm._custom_ops as vops  # noqa: F401
    from vllm.model_executor.layers.mamba.ops.cpu import causal_conv1d as vconv
    from vllm.model_executor.layers.mamba.ops.cpu import mamba_ssm as vssm

    return vops, vconv, vssm


def ssu_inputs(model, batch, L=1):
    H, P, N, G, _ = GRANITE[model]
    T = batch * L
    slots = 1 + batch * L
    state = torch.randn(slots, H, P, N) * 0.1
    x = torch.randn(T, H, P, dtype=torch.bfloat16)
    dt = torch.randn(T, H, dtype=torch.bfloat16)[..., None].expand(-1, -1, P)
    A = (-torch.rand(H))[:, None, None].expand(-1, P, N)
    B, C = torch.randn(T, G, N, dtype=torch.bfloat16), torch.randn(T, G, N, dtype=torch.bfloat16)
    D = torch.randn(H)[:, None].expand(-1, P)
    dtb = torch.randn(H)[:, None].expand(-1, P)
    idx = torch.arange(1, slots, dtype=torch.int32).view(batch, L)
    return state, x, dt, A, B, C, D, dtb, idx


def bench_ssu(rows, reps, vssm):
    model = "granite-4.0-h-small"
    for L, label in ((1, "plain decode"), (4, "spec decode, 3 drafts")):
        batch = 8
        state, x, dt, A, B, C, D, dtb, idx = ssu_inputs(model, batch, L)
        sbytes = state[0].numel() * 4 * batch
        moved = sbytes * (2 if L == 1 else 1 + L)  # read once, write once per token
        out = torch.empty_like(x)
        kw = {} if L == 1 else dict(num_accepted_tokens=torch.full((batch,), 2, dtype=torch.int32),
                                    cu_seqlens=torch.arange(0, batch * L + 1, L, dtype=torch.int32))
        sidx = idx[:, 0] if L == 1 else idx
        ours = lambda: V.selective_state_update(state, x, dt, A, B, C, D, None, dtb, True, sidx, sidx, out=out, **kw)  # noqa
        theirs = lambda: vssm.selective_state_update(state, x, dt, A, B, C, D, None, dtb, True, sidx, sidx, out=out, **kw)  # noqa
        for th in (1, 2):
            torch.set_num_threads(th)
            bw = inplace_bw_gbs(sbytes * 2)
            a, b = median_ms(ours, reps), median_ms(theirs, reps)
            floor = moved / (bw * 1e6)
            rows.append(dict(op="selective_state_update", case=f"{model}, batch 8, {label}, fp32 state",
                             threads=th, ours_ms=a, vllm_ms=b, speedup=b / a, floor_ms=floor,
                             bw_fraction=floor / a, bw_gbs=bw))


def bench_conv_update(rows, reps, vconv):
    for model, (H, P, N, G, W) in GRANITE.items():
        dim, batch = H * P + 2 * G * N, 8
        st = torch.randn(1 + batch, W - 1, dim, dtype=torch.bfloat16).transpose(1, 2)
        w, b = torch.randn(dim, W, dtype=torch.bfloat16), torch.randn(dim, dtype=torch.bfloat16)
        x = torch.randn(batch, dim, dtype=torch.bfloat16)
        idx = torch.arange(1, batch + 1, dtype=torch.int32)
        ours = lambda: V.causal_conv1d_update(x.clone(), st, w, b, "silu", idx)  # noqa
        theirs = lambda: vconv.causal_conv1d_update_cpu(x.clone(), st, w, b, "silu", idx)  # noqa
        for th in (1, 2):
            torch.set_num_threads(th)
            a, bb = median_ms(ours, reps), median_ms(theirs, reps)
            rows.append(dict(op="causal_conv1d_update", case=f"{model}, batch 8, bf16", threads=th,
                             ours_ms=a, vllm_ms=bb, speedup=bb / a))


def bench_ssd(rows, reps, vssm, T):
    for model in ("granite-4.0-h-tiny", "granite-4.0-h-small"):
        H, P, N, G, _ = GRANITE[model]
        chunk = 256
        x = torch.randn(T, H, P, dtype=torch.bfloat16)
        dt = torch.randn(T, H, dtype=torch.bfloat16)
        A = -torch.rand(H)
        B, C = torch.randn(T, G, N, dtype=torch.bfloat16), torch.randn(T, G, N, dtype=torch.bfloat16)
        D, dtb = torch.randn(H), torch.randn(H)
        cu = torch.tensor([0, T], dtype=torch.int32)
        cuc = torch.arange(0, T + 1, chunk, dtype=torch.int32)
        nch = cuc.numel() - 1
        last, sidx = torch.tensor([nch - 1]), torch.zeros(nch, dtype=torch.int32)
        init = torch.randn(1, H, P, N) * 0.1
        out = torch.empty_like(x)
        kw = dict(D=D, z=None, dt_bias=dtb, initial_states=init, dt_softplus=True, state_dtype=torch.float32)
        ours = lambda: V.mamba_chunk_scan_combined_varlen(x, dt, A, B, C, chunk, cu, cuc, last, sidx, out, **kw)  # noqa
        theirs = lambda: vssm._mamba_chunk_scan_combined_fwd_cpu(  # noqa
            x, dt, A, B, C, chunk, out, cu_seqlens=cu, cu_chunk_seqlens=cuc, last_chunk_indices=last,
            seq_idx=sidx, **kw)
        for th in (1, 2):
            torch.set_num_threads(th)
            a, b = median_ms(ours, reps), median_ms(theirs, reps)
            rows.append(dict(op="mamba_chunk_scan_combined_varlen", case=f"{model}, {T} tokens, bf16",
                             threads=th, ours_ms=a, vllm_ms=b, speedup=b / a))


def gdn_inputs(T, dtype):
    q = torch.nn.functional.normalize(torch.randn(1, T, QWEN35["H"], QWEN35["K"]), dim=-1).to(dtype)
    k = torch.nn.functional.normalize(torch.randn(1, T, QWEN35["H"], QWEN35["K"]), dim=-1).to(dtype)
    v = torch.randn(1, T, QWEN35["HV"], QWEN35["V"], dtype=dtype)
    a, b = torch.randn(T, QWEN35["HV"], dtype=dtype), torch.randn(T, QWEN35["HV"], dtype=dtype)
    A_log, dt_bias = torch.randn(QWEN35["HV"]), torch.randn(QWEN35["HV"])
    return q, k, v, a, b, A_log, dt_bias


def bench_gdn(rows, reps, vops, T):
    HV, K, Vd = QWEN35["HV"], QWEN35["K"], QWEN35["V"]
    # chunked prefill
    for dtype in (torch.bfloat16, torch.float32):
        q, k, v, a, b, A_log, dt_bias = gdn_inputs(T, dtype)
        g = -torch.exp(A_log) * torch.nn.functional.softplus(a.float() + dt_bias)
        beta = torch.sigmoid(b.float())
        pool = torch.randn(2, HV, Vd, K) * 0.05
        cu = torch.tensor([0, T], dtype=torch.int32)
        idx = torch.tensor([1], dtype=torch.int32)
        ours = lambda: V.chunk_gated_delta_rule(q, k, v, g[None].to(dtype), beta[None].to(dtype), None, pool, True, cu,  # noqa
                                                False, initial_state_indices=idx)
        theirs = None
        if dtype == torch.bfloat16:
            theirs = lambda: vops.chunk_gated_delta_rule_cpu(q, k, v, g[None].float(), beta[None].to(dtype), pool,  # noqa
                                                             True, cu, False, False, idx)
        for th in (1, 2):
            torch.set_num_threads(th)
            a_ms = median_ms(ours, reps)
            b_ms = _try(lambda: median_ms(theirs, reps)) if theirs else None
            rows.append(dict(op="chunk_gated_delta_rule", case=f"Qwen3.5-35B-A3B, {T} tokens, {str(dtype)[6:]}",
                             threads=th, ours_ms=a_ms, vllm_ms=b_ms, speedup=b_ms / a_ms if b_ms else None))
    # recurrent decode (fused sigmoid gating), batch 8
    batch = 8
    for dtype in (torch.bfloat16, torch.float32):
        q, k, v, a, b, A_log, dt_bias = gdn_inputs(batch, dtype)
        pool = torch.randn(1 + batch, HV, Vd, K) * 0.05
        idx = torch.arange(1, batch + 1, dtype=torch.int32)
        cu = torch.arange(batch + 1, dtype=torch.int32)
        ours = lambda: V.fused_sigmoid_gating_delta_rule_update(  # noqa
            A_log, a, b, dt_bias, q, k, v, initial_state=pool, cu_seqlens=cu, ssm_state_indices=idx,
            use_qk_l2norm_in_kernel=True)
        pool_kv = pool.view(1 + batch, HV, K, Vd)
        theirs = None
        if dtype == torch.bfloat16:
            theirs = lambda: vops.fused_sigmoid_gating_delta_rule_update_cpu(  # noqa
                A_log.to(dtype), dt_bias.to(dtype), q, k, v, a, b, pool_kv, idx, cu, True)
        sbytes = batch * HV * Vd * K * 4
        for th in (1, 2):
            torch.set_num_threads(th)
            bw = inplace_bw_gbs(sbytes * 2)
            a_ms = median_ms(ours, reps)
            b_ms = _try(lambda: median_ms(theirs, reps)) if theirs else None
            floor = 2 * sbytes / (bw * 1e6)
            rows.append(dict(op="fused_sigmoid_gating_delta_rule_update", threads=th,
                             case=f"Qwen3.5-35B-A3B, batch 8, {str(dtype)[6:]} act, fp32 state",
                             ours_ms=a_ms, vllm_ms=b_ms, speedup=b_ms / a_ms if b_ms else None,
                             floor_ms=floor, bw_fraction=floor / a_ms, bw_gbs=bw))


def bench_gdn_decode(rows, reps, vops, vconv):
    """One whole GDN decode step per layer (conv update + gates + l2 norms + recurrence), batch 8:
    the plugin's fused op, the plugin's previous two-op path, and vLLM's two CPU ops."""
    H, HV, K, Vd, W = (QWEN35[n] for n in ("H", "HV", "K", "V", "width"))
    batch, dim = 8, 2 * H * K + HV * Vd
    for dtype in (torch.bfloat16, torch.float32):
        qkv = torch.randn(batch, dim, dtype=dtype)
        a, b = torch.randn(batch, HV, dtype=dtype), torch.randn(batch, HV, dtype=dtype)
        A_log, dt_bias = torch.randn(HV), torch.randn(HV)
        st = torch.randn(1 + batch, W - 1, dim, dtype=dtype).transpose(1, 2)  # vLLM layout
        w, cb = torch.randn(dim, W, dtype=dtype) * 0.3, torch.randn(dim, dtype=dtype)
        pool = torch.randn(1 + batch, HV, Vd, K) * 0.05
        idx = torch.arange(1, batch + 1, dtype=torch.int32)
        cu = torch.arange(batch + 1, dtype=torch.int32)
        out = torch.empty(batch, HV, Vd, dtype=dtype)

        def split(x):
            q, k, v = x.split([H * K, H * K, HV * Vd], dim=-1)
            return (q.reshape(1, batch, H, K), k.reshape(1, batch, H, K),
                    v.reshape(1, batch, HV, Vd))

        fused = lambda: V.gdn_decode(qkv.clone(), a, b, st, w, cb, pool, A_log, dt_bias, idx,  # noqa
                                     H, K, out)

        def two_ops():
            x = V.causal_conv1d_update(qkv.clone(), st, w, cb, "silu", conv_state_indices=idx)
            q, k, v = split(x)
            V.fused_sigmoid_gating_delta_rule_update(
                A_log, a, b, dt_bias, q, k, v, initial_state=pool, cu_seqlens=cu,
                ssm_state_indices=idx, use_qk_l2norm_in_kernel=True)

        def vllm_two_ops():
            x = vconv.causal_conv1d_update_cpu(qkv.clone(), st, w, cb, "silu", idx)
            q, k, v = split(x)
            vops.fused_sigmoid_gating_delta_rule_update_cpu(  # wants A_log, dt_bias in act dtype
                A_log.to(dtype), dt_bias.to(dtype), q.contiguous(), k.contiguous(), v.contiguous(), a, b,
                pool.view(1 + batch, HV, K, Vd), idx, cu, True)

        sbytes = batch * HV * Vd * K * 4
        for th in (1, 2):
            torch.set_num_threads(th)
            bw = inplace_bw_gbs(sbytes * 2)
            floor = 2 * sbytes / (bw * 1e6)
            theirs = _try(lambda: median_ms(vllm_two_ops, reps)) if dtype == torch.bfloat16 \
                else None
            for name, fn in (("gdn_decode (fused: conv + gates + recurrence)", fused),
                             ("gdn_decode, previous two-op path", two_ops)):
                ms = median_ms(fn, reps)
                rows.append(dict(op=name, threads=th, ours_ms=ms, vllm_ms=theirs,
                                 case=f"Qwen3.5-35B-A3B, batch 8, {str(dtype)[6:]} act, fp32 state",
                                 speedup=theirs / ms if theirs else None, floor_ms=floor,
                                 bw_fraction=floor / ms, bw_gbs=bw))


def bench_gdn_spec_decode(rows, reps, seqs=4, drafts=3):
    """One GDN speculative verification step per layer (``seqs`` sequences of 1 + ``drafts``
    tokens, the state after every token to its own slot): the plugin's fused op against the
    plugin's previous two-op path (conv update, then torch-side gating + the recurrent kernel)."""
    H, HV, K, Vd, W = (QWEN35[n] for n in ("H", "HV", "K", "V", "width"))
    L, dim = 1 + drafts, 2 * H * K + HV * Vd
    T = seqs * L
    for state_dtype in (torch.float32, torch.bfloat16):
        dtype = torch.bfloat16
        qkv = torch.randn(T, dim, dtype=dtype)
        a, b = torch.randn(T, HV, dtype=dtype), torch.randn(T, HV, dtype=dtype)
        A_log, dt_bias = torch.randn(HV), torch.randn(HV)
        st = torch.randn(1 + seqs * L, W - 1 + drafts, dim, dtype=dtype).transpose(1, 2)
        w, cb = torch.randn(dim, W, dtype=dtype) * 0.3, torch.randn(dim, dtype=dtype)
        pool = (torch.randn(1 + seqs * L, HV, Vd, K) * 0.05).to(state_dtype)
        slots = torch.arange(1, 1 + seqs * L, dtype=torch.int32).view(seqs, L)
        acc = torch.ones(seqs, dtype=torch.int32)
        cu = torch.arange(0, T + 1, L, dtype=torch.int32)
        out = torch.empty(T, HV, Vd, dtype=dtype)
        fused = lambda: V.gdn_spec_decode(qkv.clone(), a, b, st, w, cb, pool, A_log, dt_bias,  # noqa
                                          slots, acc, cu, H, K, out)

        def two_ops():
            x = V.causal_conv1d_update(qkv.clone(), st, w, cb, "silu",
                                       conv_state_indices=slots[:, 0], num_accepted_tokens=acc,
                                       query_start_loc=cu, max_query_len=L)
            q, k, v = x.split([H * K, H * K, HV * Vd], dim=-1)
            V.fused_sigmoid_gating_delta_rule_update(
                A_log, a, b, dt_bias, q.reshape(1, T, H, K), k.reshape(1, T, H, K),
                v.reshape(1, T, HV, Vd), initial_state=pool, cu_seqlens=cu,
                ssm_state_indices=slots, num_accepted_tokens=acc, use_qk_l2norm_in_kernel=True)

        sbytes = seqs * HV * Vd * K * pool.element_size()
        for th in (1, 2):
            torch.set_num_threads(th)
            bw = inplace_bw_gbs(sbytes * 2)
            floor = (1 + L) * sbytes / (bw * 1e6)  # read once, written after every token
            case = (f"Qwen3.5-35B-A3B, {seqs} seqs x {L} tokens, bfloat16 act, "
                    f"{str(state_dtype)[6:]} state")
            for name, fn in (("gdn_spec_decode (fused)", fused),
                             ("gdn_spec_decode, previous two-op path", two_ops)):
                ms = median_ms(fn, reps)
                rows.append(dict(op=name, threads=th, ours_ms=ms, vllm_ms=None, case=case,
                                 speedup=None, floor_ms=floor, bw_fraction=floor / ms, bw_gbs=bw))


def _try(fn):
    try:
        return fn()
    except Exception as e:  # vLLM's op may reject a shape / dtype
        print("vLLM op failed:", type(e).__name__, str(e)[:200])
        return None


def write(rows):
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ops.json").write_text(json.dumps(rows, indent=1))
    f = lambda v, p=2: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    lines = ["# CPU ops vs vLLM 0.32 CPU ops (median ms per layer call)", "",
             "| op | case | threads | ours ms | vLLM ms | speedup | bw floor ms | % of bw |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pct = f"{100 * r['bw_fraction']:.0f}%" if r.get("bw_fraction") else "-"
        lines.append(f"| {r['op']} | {r['case']} | {r['threads']} | {f(r['ours_ms'], 3)} | "
                     f"{f(r['vllm_ms'], 3)} | {f(r.get('speedup'))}x | {f(r.get('floor_ms'), 3)} | {pct} |")
    (RESULTS / "ops.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, shorter prefill")
    ap.add_argument("--only", choices=["gdn_decode", "gdn_spec_decode"], help="run one group (results printed, "
                    "not written)")
    args = ap.parse_args()
    reps = 5 if args.quick else 9
    T = 512 if args.quick else 2048
    torch.manual_seed(0)
    vops, vconv, vssm = vllm_ops()
    rows = []
    if args.only:
        if args.only == "gdn_decode":
            bench_gdn_decode(rows, reps, vops, vconv)
        else:
            bench_gdn_spec_decode(rows, reps)
        for r in rows:
            print(r)
        return
    bench_ssu(rows, reps, vssm)
    bench_conv_update(rows, reps, vconv)
    bench_ssd(rows, 5, vssm, T)
    bench_gdn(rows, 5, vops, T)
    bench_gdn_decode(rows, reps, vops, vconv)
    bench_gdn_spec_decode(rows, reps)
    write(rows)


if __name__ == "__main__":
    main()
