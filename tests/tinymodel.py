"""A tiny real causal LM pool for the tests: it writes step-structured arithmetic solutions.

`build_tiny_pool()` builds, offline, in about a minute on one CPU core:

- a byte-level BPE tokenizer (the `tokenizers` library, 454 tokens) trained on a templated
  arithmetic corpus, wrapped as a transformers `PreTrainedTokenizerFast` with real added
  special tokens (`<|endoftext|>` = pad, `<|im_start|>`, `<|im_end|>` = eos) and a Qwen-like
  ChatML `chat_template` (system/user/assistant, `add_generation_prompt`);
- two checkpoints of one tiny Llama (3 layers, hidden 96, 293k parameters) trained with
  plain AdamW on chat-formatted examples (system = the Qwen2.5-Math prompt, user = a word
  problem with 1-2 operations, assistant = 3-4 blank-line separated steps ending in
  `\\boxed{}` and `<|im_end|>`; loss on the assistant tokens): "small" is the checkpoint after
  200 steps (the step structure is right, the copying and arithmetic are often wrong),
  "large" after 300 steps (clearly more accurate). They have the same size, so their
  FLOPs per token are equal: tests that need a price gap must set the prices themselves;
- 30 held-out questions from the same templates, never seen in training.

Measured here (2 busy CPU cores, torch 2.13, transformers 5.24): build 51 s (55 s with
imports); greedy accuracy on the held-out questions small 43%, large 90%. Training runs
on one thread on purpose (see `_build`), so the numbers do not depend on the machine's
thread count.

Both folders load offline with `AutoModelForCausalLM.from_pretrained(folder)` and
`AutoTokenizer.from_pretrained(folder)`; their generation config is greedy and stops at
`<|im_end|>` or `<|endoftext|>` like Qwen2.5 instruct models. The model is a Llama, not a
Qwen2, because transformers 5 loads every model_type "qwen2" folder with Qwen2Tokenizer,
which replaces the saved pre-tokenizer by Qwen's; for "llama" AutoTokenizer gives back the
tokenizer.json as saved (TokenizersBackend).

How blank lines are tokenized (on purpose, so that step splitting at token boundaries is
exercised). The pre-tokenizer regex is Qwen2's idea in small: a run of punctuation keeps
the newlines that follow it (`" ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"`), while a newline anywhere
else is a pre-token of its own (`"[\\r\\n]"`), so BPE can never merge it. Observed after
training: the vocabulary's only token holding a blank line is ".\\n\\n" (merged via ".\\n"),
so a step that ends in "." ends in the single token ".\\n\\n", and a step that ends in an
equation ("..., she has 3 + 4 = 7") ends in two separate "\\n" tokens, the second one
completing the blank line. A solution has both kinds: "Tom starts with 3 apples." is
followed by ".\\n\\n", each "After ..." step by "\\n", "\\n". (The vocabulary also holds "?\\n",
"}.\\n" and "{}.\\n", learnt from the tokenizer's training text, where the role names stood
on lines of their own; rendered chats never produce them, since a special token follows.) With Qwen2's own
regex a bare "\\n\\n" would be one token instead. See `describe_blank_lines()`.

Results are cached in `tests/.cache/tinypool` (or `cache_dir`), stamped with a hash of
this file's code (comments and docstrings excluded) and the torch / transformers versions;
a matching stamp means no rebuild.

    python tests/tinymodel.py            # build (or reuse) and print accuracies and timing
    python tests/tinymodel.py --rebuild  # ignore the cache
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
DEFAULT_CACHE = HERE / ".cache" / "tinypool"

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
EOS, BOS_CHAT, PAD = "<|im_end|>", "<|im_start|>", "<|endoftext|>"
SPECIAL_TOKENS = [PAD, BOS_CHAT, EOS]  # ids 0, 1, 2
VOCAB_SIZE = 512
PRETOKENIZE_REGEX = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|[\r\n]|\s+(?!\S)|\s+"""
)
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Llama, not Qwen2: transformers 5 loads any model_type "qwen2" folder with Qwen2Tokenizer,
# which replaces the pre-tokenizer of tokenizer.json by Qwen's (digits one by one, "\n\n"
# always one pre-token); for "llama" AutoTokenizer honours tokenizer.json as saved.
# One training run of one tiny Llama; "small" is an early checkpoint of it, "large" the last.
# (Both have the same size: a separate smaller model did not learn enough arithmetic within
# the time budget on 2 CPU cores. Their accuracies differ clearly, their FLOPs per token don't.)
# The learning rate decays linearly over `steps`; training stops at the last checkpoint.
MODEL_SPEC = dict(hidden=96, layers=3, heads=4, kv=2, inter=192, steps=300, lr=7e-3)
CHECKPOINTS = {"small": 200, "large": 300}
N_TRAIN, N_HELDOUT, BATCH, MAX_NEW_TOKENS = 6000, 30, 24, 96
SEED = 1234

