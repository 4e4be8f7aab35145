"""Stage 5 of stepwise model routing: route a question live, step by step (DESIGN.md section 1).

The small model drafts one step at a time (its KV cache carries over, nothing is encoded
twice). After each draft the state features (train_policy.state_features, the function
the policy was trained on) go through the policy; at the first step with
p(escalate) >= kappa (calibrate.py's threshold) the draft is dropped and the large model
continues from the question plus the accepted steps, with the same prompt construction as
rollout.py. With greedy decoding this is exactly the run that the trajectory table
predicts for the same escalation step, which is what makes the table's numbers true of
live routing (tests/test_route.py checks it).

    python route.py --policy results/gsm8k/policy.pt \\
        --calibration results/gsm8k/calibration.json "Janet's ducks lay 16 eggs per day. ..."
    python route.py --policy ... --calibration ... --interactive
    python route.py ... --json "question"        # one JSON object on the last line

--small/--large default to the pool recorded in the policy file. --escalate-at K forces
escalation at step K (K = 0: the large model alone), ignoring the policy.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from rollout import (DEFAULT_LARGE, DEFAULT_SMALL, ArgumentParser, StepDrafter, UsageError, encode_prompt,
                     extract_answer, load_lm, run_cli)


class Display:
    """Prints steps for a person as they are written, marked by model."""
    COLOURS = {"small": "\033[36m", "large": "\033[35m", "dropped": "\033[2;9m"}

    def __init__(self, enabled: bool, stream=sys.stdout):
        self.enabled, self.stream = enabled, stream
        self.colour = enabled and stream.isatty() and "NO_COLOR" not in os.environ

    def paint(self, text: str, kind: str) -> str:
        return f"{self.COLOURS[kind]}{text}\033[0m" if self.colour else text

    def step(self, t: int, model: str, text: str, p: float | None = None, accepted=True):
        if not self.enabled:
            return
        tag = f"[{t}] {model}" + (f" p={p:.3f}" if p is not None else "")
        tag += "" if accepted else " ESCALATE (draft dropped)"
        body = text.rstrip("\n")
        print(self.paint(tag, model if accepted else "dropped"), file=self.stream)
        print(self.paint(body, model if accepted else "dropped") + "\n", file=self.stream,
              flush=True)


def route(question: str, small, large, policy, kappa: float, max_new_tokens: int,
          escalate_at: int | None = None, display: Display | None = None) -> dict:
    """One-way escalation on one question. Returns the run as a dict (see --json)."""
    import torch
    from train_policy import state_features
    display = display or Display(False)
    steps, accepted, escalated_at = [], [], None
    prompt = encode_prompt(small.tokenizer, question)
    drafter = StepDrafter(small, prompt, max_new_tokens)
    small_tokens = 0
    if escalate_at != 0:
        while (draft := drafter.next_step()) is not None:
            t = len(accepted) + 1
            small_tokens += draft["tokens"]
            feats = state_features(len(prompt), accepted + [draft], drafter.ended)
            with torch.no_grad():
                p = float(policy(torch.tensor([feats], dtype=torch.float32))[0]) \
                    if policy is not None else None
            escalate = t == escalate_at if escalate_at is not None else p >= kappa
            steps.append({"text": draft["text"], "model": "small", "p_escalate": p,
                          "accepted": not escalate})
            display.step(t, "small", draft["text"], p, accepted=not escalate)
            if escalate:
                escalated_at = t
                break
            accepted.append(draft)
    else:
        escalated_at = 0  # the large model alone
    solution = "".join(s["text"] for s in accepted)
    large_tokens = 0
    if escalated_at is not None:
        cont = StepDrafter(large, encode_prompt(large.tokenizer, question, solution),
                           max_new_tokens)
        while (step := cont.next_step()) is not None:
            large_tokens += step["tokens"]
            steps.append({"text": step["text"], "model": "large", "accepted": True})
            display.step(len(steps) - (escalated_at > 0), "large", step["text"])
        solution += cont.solution_text
    # Cost in FLOPs (2 * params per generated token), relative to the large model alone.
    # That run is not made: its length is estimated by the final solution's length.
    cost = 2 * small.params * small_tokens + 2 * large.params * large_tokens
    large_alone = large_tokens if escalated_at == 0 else \
        len(large.tokenizer(solution, add_special_tokens=False)["input_ids"])
    return {"question": question, "steps": steps, "escalated_at": escalated_at,
            "answer": extract_answer(solution), "solution": solution,
            "tokens": {"small": small_tokens, "large": large_tokens},
            "relative_cost": cost / (2 * large.params * max(1, large_alone)),
            "relative_cost_is_estimate": escalated_at != 0}


def parse_args(argv=None):
    p = ArgumentParser(
        description="Route one question live: the small model drafts steps, the policy "
                    "escalates to the large model when p(escalate) >= kappa.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("question", nargs="?", help="the question (or use --interactive)")
    p.add_argument("--policy", help="policy file from train_policy.py (needed unless "
                                    "--escalate-at is given)")
    p.add_argument("--calibration", help="calibration.json from calibrate.py (gives kappa)")
    p.add_argument("--kappa", type=float, default=None,
                   help="threshold on p(escalate), instead of --calibration")
    p.add_argument("--small", default=None, help="default: the policy's pool, else "
                   + DEFAULT_SMALL)
    p.add_argument("--large", default=None, help="default: the policy's pool, else "
                   + DEFAULT_LARGE)
    p.add_argument("--max-new-tokens", type=int, default=1024,
                   help="per model, as in rollout.py")
    p.add_argument("--escalate-at", type=int, default=None,
                   help="force escalation at this step (0: the large model alone)")
    p.add_argument("--interactive", action="store_true", help="a prompt loop")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object with the run on the last line")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    args = p.parse_args(argv)
    if not args.interactive and (args.question is None or not args.question.strip()):
        raise UsageError("give a non-empty question, or --interactive")
    if args.escalate_at is not None and args.escalate_at < 0:
        raise UsageError(f"--escalate-at must be >= 0, got {args.escalate_at}")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.escalate_at is None:
        if not args.policy:
            raise UsageError("--policy is needed (or --escalate-at K to force a route)")
        if args.calibration is None and args.kappa is None:
            raise UsageError("--calibration (or --kappa) is needed to set the threshold")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    policy, kappa, pool = None, args.kappa, {}
    if args.policy:
        from train_policy import load_policy
        policy = load_policy(args.policy)
        pool = policy.meta.get("pool", {})
    if args.calibration and kappa is None:
        from calibrate import load_calibration
        kappa = load_calibration(args.calibration)["kappa"]
    small_name = args.small or pool.get("small", {}).get("model", DEFAULT_SMALL)
    large_name = args.large or pool.get("large", {}).get("model", DEFAULT_LARGE)
    small = load_lm(small_name, args.device, args.dtype)
    large = small if large_name == small_name else load_lm(large_name, args.device, args.dtype)
    display = Display(enabled=True, stream=sys.stderr if args.json else sys.stdout)

    def one(question: str) -> dict:
        run = route(question, small, large, policy, kappa, args.max_new_tokens,
                    args.escalate_at, display)
        where = "never" if run["escalated_at"] is None else f"at step {run['escalated_at']}"
        print(f"answer: {run['answer']}  |  escalated: {where}  |  tokens small "
              f"{run['tokens']['small']}, large {run['tokens']['large']}  |  relative cost "
              f"{run['relative_cost']:.3f}" + (" (estimated: the large model alone was not "
                                               "run)" if run["relative_cost_is_estimate"] else ""),
              file=display.stream, flush=True)
        if args.json:
            print(json.dumps(run, ensure_ascii=False), flush=True)
        return run

    if not args.interactive:
        one(args.question.strip())
        return 0
    while True:
        try:
            question = input("question> ").strip()
        except EOFError:
            return 0
        if question:
            one(question)


if __name__ == "__main__":
    run_cli(main)
