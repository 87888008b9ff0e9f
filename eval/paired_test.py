"""Is a student's BLEU gain over its baseline more than test-set noise? Paired bootstrap over the test records
of an evaluate stage's predictions (Koehn, 2004).

    python eval/paired_test.py runs/study-shakespeare-cpu/eval_seeds ce_seeds kd_seeds_final
    python eval/paired_test.py runs/study-shakespeare-cpu/eval_seeds copy_source teacher
    python eval/paired_test.py runs/study-shakespeare-cpu/eval_pts s3_objective@logits_kd \
        s5_s7_pseudo_targets@beam_train --baseline-from runs/study-shakespeare-cpu/eval

BASELINE and SYSTEM are rows of the evaluate stage (its `predictions/ROW.jsonl`). A stage with seed variants
(`ce_seeds@seed0`, `@seed1`, ...) is compared seed by seed (the same variant name on both sides; a plain row
such as `teacher` or `copy_source` is compared with every variant of the other side), then with the seeds
pooled: BLEU of all seeds' outputs together, where each resample draws test records and keeps every seed's
output of a drawn record (the seeds' outputs of one record share its source and reference, so they are not
independent lines).

Each resample draws the test records with replacement, the same records for both sides, and scores BLEU from
sacrebleu's sufficient statistics. Printed: both BLEUs, the gain, its 95% interval over the resamples, and
p = the share of resamples in which the system is not better than the baseline (one-sided). This covers the
noise of a finite test set, not the spread between training seeds: that is the seeds' sd.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
from sacrebleu.metrics import BLEU


def read_predictions(path: Path) -> tuple[list[str], list[str]]:
    """(predictions, references) of one `predictions/ROW.jsonl` file."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r["prediction"] for r in rows], [r["reference"] for r in rows]


def rows_of(eval_dir: Path, name: str) -> dict[str, Path]:
    """variant ('' for a plain row) -> predictions file, for the row NAME or its variants NAME@VARIANT."""
    folder = eval_dir / "predictions"
    plain = folder / f"{name}.jsonl"
    if plain.exists():
        return {"": plain}
    found = {p.stem.split("@", 1)[1]: p for p in sorted(folder.glob(f"{name}@*.jsonl"))}
    if not found:
        known = sorted(p.stem for p in folder.glob("*.jsonl"))
        raise SystemExit(f"{folder}: no predictions of {name!r}; its rows: {', '.join(known)}")
    return found


def pair_rows(baseline: dict[str, Path], system: dict[str, Path]) -> tuple[list[tuple[str, Path, Path]], list[str]]:
    """(variant, baseline file, system file) pairs, and the variants of either side left without a partner.
    A plain row ('' only) pairs with every variant of the other side."""
    if list(baseline) == [""]:
        return [(v, baseline[""], path) for v, path in system.items()], []
    if list(system) == [""]:
        return [(v, path, system[""]) for v, path in baseline.items()], []
    pairs = [(v, baseline[v], system[v]) for v in baseline if v in system]
    return pairs, sorted(set(baseline) ^ set(system))


def record_statistics(outputs: list[list[str]], references: list[str]) -> np.ndarray:
    """BLEU's sufficient statistics per test record, summed over the outputs of every seed in `outputs`
    (seeds x records): shape (records, statistics)."""
    bleu = BLEU()
    # sacrebleu's own paired test scores resamples from these statistics; they have no public name
    return sum(np.array(bleu._extract_corpus_statistics(hyps, [references]), dtype=np.int64) for hyps in outputs)


def paired_bleu(baseline: list[list[str]], system: list[list[str]], references: list[str], samples: int = 1000,
                seed: int = 12345) -> dict:
    """Paired bootstrap over the records. `baseline`, `system`: seeds x records outputs (one seed: a list of one
    list). Returns both BLEUs, the gain, its 95% interval over the resamples and the one-sided p-value."""
    bleu = BLEU()
    base_stats, system_stats = record_statistics(baseline, references), record_statistics(system, references)

    def score(stats: np.ndarray) -> float:
        return bleu._compute_score_from_stats(list(stats)).score

    indices = np.random.default_rng(seed).integers(0, len(references), size=(samples, len(references)))
    gains = np.array([score(system_stats[i].sum(0)) - score(base_stats[i].sum(0)) for i in indices])
    base, sys_ = score(base_stats.sum(0)), score(system_stats.sum(0))
    low, high = np.percentile(gains, [2.5, 97.5])
    return {"baseline": base, "system": sys_, "gain": sys_ - base, "gain_low": float(low), "gain_high": float(high),
            "p_value": float((gains <= 0).mean())}


def compare(eval_dir: Path, baseline: str, system: str, samples: int = 1000,
            baseline_dir: Path | None = None) -> list[tuple[str, dict]]:
    """(variant or 'pooled', paired_bleu result) for every pair of rows, then the seeds pooled when there are
    several; the variants left without a partner are named on stderr. `baseline_dir`: another evaluate stage
    of the same split holding the baseline's rows (default: `eval_dir`)."""
    pairs, unpaired = pair_rows(rows_of(baseline_dir or eval_dir, baseline), rows_of(eval_dir, system))
    if unpaired:
        print(f"left out, no partner on the other side: {', '.join(unpaired)}", file=sys.stderr)
    if not pairs:
        raise SystemExit(f"{baseline} and {system} share no variant name to pair")
    results, pooled_base, pooled_system, references = [], [], [], None
    for variant, base_path, system_path in pairs:
        base, base_references = read_predictions(base_path)
        out, system_references = read_predictions(system_path)
        if base_references != system_references or (references is not None and references != base_references):
            raise SystemExit(f"{base_path} and {system_path} score different references: not the same test split")
        references = base_references
        results.append((variant or "-", paired_bleu([base], [out], references, samples)))
        pooled_base.append(base)
        pooled_system.append(out)
    if len(pairs) > 1:
        results.append(("pooled", paired_bleu(pooled_base, pooled_system, references, samples)))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("eval_dir", type=Path, help="an evaluate stage's folder, e.g. runs/NAME/eval")
    parser.add_argument("baseline", help="the row to beat, e.g. ce_seeds (its variants are paired by name)")
    parser.add_argument("system", help="the row that claims the gain, e.g. kd_seeds_final")
    parser.add_argument("--samples", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--baseline-from", type=Path, metavar="EVAL_DIR",
                        help="the baseline's rows are in this evaluate stage (the same split), not in eval_dir")
    args = parser.parse_args()
    logging.getLogger("sacrebleu").setLevel(logging.ERROR)  # its note on tokenized periods: the data's own format
    print(f"{'variant':10} {args.baseline:>16} {args.system:>16} {'gain':>6}  {'95% interval':>15}  p (not better)")
    for variant, r in compare(args.eval_dir, args.baseline, args.system, args.samples, args.baseline_from):
        print(f"{variant:10} {r['baseline']:16.2f} {r['system']:16.2f} {r['gain']:+6.2f}  "
              f"[{r['gain_low']:+5.2f}, {r['gain_high']:+5.2f}]  {r['p_value']:.3f}")


if __name__ == "__main__":
    main()
