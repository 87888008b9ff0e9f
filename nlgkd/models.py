"""Models: loading (hub name or local path), fresh configs with a tokenizer trained on the data, saving,
and one forward function that gives target-aligned logits for every family.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from safetensors import SafetensorError

from .errors import ModelLoadError
from .quiet import quiet_weight_bars
from .config import ModelConfig

# An inference engine's export of a model (nlgkd/export.py) holds this file; it is not a PyTorch model folder.
EXPORT_FILE = "nlgkd_export.json"

# One special-token layout for every fresh tokenizer; T5-style sentinels serve span corruption.
PAD, BOS, EOS, UNK, MASK = "<pad>", "<s>", "</s>", "<unk>", "<mask>"
SENTINELS = [f"<extra_id_{i}>" for i in range(20)]
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, MASK] + SENTINELS


def is_causal(model) -> bool:
    """True for decoder-only models (they read source + separator + target in one sequence)."""
    model = getattr(model, "module", model)  # DDP wrapper
    return not getattr(model.config, "is_encoder_decoder", False)


# ------------------------------------------------------------------------------------ loading
# files a saved tokenizer leaves in a model folder, one of them at least (fast, BPE, SentencePiece, WordPiece)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "source.spm", "tokenizer.model", "vocab.txt")


def load_pretrained(name_or_path: str, trust_remote_code: bool = False, revision: str | None = None,
                    with_tokenizer: bool = True):
    """(model, tokenizer) from a hub name or a local `save_pretrained` folder, safetensors weights only;
    (model, None) with `with_tokenizer=False` (a recipe's `tokenizer_from:` gives it)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    from . import lstm

    lstm.register()  # nlgkd's own LSTM student (model_type nlgkd_lstm) loads through the Auto classes too
    if looks_like_a_path(name_or_path):
        folder = Path(name_or_path)
        if (folder / EXPORT_FILE).exists():
            raise ModelLoadError(f"{name_or_path!r} is a CTranslate2 export: evaluate stages and nlgkd serve run it, "
                                 "but it cannot be trained or pruned; use the stage it was exported from")
        what = ("does not exist" if not folder.exists() else "is a file, not a model folder" if not folder.is_dir()
                else "holds no model (no config.json): a run folder holds one folder per stage"
                if not (folder / "config.json").exists() else None)
        if what:
            raise ModelLoadError(f"{name_or_path!r} {what}; give a model folder (one with config.json, such as "
                                 "runs/demo/teacher) or a hub name such as facebook/bart-base")
        if with_tokenizer and not any((folder / name).exists() for name in TOKENIZER_FILES):
            # transformers would build an empty default tokenizer from config.json alone, and every output be ""
            raise ModelLoadError(f"{name_or_path!r} has a model but no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}"
                                 ", ...); copy them from the checkpoint it came from, or give its models: entry "
                                 "tokenizer_from: a model with the same tokenizer")
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError) as err:  # ValueError: a config.json without a model_type transformers knows
        if not Path(name_or_path).exists():
            raise ModelLoadError(f"{name_or_path!r} is no folder here (relative to {Path.cwd()}), and the hub gave no "
                                 f"model of that name ({str(err).splitlines()[0]}); check the path, or the hub name "
                                 "and the network") from None
        raise ModelLoadError(f"could not load model config from folder {name_or_path!r}: {err}") from None
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    local = Path(name_or_path).is_dir()
    try:
        with quiet_weight_bars() if local else contextlib.nullcontext():  # a download keeps its bar
            model = auto.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, revision=revision,
                                         use_safetensors=True)
    except OSError as err:
        raise ModelLoadError(
            f"could not load safetensors weights of {name_or_path!r} ({err}); nlgkd loads only safetensors: "
            "convert the checkpoint with `model.save_pretrained(dir, safe_serialization=True)` first"
        ) from None
    except SafetensorError as err:  # a truncated or overwritten weights file
        raise ModelLoadError(f"the weights in {name_or_path!r} are damaged ({err}); copy the folder again, or make "
                             "it again (`nlgkd run RECIPE --stage STAGE --force` for a stage's folder)") from None
    if not with_tokenizer:
        return model, None
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, revision=revision)
    if tokenizer.pad_token_id is None:  # GPT-2-style tokenizers have no pad token
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def looks_like_a_path(name: str) -> bool:
    """A local path rather than a hub name (`org/model`): absolute, relative with ./ or ../, 3+ parts, or a
    path whose first folder exists here (`runs/x` with a runs/ folder)."""
    return (name.startswith(("/", "./", "../", "~")) or name.count("/") >= 2 or Path(name).exists()
            or ("/" in name and Path(name.split("/")[0]).is_dir()))


def save_model(model, tokenizer, folder: str | Path) -> None:
    """A folder plain transformers code can load: safetensors weights, config, generation config, tokenizer."""
    with quiet_weight_bars():
        model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))


