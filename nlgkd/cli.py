"""The `nlgkd` command: parses arguments, then calls the library.

    nlgkd run RECIPE [--stage NAME | --from NAME] [--force] [--set key.path=value ...] [--runs-dir DIR]
    nlgkd validate RECIPE [--set ...]
    nlgkd stages [KIND]
"""
from __future__ import annotations

import argparse
import os
import sys

from .recipe import STAGE_CONFIGS, RecipeError, config_help, load_recipe


def cmd_run(args) -> int:
    from .runner import Runner

    recipe = load_recipe(args.recipe, args.set)
    runner = Runner(recipe, runs_root=args.runs_dir)
    outcome = runner.run(only=args.stage, start_from=args.start_from, force=args.force)
    ran = [name for name, what in outcome.items() if what == "ran"]
    skipped = [name for name, what in outcome.items() if what == "skipped"]
    runner.accelerator.print(
        f"{recipe.name}: ran {len(ran)} stage(s){' ' + str(ran) if ran else ''}, "
        f"skipped {len(skipped)} finished one(s); artifacts in {runner.run_dir}"
    )
    runner.accelerator.end_training()
    return 0


def cmd_validate(args) -> int:
    recipe = load_recipe(args.recipe, args.set)
    print(f"{args.recipe}: valid recipe {recipe.name!r} with {len(recipe.stages)} stage(s):")
    for stage in recipe.stages:
        print(f"  {stage.index + 1}. {stage.name} ({stage.kind})")
    return 0


def cmd_stages(args) -> int:
    if args.kind:
        if args.kind not in STAGE_CONFIGS:
            print(f"unknown stage kind {args.kind!r}; kinds: {', '.join(STAGE_CONFIGS)}", file=sys.stderr)
            return 2
        cls = STAGE_CONFIGS[args.kind]
        print(f"{args.kind}: {cls.__doc__.strip()}\n")
        for name, typ, help_text in config_help(cls):
            print(f"  {name:24s} {typ:40s} {help_text}")
        return 0
    width = max(len(k) for k in STAGE_CONFIGS)
    for kind, cls in STAGE_CONFIGS.items():
        first_line = (cls.__doc__ or "").strip().splitlines()[0]
        print(f"{kind:{width}s}  {first_line}")
    print("\n`nlgkd stages KIND` lists a kind's fields.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nlgkd", description="Knowledge distillation of text generators.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a recipe's stages (finished ones with unchanged inputs are skipped)")
    run.add_argument("recipe")
    which = run.add_mutually_exclusive_group()
    which.add_argument("--stage", help="run only this stage (its inputs must have finished)")
    which.add_argument("--from", dest="start_from", help="re-run this stage and every one after it")
    run.add_argument("--force", action="store_true", help="re-run every selected stage")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe field, e.g. stages.teacher.epochs=3 (repeatable)")
    run.add_argument("--runs-dir", default=os.environ.get("NLGKD_RUNS_DIR", "runs"),
                     help="where run directories go (default: runs, or $NLGKD_RUNS_DIR)")
    run.set_defaults(func=cmd_run)

    validate = sub.add_parser("validate", help="check a recipe without running it")
    validate.add_argument("recipe")
    validate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    validate.set_defaults(func=cmd_validate)

    stages = sub.add_parser("stages", help="list the stage kinds, or one kind's fields")
    stages.add_argument("kind", nargs="?")
    stages.set_defaults(func=cmd_stages)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .runner import StageError

    try:
        return args.func(args)
    except (RecipeError, StageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished stages are kept and a re-run resumes the unfinished one", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
