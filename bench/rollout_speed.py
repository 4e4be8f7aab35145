"""Throughput of building the trajectory table (rollout.py), against two references.

    (a) plain batched `model.generate` on the same prompts, forced to write the same number
        of new tokens per sequence as the table build wrote on average (no early stop);
    (b) a naive loop: one question and one step at a time, each step a fresh `generate`
        call on the re-encoded prefix, each continuation at batch size 1.

All three use the same model as small and large (so the figures compare scheduling, not
model sizes) and report generated tokens per second; the ratios come last.

    python bench/rollout_speed.py --model PATH_OR_GGUF --questions 16 --batch-size 16
    python bench/rollout_speed.py --config qwen2.5-1.5b --device cuda --questions 64 \\
        --batch-size 64 --tokenizer PATH   # random weights at a real architecture's shape

Targets (issue 2): table build >= 0.8x of (a) and >= 4x of (b).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import data  # noqa: E402
import engine  # noqa: E402
import rollout  # noqa: E402

CONFIGS = {  # shapes of real models, for random-weight timing without the hub
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                         tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                         tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                       tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,  # CPU smoke runs
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                 tie_word_embeddings=True),
}


def random_model(config: str, device: str, dtype) -> engine.LM:
    """A causal LM of that shape with random weights (built in `dtype` directly: a 7B model
    in fp32 is 30 GB), as an engine.LM with no tokenizer and no stop token."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(**CONFIGS[config], max_position_embeddings=32768, rope_theta=1e6)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    model.generation_config.pad_token_id = 0
    params = sum(p.numel() for p in model.parameters())
    return engine.LM(config, model, None, params, stop_ids=[], pad_id=0)


def random_lm(config: str, tokenizer_path: str, device: str, dtype: str) -> engine.LM:
    """random_model() with a real tokenizer and its end-of-text token as the stop token."""
    from transformers import AutoTokenizer, GenerationConfig
    device = engine.resolve_device(device)
    lm = random_model(config, device, engine.resolve_dtype(dtype, device))
    lm.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    lm.prompt, lm.ends_step = rollout.encode_prompt, rollout.ends_step  # the method's
    lm.stop_ids = [lm.tokenizer.eos_token_id]
    if lm.tokenizer.pad_token_id is not None:
        lm.pad_id = lm.tokenizer.pad_token_id
    else:
        lm.pad_id = lm.stop_ids[0]
    lm.model.generation_config = GenerationConfig(do_sample=False, eos_token_id=lm.stop_ids,
                                                  pad_token_id=lm.pad_id)
    return lm


def sync(device):
    import torch
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def table_build(lm, questions, max_new, batch, compile=False):
    t = time.perf_counter()
    lm.batch_size, lm.compile = batch, compile
    records = rollout.records_of(lm, lm, questions, max_new)
    sync(lm.device)
    secs = time.perf_counter() - t
    small = sum(s["tokens"] for r in records for s in r["small"]["steps"])
    large = sum(e["tokens"] for r in records for e in r["escalations"])
    seqs = len(records) + sum(len(r["escalations"]) for r in records)
    prompts = [rollout.encode_prompt(lm.tokenizer, q["question"]) for q in questions]
    prompts += [rollout.encode_prompt(lm.tokenizer, r["question"], "".join(
        s["text"] for s in r["small"]["steps"][:k])) for r in records
        for k in range(len(r["escalations"]))]
    return secs, small + large, seqs, prompts, records


def left_pad(prompts: list, pad_id: int):
    """Token-id prompts as one left-padded batch: (ids [B, W], attention mask [B, W])."""
    import torch
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[r, width - len(p):] = 1
    return ids, mask


def plain_generate(lm, prompts, new_tokens, batch):
    """Plain batched generate on the same prompts, sorted by length, forced lengths."""
    import torch
    prompts = sorted(prompts, key=len)
    t = time.perf_counter()
    for b in range(0, len(prompts), batch):
        ids, mask = left_pad(prompts[b:b + batch], lm.pad_id)
        with torch.inference_mode():
            lm.model.generate(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device),
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False)
    sync(lm.device)
    return time.perf_counter() - t, len(prompts) * new_tokens


