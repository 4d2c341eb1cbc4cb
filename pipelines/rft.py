"""RFT — offline rejection-sampling fine-tuning (Yuan et al. 2023; DeepSeekMath §5.2.1).

Responses are sampled from a FROZEN copy of the initial (SFT) model, never from the
policy being trained; a rule keeps the correct ones (Filter "correct") and the actor
learns their likelihood (NLL, token-mean). The gradient coefficient of the unified view
is 1[o correct] on samples of π_sft. The paper samples a fixed dataset once; here the
frozen sampler draws fresh samples every step, from the same distribution. The model
evaluated (and saved in final/) is the trained actor, not the sampler. docs/algorithms.md.

    rlflow run pipelines/rft.py
    rlflow run pipelines/rft.py --set generate.n=16 --set filter.threshold=0.9
    rlflow compare pipelines/rft.py pipelines/online_rft.py
"""

from rlflow import Filter, Generate, Loss, Model, Pipeline, Prompts, Score
from rlflow.arith import MAX_NEW_TOKENS, exact_match

actor = Model("builtin:tiny-arith", train=True, lr=1e-4)

pipeline = Pipeline(
    name="rft",
    description="samples of the frozen initial model, kept when correct, NLL on them",
    data=Prompts("builtin:arith", batch_size=32),
    models={"actor": actor, "sampler": actor.frozen()},
    nodes=[
        Generate("sampler", n=8, max_new_tokens=MAX_NEW_TOKENS, temperature=1.0),
        Score(rule=exact_match),
        Filter("correct", threshold=0.5),  # exact_match is 0 or 1
        Loss("nll", model="actor", agg="token-mean"),
    ],
    steps=300,
)
