"""evaluate.py: every method scored exactly on a hand-built table (numbers worked out on
paper below), the oracle ceiling, the frontier metrics, the output files, and errors."""
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import calibrate as cb  # noqa: E402
import evaluate as ev  # noqa: E402
import report  # noqa: E402
import train_policy as tp  # noqa: E402
import table as tb  # noqa: E402
from cli import UsageError  # noqa: E402
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
    # calibration and test on the same questions: deliberate here (the numbers are by hand)
    assert ev.main(["--data", data, "--policy", str(d / "policy.pt"), "--calibration", str(d / "cal.json"),
                    "--calib-data", data, "--allow-overlap",
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
    # the cheapest kappa reaching 0.75 fires only on a's step 2 (p = sigmoid(5)): any kappa in
    # (0.5, sigmoid(5)], 0.5 being the next p below (d's step 1); the grid's is the midpoint
    assert cal["kappa"] == pytest.approx((0.5 + 1 / (1 + math.exp(-5))) / 2, abs=1e-7) and cal["met"]
    pc = res["policy_calibrated"]
    assert (pc["accuracy"], pc["relative_cost"]) == approx((0.75, 175 / 900))
    assert pc["target"] == 0.75 and pc["meets_target"] is True
    assert pc["escalation_step_counts"] == [0, 1, 0, 2]     # a at step 2; b, d never (c has no steps)
    # the intervals, brute force on the same 200 resamples: a at step 2 (120), b never (15), c
    # (0), d never (40); right: a, b, c; all-large costs 200, 300, 0, 400
    counts = ev.bootstrap_counts(4, 200, 0).tolist()
    acc = [sum(k * r for k, r in zip(row, [1, 1, 1, 0])) / 4 for row in counts]
    cost = [sum(k * c for k, c in zip(row, [120, 15, 0, 40])) / sum(k * c for k, c in zip(row, [200, 300, 0, 400]))
            for row in counts]
    assert pc["ci"]["accuracy"] == pytest.approx(percentiles(acc), abs=1e-12)
    assert pc["ci"]["relative_cost"] == pytest.approx(percentiles(cost), abs=1e-12)
    large = [sum(k * r for k, r in zip(row, [1, 1, 1, 0])) / 4 for row in counts]   # a, b, c right
    assert pc["meets_target_share"] == sum(x >= 1.0 * y - 1e-12 for x, y in zip(acc, large)) / 200
    assert has(res["methods"]["policy"], (0.75, 175 / 900))


def percentiles(xs, qs=(0.025, 0.975)):
    """Percentiles by linear interpolation between order statistics (what torch.quantile and
    numpy's default do), by hand."""
    s = sorted(xs)
    out = []
    for q in qs:
        pos = q * (len(s) - 1)
        f = math.floor(pos)
        c = min(f + 1, len(s) - 1)
        out.append(s[f] + (s[c] - s[f]) * (pos - f))
    return out


def test_bootstrap_against_brute_force():
    """Resampled accuracy and relative cost, their 95% intervals, and the paired interval of a
    cost difference between two DIFFERENT routes, against loops over the resampled questions
    (each question repeated as often as the resample drew it)."""
    tab = tp.build_table(make_records(30, 71), tb.Pricing(0.0, 1e-6, 0.0, 1e-5, unit="dollars"))
    counts = ev.bootstrap_counts(tab.Q, 300, 5)
    assert (counts.sum(1) == tab.Q).all() and counts.mean().item() == 1.0
    assert 0.9 < (counts > 0).double().mean().item() / (1 - (1 - 1 / tab.Q) ** tab.Q) < 1.1
    never = tb.route_outcomes(tab, torch.full((1, tab.Q), tab.T))
    first = tb.route_outcomes(tab, torch.zeros(1, tab.Q, dtype=torch.long))
    acc_b, cost_b = ev.boot_scores(counts, tab, {k: torch.cat([never[k], first[k]]) for k in never})
    large = tab.large_cost.tolist()
    rows = counts.tolist()
    for j, out in enumerate((never, first)):
        correct, cost = out["correct"][0].tolist(), out["cost"][0].tolist()
        acc = [sum(k * c for k, c in zip(row, correct)) / tab.Q for row in rows]
        rel = [sum(k * c for k, c in zip(row, cost)) / sum(k * c for k, c in zip(row, large)) for row in rows]
        assert acc_b[:, j].tolist() == pytest.approx(acc, abs=1e-12)
        assert cost_b[:, j].tolist() == pytest.approx(rel, rel=1e-12)
        assert ev.interval(acc_b[:, j]) == pytest.approx(percentiles(acc), abs=1e-12)
        assert ev.interval(cost_b[:, j]) == pytest.approx(percentiles(rel), rel=1e-12)
    # the paired interval of "never" minus "always at step 1": one resample, both routes
    a, b = never["cost"][0].tolist(), first["cost"][0].tolist()
    diff = [sum(k * (x - y) for k, x, y in zip(row, a, b)) / sum(k * c for k, c in zip(row, large)) for row in rows]
    lo, hi = ev.paired_cost_interval(counts, tab, never["cost"][0], first["cost"][0])
    assert [lo, hi] == pytest.approx(percentiles(diff), rel=1e-12) and lo < hi < 0
    # where every question is the same, every resample is the same: intervals of width 0
    same = tp.build_table([{**make_records(1, 72)[0], "id": f"s/{i}", "question": f"same {i}?"} for i in range(12)],
                          tab.pricing)
    c12 = ev.bootstrap_counts(12, 100, 0)
    out = tb.route_outcomes(same, torch.zeros(1, 12, dtype=torch.long))
    acc_s, cost_s = ev.boot_scores(c12, same, out)
    for samples, value in ((acc_s[:, 0], out["correct"].mean()), (cost_s[:, 0], same.relative_cost(out["cost"][0]))):
        lo, hi = ev.interval(samples)
        assert lo == pytest.approx(value.item(), abs=1e-12) and hi == pytest.approx(value.item(), abs=1e-12)
    never_s = tb.route_outcomes(same, torch.full((1, 12), same.T))
    assert ev.paired_cost_interval(c12, same, out["cost"][0], never_s["cost"][0]) == \
        pytest.approx([same.relative_cost(out["cost"][0] - never_s["cost"][0]).item()] * 2, abs=1e-12)


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
             str(tmp_path / "cal.json"), "--out", str(tmp_path / "e"), "--bootstrap", "0", "--allow-overlap",
             *DOLLARS])
    pc = json.loads((tmp_path / "e" / "eval.json").read_text())["policy_calibrated"]
    assert pc["target"] == 0.8 and pc["meets_target"] is False and "ci" not in pc


