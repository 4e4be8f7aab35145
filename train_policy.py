"""Stage 2 of stepwise model routing: train the escalation policy on the table (docs/DESIGN.md 1, 2, 4).

The table written by rollout.py is an exact simulator: for every question it holds the
small model's solution step by step and the large model's continuation after every prefix.
So a router's episode on a question is fixed by one number, the step at which it escalates
(or never), and training needs no LLM call.

The method, top to bottom:

1. **State features** (section 4). `state_features()` describes the state after the draft of
   step t: the draft's token statistics and length, t, the tokens so far, running summaries
   of the accepted steps 1..t-1, whether the draft holds a boxed answer, and whether it
   ended the small model's solution. Training and route.py both call this one function.
2. **Cost** (section 2). `Pricing` holds a price per prompt token and per generated token
   for each model: FLOPs by default (a generated token costs 2 * params, a prompt token R
   times that with `--prompt-cost R`, R = 0 by default), or dollars with
   `--price-small IN,OUT --price-large IN,OUT` (dollars per million prompt / generated
   tokens). `build_table()` turns the records into
   padded tensors of the correctness and cost of every outcome (escalate at step t, never
   escalate, the large model alone).
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

Questions are identified by `question_hash()` (sha256 of the normalised question text);
the policy file records the hashes of its training questions so that later stages can
refuse a table that shares questions with it.

Run it (exactly one of --target-accuracy / --target-relative):

    python train_policy.py --train results/gsm8k/train.jsonl --target-relative 0.98 \\
        --out results/gsm8k/policy.pt

It writes the policy (torch file with feature names, normalisation, weights and a `meta`
dict), a per-iteration log `policy.log.jsonl` and a training curve `policy.curve.png`
next to it. The same seed gives identical weights.

Conventions. A question whose small solution has no steps (n = 0) has no escalations: every
router, the large baseline and the oracle included, gets the small outcome there, and its
all-large cost is taken to be its small cost. An outcome whose answer is null is wrong (the
table's `correct` is trusted).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
import time
import unicodedata
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from rollout import UsageError, check_range, make_parser, read_table, run_cli


# ----------------------------------------------------------------------------------------
# 1. State features (DESIGN section 4). ONE function, called by training and by route.py.
# ----------------------------------------------------------------------------------------
FEATURE_NAMES = [
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


def state_features(prompt_tokens: int, steps: list[dict], ended: bool) -> list[float]:
    """Features of the state after the draft of step t = len(steps), in FEATURE_NAMES order.

    steps[-1] is the draft, steps[:-1] the accepted steps; each step is a dict with text,
    tokens, mean_logprob, min_logprob, mean_entropy, max_entropy. `ended` says the draft
    ended the small model's solution (on the table: t == n).
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
            1.0 if "\\boxed" in draft["text"] else 0.0, 1.0 if ended else 0.0]


# ----------------------------------------------------------------------------------------
# 2. Cost (DESIGN section 2): prices per prompt token and per generated token, per model.
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
# The table as padded tensors: Q questions, T = max steps, F features.
# Escalating at step t (1-based; column t-1) pays the small steps 1..t (the dropped draft
# included) and its prompt, plus the large continuation escalations[t-1] and its prompt.
# ----------------------------------------------------------------------------------------
@dataclass
class Table:
    features: torch.Tensor          # [Q,T,F] float32, raw state_features of each drafted step
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

    @property
    def Q(self) -> int:
        return self.mask.shape[0]

    @property
    def T(self) -> int:
        return self.mask.shape[1]

    @property
    def large_alone_small_tokens(self) -> torch.Tensor:
        """Small tokens in the 'large alone' outcome: only where n = 0 (it is the small one)."""
        return torch.where(self.n_steps == 0, self.small_tokens, torch.zeros_like(self.small_tokens))

    def relative_cost(self, costs: torch.Tensor) -> torch.Tensor:
        """sum(costs) / sum(all-large costs) over the same questions (last dim = questions)."""
        return costs.sum(-1) / self.large_cost.sum()


def build_table(records: list[dict], pricing: Pricing) -> Table:
    Q = len(records)
    T = max(1, max(len(r["small"]["steps"]) for r in records))
    feats = torch.zeros(Q, T, len(FEATURE_NAMES), dtype=torch.float32)
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
        rows, cum, cums = [], 0, []
        for t in range(1, n + 1):
            rows.append(state_features(prompt, steps[:t], ended=(t == n)))
            cum += steps[t - 1]["tokens"]
            cums.append(cum)
        small_correct[i] = float(bool(small["correct"]))
        small_tokens[i] = cum
        small_cost[i] = p.small_out * cum + p.small_in * prompt
        if n == 0:  # no escalations: the large baseline gets the small outcome (module doc)
            large_correct[i], large_cost[i] = small_correct[i], small_cost[i]
            continue
        feats[i, :n] = torch.tensor(rows, dtype=torch.float32)
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
    return Table(feats, mask, n_steps, esc_correct, esc_cost, esc_small, esc_large,
                 small_correct, small_cost, small_tokens, large_correct, large_cost, large_tokens,
                 ids=[r["id"] for r in records], hashes=[question_hash(r["question"]) for r in records],
                 pool=table_pool(records), pricing=pricing)


def load_table(path, args) -> Table:
    """read_table + pricing flags -> Table (what every table stage starts with)."""
    records = read_table(path)
    return build_table(records, pricing_from_args(args, records))


# ----------------------------------------------------------------------------------------
# 3. The policy: an MLP on normalised features -> p(escalate | s_t).
# ----------------------------------------------------------------------------------------
POLICY_FORMAT = "stepwise-routing-policy/1"
ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}


