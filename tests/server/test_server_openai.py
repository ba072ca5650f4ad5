"""The OpenAI-compatible API with the real openai client (strict response validation) and raw
SSE checks, on the real engine over loopback."""
from __future__ import annotations

import contextlib
import io
import os

import openai
import pytest
from openai import OpenAI

from tests.server.conftest import MAX_MODEL_LEN
from tests.server.helpers import MODEL, http, sse_events

MSGS = [{"role": "user", "content": "Name three colors."}]
SHORT = dict(max_tokens=8, temperature=0)


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(api_key="anything", base_url=server.url, _strict_response_validation=True, max_retries=0)


@pytest.fixture(scope="module")
def lax_client(server):
    """For legacy completion streams: the SDK's Completion type declares finish_reason non-null, so
    strict validation rejects every streamed chunk but the last (OpenAI's own streams included)."""
    return OpenAI(api_key="anything", base_url=server.url, max_retries=0)


@pytest.fixture(scope="module")
def client_v1(server):
    return OpenAI(api_key="anything", base_url=server.url + "/v1", _strict_response_validation=True,
                  max_retries=0)


EXAMPLE = '''
from openai import OpenAI
client = OpenAI(api_key=os.environ["AA_TOKEN"], base_url="http://127.0.0.1:8000")  # note: no /v1
stream = client.chat.completions.create(model="smollm2-135m-instruct", stream=True, messages=[
    {"role": "user", "content": "What is answer to the ultimate question of life, the universe, and everything? Be brief."},
    {"role": "assistant", "content": "42."},
    {"role": "user", "content": "Why was that number chosen?"}])
for chunk in stream:
    content = chunk.choices[0].delta.content
    print(content if content is not None else "<end-of-stream>")
'''


@pytest.mark.parametrize("suffix", ["", "/v1"])
def test_issue_example_runs_unchanged(server, monkeypatch, suffix):
    code = EXAMPLE.replace("http://127.0.0.1:8000", server.url + suffix)
    monkeypatch.setenv("AA_TOKEN", "dummy-token")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "example.py", "exec"), {"os": os})
    lines = out.getvalue().splitlines()
    assert lines[-1] == "<end-of-stream>" and lines.count("<end-of-stream>") == 1
    assert "".join(lines[:-1]).strip(), "a non-empty answer comes before the end"


def test_chat_non_streaming_shape(client, client_v1):
    for c in (client, client_v1):
        r = c.chat.completions.create(model=MODEL, messages=MSGS, **SHORT)
        assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and isinstance(r.created, int)
        assert r.model == MODEL and len(r.choices) == 1
        ch = r.choices[0]
        assert ch.index == 0 and ch.message.role == "assistant" and ch.message.content
        assert ch.finish_reason == "length" and ch.logprobs is None
        u = r.usage
        assert u.completion_tokens == 8 and u.total_tokens == u.prompt_tokens + 8 and u.prompt_tokens > 5
        assert u.prompt_tokens_details.cached_tokens >= 0


def test_raw_response_headers(server):
    r = http(server.port, "POST", "/v1/chat/completions", {"model": MODEL, "messages": MSGS, **SHORT})
    assert r.status == 200 and r.headers["content-type"] == "application/json"
    assert r.headers["x-request-id"] == r.json()["id"]


