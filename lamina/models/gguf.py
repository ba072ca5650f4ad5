"""GGUF file -> Hugging Face-layout directory (config.json, model.safetensors, tokenizer.json, ...).

llama.cpp's GGUF files carry the weights (often quantized), the model's hyper-parameters and its
tokenizer as metadata. lamina runs Hugging Face directories, so a GGUF is converted once:

* weights are dequantized to float32 and renamed to Hugging Face names, one tensor at a time, into
  a streamed ``model.safetensors`` (two full copies of the weights never coexist);
* llama.cpp's converter reorders the rows of Llama ``attn_q`` / ``attn_k`` (per head, the two
  rotary halves are interleaved for its RoPE kernel); that reordering is undone here;
* ``tokenizer.json`` is rebuilt from the vocabulary / merges / token types with the ``tokenizers``
  library, ``tokenizer_config.json`` carries the chat template and special tokens.

Everything that can be checked (architecture, tensor types, missing tensors, tokenizer kind) is
checked before anything is written, and the files appear under their final names only at the end,
each fsynced before its rename.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from lamina.config import ModelLoadError

# progress(done_bytes, total_bytes, tensor_name): called once before the first tensor (0, total, "")
# and after every tensor written; bytes are bytes of the float32 output.
ProgressFn = Callable[[int, int, str], None]

# GGUF general.architecture -> Hugging Face architecture
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
_MODEL_TYPES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}

# Tensor types lamina dequantizes (via gguf.quants.dequantize).
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                          "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_REQUIRED_LAYER_TENSORS = ("attn_norm.weight", "ffn_norm.weight", "attn_q.weight", "attn_k.weight",
                           "attn_v.weight", "attn_output.weight", "ffn_gate.weight", "ffn_up.weight",
                           "ffn_down.weight")
# Present in some files, not weights of the Hugging Face model (rope_freqs is read into rope_scaling).
_IGNORED_TENSORS = ("rope_freqs.weight",)
_IGNORED_LAYER_TENSORS = ("attn_rot_embd.weight",)

# llama.cpp token types (tokenizer.ggml.token_type)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer split patterns (tokenizer.ggml.pre). GPT-2's own pattern is ByteLevel(use_regex=True).
_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                   r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_TOKENIZERS = {
    "default": "gpt2", "gpt-2": "gpt2", "gpt2": "gpt2",
    "smollm": "smollm",
    "llama3": "llama3", "llama-v3": "llama3", "llama-bpe": "llama3", "smaug-bpe": "llama3",
    "falcon3": "llama3",
    "qwen2": "qwen2", "deepseek-r1-qwen": "qwen2",
}


# --------------------------------------------------------------------------------------------
# metadata


def _field_value(field) -> Any:
    """A GGUFReader field as a Python value (str, int, float, bool or a list of those)."""
    from gguf import GGUFValueType

    types = list(field.types)
    if not types:
        return None

    def scalar(part, vtype):
        if vtype == GGUFValueType.STRING:
            raw = bytes(part)
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                return raw.decode("utf-8", errors="replace")
        value = part[0].item()
        return bool(value) if vtype == GGUFValueType.BOOL else value

    if types[0] == GGUFValueType.ARRAY:
        if len(types) < 2 or types[1] == GGUFValueType.ARRAY:
            return None  # nested arrays: nothing lamina reads
        sub = types[1]
        if sub == GGUFValueType.STRING:
            return [scalar(field.parts[i], sub) for i in field.data]
        if not field.data:
            return []
        values = np.concatenate([np.asarray(field.parts[i]).reshape(-1) for i in field.data]).tolist()
        return [bool(v) for v in values] if sub == GGUFValueType.BOOL else values
    return scalar(field.parts[field.data[0]], types[0])


def read_metadata(reader) -> dict[str, Any]:
    """All key/value metadata of an open GGUFReader."""
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        meta[key] = _field_value(field)
    return meta


def _open(gguf_path: str):
    import gguf

    if not os.path.isfile(gguf_path):
        raise ModelLoadError(f"GGUF file not found: {gguf_path}")
    try:
        reader = gguf.GGUFReader(gguf_path)
    except Exception as e:  # bad magic, truncated file, unknown version ...
        raise ModelLoadError(f"{gguf_path} is not a readable GGUF file: {e}") from None
    if getattr(reader, "byte_order", "I") != "I":
        raise ModelLoadError(f"{gguf_path} is a big-endian GGUF file; lamina reads little-endian GGUF only")
    return reader


# --------------------------------------------------------------------------------------------
# config


def _uniform(value, key: str):
    if isinstance(value, list):
        if not value or any(v != value[0] for v in value):
            raise ModelLoadError(f"GGUF metadata {key} varies per layer ({value[:8]}...); lamina needs one value")
        return value[0]
    return value


def _llama3_rope_factors(factor: float, low: float, high: float, original: int, theta: float,
                         head_dim: int) -> np.ndarray:
    """The per-frequency divisors llama.cpp stores as rope_freqs.weight for Llama 3.1-style RoPE."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = original / low, original / high
    smooth = (original / wavelen - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < high_wavelen, 1.0, np.where(wavelen > low_wavelen, factor, mid))


