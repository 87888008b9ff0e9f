"""How fast and how steady is this machine? Times training steps of a tiny T5 and a matmul.

A number of minutes measured on one machine says little about another: run this on both. It prints the
median and p90 of 60 identical training steps (a steady machine has p90 close to the median; a VM that
stalls does not) and the fp32 matmul rate.

    python eval/bench_machine.py [--threads 2] [--steps 60]
"""
import argparse
import statistics
import time

import torch
from transformers import T5Config, T5ForConditionalGeneration


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    # the shape of recipes/demo.yaml's teacher: d_model 128, 3+3 layers, 4 heads, vocabulary 800
    config = T5Config(vocab_size=800, d_model=128, d_kv=32, d_ff=256, num_layers=3, num_decoder_layers=3,
                      num_heads=4, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)
    model = T5ForConditionalGeneration(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sources = torch.randint(1, 800, (16, 40))
    targets = torch.randint(1, 800, (16, 20))
    step_seconds = []
    for _ in range(args.steps):
        start = time.perf_counter()
        model(input_ids=sources, labels=targets).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        step_seconds.append(time.perf_counter() - start)
    median, p90 = statistics.median(step_seconds), statistics.quantiles(step_seconds, n=10)[-1]

    matrix = torch.randn(512, 512)
    start = time.perf_counter()
    for _ in range(20):
        matrix @ matrix
    gflops = 20 * 2 * 512**3 / (time.perf_counter() - start) / 1e9

    print(f"tiny T5 training step ({args.threads} threads, batch 16 x 40 tokens): median {median * 1e3:.0f} ms, "
          f"p90 {p90 * 1e3:.0f} ms (p90/median {p90 / median:.1f}), {args.steps} steps in {sum(step_seconds):.1f} s")
    print(f"512x512 fp32 matmul: {gflops:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
