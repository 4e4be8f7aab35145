"""The trajectory table and the exact simulator on it (docs/DESIGN.md sections 1-3).

rollout.py writes the table; train_policy.py, calibrate.py, evaluate.py and route.py read it
through this one copy:

- the file: schema-1 JSONL (also .jsonl.gz), one question per line, validated line by line
  on reading; written one whole line at a time, so that a run resumes where it stopped;
- the cost of every outcome (`Pricing`: FLOPs by default, or dollars per token);
- the table as padded tensors (`Table`) and, in ONE function, the outcome columns of every
  one-way router: escalate at step t, never escalate, the large model alone
  (`outcome_columns`);
- first-crossing routers ("escalate at the first step whose score >= kappa"), scored exactly
  for many thresholds at once (`sweep`); the accuracy target.

Conventions. A question whose small solution has no steps (n = 0) has no escalations: every
router, the large baseline and the oracle included, gets the small outcome there, and its
all-large cost is taken to be its small cost. An outcome whose answer is null is wrong (the
table's `correct` is trusted).
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import re
import sys
import unicodedata
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cli import UsageError, check_range, plural

if TYPE_CHECKING:
    import torch  # the table's tensors; imported where used, so that reading a file needs no torch

SCHEMA = 1


# ----------------------------------------------------------------------------------------
# The trajectory file (schema 1): reading, and whole-line writing with resume.
# ----------------------------------------------------------------------------------------
STEP_KEYS = ("text", "tokens", "mean_logprob", "min_logprob", "mean_entropy", "max_entropy")
OUTCOME_KEYS = ("answer", "correct", "finished")
ESCALATION_KEYS = ("after", "prompt_tokens", "tokens", "text") + OUTCOME_KEYS


def validate_record(rec, where: str, small_only: bool = False) -> dict:
    """Check one table line against schema 1; raise UsageError naming `where` if it is off.
    `small_only`: a line of probe data (the small model's solution alone, no escalations)."""
    if not isinstance(rec, dict):
        raise UsageError(f"{where}: expected a JSON object")
    if "schema" not in rec and "question" in rec and "escalations" not in rec and not small_only:
        raise UsageError(f"{where}: this looks like a question file, not a trajectory table "
                         "(make a table from it with rollout.py --dataset FILE)")
    if rec.get("schema") != SCHEMA:
        raise UsageError(f"{where}: schema {rec.get('schema')!r}, this code reads schema {SCHEMA}")
    for key in ("id", "question", "gold", "pool", "small") + (() if small_only else ("escalations",)):
        if key not in rec:
            raise UsageError(f"{where}: missing key {key!r}")
    small = rec["small"]
    if not isinstance(small, dict) or not isinstance(small.get("steps"), list):
        raise UsageError(f"{where}: 'small' must hold a list of 'steps'")
    for key in ("prompt_tokens",) + OUTCOME_KEYS:
        if key not in small:
            raise UsageError(f"{where}: missing key 'small.{key}'")
    for i, step in enumerate(small["steps"]):
        missing = [k for k in STEP_KEYS if k not in step]
        if missing:
            raise UsageError(f"{where}: small.steps[{i}] lacks {', '.join(missing)}")
    if small_only:
        return rec
    n = len(small["steps"])
    escs = rec["escalations"]
    if not isinstance(escs, list) or len(escs) != n:
        raise UsageError(f"{where}: {n} small steps need {n} escalations, found "
                         f"{len(escs) if isinstance(escs, list) else type(escs).__name__}")
    for k, esc in enumerate(escs):
        missing = [key for key in ESCALATION_KEYS if key not in esc]
        if missing:
            raise UsageError(f"{where}: escalations[{k}] lacks {', '.join(missing)}")
        if esc["after"] != k:
            raise UsageError(f"{where}: escalations[{k}] has after={esc['after']}")
    return rec


GZIP_MAGIC, ZIP_MAGIC = b"\x1f\x8b", b"PK\x03\x04"


def check_table_file(path: Path, appending: bool = False) -> None:
    """Refuse, in one line naming the file, what its first bytes show is no JSONL table: a zip
    archive (a policy file from train_policy.py is one); to read, a .gz name on plain text or
    gzip content under another name; to append to (rollout.py --out), any gzip content."""
    with path.open("rb") as f:
        head = f.read(4)
    if head == ZIP_MAGIC:
        raise UsageError(f"{path}: a zip archive (a policy file from train_policy.py?), not a "
                         "trajectory table (JSONL from rollout.py)")
    gz_named, gz_content = path.suffix == ".gz", head[:2] == GZIP_MAGIC
    if appending:
        if gz_content:
            raise UsageError(f"{path}: gzip-compressed; rollout.py appends only to a plain JSONL table")
    elif gz_named and head and not gz_content:
        raise UsageError(f"{path}: named .gz but not gzip-compressed (plain text? name it .jsonl)")
    elif gz_content and not gz_named:
        raise UsageError(f"{path}: gzip-compressed but not named .gz (name it .jsonl.gz)")


def read_table(path, small_only: bool = False) -> list[dict]:
    """Read a schema-1 trajectory table (JSONL, or .jsonl.gz). Clear one-line errors on any bad
    line, and on a file that is no table (check_table_file; not UTF-8; a damaged .gz).
    `small_only`: probe data, whose lines need no escalations (validate_record)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    check_table_file(path)
    records, seen = [], set()
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UsageError(f"{where}: not valid JSON ({err.msg})") from None
                validate_record(rec, where, small_only)
                if rec["id"] in seen:
                    raise UsageError(f"{where}: duplicate id {rec['id']!r}")
                seen.add(rec["id"])
                records.append(rec)
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text (a binary file?), not a trajectory table "
                         "(JSONL from rollout.py)") from None
    except (OSError, EOFError, zlib.error) as err:   # a damaged .gz: BadGzipFile (OSError), cut off
        raise UsageError(f"{path}: unreadable ({err})") from None
    if not records:
        raise UsageError(f"{path}: the table has no questions")
    return records


def find_table(folder, name: str):
    """folder/name.jsonl, else folder/name.jsonl.gz, else None."""
    for path in (Path(folder) / f"{name}.jsonl", Path(folder) / f"{name}.jsonl.gz"):
        if path.is_file():
            return path
    return None


def done_ids(path) -> set[str]:
    """Ids already in an output table (for resuming). A torn last line (a crash mid-write:
    the start of a JSON object without its newline) is cut off. Anything else that is no
    table line, a whole line or a tail, is refused in one line and the file left as it is:
    it is not a table this code wrote (a policy file, a question file, a .gz table)."""
    path = Path(path)
    if not path.exists():
        return set()
    check_table_file(path, appending=True)
    ids, good_bytes = set(), 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():                             # a blank line (read_table skips it)
                good_bytes += len(raw)
                continue
            if not raw.endswith(b"\n"):
                if raw.lstrip().startswith(b"{"):
                    break                                   # the torn tail
                raise UsageError(f"{path}:{lineno}: not a trajectory table line; choose another --out")
            try:
                ids.add(json.loads(raw)["id"])
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
                why = f"no {err}" if isinstance(err, KeyError) else type(err).__name__
                raise UsageError(f"{path}:{lineno}: not a trajectory table line ({why}); choose "
                                 f"another --out") from None
            good_bytes += len(raw)
    if good_bytes != path.stat().st_size:  # a crash mid-write: cut the torn tail off
        with path.open("r+b") as f:
            f.truncate(good_bytes)
    return ids


def append_record(f, rec: dict) -> None:
    """Write one question as one whole line and flush it to disk."""
    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


def _same_pool(pool: dict) -> dict:
    """A pool as resuming compares it: where a server runs (base_url) may change."""
    return {role: {k: v for k, v in (m or {}).items() if k != "base_url"}
            for role, m in (pool or {}).items()}


def check_resumable(paths: list, pool: dict, settings: dict) -> set:
    """Ids already written to the tables `paths` (--out and the part tables of a sharded
    run); refuse to append to a table of another pool or made with other generation settings."""
    ids = set()
    for path in paths:
        found = done_ids(path)
        if found:
            with path.open(encoding="utf-8") as f:
                first = json.loads(f.readline())
            if _same_pool(first.get("pool")) != _same_pool(pool):
                raise UsageError(f"--out {path}: holds a table of another pool "
                                 f"({first.get('pool')}); choose another --out")
            if "settings" in first and first["settings"] != settings:
                diff = sorted(k for k in set(first["settings"]) | set(settings)
                              if first["settings"].get(k) != settings.get(k))
                raise UsageError(f"--out {path}: was made with other settings ("
                                 + ", ".join(f"{k} {first['settings'].get(k)!r} there, "
                                             f"{settings.get(k)!r} now" for k in diff)
                                 + "); choose another --out")
        ids |= found
    return ids


# ----------------------------------------------------------------------------------------
# Cost (DESIGN section 2): prices per prompt token and per generated token, per model.
# ----------------------------------------------------------------------------------------
@dataclass
class Pricing:
    small_in: float
    small_out: float
    large_in: float
    large_out: float
    unit: str = "FLOPs"


def add_pricing_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("cost (DESIGN section 2)")
    g.add_argument("--prompt-cost", type=float, default=0.0, metavar="R",
                   help="FLOPs pricing: a prompt token costs R generated tokens of the same "
                        "model (default 0: prompts are free)")
    g.add_argument("--price-small", nargs="+", metavar="IN,OUT",
                   help="dollars per million prompt (IN) and generated (OUT) tokens of the small "
                        "model, as IN,OUT or IN OUT (with --price-large; replaces FLOPs pricing)")
    g.add_argument("--price-large", nargs="+", metavar="IN,OUT",
                   help="dollars per million prompt and generated tokens of the large model")
    g.add_argument("--price-prm", type=float, metavar="IN",
                   help="dollars per million tokens the process reward model reads (with "
                        "--price-small/--price-large; FLOPs pricing charges 2 * pool.prm.params "
                        "per token read). Without it, dollar pricing scores no PRM method")


def parse_price(flag: str, value) -> list[float]:
    """'IN,OUT' or ['IN', 'OUT'] (or two floats) -> [IN, OUT] dollars per million tokens."""
    parts = value if isinstance(value, (list, tuple)) else [value]
    parts = [x for p in parts for x in (str(p).split(",") if isinstance(p, str) else [p]) if x != ""]
    try:
        prices = [float(x) for x in parts]
    except ValueError:
        prices = []
    if len(prices) != 2:
        raise UsageError(f"{flag} takes IN,OUT (dollars per million prompt and generated tokens), "
                         f"got {' '.join(map(str, parts))!r}")
    return prices


def table_pool(records: list[dict]) -> dict:
    """The one pool every record of a table shares."""
    pool = records[0]["pool"]
    for rec in records:
        if rec["pool"] != pool:
            raise UsageError(f"question {rec['id']!r} has pool {rec['pool']} but question "
                             f"{records[0]['id']!r} has {pool}: a table holds one pool")
    return pool


def pricing_from_args(args, records: list[dict]) -> Pricing:
    pool = table_pool(records)
    if (args.price_small is None) != (args.price_large is None):
        raise UsageError("--price-small and --price-large go together")
    if args.price_small is not None:
        if args.prompt_cost:
            raise UsageError("--prompt-cost is for FLOPs pricing; --price-small/--price-large "
                             "already price prompt tokens")
        prices = [*parse_price("--price-small", args.price_small),
                  *parse_price("--price-large", args.price_large)]
        if any(not (p >= 0) or math.isinf(p) for p in prices):
            raise UsageError(f"--price-small/--price-large must be finite and >= 0, got {prices}")
        if prices[3] <= 0:
            raise UsageError("--price-large OUT must be > 0 (costs are relative to the large model)")
        return Pricing(*(p / 1e6 for p in prices), unit="dollars")   # per token
    check_range("--prompt-cost", args.prompt_cost, 0.0, 1e12)
    out = {}
    for role in ("small", "large"):
        params = pool.get(role, {}).get("params") if isinstance(pool.get(role), dict) else None
        if not isinstance(params, (int, float)) or isinstance(params, bool) or not params > 0:
            raise UsageError(f"question {records[0]['id']!r}: pool.{role}.params is {params!r}; "
                             f"FLOPs pricing needs a positive parameter count "
                             f"(or give --price-small/--price-large)")
        out[role] = 2.0 * params
    return Pricing(args.prompt_cost * out["small"], out["small"],
                   args.prompt_cost * out["large"], out["large"], unit="FLOPs")


def prm_price_from_args(args, pricing: Pricing, records: list[dict]) -> float | None:
    """The price of one token read by the process reward model (DESIGN section 2), in the
    pricing's unit: 2 * pool.prm.params FLOPs, or --price-prm dollars per million tokens.
    None where the table has no PRM, or dollar pricing has no --price-prm."""
    price = getattr(args, "price_prm", None)
    if price is not None:
        if pricing.unit != "dollars":
            raise UsageError("--price-prm goes with --price-small/--price-large (FLOPs pricing "
                             "charges 2 * pool.prm.params per token the PRM reads)")
        if not price >= 0 or math.isinf(price):
            raise UsageError(f"--price-prm must be finite and >= 0, got {price}")
        return price / 1e6
    if pricing.unit != "FLOPs":
        return None
    entry = records[0]["pool"].get("prm")
    params = entry.get("params") if isinstance(entry, dict) else None
    if not isinstance(params, (int, float)) or isinstance(params, bool) or not params > 0:
        return None
    return 2.0 * params


def load_records(path, args) -> tuple:
    """read_table + the pricing flags -> (records, Pricing), with a one-line warning on stderr
    where the large model gets none of the table's questions right (train_policy.py,
    calibrate.py and evaluate.py read their tables here)."""
    records = read_table(path)
    pricing = pricing_from_args(args, records)
    warning = large_wrong_warning(records, path)
    if warning:
        print(warning, file=sys.stderr)
    return records, pricing


def large_wrong_warning(records: list[dict], path) -> str | None:
    """A line where the large model (the small outcome where a question has no steps, as in
    Table) gets no question right: a relative target is then 0, which every router meets, and
    the large model is no reference; most likely the grading or the gold answers are off."""
    right = sum(bool(r["escalations"][0]["correct"] if r["escalations"] else r["small"]["correct"])
                for r in records)
    if right:
        return None
    return (f"warning: {path}: the large model gets none of the {plural(len(records), 'question')} "
            f"right: a relative target is 0 there and every router meets it; check the gold "
            f"answers and the grading (data.py), or the pool")


# ----------------------------------------------------------------------------------------
# Question identity: ids are positional and differ between copies of a dataset, so stages
# compare questions by a hash of their normalised text.
# ----------------------------------------------------------------------------------------
def question_hash(text: str) -> str:
    """sha256 of the question text after NFKC, whitespace collapsed, stripped, lowercased."""
    norm = re.sub(r"\s+", " ", unicodedata.normalize("NFKC", str(text))).strip().lower()
    return hashlib.sha256(norm.encode("utf-8")).hexdigest()


def check_overlap(hashes: list, table_path, others: list, allow: bool) -> None:
    """Refuse (one line) a table sharing questions with earlier files, unless `allow`.
    others: (file name, that file's question hashes or None where it records none)."""
    mine = set(hashes)
    for name, theirs in others:
        if theirs is None:
            continue
        shared = len(mine & set(theirs))
        if shared and not allow:
            raise UsageError(f"{table_path} shares {shared} question{'s' if shared != 1 else ''} "
                             f"with {name}; use other questions, or --allow-overlap to go on anyway")
        if shared:
            print(f"warning: {table_path} shares {shared} question(s) with {name} (--allow-overlap)",
                  file=sys.stderr)


# ----------------------------------------------------------------------------------------
# The table as padded tensors: Q questions, T = max steps. Escalating at step t (1-based;
# column t-1) pays the small steps 1..t (the dropped draft included) and its prompt, plus the
# large continuation escalations[t-1] and its prompt. Only the outcome and cost columns are
# here (every router needs them); the policy's state features are train_policy.py's.
# ----------------------------------------------------------------------------------------
@dataclass
class Table:
    mask: torch.Tensor              # [Q,T] bool, step t exists (t < n_steps)
    n_steps: torch.Tensor           # [Q] long
    esc_correct: torch.Tensor       # [Q,T] float64, escalate at step t+1 (0 where padded)
    esc_cost: torch.Tensor          # [Q,T] float64
    esc_small_tokens: torch.Tensor  # [Q,T] float64, small tokens generated (steps 1..t+1)
    esc_large_tokens: torch.Tensor  # [Q,T] float64, large tokens generated
    small_correct: torch.Tensor     # [Q] never escalate
    small_cost: torch.Tensor
    small_tokens: torch.Tensor
    large_correct: torch.Tensor     # [Q] the large model alone (the small outcome where n = 0)
    large_cost: torch.Tensor
    large_tokens: torch.Tensor      # large tokens generated (0 where n = 0)
    ids: list = field(default_factory=list)
    hashes: list = field(default_factory=list)   # question_hash() of each question
    pool: dict = field(default_factory=dict)
    pricing: Pricing | None = None
    # the process reward model (DESIGN sections 2, 5), where every record carries its scores:
    prm_score: torch.Tensor | None = None    # [Q,T] float64, the PRM's score of each drafted step
    prm_tokens: torch.Tensor | None = None   # [Q,T] float64, PRM tokens read to score steps 1..t+1
    prm_price: float | None = None           # price of one PRM token read (pricing's unit)
    prm_priced: bool = False                 # esc_cost / small_cost include the PRM (with_prm_cost)

    @property
    def Q(self) -> int:
        return self.mask.shape[0]

    @property
    def T(self) -> int:
        return self.mask.shape[1]

    def relative_cost(self, costs: torch.Tensor) -> torch.Tensor:
        """sum(costs) / sum(all-large costs) over the same questions (last dim = questions)."""
        return costs.sum(-1) / self.large_cost.sum()


def select(table: Table, idx) -> Table:
    """The questions idx of a table (a list or tensor of indices; repeats allowed): every
    per-question field, of the table's own class (a train_policy.FeatureTable stays one)."""
    import dataclasses
    import torch
    index = torch.as_tensor(idx, dtype=torch.long)
    out = {}
    for f in dataclasses.fields(table):
        v = getattr(table, f.name)
        if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == table.Q:
            v = v[index]
        elif isinstance(v, list) and len(v) == table.Q:
            v = [v[i] for i in index.tolist()]
        out[f.name] = v
    return type(table)(**out)


def outcome_table(records: list[dict], pricing: Pricing, prm_price: float | None = None) -> Table:
    """The outcome and cost columns of a table's records under `pricing`; with the PRM's
    scores and token counts where every record has them (prm_price: prm_price_from_args)."""
    import torch
    Q = len(records)
    T = max(1, max(len(r["small"]["steps"]) for r in records))
    z = lambda: torch.zeros(Q, T, dtype=torch.float64)
    mask = torch.zeros(Q, T, dtype=torch.bool)
    esc_correct, esc_cost, esc_small, esc_large = z(), z(), z(), z()
    q1 = lambda: torch.zeros(Q, dtype=torch.float64)
    small_correct, small_cost, small_tokens = q1(), q1(), q1()
    large_correct, large_cost, large_tokens = q1(), q1(), q1()
    n_steps = torch.zeros(Q, dtype=torch.long)
    p = pricing
    for i, rec in enumerate(records):
        small, escs = rec["small"], rec["escalations"]
        steps, n, prompt = small["steps"], len(small["steps"]), small["prompt_tokens"]
        n_steps[i] = n
        cum, cums = 0, []
        for t in range(1, n + 1):
            cum += steps[t - 1]["tokens"]
            cums.append(cum)
        small_correct[i] = float(bool(small["correct"]))
        small_tokens[i] = cum
        small_cost[i] = p.small_out * cum + p.small_in * prompt
        if n == 0:  # no escalations: the large baseline gets the small outcome (module doc)
            large_correct[i], large_cost[i] = small_correct[i], small_cost[i]
            continue
        mask[i, :n] = True
        cums_t = torch.tensor(cums, dtype=torch.float64)
        e_tok = torch.tensor([e["tokens"] for e in escs], dtype=torch.float64)
        e_prompt = torch.tensor([e["prompt_tokens"] for e in escs], dtype=torch.float64)
        esc_correct[i, :n] = torch.tensor([float(bool(e["correct"])) for e in escs], dtype=torch.float64)
        esc_small[i, :n] = cums_t
        esc_large[i, :n] = e_tok
        esc_cost[i, :n] = (p.small_out * cums_t + p.small_in * prompt
                           + p.large_out * e_tok + p.large_in * e_prompt)
        large_correct[i] = esc_correct[i, 0]
        large_tokens[i] = e_tok[0]
        large_cost[i] = p.large_out * e_tok[0] + p.large_in * e_prompt[0]
    if not large_cost.sum() > 0:
        raise UsageError("the all-large cost of the table is 0: relative costs are undefined")
    from prm import has_prm, record_prm_tokens   # the table's PRM keys (prm.py: torch, no model)
    prm_score = prm_tokens = None
    if all(has_prm(r) for r in records):   # a PRM router needs every question's scores
        prm_score, prm_tokens = z(), z()
        for i, rec in enumerate(records):
            n = len(rec["small"]["steps"])
            if n:
                prm_score[i, :n] = torch.tensor([float(s["prm_score"]) for s in rec["small"]["steps"]],
                                                dtype=torch.float64)
                prm_tokens[i, :n] = torch.tensor(record_prm_tokens(rec), dtype=torch.float64)
    return Table(mask, n_steps, esc_correct, esc_cost, esc_small, esc_large,
                 small_correct, small_cost, small_tokens, large_correct, large_cost, large_tokens,
                 ids=[r["id"] for r in records], hashes=[question_hash(r["question"]) for r in records],
                 pool=table_pool(records), pricing=pricing, prm_score=prm_score,
                 prm_tokens=prm_tokens, prm_price=None if prm_score is None else prm_price)


def with_prm_cost(table: Table) -> Table:
    """The table as a PRM-gated router pays it (DESIGN section 2): escalating at step t adds
    the PRM's reading of the question and steps 1..t, never escalating its reading of every
    step; the large model alone never consults the PRM, so the all-large cost (the relative
    cost's denominator) is unchanged. Every router scored on the returned table (route_outcomes,
    sweep, calibrate.py) includes the PRM's cost."""
    import dataclasses
    import torch
    if table.prm_tokens is None or table.prm_price is None:
        raise ValueError("the table has no PRM scores, or no price for the PRM's tokens")
    if table.prm_priced:
        return table
    read = table.prm_price * table.prm_tokens                            # [Q,T], 0 where padded
    last = read.gather(1, (table.n_steps - 1).clamp(min=0)[:, None])[:, 0]
    last = torch.where(table.n_steps > 0, last, torch.zeros_like(last))   # n = 0: never consulted
    return dataclasses.replace(table, esc_cost=table.esc_cost + read, small_cost=table.small_cost + last,
                               prm_priced=True)


OUTCOMES = ("correct", "cost", "small_tokens", "large_tokens")


def outcome_columns(table: Table) -> dict:
    """Every one-way router's outcome on every question, the one place they are assembled:
    key (OUTCOMES) -> [Q, T+2] float64 with column t-1 = escalate at step t (t = 1..T; a
    padded step, t > n, holds the never outcome), column T = never escalate (the small
    model's solution), column T+1 = the large model alone."""
    import torch
    never = {"correct": table.small_correct, "cost": table.small_cost,
             "small_tokens": table.small_tokens, "large_tokens": torch.zeros_like(table.small_tokens)}
    large = {"correct": table.large_correct, "cost": table.large_cost,
             "small_tokens": torch.where(table.n_steps == 0, table.small_tokens,  # n = 0: small
                                         torch.zeros_like(table.small_tokens)),
             "large_tokens": table.large_tokens}
    esc = {"correct": table.esc_correct, "cost": table.esc_cost,
           "small_tokens": table.esc_small_tokens, "large_tokens": table.esc_large_tokens}
    return {k: torch.cat([torch.where(table.mask, esc[k], never[k][:, None]),
                          never[k][:, None], large[k][:, None]], 1) for k in OUTCOMES}


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
    import torch
    Q, T = mask.shape
    s = torch.where(mask, scores.double(), -math.inf)
    running = torch.cummax(s, dim=1).values
    running = torch.where(mask, running, math.inf)        # sorted along T for searchsorted
    th = torch.as_tensor(thresholds, dtype=torch.float64).reshape(1, -1).expand(Q, -1).contiguous()
    idx = torch.searchsorted(running, th, side="left")    # [Q,K]: count of running < kappa
    n = mask.sum(1, keepdim=True)
    return torch.where(idx >= n, T, idx).t().contiguous()


def score_ends(values: torch.Tensor) -> tuple[float, float]:
    """Thresholds below and above every one of the ascending distinct scores `values`: 0 and
    1 where they lie beyond the scores (the policy's p is in [0, 1]), else a margin of max(1,
    |score|) beyond the least and the greatest; (0, 1) where there are no scores."""
    if not len(values):
        return 0.0, 1.0
    low, top = values[0].item(), values[-1].item()
    return (0.0 if low > 0 else low - max(1.0, abs(low)),
            1.0 if top < 1 else top + max(1.0, abs(top)))


def between_scores(scores: torch.Tensor, mask: torch.Tensor, thresholds) -> torch.Tensor:
    """Thresholds [K] moved strictly between two adjacent distinct scores of the valid steps,
    each with the routes it had (float64, [K]).

    "Escalate at the first step with score >= k" routes exactly as any threshold in (u, v],
    v the least score >= k and u the score before it; so k becomes the midpoint (u + v) / 2,
    or score_ends() below the least score (always escalate at step 1) and above the greatest
    (never). No threshold then sits on a score: storing one in float32 or printing it in
    fewer digits cannot carry it across a score (unless two scores are closer than float32
    tells apart), and the accuracy and cost a calibration reports are exactly what its
    stored threshold gives when applied again. Where u and v are adjacent doubles, with no
    double between them, k becomes v."""
    import torch
    values = torch.unique(scores[mask].double())                  # ascending, distinct
    th = torch.as_tensor(thresholds, dtype=torch.float64).reshape(-1)
    low, top = score_ends(values)
    ext = torch.cat([torch.tensor([low], dtype=torch.float64), values,
                     torch.tensor([top], dtype=torch.float64)])
    i = torch.searchsorted(values, th, side="left")               # values[i]: the least >= k
    u, v = ext[i], ext[i + 1]
    mid = torch.where(((u + v) / 2 > u) & ((u + v) / 2 < v), (u + v) / 2, v)
    return torch.where(i == 0, low, torch.where(i == len(values), top, mid))


def route_outcomes(table: Table, esc: torch.Tensor) -> dict:
    """Per-question outcomes of routes esc [K,Q] (values 0..T-1 escalate, T never, T+1 the
    large model alone; a padded step means never): correct, cost, small_tokens,
    large_tokens, each [K,Q] float64."""
    import torch
    q = torch.arange(table.Q)[None, :]
    return {k: v[q, esc.long()] for k, v in outcome_columns(table).items()}


def aggregate(table: Table, out: dict) -> dict:
    """Per-question outcomes [K,Q] -> accuracy, relative_cost, large_share, each [K]."""
    import torch
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
    import torch
    running = torch.cummax(torch.where(table.mask, scores.double(), -math.inf), 1).values
    order = torch.argsort(running[table.mask])
    m = running[table.mask][order]
    th = torch.as_tensor(thresholds, dtype=torch.float64)
    start = torch.searchsorted(m, th, side="left")             # pairs with m >= kappa: start..
    sums = {}
    for key, v in outcome_columns(table).items():
        d = (v[:, :table.T] - v[:, 1:table.T + 1])[table.mask][order]   # D_t; column T: never
        suffix = torch.cat([torch.flip(torch.cumsum(torch.flip(d, [0]), 0), [0]), d.new_zeros(1)])
        sums[key] = v[:, table.T].sum() + suffix[start]
    total = sums["small_tokens"] + sums["large_tokens"]
    return {"accuracy": sums["correct"] / table.Q,
            "relative_cost": sums["cost"] / table.large_cost.sum(),
            "large_share": torch.where(total > 0, sums["large_tokens"] / total.clamp(min=1e-300), 0.0)}


# ----------------------------------------------------------------------------------------
# The accuracy target: absolute, or relative to the large model on the same questions.
# ----------------------------------------------------------------------------------------
def add_target_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_mutually_exclusive_group(required=True)
    g.add_argument("--target-accuracy", type=float, metavar="A", help="absolute accuracy target in [0, 1]")
    g.add_argument("--target-relative", type=float, metavar="R",
                   help="target = R * the large model's accuracy on the same questions")


def target_of(spec: dict, large_correct: torch.Tensor) -> float:
    """{"accuracy": A} -> A; {"relative": R} -> R * the large model's accuracy on these questions."""
    kind, value = next(iter(spec.items()))
    return float(value) * large_correct.double().mean().item() if kind == "relative" else float(value)


def resolve_target(args, table: Table) -> tuple[float, dict]:
    """--target-accuracy A or --target-relative R (R * large accuracy on these questions)."""
    if args.target_accuracy is not None:
        check_range("--target-accuracy", args.target_accuracy, 0.0, 1.0)
        return float(args.target_accuracy), {"accuracy": args.target_accuracy}
    check_range("--target-relative", args.target_relative, 0.0, None, lo_open=True)
    large_acc = table.large_correct.mean().item()
    target = target_of({"relative": args.target_relative}, table.large_correct)
    if target > 1:
        raise UsageError(f"--target-relative {args.target_relative} asks for accuracy {target:.4f} > 1 "
                         f"(large model accuracy {large_acc:.4f})")
    return target, {"relative": args.target_relative}
