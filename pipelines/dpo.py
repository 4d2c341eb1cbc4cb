"""DPO — Direct Preference Optimization (Rafailov et al. 2023).

Offline preference pairs (chosen = the correct sum, rejected = a plausible wrong one);
the loss is -log σ(β·h), h the policy's log-ratio of chosen over rejected minus the
reference's, on summed log-probs, mean over pairs. ALGORITHMS.md §9.1. A jsonl of
prompt/chosen/rejected rows works the same: Pairs("my_pairs.jsonl").

    rlflow run pipelines/dpo.py
    rlflow run pipelines/dpo.py --set loss.beta=0.5 --set loss.label_smoothing=0.1
"""

from rlflow import Eval, Loss, Model, Pairs, Pipeline, RefLogprob
from rlflow.arith import MAX_NEW_TOKENS, exact_match

actor = Model("builtin:tiny-arith", train=True, lr=1e-4)

pipeline = Pipeline(
    name="dpo",
    description="offline preference pairs, sigmoid loss on summed log-probs (β=0.1)",
    data=Pairs("builtin:arith", batch_size=32),
    models={"actor": actor, "ref": actor.frozen()},
    nodes=[
        RefLogprob("ref"),
        Loss("dpo", model="actor", beta=0.1),
    ],
    steps=200,
    eval=Eval(max_new_tokens=MAX_NEW_TOKENS, rule=exact_match),  # also the task accuracy of the policy
)
