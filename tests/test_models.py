"""Fresh models: the default architecture and nlgkd's init for fresh BART/mBART (nlgkd/models.py)."""
from __future__ import annotations

import pytest
import torch

from nlgkd.models import build_fresh
from nlgkd.config import ModelConfig

TEXTS = [f"the {w} sat on the mat {i}" for i, w in enumerate(["cat", "dog", "bird", "fox"] * 20)]


def test_the_default_fresh_architecture_is_mbart():
    assert ModelConfig().arch == "mbart"


@pytest.mark.parametrize("arch", ["bart", "mbart"])
@pytest.mark.parametrize("init_std, expected", [(None, 64 ** -0.5), (0.02, 0.02)])
def test_fresh_bart_weights_are_drawn_at_one_over_sqrt_d_model_unless_the_recipe_says(arch, init_std, expected):
    cfg = ModelConfig(arch=arch, d_model=64, encoder_layers=2, decoder_layers=2, attention_heads=2, ffn_dim=256,
                      vocab_size=120, init_std=init_std)
    model, _ = build_fresh(cfg, TEXTS, seed=0)
    assert model.config.init_std == pytest.approx(expected)
    for name, weight in [("embeddings", model.get_input_embeddings().weight),
                         ("a feed-forward layer", model.model.encoder.layers[0].fc1.weight),
                         ("an attention projection", model.model.decoder.layers[1].encoder_attn.k_proj.weight)]:
        assert weight.std().item() == pytest.approx(expected, rel=0.1), name


def test_t5_keeps_its_own_init():
    cfg = ModelConfig(arch="t5", d_model=64, encoder_layers=1, decoder_layers=1, attention_heads=2, ffn_dim=128,
                      vocab_size=120)
    model, _ = build_fresh(cfg, TEXTS, seed=0)
    assert model.shared.weight.std().item() == pytest.approx(1.0, rel=0.1)  # T5's unit-scale embeddings
    assert torch.isfinite(model.lm_head.weight).all()


def test_a_missing_or_wrong_model_folder_is_named(tmp_path):
    from nlgkd.models import ModelLoadError, load_pretrained

    with pytest.raises(ModelLoadError, match=r"'.*nowhere' does not exist; give a model folder"):
        load_pretrained(str(tmp_path / "nowhere"))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"weights\.bin' is a file, not a model folder"):
        load_pretrained(str(tmp_path / "weights.bin"))
    (tmp_path / "run" / "teacher").mkdir(parents=True)  # a run directory, not one of its stages
    with pytest.raises(ModelLoadError, match=r"run' holds no model \(no config\.json\): a run folder holds one "
                                             r"folder per stage"):
        load_pretrained(str(tmp_path / "run"))
