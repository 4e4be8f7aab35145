"""The hidden-state probe's learning curve: probe AUC and the calibrated policy's cost over the
amount of probe data (DESIGN section 4, "probe data").

Run it from the repository root, after the tables have their states (rollout.py --add-hidden)
and the probe data is built (tools/probe_data.py):

    python tools/probe_curve.py --probe-data results/probe-data/asdiv.jsonl results/probe-data/mawps.jsonl \\
        --sizes 0 200 600 2000 all --out results/svamp/probe-curve.md

For each size N (the first N questions of the probe data, files in the order given; 0: the
training table alone), the method with the hidden-state policy (train_policy.py --hidden-state
--hidden --probe-data the N questions) is trained on the train table, calibrated on the calib
table and measured on the test table (and on --also tables, e.g. check), by demo.py, for every
seed and target: the same stages and commands as the method's own results. Reported per N:
the probe's out-of-fold AUC per step on the training table, its AUC per step and per question
(each question's highest logit) on every measured table, and the calibrated policy's accuracy,
relative cost and seeds meeting the target, as mean +- sd over the seeds. The probe data never
holds a held-out question (tools/probe_data.py drops their stories; train_policy.py refuses
overlap), so every number is on questions the probe never saw.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import probe  # noqa: E402
from cli import UsageError, make_parser, run_cli  # noqa: E402
from table import find_table, read_table  # noqa: E402


def subset(files: list, n: int | None, folder: Path) -> Path | None:
    """The first n questions of the probe data (all where n is None) as one JSONL file with its
    states beside it (the sources' sidecars merged); None for n = 0."""
    if n == 0:
        return None
    lines, states, question, keys, meta = [], {}, {}, {}, None
    for path in files:
        side = probe.load_hidden(probe.sidecar_path(path))
        meta = meta or side["meta"]
        for rec in read_table(path, small_only=True):
            if n is not None and len(lines) >= n:
                break
            if rec["id"] in states:
                raise UsageError(f"{path}: id {rec['id']!r} is in an earlier probe-data file too")
            if side["meta"]["keys"].get(rec["id"]) != probe.record_key(rec):
                raise UsageError(f"{path}: no states for {rec['id']}; run tools/probe_data.py again")
            lines.append(json.dumps(rec))
            states[rec["id"]], question[rec["id"]] = side["hidden"][rec["id"]], side["question"][rec["id"]]
            keys[rec["id"]] = side["meta"]["keys"][rec["id"]]
    if n is not None and len(lines) < n:
        raise UsageError(f"--sizes {n}: the probe data holds {len(lines)} questions")
    out = folder / f"probe-data-{len(lines)}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    ids = list(states)
    probe.save_hidden(probe.sidecar_path(out), ids, [states[i] for i in ids],
                      {**meta, "table": str(out), "keys": keys}, [question[i] for i in ids])
    return out


def probe_aucs(policy_path: Path, tables: dict) -> dict:
    """The stored probe's AUC per step and per question (highest logit) on each table's states."""
    from train_policy import hidden_wrong_logits, load_policy
    policy = load_policy(policy_path)
    out = {"train_oof": policy.probe_info["train_oof_auc"], "l2": policy.probe_info["l2"],
           "dim": policy.probe_info["dim"]}
    for name, path in tables.items():
        records = read_table(path)
        states = probe.table_states(path, records, policy.probe_info["layer"])
        steps, y_step, top, y_q = [], [], [], []
        for r in records:
            if not r["small"]["steps"]:
                continue
            z = hidden_wrong_logits(policy.probe, states[r["id"]][1])
            wrong = 0.0 if r["small"]["correct"] else 1.0
            steps.append(z)
            y_step += [wrong] * len(z)
            top.append(z.max())
            y_q.append(wrong)
        out[f"{name}_step"] = probe.auc(torch.cat(steps), torch.tensor(y_step))
        out[f"{name}_question"] = probe.auc(torch.stack(top), torch.tensor(y_q))
    return out


def main(argv=None) -> int:
    p = make_parser(__doc__)
    p.add_argument("--probe-data", nargs="+", required=True, metavar="FILE",
                   help="small-only solutions with their states beside them (tools/probe_data.py)")
    p.add_argument("--sizes", nargs="+", default=["0", "200", "600", "2000", "all"], metavar="N",
                   help="probe-data questions per point, or 'all' (default 0 200 600 2000 all)")
    p.add_argument("--tables", default="results/svamp", metavar="DIR",
                   help="train, calib and test tables with their states (default results/svamp)")
    p.add_argument("--also", nargs="*", default=["check"], metavar="NAME",
                   help="more tables in --tables to measure on (default check, where it exists)")
    p.add_argument("--targets", type=float, nargs="+", default=[0.95], metavar="R",
                   help="accuracy targets R x large (default 0.95)")
    p.add_argument("--seeds", type=int, default=5, help="training seeds (default 5)")
    p.add_argument("--work", default="runs/probe-curve", metavar="DIR", help="working folder (default runs/probe-curve)")
    p.add_argument("--out", default="results/svamp/probe-curve.md", metavar="PATH",
                   help="report (.md, and .json beside it; default results/svamp/probe-curve.md)")
    args = p.parse_args(argv)
    sizes = []
    for s in args.sizes:
        if s != "all" and not (s.isdigit()):
            raise UsageError(f"--sizes: {s!r} is neither a whole number nor 'all'")
        sizes.append(None if s == "all" else int(s))
    import demo
    tables, work = Path(args.tables), Path(args.work)
    measured = {"test": find_table(tables, "test")} | {n: find_table(tables, n) for n in args.also
                                                        if find_table(tables, n) is not None}
    start, rows = time.perf_counter(), []
    for n in sizes:
        data = subset(args.probe_data, n, work / "data")
        size = 0 if data is None else sum(1 for _ in data.open())
        train_args = "--hidden-state --hidden" + (f" --probe-data {data}" if data else "")
        row = {"probe_data_questions": size, "train_args": train_args, "tables": {}}
        for name in measured:
            out = work / f"n-{size}" / name
            demo.main(["--tables", str(tables), "--test-table", name, "--train-args", train_args,
                       "--targets", *map(str, args.targets), "--seeds", str(args.seeds), "--out", str(out),
                       "--no-route"])
            summary = json.loads((out / "summary.json").read_text())
            row["tables"][name] = {t: {"accuracy": v["policy_seeds"]["accuracy"],
                                       "relative_cost": v["policy_seeds"]["relative_cost"],
                                       "meets_target": v["policy_seeds"]["meets_target"],
                                       "large_alone": v["policy_seeds"].get("large_alone"),
                                       "best_handcrafted": v["policy_vs_best_handcrafted"]["seed0"]["baseline"],
                                       "vs_best_handcrafted": v["policy_vs_best_handcrafted"]["seeds"]}
                                   for t, v in summary["targets"].items()}
            first = out / demo.tag(args.targets[0]) / "seed-0" / "policy.pt"
        row["auc"] = probe_aucs(first, {k: v for k, v in measured.items()})
        rows.append(row)
        print(f"[probe-curve] N = {size}: AUC per step " + ", ".join(
            f"{k} {v:.3f}" for k, v in row["auc"].items() if k.endswith("_step") or k == "train_oof"), flush=True)
    result = {"command": " ".join(["python tools/probe_curve.py", *(sys.argv[1:] if argv is None else argv)]),
              "seconds": round(time.perf_counter() - start), "seeds": args.seeds, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    out.write_text(markdown(result, list(measured)), encoding="utf-8")
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


def markdown(result: dict, names: list) -> str:
    lines = ["# The hidden-state probe's learning curve", "",
             f"`{result['command']}` ({result['seconds']} s; {result['seeds']} seeds). The probe: \"the small "
             "model's answer is wrong\" from its middle-layer state at each drafted step, fitted on the training "
             "table (out of fold for its own features) plus the first N probe-data questions; the policy: linear, "
             "on the token statistics and the probe's logit, calibrated on the calibration table.", "",
             "| N probe data | AUC train (oof) | " + " | ".join(f"AUC {n} step / question" for n in names) + " | "
             + " | ".join(f"{n}: cost, meets, large alone, minus best handcrafted" for n in names) + " |",
             "|---" * (2 + 2 * len(names)) + "|"]
    for row in result["rows"]:
        a = row["auc"]
        cells = [str(row["probe_data_questions"]), f"{a['train_oof']:.3f}"]
        cells += [f"{a[n + '_step']:.3f} / {a[n + '_question']:.3f}" for n in names]
        for n in names:
            parts = []
            for t, v in row["tables"][n].items():
                rc, d = v["relative_cost"], v["vs_best_handcrafted"]
                parts.append(f"{t}: {rc['mean']:.3f} ± {rc['sd']:.3f}, {v['meets_target']}/{result['seeds']}, "
                             f"{v['large_alone']}, {d['mean']:+.3f} ({v['best_handcrafted']})")
            cells.append("; ".join(parts))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run_cli(main)
