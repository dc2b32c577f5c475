"""Run a port's traced-graph module eagerly on CPU, emulating NxDI's state aliasing.

NxDI compiles ``model.forward`` and aliases each ``past_key_values[i]`` to output
``1 + i``; here the outputs are copied back into the parameters after each call.
Used by the tests (and handy for debugging a port without Neuron hardware).
"""

from __future__ import annotations

import torch

from vllm_hybrid_neuron.neuron import base


class CpuRunner:
    def __init__(self, app_cls, model_dir: str, batch_size: int = 1, seq_len: int = 64,
                 **config_kwargs) -> None:
        """config_kwargs override InferenceConfig attributes (e.g. ssd_chunk_size=16)."""
        nc = app_cls.get_neuron_config_cls()(batch_size=batch_size, seq_len=seq_len,
                                             torch_dtype=torch.float32)
        self.config = app_cls.get_config_cls()(nc, load_config=base.load_pretrained_config(model_dir),
                                               **config_kwargs)
        self.model = app_cls._model_cls(self.config).eval()
        self.state_dict = app_cls.get_state_dict(model_dir, self.config)
        result = self.model.load_state_dict(self.state_dict, strict=False)
        self.missing = [k for k in result.missing_keys if not k.startswith("past_key_values.")]
        self.unexpected = list(result.unexpected_keys)

    @torch.no_grad()
    def step(self, input_ids, attention_mask, position_ids, seq_ids, all_logits: bool = False):
        """One call of the traced graph. all_logits: the logits at every position, from the same
        layers (the graph itself returns a prefill's last valid token only)."""
        if all_logits:
            h, _, new_states = self.model.run_layers(input_ids, attention_mask, position_ids, seq_ids)
            outs = [self.model.logits(h), *new_states]
        else:
            outs = self.model(input_ids, attention_mask, position_ids, seq_ids, torch.ones(len(seq_ids), 3))
        for param, new in zip(self.model.past_key_values, outs[1:]):
            param.data = new  # what input_output_aliases does on device
        return outs[0]

    def prefill(self, prompts: list[list[int]], seq_ids: list[int], pad_to: int | None = None,
                all_logits: bool = True) -> torch.Tensor:
        """Right-padded prefill of several prompts. Returns logits (B, L or 1, V)."""
        L = pad_to or max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), L, dtype=torch.long)
        mask = torch.zeros(len(prompts), L, dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, :len(p)] = torch.tensor(p)
            mask[b, :len(p)] = 1
        pos = torch.arange(L)[None].expand(len(prompts), L)
        return self.step(ids, mask, pos, torch.tensor(seq_ids), all_logits=all_logits)

    def decode(self, tokens: list[int], positions: list[int], seq_ids: list[int]) -> torch.Tensor:
        """One token per sequence. Returns logits (B, 1, V)."""
        ids = torch.tensor(tokens)[:, None]
        pos = torch.tensor(positions)[:, None]
        return self.step(ids, torch.ones_like(ids), pos, torch.tensor(seq_ids))

    def greedy(self, prompt: list[int], new_tokens: int, seq_id: int = 0) -> list[int]:
        """Prefill then decode: the greedy continuation of one prompt."""
        logits = self.prefill([prompt], [seq_id], all_logits=False)
        out = [int(logits[0, -1].argmax())]
        for i in range(new_tokens - 1):
            logits = self.decode([out[-1]], [len(prompt) + i], [seq_id])
            out.append(int(logits[0, -1].argmax()))
        return out