def test_stream_framing_and_chunk_order(server):
    r = http(server.port, "POST", "/chat/completions",
             {"model": MODEL, "messages": MSGS, "stream": True, **SHORT})
    assert r.status == 200 and r.chunked
    assert r.headers["content-type"] == "text/event-stream" and r.headers["cache-control"] == "no-cache"
    assert b"event:" not in r.body
    events = sse_events(r.body)[:-1]
    ids = {(e["id"], e["created"], e["model"], e["object"]) for e in events}
    assert len(ids) == 1 and ids.pop()[3] == "chat.completion.chunk"
    assert all("usage" not in e or e["usage"] is None for e in events)
    assert events[0]["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": "", "refusal": None},
                                     "logprobs": None, "finish_reason": None}]
    middle, last = events[1:-1], events[-1]
    assert middle and all(set(e["choices"][0]["delta"]) == {"content"} and e["choices"][0]["finish_reason"] is None
                          for e in middle)
    assert last["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}]
    # the SSE events are flushed one by one: each arrived in its own HTTP chunk
    assert len(r.chunks) >= len(events)


def test_usage_chunk_only_when_asked(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=MSGS, stream=True,
                                                 stream_options={"include_usage": True}, **SHORT))
    assert [len(c.choices) for c in chunks][-1] == 0 and all(c.choices for c in chunks[:-1])
    assert all(c.usage is None for c in chunks[:-1])
    u = chunks[-1].usage
    assert u.completion_tokens == 8 and u.total_tokens == u.prompt_tokens + 8
    finishes = [c.choices[0].finish_reason for c in chunks[:-1] if c.choices[0].finish_reason]
    assert finishes == ["length"]
    plain = list(client.chat.completions.create(model=MODEL, messages=MSGS, stream=True, **SHORT))
    assert all(c.choices and c.usage is None for c in plain)


def test_streamed_text_equals_non_streamed_at_temperature_0(client):
    params = dict(model=MODEL, messages=[{"role": "user", "content": "Count from one to ten in words."}],
                  max_tokens=20, temperature=0)
    whole = client.chat.completions.create(**params)
    chunks = list(client.chat.completions.create(stream=True, **params))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content and text
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == \
        [whole.choices[0].finish_reason]


def test_content_parts_and_roles(client):
    base = client.chat.completions.create(model=MODEL, max_tokens=6, temperature=0, messages=[
        {"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi\nthere"}])
    parts = client.chat.completions.create(model=MODEL, max_tokens=6, temperature=0, messages=[
        {"role": "developer", "content": [{"type": "text", "text": "Be terse."}]},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}])
    assert parts.choices[0].message.content == base.choices[0].message.content
    assert parts.usage.prompt_tokens == base.usage.prompt_tokens
    # assistant turns with null content are accepted
    r = client.chat.completions.create(model=MODEL, max_tokens=2, messages=[
        {"role": "user", "content": "a"}, {"role": "assistant", "content": None}, {"role": "user", "content": "b"}])
    assert r.choices[0].finish_reason in ("stop", "length")


def test_unknown_fields_are_ignored(client):
    r = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=3, user="u", store=False,
                                       metadata={"a": "b"}, service_tier="auto", tool_choice="none",
                                       response_format={"type": "text"},
                                       extra_body={"prompt_cache_key": "k", "some_new_field": [1, 2]})
    assert r.choices[0].message.content is not None


def test_n_choices_streaming_and_not(client):
    r = client.chat.completions.create(model=MODEL, messages=MSGS, n=3, max_tokens=5, temperature=1.0, seed=1)
    assert [c.index for c in r.choices] == [0, 1, 2] and r.usage.completion_tokens == 15
    chunks = list(client.chat.completions.create(model=MODEL, messages=MSGS, n=2, max_tokens=5, stream=True))
    roles = [c.choices[0].index for c in chunks if c.choices[0].delta.role == "assistant"]
    finishes = sorted(c.choices[0].index for c in chunks if c.choices[0].finish_reason)
    assert sorted(roles) == [0, 1] and finishes == [0, 1]


def test_seed_reproducibility(client):
    params = dict(model=MODEL, messages=[{"role": "user", "content": "Write a random word."}], max_tokens=12,
                  temperature=1.0)
    # The first call fills the prefix cache; later calls reuse its blocks. In bf16 a cached prefix
    # rounds differently from a fresh prefill (as in vLLM), which may change a sampled token, so
    # compare calls that all see the same cache state.
    client.chat.completions.create(seed=1234, **params)
    a = client.chat.completions.create(seed=1234, **params).choices[0].message.content
    b = client.chat.completions.create(seed=1234, **params).choices[0].message.content
    s = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(seed=1234, stream=True,
                                                                                      **params))
    assert a == b == s


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=MSGS, logprobs=True, top_logprobs=3, **SHORT)
    content = r.choices[0].logprobs.content
    assert len(content) == 8
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and bytes(t.bytes).decode("utf-8", "replace") == t.token
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob >= t.top_logprobs[-1].logprob
        # greedy: the chosen token is a most likely one (bf16 logits do tie, and then the top list
        # may name the other)
        assert t.logprob == t.top_logprobs[0].logprob
    chunks = list(client.chat.completions.create(model=MODEL, messages=MSGS, logprobs=True, stream=True, **SHORT))
    streamed = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]
    assert all(t.top_logprobs == [] for t in streamed)
    r = client.chat.completions.create(model=MODEL, messages=MSGS, logprobs=False, **SHORT)
    assert r.choices[0].logprobs is None


