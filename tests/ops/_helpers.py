"""Shared helpers for the op tests."""

import torch

TOL = {torch.float32: dict(atol=2e-4, rtol=2e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def assert_close(actual, expected, dtype=torch.float32, name=""):
    """assert_close with the per-dtype tolerance; reports relative RMS and max error."""
    a, e = actual.float(), expected.float()
    err = (a - e).abs()
    rms = (err.pow(2).mean().sqrt() / (e.pow(2).mean().sqrt() + 1e-12)).item() if e.numel() else 0.0
    msg = f"{name}: rel-RMS {rms:.2e}, max abs {err.max().item() if err.numel() else 0:.2e}"
    torch.testing.assert_close(a, e, **TOL[dtype], msg=msg)


def padded_state(slots, *shape, dtype=torch.float32, pad=3):
    """A state tensor that is a view with padded stride(0), like vLLM's int8 page views."""
    n = 1
    for s in shape:
        n *= s
    base = torch.randn(slots, n + pad, dtype=dtype)
    return base[:, :n].view(slots, *shape)
