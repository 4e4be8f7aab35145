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
import table as tb  # noqa: E402
from cli import UsageError  # noqa: E402
from synthetic import make_records, run_parallel, write_jsonl  # noqa: E402

torch.set_num_threads(1)
FLOPS = SimpleNamespace(prompt_cost=0.0, price_small=None, price_large=None)


def table_of(records):
    return tp.build_table(records, tb.pricing_from_args(FLOPS, records))


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
    slow = tb.score_routes(tab, cb.first_crossing(scores, tab.mask, grid))
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


def choose(acc, cost, n, target, delta, gen=None):
    """choose_threshold on 0/1 outcomes with the given accuracies (rows of n questions)."""
    successes = torch.round(acc * n).long()
    correct = (torch.arange(n)[None, :] < successes[:, None]).double()
    if gen is not None:                               # shuffle each row's questions
        correct = torch.stack([row[torch.randperm(n, generator=gen)] for row in correct])
    return cb.choose_threshold(acc, cost, lambda a, b: correct[a:b], torch.ones(n),
                               {"accuracy": target}, delta, chunk=7)


def test_plain_choice_is_the_cheapest_meeting_and_delta_never_cheaper():
    gen = torch.Generator().manual_seed(1)
    for trial in range(30):
        K, n = 40, 200
        acc = torch.sort(torch.rand(K, generator=gen) * 0.4 + 0.6, descending=True).values
        acc = torch.round(acc.double() * n) / n      # float64: compared with the target in float64
        cost = torch.linspace(1.0, 0.2, K, dtype=torch.float64) + 0.05 * torch.rand(K, generator=gen)
        target = 0.6 + 0.35 * trial / 30
        plain = choose(acc, cost, n, target, None)
        # the plain rule, against a brute-force loop: the cheapest threshold that meets the target
        meeting = [i for i in range(K) if acc[i].item() >= target - 1e-12]
        if not meeting:
            assert plain is None
        else:
            assert plain == min(meeting, key=lambda i: cost[i].item())
            assert acc[plain].item() >= target - 1e-12
        for delta in (0.01, 0.1, 0.5):
            strict = choose(acc, cost, n, target, delta)
            if strict is not None:
                assert plain is not None and cost[strict] >= cost[plain]
                assert cb.clopper_pearson_lower(int(round(acc[strict].item() * n)), n, delta) >= target - 1e-9
                # fixed sequence: every threshold before the chosen one passes too
                assert all(cb.clopper_pearson_lower(int(round(a * n)), n, delta) >= target - 1e-9
                           for a in acc[:strict + 1].tolist())


def test_betting_bound_by_hand():
    # all x = 0.5 in [-1, 1], n = 10: the first bet uses the prior variance 1,
    # lambda_1 = sqrt(2 log 10 / 10); after it the running variance is small and lambda
    # stays at its cap 0.75 (factor 1.375)
    x = torch.full((1, 10), 0.5, dtype=torch.float64)
    lam1 = math.sqrt(2 * math.log(10) / 10)
    assert cb.betting_log_capital(x, -1.0, 0.1).item() == pytest.approx(
        math.log(1 + 0.5 * lam1) + 9 * math.log(1.375), rel=1e-12)
    # a sample whose mean is below 0 never reaches 1/delta here
    gen = torch.Generator().manual_seed(0)
    x = torch.where(torch.rand(200, 400, generator=gen) < 0.45, 1.0, -1.0).double()
    assert (cb.betting_log_capital(x, -1.0, 0.1) >= math.log(10)).double().mean().item() < 0.02
    # ... and one well above 0 does
    x = torch.where(torch.rand(200, 400, generator=gen) < 0.65, 1.0, -1.0).double()
    assert (cb.betting_log_capital(x, -1.0, 0.1) >= math.log(10)).double().mean().item() > 0.95


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
        outcomes[delta] = tb.score_routes(test, cb.first_crossing(p, test.mask, torch.tensor([cal["kappa"]], dtype=torch.float64)))
        outcomes[delta]["calib_cost"] = cal["relative_cost"]
    assert "<- chosen" in capsys.readouterr().out
    test_target = rel * test.large_correct.mean().item()
    # the held-out claim, at level 1 - delta
    assert outcomes[0.1]["accuracy"].item() >= test_target
    assert outcomes[0.1]["calib_cost"] >= outcomes[None]["calib_cost"]
    # single-feature threshold routers calibrated the same way on the same calibration data
    best = math.inf
    for name, sign in [("draft_mean_logprob", -1), ("draft_min_logprob", -1),
                       ("draft_mean_entropy", 1), ("draft_max_entropy", 1)]:
        j = tp.FEATURE_NAMES.index(name)
        score = lambda t: sign * t.features[..., j].double()
        res = cb.calibrate_scores(calib, score(calib), {"relative": rel}, None)
        r = cb.sweep(test, score(test), torch.tensor([res["knob"]], dtype=torch.float64))
        best = min(best, r["relative_cost"].item())
    # measured: policy ~0.40 vs best single feature ~0.74 of the all-large cost
    assert outcomes[None]["relative_cost"].item() < 0.8 * best
    assert outcomes[None]["accuracy"].item() >= test_target - 0.015


