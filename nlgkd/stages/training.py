"""What the training stages (finetune, distill) share: tokenized splits, collators, validation during training,
and the teacher check when a stage whose model teaches later ones ends."""
from __future__ import annotations

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
    ctx.info["data"] = {**ctx.runner.data_report(), "truncated": truncated}
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
    if n:
        sources = [encoded_val[i]["source_ids"] for i in range(n)]
        outputs = generate(unwrapped, tokenizer, sources, decoding, acc, seed=ctx.seed, desc="validate",
                           progress=False)
        scores = text_metrics([o[0] for o in outputs], references[:n])
        metrics.update(bleu=scores["bleu"], chrf=scores["chrf"])
    unwrapped.train(was_training)
    return metrics


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
    """The loop's evaluate callback, or None when the recipe has no validation split."""
    if "validation" not in encoded:
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

    users = ctx.runner.teacher_users(ctx.stage)
    if not users:
        return
    if "validation" not in encoded:
        ctx.info["teacher_check"] = {"checked": False, "why": "no validation split"}
        ctx.log(f"note: no validation split, so this teacher of {', '.join(users)} was not compared with "
                "trivial baselines; give data.validation to have it checked")
        return
    scores = best if best and "bleu" in best else None
    # the examples the loop scored; when it scored none (eval_samples: 0), at least 64
    n = min(args.eval_samples if scores else max(args.eval_samples, 64), len(encoded["validation"]))
    if scores is None:  # no evaluation during training: score the teacher now
        references = list(ctx.data()["validation"]["target"])
        scores = validation_metrics(model, tokenizer, encoded["validation"], references, ctx, n,
                                    max(args.batch_size, 32), validation_decoding(ctx, args))
    validation = ctx.data()["validation"].select(range(n))
    train_targets = list(ctx.data()["train"]["target"]) if "train" in ctx.data() else []
    check = judge(scores, raw_sources(validation, ctx.recipe.data.tasks), list(validation["target"]), train_targets)
    check["model_type"] = getattr(getattr(model, "config", None), "model_type", None)
    ctx.info["teacher_check"] = check
    if check["weak"]:
        ctx.log("WARNING " + weak_teacher_message(ctx.stage.key, check, users, ctx.recipe.on_weak_teacher,
                                                  check["model_type"]))
    else:
        best_baseline = max(check["baselines"].values(), key=lambda b: b["bleu"])["bleu"]
        ctx.log(f"teacher check: BLEU {check['teacher']['bleu']:.2f} beats the trivial baselines (best "
                f"{best_baseline:.2f}) on {n} validation examples")
