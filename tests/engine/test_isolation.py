"""One request's failure stays its own: the engine fails it and keeps serving everyone else; prompt
logprobs are the same numbers whatever the prefix cache or a preemption did."""
import asyncio

import pytest

from lamina.engine.async_engine import AsyncEngine
from lamina.engine.errors import ContextLengthExceeded, EngineDeadError, RequestError, RequestFailedError
from lamina.sampling_params import SamplingParams
from tests.engine.test_engine import make_engine, random_prompts, run

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def _break_sampling(engine, request_id):
    """What a validation gap would let through: a top_k that overflows inside the step's sampler
    (the OpenAI route once let 2**64 reach it)."""
    for seq in engine.requests[request_id].seqs:
        seq.params.top_k = 2 ** 64


@pytest.mark.breaks_steps
def test_a_failing_request_fails_alone(tiny_model_dir):
    engine = make_engine(tiny_model_dir)
    prompts = random_prompts(4, seed=21)
    alone = run(make_engine(tiny_model_dir), prompts)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", {"prompt_token_ids": p}, GREEDY)
    engine.add_request("bad", {"prompt_token_ids": prompts[0]}, SamplingParams(max_tokens=12, temperature=0.7, n=2))
    _break_sampling(engine, "bad")
    outs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out
        engine.block_manager.check_invariants()
    bad = outs.pop("bad")
    assert bad.error and bad.finish_reason == "error" and all(o.finish_reason == "error" for o in bad.outputs)
    for i, a in enumerate(alone):
        assert outs[f"r{i}"].outputs[0].token_ids == a.outputs[0].token_ids
    # nothing is held by the failed request, and the engine serves on
    assert engine.block_manager.num_used_blocks == 0
    assert run(engine, prompts[:1])[0].outputs[0].token_ids == alone[0].outputs[0].token_ids
    assert engine.stats.request_success_total.get("error") == 2


@pytest.mark.breaks_steps
def test_llm_stream_raises_for_a_failed_request(tiny_model_dir):
    from lamina import LLM
    llm = LLM(tiny_model_dir, dtype="float32", kv_cache_memory=32 << 20)
    engine = llm.engine
    original = engine.add_request

    def add_and_break(request_id, prompt, params=None, **kw):
        rid = original(request_id, prompt, params, **kw)
        _break_sampling(engine, rid)
        return rid

    engine.add_request = add_and_break
    with pytest.raises(RequestFailedError):
        list(llm.stream([5, 6, 7], SamplingParams(max_tokens=4, temperature=0.7)))
    engine.add_request = original
    assert not engine.has_unfinished_requests()
    out = llm.generate([[5, 6, 7], [8, 9]], GREEDY, use_tqdm=False)
    assert [o.finish_reason for o in out] == ["length", "length"]


@pytest.mark.parametrize("case", ["prefix-cache", "preemption"])
def test_prompt_logprobs_equal_with_caching_off(tiny_model_dir, case):
    prompt = random_prompts(1, seed=4, lo=61, hi=61)[0]
    params = SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=2, ignore_eos=True)
    reference = run(make_engine(tiny_model_dir, enable_prefix_caching=False), [prompt], params)[0]
    assert len(reference.prompt_logprobs) == len(prompt)
    if case == "prefix-cache":
        engine = make_engine(tiny_model_dir)
        run(engine, [prompt], params)   # its blocks are cached now
        again = run(engine, [prompt], params)[0]
    else:
        # 5 blocks of 16: the long request is preempted by the ones admitted beside it and
        # recomputed from its start, prompt included
        engine = make_engine(tiny_model_dir, num_kv_blocks=6, max_num_batched_tokens=16)
        others = random_prompts(2, seed=9, lo=15, hi=15)
        outs = run(engine, [prompt, *others], SamplingParams(max_tokens=30, temperature=0, prompt_logprobs=2,
                                                               ignore_eos=True), stagger=1)
        assert engine.stats.num_preemptions_total > 0
        again = outs[0]
        reference = run(make_engine(tiny_model_dir, enable_prefix_caching=False), [prompt],
                        SamplingParams(max_tokens=30, temperature=0, prompt_logprobs=2, ignore_eos=True))[0]
    assert len(again.prompt_logprobs) == len(reference.prompt_logprobs)
    for a, b in zip(again.prompt_logprobs[1:], reference.prompt_logprobs[1:]):
        assert a.token_id == b.token_id
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [t for t, _ in a.top] == [t for t, _ in b.top]


