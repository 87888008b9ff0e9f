"""`nlgkd report`: a run directory with known metrics gives the expected rows, derived numbers, ablation
groups, plots and a self-contained HTML page."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nlgkd.cli import main as cli_main
from nlgkd.flops import flops_per_token
from nlgkd.report import ReportError, collect


def write_stage(run_dir: Path, key: str, kind: str, config: dict, **facts) -> Path:
    folder = run_dir / key
    folder.mkdir(parents=True)
    record = {"name": key.split("@")[0], "kind": kind, "status": "done", "config": config, "seed": 0,
              "started": f"2024-01-01T00:00:{len(list(run_dir.iterdir())):02d}", "wall_seconds": 2.0,
              "cpu_seconds": 3.0, **facts}
    (folder / "stage.json").write_text(json.dumps(record))
    return folder


def metrics(bleu, params, **extra) -> dict:
    return {"bleu": bleu, "chrf": bleu + 10, "rouge1": 50.0, "rouge2": 30.0, "rougeL": 45.0, "params": params,
            "latency_ms": 1000.0 / (params / 1000), "latency_spread": 0.1, "seq_per_s": params / 1000,
            "peak_mem_mb": 100.0, "peak_mem_kind": "cpu_max_rss",
            "split": "test", "decoding": "greedy", **extra}


def tiny_t5(folder: Path) -> None:
    """d=4, vocab 10, one encoder and one decoder layer holding one 4x4 weight each (16 params a side)."""
    (folder / "config.json").write_text(json.dumps({"model_type": "t5", "is_encoder_decoder": True, "d_model": 4,
                                                    "vocab_size": 10, "num_heads": 1, "d_kv": 4}))
    save_file({"shared.weight": torch.zeros(10, 4),
               "encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(4, 4),
               "decoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(4, 4),
               "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": torch.zeros(32, 1)},
              str(folder / "model.safetensors"))


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """teacher (finetune) -> kd@plain, kd@noisy (a varied distill stage) -> eval with known numbers."""
    run = tmp_path / "study"
    write_stage(run, "teacher", "finetune", {"model": "teacher"}, train={"steps": 500, "epochs": 8.0})
    tiny_t5(run / "teacher")
    for i, (variant, objective) in enumerate([("plain", "logits_kd"), ("noisy", "noisy_kd")]):
        write_stage(run, f"kd@{variant}", "distill", {"student": "student", "teacher": "teacher",
                                                        "objective": objective, "lr": 0.001},
                    train={"steps": 100, "epochs": 1.5 + i}, variant=variant, variant_of="kd", seed=5)
    # a second pair: `big`, cut into `pruned` and fine-tuned: its teacher is big, not the run's teacher
    write_stage(run, "big", "finetune", {"model": "big"}, train={"steps": 10, "epochs": 1.0})
    write_stage(run, "pruned", "prune", {"from": "big", "decoder_layers": [0]})
    write_stage(run, "pruned_ft", "finetune", {"model": "pruned"}, train={"steps": 10, "epochs": 1.0})
    # the cross-entropy baseline of the kd students: the same student fine-tuned on gold
    # (with a seed of its own, 0, where the recipe's is 5)
    write_stage(run, "ce", "finetune", {"model": "student", "seed": 0}, train={"steps": 100, "epochs": 1.5}, seed=5)
    eval_dir = write_stage(run, "eval", "evaluate", {"models": ["teacher", "kd@plain", "kd@noisy", "big",
                                                               "pruned_ft", "ce"], "baselines": True})
    (eval_dir / "metrics.json").write_text(json.dumps({
        "teacher": metrics(40.0, 4000, source_tokens=2.0, output_tokens=4.0),
        "kd@plain": metrics(30.0, 1000, variant="plain", variant_of="kd"),
        "kd@noisy": metrics(34.0, 2000, variant="noisy", variant_of="kd"),
        "big": metrics(50.0, 8000),
        "pruned_ft": metrics(25.0, 2000),
        "ce": metrics(28.0, 2000),
        "copy_source": {"bleu": 12.0, "chrf": 30.0, "split": "test", "decoding": "greedy"},
    }))
    return run


def test_rows_and_derived_numbers(run_dir):
    report = collect(run_dir)
    assert [r["model"] for r in report.rows] == ["teacher", "kd@plain", "kd@noisy", "big", "pruned_ft", "ce",
                                                 "copy_source"]
    assert report.teacher == "teacher" and "distill" in report.teacher_rule
    rows = {r["model"]: r for r in report.rows}
    assert rows["kd@plain"]["pct_teacher"] == pytest.approx(75.0)
    assert rows["kd@noisy"]["pct_teacher"] == pytest.approx(85.0)
    assert rows["kd@plain"]["compression"] == pytest.approx(4.0)
    assert rows["kd@noisy"]["compression"] == pytest.approx(2.0)
    assert rows["pruned_ft"]["teacher"] == "big" and rows["kd@plain"]["teacher"] == "teacher"
    assert rows["pruned_ft"]["pct_teacher"] == pytest.approx(50.0) and rows["pruned_ft"]["compression"] == 4.0
    assert rows["big"]["teacher"] == "teacher" and rows["big"]["is_teacher"] and not rows["kd@plain"]["is_teacher"]
    assert rows["teacher"]["steps"] == 500 and rows["kd@noisy"]["epochs"] == 2.5
    assert rows["ce"]["seed"] == 0 and rows["kd@noisy"]["seed"] == 5  # a stage's own seed, else the recipe's
    # the stage folder has no weights: FLOPs are not computable; the teacher's are (see the next test)
    assert rows["kd@plain"]["mflops_per_token"] is None
    assert rows["teacher"]["mflops_per_token"] == pytest.approx(208 / 1e6)
    assert list(report.groups) == ["kd"] and [r["model"] for r in report.groups["kd"]] == ["kd@plain", "kd@noisy"]
    assert report.changes["kd"] == {"plain": "baseline", "noisy": "objective=noisy_kd"}

    by_chrf = collect(run_dir, metric="chrf", teacher="kd@noisy")  # --teacher: one teacher for every row
    pct = {r["model"]: r.get("pct_teacher") for r in by_chrf.rows}
    assert pct["copy_source"] is None  # a trivial baseline has no teacher
    assert pct["kd@plain"] == pytest.approx(100 * 40 / 44) and pct["pruned_ft"] == pytest.approx(100 * 35 / 44)


def test_flops_formula_by_hand(tmp_path):
    # encoder-decoder, S = 2 source and T = 4 generated tokens, N_enc = N_dec = 16, d = d_attn = 4, V = 10:
    # per token 2*16 + 2*4*10 + 2*1*4*(4 + 2*2) = 176; once per input (2*16*2 + 4*1*4*2^2) / 4 = 32
    tiny_t5(tmp_path)
    assert flops_per_token(tmp_path, 2.0, 4.0) == pytest.approx(208)
    # decoder-only: one 4x12 weight (N = 48); per token 2*48 + 80 + 64 = 240; once (2*48*2 + 2*1*4*4) / 4 = 56
    gpt = tmp_path / "gpt"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 4, "vocab_size": 10}))
    save_file({"transformer.wte.weight": torch.zeros(10, 4), "transformer.wpe.weight": torch.zeros(8, 4),
               "transformer.h.0.attn.c_attn.weight": torch.zeros(4, 12)}, str(gpt / "model.safetensors"))
    assert flops_per_token(gpt, 2.0, 4.0) == pytest.approx(296)
    # nlgkd's LSTM: decoder LSTM 16x4 (N_dec = 64), bridge 4x4 + encoder LSTM 8x4 (N_once = 48), d = 4:
    # per token 2*64 + 2*4*10 + 4*4*2 = 240; once per input 2*48*2 / 4 = 48
    lstm = tmp_path / "lstm"
    lstm.mkdir()
    (lstm / "config.json").write_text(json.dumps({"model_type": "nlgkd_lstm", "d_model": 4, "vocab_size": 10}))
    save_file({"encoder.embed_tokens.weight": torch.zeros(10, 4), "encoder.lstm.weight_ih_l0": torch.zeros(8, 4),
               "decoder.bridge.weight": torch.zeros(4, 4), "decoder.lstm.weight_ih_l0": torch.zeros(16, 4)},
              str(lstm / "model.safetensors"))
    assert flops_per_token(lstm, 2.0, 4.0) == pytest.approx(288)
    # unknown architecture, or no token counts: not computable
    (gpt / "config.json").write_text(json.dumps({"model_type": "rwkv", "d_model": 4, "vocab_size": 10}))
    assert flops_per_token(gpt, 2.0, 4.0) is None
    assert flops_per_token(tmp_path, None, 4.0) is None


def test_written_report(run_dir, tmp_path):
    out = tmp_path / "out"
    assert cli_main(["report", str(run_dir), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    # the summary first: the best student against its teacher, its cross-entropy twin and copying the source
    assert md.splitlines()[2] == (
        "Best student: kd@noisy, BLEU 34.00, 85.0% of its teacher (teacher, 40.00), 2.0x fewer parameters, 0.5x the "
        "teacher's sequences/s (eval, test split). The cross-entropy student ce scores 28.00 (+6.00 for kd@noisy). Trivial "
        "baselines: copying the source 12.00.")
    assert "| kd@plain | eval | 30.00 | 40.00 | 50.00 | 30.00 | 45.00 | teacher | 75.0 |" in md  # quality
    # params, compression, weights MB (not in these metrics), latency, its spread, seq/s, the CPU process peak
    assert "| kd@plain | eval | pytorch | 1,000 | 4.00x | n/a | 1000.0 | ±5% | 1.0 | 100 (process) |" in md
    assert "| copy_source | eval | 1,000" not in md and "| copy_source | eval | 12.00 | 30.00 |" in md
    assert "## Ablation: kd" in md and "| noisy | kd@noisy | objective=noisy_kd | 34.00 | +4.00 | 85.0 |" in md
    assert "![ablation_kd.png](ablation_kd.png)" in md
    import matplotlib.image

    for name in ("quality_vs_latency.png", "ablation_kd.png"):
        image = matplotlib.image.imread(out / name)
        assert image.shape[0] > 300 and image.shape[1] > 400 and image.std() > 0  # a real, non-blank picture
    page = (out / "report.html").read_text()
    assert page.count("src=\"data:image/png;base64,") == 2 and "ablation_kd.png\" src=\"data" in page
    assert 'src="http' not in page and "<link" not in page  # self-contained: nothing is fetched


def test_report_errors(tmp_path, run_dir, capsys):
    with pytest.raises(ReportError, match="no such run directory"):
        collect(tmp_path / "missing")
    empty = tmp_path / "empty"
    write_stage(empty, "teacher", "finetune", {"model": "teacher"})
    with pytest.raises(ReportError, match=r"no finished evaluate stage \(stages found: \['teacher'\]\); add an "
                                          "evaluate stage"):
        collect(empty)
    with pytest.raises(ReportError, match=r"--teacher huge: no evaluated model has this name; models: \['big'"):
        collect(run_dir, teacher="huge")
    with pytest.raises(ReportError, match=r"--metric meteor: not in the evaluate metrics; choose one of \['bleu'"):
        collect(run_dir, metric="meteor")
    assert cli_main(["report", str(tmp_path / "missing")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"  # a recipe given for its run folder
    assert cli_main(["report", str(recipe)]) == 2
    assert "is a recipe; `nlgkd report` reads the folder a run wrote: nlgkd report runs/demo" in \
        capsys.readouterr().err


def test_the_summary_says_when_cross_entropy_wins(run_dir):
    from nlgkd.report import summary

    metrics_file = run_dir / "eval" / "metrics.json"
    values = json.loads(metrics_file.read_text())
    values["ce"]["bleu"] = 36.0
    metrics_file.write_text(json.dumps(values))
    text = summary(collect(run_dir))
    assert text.startswith("Best student: ce, BLEU 36.00, 90.0% of its teacher (teacher, 40.00)")
    assert "It is trained on gold alone: no distilled student beats cross-entropy here." in text


def test_an_export_of_the_teacher_is_no_student_and_a_finetuned_distilled_student_is_distilled(run_dir):
    from nlgkd.report import summary

    write_stage(run_dir, "teacher_int8", "export", {"model": "teacher"})
    write_stage(run_dir, "kd_final", "finetune", {"model": "kd@noisy"}, train={"steps": 10, "epochs": 0.2})
    metrics_file = run_dir / "eval" / "metrics.json"
    values = json.loads(metrics_file.read_text())
    values["teacher_int8"] = metrics(41.0, 4000, backend="ctranslate2 int8")
    values["kd_final"] = metrics(36.0, 2000)
    metrics_file.write_text(json.dumps(values))
    report = collect(run_dir)
    rows = {r["model"]: r for r in report.rows}
    assert rows["teacher_int8"]["is_teacher"] and rows["kd_final"]["teacher"] == "teacher"
    # an export trains nothing: its row shows the training of the model it holds
    assert (rows["teacher_int8"]["steps"], rows["teacher_int8"]["epochs"]) == (500, 8.0)
    text = summary(report)
    assert text.startswith("Best student: kd_final, BLEU 36.00")
    assert "The cross-entropy student ce scores 28.00 (+8.00 for kd_final)" in text
    assert "trained on gold alone" not in text


def test_a_teacher_row_decoded_otherwise_is_not_the_reference_of_another_evaluation(tmp_path):
    """'% teacher' takes the teacher's row from another evaluate stage only when it was decoded alike: with the
    same recorded settings (here 4 beams), not merely the same strategy (8 beams)."""
    run = tmp_path / "study"
    write_stage(run, "teacher", "finetune", {"model": "teacher"})
    write_stage(run, "kd", "distill", {"student": "student", "teacher": "teacher", "objective": "logits_kd"})
    write_stage(run, "kd8", "distill", {"student": "student", "teacher": "teacher", "objective": "noisy_kd"})
    beam = {"strategy": "beam", "num_beams": 4, "early_stopping": True}
    for key, rows in (("eval_teacher", {"teacher": metrics(40.0, 4000, decoding_settings=beam)}),
                      ("eval_kd", {"kd": metrics(30.0, 1000, decoding_settings=beam)}),
                      ("eval_kd8", {"kd8": metrics(36.0, 1000, decoding_settings={**beam, "num_beams": 8})})):
        folder = write_stage(run, key, "evaluate", {"models": list(rows)})
        (folder / "metrics.json").write_text(json.dumps({m: {**r, "decoding": "beam"} for m, r in rows.items()}))
    rows = {r["model"]: r for r in collect(run).rows}
    assert rows["kd"]["pct_teacher"] == pytest.approx(75.0)
    assert rows["kd8"].get("pct_teacher") is None


def test_the_summary_takes_a_seed_sweep_as_one_student_and_its_baselines_from_evaluations_alike(tmp_path):
    """The best student of a seed sweep is its mean ± sd, not its luckiest seed; the teacher, the cross-entropy
    students and the trivial baselines come from another evaluate stage that scored the same examples alike, and
    not from one that decoded otherwise or scored other examples. The teacher was itself distilled from a bigger
    model: that does not make its pruned copy's fine-tune "distilled", nor a distill stage with objective finetune
    a KD one. Speeds are compared only within one evaluate stage."""
    from nlgkd.report import summary

    run = tmp_path / "seeds"
    write_stage(run, "teacher", "distill", {"student": "fresh", "teacher": "big", "objective": "logits_kd"})
    write_stage(run, "student", "prune", {"from": "teacher", "decoder_layers": [0]})
    for i in range(3):
        write_stage(run, f"kd@seed{i}", "distill", {"student": "student", "teacher": "teacher",
                                                     "objective": "logits_kd", "seed": i or None},
                    variant=f"seed{i}", variant_of="kd")
    write_stage(run, "ce", "finetune", {"model": "student"})
    write_stage(run, "ce_distill_kind", "distill", {"student": "student", "teacher": "teacher",
                                                     "objective": "finetune"})
    beam = {"split": "test", "examples": 100, "decoding": "beam", "decoding_settings": {"num_beams": 4}}
    baselines = write_stage(run, "eval_base", "evaluate", {"models": ["teacher", "ce", "ce_distill_kind"]})
    (baselines / "metrics.json").write_text(json.dumps({
        "teacher": metrics(40.0, 4000, **beam), "ce": metrics(30.0, 2000, **beam),
        "ce_distill_kind": metrics(31.0, 2000, **beam),
        "copy_source": {"bleu": 12.0, "chrf": 30.0, "split": "test", "examples": 100, "decoding": "greedy"}}))
    greedy = write_stage(run, "eval_greedy", "evaluate", {"models": ["teacher"]})
    (greedy / "metrics.json").write_text(json.dumps({"teacher": metrics(20.0, 4000, split="test", examples=100)}))
    fewer = write_stage(run, "eval_fewer", "evaluate", {"models": ["teacher"], "max_examples": 10})
    (fewer / "metrics.json").write_text(json.dumps({
        "teacher": metrics(50.0, 4000, **{**beam, "examples": 10}),
        "most_frequent_target": {"bleu": 1.0, "split": "test", "examples": 10, "decoding": "greedy"}}))
    sweep = write_stage(run, "eval_kd", "evaluate", {"models": ["kd"]})
    (sweep / "metrics.json").write_text(json.dumps({
        f"kd@seed{i}": metrics(bleu, 2000, variant=f"seed{i}", variant_of="kd", **beam)
        for i, bleu in enumerate([33.0, 35.0, 34.0])}))

    # a higher score on the validation split is no better student: scores of different splits do not compare
    select = write_stage(run, "eval_select", "evaluate", {"models": ["ce"], "split": "validation"})
    (select / "metrics.json").write_text(json.dumps({"ce": metrics(60.0, 2000, **{**beam, "split": "validation"})}))

    text = summary(collect(run))
    assert text.startswith("Best student: kd (3 seeds), BLEU 34.00 ± 1.00, 85.0% of its teacher (teacher, 40.00), "
                           "2.0x fewer parameters (eval_kd, test split).")
    assert "The cross-entropy student ce_distill_kind scores 31.00 (+3.00 for kd)." in text
    assert text.endswith("Trivial baselines: copying the source 12.00.")


def test_rows_whose_stage_changed_since_the_last_run_are_marked_stale(run_dir, tmp_path):
    """plan.json holds each stage's fingerprint under the recipe of the last run; a finished stage (or its
    evaluation) with another fingerprint was made by an older recipe, e.g. when the re-run was interrupted."""
    from nlgkd.report import write_report

    keys = [p.parent.name for p in run_dir.glob("*/stage.json")]
    for key in keys:
        path = run_dir / key / "stage.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "fingerprint": f"fp-{key}"}))
    plan = {key: f"fp-{key}" for key in keys}
    (run_dir / "plan.json").write_text(json.dumps({"fingerprints": plan}))
    assert not any(r["stale"] for r in collect(run_dir).rows)
    (run_dir / "plan.json").write_text(json.dumps({"fingerprints": {**plan, "ce": "fp-ce-wider"}}))
    assert [r["model"] for r in collect(run_dir).rows if r["stale"]] == ["ce"]
    text = write_report(collect(run_dir), tmp_path / "out")[0].read_text()
    assert "| ce (stale) |" in text and "STALE: the rows marked (stale) (ce) were measured before" in text
    (run_dir / "plan.json").write_text(json.dumps({"fingerprints": {**plan, "eval": "fp-eval-beam"}}))
    assert all(r["stale"] for r in collect(run_dir).rows)  # the evaluation itself changed: every row of it
