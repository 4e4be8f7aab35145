"""rollout.py's generation engine and its scheduling (issue 7), on the CPU: slots refilled
as rows finish, shared prefill of prompt families, length buckets, --batch-size auto, and
sharding across processes (torchrun / accelerate launch) with the merge of their tables."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import engine
from cli import UsageError
from engine import (BUCKET, SlotEngine, StepDrafter, auto_batch_size, generate_all,
                    prefix_families)
from rollout import encode_prompt

ROOT = Path(__file__).resolve().parents[1]


def test_prefix_families():
    prompts = [[1, 2, 3], [1, 2], [1, 2, 3, 4], [5], [1, 3], [5, 6], [1, 2]]
    fams = {root: sorted(m) for root, m in prefix_families(prompts).items()}
    assert fams == {2: [0, 1, 2, 6], 4: [4], 5: [3, 5]}
    for root, members in fams.items():
        assert all(prompts[root][:len(prompts[i])] == prompts[i] for i in members)
    assert prefix_families([]) == {}


def continuation_prompts(lm, records):
    """The large model's continuation prompts of a table, as rollout.py builds them."""
    return [encode_prompt(lm.tokenizer, r["question"],
                          "".join(s["text"] for s in r["small"]["steps"][:k]))
            for r in records for k in range(len(r["escalations"]))]


def test_shared_prefill_and_refills_change_nothing(tiny_table, tiny_lms):
    _, large = tiny_lms
    prompts = continuation_prompts(large, tiny_table["records"])
    fams = prefix_families(prompts)
    assert len(fams) < len(prompts)  # re-encoded prefixes do nest on this pool
    roots = sum(len(prompts[r]) for r in fams)
    biggest = max(map(len, fams.values()))
    large.engine = None
    shared = generate_all(large, prompts, 96, batch_size=biggest + 1)
    c = large.engine.counters
    assert c["prompt_tokens"] == sum(map(len, prompts))
    assert c["prefill_tokens"] == roots < 0.7 * c["prompt_tokens"]  # each family encoded once
    split = generate_all(large, prompts, 96, batch_size=2)  # families split, many refills
    assert large.engine.counters["prefill_tokens"] > roots
    alone = generate_all(large, prompts, 96, batch_size=16, share_prefixes=False)
    assert large.engine.counters["prefill_tokens"] == sum(map(len, prompts))
    for a, b, c in zip(shared, alone, split):
        assert a.ids == b.ids == c.ids and a.finished == b.finished == c.finished
    # and both are what one sequence decoded on its own gives
    for p, g in list(zip(prompts, shared))[:4]:
        d = StepDrafter(large, p, 96)
        while d.next_step() is not None:
            pass
        assert d.solution_ids == g.ids
    # the table's own continuations are these
    conts = [e for r in tiny_table["records"] for e in r["escalations"]]
    assert [len(g.ids) for g in shared] == [e["tokens"] for e in conts]


def test_engine_buckets_and_token_limit(tiny_lms):
    small, _ = tiny_lms
    prompts = [encode_prompt(small.tokenizer, f"What is {a} + {a}?") for a in range(5)]
    eng = SlotEngine(small, slots=16, length=2 * BUCKET)
    spans = []
    decode = eng.decode
    eng.decode = lambda span, rows: (spans.append((span, rows)), decode(span, rows))
    out = eng.run(prompts, 7)
    assert all(len(g.ids) <= 7 for g in out)
    assert all(g.finished or len(g.ids) == 7 for g in out)
    # 5 live rows in 16 slots: the step decodes the first 2 (= 16 / 8) ... 8 slots only,
    # over the smallest multiple of BUCKET that holds every context
    assert all(span % BUCKET == 0 and rows in (2, 4, 8) for span, rows in spans)
    assert eng.counters["rows"] == sum(len(g.ids) - (0 if g.finished else 1) for g in out)
    with pytest.raises(ValueError, match="cache length"):
        eng.run([[1] * eng.length], 1)


def test_auto_batch_size(tiny_lms, monkeypatch):
    import torch
    small, large = tiny_lms
    per_token = engine.kv_bytes_per_token(small.model)
    cfg = small.model.config
    assert per_token == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * \
        (cfg.hidden_size // cfg.num_attention_heads) * 4  # float32
    per_slot = per_token * 1000 + 16 * cfg.vocab_size
    # a CPU: 64 (engine.CPU_BATCH) where RAM allows, fewer where it does not
    assert engine.available_memory() > 0
    for avail, expect in [(10_000 * per_slot, 64), (20 * per_slot / 0.75, 16), (3 * per_slot / 0.75, 3)]:
        monkeypatch.setattr(engine, "available_memory", lambda a=avail: int(a) + 1)
        assert auto_batch_size([(small, 1000)], "cpu") == expect
    monkeypatch.setattr(engine, "available_memory", lambda: per_slot // 2)
    with pytest.raises(UsageError, match="available memory"):
        auto_batch_size([(small, 1000)], "cpu")
    for free, expect in [(100 * per_slot / 0.75, 96), (5 * per_slot / 0.75, 5),
                         (10_000 * per_slot, 512)]:
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, f=free: (int(f) + 1, 0))
        assert auto_batch_size([(small, 1000)], "cuda") == expect
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (per_slot // 2, 0))
    with pytest.raises(UsageError, match="batch-size auto"):
        auto_batch_size([(small, 1000)], "cuda")


def run(args, env=None, timeout=600):
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                               **(env or {})})


