"""demo.py (the main job) on tiny committed tables of the tiny local pool: train, calibrate and
evaluate per target and seed in-process, the summary, determinism (a second output folder gets
the same eval.json and summary.json), --refresh-committed then the "reproduces" line, resuming,
and one-line errors. The tables are real rollout.py tables (three slices of tiny questions)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import demo
import rollout
from tinymodel import write_questions_jsonl

ROOT = Path(__file__).resolve().parents[1]
COUNTS = {"train": 10, "calib": 8, "test": 8}
RUN = ["--targets", "0.9", "--seeds", "2", "--no-route"]


@pytest.fixture(scope="module")
def tables(tiny_pool, tmp_path_factory):
    """A "committed" folder with train/calib/test tables built by rollout.py on disjoint questions."""
    d = tmp_path_factory.mktemp("demo")
    questions, copy = list(tiny_pool["questions"]), 0
    while len(questions) < sum(COUNTS.values()):
        copy += 1  # distinct texts: the stages refuse tables that share questions
        questions += [{**q, "question": f"Copy {copy}. {q['question']}"} for q in tiny_pool["questions"]]
    committed, start = d / "committed", 0
    for sl, n in COUNTS.items():
        data = write_questions_jsonl(d / f"{sl}-questions.jsonl", questions[start:start + n])
        start += n
        rollout.main(["--dataset", str(data), "--small", str(tiny_pool["small"]),
                      "--large", str(tiny_pool["large"]), "--out", str(committed / f"{sl}.jsonl"),
                      "--dtype", "float32", "--max-new-tokens", "96", "--batch-size", "4"])
    return d


@pytest.fixture(scope="module")
def run_a(tables):
    out = tables / "A"
    assert demo.main(["--tables", str(tables / "committed"), *RUN, "--out", str(out)]) == 0
    return out


def seed_dir(out, seed):
    return out / "target-0.90" / f"seed-{seed}"


def test_outputs_and_summary(run_a, capsys):
    out = run_a
    for seed in (0, 1):
        d = seed_dir(out, seed)
        for name in ("policy.pt", "calibration.json", "eval/eval.json", "eval/eval.md",
                     "eval/tradeoff.png", "train.log", "calibrate.log", "evaluate.log"):
            assert (d / name).is_file(), (seed, name)
    for name in ("summary.md", "summary.json", "demo.json", "policy.pt", "calibration.json"):
        assert (out / name).is_file(), name
    # the deployed policy is seed 0 of the first target (0.95 is not among --targets here)
    assert (out / "policy.pt").read_bytes() == (seed_dir(out, 0) / "policy.pt").read_bytes()

    s = json.loads((out / "summary.json").read_text())
    assert s["tables"] == COUNTS and s["seeds"] == 2 and s["deployed"] == "target-0.90/seed-0"
    t = s["targets"]["target-0.90"]
    assert set(t["calibrated"]) == set(demo.BASELINES)
    assert {"small", "large", "oracle", "policy_seed0", "policy_seeds", "policy_vs_best_handcrafted"} <= set(t)
    assert t["policy_seeds"]["of"] == 2 and 0 <= t["policy_seeds"]["meets_target"] <= 2
    ev = [json.loads((seed_dir(out, k) / "eval/eval.json").read_text()) for k in (0, 1)]
    assert t["policy_seed0"]["relative_cost"] == ev[0]["policy_calibrated"]["relative_cost"]
    assert t["policy_vs_best_handcrafted"]["seed0"] == ev[0]["policy_vs_best_handcrafted"]
    assert "ci" in t["policy_vs_best_handcrafted"]["seed0"]
    # seeds differ where they should: the policy; the baselines do not depend on the seed
    w = [torch.load(seed_dir(out, k) / "policy.pt", weights_only=True)["state_dict"] for k in (0, 1)]
    assert any(not torch.equal(w[0][k], w[1][k]) for k in w[0])
    assert ev[0]["calibrated"]["mean_logprob"] == ev[1]["calibrated"]["mean_logprob"]
    assert ev[0]["calibrated"]["random"] == ev[1]["calibrated"]["random"]
    md = (out / "summary.md").read_text()
    for name in demo.BASELINES:
        assert f"| {name} (calibrated) |" in md
    assert "Machine:" in md and "python train_policy.py" in md
    record = json.loads((out / "demo.json").read_text())["runs"][-1]
    assert {"train", "calibrate", "evaluate"} <= set(record["stages"]) and record["machine"]["python"]
    assert record["verdict"].startswith("no committed results")


def test_same_seed_same_results_elsewhere_then_refresh_and_reproduce(run_a, tables, capsys):
    committed = tables / "committed"
    b = tables / "B"
    assert demo.main(["--tables", str(committed), *RUN, "--out", str(b)]) == 0
    for seed in (0, 1):
        wa = torch.load(seed_dir(run_a, seed) / "policy.pt", weights_only=True)["state_dict"]
        wb = torch.load(seed_dir(b, seed) / "policy.pt", weights_only=True)["state_dict"]
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
        assert demo.normalized(seed_dir(run_a, seed) / "eval/eval.json", str(run_a)) == \
            demo.normalized(seed_dir(b, seed) / "eval/eval.json", str(b))
    assert (run_a / "summary.json").read_bytes() == (b / "summary.json").read_bytes()
    capsys.readouterr()

    assert demo.main(["--tables", str(committed), *RUN, "--refresh-committed"]) == 0
    assert (committed / "summary.json").is_file() and (seed_dir(committed, 1) / "eval/eval.json").is_file()
    assert "reproduces" not in capsys.readouterr().out  # nothing to compare a refresh with

    c = tables / "C"
    assert demo.main(["--tables", str(committed), *RUN, "--out", str(c)]) == 0
    printed = capsys.readouterr().out
    assert "reproduces the committed results exactly" in printed.splitlines()[-1]
    assert "headline on 8 test questions" in printed

    # a committed result that differs is named
    ev = seed_dir(committed, 1) / "eval/eval.json"
    ev.write_text(ev.read_text().replace('"n": 8', '"n": 9'))
    assert demo.main(["--tables", str(committed), *RUN, "--out", str(c)]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert "1 of 3 files differ: target-0.90/seed-1/eval/eval.json" in last


def test_second_run_resumes_without_redoing(run_a, tables, capsys):
    before = {p: p.stat().st_mtime_ns for p in run_a.rglob("*") if p.is_file() and p.name != "demo.json"
              and p.parent == seed_dir(run_a, 0)}
    assert demo.main(["--tables", str(tables / "committed"), *RUN, "--out", str(run_a)]) == 0
    after = {p: p.stat().st_mtime_ns for p in before}
    assert after == before
    record = json.loads((run_a / "demo.json").read_text())
    assert len(record["runs"]) == 2 and record["runs"][-1]["stages"] == {}


def run_demo(*args):
    return subprocess.run([sys.executable, "demo.py", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_errors_are_one_line(tables):
    empty = tables / "empty"
    empty.mkdir(exist_ok=True)
    shutil.copy(tables / "committed" / "train.jsonl", empty / "train.jsonl")
    for args, msg in [
        (["--tables", empty, "--no-route", "--out", tables / "E"], "no calib table in"),
        (["--seeds", 0], "--seeds must be at least 1"),
        (["--targets", 1.5], "--targets: each R must be in (0, 1]"),
        (["--route-question", 10], "--route-question must be in [900, 1000)"),
        (["--refresh-committed", "--out", "elsewhere"], "does not go with --out"),
        (["--small", "x"], "--small and --large go together"),
    ]:
        proc = run_demo(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.startswith("demo.py: error: ") and msg in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tables / "E").exists()


def test_defaults():
    a = demo.parse_args([])
    assert a.out == "runs/demo" and a.tables == "results/svamp" and a.targets == [0.90, 0.95, 0.98]
    assert a.seeds == 5 and a.delta is None and a.route_question == 900 and not a.build
    assert demo.parse_args(["--refresh-committed"]).out == "results/svamp"
    assert demo.regions(1000) == {"train": (0, 500), "calib": (500, 250), "test": (750, 150)}
    assert demo.tag(0.9) == "target-0.90" and demo.tag(0.95) == "target-0.95"


@pytest.fixture(scope="module")
def with_states(tables):
    """The committed tiny tables with their hidden states beside them (rollout.py --add-hidden)."""
    committed = tables / "committed"
    rollout.main(["--add-hidden", *(str(committed / f"{sl}.jsonl") for sl in COUNTS), "--dtype", "float32"])
    return committed


def test_a_variant_beside_the_method_reproduces(with_states, tables, capsys):
    """--train-args runs the hidden-state policy through the same stages; --results keeps its
    committed results beside the method's; a second run elsewhere reproduces them exactly."""
    variant = ["--tables", str(with_states), "--train-args", "--hidden-state --hidden", "--results", "hidden",
               "--targets", "0.9", "--seeds", "1", "--no-route"]
    assert demo.main([*variant, "--refresh-committed"]) == 0
    made = with_states / "hidden" / "target-0.90" / "seed-0"
    from train_policy import load_policy
    assert load_policy(made / "policy.pt").probe is not None
    assert "--hidden-state --hidden" in (with_states / "hidden" / "summary.md").read_text()
    capsys.readouterr()
    assert demo.main([*variant, "--out", str(tables / "V")]) == 0
    assert "reproduces the committed results exactly" in capsys.readouterr().out
    with pytest.raises(demo.UsageError, match="--test-table nope"):
        demo.main([*variant, "--test-table", "nope", "--out", str(tables / "W")])


