"""Batched, length-bucketed, process-sharded generation.

Inputs are sorted by length and cut into batches once, the same way for any number of processes; batch j
goes to process j % world_size and, when sampling, is seeded with `seed + j`. Results are gathered and put
back in input order, so the output depends on the seed and the batches, not on the process count.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from .data import causal_prompt, pad
from .hf_compat import CACHE_KWARG
from .models import is_causal
from .progress import progress_bar
from .config import DecodingConfig

EMPTY_INPUT_ERROR = "generation: input {i} is empty after tokenization; drop empty sources from the data"


def position_limit(model) -> int | None:
    """The most positions the model's decoder has (learned or sinusoidal position tables), or None where
    positions are relative (T5) or the model has no such limit."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def within_positions(max_new: int, limit: int | None, used: int) -> int:
    """`max_new` cut to the positions a model with `limit` positions has left after `used` ones (the decoder
    start token, or a decoder-only prompt); an error when none is left. The PyTorch and CTranslate2 paths both cut
    here, so they cut alike."""
    if limit is None:
        return max_new
    if limit - used < 1:
        raise ValueError(f"decoding: the prompt has {used} tokens and the model {limit} positions, so no room is "
                         "left to generate; lower data.max_source_length")
    return min(max_new, limit - used)


def forced_bos_id(tokenizer, token: str) -> int:
    """The id of `decoding.forced_bos_token` in `tokenizer`, or an error naming the field."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"decoding.forced_bos_token: {token!r} is not a token of the model's tokenizer; give one "
                         "of its special tokens, e.g. a language code")
    return token_id


def generation_config(decoding: DecodingConfig, model, tokenizer, *, beams: int | None = None,
                      returns: int | None = None, prompt_length: int = 0) -> GenerationConfig:
    """The one place a `decoding:` block becomes transformers settings: an explicit GenerationConfig with every
    search field set (0 means off), used by every decode nlgkd makes (`generate_with`).

    From the checkpoint (`model.generation_config`) come only its token ids, decoder start and forced BOS (the
    format the model was trained to write; `decoding.forced_bos_token` names another), and the search fields
    listed in `decoding.from_checkpoint`. max_new_tokens is cut to the positions the model has (after a
    decoder-only model's `prompt_length` tokens, or the decoder start token). Ids beyond the tokenizer (a
    vocabulary padded to a multiple of 8 or 128) are never generated. `beams`/`returns` override the search
    width (one group of diverse beam search)."""
    own = getattr(model, "generation_config", None) or GenerationConfig()
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    max_new = decoding.max_new_tokens
    if max_new is None:
        raise ValueError("decoding.max_new_tokens: not resolved; recipes fill it from data.max_target_length")
    max_new = within_positions(max_new, position_limit(model), 1 if encoder_decoder else prompt_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    fields = dict(
        max_new_tokens=max_new, min_new_tokens=decoding.min_new_tokens or None,  # None: off
        no_repeat_ngram_size=decoding.no_repeat_ngram_size, repetition_penalty=decoding.repetition_penalty,
        length_penalty=1.0, early_stopping=False, num_beams=1, do_sample=False,
        num_return_sequences=returns or decoding.num_return_sequences,
        pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=own.bos_token_id,
        decoder_start_token_id=(own.decoder_start_token_id if own.decoder_start_token_id is not None
                                else getattr(model.config, "decoder_start_token_id", None)),
        forced_bos_token_id=own.forced_bos_token_id, forced_eos_token_id=None,
    )
    if decoding.forced_bos_token is not None:
        fields["forced_bos_token_id"] = forced_bos_id(tokenizer, decoding.forced_bos_token)
    if decoding.strategy == "greedy":
        if decoding.num_return_sequences > 1:
            raise ValueError("decoding.num_return_sequences: greedy decoding gives one output per input; set "
                             "strategy: sample, beam or diverse_beam for more")
    elif decoding.strategy in ("beam", "diverse_beam"):
        width = beams or max(decoding.num_beams, decoding.num_return_sequences)
        fields.update(num_beams=width)
        if width > 1:
            fields.update(length_penalty=decoding.length_penalty, early_stopping=decoding.early_stopping)
    elif decoding.strategy == "sample":
        fields.update(do_sample=True, temperature=decoding.temperature, top_k=decoding.top_k, top_p=decoding.top_p)
    for name in decoding.from_checkpoint:
        if name == "num_beams":  # the search width: beam search's only, and never below K
            if decoding.strategy != "beam":
                raise ValueError(f"decoding.from_checkpoint: num_beams applies to strategy: beam, not "
                                 f"{decoding.strategy}; remove it or set strategy: beam")
            fields["num_beams"] = max(own.num_beams or 1, fields["num_return_sequences"])
            continue
        fields[name] = getattr(own, name, None)
    vocab = getattr(model.config, "vocab_size", None) or len(tokenizer)
    if vocab > len(tokenizer):  # rows of a padded embedding no token maps to
        fields["suppress_tokens"] = list(range(len(tokenizer), vocab))
    return GenerationConfig(**fields)


@contextlib.contextmanager
def only_these_settings(model, config: GenerationConfig):
    """`generate` fills every field left None in the config it is given from `model.generation_config` (the
    checkpoint's); with the model's own set to `config` for the call, nothing else takes part."""
    saved = model.generation_config
    model.generation_config = config
    try:
        yield
    finally:
        model.generation_config = saved


def generate_with(model, config: GenerationConfig, **inputs):
    """`model.generate` with exactly `config` (`only_these_settings`)."""
    with only_these_settings(model, config):
        return model.generate(**inputs, generation_config=config, **model_cache_kwargs(model))


def effective_settings(decoding: DecodingConfig, model, tokenizer) -> dict:
    """The settings a decode of `model` runs with, as stage.json records them (GenerationConfig's non-default
    fields; a CTranslate2 export records its engine options)."""
    if not isinstance(model, torch.nn.Module):
        return {"engine": model.backend, **model.options(decoding)}
    settings = generation_config(decoding, model, tokenizer).to_diff_dict()
    settings.pop("transformers_version", None)
    if decoding.strategy == "diverse_beam":
        settings.update(num_beam_groups=decoding.num_beam_groups, diversity_penalty=decoding.diversity_penalty)
    if settings.get("suppress_tokens"):
        tokens = settings.pop("suppress_tokens")
        settings["suppressed_padding_ids"] = f"{tokens[0]}..{tokens[-1]}"
    return settings


def beams_per_group(decoding: DecodingConfig) -> int:
    """Diverse beam: beams in each group, so that the groups together hold num_beams and at least K outputs."""
    if decoding.num_beam_groups < 1:
        raise ValueError(f"decoding.num_beam_groups: must be at least 1, got {decoding.num_beam_groups}")
    total = max(decoding.num_beams, decoding.num_return_sequences)
    return -(-total // decoding.num_beam_groups)  # ceiling division


def model_cache_kwargs(model) -> dict:
    """Extra `generate` arguments some architectures need, fresh for every call.

    transformers 5.23 and 5.24 crash (IndexError) in `generate(use_cache=True)` for T5/mT5 with fewer encoder
    than decoder layers, as pruned students have: it sizes the default cache by the encoder. An explicit empty
    encoder-decoder cache avoids it."""
    if getattr(model.config, "model_type", None) in ("t5", "mt5"):
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        return {CACHE_KWARG: EncoderDecoderCache(DynamicCache(), DynamicCache())}
    return {}


class PreviousGroupsPenalty(LogitsProcessor):
    """Subtract `penalty` x (how many earlier groups' outputs chose token v at this step) from every score.

    `previous` [batch, n, length]: the earlier groups' output sequences (prompt or decoder start included, so
    positions line up with the `input_ids` the processor sees), with -1 after each sequence ended. Beam search
    calls the processor with `input_ids` [batch * beams, step] and scores [batch * beams, vocab] for the token
    at position `step`.
    """

    def __init__(self, previous: torch.Tensor, penalty: float, beams: int):
        self.previous = previous
        self.penalty = penalty
        self.beams = beams

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1]
        if step >= self.previous.shape[-1]:
            return scores
        tokens = self.previous[:, :, step].to(scores.device)  # [batch, n]
        counts = torch.zeros(tokens.shape[0], scores.shape[-1], device=scores.device, dtype=scores.dtype)
        counts.scatter_add_(1, tokens.clamp(min=0), (tokens >= 0).to(scores.dtype))
        return scores - self.penalty * counts.repeat_interleave(self.beams, dim=0)


def ended_as_minus_one(sequences: torch.Tensor, start: int, eos_id: int | None) -> torch.Tensor:
    """`sequences` with every position after a sequence's first EOS at or after `start` set to -1 (padding)."""
    marked = sequences.clone()
    if eos_id is None:
        return marked
    is_eos = sequences[:, start:] == eos_id
    after = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0  # strictly after the first EOS
    marked[:, start:][after] = -1
    return marked


def diverse_beam_search(model, tokenizer, input_ids, attention_mask, decoding: DecodingConfig) -> torch.Tensor:
    """K outputs per input from a *sequential* variant of diverse beam search (Vijayakumar et al., 2018).

    The original runs G beam-search groups in lock step and, at every time step, lowers the scores of the
    tokens that earlier groups chose at that step (Hamming diversity). transformers 5 no longer ships it
    offline, so here the groups run one after another: group g is a plain beam search whose log-probabilities
    are lowered by `diversity_penalty` for each time an earlier group's *final* output has that token at the
    same position (`PreviousGroupsPenalty`). Group 0 is plain beam search. Each group keeps
    `beams_per_group` beams and returns them all; the K outputs interleave the groups best-first (group 0's
    best, group 1's best, ..., group 0's second, ...), so every group contributes when K >= G.

    Returns [batch * K, length] token ids, K consecutive rows per input (as `generate` does).
    """
    groups = decoding.num_beam_groups
    beams = beams_per_group(decoding)
    encoder_decoder = getattr(model.config, "is_encoder_decoder", False)
    config = generation_config(decoding, model, tokenizer, beams=beams, returns=beams,
                               prompt_length=0 if encoder_decoder else input_ids.shape[1])
    batch = input_ids.shape[0]
    # generated text starts after the prompt (decoder-only) or after the decoder start token
    start = 1 if encoder_decoder else input_ids.shape[1]
    eos_id, pad_id = config.eos_token_id, config.pad_token_id
    outputs = []  # per group: [batch, beams, length]
    for _ in range(groups):
        processors = LogitsProcessorList()
        if outputs and decoding.diversity_penalty:
            previous = torch.cat([ended_as_minus_one(o.flatten(0, 1), start, eos_id).view(batch, beams, -1)
                                  for o in pad_to_same_length(outputs, -1)], dim=1)
            processors.append(PreviousGroupsPenalty(previous, decoding.diversity_penalty, beams))
        out = generate_with(model, config, input_ids=input_ids, attention_mask=attention_mask,
                            logits_processor=processors)
        outputs.append(out.view(batch, beams, -1))
    outputs = pad_to_same_length(outputs, pad_id)
    order = [(g, r) for r in range(beams) for g in range(groups)][: decoding.num_return_sequences]
    picked = torch.stack([outputs[g][:, r] for g, r in order], dim=1)  # [batch, K, length]
    return picked.flatten(0, 1)


def pad_to_same_length(tensors: list[torch.Tensor], value: int) -> list[torch.Tensor]:
    """Right-pad [..., length] tensors to the longest length."""
    width = max(t.shape[-1] for t in tensors)
    return [torch.nn.functional.pad(t, (0, width - t.shape[-1]), value=value) for t in tensors]


def length_buckets(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices sorted by length (longest first, ties by index) cut into batches: little padding per batch."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def generate_ids(model, tokenizer, input_ids, attention_mask, decoding: DecodingConfig, **extra) -> torch.Tensor:
    """K outputs per row of a padded batch, [batch * K, length] token ids as `generate` returns them (after
    the decoder start token or the prompt); `extra`: more `generate` arguments (stopping criteria)."""
    if decoding.strategy == "diverse_beam":
        if extra:
            raise ValueError("decoding.strategy: diverse_beam takes no stopping criteria (joint_teaching.stop_share)")
        return diverse_beam_search(model, tokenizer, input_ids, attention_mask, decoding)
    causal = not getattr(model.config, "is_encoder_decoder", False)
    config = generation_config(decoding, model, tokenizer, prompt_length=input_ids.shape[1] if causal else 0)
    return generate_with(model, config, input_ids=input_ids, attention_mask=attention_mask, **extra)


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
    out = generate_ids(model, tokenizer, input_ids.to(device), attention_mask.to(device), decoding)
    if causal:
        out = out[:, input_ids.shape[1] :]
    texts = tokenizer.batch_decode(out, skip_special_tokens=True)
    k = decoding.num_return_sequences
    grouped = [[t.strip() for t in texts[i * k : (i + 1) * k]] for i in range(len(source_ids))]
    if decoding.dedup:
        grouped = [list(dict.fromkeys(g)) for g in grouped]
    return grouped


def generate(model, tokenizer, source_ids: list[list[int]], decoding: DecodingConfig, accelerator, seed: int = 0,
             done: dict[int, list[list[str]]] | None = None,
             on_batch: Callable[[int, list[int], list[list[str]]], None] | None = None, desc: str = "generate",
             progress: bool = True) -> list[list[str]]:
    """Generate K outputs for every source, sharded over processes, returned in input order.

    done: batch index -> outputs already made (a resumed run skips them).
    on_batch(batch_index, input_indices, outputs) is called on the process that made the batch, as it goes.
    progress: a bar of its own (not while the training bar shows: two bars on one console tear each other).
    """
    for i, ids in enumerate(source_ids):
        if not ids:
            raise ValueError(EMPTY_INPUT_ERROR.format(i=i))
    done = done or {}
    batches = length_buckets([len(s) for s in source_ids], decoding.batch_size)
    rank, world = accelerator.process_index, accelerator.num_processes
    # a PyTorch model, or an inference engine's exported folder (nlgkd/engine.py: EngineModel)
    engine = not isinstance(model, torch.nn.Module)
    unwrapped = model if engine else accelerator.unwrap_model(model)
    was_training = False if engine else unwrapped.training
    if not engine:
        unwrapped.eval()
    mine = [j for j in range(len(batches)) if j % world == rank]
    made: dict[int, list[list[str]]] = {}
    # sampling seeds the global generator per batch; afterwards it is as it was (a validation inside training
    # must not replay the same dropout stream after every evaluation)
    rng = torch.random.fork_rng(devices=[accelerator.device] if accelerator.device.type == "cuda" else []) \
        if decoding.strategy == "sample" and not engine else contextlib.nullcontext()
    with rng:
        bar = progress_bar(total=len(batches), desc=desc, leave=False,
                           disable=not (accelerator.is_main_process and progress))
        bar.update(len(done))
        for j in mine:
            if j in done:
                continue
            batch = [source_ids[i] for i in batches[j]]
            if engine:
                outputs = unwrapped.generate_texts(batch, decoding, seed=seed + j)
            else:
                if decoding.strategy == "sample":
                    torch.manual_seed(seed + j)
                outputs = generate_batch(unwrapped, tokenizer, batch, decoding)
            made[j] = outputs
            if on_batch is not None:
                on_batch(j, batches[j], outputs)
            bar.update(world)
    bar.close()
    if not engine:
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
