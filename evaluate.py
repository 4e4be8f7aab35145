"""Stage 4 of stepwise model routing: score every router exactly on a test table (docs/DESIGN.md 5, 6).

Run it (--policy / --calibration / --calib-data are optional; without them only the baselines
are scored):

    python evaluate.py --data results/gsm8k/test.jsonl --policy results/gsm8k/policy.pt \\
        --calibration results/gsm8k/calibration.json --calib-data results/gsm8k/calib.jsonl \\
        --out results/gsm8k/eval

It writes DIR/eval.json, DIR/eval.md (a paste-able table), DIR/tradeoff.png (accuracy
against relative cost for every method) and, with a calibration, DIR/escalation_steps.png
(report.py writes those).

Every router here is a one-way escalation rule, so each is scored exactly on the table from
rollout.py, with no LLM call:

- `small` (never escalate) and `large` (the large model alone, escalations[0]);
- `random`: escalate at each step with probability p, scored as the exact expectation
  (P(escalate at t) = p (1 - p)^(t-1)), swept over p;
- handcrafted confidence routers: escalate at the first drafted step whose `mean_logprob` or
  `min_logprob` is <= tau, or whose `mean_entropy` or `max_entropy` is >= tau, swept over tau
  (quantiles of the statistic on the test steps, plus the two ends: always / never; every
  tau, calibrated ones too, lies strictly between two values of the statistic, never on one);
- `oracle`: per question the cheapest correct outcome among escalating at any step, never
  escalating and the large model alone; where none is correct, never escalating;
- `prm` (where every question of the table has process-reward-model scores, from rollout.py
  --prm or --rescore): escalate at the first drafted step whose PRM score is strictly below
  tau (a step scoring exactly tau is kept: RSD's "keep while score >= 0.7" is tau = 0.7, one
  point of the sweep), swept over tau; its cost includes the PRM's (DESIGN section 2: 2 *
  pool.prm.params per token of the question and steps 1..t it reads, t the escalation step,
  every step where it never escalates; --price-prm with dollar pricing, without which the
  PRM methods are skipped). The large model alone never consults the PRM;
- `policy+prm` (--policy-prm PATH: a policy trained with train_policy.py --with-prm): the
  policy with the PRM's scores among its features, swept over kappa, its cost including the
  PRM's;
- `policy`: the trained policy's threshold rule (escalate at the first t with p >= kappa),
  swept over kappa, and the calibrated kappa from calibration.json.

Metrics. Accuracy; relative cost (sum of costs / sum of all-large costs over the test
questions); large share (share of generated tokens written by the large model). Per method:
- the **frontier area**: with f(c) = the best accuracy among the method's points whose
  relative cost is <= c (a step function; 0 below its cheapest point), the area under f over
  c from the small model's relative cost c0 to 1, divided by (1 - c0). It is in accuracy
  units: the mean accuracy the method offers over the budget range between the small and
  the large model. A single point (a, c) has area a * (1 - c) / (1 - c0).
- **cost at 90/95/100%**: the lowest relative cost of a point whose accuracy is at least
  that share of the large model's accuracy (null / "never" if no point reaches it).
- the calibrated point: kappa, accuracy, relative cost, and whether it meets its target on
  the test questions (a relative target is re-judged against the large model's accuracy on
  the test questions). kappa null (no threshold met the target on calibration, or every one
  that did cost more than the large model alone) is the large model alone: all-large cost,
  no draft.

Calibrated baselines (`--calib-data TABLE`): the swept frontiers pick each method's point in
hindsight on the test questions, which no deployed router can do. So every handcrafted router
and `random` is also calibrated on the calibration table by the rule that chose the policy's
kappa (calibrate.py's choose_threshold, with calibration.json's target and delta), and
measured on the test questions: eval.json `calibrated` (keyed by method, `policy` included),
the first table of eval.md, and markers on the plot (hollow: misses its target on the test
questions). `policy_vs_best_handcrafted` is the relative-cost difference between the
calibrated policy and the best calibrated handcrafted router (the cheapest that met the
target on calibration, else the most accurate there), with a 95% paired bootstrap interval.
The test table may not share questions with the policy's training table, calibration.json's
questions or --calib-data (`--allow-overlap` to go on anyway).
`--bootstrap N` resamples the test questions N times (vectorised) for 95% intervals of the
calibrated point and of every method's cost at 90/95/100%.

A question with no small steps gets the small outcome under every router (the large baseline
and the oracle included); see table.py.

"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from calibrate import (calibrate_scores, choose_threshold, chosen_point, load_calibration, prefer_large,
                       sha256, warn_pool)
from cli import UsageError, check_range, make_parser, plural, run_cli
from report import plot_escalation_steps, plot_tradeoff, write_markdown
from table import (Table, add_pricing_args, aggregate, between_scores, check_overlap, first_crossing,
                   outcome_columns, route_outcomes, select, target_of, with_prm_cost)
from train_policy import (FEATURE_NAMES, decides_before_draft, escalation_distribution, load_policy, load_table,
                          policy_probs, policy_view, table_routes, uses_hidden, uses_prm)

# method -> (feature, sign): escalate at the first step with sign * stat >= sign * tau
HANDCRAFTED = {"mean_logprob": ("draft_mean_logprob", -1), "min_logprob": ("draft_min_logprob", -1),
               "mean_entropy": ("draft_mean_entropy", +1), "max_entropy": ("draft_max_entropy", +1)}
RANDOM_P = sorted({0.001, 0.002, 0.005, 0.01, 0.02, *[i / 20 for i in range(21)]})
LEVELS = (0.90, 0.95, 1.00)
RSD_TAU = 0.7          # RSD keeps a drafted step while the PRM scores it >= 0.7
PRM_METHODS = ("prm", "policy+prm")   # routers that consult the PRM: scored with its cost


def prm_kappa(tau: float) -> float:
    """The first-crossing threshold of the `prm` router on the score -prm_score: "escalate
    where prm_score < tau" is "-prm_score >= kappa" with kappa the next double above -tau."""
    return math.nextafter(-tau, math.inf)


