"""Token alignment (`nlgkd/alignment.py`): teacher alternatives given as text become sparse soft targets over
the student's tokens. Crafted tokenizers (explicit vocabularies, so every tokenization is known) check
teachers coarser, finer and equal to the student, spaces, punctuation and unicode, merged masses and the
one-hot fallback; then the round trip through the cache format into `sparse_kd_loss`, a same-tokenizer
teacher reproducing its own top-k, and a cross-tokenizer distill (BART teacher -> T5 student)."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from nlgkd.alignment import (SOFT_TARGETS_DIR, api_soft_targets, cross_tokenizer_targets, soft_targets_folder,
                             write_soft_targets)
from nlgkd.data import collate, encode, load_splits
from nlgkd.losses import sparse_kd_loss
from nlgkd.models import forward_on_targets, load_pretrained
from nlgkd.recipe import parse_recipe
from nlgkd.runner import Runner, StageError
from nlgkd.logit_cache import LogitCache

SPECIALS = ["<pad>", "</s>", "<unk>"]
WORDS = [" we", " are", " play", "ing", " played", " caf", "é", " ok"]


BYTE_LEVEL = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)


def bpe(words):
    """Byte-level BPE like GPT-2/BART (a space added before the first word) that knows exactly `words`."""
    vocab = {t: i for i, t in enumerate(SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = []
    for word in words:
        symbols = "".join(piece for piece, _ in BYTE_LEVEL.pre_tokenize_str(word))
        current = symbols[0]
        for symbol in symbols[1:]:
            if current + symbol not in vocab:
                vocab[current + symbol] = len(vocab)
                merges.append((current, symbol))
            current += symbol
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def unigram(words):
    """SentencePiece-style unigram like T5 ("▁" for spaces) with `words` and single characters; the fewest
    pieces win."""
    pieces = [(s, 0.0) for s in SPECIALS] + [("▁", -10.0)] + [(c, -10.0) for c in "abcdefghijklmnopqrstuvwxyz.,!?"]
    pieces += [(w.replace(" ", "▁"), -1.0) for w in words]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


TOKENIZERS = {"bpe": bpe, "unigram": unigram}


def one_id(tokenizer, surface: str) -> int:
    """The id of the student token written `surface` (a leading space for a word-initial token)."""
    byte_level = "".join(piece for piece, _ in BYTE_LEVEL.pre_tokenize_str(surface))  # " é" -> "ĠÃ©"
    ids = tokenizer.convert_tokens_to_ids([byte_level, surface.replace(" ", "▁")])
    found = [i for i in ids if i != tokenizer.unk_token_id]
    assert found, surface
    return found[0]


def rows_as_dicts(top_ids, top_logprobs) -> list[dict[int, float]]:
    return [{int(i): float(lp) for i, lp in zip(ids, lps) if i >= 0} for ids, lps in zip(top_ids, top_logprobs)]


def expect(tokenizer, masses: dict[str, float]) -> dict[int, float]:
    """{student id: log-probability} from {surface: probability}."""
    return {one_id(tokenizer, s): math.log(p) for s, p in masses.items()}


def assert_rows(got: list[dict], want: list[dict], atol=2e-3):
    assert len(got) == len(want)
    for position, (g, w) in enumerate(zip(got, want)):
        assert set(g) == set(w), (position, g, w)
        for key in w:
            assert g[key] == pytest.approx(w[key], abs=atol), (position, key, g, w)


def one_hot(tokenizer, surface):
    return {one_id(tokenizer, surface): 0.0}


EOS_ONE_HOT = lambda tok: {tok.eos_token_id: 0.0}  # noqa: E731
e = math.exp

# "we are playing": the API's " playing" is one token, the student's is " play" + "ing"
COARSE = [("we", -0.1, [("we", -0.1), ("play", -2.5)]),
          (" are", -0.2, [(" are", -0.2), (" were", -1.9)]),
          (" playing", -0.3, [(" playing", -0.3), (" played", -2.0), (" plays", -3.0)])]


@pytest.mark.parametrize("kind", list(TOKENIZERS))
def test_teacher_coarser_than_student(kind):
    tok = TOKENIZERS[kind](WORDS)
    target_ids, top_ids, top_logprobs = api_soft_targets(COARSE, "we are playing", tok, top_k=4)
    assert tok.convert_ids_to_tokens(target_ids)[2:] == [tok.convert_ids_to_tokens(one_id(tok, " play")), "ing", "</s>"]
    assert top_ids.shape == top_logprobs.shape == (5, 4)
    assert top_ids.dtype == np.int32 and top_logprobs.dtype == np.float16
    assert_rows(rows_as_dicts(top_ids, top_logprobs), [
        expect(tok, {" we": e(-0.1), " play": e(-2.5)}),  # first position: "play" as the student starts a text
        expect(tok, {" are": e(-0.2), " we": e(-1.9)}),  # " were" begins with the student's " we"
        expect(tok, {" play": e(-0.3) + e(-3.0), " played": e(-2.0)}),  # " playing", " plays" -> " play"
        one_hot(tok, "ing"),  # starts inside the teacher's " playing"
        EOS_ONE_HOT(tok),  # the API reports no end-of-sequence step
    ])
    # padding follows the cache format: -1 ids, -inf log-probs
    assert top_ids[3, 1] == -1 and np.isneginf(top_logprobs[3, 1])


@pytest.mark.parametrize("kind", list(TOKENIZERS))
def test_alternatives_that_begin_with_the_same_student_token_merge(kind):
    tok = TOKENIZERS[kind]([w for w in WORDS if w != " played"])
    _, top_ids, top_logprobs = api_soft_targets(COARSE, "we are playing", tok, top_k=4)
    row = rows_as_dicts(top_ids, top_logprobs)[2]
    assert row == pytest.approx(expect(tok, {" play": e(-0.3) + e(-2.0) + e(-3.0)}), abs=2e-3)


@pytest.mark.parametrize("kind", list(TOKENIZERS))
def test_teacher_finer_than_student(kind):
    tok = TOKENIZERS[kind](WORDS)
    pieces = COARSE[:2] + [(" pl", -0.3, [(" pl", -0.3), (" played", -1.5), (" are", -2.0)]),
                           ("ay", -0.1, [("ay", -0.1), ("ai", -2.5)]),
                           ("ing", -0.05, [("ing", -0.05), ("s", -3.2), ("ed", -3.5)])]
    _, top_ids, top_logprobs = api_soft_targets(pieces, "we are playing", tok, top_k=3)
    got = rows_as_dicts(top_ids, top_logprobs)
    # " play" spans the teacher's " pl" + "ay": the chosen path's product; the other alternatives of " pl"
    assert got[2] == pytest.approx(expect(tok, {" play": e(-0.3 - 0.1), " played": e(-1.5), " are": e(-2.0)}),
                                   abs=2e-3)
    # "ing" starts where the teacher's "ing" does; "ed" begins with the student's "e"
    assert got[3] == pytest.approx(expect(tok, {"ing": e(-0.05), "s": e(-3.2), "e": e(-3.5)}), abs=2e-3)


@pytest.mark.parametrize("kind", list(TOKENIZERS))
def test_equal_tokens_with_punctuation_and_unicode(kind):
    tok = TOKENIZERS[kind](WORDS)
    pieces = [("caf", -0.4, [("caf", -0.4), ("ok", -1.2)]),
              ("é", -0.1, [("é", -0.1), ("e", -2.4)]),
              (",", -0.3, [(",", -0.3), ("!", -1.4), (" ok", -2.2)]),
              (" ok", -0.2, [(" ok", -0.2), (" we", -2.0)]),
              ("!", -0.5, [("!", -0.5), (".", -1.0)])]
    target_ids, top_ids, top_logprobs = api_soft_targets(pieces, "café, ok!", tok, top_k=3)
    assert len(target_ids) == 6
    assert_rows(rows_as_dicts(top_ids, top_logprobs), [
        expect(tok, {" caf": e(-0.4), " ok": e(-1.2)}),
        expect(tok, {"é": e(-0.1), "e": e(-2.4)}),
        expect(tok, {",": e(-0.3), "!": e(-1.4), " ok": e(-2.2)}),
        expect(tok, {" ok": e(-0.2), " we": e(-2.0)}),
        expect(tok, {"!": e(-0.5), ".": e(-1.0)}),
        EOS_ONE_HOT(tok),
    ])


def test_character_split_over_byte_tokens_and_added_space():
    # no "é" and no " ok" in the vocabulary: "é" is two byte tokens, and "ok" starts with the space byte-level
    # BPE adds ("Ġ", then "o"): both the second byte and the added space have no teacher token of their own
    tok = bpe([" caf"])
    _, top_ids, top_logprobs = api_soft_targets([("ok", -0.2, [("ok", -0.2), ("no", -1.7)]), (" café", -0.3, [])],
                                                "ok café", tok, top_k=2)
    got = rows_as_dicts(top_ids, top_logprobs)
    tokens = tok.convert_ids_to_tokens([max(r, key=r.get) for r in got])
    assert tokens == ["Ġ", "o", "k", "Ġcaf", "Ã", "©", "</s>"]
    assert got[0] == {tok.convert_tokens_to_ids("Ġ"): 0.0}  # the added space: one-hot
    # "o" starts the teacher's "ok", whose path reaches past it; "no" begins with the student's "n"
    assert got[1] == pytest.approx({tok.convert_tokens_to_ids("o"): -0.2, tok.convert_tokens_to_ids("n"): -1.7},
                                   abs=2e-3)
    assert got[2] == {tok.convert_tokens_to_ids("k"): 0.0}
    assert got[3] == pytest.approx({tok.convert_tokens_to_ids("Ġcaf"): -0.3}, abs=2e-3)
    assert got[4] == {tok.convert_tokens_to_ids("Ã"): 0.0} and got[5] == {tok.convert_tokens_to_ids("©"): 0.0}


@pytest.mark.parametrize("kind", list(TOKENIZERS))
def test_stripped_or_edited_text_and_missing_logprobs(kind):
    tok = TOKENIZERS[kind](WORDS)
    plain = rows_as_dicts(*api_soft_targets(COARSE, "we are playing", tok, top_k=4)[1:])
    # the API answered "\n we are playing"; the PT is stripped: the same soft targets
    answered = [("\n", -0.01, [("\n", -0.01)]), (" we", -0.1, [(" we", -0.1), (" play", -2.5)])] + COARSE[1:]
    assert_rows(rows_as_dicts(*api_soft_targets(answered, "we are playing", tok, top_k=4)[1:]), plain)
    # ... also when the caller already stripped the piece's text but not its alternatives (the API stage does)
    trimmed = [("we", -0.1, [(" we", -0.1), (" play", -2.5)])] + COARSE[1:]
    assert_rows(rows_as_dicts(*api_soft_targets(trimmed, "we are playing", tok, top_k=4)[1:]), plain)
    # an edited PT (a double space collapsed): the pieces are placed by matching characters
    spaced = COARSE[:1] + [("  are", -0.2, [("  are", -0.2)])] + COARSE[2:]
    got = rows_as_dicts(*api_soft_targets(spaced, "we are playing", tok, top_k=4)[1:])
    assert got[1] == pytest.approx(expect(tok, {" are": e(-0.2)}), abs=2e-3)  # its unmatched space counts as stripped
    assert got[2] == pytest.approx(plain[2], abs=2e-3)
    # no logprobs at all, or pieces of another text: one-hot everywhere
    target_ids, top_ids, top_logprobs = api_soft_targets(None, "we are playing", tok, top_k=4)
    assert (top_ids[:, 0] == target_ids).all() and (top_logprobs[:, 0] == 0).all() and (top_ids[:, 1:] == -1).all()
    _, top_ids, _ = api_soft_targets([("xyz", -0.1, [])], "we are playing", tok, top_k=4)
    assert (top_ids[:, 1:] == -1).all()


def test_truncation_matches_data_encode():
    tok = bpe(WORDS)
    target_ids, top_ids, _ = api_soft_targets(COARSE, "we are playing", tok, top_k=2, max_target_length=3)
    assert target_ids == [one_id(tok, " we"), one_id(tok, " are"), tok.eos_token_id]
    assert top_ids.shape == (3, 2) and top_ids[2, 0] == tok.eos_token_id


# ----------------------------------------------------------------------------------------- round trip
def test_soft_targets_round_trip_into_sparse_kd_loss(tmp_path):
    tok = bpe(WORDS)
    rows = [{"source": "name: we", "pt": "we are playing", "pieces": COARSE},
            {"source": "name: cafe", "pt": "we are", "pieces": COARSE[:2]}]
    stage_dir = tmp_path / "api_pts"
    manifest = write_soft_targets(stage_dir / SOFT_TARGETS_DIR, rows, tok, top_k=3, meta={"teacher": "gpt-x"},
                                  max_source_length=64, max_target_length=64)
    assert manifest["examples"] == 2 and manifest["tokens"] == 5 + 3 and manifest["one_hot_tokens"] == 2 + 1
    folder = soft_targets_folder(stage_dir)
    assert folder == stage_dir / SOFT_TARGETS_DIR
    cache = LogitCache(folder)
    cache.check(tok, "fingerprint of any recipe's data", "cached_teacher")  # soft targets carry their own pairs
    with pytest.raises(ValueError, match="align_to"):
        cache.check(unigram(WORDS), "x", "cached_teacher")
    examples = cache.training_examples()
    assert examples[0]["source_ids"] == tok("name: we")["input_ids"]
    batch = cache.collate(examples, pad_id=tok.pad_token_id, causal=False, sep_id=tok.eos_token_id)

    # the hand-computed soft targets of both rows (the second is a prefix of the first, then EOS)
    row1 = [{" we": e(-0.1), " play": e(-2.5)}, {" are": e(-0.2), " we": e(-1.9)},
            {" play": e(-0.3) + e(-3.0), " played": e(-2.0)}, {"ing": 1.0}, {"</s>": 1.0}]
    row2 = row1[:2] + [{"</s>": 1.0}]
    targets = [[{(tok.eos_token_id if s == "</s>" else one_id(tok, s)): p for s, p in r.items()} for r in row]
               for row in (row1, row2)]
    torch.manual_seed(0)
    logits = torch.randn(2, 5, len(tok))
    mask = batch["labels"] != -100
    for tail in ("renormalize", "bucket"):
        total = 0.0
        for b, row in enumerate(targets):
            for t, masses in enumerate(row):
                log_p = torch.log_softmax(logits[b, t].double(), -1)
                if tail == "renormalize":
                    z = sum(masses.values())
                    total += sum(p / z * (math.log(p / z) - log_p[i].item()) for i, p in masses.items())
                else:  # kept ids plus one bucket for the rest, on both sides
                    q_rest = 1 - sum(masses.values())
                    p_rest = 1 - sum(log_p[i].exp().item() for i in masses)
                    total += sum(p * (math.log(p) - log_p[i].item()) for i, p in masses.items())
                    total += q_rest * (math.log(q_rest) - math.log(p_rest)) if q_rest > 1e-6 else 0.0
        loss = sparse_kd_loss(logits, batch["teacher_topk_logprobs"], batch["teacher_topk_ids"], mask, tail=tail)
        assert loss.item() == pytest.approx(total / 8, rel=2e-3), tail


# ------------------------------------------------------------------------------------ local teachers
def test_same_tokenizer_teacher_reproduces_its_own_top_k(trained):
    """Through the alignment path, a teacher with the student's own tokenizer gives back its top-k: every
    alternative's text maps to the token it came from. The first position is left out: there a teacher's
    non-canonical first token ("L" without the added space) maps to the student's canonical one."""
    recipe, root = trained
    teacher, tok = load_pretrained(str(root / "tiny" / "teacher"))
    teacher.eval()
    splits, _ = load_splits(parse_recipe(recipe).data)
    encoded, _ = encode(splits["validation"].select(range(8)), tok, 256, 256)
    batch = collate(list(encoded), pad_id=tok.pad_token_id, causal=False)
    k = 5
    ids, logprobs = cross_tokenizer_targets(teacher, tok, tok, list(encoded["source"]), list(encoded["target"]),
                                            batch["labels"], k, 256, 256)
    with torch.no_grad():
        top = torch.log_softmax(forward_on_targets(teacher, batch)[0].float(), -1).topk(k, dim=-1)
    mask = batch["labels"] != -100
    compared = 0
    for b in range(len(encoded)):
        for t in range(1, int(mask[b].sum())):
            want = {int(i): float(v) for i, v in zip(top.indices[b, t], top.values[b, t])}
            got = {int(i): float(v) for i, v in zip(ids[b, t], logprobs[b, t]) if i >= 0}
            assert set(got) == set(want), (b, t, tok.convert_ids_to_tokens(list(got)), tok.convert_ids_to_tokens(list(want)))
            assert all(abs(got[i] - want[i]) < 1e-4 for i in want), (b, t, got, want)
            compared += 1
    assert compared > 100
    assert (ids[~mask] == -1).all()


