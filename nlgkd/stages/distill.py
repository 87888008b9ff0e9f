"""`distill`: train a student against one or more teachers (study stage S3, plus the classic KD methods).

The loss is a weighted sum of terms, each logged on its own:
    word-level   finetune (gold cross-entropy only) | logits_kd | noisy_kd | logits_mse, mixed with gold
                 cross-entropy by `alpha`; a list of teachers is an ensemble (their distributions averaged)
    hidden       PKD / DistilBERT cosine / TinyBERT projected MSE on mapped layers (`hidden:`)
    attention    MiniLM-v2 Q/K/V relations or TinyBERT attention MSE (`attention:`), via forward hooks
Every term is normalized by the global count of target tokens (see `nlgkd/loop.py`).
The data: gold targets, pseudo-targets, and with `denoising:` the denoising pairs of general distillation
(`nlgkd/denoising.py`, TinyBERT/DistilBERT's first stage). LSTM students (`nlgkd/lstm.py`) take the
word-level terms; hidden and attention terms refuse them in `check_distill_setup`. Joint-Teaching's student
sampling is `nlgkd/joint_teaching.py`.
"""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import asdict

import torch
from torch import Tensor, nn

from ..fingerprints import data_fingerprint
from ..hooks import QKVCapture, attentions, hidden_states
from ..joint_teaching import make_joint_teaching
from ..generation import gather_objects
from ..loop import train
from ..feature_losses import (attention_score_mse, cosine_hidden_loss, layer_map, pkd_loss, relation_kd_loss,
                              tinybert_hidden_loss)
from ..losses import cross_entropy_loss, kd_loss, logits_mse_loss, sparse_kd_loss
from ..alignment import cross_tokenizer_targets, soft_targets_folder
from ..denoising import make_denoising_data
from ..lstm import is_lstm
from ..pseudo_target_data import encode_pseudo_targets
from ..models import at_target_positions, check_same_vocabulary, forward_on_targets, is_causal, save_model
from .training import (check_teacher_lead, encode_splits, make_collator, make_validator, mixed_by_task,
                       record_convergence, record_teacher_check, teacher_args)



# ------------------------------------------------------------------------- what each recipe word computes
# Word-level objectives (`objective:`). Each: student logits [B, T, V], the teachers' logits (a list; several
# form an ensemble), the mask [B, T] of counted tokens, the window's token count and the stage config ->
# an fp32 scalar, summed over counted tokens / normalizer.
def logits_kd(s_logits: Tensor, t_logits: list[Tensor], mask: Tensor, normalizer, cfg) -> Tensor:
    """Word-level KD (Hinton et al. 2015; Kim & Rush 2016): `divergence` (forward_kl, reverse_kl, jsd; see
    nlgkd/losses.py) between the tempered teacher distribution (an ensemble's mean) and the student's."""
    return kd_loss(s_logits, t_logits if len(t_logits) > 1 else t_logits[0], mask, temperature=cfg.temperature,
                   divergence=cfg.divergence, beta=cfg.jsd_beta, num_tokens=normalizer, chunk_size=cfg.kd_chunk_size)


def noisy_kd(s_logits: Tensor, t_logits: list[Tensor], mask: Tensor, normalizer, cfg) -> Tensor:
    """Noisy KD: logits_kd from a teacher that keeps its dropout on while it teaches (`noise_dropout`, set
    up by `set_teacher_noise` in `run`), so every step sees a differently perturbed teacher."""
    return logits_kd(s_logits, t_logits, mask, normalizer, cfg)


def logits_mse(s_logits: Tensor, t_logits: list[Tensor], mask: Tensor, normalizer, cfg) -> Tensor:
    """MSE between the student's and the teacher's raw logits (Ba & Caruana 2014; an ensemble's mean logits)."""
    target = t_logits[0] if len(t_logits) == 1 else torch.stack(t_logits).mean(0)
    return logits_mse_loss(s_logits, target, mask, num_tokens=normalizer)


