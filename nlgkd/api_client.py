"""The client of an LLM behind an OpenAI-compatible chat API: requests, transport, rate limits, retries, the
answer cache and the budget. It imports nothing from nlgkd; the `pseudo_targets` stage that uses it as a
teacher (`teacher_api:`) is `nlgkd/stages/pseudo_targets_api.py`.

Every input becomes one chat request (or K with `n_per_request: false`): an optional system message, k-shot
examples (user: prompt of a train source, assistant: its gold target; the same k for every request, drawn
with the recipe seed) and the user prompt of the input. Requests go out through `openai.AsyncOpenAI`:
    concurrency         at most `concurrency` requests in flight (asyncio tasks)
    rate limits         requests and estimated tokens per minute, spaced evenly (no bursts)
    retries             429, 5xx, 408/409, timeouts, dropped connections, malformed or empty answers: wait
                        `backoff * 2^attempt` (jittered, up to `backoff_max`) or what `Retry-After` says (a
                        429 pauses every worker); after `max_retries` the request is a recorded failure
    fatal               401/403 (key refused), 404 (model or URL wrong), an endpoint that ignores `n` or
                        returns no logprobs: the stage stops at once, keeping what was answered
    cache               every answer is written to `runs/<recipe>/api_cache.sqlite` the moment it arrives,
                        keyed by a hash of the request body (model, messages, parameters); a re-run, a
                        killed run, a changed budget or another stage with the same requests send only what is
                        not there. The key is in no file: it is read from the environment variable the
                        recipe names (`api_key_env`) and given only to the client
    budget              `max_cost` / `max_total_tokens`: before each request its worst case (estimated prompt
                        + n * max_tokens) is reserved; when it would not fit, no new request is sent, those in
                        flight finish and are kept
    dry run             `nlgkd run RECIPE --dry-run`: the requests, their estimated tokens and cost; nothing
                        is sent
The stage's `stage.json` gets an `api` record: requests needed, cache hits, HTTP requests sent, retries by
cause, failures, tokens in and out, cost.
"""
from __future__ import annotations

import asyncio
import codecs
import hashlib
import json
import math
import os
import random
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

CACHE_FILE = "api_cache.sqlite"
RETRY_AFTER_CAP = 600.0  # seconds: a longer Retry-After is obeyed only this far
SHOWN_REQUESTS = 3  # full requests printed by a dry run


class FatalApiError(ValueError):
    """The endpoint cannot serve this stage (key refused, model unknown, no logprobs): stop, keep answers."""


class BadAnswer(Exception):
    """A 200 answer that is malformed or empty: retried like a server error."""

    def __init__(self, message: str, kind: str = "malformed"):
        super().__init__(message)
        self.kind = kind


# ------------------------------------------------------------------------------------------ requests
@dataclass
class ApiRequest:
    key: str  # sha256 of the body: the cache key
    body: dict  # keyword arguments of chat.completions.create (model, messages, n, temperature, ...)
    prompt_tokens: int  # estimated

    @property
    def n(self) -> int:
        return self.body["n"]


def estimate_tokens(text: str) -> int:
    """About 4 characters per token in English for GPT tokenizers; the budget corrects it from real usage."""
    return math.ceil(len(text) / 4)


def estimate_prompt_tokens(messages: list[dict]) -> int:
    # a few tokens of chat formatting per message, and 3 that prime the answer
    return sum(estimate_tokens(m["content"]) + 4 for m in messages) + 3


