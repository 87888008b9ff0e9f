"""`nlgkd report RUN_DIR`: a summary, every evaluation of a run directory in a quality and a cost table, and plots.

The report reads the run directory only:
    <stage>/stage.json      kind, resolved config, variant, seed, train steps/epochs, wall and CPU seconds
    <eval>/metrics.json     of every finished evaluate stage: one row per evaluated model
    <model>/config.json and the *.safetensors headers of evaluated stage models (the FLOPs estimate)
and writes into RUN_DIR/report/ (or --out): report.md, report.html (self-contained: the images are
embedded), quality_vs_latency.png (the Pareto view) and ablation_<stage>.png per ablated stage.

Columns:
    quality      the evaluate metrics (BLEU, chrF, ROUGE-1/2/L); `metric` (default BLEU) is the one the
                 plots, "% teacher" and the ablation tables use
    % teacher    100 * score / the score of the model's teacher (column "teacher"), from that teacher's row in
                 the same evaluate stage (else in one with the same split, number of examples and decoding)
    compression  teacher parameters / model parameters
    latency      evaluate's milliseconds per generation batch, the median of its timed passes, with their spread
                 (shown as bars in the plot); seq/s its throughput; weights MB each model's own; peak memory as
                 measured (on a CPU the evaluate process's high-water mark)
    MFLOPs/tok   an estimate per generated token (`nlgkd/flops.py`); n/a when the model is not a stage
                 artifact of this run or its architecture is not one the estimate knows
    steps/epochs optimizer steps and epochs of the stage that made the model (0 for a pruned copy) and the seed
Which row is a model's teacher: `--teacher NAME` for every row; else its own teacher, found by following
the stage that made it back through `finetune` (model:) and `prune` (from:, the model it was cut from) to
a `distill` stage's `teacher:` (the first, for an ensemble); else the run's teacher: the model the run's
distill / pseudo_targets / cache_logits stages name as `teacher:` most often, else a row called `teacher`.
So a recipe with two model pairs compares each student with its own teacher. Without a teacher row,
"% teacher" and compression are n/a.

Ablations: rows of variants (`name@variant`, or a stage that follows a varied stage) are grouped by the
stage whose `variants:` they come from. The first variant in recipe order is the baseline of its group
(write the recipe's baseline variant first); each group gets a table with the change against it, what
its variants change in the stage's config, and a bar chart.
"""
from __future__ import annotations

import base64
import html
import json
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .flops import flops_per_token
from .recipe import flatten
from .teacher_check import BASELINES

QUALITY = ["bleu", "chrf", "rouge1", "rouge2", "rougeL"]


class ReportError(RuntimeError):
    """The run directory cannot be reported; the message names the folder or option and what to do."""


# ------------------------------------------------------------------------------------------ reading
def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def stage_records(run_dir: Path) -> dict[str, dict]:
    """Folder name -> stage.json of every finished stage, in the order the stages started."""
    records = {}
    for path in sorted(run_dir.glob("*/stage.json")):
        record = read_json(path)
        if isinstance(record, dict) and record.get("status") == "done":
            records[path.parent.name] = record
    return dict(sorted(records.items(), key=lambda item: str(item[1].get("started", ""))))


# ------------------------------------------------------------------------------------------ the table
@dataclass
class Report:
    run_dir: Path
    metric: str
    teacher: str | None
    teacher_rule: str
    rows: list[dict]
    stages: dict[str, dict]
    groups: dict[str, list[dict]] = field(default_factory=dict)  # ablated stage -> its rows, baseline first
    changes: dict[str, dict[str, str]] = field(default_factory=dict)  # ablated stage -> variant -> change


def pick_teacher(rows: list[dict], stages: dict[str, dict], teacher: str | None) -> tuple[str | None, str]:
    """(teacher row name, the rule that chose it); see the module docstring."""
    names = [r["model"] for r in rows]
    if teacher is not None:
        if teacher not in names:
            raise ReportError(f"--teacher {teacher}: no evaluated model has this name; models: {sorted(set(names))}")
        return teacher, "--teacher"
    named = Counter()
    for record in stages.values():
        if record.get("kind") in ("distill", "pseudo_targets", "cache_logits"):
            value = (record.get("config") or {}).get("teacher")
            for name in value if isinstance(value, list) else [value]:
                if name in names:
                    named[name] += 1
    if named:
        return named.most_common(1)[0][0], "the teacher most of the run's distill and pseudo_targets stages name"
    if "teacher" in names:
        return "teacher", "the row called teacher"
    return None, "none found (pass --teacher NAME)"


