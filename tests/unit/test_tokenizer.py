"""Unit tests for lm_core.tokenizer, on a throwaway tokenizer trained here on a few stdlib files."""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from lm_core.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, TokenizerConfig, train_tokenizer
from lm_core.typed_config import build

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TRAIN_FILES = ("textwrap.py", "string.py", "shlex.py", "fnmatch.py", "difflib.py")  # ~150 KB of ASCII text
VOCAB = 500

SAMPLES = [
    "def f(x):\n    return x + 1\n",
    "   leading spaces and trailing   ",
    "\n\nblank lines\n\n\n",
    "tabs\tand\r\nwindows line ends",
    "café naïve résumé",
    "漢字 and emoji 🙂🚀",
    " ",
    "",
]


def corpus() -> str:
    return "".join((STDLIB / name).read_text(encoding="utf-8") for name in TRAIN_FILES)


def train(path: Path, **overrides) -> Path:
    cfg = TokenizerConfig(vocab_size=VOCAB, num_threads=1, **overrides)
    return train_tokenizer(cfg, corpus().splitlines(keepends=True), path)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return train(tmp_path_factory.mktemp("tok") / "tok.model")


@pytest.fixture(scope="module")
def tok(model_path) -> Tokenizer:
    return Tokenizer(model_path)


def test_training_writes_only_the_model_file(model_path):
    assert model_path.is_file()
    assert [p.name for p in model_path.parent.iterdir()] == ["tok.model"]  # the temp dir is gone


def test_special_ids(tok):
    assert tok.vocab_size == VOCAB
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (BOS_ID, EOS_ID, PAD_ID) == (1, 2, 3)
    assert tok.id_to_piece(UNK_ID) == "<unk>"
    assert tok.id_to_piece(4) == "\n"  # newline is a user symbol, one token per line break


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_round_trip_on_training_text(tok):
    text = (STDLIB / "textwrap.py").read_text(encoding="utf-8")[:5000]
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < 0.7 * len(text)  # it learned merges: well under one token per character


def test_newline_is_its_own_token(tok):
    assert tok.encode("a\nb").count(4) == 1


def test_byte_fallback_for_unseen_characters(tok):
    text = "漢"  # never in the training text: its three UTF-8 bytes become three byte pieces
    ids = tok.encode(text)
    assert [tok.id_to_piece(i) for i in ids] == ["<0xE6>", "<0xBC>", "<0xA2>"]
    assert UNK_ID not in tok.encode("漢字 🙂 ünïcödé")


@pytest.mark.parametrize("text", SAMPLES)
def test_token_bytes_sum_to_utf8_length(tok, text):
    table = tok.token_bytes()
    ids = tok.encode(text)
    assert int(table[ids].sum()) == len(text.encode("utf-8"))


def test_token_bytes_table(tok):
    table = tok.token_bytes()
    assert table.shape == (VOCAB,) and table.dtype.name == "int32"
    assert list(table[:4]) == [0, 0, 0, 0]  # unk, bos, eos, pad carry no text
    assert table[4] == 1  # "\n"
    assert (table[4:] >= 1).all()


def test_encode_batch_matches_encode(tok):
    assert tok.encode_batch(SAMPLES, num_threads=2) == [tok.encode(t) for t in SAMPLES]


def test_encode_arrays_match_encode(tok):
    arrays = tok.encode_arrays(SAMPLES, num_threads=2)
    assert all(a.dtype == np.int32 for a in arrays)
    assert [a.tolist() for a in arrays] == [tok.encode(t) for t in SAMPLES]


def test_byte_pieces(tok):
    mask = tok.byte_pieces()
    assert mask.shape == (VOCAB,) and mask.sum() == 256  # one piece per byte value
    assert mask[tok.encode("漢")].all()
    assert not mask[tok.encode("def return")].any()


def test_normalization_rule_is_configurable(tmp_path, tok):
    nfkc = Tokenizer(train(tmp_path / "nfkc.model", normalization="nfkc"))
    assert nfkc.decode(nfkc.encode("ﬁle ①")) == "file 1"  # ligature and circled digit folded
    assert tok.decode(tok.encode("ﬁle ①")) == "ﬁle ①"  # identity keeps them, via byte fallback
    with pytest.raises(ValueError, match="normalization='lowercase' is not allowed"):
        build(TokenizerConfig, {"normalization": "lowercase"})


def test_unigram_model_type(tmp_path):
    uni = Tokenizer(train(tmp_path / "uni.model", model_type="unigram"))
    text = "def f(x):\n    return x + 1\n"
    assert uni.decode(uni.encode(text)) == text and uni.vocab_size == VOCAB


def test_sha256_is_the_file_hash(tok, model_path):
    assert tok.sha256 == hashlib.sha256(model_path.read_bytes()).hexdigest()
    assert Tokenizer(model_path).sha256 == tok.sha256


def test_retraining_same_text_gives_same_sha(tok, tmp_path):
    again = Tokenizer(train(tmp_path / "again.model"))
    assert [again.id_to_piece(i) for i in range(VOCAB)] == [tok.id_to_piece(i) for i in range(VOCAB)]
    assert again.sha256 == tok.sha256


def test_missing_model_file(tmp_path):
    missing = tmp_path / "nope" / "tok.model"
    with pytest.raises(FileNotFoundError) as err:
        Tokenizer(missing)
    assert str(missing) in str(err.value)


def test_config_validate_messages():
    with pytest.raises(ValueError, match=r"tokenizer\.vocab_size=200 is too small"):
        build(TokenizerConfig, {"vocab_size": 200})
    with pytest.raises(ValueError, match=r"tokenizer\.character_coverage=0\.5"):
        build(TokenizerConfig, {"character_coverage": 0.5})
    with pytest.raises(ValueError, match=r"tokenizer\.num_threads=0"):
        build(TokenizerConfig, {"num_threads": 0})
