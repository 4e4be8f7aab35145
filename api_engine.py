"""The OpenAI-compatible backend: a model of the pool behind any server that speaks the
OpenAI API (vLLM, SGLang, TGI, llama.cpp's server, hosted closed models).

It offers what rollout.py and route.py ask of a model, the same small interface as the
local engine:

    solve(questions, max_new_tokens, on_done)        the greedy solution of each question,
                                                     cut into steps with token statistics
    continue_after(items, max_new_tokens, on_done)   the greedy continuation of each
                                                     (question, accepted steps' text)
    drafter(question, max_new_tokens)                step-by-step drafting (route.py)

How (docs/DESIGN.md, "Backends"):
- The small model's solution is asked for with `logprobs` and `top_logprobs` k (20 by
  default), greedy (temperature 0, seed 0), and cut into steps by the same token rule as the
  local path (a token that completes a blank line ends a step). Mean and min log-probability
  of the chosen tokens are exact; an entropy is computed over the top k plus one bucket
  holding the remaining probability mass (a documented approximation: train and deploy a
  policy on one backend).
- The large model continues after k accepted steps, in the order a server allows
  (`--continuation auto`): raw `/v1/completions` on the chat-templated prompt plus the
  steps' text (`completions`: vLLM, SGLang, TGI, llama.cpp; the template comes from the
  server's `/apply-template` or `/tokenize`+`/detokenize`); else chat completions continuing
  a final assistant message (`prefill`: `continue_final_message`, assistant prefill); else
  the steps in the user turn with a fixed instruction to continue (`instruct`: hosted models
  that allow neither). The table records which one was used.
- Many requests are in flight at once (`concurrency`); a request that meets 429, 5xx, a
  timeout or a dropped connection is retried with exponential backoff and jitter, honouring
  Retry-After; a server that stays down ends the run with one line. A server that refuses or
  drops connections is down once it has done so for DOWN_AFTER seconds (a bound on the
  retries, which --max-retries' backoff alone would stretch past a minute), and one that
  stops listening while it holds connections open (llama.cpp's server after SIGTERM) is
  found by a watchdog (`Connections`) that shuts them, so that the run ends with its line
  within a minute, not at the 600 s read timeout. Token counts come from the responses'
  `usage`.
- The key comes from an environment variable (OPENAI_API_KEY unless told otherwise) and is
  never written to a table, a log or an error.

`serve_gguf.py` starts llama.cpp's own server in-process on a .gguf file (xllamacpp): the
fast CPU path for the offline pool, and a real server for the tests.
"""
from __future__ import annotations

import json
import math
import os
import queue
import random
import socket
import threading
import time
import weakref
from urllib.parse import urlparse

from cli import UsageError
from engine import Continuation, Draft, make_step

CONTINUATIONS = ("auto", "completions", "prefill", "instruct")
INSTRUCTION = ("Below is the beginning of a solution to this problem. Continue it from exactly "
               "where it stops, without repeating what is already written, and put your final "
               "answer within \\boxed{}.\n\nBeginning of the solution:\n\n")
RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
DOWN_AFTER = 20.0    # seconds of refused or dropped connections after which a server is down
PROBE_EVERY = 5.0    # seconds between the watchdog's checks that a server still listens


class ServerError(UsageError):
    """A server that cannot be used (unreachable, down, refusing): one line, exit 2."""


