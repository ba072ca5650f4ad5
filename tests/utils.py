"""Helpers shared by the tests: tiny random Hugging Face checkpoints and a bare paged-cache runner."""
from __future__ import annotations

import torch

from lamina.kernels import AttentionMetadata

TINY = dict(vocab_size=264, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)


def save_tiny_hf_model(path, arch: str = "llama", seed: int = 0, **overrides):
    """Write a random transformers checkpoint to `path`; returns the transformers model (float32)."""
    import transformers
    torch.manual_seed(seed)
    kwargs = {**TINY, **overrides}
    if arch == "qwen2":
        cfg = transformers.Qwen2Config(**kwargs)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(**kwargs)
        model = transformers.LlamaForCausalLM(cfg)
    # random init leaves norms at 1; perturb them so a wrong norm cannot hide
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    model.eval()
    model.save_pretrained(path)
    save_tiny_tokenizer(path)
    return model


CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def save_tiny_tokenizer(path):
    """A byte-level BPE over the 256 bytes (no merges) plus ChatML special tokens: ids 256-258."""
    import json
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    alphabet = ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet, key=lambda c: _byte_of(c)))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.save(str(path / "tokenizer.json") if hasattr(path, "joinpath") else f"{path}/tokenizer.json")
    cfg = {"chat_template": CHATML, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
    with open(f"{path}/tokenizer_config.json", "w") as f:
        json.dump(cfg, f)
    with open(f"{path}/generation_config.json", "w") as f:
        json.dump({"eos_token_id": [256, 258]}, f)


def _byte_of(ch: str) -> int:
    from lamina.tokenizer import _byte_decoder
    return _byte_decoder()[ch]


def count_step_calls(obj, name: str) -> dict:
    """Wrap obj.<name>(input_ids, positions, md) (a runner's step): counts its calls and the batch
    sizes it saw, in the returned dict."""
    calls = {"calls": 0, "sizes": set()}
    inner = getattr(obj, name)

    def counting(input_ids, positions, md):
        calls["calls"] += 1
        calls["sizes"].add(md.num_seqs)
        return inner(input_ids, positions, md)

    setattr(obj, name, counting)
    return calls


class PagedRunner:
    """Runs a lamina model over whole sequences with a trivially allocated paged cache."""

    def __init__(self, model, num_blocks: int = 64, block_size: int = 16):
        cfg = model.config
        dtype, self.device = next(model.parameters()).dtype, next(model.parameters()).device
        shape = (num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(cfg.num_hidden_layers)]
        model.bind_kv_caches(self.k, self.v)
        self.model, self.block_size, self.num_blocks = model, block_size, num_blocks
        self.next_block = 0
        self.tables: list[list[int]] = []
        self.lens: list[int] = []

    def add_sequence(self) -> int:
        self.tables.append([])
        self.lens.append(0)
        return len(self.tables) - 1

    def step(self, new_tokens: dict[int, list[int]], all_logits: bool = False) -> torch.Tensor:
        """Feed new tokens to several sequences at once; returns logits (last token of each, or all)."""
        ids, pos, slots, qsl, seq_lens = [], [], [], [0], []
        for sid, toks in new_tokens.items():
            for t in toks:
                p = self.lens[sid]
                if p // self.block_size >= len(self.tables[sid]):
                    self.tables[sid].append(self.next_block)
                    self.next_block += 1
                block = self.tables[sid][p // self.block_size]
                ids.append(t)
                pos.append(p)
                slots.append(block * self.block_size + p % self.block_size)
                self.lens[sid] += 1
            qsl.append(qsl[-1] + len(toks))
            seq_lens.append(self.lens[sid])
        width = max(len(self.tables[s]) for s in new_tokens)
        tables = [self.tables[s] + [0] * (width - len(self.tables[s])) for s in new_tokens]
        dev = dict(device=self.device)
        md = AttentionMetadata(
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, **dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, **dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, **dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, **dev),
            max_query_len=max(len(t) for t in new_tokens.values()),
            max_seq_len=max(seq_lens),
            logits_indices=None if all_logits else torch.tensor(qsl[1:], dtype=torch.int64, **dev) - 1,
        )
        with torch.no_grad():
            return self.model(torch.tensor(ids, **dev), torch.tensor(pos, **dev), md)