def test_probe_curve(with_states, tables, tiny_table):
    """tools/probe_curve.py: per amount of probe data, the probe's AUCs and the calibrated policy
    through demo.py; the probe data joins the probe's fit (its rows are recorded in policy.pt)."""
    import probe
    sys.path.insert(0, str(ROOT / "tools"))
    import probe_curve
    data = tables / "probe-data.jsonl"
    recs = [{**{k: v for k, v in r.items() if k != "escalations"}, "id": f"p/{i}",
             "question": f"Probe {i}. {r['question']}"} for i, r in enumerate(tiny_table["records"])]
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    probe.hidden_for_table(data, None, probe.sidecar_path(data), "float32", probe.SIDECAR_LAYERS, small_only=True)
    out = tables / "curve.md"
    assert probe_curve.main(["--probe-data", str(data), "--sizes", "0", "5", "all", "--tables", str(with_states),
                             "--also", "--seeds", "1", "--targets", "0.9", "--work", str(tables / "curve"),
                             "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["probe_data_questions"] for r in rows] == [0, 5, len(recs)]
    for r in rows:
        assert 0.0 <= r["auc"]["test_step"] <= 1.0 and "test" in r["tables"]
    from train_policy import load_policy
    last = load_policy(tables / "curve" / f"n-{len(recs)}" / "test" / "target-0.90" / "seed-0" / "policy.pt")
    assert last.probe_info["probe_data_rows"] == sum(len(r["small"]["steps"]) for r in recs)
    assert "| N probe data |" in out.read_text()
    with pytest.raises(demo.UsageError, match="holds 8 questions"):
        probe_curve.main(["--probe-data", str(data), "--sizes", "50", "--tables", str(with_states), "--also",
                          "--work", str(tables / "curve2"), "--out", str(tables / "c2.md")])
