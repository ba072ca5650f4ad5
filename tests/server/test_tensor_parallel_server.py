"""`lamina serve -tp 2` as a real process with its worker: it answers, it stops cleanly leaving no
process behind, and a killed worker ends it (non-zero) instead of leaving it answering."""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.utils import save_tiny_hf_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tp-serve")
    save_tiny_hf_model(path)
    return str(path)


def start_server(model_dir: str) -> tuple[subprocess.Popen, int, list[int]]:
    """The server process (leading a process group of its own, as a shell's job), its port, and its
    worker's pid, once it is ready."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "lamina", "serve", "--model", model_dir, "-tp", "2", "--port", "0",
         "--dtype", "float32", "--num-threads", "1", "--kv-cache-memory", "16MiB", "--enforce-eager",
         "--served-model-name", "tiny"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True)
    port, deadline, lines = None, time.monotonic() + 120, []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        assert line, "server exited early:\n" + "".join(lines)
        lines.append(line)
        m = re.search(r"at http://127\.0\.0\.1:(\d+)", line)
        port = port or (m and int(m.group(1)))
        if "lamina: ready" in line:
            break
    assert port, "".join(lines)
    children = _children(proc.pid)
    assert len(children) == 1, children
    return proc, port, children


def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(c) for c in f.read().split()]
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _any_alive_after(workers: list[int], seconds: float) -> bool:
    """Whether any worker still runs once they have had `seconds` to exit."""
    deadline = time.monotonic() + seconds
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    return any(_alive(w) for w in workers)


def chat(port: int, timeout: float = 30.0) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    body = {"model": "tiny", "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "hello"}]}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read() or b"{}")


@pytest.mark.slow
def test_tp_server_answers_and_stops_leaving_no_process(model_dir):
    proc, port, workers = start_server(model_dir)
    try:
        status, answer = chat(port)
        assert status == 200 and answer["usage"]["completion_tokens"] == 8
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert not _any_alive_after(workers, 10)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_killed_worker_stops_the_server(model_dir):
    proc, port, workers = start_server(model_dir)
    try:
        assert chat(port)[0] == 200
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        body = {"model": "tiny", "max_tokens": 200, "ignore_eos": True, "stream": True,
                "messages": [{"role": "user", "content": "hello"}]}
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        stream = conn.getresponse()
        assert stream.status == 200 and stream.readline().startswith(b"data:")   # decoding has begun
        os.kill(workers[0], signal.SIGKILL)
        # the server notices, fails what is in flight and exits non-zero (a supervisor restarts it)
        assert proc.wait(30) == 1
        try:
            rest = stream.read()
        except (OSError, http.client.HTTPException):   # the connection was cut
            rest = b""
        assert b'"finish_reason":"length"' not in rest.replace(b" ", b"")
        with pytest.raises(OSError):
            chat(port, timeout=5)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "sigkill"])
def test_no_worker_outlives_the_server(model_dir, how):
    """Ctrl-C reaches the whole process group (the server stops its worker, exit 0); SIGKILL reaches
    the server alone (its worker sees it gone and exits)."""
    proc, port, workers = start_server(model_dir)
    try:
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
            assert proc.wait(60) == 0
        else:
            proc.kill()
            proc.wait(10)
        assert not _any_alive_after(workers, 15)
    finally:
        proc.kill()
        proc.wait()
