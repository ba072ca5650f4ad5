"""Request validation: every numeric field bounded, token ids checked against the logits' width,
stop strings bounded, typed errors that carry `param`, and admission that counts sequences."""
from __future__ import annotations

import json

import pytest

from lamina.engine.errors import ContextLengthExceeded, RequestError, context_length_exceeded
from lamina.sampling_params import SamplingParams
from tests.server.helpers import MODEL, Conn, Proxy, http, request_bytes

MSGS = [{"role": "user", "content": "Hi"}]


def _completion(**extra):
    return {"model": MODEL, "prompt": "hi", "max_tokens": 2, "temperature": 0.7, **extra}


def _assert_400(r, param):
    assert r.status == 400, r.body
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err


@pytest.mark.parametrize("extra, param", [
    ({"top_k": 18446744073709551616}, "top_k"),     # the request: it overflowed inside engine.step
    ({"top_k": 2 ** 63}, "top_k"),
    ({"seed": 2 ** 64}, "seed"),
    ({"seed": -(2 ** 63) - 1}, "seed"),
    ({"repetition_penalty": 1e300}, "repetition_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"presence_penalty": 1e300}, "presence_penalty"),
    ({"frequency_penalty": -1e300}, "frequency_penalty"),
    ({"temperature": 1e300}, "temperature"),
    ({"top_p": -0.5}, "top_p"),
    ({"min_p": 1.5}, "min_p"),
    ({"n": 2 ** 40}, "n"),
    ({"best_of": 2 ** 40}, "best_of"),
    ({"max_tokens": 2 ** 70}, "max_tokens"),
    ({"min_tokens": 2 ** 70}, "min_tokens"),
    ({"logprobs": 2 ** 70}, "logprobs"),
    ({"logit_bias": {str(2 ** 70): 1}}, "logit_bias"),
    ({"logit_bias": {"-1": 1}}, "logit_bias"),
    ({"logit_bias": {"1": 1e300}}, "logit_bias"),
    ({"stop_token_ids": [2 ** 70]}, "stop_token_ids"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),            # OpenAI allows 4
    ({"stop": "x" * 100_000}, "stop"),
])
def test_numeric_and_stop_bounds(server, extra, param):
    _assert_400(http(server.port, "POST", "/v1/completions", _completion(**extra)), param)
    assert http(server.port, "GET", "/health").status == 200
    r = http(server.port, "POST", "/v1/completions", _completion())  # the engine still serves
    assert r.status == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_chat_bounds(server):
    body = {"model": MODEL, "messages": MSGS, "max_tokens": 2}
    for extra, param in [({"top_k": 18446744073709551616}, "top_k"), ({"seed": 2 ** 64}, "seed"),
                         ({"max_completion_tokens": 2 ** 70}, "max_completion_tokens"),
                         ({"stop": ["1", "2", "3", "4", "5"]}, "stop"),
                         ({"logprobs": True, "top_logprobs": 2 ** 70}, "top_logprobs"),
                         ({"modalities": [[]]}, "modalities"), ({"modalities": ["text", "audio"]}, "modalities")]:
        _assert_400(http(server.port, "POST", "/v1/chat/completions", {**body, **extra}), param)
    # four stop strings of sane length are fine
    r = http(server.port, "POST", "/v1/chat/completions", {**body, "stop": ["a" * 200, "b", "c", "d"]})
    assert r.status == 200


def test_token_ids_checked_against_the_logits_width(make_server, engine):
    """A tokenizer can know more ids than the model has logits (added tokens): ids beyond the
    logits' width must be refused, not crash the sampler."""
    width = engine.engine.model_config.vocab_size
    big_tokenizer = Proxy(engine.tokenizer, vocab_size=width + 1000)
    srv = make_server(engine=Proxy(engine, tokenizer=big_tokenizer))
    for extra, param in [({"logit_bias": {str(width + 10): 5}}, "logit_bias"),
                         ({"stop_token_ids": [width + 10], "min_tokens": 1}, "stop_token_ids")]:
        _assert_400(http(srv.port, "POST", "/v1/completions", _completion(**extra)), param)
    r = http(srv.port, "POST", "/v1/completions", _completion(logit_bias={str(width - 1): 1}))
    assert r.status == 200
    assert http(srv.port, "GET", "/health").status == 200


# -- typed errors --------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, param", [
    ({"top_k": 2 ** 64}, "top_k"), ({"seed": 2 ** 64}, "seed"), ({"temperature": float("nan")}, "temperature"),
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"repetition_penalty": float("inf")},
                                                                    "repetition_penalty"),
    ({"presence_penalty": 3}, "presence_penalty"), ({"n": 0}, "n"), ({"max_tokens": -1}, "max_tokens"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"), ({"logprobs": 21}, "logprobs"),
    ({"prompt_logprobs": -1}, "prompt_logprobs"), ({"logit_bias": {3: 101}}, "logit_bias"),
    ({"logit_bias": {-3: 1}}, "logit_bias"), ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop": ["x"] * 5}, "stop"), ({"stop": ["x" * 10_000]}, "stop"),
])
def test_sampling_params_raise_typed_errors(kwargs, param):
    with pytest.raises(RequestError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param and e.value.message
    assert isinstance(e.value, ValueError)  # library callers that catch ValueError keep working


def test_token_ids_checked_against_a_width():
    p = SamplingParams(logit_bias={10: 1.0}, stop_token_ids=[3])
    p.check_token_ids(11)
    for width, kwargs, param in [(10, {"logit_bias": {10: 1.0}}, "logit_bias"), (3, {"stop_token_ids": [3]},
                                                                                    "stop_token_ids")]:
        with pytest.raises(RequestError) as e:
            SamplingParams(**kwargs).check_token_ids(width)
        assert e.value.param == param


def test_context_length_message_in_one_place():
    e = context_length_exceeded(512, 500, 100, "messages")
    assert isinstance(e, ContextLengthExceeded) and e.param == "messages" and e.code == "context_length_exceeded"
    assert e.message.startswith("This model's maximum context length is 512 tokens.")
    assert "600" in e.message and "messages" in e.message
    e = context_length_exceeded(512, 512, None, "prompt")
    assert "512" in e.message and e.param == "prompt"


def test_no_exception_text_parsing_in_the_server():
    import inspect

    from lamina.server import generate, openai_api
    for mod in (generate, openai_api):
        assert "split()[0]" not in inspect.getsource(mod)


# -- admission counts sequences ------------------------------------------------------------------
def test_admission_counts_n_times_prompts(make_server):
    srv = make_server(max_inflight_seqs=8)
    # 3 prompts x n=3 = 9 sequences can never fit in 8: a 400 that says why, not a 429 to retry
    r = http(srv.port, "POST", "/v1/completions", {"model": MODEL, "prompt": ["a", "b", "c"], "n": 3,
                                                    "max_tokens": 1})
    _assert_400(r, "n")
    assert "9" in r.json()["error"]["message"] and "8" in r.json()["error"]["message"]
    r = http(srv.port, "POST", "/v1/completions", {"model": MODEL, "prompt": ["a"] * 9, "max_tokens": 1})
    _assert_400(r, "prompt")
    # while 6 sequences run, a request for 3 more gets 429; one for 2 is served
    c = Conn(srv.port)
    c.send(request_bytes("POST", "/v1/completions", json.dumps(
        {"model": MODEL, "prompt": ["a", "b"], "n": 3, "max_tokens": 200, "ignore_eos": True,
         "stream": True}).encode()))
    assert c.read_response(head_only=True).status == 200
    assert srv.app.inflight == 6
    r = http(srv.port, "POST", "/v1/completions", {"model": MODEL, "prompt": "a", "n": 3, "max_tokens": 1})
    assert r.status == 429 and r.headers["retry-after"] and r.json()["error"]["code"] == "rate_limit_exceeded"
    r = http(srv.port, "POST", "/v1/completions", {"model": MODEL, "prompt": "a", "n": 2, "max_tokens": 1})
    assert r.status == 200
    c.close()
