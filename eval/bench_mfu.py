"""Model FLOPs utilisation of nlgkd's KD training step, eager vs `compile: true` + fused AdamW, side by side.

    python eval/bench_mfu.py --size large --device cuda     # BART-large shape: 12+12 -> 12+2, bf16, 32 x 128
    python eval/bench_mfu.py                                # --size small on the CPU (minutes on 2 cores)

The step is the one every distill stage runs: `nlgkd.loop.train_step` (autocast, backward, clipping, the
update and its host syncs) with the loss of `nlgkd.stages.distill_loss.make_loss` (logits KD, forward KL) and
the optimizer of `nlgkd.loop.make_optimizer`; `--compile` variants wrap the loss with `nlgkd.loop.maybe_compiled`
exactly as `compile: true` does. Fresh models from configs, random tokens (no download): the student is the
teacher with its decoder cut to 2 layers (`large`: 12+12 -> 12+2, d_model 1024, vocabulary 50,265, batch 32,
source and target length 128).

Model FLOPs per step: 3 x the student's forward (forward + backward) + the teacher's forward, counting the
matrix products of every layer, attention's two products and the LM head (`forward_flops`). MFU = those FLOPs /
median step time / the device's peak: --peak-tflops, or on a GPU the dense bf16 peak of a card named below,
or on a CPU the fp32 matmul rate this script measures (so a CPU figure says how much of its own matmul speed
the step reaches). The variants take turns, so background load hits them alike.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import transformers

from nlgkd.config import DistillConfig
from nlgkd.loop import make_optimizer, maybe_compiled, resolve_precision, train_step
from nlgkd.runner import make_accelerator
from nlgkd.stages.distill_loss import StudentWithProjections, make_loss

SIZES = {
    "large": dict(d_model=1024, heads=16, ffn=4096, vocab=50265, encoder_layers=12, teacher_decoder=12,
                  student_decoder=2, batch=32, length=128),
    "small": dict(d_model=256, heads=4, ffn=1024, vocab=8000, encoder_layers=3, teacher_decoder=3,
                  student_decoder=1, batch=16, length=64),
    # the flow only (eval/gpu_check.sh SMOKE=1 on a CPU): no meaningful utilisation
    "tiny": dict(d_model=32, heads=2, ffn=64, vocab=300, encoder_layers=1, teacher_decoder=2,
                 student_decoder=1, batch=4, length=16),
}
# dense bf16 peaks (TFLOP/s) from the vendors' data sheets, matched against torch.cuda.get_device_name()
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def bart(size: dict, decoder_layers: int) -> transformers.BartForConditionalGeneration:
    config = transformers.BartConfig(
        vocab_size=size["vocab"], d_model=size["d_model"], encoder_layers=size["encoder_layers"],
        decoder_layers=decoder_layers, encoder_attention_heads=size["heads"], decoder_attention_heads=size["heads"],
        encoder_ffn_dim=size["ffn"], decoder_ffn_dim=size["ffn"], max_position_embeddings=size["length"] + 2,
        dropout=0.0, attention_dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
    return transformers.BartForConditionalGeneration(config)


def forward_flops(size: dict, decoder_layers: int) -> float:
    """Matrix-product FLOPs of one forward pass over a batch (2 per multiply-add)."""
    d, f, n, length = size["d_model"], size["ffn"], size["batch"], size["length"]
    tokens = n * length
    attention = 2 * 2 * length * d                       # QK^T and AV, per token, per attention block
    encoder = size["encoder_layers"] * tokens * (2 * (4 * d * d + 2 * d * f) + attention)
    # decoder: self-attention, cross-attention (its K/V projections run over the source tokens), feed-forward
    decoder = decoder_layers * tokens * (2 * (4 * d * d + 4 * d * d + 2 * d * f) + 2 * attention)
    lm_head = tokens * 2 * d * size["vocab"]
    return encoder + decoder + lm_head


def peak_flops(device: torch.device, given: float | None) -> tuple[float, str]:
    if given:
        return given * 1e12, f"--peak-tflops {given}"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12, f"{name}: dense bf16 peak {tflops} TFLOP/s"
        raise SystemExit(f"no known peak for {name!r}: pass --peak-tflops")
    a = torch.randn(1024, 1024)
    a @ a
    start = time.perf_counter()
    for _ in range(10):
        a @ a
    rate = 10 * 2 * 1024 ** 3 / (time.perf_counter() - start)
    return rate, f"this CPU's measured fp32 matmul rate, {rate / 1e9:.0f} GFLOP/s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant (compilation happens here)")
    parser.add_argument("--peak-tflops", type=float, default=None)
    args = parser.parse_args()
    size = SIZES[args.size]
    accelerator = make_accelerator()
    device = accelerator.device if args.device == "cuda" else torch.device("cpu")

    torch.manual_seed(0)
    teacher = bart(size, size["teacher_decoder"]).to(device).eval()
    teacher.requires_grad_(False)
    dtype = resolve_precision("auto", device)
    if dtype is not None:
        teacher.to(dtype)  # a bf16 teacher, as resolve_teacher_dtype gives distill stages on such GPUs
    n, length, vocab = size["batch"], size["length"], size["vocab"]
    window = [{"input_ids": torch.randint(3, vocab, (n, length), device=device),
               "attention_mask": torch.ones(n, length, dtype=torch.long, device=device),
               "labels": torch.randint(3, vocab, (n, length), device=device)}]

    variants = {"eager, foreach AdamW": dict(compile=False, fused_adamw="no"),
                "compile + fused AdamW": dict(compile=True, fused_adamw="yes")}
    runs = {}
    for label, options in variants.items():
        cfg = DistillConfig(student="student", teacher="teacher", objective="logits_kd", batch_size=n, lr=1e-4,
                            **options)
        torch.manual_seed(1)
        student = bart(size, size["student_decoder"]).to(device).train()
        module = StudentWithProjections(student, {})
        runs[label] = dict(module=module, optimizer=make_optimizer(module, cfg, device), cfg=cfg,
                           loss=maybe_compiled(make_loss(cfg, [teacher], causal=False), cfg), times=[])

    def step(run):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        train_step(run["module"], run["optimizer"], window, run["loss"], run["cfg"], accelerator, dtype)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for run in runs.values():
        for _ in range(args.warmup):
            step(run)
    for _ in range(args.steps):
        for run in runs.values():  # taking turns
            run["times"].append(step(run))

    flops = 3 * forward_flops(size, size["student_decoder"]) + forward_flops(size, size["teacher_decoder"])
    peak, peak_said = peak_flops(device, args.peak_tflops)
    print(f"KD step, {args.size} ({size['encoder_layers']}+{size['teacher_decoder']} -> "
          f"{size['encoder_layers']}+{size['student_decoder']}, d_model {size['d_model']}, batch {n} x {length}), "
          f"{device.type}, {'bf16' if dtype is not None else 'fp32'}: {flops / 1e12:.2f} TFLOP per step")
    summary = {}
    for label, run in runs.items():
        median = statistics.median(run["times"])
        mfu = flops / median / peak
        print(f"  {label:24s} {median * 1e3:8.1f} ms/step  {flops / median / 1e12:7.2f} TFLOP/s  MFU {100 * mfu:5.1f}%")
        summary[label] = {"ms_per_step": median * 1e3, "mfu": mfu}
    labels = list(runs)
    print(f"compile + fused AdamW / eager: {statistics.median(runs[labels[0]]['times']) / statistics.median(runs[labels[1]]['times']):.2f}x "
          f"as fast; peak: {peak_said}; goal on an H100/H200: MFU >= 40%")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
