"""The API branch of `pseudo_targets` (`teacher_api:`): an LLM behind an OpenAI-compatible API writes the
pseudo-targets, through `nlgkd/api_client.py` (requests, rate limits, retries, cache, budget). Its output is
the local teacher's dataset layout (`nlgkd/pseudo_target_data.py`), plus failures.jsonl and, with logprobs,
soft targets (`nlgkd/alignment.py`); `stage.json` gets an `api` record.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections import Counter
from pathlib import Path

from ..api_client import (CACHE_FILE, SHOWN_REQUESTS, Answer, ApiRequest, ApiStats, BadAnswer, Budget, FatalApiError,
                          Failure, ResponseCache, Sender, api_key_from_env, build_requests, check_config,
                          draw_shots, estimate_tokens, parse_answer)
from ..pseudo_target_data import FEATURES, collect_inputs, log_examples


def plan_requests(ctx):
    """(inputs, requests per input, distinct requests in first-seen order) of a pseudo_targets stage."""
    cfg = ctx.config
    api = cfg.teacher_api
    check_config(api)
    inputs = collect_inputs(ctx)
    shots = draw_shots(ctx.data().get("train") if api.shots else None, api.shots, ctx.seed)
    per_input = build_requests(api, cfg.decoding, [r["source"] for r in inputs], shots, ctx.seed)
    distinct: dict[str, ApiRequest] = {}
    for requests in per_input:
        for request in requests:
            distinct.setdefault(request.key, request)
    return inputs, per_input, distinct


def cache_path(ctx) -> Path:
    return Path(ctx.run_dir) / CACHE_FILE


def dry_run(ctx) -> None:
    """Print the stage's requests, their estimated tokens and cost; send nothing."""
    cfg = ctx.config
    api = cfg.teacher_api
    inputs, per_input, distinct = plan_requests(ctx)
    cache = ResponseCache(cache_path(ctx), readonly=True)
    cached = cache.get(list(distinct))
    cache.close()
    todo = [r for key, r in distinct.items() if key not in cached]
    budget = Budget(api.max_cost, api.max_total_tokens, api.input_price, api.output_price)
    prompt = sum(r.prompt_tokens for r in todo)
    most = sum(r.n * r.body["max_tokens"] for r in todo)
    train = ctx.data().get("train")
    # expected answer length: the gold targets' (what the prompt asks the teacher to imitate)
    typical = (sum(estimate_tokens(t) for t in train["target"][:1000]) / min(len(train), 1000)
               if train is not None and "target" in train.column_names and len(train) else None)
    expected = sum(r.n for r in todo) * typical if typical else None
    say = ctx.log
    say(f"dry run: {len(inputs)} inputs -> {len(distinct)} distinct requests to {api.model!r} at "
        f"{api.base_url or 'the openai default endpoint'}; {len(cached)} already cached, {len(todo)} to send")
    for request in todo[:SHOWN_REQUESTS]:
        say("request: " + json.dumps(request.body, ensure_ascii=False))
    if len(todo) > SHOWN_REQUESTS:
        say(f"... and {len(todo) - SHOWN_REQUESTS} more like these")
    line = (f"estimated tokens: {prompt} prompt (characters / 4) + at most {most} completion "
            f"(n x max_tokens)")
    if expected is not None:
        line += f", about {expected:.0f} if answers are as long as the gold targets"
    say(line)
    if api.input_price or api.output_price:
        cost_line = f"estimated cost: at most {budget.cost(prompt, most):.4f}"
        if expected is not None:
            cost_line += f", about {budget.cost(prompt, expected):.4f}"
        say(cost_line + f" (prices per million tokens: {api.input_price} in, {api.output_price} out)")
    else:
        say("estimated cost: unknown; set teacher_api.input_price and output_price (per million tokens)")
    if api.max_cost is not None or api.max_total_tokens is not None:
        say(f"budget: max_cost {api.max_cost}, max_total_tokens {api.max_total_tokens}")
    say("dry run: nothing was sent")


def run(ctx) -> None:
    """The API branch of `pseudo_targets`: answers -> the PT dataset (and soft targets with logprobs)."""
    acc = ctx.accelerator
    # one process talks to the API (several would pay for the same requests); the others wait
    outcome = None
    if acc.is_main_process:
        try:
            _run_main(ctx)
            outcome = "ok"
        except BaseException as err:  # re-raised below, after the other processes know
            outcome = err
    if acc.num_processes > 1:
        from ..generation import gather_objects

        flags = gather_objects(acc, outcome is None or outcome == "ok")
        if not all(flags):
            if isinstance(outcome, BaseException):
                raise outcome
            raise RuntimeError("the main process failed while talking to the API; see its error")
    if isinstance(outcome, BaseException):
        raise outcome


