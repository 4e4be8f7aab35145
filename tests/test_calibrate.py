"""calibrate.py: exact first-crossing scoring, the threshold choice (plain and fixed-sequence
Clopper-Pearson), and the end-to-end claim on held-out synthetic questions."""
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import calibrate as cb  # noqa: E402
import train_policy as tp  # noqa: E402
from rollout import UsageError  # noqa: E402
from synthetic import make_records, run_parallel, write_jsonl  # noqa: E402

torch.set_num_threads(1)
FLOPS = SimpleNamespace(prompt_cost=0.0, price_small=None, price_large=None)


def table_of(records):
    return tp.build_table(records, tp.pricing_from_args(FLOPS, records))


def test_first_crossing_by_hand():
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.9], [0.7, 0.2, 0.0, 0.0], [0.4, 0.4, 0.4, 0.0]])
    mask = torch.tensor([[True] * 4, [True, True, False, False], [True, True, True, False]])
    esc = cb.first_crossing(scores, mask, torch.tensor([0.0, 0.3, 0.4, 0.6, 0.95]))
    assert esc.tolist() == [[0, 0, 0],      # kappa 0: step 1 everywhere
                            [1, 0, 0],      # 0.3
                            [1, 0, 0],      # 0.4: >= is a crossing
                            [3, 0, 4],      # 0.6: q2 never (T = 4)
                            [4, 4, 4]]      # 0.95: never


def test_sweep_equals_first_crossing_scoring():
    tab = table_of(make_records(300, 3))
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 20, tab.mask.shape, generator=gen).double() / 20   # many ties
    grid = torch.linspace(-0.1, 1.1, 57, dtype=torch.float64)
    fast = cb.sweep(tab, scores, grid)
    slow = cb.score_routes(tab, cb.first_crossing(scores, tab.mask, grid))
    for k in ("accuracy", "relative_cost", "large_share"):
        assert torch.allclose(fast[k], slow[k], rtol=1e-12, atol=1e-12), k
    # the ends of the sweep are the small model and "escalate at step 1"
    assert fast["accuracy"][-1].item() == tab.small_correct.mean().item()
    assert fast["accuracy"][0].item() == tab.esc_correct[:, 0].mean().item()


def test_clopper_pearson():
    tail = cb.binomial_upper_tail(10, 0.5)
    assert tail[0].item() == pytest.approx(1.0) and tail[10].item() == pytest.approx(0.5 ** 10)
    assert tail[6].item() == pytest.approx(sum(math.comb(10, j) for j in range(6, 11)) / 1024)
    # k = n: the bound solves p^n = delta
    assert cb.clopper_pearson_lower(20, 20, 0.1) == pytest.approx(0.1 ** (1 / 20), abs=1e-9)
    assert cb.clopper_pearson_lower(0, 20, 0.1) == 0.0
    stats = pytest.importorskip("scipy.stats")
    for k, n, d in [(90, 100, 0.05), (1, 7, 0.2), (870, 1000, 0.1)]:
        assert cb.clopper_pearson_lower(k, n, d) == pytest.approx(stats.beta.ppf(d, k, n - k + 1), abs=1e-9)


