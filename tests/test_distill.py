"""The prune and distill stages on the tiny demo recipe: every objective runs, KD beats cross-entropy
at matching the teacher, bad pairs are refused before training."""
from __future__ import annotations

import contextlib
import copy
import json

import pytest
import torch

from nlgkd.data import collate, encode, load_splits
from nlgkd.models import load_pretrained, target_logits
from nlgkd.config import RecipeError
from nlgkd.recipe import parse_recipe
from nlgkd.runner import Runner, StageError
from nlgkd.stages.distill import set_teacher_noise

from conftest import distill_stage, with_stage

STUDENT_STEPS = 25


def test_prune_stage_records_mapping_and_size(trained):
    recipe, root = trained
    record = json.loads((root / "tiny" / "student" / "stage.json").read_text())
    assert record["prune"]["decoder_layers"] == [1] and record["prune"]["encoder_layers"] == [0, 1]
    assert record["prune"]["compression"] > 1
    model, _ = load_pretrained(str(root / "tiny" / "student"))
    assert model.config.decoder_layers == 1 and model.config.encoder_layers == 2


OBJECTIVES = {
    "finetune": {"objective": "finetune"},
    "logits_kd": {"objective": "logits_kd", "temperature": 2.0, "alpha": 0.5},
    "reverse_kl": {"objective": "logits_kd", "divergence": "reverse_kl"},
    "jsd": {"objective": "logits_kd", "divergence": "jsd", "jsd_beta": 0.3},
    "logits_mse": {"objective": "logits_mse"},
    "noisy_kd": {"objective": "noisy_kd", "noise_dropout": 0.1},  # the tests' teacher has no dropout of its own
    "ensemble": {"objective": "logits_kd", "teacher": ["teacher", "teacher"]},
    "pkd": {"hidden": {"loss": "pkd", "sides": ["encoder", "decoder"], "layer_map": "last"}},
    "cosine": {"hidden": {"loss": "cosine", "layer_map": [[0, 1]]}},
    "tinybert_hidden": {"hidden": {"loss": "tinybert", "sides": ["encoder"]}},
    "minilm": {"attention": {"loss": "minilm", "sides": ["encoder_self", "decoder_self", "cross"],
                             "relation_heads": 4}},
    "tinybert_attention": {"attention": {"loss": "tinybert", "sides": ["decoder_self", "cross"]}},
}


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_every_objective_runs_and_logs_its_terms(trained, name):
    # alpha and the feature weights away from their defaults, so the test sees each one applied
    spec = with_weights(OBJECTIVES[name], alpha=0.3, weight=0.5)
    runner, _ = with_stage(trained, distill_stage(f"kd_{name}", log_every=1, **spec))
    runner.run(only=f"kd_{name}")
    folder = runner.run_dir / f"kd_{name}"
    first = json.loads((folder / "metrics.jsonl").read_text().splitlines()[0])
    objective = spec.get("objective", "logits_kd")
    # step 1 is one batch, so the logged loss is exactly the sum of the logged terms with the recipe's weights
    terms = {"ce": 1.0 if objective == "finetune" else 0.3}
    if objective != "finetune":
        terms[objective] = 0.7
    terms.update({side: 0.5 for side in ("hidden", "attention") if side in spec})
    assert set(terms) <= set(first), first
    assert first["loss"] == pytest.approx(sum(w * first[t] for t, w in terms.items()), rel=1e-5), first
    # every term measures a real difference: the pruned student is not its teacher
    assert all(first[t] > 1e-5 for t in terms), first
    load_pretrained(str(folder))  # a plain student artifact, without projection layers


def with_weights(spec: dict, alpha: float, weight: float) -> dict:
    """`spec` with gold cross-entropy mixed by `alpha` and every hidden/attention term weighted by `weight`."""
    spec = copy.deepcopy(spec)
    if spec.get("objective", "logits_kd") != "finetune":
        spec["alpha"] = alpha
    for side in ("hidden", "attention"):
        if side in spec:
            spec[side]["weight"] = weight
    return spec


