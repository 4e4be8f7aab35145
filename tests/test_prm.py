"""prm.py on a tiny PRM in the released Qwen2.5-Math-PRM format (tests/tinyprm.py), offline."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

import prm as prm_lib
from tinyprm import SYSTEM_PROMPT, build_tiny_prm

QUESTION = "Janet has 16 eggs. She eats 3 and sells the rest at $2 each. How much does she make?"
STEPS = ["First, she has 16 - 3 = 13 eggs left.\n\n",
         "Then she makes 13 * 2 = 26 dollars.\n\n",
         "The answer is \\boxed{26}."]
ITEMS = [(QUESTION, STEPS),
         ("What is 2+3?", ["2 + 3 = 5.\n\n", "The answer is \\boxed{5}."]),
         ("Tom starts with 3 apples. He buys 4 more. How many?", ["Let x be 3.\n\n", "x + 4 = 7\n\n",
                                                                  "So 7.\n\n", "\\boxed{7}"]),
         ("No steps here?", []),
         ("Let x be the number of books. Then 2x + 5 = 17.", ["So x = 6.\n\n"])]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_prm(tmp_path_factory.mktemp("tinyprm") / "prm")


@pytest.fixture(scope="module")
def prm(folder):
    return prm_lib.load_prm(str(folder))


def checkpoint(folder) -> dict:
    from safetensors.torch import load_file
    sd = {}
    for f in sorted(folder.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


def direct_scores(folder, question, steps) -> list[float]:
    """The model card's recipe written out: render the chat, encode, a Qwen2Model loaded from
    the checkpoint's model.* tensors, the head score.* by hand, softmax[..., 1] masked at
    <extra_0> (make_step_rewards)."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2Model
    tok = AutoTokenizer.from_pretrained(str(folder))
    text = (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
            f"<|im_start|>assistant\n" + "<extra_0>".join(s.strip() for s in steps) + "<extra_0>"
            + "<|im_end|>\n")
    msgs = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question},
            {"role": "assistant", "content": "<extra_0>".join(s.strip() for s in steps) + "<extra_0>"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False) == text
    input_ids = tok.encode(text, return_tensors="pt")
    raw = json.loads((folder / "config.json").read_text())
    cfg = Qwen2Config(**{k: v for k, v in raw.items() if k not in ("architectures", "auto_map")})
    sd = checkpoint(folder)
    backbone = Qwen2Model(cfg).eval()
    backbone.load_state_dict({k[len("model."):]: v.float() for k, v in sd.items()
                              if k.startswith("model.")}, strict=True)
    with torch.no_grad():
        h = backbone(input_ids=input_ids).last_hidden_state
        h1 = torch.relu(h @ sd["score.0.weight"].float().T + sd["score.0.bias"].float())
        logits = h1 @ sd["score.2.weight"].float().T + sd["score.2.bias"].float()
    step_sep_id = tok.encode("<extra_0>")[0]
    token_masks = input_ids == step_sep_id
    probabilities = F.softmax(logits, dim=-1) * token_masks.unsqueeze(-1)
    sample = probabilities[0]
    return sample[sample != 0].view(-1, 2)[:, 1].tolist()


def test_loads_as_the_family_without_remote_code(prm, folder):
    assert type(prm.tokenizer).__name__ == "Qwen2Tokenizer"
    assert type(prm.backbone).__name__ == "Qwen2Model"
    assert not any(folder.glob("*.py"))       # no remote code to run even if we wanted to
    assert prm.tokenizer.convert_ids_to_tokens(prm.sep_id) == "<extra_0>"
    sd = checkpoint(folder)
    assert prm.params == sum(v.numel() for v in sd.values())   # backbone + head, no lm_head
    assert prm.pool_entry == {"model": str(folder), "params": prm.params}


def test_scores_equal_a_direct_forward_pass(prm, folder):
    for question, steps in ITEMS:
        if not steps:
            continue
        mine, ref = prm_lib.score_steps(prm, question, steps), direct_scores(folder, question, steps)
        assert len(mine) == len(steps)
        assert all(0.0 <= s <= 1.0 for s in mine)
        assert mine == pytest.approx(ref, abs=1e-5)
    assert len({round(s, 4) for s in prm_lib.score_steps(prm, QUESTION, STEPS)}) > 1


