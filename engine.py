"""How tokens are generated, locally and fast: the engine behind rollout.py and route.py.

Not the method (that is rollout.py); what makes it affordable. A model of the pool is loaded
here (a hub id, a local folder or a .gguf file) and offers the generation interface that the
stages call, also offered by api_engine.ApiModel for a model behind an OpenAI-compatible
server:

    solve(questions, max_new_tokens, on_done)       the greedy solution of each question,
                                                    cut into steps (Drafts)
    continue_after(items, max_new_tokens, on_done)  the greedy continuation of each
                                                    (question, accepted steps' text)
    drafter(question, max_new_tokens, prefix)       step-by-step greedy decoding (route.py)
    count_tokens(text), pool_entry()

The stage gives a model the method's prompt and step rule when it loads it (rollout.load_model);
the engine never reads them from rollout.py. Below: the slot engine that decodes many prompts
together (its KV cache, its attention, CUDA graphs, --batch-size auto), the step drafter, and
the sharding of a table build over several processes (one per GPU).
"""
from __future__ import annotations

import functools
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cli import UsageError, hub_online
from table import append_record, done_ids


# ----------------------------------------------------------------------------------------
# Models. A model is a hub id, a local folder, or a .gguf file; decoding is greedy with a
# clean generation config (no repetition penalty or sampling defaults from the hub), so
# the chosen token is the argmax of the raw logits and every run is reproducible.
# ----------------------------------------------------------------------------------------
@dataclass
class LM:
    """A loaded model of the pool, with what step splitting needs of its tokenizer."""
    name: str
    model: object
    tokenizer: object
    params: int
    stop_ids: list
    pad_id: int
    prompt: object = None  # (tokenizer, question, prefix) -> prompt token ids: the method's prompt
    ends_step: object = None  # (previous token text, token text) -> bool: the method's step rule
    newline_flags: tuple = None  # the step rule precomputed per token id (newline_flags())
    engine: object = field(default=None, repr=False)  # its SlotEngine, once one is built
    batch_size: int = 16  # slots of its engine
    compile: bool = False  # decode through CUDA graphs
    dtype: str = ""  # what its weights compute in

    @property
    def device(self):
        return self.model.device

    # The generation interface that rollout.py and route.py call; api_engine.ApiModel is
    # its second implementation (a model behind an OpenAI-compatible server).
    def pool_entry(self) -> dict:
        return {"model": self.name, "params": self.params, "backend": "local"}

    def solve(self, questions: list, max_new_tokens: int, on_done=None) -> list:
        """The greedy solution of each question (a string), cut into steps: Drafts."""
        prompts = [self.prompt(self.tokenizer, q) for q in questions]

        def draft(i, g):
            return Draft(len(prompts[i]), split_steps(self, g.ids, g.logprobs, g.entropies), g.finished)
        gens = generate_all(self, prompts, max_new_tokens, self.batch_size, stats=True,
                            compile=self.compile,
                            on_done=on_done and (lambda i, g: on_done(i, draft(i, g))))
        return [draft(i, g) for i, g in enumerate(gens)]

    def continue_after(self, items: list, max_new_tokens: int, on_done=None) -> list:
        """The greedy continuation of each (question, accepted steps' text): Continuations."""
        prompts = [self.prompt(self.tokenizer, q, prefix) for q, prefix in items]

        def cont(i, g):
            text = self.tokenizer.decode(g.ids, skip_special_tokens=True,
                                         clean_up_tokenization_spaces=False)
            return Continuation(len(prompts[i]), len(g.ids), text, g.finished)
        gens = generate_all(self, prompts, max_new_tokens, self.batch_size, compile=self.compile,
                            on_done=on_done and (lambda i, g: on_done(i, cont(i, g))))
        return [cont(i, g) for i, g in enumerate(gens)]

    def drafter(self, question: str, max_new_tokens: int, prefix: str = "",
                hidden_layer: int | None = None) -> "StepDrafter":
        """Step-by-step greedy decoding after the question and already written text; with
        `hidden_layer` k, each step (and the drafter, for the prompt) also carries the model's
        hidden_states[k] at its last token (the hidden-state policy; DESIGN section 4)."""
        return StepDrafter(self, self.prompt(self.tokenizer, question, prefix), max_new_tokens,
                           hidden_layer)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass
class Draft:
    """A small model's solution to one question, cut into steps."""
    prompt_tokens: int
    steps: list  # step dicts: text, tokens, mean/min_logprob, mean/max_entropy
    finished: bool  # ended with a stop token (False: hit the token limit)


