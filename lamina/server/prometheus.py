"""/metrics in the Prometheus text format (0.0.4), names modelled on vLLM's with a `lamina:` prefix."""
from __future__ import annotations

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_FINISH_REASONS = ("stop", "length", "abort")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict) -> str:
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


def _fmt(value) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


class _Writer:
    def __init__(self, model_name: str):
        self.base = {"model_name": model_name}
        self.lines: list[str] = []

    def metric(self, name: str, kind: str, help_text: str, samples) -> None:
        """samples: [(suffix, extra labels, value)]"""
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for suffix, extra, value in samples:
            self.lines.append(f"{name}{suffix}{_labels({**self.base, **extra})} {_fmt(value)}")

    def gauge(self, name, help_text, value):
        self.metric(name, "gauge", help_text, [("", {}, value)])

    def counter(self, name, help_text, value):
        self.metric(name, "counter", help_text, [("", {}, value)])

    def histogram(self, name, help_text, hist):
        samples = [("_bucket", {"le": le}, count) for le, count in hist.cumulative()]
        samples += [("_sum", {}, float(hist.sum)), ("_count", {}, hist.count)]
        self.metric(name, "histogram", help_text, samples)


def render(stats, model_name: str) -> str:
    """The engine's EngineStats (or None while the model loads) as exposition text."""
    w = _Writer(model_name)
    if stats is None:
        w.gauge("lamina:num_requests_running", "Requests in the engine's running batch.", 0)
        w.gauge("lamina:num_requests_waiting", "Requests waiting to be scheduled.", 0)
        w.gauge("lamina:kv_cache_usage_perc", "Fraction of KV-cache blocks used by live requests (0-1).", 0.0)
        return "\n".join(w.lines) + "\n"
    with stats.lock:
        w.gauge("lamina:num_requests_running", "Requests in the engine's running batch.", stats.num_running)
        w.gauge("lamina:num_requests_waiting", "Requests waiting to be scheduled.", stats.num_waiting)
        w.gauge("lamina:kv_cache_usage_perc", "Fraction of KV-cache blocks used by live requests (0-1).",
                float(stats.kv_cache_usage))
        w.counter("lamina:prompt_tokens_total", "Prompt tokens processed (prefilled or served from cache).",
                  stats.prompt_tokens_total)
        w.counter("lamina:generation_tokens_total", "Tokens generated.", stats.generation_tokens_total)
        w.counter("lamina:prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache.",
                  stats.prefix_cache_queries_total)
        w.counter("lamina:prefix_cache_hits_total", "Prompt tokens found in the prefix cache.",
                  stats.prefix_cache_hits_total)
        w.counter("lamina:num_preemptions_total", "Sequences preempted for lack of KV-cache blocks.",
                  stats.num_preemptions_total)
        finished = {reason: 0 for reason in _FINISH_REASONS}
        finished.update(stats.request_success_total)
        w.metric("lamina:request_success_total", "counter", "Finished requests by finish reason.",
                 [("", {"finished_reason": reason}, count) for reason, count in sorted(finished.items())])
        w.counter("lamina:spec_decode_num_drafts_total", "Speculative drafts verified (one per sequence and step).",
                  stats.spec_num_drafts_total)
        w.counter("lamina:spec_decode_num_draft_tokens_total", "Speculative draft tokens verified.",
                  stats.spec_num_draft_tokens_total)
        w.counter("lamina:spec_decode_num_accepted_tokens_total", "Speculative draft tokens accepted.",
                  stats.spec_num_accepted_tokens_total)
        w.metric("lamina:spec_decode_num_accepted_tokens_per_pos", "counter",
                 "Speculative draft tokens accepted, by their position in the draft (0 is the first).",
                 [("", {"position": i}, count) for i, count in enumerate(stats.spec_accepted_per_position)])
        w.histogram("lamina:time_to_first_token_seconds", "Time to first token.", stats.time_to_first_token)
        w.histogram("lamina:inter_token_latency_seconds", "Time between two output tokens.",
                    stats.inter_token_latency)
        w.histogram("lamina:e2e_request_latency_seconds", "Request latency from arrival to finish.",
                    stats.e2e_request_latency)
    return "\n".join(w.lines) + "\n"