# ----------------------------------------------------------------------------------------
# Step statistics from a server's log-probabilities. Both response formats are read: the
# chat one ({"content": [{"token", "bytes", "logprob", "top_logprobs": [...]}]}, also what
# llama.cpp returns for completions) and the legacy completions one ("tokens",
# "token_logprobs", "top_logprobs": [{token: logprob}]).
# ----------------------------------------------------------------------------------------
def token_entries(logprobs: dict) -> list:
    """[(token bytes, logprob of the chosen token, [top-k logprobs])] of one choice."""
    if logprobs is None:
        raise ServerError("the server returned no logprobs; the small model needs a server "
                          "that returns them (logprobs / top_logprobs)")
    out = []
    if isinstance(logprobs.get("content"), list):
        for e in logprobs["content"]:
            raw = bytes(e["bytes"]) if e.get("bytes") is not None else e["token"].encode()
            tops = [t["logprob"] for t in e.get("top_logprobs") or []]
            out.append((raw, float(e["logprob"]), tops))
        return out
    if isinstance(logprobs.get("tokens"), list):
        tops_all = logprobs.get("top_logprobs") or [None] * len(logprobs["tokens"])
        for tok, lp, tops in zip(logprobs["tokens"], logprobs["token_logprobs"], tops_all):
            raw = bytes.fromhex(tok[6:].replace("\\x", "")) if tok.startswith("bytes:") \
                else tok.encode()
            out.append((raw, float(lp), list((tops or {}).values())))
        return out
    raise ServerError(f"unknown logprobs format from the server (keys {sorted(logprobs)})")


def bucket_entropy(top_logprobs: list) -> float:
    """Entropy of a next-token distribution known by its top k probabilities: the top k plus
    one bucket holding the remaining mass (a lower bound of the true entropy)."""
    probs = [math.exp(lp) for lp in top_logprobs if lp is not None and lp > -math.inf]
    h = -sum(p * math.log(p) for p in probs if p > 0)
    rest = 1.0 - sum(probs)
    return h - rest * math.log(rest) if rest > 1e-12 else h


def steps_from_entries(entries: list, ends_step) -> list:
    """Cut a solution, given as token entries, into steps with their statistics, by the
    method's step rule `ends_step` (rollout.ends_step) applied to the tokens' bytes."""
    steps, start, prev = [], 0, None
    for i, (tok, _, _) in enumerate(entries):
        last = i == len(entries) - 1
        if ends_step(prev, tok) or last:
            steps.append(_one_step(entries[start:i + 1]))
            start, prev = i + 1, None
        else:
            prev = tok
    return steps


# ----------------------------------------------------------------------------------------
# Requests: concurrent, retried with backoff, one clear line when a server is unusable.
# ----------------------------------------------------------------------------------------
def run_concurrently(fn, items: list, workers: int, on_done=None) -> list:
    """fn(item) for every item on `workers` daemon threads; results in input order, and
    on_done(index, result) called in this thread as each one finishes. The first error
    stops the others taking new items and is raised here."""
    results, todo, done = [None] * len(items), queue.Queue(), queue.Queue()
    for i in range(len(items)):
        todo.put(i)
    stop = threading.Event()

    def work():
        while not stop.is_set():
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            try:
                done.put((i, fn(items[i]), None))
            except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
                done.put((i, None, err))

    for _ in range(max(1, min(workers, len(items)))):
        threading.Thread(target=work, daemon=True).start()
    try:
        for _ in range(len(items)):
            while True:
                try:
                    i, result, err = done.get(timeout=0.5)
                    break
                except queue.Empty:
                    continue
            if err is not None:
                raise err
            results[i] = result
            if on_done is not None:
                on_done(i, result)
    finally:
        stop.set()
    return results


def tracked_pool_classes(live: weakref.WeakSet) -> dict:
    """urllib3 pool classes (per scheme) whose every connection is added to `live`."""
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    def tracked(base):
        class Tracked(base):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                live.add(self)
        return Tracked

    class Http(HTTPConnectionPool):
        ConnectionCls = tracked(HTTPConnection)

    class Https(HTTPSConnectionPool):
        ConnectionCls = tracked(HTTPSConnection)

    return {"http": Http, "https": Https}


