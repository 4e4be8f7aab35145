"""ablate.py: the running-answer features by hand, and the feature ablation on synthetic tables
whose signal lives in one known group: tests/synthetic.py's tables (an error step has a
moderately low mean_logprob and a moderately high max_entropy; decoys have one of them
strongly off) with the entropies shuffled across all steps, so that only the log-probabilities
tell where the small model goes wrong."""
import json
import random
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import ablate  # noqa: E402
from synthetic import make_records, write_jsonl  # noqa: E402

torch.set_num_threads(1)


def test_text_features_by_hand():
    q = "Tom has 1,200 apples and 3 bags. How many apples per bag?"
    steps = [{"text": "Tom starts with 1,200 apples.\n\n"},
             {"text": "We divide: 1200 / 3 = 400\n\n"},
             {"text": "Let us think again.\n\n"},
             {"text": "So 400 + 3 = 403, the answer is \\boxed{403}."}]
    rows = ablate.text_features(q, steps)
    # numbers, new numbers, has "=", last number so far is one the question gave (0.5: none yet)
    assert rows == [[1.0, 0.0, 0.0, 1.0],      # 1200 (commas dropped) is the question's
                    [3.0, 1.0, 1.0, 0.0],      # 1200, 3, 400: 400 is new; last 400
                    [0.0, 0.0, 0.0, 0.0],      # no number: the last is still 400
                    [4.0, 1.0, 1.0, 0.0]]      # 400, 3, 403, 403: one new (403)
    assert ablate.text_features("No numbers here?", [{"text": "Think.\n\n"}]) == [[0.0, 0.0, 0.0, 0.5]]


def test_select_keeps_every_per_question_field():
    import table as tb
    import train_policy as tp
    recs = make_records(12, seed=3)
    t = tp.build_table(recs, tb.Pricing(1.0, 1.0, 7.0, 7.0))
    s = tb.select(t, [5, 2, 5])
    assert isinstance(s, tp.FeatureTable) and s.Q == 3
    assert s.ids == [t.ids[5], t.ids[2], t.ids[5]] and s.hashes == [t.hashes[5], t.hashes[2], t.hashes[5]]
    assert torch.equal(s.features, t.features[[5, 2, 5]]) and torch.equal(s.esc_cost, t.esc_cost[[5, 2, 5]])
    assert torch.equal(s.large_cost, t.large_cost[[5, 2, 5]]) and s.pricing == t.pricing and s.pool == t.pool


def test_wrong_auc_and_the_per_question_oracle_by_hand():
    import table as tb
    import train_policy as tp
    t = tp.build_table(make_records(40, seed=5), tb.Pricing(1.0, 1.0, 7.0, 7.0))
    wrong = t.small_correct < 0.5
    assert 0 < int(wrong.sum()) < t.Q
    alarm = torch.zeros(t.Q, t.T)
    alarm[:, 0] = wrong.float()                      # step 1 tells the wrong questions apart
    assert ablate.wrong_auc(t, alarm) == 1.0
    every = wrong[:, None].float().expand(t.Q, t.T)  # every step does, the other way round
    assert ablate.wrong_auc(t, -every) == 0.0
    assert ablate.wrong_auc(t, torch.zeros(t.Q, t.T)) == 0.5
    late = torch.zeros(t.Q, t.T)                      # the alarm is the highest score over the
    n = t.mask.sum(1)                                 # question's own steps, wherever it is
    late[torch.arange(t.Q), n - 1] = torch.where(wrong, 2.0, -2.0)
    late[~t.mask] = 5.0                               # padded steps are not the question's
    assert ablate.wrong_auc(t, late) == 1.0
    # the per-question oracle: the cheapest correct of (escalate at step 1, small, large)
    cols = tb.outcome_columns(t)
    esc = ablate.question_oracle(t)[0].tolist()
    for q in range(t.Q):
        options = [(cols["cost"][q, c].item(), c) for c in (0, t.T, t.T + 1) if cols["correct"][q, c] > 0]
        assert esc[q] == (min(options)[1] if options else t.T), q
    per_q = tb.score_routes(t, ablate.question_oracle(t))
    full = tb.score_routes(t, ablate.oracle_route(t))
    assert per_q["accuracy"].item() <= full["accuracy"].item() + 1e-12


