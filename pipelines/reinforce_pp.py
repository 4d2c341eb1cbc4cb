"""REINFORCE++ (Hu et al. 2025, arXiv 2501.03262).

No critic and no group baseline: the per-token reward (score on the last token minus a
k1 KL to the reference on every token) is summed into a reward-to-go, then whitened over
every valid token of the whole batch (global normalisation is the paper's point); the
loss is PPO's clipped surrogate, token-mean, over 4 mini-batches per batch (the paper
keeps PPO's clip and mini-batch updates; with one update per batch the clip could never
bind and this would be REINFORCE with global normalisation). ALGORITHMS.md §6.2.

    rlflow run pipelines/reinforce_pp.py
    rlflow run pipelines/reinforce_pp.py --set advantage.kl_coef=0.001
"""

from rlflow import Advantage, Generate, Loss, Model, Pipeline, Prompts, RefLogprob, Score
from rlflow.arith import MAX_NEW_TOKENS, exact_match

actor = Model("builtin:tiny-arith", train=True, lr=1e-4)

pipeline = Pipeline(
    name="reinforce_pp",
    description="k1 KL per token in the reward, reward-to-go, global whitening, clipped loss",
    data=Prompts("builtin:arith", batch_size=64),
    models={"actor": actor, "ref": actor.frozen()},
    nodes=[
        Generate("actor", n=4, max_new_tokens=MAX_NEW_TOKENS, temperature=1.0),
        Score(rule=exact_match),
        RefLogprob("ref"),
        Advantage("reward_to_go", gamma=1.0, whiten=True, kl_coef=0.01, kl="k1"),
        Loss("clip", model="actor", eps=0.2, agg="token-mean"),
    ],
    steps=300,
    mini_batches=4,  # several optimizer steps per batch (OpenRLHF), so the ratio leaves 1 and the clip acts
)
