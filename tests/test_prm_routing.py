"""The PRM gate (issue 16) on the same table as every other router: the `prm` router's exact
accuracy and cost (the PRM's reading included, DESIGN section 2) on a hand-computed table,
its calibration, `policy+prm`, rollout.py --prm / --rescore on the tiny pool, and bad input."""
import copy
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
import table as tb  # noqa: E402
import train_policy as tp  # noqa: E402
from cli import UsageError  # noqa: E402
from synthetic import run_parallel, write_jsonl  # noqa: E402
from test_evaluate import DOLLARS, LARGE_SUM, approx, has, hand_records, point  # noqa: E402

torch.set_num_threads(1)

# PRM keys on the hand table of test_evaluate.py (a, b, c, d): every question's PRM part
# before the first step is 10 tokens; each step's PRM tokens equal its small tokens.
#   a: scores 0.9, 0.3   PRM tokens read up to step 1, 2: 20, 30
#   b: scores 0.8, 0.7, 0.6                              15, 20, 25
#   c: no steps (the PRM is never consulted)
#   d: scores 0.5, 0.95                                  30, 50
SCORES = {"a": [0.9, 0.3], "b": [0.8, 0.7, 0.6], "c": [], "d": [0.5, 0.95]}
PRM_PARAMS = 500_000_000
PRICE_PRM = ["--price-prm", "2"]     # with DOLLARS: a PRM token costs 2 small generated tokens
# Dollar costs (test_evaluate.OUT, in small-token units) plus 2 * PRM tokens read:
#   tau <= 0.3 (never):        a 20+60 wrong, b 15+50 right, c 0 right, d 40+100 wrong -> 0.5, 285
#   tau = 0.5 (strict: d's 0.5 is kept): a at step 2 120+60 right, b never 65, c, d never 140
#                                                                              -> 0.75, 385
#   tau = 0.7 (RSD; b's 0.7 kept): a step 2 180 right, b step 3 115+50 wrong, c, d step 1
#                                  420+60 wrong                                -> 0.5, 825
#   tau > 0.95 (always step 1): a 210+40, b 305+30, c 0, d 420+60 -> 0.75, 1065
NEVER, CHEAP, RSD, ALWAYS = (0.5, 285 / 900), (0.75, 385 / 900), (0.5, 825 / 900), (0.75, 1065 / 900)


def with_prm(records, scores=SCORES):
    out = copy.deepcopy(records)
    for rec in out:
        rec["small"]["steps"] = [dict(s) for s in rec["small"]["steps"]]   # b's steps are one dict
        rec["pool"] = {**rec["pool"], "prm": {"model": "hand/prm", "params": PRM_PARAMS}}
        rec["small"]["prm_prompt_tokens"] = 10
        for s, sc in zip(rec["small"]["steps"], scores[rec["id"]]):
            s["prm_score"], s["prm_tokens"] = sc, s["tokens"]
    return out


@pytest.fixture(scope="module")
def prm_eval(tmp_path_factory):
    """A hand-set policy (as test_evaluate's), calibrated; evaluate.py with --calib-data on
    the hand table with PRM scores (calibration and test the same questions: on purpose)."""
    d = tmp_path_factory.mktemp("prm")
    data = write_jsonl(d / "hand.jsonl", with_prm(hand_records()))
    policy = tp.Policy(["draft_mean_logprob"], hidden=[])
    with torch.no_grad():
        policy.net[0].weight.fill_(-10.0)
        policy.net[0].bias.fill_(-5.0)
    tp.save_policy(d / "policy.pt", policy, {"note": "hand-set"})
    assert cb.main(["--policy", str(d / "policy.pt"), "--data", data, "--target-relative", "1.0",
                    "--out", str(d / "cal.json"), *DOLLARS, *PRICE_PRM]) == 0
    assert ev.main(["--data", data, "--policy", str(d / "policy.pt"), "--calibration", str(d / "cal.json"),
                    "--calib-data", data, "--allow-overlap", "--out", str(d / "eval"), "--bootstrap", "50",
                    *DOLLARS, *PRICE_PRM]) == 0
    return d, json.loads((d / "eval" / "eval.json").read_text())