# ----------------------------------------------------------------------------------------
# The corpus: word problems and their step-by-step solutions.
# ----------------------------------------------------------------------------------------
NAMES = [("Tom", "he"), ("Anna", "she"), ("Ben", "he"), ("Lily", "she"), ("Sam", "he"), ("Mia", "she")]
ITEMS = ["apples", "books", "coins", "cards", "pens", "stickers", "marbles", "shells"]
# (question phrase, step phrase, sign)
OPS = [
    ("buys {n} more", "After buying {n} more, {p} has {a} + {n} = {r}", +1),
    ("finds {n} more", "After finding {n} more, {p} has {a} + {n} = {r}", +1),
    ("gives away {n}", "After giving away {n}, {p} has {a} - {n} = {r}", -1),
    ("loses {n}", "After losing {n}, {p} has {a} - {n} = {r}", -1),
]
MAX_VALUE = 15


def make_problem(rng: random.Random) -> dict:
    """One word problem with 1-2 operations, its solution (3-4 steps) and its answer."""
    name, pron = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    value = start = rng.randint(2, 12)
    n_ops = rng.choice([1, 2, 2])
    q_parts, steps = [], [f"{name} starts with {value} {item}."]
    for _ in range(n_ops):
        while True:
            q_op, s_op, sign = rng.choice(OPS)
            n = rng.randint(1, 6)
            if 0 <= value + sign * n <= MAX_VALUE:
                break
        new = value + sign * n
        q_parts.append(q_op.format(n=n))
        steps.append(s_op.format(n=n, p=pron, a=value, r=new))
        value = new
    steps.append(f"The answer is \\boxed{{{value}}}.")
    question = (f"{name} has {start} {item}. {pron.capitalize()} "
                + ", then ".join(q_parts) + f". How many {item} does {name} have now?")
    return {"question": question, "answer": str(value), "solution": "\n\n".join(steps)}


def messages_for(question: str, solution: str | None = None) -> list[dict]:
    msgs = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
    if solution is not None:
        msgs.append({"role": "assistant", "content": solution})
    return msgs


def render_chat(question: str) -> str:
    """The chat template's text for the prompt of `question` (with the generation prompt)."""
    return (f"{BOS_CHAT}system\n{SYSTEM_PROMPT}{EOS}\n{BOS_CHAT}user\n{question}{EOS}\n"
            f"{BOS_CHAT}assistant\n")


def make_corpus(seed: int = SEED):
    """Training problems and held-out questions (disjoint by question text)."""
    rng = random.Random(seed)
    heldout, seen = [], set()
    while len(heldout) < N_HELDOUT:
        p = make_problem(rng)
        if p["question"] not in seen:
            seen.add(p["question"])
            heldout.append(p)
    train = []
    while len(train) < N_TRAIN:
        p = make_problem(rng)
        if p["question"] not in seen:
            train.append(p)
    return train, heldout


# ----------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------
def train_tokenizer(train: list[dict]):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    # The chat text around the messages (role names, system prompt) is in the corpus too,
    # so that it costs a few tokens, not dozens.
    texts = [f"system\n{SYSTEM_PROMPT}\nuser\n{p['question']}\nassistant\n{p['solution']}\n"
             for p in train]
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=[BOS_CHAT], padding_side="left",
        model_max_length=512, clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def describe_blank_lines(tokenizer) -> dict:
    """Which token strings in the vocabulary hold a newline (for the docs and the tests)."""
    vocab = tokenizer.get_vocab()
    texts = {tokenizer.convert_tokens_to_string([t]) for t in vocab}
    return {
        "tokens_with_blank_line": sorted(t for t in texts if "\n\n" in t),
        "tokens_with_newline": sorted(t for t in texts if "\n" in t),
    }


