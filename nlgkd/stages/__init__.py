"""Stage kinds: one module each, one explicit dict. The config dataclass of each kind is in
`nlgkd/config.py:STAGE_CONFIGS` under the same key."""
from . import augment, cache_logits, distill, evaluate, export, finetune, prune, pseudo_targets, select

STAGES = {
    "finetune": finetune.run,
    "evaluate": evaluate.run,
    "prune": prune.run,
    "distill": distill.run,
    "cache_logits": cache_logits.run,
    "pseudo_targets": pseudo_targets.run,
    "augment": augment.run,
    "export": export.run,
    "select": select.run,
}

# `nlgkd run --dry-run`: kinds that can say what they would send or spend; the others are only listed
DRY_RUNS = {
    "pseudo_targets": pseudo_targets.dry_run,
}
