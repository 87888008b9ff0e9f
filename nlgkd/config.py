"""The recipe's schema: typed dataclasses for the data, the models and every stage kind (`STAGE_CONFIGS`),
each field with its type, default, help and numeric bounds (`nlgkd/field_help.py` prints them).

Loading a YAML file into these classes, `--set` overrides, name resolution and variants are in
`nlgkd/recipe.py`.
"""
from __future__ import annotations

import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Union


from .config_blocks import (AttentionKD, DecodingConfig, DenoisingConfig, HiddenKD, JointTeachingConfig,  # noqa: F401
                            Quantization)
from .engine_decoding import ctranslate2_refusal
from .schema import RecipeError, bounds, doc, ref


# --------------------------------------------------------------------------------------------- data
@dataclass(kw_only=True)
class DemoSizes:
    train: int = field(default=2000, metadata=doc("labeled pairs", ge=0))
    validation: int = field(default=200, metadata=doc("labeled pairs", ge=0))
    test: int = field(default=200, metadata=doc("labeled pairs", ge=0))
    unlabeled: int = field(default=2000, metadata=doc("inputs without targets", ge=0))


SPLITS = ("train", "validation", "test", "unlabeled")  # the data splits a recipe can name


@dataclass(kw_only=True)
class DataSource:
    """One dataset: the built-in task, files or a hub name, and how rows become (source, target) text."""

    task: Optional[Literal["demo"]] = field(default=None, metadata=doc("built-in task that needs no download"))
    demo: DemoSizes = field(default_factory=DemoSizes, metadata=doc("split sizes of the demo task"))
    dir: Optional[str] = field(default=None, metadata=doc(
        "folder the train/validation/test/unlabeled paths are read from (default: where you run nlgkd); "
        "`--set data.dir=PATH` points a recipe at another copy of its files"))
    train: Optional[str] = field(default=None, metadata=doc("jsonl/csv/parquet file of the train split"))
    validation: Optional[str] = field(default=None, metadata=doc(
        "file of the validation split (early stopping, the weak-teacher check)"))
    test: Optional[str] = field(default=None, metadata=doc("file of the test split (evaluate stages)"))
    unlabeled: Optional[str] = field(default=None, metadata=doc(
        "file of inputs without targets (pseudo-targets, denoising); only the source column is read"))
    hub: Optional[str] = field(default=None, metadata=doc("dataset name for datasets.load_dataset"))
    hub_config: Optional[str] = field(default=None, metadata=doc("the hub dataset's configuration name"))
    hub_splits: dict[str, str] = field(default_factory=dict, metadata=doc("our split -> hub split, e.g. {validation: dev}"))
    source: str = field(default="source", metadata=doc("source column, or a template like '{context}; answer: {answer}'"))
    target: str = field(default="target", metadata=doc("target column, or a template"))
    max_examples: dict[str, int] = field(default_factory=dict, metadata=doc("cap per split, e.g. {train: 1000}", ge=1))

    def __post_init__(self):
        for role in ("source", "target"):
            try:
                list(string.Formatter().parse(getattr(self, role)))
            except ValueError as err:
                raise RecipeError(f"{role}: {getattr(self, role)!r} is not a valid template ({err}); name columns in "
                                  "braces, e.g. '{title}: {text}', and write a literal brace twice ({{ or }})") from None

    def split_file(self, split: str, parent_dir: Optional[str] = None) -> Optional[str]:
        """The file of `split` as given, or joined onto `dir` (a task's own, else `parent_dir`: the top-level
        data.dir); an absolute path stays as it is."""
        path = getattr(self, split)
        folder = self.dir if self.dir is not None else parent_dir
        if path is None or folder is None:
            return path
        return str(Path(folder).expanduser() / path)


@dataclass(kw_only=True)
class TaskData(DataSource):
    """One task of a multi-task recipe (MT-DNN): its own dataset, a source prefix and a sampling weight."""

    prefix: str = field(default="", metadata=doc("prepended to every source, e.g. 'summarize: '"))
    weight: Optional[float] = field(default=None, metadata=doc(
        "share of each training epoch drawn from this task, relative to the other tasks' weights "
        "(smaller tasks are repeated, larger ones subsampled); default: its own train size", gt=0))