def test_where_escalation_pays_by_step_and_by_score_against_loops():
    import table as tb
    import train_policy as tp
    t = tp.build_table(make_records(60, seed=7), tb.Pricing(1.0, 1.0, 7.0, 7.0))
    wrong = (t.small_correct < 0.5).tolist()
    rows = ablate.escalation_by_step(t, last=3)
    assert list(rows) == ["step 1", "step 2", "steps >= 3"]
    for name, steps in (("step 1", [0]), ("step 2", [1]), ("steps >= 3", range(2, t.T))):
        cells = [(q, s) for q in range(t.Q) for s in steps if t.mask[q, s]]
        w = [t.esc_correct[q, s].item() for q, s in cells if wrong[q]]
        r = [t.esc_correct[q, s].item() for q, s in cells if not wrong[q]]
        g = [t.esc_correct[q, s].item() - t.small_correct[q].item() for q, s in cells]
        c = [t.esc_cost[q, s].item() / t.large_cost.mean().item() for q, s in cells]
        got = rows[name]
        assert (got["n_wrong"], got["n_right"]) == (len(w), len(r))
        for key, xs in (("rescued", w), ("kept", r), ("gain", g), ("cost", c)):
            assert abs(got[key] - sum(xs) / len(xs)) < 1e-9, (name, key)
    # escalating at step 1 hands the whole question to the large model
    assert abs(rows["step 1"]["rescued"] - t.large_correct[t.small_correct < 0.5].mean().item()) < 1e-9
    # by score: 4 equal bins of the drafted steps in score order (the step index as the score)
    score = torch.arange(t.T, dtype=torch.float64).expand(t.Q, t.T) * 1000 + torch.arange(t.Q)[:, None]
    bins = ablate.escalation_by_score(t, score, bins=4)
    cells = sorted(((score[q, s].item(), q, s) for q in range(t.Q) for s in range(t.T) if t.mask[q, s]))
    n = len(cells)
    assert [b["n"] for b in bins] == [len([i for i in range(n) if i * 4 // n == k]) for k in range(4)]
    for k, b in enumerate(bins):
        part = [(q, s) for i, (_, q, s) in enumerate(cells) if i * 4 // n == k]
        gain = sum(t.esc_correct[q, s].item() - t.small_correct[q].item() for q, s in part) / len(part)
        assert abs(b["gain"] - gain) < 1e-9


def test_probe_labels_wrong_and_rescue():
    import table as tb
    import train_policy as tp
    t = tp.build_table(make_records(30, seed=9), tb.Pricing(1.0, 1.0, 7.0, 7.0))
    at = [(q, s) for q in range(t.Q) for s in range(t.T) if t.mask[q, s]]
    wrong = ablate.probe_labels(t, at, "wrong")
    rescue = ablate.probe_labels(t, at, "rescue")
    for (q, s), w, r in zip(at, wrong.tolist(), rescue.tolist()):
        assert w == float(t.small_correct[q] < 0.5)
        assert r == float(t.small_correct[q] < 0.5 and t.esc_correct[q, s] > 0.5)
    assert 0 < rescue.sum() < wrong.sum()     # some escalations rescue, not all


def entropy_shuffled(n: int, seed: int, prefix: str) -> list:
    """synthetic.make_records with (mean_entropy, max_entropy) pairs shuffled across steps:
    the entropies carry no signal, the log-probabilities all of it."""
    recs = make_records(n, seed=seed, id_prefix=prefix)
    steps = [s for r in recs for s in r["small"]["steps"]]
    ent = [(s["mean_entropy"], s["max_entropy"]) for s in steps]
    random.Random(seed + 100).shuffle(ent)
    for s, (a, b) in zip(steps, ent):
        s["mean_entropy"], s["max_entropy"] = a, b
    return recs


def test_ablation_finds_the_features_that_carry_the_signal(tmp_path):
    tables = tmp_path / "tables"
    tables.mkdir()
    for sl, n, seed in (("train", 400, 1), ("calib", 300, 2), ("test", 300, 3)):
        write_jsonl(tables / f"{sl}.jsonl", entropy_shuffled(n, seed, sl))
    out = tmp_path / "abl.md"
    proc = subprocess.run([sys.executable, str(ROOT / "ablate.py"), "--tables", str(tables), "--out", str(out),
                           "--seeds", "2", "--iters", "300", "--skip", "learning_curve", "--target-relative", "0.9"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.with_suffix(".json").read_text())
    f = res["features"]
    cost = {k: v["hindsight_cost"]["mean"] for k, v in f.items()}
    # measured here (2 seeds): all 0.33, without logprob 0.79, only logprob 0.33, only entropy 0.84
    assert cost["without logprob"] > cost["all"] + 0.2, cost
    assert cost["only entropy"] > cost["all"] + 0.2, cost
    assert cost["only logprob"] < cost["all"] + 0.1, cost
    assert cost["only text flags"] > 0.9, cost          # always escalating at the last step at best
    # the handcrafted single-feature routers, calibrated the same way, cost more (0.68 here)
    best = res["baselines"][res["best_handcrafted"]]
    assert f["all"]["relative_cost"]["mean"] < best["relative_cost"], (f["all"], best)
    # each seed's cost minus the best handcrafted router's, seed 0 with a paired interval around it
    for run in f["all"]["runs"]:
        assert abs(run["vs_ref"] - (run["relative_cost"] - best["relative_cost"])) < 1e-9
    lo, hi = f["all"]["vs_best_handcrafted_ci_seed0"]
    assert lo <= f["all"]["runs"][0]["vs_ref"] <= hi and hi < 0, (lo, hi)
    # the tries section ran on the same tables, and the report names every variant
    assert set(res["tries"]) == {"token statistics (the method)", "+ running answer",
                                 "linear policy (no hidden layer)", "smaller MLP (one hidden layer of 16)",
                                 "exact-expectation gradient (no sampling)"}
    text = out.read_text()
    for name in f:
        assert f"| {name} |" in text


def test_test_after_measures_only_the_later_test_lines(tmp_path):
    tables = tmp_path / "tables"
    tables.mkdir()
    recs = {}
    for sl, n, seed in (("train", 60, 1), ("calib", 60, 2), ("test", 80, 3)):
        recs[sl] = make_records(n, seed=seed, id_prefix=sl)
        write_jsonl(tables / f"{sl}.jsonl", recs[sl])
    out = tmp_path / "abl.md"
    proc = subprocess.run([sys.executable, str(ROOT / "ablate.py"), "--tables", str(tables), "--out", str(out),
                           "--skip", "features", "learning_curve", "tries", "--test-after", "50"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.with_suffix(".json").read_text())
    later = recs["test"][50:]
    assert res["meta"]["n"]["test"] == 30 and "after the first 50" in out.read_text()
    import table as tb
    t = tb.outcome_table(later, tb.Pricing(1.0, 1.0, 7.0, 7.0))
    small, large = t.small_correct.mean().item(), t.large_correct.mean().item()
    assert small != tb.outcome_table(recs["test"], tb.Pricing(1.0, 1.0, 7.0, 7.0)).small_correct.mean().item()
    assert abs(res["baselines"]["small"]["accuracy"] - small) < 1e-12
    assert abs(res["baselines"]["large"]["accuracy"] - large) < 1e-12
    assert abs(res["test_target"] - 0.95 * large) < 1e-12
    proc = subprocess.run([sys.executable, str(ROOT / "ablate.py"), "--tables", str(tables), "--out", str(out),
                           "--skip", "features", "learning_curve", "tries", "--test-after", "80"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--test-after 80" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_table_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "ablate.py"), "--tables", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no train.jsonl" in proc.stderr and "Traceback" not in proc.stderr


def test_probe_scores_are_out_of_fold_on_train_and_fitted_on_train_elsewhere(tiny_table, tmp_path, monkeypatch):
    """The probe try on the tiny pool: states from probe.py, the probe's settings chosen by
    out-of-fold AUC on the training questions, train scored out of fold, calib/test by the
    probe fitted on all training questions; padded steps score 0."""
    import types
    import probe
    import table as tb
    import train_policy as tp
    monkeypatch.chdir(tmp_path)   # the hidden-state cache goes to ./runs/hidden
    recs = tiny_table["records"]
    parts = {"train": recs[2:6], "calib": recs[:2], "test": recs[6:8]}   # train: 2 right, 2 wrong
    paths = {sl: write_jsonl(tmp_path / f"{sl}.jsonl", r) for sl, r in parts.items()}
    tabs = {sl: tp.build_table(r, tb.Pricing(1.0, 1.0, 1.0, 1.0)) for sl, r in parts.items()}
    args = types.SimpleNamespace(probe_dtype="float32", probe_layer=0, probe_folds=2, tables=str(tmp_path))
    hidden = {sl: probe.hidden_for_table(paths[sl], None) for sl in paths}
    scores, info = ablate.probe_scores(hidden, parts, tabs, args, "wrong")

    def rows(sl):
        h = probe.hidden_for_table(paths[sl])["hidden"]
        X = torch.stack([h[r["id"]][t, 0].float() for r in parts[sl] for t in range(len(r["small"]["steps"]))])
        y = torch.tensor([0.0 if r["small"]["correct"] else 1.0 for r in parts[sl] for _ in r["small"]["steps"]])
        g = [i for i, r in enumerate(parts[sl]) for _ in r["small"]["steps"]]
        return X, y, g

    def placed(sl, values):
        out = torch.zeros(tabs[sl].Q, tabs[sl].T, dtype=torch.float64)
        it = iter(values.tolist())
        for qi, r in enumerate(parts[sl]):
            for t in range(len(r["small"]["steps"])):
                out[qi, t] = next(it)
        return out

    Xtr, ytr, gtr = rows("train")
    aucs = {(l2, dim): probe.auc(probe.cross_fit(Xtr, ytr, gtr, folds=2, l2=l2, seed=0, dim=dim), ytr)
            for l2, dim in probe.PROBE_GRID if dim is None or dim < Xtr.shape[0]}
    assert info["train_oof_auc"] == max(aucs.values())
    assert aucs[(info["l2"], info["dim"])] == info["train_oof_auc"]
    oof = probe.cross_fit(Xtr, ytr, gtr, folds=2, l2=info["l2"], seed=0, dim=info["dim"])
    assert torch.allclose(scores["train"], placed("train", oof))
    fitted = probe.fit_probe(Xtr, ytr, l2=info["l2"], dim=info["dim"])
    for sl in ("calib", "test"):
        X, _, _ = rows(sl)
        assert torch.allclose(scores[sl], placed(sl, fitted.score(X)))
        assert (scores[sl][~tabs[sl].mask] == 0).all()
    assert (tmp_path / "runs" / "hidden").is_dir()
