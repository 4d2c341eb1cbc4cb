"""rlflow: RLHF post-training pipelines as small declarative graphs.

A pipeline file imports its building blocks from here. Importing this package loads no
model and no torch, so ``rlflow validate`` stays fast.
"""

from rlflow.spec import (
    Advantage,
    Demonstrations,
    Eval,
    Filter,
    Generate,
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
    node_kind,
)

__all__ = [
    "Advantage", "Demonstrations", "Eval", "Filter", "Generate", "Loss", "Model", "Pairs", "Phase", "Pipeline", "Prompts",
    "RefLogprob", "Rule", "Score", "Value", "node_kind",
]
__version__ = "0.1.0"