@dataclass(kw_only=True)
class DataConfig(DataSource):
    """Where examples come from: one dataset (the fields of DataSource) or several tasks (`tasks:`)."""

    tasks: dict[str, TaskData] = field(default_factory=dict, metadata=doc(
        "several datasets in one recipe, by task name; each example keeps its task (per-task teachers "
        "in distill: teachers_by_task)"))
    max_source_length: int = field(default=256, metadata=doc("tokens; longer sources are truncated and counted", ge=1))
    max_target_length: int = field(default=128, metadata=doc("tokens; longer targets are truncated and counted", ge=1))
    on_empty: Literal["drop", "error"] = field(default="drop", metadata=doc(
        "examples with empty source/target: drop, count and say so, or stop"))
    max_dropped_share: float = field(default=0.2, metadata=doc(
        "on_empty: drop stops the run when more than this share of a split is empty (a wrong column?)", ge=0, le=1))


# ------------------------------------------------------------------------------------------- models


@dataclass(kw_only=True)
class ModelConfig:
    """A model entry: a pretrained hub name/local path, or a fresh config trained from scratch."""

    init: Literal["pretrained", "fresh"] = field(default="fresh", metadata=doc(
        "fresh: built from arch and the sizes below, with a tokenizer trained on the train split; "
        "pretrained: loaded from name_or_path (the sizes are ignored)"))
    name_or_path: Optional[str] = field(default=None, metadata=doc("hub name or local folder (init: pretrained)"))
    revision: Optional[str] = field(default=None, metadata=doc("hub branch, tag or commit (init: pretrained)"))
    trust_remote_code: bool = field(default=False, metadata=doc("off unless you trust the model's code"))
    arch: Literal["bart", "mbart", "t5", "gpt2", "lstm"] = field(
        default="mbart", metadata=doc(
            "family of a fresh model. mbart (default): BART with pre-layer-norm, the fastest to learn from scratch "
            "(eval/README.md, 'Fresh models'); bart: post-layer-norm, can learn to ignore its input "
            "(transformers#18461); t5: learns slowly from scratch with AdamW (its unit-scale tied embeddings); "
            "gpt2: decoder-only; lstm: a BiLSTM encoder + attentional LSTM decoder (nlgkd/lstm.py) sized by "
            "d_model, encoder_layers, decoder_layers, dropout"))
    d_model: int = field(default=256, metadata=doc("fresh: hidden size", ge=1))
    encoder_layers: int = field(default=4, metadata=doc("fresh: encoder blocks", ge=1))
    decoder_layers: int = field(default=4, metadata=doc("fresh: decoder blocks", ge=1))
    attention_heads: int = field(default=4, metadata=doc("fresh: heads per attention layer (divides d_model)", ge=1))
    ffn_dim: int = field(default=1024, metadata=doc("fresh: feed-forward width", ge=1))
    dropout: float = field(default=0.1, metadata=doc("fresh: dropout of every block", ge=0, lt=1))
    max_position_embeddings: int = field(default=512, metadata=doc("fresh: longest sequence in tokens", ge=1))
    tokenizer: Literal["bpe", "unigram"] = field(
        default="bpe", metadata=doc("algorithm of the tokenizer trained for a fresh model")
    )
    tokenizer_from: Optional[str] = field(
        default=None, metadata=ref("model", "use this model's tokenizer: fresh, instead of training one; "
                                            "pretrained, for a folder saved without its tokenizer files")
    )
    vocab_size: int = field(default=2000, metadata=doc("vocabulary of a trained tokenizer", ge=1))
    init_std: Optional[float] = field(default=None, metadata=doc(
        "fresh bart/mbart: std of the initial weights; default 1/sqrt(d_model) (transformers' 0.02 suits "
        "d_model 1024 and leaves small models ignoring their input)", gt=0))

    def __post_init__(self):
        if self.init == "fresh" and self.arch != "lstm" and self.d_model % self.attention_heads:
            raise RecipeError(f"attention_heads: {self.attention_heads} does not divide d_model {self.d_model}; each "
                              "head gets d_model / attention_heads dimensions, so pick a divisor (e.g. "
                              f"{max(h for h in range(1, min(self.attention_heads, self.d_model) + 1) if self.d_model % h == 0)})")
        if self.init_std is not None and (self.init != "fresh" or self.arch not in ("bart", "mbart")):
            raise RecipeError(f"init_std: only fresh bart and mbart models use it, and this one is "
                              f"{'a pretrained model' if self.init != 'fresh' else 'arch ' + self.arch}; remove it")