def test_calibrated_baselines_by_hand(hand_eval):
    """Every baseline calibrated on the (hand) calibration table with the policy's rule and
    target (relative 1.0: accuracy >= 0.75), measured on the test questions (the same table)."""
    _, res = hand_eval
    cal = res["calibrated"]
    assert set(cal) == {"policy", "random", "mean_logprob", "min_logprob", "mean_entropy", "max_entropy"}
    assert cal["policy"] == res["policy_calibrated"]
    for pt in cal.values():
        assert {"knob", "accuracy", "relative_cost", "target", "meets_target"} <= set(pt)
    # mean_logprob: tau in [-1, -0.5) reaches 0.75 cheapest (a escalates at step 2 only);
    # the calibrated threshold is the midpoint tau = -0.75, on no step's value
    assert cal["mean_logprob"]["knob"] == -0.75
    assert point(cal["mean_logprob"]) == approx((0.75, 175 / 900)) and cal["mean_logprob"]["meets_target"]
    # min_logprob and the entropies are constant: only "always at step 1" reaches 0.75, at a
    # cost above the large model alone's (it pays for a draft): the answer is the large model alone
    assert ALWAYS[1] > 1.0
    for name in ("min_logprob", "mean_entropy", "max_entropy"):
        assert point(cal[name]) == approx(LARGE) and cal[name]["knob"] is None, name
        assert cal[name]["calibration_met"] and cal[name]["meets_target"]
    # random: the cheapest p of the sweep whose exact expected accuracy reaches 0.75, or the
    # large model alone where that p costs more
    ok = [p for p in res["methods"]["random"] if p["accuracy"] >= 0.75 - 1e-12]
    cheapest = min(ok, key=lambda p: p["relative_cost"])
    if cheapest["relative_cost"] > 1.0:
        assert cal["random"]["knob"] is None and point(cal["random"]) == approx(LARGE)
    else:
        assert cal["random"]["knob"] == cheapest["knob"] and point(cal["random"]) == approx(point(cheapest))
    # the paired comparison: the best calibrated handcrafted router is mean_logprob (met, cheapest)
    cmp_ = res["policy_vs_best_handcrafted"]
    assert cmp_["baseline"] == "mean_logprob"
    assert cmp_["relative_cost_difference"] == pytest.approx(0.0, abs=1e-12)   # the same routes here
    assert cmp_["ci"] == pytest.approx([0.0, 0.0], abs=1e-12)
    md = (hand_eval[0] / "eval" / "eval.md").read_text()
    assert md.index("| calibrated router |") < md.index("chosen in hindsight on the test questions")
    assert "| mean_logprob | -0.75 | 0.750" in md


