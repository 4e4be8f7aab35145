"""train_policy.py: features, pricing, table tensors, the two gradient estimators, the
primal-dual loop, determinism, the policy file and one-line errors."""
import dataclasses
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_policy as tp  # noqa: E402
import table as tb  # noqa: E402
from cli import UsageError  # noqa: E402
from synthetic import POOL, make_records, record, run_parallel, step, write_jsonl  # noqa: E402

torch.set_num_threads(1)
FLOPS = SimpleNamespace(prompt_cost=0.0, price_small=None, price_large=None)


def table_of(records, args=FLOPS):
    return tp.build_table(records, tb.pricing_from_args(args, records))


def test_state_features_by_name():
    steps = [step(5, -0.2, -3.0, 0.4, 1.5), step(7, -0.5, -2.0, 0.9, 1.0),
             step(9, -0.3, -4.0, 0.1, 3.0, text="so \\boxed{4}")]
    f1 = dict(zip(tp.FEATURE_NAMES, tp.state_features(30, steps[:1], ended=False)))
    assert f1["step"] == 1 and f1["tokens_so_far"] == 5 and f1["prompt_tokens"] == 30
    assert f1["prev_min_mean_logprob"] == 0.0 and f1["prev_max_max_entropy"] == 0.0  # t = 1
    assert f1["draft_has_boxed"] == 0.0 and f1["ended"] == 0.0
    f3 = dict(zip(tp.FEATURE_NAMES, tp.state_features(30, steps, ended=True)))
    assert f3["draft_mean_logprob"] == -0.3 and f3["draft_min_logprob"] == -4.0
    assert f3["draft_mean_entropy"] == pytest.approx(0.1) and f3["draft_max_entropy"] == 3.0
    assert f3["draft_tokens"] == 9 and f3["step"] == 3 and f3["tokens_so_far"] == 21
    assert f3["prev_min_mean_logprob"] == -0.5 and f3["prev_min_min_logprob"] == -3.0
    assert f3["prev_max_mean_entropy"] == 0.9 and f3["prev_max_max_entropy"] == 1.5
    assert f3["draft_has_boxed"] == 1.0 and f3["ended"] == 1.0
    assert len(f3) == len(tp.FEATURE_NAMES)


def test_table_costs_by_hand():
    # small params 1e9 -> 2e9 FLOPs per generated token, large 7e9 -> 1.4e10; R = 0.5
    recs = [record("a", [step(10), step(20)], [(100, True), (50, False)], small_correct=False),
            record("b", [], [], small_correct=True, prompt=8)]
    args = SimpleNamespace(prompt_cost=0.5, price_small=None, price_large=None)
    t = table_of(recs, args)
    s, l = 2e9, 14e9
    assert t.mask.tolist() == [[True, True], [False, False]] and t.n_steps.tolist() == [2, 0]
    # escalate at step 1: small step 1 (10) + small prompt 10, large 100 tokens + prompt 10
    assert t.esc_cost[0, 0].item() == pytest.approx(s * 10 + 0.5 * s * 10 + l * 100 + 0.5 * l * 10)
    # escalate at step 2: small steps 1..2 (30) + prompt, large 50 tokens + prompt 10+10
    assert t.esc_cost[0, 1].item() == pytest.approx(s * 30 + 0.5 * s * 10 + l * 50 + 0.5 * l * 20)
    assert t.small_cost[0].item() == pytest.approx(s * 30 + 0.5 * s * 10)
    assert t.large_cost[0].item() == pytest.approx(l * 100 + 0.5 * l * 10)   # no small cost
    assert t.esc_correct[0].tolist() == [1.0, 0.0] and t.large_correct.tolist() == [1.0, 1.0]
    # n = 0: the large outcome is the small one, all-large cost = small cost
    assert t.large_cost[1].item() == t.small_cost[1].item() == pytest.approx(0.5 * s * 8)
    assert t.large_tokens[1].item() == 0 and t.small_correct[1].item() == 1.0
    # dollar prices (per million prompt / generated tokens) replace FLOPs; IN,OUT or IN OUT
    for small, large in ((["1", "2"], ["3", "4"]), (["1,2"], ["3,4"])):
        d = table_of(recs, SimpleNamespace(prompt_cost=0.0, price_small=small, price_large=large))
        assert d.esc_cost[0, 1].item() == pytest.approx((2 * 30 + 1 * 10 + 4 * 50 + 3 * 20) / 1e6)
        assert d.large_cost[0].item() == pytest.approx((4 * 100 + 3 * 10) / 1e6)   # large alone
        assert d.pricing.unit == "dollars" and d.pricing.large_out == pytest.approx(4e-6)
    with pytest.raises(UsageError, match="--price-small takes IN,OUT"):
        table_of(recs, SimpleNamespace(prompt_cost=0.0, price_small=["1,2,3"], price_large=["3,4"]))


