"""Batched, length-bucketed, process-sharded generation.

Inputs are sorted by length and cut into batches once, the same way for any number of processes; batch j
goes to process j % world_size and, when sampling, is seeded with `seed + j`. Results are gathered and put
back in input order, so the output depends on the seed and the batches, not on the process count.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

from .data import causal_prompt, pad
from .recipe import DecodingConfig

EMPTY_INPUT_ERROR = "generation: input {i} is empty after tokenization; drop empty sources from the data"


def generation_kwargs(decoding: DecodingConfig) -> dict:
    """transformers `generate` arguments for a decoding config."""
    kwargs = {
        "max_new_tokens": decoding.max_new_tokens,
        "num_return_sequences": decoding.num_return_sequences,
        "no_repeat_ngram_size": decoding.no_repeat_ngram_size or None,
    }
    if decoding.strategy == "greedy":
        kwargs.update(do_sample=False, num_beams=1)
    elif decoding.strategy == "beam":
        kwargs.update(do_sample=False, num_beams=max(decoding.num_beams, decoding.num_return_sequences),
                      length_penalty=decoding.length_penalty, early_stopping=True)
    elif decoding.strategy == "diverse_beam":
        # transformers 5 moved group beam search to a hub download; nlgkd runs it itself (see diverse_beam)
        kwargs.update(do_sample=False, num_beams=max(decoding.num_beams, decoding.num_return_sequences),
                      length_penalty=decoding.length_penalty, early_stopping=True)
    elif decoding.strategy == "sample":
        kwargs.update(do_sample=True, num_beams=1, temperature=decoding.temperature,
                      top_k=decoding.top_k or None, top_p=decoding.top_p)
    return {k: v for k, v in kwargs.items() if v is not None}


def length_buckets(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices sorted by length (longest first, ties by index) cut into batches: little padding per batch."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def is_causal(model) -> bool:
    return not getattr(model.config, "is_encoder_decoder", False)


@torch.inference_mode()
def generate_batch(model, tokenizer, source_ids: list[list[int]], decoding: DecodingConfig) -> list[list[str]]:
    """Generate for one batch of tokenized sources; returns K texts per source (continuations only)."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    causal = is_causal(model)
    if causal:
        # decoder-only: left padding so every row continues right after its own prompt
        prompts = [causal_prompt(ids, tokenizer.eos_token_id) for ids in source_ids]
        input_ids, attention_mask = pad(prompts, pad_id, left=True)
    else:
        input_ids, attention_mask = pad(source_ids, pad_id, left=False)
    kwargs = generation_kwargs(decoding)
    out = model.generate(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
        pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id, **kwargs,
    )
    if causal:
        out = out[:, input_ids.shape[1] :]
    texts = tokenizer.batch_decode(out, skip_special_tokens=True)
    k = decoding.num_return_sequences
    grouped = [[t.strip() for t in texts[i * k : (i + 1) * k]] for i in range(len(source_ids))]
    if decoding.dedup:
        grouped = [list(dict.fromkeys(g)) for g in grouped]
    return grouped


def generate(
    model,
    tokenizer,
    source_ids: list[list[int]],
    decoding: DecodingConfig,
    accelerator,
    seed: int = 0,
    done: dict[int, list[list[str]]] | None = None,
    on_batch: Callable[[int, list[int], list[list[str]]], None] | None = None,
    desc: str = "generate",
) -> list[list[str]]:
    """Generate K outputs for every source, sharded over processes, returned in input order.

    done: batch index -> outputs already made (a resumed run skips them).
    on_batch(batch_index, input_indices, outputs) is called on the process that made the batch, as it goes.
    """
    for i, ids in enumerate(source_ids):
        if not ids:
            raise ValueError(EMPTY_INPUT_ERROR.format(i=i))
    done = done or {}
    batches = length_buckets([len(s) for s in source_ids], decoding.batch_size)
    rank, world = accelerator.process_index, accelerator.num_processes
    unwrapped = accelerator.unwrap_model(model)
    was_training = unwrapped.training
    unwrapped.eval()
    mine = [j for j in range(len(batches)) if j % world == rank]
    made: dict[int, list[list[str]]] = {}
    bar = tqdm(total=len(batches), desc=desc, disable=not accelerator.is_main_process, leave=False)
    bar.update(len(done))
    for j in mine:
        if j in done:
            continue
        if decoding.strategy == "sample":
            torch.manual_seed(seed + j)
        outputs = generate_batch(unwrapped, tokenizer, [source_ids[i] for i in batches[j]], decoding)
        made[j] = outputs
        if on_batch is not None:
            on_batch(j, batches[j], outputs)
        bar.update(world)
    bar.close()
    unwrapped.train(was_training)
    everything = dict(done)
    for part in gather_objects(accelerator, made):
        everything.update(part)
    results: list[list[str]] = [[] for _ in source_ids]
    for j, indices in enumerate(batches):
        for i, outputs in zip(indices, everything[j]):
            results[i] = outputs
    return results


def gather_objects(accelerator, obj) -> Iterable:
    """Every process's `obj`, on every process (a list with one entry per process)."""
    if accelerator.num_processes == 1:
        return [obj]
    from accelerate.utils import gather_object

    return gather_object([obj])