# ----------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------
def encode_examples(tokenizer, problems: list[dict]):
    """Token ids of each whole chat and the length of its prompt (loss on the assistant part)."""
    prompts = [render_chat(p["question"]) for p in problems]
    fulls = [f"{prompt}{p['solution']}{EOS}\n" for prompt, p in zip(prompts, problems)]
    # rendering by hand is ~20x faster than jinja; check once that it is the same text
    assert fulls[0] == tokenizer.apply_chat_template(
        messages_for(problems[0]["question"], problems[0]["solution"]), tokenize=False)
    assert prompts[0] == tokenizer.apply_chat_template(
        messages_for(problems[0]["question"]), tokenize=False, add_generation_prompt=True)
    full_ids = tokenizer(fulls, add_special_tokens=False)["input_ids"]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    out = []
    for f, p in zip(full_ids, prompt_ids):
        assert f[:len(p)] == p, "prompt tokenization is not a prefix of the chat's"
        out.append((f[:-1] if tokenizer.convert_ids_to_tokens(f[-1]) == "Ċ" else f, len(p)))
    return out


def train_model(tokenizer, examples, spec: dict, seed: int, on_step=None):
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec["hidden"], intermediate_size=spec["inter"],
        num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv"], max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids(EOS),
        pad_token_id=tokenizer.pad_token_id, rope_theta=10000.0,
    )
    config._attn_implementation = "eager"  # sdpa is ~5x slower for this size on CPU
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(  # like Qwen2.5 instruct: stop at either
        do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
        eos_token_id=[tokenizer.convert_tokens_to_ids(EOS), tokenizer.convert_tokens_to_ids(PAD)],
        pad_token_id=tokenizer.pad_token_id,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=0.01, betas=(0.9, 0.98))
    steps = spec["steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 10) * max(0.05, 1 - s / steps))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    pad = tokenizer.pad_token_id
    for step in range(spec.get("stop", steps)):
        idx = torch.randint(len(examples), (BATCH,), generator=gen).tolist()
        batch = [examples[i] for i in idx]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((BATCH, width), pad)
        labels = torch.full((BATCH, width), -100)
        attn = torch.zeros((BATCH, width), dtype=torch.long)
        for row, (ids, plen) in enumerate(batch):  # right padding for training
            input_ids[row, :len(ids)] = torch.tensor(ids)
            labels[row, plen:len(ids)] = torch.tensor(ids[plen:])
            attn[row, :len(ids)] = 1
        loss = model(input_ids=input_ids, attention_mask=attn, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step(step + 1, model, float(loss.detach()))
    model.eval()
    return model, float(loss.detach())


def greedy_answers(model, tokenizer, questions: list[str], max_new_tokens: int = MAX_NEW_TOKENS):
    """Batched greedy generation; returns the decoded completions."""
    import torch
    from transformers import GenerationConfig

    prompts = [tokenizer.apply_chat_template(messages_for(q), tokenize=False, add_generation_prompt=True)
               for q in questions]
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    gc = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens,
                          eos_token_id=model.generation_config.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        out = model.generate(**enc, generation_config=gc)
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def boxed_answer(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    end = text.find("}", start)
    return text[start + 7:end] if end > 0 else None


def accuracy(model, tokenizer, questions: list[dict]) -> float:
    outs = greedy_answers(model, tokenizer, [q["question"] for q in questions])
    return sum(boxed_answer(o) == q["answer"] for o, q in zip(outs, questions)) / len(questions)


# ----------------------------------------------------------------------------------------
# Build and cache
# ----------------------------------------------------------------------------------------
def version_stamp() -> str:
    import torch
    import transformers

    # the code, not its comments or docstrings: editing the docs does not force a rebuild
    tree = ast.parse(Path(__file__).read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(getattr(body[0], "value", None), ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    h = hashlib.sha256(ast.dump(tree).encode())
    h.update(f"torch={torch.__version__} transformers={transformers.__version__}".encode())
    return h.hexdigest()[:16]


def write_questions_jsonl(path, questions: list[dict]) -> Path:
    """Write {"question", "answer"} lines (the format rollout.py --dataset PATH reads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for q in questions:
            f.write(json.dumps({"question": q["question"], "answer": q["answer"]}) + "\n")
    return path


def _result(root: Path) -> dict:
    info = json.loads((root / "pool.json").read_text())
    return {"small": root / "small", "large": root / "large", "questions": info["questions"],
            "accuracy": info["accuracy"], "build_seconds": info["build_seconds"]}


def build_tiny_pool(cache_dir: Path | None = None, rebuild: bool = False) -> dict:
    """Build (or reuse from cache) the tiny pool.

    Returns {"small": folder, "large": folder, "questions": [{"question", "answer"}, ...],
    "accuracy": {"small": a, "large": b}, "build_seconds": s}.
    """
    import fcntl

    root = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE
    root.mkdir(parents=True, exist_ok=True)
    stamp = version_stamp()
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp_file = root / "STAMP"
        if (not rebuild and stamp_file.is_file() and stamp_file.read_text().strip() == stamp
                and (root / "pool.json").is_file()):
            return _result(root)
        for name in ("small", "large", "pool.json", "STAMP"):
            p = root / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        _build(root)
        stamp_file.write_text(stamp + "\n")  # written last: a half-built pool is rebuilt
        return _result(root)


def _build(root: Path) -> None:
    import torch

    t0 = time.time()
    threads = torch.get_num_threads()
    # One thread, always: the result then does not depend on the machine's thread count, and
    # with tensors this small two OpenMP threads on a busy machine (other processes on the
    # cores) spin and wait: a training step went from 0.09 s (idle) to over 3 s; one thread
    # costs ~0.16 s a step whatever the load.
    torch.set_num_threads(1)
    try:
        _build_with(root, t0)
    finally:
        torch.set_num_threads(threads)


def _build_with(root: Path, t0: float) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train, heldout = make_corpus()
    tokenizer = train_tokenizer(train)
    examples = encode_examples(tokenizer, train)
    acc, losses, seconds = {}, {}, {"prepare": round(time.time() - t0, 1)}
    at_step = {step: name for name, step in CHECKPOINTS.items()}

    def save(step, model, loss):
        if step in at_step:
            name = at_step[step]
            t1 = time.time()
            model.save_pretrained(root / name)
            tokenizer.save_pretrained(root / name)
            # score what the tests will load, and check the saved tokenizer is the trained one
            saved_tok = AutoTokenizer.from_pretrained(root / name)
            sample = render_chat(heldout[0]["question"]) + train[0]["solution"]
            if saved_tok(sample)["input_ids"] != tokenizer(sample)["input_ids"]:
                raise RuntimeError(f"the tokenizer saved in {root / name} tokenizes differently")
            saved = AutoModelForCausalLM.from_pretrained(root / name).eval()
            acc[name], losses[name] = accuracy(saved, saved_tok, heldout), round(loss, 4)
            seconds[f"save_eval_{name}"] = round(time.time() - t1, 1)

    train_model(tokenizer, examples, dict(MODEL_SPEC, stop=max(CHECKPOINTS.values())), seed=SEED,
                on_step=save)
    questions = [{"question": q["question"], "answer": q["answer"]} for q in heldout]
    info = {"questions": questions, "accuracy": acc, "final_loss": losses,
            "build_seconds": round(time.time() - t0, 1), "seconds": seconds,
            "cpu_seconds": round(time.process_time(), 1), "blank_lines": describe_blank_lines(tokenizer)}
    (root / "pool.json").write_text(json.dumps(info, indent=1))


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Build the tiny test pool and print its accuracies.")
    ap.add_argument("--cache", type=Path, default=None, help=f"cache folder (default {DEFAULT_CACHE})")
    ap.add_argument("--rebuild", action="store_true", help="ignore a cached pool")
    args = ap.parse_args(argv)
    t0 = time.time()
    pool = build_tiny_pool(args.cache, rebuild=args.rebuild)
    info = json.loads((Path(pool["small"]).parent / "pool.json").read_text())
    print(f"small={pool['small']}\nlarge={pool['large']}")
    print(f"held-out questions: {len(pool['questions'])}")
    print(f"greedy accuracy: small {info['accuracy']['small']:.0%}, large {info['accuracy']['large']:.0%}")
    print(f"final training loss: {info['final_loss']}")
    print(f"tokens holding a blank line: {info['blank_lines']['tokens_with_blank_line']}")
    print(f"build time {info['build_seconds']} s (this call {time.time() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