def test_a_step_score_sees_only_the_prefix(prm):
    full = prm_lib.score_steps(prm, QUESTION, STEPS)
    for k in range(1, len(STEPS)):
        assert prm_lib.score_steps(prm, QUESTION, STEPS[:k]) == pytest.approx(full[:k], abs=1e-6)
    other = prm_lib.score_steps(prm, QUESTION, STEPS[:1] + ["Something else entirely.\n\n"])
    assert other[0] == pytest.approx(full[0], abs=1e-6) and other[1] != pytest.approx(full[1], abs=1e-4)


def test_batched_equals_one_by_one(prm):
    alone = [prm_lib.score_steps(prm, q, s) for q, s in ITEMS]
    for bs in (1, 2, 8):
        batched = prm_lib.score_many(prm, ITEMS, batch_size=bs)
        assert [len(b) for b in batched] == [len(s) for _, s in ITEMS]
        for a, b in zip(alone, batched):
            assert b == pytest.approx(a, abs=1e-5)


def test_token_counts_are_what_the_prm_reads(prm):
    tok = prm.tokenizer
    for question, steps in ITEMS:
        e = prm_lib.encode(prm, question, steps)
        prompt = tok.apply_chat_template(prm_lib.messages(question, [])[:2], tokenize=False,
                                         add_generation_prompt=True)
        assert e.ids[:e.prompt_tokens] == tok.encode(prompt, add_special_tokens=False)
        # each step: its stripped text's tokens plus the separator
        assert e.step_tokens == [len(tok.encode(s.strip(), add_special_tokens=False)) + 1 for s in steps]
        for t in range(1, len(steps) + 1):   # reading steps 1..t = tokens up to t's separator
            assert prm_lib.prm_cost_tokens(e.prompt_tokens, e.step_tokens, t) == e.sep_positions[t - 1] + 1


def test_cost_arithmetic_by_hand():
    # question part 40 tokens, steps of 10, 7 and 12 PRM tokens (separator included)
    assert [prm_lib.prm_cost_tokens(40, [10, 7, 12], t) for t in range(4)] == [0, 50, 57, 69]
    with pytest.raises(ValueError):
        prm_lib.prm_cost_tokens(40, [10, 7, 12], 4)
    rec = {"small": {"prm_prompt_tokens": 40, "steps": [{"prm_tokens": 10}, {"prm_tokens": 7},
                                                        {"prm_tokens": 12}]}}
    assert prm_lib.record_prm_tokens(rec) == [50, 57, 69]
    # escalating at step 2 with a 1000-parameter PRM: 2 * 1000 FLOPs per token read
    assert 2 * 1000 * prm_lib.record_prm_tokens(rec)[2 - 1] == 114_000
    # never escalating: every step was scored
    assert 2 * 1000 * prm_lib.record_prm_tokens(rec)[-1] == 138_000


def hand_table() -> list[dict]:
    pool = {"small": {"model": "s", "params": 100}, "large": {"model": "l", "params": 1000}}
    def step(text, tokens, lp):
        return {"text": text, "tokens": tokens, "mean_logprob": lp, "min_logprob": 2 * lp,
                "mean_entropy": 0.5, "max_entropy": 1.5}
    recs = []
    for i, (q, steps) in enumerate(ITEMS[:4]):
        recs.append({
            "schema": 1, "id": f"hand/{i}", "dataset": "hand", "question": q, "gold": "5",
            "pool": json.loads(json.dumps(pool)),
            "small": {"prompt_tokens": 30 + i, "steps": [step(s, 5 + j, -0.1 * (j + 1))
                                                         for j, s in enumerate(steps)],
                      "answer": "5", "correct": i % 2 == 0, "finished": True},
            "escalations": [{"after": k, "prompt_tokens": 30 + k, "tokens": 20, "text": "x",
                             "answer": "5", "correct": True, "finished": True}
                            for k in range(len(steps))],
            "settings": {"max_new_tokens": 96}})
    return recs


