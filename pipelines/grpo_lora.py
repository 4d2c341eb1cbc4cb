"""GRPO with LoRA — the GRPO pipeline, training low-rank adapters instead of the weights.

The same graph as pipelines/grpo.py (group-normalised advantages, clipped loss, k3 KL in
the loss; DeepSeekMath, arXiv 2402.03300), but the actor trains a rank-16 LoRA adapter
(Hu et al. 2021, arXiv 2106.09685, through peft) on every linear layer of the attention
and the MLP: about 21 % of the built-in model's weights. The reference is the actor's own
module with its adapter disabled — one copy of the weights, not two. final/ holds the
merged model, final/adapter/ the adapter alone.

    rlflow run pipelines/grpo_lora.py
    rlflow run pipelines/grpo_lora.py --set actor.lora.r=4 --set actor.lr=2e-3
"""

from rlflow import Advantage, Generate, LoRA, Loss, Model, Pipeline, Prompts, RefLogprob, Score
from rlflow.arith import MAX_NEW_TOKENS, exact_match

LAYERS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# adapters learn at a higher rate than full fine-tuning (GRPO's 1e-4): B starts at 0
actor = Model("builtin:tiny-arith", train=True, lr=1e-3, lora=LoRA(r=16, alpha=32, target_modules=LAYERS))

pipeline = Pipeline(
    name="grpo_lora",
    description="GRPO training a LoRA adapter; the reference is the base (adapter disabled, shared)",
    data=Prompts("builtin:arith", batch_size=32),
    models={"actor": actor, "ref": actor.frozen()},
    nodes=[
        Generate("actor", n=8, max_new_tokens=MAX_NEW_TOKENS, temperature=1.0),
        Score(rule=exact_match),
        RefLogprob("ref"),
        Advantage("group_norm", eps=1e-6),
        Loss("clip", model="actor", eps=0.2, kl_coef=0.04, kl="k3", agg="seq-mean-token-mean"),
    ],
    steps=300,
)
