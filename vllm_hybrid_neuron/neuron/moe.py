"""Routed experts of the three ports: each family's router here, the expert MLPs in NxD's MoE module.

The routers stay family-specific (they are a few small ops and differ in what they read):
  Granite 4.0-H: softmax over the top-k router logits;
  Qwen3.5-MoE:   softmax over all experts, top-k, renormalised (the same weights);
  Gemma 4:       router on ``rms_normalize(h) * scale / sqrt(D)``, softmax top-k renormalised,
                 times ``per_expert_scale`` of each chosen expert.
Each gives ``affinities (T, E)`` (zero off the chosen experts) and ``index (T, k)``.

The expert MLPs are neuronx-distributed's ``ExpertMLPsV2`` where it is importable: selective
loading in decode (only the chosen experts' weights read), all-experts or blockwise matmuls in
prefill, the intermediate dim split over the TP ranks (stride 2 keeps each rank's [gate_r | up_r]
together). Without NxD, or for an activation NxD's MoE lacks (Gemma 4's tanh GELU),
``PortExperts`` runs instead, with the same parameter names, layout and sharding:
  ``mlp_op.gate_up_proj.weight`` (E, D, 2I) = [gate | up];  ``mlp_op.down_proj.weight`` (E, I, D).
Both return this rank's partial sum; ``RoutedExperts`` reduces it over the ranks.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from vllm_hybrid_neuron.neuron.layers import HAS_NXD, _nxd
from vllm_hybrid_neuron.neuron.tp import ShardedWeight, reduce_sum, tp_degree

ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda t: F.gelu(t, approximate="tanh"), "gelu": F.gelu}
NXD_ACTIVATIONS = ("silu", "gelu")  # what NxD's MoE ACT2FN has of these (fbac349: no tanh GELU)


def top_k_affinities(router_logits: torch.Tensor, top_k: int,
                     expert_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits (T, E) -> affinities (T, E) fp32: softmax over the top-k logits (= softmax over
    all, top-k, renormalised), zero elsewhere, times expert_scale (E,) if given; index (T, k)."""
    top_logits, index = router_logits.float().topk(top_k, -1)  # (T, k)
    weights = torch.softmax(top_logits, -1)
    if expert_scale is not None:
        weights = weights * expert_scale.float()[index]
    return torch.zeros_like(router_logits, dtype=torch.float32).scatter(1, index, weights), index


def dense_experts_reference(x: torch.Tensor, affinities: torch.Tensor, gate_up: torch.Tensor,
                            down: torch.Tensor, act) -> torch.Tensor:
    """Every expert on every token, weighted (the reference NxD's paths are tested against).
    x: (T, D); affinities: (T, E); gate_up: (E, D, 2I) [gate | up]; down: (E, I, D) -> (T, D)."""
    gu = torch.einsum("td,edi->tei", x, gate_up)  # (T, E, 2I)
    g, u = gu.chunk(2, -1)
    y = torch.einsum("tei,eid->ted", act(g) * u, down)  # (T, E, D)
    return torch.einsum("ted,te->td", y.float(), affinities).type_as(x)


