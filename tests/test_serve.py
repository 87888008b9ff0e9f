"""`nlgkd serve`: an OpenAI-compatible server over a local model, talked to over real HTTP on 127.0.0.1 by the
real `openai` client. Its answers are the model's own generations, its logprobs the model's own
log-probabilities, and its errors OpenAI-shaped."""
from __future__ import annotations

import json

import openai
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nlgkd.serve import BackgroundServer

SOURCE = "name: Giraffe | area: city centre | family: no"


@pytest.fixture(scope="module")
def served(trained):
    from nlgkd.serve import create_app, load_served_model

    served = load_served_model(str(trained[1] / "tiny" / "teacher"), name="teacher", device="cpu")
    with BackgroundServer(create_app(served)) as server:
        yield served, openai.OpenAI(api_key="unused", base_url=server.base_url, max_retries=0, timeout=30)


def model_samples(served, source: str, seed: int, n: int, **kwargs) -> tuple[list[int], list[list[int]]]:
    """The model's own sampled continuations (token ids, EOS cut), as `generate` makes them with this seed from
    the whole vocabulary (top_k 0) and without the checkpoint's forced EOS (served answers are cut, not ended)."""
    from nlgkd.generation import model_cache_kwargs

    ids = served.tokenizer(source)["input_ids"]
    own = served.model.generation_config
    forced_eos, own.forced_eos_token_id = own.forced_eos_token_id, None
    torch.manual_seed(seed)
    try:
        out = served.model.generate(input_ids=torch.tensor([ids]), do_sample=True, top_k=0, num_return_sequences=n,
                                    **kwargs, **model_cache_kwargs(served.model))
    finally:
        own.forced_eos_token_id = forced_eos
    eos = served.tokenizer.eos_token_id
    sequences = []
    for seq in out[:, 1:].tolist():
        sequences.append(seq[: seq.index(eos)] if eos in seq else seq)
    return ids, sequences


def test_answers_are_the_models_own_samples(served):
    model, client = served
    answer = client.chat.completions.create(
        model="teacher", messages=[{"role": "system", "content": "ignored"}, {"role": "user", "content": SOURCE}],
        n=3, temperature=0.9, top_p=0.95, max_tokens=12, seed=7)
    ids, sequences = model_samples(model, SOURCE, seed=7, n=3, temperature=0.9, top_p=0.95, max_new_tokens=12)
    # the text as evaluate and pseudo-target stages write it: no leading space from a word-start token
    assert [c.message.content for c in answer.choices] == [
        model.tokenizer.decode(s, skip_special_tokens=True).strip() for s in sequences]
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert answer.usage.prompt_tokens == len(ids)
    eos_count = sum(len(s) < 12 for s in sequences)  # those that stopped count their EOS
    assert answer.usage.completion_tokens == sum(len(s) for s in sequences) + eos_count
    assert {c.finish_reason for c in answer.choices} <= {"stop", "length"}
    # a seed makes the answer repeatable
    again = client.chat.completions.create(model="teacher", messages=[{"role": "user", "content": SOURCE}],
                                           n=3, temperature=0.9, top_p=0.95, max_tokens=12, seed=7)
    assert [c.message.content for c in again.choices] == [c.message.content for c in answer.choices]


