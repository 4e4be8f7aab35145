"""Stage 2 of stepwise model routing: train the escalation policy on the table (docs/DESIGN.md 1, 2, 4).

Run it (exactly one of --target-accuracy / --target-relative):

    python train_policy.py --train results/gsm8k/train.jsonl --target-relative 0.98 \\
        --out results/gsm8k/policy.pt

It writes the policy (torch file with feature names, normalisation, weights and a `meta`
dict), a per-iteration log `policy.log.jsonl` and a training curve `policy.curve.png`
next to it. The same seed gives identical weights.

The table written by rollout.py is an exact simulator (table.py): for every question it
holds the small model's solution step by step and the large model's continuation after every
prefix. So a router's episode on a question is fixed by one number, the step at which it
escalates (or never), and training needs no LLM call.

The method, top to bottom:

1. **State features** (section 4). `state_features()` describes the state after the draft of
   step t: the draft's token statistics and length, t, the tokens so far, running summaries
   of the accepted steps 1..t-1, whether the draft holds a boxed answer, and whether it
   ended the small model's solution. Training and route.py both call this one function.
2. **The table** (section 2). `build_table()` prices the records (table.Pricing: FLOPs by
   default, a prompt token R generated tokens with `--prompt-cost R`; or dollars with
   `--price-small IN,OUT --price-large IN,OUT`), takes the correctness and cost of every
   outcome from table.py (escalate at step t, never escalate, the large model alone) and
   adds the state features of every drafted step.
   **The small model's hidden state** (`--hidden-state`, section 4). The token statistics
   barely tell when the small model goes wrong; its middle-layer state at the end of each
   drafted step tells it far better. `fit_hidden_probe()` fits a linear probe (probe.py: L2
   logistic regression, penalty and PCA dimension chosen by out-of-fold AUC on the training
   questions alone) for "the small model's own answer is wrong" on the states kept beside the
   table (TABLE.hidden.pt, `rollout.py --add-hidden TABLE`); its logit at the draft is one more
   feature, `draft_hidden_wrong`. The training questions' own features are its OUT-OF-FOLD
   logits (a question's steps scored by a probe that never saw it), so the policy learns how
   far to trust the probe on questions it has not seen; the probe refitted on all of them is
   stored in policy.pt (layer, dimension, normalisation, weights), and calibrate.py,
   evaluate.py and route.py read every other table's, and the live drafter's, states through
   it. `--hidden` with no widths gives a linear policy (the variant checked on fresh questions:
   README).
3. **Policy.** `Policy` is an MLP on normalised features giving p(escalate | s_t).
4. **Training** (section 1). Episodes are sampled from the stochastic policy (Bernoulli
   escalation at each valid step, stop at the first escalation) and scored: correct in
   {0, 1}, cost divided by the MEAN all-large cost over the training questions (so the mean
   episode cost is exactly the relative cost that calibrate.py and evaluate.py report: sum
   of costs / sum of all-large costs). We descend
   L(theta, lambda) = E[cost] - lambda * (E[correct] - target)
   with REINFORCE (a leave-one-out baseline over several episodes per question), and raise
   lambda >= 0 by dual ascent while the batch accuracy is under the target (it falls when
   over). `--estimator exact` instead differentiates the closed-form expectation, with
   P(escalate at t) = p_t * prod_{s<t} (1 - p_s) and P(never) = prod_s (1 - p_s).
   A small penalty on the squared logits (`--logit-l2`) keeps the policy stochastic: without
   it the logits drift to +-30 or more (Adam keeps pushing saturated sigmoids), exploration
   dies on the states that were "never escalate" during a low-lambda phase, and on some
   seeds the final policy ranks states badly; it also keeps p away from 1 in float64.

Every training setting has its default in ONE place, `TrainConfig`; the command line
reads its defaults from there and hands every setting to `train()`.

The policy file records the hashes of its training questions (table.question_hash) so that
later stages can refuse a table that shares questions with it. Conventions on questions
without steps and null answers: table.py.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import probe
from cli import UsageError, check_range, make_parser, plural, run_cli
from table import (Pricing, Table, add_pricing_args, add_target_args, load_records, outcome_columns,
                   outcome_table, prm_price_from_args, question_hash, read_table, resolve_target, table_pool,
                   with_prm_cost)


# ----------------------------------------------------------------------------------------
# 1. State features (DESIGN section 4). ONE function, called by training and by route.py.
# ----------------------------------------------------------------------------------------
BASE_FEATURES = [
    "draft_mean_logprob", "draft_min_logprob", "draft_mean_entropy", "draft_max_entropy",
    "draft_tokens",
    "step",                    # t, 1-based
    "tokens_so_far",           # generated small tokens of steps 1..t (the draft included)
    "prompt_tokens",           # the small model's prompt (the question)
    "prev_min_mean_logprob",   # summaries of the accepted steps 1..t-1; 0.0 when t = 1
    "prev_min_min_logprob",
    "prev_max_mean_entropy",
    "prev_max_max_entropy",
    "draft_has_boxed",         # 1.0 if the draft contains "\boxed"
    "ended",                   # 1.0 if the draft ended the small model's solution (EOS / limit)
]
# The process reward model's judgement (steps[i].prm_score, rollout.py --prm; DESIGN section 5,
# policy+prm): only for policies trained with --with-prm, whose cost then includes the PRM's.
PRM_FEATURES = [
    "draft_prm_score",         # the PRM's score of the prefix ending at the draft
    "prev_min_prm_score",      # the lowest score of the accepted steps 1..t-1; 1.0 when t = 1
]
# The small model's hidden state (steps[i].hidden_wrong, the logit of the policy's probe at the
# draft): only for policies trained with --hidden-state, which carry the probe.
HIDDEN_FEATURES = [
    "draft_hidden_wrong",      # logit P(the small model's answer is wrong | its state at the draft)
]
# The decision before the first draft (--before-draft): from the question's own hidden state
# (the prompt's last token), hand the question to the large model alone, nothing drafted.
BEFORE_FEATURES = [
    "question_hidden_wrong",   # logit P(the small model's answer is wrong | its state at the question)
    "before_draft",            # 1.0 in the state before the first draft, 0.0 after a draft
]
FEATURE_NAMES = BASE_FEATURES + PRM_FEATURES + HIDDEN_FEATURES + BEFORE_FEATURES   # the table's columns


def uses_prm(policy) -> bool:
    """Does the policy read the PRM's scores (so that consulting it is part of its cost)?"""
    return any(f in PRM_FEATURES for f in policy.feature_names)