def test_delta_choice_is_never_cheaper_than_plain():
    gen = torch.Generator().manual_seed(1)
    for trial in range(30):
        K, n = 40, 200
        acc = torch.sort(torch.rand(K, generator=gen) * 0.4 + 0.6, descending=True).values
        acc = torch.round(acc * n) / n
        cost = torch.linspace(1.0, 0.2, K, dtype=torch.float64) + 0.05 * torch.rand(K, generator=gen)
        grid = torch.linspace(0, 1, K)
        target = 0.6 + 0.35 * trial / 30
        plain = cb.choose_kappa(grid, acc, cost, n, target, None)
        for delta in (0.01, 0.1, 0.5):
            strict = cb.choose_kappa(grid, acc, cost, n, target, delta)
            if strict is not None:
                assert plain is not None and cost[strict] >= cost[plain]
                assert cb.clopper_pearson_lower(int(round(acc[strict].item() * n)), n, delta) >= target - 1e-9


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One policy trained on synthetic questions; separate calibration and test tables."""
    d = tmp_path_factory.mktemp("cal")
    train = table_of(make_records(1500, 11))
    policy, _ = tp.train(train, 0.97 * train.large_correct.mean().item(), iters=300, seed=0)
    tp.save_policy(d / "policy.pt", policy, {"pool": train.pool})
    calib = make_records(1500, 12, id_prefix="c")
    write_jsonl(d / "calib.jsonl", calib)
    return d, policy, table_of(calib), table_of(make_records(3000, 13, id_prefix="t"))


def test_calibrated_policy_meets_target_and_beats_single_features(trained, capsys):
    d, policy, calib, test = trained
    rel = 0.97
    outcomes = {}
    for delta in (None, 0.1):
        out = d / f"cal-{delta}.json"
        argv = ["--policy", str(d / "policy.pt"), "--data", str(d / "calib.jsonl"),
                "--target-relative", str(rel), "--out", str(out)]
        assert cb.main(argv + (["--delta", str(delta)] if delta else [])) == 0
        cal = cb.load_calibration(out)
        assert cal["met"] and cal["accuracy"] >= cal["target"]
        assert cal["target"] == pytest.approx(rel * calib.large_correct.mean().item())
        p = tp.policy_probs(policy, test)
        outcomes[delta] = cb.score_routes(test, cb.first_crossing(p, test.mask, torch.tensor([cal["kappa"]], dtype=torch.float64)))
        outcomes[delta]["calib_cost"] = cal["relative_cost"]
    assert "<- chosen" in capsys.readouterr().out
    test_target = rel * test.large_correct.mean().item()
    # the held-out claim, at level 1 - delta
    assert outcomes[0.1]["accuracy"].item() >= test_target
    assert outcomes[0.1]["calib_cost"] >= outcomes[None]["calib_cost"]
    # single-feature threshold routers calibrated the same way on the same calibration data
    target = rel * calib.large_correct.mean().item()
    best = math.inf
    for name, sign in [("draft_mean_logprob", -1), ("draft_min_logprob", -1),
                       ("draft_mean_entropy", 1), ("draft_max_entropy", 1)]:
        j = tp.FEATURE_NAMES.index(name)
        score = lambda t: sign * t.features[..., j].double()
        grid = cb.kappa_grid(score(calib), calib.mask)
        s = cb.sweep(calib, score(calib), grid)
        i = cb.choose_kappa(grid, s["accuracy"], s["relative_cost"], calib.Q, target, None)
        r = cb.sweep(test, score(test), grid[i:i + 1])
        best = min(best, r["relative_cost"].item())
    # measured: policy ~0.40 vs best single feature ~0.74 of the all-large cost
    assert outcomes[None]["relative_cost"].item() < 0.8 * best
    assert outcomes[None]["accuracy"].item() >= test_target - 0.015


def test_no_kappa_meets_target(trained, capsys):
    d, *_ = trained
    out = d / "impossible.json"
    assert cb.main(["--policy", str(d / "policy.pt"), "--data", str(d / "calib.jsonl"),
                    "--target-accuracy", "1.0", "--out", str(out)]) == 0
    cal = cb.load_calibration(out)
    assert cal["met"] is False and cal["kappa"] == 0.0 and cal["target_spec"] == {"accuracy": 1.0}
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("no kappa meets the target accuracy 1.0000")


def test_load_calibration_errors(tmp_path):
    with pytest.raises(UsageError, match="no such calibration file"):
        cb.load_calibration(tmp_path / "nope.json")
    (tmp_path / "c.json").write_text(json.dumps({"kappa": 0.5, "target": 0.9}))
    with pytest.raises(UsageError, match="c.json: missing key"):
        cb.load_calibration(tmp_path / "c.json")


def test_bad_inputs_exit_2_with_one_line(trained, tmp_path):
    d, *_ = trained
    blob = torch.load(d / "policy.pt", weights_only=True)
    blob["feature_names"] = blob["feature_names"][:-1] + ["verifier_score"]
    torch.save(blob, tmp_path / "future.pt")
    base = ["calibrate.py", "--data", str(d / "calib.jsonl"), "--out", str(tmp_path / "c.json")]
    cases = [
        (["--policy", str(tmp_path / "future.pt"), "--target-relative", "0.9"],
         f"{tmp_path / 'future.pt'}: the policy uses features this build does not compute: verifier_score"),
        (["--policy", str(d / "policy.pt"), "--target-relative", "0.9", "--delta", "0"],
         "--delta must be in (0.0, 1.0], got 0.0"),
    ]
    for res, (_, message) in zip(run_parallel([base + argv for argv, _ in cases], cwd=ROOT), cases):
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1, res.stderr
        assert lines[0] == f"calibrate.py: error: {message}"