def own_teacher(model: str, stages: dict[str, dict], names: set[str]) -> str | None:
    """The teacher a model was distilled from or cut from, following its stages back (see the docstring):
    through fine-tunes and exports to the first distill (its teacher) or prune (its `from`)."""
    for key in stage_chain(model, stages):
        kind, config = stages[key].get("kind"), stages[key].get("config") or {}
        if kind == "distill":
            teacher = config.get("teacher")
            teacher = teacher[0] if isinstance(teacher, list) and teacher else teacher
            return teacher if teacher in names else None
        if kind == "prune":
            return config.get("from") if config.get("from") in names else None
        if kind not in ("finetune", "export", "select"):  # an export is its model, converted; select, its choice
            return None
    return None


def stage_chain(model: str, stages: dict[str, dict]) -> list[str]:
    """The stages that made `model`, newest first, following finetune / export (model:), prune (from:),
    distill (student:) and select (the candidate it chose) back to the first."""
    chain = []
    while model in stages and model not in chain:
        chain.append(model)
        record = stages[model]
        if record.get("kind") == "select":  # the candidate it chose on validation
            model = (record.get("select") or {}).get("chosen")
            continue
        config = record.get("config") or {}
        model = config.get({"prune": "from", "distill": "student"}.get(record.get("kind"), "model"))
    return chain


def learns_from_a_teacher(record: dict) -> bool:
    """Whether a stage trains on a teacher's signal: a distill stage with a KD objective, feature losses,
    pseudo-targets, cached logits or Joint-Teaching (objective finetune alone is cross-entropy on gold)."""
    config = record.get("config") or {}
    return record.get("kind") == "distill" and (
        config.get("objective", "logits_kd") != "finetune" or any(config.get(key) for key in (
            "hidden", "attention", "pseudo_targets", "cached_teacher", "joint_teaching")))


def is_distilled(model: str, stages: dict[str, dict], teacher: str | None = None) -> bool:
    """Whether a teacher taught `model`: a stage among those that made it learns from one (a later fine-tune or
    export keeps it so). The chain stops at the prune that cut it from `teacher`: how that teacher was trained
    does not make its cut copy distilled."""
    for key in stage_chain(model, stages):
        if learns_from_a_teacher(stages[key]):
            return True
        config = stages[key].get("config") or {}
        if stages[key].get("kind") == "prune" and config.get("from") == teacher:
            return False
    return False


