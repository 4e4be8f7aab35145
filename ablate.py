"""Why the learned policy wins or loses on a pool: ablations on the trajectory tables.

Run it from the repository root (no LLM runs: seconds to minutes, from the tables alone,
except --probe, which reads every question once with the small model):

    python ablate.py                      # results/svamp/{train,calib,test}.jsonl -> results/svamp/ablations.{md,json}
    python ablate.py --probe              # adds the linear probe on the small model's hidden state
    python ablate.py --probe --test-after 121   # measured on the test questions after line 121 only
    python ablate.py --drop-shared-stories      # measured on the calib/test questions whose story no training question shares

For one accuracy target (--target-relative R, default 0.95: R x the large model's accuracy on
the same questions), every variant below is trained on the train table (train_policy.train,
seeds 0..S-1), calibrated on the calibration table by calibrate.py's rule (calibrate_scores,
--delta as there), and measured on the test table: accuracy, relative cost, and whether the
test target is met, as mean +- sd over the seeds. The handcrafted routers are calibrated the
same way on the same questions (evaluate.calibrate_baselines), so every row compares like with
like. Then:

1. **Feature ablation.** The policy on all its features, on all but one group, and on one group
   alone (groups: GROUPS below). Which features carry the signal?
2. **Learning curve.** The policy trained on the first n training questions (a fixed shuffle),
   n = 8, 16, 32, ... and all. Would more training questions help?
3. **Hindsight frontiers** (chosen on the test questions, so NOT deployable: labelled so). For
   each router, the cheapest point of its threshold sweep on the test questions that meets the
   test target; the oracle's cost, and the per-question oracle's (the cheapest correct of small
   alone, escalate at step 1, large alone). How far is each router from what its scores allow,
   and how far are all of them from the oracle? And before any threshold: each router's AUC
   for the questions the small model gets wrong (each question's highest score over its steps).
4. **Tries.** The policy's capacity (a linear policy; one hidden layer of 16) and its gradient
   (the exact expectation instead of sampled episodes: is REINFORCE's noise the limit?) on the
   same features. Beyond token statistics: (a) the running answer, read from the drafted text
   (text_features: how many numbers a step writes, how many are new, whether it writes an
   equation, whether the last number so far is one the question gave). (b) With --probe, a
   linear probe on the small model's hidden state at the end of each drafted step (probe.py):
   a logistic regression fitted on the training questions (out-of-fold scores on them, so the
   policy never trains on a probe that saw its question), used as a router of its own and, by
   its logit, as one more policy feature (of the MLP policy and of a linear one). Two labels
   (PROBE_LABELS): "wrong", the small model's own answer will be wrong, and "rescue", it will
   AND the large model taking over at this step ends correct (what escalating here buys).
5. **Where escalation pays** (read off the outcomes): per step, how often the large model taking
   over rescues a wrong answer or keeps a right one, the mean gain and cost of escalating
   there; with --probe, the gain and cost by quarter of each probe's score. A policy trained
   by the Lagrangian escalates where lambda x gain outweighs cost, so a score whose high values
   bring cost but no gain teaches it the opposite of what the score's AUC suggests.

Each try is reported with its numbers whether it is kept or not. A feature becomes part of the
method (train_policy.state_features, route.py) only if it wins here on held-out questions.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import statistics
import time
from pathlib import Path

import torch

from calibrate import calibrate_scores
from cli import UsageError, check_range, make_parser, plural, run_cli
from data import shares_story
from evaluate import (HANDCRAFTED, best_handcrafted, bootstrap_counts, calibrate_baselines, calibrated_point,
                      calibration_summary, cost_to_reach, method_scores, oracle_route, paired_cost_interval)
import probe
from table import (add_pricing_args, find_table, prm_price_from_args, pricing_from_args, read_table,
                   score_routes, select, sweep, target_of)
from train_policy import BASE_FEATURES, FEATURE_NAMES, TrainConfig, build_table, policy_probs, train

GROUPS = {
    "logprob": ["draft_mean_logprob", "draft_min_logprob", "prev_min_mean_logprob", "prev_min_min_logprob"],
    "entropy": ["draft_mean_entropy", "draft_max_entropy", "prev_max_mean_entropy", "prev_max_max_entropy"],
    "length/position": ["draft_tokens", "step", "tokens_so_far", "prompt_tokens"],
    "text flags": ["draft_has_boxed", "ended"],
}
assert sorted(sum(GROUPS.values(), [])) == sorted(BASE_FEATURES)
TEXT_FEATURES = ["draft_numbers", "draft_new_numbers", "draft_has_equation", "answer_from_question"]
PROBE_FEATURE = "probe_small_wrong"   # the probes' logits (--probe)
RESCUE_FEATURE = "probe_rescue"
NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")


# ----------------------------------------------------------------------------------------
# Features beyond the token statistics, known when step t is drafted (no look-ahead).
# ----------------------------------------------------------------------------------------
def numbers(text: str) -> list[str]:
    return [m.group().replace(",", "") for m in NUMBER.finditer(text)]


def text_features(question: str, steps: list[dict]) -> list[list[float]]:
    """TEXT_FEATURES of the state after each drafted step t = 1..n: the draft's numbers, those
    neither the question nor an earlier step wrote, whether it writes "=", and whether the last
    number written so far is one of the question's (0.5 before any number is written)."""
    seen, given, last, rows = set(numbers(question)), set(numbers(question)), None, []
    for s in steps:
        nums = numbers(s["text"])
        new = {x for x in nums if x not in seen}   # distinct
        seen.update(nums)
        last = nums[-1] if nums else last
        rows.append([float(len(nums)), float(len(new)), 1.0 if "=" in s["text"] else 0.0,
                     0.5 if last is None else float(last in given)])
    return rows


