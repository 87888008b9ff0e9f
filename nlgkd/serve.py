"""`nlgkd serve MODEL_DIR`: an OpenAI-compatible chat-completions server over a local seq2seq or causal model,
or over its CTranslate2 export (`nlgkd export`; no logprobs from those: a 400 says so).

It lets you self-host a teacher for a `pseudo_targets` stage with `teacher_api:` (and it is what the tests
talk to). Endpoints:
    GET  /v1/models             the one served model
    POST /v1/chat/completions   n, temperature (0 = greedy), top_p, max_tokens / max_completion_tokens, seed,
                                logprobs, top_logprobs (<= 20); no streaming
How chat messages become the model's input:
    encoder-decoder     the last user message's text is the source, tokenized as nlgkd tokenizes sources
    decoder-only        the tokenizer's chat template when it has one; else the last user message followed
                        by EOS, the `source + </s> + target` layout nlgkd trains decoder-only models on
System messages and earlier turns (k-shot examples) are ignored by the first and the last layout: a
fine-tuned teacher does not read instructions.

Logprobs are those of the model's own distribution at temperature 1 (log-softmax of the raw logits), as
OpenAI reports them. `logprobs.content` has one entry per generated token up to, not including, EOS; each
`token` is the text that token adds to the decoded output (pieces concatenate to `message.content`; a token
that ends inside a multi-byte character adds "" and the next one the whole character) and `bytes` its UTF-8
bytes. `top_logprobs` entries are the top tokens decoded on their own.

Requests are batched (dynamic batching): one worker thread runs the model; the first waiting request opens
a batch, and requests that arrive within `batch_wait_ms` (default 5 ms; no wait when the last batch held
one request and none is waiting, so a lone client pays nothing) with the same generation settings
(greedy, or the same n, temperature and top_p; the same max_tokens and logprobs) join it, up to `max_batch`
(default 16). Inputs are padded (right for encoder-decoders, left for decoder-only models) and decoded in one
`generate` call, which gives a PyTorch model's one-at-a-time answers (a test compares them); a CTranslate2 int8
export quantizes activations per batch, so its greedy answer to an input can vary slightly with the traffic
it shares a batch with (`--max-batch 1` pins it). A request with a `seed` runs alone, so its sampling stays
repeatable whatever else arrives. A request whose client has gone is skipped; a failed batch is retried one
request at a time. `nlgkd serve --max-batch 1` answers one request at a time.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import queue
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import StoppingCriteria, StoppingCriteriaList

from .config import DecodingConfig
from .data import pad, truncate
from .generation import generate_with, generation_config, position_limit

MAX_TOP_LOGPROBS = 20  # the OpenAI API's limit
MAX_N = 64
MAX_SEED = 2**63 - 1  # torch.manual_seed takes a 64-bit integer


class StopWhen(StoppingCriteria):
    """Ends a whole `generate` call at the next token once `should_stop()` is true (every client of a batch has
    gone); `stopped` says whether it did."""

    def __init__(self, should_stop: Callable[[], bool]):
        self.should_stop, self.stopped = should_stop, False

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        stop = self.should_stop()
        self.stopped = self.stopped or stop
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class ApiError(Exception):
    """An OpenAI-style error answer."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def error_response(status: int, message: str, param: str | None = None,
                   kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(status_code=status,
                        content={"error": {"message": message, "type": kind, "param": param, "code": None}})


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # name, tool_calls...: not used by a local model
    role: str
    content: Union[str, list[dict[str, Any]], None] = None


class ChatRequest(BaseModel):
    # unknown parameters are refused, not ignored: stop, penalties, logit_bias, tools... would change the answer
    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = None
    messages: list[ChatMessage]
    # null means the default, as in the OpenAI API (some clients send explicit nulls)
    # strict: `max_tokens: true` or `"n": "2"` is an error, not 1 or 2
    n: Optional[StrictInt] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    max_tokens: Optional[StrictInt] = None
    max_completion_tokens: Optional[StrictInt] = None
    logprobs: Optional[StrictBool] = None
    top_logprobs: Optional[StrictInt] = None
    seed: Optional[StrictInt] = None
    stream: Optional[StrictBool] = None
    user: Optional[str] = None  # accepted and ignored: it only identifies the caller

    def with_defaults(self) -> "ChatRequest":
        defaults = {"n": 1, "temperature": 1.0, "top_p": 1.0, "logprobs": False, "stream": False}
        return self.model_copy(update={k: v for k, v in defaults.items() if getattr(self, k) is None})


