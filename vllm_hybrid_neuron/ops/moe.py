"""Routed experts of an MoE block, grouped by expert: each expert's weights are read once per call.

    out[t] = sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t])
    expert_e(x) = (act(x @ w13[e, :I].T) * (x @ w13[e, I:].T)) @ w2[e].T

``w13`` (E, 2I, K) = [gate; up] and ``w2`` (E, K, I) are vLLM's layout. The C++ op streams them
packed once (at load) by ``pack_moe_weights``, so that a work item's weights are one contiguous
stream, in one of two layouts (``pack_layout``): "pairs" for bf16 weights where the build has
AVX512-BF16 dot products (output columns across the vector lanes, two k per lane:
csrc/moe_pairs.h), "panels" otherwise (four rows per panel, k-step-major: csrc/moe_experts.cpp).
Routing (softmax, top-k, renormalisation, Gemma 4's scales) and the shared expert stay with the
caller. The op accumulates in fp32 and rounds the intermediate act(gate) * up to ``x``'s dtype
(as transformers' MLP does), and the result to ``x``'s dtype;
the reference does the same in plain torch, one expert at a time.
"""

from __future__ import annotations

import functools

import torch
from torch.nn import functional as F

from vllm_hybrid_neuron.ops._library import ops, require_c

# Activation codes of the C++ op.
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1, "gelu": 2}
PANEL_ROWS = 4  # weight rows per packed panel