# ------------------------------------------------------------------------------------------- stages
@dataclass(kw_only=True)
class TrainArgs:
    """Hyper-parameters of the one training loop (`nlgkd/loop.py`), shared by every training stage."""

    epochs: float = field(default=1.0, metadata=doc("passes over the training data (fractions allowed)", gt=0))
    max_steps: Optional[int] = field(default=None, metadata=doc("optimizer steps; overrides epochs", ge=1))
    batch_size: int = field(default=16, metadata=doc(
        "examples per micro-batch, over all processes (x grad_accum per optimizer step)", ge=1, le=100_000))
    grad_accum: int = field(default=1, metadata=doc("micro-batches per optimizer step", ge=1))
    lr: float = field(default=5e-4, metadata=doc("AdamW's peak learning rate (linear warmup, then linear decay)", gt=0))
    weight_decay: float = field(default=0.01, metadata=doc("AdamW's", ge=0))
    warmup_steps: int = field(default=0, metadata=doc("steps of linear warmup from 0 to lr", ge=0))
    max_grad_norm: float = field(default=1.0, metadata=doc("gradient clipping (0: off)", ge=0))
    mixed_precision: Literal["auto", "no", "bf16"] = field(
        default="auto", metadata=doc(
            "auto = bf16 on a GPU that has it, else fp32 (no fp16: it needs loss scaling, which this loop does "
            "not do)"))
    eval_every: Optional[int] = field(default=None, metadata=doc(
        "steps between evaluations; default once per epoch", ge=1))
    eval_samples: int = field(default=128, metadata=doc("validation examples decoded for the generation metric", ge=0))
    early_stopping_metric: Literal["val_loss", "bleu", "chrf"] = field(default="val_loss", metadata=doc(
        "the validation score that picks the kept weights (the best one) and, with patience, stops early"))
    patience: Optional[int] = field(default=None, metadata=doc("evaluations without improvement before stopping", ge=1))
    save_every: Optional[int] = field(default=200, metadata=doc("steps between resumable checkpoints", ge=1))
    save_every_minutes: Optional[float] = field(default=10.0, metadata=doc(
        "also a checkpoint when this many minutes passed since the last one (slow steps lose no more)", gt=0))
    log_every: int = field(default=10, metadata=doc("steps between records of metrics.jsonl (the running loss, also on the progress bar)", ge=1))
    label_smoothing: float = field(default=0.0, metadata=doc("of the gold cross-entropy", ge=0, lt=1))
    group_by_length: bool = field(default=False, metadata=doc(
        "batches of examples of similar length (shuffled pools of 50 batches, sorted, cut, the batches shuffled): "
        "less padding, so faster steps where lengths vary; the batches are less random"))
    compile: bool = field(default=False, metadata=doc(
        "torch.compile the training step's forward and loss (dynamic shapes; generation stays eager): faster "
        "steps on a GPU after the first ones compile; on a CPU it needs a C++ compiler"))
    fused_adamw: Literal["auto", "yes", "no"] = field(default="auto", metadata=doc(
        "torch's fused AdamW kernel: one launch for all parameters. auto = yes on a GPU, no on a CPU"))
    seed: Optional[int] = field(default=None, metadata=doc("default: the recipe seed"))
    validation_decoding: Optional[DecodingConfig] = field(default=None, metadata=doc(
        "how validation decodes for BLEU/chrF (early stopping, the kept weights) and the teacher check; default: "
        "as the recipe's first evaluate stage decodes (greedy when it has none), so they judge the outputs the "
        "table reports. Only a block written here is part of the stage's fingerprint"))
    report_to: list[str] = field(default_factory=list, metadata=doc("accelerate trackers, e.g. [tensorboard]"))


@dataclass(kw_only=True)
class FinetuneConfig(TrainArgs):
    """Cross-entropy training of a model on gold targets (a teacher, or a baseline student)."""

    produces: ClassVar[str] = "model"

    def splits_read(self) -> set[str]:  # the data splits its fingerprint hashes: also validation (early stopping)
        return {"train", "validation"}
    model: str = field(metadata=ref("model", "models: entry or earlier stage to train"))


