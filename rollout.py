"""Stage 1 of stepwise model routing: record exact step trajectories (docs/DESIGN.md sections 1-3).

Run it (the paper's pool; any hub id, local folder or .gguf file works for --small/--large):

    python rollout.py --dataset gsm8k --split test --limit 200 \\
        --small Qwen/Qwen2.5-Math-1.5B-Instruct --large Qwen/Qwen2.5-Math-7B-Instruct \\
        --out results/gsm8k/test.jsonl

On a GPU, let it size the batch and replay the decode step as CUDA graphs; on several GPUs,
launch one process per GPU (each takes every n-th question; the parts are merged into --out):

    python rollout.py --dataset gsm8k --split train --batch-size auto --compile \\
        --out results/gsm8k/train.jsonl
    accelerate launch --multi_gpu --num_processes 8 rollout.py --dataset gsm8k \\
        --split train --batch-size auto --compile --out results/gsm8k/train.jsonl

For every question the small model writes its whole greedy solution once; the solution is
split into steps at token boundaries (a step ends with the token that completes a blank
line, "\\n\\n"), and every step keeps the small model's token statistics (mean / min
log-probability of the chosen tokens, mean / max entropy of the next-token distribution).
Then the large model continues greedily after every prefix of k accepted small steps,
k = 0..n-1. Because decoding is greedy, this table fixes the outcome of every one-way
escalation router on the question, so training, calibration and evaluation need no LLM call.

The output is schema-1 JSONL (docs/DESIGN.md section 3), one question per line, each line
written whole and flushed. Running again with the same --out skips the ids already there,
so an interrupted run resumes without losing or duplicating anything.

With a process reward model (Qwen2.5-Math-PRM family, prm.py), every drafted small step is
scored as the table is built (`--prm MODEL`), or an existing table is scored without the
pool (`--prm MODEL --rescore TABLE [--out OUT]`; OUT defaults to TABLE, replaced whole):

    python rollout.py --dataset gsm8k --split test --prm Qwen/Qwen2.5-Math-PRM-7B \
        --out results/gsm8k/test.jsonl
    python rollout.py --prm Qwen/Qwen2.5-Math-PRM-7B --rescore results/gsm8k/test.jsonl

A policy that reads the small model's hidden state (train_policy.py --hidden-state) needs the
states of every table it meets, kept beside it (TABLE.hidden.pt: the middle layer at the
prompt's last token and at each step's last token, float16, ~2 KB a step for a 0.5B model).
`--add-hidden` adds them to any existing table, however and whenever it was built: the small
model alone (the table's own, or `--small`), teacher-forced over the recorded steps, in the
dtype the table was built in; only questions the file lacks are computed:

    python rollout.py --add-hidden results/gsm8k/train.jsonl results/gsm8k/calib.jsonl
"""
from __future__ import annotations

import random
import sys
from pathlib import Path

from cli import Progress, UsageError, add_api_args, add_model_args, make_parser, run_cli
from data import DATASETS, extract_answer, is_equivalent, load_questions
from engine import (LM, Continuation, finish_shard, load_lm, merge_parts, part_files, part_path,
                    resolve_device, shard_of_env, size_engines)
from table import SCHEMA, append_record, check_resumable

DEFAULT_SMALL = "Qwen/Qwen2.5-Math-1.5B-Instruct"
DEFAULT_LARGE = "Qwen/Qwen2.5-Math-7B-Instruct"
SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