def _act(g: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return F.silu(g)
    if activation == "gelu_tanh":
        return F.gelu(g, approximate="tanh")
    if activation == "gelu":
        return F.gelu(g)
    raise ValueError(f"activation={activation!r}: choose one of {', '.join(ACTIVATIONS)}")


@functools.cache
def pack_step() -> int:
    """Elements per k-step of this build's dot kernel (16 on AVX2, 32 on AVX-512)."""
    require_c()
    return int(ops.moe_pack_step())


@functools.cache
def _build_packs_bf16_pairs() -> bool:
    require_c()
    return bool(ops.moe_bf16_pairs())


def pack_layout(dtype: torch.dtype) -> str:
    """The layout this build's op reads weights of ``dtype`` in: "pairs" or "panels"."""
    return "pairs" if dtype == torch.bfloat16 and _build_packs_bf16_pairs() else "panels"


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


# The pair layout: tiles of 32 intermediates (gate/up: 2 x 32 columns) and of 64 outputs (down);
# I and K padded to 32, the down outputs to 64.
PAIR_UP_COLS, PAIR_DOWN_COLS, PAIR_PAD = 32, 64, 32


def _pack_pairs(w13: torch.Tensor, w2: torch.Tensor, inter: int):
    """-> (w13v (E, Ip/32, [Kp/2, 2, 32, 2]), w2v (E, Kq/64, [Ip/2, 64, 2])), last dims flattened:
    per tile and k-pair i, each column's (k = 2i, 2i+1) elements side by side (gate/up: the 32
    gate columns, then the 32 up columns)."""
    E, _, K = w13.shape
    Ip, Kp, Kq = _round_up(inter, PAIR_PAD), _round_up(K, PAIR_PAD), _round_up(K, PAIR_DOWN_COLS)
    pad13 = (0, Kp - K, 0, Ip - inter)
    gu = torch.stack([F.pad(w13[:, :inter], pad13), F.pad(w13[:, inter:], pad13)], 1)  # (E,2,Ip,Kp)
    gu = gu.view(E, 2, Ip // PAIR_UP_COLS, PAIR_UP_COLS, Kp // 2, 2).permute(0, 2, 4, 1, 3, 5)
    down = F.pad(w2, (0, Ip - inter, 0, Kq - K))  # (E, Kq, Ip)
    down = down.view(E, Kq // PAIR_DOWN_COLS, PAIR_DOWN_COLS, Ip // 2, 2).permute(0, 1, 3, 2, 4)
    return (gu.reshape(E, Ip // PAIR_UP_COLS, -1).contiguous(),
            down.reshape(E, Kq // PAIR_DOWN_COLS, -1).contiguous())


def _unpack_pairs(w13v: torch.Tensor, w2v: torch.Tensor, inter: int, hidden: int):
    E, up_tiles, _ = w13v.shape
    Ip, down_tiles = up_tiles * PAIR_UP_COLS, w2v.shape[1]
    gu = w13v.view(E, up_tiles, -1, 2, PAIR_UP_COLS, 2).permute(0, 3, 1, 4, 2, 5)
    gu = gu.reshape(E, 2, Ip, -1)[:, :, :inter, :hidden]  # (E, 2, I, K)
    down = w2v.view(E, down_tiles, Ip // 2, PAIR_DOWN_COLS, 2).permute(0, 1, 3, 2, 4)
    down = down.reshape(E, down_tiles * PAIR_DOWN_COLS, Ip)[:, :hidden, :inter]
    return gu.reshape(E, 2 * inter, hidden).contiguous(), down.contiguous()


def pack_moe_weights(w13: torch.Tensor, w2: torch.Tensor, step: int | None = None,
                     layout: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's w13 (E, 2I, K) and w2 (E, K, I) -> the op's packed (w13p, w2p), 3-D as vLLM's MoE
    kernel interface requires of expert weights, zero padded. ``layout``: default
    ``pack_layout(w13.dtype)`` (the op reads only its build's); "pairs": ``_pack_pairs``.
    "panels": (w13p (E, Ip/2, 4 Kp), w2p (E, ceil(K/4), 4 Ip)):
    one panel per row, each (Kp/S, 4, S) (resp. (Ip/S, 4, S)) flattened. S = ``step`` (default:
    this build's; the op reads only its own), Ip / Kp = I / K rounded up to S. Gate/up panel p holds
    [gate 2p, gate 2p+1, up 2p, up 2p+1]."""
    E, two_i, K = w13.shape
    inter = two_i // 2
    if two_i % 2 or w2.shape != (E, K, inter):
        raise ValueError(f"moe weights: w13 {tuple(w13.shape)} (E, 2I, K) and w2 "
                         f"{tuple(w2.shape)} (E, K, I) do not match")
    if (layout or pack_layout(w13.dtype)) == "pairs":
        return _pack_pairs(w13, w2, inter)
    S = step or pack_step()
    Ip, Kp, Kr = _round_up(inter, S), _round_up(K, S), _round_up(K, PANEL_ROWS)
    pad13 = (0, Kp - K, 0, Ip - inter)
    gate = F.pad(w13[:, :inter], pad13).view(E, Ip // 2, 2, Kp)
    up = F.pad(w13[:, inter:], pad13).view(E, Ip // 2, 2, Kp)
    w13p = torch.cat([gate, up], dim=2)  # (E, Ip/2, 4, Kp)
    w13p = w13p.view(E, Ip // 2, PANEL_ROWS, Kp // S, S).transpose(2, 3)  # (E, Ip/2, Kp/S, 4, S)
    w2p = F.pad(w2, (0, Ip - inter, 0, Kr - K))  # (E, Kr, Ip)
    w2p = w2p.view(E, Kr // PANEL_ROWS, PANEL_ROWS, Ip // S, S).transpose(2, 3)
    return (w13p.reshape(E, Ip // 2, PANEL_ROWS * Kp).contiguous(),
            w2p.reshape(E, Kr // PANEL_ROWS, PANEL_ROWS * Ip).contiguous())


def unpack_moe_weights(w13p: torch.Tensor, w2p: torch.Tensor, inter: int, hidden: int,
                       step: int | None = None,
                       layout: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``pack_moe_weights``: (w13 (E, 2I, K), w2 (E, K, I))."""
    if (layout or pack_layout(w13p.dtype)) == "pairs":
        return _unpack_pairs(w13p, w2p, inter, hidden)
    S = step or pack_step()
    E, half_ip, kp4 = w13p.shape
    Kp, Ip = kp4 // PANEL_ROWS, w2p.shape[2] // PANEL_ROWS
    rows = w13p.view(E, half_ip, Kp // S, PANEL_ROWS, S).transpose(2, 3)
    rows = rows.reshape(E, half_ip, PANEL_ROWS, Kp)
    gate = rows[:, :, :2].reshape(E, 2 * half_ip, Kp)[:, :inter, :hidden]
    up = rows[:, :, 2:].reshape(E, 2 * half_ip, Kp)[:, :inter, :hidden]
    w2 = w2p.view(E, -1, Ip // S, PANEL_ROWS, S).transpose(2, 3).reshape(E, -1, Ip)
    w2 = w2[:, :hidden, :inter]
    return torch.cat([gate, up], dim=1).contiguous(), w2.contiguous()


def moe_experts_ref(out: torch.Tensor, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                    topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                    activation: str = "silu") -> None:
    """Reference, written into ``out``. x, out: (M, K); w13: (E, 2I, K); w2: (E, K, I);
    topk_weights, topk_ids: (M, topk)."""
    inter = w13.shape[1] // 2
    acc = torch.zeros(x.shape, dtype=torch.float32)  # (M, K)
    for e in torch.unique(topk_ids).tolist():
        tok, j = torch.nonzero(topk_ids == e, as_tuple=True)  # tokens routed to e
        h = x[tok].float() @ w13[e].float().T  # (n, 2I)
        mid = (_act(h[:, :inter], activation) * h[:, inter:]).to(x.dtype)  # (n, I), as the MLP
        y = mid.float() @ w2[e].float().T  # (n, K)
        acc.index_add_(0, tok, topk_weights[tok, j].float()[:, None] * y)
    out.copy_(acc)


def moe_experts_packed_ref(out: torch.Tensor, x: torch.Tensor, w13p: torch.Tensor,
                           w2p: torch.Tensor, topk_weights: torch.Tensor,
                           topk_ids: torch.Tensor, inter: int, activation: str = "silu") -> None:
    """Reference of the packed op: unpack, then ``moe_experts_ref``."""
    w13, w2 = unpack_moe_weights(w13p, w2p, inter, x.shape[1])
    moe_experts_ref(out, x, w13, w2, topk_weights, topk_ids, activation)


def moe_experts_packed(out: torch.Tensor, x: torch.Tensor, w13p: torch.Tensor,
                       w2p: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                       inter: int, activation: str = "silu") -> None:
    """Same arguments and result as ``moe_experts_packed_ref`` (one C++ op)."""
    require_c()
    if activation not in ACTIVATIONS:
        _act(x, activation)  # raises, naming the choices
    ops.moe_experts_packed(out, x, w13p, w2p, topk_weights, topk_ids, inter,
                           ACTIVATIONS[activation])


def moe_experts(out: torch.Tensor, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                activation: str = "silu") -> None:
    """Same arguments and result as ``moe_experts_ref``: packs, then the C++ op (for tests and
    one-off calls; served layers pack once at load and call ``moe_experts_packed``)."""
    w13p, w2p = pack_moe_weights(w13, w2)
    moe_experts_packed(out, x, w13p, w2p, topk_weights, topk_ids, w13.shape[1] // 2, activation)
