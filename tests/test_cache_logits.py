"""cache_logits: the stored top-k equals the teacher's within fp16 tolerance, KD from a full-vocabulary
cache equals online KD, and a cache that does not match the student is refused."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nlgkd.losses import kd_loss, sparse_kd_loss
from nlgkd.models import forward_on_targets, load_pretrained
from nlgkd.runner import StageError
from nlgkd.logit_cache import LogitCache

from conftest import distill_stage, with_stage


def cache_stage(name, **fields):
    return {"name": name, "kind": "cache_logits", "teacher": "teacher", **fields}


def first_batch(cache: LogitCache, tokenizer, n=8):
    examples = cache.training_examples()[:n]
    return cache.collate(examples, pad_id=tokenizer.pad_token_id, causal=False, sep_id=tokenizer.eos_token_id)


def test_cache_round_trips_the_teachers_top_k(trained):
    runner, _ = with_stage(trained, cache_stage("cache16", top_k=8, dtype="fp16"))
    runner.run(only="cache16")
    cache = LogitCache(runner.run_dir / "cache16")
    teacher, tokenizer = load_pretrained(str(runner.run_dir / "teacher"))
    assert cache.manifest["k"] == 8 and cache.manifest["examples"] == 320
    assert cache.ids.shape == (cache.manifest["tokens"], 8) and cache.logprobs.dtype == np.float16
    batch = first_batch(cache, tokenizer)
    with torch.no_grad():
        logits, _ = forward_on_targets(teacher.eval(), batch)
    top = torch.log_softmax(logits, -1).topk(8, dim=-1)
    mask = batch["labels"] != -100
    assert torch.equal(batch["teacher_topk_ids"][mask], top.indices[mask])
    assert torch.allclose(batch["teacher_topk_logprobs"][mask], top.values[mask], atol=2e-2, rtol=1e-3)
    assert (batch["teacher_topk_ids"][~mask] == -1).all()


def test_kd_from_full_vocabulary_cache_equals_online_kd(trained):
    runner, _ = with_stage(trained, cache_stage("cachefull", top_k=100_000, dtype="fp32"))
    runner.run(only="cachefull")
    cache = LogitCache(runner.run_dir / "cachefull")
    teacher, tokenizer = load_pretrained(str(runner.run_dir / "teacher"))
    student, _ = load_pretrained(str(runner.run_dir / "student"))
    assert cache.manifest["k"] == len(tokenizer)
    batch = first_batch(cache, tokenizer)
    mask = batch["labels"] != -100
    with torch.no_grad():
        t_logits, _ = forward_on_targets(teacher.eval(), batch)
        s_logits, _ = forward_on_targets(student.eval(), batch)
    online = kd_loss(s_logits, t_logits, mask, temperature=2.0)
    cached = sparse_kd_loss(s_logits, batch["teacher_topk_logprobs"], batch["teacher_topk_ids"], mask,
                            temperature=2.0)
    assert torch.allclose(online, cached, atol=1e-4), (online, cached)


def test_distill_from_cache_trains_without_the_teacher(trained):
    runner, _ = with_stage(trained, cache_stage("cache_kd", top_k=16),
                           {**distill_stage("from_cache", max_steps=4), "teacher": None, "cached_teacher": "cache_kd"})
    runner.run(only="cache_kd")
    runner.run(only="from_cache")
    logs = [json.loads(l) for l in (runner.run_dir / "from_cache" / "metrics.jsonl").read_text().splitlines()]
    assert "logits_kd" in logs[0] and all(np.isfinite(r["loss"]) for r in logs if "loss" in r)


def test_cache_with_another_tokenizer_is_refused(trained):
    recipe, root = trained
    runner, _ = with_stage(trained, cache_stage("cache_other", top_k=4))
    runner.run(only="cache_other")
    manifest = runner.run_dir / "cache_other" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["tokenizer"] = "0" * 16
    manifest.write_text(json.dumps(data))
    # as if the cache had been made for another tokenizer (its stage.json's checksums agree with its files)
    from nlgkd.fingerprints import file_checksums

    record_file = runner.run_dir / "cache_other" / "stage.json"
    record = json.loads(record_file.read_text())
    record["files"] = file_checksums(runner.run_dir / "cache_other")
    record_file.write_text(json.dumps(record))
    runner, _ = with_stage(trained, cache_stage("cache_other", top_k=4),
                           {**distill_stage("bad_cache"), "teacher": None, "cached_teacher": "cache_other"})
    with pytest.raises(StageError, match=r"cached_teacher: the cache was made with another tokenizer"):
        runner.run(only="bad_cache")


def test_distill_chooses_from_a_cache_as_its_gold_and_pt_schedule_say():
    from types import SimpleNamespace

    from nlgkd.stages.distill_data import cached_training_data

    rows = [{"kind": "gold", "input": f"train/{i}", "cache_index": i} for i in range(2)]
    rows += [{"kind": "pt", "input": f"pts/train/{i}", "cache_index": 2 + 2 * i + k, "k": k} for i in range(2)
             for k in range(2)]  # 2 inputs x K = 2 PTs
    cache = SimpleNamespace(training_examples=lambda: rows)
    config = lambda **fields: SimpleNamespace(**{"gold": True, "pt_schedule": "cycle", **fields})
    def pick(epoch, **fields):
        return [r["cache_index"] for r in cached_training_data(cache, config(**fields), print)(epoch)]

    assert pick(0) == [0, 1, 2, 4] and pick(1) == [0, 1, 3, 5]  # gold + PT number (epoch mod K) of each input
    assert pick(0, gold=False) == [2, 4]
    assert pick(0, gold=False, pt_schedule="all") == [2, 3, 4, 5]
    only_pts = SimpleNamespace(training_examples=lambda: rows[2:])
    with pytest.raises(ValueError, match=r"gold: true, but the cached teacher holds no gold targets .* set gold: "
                                         r"false"):
        cached_training_data(only_pts, config(), print)
