"""The training loop's guard against NaN/inf: a non-finite step is skipped with the weights kept, a run of
them stops the stage with what to change, and a NaN validation score is never kept as the best."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

from nlgkd.loop import MAX_NONFINITE_STEPS, train
from nlgkd.config import TrainArgs
from nlgkd.runner import make_accelerator


def collate(rows):
    return {"x": torch.stack([r["x"] for r in rows]), "labels": torch.stack([r["labels"] for r in rows])}


DATA = [{"x": torch.full((4,), float(i)), "labels": torch.ones(1, dtype=torch.long)} for i in range(8)]


def run(tmp_path, nan_steps: set[int], evaluate=None, **args):
    """Train a Linear(4, 1) for a few steps; the loss is NaN on the (1-based) steps in `nan_steps`. Returns
    (result, weights after each step, log lines)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    calls, snapshots, lines = [0], [], []

    def compute_loss(model, batch, normalizer):
        calls[0] += 1
        snapshots.append(model.weight.detach().clone())  # the weights this step starts from
        loss = (model(batch["x"]) - 1.0).pow(2).sum() / normalizer
        return (loss * float("nan") if calls[0] in nan_steps else loss), {}

    settings = dict(max_steps=6, batch_size=2, lr=0.05, save_every=None, log_every=1, eval_every=3)
    settings.update(args)
    result = train(model=model, train_data=DATA, collate_fn=collate, compute_loss=compute_loss, evaluate=evaluate,
                   args=TrainArgs(**settings), accelerator=make_accelerator(), out_dir=tmp_path, seed=0,
                   log=lines.append)
    snapshots.append(model.weight.detach().clone())
    return result, snapshots, lines


def test_a_nan_step_is_skipped_and_training_goes_on(tmp_path):
    result, weights, lines = run(tmp_path, nan_steps={3})
    assert result.steps == 6
    assert torch.equal(weights[2], weights[3])  # step 3's update was not applied
    assert not torch.equal(weights[3], weights[4]) and torch.isfinite(weights[-1]).all()
    assert any("step 3: the loss or the gradient norm is not finite" in line for line in lines)


def test_a_run_of_nan_steps_stops_the_stage_with_what_to_change(tmp_path):
    nan_steps = set(range(2, 2 + MAX_NONFINITE_STEPS))
    with pytest.raises(ValueError, match=rf"training diverged: {MAX_NONFINITE_STEPS} steps in a row up to step "
                                         rf"{1 + MAX_NONFINITE_STEPS} .*lower lr \(now 0.05\).*mixed_precision: no"):
        run(tmp_path, nan_steps, max_steps=20)


def test_a_nan_validation_score_is_never_the_best(tmp_path):
    scores = iter([float("nan"), 2.0])
    result, _, lines = run(tmp_path, nan_steps=set(), evaluate=lambda model: {"val_loss": next(scores)})
    assert [h["val_loss"] for h in result.history][1] == 2.0
    assert result.best["val_loss"] == 2.0 and result.best["step"] == 6


def test_nan_gradients_are_caught_without_clipping(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    calls = [0]

    def compute_loss(model, batch, normalizer):  # a finite loss whose gradient is NaN on step 2
        calls[0] += 1
        weight = model.weight * (torch.tensor(float("nan")) if calls[0] == 2 else 1.0)
        loss = (batch["x"] @ weight.T - 1.0).pow(2).sum() / normalizer
        return torch.nan_to_num(loss.detach()) + loss - loss.detach(), {}

    train(model=model, train_data=DATA, collate_fn=collate, compute_loss=compute_loss, evaluate=None,
          args=TrainArgs(max_steps=4, batch_size=2, lr=0.05, save_every=None, log_every=1, max_grad_norm=0.0),
          accelerator=make_accelerator(), out_dir=tmp_path, seed=0, log=lambda line: None)
    assert torch.isfinite(model.weight).all()


def test_a_checkpoint_is_also_saved_by_time_and_counts_the_time_spent(tmp_path):
    from nlgkd.loop import latest_checkpoint

    # save_every: null, a checkpoint at most 1e-6 minutes apart, agreed every log_every = 2 steps
    run(tmp_path, nan_steps=set(), evaluate=None, save_every=None, save_every_minutes=1e-6, log_every=2)
    latest = latest_checkpoint(tmp_path / "checkpoints")
    assert latest.name == "step-4"  # steps 2 and 4; never at the last step
    elapsed = json.loads((latest / "trainer_state.json").read_text())["elapsed"]
    assert elapsed["wall"] > 0 and elapsed["cpu"] > 0
    result, _, _ = run(tmp_path, nan_steps=set())  # a new run in the same folder resumes from it
    assert result.resumed_from == 4 and result.earlier_seconds == {k: round(v, 2) for k, v in elapsed.items()}


def test_epochs_count_the_last_partial_accumulation_window(tmp_path):
    # 8 examples, batch 2: 4 batches an epoch; grad_accum 3: windows of 3 and 1 batches, 2 steps an epoch
    result, _, _ = run(tmp_path, nan_steps=set(), max_steps=None, epochs=2, grad_accum=3, eval_every=None)
    assert result.steps == 4 and result.epochs == 2.0


def padding_of(order: list[int], lengths: list[int], batch_size: int) -> int:
    blocks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in blocks)


