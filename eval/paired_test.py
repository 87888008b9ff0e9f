"""Is a student's BLEU gain over its baseline more than test-set noise? Paired bootstrap resampling of an
evaluate stage's predictions (sacrebleu's `PairedTest`, 1,000 resamples of the test records).

    python eval/paired_test.py runs/study-shakespeare-cpu/eval_seeds ce_seeds kd_seeds_final

BASELINE and SYSTEM are rows of the evaluate stage (its `predictions/ROW.jsonl`). A stage with seed variants
(`ce_seeds@seed0`, `@seed1`, ...) is compared seed by seed (the same seed name on both sides), then with the
seeds pooled: every seed's outputs as one corpus of (seeds x records) lines, so one p-value covers them all.
The p-value is sacrebleu's: two-sided, of "the two differ by as much as they do by chance" (from the spread
of the resampled absolute differences), so read it with the sign of the gain; the 95% interval is the
system's own BLEU over the resamples.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from sacrebleu.metrics import BLEU
from sacrebleu.significance import PairedTest


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


def paired_bleu(baseline: list[str], system: list[str], references: list[str], samples: int = 1000) -> dict:
    """BLEU of both, the gain, the system's bootstrap mean and 95% half-interval, and the two-sided p-value of
    the difference (paired bootstrap over the records, the same resamples for both; sacrebleu fixes
    the resampling seed, 12345, unless SACREBLEU_SEED says otherwise)."""
    test = PairedTest([("baseline", baseline), ("system", system)], {"BLEU": BLEU()}, [references],
                      test_type="bs", n_samples=samples)
    _, scores = test()
    base, sys_ = scores["BLEU"]
    return {"baseline": base.score, "system": sys_.score, "gain": sys_.score - base.score,
            "system_mean": sys_.mean, "system_ci": sys_.ci, "p_value": sys_.p_value}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("eval_dir", type=Path, help="an evaluate stage's folder, e.g. runs/NAME/eval")
    parser.add_argument("baseline", help="the row to beat, e.g. ce_seeds (its variants are paired by name)")
    parser.add_argument("system", help="the row that claims the gain, e.g. kd_seeds_final")
    parser.add_argument("--samples", type=int, default=1000)
    args = parser.parse_args()
    logging.getLogger("sacrebleu").setLevel(logging.ERROR)  # its note on tokenized periods: the data's own format

    base_rows, system_rows = rows_of(args.eval_dir, args.baseline), rows_of(args.eval_dir, args.system)
    pairs = [(v, base_rows[v], system_rows[v]) for v in base_rows if v in system_rows]
    if not pairs:
        raise SystemExit(f"{args.baseline} ({', '.join(base_rows) or 'no variants'}) and {args.system} "
                         f"({', '.join(system_rows) or 'no variants'}) share no variant name to pair")
    pooled = ([], [], [])
    print(f"{'variant':10} {args.baseline:>14} {args.system:>16} {'gain':>6}  {'95% CI of system':>18}  p")
    for variant, base_path, system_path in pairs:
        base, references = read_predictions(base_path)
        system, system_references = read_predictions(system_path)
        if references != system_references:
            raise SystemExit(f"{base_path} and {system_path} score different references: not the same test split")
        r = paired_bleu(base, system, references, args.samples)
        print(f"{variant or '-':10} {r['baseline']:14.2f} {r['system']:16.2f} {r['gain']:+6.2f}  "
              f"{r['system_mean']:8.2f} ± {r['system_ci']:5.2f}     {r['p_value']:.4f}")
        for pool, lines in zip(pooled, (base, system, references)):
            pool += lines
    if len(pairs) > 1:
        r = paired_bleu(*pooled, args.samples)
        print(f"{'pooled':10} {r['baseline']:14.2f} {r['system']:16.2f} {r['gain']:+6.2f}  "
              f"{r['system_mean']:8.2f} ± {r['system_ci']:5.2f}     {r['p_value']:.4f}   "
              f"({len(pairs)} seeds x {len(pooled[2]) // len(pairs)} records)")


if __name__ == "__main__":
    main()
