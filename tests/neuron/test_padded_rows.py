"""Padded batch rows never touch a sequence's state (issue: NxDI pads partial batches with the
slots *not* in the batch; with apply_seq_ids_mask those rows carry seq_id -1)."""

from __future__ import annotations

import pytest
import torch

from neuron_helpers import app_cls, assert_close_to_scale, prompt
from vllm_hybrid_neuron.neuron.common import read_slots, slot_rows, write_slots
from vllm_hybrid_neuron.neuron.cpu_runner import CpuRunner

FAMILIES = ["granite", "qwen3_5", "gemma4"]


def test_slot_rows_send_padding_to_the_spare_row():
    ids = torch.tensor([2, -1, 0, -1], dtype=torch.int32)  # int32, as NxDI feeds seq_ids
    assert slot_rows(ids, 4).tolist() == [2, 3, 0, 3]
    state = torch.arange(4.0)[:, None].expand(4, 3).contiguous()  # slots 0-2 + spare row 3
    new = write_slots(state, ids, torch.full((4, 3), 9.0))
    assert new[:3, 0].tolist() == [9.0, 1.0, 9.0]  # slot 1 (not in the batch) untouched
    assert read_slots(new, ids)[:, 0].tolist() == [9.0, 9.0, 9.0, 9.0]


@pytest.mark.parametrize("family", FAMILIES)
def test_ports_ask_nxdi_to_mark_padded_rows(checkpoint, family):
    r = CpuRunner(app_cls(family), checkpoint(family), batch_size=2)
    assert r.config.neuron_config.apply_seq_ids_mask is True
    assert all(p.shape[0] == 3 for p in r.model.past_key_values)  # 2 slots + the spare row


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_decode_rows_leave_other_slots_alone(checkpoint, family):
    """A decode batch padded as NxDI pads it (rows repeat the first line, seq_id -1) changes
    only the slots in the batch, and gives the same logits as the unpadded batch."""
    a, b = prompt(9, seed=11), prompt(14, seed=12)
    padded = CpuRunner(app_cls(family), checkpoint(family), batch_size=4)
    plain = CpuRunner(app_cls(family), checkpoint(family), batch_size=4)
    for r in (padded, plain):
        r.prefill([a, b, prompt(5, seed=13)], [0, 2, 3])
    before = [p.detach().clone() for p in padded.model.past_key_values]
    ids = torch.tensor([[7], [7], [7], [7]])
    pos = torch.tensor([[9], [9], [9], [9]])
    got = padded.step(ids, torch.ones_like(ids), pos, torch.tensor([0, -1, -1, -1], dtype=torch.int32))
    ref = plain.decode([7], [9], [0])
    assert_close_to_scale(got[0], ref[0], 1e-5)  # batch width moves the last bits
    for old, new, kind in zip(before, padded.model.past_key_values, padded.model.state_kinds):
        for slot in (1, 2, 3):
            assert torch.equal(old[slot], new[slot]), f"{kind}: slot {slot} changed"
    assert any(not torch.equal(o[0], n[0]) for o, n in zip(before, padded.model.past_key_values))


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_row_without_tokens_leaves_its_slot_alone(checkpoint, family):
    r = CpuRunner(app_cls(family), checkpoint(family), batch_size=2)
    r.prefill([prompt(6, seed=14)], [1])
    before = [p.detach().clone() for p in r.model.past_key_values]
    L = 8
    ids = torch.zeros(2, L, dtype=torch.long)
    mask = torch.zeros(2, L, dtype=torch.long)
    ids[0, :5], mask[0, :5] = torch.tensor(prompt(5, seed=15)), 1  # row 1: no valid token
    # all positions' logits (as before: the flag this replaced stayed on from the prefill above)
    r.step(ids, mask, torch.arange(L)[None].expand(2, L), torch.tensor([0, 1]), all_logits=True)
    for old, new in zip(before, r.model.past_key_values):
        assert torch.equal(old[1], new[1])