OBJECTIVES = {
    "finetune": None,  # gold cross-entropy only: no teacher term
    "logits_kd": logits_kd,
    "noisy_kd": noisy_kd,
    "logits_mse": logits_mse,
}
# Hidden-state losses (`hidden.loss:`), on one pair of layers: student [B, L, Ds] (already projected to the
# teacher's width where the loss needs it: see HIDDEN_PROJECTED), teacher [B, L, Dt], mask [B, L] -> scalar.
HIDDEN_LOSSES = {"pkd": pkd_loss, "cosine": cosine_hidden_loss, "tinybert": tinybert_hidden_loss}
HIDDEN_PROJECTED = {"tinybert"}  # learn a Ds -> Dt projection with the student (different widths allowed)


class StudentWithProjections(nn.Module):
    """The trained module: the student plus TinyBERT's learned projections (student width -> teacher
    width), so both are optimized and synchronized together. Only `student` is saved as the artifact."""

    def __init__(self, student: nn.Module, projections: dict[str, nn.Module]):
        super().__init__()
        self.student = student
        self.projections = nn.ModuleDict(projections)

    def forward(self, batch: dict, **kwargs):
        return forward_on_targets(self.student, batch, **kwargs)


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


def layer_pairs(spec, num_student: int, num_teacher: int) -> list[tuple[int, int]]:
    if isinstance(spec, str):
        return layer_map(num_student, num_teacher, spec)
    return [(int(s), int(t)) for s, t in spec]


def num_layers(model, side: str) -> int:
    config = model.config
    if side == "encoder":
        return getattr(config, "encoder_layers", None) or getattr(config, "num_layers")
    if config.is_encoder_decoder:
        return getattr(config, "decoder_layers", None) or getattr(config, "num_decoder_layers")
    return config.num_hidden_layers


def width(model) -> int:
    config = model.config
    return getattr(config, "d_model", None) or getattr(config, "hidden_size", None) or config.n_embd


def side_hidden(outputs, side: str, layer: int, batch: dict, causal: bool) -> torch.Tensor:
    """Output of layer `layer` on `side` (index 0 of hidden_states is the embeddings)."""
    hidden = hidden_states(outputs, side)[layer + 1]
    return at_target_positions(hidden, batch) if causal and side == "decoder" else hidden