def table_args(tiny_pool, tiny_table, out):
    return ["--dataset", str(tiny_table["data"]), "--small", str(tiny_pool["small"]),
            "--large", str(tiny_pool["large"]), "--out", str(out), "--dtype", "float32",
            "--max-new-tokens", "96", "--batch-size", "3", "--chunk-size", "5"]


def same(x, y, tol=1e-4) -> bool:
    """Equal records, statistics up to float noise (another batch may round differently)."""
    if isinstance(x, float) and isinstance(y, float):
        return abs(x - y) <= tol
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(same(x[k], y[k], tol) for k in x)
    if isinstance(x, list) and isinstance(y, list):
        return len(x) == len(y) and all(same(u, v, tol) for u, v in zip(x, y))
    return x == y


def records(path, key=None):
    recs = [json.loads(line) for line in Path(path).read_text().splitlines()]
    return sorted(recs, key=lambda r: r["id"]) if key else recs


def test_two_processes_merge_into_one_table(tiny_pool, tiny_table, tmp_path):
    """`torchrun --nproc_per_node 2 rollout.py ...` (what `accelerate launch` runs): each
    process takes every other question, writes its own part, and the last one to finish
    merges the parts into --out in question order: the single-process table, exactly."""
    out = tmp_path / "t.jsonl"
    r = run([sys.executable, "-m", "torch.distributed.run", "--standalone",
             "--nproc_per_node", "2", "rollout.py", *table_args(tiny_pool, tiny_table, out)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert same(records(out, key=True), records(tiny_table["out"], key=True))
    ids = [r["id"] for r in records(out)]  # merged in question order
    assert ids == sorted(ids, key=lambda q: int(q.rsplit("/", 1)[1]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl"]  # parts merged away


def test_interrupted_sharded_run_resumes(tiny_pool, tiny_table, tmp_path):
    """Process 1 of 2 finished its share and process 0 died after two questions: a rerun
    alone merges what the parts hold, does only what is missing, and duplicates nothing."""
    out = tmp_path / "t.jsonl"
    full = tiny_table["out"].read_text().splitlines(keepends=True)
    (tmp_path / "t.jsonl.rank1-of-2.jsonl").write_text("".join(full[1::2]))
    (tmp_path / "t.jsonl.rank1-of-2.done").touch()
    torn = full[2][: len(full[2]) // 3]
    (tmp_path / "t.jsonl.rank0-of-2.jsonl").write_text(full[0] + torn)
    r = run([sys.executable, "rollout.py", *table_args(tiny_pool, tiny_table, out)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "merging 5 questions of an earlier sharded run" in r.stderr
    assert "resuming" in r.stderr
    ids = [json.loads(x)["id"] for x in out.read_text().splitlines()]
    assert sorted(ids) == sorted(json.loads(x)["id"] for x in full) and len(set(ids)) == len(ids)
    assert same(records(out, key=True), records(tiny_table["out"], key=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl"]


def test_finish_shard_merges_once(tmp_path):
    out = tmp_path / "t.jsonl"
    recs = [{"id": f"q{i}"} for i in range(4)]
    for rank in range(2):
        engine.part_path(out, rank, 2).write_text(
            "".join(json.dumps(r) + "\n" for r in recs[rank::2]))
    assert engine.finish_shard(out, 0, 2, ["q0", "q1", "q2", "q3"]) is False  # 1 not done
    assert not out.exists()
    assert engine.finish_shard(out, 1, 2, ["q0", "q1", "q2", "q3"]) is True
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["q0", "q1", "q2", "q3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl"]


@pytest.mark.parametrize("flags, message", [
    (["--compile"], "--compile captures CUDA graphs: it needs a CUDA device"),
    (["--batch-size", "many"], "--batch-size must be an integer or 'auto'"),
    (["--chunk-size", "1.5"], "--chunk-size must be an integer or 'auto'"),
])
def test_engine_flags_bad_input(flags, message, tiny_pool, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "1+1?", "answer": "2"}\n')
    out = tmp_path / "o.jsonl"
    r = run([sys.executable, "rollout.py", "--dataset", str(data), "--small",
             str(tiny_pool["small"]), "--large", str(tiny_pool["small"]), "--out", str(out),
             "--device", "cpu", *flags])
    assert r.returncode == 2
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert not out.exists()


def test_unsupported_attention_is_refused(tiny_lms, monkeypatch):
    """Soft-capped logits or sliding-window layers would be decoded wrongly: a clear error."""
    small, _ = tiny_lms
    monkeypatch.setattr(small.model.config, "final_logit_softcapping", 30.0, raising=False)
    with pytest.raises(UsageError, match="soft-capping and sliding-window"):
        SlotEngine(small, slots=2, length=BUCKET)
