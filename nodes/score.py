"""Score: the sequence reward R_i of every response.

R_i = Σ_k w_k · rule_k(response_i, row_i)  [+ reward model score]  [+ overlong penalty]

Each rule is a plain Python callable ``fn(response_text, row) -> float`` where ``row``
holds the row's text fields (``prompt``, ``answer``, ...). A rule that raises, returns
something that is not a finite number, or runs past ``RULE_TIMEOUT_S`` stops the run
with an error that shows the sample: nothing is silently turned into a zero.

The soft overlong punishment of DAPO (§7.2), with L_max = the node's ``max_new_tokens``
(resolved from the Generate node when the graph is built) and L_cache = ``overlong_buffer``:
    0                                  if |y| <= L_max - L_cache
    ((L_max - L_cache) - |y|) / L_cache   if L_max - L_cache < |y| <= L_max
multiplied by ``overlong_penalty`` and added to R.
"""

from __future__ import annotations

import math
import signal
import threading
from contextlib import contextmanager

from rlflow.lazy import torch
from rlflow.node import Context, NodeRunner, runner

RULE_TIMEOUT_S = 10.0


class RewardRuleError(RuntimeError):
    """A rule that failed on a sample; the message shows the sample."""


@contextmanager
def _time_limit(seconds: float):
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield  # signals only work in the main thread; elsewhere no limit
        return

    def on_alarm(signum, frame):
        raise TimeoutError(f"took longer than {seconds:g}s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def apply_rule(name: str, fn, responses: list[str], rows: list[dict], timeout: float | None = None) -> torch.Tensor:
    """``fn`` on every (response, row); [B] float. Raises RewardRuleError with the sample."""
    timeout = RULE_TIMEOUT_S if timeout is None else timeout
    out = []
    for resp, row in zip(responses, rows):
        try:
            with _time_limit(timeout):
                v = fn(resp, row)
        except TimeoutError as e:
            raise RewardRuleError(f"reward rule {name!r} hung ({e}) on response {resp!r} for row {row}") from None
        except Exception as e:  # the user's code: report what it failed on
            raise RewardRuleError(f"reward rule {name!r} raised {type(e).__name__}: {e} on response {resp!r} for row {row}") from e
        if not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            raise RewardRuleError(f"reward rule {name!r} returned {v!r} (not a finite number) on response {resp!r} for row {row}")
        out.append(float(v))
    return torch.tensor(out, dtype=torch.float32)


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, factor: float) -> torch.Tensor:
    """DAPO soft overlong punishment (§7.2) for response lengths [B]; ≤ 0."""
    start = max_len - buffer
    pen = (start - lengths.float()) / buffer  # negative once past the start of the buffer
    pen = torch.where(lengths > start, pen, torch.zeros_like(pen))
    return factor * pen.clamp(min=-1.0)


@runner("score")
class ScoreRunner(NodeRunner):
    def _score(self, batch, ctx: Context, texts: list[str], ids_col: str, mask_col: str, metrics: dict, prefix: str,
               parts: bool = False) -> torch.Tensor:
        s = self.spec
        from rlflow.batch import iter_rows

        rows = list(iter_rows(batch, ("prompt", "answer")))
        total = torch.zeros(len(batch))
        for name, rule in s.rules.items():
            part = apply_rule(name, rule.fn, texts, rows)
            metrics[f"{prefix}/{name}"] = float(part.mean())
            if parts:
                batch[f"rewards_{name}"] = part
            total += rule.weight * part
        if s.model is not None:
            from rlflow.forward import sequence_scores

            worker = ctx.workers[s.model]
            b = batch.to(worker.device)
            with torch.no_grad():
                rm = sequence_scores(worker.engine, b["prompt_ids"], b["prompt_mask"], b[ids_col], b[mask_col])
            metrics[f"{prefix}/model"] = float(rm.mean())
            total += rm.float().to(total.device)
        if s.overlong_buffer:
            pen = overlong_penalty(batch[mask_col].sum(-1), s.max_new_tokens, s.overlong_buffer, s.overlong_penalty)
            metrics[f"{prefix}/overlong"] = float(pen.mean())
            total += pen
        return total

    def run(self, batch: Batch, ctx: Context):
        metrics: dict[str, float] = {}
        batch["rewards"] = self._score(batch, ctx, batch["response"], "response_ids", "response_mask", metrics, "reward", parts=True)
        metrics["reward/mean"] = float(batch["rewards"].mean())  # every sample scored, before any filter
        if self.spec.score_greedy:
            batch["baseline_rewards"] = self._score(batch, ctx, batch["greedy_response"], "greedy_response_ids",
                                                    "greedy_response_mask", metrics, "baseline_reward")
        return metrics
