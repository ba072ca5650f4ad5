"""The default model (SmolLM2-135M-Instruct from its Q4_1 GGUF) against transformers' own GGUF loader."""
import pytest
import torch

from lamina import LLM, SamplingParams
from lamina.models.loader import load_model
from tests.utils import PagedRunner

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "List three prime numbers.",
    "Translate 'good morning' into German.",
    "Who wrote Romeo and Juliet?",
    "Give me a tip for learning to code.",
    "What is 12 times 7?",
]


@pytest.fixture(scope="module")
def hf_model(default_model_dir, default_gguf_path):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, gguf_file=default_gguf_path,
                                                 dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def llm(default_model_dir):
    return LLM(default_model_dir, dtype="float32", kv_cache_memory=512 << 20)


def test_logits_equal_transformers_gguf(default_model_dir, hf_model, llm):
    tok = llm.get_tokenizer()
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPTS[0]}]), add_special_tokens=False)
    model = load_model(default_model_dir, dtype="float32")
    runner = PagedRunner(model, num_blocks=16)
    ours = runner.step({runner.add_sequence(): ids}, all_logits=True)
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0]
    assert (ours - ref).abs().max().item() <= 1e-3  # 30 layers of float32 summation order


def test_32_greedy_tokens_match_transformers(hf_model, llm):
    tok = llm.get_tokenizer()
    convs = [[{"role": "user", "content": p}] for p in PROMPTS]
    outs = llm.chat(convs, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    for conv, out in zip(convs, outs):
        ids = tok.encode(tok.apply_chat_template(conv), add_special_tokens=False)
        assert out.prompt_token_ids == ids
        assert out.outputs[0].token_ids == hf_greedy(hf_model, ids, 32), conv[0]["content"]


def hf_greedy(hf_model, ids, n):
    """transformers' greedy continuation, past EOS too (as lamina's ignore_eos)."""
    out, past, inp = [], None, torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            res = hf_model(inp, past_key_values=past, use_cache=True)
            past = res.past_key_values
            nxt = int(res.logits[0, -1].argmax())
            out.append(nxt)
            inp = torch.tensor([[nxt]])
    return out


def test_chat_answers_sensibly(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France? Answer in one word."}],
                   SamplingParams(max_tokens=16, temperature=0))[0]
    assert "Paris" in out.text and out.finish_reason == "stop"
