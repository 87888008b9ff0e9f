"""Stage kinds: one module each, one explicit dict. The config dataclass of each kind is in
`nlgkd/recipe.py:STAGE_CONFIGS` under the same key."""
from . import evaluate, finetune

STAGES = {
    "finetune": finetune.run,
    "evaluate": evaluate.run,
}
