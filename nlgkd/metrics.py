"""Quality and cost metrics: BLEU/chrF/ROUGE, lengths, peak memory, tables.

``text_metrics`` is what every evaluation reports; ``PeakMemory`` (with transformers' ``num_parameters()``)
is the cost side of the study's tables; ``format_table`` prints them.
"""

from __future__ import annotations

import resource
import sys

# sacrebleu, rouge_score and torch are imported inside the functions that need them, so that
# formatting a table or reading this module never pays for (or depends on) those imports.


def _reference_streams(references: list[list[str]]) -> list[list[str]]:
    """Transpose per-example reference lists into sacrebleu's reference streams.

    Examples with fewer references than the maximum are padded with None, which sacrebleu
    (>= 2.0) accepts as "no reference in this stream for this sentence".
    """
    n_streams = max(len(refs) for refs in references)
    return [[refs[i] if i < len(refs) else None for refs in references] for i in range(n_streams)]


def text_metrics(predictions: list[str], references: list[str] | list[list[str]]) -> dict:
    """Corpus-level text quality of ``predictions`` against ``references``.

    ``references`` is either one reference per prediction (``list[str]``) or several per
    prediction (``list[list[str]]``; the counts may differ between examples).

    Returns a dict with:
      - ``bleu``, ``chrf``: sacrebleu corpus BLEU (13a tokenization) and chrF, 0-100;
      - ``rouge1``, ``rouge2``, ``rougeL``: rouge_score F-measure, mean over examples, x100
        (Porter stemming; with several references the best-scoring one counts). rouge_score's
        default tokenizer keeps only [a-z0-9], so ROUGE is meaningful for English-like text only;
      - ``pred_len``, ``ref_len``: mean length in whitespace words (ref_len: of the first reference);
      - ``n``: number of examples.
    Empty predictions score 0 on their example and never crash.
    """
    if len(predictions) != len(references):
        raise ValueError(
            f"text_metrics: {len(predictions)} predictions but {len(references)} references; "
            "there must be one reference (or one list of references) per prediction"
        )
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    for i, r in enumerate(refs):
        if not r:
            raise ValueError(f"text_metrics: example {i} has an empty list of references")
    predictions = [p if p is not None else "" for p in predictions]
    n = len(predictions)
    if n == 0:
        return {"bleu": 0.0, "chrf": 0.0, "rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0,
                "pred_len": 0.0, "ref_len": 0.0, "n": 0}

    import sacrebleu
    from rouge_score import rouge_scorer

    streams = _reference_streams(refs)
    bleu = sacrebleu.corpus_bleu(predictions, streams).score
    chrf = sacrebleu.corpus_chrf(predictions, streams).score

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for prediction, example_refs in zip(predictions, refs):
        scores = scorer.score_multi(example_refs, prediction)
        for key in totals:
            totals[key] += scores[key].fmeasure

    return {
        "bleu": bleu,
        "chrf": chrf,
        **{key: 100.0 * total / n for key, total in totals.items()},
        "pred_len": sum(len(p.split()) for p in predictions) / n,
        "ref_len": sum(len(r[0].split()) for r in refs) / n,
        "n": n,
    }


def _max_rss_bytes() -> int:
    """The process's resident-set high-water mark in bytes (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _reset_rss_peak() -> int | None:
    """Reset the process's resident-set high-water mark (Linux >= 4.0: writing 5 to /proc/self/clear_refs), so
    later readings of VmHWM cover only what runs after this; the reading right after, or None where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return None
    return _rss_peak_since_reset()


def _rss_peak_since_reset() -> int | None:
    """VmHWM of /proc/self/status in bytes: the resident-set peak since the last reset (or the start)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """Context manager that measures the peak memory used by the code inside it.

    On CUDA: ``peak_bytes`` is ``torch.cuda.max_memory_allocated`` after resetting the peak
    statistics on entry (tensor memory of this process on that device; the allocator's cache and
    other processes are not counted), and ``delta_bytes`` is that peak minus what was allocated on
    entry.

    On CPU (Linux): the process's resident-set peak is reset on entry (``/proc/self/clear_refs``), so
    ``peak_bytes`` is the process's largest RSS while the block ran (kind ``cpu_peak_rss``: what the
    process held then, libraries and data included, with this block's own peak) and ``delta_bytes``
    how far it rose above the RSS on entry. Where the reset is not possible (macOS), ``peak_bytes``
    is the lifetime max RSS (``resource.getrusage``, kind ``cpu_max_rss``), which an earlier, larger
    block hides.

    Example::

        with PeakMemory("cuda") as mem:
            model.generate(**batch)
        print(mem.peak_mb, mem.kind)
    """

    def __init__(self, device="cpu"):
        self.device = str(device)
        self.is_cuda = self.device.startswith("cuda")
        self.kind = "cuda_max_allocated" if self.is_cuda else "cpu_max_rss"  # cpu_peak_rss once reset
        self.start_bytes = 0
        self.peak_bytes = 0
        self.delta_bytes = 0

    def __enter__(self) -> "PeakMemory":
        if self.is_cuda:
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
        elif (start := _reset_rss_peak()) is not None:
            self.kind = "cpu_peak_rss"  # the process's RSS peak inside this block only
            self.start_bytes = start
        else:
            self.start_bytes = _max_rss_bytes()
        return self

    def __exit__(self, *exc) -> bool:
        if self.is_cuda:
            import torch

            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        elif self.kind == "cpu_peak_rss":
            self.peak_bytes = _rss_peak_since_reset()
        else:
            self.peak_bytes = _max_rss_bytes()
        self.delta_bytes = max(0, self.peak_bytes - self.start_bytes)
        return False

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20

    @property
    def delta_mb(self) -> float:
        return self.delta_bytes / 2**20

    def as_dict(self) -> dict:
        """A JSON-friendly summary for metrics.json."""
        return {"kind": self.kind, "device": self.device,
                "peak_mb": round(self.peak_mb, 2), "delta_mb": round(self.delta_mb, 2)}


def _cell(value, precision: int) -> str:
    """Format one table cell: floats with fixed precision, None as empty."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{precision}f}"
    return str(value)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def format_table(rows: list[dict], columns: list[str], precision: int = 2) -> str:
    """A plain text table for the terminal: one header line, a rule, one line per row.

    Numbers are right-aligned, everything else left-aligned; missing keys print as empty cells.
    """
    cells = [[_cell(row.get(col), precision) for col in columns] for row in rows]
    widths = [max([len(col)] + [len(line[i]) for line in cells]) for i, col in enumerate(columns)]
    numeric = [any(_is_number(row.get(col)) for row in rows) for col in columns]

    def render(values: list[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    lines = [render(list(columns)), "  ".join("-" * w for w in widths)]
    lines += [render(line) for line in cells]
    return "\n".join(lines)