def request_key(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def draw_shots(train, k: int, seed: int) -> list[tuple[str, str]]:
    """k (source, target) pairs of the train split, the same for every run with this seed."""
    if k == 0:
        return []
    if train is None:
        raise ValueError("teacher_api.shots: k-shot examples come from the train split, and the data has none; "
                         "set shots: 0 or configure data.train")
    if k > len(train):
        raise ValueError(f"teacher_api.shots: {k} examples asked, the train split has {len(train)}")
    picked = sorted(random.Random(seed).sample(range(len(train)), k))
    return [(train[i]["source"], train[i]["target"]) for i in picked]


def build_messages(api, source: str, shots: list[tuple[str, str]]) -> list[dict]:
    """The chat messages for one input: system, k-shot examples, the input (`{source}` in `prompt`)."""
    messages = [{"role": "system", "content": api.system}] if api.system else []
    for shot_source, shot_target in shots:
        messages.append({"role": "user", "content": api.prompt.replace("{source}", shot_source)})
        messages.append({"role": "assistant", "content": shot_target})
    messages.append({"role": "user", "content": api.prompt.replace("{source}", source)})
    return messages


def build_requests(api, decoding, sources: list[str], shots, seed: int) -> list[list[ApiRequest]]:
    """The requests of every input: one asking for n = K outputs, or K asking for one each (seeds seed + r)."""
    k = decoding.num_return_sequences
    if decoding.strategy not in ("greedy", "sample"):
        raise ValueError(f"decoding.strategy: {decoding.strategy!r} cannot be asked of an API; use greedy "
                         "(temperature 0) or sample (temperature, top_p)")
    if decoding.strategy == "greedy" and k > 1:
        raise ValueError("decoding.num_return_sequences: greedy decoding gives one output per input; set "
                         "strategy: sample for more")
    if decoding.top_k:
        raise ValueError("decoding.top_k: the OpenAI API has no top-k sampling; set top_k: 0 and use top_p")
    params = {"temperature": 0.0 if decoding.strategy == "greedy" else decoding.temperature,
              "top_p": 1.0 if decoding.strategy == "greedy" else decoding.top_p,
              "max_tokens": decoding.max_new_tokens}
    if api.logprobs:
        params["logprobs"] = True
        if api.top_logprobs:
            params["top_logprobs"] = api.top_logprobs
    repeats = [(k, seed)] if api.n_per_request else [(1, seed + r) for r in range(k)]
    everything = []
    for source in sources:
        messages = build_messages(api, source, shots)
        prompt_tokens = estimate_prompt_tokens(messages)
        mine = []
        for n, request_seed in repeats:
            body = {"model": api.model, "messages": messages, "n": n, "seed": request_seed, **params}
            mine.append(ApiRequest(request_key(body), body, prompt_tokens))
        everything.append(mine)
    return everything


# ------------------------------------------------------------------------------------------- answers
@dataclass
class Answer:
    """A parsed answer: n texts and, with logprobs, per text its pieces (text, logprob, [(alt, logprob)])."""

    texts: list[str]
    pieces: list[Optional[list]]
    prompt_tokens: int
    completion_tokens: int


def piece_texts(entries: list[dict]) -> list[str]:
    """The text of each logprob entry. With `bytes` (OpenAI gives them), UTF-8 is decoded across entries, so a
    character split over two tokens belongs to the one that completes it; the texts concatenate exactly."""
    if entries and all(isinstance(e.get("bytes"), list) for e in entries):
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        texts = [decoder.decode(bytes(e["bytes"])) for e in entries]
        texts[-1] += decoder.decode(b"", final=True)
        return texts
    return [str(e.get("token", "")) for e in entries]


def alternative_text(alt: dict) -> str:
    if isinstance(alt.get("bytes"), list):
        return bytes(alt["bytes"]).decode("utf-8", "replace")
    return str(alt.get("token", ""))


def parse_answer(raw: str, request: ApiRequest) -> Answer:
    """Check and read a 200 answer. BadAnswer: retry; FatalApiError: the endpoint cannot do what is asked."""
    try:
        data = json.loads(raw)
    except ValueError:
        raise BadAnswer(f"the answer is not JSON ({len(raw)} characters)") from None
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
        raise BadAnswer("the answer has no choices list")
    choices = data["choices"]
    if not choices:
        raise BadAnswer("the answer has no choices", kind="empty")
    texts, pieces = [], []
    for choice in choices:
        message = choice.get("message") if isinstance(choice, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if content is not None and not isinstance(content, str):
            raise BadAnswer("a choice's message.content is not text")
        texts.append(content or "")
        entries = None
        if request.body.get("logprobs") and content:
            logprobs = choice.get("logprobs") or {}
            entries = logprobs.get("content") if isinstance(logprobs, dict) else None
            if not isinstance(entries, list):
                raise FatalApiError("teacher_api.logprobs: the endpoint answered without logprobs; use an endpoint "
                                    "that returns them (OpenAI, vLLM, nlgkd serve) or set logprobs: false")
            try:
                entries = [(text, float(e["logprob"]),
                            [(alternative_text(a), float(a["logprob"])) for a in e.get("top_logprobs") or []])
                           for text, e in zip(piece_texts(entries), entries)]
            except (KeyError, TypeError, ValueError, AttributeError):
                raise BadAnswer("malformed logprobs") from None
        pieces.append(entries)
    if all(not t.strip() for t in texts):
        raise BadAnswer("every choice is empty", kind="empty")
    if len(choices) != request.n:
        raise FatalApiError(f"asked for n={request.n} outputs, the endpoint gave {len(choices)}: it ignores n; set "
                            "teacher_api.n_per_request: false to send one request per output")
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    prompt_tokens = usage.get("prompt_tokens")
    completion_tokens = usage.get("completion_tokens")
    if not isinstance(prompt_tokens, int):
        prompt_tokens = request.prompt_tokens  # endpoints without usage: the estimate stands in
    if not isinstance(completion_tokens, int):
        completion_tokens = sum(len(p) if p else estimate_tokens(t) for t, p in zip(texts, pieces))
    return Answer(texts, pieces, prompt_tokens, completion_tokens)


# --------------------------------------------------------------------------------------------- cache
class ResponseCache:
    """Answers on disk (SQLite, one row per request key), committed as each arrives; failures for the record."""

    def __init__(self, path: str | Path, readonly: bool = False):
        self.path = Path(path)
        if readonly:
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True) if self.path.exists() else None
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.path), isolation_level=None, timeout=60)  # autocommit
        self.db.execute("PRAGMA journal_mode=WAL")  # a kill loses nothing committed; readers never block
        self.db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, model TEXT, request TEXT, "
                        "response TEXT, prompt_tokens INTEGER, completion_tokens INTEGER, cost REAL, created REAL)")
        self.db.execute("CREATE TABLE IF NOT EXISTS failures (key TEXT, stage TEXT, error TEXT, attempts INTEGER, "
                        "created REAL)")

    def get(self, keys: list[str]) -> dict[str, tuple[str, float]]:
        """key -> (raw response, cost) for the keys that are cached."""
        if self.db is None:
            return {}
        found = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for key, response, cost in self.db.execute(
                    f"SELECT key, response, cost FROM responses WHERE key IN ({marks})", chunk):
                found[key] = (response, cost)
        return found

    def put(self, request: ApiRequest, raw: str, answer: Answer, cost: float) -> None:
        self.db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (request.key, request.body["model"], json.dumps(request.body, ensure_ascii=False), raw,
                         answer.prompt_tokens, answer.completion_tokens, cost, time.time()))

    def record_failure(self, key: str, stage: str, error: str, attempts: int) -> None:
        self.db.execute("INSERT INTO failures VALUES (?, ?, ?, ?, ?)", (key, stage, error, attempts, time.time()))

    def close(self) -> None:
        if self.db is not None:
            self.db.close()


