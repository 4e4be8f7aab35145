"""Where a decode step of the slot engine spends its time on a GPU (issue 7).

Builds a random-weight model of a real shape, fills the engine's slots with contexts of
random lengths, and times one decode step: replayed as a CUDA graph and run eagerly, for
each attention kernel (engine.SLOT_ATTENTION_KERNEL) and each share of the slots; then
lists the step's heaviest GPU kernels (torch.profiler) and the floor (bytes it must read
over the measured copy bandwidth).

    python bench/decode_profile.py --config qwen2.5-1.5b --slots 512 --length 768
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import engine  # noqa: E402
from rollout_gpu import copy_bandwidth  # noqa: E402
from rollout_speed import CONFIGS as SHAPES, random_model, sync  # noqa: E402


def timed(fn, reps: int, device) -> float:
    fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return 1e3 * (time.perf_counter() - t) / reps


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="qwen2.5-1.5b", choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--slots", type=int, default=512)
    p.add_argument("--length", type=int, default=768)
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    import torch
    dev = args.device
    lm = random_model(args.config, dev, engine.resolve_dtype(args.dtype, dev))
    span = args.length
    bw = copy_bandwidth(dev)
    weights = sum(x.numel() * x.element_size() for x in lm.model.parameters())
    kv = engine.kv_bytes_per_token(lm.model)
    rows, outs = [], {}
    for kernel in ("bmm", "sdpa"):
        engine.SLOT_ATTENTION_KERNEL = kernel
        lm.engine = None  # a fresh engine (and CUDA graph pool) per kernel
        if dev.startswith("cuda"):
            torch.cuda.empty_cache()
        eng = lm.engine = engine.SlotEngine(lm, args.slots, args.length,
                                             graphs=dev.startswith("cuda"))
        g = torch.Generator().manual_seed(0)  # the same contexts for both kernels
        lengths = torch.randint(args.length // 3, args.length - 8, (args.slots,), generator=g)
        eng.inputs[0].copy_(torch.randint(1, lm.model.config.vocab_size, (args.slots,),
                                          generator=g))
        eng.inputs[1].copy_(lengths)
        gd = torch.Generator(device=dev).manual_seed(0)
        for k in eng.cache.keys + eng.cache.values:
            k.normal_(generator=gd)
        with torch.inference_mode():
            eager = timed(lambda: eng._decode(span, args.slots), max(3, args.reps // 4), dev)
            outs[kernel] = eng.outputs.clone()
            for n in sorted({args.slots // 8, args.slots // 4, args.slots // 2, args.slots}):
                graph = timed(lambda: eng.decode(span, n), args.reps, dev) \
                    if eng.graphs else None
                floor = 1e3 * (weights + float(lengths[:n].sum() + n) * kv) / bw
                rows.append((kernel, n, eager if n == args.slots else None,
                             graph if eng.graphs else None, floor))
    same = (outs["bmm"][0] == outs["sdpa"][0]).float().mean().item()
    print(f"bmm vs sdpa kernel: same greedy token in {same:.1%} of slots, largest log-prob "
          f"difference {(outs['bmm'][1] - outs['sdpa'][1]).abs().max().item():.2e}")
    if dev.startswith("cuda"):
        engine.SLOT_ATTENTION_KERNEL = "sdpa"
        from torch.profiler import ProfilerActivity, profile
        with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
            lm.engine._decode(span, args.slots)
            sync(dev)
        print(f"kernels of one eager step ({engine.SLOT_ATTENTION_KERNEL} attention, "
              f"{args.slots} slots):")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14,
                                        max_name_column_width=60))
    print(f"\n{args.config}, {args.slots} slots, span {span}, mean context "
          f"{lengths.float().mean():.0f}; copy bandwidth {bw / 1e12:.2f} TB/s")
    print("| attention | slots decoded | eager ms/step | CUDA graph ms/step | floor ms/step |")
    print("|---|---|---|---|---|")
    for kernel, n, eager, graph, floor in rows:
        print(f"| {kernel} | {n} | {'' if eager is None else f'{eager:.2f}'} | "
              f"{'' if graph is None else f'{graph:.2f}'} | {floor:.2f} |")


if __name__ == "__main__":
    main()
