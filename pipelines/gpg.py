"""GPG — Group Policy Gradient (Chu et al. 2025, arXiv 2504.02546).

The plainest group method: the reward minus its group's mean (no std), scaled by B'/M so
that the rows whose advantage is 0 (groups that are all right or all wrong) do not dilute
the batch mean, and the vanilla policy gradient -A·log π with no ratio, no clip, no KL,
no reference model and no critic. Token-mean; one update per batch. docs/algorithms.md.

    rlflow run pipelines/gpg.py
    rlflow run pipelines/gpg.py --set generate.n=16 --set loss.entropy_coef=0.001
"""

from rlflow import Advantage, Generate, Loss, Model, Pipeline, Prompts, Score
from rlflow.arith import MAX_NEW_TOKENS, exact_match

actor = Model("builtin:tiny-arith", train=True, lr=1e-4)

pipeline = Pipeline(
    name="gpg",
    description="group-centred advantages rescaled by B'/M, vanilla policy gradient, no KL",
    data=Prompts("builtin:arith", batch_size=32),
    models={"actor": actor},
    nodes=[
        Generate("actor", n=8, max_new_tokens=MAX_NEW_TOKENS, temperature=1.0),
        Score(rule=exact_match),
        Advantage("gpg"),
        Loss("pg", model="actor", agg="token-mean"),
    ],
    steps=300,
)
