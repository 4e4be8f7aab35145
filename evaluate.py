"""Stage 4 of stepwise model routing: score every router exactly on a test table (docs/DESIGN.md 5, 6).

Every router here is a one-way escalation rule, so each is scored exactly on the table from
rollout.py, with no LLM call:

- `small` (never escalate) and `large` (the large model alone, escalations[0]);
- `random`: escalate at each step with probability p, scored as the exact expectation
  (P(escalate at t) = p (1 - p)^(t-1)), swept over p;
- handcrafted confidence routers: escalate at the first drafted step whose `mean_logprob` or
  `min_logprob` is <= tau, or whose `mean_entropy` or `max_entropy` is >= tau, swept over tau
  (quantiles of the statistic on the test steps, plus the two ends: always / never);
- `oracle`: per question the cheapest correct outcome among escalating at any step, never
  escalating and the large model alone; where none is correct, never escalating;
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
  the test questions). kappa null (no threshold met the target on calibration) is the large
  model alone: all-large cost, no draft.

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
and the oracle included); see train_policy.py.

Run it (--policy / --calibration / --calib-data are optional; without them only the baselines
are scored):

    python evaluate.py --data results/gsm8k/test.jsonl --policy results/gsm8k/policy.pt \\
        --calibration results/gsm8k/calibration.json --calib-data results/gsm8k/calib.jsonl \\
        --out results/gsm8k/eval

It writes DIR/eval.json, DIR/eval.md (a paste-able table), DIR/tradeoff.png (accuracy
against relative cost for every method) and, with a calibration, DIR/escalation_steps.png.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from calibrate import (calibrate_scores, choose_threshold, chosen_point, format_kappa, load_calibration,
                       sha256, warn_pool)
from cli import UsageError, check_range, make_parser, plural, run_cli
from table import (Table, add_pricing_args, aggregate, check_overlap, first_crossing, outcome_columns,
                   route_outcomes, target_of)
from train_policy import FEATURE_NAMES, escalation_distribution, load_policy, load_table, policy_probs

# method -> (feature, sign): escalate at the first step with sign * stat >= sign * tau
HANDCRAFTED = {"mean_logprob": ("draft_mean_logprob", -1), "min_logprob": ("draft_min_logprob", -1),
               "mean_entropy": ("draft_mean_entropy", +1), "max_entropy": ("draft_max_entropy", +1)}
RANDOM_P = sorted({0.001, 0.002, 0.005, 0.01, 0.02, *[i / 20 for i in range(21)]})
LEVELS = (0.90, 0.95, 1.00)


# ----------------------------------------------------------------------------------------
# Routers -> per-question outcomes [K,Q] (correct, cost, small_tokens, large_tokens).
# ----------------------------------------------------------------------------------------
def threshold_grid(scores: torch.Tensor, mask: torch.Tensor, n_quantiles: int) -> torch.Tensor:
    """Quantiles of the scores on valid steps plus the ends: the minimum (escalate at step 1)
    and just above the maximum (never). Ascending, distinct."""
    values = scores[mask].double()
    if not len(values):
        return torch.tensor([0.0], dtype=torch.float64)
    q = torch.quantile(values, torch.linspace(0, 1, n_quantiles, dtype=torch.float64))
    top = torch.tensor([math.nextafter(values.max().item(), math.inf)], dtype=torch.float64)
    return torch.unique(torch.cat([q, values.min()[None], top]))


def random_outcomes(table: Table, ps) -> dict:
    """Exact expected outcomes of escalating at each step with probability p, [K,Q]."""
    p = torch.tensor(ps, dtype=torch.float64)[:, None, None].expand(-1, table.Q, table.T)
    p_esc, p_never = escalation_distribution(p, table.mask)
    cols = outcome_columns(table)
    return {k: (p_esc * v[:, :table.T]).sum(-1) + p_never * v[:, table.T] for k, v in cols.items()}


def oracle_route(table: Table) -> torch.Tensor:
    """[1,Q]: the cheapest correct outcome (escalate at t, never = T, large alone = T+1);
    never where none is correct."""
    cols = outcome_columns(table)
    valid = torch.cat([table.mask, torch.ones(table.Q, 2, dtype=torch.bool)], 1)
    cost = torch.where(valid & (cols["correct"] > 0), cols["cost"], math.inf)
    best = cost.argmin(1)
    return torch.where(torch.isinf(cost.min(1).values), table.T, best)[None]


def score_methods(table: Table, policy=None, kappa=None) -> dict:
    """method -> (knobs [K] list, outcomes dict of [K,Q])."""
    Q, T = table.Q, table.T
    methods = {"small": ([None], route_outcomes(table, torch.full((1, Q), T))),
               "large": ([None], route_outcomes(table, torch.full((1, Q), T + 1))),
               "random": (RANDOM_P, random_outcomes(table, RANDOM_P))}
    for name, (feature, sign) in HANDCRAFTED.items():
        score = sign * table.features[..., FEATURE_NAMES.index(feature)].double()
        grid = threshold_grid(score, table.mask, 49)
        methods[name] = ((sign * grid).tolist(), route_outcomes(table, first_crossing(score, table.mask, grid)))
    methods["oracle"] = ([None], route_outcomes(table, oracle_route(table)))
    if policy is not None:
        p = policy_probs(policy, table)
        grid = threshold_grid(p, table.mask, 101)
        grid = torch.unique(torch.cat([grid, torch.tensor([0.0] + ([kappa] if kappa is not None else []),
                                                          dtype=torch.float64)]))
        methods["policy"] = (grid.tolist(), route_outcomes(table, first_crossing(p, table.mask, grid)))
    return methods


# ----------------------------------------------------------------------------------------
# Every router calibrated on the calibration table with the policy's rule, target and delta
# (calibrate.py's functions), then measured on the test questions.
# ----------------------------------------------------------------------------------------
def method_scores(table: Table, name: str, policy=None) -> torch.Tensor:
    """The score a first-crossing router thresholds (escalate at the first step with score >=
    kappa): the policy's p, or sign * the statistic of a handcrafted router."""
    if name == "policy":
        return policy_probs(policy, table)
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
    return {"knob": None if i is None else ps[i], **chosen_point(table, swept, i, spec)}


