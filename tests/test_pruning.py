"""Tests for nlgkd.pruning: layer-selection rules, and pruning tiny random models of every family."""

import copy
import re

import pytest
import torch
import transformers

from nlgkd.hf_compat import CACHE_KWARG
from nlgkd.pruning import SUPPORTED_FAMILIES, layer_counts, prune_model, select_layers

LAYERS = 4  # teacher depth per side: enough to drop layers from the middle, the start and the end
VOCAB = 64
ATTENTION = {"attn_implementation": "eager"}  # one attention kernel everywhere: exact comparisons

_SEQ2SEQ_SIZES = dict(
    vocab_size=VOCAB, d_model=16, encoder_layers=LAYERS, decoder_layers=LAYERS,
    encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
    max_position_embeddings=64,
)
_T5_SIZES = dict(
    vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=LAYERS, num_decoder_layers=LAYERS,
    num_heads=2, relative_attention_num_buckets=8, relative_attention_max_distance=16,
    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
)

# family -> (config class, config kwargs, model class). Token ids are set explicitly because the
# real defaults (e.g. Marian's pad id 58100) do not fit a 64-token vocabulary.
BUILDERS = {
    "bart": ("BartConfig", dict(_SEQ2SEQ_SIZES, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                decoder_start_token_id=2, forced_eos_token_id=None),
             "BartForConditionalGeneration"),
    "mbart": ("MBartConfig", dict(_SEQ2SEQ_SIZES, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                  decoder_start_token_id=2, forced_eos_token_id=None),
              "MBartForConditionalGeneration"),
    "marian": ("MarianConfig", dict(_SEQ2SEQ_SIZES, pad_token_id=1, eos_token_id=2,
                                    decoder_start_token_id=1, forced_eos_token_id=None),
               "MarianMTModel"),
    "pegasus": ("PegasusConfig", dict(_SEQ2SEQ_SIZES, pad_token_id=0, eos_token_id=1,
                                      decoder_start_token_id=0, forced_eos_token_id=None),
                "PegasusForConditionalGeneration"),
    "t5": ("T5Config", dict(_T5_SIZES), "T5ForConditionalGeneration"),
    "mt5": ("MT5Config", dict(_T5_SIZES), "MT5ForConditionalGeneration"),
    "gpt2": ("GPT2Config", dict(vocab_size=VOCAB, n_embd=16, n_layer=LAYERS, n_head=2, n_positions=64,
                                bos_token_id=0, eos_token_id=0, pad_token_id=0),
             "GPT2LMHeadModel"),
    "opt": ("OPTConfig", dict(vocab_size=VOCAB, hidden_size=16, word_embed_proj_dim=16,
                              num_hidden_layers=LAYERS, ffn_dim=32, num_attention_heads=2,
                              max_position_embeddings=64, pad_token_id=1, bos_token_id=2,
                              eos_token_id=2),
            "OPTForCausalLM"),
    "llama": ("LlamaConfig", dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                  num_hidden_layers=LAYERS, num_attention_heads=2,
                                  num_key_value_heads=1, max_position_embeddings=64,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2),
              "LlamaForCausalLM"),
}
ENCODER_DECODER = ["bart", "mbart", "marian", "pegasus", "t5", "mt5"]


def build(family: str):
    config_name, kwargs, model_name = BUILDERS[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**kwargs, **ATTENTION)
    return getattr(transformers, model_name)(config).eval()


def inputs_for(model):
    torch.manual_seed(1)
    input_ids = torch.randint(3, VOCAB, (2, 7))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :2] = 0  # a padded row (left padding works for both kinds of model)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if model.config.is_encoder_decoder:
        batch["decoder_input_ids"] = torch.randint(3, VOCAB, (2, 5))
    return batch


@torch.no_grad()
def logits(model, batch):
    return model(**batch, use_cache=False).logits


@torch.no_grad()
def greedy(model, batch):
    prompt = {k: v for k, v in batch.items() if k != "decoder_input_ids"}
    out = model.generate(**prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False, num_beams=1,
                         use_cache=True, return_dict_in_generate=True, output_logits=True)
    return out.sequences, torch.stack(out.logits)


def test_supported_families_have_a_test_builder():
    assert set(SUPPORTED_FAMILIES) == set(BUILDERS)


# ------------------------------------------------------------------------------------------------
# Layer selection rules
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_layers, count, expected", [
    (12, 3, [0, 6, 11]),
    (12, 2, [0, 11]),
    (12, 4, [0, 4, 7, 11]),  # 11/3 = 3.67 -> 4, 22/3 = 7.33 -> 7
    (12, 6, [0, 2, 4, 7, 9, 11]),
    (16, 3, [0, 8, 15]),  # 7.5 rounds half up to 8
    (6, 3, [0, 3, 5]),  # 2.5 rounds half up to 3
    (12, 1, [0]),
    (5, 5, [0, 1, 2, 3, 4]),
])
def test_first_last_rule(num_layers, count, expected):
    assert select_layers(num_layers, {"first_last": count}, "decoder_layers") == expected