class Connections:
    """The connections of one server's sessions, and a watchdog over them. While requests are
    in flight (begin/end), every PROBE_EVERY seconds it checks that the server still listens
    (a TCP connect to its host and port). Where nothing listens twice in a row (the server
    died, or is shutting down: llama.cpp's server, after SIGTERM, closes its port but holds
    the connections it has without answering them), it shuts every connection, so that a
    request waiting for its answer fails at once, as one whose connection the server closed
    does, and is retried (then refused: the server is down) instead of waiting out the read
    timeout. A slow connect (a busy server's full backlog) is not taken for a dead server."""

    def __init__(self, url: str):
        parsed = urlparse(url)
        self.address = (parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80))
        self.live, self.lock = weakref.WeakSet(), threading.Lock()
        self.pools = tracked_pool_classes(self.live)
        self.in_flight, self.watching = 0, False

    def session(self, requests):
        """A requests.Session whose direct connections are tracked here."""
        session = requests.Session()
        for adapter in session.adapters.values():
            adapter.poolmanager.pool_classes_by_scheme = self.pools
        return session

    def begin(self) -> None:
        with self.lock:
            self.in_flight += 1
            if not self.watching:
                self.watching = True
                threading.Thread(target=self._watch, daemon=True).start()

    def end(self) -> None:
        with self.lock:
            self.in_flight -= 1

    def _watch(self) -> None:
        failed = 0
        while True:
            time.sleep(PROBE_EVERY)
            with self.lock:
                if self.in_flight <= 0:
                    self.watching = False
                    return
            failed = 0 if self.listening() else failed + 1
            if failed >= 2:
                self.shut_all()
                failed = 0

    def listening(self) -> bool:
        try:
            socket.create_connection(self.address, timeout=PROBE_EVERY).close()
        except TimeoutError:
            return True
        except OSError:
            return False
        return True

    def shut_all(self) -> None:
        for conn in list(self.live):
            sock = getattr(conn, "sock", None)
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class ApiModel:
    """A model of the pool served by an OpenAI-compatible server."""

    def __init__(self, name: str, base_url: str, api_key_env: str | None = None,
                 top_logprobs: int = 20, continuation: str = "auto", concurrency: int = 16,
                 timeout: float = 600.0, max_retries: int = 6, backoff: float = 1.0,
                 params: int | None = None, seed: int = 0, *,
                 system_prompt: str, ends_step):
        """`system_prompt` and `ends_step` are the method's (rollout.load_model passes them)."""
        import requests
        if continuation not in CONTINUATIONS:
            raise UsageError(f"--continuation {continuation}: expected one of {', '.join(CONTINUATIONS)}")
        url = base_url.rstrip("/")
        if urlparse(url).scheme not in ("http", "https") or not urlparse(url).netloc:
            raise UsageError(f"{base_url}: not an http(s) URL (expected e.g. http://host:8000/v1)")
        self.name, self.base_url = name, url
        self.system_prompt, self.ends_step = system_prompt, ends_step
        self.root = url[:-3] if url.endswith("/v1") else url
        self.top_logprobs, self.concurrency = top_logprobs, concurrency
        self.timeout, self.max_retries, self.backoff, self.seed = timeout, max_retries, backoff, seed
        self._requests, self._local = requests, threading.local()
        self._connections = Connections(url)
        key = None
        if api_key_env is not None:  # named explicitly: it must be there
            key = os.environ.get(api_key_env)
            if not key:
                raise UsageError(f"--api-key-env {api_key_env}: that environment variable is not set")
        else:
            key = os.environ.get("OPENAI_API_KEY") or None
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._key_env = api_key_env or "OPENAI_API_KEY"
        served = self._served_models()
        if served is not None and name not in served:
            raise ServerError(f"{self.base_url} does not serve model {name!r} (it serves: "
                              f"{', '.join(sorted(served)) or 'nothing'})")
        self.params = params if params is not None else (served or {}).get(name)
        self._template_via = self._find_template_route()
        if continuation == "auto":
            continuation = "completions" if self._template_via else \
                ("instruct" if "openai.com" in urlparse(url).netloc else "prefill")
        elif continuation == "completions" and not self._template_via:
            raise ServerError(f"{self.base_url}: --continuation completions needs the chat "
                              "template, and the server offers neither /apply-template nor "
                              "/tokenize+/detokenize")
        self.continuation = continuation

    def messages_for(self, question: str) -> list:
        """The chat messages that ask the question (the method's system prompt first)."""
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": question}]

    # -- plumbing ---------------------------------------------------------------------
    @property
    def _session(self):
        if not hasattr(self._local, "session"):
            self._local.session = self._connections.session(self._requests)
        return self._local.session

    def _call(self, method: str, url: str, body=None, tries: int | None = None,
              stream: bool = False):
        """One request, retried on 429/5xx/timeouts/dropped connections with exponential
        backoff and jitter (Retry-After honoured). Returns the response (status < 400).
        Refused or dropped connections end a try at once and are retried for at most
        DOWN_AFTER seconds from the first: then the server is down (one line)."""
        req = self._requests
        tries = self.max_retries + 1 if tries is None else tries
        last, down_since, start = "no answer", None, time.monotonic()
        for attempt in range(tries):
            wait = None
            self._connections.begin()
            try:
                r = self._session.request(method, url, json=body, headers=self._headers,
                                          timeout=(10, self.timeout), stream=stream)
            except (req.ConnectionError, req.exceptions.ChunkedEncodingError) as err:
                last = f"{type(err).__name__}: no connection, or it closed without an answer"
                down_since = time.monotonic() if down_since is None else down_since
            except req.Timeout as err:
                last = f"{type(err).__name__}"
            else:
                down_since = None                  # an answer: the server is there
                if r.status_code < 400:
                    return r
                detail = _error_text(r)
                if r.status_code in (401, 403):
                    raise ServerError(f"{url}: the server refused the key ({r.status_code}); "
                                      f"set {self._key_env}")
                if r.status_code not in RETRY_STATUS:
                    raise ServerError(f"{url}: HTTP {r.status_code}: {detail}")
                last = f"HTTP {r.status_code}: {detail}"
                after = r.headers.get("Retry-After")
                if after is not None:
                    try:
                        wait = min(float(after), 120.0)
                    except ValueError:
                        wait = None
            finally:
                self._connections.end()
            if attempt + 1 < tries:
                if wait is None:
                    wait = min(30.0, self.backoff * 2 ** attempt) * random.uniform(0.5, 1.5)
                if down_since is not None and time.monotonic() + wait - down_since > DOWN_AFTER:
                    break
                time.sleep(wait)
        n = attempt + 1
        raise ServerError(f"{url}: no answer after {n} {'try' if n == 1 else 'tries'} in "
                          f"{time.monotonic() - start:.0f} s (last: {last}); the server is down "
                          "or overloaded - run again to resume")

    def _post(self, path: str, body: dict, root: bool = False) -> dict:
        r = self._call("POST", (self.root if root else self.base_url) + path, body)
        try:
            return r.json()
        except ValueError:
            raise ServerError(f"{self.base_url}{path}: the answer is not JSON") from None

    def _served_models(self) -> dict | None:
        """{model id or alias: parameter count or None} from GET /models; None where the
        server has no such list."""
        r = self._call("GET", self.base_url + "/models", tries=3)
        try:
            data = r.json().get("data")
        except (ValueError, AttributeError):
            return None
        if not isinstance(data, list):
            return None
        served = {}
        for m in data:
            n = (m.get("meta") or {}).get("n_params")
            for alias in [m.get("id")] + list(m.get("aliases") or []):
                if alias:
                    served[alias] = int(n) if n else None
        return served

    def _find_template_route(self) -> str | None:
        """How this server gives the chat-templated prompt text: 'apply-template'
        (llama.cpp), 'tokenize' (vLLM/SGLang), or None."""
        probe = {"messages": self.messages_for("1+1?")}
        for route in ("apply-template", "tokenize"):
            try:
                if self._template(probe["messages"], route):
                    return route
            except ServerError:
                continue
        return None

    def _template(self, messages: list, route: str | None = None) -> str | None:
        route = route or self._template_via
        if route == "apply-template":
            return self._post("/apply-template", {"messages": messages}, root=True).get("prompt")
        if route == "tokenize":
            toks = self._post("/tokenize", {"model": self.name, "messages": messages,
                                            "add_generation_prompt": True}, root=True)["tokens"]
            return self._post("/detokenize", {"model": self.name, "tokens": toks},
                              root=True).get("prompt")
        return None

    def pool_entry(self) -> dict:
        """What the table's `pool` records of this model (never the key)."""
        entry = {"model": self.name, "params": self.params, "backend": "api",
                 "base_url": self.base_url, "continuation": self.continuation}
        if self.top_logprobs:
            entry["top_logprobs"] = self.top_logprobs
        return entry

    def _greedy(self) -> dict:
        return {"model": self.name, "temperature": 0, "top_p": 1, "seed": self.seed}

    # -- the interface ----------------------------------------------------------------
    def _solve_one(self, question: str, max_new_tokens: int, prefix: str = "") -> tuple:
        """(prompt tokens, token entries, finished) of the greedy solution."""
        if self._template_via:
            prompt = self._template(self.messages_for(question)) + prefix
            d = self._post("/completions", {**self._greedy(), "prompt": prompt,
                                            "max_tokens": max_new_tokens,
                                            "logprobs": self.top_logprobs})
        else:
            msgs = self.messages_for(question) + ([{"role": "assistant", "content": prefix}] if prefix else [])
            extra = {"continue_final_message": True, "add_generation_prompt": False} if prefix else {}
            d = self._post("/chat/completions", {**self._greedy(), **extra, "messages": msgs,
                                                 "max_tokens": max_new_tokens, "logprobs": True,
                                                 "top_logprobs": self.top_logprobs})
        choice = d["choices"][0]
        entries = token_entries(choice.get("logprobs"))
        usage = d.get("usage") or {}
        if usage.get("completion_tokens") not in (None, len(entries)):
            raise ServerError(f"{self.base_url}: {usage['completion_tokens']} tokens generated "
                              f"but {len(entries)} log-probabilities returned")
        return usage.get("prompt_tokens"), entries, choice.get("finish_reason") == "stop"

    def solve(self, questions: list, max_new_tokens: int, on_done=None) -> list:
        """The greedy solution of every question (a list of question strings), as Drafts."""
        def one(q):
            prompt_tokens, entries, finished = self._solve_one(q, max_new_tokens)
            return Draft(prompt_tokens, steps_from_entries(entries, self.ends_step), finished)
        return run_concurrently(one, questions, self.concurrency, on_done)

    def _continue_one(self, item: tuple, max_new_tokens: int) -> Continuation:
        question, prefix = item
        body = {**self._greedy(), "max_tokens": max_new_tokens}
        if self.continuation == "completions":
            d = self._post("/completions", {**body, "prompt": self._template(self.messages_for(question)) + prefix})
            text = d["choices"][0]["text"]
        else:
            msgs = self.messages_for(question)
            if prefix and self.continuation == "prefill":
                msgs.append({"role": "assistant", "content": prefix})
                body.update(continue_final_message=True, add_generation_prompt=False)
            elif prefix:  # instruct
                msgs[1] = {"role": "user", "content": f"{question}\n\n{INSTRUCTION}{prefix}"}
            d = self._post("/chat/completions", {**body, "messages": msgs})
            text = d["choices"][0]["message"].get("content") or ""
        usage = d.get("usage") or {}
        if usage.get("completion_tokens") is None:
            raise ServerError(f"{self.base_url}: the answer has no token usage")
        return Continuation(usage.get("prompt_tokens"), usage["completion_tokens"], text,
                            d["choices"][0].get("finish_reason") == "stop")

    def continue_after(self, items: list, max_new_tokens: int, on_done=None) -> list:
        """The greedy continuation of every (question, accepted steps' text)."""
        return run_concurrently(lambda it: self._continue_one(it, max_new_tokens), items,
                                self.concurrency, on_done)

    def drafter(self, question: str, max_new_tokens: int, prefix: str = "") -> "ApiDrafter":
        return ApiDrafter(self, question, max_new_tokens, prefix)

    def count_tokens(self, text: str) -> int | None:
        """Tokens of `text` by the server's tokenizer (None where it has no /tokenize)."""
        if self._template_via is None:
            return None
        return len(self._post("/tokenize", {"model": self.name, "prompt": text, "content": text,
                                            "add_special": False, "add_special_tokens": False},
                              root=True)["tokens"])


