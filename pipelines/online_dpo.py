"""Online DPO (OAIF, Guo et al. 2024, arXiv 2402.04792), in the paper's form.

Each step samples TWO responses per prompt from the current policy; the rule (the
paper's annotator) picks the preferred one, and a tie is broken, not dropped: the first
sample is chosen (as TRL does). The DPO loss against the frozen reference follows.
ALGORITHMS.md §9.2.

The option: best-vs-worst of n samples, tied groups dropped and counted
(Filter("pairs", ties="drop")), which gives every prompt a decisive pair more often:

    rlflow run pipelines/online_dpo.py
    rlflow run pipelines/online_dpo.py --set generate.n=4 --set filter.ties=drop
"""

from rlflow import Eval, Filter, Generate, Loss, Model, Pipeline, Prompts, RefLogprob, Score
from rlflow.arith import MAX_NEW_TOKENS, exact_match

actor = Model("builtin:tiny-arith", train=True, lr=1e-4)

pipeline = Pipeline(
    name="online_dpo",
    description="two samples of the current policy, the rule picks the preferred one, DPO loss",
    data=Prompts("builtin:arith", batch_size=64),  # 128 samples a step: a tied pair is noise, more pairs average it
    models={"actor": actor, "ref": actor.frozen()},
    nodes=[
        Generate("actor", n=2, max_new_tokens=MAX_NEW_TOKENS, temperature=0.9),  # TRL's default
        Score(rule=exact_match),
        Filter("pairs", ties="first"),  # ties broken: the first sample is chosen
        RefLogprob("ref"),
        Loss("dpo", model="actor", beta=0.1),
    ],
    steps=200,
    eval=Eval(pairs="builtin:arith"),  # also the preference accuracy on held-out pairs
)
