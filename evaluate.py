"""Stage 4 of stepwise model routing: score every router exactly on a test table (DESIGN.md 5, 6).

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
  the test questions).
`--bootstrap N` resamples the test questions N times (vectorised) for 95% intervals of the
calibrated point and of every method's cost at 90/95/100%.

A question with no small steps gets the small outcome under every router (the large baseline
and the oracle included); see train_policy.py.

Run it (--policy / --calibration are optional; without them only the baselines are scored):

    python evaluate.py --data results/gsm8k/test.jsonl --policy results/gsm8k/policy.pt \\
        --calibration results/gsm8k/calibration.json --out results/gsm8k/eval

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

from calibrate import (aggregate, first_crossing, format_kappa, load_calibration, route_outcomes,
                       sha256, warn_pool)
from rollout import UsageError, check_range, make_parser, run_cli
from train_policy import (FEATURE_NAMES, Table, add_pricing_args, escalation_distribution,
                          load_policy, load_table, policy_probs)

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
    never = {"correct": table.small_correct, "cost": table.small_cost,
             "small_tokens": table.small_tokens, "large_tokens": torch.zeros_like(table.small_tokens)}
    esc = {"correct": table.esc_correct, "cost": table.esc_cost,
           "small_tokens": table.esc_small_tokens, "large_tokens": table.esc_large_tokens}
    return {k: (p_esc * esc[k]).sum(-1) + p_never * never[k] for k in esc}


def oracle_route(table: Table) -> torch.Tensor:
    """[1,Q]: the cheapest correct outcome (escalate at t, never = T, large alone = T+1);
    never where none is correct."""
    correct = torch.cat([table.esc_correct, table.small_correct[:, None], table.large_correct[:, None]], 1)
    cost = torch.cat([table.esc_cost, table.small_cost[:, None], table.large_cost[:, None]], 1)
    valid = torch.cat([table.mask, torch.ones(table.Q, 2, dtype=torch.bool)], 1)
    cost = torch.where(valid & (correct > 0), cost, math.inf)
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


def plot_tradeoff(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 5))
    for name, points in result["methods"].items():
        marker, color = STYLE.get(name, ("", None))
        x = [p["relative_cost"] for p in points]
        y = [p["accuracy"] for p in points]
        if len(points) == 1:
            ax.scatter(x, y, marker=marker or "o", s=120 if marker == "*" else 50, color=color,
                       edgecolor="k", zorder=5, label=name)
        else:
            order = sorted(range(len(x)), key=lambda i: (x[i], y[i]))  # ties: no zig-zag
            ax.plot([x[i] for i in order], [y[i] for i in order], "-", marker=".", ms=3,
                    lw=2.2 if name == "policy" else 1.2, color=color, label=name)
    cal = result.get("policy_calibrated")
    if cal:
        ax.axhline(cal["target"], color="k", ls="--", lw=1, label=f"target {cal['target']:.3f}")
        ax.scatter([cal["relative_cost"]], [cal["accuracy"]], marker="X", s=160, color="tab:green",
                   edgecolor="k", zorder=6, label=f"calibrated (kappa {format_kappa(cal['kappa'])})")
    ax.set_xlabel("relative cost (sum of costs / all-large cost)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{Path(result['data']).name}: {result['n']} questions, {result['pricing']['unit']} pricing",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # off the points
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_escalation_steps(esc: torch.Tensor, table: Table, path: Path, kappa: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    T = table.T
    has_steps = table.n_steps > 0
    counts = torch.bincount(esc[has_steps], minlength=T + 1)[: T + 1].tolist()
    labels = [str(t + 1) for t in range(T)] + ["never"]
    fig, ax = plt.subplots(figsize=(max(6.5, 0.3 * (T + 1) + 2), 3.5))
    ax.bar(range(T + 1), counts, color=["tab:green"] * T + ["tab:gray"])
    step = max(1, (T + 1) // 20)
    ax.set_xticks(range(0, T + 1, step), labels[::step])
    ax.set_xlabel("step at which the calibrated policy escalates")
    ax.set_ylabel("questions")
    ax.set_title(f"kappa {format_kappa(kappa)}: escalates on {sum(counts[:T])} of "
                 f"{int(has_steps.sum())} questions with steps", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fmt(x, digits=3):
    return "never" if x is None else f"{x:.{digits}f}"


def fmt_ci(ci):
    return "" if not ci else f" [{fmt(ci[0])}, {fmt(ci[1])}]"


def write_markdown(result: dict, path: Path) -> None:
    s = result["summary"]
    lines = [f"Command: `{result['command']}`", "",
             f"Data: `{result['data']}` ({result['n']} questions). Pool: small "
             f"`{result['pool']['small'].get('model')}`, large `{result['pool']['large'].get('model')}`. "
             f"Pricing: {result['pricing']['unit']}. Large accuracy {result['large_accuracy']:.3f}, "
             f"small {result['small_accuracy']:.3f} at relative cost {result['small_relative_cost']:.3f}.",
             "", "| method | points | best accuracy | frontier area | cost @90% large | cost @95% | cost @100% |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, points in result["methods"].items():
        m = s[name]
        cells = [fmt(m[f"cost_at_{int(l * 100)}"]) + fmt_ci(m.get("ci", {}).get(f"cost_at_{int(l * 100)}"))
                 for l in LEVELS]
        lines.append(f"| {name} | {len(points)} | {max(p['accuracy'] for p in points):.3f} | "
                     f"{fmt(m['frontier_area'])} | " + " | ".join(cells) + " |")
    cal = result.get("policy_calibrated")
    if cal:
        ci = cal.get("ci", {})
        lines += ["", "| calibrated policy | kappa | accuracy | relative cost | large share | target | meets target |",
                  "|---|---:|---:|---:|---:|---:|:---:|",
                  f"| test | {format_kappa(cal['kappa'])} | {cal['accuracy']:.3f}{fmt_ci(ci.get('accuracy'))} | "
                  f"{cal['relative_cost']:.3f}{fmt_ci(ci.get('relative_cost'))} | {cal['large_share']:.3f} | "
                  f"{cal['target']:.3f} ({next(iter(cal['target_spec']))} "
                  f"{next(iter(cal['target_spec'].values()))}) | {'yes' if cal['meets_target'] else 'no'} |",
                  f"| calibration | | {cal['calibration_accuracy']:.3f} | {cal['calibration_relative_cost']:.3f} | "
                  f"| {cal['calibration_target']:.3f} | {'yes' if cal['calibration_met'] else 'no'} |"]
    if result.get("bootstrap"):
        lines += ["", f"Brackets: 95% bootstrap intervals over questions ({result['bootstrap']['resamples']} resamples)."]
    lines += ["", "Frontier area: mean over relative cost from the small model's to 1 of the best accuracy the "
                  "method reaches at that cost or less. Cost @X%: lowest relative cost reaching X% of the large "
                  "model's accuracy."]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------
def main(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument("--data", required=True, metavar="PATH", help="test table (schema-1 JSONL)")
    parser.add_argument("--policy", metavar="PATH", help="policy file from train_policy.py (optional)")
    parser.add_argument("--calibration", metavar="PATH", help="calibration.json from calibrate.py (needs --policy)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                        help="bootstrap resamples for 95%% intervals (0: none; default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    add_pricing_args(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    check_range("--bootstrap", args.bootstrap, 0, 1_000_000)
    if args.calibration and not args.policy:
        raise UsageError("--calibration needs --policy (the policy it was calibrated for)")
    start = time.perf_counter()

    policy = load_policy(args.policy) if args.policy else None
    cal = load_calibration(args.calibration) if args.calibration else None
    if cal is not None and cal["policy_sha256"] != sha256(args.policy):
        raise UsageError(f"{args.calibration} was made for policy {cal['policy']} "
                         f"(sha256 {cal['policy_sha256'][:12]}...), not for {args.policy}")
    table = load_table(args.data, args)
    if policy is not None:
        warn_pool(policy, table, args.data)
    if cal is not None and cal.get("pricing") not in (None, asdict(table.pricing)):
        print(f"warning: {args.calibration} was calibrated with pricing {cal['pricing']}, "
              f"evaluating with {asdict(table.pricing)}", file=sys.stderr)

    methods = score_methods(table, policy, cal["kappa"] if cal else None)
    large_acc = table.large_correct.mean().item()
    small_rc = table.relative_cost(table.small_cost).item()
    counts = bootstrap_counts(table.Q, args.bootstrap, args.seed) if args.bootstrap else None
    boot_large = counts @ table.large_correct / table.Q if counts is not None else None

    result = {"command": " ".join(sys.argv if argv is None else ["evaluate.py", *argv]),
              "data": str(args.data), "n": table.Q, "pool": table.pool, "pricing": asdict(table.pricing),
              "policy": args.policy, "calibration": args.calibration,
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
        p = policy_probs(policy, table)
        esc = first_crossing(p, table.mask, torch.tensor([cal["kappa"]], dtype=torch.float64))
        out = route_outcomes(table, esc)
        sc = aggregate(table, out)
        spec_kind, spec_value = next(iter(cal["target_spec"].items()))
        target = spec_value * large_acc if spec_kind == "relative" else float(spec_value)
        pc = {"kappa": cal["kappa"], "accuracy": sc["accuracy"].item(),
              "relative_cost": sc["relative_cost"].item(), "large_share": sc["large_share"].item(),
              "target": target, "meets_target": sc["accuracy"].item() >= target - 1e-12,
              "target_spec": cal["target_spec"], "calibration_accuracy": cal["accuracy"],
              "calibration_relative_cost": cal["relative_cost"], "calibration_target": cal["target"],
              "calibration_met": cal["met"], "delta": cal["delta"],
              "escalation_step_counts": torch.bincount(esc[0][table.n_steps > 0], minlength=table.T + 1).tolist()}
        if counts is not None:
            acc_b, cost_b = boot_scores(counts, table, out)
            target_b = spec_value * boot_large if spec_kind == "relative" else torch.full_like(boot_large, target)
            pc["ci"] = {"accuracy": interval(acc_b[:, 0]), "relative_cost": interval(cost_b[:, 0])}
            pc["meets_target_share"] = (acc_b[:, 0] >= target_b - 1e-12).double().mean().item()
        result["policy_calibrated"] = pc
    if counts is not None:
        result["bootstrap"] = {"resamples": args.bootstrap, "seed": args.seed, "level": 0.95}
    seconds = time.perf_counter() - start

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    write_markdown(result, out_dir / "eval.md")
    plot_tradeoff(result, out_dir / "tradeoff.png")
    if cal is not None:
        plot_escalation_steps(esc[0], table, out_dir / "escalation_steps.png", cal["kappa"])
    print((out_dir / "eval.md").read_text(encoding="utf-8"))
    print(f"scored {table.Q} questions, {sum(len(v) for v in result['methods'].values())} router points"
          f"{f', {args.bootstrap} bootstrap resamples' if counts is not None else ''} in {seconds:.1f}s; "
          f"wrote {out_dir}/eval.json, eval.md, tradeoff.png{', escalation_steps.png' if cal else ''}")
    return 0


if __name__ == "__main__":
    run_cli(main)