def test_calibrated_knobs_in_eval_json_reproduce_their_calibration(tmp_path):
    """Every knob eval.json's `calibrated` records (policy, random, the handcrafted routers, in
    the statistic's own units), applied again to the calibration table, gives exactly the
    calibration accuracy and cost recorded beside it; a threshold also after rounding to
    float32, since none sits on a value of its statistic."""
    calib_recs, test_recs = make_records(300, 61, id_prefix="c"), make_records(200, 62, id_prefix="t")
    calib_path, test_path = write_jsonl(tmp_path / "calib.jsonl", calib_recs), write_jsonl(tmp_path / "test.jsonl", test_recs)
    dollars = SimpleNamespace(prompt_cost=0.0, price_small=DOLLARS[1:3], price_large=DOLLARS[4:6], price_prm=None)
    calib = tp.load_table(calib_path, dollars)          # costs whose sums depend on the order
    policy, _ = tp.train(tp.build_table(make_records(300, 63, id_prefix="tr"), calib.pricing), 0.9, iters=30)
    tp.save_policy(tmp_path / "p.pt", policy, {})
    assert cb.main(["--policy", str(tmp_path / "p.pt"), "--data", calib_path, "--target-relative", "0.9",
                    "--out", str(tmp_path / "cal.json"), *DOLLARS]) == 0
    assert ev.main(["--data", test_path, "--policy", str(tmp_path / "p.pt"), "--calibration",
                    str(tmp_path / "cal.json"), "--calib-data", calib_path, "--out", str(tmp_path / "e"),
                    "--bootstrap", "0", *DOLLARS]) == 0
    calibrated = json.loads((tmp_path / "e" / "eval.json").read_text())["calibrated"]
    thresholds = 0
    for name, pt in calibrated.items():
        if pt["knob"] is None:
            continue
        sign = ev.HANDCRAFTED[name][1] if name in ev.HANDCRAFTED else 1
        knobs = [pt["knob"]] + ([] if name == "random" else [torch.tensor(pt["knob"], dtype=torch.float32).item()])
        for knob in knobs:
            got = ev.aggregate(calib, ev.apply_knob(calib, name, sign * knob, policy))
            assert (got["accuracy"].item(), got["relative_cost"].item()) == \
                (pt["calibration_accuracy"], pt["calibration_relative_cost"]), (name, knob)
        if name != "random":
            thresholds += 1
            values = (sign * ev.method_scores(calib, name, policy))[calib.mask]
            assert not (values == sign * pt["knob"]).any(), name
    assert thresholds >= 3