def test_one_pool_per_table():
    other = {"small": {"model": "s", "params": 1}, "large": {"model": "l", "params": 2}}
    recs = [record("a", [step(1)], [(1, True)], True), record("b", [step(1)], [(1, True)], True, pool=other)]
    with pytest.raises(UsageError, match="'b'"):
        table_of(recs)


def test_training_cost_is_the_reported_relative_cost():
    """Costs are divided by the MEAN all-large cost of the training questions, so the mean
    episode cost is sum(costs) / sum(all-large costs), what calibration and evaluation report.
    Here the all-large costs differ threefold (a per-question normalisation gives another number)."""
    recs = [record("a", [step(10), step(10)], [(10, True), (5, False)], small_correct=False),
            record("b", [step(30)], [(30, True)], small_correct=True)]
    t = tp.build_table(recs, tb.Pricing(0.0, 1.0, 0.0, 10.0, unit="dollars"))
    assert t.large_cost.tolist() == [100.0, 300.0]
    correct, cost = tp.episode_values(t)
    # a: escalate at 1 (10 + 100), at 2 (20 + 50), never (20); b: at 1 (30 + 300), never (30)
    assert cost[0].tolist() == pytest.approx([110 / 200, 70 / 200, 20 / 200])
    assert cost[1, [0, 2]].tolist() == pytest.approx([330 / 200, 30 / 200])
    pol = tp.Policy()
    pol.fit_normalisation(t.features, t.mask)
    with torch.no_grad():
        p = tp.policy_probs(pol, t)
        _, stats = tp.lagrangian(pol, t.features, t.mask, correct, cost, 0.0, 0.5, "exact")
        p_esc, p_never = tp.escalation_distribution(p, t.mask)
        reported = t.relative_cost((p_esc * t.esc_cost).sum(-1) + p_never * t.small_cost).item()
    assert stats["cost"] == pytest.approx(reported, rel=1e-6)


def test_every_training_flag_reaches_training(tmp_path):
    """Each training flag, given two values, gives two different policies (so none is parsed
    and then dropped on the way to train()), and every TrainConfig field has a flag."""
    data = write_jsonl(tmp_path / "t.jsonl", make_records(120, 3))
    base = ["--train", data, "--target-relative", "0.95", "--iters", "15", "--batch-size", "32"]
    args = tp.build_parser().parse_args([*base, "--out", "x.pt"])
    assert {f.name for f in dataclasses.fields(tp.TrainConfig)} <= set(vars(args))
    assert tp.config_from_args(args) == dataclasses.replace(tp.TrainConfig(), iters=15, batch_size=32)
    other = {"--hidden": ["8"], "--activation": ["relu"], "--features": ["draft_mean_logprob,step"],
             "--iters": ["14"], "--batch-size": ["16"], "--episodes": ["3"], "--lr": ["0.05"],
             "--lambda-lr": ["5"], "--lambda-init": ["9"], "--logit-l2": ["3"],
             "--estimator": ["exact"], "--seed": ["1"]}
    assert {f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(tp.TrainConfig)} == set(other)
    tab = table_of(make_records(120, 3))

    def probs(extra, name):
        assert tp.main([*base, *extra, "--out", str(tmp_path / f"{name}.pt")]) == 0
        return tp.policy_probs(tp.load_policy(tmp_path / f"{name}.pt"), tab)

    ref = probs([], "ref")
    assert torch.equal(ref, probs([], "ref2"))                  # deterministic: a change is the flag's
    for flag, value in other.items():
        p = probs([flag, *value], flag[2:])
        assert not torch.allclose(p, ref, atol=1e-6), flag