class ApiDrafter:
    """Step-by-step drafting through the server (route.py): one streamed greedy completion
    of the templated prompt (plus `prefix`), read a step at a time with one token of
    lookahead, so that `ended` is known right after a step (as the local StepDrafter does).
    Closing it stops the server's generation: an escalation wastes at most that one token.
    A server without raw completions is asked for the whole solution at once instead."""

    def __init__(self, model: ApiModel, question: str, max_new_tokens: int, prefix: str = ""):
        self.model, self._response = model, None
        if model._template_via:
            prompt = model._template(model.messages_for(question)) + prefix
            self.prompt_tokens = model.count_tokens(prompt)
            body = {**model._greedy(), "prompt": prompt, "logprobs": model.top_logprobs,
                    "max_tokens": max_new_tokens, "stream": True}
            model._connections.begin()     # the stream is in flight until it ends or is closed
            try:
                self._response = model._call("POST", model.base_url + "/completions", body, stream=True)
            except BaseException:
                model._connections.end()
                raise
            self._events = self._streamed()
        else:
            self.prompt_tokens, entries, _ = model._solve_one(question, max_new_tokens, prefix)
            self._events = iter(entries)
        self._next = next(self._events, None)

    def _streamed(self):
        """The token entries of the stream; a stream the server breaks off is one line."""
        req = self.model._requests
        try:
            for line in self._response.iter_lines():
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    return
                for choice in json.loads(data).get("choices") or []:
                    if choice.get("logprobs"):
                        yield from token_entries(choice["logprobs"])
        except (req.ConnectionError, req.exceptions.ChunkedEncodingError) as err:
            raise ServerError(f"{self.model.base_url}/completions: the stream broke off "
                              f"({type(err).__name__}); the server is down") from None
        finally:
            self.model._connections.end()

    @property
    def ended(self) -> bool:
        return self._next is None

    def next_step(self) -> dict | None:
        """The next drafted step (text, tokens, statistics), or None once the solution ended."""
        entries, prev = [], None
        while self._next is not None:
            entry = self._next
            entries.append(entry)
            self._next = next(self._events, None)
            if self.model.ends_step(prev, entry[0]):
                break
            prev = entry[0]
        return _one_step(entries) if entries else None

    def close(self) -> None:
        if self._response is not None:
            self._events.close()           # the stream is no longer in flight
            self._response.close()


def _one_step(entries: list) -> dict:
    """One step (text and statistics) from its token entries."""
    text = b"".join(t for t, _, _ in entries).decode("utf-8", errors="replace")
    return make_step(text, [lp for _, lp, _ in entries], [bucket_entropy(t) for _, _, t in entries])


def _error_text(r) -> str:
    """The server's error message, one line, short (never the request, so never the key)."""
    try:
        d = r.json()
        msg = d.get("error", d) if isinstance(d, dict) else d
        msg = msg.get("message", msg) if isinstance(msg, dict) else msg
    except ValueError:
        msg = r.text
    return " ".join(str(msg).split())[:200]