def message_text(message: ChatMessage) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


def check_request(req: ChatRequest, served_name: str, max_tokens_cap: int | None = None) -> None:
    if req.stream:
        raise ApiError(400, "stream: true is not supported by nlgkd serve; send stream: false", "stream")
    if req.model is not None and req.model != served_name:
        raise ApiError(404, f"model {req.model!r} is not served here; this server serves {served_name!r}", "model",
                       kind="not_found_error")
    if not req.messages:
        raise ApiError(400, "messages: expected at least one message", "messages")
    if not any(m.role == "user" for m in req.messages):
        raise ApiError(400, "messages: no user message; the last user message is the model's input", "messages")
    for i, message in enumerate(req.messages):
        if isinstance(message.content, list) and not all(isinstance(part.get("text", ""), str)
                                                         for part in message.content):
            raise ApiError(400, f"messages[{i}].content: a text part's text must be a string", "messages")
        for field, text in (("role", message.role), ("content", message_text(message))):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:  # JSON's "\ud800" escape: a lone surrogate no tokenizer can read
                raise ApiError(400, f"messages[{i}].{field}: not valid Unicode at character {err.start} (a lone "
                                    "surrogate); send UTF-8 text", "messages") from None
    if not 1 <= req.n <= MAX_N:
        raise ApiError(400, f"n: must be between 1 and {MAX_N}, got {req.n}", "n")
    if not 0.0 <= req.temperature <= 2.0:
        raise ApiError(400, f"temperature: must be between 0 and 2, got {req.temperature}", "temperature")
    if not 0.0 < req.top_p <= 1.0:
        raise ApiError(400, f"top_p: must be in (0, 1], got {req.top_p}", "top_p")
    for name in ("max_tokens", "max_completion_tokens"):
        value = getattr(req, name)
        if value is not None and value < 1:
            raise ApiError(400, f"{name}: must be at least 1, got {value}", name)
        if value is not None and max_tokens_cap is not None and value > max_tokens_cap:
            raise ApiError(400, f"{name}: at most {max_tokens_cap} on this server (nlgkd serve --max-tokens-cap), "
                                f"got {value}", name)
    if req.seed is not None and not 0 <= req.seed <= MAX_SEED:
        raise ApiError(400, f"seed: must be between 0 and {MAX_SEED}, got {req.seed}", "seed")
    if req.top_logprobs is not None:
        if not req.logprobs:
            raise ApiError(400, "top_logprobs: needs logprobs: true", "top_logprobs")
        if not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ApiError(400, f"top_logprobs: must be between 0 and {MAX_TOP_LOGPROBS}, got {req.top_logprobs}",
                           "top_logprobs")


