"""Seconds per question of the whole table build on the offline pool, both generation paths,
in one run: the local engine (transformers, the converted folders of fetch_models.py) and
llama.cpp's server on the same GGUF files (serve_gguf.py, reached through api_engine.py),
with a few server settings (threads per server, slots).

    python bench/backend_speed.py --questions 4 --offset 900
    python bench/backend_speed.py --questions 4 --only llama --settings 1x8 1x16 2x8

A setting "TxS" gives each of the two servers T threads and S slots (prompt caching on, as in
serve_gguf.py). Each run builds the same questions into a fresh table and
prints tokens, seconds and seconds per question; the tables are kept in --work so that the
two paths' tables can be compared. Questions default to SVAMP's held-out region [900, 1000),
which no committed table uses.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rollout  # noqa: E402
from table import read_table  # noqa: E402
from fetch_models import default_cache  # noqa: E402


def table_tokens(path: Path) -> tuple:
    recs = read_table(path)
    small = sum(s["tokens"] for r in recs for s in r["small"]["steps"])
    large = sum(e["tokens"] for r in recs for e in r["escalations"])
    return len(recs), small, large


def run_local(args, out: Path) -> float:
    cache = default_cache()
    t = time.perf_counter()
    rollout.main(["--dataset", args.dataset, "--offset", str(args.offset), "--limit", str(args.questions),
                  "--small", str(cache / "qwen-coder-0.5b"), "--large", str(cache / "qwen-coder-1.5b"),
                  "--max-new-tokens", str(args.max_new_tokens), "--batch-size", "16",
                  "--dtype", args.dtype, "--out", str(out)])
    return time.perf_counter() - t


def run_llama(args, setting: str, out: Path, port: int) -> float:
    from serve_gguf import start_server
    threads, slots = setting.split("x")
    cache = default_cache()
    servers = [start_server(str(cache / f"{name}.gguf"), name, port + i, int(threads), int(slots),
                            ctx_per_slot=2048)
               for i, name in enumerate(("qwen-coder-0.5b", "qwen-coder-1.5b"))]
    try:
        t = time.perf_counter()
        rollout.main(["--dataset", args.dataset, "--offset", str(args.offset), "--limit", str(args.questions),
                      "--small", "qwen-coder-0.5b", "--small-api", f"http://127.0.0.1:{port}/v1",
                      "--large", "qwen-coder-1.5b", "--large-api", f"http://127.0.0.1:{port + 1}/v1",
                      "--max-new-tokens", str(args.max_new_tokens), "--concurrency", str(2 * int(slots)),
                      "--out", str(out)])
        return time.perf_counter() - t
    finally:
        del servers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="svamp")
    p.add_argument("--offset", type=int, default=900)
    p.add_argument("--questions", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=320)
    p.add_argument("--dtype", default="auto", help="of the local engine")
    p.add_argument("--only", choices=["local", "llama"], default=None)
    p.add_argument("--settings", nargs="+", default=["1x8", "2x8"],
                   help="llama.cpp server settings THREADSxSLOTS")
    p.add_argument("--port", type=int, default=18201)
    p.add_argument("--work", type=Path, default=Path("/tmp/backend_speed"))
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    runs = ([] if args.only == "llama" else [("local engine", None)]) + \
        ([] if args.only == "local" else [(f"llama.cpp {s}", s) for s in args.settings])
    for i, (label, setting) in enumerate(runs):
        out = args.work / f"{label.replace(' ', '_')}.jsonl"
        out.unlink(missing_ok=True)
        secs = run_local(args, out) if setting is None else run_llama(args, setting, out, args.port + 2 * i)
        n, small, large = table_tokens(out)
        rows.append((label, n, small, large, secs))
        print(f"{label}: {n} questions, {small} + {large} tokens in {secs:.0f} s "
              f"= {secs / n:.0f} s/question, {(small + large) / secs:.1f} tok/s", flush=True)
    print(f"\n{args.questions} {args.dataset} questions from {args.offset}, max {args.max_new_tokens} "
          f"new tokens, {os.cpu_count()} CPUs")
    print("| path | questions | small + large tokens | seconds | s/question | tok/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, n, small, large, secs in rows:
        print(f"| {label} | {n} | {small} + {large} | {secs:.0f} | {secs / n:.0f} | {(small + large) / secs:.1f} |")
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
