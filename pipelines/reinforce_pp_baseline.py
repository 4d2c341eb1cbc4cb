"""REINFORCE++-baseline (Hu et al. 2025, arXiv 2501.03262): the variant for reasoning tasks.

Several samples per prompt; each reward minus its group's mean (no group std), broadcast
to the tokens and then whitened over every valid token of the whole batch (the paper's
global normalisation); the clipped surrogate, token-mean, with a k2 KL to the reference
in the LOSS (not in the reward). β = 1e-5 as OpenRLHF's reference script. The batch is
split into 4 mini-batches, as OpenRLHF trains, so that the clip acts. ALGORITHMS.md §6.3.

    rlflow run pipelines/reinforce_pp_baseline.py
    rlflow run pipelines/reinforce_pp_baseline.py --set loss.kl_coef=0.001 --set generate.n=16
"""

from rlflow import Advantage, Generate, Loss, Model, Pipeline, Prompts, RefLogprob, Score
from rlflow.arith import MAX_NEW_TOKENS, exact_match

actor = Model("builtin:tiny-arith", train=True, lr=1e-4)

pipeline = Pipeline(
    name="reinforce_pp_baseline",
    description="group-mean baseline, global whitening, clipped loss with k2 KL in the loss",
    data=Prompts("builtin:arith", batch_size=32),
    models={"actor": actor, "ref": actor.frozen()},
    nodes=[
        Generate("actor", n=8, max_new_tokens=MAX_NEW_TOKENS, temperature=1.0),
        Score(rule=exact_match),
        RefLogprob("ref"),
        Advantage("group_center", whiten=True),
        Loss("clip", model="actor", eps=0.2, kl_coef=1e-5, kl="k2", agg="token-mean"),
    ],
    steps=300,
    mini_batches=4,  # OpenRLHF: several optimizer steps per rollout batch
)