@dataclass(kw_only=True)
class EvaluateConfig:
    """Decode a split with each model; BLEU, chrF, ROUGE, lengths, size and speed; a comparison table."""

    produces: ClassVar[str] = "metrics"

    def splits_read(self) -> set[str]:  # the baselines' most frequent target comes from train
        return {self.split} | ({"train"} if self.baselines else set())
    # a varied stage in `models` becomes one row per variant (the comparison), not one evaluate per variant
    expands_variants: ClassVar[bool] = True
    models: list[str] = field(metadata=ref("decodables", "models to evaluate: stages, models: entries, exports"))
    split: Literal["test", "validation", "train"] = field(default="test", metadata=doc("the split decoded and scored"))
    decoding: DecodingConfig = field(default_factory=DecodingConfig, metadata=doc("how every model generates"))
    max_examples: Optional[int] = field(default=None, metadata=doc("score the first N examples of the split", ge=1))
    baselines: bool = field(default=False, metadata=doc(
        "also score trivial baselines on the same examples: copying the source, and the most frequent train "
        "target for every input (rows copy_source, most_frequent_target)"))
    timing_passes: int = field(default=3, metadata=doc(
        "speed: timed generation passes over the same batches after the scored pass (which warms up); latency "
        "and seq/s are their median, with the spread; 0: time the scored pass alone", ge=0))
    timing_examples: Optional[int] = field(default=512, metadata=doc(
        "the timed passes decode the first N inputs of the split (null: all of them)", ge=1))

    def __post_init__(self):
        if not self.models:
            raise RecipeError("models: an evaluate stage needs at least one model to score; list the stages or "
                              "models: entries to compare, e.g. [teacher, distill]")


@dataclass(kw_only=True)
class SelectConfig:
    """Choose a model on validation: the candidate that scores best becomes this stage's model.
    Every candidate decodes the same validation examples (the study picks each stage's setting so, never on
    test); stage.json keeps every score."""

    produces: ClassVar[str] = "model"

    def splits_read(self) -> set[str]:
        return {"validation"}
    # a varied stage in `candidates` gives one candidate per variant (the choice among them)
    expands_variants: ClassVar[bool] = True
    candidates: list[str] = field(metadata=ref("models", "models to choose from: stages (each variant of a varied "
                                                         "stage is one candidate) or models: entries"))
    metric: Literal["bleu", "chrf", "rougeL"] = field(default="bleu", metadata=doc("higher is better; ties: the first"))
    decoding: DecodingConfig = field(default_factory=DecodingConfig, metadata=doc("how every candidate generates"))
    max_examples: Optional[int] = field(default=None, metadata=doc("score the first N validation examples", ge=1))

    def __post_init__(self):
        if len(self.candidates) < 1:
            raise RecipeError("candidates: a select stage needs the models to choose from, e.g. [distill] for the "
                              "variants of a varied distill stage")


LayerSpec = Optional[Union[list[int], dict[str, int], str]]


@dataclass(kw_only=True)
class PruneConfig:
    """Build a student from a teacher by keeping chosen encoder and/or decoder layers (study stage S2)."""

    produces: ClassVar[str] = "model"

    def splits_read(self) -> set[str]:
        return set()
    from_: str = field(metadata=ref("model", "teacher model to prune", yaml_name="from"))
    encoder_layers: LayerSpec = field(default=None, metadata=doc(
        "layers to keep: a list like [0, -1], {first_last: N}, {first: N}, every_other, all (default)"))
    decoder_layers: LayerSpec = field(default=None, metadata=doc("as encoder_layers, for the decoder"))


