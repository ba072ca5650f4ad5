"""Tokenizer, chat template and incremental detokenization."""
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lamina.tokenizer import IncrementalDetokenizer, Tokenizer, join_text_parts

CORPUS = ["The quick brown fox jumps over the lazy dog.", "Grüße aus Köln! Ça va très bien.",
          "日本語のテキストも少し。", "Emoji: 🙂🚀 and math: ∑ x² ≤ π", "numbers 12345 and spaces   here"] * 20


@pytest.fixture(scope="module")
def sentencepiece_dir(tmp_path_factory):
    """A llama-style tokenizer: BPE over ▁-marked words with byte fallback, Metaspace, Strip decoder."""
    from tokenizers import Tokenizer as HFTok, decoders, models, normalizers, trainers
    path = tmp_path_factory.mktemp("sp")
    trainer_tok = HFTok(models.BPE(unk_token="<unk>"))
    trainer_tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    trainer_tok.train_from_iterator(CORPUS, trainer)
    data = json.loads(trainer_tok.to_str())
    trained_vocab = data["model"]["vocab"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in sorted(trained_vocab, key=trained_vocab.get):
        if piece not in vocab:
            vocab[piece] = len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in data["model"]["merges"]]
    tok = HFTok(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return str(path)


def stream_decode(tok, ids):
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add([i]) for i in ids]
    deltas.append(detok.flush())
    return deltas


TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")) | st.sampled_from(
    list("aé€日🙂 \n🚀ß")), min_size=1, max_size=40)


def check_text_roundtrip(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    deltas = stream_decode(tok, ids)
    assert "".join(deltas) == tok.decode(ids)
    # text the tokenizer round-trips never shows a replacement character mid-stream (characters
    # outside its vocabulary may decode to U+FFFD in full, and then may in a delta too)
    if "\ufffd" not in tok.decode(ids):
        assert all("\ufffd" not in d for d in deltas)


def check_random_ids(tok, ids):
    assert "".join(stream_decode(tok, ids)) == tok.decode(ids)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT)
def test_sentencepiece_stream_roundtrip(sentencepiece_dir, text):
    check_text_roundtrip(Tokenizer(sentencepiece_dir), text)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(0, 400), min_size=1, max_size=30))
def test_sentencepiece_random_ids(sentencepiece_dir, ids):
    tok = Tokenizer(sentencepiece_dir)
    check_random_ids(tok, [i for i in ids if i < tok.vocab_size])


def test_sentencepiece_leading_space_and_bytes(sentencepiece_dir):
    tok = Tokenizer(sentencepiece_dir)
    ids = tok.encode("Hello 🙂 world", add_special_tokens=False)
    assert any(tok.id_to_token(i).startswith("<0x") for i in ids)  # the emoji went through byte fallback
    deltas = stream_decode(tok, ids)
    assert "".join(deltas) == "Hello 🙂 world"
    assert "🙂" in "".join(d for d in deltas if "🙂" in d)   # emitted whole, once its 4 bytes are in


@pytest.mark.slow
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT)
def test_byte_level_stream_roundtrip(default_model_dir, text):
    check_text_roundtrip(_default_tok(default_model_dir), text)


@pytest.mark.slow
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(0, 49151), min_size=1, max_size=30))
def test_byte_level_random_ids(default_model_dir, ids):
    check_random_ids(_default_tok(default_model_dir), ids)


_cache = {}


def _default_tok(path):
    if path not in _cache:
        _cache[path] = Tokenizer(path)
    return _cache[path]


CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3+3?"}],
    [{"role": "user", "content": "Grüße 🙂\nnew line"}, {"role": "assistant", "content": "Hallo!"}],
]


@pytest.mark.slow
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_chat_template_matches_transformers(default_model_dir, conv, add_generation_prompt):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(default_model_dir)
    ours = _default_tok(default_model_dir)
    messages = CONVERSATIONS[conv]
    want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    got = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert got == want
    assert ours.encode(got, add_special_tokens=False) == hf(want, add_special_tokens=False)["input_ids"]


def test_text_parts_are_joined_and_others_refused():
    assert join_text_parts([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]) == "a\nb"
    assert join_text_parts("plain") == "plain"
    with pytest.raises(ValueError, match="image_url"):
        join_text_parts([{"type": "image_url", "image_url": {"url": "x"}}])