def uses_hidden(policy) -> bool:
    """Does the policy read the small model's hidden state (through its stored probes)?"""
    return any(f in HIDDEN_FEATURES + BEFORE_FEATURES for f in policy.feature_names)


def decides_before_draft(policy) -> bool:
    """Does the policy also decide before the first draft (hand the question to the large model)?"""
    return "before_draft" in policy.feature_names


def state_features(prompt_tokens: int, steps: list[dict], ended: bool, question_wrong: float = 0.0) -> list[float]:
    """Features of the state after the draft of step t = len(steps), in FEATURE_NAMES order.

    steps[-1] is the draft, steps[:-1] the accepted steps; each step is a dict with text,
    tokens, mean_logprob, min_logprob, mean_entropy, max_entropy, and prm_score where the
    PRM scored it (0.0 where not: only policies trained --with-prm read it, on scored tables),
    hidden_wrong where a probe read its hidden state (0.0 where not: only policies trained
    --hidden-state read it).
    `ended` says the draft ended the small model's solution (on the table: t == n).
    """
    if not steps:
        raise ValueError("state_features needs at least the drafted step")
    draft, accepted = steps[-1], steps[:-1]
    if accepted:
        prev = (min(s["mean_logprob"] for s in accepted), min(s["min_logprob"] for s in accepted),
                max(s["mean_entropy"] for s in accepted), max(s["max_entropy"] for s in accepted))
    else:
        prev = (0.0, 0.0, 0.0, 0.0)  # no accepted step: no evidence of trouble
    return [float(draft["mean_logprob"]), float(draft["min_logprob"]),
            float(draft["mean_entropy"]), float(draft["max_entropy"]), float(draft["tokens"]),
            float(len(steps)), float(sum(s["tokens"] for s in steps)), float(prompt_tokens),
            *map(float, prev),
            1.0 if "\\boxed" in draft["text"] else 0.0, 1.0 if ended else 0.0,
            float(draft.get("prm_score", 0.0)),
            min((float(s.get("prm_score", 0.0)) for s in accepted), default=1.0),
            float(draft.get("hidden_wrong", 0.0)), float(question_wrong), 0.0]


def before_draft_features(question_wrong: float) -> list[float]:
    """Features of the state before the first draft, in FEATURE_NAMES order: nothing drafted
    (every step feature 0), the question probe's logit, before_draft = 1."""
    x = [0.0] * len(FEATURE_NAMES)
    x[FEATURE_NAMES.index("question_hidden_wrong")], x[FEATURE_NAMES.index("before_draft")] = question_wrong, 1.0
    return x


# ----------------------------------------------------------------------------------------
# 2. The table with the policy's inputs: the simulator's outcome and cost columns
# (table.Table, priced per DESIGN section 2) and the state features of every drafted step.
# ----------------------------------------------------------------------------------------
@dataclass
class FeatureTable(Table):
    features: torch.Tensor = None   # [Q,T,F] float32, raw state_features of each drafted step
    question_wrong: torch.Tensor | None = None   # [Q] the question probe's logit (--before-draft)
    question_cost: torch.Tensor | None = None    # [Q] the small model reading the question (its prompt)
    before_draft: bool = False      # column 0 is the decision before the first draft (with_before_draft)


