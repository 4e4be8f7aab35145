"""rollout.py on a tiny real model pool (tests/tinymodel.py) and on hand-made inputs."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import engine
import rollout
from cli import UsageError
from engine import StepDrafter, generate_batch, step_ends
from data import extract_answer, is_equivalent
from rollout import encode_prompt
from table import read_table

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- steps
def test_step_ends_at_token_boundaries():
    # token ids: 0 "a", 1 ".\n\n" (blank line inside a token), 2 "\n", 3 "b", 4 "\n\n\n", 5 "c\n"
    flags = (frozenset({1, 4}), frozenset({2, 4}), frozenset({1, 2, 4, 5}))
    assert step_ends(flags, [0, 1, 3, 2, 2, 3]) == [2, 5, 6]  # ".\n\n" | "b" "\n" "\n" | "b"
    assert step_ends(flags, [3, 5, 2, 0]) == [3, 4]  # "c\n" then "\n" completes the blank line
    assert step_ends(flags, [1, 2, 3]) == [1, 3]  # a "\n" right after a step starts the next
    assert step_ends(flags, [4]) == [1]
    assert step_ends(flags, []) == []


# ---------------------------------------------------------------------------- tiny model
def test_table_invariants(tiny_table, tiny_lms):
    small, large = tiny_lms
    records = tiny_table["records"]
    assert len(records) == 8
    assert any(len(r["small"]["steps"]) >= 3 for r in records)
    for r in records:
        steps, escs = r["small"]["steps"], r["escalations"]
        assert r["pool"]["small"]["params"] == small.params and r["pool"]["large"]["params"] == large.params
        assert len(escs) == len(steps) and [e["after"] for e in escs] == list(range(len(steps)))
        for s in steps[:-1]:
            assert s["text"].endswith("\n\n") and "\n\n" not in s["text"][:-2].rstrip("\n")
        for s in steps:
            assert s["min_logprob"] <= s["mean_logprob"] <= 0 <= s["mean_entropy"] <= s["max_entropy"]
        # the step texts are the small model's solution, token for token
        prompt = encode_prompt(small.tokenizer, r["question"])
        assert r["small"]["prompt_tokens"] == len(prompt)
        g = generate_batch(small, [prompt], 96, stats=True)[0]
        assert sum(s["tokens"] for s in steps) == len(g.ids)
        text = "".join(s["text"] for s in steps)
        assert text == small.tokenizer.decode(g.ids, skip_special_tokens=True)
        assert r["small"]["finished"] == g.finished
        assert r["small"]["answer"] == extract_answer(text)
        # the large prompt grows with every accepted step, by that step's re-encoded text
        for k, e in enumerate(escs):
            prefix = "".join(s["text"] for s in steps[:k])
            assert e["prompt_tokens"] == len(encode_prompt(large.tokenizer, r["question"], prefix))
            if k:
                assert e["prompt_tokens"] > escs[k - 1]["prompt_tokens"]
            assert e["correct"] == is_equivalent(extract_answer(prefix + e["text"]), r["gold"])
    # the pool gives right and wrong answers, and the large model is the better one
    small_acc = sum(r["small"]["correct"] for r in records)
    large_acc = sum(r["escalations"][0]["correct"] for r in records if r["escalations"])
    assert 0 < large_acc and small_acc < len(records) and large_acc >= small_acc


def test_one_shot_split_equals_step_by_step_generation(tiny_table, tiny_lms):
    small, large = tiny_lms
    for r in tiny_table["records"]:
        drafter = StepDrafter(small, encode_prompt(small.tokenizer, r["question"]), 96)
        live = []
        while (step := drafter.next_step()) is not None:
            live.append(step)
            assert drafter.ended == (len(live) == len(r["small"]["steps"]))
        assert [s["text"] for s in live] == [s["text"] for s in r["small"]["steps"]]
        for a, b in zip(live, r["small"]["steps"]):
            assert a["tokens"] == b["tokens"]
            for key in ("mean_logprob", "min_logprob", "mean_entropy", "max_entropy"):
                assert a[key] == pytest.approx(b[key], abs=1e-4)
        # the large model's continuation after k steps, generated step by step, too
        for k, e in enumerate(r["escalations"][:2]):
            prefix = "".join(s["text"] for s in r["small"]["steps"][:k])
            cont = StepDrafter(large, encode_prompt(large.tokenizer, r["question"], prefix), 96)
            while cont.next_step() is not None:
                pass
            assert cont.solution_text == e["text"] and cont.generated == e["tokens"]


def assert_same_table(got: list, want: list, tol: float = 1e-4) -> None:
    """Two tables hold the same questions (in any order) with equal everything that is not a
    float, and floats (token statistics from batched decoding) within `tol`."""
    def split(obj, floats):
        if isinstance(obj, float):
            floats.append(obj)
            return "<float>"
        if isinstance(obj, dict):
            return {k: split(v, floats) for k, v in obj.items()}
        if isinstance(obj, list):
            return [split(v, floats) for v in obj]
        return obj
    by_id = {r["id"]: r for r in want}
    assert sorted(r["id"] for r in got) == sorted(by_id)
    for r in got:
        fg, fw = [], []
        assert split(r, fg) == split(by_id[r["id"]], fw)
        assert fg == pytest.approx(fw, abs=tol)


def test_fast_build_equals_the_reference_build(tiny_table, tiny_lms):
    """The slot engine's table (batched, prefix-shared, pooled continuations) is the table the
    paper describes: one question, one step, one continuation at a time (rollout.py's
    reference_records, through the step drafter)."""
    small, large = tiny_lms
    questions = [{k: r[k] for k in ("id", "dataset", "question", "gold")} for r in tiny_table["records"]]
    reference = rollout.reference_records(small, large, questions, 96)
    fast = [{k: v for k, v in r.items() if k != "settings"} for r in tiny_table["records"]]
    assert_same_table(fast, reference)


def test_resume_after_interrupted_run(tiny_pool, tiny_table, tmp_path):
    out = tmp_path / "t.jsonl"
    first6 = {f"q/test/{i}" for i in range(6)}  # --limit 6: the first six questions
    full = [x for x in tiny_table["out"].read_text().splitlines(keepends=True)
            if json.loads(x)["id"] in first6]  # lines are written as questions finish
    out.write_text("".join(full[:3]) + full[3][: len(full[3]) // 2])  # torn 4th line
    rollout.main(["--dataset", str(tiny_table["data"]), "--small", str(tiny_pool["small"]),
                  "--large", str(tiny_pool["large"]), "--out", str(out), "--dtype", "float32",
                  "--max-new-tokens", "96", "--limit", "6"])
    lines = out.read_text().splitlines(keepends=True)
    assert lines[:3] == full[:3]  # kept as they were
    # the same table: ids, texts, token counts, answers exactly; statistics up to float noise
    # (a resumed run batches other questions together)
    assert_same_table([json.loads(x) for x in lines], [json.loads(x) for x in full])
    # a finished table is left alone
    rollout.main(["--dataset", str(tiny_table["data"]), "--small", str(tiny_pool["small"]),
                  "--large", str(tiny_pool["large"]), "--out", str(out), "--dtype", "float32",
                  "--max-new-tokens", "96", "--limit", "6"])
    assert out.read_text().splitlines(keepends=True) == lines


# ---------------------------------------------------------------------------- bad input
def run_rollout(*args, cwd=None):
    return subprocess.run([sys.executable, str(ROOT / "rollout.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.parametrize("case", ["missing", "no_answer", "unknown", "empty", "model", "flag"])
def test_bad_input_is_one_line_and_exit_2(case, tiny_pool, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "1+1?", "answer": "2"}\n')
    small, expect = str(tiny_pool["small"]), None
    args = {"missing": ["--dataset", str(tmp_path / "nope.jsonl")],
            "unknown": ["--dataset", "gsm9k"],
            "empty": ["--dataset", str(data), "--offset", "5"],
            "model": ["--dataset", str(data), "--small", str(tmp_path / "no-model")],
            "flag": ["--dataset", str(data), "--batch-size", "0"],
            "no_answer": ["--dataset", str(data)]}[case]
    if case == "no_answer":
        data.write_text('{"question": "1+1?", "answer": "2"}\n{"question": "2+2?"}\n')
        expect = f"{data}:2"
    out = tmp_path / "out.jsonl"
    r = run_rollout(*args, "--out", str(out), *(["--small", small] if case != "model" else []),
                    "--large", small, "--max-new-tokens", "8")
    assert r.returncode == 2, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("rollout.py: error: "), r.stderr
    if expect:
        assert expect in lines[0]
    assert not out.exists()


def test_bad_table_lines_are_named(tmp_path):
    t = tmp_path / "t.jsonl"
    t.write_text('{"schema": 2}\n')
    with pytest.raises(UsageError, match="t.jsonl:1: schema 2"):
        read_table(t)
    t.write_text("\n")
    with pytest.raises(UsageError, match="no questions"):
        read_table(t)


def test_resuming_refuses_what_is_no_table_and_leaves_it_as_it_was(tmp_path):
    """--out is appended to after done_ids() cuts a torn last line off. A file that is no
    table (a policy, a question file, a gzip table) or a table with a bad whole line is refused
    in one line and left as it was (before, everything from the first bad line on was cut)."""
    import gzip
    import re
    import train_policy
    from table import check_resumable, done_ids
    policy = tmp_path / "policy.pt"
    train_policy.save_policy(policy, train_policy.Policy(hidden=[4]), {})
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question": "1+1?", "answer": "2"}\n')
    gz = tmp_path / "t.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"id": "a"}\n'))
    middle = tmp_path / "middle.jsonl"
    middle.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\x80\x04\x95 no newline")
    for path, message in [(policy, f"{policy}: a zip archive"),
                          (questions, f"{questions}:1: not a trajectory table line (no 'id')"),
                          (gz, f"{gz}: gzip-compressed"),
                          (middle, f"{middle}:2: not a trajectory table line (JSONDecodeError)"),
                          (binary, f"{binary}:1: not a trajectory table line")]:
        before = path.read_bytes()
        with pytest.raises(UsageError, match=re.escape(message)):
            check_resumable([path], {}, {})
        assert path.read_bytes() == before, path
    torn = tmp_path / "torn.jsonl"
    torn.write_text('{"id": "a"}\n\n{"id": "b"}\n{"id": "c", "sma')
    assert done_ids(torn) == {"a", "b"} and torn.read_text() == '{"id": "a"}\n\n{"id": "b"}\n'


def test_out_that_is_a_policy_file_is_refused_and_kept(tiny_pool, tmp_path):
    import train_policy
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "1+1?", "answer": "2"}\n')
    policy = tmp_path / "policy.pt"
    train_policy.save_policy(policy, train_policy.Policy(hidden=[4]), {})
    before = policy.read_bytes()
    r = run_rollout("--dataset", str(data), "--out", str(policy), "--small", str(tiny_pool["small"]),
                    "--large", str(tiny_pool["small"]), "--max-new-tokens", "8")
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0] == f"rollout.py: error: {policy}: a zip archive (a policy file from train_policy.py?), " \
                       f"not a trajectory table (JSONL from rollout.py)"
    assert policy.read_bytes() == before


def test_a_gzipped_table_reads_the_same(tiny_table, tmp_path):
    import gzip
    gz = tmp_path / "t.jsonl.gz"
    gz.write_bytes(gzip.compress(tiny_table["out"].read_bytes()))
    assert read_table(gz) == tiny_table["records"]


def test_auto_dtype_is_float32_on_every_cpu(monkeypatch):
    """auto is float32 on a CPU, also where it computes in bfloat16 (whose rounding depends on
    batch composition, so a live run could leave the table): --dtype bfloat16 asks for speed."""
    import torch
    assert engine.resolve_dtype("auto", "cpu") is torch.float32
    assert engine.resolve_dtype("bfloat16", "cpu") is torch.bfloat16
    with pytest.raises(UsageError, match="--dtype"):
        engine.resolve_dtype("float8", "cpu")


def test_resume_with_other_settings_is_refused(tiny_pool, tiny_table, tmp_path):
    """A table continues only with the settings that made it (issue: a rerun with another
    --max-new-tokens or --dtype silently appended)."""
    out = tmp_path / "t.jsonl"
    out.write_text(tiny_table["out"].read_text().splitlines(keepends=True)[0])
    assert json.loads(out.read_text())["settings"]["max_new_tokens"] == 96
    before = out.read_text()
    for flag, value, what in (("--max-new-tokens", "64", "max_new_tokens 96 there, 64 now"),
                              ("--dtype", "bfloat16", "dtype ['float32'] there, ['bfloat16'] now")):
        args = {"--max-new-tokens": "96", "--dtype": "float32", flag: value}
        r = run_rollout("--dataset", str(tiny_table["data"]), "--small", str(tiny_pool["small"]),
                        "--large", str(tiny_pool["large"]), "--out", str(out),
                        *[x for kv in args.items() for x in kv])
        assert r.returncode == 2 and "other settings" in r.stderr and what in r.stderr, r.stderr
        assert out.read_text() == before


def test_sigkill_after_the_first_question_keeps_its_line(tiny_pool, tiny_table, tmp_path):
    """Each question's line is on disk as soon as its continuations are done, not when the
    round ends: a SIGKILL after the first one leaves it whole."""
    import signal
    import time
    out = tmp_path / "t.jsonl"
    proc = subprocess.Popen([sys.executable, str(ROOT / "rollout.py"), "--dataset", str(tiny_table["data"]),
                             "--small", str(tiny_pool["small"]), "--large", str(tiny_pool["large"]),
                             "--out", str(out), "--dtype", "float32", "--max-new-tokens", "96",
                             "--batch-size", "2", "--chunk-size", "8"],
                            stderr=subprocess.DEVNULL, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 300
    while time.time() < deadline and not (out.exists() and out.read_bytes().count(b"\n") >= 1):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = read_table(out)  # whole, valid lines only
    assert 1 <= len(kept) < 8  # written within the round of 8 questions, before it ended
    by_id = {r["id"]: r for r in tiny_table["records"]}
    for rec in kept:
        assert [(e["text"], e["tokens"]) for e in rec["escalations"]] == \
            [(e["text"], e["tokens"]) for e in by_id[rec["id"]]["escalations"]]
