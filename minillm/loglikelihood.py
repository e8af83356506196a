"""lm-eval's `HFLM` with the LM head applied only where a log-likelihood is read.

A cloze request (context, continuation) is scored by the log-probabilities of the continuation tokens. lm-eval's
`HFLM` projects every position of every padded row onto the vocabulary and takes a log-softmax over all of them, then
keeps the continuation positions. For Gemma 3 270M the tied head is 640 x 262,144 (168M multiply-adds a token against
about 100M for all 18 layers), and on the bundled tasks 26% of the request tokens are continuation tokens (47k of
178k at 500 examples a task, Gemma tokenizer), so most of the zero-shot time went into logits that were thrown away.

`ContinuationHFLM` changes only `_loglikelihood_tokens`, the step after lm-eval has built the requests: everything
before it (tokenization, `<bos>` or prefix token, context/continuation split, the left truncation to the model's
length) is HFLM's own, and everything after it (metrics, acc_norm, aggregation, standard errors) is lm-eval's. It
builds the same right-padded inputs and calls the same `_model_call`, with a pre-hook on the model's output
embedding that keeps only the positions that predict a continuation token (all rows' together, as one sequence,
since a per-row padding to the batch's longest continuation would give back most of the saving: a batch sorted by
length mixes a 3-token answer with a whole-sentence one); the model's own code then
applies the head and anything after it (Gemma's logit soft-capping when configured). Log-softmax, greedy check and
sum are those of HFLM. Requests run longest first, as in HFLM, but one-token continuations sharing a context are not
merged (lm-eval's logits cache): each request is its own row.

Equal to HFLM up to float rounding: tests/test_loglikelihood.py compares both on tiny random models (Llama, Gemma 3
with soft-capping) and on the bundled tasks (SmolLM2, slow), and `scripts/bench_zeroshot.py` prints both timings
and the per-task values of both in one run. Measured on this project's 2-core CPU machine (one torch thread, the
process niced beside two grid processes), Gemma 3 270M, 20 examples a task, batch 16, two interleaved repeats:
HFLM 171.8 s, ContinuationHFLM 115.6 s (1.49x), all six task values equal. What is left is the 18 layers, run again
for every choice of a shared context.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from tqdm.auto import tqdm


class ContinuationHFLM(HFLM):
    """HFLM whose log-likelihood pass computes logits at continuation positions only (causal models)."""

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        if self.backend != "causal" or head is None or not isinstance(self.batch_size, int):
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        out: list = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="loglikelihood (continuation)")
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            inputs, conts = [], []
            for i in rows:
                _, context, continuation = requests[i]
                if not context or not continuation or len(continuation) > self.max_length:
                    raise ValueError(
                        f"request needs a non-empty context and a continuation of at most {self.max_length} tokens"
                    )
                inputs.append((context + continuation)[-(self.max_length + 1) :][:-1])
                conts.append(continuation)
            scored = self._continuation_log_probs(head, inputs, [len(c) for c in conts])
            for i, logp, cont in zip(rows, scored, conts, strict=True):
                target = torch.tensor(cont, dtype=torch.long, device=logp.device)
                greedy = bool((logp.argmax(dim=-1) == target).all())
                answer = (float(logp.gather(1, target[:, None]).sum()), greedy)
                out[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                bar.update(1)
        bar.close()
        return out

    def _continuation_log_probs(self, head, inputs: list[list[int]], cont_lens: list[int]) -> list[torch.Tensor]:
        """Right-padded batch of `inputs` through `_model_call`; returns per row the [cont_len, vocab] log-softmax at
        the last cont_len positions of its own (unpadded) length. The head sees only those positions, all rows'
        together as one sequence (a per-row padding to the longest continuation would waste what it saves)."""
        width = max(map(len, inputs))
        batch = torch.zeros(len(inputs), width, dtype=torch.long)
        flat = []  # index into the [batch * width] positions
        for r, (ids, n) in enumerate(zip(inputs, cont_lens, strict=True)):
            batch[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            flat.extend(range(r * width + len(ids) - n, r * width + len(ids)))
        batch, flat = batch.to(self.device), torch.tensor(flat, dtype=torch.long, device=self.device)

        def gather(module, args):
            hidden = args[0]
            if hidden.dim() != 3 or hidden.shape[:2] != batch.shape:
                raise RuntimeError(
                    f"{type(self.model).__name__}'s output embedding received {tuple(hidden.shape)}, not the "
                    f"[batch, {width}, hidden] states of every position; use lm-eval's HFLM for this model"
                )
            return (hidden.reshape(-1, hidden.shape[-1])[flat][None], *args[1:])

        hook = head.register_forward_pre_hook(gather)
        try:
            logits = self._model_call(batch)  # [1, sum(cont_lens), vocab]
        finally:
            hook.remove()
        logp = F.log_softmax(logits[0], dim=-1, dtype=self.softmax_dtype)
        return list(logp.split(cont_lens))


__all__ = ["ContinuationHFLM"]
