"""The rest of the OpenAI surface of `lmforge serve`, through the real `openai` client and raw HTTP: chat
completions (plain and streamed, the export's chat template), GET /v1/models/{id}, logprobs and echo
(lm-evaluation-harness's scoring request), n > 1, and the bodies a server must refuse cleanly: invalid
JSON or UTF-8 (400), too large (413), unknown paths (404), and a huge body that must not stall /health."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from serve_fixtures import build_export, lmforge_serve

from lm_core.generate import SamplingConfig, complete_text
from lm_core.tokenizer import Tokenizer
from lm_core.weights import CHAT_STOP, CHAT_TEMPLATE, TOKENIZER_FILE, load_model_dir

openai = pytest.importorskip("openai")

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NAME = "tiny-chat"
BLOCK = 256


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_export(tmp_path_factory.mktemp("serve-openai"), BLOCK)


@pytest.fixture(scope="module")
def server(model_dir) -> str:
    with lmforge_serve(model_dir, NAME, "--max-body-mb", "1") as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def lm(model_dir):
    model, _ = load_model_dir(model_dir)
    return model, Tokenizer(model_dir / TOKENIZER_FILE)


def logprobs_of(model, ids: list[int]) -> torch.Tensor:
    """(T, V) next-token log-probabilities of a sequence, no cache: what the server must report."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0][0], dim=-1)


def test_model_by_id(client):
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("gpt-4")
    assert "'gpt-4' does not exist" in caught.value.body["message"]


def test_chat_follows_the_exports_template(client, lm):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    model, tok = lm
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Sort a list."}]
    rendered = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(CHAT_TEMPLATE).render(
        messages=messages, add_generation_prompt=True)
    assert rendered == "You write Python.\n\nUser: Sort a list.\nAssistant:"
    expected = complete_text(model, tok, [tok.encode(rendered, bos=True)], SamplingConfig(max_new_tokens=24, temperature=0),
                             stop=CHAT_STOP)[0]
    out = client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, temperature=0)
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expected.text and out.choices[0].finish_reason == expected.finish_reason
    assert out.usage.completion_tokens == expected.tokens
    stream = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert stream[0].choices[0].delta.role == "assistant" and stream[-1].usage.completion_tokens == expected.tokens
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in stream if c.choices][-1] == expected.finish_reason


def test_chat_logprobs(client, lm):
    out = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                         temperature=0, logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 2 and item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob)  # greedy: the best token was chosen


def test_lm_eval_scoring_request(server, lm):
    """The request lm-evaluation-harness's local-completions sends to score a continuation, and what it reads."""
    model, tok = lm
    ids = tok.encode("def add(a, b):\n    return a + b", bos=True)
    body = {"model": NAME, "prompt": [ids], "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0, "seed": 1234}
    response = httpx.post(f"{server}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    lp = response.json()["choices"][0]["logprobs"]
    expected = logprobs_of(model, ids)
    assert len(lp["tokens"]) == len(ids) + 1 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for i in range(1, len(ids)):
        assert lp["token_logprobs"][i] == pytest.approx(expected[i - 1, ids[i]].item(), abs=1e-4)
        best = expected[i - 1].max().item()
        assert max(lp["top_logprobs"][i].values()) == pytest.approx(best, abs=1e-4)
    greedy_next = expected[-1].argmax().item()
    assert lp["token_logprobs"][-1] == pytest.approx(expected[-1, greedy_next].item(), abs=1e-4)
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][:2] == [0, 0]  # BOS has no text
    # max_tokens 0 with echo: the prompt's logprobs alone, and its own text back
    only = httpx.post(f"{server}/v1/completions", json={"model": NAME, "prompt": "import os", "max_tokens": 0,
                                                        "echo": True, "logprobs": 0}, timeout=60).json()
    choice = only["choices"][0]
    assert choice["text"] == "import os" and only["usage"]["completion_tokens"] == 0
    assert len(choice["logprobs"]["tokens"]) == len(tok.encode("import os", bos=True))


def test_completion_logprobs_plain_and_streamed(client):
    args = dict(model=NAME, prompt="import sys\n", max_tokens=10, temperature=0.8, seed=5, logprobs=3)
    plain = client.completions.create(**args).choices[0]
    assert len(plain.logprobs.tokens) == 10 and "".join(plain.logprobs.tokens).startswith(plain.text[:1])
    assert all(len(top) >= 3 for top in plain.logprobs.top_logprobs)
    assert plain.logprobs.text_offset[0] == 0
    chunks = [c.choices[0] for c in client.completions.create(**args, stream=True)]
    assert "".join(c.text for c in chunks) == plain.text
    assert [t for c in chunks if c.logprobs for t in c.logprobs.tokens] == plain.logprobs.tokens
    assert [o for c in chunks if c.logprobs for o in c.logprobs.text_offset] == plain.logprobs.text_offset


def test_n_choices(client, lm):
    model, tok = lm
    out = client.completions.create(model=NAME, prompt=["a = ", "b = "], max_tokens=8, temperature=1.0, seed=3, n=3)
    assert [c.index for c in out.choices] == list(range(6))
    first = complete_text(model, tok, [tok.encode("a = ", bos=True)], SamplingConfig(max_new_tokens=8, seed=3))[0]
    assert out.choices[0].text == first.text  # sample 0 uses the request's seed itself
    assert len({c.text for c in out.choices[:3]}) == 3  # the other samples differ
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}], max_tokens=4, n=2)
    assert [c.index for c in chat.choices] == [0, 1]


@pytest.mark.parametrize("content, status, words", [
    (b'{"model": "tiny-chat", "prompt": "x",}', 400, ["not valid JSON", "line 1 column"]),
    (b'{"model": "tiny-chat", "prompt": "caf\xe9"}', 400, ["not valid UTF-8", "0xe9"]),
    (b'["tiny-chat"]', 400, ["must be a JSON object"]),
    (b'{"model": "tiny-chat", "prompt": "x", "max_tokens": "many"}', 400, ["max_tokens", "valid integer"]),
])
def test_malformed_bodies_get_readable_400s(server, content, status, words):
    response = httpx.post(f"{server}/v1/completions", content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    for word in words:
        assert word in error["message"], error["message"]


def test_body_limit_and_unknown_paths(server):
    big = b'{"prompt": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    response = httpx.post(f"{server}/v1/completions", content=big, headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and "at most 1,048,576 bytes" in response.json()["error"]["message"]
    chunked = httpx.post(f"{server}/v1/completions", content=iter([big[:600_000], big[600_000:]]))  # no length
    assert chunked.status_code == 413
    missing = httpx.get(f"{server}/v1/engines")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_a_huge_body_does_not_stall_health(server):
    body = ('{"model": "tiny-chat", "max_tokens": 1, "prompt": "' + "lorem ipsum " * 85_000 + '"}').encode()
    assert len(body) < 1024 * 1024
    answer: dict = {}
    worker = threading.Thread(target=lambda: answer.update(r=httpx.post(f"{server}/v1/completions", content=body,
                                                                        timeout=60)))
    worker.start()
    slowest = 0.0
    while worker.is_alive():
        started = time.perf_counter()
        assert httpx.get(f"{server}/health", timeout=10).status_code == 200
        slowest = max(slowest, time.perf_counter() - started)
    worker.join()
    assert answer["r"].status_code == 400 and "at least" in answer["r"].json()["error"]["message"]
    assert slowest < 0.5, f"/health took {slowest:.2f} s while a large body was handled"
