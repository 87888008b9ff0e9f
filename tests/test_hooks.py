"""QKVCapture and the feature helpers on tiny random models built from configs (no downloads)."""

import contextlib

import pytest
import torch
import transformers

from nlgkd import feature_losses, hooks

B, L_SRC, L_TGT, VOCAB = 2, 7, 5, 64


def tiny_bart(d_model=16, heads=2, cls=transformers.BartForConditionalGeneration, config_cls=transformers.BartConfig):
    config = config_cls(
        vocab_size=VOCAB, d_model=d_model, encoder_layers=2, decoder_layers=3, encoder_attention_heads=heads,
        decoder_attention_heads=heads, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
    )
    torch.manual_seed(0)
    return cls(config).eval()


def tiny_t5():
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=3, num_heads=2,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(config).eval()


def tiny_gpt2():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def tiny_opt():
    config = transformers.OPTConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=32,
        max_position_embeddings=32, word_embed_proj_dim=16,
    )
    torch.manual_seed(0)
    return transformers.OPTForCausalLM(config).eval()


def tiny_llama():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def encdec_batch():
    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(3, VOCAB, (B, L_SRC), generator=g),
        "attention_mask": torch.ones(B, L_SRC, dtype=torch.long),
        "decoder_input_ids": torch.randint(3, VOCAB, (B, L_TGT), generator=g),
    }


def decoder_only_batch():
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(3, VOCAB, (B, L_TGT), generator=g)}


def all_projection_modules(model):
    return [m for name, m in model.named_modules() if name.split(".")[-1] in ("q_proj", "k_proj", "v_proj", "q", "k", "v", "c_attn")]


def assert_no_hooks(model):
    # Only the projections are hooked by QKVCapture (transformers may add hooks of its own elsewhere).
    modules = all_projection_modules(model)
    assert modules and all(not m._forward_hooks for m in modules)


@contextlib.contextmanager
def record_inputs(modules):
    """An independent record of what each module received, for the second manual computation."""
    seen = {}
    handles = [m.register_forward_pre_hook(lambda mod, args, i=i: seen.__setitem__(i, args[0])) for i, m in enumerate(modules)]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------ captured values equal a manual computation


def test_bart_capture_equals_manual_projection():
    model = tiny_bart()
    batch = encdec_batch()
    with torch.no_grad(), hooks.QKVCapture(model, sides=hooks.SIDES) as cap:
        out = model(**batch, output_hidden_states=True)
    enc_h, dec_h = out.encoder_hidden_states, out.decoder_hidden_states
    with torch.no_grad():
        for i, layer in enumerate(model.model.encoder.layers):  # BART is post-LN: attention sees the layer input
            for kind in "qkv":
                proj = getattr(layer.self_attn, f"{kind}_proj")
                torch.testing.assert_close(cap.get("encoder_self", kind, i), proj(enc_h[i]))
        for i, layer in enumerate(model.model.decoder.layers):
            torch.testing.assert_close(cap.get("decoder_self", "q", i), layer.self_attn.q_proj(dec_h[i]))
            torch.testing.assert_close(cap.get("decoder_self", "v", i), layer.self_attn.v_proj(dec_h[i]))
            # Cross-attention keys/values come from the encoder output, queries from the decoder.
            torch.testing.assert_close(cap.get("cross", "k", i), layer.encoder_attn.k_proj(out.encoder_last_hidden_state))
            torch.testing.assert_close(cap.get("cross", "v", i), layer.encoder_attn.v_proj(out.encoder_last_hidden_state))
            assert cap.get("cross", "q", i).shape == (B, L_TGT, 16)
    assert cap.get("cross", "k", -1).shape == (B, L_SRC, 16)
    assert len(cap.outputs) == 3 * (2 + 3 + 3)
    assert_no_hooks(model)


def test_t5_capture_equals_manual_projection():
    model = tiny_t5()
    batch = encdec_batch()
    with torch.no_grad(), hooks.QKVCapture(model, sides=hooks.SIDES) as cap:
        out = model(**batch, output_hidden_states=True)
    with torch.no_grad():
        for i, block in enumerate(model.encoder.block):  # T5 is pre-LN
            x = block.layer[0].layer_norm(out.encoder_hidden_states[i])
            for kind in "qkv":
                torch.testing.assert_close(cap.get("encoder_self", kind, i), getattr(block.layer[0].SelfAttention, kind)(x))
        for i, block in enumerate(model.decoder.block):
            x = block.layer[0].layer_norm(out.decoder_hidden_states[i])
            torch.testing.assert_close(cap.get("decoder_self", "k", i), block.layer[0].SelfAttention.k(x))
            torch.testing.assert_close(cap.get("cross", "k", i), block.layer[1].EncDecAttention.k(out.encoder_last_hidden_state))
            assert cap.get("cross", "q", i).shape == (B, L_TGT, 16)
    assert_no_hooks(model)


def test_gpt2_fused_capture_is_split_into_qkv():
    model = tiny_gpt2()
    with torch.no_grad(), hooks.QKVCapture(model, sides="decoder_self") as cap:
        out = model(**decoder_only_batch(), output_hidden_states=True)
    with torch.no_grad():
        for i, block in enumerate(model.transformer.h):
            q, k, v = block.attn.c_attn(block.ln_1(out.hidden_states[i])).split(16, dim=-1)
            torch.testing.assert_close(cap.get("decoder_self", "q", i), q)
            torch.testing.assert_close(cap.get("decoder_self", "k", i), k)
            torch.testing.assert_close(cap.get("decoder_self", "v", i), v)
    assert_no_hooks(model)
    with pytest.raises(ValueError, match="decoder-only"):
        hooks.QKVCapture(model, sides=["cross"])


