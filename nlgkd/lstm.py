"""A small recurrent encoder-decoder student (Tang et al., 2019, "Distilling Task-Specific Knowledge from
BERT into Simple Neural Networks", carried over to generation).

    encoder   embedding [V, D] -> bidirectional LSTM (D/2 per direction, `encoder_layers` layers)
              -> outputs [B, S, D]
    bridge    mean of the encoder outputs over real tokens -> Linear(D, decoder_layers * D) -> tanh: the
              decoder's initial h (its c starts at zero)
    decoder   the encoder's embedding -> LSTM (D, `decoder_layers` layers) -> Luong "general" attention over
              the encoder outputs -> tanh(W [h; context]) -> output layer tied to the embedding -> logits

The attention reads the decoder LSTM's output but does not feed back into the next step (no Luong input
feeding), so a teacher-forced forward runs the LSTM over the whole target in one call, and generation only
carries the LSTM's (h, c) between steps (`LSTMDecoderState`).

It is a plain transformers `PreTrainedModel` + `GenerationMixin` with its own config class, so
`save_pretrained`, `from_pretrained` and `generate` (greedy, beam, sampling) work as for BART or T5. The
forward has the seq2seq signature nlgkd uses everywhere (`input_ids`, `attention_mask`,
`decoder_input_ids` -> `logits` [B, T, V]), so logit-level KD, pseudo-targets, Joint-Teaching and evaluation
take it as they take a transformer. It has no attention heads or transformer layers: hidden-state and
attention KD refuse it (see `nlgkd/stages/distill.py:check_distill_setup`).

Loading a saved LSTM folder through the Auto classes needs `register()` first (nlgkd's `load_pretrained`
calls it; plain transformers code calls `nlgkd.lstm.register()` itself). It is an explicit call, not an
import side effect, and needs no `trust_remote_code`.

Recipe sizes (`models.X: {init: fresh, arch: lstm, ...}`): `d_model` is the embedding and hidden width,
`encoder_layers` / `decoder_layers` are LSTM layers, `dropout` applies to embeddings, between LSTM layers
and before the output layer; `attention_heads`, `ffn_dim` and `max_position_embeddings` do not apply.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput

from .hf_compat import CACHE_KWARG

MODEL_TYPE = "nlgkd_lstm"


class LSTMSeq2SeqConfig(PreTrainedConfig):
    """Sizes and special ids of an `LSTMSeq2SeqForConditionalGeneration`.

    d_model: embedding width and LSTM hidden width (the bidirectional encoder uses d_model / 2 per direction,
    so d_model must be even); encoder_layers / decoder_layers: stacked LSTM layers."""

    model_type = MODEL_TYPE
    attribute_map = {"hidden_size": "d_model"}

    vocab_size: int = 2000
    d_model: int = 256
    encoder_layers: int = 1
    decoder_layers: int = 1
    dropout: float | int = 0.1
    initializer_range: float = 0.02
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    decoder_start_token_id: int | None = 2
    is_encoder_decoder: bool = True
    tie_word_embeddings: bool = True

    def validate_architecture(self):
        """Called by the config's strict validation."""
        if self.d_model % 2:
            raise ValueError(f"LSTM d_model must be even (the bidirectional encoder splits it in two), got {self.d_model}")
        if self.encoder_layers < 1 or self.decoder_layers < 1:
            raise ValueError("LSTM encoder_layers and decoder_layers must be at least 1")