def side_mask(batch: dict, side: str, causal: bool) -> torch.Tensor:
    if side in ("encoder", "encoder_self"):
        return batch["attention_mask"].bool()
    if side == "decoder_self" and causal:
        return batch["attention_mask"].bool()
    return batch["labels"] != -100


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
    tasks = list(ctx.recipe.data.tasks)
    if cfg.teachers_by_task:
        check_teachers_by_task(cfg, tasks)
    names = teacher_names(cfg)
    loaded = [ctx.load_model(name) for name in names]
    teachers = [m for m, _ in loaded]
    check_distill_setup(cfg, student, teachers, tokenizer, [t for _, t in loaded], names)
    causal = is_causal(student)

    dtype = resolve_teacher_dtype(cfg.teacher_dtype, acc.device)
    for name, teacher in zip(names, teachers):
        teacher.to(acc.device, dtype=dtype)
        teacher.requires_grad_(False)
        # noisy KD (Sun et al.'s "noisy teacher"): the teacher keeps its dropout on
        teacher.train(cfg.objective == "noisy_kd")
        if cfg.objective == "noisy_kd":
            set_teacher_noise(teacher, cfg.noise_dropout, f"teacher {name!r}")
    if cfg.attention and cfg.attention.loss == "tinybert":
        for model in [student, *teachers]:
            model.set_attn_implementation("eager")  # attention probabilities are only returned by eager

    projections = {}
    if cfg.hidden and cfg.hidden.loss in HIDDEN_PROJECTED:
        for side in cfg.hidden.sides:
            for s_layer, t_layer in layer_pairs(cfg.hidden.layer_map, num_layers(student, side),
                                                num_layers(teachers[0], side)):
                projections[f"{side}_{s_layer}"] = nn.Linear(width(student), width(teachers[0]))
    module = StudentWithProjections(student, projections)

    encoded = encode_splits(ctx, tokenizer)
    if len(teachers) == 1 and not cfg.cross_tokenizer:  # an ensemble or another tokenizer's teacher decodes otherwise
        check_teacher_lead(ctx, cfg, teachers[0], names[0], tokenizer, encoded)
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
    prepare, student_steps = None, []
    if cfg.joint_teaching is not None:
        # the stage's seed (a seed variant samples other prefixes), as the loop's batches use
        seed = cfg.seed if cfg.seed is not None else ctx.seed
        prepare, student_steps = make_joint_teaching(cfg, tokenizer, seed, acc, causal)
    result = train(
        model=module,
        train_data=data_for_epoch,
        prepare_window=prepare,
        collate_fn=collate_fn,
        compute_loss=compute_loss,
        evaluate=make_validator(student, tokenizer, encoded, ctx, cfg),
        args=cfg,
        accelerator=acc,
        out_dir=ctx.out_dir,
        seed=cfg.seed if cfg.seed is not None else ctx.seed,
        log=ctx.log,
    )
    ctx.info["train"] = asdict(result)
    record_convergence(ctx, result, cfg)
    ctx.info["teachers"] = names
    record_teacher_check(ctx, student, tokenizer, encoded, result.best, cfg)  # when it teaches later stages
    if cfg.joint_teaching is not None:
        per_process = list(gather_objects(acc, student_steps))
        ctx.info["joint_teaching"] = {
            "student_steps": len(student_steps),
            "share": len(student_steps) / max(1, result.steps - (result.resumed_from or 0)),
            "processes_agree": all(steps == per_process[0] for steps in per_process),
            "student_step_list": student_steps,
        }
    if acc.is_main_process:
        save_model(acc.unwrap_model(module).student, tokenizer, ctx.out_dir)


def cached_training_data(cache, cfg, log):
    """epoch -> examples of a top-k cache (`cached_teacher:`), chosen by the stage's own `gold` and
    `pt_schedule`, as `training_data` chooses from the recipe's gold targets and pseudo-targets."""
    rows = cache.training_examples()
    if rows and "kind" not in rows[0]:
        log("note: this cache does not record which examples are gold and which pseudo-targets (it predates "
            "nlgkd recording them): every cached example trains every epoch; re-run its stage to choose")
        return lambda epoch: rows
    gold = [row for row in rows if row["kind"] == "gold"]
    if cfg.gold and not gold:
        raise ValueError("gold: true, but the cached teacher holds no gold targets (its cache_logits stage has "
                         "gold: false, or it holds an API teacher's soft targets); set gold: false")
    groups: dict[str, list[dict]] = {}
    for row in rows:
        if row["kind"] == "pt":
            groups.setdefault(row["input"], []).append(row)
    gold = gold if cfg.gold else []
    if not gold and not groups:
        raise ValueError("no training targets: the cache holds only gold targets and this stage has gold: false")
    return with_pseudo_targets(lambda epoch: gold, list(groups.values()), cfg.pt_schedule)


def with_pseudo_targets(gold_for_epoch, groups: list[list[dict]], pt_schedule: str):
    """epoch -> gold examples plus pseudo-targets; `groups` holds each input's K PTs. `cycle` gives each input
    its PT number (epoch mod K), as in the study; `all` gives all K every epoch."""
    if pt_schedule == "all":
        every_pt = [row for rows in groups for row in rows]
        return lambda epoch: gold_for_epoch(epoch) + every_pt
    return lambda epoch: gold_for_epoch(epoch) + [rows[epoch % len(rows)] for rows in groups]