def _rope_scaling_from_freqs(freqs: np.ndarray, theta: float, head_dim: int) -> dict:
    factor = float(freqs.max())
    for original in (8192, 4096, 2048, 16384, 32768, 131072):
        for low, high in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0), (2.0, 4.0)):
            expected = _llama3_rope_factors(factor, low, high, original, theta, head_dim)
            if expected.shape == freqs.shape and np.allclose(expected, freqs, rtol=1e-4, atol=1e-6):
                return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                        "high_freq_factor": high, "original_max_position_embeddings": original}
    raise ModelLoadError("rope_freqs.weight holds frequency factors that do not match Llama 3-style "
                         "rope scaling; lamina cannot map them to a rope_scaling config")


def _build_config(meta: dict, arch: str, tensors: dict, dequant: Callable) -> dict:
    hf_arch = ARCHITECTURES[arch]

    def get(key, default=None, required=False):
        full = f"{arch}.{key}"
        if full not in meta:
            if required:
                raise ModelLoadError(f"GGUF metadata lacks {full!r}")
            return default
        return _uniform(meta[full], full)

    embd = tensors["token_embd.weight"]
    hidden = int(get("embedding_length", required=True))
    heads = int(get("attention.head_count", required=True))
    kv_heads = int(get("attention.head_count_kv", heads) or heads)
    n_layers = int(get("block_count", required=True))
    ffn = get("feed_forward_length")
    if ffn is None:
        ffn = int(tensors["blk.0.ffn_gate.weight"].shape[1])
    q_rows = int(tensors["blk.0.attn_q.weight"].shape[1])
    head_dim = get("attention.key_length")
    if head_dim is None:
        head_dim = q_rows // heads
    head_dim = int(head_dim)
    theta = float(get("rope.freq_base", 10000.0))

    cfg: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": _MODEL_TYPES[hf_arch],
        "vocab_size": int(embd.shape[1]),
        "hidden_size": hidden,
        "intermediate_size": int(ffn),
        "num_hidden_layers": n_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": int(get("context_length", 2048)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": theta,
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in tensors,
        "torch_dtype": "float32",
    }
    if head_dim != hidden // heads:
        cfg["head_dim"] = head_dim
    if int(embd.shape[0]) != hidden:
        raise ModelLoadError(f"token_embd.weight has width {int(embd.shape[0])}, metadata says {hidden}")
    rot = get("rope.dimension_count")
    if rot is not None and int(rot) != head_dim:
        raise ModelLoadError(f"partial rotary embeddings (rope.dimension_count={rot}, head_dim={head_dim}) "
                             "are not supported")

    has_bias = "blk.0.attn_q.bias" in tensors
    if hf_arch == "LlamaForCausalLM":
        cfg["attention_bias"] = has_bias
        cfg["mlp_bias"] = False
    elif not has_bias:
        cfg["attention_bias"] = False

    # rope scaling: explicit metadata, or llama.cpp's precomputed Llama 3 frequency factors
    kind = get("rope.scaling.type")
    factor = get("rope.scaling.factor")
    if kind is None and get("rope.scale_linear") is not None:
        kind, factor = "linear", get("rope.scale_linear")
    if kind not in (None, "none"):
        if kind != "linear":
            raise ModelLoadError(f"unsupported rope scaling type {kind!r} in GGUF metadata (supported: linear)")
        if factor is not None and float(factor) != 1.0:
            cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(factor)}
    elif "rope_freqs.weight" in tensors:
        freqs = dequant("rope_freqs.weight").reshape(-1).astype(np.float64)
        if not np.allclose(freqs, 1.0):
            cfg["rope_scaling"] = _rope_scaling_from_freqs(freqs, theta, head_dim)

    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    if bos is not None:
        cfg["bos_token_id"] = int(bos)
    eos_ids = _eos_ids(meta)
    if eos_ids:
        cfg["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    elif eos is not None:
        cfg["eos_token_id"] = int(eos)
    pad = meta.get("tokenizer.ggml.padding_token_id")
    if pad is not None:
        cfg["pad_token_id"] = int(pad)
    return cfg


def _eos_ids(meta: dict) -> list[int]:
    """eos first, then the end-of-turn / end-of-message ids llama.cpp also stops on."""
    ids: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        v = meta.get(key)
        if v is not None and int(v) not in ids and int(v) >= 0:
            ids.append(int(v))
    return ids


# --------------------------------------------------------------------------------------------
# tensors


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order. Per head, llama.cpp stores the rows of the first rotary half
    and the second half interleaved (r0, r_half, r1, r_half+1, ...); Hugging Face keeps the halves
    apart (r0, r1, ..., r_half, ...). Works on a weight [rows, cols] and on a bias [rows]."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ModelLoadError(f"cannot undo the Q/K permutation: {rows} rows do not split into {n_head} heads")
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass
class _Plan:
    hf_name: str
    gguf_name: str | None       # None: synthesized (zeros)
    shape: tuple[int, ...]      # Hugging Face order
    unpermute_heads: int = 0    # >0: undo llama.cpp's Q/K permutation with this many heads


def _plan_tensors(arch: str, tensors: dict, cfg: dict) -> list[_Plan]:
    import gguf

    n_layers = cfg["num_hidden_layers"]
    supported = {getattr(gguf.GGMLQuantizationType, n) for n in SUPPORTED_TENSOR_TYPES
                 if hasattr(gguf.GGMLQuantizationType, n)}
    bad = [f"{name} ({t.tensor_type.name})" for name, t in tensors.items() if t.tensor_type not in supported]
    if bad:
        raise ModelLoadError(f"unsupported GGUF tensor type in {', '.join(bad[:6])}"
                             + (" ..." if len(bad) > 6 else "")
                             + f"; lamina dequantizes {', '.join(SUPPORTED_TENSOR_TYPES)}")

    missing = [n for n in ("token_embd.weight", "output_norm.weight") if n not in tensors]
    for i in range(n_layers):
        missing += [f"blk.{i}.{n}" for n in _REQUIRED_LAYER_TENSORS if f"blk.{i}.{n}" not in tensors]
    has_bias = cfg.get("attention_bias", "blk.0.attn_q.bias" in tensors)
    if has_bias:
        for i in range(n_layers):
            missing += [f"blk.{i}.{n}" for n in ("attn_q.bias", "attn_k.bias", "attn_v.bias")
                        if f"blk.{i}.{n}" not in tensors]
    if missing:
        raise ModelLoadError(f"GGUF file lacks {len(missing)} tensor(s): {', '.join(missing[:8])}"
                             + (" ..." if len(missing) > 8 else ""))

    plans: list[_Plan] = []
    used: set[str] = set()

    def add(gguf_name: str, hf_name: str, heads: int = 0):
        t = tensors[gguf_name]
        shape = tuple(int(d) for d in reversed(list(t.shape)))
        plans.append(_Plan(hf_name, gguf_name, shape, heads))
        used.add(gguf_name)

    permute = arch == "llama"
    add("token_embd.weight", "model.embed_tokens.weight")
    for i in range(n_layers):
        for suffix, hf in _LAYER_TENSORS.items():
            name = f"blk.{i}.{suffix}"
            if name not in tensors:
                continue
            heads = 0
            if permute and suffix.startswith("attn_q."):
                heads = cfg["num_attention_heads"]
            elif permute and suffix.startswith("attn_k."):
                heads = cfg["num_key_value_heads"]
            add(name, f"model.layers.{i}.{hf}", heads)
        if (has_bias and cfg["architectures"][0] == "LlamaForCausalLM"
                and f"blk.{i}.attn_output.bias" not in tensors):
            # Hugging Face Llama's attention_bias covers o_proj too; llama.cpp files may omit it.
            plans.append(_Plan(f"model.layers.{i}.self_attn.o_proj.bias", None, (cfg["hidden_size"],)))
    add("output_norm.weight", "model.norm.weight")
    if "output.weight" in tensors:
        add("output.weight", "lm_head.weight")

    unknown = [n for n in tensors if n not in used and n not in _IGNORED_TENSORS
               and not any(n.startswith("blk.") and n.endswith("." + s) for s in _IGNORED_LAYER_TENSORS)]
    if unknown:
        raise ModelLoadError(f"GGUF file has tensors lamina does not know how to map: {', '.join(unknown[:8])}"
                             + (" ..." if len(unknown) > 8 else "")
                             + f" (architecture {arch!r})")
    return plans


def _dequantize(t) -> np.ndarray:
    from gguf.quants import dequantize

    try:
        arr = dequantize(np.asarray(t.data), t.tensor_type)
    except NotImplementedError as e:
        raise ModelLoadError(f"cannot dequantize {t.name} ({t.tensor_type.name}): {e}") from None
    return np.asarray(arr, dtype=np.float32).reshape(tuple(int(d) for d in reversed(list(t.shape))))


def _write_safetensors(path: str, plans: list[_Plan], produce: Callable[[_Plan], np.ndarray],
                       progress: ProgressFn | None) -> None:
    """Stream float32 tensors into a safetensors file: the header is computed from the shapes up
    front, then each tensor is produced, written and dropped."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for p in plans:
        nbytes = 4 * math.prod(p.shape)
        header[p.hf_name] = {"dtype": "F32", "shape": list(p.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    total = offset
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    done = 0
    if progress:
        progress(0, total, "")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for p in plans:
            arr = produce(p)
            if tuple(arr.shape) != p.shape:
                raise ModelLoadError(f"{p.gguf_name}: got shape {tuple(arr.shape)}, expected {p.shape}")
            arr = np.ascontiguousarray(arr, dtype="<f4")
            f.write(memoryview(arr).cast("B"))
            done += arr.nbytes
            del arr
            if progress:
                progress(done, total, p.hf_name)
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------------------------
# tokenizer


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _sentencepiece_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Recover BPE merges from a SentencePiece vocabulary: every token that splits into two vocabulary
    tokens gives a merge, ranked by the merged token's score (best first), longer left part first on
    ties; within one token, splits are ordered by the ids of their parts."""
    vocab = {t: i for i, t in enumerate(tokens)}
    score = {t: s for t, s in zip(tokens, scores)}
    ranked: list[tuple[float, int, int, str, str]] = []
    for token, s in score.items():
        local = []
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                local.append((vocab[left], vocab[right], left, right))
        local.sort()
        ranked.extend((s, len(left), len(right), left, right) for _, _, left, right in local)
    # stable sort, descending on (score, len(left), len(right))
    ranked.sort(key=lambda m: (m[0], m[1], m[2]), reverse=True)
    return [(m[3], m[4]) for m in ranked]


def _special_token(meta: dict, tokens: list[str], key: str) -> str | None:
    idx = meta.get(f"tokenizer.ggml.{key}")
    if idx is None or not 0 <= int(idx) < len(tokens):
        return None
    return tokens[int(idx)]


def build_tokenizer(meta: dict):
    """(tokenizers.Tokenizer, tokenizer_config dict) from GGUF metadata."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind is None or not tokens:
        raise ModelLoadError("GGUF file carries no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens)")
    types = meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)

    if kind == "gpt2":
        alphabet = _byte_alphabet()
        spelled = set(alphabet.values())
        # Tokens are stored in the byte alphabet; respell any that are not (some converters store raw text).
        vocab_tokens = [t if set(t) <= spelled else "".join(alphabet[b] for b in t.encode("utf-8"))
                        for t in tokens]
        vocab = {t: i for i, t in enumerate(vocab_tokens)}
        merges = [tuple(m.split(" ", 1)) for m in (meta.get("tokenizer.ggml.merges") or [])]
        pre_name = meta.get("tokenizer.ggml.pre") or "default"
        pre = _PRE_TOKENIZERS.get(pre_name)
        if pre is None:
            raise ModelLoadError(f"unsupported tokenizer pre-tokenizer {pre_name!r} (tokenizer.ggml.pre); "
                                 f"lamina knows {', '.join(sorted(_PRE_TOKENIZERS))}")
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, fuse_unk=False,
                                   byte_fallback=False, ignore_merges=(pre == "llama3")))
        if pre == "gpt2":
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        elif pre == "smollm":
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        else:
            pattern = _LLAMA3_PATTERN if pre == "llama3" else _QWEN2_PATTERN
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        add_bos_default = False
        add_prefix_space = False
        token_is_spelled = lambda t: set(t) <= spelled  # noqa: E731
    elif kind == "llama":
        scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        vocab = {t: i for i, t in enumerate(tokens)}
        if meta.get("tokenizer.ggml.merges"):
            merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
        else:
            merges = _sentencepiece_merges(tokens, scores)
        unk = _special_token(meta, tokens, "unknown_token_id")
        if unk is None and "<unk>" in vocab:
            unk = "<unk>"
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                                   byte_fallback=True, dropout=None))
        add_prefix_space = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        tok.normalizer = None
        tok.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="\u2581", prepend_scheme="first" if add_prefix_space else "never", split=False)
        steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        if add_prefix_space:
            steps.append(decoders.Strip(content=" ", left=1, right=0))
        tok.decoder = decoders.Sequence(steps)
        add_bos_default = True
        token_is_spelled = lambda t: True  # noqa: E731
    else:
        raise ModelLoadError(f"unsupported tokenizer model {kind!r} (tokenizer.ggml.model); "
                             "lamina builds 'gpt2' (byte-level BPE) and 'llama' (SentencePiece BPE) tokenizers")

    # Control / unknown tokens are special; user-defined ones are matched whole but are not special.
    special, user = [], []
    for t, ty in zip(tokens, types):
        if ty in (_CONTROL, _UNKNOWN) and token_is_spelled(t):
            special.append(AddedToken(t, special=True, normalized=False))
        elif ty == _USER_DEFINED and t in vocab:
            user.append(AddedToken(t, special=False, normalized=False))
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)

    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    bos = _special_token(meta, tokens, "bos_token_id")
    eos = _special_token(meta, tokens, "eos_token_id")
    if (add_bos and bos is not None) or (add_eos and eos is not None):
        first = [bos] if add_bos and bos is not None else []
        last = [eos] if add_eos and eos is not None else []
        single = " ".join(first + ["$A:0"] + last)
        pair = " ".join(first + ["$A:0"] + last + first + ["$B:1"] + last)
        used = {t: vocab[t] for t in first + last}
        tok.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                           special_tokens=list(used.items()))
    elif kind == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    ctx = None
    arch = meta.get("general.architecture")
    if arch is not None:
        ctx = meta.get(f"{arch}.context_length")
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": _special_token(meta, tokens, "unknown_token_id"),
        "pad_token": _special_token(meta, tokens, "padding_token_id"),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "add_prefix_space": add_prefix_space,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(ctx) if ctx is not None else 2048,
    }
    template = meta.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return tok, config


# --------------------------------------------------------------------------------------------
# entry point


def convert_gguf(gguf_path: str, out_dir: str, progress: ProgressFn | None = None) -> None:
    """Convert a GGUF file into a Hugging Face-layout directory at out_dir (created if needed).

    Writes config.json, generation_config.json, model.safetensors (float32), tokenizer.json and
    tokenizer_config.json. Raises ModelLoadError naming what is unsupported or missing; in that
    case nothing is written. progress(done_bytes, total_bytes, tensor_name) follows the weights.
    Each file is written as <name>.partial, fsynced, then renamed; out_dir is fsynced at the end.
    """
    from lamina.registry import fsync_dir, fsync_file

    reader = _open(gguf_path)
    meta = read_metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelLoadError(f"unsupported GGUF architecture {arch!r}; lamina converts "
                             f"{', '.join(sorted(ARCHITECTURES))}")
    tensors = {t.name: t for t in reader.tensors}
    for name in ("token_embd.weight", "blk.0.attn_q.weight"):
        if name not in tensors:
            raise ModelLoadError(f"GGUF file lacks tensor {name}")

    def dequant(name: str) -> np.ndarray:
        return _dequantize(tensors[name])

    cfg = _build_config(meta, arch, tensors, dequant)
    plans = _plan_tensors(arch, tensors, cfg)
    tokenizer, tok_config = build_tokenizer(meta)
    gen_cfg = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg}

    def produce(p: _Plan) -> np.ndarray:
        if p.gguf_name is None:
            return np.zeros(p.shape, dtype=np.float32)
        arr = dequant(p.gguf_name)
        if p.unpermute_heads:
            arr = _unpermute_rows(arr, p.unpermute_heads)
        return arr

    os.makedirs(out_dir, exist_ok=True)
    outputs = ["model.safetensors", "config.json", "generation_config.json",
               "tokenizer.json", "tokenizer_config.json"]
    partial = {name: os.path.join(out_dir, name + ".partial") for name in outputs}
    try:
        _write_safetensors(partial["model.safetensors"], plans, produce, progress)
        for name, obj in (("config.json", cfg), ("generation_config.json", gen_cfg),
                          ("tokenizer_config.json", tok_config)):
            with open(partial[name], "w", encoding="utf-8") as f:
                json.dump(obj, f, indent=2, ensure_ascii=False)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
        tokenizer.save(partial["tokenizer.json"])
        fsync_file(partial["tokenizer.json"])
        # every file is on disk under its .partial name before a rename publishes it, and the
        # directory after, so a crash never leaves an empty or truncated file under a final name
        for name in outputs:
            os.replace(partial[name], os.path.join(out_dir, name))
        fsync_dir(out_dir)
    finally:
        for path in partial.values():
            if os.path.exists(path):
                os.unlink(path)