def test_stop_strings_streaming_and_not(client):
    params = dict(model=MODEL, messages=[{"role": "user", "content": "Count from one to ten in words."}],
                  max_tokens=20, temperature=0)
    full = client.chat.completions.create(**params).choices[0].message.content
    words = full.replace(",", " ").split()
    stop = words[2]  # some word the greedy answer does contain
    r = client.chat.completions.create(stop=[stop, "zzzz"], **params)
    text = r.choices[0].message.content
    assert stop not in text and full.startswith(text) and r.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(stop=stop, stream=True, **params))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]


def test_sampling_fields_accepted(client):
    r = client.chat.completions.create(
        model=MODEL, messages=MSGS, max_completion_tokens=4, max_tokens=50, temperature=0.7, top_p=0.9,
        presence_penalty=0.5, frequency_penalty=0.5, logit_bias={"1": -100}, seed=3,
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 4, "ignore_eos": True,
                    "stop_token_ids": [2]})
    assert r.usage.completion_tokens == 4  # max_completion_tokens wins over max_tokens
    r = client.chat.completions.create(model=MODEL, messages=MSGS, temperature=0,
                                       extra_body={"maximum_tokens": 3})
    assert r.usage.completion_tokens == 3


def test_logit_bias_steers_tokens(client, server):
    tok = server.app.engine.tokenizer
    target = tok.encode(" banana", add_special_tokens=False)[0]
    r = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=3, temperature=0,
                                       logit_bias={str(target): 100})
    assert r.choices[0].message.content.startswith(tok.decode([target]))


def test_ignore_eos_and_min_tokens(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say OK."}],
                                       temperature=0, max_tokens=12, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"


def test_default_max_tokens_is_rest_of_context(server):
    # no max_tokens: the request is accepted whatever the prompt length (the rest of the context)
    long_prompt = "word " * (MAX_MODEL_LEN - 100)
    r = http(server.port, "POST", "/v1/chat/completions",
             {"model": MODEL, "messages": [{"role": "user", "content": long_prompt}], "temperature": 0,
              "extra": 1, "stop_token_ids": None, "ignore_eos": False})
    assert r.status == 200, r.body
    u = r.json()["usage"]
    assert u["total_tokens"] <= MAX_MODEL_LEN


# -- errors --------------------------------------------------------------------------------------
def _error(excinfo):
    return excinfo.value.body if isinstance(excinfo.value.body, dict) else {}


def test_unknown_model_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-nope", messages=MSGS)
    assert e.value.status_code == 404 and e.value.code == "model_not_found" and "gpt-nope" in e.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-nope", messages=MSGS, stream=True)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-nope")


