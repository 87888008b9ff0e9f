"""Token-level soft targets across tokenizers: a teacher's top-k alternatives, given as text, aligned to the
student's tokens by character offsets.

Two users:
* an API teacher (OpenAI-style `logprobs` + `top_logprobs`): `api_soft_targets` per pseudo-target, then
  `write_soft_targets` stores them in the `cache_logits` format, so `distill` with `cached_teacher:` trains
  on them unchanged;
* a local teacher with another tokenizer (e.g. BART -> T5): `distill` with `cross_tokenizer: true` calls
  `cross_tokenizer_targets` per batch; the teacher scores the same target text under its own tokenizer.

Both produce the sparse format `losses.sparse_kd_loss` reads: per student target position, `k` student ids
(-1 = padding) and their log-probabilities (-inf where padded).

## The mapping (one student position at a time)
Teacher tokens are "pieces": `(text, logprob, [(alternative text, logprob), ...])`, whose texts concatenate
to the generated text. Pieces are placed on the PT text by their character offsets (the PT may be the
generated text stripped: leading whitespace of a piece that is not in the PT is dropped, from the piece
and from its alternatives; other differences are aligned with `difflib`'s matching blocks). Student tokens
are placed by the offsets the fast tokenizer reports (`return_offsets_mapping`), never by looking at "Ġ"
or "▁": a gap before a token (trimmed offsets) belongs to it, a token that starts inside the previous one
(the second byte of a character) starts nothing, and a whitespace token whose span is not whitespace (the
space a tokenizer adds before the first word, e.g. "Ġ" + "L" for "Loch") is a "phantom".

For student token i starting at character s and ending at e:
1. No teacher piece starts at s (s lies inside a teacher token: the teacher is coarser, e.g. "ing" of
   "play"+"ing" under " playing"), or s is unknown: **one-hot** on the student's own target token
   (log-prob 0, other slots padded). The student's EOS is one-hot unless the teacher reports an
   end-of-sequence step (local teachers do; the API does not).
2. Teacher piece j starts at s. The target token gets the **chosen-path probability**: the product of the
   chosen teacher tokens j, j+1, ... up to the first one that reaches e. Equal tokens: P(piece j). Teacher
   coarser (" playing" over " play"): P(" playing") — every teacher continuation that starts with
   " playing" starts with the student token " play". Teacher finer (" pl"+"ay" under " play"):
   P(" pl") * P("ay" | " pl"), the probability the teacher writes " play" by its own path — rather than
   P(" pl"), which would also count " plan", " plot", ...; the rest of P(" pl") is missing mass.
3. Every other alternative at piece j goes to the student token its text begins with: the student token
   whose text (as the student writes it after another token) equals the alternative, else the longest one
   that is a prefix of it (" played" -> " played" if the student has it, else " play", else " pl"...). At
   the first student position, where a tokenizer may add a leading space, the alternative is tokenized on
   its own and its first token taken. An alternative of None (end of sequence) goes to the student's EOS.
   Alternatives that map to the same student id add up (disjoint teacher events).
4. The k largest masses are kept, as log-probabilities. What is not kept — the teacher's mass outside its
   top-k, alternatives no student token matches, the rest of a finer teacher's first token — is missing
   mass, handled by `distill`'s `cache_tail` exactly as for a `cache_logits` top-k: `renormalize`
   (distribution restricted to the kept ids) or `bucket` (one "everything else" outcome).

Worked example, student tokens " the" " play" "ing" (+ EOS), teacher pieces " the" " playing":
    piece " the"     (-0.1, alternatives " the" -0.1, " a" -2.5)
    piece " playing" (-0.2, alternatives " playing" -0.2, " played" -2.0, " plays" -3.0)
    position 0 " the":  {" the": e^-0.1, " a": e^-2.5}
    position 1 " play": {" play": e^-0.2 + e^-3.0 (" plays" begins with " play"), " played": e^-2.0}
                        (when the student has " played"; otherwise all three merge on " play")
    position 2 "ing":   one-hot (starts inside the teacher's " playing")
    position 3 EOS:     one-hot
"""
from __future__ import annotations

import difflib
import json
import math
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .data import truncate