def build_table(records: list[dict], pricing: Pricing, prm_price: float | None = None,
                hidden_wrong: dict | None = None, question_wrong: dict | None = None) -> FeatureTable:
    """`hidden_wrong`: {question id: [n_steps] the probe's logit at each step} (a policy
    trained --hidden-state), `question_wrong`: {question id: the question probe's logit}
    (--before-draft); else those features are 0."""
    outcomes = outcome_table(records, pricing, prm_price)
    feats = torch.zeros(outcomes.Q, outcomes.T, len(FEATURE_NAMES), dtype=torch.float32)
    qw = torch.tensor([float(question_wrong[r["id"]]) if question_wrong else 0.0 for r in records],
                      dtype=torch.float32)
    for i, rec in enumerate(records):
        steps, n = rec["small"]["steps"], len(rec["small"]["steps"])
        if hidden_wrong is not None:
            steps = [{**s, "hidden_wrong": float(v)} for s, v in zip(steps, hidden_wrong[rec["id"]])]
        if n:
            feats[i, :n] = torch.tensor([state_features(rec["small"]["prompt_tokens"], steps[:t],
                                                        ended=(t == n), question_wrong=float(qw[i]))
                                         for t in range(1, n + 1)], dtype=torch.float32)
    question_cost = torch.tensor([pricing.small_in * r["small"]["prompt_tokens"] if r["small"]["steps"] else 0.0
                                  for r in records], dtype=torch.float64)
    return FeatureTable(**vars(outcomes), features=feats,
                        question_wrong=qw if question_wrong is not None else None, question_cost=question_cost)


def with_before_draft(table: FeatureTable) -> FeatureTable:
    """The table as a policy that also decides before the first draft sees it: a column 0
    prepended whose "escalation" is the large model alone (nothing drafted; the small model
    has read the question for its state, which --prompt-cost charges), whose state is
    before_draft_features(); column t is then the draft of step t. Every first-crossing router,
    the exact expectation and REINFORCE work on it unchanged: a threshold kappa now also hands
    the question to the large model at once where p(before the draft) >= kappa."""
    if table.before_draft:
        return table
    if table.question_wrong is None:
        raise UsageError("a policy that decides before the first draft needs the question probe's "
                         "logits on the table (load_table with the policy)")
    cols, Q, large = outcome_columns(table), table.Q, table.T + 1
    first = {k: cols[k][:, large:large + 1] for k in ("correct", "cost", "small_tokens", "large_tokens")}
    x0 = torch.tensor(before_draft_features(0.0), dtype=torch.float32).expand(Q, 1, -1).clone()
    x0[:, 0, FEATURE_NAMES.index("question_hidden_wrong")] = table.question_wrong
    pad = lambda v: None if v is None else torch.cat([torch.zeros(Q, 1, dtype=v.dtype), v], 1)   # noqa: E731
    return dataclasses.replace(
        table, mask=torch.cat([torch.ones(Q, 1, dtype=torch.bool), table.mask], 1), n_steps=table.n_steps + 1,
        esc_correct=torch.cat([first["correct"], table.esc_correct], 1),
        esc_cost=torch.cat([first["cost"] + table.question_cost[:, None], table.esc_cost], 1),
        esc_small_tokens=torch.cat([first["small_tokens"], table.esc_small_tokens], 1),
        esc_large_tokens=torch.cat([first["large_tokens"], table.esc_large_tokens], 1),
        features=torch.cat([x0, table.features], 1), prm_score=pad(table.prm_score),
        prm_tokens=pad(table.prm_tokens), before_draft=True)


def policy_view(table: FeatureTable, policy) -> FeatureTable:
    """The table a policy is scored on: with the decision before the first draft where the
    policy makes one (with_before_draft), else the table itself."""
    return with_before_draft(table) if decides_before_draft(policy) else table


def table_routes(esc: torch.Tensor, table: FeatureTable) -> torch.Tensor:
    """Routes on a with_before_draft() view -> routes on the table itself (table.route_outcomes'
    convention: 0..T-1 escalate at step t+1, T never, T+1 the large model alone)."""
    if not table.before_draft:
        return esc
    T = table.T - 1
    return torch.where(esc == 0, T + 1, torch.where(esc >= table.T, T, esc - 1))


def prm_table(table: Table, what) -> Table:
    """The table with the PRM's cost (table.with_prm_cost), for a policy reading its scores."""
    if table.prm_score is None:
        raise UsageError(f"{what}: a policy with the PRM's features needs PRM scores on every "
                         f"question (rollout.py --prm MODEL --rescore TABLE)")
    if table.prm_price is None:
        raise UsageError(f"{what}: dollar pricing needs --price-prm for a policy with the PRM's features")
    return with_prm_cost(table)


def load_table(path, args, policy=None) -> FeatureTable:
    """read_table + pricing flags -> FeatureTable (what every table stage starts with). For a
    `policy` that reads the hidden state, its probes' logits from the table's sidecar."""
    records, pricing = load_records(path, args)
    hidden = question = None
    if policy is not None and uses_hidden(policy):
        states = probe.table_states(path, records, policy.probe_info["layer"])
        hidden = {i: hidden_wrong_logits(policy.probe, steps) for i, (_, steps) in states.items()}
        if policy.question_probe is not None:
            question = {i: float(hidden_wrong_logits(policy.question_probe, q[None])[0])
                        for i, (q, _) in states.items()}
    return build_table(records, pricing, prm_price_from_args(args, pricing, records), hidden, question)


