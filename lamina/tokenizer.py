"""Tokenizer (Hugging Face `tokenizers`), chat template (sandboxed jinja2) and streaming detokenization."""
from __future__ import annotations

import json
import os
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from lamina.config import ModelLoadError


class ChatTemplateError(ValueError):
    """The chat template rejected the conversation (raise_exception) or failed to render."""


def _token_content(tok) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable stand-ins for all 256 bytes, inverted."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def join_text_parts(content) -> str:
    """Message content may be a string or a list of parts; text parts are joined with newlines
    (as vLLM does). Anything that is not text is refused rather than silently dropped."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if isinstance(part, str):
                texts.append(part)
                continue
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"content part {i} has type {kind!r}; only text parts are supported")
            texts.append(part["text"])
        return "\n".join(texts)
    raise ValueError("message content must be a string or a list of text parts")


class Tokenizer:
    def __init__(self, model_dir: str):
        path = os.path.join(model_dir, "tokenizer.json")
        if not os.path.exists(path):
            raise ModelLoadError(f"no tokenizer.json in {model_dir}")
        self._tok = HFTokenizer.from_file(path)
        cfg = {}
        cfg_path = os.path.join(model_dir, "tokenizer_config.json")
        if os.path.exists(cfg_path):
            with open(cfg_path) as f:
                cfg = json.load(f)
        self.chat_template = self._find_chat_template(model_dir, cfg)
        self.bos_token = _token_content(cfg.get("bos_token"))
        self.eos_token = _token_content(cfg.get("eos_token"))
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.special_ids = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        spec = json.loads(self._tok.to_str())
        self._byte_level = "ByteLevel" in json.dumps(spec.get("decoder") or {})
        # SentencePiece-style byte fallback: <0xNN> pieces. The decoder turns a whole run of them into
        # text at once (and all of it into U+FFFD if the run is not valid UTF-8), so a run's text is
        # only final once a non-byte token follows it.
        self.byte_fallback_ids = frozenset()
        if (spec.get("model") or {}).get("byte_fallback"):
            self.byte_fallback_ids = frozenset(
                i for piece, i in self._tok.get_vocab().items()
                if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"))
        self._template = None

    @staticmethod
    def _find_chat_template(model_dir: str, cfg: dict) -> str | None:
        jinja_path = os.path.join(model_dir, "chat_template.jinja")
        if os.path.exists(jinja_path):
            with open(jinja_path) as f:
                return f.read()
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: use "default"
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        return template

    # -- encoding ------------------------------------------------------------------------------
    # The *_batch calls release the GIL while they work, where encode/decode hold it throughout: a
    # megabytes-long prompt tokenized on a server's worker thread would freeze its event loop.
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode_batch([list(ids)], skip_special_tokens=skip_special_tokens)[0]

    def vocab(self) -> dict[str, int]:
        """Every token's string and id, added tokens included."""
        return self._tok.get_vocab(with_added_tokens=True)

    def to_json(self) -> str:
        """The whole tokenizer as tokenizer.json text (what the grammar engine reads)."""
        return self._tok.to_str()

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for (what OpenAI's logprobs report as `bytes`)."""
        piece = self._tok.id_to_token(token_id) or ""
        if token_id in self.special_ids:
            return piece.encode()
        if self._byte_level:
            table = _byte_decoder()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
            return piece.encode()
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode()

    def token_text(self, token_id: int) -> str:
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    # -- chat ----------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **kwargs) -> str:
        """Render a conversation exactly as transformers' apply_chat_template does."""
        if not self.chat_template:
            raise ChatTemplateError("this model has no chat template; use a completion prompt instead")
        if self._template is None:
            self._template = _jinja_env().from_string(self.chat_template)
        msgs = []
        for m in messages:
            m = dict(m)
            if "content" in m and not (m["content"] is None and m.get("tool_calls")):
                m["content"] = join_text_parts(m["content"])
            msgs.append(m)
        try:
            return self._template.render(messages=msgs, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                                         **kwargs)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template failed: {e}") from None


def _raise_exception(message):
    raise jinja2.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=1)
def _jinja_env() -> ImmutableSandboxedEnvironment:
    # the same environment settings transformers uses, so templates render to the same string
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Each step decodes a short window of recent tokens twice (without and with the new ones) and
    emits the difference, so the cost per token stays constant. A delta is held back while the
    window ends in U+FFFD (a multi-byte character whose remaining bytes are still to come) or in a
    byte-fallback token (whose run may still grow).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: decoded only as context
        self.read_offset = 0    # tokens before this have been emitted as text
        self.text = ""

    def add(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        if self._ends_in_byte_run():
            return ""
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self.prefix_offset:self.read_offset], self.skip_special_tokens)
        new_text = decode(self.ids[self.prefix_offset:], self.skip_special_tokens)
        if new_text.endswith("\ufffd") or len(new_text) <= len(prefix_text):
            return ""
        delta = new_text[len(prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta

    def _ends_in_byte_run(self) -> bool:
        byte_ids = self.tokenizer.byte_fallback_ids
        if not byte_ids:
            return False
        skipped = self.tokenizer.special_ids if self.skip_special_tokens else ()
        for i in reversed(self.ids):
            if i not in skipped:   # skipped special tokens vanish before decoding: look past them
                return i in byte_ids
        return False

    def flush(self) -> str:
        """At the end of the sequence: emit whatever was held back (even a lone U+FFFD)."""
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self.prefix_offset:self.read_offset], self.skip_special_tokens)
        new_text = decode(self.ids[self.prefix_offset:], self.skip_special_tokens)
        delta = new_text[len(prefix_text):] if len(new_text) > len(prefix_text) else ""
        self.prefix_offset = self.read_offset = len(self.ids)
        self.text += delta
        return delta