@pytest.mark.parametrize("extra, param", [
    ({"temperature": 3}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 0}, "n"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"presence_penalty": 5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"1": 500}}, "logit_bias"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stop": 5}, "stop"),
    ({"seed": "x"}, "seed"),
    ({"tools": [{"type": "function", "function": {"name": "no spaces allowed"}}]}, "tools[0].function.name"),
    ({"tools": []}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
     "messages[0].content[0].type"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "function", "content": "x", "name": "f"}]}, "messages[0].role"),
    ({"messages": [{"content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"top_k": -5}, "top_k"),
    ({"min_p": 2}, "min_p"),
    ({"stop_token_ids": ["a"]}, "stop_token_ids"),
    ({"min_tokens": 10}, "min_tokens"),
    ({"max_tokens": None, "min_tokens": 5000}, "min_tokens"),
    ({"n": 1000}, "n"),
])
def test_invalid_values_400_naming_param(server, extra, param):
    body = {"model": MODEL, "messages": MSGS, "max_tokens": 4, **extra}
    for stream in (False, True):
        if "stream_options" in extra and stream:
            continue
        r = http(server.port, "POST", "/v1/chat/completions", {**body, "stream": stream})
        assert r.status == 400, (extra, r.body)
        assert r.headers["content-type"] == "application/json"
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["type"] == "invalid_request_error" and err["param"] == param, err
        assert err["message"]


def test_bad_json_and_missing_fields(server):
    for raw, param in [(b"{not json", None), (b"[1, 2]", None), (b"", None), (b'{"temperature": NaN}', None),
                       (b'{"model": "%s"}' % MODEL.encode(), "messages"), (b"\xff\xfe\x00", None)]:
        r = http(server.port, "POST", "/chat/completions", raw=raw)
        assert r.status == 400 and r.json()["error"]["param"] == param, (raw, r.body)
    r = http(server.port, "POST", "/completions", {"model": MODEL})
    assert r.status == 400 and r.json()["error"]["param"] == "prompt"


def test_context_length_exceeded(client, server):
    phrase = f"maximum context length is {MAX_MODEL_LEN} tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello " * MAX_MODEL_LEN}])
    assert e.value.code == "context_length_exceeded" and phrase in e.value.message
    with pytest.raises(openai.BadRequestError) as e:  # the prompt fits, prompt + max_tokens does not
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi " * (MAX_MODEL_LEN // 2)}],
                                       max_tokens=MAX_MODEL_LEN * 3 // 4, stream=True)
    assert e.value.code == "context_length_exceeded" and phrase in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=list(range(MAX_MODEL_LEN - 20)), max_tokens=100)
    assert e.value.code == "context_length_exceeded" and e.value.param == "prompt" and phrase in e.value.message


def test_error_after_stream_started_is_an_event(make_server):
    """An abort while streaming (here: the server's shutdown deadline) ends the stream with an
    error event and [DONE], which the openai client raises as APIError."""
    import threading
    import time

    srv = make_server(shutdown_timeout=0.5)
    c = OpenAI(api_key="x", base_url=srv.url, max_retries=0)
    stream = c.chat.completions.create(model=MODEL, messages=MSGS, stream=True, max_tokens=400,
                                       extra_body={"ignore_eos": True})
    got = []
    stopper = threading.Thread(target=lambda: (time.sleep(0.3), srv.stop(timeout=0.5)))
    with pytest.raises(openai.APIError) as e:
        for chunk in stream:
            got.append(chunk)
            if len(got) == 2:
                stopper.start()
    stopper.join()
    assert "shutting down" in e.value.message and got
    assert not srv.app.active_requests


# -- legacy completions --------------------------------------------------------------------------
def test_completions_prompt_forms(client, server):
    tok = server.app.engine.tokenizer
    ids = tok.encode("The capital of France is", add_special_tokens=True)
    a = client.completions.create(model=MODEL, prompt="The capital of France is", **SHORT)
    b = client.completions.create(model=MODEL, prompt=ids, **SHORT)
    assert a.object == "text_completion" and a.id.startswith("cmpl-")
    assert a.choices[0].text == b.choices[0].text and a.choices[0].text
    assert a.usage.prompt_tokens == len(ids) and a.usage.completion_tokens == 8
    multi = client.completions.create(model=MODEL, prompt=["The capital of France is", "One, two,"], n=2, **SHORT)
    assert [c.index for c in multi.choices] == [0, 1, 2, 3]
    assert multi.choices[0].text == multi.choices[1].text == a.choices[0].text  # greedy
    assert multi.usage.completion_tokens == 32
    lists = client.completions.create(model=MODEL, prompt=[ids, ids[:3]], **SHORT)
    assert lists.choices[0].text == a.choices[0].text and len(lists.choices) == 2


def test_completions_streaming(client, lax_client):
    whole = client.completions.create(model=MODEL, prompt="Once upon a time", **SHORT)
    chunks = list(lax_client.completions.create(model=MODEL, prompt="Once upon a time", stream=True,
                                            stream_options={"include_usage": True}, **SHORT))
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert [c.choices[0].finish_reason for c in chunks[:-1] if c.choices[0].finish_reason] == ["length"]


