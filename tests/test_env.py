"""`lamina env` (lamina/env.py): the report people paste into bug reports, run as a user runs it."""
import os
import re
import subprocess
import sys

import torch

from lamina import env
from lamina.kernels import cpu_build


def test_python_m_lamina_env_prints_every_section():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-m", "lamina", "env"], capture_output=True, text=True, timeout=600,
                         cwd=root, env={**os.environ, "LAMINA_API_KEY": "s3cret"})
    assert run.returncode == 0, run.stderr
    out = run.stdout
    for section in ("versions", "system", "fast paths (device cpu)", "environment"):
        assert f"\n{section}\n" in out, out
    for row in ("lamina", "torch", "triton", "Python", "CPU", "CPU flags", "C++ compiler", "CUDA devices",
                "C++ kernels", "attention backend", "compiled steps", "CUDA graphs"):
        assert f"\n  {row} " in out, (row, out)
    rows = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in out.splitlines()
                if line.startswith("  ") and re.search(r"\S\s{2,}\S", line))
    assert rows["torch"].startswith(torch.__version__) and "AVX512-BF16" in rows["CPU flags"]
    if cpu_build.expected_to_build():  # x86-64 Linux with a compiler: the kernels must load, and say so
        assert rows["C++ kernels"].startswith("yes "), out
        assert rows["attention backend"].startswith("yes  cpu:"), out
    assert "s3cret" not in out and "LAMINA_API_KEY" in out   # set, and hidden


def test_fast_paths_and_one_line_summary(monkeypatch):
    paths = env.fast_paths("cpu")
    assert [name for name, _, _ in paths] == ["C++ kernels", "attention backend", "compiled steps", "CUDA graphs"]
    assert all(isinstance(ok, bool) and why for _, ok, why in paths)
    kernels = paths[0][1]
    assert kernels == cpu_build.load()
    if not kernels:
        assert paths[0][2] == (cpu_build.load_error() or cpu_build.unsupported_reason())
    # on CUDA (described without touching a GPU): Triton attention, CUDA graphs rather than compiled steps
    monkeypatch.delenv("LAMINA_ATTENTION_BACKEND", raising=False)
    monkeypatch.delenv("LAMINA_ENFORCE_EAGER", raising=False)
    cuda = {name: (ok, why) for name, ok, why in env.fast_paths("cuda")}
    assert cuda["C++ kernels"][0] is False and cuda["attention backend"] == (True, cuda["attention backend"][1])
    assert cuda["attention backend"][1].startswith("triton:") and cuda["compiled steps"][0] is False
    assert cuda["CUDA graphs"][0] is True
    monkeypatch.setenv("LAMINA_ENFORCE_EAGER", "1")
    assert dict((n, ok) for n, ok, _ in env.fast_paths("cuda"))["CUDA graphs"] is False
    line = env.one_line_summary(device="cpu", attention_backend="cpu", execution="compiled")
    assert "\n" not in line and line.startswith(f"lamina {env.lamina_version()}, torch {torch.__version__}")
    assert f"C++ kernels: {'yes' if kernels else 'no'}, attention: cpu, steps: compiled" in line
    # the caller's facts are used as given, not resolved again
    assert "C++ kernels: no, attention: torch, steps: eager" in env.one_line_summary(
        device="cpu", attention_backend="torch", execution="eager", cpu_kernels=False)