def strip_prm(rec: dict) -> dict:
    rec = json.loads(json.dumps(rec))
    rec["pool"].pop("prm", None)
    rec["small"].pop("prm_prompt_tokens", None)
    for s in rec["small"]["steps"]:
        s.pop("prm_score", None)
        s.pop("prm_tokens", None)
    return rec


def test_rescore_table_adds_scores_and_changes_nothing_else(prm, tmp_path):
    records = hand_table()
    before = json.dumps(records)
    scored = prm_lib.rescore_table(records, prm, batch_size=2)
    assert json.dumps(records) == before                         # input untouched
    assert [json.dumps(strip_prm(r)) for r in scored] == [json.dumps(r) for r in records]
    for rec in scored:
        steps = [s["text"] for s in rec["small"]["steps"]]
        e = prm_lib.encode(prm, rec["question"], steps)
        assert rec["pool"]["prm"] == {"model": prm.name, "params": prm.params}
        assert rec["small"]["prm_prompt_tokens"] == e.prompt_tokens
        assert [s["prm_tokens"] for s in rec["small"]["steps"]] == e.step_tokens
        assert [s["prm_score"] for s in rec["small"]["steps"]] == pytest.approx(
            prm_lib.score_steps(prm, rec["question"], steps), abs=1e-5)
        assert prm_lib.has_prm(rec)
    # JSONL round trip, idempotence, and a forced rescore giving the same values
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in scored))
    back = [json.loads(line) for line in path.read_text().splitlines()]
    assert prm_lib.rescore_table(back, prm) == back
    forced = prm_lib.rescore_table(back, prm, force=True)
    for a, b in zip(forced, back):
        assert strip_prm(a) == strip_prm(b)
        assert [s["prm_score"] for s in a["small"]["steps"]] == pytest.approx(
            [s["prm_score"] for s in b["small"]["steps"]], abs=1e-6)
    with pytest.raises(ValueError):
        prm_lib.rescore_table([dict(records[0], schema=2)], prm)


def test_bfloat16_is_close(folder, prm):
    bf = prm_lib.load_prm(str(folder), dtype=torch.bfloat16)
    assert bf.backbone.dtype == torch.bfloat16 and bf.params == prm.params
    assert prm_lib.score_steps(bf, QUESTION, STEPS) == pytest.approx(
        prm_lib.score_steps(prm, QUESTION, STEPS), abs=0.03)


def _copy(folder, dest, **config_changes):
    shutil.copytree(folder, dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg.update(config_changes)
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


@pytest.mark.parametrize("changes", [
    {"architectures": ["LlamaForCausalLM"], "model_type": "llama"},
    {"architectures": ["Qwen2ForCausalLM"]},                     # a plain LM, no PRM head
    {"architectures": ["Qwen2ForPrmModel"]},                     # Skywork's PRM: another format
])
def test_another_family_is_refused_in_one_line(folder, tmp_path, changes):
    other = _copy(folder, tmp_path / "other", **changes)
    with pytest.raises(prm_lib.PRMError) as err:
        prm_lib.load_prm(str(other))
    msg = str(err.value)
    assert "\n" not in msg and "Qwen2.5-Math-PRM" in msg and changes["architectures"][0] in msg
    assert isinstance(err.value, ValueError)


def test_missing_head_or_folder_is_refused(folder, tmp_path):
    from safetensors.torch import save_file
    other = tmp_path / "nohead"
    other.mkdir()
    for f in folder.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy(f, other / f.name)
    save_file({k: v for k, v in checkpoint(folder).items() if not k.startswith("score.")},
              str(other / "model.safetensors"), metadata={"format": "pt"})
    for bad in (other, tmp_path / "nowhere/prm", "./no-such-prm-folder", "nobody/no-such-prm"):
        with pytest.raises(prm_lib.PRMError) as err:
            prm_lib.load_prm(str(bad))
        assert "\n" not in str(err.value)
