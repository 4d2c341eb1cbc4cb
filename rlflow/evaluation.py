"""Held-out evaluation: the policy's greedy accuracy and, on preference data, pairwise accuracy.

What counts as correct comes from the pipeline (:func:`rlflow.builtin.eval_rule`):
``Eval(rule=...)``, by default the first rule of its Score node, else the default rule
of its built-in data provider. The held-out rows come from the data source's eval split
(or ``Eval.pairs`` for preference accuracy on a pipeline that does not train on pairs),
read once per run.
"""

from __future__ import annotations

from typing import Any, Optional

from rlflow.builtin import eval_rule
from rlflow.dist import world_size
from rlflow.lazy import no_grad
from rlflow.spec import Pairs, Pipeline

DEFAULT_MAX_NEW_TOKENS = 16  # greedy budget when neither Eval nor a Generate node sets one


class Evaluator:
    """Evaluates the run's policy (and trained reward models) on held-out rows."""

    def __init__(self, pipeline: Pipeline, workers: dict[str, Any], policy: Optional[str], tokenizer):
        self.pipeline, self.workers, self.policy, self.tokenizer = pipeline, workers, policy, tokenizer
        self.rule = eval_rule(pipeline)
        self._rows: dict[tuple, Any] = {}

    def rows(self, spec) -> list[dict]:
        """The held-out rows of ``spec`` (at most ``Eval.size``), read once per run."""
        from rlflow.data import load_rows

        key = (spec.kind, spec.source, spec.eval_source)
        if key not in self._rows:
            self._rows[key] = load_rows(spec, "eval") or []
        return self._rows[key][: self.pipeline.eval.size]

    def __call__(self) -> dict[str, float]:
        ev, spec = self.pipeline.eval, self.pipeline.data
        if ev is None:
            return {}
        rows = self.rows(spec)
        out: dict[str, float] = {}
        if rows and self.policy is not None and self.rule is not None and getattr(spec, "answer_field", "answer") in rows[0]:
            out["eval/accuracy"] = self._accuracy(rows, spec)
        if spec.kind == "pairs":
            out.update(self._pair_accuracy(spec, rows))
        elif ev.pairs:
            pairs = Pairs(ev.pairs, eval_source=None if ev.pairs.startswith("builtin:") else ev.pairs)
            out.update(self._pair_accuracy(pairs, self.rows(pairs)))
        return out

    def _accuracy(self, rows: list[dict], spec) -> float:
        from rlflow.data import is_chat, prompt_text
        from rlflow.forward import greedy_accuracy

        worker = self.workers[self.policy]
        max_new = self.pipeline.eval.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
        answer = getattr(spec, "answer_field", "answer")
        return greedy_accuracy(worker.module, worker.tokenizer, [prompt_text(spec, r, worker.tokenizer) for r in rows],
                               [str(r[answer]) for r in rows], self.rule, max_new_tokens=max_new,
                               add_special_tokens=not is_chat(spec, rows), device=worker.device,
                               synced=world_size() > 1)  # every rank evaluates the same rows

    @no_grad
    def _pair_accuracy(self, spec, rows: list[dict]) -> dict[str, float]:
        """Fraction of held-out pairs ranked chosen > rejected: by summed log-prob for the
        policy, by score for every trained reward model."""
        from rlflow.data import make_batch
        from rlflow.forward import response_logprobs, sequence_scores

        if not rows:
            return {}
        out: dict[str, float] = {}
        b = make_batch(spec, rows, self.tokenizer)
        cols = ("prompt_ids", "prompt_mask", "response_ids", "response_mask")
        if self.policy is not None:
            w = self.workers[self.policy]
            lp = response_logprobs(w.module, *(b.to(w.device)[c] for c in cols)).sum(-1)  # [2P]: chosen, rejected, ...
            out["eval/preference_accuracy"] = float((lp[0::2] > lp[1::2]).float().mean())
        for name, w in self.workers.items():
            if w.spec.head == "reward" and w.trainable:
                s = sequence_scores(w.module, *(b.to(w.device)[c] for c in cols))
                out[f"eval/rm_accuracy/{name}"] = float((s[0::2] > s[1::2]).float().mean())
        return out