# ----------------------------------------------------------------------------------------
# 2b. The hidden-state probe (--hidden-state): "the small model's own answer is wrong" from
# its state at each drafted step; out of fold on the training questions.
# ----------------------------------------------------------------------------------------
PROBE_LABEL = "the small model's own answer is wrong"


def hidden_wrong_logits(fitted: probe.Probe, steps: torch.Tensor) -> torch.Tensor:
    """The feature draft_hidden_wrong of each state row [n, hidden] -> [n] float64."""
    return probe.probe_logit(fitted.score(steps)) if len(steps) else torch.zeros(0, dtype=torch.float64)


def probe_rows(records: list[dict], states: dict, question: bool = False) -> tuple:
    """(X, y): one row per drafted step (or per question, its state before any draft), labelled
    1.0 where that question's small answer is wrong."""
    at = (lambda r: [0]) if question else (lambda r: range(len(r["small"]["steps"])))
    X = torch.cat([states[r["id"]][0][None] if question else states[r["id"]][1] for r in records])
    y = torch.tensor([0.0 if r["small"]["correct"] else 1.0 for r in records for _ in at(r)],
                     dtype=torch.float64)
    return X, y


def fit_hidden_probe(records: list[dict], states: dict, folds: int = 5, question: bool = False,
                     extra=None) -> tuple:
    """(the probe fitted on every training step, its settings and out-of-fold AUC, {id: [n]
    out-of-fold logits}): one row per drafted step, labelled by whether that question's small
    answer is wrong; a question's rows share a fold. `question`: one row per question instead,
    its state before any draft (the question probe of --before-draft; {id: [1] logit}).
    `extra` = (X, y) from probe_rows() of probe data (--probe-data: other questions' small-only
    solutions): in every fit, never scored, so the training table's features stay out of fold."""
    at = (lambda r: [0]) if question else (lambda r: range(len(r["small"]["steps"])))
    rows = [(r["id"], t) for r in records for t in at(r)]
    if not rows:
        raise UsageError("--hidden-state: the training table has no small steps")
    X, y = probe_rows(records, states, question)
    both = y if extra is None else torch.cat([y, extra[1]])
    if both.min() == both.max():
        raise UsageError("--hidden-state: the probe needs training questions the small model gets "
                         "wrong and ones it gets right")
    fitted, oof, info = probe.select_probe(X, y, [i for i, _ in rows], folds=folds, extra=extra)
    logits, i = {}, 0
    for r in records:
        n = len(at(r))
        logits[r["id"]] = probe.probe_logit(oof[i:i + n])
        i += n
    return fitted, {**info, "label": PROBE_LABEL, "rows": len(y),
                    "probe_data_rows": 0 if extra is None else len(extra[1])}, logits


def read_probe_data(paths: list, training: list[dict]) -> tuple[list[dict], dict, list[str]]:
    """--probe-data: small-only records (tools/probe_data.py) with their states (each file's
    sidecar), less any question the training table holds (by question hash): (records, states,
    hashes of the questions kept, for the overlap checks of later stages)."""
    taken = {question_hash(r["question"]) for r in training}
    records, states = [], {}
    for path in paths:
        recs = [r for r in read_table(path, small_only=True) if question_hash(r["question"]) not in taken]
        got = probe.table_states(path, recs, probe.SIDECAR_LAYERS[0])
        for r in recs:   # ids may repeat across files: keyed by file
            key = f"{path}::{r['id']}"
            records.append({**r, "id": key})
            states[key] = got[r["id"]]
    return records, states, [question_hash(r["question"]) for r in records]


# ----------------------------------------------------------------------------------------
# 3. The policy: an MLP on normalised features -> p(escalate | s_t).
# ----------------------------------------------------------------------------------------
POLICY_FORMAT = "stepwise-routing-policy/1"
ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}


