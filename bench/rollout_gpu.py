"""Rollout throughput on a GPU (issue 7): rollout.py's slot engine against plain eager
`generate`, on models built from real architectures' configs (random weights, bf16).

The workload has the table's shape, with token ids instead of text, so that no tokenizer or
data is needed and every method writes exactly the same number of tokens (no stop token):
  - small pass: --questions prompts of --prompt-tokens random tokens, each writes
    --new-tokens tokens;
  - large pass: per question, n = --new-tokens / --step-tokens continuation prompts: the
    prompt plus the first k * --step-tokens tokens of its small solution (k = 0..n-1).
    They are token prefixes of one another, as the real continuation prompts are, so the
    engine encodes each question's longest one only.
Reported per shape: eager `generate` at batch 64 (prompt --prompt-tokens, --new-tokens
forced), the engine without and with CUDA graphs (--compile) at the auto batch size, their
ratio to the batch-64 figure, and the floor per decode step: the bytes a step must read
(weights, plus the keys/values of every row's context) over the copy bandwidth measured
in the same run.

    python bench/rollout_gpu.py --configs qwen2.5-1.5b qwen2.5-7b
    python bench/rollout_gpu.py --configs tiny --device cpu --questions 4   # a CPU smoke run

The table comes last; --json PATH also writes the figures.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import engine  # noqa: E402
from rollout_speed import CONFIGS as SHAPES, random_model, sync  # noqa: E402


def copy_bandwidth(device) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    import torch
    if not str(device).startswith("cuda"):
        return float("nan")
    x = torch.empty(2 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    sync(device)
    t = time.perf_counter()
    for _ in range(5):
        y.copy_(x)
    sync(device)
    secs = (time.perf_counter() - t) / 5
    del x, y
    return 2 * (2 << 30) / secs


def eager_generate(lm, batch: int, prompt_tokens: int, new_tokens: int) -> dict:
    """Plain `generate` (eager, dynamic cache) at one batch, lengths forced."""
    import torch
    vocab = lm.model.config.vocab_size
    ids = torch.randint(1, vocab, (batch, prompt_tokens), device=lm.device)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        lm.model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
        sync(lm.device)
        t = time.perf_counter()
        lm.model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        sync(lm.device)
    secs = time.perf_counter() - t
    return dict(batch=batch, tokens=batch * new_tokens, secs=secs,
                tok_s=batch * new_tokens / secs, ms_step=1e3 * secs / new_tokens)


def engine_run(lm, prompts: list, args, batch: int, graphs: bool) -> dict:
    """The table's two passes through the slot engine."""
    eng = engine.engine_for(lm, batch, args.prompt_tokens + args.new_tokens
                             + args.new_tokens - args.step_tokens, graphs)
    eng.counters = {k: 0 for k in eng.counters}
    n = max(1, args.new_tokens // args.step_tokens)
    # warm-up (and, with graphs, capture of every bucket the run will use) on a few rows
    t = time.perf_counter()
    warm = [p + [1] * (args.step_tokens * (n - 1)) for p in prompts[:2]]
    eng.run(warm, args.new_tokens)
    sync(lm.device)
    warm_secs = time.perf_counter() - t
    eng.counters = {k: 0 for k in eng.counters}

    t = time.perf_counter()
    small = eng.run(prompts, args.new_tokens)
    sync(lm.device)
    small_secs = time.perf_counter() - t
    cont = [p + g.ids[:k * args.step_tokens] for p, g in zip(prompts, small) for k in range(n)]
    t = time.perf_counter()
    large = eng.run(cont, args.new_tokens)
    sync(lm.device)
    large_secs = time.perf_counter() - t
    tokens = sum(len(g.ids) for g in small + large)
    assert tokens == (len(prompts) + len(cont)) * args.new_tokens, "a row stopped early"
    c = eng.counters
    secs = small_secs + large_secs
    return dict(batch=batch, graphs=eng.graphs, tokens=tokens, secs=secs, tok_s=tokens / secs,
                small_secs=small_secs, large_secs=large_secs, warmup_secs=warm_secs,
                steps=c["steps"], ms_step=1e3 * secs / max(1, c["steps"]),
                rows_per_step=c["rows"] / max(1, c["steps"]),
                context_per_row=c["positions"] / max(1, c["rows"]),
                slots_per_step=c["slot_steps"] / max(1, c["steps"]),
                span_per_step=c["span_positions"] / max(1, c["slot_steps"]),
                prefill_tokens=c["prefill_tokens"], prompt_tokens=c["prompt_tokens"])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", default=["qwen2.5-1.5b", "qwen2.5-7b"],
                   choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--questions", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--step-tokens", type=int, default=32)
    p.add_argument("--baseline-batch", type=int, default=64)
    p.add_argument("--baseline-tokens", type=int, default=128,
                   help="tokens per row for the eager generate baseline (its step time is flat)")
    p.add_argument("--batch-size", default="auto")
    p.add_argument("--eager-engine", nargs="*", default=None,
                   help="also time the engine without graphs for these configs (default: the first)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    import torch
    dtype = engine.resolve_dtype(args.dtype, args.device)
    bw = copy_bandwidth(args.device)
    eager_for = args.configs[:1] if args.eager_engine is None else args.eager_engine
    rows = []
    for shape in args.configs:
        lm = random_model(shape, args.device, dtype)
        vocab = lm.model.config.vocab_size
        g = torch.Generator().manual_seed(1)
        prompts = torch.randint(1, vocab, (args.questions, args.prompt_tokens), generator=g).tolist()
        length = args.prompt_tokens + 2 * args.new_tokens - args.step_tokens
        batch = engine.auto_batch_size([(lm, length)], lm.device) \
            if args.batch_size == "auto" else int(args.batch_size)
        row = dict(shape=shape, params=lm.params, batch=batch, bandwidth=bw)
        row["generate"] = eager_generate(lm, args.baseline_batch, args.prompt_tokens,
                                         args.baseline_tokens)
        print(f"[{shape}] eager generate batch {args.baseline_batch}: "
              f"{row['generate']['tok_s']:.0f} tok/s, {row['generate']['ms_step']:.1f} ms/step",
              flush=True)
        modes = [True] + ([False] if shape in eager_for else [])
        for graphs in modes:
            name = "graphs" if graphs else "eager"
            try:
                r = engine_run(lm, prompts, args, batch, graphs)
            except torch.OutOfMemoryError as err:
                print(f"[{shape}] engine {name}: out of memory ({err})", flush=True)
                continue
            row[name] = r
            print(f"[{shape}] engine {name} (graphs used: {r['graphs']}) batch {batch}: "
                  f"{r['tok_s']:.0f} tok/s, {r['ms_step']:.2f} ms/step over {r['steps']} steps, "
                  f"{r['rows_per_step']:.0f} rows/step ({r['slots_per_step']:.0f} slots decoded), context {r['context_per_row']:.0f}, "
                  f"span {r['span_per_step']:.0f}, prefill {r['prefill_tokens']} of "
                  f"{r['prompt_tokens']} prompt tokens, warm-up {r['warmup_secs']:.1f}s",
                  flush=True)
            lm.engine = None  # free this mode's cache before the next
            if str(args.device).startswith("cuda"):
                torch.cuda.empty_cache()
        weights = sum(p.numel() * p.element_size() for p in lm.model.parameters())
        kv_token = engine.kv_bytes_per_token(lm.model)
        for name in ("graphs", "eager"):
            if name in row:
                r = row[name]
                r["floor_ms"] = 1e3 * (weights + r["rows_per_step"] * r["context_per_row"]
                                       * kv_token) / bw
                r["floor_span_ms"] = 1e3 * (weights + r["slots_per_step"] * r["span_per_step"]
                                            * kv_token) / bw
        rows.append(row)
        del lm
        if str(args.device).startswith("cuda"):
            torch.cuda.empty_cache()

    print(f"\ndevice: {torch.cuda.get_device_name() if str(args.device).startswith('cuda') else 'cpu'}"
          f", copy bandwidth {bw / 1e12:.2f} TB/s (read + written); workload: {args.questions} "
          f"questions x (1 + {max(1, args.new_tokens // args.step_tokens)}) sequences x "
          f"{args.new_tokens} tokens, prompt {args.prompt_tokens}")
    print("| shape | method | batch | tok/s | ms/step | x eager generate b64 | floor ms/step "
          "(context / whole bucket) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        base = row["generate"]
        print(f"| {row['shape']} | eager generate | {base['batch']} | {base['tok_s']:.0f} | "
              f"{base['ms_step']:.1f} | 1.0 | |")
        for name in ("eager", "graphs"):
            if name in row:
                r = row[name]
                label = "engine + CUDA graphs" if r["graphs"] else "engine, eager"
                print(f"| {row['shape']} | {label} | {r['batch']} | {r['tok_s']:.0f} | "
                      f"{r['ms_step']:.2f} | {r['tok_s'] / base['tok_s']:.1f} | "
                      f"{r['floor_ms']:.2f} / {r['floor_span_ms']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
