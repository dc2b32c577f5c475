"""Clients that disconnect mid-stream must not disturb the other requests."""

from __future__ import annotations

import concurrent.futures

import pytest

from vllm_hybrid_neuron.tools.server import VllmServer

pytestmark = pytest.mark.slow
DTYPE = {"granite": "float32", "qwen3_5": "bfloat16"}


@pytest.mark.parametrize("family", ["granite", "qwen3_5"])
def test_aborted_streams_leave_others_unchanged(tiny_model_dir, family):
    from openai import OpenAI

    args = ["--served-model-name", "m", "--dtype", DTYPE[family], "--max-model-len", "1024",
            "--enforce-eager"]
    with VllmServer(tiny_model_dir(family), args) as server:
        client = OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0)
        kept = [f"{i} the state of the stream" * (1 + 20 * i) for i in range(3)]

        def complete(prompt):
            return client.completions.create(
                model="m", prompt=prompt, max_tokens=40, temperature=0,
                extra_body={"ignore_eos": True}).choices[0].text

        def abandon(prompt):
            stream = client.completions.create(
                model="m", prompt=prompt, max_tokens=200, temperature=0, stream=True,
                extra_body={"ignore_eos": True})
            for i, _ in enumerate(stream):
                if i == 3:
                    break
            stream.close()  # the client disconnects: vLLM aborts the request
            return "aborted"

        alone = [complete(p) for p in kept]
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            dropped = [pool.submit(abandon, f"drop {i} " * 50) for i in range(3)]
            together = list(pool.map(complete, kept))
            assert [d.result() for d in dropped] == ["aborted"] * 3
        assert together == alone
        assert server.healthy()
        assert complete(kept[0]) == alone[0]
        assert "Aborted request" in server.log() or "abort" in server.log().lower()
