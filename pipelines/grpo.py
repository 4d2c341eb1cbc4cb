"""GRPO — Group Relative Policy Optimization (DeepSeekMath, arXiv 2402.03300).

Samples a group of G responses per prompt, normalises each reward by its group's mean
and std (no critic), and takes a clipped policy-gradient step with a k3 KL penalty to
the reference model in the LOSS, averaged per sequence then over sequences
(seq-mean-token-mean), as the paper writes it. ALGORITHMS.md §4.

Trains the built-in tiny model on two-digit addition, on a CPU in a few minutes:

    rlflow run pipelines/grpo.py
    rlflow run pipelines/grpo.py --steps 50 --set generate.n=16 --set loss.kl_coef=0
"""

from rlflow import Advantage, Generate, Loss, Model, Pipeline, Prompts, RefLogprob, Score
from rlflow.arith import MAX_NEW_TOKENS, exact_match

actor = Model("builtin:tiny-arith", train=True, lr=1e-4)  # 1e-4 learns here; 5e-4 collapses

pipeline = Pipeline(
    name="grpo",
    description="group-normalised advantages, clipped loss, k3 KL in the loss (DeepSeekMath)",
    data=Prompts("builtin:arith", batch_size=32),
    models={"actor": actor, "ref": actor.frozen()},
    nodes=[
        Generate("actor", n=8, max_new_tokens=MAX_NEW_TOKENS, temperature=1.0),
        Score(rule=exact_match),
        RefLogprob("ref"),
        Advantage("group_norm", eps=1e-6),
        Loss("clip", model="actor", eps=0.2, kl_coef=0.04, kl="k3", agg="seq-mean-token-mean"),
    ],
    steps=300,
)