def test_length_grouped_batches_are_a_permutation_with_less_padding_and_the_partial_one_last():
    from nlgkd.loop import length_grouped_order
    lengths = [int(x) for x in torch.randint(2, 60, (1003,), generator=torch.Generator().manual_seed(1))]
    order = length_grouped_order(lengths, 8, torch.Generator().manual_seed(0), pool_batches=10)
    assert sorted(order) == list(range(1003))                       # every example once
    assert order == length_grouped_order(lengths, 8, torch.Generator().manual_seed(0), pool_batches=10)  # resumable
    random_order = torch.randperm(1003, generator=torch.Generator().manual_seed(0)).tolist()
    assert padding_of(order, lengths, 8) < padding_of(random_order, lengths, 8) / 3
    # the pools are drawn at random: the batch lengths do not come out in sorted order
    firsts = [lengths[order[i]] for i in range(0, 1000, 8)]
    assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True)
    assert len(order) % 8 == 3 and len(set(order[-3:])) == 3        # 1003 = 125 x 8 + 3: the 3 at the end


def test_the_loader_cuts_batches_at_the_grouped_blocks():
    from nlgkd.loop import epoch_loader
    data = [{"source_ids": [1] * n, "target_ids": [2] * (n % 7 + 1), "n": n} for n in range(1, 101)]
    loader = epoch_loader(data, epoch=0, seed=3, batch_size=10, collate_fn=lambda rows: [r["n"] for r in rows],
                          accelerator=make_accelerator(), group_by_length=True)
    batches = list(loader)
    assert sorted(n for b in batches for n in b) == list(range(1, 101))
    # one pool of 50 batches holds all 100 examples: each batch is 10 neighbours in total length
    totals = [sorted(n + n % 7 + 1 for n in b) for b in batches]
    assert all(t[-1] - t[0] <= 16 for t in totals)


def tiny_seq2seq_run(tmp_path, **args):
    """Three steps of a tiny fresh mBART through the loop; returns (logged losses, final weights)."""
    from transformers import MBartConfig, MBartForConditionalGeneration
    from nlgkd.stages.training import cross_entropy_step
    from nlgkd.data import collate as collate_examples

    tmp_path.mkdir(parents=True)
    torch.manual_seed(0)
    config = MBartConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                         decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, pad_token_id=1,
                         eos_token_id=2, decoder_start_token_id=2, dropout=0.0)
    model = MBartForConditionalGeneration(config)
    rows = [{"source_ids": list(range(3, 3 + n)) + [2], "target_ids": list(range(10, 10 + n % 5 + 1)) + [2]}
            for n in range(1, 13)]
    settings = dict(max_steps=3, batch_size=4, lr=1e-3, save_every=None, log_every=1, eval_every=100)
    settings.update(args)
    train(model=model, train_data=rows, collate_fn=lambda ex: collate_examples(ex, pad_id=1, causal=False),
          compute_loss=cross_entropy_step, evaluate=None, args=TrainArgs(**settings),
          accelerator=make_accelerator(), out_dir=tmp_path, seed=0, log=lambda line: None)
    logged = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    return logged, torch.cat([p.detach().flatten() for p in model.parameters()])


