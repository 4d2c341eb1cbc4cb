"""Generate: n samples per prompt from the policy's own weights, with a KV cache.

Writes response_ids / response_mask [B*n, T] (EOS included in the mask, ALGORITHMS.md
Part A §2), old_logprobs [B*n, T] at the sampling temperature (Part A §1) — from the
sampling pass itself, or with ``recompute_logprobs=True`` from a second full forward as
verl and TRL do (the two agree to ~1e-6 in fp32; in bf16 recompute them; the sampler's
are then kept as rollout_logprobs [B*n, T] for a rollout correction), truncated [B*n]
and the decoded response texts. Rows of one prompt stay together and share its
``group``. With ``greedy_baseline=True`` it also decodes one greedy response per
prompt (ReMax), repeated on each of the prompt's rows.

A prompt's samples come from a generator of its own, seeded by (run seed, step, global
prompt index) and made on the model's device: they are the same whichever process, and
whichever other prompts, it is sampled with (DESIGN.md "Placement and scale").
"""

from __future__ import annotations

from rlflow.lazy import no_grad
from rlflow.node import Context, ModelRunner, layout, runner


@runner("generate")
class GenerateRunner(ModelRunner):
    """Two parts, so that the engine can run the first ahead (``Pipeline.rollout_ahead``):
    :meth:`rollout` samples from ``ctx.workers[model].module`` (the policy, or a copy of it
    taken before the last update), :meth:`finish` recomputes the old log-probs with the
    weights being trained. :meth:`run` is both, one after the other."""

    def run(self, batch, ctx: Context):
        with self.worker(ctx).forwards():  # a LoRA model's shared base samples with its adapter disabled
            rows, metrics = self.rollout(batch, ctx)
            rows, more = self.finish(rows, ctx)
        return rows, {**metrics, **more}

    @no_grad
    def rollout(self, batch, ctx: Context):
        """The responses, their sampling log-probs (as ``old_logprobs``) and texts; the greedy baseline."""
        from rlflow.dist import Mean, world_size
        from rlflow.forward import decode, prompt_generators, sample, sampled_positions

        s = self.spec
        worker = self.worker(ctx)
        tok = worker.tokenizer
        batch = self.inputs(batch, ctx)
        rows = batch.repeat_interleave(s.n)  # [B*n], a prompt's samples are adjacent
        synced = world_size() > 1  # every rank decodes as many tokens (ZeRO-3 forwards are collective)
        out = sample(worker.module, rows["prompt_ids"], rows["prompt_mask"], max_new_tokens=s.max_new_tokens,
                     temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id, generators=prompt_generators(ctx.seed, ctx.step, rows["group"]),
                     synced=synced)
        rows["response_ids"] = out.response_ids
        rows["response_mask"] = out.response_mask
        rows["old_logprobs"] = out.logprobs
        if ctx.positions is not None:
            ctx.positions.add(*sampled_positions(out))
        rows["truncated"] = out.truncated
        rows["response"] = decode(tok, out.response_ids, out.response_mask)
        if s.greedy_baseline:
            g = sample(worker.module, batch["prompt_ids"], batch["prompt_mask"], max_new_tokens=s.max_new_tokens,
                       greedy=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, synced=synced)
            texts = decode(tok, g.response_ids, g.response_mask)
            if ctx.positions is not None:
                ctx.positions.add(*sampled_positions(g))
            rows["greedy_response_ids"] = g.response_ids.repeat_interleave(s.n, 0)
            rows["greedy_response_mask"] = g.response_mask.repeat_interleave(s.n, 0)
            rows["greedy_response"] = [t for t in texts for _ in range(s.n)]
        metrics = {"generate/truncated_frac": Mean(float(out.truncated.float().sum()), float(len(rows)))}
        return rows, metrics

    @no_grad
    def finish(self, rows, ctx: Context):
        """With ``recompute_logprobs``: old log-probs from the trainer's own forward (as verl and
        TRL do, ALGORITHMS.md §0.1), the sampler's kept as ``rollout_logprobs``, and their gap
        (generate/rollout_logprob_diff: mean |lp_old - lp_rollout| over tokens). Else nothing."""
        from rlflow.dist import Mean
        from rlflow.forward import response_logprobs

        if not self.spec.recompute_logprobs:
            return rows, {}
        worker = self.worker(ctx)
        rows = self.inputs(rows, ctx)
        rows["rollout_logprobs"] = rows["old_logprobs"]
        rows["old_logprobs"] = response_logprobs(worker.engine, rows["prompt_ids"], rows["prompt_mask"], rows["response_ids"],
                                                 rows["response_mask"], temperature=self.spec.temperature,
                                                 **layout(worker, ctx))
        m = rows["response_mask"]
        gap = ((rows["old_logprobs"] - rows["rollout_logprobs"]).abs() * m).sum()
        return rows, {"generate/rollout_logprob_diff": Mean(float(gap), float(m.sum()))}