def prm_tau(kappa: float) -> float:
    """Inverse of prm_kappa: -s >= kappa  <=>  s <= -kappa  <=>  s < nextafter(-kappa, inf)."""
    return math.nextafter(-kappa, math.inf)


def has_prm_router(table: Table) -> bool:
    """Every question has PRM scores and the PRM's tokens have a price."""
    return table.prm_score is not None and table.prm_price is not None


def scored_table(table: Table, name: str, policy=None) -> Table:
    """The table a router is scored on: with the PRM's cost for the routers that consult it
    (prm, policy+prm, and a --policy trained --with-prm), and for a policy that decides before
    the first draft, with that decision as column 0 (train_policy.policy_view)."""
    if name == "policy" and policy is not None:
        table = policy_view(table, policy)
    prm = name in PRM_METHODS or (name == "policy" and policy is not None and uses_prm(policy))
    return with_prm_cost(table) if prm else table


# ----------------------------------------------------------------------------------------
# Routers -> per-question outcomes [K,Q] (correct, cost, small_tokens, large_tokens).
# ----------------------------------------------------------------------------------------
def threshold_grid(scores: torch.Tensor, mask: torch.Tensor, n_quantiles: int) -> torch.Tensor:
    """The routes at quantiles of the scores on valid steps plus the ends (escalate at step
    1; never), each threshold moved strictly between two scores with the same route
    (table.between_scores). Ascending, distinct."""
    values = scores[mask].double()
    if not len(values):
        return torch.tensor([0.0], dtype=torch.float64)
    q = torch.quantile(values, torch.linspace(0, 1, n_quantiles, dtype=torch.float64))
    ends = torch.tensor([-math.inf, math.inf], dtype=torch.float64)
    return torch.unique(between_scores(scores, mask, torch.cat([q, ends])))


