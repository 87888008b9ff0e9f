"""`distill`: train a student against one or more teachers (study stage S3, plus the classic KD methods).

This module loads the models, checks that they fit together and runs the loop. The loss, a weighted sum of
word-level, hidden-state and attention terms each logged on its own, is `distill_loss.py`; the data (gold
targets, pseudo-targets, a top-k cache, and with `denoising:` the denoising pairs of general distillation,
`nlgkd/denoising.py`) is `distill_data.py`. LSTM students (`nlgkd/lstm.py`) take the
word-level terms; hidden and attention terms refuse them in `check_distill_setup`. Joint-Teaching's student
sampling is `nlgkd/joint_teaching.py`.
"""
from __future__ import annotations

from dataclasses import asdict

import torch
from torch import nn

from ..alignment import cross_tokenizer_targets, soft_targets_folder
from ..fingerprints import data_fingerprint
from ..generation import gather_objects
from ..joint_teaching import make_joint_teaching
from ..loop import train
from ..lstm import is_lstm
from ..models import check_same_vocabulary, is_causal, save_model
from .distill_data import cached_training_data, training_data, with_denoising
from .distill_loss import (HIDDEN_PROJECTED, StudentWithProjections, layer_pairs, make_loss, make_loss_by_task,
                           num_layers, width)
from .training import (check_teacher_lead, encode_splits, make_collator, make_validator, record_convergence,
                       record_teacher_check, teacher_args)


def teacher_names(cfg) -> list[str]:
    """Every teacher the stage loads (each once, also when several tasks share it)."""
    if cfg.teachers_by_task:
        return list(dict.fromkeys(name for names in cfg.teachers_by_task.values() for name in names))
    if cfg.teacher is None:
        return []
    return [cfg.teacher] if isinstance(cfg.teacher, str) else list(cfg.teacher)


def task_teacher_indices(cfg, tasks: list[str], names: list[str]) -> list[list[int]]:
    """For each task (in `data.tasks` order), the indices into `names` of its teachers; [] = none."""
    return [[names.index(n) for n in cfg.teachers_by_task.get(task, [])] for task in tasks]


def check_teachers_by_task(cfg, tasks: list[str]) -> None:
    if not tasks:
        raise ValueError("teachers_by_task needs multi-task data: list the datasets under data.tasks")
    unknown = [t for t in cfg.teachers_by_task if t not in tasks]
    if unknown:
        raise ValueError(f"teachers_by_task: {unknown} are not tasks of data.tasks ({tasks})")
    if cfg.teacher is not None or cfg.cached_teacher is not None:
        raise ValueError("give teachers_by_task or teacher:/cached_teacher:, not both")
    if cfg.objective == "finetune" or cfg.hidden or cfg.attention or cfg.joint_teaching:
        raise ValueError("teachers_by_task supports the word-level objectives (logits_kd, noisy_kd, "
                         "logits_mse) only; hidden:, attention: and joint_teaching: need one teacher: for all")


