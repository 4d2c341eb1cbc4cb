"""Reward model — a Bradley-Terry model on preference pairs (InstructGPT §3.5).

The model learns s(chosen) > s(rejected) with the loss -log σ(s_w - s_l), and reports
pairwise accuracy on held-out pairs. Here the score is the likelihood the model itself
gives the response, s = log π(y|x) summed over its tokens (`reward_from="likelihood"`):
starting from the SFT policy it ranks 78 % of held-out pairs right before training. The
classic form — a scalar head on the last token (`reward_from="classifier"`, an
`AutoModelForSequenceClassification`) — is one override away; on this task it learns
far more slowly (about 60 % after 300 steps).

The result in runs/<run>/final loads with from_pretrained and scores PPO by path:
    models={..., "rm": Model("runs/<run>/final", head="reward", reward_from="likelihood")}
    Score(model="rm")

    rlflow run pipelines/reward_model.py
    rlflow run pipelines/reward_model.py --set 'rm.reward_from="classifier"' --set rm.lr=3e-4 --steps 1000
"""

from rlflow import Loss, Model, Pairs, Pipeline

pipeline = Pipeline(
    name="reward_model",
    description="Bradley-Terry reward model on preference pairs",
    data=Pairs("builtin:arith", batch_size=64),
    models={"rm": Model("builtin:tiny-arith", head="reward", reward_from="likelihood", train=True, lr=1e-4)},
    nodes=[Loss("bradley_terry", model="rm")],
    steps=200,
)