def agreement(student_dir, teacher_dir, recipe) -> float:
    """Share of validation target positions where the student's top token equals the teacher's."""
    student, tokenizer = load_pretrained(str(student_dir))
    teacher, _ = load_pretrained(str(teacher_dir))
    splits, _ = load_splits(parse_recipe(recipe).data)
    encoded, _ = encode(splits["validation"], tokenizer, 48, 48)
    batch = collate(list(encoded), pad_id=tokenizer.pad_token_id, causal=False)
    with torch.no_grad():
        s, t = target_logits(student.eval(), batch), target_logits(teacher.eval(), batch)
    mask = batch["labels"] != -100
    return ((s.argmax(-1) == t.argmax(-1)) & mask).sum().item() / mask.sum().item()


def test_kd_matches_the_teacher_better_than_cross_entropy(trained):
    common = {"max_steps": STUDENT_STEPS, "lr": 3e-3, "log_every": 1}
    runner, recipe = with_stage(trained, distill_stage("ce_only", objective="finetune", **common),
                                distill_stage("kd", objective="logits_kd", **common))
    runner.run(only="ce_only")
    runner.run(only="kd")
    logs = [json.loads(line) for line in (runner.run_dir / "kd" / "metrics.jsonl").read_text().splitlines()]
    kd_losses = [r["logits_kd"] for r in logs if "logits_kd" in r]
    assert sum(kd_losses[-5:]) / 5 < sum(kd_losses[:5]) / 5
    teacher_dir = runner.run_dir / "teacher"
    kd = agreement(runner.run_dir / "kd", teacher_dir, recipe)
    ce = agreement(runner.run_dir / "ce_only", teacher_dir, recipe)
    assert kd > ce, (kd, ce)


def test_vocabulary_mismatch_stops_before_training(trained):
    recipe, root = trained
    recipe = copy.deepcopy(recipe)
    recipe["models"]["other"] = {**recipe["models"]["teacher"], "vocab_size": 280}
    recipe["stages"].append({"name": "bad", "kind": "distill", "student": "other", "teacher": "teacher"})
    runner = Runner(parse_recipe(recipe), runs_root=root)
    with pytest.raises(StageError, match=r"teacher 'teacher' \(.*, \d+ tokens\) and student 'other' \(.*, \d+ tokens\) have different vocabularies"):
        runner.run(only="bad")
    assert not (root / "tiny" / "bad").exists()


def test_kd_objective_without_teacher_is_refused(trained):
    runner, _ = with_stage(trained, {"name": "lonely", "kind": "distill", "student": "student"})
    with pytest.raises(StageError, match=r"objective 'logits_kd' needs a teacher"):
        runner.run(only="lonely")


def test_noisy_kd_with_a_dropout_free_teacher_is_refused(trained):
    # the tests' teacher has dropout 0: noisy KD would silently equal logits KD
    runner, _ = with_stage(trained, distill_stage("noisy", objective="noisy_kd"))
    with pytest.raises(StageError, match=r"teacher 'teacher' has no dropout .* set noise_dropout"):
        runner.run(only="noisy")
    # a config-only mistake: the recipe is refused when it is read (nlgkd validate says so too)
    with pytest.raises(RecipeError, match=r"noise_dropout is the teacher's dropout for objective: noisy_kd"):
        with_stage(trained, distill_stage("plain", objective="logits_kd", noise_dropout=0.1))


