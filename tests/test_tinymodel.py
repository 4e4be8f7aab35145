"""Sanity checks of the tiny test pool (tests/tinymodel.py)."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from tinymodel import EOS, PAD, SYSTEM_PROMPT, boxed_answer, write_questions_jsonl


def _messages(question):
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]


def _greedy(folder, questions, max_new_tokens=96):
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok.padding_side = "left"
    prompts = [tok.apply_chat_template(_messages(q), tokenize=False, add_generation_prompt=True)
               for q in questions]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    gc = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens,
                          eos_token_id=[tok.convert_tokens_to_ids(EOS), tok.convert_tokens_to_ids(PAD)],
                          pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        out = model.generate(**enc, generation_config=gc)
    return tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def test_tokenizer_round_trip_and_specials(tiny_pool):
    tok = AutoTokenizer.from_pretrained(tiny_pool["small"])
    text = "Tom starts with 3 apples.\n\nAfter buying 4 more, he has 3 + 4 = 7\n\nThe answer is \\boxed{7}."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    pieces = [tok.decode([i]) for i in ids]
    # blank lines come both inside one token and as two separate "\n" tokens
    assert ".\n\n" in pieces
    assert any(a == "\n" and b == "\n" for a, b in zip(pieces, pieces[1:]))
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
        assert special in tok.all_special_tokens
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_chat_template_renders(tiny_pool):
    tok = AutoTokenizer.from_pretrained(tiny_pool["small"])
    msgs = _messages("Q?")
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert prompt == (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
                      "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n")
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": "A."}], tokenize=False)
    assert full.endswith("<|im_start|>assistant\nA.<|im_end|>\n")


def test_small_writes_steps_and_a_boxed_answer(tiny_pool):
    q = tiny_pool["questions"][0]["question"]
    text = _greedy(tiny_pool["small"], [q])[0]
    steps = [s for s in text.split("\n\n") if s.strip()]
    assert len(steps) >= 2, text
    assert boxed_answer(text) is not None, text


def test_large_beats_small_on_heldout(tiny_pool):
    qs = tiny_pool["questions"]
    acc = {}
    for name in ("small", "large"):
        outs = _greedy(tiny_pool[name], [q["question"] for q in qs])
        acc[name] = sum(boxed_answer(o) == q["answer"] for o, q in zip(outs, qs)) / len(qs)
    assert acc["large"] > acc["small"], acc
    assert 0 < acc["small"] < 1, acc  # real right and wrong answers


def test_write_questions_jsonl(tiny_pool, tmp_path):
    import json

    path = write_questions_jsonl(tmp_path / "q.jsonl", tiny_pool["questions"][:3])
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == [{"question": q["question"], "answer": q["answer"]} for q in tiny_pool["questions"][:3]]