class Policy(nn.Module):
    """p(escalate | state). Input: RAW features [..., len(FEATURE_NAMES)] in FEATURE_NAMES
    order (state_features output); the policy picks its own feature columns, normalises them
    with the mean/std fitted on the training table, and returns probabilities in (0, 1)."""

    def __init__(self, feature_names=FEATURE_NAMES, hidden=(64, 64), activation="tanh"):
        super().__init__()
        unknown = [f for f in feature_names if f not in FEATURE_NAMES]
        if unknown:
            raise UsageError(f"features this build does not compute: {', '.join(unknown)}")
        self.feature_names, self.hidden, self.activation = list(feature_names), list(hidden), activation
        self.register_buffer("columns", torch.tensor([FEATURE_NAMES.index(f) for f in feature_names]),
                             persistent=False)
        self.register_buffer("mean", torch.zeros(len(feature_names)))
        self.register_buffer("std", torch.ones(len(feature_names)))
        layers, width = [], len(feature_names)
        for h in hidden:
            layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
            width = h
        self.net = nn.Sequential(*layers, nn.Linear(width, 1))
        self.meta: dict = {}

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


def save_policy(path, policy: Policy, meta: dict) -> None:
    policy.meta = meta
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": POLICY_FORMAT, "feature_names": policy.feature_names,
                "hidden": policy.hidden, "activation": policy.activation,
                "state_dict": policy.state_dict(), "meta": meta}, path)


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
    correct = torch.cat([table.esc_correct, table.small_correct[:, None]], 1)
    cost = torch.cat([table.esc_cost, table.small_cost[:, None]], 1) / table.large_cost.mean()
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


def resolve_target(args, table: Table) -> tuple[float, dict]:
    """--target-accuracy A or --target-relative R (R * large accuracy on these questions)."""
    if args.target_accuracy is not None:
        check_range("--target-accuracy", args.target_accuracy, 0.0, 1.0)
        return float(args.target_accuracy), {"accuracy": args.target_accuracy}
    check_range("--target-relative", args.target_relative, 0.0, None, lo_open=True)
    large_acc = table.large_correct.mean().item()
    target = args.target_relative * large_acc
    if target > 1:
        raise UsageError(f"--target-relative {args.target_relative} asks for accuracy {target:.4f} > 1 "
                         f"(large model accuracy {large_acc:.4f})")
    return target, {"relative": args.target_relative}


@dataclass
class TrainConfig:
    """Every training setting and its default: the one place both train() and the command
    line (train_policy.py --help) read them from."""
    hidden: tuple = (64, 64)        # hidden widths of the MLP
    activation: str = "tanh"
    features: tuple = tuple(FEATURE_NAMES)
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
          **overrides) -> tuple[Policy, float]:
    """Primal-dual training with `config` (TrainConfig defaults; keyword overrides allowed).
    Returns the policy and the final lambda. `log(dict)` per iteration."""
    cfg = replace(config or TrainConfig(), **overrides)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    policy = Policy(list(cfg.features), list(cfg.hidden), cfg.activation)
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
        opt.zero_grad()
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


def plural(n: int, word: str) -> str:
    """'1 question', '2 questions'."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def add_target_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_mutually_exclusive_group(required=True)
    g.add_argument("--target-accuracy", type=float, metavar="A", help="absolute accuracy target in [0, 1]")
    g.add_argument("--target-relative", type=float, metavar="R",
                   help="target = R * the large model's accuracy on the same questions")


def build_parser() -> argparse.ArgumentParser:
    D = TrainConfig()   # every default below comes from here
    parser = make_parser(__doc__)
    parser.add_argument("--train", required=True, metavar="PATH", help="schema-1 trajectory table (JSONL)")
    parser.add_argument("--out", required=True, metavar="PATH",
                        help="policy file to write; the log (.log.jsonl) and curve (.curve.png) go next to it")
    add_target_args(parser)
    g = parser.add_argument_group("training (defaults: TrainConfig)")
    g.add_argument("--hidden", type=int, nargs="+", default=list(D.hidden), metavar="H",
                   help=f"hidden widths of the MLP (default {' '.join(map(str, D.hidden))})")
    g.add_argument("--activation", choices=sorted(ACTIVATIONS), default=D.activation,
                   help=f"hidden activation (default {D.activation})")
    g.add_argument("--features", default=",".join(D.features), metavar="A,B,...",
                   help="comma-separated subset of the state features (default: all)")
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
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    return TrainConfig(**{**values, "hidden": tuple(args.hidden), "features": tuple(features)})


def main(argv=None):
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)   # tiny tensors: extra threads only add overhead (and noise)
    config = config_from_args(args)

    table = load_table(args.train, args)
    target, target_spec = resolve_target(args, table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path, curve_path = out.with_suffix(".log.jsonl"), out.with_suffix(".curve.png")
    print(f"training on {plural(table.Q, 'question')} ({plural(int(table.mask.sum()), 'step')}), "
          f"target accuracy {target:.4f} {target_spec}, large {table.large_correct.mean():.4f}, "
          f"small {table.small_correct.mean():.4f}, estimator {config.estimator}")

    history = []
    start = time.perf_counter()
    policy, lam = train(table, target, config, log=history.append)
    seconds = time.perf_counter() - start

    with torch.no_grad():   # the trained stochastic policy on the whole training table
        p_esc, p_never = escalation_distribution(policy_probs(policy, table), table.mask)
        acc = ((p_esc * table.esc_correct).sum(-1) + p_never * table.small_correct).mean().item()
        rel = table.relative_cost((p_esc * table.esc_cost).sum(-1) + p_never * table.small_cost).item()
    meta = {"pool": table.pool, "pricing": asdict(table.pricing), "target": target,
            "target_spec": target_spec, "train": str(args.train), "n_train": table.Q,
            "question_hashes": table.hashes,
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