def test_calibrated_on_other_questions_judged_on_the_test_large_model(hand_eval, tmp_path):
    d, _ = hand_eval
    recs = hand_records()
    for r in recs:
        r["question"] = "test " + r["question"]
    recs[1]["escalations"][0]["correct"] = False      # b: large alone now wrong: large acc 0.5
    data = write_jsonl(tmp_path / "test.jsonl", recs)
    assert ev.main(["--data", data, "--policy", str(d / "policy.pt"), "--calibration", str(d / "cal.json"),
                    "--calib-data", str(d / "hand.jsonl"), "--out", str(tmp_path / "e"),
                    "--bootstrap", "0", *DOLLARS]) == 0
    res = json.loads((tmp_path / "e" / "eval.json").read_text())
    cal = res["calibrated"]
    assert all(pt["target"] == pytest.approx(0.5) for pt in cal.values())   # 1.0 x test large accuracy
    # mean_logprob at tau -1.0 on the test table: a at step 2, b/d never: 0.75 >= 0.5
    assert point(cal["mean_logprob"]) == approx((0.75, 175 / (900 - 300 + 300)))
    assert cal["mean_logprob"]["meets_target"] is True
    assert "ci" not in res["policy_vs_best_handcrafted"]


def test_no_kappa_is_the_large_model_alone(hand_eval, tmp_path):
    d, _ = hand_eval
    data = str(d / "hand.jsonl")
    assert cb.main(["--policy", str(d / "policy.pt"), "--data", data, "--target-accuracy", "1.0",
                    "--out", str(tmp_path / "cal.json"), *DOLLARS]) == 0
    cal = json.loads((tmp_path / "cal.json").read_text())
    assert cal["kappa"] is None and cal["fallback"] == "large"
    assert ev.main(["--data", data, "--policy", str(d / "policy.pt"), "--calibration", str(tmp_path / "cal.json"),
                    "--calib-data", data, "--allow-overlap", "--out", str(tmp_path / "e"),
                    "--bootstrap", "50", *DOLLARS]) == 0
    res = json.loads((tmp_path / "e" / "eval.json").read_text())
    pc = res["policy_calibrated"]
    # the large model alone: all-large cost (1.0), no draft paid for (escalating at step 1 costs 935/900)
    assert pc["knob"] is None and pc["kappa"] is None and point(pc) == approx(LARGE)
    assert pc["large_share"] == 1.0 and pc["meets_target"] is False    # target 1.0, large gets 0.75
    assert pc["escalation_step_counts"] == [0, 0, 0, 0, 3]            # a, b, d: large alone
    assert all(pt["knob"] is None and point(pt) == approx(LARGE) for pt in res["calibrated"].values())
    md = (tmp_path / "e" / "eval.md").read_text()
    assert "| policy | large alone | 0.750" in md


def test_dollar_prices_as_in_out_pairs(hand_eval, tmp_path):
    """--price-small/--price-large IN,OUT (dollars per million tokens) price exactly like IN OUT,
    and the recorded per-token prices are the given ones / 1e6."""
    d, res = hand_eval
    assert ev.main(["--data", str(d / "hand.jsonl"), "--out", str(tmp_path / "e"), "--bootstrap", "0",
                    "--price-small", "0,1", "--price-large", "0,10"]) == 0
    again = json.loads((tmp_path / "e" / "eval.json").read_text())
    for name in ("small", "large", "random", "mean_logprob", "oracle"):
        assert [point(p) for p in again["methods"][name]] == [approx(point(p)) for p in res["methods"][name]]
    assert again["pricing"] == {"small_in": 0.0, "small_out": pytest.approx(1e-6), "large_in": 0.0,
                                "large_out": pytest.approx(1e-5), "unit": "dollars"}


