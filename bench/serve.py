#!/usr/bin/env python3
"""Load generator for any OpenAI-compatible server (lamina serve, llama.cpp's llama-server, vLLM).

Sweeps concurrency levels; at each, keeps that many streaming requests in flight until the level's
requests are done, and reports time to first token (TTFT), inter-token latency (ITL, the gaps
between streamed content events), end-to-end latency (p50/p95/p99), output tokens/s and errors.
Standard library only (asyncio streams, hand-written HTTP/1.1 client). Results go to a JSON file.

    python bench/serve.py --base-url http://127.0.0.1:8000 --model smollm2-135m-instruct
    python bench/serve.py --base-url http://127.0.0.1:8080/v1 --levels 1,4 --max-tokens 128 --out llamacpp.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
         "government company number group problem fact river mountain garden music window story science "
         "history market energy ocean planet forest language memory signal engine bridge harbor lantern").split()


@dataclass
class Result:
    ok: bool
    error: str | None = None
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    latency: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int | None = None


class HTTPError(Exception):
    pass


async def _read_chunked(reader: asyncio.StreamReader):
    while True:
        size_line = await reader.readline()
        if not size_line:
            raise HTTPError("connection closed inside a chunked body")
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            await reader.readline()
            return
        data = await reader.readexactly(size)
        await reader.readexactly(2)
        yield data


async def _body_pieces(reader, headers):
    if headers.get("transfer-encoding", "").lower() == "chunked":
        async for piece in _read_chunked(reader):
            yield piece
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        while piece := await reader.read(65536):
            yield piece


async def stream_request(url: str, payload: dict, api_key: str | None, timeout: float) -> Result:
    """POST one streaming request and time its server-sent events."""
    u = urlsplit(url)
    host, port = u.hostname, u.port or (443 if u.scheme == "https" else 80)
    body = json.dumps(payload).encode()
    head = [f"POST {u.path or '/'} HTTP/1.1", f"Host: {u.netloc}", "Content-Type: application/json",
            "Accept: text/event-stream", f"Content-Length: {len(body)}", "Connection: close"]
    if api_key:
        head.append(f"Authorization: Bearer {api_key}")
    t0 = time.perf_counter()
    res = Result(ok=False)
    conn: list = []

    async def exchange():
        reader, writer = await asyncio.open_connection(host, port, ssl=u.scheme == "https" or None,
                                                       limit=1 << 22)
        conn.append(writer)
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        await writer.drain()
        status_line = await reader.readline()
        parts = status_line.decode("latin-1").split(" ", 2)
        if len(parts) < 2:
            raise HTTPError(f"bad status line {status_line!r}")
        status = int(parts[1])
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            k, _, v = line.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        if status != 200:
            text = b"".join([p async for p in _body_pieces(reader, headers)]).decode("utf-8", "replace")
            raise HTTPError(f"HTTP {status}: {text[:300]}")
        buf, last, done, events = b"", None, False, 0
        async for piece in _body_pieces(reader, headers):
            buf += piece
            while b"\n\n" in buf or b"\r\n\r\n" in buf:
                cut = min(i for i in (buf.find(b"\n\n"), buf.find(b"\r\n\r\n")) if i >= 0)
                event, buf = buf[:cut], buf[cut:].lstrip(b"\r\n")
                for line in event.splitlines():
                    if not line.startswith(b"data:"):
                        continue  # comments / keep-alives
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        done = True
                        continue
                    obj = json.loads(data)
                    if obj.get("error"):
                        raise HTTPError(f"error event: {obj['error']}")
                    if obj.get("usage"):
                        res.output_tokens = obj["usage"].get("completion_tokens") or res.output_tokens
                        res.prompt_tokens = obj["usage"].get("prompt_tokens")
                    for choice in obj.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content") or choice.get("text")
                        if not text:
                            continue
                        now = time.perf_counter()
                        events += 1
                        if res.ttft is None:
                            res.ttft = now - t0
                        else:
                            res.itls.append(now - last)
                        last = now
            if done:
                break
        if not done:
            raise HTTPError("stream ended without [DONE]")
        res.output_tokens = res.output_tokens or events  # no usage: count content events
        res.ok = True

    try:
        await asyncio.wait_for(exchange(), timeout)
    except asyncio.TimeoutError:  # (an OSError on 3.11+: must come first)
        res.error = f"timeout after {timeout}s"
    except (OSError, HTTPError, ValueError, asyncio.IncompleteReadError) as e:
        res.error = f"{type(e).__name__}: {e}"
    finally:
        for writer in conn:
            writer.close()
    res.latency = time.perf_counter() - t0
    return res


def make_prompt(rng: random.Random, words: int) -> str:
    return f"[{rng.getrandbits(64):x}] Continue this text: " + " ".join(rng.choice(WORDS) for _ in range(words))


def make_payload(args, rng: random.Random) -> dict:
    prompt = make_prompt(rng, args.prompt_words)
    payload = {"model": args.model, "stream": True, "max_tokens": args.max_tokens, "temperature": args.temperature,
               "stream_options": {"include_usage": True}}
    if args.ignore_eos:
        payload["ignore_eos"] = True
    payload.update(args.extra_body or {})
    if args.endpoint == "chat":
        payload["messages"] = [{"role": "user", "content": prompt}]
    else:
        payload["prompt"] = prompt
    return payload


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p95": None, "p99": None, "max": None}
    xs = sorted(values)

    def pct(p):  # linear interpolation between closest ranks
        k = (len(xs) - 1) * p / 100
        lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)
    return {"mean": statistics.fmean(xs), "p50": pct(50), "p95": pct(95), "p99": pct(99), "max": xs[-1]}


async def run_level(args, url: str, concurrency: int, num_requests: int, rng: random.Random) -> dict:
    payloads = [make_payload(args, rng) for _ in range(num_requests)]
    queue = list(reversed(payloads))
    results: list[Result] = []

    async def worker():
        while queue:
            results.append(await stream_request(url, queue.pop(), args.api_key, args.timeout))

    health = HealthProbe(args.health_url) if args.health_url else None
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    health_latencies = await health.stop() if health else []
    ok = [r for r in results if r.ok]
    errors = [r.error for r in results if not r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    return {
        "concurrency": concurrency, "requests": num_requests, "completed": len(ok), "errors": len(errors),
        "error_samples": sorted(set(errors))[:5], "duration_s": wall,
        "output_tokens": out_tokens, "output_tokens_per_s": out_tokens / wall if wall else 0.0,
        "requests_per_s": len(ok) / wall if wall else 0.0,
        "mean_prompt_tokens": (statistics.fmean(r.prompt_tokens for r in ok if r.prompt_tokens is not None)
                               if any(r.prompt_tokens is not None for r in ok) else None),
        "ttft_s": percentiles([r.ttft for r in ok if r.ttft is not None]),
        "itl_s": percentiles([x for r in ok for x in r.itls]),
        "e2e_latency_s": percentiles([r.latency for r in ok]),
        # how long GET /health took while the level ran: is the server's HTTP loop responsive?
        "health_s": percentiles(health_latencies),
    }


class HealthProbe:
    """GET /health every `interval` seconds on a fresh connection, recording each round trip."""

    def __init__(self, url: str, interval: float = 0.25):
        self.url, self.interval, self.latencies = urlsplit(url), interval, []
        self.task = asyncio.ensure_future(self._run())

    async def _run(self):
        u = self.url
        while True:
            t0 = time.perf_counter()
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(u.hostname, u.port or 80), 30)
                writer.write(f"GET {u.path} HTTP/1.0\r\nHost: {u.netloc}\r\n\r\n".encode())
                await asyncio.wait_for(reader.read(), 30)
                writer.close()
                self.latencies.append(time.perf_counter() - t0)
            except (asyncio.TimeoutError, OSError):
                pass
            await asyncio.sleep(self.interval)

    async def stop(self) -> list[float]:
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass
        return self.latencies


def _ms(v):
    return "-" if v is None else f"{1000 * v:8.1f}"


def print_level(lv: dict) -> None:
    t, i = lv["ttft_s"], lv["itl_s"]
    print(f"c={lv['concurrency']:<3} ok {lv['completed']:>4}/{lv['requests']:<4} err {lv['errors']:<3} "
          f"out {lv['output_tokens_per_s']:8.1f} tok/s | TTFT ms p50 {_ms(t['p50'])} p95 {_ms(t['p95'])} "
          f"p99 {_ms(t['p99'])} | ITL ms p50 {_ms(i['p50'])} p95 {_ms(i['p95'])} p99 {_ms(i['p99'])}"
          f" | /health ms p50 {_ms(lv['health_s']['p50'])} max {_ms(lv['health_s']['max'])}", flush=True)
    for e in lv["error_samples"]:
        print(f"      error: {e}", flush=True)


async def detect_model(base: str, api_key: str | None) -> str | None:
    """The first id from GET {base}/models (plain HTTP/1.0, Connection: close)."""
    u = urlsplit(base + "/models")
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(u.hostname, u.port or 80), 10)
        auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
        writer.write(f"GET {u.path} HTTP/1.0\r\nHost: {u.netloc}\r\n{auth}\r\n".encode())
        raw = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        return json.loads(body)["data"][0]["id"]
    except (asyncio.TimeoutError, OSError, ValueError, KeyError, IndexError):
        return None


async def main_async(args) -> dict:
    base = args.base_url.rstrip("/")
    if args.model is None:
        args.model = await detect_model(base, args.api_key)
        if args.model is None:
            sys.exit("could not read GET /models; pass --model")
    url = f"{base}/{'chat/completions' if args.endpoint == 'chat' else 'completions'}"
    if args.health_url is None:  # both lamina and llama-server answer GET /health at the root
        args.health_url = (base[:-3] if base.endswith("/v1") else base) + "/health"
    rng = random.Random(args.seed)
    print(f"benchmarking {url} model={args.model} max_tokens={args.max_tokens} prompt~{args.prompt_words} words",
          flush=True)
    warm = await stream_request(url, make_payload(args, rng), args.api_key, args.timeout)
    if not warm.ok:
        sys.exit(f"warm-up request failed: {warm.error}")
    levels = []
    for c in args.levels:
        n = args.num_requests or max(args.min_requests, args.requests_per_client * c)
        lv = await run_level(args, url, c, n, rng)
        print_level(lv)
        levels.append(lv)
    return {"base_url": args.base_url, "url": url, "model": args.model, "endpoint": args.endpoint,
            "max_tokens": args.max_tokens, "prompt_words": args.prompt_words, "ignore_eos": args.ignore_eos,
            "temperature": args.temperature, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "levels": levels}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server base URL, with or without /v1")
    p.add_argument("--model", default=None, help="model name (default: the first of GET /models)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    p.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16, 64],
                   help="concurrency sweep (default 1,4,16,64)")
    p.add_argument("--num-requests", type=int, default=None, help="requests per level (default: see below)")
    p.add_argument("--requests-per-client", type=int, default=2,
                   help="without --num-requests: this many per concurrent client (default 2)")
    p.add_argument("--min-requests", type=int, default=8, help="without --num-requests: at least this many")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-words", type=int, default=100, help="words of synthetic prompt text (default 100)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let requests end at EOS (default: send ignore_eos so every output has max_tokens)")
    p.add_argument("--extra-body", type=json.loads, default=None,
                   help="JSON object merged into every request (e.g. a response_format)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--health-url", default=None,
                   help="polled every 0.25 s during each level to time the server's responsiveness "
                        "(default: <base-url without /v1>/health)")
    p.add_argument("--out", default="bench/serve-results.json", help="JSON results file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    results = asyncio.run(main_async(args))
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"results written to {args.out}")
    return 0 if all(lv["errors"] == 0 for lv in results["levels"]) else 1


if __name__ == "__main__":
    sys.exit(main())
