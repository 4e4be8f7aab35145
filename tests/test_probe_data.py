"""tools/probe_data.py on the tiny pool: small-only records (rollout's small part, graded, a story,
no escalations), resumed without duplicates, the hidden-state sidecar probe.py reads, and the
questions whose story is a held-out SVAMP question's dropped; its flags' help."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

import probe_data  # noqa: E402

# its story is that of SVAMP position 750 (test region): "Bryan took a look at his books and magazines."
HELD_OUT = {"question": "Bryan took a look at his books and magazines. How many books does Lily have now?",
            "answer": "3"}


def run(args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "probe_data.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def lines(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_build_resume_sidecar_and_held_out_stories(tiny_pool, tiny_table, tiny_lms, tmp_path):
    import probe
    from data import story_key
    from rollout import SYSTEM_PROMPT
    from tinymodel import write_questions_jsonl
    qs = tiny_pool["questions"]
    data = write_questions_jsonl(tmp_path / "q.jsonl", [qs[0], qs[1], HELD_OUT, qs[2], qs[3], qs[0]])
    out = tmp_path / "pd" / "tiny.jsonl"
    common = ["--dataset", str(data), "--small", str(tiny_pool["small"]), "--max-new-tokens", "96",
              "--batch-size", "2", "--chunk-size", "1", "--device", "cpu", "--out", str(out)]
    # a partial run: the first 3 rows, the held-out story among them
    first = run(common + ["--limit", "3"])
    assert first.returncode == 0, first.stderr
    assert "held out 1 (a held-out SVAMP question's story or position: test 1)" in first.stderr
    assert "0 repeated word for word; 2 kept" in first.stderr
    assert [r["id"] for r in lines(out)] == ["q/test/0", "q/test/1"]
    # resumed: the rest, the word-for-word repeat of row 0 built once
    second = run(common)
    assert second.returncode == 0, second.stderr
    assert "resuming" in second.stderr and "1 repeated word for word; 4 kept" in second.stderr
    recs = lines(out)
    assert sorted(r["id"] for r in recs) == ["q/test/0", "q/test/1", "q/test/3", "q/test/4"]
    # each record: rollout's small part of the same question, graded; its story; no escalations
    table = {r["question"]: r for r in tiny_table["records"]}
    for r in recs:
        assert set(r) == {"schema", "id", "dataset", "question", "gold", "story", "pool", "small", "settings"}
        mine, theirs = r["small"], table[r["question"]]["small"]   # the same greedy run (statistics
        assert {k: v for k, v in mine.items() if k != "steps"} == \
            {k: v for k, v in theirs.items() if k != "steps"}      # to float noise of another batch)
        assert [(s["text"], s["tokens"]) for s in mine["steps"]] == [(s["text"], s["tokens"]) for s in theirs["steps"]]
        for a, b in zip(mine["steps"], theirs["steps"]):
            assert set(a) == set(b) and all(abs(a[k] - b[k]) < 1e-4 for k in a if k not in ("text", "tokens"))
        assert r["pool"] == {"small": table[r["question"]]["pool"]["small"]}
        assert r["story"] == story_key(r["question"]) and r["story"]
        assert r["settings"] == {"max_new_tokens": 96, "prompt": SYSTEM_PROMPT, "dtype": ["float32"]}
    # the sidecar: every record's states, as probe.hidden_states gives them
    side = probe.sidecar_path(out)
    blob = probe.load_hidden(side)
    assert blob["ids"] == [r["id"] for r in recs] and blob["meta"]["layers"] == list(probe.SIDECAR_LAYERS)
    assert blob["meta"]["keys"] == {r["id"]: probe.record_key(r) for r in recs}
    small, _ = tiny_lms
    want = probe.hidden_states(small, recs, probe.SIDECAR_LAYERS)
    for r, (q, steps) in zip(recs, want):
        assert blob["hidden"][r["id"]].shape == (len(r["small"]["steps"]), 1, small.model.config.hidden_size)
        assert torch.allclose(blob["hidden"][r["id"]].float(), steps.float(), atol=1e-2)
        assert torch.allclose(blob["question"][r["id"]].float(), q.float(), atol=1e-2)
    # killed before a chunk's states were saved, and a torn last line: the states are added, the line cut
    side.unlink()
    with out.open("a") as f:
        f.write('{"schema": 1, "id": "q/test/')
    third = run(common)
    assert third.returncode == 0, third.stderr
    assert "added the states of 4 earlier solutions to" in third.stderr
    assert [r["id"] for r in lines(out)] == [r["id"] for r in recs]
    assert probe.load_hidden(side)["ids"] == blob["ids"]
    # other settings: refused in one line
    other = run(common[:-2] + ["--max-new-tokens", "64", "--out", str(out)])
    assert other.returncode == 2 and "other settings" in other.stderr and "Traceback" not in other.stderr


def test_select_questions_drops_held_out_stories_positions_and_repeats():
    qs = [{"id": "a/0", "question": "Ann has 3 cats. How many?"},
          {"id": "a/1", "question": "Bob has 2 dogs. How many?"},
          {"id": "a/2", "question": "Ann has 5 cats. How many legs?"},
          {"id": "svamp/test/800", "question": "Cy has 1 cow. How many?"},
          {"id": "a/4", "question": "Bob has 2 dogs.  How many?"},
          {"id": "a/5", "question": "How many cats are there?"}]
    keep, dropped = probe_data.select_questions(qs, {"ann has # cats": "test"}, {"svamp/test/800"})
    assert [q["id"] for q in keep] == ["a/1", "a/5"]
    assert dropped == {"test": 2, "position": 1, probe_data.REPEATED: 1}


def test_held_out_svamp_stories():
    stories, ids = probe_data.heldout_stories()
    assert len(ids) == 96 + 250 + 150 + 100 and "svamp/test/204" in ids and "svamp/test/300" not in ids
    assert stories["bryan took a look at his books and magazines"] == "test"   # SVAMP 750
    assert set(stories.values()) == {"check", "calibration", "test", "reserved"}


def test_every_flag_has_help_and_an_example():
    parser = probe_data.build_parser()
    for action in parser._actions:
        if action.dest != "help":
            assert action.help and action.help.strip(), action.option_strings
    text = parser.format_help()
    assert "(default: None)" not in text and "python tools/probe_data.py" in text.split("example:")[1]


@pytest.mark.parametrize("args, message", [(["--dataset", "asdiv", "--limit", "0"], "--limit must be"),
                                           (["--dataset", "asdiv", "--small", "/no/such/model"], "no such folder"),
                                           (["--dataset", "nope"], "--dataset 'nope'")])
def test_bad_flags_are_one_line(args, message, tiny_pool, tmp_path):
    proc = run(["--small", str(tiny_pool["small"]), "--out", str(tmp_path / "x.jsonl")] + args)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.jsonl").exists()
