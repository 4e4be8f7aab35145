"""Synthetic schema-1 trajectory tables with a known structure, shared by the table-stage tests.

Each question has n small steps. With probability `p_error` one hidden "error step" e is
where the small model goes wrong. The error step is signalled only by a COMBINATION of
features: its mean_logprob is low AND its max_entropy is high, both moderately. Ordinary
steps are often "decoys" with ONE of the two strongly off (very low mean_logprob, or very
high max_entropy), never both. So any single-feature threshold either misses error steps or
escalates at many decoys, while a learned policy can fire on the conjunction.

Outcomes: the small model is correct iff there is no error step. Escalating at step t
(the large model continues after t-1 accepted steps) is correct with probability
`p_large_ok` when t <= e (the error not yet accepted), else `p_after_error`. The large model
alone (escalations[0]) is correct with probability `p_large_ok`. The large continuation
writes about as many tokens as the remaining small steps would.
"""
from __future__ import annotations

import json
import random

POOL = {"small": {"model": "synthetic/small-1B", "params": 1_000_000_000},
        "large": {"model": "synthetic/large-7B", "params": 7_000_000_000}}


def make_records(n_questions: int, seed: int = 0, *, min_steps=2, max_steps=8, p_error=0.5,
                 p_decoy=0.5, p_large_ok=0.95, p_after_error=0.05, id_prefix="syn") -> list[dict]:
    rng = random.Random(seed)
    records = []
    for q in range(n_questions):
        n = rng.randint(min_steps, max_steps)
        error = rng.randint(1, n) if rng.random() < p_error else None   # 1-based step, or none
        prompt = rng.randint(40, 160)
        gold = str(rng.randint(1, 999))
        steps = []
        for t in range(1, n + 1):
            a, b = rng.gauss(0, 0.15), rng.gauss(0, 0.15)          # how "off" the step looks
            if t == error:
                a, b = rng.gauss(0.8, 0.1), rng.gauss(0.8, 0.1)     # both moderately off
            elif rng.random() < p_decoy:
                if rng.random() < 0.5:
                    a = rng.gauss(1.3, 0.2)                         # one strongly off
                else:
                    b = rng.gauss(1.3, 0.2)
            mean_lp = min(-0.01, -0.3 - 0.5 * a)
            max_ent = 1.0 + 2.0 * b
            text = f"Step {t}: some reasoning.\n\n"
            if t == n:
                text = f"So the answer is \\boxed{{{gold if error is None else int(gold) + 1}}}."
            steps.append({"text": text, "tokens": rng.randint(15, 60),
                          "mean_logprob": round(mean_lp, 5),
                          "min_logprob": round(3 * mean_lp - abs(rng.gauss(1.0, 0.5)), 5),
                          "mean_entropy": round(max(0.0, 0.25 * max_ent + rng.gauss(0, 0.1)), 5),
                          "max_entropy": round(max_ent, 5)})
        small_ok = error is None
        escalations = []
        for k in range(n):
            t = k + 1
            ok_prob = p_after_error if (error is not None and t > error) else p_large_ok
            ok = rng.random() < ok_prob
            remaining = sum(s["tokens"] for s in steps[k:])
            escalations.append({
                "after": k, "prompt_tokens": prompt + sum(s["tokens"] for s in steps[:k]),
                "tokens": max(5, int(remaining * rng.uniform(0.8, 1.2))),
                "text": "Large continues.\n\n\\boxed{" + (gold if ok else "0") + "}",
                "answer": gold if ok else "0", "correct": ok, "finished": True})
        records.append({
            "schema": 1, "id": f"{id_prefix}/{q}", "dataset": "synthetic",
            "question": f"Synthetic question {id_prefix}/{q} (seed {seed})?", "gold": gold, "pool": POOL,
            "small": {"prompt_tokens": prompt, "steps": steps,
                      "answer": gold if small_ok else str(int(gold) + 1),
                      "correct": small_ok, "finished": True},
            "escalations": escalations,
            "hidden_error_step": error,      # extra key: the ground truth, for tests only
        })
    return records


def step(tokens, mlp=-0.1, minlp=-1.0, ment=0.5, maxent=2.0, text="x\n\n"):
    return {"text": text, "tokens": tokens, "mean_logprob": mlp, "min_logprob": minlp,
            "mean_entropy": ment, "max_entropy": maxent}


def record(qid, steps, esc, small_correct, prompt=10, pool=POOL, finished=True):
    """A hand-built record; esc: list of (tokens, correct) for escalations after k = 0..n-1
    steps. A wrong small answer is null when the solution was cut off (finished=False)."""
    cum = [0]
    for s in steps:
        cum.append(cum[-1] + s["tokens"])
    return {"schema": 1, "id": qid, "question": f"question {qid}?", "gold": "1", "pool": pool,
            "small": {"prompt_tokens": prompt, "steps": steps,
                      "answer": "1" if small_correct else ("2" if finished else None),
                      "correct": small_correct, "finished": finished},
            "escalations": [{"after": k, "prompt_tokens": prompt + cum[k], "tokens": tok, "text": "",
                             "answer": "1" if ok else "2", "correct": ok, "finished": True}
                            for k, (tok, ok) in enumerate(esc)]}


def write_jsonl(path, records: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    return str(path)


def run_parallel(commands: list[list[str]], cwd) -> list:
    """Run several CLI invocations at once (each pays the torch import); returns
    CompletedProcess-like objects with returncode, stdout, stderr."""
    import subprocess
    import sys
    procs = [subprocess.Popen([sys.executable, *cmd], cwd=cwd, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for cmd in commands]
    results = []
    for cmd, proc in zip(commands, procs):
        out, err = proc.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
    return results
