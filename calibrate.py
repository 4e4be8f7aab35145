"""Stage 3 of stepwise model routing: calibrate the deployed threshold kappa (docs/DESIGN.md section 1).

Run it:

    python calibrate.py --policy results/gsm8k/policy.pt --data results/gsm8k/calib.jsonl \\
        --target-relative 0.98 [--delta 0.1] --out results/gsm8k/calibration.json

The trained policy is deployed as a threshold rule: escalate at the FIRST step t whose
p(escalate | s_t) >= kappa. On held-out calibration questions (a table from rollout.py),
every kappa is scored exactly, and we take the cheapest kappa whose accuracy meets the
target: absolute (`--target-accuracy 0.85`) or relative to the large model's accuracy on the
same calibration questions (`--target-relative 0.98`).

The grid holds one kappa per distinct route: the midpoint between each two neighbouring
distinct policy probabilities on the calibration table, plus the two ends, kappa = 0 (always
escalate at step 1) and kappa = 1 (never escalate; beyond a probability that is itself 0 or 1).
No kappa sits on a probability, so the kappa written to calibration.json gives exactly the
accuracy and cost reported for it, also rounded to float32 or printed in fewer digits.

With `--delta D` the choice holds with probability >= 1 - D (fixed-sequence testing): walk
the grid from the most conservative threshold (kappa = 0, always escalate) towards larger
kappa, accept a threshold while a one-sided level-(1 - D) test says it meets the target,
stop at the first failure, and choose the cheapest accepted threshold. For an absolute target
the test is the Clopper-Pearson lower bound on its accuracy. A relative target R x (large
accuracy) is itself estimated on the same questions, so there the test bounds the mean paired
difference d_i = correct_i - R * large_correct_i (in [-R, 1]) away from below 0 with a
finite-sample betting bound (hedged capital, Waudby-Smith & Ramdas 2024).

If no kappa meets the target, the answer is the large model alone (cheaper than escalating
at step 1, which pays for a draft): calibration.json says `"kappa": null, "fallback":
"large"`, and every later stage treats it so. The same answer is given where every kappa
that meets the target costs more than the large model alone (`prefer_large`; "met" is then
true: the large model alone is as accurate as escalating at step 1, the first threshold
tested). A one-line warning says when the calibration set is too small (fewer than 20
questions) or the target is 0 for the choice to mean much.

The same rule (`calibrate_scores()` / `choose_threshold()`) calibrates every handcrafted
router in evaluate.py --calib-data, so that the policy is compared with deployable baselines.
calibration.json records hashes of its questions; the table may not share questions with
the policy's training table (`--allow-overlap` to go on anyway).

table.py's `first_crossing()`, `route_outcomes()` and `sweep()` score any first-crossing router
exactly on a table; evaluate.py uses them for the handcrafted confidence routers too.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from cli import UsageError, check_range, make_parser, plural, run_cli
from table import (Table, add_pricing_args, add_target_args, aggregate, between_scores, check_overlap,
                   first_crossing, resolve_target, route_outcomes, sweep, target_of)
from train_policy import load_policy, load_table, policy_probs, policy_view, prm_table, uses_prm


# ----------------------------------------------------------------------------------------
# The thresholds: one between each two distinct scores, scored exactly by table.sweep().
# ----------------------------------------------------------------------------------------
def kappa_grid(p: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One threshold per distinct route, ascending: below every score on valid steps (always
    escalate at step 1), between each two adjacent distinct scores, above every score
    (never); each strictly between scores (table.between_scores), never on one."""
    values = torch.unique(p[mask].double())
    return torch.unique(between_scores(p, mask, torch.cat([values, values.new_full((1,), math.inf)])))


# ----------------------------------------------------------------------------------------
# Fixed-sequence testing of thresholds against the target.
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


BET_CAP = 0.75   # c: a bet risks at most this share of the capital (Waudby-Smith & Ramdas)


