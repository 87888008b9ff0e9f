"""Benchmark: a training step with `group_by_length: true` vs random batches, side by side in one run.

Both train the same fresh mBART through `nlgkd.loop.train` (the loop every training stage uses) on the same
examples; the methods take turns (rounds of `--steps` steps each), so background load hits them alike. It
prints the median step time of each, their ratio, and the share of each batch that is padding.

    python eval/bench_group_by_length.py [--data ../shared/data/shakespeare] [--threads 1] [--steps 20]

Without --data it uses the demo task's generated pairs (shorter and more even than real text, so the gain is
smaller); with --data, a folder holding train.jsonl with columns original and modern (the Shakespeare data).
"""
import argparse
import copy
import statistics

import torch

from common import loop_step_seconds
from nlgkd.config import DataConfig, DemoSizes, ModelConfig, TrainArgs
from nlgkd.data import encode, load_splits
from nlgkd.models import build_fresh
from nlgkd.stages.training import make_collator


def load(data_dir: str | None):
    if data_dir is None:
        return load_splits(DataConfig(task="demo", demo=DemoSizes(train=2000, validation=0, test=0, unlabeled=0)))[0]
    return load_splits(DataConfig(dir=data_dir, train="train.jsonl", source="original", target="modern"))[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="folder with train.jsonl (columns original, modern)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20, help="steps per turn")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    splits = load(args.data)
    texts = list(splits["train"]["source"]) + list(splits["train"]["target"])
    model, tokenizer = build_fresh(ModelConfig(arch="mbart", d_model=256, encoder_layers=3, decoder_layers=3,
                                               attention_heads=4, ffn_dim=1024, vocab_size=4000), texts, seed=0)
    encoded, _ = encode(splits["train"], tokenizer, 64, 64)
    collate = make_collator(model, tokenizer)

    seconds = {False: [], True: []}
    padding = {False: [], True: []}
    for round_index in range(args.rounds):
        for grouped in (False, True):
            def count_padding(batch):
                real = int(batch["attention_mask"].sum()) + int((batch["labels"] != -100).sum())
                padding[grouped].append(1 - real / (batch["input_ids"].numel() + batch["labels"].numel()))

            seconds[grouped] += loop_step_seconds(
                copy.deepcopy(model), encoded, collate,
                TrainArgs(max_steps=args.steps + 1, batch_size=args.batch_size, lr=1e-3, save_every=None,
                          save_every_minutes=None, log_every=1000, group_by_length=grouped),
                seed=round_index, on_batch=count_padding)

    name = args.data or "the demo task"
    for grouped, label in ((False, "random batches"), (True, "group_by_length")):
        print(f"{label:16s} median {statistics.median(seconds[grouped]) * 1e3:7.0f} ms/step, "
              f"padding {100 * statistics.mean(padding[grouped]):4.1f}% of the batch tokens")
    ratio = statistics.median(seconds[False]) / statistics.median(seconds[True])
    print(f"group_by_length is {ratio:.2f}x as fast per step ({name}, batch {args.batch_size}, "
          f"{args.threads} thread(s), {args.rounds} x {args.steps} steps each, taking turns)")


if __name__ == "__main__":
    main()
