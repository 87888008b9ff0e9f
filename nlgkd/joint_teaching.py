"""Joint-Teaching (study stage S8): on some optimizer steps the student trains on prefixes it samples itself.

`make_joint_teaching` builds the training loop's prepare_window hook: which steps are student steps
(`is_student_step`), the sampling (by the student, or a CTranslate2 copy of it; with `stop_share` and
`steps_per_draw`, the two other ways to make it cheaper),
and the labels made from the samples (`mask_after_eos`). The KD loss on those prefixes is the distill stage's.
"""
from __future__ import annotations

import dataclasses
import math
import random
import shutil
import tempfile
import weakref
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from .data import pad
from .generation import generate_ids


def is_student_step(jt, seed: int, step: int) -> bool:
    """Whether optimizer step `step` trains on student samples: a pure function of (seed, step), so every
    process decides the same without talking. `alternate` spreads the steps evenly (r = 0.5: every other)."""
    r = jt.student_ratio
    if r <= 0:
        return False
    if r >= 1:
        return True
    if jt.schedule == "alternate":
        return math.floor((step + 1) * r) > math.floor(step * r)
    return random.Random(seed * 1_000_003 + step).random() < r


def mask_after_eos(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Labels from sampled tokens [B, T]: everything after the first EOS becomes -100 (the EOS counts)."""
    is_eos = tokens == eos_id
    after = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    return tokens.masked_fill(after, -100)


class EndedShare(StoppingCriteria):
    """Stops a whole `generate` call once `share` of its sequences have written EOS (the decoder start
    token at position 0 is not counted); below that, each sequence stops at its own EOS as usual."""

    def __init__(self, share: float, eos_id: int):
        self.share, self.eos_id = share, eos_id

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        ended = (input_ids[:, 1:] == self.eos_id).any(1)
        if ended.float().mean().item() >= self.share:
            return torch.ones_like(ended)
        return ended


def make_joint_teaching(cfg, tokenizer, seed: int, acc, causal: bool):
    """The loop's prepare_window hook: on student steps, replace each micro-batch's targets with prefixes
    the current student samples (no gradient). The teacher is then teacher-forced on those prefixes by
    compute_loss. The encoder is not shared with the KD forward: generation runs without gradients,
    and the KD forward needs the encoder's.

    With `steps_per_draw` k > 1, one sampling call draws k prefixes per input and serves this student step
    and the next k - 1 (on the demo's CPU a batch 4 times as tall decoded in about 2.3 times the time of one).
    The pending windows live in memory: a resumed stage draws afresh at its first student step.

    With `mix: rows` every step is both: each micro-batch keeps its rows and gains the student's prefix of each
    of its inputs (`side_by_side`).

    With `engine: ctranslate2` a CTranslate2 copy of the student samples instead (`StudentEngineCopy`, made again
    every `engine_refresh_every` optimizer steps; `student_copy_age` logs how old it is)."""
    if causal:
        raise ValueError("joint_teaching: supported for encoder-decoder students only for now")
    jt = cfg.joint_teaching
    # the recipe's decoding block, through the same settings function as every other decode; k prefixes per
    # input when one draw serves k student steps
    decoding = dataclasses.replace(jt.decoding, num_return_sequences=jt.steps_per_draw)
    extra = {}
    if jt.stop_share < 1:
        extra["stopping_criteria"] = StoppingCriteriaList([EndedShare(jt.stop_share, tokenizer.eos_token_id)])
    student_steps: list[int] = []
    pending: list[list[dict]] = []  # windows with sampled targets, for the next student steps
    engine_copy = StudentEngineCopy(jt, acc) if jt.engine == "ctranslate2" else None

    def draw(student, window, step) -> list[list[dict]]:
        """steps_per_draw windows: window j holds sample j of every input of `window`."""
        k = jt.steps_per_draw
        windows = [[] for _ in range(k)]
        was_training = student.training
        student.eval()
        for i, batch in enumerate(window):
            draw_seed = seed * 7919 + step * 131 + i * 17 + acc.process_index
            if engine_copy is not None:
                engine = engine_copy.at(student, tokenizer, step)
                samples = engine_samples(engine, batch, decoding, draw_seed, tokenizer.eos_token_id)
            else:
                torch.manual_seed(draw_seed)
                with torch.no_grad():
                    out = generate_ids(student, tokenizer, batch["input_ids"], batch["attention_mask"], decoding,
                                       **extra)
                samples = mask_after_eos(out[:, 1:], tokenizer.eos_token_id)  # drop the decoder start token
            filler = (batch["labels"] == -100).all(1)  # filler rows stay ignored (loop.epoch_loader)
            for j in range(k):
                labels = samples[j::k].clone()  # generate returns the k samples of an input next to each other
                labels[filler] = -100
                counted = (labels != -100).any(0)  # [T]: columns with a counted token in some row
                width = int(counted.nonzero().max()) + 1 if counted.any() else 1
                windows[j].append({**batch, "labels": labels[:, :width], "student_prefix": True})
        student.train(was_training)
        return windows

    def sampled_logs(sampled: list[dict], step: int) -> dict:
        logs = {"student_pt_len": mean_length(sampled)}
        if engine_copy is not None:  # how many optimizer steps old the student that wrote these prefixes is
            logs["student_copy_age"] = float(step - engine_copy.made_at)
        return logs

    def prepare(model, window, step):
        if jt.mix == "rows":  # every step: each micro-batch's own rows, then the student's prefixes of them
            student_steps.append(step)
            sampled = draw(acc.unwrap_model(model).student, window, step)[0]
            # this process's token count of each kind in the window: the loss divides by the window's count of
            # both, and the logs are each kind's own per-token means
            kind_tokens = (counted_tokens(window), counted_tokens(sampled))
            logs = {**sampled_logs(sampled, step), "student_token_share": kind_tokens[1] / max(1, sum(kind_tokens))}
            return [{**side_by_side(own, drawn), "kind_tokens": kind_tokens}
                    for own, drawn in zip(window, sampled)], logs
        if not is_student_step(jt, seed, step):
            return window, {"student_step": 0.0}
        student_steps.append(step)
        if not pending:
            pending.extend(draw(acc.unwrap_model(model).student, window, step))
        new_window = pending.pop(0)
        return new_window, {"student_step": 1.0, **sampled_logs(new_window, step)}

    return prepare, student_steps


def mean_length(window: list[dict]) -> float:
    """The mean number of counted tokens per row (filler rows included), averaged over the micro-batches."""
    lengths = [(b["labels"] != -100).sum(1).float().mean().item() for b in window]
    return sum(lengths) / len(lengths)


def counted_tokens(window: list[dict]) -> int:
    return int(sum((b["labels"] != -100).sum() for b in window))


def side_by_side(own: dict, sampled: dict) -> dict:
    """`mix: rows`: one micro-batch of 2B rows, the B rows of `own` (the data's targets) then the same sources with
    the student's prefixes (`sampled`, from `draw`); `student_rows_from` = B says where the second kind starts
    (nlgkd/stages/distill_loss.py: both_prefix_kinds), and the two copies of a source are encoded once
    (`models.with_shared_sources`)."""
    rows = own["labels"].shape[0]
    width = max(own["labels"].shape[1], sampled["labels"].shape[1])

    def widened(labels: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(labels, (0, width - labels.shape[1]), value=-100)

    doubled = {key: torch.cat([value, value]) for key, value in own.items()
               if torch.is_tensor(value) and value.shape[:1] == (rows,) and key != "labels"}
    return {**own, **doubled, "labels": torch.cat([widened(own["labels"]), widened(sampled["labels"])]),
            "student_rows_from": rows}


class StudentEngineCopy:
    """A CTranslate2 copy of the student (`joint_teaching.engine: ctranslate2`), made again once it is
    `engine_refresh_every` optimizer steps old; `made_at` is the step of the copy in use. Each process makes its
    own (DDP keeps the students equal), in a temporary folder removed with this object."""

    def __init__(self, jt, acc):
        self.jt, self.acc = jt, acc
        self.folder = Path(tempfile.mkdtemp(prefix="nlgkd-jt-engine-"))
        weakref.finalize(self, shutil.rmtree, self.folder, True)
        self.engine, self.made_at = None, -1

    def at(self, student, tokenizer, step: int):
        from .engine import EngineModel
        from .export import export_model
        from .models import save_model

        if self.engine is None or step - self.made_at >= self.jt.engine_refresh_every:
            with tempfile.TemporaryDirectory() as saved:
                save_model(student, tokenizer, saved)
                export_model(saved, self.folder / "student", quantization=self.jt.engine_quantization)
            device = self.acc.device
            self.engine = None  # one copy resident at a time
            self.engine = EngineModel(self.folder / "student", device=device.type, device_index=device.index or 0,
                                      reseed_per_call=True)
            self.made_at = step
        return self.engine


def engine_samples(engine, batch: dict, decoding, seed: int, eos_id: int) -> torch.Tensor:
    """The engine's k samples per row of `batch` as labels [B * k, T] (an input's k samples side by side, as
    `generate` returns them; everything after the first EOS, and the padding, is -100)."""
    sources = [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    rows = [row for per_source in engine.generate_ids(sources, decoding, seed) for row in per_source]
    labels, _ = pad(rows, -100, left=False)  # every row holds a token at least: EOS is returned (return_end_token)
    return mask_after_eos(labels, eos_id).to(batch["input_ids"].device)
