"""Quiet by default: the known-harmless library messages are dropped, any other message still shows, and
`nlgkd -v` keeps them all."""
from __future__ import annotations

import logging
import os
import re

import pytest

from nlgkd import quiet


@pytest.fixture
def fresh_filters(monkeypatch):
    """Run with no nlgkd filters on the loggers, and remove the ones the test installs."""
    monkeypatch.delenv("NLGKD_VERBOSE", raising=False)
    loggers = [logging.getLogger(name) for name in quiet.HARMLESS]
    saved = [list(logger.filters) for logger in loggers]
    for logger in loggers:
        logger.filters = [f for f in logger.filters if not isinstance(f, quiet.DropKnownNoise)]
    yield
    for logger, filters in zip(loggers, saved):
        logger.filters = filters


def tied_checkpoint(tmp_path) -> None:
    """accelerate.save_state of a model with tied input and output embeddings (every fresh nlgkd model)."""
    import torch
    from accelerate import Accelerator

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(5, 3)
            self.head = torch.nn.Linear(3, 5, bias=False)
            self.head.weight = self.embed.weight

    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(Tied())
    accelerator.save_state(str(tmp_path / "checkpoint"))
    assert model.head.weight is model.embed.weight


def test_known_noise_is_dropped_and_other_warnings_stay(fresh_filters, caplog, tmp_path):
    with caplog.at_level(logging.WARNING):
        tied_checkpoint(tmp_path / "loud")
    assert any("Removed shared tensor" in r.getMessage() for r in caplog.records)  # what the filter is for
    caplog.clear()

    quiet.quiet_known_noise()
    quiet.quiet_known_noise()  # twice: still one filter
    assert sum(isinstance(f, quiet.DropKnownNoise) for f in logging.getLogger("accelerate.utils.other").filters) == 1
    with caplog.at_level(logging.WARNING):
        tied_checkpoint(tmp_path / "quiet")
        logging.getLogger("accelerate.utils.other").warning("something else went wrong")
    messages = [r.getMessage() for r in caplog.records]
    assert not any("Removed shared tensor" in m for m in messages)
    assert any("something else went wrong" in m for m in messages)


def test_scoring_tokenized_outputs_prints_no_sacrebleu_warning(fresh_filters, caplog):
    from nlgkd.metrics import text_metrics

    quiet.quiet_known_noise()
    with caplog.at_level(logging.WARNING):
        text_metrics(["a tokenized line ."] * 120, ["a tokenized line ."] * 120)
    assert not [r for r in caplog.records if r.name == "sacrebleu"]
    logging.getLogger("sacrebleu").filters.clear()
    with caplog.at_level(logging.WARNING):
        text_metrics(["a tokenized line ."] * 120, ["a tokenized line ."] * 120)
    assert any("detokenize" in r.getMessage() for r in caplog.records)  # what the filter is for


def test_verbose_keeps_everything(fresh_filters, monkeypatch, caplog):
    from nlgkd.cli import main

    monkeypatch.setattr(os, "environ", {**os.environ})  # -v writes NLGKD_VERBOSE for --jobs' children
    assert main(["-v", "stages"]) == 0
    assert os.environ["NLGKD_VERBOSE"] == "1"
    with caplog.at_level(logging.WARNING):
        logging.getLogger("sacrebleu").warning("It looks like you forgot to detokenize your test data")
    assert any("detokenize" in r.getMessage() for r in caplog.records)


def test_a_run_prints_no_warning_lines(tmp_path, tiny_recipe):
    """The console of a whole `nlgkd run` (training with checkpoints of a tied-embedding model, validation,
    evaluation) as a user sees it: progress bars and nlgkd's own lines, no library warnings."""
    import subprocess
    import sys

    import yaml

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe))
    env = {k: v for k, v in os.environ.items() if k not in ("NLGKD_VERBOSE", "HF_DATASETS_DISABLE_PROGRESS_BARS")}
    done = subprocess.run([sys.executable, "-m", "nlgkd", "run", str(recipe), "--runs-dir", str(tmp_path / "runs")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "runs" / "tiny" / "eval" / "metrics.json").exists()
    # stderr holds the progress bars (tqdm: "desc: 40%|####  | 2/5 [...]") and nothing else
    errors = [line.strip() for line in done.stderr.replace("\r", "\n").splitlines()]
    assert not [line for line in errors if line and "%|" not in line]
    lines = done.stdout.splitlines()
    assert any(line.startswith("torch uses ") for line in lines)
    assert not [line for line in lines if re.search(r"\bwarn(ing)?\b", line, re.I) and not line.startswith("[")]
    assert "\x1b[A" not in done.stderr  # no nested bars tearing each other