def cross_recipe(trained, *stages):
    """The trained recipe plus a fresh T5 student with its own unigram tokenizer (the teacher is a BART
    with byte-level BPE), and `stages`."""
    recipe, root = trained
    recipe = copy.deepcopy(recipe)
    recipe["models"]["t5_student"] = {"init": "fresh", "arch": "t5", "tokenizer": "unigram", "vocab_size": 260,
                                      "d_model": 32, "encoder_layers": 1, "decoder_layers": 1, "attention_heads": 2,
                                      "ffn_dim": 64, "dropout": 0.0}
    recipe["stages"].extend(copy.deepcopy(list(stages)))
    return Runner(parse_recipe(recipe), runs_root=root)


def cross_stage(name, **fields):
    return {"name": name, "kind": "distill", "student": "t5_student", "teacher": "teacher", "cross_tokenizer": True,
            "cross_tokenizer_top_k": 8, "max_steps": 10, "batch_size": 8, "lr": 3e-3, "eval_samples": 0,
            "save_every": None, "log_every": 1, **fields}


def test_cross_tokenizer_distill_lowers_its_kd_loss(trained):
    runner = cross_recipe(trained, cross_stage("cross_kd"))
    runner.run(only="cross_kd")
    logs = [json.loads(line) for line in (runner.run_dir / "cross_kd" / "metrics.jsonl").read_text().splitlines()]
    kd = [r["logits_kd"] for r in logs if "logits_kd" in r]
    assert len(kd) == 10 and all(np.isfinite(kd))
    assert sum(kd[-3:]) / 3 < 0.8 * sum(kd[:3]) / 3, kd
    # the targets it trained on carry the teacher's distributions, not only one-hot fallbacks
    _, student_tok = load_pretrained(str(runner.run_dir / "cross_kd"))
    teacher, teacher_tok = load_pretrained(str(runner.run_dir / "teacher"))
    splits, _ = load_splits(runner.recipe.data)
    encoded, _ = encode(splits["validation"].select(range(8)), student_tok, 48, 48)
    batch = collate(list(encoded), pad_id=student_tok.pad_token_id, causal=False)
    ids, logprobs = cross_tokenizer_targets(teacher.eval(), teacher_tok, student_tok, list(encoded["source"]),
                                            list(encoded["target"]), batch["labels"], 8, 48, 48)
    mask = batch["labels"] != -100
    spread = (ids[..., 1] >= 0) & mask  # a position with more than its own target id
    assert spread.sum() > 0.3 * mask.sum()
    assert (logprobs.exp().sum(-1)[mask] <= 1 + 1e-4).all()
    assert (ids[..., 0][mask] >= 0).all()


def test_cross_tokenizer_is_opt_in_and_limited_to_logit_kd(trained):
    runner = cross_recipe(trained, cross_stage("no_opt_in", cross_tokenizer=False),
                          cross_stage("with_hidden", hidden={"loss": "tinybert"}),
                          cross_stage("with_mse", objective="logits_mse"))
    with pytest.raises(StageError, match=r"different vocabularies.*set cross_tokenizer: true"):
        runner.run(only="no_opt_in")
    with pytest.raises(StageError, match=r"cross_tokenizer: hidden.loss 'tinybert'.*same tokenizer"):
        runner.run(only="with_hidden")
    with pytest.raises(StageError, match=r"cross_tokenizer: objective 'logits_mse'.*logits_kd or noisy_kd"):
        runner.run(only="with_mse")