# piece / alternative format: (text, logprob, [(alternative text or None, logprob), ...]); None = end of sequence
Alternative = tuple[Optional[str], float]
Piece = tuple[Optional[str], float, Sequence[Alternative]]

SOFT_TARGETS_DIR = "soft_targets"  # a stage that writes soft targets puts them in <stage>/soft_targets/


# ------------------------------------------------------------------------------------ student side
@dataclass
class StudentVocab:
    """What the alignment needs of the student tokenizer, computed once per tokenizer."""

    tokenizer: object
    surface: list[Optional[str]]  # id -> the text the token adds after another token (None: special or partial byte)
    by_surface: dict[str, int]  # surface text -> smallest id with that surface
    longest: int  # longest surface, bounds the prefix search
    eos_id: int


_VOCABS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def student_vocab(tokenizer) -> StudentVocab:
    """Surface texts of every student token, by decoding it after an anchor token ("a"): the decoder's
    own rule for spaces ("Ġ", "▁", "##") decides, so no marker is special-cased here."""
    cached = _VOCABS.get(tokenizer)
    if cached is not None:
        return cached
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"token alignment needs a fast (Rust) tokenizer for character offsets; "
                         f"{type(tokenizer).__name__} is not one: load it with use_fast=True")
    backend = tokenizer.backend_tokenizer
    anchor = tokenizer("a", add_special_tokens=False)["input_ids"][-1]
    base = backend.decode([anchor], skip_special_tokens=True)
    size = len(tokenizer)
    special = set(tokenizer.all_special_ids)
    decoded = backend.decode_batch([[anchor, i] for i in range(size)], skip_special_tokens=True)
    surface: list[Optional[str]] = []
    for i, text in enumerate(decoded):
        ok = i not in special and text.startswith(base) and len(text) > len(base) and "\ufffd" not in text
        surface.append(text[len(base):] if ok else None)
    by_surface: dict[str, int] = {}
    for i, text in enumerate(surface):
        if text is not None:
            by_surface.setdefault(text, i)
    vocab = StudentVocab(tokenizer, surface, by_surface, max(map(len, by_surface), default=1), tokenizer.eos_token_id)
    _VOCABS[tokenizer] = vocab
    return vocab


def token_starts(ids: list[int], offsets: list[tuple[int, int]], text: str, vocab: StudentVocab):
    """Character (start, end) of each student token, and which are phantoms. A start is None when the
    token starts inside the previous one (bytes of one character) or is a phantom (a whitespace token
    covering non-whitespace: the space a tokenizer adds before the first word)."""
    starts: list[Optional[int]] = []
    ends: list[Optional[int]] = []
    phantom: list[bool] = []
    prev_end = 0
    for token, (a, b) in zip(ids, offsets):
        surface = vocab.surface[token]
        is_phantom = surface is not None and surface.isspace() and not text[a:b].isspace()
        phantom.append(is_phantom)
        if is_phantom or a < prev_end:
            starts.append(None)
            ends.append(None)
            continue
        start = prev_end  # a gap before the token (trimmed offsets: the space of " word") belongs to it
        starts.append(start)
        ends.append(max(b, start))
        prev_end = max(prev_end, b)
    return starts, ends, phantom


def student_target(text: str, tokenizer, max_target_length: Optional[int] = None):
    """The student's target ids for `text` as `data.encode` builds them (tokens, truncated to
    max_target_length - 1, then EOS), their (start, end) character spans and phantom flags. EOS starts at
    the end of the text, or at None when the text was truncated."""
    vocab = student_vocab(tokenizer)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    kept = len(truncate(ids + [tokenizer.eos_token_id], max_target_length)) - 1
    truncated = kept < len(ids)
    ids, offsets = ids[:kept], offsets[:kept]
    starts, ends, phantom = token_starts(ids, offsets, text, vocab)
    eos_start = None if truncated else len(text)
    return ids + [tokenizer.eos_token_id], starts + [eos_start], ends + [eos_start], phantom + [False]