def test_noise_dropout_makes_the_teacher_noisy(trained):
    _, root = trained
    teacher, _ = load_pretrained(str(root / "tiny" / "teacher"))
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8, 2]]), "attention_mask": torch.ones(1, 5, dtype=torch.long),
             "decoder_input_ids": torch.tensor([[2, 9, 10, 11]])}
    teacher.train()
    with torch.no_grad():
        assert torch.equal(teacher(**batch).logits, teacher(**batch).logits)  # its own dropout is 0
        with pytest.raises(ValueError, match="has no dropout"):
            set_teacher_noise(teacher, None, "teacher 'teacher'")
        set_teacher_noise(teacher, 0.3, "teacher 'teacher'")
        assert not torch.equal(teacher(**batch).logits, teacher(**batch).logits)
        teacher.eval()  # eval mode turns the noise off again
        assert torch.equal(teacher(**batch).logits, teacher(**batch).logits)


@pytest.mark.parametrize("fields", [
    {"objective": "finetune"},
    {"objective": "logits_kd", "temperature": 2.0, "alpha": 0.3},
    {"objective": "logits_kd", "divergence": "reverse_kl", "temperature": 0.5},
    {"objective": "logits_mse", "alpha": 0.25},
], ids=["finetune", "forward_kl_T2_alpha", "reverse_kl_T05", "logits_mse_alpha"])
def test_each_objective_is_its_formula_with_the_stages_temperature_and_alpha(trained, fields):
    """The distill stage's loss equals the textbook formula written out here, so a swapped alpha or an
    ignored temperature fails."""
    from nlgkd.config import DistillConfig
    from nlgkd.stages.distill_loss import StudentWithProjections, make_loss

    recipe, root = trained
    student, tokenizer = load_pretrained(str(root / "tiny" / "student"))
    teacher, _ = load_pretrained(str(root / "tiny" / "teacher"))
    splits, _ = load_splits(parse_recipe(recipe).data)
    encoded, _ = encode(splits["validation"], tokenizer, 48, 48)
    batch = collate(list(encoded)[:6], pad_id=tokenizer.pad_token_id, causal=False)
    cfg = DistillConfig(student="student", teacher="teacher", **fields)
    normalizer = 17.0  # the loop's global token count; any number scales every term alike
    loss, _ = make_loss(cfg, [teacher.eval()], causal=False)(StudentWithProjections(student.eval(), {}), batch,
                                                             normalizer)

    with torch.no_grad():
        s, t = target_logits(student, batch).double(), target_logits(teacher, batch).double()
    mask = batch["labels"] != -100
    ce = torch.nn.functional.cross_entropy(s[mask], batch["labels"][mask], reduction="sum") / normalizer
    T, alpha = cfg.temperature, cfg.alpha
    log_ps, log_pt = (s[mask] / T).log_softmax(-1), (t[mask] / T).log_softmax(-1)
    if cfg.objective == "finetune":
        expected = ce
    elif cfg.objective == "logits_mse":
        expected = (1 - alpha) * ((s[mask] - t[mask]) ** 2).mean(-1).sum() / normalizer + alpha * ce
    elif cfg.divergence == "forward_kl":
        expected = (1 - alpha) * T**2 * (log_pt.exp() * (log_pt - log_ps)).sum() / normalizer + alpha * ce
    else:
        expected = (1 - alpha) * T**2 * (log_ps.exp() * (log_ps - log_pt)).sum() / normalizer + alpha * ce
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_on_a_student_prefix_the_loss_is_the_kd_term_alone(trained):
    """Joint-Teaching's student steps train on the student's own samples: no gold cross-entropy on them and no
    alpha mixing, only the teacher's word-level distribution (forward KL at the stage's temperature)."""
    from nlgkd.config import DistillConfig, JointTeachingConfig
    from nlgkd.stages.distill_loss import StudentWithProjections, make_loss

    recipe, root = trained
    student, tokenizer = load_pretrained(str(root / "tiny" / "student"))
    teacher, _ = load_pretrained(str(root / "tiny" / "teacher"))
    splits, _ = load_splits(parse_recipe(recipe).data)
    encoded, _ = encode(splits["validation"], tokenizer, 48, 48)
    batch = {**collate(list(encoded)[:6], pad_id=tokenizer.pad_token_id, causal=False), "student_prefix": True}
    cfg = DistillConfig(student="student", teacher="teacher", objective="logits_kd", temperature=2.0, alpha=0.3,
                        joint_teaching=JointTeachingConfig(student_ratio=0.5))
    loss, logs = make_loss(cfg, [teacher.eval()], causal=False)(StudentWithProjections(student.eval(), {}),
                                                                batch, 17.0)
    with torch.no_grad():
        s, t = target_logits(student, batch).double(), target_logits(teacher, batch).double()
    mask = batch["labels"] != -100
    log_ps, log_pt = (s[mask] / 2.0).log_softmax(-1), (t[mask] / 2.0).log_softmax(-1)
    expected = 2.0**2 * (log_pt.exp() * (log_pt - log_ps)).sum() / 17.0
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert "ce" not in logs and logs["kd_student_prefix"] == pytest.approx(expected.item(), rel=1e-4)


