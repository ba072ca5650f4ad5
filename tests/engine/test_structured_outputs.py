"""Grammar-constrained decoding in the engine: the allowed-token masks against a brute-force check,
the output against its grammar whatever the batch, preemption or prefix cache did, and grammars
compiled without holding up anyone else's tokens."""
import json
import random
import re
import threading
import time

import pytest

from lamina.engine.errors import RequestError
from lamina.engine.grammar import GrammarCompiler
from lamina.sampling_params import SamplingParams, StructuredOutputs
from tests.engine.test_engine import make_engine, random_prompts, run

# the tiny model's tokenizer has one token per byte (ids 0-255); its EOS ids are the engine's

# finite languages, so the brute force can list every output the grammar allows
FINITE = [
    (StructuredOutputs(choice=["cat", "cats", "dog", "do"]), ["cat", "cats", "dog", "do"]),
    (StructuredOutputs(regex=r"(ab|a)c?-[0-2]"), [f"{p}{c}-{d}" for p in ("ab", "a") for c in ("", "c")
                                                for d in "012"]),
    (StructuredOutputs(json={"type": "object", "properties": {"k": {"enum": [1, "x", None]}},
                             "required": ["k"], "additionalProperties": False}),
     ['{"k": 1}', '{"k": "x"}', '{"k": null}']),
    (StructuredOutputs(grammar='root ::= "(" ("0" | "1")? ")" | "()()"'), ["()", "(0)", "(1)", "()()"]),
]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return make_engine(tiny_model_dir, max_num_seqs=32)


def _text(token: int) -> str:
    return bytes([token]).decode("latin-1")


@pytest.mark.parametrize("spec, language", FINITE, ids=lambda v: getattr(v, "kind", ""))
def test_masks_equal_a_brute_force_check_of_every_token(engine, spec, language):
    """At every point of random walks through the grammar, the mask allows exactly the tokens that
    continue some word of the language, and EOS exactly where the text is a whole word."""
    compiled = engine.grammars.compile(spec).result()
    width = engine.model_config.vocab_size
    rng = random.Random(0)
    for _ in range(6):
        state, prefix = compiled.new_state(), ""
        while not state.finished:
            allowed = engine.token_masks.allowed([state], engine.runner.device)[0].tolist()
            eos = engine.eos_token_ids
            expect = [t < 256 and t not in eos and any(w.startswith(prefix + _text(t)) for w in language)
                      for t in range(width)]
            for t in eos:
                expect[t] = prefix in language
            assert allowed == expect, prefix
            token = rng.choice([t for t in range(width) if expect[t]])
            state.advance(token)
            if token in eos:
                break
            prefix += _text(token)
        assert prefix in language


def _generate(engine, prompts, params):
    outs = run(engine, prompts, params)
    return [[o.text for o in out.outputs] for out in outs]


@pytest.mark.parametrize("spec, language", FINITE, ids=lambda v: getattr(v, "kind", ""))
def test_output_is_a_word_and_ends_without_eos(engine, spec, language):
    prompts = random_prompts(3, seed=3)
    for params in (SamplingParams(max_tokens=40, temperature=0, structured_outputs=spec),
                   SamplingParams(max_tokens=40, temperature=1.0, n=4, seed=5, structured_outputs=spec)):
        outs = run(engine, prompts, params)
        for out in outs:
            for o in out.outputs:
                assert o.text in language and o.finish_reason == "stop", o
                if o.token_ids[-1] in engine.eos_token_ids:   # only where the word could have gone on
                    assert any(w != o.text and w.startswith(o.text) for w in language)


def test_constrained_and_free_requests_share_steps(tiny_model_dir):
    """A free request gives the same tokens beside constrained ones as alone; the constrained ones
    match their grammars."""
    prompts = random_prompts(8, seed=11)
    free = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    alone = run(make_engine(tiny_model_dir), prompts[:4], free)
    engine = make_engine(tiny_model_dir)
    specs = [s for s, _ in FINITE]
    for i, p in enumerate(prompts):
        params = free if i < 4 else SamplingParams(max_tokens=40, temperature=0.8, seed=i,
                                                   structured_outputs=specs[i % len(specs)])
        engine.add_request(f"r{i}", {"prompt_token_ids": p}, params)
    outs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out
        engine.block_manager.check_invariants()
    for i in range(4):
        assert outs[f"r{i}"].outputs[0].token_ids == alone[i].outputs[0].token_ids
    for i in range(4, 8):
        assert outs[f"r{i}"].outputs[0].text in FINITE[i % len(FINITE)][1]


