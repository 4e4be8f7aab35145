"""A tiny process reward model in the released Qwen2.5-Math-PRM format, built offline in ~1 s.

`build_tiny_prm(folder)` writes what `Qwen/Qwen2.5-Math-PRM-7B` ships, in small:

- config.json with the keys of the released one (https://huggingface.co/Qwen/Qwen2.5-Math-PRM-7B
  config.json: architectures ["Qwen2ForProcessRewardModel"], auto_map to the remote
  configuration_qwen2_rm / modeling_qwen2_rm, model_type "qwen2", torch_dtype bfloat16, a
  vocab_size padded beyond the tokenizer) with tiny sizes (hidden 32, 2 layers). The remote
  code files themselves are not written: prm.py must not need them.
- a byte-level BPE tokenizer trained here with Qwen2's own pipeline (NFC, Qwen2's
  pre-tokenizer regex, ByteLevel), so that transformers' Qwen2Tokenizer (tokenizer_class in
  tokenizer_config.json, as in the release) loads it unchanged; special tokens
  <|endoftext|>, <|im_start|>, <|im_end|> and the step separator <extra_0>; a Qwen2.5-Math
  style chat template (default system prompt "Please reason step by step, ...").
- random weights in bfloat16, sharded in two safetensors files with a
  model.safetensors.index.json, under the checkpoint's key names: `model.*` (a transformers
  Qwen2Model) and the reward head `score.0.{weight,bias}`, `score.2.{weight,bias}`
  (Linear(hidden, hidden), ReLU, Linear(hidden, 2)). The weights are drawn with a larger
  scale than the default init, so that step scores spread over (0, 1) instead of all sitting
  near 0.5.

    python tests/tinyprm.py OUT_FOLDER
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<extra_0>"]
# Qwen2's pre-tokenizer regex, as transformers' Qwen2Tokenizer sets it.
QWEN2_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
               r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# The Qwen2.5-Math chat template without its tool-calling branch.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + SYSTEM_PROMPT.replace("\\", "\\\\") + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] != 'system' or not loop.first %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPEC = dict(hidden=32, layers=2, heads=4, kv=2, inter=64, max_pos=512, vocab=320)
CORPUS = [
    "Janet has 16 eggs. She eats 3 for breakfast and bakes muffins with 4.",
    "First, we find how many eggs are left: 16 - 3 - 4 = 9.",
    "Then she sells them at $2 each, so she makes 9 * 2 = 18 dollars.",
    "The answer is \\boxed{18}.",
    "Tom starts with 3 apples. After buying 4 more, he has 3 + 4 = 7.",
    "Let x be the number of books. Then 2x + 5 = 17, so x = 6.",
    SYSTEM_PROMPT, "system", "user", "assistant", "What is the total? How many are left?",
]


def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=SPEC["vocab"], special_tokens=SPECIALS,
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return tok


def write_tokenizer(tok, folder: Path) -> None:
    """tokenizer.json, vocab.json, merges.txt and a tokenizer_config.json naming Qwen2Tokenizer."""
    tok.save(str(folder / "tokenizer.json"))
    tok.model.save(str(folder))                       # vocab.json, merges.txt
    ids = {t: tok.token_to_id(t) for t in SPECIALS}
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False,
                                          "rstrip": False, "single_word": False, "special": True}
                                 for t, i in ids.items()},
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<extra_0>"],
        "bos_token": None, "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": SPEC["max_pos"],
        "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def model_config(vocab_size: int, eos_id: int, bos_id: int) -> dict:
    s = SPEC
    return {
        "architectures": ["Qwen2ForProcessRewardModel"],
        "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_qwen2_rm.Qwen2RMConfig",
                     "AutoModel": "modeling_qwen2_rm.Qwen2ForProcessRewardModel"},
        "bos_token_id": bos_id, "eos_token_id": eos_id, "hidden_act": "silu",
        "hidden_size": s["hidden"], "initializer_range": 0.02, "intermediate_size": s["inter"],
        "max_position_embeddings": s["max_pos"], "max_window_layers": s["layers"],
        "model_type": "qwen2", "num_attention_heads": s["heads"],
        "num_hidden_layers": s["layers"], "num_key_value_heads": s["kv"], "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0, "sliding_window": s["max_pos"], "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.37.0", "use_cache": True,
        "use_mrope": False, "use_sliding_window": False, "vocab_size": vocab_size,
    }


def random_state_dict(config: dict, seed: int) -> dict:
    """Checkpoint-named random weights: model.* from a transformers Qwen2Model, score.* head."""
    import torch
    from torch import nn
    from transformers import Qwen2Config, Qwen2Model

    torch.manual_seed(seed)
    cfg = Qwen2Config(**{k: v for k, v in config.items() if k not in ("architectures", "auto_map")})
    backbone = Qwen2Model(cfg)
    with torch.no_grad():          # larger than the default init: hidden states that vary
        for name, p in backbone.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.2)
    h = config["hidden_size"]
    head = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 2))
    with torch.no_grad():
        for p, std in zip(head.parameters(), (0.2, 0.1, 0.2, 0.1)):
            p.normal_(0.0, std)
    sd = {f"model.{k}": v for k, v in backbone.state_dict().items()}
    sd.update({f"score.{k}": v for k, v in head.state_dict().items()})
    return {k: v.detach().to(torch.bfloat16).contiguous() for k, v in sd.items()}


def write_sharded(sd: dict, folder: Path, shards: int = 2) -> None:
    from safetensors.torch import save_file

    keys = sorted(sd)
    if shards == 1:
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    parts = [keys[i::shards] for i in range(shards)]
    weight_map, total = {}, 0
    for i, part in enumerate(parts, 1):
        name = f"model-{i:05d}-of-{shards:05d}.safetensors"
        save_file({k: sd[k] for k in part}, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
        total += sum(sd[k].numel() * sd[k].element_size() for k in part)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def build_tiny_prm(folder, seed: int = 0, shards: int = 2) -> Path:
    """Write the tiny PRM into `folder` (created) and return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    write_tokenizer(tok, folder)
    vocab = -(-tok.get_vocab_size() // 64) * 64 + 64      # padded, like 152064 > 151665
    config = model_config(vocab, tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>"))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}, indent=2))
    write_sharded(random_state_dict(config, seed), folder, shards)
    return folder


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/tinyprm.py OUT_FOLDER")
    print(build_tiny_prm(sys.argv[1]))
