"""The ops and their references against formulas written here from the model definitions.

Each ``*_ref`` shares some Python with its fast path: the Qwen3.5 gates (``sigmoid_gating``,
also called by the served GDN layer), selective_state_update's ``_normalize`` (the shape
handling of A / D / z / dt_bias) and the conv ops' ``_silu`` (activation flag, also used by
mamba2_decode). A bug in any of these would change the reference and the fast op identically,
and the ref-vs-fast tests would still pass. So here every op and its reference are checked
against float64 loops that use only torch primitives and the formulas as transformers writes
them (Qwen3-Next / Qwen3.5 ``torch_recurrent_gated_delta_rule``, Mamba2 ``torch_forward``):

    GDN:    g = -exp(A_log) softplus(a + dt_bias),  beta = sigmoid(b)
            S <- exp(g) S;  S <- S + beta (v - S k) k^T;  o = S q / sqrt(K)   (q, k l2-normalised)
    Mamba2: dt = clamp(softplus(dt + dt_bias), dt_limit);  h <- exp(A dt) h + dt x B^T
            y = h C + D x;  y <- y silu(z)
    conv:   out[c, t] = act(bias[c] + sum_j w[c, j] window[c, t + j])

``test_breaks_are_caught`` monkeypatches the shared helpers (and, to show every term is seen,
drops single arguments at the entry points) and asserts these checks then fail. The checks
look the ops and helpers up through their modules, so the patches reach them.
"""

from __future__ import annotations

import importlib
import inspect
import math

import pytest
import torch

# the modules themselves (ops/__init__ re-exports functions named like two of them)
cc, gdr, m2d, ssu, ssd = (importlib.import_module(f"vllm_hybrid_neuron.ops.{m}") for m in (
    "causal_conv1d", "gated_delta_rule", "mamba2_decode", "selective_state_update", "ssd"))

DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: 2e-4, torch.bfloat16: 3e-2}  # atol = rtol
D64 = torch.float64


def close(actual, expected, dtype, name):
    """|a - e| <= tol (1 + |e|) everywhere (NaN fails); the message gives the max error."""
    a, e = actual.to(D64), expected.to(D64)
    err = (a - e).abs().nan_to_num(float("inf"))
    bad = ~(err <= TOL[dtype] * (1 + e.abs()))
    if bad.any():
        raise AssertionError(f"{name}: {int(bad.sum())}/{bad.numel()} off, max abs err "
                             f"{err.max().item():.3g} (|expected| max {e.abs().max().item():.3g})")


def softplus(x, beta=1.0, threshold=20.0):
    """log(1 + exp(beta x)) / beta, linear above threshold (torch / transformers convention)."""
    return torch.where(beta * x > threshold, x, torch.log1p(torch.exp(beta * x)) / beta)


def silu(x):
    return x / (1 + torch.exp(-x))


def impl(module, name, which):
    return getattr(module, name + ("_ref" if which == "ref" else ""))


# ============================================================================ Gated DeltaNet
def gdn_gates(A_log, a, b, dt_bias, beta=1.0, threshold=20.0):
    """Qwen3.5: g = -exp(A_log) softplus(a + dt_bias), beta = sigmoid(b), in float64."""
    x = a.to(D64) + dt_bias.to(D64)
    return -torch.exp(A_log.to(D64)) * softplus(x, beta, threshold), 1 / (1 + torch.exp(-b.to(D64)))


