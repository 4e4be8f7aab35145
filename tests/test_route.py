"""route.py: live routing reproduces exactly what the trajectory table predicts."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import calibrate
import route
import train_policy
from rollout import extract_answer

ROOT = Path(__file__).resolve().parents[1]


def test_forced_escalation_matches_the_table(tiny_table, tiny_lms):
    """For every question and every escalation point K (0 = the large model alone, K > n =
    never), the live run is the table's run: same accepted steps, same answer, same tokens."""
    small, large = tiny_lms
    checked = 0
    for r in tiny_table["records"][:5]:
        steps, n = r["small"]["steps"], len(r["small"]["steps"])
        for K in range(0, n + 2):
            run = route.route(r["question"], small, large, None, None, 96, escalate_at=K)
            live_small = [s for s in run["steps"] if s["model"] == "small"]
            accepted = [s["text"] for s in live_small if s["accepted"]]
            if 1 <= K <= n or K == 0:
                esc = r["escalations"][max(K - 1, 0)]
                assert run["escalated_at"] == K
                assert accepted == [s["text"] for s in steps[:max(K - 1, 0)]]
                if K:
                    assert live_small[-1]["text"] == steps[K - 1]["text"]  # the dropped draft
                    assert not live_small[-1]["accepted"]
                assert run["answer"] == esc["answer"]
                assert run["tokens"] == {"small": sum(s["tokens"] for s in steps[:K]),
                                         "large": esc["tokens"]}
                assert "".join(s["text"] for s in run["steps"] if s["model"] == "large") \
                    == esc["text"]
            else:  # the small model finished before step K: no escalation
                assert run["escalated_at"] is None
                assert accepted == [s["text"] for s in steps]
                assert run["answer"] == r["small"]["answer"] == extract_answer(run["solution"])
                assert run["tokens"]["large"] == 0
            checked += 1
    assert checked >= 15


@pytest.fixture(scope="module")
def trained(tiny_table, tmp_path_factory):
    d = tmp_path_factory.mktemp("policy")
    policy, calib = d / "policy.pt", d / "calibration.json"
    train_policy.main(["--train", str(tiny_table["out"]), "--target-relative", "0.9",
                       "--out", str(policy), "--iters", "60", "--seed", "0"])
    calibrate.main(["--policy", str(policy), "--data", str(tiny_table["out"]),
                    "--target-relative", "0.9", "--out", str(calib)])
    return policy, calib


def test_policy_routing_matches_the_threshold_rule_on_the_table(trained, tiny_table, tiny_pool):
    """route.py --json with the trained policy escalates where the table's features and the
    calibrated kappa say it must, and its answer is the table's answer for that route."""
    policy_path, calib_path = trained
    policy = train_policy.load_policy(policy_path)
    kappa = calibrate.load_calibration(calib_path)["kappa"]
    for r in tiny_table["records"][:3]:
        steps = r["small"]["steps"]
        n = len(steps)
        feats = [train_policy.state_features(r["small"]["prompt_tokens"], steps[:t], t == n)
                 for t in range(1, n + 1)]
        with torch.no_grad():
            p = policy(torch.tensor(feats, dtype=torch.float32)).tolist()
        expect = next((t + 1 for t in range(n) if p[t] >= kappa), None)
        out = subprocess.run(
            [sys.executable, str(ROOT / "route.py"), "--policy", str(policy_path),
             "--calibration", str(calib_path), "--small", str(tiny_pool["small"]),
             "--large", str(tiny_pool["large"]), "--dtype", "float32", "--max-new-tokens", "96",
             "--json", r["question"]],
            capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert out.returncode == 0, out.stderr
        run = json.loads(out.stdout.strip().splitlines()[-1])
        assert run["escalated_at"] == expect
        want = r["small"]["answer"] if expect is None else r["escalations"][expect - 1]["answer"]
        assert run["answer"] == want
        drafts = [s for s in run["steps"] if s["model"] == "small"]
        assert [s["p_escalate"] for s in drafts] == pytest.approx(p[:len(drafts)], abs=1e-5)
        assert "answer:" in out.stderr  # the human-readable display went to stderr


def run_route(*args):
    return subprocess.run([sys.executable, str(ROOT / "route.py"), *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_bad_input_is_one_line_and_exit_2(trained, tmp_path):
    policy, calib = trained
    bad_policy = tmp_path / "bad.pt"
    obj = torch.load(policy, weights_only=False)
    names = obj["feature_names"] if "feature_names" in obj else None
    cases = [
        (["--policy", str(tmp_path / "nope.pt"), "--calibration", str(calib), "q?"], "nope.pt"),
        (["--policy", str(policy), "--calibration", str(tmp_path / "no.json"), "q?"], "no.json"),
        (["--policy", str(policy), "--calibration", str(calib), "  "], "question"),
        (["--calibration", str(calib), "q?"], "--policy"),
    ]
    if names is not None:
        obj["feature_names"] = names[:-1] + ["a_feature_this_build_lacks"]
        torch.save(obj, bad_policy)
        cases.append((["--policy", str(bad_policy), "--calibration", str(calib), "q?"],
                      "a_feature_this_build_lacks"))
    for args, needle in cases:
        r = run_route(*args)
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert r.returncode == 2 and len(lines) == 1, (args, r.stderr)
        assert lines[0].startswith("route.py: error:") and needle in lines[0], lines[0]