class Policy(nn.Module):
    """p(escalate | state). Input: RAW features [..., len(FEATURE_NAMES)] in FEATURE_NAMES
    order (state_features output); the policy picks its own feature columns, normalises them
    with the mean/std fitted on the training table, and returns probabilities in (0, 1)."""

    def __init__(self, feature_names=FEATURE_NAMES, hidden=(64, 64), activation="tanh",
                 columns=FEATURE_NAMES):
        super().__init__()
        unknown = [f for f in feature_names if f not in columns]
        if unknown:
            raise UsageError(f"features this build does not compute: {', '.join(unknown)}")
        self.feature_names, self.hidden, self.activation = list(feature_names), list(hidden), activation
        # `columns`: the names of the feature tensor's last dimension (FEATURE_NAMES for every
        # table of the stages; ablate.py appends experimental columns)
        self.register_buffer("columns", torch.tensor([list(columns).index(f) for f in feature_names]),
                             persistent=False)
        self.register_buffer("mean", torch.zeros(len(feature_names)))
        self.register_buffer("std", torch.ones(len(feature_names)))
        layers, width = [], len(feature_names)
        for h in hidden:
            layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
            width = h
        self.net = nn.Sequential(*layers, nn.Linear(width, 1))
        self.meta: dict = {}
        # --hidden-state: the probe that turns the small model's state into draft_hidden_wrong,
        # and what it reads ({"layer", "width", "label", "l2", "dim", ...})
        self.probe: probe.Probe | None = None
        self.probe_info: dict = {}
        self.question_probe: probe.Probe | None = None   # --before-draft: the same, on the question's state
        self.question_probe_info: dict = {}

    def fit_normalisation(self, features: torch.Tensor, mask: torch.Tensor) -> None:
        x = features[..., self.columns][mask].double()
        self.mean.copy_(x.mean(0))
        std = x.std(0, unbiased=False)
        self.std.copy_(torch.where(std > 1e-8, std, torch.ones_like(std)))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        x = (features[..., self.columns] - self.mean) / self.std
        return self.net(x).squeeze(-1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """p(escalate) as float64, so that probabilities near 1 stay distinct for kappa."""
        return torch.sigmoid(self.logits(features).double())


PROBE_FIELDS = ("mean", "std", "proj", "w", "b")


def save_policy(path, policy: Policy, meta: dict) -> None:
    policy.meta = meta
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"format": POLICY_FORMAT, "feature_names": policy.feature_names,
            "hidden": policy.hidden, "activation": policy.activation,
            "state_dict": policy.state_dict(), "meta": meta}
    for key, fitted, info in (("probe", policy.probe, policy.probe_info),
                              ("question_probe", policy.question_probe, policy.question_probe_info)):
        if fitted is not None:
            blob[key] = {**{k: getattr(fitted, k) for k in PROBE_FIELDS}, "info": info}
    torch.save(blob, path)


def load_policy(path) -> Policy:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such policy file")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a bad file
        raise UsageError(f"{path}: not a readable policy file ({type(err).__name__})") from None
    if not isinstance(blob, dict) or blob.get("format") != POLICY_FORMAT:
        raise UsageError(f"{path}: not a policy file of format {POLICY_FORMAT}")
    try:
        names, hidden, act = list(blob["feature_names"]), list(blob["hidden"]), blob["activation"]
    except (KeyError, TypeError):
        raise UsageError(f"{path}: policy file lacks feature_names/hidden/activation") from None
    missing = [f for f in names if f not in FEATURE_NAMES]
    if missing:
        raise UsageError(f"{path}: the policy uses features this build does not compute: "
                         f"{', '.join(missing)}")
    if act not in ACTIVATIONS:
        raise UsageError(f"{path}: unknown activation {act!r}")
    policy = Policy(names, hidden, act)
    try:
        policy.load_state_dict(blob["state_dict"])
    except (KeyError, RuntimeError) as err:
        raise UsageError(f"{path}: weights do not fit the stored architecture ({str(err).splitlines()[0]})") from None
    policy.meta = blob.get("meta") or {}
    needs = (["probe"] if uses_hidden(policy) else []) + (["question_probe"] if decides_before_draft(policy) else [])
    for key in needs:
        try:
            setattr(policy, key, probe.Probe(**{k: blob[key][k] for k in PROBE_FIELDS}))
            setattr(policy, f"{key}_info", dict(blob[key]["info"]))
        except (KeyError, TypeError):
            raise UsageError(f"{path}: the policy reads the hidden state but carries no {key}") from None
    return policy.eval()


@torch.no_grad()
def policy_probs(policy: Policy, table: Table) -> torch.Tensor:
    """p(escalate) at every step of the table, [Q,T] float64, 0 on padded steps."""
    return torch.where(table.mask, policy(table.features), 0.0)


# ----------------------------------------------------------------------------------------
# 4. Training (DESIGN section 1).
# ----------------------------------------------------------------------------------------
def escalation_distribution(p: torch.Tensor, mask: torch.Tensor):
    """Escalation distribution of the stochastic policy: P(esc at t) = p_t prod_{s<t}(1-p_s)
    over valid steps [..., T], and P(never) = prod over valid steps of (1 - p_s) [...]."""
    p = torch.where(mask, p, torch.zeros_like(p))
    survive = torch.cumprod(1 - p, dim=-1)
    before = torch.cat([torch.ones_like(survive[..., :1]), survive[..., :-1]], dim=-1)
    return p * before, survive[..., -1]


def episode_values(table: Table):
    """Per question, correct and cost of each outcome: columns 0..T-1 escalate at step t+1,
    column T never escalate. [Q,T+1] each. Costs are divided by the MEAN all-large cost over
    the table's questions, so the mean cost over questions of any router is exactly its
    relative cost sum(costs) / sum(all-large costs), the number calibration and evaluation
    report (DESIGN section 1)."""
    cols = outcome_columns(table)
    correct, cost = cols["correct"][:, :-1], cols["cost"][:, :-1] / table.large_cost.mean()
    return correct.float(), cost.float()


