#!/usr/bin/env bash
# The GPU check of issues 2 and 7 in one run (sized for a 15-minute lease on one H100):
#   1. rollout.py on the tiny test pool on CUDA, eager and with --compile (CUDA graphs), in
#      float32: the two tables must be the same;
#   2. bench/rollout_gpu.py: the slot engine against eager `generate` at batch 64, at the
#      Qwen2.5-1.5B and 7B shapes (random weights, bf16);
#   3. bench/rollout_speed.py at the 1.5B shape: table build vs generate vs the naive loop;
#   4. rollout.py itself, --batch-size auto --compile, on a random-weight model of the 1.5B
#      shape saved to disk (the command line end to end, timed).
# Needs tests/.cache/tinypool (the test suite builds it), a Qwen2.5 tokenizer folder and a
# GSM8K-style JSONL file; PARTS picks parts (default: all):
#     PARTS="1 2 4" bash bench/gpu_check.sh TOKENIZER_DIR QUESTIONS_JSONL [OUT_DIR]
set -u
TOK=$1; QS=$2; OUTDIR=${3:-/tmp/gpu_check}; PARTS=${PARTS:-1 2 3 4}
part() { [[ " $PARTS " == *" $1 "* ]]; }
mkdir -p "$OUTDIR"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

if part 1; then
echo "== 1. tiny pool on CUDA: eager vs --compile"
python3 - "$OUTDIR/q.jsonl" <<'PY'
import json, sys
sys.path.insert(0, "tests")
from tinymodel import build_tiny_pool, write_questions_jsonl
pool = build_tiny_pool()
write_questions_jsonl(sys.argv[1], pool["questions"][:24])
PY
for mode in eager compile; do
  flag=""; [ $mode = compile ] && flag="--compile"
  timeout 150 python3 rollout.py --dataset "$OUTDIR/q.jsonl" --small tests/.cache/tinypool/small \
    --large tests/.cache/tinypool/large --out "$OUTDIR/tiny_$mode.jsonl" --device cuda \
    --dtype float32 --max-new-tokens 96 --batch-size 8 $flag 2>&1 | tail -3
done
python3 - "$OUTDIR/tiny_eager.jsonl" "$OUTDIR/tiny_compile.jsonl" <<'PY'
import json, sys
a, b = ([json.loads(l) for l in open(p)] for p in sys.argv[1:3])
assert [r["id"] for r in a] == [r["id"] for r in b], "different questions"
same_text = all(x["small"]["steps"] == y["small"]["steps"] or
                [s["text"] for s in x["small"]["steps"]] == [s["text"] for s in y["small"]["steps"]]
                for x, y in zip(a, b))
same_esc = all([e["text"] for e in x["escalations"]] == [e["text"] for e in y["escalations"]]
               for x, y in zip(a, b))
dev = max((abs(s[k] - t[k]) for x, y in zip(a, b) for s, t in zip(x["small"]["steps"], y["small"]["steps"])
           for k in ("mean_logprob", "min_logprob", "mean_entropy", "max_entropy")), default=0)
print(f"tiny pool, {len(a)} questions: small steps same: {same_text}, continuations same: "
      f"{same_esc}, largest statistic difference {dev:.2e}")
PY
fi

if part 2; then
echo "== 2. engine vs eager generate (1.5B and 7B shapes)"
timeout 330 python3 bench/rollout_gpu.py --configs qwen2.5-1.5b qwen2.5-7b \
  --json "$OUTDIR/rollout_gpu.json" 2>&1 | grep -v Warning
fi

if part 3; then
echo "== 3. issue 2 benchmark at the 1.5B shape (random weights)"
timeout 150 python3 bench/rollout_speed.py --config qwen2.5-1.5b --tokenizer "$TOK" \
  --dataset "$QS" --device cuda --questions 32 --batch-size 64 --max-new-tokens 96 \
  --naive-questions 2 --compile 2>&1 | grep -v Warning | tail -6
fi

if part 4; then
echo "== 4. rollout.py --batch-size auto --compile on a saved random 1.5B-shape model"
python3 - "$TOK" /tmp/random-1.5b <<'PY'
import sys, torch
sys.path[:0] = ["bench", "."]
from rollout_speed import random_model
from transformers import AutoTokenizer
lm = random_model("qwen2.5-1.5b", "cuda", torch.bfloat16)
lm.model.save_pretrained(sys.argv[2])
AutoTokenizer.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])
PY
start=$(date +%s.%N)
timeout 150 python3 rollout.py --dataset "$QS" --limit 64 --small /tmp/random-1.5b \
  --large /tmp/random-1.5b --out "$OUTDIR/cli.jsonl" --batch-size auto --compile \
  --chunk-size 64 --max-new-tokens 256 2>&1 | grep -v Warning | tail -4
python3 - "$OUTDIR/cli.jsonl" "$start" <<'PY'
import json, sys, time
recs = [json.loads(l) for l in open(sys.argv[1])]
small = sum(s["tokens"] for r in recs for s in r["small"]["steps"])
large = sum(e["tokens"] for r in recs for e in r["escalations"])
secs = time.time() - float(sys.argv[2])
print(f"rollout.py: {len(recs)} questions, {sum(len(r['escalations']) for r in recs)} "
      f"continuations, {small + large} tokens in {secs:.1f}s including model loading "
      f"= {(small + large) / secs:.0f} tok/s")
PY
fi