def test_a_teacher_with_a_padded_vocabulary_distills_as_the_unpadded_one(trained, tmp_path):
    # T5 checkpoints carry 32,128 embedding rows for 32,100 tokens; a student with the tokenizer's 32,100 must
    # distill from them over the ids the tokenizer has, which a padded copy of the tiny teacher stands for here
    from nlgkd.models import load_pretrained, save_model

    model, tokenizer = load_pretrained(str(trained[1] / "tiny" / "teacher"))
    model.resize_token_embeddings(len(tokenizer) + 28)  # the extra rows: no token maps to them
    save_model(model, tokenizer, tmp_path / "padded")
    losses = {}
    for name, folder in (("plain", trained[1] / "tiny" / "teacher"), ("padded", tmp_path / "padded")):
        recipe = copy.deepcopy(trained[0])
        recipe["models"][f"teacher_{name}"] = {"init": "pretrained", "name_or_path": str(folder)}
        recipe["stages"].append(distill_stage(f"kd_{name}", teacher=f"teacher_{name}", objective="logits_kd"))
        runner = Runner(parse_recipe(recipe), runs_root=trained[1])
        runner.run(only=f"kd_{name}")
        losses[name] = [json.loads(line) for line in
                        (runner.run_dir / f"kd_{name}" / "metrics.jsonl").read_text().splitlines()]
    assert sum("loss" in row for row in losses["plain"]) == 3 and losses["padded"] == losses["plain"]


# the weights' tolerance: TinyBERT's encoder-side term is a mean over encoder positions, weighted across
# micro-batches and processes by their share of *target* tokens (the loop's normalizer), so 2 processes
# weight the halves of a batch slightly otherwise than 1 (AdamW then moves rarely used embedding rows apart by
# up to ~lr); the losses still agree step by step
@pytest.mark.parametrize("stage, atol", [("accum2", 1e-5), ("tinybert2", 2e-3), ("rows2", 1e-5)])
def test_two_processes_distill_as_one_with_accumulation_and_projections(trained, two_processes, stage, atol):
    """Gradient accumulation under DDP (no_sync on all but the last micro-batch), TinyBERT's projections and
    Joint-Teaching's mix: rows on 2 processes: the same losses at every step and the same student as on 1."""
    from safetensors.torch import load_file

    from conftest import with_two_process_stages
    from nlgkd.runner import Runner

    runner = Runner(parse_recipe(with_two_process_stages(trained)), runs_root=trained[1])
    runner.run(only=stage)
    assert json.loads((two_processes / stage / "stage.json").read_text())["world_size"] == 2

    def losses(run_dir):
        rows = [json.loads(line) for line in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]
        return [row["loss"] for row in rows if "loss" in row]

    assert len(losses(two_processes)) == 3  # float sums in another order: KD losses here are ~1e-4
    assert losses(two_processes) == pytest.approx(losses(runner.run_dir), rel=1e-4, abs=1e-8)
    ours, theirs = (load_file(str(d / stage / "model.safetensors")) for d in (two_processes, runner.run_dir))
    assert all(torch.allclose(ours[k], theirs[k], atol=atol) for k in theirs)