# -- the async engine --------------------------------------------------------------------------------
async def _collect(engine, prompt, params):
    return [out async for out in engine.generate(prompt, params)]


@pytest.mark.breaks_steps
def test_async_engine_fails_one_stream_and_serves_the_rest(tiny_model_dir):
    engine = AsyncEngine(make_engine(tiny_model_dir))
    original = engine.engine.add_request

    def add(request_id, prompt, params=None, **kw):
        rid = original(request_id, prompt, params, **kw)
        if params.seed == 666:
            _break_sampling(engine.engine, rid)
        return rid

    engine.engine.add_request = add

    async def main():
        good = asyncio.create_task(_collect(engine, [5, 6, 7], GREEDY))
        bad = asyncio.create_task(_collect(engine, [5, 6, 7], SamplingParams(max_tokens=8, temperature=0.7, seed=666)))
        done = await asyncio.gather(good, bad, return_exceptions=True)
        return done

    try:
        good, bad = asyncio.run(main())
        assert isinstance(bad, RequestFailedError)
        assert good[-1].finished and good[-1].outputs[0].finish_reason == "length"
        assert engine.is_alive
    finally:
        engine.shutdown()


def test_async_engine_refuses_a_request_before_any_output_and_serves_the_rest(tiny_model_dir):
    """A request the engine refuses (checked once, where the engine adds it) raises its typed error
    from the stream before any output, naming the parameter; the others are served."""
    engine = AsyncEngine(make_engine(tiny_model_dir, max_model_len=64))

    async def main():
        return await asyncio.gather(_collect(engine, [5, 6, 7], GREEDY),
                                    _collect(engine, [1] * 60, SamplingParams(max_tokens=10)),
                                    _collect(engine, [10 ** 6], GREEDY), return_exceptions=True)

    try:
        good, too_long, bad_id = asyncio.run(main())
        assert isinstance(too_long, ContextLengthExceeded) and too_long.param == "prompt"
        assert isinstance(bad_id, RequestError) and bad_id.param == "prompt" and "token ids" in str(bad_id)
        assert good[-1].finished and len(good[-1].outputs[0].token_ids) == 12
        assert engine.is_alive and not engine.engine.has_unfinished_requests()
    finally:
        engine.shutdown()


def test_async_engine_death_fails_streams_and_is_reported(tiny_model_dir):
    died = []
    engine = AsyncEngine(make_engine(tiny_model_dir), on_death=died.append)

    def broken():
        raise RuntimeError("the scheduler broke")

    async def main():
        first = [out async for out in engine.generate([5, 6], SamplingParams(max_tokens=2))]
        assert first[-1].finished
        engine.engine.scheduler.schedule = broken   # a bug outside any one request: fatal
        with pytest.raises(EngineDeadError):
            await _collect(engine, [5, 6, 7], GREEDY)
        # registration after the death never hangs
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(_collect(engine, [5, 6, 7], GREEDY), 10)

    try:
        asyncio.run(main())
        assert len(died) == 1 and isinstance(died[0], RuntimeError) and not engine.is_alive
    finally:
        engine.shutdown()


def test_async_engine_shutdown_fails_in_flight_streams(tiny_model_dir):
    engine = AsyncEngine(make_engine(tiny_model_dir))

    async def main():
        stream = engine.generate([5, 6, 7], SamplingParams(max_tokens=400, ignore_eos=True))
        first = await stream.__anext__()
        assert not first.finished
        await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            await _collect(engine, [5], GREEDY)

    asyncio.run(main())
