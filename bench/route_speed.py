"""Time per generated token of live routing's small-model drafting, against plain generate.

route.py drafts one step at a time with the KV cache carried over (engine.StepDrafter),
computes the state features and runs the policy after every step. This script times that
loop (the policy never escalates here, so the small model writes the whole solution) and
plain `model.generate` writing the same number of tokens for the same prompt, both at batch
size 1, and prints the ratio last (issue 5's target: <= 1.3).

    python bench/route_speed.py --model PATH_OR_GGUF --questions 4 --max-new-tokens 256
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import data  # noqa: E402
import engine  # noqa: E402
import rollout  # noqa: E402
from train_policy import Policy, state_features  # noqa: E402


def drafting(lm, policy, prompt, max_new):
    """route.py's small-model loop: draft a step, features, policy, accept."""
    t = time.perf_counter()
    drafter, steps = engine.StepDrafter(lm, prompt, max_new), []
    while (step := drafter.next_step()) is not None:
        steps.append(step)
        feats = state_features(len(prompt), steps, drafter.ended)
        with torch.no_grad():
            policy(torch.tensor([feats], dtype=torch.float32))
    return time.perf_counter() - t, drafter.generated, len(steps)


def plain(lm, prompt, new_tokens):
    t = time.perf_counter()
    with torch.inference_mode():
        lm.model.generate(input_ids=torch.tensor([prompt], device=lm.device),
                          attention_mask=torch.ones((1, len(prompt)), dtype=torch.long,
                                                    device=lm.device),
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="hub id, folder or .gguf")
    p.add_argument("--dataset", default="gsm8k")
    p.add_argument("--questions", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    args = p.parse_args()
    lm = rollout.load_model(args.model, None, args, args.device)
    policy = Policy().eval()  # untrained: only its cost matters here
    engine.newline_flags(lm)
    questions = data.load_questions(args.dataset, "test", limit=args.questions)
    prompts = [rollout.encode_prompt(lm.tokenizer, q["question"]) for q in questions]
    drafting(lm, policy, prompts[0], 8)  # warm-up
    plain(lm, prompts[0], 8)
    d_secs = g_secs = tokens = steps = 0
    for prompt in prompts:
        secs, n, s = drafting(lm, policy, prompt, args.max_new_tokens)
        d_secs, tokens, steps = d_secs + secs, tokens + n, steps + s
        g_secs += plain(lm, prompt, n)
    print(f"route drafting: {tokens} tokens, {steps} steps in {d_secs:.2f}s = "
          f"{1000 * d_secs / tokens:.1f} ms/token")
    print(f"plain generate: {tokens} tokens in {g_secs:.2f}s = {1000 * g_secs / tokens:.1f} ms/token")
    print(f"ratio (route / generate): {d_secs / g_secs:.2f}x   (target <= 1.3)")


if __name__ == "__main__":
    main()