def with_columns(table, extra: torch.Tensor):
    """The FeatureTable with extra feature columns [Q,T,E] appended."""
    return dataclasses.replace(table, features=torch.cat([table.features, extra.float()], -1))


# ----------------------------------------------------------------------------------------
# One variant: train (S seeds), calibrate on calib, measure on test.
# ----------------------------------------------------------------------------------------
def judge(tabs: dict, features: list, columns: list, spec: dict, delta, seeds: int,
          config: TrainConfig, train_idx=None, ref: dict | None = None, **overrides) -> dict:
    """The policy on `features` (TrainConfig `config` with `overrides`), trained on the train
    table (or its questions train_idx) with seeds 0..seeds-1, each calibrated on calib and
    measured on test; with `ref` ({"cost": [Q] per-question costs of a reference router on test,
    "counts": evaluate.bootstrap_counts}), its relative cost minus the reference's on the same
    questions, and for seed 0 a 95% paired bootstrap interval of it."""
    config = dataclasses.replace(config, **overrides)
    tr = tabs["train"] if train_idx is None else select(tabs["train"], train_idx)
    target = target_of(spec, tr.large_correct)
    runs = []
    for seed in range(seeds):
        policy, _ = train(tr, target, config, columns=columns, features=tuple(features), seed=seed)
        cal = calibrate_scores(tabs["calib"], policy_probs(policy, tabs["calib"]), spec, delta)
        p_test = policy_probs(policy, tabs["test"])
        point, out = calibrated_point(tabs["test"], "policy", cal["knob"], calibration_summary(cal), spec, policy,
                                      scores=p_test)
        vs_ref = vs_ref_ci = None
        if ref is not None:   # the same sum over questions as relative_cost, and its paired resamples
            test = tabs["test"]
            vs_ref = ((out["cost"][0] - ref["cost"]).sum() / test.large_cost.sum()).item()
            if seed == 0:
                vs_ref_ci = paired_cost_interval(ref["counts"], test, out["cost"][0], ref["cost"])
        runs.append({"seed": seed, "kappa": cal["knob"], "vs_ref": vs_ref, "vs_ref_ci": vs_ref_ci, **{k: point[k] for k in (
            "accuracy", "relative_cost", "meets_target", "calibration_accuracy",
            "calibration_relative_cost", "calibration_met")},
            "test_hindsight_cost": hindsight_cost(tabs["test"], p_test, spec),
            "test_wrong_auc": wrong_auc(tabs["test"], p_test)})
    return summarise(runs, n_train=tr.Q, features=features)