def test_first_last_is_increasing_and_keeps_both_ends():
    for num_layers in range(2, 25):
        for count in range(2, num_layers + 1):
            keep = select_layers(num_layers, {"first_last": count}, "encoder_layers")
            assert len(keep) == count and keep[0] == 0 and keep[-1] == num_layers - 1
            assert all(a < b for a, b in zip(keep, keep[1:]))


def test_other_rules():
    assert select_layers(12, {"first": 3}, "encoder_layers") == [0, 1, 2]
    assert select_layers(6, "every_other", "encoder_layers") == [0, 2, 4]
    assert select_layers(5, "every_other", "encoder_layers") == [0, 2, 4]
    assert select_layers(4, "all", "encoder_layers") == [0, 1, 2, 3]


def test_explicit_lists_normalize_negatives_and_sort():
    assert select_layers(12, [0, -1], "decoder_layers") == [0, 11]
    assert select_layers(12, [-1, 0, 5], "decoder_layers") == [0, 5, 11]
    assert select_layers(12, (-12, 3), "decoder_layers") == [0, 3]


@pytest.mark.parametrize("spec, message", [
    ([0, 12], r"decoder_layers: layer index 12 is out of range .* 0\.\.11"),
    ([-13], r"decoder_layers: layer index -13 is out of range"),
    ([], r"decoder_layers: the layer list is empty"),
    ([0, 0], r"decoder_layers: .* more than once"),
    ([0, -12], r"decoder_layers: .*\[0\] more than once"),
    ([0, 1.5], r"decoder_layers: layer index 1.5 is not an integer"),
    ({"first_last": 13}, r"decoder_layers: .*13 layers but the teacher has 12"),
    ({"first": 0}, r"decoder_layers: .*from 1 to 12"),
    ({"last": 2}, r"decoder_layers: .*'first_last' or 'first'"),
    ("every_third", r"decoder_layers: unknown layer spec 'every_third'"),
    (3, r"decoder_layers: unsupported layer spec 3"),
])
def test_select_layers_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        select_layers(12, spec, "decoder_layers")


# ------------------------------------------------------------------------------------------------
# Pruning every family
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(BUILDERS))
def test_keeping_all_layers_reproduces_the_teacher(family):
    teacher = build(family)
    student, info = prune_model(teacher, None, None)
    assert student is not teacher
    batch = inputs_for(teacher)
    assert torch.allclose(logits(student, batch), logits(teacher, batch), atol=1e-6)
    teacher_tokens, _ = greedy(teacher, batch)
    student_tokens, _ = greedy(student, batch)
    assert torch.equal(student_tokens, teacher_tokens)
    expected_encoder = list(range(LAYERS)) if family in ENCODER_DECODER else []
    assert info["encoder_layers"] == expected_encoder
    assert info["decoder_layers"] == list(range(LAYERS))
    assert info["family"] == family
    assert info["teacher_params"] == info["student_params"] and info["compression"] == 1.0


@pytest.mark.parametrize("family", list(BUILDERS))
def test_pruned_model_generates_saves_and_reloads(family, tmp_path):
    teacher = build(family)
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    teacher_config = teacher.config.to_dict()
    is_seq2seq = family in ENCODER_DECODER

    student, info = prune_model(teacher, [1, -1] if is_seq2seq else None, [0, -1])

    # The teacher is untouched.
    assert teacher.config.to_dict() == teacher_config
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())
    assert layer_counts(teacher)["decoder_layers"] == LAYERS

    # Mapping, config and parameter counts.
    assert info["decoder_layers"] == [0, LAYERS - 1]
    assert info["encoder_layers"] == ([1, LAYERS - 1] if is_seq2seq else [])
    assert layer_counts(student) == {"encoder_layers": 2 if is_seq2seq else 0, "decoder_layers": 2}
    family_spec = SUPPORTED_FAMILIES[family]
    assert getattr(student.config, family_spec.decoder_field) == 2
    if is_seq2seq:
        assert getattr(student.config, family_spec.encoder_field) == 2
    assert info["student_params"] == student.num_parameters() < info["teacher_params"]
    assert info["compression"] == info["teacher_params"] / info["student_params"] > 1

    # Student layer i holds teacher layer keep[i], weight for weight (T5's position bias lives in block 0)
    layer = re.compile(r"\.(block|layers|h)\.(\d+)\.")
    teacher_params = dict(teacher.named_parameters())
    compared = 0
    for name, param in student.named_parameters():
        match = layer.search(name)
        if not match:
            continue
        side = "encoder_layers" if is_seq2seq and "encoder" in name[:match.start()] else "decoder_layers"
        kept = info[side][int(match.group(2))] if "relative_attention_bias" not in name else 0
        source = name[:match.start()] + f".{match.group(1)}.{kept}." + name[match.end():]
        assert torch.equal(param, teacher_params[source]), f"{name} is not the teacher's {source}"
        compared += 1
    assert compared > 0

    # Cached greedy generation works and agrees with the uncached forward pass.
    batch = inputs_for(student)
    tokens, step_logits = greedy(student, batch)
    assert tokens.shape[0] == 2
    with torch.no_grad():
        if is_seq2seq:
            full = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           decoder_input_ids=tokens[:, :-1], use_cache=False).logits
        else:
            mask = torch.cat([batch["attention_mask"], torch.ones_like(tokens[:, 7:])], dim=1)[:, :-1]
            positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() numbers left-padded rows
            full = student(input_ids=tokens[:, :-1], attention_mask=mask, position_ids=positions,
                           use_cache=False).logits
    assert torch.allclose(full[:, -4:].transpose(0, 1), step_logits, atol=1e-5)

    # Round trip through safetensors.
    student.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    reloaded = type(student).from_pretrained(tmp_path, **ATTENTION).eval()
    assert layer_counts(reloaded) == layer_counts(student)
    assert torch.equal(logits(reloaded, batch), logits(student, batch))

    # Student layer i uses KV-cache slot i, as in a model transformers builds at this depth.
    def layer_indices(model):
        return {name: m.layer_idx for name, m in model.named_modules()
                if isinstance(getattr(m, "layer_idx", None), int)}
    assert layer_indices(student) == layer_indices(reloaded)
    assert sorted(set(layer_indices(student).values())) == [0, 1]


