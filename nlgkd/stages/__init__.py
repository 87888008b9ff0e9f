"""Stage kinds: one module each, one explicit dict. The config dataclass of each kind is in
`nlgkd/recipe.py:STAGE_CONFIGS` under the same key."""
from . import distill, evaluate, finetune, prune

STAGES = {
    "finetune": finetune.run,
    "evaluate": evaluate.run,
    "prune": prune.run,
    "distill": distill.run,
}
