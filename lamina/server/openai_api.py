"""OpenAI request bodies -> validated requests with SamplingParams; engine outputs -> OpenAI shapes.

Validation follows what OpenAI's API and its official client do: unknown fields are ignored, `null` means "default",
wrong types or values are a 400 naming the parameter, and fields whose meaning would be lost if
ignored (image/audio parts, suffix, best_of) are a clear 400.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

from lamina.engine.errors import RequestError
from lamina.sampling_params import SamplingParams, StructuredOutputs, TokenLogprob
from lamina.server import tools
from lamina.server.errors import APIError, bad_request

SYSTEM_FINGERPRINT = "lamina"
LOGPROB_FLOOR = -9999.0  # JSON has no -inf; vLLM uses the same stand-in
_ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass
class GenerationRequest:
    kind: str                                 # "chat" | "completion"
    model: str                                # the served name to report back
    params: SamplingParams                    # max_tokens None: the rest of the context
    stream: bool = False
    include_usage: bool = False
    messages: list[dict] = field(default_factory=list)      # chat, roles normalised, content joined
    prompts: list[str | list[int]] = field(default_factory=list)  # completions: text or token ids
    echo: bool = False
    logprobs: int | None = None               # None: off; else top-k alternatives to report
    tool_use: tools.ToolUse | None = None     # chat: the tools offered, and how calls are chosen
    grammar_param: str | None = None          # the field the output's grammar came from, for its errors


# -- JSON and typed fields ------------------------------------------------------------------------
def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def load_json(body: bytes) -> dict:
    try:
        obj = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise bad_request("We could not parse the JSON body of your request. The body must be a JSON "
                          "object (Content-Type: application/json).", code=None) from None
    if not isinstance(obj, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_type")
    return obj


def _type_name(v) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)


def _typed(body: dict, name: str, types: tuple, what: str, param: str | None = None):
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
        raise bad_request(f"Invalid type for '{param or name}': expected {what}, but got {_type_name(v)}.",
                          param or name, "invalid_type")
    return v


def _range(name: str, v, lo=None, hi=None):
    if v is not None and ((lo is not None and v < lo) or (hi is not None and v > hi)):
        bounds = (f"between {lo} and {hi}" if lo is not None and hi is not None
                  else f"at least {lo}" if lo is not None else f"at most {hi}")
        raise bad_request(f"Invalid value for '{name}': expected a value {bounds}, but got {_short(v)}.", name)
    return v


def _int(body, name, lo=None, hi=None):
    return _range(name, _typed(body, name, (int,), "an integer"), lo, hi)


def _num(body, name, lo=None, hi=None):
    v = _typed(body, name, (int, float), "a number")
    if v is not None and not math.isfinite(v):
        raise bad_request(f"Invalid value for '{name}': expected a finite number.", name)
    return _range(name, v, lo, hi)


def _bool(body, name, default=None):
    v = _typed(body, name, (bool,), "a boolean")
    return default if v is None else v


def int_list(value, name: str, vocab_size: int | None = None) -> list[int]:
    """An array of token ids: integers, and below vocab_size when given."""
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise bad_request(f"Invalid type for '{name}': expected an array of integers.", name, "invalid_type")
    for t in value:
        if t < 0 or (vocab_size is not None and t >= vocab_size):
            raise bad_request(f"Invalid value for '{name}': token id {_short(t)} is outside the vocabulary"
                              + (f" (0..{vocab_size - 1})." if vocab_size is not None else "."), name)
    return value


def _short(value, limit: int = 40) -> str:
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "..."


def resolve_model(body: dict, served_names: list[str]) -> str:
    """The served name the request addresses; a missing model means the first (as vLLM does)."""
    model = body.get("model")
    if model is None:
        return served_names[0]
    if not isinstance(model, str):
        raise bad_request("Invalid type for 'model': expected a string.", "model", "invalid_type")
    if model not in served_names:
        raise APIError(404, f"The model `{model}` does not exist or you do not have access to it.",
                       param="model", code="model_not_found")
    return model


def _not_supported(name: str, what: str) -> APIError:
    return bad_request(f"'{name}' is not supported by this server: {what}.", name, "unsupported_parameter")


# -- sampling fields shared by both endpoints ----------------------------------------------------
# Here: JSON types, and the ranges OpenAI's API sets beyond what the engine needs (temperature up to
# 2, n up to 128, top_logprobs up to 20). Every other bound is SamplingParams.validate's, which
# raises a RequestError naming the field; the server maps that to a 400 in one place.
MAX_N = 128
INT32_MAX = 2 ** 31 - 1
_TOKEN_KEY = re.compile(r"[0-9]{1,10}")


def _stop(body) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad_request("Invalid type for 'stop': expected a string or an array of strings.", "stop",
                          "invalid_type")
    return [s for s in stop if s]


def _logit_bias(body) -> dict[int, float] | None:
    bias = _typed(body, "logit_bias", (dict,), "an object mapping token ids to biases")
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        if not _TOKEN_KEY.fullmatch(key):
            raise bad_request(f"Invalid key in 'logit_bias': {_short(repr(key))} is not a token id.", "logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad_request(f"Invalid value in 'logit_bias' for token {key}: expected a number between "
                              f"-100 and 100.", "logit_bias", "invalid_type")
        out[int(key)] = value
    return out


def _stream_flags(body) -> tuple[bool, bool]:
    stream = _bool(body, "stream", False)
    options = _typed(body, "stream_options", (dict,), "an object")
    if options is not None and not stream:
        raise bad_request("'stream_options' is only allowed when 'stream' is true.", "stream_options")
    include_usage = bool(_bool(options or {}, "include_usage", False)) if options else False
    return stream, include_usage


def _sampling_params(body, *, max_tokens, vocab_size, logprobs=None, prompt_logprobs=None,
                     structured_outputs=None) -> SamplingParams:
    """`vocab_size`: the width of the model's logits, which logit_bias and stop_token_ids index."""
    n = _int(body, "n", 1, MAX_N)
    stop_token_ids = body.get("stop_token_ids")
    kwargs = dict(
        n=1 if n is None else n,
        max_tokens=max_tokens,
        min_tokens=_int(body, "min_tokens") or 0,
        temperature=_num(body, "temperature", 0, 2),
        top_p=_num(body, "top_p"),
        top_k=_int(body, "top_k"),
        min_p=_num(body, "min_p"),
        presence_penalty=_num(body, "presence_penalty") or 0.0,
        frequency_penalty=_num(body, "frequency_penalty") or 0.0,
        repetition_penalty=_num(body, "repetition_penalty"),
        logit_bias=_logit_bias(body),
        seed=_int(body, "seed"),
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        stop=_stop(body),
        stop_token_ids=[] if stop_token_ids is None else int_list(stop_token_ids, "stop_token_ids"),
        ignore_eos=_bool(body, "ignore_eos", False),
        include_stop_str_in_output=_bool(body, "include_stop_str_in_output", False),
        skip_special_tokens=_bool(body, "skip_special_tokens", True),
        structured_outputs=structured_outputs,
    )
    if kwargs["top_p"] == 0:  # OpenAI allows 0; it means "only the most likely token"
        kwargs["top_p"], kwargs["top_k"] = 1.0, 1
    params = SamplingParams(**kwargs)   # RequestError (param named) if a value is out of range
    params.check_token_ids(vocab_size)
    return params