class LSTMDecoderState:
    """The decoder's recurrent state between generation steps, in the place transformers keeps a KV cache.

    h, c: [decoder_layers, B, D]; steps: decoder tokens consumed so far. `generate` hands it back to the
    next forward as `cache` (`past_key_values` before transformers 5.24), and beam search calls
    `reorder_cache(beam_idx)`."""

    is_compileable = False
    is_croppable = False

    def __init__(self, h: torch.Tensor, c: torch.Tensor, steps: int):
        self.h, self.c, self.steps = h, c, steps

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.steps

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep the rows of the beams that survived this step: beam_idx [B * beams]."""
        self.h = self.h.index_select(1, beam_idx.to(self.h.device))
        self.c = self.c.index_select(1, beam_idx.to(self.c.device))


def right_padded_lengths(attention_mask: torch.Tensor) -> torch.Tensor:
    """Lengths [B] of right-padded rows of a mask [B, S]; other paddings are refused (packing needs them)."""
    lengths = attention_mask.long().sum(1)
    expected = torch.arange(attention_mask.shape[1], device=attention_mask.device)[None, :] < lengths[:, None]
    if not torch.equal(attention_mask.bool(), expected):
        raise ValueError("the LSTM encoder needs right-padded inputs (attention_mask of ones, then zeros)")
    if (lengths == 0).any():
        raise ValueError("the LSTM encoder got an empty input row; drop empty sources from the data")
    return lengths


class LSTMEncoder(nn.Module):
    """Bidirectional LSTM over the source: input_ids [B, S] -> last_hidden_state [B, S, D]."""

    main_input_name = "input_ids"  # read by `generate`

    def __init__(self, config: LSTMSeq2SeqConfig, embedding: nn.Embedding):
        super().__init__()
        self.embed_tokens = embedding
        self.dropout = nn.Dropout(config.dropout)
        self.lstm = nn.LSTM(config.d_model, config.d_model // 2, num_layers=config.encoder_layers,
                            bidirectional=True, batch_first=True,
                            dropout=config.dropout if config.encoder_layers > 1 else 0.0)

    def forward(self, input_ids, attention_mask=None, output_attentions=None, output_hidden_states=None,
                return_dict=None) -> BaseModelOutput:
        if output_hidden_states or output_attentions:
            raise ValueError("the LSTM model has no per-layer hidden states or attention maps to return")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        lengths = right_padded_lengths(attention_mask)
        embedded = self.dropout(self.embed_tokens(input_ids))  # [B, S, D]
        packed = pack_padded_sequence(embedded, lengths.cpu(), batch_first=True, enforce_sorted=False)
        outputs, _ = self.lstm(packed)
        outputs, _ = pad_packed_sequence(outputs, batch_first=True, total_length=input_ids.shape[1])
        return BaseModelOutput(last_hidden_state=outputs)


class LSTMDecoder(nn.Module):
    """LSTM decoder with Luong attention: embedded decoder inputs [B, T, D] (the encoder's embedding, which
    is the one embedding of the model), encoder outputs [B, S, D] -> attentional states [B, T, D] and the new
    (h, c)."""

    def __init__(self, config: LSTMSeq2SeqConfig):
        super().__init__()
        d = config.d_model
        self.num_layers = config.decoder_layers
        self.dropout = nn.Dropout(config.dropout)
        self.bridge = nn.Linear(d, config.decoder_layers * d)
        self.lstm = nn.LSTM(d, d, num_layers=config.decoder_layers, batch_first=True,
                            dropout=config.dropout if config.decoder_layers > 1 else 0.0)
        self.attention = nn.Linear(d, d, bias=False)  # Luong "general" score: h_t^T W e_s
        self.combine = nn.Linear(2 * d, d)

    def initial_state(self, encoder_out: torch.Tensor, encoder_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h0, c0), each [layers, B, D], from the mean encoder output over real tokens."""
        mask = encoder_mask.unsqueeze(-1).to(encoder_out.dtype)
        pooled = (encoder_out * mask).sum(1) / mask.sum(1).clamp(min=1)  # [B, D]
        h0 = torch.tanh(self.bridge(pooled)).view(pooled.shape[0], self.num_layers, -1).transpose(0, 1).contiguous()
        return h0, torch.zeros_like(h0)

    def forward(self, embedded, encoder_out, encoder_mask, state=None):
        if state is None:
            state = self.initial_state(encoder_out, encoder_mask)
        output, (h, c) = self.lstm(self.dropout(embedded), state)  # [B, T, D]
        scores = torch.einsum("btd,bsd->bts", self.attention(output), encoder_out)  # [B, T, S]
        scores = scores.masked_fill(~encoder_mask.bool()[:, None, :], torch.finfo(scores.dtype).min)
        context = torch.bmm(scores.softmax(-1), encoder_out)  # [B, T, D]
        attentional = torch.tanh(self.combine(torch.cat([output, context], dim=-1)))
        return self.dropout(attentional), (h, c)