def test_frontier_keeps_only_undominated_points():
    pts = [{"relative_cost": c, "accuracy": a} for c, a in
           [(0.5, 0.7), (0.2, 0.6), (0.5, 0.6), (0.9, 0.65), (0.3, 0.8), (1.0, 0.8), (0.1, 0.5)]]
    front = [(p["relative_cost"], p["accuracy"]) for p in report.frontier(pts)]
    assert front == [(0.1, 0.5), (0.2, 0.6), (0.3, 0.8)]


def test_best_handcrafted_is_chosen_on_calibration():
    c = lambda met, acc, cost, test_cost: {"calibration_met": met, "calibration_accuracy": acc,  # noqa: E731
                                           "calibration_relative_cost": cost, "relative_cost": test_cost}
    cal = {"mean_logprob": c(True, 0.9, 0.6, 0.1), "min_logprob": c(True, 0.9, 0.5, 0.9),
           "mean_entropy": c(False, 0.95, 0.2, 0.1), "max_entropy": c(False, 0.7, 0.1, 0.1)}
    assert ev.best_handcrafted(cal) == "min_logprob"
    for v in cal.values():
        v["calibration_met"] = False
    assert ev.best_handcrafted(cal) == "mean_entropy"


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
    table = tp.build_table(recs, tb.Pricing(0.0, 2e9, 0.0, 14e9))
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


