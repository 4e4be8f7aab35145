"""Stage 3 of stepwise model routing: calibrate the deployed threshold kappa (DESIGN.md section 1).

The trained policy is deployed as a threshold rule: escalate at the FIRST step t whose
p(escalate | s_t) >= kappa. On held-out calibration questions (a table from rollout.py),
every kappa is scored exactly, and we take the cheapest kappa whose accuracy meets the
target: absolute (`--target-accuracy 0.85`) or relative to the large model's accuracy on the
same calibration questions (`--target-relative 0.98`).

The grid is every distinct policy probability on the calibration table plus the two ends:
kappa just above the largest probability (never escalate) and kappa = 0 (always escalate at
step 1). Between two neighbouring grid values the routes, and so the scores, do not change.

With `--delta D` the choice holds with probability >= 1 - D (fixed-sequence testing): walk
the grid from the most conservative threshold (kappa = 0, always escalate) towards larger
kappa, accept a threshold while the one-sided Clopper-Pearson lower bound (level 1 - D) on
its accuracy (successes out of the n calibration questions) is >= target, stop at the
first failure, and choose the cheapest accepted threshold. If no kappa meets the target, it
says so on stderr and chooses kappa = 0 (always escalate).

Run it:

    python calibrate.py --policy results/gsm8k/policy.pt --data results/gsm8k/calib.jsonl \\
        --target-relative 0.98 [--delta 0.1] --out results/gsm8k/calibration.json

`first_crossing()` and `score_routes()` score any first-crossing router exactly on a table;
evaluate.py reuses them for the handcrafted confidence routers and the policy sweep.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from rollout import UsageError, check_range, make_parser, run_cli
from train_policy import (Table, add_pricing_args, add_target_args, load_policy,
                          load_table, policy_probs, resolve_target)


# ----------------------------------------------------------------------------------------
# Scoring one-way routers exactly on the table. A route is, per question, the 0-based step
# index at which it escalates, T for never, or T+1 for "the large model alone".
# ----------------------------------------------------------------------------------------
def first_crossing(scores: torch.Tensor, mask: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Escalate at the first valid step whose score >= threshold.

    scores [Q,T], mask [Q,T], thresholds [K] -> [K,Q] long: the 0-based step index, or T
    where no valid step crosses. Uses the running max of the scores: the first crossing of
    kappa is the number of valid steps whose running max is still below kappa.
    """
    Q, T = mask.shape
    s = torch.where(mask, scores.double(), -math.inf)
    running = torch.cummax(s, dim=1).values
    running = torch.where(mask, running, math.inf)        # sorted along T for searchsorted
    th = torch.as_tensor(thresholds, dtype=torch.float64).reshape(1, -1).expand(Q, -1).contiguous()
    idx = torch.searchsorted(running, th, side="left")    # [Q,K]: count of running < kappa
    n = mask.sum(1, keepdim=True)
    return torch.where(idx >= n, T, idx).t().contiguous()


def route_outcomes(table: Table, esc: torch.Tensor) -> dict:
    """Per-question outcomes of routes esc [K,Q] (values 0..T-1 escalate, T never, T+1 the
    large model alone): correct, cost, small_tokens, large_tokens, each [K,Q] float64."""
    T = table.T
    cols = lambda e, s, l: torch.cat([e, s[:, None], l[:, None]], 1)      # [Q,T+2]
    outcomes = {
        "correct": cols(table.esc_correct, table.small_correct, table.large_correct),
        "cost": cols(table.esc_cost, table.small_cost, table.large_cost),
        "small_tokens": cols(table.esc_small_tokens, table.small_tokens, table.large_alone_small_tokens),
        "large_tokens": cols(table.esc_large_tokens, torch.zeros_like(table.small_tokens),
                             table.large_tokens),
    }
    esc = esc.long()
    valid = torch.cat([table.mask, torch.ones(table.Q, 2, dtype=torch.bool)], 1)
    q = torch.arange(table.Q)[None, :]
    esc = torch.where(valid[q, esc], esc, T)               # a padded step means never
    return {k: v[q, esc] for k, v in outcomes.items()}


def aggregate(table: Table, out: dict) -> dict:
    """Per-question outcomes [K,Q] -> accuracy, relative_cost, large_share, each [K]."""
    total = out["small_tokens"].sum(-1) + out["large_tokens"].sum(-1)
    return {"accuracy": out["correct"].mean(-1),
            "relative_cost": table.relative_cost(out["cost"]),
            "large_share": torch.where(total > 0, out["large_tokens"].sum(-1) / total.clamp(min=1e-300), 0.0)}


