"""Pseudo-targets through CTranslate2 vs transformers: generation speed side by side, and the student distilled
from each engine's PTs with the same steps (speed at equal quality).

    python eval/bench_pt_engine.py                                  # the demo: speed, then the three students
    python eval/bench_pt_engine.py --speed-only --teacher runs/own_data/teacher --student runs/own_data/student \\
        --data ../shared/data/shakespeare --source-column original --target-column modern   # another teacher

Speed. The teacher (default: the demo's, from RUNS_DIR/demo, trained first if missing) writes PTs for --inputs
sources (the demo's train and unlabeled inputs, or the --data folder's train.jsonl and unlabeled.jsonl) with the
two PT decodings the shipped recipes use: sampling (top_p 0.95, K = 2: recipes/demo.yaml) and beam search (4
beams, K = 1: recipes/own_data.yaml). Methods: transformers (PyTorch `generate`), CTranslate2 float32 and
CTranslate2 int8 (the teacher converted with `nlgkd export`), all through `nlgkd.generation.generate` (the
PT stage's length-bucketed batches). They take turns for --rounds rounds, so background load hits them alike;
the median sequences/s and the ratio to transformers are printed, and the share of PTs equal to transformers'
(beam; float32 should be ~100%). Threads: --threads (default 2), the same for both engines.

Quality (the demo, skipped with --speed-only). Three pseudo_targets stages with the demo's PT decoding (engine
transformers, ctranslate2 float32, ctranslate2 int8), a distill stage from each with the demo's distill settings
(same student, steps, batch and lr), one evaluate stage of the three on the test split. Goal (issue 31): engine
PTs >= 4x transformers at 2 threads, and the student from them within 0.5 BLEU of the one from transformers PTs.
Encoder reuse (the demo's student and teacher). A distill step (logits KD and gold cross-entropy, forward and
backward) on 32 targets, K = 1, 2, 4 per source: every target re-encodes its source (pt_schedule: all) vs each
source encoded once (all_together); the methods take turns, median ms and the ratio. Goal: <= 0.6x at K = 4.
With --device cuda (a GPU): CTranslate2 float16 and int8_float16 against transformers in bf16, the card named;
the encoder-reuse step on the GPU too (float32).
Needs the export extra (pip install -e ".[export]").
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

# nlgkd (here through common) before torch: it loads CTranslate2's OpenMP runtime first (nlgkd/__init__.py)
from common import ROOT, demo_with

import torch
import yaml

DECODINGS = {
    "sample K=2": {"strategy": "sample", "top_p": 0.95, "num_return_sequences": 2, "batch_size": 64,
                   "max_new_tokens": 48},
    "beam 4": {"strategy": "beam", "num_beams": 4, "num_return_sequences": 1, "batch_size": 64,
               "max_new_tokens": 48},
}
QUANTIZATIONS = ("float32", "int8")  # the demo's students (quality) and the CPU's speed rows
# the speed rows on a GPU: CTranslate2 float16 and int8_float16 against transformers in bf16
SPEED_QUANTIZATIONS = {"cpu": QUANTIZATIONS, "cuda": ("float16", "int8_float16")}


def read_sources(data: Path, column: str, n: int) -> list[str]:
    """The first `n` sources of data/train.jsonl then data/unlabeled.jsonl (`column` holds the input)."""
    texts = []
    for name in ("train.jsonl", "unlabeled.jsonl"):
        path = data / name
        if path.exists():
            texts += [json.loads(line)[column] for line in path.read_text(encoding="utf-8").splitlines() if line]
    return texts[:n]


def read_pairs(data: Path, source: str, target: str, n: int) -> list[dict]:
    """The first `n` (source, target) pairs of data/train.jsonl."""
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text(encoding="utf-8").splitlines() if line]
    return [{"source": r[source], "target": r[target]} for r in rows[:n]]


def demo_sources(runner, n: int) -> list[str]:
    """The first `n` of the demo's train then unlabeled sources (as the demo's PT stage reads them)."""
    data = runner.data()
    return (list(data["train"]["source"]) + list(data["unlabeled"]["source"]))[:n]


def timed_decode(folder: str, engine: bool, source_ids: list[list[int]], fields: dict, threads: int,
                 device: str = "cpu"):
    """(seconds, outputs) of one `generate` over `source_ids` by the model in `folder`, in this process: run in a
    fresh process per measurement. One CTranslate2 int8 engine, once loaded, slowed every engine made later in the
    same process (float32 404 -> 171 seq/s on this CPU), and torch's OpenMP runtime loaded first halved them too."""
    from nlgkd.config import DecodingConfig  # nlgkd first: it loads CTranslate2 before torch
    from nlgkd.engine import EngineModel
    from nlgkd.generation import generate
    from nlgkd.models import load_pretrained

    import torch
    from accelerate import Accelerator

    torch.set_num_threads(threads)
    if engine:  # as the PT stage decodes: an engine per sampling call
        model = EngineModel(folder, device=device, reseed_per_call=True)
        tokenizer = model.tokenizer
    else:
        model, tokenizer = load_pretrained(folder)
        model.to(device, dtype=torch.bfloat16 if device == "cuda" else torch.float32).eval()
    started = time.perf_counter()
    outputs = generate(model, tokenizer, source_ids, DecodingConfig(**fields), Accelerator(cpu=device == "cpu"),
                       seed=0, progress=False)
    return time.perf_counter() - started, outputs


