"""Joint-Teaching: a deterministic schedule, r = 0 equal to plain logits KD, student prefixes masked after
EOS, and every process deciding the same steps."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from nlgkd.models import load_pretrained
from nlgkd.config import DecodingConfig, JointTeachingConfig, RecipeError
from nlgkd.joint_teaching import EndedShare, is_student_step, make_joint_teaching, mask_after_eos

from conftest import distill_stage, with_stage


def test_schedule_is_deterministic_and_keeps_its_ratio():
    alternate = JointTeachingConfig(student_ratio=0.5, schedule="alternate")
    assert [is_student_step(alternate, 0, s) for s in range(6)] == [False, True, False, True, False, True]
    third = JointTeachingConfig(student_ratio=1 / 3, schedule="alternate")
    assert sum(is_student_step(third, 0, s) for s in range(300)) == 100
    rnd = JointTeachingConfig(student_ratio=0.3, schedule="random")
    first = [is_student_step(rnd, 7, s) for s in range(2000)]
    assert first == [is_student_step(rnd, 7, s) for s in range(2000)]
    assert abs(sum(first) / 2000 - 0.3) < 0.04
    assert first != [is_student_step(rnd, 8, s) for s in range(2000)]
    assert not any(is_student_step(JointTeachingConfig(student_ratio=0.0), 0, s) for s in range(50))
    assert all(is_student_step(JointTeachingConfig(student_ratio=1.0), 0, s) for s in range(50))


def samples_as_transformers_draws(student, tokenizer, batch, seed: int, n: int = 1, max_new_tokens: int = 6):
    """[B * n, T] tokens sampled by transformers with the block's settings written out by hand: the whole
    vocabulary (top_k 0, top_p 1), no forced EOS and nothing else from the checkpoint's generation_config."""
    from transformers import GenerationConfig

    reference = GenerationConfig(do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=max_new_tokens,
                                 num_return_sequences=n, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id,
                                 decoder_start_token_id=student.generation_config.decoder_start_token_id)
    own, student.generation_config = student.generation_config, reference
    torch.manual_seed(seed)
    try:
        return student.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                generation_config=reference)[:, 1:]
    finally:
        student.generation_config = own


def test_tokens_after_eos_never_count():
    tokens = torch.tensor([[5, 6, 2, 7, 2, 8], [5, 2, 0, 0, 0, 0], [5, 6, 7, 8, 9, 10]])
    labels = mask_after_eos(tokens, eos_id=2)
    assert labels.tolist() == [[5, 6, 2, -100, -100, -100], [5, 2, -100, -100, -100, -100], [5, 6, 7, 8, 9, 10]]


def test_student_steps_train_on_student_samples_only(trained):
    recipe, root = trained
    student, tokenizer = load_pretrained(str(root / "tiny" / "student"))
    cfg = SimpleNamespace(joint_teaching=JointTeachingConfig(
        student_ratio=1.0, decoding=DecodingConfig(strategy="sample", max_new_tokens=6)))
    accelerator = SimpleNamespace(unwrap_model=lambda m: m, process_index=0)
    prepare, steps = make_joint_teaching(cfg, tokenizer, seed=0, acc=accelerator, causal=False)
    gold = torch.tensor([[11, 12, 13, 2, -100, -100, -100, -100, -100]])
    batch = {"input_ids": torch.tensor([[10, 11, 12, 2]]), "attention_mask": torch.ones(1, 4, dtype=torch.long),
             "labels": gold}
    window, logs = prepare(SimpleNamespace(student=student), [batch], step=0)
    labels = window[0]["labels"]
    assert steps == [0] and logs["student_step"] == 1.0 and window[0]["student_prefix"]
    assert labels.shape[1] <= 6 and not torch.equal(labels[:, :4], gold[:, :4])
    # the counted tokens are exactly the sampled ones up to and including the first EOS
    again = samples_as_transformers_draws(student, tokenizer, batch, seed=0 * 7919 + 0)
    assert torch.equal(labels, mask_after_eos(again, tokenizer.eos_token_id))