@pytest.mark.parametrize("family", ["t5", "mt5"])
def test_pruned_t5_matches_a_hand_built_reference(family):
    teacher = build(family)
    encoder_keep, decoder_keep = [1, 3], [2]  # block 0, which holds the bias, is dropped on both sides
    student, _ = prune_model(teacher, encoder_keep, decoder_keep)

    reference = copy.deepcopy(teacher)
    for stack, keep in ((reference.encoder, encoder_keep), (reference.decoder, decoder_keep)):
        bias = stack.block[0].layer[0].SelfAttention.relative_attention_bias
        for index in reversed(range(LAYERS)):
            if index not in keep:
                del stack.block[index]
        first = stack.block[0].layer[0].SelfAttention
        first.has_relative_attention_bias = True
        first.relative_attention_bias = bias
        stack.config.num_layers = len(keep)
    reference.config.num_layers = len(encoder_keep)
    reference.config.num_decoder_layers = len(decoder_keep)

    batch = inputs_for(teacher)
    assert torch.allclose(logits(student, batch), logits(reference, batch), atol=1e-6)
    assert not torch.allclose(logits(student, batch), logits(teacher, batch), atol=1e-3)
    for stack in (student.encoder, student.decoder):
        flags = [block.layer[0].SelfAttention.has_relative_attention_bias for block in stack.block]
        assert flags == [True] + [False] * (len(flags) - 1)
        assert all(not hasattr(block.layer[0].SelfAttention, "relative_attention_bias")
                   for block in stack.block[1:])
    teacher_bias = teacher.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
    student_bias = student.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
    assert torch.equal(student_bias, teacher_bias) and student_bias is not teacher_bias


def test_t5_with_a_deep_encoder_and_a_shallow_decoder_generates_with_the_default_cache():
    student, _ = prune_model(build("t5"), None, [-1])
    batch = inputs_for(student)
    del batch["decoder_input_ids"]
    with torch.no_grad():
        cached = student.generate(**batch, max_new_tokens=4, do_sample=False, use_cache=True)
        uncached = student.generate(**batch, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_t5_with_a_shallow_encoder_warns_and_generates_with_a_lazy_cache():
    # transformers sizes T5's generate() cache from the encoder depth; a lazily grown cache works.
    with pytest.warns(UserWarning, match=r"fewer encoder \(1\) than decoder \(4\) layers"):
        student, _ = prune_model(build("t5"), [0], None)
    batch = inputs_for(student)
    del batch["decoder_input_ids"]
    cache = transformers.EncoderDecoderCache(transformers.DynamicCache(), transformers.DynamicCache())
    with torch.no_grad():
        cached = student.generate(**batch, max_new_tokens=4, do_sample=False, **{CACHE_KWARG: cache})
        uncached = student.generate(**batch, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


def test_unknown_family_lists_the_supported_ones():
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32)
    model = transformers.BertForMaskedLM(config)
    with pytest.raises(ValueError, match=r"model_type 'bert'.*bart, gpt2, llama, marian, mbart"):
        prune_model(model, None, [0])


def test_encoder_side_of_a_decoder_only_model():
    with pytest.raises(ValueError, match="gpt2 has no encoder; use decoder_layers"):
        prune_model(build("gpt2"), [0], None)


def test_gpt2_with_layer_dependent_attention_scale_is_refused():
    _, kwargs, _ = BUILDERS["gpt2"]
    config = transformers.GPT2Config(**kwargs, scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        prune_model(transformers.GPT2LMHeadModel(config), None, [0, -1])


@pytest.mark.parametrize("encoder_layers, decoder_layers, message", [
    ([0, LAYERS], None, rf"encoder_layers: layer index {LAYERS} is out of range"),
    (None, [], "decoder_layers: the layer list is empty"),
    (None, [1, 1 - LAYERS], r"decoder_layers: .*\[1\] more than once"),
])
def test_prune_model_errors_name_the_side(encoder_layers, decoder_layers, message):
    with pytest.raises(ValueError, match=message):
        prune_model(build("bart"), encoder_layers, decoder_layers)
