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
    # score is below a threshold strictly between the scores 0.3 and 0.5 (their midpoint: a
    # threshold never sits on a table value; a at step 2 only); measured on the same questions
    assert cal["knob"] == pytest.approx(0.4) and 0.3 < cal["knob"] < 0.5
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


# ---------------------------------------------------------------------------- rollout.py
def strip_prm(rec: dict) -> dict:
    """A record without what the PRM adds (pool.prm, the step and prompt PRM keys, settings.prm)."""
    rec = copy.deepcopy(rec)
    rec["pool"].pop("prm", None)
    rec["small"].pop("prm_prompt_tokens", None)
    rec.get("settings", {}).pop("prm", None)
    for s in rec["small"]["steps"]:
        s.pop("prm_score", None)
        s.pop("prm_tokens", None)
    return rec


@pytest.fixture(scope="module")
def tiny_prm(tmp_path_factory):
    import prm as prm_lib
    from tinyprm import build_tiny_prm
    folder = build_tiny_prm(tmp_path_factory.mktemp("tinyprm") / "prm")
    return folder, prm_lib.load_prm(str(folder))


def check_scores(records, prm):
    import prm as prm_lib
    assert any(r["small"]["steps"] for r in records)
    for rec in records:
        steps = [s["text"] for s in rec["small"]["steps"]]
        assert rec["pool"]["prm"] == prm.pool_entry and prm_lib.has_prm(rec)
        assert [s["prm_score"] for s in rec["small"]["steps"]] == pytest.approx(
            prm_lib.score_steps(prm, rec["question"], steps), abs=1e-5)
        e = prm_lib.encode(prm, rec["question"], steps)
        assert [s["prm_tokens"] for s in rec["small"]["steps"]] == e.step_tokens
        assert rec["small"]["prm_prompt_tokens"] == e.prompt_tokens


def test_rollout_with_prm_scores_every_drafted_step(tiny_pool, tiny_table, tiny_prm, tmp_path):
    import rollout
    from table import read_table
    folder, prm = tiny_prm
    out = tmp_path / "t.jsonl"
    argv = ["--dataset", str(tiny_table["data"]), "--small", str(tiny_pool["small"]),
            "--large", str(tiny_pool["large"]), "--dtype", "float32", "--max-new-tokens", "96",
            "--batch-size", "3", "--chunk-size", "5", "--limit", "3", "--prm", str(folder)]
    assert rollout.main([*argv, "--out", str(out)]) == 0
    records = read_table(out)
    assert len(records) == 3
    check_scores(records, prm)
    assert all(r["settings"]["prm"] == str(folder) for r in records)
    # the same questions, the same table, but for what the PRM adds
    base = {r["id"]: r for r in tiny_table["records"]}   # lines are written as questions finish
    stats = ("mean_logprob", "min_logprob", "mean_entropy", "max_entropy")
    for rec in records:     # other batches (3 questions, not 8): the same text, floats to rounding
        mine, ref = strip_prm(rec), copy.deepcopy(base[rec["id"]])
        for a, b in zip(mine["small"]["steps"], ref["small"]["steps"]):
            assert [a.pop(k) for k in stats] == pytest.approx([b.pop(k) for k in stats], abs=1e-4)
        assert mine == ref
    # resuming with another PRM (or none) is refused: the table was scored by this one
    other = tmp_path / "other"
    import shutil
    shutil.copytree(folder, other)
    for extra in (["--prm", str(other)], []):
        with pytest.raises(UsageError, match="another pool|other settings"):
            rollout.main([*argv[:-2], *extra, "--limit", "4", "--out", str(out)])


def test_rescore_adds_scores_and_changes_nothing_else(tiny_table, tiny_prm, tmp_path):
    import gzip
    import shutil
    import rollout
    from table import read_table
    folder, prm = tiny_prm
    out = tmp_path / "scored.jsonl"
    assert rollout.main(["--prm", str(folder), "--rescore", str(tiny_table["out"]), "--out", str(out),
                         "--prm-batch-size", "3"]) == 0
    records = read_table(out)
    assert [strip_prm(r) for r in records] == tiny_table["records"]
    check_scores(records, prm)
    assert read_table(tiny_table["out"]) == tiny_table["records"]          # the input untouched
    # in place, compressed: OUT is TABLE, still gzip, the same scores
    gz = tmp_path / "table.jsonl.gz"
    with open(tiny_table["out"], "rb") as src, gzip.open(gz, "wb") as dst:
        shutil.copyfileobj(src, dst)
    assert rollout.main(["--prm", str(folder), "--rescore", str(gz)]) == 0
    with gzip.open(gz, "rt") as f:
        assert f.readline().startswith("{")
    again = read_table(gz)
    assert [strip_prm(r) for r in again] == tiny_table["records"]
    check_scores(again, prm)                         # (batches of 8 here, of 3 above)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    # the scored table gives evaluate.py its prm method
    assert ev.main(["--data", str(out), "--out", str(tmp_path / "e"), "--bootstrap", "0"]) == 0
    assert "prm" in json.loads((tmp_path / "e" / "eval.json").read_text())["methods"]