def betting_log_capital(x: torch.Tensor, lo: float, delta: float) -> torch.Tensor:
    """Evidence against H0: E[x] <= 0, for rows x [K,n] of i.i.d. values in [lo, hi], lo < 0.

    Hedged-capital betting (Waudby-Smith & Ramdas, JRSS-B 2024), one-sided: a gambler starts
    with capital 1 and bets on each question in turn, capital *= 1 + lambda_t * x_t, with
    lambda_t in [0, c / -lo] chosen from the questions before t (predictable plug-in,
    lambda_t = sqrt(2 log(1/delta) / (n sigma_{t-1}^2)) with a running variance). Under H0 the
    capital is a nonnegative supermartingale, so by Ville's inequality it ever reaches 1/delta
    with probability <= delta. Returns max_t log capital [K]; reject H0 (the mean is >= 0
    with confidence 1 - delta) where it is >= log(1/delta). Valid for any n, no asymptotics.
    """
    x = x.double()
    K, n = x.shape
    t = torch.arange(1, n + 1, dtype=torch.float64)
    prior = ((1 - lo) / 2) ** 2                     # variance prior: half the range [lo, 1], squared
    mu = torch.cumsum(x, 1) / (t + 1)                                   # running mean, prior 0
    var = (prior + torch.cumsum((x - mu) ** 2, 1)) / (t + 1)            # running variance
    var = torch.cat([torch.full((K, 1), prior, dtype=torch.float64), var[:, :-1]], 1)  # predictable
    lam = torch.sqrt(2 * math.log(1 / delta) / (n * var.clamp(min=1e-12))).clamp(max=BET_CAP / -lo)
    log_capital = torch.cumsum(torch.log1p(lam * x), 1)
    return torch.cat([torch.zeros(K, 1, dtype=torch.float64), log_capital], 1).max(1).values


def threshold_passes(correct: torch.Tensor, large_correct: torch.Tensor, spec: dict,
                     delta: float) -> torch.Tensor:
    """[K] bool: with confidence 1 - delta, the routes' accuracy meets the target, from their
    per-question correctness correct [K,n] (in [0, 1]; expectations for a random router).

    Absolute target A, 0/1 outcomes: one-sided Clopper-Pearson, P(X >= successes | A) <= delta.
    Relative target R x (large accuracy): the target is itself estimated on these questions,
    so the bound is on the mean paired difference d_i = correct_i - R * large_correct_i
    (in [-R, 1]), required >= 0, by betting (betting_log_capital). An absolute target with
    fractional outcomes bounds d_i = correct_i - A in the same way."""
    n = correct.shape[1]
    kind, value = next(iter(spec.items()))
    binary = bool(((correct == 0) | (correct == 1)).all())
    if kind == "accuracy" and binary:
        tail = binomial_upper_tail(n, min(max(float(value), 0.0), 1.0))
        return tail[correct.sum(1).round().long()] <= delta
    d = correct.double() - (float(value) * large_correct.double() if kind == "relative" else float(value))
    lo = -float(value)                                  # the least d can be
    if lo >= 0:                                         # a target of 0: always met
        return torch.ones(correct.shape[0], dtype=torch.bool)
    return betting_log_capital(d, lo, delta) >= math.log(1 / delta)


def choose_threshold(accuracy: torch.Tensor, cost: torch.Tensor, per_question, large_correct,
                     spec: dict, delta: float | None, chunk: int = 256):
    """Index of the chosen threshold, or None (no threshold meets the target: the large model
    alone). Thresholds are ordered from the most conservative (index 0, always escalate)
    towards the cheapest; accuracy/cost [K] on the calibration questions; per_question(a, b)
    gives the per-question correctness [b-a, n] of thresholds a..b-1.

    Plain: the cheapest threshold whose accuracy >= target (ties: higher accuracy, then later).
    With delta: fixed-sequence testing (no multiplicity correction needed): walk from index 0,
    accept while threshold_passes(), stop at the first failure; the cheapest accepted wins."""
    K = len(accuracy)
    if delta is None:
        ok = accuracy >= target_of(spec, large_correct) - 1e-12
    else:
        ok = torch.zeros(K, dtype=torch.bool)
        for a in range(0, K, chunk):
            b = min(K, a + chunk)
            passes = threshold_passes(per_question(a, b), large_correct, spec, delta)
            run = torch.cumprod(passes.long(), 0).bool()
            ok[a:b] = run
            if not run.all():
                break
    if not ok.any():
        return None
    candidates = torch.nonzero(ok).flatten().tolist()
    return min(candidates, key=lambda i: (cost[i].item(), -accuracy[i].item(), -i))