def test_tinybert_projections_start_from_the_stage_seed(trained):
    """The learned projections are initialized from the stage's seed, whatever the global generator holds after
    loading the models (which differs between runs and processes)."""
    from nlgkd.config import DistillConfig, HiddenKD
    from nlgkd.stages.distill import with_projections

    student, _ = load_pretrained(str(trained[1] / "tiny" / "student"))
    teacher, _ = load_pretrained(str(trained[1] / "tiny" / "teacher"))
    cfg = DistillConfig(student="student", teacher="teacher", hidden=HiddenKD(loss="tinybert", sides=["encoder"]))
    made = []
    for noise in (1, 2):
        torch.manual_seed(noise)  # another state of the global generator
        made.append(with_projections(cfg, student, [teacher], seed=0).projections.state_dict())
    assert made[0].keys() and all(torch.equal(made[0][k], made[1][k]) for k in made[0])
    other = with_projections(cfg, student, [teacher], seed=1).projections.state_dict()
    assert not all(torch.equal(made[0][k], other[k]) for k in made[0])



# ------------------------------------------------------------------------------ each source encoded once
def k_targets_per_source(trained, k: int = 4, sources: int = 3):
    """A collated batch of `sources` sources with `k` different targets each (rows of one source side by side),
    the tiny student and teacher, with dropout off so both paths compute the same function."""
    from nlgkd.config import DistillConfig

    recipe, root = trained
    student, tokenizer = load_pretrained(str(root / "tiny" / "student"))
    teacher, _ = load_pretrained(str(root / "tiny" / "teacher"))
    splits, _ = load_splits(parse_recipe(recipe).data)
    encoded, _ = encode(splits["train"], tokenizer, 48, 48)
    rows = list(encoded)
    examples = [{"source_ids": rows[s]["source_ids"], "target_ids": rows[sources + s * k + j]["target_ids"]}
                for s in range(sources) for j in range(k)]
    batch = collate(examples, pad_id=tokenizer.pad_token_id, causal=False)
    for model in (student, teacher):
        model.eval()  # dropout off; gradients still flow
    return student, teacher, batch, DistillConfig


@pytest.mark.parametrize("hidden", [None, {"loss": "pkd", "sides": ["encoder", "decoder"], "layer_map": "last"}])
def test_encoding_each_source_once_gives_the_re_encoding_gradients(trained, hidden):
    from nlgkd.stages.distill_loss import StudentWithProjections, make_loss

    student, teacher, batch, DistillConfig = k_targets_per_source(trained)
    normalizer = (batch["labels"] != -100).sum()
    results = {}
    for schedule in ("all", "all_together"):
        from nlgkd.config import HiddenKD

        cfg = DistillConfig(student="student", teacher="teacher", objective="logits_kd", alpha=0.3,
                            temperature=2.0, pt_schedule=schedule, hidden=hidden and HiddenKD(**hidden))
        model = StudentWithProjections(copy.deepcopy(student), {})
        with encoder_rows(model.student) as student_rows, encoder_rows(teacher) as teacher_rows:
            loss, logs = make_loss(cfg, [teacher], causal=False)(model, batch, normalizer)
        # 3 sources with 4 targets each: 3 encoder rows when each source is encoded once, else 12
        assert student_rows == teacher_rows == [3 if schedule == "all_together" else 12]
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results[schedule] = (loss.detach(), logs, grads)
    (loss_all, logs_all, grads_all), (loss_once, logs_once, grads_once) = results["all"], results["all_together"]
    assert loss_once == pytest.approx(loss_all.item(), abs=1e-5)
    assert logs_once == pytest.approx(logs_all, abs=1e-5)
    encoder = [name for name in grads_all if ".encoder." in name]
    assert encoder and set(grads_once) == set(grads_all)
    for name in grads_all:  # the encoder's gradients sum the K targets' contributions, as K passes do
        assert torch.allclose(grads_once[name], grads_all[name], atol=1e-5), name