def collect(run_dir: str | Path, metric: str = "bleu", teacher: str | None = None) -> Report:
    """Every evaluate row of `run_dir` with the derived columns, and the ablation groups."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such run directory; pass the folder a run wrote, e.g. runs/demo")
    stages = stage_records(run_dir)
    evaluations = [key for key, r in stages.items() if r.get("kind") == "evaluate"]
    if not evaluations:
        raise ReportError(f"{run_dir}: no finished evaluate stage (stages found: {list(stages) or 'none'}); add an "
                          "evaluate stage listing the models to compare to the recipe and run it")
    rows = []
    for key in evaluations:
        metrics = read_json(run_dir / key / "metrics.json")
        if not isinstance(metrics, dict):
            raise ReportError(f"{run_dir / key / 'metrics.json'}: missing or unreadable; re-run the stage "
                              f"(`nlgkd run RECIPE --stage {key} --force`)")
        for model, values in metrics.items():
            rows.append({"model": model, "evaluation": key, **values})
    if metric not in rows[0]:
        known = [k for k in QUALITY if k in rows[0]]
        raise ReportError(f"--metric {metric}: not in the evaluate metrics; choose one of {known}")
    teacher_name, rule = pick_teacher(rows, stages, teacher)
    names = {r["model"] for r in rows}
    for row in rows:
        own = None if teacher is not None else own_teacher(row["model"], stages, names)
        # a trivial baseline (copy the source, ...) is nobody's student: no teacher, no "% teacher"
        row["teacher"] = None if row["model"] in BASELINES else own or teacher_name
        add_derived(row, rows, stages, run_dir, metric)
    teachers = {r["teacher"] for r in rows}
    stale = stale_stages(run_dir, stages)
    for row in rows:
        row["stale"] = row["model"] in stale or row["evaluation"] in stale
        # a teacher, or an export of one (the same model for another engine) is nobody's student
        exported_from = stages.get(row["model"], {}).get("config", {}).get("model") \
            if stages.get(row["model"], {}).get("kind") == "export" else None
        row["is_teacher"] = row["model"] in teachers or (exported_from is not None and exported_from in teachers)
        row["weak"] = bool(weak_teacher_check(stages, row["model"]))  # this model failed its teacher check
        row["teacher_weak"] = bool(weak_teacher_check(stages, row["teacher"]))
    report = Report(run_dir=run_dir, metric=metric, teacher=teacher_name, teacher_rule=rule, rows=rows,
                    stages=stages)
    group_ablations(report)
    return report


def stale_stages(run_dir: Path, stages: dict[str, dict]) -> set[str]:
    """Keys of finished stages whose fingerprint is not the one the recipe of the last `nlgkd run` gives them
    (plan.json): their config or an input changed, and the run that would remake them did not finish."""
    plan = read_json(run_dir / "plan.json")
    current = plan.get("fingerprints", {}) if isinstance(plan, dict) else {}
    return {key for key, record in stages.items() if key in current and current[key] != record.get("fingerprint")}


def stale_note(report: Report) -> str | None:
    stale = sorted({r["model"] for r in report.rows if r["stale"]})
    if not stale:
        return None
    return (f"STALE: the rows marked (stale) ({', '.join(stale)}) were measured before their stage or its "
            "evaluation changed in the recipe of the last run (plan.json); run the recipe again to remake them.")


def weak_teacher_check(stages: dict[str, dict], model: str | None) -> dict | None:
    """The `teacher_check` of a stage model that did not beat the trivial baselines, else None."""
    check = (stages.get(model) or {}).get("teacher_check") if model else None
    return check if isinstance(check, dict) and check.get("weak") else None


def weak_teachers_note(report: Report) -> str | None:
    """A paragraph naming every weak teacher of the table and the baseline that beat it."""
    notes = []
    for model in dict.fromkeys(r["model"] for r in report.rows if r["weak"]):
        check = weak_teacher_check(report.stages, model)
        metric = check.get("metric", "bleu")
        beaten = ", ".join(f"{name.replace('_', ' ')} {check['baselines'][name][metric]:.2f}"
                           for name in check.get("beaten_by", []))
        notes.append(f"{model} ({metric.upper()} {check['teacher'][metric]:.2f} on {check['examples']} validation "
                     f"examples; {beaten})")
    if not notes:
        return None
    return ("WEAK TEACHER: " + "; ".join(notes) + ". It did not beat a trivial baseline on validation, so '% teacher' "
            "(marked *) of its students measures closeness to a model that learned little; train it longer or "
            "change its architecture before comparing students.")


def decoded_alike(a: dict, b: dict) -> bool:
    """Whether two evaluation rows were decoded the same way: all their decoding settings where both recorded
    them (evaluations since nlgkd recorded `decoding_settings`), else their strategy."""
    if "decoding_settings" in a and "decoding_settings" in b:
        return a["decoding_settings"] == b["decoding_settings"]
    return a.get("decoding") == b.get("decoding")


def scored_alike(a: dict, b: dict) -> bool:
    """Whether two rows can be compared: the same split and number of examples (where both record it), and for
    two models the same decoding (a trivial baseline decodes nothing)."""
    if a.get("split") != b.get("split"):
        return False
    if a.get("examples") is not None and b.get("examples") is not None and a["examples"] != b["examples"]:
        return False
    return a["model"] in BASELINES or b["model"] in BASELINES or decoded_alike(a, b)


def teacher_row(row: dict, rows: list[dict]) -> dict | None:
    """The row of `row`'s teacher it is compared with: in the same evaluate stage, else in one that scored
    alike; None without one."""
    teacher = row["teacher"]
    same_stage = [r for r in rows if r["model"] == teacher and r["evaluation"] == row["evaluation"]]
    alike = [r for r in rows if r["model"] == teacher and scored_alike(r, row)]
    return (same_stage or alike or [None])[0]


def add_derived(row: dict, rows: list[dict], stages: dict, run_dir: Path, metric: str) -> None:
    reference = teacher_row(row, rows)
    score, params = row.get(metric), row.get("params")
    if reference and reference.get(metric) and score is not None:
        row["pct_teacher"] = 100.0 * score / reference[metric]
    if reference and reference.get("params") and params:
        row["compression"] = reference["params"] / params
    record = stages.get(row["model"])
    model_dir = run_dir / row["model"]
    row["mflops_per_token"] = None
    if record is not None and model_dir.is_dir():
        flops = flops_per_token(model_dir, row.get("source_tokens"), row.get("output_tokens"))
        row["mflops_per_token"] = None if flops is None else flops / 1e6
        trained = record
        if record.get("kind") == "export":  # an export trains nothing: its source's training is what it holds
            trained = stages.get((record.get("config") or {}).get("model"), {})
        train = trained.get("train") or {}
        row["steps"] = train.get("steps")
        row["epochs"] = train.get("epochs")
        own_seed = (record.get("config") or {}).get("seed")  # a stage's own seed, else the recipe's
        row["seed"] = record.get("seed") if own_seed is None else own_seed
        row.setdefault("variant", record.get("variant"))
        row.setdefault("variant_of", record.get("variant_of"))


def group_ablations(report: Report) -> None:
    """Rows of one varied stage's variants, per evaluate stage (a model evaluated twice appears once per
    evaluation); and what each variant changes in that stage's config against the baseline."""
    for row in report.rows:
        if row.get("variant_of"):
            report.groups.setdefault(row["variant_of"], []).append(row)
    for varied, rows in report.groups.items():
        configs = {}
        for key, record in report.stages.items():
            if record.get("variant_of") == varied and key.split("@")[0] == varied:
                configs[record.get("variant")] = flatten(record.get("config") or {})
        names = [r["variant"] for r in rows if r.get("variant") in configs]
        if not names:
            continue
        base = configs[names[0]]
        report.changes[varied] = {}
        for name in dict.fromkeys(names):
            diff = [f"{k}={configs[name].get(k)}" for k in sorted(set(base) | set(configs[name]))
                    if configs[name].get(k) != base.get(k)]
            report.changes[varied][name] = ", ".join(diff) if diff else "baseline"


