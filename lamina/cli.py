"""`lamina serve | chat | generate | pull | env | bench`."""
from __future__ import annotations

import argparse
import logging
import re
import sys

from lamina.config import DEFAULT_MODEL, EngineConfig


def parse_bytes(text: str) -> int:
    """'4GiB', '512MB', '1e9' -> bytes."""
    m = re.fullmatch(r"\s*([0-9.e+]+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 4GiB or 512MB)")
    unit = m.group(2).upper()
    base = 1024 if (m.group(3) or "").lower() == "ib" else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(unit or " "))


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and engine")
    g.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help="registry name, Hugging Face model directory, or .gguf file (default: %(default)s)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weight and activation dtype; auto = bfloat16 on GPUs and CPUs with native bf16, else float32")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--quantization", default=None, choices=["int8", "int4"],
                   help="weight-only quantization (int8: per-output-channel scales; int4: groups of 32 with scale and zero point, as Q4_1)")
    g.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block (default: 16)")
    g.add_argument("--max-num-seqs", type=int, default=256, help="most sequences in one step (default: 256)")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="token budget of one step; long prompts are prefilled in chunks of it (default: 2048)")
    g.add_argument("--kv-cache-memory", type=parse_bytes, default=None,
                   help="CPU KV-cache budget, e.g. 2GiB (default: 4GiB)")
    g.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="KV-cache dtype; auto = the model's, except float32 with the torch attention backend on CPU "
                        "(torch's CPU attention is faster in float32)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of GPU memory for weights, activations and KV cache (default: 0.9)")
    g.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help="turn off reuse of cached prompt prefixes")
    g.add_argument("--attention-backend", choices=["torch", "cpu", "triton"], default=None,
                   help="kernels: triton on CUDA; on CPU cpu (lamina's C++ prefill/decode attention, SwiGLU, RMSNorm) "
                        "where its kernels build, else torch ($LAMINA_ATTENTION_BACKEND)")
    g.add_argument("--compile", dest="enforce_eager", action="store_false", default=None,
                   help="torch.compile the model's steps on a background thread, serving eagerly until they are ready "
                        "(the default on CPU; ignored on CUDA, where decode replays CUDA graphs)")
    g.add_argument("--enforce-eager", dest="enforce_eager", action="store_true", default=None,
                   help="no torch.compile on CPU, no CUDA graphs on GPU: less CPU at start, slower small-batch decode ($LAMINA_ENFORCE_EAGER=1)")
    g.add_argument("--batch-invariant", action="store_true", default=None,
                   help="a request's tokens and logprobs bit for bit the same whatever else shares its steps, "
                        "however its prompt is chunked or cached; slower (CPU, bfloat16; $LAMINA_BATCH_INVARIANT=1)")
    g.add_argument("--num-threads", type=int, default=None,
                   help="torch CPU threads, per rank with -tp (default: torch's choice; with -tp N on CPU, the cores / N)")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="N",
                   help="split the model over N processes (GPUs, or CPU processes over gloo) run in lockstep; lamina "
                        "starts them, or torchrun does (see README, Tensor parallelism) (default: 1)")
    g.add_argument("--seed", type=int, default=0, help="engine seed for unseeded sampling (default: 0)")
    g.add_argument("--log-stats-interval", type=float, default=0.0,
                   help="log a line of engine statistics every N seconds (default: off)")
    g.add_argument("--profile-steps", action="store_true",
                   help="time each step's phases (schedule, forward, sample, detokenize, stream) and report them, "
                        "with each kind of step's GB/s and GFLOP/s beside this machine's peaks")
    g.add_argument("--trace-dir", default=None, metavar="DIR",
                   help="write a Chrome/Perfetto trace of the engine's steps (a span per step and phase) into DIR")
    g.add_argument("--profile-torch-steps", type=int, default=0, metavar="N",
                   help="with --trace-dir: also torch profiler's op-level trace of the first N steps")
    g.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='speculative decoding, e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\' '
                        "(prompt_lookup_max / prompt_lookup_min: the n-gram sizes tried; default 4 / 1)")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    names = EngineConfig.field_names()
    return EngineConfig(**{k: v for k, v in vars(args).items() if k in names})


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens, help="most tokens to generate (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the model's, else 1)")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--sample-seed", type=int, default=None, help="seed of this generation's sampling")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def sampling_params_from_args(args):
    from lamina.sampling_params import SamplingParams
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          seed=args.sample_seed, stop=args.stop)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lamina", description="A small, readable LLM inference engine.")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default: INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server", description=(
        "Serve a model over an OpenAI-compatible HTTP API (chat completions, completions, models, "
        "health, metrics, tokenize)."))
    add_engine_args(p)
    from lamina.server import add_serve_args
    add_serve_args(p)

    p = sub.add_parser("chat", help="talk to a model in the terminal", description=(
        "Interactive multi-turn chat. Tokens stream as they come. Commands: /reset clears the "
        "conversation, /exit (or Ctrl-D) quits."))
    add_engine_args(p)
    add_sampling_args(p, max_tokens=512)
    p.add_argument("--system", default=None, help="system prompt")

    p = sub.add_parser("generate", help="complete one prompt", description=(
        "Generate a completion of PROMPT and stream it to stdout. With --chat the prompt is sent as a "
        "user message through the model's chat template."))
    add_engine_args(p)
    add_sampling_args(p, max_tokens=128)
    p.add_argument("prompt", help="the prompt text ('-' reads stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a chat user message")

    p = sub.add_parser("pull", help="download and convert a registry model", description=(
        "Fetch a model from the registry into $LAMINA_HOME (default ~/.cache/lamina) and convert it "
        "once; later uses load the converted copy."))
    p.add_argument("name", nargs="?", default=DEFAULT_MODEL, help="registry name (default: %(default)s)")
    p.add_argument("--list", action="store_true", help="list registry models and exit")

    sub.add_parser("env", help="versions, CPU, compiler and which fast paths load here (for bug reports)")

    p = sub.add_parser("bench", help="benchmarks against peers (see bench/)", add_help=False,
                       description="Runs bench/run.py from a source checkout; all arguments pass through.")
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    return parser