def lagrangian(policy, features, mask, correct, cost, lam, target, estimator="exact",
               episodes=8, generator=None, logit_l2=0.0):
    """A loss whose gradient is (an estimate of) grad_theta of mean_q L_q(theta, lambda),
    L_q = E[cost_q] - lambda * (E[correct_q] - target), plus logit_l2 * mean z^2 over valid
    steps (z = logit p). Returns (loss, stats)."""
    T = mask.shape[-1]
    z = policy.logits(features)                                       # [B,T]
    penalty = logit_l2 * (z.square() * mask).sum() / mask.sum().clamp(min=1)
    if estimator == "exact":
        p_esc, p_never = escalation_distribution(torch.sigmoid(z), mask)
        e_correct = (p_esc * correct[:, :T]).sum(-1) + p_never * correct[:, T]
        e_cost = (p_esc * cost[:, :T]).sum(-1) + p_never * cost[:, T]
        lagr = (e_cost - lam * (e_correct - target)).mean()
        return lagr + penalty, {"accuracy": e_correct.mean().item(), "cost": e_cost.mean().item(),
                                "loss": lagr.item()}
    # REINFORCE: `episodes` sampled episodes per question, leave-one-out baseline.
    B = z.shape[0]
    with torch.no_grad():
        u = torch.rand(B, episodes, T, generator=generator)
        fire = (u < torch.sigmoid(z)[:, None, :]) & mask[:, None, :]
        first = torch.where(fire.any(-1), fire.to(torch.uint8).argmax(-1), T)   # [B,E], T = never
        ep_correct = correct.gather(1, first)
        ep_cost = cost.gather(1, first)
        ell = ep_cost - lam * (ep_correct - target)
        adv = ell - (ell.sum(1, keepdim=True) - ell) / (episodes - 1)
    steps = torch.arange(T)
    accepted = (steps < first[..., None]) & mask[:, None, :]           # [B,E,T]
    logp = (F.logsigmoid(-z)[:, None, :] * accepted).sum(-1)
    logp = logp + torch.where(first < T, F.logsigmoid(z).gather(1, first.clamp(max=T - 1)), 0.0)
    loss = (adv * logp).mean() + penalty
    return loss, {"accuracy": ep_correct.mean().item(), "cost": ep_cost.mean().item(),
                  "loss": ell.mean().item()}


@dataclass
class TrainConfig:
    """Every training setting and its default: the one place both train() and the command
    line (train_policy.py --help) read them from."""
    hidden: tuple = (64, 64)        # hidden widths of the MLP
    activation: str = "tanh"
    features: tuple = tuple(BASE_FEATURES)   # --with-prm adds PRM_FEATURES
    iters: int = 600                # training iterations
    batch_size: int = 256           # questions per iteration
    episodes: int = 8               # REINFORCE episodes per question (leave-one-out baseline)
    lr: float = 1e-2                # Adam learning rate
    lambda_lr: float = 0.5          # dual ascent step on lambda
    lambda_init: float = 1.0
    logit_l2: float = 1e-2          # penalty C * mean logit^2 (keeps the policy stochastic)
    estimator: str = "reinforce"    # or "exact"
    seed: int = 0


def train(table: Table, target: float, config: TrainConfig | None = None, log=None,
          columns=FEATURE_NAMES, **overrides) -> tuple[Policy, float]:
    """Primal-dual training with `config` (TrainConfig defaults; keyword overrides allowed).
    Returns the policy and the final lambda. `log(dict)` per iteration. `columns` names the
    last dimension of table.features (see Policy)."""
    cfg = replace(config or TrainConfig(), **overrides)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    policy = Policy(list(cfg.features), list(cfg.hidden), cfg.activation, columns)
    if not table.mask.any():
        raise UsageError("the training table has no small steps: nothing to decide")
    policy.fit_normalisation(table.features, table.mask)
    correct, cost = episode_values(table)
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    lam = float(cfg.lambda_init)
    for it in range(cfg.iters):
        idx = torch.randint(table.Q, (cfg.batch_size,), generator=gen)
        loss, stats = lagrangian(policy, table.features[idx], table.mask[idx], correct[idx],
                                 cost[idx], lam, target, cfg.estimator, cfg.episodes, gen, cfg.logit_l2)
        opt.zero_grad()  # ALGO LOGIC: a descent step on theta, then dual ascent on lambda
        loss.backward()
        opt.step()
        if log:
            log({"iter": it, "lambda": lam, **stats})
        lam = max(0.0, lam + cfg.lambda_lr * (target - stats["accuracy"]))   # dual ascent
    return policy.eval(), lam


