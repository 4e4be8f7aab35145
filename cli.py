"""Plumbing every stage shares and a reader of the method need not read: a user's mistake is
one clear line on stderr and exit code 2 (UsageError, run_cli), argparse that reports that
way, range checks, the flags of the OpenAI-compatible backend, a progress line, the hub probe.

Every stage ends with `if __name__ == "__main__": run_cli(main)`. UsageError is defined here,
in a module no stage runs as a script, so there is one class whoever raises it.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path


class UsageError(Exception):
    """A mistake in the user's input (a flag, a file, a line): reported in one line."""


def run_cli(main, argv=None) -> None:
    prog = Path(sys.argv[0]).name
    try:
        code = main(argv)
    except UsageError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; finished lines are kept, run again to resume", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes raise UsageError (one line via run_cli) instead of usage spam."""

    def error(self, message):
        raise UsageError(message)


def make_parser(doc: str) -> ArgumentParser:
    """A parser whose description is the docstring's first line and whose epilog is the
    docstring's indented example command."""
    lines = doc.splitlines()
    start = next((i for i, l in enumerate(lines) if l.lstrip().startswith("python ")), None)
    epilog = None
    if start is not None:
        block = [lines[start]]
        while start + len(block) < len(lines) and lines[start + len(block)].startswith("        "):
            block.append(lines[start + len(block)])
        epilog = "example:\n" + "\n".join(block)
    return ArgumentParser(description=lines[0], epilog=epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def check_range(name: str, value, lo=None, hi=None, lo_open=False):
    """Raise UsageError unless lo <= value <= hi (lo < value with lo_open)."""
    bad = (lo is not None and (value <= lo if lo_open else value < lo)) or (hi is not None and value > hi)
    if bad or (isinstance(value, float) and math.isnan(value)):
        rng = f"{'(' if lo_open else '['}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise UsageError(f"{name} must be in {rng}, got {value}")
    return value


def plural(n: int, word: str) -> str:
    """'1 question', '2 questions'."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def hub_online() -> bool:
    """False when HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set or huggingface.co is unreachable
    (a quick probe, so that an offline machine does not sit through datasets' retries)."""
    if any(os.environ.get(v, "0") not in ("", "0", "false", "False")
           for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False
    import socket
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


def add_api_args(p) -> None:
    """Flags of the OpenAI-compatible backend (api_engine.py), for rollout.py and route.py."""
    g = p.add_argument_group("models behind an OpenAI-compatible server (vLLM, SGLang, TGI, "
                             "llama.cpp, hosted APIs)")
    g.add_argument("--small-api", metavar="URL", default=None,
                   help="base URL (.../v1) of a server that serves --small")
    g.add_argument("--large-api", metavar="URL", default=None,
                   help="base URL (.../v1) of a server that serves --large")
    g.add_argument("--api-key-env", metavar="NAME", default=None,
                   help="environment variable holding the key (default: OPENAI_API_KEY if set; "
                        "local servers need none)")
    g.add_argument("--top-logprobs", type=int, default=20,
                   help="top log-probabilities per token asked of the small model's server (default 20); "
                        "entropies are computed over them plus one bucket for the rest")
    g.add_argument("--continuation", default="auto", choices=["auto", "completions", "prefill", "instruct"],
                   help="how the large model continues accepted steps: raw completions of the "
                        "templated prompt, a continued assistant message, or an instruction "
                        "(auto: the first the server allows)")
    g.add_argument("--concurrency", type=int, default=16, help="requests in flight per server (default 16)")
    g.add_argument("--max-retries", type=int, default=6,
                   help="retries of a failed request (429, 5xx, timeouts) before the run stops (default 6); "
                        "a server that refuses or drops connections for 20 s is down sooner")


def add_model_args(p, max_new_tokens: int | None = 1024, dtype: str | None = "auto",
                   defaults_from: str = "") -> None:
    """How the pool's local models run, for rollout.py and route.py (one meaning in both).
    route.py passes None defaults: it takes them from the policy's training table
    (`defaults_from` says so in --help)."""
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N",
                   help=f"token limit of every generation (default "
                        f"{max_new_tokens if max_new_tokens is not None else defaults_from + ', else 1024'})")
    p.add_argument("--device", default="auto",
                   help="auto (a GPU where there is one, else cpu), cpu, cuda or cuda:N (default auto)")
    p.add_argument("--dtype", default=dtype,
                   help="auto (float32 on a CPU: live runs equal the table's; bfloat16 on GPUs), "
                        "bfloat16, float16 or float32 (default "
                        f"{dtype if dtype is not None else defaults_from + ', else auto'})")
    p.add_argument("--seed", type=int, default=0, help="seed of torch and of servers (default 0)")


class Progress:
    """A progress line per finished question (done/total, seconds per question, time left),
    also when stderr is not a terminal (a build in the background logs to a file)."""

    def __init__(self, total: int, label: str = "questions"):
        import time
        self.total, self.done, self.label, self.clock = total, 0, label, time.time
        self.start = self.clock()

    def __call__(self, n: int = 1) -> None:
        self.done += n
        per = (self.clock() - self.start) / self.done
        left = per * (self.total - self.done)
        print(f"{self.label}: {self.done}/{self.total} done, {per:.0f} s/question, "
              f"about {left / 60:.0f} min left", file=sys.stderr, flush=True)
