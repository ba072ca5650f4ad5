"""The whole model gives the same logits and greedy tokens with the Triton kernels as with the
torch reference ops (on the GPU where there is one, else interpreted on the CPU): the kernels are
wired in where the model expects them."""
import pytest
import torch

from lamina.config import ModelConfig
from lamina.kernels import get_backend
from lamina.models.llama import LlamaForCausalLM
from tests.utils import PagedRunner

CFG = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
           num_attention_heads=6, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
           rms_norm_eps=1e-5)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _model(backend: str, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(ModelConfig(**CFG), get_backend(backend, DEVICE).ops, max_len=256)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.2) if "norm" not in name else p.uniform_(0.5, 1.5)
    model.to(DEVICE)
    model.cos_sin_cache = model.cos_sin_cache.to(DEVICE)  # a plain attribute, not a buffer
    return model.eval()


def _generate(model, prompts, steps, block_size):
    """Chunked prefill of both prompts together, then greedy decode; returns tokens and logits."""
    runner = PagedRunner(model, num_blocks=32, block_size=block_size)
    sids = [runner.add_sequence() for _ in prompts]
    first = runner.step({s: p[:9] for s, p in zip(sids, prompts)})  # first chunk of each prompt
    logits = [first, runner.step({s: p[9:] for s, p in zip(sids, prompts)})]
    tokens = [logits[-1].argmax(-1).tolist()]
    for _ in range(steps):
        logits.append(runner.step({s: [t] for s, t in zip(sids, tokens[-1])}))
        tokens.append(logits[-1].argmax(-1).tolist())
    return tokens, logits


@pytest.mark.parametrize("block_size", [4, 16])
def test_triton_backend_matches_torch(block_size):
    prompts = [list(range(3, 23)), [100, 7, 7, 42, 5, 9, 11, 13, 17, 19, 23, 29, 31]]
    ref_model = _model("torch")
    tri_model = _model("triton")
    tri_model.load_state_dict(ref_model.state_dict())
    ref_tokens, ref_logits = _generate(ref_model, prompts, steps=6, block_size=block_size)
    tri_tokens, tri_logits = _generate(tri_model, prompts, steps=6, block_size=block_size)
    for ours, ref in zip(tri_logits, ref_logits):
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    assert tri_tokens == ref_tokens
