"""The one training loop. Every training stage (finetune, distill, ...) hands it a model, data and a
`compute_loss(model, batch, normalizer) -> (loss, logs)`; the loop does the rest:

AdamW, linear warmup/decay, gradient accumulation, clipping, bf16 autocast where the device has it,
evaluation every N steps, early stopping with patience, keeping the best weights, and periodic resumable
checkpoints (`accelerator.save_state` plus the data position) so a killed run resumes mid-epoch with the
same data order.

Batch size is global (`split_batches=True` in the runner's Accelerator): with W processes each sees
batch_size / W examples per micro-batch, so the number of steps and the data order do not depend on W.
Losses are normalized by the global count of target tokens of the whole accumulation window, so
gradients equal those of one process with the whole batch.
"""
from __future__ import annotations

import contextlib
import json
import math
import warnings
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import safetensors
import safetensors.torch
import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, Subset

from .config import TrainArgs
from .progress import progress_bar

LossFn = Callable[[torch.nn.Module, dict, float], "tuple[torch.Tensor, dict[str, float]]"]
# (model, micro-batches, step) -> (micro-batches, logs): lets a stage replace targets before tokens are counted
PrepareFn = Callable[[torch.nn.Module, list, int], "tuple[list, dict[str, float]]"]
EvalFn = Callable[[torch.nn.Module], dict]
HIGHER_IS_BETTER = {"val_loss": False, "bleu": True, "chrf": True}
# optimizer steps in a row whose loss or gradient norm is NaN/inf before the stage stops: a step like that is
# skipped (the weights stay as they were), a run of them means training has diverged
MAX_NONFINITE_STEPS = 5


@dataclass
class LoopResult:
    steps: int
    epochs: float
    best: dict | None
    stopped_early: bool
    resumed_from: int | None
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0  # wall time of training steps, evaluations excluded
    # wall and CPU seconds that killed earlier runs of this stage spent up to their last checkpoint
    earlier_seconds: dict = field(default_factory=lambda: {"wall": 0.0, "cpu": 0.0})
    eval_seconds: float = 0.0


