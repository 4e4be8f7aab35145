"""Stage 1 of stepwise model routing: record exact step trajectories (DESIGN.md sections 1-3).

For every question the small model writes its whole greedy solution once; the solution is
split into steps at token boundaries (a step ends with the token that completes a blank
line, "\\n\\n"), and every step keeps the small model's token statistics (mean / min
log-probability of the chosen tokens, mean / max entropy of the next-token distribution).
Then the large model continues greedily after every prefix of k accepted small steps,
k = 0..n-1. Because decoding is greedy, this table fixes the outcome of every one-way
escalation router on the question, so training, calibration and evaluation need no LLM call.

Run it (the paper's pool; any hub id, local folder or .gguf file works for --small/--large):

    python rollout.py --dataset gsm8k --split test --limit 200 \\
        --small Qwen/Qwen2.5-Math-1.5B-Instruct --large Qwen/Qwen2.5-Math-7B-Instruct \\
        --out results/gsm8k/test.jsonl

The output is schema-1 JSONL (DESIGN.md section 3), one question per line, each line
written whole and flushed. Running again with the same --out skips the ids already there,
so an interrupted run resumes without losing or duplicating anything.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA = 1
DEFAULT_SMALL = "Qwen/Qwen2.5-Math-1.5B-Instruct"
DEFAULT_LARGE = "Qwen/Qwen2.5-Math-7B-Instruct"
SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
STEP_END = "\n\n"


# ----------------------------------------------------------------------------------------
# Errors: a user's mistake is one clear line on stderr and exit code 2, never a traceback.
# Every stage wraps its main() in run_cli().
# ----------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------
# The trajectory file (schema 1). read_table() is what every later stage uses to load it.
# ----------------------------------------------------------------------------------------
STEP_KEYS = ("text", "tokens", "mean_logprob", "min_logprob", "mean_entropy", "max_entropy")
OUTCOME_KEYS = ("answer", "correct", "finished")
ESCALATION_KEYS = ("after", "prompt_tokens", "tokens", "text") + OUTCOME_KEYS


def validate_record(rec, where: str) -> dict:
    """Check one table line against schema 1; raise UsageError naming `where` if it is off."""
    if not isinstance(rec, dict):
        raise UsageError(f"{where}: expected a JSON object")
    if rec.get("schema") != SCHEMA:
        raise UsageError(f"{where}: schema {rec.get('schema')!r}, this code reads schema {SCHEMA}")
    for key in ("id", "question", "gold", "pool", "small", "escalations"):
        if key not in rec:
            raise UsageError(f"{where}: missing key {key!r}")
    small = rec["small"]
    if not isinstance(small, dict) or not isinstance(small.get("steps"), list):
        raise UsageError(f"{where}: 'small' must hold a list of 'steps'")
    for key in ("prompt_tokens",) + OUTCOME_KEYS:
        if key not in small:
            raise UsageError(f"{where}: missing key 'small.{key}'")
    for i, step in enumerate(small["steps"]):
        missing = [k for k in STEP_KEYS if k not in step]
        if missing:
            raise UsageError(f"{where}: small.steps[{i}] lacks {', '.join(missing)}")
    n = len(small["steps"])
    escs = rec["escalations"]
    if not isinstance(escs, list) or len(escs) != n:
        raise UsageError(f"{where}: {n} small steps need {n} escalations, found "
                         f"{len(escs) if isinstance(escs, list) else type(escs).__name__}")
    for k, esc in enumerate(escs):
        missing = [key for key in ESCALATION_KEYS if key not in esc]
        if missing:
            raise UsageError(f"{where}: escalations[{k}] lacks {', '.join(missing)}")
        if esc["after"] != k:
            raise UsageError(f"{where}: escalations[{k}] has after={esc['after']}")
    return rec


def read_table(path) -> list[dict]:
    """Read a schema-1 trajectory table (JSONL). Clear one-line errors on any bad line."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    records, seen = [], set()
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise UsageError(f"{where}: not valid JSON ({err.msg})") from None
            validate_record(rec, where)
            if rec["id"] in seen:
                raise UsageError(f"{where}: duplicate id {rec['id']!r}")
            seen.add(rec["id"])
            records.append(rec)
    if not records:
        raise UsageError(f"{path}: the table has no questions")
    return records


def done_ids(path) -> set[str]:
    """Ids already in an output table (for resuming). A torn last line is dropped."""
    path = Path(path)
    if not path.exists():
        return set()
    ids, good_bytes = set(), 0
    with path.open("rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            try:
                ids.add(json.loads(raw)["id"])
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
                break
            good_bytes += len(raw)
    if good_bytes != path.stat().st_size:  # a crash mid-write: cut the torn tail off
        with path.open("r+b") as f:
            f.truncate(good_bytes)
    return ids


def append_record(f, rec: dict) -> None:
    """Write one question as one whole line and flush it to disk."""
    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())
