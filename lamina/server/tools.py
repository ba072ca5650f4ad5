"""Tool calling in chat: the request's `tools` and `tool_choice`, the prompt that shows the model its
tools, the grammar that forces a call, and the parsers that find calls in the output, whole or as it
streams.

Two call formats are understood:
- hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call (Hermes,
  Qwen and most ChatML tool templates; also lamina's own tool prompt for templates without tools);
- llama3_json: the whole reply is `{"name": ..., "parameters": {...}}`, calls separated by `;`
  (Llama 3.1 and later), optionally after `<|python_tag|>`.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from lamina.sampling_params import StructuredOutputs
from lamina.server.errors import bad_request

FORMATS = ("hermes", "llama3_json")
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")   # OpenAI's rule for function names
# the same one-line JSON the engine's JSON schemas produce (see lamina.engine.grammar)
_JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class Tool:
    name: str
    description: str | None
    parameters: dict            # a JSON schema of the arguments object

    def as_openai(self) -> dict:
        fn = {"name": self.name, "parameters": self.parameters}
        if self.description:
            fn["description"] = self.description
        return {"type": "function", "function": fn}


@dataclass
class ToolCall:
    name: str
    arguments: str              # JSON text, as OpenAI sends it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def as_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ToolUse:
    """What a chat request asks of tools. choice: none | auto | required | named (then `named`)."""
    tools: tuple[Tool, ...]
    choice: str
    named: str | None = None
    parallel: bool = True
    format: str = "hermes"

    @property
    def parses_calls(self) -> bool:
        return self.choice != "none"


# -- the request ---------------------------------------------------------------------------------
def _tool(i: int, t) -> Tool:
    where = f"tools[{i}]"
    if not isinstance(t, dict):
        raise bad_request(f"Invalid type for '{where}': expected an object.", where, "invalid_type")
    if t.get("type") != "function":
        raise bad_request(f"Invalid value for '{where}.type': only 'function' tools are supported.",
                          f"{where}.type", "invalid_value")
    fn = t.get("function")
    if not isinstance(fn, dict):
        raise bad_request(f"Missing required parameter: '{where}.function'.", f"{where}.function",
                          "missing_required_parameter")
    name = fn.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise bad_request(f"Invalid '{where}.function.name': expected a string of letters, digits, '_', '.' "
                          f"or '-', at most 64 long.", f"{where}.function.name")
    description = fn.get("description")
    if description is not None and not isinstance(description, str):
        raise bad_request(f"Invalid type for '{where}.function.description': expected a string.",
                          f"{where}.function.description", "invalid_type")
    params = fn.get("parameters")
    if params is None:
        params = {"type": "object", "properties": {}}
    if not isinstance(params, dict):
        raise bad_request(f"Invalid type for '{where}.function.parameters': expected a JSON schema object.",
                          f"{where}.function.parameters", "invalid_type")
    return Tool(name, description, params)


def parse_tool_use(body: dict, call_format: str) -> ToolUse | None:
    """The tool fields of a chat request, checked; None when it has no tools (and no tool_choice
    that needs them)."""
    tools_value, choice = body.get("tools"), body.get("tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise bad_request("Invalid type for 'parallel_tool_calls': expected a boolean.", "parallel_tool_calls",
                          "invalid_type")
    if tools_value is None:
        if choice in (None, "none", "auto"):   # without tools, "auto" can only mean none
            return None
        raise bad_request("'tool_choice' is only allowed when 'tools' are specified.", "tool_choice")
    if not isinstance(tools_value, list):
        raise bad_request("Invalid type for 'tools': expected an array.", "tools", "invalid_type")
    if not tools_value:
        raise bad_request("Invalid 'tools': empty array. Expected an array with at least one tool.", "tools",
                          "empty_array")
    tools = tuple(_tool(i, t) for i, t in enumerate(tools_value))
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise bad_request("Invalid 'tools': tool names must be unique.", "tools")
    named = None
    if choice is None:
        choice = "auto"
    elif isinstance(choice, dict):
        fn = choice.get("function")
        if choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad_request("Invalid 'tool_choice': expected 'none', 'auto', 'required' or "
                              "{\"type\": \"function\", \"function\": {\"name\": ...}}.", "tool_choice")
        named = fn["name"]
        if named not in names:
            raise bad_request(f"Invalid 'tool_choice': no tool named {named!r} among the tools.", "tool_choice")
        choice = "named"
    elif choice not in ("none", "auto", "required"):
        raise bad_request(f"Invalid value for 'tool_choice': {str(choice)[:40]!r}. Supported values are: "
                          "'none', 'auto', 'required', or a named function.", "tool_choice")
    return ToolUse(tools, choice, named, True if parallel is None else parallel, call_format)


def forced_call_grammar(use: ToolUse) -> StructuredOutputs | None:
    """Under "required" or a named choice, the reply can only be well-formed calls of the offered
    tools (their arguments matching each tool's schema): a grammar over the call format."""
    if use.choice not in ("required", "named"):
        return None
    args_key = "arguments" if use.format == "hermes" else "parameters"
    options = [{"type": "object", "properties": {"name": {"const": t.name}, args_key: t.parameters},
                "required": ["name", args_key], "additionalProperties": False}
               for t in use.tools if use.choice == "required" or t.name == use.named]
    schema = {**(options[0] if len(options) == 1 else {"anyOf": options}), "x-guidance": _JSON_LAYOUT}
    many = "+" if use.parallel and use.choice == "required" else ""
    if use.format == "hermes":
        more = '("\\n" call)*' if many else ""
        lark = f'start: call {more}\ncall: "<tool_call>\\n" obj "\\n</tool_call>"\nobj: %json {json.dumps(schema)}'
    else:
        lark = (f'start: obj ("; " obj)*\nobj: %json {json.dumps(schema)}' if many
                else f'start: obj\nobj: %json {json.dumps(schema)}')
    return StructuredOutputs(grammar=lark)


# -- the prompt ----------------------------------------------------------------------------------
def template_format(chat_template: str | None) -> tuple[bool, str]:
    """(does the chat template render tools itself, which call format it teaches)."""
    template = chat_template or ""
    native = "tools" in template
    if native and "<tool_call>" not in template and ("python_tag" in template or '"parameters"' in template):
        return True, "llama3_json"
    return native, "hermes"


def tool_prompt(tools: tuple[Tool, ...]) -> str:
    """lamina's tool instructions, for chat templates with no tools section: hermes format."""
    listing = "\n".join(json.dumps(t.as_openai()["function"], ensure_ascii=False) for t in tools)
    return ("You may call functions to help with the user's request. They are listed here, each with a JSON "
            f"schema of its arguments:\n<tools>\n{listing}\n</tools>\n"
            "To call one, reply with a <tool_call> block holding a JSON object with the function's name and "
            "arguments, one block per call, like this:\n"
            '<tool_call>\n{"name": "function_name", "arguments": {"argument": "value"}}\n</tool_call>\n'
            "When no function is needed, answer the user directly.")


def _call_text(call: dict, call_format: str) -> str:
    fn = call.get("function") or {}
    args = fn.get("arguments")
    try:
        args = json.loads(args) if isinstance(args, str) else args
    except ValueError:
        pass
    if call_format == "hermes":
        return "<tool_call>\n" + json.dumps({"name": fn.get("name"), "arguments": args}, ensure_ascii=False) + \
            "\n</tool_call>"
    return json.dumps({"name": fn.get("name"), "parameters": args}, ensure_ascii=False)


def template_messages(messages: list[dict], use: ToolUse | None, native: bool, call_format: str) -> list[dict]:
    """The conversation as the chat template receives it. A template with tools of its own gets the
    messages as they are (tool-call arguments as objects, as templates expect); for any other,
    lamina writes its tool prompt into the system message, earlier calls as the text the model
    would have written, and tool results as user turns in <tool_response> blocks."""
    out = []
    for m in messages:
        m = dict(m)
        if native:
            if m.get("tool_calls"):
                m["tool_calls"] = [{**c, "function": {**c["function"],
                                                      "arguments": _loads_or_keep(c["function"].get("arguments"))}}
                                   for c in m["tool_calls"]]
            out.append(m)
            continue
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = "\n".join(_call_text(c, call_format) for c in m["tool_calls"])
            m = {"role": "assistant", "content": ((m.get("content") or "") + "\n" + calls).strip()}
        elif m["role"] == "tool":
            m = {"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"}
        out.append(m)
    if use is not None and use.choice != "none" and not native:
        prompt = tool_prompt(use.tools)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _loads_or_keep(text):
    try:
        return json.loads(text) if isinstance(text, str) else text
    except ValueError:
        return text


# -- parsing the output ----------------------------------------------------------------------------
_PYTHON_TAG = "<|python_tag|>"
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')
_AFTER_CALL = {"hermes": r"\s*</tool_call>", "llama3_json": ""}   # what closes a call's JSON object


def _call_from(obj) -> ToolCall | None:
    """A call written in another key order (or with arguments as a string) in one piece."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


class CallParser:
    """Splits a reply into content and tool calls as its text arrives; a whole reply is one feed.

    Content passes through until a call opens (a tail that might be the start of one is held back).
    In a call, the first delta carries the call's index, id, type and name as soon as the name is
    written, and the arguments object then streams in fragments as the model writes it. A call that
    never takes shape goes out as content when the reply ends."""

    def __init__(self, call_format: str):
        self.format = call_format
        self.text = ""
        self.pos = 0                  # text before this is dealt with
        self.calls: list[ToolCall] = []
        self._call_begin: int | None = None   # where the open call's text starts (its opener)
        self._json_begin = 0          # where its JSON object starts
        self._current: ToolCall | None = None
        self._args_sent = 0
        self._free_text = False       # llama3_json: the reply is prose, not calls
        self._search_from = 0         # hermes: an opener before this turned out not to open a call
        self._space = ""              # whitespace held back: it is content only if more content follows

    def feed(self, delta: str, final: bool = False) -> tuple[str, list[dict]]:
        """(content delta, tool-call deltas in OpenAI's stream shape); final: the reply is complete."""
        self.text += delta
        content, deltas = [], []
        while True:
            if self._call_begin is None:
                if not self._open_call(content, final):
                    break
            elif not self._continue_call(deltas, final):
                break
        if final and self._call_begin is not None:   # the reply ended inside a call
            if self._current is None:
                content.append(self.text[self._call_begin:])
            else:
                self.calls.append(self._current)
            self._call_begin, self.pos = None, len(self.text)
        text = self._space + "".join(content)
        if not text.strip() and not (final and not self.calls):
            self._space = text     # the newlines between calls are not content
            return "", deltas
        self._space = ""
        return text, deltas

    def _open_call(self, content: list[str], final: bool) -> bool:
        rest = self.text[self.pos:]
        if self.format == "hermes":
            i = rest.find("<tool_call>", max(0, self._search_from - self.pos))
            if i < 0:
                keep = 0 if final else _partial_suffix(rest, "<tool_call>")
                content.append(rest[:len(rest) - keep])
                self.pos += len(rest) - keep
                return False
            content.append(rest[:i])
            self._start(self.pos + i, self.pos + i + len("<tool_call>"))
            return True
        if not self._free_text:   # llama3_json: calls open the reply, or follow a call after ";"
            stripped = rest.lstrip(" \t\n;" if self.calls else " \t\n")
            if not self.calls and stripped.startswith(_PYTHON_TAG):
                stripped = stripped[len(_PYTHON_TAG):].lstrip()
            if stripped.startswith("{"):
                at = len(self.text) - len(stripped)
                self._start(self.pos, at)
                return True
            if not final and (not stripped or (not self.calls and _PYTHON_TAG.startswith(stripped))):
                return False   # not decided yet
            self._free_text = True
        content.append(rest)
        self.pos = len(self.text)
        return False

    def _start(self, begin: int, json_begin: int) -> None:
        self._call_begin, self._json_begin, self._current, self._args_sent = begin, json_begin, None, 0

    def _continue_call(self, deltas: list[dict], final: bool) -> bool:
        index = len(self.calls)
        head = _HEAD.match(self.text, self._json_begin)
        if head is not None and self._current is None:
            value = self.text[head.end():].lstrip()
            if not value:
                return False
            if value[0] not in "{[":   # arguments as a JSON string: not streamable as written
                head = None
        if head is None:   # another shape: wait for the whole object, then take it in one piece
            end = _json_value_end(self.text, self._json_begin)
            call = None
            if end is not None:
                try:
                    call = _call_from(json.loads(self.text[self._json_begin:end]))
                except ValueError:
                    call = None
            closer = self._closer(end, after_args=False) if call is not None else None
            if closer is None and call is not None and final:
                closer = end
            if call is None or closer is None:
                if end is not None and call is None:   # a JSON object that is not a call: prose
                    self._abandon()
                    return True
                return False
            deltas.append({"index": index, **call.as_openai()})
            self.calls.append(call)
            self._call_begin, self.pos = None, closer
            return True
        if self._current is None:
            self._current = ToolCall(json.loads(f'"{head.group(1)}"'), "")
            deltas.append({"index": index, "id": self._current.id, "type": "function",
                           "function": {"name": self._current.name, "arguments": ""}})
        args_begin = head.end()
        end = _json_value_end(self.text, args_begin)
        fragment = self.text[args_begin + self._args_sent:len(self.text) if end is None else end]
        if fragment:
            self._args_sent += len(fragment)
            self._current.arguments += fragment
            deltas.append({"index": index, "function": {"arguments": fragment}})
        closer = None if end is None else self._closer(end, after_args=True)
        if closer is None:
            return False
        self.calls.append(self._current)
        self._call_begin, self.pos = None, closer
        return True

    def _closer(self, end: int, after_args: bool) -> int | None:
        """Where the call ends, given where its arguments (or its whole object) end; None until
        the closing text has arrived."""
        m = re.compile((r"\s*\}" if after_args else "") + _AFTER_CALL[self.format]).match(self.text, end)
        return None if m is None else m.end()

    def _abandon(self) -> None:
        """The open "call" was not one: from its opener on, the text is content."""
        self.pos, self._call_begin = self._call_begin, None
        self._free_text = self.format == "llama3_json"
        self._search_from = self._json_begin


def parse_calls(text: str, call_format: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a whole reply; content None when the reply is only calls."""
    parser = CallParser(call_format)
    content, _ = parser.feed(text, final=True)
    content = content.strip()
    return (content or None) if parser.calls else text, parser.calls


def _partial_suffix(text: str, token: str) -> int:
    """Length of the longest end of `text` that is a beginning of `token`."""
    for k in range(min(len(text), len(token) - 1), 0, -1):
        if token.startswith(text[-k:]):
            return k
    return 0


def _json_value_end(text: str, start: int) -> int | None:
    """Where the JSON object or array at text[start] (after whitespace) ends; None while it is
    incomplete, or if no object or array starts there."""
    i = start
    while i < len(text) and text[i] in " \t\n\r":
        i += 1
    if i >= len(text) or text[i] not in "{[":
        return None
    depth, in_string, escaped = 0, False, False
    for j in range(i, len(text)):
        c = text[j]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return j + 1
    return None