def test_rollout_prm_bad_input_one_line_exit_2(tiny_pool, tiny_table, tiny_prm, tmp_path):
    table = str(tiny_table["out"])
    cases = [(["--rescore", table], "--rescore TABLE needs --prm MODEL"),
             (["--prm", str(tiny_pool["small"]), "--rescore", table],
              "only the Qwen2.5-Math-PRM family"),
             (["--prm", str(tmp_path / "nowhere"), "--rescore", table], "not a model folder"),
             (["--prm", str(tiny_prm[0]), "--rescore", str(tmp_path / "missing.jsonl")], "no such file"),
             (["--prm", str(tiny_prm[0]), "--dataset", str(tiny_table["data"]), "--small",
               str(tiny_pool["small"]), "--out", str(tmp_path / "x.jsonl"), "--dtype", "float32",
               "--prm", str(tiny_pool["large"])], "only the Qwen2.5-Math-PRM family"),
             (["--prm", str(tiny_prm[0])], "the following arguments are required: --dataset, --out")]
    runs = run_parallel([["rollout.py", *argv] for argv, _ in cases], cwd=ROOT)
    for res, (argv, message) in zip(runs, cases):
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1, (argv, res.stderr)
        assert lines[0].startswith("rollout.py: error: ") and message in lines[0], lines[0]
    assert not (tmp_path / "x.jsonl").exists()


# ---------------------------------------------------------------------------- policy+prm
def hand_prm_policy(path):
    """p = sigmoid(-10 * draft_prm_score + 5): p >= kappa  <=>  score <= a threshold, so every
    point of policy+prm is a point of the prm router (whose costs are worked out above)."""
    pol = tp.Policy(["draft_prm_score"], hidden=[])
    with torch.no_grad():
        pol.net[0].weight.fill_(-10.0)
        pol.net[0].bias.fill_(5.0)
    tp.save_policy(path, pol, {"note": "hand-set"})
    return str(path)


def test_policy_prm_scored_and_calibrated_with_the_prm_cost(prm_eval, tmp_path):
    d, _ = prm_eval
    data = str(d / "hand.jsonl")
    pp = hand_prm_policy(tmp_path / "pp.pt")
    assert ev.main(["--data", data, "--policy", str(d / "policy.pt"), "--calibration", str(d / "cal.json"),
                    "--calib-data", data, "--allow-overlap", "--policy-prm", pp, "--out", str(tmp_path / "e"),
                    "--bootstrap", "0", *DOLLARS, *PRICE_PRM]) == 0
    res = json.loads((tmp_path / "e" / "eval.json").read_text())
    pts = res["methods"]["policy+prm"]
    prm_points = {(round(p["accuracy"], 9), round(p["relative_cost"], 9)) for p in res["methods"]["prm"]}
    assert all((round(p["accuracy"], 9), round(p["relative_cost"], 9)) in prm_points for p in pts)
    assert has(pts, NEVER) and has(pts, CHEAP)
    assert point(res["calibrated"]["policy+prm"]) == approx(CHEAP)         # as the prm router's
    assert "| policy+prm |" in (tmp_path / "e" / "eval.md").read_text()
    # a policy without the PRM's features is not a policy+prm
    with pytest.raises(UsageError, match="reads none of the PRM's features"):
        ev.main(["--data", data, "--policy-prm", str(d / "policy.pt"), "--out", str(tmp_path / "f"),
                 *DOLLARS, *PRICE_PRM])


def synthetic_with_prm(n, seed, prefix):
    from synthetic import make_records
    recs = make_records(n, seed, id_prefix=prefix)
    for r in recs:
        r["pool"] = {**r["pool"], "prm": {"model": "syn/prm", "params": PRM_PARAMS}}
        r["small"]["prm_prompt_tokens"] = 12
        for s in r["small"]["steps"]:
            s["prm_score"] = min(1.0, max(0.0, 1.0 + s["mean_logprob"] / 4))
            s["prm_tokens"] = s["tokens"] + 1
    return recs


