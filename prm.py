"""Process reward model (PRM) gate: step scores and their cost, for the PRM baselines.

Part of the method: DESIGN.md sections 2 (a PRM consulted at steps 1..t costs
2 * params_prm per token of the question and steps 1..t, read once: prefix caching),
3 (optional table keys) and 5 (routers `prm` and `policy+prm`). This file is a library:
rollout.py, evaluate.py and train_policy.py call it; it has no command line.

Supported family: Qwen2.5-Math-PRM (Qwen/Qwen2.5-Math-PRM-7B, Qwen/Qwen2.5-Math-PRM-72B),
read without remote code. What was checked, and where:
- config.json of Qwen/Qwen2.5-Math-PRM-7B (huggingface.co, file view): architectures
  ["Qwen2ForProcessRewardModel"], model_type "qwen2", auto_map to the remote
  modeling_qwen2_rm.Qwen2ForProcessRewardModel; torch_dtype bfloat16; weights in 4
  safetensors shards. So the backbone is a plain transformers Qwen2Model.
- the head, from modeling_qwen2_rm.py as ported by vLLM (vllm/model_executor/models/qwen2_rm.py,
  "Adapted from https://huggingface.co/Qwen/Qwen2.5-Math-RM-72B/blob/main/modeling_qwen2_rm.py")
  and SGLang (sglang/srt/models/qwen2_rm.py): `self.model = Qwen2Model(config)`,
  `self.score = nn.Sequential(Linear(hidden, hidden), ReLU(), Linear(hidden, 2))` (biases
  on), logits = score(last hidden states); no lm_head (vLLM ignores `lm_head.*` if present).
- the reading, from the model card (Quick Start) of Qwen2.5-Math-PRM-7B/72B: steps are the
  "\n\n"-separated parts of a Qwen2.5-Math-Instruct solution; messages = system "Please reason
  step by step, and put your final answer within \\boxed{}.", user = question, assistant =
  "<extra_0>".join(steps) + "<extra_0>"; apply_chat_template(tokenize=False,
  add_generation_prompt=False), then encode; a step's reward is softmax(logits)[..., 1] at the
  positions of the token "<extra_0>" (id 151651, vLLM's step_tag_id). The card's steps carry no
  trailing "\n\n" (the separator stands in for it), so steps are stripped here.
A forward pass is causal, so the score at step t's separator depends only on the tokens up to
it: one pass over the whole solution gives every step's score (tests/test_prm.py checks this).

Table keys written (optional, DESIGN section 3; readers ignore them): `small.steps[i].prm_score`
(in [0, 1]), `small.steps[i].prm_tokens` (PRM tokens of step i: its text plus its separator),
`small.prm_prompt_tokens` (PRM tokens before the first step: chat template, system prompt,
question) and `pool.prm = {"model", "params"}`. With them a table prices the PRM without it.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

SEPARATOR = "<extra_0>"
SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
ARCHITECTURE = "Qwen2ForProcessRewardModel"
HEAD_KEYS = ("score.0.weight", "score.0.bias", "score.2.weight", "score.2.bias")


class PRMError(ValueError):
    """A model that is not a loadable PRM of the supported family (callers: exit 2)."""


@dataclass
class PRM:
    name: str                 # as given (hub id or folder); recorded in pool.prm.model
    backbone: nn.Module       # transformers Qwen2Model
    head: nn.Sequential       # Linear(h, h), ReLU, Linear(h, 2), float32
    tokenizer: object
    sep_id: int               # token id of "<extra_0>"
    params: int               # backbone + head parameters (cost: 2 * params per token read)

    @property
    def pool_entry(self) -> dict:
        return {"model": self.name, "params": self.params}


@dataclass
class Encoded:
    ids: list                 # token ids of the whole templated solution
    sep_positions: list       # index in ids of each step's separator
    prompt_tokens: int        # tokens before the first step
    step_tokens: list         # tokens of each step, its separator included


# ----------------------------------------------------------------------------------------
# Loading: config and tokenizer checked, backbone through transformers, head by hand.
# ----------------------------------------------------------------------------------------
def resolve_folder(model: str) -> Path:
    """A local folder, or a hub id fetched (or found in the cache) without remote code."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists() or model.startswith((".", "/", "~")):
        raise PRMError(f"PRM {model}: not a model folder")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(model, allow_patterns=[
            "*.json", "*.safetensors", "merges.txt", "vocab.json", "*.jinja"]))
    except Exception as err:  # offline, unknown repo, bad id: one line for the caller
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise PRMError(f"PRM {model}: no such folder, and the hub cannot provide it ({first})") from None


def checkpoint_keys(folder: Path) -> dict:
    """{tensor name: safetensors file} from the index json, or the single model.safetensors."""
    from safetensors import safe_open
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    single = folder / "model.safetensors"
    if not single.is_file():
        raise PRMError(f"PRM {folder}: no safetensors weights (model.safetensors or an index json)")
    with safe_open(str(single), "pt") as f:
        return {k: "model.safetensors" for k in f.keys()}