def random_outcomes(table: Table, ps) -> dict:
    """Exact expected outcomes of escalating at each step with probability p, [K,Q]."""
    p = torch.tensor(ps, dtype=torch.float64)[:, None, None].expand(-1, table.Q, table.T)
    p_esc, p_never = escalation_distribution(p, table.mask)
    cols = outcome_columns(table)
    return {k: (p_esc * v[:, :table.T]).sum(-1) + p_never * v[:, table.T] for k, v in cols.items()}


def oracle_route(table: Table, columns=None) -> torch.Tensor:
    """[1,Q]: the cheapest correct outcome (escalate at t, never = T, large alone = T+1);
    never where none is correct. `columns`: the outcomes it may choose from (default all)."""
    cols = outcome_columns(table)
    valid = torch.cat([table.mask, torch.ones(table.Q, 2, dtype=torch.bool)], 1)
    if columns is not None:
        allowed = torch.zeros(table.T + 2, dtype=torch.bool)
        allowed[list(columns)] = True
        valid = valid & allowed
    cost = torch.where(valid & (cols["correct"] > 0), cols["cost"], math.inf)
    best = cost.argmin(1)
    return torch.where(torch.isinf(cost.min(1).values), table.T, best)[None]


def score_methods(table: Table, policy=None, kappa=None, policy_prm=None) -> dict:
    """method -> (knobs [K] list, outcomes dict of [K,Q]); `prm` where the table has PRM
    scores (has_prm_router), `policy+prm` with policy_prm."""
    Q, T = table.Q, table.T
    methods = {"small": ([None], route_outcomes(table, torch.full((1, Q), T))),
               "large": ([None], route_outcomes(table, torch.full((1, Q), T + 1))),
               "random": (RANDOM_P, random_outcomes(table, RANDOM_P))}
    for name, (feature, sign) in HANDCRAFTED.items():
        score = sign * table.features[..., FEATURE_NAMES.index(feature)].double()
        grid = threshold_grid(score, table.mask, 49)
        methods[name] = ((sign * grid).tolist(), route_outcomes(table, first_crossing(score, table.mask, grid)))
    methods["oracle"] = ([None], route_outcomes(table, oracle_route(table)))
    if has_prm_router(table):
        score = method_scores(table, "prm")
        grid = torch.unique(torch.cat([threshold_grid(score, table.mask, 49),
                                       torch.tensor([prm_kappa(RSD_TAU)], dtype=torch.float64)]))
        methods["prm"] = ([prm_tau(k) for k in grid.tolist()],
                          route_outcomes(with_prm_cost(table), first_crossing(score, table.mask, grid)))
    if policy_prm is not None:
        p = policy_probs(policy_prm, table)
        grid = torch.unique(torch.cat([threshold_grid(p, table.mask, 101), torch.zeros(1, dtype=torch.float64)]))
        methods["policy+prm"] = (grid.tolist(), route_outcomes(with_prm_cost(table),
                                                               first_crossing(p, table.mask, grid)))
    if policy is not None:
        tab = scored_table(table, "policy", policy)
        p = policy_probs(policy, tab)
        grid = threshold_grid(p, tab.mask, 101)
        grid = torch.unique(torch.cat([grid, torch.tensor([0.0] + ([kappa] if kappa is not None else []),
                                                          dtype=torch.float64)]))
        methods["policy"] = (grid.tolist(), route_outcomes(tab, first_crossing(p, tab.mask, grid)))
    return methods


# ----------------------------------------------------------------------------------------
# Every router calibrated on the calibration table with the policy's rule, target and delta
# (calibrate.py's functions), then measured on the test questions.
# ----------------------------------------------------------------------------------------
def method_scores(table: Table, name: str, policy=None) -> torch.Tensor:
    """The score a first-crossing router thresholds (escalate at the first step with score >=
    kappa): the policy's p (policy or policy+prm), -prm_score (prm; see prm_kappa), or sign *
    the statistic of a handcrafted router."""
    if name in ("policy", "policy+prm"):
        return policy_probs(policy, table)
    if name == "prm":
        return -table.prm_score
    feature, sign = HANDCRAFTED[name]
    return sign * table.features[..., FEATURE_NAMES.index(feature)].double()


