"""PPO — token-level GAE with a learned critic and KL in the reward (InstructGPT lineage).

A critic (the actor's backbone with a scalar head) values every prefix; the reward sits
on the last token, minus a per-token k1 KL to the reference; GAE(γ=1, λ=0.95) gives the
advantages, whitened over the batch; the actor takes clipped steps (token-mean) and the
critic a clipped value loss. ALGORITHMS.md §1.

    rlflow run pipelines/ppo.py
    rlflow run pipelines/ppo.py --set advantage.lam=1.0 --set pipeline.ppo_epochs=1
    rlflow run pipelines/ppo.py --set advantage.kl_target=0.1   # adaptive β (Ziegler et al. 2019), from 0.01

To score with the reward model that pipelines/reward_model.py trained instead of the
rule, declare it and point Score at it (rules and a model add up when both are given):
    models={..., "rm": Model("runs/<rm-run>/final", head="reward", reward_from="likelihood")}
    Score(model="rm")
"""

from rlflow import Advantage, Generate, Loss, Model, Pipeline, Prompts, RefLogprob, Score, Value
from rlflow.arith import MAX_NEW_TOKENS, exact_match

actor = Model("builtin:tiny-arith", train=True, lr=1e-4)

pipeline = Pipeline(
    name="ppo",
    description="GAE advantages from a learned critic, k1 KL in the reward, clipped loss",
    data=Prompts("builtin:arith", batch_size=128),
    models={"actor": actor, "ref": actor.frozen(), "critic": actor.critic(lr=3e-4)},
    nodes=[
        Generate("actor", n=1, max_new_tokens=MAX_NEW_TOKENS, temperature=1.0),
        Score(rule=exact_match),
        RefLogprob("ref"),
        Value("critic"),
        Advantage("gae", gamma=1.0, lam=0.95, whiten=True, kl_coef=0.01, kl="k1"),
        Loss("clip", model="actor", eps=0.2, agg="token-mean"),
        Loss("value", model="critic", eps_v=0.2, agg="token-mean", name="value_loss"),
    ],
    steps=200,
    ppo_epochs=2,
    mini_batches=2,
)