_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def _response_format(body) -> StructuredOutputs | None:
    fmt = _typed(body, "response_format", (dict,), "an object")
    if fmt is None:
        return None
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputs(json_object=True)
    if kind != "json_schema":
        raise bad_request(f"Invalid value for 'response_format.type': {_short(repr(kind))}. Supported values "
                          "are: 'text', 'json_object' and 'json_schema'.", "response_format.type")
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise bad_request("Missing required parameter: 'response_format.json_schema'.",
                          "response_format.json_schema", "missing_required_parameter")
    if not isinstance(spec.get("name"), str):
        raise bad_request("Missing required parameter: 'response_format.json_schema.name'.",
                          "response_format.json_schema.name", "missing_required_parameter")
    schema = spec.get("schema")
    if schema is None:
        return StructuredOutputs(json_object=True)
    if not isinstance(schema, dict):
        raise bad_request("Invalid type for 'response_format.json_schema.schema': expected an object.",
                          "response_format.json_schema.schema", "invalid_type")
    return StructuredOutputs(json=schema)


def _structured_outputs(body) -> tuple[StructuredOutputs | None, str | None]:
    """What the output must match, from OpenAI's response_format or vLLM's structured_outputs (or
    its older guided_* fields), and which field said so. At most one of them may be given."""
    found = []
    fmt = _response_format(body)
    if fmt is not None:
        found.append((fmt, "response_format"))
    if body.get("structured_outputs") is not None:
        found.append((StructuredOutputs.of(body["structured_outputs"]), "structured_outputs"))
    for name, kind in _GUIDED.items():
        if body.get(name) is not None:
            try:
                found.append((StructuredOutputs(**{kind: body[name]}), name))
            except RequestError as e:
                raise RequestError(e.message.replace(f"structured_outputs.{kind}", name), param=name,
                                   code=e.code) from None
    if len(found) > 1:
        raise bad_request(f"Give at most one of {', '.join(repr(n) for _, n in found)}.", found[1][1])
    return found[0] if found else (None, None)


