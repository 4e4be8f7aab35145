"""The hidden-state policy (DESIGN section 4): rollout.py --add-hidden writes a table's states
beside it, train_policy.py --hidden-state fits its probe out of fold and stores it, calibrate.py
and route.py read the same feature, and the live drafter's states equal the stored ones."""
import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import calibrate
import probe
import rollout
import train_policy as tp
from cli import UsageError
from engine import load_lm

ROOT = Path(__file__).resolve().parents[1]
PRICES = ["--price-small", "0,1", "--price-large", "0,10"]   # a real pool's ratio (see test_route)


def old_table(tiny_table, folder: Path) -> Path:
    """The tiny table as an earlier version wrote it: no settings, nothing beside it."""
    path = folder / "old.jsonl"
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "settings"}) + "\n"
                            for r in tiny_table["records"]))
    return path


@pytest.fixture(scope="module")
def with_states(tiny_table, tmp_path_factory):
    d = tmp_path_factory.mktemp("hidden")
    table = old_table(tiny_table, d)
    rollout.main(["--add-hidden", str(table), "--dtype", "float32"])
    return table


def test_add_hidden_writes_the_sidecar_and_resumes(with_states, tiny_table, tiny_pool, capsys):
    side = probe.sidecar_path(with_states)
    assert side == with_states.with_name("old.hidden.pt") and side.is_file()
    blob = probe.load_hidden(side)
    records = tiny_table["records"]
    assert blob["ids"] == [r["id"] for r in records] and blob["meta"]["layers"] == ["mid"]
    small = load_lm(str(tiny_pool["small"]), "cpu", "float32")
    ref = probe.hidden_states(small, records, layers=("mid",), store=torch.float32)
    for r, (q, steps) in zip(records, ref):
        assert blob["hidden"][r["id"]].dtype == torch.float16
        assert blob["hidden"][r["id"]].shape == (len(r["small"]["steps"]), 1, 96)
        torch.testing.assert_close(blob["hidden"][r["id"]].float(), steps, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(blob["question"][r["id"]].float(), q, atol=2e-3, rtol=2e-3)
    stamp = side.stat().st_mtime_ns
    rollout.main(["--add-hidden", str(with_states), "--dtype", "float32"])   # up to date: nothing computed
    assert "0 computed" in capsys.readouterr().err and side.stat().st_mtime_ns == stamp
    states = probe.table_states(with_states, records)
    q0, s0 = states[records[0]["id"]]
    assert q0.shape == (96,) and s0.shape == (len(records[0]["small"]["steps"]), 96) and s0.dtype == torch.float32


def test_missing_or_stale_states_are_one_line(with_states, tiny_table, tmp_path):
    records = tiny_table["records"]
    bare = tmp_path / "bare.jsonl"
    shutil.copy(with_states, bare)
    with pytest.raises(UsageError, match=r"no hidden states beside it .*rollout.py --add-hidden"):
        probe.table_states(bare, records)
    edited = [dict(r) for r in records]
    edited[3] = {**edited[3], "question": edited[3]["question"] + "?"}
    with pytest.raises(UsageError, match=r"no states for 1 of the table's 8 questions"):
        probe.table_states(with_states, edited)
    with pytest.raises(UsageError, match="--small-api"):
        rollout.parse_args(["--add-hidden", str(with_states), "--small-api", "http://127.0.0.1:9/v1"])
    with pytest.raises(UsageError, match="takes no --dataset"):
        rollout.parse_args(["--add-hidden", str(with_states), "--dataset", "gsm8k"])


def test_live_drafter_states_equal_the_stored_ones(with_states, tiny_table, tiny_lms):
    """The drafter's own forward passes give the states that --add-hidden stored, teacher-forced
    (float16 storage: within its rounding), at the prompt's and at every step's last token."""
    small, _ = tiny_lms
    states = probe.table_states(with_states, tiny_table["records"])
    mid = small.model.config.num_hidden_layers // 2
    checked = 0
    for r in tiny_table["records"][:5]:
        drafter = small.drafter(r["question"], 96, hidden_layer=mid)
        q, stored = states[r["id"]]
        torch.testing.assert_close(drafter.question_hidden, q, atol=2e-3, rtol=2e-3)
        t = 0
        while (draft := drafter.next_step()) is not None:
            assert draft["text"] == r["small"]["steps"][t]["text"]
            torch.testing.assert_close(draft["hidden"], stored[t], atol=2e-3, rtol=2e-3)
            t, checked = t + 1, checked + 1
        assert t == len(r["small"]["steps"])
    assert checked >= 10


def test_probe_features_are_out_of_fold():
    """A question's feature comes from a probe that never saw it: flipping that question's
    label leaves its own out-of-fold logits unchanged (while the probe fitted on all rows, the
    one stored for other tables, moves); on pure-noise states they carry no signal."""
    g = torch.Generator().manual_seed(0)
    records, states = [], {}
    for i in range(60):
        records.append({"id": f"q{i}", "small": {"steps": [{}] * 3, "correct": i % 2 == 0}})
        states[f"q{i}"] = (torch.zeros(32), torch.randn(3, 32, generator=g))
    fitted, info, oof = tp.fit_hidden_probe(records, states, folds=5)
    assert info["rows"] == 180 and info["label"] == tp.PROBE_LABEL
    y = torch.tensor([0.0 if r["small"]["correct"] else 1.0 for r in records for _ in range(3)])
    assert probe.auc(torch.cat([oof[r["id"]] for r in records]), y) == pytest.approx(info["train_oof_auc"], abs=1e-12)
    assert 0.3 < info["train_oof_auc"] < 0.7
    grid = [(info["l2"], info["dim"])]   # the same settings, one label flipped
    flipped = [{**r, "small": {**r["small"], "correct": not r["small"]["correct"]}} if r["id"] == "q0" else r
               for r in records]
    with pytest.MonkeyPatch.context() as m:
        m.setattr(probe, "select_probe", functools.partial(probe.select_probe, grid=grid))
        refit, _, oof2 = tp.fit_hidden_probe(flipped, states, folds=5)
        again, _, oof3 = tp.fit_hidden_probe(records, states, folds=5)
    assert torch.equal(oof3["q0"], oof["q0"])
    assert torch.equal(oof2["q0"], oof["q0"])   # its own label never reached its own feature
    assert not all(torch.equal(oof2[i], oof[i]) for i in oof if i != "q0")   # it did reach the others'
    assert not torch.allclose(refit.score(states["q0"][1]), fitted.score(states["q0"][1]))


@pytest.fixture(scope="module")
def hidden_policy(with_states, tmp_path_factory):
    d = tmp_path_factory.mktemp("hidden-policy")
    policy, cal = d / "policy.pt", d / "calibration.json"
    tp.main(["--train", str(with_states), "--target-relative", "0.9", "--out", str(policy),
             "--hidden-state", "--hidden", "--iters", "60", "--probe-folds", "2", *PRICES])
    calibrate.main(["--policy", str(policy), "--data", str(with_states), "--target-relative", "0.9",
                    "--out", str(cal), "--allow-overlap", *PRICES])
    return policy, cal


def test_policy_file_carries_the_probe(hidden_policy, with_states, tiny_table):
    policy = tp.load_policy(hidden_policy[0])
    assert policy.hidden == [] and "draft_hidden_wrong" in policy.feature_names
    assert policy.probe is not None and policy.probe_info["layer"] == "mid" and policy.probe_info["width"] == 96
    # calibrate.py's table reads the states through the stored probe: that is the feature column
    args = calibrate.build_parser().parse_args(["--policy", str(hidden_policy[0]), "--data", str(with_states),
                                                "--target-relative", "0.9", "--out", "x", *PRICES])
    table = tp.load_table(with_states, args, policy)
    states = probe.table_states(with_states, tiny_table["records"])
    col = tp.FEATURE_NAMES.index("draft_hidden_wrong")
    for i, r in enumerate(tiny_table["records"]):
        want = tp.hidden_wrong_logits(policy.probe, states[r["id"]][1]).float()
        assert torch.equal(table.features[i, :len(want), col], want)
    plain = tp.load_table(with_states, args)   # a policy without the state: the column stays 0
    assert not plain.features[..., col].any() and table.features[..., col].abs().sum() > 0
    # the probe is one of the trained policy's inputs: other logits give other p values
    moved = table.features.clone()
    moved[..., col] += 3.0
    assert not torch.allclose(policy(moved)[table.mask], policy(table.features)[table.mask])


def test_route_reads_the_drafters_state(hidden_policy, with_states, tiny_table, tiny_pool):
    """route.py --json with the hidden-state policy: each draft's probe logit and p(escalate)
    are the table's (states from the sidecar) within float16 rounding; a small model behind a
    server is refused in one line."""
    policy_path, _ = hidden_policy
    policy = tp.load_policy(policy_path)
    args = calibrate.build_parser().parse_args(["--policy", str(policy_path), "--data", str(with_states),
                                                "--target-relative", "0.9", "--out", "x", *PRICES])
    table = tp.load_table(with_states, args, policy)
    p_table = tp.policy_probs(policy, table)
    col = tp.FEATURE_NAMES.index("draft_hidden_wrong")
    r_i = max(range(table.Q), key=lambda i: int(table.n_steps[i]))   # the longest solution
    r = tiny_table["records"][r_i]
    out = subprocess.run(
        [sys.executable, str(ROOT / "route.py"), "--policy", str(policy_path), "--kappa", "1.0",
         "--small", str(tiny_pool["small"]), "--large", str(tiny_pool["large"]), "--dtype", "float32",
         "--max-new-tokens", "96", "--json", r["question"]],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    run = json.loads(out.stdout.strip().splitlines()[-1])
    drafts = [s for s in run["steps"] if s["model"] == "small"]
    n = int(table.n_steps[r_i])
    assert len(drafts) == n and run["escalated_at"] is None   # kappa 1: never escalates
    assert [s["hidden_wrong"] for s in drafts] == pytest.approx(table.features[r_i, :n, col].tolist(), abs=0.05)
    assert [s["p_escalate"] for s in drafts] == pytest.approx(p_table[r_i, :n].tolist(), abs=0.02)
    served = subprocess.run(
        [sys.executable, str(ROOT / "route.py"), "--policy", str(policy_path), "--kappa", "0.5",
         "--small", "tiny", "--small-api", "http://127.0.0.1:9/v1", "--large", str(tiny_pool["large"]),
         "question"], capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert served.returncode == 2 and "hidden state" in served.stderr
    assert len(served.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------- before the first draft
def test_before_draft_column_is_the_large_model_alone():
    """with_before_draft(): column 0 is the large model alone (the small model's read of the
    question charged with --prompt-cost), the rest are the steps; routes map back; the exact
    expectation puts p0 on the large model alone."""
    from types import SimpleNamespace
    import table as tb
    from synthetic import make_records, record, step
    records = make_records(12, seed=3) + [record("empty", [], [], small_correct=True)]
    args = SimpleNamespace(prompt_cost=0.5, price_small=None, price_large=None)
    pricing = tb.pricing_from_args(args, records)
    qw = {r["id"]: float(i) - 6.0 for i, r in enumerate(records)}
    base = tp.build_table(records, pricing, question_wrong=qw)
    view = tp.with_before_draft(base)
    assert view.T == base.T + 1 and view.mask[:, 0].all() and torch.equal(view.mask[:, 1:], base.mask)
    assert torch.equal(view.esc_correct[:, 0], base.large_correct)
    prompts = torch.tensor([r["small"]["prompt_tokens"] if r["small"]["steps"] else 0 for r in records],
                           dtype=torch.float64)
    assert torch.allclose(view.esc_cost[:, 0], base.large_cost + pricing.small_in * prompts)
    col = tp.FEATURE_NAMES.index
    assert torch.equal(view.features[:, 0, col("question_hidden_wrong")], base.question_wrong)
    assert view.features[:, 0, col("before_draft")].eq(1).all() and view.features[:, 1:, col("before_draft")].eq(0).all()
    assert torch.equal(view.features[:, 1:][base.mask][:, col("question_hidden_wrong")],
                       base.question_wrong[:, None].expand(-1, base.T)[base.mask])
    # a router that fires before the draft on the first half and never on the rest
    scores = torch.zeros(view.Q, view.T, dtype=torch.float64)
    scores[: view.Q // 2, 0] = 1.0
    esc = tb.first_crossing(scores, view.mask, torch.tensor([0.5]))
    out = tb.route_outcomes(view, esc)
    back = tp.table_routes(esc, view)
    assert back[0, : view.Q // 2].eq(base.T + 1).all() and back[0, view.Q // 2:].eq(base.T).all()
    plain = tb.route_outcomes(base, back)
    assert torch.equal(out["correct"], plain["correct"])
    assert torch.allclose(out["cost"][0, : view.Q // 2], plain["cost"][0, : view.Q // 2] +
                          pricing.small_in * prompts[: view.Q // 2])
    p = torch.full((view.Q, view.T), 0.3, dtype=torch.float64)
    p_esc, p_never = tp.escalation_distribution(p, view.mask)
    assert torch.allclose(p_esc[:, 0], torch.full((view.Q,), 0.3, dtype=torch.float64))
    assert tp.with_before_draft(view) is view
    with pytest.raises(UsageError, match="question probe"):
        tp.with_before_draft(tp.build_table(records, pricing))


@pytest.fixture(scope="module")
def before_policy(with_states, tmp_path_factory):
    d = tmp_path_factory.mktemp("before-policy")
    policy = d / "policy.pt"
    tp.main(["--train", str(with_states), "--target-relative", "0.9", "--out", str(policy),
             "--hidden-state", "--before-draft", "--iters", "60", "--probe-folds", "2", *PRICES])
    return policy


def test_before_draft_policy_through_the_stages(before_policy, with_states, tiny_table, tiny_pool, tmp_path):
    policy = tp.load_policy(before_policy)
    assert tp.decides_before_draft(policy) and policy.question_probe is not None
    assert policy.question_probe_info["rows"] == len(tiny_table["records"])
    cal = tmp_path / "cal.json"
    calibrate.main(["--policy", str(before_policy), "--data", str(with_states), "--target-relative", "0.9",
                    "--out", str(cal), "--allow-overlap", *PRICES])
    import evaluate
    evaluate.main(["--data", str(with_states), "--policy", str(before_policy), "--calibration", str(cal),
                   "--calib-data", str(with_states), "--out", str(tmp_path / "eval"), "--allow-overlap",
                   "--bootstrap", "50", *PRICES])
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    args = calibrate.build_parser().parse_args(["--policy", str(before_policy), "--data", str(with_states),
                                                "--target-relative", "0.9", "--out", "x", *PRICES])
    view = tp.policy_view(tp.load_table(with_states, args, policy), policy)
    p = tp.policy_probs(policy, view)
    kappa = json.loads(cal.read_text())["kappa"]
    if kappa is not None:   # the calibrated point is the threshold rule on the view, mapped back
        import table as tb
        esc = tp.table_routes(tb.first_crossing(p, view.mask, torch.tensor([kappa]))[0], view)
        counts = torch.bincount(esc[view.n_steps > 1], minlength=view.T + 1)[: view.T + 1].tolist()
        assert result["policy_calibrated"]["escalation_step_counts"] == counts
    # live: the decision before the first draft reads the prompt pass's state, as the table does
    r = tiny_table["records"][0]
    p0 = float(p[0, 0])
    for k, want in ((p0 - 1e-3, "large model only"), (min(1.0, p0 + 1e-3), None)):
        out = subprocess.run(
            [sys.executable, str(ROOT / "route.py"), "--policy", str(before_policy), "--kappa", str(max(k, 0.0)),
             "--small", str(tiny_pool["small"]), "--large", str(tiny_pool["large"]), "--dtype", "float32",
             "--max-new-tokens", "96", "--json", r["question"]],
            capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert out.returncode == 0, out.stderr
        run = json.loads(out.stdout.strip().splitlines()[-1])
        assert run["p_before_draft"] == pytest.approx(p0, abs=5e-4)
        if want:
            assert run["route"] == want and run["tokens"]["small"] == 0 and run["escalated_at"] == 0
        else:
            assert run["tokens"]["small"] > 0


# ---------------------------------------------------------------------------- probe data
def test_probe_data_joins_every_fit_and_is_checked_for_overlap(with_states, tiny_table, tmp_path, capsys):
    """--probe-data: other questions' small-only solutions (their states beside them) join every
    fit of the probe and are never scored; a probe-data question the training table holds is
    dropped; later stages refuse a table sharing questions with the probe data."""
    records = tiny_table["records"]
    data = tmp_path / "probe-data.jsonl"
    lines = [{k: v for k, v in r.items() if k != "escalations"} for r in records[:3]]   # held by training
    lines += [{**line, "id": f"other/{i}", "question": line["question"] + " Think twice."}
              for i, line in enumerate(lines)]
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    probe.hidden_for_table(data, None, probe.sidecar_path(data), "float32", probe.SIDECAR_LAYERS, small_only=True)
    policy_path = tmp_path / "policy.pt"
    tp.main(["--train", str(with_states), "--target-relative", "0.9", "--out", str(policy_path),
             "--hidden-state", "--hidden", "--iters", "20", "--probe-folds", "2", "--probe-data", str(data), *PRICES])
    said = capsys.readouterr().out
    steps = sum(len(x["small"]["steps"]) for x in lines[3:])
    assert f"+ {steps} probe-data rows of 3 questions" in said
    policy = tp.load_policy(policy_path)
    assert policy.probe_info["probe_data_rows"] == steps and len(policy.meta["probe_data_hashes"]) == 3
    # the fitted probe is the one on the training rows plus the probe data
    states = probe.table_states(with_states, records)
    X, y = tp.probe_rows(records, states)
    Xe, ye = tp.probe_rows([{**x, "id": x["id"]} for x in lines[3:]], probe.table_states(data, lines[3:]))
    ref = probe.fit_probe(torch.cat([X, Xe]), torch.cat([y, ye]), policy.probe_info["l2"], policy.probe_info["dim"])
    torch.testing.assert_close(policy.probe.w, ref.w)
    # a table holding probe-data questions is refused by calibrate.py, in one line
    clash = tmp_path / "clash.jsonl"
    clash.write_text("".join(json.dumps({**r, "id": f"c/{i}", "question": x["question"]}) + "\n"
                             for i, (r, x) in enumerate(zip(records[:3], lines[3:]))))
    probe.hidden_for_table(clash, None, probe.sidecar_path(clash), "float32", probe.SIDECAR_LAYERS)
    with pytest.raises(UsageError, match="its probe data"):
        calibrate.main(["--policy", str(policy_path), "--data", str(clash), "--target-relative", "0.9",
                        "--out", str(tmp_path / "c.json"), *PRICES])
    with pytest.raises(UsageError, match="needs --hidden-state"):
        tp.main(["--train", str(with_states), "--target-relative", "0.9", "--out", str(policy_path),
                 "--probe-data", str(data)])
