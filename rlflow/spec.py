"""The spec layer: what a pipeline file declares, as validated pydantic models.

Pure data. No torch import, cheap to build, serialisable to a run's ``config.json`` and
back (``Pipeline.from_config(p.to_config()) == p``). Every model forbids unknown keys,
so a misspelt parameter fails instead of vanishing, and refuses NaN and infinity in
every float. Each node kind declares the columns it reads and writes (with their
level), and the graph layer wires the pipeline from those declarations alone.

Advantage, Loss and Filter nodes are variants declared once, in the node library
(``nodes/*.py``), with :mod:`rlflow.variants`: their specs are made from the variant
functions' signatures, not written here.

Column levels:
    seq     one value per row                      [B]
    token   one value per response token           [B, T]
    prompt  one value per prompt token             [B, P]
    text    a Python object per row (str, ...)     list of length B
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Annotated, Any, Callable, ClassVar, Literal, Optional, Union

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, SerializationInfo,
                      model_validator)

from rlflow.pyfile import file_of, import_file
from rlflow.registry import Registry, UnknownName
from rlflow.variants import Declared, VariantKind

Level = Literal["seq", "token", "prompt", "text"]


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, arbitrary_types_allowed=True,
                              allow_inf_nan=False)


# --- rule functions ----------------------------------------------------------------------


class RuleRefError(ValueError):
    """A rule named by reference (``package.module:function`` or ``file.py:function``, as in
    config.json) that cannot be imported: a field error of code RF115."""


def import_callable(ref: Any) -> Any:
    """A callable, or a reference to one as written in config.json: ``package.module:function``
    or ``path/to/pipeline.py:function`` (a rule defined inside a pipeline file)."""
    if callable(ref) or not isinstance(ref, str):
        return ref
    where, _, attr = ref.rpartition(":")
    if not where or not attr:
        raise RuleRefError(f"a rule given by name must look like 'package.module:function' or 'file.py:function', got {ref!r}")
    if "<" in attr:
        raise RuleRefError(f"the rule {ref!r} was a lambda or a function defined inside another one; only functions "
                           "defined at module level can be named in config.json")
    obj = _import_module_of(where, ref)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RuleRefError(f"{where} has no {attr!r} (from the rule reference {ref!r})")
        obj = getattr(obj, part)
    return obj


def _import_module_of(where: str, ref: str) -> Any:
    if where.endswith(".py") and not Path(where).is_file():
        raise RuleRefError(f"the rule {ref!r} names the file {where!r}, which does not exist")
    try:
        return import_file(where, fresh=False) if where.endswith(".py") else importlib.import_module(where)
    except (Exception, SystemExit) as e:  # noqa: BLE001 - whatever the module raised, reported with the reference
        raise RuleRefError(f"the rule {ref!r} cannot be imported: {type(e).__name__}: {e}") from e


def callable_ref(fn: Callable) -> str:
    """The importable reference of ``fn``: ``module:qualname``, or ``file.py:qualname`` for a
    function defined in a pipeline file. A lambda or nested function gets a reference that
    :func:`import_callable` refuses with a clear message (config.json records it all the same)."""
    module, name = getattr(fn, "__module__", None) or "?", getattr(fn, "__qualname__", None) or repr(fn)
    return f"{file_of(module) or module}:{name}"


RuleFn = Annotated[Callable[..., float], BeforeValidator(import_callable), PlainSerializer(callable_ref)]


class Rule(Spec):
    """One weighted term of a rule reward: ``weight * fn(response_text, row) -> float``."""

    fn: RuleFn
    weight: float = 1.0


# --- models and data -----------------------------------------------------------------------


class LoRA(Spec):
    """Low-rank adapters (Hu et al. 2021, arXiv 2106.09685) through ``peft``: each target
    linear layer computes ``W x + (alpha / r) · B A x`` with ``A [r, in]``, ``B [out, r]``,
    and ``B = 0`` at the start, so training begins at the base model. Only ``A`` and ``B``
    train; the base weights stay frozen (and are shared with ``actor.frozen()``)."""

    r: int = Field(16, ge=1, le=1024, description="rank of each adapter")
    alpha: float = Field(32.0, gt=0, le=4096, description="scale numerator: the update is scaled by alpha / r")
    target_modules: Union[Literal["all-linear"], list[Annotated[str, Field(min_length=1)]]] = Field(
        "all-linear", min_length=1, description="names of the linear layers that get an adapter "
        "(e.g. ['q_proj', 'v_proj']); 'all-linear': every linear layer but the output head")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input, in every forward of the "
                           "trained model (sampling too); keep 0 for RL, where the ratio needs one deterministic policy")


# the Model fields that decide the weights a model computes with; a frozen model that agrees
# with a LoRA model on these is that model's base (see Model.base_of)
WEIGHT_FIELDS = ("path", "head", "reward_from", "precision")


class Model(Spec):
    """A model: a Hugging Face id, a local directory, or a ``builtin:`` name.

    ``train=True`` gives it an optimizer (through ``deepspeed.initialize``); frozen models
    are inference-only. ``head`` says what it outputs: token log-probs (``lm``), a value
    per token (``value``, a critic), or one score per sequence (``reward``).
    """

    path: str
    train: bool = False
    head: Literal["lm", "value", "reward"] = "lm"
    reward_from: Literal["classifier", "likelihood"] = Field(
        "classifier", description="head='reward' only: a scalar classifier head at the last token, or the summed "
        "log-prob of the response under the causal LM itself (a likelihood reward model)")
    lr: float = Field(1e-5, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)
    warmup_steps: int = Field(0, ge=0)
    grad_clip: Optional[float] = Field(1.0, gt=0)
    zero_stage: Literal[0, 1, 2, 3] = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    offload: bool = Field(False, description="the optimizer state on the CPU (ZeRO >= 1)")
    offload_params: bool = Field(False, description="the parameters on the CPU, fetched for each forward (ZeRO-3)")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward instead of keeping them")
    micro_batch_size: Optional[int] = Field(None, ge=1, description="rows per forward/backward; None = whole mini-batch")
    lora: Optional[LoRA] = Field(None, description="train a LoRA adapter instead of every weight (head='lm' only)")
    padding_free: bool = Field(True, description="score and train on the batch's sequences packed without padding "
                               "(rlflow.packing); False: the padded [B, P+T] batch, e.g. for a model whose attention "
                               "ignores restarting position ids")

    def __init__(self, path: Optional[str] = None, /, **kw: Any):
        if path is not None:
            kw["path"] = path
        super().__init__(**kw)

    @model_validator(mode="after")
    def _lora_on_lm(self) -> "Model":
        if self.lora is not None and self.head != "lm":
            raise ValueError(f"lora is for language models (head='lm'), not head={self.head!r}: "
                             "critics and reward models train every weight")
        return self

    def frozen(self) -> "Model":
        """The same weights as a frozen model (e.g. the reference policy). Of a LoRA model:
        its base weights (no adapter), which the engine runs as the LoRA model's own module
        with the adapter disabled (see ``base_of``)."""
        return self.model_copy(update={"train": False, "lora": None})

    def critic(self, **kw: Any) -> "Model":
        """A trainable critic with a value head on this model's backbone (all weights train)."""
        return Model(**{**self.model_dump(), "head": "value", "train": True, "lora": None, **kw})

    def base_of(self, other: "Model") -> bool:
        """Whether this frozen model is the base weights of ``other``, a model that trains a
        LoRA adapter: the same path, head and precision (optimizer and placement settings
        do not change the weights; ``actor.frozen()`` always qualifies). The engine then
        places no second copy: this model is ``other``'s module with its adapter disabled."""
        return (not self.train and other.train and other.lora is not None
                and all(getattr(self, f) == getattr(other, f) for f in WEIGHT_FIELDS))


