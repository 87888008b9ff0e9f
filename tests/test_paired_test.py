"""eval/paired_test.py: the paired bootstrap behind the significance figures in eval/README.md."""
import importlib.util
import json
from pathlib import Path

import pytest
import sacrebleu

spec = importlib.util.spec_from_file_location("paired_test", Path(__file__).parents[1] / "eval" / "paired_test.py")
paired_test = importlib.util.module_from_spec(spec)
spec.loader.exec_module(paired_test)

REFERENCES = [f"the {w} sat on the mat near house number {i} ." for i, w in enumerate(["cat", "dog", "bird"] * 20)]
WORSE = [f"a {w} was on a mat by house {i} ." for i, w in enumerate(["cat", "dog", "bird"] * 20)]


def test_a_clearly_better_system_is_significant_and_scores_are_sacrebleus():
    result = paired_test.paired_bleu([WORSE], [REFERENCES], REFERENCES, samples=200)
    assert result["baseline"] == pytest.approx(sacrebleu.corpus_bleu(WORSE, [REFERENCES]).score)
    assert result["system"] == pytest.approx(100.0)
    assert result["gain_low"] > 0 and result["p_value"] == 0.0


def test_a_one_line_change_is_a_small_gain_and_not_significant():
    system = [REFERENCES[0].replace("mat", "floor")] + WORSE[1:]  # one line of sixty rewritten
    result = paired_test.paired_bleu([WORSE], [system], REFERENCES, samples=200)
    assert 0 < result["gain"] < 5 and result["gain_low"] <= 0 and result["p_value"] > 0.05


def test_pooled_seeds_are_bleu_of_all_outputs_and_repeating_a_seed_adds_no_evidence():
    half = [r if i % 2 else w for i, (r, w) in enumerate(zip(REFERENCES, WORSE))]
    pooled = paired_test.paired_bleu([WORSE, WORSE], [half, REFERENCES], REFERENCES, samples=200)
    assert pooled["system"] == pytest.approx(sacrebleu.corpus_bleu(half + REFERENCES, [REFERENCES * 2]).score)
    # resampling records, not lines: the same outputs 4 times are as uncertain as once
    once = paired_test.paired_bleu([WORSE], [half], REFERENCES, samples=300)
    four = paired_test.paired_bleu([WORSE] * 4, [half] * 4, REFERENCES, samples=300)
    assert four["gain"] == pytest.approx(once["gain"], rel=0.02)  # BLEU's smoothing sees 4x the counts
    # resampling lines would halve the interval (sqrt(4) x the lines); records keep it
    assert four["gain_high"] - four["gain_low"] == pytest.approx(once["gain_high"] - once["gain_low"], rel=0.1)


def write_rows(folder: Path, rows: dict[str, list[str]]) -> None:
    folder.mkdir(parents=True)
    for name, predictions in rows.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps({"prediction": p, "reference": r}) + "\n"
                                                      for p, r in zip(predictions, REFERENCES)))


def test_variants_pair_by_name_a_plain_row_pairs_with_each_and_seeds_pool(tmp_path, capsys):
    write_rows(tmp_path / "predictions", {"ce@seed0": WORSE, "ce@seed1": WORSE, "ce@seed2": WORSE,
                                          "kd@seed0": REFERENCES, "kd@seed1": WORSE, "copy": WORSE})
    results = dict(paired_test.compare(tmp_path, "ce", "kd", samples=50))
    assert list(results) == ["seed0", "seed1", "pooled"]  # seed2 has no kd partner: named, left out
    assert "left out, no partner on the other side: seed2" in capsys.readouterr().err
    assert results["seed1"]["gain"] == 0 and results["seed0"]["system"] == pytest.approx(100.0)
    assert results["pooled"]["system"] == pytest.approx(sacrebleu.corpus_bleu(REFERENCES + WORSE,
                                                                              [REFERENCES * 2]).score)
    assert list(dict(paired_test.compare(tmp_path, "copy", "kd", samples=50))) == ["seed0", "seed1", "pooled"]
    other = tmp_path / "other"  # a baseline scored by another evaluate stage of the same split
    write_rows(other / "predictions", {"ce@seed0": REFERENCES})
    assert paired_test.compare(tmp_path, "ce", "kd", samples=50, baseline_dir=other)[0][1]["gain"] == 0
    with pytest.raises(SystemExit, match="no predictions of 'kd_final'; its rows: ce@seed0, ce@seed1, ce@seed2"):
        paired_test.compare(tmp_path, "ce", "kd_final")