@dataclass(kw_only=True)
class DistillConfig(TrainArgs):
    """Train a student against one or more teachers with word-level, hidden-state and attention KD (S3)."""

    produces: ClassVar[str] = "model"

    def splits_read(self) -> set[str]:  # validation: early stopping and the teacher checks
        denoising = self.denoising
        return {"train", "validation"} | (set(denoising.splits) if denoising and denoising.file is None else set())
    student: str = field(metadata=ref("model", "model to train (e.g. a prune stage)"))
    teacher: Optional[Union[str, list[str]]] = field(
        default=None, metadata=ref("models", "teacher, or a list of teachers (an ensemble averages them)"))
    teachers_by_task: dict[str, list[str]] = field(default_factory=dict, metadata=ref(
        "models", "multi-task data: each task's teachers (MT-DNN); a task with none ([] or left out) "
        "trains on gold cross-entropy alone. Use instead of teacher:"))
    ce_student: Optional[str] = field(default=None, metadata=ref("model", (
        "the student trained on gold alone (e.g. student_ft) the teacher must beat on validation first "
        "(min_teacher_lead); default: the recipe's earlier finetune stage of the same student")))
    min_teacher_lead: Optional[float] = field(default=1.0, metadata=doc(
        "BLEU points on validation by which the teacher must lead ce_student; below it a warning says what to "
        "do, or with on_weak_teacher: stop this stage stops before training. null: no check", ge=-100, le=100))
    objective: Literal["finetune", "logits_kd", "logits_mse", "noisy_kd"] = field(
        default="logits_kd", metadata=doc("word-level term: cross-entropy only, KD, logit MSE, KD with teacher dropout"))
    noise_dropout: Optional[float] = field(default=None, metadata=doc(
        "noisy_kd: the teacher's dropout rate while it teaches (default: the rates it was trained with)", ge=0, lt=1))
    alpha: float = field(default=0.0, metadata=doc(
        "loss = (1 - alpha) * word-level KD + alpha * gold cross-entropy", ge=0, le=1))
    temperature: float = field(default=1.0, metadata=doc(
        "both distributions are softmax(logits / T); the KD term is scaled by T^2", gt=0))
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = field(default="forward_kl", metadata=doc(
        "KL(teacher || student), the usual (mode covering); KL(student || teacher) (mode seeking); or the "
        "generalized Jensen-Shannon of GKD with jsd_beta"))
    jsd_beta: float = field(default=0.5, metadata=doc("jsd: the teacher's weight in the mixture", gt=0, lt=1))
    hidden: Optional[HiddenKD] = field(default=None, metadata=doc(
        "also match hidden states of mapped layers (PKD, DistilBERT, TinyBERT); off when absent"))
    attention: Optional[AttentionKD] = field(default=None, metadata=doc(
        "also match attention (MiniLM relations or TinyBERT scores) of one layer pair; off when absent"))
    teacher_dtype: Literal["auto", "fp32", "bf16"] = field(
        default="auto", metadata=doc("auto: bf16 on a GPU that has it, else fp32"))
    kd_chunk_size: Optional[int] = field(default=None, metadata=doc("token rows per KD chunk (memory bound)", ge=1))
    gold: bool = field(default=True, metadata=doc("train on the gold targets"))
    pseudo_targets: list[str] = field(
        default_factory=list, metadata=ref("datasets", "pseudo_targets stages whose PTs join the training data"))
    pt_schedule: Literal["cycle", "all", "all_together"] = field(default="cycle", metadata=doc(
        "cycle: epoch e uses PT e mod K (the study); all: every PT each epoch; all_together: all, an input's PTs "
        "in one batch, its source encoded once"))
    joint_teaching: Optional[JointTeachingConfig] = field(default=None, metadata=doc(
        "Joint-Teaching (study stage S8): also KD on prefixes the student samples itself; off when absent"))
    cached_teacher: Optional[str] = field(
        default=None, metadata=ref("logits", "a cache_logits stage: KD from stored top-k, no teacher loaded"))
    cache_tail: Literal["renormalize", "bucket"] = field(
        default="renormalize", metadata=doc("teacher mass outside the cached top-k: see losses.sparse_kd_loss"))
    cross_tokenizer: bool = field(default=False, metadata=doc(
        "allow a teacher with another tokenizer (e.g. BART -> T5): per batch it scores the target text under its "
        "own tokenizer and its top-k is aligned to the student's tokens by character offsets "
        "(nlgkd/alignment.py); objective logits_kd or noisy_kd, forward_kl, one teacher; mass lost in the "
        "alignment is handled by cache_tail"))
    cross_tokenizer_top_k: int = field(default=20, metadata=doc(
        "cross_tokenizer: teacher alternatives kept per teacher token (and slots per student token)", ge=1))
    denoising: Optional[DenoisingConfig] = field(default=None, metadata=doc(
        "general distillation: denoising pairs of raw text join the training data (with gold: false, they "
        "are all of it); the teacher's prediction of the original text is the soft target. With objective: "
        "finetune and no teacher, it is denoising pretraining of the student itself"))

    def __post_init__(self):
        if self.joint_teaching is not None and self.objective not in ("logits_kd", "noisy_kd"):
            raise RecipeError(f"joint_teaching: trains with the KL to the teacher on prefixes the student samples, so "
                              f"it needs objective: logits_kd or noisy_kd (and a teacher), not {self.objective!r}; "
                              "remove joint_teaching or change the objective")
        if self.noise_dropout is not None and self.objective != "noisy_kd":
            raise RecipeError(f"noise_dropout is the teacher's dropout for objective: noisy_kd, but objective is "
                              f"{self.objective!r}; remove noise_dropout or set objective: noisy_kd")
        minilm_on_encoder = (self.attention is not None and self.attention.loss == "minilm"
                             and "encoder_self" in self.attention.sides)
        if minilm_on_encoder and self.pt_schedule == "all_together":
            raise RecipeError(encoded_once_refusal("pt_schedule: all_together", "pt_schedule: all"))
        if minilm_on_encoder and self.joint_teaching is not None and self.joint_teaching.mix == "rows":
            raise RecipeError(encoded_once_refusal("joint_teaching.mix: rows", "joint_teaching.mix: steps"))