def _max_tokens(body, names, lo: int):
    for name in names:  # the first one given wins
        v = _int(body, name, lo, INT32_MAX)
        if v is not None:
            return v
    return None


# -- chat --------------------------------------------------------------------------------------
def _content(m: dict, i: int) -> str:
    content = m.get("content")
    if content is None:
        if m["role"] == "assistant":
            return ""
        raise bad_request(f"Missing required parameter: 'messages[{i}].content'.", f"messages[{i}].content",
                          "missing_required_parameter")
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"Invalid type for 'messages[{i}].content': expected a string or an array of "
                          f"content parts.", f"messages[{i}].content", "invalid_type")
    texts = []
    for j, part in enumerate(content):
        where = f"messages[{i}].content[{j}]"
        if not isinstance(part, dict):
            raise bad_request(f"Invalid type for '{where}': expected an object.", where, "invalid_type")
        kind = part.get("type")
        if kind is None:
            raise bad_request(f"Missing required parameter: '{where}.type'.", f"{where}.type",
                              "missing_required_parameter")
        if kind != "text":
            raise bad_request(f"Content parts of type {kind!r} are not supported: this server serves a "
                              f"text-only model (only 'text' parts).", f"{where}.type", "unsupported_value")
        if not isinstance(part.get("text"), str):
            raise bad_request(f"Missing required parameter: '{where}.text'.", f"{where}.text",
                              "missing_required_parameter")
        texts.append(part["text"])
    return "\n".join(texts)


def parse_messages(value) -> list[dict]:
    """Validated messages for the chat template: developer -> system, content joined to a string."""
    if value is None:
        raise bad_request("Missing required parameter: 'messages'.", "messages", "missing_required_parameter")
    if not isinstance(value, list):
        raise bad_request("Invalid type for 'messages': expected an array.", "messages", "invalid_type")
    if not value:
        raise bad_request("Invalid 'messages': expected an array with at least one message.", "messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise bad_request(f"Invalid type for 'messages[{i}]': expected an object.", f"messages[{i}]",
                              "invalid_type")
        role = m.get("role")
        if role is None:
            raise bad_request(f"Missing required parameter: 'messages[{i}].role'.", f"messages[{i}].role",
                              "missing_required_parameter")
        if role == "function":
            raise bad_request("Messages with role 'function' (the deprecated function calling) are not "
                              "supported: use 'tool'.", f"messages[{i}].role", "unsupported_value")
        if role not in _ROLES:
            raise bad_request(f"Invalid value for 'messages[{i}].role': {_short(repr(role))}. Supported values "
                              f"are: 'system', 'developer', 'user', 'assistant' and 'tool'.", f"messages[{i}].role")
        calls = _tool_calls(m, i) if role == "assistant" else None
        msg = {"role": "system" if role == "developer" else role,
               "content": None if calls and m.get("content") is None else _content(m, i)}
        if calls:
            msg["tool_calls"] = calls
        if role == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str):
                raise bad_request(f"Missing required parameter: 'messages[{i}].tool_call_id'.",
                                  f"messages[{i}].tool_call_id", "missing_required_parameter")
            msg["tool_call_id"] = call_id
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        out.append(msg)
    return out


