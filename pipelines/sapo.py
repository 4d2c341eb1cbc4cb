"""SAPO — Soft Adaptive Policy Optimization (Gao et al. 2025, arXiv 2511.20347).

GRPO's group-normalised advantages with a soft gate instead of the hard clip: each token's
gradient is weighted by sech²(τ(ρ-1)/2), 1 on-policy and decaying smoothly as the ratio
leaves 1, faster for negative advantages (τ_neg = 1.05 > τ_pos = 1.0, the paper's).
seq-mean-token-mean, no KL, no reference model. The batch is split into 2 mini-batches
so that the ratio leaves 1 and the gate acts (with 4 it overshoots here: docs/algorithms.md).

    rlflow run pipelines/sapo.py
    rlflow run pipelines/sapo.py --set loss.tau_neg=2.0 --set pipeline.mini_batches=4
"""

from rlflow import Advantage, Generate, Loss, Model, Pipeline, Prompts, Score
from rlflow.arith import MAX_NEW_TOKENS, exact_match

actor = Model("builtin:tiny-arith", train=True, lr=1e-4)

pipeline = Pipeline(
    name="sapo",
    description="group-normalised advantages, soft sech² gate on the ratio instead of the clip",
    data=Prompts("builtin:arith", batch_size=32),
    models={"actor": actor},
    nodes=[
        Generate("actor", n=8, max_new_tokens=MAX_NEW_TOKENS, temperature=1.0),
        Score(rule=exact_match),
        Advantage("group_norm", eps=1e-6),
        Loss("sapo", model="actor", tau_pos=1.0, tau_neg=1.05, agg="seq-mean-token-mean"),
    ],
    steps=300,
    mini_batches=2,  # a second, off-policy update per batch, so that the gate has a ratio to act on
)