def score_routes(table: Table, esc: torch.Tensor) -> dict:
    """Exact accuracy [K], relative_cost [K] and large_share [K] (share of generated tokens
    written by the large model) of routes esc [K,Q] (see route_outcomes)."""
    return aggregate(table, route_outcomes(table, esc))


def sweep(table: Table, scores: torch.Tensor, thresholds: torch.Tensor) -> dict:
    """score_routes(table, first_crossing(scores, table.mask, thresholds)) for many
    thresholds at once, exactly, in O((QT + K) log QT) instead of O(KQ).

    With m_t the running max of the scores, the route escalates at the first t with
    m_t >= kappa; writing v_e for an outcome value (e = n: never) and D_t = v_t - v_{t+1},
    v_{route} = v_never + sum over valid t with m_t >= kappa of D_t. So each sum over
    questions is a suffix sum over all (m_t, D_t) pairs sorted by m_t.
    """
    running = torch.cummax(torch.where(table.mask, scores.double(), -math.inf), 1).values
    order = torch.argsort(running[table.mask])
    m = running[table.mask][order]
    th = torch.as_tensor(thresholds, dtype=torch.float64)
    start = torch.searchsorted(m, th, side="left")             # pairs with m >= kappa: start..
    never = {"correct": table.small_correct, "cost": table.small_cost,
             "small_tokens": table.small_tokens, "large_tokens": torch.zeros_like(table.small_tokens)}
    sums = {}
    for key, esc_v in (("correct", table.esc_correct), ("cost", table.esc_cost),
                       ("small_tokens", table.esc_small_tokens), ("large_tokens", table.esc_large_tokens)):
        v = torch.where(table.mask, esc_v, never[key][:, None])   # padded steps: the never outcome
        nxt = torch.cat([v[:, 1:], never[key][:, None]], 1)
        d = (v - nxt)[table.mask][order]
        suffix = torch.cat([torch.flip(torch.cumsum(torch.flip(d, [0]), 0), [0]), d.new_zeros(1)])
        sums[key] = never[key].sum() + suffix[start]
    total = sums["small_tokens"] + sums["large_tokens"]
    return {"accuracy": sums["correct"] / table.Q,
            "relative_cost": sums["cost"] / table.large_cost.sum(),
            "large_share": torch.where(total > 0, sums["large_tokens"] / total.clamp(min=1e-300), 0.0)}


