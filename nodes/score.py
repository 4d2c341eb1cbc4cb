"""Score: the sequence reward R_i of every response.

R_i = Σ_k w_k · rule_k(response_i, row_i)  [+ reward model score]  [+ overlong penalty]

Each rule is a plain Python callable ``fn(response_text, row) -> float`` where ``row``
holds the row's text fields (``prompt``, ``answer``, ...). Rules run in worker processes
(``rlflow.rules.RulePool``). A rule that raises, returns something that is not a finite
number, runs past the node's ``rule_timeout_s``, exits or crashes its worker stops the run with a
``RewardRuleError`` that shows the sample: nothing is silently turned into a zero.

The soft overlong punishment of DAPO (§7.2), with L_max = the node's ``max_new_tokens``
(resolved from the Generate node when the graph is built) and L_cache = ``overlong_buffer``:
    0                                  if |y| <= L_max - L_cache
    ((L_max - L_cache) - |y|) / L_cache   if L_max - L_cache < |y| <= L_max
multiplied by ``overlong_penalty`` and added to R.
"""

from __future__ import annotations

from rlflow.dist import Mean
from rlflow.lazy import torch
from rlflow.node import Context, ModelRunner, layout, runner
from rlflow.rules import RewardRuleError, RulePool, score_in_process

__all__ = ["RewardRuleError", "ScoreRunner", "apply_rule", "length_by_correctness", "overlong_penalty"]

DEFAULT_TIMEOUT_S = 10.0  # apply_rule's limit per call of a rule on one sample (Score.rule_timeout_s in a run)


def apply_rule(name: str, fn, responses: list[str], rows: list[dict], timeout: float | None = None) -> torch.Tensor:
    """``fn`` on every (response, row) in this process; [B] float. Raises RewardRuleError
    with the sample. For tests and debugging: a run scores in a ``RulePool``."""
    timeout = DEFAULT_TIMEOUT_S if timeout is None else timeout
    return torch.tensor(score_in_process(name, fn, responses, rows, timeout), dtype=torch.float32)


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, factor: float) -> torch.Tensor:
    """DAPO soft overlong punishment (§7.2) for response lengths [B]; ≤ 0."""
    start = max_len - buffer
    pen = (start - lengths.float()) / buffer  # negative once past the start of the buffer
    pen = torch.where(lengths > start, pen, torch.zeros_like(pen))
    return factor * pen.clamp(min=-1.0)


def _mean(x: torch.Tensor) -> Mean:
    """A per-sample metric [B] as (sum, count), so that it adds up over rounds and ranks."""
    return Mean(float(x.float().sum()), float(x.numel()))


def length_by_correctness(lengths: torch.Tensor, scores: torch.Tensor, prefix: str = "response_length") -> dict[str, Mean]:
    """Mean response length [B] of the correct and of the incorrect samples, as sums and counts.

    A sample is correct when ``scores`` (the Score node's first rule, unweighted) is > 0.5,
    the criterion of held-out ``eval/accuracy``. A side with no sample in this batch is left
    out rather than logged as 0, so rounds and ranks add up only the samples they have.
    """
    correct = scores > 0.5
    out = {}
    for side, mask in (("correct", correct), ("incorrect", ~correct)):
        if bool(mask.any()):
            out[f"{prefix}/{side}/mean"] = Mean(float(lengths[mask].float().sum()), float(mask.sum()))
    return out


@runner("score")
class ScoreRunner(ModelRunner):
    """Scores in the run's rule pool, ``ctx.rule_pool`` when the engine provides one;
    otherwise in a pool of its own, started on first use and stopped by ``close()``. A
    reward model (``spec.model``, optional) reads the batch on its own device; the rewards
    are made on the batch's device."""

    concurrency = "main"  # beside the other nodes of its stage, in the main thread (in-process rules are timed by SIGALRM)

    def __init__(self, spec):
        super().__init__(spec)
        self._own_pool: RulePool | None = None

    def _pool(self, ctx: Context) -> RulePool:
        pool = ctx.rule_pool
        if pool is None:
            pool = self._own_pool = self._own_pool or RulePool(self.spec.rule_workers, timeout_s=self.spec.rule_timeout_s)
        return pool

    def close(self) -> None:
        """Stop this runner's own rule workers, if it started any."""
        if self._own_pool is not None:
            self._own_pool.close()
            self._own_pool = None

    def _score(self, batch, ctx: Context, texts: list[str], ids_col: str, mask_col: str, metrics: dict, prefix: str,
               parts: bool = False) -> torch.Tensor:
        from rlflow.batch import iter_rows

        s = self.spec
        rows = list(iter_rows(batch, ("prompt", "answer")))
        total = torch.zeros(len(batch), device=batch[mask_col].device)
        for i, (name, rule) in enumerate(s.rules.items()):
            scores = self._pool(ctx).score(name, rule.fn, texts, rows, timeout_s=self.spec.rule_timeout_s)
            part = torch.tensor(scores, dtype=torch.float32, device=total.device)
            metrics[f"{prefix}/{name}"] = _mean(part)
            if parts and i == 0:  # the first rule decides correctness, as in held-out evaluation
                metrics.update(length_by_correctness(batch[mask_col].sum(-1), part))
            if parts:
                batch[f"rewards_{name}"] = part
            total += rule.weight * part
        if s.model is not None:
            from rlflow.forward import sequence_scores

            b = self.inputs(batch, ctx)
            with torch.no_grad():
                worker = self.worker(ctx)
                rm = sequence_scores(worker.engine, b["prompt_ids"], b["prompt_mask"], b[ids_col], b[mask_col],
                                     **layout(worker, ctx))
            metrics[f"{prefix}/model"] = _mean(rm)
            total += rm.float().to(total.device)
        if s.overlong_buffer:
            pen = overlong_penalty(batch[mask_col].sum(-1), s.max_new_tokens, s.overlong_buffer, s.overlong_penalty)
            metrics[f"{prefix}/overlong"] = _mean(pen)
            total += pen
        return total

    def run(self, batch, ctx: Context):
        metrics: dict[str, float] = {}
        batch["rewards"] = self._score(batch, ctx, batch["response"], "response_ids", "response_mask", metrics, "reward", parts=True)
        metrics["reward/mean"] = _mean(batch["rewards"])  # every sample scored, before any filter
        if self.spec.score_greedy:
            batch["baseline_rewards"] = self._score(batch, ctx, batch["greedy_response"], "greedy_response_ids",
                                                    "greedy_response_mask", metrics, "baseline_reward")
        return metrics
