"""What does word-level KD cost over plain fine-tuning? One run, methods measured side by side.

    python eval/bench_kd_step.py                 # --size small: CPU friendly, about a minute on 2 cores
    python eval/bench_kd_step.py --size large    # vocab 32000, length 128, batch 16
    python eval/bench_kd_step.py --device cuda
    python eval/bench_kd_step.py --threads 1 --teacher-dtype bf16

Methods (tiny BART-like student and teacher built from configs, d_model 256, random tokens):
  ce       student forward + nlgkd.losses.cross_entropy_loss + backward
  teacher  teacher forward under torch.inference_mode
  kd       student forward + teacher forward (inference mode) + nlgkd.losses.kd_loss (forward KL, T=2)
           + backward
  naive    the same step with the textbook loss: full fp32 log_softmax of both sides and F.kl_div
No optimizer step in any of them (it costs the same everywhere). Gradients are set to None before each
step so every step allocates its gradients afresh. The teacher runs in --teacher-dtype (bf16 halves
its logits, the one extra batch x length x vocab tensor a KD step must hold); the student is fp32.
Attention is "eager": torch's CPU SDPA backward is very slow at these shapes and would dominate.

Time: median wall time per step over --repeats steps after --warmup steps; the methods take turns
(round robin) so that background load hits them alike.

Peak memory: on CUDA, torch.cuda.max_memory_allocated during one step minus the memory allocated
before it (models, inputs). On CPU, torch has no allocation counter, so each method runs in a fresh
subprocess with glibc's MALLOC_MMAP_THRESHOLD_=65536: every allocation of 64 KiB or more is its own
mmap, returned to the OS when freed, so the resident set size follows live tensor memory. The
subprocess runs one warmup step, resets the kernel's peak-RSS counter (/proc/self/clear_refs) and
reports VmHWM - VmRSS around one step: the peak extra memory the step needed, tensors plus allocator
and thread overhead. Where clear_refs is not available it falls back to the growth of ru_maxrss.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
import transformers

import nlgkd.losses

SIZES = {
    "small": {"vocab": 8000, "length": 64, "batch": 8},
    "large": {"vocab": 32000, "length": 128, "batch": 16},
}
METHODS = ("ce", "teacher", "kd", "naive")
TEMPERATURE = 2.0


def build(size: str, device: str, teacher_dtype: str = "fp32"):
    """Student, teacher and one batch; the same seed gives the same setup in every process."""
    cfg = SIZES[size]
    torch.manual_seed(0)

    def bart(layers: int, ffn: int):
        config = transformers.BartConfig(
            vocab_size=cfg["vocab"], d_model=256, encoder_layers=layers, decoder_layers=layers,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn,
            max_position_embeddings=cfg["length"] + 2, dropout=0.0, attention_dropout=0.0,
            pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
        )
        config._attn_implementation = "eager"
        return transformers.BartForConditionalGeneration(config).to(device)

    student = bart(layers=2, ffn=1024).train()
    teacher = bart(layers=4, ffn=1024).eval().to(torch.bfloat16 if teacher_dtype == "bf16" else torch.float32)
    for p in teacher.parameters():
        p.requires_grad_(False)
    B, T, V = cfg["batch"], cfg["length"], cfg["vocab"]
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]  # padded targets, as in a real batch
    labels = torch.randint(3, V, (B, T), generator=g).masked_fill(~mask, -100)
    batch = {
        "input_ids": torch.randint(3, V, (B, T), generator=g).to(device),
        "attention_mask": torch.ones(B, T, dtype=torch.long).to(device),
        "decoder_input_ids": torch.randint(3, V, (B, T), generator=g).to(device),
        "decoder_attention_mask": mask.long().to(device),
    }
    return student, teacher, batch, labels.to(device), mask.to(device)


def make_steps(student, teacher, batch, labels, mask):
    """One closure per method; each runs a full step and returns nothing."""

    def zero_grad():
        for p in student.parameters():
            p.grad = None

    def teacher_logits():
        with torch.inference_mode():
            return teacher(**batch).logits

    def ce():
        zero_grad()
        logits = student(**batch).logits
        nlgkd.losses.cross_entropy_loss(logits, labels).backward()

    def kd():
        zero_grad()
        logits = student(**batch).logits
        t_logits = teacher_logits()
        loss = nlgkd.losses.kd_loss(logits, t_logits, mask, temperature=TEMPERATURE)
        del t_logits  # the loss keeps only the student gradient, not the teacher logits
        loss.backward()

    def naive():
        zero_grad()
        logits = student(**batch).logits
        t_logits = teacher_logits().clone()  # a normal tensor, so autograd may save it
        log_ps = F.log_softmax(logits.float() / TEMPERATURE, dim=-1)
        log_pt = F.log_softmax(t_logits.float() / TEMPERATURE, dim=-1)
        per_token = F.kl_div(log_ps, log_pt, reduction="none", log_target=True).sum(-1)
        loss = (per_token * mask).sum() / mask.sum() * TEMPERATURE**2
        loss.backward()

    return {"ce": ce, "teacher": teacher_logits, "kd": kd, "naive": naive}


def sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(steps, device: str, warmup: int, repeats: int) -> dict[str, tuple[float, float]]:
    """Median (wall seconds, process CPU seconds) per method; the methods take turns."""
    for _ in range(warmup):
        for name in METHODS:
            steps[name]()
    times = {name: [] for name in METHODS}
    for _ in range(repeats):
        for name in METHODS:
            sync(device)
            wall, cpu = time.perf_counter(), time.process_time()
            steps[name]()
            sync(device)
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {
        name: (statistics.median(w for w, _ in values), statistics.median(c for _, c in values))
        for name, values in times.items()
    }


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_memory_here(step, device: str) -> tuple[int, str]:
    """Peak extra bytes of one step in this process (after one warmup step), and how it was measured."""
    step()
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, "torch.cuda.max_memory_allocated growth"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM (peak RSS) to the current RSS
        before = _proc_status_kib("VmRSS")
        step()
        return (_proc_status_kib("VmHWM") - before) * 1024, "peak RSS growth (VmHWM - VmRSS)"
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        step()
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        return grown * 1024, "ru_maxrss growth (a lower bound)"


def peak_memories(args) -> tuple[dict[str, int], str]:
    """Peak extra bytes per method. On CPU, measured in one child process with a fixed mmap threshold."""
    if args.device == "cuda" or args.memory_child:
        steps = make_steps(*build(args.size, args.device, args.teacher_dtype))
        peaks = {}
        for name in METHODS:
            peaks[name], how = peak_memory_here(steps[name], args.device)
        return peaks, how
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [
        sys.executable, os.path.abspath(__file__), "--size", args.size, "--device", args.device,
        "--teacher-dtype", args.teacher_dtype, "--threads", str(torch.get_num_threads()), "--_memory-child",
    ]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return result["peaks"], result["how"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--teacher-dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--_memory-child", dest="memory_child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.memory_child:  # the child process of peak_memories on CPU
        peaks, how = peak_memories(args)
        print(json.dumps({"peaks": peaks, "how": how}))
        return

    cfg = SIZES[args.size]
    print(
        f"size={args.size} vocab={cfg['vocab']} length={cfg['length']} batch={cfg['batch']} d_model=256 "
        f"teacher={args.teacher_dtype} device={args.device} threads={torch.get_num_threads()} "
        f"torch={torch.__version__} transformers={transformers.__version__}"
    )
    steps = make_steps(*build(args.size, args.device, args.teacher_dtype))
    times = time_steps(steps, args.device, args.warmup, args.repeats)
    del steps
    gc.collect()
    peaks, how = peak_memories(args)

    logits_mib = cfg["batch"] * cfg["length"] * cfg["vocab"] * 4 / 2**20
    print(f"time: median of {args.repeats} steps after {args.warmup} warmup (wall, and process CPU time)")
    print(f"peak memory: {how} during one step; one fp32 batch x length x vocab tensor = {logits_mib:.1f} MiB")
    labels = {
        "ce": "(a) student CE train step",
        "teacher": "(b) teacher forward, inference mode",
        "kd": "(c) logits KD train step (ours)",
        "naive": "(d) naive KD train step",
    }
    print(f"{'method':38s} {'wall/step':>10s} {'cpu/step':>10s} {'peak MiB':>9s}")
    for name in METHODS:
        wall, cpu = times[name]
        print(f"{labels[name]:38s} {wall * 1e3:8.1f}ms {cpu * 1e3:8.1f}ms {peaks[name] / 2**20:9.1f}")

    def ratio(i):
        return times["kd"][i] / (times["ce"][i] + times["teacher"][i])

    print(f"KD time / (CE + teacher fwd) time = {ratio(0):.3f} wall, {ratio(1):.3f} cpu  (target <= 1.15)")
    print(f"KD peak / CE peak                 = {peaks['kd'] / peaks['ce']:.3f}  (target <= 1.3)")
    print(
        f"naive / ours: time {times['naive'][0] / times['kd'][0]:.3f} wall, "
        f"{times['naive'][1] / times['kd'][1]:.3f} cpu; peak {peaks['naive'] / peaks['kd']:.3f}"
    )


if __name__ == "__main__":
    main()
