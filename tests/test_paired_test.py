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
    result = paired_test.paired_bleu(WORSE, REFERENCES, REFERENCES, samples=200)
    assert result["baseline"] == pytest.approx(sacrebleu.corpus_bleu(WORSE, [REFERENCES]).score)
    assert result["system"] == pytest.approx(100.0)
    assert result["gain"] == pytest.approx(result["system"] - result["baseline"]) and result["gain"] > 0
    assert result["p_value"] < 0.05


def test_a_one_word_change_is_a_small_gain_and_not_significant():
    system = [REFERENCES[0].replace("mat", "floor")] + WORSE[1:]  # one line of sixty rewritten
    result = paired_test.paired_bleu(WORSE, system, REFERENCES, samples=200)
    assert 0 < result["gain"] < 5 and result["p_value"] > 0.05


def test_variants_pair_by_name_and_a_missing_row_names_the_rows_there(tmp_path):
    folder = tmp_path / "predictions"
    folder.mkdir()
    for name in ("ce@seed0", "ce@seed1", "kd@seed1", "teacher"):
        (folder / f"{name}.jsonl").write_text(json.dumps({"prediction": "x", "reference": "y"}) + "\n")
    assert set(paired_test.rows_of(tmp_path, "ce")) == {"seed0", "seed1"}
    assert set(paired_test.rows_of(tmp_path, "teacher")) == {""}
    with pytest.raises(SystemExit, match="no predictions of 'kd_final'; its rows: ce@seed0, ce@seed1, kd@seed1"):
        paired_test.rows_of(tmp_path, "kd_final")
