"""Tiny checkpoints in the shapes of the families users distill, saved as a user's folder would be: configs as
the hub's checkpoints set them (T5 v1.0 and v1.1, BART with a summarization generation_config, mBART-50 with
language codes, Marian with SentencePiece files, Pegasus, GPT-2, a Llama-style decoder with a chat template and
a padded vocabulary), each with a tokenizer of its own class trained on the fly. No downloads."""
from __future__ import annotations

import json
from pathlib import Path

import torch

D = dict(d_model=32, layers=2, heads=2, ffn=64)


def corpus() -> list[str]:
    from nlgkd.demo_task import make_demo_splits

    splits = make_demo_splits({"train": 200, "validation": 0, "test": 0, "unlabeled": 0}, seed=0)
    return [text for row in splits["train"] for text in (row["source"], row["target"])]


def unigram_vocab(texts: list[str], specials: list[str], size: int = 300) -> list[tuple[str, float]]:
    """A Unigram (SentencePiece-style) vocabulary trained on `texts`: (piece, score), the specials first."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(texts, trainers.UnigramTrainer(vocab_size=size, special_tokens=specials,
                                                           unk_token="<unk>", show_progress=False))
    vocab = [tuple(pair) for pair in json.loads(tok.to_str())["model"]["vocab"]]
    return list({piece: (piece, score) for piece, score in reversed(vocab)}.values())[::-1]  # each piece once


def bpe_vocab(texts: list[str], specials: list[str], size: int = 400) -> tuple[dict[str, int], list[tuple]]:
    """A byte-level BPE vocabulary and merges (GPT-2, BART, Llama-style), the specials first."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=size, special_tokens=specials, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return model["vocab"], merges


