"""How many rows (slots) a CPU decode step should carry: the cost per row of a decode step's
matrix products at several batch sizes, for a model's shapes (default Qwen2.5-1.5B's).

    python bench/cpu_rows.py                       # Qwen2.5-1.5B shapes, float32, all cores
    python bench/cpu_rows.py --hidden 896 --mlp 4864 --threads 1

A decode step multiplies every row by every weight: at few rows the step is bound by reading
the weights from memory (a few GB/s per core here), so more rows cost little more until the
arithmetic catches up. The printout is ms per step and per row for the MLP's products and the
vocabulary projection; rows where the per-row cost stops falling are the batch to use.
"""
from __future__ import annotations

import argparse
import time

import torch


def timed(fn, n: int) -> float:
    for _ in range(2):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1536, help="hidden size (default 1536, Qwen2.5-1.5B)")
    p.add_argument("--mlp", type=int, default=8960, help="MLP width (default 8960)")
    p.add_argument("--vocab", type=int, default=151936, help="vocabulary (default 151936)")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 32, 64, 128], help="batch sizes")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dt = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    up = torch.randn(args.mlp, args.hidden, generator=gen).to(dt)
    down = torch.randn(args.hidden, args.mlp, generator=gen).to(dt)
    head = torch.randn(args.vocab, args.hidden, generator=gen).to(dt)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}; "
          f"MLP = up + gate + down products of {args.hidden}x{args.mlp}, head = {args.hidden}x{args.vocab}")
    print(f"{'rows':>5} {'MLP ms':>8} {'MLP ms/row':>11} {'head ms':>8} {'head ms/row':>12}")
    with torch.inference_mode():
        for m in args.rows:
            x = torch.randn(m, args.hidden, generator=gen).to(dt)
            h = torch.randn(m, args.mlp, generator=gen).to(dt)
            mlp = timed(lambda: (torch.nn.functional.linear(x, up), torch.nn.functional.linear(x, up),
                                 torch.nn.functional.linear(h, down)), args.repeats)
            hd = timed(lambda: torch.nn.functional.linear(x, head), max(2, args.repeats // 4))
            print(f"{m:>5} {mlp * 1e3:>8.1f} {mlp * 1e3 / m:>11.2f} {hd * 1e3:>8.1f} {hd * 1e3 / m:>12.2f}")


if __name__ == "__main__":
    main()
