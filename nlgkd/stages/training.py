"""What the training stages (finetune, distill) share: tokenized splits, collators, validation during training,
teachers that train until validation stops improving (`teacher_args`, `record_convergence`), the teacher check
when a stage whose model teaches later ones ends, and the teacher-vs-student check before a distill stage trains
(`check_teacher_lead`)."""
from __future__ import annotations

import dataclasses
from functools import partial

import torch

from ..data import collate, encode, task_mixture
from ..generation import generate
from ..losses import cross_entropy_loss
from ..metrics import text_metrics
from ..models import is_causal, target_logits
from ..config import DecodingConfig
from ..recipe import to_dict


def encode_splits(ctx, tokenizer, splits=("train", "validation")) -> dict:
    """Tokenize the recipe's splits for `tokenizer`; truncation counts go to stage.json."""
    data = ctx.data()
    cfg = ctx.recipe.data
    encoded = {}
    truncated = {}
    for split in splits:
        if split not in data:
            continue
        encoded[split], truncated[split] = encode(data[split], tokenizer, cfg.max_source_length, cfg.max_target_length)
        if any(truncated[split].values()):
            ctx.log(f"{split}: truncated {truncated[split]['source']} sources to {cfg.max_source_length} tokens "
                    f"and {truncated[split].get('target', 0)} targets to {cfg.max_target_length} tokens")
    ctx.info["data"] = {**ctx.data_report(), "truncated": truncated}
    return encoded


def make_collator(model, tokenizer, tasks: tuple[str, ...] = ()):
    """Batches for `model`; with `tasks` (multi-task data) they carry each example's `task_index`."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return partial(collate, pad_id=pad_id, causal=is_causal(model), sep_id=tokenizer.eos_token_id, tasks=tasks)


def mixed_by_task(ctx, examples):
    """epoch -> examples: multi-task data resampled by the tasks' weights (`data.tasks.NAME.weight`);
    `examples` as they are for single-task data or when no task sets a weight."""
    tasks = ctx.recipe.data.tasks
    if not any(task.weight is not None for task in tasks.values()):
        return lambda epoch: examples
    weights = {name: task.weight for name, task in tasks.items()}
    rows = list(examples)
    return lambda epoch: task_mixture(rows, weights, ctx.seed, epoch)


def cross_entropy_step(model, batch, normalizer, label_smoothing=0.0):
    """Cross-entropy on gold targets: the `finetune` objective."""
    logits = target_logits(model, batch)
    loss = cross_entropy_loss(logits, batch["labels"], num_tokens=normalizer, label_smoothing=label_smoothing)
    return loss, {}


@torch.no_grad()
def validation_metrics(model, tokenizer, encoded_val, references, ctx, eval_samples: int, batch_size: int,
                       decoding: DecodingConfig) -> dict:
    """Validation loss (token-level cross-entropy on all of it) and BLEU/chrF on a subset, decoded with the
    stage's validation_decoding (by default as the recipe's evaluate stage decodes)."""
    acc = ctx.accelerator
    unwrapped = acc.unwrap_model(model)
    unwrapped = getattr(unwrapped, "student", unwrapped)  # distill trains a student+projections module
    was_training = unwrapped.training
    unwrapped.eval()
    collator = make_collator(unwrapped, tokenizer)
    rows = list(range(len(encoded_val)))
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    total = torch.zeros(2, device=acc.device)
    for j, batch_rows in enumerate(batches):
        if j % acc.num_processes != acc.process_index:
            continue
        batch = {k: v.to(acc.device) for k, v in collator([encoded_val[i] for i in batch_rows]).items()}
        logits = target_logits(unwrapped, batch)
        total[0] += cross_entropy_loss(logits, batch["labels"], num_tokens=1.0)
        total[1] += (batch["labels"] != -100).sum()
    total = acc.reduce(total, "sum")
    metrics = {"val_loss": (total[0] / total[1].clamp(min=1)).item()}
    n = min(eval_samples, len(encoded_val))
    # the loop's log line says what the numbers are: pairs of the validation split with their gold targets
    metrics["measured_on"] = f"val_loss: gold targets of {len(encoded_val)} validation pairs" + (
        f"; bleu, chrf: the first {n} decoded ({decoding.strategy}"
        f"{f', {decoding.num_beams} beams' if 'beam' in decoding.strategy else ''})" if n else "")
    if n:
        sources = [encoded_val[i]["source_ids"] for i in range(n)]
        outputs = generate(unwrapped, tokenizer, sources, decoding, acc, seed=ctx.seed, desc="validate",
                           progress=False)
        scores = text_metrics([o[0] for o in outputs], references[:n])
        metrics.update(bleu=scores["bleu"], chrf=scores["chrf"])
    unwrapped.train(was_training)
    return metrics


def decoded_score(ctx, model, tokenizer, sources: list[list[int]], references: list[str], decoding: DecodingConfig,
                  desc: str, metric: str = "bleu", progress: bool = False) -> float:
    """`metric` of `model`'s first output for each source against `references` (an empty output where it wrote
    none): how check_teacher_lead and the select stage score models on the same examples."""
    outputs = generate(model, tokenizer, sources, decoding, ctx.accelerator, seed=ctx.seed, desc=desc, progress=progress)
    return text_metrics([o[0] if o else "" for o in outputs], references)[metric]


def validation_decoding(ctx, args) -> DecodingConfig:
    """How a training stage's validation decodes: its own validation_decoding, else as the recipe's first
    evaluate stage decodes, else greedy up to data.max_target_length; recorded in stage.json."""
    decoding = args.validation_decoding
    if decoding is None:
        evaluate = next((s for s in ctx.recipe.stages if s.kind == "evaluate"), None)
        decoding = (evaluate.config.decoding if evaluate is not None
                    else DecodingConfig(max_new_tokens=ctx.recipe.data.max_target_length))
    ctx.info["validation_decoding"] = to_dict(decoding)
    return decoding


def make_validator(model, tokenizer, encoded, ctx, args):
    """The loop's evaluate callback, or None when the recipe has no validation split (said out loud)."""
    if "validation" not in encoded:
        ctx.log("note: no validation split, so no evaluation: no early stopping, the last weights are kept, and "
                "no teacher check; give data.validation (a few hundred held-out pairs) to have them")
        return None
    references = list(ctx.data()["validation"]["target"])
    decoding = validation_decoding(ctx, args)
    return lambda m: validation_metrics(m, tokenizer, encoded["validation"], references, ctx,
                                        args.eval_samples, max(args.batch_size, 32), decoding)


