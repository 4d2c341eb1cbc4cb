"""ReMax (Li et al. 2023, arXiv 2310.10505): REINFORCE with the greedy response as baseline.

For every prompt one sampled and one greedy response; both are scored by the same rule,
and the advantage is r(sample) - r(greedy), the same for every token. On-policy
REINFORCE as in the paper: the plain policy-gradient loss -A·log π (no ratio, no clip,
no critic), token sum per sequence, one update per batch. ALGORITHMS.md §6.5.

    rlflow run pipelines/remax.py
    rlflow run pipelines/remax.py --set generate.n=2
"""

from rlflow import Advantage, Generate, Loss, Model, Pipeline, Prompts, Score
from rlflow.arith import MAX_NEW_TOKENS, exact_match

actor = Model("builtin:tiny-arith", train=True, lr=1e-4)

pipeline = Pipeline(
    name="remax",
    description="greedy-response baseline: A = r(sample) - r(greedy), REINFORCE (token sum)",
    data=Prompts("builtin:arith", batch_size=128),
    models={"actor": actor},
    nodes=[
        Generate("actor", n=1, max_new_tokens=MAX_NEW_TOKENS, temperature=1.0, greedy_baseline=True),
        Score(rule=exact_match, score_greedy=True),
        Advantage("greedy_baseline"),
        Loss("pg", model="actor", agg="seq-mean-token-sum"),
    ],
    steps=300,
)
