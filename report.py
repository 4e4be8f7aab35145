"""evaluate.py's reports, not the method: eval.md (paste-able tables), tradeoff.png (accuracy
against relative cost for every method) and escalation_steps.png (where the calibrated
policy escalates). They read evaluate.py's result dict.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from calibrate import format_kappa
from cli import plural
from table import Table


STYLE = {"small": ("s", "tab:blue"), "large": ("D", "tab:red"), "oracle": ("*", "gold"),
         "random": ("", "tab:gray"), "mean_logprob": ("", "tab:orange"), "min_logprob": ("", "tab:brown"),
         "mean_entropy": ("", "tab:pink"), "max_entropy": ("", "tab:olive"), "policy": ("", "tab:green"),
         "prm": ("", "tab:purple"), "policy+prm": ("", "tab:cyan")}


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


def plot_escalation_steps(esc: torch.Tensor, table: Table, path: Path, kappa, data,
                          before_draft: bool = False) -> None:
    """Where the calibrated policy escalates on the test table: questions (integer counts) per
    step, never, and (kappa null, or a policy that decides before the first draft) the large
    model alone."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    T = table.T
    has_steps = table.n_steps > 0
    counts = [int(c) for c in torch.bincount(esc[has_steps], minlength=T + 2)[: T + 2].tolist()]
    labels = [str(t + 1) for t in range(T)] + ["never", "large alone"]
    if kappa is not None and not before_draft:
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


def write_markdown(result: dict, path: Path, levels: tuple) -> None:
    """eval.md: the calibrated routers, then every method's swept frontier (cost at `levels`)."""
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
                 for l in levels]
        lines.append(f"| {name} | {len(points)} | {max(p['accuracy'] for p in points):.3f} | "
                     f"{fmt(m['frontier_area'])} | " + " | ".join(cells) + " |")
    if result.get("bootstrap"):
        lines += ["", f"Brackets: 95% bootstrap intervals over questions ({result['bootstrap']['resamples']} resamples)."]
    lines += ["", "Frontier area: mean over relative cost from the small model's to 1 of the best accuracy the "
                  "method reaches at that cost or less. Cost @X%: lowest relative cost reaching X% of the large "
                  "model's accuracy."]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