def test_relative_delta_holds_over_many_calibration_sets(trained):
    """The population is a large synthetic table: its per-kappa accuracies and its large
    accuracy are KNOWN (computed exactly on all of it). Draw 400 calibration sets of 300
    questions from it; the kappa chosen with --delta 0.1 must meet R x the true large accuracy
    in at least 90% of the draws, and it must be a real threshold (cheaper than always
    escalating) in most draws, so a bound that never accepts fails this test. The plain rule
    misses often on the same draws: the population sits where the guarantee matters."""
    _, policy, *_ = trained
    pop = table_of(make_records(6000, 31, id_prefix="pop"))
    p_pop = tp.policy_probs(policy, pop)
    true_target = 0.95 * pop.large_correct.mean().item()
    always = cb.sweep(pop, p_pop, torch.tensor([0.0], dtype=torch.float64))["relative_cost"].item()

    def true_accuracy(kappa):
        if kappa is None:                             # the large model alone
            return pop.large_correct.mean().item()
        return cb.sweep(pop, p_pop, torch.tensor([kappa], dtype=torch.float64))["accuracy"].item()

    gen = torch.Generator().manual_seed(0)
    misses, plain_misses, useful, draws = 0, 0, 0, 400
    for _ in range(draws):
        cal = tb.select(pop, torch.randint(pop.Q, (300,), generator=gen))   # a calibration set drawn
        p = tp.policy_probs(policy, cal)
        strict = cb.calibrate_scores(cal, p, {"relative": 0.95}, 0.1)
        plain = cb.calibrate_scores(cal, p, {"relative": 0.95}, None)
        misses += true_accuracy(strict["knob"]) < true_target
        plain_misses += true_accuracy(plain["knob"]) < true_target
        useful += strict["knob"] is not None and strict["relative_cost"] < always - 0.05
    assert misses / draws <= 0.1, misses
    assert useful / draws >= 0.8, useful
    assert plain_misses / draws >= 0.2, plain_misses


def test_no_kappa_meets_target_means_the_large_model_alone(trained, capsys):
    d, *_ = trained
    out = d / "impossible.json"
    assert cb.main(["--policy", str(d / "policy.pt"), "--data", str(d / "calib.jsonl"),
                    "--target-accuracy", "1.0", "--out", str(out)]) == 0
    cal = cb.load_calibration(out)
    assert cal["met"] is False and cal["kappa"] is None and cal["fallback"] == "large"
    assert cal["target_spec"] == {"accuracy": 1.0}
    # the point recorded is the large model alone: its accuracy, all-large cost (not a draft + large)
    calib = table_of(make_records(1500, 12, id_prefix="c"))
    assert cal["accuracy"] == pytest.approx(calib.large_correct.mean().item(), abs=1e-12)
    assert cal["relative_cost"] == pytest.approx(1.0, abs=1e-12) and cal["large_share"] == 1.0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("no kappa meets the target accuracy 1.0000")
    assert "large model alone" in err[0]


def test_degenerate_calibration_warns(trained, tmp_path, capsys):
    d, *_ = trained
    recs = make_records(3, 40, id_prefix="few")
    for r in recs:                               # the large model gets none right: target 0
        for e in r["escalations"]:
            e["correct"] = False
    data = write_jsonl(tmp_path / "few.jsonl", recs)
    assert cb.main(["--policy", str(d / "policy.pt"), "--data", data, "--target-relative", "0.9",
                    "--out", str(tmp_path / "c.json")]) == 0
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning")]
    # the table's warning (every stage reading it says so), then what it means for the calibration
    assert len(err) == 2 and err[0].startswith(f"warning: {data}: the large model gets none of the 3")
    assert "the target is 0" in err[1] and "0 of 3" in err[1]
    assert json.loads((tmp_path / "c.json").read_text())["warning"] == err[1]
    ok = write_jsonl(tmp_path / "ok.jsonl", make_records(3, 41, id_prefix="few2"))
    assert cb.main(["--policy", str(d / "policy.pt"), "--data", ok, "--target-relative", "0.9",
                    "--out", str(tmp_path / "c2.json")]) == 0
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning")]
    assert len(err) == 1 and "only 3 calibration questions" in err[0]
    assert cb.degenerate_warning(table_of(make_records(40, 42)), 0.5) is None


