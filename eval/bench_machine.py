"""How fast and how steady is this machine? Times nlgkd's own training steps and a matmul.

A number of minutes measured on one machine says little about another: run this on both. It trains the
demo's teacher shape (a fresh mBART, d_model 128, 3+6 layers, on the demo task, batch 16) through
`nlgkd.loop.train`, the loop every training stage uses, and prints the median and p90 of the step times
(a steady machine has p90 close to the median; a VM that stalls does not), then the fp32 matmul rate.
It prints absolute figures, not ratios: what it measures is the machine.

    python eval/bench_machine.py [--threads 2] [--steps 60]
"""
import argparse
import statistics
import time

import torch

from common import loop_step_seconds
from nlgkd.config import DataConfig, DemoSizes, ModelConfig, TrainArgs
from nlgkd.data import encode, load_splits
from nlgkd.models import build_fresh
from nlgkd.stages.training import make_collator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    data, _ = load_splits(DataConfig(task="demo", demo=DemoSizes(train=500, validation=0, test=0, unlabeled=0)))
    texts = list(data["train"]["source"]) + list(data["train"]["target"])
    model, tokenizer = build_fresh(ModelConfig(arch="mbart", d_model=128, encoder_layers=3, decoder_layers=6,
                                               attention_heads=4, ffn_dim=512, vocab_size=800), texts, seed=0)
    encoded, _ = encode(data["train"], tokenizer, 64, 64)

    step_seconds = loop_step_seconds(model, encoded, make_collator(model, tokenizer), TrainArgs(
        max_steps=args.steps + 1, batch_size=16, lr=1e-3, save_every=None, save_every_minutes=None, log_every=1000))
    median, p90 = statistics.median(step_seconds), statistics.quantiles(step_seconds, n=10)[-1]

    matrix = torch.randn(512, 512)
    start = time.perf_counter()
    for _ in range(20):
        matrix @ matrix
    gflops = 20 * 2 * 512**3 / (time.perf_counter() - start) / 1e9

    print(f"nlgkd training step, the demo teacher's shape ({args.threads} threads, batch 16): median "
          f"{median * 1e3:.0f} ms, p90 {p90 * 1e3:.0f} ms (p90/median {p90 / median:.1f}), {len(step_seconds)} steps "
          f"in {sum(step_seconds):.1f} s")
    print(f"512x512 fp32 matmul: {gflops:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
