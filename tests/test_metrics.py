"""Text metrics, parameter counting, peak memory and tables."""

import pytest
import torch

from nlgkd.metrics import PeakMemory, format_table, text_metrics

SENTENCES = [
    "the eagle is a cheap pub in the riverside area near the mill",
    "zizzi serves italian food and has a high customer rating",
    "there is a family friendly coffee shop in the city centre",
]


def test_identical_texts_score_100():
    m = text_metrics(SENTENCES, SENTENCES)
    for key in ("bleu", "chrf", "rouge1", "rouge2", "rougeL"):
        assert m[key] == pytest.approx(100.0), key
    assert m["n"] == 3
    assert m["pred_len"] == m["ref_len"] == pytest.approx(sum(len(s.split()) for s in SENTENCES) / 3)


def test_unrelated_text_scores_low():
    preds = ["quantum chromodynamics describes strong interactions between quarks"] * 3
    m = text_metrics(preds, SENTENCES)
    assert m["bleu"] < 5
    assert m["rouge2"] == 0.0
    assert m["chrf"] < 25


def test_rouge_hand_computed():
    # pred vs ref share 5 of 6 unigrams ("the" twice), 3 of 5 bigrams, LCS "the cat on the mat" = 5.
    # A second, empty prediction scores 0 and halves the means.
    m = text_metrics(["the cat sat on the mat", ""], ["the cat is on the mat", "a dog barked"])
    assert m["rouge1"] == pytest.approx(100 * (5 / 6) / 2)
    assert m["rouge2"] == pytest.approx(100 * (3 / 5) / 2)
    assert m["rougeL"] == pytest.approx(100 * (5 / 6) / 2)
    assert m["pred_len"] == 3.0 and m["ref_len"] == 4.5


def test_multiple_references_per_prediction():
    preds = [SENTENCES[0], SENTENCES[1]]
    refs = [["something else entirely", SENTENCES[0]], [SENTENCES[1]]]  # uneven counts
    m = text_metrics(preds, refs)
    assert m["bleu"] == pytest.approx(100.0)
    assert m["rouge1"] == pytest.approx(100.0)  # best reference counts
    assert m["ref_len"] == pytest.approx((3 + len(SENTENCES[1].split())) / 2)  # first reference


def test_empty_predictions_do_not_crash():
    m = text_metrics(["", ""], ["a b c d", "e f g h"])
    assert m["bleu"] == 0.0 and m["rouge1"] == 0.0 and m["pred_len"] == 0.0
    assert text_metrics([], [])["n"] == 0
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        text_metrics(["a", "b"], ["a"])


def test_peak_memory_cpu_is_the_blocks_own_peak():
    """On Linux the RSS peak is reset on entry: an earlier, larger spike of the process is not in a later
    block's peak (each evaluated model gets its own number), while the block's own allocation is."""
    from nlgkd.metrics import _rss_peak_since_reset

    spike = b"\x01" * (256 * 2**20)
    del spike
    peak_with_spike = _rss_peak_since_reset()
    with PeakMemory("cpu") as mem:
        block = b"\x01" * (32 * 2**20)
    del block
    assert set(mem.as_dict()) == {"kind", "device", "peak_mb", "delta_mb"}
    if mem.kind == "cpu_max_rss":
        pytest.skip("no resettable RSS peak here (/proc/self/clear_refs): the lifetime high-water mark is used")
    assert mem.kind == "cpu_peak_rss"
    assert mem.delta_bytes >= 31 * 2**20 and mem.peak_bytes >= mem.start_bytes
    assert mem.peak_bytes <= peak_with_spike - 200 * 2**20  # the earlier 256 MB spike is not counted


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_peak_memory_cuda():
    with PeakMemory("cuda") as mem:
        x = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")
        del x
    assert mem.kind == "cuda_max_allocated"
    assert mem.delta_bytes >= 64 * 2**20


ROWS = [{"model": "teacher", "bleu": 61.234, "params": 1200000},
        {"model": "student-kd", "bleu": 7.5}]


def test_format_table_aligns_columns():
    text = format_table(ROWS, ["model", "bleu", "params"])
    lines = text.splitlines()
    assert lines[0].split() == ["model", "bleu", "params"]
    assert set(lines[1]) <= {"-", " "}
    assert "61.23" in lines[2] and "7.50" in lines[3]
    # numbers are right-aligned: the decimal points line up
    assert lines[2].index("61.23") + 2 == lines[3].index("7.50") + 1
    assert lines[3].rstrip().endswith("7.50")  # missing "params" is an empty cell