# -------------------------------------------------------------------------------------- fresh
def train_tokenizer(texts: list[str], algorithm: str, vocab_size: int, encoder_decoder: bool):
    """A BPE (byte-level) or Unigram tokenizer trained on `texts`, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if algorithm == "bpe":
        tok = Tokenizer(models.BPE(unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    elif algorithm == "unigram":
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, unk_token=UNK,
                                          show_progress=False)
    else:
        raise ValueError(f"tokenizer: {algorithm!r} is not bpe or unigram")
    tok.train_from_iterator(texts, trainer=trainer)
    if encoder_decoder:
        # encoder inputs end with </s>, as in BART and T5
        tok.post_processor = processors.TemplateProcessing(
            single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, tok.token_to_id(EOS))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK, mask_token=MASK,
        additional_special_tokens=SENTINELS,
    )


def fresh_init_std(cfg: ModelConfig) -> float:
    """Standard deviation of a fresh BART/mBART's initial weights: the recipe's `init_std`, else 1/sqrt(d_model).

    transformers initializes every BART weight with N(0, 0.02), the value of BART-large (d_model 1024, where
    1/sqrt(d) = 0.031). In a small model it is several times too small (1/sqrt(128) = 0.088): each attention
    and feed-forward block then adds almost nothing to the residual stream, the decoder starts as a bigram
    model of the targets, and it learns to use the encoder late or not at all. Measured on the demo task
    (recipes/study/demo_archs.yaml: d_model 128, 300 steps, lr 2e-3): validation loss 1.066 and test BLEU 17.5
    with 0.02, outputs unrelated to their inputs; 0.472 and 50.2 with 1/sqrt(d) (eval/README.md, "Fresh
    models")."""
    return cfg.init_std if cfg.init_std is not None else cfg.d_model ** -0.5


def fresh_config(cfg: ModelConfig, tokenizer):
    """A transformers config for `cfg.arch` with the tokenizer's size and special ids."""
    from transformers import BartConfig, GPT2Config, MBartConfig, T5Config

    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id}
    vocab = len(tokenizer)
    if cfg.arch == "lstm":
        from .lstm import LSTMSeq2SeqConfig

        # d_model is the embedding and hidden width; attention_heads and ffn_dim do not apply
        return LSTMSeq2SeqConfig(vocab_size=vocab, d_model=cfg.d_model, encoder_layers=cfg.encoder_layers,
                                 decoder_layers=cfg.decoder_layers, dropout=cfg.dropout,
                                 decoder_start_token_id=tokenizer.eos_token_id, **ids)
    if cfg.arch in ("bart", "mbart"):
        # mbart is BART with pre-layer-norm blocks, which train from scratch more stably at high lr
        config_class = BartConfig if cfg.arch == "bart" else MBartConfig
        return config_class(
            vocab_size=vocab, d_model=cfg.d_model, encoder_layers=cfg.encoder_layers,
            decoder_layers=cfg.decoder_layers, encoder_attention_heads=cfg.attention_heads,
            decoder_attention_heads=cfg.attention_heads, encoder_ffn_dim=cfg.ffn_dim, decoder_ffn_dim=cfg.ffn_dim,
            dropout=cfg.dropout, attention_dropout=0.0, activation_dropout=0.0,
            max_position_embeddings=cfg.max_position_embeddings, decoder_start_token_id=tokenizer.eos_token_id,
            forced_eos_token_id=tokenizer.eos_token_id, forced_bos_token_id=None, **ids,
            init_std=fresh_init_std(cfg),
        )
    if cfg.arch == "t5":
        return T5Config(
            vocab_size=vocab, d_model=cfg.d_model, d_kv=cfg.d_model // cfg.attention_heads, d_ff=cfg.ffn_dim,
            num_layers=cfg.encoder_layers, num_decoder_layers=cfg.decoder_layers, num_heads=cfg.attention_heads,
            dropout_rate=cfg.dropout, decoder_start_token_id=tokenizer.pad_token_id, feed_forward_proj="relu",
            **ids,
        )
    if cfg.arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab, n_positions=cfg.max_position_embeddings, n_embd=cfg.d_model,
            n_layer=cfg.decoder_layers, n_head=cfg.attention_heads, n_inner=cfg.ffn_dim,
            resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=0.0, **ids,
        )
    raise ValueError(f"arch {cfg.arch!r} is not one of bart, mbart, t5, gpt2, lstm")


