"""Structured outputs and tool calling through the OpenAI API, with the real openai client on the
real server and engine over loopback."""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
from openai import OpenAI
from pydantic import BaseModel

from tests.server.helpers import MODEL, http

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 20},
                                                       "maxItems": 3}},
          "required": ["name", "age", "hobbies"], "additionalProperties": False}
ASK = [{"role": "user", "content": "Describe a person as JSON."}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 30}},
                                       "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(api_key="x", base_url=server.url + "/v1", _strict_response_validation=True, max_retries=0)


def _schema_format(schema=PERSON):
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


def test_json_schema_greedy_and_sampled(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=120, temperature=0,
                                       response_format=_schema_format())
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=120, temperature=1.0, n=4, seed=3,
                                       response_format=_schema_format())
    texts = [c.message.content for c in r.choices]
    for c in r.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.message.content), PERSON)
    assert len(set(texts)) > 1   # four samples, not one answer four times


def test_json_object_and_completions_endpoint(client):
    ask = [{"role": "user", "content": "Give me a JSON object with a name and an age."}]
    r = client.chat.completions.create(model=MODEL, messages=ask, max_tokens=200, temperature=0,
                                       response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = client.completions.create(model=MODEL, prompt="A person as JSON:", max_tokens=120, temperature=0,
                                  extra_body={"response_format": _schema_format()})
    jsonschema.validate(json.loads(r.choices[0].text), PERSON)


@pytest.mark.parametrize("spec, check", [
    ({"choice": ["red", "green", "blue"]}, lambda t: t in ("red", "green", "blue")),
    ({"regex": r"[0-9]{3}-[0-9]{4}"}, lambda t: re.fullmatch(r"[0-9]{3}-[0-9]{4}", t)),
    ({"grammar": 'root ::= "The answer is " ("yes" | "no") "."'}, lambda t: t in ("The answer is yes.",
                                                                                  "The answer is no.")),
    ({"grammar": 'start: "x=" NUM\nNUM: /[1-9][0-9]?/'}, lambda t: re.fullmatch(r"x=[1-9][0-9]?", t)),
    ({"json": PERSON}, lambda t: jsonschema.validate(json.loads(t), PERSON) is None),
])
def test_structured_outputs_extra_body(client, spec, check):
    for temperature in (0, 1.0):
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Pick one."}],
                                           max_tokens=100, temperature=temperature, seed=1,
                                           extra_body={"structured_outputs": spec})
        assert r.choices[0].finish_reason == "stop" and check(r.choices[0].message.content), r.choices[0]


def test_parse_with_a_pydantic_model(client):
    class Person(BaseModel):
        name: str
        age: int
        hobbies: list[str]

    r = client.chat.completions.parse(model=MODEL, messages=ASK, max_tokens=150, temperature=0,
                                      response_format=Person)
    person = r.choices[0].message.parsed
    assert isinstance(person, Person) and person.name


def test_streamed_json_schema(client):
    stream = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=120, temperature=0,
                                            response_format=_schema_format(), stream=True)
    text, finish = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "stop"
    jsonschema.validate(json.loads(text), PERSON)
    whole = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=120, temperature=0,
                                           response_format=_schema_format())
    assert whole.choices[0].message.content == text


def test_constrained_and_free_requests_in_flight_together(client):
    prompts = [f"Tell me about the number {i}." for i in range(8)]

    def free(p):
        return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": p}],
                                              max_tokens=24, temperature=0).choices[0].message.content

    def constrained(p):
        return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": p}],
                                              max_tokens=120, temperature=0.7, seed=1,
                                              response_format=_schema_format()).choices[0].message.content
    alone = [free(p) for p in prompts[:2]]
    with ThreadPoolExecutor(16) as pool:
        frees = [pool.submit(free, p) for p in prompts]
        constrained_ = [pool.submit(constrained, p) for p in prompts]
        frees = [f.result() for f in frees]
        for f in constrained_:
            jsonschema.validate(json.loads(f.result()), PERSON)
    # beside constrained requests, free ones answer as they do alone (greedy; the engine's rule for
    # batched rows is token agreement, and these short answers agree exactly on this model)
    assert frees[:2] == alone


# -- tools ---------------------------------------------------------------------------------------
def _check_call(call, tools=TOOLS):
    assert call.type == "function" and call.id
    spec = next(t["function"] for t in tools if t["function"]["name"] == call.function.name)
    jsonschema.validate(json.loads(call.function.arguments), spec["parameters"])


def test_tool_choice_required(client):
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=100, temperature=0,
                                       tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    _check_call(choice.message.tool_calls[0])
    # parallel calls allowed: every call is valid, whatever their number
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=100, temperature=0.8, seed=2,
                                       tools=TOOLS, tool_choice="required")
    assert r.choices[0].message.tool_calls
    for call in r.choices[0].message.tool_calls[:-1]:
        _check_call(call)