# ------------------------------------------------------------------------------------------ the model
class ServedModel:
    """A model and its tokenizer, and one function: chat request -> OpenAI chat.completion dict."""

    def __init__(self, model, tokenizer, name: str, max_source_length: int = 512, default_max_tokens: int = 256,
                 max_tokens_cap: int = 1024, max_body_bytes: int = 1 << 20, max_batch: int = 16,
                 batch_wait_ms: float = 5.0):
        # a PyTorch model, or an inference engine's export (nlgkd/engine.py: EngineModel)
        self.engine = not isinstance(model, torch.nn.Module)
        self.model = model if self.engine else model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.max_source_length = max_source_length
        self.default_max_tokens = min(default_max_tokens, max_tokens_cap)
        self.max_tokens_cap = max_tokens_cap  # no request asks for more: one request cannot hold the model
        self.max_body_bytes = max_body_bytes
        self.encoder_decoder = (model.encoder_decoder if self.engine
                                else bool(getattr(model.config, "is_encoder_decoder", False)))
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_ms / 1000
        self.waiting: queue.Queue = queue.Queue()  # (request, input ids, future) for the worker thread
        self.worker: threading.Thread | None = None
        self.worker_lock = threading.Lock()
        self.generate_calls = 0  # batches run (what the tests and eval/bench_serve.py read)
        self.abandoned_batches = 0  # batches stopped because every client of theirs went away
        self.last_batch_size = 2  # > 1: the first request waits batch_wait_ms for others (see `work`)

    def input_ids(self, messages: list[ChatMessage]) -> list[int]:
        tok = self.tokenizer
        if not self.encoder_decoder and getattr(tok, "chat_template", None):
            chat = [{"role": m.role, "content": message_text(m)} for m in messages]
            ids = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
            return list(ids)
        source = next(message_text(m) for m in reversed(messages) if m.role == "user")
        if not source.strip():
            raise ApiError(400, "messages: the last user message is empty", "messages")
        ids = truncate(tok(source, add_special_tokens=True)["input_ids"], self.max_source_length)
        if not self.encoder_decoder:
            from .data import causal_prompt

            ids = causal_prompt(ids, tok.eos_token_id)
        return ids

    # ---------------------------------------------------------------------------------- batching
    def submit(self, req: ChatRequest) -> concurrent.futures.Future:
        """Queue a checked request for the worker thread; the future gets its chat.completion dict. A bad
        input (an empty message) raises ApiError here, before anything is queued. It tokenizes: call it from a
        worker thread, not from the event loop (the endpoint does)."""
        req = req.with_defaults()
        if self.engine and req.logprobs:
            raise ApiError(400, "logprobs: this server runs a CTranslate2 export, which does not report token "
                                "log-probabilities; serve the PyTorch stage folder it was exported from for them",
                           "logprobs")
        ids = self.input_ids(req.messages)
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.abandoned = threading.Event()  # set when its client goes away (the endpoint watches the connection)
        with self.worker_lock:
            if self.worker is None:
                self.worker = threading.Thread(target=self.work, name="nlgkd-serve-model", daemon=True)
                self.worker.start()
        self.waiting.put((req, ids, future))
        return future

    def complete(self, req: ChatRequest) -> dict:
        """The chat.completion dict of one request (waits for its batch)."""
        return self.submit(req).result()

    def batch_key(self, req: ChatRequest, ids: list[int]) -> tuple | None:
        """Requests with equal keys can share one generate call; None: this one runs alone (a seed, or a
        decoder-only prompt so long that its answer is cut at the model's positions: batched, it would cut the
        answers of the shorter prompts padded to its length)."""
        max_new = self.max_new_tokens(req)
        limit = None if self.engine or self.encoder_decoder else position_limit(self.model)
        if req.seed is not None or (limit is not None and len(ids) + max_new > limit):
            return None
        if req.temperature == 0.0:  # greedy: n equal answers are copies of one
            return ("greedy", max_new, bool(req.logprobs))
        return ("sample", req.n, req.temperature, req.top_p, max_new, bool(req.logprobs))

    def max_new_tokens(self, req: ChatRequest) -> int:
        return req.max_completion_tokens or req.max_tokens or self.default_max_tokens

    def work(self) -> None:
        """The worker thread: take the first waiting request, gather those that can join it for up to
        batch_wait_ms, run them as one batch; requests that cannot join wait for the next batch."""
        held: collections.deque = collections.deque()
        while True:
            first = held.popleft() if held else self.waiting.get()
            batch = [first]
            key = self.batch_key(first[0], first[1])
            if key is not None and self.max_batch > 1:
                # wait for company only when there has been some: a lone client would pay the wait every time
                busy = self.last_batch_size > 1 or not self.waiting.empty() or bool(held)
                deadline = time.monotonic() + (self.batch_wait_s if busy else 0.0)
                for other in list(held):  # held earlier by another batch: they are already waiting longest
                    if len(batch) < self.max_batch and self.batch_key(other[0], other[1]) == key:
                        held.remove(other)
                        batch.append(other)
                while len(batch) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                    try:
                        item = self.waiting.get(timeout=left)
                    except queue.Empty:
                        break
                    same = self.batch_key(item[0], item[1]) == key
                    (batch if same else held).append(item)
            # a request whose client went away (its future cancelled) is not decoded
            batch = [item for item in batch if item[2].set_running_or_notify_cancel()]
            self.last_batch_size = max(1, len(batch))
            if batch:
                self.run_batch(batch)

    def run_batch(self, batch: list) -> None:
        """Answer every request of `batch`; never raises (the worker thread must outlive any request). When the
        batch fails (e.g. out of memory at 16 rows), each request is tried alone and gets its own outcome."""
        def abandoned() -> bool:  # every client of the batch has gone: the decode stops at its next token
            return all(future.abandoned.is_set() for _, _, future in batch)

        try:
            answers = self.answer_batch([(req, ids) for req, ids, _ in batch], abandoned)
        except Exception as err:  # noqa: BLE001 - reported to the requests, not to the thread
            if len(batch) > 1:
                for item in batch:
                    self.run_batch([item])
                return
            batch[0][2].set_exception(err)
            return
        for (_, _, future), answer in zip(batch, answers):
            future.set_result(answer)

    def decoding_for(self, req: ChatRequest) -> DecodingConfig:
        """The request's settings as a decoding block: served answers decode through the same settings function
        as every stage (OpenAI sampling has no top-k, so top_k is 0: off)."""
        greedy = req.temperature == 0.0
        return DecodingConfig(strategy="greedy" if greedy else "sample", num_return_sequences=1 if greedy else req.n,
                              temperature=req.temperature if not greedy else 1.0, top_p=req.top_p, top_k=0,
                              max_new_tokens=self.max_new_tokens(req))

    @torch.inference_mode()
    def answer_batch(self, batch: list[tuple[ChatRequest, list[int]]], abandoned=lambda: False) -> list[dict]:
        """One generate call for requests with the same settings (`batch_key`); their chat.completion dicts.
        `abandoned()` true: every client has gone, and decoding stops (`abandoned_batches` counts it)."""
        if self.engine:
            return self.answer_batch_with_engine(batch)
        req = batch[0][0]
        greedy = req.temperature == 0.0
        tok = self.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        # encoder-decoders pad on the right, decoder-only models on the left (their answer follows the prompt)
        input_ids, attention_mask = pad([ids for _, ids in batch], pad_id, left=not self.encoder_decoder)
        try:  # max_tokens is cut to the positions the model has left: such an answer ends with "length"
            config = generation_config(self.decoding_for(req), self.model, tok,
                                       prompt_length=0 if self.encoder_decoder else input_ids.shape[1])
        except ValueError as err:
            raise ApiError(400, f"messages: {err}", "messages") from None
        config.return_dict_in_generate = True
        config.output_logits = bool(req.logprobs)
        device = next(self.model.parameters()).device
        if req.seed is not None:  # runs alone (batch_key): the seed fixes its samples
            torch.manual_seed(req.seed)
        watch = StopWhen(abandoned)
        out = generate_with(self.model, config, input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                            stopping_criteria=StoppingCriteriaList([watch]))
        self.generate_calls += 1
        self.abandoned_batches += watch.stopped
        # after the decoder start token / the padded prompt
        start = 1 if self.encoder_decoder else input_ids.shape[1]
        per_request = 1 if greedy else req.n
        logprobs = torch.log_softmax(torch.stack(out.logits, dim=1).float(), dim=-1) if req.logprobs else None
        answers = []
        for i, (request, ids) in enumerate(batch):
            span = slice(i * per_request, (i + 1) * per_request)
            answers.append(self.answer(request, ids, out.sequences[span, start:].tolist(),
                                       None if logprobs is None else logprobs[span]))
        return answers

    def answer_batch_with_engine(self, batch: list[tuple[ChatRequest, list[int]]]) -> list[dict]:
        """`answer_batch` for an exported model: one engine call for the batch (no logprobs: refused in submit)."""
        import random

        req = batch[0][0]
        seed = req.seed if req.seed is not None else random.randrange(2**31)
        rows = self.model.generate_ids([ids for _, ids in batch], self.decoding_for(req), seed)
        self.generate_calls += 1
        return [self.answer(request, ids, sequences, None) for (request, ids), sequences in zip(batch, rows)]

    def answer(self, req: ChatRequest, ids: list[int], sequences: list[list[int]], logprobs) -> dict:
        """The chat.completion dict of one request from its generated token rows (and their log-probs)."""
        tok = self.tokenizer
        greedy = req.temperature == 0.0
        choices, completion_tokens = [], 0
        for row, seq in enumerate(sequences):
            ended = tok.eos_token_id in seq
            tokens = seq[: seq.index(tok.eos_token_id)] if ended else seq
            completion_tokens += len(tokens) + int(ended)
            text = tok.decode(tokens, skip_special_tokens=True).strip()  # as evaluate and PTs write it
            choice = {"index": row, "message": {"role": "assistant", "content": text},
                      "finish_reason": "stop" if ended else "length", "logprobs": None}
            if logprobs is not None:
                pieces = stripped(token_pieces(tok, tokens))
                text = "".join(pieces)
                choice["message"]["content"] = text
                choice["logprobs"] = {"content": self.logprob_entries(tokens, pieces, logprobs[row],
                                                                      req.top_logprobs or 0)}
            choices.append(choice)
        if greedy and req.n > 1:
            choices = [{**choices[0], "index": i} for i in range(req.n)]
            completion_tokens *= req.n
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": self.name, "system_fingerprint": None, "choices": choices,
            "usage": {"prompt_tokens": len(ids), "completion_tokens": completion_tokens,
                      "total_tokens": len(ids) + completion_tokens},
        }

    def logprob_entries(self, tokens: list[int], pieces: list[str], logprobs: torch.Tensor, top: int) -> list[dict]:
        entries = []
        if top:
            top_values, top_ids = logprobs[: len(tokens)].topk(top, dim=-1)
        # the answer's text is stripped (`stripped`): so are the alternatives up to its first visible token
        first_visible = next((t for t, piece in enumerate(pieces) if piece), len(pieces))
        for t, (token_id, piece) in enumerate(zip(tokens, pieces)):
            alternatives = []
            if top:
                for value, alt in zip(top_values[t].tolist(), top_ids[t].tolist()):
                    alt_text = self.tokenizer.decode([alt])
                    alt_text = alt_text.lstrip() if t <= first_visible else alt_text
                    alternatives.append({"token": alt_text, "logprob": value, "bytes": list(alt_text.encode())})
            entries.append({"token": piece, "logprob": logprobs[t, token_id].item(), "bytes": list(piece.encode()),
                            "top_logprobs": alternatives})
        return entries