def _run_main(ctx) -> None:
    from ..progress import progress_bar, write_above_bars

    cfg = ctx.config
    api = cfg.teacher_api
    inputs, per_input, distinct = plan_requests(ctx)
    api_key = api_key_from_env(api)
    stats = ApiStats(requests_needed=len(distinct),
                     duplicate_requests=sum(len(r) for r in per_input) - len(distinct))
    cache = ResponseCache(cache_path(ctx))
    try:
        answers: dict[str, Answer | Failure] = {}
        for key, (raw, cost) in cache.get(list(distinct)).items():
            try:
                answers[key] = parse_answer(raw, distinct[key])
            except BadAnswer:  # only good answers are stored; one that no longer reads is asked again
                continue
            stats.cached_cost += cost or 0.0
        stats.cache_hits = len(answers)
        todo = [r for key, r in distinct.items() if key not in answers]
        ctx.log(f"{len(inputs)} inputs -> {len(distinct)} requests to {api.model!r}: {stats.cache_hits} cached, "
                f"{len(todo)} to send")
        started = time.perf_counter()
        if todo:
            budget = Budget(api.max_cost, api.max_total_tokens, api.input_price, api.output_price)
            bar = progress_bar(total=len(todo), desc=f"api {ctx.stage.name}", leave=False)

            def done() -> None:
                bar.update(1)
                bar.set_postfix(retries=stats.retries, failed=stats.failures, cost=f"{stats.cost:.4f}",
                                refresh=False)

            sender = Sender(api, cache, stats, budget, ctx.stage.name, api_key, on_done=done,
                            warn=lambda m: write_above_bars(f"[{ctx.stage.name}] {m}"))
            answers.update(asyncio.run(sender.run(todo)))
            bar.close()
            stats.seconds = round(time.perf_counter() - started, 2)
            stats.rate_limit_wait_s = round(sender.limiter.waited_s, 2)
            ctx.info["api"] = stats.record()
            if sender.fatal:
                raise FatalApiError(f"teacher_api: {sender.fatal}. {stats.answered} answers of this run are kept in "
                                    f"{cache_path(ctx)}; a re-run sends only what is missing")
        ctx.info["api"] = stats.record()
        write_outputs(ctx, inputs, per_input, answers, stats)
    finally:
        cache.close()


def write_outputs(ctx, inputs, per_input, answers, stats: ApiStats) -> None:
    """The PT dataset (the layout of local PTs), failures.jsonl, and soft targets when logprobs were asked."""
    import datasets

    cfg = ctx.config
    failed, unsent = check_unanswered(ctx, inputs, per_input, answers, stats)
    rows, pieces_of_rows, empty, duplicates, outputs_per_input = answer_rows(cfg, inputs, per_input, answers)
    if not rows:
        raise ValueError(f"teacher_api: no pseudo-targets: {len(inputs)} inputs got no non-empty answer")
    target = ctx.out_dir / "dataset"
    shutil.rmtree(target, ignore_errors=True)  # left by a run killed while saving
    # the columns of local PTs, exactly
    datasets.Dataset.from_list([{k: row[k] for k in FEATURES} for row in rows], features=FEATURES).save_to_disk(
        str(target))
    if cfg.align_to is not None:
        write_soft_targets_of(ctx, rows, pieces_of_rows)
    per_origin = Counter(item["origin"] for item in inputs)
    ctx.info["pseudo_targets"] = {
        "inputs": dict(per_origin),
        "outputs_per_input": cfg.decoding.num_return_sequences,
        "pts_written": len(rows),
        "empty_dropped": empty,
        "duplicates_dropped": duplicates,
        "inputs_without_answer": sum(1 for o in outputs_per_input if not o),
        "failed_requests": len({r.key for _, r in failed}),
        "requests_not_sent": unsent,
    }
    ctx.log(f"wrote {len(rows)} pseudo-targets for {len(inputs)} inputs ({empty} empty and {duplicates} duplicate "
            f"answers dropped); {stats.http_requests} HTTP requests, {stats.retries} retries, {stats.failures} "
            f"failures, {stats.cache_hits} cache hits, cost {stats.cost:.4f}")
    log_examples(ctx, inputs, outputs_per_input)


