"""The runner: runs a recipe's stages in order inside `runs/<recipe>/`.

Each stage writes into `runs/<recipe>/.<stage>.partial/` and, on success, that folder is renamed to
`runs/<recipe>/<stage>/` with its `stage.json`; a crash never leaves a half artifact that looks finished,
and a re-run resumes from the partial folder's checkpoints. A stage's fingerprint hashes its kind, its
resolved config, the data config and the fingerprints of its inputs, so a finished stage whose inputs and
config are unchanged is skipped.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from .fingerprints import (ADDED_FIELDS_AT_DEFAULT, BEHAVIOUR, behaviour_version, data_fingerprint, file_checksums,
                           short_hash, splits_read, without_added_defaults)
from .config import ModelConfig, Recipe, RecipeError, Stage
from .recipe import flatten, input_name, references, to_dict
from .run_lock import hold_run_dir
from .stage_context import StageContext, StageError, on_main_process

PLAN_FILE = "plan.json"  # the stages' fingerprints under the recipe of the last run (record_plan)
PACKAGES = ("nlgkd", "torch", "transformers", "datasets", "accelerate", "tokenizers")


def make_accelerator(log_with: list[str] | None = None, project_dir: str | None = None):
    import torch
    from accelerate import Accelerator, DataLoaderConfiguration

    # global batch sizes, split over processes: results do not depend on the process count. (The old
    # Accelerator(split_batches=True) keyword is ignored by accelerate 1.15: each process then took whole
    # batches, and 2 processes trained with twice the batch of 1; a test compares their losses and weights.)
    # cpu=True on CPU-only machines: without it accelerate treats each torchrun process as a lone run.
    return Accelerator(dataloader_config=DataLoaderConfiguration(split_batches=True), log_with=log_with or None,
                       project_dir=project_dir, cpu=not torch.cuda.is_available())


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def is_teacher_field(where: str) -> bool:
    """Whether a reference's field path (`teacher`, `teacher[1]`, `teachers_by_task.qg[0]`) names a teacher."""
    return where.split("[")[0].split(".")[0] in ("teacher", "teachers_by_task")