@dataclass
class Continuation:
    """A large model's continuation after some accepted steps."""
    prompt_tokens: int
    tokens: int
    text: str
    finished: bool


def resolve_dtype(dtype: str, device: str):
    """`auto`: float32 on a CPU, bfloat16 on a GPU (float16 on old ones). On a CPU bfloat16 is
    faster where the hardware computes in it, but its rounding then depends on which sequences
    share a batch, so a live route (batch 1) can leave the table (built in batches) at the first
    near-tie: float32 keeps live = table by default; --dtype bfloat16 trades that for speed."""
    import torch
    if dtype == "auto":
        if device == "cpu":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    try:
        return {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
                "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}[dtype]
    except KeyError:
        raise UsageError(f"--dtype {dtype}: expected auto, bfloat16, float16 or float32") from None


def resolve_device(device: str) -> str:
    import torch
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device is available")
    return device


def load_lm(spec: str, device: str = "auto", dtype: str = "auto", check_only: bool = False,
            prompt=None, ends_step=None) -> LM:
    """Load a hub id, a local model folder, or a .gguf file, ready for greedy decoding.

    Where the model is is settled first, in well under a second for a path: a name that
    looks like a path (it starts with '.', '/' or '~', ends with '.gguf', holds a backslash
    or more than one '/', or its first folder exists here) must exist, else "no such
    folder/file" at once, never a hub look-up; a hub id that is not in the local hub cache
    needs the hub, so offline (HF_HUB_OFFLINE=1, or huggingface.co unreachable within 3 s)
    it fails at once instead of after a minute of retries. `check_only` stops there and
    returns None (route.py checks both models before it loads either). `prompt` and
    `ends_step` are the method's prompt and step rule (rollout.load_model passes them)."""
    path = Path(spec).expanduser()
    kwargs = {}
    first = spec.replace("\\", "/").split("/")[0]
    looks_like_path = (spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or "\\" in spec
                       or spec.count("/") > 1 or ("/" in spec and first and Path(first).is_dir()))
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise UsageError(f"model {spec}: no such .gguf file")
        where, kwargs["gguf_file"] = str(path.parent), path.name
    elif path.exists() or looks_like_path:
        if not path.exists():
            raise UsageError(f"model {spec}: no such folder")
        if not (path / "config.json").is_file():
            raise UsageError(f"model {spec}: not a model folder (no config.json there)")
        where = str(path)
    else:
        where = spec  # a hub id
        from huggingface_hub import try_to_load_from_cache
        try:
            cached = isinstance(try_to_load_from_cache(spec, "config.json"), str)
        except ValueError:  # not a valid repo id either
            raise UsageError(f"model {spec}: no such folder, and not a hub id") from None
        if not cached and not hub_online():
            raise UsageError(f"model {spec}: no such folder, and not in the local hub cache "
                             f"while the hub is offline (HF_HUB_OFFLINE or no network)")
    if check_only:
        return None
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype, **kwargs)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"model {spec}: cannot load it ({first})") from None
    model.to(device).eval()
    gc = model.generation_config
    stop = gc.eos_token_id if gc.eos_token_id is not None else tokenizer.eos_token_id
    stop_ids = sorted({s for s in (stop if isinstance(stop, list) else [stop]) if s is not None}
                      | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    model.generation_config = GenerationConfig(
        do_sample=False, eos_token_id=stop_ids, pad_token_id=pad_id,
        bos_token_id=gc.bos_token_id)
    params = sum(p.numel() for p in model.parameters())
    return LM(spec, model, tokenizer, params, stop_ids, pad_id, prompt, ends_step,
              dtype=str(torch_dtype).replace("torch.", ""))


# ----------------------------------------------------------------------------------------
# Steps at token level. The step rule (rollout.ends_step, on token texts) is given to the
# model; one pass over the vocabulary turns it into three sets of token ids, so that cutting
# a generation is a set lookup per token: a token ends a step if its text holds "\n\n"
# (rule(None, t)), or starts with "\n" (rule("\n", t)) right after a token of the same step
# that ended with "\n" (rule(t, "\n")).
# ----------------------------------------------------------------------------------------
def newline_flags(lm: LM) -> tuple:
    """(ends a step alone, ends one after a newline, lets the next token end one) per token id."""
    if lm.newline_flags is None:
        if lm.ends_step is None:
            raise ValueError(f"model {lm.name}: loaded without a step rule (rollout.load_model)")
        rule = lm.ends_step
        texts = lm.tokenizer.batch_decode([[i] for i in range(len(lm.tokenizer))],
                                          clean_up_tokenization_spaces=False)
        lm.newline_flags = (frozenset(i for i, t in enumerate(texts) if rule(None, t)),
                            frozenset(i for i, t in enumerate(texts) if rule("\n", t)),
                            frozenset(i for i, t in enumerate(texts) if rule(t, "\n")))
    return lm.newline_flags


def ends_step_id(flags: tuple, prev: int | None, tok: int) -> bool:
    """The step rule on token ids: does `tok` (after `prev` in the same step, or None) end a step?"""
    has_nn, starts_nl, ends_nl = flags
    return tok in has_nn or (prev is not None and prev in ends_nl and tok in starts_nl)


def step_ends(flags: tuple, ids: list) -> list:
    """End offsets (exclusive) of the steps of a generated token sequence; the last step
    runs to the end of the sequence even without a blank line."""
    ends, prev = [], None
    for i, tok in enumerate(ids):
        if ends_step_id(flags, prev, tok):
            ends.append(i + 1)
            prev = None
        else:
            prev = tok
    if ids and (not ends or ends[-1] != len(ids)):
        ends.append(len(ids))
    return ends


def decode_more(tokenizer, ids: list, before: str, new: list) -> tuple:
    """(text of the `new` tokens, decoded text of all `ids`) where `ids` ends with `new` and
    `before` is the text of the ids before them: a difference of decoded prefixes, so that
    pieces concatenate to the decoded whole even where a character spans two tokens."""
    upto = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    if upto.startswith(before):
        return upto[len(before):], upto
    return tokenizer.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False), upto


