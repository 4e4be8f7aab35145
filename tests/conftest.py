"""Shared fixtures: a tiny real model pool built locally (tests/tinymodel.py), the trajectory
table rollout.py builds on it, and the two loaded models."""
import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]


@pytest.fixture(scope="session")
def tiny_pool():
    from tinymodel import build_tiny_pool
    return build_tiny_pool(os.environ.get("TINY_POOL_CACHE"))


@pytest.fixture(scope="session")
def tiny_table(tiny_pool, tmp_path_factory):
    """rollout.py run end to end on 8 held-out questions of the tiny pool."""
    import rollout
    from table import read_table
    from tinymodel import write_questions_jsonl
    d = tmp_path_factory.mktemp("table")
    data = write_questions_jsonl(d / "q.jsonl", tiny_pool["questions"][:8])
    out = d / "table.jsonl"
    rollout.main(["--dataset", str(data), "--small", str(tiny_pool["small"]),
                  "--large", str(tiny_pool["large"]), "--out", str(out), "--dtype", "float32",
                  "--max-new-tokens", "96", "--batch-size", "3", "--chunk-size", "5"])
    return {"data": data, "out": out, "records": read_table(out)}


@pytest.fixture(scope="session")
def tiny_lms(tiny_pool):
    from types import SimpleNamespace
    from rollout import load_model  # the engine's LM, given the method's prompt and step rule
    args = SimpleNamespace(dtype="float32")
    return load_model(str(tiny_pool["small"]), None, args, "cpu"), \
        load_model(str(tiny_pool["large"]), None, args, "cpu")