def summarise(runs: list, **extra) -> dict:
    def ms(key):
        xs = [r[key] for r in runs if r[key] is not None]
        return {"mean": statistics.fmean(xs) if xs else None,
                "sd": statistics.pstdev(xs) if len(xs) > 1 else 0.0 if xs else None}
    return {**extra, "accuracy": ms("accuracy"), "relative_cost": ms("relative_cost"),
            "hindsight_cost": ms("test_hindsight_cost"), "wrong_auc": ms("test_wrong_auc"),
            "vs_best_handcrafted": ms("vs_ref"), "vs_best_handcrafted_ci_seed0": runs[0].get("vs_ref_ci"),
            "seeds_meeting_target": sum(r["meets_target"] for r in runs), "seeds": len(runs), "runs": runs}


def hindsight_cost(test, scores: torch.Tensor, spec: dict):
    """HINDSIGHT: the cheapest relative cost on the test questions of a first-crossing sweep of
    `scores` that meets the test target (None where no threshold does)."""
    grid = torch.unique(torch.cat([scores[test.mask].double(), torch.tensor([0.0, math.inf], dtype=torch.float64)]))
    sw = sweep(test, scores, grid)
    c = cost_to_reach(sw["relative_cost"], sw["accuracy"], torch.tensor(target_of(spec, test.large_correct),
                                                                          dtype=torch.float64)).item()
    return None if math.isinf(c) else c


def question_oracle(test) -> torch.Tensor:
    """HINDSIGHT [1,Q]: the cheapest correct of the three whole-question choices (the small
    model alone, escalate at step 1, the large model alone); the small model where none is
    correct. What a perfect detector of hard questions could do, with no step-level timing."""
    return oracle_route(test, columns=(0, test.T, test.T + 1))


def wrong_auc(test, scores: torch.Tensor) -> float:
    """How well a router's scores tell the questions the small model gets wrong, before any
    threshold: the AUC of each question's highest score over its drafted steps (the alarm a
    first-crossing router reacts to) against "the small model's answer is wrong"."""
    alarm = torch.where(test.mask, scores.double(), -math.inf).max(1).values
    return probe.auc(alarm, test.small_correct < 0.5)


def escalation_values(tab) -> tuple[torch.Tensor, torch.Tensor]:
    """[Q,T] each: the gain in correctness of escalating at each drafted step (escalate minus
    never) and its cost relative to the mean all-large cost (padded steps: see tab.mask)."""
    return tab.esc_correct - tab.small_correct[:, None], tab.esc_cost / tab.large_cost.mean()


def escalation_by_step(tab, last: int = 4) -> dict:
    """Where escalating pays, per drafted step t = 1..last-1 and t >= last pooled: for the
    questions the small model gets WRONG, how often the large model, taking over at step t
    (after the small model's steps 1..t-1; t = 1 is the large model alone), ends correct
    ("rescued"); for those it gets RIGHT, how often the answer stays correct ("kept"); and over
    all questions the mean gain in correctness (escalate minus never) and the mean cost of
    escalating there (relative to the mean all-large cost). Hindsight: read off the outcomes."""
    cols = torch.arange(tab.T)
    wrong = (tab.small_correct < 0.5)[:, None]
    gain, cost = escalation_values(tab)
    out = {}

    def mean(x, m):
        return x[m].mean().item() if m.any() else None
    for t in range(1, last + 1):
        at = tab.mask & ((cols == t - 1) if t < last else (cols >= t - 1))[None, :]
        out[f"step {t}" if t < last else f"steps >= {t}"] = {
            "n_wrong": int((at & wrong).sum()), "rescued": mean(tab.esc_correct, at & wrong),
            "n_right": int((at & ~wrong).sum()), "kept": mean(tab.esc_correct, at & ~wrong),
            "gain": mean(gain, at), "cost": mean(cost, at)}
    return out


def escalation_by_score(tab, scores: torch.Tensor, bins: int = 4) -> list:
    """The mean gain in correctness and the mean cost of escalating at a drafted step, by
    quantile bin of the step's score (bins of equal size over all drafted steps, low to high):
    does a router that escalates where the score is high buy correctness, and at what price?"""
    s = scores.double()[tab.mask]
    gain, cost = (v[tab.mask] for v in escalation_values(tab))
    rank = torch.empty_like(s)
    rank[torch.argsort(s, stable=True)] = torch.arange(len(s), dtype=s.dtype)
    b = (rank * bins / len(s)).long()
    return [{"n": int((b == i).sum()), "gain": gain[b == i].mean().item(), "cost": cost[b == i].mean().item()}
            for i in range(bins) if (b == i).any()]