def encoded_once_refusal(setting: str, instead: str) -> str:
    return (f"{setting} encodes each source once, so MiniLM's encoder Q/K/V are one per source, not per target; "
            f"drop encoder_self from attention.sides or use {instead}")


@dataclass(kw_only=True)
class ApiTeacherConfig:
    """An LLM behind an OpenAI-compatible chat API as the teacher (`nlgkd/stages/pseudo_targets_api.py`, `nlgkd/api_client.py`): OpenAI, vLLM,
    Ollama, TGI, or `nlgkd serve`. Answers are cached in runs/<recipe>/api_cache.sqlite and never paid twice."""

    model: str = field(metadata=doc("model name the endpoint knows, e.g. gpt-4o"))
    base_url: Optional[str] = field(default=None, metadata=doc(
        "OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1; default: OpenAI's (or $OPENAI_BASE_URL)"))
    api_key_env: Optional[str] = field(default="OPENAI_API_KEY", metadata=doc(
        "environment variable holding the key (never put the key in a recipe); null: the endpoint needs none"))
    system: Optional[str] = field(default=None, metadata=doc("system message of every request"))
    prompt: str = field(default="{source}", metadata=doc("user message; {source} is replaced by the input"))
    shots: int = field(default=0, metadata=doc(
        "k-shot examples from the train split (the same k for every request, drawn with the recipe seed): user "
        "prompt, assistant target", ge=0))
    n_per_request: bool = field(default=True, metadata=doc(
        "ask for the K outputs with n=K in one request; false: K requests (seeds seed..seed+K-1) for endpoints "
        "that ignore n"))
    logprobs: bool = field(default=False, metadata=doc("ask for the answer tokens' log-probabilities"))
    top_logprobs: int = field(default=0, metadata=doc(
        "alternatives per token with their log-probabilities (<= 20)", ge=0, le=20))
    concurrency: int = field(default=8, metadata=doc("requests in flight at once", ge=1))
    requests_per_minute: Optional[float] = field(default=None, metadata=doc("rate limit (spaced evenly)", gt=0))
    tokens_per_minute: Optional[float] = field(default=None, metadata=doc(
        "rate limit on estimated prompt + max completion tokens", gt=0))
    timeout: float = field(default=60.0, metadata=doc(
        "seconds without an answer (or to connect) before a request is abandoned and retried", gt=0))
    max_retries: int = field(default=6, metadata=doc(
        "retries of a request after 429, 5xx, timeouts, dropped connections, malformed or empty answers", ge=0))
    backoff: float = field(default=1.0, metadata=doc(
        "seconds before the first retry; doubles each retry, jittered (a Retry-After header wins)", ge=0))
    backoff_max: float = field(default=60.0, metadata=doc("longest wait between retries without Retry-After", ge=0))
    input_price: float = field(default=0.0, metadata=doc(
        "price per million prompt tokens (cost estimates, budget)", ge=0))
    output_price: float = field(default=0.0, metadata=doc("price per million completion tokens", ge=0))
    max_cost: Optional[float] = field(default=None, metadata=doc(
        "budget in the prices' currency: no request is sent whose worst case would pass it", ge=0))
    max_total_tokens: Optional[int] = field(default=None, metadata=doc(
        "budget in tokens (prompt + completion) of this run; answers from the cache are free", ge=1))
    on_budget: Literal["stop", "finish"] = field(default="stop", metadata=doc(
        "budget reached: stop (an error; answers stay cached, a re-run with a larger budget continues) or "
        "finish (write the PTs paid for so far)"))
    allow_failures: int = field(default=0, metadata=doc(
        "requests that may still fail after their retries and the stage finishes without them (listed in "
        "failures.jsonl); more stop the stage", ge=0))