def test_with_prm_trains_calibrates_and_evaluates(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", synthetic_with_prm(80, 1, "tr"))
    calib = write_jsonl(tmp_path / "calib.jsonl", synthetic_with_prm(40, 2, "ca"))
    test = write_jsonl(tmp_path / "test.jsonl", synthetic_with_prm(40, 3, "te"))
    pol = str(tmp_path / "pp.pt")
    assert tp.main(["--train", train, "--out", pol, "--target-relative", "0.9", "--iters", "30",
                    "--with-prm", "--features", "draft_mean_logprob,step"]) == 0
    p = tp.load_policy(pol)
    assert p.feature_names == ["draft_mean_logprob", "step", *tp.PRM_FEATURES] and tp.uses_prm(p)
    assert p.meta["prm_price"] == 2.0 * PRM_PARAMS
    assert cb.main(["--policy", pol, "--data", calib, "--target-relative", "0.9",
                    "--out", str(tmp_path / "cal.json")]) == 0
    # the calibration records the price of a PRM token it charged (FLOPs: 2 x its parameters)
    assert json.loads((tmp_path / "cal.json").read_text())["prm_price"] == 2.0 * PRM_PARAMS
    assert ev.main(["--data", test, "--policy", pol, "--calibration", str(tmp_path / "cal.json"),
                    "--calib-data", calib, "--policy-prm", pol, "--out", str(tmp_path / "e"),
                    "--bootstrap", "0"]) == 0
    res = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert {"prm", "policy+prm", "policy"} <= set(res["methods"])
    assert {"prm", "policy+prm", "policy"} <= set(res["calibrated"])
    # the same policy as --policy and as --policy-prm: the same points, both paying for the PRM
    assert res["methods"]["policy+prm"][0]["relative_cost"] == pytest.approx(
        next(q["relative_cost"] for q in res["methods"]["policy"] if q["knob"] == res["methods"]["policy+prm"][0]["knob"]))
    # a table without scores: no policy+prm training
    plain = write_jsonl(tmp_path / "plain.jsonl", hand_records())
    with pytest.raises(UsageError, match="needs PRM scores on every question"):
        tp.main(["--train", plain, "--out", str(tmp_path / "x.pt"), "--target-relative", "0.9",
                 "--iters", "2", "--with-prm"])
    with pytest.raises(UsageError, match="needs PRM scores on every question"):
        cb.main(["--policy", pol, "--data", plain, "--target-relative", "0.9", "--out", str(tmp_path / "c2.json")])


# ---------------------------------------------------------------------------- route.py
def test_route_scores_each_draft_live_as_the_table_does(tiny_lms, tiny_table, tiny_prm):
    """route() with a policy reading draft_prm_score (p = sigmoid(-10 s + 5)) and the tiny PRM:
    each draft's live score is the PRM's score of the prefix, as rollout.py --prm writes it,
    and it escalates at the first step with p >= kappa."""
    import prm as prm_lib
    import route as rt
    small, large = tiny_lms
    _, prm = tiny_prm
    pol = tp.Policy(["draft_prm_score"], hidden=[])
    with torch.no_grad():
        pol.net[0].weight.fill_(-10.0)
        pol.net[0].bias.fill_(5.0)
    rec = next(r for r in tiny_table["records"] if len(r["small"]["steps"]) >= 2)
    texts = [s["text"] for s in rec["small"]["steps"]]
    table_scores = prm_lib.score_steps(prm, rec["question"], texts)
    run = rt.route(rec["question"], small, large, pol.eval(), 1.0, 96, prm=prm)   # kappa 1: never
    live = [s for s in run["steps"] if s["model"] == "small"]
    assert [s["text"] for s in live] == texts
    assert [s["prm_score"] for s in live] == pytest.approx(table_scores, abs=1e-5)
    e = prm_lib.encode(prm, rec["question"], texts)
    assert run["tokens"]["prm_read"] == e.prompt_tokens + sum(e.step_tokens)
    p = [1 / (1 + math.exp(10 * s - 5)) for s in table_scores]
    kappa = sorted(p)[len(p) // 2]
    run = rt.route(rec["question"], small, large, pol.eval(), kappa, 96, prm=prm)
    first = next(t for t, x in enumerate(p) if x >= kappa - 1e-9) + 1
    assert run["escalated_at"] == first
    assert run["tokens"]["prm_read"] == e.prompt_tokens + sum(e.step_tokens[:first])
