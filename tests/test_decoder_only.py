"""Decoder-only models: loss on target tokens only, generation returns the continuation only, and the
finetune/evaluate stages run unchanged on a fresh GPT-2."""
from __future__ import annotations

import copy
import json

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from nlgkd.data import collate
from nlgkd.generation import generate_batch
from nlgkd.models import train_tokenizer
from nlgkd.config import DecodingConfig
from nlgkd.recipe import parse_recipe
from nlgkd.runner import Runner
from nlgkd.stages.training import cross_entropy_step


def tiny_gpt2(tokenizer):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    return GPT2LMHeadModel(config).eval()


def tokenizer_for_tests():
    texts = ["the cat sat on the mat", "a dog ran in the park", "name: Eagle | food: Thai"] * 20
    return train_tokenizer(texts, "bpe", 200, encoder_decoder=False)


def test_loss_counts_target_tokens_only():
    tokenizer = tokenizer_for_tests()
    model = tiny_gpt2(tokenizer)
    examples = [{"source_ids": [10, 11, 12, 13], "target_ids": [20, 21, 2]},
                {"source_ids": [14, 15], "target_ids": [22, 2]}]
    batch = collate(examples, pad_id=tokenizer.pad_token_id, causal=True, sep_id=2)
    loss, _ = cross_entropy_step(model, batch, normalizer=5.0)
    # reference: the logits at the position before each target token, nothing from the source
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    terms = []
    for row, ex in enumerate(examples):
        start = len(ex["source_ids"]) + 1
        for k, token in enumerate(ex["target_ids"]):
            terms.append(F.cross_entropy(logits[row, start + k - 1], torch.tensor(token), reduction="sum"))
    assert torch.allclose(loss, torch.stack(terms).sum() / 5.0, atol=1e-5)

    # changing a source token changes the loss only through attention, never by adding source terms
    assert int((batch["labels"] != -100).sum()) == 5


def test_generation_returns_only_the_continuation():
    tokenizer = tokenizer_for_tests()
    model = tiny_gpt2(tokenizer)
    sources = [tokenizer("the cat sat on the mat")["input_ids"], tokenizer("a dog")["input_ids"]]
    decoding = DecodingConfig(strategy="greedy", max_new_tokens=3)
    outputs = generate_batch(model, tokenizer, sources, decoding)
    for (text,), source in zip(outputs, sources):
        assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= 3
        assert not text.startswith(tokenizer.decode(source).strip()[:6])
    # left padding: the short prompt's continuation equals its continuation when generated alone
    alone = generate_batch(model, tokenizer, sources[1:], decoding)
    assert alone[0] == outputs[1]


def test_fresh_gpt2_through_finetune_and_evaluate(tmp_path, tiny_recipe):
    recipe = copy.deepcopy(tiny_recipe)
    recipe["models"]["teacher"]["arch"] = "gpt2"
    del recipe["models"]["teacher"]["init_std"]  # a bart/mbart setting
    Runner(parse_recipe(recipe), runs_root=tmp_path).run()
    rows = [json.loads(line) for line in (tmp_path / "tiny" / "eval" / "predictions" / "teacher.jsonl").read_text().splitlines()]
    assert len(rows) == 16
    assert all(not row["prediction"].startswith(row["source"][:10]) for row in rows)
