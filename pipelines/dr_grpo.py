"""Dr. GRPO — GRPO Done Right (Liu et al. 2025, arXiv 2503.20783).

GRPO without its two biases: the advantage is only mean-centred in the group (no std
division), and the loss divides each sequence's token sum by a constant C (the maximum
generation length) instead of its own length (seq-mean-token-sum-norm). No KL, no
reference model. ALGORITHMS.md §5.

    rlflow run pipelines/dr_grpo.py
    rlflow run pipelines/dr_grpo.py --set generate.n=16 --set loss.agg_constant=8
    rlflow compare pipelines/grpo.py pipelines/dr_grpo.py
"""

from rlflow import Advantage, Generate, Loss, Model, Pipeline, Prompts, Score
from rlflow.arith import MAX_NEW_TOKENS, exact_match

actor = Model("builtin:tiny-arith", train=True, lr=1e-4)

pipeline = Pipeline(
    name="dr_grpo",
    description="group-centred advantages (no std), constant length normaliser, no KL",
    data=Prompts("builtin:arith", batch_size=32),
    models={"actor": actor},
    nodes=[
        Generate("actor", n=8, max_new_tokens=MAX_NEW_TOKENS, temperature=1.0),
        Score(rule=exact_match),
        Advantage("group_center"),
        Loss("clip", model="actor", eps=0.2, agg="seq-mean-token-sum-norm"),  # C = max_new_tokens
    ],
    steps=300,
)