class LSTMSeq2SeqForConditionalGeneration(PreTrainedModel, GenerationMixin):
    """The recurrent student (see the module docstring). forward(input_ids [B, S], attention_mask [B, S],
    decoder_input_ids [B, T]) -> Seq2SeqLMOutput with logits [B, T, V] (and loss when labels are given)."""

    config_class = LSTMSeq2SeqConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _tied_weights_keys = {"lm_head.weight": "encoder.embed_tokens.weight"}

    def __init__(self, config: LSTMSeq2SeqConfig):
        super().__init__(config)
        self.encoder = LSTMEncoder(config, nn.Embedding(config.vocab_size, config.d_model))
        self.decoder = LSTMDecoder(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.post_init()

    # transformers looks these up for tying and resizing
    def get_input_embeddings(self) -> nn.Embedding:
        return self.encoder.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.encoder.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def get_encoder(self, modality=None) -> LSTMEncoder:
        return self.encoder

    @torch.no_grad()
    def _init_weights(self, module):
        """Embedding ~ N(0, 1) (PyTorch's default), Linear and LSTM weights Xavier-uniform, biases zero.
        transformers' usual N(0, 0.02) keeps every signal of this unnormalized network tiny: on the demo task
        a 64-wide LSTM trained with Adam sat at the unigram loss (~4.4 nats) for 100+ steps, while with this
        init it reached 0.54 nats in 100 steps. (`transformers.initialization` skips loaded weights.)"""
        if isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=1.0)
        elif isinstance(module, nn.Linear):
            init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LSTM):
            for name, param in module.named_parameters():
                if "weight" in name:
                    init.xavier_uniform_(param)
                else:
                    init.zeros_(param)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # no key/value cache: `generate` carries the LSTMDecoderState this model returns instead
        return False

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        encoder_outputs=None,
        cache=None,
        past_key_values=None,  # the name of `cache` before transformers 5.24
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        decoder_attention_mask=None,  # the LSTM is causal by construction; right padding needs no mask
        **kwargs,
    ) -> Seq2SeqLMOutput:
        if output_hidden_states or output_attentions:
            raise ValueError(
                "the LSTM model (model_type nlgkd_lstm) has no per-layer hidden states or attention maps; "
                "hidden-state and attention KD need a transformer student")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if encoder_outputs is None:
            encoder_outputs = self.encoder(input_ids, attention_mask)
        encoder_out = encoder_outputs[0] if isinstance(encoder_outputs, (tuple, list)) else encoder_outputs.last_hidden_state
        if attention_mask is None:
            attention_mask = torch.ones(encoder_out.shape[:2], dtype=torch.long, device=encoder_out.device)
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("give decoder_input_ids or labels")
            decoder_input_ids = self.shift_labels(labels)
        state = self.recurrent_state(cache if cache is not None else past_key_values)
        embedded = self.encoder.embed_tokens(decoder_input_ids)  # [B, T, D]
        hidden, (h, c) = self.decoder(embedded, encoder_out, attention_mask,
                                      None if state is None else (state.h, state.c))
        logits = self.lm_head(hidden)  # [B, T, V]
        loss = None
        if labels is not None:  # the transformers contract, for code outside nlgkd (its stages use the logits)
            loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        steps = (0 if state is None else state.steps) + decoder_input_ids.shape[1]
        new_state = LSTMDecoderState(h, c, steps) if use_cache else None
        return Seq2SeqLMOutput(loss=loss, logits=logits, encoder_last_hidden_state=encoder_out,
                               **{CACHE_KWARG: new_state})

    @staticmethod
    def recurrent_state(past_key_values) -> LSTMDecoderState | None:
        """The state to continue from: ours, or None for nothing yet (also an empty cache object that a caller
        made for transformer models, e.g. an EncoderDecoderCache before the first step)."""
        if past_key_values is None or isinstance(past_key_values, LSTMDecoderState):
            return past_key_values
        if hasattr(past_key_values, "get_seq_length") and past_key_values.get_seq_length() == 0:
            return None
        raise ValueError(f"the LSTM model continues only from its own LSTMDecoderState, got {type(past_key_values).__name__}")

    def shift_labels(self, labels: torch.LongTensor) -> torch.LongTensor:
        """decoder_input_ids [B, T] for labels [B, T]: [start, y1, ..., y_{T-1}], pad where labels are -100."""
        shifted = labels.new_full(labels.shape, self.config.pad_token_id)
        shifted[:, 1:] = labels[:, :-1]
        shifted[:, 0] = self.config.decoder_start_token_id
        return shifted.masked_fill(shifted == -100, self.config.pad_token_id)


def register() -> None:
    """Make `AutoConfig` / `AutoModelForSeq2SeqLM` load saved LSTM folders (model_type `nlgkd_lstm`).
    Idempotent; called by `nlgkd.models.load_pretrained`."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    AutoConfig.register(MODEL_TYPE, LSTMSeq2SeqConfig, exist_ok=True)
    AutoModelForSeq2SeqLM.register(LSTMSeq2SeqConfig, LSTMSeq2SeqForConditionalGeneration, exist_ok=True)


def is_lstm(model) -> bool:
    """True for an `LSTMSeq2SeqForConditionalGeneration` (also inside a DDP wrapper)."""
    model = getattr(model, "module", model)
    return getattr(getattr(model, "config", None), "model_type", None) == MODEL_TYPE
