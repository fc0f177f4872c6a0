"""TextStream (UTF-8-safe incremental detokenization, stop strings) and the text layer of the generation
loop (stream_text / complete_text), with a SentencePiece tokenizer trained here on stdlib source."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch

from lm_core.generate import SamplingConfig, complete_text, generate, stream_text
from lm_core.model import GPT, GPTConfig
from lm_core.text_stream import TextStream
from lm_core.tokenizer import Tokenizer, TokenizerConfig, train_tokenizer

# é, ü, 日本 and 🎉 are not in a vocab learned from (ASCII) stdlib code: byte-fallback pieces, 2-4 per character
TEXT = "def f(x):\n    return 'héllo wörld' + \"日本\"  # 🎉 done\n"


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:30]
    lines = [line for f in files for line in f.read_text(errors="ignore").splitlines(keepends=True)]
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    return Tokenizer(train_tokenizer(TokenizerConfig(vocab_size=512, num_threads=1), iter(lines), path))


def test_fixture_really_uses_byte_fallback(tok):
    pieces = [tok.id_to_piece(i) for i in tok.encode(TEXT)]
    assert sum(p.startswith("<0x") for p in pieces) >= 10  # otherwise the UTF-8 tests below test nothing


def test_stream_never_splits_a_character(tok):
    stream = TextStream(tok.decode)
    pieces = [stream.push(i) for i in tok.encode(TEXT)] + [stream.finish()]
    assert "".join(pieces) == TEXT == stream.text
    assert all("\ufffd" not in p for p in pieces)
    assert any("🎉" in p for p in pieces)


def test_incomplete_character_comes_out_at_finish(tok):
    ids = tok.encode("ok 🎉")
    stream = TextStream(tok.decode)
    text = "".join(stream.push(i) for i in ids[:-1])  # the emoji's last byte never arrives
    assert text == "ok "
    assert stream.finish().startswith("\ufffd")


@pytest.mark.parametrize("stop, expected", [
    (["wörld"], "def f(x):\n    return 'héllo "),  # a stop string made of byte-fallback pieces
    (["\n"], "def f(x):"),
    (["zzz", "日本", "return"], "def f(x):\n    "),  # the earliest of several
    (["never there"], TEXT),
    (["done\nX"], TEXT),  # a prefix of the stop string is held back, then released at finish
])
def test_stop_strings(tok, stop, expected):
    stream = TextStream(tok.decode, stop)
    pieces = []
    for i in tok.encode(TEXT):
        pieces.append(stream.push(i))
        assert not any(s in stream.text for s in stop)
    pieces.append(stream.finish())
    assert "".join(pieces) == expected == stream.text
    assert stream.stopped == (expected != TEXT)
    if stream.stopped:
        assert stream.push(tok.encode("more")[0]) == ""


def test_partial_stop_is_held_then_released(tok):
    stream = TextStream(tok.decode, ["ab!"])
    out = "".join(stream.push(i) for i in tok.encode("x ab"))
    assert out == "x " and not stream.stopped  # "ab" may still become "ab!"
    assert "".join(stream.push(i) for i in tok.encode("c")) == "abc"


def test_empty_stop_string_is_refused(tok):
    with pytest.raises(ValueError, match="stop strings must be non-empty"):
        TextStream(tok.decode, [""])


# --- stream_text / complete_text on a model that learned TEXT's token sequence -------------------------


@pytest.fixture(scope="module")
def taught(tok) -> tuple[GPT, list[int]]:
    """A tiny model that continues TEXT's tokens followed by eos, periodically. The next token must be a
    function of the current one, so the pattern is TEXT's tokens up to the first repeated id."""
    ids: list[int] = []
    for i in tok.encode(TEXT):
        if i in ids:
            break
        ids.append(i)
    pattern = ids + [tok.eos_id]
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=4, n_embd=32))
    data = torch.tensor(pattern * (200 // len(pattern) + 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(150):
        starts = torch.randint(0, len(data) - 33, (8,))
        _, loss = model(torch.stack([data[s:s + 32] for s in starts]), torch.stack([data[s + 1:s + 33] for s in starts]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, f"tiny model failed to learn the pattern (loss {loss.item():.3f})"
    return model.eval(), pattern


def test_complete_text_finish_reasons(tok, taught):
    model, pattern = taught
    body = pattern[:-1]
    greedy = SamplingConfig(max_new_tokens=40, temperature=0.0)
    prompts = [body[:2], body[:5], body[:5]]
    # until eos: finish "stop", the text is what the tokens decode to
    eos_run = complete_text(model, tok, prompts[:1], greedy)[0]
    assert eos_run.finish_reason == "stop" and eos_run.tokens == len(body) - 2
    assert eos_run.text == tok.decode(body[2:]) == tok.decode(generate(model, body[:2], greedy, eos_id=tok.eos_id))
    # a batch with a stop string, a length limit, and eos; rows finish independently
    rest = tok.decode(body[5:])
    stop = rest[3:6]
    short = SamplingConfig(max_new_tokens=4, temperature=0.0)
    assert complete_text(model, tok, prompts[1:2], short)[0].finish_reason == "length"
    out = complete_text(model, tok, prompts, greedy, stop=[stop])
    assert [c.finish_reason for c in out] == ["stop", "stop", "stop"]
    assert out[1].text == out[2].text == rest[:rest.index(stop)]
    assert out[1].tokens < len(body) - 5


def test_stream_text_chunks_and_close(tok, taught):
    model, pattern = taught
    sampling = SamplingConfig(max_new_tokens=6, temperature=0.0)
    chunks = list(stream_text(model, tok, [pattern[:3], pattern[:1]], sampling))
    for index in (0, 1):
        mine = [c for c in chunks if c.index == index]
        assert [c.finish_reason for c in mine][-1] == "length" and all(c.finish_reason is None for c in mine[:-1])
        assert mine[-1].tokens == 6
    zero = list(stream_text(model, tok, [pattern[:3]], SamplingConfig(max_new_tokens=0)))
    assert [(c.text, c.finish_reason, c.tokens) for c in zero] == [("", "length", 0)]
    model.train()
    it = stream_text(model, tok, [pattern[:3]], sampling)
    next(it)
    it.close()  # closing the text stream closes the loop: the model's mode is restored
    assert model.training
    model.eval()