def kappa_grid(p: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Every distinct probability on valid steps plus the ends (0: always escalate at step 1;
    just above the maximum: never), ascending."""
    values = torch.unique(p[mask].double())
    top = values.max().item() if len(values) else 0.5
    ends = torch.tensor([0.0, math.nextafter(max(top, 0.0), math.inf)], dtype=torch.float64)
    return torch.unique(torch.cat([values, ends]))


# ----------------------------------------------------------------------------------------
# Fixed-sequence testing with one-sided Clopper-Pearson bounds.
# ----------------------------------------------------------------------------------------
def binomial_upper_tail(n: int, p: float) -> torch.Tensor:
    """P(X >= k) for X ~ Binomial(n, p), for k = 0..n ([n+1] float64)."""
    k = torch.arange(n + 1, dtype=torch.float64)
    p_t = torch.tensor(p, dtype=torch.float64)
    logpmf = (math.lgamma(n + 1.0) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)
              + torch.xlogy(k, p_t) + torch.xlogy(n - k, 1 - p_t))
    return torch.flip(torch.cumsum(torch.flip(logpmf.exp(), [0]), 0), [0]).clamp(max=1.0)


def clopper_pearson_lower(k: int, n: int, delta: float) -> float:
    """One-sided (1 - delta) lower confidence bound on a binomial rate: the p with
    P(X >= k | p) = delta (0 for k = 0), by bisection on the exact tail."""
    if k <= 0:
        return 0.0
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if binomial_upper_tail(n, mid)[k].item() > delta:
            hi = mid
        else:
            lo = mid
    return lo


def choose_kappa(grid, accuracy, cost, n: int, target: float, delta: float | None):
    """Index into the ascending grid of the chosen kappa, or None if none qualifies.

    Plain: the cheapest kappa with accuracy >= target (ties: higher accuracy, then larger
    kappa). With delta: fixed-sequence testing from kappa = 0 upwards while the
    Clopper-Pearson lower bound >= target, i.e. P(X >= successes | target) <= delta.
    """
    successes = torch.round(accuracy * n).long()
    if delta is None:
        ok = successes >= math.ceil(target * n - 1e-9)
    else:
        tail = binomial_upper_tail(n, min(max(target, 0.0), 1.0))
        passes = tail[successes] <= delta
        ok = torch.cumprod(passes.long(), 0).bool()     # accepted until the first failure
    if not ok.any():
        return None
    candidates = torch.nonzero(ok).flatten().tolist()
    return min(candidates, key=lambda i: (cost[i].item(), -accuracy[i].item(), -i))


def format_kappa(k: float) -> str:
    """Thresholds near 1 are printed as 1-eps so that they stay distinct."""
    return f"1-{1 - k:.2e}" if 0.999 < k < 1 else f"{k:.6g}"


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


CALIBRATION_KEYS = ("kappa", "target", "target_spec", "accuracy", "relative_cost", "large_accuracy",
                    "n", "delta", "met", "policy", "policy_sha256")


def load_calibration(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such calibration file")
    try:
        cal = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{path}: not valid JSON ({getattr(err, 'msg', err)})") from None
    if not isinstance(cal, dict):
        raise UsageError(f"{path}: expected a JSON object")
    missing = [k for k in CALIBRATION_KEYS if k not in cal]
    if missing:
        raise UsageError(f"{path}: missing key(s) {', '.join(missing)}")
    for k in ("kappa", "target"):
        if not isinstance(cal[k], (int, float)) or isinstance(cal[k], bool) or math.isnan(cal[k]):
            raise UsageError(f"{path}: {k} must be a number, got {cal[k]!r}")
    spec = cal["target_spec"]
    if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in ("accuracy", "relative")):
        raise UsageError(f"{path}: target_spec must be {{\"accuracy\": A}} or {{\"relative\": R}}")
    return cal


def warn_pool(policy, table: Table, what: str) -> None:
    pool = policy.meta.get("pool")
    if pool is not None and pool != table.pool:
        print(f"warning: the policy was trained on pool {pool}, {what} has {table.pool}", file=sys.stderr)


def main(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument("--policy", required=True, metavar="PATH", help="policy file from train_policy.py")
    parser.add_argument("--data", required=True, metavar="PATH", help="calibration table (schema-1 JSONL)")
    add_target_args(parser)
    parser.add_argument("--delta", type=float, metavar="D",
                        help="hold the target with probability >= 1-D (fixed-sequence Clopper-Pearson)")
    parser.add_argument("--out", default="calibration.json", metavar="PATH", help="output JSON")
    add_pricing_args(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)   # small tensors: extra threads only add overhead
    if args.delta is not None:
        check_range("--delta", args.delta, 0.0, 1.0, lo_open=True)

    policy = load_policy(args.policy)
    table = load_table(args.data, args)
    warn_pool(policy, table, args.data)
    target, target_spec = resolve_target(args, table)
    large_acc = table.large_correct.mean().item()

    p = policy_probs(policy, table)
    grid = kappa_grid(p, table.mask)
    scores = sweep(table, p, grid)
    acc, cost = scores["accuracy"], scores["relative_cost"]
    chosen = choose_kappa(grid, acc, cost, table.Q, target, args.delta)
    met = chosen is not None
    if not met:
        print(f"no kappa meets the target accuracy {target:.4f} on {args.data}"
              f"{' with delta ' + str(args.delta) if args.delta else ''}; choosing kappa = 0 "
              f"(always escalate)", file=sys.stderr)
        chosen = 0

    print(f"{table.Q} calibration questions; large accuracy {large_acc:.4f}, small "
          f"{table.small_correct.mean():.4f}; target {target:.4f} {target_spec}; {len(grid)} thresholds")
    print(f"{'kappa':>12} {'accuracy':>9} {'rel.cost':>9}")
    for i in range(max(0, chosen - 5), min(len(grid), chosen + 6)):
        print(f"{format_kappa(grid[i].item()):>12} {acc[i].item():9.4f} {cost[i].item():9.4f}"
              f"{'  <- chosen' if i == chosen else ''}")

    k_success = int(round(acc[chosen].item() * table.Q))
    cal = {"kappa": grid[chosen].item(), "target": target, "target_spec": target_spec,
           "accuracy": acc[chosen].item(), "relative_cost": cost[chosen].item(),
           "large_share": scores["large_share"][chosen].item(), "large_accuracy": large_acc,
           "small_accuracy": table.small_correct.mean().item(), "n": table.Q,
           "delta": args.delta, "met": met,
           "accuracy_lower_bound": (clopper_pearson_lower(k_success, table.Q, args.delta)
                                    if args.delta else None),
           "policy": str(args.policy), "policy_sha256": sha256(args.policy),
           "data": str(args.data), "pool": table.pool, "pricing": asdict(table.pricing),
           "command": " ".join(sys.argv if argv is None else ["calibrate.py", *argv])}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(cal, indent=2) + "\n", encoding="utf-8")
    print(f"kappa {format_kappa(cal['kappa'])}: accuracy {cal['accuracy']:.4f} (target {target:.4f}, "
          f"{'met' if met else 'NOT met'}), relative cost {cal['relative_cost']:.4f}; wrote {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
