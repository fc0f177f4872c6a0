"""`lmforge serve` as a user runs it (a subprocess on a free loopback port), driven by the real `openai`
client: plain and streamed completions, stop strings, seeds, batches of prompts, concurrent requests
decoded as one batch, a cancelled stream, and bad requests (400 / 404 with OpenAI-shaped error bodies).
tests/integration/test_serve_openai.py covers chat, logprobs/echo, n and the body limits.
"""

from __future__ import annotations

import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from serve_fixtures import LMFORGE, build_export, lmforge_serve

from lm_core.generate import SamplingConfig, complete_text
from lm_core.tokenizer import Tokenizer
from lm_core.weights import TOKENIZER_FILE, load_model_dir

openai = pytest.importorskip("openai")

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NAME = "tiny"
BLOCK = 512


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_export(tmp_path_factory.mktemp("serve"), BLOCK)


@pytest.fixture(scope="module")
def server(model_dir) -> str:
    with lmforge_serve(model_dir, NAME) as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def local(model_dir):
    """The same model in-process: what the server must answer."""
    model, _ = load_model_dir(model_dir)
    tok = Tokenizer(model_dir / TOKENIZER_FILE)

    def complete(prompt: str, stop=(), **sampling):
        return complete_text(model, tok, [tok.encode(prompt, bos=True)], SamplingConfig(**sampling), stop=stop)[0]

    return complete


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["model"] == NAME


def test_completion_matches_the_engine(client, local, model_dir):
    out = client.completions.create(model=NAME, prompt="def main(", max_tokens=20, temperature=0)
    expected = local("def main(", max_new_tokens=20, temperature=0.0)
    assert out.choices[0].text == expected.text and out.choices[0].finish_reason == "length"
    prompt_tokens = len(Tokenizer(model_dir / TOKENIZER_FILE).encode("def main(", bos=True))
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
        prompt_tokens, 20, prompt_tokens + 20)


def test_stream_equals_plain(client):
    args = dict(model=NAME, prompt="import os\n", max_tokens=24, temperature=0.7, top_p=0.9, seed=11)
    plain = client.completions.create(**args)
    events = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    text_events = [e for e in events if e.choices]
    assert "".join(e.choices[0].text for e in text_events) == plain.choices[0].text
    assert [e.choices[0].finish_reason for e in text_events][-1] == "length"
    assert all(e.choices[0].finish_reason is None for e in text_events[:-1])
    assert events[-1].usage.completion_tokens == 24 and not events[-1].choices
    assert plain.choices[0].text == client.completions.create(**args).choices[0].text  # seeded: reproducible


def test_stop_strings(client, local):
    full = local("class A:", max_new_tokens=40, temperature=0.0).text
    # a stop string of complete characters, from the middle of the greedy text (the random model emits stray bytes)
    stop = next(full[i:i + 3] for i in range(8, len(full) - 3) if "\ufffd" not in full[i:i + 3])
    out = client.completions.create(model=NAME, prompt="class A:", max_tokens=40, temperature=0, stop=[stop, "@@@"])
    assert out.choices[0].text == full[:full.index(stop)] and out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens < 40
    streamed = client.completions.create(model=NAME, prompt="class A:", max_tokens=40, temperature=0, stop=stop, stream=True)
    assert "".join(e.choices[0].text for e in streamed) == out.choices[0].text


def test_a_batch_of_prompts(client, local):
    prompts = ["x = 1", "for i in range(10):\n    print(i)\n"]
    out = client.completions.create(model=NAME, prompt=prompts, max_tokens=8, temperature=0)
    assert [c.index for c in out.choices] == [0, 1]
    assert [c.text for c in out.choices] == [local(p, max_new_tokens=8, temperature=0.0).text for p in prompts]


def test_concurrent_requests_are_decoded_together(server, client, local):
    prompts = [f"def f{i}(x):\n    return x * {i}" * (1 + i % 3) for i in range(8)]

    def ask(i: int) -> str:
        return client.completions.create(model=NAME, prompt=prompts[i], max_tokens=16, temperature=0.9,
                                         seed=i).choices[0].text

    before = httpx.get(f"{server}/health").json()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    after = httpx.get(f"{server}/health").json()
    # seeded draws depend on the request alone, not on what else shares the batch
    assert answers == [local(p, max_new_tokens=16, temperature=0.9, seed=i).text for i, p in enumerate(prompts)]
    tokens, steps = after["tokens_generated"] - before["tokens_generated"], after["steps"] - before["steps"]
    assert tokens == 8 * 16 and steps < tokens / 2, f"{steps} engine steps for {tokens} tokens: not batched"