def plot_curve(history: list[dict], target: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    it = [h["iter"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, key, label in zip(axes, ("accuracy", "cost", "lambda"),
                              ("batch accuracy", "batch cost (rel. to mean all-large)", "lambda")):
        y = torch.tensor([h[key] for h in history], dtype=torch.float64)
        ax.plot(it, y, lw=0.5, alpha=0.4)
        w = max(1, len(y) // 50)
        smooth = torch.nn.functional.avg_pool1d(y[None, None], w, 1).flatten() if len(y) >= w else y
        ax.plot(it[w - 1:], smooth, lw=1.5)
        if key == "accuracy":
            ax.axhline(target, color="k", ls="--", lw=1, label=f"target {target:.3f}")
            ax.legend()
        ax.set_xlabel("iteration")
        ax.set_title(label, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser():
    D = TrainConfig()   # every default below comes from here
    parser = make_parser(__doc__)
    parser.add_argument("--train", required=True, metavar="PATH", help="schema-1 trajectory table (JSONL)")
    parser.add_argument("--out", required=True, metavar="PATH",
                        help="policy file to write; the log (.log.jsonl) and curve (.curve.png) go next to it")
    add_target_args(parser)
    g = parser.add_argument_group("training (defaults: TrainConfig)")
    g.add_argument("--hidden", type=int, nargs="*", default=list(D.hidden), metavar="H",
                   help=f"hidden widths of the MLP; none (`--hidden` alone) for a linear policy "
                        f"(default {' '.join(map(str, D.hidden))})")
    g.add_argument("--activation", choices=sorted(ACTIVATIONS), default=D.activation,
                   help=f"hidden activation (default {D.activation})")
    g.add_argument("--features", default=",".join(D.features), metavar="A,B,...",
                   help="comma-separated subset of the state features (default: all but "
                        "the PRM's)")
    g.add_argument("--with-prm", action="store_true",
                   help=f"add the PRM's features ({', '.join(PRM_FEATURES)}) to --features: the "
                        f"table needs PRM scores (rollout.py --prm / --rescore), and the training "
                        f"cost includes the PRM's (policy+prm in evaluate.py --policy-prm)")
    g.add_argument("--hidden-state", action="store_true",
                   help=f"add the small model's hidden state ({', '.join(HIDDEN_FEATURES)}: a probe "
                        f"fitted here, out of fold on the training questions, stored in the policy); "
                        f"every table the policy meets needs its states beside it (TABLE.hidden.pt: "
                        f"rollout.py --add-hidden TABLE), and route.py a local small model")
    g.add_argument("--before-draft", action="store_true",
                   help=f"with --hidden-state: also decide before the first draft, from the question's "
                        f"own state ({', '.join(BEFORE_FEATURES)}: a second probe, on the prompt's last "
                        f"token), whether the large model takes the question alone (nothing drafted)")
    g.add_argument("--probe-data", nargs="+", metavar="FILE", default=None,
                   help="with --hidden-state: small-only solutions of other questions, each with its "
                        "states beside it (tools/probe_data.py), added to every fit of the probes "
                        "(never scored: the training table's features stay out of fold); later stages "
                        "refuse tables that share questions with them")
    g.add_argument("--probe-folds", type=int, default=5,
                   help="cross-fitting folds of the hidden-state probe (default 5)")
    g.add_argument("--iters", type=int, default=D.iters, help=f"training iterations (default {D.iters})")
    g.add_argument("--batch-size", type=int, default=D.batch_size,
                   help=f"questions per iteration (default {D.batch_size})")
    g.add_argument("--episodes", type=int, default=D.episodes,
                   help=f"REINFORCE episodes per question, >= 2 (leave-one-out baseline; default {D.episodes})")
    g.add_argument("--lr", type=float, default=D.lr, help=f"Adam learning rate (default {D.lr:g})")
    g.add_argument("--lambda-lr", type=float, default=D.lambda_lr,
                   help=f"dual ascent step on lambda (default {D.lambda_lr:g})")
    g.add_argument("--lambda-init", type=float, default=D.lambda_init,
                   help=f"initial lambda >= 0 (default {D.lambda_init:g})")
    g.add_argument("--logit-l2", type=float, default=D.logit_l2, metavar="C",
                   help="penalty C * mean logit^2 that keeps the policy stochastic, so it keeps "
                        f"exploring and its probabilities stay distinct (default {D.logit_l2:g})")
    g.add_argument("--estimator", choices=["reinforce", "exact"], default=D.estimator,
                   help="REINFORCE on sampled episodes, or the closed-form expectation "
                        f"(default {D.estimator})")
    g.add_argument("--seed", type=int, default=D.seed,
                   help=f"seed of the initial weights and the sampling (default {D.seed})")
    add_pricing_args(parser)
    return parser


def config_from_args(args) -> TrainConfig:
    """Every TrainConfig field from the flag of the same name: no setting can be parsed
    and then dropped on the way to train()."""
    for name, lo in (("--iters", 1), ("--batch-size", 1), ("--episodes", 2)):
        check_range(name, getattr(args, name[2:].replace("-", "_")), lo)
    check_range("--lr", args.lr, 0.0, None, lo_open=True)
    check_range("--lambda-lr", args.lambda_lr, 0.0)
    check_range("--lambda-init", args.lambda_init, 0.0)
    check_range("--logit-l2", args.logit_l2, 0.0)
    if any(h < 1 for h in args.hidden):
        raise UsageError(f"--hidden widths must be >= 1, got {args.hidden}")
    features = [f.strip() for f in args.features.split(",") if f.strip()]
    unknown = [f for f in features if f not in FEATURE_NAMES]
    if unknown or not features:
        raise UsageError(f"--features: unknown {', '.join(unknown) or '(empty list)'}; "
                         f"choose from {', '.join(FEATURE_NAMES)}")
    if getattr(args, "with_prm", False):
        features += [f for f in PRM_FEATURES if f not in features]
    if getattr(args, "probe_data", None) and not getattr(args, "hidden_state", False):
        raise UsageError("--probe-data trains the hidden-state probe: it needs --hidden-state")
    if getattr(args, "before_draft", False) and not getattr(args, "hidden_state", False):
        raise UsageError("--before-draft decides from the question's hidden state: it needs --hidden-state")
    if getattr(args, "hidden_state", False):
        features += [f for f in HIDDEN_FEATURES if f not in features]
    if getattr(args, "before_draft", False):
        features += [f for f in BEFORE_FEATURES if f not in features]
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    return TrainConfig(**{**values, "hidden": tuple(args.hidden), "features": tuple(features)})


def main(argv=None):
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)   # tiny tensors: extra threads only add overhead (and noise)
    config = config_from_args(args)

    records, pricing = load_records(args.train, args)
    probes, logits, probe_hashes = {}, {}, []   # "step" / "question": (probe, info); out-of-fold logits
    if any(f in HIDDEN_FEATURES for f in config.features):   # the probes on the small model's state
        check_range("--probe-folds", args.probe_folds, 2)
        layer = probe.SIDECAR_LAYERS[0]
        states = probe.table_states(args.train, records, layer)
        extra_recs, extra_states, probe_hashes = read_probe_data(args.probe_data, records) \
            if args.probe_data else ([], {}, [])
        for kind in ["step"] + (["question"] if args.before_draft else []):
            extra = probe_rows(extra_recs, extra_states, kind == "question") if extra_recs else None
            fitted, info, logits[kind] = fit_hidden_probe(records, states, args.probe_folds, kind == "question",
                                                          extra)
            probes[kind] = (fitted, {**info, "layer": layer, "width": int(fitted.mean.numel()),
                                     "model": table_pool(records)["small"].get("model")})
            print(f"hidden-state probe at each {'question' if kind == 'question' else 'drafted step'} "
                  f"({PROBE_LABEL}; {layer} layer, width {probes[kind][1]['width']}): L2 {info['l2']:g}, PCA "
                  f"{info['dim']}, out-of-fold AUC {info['train_oof_auc']:.3f} on {plural(info['rows'], 'row')}"
                  + (f" (+ {info['probe_data_rows']} probe-data rows of {len(extra_recs)} questions)" if extra_recs else ""))
    question = {i: float(v[0]) for i, v in logits["question"].items()} if "question" in logits else None
    table = build_table(records, pricing, prm_price_from_args(args, pricing, records), logits.get("step"), question)
    if any(f in PRM_FEATURES for f in config.features):   # policy+prm: it pays for the PRM
        table = prm_table(table, args.train)
    if question is not None:   # the decision before the first draft is column 0
        table = with_before_draft(table)
    target, target_spec = resolve_target(args, table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path, curve_path = out.with_suffix(".log.jsonl"), out.with_suffix(".curve.png")
    print(f"training on {plural(table.Q, 'question')} ({plural(int(table.mask.sum()), 'step')}), "
          f"target accuracy {target:.4f} {target_spec}, large {table.large_correct.mean():.4f}, "
          f"small {table.small_correct.mean():.4f}, estimator {config.estimator}")

    # ALGO LOGIC: primal-dual training on the table (train(), above, is the method)
    history = []
    start = time.perf_counter()
    policy, lam = train(table, target, config, log=history.append)
    seconds = time.perf_counter() - start
    policy.probe, policy.probe_info = probes.get("step", (None, {}))
    policy.question_probe, policy.question_probe_info = probes.get("question", (None, {}))

    with torch.no_grad():   # the trained stochastic policy on the whole training table
        p_esc, p_never = escalation_distribution(policy_probs(policy, table), table.mask)
        acc = ((p_esc * table.esc_correct).sum(-1) + p_never * table.small_correct).mean().item()
        rel = table.relative_cost((p_esc * table.esc_cost).sum(-1) + p_never * table.small_cost).item()
    meta = {"pool": table.pool, "pricing": asdict(table.pricing), "prm_price": table.prm_price
            if table.prm_priced else None, "target": target,
            "target_spec": target_spec, "train": str(args.train), "n_train": table.Q,
            "question_hashes": table.hashes, "probe_data": args.probe_data, "probe_data_hashes": probe_hashes,
            "settings": next((r["settings"] for r in records if "settings" in r), None),
            "command": " ".join(sys.argv if argv is None else ["train_policy.py", *argv]),
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()},
            "args": {k: v for k, v in vars(args).items()}, "final_lambda": lam,
            "train_accuracy_stochastic": acc, "train_relative_cost_stochastic": rel}
    save_policy(out, policy, meta)
    with log_path.open("w", encoding="utf-8") as f:
        for h in history:
            f.write(json.dumps(h) + "\n")
    plot_curve(history, target, curve_path)
    print(f"trained {config.iters} iterations in {seconds:.1f}s; final lambda {lam:.3f}; stochastic "
          f"policy on the training table: accuracy {acc:.4f}, relative cost {rel:.4f}")
    print(f"wrote {out}, {log_path}, {curve_path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