def make_step(text: str, logprobs: list, entropies: list) -> dict:
    """A step with the token statistics of docs/DESIGN.md section 3."""
    return {"text": text, "tokens": len(logprobs),
            "mean_logprob": sum(logprobs) / len(logprobs), "min_logprob": min(logprobs),
            "mean_entropy": sum(entropies) / len(entropies), "max_entropy": max(entropies)}


def split_steps(lm: LM, ids: list, logprobs: list, entropies: list) -> list:
    """Cut one generated solution into steps with their token statistics."""
    steps, start, before = [], 0, ""
    for end in step_ends(newline_flags(lm), ids):
        text, before = decode_more(lm.tokenizer, ids[:end], before, ids[start:end])
        steps.append(make_step(text, logprobs[start:end], entropies[start:end]))
        start = end
    return steps


# ----------------------------------------------------------------------------------------
# Batched greedy generation: a slot engine on the model's own forward. The batch is B
# slots, each with its own region of a preallocated KV cache ([B, kv_heads, L, head_dim]
# per layer) and its own length, so a finished sequence leaves at once and a waiting
# prompt takes its slot (no decoding of padding, no copying of the cache). A decode step
# writes each slot's new key/value at that slot's length and attends over the smallest
# length bucket (a multiple of 256) that holds every slot; with --compile each bucket's
# step is captured once as a CUDA graph and replayed, which removes the kernel-launch
# overhead that bounds eager decoding on a GPU. Prompts that are token prefixes of one
# another (the large model's continuation prompts of one question are) are encoded once:
# the longest one goes through the model and the others take its first keys/values and
# the hidden state at their own last position. At every position the engine records the
# log-probability of the greedy token and the entropy of the next-token distribution,
# from the logits the step computes anyway.
# ----------------------------------------------------------------------------------------
BUCKET = 256  # cache lengths and attention spans are multiples of this


@functools.lru_cache(maxsize=None)
def _cache_arg(model_class) -> str:
    import inspect
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters \
        else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """transformers 5 names the forward's cache argument `cache`; 4.x `past_key_values`."""
    return {_cache_arg(type(model)): cache}


def token_stats(logits):
    """(log-prob of the argmax token, entropy) of each row of raw logits [B, V]."""
    import torch
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.max(dim=-1).values, -(logp.exp() * logp).sum(dim=-1)


@dataclass
class Generation:
    ids: list  # generated token ids, without the stop token and padding
    finished: bool  # ended with a stop token (False: hit the token limit)
    logprobs: list = None
    entropies: list = None


def prefix_families(prompts: list) -> dict:
    """Group prompts whose token ids are prefixes of a longer prompt: {root: [members]},
    each member (the root included) a prefix of its root. In lexicographic order a prompt's
    extensions follow it directly, so one pass from the end finds every root."""
    order = sorted(range(len(prompts)), key=lambda i: prompts[i])
    root = {}
    for j in reversed(range(len(order))):
        i = order[j]
        nxt = order[j + 1] if j + 1 < len(order) else None
        p = prompts[i]
        root[i] = root[nxt] if nxt is not None and prompts[nxt][:len(p)] == p else i
    families = {}
    for i in range(len(prompts)):
        families.setdefault(root[i], []).append(i)
    return families