@dataclass(kw_only=True)
class PseudoTargetsConfig:
    """Generate K pseudo-targets per input with a teacher: sequence-level KD data (study stages S4-S7)."""

    produces: ClassVar[str] = "dataset"

    def splits_read(self) -> set[str]:  # an API teacher's k-shot examples come from train
        shots = self.teacher_api is not None and self.teacher_api.shots
        return set(self.inputs) | ({"train"} if shots else set())
    teacher: Optional[str] = field(default=None, metadata=ref("model", "model that writes the pseudo-targets"))
    teacher_api: Optional[ApiTeacherConfig] = field(default=None, metadata=doc(
        "instead of teacher: an LLM behind an OpenAI-compatible API (decoding: greedy or sample only)"))
    align_to: Optional[str] = field(default=None, metadata=ref("model", (
        "with teacher_api logprobs: the student whose tokenizer the API's top logprobs are aligned to; the "
        "stage then also writes soft targets that distill reads with cached_teacher: this stage")))
    inputs: list[Literal["train", "validation", "test", "unlabeled"]] = field(
        default_factory=lambda: ["train"], metadata=doc("splits whose sources get pseudo-targets"))
    augmented: list[str] = field(default_factory=list, metadata=ref("datasets", "augment stages whose inputs to label"))
    decoding: DecodingConfig = field(
        default_factory=lambda: DecodingConfig(strategy="sample", top_p=0.95, num_return_sequences=4),
        metadata=doc("how the teacher writes; default: nucleus sampling p=0.95, K=4"))
    max_examples: Optional[int] = field(default=None, metadata=doc("cap on inputs per split", ge=1))
    save_every: int = field(default=10, metadata=doc(
        "batches between writes to disk (a kill loses at most these)", ge=1))
    engine: Literal["transformers", "ctranslate2"] = field(default="transformers", metadata=doc(
        "what decodes and scores: the PyTorch teacher (transformers' generate), or a CTranslate2 copy of it made "
        "in the stage's folder (encoder-decoder or decoder-only; the same decoding fields; faster; a teacher that is "
        "an export stage is used as it is)"))
    engine_quantization: Quantization = field(default="float32", metadata=doc(
        "engine: ctranslate2: the copy's weight type; float32 writes what the PyTorch teacher writes; int8 (CPU) or "
        "int8_float16 (GPU) may pick other tokens where two are nearly tied, and is faster only on some CPUs "
        "(eval/bench_pt_engine.py measures yours)"))

    def __post_init__(self):
        if (self.teacher is None) == (self.teacher_api is None):
            raise RecipeError("give teacher: (a model) or teacher_api: (an OpenAI-compatible endpoint), one of them")
        if self.engine == "ctranslate2":
            if self.teacher_api is not None:
                raise RecipeError("engine: ctranslate2 decodes a local teacher; an API teacher (teacher_api:) "
                                  "takes engine: transformers (the default)")
            refusal = ctranslate2_refusal(self.decoding)
            if refusal:
                raise RecipeError(f"engine: ctranslate2: {refusal}, or use engine: transformers")
        if self.align_to is not None and (self.teacher_api is None or not self.teacher_api.logprobs
                                          or not self.teacher_api.top_logprobs):
            raise RecipeError("align_to: needs teacher_api with logprobs: true and top_logprobs: 1..20")


@dataclass(kw_only=True)
class AugmentConfig:
    """Make new inputs from a split by masking, POS-guided replacement and n-gram sampling (Tang et al.)."""

    produces: ClassVar[str] = "dataset"

    def splits_read(self) -> set[str]:
        return {self.split}
    split: Literal["train", "unlabeled"] = "train"
    n_iter: int = field(default=4, metadata=doc("variants per input (duplicates dropped)", ge=1))
    p_mask: float = field(default=0.1, metadata=bounds(ge=0, le=1))
    p_pos: float = field(default=0.1, metadata=bounds(ge=0, le=1))
    p_ng: float = field(default=0.25, metadata=bounds(ge=0, le=1))
    field_separator: Optional[str] = field(default=None, metadata=doc("e.g. ' | ' to augment one field at a time"))
    pos_method: Literal["auto", "distributional", "spacy"] = "distributional"
    max_examples: Optional[int] = field(default=None, metadata=bounds(ge=1))


