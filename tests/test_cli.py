"""The command line, run as a user runs it: a subprocess with stdin and stdout."""
import subprocess
import sys

import pytest

from tests.utils import save_tiny_hf_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli-tiny")
    save_tiny_hf_model(path)
    return str(path)


def lamina(*args, stdin=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "lamina", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout)


def test_help_documents_every_command_and_flag():
    top = lamina("--help")
    assert top.returncode == 0
    for cmd in ("serve", "chat", "generate", "pull", "bench"):
        assert cmd in top.stdout
    serve = lamina("serve", "--help").stdout
    for flag in ("--model", "--dtype", "--quantization", "--kv-cache-memory", "--max-num-seqs", "--host",
                 "--port", "--api-key", "--served-model-name", "--enforce-eager", "--profile-steps"):
        assert flag in serve
    assert "/reset" in lamina("chat", "--help").stdout


def test_generate_streams_a_completion(tiny_dir):
    args = ["generate", "--model", tiny_dir, "--dtype", "float32", "--kv-cache-memory", "16MiB",
            "--temperature", "0", "--max-tokens", "12"]
    a, b = lamina(*args, "hello there"), lamina(*args, "hello there")
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.strip()  # greedy: the same text twice


def test_speculative_config_flag(tiny_dir):
    """--speculative-config: the same greedy text, and the start-up line says drafting is on."""
    args = ["generate", "--model", tiny_dir, "--dtype", "float32", "--kv-cache-memory", "16MiB",
            "--temperature", "0", "--max-tokens", "24", "--enforce-eager"]
    plain = lamina(*args, "abcabcabcabc")
    spec = lamina(*args, "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}', "abcabcabcabc")
    assert spec.returncode == 0, spec.stderr
    assert spec.stdout == plain.stdout
    assert "speculative decoding ngram, 3 tokens" in spec.stderr
    bad = lamina(*args, "--speculative-config", '{"method": "eagle"}', "x")
    assert bad.returncode != 0 and "speculative_config" in bad.stderr


def test_chat_repl_multi_turn_reset_and_exit(tiny_dir):
    script = "first question\nsecond question\n/reset\nthird\n/exit\nnever read\n"
    out = lamina("chat", "--model", tiny_dir, "--dtype", "float32", "--kv-cache-memory", "16MiB",
                 "--temperature", "0", "--max-tokens", "8", stdin=script)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(">>> ") == 5          # four inputs answered or handled, then /exit
    assert "(conversation cleared)" in out.stderr
    replies = [line for line in out.stdout.split(">>> ") if line.strip()]
    assert len(replies) == 3


def test_unknown_model_is_a_clear_error(tmp_path):
    out = lamina("generate", "--model", str(tmp_path / "nope"), "hi")
    assert out.returncode != 0
    assert "Traceback" not in out.stderr and "nope" in out.stderr


def test_profile_steps_reports_where_time_goes(tiny_dir):
    out = lamina("generate", "--model", tiny_dir, "--dtype", "float32", "--kv-cache-memory", "16MiB",
                 "--temperature", "0", "--max-tokens", "6", "--profile-steps", "hi")
    assert out.returncode == 0, out.stderr
    report = out.stderr[out.stderr.index("step profile"):]
    for phase in ("schedule", "prepare", "forward", "sample", "detokenize"):
        assert phase in report
    assert "ms per step" in report


def test_bench_step_profile_script_runs(tiny_dir):
    """bench/step_profile.py (the step breakdown in bench/RESULTS.md) on the tiny model."""
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "bench", "step_profile.py"), "--model", tiny_dir,
                          "--prompts", "3", "--min-len", "8", "--max-len", "40", "--max-tokens", "3",
                          "--step-tokens", "64", "--threads", "1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in out.stdout.splitlines()
            if line.startswith("| ") and line.split("|")[1].strip() in ("prefill", "mixed", "decode")}
    assert set(rows) == {"prefill", "mixed", "decode"}, out.stdout
    # 3 prompts of 3 tokens: the last two tokens of each come from decode or mixed steps
    assert int(rows["decode"][0]) + int(rows["mixed"][0]) >= 2, out.stdout
    assert "one prefill step:" in out.stdout and "| op |" in out.stdout, out.stdout


def test_bench_rounds_interleave_and_ratios_come_per_round():
    """The bench harness: the order rotates each round, and a ratio is the median of per-round ratios."""
    sys.path.insert(0, "bench")
    try:
        import common
    finally:
        sys.path.remove("bench")
    seen = []
    out = common.interleave(["a", "b", "c"], 3, lambda name, r: seen.append((r, name)) or r)
    assert [n for _, n in seen] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert out == {"a": [0, 1, 2], "b": [0, 1, 2], "c": [0, 1, 2]}
    # a drifting host: each round's ratio is 2 though the raw numbers move 4x
    s = common.round_ratios([2.0, 4.0, 8.0], [1.0, 2.0, 4.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.0, 2.0, 2.0, 3)
    assert common.fmt_spread(common.round_ratios([3.0, 2.0, None], [1.0, 1.0, 1.0])) == "2.50x (2.00–3.00, 2 rounds)"
    # transformers' batches are cut from the prompts sorted by length
    prompts = [[0] * n for n in (5, 100, 6, 99)]
    batches = common.batches_by_length(prompts, 2)
    assert common.padded_tokens(prompts, batches) == 2 * 6 + 2 * 100 < common.padded_tokens(
        prompts, common.batches_by_length(prompts, 2, sort=False))


def test_bench_first_answer_smoke(tiny_dir, tmp_path):
    """bench/first_answer.py launches a real `lamina serve` and reports its first answer."""
    done = subprocess.run([sys.executable, "bench/first_answer.py", "--model", tiny_dir, "--quick",
                           "--systems", "lamina-serve-warm", "--wait-idle", "0",
                           "--json", str(tmp_path / "fa.json")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    import json
    res = json.loads((tmp_path / "fa.json").read_text())
    rounds = res["systems"]["lamina-serve-warm"]["rounds"]
    assert rounds and rounds[0]["first_answer_s"] > 0


def test_bench_compare_script_runs(tiny_dir):
    """bench/compare.py (before/after numbers in bench/RESULTS.md): two checkouts, here the same one."""
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "bench", "compare.py"), "--base", root, "--model", tiny_dir,
                          "--eager", "--rounds", "2", "--gen", "8", "--prefill-len", "64", "--threads", "1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if "this/base" in line]
    assert len(rows) == 2, out.stdout
    for row in rows:   # "decode tok/s this X base Y this/base R (min–max, 2 rounds)"
        assert float(row[row.index("this") + 1]) > 0 and float(row[row.index("base") + 1]) > 0
        assert "2 rounds" in " ".join(row)