def apply_knob(table: Table, name: str, knob, policy=None) -> dict:
    """Per-question outcomes [1,Q] of a calibrated router on a table (knob None: the large
    model alone)."""
    if knob is None:
        return route_outcomes(table, torch.full((1, table.Q), table.T + 1))
    if name == "random":
        return random_outcomes(table, [knob])
    kappa = torch.tensor([knob], dtype=torch.float64)
    return route_outcomes(table, first_crossing(method_scores(table, name, policy), table.mask, kappa))


def calibrated_point(test: Table, name: str, knob, calibration: dict, spec: dict, policy=None):
    """{"knob", "accuracy", "relative_cost", "large_share", "target", "meets_target", ...} on the
    test questions, and the per-question outcomes [1,Q]. A relative target is judged against
    the large model's accuracy on the test questions."""
    out = apply_knob(test, name, knob, policy)
    sc = aggregate(test, out)
    target = target_of(spec, test.large_correct)
    sign = HANDCRAFTED[name][1] if name in HANDCRAFTED else 1
    point = {"knob": None if knob is None else sign * knob,
             "accuracy": sc["accuracy"].item(), "relative_cost": sc["relative_cost"].item(),
             "large_share": sc["large_share"].item(), "target": target,
             "meets_target": sc["accuracy"].item() >= target - 1e-12,
             "calibration_accuracy": calibration["accuracy"],
             "calibration_relative_cost": calibration["relative_cost"],
             "calibration_target": calibration["target"], "calibration_met": calibration["met"]}
    return point, out


def calibrate_baselines(calib: Table, spec: dict, delta) -> dict:
    """method -> (knob in score units or None, calibration point) for random and the four
    handcrafted routers, each by the rule that chose the policy's kappa."""
    res = {"random": calibrate_random(calib, spec, delta)}
    for name in HANDCRAFTED:
        res[name] = calibrate_scores(calib, method_scores(calib, name), spec, delta)
    return {name: (r["knob"], {"accuracy": r["accuracy"], "relative_cost": r["relative_cost"],
                               "target": r["target"], "met": r["knob"] is not None})
            for name, r in res.items()}


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