# ------------------------------------------------------------------------------------ teacher side
def piece_spans(texts: list[Optional[str]], text: str) -> list[tuple[Optional[int], Optional[int], int]]:
    """(start, end, stripped) of each teacher piece in `text`. start is None when the piece's first
    character (after leading whitespace that `text` does not have) is not in `text`; end is one past its
    last character found in `text`; stripped counts the dropped leading whitespace. Pieces of None or ""
    (end of sequence, special tokens) get (None, None, 0)."""
    raw = "".join(t for t in texts if t)
    to_text = [-1] * len(raw)
    offset = raw.find(text)
    if offset >= 0:  # the usual case: text is the generated text, perhaps stripped
        for c in range(len(text)):
            to_text[offset + c] = c
    else:  # edited text: align characters by difflib's matching blocks
        matcher = difflib.SequenceMatcher(None, raw, text, autojunk=False)
        for a, b, n in matcher.get_matching_blocks():
            for c in range(n):
                to_text[a + c] = b + c
    spans = []
    pos = 0
    for piece in texts:
        if not piece:
            spans.append((None, None, 0))
            continue
        mapped = to_text[pos : pos + len(piece)]
        pos += len(piece)
        lead = 0
        while lead < len(piece) and mapped[lead] < 0 and piece[lead].isspace():
            lead += 1
        found = [m for m in mapped if m >= 0]
        start = mapped[lead] if lead < len(piece) and mapped[lead] >= 0 else None
        spans.append((start, found[-1] + 1 if found else None, lead))
    return spans


def as_placed(alt: Optional[str], stripped: int, at_text_start: bool) -> Optional[str]:
    """A teacher token's text as it would sit in the PT: without the leading whitespace the PT dropped (the
    `stripped` characters its piece lost; at the start of a stripped PT, all of it)."""
    if alt is None:
        return None
    k = 0
    while k < stripped and k < len(alt) and alt[k].isspace():
        k += 1
    return alt[k:].lstrip() if at_text_start else alt[k:]


def map_alternative(alt: Optional[str], vocab: StudentVocab, first: bool) -> Optional[int]:
    """The student id a teacher alternative's text begins with (step 3 of the module docstring); None when
    no student token matches. `first`: the student's first position, where nothing precedes the token."""
    if alt is None:
        return vocab.eos_id
    if not alt:
        return None
    if first:
        # the student's own first token of the alternative, with any leading space its tokenizer adds
        ids = vocab.tokenizer(alt, add_special_tokens=False)["input_ids"]
        return ids[0] if ids else None
    for n in range(min(len(alt), vocab.longest), 0, -1):
        found = vocab.by_surface.get(alt[:n])
        if found is not None:
            return found
    return None


