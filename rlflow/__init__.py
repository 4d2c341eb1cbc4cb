"""rlflow: RLHF post-training pipelines as small declarative graphs.

A pipeline file imports its building blocks from here. Importing this package loads the
node library (whose modules declare the Advantage, Loss and Filter variants) but no
model and no torch, so ``rlflow validate`` stays fast.
"""

from rlflow.spec import (
    Advantage,
    Demonstrations,
    Eval,
    Filter,
    Generate,
    LoRA,
    Loss,
    Model,
    Pairs,
    Phase,
    Pipeline,
    Prompts,
    RefLogprob,
    Rule,
    Score,
    Value,
    advantage_variant,
    filter_variant,
    loss_variant,
    node_kind,
)

import rlflow.nodes  # noqa: E402,F401  (registers every shipped node runner and variant)

__all__ = [
    "Advantage", "Demonstrations", "Eval", "Filter", "Generate", "LoRA", "Loss", "Model", "Pairs", "Phase", "Pipeline", "Prompts",
    "RefLogprob", "Rule", "Score", "Value", "advantage_variant", "filter_variant", "loss_variant", "node_kind",
]
__version__ = "0.1.0"