class DataSource(Spec):
    """Rows from ``source``: a ``builtin:`` name, a ``.jsonl`` file, a ``.json``/``.csv``/``.parquet``
    file or a directory (read through ``datasets``), or a Hugging Face dataset name
    (``openai/gsm8k``, from the local cache when the hub cannot be reached).

    ``data_source`` is what its rows are in the unified view of post-training methods
    (DeepSeekMath §5.2.1: data source · reward function · gradient coefficient);
    ``rlflow compare`` and docs/algorithms.md read it from here."""

    data_source: ClassVar[str]
    source: str
    batch_size: int = Field(16, ge=1, description="prompts (or pairs) per iteration")
    eval_source: Optional[str] = Field(None, description="held-out rows (a file or dataset as source); built-in data "
                                       "has its own eval split; default with eval_split: the source itself")
    subset: Optional[str] = Field(None, description="the dataset's configuration name (Hugging Face datasets: "
                                  "load_dataset(source, subset)), e.g. 'main' for openai/gsm8k")
    split: str = Field("train", description="the split trained on (datasets read through the datasets library)")
    eval_split: Optional[str] = Field(None, description="the held-out split (e.g. 'test'), of eval_source or else of source")

    def __init__(self, source: Optional[str] = None, /, **kw: Any):
        if source is not None:
            kw["source"] = source
        super().__init__(**kw)

    def writes(self) -> dict[str, Level]:
        return {"prompt": "text", "answer": "text", "prompt_ids": "prompt", "prompt_mask": "prompt", "group": "seq"}

    def text_fields(self) -> dict[str, str]:
        """The text fields every row must have: setting -> field name (``{"prompt_field": "prompt"}``)."""
        return {"prompt_field": self.prompt_field}