@pytest.mark.parametrize(
    "build,batch_fn,sides",
    [
        (lambda: tiny_bart(cls=transformers.MBartForConditionalGeneration, config_cls=transformers.MBartConfig), encdec_batch, hooks.SIDES),
        (lambda: tiny_bart(cls=transformers.MarianMTModel, config_cls=transformers.MarianConfig), encdec_batch, hooks.SIDES),
        (lambda: tiny_bart(cls=transformers.PegasusForConditionalGeneration, config_cls=transformers.PegasusConfig), encdec_batch, hooks.SIDES),
        (tiny_opt, decoder_only_batch, ("decoder_self",)),
        (tiny_llama, decoder_only_batch, ("decoder_self",)),
    ],
    ids=["mbart", "marian", "pegasus", "opt", "llama"],
)
def test_other_families_capture_equals_module_applied_to_its_input(build, batch_fn, sides):
    model = build()
    targets = [
        (side, i, kind, getattr(attn, f"{kind}_proj"))
        for side in sides
        for i, attn in enumerate(hooks.attention_layers(model, side))
        for kind in "qkv"
    ]
    with torch.no_grad(), record_inputs([t[-1] for t in targets]) as seen, hooks.QKVCapture(model, sides=sides) as cap:
        model(**batch_fn())
    with torch.no_grad():
        for n, (side, i, kind, proj) in enumerate(targets):
            torch.testing.assert_close(cap.get(side, kind, i), proj(seen[n]))
    assert len(cap.outputs) == len(targets)
    assert_no_hooks(model)


# ------------------------------------------------------------------ hook lifetime, selection, errors


def test_hooks_removed_on_exception_and_clear():
    model = tiny_bart()
    with pytest.raises(RuntimeError, match="boom"):
        with hooks.QKVCapture(model, sides=["decoder_self", "cross"]) as cap:
            assert any(m._forward_hooks for m in all_projection_modules(model))
            raise RuntimeError("boom")
    assert_no_hooks(model)
    cap = hooks.QKVCapture(model, sides=["encoder_self"], layers=[-1], kinds=["k"])
    with cap:
        with torch.no_grad():
            model(**encdec_batch())
        assert list(cap.outputs) == [("encoder_self", "k", 1)]
        cap.clear()
        assert cap.outputs == {}
    assert_no_hooks(model)
    with pytest.raises(ValueError, match="out of range"):
        hooks.QKVCapture(model, sides=["decoder_self"], layers=[3])
    with pytest.raises(ValueError, match="side"):
        hooks.QKVCapture(model, sides=["encoder"])


def test_layer_dict_selection_and_get_errors():
    model = tiny_bart()
    with torch.no_grad(), hooks.QKVCapture(model, sides=["encoder_self", "decoder_self"], layers={"decoder_self": [0, -1]}, kinds="q") as cap:
        model(**encdec_batch())
    assert sorted(cap.outputs) == [
        ("decoder_self", "q", 0), ("decoder_self", "q", 2), ("encoder_self", "q", 0), ("encoder_self", "q", 1)
    ]
    with pytest.raises(KeyError, match="not captured"):
        cap.get("cross", "q", 0)


def test_unsupported_model_names_class_and_supported_types():
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    with pytest.raises(ValueError, match="BertModel.*bart.*t5.*gpt2"):
        hooks.QKVCapture(transformers.BertModel(config))
    with pytest.raises(ValueError, match="Linear"):
        hooks.attention_layers(torch.nn.Linear(2, 2), "decoder_self")


def test_relation_kd_on_captured_features_trains_the_student():
    """End to end: MiniLM relations between a narrow student and a wider teacher with more heads."""
    student, teacher = tiny_bart(d_model=16, heads=2), tiny_bart(d_model=32, heads=4)
    batch = encdec_batch()
    mask = torch.ones(B, L_TGT, dtype=torch.bool)
    with hooks.QKVCapture(student, sides=["decoder_self", "cross"], layers=[-1]) as s_cap, \
            hooks.QKVCapture(teacher, sides=["decoder_self", "cross"], layers=[-1]) as t_cap:
        student(**batch)
        with torch.inference_mode():
            teacher(**batch)
        loss = feature_losses.relation_kd_loss(s_cap.get("decoder_self", "q", -1), t_cap.get("decoder_self", "q", -1), 4, mask)
        loss = loss + feature_losses.relation_kd_loss(
            s_cap.get("cross", "q", -1), t_cap.get("cross", "q", -1), 4, mask,
            student_y=s_cap.get("cross", "k", -1), teacher_y=t_cap.get("cross", "k", -1),
            mask_y=batch["attention_mask"].bool(),
        )
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert student.model.decoder.layers[-1].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert student.model.decoder.layers[-1].encoder_attn.k_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert_no_hooks(student)
    assert_no_hooks(teacher)


def test_hidden_states_and_attentions_helpers():
    model = tiny_bart()
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        out = model(**encdec_batch(), output_hidden_states=True, output_attentions=True)
    assert len(hooks.hidden_states(out, "encoder")) == 2 + 1
    assert len(hooks.hidden_states(out, "decoder")) == 3 + 1
    assert hooks.attentions(out, "cross")[0].shape == (B, 2, L_TGT, L_SRC)
    assert hooks.attentions(out, "decoder_self")[0].shape == (B, 2, L_TGT, L_TGT)
    gpt2 = tiny_gpt2()
    with torch.no_grad():
        plain = gpt2(**decoder_only_batch())
    with pytest.raises(ValueError, match="output_hidden_states"):
        hooks.hidden_states(plain, "decoder")
    with pytest.raises(ValueError, match="eager"):
        hooks.attentions(plain, "decoder_self")
