"""The `nlgkd` command: parses arguments, then calls the library. `nlgkd -v COMMAND` keeps library messages
that are hidden as harmless (nlgkd/quiet.py).

    nlgkd run RECIPE [--stage NAME | --from NAME] [--variant NAME] [--force] [--dry-run] [--jobs N]
              [--set key.path=value ...] [--runs-dir DIR]
    nlgkd validate RECIPE [--set ...]
    nlgkd stages [KIND | recipe | data | models]
    nlgkd report RUN_DIR [--teacher NAME] [--metric NAME] [--out DIR]
    nlgkd serve MODEL_DIR [--port P] [--host H] [--name NAME]
    nlgkd export MODEL_DIR --out DIR [--format ctranslate2] [--quantization int8]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .config import STAGE_CONFIGS, DataConfig, ModelConfig, RecipeError
from .field_help import TOP_LEVEL_FIELDS, config_help

from .recipe import load_recipe


def cmd_run(args) -> int:
    from .runner import Runner

    recipe = load_recipe(args.recipe, args.set, args.profile)
    runner = Runner(recipe, runs_root=args.runs_dir)
    runner.command = " ".join(["nlgkd", *args.argv])
    for note in recipe.notes:
        runner.say(f"note: {note}")
    if args.dry_run:
        if not data_files_ok(recipe):
            return 2
        runner.dry_run(only=args.stage, start_from=args.start_from, force=args.force, variant=args.variant)
        return 0
    if args.jobs > 1:
        outcome = run_jobs(runner, args)
    else:
        outcome = runner.run(only=args.stage, start_from=args.start_from, force=args.force, variant=args.variant)
    ran = [name for name, what in outcome.items() if what == "ran"]
    skipped = [name for name, what in outcome.items() if what == "skipped"]
    waiting = [name for name, what in outcome.items() if what == "waiting"]
    reused = [name for name, what in outcome.items() if what == "reused"]
    runner.say(
        f"{recipe.name}: ran {len(ran)} stage(s){' ' + str(ran) if ran else ''}, "
        f"{f'copied {len(reused)} with the same fingerprint as another {reused}, ' if reused else ''}"
        f"skipped {len(skipped)} finished one(s)"
        f"{f', {len(waiting)} wait for other variants {waiting}' if waiting else ''}; artifacts in {runner.run_dir}"
    )
    runner.end()
    return 0


def run_jobs(runner, args) -> dict[str, str]:
    """`--jobs N`: the plan's stages in child processes, N at a time, as their inputs finish (nlgkd/parallel.py)."""
    from .parallel import run_in_parallel, subprocess_starter
    from .runner import StageError

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise StageError("--jobs starts one process per stage; run it as a plain `nlgkd run`, not under torchrun "
                         "or accelerate launch (or drop --jobs to run every stage on all the processes)")
    runner.check_writable()
    runner.record_plan()
    plan = runner.plan(only=args.stage, start_from=args.start_from, force=args.force, variant=args.variant)
    # the children get the profile's assignments as --set lines, before the user's own (recipe.assignments)
    start = subprocess_starter(runner, args.recipe, args.runs_dir, runner.recipe.assignments,
                               force=bool(args.force or args.start_from), jobs=args.jobs)
    return run_in_parallel(runner, plan, args.jobs, start)


def data_files_ok(recipe) -> bool:
    """Print every problem of the recipe's data files (missing, unreadable, a column the recipe reads not in
    them); False when there is one."""
    from .data_files import data_problems

    problems = data_problems(recipe.data)
    for problem in problems:
        print(f"error: {recipe.source}: {problem}", file=sys.stderr)
    return not problems