class Prompts(DataSource):
    """Prompts with reference answers: ``builtin:arith``, data files or a ``datasets`` dataset.

    A prompt is plain text, used as it is, or a chat — a list of ``{"role", "content"}``
    messages, in ``prompt_field`` or in ``messages_field`` — rendered with the model
    tokenizer's chat template (``apply_chat_template(..., add_generation_prompt=True)``).
    """

    data_source: ClassVar[str] = "prompts"
    kind: Literal["prompts"] = "prompts"
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    messages_field: Optional[str] = Field(None, description="a field holding each prompt as chat messages "
                                          "(rendered with the tokenizer's chat template); replaces prompt_field")

    def text_fields(self) -> dict[str, str]:
        return {"messages_field": self.messages_field} if self.messages_field else super().text_fields()


class Demonstrations(DataSource):
    """Prompt + completion rows for supervised fine-tuning (``builtin:arith`` or jsonl)."""

    data_source: ClassVar[str] = "human demonstrations"
    kind: Literal["demonstrations"] = "demonstrations"
    prompt_field: str = "prompt"
    completion_field: str = "completion"

    def text_fields(self) -> dict[str, str]:
        return {**super().text_fields(), "completion_field": self.completion_field}

    def writes(self) -> dict[str, Level]:
        return {**super().writes(), "response_ids": "token", "response_mask": "token", "response": "text"}


class Pairs(DataSource):
    """Preference pairs (prompt, chosen, rejected): two rows per pair sharing ``group``."""

    data_source: ClassVar[str] = "preference pairs (offline)"
    kind: Literal["pairs"] = "pairs"
    prompt_field: str = "prompt"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"

    def text_fields(self) -> dict[str, str]:
        return {**super().text_fields(), "chosen_field": self.chosen_field, "rejected_field": self.rejected_field}

    def writes(self) -> dict[str, Level]:
        return {**super().writes(), "response_ids": "token", "response_mask": "token", "response": "text", "chosen": "seq"}


DataSpec = Annotated[Union[Prompts, Demonstrations, Pairs], Field(discriminator="kind")]


# --- nodes -----------------------------------------------------------------------------------

NODE_KINDS: Registry[type["Node"]] = Registry("node kind")


