"""Data loading: files, templates, empty examples, encodings; collated batches line up with targets."""
from __future__ import annotations

import json

import pytest

from nlgkd.data import collate, load_splits, pad
from nlgkd.config import DataConfig, RecipeError, TaskData


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_jsonl_with_template_fields(tmp_path):
    rows = [{"context": f"the sky is blue {i}", "answer": "blue", "question": f"what colour {i}?"} for i in range(5)]
    config = DataConfig(train=write_jsonl(tmp_path / "train.jsonl", rows),
                        source="{context}; answer: {answer}", target="question")
    splits, report = load_splits(config)
    assert splits["train"][0] == {"source": "the sky is blue 0; answer: blue", "target": "what colour 0?"}
    assert report.sizes == {"train": 5}


def test_csv_and_max_examples(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("source,target\n" + "".join(f"in {i},out {i}\n" for i in range(10)), encoding="utf-8")
    splits, _ = load_splits(DataConfig(train=str(path), max_examples={"train": 4}))
    assert len(splits["train"]) == 4


def test_missing_file_names_the_field(tmp_path):
    with pytest.raises(RecipeError, match=r"data\.validation: file .*nope\.jsonl' not found"):
        load_splits(DataConfig(train=write_jsonl(tmp_path / "t.jsonl", [{"source": "a", "target": "b"}]),
                               validation=str(tmp_path / "nope.jsonl")))


def test_data_dir_reads_split_files_from_that_folder_and_moving_them_keeps_the_fingerprint(tmp_path):
    from nlgkd.fingerprints import data_fingerprint

    rows = [{"original": f"thou art {i}", "modern": f"you are {i}"} for i in range(4)]
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        write_jsonl(tmp_path / folder / "train.jsonl", rows)
        write_jsonl(tmp_path / folder / "test.jsonl", rows[:2])
    config = DataConfig(dir=str(tmp_path / "a"), train="train.jsonl", test="test.jsonl", source="original",
                        target="modern")
    splits, report = load_splits(config)
    assert report.sizes == {"train": 4, "test": 2} and splits["test"][1]["target"] == "you are 1"
    moved = DataConfig(**{**config.__dict__, "dir": str(tmp_path / "b")})
    assert data_fingerprint(moved, 0) == data_fingerprint(config, 0)
    write_jsonl(tmp_path / "b" / "test.jsonl", rows[1:3])  # other bytes: another fingerprint
    assert data_fingerprint(moved, 0) != data_fingerprint(config, 0)
    with pytest.raises(RecipeError, match=r"data\.test: file .*nope.*not found .*data\.dir"):
        load_splits(DataConfig(**{**config.__dict__, "test": "nope.jsonl"}))


def test_missing_column_lists_columns(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"document": "a", "summary": "b"}])
    with pytest.raises(RecipeError, match=r"data\.source: column 'source' is not in the train split; its columns are \['document', 'summary'\]"):
        load_splits(DataConfig(train=path))


def test_empty_targets_dropped_and_counted_or_rejected(tmp_path):
    rows = [{"source": "a", "target": "b"}, {"source": "c", "target": "  "}, {"source": "", "target": "d"}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    splits, report = load_splits(DataConfig(train=path, max_dropped_share=0.7))
    assert len(splits["train"]) == 1 and report.dropped_empty["train"] == 2
    # 2 of 3 is more than the default share (0.2): most likely a wrong column, so the run stops and says so
    with pytest.raises(RecipeError, match=r"data: 2 of 3 train examples \(67%\) have an empty source or target \(the "
                                          r"first: example 1, its target\), more than data.max_dropped_share 20%"):
        load_splits(DataConfig(train=path))
    with pytest.raises(RecipeError, match=r"train example 1 has an empty target; fix the data or set data.on_empty: drop"):
        load_splits(DataConfig(train=path, on_empty="error"))


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes('{"source": "caf\xe9", "target": "x"}\n'.encode("latin-1"))
    with pytest.raises(RecipeError, match=r"data\.train: .*latin\.jsonl' is not UTF-8"):
        load_splits(DataConfig(train=str(path)))


def test_unlabeled_split_has_inputs_only(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"source": "a", "target": "b"}])
    unlabeled = write_jsonl(tmp_path / "u.jsonl", [{"source": "x"}, {"source": "y"}])
    splits, _ = load_splits(DataConfig(train=train, unlabeled=unlabeled))
    assert splits["unlabeled"].column_names == ["source"] and len(splits["unlabeled"]) == 2


