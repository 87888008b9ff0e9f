"""Write the data files of the study recipes (recipes/study/<task>.yaml): needs the network.

    python eval/prepare_study_data.py xsum
    python eval/prepare_study_data.py squad_qg
    python eval/prepare_study_data.py art
    python eval/prepare_study_data.py shakespeare --source-dir PATH   # Xu et al. (2012) aligned play files

Each task becomes data/study/<task>/{train,unlabeled,validation,test}.jsonl with the columns the recipe's
templates read. Labeled and unlabeled examples are disjoint, drawn from the task's training data with a
fixed seed; the unlabeled file keeps its targets out (only the source columns). The sizes below are this
toolkit's medium-resource setting (a labeled set, a larger pool of unlabeled inputs), not the paper's
exact numbers; pass --labeled / --unlabeled to change them.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

# task -> (hub dataset, labeled, unlabeled, validation size taken from the training data when the hub has
# no separate split, source columns)
TASKS = {
    "xsum": ("EdinburghNLP/xsum", 20000, 80000, None, ["document"]),
    "squad_qg": ("rajpurkar/squad", 10000, 40000, 2000, ["context", "answer"]),
    "art": ("allenai/art", 10000, 40000, 2000, ["obs1", "obs2"]),
    "shakespeare": (None, 8000, 8000, 1000, ["original"]),
}


def xsum_rows(split) -> list[dict]:
    return [{"document": r["document"], "summary": r["summary"]} for r in split]


def squad_rows(split) -> list[dict]:
    # one row per question; the first annotated answer is the one the question is generated for
    return [{"context": r["context"], "answer": r["answers"]["text"][0], "question": r["question"]}
            for r in split if r["answers"]["text"]]


def art_rows(split) -> list[dict]:
    # aNLI rows give two hypotheses and the label of the plausible one: that one is the target; the same
    # observation pair appears with many hypothesis pairs, so keep one row per (pair, hypothesis)
    seen, rows = set(), []
    for r in split:
        hypothesis = r["hypothesis_1"] if int(r["label"]) == 1 else r["hypothesis_2"]
        key = (r["observation_1"], r["observation_2"], hypothesis)
        if int(r["label"]) in (1, 2) and key not in seen:
            seen.add(key)
            rows.append({"obs1": r["observation_1"], "obs2": r["observation_2"], "hypothesis": hypothesis})
    return rows


def shakespeare_rows(source_dir: Path) -> list[dict]:
    """Pairs from Xu et al.'s aligned files: every `<play>_original.snt.aligned` with its
    `<play>_modern.snt.aligned`, line by line."""
    rows = []
    for original in sorted(source_dir.rglob("*_original.snt.aligned")):
        modern = original.with_name(original.name.replace("_original", "_modern"))
        if not modern.exists():
            raise SystemExit(f"{original}: no matching {modern.name}")
        a = original.read_text(encoding="utf-8").splitlines()
        b = modern.read_text(encoding="utf-8").splitlines()
        rows += [{"original": x.strip(), "modern": y.strip()} for x, y in zip(a, b) if x.strip() and y.strip()]
    if not rows:
        raise SystemExit(f"{source_dir}: no *_original.snt.aligned files found")
    return rows


def split_rows(train: list[dict], test: list[dict] | None, labeled: int, unlabeled: int, validation: int | None,
               validation_rows: list[dict] | None, seed: int) -> dict[str, list[dict]]:
    """Disjoint labeled / unlabeled / validation sets from a shuffled copy of `train` (validation only when
    the hub has none); `test` is the hub's held-out split, or a further slice of `train` when there is none."""
    rows = list(train)
    random.Random(seed).shuffle(rows)
    out = {}
    if validation_rows is None:
        validation_rows, rows = rows[:validation], rows[validation:]
    if test is None:
        test, rows = rows[:validation], rows[validation:]
    out["validation"], out["test"] = validation_rows, test
    out["train"], out["unlabeled"] = rows[:labeled], rows[labeled: labeled + unlabeled]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("--out", default="data/study", help="folder; the task gets a subfolder")
    parser.add_argument("--labeled", type=int, help="labeled training examples (default: see TASKS)")
    parser.add_argument("--unlabeled", type=int, help="unlabeled inputs (default: see TASKS)")
    parser.add_argument("--source-dir", type=Path, help="shakespeare: folder with Xu et al.'s aligned files")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    hub, labeled, unlabeled, validation, source_columns = TASKS[args.task]
    labeled = labeled if args.labeled is None else args.labeled
    unlabeled = unlabeled if args.unlabeled is None else args.unlabeled

    if args.task == "shakespeare":
        if args.source_dir is None:
            raise SystemExit("shakespeare: pass --source-dir, the folder of Xu et al. (2012)'s aligned "
                             "*_original.snt.aligned / *_modern.snt.aligned files")
        splits = split_rows(shakespeare_rows(args.source_dir), None, labeled, unlabeled, validation, None, args.seed)
    else:
        import datasets

        loaded = datasets.load_dataset(hub)
        to_rows = {"xsum": xsum_rows, "squad_qg": squad_rows, "art": art_rows}[args.task]
        if args.task == "xsum":  # train / validation / test on the hub
            splits = split_rows(to_rows(loaded["train"]), to_rows(loaded["test"]), labeled, unlabeled, None,
                                to_rows(loaded["validation"]), args.seed)
        else:  # train / validation only: the hub's validation is our test, validation comes from train
            splits = split_rows(to_rows(loaded["train"]), to_rows(loaded["validation"]), labeled, unlabeled,
                                validation, None, args.seed)

    folder = Path(args.out) / args.task
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        if name == "unlabeled":
            rows = [{k: r[k] for k in source_columns} for r in rows]
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"{folder / (name + '.jsonl')}: {len(rows)} rows")


if __name__ == "__main__":
    main()