def test_tool_choice_named(client):
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=100, temperature=0,
                                       tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and [c.function.name for c in choice.message.tool_calls] == ["get_time"]
    _check_call(choice.message.tool_calls[0])


def test_tool_choice_none_and_auto_without_a_call(client):
    for choice in ("none", "auto"):
        r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=20, temperature=0,
                                           tools=TOOLS, tool_choice=choice)
        assert r.choices[0].message.tool_calls is None and r.choices[0].message.content
        assert r.choices[0].finish_reason in ("stop", "length")
    # "none" leaves the tools out of the prompt: the answer is the one without tools
    plain = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=20, temperature=0)
    none = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=20, temperature=0,
                                          tools=TOOLS, tool_choice="none")
    assert none.choices[0].message.content == plain.choices[0].message.content
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens


# under "auto" this small model answers in prose; a one-choice grammar makes it write content and
# then a call, so the parser of free output is tried end to end
SCRIPTED = ('Let me look that up.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
            '"unit": "celsius"}}\n</tool_call>')


def test_auto_parses_a_call_from_the_output(client):
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=80, temperature=0, tools=TOOLS,
                                       extra_body={"structured_outputs": {"choice": [SCRIPTED]}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me look that up."
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}


def _reassemble(stream):
    content, calls, finish = "", {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
        for d in delta.tool_calls or []:
            if d.id is not None:
                assert d.index not in calls and d.type == "function" and d.function.name
                calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": d.function.arguments or ""}
            else:
                assert d.function.name is None
                calls[d.index]["arguments"] += d.function.arguments or ""
    return content, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("kwargs", [
    dict(tool_choice="required", temperature=0.8, seed=5),
    dict(tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=0),
    dict(extra_body={"structured_outputs": {"choice": [SCRIPTED]}}, temperature=0),
], ids=["required", "named", "auto"])
def test_streamed_tool_calls_reassemble_to_the_whole_answer(client, kwargs):
    args = dict(model=MODEL, messages=QUESTION, max_tokens=100, tools=TOOLS, **kwargs)
    whole = client.chat.completions.create(**args).choices[0]
    content, calls, finish = _reassemble(client.chat.completions.create(**args, stream=True))
    assert finish == whole.finish_reason
    assert (content or None) == whole.message.content
    # the same text, so the same calls: the arguments streamed are the arguments answered whole
    assert [(c["name"], c["arguments"]) for c in calls] == \
        [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    complete = calls if finish == "tool_calls" else calls[:-1]   # "length" may cut the last one short
    assert complete
    for c in complete:
        _check_call(openai.types.chat.ChatCompletionMessageFunctionToolCall(
            id=c["id"], type="function", function={"name": c["name"], "arguments": c["arguments"]}))


def test_a_round_trip_with_a_tool_result(client):
    first = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=60, temperature=0,
                                           tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    msg = first.choices[0].message
    messages = QUESTION + [msg.model_dump(exclude_none=True),
                           {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": '{"temp": 18}'}]
    assert messages[1]["tool_calls"] and "content" not in messages[1]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0, tools=TOOLS)
    assert r.choices[0].message.content and r.choices[0].finish_reason in ("stop", "length")
    # the tool's result reached the prompt
    without = client.chat.completions.create(model=MODEL, messages=messages[:2], max_tokens=1, tools=TOOLS)
    assert r.usage.prompt_tokens > without.usage.prompt_tokens


# -- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, param", [
    ({"response_format": _schema_format({"type": "nope"})}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 5}}},
     "response_format.json_schema.schema"),
    ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs"),
    ({"structured_outputs": {"grammar": "root ::= ("}}, "structured_outputs"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ({"structured_outputs": {"json": {"type": "object"}, "regex": "a"}}, "structured_outputs"),
    ({"structured_outputs": {"choice": ["a"]}, "response_format": {"type": "json_object"}}, "structured_outputs"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": []}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}],
      "tool_choice": "required"}, "tools"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
])
def test_errors_are_400s_naming_the_parameter(server, extra, param):
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 4, **extra}
    for stream in (False, True):
        r = http(server.port, "POST", "/v1/chat/completions", {**body, "stream": stream})
        assert r.status == 400, (extra, r.body)
        err = r.json()["error"]
        assert err["param"] == param and err["message"] and err["type"] == "invalid_request_error", err
    r = http(server.port, "POST", "/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "max_tokens": 2})
    assert r.status == 200


def test_the_client_raises_on_errors(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4,
                                       extra_body={"structured_outputs": {"regex": "(("}})
    assert "regular expression" in e.value.message