class Node(Spec):
    """A node of the graph: what it reads and writes, and which models it uses.

    ``stage`` is "experience" (runs once per batch, in graph order) or "update"
    (runs per micro-batch inside the optimisation loop: the Loss nodes).
    """

    kind: ClassVar[str]
    stage: ClassVar[Literal["experience", "update"]] = "experience"
    variants: ClassVar[Optional[VariantKind]] = None  # set for kinds with variants
    name: Optional[str] = None

    @model_validator(mode="after")
    def _default_name(self) -> "Node":
        if self.name is None:
            object.__setattr__(self, "name", self.kind)
        return self

    def reads(self) -> dict[str, Level]:
        return {}

    def writes(self) -> dict[str, Level]:
        return {}

    def model_refs(self) -> dict[str, str]:
        """Field name -> model name, for every model this node uses."""
        return {}

    def resolve(self, gen: Optional["Generate"]) -> dict[str, Any]:
        """Settings this node takes from the pipeline's Generate node when they are unset
        (resolved once, when the graph is built); {} when nothing is taken."""
        return {}

    def fact(self, name: str) -> Any:
        """A fact its variant declares (``refills``, ``group_based``, ``entropy``, ...); None for
        a node without a declared variant or a fact it does not state."""
        declared = getattr(self, "declared", None)
        return declared.facts.get(name) if declared is not None else None

    def label(self) -> str:
        """``kind`` or ``kind:variant``."""
        return self.kind + (f":{self.variant}" if hasattr(self, "variant") else "")

    def params(self) -> dict[str, Any]:
        """The node's parameters (for display and comparison): every field but ``name``."""
        return self.model_dump(exclude={"name"})


def node_kind(cls: type["Node"]) -> type["Node"]:
    """Register a node spec class under its ``kind`` (use it to add your own node kinds)."""
    NODE_KINDS.register(cls.kind)(cls)
    return cls


def _node_from_data(data: Any) -> Any:
    """A node from config data: ``{"kind": ..., ["variant": ...,] fields}`` (a Node passes as it is)."""
    if isinstance(data, Node) or not isinstance(data, dict):
        return data
    if "kind" not in data:
        raise ValueError(f"a node given as data needs its 'kind' (one of {', '.join(NODE_KINDS.names())})")
    cls = NODE_KINDS[data["kind"]]
    fields = {k: v for k, v in data.items() if k != "kind"}
    if cls.variants is not None:
        cls = cls.variants[fields.get("variant", "")].spec
    return cls.model_validate(fields)


def _node_to_data(node: Node, info: SerializationInfo) -> dict[str, Any]:
    return {"kind": node.kind, **node.model_dump(mode=info.mode)}


AnyNode = Annotated[Node, BeforeValidator(_node_from_data), PlainSerializer(_node_to_data)]


class ModelNode(Node):
    """A node that runs one model, named first: ``RefLogprob("ref")``."""

    model: str

    def __init__(self, model: Optional[str] = None, /, **kw: Any):
        if model is not None:
            kw["model"] = model
        super().__init__(**kw)

    def model_refs(self):
        return {"model": self.model}


_RESPONSE = {"response_ids": "token", "response_mask": "token"}
_PROMPT = {"prompt_ids": "prompt", "prompt_mask": "prompt"}
_FROM_GENERATE = "default: the Generate node's {} (resolved when the graph is built)"


@node_kind
class Generate(ModelNode):
    """Sample ``n`` responses per prompt from ``model`` (its own weights, with a KV cache).

    Its rows are, in the unified view, ``data_source`` when ``model`` is the one being
    trained (on-policy) and ``data_source_frozen`` when it is a frozen model (offline
    sampling, e.g. RFT's samples of the initial policy).
    """

    kind: ClassVar[str] = "generate"
    data_source: ClassVar[str] = "samples of the current policy"
    data_source_frozen: ClassVar[str] = "samples of a frozen model"
    model: str = "actor"
    n: int = Field(8, ge=1)
    max_new_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    greedy_baseline: bool = False
    recompute_logprobs: bool = Field(False, description="old log-probs from a second full forward (as verl/TRL) "
                                     "instead of the sampling pass; they agree to ~1e-6 in fp32, less in bf16")

    def reads(self):
        return dict(_PROMPT)

    def writes(self):
        out = {**_RESPONSE, "old_logprobs": "token", "truncated": "seq", "response": "text"}
        if self.recompute_logprobs:  # the sampler's own log-probs, kept beside the trainer's
            out["rollout_logprobs"] = "token"
        if self.greedy_baseline:
            out |= {"greedy_response_ids": "token", "greedy_response_mask": "token", "greedy_response": "text"}
        return out


