"""Online DPO (OAIF, Guo et al. 2024, arXiv 2402.04792).

Each step samples responses from the current policy, scores them with the rule, and
pairs the best against the worst of each prompt (groups whose scores tie are dropped
and counted); the DPO loss against the frozen reference follows. ALGORITHMS.md §9.2.

    rlflow run pipelines/online_dpo.py
    rlflow run pipelines/online_dpo.py --set generate.n=2
"""

from rlflow import Eval, Filter, Generate, Loss, Model, Pipeline, Prompts, RefLogprob, Score
from rlflow.arith import MAX_NEW_TOKENS, exact_match

actor = Model("builtin:tiny-arith", train=True, lr=1e-4)

pipeline = Pipeline(
    name="online_dpo",
    description="sample n, pair best vs worst by score, DPO loss against the reference",
    data=Prompts("builtin:arith", batch_size=32),
    models={"actor": actor, "ref": actor.frozen()},
    nodes=[
        Generate("actor", n=4, max_new_tokens=MAX_NEW_TOKENS, temperature=1.0),
        Score(rule=exact_match),
        Filter("pairs"),
        RefLogprob("ref"),
        Loss("dpo", model="actor", beta=0.1),
    ],
    steps=200,
    eval=Eval(pairs="builtin:arith"),  # also the preference accuracy on held-out pairs
)