def test_kappas_print_readably_and_apart():
    a = 0.7310585786300049
    b = math.nextafter(a, 1.0)
    assert cb.format_kappa(a) == "0.7311" and cb.format_kappa(None) == "large alone"
    assert cb.kappa_digits([0.25, 0.7310585786300049, 0.9]) == 4
    assert cb.kappa_digits([0.73101, 0.73104]) == 5
    d = cb.kappa_digits([a, b])          # neighbouring doubles: as many digits as it takes
    assert d > 12 and cb.format_kappa(a, d) != cb.format_kappa(b, d)
    assert cb.format_kappa(a, d - 1) == cb.format_kappa(b, d - 1)


def test_stored_threshold_sits_between_scores_and_reproduces_in_float32():
    """The reported case: a threshold ON a score, stored in float32, can move past that score
    and give another route. Scores k/1024 - 1e-12 all round UP in float32 (to k/1024), so the
    old grid's threshold (the score v where the chosen route starts escalating) becomes, in
    float32, a threshold above v: the questions escalating at v no longer do, and the
    calibration point changes (here it falls below the target). The chosen threshold sits
    strictly between two distinct scores, and applied again as stored, in float32, or as
    printed, it gives exactly the accuracy and cost the calibration reported, summed as
    evaluate.py sums a router applied again (dollar prices: sums that depend on the order)."""
    tab = tp.build_table(make_records(400, 5), tb.Pricing(0.3e-6, 1.1e-6, 0.7e-6, 9.3e-6, unit="dollars"))
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(1, 1024, tab.mask.shape, generator=gen).double() / 1024 - 1e-12
    values = torch.unique(scores[tab.mask])
    assert (values.float().double() > values).all()                 # every score rounds up
    res = cb.calibrate_scores(tab, scores, {"relative": 0.9}, None)
    knob = res["knob"]
    assert res["met"] and knob is not None and 0 < res["relative_cost"] < 1
    below, above = values[values < knob].max().item(), values[values > knob].min().item()
    assert below < knob < above and knob == (below + above) / 2
    reported = (res["accuracy"], res["relative_cost"])
    for k in (knob, torch.tensor(knob, dtype=torch.float32).item(), float(cb.format_kappa(knob)),
              json.loads(json.dumps(knob))):
        again = tb.score_routes(tab, cb.first_crossing(scores, tab.mask, torch.tensor([k], dtype=torch.float64)))
        assert (again["accuracy"].item(), again["relative_cost"].item()) == reported, k
    # on the score itself (the old grid's threshold): the same route in float64, not in float32
    on = tb.score_routes(tab, cb.first_crossing(scores, tab.mask, torch.tensor([above], dtype=torch.float64)))
    assert (on["accuracy"].item(), on["relative_cost"].item()) == reported
    on32 = tb.score_routes(tab, cb.first_crossing(scores, tab.mask, torch.tensor([above], dtype=torch.float32).double()))
    assert on32["accuracy"].item() < res["target"] <= res["accuracy"]       # 0.865 < 0.86625 <= 0.8675
    # every grid threshold sits between scores; the ends are 0 (always) and 1 (never)
    grid = cb.kappa_grid(scores, tab.mask)
    assert not torch.isin(grid, values).any() and grid[0] == 0.0 and grid[-1] == 1.0
    assert len(grid) == len(values) + 1


def test_calibration_json_reproduces_its_point(trained, capsys):
    """kappa as read back from calibration.json (and rounded to float32), applied to the
    calibration table, gives exactly the accuracy and relative cost recorded beside it; the
    printed thresholds are short."""
    d, policy, *_ = trained
    dollars = ["--price-small", "0.3,1.1", "--price-large", "0.7,9.3"]
    calib = tp.load_table(d / "calib.jsonl", cb.build_parser().parse_args(
        ["--policy", "p", "--data", "d", "--target-relative", "1", "--out", "o", *dollars]))
    for delta in (None, 0.1):
        out = d / f"again-{delta}.json"
        argv = ["--policy", str(d / "policy.pt"), "--data", str(d / "calib.jsonl"),
                "--target-relative", "0.95", "--out", str(out), *dollars]
        assert cb.main(argv + (["--delta", str(delta)] if delta else [])) == 0
        cal = json.loads(out.read_text())
        assert cal["kappa"] is not None
        p = tp.policy_probs(policy, calib)
        assert not (p[calib.mask] == cal["kappa"]).any()
        for k in (cal["kappa"], torch.tensor(cal["kappa"], dtype=torch.float32).item()):
            got = tb.score_routes(calib, cb.first_crossing(p, calib.mask, torch.tensor([k], dtype=torch.float64)))
            assert (got["accuracy"].item(), got["relative_cost"].item()) == \
                (cal["accuracy"], cal["relative_cost"]), (delta, k)
        printed = capsys.readouterr().out.splitlines()
        start = printed.index(f"{'kappa':>12} {'accuracy':>9} {'rel.cost':>9}") + 1
        rows = printed[start:-1]
        kappas = [r.split()[0] for r in rows]
        assert len(rows) >= 2 and len(set(kappas)) == len(kappas)     # told apart ...
        assert all(len(k) <= 10 for k in kappas), kappas               # ... in a few digits, not 17
        chosen = next(r.split()[0] for r in rows if r.endswith("<- chosen"))
        assert printed[-1].startswith(f"kappa {chosen}: ")