# ---------------------------------------------------------------------------------- limits, budget
class RateLimiter:
    """Requests and tokens per minute, spaced evenly: each request moves the next free slot on by
    max(60 / rpm, tokens * 60 / tpm) seconds. `pause` holds every request back (a 429's Retry-After)."""

    def __init__(self, requests_per_minute: float | None, tokens_per_minute: float | None):
        self.rpm, self.tpm = requests_per_minute, tokens_per_minute
        self.next_slot = 0.0
        self.paused_until = 0.0
        self.waited_s = 0.0  # planned spacing, summed over requests: > 0 means the limits held the stage back
        self.slots: list[float] = []  # each request's planned start (monotonic clock), in order of asking

    def pause(self, seconds: float) -> None:
        self.paused_until = max(self.paused_until, time.monotonic() + seconds)

    async def wait(self, tokens: int) -> None:
        now = time.monotonic()
        start = max(now, self.next_slot, self.paused_until)
        interval = max(60.0 / self.rpm if self.rpm else 0.0, tokens * 60.0 / self.tpm if self.tpm else 0.0)
        self.next_slot = start + interval
        self.slots.append(start)
        self.waited_s += start - now
        await asyncio.sleep(start - now)
        while time.monotonic() < self.paused_until:  # a pause that began while this request waited
            await asyncio.sleep(self.paused_until - time.monotonic())