@node_kind
class Score(Node):
    """The sequence reward R_i: weighted rule functions, or a reward model, or both.

    ``rule`` is shorthand for ``rules={fn.__name__: fn}``. Each rule is called as
    ``fn(response_text, row) -> float`` where ``row`` holds the row's text fields
    (``prompt``, ``answer``, ...). Each part is logged as ``reward/<name>`` and written
    unweighted as the column ``rewards_<name>`` (e.g. a Filter metric).
    DAPO's soft overlong punishment is on when ``overlong_buffer`` is set (§7.2).
    """

    kind: ClassVar[str] = "score"
    rule: Optional[RuleFn] = Field(None, exclude=True, description="shorthand for rules={fn.__name__: fn}")
    rules: dict[str, Rule] = Field(default_factory=dict)
    model: Optional[str] = None
    overlong_buffer: Optional[int] = Field(None, ge=1)
    overlong_penalty: float = Field(1.0, ge=0)
    max_new_tokens: Optional[int] = Field(None, ge=1, description="L_max of the overlong punishment; "
                                          + _FROM_GENERATE.format("max_new_tokens"))
    score_greedy: bool = False
    rule_timeout_s: float = Field(10.0, gt=0, description="a rule still running on one sample after this long is "
                                  "killed (its worker process), and the run stops naming the sample")
    rule_workers: Optional[int] = Field(None, ge=0, description="processes the rules run in; None: the cores torch does "
                                        "not use (at least 1); 0: in the training process (for debugging)")

    @model_validator(mode="before")
    @classmethod
    def _rules_shorthand(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("rules"), dict):
            rules = {}
            for k, v in data["rules"].items():
                if isinstance(v, tuple) and len(v) == 2:
                    v = {"fn": v[0], "weight": v[1]}
                elif callable(v) or isinstance(v, str):
                    v = {"fn": v}
                rules[k] = v
            data = {**data, "rules": rules}
        return data

    @model_validator(mode="after")
    def _something_to_score(self) -> "Score":
        if self.rule is not None:
            name = getattr(self.rule, "__name__", "rule")
            self.rules[name] = Rule(fn=self.rule)
            object.__setattr__(self, "rule", None)
        if not self.rules and self.model is None:
            raise ValueError("Score needs a rule (rule=fn or rules={...}) or a reward model (model='rm')")
        clash = sorted(set(self.rules) & {"mean", "model", "overlong"})
        if clash:
            raise ValueError(f"rule name {clash[0]!r} is reserved (it names another reward metric); rename the rule")
        return self

    def reads(self):
        out: dict[str, Level] = {"response": "text", "response_mask": "token", "truncated": "seq"}
        if self.model is not None:
            out |= {**_PROMPT, "response_ids": "token"}
        if self.score_greedy:
            out |= {"greedy_response": "text", "greedy_response_ids": "token", "greedy_response_mask": "token"}
        return out

    def writes(self):
        parts: dict[str, Level] = {f"rewards_{name}": "seq" for name in self.rules}  # each rule's own score
        return {"rewards": "seq", **parts, **({"baseline_rewards": "seq"} if self.score_greedy else {})}

    def model_refs(self):
        return {"model": self.model} if self.model else {}

    def resolve(self, gen):
        if self.overlong_buffer and self.max_new_tokens is None and gen is not None:
            return {"max_new_tokens": gen.max_new_tokens}
        return {}


class _LogprobNode(ModelNode):
    """A node that takes log-probs at the sampling temperature (ALGORITHMS.md Part A §1)."""

    temperature: Optional[float] = Field(None, gt=0, description=_FROM_GENERATE.format("temperature") + "; 1 without one")

    def resolve(self, gen):
        return {"temperature": gen.temperature if gen else 1.0} if self.temperature is None else {}