def cmd_validate(args) -> int:
    recipe = load_recipe(args.recipe, args.set, args.profile)
    if not data_files_ok(recipe):
        return 2
    print(f"{args.recipe}: valid recipe {recipe.name!r} with {len(recipe.stages)} stage(s):")
    for stage in recipe.stages:
        copies = [s for s in recipe.instances if s.index == stage.index]
        line = f"  {stage.index + 1}. {stage.name} ({stage.kind})"
        if stage.variants:
            line += f"  variants: {', '.join(stage.variants)}"
        elif copies and copies[0].variant:
            line += f"  once per variant of {copies[0].varied}: {', '.join(s.key for s in copies)}"
        elif copies and copies[0].kind == "evaluate" and any("@" in n for n in copies[0].config.models):
            line += f"  rows: {', '.join(copies[0].config.models)}"
        print(line)
    if len(recipe.instances) > len(recipe.stages):
        print(f"{len(recipe.instances)} stage runs with the variants; `nlgkd run RECIPE --variant NAME` runs one")
    for note in recipe.notes:
        print(f"note: {note}")
    return 0


def cmd_serve(args) -> int:
    import socket

    from .serve import serve

    try:  # before loading the model: a bad address or port is one line, not uvicorn's traceback
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        with socket.socket(family) as probe:
            probe.bind((args.host, args.port))
    except (OSError, OverflowError, ValueError) as err:
        print(f"error: --host {args.host} --port {args.port}: cannot listen there ({err}); give an address of this "
              "machine (127.0.0.1, or 0.0.0.0 for every interface) and a free port from 1 to 65535", file=sys.stderr)
        return 2

    serve(args.model_dir, host=args.host, port=args.port, name=args.name, max_source_length=args.max_source_length,
          default_max_tokens=args.max_tokens, max_tokens_cap=args.max_tokens_cap, max_body_bytes=args.max_body_bytes,
          max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms)
    return 0


def cmd_export(args) -> int:
    from .export import export_model

    manifest = export_model(args.model_dir, args.out, fmt=args.format, quantization=args.quantization)
    print(f"exported {args.model_dir} ({manifest['model_type']}, {manifest['params']:,} parameters) as "
          f"{args.format} {args.quantization}: {manifest['weights_mb']:.1f} MB in {args.out}")
    return 0


def cmd_report(args) -> int:
    from .report import ReportError, collect, stale_note, summary, write_report

    if str(args.run_dir).endswith((".yaml", ".yml")) and Path(args.run_dir).is_file():
        name = load_recipe(args.run_dir).name
        print(f"error: {args.run_dir} is a recipe; `nlgkd report` reads the folder a run wrote: "
              f"nlgkd report runs/{name}", file=sys.stderr)
        return 2
    try:
        report = collect(args.run_dir, metric=args.metric, teacher=args.teacher)
        paths = write_report(report, out_dir=args.out)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for text in (summary(report), stale_note(report)):
        if text:
            print(text)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


# `nlgkd stages WORD` for the parts of a recipe that are not stages: word -> (what it is, its config class)
RECIPE_PARTS = {"data": ("data: where the examples come from: one dataset (the fields below), or several "
                         "under tasks", DataConfig),
                "models": ("models: name -> a model the stages start from (as student:, teacher:, model:, "
                           "from:); each entry's fields", ModelConfig)}


def print_fields(rows: list[tuple[str, str, str]]) -> None:
    name_width = max(len(name) for name, _, _ in rows)
    type_width = min(44, max(len(typ) for _, typ, _ in rows))
    for name, typ, help_text in rows:
        print(f"  {name:{name_width}s} {typ:{type_width}s} {help_text}".rstrip())


def fields_of(kind: str) -> tuple[str, list[tuple[str, str, str]]]:
    """What `nlgkd stages KIND` prints for KIND (a stage kind, recipe, data or models): the text before its
    fields, and the fields as (name, type, help) rows. docs/reference.md is rendered from the same rows."""
    if kind == "recipe":
        return ("recipe: the top level of a recipe file (YAML). Paths in it (data files, data.dir, denoising.file) "
                "are\nread relative to the folder you run nlgkd in, not to the recipe file.", TOP_LEVEL_FIELDS)
    if kind in RECIPE_PARTS:
        what, cls = RECIPE_PARTS[kind]
        return f"{what}:", config_help(cls)
    cls = STAGE_CONFIGS[kind]
    return f"{kind}: {cls.__doc__.strip()}", [
        ("name", "string (required)", "the stage's folder in the run directory; later stages refer to it by this "
         "name"), *config_help(cls), ("variants", "mapping of mapping", "name -> fields to override; one run per "
                                      "variant")]