def test_overlap_with_training_questions_is_refused(tmp_path):
    train_recs = make_records(200, 50, id_prefix="tr")
    tab = table_of(train_recs)
    policy, _ = tp.train(tab, 0.9, iters=5)
    tp.save_policy(tmp_path / "p.pt", policy, {"question_hashes": tab.hashes})
    # a "calibration" table holding 7 training questions under other ids, spaced differently
    clash = make_records(50, 51, id_prefix="ca")
    for i in range(7):
        clash[i]["question"] = "  " + train_recs[i]["question"].upper().replace(" ", "\n ") + " "
    data = write_jsonl(tmp_path / "clash.jsonl", clash)
    argv = ["--policy", str(tmp_path / "p.pt"), "--data", data, "--target-relative", "0.9",
            "--out", str(tmp_path / "c.json")]
    with pytest.raises(UsageError, match=r"clash.jsonl shares 7 questions with .*p.pt"):
        cb.main(argv)
    assert cb.main(argv + ["--allow-overlap"]) == 0
    cal = json.loads((tmp_path / "c.json").read_text())
    assert cal["question_hashes"] == [tb.question_hash(r["question"]) for r in clash]


def test_question_hash_normalises():
    h = tb.question_hash
    assert h("What is  2+2?") == h(" what is 2+2? ") == h("WHAT\tIS\n2+2?") == h("What is 2\uff0b2?")
    assert h("What is 2+2?") != h("What is 2+3?")
    assert len(h("x")) == 64


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
    strip_out = lambda argv: base[:3] + argv[:-2] if argv[-1:] == [None] else base + argv  # noqa: E731
    cases = [
        (["--policy", str(tmp_path / "future.pt"), "--target-relative", "0.9"],
         f"{tmp_path / 'future.pt'}: the policy uses features this build does not compute: verifier_score"),
        (["--policy", str(d / "policy.pt"), "--target-relative", "0.9", "--delta", "0"],
         "--delta must be in (0.0, 1.0], got 0.0"),
        (["--policy", str(d / "policy.pt"), "--target-relative", "0.9", "--out", None],
         "the following arguments are required: --out"),
    ]
    for res, (_, message) in zip(run_parallel([strip_out(argv) for argv, _ in cases], cwd=ROOT), cases):
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1, res.stderr
        assert lines[0] == f"calibrate.py: error: {message}"


def test_large_alone_when_every_passing_threshold_costs_more():
    """Two questions the small model gets wrong, where only escalating at step 1 is right:
    the only threshold that meets a relative target of 1.0 is "always escalate at step 1",
    which pays for a draft on top of the large model's whole solution. The answer is the
    large model alone: met, kappa null, accuracy = the large model's, relative cost exactly 1."""
    from synthetic import record, step
    import evaluate as ev
    recs = [record("a", [step(10), step(10)], [(20, True), (10, False)], False),
            record("b", [step(5), step(5), step(5)], [(30, True), (20, False), (10, False)], False)]
    t = table_of(recs)
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.8, 0.3]], dtype=torch.float64)
    for delta in (None,):
        res = cb.calibrate_scores(t, scores, {"relative": 1.0}, delta)
        assert res["met"] is True and res["index"] is None and res["knob"] is None
        assert res["accuracy"] == 1.0 and res["relative_cost"] == pytest.approx(1.0, abs=1e-12)
        # what the plain rule accepted was dearer than the large model alone
        plain = cb.choose_threshold(res["swept"]["accuracy"], res["swept"]["relative_cost"],
                                    lambda a, b: None, t.large_correct, {"relative": 1.0}, None)
        assert plain is not None and res["swept"]["relative_cost"][plain] > 1.0
        rnd = ev.calibrate_random(t, {"relative": 1.0}, delta)
        assert rnd["met"] is True and rnd["knob"] is None and rnd["relative_cost"] == pytest.approx(1.0)
    # with delta, two questions certify nothing at R = 1: not met, the large model alone all the same
    res = cb.calibrate_scores(t, scores, {"relative": 1.0}, 0.5)
    assert res["met"] is False and res["index"] is None and res["relative_cost"] == pytest.approx(1.0)
    # a target the small model's own answers meet: a real threshold, cheaper than the large model
    res = cb.calibrate_scores(t, scores, {"accuracy": 0.0}, None)
    assert res["met"] and res["index"] is not None and res["relative_cost"] < 1.0