@node_kind
class RefLogprob(_LogprobNode):
    """Log-probs of the responses under a frozen reference model (at the sampling temperature)."""

    kind: ClassVar[str] = "ref_logprob"
    model: str = "ref"

    def reads(self):
        return {**_PROMPT, **_RESPONSE}

    def writes(self):
        return {"ref_logprobs": "token"}


@node_kind
class Value(ModelNode):
    """Token values V(s_t) from a critic: the state before each response token (§0.1)."""

    kind: ClassVar[str] = "value"
    model: str = "critic"

    def reads(self):
        return {**_PROMPT, **_RESPONSE}

    def writes(self):
        return {"values": "token"}


# --- kinds with variants: the base specs; each variant's spec is made from its function ------

# Schulman's per-token KL estimators and verl's |d| (ALGORITHMS.md §0.3), each with the gradient
# coefficient it adds on ∇log π_θ as a loss term β·k(lp_θ, lp_ref) (the unified view's sign: +
# raises the likelihood). The one list of them: Advantage's ``kl`` field here, the Loss variants'
# ``kl`` setting and masked.kl_estimate use it.
KL_GRADIENT = {
    "k1": "-β (0 in expectation)",  # k1 = d, d = log π_θ/π_ref: dk/dd = 1, and E_π[∇lp] = 0
    "k2": "-β·log(π_θ/π_ref)",  # k2 = d²/2: reverse KL per state
    "k3": "β·(π_ref/π_θ - 1)",  # k3 = e^-d - 1 + d: forward KL's gradient (DeepSeekMath's GRPO GC)
    "abs": "-β·sign(log(π_θ/π_ref))",  # |d|
}
KlEstimator = Literal["k1", "k2", "k3", "abs"]


class AdaptiveKl(Spec):
    """The KL coefficient's schedule, on every Advantage and Loss node: fixed at the node's
    ``kl_coef``, or adaptive (Ziegler et al. 2019, arXiv 1909.08593; verl ``kl_ctrl.type=adaptive``,
    OpenRLHF ``--algo.kl.target``, TRL's AdaptiveKLController) when ``kl_target`` is set:
    after each step β ← β·(1 + clip(KL/kl_target - 1, -0.2, 0.2)·n/kl_horizon), KL the batch
    mean over sequences of the per-sequence token mean of the penalised estimate and n the
    number of sequences (ALGORITHMS.md §0.3). β starts at ``kl_coef``; the runner keeps it."""

    kl_target: Optional[float] = Field(None, gt=0, description="target KL of the adaptive controller (None: β stays "
                                       "kl_coef); needs kl_coef > 0, the starting β")
    kl_horizon: int = Field(10000, ge=1, description="horizon of the adaptive controller, in sequences")


class _VariantNode(Node, Declared):
    variant: str

    def reads(self):
        return self.declared.reads(self)

    def writes(self):
        return self.declared.writes(self)


@node_kind
class AdvantageSpec(AdaptiveKl, _VariantNode):
    """An advantage estimator (variants in ``nodes/advantage.py``).

    Every variant takes ``kl_coef`` and ``whiten``; with ``kl_coef > 0`` the node
    subtracts ``kl_coef * k`` (estimator ``kl``, from the old vs the reference
    log-probs) from the reward (ALGORITHMS.md §0.3, placement 1).
    """

    kind: ClassVar[str] = "advantage"
    kl: KlEstimator = Field("k1", description="KL estimator when kl_coef > 0 puts KL in the reward")

    def reads(self):
        out: dict[str, Level] = {"rewards": "seq", "response_mask": "token", "group": "seq"}
        if getattr(self, "kl_coef", 0.0) > 0:
            out |= {"old_logprobs": "token", "ref_logprobs": "token"}
        return {**out, **super().reads()}

    def writes(self):
        return {"advantages": "token", **super().writes()}

    @property
    def group_based(self) -> bool:
        return self.declared.group_based