def check_unanswered(ctx, inputs, per_input, answers, stats: ApiStats) -> tuple[list, int]:
    """(failed (input, request) pairs, requests not sent): failures go to failures.jsonl; a spent budget with
    on_budget: stop, or more failures than allow_failures, stop the stage saying what a re-run sends."""
    api = ctx.config.teacher_api
    unanswered = [(item, r) for item, requests in zip(inputs, per_input) for r in requests
                  if not isinstance(answers.get(r.key), Answer)]
    failed = [(item, r) for item, r in unanswered if isinstance(answers.get(r.key), Failure)]
    if failed:
        with open(ctx.out_dir / "failures.jsonl", "w", encoding="utf-8") as f:
            for item, r in failed:
                f.write(json.dumps({"origin": item["origin"], "input_index": item["input_index"],
                                    "source": item["source"], "key": r.key, "error": answers[r.key].error,
                                    "attempts": answers[r.key].attempts}, ensure_ascii=False) + "\n")
    unsent = len(unanswered) - len(failed)
    if stats.budget_reached and api.on_budget == "stop":
        raise ValueError(
            f"teacher_api budget reached (max_cost {api.max_cost}, max_total_tokens {api.max_total_tokens}): this run "
            f"spent {stats.cost:.4f} on {stats.answered} answers, kept in {cache_path(ctx)}; {unsent} request(s) "
            "were not sent. Raise the budget and re-run (only those are sent), or set on_budget: finish to write "
            "the PTs paid for so far")
    if len({r.key for _, r in failed}) > api.allow_failures:
        raise ValueError(
            f"{len({r.key for _, r in failed})} request(s) failed after {api.max_retries} retries (more than "
            f"teacher_api.allow_failures = {api.allow_failures}); see {ctx.out_dir / 'failures.jsonl'}. Answers "
            "are cached: a re-run sends only the failed requests. Raise allow_failures to finish without them")
    return failed, unsent


def answer_rows(cfg, inputs, per_input, answers):
    """(PT rows, each row's logprob pieces, empty answers, duplicates dropped, each input's stripped answers)."""
    rows, pieces_of_rows, empty, duplicates = [], [], 0, 0
    outputs_per_input = []
    for item, requests in zip(inputs, per_input):
        texts, pieces = [], []
        for r in requests:
            answer = answers.get(r.key)
            if isinstance(answer, Answer):
                texts += answer.texts
                pieces += answer.pieces
        outputs_per_input.append([t.strip() for t in texts])
        seen, kept = set(), 0
        for text, text_pieces in zip(texts, pieces):
            pt = text.strip()
            if not pt:
                empty += 1
                continue
            if cfg.decoding.dedup and pt in seen:
                duplicates += 1
                continue
            seen.add(pt)
            # score: mean token log-probability under the teacher, from the API's logprobs (no EOS: the API
            # does not report the stop token)
            score = sum(p[1] for p in text_pieces) / len(text_pieces) if text_pieces else None
            rows.append({"source": item["source"], "pt": pt, "pt_index": kept, "origin": item["origin"],
                         "input_index": item["input_index"], "teacher": cfg.teacher_api.model,
                         "decoding": cfg.decoding.strategy, "score": score, "task": item.get("task", "")})
            pieces_of_rows.append(text_pieces)  # of the unstripped text: the alignment places them on the PT
            kept += 1
    return rows, pieces_of_rows, empty, duplicates, outputs_per_input


def write_soft_targets_of(ctx, rows: list[dict], pieces_of_rows: list) -> None:
    """Align the API's top logprobs to the tokens of the student `align_to` (`nlgkd.alignment`) and store them
    in the `cache_logits` layout in `<stage>/soft_targets/`, which `distill` reads as `cached_teacher:`."""
    from ..alignment import SOFT_TARGETS_DIR, write_soft_targets
    from ..fingerprints import data_fingerprint

    cfg = ctx.config
    api = cfg.teacher_api
    _, tokenizer = ctx.load_model(cfg.align_to)
    soft_rows = [{"source": row["source"], "pt": row["pt"], "pieces": pieces}
                 for row, pieces in zip(rows, pieces_of_rows) if pieces]
    data_cfg = ctx.recipe.data
    manifest = write_soft_targets(
        ctx.out_dir / SOFT_TARGETS_DIR, soft_rows, tokenizer, top_k=api.top_logprobs + 1,  # + the chosen token
        meta={"teacher": api.model, "base_url": api.base_url, "stage": ctx.stage.name, "align_to": cfg.align_to,
              "data_fingerprint": data_fingerprint(data_cfg, ctx.recipe.seed)},
        max_source_length=data_cfg.max_source_length, max_target_length=data_cfg.max_target_length)
    ctx.info["soft_targets"] = {key: manifest[key] for key in ("examples", "tokens", "k", "one_hot_tokens")}
    ctx.log(f"soft targets: {manifest['examples']} PTs, {manifest['tokens']} student tokens of {cfg.align_to!r}, "
            f"top-{manifest['k']}; {manifest['one_hot_tokens']} tokens without an aligned teacher token")
