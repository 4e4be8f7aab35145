"""demo.py (the main job) end to end on the tiny pool: every output and the headline; a second
run skips every stage; an interrupted test table and a lost eval.json are redone, nothing else.
The first run is five stage subprocesses on three tiny tables (about a minute on 2 free cores)."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

import demo
from tinymodel import write_questions_jsonl

ROOT = Path(__file__).resolve().parents[1]
COUNTS = {"train": 8, "calib": 6, "test": 6}
STAGES = ("rollout train", "rollout calib", "rollout test", "train policy", "calibrate", "evaluate")
METHODS = ("small", "large", "random", "mean_logprob", "min_logprob", "mean_entropy",
           "max_entropy", "oracle", "policy")


def run_demo(*args):
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "demo.py", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    return proc, time.perf_counter() - t0


@pytest.fixture(scope="module")
def job(tiny_pool, tmp_path_factory):
    """The first run of demo.py on the tiny pool, with tiny counts."""
    d = tmp_path_factory.mktemp("demo")
    questions = list(tiny_pool["questions"])
    while len(questions) < 4 * max(COUNTS.values()):  # the test region is the last quarter
        questions += tiny_pool["questions"]
    data = write_questions_jsonl(d / "questions.jsonl", questions)
    args = ["--dataset", data, "--small", tiny_pool["small"], "--large", tiny_pool["large"],
            *[x for k, v in COUNTS.items() for x in (f"--{k}", v)],
            "--max-new-tokens", 96, "--dtype", "float32", "--out", d / "out"]
    proc, seconds = run_demo(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"out": d / "out", "args": args, "proc": proc, "seconds": seconds,
            "n_questions": len(questions)}


def lines(path):
    return path.read_text(encoding="utf-8").splitlines()


def test_first_run_writes_every_output_and_the_headline(job):
    out = job["out"]
    for name in ("train.jsonl", "calib.jsonl", "test.jsonl", "policy.pt", "calibration.json",
                 "eval.json", "eval.md", "tradeoff.png", "escalation_steps.png", "demo.json"):
        assert (out / name).is_file(), name
    # three disjoint slices, each the first questions of its region of the split
    ids = {s: [json.loads(l)["id"] for l in lines(out / f"{s}.jsonl")] for s in COUNTS}
    offsets, _ = demo.regions(job["n_questions"])
    for s, n in COUNTS.items():
        assert sorted(ids[s]) == sorted(f"questions/test/{i}" for i in range(offsets[s], offsets[s] + n))
    assert not set(ids["train"]) & set(ids["calib"]) and not set(ids["calib"]) & set(ids["test"])

    ev = json.loads((out / "eval.json").read_text())
    assert set(METHODS) <= set(ev["methods"]) and ev["n"] == COUNTS["test"]
    pc = ev["policy_calibrated"]
    # the headline is printed last and says what eval.json says
    stdout = job["proc"].stdout
    tail = stdout[stdout.index("headline on"):]
    assert tail.startswith(f"headline on {COUNTS['test']} test questions")
    small = ev["methods"]["small"][0]
    assert f"accuracy {small['accuracy']:.3f}, relative cost {small['relative_cost']:.3f}" in tail
    assert "best handcrafted router at the target: " in tail
    assert f"calibrated policy (kappa {pc['kappa']:.4g})" in tail
    assert f"meets the target: {'yes' if pc['meets_target'] else 'no'}" in tail
    for stage in STAGES:
        assert f"{stage} done in" in stdout

    record = json.loads((out / "demo.json").read_text())
    run = record["runs"][-1]
    assert run["command"].startswith(f"{Path(sys.executable).name} demo.py --dataset")
    assert {"platform", "cpu_count", "torch_threads"} <= set(run["machine"])
    assert all(run["stages"][s]["status"] == "ran" for s in STAGES)
    assert record["counts"] == COUNTS
    assert record["headline"]["small"]["accuracy"] == small["accuracy"]
    assert record["headline"]["policy_calibrated"]["meets_target"] == pc["meets_target"]
    assert record["total_seconds"] > 0


def test_second_run_skips_every_stage(job):
    out = job["out"]
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "demo.json"}
    proc, seconds = run_demo(*job["args"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for i, stage in enumerate(STAGES, start=2):
        assert f"stage {i}/7 {stage}: skipped" in proc.stdout
    assert "$ python" not in proc.stdout and "every stage skipped" in proc.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "demo.json"} == before
    assert seconds < job["seconds"] / 2
    assert proc.stdout[proc.stdout.index("headline on"):] == \
        job["proc"].stdout[job["proc"].stdout.index("headline on"):]


def test_usage_errors_are_one_line(job, tiny_pool):
    out = job["out"]
    for args, msg in [
        (["--small", tiny_pool["small"]], "--small and --large go together"),
        (["--train", 0], "--train must be at least 1"),
        # another pool, other slices, other generation settings: refused, not mixed in
        ([*job["args"], "--large", tiny_pool["small"]], "holds a table of pool"),
        ([*job["args"], "--train", 5], "outside this slice"),
        ([*job["args"], "--max-new-tokens", 64], "made with --max-new-tokens 96"),
        ([*job["args"], "--test", job["n_questions"]], "its region of --dataset"),
    ]:
        proc, _ = run_demo(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.startswith("demo.py: error: ") and msg in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    assert len(json.loads((out / "demo.json").read_text())["runs"]) == 2  # refused runs leave no record


def test_interrupted_table_resumes_and_only_that_part_is_redone(job):
    out = job["out"]
    table = out / "test.jsonl"
    full = lines(table)
    table.write_text("\n".join(full[:-1]) + "\n" + full[-1][:40], encoding="utf-8")  # torn last line
    (out / "eval.json").unlink()
    kept = {n: (out / n).stat().st_mtime_ns for n in ("train.jsonl", "calib.jsonl", "policy.pt",
                                                      "calibration.json")}
    proc, _ = run_demo(*job["args"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"rollout test: 1 of {COUNTS['test']} questions" in proc.stdout
    for stage in ("rollout train", "rollout calib", "train policy", "calibrate"):
        assert f"{stage}: skipped" in proc.stdout
    assert "evaluate done in" in proc.stdout
    assert {n: (out / n).stat().st_mtime_ns for n in kept} == kept
    again = lines(table)
    assert again[:-1] == full[:-1] and len(again) == len(full)
    assert json.loads(again[-1])["id"] == json.loads(full[-1])["id"]
    assert (out / "eval.json").is_file()
    run = json.loads((out / "demo.json").read_text())["runs"][-1]
    assert run["stages"]["rollout test"]["status"] == "resumed"
    assert run["stages"]["evaluate"]["status"] == "ran"


def test_best_handcrafted_router_at_the_target():
    methods = {"mean_logprob": [{"knob": -1.0, "accuracy": 0.8, "relative_cost": 0.5},
                                {"knob": -0.5, "accuracy": 0.9, "relative_cost": 0.7}],
               "min_logprob": [{"knob": -3.0, "accuracy": 0.9, "relative_cost": 0.6}],
               "mean_entropy": [], "max_entropy": [{"knob": 2.0, "accuracy": 0.95, "relative_cost": 0.9}],
               "oracle": [{"knob": None, "accuracy": 1.0, "relative_cost": 0.1}]}  # not handcrafted
    name, point = demo.best_at_target(methods, 0.9)
    assert (name, point["relative_cost"]) == ("min_logprob", 0.6)
    assert demo.best_at_target(methods, 0.96) is None