def baselines(tabs: dict, spec: dict, delta, extra_scores: dict) -> tuple[dict, dict]:
    """Every handcrafted router (and extra score routers, e.g. the probe) calibrated on calib,
    measured on test; plus small, large and the oracle on test; with hindsight costs. Also the
    per-question outcomes [1,Q] of each calibrated handcrafted router."""
    calib, test = tabs["calib"], tabs["test"]
    res, outs = {}, {}
    cal = calibrate_baselines(calib, spec, delta)
    for name, (knob, c) in cal.items():
        scores = method_scores(test, name) if name in HANDCRAFTED else None
        point, outs[name] = calibrated_point(test, name, knob, c, spec, scores=scores)
        res[name] = point
        if scores is not None:
            point["hindsight_cost"] = hindsight_cost(test, scores, spec)
            point["wrong_auc"] = wrong_auc(test, scores)
    for name, (s_cal, s_test) in extra_scores.items():
        r = calibrate_scores(calib, s_cal, spec, delta)
        point, _ = calibrated_point(test, name, r["knob"], calibration_summary(r), spec, scores=s_test)
        res[name] = {**point, "hindsight_cost": hindsight_cost(test, s_test, spec),
                     "wrong_auc": wrong_auc(test, s_test)}
    Q, T = test.Q, test.T
    target = target_of(spec, test.large_correct)
    for name, esc in (("small", torch.full((1, Q), T)), ("large", torch.full((1, Q), T + 1)),
                      ("oracle", oracle_route(test)), ("oracle per question", question_oracle(test))):
        sc = score_routes(test, esc)
        res[name] = {"accuracy": sc["accuracy"].item(), "relative_cost": sc["relative_cost"].item(),
                     "meets_target": sc["accuracy"].item() >= target - 1e-12}
    return res, outs


# ----------------------------------------------------------------------------------------
# The hidden-state probe (probe.py): out-of-fold scores on train, a probe fitted on all of
# train for calib and test.
# ----------------------------------------------------------------------------------------
PROBE_LABELS = {   # what a probe predicts of each drafted step, and its column in the tables
    "wrong": ("the small model's own answer is wrong", PROBE_FEATURE),
    "rescue": ("escalating here rescues a wrong answer", RESCUE_FEATURE),
}


def probe_labels(tab, at: list, label: str) -> torch.Tensor:
    """The label of each (question, step) row: "wrong": the small model's final answer is wrong;
    "rescue": it is, AND the large model taking over at this step ends correct (the steps
    where escalating gains; read off the table's outcomes)."""
    q, t = torch.tensor([a[0] for a in at], dtype=torch.long), torch.tensor([a[1] for a in at], dtype=torch.long)
    wrong = tab.small_correct[q] < 0.5
    return (wrong if label == "wrong" else wrong & (tab.esc_correct[q, t] > 0.5)).double()


def probe_scores(hidden: dict, records: dict, tabs: dict, args, label: str = "wrong") -> tuple[dict, dict]:
    """[Q,T] float64 probe probabilities of `label` (PROBE_LABELS) per table, and what was
    chosen. The probe's L2 penalty and PCA dimension are chosen by out-of-fold AUC on the
    training questions alone (probe.select_probe); the training table gets out-of-fold scores, the
    calibration and test tables the probe fitted on all training questions."""
    def rows(sl):   # X [N,D] (the chosen layer), y [N], question of each row, (q, t) of each row
        X, ids = probe.rows(hidden[sl], args.probe_layer)   # rows in table order, steps in order
        index = {rec["id"]: qi for qi, rec in enumerate(records[sl])}
        at = [(index[i], t) for i in hidden[sl]["ids"] for t in range(len(hidden[sl]["hidden"][i]))]
        return X, probe_labels(tabs[sl], at, label), [qi for qi, _ in at], at

    Xtr, ytr, gtr, at_tr = rows("train")
    if ytr.min() == ytr.max():
        raise UsageError(f"{args.tables}: --probe needs training steps where \"{PROBE_LABELS[label][0]}\" "
                         "holds and ones where it does not")
    fitted, oof, chosen = probe.select_probe(Xtr, ytr, gtr, folds=args.probe_folds)   # on train alone
    out, info = {}, {"label": PROBE_LABELS[label][0], "layer": ["mid", "last"][args.probe_layer], **chosen}
    for sl in ("train", "calib", "test"):
        s = torch.zeros(tabs[sl].Q, tabs[sl].T, dtype=torch.float64)
        if sl == "train":
            scores, at = oof, at_tr
        else:
            X, y, _, at = rows(sl)
            scores = fitted.score(X)
            info[f"{sl}_auc"] = probe.auc(scores, y)
        for (qi, t), v in zip(at, scores.tolist()):
            s[qi, t] = v
        out[sl] = s
    return out, info