def load_prm(model: str, device: str = "cpu", dtype: torch.dtype | None = None,
             device_map=None) -> PRM:
    """Load a Qwen2.5-Math-PRM checkpoint; PRMError (one line) for anything else.

    dtype: of the backbone (default: bfloat16 on CUDA, float32 on CPU); the head runs in
    float32. device_map (e.g. "auto") spreads the backbone over GPUs (the 72B needs two).
    """
    from safetensors import safe_open
    from transformers import AutoTokenizer, Qwen2Config, Qwen2Model
    from transformers.utils import logging as hf_logging

    folder = resolve_folder(model)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise PRMError(f"PRM {model}: not a model folder (no config.json)")
    raw = json.loads(cfg_file.read_text())
    if raw.get("architectures") != [ARCHITECTURE] or raw.get("model_type") != "qwen2":
        raise PRMError(f"PRM {model}: architectures {raw.get('architectures')} / model_type "
                       f"{raw.get('model_type')!r}, but only the Qwen2.5-Math-PRM family "
                       f"([{ARCHITECTURE!r}], 'qwen2') is supported")
    keys = checkpoint_keys(folder)
    other = sorted(k for k in keys if not k.startswith(("model.", "lm_head.")) and k not in HEAD_KEYS)
    missing = [k for k in HEAD_KEYS if k not in keys]
    if missing or other:
        raise PRMError(f"PRM {model}: checkpoint keys do not match the family's "
                       f"(missing {missing[:3]}, unexpected {other[:3]})")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))   # Qwen2Tokenizer: built in
    sep = tokenizer.encode(SEPARATOR, add_special_tokens=False)
    if len(sep) != 1 or getattr(tokenizer, "chat_template", None) is None:
        raise PRMError(f"PRM {model}: its tokenizer lacks the step separator token {SEPARATOR} "
                       f"as one token, or a chat template")

    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    config = Qwen2Config.from_pretrained(str(folder))        # no auto_map, no remote code
    hf_logging.set_verbosity_error()                          # score.* are "unexpected" there
    hf_logging.disable_progress_bar()
    backbone, info = Qwen2Model.from_pretrained(
        str(folder), config=config, dtype=dtype, device_map=device_map, output_loading_info=True)
    if info["missing_keys"] or info.get("mismatched_keys"):
        raise PRMError(f"PRM {model}: backbone weights missing from the checkpoint "
                       f"({sorted(info['missing_keys'])[:3]})")
    if device_map is None:
        backbone.to(device)
    backbone.eval().requires_grad_(False)

    h = config.hidden_size
    head = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 2))
    state = {}
    for key in HEAD_KEYS:
        with safe_open(str(folder / keys[key]), "pt") as f:
            state[key[len("score."):]] = f.get_tensor(key).float()
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise PRMError(f"PRM {model}: reward head of another shape than Linear({h}, {h}), "
                       f"ReLU, Linear({h}, 2) ({str(err).splitlines()[-1].strip()})") from None
    head_device = backbone.norm.weight.device
    head.to(head_device).eval().requires_grad_(False)
    params = sum(p.numel() for p in backbone.parameters()) + sum(p.numel() for p in head.parameters())
    return PRM(model, backbone, head, tokenizer, sep[0], params)


# ----------------------------------------------------------------------------------------
# Scoring: template, one causal forward pass per solution, softmax[..., 1] at separators.
# ----------------------------------------------------------------------------------------
def messages(question: str, steps: list[str]) -> list[dict]:
    """The model card's input: steps stripped, each followed by the separator."""
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question},
            {"role": "assistant", "content": "".join(s.strip() + SEPARATOR for s in steps)}]


def encode(prm: PRM, question: str, steps: list[str]) -> Encoded:
    """Token ids of the templated solution, the separators' positions and the token counts:
    prompt_tokens + sum(step_tokens[:t]) = sep_positions[t-1] + 1, the tokens the PRM reads
    to score step t."""
    tok = prm.tokenizer
    text = tok.apply_chat_template(messages(question, steps), tokenize=False,
                                   add_generation_prompt=False)
    ids = tok.encode(text, add_special_tokens=False)
    seps = [i for i, x in enumerate(ids) if x == prm.sep_id]
    if len(seps) != len(steps):
        raise ValueError(f"{len(seps)} separators for {len(steps)} steps: does a step hold "
                         f"the text {SEPARATOR!r}?")
    prompt = tok.encode(tok.apply_chat_template(messages(question, [])[:2], tokenize=False,
                                                add_generation_prompt=True), add_special_tokens=False)
    common = 0                 # the prompt's tokens are a prefix of the whole's (checked)
    while common < min(len(prompt), len(ids)) and prompt[common] == ids[common]:
        common += 1
    if steps:
        common = min(common, seps[0])
    starts = [common - 1] + seps[:-1]
    return Encoded(ids, seps, common, [s - a for s, a in zip(seps, starts)])