def resolve_precision(choice: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. `auto` means bf16 on a GPU that supports it."""
    if choice == "no":
        return None
    if choice == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def train(*, model: torch.nn.Module, train_data, collate_fn: Callable, compute_loss: LossFn, evaluate: EvalFn | None,
          args: TrainArgs, accelerator, out_dir: Path, seed: int, log: Callable[[str], None] = print,
          prepare_window: PrepareFn | None = None) -> LoopResult:
    """Train `model` in place; at the end it holds the best weights seen by `evaluate` (or the last ones).

    train_data: a dataset of tokenized examples, or a function epoch -> dataset (pseudo-target schedules
    that show each input a different target every epoch).
    """
    data_for_epoch = train_data if callable(train_data) else (lambda epoch: train_data)
    plan = plan_steps(args, len(data_for_epoch(0)), accelerator.num_processes)
    model, optimizer, scheduler = prepared(model, args, plan, accelerator)
    autocast_dtype = resolve_precision(args.mixed_precision, accelerator.device)
    compute_loss = maybe_compiled(compute_loss, args)
    # dropout, noisy-KD teachers and sampled rollouts draw from the global generators: seed them here, not
    # wherever the process happens to be after loading models and data (a resumed run restores their state)
    set_seed(seed, device_specific=True)
    state, resumed_from = resume(accelerator, out_dir / "checkpoints", plan.total_steps, log)
    stage = out_dir.name.strip(".").removesuffix(".partial")  # the stage's folder: runs/<recipe>/.<stage>.partial
    if args.report_to:
        # trackers named by the stage folder (runs/<recipe>/logs/<stage>); metrics.jsonl is always written
        accelerator.init_trackers(stage)
    # leave=False: when the stage ends its "finished" line replaces the bar; a log line names the stage
    bar = progress_bar(total=plan.total_steps, initial=state["step"], desc=f"{stage} train",
                       disable=not accelerator.is_main_process, leave=False)
    clock = Clock(earlier=dict(state.get("elapsed", {"wall": 0.0, "cpu": 0.0})))
    guard, running, stopped_early = NonfiniteGuard(args), RunningLogs(), False
    model.train()
    for window in epoch_windows(data_for_epoch, state, seed, args, collate_fn, accelerator):
        extra = {}
        if prepare_window is not None:
            window, extra = prepare_window(model, window, state["step"])
        logs = train_step(model, optimizer, window, compute_loss, args, accelerator, autocast_dtype, extra)
        with warnings.catch_warnings():  # a skipped first update makes torch warn about the order of calls
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()`")
            scheduler.step()
        state["step"] += 1
        if guard.counts(logs, state["step"], log):
            running.add(logs)  # a skipped step's NaN stays out of the logged averages
        bar.update(1)
        log_running(running, state, plan, scheduler, bar, accelerator, out_dir / "metrics.jsonl", args)
        stopped_early = evaluate_if_due(model, evaluate, args, state, plan, accelerator, out_dir, clock, log)
        step = state["step"]
        if step >= plan.total_steps or stopped_early:
            break
        if checkpoint_due(args, step, clock.last_save, accelerator):
            state["elapsed"] = clock.elapsed()
            save_checkpoint(accelerator, out_dir / "checkpoints", state)
            clock.last_save = time.time()
    bar.close()
    restore_best(accelerator.unwrap_model(model), out_dir, state, args, log)
    accelerator.wait_for_everyone()
    return LoopResult(
        steps=state["step"], epochs=round(state["epoch"] + state["batch_in_epoch"] / plan.batches_per_epoch, 3),
        best=state["best"], stopped_early=stopped_early, resumed_from=resumed_from, history=state["history"],
        train_seconds=round(time.time() - clock.started - clock.eval_seconds, 2),
        eval_seconds=round(clock.eval_seconds, 2), earlier_seconds={k: round(v, 2) for k, v in clock.earlier.items()})


def prepared(model, args: TrainArgs, plan: "StepPlan", accelerator):
    """(model, optimizer, scheduler) ready for the loop: AdamW, linear warmup then decay to 0 at the last step."""
    optimizer = make_optimizer(model, args, accelerator.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: linear_warmup_decay(step, args.warmup_steps, plan.total_steps))
    model, optimizer = accelerator.prepare(model, optimizer)
    # stepped by hand once per optimizer step (accelerate's wrapper would step it once per process)
    accelerator.register_for_checkpointing(scheduler)
    return model, optimizer, scheduler


@dataclass
class StepPlan:
    """How long a stage trains and how often it evaluates, from its data size and its args."""

    batches_per_epoch: int
    total_steps: int
    eval_every: int


def plan_steps(args: TrainArgs, examples: int, world: int) -> StepPlan:
    if args.batch_size % world:
        raise ValueError(f"batch_size {args.batch_size} must be divisible by the {world} processes")
    batches_per_epoch = math.ceil(examples / args.batch_size)
    # an epoch's last window may hold fewer than grad_accum batches, and it is a step too
    steps_per_epoch = math.ceil(batches_per_epoch / args.grad_accum)
    total_steps = args.max_steps or max(1, math.ceil(args.epochs * steps_per_epoch))
    return StepPlan(batches_per_epoch, total_steps, args.eval_every or steps_per_epoch)


def fresh_state() -> dict:
    """The loop's position and history, as a checkpoint's trainer_state.json holds it."""
    return {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best": None, "bad_evals": 0, "history": [],
            "elapsed": {"wall": 0.0, "cpu": 0.0}}  # spent by this stage up to the checkpoint, across resumes


def resume(accelerator, ckpt_root: Path, total_steps: int, log) -> tuple[dict, int | None]:
    """(state, the step it resumed from): the latest checkpoint's, with its weights, optimizer, scheduler and
    generator states loaded, or a fresh state."""
    latest = latest_checkpoint(ckpt_root)
    if latest is not None and (problem := checkpoint_problem(latest)) is not None:
        # a damaged checkpoint (a full disk, a copy cut short) would fail every re-run: read before anything
        # is loaded from it, it is discarded and the stage starts again from its first step
        log(f"checkpoint {latest.name} is damaged ({problem}); discarded, the stage starts from step 0")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(latest, ignore_errors=True)
        accelerator.wait_for_everyone()
        latest = None
    if latest is None:
        return fresh_state(), None
    accelerator.load_state(str(latest))
    state = json.loads((latest / "trainer_state.json").read_text())
    log(f"resuming from checkpoint {latest.name} (step {state['step']} of {total_steps})")
    return state, state["step"]


def epoch_windows(data_for_epoch, state: dict, seed: int, args: TrainArgs, collate_fn, accelerator):
    """Accumulation windows (grad_accum micro-batches; an epoch's last may hold fewer), epoch after epoch, from
    the position in `state`, which advances as windows are taken: a resumed run skips what its epoch trained."""
    while True:
        epoch_data = data_for_epoch(state["epoch"])
        # (a checkpoint saved right at the end of an epoch: the next one starts; skipping every batch of a
        # loader yields a None batch in accelerate 1.0)
        if state["batch_in_epoch"] < math.ceil(len(epoch_data) / args.batch_size):
            loader = epoch_loader(epoch_data, state["epoch"], seed, args.batch_size, collate_fn, accelerator,
                                  args.group_by_length)
            batches = iter(accelerator.skip_first_batches(loader, state["batch_in_epoch"]))
            while window := [b for _, b in zip(range(args.grad_accum), batches)]:
                state["batch_in_epoch"] += len(window)
                yield window
        state["epoch"] += 1
        state["batch_in_epoch"] = 0


@dataclass
class Clock:
    """This run's wall and CPU time, and what killed runs of the stage spent up to their last checkpoint."""

    earlier: dict
    started: float = field(default_factory=time.time)
    cpu_started: float = field(default_factory=time.process_time)
    last_save: float = field(default_factory=time.time)
    eval_seconds: float = 0.0

    def elapsed(self) -> dict:
        return {"wall": self.earlier["wall"] + time.time() - self.started,
                "cpu": self.earlier["cpu"] + time.process_time() - self.cpu_started}


class NonfiniteGuard:
    """Counts optimizer steps in a row whose loss or gradient norm was NaN/inf (train_step skipped them)."""

    def __init__(self, args: TrainArgs):
        self.args, self.in_a_row = args, 0

    def counts(self, logs: dict, step: int, log) -> bool:
        """Whether this step's logs count (it was not skipped); a run of MAX_NONFINITE_STEPS stops the stage."""
        if not logs.pop("skipped_nonfinite"):
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        log(f"step {step}: the loss or the gradient norm is not finite "
            f"(loss {logs['loss']}, grad_norm {logs['grad_norm']}); the update was skipped")
        if self.in_a_row >= MAX_NONFINITE_STEPS:
            args = self.args
            raise ValueError(
                f"training diverged: {MAX_NONFINITE_STEPS} steps in a row up to step {step} had a "
                f"NaN/inf loss or gradient; lower lr (now {args.lr:g}), add warmup_steps, or set "
                f"mixed_precision: no (now {args.mixed_precision}); a changed setting starts the stage again")
        return False


def log_running(running: RunningLogs, state: dict, plan: StepPlan, scheduler, bar, accelerator, metrics_file: Path,
                args: TrainArgs) -> None:
    """Every log_every steps (and at the last): the averages since the last record, to metrics.jsonl and the bar."""
    step = state["step"]
    if (step % args.log_every and step != plan.total_steps) or not running.sums:  # a window of skips: none
        return
    record = running.averages()
    record.update(step=step, epoch=round(state["epoch"] + state["batch_in_epoch"] / plan.batches_per_epoch, 3),
                  lr=scheduler.get_last_lr()[0])
    bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
    write_metrics(accelerator, metrics_file, record)


def restore_best(unwrapped: torch.nn.Module, out_dir: Path, state: dict, args: TrainArgs, log) -> None:
    """Load the best evaluation's weights (kept by run_evaluation) into the model, in place."""
    best_file = out_dir / "checkpoints" / "best.safetensors"
    if state["best"] is not None and best_file.exists():
        safetensors.torch.load_model(unwrapped, str(best_file), device="cpu")  # copied into the params in place
        log(f"kept the best weights: step {state['best']['step']}, {args.early_stopping_metric} "
            f"{state['best'][args.early_stopping_metric]:.4f}")


def make_optimizer(model: torch.nn.Module, args: TrainArgs, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on biases and norms (ndim < 2)."""
    params = [p for p in model.parameters() if p.requires_grad]
    no_decay = [p for p in params if p.ndim < 2]
    decay = [p for p in params if p.ndim >= 2]
    fused = args.fused_adamw == "yes" or (args.fused_adamw == "auto" and device.type == "cuda")
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, fused=fused or None,
    )


def maybe_compiled(compute_loss: LossFn, args: TrainArgs) -> LossFn:
    """`compute_loss` under torch.compile when `args.compile`. The loss function, not the module: generation
    (validation, Joint-Teaching) calls the same module with a cache and one new token at a time, and would
    recompile for every shape."""
    return torch.compile(compute_loss, dynamic=True) if args.compile else compute_loss


class RunningLogs:
    """Averages of each logged value over the steps since the last write (a value logged only on some
    steps, like Joint-Teaching's student-prefix loss, is averaged over the steps that had it)."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, logs: dict) -> None:
        for k, v in logs.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1

    def averages(self) -> dict:
        out = {k: self.sums[k] / self.counts[k] for k in self.sums}
        self.sums, self.counts = {}, {}
        return out


def linear_warmup_decay(step: int, warmup: int, total: int) -> float:
    """The learning-rate factor at optimizer step `step` (0-based): warmup to 1, then linear decay to 0 at `total`.
    transformers' get_linear_schedule_with_warmup is the same but for the warmup, step / warmup, which spends the
    first step at learning rate 0; ours starts at 1 / warmup (kept: every measured run used it)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def epoch_loader(train_data, epoch: int, seed: int, batch_size: int, collate_fn, accelerator,
                 group_by_length: bool = False) -> DataLoader:
    """This epoch's batches: a permutation fixed by (seed, epoch), so a resumed run sees the same order
    (with `group_by_length`, one whose batches hold examples of similar length: `length_grouped_order`).

    With several processes, a partial last batch is topped up to a whole one with copies marked `ignore`
    (collated with every label -100: no loss, no token counted). Left partial, accelerate would top it up with
    real examples from the epoch's start (`even_batches`), which then count twice, and N processes would no
    longer train like 1."""
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    if len(train_data) and isinstance(train_data[0], dict) and "group" in train_data[0]:
        order = grouped_order(train_data, batch_size, generator, group_by_length)
    elif group_by_length:
        lengths = [len(ex["source_ids"]) + len(ex["target_ids"]) for ex in train_data]
        order = length_grouped_order(lengths, batch_size, generator)
    else:
        order = torch.randperm(len(train_data), generator=generator).tolist()
    missing = -len(order) % batch_size if accelerator.num_processes > 1 else 0
    data = ToppedUp(Subset(train_data, order), missing)
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
    return accelerator.prepare_data_loader(loader)


def grouped_order(train_data: list[dict], batch_size: int, generator: torch.Generator,
                  group_by_length: bool) -> list[int]:
    """A shuffled order that keeps the examples of one `group` (an input's pseudo-targets, `pt_schedule:
    all_together`) side by side, so that a batch holds them together and their source is encoded once; with
    `group_by_length`, neighbouring groups have similar lengths (`length_grouped_order` over whole groups)."""
    members: dict = {}
    for i, example in enumerate(train_data):  # an example without a group (a denoising pair) is one of its own
        members.setdefault(example.get("group", ("alone", i)), []).append(i)
    groups = list(members.values())
    if group_by_length:
        lengths = [max(len(train_data[i]["source_ids"]) + len(train_data[i]["target_ids"]) for i in g)
                   for g in groups]
        groups_per_batch = max(1, round(batch_size * len(groups) / len(train_data)))
        picked = length_grouped_order(lengths, groups_per_batch, generator)
    else:
        picked = torch.randperm(len(groups), generator=generator).tolist()
    return [i for g in picked for i in groups[g]]


def length_grouped_order(lengths: list[int], batch_size: int, generator: torch.Generator,
                         pool_batches: int = 50) -> list[int]:
    """A shuffled order of the examples whose consecutive `batch_size` blocks have similar lengths.

    The examples are shuffled, cut into pools of `pool_batches` batches, each pool is sorted by length and cut
    into batches, and the whole batches are shuffled (the one partial batch stays last, so the loader's batch
    boundaries are the blocks made here). Each example still appears once per epoch; padding mostly goes.
    transformers' get_length_grouped_indices differs in what matters here: it keeps each pool's batches longest
    first (lengths then trend within every 50 steps) and does not keep the partial batch last."""
    shuffled = torch.randperm(len(lengths), generator=generator).tolist()
    pool = batch_size * pool_batches
    batches = []
    for start in range(0, len(shuffled), pool):
        by_length = sorted(shuffled[start:start + pool], key=lambda i: lengths[i])
        batches += [by_length[j:j + batch_size] for j in range(0, len(by_length), batch_size)]
    partial = [b for b in batches if len(b) < batch_size]
    whole = [b for b in batches if len(b) == batch_size]
    return [i for b in torch.randperm(len(whole), generator=generator).tolist() for i in whole[b]] + \
        [i for b in partial for i in b]


class ToppedUp(torch.utils.data.Dataset):
    """`examples` followed by `extra` ignored copies of its first ones (see `epoch_loader`)."""

    def __init__(self, examples, extra: int):
        self.examples, self.extra = examples, extra

    def __len__(self) -> int:
        return len(self.examples) + self.extra

    def __getitem__(self, i: int) -> dict:
        if i < len(self.examples):
            return self.examples[i]
        return {**self.examples[(i - len(self.examples)) % len(self.examples)], "ignore": True}


def train_step(model, optimizer, window, compute_loss, args, accelerator, autocast_dtype, extra=None) -> dict:
    """One optimizer step over an accumulation window of micro-batches; returns logs averaged over processes."""
    # the loop's own host syncs, two per step: the global token count (the loss's denominator) and, at the
    # end, the logs (the NaN check needs them before the update); compute_loss may add its own
    local_tokens = torch.stack([(b["labels"] != -100).sum() for b in window]).sum().float()
    global_tokens = accelerator.reduce(local_tokens.to(accelerator.device), "sum").item()
    # DDP averages gradients over processes, so each process scales its sum by world / global tokens
    normalizer = max(global_tokens, 1.0) / accelerator.num_processes
    totals: dict = dict(extra or {})
    for i, batch in enumerate(window):
        sync = i == len(window) - 1
        context = accelerator.no_sync(model) if not sync else contextlib.nullcontext()
        with context:
            with torch.autocast(accelerator.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss, logs = compute_loss(model, batch, normalizer)
            accelerator.backward(loss)
        for k, v in {"loss": loss, **logs}.items():
            v = v.detach().float() if torch.is_tensor(v) else float(v)
            totals[k] = totals[k] + v if k in totals else v
    # the global gradient norm, clipped to max_grad_norm (0: not clipped, still measured for the NaN check)
    totals["grad_norm"] = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm or float("inf"))
    keys = sorted(totals)  # grad_norm is the same on every process (synchronized gradients): the mean keeps it
    values = torch.stack([torch.as_tensor(totals[k], dtype=torch.float32, device=accelerator.device).reshape(())
                          for k in keys])
    mean = accelerator.reduce(values, "sum") / accelerator.num_processes
    logs = dict(zip(keys, mean.tolist()))
    # every process sees the same sums, so all of them skip or all step: a NaN/inf update would poison the weights
    logs["skipped_nonfinite"] = not (math.isfinite(logs["loss"]) and math.isfinite(logs["grad_norm"]))
    if not logs["skipped_nonfinite"]:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return logs


def evaluate_if_due(model, evaluate, args, state, plan: StepPlan, accelerator, out_dir, clock: Clock, log) -> bool:
    """Every eval_every steps and at the last: `run_evaluation`, its time counted apart from training's.
    Returns True when training should stop."""
    step = state["step"]
    if evaluate is None or (step % plan.eval_every and step != plan.total_steps):
        return False
    started = time.time()
    stop = run_evaluation(model, evaluate, args, state, accelerator, out_dir, log)
    model.train()
    clock.eval_seconds += time.time() - started
    return stop


def run_evaluation(model, evaluate, args, state, accelerator, out_dir, log) -> bool:
    """Evaluate, keep the best weights, count patience. Returns True when training should stop."""
    metrics_file = out_dir / "metrics.jsonl"
    metrics = evaluate(model)
    measured_on = metrics.pop("measured_on", None)  # words for the log line, not a number to record
    metrics["step"] = state["step"]
    state["history"].append(metrics)
    write_metrics(accelerator, metrics_file, {f"eval/{k}" if k != "step" else k: v for k, v in metrics.items()})
    name = args.early_stopping_metric
    if name not in metrics:
        raise ValueError(f"early_stopping_metric {name!r} was not computed; evaluation gave {sorted(metrics)}")
    better = math.isfinite(metrics[name]) and (state["best"] is None or (  # a NaN is never the best
        metrics[name] > state["best"][name] if HIGHER_IS_BETTER[name] else metrics[name] < state["best"][name]
    ))
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "step" and isinstance(v, float))
    log(f"step {state['step']}: {shown}{' (best)' if better else ''}{f' [{measured_on}]' if measured_on else ''}")
    if better:
        state["best"] = metrics
        state["bad_evals"] = 0
        if accelerator.is_main_process:
            best_file = out_dir / "checkpoints" / "best.safetensors"
            best_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = best_file.with_suffix(".tmp")
            safetensors.torch.save_model(accelerator.unwrap_model(model), str(tmp))
            tmp.replace(best_file)
        accelerator.wait_for_everyone()
        return False
    state["bad_evals"] += 1
    if args.patience is not None and state["bad_evals"] >= args.patience:
        log(f"early stopping: no better {name} in {args.patience} evaluations")
        return True
    return False


def checkpoint_due(args, step: int, last_save: float, accelerator) -> bool:
    """Every `save_every` steps, and when `save_every_minutes` have passed since the last checkpoint. The clock
    is read on each process, so the processes agree (max) every `log_every` steps; save_state is collective."""
    if args.save_every and step % args.save_every == 0:
        return True
    if not args.save_every_minutes or step % args.log_every:
        return False
    late = float(time.time() - last_save >= 60 * args.save_every_minutes)
    return bool(accelerator.reduce(torch.tensor(late, device=accelerator.device), "max").item())


def save_checkpoint(accelerator, root: Path, state: dict) -> None:
    """save_state into a temporary folder, then rename: a kill never leaves a half checkpoint."""
    tmp = root / f"tmp-step-{state['step']}"
    final = root / f"step-{state['step']}"
    try:
        accelerator.save_state(str(tmp))
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as RuntimeError("[enforce fail ...")
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(root if root.exists() else root.parent).free / 2**20
        raise OSError(f"could not write the checkpoint {tmp} ({str(err).splitlines()[0][:160]}); {free:,.0f} MB are "
                      "free there: free some space and run again (the stage resumes from its last checkpoint)") \
            from None
    accelerator.wait_for_everyone()  # every process has written its RNG state before the folder is renamed
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps(state))
        tmp.rename(final)
        for old in root.glob("step-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def checkpoint_problem(folder: Path) -> str | None:
    """What makes a checkpoint folder unreadable (a file that does not open), or None. Headers and archive
    indexes only (memory-mapped), so a large model's checkpoint is not read twice on resume."""
    for path in sorted(folder.iterdir()):
        try:
            if path.suffix == ".safetensors":
                with safetensors.safe_open(str(path), "pt") as opened:  # checks the header against the size
                    opened.keys()
            elif path.suffix in (".bin", ".pt"):
                torch.load(path, map_location="cpu", weights_only=False, mmap=True)  # the zip index, mapped
            elif path.suffix == ".pkl":
                torch.load(path, map_location="cpu", weights_only=False)  # the generators' states: small
            elif path.suffix == ".json":
                json.loads(path.read_text())
        except Exception as err:  # noqa: BLE001 - any reader's error means the same: this file is damaged
            return f"{path.name}: {type(err).__name__}: {str(err)[:120]}"
    return None


def latest_checkpoint(root: Path) -> Path | None:
    found = [p for p in root.glob("step-*") if (p / "trainer_state.json").exists()]
    return max(found, key=lambda p: int(p.name.split("-")[1])) if found else None


def write_metrics(accelerator, path: Path, record: dict) -> None:
    if accelerator.is_main_process:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    if accelerator.trackers:
        accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record.get("step"))
