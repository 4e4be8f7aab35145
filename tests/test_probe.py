"""probe.py: hidden states at step ends on the tiny pool, their cache, the linear probe."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import probe
from cli import UsageError
from engine import load_lm
from rollout import encode_prompt

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small(tiny_pool):
    return load_lm(str(tiny_pool["small"]), "cpu", "float32")


def write_table(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ---------------------------------------------------------------------------- states
def test_states_are_those_at_each_step_end(tiny_table, small):
    records = tiny_table["records"]
    empty = {**records[0], "id": "no-steps", "small": {**records[0]["small"], "steps": []},
             "escalations": []}
    records = records + [empty]
    got = probe.step_hidden_states(small, records, batch_size=4, store=torch.float32)
    alone = probe.step_hidden_states(small, records, batch_size=1, store=torch.float32)
    n_layers = small.model.config.num_hidden_layers
    assert n_layers == 3 and got[-1].shape == (0, 2, 96)
    checked = 0
    for rec, h, h1 in zip(records, got, alone):
        steps = rec["small"]["steps"]
        assert h.shape == (len(steps), 2, 96)
        torch.testing.assert_close(h, h1, atol=1e-5, rtol=0)  # padding changes nothing
        for t in range(len(steps)):  # a separate pass over prompt + steps 1..t: its last position
            prefix = "".join(s["text"] for s in steps[:t + 1])
            ids = torch.tensor([encode_prompt(small.tokenizer, rec["question"], prefix)])
            with torch.no_grad():
                ref = small.model(ids, output_hidden_states=True).hidden_states
            torch.testing.assert_close(h[t, 0], ref[n_layers // 2][0, -1], atol=1e-4, rtol=0)
            torch.testing.assert_close(h[t, 1], ref[-1][0, -1], atol=1e-4, rtol=0)
            checked += 1
    assert checked >= 16
    half = probe.step_hidden_states(small, records[:2])  # the default: float16
    assert half[0].dtype == torch.float16
    torch.testing.assert_close(half[0].float(), got[0], atol=2e-3, rtol=2e-3)
    with pytest.raises(ValueError, match="layer 7"):
        probe.step_hidden_states(small, records[:1], layers=(7,))


# ---------------------------------------------------------------------------- file and cache
def test_file_round_trip_cache_reuse_and_extension(tiny_table, tmp_path, monkeypatch):
    records = tiny_table["records"]
    table = write_table(tmp_path / "t.jsonl", records[:5])
    out = tmp_path / "h.pt"
    first = probe.hidden_for_table(table, out=out)
    assert first["computed"] == 5 and first["ids"] == [r["id"] for r in records[:5]]
    loaded = probe.load_hidden(out)
    assert loaded["format"] == probe.FORMAT and loaded["ids"] == first["ids"]
    assert loaded["meta"]["layers"] == ["mid", "last"]
    assert loaded["meta"]["model"] == records[0]["pool"]["small"]["model"]
    for i in first["ids"]:
        assert torch.equal(loaded["hidden"][i], first["hidden"][i])
        assert loaded["hidden"][i].dtype == torch.float16

    def boom(*a, **k):
        raise AssertionError("computed again")
    stamp = out.stat().st_mtime_ns
    with monkeypatch.context() as m:  # up to date: nothing computed, nothing written
        m.setattr(probe, "hidden_states", boom)
        again = probe.hidden_for_table(table, out=out)
    assert again["computed"] == 0 and out.stat().st_mtime_ns == stamp
    assert all(torch.equal(again["hidden"][i], first["hidden"][i]) for i in first["ids"])

    write_table(table, records[:6])  # the table grows by a line: only that question is computed
    calls = []
    real = probe.hidden_states
    monkeypatch.setattr(probe, "hidden_states",
                        lambda lm, recs, *a: calls.append(len(recs)) or real(lm, recs, *a))
    grown = probe.hidden_for_table(table, out=out)
    assert calls == [1] and grown["computed"] == 1 and len(probe.load_hidden(out)["ids"]) == 6
    assert all(torch.equal(grown["hidden"][i], first["hidden"][i]) for i in first["ids"])
    edited = [dict(r) for r in records[:6]]
    edited[2] = {**edited[2], "question": edited[2]["question"] + " "}  # a changed line is recomputed
    write_table(table, edited)
    assert probe.hidden_for_table(table, out=out)["computed"] == 1 and calls == [1, 1]
    assert probe.hidden_for_table(table, out=out, layers=("last",))["computed"] == 6  # other layers: all

    monkeypatch.chdir(tmp_path)  # the default place: runs/hidden/<folder>-<stem>.hidden.pt
    assert probe.default_out(table) == Path("runs/hidden") / f"{tmp_path.name}-t.hidden.pt"


# ---------------------------------------------------------------------------- the probe
def synthetic(n_groups=120, per=5, d=64, signal=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n_groups * per, 3, generator=g)
    X = latent @ (3 * torch.randn(3, d, generator=g)) + torch.randn(n_groups * per, d, generator=g)
    score = latent[:, 0] if signal else torch.randn(n_groups * per, generator=g)
    y = (score + 0.3 * torch.randn(n_groups * per, generator=g) > 0).long()
    return X, y, [f"q{i // per}" for i in range(n_groups * per)]


def test_probe_recovers_a_planted_signal_and_nothing_else():
    X, y, groups = synthetic()
    assert probe.auc(probe.cross_fit(X, y, groups), y) > 0.9
    assert probe.auc(probe.cross_fit(X, y, groups, dim=8), y) > 0.9  # the signal is in the top PCs
    Xn, yn, _ = synthetic(signal=False)
    assert 0.4 < probe.auc(probe.cross_fit(Xn, yn, groups), yn) < 0.6
    a, b = probe.fit_probe(X, y), probe.fit_probe(X, y)  # deterministic
    assert torch.equal(a.w, b.w) and torch.equal(a.score(X), b.score(X))
    assert a.score(X[:3]).shape == (3,) and probe.fit_probe(X, y, dim=8).proj.shape == (64, 8)


def test_groups_never_split_across_folds():
    g = torch.Generator().manual_seed(1)
    groups = [f"q{i}" for i in torch.randint(0, 100, (400,), generator=g).tolist()]
    fold = probe.group_folds(groups, folds=5, seed=3)
    assert set(fold.tolist()) == set(range(5)) and torch.equal(fold, probe.group_folds(groups, 5, 3))
    for name in set(groups):
        assert len({int(f) for f, q in zip(fold, groups) if q == name}) == 1
    # a label per question and an embedding per question: only a split question leaks it
    emb, label = torch.randn(100, 128, generator=g), torch.randint(0, 2, (100,), generator=g)
    idx = torch.tensor([int(q[1:]) for q in groups])
    X, y = emb[idx] + 0.1 * torch.randn(400, 128, generator=g), label[idx]
    assert probe.auc(probe.cross_fit(X, y, list(range(400))), y) > 0.9  # rows as groups: leaks
    assert probe.auc(probe.cross_fit(X, y, groups), y) < 0.7           # questions as groups: no


# ---------------------------------------------------------------------------- command line
def test_cli_writes_the_file_and_prints_one_line(tiny_table, tmp_path, capsys):
    table = write_table(tmp_path / "t.jsonl", tiny_table["records"][:2])
    assert probe.main(["--table", str(table), "--out", str(tmp_path / "h.pt")]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{tmp_path / 'h.pt'}: 2 questions, ") and line.endswith(" s")


def test_cli_errors_are_one_line(tiny_table, tmp_path):
    missing = tmp_path / "none.jsonl"
    r = subprocess.run([sys.executable, "probe.py", "--table", str(missing)], cwd=ROOT,
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2 and r.stderr.strip() == f"probe.py: error: {missing}: no such file"
    served = [{**rec, "pool": {**rec["pool"], "small": {**rec["pool"]["small"], "backend": "api",
                                                      "base_url": "http://h/v1"}}}
              for rec in tiny_table["records"][:2]]
    table = write_table(tmp_path / "api.jsonl", served)
    with pytest.raises(UsageError, match="was served at http://h/v1; give --small PATH"):
        probe.main(["--table", str(table)])
    with pytest.raises(UsageError, match="model /no/such/model: no such folder"):
        probe.main(["--table", str(table), "--small", "/no/such/model"])