def test_logprobs_are_the_models_log_probabilities(served):
    from nlgkd.models import forward_on_targets

    model, client = served
    answer = client.chat.completions.create(model="teacher", messages=[{"role": "user", "content": SOURCE}],
                                            n=2, temperature=1.0, max_tokens=10, seed=3, logprobs=True,
                                            top_logprobs=4)
    _, sequences = model_samples(model, SOURCE, seed=3, n=2, max_new_tokens=10)
    source_ids = model.tokenizer(SOURCE)["input_ids"]
    for choice, tokens in zip(answer.choices, sequences):
        entries = choice.logprobs.content
        assert len(entries) == len(tokens)  # one per generated token, EOS not included
        assert "".join(e.token for e in entries) == choice.message.content == choice.message.content.strip()
        assert all(bytes(e.bytes) == e.token.encode() for e in entries)
        # teacher-forced log-softmax of the same tokens: the numbers the server reports
        batch = {"input_ids": torch.tensor([source_ids]), "attention_mask": torch.ones(1, len(source_ids), dtype=torch.long),
                 "labels": torch.tensor([tokens])}
        with torch.no_grad():
            logits, _ = forward_on_targets(model.model, batch)
        expected = torch.log_softmax(logits[0].float(), dim=-1)
        for t, entry in enumerate(entries):
            assert entry.logprob == pytest.approx(expected[t, tokens[t]].item(), abs=1e-4)
            assert len(entry.top_logprobs) == 4
            top = [alt.logprob for alt in entry.top_logprobs]
            assert top == sorted(top, reverse=True)
            assert top[0] == pytest.approx(expected[t].max().item(), abs=1e-4)
            best_text = model.tokenizer.decode([int(expected[t].argmax())])
            # the first token's alternatives are stripped as the answer is: the chosen one reads alike in both
            assert entry.top_logprobs[0].token == (best_text.lstrip() if t == 0 else best_text)
            if t == 0 and int(expected[0].argmax()) == tokens[0]:
                assert entry.top_logprobs[0].token == entry.token


def test_greedy_n_gives_n_equal_answers(served):
    _, client = served
    answer = client.chat.completions.create(model="teacher", messages=[{"role": "user", "content": SOURCE}],
                                            n=2, temperature=0, max_tokens=6)
    assert len(answer.choices) == 2
    assert answer.choices[0].message.content == answer.choices[1].message.content
    # explicit nulls mean the defaults, as in the OpenAI API
    single = client.chat.completions.create(model="teacher", messages=[{"role": "user", "content": SOURCE}],
                                            temperature=0, max_tokens=6, extra_body={"n": None, "logprobs": None})
    assert [c.message.content for c in single.choices] == [answer.choices[0].message.content]


def test_pieces_are_stripped_as_the_text_is():
    from nlgkd.serve import stripped

    assert stripped([" Zwei", " Hunde", " "]) == ["Zwei", " Hunde", ""]
    assert stripped(["", " a", "b ", ""]) == ["", "a", "b", ""]
    assert stripped(["  "]) == [""] and stripped([]) == []


def test_token_pieces_hold_back_split_characters():
    from nlgkd.serve import token_pieces

    class ByteTokenizer:  # one byte per token, decoded like a byte-level BPE
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", "replace")

    ids = list("né €".encode())
    pieces = token_pieces(ByteTokenizer(), ids)
    assert "".join(pieces) == "né €"
    assert pieces == ["n", "", "é", " ", "", "", "€"]


def test_errors_are_openai_shaped(served):
    _, client = served
    messages = [{"role": "user", "content": SOURCE}]
    with pytest.raises(openai.BadRequestError, match="stream"):
        client.chat.completions.create(model="teacher", messages=messages, stream=True)
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):  # refused, not silently ignored
        client.chat.completions.create(model="teacher", messages=messages, presence_penalty=1.0)
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model="teacher", messages=messages, logprobs=True, top_logprobs=21)
    with pytest.raises(openai.BadRequestError, match="user message"):
        client.chat.completions.create(model="teacher", messages=[{"role": "system", "content": "x"}])
    with pytest.raises(openai.NotFoundError, match="teacher"):
        client.chat.completions.create(model="gpt-4o", messages=messages)
    assert [m.id for m in client.models.list()] == ["teacher"]