def gdn_naive(q, k, v, g, beta, pool, cu, idx, nacc, l2):
    """Per-token loop. q, k: (T, H, K); v: (T, HV, V); g, beta: (T, HV); pool: (slots, HV, V, K)
    (updated copy returned); idx: (N, Tmax) slots, state read from idx[n, nacc[n] - 1] and
    written after token t to idx[n, t]. Returns (o (T, HV, V), pool)."""
    q, k, v, g, beta, S_pool = (t.to(D64) for t in (q, k, v, g, beta, pool.clone()))
    T, H, K = q.shape
    HV = v.shape[1]
    if l2:  # transformers' l2norm: x * rsqrt(sum x^2 + 1e-6)
        q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
        k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    q = q * K ** -0.5
    o = torch.zeros(T, HV, v.shape[2], dtype=D64)
    for n in range(cu.numel() - 1):
        S = S_pool[int(idx[n, int(nacc[n]) - 1])].clone()                 # (HV, V, K)
        for t in range(int(cu[n]), int(cu[n + 1])):
            for h in range(HV):
                kh, qh = k[t, h * H // HV], q[t, h * H // HV]               # (K,)
                S[h] = torch.exp(g[t, h]) * S[h]
                S[h] = S[h] + beta[t, h] * torch.outer(v[t, h] - S[h] @ kh, kh)
                o[t, h] = S[h] @ qh
            S_pool[int(idx[n, t - int(cu[n])])] = S
    return o, S_pool


def gdn_inputs(T, H, HV, K, V, dtype, l2, seed=0):
    torch.manual_seed(seed)
    q, k = torch.randn(T, H, K, dtype=dtype), torch.randn(T, H, K, dtype=dtype)
    if not l2:  # keep beta |k|^2 < 2 so the un-normalised recurrence stays bounded
        k = (torch.randn(T, H, K) / K ** 0.5).to(dtype)
    v = torch.randn(T, HV, V, dtype=dtype)
    A_log, dt_bias = torch.randn(HV) * 0.5 - 0.5, torch.randn(HV) * 2   # dt_bias far from 1
    a, b = torch.randn(T, HV) * 2, torch.randn(T, HV) * 2
    flat = a.view(-1)
    flat[::5] = 21.0 - dt_bias.repeat(T)[::5] + torch.randn(flat[::5].shape)  # a + dt_bias around 20
    flat[1::7], flat[2::9] = -30.0, 100.0                          # softplus ~ exp(x); exp(x) overflows
    return q, k, v, A_log, a.to(dtype), b.to(dtype), dt_bias


def check_gating(dtype=torch.float32, beta=1.0, threshold=20.0):
    _, _, _, A_log, a, b, dt_bias = gdn_inputs(40, 1, 4, 1, 1, dtype, True)
    g, bt = gdr.sigmoid_gating(A_log, a, b, dt_bias, beta, threshold)    # (T, HV) each
    eg, ebt = gdn_gates(A_log, a, b, dt_bias, beta, threshold)
    assert g.shape == a.shape and bt.shape == b.shape
    close(g, eg, torch.float32, "g")                                     # fp32 maths in both dtypes
    close(bt, ebt, torch.float32, "beta")


GDN_DIMS = [(2, 4, 16, 8), (1, 1, 20, 3)]  # (H, HV, K, V): grouped heads; one head, odd sizes


def check_gdn_decode(which="fast", dtype=torch.float32, layout="spec", dims=GDN_DIMS[0], l2=True):
    """fused_sigmoid_gating_delta_rule_update(_ref): decode (one token per row, 1-D slots) or
    speculative (rows of 1..3 tokens, (N, 3) slots, num_accepted_tokens)."""
    H, HV, K, V = dims
    lens = [1] * 6 if layout == "decode" else [1, 3, 2]
    T, N = sum(lens), len(lens)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v, A_log, a, b, dt_bias = gdn_inputs(T, H, HV, K, V, dtype, l2)
    pool = torch.randn(1 + 3 * N, HV, V, K)                              # slot 0: null block
    idx2 = (torch.randperm(3 * N) + 1).view(N, 3).to(torch.int32)         # distinct live slots
    nacc = torch.tensor([1, 3, 2] if layout == "spec" else [1] * N, dtype=torch.int32)
    idx = idx2[:, 0].contiguous() if layout == "decode" else idx2
    eg, ebt = gdn_gates(A_log, a, b, dt_bias)
    eo, epool = gdn_naive(q, k, v, eg, ebt, pool, cu, idx2, nacc, l2)
    p = pool.clone()
    o, _ = impl(gdr, "fused_sigmoid_gating_delta_rule_update", which)(
        A_log, a, b, dt_bias, q[None], k[None], v[None], initial_state=p, inplace_final_state=True,
        cu_seqlens=cu, ssm_state_indices=idx, num_accepted_tokens=nacc if layout == "spec" else None,
        use_qk_l2norm_in_kernel=l2)
    close(o[0], eo, dtype, "out")                                        # (T, HV, V)
    close(p, epool, torch.float32, "state pool")                         # (slots, HV, V, K) fp32


def check_gdn_prefill(which="fast", dtype=torch.float32):
    """The served prefill: gates from sigmoid_gating, then chunk_gated_delta_rule(_ref)
    (lengths 3 and 70: one and two 64-token chunks)."""
    H, HV, K, V = GDN_DIMS[0]
    cu = torch.tensor([0, 3, 73], dtype=torch.int32)
    q, k, v, A_log, a, b, dt_bias = gdn_inputs(73, H, HV, K, V, dtype, True, seed=1)
    h0 = torch.randn(2, HV, V, K)
    g, bt = gdr.sigmoid_gating(A_log, a, b, dt_bias)                     # (T, HV) each, fp32
    o, fin = impl(gdr, "chunk_gated_delta_rule", which)(
        q[None], k[None], v[None], g[None], bt[None], None, h0, True, cu, True)
    eg, ebt = gdn_gates(A_log, a, b, dt_bias)
    idx2 = torch.arange(1, 1 + 2 * 70).view(2, 70)                       # one slot per token
    pool = torch.zeros(1 + 2 * 70, HV, V, K)
    pool[idx2[:, 0]] = h0
    eo, epool = gdn_naive(q, k, v, eg, ebt, pool, cu, idx2, torch.ones(2, dtype=torch.int32), True)
    close(o[0], eo, dtype, "out")
    close(fin, epool[idx2[[0, 1], [2, 69]]], torch.float32, "final state")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta,threshold", [(1.0, 20.0), (0.5, 10.0)])
def test_sigmoid_gating(dtype, beta, threshold):
    check_gating(dtype, beta, threshold)


@pytest.mark.parametrize("which", ["fast", "ref"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["decode", "spec"])
@pytest.mark.parametrize("dims", GDN_DIMS)
@pytest.mark.parametrize("l2", [True, False])
def test_gdn_decode(which, dtype, layout, dims, l2):
    check_gdn_decode(which, dtype, layout, dims, l2)


@pytest.mark.parametrize("which", ["fast", "ref"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gdn_prefill(which, dtype):
    check_gdn_prefill(which, dtype)


# ============================================================================ Mamba2
def ssm_step(h, x, d, A, B, C, D, z):
    """One Mamba2 token, float64. h: (H, P, N); x, d, z: (H, P); A: (H, P, N); B, C: (H, N);
    D: (H, P). Returns (h, y (H, P))."""
    h = torch.exp(A * d[..., None]) * h + (d * x)[..., None] * B[:, None, :]
    y = (h * C[:, None, :]).sum(-1) + D * x
    return h, (y if z is None else y * silu(z))


def ssm_inputs(T, H, P, N, G, dtype, seed=0):
    torch.manual_seed(seed)
    x, z = torch.randn(T, H, P, dtype=dtype), torch.randn(T, H, P, dtype=dtype)
    dt = torch.randn(T, H) * 2
    dt.view(-1)[::5] = 25.0                                              # above softplus' threshold
    dt.view(-1)[1::6] = -25.0
    B, C = torch.randn(T, G, N, dtype=dtype), torch.randn(T, G, N, dtype=dtype)
    A, D, dt_bias = -torch.rand(H) - 0.1, torch.randn(H), torch.randn(H) * 2
    return x, dt.to(dtype), A, B, C, D, z, dt_bias


SSU_FORMS = ["tied", "untied", "single-head"]


def check_ssu(which="fast", dtype=torch.float32, form="tied"):
    """selective_state_update(_ref), one token per row, dt_softplus. tied: vLLM's stride-0
    expands of dt / A / D / dt_bias over headdim; untied: all per element; single-head: the
    2-D / 3-D forms (no head axis), D and dt_bias 1-D."""
    one = form == "single-head"
    batch, H, P, N, G = 5, (1 if one else 4), 8, 16, (1 if one else 2)
    x, dt, A, B, C, D, z, dt_bias = ssm_inputs(batch, H, P, N, G, dtype)
    if form == "tied":
        dt4, A4 = dt[..., None].expand(-1, -1, P), A[:, None, None].expand(-1, P, N)
        D4, db4 = D[:, None].expand(-1, P), dt_bias[:, None].expand(-1, P)
    else:
        torch.manual_seed(1)
        dt4 = (dt[..., None].float() + torch.randn(batch, H, P)).to(dtype)
        A4, D4, db4 = -torch.rand(H, P, N) - 0.1, torch.randn(H, P), torch.randn(H, P) * 2
    state = torch.randn(8, H, P, N)
    slots = torch.tensor([3, 6, 1, 7, 2], dtype=torch.int32)
    est, eo = state.to(D64), torch.zeros(batch, H, P, dtype=D64)
    for t in range(batch):
        d = softplus(dt4[t].to(D64) + db4.to(D64))                       # (H, P)
        Bh = B[t].to(D64).repeat_interleave(H // G, 0)                   # (H, N)
        Ch = C[t].to(D64).repeat_interleave(H // G, 0)
        s = int(slots[t])
        est[s], eo[t] = ssm_step(est[s], x[t].to(D64), d, A4.to(D64), Bh, Ch, D4.to(D64), z[t].to(D64))
    args = (x, dt4, A4, B, C, D4, z, db4)
    if one:  # state (slots, P, N); x, dt, z (batch, P); A (P, N); B, C (batch, N); D, dt_bias (P,)
        st = state[:, 0].clone()
        args = (x[:, 0], dt4[:, 0], A4[0], B[:, 0], C[:, 0], D4[0], z[:, 0], db4[0])
    else:
        st = state.clone()
    out = impl(ssu, "selective_state_update", which)(st, *args, dt_softplus=True,
                                                   state_batch_indices=slots, dst_state_batch_indices=slots)
    close(out.reshape(batch, H, P), eo, dtype, "out")
    close(st.reshape(state.shape), est, torch.float32, "state")


def chunk_meta(lens, chunk):
    """Chunks of at most `chunk` tokens, never crossing sequences."""
    cuc, seq_idx, last = [0], [], []
    pos = 0
    for s, L in enumerate(lens):
        for c0 in range(0, L, chunk):
            pos += min(chunk, L - c0)
            cuc.append(pos)
            seq_idx.append(s)
        last.append(len(seq_idx) - 1)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    i32 = dict(dtype=torch.int32)
    return cu, torch.tensor(cuc, **i32), torch.tensor(last), torch.tensor(seq_idx, **i32)


DT_LIMITS = [(0.0, float("inf")), (0.3, 2.0)]


def check_ssd(which="fast", dtype=torch.float32, dt_limit=DT_LIMITS[1]):
    """mamba_chunk_scan_combined_varlen(_ref) vs the token-by-token recurrence: lengths 1, 6, 9
    in chunks of 4, initial states, D, z, dt_bias, dt_softplus, dt_limit."""
    lens, H, P, N, G = [1, 6, 9], 4, 8, 8, 2
    T = sum(lens)
    x, dt, A, B, C, D, z, dt_bias = ssm_inputs(T, H, P, N, G, dtype, seed=2)
    init = torch.randn(3, H, P, N)
    cu, cuc, last, seq_idx = chunk_meta(lens, 4)
    out = torch.empty_like(x)
    fin = impl(ssd, "mamba_chunk_scan_combined_varlen", which)(
        x, dt, A, B, C, 4, cu, cuc, last, seq_idx, out, D=D, z=z, dt_bias=dt_bias, initial_states=init,
        dt_softplus=True, dt_limit=dt_limit, state_dtype=torch.float32)
    eo, efin = torch.zeros(T, H, P, dtype=D64), init.to(D64).clone()
    A3, D2 = A.to(D64)[:, None, None].expand(H, P, N), D.to(D64)[:, None].expand(H, P)
    for s in range(len(lens)):
        for t in range(int(cu[s]), int(cu[s + 1])):
            d = softplus(dt[t].to(D64) + dt_bias.to(D64)).clamp(*dt_limit)   # (H,)
            Bh, Ch = (u[t].to(D64).repeat_interleave(H // G, 0) for u in (B, C))
            efin[s], eo[t] = ssm_step(efin[s], x[t].to(D64), d[:, None].expand(H, P), A3, Bh, Ch, D2,
                                      z[t].to(D64))
    close(out, eo, dtype, "out")
    close(fin, efin, dtype, "final states")


# ============================================================================ causal conv1d
def conv_naive(win, w, bias, act):
    """win: (dim, W-1+L) float64 window ++ tokens; w: (dim, W). Returns (dim, L)."""
    W = w.shape[1]
    L = win.shape[1] - (W - 1)
    y = torch.stack([bias + sum(w[:, j] * win[:, t + j] for j in range(W)) for t in range(L)], 1)
    return silu(y) if act == "silu" else y


def conv_params(dim, W, dtype, seed=0):
    torch.manual_seed(seed)
    return (torch.randn(dim, W) * 0.5).to(dtype), torch.randn(dim).to(dtype)


def check_conv_fn(which="fast", dtype=torch.float32, width=4, act="silu"):
    """causal_conv1d_fn(_ref): lengths 1, 5, 2 (shorter than the window), dim 20 (a partial
    channel block), initial state used for rows 0 and 2."""
    dim, lens = 20, [1, 5, 2]
    w, bias = conv_params(dim, width, dtype)
    x = torch.randn(sum(lens), dim, dtype=dtype).t()                     # (dim, T), vLLM layout
    states = torch.randn(4, dim, width - 1, dtype=dtype)
    slots, init = torch.tensor([2, 0, 3], dtype=torch.int32), torch.tensor([True, False, True])
    cu = torch.tensor([0, 1, 6, 8], dtype=torch.int32)
    est, eo = states.to(D64).clone(), torch.zeros(dim, sum(lens), dtype=D64)
    for i in range(3):
        s, bos, eos = int(slots[i]), int(cu[i]), int(cu[i + 1])
        left = est[s] if init[i] else torch.zeros(dim, width - 1, dtype=D64)
        win = torch.cat([left, x[:, bos:eos].to(D64)], 1)
        eo[:, bos:eos] = conv_naive(win, w.to(D64), bias.to(D64), act)
        est[s] = win[:, -(width - 1):]
    st = states.clone()
    out = impl(cc, "causal_conv1d_fn", which)(x, w, bias, st, cu, slots, init, activation=act)
    close(out, eo, dtype, "out")
    close(st, est, dtype, "conv states")


def check_conv_update(which="fast", dtype=torch.float32, width=4, act="silu"):
    """causal_conv1d_update(_ref), one token per row: x (batch, dim) overwritten with the output."""
    dim, batch = 20, 3
    w, bias = conv_params(dim, width, dtype, seed=1)
    x = torch.randn(batch, dim, dtype=dtype)
    states = torch.randn(5, width - 1, dim, dtype=dtype).transpose(1, 2)  # (slots, dim, W-1) view
    slots = torch.tensor([4, 1, 2], dtype=torch.int32)
    est, eo = states.to(D64).clone(), torch.zeros(batch, dim, dtype=D64)
    for b in range(batch):
        win = torch.cat([est[int(slots[b])], x[b].to(D64)[:, None]], 1)  # (dim, W)
        eo[b] = conv_naive(win, w.to(D64), bias.to(D64), act)[:, 0]
        est[int(slots[b])] = win[:, 1:]
    st = states.clone()
    out = impl(cc, "causal_conv1d_update", which)(x.clone(), st, w, bias, act, slots)
    close(out, eo, dtype, "out")
    close(st, est, dtype, "conv state")


def check_mamba2_decode(which="fast", dtype=torch.float32):
    """mamba2_decode(_ref): conv update + silu on [x | B | C], then the SSM step (per-head
    A, D, dt_bias; dt_softplus)."""
    batch, H, P, N, G, W = 3, 4, 4, 8, 2, 4
    conv_dim = H * P + 2 * G * N
    w, cbias = conv_params(conv_dim, W, dtype, seed=3)
    _, dt, A, _, _, D, _, dt_bias = ssm_inputs(batch, H, P, N, G, dtype, seed=3)
    xbc = torch.randn(batch, conv_dim, dtype=dtype)
    cstate = torch.randn(5, W - 1, conv_dim, dtype=dtype).transpose(1, 2)
    sstate = torch.randn(5, H, P, N, dtype=dtype)
    slots = torch.tensor([4, 1, 2], dtype=torch.int32)
    ecs, ess = cstate.to(D64).clone(), sstate.to(D64).clone()
    exbc, eo = torch.zeros(batch, conv_dim, dtype=D64), torch.zeros(batch, H, P, dtype=D64)
    for b in range(batch):
        s = int(slots[b])
        win = torch.cat([ecs[s], xbc[b].to(D64)[:, None]], 1)
        exbc[b] = conv_naive(win, w.to(D64), cbias.to(D64), "silu")[:, 0]
        ecs[s] = win[:, 1:]
        # the op rounds the conv output to the activation dtype before the SSM reads it
        xr = exbc[b].to(dtype).to(D64)
        xs, Bs, Cs = xr.split([H * P, G * N, G * N])
        d = softplus(dt[b].to(D64) + dt_bias.to(D64))[:, None].expand(H, P)
        ess[s], eo[b] = ssm_step(ess[s], xs.view(H, P), d, A.to(D64)[:, None, None].expand(H, P, N),
                                 Bs.view(G, N).repeat_interleave(H // G, 0),
                                 Cs.view(G, N).repeat_interleave(H // G, 0),
                                 D.to(D64)[:, None].expand(H, P), None)
    x1, cs1, ss1 = xbc.clone(), cstate.clone(), sstate.clone()
    out = torch.zeros(batch, H, P, dtype=dtype)
    impl(m2d, "mamba2_decode", which)(x1, dt, cs1, w, cbias, ss1, A, D, dt_bias, slots, G, out)
    close(out, eo, dtype, "out")
    close(x1, exbc, dtype, "conv output")
    close(cs1, ecs, dtype, "conv state")
    close(ss1, ess, dtype, "ssm state")


@pytest.mark.parametrize("which", ["fast", "ref"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", SSU_FORMS)
def test_selective_state_update(which, dtype, form):
    check_ssu(which, dtype, form)


@pytest.mark.parametrize("which", ["fast", "ref"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dt_limit", DT_LIMITS)
def test_ssd(which, dtype, dt_limit):
    check_ssd(which, dtype, dt_limit)


@pytest.mark.parametrize("check", [check_conv_fn, check_conv_update], ids=["fn", "update"])
@pytest.mark.parametrize("which", ["fast", "ref"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [2, 4])
@pytest.mark.parametrize("act", ["silu", None])
def test_conv(check, which, dtype, width, act):
    check(which, dtype, width, act)


@pytest.mark.parametrize("which", ["fast", "ref"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_mamba2_decode(which, dtype):
    check_mamba2_decode(which, dtype)


# ============================================================================ the checks can fail
def _broken_gating(*, bias=True, sign=-1.0, exp_a=True, softplus_on=True, beta_sign=1.0):
    """A copy of sigmoid_gating with one term changed."""
    def gating(A_log, a, b, dt_bias, beta=1.0, threshold=20.0):
        x = a.float() + (dt_bias.float() if bias else 0.0)
        sp = torch.where(beta * x <= threshold, torch.log1p(torch.exp(beta * x)) / beta, x)
        sp = sp if softplus_on else x
        A = torch.exp(A_log.float()) if exp_a else A_log.float()
        return sign * A * sp, torch.sigmoid(beta_sign * b.float())
    return gating


def _normalize_with(pos, fn):
    """_normalize with output `pos` (A=3, D=6, z=7, dt_bias=8) replaced by fn(value)."""
    right = ssu._normalize

    def normalize(*args):
        res = list(right(*args))
        res[pos] = fn(res[pos])
        return tuple(res)
    return normalize


def _without_arg(fn, arg):
    """An entry point that ignores one argument (passes None for it)."""
    sig = inspect.signature(fn)

    def wrapped(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        bound.arguments[arg] = None
        return fn(*bound.args, **bound.kwargs)
    return wrapped


def _patch_silu(mp, value):
    mp.setattr(cc, "_silu", lambda activation: value)
    mp.setattr(m2d, "_silu", lambda activation: value)


def _patch_dt(mp, **change):
    right = ssd._dt
    mp.setattr(ssd, "_dt", lambda dt, dt_bias, sp, lim: right(
        dt, change.get("dt_bias", dt_bias), sp, change.get("dt_limit", lim)))


def _drop(mp, module, name, arg):
    for which in ("fast", "ref"):
        fname = name + ("_ref" if which == "ref" else "")
        mp.setattr(module, fname, _without_arg(getattr(module, fname), arg))


GATING = lambda **kw: (lambda mp: mp.setattr(gdr, "sigmoid_gating", _broken_gating(**kw)))  # noqa: E731
NORMALIZE = lambda pos, fn: (lambda mp: mp.setattr(ssu, "_normalize", _normalize_with(pos, fn)))  # noqa: E731
WHICH = ("fast", "ref")
# (name, check, its keyword arguments besides dtype)
GDN_TARGETS = [("gating", check_gating, {})] + [
    (f"gdn_decode[{w},{lay}]", check_gdn_decode, dict(which=w, layout=lay)) for w in WHICH
    for lay in ("decode", "spec")] + [
    (f"gdn_prefill[{w}]", check_gdn_prefill, dict(which=w)) for w in WHICH]
SSU_TARGETS = [(f"ssu[{w},{f}]", check_ssu, dict(which=w, form=f)) for w in WHICH for f in SSU_FORMS]
SILU_TARGETS = lambda act: [  # noqa: E731
    (f"{c.__name__[6:]}[{w},{act}]", c, dict(which=w, act=act))
    for c in (check_conv_fn, check_conv_update) for w in WHICH]
M2D = [(f"mamba2_decode[{w}]", check_mamba2_decode, dict(which=w)) for w in WHICH]
SSD = [(f"ssd[{w}]", check_ssd, dict(which=w)) for w in WHICH]

# break name -> (patch(monkeypatch), the checks that must now fail)
BREAKS = {
    # shared helpers: reference and fast path break together
    "sigmoid_gating: dt_bias dropped": (GATING(bias=False), GDN_TARGETS),
    "sigmoid_gating: decay sign flipped": (GATING(sign=1.0), GDN_TARGETS),
    "sigmoid_gating: A_log not exponentiated": (GATING(exp_a=False), GDN_TARGETS),
    "sigmoid_gating: softplus dropped": (GATING(softplus_on=False), GDN_TARGETS),
    "sigmoid_gating: beta = sigmoid(-b)": (GATING(beta_sign=-1.0), GDN_TARGETS),
    # (mamba2_decode's reference goes through selective_state_update_ref; its C++ op does not)
    "_normalize: dt_bias dropped": (NORMALIZE(8, lambda t: None), SSU_TARGETS + M2D[1:]),
    "_normalize: decay sign flipped (A -> -A)": (NORMALIZE(3, lambda t: -t), SSU_TARGETS + M2D[1:]),
    "_normalize: D dropped": (NORMALIZE(6, lambda t: None), SSU_TARGETS + M2D[1:]),
    "_normalize: z gate dropped": (NORMALIZE(7, lambda t: None), SSU_TARGETS),
    "_silu: activation dropped": (lambda mp: _patch_silu(mp, False), SILU_TARGETS("silu") + M2D),
    "_silu: silu always on": (lambda mp: _patch_silu(mp, True), SILU_TARGETS(None)),
    # reference-only helpers (the C++ kernels compute these themselves)
    "_l2 (ref only): q/k l2-norm dropped": (lambda mp: mp.setattr(gdr, "_l2", lambda x: x),
                                            [t for t in GDN_TARGETS if t[2].get("which") == "ref"]),
    "ssd._dt (ref only): dt_bias dropped": (lambda mp: _patch_dt(mp, dt_bias=None), SSD[1:]),
    "ssd._dt (ref only): dt_limit dropped": (lambda mp: _patch_dt(mp, dt_limit=(-math.inf, math.inf)),
                                             SSD[1:]),
    # one argument ignored at the entry points (fast and reference)
    "conv bias dropped": (lambda mp: (_drop(mp, cc, "causal_conv1d_fn", "bias"),
                                      _drop(mp, cc, "causal_conv1d_update", "bias"),
                                      _drop(mp, m2d, "mamba2_decode", "conv_bias")),
                          SILU_TARGETS("silu") + SILU_TARGETS(None) + M2D),
    "ssd: dt_bias dropped": (lambda mp: _drop(mp, ssd, "mamba_chunk_scan_combined_varlen", "dt_bias"), SSD),
    "ssd: D dropped": (lambda mp: _drop(mp, ssd, "mamba_chunk_scan_combined_varlen", "D"), SSD),
    "ssd: z gate dropped": (lambda mp: _drop(mp, ssd, "mamba_chunk_scan_combined_varlen", "z"), SSD),
    "mamba2_decode: dt_bias dropped": (lambda mp: _drop(mp, m2d, "mamba2_decode", "dt_bias"), M2D),
    "mamba2_decode: D dropped": (lambda mp: _drop(mp, m2d, "mamba2_decode", "D"), M2D),
}
CASES = [pytest.param(brk, check, kw, id=f"{brk} -> {name}")
         for brk, (_, targets) in BREAKS.items() for name, check, kw in targets]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("brk,check,kw", CASES)
def test_breaks_are_caught(brk, check, kw, dtype, monkeypatch):
    """Each break makes its checks fail (and the same checks pass unbroken in the tests above)."""
    BREAKS[brk][0](monkeypatch)
    with pytest.raises(AssertionError) as caught:
        check(dtype=dtype, **kw)
    print(f"CAUGHT {brk} | {check.__name__}({kw}, {dtype}) | {caught.value}")