COMPILE_CHECK = """
import json, sys
from pathlib import Path
import torch
sys.path.insert(0, sys.argv[2])
from test_loop import tiny_seq2seq_run

# torch.compile as the loop calls it, with the aot_eager backend: the same graphs (forward and backward traced
# by AOTAutograd) without inductor's C++ build, which takes minutes on a 2-core CPU (eval/bench_mfu.py
# --compile runs the real backend)
real_compile, calls = torch.compile, []

def compile_for_test(fn, **kwargs):
    calls.append(kwargs)
    return real_compile(fn, **{**kwargs, "backend": "aot_eager"})

torch.compile = compile_for_test
out = Path(sys.argv[1])
plain_losses, plain_weights = tiny_seq2seq_run(out / "plain")
calls_plain = list(calls)
fast_losses, fast_weights = tiny_seq2seq_run(out / "fast", compile=True, fused_adamw="yes")
more_weights = tiny_seq2seq_run(out / "more", max_steps=4)[1]
print(json.dumps({"calls_plain": calls_plain, "calls": calls, "plain": plain_losses, "fast": fast_losses,
                  "weight_diff": float((fast_weights - plain_weights).abs().max()),
                  "trains": not torch.equal(plain_weights, more_weights)}))
"""


def test_compile_and_fused_adamw_train_like_the_plain_step(tmp_path):
    # in a process of its own: compilation leaves threads behind, and a pytest worker that later forks
    # (the multi-process tests) must not inherit them
    done = subprocess.run([sys.executable, "-c", COMPILE_CHECK, str(tmp_path), str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["calls_plain"] == [] and result["calls"] == [{"dynamic": True}]
    assert len(result["plain"]) == len(result["fast"]) == 3
    assert result["fast"] == pytest.approx(result["plain"], rel=1e-4)
    assert result["weight_diff"] < 1e-5
    assert result["trains"]


@pytest.mark.parametrize("choice, device, fused", [("auto", "cpu", None), ("auto", "cuda", True), ("yes", "cpu", True),
                                                   ("no", "cuda", None)])
def test_fused_adamw_is_chosen_by_the_setting_and_the_device(choice, device, fused):
    from nlgkd.loop import make_optimizer
    model = torch.nn.Linear(4, 2)
    optimizer = make_optimizer(model, TrainArgs(fused_adamw=choice), torch.device(device))
    assert [group["fused"] for group in optimizer.param_groups] == [fused, fused]
    # biases and norms get no weight decay
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.01, 0.0]


@pytest.mark.parametrize("damaged", ["model.safetensors", "optimizer.bin", "trainer_state.json"])
def test_a_damaged_checkpoint_is_discarded_and_the_stage_starts_again(tmp_path, damaged):
    (tmp_path / "fresh").mkdir()
    (tmp_path / "killed").mkdir()
    fresh, fresh_weights, _ = run(tmp_path / "fresh", set(), max_steps=4, save_every=2)
    run(tmp_path / "killed", set(), max_steps=4, save_every=2)
    checkpoint = tmp_path / "killed" / "checkpoints" / "step-2"
    assert (checkpoint / damaged).exists()
    data = (checkpoint / damaged).read_bytes()
    (checkpoint / damaged).write_bytes(data[: len(data) // 2])  # a disk that filled up mid-write
    result, weights, lines = run(tmp_path / "killed", set(), max_steps=4, save_every=2)
    assert any(f"checkpoint step-2 is damaged ({damaged}:" in line and "starts from step 0" in line for line in lines)
    assert result.resumed_from is None and result.steps == 4
    assert torch.equal(weights[-1], fresh_weights[-1])  # trained from the start, as an uninterrupted run


def test_a_full_disk_at_a_checkpoint_names_the_folder_and_the_free_space(tmp_path, monkeypatch):
    from accelerate import Accelerator

    def full_disk(self, output_dir=None, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 128 vs 64")

    monkeypatch.setattr(Accelerator, "save_state", full_disk)
    with pytest.raises(OSError, match=r"could not write the checkpoint .*tmp-step-2 \(\[enforce fail.*MB are free "
                                      r"there: free some space and run again"):
        run(tmp_path, set(), max_steps=4, save_every=2)
    assert not (tmp_path / "checkpoints" / "tmp-step-2").exists()


def test_patience_on_a_higher_is_better_score_stops_and_keeps_the_best_weights(tmp_path):
    """BLEU rises, then falls: with patience 2 the loop stops two evaluations after the best one and ends
    holding the weights of that best step, not the last ones."""
    scores = iter([10.0, 20.0, 15.0, 14.0, 30.0, 31.0])
    result, weights, lines = run(tmp_path, nan_steps=set(), evaluate=lambda model: {"bleu": next(scores)},
                                 max_steps=6, eval_every=1, patience=2, early_stopping_metric="bleu")
    assert result.steps == 4 and result.stopped_early  # evaluations 15 and 14 did not beat 20
    assert result.best["step"] == 2 and result.best["bleu"] == 20.0
    # weights[k]: after step k (each step snapshots where it starts); the last entry: what the loop returned
    assert torch.equal(weights[-1], weights[2]) and not torch.equal(weights[3], weights[2])
    assert any("kept the best weights: step 2, bleu 20.0000" in line for line in lines)


def test_chrf_is_a_higher_is_better_score_too(tmp_path):
    scores = iter([50.0, 40.0, 30.0])
    result, _, _ = run(tmp_path, nan_steps=set(), evaluate=lambda model: {"chrf": next(scores)},
                       max_steps=6, eval_every=1, patience=2, early_stopping_metric="chrf")
    assert result.steps == 3 and result.best["step"] == 1


def test_the_learning_rate_warms_up_then_decays_linearly_to_zero(tmp_path):
    run(tmp_path, nan_steps=set(), max_steps=6, warmup_steps=2, lr=0.05)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lrs = [row["lr"] for row in logged if "lr" in row]
    # the lr the scheduler holds after step s (s = 1..6): warmup (s+1)/2 of the peak, then (6-s)/(6-2)
    expected = [0.05 * min((s + 1) / 2, (6 - s) / 4) if s < 2 else 0.05 * (6 - s) / 4 for s in range(1, 7)]
    assert lrs == pytest.approx(expected)


def gradients_before_each_update(optimizer_runs: Callable[[], None]) -> list[torch.Tensor]:
    """The gradients every optimizer step applies while `optimizer_runs()` trains (a global step pre-hook):
    AdamW would hide a wrongly scaled gradient, so tests compare these."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    seen = []
    handle = register_optimizer_step_pre_hook(lambda optimizer, args, kwargs: seen.append(torch.cat(
        [p.grad.flatten().clone() for group in optimizer.param_groups for p in group["params"] if p.grad is not None])))
    try:
        optimizer_runs()
    finally:
        handle.remove()
    return seen


def test_an_accumulated_step_equals_one_step_on_the_whole_batch(tmp_path):
    """grad_accum 2 of batch 2 and one batch of 4 see the same examples (the order is fixed by seed and epoch)
    and normalise by the token count of the whole window, so the gradient is the same, not the sum of two
    per-batch means."""
    for name in ("whole", "accumulated"):
        (tmp_path / name).mkdir()
    whole = gradients_before_each_update(lambda: run(tmp_path / "whole", nan_steps=set(), max_steps=1, batch_size=4,
                                                     grad_accum=1, max_grad_norm=0))
    accumulated = gradients_before_each_update(lambda: run(tmp_path / "accumulated", nan_steps=set(), max_steps=1,
                                                           batch_size=2, grad_accum=2, max_grad_norm=0))
    assert len(whole) == len(accumulated) == 1
    assert torch.allclose(whole[0], accumulated[0], atol=1e-6) and whole[0].abs().sum() > 0


def test_gradients_are_clipped_to_max_grad_norm_before_the_update(tmp_path):
    for name in ("clipped", "free"):
        (tmp_path / name).mkdir()
    clipped = [g.norm().item() for g in gradients_before_each_update(
        lambda: run(tmp_path / "clipped", nan_steps=set(), max_steps=3, max_grad_norm=0.01))]
    norms = [g.norm().item() for g in gradients_before_each_update(
        lambda: run(tmp_path / "free", nan_steps=set(), max_steps=3, max_grad_norm=0))]
    rows = (tmp_path / "clipped" / "metrics.jsonl").read_text().splitlines()
    logged = [json.loads(line)["grad_norm"] for line in rows]
    assert all(n == pytest.approx(0.01, rel=1e-4) for n in clipped)  # these gradients are far above 0.01
    assert all(n > 0.1 for n in norms) and logged[0] == pytest.approx(norms[0], rel=1e-5)  # the log: before clipping