def record_teacher_check(ctx, model, tokenizer, encoded: dict, best: dict | None, args) -> None:
    """When later stages use this training stage's model as a teacher: score it against trivial baselines on
    its validation examples (nlgkd/teacher_check.py), record `teacher_check` in stage.json, and warn when it
    does not beat them. `best`: the loop's evaluation of the kept weights, reused when it has BLEU."""
    from ..teacher_check import judge, raw_sources, weak_teacher_message

    users = ctx.teacher_users
    if not users:
        return
    if "validation" not in encoded:
        ctx.info["teacher_check"] = {"checked": False, "why": "no validation split"}
        ctx.log(f"note: no validation split, so this teacher of {', '.join(users)} was not compared with "
                "trivial baselines; give data.validation to have it checked")
        return
    scores = best if best and "bleu" in best else None
    decoding = validation_decoding(ctx, args)
    # the examples the loop scored; when it scored none (eval_samples: 0), at least 64
    n = min(args.eval_samples if scores else max(args.eval_samples, 64), len(encoded["validation"]))
    if scores is None:  # no evaluation during training: score the teacher now
        references = list(ctx.data()["validation"]["target"])
        scores = validation_metrics(model, tokenizer, encoded["validation"], references, ctx, n,
                                    max(args.batch_size, 32), decoding)
    validation = ctx.data()["validation"].select(range(n))
    train_targets = list(ctx.data()["train"]["target"]) if "train" in ctx.data() else []
    check = judge(scores, raw_sources(validation, ctx.recipe.data.tasks), list(validation["target"]), train_targets,
                  decoding=decoding.strategy)
    check["model_type"] = getattr(getattr(model, "config", None), "model_type", None)
    ctx.info["teacher_check"] = check
    if check["weak"]:
        ctx.log("WARNING " + weak_teacher_message(ctx.stage.key, check, users, ctx.recipe.on_weak_teacher,
                                                  check["model_type"]))
    else:
        best_baseline = max(check["baselines"].values(), key=lambda b: b["bleu"])["bleu"]
        ctx.log(f"teacher check: BLEU {check['teacher']['bleu']:.2f} beats the trivial baselines (best "
                f"{best_baseline:.2f}) on {n} validation examples")


# evaluations without improvement after which a stage whose model teaches later stages stops, when it sets none
TEACHER_PATIENCE = 3
TEACHER_LEAD_EXAMPLES = 500  # validation examples the teacher and the CE student decode before a distill stage


def teacher_args(ctx, args):
    """`args`, with patience TEACHER_PATIENCE when this stage's model teaches later stages and the recipe sets
    none: a teacher trains until validation stops improving, and max_steps is only the cap."""
    if args.patience is not None or not ctx.teacher_users:
        return args
    ctx.log(f"patience {TEACHER_PATIENCE}: this model teaches later stages, so it stops when validation "
            f"{args.early_stopping_metric} stops improving (max_steps is the cap); set patience to choose")
    return dataclasses.replace(args, patience=TEACHER_PATIENCE)


