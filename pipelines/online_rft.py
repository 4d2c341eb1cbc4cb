"""Online RFT — rejection-sampling fine-tuning on the current policy's own samples
(DeepSeekMath §5.2.1; RAFT, Dong et al. 2023, without its best-of-K ranking).

Each step samples from the policy being trained, a rule keeps the correct responses
(Filter "correct") and the policy learns their likelihood (NLL, token-mean): the
unified view's gradient coefficient 1[o correct] on samples of π_θ. It differs from
rft.py only in who samples. docs/algorithms.md.

    rlflow run pipelines/online_rft.py
    rlflow run pipelines/online_rft.py --set generate.n=16 --set actor.lr=3e-4
    rlflow compare pipelines/rft.py pipelines/online_rft.py
"""

from rlflow import Filter, Generate, Loss, Model, Pipeline, Prompts, Score
from rlflow.arith import MAX_NEW_TOKENS, exact_match

actor = Model("builtin:tiny-arith", train=True, lr=1e-4)

pipeline = Pipeline(
    name="online_rft",
    description="samples of the current policy, kept when correct, NLL on them",
    data=Prompts("builtin:arith", batch_size=32),
    models={"actor": actor},
    nodes=[
        Generate("actor", n=8, max_new_tokens=MAX_NEW_TOKENS, temperature=1.0),
        Score(rule=exact_match),
        Filter("correct", threshold=0.5),  # exact_match is 0 or 1
        Loss("nll", model="actor", agg="token-mean"),
    ],
    steps=300,
)