LONG_ROWS = 64  # 4 prompts x n=16: eight waves through the server's 8 slots
LONG_TOKENS = LONG_ROWS * (BLOCK - 8)


@pytest.fixture(scope="module")
def long_request(local) -> dict:
    """A request that runs to max_tokens (no early eos), so stopping early can only mean it was stopped. It is
    many rows, not one: a single 504-token row of this tiny model finishes in ~0.25 s on a fast CPU, sooner than a
    client can give up on it (CI failed that way); eight waves of eight rows take seconds on any machine."""
    body = {"model": NAME, "prompt": ["#"] * 4, "n": 16, "max_tokens": BLOCK - 8, "temperature": 0}
    assert local("#", max_new_tokens=BLOCK - 8, temperature=0.0).finish_reason == "length"
    return body


def test_a_cancelled_stream_stops_generating(server, long_request):
    before = httpx.get(f"{server}/health").json()
    body = {**long_request, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        events = response.iter_lines()
        first = next(line for line in events if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["finish_reason"] is None
        assert httpx.get(f"{server}/health").json()["active"] >= 1
    # the connection is closed: the server must stop the generation and drop it
    deadline = time.monotonic() + 10
    while (health := httpx.get(f"{server}/health").json())["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert health["active"] == 0, "the cancelled generation is still running"
    time.sleep(0.3)
    after = httpx.get(f"{server}/health").json()
    assert after["tokens_generated"] == health["tokens_generated"]  # no work after the stop
    assert after["tokens_generated"] - before["tokens_generated"] < LONG_TOKENS


def test_an_abandoned_plain_request_stops_generating(server, long_request):
    before = httpx.get(f"{server}/health").json()
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(f"{server}/v1/completions", json=long_request, timeout=httpx.Timeout(5, read=0.3))
    deadline = time.monotonic() + 10
    while (health := httpx.get(f"{server}/health").json())["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert health["active"] == 0, "the abandoned generation is still running"
    assert health["tokens_generated"] - before["tokens_generated"] < LONG_TOKENS


@pytest.mark.parametrize("args, error, words", [
    (dict(max_tokens=-1), "BadRequestError", ["max_tokens", "greater than or equal to 0"]),
    (dict(temperature=5), "BadRequestError", ["temperature", "less than or equal to 2"]),
    (dict(top_p=0), "BadRequestError", ["top_p"]),
    (dict(stop=["a", "b", "c", "d", "e"]), "BadRequestError", ["stop", "up to 4"]),
    (dict(extra_body={"temprature": 0.5}), "BadRequestError", ["temprature", "Extra inputs"]),
    (dict(max_tokens=BLOCK), "BadRequestError", [f"maximum context length is {BLOCK}", "for the completion"]),
    (dict(prompt="word " * 600), "BadRequestError", ["maximum context length", "in the prompt"]),
    (dict(n=17), "BadRequestError", ["n: Input should be less than or equal to 16"]),
    (dict(frequency_penalty=0.5), "BadRequestError", ["frequency_penalty=0.5 is not supported"]),
    (dict(prompt=[1, 2, 99999]), "BadRequestError", ["outside the vocabulary"]),
    (dict(prompt=["x"] * 33), "BadRequestError", ["33 prompts", "at most 32"]),
    (dict(model="gpt-4"), "NotFoundError", ["'gpt-4' does not exist", NAME]),
])
def test_bad_requests(client, args, error, words):
    request = {"model": NAME, "prompt": "hello", "max_tokens": 4, **args}
    with pytest.raises(getattr(openai, error)) as caught:
        client.completions.create(**request)
    body = caught.value.body
    message = body["message"] if "message" in body else body["error"]["message"]
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_binds_loopback_by_default(model_dir):
    from flows.cli import _parser

    args = _parser().parse_args(["serve", "--model", str(model_dir)])
    assert args.host == "127.0.0.1"


def test_generate_command_streams_and_stops(model_dir, local, tmp_path):
    full = local("class A:", max_new_tokens=30, temperature=0.0).text
    stop = next(full[i:i + 2] for i in range(6, len(full) - 2) if "\ufffd" not in full[i:i + 2])
    cmd = [*LMFORGE, "generate", "--model", str(model_dir), "--prompt", "class A:", "--temperature", "0",
           "--max-new-tokens", "30"]
    plain = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert plain.stdout == "class A:" + full + "\n"
    stopped = subprocess.run([*cmd, "--stop", stop, "--stop", "@@"], capture_output=True, text=True, timeout=120)
    assert stopped.stdout == "class A:" + full[:full.index(stop)] + "\n"
