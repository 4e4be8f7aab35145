"""Stage 5 of stepwise model routing: route one question live, step by step (docs/DESIGN.md 1).

Run it right after `python fetch_models.py` (the committed SVAMP policy of the
Qwen2.5-Coder 0.5B -> 1.5B pool; `make demo` rebuilds it):

    python route.py --policy results/svamp/policy.pt --calibration results/svamp/calibration.json \\
        "Dan had 5 apples and bought 7 more. How many apples does he have now?"

    python route.py --policy ... --calibration ... --interactive   # a prompt loop, both models loaded
    python route.py ... --json "question"        # one JSON object on the last line of stdout

The small model drafts one step at a time (its KV cache carries over, nothing is encoded
twice). After each draft the state features (train_policy.state_features, the function
the policy was trained on) go through the policy; at the first step with
p(escalate) >= kappa (calibrate.py's threshold) the draft is dropped and the large model
continues from the question plus the accepted steps, with the same prompt construction as
rollout.py. With greedy decoding this is exactly the run that the trajectory table
predicts for the same escalation step, which is what makes the table's numbers true of
live routing (tests/test_route.py checks it).

--small/--large default to the pool recorded in the policy file (a folder of fetch_models.py
that is not where the policy says is looked up in this machine's model cache). The calibration
must be the one made for this policy (checked by the policy file's sha256, as evaluate.py
does). A calibration whose answer is the large model alone (`"kappa": null, "fallback":
"large"`: no threshold met the target, or every one that did cost more than the large model
alone) means just that: nothing is drafted. The large model is loaded only
when a question escalates (in --interactive both are loaded up front). --escalate-at K
forces escalation at step K (K = 0: the large model alone), ignoring the policy.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from cli import UsageError, add_api_args, add_model_args, make_parser, run_cli
from engine import load_lm, resolve_device
from data import extract_answer
from rollout import DEFAULT_LARGE, DEFAULT_SMALL, load_model

GET_ONE = "train one with train_policy.py and calibrate.py, or run `python demo.py --refresh-committed` " \
          "to rebuild results/svamp/policy.pt and results/svamp/calibration.json"


class LazyLM:
    """A model of the pool that is loaded (or whose server is reached) on first use, so that a
    one-shot question that never escalates does not pay for loading the large model.
    `params` (from the policy's pool) prices a run without loading it."""

    def __init__(self, name: str, load, params: int | None = None, say=lambda msg: None):
        self.name, self.load, self.params = name, load, params
        self.say, self.lm, self.load_seconds = say, None, 0.0

    def get(self):
        if self.lm is None:
            t = time.perf_counter()
            self.say(f"loading {self.name} ...")
            self.lm = self.load()
            self.params = self.lm.params or self.params
            self.load_seconds = time.perf_counter() - t
            self.say(f"loaded {self.name} in {self.load_seconds:.1f} s")
        return self.lm


SERVERS = []  # llama.cpp servers this process started (they stop when it exits)


def served_model(name: str, url: str, args, say):
    """The model behind an OpenAI-compatible server. A policy trained on the offline pool
    served by serve_gguf.py names a loopback URL: where nothing answers there and the model's
    .gguf is in fetch_models.py's cache, the same llama.cpp server is started in this process."""
    from urllib.parse import urlparse
    import requests
    where = urlparse(url)
    if where.hostname in ("127.0.0.1", "localhost"):
        try:
            requests.get(url.rstrip("/") + "/models", timeout=5)
        except requests.ConnectionError:
            from fetch_models import REGISTRY, default_cache
            gguf = default_cache() / f"{name}.gguf"
            if name not in REGISTRY or not gguf.is_file():
                raise UsageError(f"nothing answers at {url} for model {name}: start its server "
                                 "(python serve_gguf.py MODEL.gguf --name NAME --port PORT)"
                                 + (f", or run `python fetch_models.py --gguf-only {name}` so "
                                    "that route.py can start it" if name in REGISTRY else ""))
            from serve_gguf import start_server
            say(f"starting llama.cpp's server for {gguf.name} on port {where.port}")
            SERVERS.append(start_server(str(gguf), name, where.port, threads=os.cpu_count() or 1,
                                        parallel=1, ctx_per_slot=4096, prompt_cache=False))
    return load_model(name, url, args)


class Display:
    """Prints steps for a person as they are written, marked by model."""
    COLOURS = {"small": "\033[36m", "large": "\033[35m", "dropped": "\033[2;9m", "note": "\033[2m"}

    def __init__(self, enabled: bool, stream=sys.stdout):
        self.enabled, self.stream = enabled, stream
        self.colour = enabled and stream.isatty() and "NO_COLOR" not in os.environ

    def paint(self, text: str, kind: str) -> str:
        return f"{self.COLOURS[kind]}{text}\033[0m" if self.colour else text

    def note(self, text: str):
        if self.enabled:
            print(self.paint(text, "note"), file=self.stream, flush=True)

    def step(self, t: int, model: str, text: str, p: float | None = None,
             kappa: float | None = None, accepted=True):
        if not self.enabled:
            return
        tag = f"[{t}] {model}"
        if p is not None:
            tag += f"  p={p:.3f}" + ("" if kappa is None else
                                     f" {'<' if p < kappa else '>='} kappa {kappa:.3f}")
        tag += "" if accepted else "  ESCALATE (draft dropped)"
        body = text.rstrip("\n")
        print(self.paint(tag, model if accepted else "dropped"), file=self.stream)
        print(self.paint(body, model if accepted else "dropped") + "\n", file=self.stream,
              flush=True)


def route(question: str, small, large, policy, kappa: float | None, max_new_tokens: int,
          escalate_at: int | None = None, display: Display | None = None, prm=None) -> dict:
    """One-way escalation on one question. Returns the run as a dict (see --json).

    `small` and `large` are loaded models (LM) or LazyLM, loaded only if the route needs them.
    The route is forced by `escalate_at` (0: the large model alone; K: escalate at step K);
    else the policy escalates at the first step with p >= kappa; kappa None (a calibration
    whose fallback is the large model) is the large model alone: nothing is drafted.
    `prm` (prm.py; for a policy trained --with-prm) scores each draft live, the prefix ending
    at it, as rollout.py --prm scored the table; its reading is part of the cost. A policy
    trained --hidden-state reads the drafter's own hidden state at each draft's last token
    (the same forward pass, no extra model call) through its stored probe."""
    import torch
    from train_policy import before_draft_features, hidden_wrong_logits, state_features

    def need(m):
        return m.get() if isinstance(m, LazyLM) else m

    display = display or Display(False)
    start = time.perf_counter()
    loads_before = sum(m.load_seconds for m in (small, large) if isinstance(m, LazyLM))
    large_only = escalate_at == 0 or (escalate_at is None and kappa is None)
    steps, accepted, escalated_at, small_tokens, prm_read, p_before = [], [], None, 0, 0, None
    reads_hidden = policy is not None and policy.probe is not None and not large_only
    drafter = None
    if reads_hidden:   # the drafter's prompt pass gives the question's state: no extra model call
        drafter = need(small).drafter(question, max_new_tokens, hidden_layer=hidden_layer(policy, need(small)))
    if reads_hidden and policy.question_probe is not None:
        # ALGO LOGIC: the decision before the first draft (train_policy.py --before-draft)
        question_wrong = float(hidden_wrong_logits(policy.question_probe, drafter.question_hidden[None])[0])
        with torch.no_grad():
            p_before = float(policy(torch.tensor([before_draft_features(question_wrong)], dtype=torch.float32))[0])
        large_only = escalate_at is None and p_before >= kappa
        display.note(f"before the first draft: p(escalate) {p_before:.3f}, kappa {kappa:.3f}"
                     + (": the large model takes the question" if large_only else "") if kappa is not None
                     else f"before the first draft: p(escalate) {p_before:.3f}")
    if large_only:
        escalated_at = 0
        display.note("large model only" + (" (the calibration's fallback)" if escalate_at is None and
                                           p_before is None else ""))
    else:
        # ALGO LOGIC: draft a step, score its state, escalate at the first p >= kappa
        drafter = drafter or need(small).drafter(question, max_new_tokens)
        while (draft := drafter.next_step()) is not None:
            t = len(accepted) + 1
            small_tokens += draft["tokens"]
            if reads_hidden:   # the probe's logit at the draft's last token (train_policy.py --hidden-state)
                draft["hidden_wrong"] = float(hidden_wrong_logits(policy.probe, draft["hidden"][None])[0])
            if prm is not None:   # the PRM's judgement of the prefix ending at the draft
                from prm import score_steps
                texts = [s["text"] for s in accepted + [draft]]
                draft = {**draft, "prm_score": score_steps(prm, question, texts)[-1]}
                prm_read = prm_tokens(prm, question, texts)
            feats = state_features(drafter.prompt_tokens, accepted + [draft], drafter.ended,
                                   question_wrong if p_before is not None else 0.0)
            with torch.no_grad():
                p = float(policy(torch.tensor([feats], dtype=torch.float32))[0]) \
                    if policy is not None else None
            escalate = t == escalate_at if escalate_at is not None else p >= kappa
            steps.append({"text": draft["text"], "model": "small", "p_escalate": p,
                          "accepted": not escalate,
                          **({"hidden_wrong": draft["hidden_wrong"]} if reads_hidden else {}),
                          **({"prm_score": draft["prm_score"]} if prm is not None else {})})
            display.step(t, "small", draft["text"], p, kappa if escalate_at is None else None,
                         accepted=not escalate)
            if escalate:
                escalated_at = t
                break
            accepted.append(draft)
        if hasattr(drafter, "close"):
            drafter.close()  # a server stops drafting
    solution = "".join(s["text"] for s in accepted)
    large_tokens = 0
    if escalated_at is not None:
        # ALGO LOGIC: the large model continues after the accepted steps
        cont = need(large).drafter(question, max_new_tokens, prefix=solution)
        while (step := cont.next_step()) is not None:
            large_tokens += step["tokens"]
            steps.append({"text": step["text"], "model": "large", "accepted": True})
            display.step(len(steps) - (escalated_at > 0), "large", step["text"])
            solution += step["text"]
    loads = sum(m.load_seconds for m in (small, large) if isinstance(m, LazyLM)) - loads_before
    seconds = time.perf_counter() - start - loads
    # Cost in FLOPs (2 * params per generated token), relative to the large model alone.
    # That run is not made: its length is estimated by the final solution's length (counted
    # by the small tokenizer where the large model was not loaded).
    small_params, large_params = small.params if small_tokens else 0, large.params
    if escalated_at == 0:
        large_alone = large_tokens
    else:
        counter = large.lm if isinstance(large, LazyLM) else large
        counter = counter if counter is not None else need(small)
        large_alone = counter.count_tokens(solution)  # None: a server without /tokenize
    relative_cost = None
    if large_params and large_alone is not None:
        cost = 2 * small_params * small_tokens + 2 * large_params * large_tokens \
            + (2 * prm.params * prm_read if prm is not None else 0)
        relative_cost = cost / (2 * large_params * max(1, large_alone))
    where = ("large model only" if escalated_at == 0 else "small model only (never escalated)"
             if escalated_at is None else f"escalated at step {escalated_at}")
    return {"question": question, "steps": steps, "escalated_at": escalated_at, "route": where,
            "p_before_draft": p_before,
            "kappa": kappa, "answer": extract_answer(solution), "solution": solution,
            "tokens": {"small": small_tokens, "large": large_tokens,
                       **({"prm_read": prm_read} if prm is not None else {})},
            "relative_cost": relative_cost, "relative_cost_is_estimate": escalated_at != 0,
            "seconds": round(seconds, 3), "load_seconds": round(loads, 3)}


def hidden_layer(policy, lm) -> int:
    """The index into the drafter's hidden_states that the policy's probe reads (its layer,
    e.g. "mid"), checked against the probe's width: one line where the model is another."""
    from probe import layer_indices
    config = lm.model.config
    if policy.probe_info.get("width") != config.hidden_size:
        raise UsageError(f"the policy's hidden-state probe reads states of width {policy.probe_info.get('width')} "
                         f"({policy.probe_info.get('model')}), but the small model {lm.name} has "
                         f"{config.hidden_size}")
    return layer_indices([policy.probe_info["layer"]], config.num_hidden_layers)[0]


def prm_tokens(prm, question: str, texts: list) -> int:
    """Tokens the PRM has read once it scored steps 1..t (prefix caching; DESIGN section 2)."""
    from prm import encode, prm_cost_tokens
    e = encode(prm, question, texts)
    return prm_cost_tokens(e.prompt_tokens, e.step_tokens, len(texts))


def build_parser():
    p = make_parser(__doc__)
    p.add_argument("question", nargs="?", help="the question, quoted (or --interactive)")
    p.add_argument("--policy", metavar="PATH",
                   help="policy file from train_policy.py, e.g. results/svamp/policy.pt "
                        "(needed unless --escalate-at is given)")
    p.add_argument("--calibration", metavar="PATH",
                   help="calibration.json that calibrate.py made for this policy: gives kappa, "
                        "or the large model alone where no kappa met the target")
    p.add_argument("--kappa", type=float, metavar="K",
                   help="threshold on p(escalate), in place of --calibration")
    p.add_argument("--small", metavar="MODEL",
                   help="small model: hub id, local folder or .gguf file (default: the policy's "
                        f"pool, else {DEFAULT_SMALL})")
    p.add_argument("--large", metavar="MODEL",
                   help="large model: hub id, local folder or .gguf file (default: the policy's "
                        f"pool, else {DEFAULT_LARGE})")
    p.add_argument("--prm", metavar="MODEL",
                   help="process reward model for a policy trained --with-prm (default: the "
                        "policy's pool.prm.model); each draft is scored live")
    p.add_argument("--escalate-at", type=int, metavar="K",
                   help="force escalation at step K, ignoring the policy (0: the large model alone)")
    p.add_argument("--interactive", action="store_true",
                   help="a prompt loop; both models are loaded once, up front")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object with the run on the last line of stdout "
                        "(the live display goes to stderr)")
    add_model_args(p, max_new_tokens=None, dtype=None, defaults_from="the policy's training table's")
    add_api_args(p)
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if not args.interactive and (args.question is None or not args.question.strip()):
        raise UsageError("give a non-empty question, or --interactive")
    if args.escalate_at is not None and args.escalate_at < 0:
        raise UsageError(f"--escalate-at must be >= 0, got {args.escalate_at}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.kappa is not None and not 0.0 <= args.kappa <= 1.0:
        raise UsageError(f"--kappa is a threshold on a probability: it must be in [0, 1], got {args.kappa}")
    if args.kappa is not None and args.calibration:
        raise UsageError("give --calibration or --kappa, not both")
    if args.escalate_at is None:
        if not args.policy:
            raise UsageError("--policy is needed (or --escalate-at K to force a route)")
        if args.calibration is None and args.kappa is None:
            raise UsageError("--calibration (or --kappa) is needed to set the threshold")
    return args


def read_calibration(path: str, policy_path: str | None) -> dict:
    """calibrate.py's file, refused (one line) unless it was made for this very policy file."""
    from calibrate import load_calibration, sha256
    if not Path(path).is_file():
        raise UsageError(f"{path}: no such calibration file; {GET_ONE}")
    cal = load_calibration(path)
    if policy_path and cal["policy_sha256"] != sha256(policy_path):
        raise UsageError(f"{path} was made for policy {cal['policy']} "
                         f"(sha256 {cal['policy_sha256'][:12]}...), not for {policy_path}")
    return cal


def pool_model(given: str | None, pool: dict, role: str, default: str) -> tuple[str, str, int | None]:
    """The model for `role`, where it came from, and its size where the policy's pool knows it.
    A policy records its pool as the tables named it; a fetch_models.py folder recorded on
    another machine (or cache) is found by its name in this machine's model cache."""
    recorded = pool.get(role, {})
    name, source = (given, f"--{role}") if given else \
        (recorded.get("model", default), "the policy's pool" if recorded else "default")
    if not given and recorded and not Path(name).expanduser().exists():
        from fetch_models import REGISTRY, default_cache
        short = Path(name).name
        if short in REGISTRY:
            if not (default_cache() / short / "config.json").is_file():
                raise UsageError(f"the policy's {role} model {short} is not in the model cache "
                                 f"{default_cache()}: run `python fetch_models.py` first, or "
                                 f"pass --{role}")
            name, source = str(default_cache() / short), "the policy's pool, in the model cache"
    same = recorded.get("model") is not None and Path(recorded["model"]).name == Path(name).name
    return name, source, recorded.get("params") if same else None


def generation_defaults(args, policy, display) -> None:
    """--max-new-tokens and --dtype: the policy's training table's settings where the flags are
    not given (so that the live run is the one the table recorded), a warning where a flag
    overrides them; 1024 and auto without a policy that records them."""
    table = (policy.meta.get("settings") or {}) if policy is not None else {}
    dtypes = table.get("dtype") or []
    recorded = {"max_new_tokens": table.get("max_new_tokens"), "dtype": dtypes[0] if len(dtypes) == 1 else None}
    for key, fallback in (("max_new_tokens", 1024), ("dtype", "auto")):
        given, theirs = getattr(args, key), recorded[key]
        if given is None:
            setattr(args, key, theirs if theirs is not None else fallback)
        elif theirs is not None and str(given) != str(theirs) and not (key == "dtype" and given == "auto"):
            display.note(f"warning: --{key.replace('_', '-')} {given} overrides the policy's training "
                         f"table ({theirs}): live runs may differ from what the table predicts")


def main(argv=None) -> int:
    args = parse_args(argv)
    display = Display(enabled=True, stream=sys.stderr if args.json else sys.stdout)
    policy, kappa, pool = None, args.kappa, {}
    if args.policy:
        from train_policy import load_policy
        if not Path(args.policy).is_file():
            raise UsageError(f"{args.policy}: no such policy file; {GET_ONE}")
        policy = load_policy(args.policy)
        pool = policy.meta.get("pool", {})
    generation_defaults(args, policy, display)
    if args.calibration:
        cal = read_calibration(args.calibration, args.policy)
        kappa = cal["kappa"]
        if kappa is None and cal.get("fallback") != "large":
            raise UsageError(f"{args.calibration}: kappa is null but fallback is not \"large\"")
    large_only = args.escalate_at == 0 or (args.escalate_at is None and kappa is None)

    models = {}
    for role, default in (("small", DEFAULT_SMALL), ("large", DEFAULT_LARGE)):
        recorded, api = pool.get(role, {}), getattr(args, f"{role}_api")
        if api is None and not getattr(args, role) and recorded.get("backend") == "api":
            api = recorded.get("base_url")  # the policy's tables came from a server: that one
        if api is not None:  # a served model (api_engine.py), reached on first use
            name = getattr(args, role) or recorded.get("model") or default
            params = recorded.get("params") if recorded.get("model") == name else None
            load = (lambda n, u: lambda: served_model(n, u, args, display.note))(name, api)
            source = f"served at {api}"
        else:
            name, source, params = pool_model(getattr(args, role), pool, role, default)
            if role == "large" or not large_only:
                load_lm(name, check_only=True)  # a mistyped name fails now, not after drafting
            load = (lambda n: lambda: load_model(n, None, args, args.device))(name)
        if role == "large" or not large_only:
            display.note(f"{role} model: {name} ({source})")
        models[role] = LazyLM(name, load, params, display.note)
    small, large = models["small"], models["large"]
    if policy is not None and policy.probe is not None and not large_only and \
            (args.small_api or pool.get("small", {}).get("backend") == "api" and not args.small):
        raise UsageError(f"{args.policy} reads the small model's hidden state (train_policy.py "
                         f"--hidden-state); a small model behind a server has none: give a local --small")
    if (large.name, args.large_api) == (small.name, args.small_api):
        large = small
    if args.interactive:  # a prompt loop: load what every question may need, once
        if not large_only:
            small.get()
        large.get()
    prm = None
    if policy is not None and args.escalate_at is None and not large_only:
        from train_policy import uses_prm
        if uses_prm(policy):   # the policy reads the PRM's scores: score each draft live
            from prm import PRMError, load_prm
            name = args.prm or (pool.get("prm") or {}).get("model")
            if not name:
                raise UsageError(f"{args.policy} reads the PRM's scores but its pool records no "
                                 f"PRM: give --prm MODEL")
            try:
                prm = load_prm(name, resolve_device(args.device))
            except PRMError as err:
                raise UsageError(f"--prm {err}") from None
            display.note(f"process reward model: {name}")
    if kappa is not None and args.escalate_at is None:
        display.note(f"escalate at the first step with p(escalate) >= kappa {kappa:.4g}")

    def one(question: str) -> dict:
        run = route(question, small, large, policy, kappa, args.max_new_tokens,
                    args.escalate_at, display, prm)
        cost = "relative cost unknown (the large model's size, or the length of its own " \
            "solution, is not known)" \
            if run["relative_cost"] is None else f"relative cost {run['relative_cost']:.3f}" + (
                " (estimated: the large model alone was not run)"
                if run["relative_cost_is_estimate"] else "")
        print(f"answer: {run['answer']}  |  {run['route']}  |  tokens small "
              f"{run['tokens']['small']}, large {run['tokens']['large']}  |  {cost}  |  "
              f"{run['seconds']:.1f} s", file=display.stream, flush=True)
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