def token_pieces(tokenizer, tokens: list[int]) -> list[str]:
    """The text each token adds to the decoded output; the pieces concatenate to the decoded text.

    Decoding prefixes: a token that ends inside a multi-byte character (the decoded prefix ends in U+FFFD)
    adds "" until the character is complete."""
    pieces, done = [], ""
    for i in range(len(tokens)):
        text = tokenizer.decode(tokens[: i + 1], skip_special_tokens=True)
        if text.endswith("\ufffd") and i + 1 < len(tokens):
            pieces.append("")
            continue
        if text.startswith(done):
            pieces.append(text[len(done):])
        else:  # a decoder that rewrites earlier text (clean-up of spaces): the token adds what is new
            common = 0
            while common < min(len(done), len(text)) and done[common] == text[common]:
                common += 1
            pieces.append(text[common:])
            text = done[:common] + text[common:]
        done = text
    return pieces


def stripped(pieces: list[str]) -> list[str]:
    """`pieces` whose concatenation is the stripped text: the leading space a word-start token decodes with
    (" Zwei") and trailing space go, so a served answer is the text evaluate scores, token by token."""
    pieces = list(pieces)
    for i in range(len(pieces)):
        pieces[i] = pieces[i].lstrip()
        if pieces[i]:
            break
    for i in reversed(range(len(pieces))):
        pieces[i] = pieces[i].rstrip()
        if pieces[i]:
            break
    return pieces