# ------------------------------------------------------------------------------------------ plots
def plot_pareto(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report.rows if r.get("latency_ms") and r.get(report.metric) is not None]
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    groups = sorted({r.get("variant_of") or "" for r in rows})
    colors = plt.get_cmap("tab10")
    for i, group in enumerate(groups):
        members = [r for r in rows if (r.get("variant_of") or "") == group and not r["is_teacher"]]
        if members:
            ax.scatter([r["latency_ms"] for r in members], [r[report.metric] for r in members], s=36,
                       color=colors(i % 10), label=f"variants of {group}" if group else "other models")
    for r in rows:
        if r.get("latency_spread"):  # the range of the timed passes, as a horizontal bar
            half = r["latency_ms"] * r["latency_spread"] / 2
            ax.errorbar([r["latency_ms"]], [r[report.metric]], xerr=[[half], [half]], color="grey", lw=1, capsize=2)
        if r["is_teacher"]:
            ax.scatter([r["latency_ms"]], [r[report.metric]], marker="*", s=220, color="black", label="teacher")
        ax.annotate(r["model"], (r["latency_ms"], r[report.metric]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    frontier, best = [], float("-inf")  # fastest first: a model is on the frontier if nothing faster is better
    for r in sorted(rows, key=lambda r: (r["latency_ms"], -r[report.metric])):
        if r[report.metric] > best:
            frontier.append(r)
            best = r[report.metric]
    if len(frontier) > 1:
        ax.step([r["latency_ms"] for r in frontier], [r[report.metric] for r in frontier], where="post",
                color="grey", linestyle="--", linewidth=1, label="Pareto frontier")
    latencies = [r["latency_ms"] for r in rows]
    if latencies and max(latencies) > 10 * min(latencies):
        ax.set_xscale("log")
    ax.set_xlabel("generation latency (ms per batch, lower is better)")
    ax.set_ylabel(f"{report.metric} (higher is better)")
    ax.set_title(f"{report.run_dir.name}: quality vs latency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_ablation(report: Report, varied: str, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["model"] if len({x["evaluation"] for x in rows}) == 1 else f"{r['model']}\n({r['evaluation']})"
              for r in rows]
    scores = [r.get(report.metric) or 0.0 for r in rows]
    fig, ax = plt.subplots(figsize=(max(4.5, 1.3 * len(rows) + 2), 4.2), dpi=110)
    bars = ax.bar(range(len(rows)), scores, color=["#4c72b0" if i else "#8c8c8c" for i in range(len(rows))])
    for bar, row in zip(bars, rows):
        pct = f"\n{row['pct_teacher']:.0f}% of T" if row.get("pct_teacher") is not None else ""
        ax.annotate(f"{row.get(report.metric, 0):.2f}{pct}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    teacher = [r for r in report.rows if r["model"] == rows[0]["teacher"] and r["evaluation"] == rows[0]["evaluation"]]
    if teacher and teacher[0].get(report.metric) is not None:
        ax.axhline(teacher[0][report.metric], color="black", linestyle="--", linewidth=1,
                   label=f"teacher {teacher[0][report.metric]:.2f}")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xticks(range(len(rows)), labels, fontsize=8, rotation=20 if len(rows) > 4 else 0)
    ax.set_ylabel(report.metric)
    top = max(scores + [teacher[0].get(report.metric) or 0 if teacher else 0])
    ax.set_ylim(0, top * 1.2 if top > 0 else 1)
    ax.set_title(f"ablation: {varied} (grey: baseline)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ writing
def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def is_student(row: dict, report: Report) -> bool:
    """A trained or pruned model of this run that is nobody's teacher (not a trivial baseline)."""
    return not row["is_teacher"] and row["model"] not in BASELINES and row["model"] in report.stages \
        and row.get("teacher") is not None


def seed_runs(row: dict, report: Report) -> list[dict]:
    """The rows of `row`'s seed sweep in its evaluation: the same stage under every variant of a varied stage
    whose variants change nothing but the seed (`kd@seed0`, `kd@seed1`, ...; `final@seed1` after it). Else
    [row]."""
    varied, stage = row.get("variant_of"), row["model"].split("@")[0]
    changes = list(report.changes.get(varied, {}).values()) if varied else []
    is_sweep = any(c != "baseline" for c in changes) and \
        all(c == "baseline" or re.fullmatch(r"seed=-?\d+", c) for c in changes)
    if not is_sweep:
        return [row]
    return [r for r in report.rows if r["evaluation"] == row["evaluation"] and r.get("variant_of") == varied
            and r["model"].split("@")[0] == stage]


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def described(rows: list[dict], metric: str) -> tuple[str, str, str]:
    """(name, name with its seed count, score as text) of one model, or of a seed sweep: its stage name, and its
    mean and sd over the seeds."""
    mean, sd = mean_sd([r[metric] for r in rows])
    if len(rows) == 1:
        return rows[0]["model"], rows[0]["model"], f"{mean:.2f}"
    name = rows[0]["model"].split("@")[0]
    return name, f"{name} ({len(rows)} seeds)", f"{mean:.2f} ± {sd:.2f}"


def summary(report: Report) -> str | None:
    """The paragraph a person reads first: the best student against its teacher, the cross-entropy baseline
    (a student trained on gold alone) and the trivial baselines, all scored alike (the same examples and
    decoding: the same evaluate stage, or another one like it). A seed sweep counts as one student: the mean
    and sd over its seeds, not its luckiest seed."""
    m = report.metric

    def score(runs: list[dict]) -> float:
        return mean_sd([r[m] for r in runs])[0]

    units: dict[tuple, list[dict]] = {}  # one per student or seed sweep, per evaluation
    for r in report.rows:
        if is_student(r, report) and r.get(m) is not None:
            runs = [x for x in seed_runs(r, report) if x.get(m) is not None]
            units.setdefault(tuple((x["model"], x["evaluation"]) for x in runs), runs)
    if not units:
        return None
    # scores of different splits do not compare: the test split's, where there are any
    on_test = [runs for runs in units.values() if runs[0].get("split", "test") == "test"]
    best = max(on_test or units.values(), key=score)
    first = best[0]
    name, long_name, score_text = described(best, m)
    alike = [r for r in report.rows if scored_alike(r, first)]
    teacher = teacher_row(first, report.rows)
    words = [f"Best student: {long_name}, {m.upper()} {score_text}"]
    if teacher is not None and teacher.get(m):
        words.append(f", {100 * score(best) / teacher[m]:.1f}% of its teacher ({teacher['model']}, {teacher[m]:.2f})")
        if first.get("compression"):
            words.append(f", {first['compression']:.1f}x fewer parameters")
        speeds = [r["seq_per_s"] for r in best if r.get("seq_per_s")]
        # only timings of one evaluate stage: another ran at another time, under another load
        if teacher["evaluation"] == first["evaluation"] and speeds and teacher.get("seq_per_s"):
            words.append(f", {mean_sd(speeds)[0] / teacher['seq_per_s']:.1f}x the teacher's sequences/s")
    words.append(f" ({first['evaluation']}, {first.get('split', 'test')} split).")
    # the cross-entropy baselines: students of the same teacher that no stage taught, the same size if any is
    ce = [runs for runs in units.values() if runs is not best and scored_alike(runs[0], first)
          and runs[0]["teacher"] == first["teacher"]
          and not is_distilled(runs[0]["model"], report.stages, runs[0]["teacher"])]
    ce = [runs for runs in ce if runs[0].get("params") == first.get("params")] or ce
    if not is_distilled(first["model"], report.stages, first["teacher"]):
        words.append(" It is trained on gold alone: no distilled student beats cross-entropy here.")
    elif ce:
        base = max(ce, key=score)
        _, base_name, base_text = described(base, m)
        words.append(f" The cross-entropy student {base_name} scores {base_text} ({score(best) - score(base):+.2f} "
                     f"for {name}).")
    trivial = {r["model"]: f"{BASELINES[r['model']]} {r[m]:.2f}" for r in alike if r["model"] in BASELINES}
    if trivial:
        words.append(" Trivial baselines: " + ", ".join(trivial.values()) + ".")
    if first["teacher_weak"]:
        words.append(" Its teacher is weak (below).")
    return "".join(words)


def quality_table(report: Report) -> tuple[list[str], list[list[str]]]:
    m = report.metric
    shown = [q for q in QUALITY if any(q in r for r in report.rows)]
    header = ["model", "evaluation", *shown, "teacher", f"% teacher ({m})"]
    body = []
    for r in report.rows:
        chosen = (report.stages.get(r["model"], {}).get("select") or {}).get("chosen")  # a select stage's pick
        name = r["model"] + (f" (= {chosen})" if chosen else "") + (" (weak teacher)" if r["weak"] else "") + \
            (" (stale)" if r["stale"] else "")
        pct = fmt(r.get("pct_teacher"), 1) + ("*" if r["teacher_weak"] and r.get("pct_teacher") is not None else "")
        body.append([name, r["evaluation"], *[fmt(r.get(q)) for q in shown], r.get("teacher") or "n/a", pct])
    return header, body


def cost_table(report: Report) -> tuple[list[str], list[list[str]]]:
    header = ["model", "evaluation", "backend", "params", "compression", "weights MB", "latency ms", "spread", "seq/s",
              "peak MB", "MFLOPs/tok", "steps", "epochs", "seed"]
    body = []
    for r in report.rows:
        if r["model"] in BASELINES:
            continue  # nothing runs: no size, speed or training to show
        body.append([r["model"], r["evaluation"], r.get("backend", "pytorch"), fmt(r.get("params")),
                     "n/a" if r.get("compression") is None else f"{r['compression']:.2f}x",
                     fmt(r.get("weights_mb"), 1), fmt(r.get("latency_ms"), 1),
                     "n/a" if r.get("latency_spread") is None else f"±{50 * r['latency_spread']:.0f}%",
                     fmt(r.get("seq_per_s"), 1),
                     fmt(r.get("peak_mem_mb"), 0) + (" (process)" if r.get("peak_mem_kind") == "cpu_max_rss" else ""),
                     fmt(r.get("mflops_per_token"), 3), fmt(r.get("steps")), fmt(r.get("epochs")), fmt(r.get("seed"))])
    return header, body


def ablation_table(report: Report, varied: str) -> tuple[list[str], list[list[str]]]:
    rows, m = report.groups[varied], report.metric
    header = ["variant", "model", "changes", m, f"Δ vs {rows[0]['variant']}", "% teacher", "latency ms", "params",
              "steps"]
    body = []
    for r in rows:
        base = next((b for b in rows if b["evaluation"] == r["evaluation"]), rows[0])
        delta = r.get(m) - base.get(m) if r.get(m) is not None and base.get(m) is not None else None
        body.append([r.get("variant") or "", r["model"], report.changes.get(varied, {}).get(r.get("variant"), ""),
                     fmt(r.get(m)), "—" if r is base else (f"{delta:+.2f}" if delta is not None else "n/a"),
                     fmt(r.get("pct_teacher"), 1), fmt(r.get("latency_ms"), 1), fmt(r.get("params")),
                     fmt(r.get("steps"))])
    return header, body


def teacher_lead_table(report: Report) -> tuple[list[str], list[list[str]]] | None:
    """Per distill stage whose teacher was compared with the student trained alone before it trained: the
    teacher's lead over that cross-entropy student on validation beside the distilled student's gain over it on
    the evaluated split (a lead below ~1 BLEU rarely becomes a gain), and whether the teacher converged."""
    m, body = report.metric, []
    for key, record in report.stages.items():
        lead = record.get("teacher_lead") or {}
        if not lead.get("checked"):
            continue
        gains = [r[m] - c[m] for r in report.rows if r["model"] == key and r.get(m) is not None
                 for c in report.rows if c["model"] == lead["ce_student"] and c.get(m) is not None
                 and scored_alike(r, c)]
        convergence = (report.stages.get(lead["teacher"]) or {}).get("convergence") or {}
        converged = {True: "yes", False: "no (step cap)", None: "n/a"}[convergence.get("converged")]
        body.append([key, lead["teacher"], converged, fmt(lead["teacher_bleu"]), lead["ce_student"],
                     fmt(lead["ce_student_bleu"]), f"{lead['lead']:+.2f}" + (" (weak)" if lead.get("weak") else ""),
                     f"{gains[0]:+.2f}" if gains else "n/a"])
    if not body:
        return None
    header = ["distilled", "teacher", "teacher converged", "teacher BLEU (val)", "CE student", "CE BLEU (val)",
              "teacher lead (val)", f"distilled - CE ({m}, evaluated split)"]
    return header, body


def stages_table(report: Report) -> tuple[list[str], list[list[str]]]:
    header = ["stage", "kind", "variant of", "wall s", "CPU s", "steps"]
    body = [[key, r.get("kind", ""), r.get("variant_of") or "", fmt(r.get("wall_seconds"), 1),
             fmt(r.get("cpu_seconds"), 1), fmt((r.get("train") or {}).get("steps"))]
            for key, r in report.stages.items()]
    total_wall = sum(r.get("wall_seconds") or 0 for r in report.stages.values())
    total_cpu = sum(r.get("cpu_seconds") or 0 for r in report.stages.values())
    body.append(["total", "", "", fmt(total_wall, 1), fmt(total_cpu, 1), ""])
    return header, body


def md_table(header: list[str], body: list[list[str]]) -> str:
    clean = lambda c: str(c).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(map(clean, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(clean, row)) + " |" for row in body]
    return "\n".join(lines)


def html_table(header: list[str], body: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


CSS = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
       "table{border-collapse:collapse;font-size:13px;margin:1em 0}th,td{border:1px solid #ccc;padding:3px 7px;"
       "text-align:right}th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}"
       "img{max-width:100%;border:1px solid #eee}code{background:#f4f4f4;padding:1px 3px}")


def write_report(report: Report, out_dir: str | Path | None = None) -> list[Path]:
    """Write a collected report's report.md, report.html and PNGs (default folder: RUN_DIR/report); returns
    their paths (the summary paragraph is in report.md after the title)."""
    out = Path(out_dir) if out_dir else report.run_dir / "report"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ReportError(f"{out}: cannot write the report there ({err.strerror}); pass --out DIR") from None
    pngs = {"quality_vs_latency.png": None}
    plot_pareto(report, out / "quality_vs_latency.png")
    for varied, rows in report.groups.items():
        name = f"ablation_{varied}.png"
        plot_ablation(report, varied, rows, out / name)
        pngs[name] = varied

    write_blocks(report_blocks(report), out, report.run_dir.name)
    return [out / "report.md", out / "report.html", *[out / p for p in pngs]]


def report_blocks(report: Report) -> list[tuple[str, Any]]:
    """The report's content in order: ("h1"|"h2"|"p", text), ("table", (header, body)), ("img", file); the same
    blocks become report.md and report.html (`write_blocks`)."""
    blocks: list[tuple[str, Any]] = [
        ("h1", f"Report: {report.run_dir.name}"),
        *([("p", text)] if (text := summary(report)) else []),
        *([("p", note)] if (note := weak_teachers_note(report)) else []),
        *([("p", note)] if (note := stale_note(report)) else []),
        ("h2", "Quality"),
        ("p", f"{len(report.rows)} rows from {report.run_dir}. '% teacher' compares each model with its own teacher "
              "(the distill teacher or the model it was pruned from), else with the run's teacher, "
              f"{report.teacher or 'n/a'} ({report.teacher_rule})."),
        ("table", quality_table(report)),
        ("h2", "Size, speed and training"),
        ("p", "Latency is per generation batch: the median of the evaluate stage's timed passes over the same "
              "batches, after a warm-up pass; spread is half their range (slowest - fastest) over the median. Weights "
              "MB is each model's own parameters and buffers; peak MB is CUDA's peak for that model on a GPU, and on a "
              "CPU the evaluate process's resident memory at its peak while that model decoded (all the process "
              "held then, so compare differences between rows; marked 'process' where only the lifetime peak "
              "could be read). MFLOPs/tok is an estimate per generated token (nlgkd/flops.py: flops_per_token); compare "
              "speeds within one run only."),
        ("table", cost_table(report)),
        ("h2", "Quality vs latency"),
        ("img", "quality_vs_latency.png"),
    ]
    if (lead_table := teacher_lead_table(report)) is not None:
        blocks += [("h2", "Teacher lead"),
                   ("p", "Before each distill stage trained, its teacher and the student of the same shape trained on "
                         "gold alone decoded the same validation examples: distillation pays when the teacher "
                         "clearly leads (min_teacher_lead, default 1 BLEU)."), ("table", lead_table)]
    for varied in report.groups:
        blocks += [("h2", f"Ablation: {varied}"), ("table", ablation_table(report, varied)),
                   ("img", f"ablation_{varied}.png")]
    blocks += [("h2", "Stages"), ("p", "Wall and CPU seconds as recorded in each stage.json (CPU: the main "
                                      "process, all its threads)."), ("table", stages_table(report))]

    return blocks


def write_blocks(blocks: list[tuple[str, Any]], out: Path, title: str) -> None:
    """report.md and a self-contained report.html (its plots inlined) from the same blocks."""
    md, body = [], []
    for kind, content in blocks:
        if kind in ("h1", "h2"):
            md.append(f"{'#' if kind == 'h1' else '##'} {content}\n")
            body.append(f"<{kind}>{html.escape(content)}</{kind}>")
        elif kind == "p":
            md.append(content + "\n")
            body.append(f"<p>{html.escape(content)}</p>")
        elif kind == "table":
            md.append(md_table(*content) + "\n")
            body.append(html_table(*content))
        elif kind == "img":
            md.append(f"![{content}]({content})\n")
            data = base64.b64encode((out / content).read_bytes()).decode()
            body.append(f'<p><img alt="{html.escape(content)}" src="data:image/png;base64,{data}"></p>')
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>Report: {html.escape(title)}"
            f"</title><style>{CSS}</style></head><body>{''.join(body)}</body></html>")
    (out / "report.html").write_text(page, encoding="utf-8")