def test_one_draw_serves_steps_per_draw_student_steps(trained):
    recipe, root = trained
    student, tokenizer = load_pretrained(str(root / "tiny" / "student"))
    cfg = SimpleNamespace(joint_teaching=JointTeachingConfig(
        student_ratio=1.0, steps_per_draw=2, decoding=DecodingConfig(strategy="sample", max_new_tokens=6)))
    accelerator = SimpleNamespace(unwrap_model=lambda m: m, process_index=0)
    prepare, steps = make_joint_teaching(cfg, tokenizer, seed=0, acc=accelerator, causal=False)
    model = SimpleNamespace(student=student)

    def batch_of(ids):
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.ones(len(ids), len(ids[0]), dtype=torch.long),
                "labels": torch.tensor([[11, 12, 2]] * len(ids))}

    first, second = batch_of([[10, 11, 12, 2], [13, 14, 15, 2]]), batch_of([[16, 17, 18, 2], [19, 20, 21, 2]])
    served = [prepare(model, [b], step=s)[0][0] for s, b in enumerate([first, first, second])]
    assert steps == [0, 1, 2]
    # steps 0 and 1: the two samples of each input of step 0's batch, from one generate call
    drawn = samples_as_transformers_draws(student, tokenizer, first, seed=0 * 7919 + 0, n=2)
    drawn = mask_after_eos(drawn, tokenizer.eos_token_id)
    for j in (0, 1):
        assert torch.equal(served[j]["input_ids"], first["input_ids"])
        width = served[j]["labels"].shape[1]
        assert torch.equal(served[j]["labels"], drawn[j::2, :width])
        assert (drawn[j::2, width:] == -100).all()  # only all-ignored columns are cut
    # step 2: a new draw, from its own batch
    assert torch.equal(served[2]["input_ids"], second["input_ids"])


def test_sampling_ends_for_all_once_the_share_has_ended():
    stop = EndedShare(share=0.5, eos_id=2)
    start = 2  # the decoder start token is EOS here (mBART): position 0 does not count
    one_of_four = torch.tensor([[start, 5, 2], [start, 5, 6], [start, 7, 8], [start, 9, 9]])
    assert stop(one_of_four, None).tolist() == [True, False, False, False]
    two_of_four = torch.tensor([[start, 5, 2], [start, 2, 0], [start, 7, 8], [start, 9, 9]])
    assert stop(two_of_four, None).tolist() == [True, True, True, True]


def test_a_cut_sample_trains_as_a_prefix_without_eos(trained):
    recipe, root = trained
    student, tokenizer = load_pretrained(str(root / "tiny" / "student"))
    accelerator = SimpleNamespace(unwrap_model=lambda m: m, process_index=0)
    batch = {"input_ids": torch.tensor([[10, 11, 12, 2]] * 8), "attention_mask": torch.ones(8, 4, dtype=torch.long),
             "labels": torch.tensor([[11, 12, 2]] * 8)}
    served = {}
    for share in (1.0, 0.125):
        cfg = SimpleNamespace(joint_teaching=JointTeachingConfig(
            student_ratio=1.0, stop_share=share, decoding=DecodingConfig(strategy="sample", max_new_tokens=12)))
        prepare, _ = make_joint_teaching(cfg, tokenizer, seed=0, acc=accelerator, causal=False)
        served[share] = prepare(SimpleNamespace(student=student), [batch], step=0)[0][0]["labels"]
    full, cut = served[1.0], served[0.125]
    # 1 of the 8 samples ending is enough: all stop at the step the first one wrote EOS
    first_eos = min(int((row == tokenizer.eos_token_id).nonzero()[0]) for row in full
                    if (row == tokenizer.eos_token_id).any())  # a sample cut at max_new_tokens has no EOS
    width = cut.shape[1]
    assert width == first_eos + 1 < full.shape[1]
    # the same seed draws the same tokens: each cut sample is the start of the full one
    assert torch.equal(cut[cut != -100], full[:, :width][cut != -100])
    ended = (cut == tokenizer.eos_token_id).any(1)
    assert ended.float().mean() >= 0.125
    # a sample cut before its EOS keeps every token it wrote, and no EOS
    assert ((cut[~ended] != -100).all(1)).all()


