"""GGUF -> Hugging Face directory conversion, checked against transformers' own GGUF loader.

Tiny synthetic GGUF files are written with gguf.GGUFWriter (weights quantized with gguf.quants, or
random K-quant blocks where gguf cannot quantize), converted by lamina, and compared with what
transformers makes of the same file: the state dict (dequantization, names, the undone Q/K
permutation) and the token ids of the tokenizer built from the metadata.
"""
from __future__ import annotations

import functools
import json
import os

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from lamina.config import ModelConfig, ModelLoadError  # noqa: E402
from lamina.models.gguf import convert_gguf  # noqa: E402

Q = gguf.GGMLQuantizationType
K_QUANT_BLOCK = {  # bytes per 256-value block, byte offsets of its fp16 scale fields
    "Q2_K": (84, (80, 82)),
    "Q3_K": (110, (108,)),
    "Q4_K": (144, (0, 2)),
    "Q5_K": (176, (0, 2)),
    "Q6_K": (210, (208,)),
}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "In 2024 there were 12345 apples and 678 pears; 3.14159 is pi.",
    "Hello world! Hello, hello... it's I'M don't we'll they've you'd she's",
    "def main():\n    return 42\n\n\nprint(main())",
    "Ünïcödé text: café, naïve, résumé, 日本語のテキスト, emoji 😀🚀 and tabs\tand  spaces",
    "user: What is the capital of France? assistant: The capital of France is Paris.",
    "Numbers like 1, 22, 333, 4444, 55555 and 1000000 appear in lists.",
]
TEXTS = [
    "Hello world",
    " leading space and trailing ",
    "In 2024, 12345 apples cost $3.50 (or 3,50 €).",
    "it's   I'M   don't\n\n\tindented",
    "Ünïcödé 日本語 😀🚀 naïve café, and unseen: 中文 🎉 ß",
    "<|im_start|>user\nWhat is 7*6?<|im_end|>\n<|im_start|>assistant\n42<|im_end|>",
    "Hi<tool>there</s>again<s>the quick",
]


# --------------------------------------------------------------------------------------------
# synthetic tokenizers


@functools.lru_cache(maxsize=None)
def byte_level_vocab(pre: str):
    """(tokens, merges) of a small byte-level BPE trained on CORPUS with the split `pre` implies
    (SmolLM-style vocabularies never merge digits)."""
    from tokenizers import models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 3, trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


