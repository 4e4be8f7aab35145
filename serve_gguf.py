"""Serve a .gguf model with llama.cpp's own OpenAI-compatible server, in this process.

The `xllamacpp` wheel (PyPI, prebuilt for CPUs) runs llama.cpp's server on 127.0.0.1; it
computes on the quantized weights directly and is the fast way to build tables of the
offline pool on a CPU. rollout.py and route.py then reach it with `--small-api` /
`--large-api` like any other OpenAI-compatible server:

    python serve_gguf.py ~/.cache/stepwise-routing/models/qwen-coder-0.5b.gguf \\
        --name qwen-coder-0.5b --port 18101 --threads 1 --parallel 4 &
    python serve_gguf.py ~/.cache/stepwise-routing/models/qwen-coder-1.5b.gguf \\
        --name qwen-coder-1.5b --port 18102 --threads 1 --parallel 8 &
    python rollout.py --dataset svamp --small qwen-coder-0.5b --small-api http://127.0.0.1:18101/v1 \\
        --large qwen-coder-1.5b --large-api http://127.0.0.1:18102/v1 --out table.jsonl

Threads: llama.cpp's worker threads spin while they wait for each other, so on a machine
that other jobs also load, give each server cores of its own (one thread each on a 2-core
machine); two threads on a busy 2-core machine ran 15x slower than one here.
"""
from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

from cli import UsageError, make_parser, run_cli


def start_server(gguf: str, name: str | None = None, port: int = 18101, threads: int = 1,
                 parallel: int = 4, ctx_per_slot: int = 2048, host: str = "127.0.0.1",
                 prompt_cache: bool = True):
    """Start llama.cpp's server on `gguf` inside this process; it listens until the returned
    object is garbage-collected. `name` is the model id the server answers to.

    With several slots, or with its prompt cache on, llama.cpp's answer to a request can
    depend on the requests before and beside it (what shared its batch; which earlier
    prompt's keys/values its slot reuses). One slot and no prompt cache make every answer a
    function of its request alone: the setting for tests and for tables that must be
    rebuilt token for token."""
    try:
        import xllamacpp as xlc
    except ImportError:
        raise UsageError("the llama.cpp path needs the xllamacpp package: pip install xllamacpp") from None
    path = Path(gguf).expanduser()
    if not path.is_file():
        raise UsageError(f"{gguf}: no such .gguf file")
    p = xlc.CommonParams()
    p.model.path = str(path)
    p.model_alias = {name or path.stem}
    p.hostnames = [host]
    p.port = port
    p.n_parallel = parallel
    p.n_ctx = parallel * ctx_per_slot  # shared by the slots
    p.cpuparams.n_threads = threads
    p.cpuparams_batch.n_threads = threads
    p.cache_prompt = prompt_cache  # a question's continuation prompts share their beginnings
    try:
        return xlc.Server(p)
    except Exception as err:  # noqa: BLE001 - llama.cpp's errors are not typed
        raise UsageError(f"{gguf}: llama.cpp could not serve it ({err})") from None


def main(argv=None) -> int:
    ap = make_parser(__doc__)
    ap.add_argument("gguf", help="the .gguf file to serve")
    ap.add_argument("--name", default=None, help="model id the server answers to (default: the file's stem)")
    ap.add_argument("--port", type=int, default=18101, help="port on 127.0.0.1 (default: 18101)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default: 1)")
    ap.add_argument("--parallel", type=int, default=4,
                    help="sequences decoded together (server slots; default: 4)")
    ap.add_argument("--ctx-per-slot", type=int, default=2048,
                    help="context length of each slot, prompt + generation (default: 2048)")
    ap.add_argument("--no-prompt-cache", action="store_true",
                    help="do not reuse an earlier prompt's keys/values; with --parallel 1 every "
                         "answer is then reproducible")
    args = ap.parse_args(argv)
    server = start_server(args.gguf, args.name, args.port, args.threads, args.parallel,
                          args.ctx_per_slot, prompt_cache=not args.no_prompt_cache)
    print(f"serving {args.name or Path(args.gguf).stem} at http://127.0.0.1:{args.port}/v1",
          flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            time.sleep(3600)
    finally:
        del server
    return 0


if __name__ == "__main__":
    run_cli(main)