def test_prm_router_exact_with_the_prm_cost(prm_eval):
    _, res = prm_eval
    pts = res["methods"]["prm"]
    assert has(pts, NEVER) and has(pts, CHEAP) and has(pts, ALWAYS)
    rsd = [p for p in pts if p["knob"] == 0.7]            # RSD's threshold is a point of the sweep
    assert len(rsd) == 1 and point(rsd[0]) == approx(RSD)
    # every other method is unchanged by the PRM keys: the large model alone never consults it
    assert point(res["methods"]["large"][0]) == approx((0.75, 1.0))
    assert point(res["methods"]["small"][0]) == approx((0.5, 75 / LARGE_SUM))
    for p in pts:                                          # each point is the rule at its tau
        tau = p["knob"]
        acc = cost = 0.0
        for rec in with_prm(hand_records()):
            s = rec["small"]["steps"]
            t = next((i for i, x in enumerate(s) if x["prm_score"] < tau), None)
            read = 10 + sum(x["prm_tokens"] for x in s[:len(s) if t is None else t + 1]) if s else 0
            small = sum(x["tokens"] for x in s[:len(s) if t is None else t + 1])
            if t is None:
                ok, large = rec["small"]["correct"], 0
            else:
                ok, large = rec["escalations"][t]["correct"], rec["escalations"][t]["tokens"]
            acc += ok / 4
            cost += (small + 10 * large + 2 * read) / LARGE_SUM
        assert point(p) == approx((acc, cost)), tau


def test_prm_router_calibrated_like_the_others(prm_eval):
    d, res = prm_eval
    cal = res["calibrated"]["prm"]
    # the cheapest sweep point reaching 0.75 on the calibration questions: escalate where the
    # score is below 0.3's successor (a at step 2 only); measured on the same questions
    assert cal["knob"] == pytest.approx(0.3) and cal["knob"] > 0.3
    assert point(cal) == approx(CHEAP) and cal["meets_target"]
    assert cal["calibration_relative_cost"] == pytest.approx(385 / 900)
    md = (d / "eval" / "eval.md").read_text()
    assert "| prm |" in md and (d / "eval" / "tradeoff.png").stat().st_size > 0
    assert res["summary"]["prm"]["cost_at_100"] == pytest.approx(385 / 900)


def test_flops_pricing_charges_two_params_per_prm_token(tmp_path):
    data = write_jsonl(tmp_path / "hand.jsonl", with_prm(hand_records()))
    assert ev.main(["--data", data, "--out", str(tmp_path / "e"), "--bootstrap", "0"]) == 0
    pts = json.loads((tmp_path / "e" / "eval.json").read_text())["methods"]["prm"]
    rsd = next(p for p in pts if p["knob"] == 0.7)
    # small 1B (2e9 FLOPs/token), large 7B (14e9), PRM 0.5B (1e9 per token read): at tau 0.7
    # small tokens 20+15+0+20, large 10+10+0+40, PRM 30+25+0+30; all-large 14e9 * 90
    assert rsd["relative_cost"] == pytest.approx((2e9 * 55 + 14e9 * 60 + 1e9 * 85) / (14e9 * 90), rel=1e-12)
    assert rsd["accuracy"] == pytest.approx(0.5)


def test_no_scores_no_prm_methods(tmp_path, capsys):
    plain = write_jsonl(tmp_path / "plain.jsonl", hand_records())
    part = with_prm(hand_records())
    for s in part[1]["small"]["steps"]:                       # one question lacks its scores
        del s["prm_score"]
    partial = write_jsonl(tmp_path / "partial.jsonl", part)
    scored = write_jsonl(tmp_path / "scored.jsonl", with_prm(hand_records()))
    for data, extra in ((plain, []), (partial, []), (scored, DOLLARS)):   # dollars, no --price-prm
        assert ev.main(["--data", data, "--out", str(tmp_path / "e"), "--bootstrap", "0", *extra]) == 0
        res = json.loads((tmp_path / "e" / "eval.json").read_text())
        assert "prm" not in res["methods"] and "policy+prm" not in res["methods"]
        assert "| prm |" not in (tmp_path / "e" / "eval.md").read_text()
    assert "--price-prm" in capsys.readouterr().err
    with pytest.raises(UsageError, match="--price-prm goes with --price-small"):
        ev.main(["--data", scored, "--out", str(tmp_path / "e"), *PRICE_PRM])


def test_with_prm_cost_columns_by_hand():
    records = with_prm(hand_records())
    args = ev.build_parser().parse_args(["--data", "x", "--out", "y", *DOLLARS, *PRICE_PRM])
    pricing = tb.pricing_from_args(args, records)
    t = tp.build_table(records, pricing, tb.prm_price_from_args(args, pricing, records))
    assert t.prm_tokens[:, :3].tolist() == [[20, 30, 0], [15, 20, 25], [0, 0, 0], [30, 50, 0]]
    p = tb.with_prm_cost(t)
    unit = 1e-6            # DOLLARS: a small token 1e-6 dollars, a PRM token 2e-6
    assert (p.small_cost / unit).tolist() == pytest.approx([80, 65, 0, 140])
    assert (p.esc_cost[0, :2] / unit).tolist() == pytest.approx([210 + 40, 120 + 60])
    assert torch.equal(p.large_cost, t.large_cost) and tb.with_prm_cost(p) is p
