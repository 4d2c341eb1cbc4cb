"""The spec layer: what a pipeline file declares, as validated pydantic models.

Pure data. No torch import, cheap to build, serialisable to a run's ``config.json``.
Every model forbids unknown keys, so a misspelt parameter fails instead of vanishing.
Each node kind declares the columns it reads and writes (with their level), and the
graph layer wires the pipeline from those declarations alone.

Column levels:
    seq     one value per row                      [B]
    token   one value per response token           [B, T]
    prompt  one value per prompt token             [B, P]
    text    a Python object per row (str, ...)     list of length B
"""

from __future__ import annotations

import importlib
from typing import Annotated, Any, Callable, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, model_validator

from rlflow.registry import Registry

Level = Literal["seq", "token", "prompt", "text"]
AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
KlEstimator = Literal["k1", "k2", "k3"]


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, arbitrary_types_allowed=True)


# --- rule functions ----------------------------------------------------------------------


def _import_callable(ref: Any) -> Any:
    """Accept a callable, or a "module:attr" string naming one (as written in config.json)."""
    if callable(ref) or not isinstance(ref, str):
        return ref
    module, _, attr = ref.partition(":")
    if not attr:
        raise ValueError(f"a rule given by name must look like 'package.module:function', got {ref!r}")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _callable_name(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"


RuleFn = Annotated[Callable[..., float], BeforeValidator(_import_callable), PlainSerializer(_callable_name)]


class Rule(Spec):
    """One weighted term of a rule reward: ``weight * fn(response_text, row) -> float``."""

    fn: RuleFn
    weight: float = 1.0


# --- models and data -----------------------------------------------------------------------


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
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(0, ge=0)
    grad_clip: Optional[float] = Field(1.0, gt=0)
    zero_stage: Literal[0, 1, 2, 3] = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    offload: bool = False
    micro_batch_size: Optional[int] = Field(None, ge=1, description="rows per forward/backward; None = whole mini-batch")

    def __init__(self, path: Optional[str] = None, /, **kw: Any):
        if path is not None:
            kw["path"] = path
        super().__init__(**kw)

    def frozen(self) -> "Model":
        """The same weights as a frozen model (e.g. the reference policy)."""
        return self.model_copy(update={"train": False})

    def critic(self, **kw: Any) -> "Model":
        """A trainable critic with a value head on this model's backbone."""
        return Model(**{**self.model_dump(), "head": "value", "train": True, **kw})


class DataSource(Spec):
    source: str
    batch_size: int = Field(16, ge=1, description="prompts (or pairs) per iteration")
    eval_source: Optional[str] = Field(None, description="held-out rows (jsonl); built-in data has its own eval split")
    kind: ClassVar[str]

    def __init__(self, source: Optional[str] = None, /, **kw: Any):
        if source is not None:
            kw["source"] = source
        super().__init__(**kw)

    def writes(self) -> dict[str, Level]:
        return {"prompt": "text", "answer": "text", "prompt_ids": "prompt", "prompt_mask": "prompt", "group": "seq"}


class Prompts(DataSource):
    """Prompts with reference answers: ``builtin:arith``, a ``.jsonl`` file or a saved ``datasets`` dataset."""

    kind: ClassVar[str] = "prompts"
    prompt_field: str = "prompt"
    answer_field: str = "answer"


class Demonstrations(DataSource):
    """Prompt + completion rows for supervised fine-tuning (``builtin:arith`` or jsonl)."""

    kind: ClassVar[str] = "demonstrations"
    prompt_field: str = "prompt"
    completion_field: str = "completion"

    def writes(self) -> dict[str, Level]:
        return {**super().writes(), "response_ids": "token", "response_mask": "token", "response": "text"}


class Pairs(DataSource):
    """Preference pairs (prompt, chosen, rejected): two rows per pair sharing ``group``."""

    kind: ClassVar[str] = "pairs"
    prompt_field: str = "prompt"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"

    def writes(self) -> dict[str, Level]:
        return {**super().writes(), "response_ids": "token", "response_mask": "token", "response": "text", "chosen": "seq"}


DataSpec = Union[Prompts, Demonstrations, Pairs]


# --- nodes -----------------------------------------------------------------------------------

NODE_KINDS: Registry[type["Node"]] = Registry("node kind")


class Node(Spec):
    """A node of the graph: what it reads and writes, and which models it uses.

    ``stage`` is "experience" (runs once per batch, in graph order) or "update"
    (runs per micro-batch inside the optimisation loop: the Loss nodes).
    """

    kind: ClassVar[str]
    stage: ClassVar[Literal["experience", "update"]] = "experience"
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

    def params(self) -> dict[str, Any]:
        """The node's parameters (for display and comparison): every field but ``name``."""
        return self.model_dump(exclude={"name"})


def node_kind(cls: type["Node"]) -> type["Node"]:
    """Register a node spec class under its ``kind`` (use it to add your own node kinds)."""
    NODE_KINDS.register(cls.kind)(cls)
    return cls


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


@node_kind
class Generate(ModelNode):
    """Sample ``n`` responses per prompt from ``model`` (its own weights, with a KV cache)."""

    kind: ClassVar[str] = "generate"
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
    score_greedy: bool = False

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


@node_kind
class RefLogprob(ModelNode):
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


# --- Advantage: one spec class per variant, discriminated by ``variant`` ---------------------

ADVANTAGE_VARIANTS: Registry[type["AdvantageSpec"]] = Registry("advantage variant")


class AdvantageSpec(Node):
    """Common to every advantage variant: optional KL in the reward, optional whitening.

    ``kl_coef > 0`` subtracts ``kl_coef * k`` (estimator ``kl``, from the old vs the
    reference log-probs) from the reward, per token or summed per sequence
    (ALGORITHMS.md §0.3, placement 1).
    """

    kind: ClassVar[str] = "advantage"
    group_based: ClassVar[bool] = False
    variant: str
    kl_coef: float = Field(0.0, ge=0)
    kl: KlEstimator = "k1"
    whiten: bool = False

    def reads(self):
        out: dict[str, Level] = {"rewards": "seq", "response_mask": "token", "group": "seq"}
        if self.kl_coef > 0:
            out |= {"old_logprobs": "token", "ref_logprobs": "token"}
        return out

    def writes(self):
        return {"advantages": "token"}


def _advantage(cls):
    ADVANTAGE_VARIANTS.register(cls.model_fields["variant"].default)(cls)
    return cls


@_advantage
class Gae(AdvantageSpec):
    """GAE with decoupled λ (VC-PPO) and optional length-adaptive λ (VAPO); writes returns."""

    variant: Literal["gae"] = "gae"
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    lambda_critic: Optional[float] = Field(None, ge=0, le=1)
    length_alpha: Optional[float] = Field(None, gt=0)
    whiten: bool = True

    def reads(self):
        return {**super().reads(), "values": "token"}

    def writes(self):
        return {"advantages": "token", "returns": "token"}


@_advantage
class GroupNorm(AdvantageSpec):
    """GRPO: (R - group mean) / (group std + eps)."""

    group_based: ClassVar[bool] = True
    variant: Literal["group_norm"] = "group_norm"
    eps: float = Field(1e-6, gt=0)


@_advantage
class GroupCenter(AdvantageSpec):
    """Dr. GRPO: R - group mean (with whiten=True: REINFORCE++-baseline)."""

    group_based: ClassVar[bool] = True
    variant: Literal["group_center"] = "group_center"


@_advantage
class Rloo(AdvantageSpec):
    """RLOO: R minus the mean of the other samples of the same prompt."""

    group_based: ClassVar[bool] = True
    variant: Literal["rloo"] = "rloo"


@_advantage
class GreedyBaseline(AdvantageSpec):
    """ReMax: R minus the reward of the greedy response to the same prompt."""

    variant: Literal["greedy_baseline"] = "greedy_baseline"

    def reads(self):
        return {**super().reads(), "baseline_rewards": "seq"}


@_advantage
class RewardToGo(AdvantageSpec):
    """REINFORCE++: discounted reward-to-go of the token rewards, globally whitened."""

    variant: Literal["reward_to_go"] = "reward_to_go"
    gamma: float = Field(1.0, ge=0, le=1)
    whiten: bool = True


def Advantage(variant: str, **params: Any) -> AdvantageSpec:
    """``Advantage("group_norm")``: the advantage node of the named variant."""
    return ADVANTAGE_VARIANTS[variant](**params)


# --- Loss: one spec class per variant -------------------------------------------------------

LOSS_VARIANTS: Registry[type["LossSpec"]] = Registry("loss variant")


class LossSpec(Node):
    """A loss term on a trainable model; terms on the same model are summed.

    ``agg`` is the aggregation mode of ALGORITHMS.md §0.4, taken over the whole
    mini-batch (Part A §3). ``agg_constant`` is C of ``seq-mean-token-sum-norm``
    (default: the Generate node's ``max_new_tokens``).
    """

    kind: ClassVar[str] = "loss"
    stage: ClassVar[Literal["experience", "update"]] = "update"
    needs: ClassVar[str] = "logprobs"
    variant: str
    model: str = "actor"
    coef: float = Field(1.0, description="weight of this term in the model's summed loss")
    mask: str = Field("response_mask", description="token mask of the loss (e.g. 'loss_mask' from Filter('overlong'))")

    def reads(self):
        return {**_PROMPT, **_RESPONSE, self.mask: "token"}

    def model_refs(self):
        return {"model": self.model}

    def fn_params(self) -> dict[str, Any]:
        """Keyword arguments of the variant's loss function."""
        return self.model_dump(exclude={"name", "variant", "model", "coef", "mask"})


def _loss(cls):
    LOSS_VARIANTS.register(cls.model_fields["variant"].default)(cls)
    return cls


class _PolicyLoss(LossSpec):
    dual_clip: Optional[float] = Field(None, gt=1)
    kl_coef: float = Field(0.0, ge=0)
    kl: KlEstimator = "k3"
    agg: AggMode = "token-mean"
    agg_constant: Optional[float] = Field(None, gt=0)

    def reads(self):
        out = {**super().reads(), "old_logprobs": "token", "advantages": "token"}
        if self.kl_coef > 0:
            out["ref_logprobs"] = "token"
        return out

    def fn_params(self):
        return {k: v for k, v in super().fn_params().items() if k != "agg_constant"}


@_loss
class Clip(_PolicyLoss):
    """PPO clipped surrogate, symmetric ε (§0.2), optional dual-clip and KL in the loss."""

    variant: Literal["clip"] = "clip"
    eps: float = Field(0.2, gt=0)


@_loss
class ClipHigher(_PolicyLoss):
    """DAPO clip-higher: ε_low / ε_high (§7.2)."""

    variant: Literal["clip_higher"] = "clip_higher"
    eps_low: float = Field(0.2, gt=0)
    eps_high: float = Field(0.28, gt=0)


@_loss
class ValueLoss(LossSpec):
    """Clipped value loss (§1.4) for a critic."""

    needs: ClassVar[str] = "values"
    variant: Literal["value"] = "value"
    model: str = "critic"
    eps_v: float = Field(0.5, gt=0)
    agg: AggMode = "token-mean"

    def reads(self):
        return {**super().reads(), "values": "token", "returns": "token"}


@_loss
class Nll(LossSpec):
    """Next-token NLL on the response tokens (SFT; VAPO's positive-example LM loss with where='correct')."""

    variant: Literal["nll"] = "nll"
    agg: AggMode = "token-mean"
    where: Literal["all", "correct"] = "all"

    def reads(self):
        return {**super().reads(), **({"rewards": "seq"} if self.where == "correct" else {})}


@_loss
class Dpo(LossSpec):
    """DPO sigmoid loss on summed log-probs (label smoothing = cDPO; ipo=True for IPO)."""

    variant: Literal["dpo"] = "dpo"
    beta: float = Field(0.1, gt=0)
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    ipo: bool = False

    def reads(self):
        return {**super().reads(), "ref_logprobs": "token", "group": "seq", "chosen": "seq"}


@_loss
class BradleyTerry(LossSpec):
    """Pairwise reward-model loss -log σ(s_chosen - s_rejected)."""

    needs: ClassVar[str] = "scores"
    variant: Literal["bradley_terry"] = "bradley_terry"
    model: str = "rm"

    def reads(self):
        return {**super().reads(), "group": "seq", "chosen": "seq"}


def Loss(variant: str, **params: Any) -> LossSpec:
    """``Loss("clip", model="actor", eps=0.2)``: the loss node of the named variant."""
    return LOSS_VARIANTS[variant](**params)


# --- Filter: one spec class per variant -------------------------------------------------------

FILTER_VARIANTS: Registry[type["FilterSpec"]] = Registry("filter variant")


class FilterSpec(Node):
    """A filter. ``drops_rows`` filters remove rows: every experience node that does not
    feed such a filter runs after it, on the kept rows only."""

    kind: ClassVar[str] = "filter"
    drops_rows: ClassVar[bool] = True
    variant: str


def _filter(cls):
    FILTER_VARIANTS.register(cls.model_fields["variant"].default)(cls)
    return cls


@_filter
class DynamicSampling(FilterSpec):
    """DAPO dynamic sampling (§7.2): keep a group iff the spread (population std) of its
    ``metric`` exceeds ``tolerance``; the engine re-runs the nodes upstream on fresh
    prompts until ``target_groups`` groups are kept (default: the data batch size), at
    most ``max_rounds`` rounds, then truncates to the target. Running out of rounds is an
    error that names the counts, or with ``allow_short=True`` a short batch that is logged.
    """

    variant: Literal["dynamic"] = "dynamic"
    metric: str = "rewards"
    tolerance: float = Field(1e-6, ge=0)
    target_groups: Optional[int] = Field(None, ge=1)
    max_rounds: int = Field(10, ge=1)
    allow_short: bool = False

    def reads(self):
        return {self.metric: "seq", "group": "seq"}


@_filter
class Overlong(FilterSpec):
    """Overlong filtering (DAPO §3.4, TRL ``mask_truncated_completions``): truncated
    responses keep their rows (and their place in group statistics) but are masked out of
    the loss: writes ``loss_mask`` = response_mask with truncated rows zeroed. Point a
    Loss at it with ``Loss(..., mask="loss_mask")``."""

    drops_rows: ClassVar[bool] = False
    variant: Literal["overlong"] = "overlong"

    def reads(self):
        return {"response_mask": "token", "truncated": "seq"}

    def writes(self):
        return {"loss_mask": "token"}


@_filter
class BestWorstPairs(FilterSpec):
    """Online DPO pairing (§9.2): per group keep the best- and the worst-scored response as
    a chosen/rejected pair; groups whose best and worst scores tie are dropped and counted."""

    variant: Literal["pairs"] = "pairs"

    def reads(self):
        return {"rewards": "seq", "group": "seq"}

    def writes(self):
        return {"chosen": "seq"}


def Filter(variant: str, **params: Any) -> FilterSpec:
    """``Filter("dynamic")``: the filter node of the named variant."""
    return FILTER_VARIANTS[variant](**params)


# --- the pipeline ------------------------------------------------------------------------------


class Eval(Spec):
    """Held-out evaluation: greedy accuracy of the trained policy under the Score rules."""

    every: int = Field(0, ge=0, description="evaluate every N steps (0: only before and after)")
    size: int = Field(500, ge=1, description="held-out rows (the built-in task has 500)")
    max_new_tokens: Optional[int] = Field(None, ge=1, description="default: the Generate node's")
    pairs: Optional[str] = Field(None, description="held-out preference pairs (builtin:arith or a jsonl) for the "
                                 "preference accuracy, when the training data are not pairs")
    rule: Optional[RuleFn] = Field(None, description="default: the Score node's first rule, else the built-in data's rule")


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
    nodes: list[Node]
    steps: int = Field(100, ge=1)
    ppo_epochs: int = Field(1, ge=1)
    mini_batches: int = Field(1, ge=1, description="optimizer steps per epoch; the batch is split into this many")
    seed: int = 0
    eval: Optional[Eval] = Field(default_factory=Eval)
    save_every: int = Field(0, ge=0, description="checkpoint every N steps (0: only the final model)")
    phases: list[Phase] = Field(default_factory=list)

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

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        known = [n.name for n in self.nodes]
        from rlflow.registry import UnknownName

        raise UnknownName("node", name, known)

    def to_config(self) -> dict[str, Any]:
        """The resolved pipeline as JSON-able data (for config.json)."""
        out = self.model_dump(mode="json", exclude={"nodes", "data"})
        out["data"] = {"kind": self.data.kind, **self.data.model_dump(mode="json")}
        out["nodes"] = [{"kind": n.kind, **n.model_dump(mode="json")} for n in self.nodes]
        return out
