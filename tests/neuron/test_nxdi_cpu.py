"""The ports through the real NxDI / neuronx-distributed code on CPU, against transformers fp32.

Needs the upstream sources: run scripts/fetch_neuron_sources.sh and export the NXDI_SRC / NXD_SRC it
prints. Each check runs in its own process (the Neuron stand-ins and gloo stay out of this one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(
    not (os.environ.get("NXDI_SRC") and os.environ.get("NXD_SRC")),
    reason="real-NxDI harness: set NXDI_SRC and NXD_SRC (scripts/fetch_neuron_sources.sh prints them)")


def _run(module: str, *args: str, port: int, tp: int = 1, env: dict | None = None) -> dict:
    env = dict(os.environ, MASTER_PORT=str(port), PYTHONPATH=str(REPO), **(env or {}))
    launcher = ["-m", "torch.distributed.run", "--nproc-per-node", str(tp),
                "--master-port", str(port)] if tp > 1 else []
    proc = subprocess.run([sys.executable, *launcher, "-m", module, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_ports_bind_to_real_nxdi_classes():
    got = _run("tests.neuron.nxdi_cpu.import_check", port=29620)
    assert got["has_nxdi"] and got["on_cpu"]
    for family, classes in got["ports"].items():
        bases = {b for mro in classes.values() for b in mro}
        assert {"neuronx_distributed_inference.models.config.InferenceConfig",
                "neuronx_distributed_inference.models.model_base.NeuronBaseModel",
                "neuronx_distributed_inference.models.model_base.NeuronBaseForCausalLM"} <= bases, family


FAMILIES = ["granite", "qwen3_5", "gemma4"]


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_and_decode_through_nxdi_match_transformers(family, tp, checkpoint):
    """TP=2 and 4 run one process per rank (torchrun, gloo): NxD shards the converted checkpoint,
    its parallel layers and collectives run for real. The tiny models have 2 KV heads, 2 Mamba2
    groups, 2 GDN key heads and 1 Gemma 4 global KV head, so TP=4 exercises head replication."""
    got = _run("tests.neuron.nxdi_cpu.run_family", family, checkpoint(family), "4",
               port=29621 + 3 * FAMILIES.index(family) + [1, 2, 4].index(tp), tp=tp)
    assert got["tp"] == tp
    assert got["tokens_equal"], got
    assert got["max_logit_diff"] < 1e-4, got  # fp32 on both sides; measured <= 8.3e-6 (gemma4)


@pytest.mark.parametrize("family,mistake", [("granite", "fused-concat"), ("qwen3_5", "fused-concat"),
                                            ("granite", "norm-local")])
def test_tp_check_fails_on_a_wrong_layout(family, mistake, checkpoint):
    """The check above can fail: a fused projection not laid out rank-major, or Granite's gated norm
    not reduced over ranks, moves TP=2 logits far past its bound (measured 1.05 / 0.067 / 0.20)."""
    got = _run("tests.neuron.nxdi_cpu.run_family", family, checkpoint(family), "4",
               port=29640 + ["fused-concat", "norm-local"].index(mistake) * 3 + FAMILIES.index(family),
               tp=2, env={"HARNESS_BREAK": mistake})
    assert got["max_logit_diff"] > 1e-2, got


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_through_nxdi_is_as_close_as_transformers_bf16(family, tp, checkpoint):
    """bf16 through NxDI's to_cpu (its .bfloat16() cast; at TP > 1, where to_cpu refuses bf16 over gloo,
    run_family builds fp32 and applies the same cast). The port's max |logit diff| from transformers
    fp32 is at most 2x transformers' own bf16 run's (measured 0.87-1.08x); recurrent states stay fp32."""
    got = _run("tests.neuron.nxdi_cpu.run_family", family, checkpoint(family), "4",
               port=29650 + 3 * FAMILIES.index(family) + [1, 2, 4].index(tp), tp=tp,
               env={"HARNESS_DTYPE": "bfloat16"})
    assert got["tp"] == tp
    assert got["dtype"] == "bfloat16"
    assert got["max_logit_diff"] <= 2 * got["hf_same_dtype_max_logit_diff"], got
    if family != "gemma4":  # attention-only: no recurrent state
        assert "torch.float32" in got["state_dtypes"], got


@pytest.mark.parametrize("ods", [False, True], ids=["logits", "on-device-sampling+output_logits"])
@pytest.mark.parametrize("family", FAMILIES)
def test_load_module_bf16_alias_map_and_state_dtypes(family, ods, checkpoint):
    """NxDI's device-side build (DecoderModelInstance.load_module + get) in bf16: every state is
    aliased to the output the port writes it to (offset 1, or 2 with output_logits), the recurrent
    states stay fp32 and no weight is left fp32 by the '*scale' rule; run eagerly through that alias
    map, the port is as close to transformers fp32 as transformers' bf16 (measured 1.07x granite)."""
    got = _run("tests.neuron.nxdi_cpu.load_module_check", family, checkpoint(family), *(["ods"] if ods else []),
               port=29660 + 2 * FAMILIES.index(family) + int(ods))
    assert got["alias_offsets"] == [got["first_state_output"]] == [2 if ods else 1], got
    assert got["param_dtypes"] == ["torch.bfloat16", "torch.int32"], got  # int32: NxD's rank buffers
    recurrent = {s for s in got["state_dtypes"] if s.split(":")[0] in ("ssm", "recurrent")}
    assert recurrent == ({"ssm:float32"} if family == "granite" else {"recurrent:float32"} if family == "qwen3_5" else set())
    assert not [k for k in got["missing"] if not k.endswith(("rank_util.rank", "spmd_rank.rank"))], got
    assert got["max_logit_diff"] <= 2 * got["hf_bf16_max_logit_diff"], got
    assert got["sampled_is_argmax"], got


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("family", FAMILIES)
def test_slots_driven_as_vllm_neuron_drives_them(family, tp, checkpoint):
    """Batch 4, one prefill per slot (2, 0, 3), then partial, unsorted decode batches; NxDI pads each
    with the slots not in it. Every row equals transformers on its own sequence (measured <= 2.8e-6)."""
    got = _run("tests.neuron.nxdi_cpu.run_slots", family, checkpoint(family),
               port=29670 + 2 * FAMILIES.index(family) + [1, 2].index(tp), tp=tp)
    assert got["rows_checked"] == 12 and got["tokens_equal"], got
    assert got["max_logit_diff"] < 1e-4, got


@pytest.mark.parametrize("family", FAMILIES)
def test_slot_check_fails_when_padded_rows_keep_real_slot_ids(family, checkpoint):
    """Without the ports' seq-id mask NxDI's padded rows step and overwrite the slots they stand for
    (measured max diff 1.30 / 0.34 / 2.50)."""
    got = _run("tests.neuron.nxdi_cpu.run_slots", family, checkpoint(family),
               port=29680 + FAMILIES.index(family), env={"HARNESS_BREAK": "no-seq-ids-mask"})
    assert got["max_logit_diff"] > 1e-2, got