# ----------------------------------------------------------------------------------------
# Config: every flag of the stage and its default, in one place.
# ----------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = make_parser(__doc__)
    p.add_argument("--dataset",
                   help=f"one of {', '.join(DATASETS)}, or a .jsonl file with question/answer "
                        f"(required unless --rescore)")
    p.add_argument("--split", default="test", help="the dataset's split (default test)")
    p.add_argument("--limit", type=int, default=None, help="at most this many questions (default: all)")
    p.add_argument("--offset", type=int, default=0, help="skip this many questions first (default 0)")
    p.add_argument("--small", default=None,
                   help="hub id, model folder or .gguf file; with --small-api, the model the "
                        f"server serves (default {DEFAULT_SMALL}; with --add-hidden, the table's)")
    p.add_argument("--large", default=DEFAULT_LARGE,
                   help="hub id, model folder or .gguf file; with --large-api, the model the "
                        f"server serves (default {DEFAULT_LARGE})")
    p.add_argument("--out", help="schema-1 JSONL table (appended to; resumable). With --rescore: "
                                 "where the scored table goes (default: TABLE itself, replaced)")
    p.add_argument("--prm", metavar="MODEL",
                   help="process reward model (hub id or folder of the Qwen2.5-Math-PRM family, "
                        "e.g. Qwen/Qwen2.5-Math-PRM-7B): score every drafted small step "
                        "(steps[i].prm_score; pool.prm records it)")
    p.add_argument("--rescore", metavar="TABLE",
                   help="with --prm: add the PRM's scores to an existing table (.jsonl or "
                        ".jsonl.gz) without loading the pool")
    p.add_argument("--add-hidden", metavar="TABLE", nargs="+",
                   help="add the small model's hidden states to existing tables (TABLE.hidden.pt "
                        "beside each; the small model alone, teacher-forced; resumable)")
    p.add_argument("--prm-batch-size", type=int, default=8,
                   help="solutions the PRM scores in one forward pass (default 8)")
    add_api_args(p)
    add_model_args(p)
    p.add_argument("--batch-size", default="auto",
                   help="sequences decoded together (slots), or 'auto': as many as free GPU "
                        "memory holds (up to 512), 64 on a CPU (default auto)")
    p.add_argument("--chunk-size", default="auto",
                   help="questions per round: the small model's solutions of a round are "
                        "decoded together, then their continuations; each question's line is "
                        "written as soon as its last continuation is done (default auto: the "
                        "larger of 64 and the batch size)")
    p.add_argument("--compile", action="store_true",
                   help="decode through CUDA graphs captured once per cache-length bucket "
                        "(GPU only; removes the kernel-launch overhead of eager decoding)")
    args = p.parse_args(argv)
    for flag in ("batch_size", "chunk_size"):
        value = getattr(args, flag)
        if value != "auto":
            try:
                setattr(args, flag, int(value))
            except ValueError:
                raise UsageError(f"--{flag.replace('_', '-')} must be an integer or 'auto', "
                                 f"got {value!r}") from None
    if args.rescore is not None and args.prm is None:
        raise UsageError("--rescore TABLE needs --prm MODEL (the PRM to score the table with)")
    if args.rescore is not None and args.dataset is not None:
        raise UsageError("--rescore scores an existing table: it takes no --dataset")
    if args.add_hidden is not None and (args.dataset or args.rescore or args.out or args.prm):
        raise UsageError("--add-hidden reads existing tables: it takes no --dataset, --rescore, "
                         "--out or --prm")
    if args.add_hidden is not None and args.small_api:
        raise UsageError("--add-hidden: a small model behind a server (--small-api) has no hidden "
                         "state to read; give --small PATH, a local copy of it")
    if args.rescore is None and args.add_hidden is None and (args.dataset is None or args.out is None):
        raise UsageError("the following arguments are required: "
                         + ", ".join(f for f, v in (("--dataset", args.dataset), ("--out", args.out))
                                     if v is None))
    for flag in ("limit", "max_new_tokens", "batch_size", "chunk_size", "concurrency",
                 "top_logprobs", "prm_batch_size"):
        value = getattr(args, flag)
        if isinstance(value, int) and value < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if args.offset < 0:
        raise UsageError(f"--offset must be >= 0, got {args.offset}")
    args.small_given, args.small = args.small is not None, args.small or DEFAULT_SMALL
    return args


# ----------------------------------------------------------------------------------------
# Prompt: the Qwen2.5-Math chain-of-thought style, through the model's chat template.
# The large model continues after k accepted steps: prompt + the steps' text, re-encoded.
# ----------------------------------------------------------------------------------------
def prompt_text(tokenizer, question: str) -> str:
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{SYSTEM_PROMPT}\n\nQuestion: {question}\n\nAnswer: "