# --------------------------------------------------------------------------------------------- app
def create_app(served: ServedModel) -> FastAPI:
    app = FastAPI(title="nlgkd serve", version="1")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        return error_response(err.status, err.message, err.param, err.kind)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, err: RequestValidationError):
        problems = "; ".join(
            f"body: not valid JSON at character {e['loc'][-1]} ({(e.get('ctx') or {}).get('error', e['msg'])}); send "
            "a JSON object such as {\"messages\": [{\"role\": \"user\", \"content\": \"...\"}]}"
            if e.get("type") == "json_invalid" else f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}"
            for e in err.errors())
        return error_response(400, f"invalid request: {problems}")

    @app.exception_handler(StarletteHTTPException)  # unknown paths, wrong methods: the same error shape
    async def http_error(request: Request, err: StarletteHTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return error_response(err.status_code, f"{request.method} {request.url.path}: {err.detail}", kind=kind)

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        declared = request.headers.get("content-length")
        size = int(declared) if declared and declared.isdigit() else len(await request.body())
        if size > served.max_body_bytes:
            return error_response(413, f"request body of {size:,} bytes; this server takes at most "
                                       f"{served.max_body_bytes:,} (nlgkd serve --max-body-bytes)")
        return await call_next(request)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": 0,
                                            "owned_by": "nlgkd"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        req = req.with_defaults()
        check_request(req, served.name, served.max_tokens_cap)
        # tokenizing a long message takes a while: not on the event loop, which serves every connection
        future = await asyncio.to_thread(served.submit, req)
        answer = asyncio.wrap_future(future)

        async def client_gone() -> None:  # the body is read: the next ASGI message is the disconnect
            while (await request.receive())["type"] != "http.disconnect":
                pass

        watcher = asyncio.ensure_future(client_gone())
        await asyncio.wait({answer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if answer.done():
            watcher.cancel()
            return answer.result()
        # nobody will read the answer: not decoded if it has not started, stopped at its next token if it has
        future.abandoned.set()
        future.cancel()
        answer.cancel()
        return error_response(499, "the client closed the connection", kind="client_closed_request")

    return app


def load_served_model(model_dir: str, name: str | None = None, device: str | None = None,
                      max_source_length: int = 512, default_max_tokens: int = 256, max_tokens_cap: int = 1024,
                      max_body_bytes: int = 1 << 20, max_batch: int = 16, batch_wait_ms: float = 5.0) -> ServedModel:
    from .engine import EngineModel, is_export
    from .models import load_pretrained

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if is_export(model_dir):  # a CTranslate2 export (`nlgkd export`, an export stage)
        model = EngineModel(model_dir, device=device)
        tokenizer = model.tokenizer
    else:
        model, tokenizer = load_pretrained(model_dir)
        model.to(device)
    return ServedModel(model, tokenizer, name or Path(model_dir).resolve().name, max_source_length,
                       default_max_tokens, max_tokens_cap, max_body_bytes, max_batch, batch_wait_ms)


class BackgroundServer:
    """`with BackgroundServer(create_app(served)) as server:` serves on 127.0.0.1 at a free port in a thread of
    this process, until the block ends (tests, benchmarks, notebooks); `server.base_url` is the /v1 root."""

    def __init__(self, app, host: str = "127.0.0.1", start_timeout_s: float = 30.0):
        import socket

        import uvicorn

        with socket.socket() as probe:
            probe.bind((host, 0))
            self.port = probe.getsockname()[1]
        self.host, self.start_timeout_s = host, start_timeout_s
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.time() + self.start_timeout_s
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the server on {self.base_url} did not start within {self.start_timeout_s} s")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, name: str | None = None,
          max_source_length: int = 512, default_max_tokens: int = 256, log_level: str = "info",
          max_tokens_cap: int = 1024, max_body_bytes: int = 1 << 20, max_batch: int = 16,
          batch_wait_ms: float = 5.0) -> None:
    import uvicorn

    served = load_served_model(model_dir, name, max_source_length=max_source_length,
                               default_max_tokens=default_max_tokens, max_tokens_cap=max_tokens_cap,
                               max_body_bytes=max_body_bytes, max_batch=max_batch, batch_wait_ms=batch_wait_ms)
    print(f"serving {model_dir} as model {served.name!r} on http://{host}:{port}/v1", flush=True)
    uvicorn.run(create_app(served), host=host, port=port, log_level=log_level)