def training_data(ctx, cfg, tokenizer, encoded):
    """epoch -> tokenized examples: gold targets (if `gold`) plus this epoch's pseudo-targets (`pt_schedule`:
    see `with_pseudo_targets`)."""
    gold_for_epoch = mixed_by_task(ctx, list(encoded["train"]) if cfg.gold and "train" in encoded else [])
    groups: list[list[dict]] = []
    for name in cfg.pseudo_targets:
        pts = encode_pseudo_targets(ctx.artifact_dir(name), tokenizer, ctx.recipe.data)
        by_input: dict[tuple, list[dict]] = {}
        for row in pts:
            by_input.setdefault((name, row["origin"], row["input_index"]), []).append(row)
        groups += [sorted(rows, key=lambda r: r["pt_index"]) for rows in by_input.values()]
        ctx.log(f"{name}: {len(pts)} pseudo-targets for {len(by_input)} inputs")
    if not gold_for_epoch(0) and not groups:
        raise ValueError("no training targets: set gold: true (with a train split) or pseudo_targets: [a stage]")
    return with_pseudo_targets(gold_for_epoch, groups, cfg.pt_schedule)


def with_denoising(ctx, cfg, tokenizer, encoded, teacher_model_type: str):
    """epoch -> this epoch's denoising pairs (general distillation, `nlgkd/denoising.py`), plus the stage's
    gold targets and pseudo-targets when it has any (`gold: false` and no pseudo_targets: pairs only)."""
    denoised = make_denoising_data(ctx, cfg.denoising, tokenizer, teacher_model_type)
    if not cfg.gold and not cfg.pseudo_targets:
        return denoised
    task_data = training_data(ctx, cfg, tokenizer, encoded)
    return lambda epoch: task_data(epoch) + denoised(epoch)


def in_vocabulary(logits: Tensor, width: int | None) -> Tensor:
    """[..., V] logits cut to the tokenizer's `width` ids: a vocabulary padded to a multiple of 8 or 128 (T5's
    32,128 rows for 32,100 tokens) adds rows no token maps to, and a student and teacher padded differently
    must still compare distributions over the same ids."""
    return logits if width is None or logits.shape[-1] <= width else logits[..., :width]