# ---------------------------------------------------------------------------------------- alignment
def soft_targets(pieces: Sequence[Piece], text: str, tokenizer, top_k: int, max_target_length: Optional[int] = None):
    """`api_soft_targets` with float64 log-probs (the local-teacher path keeps full precision), plus
    `aligned` [L] bool: which positions got the teacher's distribution (the others are one-hot)."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    vocab = student_vocab(tokenizer)
    target_ids, starts, ends, phantom = student_target(text, tokenizer, max_target_length)
    pieces = list(pieces or [])  # an answer without logprobs: every position one-hot
    texts = [p[0] for p in pieces]
    spans = piece_spans(texts, text)
    at_start: dict[int, int] = {}
    for j, (start, _, _) in enumerate(spans):
        if start is not None:
            at_start.setdefault(start, j)
    # the end-of-sequence step (local teachers): aligned with the student's EOS when neither side is truncated
    end_piece = len(pieces) - 1 if pieces and pieces[-1][0] is None else None
    text_ends = [e for (_, e, _), t in zip(spans, texts) if t is not None and e is not None]
    teacher_covers_text = bool(text_ends) and max(text_ends) == len(text)
    # a phantom first student token lines up with a first piece that is only whitespace the PT dropped
    leading_piece = 0 if spans and texts[0] and spans[0][0] is None and spans[0][2] == len(texts[0]) else None

    L = len(target_ids)
    top_ids = np.full((L, top_k), -1, dtype=np.int32)
    top_logprobs = np.full((L, top_k), -np.inf, dtype=np.float64)
    aligned = np.zeros(L, dtype=bool)
    for i, target in enumerate(target_ids):
        is_eos = i == L - 1
        if is_eos:
            j = end_piece if starts[i] is not None and teacher_covers_text else None
        elif phantom[i]:
            j = leading_piece if i == 0 else None
        else:
            j = at_start.get(starts[i]) if starts[i] is not None else None
        chosen_logprob = _chosen_path(pieces, spans, j, ends[i], single=is_eos or phantom[i]) if j is not None else None
        if chosen_logprob is None:  # unaligned: one-hot on the PT's own token
            top_ids[i, 0], top_logprobs[i, 0] = target, 0.0
            continue
        aligned[i] = True
        masses = {target: math.exp(chosen_logprob)}
        at_text_start = i == 0 and not text[:1].isspace()
        # compared as placed: a caller may have stripped the first piece's text but not its alternatives
        chosen_text = as_placed(pieces[j][0], spans[j][2], at_text_start)
        for alt, alt_logprob in pieces[j][2]:
            alt = as_placed(alt, spans[j][2], at_text_start)
            if alt == chosen_text:
                continue  # counted in the chosen path
            sid = map_alternative(alt, vocab, first=(i == 0))
            if sid is not None:
                masses[sid] = masses.get(sid, 0.0) + math.exp(alt_logprob)
        best = sorted(masses.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]
        for slot, (sid, mass) in enumerate(best):
            top_ids[i, slot] = sid
            top_logprobs[i, slot] = min(0.0, math.log(mass)) if mass > 0 else -np.inf
    return target_ids, top_ids, top_logprobs, aligned


def _chosen_path(pieces, spans, j: int, end: Optional[int], single: bool) -> Optional[float]:
    """Sum of the chosen log-probs of pieces j, j+1, ... up to the first that reaches `end` (the student
    token's end); None when the teacher's text stops before it (a truncated teacher)."""
    if single:
        return float(pieces[j][1])
    total = 0.0
    for m in range(j, len(pieces)):
        if pieces[m][0] is None:
            return None
        total += float(pieces[m][1])
        piece_end = spans[m][1]
        if piece_end is not None and end is not None and piece_end >= end:
            return total
    return None


def api_soft_targets(pieces: Sequence[Piece], text: str, tokenizer, top_k: int,
                     max_target_length: Optional[int] = None) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Sparse soft targets for one pseudo-target, in the student's vocabulary.

    Args:
        pieces: the teacher's tokens in order, `(token_text, logprob, [(alt_text, alt_logprob), ...])` as an
            OpenAI chat completion returns them in `choices[0].logprobs.content` (`token`, `logprob`,
            `top_logprobs`, up to 20). Token texts concatenate to the generated text. A piece or an
            alternative of None stands for end of sequence (local teachers; the API has none).
        text: the PT text, the generated text or an edit of it (usually stripped).
        tokenizer: the student's fast tokenizer.
        top_k: slots per position.
        max_target_length: truncate like `data.encode` (tokens + EOS <= max_target_length); None: no limit.

    Returns:
        target_ids: list of L ints, the student's tokens of `text` followed by EOS (what `data.encode` gives).
        top_ids: [L, top_k] int32 student ids, most likely first; -1 pads.
        top_logprobs: [L, top_k] float16 log-probabilities; -inf pads. A position the teacher does not
            cover is one-hot: (target id, 0.0) then padding.
    See the module docstring for how alternatives map to student ids and how missing mass is treated.
    """
    target_ids, top_ids, top_logprobs, _ = soft_targets(pieces, text, tokenizer, top_k, max_target_length)
    return target_ids, top_ids, top_logprobs.astype(np.float16)


# --------------------------------------------------------------------------------------- on disk
def write_soft_targets(folder, rows: Sequence[dict], tokenizer, top_k: int, meta: dict, *,
                       max_source_length: Optional[int] = None, max_target_length: Optional[int] = None) -> dict:
    """Store soft targets in the `cache_logits` format (see `nlgkd/stages/cache_logits.py`), so `distill` with
    `cached_teacher: <stage>` reads them with `LogitCache` unchanged. A stage puts them in
    `<its folder>/soft_targets/` (`SOFT_TARGETS_DIR`); `cached_teacher` finds them there.

    Args:
        folder: where to write (created).
        rows: dicts with `source` (input text), `pt` (pseudo-target text) and `pieces` (see `api_soft_targets`).
        tokenizer: the student's tokenizer; ids, offsets and the manifest's tokenizer hash come from it.
        top_k: slots per position (at most the API's top_logprobs + 1 are ever filled).
        meta: JSON-able facts for the manifest (teacher name, model, stage...); never secrets. A
            `data_fingerprint` in it makes `distill` check the recipe's data too.
        max_source_length, max_target_length: truncate like `data.encode` (the recipe's `data:` limits).

    Returns the manifest. Files: examples/ (source, target, source_ids, target_ids), offsets.npy [N + 1],
    topk_ids.npy [tokens, k] int32, topk_logprobs.npy [tokens, k] float16, manifest.json.
    """
    import datasets

    from .fingerprints import tokenizer_hash

    if not rows:
        raise ValueError("write_soft_targets: no rows (every pseudo-target was empty or failed)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    examples, all_ids, all_logprobs = [], [], []
    one_hot = 0
    for n, row in enumerate(rows):
        missing = [key for key in ("source", "pt", "pieces") if key not in row]
        if missing:
            raise ValueError(f"write_soft_targets: row {n} has no {missing}; each row needs source, pt and pieces")
        target_ids, ids, logprobs, aligned = soft_targets(row["pieces"], row["pt"], tokenizer, top_k, max_target_length)
        source_ids = truncate(tokenizer(row["source"], add_special_tokens=True)["input_ids"], max_source_length)
        examples.append({"source": row["source"], "target": row["pt"], "source_ids": source_ids,
                         "target_ids": target_ids, "kind": "pt", "input": row["source"]})
        all_ids.append(ids)
        all_logprobs.append(logprobs)
        one_hot += int((~aligned).sum())
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(e["target_ids"]) for e in examples])
    datasets.Dataset.from_list(examples).save_to_disk(str(folder / "examples"))
    np.save(folder / "offsets.npy", offsets)
    np.save(folder / "topk_ids.npy", np.concatenate(all_ids).astype(np.int32))
    np.save(folder / "topk_logprobs.npy", np.concatenate(all_logprobs).astype(np.float16))
    manifest = {
        "kind": "soft_targets",
        "teacher": meta.get("teacher"),
        "tokenizer": tokenizer_hash(tokenizer),
        "vocab_size": len(tokenizer),
        "k": top_k,
        "dtype": "fp16",
        "data_fingerprint": meta.get("data_fingerprint"),
        "examples": len(rows),
        "tokens": int(offsets[-1]),
        "one_hot_tokens": one_hot,  # positions with no aligned teacher token (incl. every EOS of an API teacher)
        "meta": meta,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def soft_targets_folder(stage_dir) -> Path:
    """The folder `cached_teacher:` reads: a cache_logits stage itself, or `<stage>/soft_targets/`."""
    stage_dir = Path(stage_dir)
    for folder in (stage_dir, stage_dir / SOFT_TARGETS_DIR):
        if (folder / "manifest.json").exists():
            return folder
    raise ValueError(f"cached_teacher: {stage_dir.name!r} has neither a top-k cache nor soft targets "
                     f"({stage_dir / SOFT_TARGETS_DIR} is missing); name a cache_logits stage, or a "
                     "pseudo_targets stage whose API teacher returned top_logprobs")


# ------------------------------------------------------------------------------ local teacher (distill)
def teacher_pieces(tokenizer, target_ids: list[int], chosen: list[float], top_ids: list[list[int]],
                   top_logprobs: list[list[float]]) -> list[Piece]:
    """A local teacher's forward pass as pieces. Texts come from the teacher's own decoder: a token's text
    is what it adds after the token before it (`decode([prev, t]) - decode([prev])`). Its EOS becomes None;
    other special tokens give "" (aligned with nothing) and are dropped as alternatives.

    Args: target_ids [n] teacher ids of the target (ending in EOS); chosen [n] their log-probs;
    top_ids / top_logprobs [n][k] the teacher's top-k at each position.
    """
    backend = tokenizer.backend_tokenizer
    eos, special = tokenizer.eos_token_id, set(tokenizer.all_special_ids)
    pairs, bases = [], []
    for t, token in enumerate(target_ids):
        prev = [target_ids[t - 1]] if t > 0 else []
        bases.append(prev)
        pairs += [prev + [token]] + [prev + [alt] for alt in top_ids[t]]
    decoded = backend.decode_batch(pairs, skip_special_tokens=True)
    base_text = backend.decode_batch(bases, skip_special_tokens=True)
    pieces = []
    k = len(top_ids[0]) if top_ids else 0
    for t, token in enumerate(target_ids):
        row = decoded[t * (k + 1) : (t + 1) * (k + 1)]
        base = base_text[t]

        def added(full: str, tid: int) -> Optional[str]:
            if tid == eos:
                return None
            if tid in special:
                return ""
            return full[len(base):] if full.startswith(base) else backend.decode([tid], skip_special_tokens=True)

        alts = [(added(full, alt), float(lp)) for full, alt, lp in zip(row[1:], top_ids[t], top_logprobs[t])
                if alt == eos or alt not in special]
        pieces.append((added(row[0], token), float(chosen[t]), alts))
    return pieces


@torch.no_grad()
def cross_tokenizer_targets(teacher, teacher_tokenizer, student_tokenizer, sources: list[str], targets: list[str],
                            labels: torch.Tensor, top_k: int, max_source_length: int, max_target_length: int):
    """The teacher's top-k, aligned to the student's target tokens, for one batch (distill `cross_tokenizer`).

    The teacher reads `sources[b]` and is teacher-forced on `targets[b]`, both under its own tokenizer and
    truncated like `data.encode`; its top-k per teacher position become pieces (`teacher_pieces`) and
    `soft_targets` maps them onto the student's tokens of the same text.

    Args:
        labels: [B, T] the student's target ids (-100 padding); each row must be the student's tokenization
            of targets[b] (it is, when the batch comes from `data.encode`).
    Returns:
        teacher_topk_ids [B, T, top_k] long (student ids, -1 padding) and teacher_topk_logprobs [B, T, top_k]
        float32, on labels' device: the inputs of `losses.sparse_kd_loss`.
    """
    from .data import collate
    from .models import forward_on_targets, is_causal

    tok = teacher_tokenizer
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    examples = []
    for source, target in zip(sources, targets):
        source_ids = truncate(tok(source, add_special_tokens=True)["input_ids"], max_source_length)
        target_ids = truncate(tok(target, add_special_tokens=False)["input_ids"] + [eos], max_target_length)
        examples.append({"source_ids": source_ids, "target_ids": target_ids})
    device = next(teacher.parameters()).device
    batch = collate(examples, pad_id=pad, causal=is_causal(teacher), sep_id=eos)
    batch = {key: value.to(device) for key, value in batch.items()}
    logits, _ = forward_on_targets(teacher, batch)
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    k = min(top_k, logprobs.shape[-1])
    top = logprobs.topk(k, dim=-1)
    chosen = logprobs.gather(-1, batch["labels"].clamp(min=0)[..., None]).squeeze(-1)
    top_values, top_indices, chosen = top.values.cpu(), top.indices.cpu(), chosen.cpu()

    B, T = labels.shape
    out_ids = torch.full((B, T, top_k), -1, dtype=torch.long)
    out_logprobs = torch.full((B, T, top_k), float("-inf"), dtype=torch.float32)
    for b, ex in enumerate(examples):
        n = len(ex["target_ids"])
        pieces = teacher_pieces(tok, ex["target_ids"], chosen[b, :n].tolist(), top_indices[b, :n].tolist(),
                                top_values[b, :n].tolist())
        student_ids, ids, lps, _ = soft_targets(pieces, targets[b], student_tokenizer, top_k, max_target_length)
        row = labels[b][labels[b] != -100].tolist()
        if student_ids != row:
            raise ValueError(f"cross_tokenizer: example {b}'s student target tokens differ from the student's "
                             f"tokenization of its target text ({len(row)} vs {len(student_ids)} tokens); the "
                             "batch must come from data.encode with the student's tokenizer")
        out_ids[b, : len(row)] = torch.from_numpy(ids.astype(np.int64))
        out_logprobs[b, : len(row)] = torch.from_numpy(lps.astype(np.float32))
    return out_ids.to(labels.device), out_logprobs.to(labels.device)