def calibrate_scores(table: Table, scores: torch.Tensor, spec: dict, delta: float | None) -> dict:
    """Calibrate the first-crossing rule "escalate at the first step with score >= kappa" on a
    table: the one rule behind the policy's kappa (calibrate.py) and every handcrafted
    router's threshold (evaluate.py --calib-data). Returns the grid and its scores, the
    chosen index (None: the large model alone), and the chosen point."""
    grid = kappa_grid(scores, table.mask)
    swept = sweep(table, scores, grid)
    per_question = lambda a, b: route_outcomes(table, first_crossing(scores, table.mask, grid[a:b]))["correct"]
    i = choose_threshold(swept["accuracy"], swept["relative_cost"], per_question,
                         table.large_correct, spec, delta)
    met, i = i is not None, prefer_large(i, swept["relative_cost"])
    out = None if i is None else route_outcomes(table, first_crossing(scores, table.mask, grid[i:i + 1]))
    return {"grid": grid, "swept": swept, "index": i, "knob": None if i is None else grid[i].item(),
            "met": met, **chosen_point(table, out, spec)}


def prefer_large(i, cost: torch.Tensor):
    """The chosen index, or None (the large model alone) where the chosen threshold costs more
    than the large model alone (relative cost 1). The large model alone then meets the target
    too: it is exactly as accurate, question by question, as escalating at step 1, the most
    conservative threshold, which was tested first and accepted; it just does not pay for a
    draft that is thrown away."""
    return None if i is None or cost[i].item() > 1.0 + 1e-12 else i


def chosen_point(table: Table, out, spec: dict) -> dict:
    """accuracy / relative_cost / large_share of the chosen router, from its per-question
    outcomes out [1,Q] (route_outcomes), or of the large model alone where out is None; with
    the target and whether the point meets it. Summed as evaluate.py sums a calibrated router
    applied again (aggregate), not read off the sweep (whose suffix sums add the same costs in
    another order), so that the stored knob gives these numbers again bit for bit."""
    if out is None:
        out = route_outcomes(table, torch.full((1, table.Q), table.T + 1))
    point = {k: v[0].item() for k, v in aggregate(table, out).items()}
    target = target_of(spec, table.large_correct)
    return {**point, "target": target, "meets_target": point["accuracy"] >= target - 1e-12}


def format_kappa(k, digits: int = 4) -> str:
    """A threshold in `digits` significant digits (calibration.json keeps every digit); None
    is the large model alone."""
    return "large alone" if k is None else f"{float(k):.{digits}g}"


def kappa_digits(kappas, least: int = 4) -> int:
    """The fewest significant digits, at least `least`, that print the distinct thresholds
    `kappas` apart (17 tell any two doubles apart)."""
    ks = {float(k) for k in kappas}
    return next((d for d in range(least, 17) if len({format_kappa(k, d) for k in ks}) == len(ks)), 17)


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


CALIBRATION_KEYS = ("kappa", "target", "target_spec", "accuracy", "relative_cost", "large_accuracy",
                    "n", "delta", "met", "policy", "policy_sha256")


def load_calibration(path) -> dict:
    """calibration.json, checked. kappa is a number, or null with "fallback": "large" (no
    threshold met the target: the large model alone)."""
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
    if cal["kappa"] is None and cal.get("fallback") != "large":
        raise UsageError(f"{path}: kappa is null without \"fallback\": \"large\"")
    for k in ("kappa", "target"):
        if k == "kappa" and cal[k] is None:
            continue
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


MIN_QUESTIONS = 20   # below this a calibrated target says little (issue 12, item 7)


def degenerate_warning(table: Table, target: float) -> str | None:
    """One line where the calibration set is too small, or the target too trivial, for the
    calibrated kappa to mean anything; else None."""
    large_right = int(table.large_correct.sum().item())
    if target <= 0:
        why = f"the target is {target:.4g}, which every router meets"
    elif table.Q < MIN_QUESTIONS:
        why = f"only {plural(table.Q, 'calibration question')} (fewer than {MIN_QUESTIONS})"
    elif large_right == 0:
        why = "the large model gets none of the calibration questions right"
    else:
        return None
    return (f"warning: {why}: the large model gets {large_right} of {table.Q} right; the "
            f"calibrated kappa means little, calibrate on more questions")


