"""evaluate.py: every method scored exactly on a hand-built table (numbers worked out on
paper below), the oracle ceiling, the frontier metrics, the output files, and errors."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import calibrate as cb  # noqa: E402
import evaluate as ev  # noqa: E402
import train_policy as tp  # noqa: E402
from rollout import UsageError  # noqa: E402
from synthetic import make_records, record, run_parallel, step, write_jsonl  # noqa: E402

torch.set_num_threads(1)
DOLLARS = ["--price-small", "0", "1", "--price-large", "0", "10"]   # cost = small tok + 10 * large tok

# The hand-built table. mean_logprob of each step in brackets.
#  a: steps 10 [-0.1], 10 [-1.0]; small wrong. Large after 0 steps: 20 tok right; after 1: 10 tok right.
#  b: steps 5, 5, 5 [-0.2 each]; small right. Large after 0: 30 right; after 1: 20 right; after 2: 10 wrong.
#  c: no small steps; small right (and so is "large" there, at the small cost 0).
#  d: steps 20 [-0.5], 20 [-0.05]; small cut off (finished false, answer null): wrong.
#     Large after 0: 40 tok, cut off, answer null: wrong; after 1: 30 tok right.
# Outcome (cost, correct) per question: escalate at step t (0-based key), never, large alone.
OUT = {"a": {0: (10 + 200, 1), 1: (20 + 100, 1), "never": (20, 0), "large": (200, 1)},
       "b": {0: (5 + 300, 1), 1: (10 + 200, 1), 2: (15 + 100, 0), "never": (15, 1), "large": (300, 1)},
       "c": {"never": (0, 1), "large": (0, 1)},
       "d": {0: (20 + 400, 0), 1: (40 + 300, 1), "never": (40, 0), "large": (400, 0)}}
MLP = {"a": [-0.1, -1.0], "b": [-0.2, -0.2, -0.2], "c": [], "d": [-0.5, -0.05]}
LARGE_SUM = 900.0                # 200 + 300 + 0 + 400
SMALL = (0.5, 75 / 900)          # a wrong, b right, c right, d wrong; 20 + 15 + 0 + 40
LARGE = (0.75, 1.0)
ALWAYS = (0.75, 935 / 900)       # escalate at step 1: 210 + 305 + 0 + 420
ORACLE = (1.0, 475 / 900)        # a at step 2 (120), b never (15), c (0), d at step 2 (340)


def hand_records():
    a = record("a", [step(10, -0.1), step(10, -1.0)], [(20, True), (10, True)], small_correct=False)
    b = record("b", [step(5, -0.2)] * 3, [(30, True), (20, True), (10, False)], small_correct=True)
    c = record("c", [], [], small_correct=True)
    d = record("d", [step(20, -0.5), step(20, -0.05)], [(40, False), (30, True)], small_correct=False,
               finished=False)
    d["escalations"][0].update(answer=None, finished=False)
    return [a, b, c, d]


def by_hand(route):
    """route: question -> outcome key. Returns (accuracy, relative cost) from OUT."""
    cost = sum(OUT[q][route[q]][0] for q in OUT)
    return sum(OUT[q][route[q]][1] for q in OUT) / 4, cost / LARGE_SUM


def first_below(tau):
    f32 = lambda v: torch.tensor(v, dtype=torch.float32).item()      # the table stores float32
    return {q: next((t for t, v in enumerate(MLP[q]) if f32(v) <= tau), "never") for q in OUT}


def point(p):
    return (p["accuracy"], p["relative_cost"])


def approx(pair):
    return pytest.approx(pair, abs=1e-12)


def has(points, pair):
    return any(point(p) == approx(pair) for p in points)


@pytest.fixture(scope="module")
def hand_eval(tmp_path_factory):
    """A hand-set policy p = sigmoid(-10 * mean_logprob - 5), calibrated and evaluated on the
    hand-built table."""
    d = tmp_path_factory.mktemp("hand")
    data = write_jsonl(d / "hand.jsonl", hand_records())
    policy = tp.Policy(["draft_mean_logprob"], hidden=[])
    with torch.no_grad():
        policy.net[0].weight.fill_(-10.0)
        policy.net[0].bias.fill_(-5.0)
    tp.save_policy(d / "policy.pt", policy, {"note": "hand-set"})
    assert cb.main(["--policy", str(d / "policy.pt"), "--data", data, "--target-relative", "1.0",
                    "--out", str(d / "cal.json"), *DOLLARS]) == 0
    assert ev.main(["--data", data, "--policy", str(d / "policy.pt"), "--calibration", str(d / "cal.json"),
                    "--out", str(d / "eval"), "--bootstrap", "200", *DOLLARS]) == 0
    return d, json.loads((d / "eval" / "eval.json").read_text())


def test_baselines_and_oracle_exact(hand_eval):
    _, res = hand_eval
    m = res["methods"]
    assert res["large_accuracy"] == 0.75 and res["small_relative_cost"] == pytest.approx(75 / 900)
    assert [point(p) for p in m["small"]] == [approx(SMALL)] and m["small"][0]["large_share"] == 0.0
    assert [point(p) for p in m["large"]] == [approx(LARGE)] and m["large"][0]["large_share"] == 1.0
    assert [point(p) for p in m["oracle"]] == [approx(ORACLE)]
    assert m["oracle"][0]["large_share"] == pytest.approx(40 / (40 + 75))  # large 10 + 30; small 20+15+40
    assert by_hand({"a": 1, "b": "never", "c": "never", "d": 1}) == approx(ORACLE)


def test_random_is_the_exact_expectation(hand_eval):
    _, res = hand_eval
    pts = {p["knob"]: point(p) for p in res["methods"]["random"]}
    assert pts[0.0] == approx(SMALL) and pts[1.0] == approx(ALWAYS)
    # p = 1/2: P(step 1) = 1/2, P(step 2) = 1/4, P(step 3) = 1/8, P(never) = rest
    a = 0.5 * 210 + 0.25 * 120 + 0.25 * 20                      # 140, right w.p. 3/4
    b = 0.5 * 305 + 0.25 * 210 + 0.125 * 115 + 0.125 * 15       # 221.25, right w.p. 7/8
    d = 0.5 * 420 + 0.25 * 340 + 0.25 * 40                      # 305, right w.p. 1/4
    assert pts[0.5] == approx(((0.75 + 0.875 + 1 + 0.25) / 4, (a + b + 0 + d) / LARGE_SUM))


def test_handcrafted_routers_exact(hand_eval):
    _, res = hand_eval
    m = res["methods"]
    for p in m["mean_logprob"]:          # escalate at the first step with mean_logprob <= tau
        assert point(p) == approx(by_hand(first_below(p["knob"]))), p
    assert has(m["mean_logprob"], (0.75, 175 / 900))     # tau in [-1, -0.5): a at step 2 only
    assert has(m["mean_logprob"], SMALL) and has(m["mean_logprob"], ALWAYS)
    # every step has max_entropy 2.0: only "always at step 1" and "never" exist
    assert sorted(point(p) for p in m["max_entropy"]) == [approx(SMALL), approx(ALWAYS)]
    s = res["summary"]["mean_logprob"]
    assert s["cost_at_100"] == pytest.approx(175 / 900) and s["cost_at_90"] == pytest.approx(175 / 900)
    assert res["summary"]["small"]["cost_at_90"] is None
    assert res["summary"]["small"]["frontier_area"] == pytest.approx(0.5)
    assert res["summary"]["large"]["frontier_area"] == 0.0


def test_calibrated_point_exact(hand_eval):
    d, res = hand_eval
    cal = json.loads((d / "cal.json").read_text())
    # the cheapest kappa reaching 0.75 fires only on a's step 2 (p = sigmoid(5))
    assert cal["kappa"] == pytest.approx(1 / (1 + math.exp(-5)), abs=1e-7) and cal["met"]
    pc = res["policy_calibrated"]
    assert (pc["accuracy"], pc["relative_cost"]) == approx((0.75, 175 / 900))
    assert pc["target"] == 0.75 and pc["meets_target"] is True
    assert pc["escalation_step_counts"] == [0, 1, 0, 2]     # a at step 2; b, d never (c has no steps)
    lo, hi = pc["ci"]["accuracy"]
    assert lo <= pc["accuracy"] <= hi and 0 <= pc["meets_target_share"] <= 1
    assert has(res["methods"]["policy"], (0.75, 175 / 900))


def test_eval_json_format_and_files(hand_eval):
    d, res = hand_eval
    assert set(res["methods"]) == {"small", "large", "random", "mean_logprob", "min_logprob",
                                   "mean_entropy", "max_entropy", "oracle", "policy"}
    for name, points in res["methods"].items():
        assert all({"knob", "accuracy", "relative_cost"} <= set(p) for p in points)
        assert (len(points) == 1) == (name in ("small", "large", "oracle"))
    assert {"kappa", "accuracy", "relative_cost", "target", "meets_target"} <= set(res["policy_calibrated"])
    md = (d / "eval" / "eval.md").read_text()
    assert "| oracle | 1 | 1.000 |" in md and "synthetic/large-7B" in md and "evaluate.py --data" in md
    for png in ("tradeoff.png", "escalation_steps.png"):
        assert (d / "eval" / png).read_bytes()[:4] == b"\x89PNG"


def test_stricter_target_not_met(hand_eval, tmp_path):
    d, _ = hand_eval
    cal = json.loads((d / "cal.json").read_text())
    cal["target_spec"] = {"accuracy": 0.8}
    (tmp_path / "cal.json").write_text(json.dumps(cal))
    ev.main(["--data", str(d / "hand.jsonl"), "--policy", str(d / "policy.pt"), "--calibration",
             str(tmp_path / "cal.json"), "--out", str(tmp_path / "e"), "--bootstrap", "0", *DOLLARS])
    pc = json.loads((tmp_path / "e" / "eval.json").read_text())["policy_calibrated"]
    assert pc["target"] == 0.8 and pc["meets_target"] is False and "ci" not in pc


def test_frontier_area():
    assert ev.frontier_area([0.0, 0.5], [0.5, 0.8], 0.0) == pytest.approx(0.5 * 0.5 + 0.8 * 0.5)
    assert ev.frontier_area([0.2], [0.6], 0.2) == pytest.approx(0.6)
    assert ev.frontier_area([0.2, 0.6], [0.6, 0.5], 0.2) == pytest.approx(0.6)   # dominated point ignored
    assert ev.frontier_area([0.5], [0.9], 0.0) == pytest.approx(0.45)            # 0 below its cheapest point
    assert ev.frontier_area([0.2, 1.3], [0.6, 1.0], 0.2) == pytest.approx(0.6)   # beyond cost 1: outside
    base = ([0.1, 0.4, 0.7, 1.0], [0.5, 0.6, 0.7, 0.8])
    area = ev.frontier_area(*base, 0.1)
    assert ev.frontier_area(base[0], [a + 0.05 for a in base[1]], 0.1) > area        # better everywhere
    assert ev.frontier_area(base[0] + [0.3], base[1] + [0.75], 0.1) > area           # a new dominating point
    assert ev.frontier_area([c - 0.05 for c in base[0]], base[1], 0.1) > area        # cheaper everywhere
    assert ev.frontier_area([1.0], [1.0], 1.0) is None


def test_oracle_never_beaten_on_synthetic(tmp_path):
    recs = make_records(600, 21)
    recs[0]["small"]["steps"], recs[0]["escalations"] = [], []       # a question with no steps
    data = write_jsonl(tmp_path / "t.jsonl", recs)
    table = tp.build_table(recs, tp.Pricing(0.0, 2e9, 0.0, 14e9))
    policy, _ = tp.train(table, 0.9, iters=40)
    tp.save_policy(tmp_path / "p.pt", policy, {})
    assert ev.main(["--data", data, "--policy", str(tmp_path / "p.pt"), "--out", str(tmp_path / "e"),
                    "--bootstrap", "50"]) == 0
    res = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert "policy_calibrated" not in res and not (tmp_path / "e" / "escalation_steps.png").exists()
    oracle_acc, oracle_cost = point(res["methods"]["oracle"][0])
    for name, points in res["methods"].items():
        for p in points:
            assert p["accuracy"] <= oracle_acc + 1e-12, (name, p)
            if p["accuracy"] >= oracle_acc - 1e-12:
                assert p["relative_cost"] >= oracle_cost - 1e-12, (name, p)
    for name in ("random", "mean_logprob", "policy"):     # each sweep contains the small model
        assert has(res["methods"][name], point(res["methods"]["small"][0]))


def test_bad_inputs_exit_2_with_one_line(hand_eval, tmp_path):
    d, _ = hand_eval
    other = tp.Policy(["step"], hidden=[4])
    tp.save_policy(tmp_path / "other.pt", other, {})
    data = str(d / "hand.jsonl")
    in_process = [
        (["--data", data, "--calibration", str(d / "cal.json")], "--calibration needs --policy"),
        (["--data", data, "--bootstrap", "-1"], r"--bootstrap must be in \[0, 1000000\], got -1"),
        (["--data", data, "--policy", str(tmp_path / "other.pt"), "--calibration", str(tmp_path / "nope.json")],
         "nope.json: no such calibration file"),
    ]
    for argv, message in in_process:
        with pytest.raises(UsageError, match=message):
            ev.main([*argv, "--out", str(tmp_path / "e"), *DOLLARS])
    cases = [   # through the CLI: exit code 2 and one line on stderr
        (["--data", data, "--policy", str(tmp_path / "other.pt"), "--calibration", str(d / "cal.json")],
         f"{d / 'cal.json'} was made for policy"),
        (["--data", str(tmp_path / "missing.jsonl")], f"{tmp_path / 'missing.jsonl'}: no such file"),
    ]
    runs = run_parallel([["evaluate.py", *argv, "--out", str(tmp_path / "e"), *DOLLARS] for argv, _ in cases],
                        cwd=ROOT)
    for res, (_, message) in zip(runs, cases):
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1, res.stderr
        assert lines[0].startswith("evaluate.py: error: ") and message in lines[0], lines[0]