def test_decoder_only_model_continues_the_last_user_message(served):
    """A causal model reads `last user message + EOS` (nlgkd's decoder-only layout) and answers with the
    continuation only."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from nlgkd.data import causal_prompt
    from nlgkd.serve import ServedModel, create_app

    tokenizer = served[0].tokenizer
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2, n_positions=128,
                                       eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id))
    causal = ServedModel(model, tokenizer, "gpt")
    with BackgroundServer(create_app(causal)) as server:
        client = openai.OpenAI(api_key="unused", base_url=server.base_url, max_retries=0, timeout=30)
        answer = client.chat.completions.create(
            model="gpt", messages=[{"role": "user", "content": "an earlier turn"}, {"role": "assistant", "content": "x"},
                                   {"role": "user", "content": SOURCE}],
            n=2, temperature=1.0, max_tokens=8, seed=5, logprobs=True)
    prompt = causal_prompt(tokenizer(SOURCE)["input_ids"], tokenizer.eos_token_id)
    torch.manual_seed(5)
    out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         do_sample=True, top_k=0, num_return_sequences=2, max_new_tokens=8,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    expected = []
    for seq in out[:, len(prompt):].tolist():
        seq = seq[: seq.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in seq else seq
        expected.append(tokenizer.decode(seq, skip_special_tokens=True))
    assert [c.message.content for c in answer.choices] == expected
    assert answer.usage.prompt_tokens == len(prompt)
    assert all("".join(e.token for e in c.logprobs.content) == c.message.content for c in answer.choices)


def test_limits_and_every_4xx_speak_the_openai_error_format(served):
    import json
    import urllib.error
    import urllib.request

    def http(method: str, url: str, body: dict | None = None) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    model, client = served
    base = str(client.base_url).rstrip("/")
    messages = [{"role": "user", "content": SOURCE}]
    with pytest.raises(openai.BadRequestError, match=r"max_tokens: at most 1024 on this server"):
        client.chat.completions.create(model="teacher", messages=messages, max_tokens=1025)
    with pytest.raises(openai.BadRequestError, match=r"seed: must be between 0 and"):  # was a 500
        client.chat.completions.create(model="teacher", messages=messages, seed=2**70)
    model.max_body_bytes = 2000  # small, so the whole body is sent before the answer (else: a broken pipe)
    try:
        huge = http("POST", f"{base}/chat/completions", {"messages": [{"role": "user", "content": "x" * 3000}]})
    finally:
        model.max_body_bytes = 1 << 20
    unknown = http("GET", f"{base}/nowhere")
    wrong_method = http("GET", f"{base}/chat/completions")
    for (status, body), expected in ((huge, 413), (unknown, 404), (wrong_method, 405)):
        assert status == expected and set(body["error"]) == {"message", "type", "param", "code"}
    assert "takes at most 2,000" in huge[1]["error"]["message"]
    assert unknown[1]["error"]["message"] == "GET /v1/nowhere: Not Found"


SOURCES = ["name: Giraffe | area: city centre | family: no", "name: Zizzi | type: pub",
           "name: The Eagle | food: French | price: high | rating: low | area: riverside | family: yes",
           "name: Aromi", "name: Loch Fyne | type: coffee shop | food: Indian", "name: Bibimbap House | price: cheap"]


def concurrent_answers(served_model, requests) -> list[dict]:
    """Each request from its own thread at the same moment, as concurrent clients send them."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(requests)) as pool:  # a timeout: a dead worker fails the test, not hangs it
        return list(pool.map(lambda r: served_model.submit(r).result(timeout=120), requests))