def speed(teacher_dir: Path, sources: list[str], rounds: int, device: str = "cpu") -> None:
    import multiprocessing

    from nlgkd.data import truncate
    from nlgkd.export import export_model
    from nlgkd.models import load_pretrained

    model, tokenizer = load_pretrained(str(teacher_dir))
    source_ids = [truncate(ids, 64) for ids in tokenizer(sources)["input_ids"]]
    threads = torch.get_num_threads()
    spawn = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        baseline = "transformers" + (" bf16" if device == "cuda" else "")
        methods = {baseline: (str(teacher_dir), False)}
        for quantization in SPEED_QUANTIZATIONS[device]:
            export_model(teacher_dir, Path(tmp) / quantization, quantization=quantization)
            methods[f"ctranslate2 {quantization}"] = (str(Path(tmp) / quantization), True)
        where = torch.cuda.get_device_name() if device == "cuda" else f"{threads} CPU thread(s)"
        print(f"teacher {teacher_dir} ({model.num_parameters():,} parameters), {len(source_ids)} inputs, "
              f"{where}, each measurement in a fresh process")
        for label, fields in DECODINGS.items():
            seconds: dict[str, list[float]] = {name: [] for name in methods}
            outputs = {}
            for _ in range(rounds):
                for name, (folder, engine) in methods.items():  # the methods take turns
                    with spawn.Pool(1) as pool:
                        elapsed, outputs[name] = pool.apply(timed_decode, (folder, engine, source_ids, fields, threads,
                                                                          device))
                    seconds[name].append(elapsed)
            k = fields["num_return_sequences"]
            sequences = len(source_ids) * k
            base = sequences / statistics.median(seconds[baseline])
            print(f"\n{label}:")
            for name in methods:
                rate = sequences / statistics.median(seconds[name])
                same = sum(a == b for a, b in zip(outputs[name], outputs[baseline])) / len(source_ids)
                agreement = (f"  {100 * same:5.1f}% of inputs' PTs equal transformers'"
                             if fields["strategy"] != "sample" else "")
                print(f"  {name:20s} {rate:8.1f} seq/s  {rate / base:5.2f}x{agreement}")


def quality(runs_dir: str, overrides: list[str]) -> None:
    raw = yaml.safe_load((ROOT / "recipes" / "demo.yaml").read_text())
    by_name = {s["name"]: s for s in raw["stages"]}
    stages, students = [], []
    for engine in ("transformers", *(f"ctranslate2 {q}" for q in QUANTIZATIONS)):
        suffix = "" if engine == "transformers" else "_" + engine.split()[1]
        pts = {**copy.deepcopy(by_name["pts"]), "name": f"pts{suffix}"}
        if engine != "transformers":
            pts.update(engine="ctranslate2", engine_quantization=engine.split()[1])
        distill = {**copy.deepcopy(by_name["distill"]), "name": f"distill{suffix}", "pseudo_targets": [pts["name"]]}
        stages += [pts, distill]
        students.append(distill["name"])
    stages.append({"name": "bench_pt_engine_eval", "kind": "evaluate", "models": students, "timing_passes": 0,
                   "decoding": copy.deepcopy(by_name["eval"]["decoding"])})
    runner = demo_with(stages, runs_dir=runs_dir, overrides=overrides)
    metrics = json.loads((runner.run_dir / "bench_pt_engine_eval" / "metrics.json").read_text())
    print("\nstudents distilled from each engine's PTs (demo distill settings, same steps), test split:")
    for pts_name, student in zip([s["name"] for s in stages if s["kind"] == "pseudo_targets"], students):
        record = json.loads((runner.run_dir / pts_name / "stage.json").read_text())["pseudo_targets"]
        bleu = metrics[student]["bleu"]
        print(f"  {student:17s} BLEU {bleu:6.2f} ({bleu - metrics[students[0]]['bleu']:+.2f})"
              f"   its PTs: {record.get('engine', 'transformers'):20s} {record['seconds']:7.1f} s "
              f"({record['sequences_per_s']:.1f} seq/s, generation and scoring, as the stage ran)")


