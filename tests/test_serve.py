"""`vllm serve` with the plugin: OpenAI endpoints, streaming, concurrency, bad input."""

from __future__ import annotations

import concurrent.futures

import pytest
import requests

from vllm_hybrid_neuron.tools.server import VllmServer

MODEL = "tiny-granite"
MAX_MODEL_LEN = 512


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    args = ["--served-model-name", MODEL, "--dtype", "float32", "--max-model-len",
            str(MAX_MODEL_LEN), "--enforce-eager"]
    with VllmServer(tiny_model_dir("granite"), args) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def still_serving(server, client) -> None:
    assert server.healthy()
    out = client.completions.create(model=MODEL, prompt="ok", max_tokens=2, temperature=0)
    assert out.usage.completion_tokens == 2


pytestmark = pytest.mark.slow


def test_log_names_backend(server):
    assert "vllm-hybrid-neuron 0.1.0: backend=cpu" in server.log()


def test_completions(client):
    out = client.completions.create(model=MODEL, prompt="Hello, my name is", max_tokens=8,
                                    temperature=0, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 8
    assert out.choices[0].text


def test_chat_and_stream_agree(client):
    messages = [{"role": "user", "content": "Tell me about hybrid models."}]
    kw = dict(model=MODEL, messages=messages, max_tokens=12, temperature=0,
              extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kw)
    assert whole.usage.completion_tokens == 12
    pieces = [c.choices[0].delta.content or ""
              for c in client.chat.completions.create(stream=True, **kw) if c.choices]
    assert sum(1 for p in pieces if p) >= 2  # really streamed
    assert "".join(pieces) == whole.choices[0].message.content


def test_concurrent_requests_keep_their_own_answers(client):
    prompts = [f"{i} {w}" for i, w in enumerate(["apple", "state", "delta", "fox", "cache",
                                                 "stream"])]

    def ask(prompt):
        return client.completions.create(model=MODEL, prompt=prompt, max_tokens=16,
                                         temperature=0, extra_body={"ignore_eos": True}
                                         ).choices[0].text

    alone = [ask(p) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(ask, prompts))
    assert together == alone
    assert len(set(alone)) > 1


@pytest.mark.parametrize("case", ["bad_json", "negative_max_tokens", "too_long",
                                  "unknown_model"])
def test_bad_requests_get_4xx_and_server_survives(server, client, case):
    url = f"{server.base_url}/v1/completions"
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 4}
    if case == "bad_json":
        r = requests.post(url, data="{not json", headers={"Content-Type": "application/json"})
    else:
        if case == "negative_max_tokens":
            body["max_tokens"] = -5
        elif case == "too_long":
            body["prompt"] = "hello " * (4 * MAX_MODEL_LEN)
        elif case == "unknown_model":
            body["model"] = "no-such-model"
        r = requests.post(url, json=body, timeout=60)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    assert "error" in r.json()
    still_serving(server, client)