@functools.lru_cache(maxsize=None)
def sentencepiece_vocab():
    """(tokens, scores, types) shaped like a llama.cpp SentencePiece vocabulary: <unk>, <s>, </s>,
    the 256 byte tokens, then pieces with scores falling with their merge rank."""
    from tokenizers import models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False)
    tok.train_from_iterator(CORPUS * 3, trainer)
    model = json.loads(tok.to_str())["model"]
    pieces = sorted(model["vocab"], key=model["vocab"].get)
    merged = {(m if isinstance(m, str) else " ".join(m)).replace(" ", ""): i for i, m in enumerate(model["merges"])}
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    scores = [0.0, 0.0, 0.0] + [0.0] * 256
    types = [2, 3, 3] + [6] * 256
    for i, p in enumerate(pieces):
        if p in tokens:
            continue
        tokens.append(p)
        # coarse scores: many ties, so the tie-break order of the recovered merges matters
        scores.append(-float(merged[p] // 8) if p in merged else -1000.0 - i // 8)
        types.append(1)
    tokens.append("<tool>")  # a user-defined token: matched whole, not special
    scores.append(0.0)
    types.append(4)
    return tokens, scores, types


def gpt2_tokenizer_meta(pre: str, add_bos: bool = False) -> dict:
    tokens, merges = byte_level_vocab(pre)
    types = [3 if t in SPECIALS else 1 for t in tokens]
    return {"model": "gpt2", "pre": pre, "tokens": tokens, "merges": merges, "types": types,
            "bos": tokens.index("<|im_start|>"), "eos": tokens.index("<|im_end|>"), "add_bos": add_bos}


def llama_tokenizer_meta() -> dict:
    tokens, scores, types = sentencepiece_vocab()
    return {"model": "llama", "tokens": tokens, "scores": scores, "types": types, "bos": 1, "eos": 2,
            "unk": 0, "add_bos": True, "add_space_prefix": True}


# --------------------------------------------------------------------------------------------
# synthetic GGUF files


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to Llama q/k rows (the inverse of what lamina must undo)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_kquant(rows: int, cols: int, qtype: str, rng) -> np.ndarray:
    size, scale_offsets = K_QUANT_BLOCK[qtype]
    blocks = rng.integers(0, 256, size=(rows, cols // 256, size), dtype=np.uint8)
    for off in scale_offsets:
        scales = (rng.random((rows, cols // 256)) * 0.01 + 0.001).astype(np.float16)
        blocks[:, :, off:off + 2] = scales.view(np.uint8).reshape(rows, cols // 256, 2)
    return blocks.reshape(rows, -1)


def write_gguf(path, *, arch="llama", n_layers=2, hidden=64, heads=4, kv_heads=2, ffn=128,
               tokenizer: dict | None = None, qtypes: dict | None = None, tie=True, bias=False,
               omit=(), extra: dict | None = None, rope_freqs=None, rope_theta=10000.0,
               ctx=256, chat_template="{{ messages }}", seed=0) -> dict[str, np.ndarray]:
    """Write a tiny model; returns the Hugging Face-layout float weights per GGUF name (None where
    the tensor is random K-quant bytes)."""
    rng = np.random.default_rng(seed)
    tokenizer = tokenizer or gpt2_tokenizer_meta("smollm")
    qtypes = qtypes or {}
    vocab = len(tokenizer["tokens"])
    head_dim = hidden // heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny test model")
    w.add_block_count(n_layers)
    w.add_context_length(ctx)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(rope_theta)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(vocab)
    w.add_file_type(1)
    w.add_tokenizer_model(tokenizer["model"])
    if "pre" in tokenizer:
        w.add_tokenizer_pre(tokenizer["pre"])
    w.add_token_list(tokenizer["tokens"])
    w.add_token_types(tokenizer["types"])
    if "scores" in tokenizer:
        w.add_token_scores(tokenizer["scores"])
    if "merges" in tokenizer:
        w.add_token_merges(tokenizer["merges"])
    w.add_bos_token_id(tokenizer["bos"])
    w.add_eos_token_id(tokenizer["eos"])
    if "unk" in tokenizer:
        w.add_unk_token_id(tokenizer["unk"])
    w.add_add_bos_token(tokenizer["add_bos"])
    if "add_space_prefix" in tokenizer:
        w.add_add_space_prefix(tokenizer["add_space_prefix"])
    if chat_template:
        w.add_chat_template(chat_template)

    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,)}
    if not tie:
        shapes["output.weight"] = (vocab, hidden)
    for i in range(n_layers):
        shapes.update({
            f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.ffn_norm.weight": (hidden,),
            f"blk.{i}.attn_q.weight": (heads * head_dim, hidden),
            f"blk.{i}.attn_k.weight": (kv_heads * head_dim, hidden),
            f"blk.{i}.attn_v.weight": (kv_heads * head_dim, hidden),
            f"blk.{i}.attn_output.weight": (hidden, heads * head_dim),
            f"blk.{i}.ffn_gate.weight": (ffn, hidden), f"blk.{i}.ffn_up.weight": (ffn, hidden),
            f"blk.{i}.ffn_down.weight": (hidden, ffn),
        })
        if bias:
            shapes.update({f"blk.{i}.attn_q.bias": (heads * head_dim,),
                           f"blk.{i}.attn_k.bias": (kv_heads * head_dim,),
                           f"blk.{i}.attn_v.bias": (kv_heads * head_dim,)})
    originals: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        if name in omit:
            continue
        kind = name.split(".")[-2] if name.startswith("blk.") else name.split(".")[0]
        qname = qtypes.get(kind, "F32") if len(shape) == 2 else "F32"
        if len(shape) == 1 and name.endswith("norm.weight"):
            hf = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            hf = (0.05 * rng.standard_normal(shape)).astype(np.float32)
        stored = hf
        if arch == "llama" and kind in ("attn_q", "attn_k"):
            stored = llamacpp_permute(hf, heads if kind == "attn_q" else kv_heads)
        if qname in K_QUANT_BLOCK:
            w.add_tensor(name, random_kquant(shape[0], shape[1], qname, rng), raw_dtype=Q[qname])
            originals[name] = None
            continue
        if qname == "F64":
            w.add_tensor(name, stored.astype(np.float64))
        elif qname in ("F32", "F16"):
            w.add_tensor(name, gguf.quants.quantize(stored, Q[qname]))
        else:
            w.add_tensor(name, gguf.quants.quantize(stored, Q[qname]), raw_dtype=Q[qname])
        originals[name] = hf
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, dtype=np.float32))
    for name, arr in (extra or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return originals


def transformers_state_dict(gguf_path) -> dict[str, np.ndarray]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path),
                                                 dtype=torch.float32)
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def transformers_tokenizer(gguf_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))


# --------------------------------------------------------------------------------------------
# weights


RECIPES = {
    # legacy block quants and float types, untied lm_head
    "legacy": dict(hidden=64, ffn=128, tie=False,
                   qtypes={"token_embd": "Q8_0", "attn_q": "F16", "attn_k": "Q4_0", "attn_v": "Q4_1",
                           "attn_output": "Q5_0", "ffn_gate": "Q5_1", "ffn_up": "BF16", "ffn_down": "F32",
                           "output": "Q8_0"}),
    # K-quants (random blocks: gguf cannot quantize them), tied embeddings
    "kquants": dict(hidden=256, heads=4, kv_heads=2, ffn=256, tie=True,
                    qtypes={"token_embd": "Q6_K", "attn_q": "Q4_K", "attn_k": "Q6_K", "attn_v": "Q5_K",
                            "attn_output": "Q3_K", "ffn_gate": "Q2_K", "ffn_up": "Q6_K", "ffn_down": "Q4_K"}),
    # Qwen2: q/k/v biases, no Q/K permutation
    "qwen2": dict(arch="qwen2", hidden=64, ffn=128, tie=False, bias=True,
                  qtypes={"token_embd": "Q8_0", "attn_q": "Q8_0", "attn_k": "Q4_0", "attn_v": "F16",
                          "ffn_down": "Q4_1"}),
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_weights_match_transformers(tmp_path, recipe):
    kw = dict(RECIPES[recipe])
    src = tmp_path / "src" / "tiny.gguf"
    src.parent.mkdir()
    if kw.get("arch") == "qwen2":
        kw["tokenizer"] = gpt2_tokenizer_meta("qwen2")
    originals = write_gguf(src, **kw)
    out = tmp_path / "out"
    calls = []
    convert_gguf(str(src), str(out), progress=lambda done, total, name: calls.append((done, total)))

    ours = load_file(str(out / "model.safetensors"))
    ref = transformers_state_dict(str(src))
    expected = set(ref) - ({"lm_head.weight"} if kw["tie"] else set())
    assert set(ours) == expected
    for name, arr in ours.items():
        assert arr.dtype == np.float32
        np.testing.assert_array_equal(arr, ref[name], err_msg=name)

    # the undone permutation gives back the Hugging Face layout the file was made from (exact for F32/F16)
    exact = {"F32", "F16"}
    for i in range(2):
        for kind, hf in (("attn_q", "q_proj"), ("attn_k", "k_proj")):
            orig = originals[f"blk.{i}.{kind}.weight"]
            qtype = kw["qtypes"].get(kind, "F32")
            if orig is not None and qtype in exact:
                np.testing.assert_allclose(ours[f"model.layers.{i}.self_attn.{hf}.weight"], orig,
                                           rtol=1e-3, atol=1e-4)
            if kw.get("bias"):
                np.testing.assert_array_equal(ours[f"model.layers.{i}.self_attn.{hf}.bias"],
                                              originals[f"blk.{i}.{kind}.bias"])

    cfg = json.loads((out / "config.json").read_text())
    mc = ModelConfig.from_hf(cfg)
    assert mc.num_hidden_layers == 2 and mc.hidden_size == kw["hidden"]
    assert mc.num_attention_heads == kw.get("heads", 4) and mc.num_key_value_heads == kw.get("kv_heads", 2)
    assert mc.tie_word_embeddings == kw["tie"]
    assert mc.attention_bias == kw.get("bias", False)
    assert mc.max_position_embeddings == 256 and mc.rope_theta == 10000.0
    assert cfg["torch_dtype"] == "float32"
    total = sum(a.nbytes for a in ours.values())
    assert calls[0] == (0, total) and calls[-1] == (total, total)


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q8_0"])
def test_dequantization_matches_independent_implementation(tmp_path, qtype):
    """transformers' GGUF model loader dequantizes with gguf itself; its torch dequant kernels are
    an independent implementation to check the numbers against."""
    try:
        from transformers.integrations.gguf.dequant import dequantize as hf_dequantize
    except ImportError:
        pytest.skip("this transformers has no torch GGUF dequantization")
    src = tmp_path / "t.gguf"
    qtypes = {k: qtype for k in ("token_embd", "attn_q", "attn_k", "attn_v", "attn_output",
                                 "ffn_gate", "ffn_up", "ffn_down")}
    write_gguf(src, hidden=256, ffn=256, qtypes=qtypes)
    convert_gguf(str(src), str(tmp_path / "out"))
    ours = load_file(str(tmp_path / "out" / "model.safetensors"))
    reader = gguf.GGUFReader(str(src))
    t = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    ref = hf_dequantize(torch.from_numpy(np.array(t.data).reshape(-1)), int(t.tensor_type), torch.float32)
    np.testing.assert_allclose(ours["model.layers.1.mlp.down_proj.weight"].reshape(-1), ref.numpy(),
                               rtol=1e-6, atol=1e-7)


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    from lamina.models.gguf import _llama3_rope_factors

    theta, head_dim = 500000.0, 16
    freqs = _llama3_rope_factors(8.0, 1.0, 4.0, 8192, theta, head_dim)
    assert 1.0 < freqs.max() and freqs.min() == 1.0
    src = tmp_path / "t.gguf"
    write_gguf(src, rope_freqs=freqs, rope_theta=theta)
    convert_gguf(str(src), str(tmp_path / "out"))
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert ModelConfig.from_hf(cfg).rope_scaling["rope_type"] == "llama3"
    assert "rope_freqs.weight" not in load_file(str(tmp_path / "out" / "model.safetensors"))


# --------------------------------------------------------------------------------------------
# tokenizer


def _check_tokenizer(src, out):
    ref = transformers_tokenizer(str(src))
    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    for text in TEXTS:
        assert ours.encode(text, add_special_tokens=False).ids == ref.encode(text, add_special_tokens=False), text
        ids = ours.encode(text).ids
        assert ids == ref.encode(text), text
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids), text
    assert cfg["bos_token"] == ref.bos_token and cfg["eos_token"] == ref.eos_token
    return ours, cfg


@pytest.mark.parametrize("pre", ["default", "smollm", "llama-bpe", "qwen2"])
def test_byte_level_tokenizer_matches_transformers(tmp_path, pre):
    src = tmp_path / "t.gguf"
    add_bos = pre == "llama-bpe"
    write_gguf(src, tokenizer=gpt2_tokenizer_meta(pre, add_bos=add_bos), chat_template="{{ 'tmpl' }}")
    convert_gguf(str(src), str(tmp_path / "out"))
    ours, cfg = _check_tokenizer(src, tmp_path / "out")
    for text in TEXTS:  # byte-level BPE round-trips any text
        assert ours.decode(ours.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text
    assert cfg["chat_template"] == "{{ 'tmpl' }}"
    assert cfg["add_bos_token"] is add_bos and cfg["add_eos_token"] is False
    assert cfg["model_max_length"] == 256
    assert (ours.encode("hi").ids[0] == ours.token_to_id("<|im_start|>")) is add_bos
    # special tokens stay whole and are special
    ids = ours.encode("<|im_start|>", add_special_tokens=False).ids
    assert ids == [ours.token_to_id("<|im_start|>")]
    assert ours.decode(ids, skip_special_tokens=True) == ""
    pieces = [p for p, _ in ours.pre_tokenizer.pre_tokenize_str("abc 12345")]
    if pre == "smollm":
        assert pieces[-5:] == ["1", "2", "3", "4", "5"]
    elif pre == "llama-bpe":
        assert pieces[-2:] == ["123", "45"]
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert gen["bos_token_id"] == ours.token_to_id("<|im_start|>")
    assert gen["eos_token_id"] == ours.token_to_id("<|im_end|>")


def test_sentencepiece_tokenizer_matches_transformers(tmp_path):
    src = tmp_path / "t.gguf"
    write_gguf(src, tokenizer=llama_tokenizer_meta())
    convert_gguf(str(src), str(tmp_path / "out"))
    ours, cfg = _check_tokenizer(src, tmp_path / "out")
    assert cfg["add_bos_token"] is True
    assert ours.encode("Hello").ids[0] == 1
    # characters outside the vocabulary fall back to byte tokens and decode back
    ids = ours.encode("中文 🎉", add_special_tokens=False).ids
    assert ours.token_to_id("<0xF0>") in ids and ours.token_to_id("<0xE4>") in ids
    assert ours.decode(ids) == "中文 🎉"
    assert ours.encode("a <tool> b", add_special_tokens=False).tokens.count("<tool>") == 1


def test_sentencepiece_merges_equal_transformers_recovery():
    """Merges recovered from scores, in the order transformers' GGUF tokenizer derives them
    (the order decides ties between equally scored merges)."""
    try:
        from transformers.tokenization_utils_base import generate_merges
    except ImportError:
        pytest.skip("this transformers has no generate_merges")
    from lamina.models.gguf import _sentencepiece_merges

    tokens, scores, _ = sentencepiece_vocab()
    vocab = {t: i for i, t in enumerate(tokens)}
    assert _sentencepiece_merges(tokens, scores) == generate_merges(vocab, dict(zip(tokens, scores)))


def test_unknown_pre_tokenizer_is_rejected(tmp_path):
    src = tmp_path / "t.gguf"
    meta = gpt2_tokenizer_meta("smollm")
    write_gguf(src, tokenizer=dict(meta, pre="no-such-pre"))
    with pytest.raises(ModelLoadError, match="no-such-pre"):
        convert_gguf(str(src), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


# --------------------------------------------------------------------------------------------
# errors


def _assert_nothing_written(out):
    assert not out.exists() or os.listdir(out) == []


def test_unknown_architecture(tmp_path):
    src = tmp_path / "t.gguf"
    write_gguf(src, arch="falcon")
    with pytest.raises(ModelLoadError, match="architecture 'falcon'"):
        convert_gguf(str(src), str(tmp_path / "out"))
    _assert_nothing_written(tmp_path / "out")


def test_unsupported_tensor_type(tmp_path):
    src = tmp_path / "t.gguf"
    write_gguf(src, qtypes={"ffn_up": "F64"})
    with pytest.raises(ModelLoadError, match=r"unsupported GGUF tensor type .*blk\.0\.ffn_up\.weight \(F64\)"):
        convert_gguf(str(src), str(tmp_path / "out"))
    _assert_nothing_written(tmp_path / "out")


def test_missing_tensor(tmp_path):
    src = tmp_path / "t.gguf"
    write_gguf(src, omit={"blk.1.ffn_up.weight", "output_norm.weight"})
    with pytest.raises(ModelLoadError, match=r"lacks 2 tensor\(s\).*blk\.1\.ffn_up\.weight"):
        convert_gguf(str(src), str(tmp_path / "out"))
    _assert_nothing_written(tmp_path / "out")


def test_unknown_tensor(tmp_path):
    src = tmp_path / "t.gguf"
    write_gguf(src, extra={"blk.0.ffn_gate_exps.weight": np.zeros((4, 8), np.float32)})
    with pytest.raises(ModelLoadError, match=r"blk\.0\.ffn_gate_exps\.weight"):
        convert_gguf(str(src), str(tmp_path / "out"))


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"definitely not a gguf file" * 10)
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        convert_gguf(str(bad), str(tmp_path / "out"))
    with pytest.raises(ModelLoadError, match="not found"):
        convert_gguf(str(tmp_path / "missing.gguf"), str(tmp_path / "out"))


# --------------------------------------------------------------------------------------------
# durability


def test_outputs_are_fsynced_before_their_rename(tmp_path, monkeypatch):
    """Each output reaches the disk under its .partial name before the rename that publishes it,
    and the directory is fsynced after the renames, so a crash never leaves a renamed but empty
    or truncated file."""
    src = tmp_path / "t.gguf"
    write_gguf(src)
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(os.readlink(f"/proc/self/fd/{fd}"))))
        return real_fsync(fd)

    def replace(a, b):
        real_replace(a, b)
        events.append(("replace", os.path.realpath(a), os.path.realpath(b)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "out"
    convert_gguf(str(src), str(out))
    replaces = [e for e in events if e[0] == "replace"]
    assert sorted(os.path.basename(e[2]) for e in replaces) == sorted(os.listdir(out))
    for e in replaces:
        assert ("fsync", e[1]) in events[:events.index(e)], e
    last = max(events.index(e) for e in replaces)
    assert ("fsync", os.path.realpath(out)) in events[last + 1:]