class Runner:
    def __init__(self, recipe: Recipe, runs_root: str | Path = "runs", accelerator=None):
        self.recipe = recipe
        self.run_dir = Path(runs_root) / recipe.name
        self._accelerator = accelerator
        self._stages_ran = False  # end() closes the process group they used
        self._threads_set = False  # a CPU run chooses its torch thread count once (nlgkd/threads.py)
        self._verified: set[str] = set()  # finished stages whose files matched their checksums in this process
        self.command = " ".join(["nlgkd", *sys.argv[1:]])  # what the run directory's lock says holds it
        self._data = None
        self._data_report = None
        self._fingerprints: dict[str, str] = {}  # stage key -> fingerprint
        self._data_fingerprints: dict[tuple, str] = {}  # splits -> data_fingerprint (each file hashed once)

    @property
    def accelerator(self):
        """Made when a stage first needs it: deciding what to skip needs neither torch nor accelerate, so the
        re-run of a finished recipe takes seconds, not the most of a minute their imports take."""
        if self._accelerator is None:
            trackers = sorted({t for s in self.recipe.stages for t in getattr(s.config, "report_to", [])})
            self._accelerator = make_accelerator(trackers, project_dir=str(self.run_dir / "logs"))
            if self._accelerator.device.type == "cpu" and not self._threads_set:
                from .threads import set_cpu_threads

                self.say(set_cpu_threads())
                self._threads_set = True
        return self._accelerator

    def say(self, message: str) -> None:
        """Print on the main process only, without starting accelerate for it (launchers set RANK)."""
        if self._accelerator is not None:
            self._accelerator.print(message)
        elif int(os.environ.get("RANK", "0")) == 0:
            print(message, flush=True)

    def say_skipped(self, stage: Stage) -> None:
        self.say(f"[{stage.key}] done earlier with the same inputs and config; skipped")
        if self.partial_dir(stage).exists():  # a forced re-run of it was interrupted
            self.say(f"[{stage.key}] note: an interrupted re-run of it is in {self.partial_dir(stage)}; the "
                     f"finished result is kept; `nlgkd run RECIPE --from {stage.key}` continues the re-run")

    def release_stage_state(self) -> None:
        """Forget what the finished (or failed) stage prepared: the next stage gets an Accelerator of its own.

        An Accelerator remembers every model, optimizer and checkpointed object it prepared, and `save_state` /
        `load_state` match them by position. Shared across stages, the 2nd training stage of a run saved the
        1st stage's model as `model.safetensors` and its own as `model_1.safetensors`, and its resume in a
        fresh process loaded the wrong one (issue 17); the earlier models also stayed on the GPU."""
        if self._accelerator is None:
            return
        for tracker in self._accelerator.trackers:  # this stage's (not end_training: it ends the process group)
            tracker.finish()
        self._accelerator.free_memory()  # drops its models, optimizers and loaders; empties the CUDA cache
        # nothing may keep the Accelerator itself: the scheduler it checkpoints holds the optimizer, and so
        # the model's parameters and their Adam moments (a test checks that no model outlives its stage)
        self._accelerator = None
        self._stages_ran = True

    def end(self) -> None:
        """Close the trackers and the process group, if a stage started them."""
        if self._accelerator is not None:
            self._accelerator.end_training()
        elif self._stages_ran:
            from accelerate import PartialState

            PartialState().destroy_process_group()

    # ----------------------------------------------------------------------------- artifacts
    def finished_dir(self, stage: Stage) -> Path:
        return self.run_dir / stage.key  # `name`, or `name@variant` for a variant

    def partial_dir(self, stage: Stage) -> Path:
        return self.run_dir / f".{stage.key}.partial"

    def stage_record(self, stage: Stage) -> dict | None:
        path = self.finished_dir(stage) / "stage.json"
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return None

    def is_done(self, stage: Stage) -> bool:
        record = self.stage_record(stage)
        return bool(record and record.get("status") == "done" and record.get("fingerprint") == self.fingerprint(stage))

    def data(self):
        if self._data is None:
            from .data import load_splits

            self._data, self._data_report = load_splits(self.recipe.data, seed=self.recipe.seed)
            for split, dropped in self._data_report.dropped_empty.items():
                if dropped and os.environ.get("RANK", "0") == "0":  # once, not per process
                    total = dropped + self._data_report.sizes[split]
                    print(f"data: {split}: dropped {dropped} of {total} examples ({dropped / total:.1%}) with an "
                          "empty source or target (data.on_empty: drop; stage.json counts them)")
        return self._data

    def data_report(self) -> dict:
        self.data()
        return to_dict(self._data_report)

    # ---------------------------------------------------------------------------- fingerprints
    def fingerprint(self, stage: Stage) -> str:
        if stage.key not in self._fingerprints:
            self._fingerprints[stage.key] = short_hash(self.fingerprint_parts(stage))
        return self._fingerprints[stage.key]

    def data_fingerprint(self, splits: tuple[str, ...]) -> str:
        """`data_fingerprint` of the recipe's data for `splits`, computed once per run (it reads the files)."""
        if splits not in self._data_fingerprints:
            self._data_fingerprints[splits] = data_fingerprint(self.recipe.data, self.recipe.seed, splits)
        return self._data_fingerprints[splits]

    def fingerprint_parts(self, stage: Stage) -> dict:
        """What a stage's fingerprint hashes: its kind, resolved config, inputs' fingerprints, the data splits
        it reads and the seed. stage.json keeps them, so a re-run can say what changed (`rerun_reasons`)."""
        version = behaviour_version(stage.kind)
        return {
            "kind": stage.kind,
            **({"behaviour": version} if version > 1 else {}),
            "config": without_added_defaults(to_dict(stage.config)),
            "inputs": {where: self.reference_fingerprint(name, stage.index)
                       for where, _, name in references(stage.config)},
            "data": self.data_fingerprint(splits_read(stage.kind, stage.config)),
            "seed": self.recipe.seed,
        }

    def rerun_reasons(self, stage: Stage) -> list[str]:
        """Why a stage that finished before will run again: the config fields, inputs and data that changed
        since its stage.json was written (old -> new). Empty when it never finished."""
        record = self.stage_record(stage)
        if not record or record.get("status") != "done" or record.get("fingerprint") == self.fingerprint(stage):
            return []
        now = self.fingerprint_parts(stage)
        reasons = []
        old_version = record.get("behaviour", 1)
        if old_version != now.get("behaviour", 1):
            reasons.append(f"{stage.kind} stages changed since it was made (behaviour {old_version} -> "
                           f"{now.get('behaviour', 1)}: {BEHAVIOUR[stage.kind][1]})")
        # both without the added fields at their earlier behaviour: a record older than a field lacks it
        old_config = flatten(without_added_defaults(record.get("config") or {}))
        new_config = flatten(now["config"])

        def value(config: dict, key: str):
            """An added field left out at its default shows that default, where its block is there at all."""
            if key in config:
                return config[key]
            block = key.rpartition(".")[0]
            has_block = not block or any(k.startswith(block + ".") for k in config)
            return ADDED_FIELDS_AT_DEFAULT.get(key) if has_block else None

        for key in sorted(set(old_config) | set(new_config)):
            old, new = value(old_config, key), value(new_config, key)
            if old != new:
                reasons.append(f"{key} {old!r} -> {new!r}")
        # inputs by the name they read, not their place in a list: adding a model to an evaluate stage's
        # `models` is a config change (above), not a change of every input after it
        # (by place only where the record does not say which name a place read)
        old_by_name, old_by_place = {}, {}
        for where, fp in (record.get("inputs") or {}).items():
            name = input_name(record.get("config") or {}, where)
            if name is None:
                old_by_place[where] = fp
            else:
                old_by_name[name] = fp
        reported = set()
        for where, _, name in references(stage.config):
            old = old_by_name.get(name) if name in old_by_name else old_by_place.get(where)
            if old is not None and old != now["inputs"][where] and name not in reported:
                reasons.append(f"its input {name!r} ({where}) changed")
                reported.add(name)
        if record.get("data_fingerprint") not in (None, now["data"]):
            reasons.append(f"the data it reads changed ({', '.join(splits_read(stage.kind, stage.config))} or the "
                           "data settings)")
        if record.get("seed") != now["seed"]:
            reasons.append(f"seed {record.get('seed')!r} -> {now['seed']!r}")
        return reasons or ["its fingerprint changed (it was made by another nlgkd version)"]

    def reference_fingerprint(self, name: str, before: int) -> str:
        kind, target = self.recipe.resolve(name, before)
        if kind == "stage":
            return self.fingerprint(target)
        model: ModelConfig = target
        parts = {"model": to_dict(model)}
        if model.tokenizer_from:
            parts["tokenizer_from"] = self.reference_fingerprint(model.tokenizer_from, before)
        elif model.init == "fresh":  # its tokenizer learns the train split, else unlabeled (`tokenizer_texts`)
            data = self.recipe.data
            has_train = any(source.train or source.task or source.hub for source in [data, *data.tasks.values()])
            read = ("train",) if has_train else ("unlabeled",)
            parts["tokenizer_data"] = self.data_fingerprint(read)
        return short_hash(parts)

    # -------------------------------------------------------------------------------- models
    def load_model(self, name: str, before: int):
        from .models import build_fresh, load_pretrained

        kind, target = self.recipe.resolve(name, before)
        if kind == "stage":
            path = self.finished_dir(target)
            if not (path / "stage.json").exists():
                raise StageError(f"stage {target.key!r} has not finished; run `nlgkd run RECIPE --stage {target.key}`")
            return load_pretrained(str(path), trust_remote_code=False)
        model: ModelConfig = target
        if model.init == "pretrained":
            if not model.name_or_path:
                raise RecipeError(f"models.{name}.name_or_path: required with init: pretrained")
            loaded, tokenizer = load_pretrained(model.name_or_path, trust_remote_code=model.trust_remote_code,
                                                revision=model.revision, with_tokenizer=not model.tokenizer_from)
            if model.tokenizer_from:  # a folder saved without its tokenizer files
                _, tokenizer = self.load_model(model.tokenizer_from, before)
            return loaded, tokenizer
        tokenizer = None
        if model.tokenizer_from:
            _, tokenizer = self.load_model(model.tokenizer_from, before)
        texts = self.tokenizer_texts()
        return build_fresh(model, texts, seed=self.recipe.seed, tokenizer=tokenizer)

    def tokenizer_texts(self) -> list[str]:
        """Text a fresh tokenizer is trained on: the train split's sources and targets."""
        data = self.data()
        split = data["train"] if "train" in data else data["unlabeled"]
        texts = list(split["source"])
        if "target" in split.column_names:
            texts += list(split["target"])
        return texts

    # -------------------------------------------------------------------------------- running
    def check_writable(self) -> None:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / f".write-test-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise StageError(
                f"run directory {self.run_dir} is not writable ({err.strerror}); pass --runs-dir to write elsewhere"
            ) from None

    def plan(self, only: str | None = None, start_from: str | None = None, force: bool = False,
             variant: str | None = None) -> list[tuple[Stage, str]]:
        """(stage, action) for every stage to run (`Recipe.instances`, variants spelled out): 'run', 'skip'
        (finished, same fingerprint), 'leave' (not selected) or 'wait' (with `variant`: a shared stage that
        reads other variants, which have not finished). `only`/`start_from` take `name` or `name@variant`;
        `variant` takes a variant name or `stage@variant` and selects it, what reads it and the shared stages."""
        instances = self.recipe.instances or self.recipe.stages
        names = [s.name for s in self.recipe.stages]
        keys = [s.key for s in instances]
        for flag, value in (("--stage", only), ("--from", start_from)):
            if value is not None and value not in names and value not in keys:
                varied = [k for k in keys if "@" in k]
                extra = f", or one variant: {', '.join(varied)}" if varied else ""
                raise RecipeError(f"{flag} {value}: no such stage; stages are {names}{extra}")
        start = next(i for i, s in enumerate(instances) if start_from in (s.name, s.key)) if start_from else None
        if variant is not None:
            choices = {s.variant for s in instances if s.variant} | {f"{s.varied}@{s.variant}" for s in instances
                                                                     if s.variant and s.varied == s.name}
            if variant not in choices:
                listed = "; ".join(f"{k}: {', '.join(v)}" for k, v in self.recipe.variant_names().items())
                raise RecipeError(f"--variant {variant}: no stage of {self.recipe.source} has this variant; "
                                  + (f"variants are {listed}" if listed else "the recipe declares no variants:"))
        plan: list[tuple[Stage, str]] = []
        waiting: set[str] = set()
        for i, stage in enumerate(instances):
            chosen = variant is None or stage.variant is None or variant in (stage.variant, f"{stage.varied}@{stage.variant}")
            if (only is not None and only not in (stage.name, stage.key)) or not chosen:
                plan.append((stage, "leave"))
            elif variant is not None and self._reads_unfinished_other_variant(stage, waiting, {s.key: a for s, a in plan}):
                waiting.add(stage.key)
                plan.append((stage, "wait"))
            elif force or (start is not None and i >= start) or not self.is_done(stage):
                plan.append((stage, "run"))
            else:
                plan.append((stage, "skip"))
        return plan

    def _reads_unfinished_other_variant(self, stage: Stage, waiting: set[str], actions: dict[str, str]) -> bool:
        """Whether a stage reads a stage left out of this run (another variant) that has not finished."""
        for _, _, name in references(stage.config):
            kind, target = self.recipe.resolve(name, stage.index)
            if kind == "stage" and (target.key in waiting or
                                    (actions.get(target.key) == "leave" and not self.is_done(target))):
                return True
        return False

    def locked(self):
        """Hold the run directory for this run (nlgkd/run_lock.py): a second `nlgkd run` on it is refused."""
        return hold_run_dir(self.run_dir, self.command, self.check_writable)

    def run(self, only: str | None = None, start_from: str | None = None, force: bool = False,
            variant: str | None = None) -> dict[str, str]:
        with self.locked():
            return self._run(only, start_from, force, variant)

    def _run(self, only, start_from, force, variant) -> dict[str, str]:
        self.check_writable()
        self.record_plan()
        plan = self.plan(only, start_from, force, variant)
        to_run = sum(action == "run" for _, action in plan)
        outcome = {}
        for stage, action in plan:
            if action == "leave":
                continue
            if action == "wait":
                self.say(f"[{stage.key}] waits: it reads other variants that have not finished; run "
                         "them (or the recipe without --variant), then it runs")
                outcome[stage.key] = "waiting"
                continue
            if action == "skip":
                self.say_skipped(stage)
                outcome[stage.key] = "skipped"
                continue
            self.check_inputs(stage)
            done = sum(what in ("ran", "reused") for what in outcome.values())
            self.say(f"[{stage.key}] starts: {done + 1} of the {to_run} stages this run runs")
            if not (force or start_from) and (reasons := self.rerun_reasons(stage)):
                self.say(f"[{stage.key}] finished before, runs again and replaces it: " + "; ".join(reasons))
            same = None if force or start_from else self.same_artifact(stage)
            if same is not None:
                self.reuse(stage, same)
                outcome[stage.key] = "reused"
                continue
            self.run_stage(stage)
            outcome[stage.key] = "ran"
        return outcome

    def record_plan(self) -> None:
        """runs/<recipe>/plan.json: every stage's fingerprint under the recipe as it is now, so `nlgkd report`
        can mark results whose stage has changed since they were made (a re-run that was interrupted)."""
        if int(os.environ.get("RANK", "0")) != 0 or os.environ.get("NLGKD_LOCK_OWNER"):
            return  # another rank, or a --jobs child: its parent wrote the plan of the same recipe
        plan = {"recipe": self.recipe.source, "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "fingerprints": {stage.key: self.fingerprint(stage) for stage in self.recipe.instances}}
        staged = self.run_dir / f".plan.json.{os.getpid()}"
        staged.write_text(json.dumps(plan, indent=2))
        staged.replace(self.run_dir / PLAN_FILE)  # whole or not at all: --jobs children write it too

    def same_artifact(self, stage: Stage) -> Stage | None:
        """A finished stage of this recipe with this stage's fingerprint under another name: the same kind,
        config, inputs, data and seed, so the same artifact. An ablation's baseline is often another stage's
        variant (the next study stage starts from the last one's winner); it is copied, not trained again."""
        fingerprint = self.fingerprint(stage)
        for other in self.recipe.instances:
            if other.key != stage.key and other.kind == stage.kind and self.fingerprint(other) == fingerprint \
                    and self.is_done(other):
                return other
        return None

    def reuse(self, stage: Stage, same: Stage) -> None:
        """Make `stage`'s folder from the finished `same` (files hard-linked where possible; artifacts are
        never changed in place), with its own stage.json saying where it came from."""
        acc = self.accelerator
        if acc.is_main_process:
            partial = self.partial_dir(stage)
            shutil.rmtree(partial, ignore_errors=True)

            def link_or_copy(src, dst):
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copy2(src, dst)

            shutil.copytree(self.finished_dir(same), partial, copy_function=link_or_copy)
            record = json.loads((partial / "stage.json").read_text())
            record.pop("variant", None)
            record.pop("variant_of", None)
            now = datetime.now(timezone.utc).isoformat(timespec="seconds")
            record.update(name=stage.name, reused_from=same.key, started=now, ended=now, wall_seconds=0.0,
                          cpu_seconds=0.0, **({"variant": stage.variant, "variant_of": stage.varied}
                                              if stage.variant else {}))
            (partial / "stage.json").unlink()  # a hard link: write a new file, keep the other stage's
            (partial / "stage.json").write_text(json.dumps(record, indent=2, default=str))
            final = self.finished_dir(stage)
            if final.exists():
                shutil.rmtree(final)
            partial.rename(final)
            acc.print(f"[{stage.key}] same kind, config and inputs as {same.key!r}: its artifact is copied, "
                      f"not made again -> {final}")
        acc.wait_for_everyone()

    def dry_run(self, only: str | None = None, start_from: str | None = None, force: bool = False,
                variant: str | None = None) -> None:
        """`nlgkd run --dry-run`: list the stages `run` would run; kinds in `DRY_RUNS` (API teachers) also print
        their requests and estimated cost. Nothing runs, nothing is written, nothing is sent."""
        from .stages import DRY_RUNS

        for stage, action in self.plan(only, start_from, force, variant):
            if action == "skip":
                self.say(f"[{stage.key}] would be skipped: done earlier with the same inputs and config")
            if action != "run":
                continue
            if stage.kind not in DRY_RUNS:
                self.say(f"[{stage.key}] would run ({stage.kind}): {self.why_it_runs(stage, force or start_from)}")
                continue
            ctx = StageContext(runner=self, stage=stage, out_dir=self.partial_dir(stage),
                               fingerprint=self.fingerprint(stage))
            try:
                DRY_RUNS[stage.kind](ctx)
            except (ValueError, KeyError) as err:  # e.g. its inputs come from a stage that has not run yet
                self.say(f"[{stage.key}] would run ({stage.kind}); cannot estimate it yet: {err}")

    def why_it_runs(self, stage: Stage, forced) -> str:
        """What `--dry-run` says of a stage it would run, in the words the run uses."""
        record = self.stage_record(stage)
        if forced:
            return "forced (--force or --start-from)"
        if not record or record.get("status") != "done":
            return "not made yet"
        if reasons := self.rerun_reasons(stage):
            return "finished before, runs again and replaces it: " + "; ".join(reasons)
        return "a stage it reads runs first"

    def check_inputs(self, stage: Stage) -> None:
        """Every earlier stage this one reads must be finished with its current fingerprint; a teacher that
        did not beat the trivial baselines stops it (`on_weak_teacher: stop`) or is named once more (`warn`)."""
        from .teacher_check import weak_teacher_message

        for where, kind, name in references(stage.config):
            resolved_kind, target = self.recipe.resolve(name, stage.index)
            if resolved_kind != "stage":
                continue
            if not self.is_done(target):
                raise StageError(
                    f"stage {stage.key!r} needs {target.key!r} ({where}), which has not finished with the current "
                    f"recipe; run it first: `nlgkd run RECIPE --stage {target.key}` (or run the whole recipe)"
                )
            self.verify_artifact(target)
            checked = self.exported_from(target)  # an export teaches as the model it was converted from
            check = (self.stage_record(checked) or {}).get("teacher_check") or {}
            if is_teacher_field(where) and check.get("weak"):
                if self.recipe.on_weak_teacher == "stop":
                    raise StageError(f"stage {stage.key!r}: " + weak_teacher_message(
                        checked.key, check, self.teacher_users(checked), "stop", check.get("model_type")))
                metric = check["metric"]
                self.say(f"[{stage.key}] note: its teacher {checked.key!r} did not beat the trivial baselines "
                         f"({metric.upper()} {check['teacher'][metric]:.2f}; see its stage.json, teacher_check)")

    def verify_artifact(self, stage: Stage) -> None:
        """The files of a finished stage are the ones it wrote (stage.json's checksums), else a StageError that
        names the file and the command that makes it again. Once per stage and process; stages finished by an
        nlgkd that recorded no checksums are trusted."""
        if stage.key in self._verified:
            return
        expected = (self.stage_record(stage) or {}).get("files")
        folder = self.finished_dir(stage)
        if expected is not None:
            found = file_checksums(folder, only=expected)
            for path, info in expected.items():
                now = found.get(path)
                if now != info:
                    what = ("is missing" if now is None else f"has {now['bytes']:,} bytes, not {info['bytes']:,}"
                            if now["bytes"] != info["bytes"] else "changed since it was written (its checksum)")
                    raise StageError(f"{folder / path} {what}; stage {stage.key!r} made it: make it again with "
                                     f"`nlgkd run RECIPE --stage {stage.key} --force`")
        self._verified.add(stage.key)

    def teacher_users(self, stage: Stage) -> list[str]:
        """Keys of the later stages that learn from `stage`'s model as a teacher (distill, pseudo_targets,
        cache_logits: `teacher:` or `teachers_by_task:`)."""
        users = []
        for other in self.recipe.instances or self.recipe.stages:
            for where, _, name in references(other.config):
                if not is_teacher_field(where):
                    continue
                kind, target = self.recipe.resolve(name, other.index)
                if kind == "stage" and target.kind == "select":  # a teacher chosen among candidates
                    chosen_from = [self.recipe.resolve(c, target.index) for c in target.config.candidates]
                    if any(k == "stage" and t.key == stage.key for k, t in chosen_from) and other.key not in users:
                        users.append(other.key)
                if kind == "stage" and self.exported_from(target).key == stage.key and other.key not in users:
                    users.append(other.key)
        return users

    def exported_from(self, stage: Stage) -> Stage:
        """The stage whose model an export stage converted (an engine teacher teaches as that model); else `stage`."""
        if stage.kind != "export":
            return stage
        kind, source = self.recipe.resolve(stage.config.model, stage.index)
        return source if kind == "stage" else stage

    def run_stage(self, stage: Stage) -> None:
        """Run one stage in its partial folder (resuming what a killed run left there), then write its
        stage.json and rename the folder to the stage's: a crash never leaves a half artifact that looks done."""
        acc = self.accelerator
        fingerprint = self.fingerprint(stage)
        partial = self.partial_dir(stage)
        on_main_process(acc, lambda: self.open_partial(stage, partial, fingerprint))
        acc.print(f"[{stage.key}] running ({stage.kind})")
        ctx = StageContext(runner=self, stage=stage, out_dir=partial, fingerprint=fingerprint)
        clock = {"wall": time.time(), "cpu": time.process_time(),
                 "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        try:
            self.call_stage(stage, ctx)
        finally:
            self.release_stage_state()
        acc.wait_for_everyone()

        def publish() -> None:
            record = self.finished_record(stage, fingerprint, ctx, clock)
            self.publish(stage, partial, record)
            acc.print(f"[{stage.key}] finished in {record['wall_seconds']:.1f}s -> {self.finished_dir(stage)}")

        on_main_process(acc, publish)

    def open_partial(self, stage: Stage, partial: Path, fingerprint: str) -> None:
        """The stage's partial folder: kept (resumed) when a killed run of the same fingerprint left it."""
        marker = partial / "fingerprint"
        if partial.exists() and (not marker.exists() or marker.read_text() != fingerprint):
            shutil.rmtree(partial)  # left by a different config: nothing to resume
        if partial.exists():
            self.accelerator.print(f"[{stage.key}] found an unfinished run of this stage; resuming it")
        partial.mkdir(parents=True, exist_ok=True)
        marker.write_text(fingerprint)

    @staticmethod
    def call_stage(stage: Stage, ctx: StageContext) -> None:
        """The stage kind's function; its errors name the stage, and a full disk says so whatever wrapped it."""
        from .stages import STAGES

        try:
            STAGES[stage.kind](ctx)
        except (ValueError, KeyError) as err:  # bad input found by the stage: say where, keep what is done
            raise StageError(f"stage {stage.key!r} ({stage.kind}): {err}") from err
        except OSError as err:  # the machine's (a full disk, no permission): which stage, and which file
            raise OSError(err.errno, f"stage {stage.key!r} ({stage.kind}): {err.strerror or err}; finished stages "
                                     "and what this one wrote so far are kept", err.filename) from err
        except Exception as err:  # a library's wrapper around a full disk (safetensors' SafetensorError)
            if "No space left on device" not in str(err):
                raise
            raise OSError(28, f"stage {stage.key!r} ({stage.kind}): the disk is full ({str(err)[:160]}); free some "
                              "space or pass --runs-dir on another disk; finished stages are kept") from err

    def finished_record(self, stage: Stage, fingerprint: str, ctx: StageContext, clock: dict) -> dict:
        """stage.json: what made the artifact (config, inputs, data, seed, versions), its time and its facts."""
        import torch

        acc = self.accelerator
        parts = self.fingerprint_parts(stage)
        # this run, plus what killed earlier runs of the stage spent up to their last checkpoint
        earlier = (ctx.info.get("train") or {}).get("earlier_seconds") or {}
        return {
            "name": stage.name,
            "kind": stage.kind,
            "behaviour": parts.get("behaviour", 1),
            "status": "done",
            "fingerprint": fingerprint,
            "config": to_dict(stage.config),
            "inputs": parts["inputs"],
            "data_fingerprint": parts["data"],
            "seed": self.recipe.seed,
            "world_size": acc.num_processes,
            **({"cpu_threads": torch.get_num_threads()} if acc.device.type == "cpu" else {}),
            "started": clock["started"],
            "ended": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "wall_seconds": round(time.time() - clock["wall"] + earlier.get("wall", 0.0), 2),
            "cpu_seconds": round(time.process_time() - clock["cpu"] + earlier.get("cpu", 0.0), 2),  # all threads
            "wall_seconds_this_run": round(time.time() - clock["wall"], 2),
            **({"variant": stage.variant, "variant_of": stage.varied} if stage.variant else {}),
            "versions": package_versions(),
            **ctx.info,
        }

    def publish(self, stage: Stage, partial: Path, record: dict) -> None:
        """Checkpoints go, stage.json with the files' checksums comes, and the folder becomes the stage's."""
        shutil.rmtree(partial / "checkpoints", ignore_errors=True)
        (partial / "fingerprint").unlink(missing_ok=True)
        record["files"] = file_checksums(partial)  # what later stages verify before they read it
        (partial / "stage.json").write_text(json.dumps(record, indent=2, default=str))
        final = self.finished_dir(stage)
        if final.exists():
            trash = self.run_dir / f".{stage.key}.old"
            shutil.rmtree(trash, ignore_errors=True)
            final.rename(trash)
            shutil.rmtree(trash)
        partial.rename(final)