@dataclass
class Budget:
    """What this stage may still spend. Reservations are worst cases; `settle` books the real usage.
    The prompt estimate (characters / 4) is scaled by the largest real/estimated ratio seen so far."""

    max_cost: Optional[float]
    max_tokens: Optional[int]
    input_price: float  # per million tokens
    output_price: float
    spent_cost: float = 0.0
    spent_tokens: int = 0
    reserved_cost: float = 0.0
    reserved_tokens: int = 0
    prompt_scale: float = 1.0
    exhausted: bool = False

    def cost(self, prompt_tokens: float, completion_tokens: float) -> float:
        return (prompt_tokens * self.input_price + completion_tokens * self.output_price) / 1e6

    def worst_case(self, request: ApiRequest) -> tuple[float, int]:
        prompt = math.ceil(request.prompt_tokens * self.prompt_scale)
        completion = request.n * request.body["max_tokens"]
        return self.cost(prompt, completion), prompt + completion

    def reserve(self, request: ApiRequest) -> Optional[tuple[float, int]]:
        cost, tokens = self.worst_case(request)
        if self.exhausted or (
                self.max_cost is not None and self.spent_cost + self.reserved_cost + cost > self.max_cost) or (
                self.max_tokens is not None and self.spent_tokens + self.reserved_tokens + tokens > self.max_tokens):
            self.exhausted = True  # stop at the first request that does not fit: no cheaper one jumps the queue
            return None
        self.reserved_cost += cost
        self.reserved_tokens += tokens
        return cost, tokens

    def settle(self, reservation: tuple[float, int], request: ApiRequest, answer: Optional[Answer]) -> float:
        """Release a reservation and book what the answer used (nothing for a failure); returns its cost."""
        self.reserved_cost -= reservation[0]
        self.reserved_tokens -= reservation[1]
        if answer is None:
            return 0.0
        if request.prompt_tokens:
            self.prompt_scale = max(self.prompt_scale, answer.prompt_tokens / request.prompt_tokens)
        cost = self.cost(answer.prompt_tokens, answer.completion_tokens)
        self.spent_cost += cost
        self.spent_tokens += answer.prompt_tokens + answer.completion_tokens
        return cost


@dataclass
class ApiStats:
    """What stage.json records under `api`."""

    requests_needed: int = 0  # distinct requests of the stage
    duplicate_requests: int = 0  # inputs whose request equals another's (sent once)
    cache_hits: int = 0
    http_requests: int = 0  # sent in this run, retries included
    answered: int = 0  # answered in this run
    retries: int = 0
    retry_causes: Counter = field(default_factory=Counter)
    failures: int = 0
    not_sent: int = 0  # left when the budget ran out or the stage stopped
    prompt_tokens: int = 0  # this run
    completion_tokens: int = 0
    cost: float = 0.0  # this run, from the recipe's prices
    cached_cost: float = 0.0  # what the cache hits cost when they were paid
    budget_reached: bool = False
    seconds: float = 0.0
    rate_limit_wait_s: float = 0.0  # summed over requests: how long the rate limits held them back

    def record(self) -> dict:
        out = {k: v for k, v in self.__dict__.items()}
        out["retry_causes"] = dict(self.retry_causes)
        out["cost"] = round(self.cost, 6)
        out["cached_cost"] = round(self.cached_cost, 6)
        return out