# ----------------------------------------------------------------------------------------
# The report.
# ----------------------------------------------------------------------------------------
def pm(d: dict, digits=3) -> str:
    if d["mean"] is None:
        return "-"
    return f"{d['mean']:.{digits}f} +- {d['sd']:.{digits}f}"


def f3(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def dropped_note(dropped: dict | None) -> str:
    """The report's note on --drop-shared-stories."""
    if not dropped:
        return ""
    return (f" (--drop-shared-stories: {dropped['calib']} calibration and {dropped['test']} test questions "
            "whose story a training question shares left out)")


def markdown(res: dict) -> str:
    m = res["meta"]
    lines = [f"# Ablations: {m['tables']}", "",
             f"Target: accuracy >= {m['target_relative']} x the large model's on the same questions; "
             f"train {m['n']['train']}, calibration {m['n']['calib']}, test {m['n']['test']} questions"
             f"{f' (the test lines after the first {after})' if (after := m.get('test_after')) else ''}"
             f"{dropped_note(m.get('dropped_shared_stories'))}; "
             f"{m['seeds']} seeds per variant; delta {m['delta']}. Command: `{m['command']}` "
             f"({m['seconds']:.0f} s on {m['machine']}).", "",
             "Every router below was calibrated on the calibration questions and measured on the test "
             "questions. *hindsight cost*: the cheapest point of the router's own threshold sweep that "
             "meets the target on the TEST questions (chosen in hindsight, not deployable). *AUC*: how "
             "well the router's scores tell the test questions the small model gets wrong (each "
             "question's highest score over its steps; 0.5 = chance, 1 = perfect), before any "
             "threshold. *oracle per question*: the cheapest correct of small alone, escalate at step 1, "
             "large alone (hindsight).", "",
             "## Baselines (calibrated on calib, measured on test)", "",
             "| router | accuracy | relative cost | meets target | hindsight cost | AUC |",
             "|---|---|---|---|---|---|"]
    for name, p in res["baselines"].items():
        lines.append(f"| {name} | {p['accuracy']:.3f} | {p['relative_cost']:.3f} | "
                     f"{'yes' if p['meets_target'] else 'no'} | {f3(p.get('hindsight_cost'))} | "
                     f"{f3(p.get('wrong_auc'))} |")
    lines += ["", f"Test target: {res['test_target']:.3f}. Best calibrated handcrafted router "
              f"(chosen on calib): {res['best_handcrafted']}.", ""]
    for label, p in (res.get("probe") or {}).items():
        lines += [f"Hidden-state probe ({label}: \"{p['label']}\"; {p['layer']} layer, L2 {p['l2']:g}, PCA "
                  f"{p['dim']}, chosen by out-of-fold AUC on the training questions): AUC per step "
                  f"{p['train_oof_auc']:.3f} on train (out of fold), {p['calib_auc']:.3f} on calib, "
                  f"{p['test_auc']:.3f} on test. As a policy feature: its logit.", ""]
    for section, title in (("features", "1. Feature ablation"), ("learning_curve", "2. Learning curve"),
                           ("tries", "4. Tries beyond token statistics")):
        if not res[section]:
            continue
        lines += [f"## {title}", "", "| policy | train q | accuracy | relative cost | seeds meeting target "
                  f"| minus {res['best_handcrafted']}: seeds; seed 0 [95% CI] | hindsight cost | AUC |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, v in res[section].items():
            ci = v.get("vs_best_handcrafted_ci_seed0")
            d = v["vs_best_handcrafted"]
            vs = "-" if ci is None else (f"{d['mean']:+.3f} +- {d['sd']:.3f}; {v['runs'][0]['vs_ref']:+.3f} "
                                         f"[{ci[0]:+.3f}, {ci[1]:+.3f}]")
            lines.append(f"| {name} | {v['n_train']} | {pm(v['accuracy'])} | {pm(v['relative_cost'])} | "
                         f"{v['seeds_meeting_target']}/{v['seeds']} | {vs} | {pm(v['hindsight_cost'])} | "
                         f"{pm(v['wrong_auc'])} |")
        lines.append("")
    if res.get("escalation"):
        lines += ["## 5. Where escalation pays (read off the outcomes)", "",
                  "Escalating at step t: the large model takes over after the small model's steps 1..t-1 "
                  "(t = 1: the large model alone). *rescued*: share correct among the questions the small "
                  "model gets wrong; *kept*: among those it gets right; *gain*: mean correctness of escalating "
                  "there minus never escalating, over all questions; *cost*: mean relative cost of "
                  "escalating there. n: drafted steps.", "",
                  "| table | step | n wrong | rescued | n right | kept | gain | cost |", "|---|---|---|---|---|---|---|---|"]
        for sl, rows in res["escalation"].items():
            for step, r in rows.items():
                lines.append(f"| {sl} | {step} | {r['n_wrong']} | {f3(r['rescued'])} | {r['n_right']} | "
                             f"{f3(r['kept'])} | {f3(r['gain'])} | {f3(r['cost'])} |")
        lines.append("")
    if res.get("escalation_by_probe"):
        lines += ["Gain and cost of escalating at a drafted step by quarter of a probe's score "
                  "(lowest first; the training table's scores are out of fold):", "",
                  "| table, probe | " + " | ".join(f"quarter {i + 1}: gain / cost" for i in range(4)) + " |",
                  "|---|---|---|---|---|"]
        for sl, rows in res["escalation_by_probe"].items():
            lines.append(f"| {sl} | " + " | ".join(f"{r['gain']:.3f} / {r['cost']:.3f}" for r in rows) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------
def build_parser():
    p = make_parser(__doc__)
    p.add_argument("--tables", default="results/svamp", metavar="DIR",
                   help="folder with train, calib and test tables (.jsonl or .jsonl.gz; default results/svamp)")
    p.add_argument("--out", default=None, metavar="PATH",
                   help="report to write (.md, and .json beside it; default TABLES/ablations.md)")
    p.add_argument("--target-relative", type=float, default=0.95, metavar="R",
                   help="accuracy target R x the large model's (default 0.95)")
    p.add_argument("--delta", type=float, default=None, help="calibrate with a 1 - delta guarantee (default: plain rule)")
    p.add_argument("--seeds", type=int, default=5, help="training seeds per variant (default 5)")
    p.add_argument("--test-after", type=int, default=0, metavar="N",
                   help="measure on the test table's questions after its first N lines only (e.g. those "
                        "added after a try was fixed; the probes' test AUC stays the whole table's)")
    p.add_argument("--drop-shared-stories", action="store_true",
                   help="measure on the test and calibration questions whose story no training question "
                        "shares only (data.story_key: the text before the final question sentence, numbers "
                        "masked); says how many are dropped")
    p.add_argument("--bootstrap", type=int, default=2000, metavar="N",
                   help="paired resamples for the interval of each variant's cost minus the best handcrafted "
                        "router's (default 2000)")
    p.add_argument("--iters", type=int, default=TrainConfig.iters,
                   help=f"training iterations per policy (default {TrainConfig.iters})")
    p.add_argument("--skip", nargs="*", default=[], choices=["features", "learning_curve", "tries"],
                   help="sections to leave out")
    g = p.add_argument_group("hidden-state probe (probe.py)")
    g.add_argument("--probe", action="store_true", help="add the probe (reads every question with the small model once; cached)")
    g.add_argument("--probe-layer", type=int, default=0, help="0: the middle layer, 1: the last (default 0)")
    g.add_argument("--probe-folds", type=int, default=5, help="cross-fitting folds on train (default 5)")
    g.add_argument("--probe-dtype", default="float32", help="dtype of the small model (default float32)")
    add_pricing_args(p)
    return p


def find(tables: Path, sl: str) -> Path:
    path = find_table(tables, sl)
    if path is None:
        raise UsageError(f"{tables}: no {sl}.jsonl or {sl}.jsonl.gz")
    return path


def main(argv=None):
    import platform
    import sys
    args = build_parser().parse_args(argv)
    check_range("--seeds", args.seeds, 1)
    check_range("--iters", args.iters, 1)
    check_range("--bootstrap", args.bootstrap, 1)
    check_range("--test-after", args.test_after, 0)
    check_range("--target-relative", args.target_relative, 0.0, None, lo_open=True)
    torch.set_num_threads(1)
    start = time.perf_counter()
    tables = Path(args.tables)
    paths = {sl: find(tables, sl) for sl in ("train", "calib", "test")}
    records = {sl: read_table(p) for sl, p in paths.items()}
    tabs = {}
    for sl, recs in records.items():
        pricing = pricing_from_args(args, recs)
        tab = build_table(recs, pricing, prm_price_from_args(args, pricing, recs))
        extra = torch.zeros(tab.Q, tab.T, len(TEXT_FEATURES))
        for qi, rec in enumerate(recs):
            rows = text_features(rec["question"], rec["small"]["steps"])
            if rows:
                extra[qi, :len(rows)] = torch.tensor(rows)
        tabs[sl] = with_columns(tab, extra)
    columns = FEATURE_NAMES + TEXT_FEATURES
    spec, delta = {"relative": args.target_relative}, args.delta
    config = TrainConfig(iters=args.iters)
    print(f"tables {tables}: train {tabs['train'].Q}, calib {tabs['calib'].Q}, test {tabs['test'].Q} questions; "
          f"target {args.target_relative} x large; {plural(args.seeds, 'seed')} per variant", flush=True)

    scores, probe_info = {}, None
    if args.probe:
        hidden = {sl: probe.hidden_for_table(paths[sl], None, dtype=args.probe_dtype) for sl in paths}
        probe_info = {}
        for label, (what, _) in PROBE_LABELS.items():
            scores[label], probe_info[label] = probe_scores(hidden, records, tabs, args, label)
            info = probe_info[label]
            print(f"probe '{what}' on the {info['layer']} layer: l2 {info['l2']:g}, PCA {info['dim']}; AUC per "
                  f"step: train (out of fold) {info['train_oof_auc']:.3f}, calib {info['calib_auc']:.3f}, "
                  f"test {info['test_auc']:.3f}", flush=True)
        tabs = {sl: with_columns(tabs[sl], torch.stack([probe.probe_logit(scores[label][sl]) for label in PROBE_LABELS], -1))
                for sl in tabs}
        columns = columns + [column for _, column in PROBE_LABELS.values()]
    def keep_only(sl, keep):   # the table's questions `keep` (and the probes' scores of them)
        tabs[sl] = select(tabs[sl], keep)
        for label in scores:
            scores[label][sl] = scores[label][sl][keep]

    if args.test_after:   # measure on the test questions after the first N lines only (probes fitted as before)
        keep = list(range(args.test_after, tabs["test"].Q))
        if not keep:
            raise UsageError(f"--test-after {args.test_after}: {paths['test']} has {tabs['test'].Q} questions")
        keep_only("test", keep)
        print(f"test: the {len(keep)} questions after line {args.test_after} of {paths['test']}", flush=True)
    dropped = None
    if args.drop_shared_stories:   # no story on both sides: drop calib/test questions a training question's story shares
        dropped = {}
        for sl in ("calib", "test"):
            first = args.test_after if sl == "test" else 0
            shared = shares_story(records[sl][first:], records["train"])
            keep = [i for i, s in enumerate(shared) if not s]
            if not keep:
                raise UsageError(f"--drop-shared-stories: every question of {paths[sl]} measured shares its "
                                 "story with a training question")
            keep_only(sl, keep)
            dropped[sl] = sum(shared)
            print(f"{sl}: {dropped[sl]} of {len(shared)} questions dropped (their story is a training "
                  f"question's); {len(keep)} left", flush=True)
    extra_scores = {f"probe: {PROBE_LABELS[label][0]}": (s["calib"], s["test"]) for label, s in scores.items()}
    base, outs = baselines(tabs, spec, delta, extra_scores)
    best = best_handcrafted({n: base[n] for n in HANDCRAFTED})
    ref = {"cost": outs[best]["cost"][0], "counts": bootstrap_counts(tabs["test"].Q, args.bootstrap, 0)}

    def run(name, features, **kw):
        t = time.perf_counter()
        v = judge(tabs, features, columns, spec, delta, args.seeds, config, ref=ref, **kw)
        print(f"  {name:<34} accuracy {pm(v['accuracy'])}  cost {pm(v['relative_cost'])}  "
              f"meets {v['seeds_meeting_target']}/{v['seeds']}  ({time.perf_counter() - t:.0f}s)", flush=True)
        return v

    res = {"features": {}, "learning_curve": {}, "tries": {}}
    if "features" not in args.skip:
        print("1. feature ablation", flush=True)
        res["features"]["all"] = run("all", BASE_FEATURES)
        for g, names in GROUPS.items():
            res["features"][f"without {g}"] = run(f"without {g}", [f for f in BASE_FEATURES if f not in names])
        for g, names in GROUPS.items():
            res["features"][f"only {g}"] = run(f"only {g}", names)
    if "learning_curve" not in args.skip:
        print("2. learning curve", flush=True)
        order = torch.randperm(tabs["train"].Q, generator=torch.Generator().manual_seed(0)).tolist()
        sizes = [n for n in (8, 16, 32, 64, 128) if n < tabs["train"].Q] + [tabs["train"].Q]
        for n in sizes:
            res["learning_curve"][f"n = {n}"] = run(f"n = {n}", BASE_FEATURES, train_idx=sorted(order[:n]))
    if "tries" not in args.skip:
        print("4. tries beyond token statistics", flush=True)
        res["tries"]["token statistics (the method)"] = res["features"].get("all") or run("all", BASE_FEATURES)
        res["tries"]["linear policy (no hidden layer)"] = run("linear policy", BASE_FEATURES, hidden=())
        res["tries"]["smaller MLP (one hidden layer of 16)"] = run("MLP 16", BASE_FEATURES, hidden=(16,))
        res["tries"]["exact-expectation gradient (no sampling)"] = run("exact gradient", BASE_FEATURES,
                                                                       estimator="exact")
        res["tries"]["+ running answer"] = run("+ running answer", BASE_FEATURES + TEXT_FEATURES)
        if args.probe:
            res["tries"]["+ probe (wrong)"] = run("+ probe (wrong)", BASE_FEATURES + [PROBE_FEATURE])
            res["tries"]["linear policy + probe (wrong)"] = run("linear + probe (wrong)", BASE_FEATURES + [PROBE_FEATURE],
                                                                hidden=())
            res["tries"]["+ running answer + probe (wrong)"] = run("+ running answer + probe (wrong)",
                                                                   BASE_FEATURES + TEXT_FEATURES + [PROBE_FEATURE])
            res["tries"]["linear policy on the probe (wrong) alone"] = run("linear, probe (wrong) alone",
                                                                           [PROBE_FEATURE], hidden=())
            res["tries"]["+ probe (rescue)"] = run("+ probe (rescue)", BASE_FEATURES + [RESCUE_FEATURE])
            res["tries"]["linear policy + probe (rescue)"] = run("linear + probe (rescue)",
                                                                 BASE_FEATURES + [RESCUE_FEATURE], hidden=())
            res["tries"]["linear policy on the probe (rescue) alone"] = run("linear, probe (rescue) alone",
                                                                            [RESCUE_FEATURE], hidden=())
    res["escalation"] = {sl: escalation_by_step(tabs[sl]) for sl in tabs}
    if args.probe:
        res["escalation_by_probe"] = {f"{sl}, probe ({label})": escalation_by_score(tabs[sl], scores[label][sl])
                                      for label in PROBE_LABELS for sl in tabs}

    out = Path(args.out) if args.out else tables / "ablations.md"
    result = {"meta": {"tables": str(tables), "target_relative": args.target_relative, "delta": delta,
                       "test_after": args.test_after, "dropped_shared_stories": dropped,
                       "seeds": args.seeds, "n": {sl: tabs[sl].Q for sl in tabs},
                       "command": " ".join(["python ablate.py", *(sys.argv[1:] if argv is None else argv)]),
                       "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, torch {torch.__version__}",
                       "seconds": time.perf_counter() - start},
              "test_target": target_of(spec, tabs["test"].large_correct),
              "baselines": base, "best_handcrafted": best, "probe": probe_info, **res}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(result), encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out} and {out.with_suffix('.json')} in {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    run_cli(main)
