"""What CTranslate2 cannot decode the way transformers does: one check, for the engine runtime (nlgkd/engine.py)
and for recipes read before anything runs (a pseudo_targets stage with engine: ctranslate2)."""
from __future__ import annotations


def ctranslate2_refusal(decoding) -> str | None:
    """Why CTranslate2 cannot decode as `decoding` (a DecodingConfig) says (None: it can, with the same
    meaning); the message names the field and what to do."""
    if decoding.strategy not in ("greedy", "beam", "sample"):
        return (f"decoding.strategy: {decoding.strategy!r} is not available on a CTranslate2 model; use greedy, "
                "beam or sample")
    if decoding.from_checkpoint:
        return (f"decoding.from_checkpoint: {decoding.from_checkpoint} is not available on a CTranslate2 export (it "
                "keeps no generation_config); write those settings into the decoding block")
    if decoding.repetition_penalty != 1.0:  # measured: the float32 engine then ended outputs earlier
        return ("decoding.repetition_penalty: transformers also penalizes the decoder's start token or the "
                "prompt, CTranslate2 only generated tokens, so CTranslate2 would decode otherwise; set it to 1.0 to "
                "decode with CTranslate2, or decode with the PyTorch model")
    if decoding.strategy == "beam" and not decoding.early_stopping:  # CTranslate2 ends once beam_size outputs ended
        return ("decoding.early_stopping: false has no CTranslate2 equivalent (its beam search ends once "
                "num_beams outputs have ended); set it to true to decode with CTranslate2")
    return None
