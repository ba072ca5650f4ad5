"""Stop strings across token boundaries, streaming hold-back, and the async engine's streams."""
import asyncio
import re

import pytest

from lamina import LLM, SamplingParams
from lamina.config import EngineConfig
from lamina.engine.async_engine import AsyncEngine

FREE = dict(max_tokens=60, temperature=0, ignore_eos=True)
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir, dtype="float32", kv_cache_memory=32 << 20)


@pytest.fixture(scope="module")
def free_text(llm):
    out = llm.generate(PROMPT, SamplingParams(**FREE))[0]
    assert out.finish_reason == "length"
    return out.text


def ascii_window(text, width=3):
    m = re.search("[^\ufffd]{%d}" % width, text[1:])
    assert m, f"no clean run in {text!r}"
    return m.start() + 1, m.group()


def test_stop_string_spanning_tokens(llm, free_text):
    idx, stop = ascii_window(free_text)
    idx = free_text.index(stop)  # first occurrence
    out = llm.generate(PROMPT, SamplingParams(**FREE, stop=[stop]))[0]
    assert out.text == free_text[:idx]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == stop
    kept = llm.generate(PROMPT, SamplingParams(**FREE, stop=[stop], include_stop_str_in_output=True))[0]
    assert kept.text == free_text[:idx + len(stop)]


def test_stream_never_shows_part_of_a_stop_string(llm, free_text):
    _, stop = ascii_window(free_text)
    idx = free_text.index(stop)
    deltas = list(llm.stream(PROMPT, SamplingParams(**FREE, stop=[stop])))
    assert "".join(deltas) == free_text[:idx]
    # a stop string whose first characters do occur, but never the whole: nothing may be lost
    near_miss = stop[:2] + "\x01never"
    deltas = list(llm.stream(PROMPT, SamplingParams(**FREE, stop=[near_miss])))
    assert "".join(deltas) == free_text
    # and while streaming, text that could start the stop string is held back until ruled out
    seen = ""
    for d in llm.stream(PROMPT, SamplingParams(**FREE, stop=[stop])):
        seen += d
        assert stop not in seen and not any(seen.endswith(stop[:k]) and seen + stop[k:] in free_text[:idx + len(stop)]
                                            and len(seen) == idx + k for k in range(1, len(stop)))


def test_stream_equals_generate(llm, free_text):
    assert "".join(llm.stream(PROMPT, SamplingParams(**FREE))) == free_text


def test_async_engine_streams_and_aborts(tiny_model_dir):
    engine = AsyncEngine(EngineConfig(model=tiny_model_dir, dtype="float32", kv_cache_memory=32 << 20))
    try:
        async def full(i):
            text, n = "", 0
            async for out in engine.generate(f"prompt {i}", SamplingParams(**FREE), request_id=f"full{i}"):
                text += out.outputs[0].delta_text
                n += len(out.outputs[0].delta_token_ids)
                last = out
            assert last.finished and n == 60 and text == last.outputs[0].text
            return text

        async def leave_early():
            got = 0
            async for _ in engine.generate("leave", SamplingParams(max_tokens=500, temperature=0, ignore_eos=True),
                                           request_id="early"):
                got += 1
                if got == 3:
                    break

        async def main():
            texts = await asyncio.gather(*(full(i) for i in range(8)), leave_early())
            return texts[:8]

        texts = asyncio.run(main())
        assert len(set(texts)) > 1
        for _ in range(100):  # the abort reaches the step thread asynchronously
            if engine.stats.num_running == 0 and engine.stats.kv_blocks_used == 0:
                break
            asyncio.run(asyncio.sleep(0.02))
        assert engine.stats.num_running == 0 and engine.stats.kv_blocks_used == 0
        assert engine.stats.request_success_total.get("abort") == 1
    finally:
        engine.shutdown()


def test_llm_takes_bigger_steps_than_a_server_by_default(llm, tiny_model_dir):
    """LLM (offline) steps take up to OFFLINE_MAX_NUM_BATCHED_TOKENS new tokens, EngineConfig's
    (the server's) fewer; an explicit budget wins, and the chunking changes no token."""
    from lamina.llm import OFFLINE_MAX_NUM_BATCHED_TOKENS
    assert llm.engine.config.max_num_batched_tokens == OFFLINE_MAX_NUM_BATCHED_TOKENS
    assert EngineConfig().max_num_batched_tokens < OFFLINE_MAX_NUM_BATCHED_TOKENS
    small = LLM(tiny_model_dir, dtype="float32", kv_cache_memory=32 << 20, max_num_batched_tokens=16)
    assert small.engine.config.max_num_batched_tokens == 16
    prompts = [{"prompt_token_ids": [(7 * i + j) % 250 for j in range(40 + 9 * i)]} for i in range(6)]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    big_steps = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert [o.outputs[0].token_ids for o in small.generate(prompts, params)] == big_steps
