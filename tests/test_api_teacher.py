"""The API teacher of `pseudo_targets` (`teacher_api:`), over real HTTP on 127.0.0.1 with the real `openai` client:
PTs from `nlgkd serve` equal the model's own samples; a fault-injecting server (429 + Retry-After, 500, hangs,
truncated and invalid JSON, reset connections, empty answers) still ends with every request answered or
reported and none paid twice; a killed stage re-sends only what was not cached; --dry-run sends nothing; the
budget stops at the cap; the key is in no file and no log line."""
from __future__ import annotations

import asyncio
import copy
import json
import logging
import socket
import sqlite3
import struct
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from nlgkd.recipe import parse_recipe
from nlgkd.runner import Runner, StageError
from nlgkd.pseudo_target_data import load_pseudo_targets

from conftest import forked_nlgkd, free_port, kill_once, with_stage
from test_serve import model_samples

KEY_ENV = "NLGKD_TEST_API_KEY"
KEY = "sk-test-7f3a9c0e41b2d58a6e0f1c2b3a4d5e6f"  # a fake key; must end up in no file and no log line


# --------------------------------------------------------------------------------- a fake endpoint
class FakeEndpoint:
    """An OpenAI-style chat endpoint on a raw asyncio socket, in a background thread.

    `faults[source]` lists what the first attempts of that input's request get (then it is answered):
        429        Retry-After: 1          500    a server error          hang   no answer, then a close
        truncated  half the promised body  badjson  a whole body, not JSON  reset  a TCP reset (RST)
        empty      a 200 with empty content
    A good answer's texts are f"pt {i} of {source}"; usage is 10 prompt tokens and max_tokens per choice.
    `log` holds (time, source, outcome) of every request; `paid` counts good answers per request body.
    """

    def __init__(self, faults: dict[str, list[str]] | None = None, delay: float = 0.0, hang: float = 5.0):
        self.faults = faults or {}
        self.delay = delay
        self.hang = hang
        self.log: list[tuple[float, str, str]] = []
        self.paid: Counter = Counter()
        self.attempts: Counter = Counter()
        self.auth: set[str] = set()
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def sources_sent(self) -> list[str]:
        return [source for _, source, _ in self.log]

    def __enter__(self):
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self.handle, "127.0.0.1", self.port), self.loop).result()
        return self

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)

    async def handle(self, reader, writer):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
            body = json.loads(await reader.readexactly(int(headers.get("content-length", 0))))
        except (asyncio.IncompleteReadError, ValueError, ConnectionError):
            writer.close()
            return
        self.auth.add(headers.get("authorization", ""))
        source = body["messages"][-1]["content"]
        key = json.dumps(body, sort_keys=True)
        attempt = self.attempts[key]
        self.attempts[key] += 1
        planned = self.faults.get(source, [])
        fault = planned[attempt] if attempt < len(planned) else "ok"
        self.log.append((time.monotonic(), source, fault))
        if self.delay:
            await asyncio.sleep(self.delay)
        if fault == "429":
            await self.send(writer, 429, {"error": {"message": "slow down", "type": "rate_limit"}},
                            extra="Retry-After: 1\r\n")
        elif fault == "500":
            await self.send(writer, 500, {"error": {"message": "boom", "type": "server_error"}})
        elif fault == "hang":
            await asyncio.sleep(self.hang)
            writer.close()
        elif fault == "truncated":
            data = json.dumps(self.answer(body, source)).encode()
            writer.write(self.head(200, len(data)) + data[: len(data) // 2])
            await writer.drain()
            writer.close()
        elif fault == "badjson":
            await self.send(writer, 200, raw=b'{"id": "x", "choices": [{"message": {"content": "pt')
        elif fault == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        elif fault == "empty":
            answer = self.answer(body, source)
            for choice in answer["choices"]:
                choice["message"]["content"] = ""
            await self.send(writer, 200, answer)
        elif fault == "401":
            await self.send(writer, 401, {"error": {"message": "invalid key", "type": "auth"}})
        else:
            self.paid[key] += 1
            await self.send(writer, 200, self.answer(body, source))

    @staticmethod
    def answer(body: dict, source: str) -> dict:
        n = body.get("n", 1)
        return {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": i, "message": {"role": "assistant", "content": f"pt {i} of {source}"},
                             "finish_reason": "stop"} for i in range(n)],
                "usage": {"prompt_tokens": 10, "completion_tokens": n * body["max_tokens"],
                          "total_tokens": 10 + n * body["max_tokens"]}}

    @staticmethod
    def head(status: int, length: int, extra: str = "") -> bytes:
        return (f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n"
                f"Connection: close\r\n{extra}\r\n").encode()

    async def send(self, writer, status: int, obj=None, raw: bytes | None = None, extra: str = "") -> None:
        data = raw if raw is not None else json.dumps(obj).encode()
        writer.write(self.head(status, len(data), extra) + data)
        await writer.drain()
        writer.close()