def calibrate_random(table: Table, spec: dict, delta) -> dict:
    """The random router calibrated like the others: knobs p from 1 (always escalate, the most
    conservative) down to 0, the same choose_threshold()."""
    ps = sorted(RANDOM_P, reverse=True)
    out = random_outcomes(table, ps)
    swept = aggregate(table, out)
    i = choose_threshold(swept["accuracy"], swept["relative_cost"], lambda a, b: out["correct"][a:b],
                         table.large_correct, spec, delta)
    met, i = i is not None, prefer_large(i, swept["relative_cost"])
    return {"knob": None if i is None else ps[i], "met": met,
            **chosen_point(table, None if i is None else random_outcomes(table, [ps[i]]), spec)}


def apply_knob(table: Table, name: str, knob, policy=None, scores=None) -> dict:
    """Per-question outcomes [1,Q] of a calibrated router on a table (knob None: the large
    model alone). `scores` [Q,T]: the first-crossing router's scores where the caller has them
    (ablate.py's experimental routers, or scores it already computed); else method_scores()'s."""
    if knob is None:
        return route_outcomes(table, torch.full((1, table.Q), table.T + 1))
    if name == "random":
        return random_outcomes(table, [knob])
    kappa = torch.tensor([knob], dtype=torch.float64)
    table = scored_table(table, name, policy)
    scores = method_scores(table, name, policy) if scores is None else scores
    return route_outcomes(table, first_crossing(scores, table.mask, kappa))


def calibration_summary(r: dict) -> dict:
    """What calibrated_point() keeps of a calibration (calibrate_scores' result)."""
    return {"accuracy": r["accuracy"], "relative_cost": r["relative_cost"], "target": r["target"],
            "met": r["met"]}


def calibrated_point(test: Table, name: str, knob, calibration: dict, spec: dict, policy=None,
                     scores=None):
    """{"knob", "accuracy", "relative_cost", "large_share", "target", "meets_target", ...} on the
    test questions, and the per-question outcomes [1,Q]. A relative target is judged against
    the large model's accuracy on the test questions."""
    out = apply_knob(test, name, knob, policy, scores)
    sc = aggregate(test, out)
    target = target_of(spec, test.large_correct)
    sign = HANDCRAFTED[name][1] if name in HANDCRAFTED else 1
    shown = None if knob is None else prm_tau(knob) if name == "prm" else sign * knob
    point = {"knob": shown,
             "accuracy": sc["accuracy"].item(), "relative_cost": sc["relative_cost"].item(),
             "large_share": sc["large_share"].item(), "target": target,
             "meets_target": sc["accuracy"].item() >= target - 1e-12,
             "calibration_accuracy": calibration["accuracy"],
             "calibration_relative_cost": calibration["relative_cost"],
             "calibration_target": calibration["target"], "calibration_met": calibration["met"]}
    return point, out


def calibrate_baselines(calib: Table, spec: dict, delta, policy_prm=None) -> dict:
    """method -> (knob in score units or None, calibration point) for random, the four
    handcrafted routers and, where the calibration table has PRM scores, prm and policy+prm,
    each by the rule that chose the policy's kappa (the PRM routers with the PRM's cost)."""
    res = {"random": calibrate_random(calib, spec, delta)}
    names = list(HANDCRAFTED) + (["prm"] if has_prm_router(calib) else []) \
        + (["policy+prm"] if policy_prm is not None and has_prm_router(calib) else [])
    for name in names:
        res[name] = calibrate_scores(scored_table(calib, name), method_scores(calib, name, policy_prm),
                                     spec, delta)
    return {name: (r["knob"], calibration_summary(r)) for name, r in res.items()}


def best_handcrafted(calibrated: dict) -> str:
    """The best calibrated handcrafted router, judged on the calibration questions only: the
    cheapest among those that met the target there, else the most accurate."""
    names = [n for n in HANDCRAFTED if n in calibrated]
    met = [n for n in names if calibrated[n]["calibration_met"]]
    if met:
        return min(met, key=lambda n: calibrated[n]["calibration_relative_cost"])
    return max(names, key=lambda n: calibrated[n]["calibration_accuracy"])