def resolve_teacher_dtype(choice: str, device: torch.device) -> torch.dtype:
    if choice == "bf16" or (choice == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float32


# where transformers models keep dropout rates: nn.Dropout modules (T5, GPT-2, the LSTM) or float attributes
# that their forward passes to nn.functional.dropout (BART and its relatives)
DROPOUT_RATE_ATTRIBUTES = ("dropout", "activation_dropout", "attention_dropout")


def set_teacher_noise(teacher: torch.nn.Module, rate: float | None, where: str) -> None:
    """Noisy KD's noise: every dropout rate of the teacher becomes `rate` (None keeps the trained rates).

    A teacher whose rates are all 0 would teach exactly as in logits_kd: an error, not a silent no-op."""
    rates = []
    for module in teacher.modules():
        if isinstance(module, torch.nn.Dropout):
            if rate is not None:
                module.p = rate
            rates.append(module.p)
            continue
        for attribute in DROPOUT_RATE_ATTRIBUTES:
            value = getattr(module, attribute, None)
            if isinstance(value, float):
                if rate is not None:
                    setattr(module, attribute, rate)
                rates.append(rate if rate is not None else value)
    if not any(r > 0 for r in rates):
        raise ValueError(f"{where} has no dropout (every rate is 0), so objective noisy_kd would equal logits_kd; "
                         f"set noise_dropout: 0.1 (or another rate) on this stage")


def check_distill_setup(cfg, student, teachers, tokenizer, teacher_tokenizers, names) -> None:
    """Fail before training on combinations that cannot work, naming the recipe field."""
    recurrent = [(role, name) for role, name, model in [("student", cfg.student, student),
                                                        *(("teacher", n, t) for n, t in zip(names, teachers))]
                 if is_lstm(model)]
    for field_name, spec, needs in (("hidden", cfg.hidden, "per-layer hidden states"),
                                    ("attention", cfg.attention, "attention maps / Q-K-V projections")):
        if spec is not None and recurrent:
            role, name = recurrent[0]
            raise ValueError(
                f"{field_name}.loss {spec.loss!r} ({field_name} KD) needs the {needs} of a transformer, but {role} "
                f"{name!r} is an LSTM encoder-decoder (model_type nlgkd_lstm); remove {field_name}: and distill it "
                "with objective: logits_kd, logits_mse or noisy_kd (with pseudo_targets if you like)")
    if cfg.denoising is not None:
        if cfg.cached_teacher is not None or cfg.teachers_by_task:
            raise ValueError("denoising: the soft targets are the teacher's own denoising predictions on pairs "
                             "made on the fly; give teacher: (not cached_teacher: or teachers_by_task:)")
        if is_causal(student):
            raise ValueError(f"denoising: builds encoder-decoder pairs, but student {cfg.student!r} is decoder-only")
    if cfg.cross_tokenizer:
        check_cross_tokenizer(cfg, teachers)
    if cfg.cached_teacher is not None:
        if teachers:
            raise ValueError("give teacher: or cached_teacher:, not both")
        if cfg.objective != "logits_kd" or cfg.hidden or cfg.attention or cfg.joint_teaching:
            raise ValueError("cached_teacher supports objective: logits_kd only (no hidden, attention or "
                             "joint_teaching: those need the teacher itself)")
        if cfg.divergence != "forward_kl":
            raise ValueError("cached_teacher: only divergence: forward_kl can be computed from a top-k cache")
        if cfg.pseudo_targets:
            raise ValueError("with cached_teacher the training examples come from the cache; list the "
                             "pseudo_targets in the cache_logits stage instead")
        return
    if cfg.objective != "finetune" or cfg.hidden or cfg.attention:
        if not teachers:
            raise ValueError(f"objective {cfg.objective!r} needs a teacher: set teacher: (a model or a list)")
    word_level = cfg.objective != "finetune"
    for teacher, t_tok, name in zip(teachers, teacher_tokenizers, names):
        if word_level and not cfg.cross_tokenizer:
            try:
                check_same_vocabulary(t_tok, tokenizer, name, cfg.student)
            except ValueError as err:
                raise ValueError(f"{err}; or set cross_tokenizer: true on this distill stage (logits_kd through "
                                 "the teacher's top-k aligned to the student's tokens)") from None
        if is_causal(teacher) != is_causal(student):
            raise ValueError(
                f"teacher {name!r} is {'decoder-only' if is_causal(teacher) else 'encoder-decoder'} but student "
                f"{cfg.student!r} is not; distill pairs of the same kind, or train the student on the teacher's "
                "pseudo-targets"
            )
    if cfg.hidden and cfg.hidden.loss not in HIDDEN_PROJECTED and teachers:
        if width(student) != width(teachers[0]):
            raise ValueError(
                f"hidden.loss {cfg.hidden.loss!r} compares hidden states of equal width, but the student has "
                f"{width(student)} and the teacher {width(teachers[0])}; use hidden.loss: tinybert (learned projection)"
            )
    if cfg.attention and cfg.attention.loss == "minilm" and is_causal(student) and "cross" in cfg.attention.sides:
        raise ValueError("attention.sides: decoder-only models have no cross-attention; use decoder_self")
    if cfg.pt_schedule == "all_together" and is_causal(student):
        raise ValueError(f"pt_schedule: all_together encodes each source once, but student {cfg.student!r} is "
                         "decoder-only (no encoder); use pt_schedule: all")


def check_cross_tokenizer(cfg, teachers) -> None:
    """cross_tokenizer: only what the teacher's top-k, aligned to the student's tokens, can give."""
    if cfg.cached_teacher is not None or cfg.teachers_by_task or cfg.denoising is not None:
        raise ValueError("cross_tokenizer: needs one local teacher: (not cached_teacher:, teachers_by_task: or "
                         "denoising:)")
    if len(teachers) != 1:
        raise ValueError(f"cross_tokenizer: needs exactly one teacher:, got {len(teachers)}; ensembles of "
                         "teachers with other tokenizers are not supported")
    if cfg.objective not in ("logits_kd", "noisy_kd"):
        raise ValueError(f"cross_tokenizer: objective {cfg.objective!r} needs the teacher's logits over the student's "
                         "vocabulary; use objective: logits_kd or noisy_kd (KD from the aligned top-k)")
    if cfg.divergence != "forward_kl":
        raise ValueError(f"cross_tokenizer: divergence {cfg.divergence!r} cannot be computed from an aligned top-k; "
                         "use divergence: forward_kl")
    for field_name, spec in (("hidden", cfg.hidden), ("attention", cfg.attention)):
        if spec is not None:
            raise ValueError(f"cross_tokenizer: {field_name}.loss {spec.loss!r} compares teacher and student position "
                             f"by position, which needs the same tokenizer; remove {field_name}: or give the student "
                             "tokenizer_from: the teacher")
    if cfg.joint_teaching is not None:
        raise ValueError("cross_tokenizer: joint_teaching is not supported (the teacher would have to re-read the "
                         "student's samples as text); remove joint_teaching:")
    if cfg.cross_tokenizer_top_k < 1:
        raise ValueError(f"cross_tokenizer_top_k must be >= 1, got {cfg.cross_tokenizer_top_k}")


def make_cross_tokenizer_kd(cfg, teacher, teacher_tokenizer, tokenizer, data_cfg):
    """batch -> its teacher_topk_ids / teacher_topk_logprobs: the teacher reads each example's source and
    target text under its own tokenizer, and its top-k is aligned to the student's target tokens
    (`alignment.cross_tokenizer_targets`); the loss is then `sparse_kd_loss`, as from a cache."""

    def soft_targets(batch: dict) -> dict:
        ids, logprobs = cross_tokenizer_targets(
            teacher, teacher_tokenizer, tokenizer, batch["source_text"], batch["target_text"], batch["labels"],
            cfg.cross_tokenizer_top_k, data_cfg.max_source_length, data_cfg.max_target_length)
        return {"teacher_topk_ids": ids, "teacher_topk_logprobs": logprobs}

    return soft_targets


def with_texts(collate_fn):
    """cross_tokenizer: batches also carry each example's source and target text, for the teacher."""

    def collate_with_texts(examples: list[dict]) -> dict:
        if any("source" not in ex or "target" not in ex for ex in examples):
            raise ValueError("cross_tokenizer: a training example has no source/target text for the teacher to "
                             "re-tokenize; use gold targets or pseudo_targets stages")
        batch = collate_fn(examples)
        batch["source_text"] = [ex["source"] for ex in examples]
        batch["target_text"] = [ex["target"] for ex in examples]
        return batch

    return collate_with_texts


def run(ctx) -> None:
    cfg = teacher_args(ctx, ctx.config)
    acc = ctx.accelerator
    student, tokenizer = ctx.load_model(cfg.student)
    if cfg.teachers_by_task:
        check_teachers_by_task(cfg, list(ctx.recipe.data.tasks))
    names = teacher_names(cfg)
    loaded = [ctx.load_model(name) for name in names]
    teachers = [m for m, _ in loaded]
    check_distill_setup(cfg, student, teachers, tokenizer, [t for _, t in loaded], names)
    prepare_teachers(cfg, student, teachers, names, acc.device)
    seed = cfg.seed if cfg.seed is not None else ctx.seed  # a seed variant also samples other prefixes
    module = with_projections(cfg, student, teachers, seed)

    encoded = encode_splits(ctx, tokenizer)
    if len(teachers) == 1 and not cfg.cross_tokenizer:  # an ensemble or another tokenizer's teacher decodes otherwise
        check_teacher_lead(ctx, cfg, teachers[0], names[0], tokenizer, encoded)
    data_for_epoch, collate_fn, compute_loss = data_and_loss(ctx, cfg, student, tokenizer, loaded, names, encoded)
    prepare, student_steps = None, []
    if cfg.joint_teaching is not None:
        prepare, student_steps = make_joint_teaching(cfg, tokenizer, seed, acc, is_causal(student))
    result = train(model=module, train_data=data_for_epoch, prepare_window=prepare, collate_fn=collate_fn,
                   compute_loss=compute_loss, evaluate=make_validator(student, tokenizer, encoded, ctx, cfg), args=cfg,
                   accelerator=acc, out_dir=ctx.out_dir, seed=seed, log=ctx.log)
    ctx.info["train"] = asdict(result)
    record_convergence(ctx, result, cfg)
    ctx.info["teachers"] = names
    record_teacher_check(ctx, student, tokenizer, encoded, result.best, cfg)  # when it teaches later stages
    if cfg.joint_teaching is not None:
        per_process = list(gather_objects(acc, student_steps))
        ctx.info["joint_teaching"] = {
            "mix": cfg.joint_teaching.mix,
            "student_steps": len(student_steps),
            "share": len(student_steps) / max(1, result.steps - (result.resumed_from or 0)),
            "processes_agree": all(steps == per_process[0] for steps in per_process),
            "student_step_list": student_steps,
        }
    if acc.is_main_process:
        save_model(acc.unwrap_model(module).student, tokenizer, ctx.out_dir)


def prepare_teachers(cfg, student, teachers: list, names: list[str], device: torch.device) -> None:
    """The teachers on the device in teacher_dtype, frozen; in train mode with noise_dropout for noisy KD (Sun
    et al.'s "noisy teacher" keeps its dropout on); eager attention where TinyBERT reads the probabilities."""
    dtype = resolve_teacher_dtype(cfg.teacher_dtype, device)
    for name, teacher in zip(names, teachers):
        teacher.to(device, dtype=dtype)
        teacher.requires_grad_(False)
        teacher.train(cfg.objective == "noisy_kd")
        if cfg.objective == "noisy_kd":
            set_teacher_noise(teacher, cfg.noise_dropout, f"teacher {name!r}")
    if cfg.attention and cfg.attention.loss == "tinybert":
        for model in [student, *teachers]:
            model.set_attn_implementation("eager")  # attention probabilities are only returned by eager


def with_projections(cfg, student, teachers: list, seed: int) -> StudentWithProjections:
    """The trained module: the student, plus TinyBERT's learned width projections for each mapped layer,
    initialized from the stage's seed (not from wherever loading the models left the global generator, which
    differs between runs and between processes)."""
    projections = {}
    if cfg.hidden and cfg.hidden.loss in HIDDEN_PROJECTED:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for side in cfg.hidden.sides:
                for s_layer, t_layer in layer_pairs(cfg.hidden.layer_map, num_layers(student, side),
                                                    num_layers(teachers[0], side)):
                    projections[f"{side}_{s_layer}"] = nn.Linear(width(student), width(teachers[0]))
    return StudentWithProjections(student, projections)


def data_and_loss(ctx, cfg, student, tokenizer, loaded: list, names: list[str], encoded: dict):
    """(epoch -> examples, collate_fn, compute_loss): from a top-k cache, denoising pairs, or the gold targets
    and pseudo-targets; the loss of one teacher, an ensemble, per-task teachers or another tokenizer's teacher."""
    tasks = list(ctx.recipe.data.tasks)
    teachers = [m for m, _ in loaded]
    causal = is_causal(student)
    collate_fn = make_collator(student, tokenizer, tasks=tuple(tasks) if cfg.teachers_by_task else ())
    if cfg.cached_teacher is not None:
        from ..logit_cache import LogitCache

        cache = LogitCache(soft_targets_folder(ctx.artifact_dir(cfg.cached_teacher)))
        cache.check(tokenizer, data_fingerprint(ctx.recipe.data, ctx.recipe.seed), "cached_teacher")
        data_for_epoch = cached_training_data(cache, cfg, ctx.log)
        collate_fn = lambda examples: cache.collate(  # noqa: E731
            examples, pad_id=tokenizer.pad_token_id, causal=causal, sep_id=tokenizer.eos_token_id)
    elif cfg.denoising is not None:
        # the corruption the teacher was pretrained with (no teacher: objective finetune, the student's own)
        data_for_epoch = with_denoising(ctx, cfg, tokenizer, encoded, (teachers or [student])[0].config.model_type)
    else:
        data_for_epoch = training_data(ctx, cfg, tokenizer, encoded)
    if cfg.teachers_by_task:
        compute_loss = make_loss_by_task(cfg, teachers, task_teacher_indices(cfg, tasks, names), len(tokenizer))
    elif cfg.cross_tokenizer:
        # the teacher never sees the student's ids: it re-tokenizes each example's text (make_cross_tokenizer_kd)
        compute_loss = make_loss(cfg, [], causal, make_cross_tokenizer_kd(cfg, teachers[0], loaded[0][1], tokenizer,
                                                                          ctx.recipe.data))
        collate_fn = with_texts(collate_fn)
    else:
        compute_loss = make_loss(cfg, teachers, causal, vocab_width=len(tokenizer))
    return data_for_epoch, collate_fn, compute_loss