@torch.no_grad()
def score_encoded(prm: PRM, batch: list[Encoded]) -> list[list[float]]:
    """One forward pass over a right-padded batch (padding after the real tokens never
    reaches them under the causal mask); head and softmax at the separators only."""
    pad = prm.tokenizer.pad_token_id if prm.tokenizer.pad_token_id is not None else 0
    width = max(len(e.ids) for e in batch)
    dev = prm.backbone.get_input_embeddings().weight.device
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        ids[row, :len(e.ids)] = torch.tensor(e.ids)
        mask[row, :len(e.ids)] = 1
    hidden = prm.backbone(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                          use_cache=False).last_hidden_state
    rows = torch.tensor([r for r, e in enumerate(batch) for _ in e.sep_positions], dtype=torch.long)
    cols = torch.tensor([p for e in batch for p in e.sep_positions], dtype=torch.long)
    head_dev = next(prm.head.parameters()).device
    at_sep = hidden[rows.to(hidden.device), cols.to(hidden.device)].to(head_dev, torch.float32)
    probs = torch.softmax(prm.head(at_sep), dim=-1)[:, 1].tolist()
    out, i = [], 0
    for e in batch:
        out.append(probs[i:i + len(e.sep_positions)])
        i += len(e.sep_positions)
    return out


def score_many(prm: PRM, items: list[tuple[str, list[str]]], batch_size: int = 8) -> list[list[float]]:
    """Step scores of many (question, steps) solutions; batches of similar length."""
    enc = [encode(prm, q, s) for q, s in items]
    out = [[] for _ in items]
    order = sorted((i for i in range(len(items)) if items[i][1]), key=lambda i: len(enc[i].ids))
    for b in range(0, len(order), max(1, batch_size)):
        chunk = order[b:b + max(1, batch_size)]
        for i, scores in zip(chunk, score_encoded(prm, [enc[i] for i in chunk])):
            out[i] = scores
    return out


def score_steps(prm: PRM, question: str, steps: list[str]) -> list[float]:
    """The PRM's judgement in [0, 1] of the prefix ending at each step."""
    return score_many(prm, [(question, steps)], 1)[0]


# ----------------------------------------------------------------------------------------
# Cost (DESIGN section 2) and the table's PRM keys.
# ----------------------------------------------------------------------------------------
def prm_cost_tokens(question_tokens: int, step_tokens: list[int], t: int) -> int:
    """Tokens the PRM reads when consulted at steps 1..t with prefix caching: the question
    part and steps 1..t, each once (0 for t = 0: never consulted). Cost: 2 * params * this."""
    if not 0 <= t <= len(step_tokens):
        raise ValueError(f"t = {t} outside 0..{len(step_tokens)}")
    return 0 if t == 0 else int(question_tokens) + sum(int(x) for x in step_tokens[:t])


def has_prm(record: dict) -> bool:
    """The record carries PRM scores and token counts for every small step."""
    small = record.get("small", {})
    return ("prm_prompt_tokens" in small and "prm" in record.get("pool", {})
            and all("prm_score" in s and "prm_tokens" in s for s in small.get("steps", [])))


def record_prm_tokens(record: dict) -> list[int]:
    """[prm_cost_tokens(.., t) for t = 1..n] of a scored record: the PRM tokens read up to an
    escalation at step t; the last entry is what a never-escalating run reads."""
    small = record["small"]
    steps = [s["prm_tokens"] for s in small["steps"]]
    return [prm_cost_tokens(small["prm_prompt_tokens"], steps, t) for t in range(1, len(steps) + 1)]


def rescore_table(records: list[dict], prm: PRM, batch_size: int = 8, force: bool = False) -> list[dict]:
    """Copies of schema-1 records with prm_score / prm_tokens on every small step,
    small.prm_prompt_tokens and pool.prm; nothing else changes. A record already scored by
    this PRM (same pool.prm) is returned as it is unless `force` (idempotent)."""
    out = [copy.deepcopy(r) for r in records]
    for r in out:
        if r.get("schema") != 1:
            raise ValueError(f"question {r.get('id')!r}: schema {r.get('schema')!r}, expected 1")
    todo = [r for r in out if force or not (has_prm(r) and r["pool"]["prm"] == prm.pool_entry)]
    items = [(r["question"], [s["text"] for s in r["small"]["steps"]]) for r in todo]
    scores = score_many(prm, items, batch_size)
    for r, (q, steps), sc in zip(todo, items, scores):
        e = encode(prm, q, steps)
        r["small"]["prm_prompt_tokens"] = e.prompt_tokens
        for step, s, n in zip(r["small"]["steps"], sc, e.step_tokens):
            step["prm_score"], step["prm_tokens"] = float(s), int(n)
        r["pool"]["prm"] = prm.pool_entry
    return out