def kv_shape(model) -> tuple:
    """(layers, key/value heads, head dim) of the model's KV cache."""
    cfg = model.config.get_text_config()
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers, kv_heads, head_dim


def kv_bytes_per_token(model) -> int:
    """Bytes of keys and values one token takes in the cache, over all layers."""
    layers, kv_heads, head_dim = kv_shape(model)
    return 2 * layers * kv_heads * head_dim * next(model.parameters()).element_size()


CPU_BATCH = 64   # --batch-size auto on a CPU (auto_batch_size)


def available_memory() -> int:
    """Bytes of RAM available to a new allocation (Linux MemAvailable: free + reclaimable
    cache), else the free pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def auto_batch_size(pool: list, device, cap: int = 512, reserve: float = 0.25) -> int:
    """--batch-size auto: the most slots whose caches fit in free memory at once (at most
    `cap`). `pool` holds (LM, cache length per slot) for every engine that will be alive
    together; a quarter of the free memory is kept for prefill activations and each step's
    logits. On a CPU the cap is CPU_BATCH = 64 and the memory is the machine's available RAM:
    a decode step there is bound by reading the weights, so rows are nearly free up to about
    64 (bench/cpu_rows.py, Qwen2.5-1.5B's MLP products in float32 on 2 cores: 1.48 ms per row
    at 16 rows, 0.74 at 64, 0.73 at 128)."""
    import torch
    if torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        where = "free GPU memory"
    else:
        free, cap = available_memory(), min(cap, CPU_BATCH)
        where = "available memory"
    per_slot = sum(kv_bytes_per_token(lm.model) * length
                   + 16 * lm.model.config.get_text_config().vocab_size for lm, length in pool)
    slots = int(free * (1 - reserve) // per_slot)
    if slots < 1:
        raise UsageError(f"--batch-size auto: not even one sequence fits in {where}; "
                         "lower --max-new-tokens or use a smaller model")
    return max(1, min(cap, slots if slots < 8 else slots // 8 * 8))


SLOT_ATTENTION = "stepwise_slots"


SLOT_ATTENTION_KERNEL = "sdpa"  # or "bmm"; bench/decode_profile.py times both


def slot_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Decode-step attention over the slot cache: one query per slot, over the first
    attention_mask.shape[-1] positions (the step's bucket). The query heads that share a
    key/value head are packed as that head's queries, so keys and values are read once
    and never copied per query head. Returns [B, 1, heads, dim]."""
    import torch
    b, heads, _, dim = query.shape
    kv_heads, span = key.shape[1], attention_mask.shape[-1]
    groups = heads // kv_heads
    scale = scaling or dim ** -0.5
    if SLOT_ATTENTION_KERNEL == "sdpa":
        out = torch.nn.functional.scaled_dot_product_attention(
            query.reshape(b, kv_heads, groups, dim), key[:, :, :span], value[:, :, :span],
            attn_mask=attention_mask.view(b, 1, 1, span), scale=scale)
        return out.reshape(b, heads, dim)[:, None], None
    q = query.reshape(b * kv_heads, groups, dim)
    k = key[:, :, :span].reshape(b * kv_heads, span, dim)  # a view: slots x heads merge
    v = value[:, :, :span].reshape(b * kv_heads, span, dim)
    scores = torch.bmm(q, k.transpose(1, 2)).float() * scale
    scores = scores.view(b, kv_heads, groups, span).masked_fill(
        ~attention_mask.view(b, 1, 1, span), float("-inf"))
    probs = scores.softmax(dim=-1).to(v.dtype).view(b * kv_heads, groups, span)
    return torch.bmm(probs, v).view(b, heads, dim)[:, None], None


@functools.lru_cache(maxsize=None)
def _register_slot_attention() -> None:
    from transformers import AttentionInterface
    AttentionInterface.register(SLOT_ATTENTION, slot_attention)