def cmd_generate(args) -> int:
    from lamina.llm import LLM
    llm = LLM(**_llm_kwargs(args))
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = sampling_params_from_args(args)
    source = [{"role": "user", "content": prompt}] if args.chat else prompt
    for delta in llm.stream(source, params, chat=args.chat):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    _report_profile(llm, args)
    return 0


def _report_profile(llm, args) -> None:
    if args.profile_steps:
        print(f"step profile (--profile-steps):\n{llm.engine.profile_report()}", file=sys.stderr)
    llm.engine.close()


def cmd_chat(args) -> int:
    from lamina.engine.errors import RequestFailedError
    from lamina.llm import LLM
    llm = LLM(**_llm_kwargs(args))
    params = sampling_params_from_args(args)
    start = [{"role": "system", "content": args.system}] if args.system else []
    conversation = list(start)
    print(f"lamina chat with {args.model}. /reset clears the conversation, /exit quits.", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            break
        command = line.strip()
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            conversation = list(start)
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not command:
            continue
        conversation.append({"role": "user", "content": line})
        reply = ""
        try:
            for delta in llm.stream(conversation, params, chat=True):
                reply += delta
                sys.stdout.write(delta)
                sys.stdout.flush()
        except KeyboardInterrupt:  # stop this answer, keep the session
            pass
        except (ValueError, RequestFailedError) as e:
            conversation.pop()
            print(f"error: {e}", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        conversation.append({"role": "assistant", "content": reply})
    _report_profile(llm, args)
    return 0


def _llm_kwargs(args) -> dict:
    cfg = engine_config_from_args(args)
    return {k: getattr(cfg, k) for k in EngineConfig.field_names()}


def cmd_pull(args) -> int:
    from lamina import registry
    if args.list:
        for name in registry.list_models():
            print(name)
        return 0
    try:
        path = registry.pull(args.name)
    except Exception as e:  # PullError / ModelLoadError: say what went wrong, no traceback
        print(f"lamina pull: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


def cmd_bench(args) -> int:
    import os
    import runpy
    # bench/ is not part of the installed package: it is found beside an editable install's source,
    # or in the lamina checkout the command runs from
    roots = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.getcwd())
    script = next((os.path.join(r, "bench", "run.py") for r in roots
                   if os.path.exists(os.path.join(r, "bench", "run.py"))
                   and os.path.exists(os.path.join(r, "lamina", "__init__.py"))), None)
    if script is None:
        print("lamina bench runs the scripts in bench/ of lamina's source checkout, which an installed package "
              "does not include. Run it from the checkout (or install with `pip install -e .`); "
              "there, `python bench/run.py --help` is the same command.", file=sys.stderr)
        return 2
    sys.argv = [script] + args.bench_args
    runpy.run_path(script, run_name="__main__")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench" and "-h" not in argv[:1]:
        # everything after `bench` belongs to bench/run.py, flags included
        return cmd_bench(argparse.Namespace(bench_args=argv[1:]))
    args = build_parser().parse_args(argv)
    if getattr(args, "tensor_parallel_size", 1) > 1:
        from lamina import envs
        if envs.launched_by_torchrun() and envs.rank() != 0:
            # torchrun ran this command on every rank: the ranks past 0 serve rank 0's steps
            from lamina.distributed.worker import main as worker_main
            return worker_main()
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "env":
        from lamina.env import main as env_main
        return env_main()
    if args.command == "serve":
        from lamina.server import run_server
        return run_server(args, engine_config_from_args(args))
    from lamina.config import ModelLoadError
    try:
        return {"generate": cmd_generate, "chat": cmd_chat, "pull": cmd_pull, "bench": cmd_bench}[args.command](args)
    except ModelLoadError as e:
        print(f"lamina: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