def make_loss(cfg, teachers: list[nn.Module], causal: bool, soft_targets=None, vocab_width: int | None = None):
    """compute_loss(model, batch, normalizer) -> (loss, logs) for the loop. `soft_targets(batch)`, when
    given, adds teacher_topk_ids / teacher_topk_logprobs to each batch (cross_tokenizer), like a cache.
    `vocab_width`: the shared tokenizer's size; wider logits are cut to it (`in_vocabulary`)."""
    want_hidden = cfg.hidden is not None
    want_attn_probs = cfg.attention is not None and cfg.attention.loss == "tinybert"
    minilm = cfg.attention is not None and cfg.attention.loss == "minilm"

    def compute_loss(model, batch, normalizer):
        if soft_targets is not None:
            batch = {**batch, **soft_targets(batch)}
        mask = batch["labels"] != -100
        local_tokens = mask.sum()
        kwargs = {}
        if want_hidden:
            kwargs["output_hidden_states"] = True
        if want_attn_probs:
            kwargs["output_attentions"] = True
        unwrapped = getattr(model, "module", model)
        with ExitStack() as hooks:
            s_cap = t_caps = None
            if minilm:
                a = cfg.attention
                s_cap = hooks.enter_context(QKVCapture(unwrapped.student, sides=a.sides, layers=[a.student_layer],
                                                       kinds=a.relations))
                t_caps = [hooks.enter_context(QKVCapture(t, sides=a.sides, layers=[a.teacher_layer],
                                                         kinds=a.relations, detach=True)) for t in teachers]
            s_logits, s_out = model(batch, **kwargs)
            s_logits = in_vocabulary(s_logits, vocab_width)
            t_logits, t_outs = [], []
            # no_grad rather than inference_mode: teacher tensors are read by the student's backward
            with torch.no_grad():
                for teacher in teachers:
                    logits, out = forward_on_targets(teacher, batch, **kwargs)
                    t_logits.append(in_vocabulary(logits, vocab_width))
                    t_outs.append(out)

            logs = {}
            on_student_prefix = bool(batch.get("student_prefix", False))
            ce = None
            if not on_student_prefix:  # gold cross-entropy; meaningless on the student's own samples
                ce = cross_entropy_loss(s_logits, batch["labels"], num_tokens=normalizer,
                                        label_smoothing=cfg.label_smoothing)
                logs["ce"] = ce.detach()
            if "teacher_topk_ids" in batch:
                # KD from a top-k cache: no teacher forward at all
                word = sparse_kd_loss(s_logits, batch["teacher_topk_logprobs"], batch["teacher_topk_ids"], mask,
                                      temperature=cfg.temperature, tail=cfg.cache_tail, num_tokens=normalizer,
                                      chunk_size=cfg.kd_chunk_size)
                logs[cfg.objective] = word.detach()
                loss = (1 - cfg.alpha) * word + cfg.alpha * ce
                agree = (s_logits.argmax(-1) == batch["teacher_topk_ids"][..., 0]) & mask
                logs["agreement"] = agree.sum() / normalizer
            elif on_student_prefix:
                # Joint-Teaching: the targets are the student's own samples, so gold cross-entropy on them
                # means nothing; the teacher's word-level distribution is the only signal
                word = OBJECTIVES[cfg.objective](s_logits, t_logits, mask, normalizer, cfg)
                loss = word
                logs["kd_student_prefix"] = word.detach()
                with torch.no_grad():
                    logs["teacher_nll_student_pt"] = cross_entropy_loss(t_logits[0], batch["labels"],
                                                                         num_tokens=normalizer)
            elif OBJECTIVES[cfg.objective] is None:
                loss = ce
            else:
                word = OBJECTIVES[cfg.objective](s_logits, t_logits, mask, normalizer, cfg)
                logs[cfg.objective] = word.detach()
                if cfg.joint_teaching is not None:
                    logs["kd_teacher_prefix"] = word.detach()
                loss = (1 - cfg.alpha) * word + cfg.alpha * ce
                agree = (s_logits.argmax(-1) == t_logits[0].argmax(-1)) & mask
                logs["agreement"] = agree.sum() / normalizer
            # mean-per-position terms are weighted by this batch's share of the window's tokens
            share = local_tokens / normalizer
            if want_hidden:
                term = hidden_term(cfg.hidden, unwrapped, s_out, t_outs[0], batch, causal)
                logs["hidden"] = term.detach()
                loss = loss + cfg.hidden.weight * share * term
            if cfg.attention is not None:
                # MiniLM reads the Q/K/V captured by the hooks; TinyBERT the attention probabilities outputs hold
                seen = (s_cap, t_caps[0]) if minilm else (s_out, t_outs[0])
                term = ATTENTION_LOSSES[cfg.attention.loss](cfg.attention, *seen, batch, causal)
                logs["attention"] = term.detach()
                loss = loss + cfg.attention.weight * share * term
        return loss, {k: float(v) for k, v in logs.items()}

    return compute_loss


def make_loss_by_task(cfg, teachers: list[nn.Module], task_teachers: list[list[int]], vocab_width: int | None = None):
    """compute_loss for multi-task data with per-task teachers (MT-DNN distillation): the rows of each
    task are distilled from that task's teachers (several: their distributions averaged), mixed with gold
    cross-entropy by `alpha`; rows of a task without teachers train on gold cross-entropy alone. Every
    term sums over tokens and divides by the window's token count, so the task groups add up exactly."""

    def compute_loss(model, batch, normalizer):
        s_logits = in_vocabulary(model(batch)[0], vocab_width)
        mask = batch["labels"] != -100
        word_total = s_logits.new_zeros(())
        ce_total = s_logits.new_zeros(())
        loss = s_logits.new_zeros(())
        agree = s_logits.new_zeros(())
        for task, indices in enumerate(task_teachers):
            rows = (batch["task_index"] == task).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            ce = cross_entropy_loss(s_logits[rows], batch["labels"][rows], num_tokens=normalizer,
                                    label_smoothing=cfg.label_smoothing)
            ce_total = ce_total + ce.detach()
            if not indices:
                loss = loss + ce
                continue
            sub = {k: v[rows] for k, v in batch.items() if torch.is_tensor(v)}
            with torch.no_grad():  # not inference_mode: teacher tensors are read by the student's backward
                t_logits = [in_vocabulary(forward_on_targets(teachers[i], sub)[0], vocab_width) for i in indices]
            word = OBJECTIVES[cfg.objective](s_logits[rows], t_logits, mask[rows], normalizer, cfg)
            word_total = word_total + word.detach()
            loss = loss + (1 - cfg.alpha) * word + cfg.alpha * ce
            agree = agree + ((s_logits[rows].argmax(-1) == t_logits[0].argmax(-1)) & mask[rows]).sum() / normalizer
        logs = {"ce": ce_total, cfg.objective: word_total, "agreement": agree}
        return loss, {k: float(v) for k, v in logs.items()}

    return compute_loss