def losses(folder):
    return [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def test_ratio_zero_equals_plain_logits_kd(trained):
    runner, _ = with_stage(
        trained,
        distill_stage("plain", objective="logits_kd", max_steps=4),
        distill_stage("jt0", objective="logits_kd", max_steps=4, joint_teaching={"student_ratio": 0.0}),
    )
    runner.run(only="plain")
    runner.run(only="jt0")
    assert losses(runner.run_dir / "plain") == losses(runner.run_dir / "jt0")


def test_joint_teaching_logs_both_prefix_kinds(trained):
    """Step by step (log_every 1): a student step trains on the student's prefix with KD alone (no gold
    cross-entropy), a teacher step on the gold prefix with both; the list in stage.json is the steps that did."""
    runner, _ = with_stage(trained, distill_stage("jt", objective="logits_kd", max_steps=4, log_every=1,
                                                  joint_teaching={"student_ratio": 0.5}))
    runner.run(only="jt")
    rows = [json.loads(line) for line in (runner.run_dir / "jt" / "metrics.jsonl").read_text().splitlines()]
    rows = [row for row in rows if "loss" in row]  # the training steps, not the evaluation
    info = json.loads((runner.run_dir / "jt" / "stage.json").read_text())["joint_teaching"]
    assert info["student_step_list"] == [1, 3] and len(rows) == 4
    for row in rows:
        on_student_prefix = row["step"] - 1 in info["student_step_list"]  # the list holds 0-based steps
        assert row["student_step"] == float(on_student_prefix)
        if on_student_prefix:
            assert "ce" not in row and row["loss"] == pytest.approx(row["kd_student_prefix"])
            assert row["student_pt_len"] > 0 and "teacher_nll_student_pt" in row
        else:
            assert {"ce", "kd_teacher_prefix"} <= set(row) and "kd_student_prefix" not in row


def test_two_processes_agree_on_student_steps(two_processes):
    two = two_processes  # jt2: logits KD, student_ratio 0.4, random schedule, 6 steps, on 2 processes
    info = json.loads((two / "jt2" / "stage.json").read_text())
    assert info["world_size"] == 2 and info["joint_teaching"]["processes_agree"]
    jt = JointTeachingConfig(student_ratio=0.4, schedule="random")
    assert info["joint_teaching"]["student_step_list"] == [s for s in range(6) if is_student_step(jt, 0, s)]


def test_steps_per_draw_needs_sampling():
    with pytest.raises(RecipeError, match="joint_teaching.steps_per_draw.*strategy: sample"):
        JointTeachingConfig(steps_per_draw=2, decoding=DecodingConfig(strategy="greedy"))
    assert JointTeachingConfig(steps_per_draw=2).steps_per_draw == 2  # the default decoding samples


# ------------------------------------------------------------------------- rollouts from an engine copy
def test_engine_rollouts_refreshed_every_step_train_as_the_student_itself(trained):
    pytest.importorskip("ctranslate2")
    # greedy prefixes, so both paths write the same ones: a float32 copy made at every student step is the student
    greedy = {"strategy": "greedy", "max_new_tokens": 12, "no_repeat_ngram_size": 1}
    common = {"objective": "logits_kd", "max_steps": 6, "log_every": 1}
    runner, _ = with_stage(
        trained,
        distill_stage("jt_exact", **common, joint_teaching={"student_ratio": 0.5, "decoding": greedy}),
        distill_stage("jt_engine", **common, joint_teaching={"student_ratio": 0.5, "decoding": greedy,
                                                             "engine": "ctranslate2", "engine_refresh_every": 1}))
    runner.run(only="jt_exact")
    runner.run(only="jt_engine")
    exact, engine = (step_rows(runner.run_dir / name) for name in ("jt_exact", "jt_engine"))
    assert [r["student_step"] for r in engine] == [r["student_step"] for r in exact] == [0, 1] * 3
    for a, b in zip(exact, engine):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b.get("student_pt_len") == a.get("student_pt_len")
    assert [r["student_copy_age"] for r in engine if r["student_step"]] == [0.0] * 3


def test_an_engine_copy_is_remade_once_it_is_refresh_every_steps_old(trained):
    pytest.importorskip("ctranslate2")
    runner, _ = with_stage(trained, distill_stage(
        "jt_stale", objective="logits_kd", max_steps=8, log_every=1,
        joint_teaching={"student_ratio": 1.0, "engine": "ctranslate2", "engine_refresh_every": 3,
                        "engine_quantization": "int8", "decoding": {"strategy": "sample", "max_new_tokens": 8}}))
    runner.run(only="jt_stale")
    ages = [r["student_copy_age"] for r in step_rows(runner.run_dir / "jt_stale")]
    assert ages == [0.0, 1.0, 2.0, 0.0, 1.0, 2.0, 0.0, 1.0]  # copies made at steps 0, 3 and 6


def test_the_engine_refuses_what_it_cannot_sample_when_the_recipe_is_read():
    with pytest.raises(RecipeError, match=r"joint_teaching.engine: ctranslate2: stop_share: below 1"):
        JointTeachingConfig(engine="ctranslate2", stop_share=0.9)
    with pytest.raises(RecipeError, match=r"joint_teaching.engine: ctranslate2: decoding.strategy: 'diverse_beam'"):
        JointTeachingConfig(engine="ctranslate2", decoding=DecodingConfig(strategy="diverse_beam"))
    assert JointTeachingConfig(engine="ctranslate2", steps_per_draw=2).engine == "ctranslate2"


def step_rows(folder) -> list[dict]:
    """metrics.jsonl's training steps (not the evaluations), in order."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "loss" in row]


# ------------------------------------------------------------------------- mix: rows
def test_rows_mix_is_both_kinds_of_step_summed_with_each_source_encoded_once(trained):
    """`mix: rows`: the loss and the student's gradients on a micro-batch of the data's rows plus the student's
    prefixes of the same sources equal the sum of a teacher step on the first and a student step on the second
    (each over the same token count), re-encoding each; the student's encoder reads each source once."""
    from nlgkd.config import DistillConfig
    from nlgkd.data import collate, encode, load_splits
    from nlgkd.joint_teaching import side_by_side
    from nlgkd.recipe import parse_recipe
    from nlgkd.stages.distill_loss import StudentWithProjections, make_loss

    recipe, root = trained
    student, tokenizer = load_pretrained(str(root / "tiny" / "student"))
    teacher, _ = load_pretrained(str(root / "tiny" / "teacher"))
    splits, _ = load_splits(parse_recipe(recipe).data)
    examples = list(encode(splits["validation"], tokenizer, 48, 48)[0])
    own = collate(examples[:5], pad_id=tokenizer.pad_token_id, causal=False)
    # the student's prefixes stand in as other examples' targets, one shorter and one longer than the own rows
    drawn = {**own, "labels": collate(examples[5:10], pad_id=tokenizer.pad_token_id, causal=False)["labels"],
             "student_prefix": True}
    kind_tokens = (int((own["labels"] != -100).sum()), int((drawn["labels"] != -100).sum()))
    both = {**side_by_side(own, drawn), "kind_tokens": kind_tokens}
    assert both["labels"].shape[0] == 10 and both["student_rows_from"] == 5
    normalizer = float((both["labels"] != -100).sum())
    cfg = DistillConfig(student="student", teacher="teacher", objective="logits_kd", temperature=2.0, alpha=0.3,
                        joint_teaching=JointTeachingConfig(mix="rows"))
    compute_loss = make_loss(cfg, [teacher.eval()], causal=False)
    model = StudentWithProjections(student.eval(), {})

    def loss_and_grads(batches):
        student.zero_grad()
        total = sum(compute_loss(model, b, normalizer)[0] for b in batches)
        total.backward()
        return total.detach(), [p.grad.clone() for p in student.parameters() if p.grad is not None]

    rows_read = []
    hook = student.get_encoder().register_forward_hook(
        lambda module, args, kwargs, out: rows_read.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    together, together_grads = loss_and_grads([both])
    hook.remove()
    apart, apart_grads = loss_and_grads([own, drawn])
    assert rows_read == [5]
    assert together.item() == pytest.approx(apart.item(), rel=1e-5)
    for a, b in zip(together_grads, apart_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # the logs are each kind's per-token means, as a step of that kind alone logs them
    _, logs = compute_loss(model, both, normalizer)
    _, own_logs = compute_loss(model, own, kind_tokens[0])
    _, drawn_logs = compute_loss(model, drawn, kind_tokens[1])
    for key, alone in (("ce", own_logs), ("kd_teacher_prefix", own_logs), ("agreement", own_logs),
                       ("kd_student_prefix", drawn_logs), ("teacher_nll_student_pt", drawn_logs)):
        assert logs[key] == pytest.approx(alone[key], rel=1e-5), key


def test_rows_mix_trains_every_step_on_both_kinds(trained):
    runner, _ = with_stage(trained, distill_stage(
        "jt_rows", objective="logits_kd", alpha=0.5, max_steps=3, batch_size=8,
        joint_teaching={"mix": "rows", "decoding": {"strategy": "sample", "max_new_tokens": 8}}))
    runner.run(only="jt_rows")
    rows = step_rows(runner.run_dir / "jt_rows")
    info = json.loads((runner.run_dir / "jt_rows" / "stage.json").read_text())["joint_teaching"]
    assert info["student_step_list"] == [0, 1, 2] and len(rows) == 3
    assert info["mix"] == "rows"
    for row in rows:
        assert row["kd_student_prefix"] > 0 and row["kd_teacher_prefix"] > 0 and row["student_pt_len"] > 0
        assert 0 < row["student_token_share"] < 1 and row["teacher_nll_student_pt"] > 0
        # per-kind means, weighed by each kind's share of the step's tokens, make the loss
        share = row["student_token_share"]
        expected = (1 - share) * (0.5 * row["kd_teacher_prefix"] + 0.5 * row["ce"]) + share * row["kd_student_prefix"]
        assert row["loss"] == pytest.approx(expected, rel=1e-4)


def test_rows_mix_runs_with_encoder_side_hidden_kd_and_accumulation(trained):
    # PKD on both sides reads the encoder states each source's two rows share; two micro-batches per step
    runner, _ = with_stage(trained, distill_stage(
        "jt_rows_pkd", objective="logits_kd", max_steps=2, batch_size=8, grad_accum=2,
        hidden={"loss": "pkd", "sides": ["encoder", "decoder"], "layer_map": "last"},
        joint_teaching={"mix": "rows", "decoding": {"strategy": "sample", "max_new_tokens": 8}}))
    runner.run(only="jt_rows_pkd")
    rows = step_rows(runner.run_dir / "jt_rows_pkd")
    assert len(rows) == 2 and all(r["hidden"] > 0 and r["kd_student_prefix"] > 0 for r in rows)


def test_rows_mix_refuses_the_fields_only_steps_reads():
    with pytest.raises(RecipeError, match=r"joint_teaching.mix: rows .*student_ratio"):
        JointTeachingConfig(mix="rows", student_ratio=0.3)
    with pytest.raises(RecipeError, match=r"joint_teaching.mix: rows"):
        JointTeachingConfig(mix="rows", steps_per_draw=2)
    assert JointTeachingConfig(mix="rows", engine="ctranslate2").mix == "rows"


def test_encoding_each_source_once_refuses_minilm_on_the_encoder_when_the_recipe_is_read():
    # each source is encoded once, so MiniLM's encoder Q/K/V have one row per source, not per target
    from nlgkd.config import AttentionKD, DistillConfig

    def config(attention, **fields):
        return DistillConfig(student="student", teacher="teacher", objective="logits_kd", attention=attention,
                             **fields)

    on_encoder, decoder_side = AttentionKD(loss="minilm"), AttentionKD(loss="minilm", sides=["decoder_self", "cross"])
    rows = {"joint_teaching": JointTeachingConfig(mix="rows")}
    with pytest.raises(RecipeError, match=r"joint_teaching.mix: rows encodes each source once.*encoder_self.*"
                                          r"joint_teaching.mix: steps"):
        config(on_encoder, **rows)
    with pytest.raises(RecipeError, match=r"pt_schedule: all_together encodes each source once.*pt_schedule: all$"):
        config(on_encoder, pt_schedule="all_together")
    assert config(decoder_side, **rows).joint_teaching.mix == "rows"
    assert config(decoder_side, pt_schedule="all_together").pt_schedule == "all_together"