def interval(samples: torch.Tensor):
    """Central 95% percentile interval; an infinite end ("never") becomes null."""
    lo, hi = torch.quantile(samples.double(), torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return [none_if_inf(lo), none_if_inf(hi)]


# ----------------------------------------------------------------------------------------
# Reports.
# ----------------------------------------------------------------------------------------
STYLE = {"small": ("s", "tab:blue"), "large": ("D", "tab:red"), "oracle": ("*", "gold"),
         "random": ("", "tab:gray"), "mean_logprob": ("", "tab:orange"), "min_logprob": ("", "tab:brown"),
         "mean_entropy": ("", "tab:pink"), "max_entropy": ("", "tab:olive"), "policy": ("", "tab:green")}


def frontier(points: list[dict]) -> list[dict]:
    """The points no other point of the same method beats in both accuracy and cost (cost no
    higher and accuracy no lower, one strictly), by ascending cost: a curve that only rises."""
    best, keep = -math.inf, []
    for p in sorted(points, key=lambda p: (p["relative_cost"], -p["accuracy"])):
        if p["accuracy"] > best + 1e-12:
            keep.append(p)
            best = p["accuracy"]
    return keep


def plot_tradeoff(result: dict, path: Path) -> None:
    """Each swept method as its frontier (chosen in hindsight on the test questions), each
    calibrated router as a marker, the target as a line; a calibrated point that misses its
    target on the test questions is drawn hollow and labelled so."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9.5, 5.2))
    for name, points in result["methods"].items():
        marker, color = STYLE.get(name, ("", None))
        if len(points) == 1:
            ax.scatter([points[0]["relative_cost"]], [points[0]["accuracy"]], marker=marker or "o",
                       s=120 if marker == "*" else 50, color=color, edgecolor="k", zorder=5, label=name)
        else:
            front = frontier(points)
            ax.plot([p["relative_cost"] for p in front], [p["accuracy"] for p in front], "-",
                    marker=".", ms=3, lw=2.2 if name == "policy" else 1.2, color=color,
                    label=f"{name} (frontier, hindsight)")
    calibrated = result.get("calibrated") or ({"policy": result["policy_calibrated"]}
                                              if result.get("policy_calibrated") else {})
    for i, (name, pt) in enumerate(calibrated.items()):
        if i == 0:
            ax.axhline(pt["target"], color="k", ls="--", lw=1, label=f"target {pt['target']:.3f}")
        color = STYLE.get(name, ("", None))[1]
        knob = "large alone" if pt["knob"] is None else f"{pt['knob']:.4g}"
        miss = not pt["meets_target"]
        ax.scatter([pt["relative_cost"]], [pt["accuracy"]], marker="X", s=170 if name == "policy" else 110,
                   facecolor="none" if miss else color, edgecolor=color if miss else "k",
                   linewidths=2 if miss else 1, zorder=6,
                   label=f"{name} calibrated ({knob}){' MISSES target' if miss else ''}")
    ax.set_xlabel("relative cost (sum of costs / all-large cost)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{Path(result['data']).name}: {plural(result['n'], 'question')}, "
                 f"{result['pricing']['unit']} pricing", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # off the points
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_escalation_steps(esc: torch.Tensor, table: Table, path: Path, kappa, data) -> None:
    """Where the calibrated policy escalates on the test table: questions (integer counts) per
    step, never, and (kappa null) the large model alone."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    T = table.T
    has_steps = table.n_steps > 0
    counts = [int(c) for c in torch.bincount(esc[has_steps], minlength=T + 2)[: T + 2].tolist()]
    labels = [str(t + 1) for t in range(T)] + ["never", "large alone"]
    if kappa is not None:
        counts, labels = counts[: T + 1], labels[: T + 1]
    fig, ax = plt.subplots(figsize=(max(6.5, 0.3 * len(counts) + 2), 3.5))
    ax.bar(range(len(counts)), counts, color=["tab:green"] * T + ["tab:gray", "tab:red"][: len(counts) - T])
    step = max(1, len(counts) // 20)
    ax.set_xticks(range(0, len(counts), step), labels[::step])
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step at which the calibrated policy escalates")
    ax.set_ylabel("questions")
    ax.set_title(f"{Path(data).name}, kappa {format_kappa(kappa)}: escalates on {sum(counts[:T])} of "
                 f"{plural(int(has_steps.sum()), 'question')} with steps", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fmt(x, digits=3):
    return "never" if x is None else f"{x:.{digits}f}"


def fmt_ci(ci):
    return "" if not ci else f" [{fmt(ci[0])}, {fmt(ci[1])}]"


def fmt_knob(k) -> str:
    return "large alone" if k is None else f"{k:.4g}"


def write_markdown(result: dict, path: Path) -> None:
    s = result["summary"]
    lines = [f"Command: `{result['command']}`", "",
             f"Data: `{result['data']}` ({plural(result['n'], 'question')}). Pool: small "
             f"`{result['pool']['small'].get('model')}`, large `{result['pool']['large'].get('model')}`. "
             f"Pricing: {result['pricing']['unit']}. Large accuracy {result['large_accuracy']:.3f}, "
             f"small {result['small_accuracy']:.3f} at relative cost {result['small_relative_cost']:.3f}.", ""]
    cal = result.get("policy_calibrated")
    calibrated = result.get("calibrated") or ({"policy": cal} if cal else {})
    if calibrated:
        spec = cal["target_spec"]
        kind, value = next(iter(spec.items()))
        lines += [f"Calibrated routers (each threshold chosen on the calibration questions "
                  f"`{result.get('calib_data') or cal.get('data', '')}` by the same rule, target "
                  f"{kind} {value}, delta {cal['delta']}; measured on the test questions):", "",
                  "| calibrated router | knob | accuracy | relative cost | large share | target | meets target | calib. accuracy | calib. cost |",
                  "|---|---:|---:|---:|---:|---:|:---:|---:|---:|"]
        for name, pt in calibrated.items():
            ci = pt.get("ci", {})
            lines.append(f"| {name} | {fmt_knob(pt['knob'])} | {pt['accuracy']:.3f}{fmt_ci(ci.get('accuracy'))} | "
                         f"{pt['relative_cost']:.3f}{fmt_ci(ci.get('relative_cost'))} | {pt['large_share']:.3f} | "
                         f"{pt['target']:.3f} | {'yes' if pt['meets_target'] else '**no**'} | "
                         f"{pt['calibration_accuracy']:.3f} | {pt['calibration_relative_cost']:.3f} |")
        cmp_ = result.get("policy_vs_best_handcrafted")
        if cmp_:
            lines += ["", f"Relative cost of the calibrated policy minus that of the best calibrated "
                          f"handcrafted router ({cmp_['baseline']}, chosen on the calibration questions): "
                          f"{cmp_['relative_cost_difference']:+.3f}"
                          + (f" (95% paired bootstrap interval [{cmp_['ci'][0]:+.3f}, {cmp_['ci'][1]:+.3f}])"
                             if cmp_.get("ci") else "") + "."]
        lines += [""]
    lines += ["Swept frontiers: every threshold of each method, **chosen in hindsight on the test questions** "
              "(no deployable router can pick its point this way):", "",
              "| method | points | best accuracy | frontier area | cost @90% large | cost @95% | cost @100% |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name, points in result["methods"].items():
        m = s[name]
        cells = [fmt(m[f"cost_at_{int(l * 100)}"]) + fmt_ci(m.get("ci", {}).get(f"cost_at_{int(l * 100)}"))
                 for l in LEVELS]
        lines.append(f"| {name} | {len(points)} | {max(p['accuracy'] for p in points):.3f} | "
                     f"{fmt(m['frontier_area'])} | " + " | ".join(cells) + " |")
    if result.get("bootstrap"):
        lines += ["", f"Brackets: 95% bootstrap intervals over questions ({result['bootstrap']['resamples']} resamples)."]
    lines += ["", "Frontier area: mean over relative cost from the small model's to 1 of the best accuracy the "
                  "method reaches at that cost or less. Cost @X%: lowest relative cost reaching X% of the large "
                  "model's accuracy."]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------
def build_parser():
    parser = make_parser(__doc__)
    parser.add_argument("--data", required=True, metavar="PATH", help="test table (schema-1 JSONL)")
    parser.add_argument("--policy", metavar="PATH", help="policy file from train_policy.py (optional)")
    parser.add_argument("--calibration", metavar="PATH", help="calibration.json from calibrate.py (needs --policy)")
    parser.add_argument("--calib-data", metavar="PATH",
                        help="the calibration table: calibrate every baseline router on it with the "
                             "policy's rule, target and delta, and report them beside the policy "
                             "(needs --calibration)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                        help="bootstrap resamples for 95%% intervals (0: none; default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--allow-overlap", action="store_true",
                        help="go on even if the test table shares questions with the policy's training "
                             "table or the calibration table")
    add_pricing_args(parser)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)
    check_range("--bootstrap", args.bootstrap, 0, 1_000_000)
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
    table = load_table(args.data, args)
    calib = load_table(args.calib_data, args) if args.calib_data else None
    earlier = [(f"{args.policy} (its training questions)", policy.meta.get("question_hashes") if policy else None),
               (f"{args.calibration} (its calibration questions)", cal.get("question_hashes") if cal else None),
               (f"{args.calib_data}", calib.hashes if calib else None)]
    check_overlap(table.hashes, args.data, earlier, args.allow_overlap)
    if calib is not None:
        check_overlap(calib.hashes, args.calib_data, earlier[:1], args.allow_overlap)
    if policy is not None:
        warn_pool(policy, table, args.data)
    if cal is not None and cal.get("pricing") not in (None, asdict(table.pricing)):
        print(f"warning: {args.calibration} was calibrated with pricing {cal['pricing']}, "
              f"evaluating with {asdict(table.pricing)}", file=sys.stderr)

    # ALGO LOGIC: every router's exact outcomes on the test table; the rest is metrics and reports
    methods = score_methods(table, policy, cal["kappa"] if cal else None)
    large_acc = table.large_correct.mean().item()
    small_rc = table.relative_cost(table.small_cost).item()
    counts = bootstrap_counts(table.Q, args.bootstrap, args.seed) if args.bootstrap else None
    boot_large = counts @ table.large_correct / table.Q if counts is not None else None

    result = {"command": " ".join(sys.argv if argv is None else ["evaluate.py", *argv]),
              "data": str(args.data), "n": table.Q, "pool": table.pool, "pricing": asdict(table.pricing),
              "policy": args.policy, "calibration": args.calibration, "calib_data": args.calib_data,
              "large_accuracy": large_acc, "small_accuracy": table.small_correct.mean().item(),
              "small_relative_cost": small_rc, "methods": {}, "summary": {}}
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
        esc = first_crossing(policy_probs(policy, table), table.mask,
                             torch.tensor([cal["kappa"]], dtype=torch.float64))[0] \
            if cal["kappa"] is not None else torch.full((table.Q,), table.T + 1)
        pc = {"kappa": cal["kappa"], "fallback": cal.get("fallback"), **pc, "target_spec": spec,
              "delta": cal["delta"],
              "escalation_step_counts": torch.bincount(
                  esc[table.n_steps > 0], minlength=table.T + 2)[: table.T + (1 if cal["kappa"] is not None else 2)].tolist()}
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
            for name, (knob, point) in calibrate_baselines(calib, spec, cal["delta"]).items():
                calibrated[name], outs[name] = calibrated_point(table, name, knob, point, spec)
            result["calibrated"] = calibrated
            best = best_handcrafted(calibrated)
            diff = pc["relative_cost"] - calibrated[best]["relative_cost"]
            comparison = {"baseline": best, "relative_cost_difference": diff}
            if counts is not None:
                denom = counts @ table.large_cost
                boot = (counts @ outs["policy"]["cost"][0] - counts @ outs[best]["cost"][0]) / denom
                comparison["ci"] = interval(boot)
            result["policy_vs_best_handcrafted"] = comparison
    if counts is not None:
        result["bootstrap"] = {"resamples": args.bootstrap, "seed": args.seed, "level": 0.95}
    seconds = time.perf_counter() - start

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    write_markdown(result, out_dir / "eval.md")
    plot_tradeoff(result, out_dir / "tradeoff.png")
    if cal is not None:
        plot_escalation_steps(esc, table, out_dir / "escalation_steps.png", cal["kappa"], args.data)
    print((out_dir / "eval.md").read_text(encoding="utf-8"))
    print(f"scored {plural(table.Q, 'question')}, {plural(sum(len(v) for v in result['methods'].values()), 'router point')}"
          f"{f', {args.bootstrap} bootstrap resamples' if counts is not None else ''} in {seconds:.1f}s; "
          f"wrote {out_dir}/eval.json, eval.md, tradeoff.png{', escalation_steps.png' if cal else ''}")
    return 0


if __name__ == "__main__":
    run_cli(main)