def test_a_table_whose_large_model_gets_nothing_right_warns(tmp_path, capsys):
    recs = hand_records()
    for r in recs:
        for e in r["escalations"]:
            e["correct"] = False
    recs[2]["small"]["correct"] = False                 # c (no steps): the large model's outcome is the small one
    data = write_jsonl(tmp_path / "wrong.jsonl", recs)
    assert ev.main(["--data", data, "--out", str(tmp_path / "e"), "--bootstrap", "0", *DOLLARS]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: {data}: the large model gets none of the 4 questions right")


def test_bad_inputs_exit_2_with_one_line(hand_eval, tmp_path):
    d, _ = hand_eval
    other = tp.Policy(["step"], hidden=[4])
    tp.save_policy(tmp_path / "other.pt", other, {})
    data = str(d / "hand.jsonl")
    in_process = [
        (["--data", data, "--calibration", str(d / "cal.json")], "--calibration needs --policy"),
        (["--data", data, "--calib-data", data], "--calib-data needs --calibration"),
        (["--data", data, "--policy", str(d / "policy.pt"), "--calibration", str(d / "cal.json")],
         r"hand.jsonl shares 4 questions with .*cal.json \(its calibration questions\)"),
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
        (["--data", str(d / "policy.pt")], f"{d / 'policy.pt'}: a zip archive (a policy file from train_policy.py?)"),
        (["--data", data, "--policy", str(d / "policy.pt"), "--calibration", str(d / "cal.json"),
          "--calib-data", str(tmp_path / "plain.jsonl.gz"), "--allow-overlap"],
         f"{tmp_path / 'plain.jsonl.gz'}: named .gz but not gzip-compressed"),
    ]
    (tmp_path / "plain.jsonl.gz").write_text((d / "hand.jsonl").read_text())
    runs = run_parallel([["evaluate.py", *argv, "--out", str(tmp_path / "e"), *DOLLARS] for argv, _ in cases],
                        cwd=ROOT)
    for res, (_, message) in zip(runs, cases):
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1, res.stderr
        assert lines[0].startswith("evaluate.py: error: ") and message in lines[0], lines[0]


def test_recalibrated_interval_against_a_loop():
    """evaluate.recalibrated_interval: each resample's difference is the one a loop gets by
    drawing the calibration questions, calibrating the policy and every handcrafted router on
    the draw (calibrate.calibrate_scores), choosing the best router on the draw, and drawing
    the test questions."""
    import calibrate
    import evaluate as ev
    import train_policy as tp
    from synthetic import make_records
    from types import SimpleNamespace
    import table as tb
    flops = SimpleNamespace(prompt_cost=0.0, price_small=None, price_large=None)
    mk = lambda recs: tp.build_table(recs, tb.pricing_from_args(flops, recs))   # noqa: E731
    train, calib, test = mk(make_records(40, seed=1)), mk(make_records(30, seed=2)), mk(make_records(25, seed=3))
    policy, _ = tp.train(train, 0.6, iters=20)
    spec, n = {"relative": 0.9}, 12
    got = ev.recalibrated_interval(calib, test, spec, None, policy, n, seed=5)
    cal_counts, test_counts = ev.bootstrap_counts(calib.Q, n, 6), ev.bootstrap_counts(test.Q, n, 7)
    diffs, fallback = [], 0
    for b in range(n):
        idx = [q for q in range(calib.Q) for _ in range(int(cal_counts[b, q]))]
        sub = tb.select(calib, idx)
        knobs, points = {}, {}
        for name in ["policy", *ev.HANDCRAFTED]:
            r = calibrate.calibrate_scores(sub, ev.method_scores(sub, name, policy), spec, None)
            knobs[name] = r["knob"]
            points[name] = {"calibration_met": r["met"], "calibration_accuracy": r["accuracy"],
                            "calibration_relative_cost": r["relative_cost"]}
        best = ev.best_handcrafted({k: v for k, v in points.items() if k != "policy"})
        fallback += knobs["policy"] is None
        cost = {k: ev.apply_knob(test, k, knobs[k], policy)["cost"][0] for k in ("policy", best)}
        w = test_counts[b]
        diffs.append(float((w @ cost["policy"] - w @ cost[best]) / (w @ test.large_cost)))
    want = ev.interval(torch.tensor(diffs, dtype=torch.float64))
    assert got["ci"] == pytest.approx(want, abs=1e-12) and got["resamples"] == n
    assert got["policy_large_alone_share"] == fallback / n
    assert got["ci"][0] < got["ci"][1]   # the draws differ: an interval, not a point


def test_drop_shared_stories(tmp_path, capsys):
    """--drop-shared-stories TABLE scores only the test questions whose story no question of
    TABLE shares (numbers masked): here the two whose story is a training question's."""
    import evaluate as ev
    from synthetic import make_records, write_jsonl
    train = make_records(6, seed=1)
    test = make_records(8, seed=2, id_prefix="test")
    for r in train:
        r["question"] = "Ann has 3 apples and 2 pears. How many fruits?"
    test[1]["question"] = "Ann has 7 apples and 9 pears. How many pears?"        # the same story
    test[4]["question"] = "Ann has 30 apples and 1 pears. What is the total?"     # the same story
    test[5]["question"] = "Bob has 3 apples and 2 pears. How many fruits?"        # another story
    tr, te = write_jsonl(tmp_path / "train.jsonl", train), write_jsonl(tmp_path / "test.jsonl", test)
    ev.main(["--data", te, "--out", str(tmp_path / "all"), "--bootstrap", "0"])
    ev.main(["--data", te, "--out", str(tmp_path / "kept"), "--bootstrap", "0", "--drop-shared-stories", tr])
    assert "2 of 8 questions" in capsys.readouterr().err
    kept = json.loads((tmp_path / "kept" / "eval.json").read_text())
    assert kept["n"] == 6 and kept["drop_shared_stories"] == tr
    assert "drop_shared_stories" not in json.loads((tmp_path / "all" / "eval.json").read_text())
    small = [r for i, r in enumerate(test) if i not in (1, 4)]
    assert kept["small_accuracy"] == pytest.approx(sum(r["small"]["correct"] for r in small) / 6)