def hidden_term(spec, module, s_out, t_out, batch, causal) -> torch.Tensor:
    """Mean of the hidden-state loss over mapped layer pairs and sides."""
    terms = []
    for side in spec.sides:
        if side == "encoder" and causal:
            raise ValueError("hidden.sides: decoder-only models have no encoder; use [decoder]")
        n_student = len(hidden_states(s_out, side)) - 1
        n_teacher = len(hidden_states(t_out, side)) - 1
        mask = side_mask(batch, side, causal)
        for s_layer, t_layer in layer_pairs(spec.layer_map, n_student, n_teacher):
            s_h = side_hidden(s_out, side, s_layer, batch, causal)
            t_h = side_hidden(t_out, side, t_layer, batch, causal).to(s_h.dtype)
            if spec.loss in HIDDEN_PROJECTED:
                s_h = module.projections[f"{side}_{s_layer}"](s_h)
            terms.append(HIDDEN_LOSSES[spec.loss](s_h, t_h, mask))
    return torch.stack(terms).mean()


def minilm_attention_term(spec, s_cap, t_cap, batch, causal) -> torch.Tensor:
    """MiniLM-v2: KL between teacher and student Q-Q, K-K, V-V relations (cross: decoder Q to encoder K)."""
    terms = []
    for side in spec.sides:
        query_mask = side_mask(batch, side, causal)
        if side == "cross":
            key_mask = batch["attention_mask"].bool()
            terms.append(relation_kd_loss(
                s_cap.get(side, "q", spec.student_layer), t_cap.get(side, "q", spec.teacher_layer).float(),
                spec.relation_heads, query_mask,
                student_y=s_cap.get(side, "k", spec.student_layer),
                teacher_y=t_cap.get(side, "k", spec.teacher_layer).float(), mask_y=key_mask))
            continue
        for kind in spec.relations:
            terms.append(relation_kd_loss(
                s_cap.get(side, kind, spec.student_layer), t_cap.get(side, kind, spec.teacher_layer).float(),
                spec.relation_heads, query_mask))
    return torch.stack(terms).mean()


def tinybert_attention_term(spec, s_out, t_out, batch, causal) -> torch.Tensor:
    """TinyBERT: MSE between the attention probabilities of the chosen student and teacher layers."""
    terms = []
    for side in spec.sides:
        s_att = attentions(s_out, side)[spec.student_layer]
        t_att = attentions(t_out, side)[spec.teacher_layer].to(s_att.dtype)
        q_mask = side_mask(batch, side, causal)
        k_mask = batch["attention_mask"].bool() if side in ("encoder_self", "cross") or causal else q_mask
        terms.append(attention_score_mse(s_att, t_att, q_mask, k_mask))
    return torch.stack(terms).mean()


# Attention losses (`attention.loss:`): (spec, student's and teacher's captures or outputs, batch, causal) -> scalar.
ATTENTION_LOSSES = {"minilm": minilm_attention_term, "tinybert": tinybert_attention_term}