class SlotCache:
    """The engine's KV cache, in the interface transformers' attention layers call:
    update() writes the step's key/value [B, kv_heads, 1, dim] at each slot's position
    and returns the whole cache of the layer."""

    def __init__(self, model, slots: int, length: int):
        import torch
        layers, kv_heads, head_dim = kv_shape(model)
        p = next(model.parameters())
        shape = (slots, kv_heads, length, head_dim)
        self.keys = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in range(layers)]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.index = torch.zeros((slots, kv_heads, 1, head_dim), dtype=torch.long, device=p.device)

        self.rows = slots  # a decode step works on the first `rows` slots

    def update(self, key, value, layer_idx, *args, **kwargs):
        n = self.rows
        k, v = self.keys[layer_idx][:n], self.values[layer_idx][:n]
        k.scatter_(2, self.index[:n], key)
        v.scatter_(2, self.index[:n], value)
        return k, v

    def get_seq_length(self, layer_idx=0) -> int:
        return 0


class SlotEngine:
    """Greedy decoding of many prompts through a fixed set of slots (see the section
    comment). Allocated once per model, batch size and cache length, and reused."""

    def __init__(self, lm: LM, slots: int, length: int, graphs: bool = False,
                 prefill_tokens: int = 16384):
        import torch
        cfg = lm.model.config.get_text_config()
        if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "attn_logit_softcapping", None) \
                or (getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True)
                    and any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or [])):
            raise UsageError(f"model {lm.name}: logit soft-capping and sliding-window attention "
                             "are not supported by rollout.py's decoding engine")
        _register_slot_attention()
        self.lm, self.slots, self.length, self.prefill_tokens = lm, slots, length, prefill_tokens
        self.want_graphs = graphs
        self.graphs = graphs and lm.device.type == "cuda"  # False after a failed capture
        dev = lm.device
        self.cache = SlotCache(lm.model, slots, length)
        self.inputs = torch.zeros((2, slots), dtype=torch.long, device=dev)  # tokens, positions
        self.outputs = torch.zeros((3, slots), dtype=torch.float64, device=dev)  # tok, lp, ent
        self.positions = torch.arange(length, device=dev)
        self.captured = {}  # bucket -> CUDA graph of the decode step
        self.pool = None
        # what the engine did, for benchmarks: decode steps, rows fed, cache positions
        # attended (per row, and over whole buckets), prompt tokens encoded / needed
        self.counters = dict(steps=0, rows=0, slot_steps=0, positions=0, span_positions=0,
                             prefill_tokens=0, prompt_tokens=0)

    def _decode(self, span: int, rows: int) -> None:
        """One decode step over the first `rows` slots, attending to the first `span`
        positions of each."""
        tokens, lengths = self.inputs[0, :rows], self.inputs[1, :rows]
        self.cache.rows = rows
        self.cache.index[:rows].copy_(lengths.view(-1, 1, 1, 1).expand_as(self.cache.index[:rows]))
        mask = (self.positions[:span][None, :] <= lengths[:, None])[:, None, None, :]
        model, cfg = self.lm.model, self.lm.model.config
        saved = cfg._attn_implementation
        cfg._attn_implementation_internal = SLOT_ATTENTION  # this step only: no checks
        try:
            logits = model(input_ids=tokens[:, None], position_ids=lengths[:, None],
                           attention_mask=mask,  # 4D: used as it is
                           use_cache=True, logits_to_keep=1,
                           **cache_kwargs(model, self.cache)).logits[:, -1]
        finally:
            cfg._attn_implementation_internal = saved
        lp, ent = token_stats(logits)
        self.outputs[0, :rows].copy_(logits.argmax(dim=-1))
        self.outputs[1, :rows].copy_(lp)
        self.outputs[2, :rows].copy_(ent)

    def decode(self, span: int, rows: int) -> None:
        import torch
        key = (span, rows)
        with torch.inference_mode():
            if self.graphs and key not in self.captured:
                try:
                    self.captured[key] = self._capture(span, rows)
                except Exception as err:  # noqa: BLE001 - keep going, eagerly, and say so
                    print(f"--compile: capturing the decode step failed ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}); decoding eagerly",
                          file=sys.stderr)
                    self.graphs = False
            if self.graphs:
                self.captured[key].replay()
            else:
                self._decode(span, rows)

    def _capture(self, span: int, rows: int):
        """Record the decode step for this bucket as a CUDA graph (after a warm-up step on a
        side stream, as CUDA graphs require). The warm-up writes the keys/values of the step
        that replay() is about to write anyway, so it changes nothing."""
        import torch
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._decode(span, rows)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            self._decode(span, rows)
        return graph

    def prefill(self, roots: list, members: list) -> list:
        """Encode the root prompts (right-padded: causal attention needs no mask) and put
        each member (slot, root row, length) into its slot: the root's first `length`
        keys/values, and the greedy token statistics of the hidden state at length - 1."""
        import torch
        from transformers import DynamicCache
        width = max(len(p) for p in roots)
        ids = torch.full((len(roots), width), self.lm.pad_id, dtype=torch.long)
        for r, p in enumerate(roots):
            ids[r, :len(p)] = torch.tensor(p, dtype=torch.long)
        decoder = self.lm.model.get_decoder()
        cache = DynamicCache(config=self.lm.model.config)
        dev = self.lm.device
        with torch.inference_mode():
            hidden = decoder(input_ids=ids.to(dev), use_cache=True,
                             **cache_kwargs(decoder, cache)).last_hidden_state
            slots = torch.tensor([s for s, _, _ in members], device=dev)
            rows = torch.tensor([r for _, r, _ in members], device=dev)
            last = torch.tensor([n - 1 for _, _, n in members], device=dev)
            for layer, (k, v) in enumerate(zip(self.cache.keys, self.cache.values)):
                src = cache.layers[layer]
                k[slots, :, :width] = src.keys[rows]
                v[slots, :, :width] = src.values[rows]
            logits = self.lm.model.get_output_embeddings()(hidden[rows, last])
            lp, ent = token_stats(logits)
            return torch.stack([logits.argmax(-1).double(), lp.double(), ent.double()]).T.tolist()

    def run(self, prompts: list, max_new_tokens: int, share_prefixes: bool = True,
            on_done=None) -> list:
        """Greedy continuations of token-id prompts, in input order; on_done(index,
        Generation) is called as each one finishes. Prompt families are taken shortest root
        first; new ones join when an eighth of the slots is free."""
        import torch
        if any(len(p) + max_new_tokens > self.length for p in prompts):
            raise ValueError("prompt + max_new_tokens exceeds the engine's cache length")
        families = prefix_families(prompts) if share_prefixes else {i: [i] for i in range(len(prompts))}
        queue = sorted((sorted(m, key=lambda i: -len(prompts[i])) for m in families.values()),
                       key=lambda m: len(prompts[m[0]]), reverse=True)  # pop() = shortest root
        results = [None] * len(prompts)
        rows = [None] * self.slots  # per slot: [prompt index, ids, logprobs, entropies]
        length = [0] * self.slots
        pending = {}  # slot -> (token, logprob, entropy) not yet taken
        decoded = None
        stop = set(self.lm.stop_ids)
        while queue or any(r is not None for r in rows):
            free = [s for s in reversed(range(self.slots)) if rows[s] is None]  # pop(): lowest
            if queue and (len(free) >= max(1, self.slots // 8) or len(free) == self.slots):
                roots, members = [], []  # one prefill call per prefill_tokens (padded)
                while queue and free:
                    family = queue.pop()
                    if len(family) > len(free):
                        if len(family) <= self.slots and len(free) < self.slots:
                            queue.append(family)  # wait until it fits whole: one prefill
                            break
                        family, rest = family[:len(free)], family[len(free):]  # split
                        queue.append(rest)  # the rest waits, with its own root
                    roots.append(prompts[family[0]])
                    for i in family:
                        s = free.pop()
                        members.append((s, len(roots) - 1, i))
                        rows[s] = [i, [], [], []]
                    if len(roots) * max(map(len, roots)) >= self.prefill_tokens:
                        self._admit(roots, members, length, pending, prompts)
                        roots, members = [], []
                if roots:
                    self._admit(roots, members, length, pending, prompts)
            if decoded is None and any(r is not None and s not in pending
                                       for s, r in enumerate(rows)):
                decoded = self.outputs.T.tolist()
            feed = [0] * self.slots
            fed = []
            for s, row in enumerate(rows):
                if row is None:
                    continue
                tok, lp, ent = pending.pop(s) if s in pending else decoded[s]
                tok = int(tok)
                finished = tok in stop
                if not finished:
                    row[1].append(tok)
                    row[2].append(lp)
                    row[3].append(ent)
                if finished or len(row[1]) >= max_new_tokens:  # a spent budget needs no feed
                    results[row[0]] = Generation(row[1], finished, row[2], row[3])
                    rows[s], length[s] = None, 0
                    if on_done is not None:
                        on_done(row[0], results[row[0]])
                    continue
                feed[s] = tok
                fed.append(s)
            decoded = None
            if fed:
                span = min(-(-(max(length) + 1) // BUCKET) * BUCKET, self.length)
                # new rows take the lowest free slots, so the live ones gather at the front:
                # decode the smallest power-of-two share of the slots (>= 1/8) holding them
                n = max(1, self.slots // 8)
                while n < fed[-1] + 1:
                    n *= 2
                n = min(n, self.slots)
                self.inputs.copy_(torch.tensor([feed, length], dtype=torch.long))
                self.decode(span, n)
                c = self.counters
                c["steps"] += 1
                c["rows"] += len(fed)
                c["span_positions"] += span * n
                c["slot_steps"] += n
                for s in fed:
                    length[s] += 1
                    c["positions"] += length[s]
        return results

    def _admit(self, roots, members, length, pending, prompts) -> None:
        self.counters["prefill_tokens"] += sum(map(len, roots))
        self.counters["prompt_tokens"] += sum(len(prompts[i]) for _, _, i in members)
        stats = self.prefill(roots, [(s, r, len(prompts[i])) for s, r, i in members])
        for (s, _, i), st in zip(members, stats):
            length[s] = len(prompts[i])
            pending[s] = st


def engine_for(lm: LM, slots: int, length: int, graphs: bool) -> SlotEngine:
    """The model's engine, reused while it is big enough (a new one replaces it when a
    longer cache is needed; lengths are rounded up to BUCKET so that this is rare)."""
    eng = getattr(lm, "engine", None)
    if eng is not None and eng.slots == slots and eng.length >= length \
            and eng.want_graphs == graphs:
        return eng
    if eng is not None:
        lm.engine = None
        del eng
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    lm.engine = SlotEngine(lm, slots, -(-length // BUCKET) * BUCKET, graphs)
    return lm.engine


def size_engines(small, large, longest_prompt: int, max_new_tokens: int, batch,
                 graphs: bool, allocate: bool = True):
    """Allocate the local models' engines once for a whole table build: one cache length per
    model (the longest prompt it can meet plus its tokens), so that CUDA graphs are captured
    once per bucket; `batch` 'auto' becomes as many slots as free GPU memory holds. Returns
    the batch size ('auto' unchanged where neither model is local)."""
    local_models = [m for m in {id(small): small, id(large): large}.values() if isinstance(m, LM)]
    if not local_models:
        return batch
    need = {id(small): longest_prompt + max_new_tokens}
    need[id(large)] = longest_prompt + 2 * max_new_tokens + 64  # + re-encoding slack
    lengths = [(m, need[id(m)]) for m in local_models]  # one model in both roles: the longer
    if batch == "auto":
        batch = auto_batch_size(lengths, local_models[0].device)
        print(f"--batch-size auto: {batch} sequences", file=sys.stderr)
    if allocate:
        for lm, length in lengths:
            lm.batch_size = batch
            engine_for(lm, batch, length, graphs)
    return batch


def generate_all(lm: LM, prompts: list, max_new_tokens: int, batch_size: int,
                 stats: bool = False, compile: bool = False, share_prefixes: bool = True,
                 on_done=None) -> list:
    """Greedy continuations of many token-id prompts (with token statistics if `stats`),
    returned in input order, through the model's slot engine; on_done(index, Generation)
    as each one finishes."""
    if not prompts:
        return []
    need = max(len(p) for p in prompts) + max_new_tokens
    eng = engine_for(lm, batch_size, need, compile)
    results = eng.run(prompts, max_new_tokens, share_prefixes, on_done)
    if not stats:
        for g in results:
            g.logprobs = g.entropies = None
    return results


def generate_batch(lm: LM, prompts: list, max_new_tokens: int, stats: bool = False) -> list:
    """Greedy continuations of a few prompts decoded together."""
    return generate_all(lm, prompts, max_new_tokens, len(prompts), stats)


class StepDrafter:
    """Greedy decoding of one sequence, one step at a time, for live routing (route.py).
    The KV cache carries over between steps, so each token is encoded exactly once, and
    the next token's logits are always computed ahead: right after a step, `ended` already
    knows whether the solution stops there (as the table's last step does). The steps it
    yields are the ones split_steps() cuts from a one-shot generation.

    With `hidden_layer` k the same forward passes also return hidden_states[k] (no extra
    model call): `question_hidden` is the state at the prompt's last token, and each step's
    "hidden" the state at its last token, float32 on the CPU: what probe.hidden_states
    computes teacher-forced for a table's sidecar. (A step that spends the token budget has
    its last token fed once more only for that state.)"""

    def __init__(self, lm: LM, prompt_ids: list, max_new_tokens: int, hidden_layer: int | None = None):
        from transformers import DynamicCache
        self.lm, self.budget, self.prompt_tokens = lm, max_new_tokens, len(prompt_ids)
        self.hidden_layer, self.hidden = hidden_layer, None  # the state at the last fed token
        self.cache = DynamicCache(config=lm.model.config)
        self.seen = 0  # tokens in the cache
        self.generated = 0
        self.solution_ids, self.solution_text = [], ""  # what the drafter has written
        self.logits = self._feed(list(prompt_ids))  # next-token logits
        self.question_hidden = self.hidden

    def _feed(self, ids: list):
        import torch
        pos = torch.arange(self.seen, self.seen + len(ids), device=self.lm.device)
        want = self.hidden_layer is not None
        with torch.inference_mode():
            out = self.lm.model(input_ids=torch.tensor([ids], device=self.lm.device),
                                use_cache=True, position_ids=pos[None], logits_to_keep=1,
                                output_hidden_states=want, **cache_kwargs(self.lm.model, self.cache))
        self.seen += len(ids)
        if want:
            self.hidden = out.hidden_states[self.hidden_layer][0, -1].float().cpu()
        return out.logits[:, -1]

    @property
    def ended(self) -> bool:
        """The solution is over: the next token is a stop token, or the budget is spent."""
        return self.generated >= self.budget or int(self.logits.argmax(-1)) in self.lm.stop_ids

    def next_step(self) -> dict | None:
        """Generate the next step; None once the solution has ended. The step dict holds
        text, tokens, the token statistics of split_steps() and the token ids."""
        flags = newline_flags(self.lm)
        ids, lps, ents, prev = [], [], [], None
        while not self.ended:
            lp, ent = token_stats(self.logits)
            tok = int(self.logits.argmax(dim=-1))
            ids.append(tok)
            lps.append(float(lp))
            ents.append(float(ent))
            self.generated += 1
            if self.generated < self.budget or self.hidden_layer is not None:
                self.logits = self._feed([tok])  # else the token is never needed as input
            if ends_step_id(flags, prev, tok):
                break
            prev = tok
        if not ids:
            return None
        self.solution_ids += ids
        text, self.solution_text = decode_more(self.lm.tokenizer, self.solution_ids,
                                               self.solution_text, ids)
        step = {**make_step(text, lps, ents), "ids": ids}
        return step if self.hidden_layer is None else {**step, "hidden": self.hidden}


# ----------------------------------------------------------------------------------------
# Sharding a table build over processes (one per GPU): each writes a part table, and the
# process that completes the set merges the parts into the output, each line whole.
# ----------------------------------------------------------------------------------------
def shard_of_env() -> tuple:
    """(rank, world size, local rank) of this process under `accelerate launch` or
    `torchrun` (which set RANK / WORLD_SIZE / LOCAL_RANK); (0, 1, 0) when run alone."""
    try:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise UsageError("RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None
    if not 0 <= rank < world:
        raise UsageError(f"RANK={rank} is not within WORLD_SIZE={world}")
    return rank, world, local


def part_path(out: Path, rank: int, world: int) -> Path:
    """The table that process `rank` of `world` writes; merged into --out at the end."""
    return out.with_name(f"{out.name}.rank{rank}-of-{world}.jsonl")


def part_files(out: Path) -> list:
    return sorted(out.parent.glob(f"{out.name}.rank*-of-*.jsonl"))


def merge_parts(out: Path, order: list) -> int:
    """Append to --out the records of every part table not there yet (in the order of the
    question ids `order`, then any others), each line whole and synced; then remove the
    parts. Safe to repeat after a crash at any point: ids already in --out are skipped."""
    have = done_ids(out)
    found = {}
    for path in part_files(out):
        done_ids(path)  # cut a torn tail
        with path.open(encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                if rec["id"] not in have:
                    found.setdefault(rec["id"], rec)
    rank = {qid: i for i, qid in enumerate(order)}
    with out.open("a", encoding="utf-8") as f:
        for qid in sorted(found, key=lambda q: rank.get(q, len(rank))):
            append_record(f, found[qid])
    for path in part_files(out):
        path.unlink()
        path.with_suffix(".done").unlink(missing_ok=True)
    return len(found)


def finish_shard(out: Path, rank: int, world: int, order: list) -> bool:
    """Mark this process's part as complete; the process that completes the set merges
    all parts into --out (a lock file makes sure only one does). True if it merged."""
    part = part_path(out, rank, world)
    part.touch()
    part.with_suffix(".done").touch()
    if not all(part_path(out, r, world).with_suffix(".done").exists() for r in range(world)):
        return False
    lock = out.with_name(out.name + ".merging")
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    try:
        merge_parts(out, order)
    finally:
        os.close(fd)
        lock.unlink()
    return True