class _MlpOp(nn.Module):
    def __init__(self, E: int, D: int, I: int, tp: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_up_proj = ShardedWeight((E, D, 2 * I), tp, dtype, dim=2, stride=2)  # (E, D, 2I/tp) [g_r | u_r]
        self.down_proj = ShardedWeight((E, I, D), tp, dtype, dim=1)  # (E, I/tp, D)


class PortExperts(nn.Module):
    """The ports' own expert MLPs, same names and layout as NxD's (used without NxD, and for
    activations NxD's MoE lacks: Gemma 4's tanh GELU). The intermediate dim is split over the
    ranks as NxD splits it. Decode with fewer routed slots than experts reads only the chosen
    experts' weights (selective loading); otherwise every expert runs on every token, weighted."""

    def __init__(self, E: int, D: int, I: int, act_name: str, tp: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.mlp_op = _MlpOp(E, D, I, tp, dtype)
        self.act, self.E = ACTIVATIONS[act_name], E

    def forward(self, x, affinities, index, seq_len):
        gate_up, down = self.mlp_op.gate_up_proj.weight, self.mlp_op.down_proj.weight
        T, k = index.shape
        if seq_len > 1 or T * k >= self.E:
            return dense_experts_reference(x, affinities, gate_up, down, self.act)
        flat = index.reshape(-1)  # (T k,)
        gu = torch.einsum("td,tkdi->tki", x, gate_up[flat].view(T, k, *gate_up.shape[1:]))  # (T, k, 2Il)
        g, u = gu.chunk(2, -1)
        y = torch.einsum("tki,tkid->tkd", self.act(g) * u, down[flat].view(T, k, *down.shape[1:]))  # (T, k, D)
        w = torch.gather(affinities, 1, index)  # (T, k)
        return torch.einsum("tkd,tk->td", y.float(), w).type_as(x)


def nxd_expert_mlps(config, E: int, D: int, I: int, top_k: int, act_name: str, dtype: torch.dtype) -> nn.Module:
    """NxD's ExpertMLPsV2 built as NxDI's initialize_moe_module builds it (no router, no shared expert:
    the ports keep those), affinities taken as given (normalize_top_k_affinities False)."""
    nc = config.neuron_config
    blockwise = (getattr(nc, "blockwise_matmul_config", None)
                 or _nxd("modules.moe.moe_configs", "BlockwiseMatmulConfig").default())
    mlp_config = _nxd("modules.moe.moe_configs", "RoutedExpertsMLPOpsConfig")(
        num_experts=E, hidden_size=D, intermediate_size=I, top_k=top_k, hidden_act=act_name, glu_mlp=True,
        glu_type=getattr(nc, "glu_type", "glu"), normalize_top_k_affinities=False,
        early_expert_affinity_modulation=False,
        enable_spmd_rank=bool(getattr(blockwise, "parallelize_token_to_block_mapping", False)))
    is_prefill = getattr(nc, "is_prefill_stage", None)
    return _nxd("modules.moe.expert_mlps_v2", "ExpertMLPsV2")(
        routed_experts_mlp_config=mlp_config, blockwise_matmul_config=blockwise, dtype=dtype,
        is_prefill=True if is_prefill is None else bool(is_prefill),
        tensor_model_parallel_group=_nxd("parallel_layers.parallel_state", "get_tensor_model_parallel_group")(),
        expert_model_parallel_group=_nxd("parallel_layers.parallel_state", "get_expert_model_parallel_group")())


class RoutedExperts(nn.Module):
    """x (T, D), affinities (T, E), index (T, k) -> weighted sum of the chosen experts' outputs (T, D)."""

    def __init__(self, config, E: int, D: int, I: int, top_k: int, act_name: str, dtype: torch.dtype) -> None:
        super().__init__()
        if act_name not in ACTIVATIONS:
            raise ValueError(f"expert activation {act_name!r} not supported (have {sorted(ACTIVATIONS)})")
        self.tp = tp_degree(config)
        self.uses_nxd = HAS_NXD and act_name in NXD_ACTIVATIONS
        self.experts = (nxd_expert_mlps(config, E, D, I, top_k, act_name, dtype) if self.uses_nxd
                        else PortExperts(E, D, I, act_name, self.tp, dtype))

    def forward(self, x: torch.Tensor, affinities: torch.Tensor, index: torch.Tensor, seq_len: int) -> torch.Tensor:
        y = self.experts(x, affinities.to(x.dtype) if self.uses_nxd else affinities, index, seq_len)
        return reduce_sum(y, self.tp)


def stack_experts(gate: list[torch.Tensor], up: list[torch.Tensor], down: list[torch.Tensor]):
    """Per-expert HF (I, D) gate / up and (D, I) down -> (E, D, 2I) [gate | up] and (E, I, D)."""
    gate_up = torch.stack([torch.cat([g, u]).t() for g, u in zip(gate, up)])
    return gate_up.contiguous(), torch.stack([d.t() for d in down]).contiguous()


def from_fused_hf(gate_up: torch.Tensor, down: torch.Tensor):
    """HF fused experts (E, 2I, D) [gate; up] and (E, D, I) -> this module's (E, D, 2I), (E, I, D)."""
    return gate_up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()


EXPERT_KEYS = ("experts.experts.mlp_op.gate_up_proj.weight", "experts.experts.mlp_op.down_proj.weight")


class GluMLP(nn.Module):
    """down(act(gate x) * up x) with gate and up fused: ``gate_up`` (2I, D) column-parallel, each rank's
    piece [gate_r; up_r] (``shard_glu`` lays the checkpoint out so), ``down`` row-parallel."""

    def __init__(self, config, D: int, I: int, act_name: str, dtype: torch.dtype) -> None:
        super().__init__()
        from vllm_hybrid_neuron.neuron.layers import ColumnParallelLinear, RowParallelLinear
        from vllm_hybrid_neuron.neuron.tp import per_rank

        self.Il = per_rank(I, tp_degree(config), "intermediate size")
        self.act = ACTIVATIONS[act_name]
        self.gate_up = ColumnParallelLinear(D, 2 * I, bias=False, gather_output=False, dtype=dtype)
        self.down = RowParallelLinear(I, D, bias=False, input_is_parallel=True, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_up(x).split([self.Il, self.Il], -1)
        return self.down(self.act(g) * u)


def shard_glu(gate: torch.Tensor, up: torch.Tensor, tp: int) -> torch.Tensor:
    """HF gate (I, D) and up (I, D) -> GluMLP.gate_up rank-major [gate_r; up_r] per rank."""
    from vllm_hybrid_neuron.neuron.tp import shard_fused

    I = gate.shape[0]
    return shard_fused([(gate, I, 1, "intermediate size"), (up, I, 1, "intermediate size")], tp)
