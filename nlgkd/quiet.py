"""A quiet console: the library messages nlgkd knows to be harmless are dropped at their source.

Log records are matched by their logger and text, so any other warning still shows; progress bars are
switched off by their library's own switch:

    accelerate   "Removed shared tensor {...} while saving": every checkpoint of a model with tied embeddings
                 (all of nlgkd's fresh models). safetensors stores a shared tensor once; loading re-ties it,
                 and a test resumes from such a checkpoint and compares the weights.
    sacrebleu    three lines per scored model when 100 outputs end in " .": on tokenized data (the study's
                 Shakespeare files are) every model and baseline is scored alike, so the comparison holds.
    datasets     all its progress bars: the "Map" and "Generating train split" bars of loading and tokenizing
                 a split (fast, and they interleave with nlgkd's one bar per stage), and so also the bar of
                 a hub dataset's download (`-v` shows it).
    transformers the "Loading weights" and "Writing model shards" bars of reading and writing a local model
                 folder (`quiet_weight_bars`; a download from the hub keeps its bar).

`nlgkd -v …` (or NLGKD_VERBOSE=1, which `--jobs` passes on to its stage processes) keeps them all.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys

# logger name -> texts of its records that are dropped
HARMLESS = {
    "accelerate.utils.other": ("Removed shared tensor",),
    "sacrebleu": ("100 lines that end in a tokenized period", "forgot to detokenize",
                  "you can suppress this message with the `force` parameter"),
}


class DropKnownNoise(logging.Filter):
    def __init__(self, texts: tuple[str, ...]):
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self.texts)


def verbose() -> bool:
    return os.environ.get("NLGKD_VERBOSE", "") not in ("", "0")


def quiet_known_noise() -> None:
    """Install the filters (once per process; a no-op with NLGKD_VERBOSE)."""
    if verbose():
        return
    for name, texts in HARMLESS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropKnownNoise) for f in logger.filters):
            logger.addFilter(DropKnownNoise(texts))
    # datasets reads this when it is imported (not now: a re-run that skips every stage imports no library)
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()


@contextlib.contextmanager
def quiet_weight_bars():
    """No transformers progress bars inside (a local model folder loads or saves in a fraction of a second)."""
    if verbose():
        yield
        return
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()
