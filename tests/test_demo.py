"""demo.py (the main job) end to end on the tiny pool: every output and the headline; a second
run skips every stage; an interrupted test table and a lost eval.json are redone, nothing else.
The first run is five stage subprocesses on three tiny tables (about a minute on 2 free cores)."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

import calibrate as cb
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
    questions, copy = list(tiny_pool["questions"]), 0
    while len(questions) < 4 * max(COUNTS.values()):  # the test region is the last quarter
        copy += 1                                     # distinct texts: the stages refuse overlaps
        questions += [{**q, "question": f"Copy {copy}. {q['question']}"} for q in tiny_pool["questions"]]
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
    # calibrated against calibrated: the baselines were calibrated on the calib table too
    assert ev["calib_data"] == str(out / "calib.jsonl")
    best = ev["policy_vs_best_handcrafted"]["baseline"]
    b = ev["calibrated"][best]
    assert f"best calibrated handcrafted router: {best} " in tail
    assert f"accuracy {b['accuracy']:.3f}, relative cost {b['relative_cost']:.3f}" in tail
    assert f"calibrated policy (kappa {cb.format_kappa(pc['kappa'])})" in tail
    assert f"meets the target: {'yes' if pc['meets_target'] else 'NO'}" in tail
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


def headline_example():
    pt = lambda knob, acc, cost, met, cmet, ccost: {  # noqa: E731
        "knob": knob, "accuracy": acc, "relative_cost": cost, "meets_target": met, "target": 0.9,
        "calibration_met": cmet, "calibration_accuracy": acc, "calibration_relative_cost": ccost}
    pc = {**pt(0.8, 0.92, 0.4, True, True, 0.38), "kappa": 0.8, "target_spec": {"relative": 0.95},
          "delta": None}
    ev = {"n": 1, "methods": {"small": [{"accuracy": 0.5, "relative_cost": 0.1}],
                              "large": [{"accuracy": 0.95, "relative_cost": 1.0}],
                              # in hindsight on the test questions this one looks best: not used
                              "mean_logprob": [{"knob": -1.0, "accuracy": 0.99, "relative_cost": 0.2}]},
          "policy_calibrated": pc,
          "calibrated": {"policy": pc, "random": pt(0.7, 0.91, 0.96, True, True, 0.95),
                         "mean_logprob": pt(-0.6, 0.96, 0.73, True, True, 0.74),
                         "min_logprob": pt(-2.4, 0.94, 0.83, True, True, 0.85),
                         "mean_entropy": pt(0.5, 0.93, 0.74, True, True, 0.72),
                         "max_entropy": pt(2.3, 0.89, 0.72, False, False, 0.70)},
          "policy_vs_best_handcrafted": {"baseline": "mean_entropy", "relative_cost_difference": -0.34,
                                         "ci": [-0.4, -0.3]},
          "pool": {"small": {"model": "s"}, "large": {"model": "l"}}}
    return demo.headline(ev), ev


def test_headline_compares_calibrated_with_calibrated():
    h, _ = headline_example()
    assert h["best_handcrafted_calibrated"]["method"] == "mean_entropy"   # cheapest met on calibration
    assert h["best_handcrafted_calibrated"]["relative_cost"] == 0.74


def test_headline_prints_plurals_and_the_interval(capsys):
    h, ev = headline_example()
    demo.print_headline(h, ev)
    out = capsys.readouterr().out
    assert "headline on 1 test question (" in out
    assert "best calibrated handcrafted router: mean_entropy (tau 0.5)" in out
    assert "policy minus mean_entropy in relative cost: -0.340 (95% paired bootstrap [-0.400, -0.300])" in out


def test_default_out_is_not_the_committed_results():
    assert Path(demo.parse_args([]).out) != Path("results/demo")
    assert demo.parse_args(["--refresh-committed"]).out == "results/demo"
    assert demo.parse_args(["--out", "x"]).out == "x"
    with pytest.raises(demo.UsageError, match="does not go with --out"):
        demo.parse_args(["--refresh-committed", "--out", "elsewhere"])