# ------------------------------------------------------------------------------------ recipes
SOURCES = [f"input number {i}" for i in range(10)]


def api_recipe(tmp_path: Path, base_url: str, **api) -> dict:
    """A recipe with one API pseudo_targets stage over SOURCES (a jsonl train file); no model needed."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"source": s, "target": f"gold of {s}"}) + "\n" for s in SOURCES))
    # A timeout far above any answer's time: a busy CI machine stalls for seconds at a time, and a spurious
    # timeout would add a retry the test did not plan. The hang test sets its own.
    teacher_api = {"model": "fake-llm", "base_url": base_url, "api_key_env": KEY_ENV, "concurrency": 4,
                   "timeout": 30.0, "max_retries": 3, "backoff": 0.01, "backoff_max": 0.05, **api}
    return {"name": "api", "seed": 0, "data": {"train": str(data)}, "models": {},
            "stages": [{"name": "pts", "kind": "pseudo_targets", "teacher_api": teacher_api,
                        "decoding": {"strategy": "sample", "top_p": 0.9, "num_return_sequences": 2,
                                     "max_new_tokens": 5}}]}


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    return KEY


def stage_record(root: Path, name: str = "pts") -> dict:
    return json.loads((root / "api" / name / "stage.json").read_text())


def cached_keys(root: Path) -> set[str]:
    db = sqlite3.connect(root / "api" / "api_cache.sqlite")
    try:
        return {row[0] for row in db.execute("SELECT key FROM responses")}
    except sqlite3.OperationalError:  # created, its table not yet
        return set()
    finally:
        db.close()


def body_key(source: str, recipe: dict) -> str:
    """The cache key the stage uses for an input of `api_recipe` (recomputed from the request body)."""
    from nlgkd.api_client import build_requests

    stage = parse_recipe(copy.deepcopy(recipe)).stages[0].config
    (request,) = build_requests(stage.teacher_api, stage.decoding, [source], [], seed=0)[0]
    return request.key


# ---------------------------------------------------------------------------------------- tests
def test_faults_end_answered_or_reported_and_nothing_is_paid_twice(tmp_path, api_key, caplog, capfd):
    caplog.set_level(logging.DEBUG)  # the openai client and httpx log at debug: the key must not show there
    faults = {SOURCES[0]: ["429"], SOURCES[1]: ["500", "500"], SOURCES[2]: ["hang"], SOURCES[3]: ["truncated"],
              SOURCES[4]: ["reset"], SOURCES[5]: ["badjson"], SOURCES[6]: ["empty"], SOURCES[7]: ["500"] * 9}
    with FakeEndpoint(faults, hang=60.0) as endpoint:
        recipe = api_recipe(tmp_path, endpoint.base_url, allow_failures=1, timeout=5.0)
        runner = Runner(parse_recipe(recipe), runs_root=tmp_path / "runs")
        runner.run()
    root = tmp_path / "runs"
    rows = load_pseudo_targets(root / "api" / "pts").to_list()
    # every input but the always-failing one has its 2 answers, in order, as the dataset of local PTs looks
    answered = [s for s in SOURCES if s != SOURCES[7]]
    assert [(r["source"], r["pt"], r["pt_index"]) for r in rows] == [
        (s, f"pt {i} of {s}", i) for s in answered for i in range(2)]
    assert {r["origin"] for r in rows} == {"train"} and {r["teacher"] for r in rows} == {"fake-llm"}
    assert [r["input_index"] for r in rows[::2]] == [SOURCES.index(s) for s in answered]
    # ... and the failing one is reported, not dropped
    failures = [json.loads(line) for line in (root / "api" / "pts" / "failures.jsonl").read_text().splitlines()]
    assert [(f["source"], f["attempts"]) for f in failures] == [(SOURCES[7], 4)]
    assert "500" in failures[0]["error"]
    # nothing paid twice: one good answer per request, every one of them in the cache
    assert set(endpoint.paid.values()) == {1} and len(endpoint.paid) == 9
    assert len(cached_keys(root)) == 9
    # the record matches what the server saw
    api = stage_record(root)["api"]
    assert api["http_requests"] == len(endpoint.log)
    assert api["answered"] == 9 and api["failures"] == 1 and api["cache_hits"] == 0
    assert api["retries"] == len(endpoint.log) - 10
    assert api["retry_causes"] == {"rate_limited": 1, "server_error": 2 + 4, "timeout": 1, "connection": 2,
                                   "malformed": 1, "empty": 1}
    assert api["prompt_tokens"] == 9 * 10 and api["completion_tokens"] == 9 * 2 * 5
    record = stage_record(root)["pseudo_targets"]
    assert record["failed_requests"] == 1 and record["pts_written"] == 18
    # Retry-After: 1 was obeyed (backoff alone would have retried within 0.05 s)
    times = [t for t, source, _ in endpoint.log if source == SOURCES[0]]
    assert times[1] - times[0] >= 1.0
    # the key went to the server, and nowhere else
    assert endpoint.auth == {f"Bearer {KEY}"}
    assert_key_nowhere(root, caplog, capfd)


def assert_key_nowhere(root: Path, caplog, capfd) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), f"the API key was written to {path}"
    out, err = capfd.readouterr()
    assert KEY not in out and KEY not in err
    assert caplog.records, "no log records were captured; the check would prove nothing"
    assert all(KEY not in record.getMessage() for record in caplog.records)


def test_refused_key_stops_the_stage_without_showing_the_key(tmp_path, api_key, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    with FakeEndpoint({s: ["401"] * 10 for s in SOURCES}) as endpoint:
        runner = Runner(parse_recipe(api_recipe(tmp_path, endpoint.base_url)), runs_root=tmp_path / "runs")
        with pytest.raises(StageError, match=f"refused the key.*{KEY_ENV}") as err:
            runner.run()
    assert KEY not in str(err.value)
    assert len(endpoint.log) <= 4  # no retries of a refused key: the stage stops at once
    assert_key_nowhere(tmp_path / "runs", caplog, capfd)


def test_missing_key_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    runner = Runner(parse_recipe(api_recipe(tmp_path, "http://127.0.0.1:9/v1")), runs_root=tmp_path / "runs")
    with pytest.raises(StageError, match=f"{KEY_ENV} is not set"):
        runner.run()


def test_killed_stage_resends_only_what_was_not_cached(tmp_path, api_key):
    # one request at a time, 0.1 s each: the kill lands mid-stage
    with FakeEndpoint(delay=0.1) as endpoint:
        recipe = api_recipe(tmp_path, endpoint.base_url, concurrency=1)
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe))
        root = tmp_path / "runs"
        kill_once(["run", str(path), "--runs-dir", str(root)], tmp_path, what="slow the endpoint down",
                  ready=lambda: (root / "api" / "api_cache.sqlite").exists() and len(cached_keys(root)) >= 3)
        cached = cached_keys(root)
        sent_before = len(endpoint.log)
        assert 3 <= len(cached) < len(SOURCES)
        Runner(parse_recipe(recipe), runs_root=root).run()
    resent = endpoint.sources_sent()[sent_before:]
    assert sorted(body_key(s, recipe) for s in resent) == sorted({body_key(s, recipe) for s in SOURCES} - cached)
    assert len(load_pseudo_targets(root / "api" / "pts")) == 2 * len(SOURCES)
    api = stage_record(root)["api"]
    assert api["cache_hits"] == len(cached) and api["http_requests"] == len(resent)


def test_dry_run_sends_nothing_and_estimates_the_cost(tmp_path, api_key, capsys):
    from nlgkd.cli import main

    with FakeEndpoint() as endpoint:
        recipe = api_recipe(tmp_path, endpoint.base_url, input_price=2.0, output_price=10.0, shots=2)
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe))
        assert main(["run", str(path), "--runs-dir", str(tmp_path / "runs"), "--dry-run"]) == 0
        out = capsys.readouterr().out
        assert endpoint.log == []
        assert not (tmp_path / "runs" / "api" / "pts").exists()
        assert f"{len(SOURCES)} distinct requests" in out and "0 already cached" in out
        assert '"role": "assistant", "content": "gold of ' in out  # the k-shot examples, printed
        # completion: at most 10 requests x n=2 x max_tokens=5 tokens at 10 per million
        assert "at most 100 completion" in out
        prompt = int(out.split("estimated tokens: ")[1].split(" prompt")[0])
        assert f"at most {(prompt * 2.0 + 100 * 10.0) / 1e6:.4f}" in out
        assert "nothing was sent" in out
        # after a real run the dry run finds everything cached
        Runner(parse_recipe(copy.deepcopy(recipe)), runs_root=tmp_path / "runs").run()
        sent = len(endpoint.log)
        assert main(["run", str(path), "--runs-dir", str(tmp_path / "runs"), "--dry-run", "--force"]) == 0
        assert f"{len(SOURCES)} already cached, 0 to send" in capsys.readouterr().out
        assert len(endpoint.log) == sent


def test_budget_stops_at_the_cap_and_a_larger_one_continues(tmp_path, api_key):
    # every answer costs exactly 10: n=2 x max_tokens=5 completion tokens at 1 per token, prompts free
    with FakeEndpoint() as endpoint:
        recipe = api_recipe(tmp_path, endpoint.base_url, output_price=1e6, max_cost=35.0)
        root = tmp_path / "runs"
        with pytest.raises(StageError, match="budget reached"):
            Runner(parse_recipe(copy.deepcopy(recipe)), runs_root=root).run()
        assert len(endpoint.log) == 3 and len(cached_keys(root)) == 3  # 3 x 10 <= 35 < 4 x 10
        assert not (root / "api" / "pts").exists()
        recipe["stages"][0]["teacher_api"].update(max_cost=50.0, on_budget="finish")
        Runner(parse_recipe(copy.deepcopy(recipe)), runs_root=root).run()
        api = stage_record(root)["api"]
        assert api["cache_hits"] == 3 and api["answered"] == 5 and api["cost"] == 50.0
        assert api["budget_reached"] and api["not_sent"] == 2
        assert len(load_pseudo_targets(root / "api" / "pts")) == 2 * 8
        assert stage_record(root)["pseudo_targets"]["requests_not_sent"] == 2
        assert set(endpoint.paid.values()) == {1} and len(endpoint.log) == 8


def test_rate_limit_spaces_requests(tmp_path, api_key, monkeypatch):
    from nlgkd import api_client

    made, make_limiter = [], api_client.RateLimiter

    def kept_limiter(*args):
        made.append(make_limiter(*args))
        return made[-1]

    monkeypatch.setattr(api_client, "RateLimiter", kept_limiter)
    with FakeEndpoint() as endpoint:
        recipe = api_recipe(tmp_path, endpoint.base_url, requests_per_minute=600.0, concurrency=8)
        Runner(parse_recipe(recipe), runs_root=tmp_path / "runs").run()
    # 600 per minute: one request every 0.1 s even with 8 workers (without the limit all 10 start at once).
    # The planned starts are checked, not arrival times or waits: a busy machine delays requests by as much
    # as the spacing, which can only spread the starts further.
    (limiter,) = made
    assert limiter.rpm == 600.0 and len(limiter.slots) == len(endpoint.log) == 10
    gaps = [b - a for a, b in zip(limiter.slots, limiter.slots[1:])]
    assert min(gaps) >= 0.1 - 1e-9
    record = json.loads((tmp_path / "runs" / "api" / "pts" / "stage.json").read_text())
    assert record["api"]["rate_limit_wait_s"] == pytest.approx(limiter.waited_s, abs=0.01)


def test_rate_limiter_spaces_concurrent_waits_evenly():
    from nlgkd.api_client import RateLimiter

    async def ten_waits(limiter):
        async def one():
            await limiter.wait(tokens=100)
            return time.monotonic()

        return sorted(await asyncio.gather(*[one() for _ in range(10)]))

    # 1200 requests/min, or 100 tokens at 120k tokens/min: one every 0.05 s. Ten asked at once get starts
    # 0.05 s apart, and none goes before its start (a busy machine can only make them later: no upper bounds)
    for limiter in (RateLimiter(requests_per_minute=1200.0, tokens_per_minute=None),
                    RateLimiter(requests_per_minute=None, tokens_per_minute=120_000.0)):
        ended = asyncio.run(ten_waits(limiter))
        assert len(limiter.slots) == 10
        assert [b - a for a, b in zip(limiter.slots, limiter.slots[1:])] == pytest.approx([0.05] * 9, abs=1e-6)
        assert all(end >= slot for end, slot in zip(ended, limiter.slots))


def test_answer_pieces_and_retry_after_parsing():
    from email.utils import formatdate

    from nlgkd.api_client import piece_texts, retry_after_seconds

    # OpenAI gives a character split over two tokens as escaped text; its bytes put it on the second token
    entries = [{"token": "n", "bytes": [110]}, {"token": "\\xc3", "bytes": [0xC3]}, {"token": "\\xa9", "bytes": [0xA9]}]
    assert piece_texts(entries) == ["n", "", "\u00e9"]
    assert piece_texts([{"token": " the"}, {"token": " end"}]) == [" the", " end"]  # servers without bytes
    assert retry_after_seconds({"retry-after": "2"}) == 2.0
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert 25 < retry_after_seconds({"retry-after": formatdate(time.time() + 30, usegmt=True)}) <= 30
    assert retry_after_seconds({}) is None and retry_after_seconds({"retry-after": "soon"}) is None


def test_recipe_checks_teacher_fields():
    from nlgkd.config import RecipeError

    recipe = {"name": "x", "data": {"task": "demo"}, "models": {"t": {}},
              "stages": [{"name": "pts", "kind": "pseudo_targets"}]}
    with pytest.raises(RecipeError, match=r"stages\[0\] \(pts\): give teacher: .* or teacher_api:"):
        parse_recipe(copy.deepcopy(recipe))
    recipe["stages"][0].update(teacher="t", teacher_api={"model": "m"})
    with pytest.raises(RecipeError, match="one of them"):
        parse_recipe(copy.deepcopy(recipe))
    recipe["stages"][0].pop("teacher")
    recipe["stages"][0]["align_to"] = "t"
    with pytest.raises(RecipeError, match="align_to: needs teacher_api with logprobs"):
        parse_recipe(copy.deepcopy(recipe))
    recipe["stages"][0]["teacher_api"] = {"model": "m", "concurency": 2}
    with pytest.raises(RecipeError, match="did you mean 'concurrency'"):
        parse_recipe(copy.deepcopy(recipe))


# ------------------------------------------------------------------- nlgkd serve as the teacher
def test_pts_from_nlgkd_serve_equal_the_models_own_samples(trained):
    """The whole path: stage -> openai client -> HTTP -> nlgkd serve -> the model; PTs and logprob scores
    equal what the model itself samples with the same seed."""
    from nlgkd.serve import create_app, load_served_model

    from nlgkd.serve import BackgroundServer

    served = load_served_model(str(trained[1] / "tiny" / "teacher"), name="teacher", device="cpu")
    stage = {"name": "api_pts", "kind": "pseudo_targets", "inputs": ["train"], "max_examples": 4,
             "teacher_api": {"model": "teacher", "api_key_env": None, "logprobs": True, "top_logprobs": 3,
                             "concurrency": 2, "timeout": 30},
             "decoding": {"strategy": "sample", "top_p": 0.9, "temperature": 0.8, "num_return_sequences": 2,
                          "max_new_tokens": 10}}
    with BackgroundServer(create_app(served)) as server:
        stage["teacher_api"]["base_url"] = server.base_url
        runner, recipe = with_stage(trained, stage)
        runner.run(only="api_pts")
    rows = load_pseudo_targets(runner.run_dir / "api_pts").to_list()
    sources = list(runner.data()["train"]["source"][:4])
    expected = []
    for source in sources:
        _, sequences = model_samples(served, source, seed=recipe["seed"], n=2, top_p=0.9, temperature=0.8,
                                     max_new_tokens=10)
        texts = [served.tokenizer.decode(s, skip_special_tokens=True) for s in sequences]
        expected += [(source, t.strip()) for t in texts if t.strip()]
    assert [(r["source"], r["pt"]) for r in rows] == expected
    assert all(r["score"] is not None and r["score"] < 0 for r in rows)


def test_api_teacher_flow_end_to_end(trained, tmp_path):
    """The flow of recipes/api_teacher.yaml on the tiny models: `nlgkd serve` (the CLI, a subprocess) over the
    trained teacher; PTs with top logprobs aligned to the student's tokens; distill from them as a cached
    teacher; evaluate."""
    import urllib.request

    import numpy as np

    port = free_port()
    server = forked_nlgkd(["serve", str(trained[1] / "tiny" / "teacher"), "--port", str(port)], tmp_path,
                          log=tmp_path / "serve.log")
    server.start()
    try:
        deadline = time.time() + 600
        while True:
            assert server.is_alive(), (tmp_path / "serve.log").read_text()
            assert time.time() < deadline, "nlgkd serve did not come up"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1) as answer:
                    assert json.load(answer)["data"][0]["id"] == "teacher"  # named after its folder
                break
            except OSError:
                time.sleep(0.2)
        runner, _ = with_stage(
            trained,
            {"name": "api_pts", "kind": "pseudo_targets", "inputs": ["train", "unlabeled"], "max_examples": 4,
             "teacher_api": {"model": "teacher", "base_url": f"http://127.0.0.1:{port}/v1", "api_key_env": None,
                             "logprobs": True, "top_logprobs": 3, "concurrency": 2, "timeout": 60},
             "align_to": "student",
             "decoding": {"strategy": "sample", "top_p": 0.95, "num_return_sequences": 2, "max_new_tokens": 10}},
            {"name": "api_distill", "kind": "distill", "student": "student", "cached_teacher": "api_pts",
             "gold": False, "max_steps": 3, "batch_size": 4, "eval_samples": 0, "save_every": None, "log_every": 1},
            {"name": "api_eval", "kind": "evaluate", "models": ["api_distill"], "max_examples": 4,
             "decoding": {"strategy": "greedy", "max_new_tokens": 8, "batch_size": 4}})
        runner.run(only="api_pts")
    finally:
        server.terminate()
        server.join(timeout=30)
    runner.run(only="api_distill")
    runner.run(only="api_eval")
    run_dir = runner.run_dir
    pts = load_pseudo_targets(run_dir / "api_pts")
    soft = run_dir / "api_pts" / "soft_targets"
    manifest = json.loads((soft / "manifest.json").read_text())
    assert manifest["examples"] == len(pts) > 0 and manifest["k"] == 4
    ids = np.load(soft / "topk_ids.npy")
    logprobs = np.load(soft / "topk_logprobs.npy").astype(np.float32)
    assert ids.shape == (manifest["tokens"], 4)
    # the kept alternatives of a position are a part of the teacher's distribution: they sum to at most 1
    assert np.all(np.exp(np.where(ids >= 0, logprobs, -np.inf)).sum(1) <= 1.0 + 1e-2)
    # teacher tokens were aligned (not everything one-hot): the soft targets carry the teacher's alternatives
    assert manifest["one_hot_tokens"] < manifest["tokens"]
    assert (ids[:, 1] >= 0).any()
    record = json.loads((run_dir / "api_pts" / "stage.json").read_text())
    assert record["api"]["answered"] == record["api"]["requests_needed"] == 8
    assert record["soft_targets"]["examples"] == len(pts)
    distill = json.loads((run_dir / "api_distill" / "stage.json").read_text())
    assert distill["status"] == "done"
    metrics = json.loads((run_dir / "api_eval" / "metrics.json").read_text())
    assert "api_distill" in json.dumps(metrics)