def _tool_calls(m: dict, i: int) -> list[dict] | None:
    """An assistant message's earlier tool calls, checked: OpenAI's shape, arguments as JSON text."""
    calls = m.get("tool_calls")
    if calls is None:
        return None
    where = f"messages[{i}].tool_calls"
    if not isinstance(calls, list):
        raise bad_request(f"Invalid type for '{where}': expected an array.", where, "invalid_type")
    out = []
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"), str):
            raise bad_request(f"Invalid '{where}[{j}]': expected {{\"id\", \"type\": \"function\", \"function\": "
                              f"{{\"name\", \"arguments\"}}}} with arguments as a JSON string.", f"{where}[{j}]")
        out.append({"id": str(c.get("id", "")), "type": "function",
                    "function": {"name": fn["name"], "arguments": fn["arguments"]}})
    return out


def parse_chat(body: dict, served_names: list[str], logits_width: int,
               tool_format: str = "hermes") -> GenerationRequest:
    """`tool_format`: how this model writes tool calls (see lamina.server.tools)."""
    model = resolve_model(body, served_names)
    messages = parse_messages(body.get("messages"))
    tool_use = tools.parse_tool_use(body, tool_format)
    structured, grammar_param = _structured_outputs(body)
    forced = tools.forced_call_grammar(tool_use) if tool_use is not None else None
    if forced is not None:
        if structured is not None:
            raise bad_request(f"'{grammar_param}' cannot be combined with a tool_choice that forces a call.",
                              grammar_param)
        structured, grammar_param = forced, "tools"
    if body.get("audio") is not None:
        raise _not_supported("audio", "it produces text only")
    modalities = body.get("modalities")
    if modalities is not None and (not isinstance(modalities, list) or any(m != "text" for m in modalities)):
        raise bad_request("Only the 'text' modality is supported.", "modalities", "unsupported_value")
    stream, include_usage = _stream_flags(body)
    want_logprobs = _bool(body, "logprobs", False)
    top = _int(body, "top_logprobs", 0, 20)
    if top is not None and not want_logprobs:
        raise bad_request("'top_logprobs' requires 'logprobs' to be true.", "top_logprobs")
    logprobs = (top or 0) if want_logprobs else None
    max_tokens = _max_tokens(body, ("max_completion_tokens", "max_tokens", "maximum_tokens"), 1)
    params = _sampling_params(body, max_tokens=max_tokens, vocab_size=logits_width, logprobs=logprobs,
                              structured_outputs=structured)
    return GenerationRequest("chat", model, params, stream, include_usage, messages=messages,
                             logprobs=logprobs, tool_use=tool_use, grammar_param=grammar_param)


# -- legacy completions --------------------------------------------------------------------------
def parse_prompts(value, vocab_size: int) -> list[str | list[int]]:
    if value is None:
        raise bad_request("Missing required parameter: 'prompt'.", "prompt", "missing_required_parameter")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(p, str) for p in value):
            return list(value)
        if all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            return [int_list(value, "prompt", vocab_size)]
        if all(isinstance(p, list) and p for p in value):
            return [int_list(p, "prompt", vocab_size) for p in value]
    if isinstance(value, list) and not value:
        raise bad_request("Invalid 'prompt': expected a non-empty array.", "prompt")
    raise bad_request("Invalid type for 'prompt': expected a string, an array of strings, an array of token "
                      "ids or an array of token-id arrays.", "prompt", "invalid_type")