@pytest.mark.parametrize("family", ["encoder-decoder", "decoder-only"])
def test_concurrent_requests_are_decoded_in_batches_with_the_answers_of_one_at_a_time(served, family):
    """Dynamic batching pads the inputs (right for encoder-decoders, left for decoder-only models) and decodes
    them in one generate call: greedy answers and their logprobs equal those of a one-at-a-time server."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from nlgkd.serve import ChatRequest, ServedModel

    model, tokenizer = served[0].model, served[0].tokenizer
    if family == "decoder-only":
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2,
                                           n_positions=128, eos_token_id=tokenizer.eos_token_id,
                                           bos_token_id=tokenizer.bos_token_id)).eval()
    requests = [ChatRequest(messages=[{"role": "user", "content": s}], temperature=0, max_tokens=10, logprobs=True)
                for s in SOURCES]
    alone = ServedModel(model, tokenizer, "m", max_batch=1)
    expected = [alone.complete(r) for r in requests]
    batched = ServedModel(model, tokenizer, "m", max_batch=16, batch_wait_ms=500)
    answers = concurrent_answers(batched, requests)
    assert alone.generate_calls == len(SOURCES) and batched.generate_calls < len(SOURCES)
    for got, want in zip(answers, expected):
        assert got["choices"][0]["message"]["content"] == want["choices"][0]["message"]["content"]
        assert got["usage"] == want["usage"]
        got_lp = [e["logprob"] for e in got["choices"][0]["logprobs"]["content"]]
        want_lp = [e["logprob"] for e in want["choices"][0]["logprobs"]["content"]]
        assert got_lp == pytest.approx(want_lp, abs=1e-4)


def test_requests_that_cannot_share_a_batch_are_answered_apart(served):
    """Different settings (greedy vs sampled, max_tokens) or a seed never share a generate call, and every
    request gets its own answer: each greedy one equals the one-at-a-time answer to its own input, and a
    seeded request keeps the samples it has alone."""
    from nlgkd.serve import ChatRequest, ServedModel

    model, tokenizer = served[0].model, served[0].tokenizer

    def ask(source, **fields):
        return ChatRequest(messages=[{"role": "user", "content": source}], **fields)

    requests = [ask(SOURCES[0], temperature=0, max_tokens=6), ask(SOURCES[1], temperature=0, max_tokens=9),
                ask(SOURCES[2], temperature=0, max_tokens=6), ask(SOURCES[3], temperature=0.8, n=2, max_tokens=6),
                ask(SOURCES[4], temperature=0.8, n=2, max_tokens=6, seed=11)]
    batched = ServedModel(model, tokenizer, "m", max_batch=16, batch_wait_ms=300)
    answers = concurrent_answers(batched, requests)
    alone = ServedModel(model, tokenizer, "m", max_batch=1)
    expected = [alone.complete(r) for r in requests]
    # the two greedy max_tokens 6 requests may share a call; the others cannot
    assert 4 <= batched.generate_calls <= 5
    for i in (0, 1, 2, 4):
        assert [c["message"]["content"] for c in answers[i]["choices"]] == \
            [c["message"]["content"] for c in expected[i]["choices"]], i
    assert len(answers[3]["choices"]) == 2 and answers[3]["usage"]["completion_tokens"] <= 12


def test_the_worker_outlives_cancelled_requests_and_failed_batches(served, monkeypatch):
    """A request whose client has gone (its future cancelled) is never decoded; a batch that fails is retried
    one request at a time, with the answers those requests get alone; the worker thread keeps serving."""
    from nlgkd.serve import ChatRequest, ServedModel

    model, tokenizer = served[0].model, served[0].tokenizer
    batched = ServedModel(model, tokenizer, "m", max_batch=16, batch_wait_ms=300)
    requests = [ChatRequest(messages=[{"role": "user", "content": s}], temperature=0, max_tokens=6) for s in SOURCES]
    decoded, real = [], batched.answer_batch

    def recording(batch, abandoned):
        decoded.append([request for request, _ in batch])
        if len(batch) > 1 and requests[2] in decoded[-1]:
            raise RuntimeError("out of memory")  # the later batch fails in company
        return real(batch, abandoned)

    monkeypatch.setattr(batched, "answer_batch", recording)
    first = batched.submit(requests[0])
    gone = batched.submit(requests[1])
    gone.cancel()  # still queued: the worker is waiting for company for the first one
    assert first.result(timeout=120)["choices"][0]["message"]["content"] is not None
    assert not any(requests[1] in batch for batch in decoded)  # the cancelled request cost no decoding
    answers = concurrent_answers(batched, requests[2:])
    alone = ServedModel(model, tokenizer, "m", max_batch=1)
    expected = [alone.submit(r).result(timeout=120) for r in requests[2:]]
    assert [a["choices"][0]["message"]["content"] for a in answers] == \
        [e["choices"][0]["message"]["content"] for e in expected]
    assert any(len(batch) > 1 for batch in decoded) and batched.worker.is_alive()


# ----------------------------------------------------------------------------- the server's contract
def post(base_url: str, body: bytes) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{base_url}/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def short_server():
    """A tiny fresh model with 64 positions that never writes EOS, served with small answers (fast to fuzz)."""
    from nlgkd.serve import BackgroundServer, ServedModel, create_app

    from test_decoding import short_model

    model, tokenizer = short_model(positions=64)
    served = ServedModel(model, tokenizer, "short", default_max_tokens=4, max_tokens_cap=64)
    with BackgroundServer(create_app(served)) as server:
        yield served, server.base_url


def test_bad_requests_are_400s_that_name_the_field(short_server):
    _, url = short_server
    user = {"role": "user", "content": "a dog ran"}
    for body, words in (
            (b'{"messages": [', "body: not valid JSON at character"),
            (json.dumps({"messages": [user], "max_tokens": True}).encode(), "max_tokens: Input should be a valid integer"),
            (json.dumps({"messages": [user], "n": "2"}).encode(), "n: Input should be a valid integer"),
            (json.dumps({"messages": [{"role": "user", "content": "a \ud800 b"}]}).encode(),
             "messages[0].content: not valid Unicode at character 2"),
            (json.dumps({"messages": [user, {"role": "\ud800", "content": "x"}]}).encode(),
             "messages[1].role: not valid Unicode"),
            (json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}).encode(),
             "messages[0].content: a text part's text must be a string")):
        status, answer = post(url, body)
        assert status == 400 and words in answer["error"]["message"], (body, answer)
    # every length up to the cap: 200, cut at the model's positions with "length"
    status, answer = post(url, json.dumps({"messages": [user], "max_tokens": 64, "temperature": 0}).encode())
    assert status == 200 and answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == 63


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6)
MESSAGES = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", ""]),
     "content": st.none() | st.text(max_size=40) | st.lists(st.fixed_dictionaries(
         {"type": st.sampled_from(["text", "image_url"]), "text": st.text(max_size=20)}), max_size=2)}), max_size=3)
FIELDS = ["model", "n", "temperature", "top_p", "max_tokens", "max_completion_tokens", "logprobs", "top_logprobs",
          "seed", "stream", "user", "stop"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=MESSAGES, fields=st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=4),
       small=st.dictionaries(st.sampled_from(["n", "max_tokens", "top_logprobs", "seed"]), st.integers(-2, 70),
                             max_size=2))
def test_no_request_gets_a_500(short_server, messages, fields, small):
    # localhost only, bounded: 60 requests of at most 64 tokens to a 2-layer model
    _, url = short_server
    body = json.dumps({"messages": messages, **fields, **small}).encode()
    status, answer = post(url, body)
    assert status in (200, 400, 404), (status, answer, body)
    assert ("choices" in answer) if status == 200 else answer["error"]["message"]


def test_a_request_whose_client_went_away_stops_decoding(tmp_path):
    import socket
    import time

    from nlgkd.serve import BackgroundServer, ServedModel, create_app

    from test_decoding import short_model

    model, tokenizer = short_model(positions=1024)
    served = ServedModel(model, tokenizer, "short", max_tokens_cap=1000)
    body = json.dumps({"messages": [{"role": "user", "content": "a dog ran"}], "n": 64, "max_tokens": 1000,
                       "temperature": 1.0}).encode()
    with BackgroundServer(create_app(served)) as server:
        with socket.create_connection((server.host, server.port)) as client:
            client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            deadline = time.time() + 60
            while (served.worker is None or not served.waiting.empty()) and time.time() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)  # the worker has taken it and is decoding
        # the client has gone: the batch stops at its next token instead of writing 64 x 1000 of them
        while served.abandoned_batches == 0 and time.time() < deadline:
            time.sleep(0.05)
        assert served.abandoned_batches == 1
        status, answer = post(server.base_url, json.dumps({"messages": [{"role": "user", "content": "hi"}],
                                                           "max_tokens": 2, "temperature": 0}).encode())
        assert status == 200  # the worker goes on serving


def test_a_long_decoder_only_prompt_runs_alone_so_it_cuts_no_other_answer(tmp_path):
    from nlgkd.models import load_pretrained
    from nlgkd.serve import ChatRequest, ServedModel

    from families import gpt2

    model, tokenizer = load_pretrained(str(gpt2(tmp_path / "gpt2")))  # 256 positions
    served = ServedModel(model, tokenizer, "gpt2", max_tokens_cap=200)
    request = ChatRequest(messages=[{"role": "user", "content": "x"}], max_tokens=100, temperature=0.0).with_defaults()
    assert served.batch_key(request, [5] * 20) == served.batch_key(request, [5] * 150) is not None
    assert served.batch_key(request, [5] * 201) is None  # 201 + 100 > 256: batched, it would cut the others