def build_fresh(cfg: ModelConfig, texts: list[str], seed: int, tokenizer=None):
    """(model, tokenizer): a randomly initialized model of `cfg`; the tokenizer is trained on `texts`
    unless one is given (students that share their teacher's tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    encoder_decoder = cfg.arch != "gpt2"
    if tokenizer is None:
        tokenizer = train_tokenizer(texts, cfg.tokenizer, cfg.vocab_size, encoder_decoder)
    config = fresh_config(cfg, tokenizer)
    torch.manual_seed(seed)
    if cfg.arch == "lstm":
        from .lstm import LSTMSeq2SeqForConditionalGeneration

        return LSTMSeq2SeqForConditionalGeneration(config), tokenizer
    auto = AutoModelForSeq2SeqLM if encoder_decoder else AutoModelForCausalLM
    model = auto.from_config(config)
    return model, tokenizer


# ------------------------------------------------------------------------------------ forward
def shift_right(labels: torch.Tensor, pad_id: int, start_id: int) -> torch.Tensor:
    """Decoder inputs for teacher forcing: [start, y1, ..., y_{T-1}], padding where labels are -100."""
    shifted = labels.new_full(labels.shape, pad_id)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = start_id
    return shifted.masked_fill(shifted == -100, pad_id)


def forward_on_targets(model, batch: dict, **kwargs):
    """Run `model` teacher-forced on the batch's targets. Returns (logits [B, T, V] aligned with
    batch["labels"] [B, T], the model outputs). Works for encoder-decoder and decoder-only models."""
    config = getattr(model, "module", model).config
    labels = batch["labels"]
    if config.is_encoder_decoder:
        start = config.decoder_start_token_id
        decoder_input_ids = shift_right(labels, config.pad_token_id, start)
        sources = {"input_ids": batch["input_ids"]}
        if "source_index" in batch:  # each distinct source encoded once (`with_shared_sources`)
            sources = {"encoder_outputs": encoded_once(model, batch, **kwargs)}
        out = model(**sources, attention_mask=batch["attention_mask"], decoder_input_ids=decoder_input_ids,
                    use_cache=False, **kwargs)
        return out.logits, out
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False, **kwargs)
    return at_target_positions(out.logits, batch), out


def with_shared_sources(batch: dict) -> dict:
    """The batch plus what `forward_on_targets` needs to encode each distinct source once: `unique_input_ids` and
    `unique_attention_mask` [U, S] (the first row of each distinct source) and `source_index` [B] (each row's
    source among them). For several targets of one source (K pseudo-targets, `pt_schedule: all_together`)."""
    input_ids = batch["input_ids"]
    _, source_index = torch.unique(input_ids, dim=0, return_inverse=True)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    first = torch.full((int(source_index.max()) + 1,), input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    first = first.scatter_reduce(0, source_index, rows, reduce="amin")
    return {**batch, "source_index": source_index, "unique_input_ids": input_ids[first],
            "unique_attention_mask": batch["attention_mask"][first]}


def encoded_once(model, batch: dict, output_hidden_states: bool = False, output_attentions: bool = False):
    """The encoder's outputs for the batch's distinct sources, computed once and repeated for every row that
    shares one ([U, S, D] -> [B, S, D], hidden states and attentions alike): gradients from every target of a
    source add up in its one encoder pass, as they would over K separate passes."""
    from transformers.modeling_outputs import BaseModelOutput

    encoder = getattr(model, "module", model).get_encoder()
    out = encoder(input_ids=batch["unique_input_ids"], attention_mask=batch["unique_attention_mask"],
                  output_hidden_states=output_hidden_states, output_attentions=output_attentions, return_dict=True)
    index = batch["source_index"]

    def repeat(tensors):
        return None if tensors is None else tuple(t.index_select(0, index) for t in tensors)

    return BaseModelOutput(last_hidden_state=out.last_hidden_state.index_select(0, index),
                           hidden_states=repeat(out.hidden_states), attentions=repeat(out.attentions))


def at_target_positions(sequence: torch.Tensor, batch: dict) -> torch.Tensor:
    """Decoder-only outputs [B, L, X] (logits or hidden states) at the positions that predict the targets,
    aligned with batch["labels"]: [B, T, X]. The output at position p predicts token p + 1."""
    t = batch["labels"].shape[1]
    positions = batch["target_offsets"][:, None] + torch.arange(t, device=sequence.device) - 1
    positions = positions.clamp(0, sequence.shape[1] - 1)
    return sequence.gather(1, positions[..., None].expand(-1, -1, sequence.shape[-1]))


def target_logits(model, batch: dict) -> torch.Tensor:
    return forward_on_targets(model, batch)[0]


def check_same_vocabulary(teacher_tokenizer, student_tokenizer, teacher_name: str, student_name: str) -> None:
    """Word-level KD compares distributions over the same vocabulary: stop early when they differ."""
    t_vocab, s_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if t_vocab != s_vocab:
        raise ValueError(
            f"teacher {teacher_name!r} ({type(teacher_tokenizer).__name__}, {len(t_vocab)} tokens) and student "
            f"{student_name!r} ({type(student_tokenizer).__name__}, {len(s_vocab)} tokens) have different "
            "vocabularies; word-level KD needs the same tokenizer (give the student tokenizer_from: the teacher)"
        )
