"""RLOO — REINFORCE Leave-One-Out (Ahmadian et al. 2024, arXiv 2402.14740).

k samples per prompt; each sample's baseline is the mean reward of the other k-1; the
sequence KL to the reference (k1, summed) is subtracted from the reward before the
baseline. The paper's update is on-policy REINFORCE with a token SUM per sequence: the
plain policy-gradient loss -A·log π (no ratio, no clip), seq-mean-token-sum, one update
per batch. ALGORITHMS.md §3.1.

    rlflow run pipelines/rloo.py
    rlflow run pipelines/rloo.py --set generate.n=2 --set advantage.kl_coef=0
"""

from rlflow import Advantage, Generate, Loss, Model, Pipeline, Prompts, RefLogprob, Score
from rlflow.arith import MAX_NEW_TOKENS, exact_match

actor = Model("builtin:tiny-arith", train=True, lr=1e-4)

pipeline = Pipeline(
    name="rloo",
    description="leave-one-out baseline, sequence KL in the reward, REINFORCE (token sum)",
    data=Prompts("builtin:arith", batch_size=32),
    models={"actor": actor, "ref": actor.frozen()},
    nodes=[
        Generate("actor", n=4, max_new_tokens=MAX_NEW_TOKENS, temperature=1.0),
        Score(rule=exact_match),
        RefLogprob("ref"),
        Advantage("rloo", kl_coef=0.05, kl="k1"),
        Loss("pg", model="actor", agg="seq-mean-token-sum"),
    ],
    steps=300,
)