def cmd_stages(args) -> int:
    if args.kind:
        if args.kind not in STAGE_CONFIGS and args.kind != "recipe" and args.kind not in RECIPE_PARTS:
            print(f"unknown stage kind {args.kind!r}; kinds: {', '.join(STAGE_CONFIGS)}; or one of "
                  f"recipe, {', '.join(RECIPE_PARTS)}", file=sys.stderr)
            return 2
        intro, rows = fields_of(args.kind)
        print(f"{intro}\n")
        print_fields(rows)
        return 0
    width = max(len(k) for k in STAGE_CONFIGS)
    for kind, cls in STAGE_CONFIGS.items():
        first_line = (cls.__doc__ or "").strip().splitlines()[0]
        print(f"{kind:{width}s}  {first_line}")
    print("\n`nlgkd stages KIND` lists a kind's fields; `nlgkd stages recipe`, `nlgkd stages data` and "
          "`nlgkd stages models`\nlist the rest of a recipe's. Any stage may also declare `variants:` (name -> "
          "fields to override,\ne.g. {beam: {decoding.strategy: beam}}): it then runs once per variant, as "
          "NAME@VARIANT.")
    return 0


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


class OneStage(argparse.Action):
    """`--stage` / `--from` name one stage: given twice, argparse would keep the last and run it alone, silently."""

    def __call__(self, parser, namespace, values, option_string=None):
        earlier = getattr(namespace, self.dest, None)
        if earlier is not None:
            parser.error(f"{option_string} is given twice ({earlier!r}, {values!r}); it names one stage: run the "
                         "command once per stage, or use --from NAME for a stage and every one after it")
        setattr(namespace, self.dest, values)