def padded(n: int, multiple: int = 64) -> int:
    return -(-n // multiple) * multiple + (multiple if n % multiple == 0 else 0)


def t5(folder: Path, version: str):
    """T5 v1.0 (relu, tied embeddings with the output rescaled) or v1.1 / Flan (gated-gelu, untied); the
    embedding padded past the tokenizer as the hub's 32,128 rows for 32,100 tokens."""
    from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer

    tokenizer = T5Tokenizer(vocab=unigram_vocab(corpus(), ["<pad>", "</s>", "<unk>"]), extra_ids=8)
    config = T5Config(vocab_size=padded(len(tokenizer)), d_model=D["d_model"], d_kv=16, d_ff=D["ffn"],
                      num_layers=D["layers"], num_decoder_layers=D["layers"], num_heads=D["heads"],
                      feed_forward_proj="relu" if version == "v1.0" else "gated-gelu",
                      tie_word_embeddings=version == "v1.0", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return save(T5ForConditionalGeneration(config), tokenizer, folder)


def bart_summarizer(folder: Path):
    """BART with bart-large-cnn's kind of generation_config: min_length, no_repeat_ngram_size, length_penalty,
    beams, forced BOS and EOS."""
    from transformers import BartConfig, BartForConditionalGeneration, RobertaTokenizer

    vocab, merges = bpe_vocab(corpus(), ["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tokenizer = RobertaTokenizer(vocab=vocab, merges=merges)
    config = BartConfig(vocab_size=len(tokenizer), d_model=D["d_model"], encoder_layers=D["layers"],
                        decoder_layers=D["layers"], encoder_attention_heads=D["heads"],
                        decoder_attention_heads=D["heads"], encoder_ffn_dim=D["ffn"], decoder_ffn_dim=D["ffn"],
                        max_position_embeddings=128, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                        decoder_start_token_id=2, forced_bos_token_id=0, forced_eos_token_id=2)
    model = BartForConditionalGeneration(config)
    model.generation_config.update(min_length=12, no_repeat_ngram_size=3, length_penalty=2.0, num_beams=4,
                                   early_stopping=True, forced_bos_token_id=0, forced_eos_token_id=2)
    return save(model, tokenizer, folder)


def mbart50(folder: Path):
    """mBART-50: language codes in the tokenizer (en_XX sources), de_DE forced as every output's first token."""
    from transformers import MBart50Tokenizer, MBartConfig, MBartForConditionalGeneration

    # SentencePiece order (<unk>, <s>, </s>), which the tokenizer maps to fairseq's ids as mBART-50's own does
    tokenizer = MBart50Tokenizer(vocab=unigram_vocab(corpus(), ["<unk>", "<s>", "</s>"]),
                                 src_lang="en_XX", tgt_lang="de_DE")
    config = MBartConfig(vocab_size=len(tokenizer), d_model=D["d_model"], encoder_layers=D["layers"],
                         decoder_layers=D["layers"], encoder_attention_heads=D["heads"],
                         decoder_attention_heads=D["heads"], encoder_ffn_dim=D["ffn"], decoder_ffn_dim=D["ffn"],
                         max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         decoder_start_token_id=tokenizer.eos_token_id)
    model = MBartForConditionalGeneration(config)
    model.generation_config.forced_bos_token_id = tokenizer.convert_tokens_to_ids("de_DE")
    return save(model, tokenizer, folder)


def marian(folder: Path):
    """Marian: SentencePiece models for source and target and a shared vocab.json; pad is the decoder start."""
    import sentencepiece
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    text = folder / "corpus.txt"
    text.write_text("\n".join(corpus()), encoding="utf-8")
    for side in ("source", "target"):
        sentencepiece.SentencePieceTrainer.train(input=str(text), model_prefix=str(folder / side), vocab_size=200,
                                                 model_type="unigram", bos_id=-1, eos_id=1, unk_id=0, pad_id=-1,
                                                 minloglevel=2)
        (folder / f"{side}.model").rename(folder / f"{side}.spm")
    text.unlink()
    processor = sentencepiece.SentencePieceProcessor(model_file=str(folder / "source.spm"))
    pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
    vocab = {"</s>": 0, "<unk>": 1, **{p: i + 2 for i, p in enumerate(p for p in pieces if p not in ("</s>", "<unk>"))}}
    vocab["<pad>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    tokenizer = MarianTokenizer(source_spm=str(folder / "source.spm"), target_spm=str(folder / "target.spm"),
                                vocab=str(folder / "vocab.json"))
    config = MarianConfig(vocab_size=len(vocab), d_model=D["d_model"], encoder_layers=D["layers"],
                          decoder_layers=D["layers"], encoder_attention_heads=D["heads"],
                          decoder_attention_heads=D["heads"], encoder_ffn_dim=D["ffn"], decoder_ffn_dim=D["ffn"],
                          max_position_embeddings=128, pad_token_id=vocab["<pad>"], eos_token_id=0,
                          decoder_start_token_id=vocab["<pad>"], forced_eos_token_id=0)
    return save(MarianMTModel(config), tokenizer, folder)


def pegasus(folder: Path):
    from transformers import PegasusConfig, PegasusForConditionalGeneration, PegasusTokenizer

    tokenizer = PegasusTokenizer(vocab=unigram_vocab(corpus(), ["<pad>", "</s>", "<mask_1>", "<mask_2>", "<unk>"]),
                                 offset=0)
    config = PegasusConfig(vocab_size=len(tokenizer), d_model=D["d_model"], encoder_layers=D["layers"],
                           decoder_layers=D["layers"], encoder_attention_heads=D["heads"],
                           decoder_attention_heads=D["heads"], encoder_ffn_dim=D["ffn"], decoder_ffn_dim=D["ffn"],
                           max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                           eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    return save(PegasusForConditionalGeneration(config), tokenizer, folder)


def gpt2(folder: Path):
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    vocab, merges = bpe_vocab(corpus(), ["<|endoftext|>"])
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=merges, pad_token="<|endoftext|>")
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=D["d_model"], n_layer=D["layers"], n_head=D["heads"],
                        n_positions=256, bos_token_id=0, eos_token_id=0,
                        tie_word_embeddings=False)  # tied and random, it would repeat its last input token: EOS
    return save(GPT2LMHeadModel(config), tokenizer, folder)


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def llama(folder: Path):
    """A Llama-style decoder: a chat template, and an embedding padded past its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    vocab, merges = bpe_vocab(corpus(), ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"])
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges)
    tokenizer.pad_token = "</s>"
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(vocab_size=padded(len(tokenizer)), hidden_size=D["d_model"], intermediate_size=D["ffn"],
                         num_hidden_layers=D["layers"], num_attention_heads=D["heads"], num_key_value_heads=1,
                         max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                         tie_word_embeddings=False)
    return save(LlamaForCausalLM(config), tokenizer, folder)


def save(model, tokenizer, folder: Path):
    from nlgkd.models import save_model

    torch.manual_seed(0)
    for module in model.modules():  # weights larger than transformers' 0.02, so outputs depend on the input
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(module.weight, std=0.3)
    save_model(model, tokenizer, folder)
    return folder


FAMILIES = {
    "t5_v1.0": lambda folder: t5(folder, "v1.0"),
    "t5_v1.1": lambda folder: t5(folder, "v1.1"),
    "bart_summarizer": bart_summarizer,
    "mbart50": mbart50,
    "marian": marian,
    "pegasus": pegasus,
    "gpt2": gpt2,
    "llama_chat": llama,
}
