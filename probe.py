"""The small model's hidden state at the end of each drafted step, and a linear probe on it.

Library machinery of the hidden-state policy (docs/DESIGN.md section 4): the token statistics
barely tell when the small model goes wrong, its middle-layer state tells it far better. A
table's states are kept beside it in a sidecar file, `TABLE.hidden.pt` (the middle layer,
float16), written by

    python rollout.py --add-hidden results/svamp/train.jsonl

(the small model alone, teacher-forced over the recorded steps; the small model is the
table's pool.small.model, `~` expanded, or `--small PATH`). train_policy.py --hidden-state fits
the probe on them (`select_probe`), calibrate.py and evaluate.py read them through the
policy's stored probe, and route.py takes the same state from the drafter's own forward pass
(engine.StepDrafter). ablate.py uses the same machinery with both layers cached under runs/
(`python probe.py --table TABLE`).

1. **States** (`hidden_states`): per question ONE forward pass of the small model over
   `rollout.prompt_text(question)` + all its steps' text, and per step the hidden state at
   the step's last token (by causality the state the model was in when it wrote it); also
   the state at the prompt's last token (the question, before anything is drafted). That
   token is found with the fast tokenizer's offset mapping on the concatenated text (the
   last token starting before the step's end). The text is RE-tokenized, which can differ
   from the generated ids where generation chose a split that BPE merges: in the committed
   SVAMP tables (50 questions, 262 steps) one question's text re-tokenizes one token shorter
   from its 4th step on. "mid" = `hidden_states[num_layers // 2]` (output of that decoder
   layer), "last" = the final normed state; an int k = `hidden_states[k]`. Kept as float16.
2. **The file** (`save_hidden`, `load_hidden`, `hidden_for_table`; `hidden_for_records` for
   records that are not a table's, such as tools/probe_data.py's): a torch.save'd dict
   {"format": FORMAT, "ids", "hidden": {id: [n_steps, n_layers, hidden]}, "question": {id:
   [n_layers, hidden]}, "meta": {"model", "layers", "dtype", "prompt", "table",
   "table_sha256", "keys": {id: sha256 of question and step texts}}}: the sidecar
   `sidecar_path(TABLE)` = TABLE.hidden.pt (`table_states` reads it for the stages, one line
   naming the command where it is missing or stale), or for ablate.py
   runs/hidden/<table folder>-<table stem>.hidden.pt (runs/ is ignored by git). A question is reused where model, layers, dtype and prompt match and its
   key too; only the others are computed, and the file is replaced atomically. (The model is
   known by its path: a folder replaced in place is not detected.)
3. **The probe** (`fit_probe`, `cross_fit`, `select_probe`): L2 logistic regression on
   standardised rows (optionally on their first `dim` principal components), float64,
   full-batch L-BFGS: deterministic. `cross_fit`: out-of-fold probabilities, a question's rows
   in one fold. `select_probe`: the L2 penalty and PCA dimension chosen by out-of-fold AUC on
   the training rows alone (PROBE_GRID), the out-of-fold scores, and the probe refitted on all
   of them. A policy reads a probe by its clamped logit (`probe_logit`).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.utils.rnn import pad_sequence

from cli import UsageError, check_range, make_parser, run_cli

FORMAT = "stepwise-routing/hidden-states/2"   # /2: the question's state too
SIDECAR_LAYERS = ("mid",)   # what a sidecar beside a table keeps (float16: ~1.8 KB a step for a 0.5B model)


# ----------------------------------------------------------------------------------------
# 1. Hidden states at step ends: one forward pass per question.
# ----------------------------------------------------------------------------------------
def step_positions(tokenizer, record: dict) -> tuple[list, list]:
    """(token ids of prompt + all steps' text, [index of the prompt's last token, index of
    each step's last token])."""
    from rollout import prompt_text
    text = prompt_text(tokenizer, record["question"])
    ends = [len(text)]
    for step in record["small"]["steps"]:
        text += step["text"]
        ends.append(len(text))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets, positions, i = enc["offset_mapping"], [], 0
    for end in ends:  # the last token that starts before the step's end holds its last character
        while i + 1 < len(offsets) and offsets[i + 1][0] < end:
            i += 1
        positions.append(i)
    return enc["input_ids"], positions


def layer_indices(layers, num_layers: int) -> list:
    """Each layer name as an index into hidden_states, or "last" (the final normed state)."""
    out = [{"mid": num_layers // 2, "last": "last"}.get(layer, layer) for layer in layers]
    for name, k in zip(layers, out):
        if k != "last" and k not in range(num_layers):
            raise ValueError(f"layer {name!r}: expected 'mid', 'last' or 0..{num_layers - 1}")
    return out


@torch.no_grad()
def hidden_states(lm, records: list, layers=("mid", "last"), batch_size: int = 8,
                  store=torch.float16) -> list:
    """Per record, (question state [len(layers), hidden], step states [n_steps, len(layers),
    hidden]) as `store` tensors: the small model's state at the prompt's last token and at the
    last token of each step. `lm` is an engine.LM (engine.load_lm). Records are batched by
    length, right-padded: a real token never attends to padding (causal mask), so its
    positions are 0..n-1 as in a lone pass."""
    model, tok = lm.model, lm.tokenizer
    base = model.base_model  # the decoder without the LM head
    picks = layer_indices(layers, model.config.num_hidden_layers)
    encoded = [step_positions(tok, r) for r in records]
    out = [None] * len(records)
    order = sorted(range(len(records)), key=lambda i: len(encoded[i][0]))
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        seqs = [torch.tensor(encoded[i][0]) for i in batch]
        ids = pad_sequence(seqs, batch_first=True, padding_value=lm.pad_id)  # right-padded
        mask = pad_sequence([torch.ones_like(x) for x in seqs], batch_first=True)
        positions = torch.arange(ids.shape[1]).expand(len(batch), -1)
        res = base(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device),
                   position_ids=positions.to(lm.device), output_hidden_states=True, use_cache=False)
        for row, i in enumerate(batch):
            at = torch.tensor(encoded[i][1], device=lm.device)
            states = torch.stack([(res.last_hidden_state if k == "last" else res.hidden_states[k])[row, at]
                                  for k in picks], dim=1).to("cpu", store)
            out[i] = (states[0], states[1:])
    return out


def step_hidden_states(lm, records: list, layers=("mid", "last"), batch_size: int = 8,
                       store=torch.float16) -> list:
    """Per record, the step states of hidden_states(): [n_steps, len(layers), hidden]."""
    return [steps for _, steps in hidden_states(lm, records, layers, batch_size, store)]


# ----------------------------------------------------------------------------------------
# 2. The file, and a cache that computes only the questions it lacks.
# ----------------------------------------------------------------------------------------
def record_key(record: dict) -> str:
    """What a question's states depend on besides the model: its question and step texts."""
    texts = [record["question"]] + [s["text"] for s in record["small"]["steps"]]
    return hashlib.sha256(json.dumps(texts).encode("utf-8")).hexdigest()


def save_hidden(path, ids: list, tensors: list, meta: dict, questions: list) -> None:
    """Write the file whole to a temporary name next to `path`, then move it over `path`.
    `tensors`: each question's step states; `questions`: its state before any draft."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save({"format": FORMAT, "ids": list(ids), "hidden": dict(zip(ids, tensors)),
                    "question": dict(zip(ids, questions)), "meta": meta}, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_hidden(path) -> dict:
    """{"format", "ids", "hidden": {id: tensor}, "question": {id: tensor}, "meta"} as
    save_hidden wrote it."""
    try:
        blob = torch.load(path, weights_only=True)
    except Exception as err:  # torch raises many types for a file that is not its own
        raise UsageError(f"{path}: not a readable hidden-state file ({type(err).__name__})") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise UsageError(f"{path}: not a hidden-state file of this build ({FORMAT}); "
                         f"write it again with `python rollout.py --add-hidden TABLE`")
    return blob


def sidecar_path(table_path) -> Path:
    """Where a table's hidden states are kept: beside it, TABLE.hidden.pt (.jsonl[.gz] dropped)."""
    table_path = Path(table_path)
    stem = table_path.name.removesuffix(".gz").removesuffix(".jsonl")
    return table_path.with_name(f"{stem}.hidden.pt")


def default_out(table_path) -> Path:
    """runs/hidden/<table folder>-<table stem>.hidden.pt, relative to the current folder."""
    table_path = Path(table_path)
    stem = table_path.name.removesuffix(".gz").removesuffix(".jsonl")
    return Path("runs") / "hidden" / f"{table_path.resolve().parent.name}-{stem}.hidden.pt"


def small_model_of(records: list, table_path) -> str:
    """The table's small model, if it was a local one."""
    from table import table_pool
    small = table_pool(records)["small"]
    if small.get("backend") == "api":
        raise UsageError(f"{table_path}: its small model {small['model']} was served at "
                         f"{small.get('base_url')}; give --small PATH, a local copy of it")
    return small["model"]


def hidden_for_table(table_path, model: str | None = None, out=None, dtype: str = "float32",
                     layers=("mid", "last"), batch_size: int = 8, device: str = "cpu",
                     small_only: bool = False) -> dict:
    """The hidden states of every question of a table, as load_hidden() gives them (ids in
    table order), from the cache file `out` where it is up to date, else computed (only the
    questions it lacks; the model is loaded only then) and written back."""
    from table import read_table
    records = read_table(table_path, small_only)   # small_only: probe data (no escalations)
    model = model or small_model_of(records, table_path)
    out = Path(out) if out else default_out(table_path)
    return hidden_for_records(records, model, out, dtype, layers, batch_size, device, source=table_path)


def hidden_for_records(records: list, model: str, out, dtype: str = "float32", layers=("mid", "last"),
                       batch_size: int = 8, device: str = "cpu", source=None, lm=None) -> dict:
    """hidden_for_table() on records that need not be a table's (tools/probe_data.py's small-only
    solutions have no escalations, which table.read_table requires): the states of every record,
    ids in record order, kept in the file `out` (the same format; meta "table" and
    "table_sha256" name the file `source` the records came from, or are None). Only the records
    the file lacks, or whose texts changed, are computed, by `lm` (an engine.LM of `model`
    already loaded) or by `model` loaded here."""
    from rollout import SYSTEM_PROMPT
    meta = {"model": model, "layers": list(layers), "dtype": dtype, "prompt": SYSTEM_PROMPT,
            "table": None if source is None else str(source),
            "table_sha256": None if source is None else hashlib.sha256(Path(source).read_bytes()).hexdigest(),
            "keys": {r["id"]: record_key(r) for r in records}}
    out = Path(out)
    try:
        old = load_hidden(out) if out.is_file() else None
    except UsageError:  # a file of an earlier format: computed anew
        old = None
    same = old is not None and os.path.expanduser(old["meta"]["model"]) == os.path.expanduser(model) \
        and all(old["meta"][k] == meta[k] for k in ("layers", "dtype", "prompt"))
    kept = {i: (old["question"][i], old["hidden"][i]) for i in meta["keys"]
            if same and old["meta"]["keys"].get(i) == meta["keys"][i]}
    todo = [r for r in records if r["id"] not in kept]
    if todo:
        if lm is None:
            from engine import load_lm
            lm = load_lm(model, device, dtype)
        kept.update(zip([r["id"] for r in todo], hidden_states(lm, todo, layers, batch_size)))
    ids = [r["id"] for r in records]
    hidden, question = {i: kept[i][1] for i in ids}, {i: kept[i][0] for i in ids}
    if todo or old is None or old["meta"] != meta:
        save_hidden(out, ids, [hidden[i] for i in ids], meta, [question[i] for i in ids])
    return {"format": FORMAT, "ids": ids, "hidden": hidden, "question": question, "meta": meta,
            "computed": len(todo), "path": out}


def table_states(table_path, records: list, layer: str = "mid", path=None) -> dict:
    """The hidden states of a table's questions from its sidecar (or `path`), for the stages:
    {id: (question state [hidden], step states [n_steps, hidden])} of `layer`, float32. One
    line naming the command where the file is missing, of another layer set, or stale (a
    question missing or its text changed)."""
    path = Path(path) if path else sidecar_path(table_path)
    fix = f"run `python rollout.py --add-hidden {table_path}`"
    if not path.is_file():
        raise UsageError(f"{table_path}: no hidden states beside it ({path}); {fix}")
    blob = load_hidden(path)
    if layer not in blob["meta"]["layers"]:
        raise UsageError(f"{path}: holds layers {blob['meta']['layers']}, not {layer!r}; {fix}")
    k = blob["meta"]["layers"].index(layer)
    stale = [r["id"] for r in records if blob["meta"]["keys"].get(r["id"]) != record_key(r)]
    if stale:
        raise UsageError(f"{path}: no states for {len(stale)} of the table's {len(records)} questions "
                         f"(e.g. {stale[0]}); {fix}")
    return {r["id"]: (blob["question"][r["id"]][k].float(), blob["hidden"][r["id"]][:, k].float())
            for r in records}


def rows(hidden: dict, layer: int = -1) -> tuple[torch.Tensor, list]:
    """(X [total steps, hidden] float32 of one layer, the question id of each row)."""
    X = torch.cat([hidden["hidden"][i][:, layer].float() for i in hidden["ids"]])
    return X, [i for i in hidden["ids"] for _ in range(len(hidden["hidden"][i]))]


# ----------------------------------------------------------------------------------------
# 3. The linear probe: standardise, optional PCA, L2 logistic regression (float64, L-BFGS).
# ----------------------------------------------------------------------------------------
@dataclass
class Probe:
    mean: torch.Tensor      # [D] of the fitted rows
    std: torch.Tensor       # [D], 1 where a column is constant
    proj: torch.Tensor | None  # [D, dim]: the fitted rows' principal directions, or None
    w: torch.Tensor         # [dim or D]
    b: torch.Tensor         # []

    def logit(self, X) -> torch.Tensor:
        Z = (torch.as_tensor(X, dtype=torch.float64) - self.mean) / self.std
        return (Z if self.proj is None else Z @ self.proj) @ self.w + self.b

    def score(self, X) -> torch.Tensor:
        """P(y = 1) per row, float64."""
        return torch.sigmoid(self.logit(X))


def fit_probe(X, y, l2: float = 1.0, dim: int | None = None, max_iter: int = 500) -> Probe:
    """Minimise (sum of log-losses + l2/2 |w|^2) / N (the bias unpenalised; sklearn's
    LogisticRegression(C=1/l2)) on X standardised by its own mean and std, projected on its
    first `dim` principal components (SVD of the standardised rows) if `dim` is given."""
    X = torch.as_tensor(X, dtype=torch.float64)
    y = torch.as_tensor(y, dtype=torch.float64)
    mean, std = X.mean(0), X.std(0, correction=0)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    Z, proj = (X - mean) / std, None
    if dim is not None and dim < Z.shape[1]:
        proj = torch.linalg.svd(Z, full_matrices=False).Vh[:dim].T
        Z = Z @ proj
    w = torch.zeros(Z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.logit(y.mean().clamp(1e-6, 1 - 1e-6)).detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-10, tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(Z @ w + b, y, reduction="sum")
                + 0.5 * l2 * w.square().sum()) / len(y)
        loss.backward()
        return loss
    opt.step(closure)
    return Probe(mean, std, proj, w.detach(), b.detach())


def group_folds(groups: list, folds: int = 5, seed: int = 0) -> torch.Tensor:
    """The fold of each row: the groups are shuffled (fixed seed) and dealt out in turn."""
    names = sorted(set(groups), key=str)
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
    fold_of = {names[j]: k % folds for k, j in enumerate(order)}
    return torch.tensor([fold_of[g] for g in groups])


def cross_fit(X, y, groups: list, folds: int = 5, l2: float = 1.0, seed: int = 0,
              dim: int | None = None, extra=None) -> torch.Tensor:
    """Out-of-fold P(y = 1) per row: each fold scored by a probe fitted (standardisation and
    PCA included) on the other folds only, plus `extra` = (X, y) rows that are never scored
    (probe data of other questions: in every fitting part). A fitting part with one class
    scores its rate."""
    X = torch.as_tensor(X, dtype=torch.float64)
    y = torch.as_tensor(y, dtype=torch.float64)
    Xe, ye = (torch.as_tensor(v, dtype=torch.float64) for v in extra) if extra is not None else \
        (X[:0], y[:0])
    fold = group_folds(groups, folds, seed)
    p = torch.empty(len(y), dtype=torch.float64)
    for k in fold.unique().tolist():
        train, test = fold != k, fold == k
        Xt, yt = torch.cat([X[train], Xe]), torch.cat([y[train], ye])
        if yt.min() == yt.max():
            p[test] = yt.mean()
        else:
            p[test] = fit_probe(Xt, yt, l2, dim).score(X[test])
    return p


PROBE_GRID = [(l2, dim) for dim in (8, 32, None) for l2 in (1.0, 10.0, 100.0)]


def select_probe(X, y, groups: list, folds: int = 5, grid=PROBE_GRID, extra=None) -> tuple:
    """(probe fitted on all rows, out-of-fold P(y = 1) per row, {"l2", "dim", "train_oof_auc"}):
    the L2 penalty and PCA dimension of `grid` with the best out-of-fold AUC on these rows
    (a question's rows in one fold; ties: the first in grid order). `extra` = (X, y): probe-data
    rows of other questions, in every fit and never scored (cross_fit)."""
    fits = {}
    n_fit = len(y) + (len(extra[1]) if extra is not None else 0)
    for l2, dim in grid:
        if dim is None or dim < n_fit:
            oof = cross_fit(X, y, groups, folds=folds, l2=l2, seed=0, dim=dim, extra=extra)
            fits[(l2, dim)] = (auc(oof, y), oof)
    (l2, dim), (train_auc, oof) = max(fits.items(), key=lambda kv: kv[1][0])
    if extra is not None:
        X, y = torch.cat([torch.as_tensor(X, dtype=torch.float64), torch.as_tensor(extra[0], dtype=torch.float64)]), \
            torch.cat([torch.as_tensor(y, dtype=torch.float64), torch.as_tensor(extra[1], dtype=torch.float64)])
    return fit_probe(X, y, l2=l2, dim=dim), oof, {"l2": l2, "dim": dim, "train_oof_auc": train_auc}


def probe_logit(p: torch.Tensor) -> torch.Tensor:
    """The feature a policy reads from a probe's probability: its logit, clamped to +-13.8
    (probabilities within 1e-6 of 0 or 1), so that one saturated row cannot dominate."""
    return torch.logit(torch.as_tensor(p, dtype=torch.float64).clamp(1e-6, 1 - 1e-6))


def auc(scores, y) -> float:
    """Area under the ROC curve (ties count half): P(score of a 1 > score of a 0)."""
    s, y = torch.as_tensor(scores, dtype=torch.float64), torch.as_tensor(y).bool()
    pos, neg = s[y], s[~y]
    if not len(pos) or not len(neg):
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean())


# ----------------------------------------------------------------------------------------
# 4. Command line: a table's hidden-state file.
# ----------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = make_parser(__doc__)
    p.add_argument("--table", required=True, help="trajectory table (rollout.py's JSONL)")
    p.add_argument("--small", default=None,
                   help="the small model (default: the table's pool.small.model, ~ expanded)")
    p.add_argument("--dtype", default="float32", help="dtype the model computes in (default float32)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    p.add_argument("--batch-size", type=int, default=8, help="questions per forward pass (default 8)")
    p.add_argument("--out", default=None,
                   help="hidden-state file (default runs/hidden/<table folder>-<table stem>.hidden.pt)")
    args = p.parse_args(argv)
    check_range("--batch-size", args.batch_size, 1)
    from engine import load_lm
    from table import read_table
    model = args.small or small_model_of(read_table(args.table), args.table)
    load_lm(model, check_only=True)  # a mistyped path or an unknown hub id: one line, now
    if Path(model).expanduser().exists():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local model: transformers never asks the hub
    start = time.time()
    got = hidden_for_table(args.table, args.small, args.out, args.dtype, batch_size=args.batch_size,
                           device=args.device)
    steps = sum(len(h) for h in got["hidden"].values())
    print(f"{got['path']}: {len(got['ids'])} questions, {steps} steps ({got['computed']} questions "
          f"computed), {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    run_cli(main)
