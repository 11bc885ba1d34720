"""Per-request sampling inside a batched step: greedy rows in one argmax, sampled rows each with
their own seeded generator, so a request's randomness never depends on its batch neighbours.

A row that cannot be sampled (non-finite logits, e.g. from a broken adapter, or logits that
overflow at the request's temperature) gets None: that request ends with an error, and the other
rows of the step are sampled as usual.

Rows whose request asks for logprobs also get the chosen token's log-probability and the k most likely
tokens, computed from that row alone (so they do not depend on the batch either): the log-softmax of
the logits the token was sampled from, after temperature (greedy rows: the raw logits) and before
top-k / top-p filtering, which would make every filtered alternative -inf."""

from __future__ import annotations

import torch

from server.engine.request import SamplingParams, TokenLogprob


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits [V] (already temperature-scaled); top-k first, then nucleus, like vLLM."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p  # keep the token that crosses top_p
        logits = logits.clone()
        logits[order[drop]] = float("-inf")
    return logits


class Sampler:
    def __init__(self) -> None:
        self._generators: dict[str, torch.Generator] = {}

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def _generator(self, request_id: str, seed: int | None) -> torch.Generator:
        gen = self._generators.get(request_id)
        if gen is None:
            gen = torch.Generator()
            if seed is None:
                gen.seed()
            else:
                gen.manual_seed(seed)
            self._generators[request_id] = gen
        return gen

    def sample(
        self, logits: torch.Tensor, requests: list[tuple[str, SamplingParams]]
    ) -> tuple[list[int | None], list[TokenLogprob | None]]:
        """logits [S, V] float32, one row per (request_id, params). Per row: the token id, or None for
        a row that cannot be sampled; and its TokenLogprob, or None when the request did not ask."""
        finite = torch.isfinite(logits).all(dim=-1).tolist()
        tokens: list[int | None] = logits.argmax(dim=-1).tolist()
        logprobs: list[TokenLogprob | None] = [None] * len(requests)
        for row, (request_id, params) in enumerate(requests):
            if not finite[row]:
                tokens[row] = None
                continue
            scaled = logits[row]
            if not params.greedy:
                scaled = scaled / params.temperature
                if not torch.isfinite(scaled).all():
                    tokens[row] = None
                    continue
                probs = _filter_top_k_top_p(scaled, params.top_k, params.top_p).softmax(-1)
                tokens[row] = int(torch.multinomial(probs, 1, generator=self._generator(request_id, params.seed)))
            if params.logprobs is not None:
                logprobs[row] = _token_logprob(scaled, tokens[row], params.logprobs)
        return tokens, logprobs


def _token_logprob(scaled: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """`scaled` [V]: the logits `token` was sampled from; its logprob and the k best alternatives."""
    logprobs = torch.log_softmax(scaled, dim=-1)
    top = torch.topk(logprobs, min(k, logprobs.shape[-1]))  # k = 0: empty
    return TokenLogprob(token, float(logprobs[token]), tuple(zip(top.indices.tolist(), top.values.tolist())))