def test_with_shared_sources_encodes_each_distinct_source_once(trained):
    from nlgkd.models import forward_on_targets, with_shared_sources

    student, _, batch, _ = k_targets_per_source(trained, k=4, sources=3)
    shared = with_shared_sources(batch)
    assert shared["unique_input_ids"].shape[0] == 3
    assert torch.equal(shared["unique_input_ids"][shared["source_index"]], batch["input_ids"])
    with torch.no_grad(), encoder_rows(student) as rows:
        logits_once, _ = forward_on_targets(student, shared)
        logits_each, _ = forward_on_targets(student, batch)
    assert rows == [3, 12]
    assert torch.allclose(logits_once, logits_each, atol=1e-5)


@contextlib.contextmanager
def encoder_rows(model):
    """The number of rows each pass of `model`'s encoder reads, as a list filled while the block runs."""
    rows = []
    handle = model.get_encoder().register_forward_hook(
        lambda module, args, kwargs, out: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        yield rows
    finally:
        handle.remove()


def test_all_together_keeps_an_inputs_pts_side_by_side():
    from nlgkd.loop import grouped_order
    from nlgkd.stages.distill_data import with_pseudo_targets

    groups = [[{"source_ids": [g] * (1 + g % 5), "target_ids": [g, j], "input": g} for j in range(3)] for g in range(40)]
    gold = [{"source_ids": [100 + i], "target_ids": [i]} for i in range(10)]
    denoising = [{"source_ids": [7, 8], "target_ids": [8]} for _ in range(5)]  # pairs join without a group
    data = with_pseudo_targets(lambda epoch: gold, groups, "all_together")(0) + denoising
    assert len(data) == 10 + 40 * 3 + 5
    for by_length in (False, True):
        order = grouped_order(data, 12, torch.Generator().manual_seed(0), by_length)
        assert sorted(order) == list(range(len(data)))  # each example once
        seen = [data[i].get("group") for i in order]
        runs = [g for i, g in enumerate(seen) if i == 0 or seen[i - 1] != g]
        seen = [s for s in seen if s is not None]
        assert len(runs) - sum(r is None for r in runs) == len(set(seen)) == 50  # each group in one run of neighbours
        assert order != sorted(order)  # shuffled


def test_a_distill_stage_trains_on_all_pts_together(trained):
    pts = {"name": "pts_k3", "kind": "pseudo_targets", "teacher": "teacher", "inputs": ["train"], "max_examples": 32,
           "decoding": {"strategy": "sample", "num_return_sequences": 3, "max_new_tokens": 12, "batch_size": 16}}
    runner, _ = with_stage(trained, pts, distill_stage("kd_together", pseudo_targets=["pts_k3"], gold=False,
                                                       pt_schedule="all_together", batch_size=12, max_steps=4))
    runner.run(only="pts_k3")
    runner.run(only="kd_together")
    record = json.loads((runner.run_dir / "kd_together" / "stage.json").read_text())
    assert record["status"] == "done" and record["train"]["steps"] == 4
    # a decoder-only student has no encoder to share: refused before training, naming the field
    from types import SimpleNamespace

    from nlgkd.config import DistillConfig
    from nlgkd.stages.distill import check_distill_setup

    decoder_only = SimpleNamespace(config=SimpleNamespace(is_encoder_decoder=False, model_type="gpt2"))
    cfg = DistillConfig(student="student", objective="finetune", pt_schedule="all_together")
    with pytest.raises(ValueError, match="pt_schedule: all_together encodes each source once, but student"):
        check_distill_setup(cfg, decoder_only, [], None, [], [])
