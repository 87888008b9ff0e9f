"""The one name nlgkd reads differently across the transformers releases it supports.

transformers 5.24 renamed the cache argument of every model's forward and `generate` from `past_key_values`
to `cache` (the old name still works on transformer models, through a rename with a deprecation warning;
a custom model such as the LSTM student receives `cache=` and must read it). Detected from the output class
rather than from the version string, so a backport or a pre-release behaves as what it is."""
from __future__ import annotations

import dataclasses

from transformers.modeling_outputs import Seq2SeqLMOutput

#: The keyword `generate` passes the previous step's cache under, and the output field it reads it back from.
CACHE_KWARG = "cache" if "cache" in {f.name for f in dataclasses.fields(Seq2SeqLMOutput)} else "past_key_values"