@dataclass(kw_only=True)
class ExportConfig:
    """Convert a model for an inference engine (CTranslate2, int8 by default); evaluate and serve run it."""

    produces: ClassVar[str] = "exported model"

    def splits_read(self) -> set[str]:
        return set()
    model: str = field(metadata=ref("model", "model to export (a stage, e.g. distill)"))
    format: Literal["ctranslate2", "onnx"] = field(default="ctranslate2", metadata=doc(
        "ctranslate2: bart, mbart, pegasus, marian, t5, mt5, gpt2, opt, llama (pip install -e \".[export]\"); "
        "onnx: not available yet"))
    quantization: Quantization = field(default="int8", metadata=doc(
        "weights' type: int8 for a CPU; int8_float16 or float16 for a GPU; float32 decodes as PyTorch does"))

    def __post_init__(self):
        if self.format != "ctranslate2":
            raise RecipeError(f"format: {self.format!r} is not available in this version of nlgkd; use format: "
                              "ctranslate2 (bart, mbart, pegasus, marian, t5, mt5, gpt2, opt, llama)")


@dataclass(kw_only=True)
class CacheLogitsConfig:
    """Run a teacher once over gold and/or pseudo-targets; store its top-k log-probs for teacher-free KD."""

    produces: ClassVar[str] = "logits"

    def splits_read(self) -> set[str]:
        return {"train"}
    teacher: str = field(metadata=ref("model", "model whose distributions are cached"))
    gold: bool = field(default=True, metadata=doc("cache the train split's gold targets"))
    pseudo_targets: list[str] = field(default_factory=list, metadata=ref("datasets", "pseudo_targets stages to cache"))
    top_k: int = field(default=32, metadata=doc("entries kept per token", ge=1))
    dtype: Literal["fp16", "fp32"] = field(default="fp16", metadata=doc("storage of the log-probs"))
    batch_size: int = field(default=32, metadata=bounds(ge=1))


# kind -> config dataclass. The run functions live in `nlgkd/stages/__init__.py:STAGES` (same keys).
STAGE_CONFIGS: dict[str, type] = {
    "finetune": FinetuneConfig,
    "evaluate": EvaluateConfig,
    "prune": PruneConfig,
    "distill": DistillConfig,
    "pseudo_targets": PseudoTargetsConfig,
    "augment": AugmentConfig,
    "cache_logits": CacheLogitsConfig,
    "export": ExportConfig,
    "select": SelectConfig,
}


@dataclass
class Stage:
    name: str
    kind: str
    config: Any
    index: int
    # `variants:` of the recipe stage: variant name -> its config (the stage's fields plus the overrides)
    variants: dict[str, Any] = field(default_factory=dict)
    # set on the copies the runner runs (`Recipe.instances`): which variant, and of which stage
    variant: Optional[str] = None
    varied: Optional[str] = None

    @property
    def key(self) -> str:
        """`name`, or `name@variant`: the run-directory folder and how other stages may pin it."""
        return f"{self.name}@{self.variant}" if self.variant else self.name


@dataclass
class Recipe:
    name: str
    seed: int
    data: DataConfig
    models: dict[str, ModelConfig]
    stages: list[Stage]
    source: str = "<recipe>"  # file the recipe came from, for messages
    raw: dict = field(default_factory=dict)
    # a teacher that does not beat trivial baselines on validation (nlgkd/teacher_check.py): warn and go on,
    # or stop before any stage learns from it
    on_weak_teacher: Literal["warn", "stop"] = "warn"
    # what the runner runs, in order: one copy per variant of a varied stage and of every stage that reads
    # it, with references pinned to `name@variant` (see `expand_variants`); other stages as they are
    instances: list[Stage] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # said by validate and run: what reading the recipe decided
    assignments: list[str] = field(default_factory=list)  # a profile's and --set's, in the order applied

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise RecipeError(f"{self.source}: no stage named {name!r}; stages are {[s.name for s in self.stages]}")

    def resolve(self, name: str, before: int) -> tuple[str, Any]:
        """('stage', Stage) for the latest stage named `name` before index `before`, else ('model', ModelConfig).
        `name@variant` is that variant's copy; once the recipe is expanded, plain names give the runnable copy."""
        base, _, variant = name.partition("@")
        for stage in reversed(self.stages[:before]):
            if stage.name == base:
                for instance in self.instances:
                    if instance.index == stage.index and instance.variant == (variant or None):
                        return "stage", instance
                if variant:
                    raise KeyError(name)
                return "stage", stage
        if not variant and name in self.models:
            return "model", self.models[name]
        raise KeyError(name)

    def variant_names(self) -> dict[str, list[str]]:
        """varied stage -> its variant names, in recipe order."""
        found: dict[str, list[str]] = {}
        for instance in self.instances:
            if instance.variant is not None and instance.varied == instance.name:
                found.setdefault(instance.name, []).append(instance.variant)
        return found
