"""OPO — On-Policy RL with Optimal reward baseline (Hao et al. 2025, arXiv 2505.23585).

Strictly on-policy: one gradient step per batch of fresh samples, so the plain policy
gradient -A·log π is exact and needs no ratio or clip. The baseline of each sample is
its group's reward mean weighted by response length, b = Σ l_j R_j / Σ l_j, which
approximates the variance-minimising baseline. Token-mean, no KL, no reference model
(verl's opo recipe). docs/algorithms.md.

    rlflow run pipelines/opo.py
    rlflow run pipelines/opo.py --set generate.n=16 --set loss.agg=seq-mean-token-sum
"""

from rlflow import Advantage, Generate, Loss, Model, Pipeline, Prompts, Score
from rlflow.arith import MAX_NEW_TOKENS, exact_match

actor = Model("builtin:tiny-arith", train=True, lr=1e-4)

pipeline = Pipeline(
    name="opo",
    description="length-weighted group baseline, strictly on-policy policy gradient",
    data=Prompts("builtin:arith", batch_size=32),
    models={"actor": actor},
    nodes=[
        Generate("actor", n=8, max_new_tokens=MAX_NEW_TOKENS, temperature=1.0),
        Score(rule=exact_match),
        Advantage("opo"),
        Loss("pg", model="actor", agg="token-mean"),
    ],
    steps=300,  # ppo_epochs = mini_batches = 1: one update per batch, the paper's exact on-policy setting
)