def parse_completion(body: dict, served_names: list[str], logits_width: int,
                     prompt_vocab_size: int | None = None) -> GenerationRequest:
    """`prompt_vocab_size`: token-id prompts must be below it (ids the tokenizer can decode and the
    model can embed); `logits_width`: the bound of ids that logit_bias and stop_token_ids name."""
    model = resolve_model(body, served_names)
    prompts = parse_prompts(body.get("prompt"), prompt_vocab_size or logits_width)
    if body.get("suffix"):
        raise _not_supported("suffix", "it has no fill-in-the-middle")
    best_of, n = _int(body, "best_of", 1, MAX_N), _int(body, "n", 1, MAX_N) or 1
    if best_of is not None and best_of != n:
        raise _not_supported("best_of", "use 'n' instead")
    stream, include_usage = _stream_flags(body)
    logprobs = _int(body, "logprobs", 0, 20)
    echo = _bool(body, "echo", False)
    max_tokens = _max_tokens(body, ("max_tokens", "maximum_tokens"), 0)
    structured, grammar_param = _structured_outputs(body)
    params = _sampling_params(body, max_tokens=16 if max_tokens is None else max_tokens, vocab_size=logits_width,
                              logprobs=logprobs, prompt_logprobs=logprobs if echo else None,
                              structured_outputs=structured)
    return GenerationRequest("completion", model, params, stream, include_usage, prompts=prompts, echo=echo,
                             logprobs=logprobs, grammar_param=grammar_param)


# -- response shapes -----------------------------------------------------------------------------
def _lp(value: float) -> float:
    return value if value == value and value > LOGPROB_FLOOR else LOGPROB_FLOOR


def chat_logprobs(tokenizer, entries: list[TokenLogprob], top_n: int) -> dict:
    def item(token_id, logprob):
        raw = tokenizer.token_bytes(token_id)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": _lp(logprob), "bytes": list(raw)}
    content = [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top[:top_n]]}
               for e in entries]
    return {"content": content, "refusal": None}


def completion_logprobs(tokenizer, entries: list[TokenLogprob | None], token_ids: list[int], top_n: int,
                        offset: int) -> tuple[dict, int]:
    """The legacy logprobs object for some tokens, text offsets starting at `offset`; returns it and
    the offset after them. An entry of None (the first prompt token) has no logprob."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, e in zip(token_ids, entries):
        text = tokenizer.token_text(token_id)
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        if e is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(_lp(e.logprob))
        top = {tokenizer.token_text(t): _lp(lp) for t, lp in e.top[:top_n]}
        top.setdefault(text, _lp(e.logprob))
        out["top_logprobs"].append(top)
    return out, offset


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def sse(obj) -> bytes:
    """One server-sent event: a single `data:` line of compact JSON and a blank line."""
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


# -- JSON bodies off the event loop --------------------------------------------------------------
_SLICE = 8192   # list items per json.dumps call


def dumps(obj) -> bytes:
    """json.dumps(obj) in pieces, for a worker thread. One json.dumps call holds the GIL until it
    returns, so encoding a big response (a /tokenize of 2M ids, n x logprobs) in one call would
    stall the event loop even from another thread; between pieces the loop gets its turn."""
    out: list[str] = []
    _pieces(obj, out, 0)
    return "".join(out).encode()


def _pieces(obj, out: list[str], depth: int) -> None:
    if isinstance(obj, dict) and depth < 3:
        out.append("{")
        for i, (key, value) in enumerate(obj.items()):
            out.append(("," if i else "") + json.dumps(str(key)) + ":")
            _pieces(value, out, depth + 1)
        out.append("}")
    elif isinstance(obj, list) and depth < 3 and obj and isinstance(obj[0], (dict, list)):
        out.append("[")
        for i, value in enumerate(obj):
            if i:
                out.append(",")
            _pieces(value, out, depth + 1)
        out.append("]")
    elif isinstance(obj, list) and len(obj) > _SLICE:
        out.append("[" + ",".join(json.dumps(obj[i:i + _SLICE])[1:-1] for i in range(0, len(obj), _SLICE)) + "]")
    else:
        out.append(json.dumps(obj))