@node_kind
class LossSpec(AdaptiveKl, _VariantNode, ModelNode):
    """A loss term on a trainable model (variants in ``nodes/loss.py``); terms on the same
    model are summed, each weighted by ``coef``."""

    kind: ClassVar[str] = "loss"
    stage: ClassVar[Literal["experience", "update"]] = "update"
    model: str = "actor"
    coef: float = Field(1.0, description="weight of this term in the model's summed loss")
    mask: str = Field("response_mask", description="token mask of the loss (e.g. 'loss_mask' from Filter('overlong'))")
    temperature: Optional[float] = Field(None, gt=0, description=_FROM_GENERATE.format("temperature") + "; 1 without one")
    agg_constant: Optional[float] = Field(None, gt=0, description="C of agg='seq-mean-token-sum-norm'; "
                                          + _FROM_GENERATE.format("max_new_tokens"))
    rollout_is: Optional[Literal["token", "seq"]] = Field(
        None, description="policy losses: weigh each token's term by the sampler/trainer importance ratio "
        "π_old/π_rollout (token) or its product over the sequence (seq), truncated or masked as rollout_is_mode says; "
        "needs Generate(recompute_logprobs=True). None: off")
    rollout_is_mode: Literal["truncate", "mask"] = Field(
        "truncate", description="truncate: w = min(r, rollout_is_max) (truncated IS, as verl, TRL, OpenRLHF); "
        "mask: w = r inside [rollout_is_min, rollout_is_max], 0 outside (IcePop)")
    rollout_is_max: float = Field(2.0, gt=1, description="upper bound C of the rollout importance ratio")
    rollout_is_min: float = Field(0.5, ge=0, lt=1, description="lower bound of the ratio in mode 'mask'")

    def reads(self):
        out = {**_PROMPT, **_RESPONSE, self.mask: "token", **super().reads()}
        if self.rollout_is:
            out |= {"old_logprobs": "token", "rollout_logprobs": "token"}
        return out

    @property
    def needs(self) -> str:
        return self.declared.needs

    def resolve(self, gen):
        out: dict[str, Any] = {}
        if self.temperature is None and self.needs == "logprobs":
            out["temperature"] = gen.temperature if gen else 1.0
        if getattr(self, "agg", None) == "seq-mean-token-sum-norm" and self.agg_constant is None and gen is not None:
            out["agg_constant"] = float(gen.max_new_tokens)
        return out


@node_kind
class FilterSpec(_VariantNode):
    """A filter (variants in ``nodes/filter.py``). A filter that drops rows makes every
    experience node that does not feed it run after it, on the kept rows only."""

    kind: ClassVar[str] = "filter"

    @property
    def drops_rows(self) -> bool:
        return self.declared.drops_rows


# facts of an Advantage variant: ``group_based`` (a baseline from the prompt's other samples) and
# ``token_rewards`` (KL in the reward enters per token, r_t = -β·k_t + 1[t = T]·R, rather than summed
# into the sequence score R - β·Σ_t k_t)
ADVANTAGES = AdvantageSpec.variants = VariantKind("advantage", AdvantageSpec, group_based=False, token_rewards=False)
def _response_mask(cols, params):
    return cols["response_mask"]


# facts of a Loss variant: ``mask`` (its token mask, from the batch and its settings) and
# ``entropy`` (a policy loss: the runner also computes the policy's per-token entropy)
# and ``ratio`` (it weighs or clips the ratio ρ = π_θ/π_old, which is 1 at an update's first step)
LOSSES = LossSpec.variants = VariantKind("loss", LossSpec, mask=_response_mask, entropy=False, ratio=False)
FILTERS = FilterSpec.variants = VariantKind("filter", FilterSpec, group_based=False, drops_rows=True, refills=False)
advantage_variant = ADVANTAGES.declare
loss_variant = LOSSES.declare
filter_variant = FILTERS.declare


def Advantage(variant: str, /, **params: Any) -> AdvantageSpec:
    """``Advantage("group_norm")``: the advantage node of the named variant."""
    return ADVANTAGES.make(variant, **params)