def test_escalation_distribution():
    p = torch.tensor([[0.5, 0.2, 0.9], [0.3, 0.7, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    p_esc, p_never = tp.escalation_distribution(p, mask)
    assert p_esc[0].tolist() == pytest.approx([0.5, 0.5 * 0.2, 0.5 * 0.8 * 0.9])
    assert p_never[0].item() == pytest.approx(0.5 * 0.8 * 0.1)
    assert p_esc[1].tolist() == pytest.approx([0.3, 0.0, 0.0]) and p_never[1].item() == pytest.approx(0.7)
    assert (p_esc.sum(-1) + p_never).tolist() == pytest.approx([1.0, 1.0])


def small_setup(n=64, seed=5):
    tab = table_of(make_records(n, seed))
    torch.manual_seed(0)
    pol = tp.Policy()
    pol.fit_normalisation(tab.features, tab.mask)
    return tab, pol


def test_reinforce_gradient_matches_exact_on_average():
    tab, pol = small_setup()
    correct, cost = tp.episode_values(tab)

    def grad(estimator, gen=None):
        pol.zero_grad()
        loss, _ = tp.lagrangian(pol, tab.features, tab.mask, correct, cost, 1.3, 0.9,
                                estimator, 16, gen)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in pol.parameters()]).clone()

    exact = grad("exact")
    gen = torch.Generator().manual_seed(1)
    mean = torch.stack([grad("reinforce", gen) for _ in range(200)]).mean(0)  # 3,200 episodes/question
    # measured: relative error ~1% at 200 draws; a wrong sign or a biased baseline fails this
    assert ((mean - exact).norm() / exact.norm()).item() < 0.05
    assert torch.nn.functional.cosine_similarity(mean, exact, 0).item() > 0.995


def exact_lagrangian(pol, tab, lam, target):
    correct, cost = tp.episode_values(tab)
    with torch.no_grad():
        return tp.lagrangian(pol, tab.features, tab.mask, correct, cost, lam, target, "exact")[0].item()


@pytest.mark.parametrize("estimator", ["reinforce", "exact"])
def test_training_improves_lagrangian(estimator):
    tab = table_of(make_records(300, 7))
    kw = dict(iters=150, lambda_lr=0.0, lambda_init=2.0, estimator=estimator, seed=3)
    before, _ = tp.train(tab, 0.9, **{**kw, "iters": 0})
    after, lam = tp.train(tab, 0.9, **kw)
    assert lam == 2.0
    l0, l1 = exact_lagrangian(before, tab, 2.0, 0.9), exact_lagrangian(after, tab, 2.0, 0.9)
    assert l1 < l0 - 0.1, (l0, l1)


def test_lambda_follows_the_constraint():
    tab = table_of(make_records(200, 8))
    up, down = [], []
    tp.train(tab, 1.0, iters=40, lambda_lr=0.5, log=up.append)        # accuracy < 1: lambda rises
    lams = [h["lambda"] for h in up]
    assert all(h["accuracy"] < 1.0 for h in up) and all(b > a for a, b in zip(lams, lams[1:]))
    tp.train(tab, 0.0, iters=40, lambda_lr=0.5, lambda_init=1.0, log=down.append)  # over target
    lams = [h["lambda"] for h in down]
    assert all(b <= a for a, b in zip(lams, lams[1:])) and lams[-1] == 0.0


def test_main_outputs_and_determinism(tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", make_records(300, 9))
    common = ["--train", data, "--target-relative", "0.97", "--iters", "60", "--seed", "4"]
    assert tp.main([*common, "--out", str(tmp_path / "a" / "policy.pt")]) == 0
    assert tp.main([*common, "--out", str(tmp_path / "b" / "policy.pt")]) == 0
    assert tp.main([*common[:-1], "5", "--out", str(tmp_path / "c" / "policy.pt")]) == 0
    a, b, c = (tp.load_policy(tmp_path / d / "policy.pt") for d in "abc")
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    log = [json.loads(line) for line in (tmp_path / "a" / "policy.log.jsonl").read_text().splitlines()]
    assert len(log) == 60 and set(log[0]) >= {"iter", "lambda", "accuracy", "cost", "loss"}
    assert (tmp_path / "a" / "policy.curve.png").stat().st_size > 1000
    assert a.meta["target_spec"] == {"relative": 0.97} and a.meta["pool"] == POOL
    assert a.feature_names == tp.BASE_FEATURES   # the PRM features only --with-prm
    assert "trained 60 iterations in" in capsys.readouterr().out


def test_feature_subset_and_policy_file_errors(tmp_path):
    tab = table_of(make_records(50, 10))
    pol, _ = tp.train(tab, 0.9, iters=5, features=["draft_max_entropy", "step"])
    tp.save_policy(tmp_path / "p.pt", pol, {"x": 1})
    back = tp.load_policy(tmp_path / "p.pt")
    assert back.feature_names == ["draft_max_entropy", "step"] and back.meta == {"x": 1}
    assert torch.equal(back(tab.features), pol(tab.features))   # raw full feature vectors in
    with pytest.raises(UsageError, match="no such policy file"):
        tp.load_policy(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(UsageError, match="junk.pt: not a readable policy file"):
        tp.load_policy(tmp_path / "junk.pt")
    blob = torch.load(tmp_path / "p.pt", weights_only=True)
    blob["feature_names"] = ["draft_max_entropy", "prm_score"]
    torch.save(blob, tmp_path / "future.pt")
    with pytest.raises(UsageError, match="does not compute: prm_score"):
        tp.load_policy(tmp_path / "future.pt")


@pytest.mark.parametrize("argv, message", [
    (["--target-accuracy", "1.5"], "--target-accuracy must be in"),
    (["--target-relative", "0.9", "--lr", "0"], "--lr must be in"),
    (["--target-relative", "0.9", "--episodes", "1"], "--episodes must be in"),
    (["--target-relative", "0.9", "--features", "step,nope"], "--features: unknown nope"),
    (["--target-relative", "0.9", "--price-small", "1", "2"], "go together"),
    (["--target-relative", "0.9", "--price-small", "1,x", "--price-large", "1,2"], "--price-small takes IN,OUT"),
    ([], "one of the arguments --target-accuracy --target-relative is required"),
])
def test_bad_flags_raise_usage_error(tmp_path, argv, message):
    data = write_jsonl(tmp_path / "t.jsonl", make_records(5, 1))
    with pytest.raises(UsageError, match=message):
        tp.main(["--train", data, "--out", str(tmp_path / "p.pt"), *argv])


def test_out_is_required(tmp_path):
    data = write_jsonl(tmp_path / "t.jsonl", make_records(5, 1))
    with pytest.raises(UsageError, match="required: --out"):
        tp.main(["--train", data, "--target-relative", "0.9"])


def test_bad_tables_exit_2_with_one_line(tmp_path):
    good = json.dumps(make_records(1, 0)[0])
    (tmp_path / "schema2.jsonl").write_text(good.replace('"schema": 1', '"schema": 2') + "\n")
    (tmp_path / "badline.jsonl").write_text(good + "\n" + good.replace("syn/0", "syn/1")[:-5] + "\n")
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "nosteps.jsonl").write_text(json.dumps(record("z", [], [], True)) + "\n")
    argv = lambda name: ["--train", str(tmp_path / f"{name}.jsonl"), "--target-relative", "0.9",
                         "--out", str(tmp_path / f"{name}.pt"),
                         "--prompt-cost", "1"]    # else the n = 0 table's all-large cost is 0
    with pytest.raises(UsageError, match="empty.jsonl: the table has no questions"):
        tp.main(argv("empty"))
    with pytest.raises(UsageError, match="no small steps"):
        tp.main(argv("nosteps"))
    # files that are no table: a policy file, plain text named .gz, gzip named .jsonl, binary
    tp.save_policy(tmp_path / "policy.pt", tp.Policy(hidden=[4]), {})
    (tmp_path / "plain.jsonl.gz").write_text(good + "\n")
    (tmp_path / "zipped.jsonl").write_bytes(__import__("gzip").compress((good + "\n").encode()))
    (tmp_path / "binary.jsonl").write_bytes(b"\x80\x04\x95" + bytes(range(256)))
    cases = {"schema2.jsonl": "schema2.jsonl:1: schema 2, this code reads schema 1",
             "badline.jsonl": "badline.jsonl:2: not valid JSON",
             "policy.pt": f"{tmp_path / 'policy.pt'}: a zip archive (a policy file from train_policy.py?)",
             "plain.jsonl.gz": f"{tmp_path / 'plain.jsonl.gz'}: named .gz but not gzip-compressed",
             "zipped.jsonl": f"{tmp_path / 'zipped.jsonl'}: gzip-compressed but not named .gz",
             "binary.jsonl": f"{tmp_path / 'binary.jsonl'}: not UTF-8 text"}
    results = run_parallel([["train_policy.py", "--train", str(tmp_path / name), "--target-relative", "0.9",
                             "--out", str(tmp_path / f"out-{name}.pt")] for name in cases], cwd=ROOT)
    for (name, message), res in zip(cases.items(), results):
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1, (name, res.stderr)
        assert lines[0].startswith("train_policy.py: error: ") and message in lines[0], lines[0]


def test_a_table_whose_large_model_gets_nothing_right_warns(tmp_path, capsys):
    recs = make_records(40, 3)
    for r in recs:
        for e in r["escalations"]:
            e["correct"] = False
    data = write_jsonl(tmp_path / "wrong.jsonl", recs)
    assert tp.main(["--train", data, "--target-accuracy", "0.5", "--iters", "2",
                    "--out", str(tmp_path / "p.pt")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [f"warning: {data}: the large model gets none of the 40 questions right: a relative "
                   f"target is 0 there and every router meets it; check the gold answers and the "
                   f"grading (data.py), or the pool"]
    ok = write_jsonl(tmp_path / "ok.jsonl", make_records(40, 4, id_prefix="ok"))
    assert tp.main(["--train", ok, "--target-accuracy", "0.5", "--iters", "2", "--out", str(tmp_path / "q.pt")]) == 0
    assert capsys.readouterr().err == ""