def build_parser() -> argparse.ArgumentParser:
    """Every command's arguments in one declarative place, in the order `nlgkd -h` lists them (long for that
    reason: one block per command, no logic)."""
    parser = argparse.ArgumentParser(prog="nlgkd", description="Knowledge distillation of text generators.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also show the library messages nlgkd hides as harmless (nlgkd/quiet.py)")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a recipe's stages (finished ones with unchanged inputs are skipped)")
    run.add_argument("recipe")
    which = run.add_mutually_exclusive_group()
    which.add_argument("--stage", action=OneStage, help="run only this stage (its inputs must have finished)")
    which.add_argument("--from", dest="start_from", action=OneStage, help="re-run this stage and every one after it")
    run.add_argument("--force", action="store_true", help="re-run every selected stage")
    run.add_argument("--dry-run", action="store_true",
                     help="list what would run; API teachers print their requests, tokens and cost, and send nothing")
    run.add_argument("--variant", help="run one variant (NAME or STAGE@NAME), what reads it and the shared stages")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe field, e.g. stages.teacher.epochs=3 (repeatable)")
    run.add_argument("--profile", metavar="NAME", help="apply the recipe's profiles.NAME first, e.g. cpu")
    run.add_argument("--jobs", type=positive_int, default=1, metavar="N",
                     help="run up to N independent stages at once, each in its own process (default 1); "
                          "small models leave a GPU mostly idle, so the variants of a study overlap")
    run.add_argument("--runs-dir", default=os.environ.get("NLGKD_RUNS_DIR", "runs"),
                     help="where run directories go (default: runs, or $NLGKD_RUNS_DIR)")
    run.set_defaults(func=cmd_run)

    validate = sub.add_parser("validate", help="check a recipe without running it")
    validate.add_argument("recipe")
    validate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    validate.add_argument("--profile", metavar="NAME", help="apply the recipe's profiles.NAME first, e.g. cpu")
    validate.set_defaults(func=cmd_validate)

    stages = sub.add_parser("stages", help="list the stage kinds, or the fields of one kind, of the recipe's top "
                            "level (recipe), of data or of models")
    stages.add_argument("kind", nargs="?", help="a stage kind, or recipe, data or models")
    stages.set_defaults(func=cmd_stages)

    serve = sub.add_parser("serve", help="an OpenAI-compatible chat-completions server over a local model")
    serve.add_argument("model_dir", help="a model folder, e.g. runs/demo/teacher (or a hub name)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--host", default="127.0.0.1", help="default: this machine only")
    serve.add_argument("--name", help="model name clients ask for (default: the folder's name)")
    serve.add_argument("--max-source-length", type=int, default=512, help="input tokens kept (default 512)")
    serve.add_argument("--max-tokens", type=positive_int, default=256,
                       help="answer tokens when a request sets no max_tokens")
    serve.add_argument("--max-tokens-cap", type=positive_int, default=1024,
                       help="the most answer tokens a request may ask for (default 1024); more is a 400")
    serve.add_argument("--max-body-bytes", type=positive_int, default=1 << 20,
                       help="the largest request body accepted (default 1 MiB); larger is a 413")
    serve.add_argument("--max-batch", type=positive_int, default=16,
                       help="requests decoded together at most (dynamic batching; 1: one at a time)")
    serve.add_argument("--batch-wait-ms", type=float, default=5.0,
                       help="how long the first waiting request waits for others to join its batch (default 5)")
    serve.set_defaults(func=cmd_serve)

    export = sub.add_parser("export", help="convert a model folder for an inference engine (CTranslate2)")
    export.add_argument("model_dir", help="a model folder, e.g. runs/demo/distill")
    export.add_argument("--format", default="ctranslate2", choices=["ctranslate2", "onnx"])
    export.add_argument("--quantization", default="int8",
                        help="int8 (default), int8_float32, int8_float16, int8_bfloat16, float16, bfloat16, float32")
    export.add_argument("--out", required=True, help="the folder to write (an earlier export there is replaced)")
    export.set_defaults(func=cmd_export)

    report = sub.add_parser("report", help="collect a run directory's evaluations into tables and plots")
    report.add_argument("run_dir", help="a run directory, e.g. runs/study-demo")
    report.add_argument("--teacher", help="model row that counts as the teacher (default: see `nlgkd/report.py`)")
    report.add_argument("--out", help="where report.md, report.html and the PNGs go (default: RUN_DIR/report)")
    report.add_argument("--metric", default="bleu", help="quality metric of the plots and %% of teacher: bleu, "
                        "chrf, rouge1, rouge2 or rougeL (default: bleu)")
    report.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = [a for a in argv if a not in ("-v", "--verbose")]
    if args.verbose:
        os.environ["NLGKD_VERBOSE"] = "1"  # and the stage processes of --jobs
    from .progress import use_process_private_progress_lock
    from .quiet import quiet_known_noise

    quiet_known_noise()
    use_process_private_progress_lock()
    from .runner import StageError

    from .errors import ModelLoadError

    try:
        return args.func(args)
    except (RecipeError, StageError, ModelLoadError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; finished stages are kept and a re-run resumes the unfinished one (a stage re-run "
              "with --from or --force resumes with the same option)", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `nlgkd stages | head`: the reader has gone, nothing more to say
        sys.stderr.close()
        return 0
    except OSError as err:  # the machine's: a full disk, a folder where a file should be, no permission
        if os.environ.get("NLGKD_DEBUG"):
            raise
        where = f": {err.filename}" if err.filename else ""
        print(f"error: {err.strerror or err}{where} (NLGKD_DEBUG=1 shows where it happened)", file=sys.stderr)
        return 1
    except Exception as err:  # a library's wrapper around a full disk (safetensors' SafetensorError)
        if "No space left on device" not in str(err) or os.environ.get("NLGKD_DEBUG"):
            raise
        print(f"error: the disk is full ({err}); free some space, or pass --runs-dir on another disk; finished "
              "stages are kept", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