LONG_JSON = StructuredOutputs(json={"type": "object", "properties": {"items": {
    "type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 25, "maxItems": 25}},
    "required": ["items"], "additionalProperties": False})


@pytest.mark.parametrize("case", ["preemption", "prefix-cache"])
def test_preemption_and_prefix_hits_change_nothing(tiny_model_dir, case):
    """A constrained request preempted mid-output (and recomputed, its own blocks then hit in the
    prefix cache) gives the same output as an uninterrupted run, sampled with a seed."""
    prompt = random_prompts(1, seed=4, lo=40, hi=40)[0]
    params = SamplingParams(max_tokens=150, temperature=0.9, seed=7, structured_outputs=LONG_JSON)
    reference = run(make_engine(tiny_model_dir, enable_prefix_caching=False), [prompt], params)[0].outputs[0]
    json.loads(reference.text)
    if case == "preemption":
        engine = make_engine(tiny_model_dir, num_kv_blocks=12, max_num_batched_tokens=16)
        others = random_prompts(3, seed=9, lo=30, hi=30)
        outs = run(engine, [prompt, *others], params, stagger=1)
        assert engine.stats.num_preemptions_total > 0
        assert engine.stats.prefix_cache_hits_total > 0
    else:
        engine = make_engine(tiny_model_dir)
        run(engine, [prompt], SamplingParams(max_tokens=1, temperature=0))   # its prompt's blocks are cached
        outs = run(engine, [prompt], params)
        assert outs[0].num_cached_tokens > 0
    got = outs[0].outputs[0]
    assert got.token_ids == reference.token_ids and got.text == reference.text


def test_a_slow_compile_does_not_delay_other_requests(tiny_model_dir, monkeypatch):
    """While one request's grammar compiles, the others decode; it then runs, and ends valid."""
    engine = make_engine(tiny_model_dir)
    release = threading.Event()
    real = GrammarCompiler._compile

    def slow(self, spec):
        release.wait(30)
        return real(self, spec)

    monkeypatch.setattr(GrammarCompiler, "_compile", slow)
    prompts = random_prompts(2, seed=1)
    engine.add_request("constrained", {"prompt_token_ids": prompts[0]},
                       SamplingParams(max_tokens=20, temperature=0, structured_outputs={"regex": "[a-c]{5}"}))
    engine.add_request("free", {"prompt_token_ids": prompts[1]},
                       SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    finished = {}
    t0 = time.monotonic()
    while "free" not in finished:
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        assert time.monotonic() - t0 < 60
    assert "constrained" not in finished and len(finished["free"].outputs[0].token_ids) == 20
    assert not engine.requests["constrained"].seqs[0].token_ids[len(prompts[0]):]   # it has not started
    release.set()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert re.fullmatch("[a-c]{5}", finished["constrained"].outputs[0].text)


def test_invalid_grammars_are_request_errors(engine, tiny_model_dir):
    from lamina.llm import LLM
    for spec, param in [({"regex": "a(b"}, "structured_outputs.regex"),
                        ({"json": {"type": "nope"}}, "structured_outputs.json"),
                        ({"json": "{not json"}, "structured_outputs.json"),
                        ({"grammar": "root ::= ("}, "structured_outputs.grammar"),
                        ({"choice": []}, "structured_outputs.choice")]:
        with pytest.raises(RequestError) as e:
            spec = StructuredOutputs.of(spec)
            engine.grammars.compile(spec).result()
        assert e.value.param == param, (spec, e.value.param)
    # the engine itself fails a request whose grammar does not compile, and serves on
    engine.add_request("bad", {"prompt_token_ids": [1, 2, 3]},
                       SamplingParams(max_tokens=4, structured_outputs={"regex": "(("}))
    out = [o for _ in range(50) for o in engine.step() if o.request_id == "bad"]
    assert out and out[-1].finish_reason == "error" and "regular expression" in out[-1].error
    assert run(engine, [[1, 2, 3]], SamplingParams(max_tokens=3, temperature=0))[0].finish_reason == "length"
    llm = LLM.__new__(LLM)   # the library raises before anything runs
    llm.engine = engine
    with pytest.raises(RequestError):
        llm.generate([[1, 2]], SamplingParams(structured_outputs={"regex": "(("}), use_tqdm=False)
