"""Is this teacher worth distilling? Its validation scores against trivial baselines.

A teacher that cannot beat copying its input, or writing the most frequent training target every time, has
learned nothing a student should imitate; every stage built on it is wasted compute, and the report's
"% of the teacher" numbers look fine while all of them are bad. So when a training stage whose model later
stages use as a teacher ends, `check_teacher` scores those baselines on the very validation examples the
teacher was scored on (the first `eval_samples` of the validation split, decoded as its validation decodes) and the result is
written into the stage's `stage.json` as `teacher_check`. What happens to a weak teacher is the recipe's
`on_weak_teacher`: `warn` (default; the stage and the runner print what to try) or `stop` (the stages that
would learn from it refuse to start).
"""
from __future__ import annotations

from collections import Counter

from .metrics import text_metrics

# baseline name -> what it writes for every input (the words of the warning)
BASELINES = {
    "copy_source": "copying the source",
    "most_frequent_target": "writing the most frequent training target",
}
METRICS = ("bleu", "chrf")


def raw_sources(rows, tasks: dict) -> list[str]:
    """The sources of `rows` (a split) without the task prefix a multi-task recipe puts before them
    (`data.tasks.NAME.prefix`; `tasks`: data.tasks): what copying the source means for the trivial baseline."""
    if "task" not in rows.column_names or not tasks:
        return list(rows["source"])
    return [source.removeprefix(tasks[task].prefix) for source, task in zip(rows["source"], rows["task"])]


def baseline_predictions(sources: list[str], train_targets: list[str]) -> dict[str, list[str]]:
    """Each baseline's outputs for `sources`: the sources themselves, and the training split's most frequent
    target (the first one seen among equally frequent) for every input."""
    predictions = {"copy_source": list(sources)}
    if train_targets:
        # most_common sorts stably: among equally frequent targets, the first seen comes first
        most_frequent = Counter(train_targets).most_common(1)[0][0]
        predictions["most_frequent_target"] = [most_frequent] * len(sources)
    return predictions


def judge(teacher_scores: dict[str, float], sources: list[str], references: list[str],
          train_targets: list[str], metric: str = "bleu", decoding: str = "greedy") -> dict:
    """The `teacher_check` record: the teacher's scores, each baseline's scores on the same examples, and
    `beaten_by`: the baselines that score at least as high as the teacher on `metric` (weak when not empty)."""
    baselines = {}
    for name, predictions in baseline_predictions(sources, train_targets).items():
        scores = text_metrics(predictions, references)
        baselines[name] = {m: round(scores[m], 2) for m in METRICS}
    teacher = {m: round(teacher_scores[m], 2) for m in METRICS if m in teacher_scores}
    beaten_by = [name for name, scores in baselines.items() if scores[metric] >= teacher[metric]]
    return {"metric": metric, "examples": len(references), "split": "validation", "decoding": decoding,
            "teacher": teacher, "baselines": baselines, "beaten_by": beaten_by, "weak": bool(beaten_by)}


def weak_teacher_message(stage_key: str, check: dict, users: list[str], policy: str,
                         model_type: str | None = None) -> str:
    """One paragraph for a weak teacher: which baseline beat it, by how much, what to try (`model_type`, the
    teacher's, tailors the advice on architecture)."""
    metric = check["metric"]
    worst = max(check["beaten_by"], key=lambda name: check["baselines"][name][metric])
    beaten = "; ".join(f"{BASELINES[name]} scores {check['baselines'][name][metric]:.2f}"
                       for name in check["beaten_by"])
    consequence = (f"stages {', '.join(users)} will not start (on_weak_teacher: stop)" if policy == "stop"
                   else f"stages {', '.join(users)} would learn its mistakes")
    architecture = ("more text-infilling pretraining (a distill stage with denoising:) or a pretrained checkpoint"
                    if model_type in ("bart", "mbart") else "arch: mbart for a fresh model, or a pretrained checkpoint")
    # the check decodes greedily; a small teacher's beam search often scores 1-2 BLEU higher (eval/README.md,
    # the CPU Shakespeare teacher: 14.9 greedy, 16.4 beam, copying 16.5), which the PT stages can use
    decoding = check.get("decoding", "greedy")
    beam_advice = ("; to see whether beam search beats the bar, score it on the same examples with an evaluate stage "
                   f"(split: validation, max_examples: {check['examples']}, decoding: {{strategy: beam, num_beams: 4}}, "
                   "baselines: true)" if decoding == "greedy" else "")
    return (f"weak teacher: {stage_key!r} scores {metric.upper()} {check['teacher'][metric]:.2f} on "
            f"{check['examples']} validation examples ({decoding} decoding), and {beaten} ({BASELINES[worst]} is the "
            f"bar to beat); {consequence}. Try more steps (max_steps / epochs) with early stopping on bleu, a "
            f"higher lr or more warmup, {architecture}, or check data.source / data.target{beam_advice}. Set "
            f"on_weak_teacher: {'warn to go on anyway' if policy == 'stop' else 'stop to stop here instead'}.")
