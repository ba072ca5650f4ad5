"""Plot the serving sweep of a `lamina bench` JSON: output tokens/s and TTFT (p50, with p95 as a
dashed line) against concurrency, for lamina and llama.cpp's server.

    python bench/plot.py                         # bench/out/latest.json -> bench/out/latest-serve.png
    python bench/plot.py bench/out/bench-20250101-120000.json [-o out.png]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
COLORS = {"lamina": "tab:blue", "llamacpp-server": "tab:orange"}
LABELS = {"lamina": "lamina serve", "llamacpp-server": "llama.cpp llama-server"}


def plot(res: dict, out: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 - matplotlib.ticker.NullLocator

    serve = res.get("serve") or {}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ticks: set[int] = set()
    for name, r in (serve.get("systems") or {}).items():
        levels = [lv for lv in r.get("levels", []) if lv["completed"]]
        if not levels:
            continue
        c = [lv["concurrency"] for lv in levels]
        ticks.update(c)
        color = COLORS.get(name)
        label = LABELS.get(name, name)
        ax1.plot(c, [lv["output_tokens_per_s"] for lv in levels], "o-", color=color, label=label)
        ax2.plot(c, [lv["ttft_s"]["p50"] * 1000 for lv in levels], "o-", color=color, label=f"{label} p50")
        ax2.plot(c, [lv["ttft_s"]["p95"] * 1000 for lv in levels], "s--", color=color, alpha=0.6,
                 label=f"{label} p95")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(ticks), [str(t) for t in sorted(ticks)])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("concurrent requests")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_ylim(bottom=0)
    ax1.set_ylabel("output tokens/s")
    ax1.set_title("Throughput vs concurrency")
    ax2.set_ylabel("time to first token (ms)")
    ax2.set_yscale("log")
    ax2.set_title("TTFT vs concurrency")
    meta = res.get("meta", {})
    fig.suptitle(f"{meta.get('model', '')} on {meta.get('machine', {}).get('Model name', '?')} "
                 f"({meta.get('threads', '?')} threads), {serve.get('max_tokens', '?')} tokens/request — "
                 f"{meta.get('started', '')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="?", default=os.path.join(HERE, "out", "latest.json"))
    ap.add_argument("-o", "--out", default=None, help="PNG path (default: next to the JSON, -serve.png)")
    args = ap.parse_args()
    with open(args.json) as f:
        res = json.load(f)
    if not (res.get("serve") or {}).get("systems"):
        print(f"{args.json} has no serving sweep (run: lamina bench --only serve)", file=sys.stderr)
        return 1
    out = args.out or os.path.splitext(args.json)[0] + "-serve.png"
    print(plot(res, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