def test_demo_task_is_deterministic():
    config = DataConfig(task="demo")
    config.demo.train, config.demo.validation, config.demo.test, config.demo.unlabeled = 50, 5, 5, 5
    a, _ = load_splits(config, seed=3)
    b, _ = load_splits(config, seed=3)
    assert a["train"].to_list() == b["train"].to_list()
    assert set(a) == {"train", "validation", "test", "unlabeled"}


def test_collate_seq2seq_and_causal_align_targets():
    examples = [{"source_ids": [5, 6, 2], "target_ids": [7, 2]}, {"source_ids": [8, 2], "target_ids": [9, 10, 2]}]
    seq2seq = collate(examples, pad_id=0, causal=False)
    assert seq2seq["input_ids"].tolist() == [[5, 6, 2], [8, 2, 0]]
    assert seq2seq["labels"].tolist() == [[7, 2, -100], [9, 10, 2]]
    causal = collate(examples, pad_id=0, causal=True, sep_id=2)
    assert causal["input_ids"].tolist() == [[5, 6, 2, 2, 7, 2], [8, 2, 2, 9, 10, 2]]
    assert causal["target_offsets"].tolist() == [4, 3]
    for row, offset, labels in zip(causal["input_ids"], causal["target_offsets"], causal["labels"]):
        n = int((labels != -100).sum())
        assert row[offset : offset + n].tolist() == labels[:n].tolist()


def test_left_padding():
    ids, mask = pad([[1, 2, 3], [4]], pad_id=0, left=True)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_tasks_read_their_files_from_the_top_level_data_dir_and_dir_is_refused_beside_a_hub_or_task(tmp_path):
    from nlgkd.recipe import parse_recipe

    write_jsonl(tmp_path / "qa.jsonl", [{"source": f"q{i}", "target": f"a{i}"} for i in range(3)])
    config = DataConfig(dir=str(tmp_path), tasks={"qa": TaskData(train="qa.jsonl", prefix="qa: ")})
    splits, report = load_splits(config)
    assert report.sizes == {"train": 3} and splits["train"][0]["source"] == "qa: q0"
    recipe = {"data": {"task": "demo", "dir": str(tmp_path)}, "models": {"m": {}}, "stages": [
        {"name": "e", "kind": "evaluate", "models": ["m"]}]}
    with pytest.raises(RecipeError, match=r"data\.dir: the folder of data files, but this dataset is the built-in "
                                          r"task; remove dir"):
        parse_recipe(recipe)


