"""Estimated FLOPs per generated token of a saved encoder-decoder (or LSTM) model, read from its config.json
and the tensor shapes in its safetensors headers: no weights are loaded. `nlgkd report`'s MFLOPs/tok column."""
from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path


def safetensors_shapes(model_dir: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from the headers of a folder's *.safetensors files (no tensor is loaded)."""
    shapes = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


# tensors that are looked up (embeddings) or cost nothing per token (position biases); the LM head is
# counted separately as 2 * d_model * vocab
EMBEDDING = re.compile(r"(embed_tokens|embed_positions|shared\.|wte\.|wpe\.|lm_head|relative_attention_bias|"
                       r"embed_scale)")
LAYER = re.compile(r"\.(?:block|layers|layer|h)\.(\d+)\.")
ARCHITECTURES = {"t5", "mt5", "bart", "mbart", "marian", "pegasus", "gpt2", "opt", "llama"}
LSTM_TYPE = "nlgkd_lstm"  # nlgkd.lstm.MODEL_TYPE, not imported: the report reads folders and needs no torch model


def flops_per_token(model_dir: Path, source_tokens: float | None, output_tokens: float | None) -> float | None:
    """Forward FLOPs per generated token (multiply-add = 2), after Kaplan et al. (2020), with
    N_enc, N_dec the non-embedding parameters of the encoder and decoder, n_enc, n_dec their layers,
    d the model width, d_attn the attention width (T5: heads * d_kv), V the vocabulary, S the mean source
    and T the mean generated length in tokens (from the evaluate stage):

        encoder-decoder:  2 N_dec + 2 d V + 2 n_dec d_attn (T + 2 S) + (2 N_enc S + 4 n_enc d_attn S^2) / T
        decoder-only:     2 N     + 2 d V + 2 n     d_attn (T + 2 S) + (2 N S     + 2 n d_attn S^2) / T

    Per token the decoder applies each weight once (2 N_dec) and the LM head (2 d V); self-attention over the
    t tokens so far costs 4 d_attn t per layer, 2 d_attn T on average, and cross-attention to the source (or,
    decoder-only, attention to the prompt) 4 d_attn S. The encoder (or prompt) pass runs once per input and
    is spread over its T generated tokens. Cross-attention keys/values of the source are counted per token
    (an upper bound: with a KV cache they are computed once).

    nlgkd's LSTM student (`nlgkd/lstm.py`), with N_dec its decoder weights except the bridge (the LSTM, the
    attention projection, the combine layer) and N_once the encoder LSTM and the bridge, run once per input:

        LSTM:             2 N_dec + 2 d V + 4 d S + 2 N_once S / T   (the bridge counted S times: an upper bound)

    Per token the decoder applies each of its weights once, and Luong attention scores and averages the S
    encoder states (2 d S each). None when the folder has no config/weights, or the architecture is neither
    one listed in ARCHITECTURES nor the LSTM.
    """
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        config = None
    model_type = config.get("model_type") if config else None
    if not source_tokens or not output_tokens or (model_type not in ARCHITECTURES and model_type != LSTM_TYPE):
        return None
    shapes = safetensors_shapes(model_dir)
    if not shapes:
        return None
    if model_type == LSTM_TYPE:
        return lstm_flops_per_token(config, shapes, float(source_tokens), float(output_tokens))
    encoder_decoder = bool(config.get("is_encoder_decoder"))
    params = {"encoder": 0, "decoder": 0}
    layers = {"encoder": set(), "decoder": set()}
    for name, shape in shapes.items():
        side = "encoder" if encoder_decoder and "encoder." in name else "decoder"
        match = LAYER.search(name)
        if match:
            layers[side].add(match.group(1))
        if not EMBEDDING.search(name):
            params[side] += math.prod(shape)
    d = config.get("d_model") or config.get("hidden_size") or config.get("n_embd")
    vocab = config.get("vocab_size")
    heads, d_kv = config.get("num_heads"), config.get("d_kv")
    d_attn = heads * d_kv if heads and d_kv else d
    if not d or not vocab:
        return None
    S, T = float(source_tokens), float(output_tokens)
    n_enc, n_dec = len(layers["encoder"]), len(layers["decoder"])
    per_token = 2 * params["decoder"] + 2 * d * vocab + 2 * n_dec * d_attn * (T + 2 * S)
    if encoder_decoder:
        once = 2 * params["encoder"] * S + 4 * n_enc * d_attn * S**2
    else:
        once = 2 * params["decoder"] * S + 2 * n_dec * d_attn * S**2
    return per_token + once / T


def lstm_flops_per_token(config: dict, shapes: dict[str, list[int]], S: float, T: float) -> float | None:
    """The LSTM line of `flops_per_token`."""
    d, vocab = config.get("d_model"), config.get("vocab_size")
    if not d or not vocab:
        return None
    per_token = per_input = 0
    for name, shape in shapes.items():
        if EMBEDDING.search(name):
            continue
        if name.startswith("decoder.") and not name.startswith("decoder.bridge."):
            per_token += math.prod(shape)
        else:
            per_input += math.prod(shape)
    return 2 * per_token + 2 * d * vocab + 4 * d * S + 2 * per_input * S / T