def test_completions_echo_and_logprobs(client, lax_client, server):
    tok = server.app.engine.tokenizer
    prompt = "The capital of France is"
    n_prompt = len(tok.encode(prompt))
    # the first prompt token has no logprob: null, as OpenAI and vLLM send it (the SDK types say float,
    # so this needs the non-strict client)
    r = lax_client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=2, max_tokens=4,
                                      temperature=0)
    ch = r.choices[0]
    assert ch.text.startswith(prompt) and len(ch.text) > len(prompt)
    lp = ch.logprobs
    assert len(lp.tokens) == n_prompt + 4 == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert all(2 <= len(t) <= 3 for t in lp.top_logprobs[n_prompt:])  # top 2, plus the sampled token
    assert "".join(lp.tokens) == ch.text
    plain = client.completions.create(model=MODEL, prompt=prompt, logprobs=0, max_tokens=4, temperature=0)
    assert len(plain.choices[0].logprobs.tokens) == 4 and plain.choices[0].text == ch.text[len(prompt):]
    chunks = list(lax_client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=1, max_tokens=4,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == ch.text
    streamed = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert streamed == lp.tokens


def test_completions_rejects_what_it_cannot_honour(server):
    for extra, param in [({"suffix": "x"}, "suffix"), ({"best_of": 3}, "best_of"), ({"logprobs": 30}, "logprobs"),
                         ({"logprobs": True}, "logprobs"), ({"prompt": []}, "prompt"), ({"prompt": [1, "a"]}, "prompt"),
                         ({"prompt": [10 ** 9]}, "prompt"), ({"echo": "yes"}, "echo")]:
        r = http(server.port, "POST", "/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2, **extra})
        assert r.status == 400 and r.json()["error"]["param"] == param, (extra, r.body)


# -- models, tokenize ----------------------------------------------------------------------------
def test_models(client, client_v1):
    for c in (client, client_v1):
        models = c.models.list()
        assert [m.id for m in models.data] == [MODEL, "lamina-alias"]
        assert all(m.object == "model" and isinstance(m.created, int) and m.owned_by for m in models.data)
        assert c.models.retrieve("lamina-alias").id == "lamina-alias"
    r = client.chat.completions.create(model="lamina-alias", messages=MSGS, max_tokens=2)
    assert r.model == "lamina-alias"


def test_tokenize_detokenize(server):
    for prefix in ("", "/v1"):
        r = http(server.port, "POST", prefix + "/tokenize", {"model": MODEL, "prompt": "Hello world",
                                                             "return_token_strs": True})
        assert r.status == 200
        out = r.json()
        assert out["count"] == len(out["tokens"]) > 0 and out["max_model_len"] == MAX_MODEL_LEN
        assert "".join(out["token_strs"]) == "Hello world"
        back = http(server.port, "POST", prefix + "/detokenize", {"model": MODEL, "tokens": out["tokens"]})
        assert back.json() == {"prompt": "Hello world"}
    chat = http(server.port, "POST", "/tokenize", {"messages": MSGS}).json()
    r = http(server.port, "POST", "/chat/completions", {"messages": MSGS, "max_tokens": 1}).json()
    assert chat["count"] == r["usage"]["prompt_tokens"]
    assert http(server.port, "POST", "/detokenize", {"tokens": [-1]}).status == 400


def test_completions_echo_max_tokens_0_scores_the_prompt(server, lax_client):
    """lm-eval's loglikelihood request: echo + logprobs + max_tokens=0 returns the prompt, scored."""
    prompt = "The capital of France is Paris"
    n_prompt = len(server.app.engine.tokenizer.encode(prompt))
    r = lax_client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=1, max_tokens=0)
    ch = r.choices[0]
    assert ch.text == prompt and r.usage.completion_tokens == 0 and r.usage.prompt_tokens == n_prompt
    assert len(ch.logprobs.token_logprobs) == n_prompt and ch.logprobs.token_logprobs[0] is None
    assert all(v < 0 for v in ch.logprobs.token_logprobs[1:])