def build_parser():
    parser = make_parser(__doc__)
    parser.add_argument("--policy", required=True, metavar="PATH", help="policy file from train_policy.py")
    parser.add_argument("--data", required=True, metavar="PATH",
                        help="calibration table (schema-1 JSONL), questions held out from training")
    add_target_args(parser)
    parser.add_argument("--delta", type=float, metavar="D",
                        help="hold the target with probability >= 1-D (fixed-sequence testing: "
                             "Clopper-Pearson for an absolute target, a betting bound on the paired "
                             "difference for a relative one; default: no guarantee, plain choice)")
    parser.add_argument("--out", required=True, metavar="PATH", help="calibration JSON to write")
    parser.add_argument("--allow-overlap", action="store_true",
                        help="go on even if the table shares questions with the policy's training table")
    add_pricing_args(parser)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)   # small tensors: extra threads only add overhead
    if args.delta is not None:
        check_range("--delta", args.delta, 0.0, 1.0, lo_open=True)

    policy = load_policy(args.policy)
    table = load_table(args.data, args, policy)   # with the hidden state, for a policy that reads it
    if uses_prm(policy):   # the policy consults the PRM at every step it scores: its cost too
        table = prm_table(table, args.data)
    table = policy_view(table, policy)   # with the decision before the first draft, where it makes one
    check_overlap(table.hashes, args.data,
                  [(f"{args.policy} (its training questions)", policy.meta.get("question_hashes")),
                   (f"{args.policy} (its probe data)", policy.meta.get("probe_data_hashes"))],
                  args.allow_overlap)
    warn_pool(policy, table, args.data)
    target, target_spec = resolve_target(args, table)
    large_acc = table.large_correct.mean().item()
    warning = degenerate_warning(table, target)
    if warning:
        print(warning, file=sys.stderr)

    # ALGO LOGIC: score every threshold exactly, then choose (fixed-sequence testing with --delta)
    p = policy_probs(policy, table)
    result = calibrate_scores(table, p, target_spec, args.delta)
    grid, acc, cost = result["grid"], result["swept"]["accuracy"], result["swept"]["relative_cost"]
    chosen, met = result["index"], result["met"]
    if not met:
        print(f"no kappa meets the target accuracy {target:.4f} on {args.data}"
              f"{' with delta ' + str(args.delta) if args.delta else ''}; the answer is the large "
              f"model alone (kappa null, fallback large)", file=sys.stderr)
    elif chosen is None:
        print(f"every kappa that meets the target accuracy {target:.4f} costs more than the large "
              f"model alone (it pays for drafts the large model redoes); the answer is the large "
              f"model alone (kappa null, fallback large), which meets it too", file=sys.stderr)

    print(f"{plural(table.Q, 'calibration question')}; large accuracy {large_acc:.4f}, small "
          f"{table.small_correct.mean():.4f}; target {target:.4f} {target_spec}; "
          f"{plural(len(grid), 'threshold')}")
    centre = 0 if chosen is None else chosen
    shown = range(max(0, centre - 5), min(len(grid), centre + 6))
    digits = kappa_digits(grid[shown.start:shown.stop].tolist())
    print(f"{'kappa':>12} {'accuracy':>9} {'rel.cost':>9}")
    for i in shown:
        print(f"{format_kappa(grid[i].item(), digits):>12} {acc[i].item():9.4f} {cost[i].item():9.4f}"
              f"{'  <- chosen' if i == chosen else ''}")

    cal = {"kappa": result["knob"], "fallback": None if chosen is not None else "large",
           "target": target, "target_spec": target_spec,
           "accuracy": result["accuracy"], "relative_cost": result["relative_cost"],
           "large_share": result["large_share"], "large_accuracy": large_acc,
           "small_accuracy": table.small_correct.mean().item(), "n": table.Q,
           "delta": args.delta, "met": met,
           "bound": None if args.delta is None else (
               "betting on the paired difference (hedged capital)" if "relative" in target_spec
               else "Clopper-Pearson"),
           "accuracy_lower_bound": (clopper_pearson_lower(int(round(result["accuracy"] * table.Q)), table.Q,
                                                          args.delta)
                                    if args.delta and "accuracy" in target_spec else None),
           "warning": warning,
           "policy": str(args.policy), "policy_sha256": sha256(args.policy),
           "data": str(args.data), "pool": table.pool, "pricing": asdict(table.pricing),
           "prm_price": table.prm_price if table.prm_priced else None,
           "question_hashes": table.hashes,
           "command": " ".join(sys.argv if argv is None else ["calibrate.py", *argv])}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(cal, indent=2) + "\n", encoding="utf-8")
    print(f"kappa {format_kappa(cal['kappa'], digits)}: accuracy {cal['accuracy']:.4f} (target {target:.4f}, "
          f"{'met' if met else 'NOT met by any kappa'}), relative cost {cal['relative_cost']:.4f}; wrote {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