def record_convergence(ctx, result, args) -> None:
    """stage.json's `convergence`: whether validation had stopped improving before training ended. It has when
    patience stopped the stage, or when the step cap came `patience` (at least 1) evaluations after the best one;
    otherwise the cap cut it short, and when its model teaches later stages a warning says so: a teacher cut
    short can trail the students it teaches (as one did by 0.56 BLEU on held-out data)."""
    metric = args.early_stopping_metric
    evals = [h for h in result.history if metric in h]
    if not evals:
        return
    best_step = result.best["step"] if result.best is not None else evals[-1]["step"]
    since_best = sum(h["step"] > best_step for h in evals)
    needed = args.patience or 1
    converged = result.stopped_early or since_best >= needed
    ctx.info["convergence"] = {
        "converged": None if len(evals) < 2 and not result.stopped_early else converged,
        "stopped_by": "patience" if result.stopped_early else "max_steps",
        "evaluations_after_best": since_best,
        "metric": metric,
        "last_evaluations": [{"step": h["step"], metric: round(h[metric], 4)} for h in evals[-4:]],
    }
    users = ctx.teacher_users
    if not converged and len(evals) > 1 and users:
        trail = " -> ".join(f"{h[metric]:.2f}" for h in evals[-4:])
        steps = " / ".join(str(h["step"]) for h in evals[-4:])
        ctx.log(f"WARNING not converged: the step cap ({result.steps} steps) ended {ctx.stage.key!r} {since_best} "
                f"evaluation(s) after its best, before {needed} without improvement (validation {metric} {trail} at "
                f"steps {steps}); a teacher cut short can trail the students {', '.join(users)} learn from it. Raise "
                "max_steps (or epochs): with patience set it stops on validation by itself; then run the recipe again")


def check_teacher_lead(ctx, cfg, teacher, teacher_name: str, tokenizer, encoded: dict) -> None:
    """Before a distill stage trains: decode the same validation examples with its teacher and with the
    cross-entropy student of the same shape (`ce_student`), record both BLEU scores and the lead in stage.json
    (`teacher_lead`), and warn, or stop (on_weak_teacher: stop), when the lead is below `min_teacher_lead`:
    distilling from a teacher that does not clearly beat the student trained alone cannot help it."""
    if cfg.min_teacher_lead is None:
        return
    if cfg.ce_student is None or "validation" not in encoded:
        why = ("no cross-entropy student of this shape in the recipe (a finetune stage of the same student, or "
               "ce_student:)" if cfg.ce_student is None else "no validation split")
        ctx.info["teacher_lead"] = {"checked": False, "why": why}
        ctx.log(f"note: the teacher was not compared with a student trained alone: {why}")
        return
    decoding = validation_decoding(ctx, cfg)
    n = min(len(encoded["validation"]), TEACHER_LEAD_EXAMPLES)
    sources = [encoded["validation"][i]["source_ids"] for i in range(n)]
    references = list(ctx.data()["validation"]["target"])[:n]
    ce_model, _ = ctx.load_model(cfg.ce_student)
    ce_model.to(ctx.accelerator.device)
    scores = {}
    for name, model in ((teacher_name, teacher), (cfg.ce_student, ce_model)):
        scores[name] = round(decoded_score(ctx, model, tokenizer, sources, references, decoding, f"score {name}"), 2)
    del ce_model
    lead = round(scores[teacher_name] - scores[cfg.ce_student], 2)
    weak = lead < cfg.min_teacher_lead
    ctx.info["teacher_lead"] = {"checked": True, "teacher": teacher_name, "teacher_bleu": scores[teacher_name],
                                "ce_student": cfg.ce_student, "ce_student_bleu": scores[cfg.ce_student],
                                "lead": lead, "min_teacher_lead": cfg.min_teacher_lead, "weak": weak,
                                "examples": n, "split": "validation", "decoding": to_dict(decoding)}
    said = (f"teacher {teacher_name!r} BLEU {scores[teacher_name]:.2f}, cross-entropy student {cfg.ce_student!r} "
            f"{scores[cfg.ce_student]:.2f} on {n} validation examples ({decoding.strategy})")
    if not weak:
        ctx.log(f"teacher lead: {said}: +{lead:.2f}, distilling")
        return
    policy = ctx.recipe.on_weak_teacher
    message = (f"the teacher leads the student trained alone by {lead:+.2f} BLEU, below min_teacher_lead "
               f"{cfg.min_teacher_lead:g} ({said}); distilling from it is unlikely to beat {cfg.ce_student!r}. Try: "
               "train the teacher until validation stops improving (a larger max_steps; its stage.json says "
               "whether it converged), a larger teacher or a pretrained checkpoint, or a smaller student; set "
               f"on_weak_teacher: {'warn to distill anyway' if policy == 'stop' else 'stop to stop here instead'}")
    if policy == "stop":
        raise ValueError(f"stopped before training (on_weak_teacher: stop): {message}")
    ctx.log("WARNING " + message)