def test_validate_reads_the_first_row_of_every_data_file(tmp_path, capsys):
    from nlgkd.cli import main

    write_jsonl(tmp_path / "train.jsonl", [{"question": "q", "answer": "a"}])
    (tmp_path / "test.csv").write_text("question,reply\nq,a\n", encoding="utf-8")
    (tmp_path / "bad.jsonl").write_text('not json\n', encoding="utf-8")
    recipe = {"name": "mine", "data": {"dir": str(tmp_path), "train": "train.jsonl", "test": "test.csv",
                                       "validation": "valid.jsonl", "unlabeled": "bad.jsonl",
                                       "source": "{question}", "target": "answr"},
              "models": {"t": {}}, "stages": [{"name": "t", "kind": "finetune", "model": "t"}]}
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(recipe))
    assert main(["validate", str(path)]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert errors == [
        f"error: {path}: data.target: column 'answr' is not in '{tmp_path}/train.jsonl' (did you mean 'answer'?); "
        "its columns are ['question', 'answer']",
        f"error: {path}: data.validation: '{tmp_path}/valid.jsonl' not found (paths are relative to where you run "
        "nlgkd, or to data.dir)",
        f"error: {path}: data.target: column 'answr' is not in '{tmp_path}/test.csv'; its columns are "
        "['question', 'reply']",
        f"error: {path}: data.unlabeled: cannot read '{tmp_path}/bad.jsonl': line 1 is not JSON (Expecting value)",
    ]
    assert main(["run", str(path), "--dry-run", "--runs-dir", str(tmp_path)]) == 2  # the same checks
    recipe["data"].update(target="answer", validation="train.jsonl", test="train.jsonl", unlabeled="train.jsonl")
    path.write_text(json.dumps(recipe))
    assert main(["validate", str(path)]) == 0


def test_an_empty_or_broken_data_file_is_named_with_the_line(tmp_path):
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(RecipeError, match=r"data\.train: '.*empty\.jsonl' is empty; give a file with one example"):
        load_splits(DataConfig(train=str(tmp_path / "empty.jsonl")))
    (tmp_path / "broken.jsonl").write_text('{"source": "a", "target": "b"}\n\n{"source": "c", "target"\n',
                                           encoding="utf-8")
    with pytest.raises(RecipeError, match=r"data\.train: could not read '.*broken\.jsonl': line 3 is not JSON "
                                          r"\(Expecting ':' delimiter at column 25\)"):
        load_splits(DataConfig(train=str(tmp_path / "broken.jsonl")))


def test_a_folder_given_as_a_data_file_is_named(tmp_path):
    (tmp_path / "train.jsonl").mkdir()
    with pytest.raises(RecipeError, match=r"data\.train: '.*train\.jsonl' is a folder; give the file"):
        load_splits(DataConfig(train=str(tmp_path / "train.jsonl")))


def test_one_truncation_rule_for_sources_and_targets():
    from nlgkd.data import truncate

    assert truncate([5, 6, 7, 2], 4) == [5, 6, 7, 2]            # fits: unchanged
    assert truncate([5, 6, 7, 8, 9, 2], 4) == [5, 6, 7, 2]      # the closing token (</s>, EOS) is kept
    assert truncate([5, 6, 7, 8, 9, 2], None) == [5, 6, 7, 8, 9, 2]
    assert truncate([5, 2], 1) == [2]


def test_list_cells_a_byte_order_mark_and_a_ragged_csv_are_named(tmp_path):
    from nlgkd.data_files import data_problems

    listed = write_jsonl(tmp_path / "l.jsonl", [{"source": ["a", "b"], "target": "c"}])
    with pytest.raises(RecipeError, match=r"data.source/target: train example 0: column 'source' holds a list, not text"):
        load_splits(DataConfig(train=listed))
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps({"source": "a", "target": "b"}).encode() + b"\n")
    assert data_problems(DataConfig(train=str(bom))) == []  # validate reads it as run does
    assert load_splits(DataConfig(train=str(bom)))[0]["train"][0] == {"source": "a", "target": "b"}
    ragged = tmp_path / "r.csv"
    ragged.write_text("source,target\na,b\nc,d,e\n", encoding="utf-8")
    with pytest.raises(RecipeError, match=r"could not read .*r.csv': line 3 has 3 fields and the header 2"):
        load_splits(DataConfig(train=str(ragged)))


def test_dropped_examples_and_a_missing_validation_split_are_said(tmp_path, capsys):
    from nlgkd.recipe import parse_recipe
    from nlgkd.runner import Runner

    rows = [{"source": f"s {i}", "target": "" if i == 0 else f"t {i}"} for i in range(40)]
    recipe = {"name": "said", "data": {"train": write_jsonl(tmp_path / "t.jsonl", rows), "max_source_length": 16,
                                        "max_target_length": 16},
              "models": {"m": {"init": "fresh", "arch": "bart", "d_model": 16, "encoder_layers": 1, "decoder_layers": 1,
                               "attention_heads": 2, "ffn_dim": 16, "vocab_size": 120}},
              "stages": [{"name": "ft", "kind": "finetune", "model": "m", "max_steps": 1, "batch_size": 8,
                          "save_every": None}]}
    Runner(parse_recipe(recipe), runs_root=tmp_path / "runs").run()
    out = capsys.readouterr().out
    assert "data: train: dropped 1 of 40 examples (2.5%) with an empty source or target" in out
    assert "note: no validation split, so no evaluation: no early stopping" in out