# ----------------------------------------------------------------------------------------
# Metrics of a method's points.
# ----------------------------------------------------------------------------------------
def frontier_area(cost, accuracy, c0: float) -> float | None:
    """Area under f(c) = max accuracy of points with cost <= c, for c in [c0, 1], over (1 - c0)."""
    if not 1 - c0 > 1e-12:
        return None
    pts = sorted(zip(map(float, cost), map(float, accuracy)))
    area, best, prev = 0.0, 0.0, c0
    for c, a in pts + [(1.0, 0.0)]:
        c = min(max(c, c0), 1.0)
        area += best * (c - prev)
        prev, best = c, max(best, a)
    return area / (1 - c0)


def cost_to_reach(cost: torch.Tensor, accuracy: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """Lowest cost of a point with accuracy >= level; inf where none. cost/accuracy [...,K],
    level [...] -> [...]."""
    ok = accuracy >= level[..., None] - 1e-12
    return torch.where(ok, cost, math.inf).min(-1).values


def none_if_inf(x: float):
    return None if math.isinf(x) or math.isnan(x) else x


def bootstrap_counts(Q: int, n: int, seed: int) -> torch.Tensor:
    """[n,Q] how often each question is drawn in each of n resamples with replacement."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(Q, (n, Q), generator=gen)
    return torch.zeros(n, Q, dtype=torch.float64).scatter_add_(1, idx, torch.ones(n, Q, dtype=torch.float64))


def boot_scores(counts, table: Table, out: dict):
    """Resampled accuracy and relative cost [N,K] of per-question outcomes [K,Q]."""
    acc = counts @ out["correct"].t() / table.Q
    cost = (counts @ out["cost"].t()) / (counts @ table.large_cost)[:, None]
    return acc, cost


def paired_cost_interval(counts, table: Table, cost_a: torch.Tensor, cost_b: torch.Tensor):
    """95% paired bootstrap interval of router a's relative cost minus router b's, from their
    per-question costs [Q] on the same resamples `counts` (bootstrap_counts)."""
    return interval((counts @ cost_a - counts @ cost_b) / (counts @ table.large_cost))


def recalibrated_interval(calib: Table, test: Table, spec: dict, delta, policy, n: int, seed: int) -> dict:
    """The policy's relative cost minus the best calibrated handcrafted router's with the
    calibration resampled too: in each of n resamples the calibration questions are drawn with
    replacement, the policy and every handcrafted router are calibrated again on the draw (the
    best router chosen again on it), and the test questions are drawn with replacement. So the
    interval also holds the luck of which calibration questions there were, which the paired
    interval (calibrated thresholds held fixed) leaves out. Also: how often the policy's
    recalibration falls back to the large model alone."""
    names = ["policy", *HANDCRAFTED]
    views = {name: scored_table(calib, name, policy) for name in names}
    scores = {name: method_scores(views[name], name, policy) for name in names}
    cal_counts, test_counts = bootstrap_counts(calib.Q, n, seed + 1), bootstrap_counts(test.Q, n, seed + 2)
    applied, diffs, fallback = {}, [], 0

    def test_cost(name, knob):   # per-question costs on the test table, once per distinct knob
        if (name, knob) not in applied:
            applied[(name, knob)] = apply_knob(test, name, knob, policy)["cost"][0]
        return applied[(name, knob)]
    for b in range(n):
        idx = torch.repeat_interleave(torch.arange(calib.Q), cal_counts[b].long())
        chosen = {}
        for name in names:
            r = calibrate_scores(select(views[name], idx), scores[name][idx], spec, delta)
            chosen[name] = (r["knob"], {"calibration_met": r["met"], "calibration_accuracy": r["accuracy"],
                                        "calibration_relative_cost": r["relative_cost"]})
        best = best_handcrafted({name: point for name, (_, point) in chosen.items() if name != "policy"})
        fallback += chosen["policy"][0] is None
        w = test_counts[b]
        diffs.append((w @ test_cost("policy", chosen["policy"][0]) - w @ test_cost(best, chosen[best][0]))
                     / (w @ test.large_cost))
    return {"ci": interval(torch.stack(diffs)), "resamples": n, "policy_large_alone_share": fallback / n}


def interval(samples: torch.Tensor):
    """Central 95% percentile interval; an infinite end ("never") becomes null."""
    lo, hi = torch.quantile(samples.double(), torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return [none_if_inf(lo), none_if_inf(hi)]


# ----------------------------------------------------------------------------------------
def build_parser():
    parser = make_parser(__doc__)
    parser.add_argument("--data", required=True, metavar="PATH", help="test table (schema-1 JSONL)")
    parser.add_argument("--policy", metavar="PATH", help="policy file from train_policy.py (optional)")
    parser.add_argument("--policy-prm", metavar="PATH",
                        help="a second policy, trained with train_policy.py --with-prm (the PRM's "
                             "scores among its features): method policy+prm, calibrated on "
                             "--calib-data like the baselines (needs a table with PRM scores)")
    parser.add_argument("--calibration", metavar="PATH", help="calibration.json from calibrate.py (needs --policy)")
    parser.add_argument("--calib-data", metavar="PATH",
                        help="the calibration table: calibrate every baseline router on it with the "
                             "policy's rule, target and delta, and report them beside the policy "
                             "(needs --calibration)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                        help="bootstrap resamples for 95%% intervals (0: none; default 1000)")
    parser.add_argument("--recalibrate", type=int, default=200, metavar="N",
                        help="with --calib-data: resamples of the interval of policy minus the best "
                             "calibrated handcrafted router that also draws the calibration questions and "
                             "calibrates every router again in each (0: none; default 200)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--allow-overlap", action="store_true",
                        help="go on even if the test table shares questions with the policy's training "
                             "table or the calibration table")
    parser.add_argument("--drop-shared-stories", metavar="TABLE",
                        help="score only the test questions whose story (data.story_key: the text before "
                             "the final question sentence, numbers masked) no question of TABLE (e.g. the "
                             "training table) shares; calibration is unchanged")
    add_pricing_args(parser)
    return parser


def unshared(table: Table, path, others_path) -> Table:
    """--drop-shared-stories: the test table without the questions whose story a question of
    `others_path` shares (one line saying how many)."""
    from data import shares_story
    from table import read_table
    records = read_table(path)
    shared = shares_story([r["question"] for r in records], [r["question"] for r in read_table(others_path)])
    keep = [i for i, s in enumerate(shared) if not s]
    if not keep:
        raise UsageError(f"--drop-shared-stories {others_path}: every question of {path} shares a story with it")
    print(f"--drop-shared-stories: {sum(shared)} of {len(records)} questions of {path} share a story with "
          f"{others_path} and are left out", file=sys.stderr)
    return select(table, keep)


def prm_policy(args, table: Table, calib):
    """The --policy-prm policy, or None (with a warning) where the test table cannot score it;
    and a warning where the PRM routers are scored on the test table but not calibrated."""
    if table.prm_score is not None and table.prm_price is None:
        print(f"warning: {args.data} has PRM scores but dollar pricing has no --price-prm: "
              f"the prm methods are skipped", file=sys.stderr)
    elif has_prm_router(table) and calib is not None and not has_prm_router(calib):
        print(f"warning: {args.calib_data} has no PRM scores on every question: the prm methods "
              f"are scored on the test table but not calibrated", file=sys.stderr)
    if not args.policy_prm:
        return None
    policy = load_policy(args.policy_prm)
    check_overlap(table.hashes, args.data, [(f"{args.policy_prm} (its training questions)",
                                             policy.meta.get("question_hashes"))], args.allow_overlap)
    if not uses_prm(policy):
        raise UsageError(f"--policy-prm {args.policy_prm}: the policy reads none of the PRM's "
                         f"features (train it with train_policy.py --with-prm)")
    if uses_hidden(policy):
        raise UsageError(f"--policy-prm {args.policy_prm}: a policy+prm that also reads the hidden "
                         f"state is not supported here; evaluate it as --policy")
    if not has_prm_router(table):
        print(f"warning: {args.data} has no PRM scores on every question (rollout.py --prm / "
              f"--rescore), or they have no price: policy+prm is skipped", file=sys.stderr)
        return None
    warn_pool(policy, table, args.data)
    return policy


def main(argv=None):
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)
    check_range("--bootstrap", args.bootstrap, 0, 1_000_000)
    check_range("--recalibrate", args.recalibrate, 0, 100_000)
    if args.calibration and not args.policy:
        raise UsageError("--calibration needs --policy (the policy it was calibrated for)")
    if args.calib_data and not args.calibration:
        raise UsageError("--calib-data needs --calibration (its target and delta calibrate the baselines)")
    start = time.perf_counter()

    policy = load_policy(args.policy) if args.policy else None
    cal = load_calibration(args.calibration) if args.calibration else None
    if cal is not None and cal["policy_sha256"] != sha256(args.policy):
        raise UsageError(f"{args.calibration} was made for policy {cal['policy']} "
                         f"(sha256 {cal['policy_sha256'][:12]}...), not for {args.policy}")
    table = load_table(args.data, args, policy)   # with the hidden state, for a policy that reads it
    if args.drop_shared_stories:
        table = unshared(table, args.data, args.drop_shared_stories)
    calib = load_table(args.calib_data, args, policy) if args.calib_data else None
    earlier = [(f"{args.policy} (its training questions)", policy.meta.get("question_hashes") if policy else None),
               (f"{args.policy} (its probe data)", policy.meta.get("probe_data_hashes") if policy else None),
               (f"{args.calibration} (its calibration questions)", cal.get("question_hashes") if cal else None),
               (f"{args.calib_data}", calib.hashes if calib else None)]
    check_overlap(table.hashes, args.data, earlier, args.allow_overlap)
    if calib is not None:
        check_overlap(calib.hashes, args.calib_data, earlier[:2], args.allow_overlap)
    if policy is not None:
        warn_pool(policy, table, args.data)
        if uses_prm(policy) and not has_prm_router(table):
            raise UsageError(f"--policy {args.policy} reads the PRM's scores, which {args.data} lacks "
                             f"(or, with dollar pricing, has no --price-prm)")
    policy_prm = prm_policy(args, table, calib)
    if cal is not None and cal.get("pricing") not in (None, asdict(table.pricing)):
        print(f"warning: {args.calibration} was calibrated with pricing {cal['pricing']}, "
              f"evaluating with {asdict(table.pricing)}", file=sys.stderr)

    # ALGO LOGIC: every router's exact outcomes on the test table; the rest is metrics and reports
    methods = score_methods(table, policy, cal["kappa"] if cal else None, policy_prm)
    large_acc = table.large_correct.mean().item()
    small_rc = table.relative_cost(table.small_cost).item()
    counts = bootstrap_counts(table.Q, args.bootstrap, args.seed) if args.bootstrap else None
    boot_large = counts @ table.large_correct / table.Q if counts is not None else None

    result = {"command": " ".join(sys.argv if argv is None else ["evaluate.py", *argv]),
              "data": str(args.data), "n": table.Q, "pool": table.pool, "pricing": asdict(table.pricing),
              "policy": args.policy, "calibration": args.calibration, "calib_data": args.calib_data,
              "large_accuracy": large_acc, "small_accuracy": table.small_correct.mean().item(),
              "small_relative_cost": small_rc, "methods": {}, "summary": {},
              **({"drop_shared_stories": args.drop_shared_stories} if args.drop_shared_stories else {})}
    for name, (knobs, out) in methods.items():
        sc = aggregate(table, out)
        result["methods"][name] = [
            {"knob": k, "accuracy": a, "relative_cost": c, "large_share": s}
            for k, a, c, s in zip(knobs, sc["accuracy"].tolist(), sc["relative_cost"].tolist(),
                                  sc["large_share"].tolist())]
        summary = {"frontier_area": frontier_area(sc["relative_cost"], sc["accuracy"], small_rc)}
        for level in LEVELS:
            summary[f"cost_at_{int(level * 100)}"] = none_if_inf(
                cost_to_reach(sc["relative_cost"], sc["accuracy"], torch.tensor(level * large_acc, dtype=torch.float64)).item())
        if counts is not None:
            acc_b, cost_b = boot_scores(counts, table, out)
            summary["ci"] = {f"cost_at_{int(l * 100)}": interval(cost_to_reach(cost_b, acc_b, l * boot_large))
                             for l in LEVELS}
        result["summary"][name] = summary

    if cal is not None:
        # The calibrated policy (kappa null: the large model alone) on the test questions.
        spec = cal["target_spec"]
        pc, out = calibrated_point(table, "policy", cal["kappa"], cal, spec, policy)
        view = scored_table(table, "policy", policy)   # routes as the policy sees them, then as the table's
        esc = table_routes(first_crossing(policy_probs(policy, view), view.mask,
                                          torch.tensor([cal["kappa"]], dtype=torch.float64))[0], view) \
            if cal["kappa"] is not None else torch.full((table.Q,), table.T + 1)
        whole = cal["kappa"] is None or decides_before_draft(policy)   # "large alone" is one of its routes
        pc = {"kappa": cal["kappa"], "fallback": cal.get("fallback"), **pc, "target_spec": spec,
              "delta": cal["delta"],
              "escalation_step_counts": torch.bincount(
                  esc[table.n_steps > 0], minlength=table.T + 2)[: table.T + (2 if whole else 1)].tolist()}
        outs = {"policy": out}
        if counts is not None:
            acc_b, cost_b = boot_scores(counts, table, out)
            kind, value = next(iter(spec.items()))
            target_b = value * boot_large if kind == "relative" else torch.full_like(boot_large, pc["target"])
            pc["ci"] = {"accuracy": interval(acc_b[:, 0]), "relative_cost": interval(cost_b[:, 0])}
            pc["meets_target_share"] = (acc_b[:, 0] >= target_b - 1e-12).double().mean().item()
        result["policy_calibrated"] = pc
        if calib is not None:
            # Every baseline calibrated on the calibration table, by the same rule, target and delta.
            calibrated = {"policy": pc}
            for name, (knob, point) in calibrate_baselines(calib, spec, cal["delta"], policy_prm).items():
                if name not in methods:      # scores on the calibration table only
                    continue
                calibrated[name], outs[name] = calibrated_point(table, name, knob, point, spec,
                                                                policy_prm if name == "policy+prm" else None)
            result["calibrated"] = calibrated
            best = best_handcrafted(calibrated)
            diff = pc["relative_cost"] - calibrated[best]["relative_cost"]
            comparison = {"baseline": best, "relative_cost_difference": diff}
            if counts is not None:
                comparison["ci"] = paired_cost_interval(counts, table, outs["policy"]["cost"][0],
                                                        outs[best]["cost"][0])
            if args.recalibrate:
                comparison["recalibrated"] = recalibrated_interval(calib, table, spec, cal["delta"], policy,
                                                                   args.recalibrate, args.seed)
            result["policy_vs_best_handcrafted"] = comparison
    if counts is not None:
        result["bootstrap"] = {"resamples": args.bootstrap, "seed": args.seed, "level": 0.95}
    seconds = time.perf_counter() - start

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    write_markdown(result, out_dir / "eval.md", LEVELS)
    plot_tradeoff(result, out_dir / "tradeoff.png")
    if cal is not None:
        plot_escalation_steps(esc, table, out_dir / "escalation_steps.png", cal["kappa"], args.data,
                              before_draft=decides_before_draft(policy))
    print((out_dir / "eval.md").read_text(encoding="utf-8"))
    print(f"scored {plural(table.Q, 'question')}, {plural(sum(len(v) for v in result['methods'].values()), 'router point')}"
          f"{f', {args.bootstrap} bootstrap resamples' if counts is not None else ''} in {seconds:.1f}s; "
          f"wrote {out_dir}/eval.json, eval.md, tradeoff.png{', escalation_steps.png' if cal else ''}")
    return 0


if __name__ == "__main__":
    run_cli(main)