def encoder_reuse(student_dir: Path, teacher_dir: Path, pairs: list[dict], rounds: int, rows: int = 32,
                  device: str = "cpu") -> None:
    """A distill step (logits KD + gold CE, forward and backward) of the student against the teacher on `rows`
    targets, K per source (`pairs`: source and target texts), each source re-encoded per target (pt_schedule:
    all) vs encoded once (all_together)."""
    import datasets

    from nlgkd.config import DistillConfig
    from nlgkd.data import collate, encode
    from nlgkd.models import load_pretrained
    from nlgkd.stages.distill_loss import StudentWithProjections, make_loss

    rows = min(rows, len(pairs) // 2)  # sources from the first half of the pairs, targets from the second
    student, tokenizer = load_pretrained(str(student_dir))
    teacher, _ = load_pretrained(str(teacher_dir))
    student.to(device)
    teacher.to(device).eval()
    encoded = list(encode(datasets.Dataset.from_list(pairs[: 2 * rows]), tokenizer, 64, 64)[0])
    model = StudentWithProjections(student, {})
    print(f"\ndistill step, {rows} targets per batch, K per source (student {student.num_parameters():,}, "
          f"teacher {teacher.num_parameters():,} parameters):")
    for k in (1, 2, 4):
        examples = [{"source_ids": encoded[i // k]["source_ids"], "target_ids": encoded[rows + i]["target_ids"]}
                    for i in range(rows)]
        batch = {key: value.to(device) for key, value in
                 collate(examples, pad_id=tokenizer.pad_token_id, causal=False).items()}
        normalizer = (batch["labels"] != -100).sum()
        losses = {schedule: make_loss(DistillConfig(student="student", teacher="teacher", objective="logits_kd",
                                                    pt_schedule=schedule), [teacher], causal=False)
                  for schedule in ("all", "all_together")}
        seconds: dict[str, list[float]] = {schedule: [] for schedule in losses}
        for _ in range(rounds * 5):
            for schedule, compute_loss in losses.items():  # the two take turns
                started = time.perf_counter()
                loss, _ = compute_loss(model, batch, normalizer)
                loss.backward()
                if device == "cuda":
                    torch.cuda.synchronize()
                seconds[schedule].append(time.perf_counter() - started)
                model.zero_grad(set_to_none=True)
        ratio = statistics.median(seconds["all_together"]) / statistics.median(seconds["all"])
        print(f"  K = {k}: re-encoding {1000 * statistics.median(seconds['all']):7.1f} ms, encoded once "
              f"{1000 * statistics.median(seconds['all_together']):7.1f} ms: {ratio:.2f}x (goal at K = 4: <= 0.6x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--teacher", help="a teacher folder (default: RUNS_DIR/demo/teacher)")
    parser.add_argument("--data", type=Path, help="a data folder whose train/unlabeled.jsonl sources to decode")
    parser.add_argument("--source-column", default="source")
    parser.add_argument("--target-column", default="target")
    parser.add_argument("--student", help="with --teacher and --data: time encoder reuse on this student too")
    parser.add_argument("--inputs", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--speed-only", action="store_true")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: CTranslate2 float16 and int8_float16 against transformers in bf16")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override the demo recipe (a smoke run shrinks it)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runner = None
    if args.teacher is None or args.data is None or not args.speed_only:
        runner = demo_with([], runs_dir=args.runs_dir, overrides=args.set)  # the demo's teacher, trained if missing
    teacher = Path(args.teacher) if args.teacher else runner.run_dir / "teacher"
    sources = (read_sources(args.data, args.source_column, args.inputs) if args.data
               else demo_sources(runner, args.inputs))
    speed(teacher, sources, args.rounds, args.device)
    if args.student:  # encoder reuse on the given student and teacher, with the --data pairs
        encoder_reuse(Path(args.student), teacher, read_pairs(args.data, args.source_column, args.target_column, 64),
                      args.rounds, device=args.device)
    elif runner is not None:
        data = runner.data()["train"]
        pairs = [{"source": r["source"], "target": r["target"]} for r in data.select(range(min(64, len(data))))]
        encoder_reuse(runner.run_dir / "student", runner.run_dir / "teacher", pairs, args.rounds, device=args.device)
    if not args.speed_only:
        quality(args.runs_dir, args.set)


if __name__ == "__main__":
    main()
