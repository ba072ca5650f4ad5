"""The tool-call parser on its own: whole replies, and the same replies streamed in random pieces,
must give the same content and calls."""
import json
import random

import pytest

from lamina.server.tools import CallParser, parse_calls

CASES = [
    ("hermes", 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "n": [1, {"a": "}"}]}}\n'
               '</tool_call>\n<tool_call>\n{"name": "x", "arguments": {}}\n</tool_call>\n',
     "Sure.", [("get_weather", {"city": "Paris", "n": [1, {"a": "}"}]}), ("x", {})]),
    ("hermes", "no call here <tool_ but text", "no call here <tool_ but text", []),
    ("hermes", '<tool_call>{"arguments": {"q": 1}, "name": "s"}</tool_call>', None, [("s", {"q": 1})]),
    ("hermes", '<tool_call>{"name": "s", "arguments": "{\\"q\\": 2}"}</tool_call>', None, [("s", {"q": 2})]),
    ("hermes", '<tool_call>{"foo": 1}</tool_call> after', '<tool_call>{"foo": 1}</tool_call> after', []),
    ("hermes", 'x <tool_call>{"name": "cut", "arguments": {"a": "unfini', "x",
     None),  # cut off by max_tokens: the call is reported with what it has
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "b", "parameters": {}}',
     None, [("get_weather", {"city": "Paris"}), ("b", {})]),
    ("llama3_json", '<|python_tag|>{"name": "a", "parameters": {"x": "y"}}', None, [("a", {"x": "y"})]),
    ("llama3_json", 'The weather is {"name": nice}', 'The weather is {"name": nice}', []),
    ("llama3_json", '{"not": "a call"}', '{"not": "a call"}', []),
]


def _streamed(fmt: str, text: str, seed: int):
    rnd = random.Random(seed)
    parser, content, calls = CallParser(fmt), "", {}

    def take(deltas):
        for d in deltas:
            fn = d.get("function", {})
            if "id" in d:
                assert d["type"] == "function" and d["index"] not in calls
                calls[d["index"]] = {"name": fn["name"], "arguments": fn.get("arguments", "")}
            else:
                assert set(d) == {"index", "function"} and set(fn) == {"arguments"}
                calls[d["index"]]["arguments"] += fn["arguments"]

    i = 0
    while i < len(text):
        j = i + rnd.randint(1, 6)
        c, d = parser.feed(text[i:j])
        content += c
        take(d)
        i = j
    c, d = parser.feed("", final=True)
    take(d)
    return content + c, [calls[k] for k in sorted(calls)]


@pytest.mark.parametrize("fmt, text, content, calls", CASES)
def test_whole_reply(fmt, text, content, calls):
    got_content, got_calls = parse_calls(text, fmt)
    if calls is None:   # a call cut short: its name is known, its arguments are what was written
        assert got_content == content and [c.name for c in got_calls] == ["cut"]
        return
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got_calls] == calls
    assert len({c.id for c in got_calls}) == len(got_calls)


@pytest.mark.parametrize("fmt, text, content, calls", [c for c in CASES if c[3] is not None])
def test_streamed_reply_matches_whole(fmt, text, content, calls):
    for seed in range(25):
        got_content, got_calls = _streamed(fmt, text, seed)
        assert [(c["name"], json.loads(c["arguments"])) for c in got_calls] == calls
        if calls:
            assert got_content.strip() == (content or "")
        else:
            assert got_content == text


def test_content_before_a_call_streams_before_the_call_is_complete():
    parser = CallParser("hermes")
    content, deltas = parser.feed("Let me check. <tool")
    assert content == "Let me check. " and deltas == []
    content, deltas = parser.feed('_call>{"name": "f", "arguments": {"a": 1')
    assert content == "" and deltas[0]["function"]["name"] == "f"
    assert "".join(d["function"]["arguments"] for d in deltas[1:]) == '{"a": 1'