# ------------------------------------------------------------------------------------------- sending
@dataclass
class Failure:
    error: str
    attempts: int


def retry_after_seconds(headers) -> Optional[float]:
    """Seconds from `retry-after-ms` or `retry-after` (seconds or an HTTP date); None if absent."""
    if headers is None:
        return None
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(0.0, float(value) / divisor)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value:
        from email.utils import parsedate_to_datetime

        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None
    return None


class Sender:
    """Sends requests with bounded concurrency, rate limits, retries and the budget; caches every answer."""

    def __init__(self, api, cache: ResponseCache, stats: ApiStats, budget: Budget, stage: str,
                 api_key: Optional[str], on_done=None, warn=print):
        self.api, self.cache, self.stats, self.budget, self.stage = api, cache, stats, budget, stage
        self.api_key = api_key
        self.limiter = RateLimiter(api.requests_per_minute, api.tokens_per_minute)
        self.on_done = on_done or (lambda: None)
        self.warn = warn
        self.fatal: Optional[str] = None
        self.rng = random.Random()  # jitter only; answers do not depend on it

    def clean(self, text: str) -> str:
        """An error text safe for logs and files: no key, one line, short."""
        if self.api_key:
            text = text.replace(self.api_key, "***")
        return " ".join(text.split())[:300]

    def backoff(self, attempt: int) -> float:
        # "equal jitter": half the exponential step is fixed, half random, so retries spread out
        step = min(self.api.backoff_max, self.api.backoff * 2 ** attempt)
        return step * self.rng.uniform(0.5, 1.0)

    async def run(self, requests: list[ApiRequest]) -> dict[str, Answer | Failure]:
        import openai

        client = openai.AsyncOpenAI(
            # an endpoint that needs no key still gets a placeholder: the client refuses none, and this keeps
            # it from falling back to OPENAI_API_KEY for a server the recipe did not give that key to
            api_key=self.api_key or "no-key", base_url=self.api.base_url, max_retries=0,
            timeout=self.api.timeout)
        queue: asyncio.Queue = asyncio.Queue()
        for request in requests:
            queue.put_nowait(request)
        results: dict[str, Answer | Failure] = {}
        try:
            workers = [asyncio.create_task(self.worker(client, queue, results))
                       for _ in range(max(1, min(self.api.concurrency, len(requests))))]
            await asyncio.gather(*workers)
        finally:
            await client.close()
        self.stats.not_sent += queue.qsize()
        return results

    async def worker(self, client, queue: asyncio.Queue, results: dict) -> None:
        while not queue.empty():
            if self.fatal is not None:
                return
            request = queue.get_nowait()
            reservation = self.budget.reserve(request)
            if reservation is None:
                self.stats.budget_reached = True
                queue.put_nowait(request)  # counted as not sent
                return
            try:
                result = await self.send(client, request)
            except FatalApiError as err:
                self.fatal = self.fatal or self.clean(str(err))
                self.budget.settle(reservation, request, None)
                self.stats.not_sent += 1
                return
            answer = result[1] if isinstance(result, tuple) else None
            cost = self.budget.settle(reservation, request, answer)
            if answer is not None:
                self.cache.put(request, result[0], answer, cost)  # committed before anything else happens
                results[request.key] = answer
                self.stats.answered += 1
                self.stats.prompt_tokens += answer.prompt_tokens
                self.stats.completion_tokens += answer.completion_tokens
                self.stats.cost += cost
            else:
                results[request.key] = result
                self.stats.failures += 1
                self.cache.record_failure(request.key, self.stage, result.error, result.attempts)
                self.warn(f"request failed after {result.attempts} attempt(s): {result.error}")
            self.on_done()

    def status_cause(self, err) -> tuple[str | None, str]:
        """(retry cause, message) of an HTTP error answer; cause None: not worth sending again. A refused key or
        an unknown model or address will never work: FatalApiError stops the stage."""
        api, status = self.api, err.status_code
        error = f"HTTP {status}: {self.clean(str(err.message))}"
        if status in (401, 403):
            where = f"${api.api_key_env}" if api.api_key_env else "no key (api_key_env: null)"
            raise FatalApiError(f"the endpoint refused the key ({status}); check teacher_api.api_key_env "
                                f"(the key is read from {where})") from None
        if status == 404:
            raise FatalApiError(f"the endpoint answered 404: check teacher_api.model ({api.model!r}) and "
                                f"teacher_api.base_url ({api.base_url!r}): {error}") from None
        if status == 429:
            return "rate_limited", error
        return ("server_error" if status >= 500 or status in (408, 409) else None), error

    async def send(self, client, request: ApiRequest) -> tuple[str, Answer] | Failure:
        """(raw answer, parsed answer) or a Failure once the retries are spent; FatalApiError to stop."""
        import openai

        api = self.api
        error = ""
        for attempt in range(api.max_retries + 1):
            if attempt:
                self.stats.retries += 1
            await self.limiter.wait(self.budget.worst_case(request)[1])
            if self.fatal is not None:
                raise FatalApiError(self.fatal)
            self.stats.http_requests += 1
            wait = None
            try:
                # the client's timeout bounds each wait on the network (connect, the silence before the
                # answer); the outer one, an answer that trickles in forever. Neither counts the client's
                # first-call set-up, which takes seconds on a busy machine
                raw = await asyncio.wait_for(
                    client.chat.completions.with_raw_response.create(**request.body, timeout=api.timeout),
                    timeout=4 * api.timeout + 10)
                text = raw.text
                return text, parse_answer(text, request)
            except FatalApiError:
                raise
            except BadAnswer as err:
                cause, error = err.kind, str(err)
            except (asyncio.TimeoutError, openai.APITimeoutError):
                cause, error = "timeout", f"no answer within {api.timeout}s"
            except openai.APIConnectionError as err:
                cause, error = "connection", f"connection failed ({type(err.__cause__ or err).__name__})"
            except openai.APIStatusError as err:
                cause, error = self.status_cause(err)
                if cause is None:  # 400, 413, 422...: this request is wrong; sending it again will not help
                    return Failure(self.clean(error), attempt + 1)
                wait = retry_after_seconds(err.response.headers if err.response is not None else None)
            except (openai.OpenAIError, ValueError) as err:  # e.g. a body the client could not read
                cause, error = "malformed", f"{type(err).__name__}: {err}"
            self.stats.retry_causes[cause] += 1
            if attempt == api.max_retries:
                break
            if wait is not None:
                wait = min(wait, RETRY_AFTER_CAP) * self.rng.uniform(1.0, 1.1)
                if cause == "rate_limited":
                    self.limiter.pause(wait)  # the whole client slows down, not just this request
            else:
                wait = self.backoff(attempt)
            await asyncio.sleep(wait)
        return Failure(self.clean(f"{cause}: {error}"), api.max_retries + 1)


def api_key_from_env(api, required: bool = True) -> Optional[str]:
    if api.api_key_env is None:
        return None
    key = os.environ.get(api.api_key_env, "")
    if not key and required:
        raise ValueError(f"teacher_api.api_key_env: the environment variable {api.api_key_env} is not set; export "
                         "it (keys are read only from the environment, never from the recipe), or set "
                         "api_key_env: null for an endpoint that needs no key")
    return key or None


def check_config(api) -> None:
    if not 0 <= api.top_logprobs <= 20:
        raise ValueError(f"teacher_api.top_logprobs: must be between 0 and 20 (the API's limit), got {api.top_logprobs}")
    if api.top_logprobs and not api.logprobs:
        raise ValueError("teacher_api.top_logprobs: needs logprobs: true")
    if "{source}" not in api.prompt:
        raise ValueError("teacher_api.prompt: must contain {source}, where the input goes")
    if api.concurrency < 1:
        raise ValueError(f"teacher_api.concurrency: must be at least 1, got {api.concurrency}")