def encode_prompt(tokenizer, question: str, prefix: str = "") -> list:
    """Token ids of the prompt for `question`, followed by already written solution text."""
    return tokenizer(prompt_text(tokenizer, question) + prefix, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------------------
# Steps: a step is every generated token up to and including the first token that completes
# a blank line ("\n\n") within the step. The rule is stated once, on token texts; the
# engine turns it into per-token-id sets, and api_engine.py applies it to token bytes.
# ----------------------------------------------------------------------------------------
def ends_step(prev, tok) -> bool:
    """Does a token (text `tok`, str or bytes) end a step, after `prev`, the text of the
    token before it in the same step (None at a step's start)? Yes if it holds a blank line,
    or starts with a newline right after a token that ended with one."""
    nl = "\n" if isinstance(tok, str) else b"\n"
    return nl + nl in tok or (prev is not None and prev.endswith(nl) and tok.startswith(nl))


# ----------------------------------------------------------------------------------------
# The table. For a chunk of questions: every small solution in one batched pass, then every
# large continuation (after k = 0..n-1 accepted steps, for all questions of the chunk)
# pooled, sorted by prompt length and batched together. Each finished question is written
# as one whole line.
# ----------------------------------------------------------------------------------------
def grade(text: str, gold: str, finished: bool) -> dict:
    answer = extract_answer(text)
    return {"answer": answer, "correct": is_equivalent(answer, gold), "finished": finished}


def pool_record(small, large) -> dict:
    return {"small": small.pool_entry(), "large": large.pool_entry()}


def new_record(q: dict, pool: dict, prompt_tokens: int, steps: list, finished: bool) -> dict:
    """A question's schema-1 line (docs/DESIGN.md section 3): the small model's solution,
    graded; its escalations (one per step) are filled in as they are done."""
    text = "".join(s["text"] for s in steps)
    return {"schema": SCHEMA, "id": q["id"], "dataset": q["dataset"], "question": q["question"],
            "gold": q["gold"], "pool": pool,
            "small": {"prompt_tokens": prompt_tokens, "steps": steps, **grade(text, q["gold"], finished)},
            "escalations": [None] * len(steps)}


def escalation(k: int, prefix: str, c: Continuation, gold: str) -> dict:
    """The large model's continuation after k accepted steps (text `prefix`), graded."""
    return {"after": k, "prompt_tokens": c.prompt_tokens, "tokens": c.tokens, "text": c.text,
            **grade(prefix + c.text, gold, c.finished)}


def build_records(small, large, questions: list, max_new_tokens: int, write) -> None:
    """Schema-1 records for a list of questions, each handed to write(record) as soon as its
    last continuation is done. `small` and `large` are any two models of the generation
    interface (engine.LM, api_engine.ApiModel)."""
    # ALGO LOGIC: the small model's greedy solution of every question, cut into steps
    drafts = small.solve([q["question"] for q in questions], max_new_tokens)
    pool = pool_record(small, large)
    records = [new_record(q, pool, d.prompt_tokens, d.steps, d.finished)
               for q, d in zip(questions, drafts)]
    # ALGO LOGIC: the large model after k accepted steps, k = 0..n-1, for every question at once
    jobs = [(qi, k) for qi, d in enumerate(drafts) for k in range(len(d.steps))]
    prefixes = ["".join(s["text"] for s in drafts[qi].steps[:k]) for qi, k in jobs]
    left = [len(d.steps) for d in drafts]
    for qi in range(len(questions)):
        if not left[qi]:  # no steps: the small outcome is the only one
            write(records[qi])

    def done(j: int, c: Continuation) -> None:
        qi, k = jobs[j]
        records[qi]["escalations"][k] = escalation(k, prefixes[j], c, questions[qi]["gold"])
        left[qi] -= 1
        if not left[qi]:
            write(records[qi])
    large.continue_after([(questions[qi]["question"], prefixes[j]) for j, (qi, _) in enumerate(jobs)],
                         max_new_tokens, on_done=done)


def records_of(small, large, questions: list, max_new_tokens: int) -> list:
    """build_records() collected in question order (benchmarks, tests)."""
    got = {}
    build_records(small, large, questions, max_new_tokens, lambda r: got.__setitem__(r["id"], r))
    return [got[q["id"]] for q in questions]


def reference_records(small, large, questions: list, max_new_tokens: int) -> list:
    """The table as the paper describes it, literally: one question, one step, one
    continuation at a time, each through the step drafter. build_records() gives the same."""
    def run(drafter) -> tuple:  # (steps, finished) of one greedy run, step by step
        steps = []
        while (step := drafter.next_step()) is not None:
            steps.append({k: v for k, v in step.items() if k != "ids"})
        return steps, drafter.generated < drafter.budget  # False: it hit the token limit

    records = []
    for q in questions:
        drafter = small.drafter(q["question"], max_new_tokens)
        steps, finished = run(drafter)
        rec = new_record(q, pool_record(small, large), drafter.prompt_tokens, steps, finished)
        for k in range(len(steps)):  # the large model after k accepted steps
            prefix = "".join(s["text"] for s in steps[:k])
            cont = large.drafter(q["question"], max_new_tokens, prefix=prefix)
            more, finished = run(cont)
            c = Continuation(cont.prompt_tokens, sum(s["tokens"] for s in more),
                             "".join(s["text"] for s in more), finished)
            rec["escalations"][k] = escalation(k, prefix, c, q["gold"])
        records.append(rec)
    return records


def load_model(spec: str, api: str | None, args, device: str = "auto"):
    """A model of the pool, given this method's prompt and step rule: loaded here
    (engine.LM), or behind a server (api_engine.ApiModel)."""
    if api is None:
        lm = load_lm(spec, device, args.dtype, prompt=encode_prompt, ends_step=ends_step)
        lm.batch_size = getattr(args, "batch_size", lm.batch_size)
        lm.compile = getattr(args, "compile", False)
        return lm
    from api_engine import ApiModel
    return ApiModel(spec, api, args.api_key_env, args.top_logprobs, args.continuation,
                    args.concurrency, max_retries=args.max_retries, seed=args.seed,
                    system_prompt=SYSTEM_PROMPT, ends_step=ends_step)


def load_prm_model(args, device: str):
    """The --prm model (prm.py), loaded before anything else: a model that is not a PRM of the
    supported family is a usage error (one line, exit 2) before any generation."""
    import torch
    from prm import PRMError, load_prm
    dtypes = {"auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if args.dtype not in dtypes:
        raise UsageError(f"--dtype must be one of {', '.join(dtypes)}, got {args.dtype!r}")
    try:
        return load_prm(args.prm, resolve_device(device), dtypes[args.dtype])
    except PRMError as err:
        raise UsageError(f"--prm {err}") from None


def scored(prm, records: list, batch_size: int, model: str) -> list:
    """Records with the PRM's step scores (prm.rescore_table) and the PRM in their settings."""
    from prm import rescore_table
    out = rescore_table(records, prm, batch_size)
    for rec in out:
        if "settings" in rec:
            rec["settings"] = {**rec["settings"], "prm": model}
    return out


def rescore(args) -> int:
    """--prm MODEL --rescore TABLE [--out OUT]: the table plus PRM scores, nothing else
    changed; written whole to a temporary file next to OUT, then moved over OUT (so OUT may
    be TABLE). A .gz OUT is written compressed."""
    import gzip
    import os
    from table import read_table
    src = Path(args.rescore)
    out = Path(args.out) if args.out else src
    if out.is_dir():
        raise UsageError(f"--out {out}: is a folder, expected a .jsonl file path")
    records = read_table(src)
    prm = load_prm_model(args, args.device)
    records = scored(prm, records, args.prm_batch_size, args.prm)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        opener = gzip.open if out.suffix == ".gz" else open
        with opener(tmp, "wt", encoding="utf-8") as f:
            for rec in records:
                append_record(f, rec)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {out} ({len(records)} questions scored by {args.prm})", file=sys.stderr)
    return 0


def add_hidden(args) -> int:
    """--add-hidden TABLE...: each table's sidecar of hidden states (probe.hidden_for_table:
    the questions it lacks, or whose text changed, are computed; the file is replaced whole)."""
    import os
    import time
    import probe
    from table import read_table
    for path in args.add_hidden:
        records = read_table(path)
        model = args.small if args.small_given else probe.small_model_of(records, path)
        load_lm(model, check_only=True)  # a mistyped path or an unknown hub id: one line, now
        if Path(model).expanduser().exists():
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local model: never ask the hub
        built = {d for r in records for d in (r.get("settings") or {}).get("dtype") or []}
        dtype = args.dtype if args.dtype != "auto" or len(built) != 1 else built.pop()
        batch = args.batch_size if isinstance(args.batch_size, int) else 8
        start = time.time()
        got = probe.hidden_for_table(path, model, probe.sidecar_path(path), dtype, probe.SIDECAR_LAYERS,
                                     batch, resolve_device(args.device))
        size = got["path"].stat().st_size
        print(f"wrote {got['path']} ({len(got['ids'])} questions, {got['computed']} computed, "
              f"{size / 1e6:.1f} MB, {dtype}) in {time.time() - start:.0f} s", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.rescore is not None:
        return rescore(args)
    if args.add_hidden is not None:
        return add_hidden(args)
    import torch
    # TRY NOT TO MODIFY: seeding, devices, resuming, sharding, engine sizing
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    rank, world, local = shard_of_env()
    device = args.device
    if world > 1 and device in ("auto", "cuda") and torch.cuda.is_available():
        device = f"cuda:{local % torch.cuda.device_count()}"  # one GPU per process
    if args.compile and not resolve_device(device).startswith("cuda"):
        raise UsageError("--compile captures CUDA graphs: it needs a CUDA device")

    questions = load_questions(args.dataset, args.split, args.limit, args.offset)
    out = Path(args.out)
    if out.is_dir():
        raise UsageError(f"--out {out}: is a folder, expected a .jsonl file path")
    prm = load_prm_model(args, device) if args.prm else None
    small = load_model(args.small, args.small_api, args, device)
    large = small if (args.large, args.large_api) == (args.small, args.small_api) \
        else load_model(args.large, args.large_api, args, device)
    # what made the table besides the pool: a resumed table must have been made the same way
    settings = {"max_new_tokens": args.max_new_tokens, "prompt": SYSTEM_PROMPT,
                "dtype": sorted({m.dtype for m in (small, large) if isinstance(m, LM)}) or None}
    pool = pool_record(small, large)
    if prm is not None:   # a resumed table must have been scored by the same PRM
        settings["prm"] = args.prm
        pool["prm"] = prm.pool_entry
    done = check_resumable([out] + part_files(out), pool, settings)
    order = [q["id"] for q in questions]
    if world == 1 and part_files(out):  # parts left by an interrupted sharded run
        print(f"merging {merge_parts(out, order)} questions of an earlier sharded run "
              f"into {out}", file=sys.stderr)
    # a question's process follows from its place in the question list, so processes that
    # start at different moments agree on who does what, also when resuming
    todo = [q for i, q in enumerate(questions) if i % world == rank and q["id"] not in done]
    if done and rank == 0:
        print(f"resuming {out}: {len(set(order) & done)} of {len(questions)} questions "
              "already there", file=sys.stderr)

    # the engines, sized once for the whole run (the longest prompt they can meet)
    local = [m for m in (small, large) if isinstance(m, LM)]
    longest = max((len(encode_prompt(local[0].tokenizer, q["question"])) for q in todo),
                  default=1) if local else 1
    batch = size_engines(small, large, longest, args.max_new_tokens, args.batch_size,
                         args.compile, allocate=bool(todo))
    if batch == "auto":  # no local model: as many questions as requests in flight
        batch = args.concurrency
    chunk = max(64, batch) if args.chunk_size == "auto" else args.chunk_size

    target = out if world == 1 else part_path(out, rank, world)
    target.parent.mkdir(parents=True, exist_ok=True)
    if world > 1:
        target.with_suffix(".done").unlink(missing_ok=True)
    progress = Progress(len(todo), f"questions (process {rank + 1}/{world})" if world > 1
                        else "questions")
    with target.open("a", encoding="utf-8") as f:
        def write(rec: dict) -> None:  # one whole line, on disk, as soon as it is done
            append_record(f, {**rec, "settings": settings})
            if rank == 0:
                progress()
        for c in range(0, len(todo), chunk):  # ALGO LOGIC: the table, a chunk at a time
            if prm is None:
                build_records(small, large, todo[c:c + chunk], args.max_new_tokens, write)
                continue
            # with a PRM: the chunk's finished records scored together, then written
            got = []
            build_records(small, large, todo[c:c + chunk], args.max_new_tokens, got.append)
            for rec in scored(prm, got, args.prm_batch_size, args.prm):
                write(rec)
    if world > 1:
        if finish_shard(out, rank, world, order):
            print(f"wrote {out} ({len(questions)} questions, merged from {world} processes)",
                  file=sys.stderr)
        return 0
    print(f"wrote {out} ({len(questions)} questions)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