def Loss(variant: str, /, **params: Any) -> LossSpec:
    """``Loss("clip", model="actor", eps=0.2)``: the loss node of the named variant."""
    return LOSSES.make(variant, **params)


def Filter(variant: str, /, **params: Any) -> FilterSpec:
    """``Filter("dynamic")``: the filter node of the named variant."""
    return FILTERS.make(variant, **params)


# --- the pipeline ------------------------------------------------------------------------------


class Eval(Spec):
    """Held-out evaluation: greedy accuracy of the trained policy under ``rule``."""

    every: int = Field(0, ge=0, description="evaluate every N steps (0: only before and after)")
    size: int = Field(500, ge=1, description="held-out rows (the built-in task has 500)")
    max_new_tokens: Optional[int] = Field(None, ge=1, description=_FROM_GENERATE.format("max_new_tokens"))
    rule: Optional[RuleFn] = Field(None, description="a response counts as correct when rule(response, row) > 0.5; "
                                   "default: the Score node's first rule, else the built-in data's rule")
    pairs: Optional[str] = Field(None, description="held-out preference pairs (builtin:arith or a jsonl) for the "
                                 "preference accuracy, when the training data are not pairs")


class Phase(Spec):
    """A stretch of steps in which only some models learn (e.g. value pretraining:
    ``Phase(steps=20, train=["critic"])``). Phases run first, in order; after them
    every trainable model learns."""

    steps: int = Field(ge=1)
    train: list[str]
    start: int = Field(0, ge=0, description="set by the pipeline: steps before this phase")


class Pipeline(Spec):
    """A whole algorithm: data, models, nodes and the optimisation schedule."""

    name: str
    description: str = ""
    data: DataSpec
    models: dict[str, Model]
    nodes: list[AnyNode]
    steps: int = Field(100, ge=1)
    ppo_epochs: int = Field(1, ge=1)
    mini_batches: int = Field(1, ge=1, description="optimizer steps per epoch; the batch is split into this many")
    seed: int = Field(0, ge=0, lt=2**32)
    eval: Optional[Eval] = Field(default_factory=Eval)
    save_every: int = Field(0, ge=0, description="checkpoint every N steps (0: only the final model)")
    max_skipped_steps: int = Field(3, ge=1, description="stop (with a checkpoint of the last finite weights) after this "
                                   "many steps in a row whose update was skipped for a non-finite loss or gradient")
    phases: list[Phase] = Field(default_factory=list)
    rollout_ahead: int = Field(0, ge=0, le=1, description="1: generate the next batch (from a copy of the policy taken "
                               "before this update) while the models train on this one; samples are then one iteration "
                               "stale, so the Generate node must recompute_logprobs, and a policy loss may correct the "
                               "mismatch with rollout_is. 0: generate, then train")
    concurrent_nodes: bool = Field(True, description="experience nodes with no path between them (Score, RefLogprob, "
                                   "Value after Generate) run at the same time, each in a thread")

    @model_validator(mode="after")
    def _phase_starts(self) -> "Pipeline":
        start = 0
        for ph in self.phases:
            object.__setattr__(ph, "start", start)
            start += ph.steps
        return self

    def training(self, model: str, step: int) -> bool:
        """Whether ``model`` learns at ``step`` (1-based), given the phases."""
        if not self.models[model].train:
            return False
        for ph in self.phases:
            if ph.start < step <= ph.start + ph.steps:
                return model in ph.train
        return True

    def shared_bases(self) -> dict[str, str]:
        """Frozen model -> the LoRA model whose base it is (``Model.base_of``; the first such
        model in declaration order): the engine runs each as that model with its adapter disabled."""
        out = {}
        for name, m in self.models.items():
            owner = next((o for o, other in self.models.items() if m.base_of(other)), None)
            if owner is not None:
                out[name] = owner
        return out

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise UnknownName("node", name, [n.name for n in self.nodes])

    def to_config(self) -> dict[str, Any]:
        """The pipeline as JSON-able data (config.json); :meth:`from_config` reads it back."""
        return self.model_dump(mode="json")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Pipeline":
        return cls.model_validate(config)