def naive_loop(lm, questions, max_new):
    """One question, one step at a time: generate() on the re-encoded prefix per step."""
    from transformers import StoppingCriteria
    flags = engine.newline_flags(lm)

    class StepEnd(StoppingCriteria):
        def __init__(self, start):
            self.start = start

        def __call__(self, input_ids, scores, **kw):
            seq = input_ids[0, self.start:].tolist()
            done = len(seq) > 0 and engine.ends_step_id(flags, seq[-2] if len(seq) > 1 else None,
                                                     seq[-1])
            return __import__("torch").tensor([done], device=input_ids.device)

    import torch
    t, tokens = time.perf_counter(), 0
    for q in questions:
        steps = []
        while sum(map(len, steps)) < max_new:
            prompt = rollout.encode_prompt(lm.tokenizer, q["question"])
            ids = torch.tensor([prompt + [x for s in steps for x in s]], device=lm.device)
            out = lm.model.generate(input_ids=ids, max_new_tokens=max_new - sum(map(len, steps)),
                                    do_sample=False, stopping_criteria=[StepEnd(ids.shape[1])])
            new = [x for x in out[0, ids.shape[1]:].tolist()]
            stop = next((i for i, x in enumerate(new) if x in lm.stop_ids), None)
            steps.append(new[:stop] if stop is not None else new)
            if stop is not None or not steps[-1]:
                break
        tokens += sum(map(len, steps))
        for k in range(len(steps)):
            prefix_ids = rollout.encode_prompt(lm.tokenizer, q["question"], lm.tokenizer.decode(
                [x for s in steps[:k] for x in s], skip_special_tokens=True))
            g = engine.generate_batch(lm, [prefix_ids], max_new)[0]
            tokens += len(g.ids)
    sync(lm.device)
    return time.perf_counter() - t, tokens


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="hub id, folder or .gguf (a real model)")
    p.add_argument("--config", choices=sorted(set(CONFIGS) - {"tiny"}),  # tiny: 512-token vocab
                   help="random weights of this shape")
    p.add_argument("--tokenizer", help="tokenizer folder for --config (a Qwen2.5 tokenizer)")
    p.add_argument("--dataset", default="gsm8k")
    p.add_argument("--split", default="test")
    p.add_argument("--questions", type=int, default=16)
    p.add_argument("--naive-questions", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--compile", action="store_true", help="CUDA graphs in the table build")
    args = p.parse_args()
    lm = random_lm(args.config, args.tokenizer, args.device, args.dtype) if args.config \
        else rollout.load_model(args.model, None, args, args.device)
    questions = data.load_questions(args.dataset, args.split, limit=args.questions)
    engine.newline_flags(lm)
    lm.batch_size, lm.compile = args.batch_size, args.compile
    rollout.records_of(lm, lm, questions[:2], args.max_new_tokens)  # warm-up (and graph capture)

    secs, toks, seqs, prompts, records = table_build(lm, questions, args.max_new_tokens,
                                                     args.batch_size, args.compile)
    steps = sum(len(r["small"]["steps"]) for r in records) / len(records)
    print(f"table build : {toks} tokens in {secs:.1f}s = {toks / secs:.1f} tok/s "
          f"({len(records)} questions, {steps:.1f} steps each, {seqs} sequences)")
    per_seq = max(1, round(toks / seqs))
    psecs, ptoks = plain_generate(lm, prompts, per_seq, args.batch_size)
    print(f"(a) generate: {ptoks} tokens in {psecs:.1f}s = {ptoks / psecs:.1f} tok/s "
          f"({len(prompts)} sequences x {per_seq} forced tokens, batch {args.batch_size})")
    nsecs, ntoks = naive_loop(lm, questions[:args.naive_questions], args.max_new_tokens)
    print(f"(b) naive   : {ntoks} tokens in {nsecs:.1f}s = {ntoks / nsecs:.1f} tok/s "
          f"({args.naive_questions} questions, one step at a time)")
    print(f"ratio vs (a): {(toks / secs) / (ptoks / psecs):.2f}x   (target >= 0.8)")
    print(f"ratio vs (b): {(toks / secs) / (ntoks / nsecs):.2f}x   (target >= 4)")


if __name__ == "__main__":
    main()
