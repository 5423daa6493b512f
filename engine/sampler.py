"""Choose the next token of each request from its logits.

Per row, in the order transformers' ``generate`` applies its logits processors:

1. penalties on the raw logits, for tokens already seen: the repetition penalty
   of transformers' ``RepetitionPenaltyLogitsProcessor`` (Keskar et al., 2019,
   "CTRL", arXiv:1909.05858) over prompt and output tokens (positive logits
   divided by it, negative ones multiplied), then the presence and frequency
   penalties of the OpenAI API over output tokens
   (``logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty``);
2. greedy rows take the argmax (ties go to the lowest token id, as ``torch.argmax``;
   when every row is greedy without penalties or log-probabilities, the argmax
   runs on the raw logits without the float32 copy, gathers or extra syncs);
3. other rows divide by ``temperature``, keep the ``top_k`` most likely tokens,
   keep the smallest set of most likely tokens whose probability mass reaches
   ``top_p`` (nucleus sampling: Holtzman et al., 2019, arXiv:1904.09751), drop
   tokens less likely than ``min_p`` times the most likely one (min-p sampling:
   Nguyen et al., 2024, "Turning Up the Heat: Min-p Sampling for Creative and
   Coherent LLM Outputs", arXiv:2407.01082), and draw by inverse transform: with
   ``u`` uniform in [0, 1), the token whose cumulative probability interval (in
   descending-probability order, ties by lowest id) contains ``u``.

Log-probabilities (``SamplingParams.logprobs``) are ``log_softmax`` of the raw
logits, before penalties, temperature and filters (transformers'
``output_logits``, not its processed ``output_scores``).

A row whose request asks for ``n`` > 1 completions (the last prompt row of such
a request) is sampled ``n`` times, completion ``i`` with
``SamplingParams.for_child(i)`` (its own seed), so every completion's first
token is drawn independently from the same logits.

:meth:`Sampler.sample_ids` returns the ids as a device tensor, without a host
sync, for batches without penalties, log-probabilities or ``n`` > 1
(asynchronous scheduling feeds them to the next step on the device).

Randomness: ``u`` is drawn on the CPU. For a request with ``seed`` its token
number ``i`` uses a ``torch.Generator`` seeded with :func:`mix_seed` ``(seed, i)``,
so the draw does not depend on the batch, the step or the device; unseeded
requests share one generator seeded from the worker seed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from engine.batch import SampleResult, SequenceInput, TokenLogprobs
from engine.sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1


def splitmix64(state: int) -> int:
    """The output of SplitMix64 (Steele et al., 2014, "Fast splittable
    pseudorandom number generators") after ``state``: a 64-bit bijective hash."""
    x = (state + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(seed: int, index: int) -> int:
    """The 64-bit generator seed of token ``index`` of a request seeded with ``seed``:
    ``splitmix64(splitmix64(seed) + index)``."""
    return splitmix64((splitmix64(seed) + index) & _MASK64)


class Sampler:
    """Samples one token per row of a logits matrix.

    Args:
        seed: seed of the generator that unseeded requests share.
    """

    def __init__(self, seed: int = 0) -> None:
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(seed)

    def sample(self, logits: torch.Tensor, seqs: Sequence[SequenceInput]) -> list[SampleResult]:
        """One sampled result per row (``n`` for a row whose ``sampling.n`` > 1, see below).

        Args:
            logits: ``[N, vocab_size]`` raw logits (any float dtype, any device).
            seqs: the inputs the rows belong to: their ``sampling``,
                ``output_index`` (seeds per-token generators) and token history
                (``prompt_token_ids``, ``output_token_ids``: penalties).

        Returns:
            ``N`` results: the token id, or a :class:`TokenLogprobs` for rows
            whose ``sampling.logprobs`` is not ``None``. A row with
            ``sampling.n`` > 1 is sampled ``n`` times: the results (completion
            order) go to its input's ``samples`` and the first is returned.
        """
        assert logits.shape[0] == len(seqs)
        if all(s.sampling.n == 1 for s in seqs):
            return list(self._sample_rows(logits, seqs))
        rows: list[int] = []
        expanded: list[SequenceInput] = []
        for r, seq in enumerate(seqs):
            for i in range(seq.sampling.n):
                rows.append(r)
                child = seq.sampling.for_child(i) if seq.sampling.n > 1 else seq.sampling
                expanded.append(dataclasses.replace(seq, sampling=child))
        flat = self._sample_rows(logits[torch.tensor(rows, device=logits.device)], expanded)
        results: list[SampleResult] = []
        start = 0
        for seq in seqs:
            n = seq.sampling.n
            if n > 1:
                seq.samples = flat[start : start + n]
            results.append(flat[start])
            start += n
        return results

    def sample_ids(self, logits: torch.Tensor, seqs: Sequence[SequenceInput]) -> torch.Tensor | None:
        """The sampled ids as int64 ``[N]`` on ``logits``' device, without a host sync.

        Args:
            logits: ``[N, vocab_size]`` raw logits.
            seqs: the inputs the rows belong to (see :meth:`sample`).

        Returns:
            The ids :meth:`sample` would return, or ``None`` when a row has
            penalties, log-probabilities or ``n`` > 1 (use :meth:`sample`).
        """
        params = [s.sampling for s in seqs]
        if any(p.n != 1 or p.logprobs is not None or p.has_penalties for p in params):
            return None
        if all(p.greedy for p in params):
            # Argmax in the logits' own dtype: upcasting is exact, so the ids and
            # tie-breaking are those of the float32 path, without the copy.
            return logits.argmax(dim=-1)
        logits = logits.float()
        ids = logits.argmax(dim=-1)  # greedy rows; the random rows are replaced below
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        rows = _device_tensor(random_rows, logits.device, torch.int64)
        ids[rows] = self._sample_random(
            logits[rows], [params[i] for i in random_rows], [seqs[i].output_index for i in random_rows]
        )
        return ids

    def _sample_rows(self, logits: torch.Tensor, seqs: Sequence[SequenceInput]) -> list[SampleResult]:
        """:meth:`sample` for rows that all have ``sampling.n`` 1."""
        params = [s.sampling for s in seqs]
        if all(p.logprobs is None and not p.has_penalties for p in params):
            ids = self.sample_ids(logits, seqs)
            assert ids is not None
            return list(ids.tolist())  # one device sync
        logits = logits.float()
        raw_logits = logits
        logits = apply_penalties(logits, seqs)
        tokens = [0] * len(seqs)
        greedy_rows = [i for i, p in enumerate(params) if p.greedy]
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if greedy_rows:
            rows = torch.tensor(greedy_rows, device=logits.device)
            for i, token in zip(greedy_rows, logits[rows].argmax(dim=-1).tolist(), strict=True):
                tokens[i] = token
        if random_rows:
            rows = torch.tensor(random_rows, device=logits.device)
            chosen = self._sample_random(
                logits[rows], [params[i] for i in random_rows], [seqs[i].output_index for i in random_rows]
            )
            for i, token in zip(random_rows, chosen.tolist(), strict=True):
                tokens[i] = token
        results: list[SampleResult] = list(tokens)
        logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        if logprob_rows:
            found = compute_logprobs(
                raw_logits[torch.tensor(logprob_rows, device=logits.device)],
                [tokens[i] for i in logprob_rows],
                [params[i].logprobs or 0 for i in logprob_rows],
            )
            for i, entry in zip(logprob_rows, found, strict=True):
                results[i] = entry
        return results

    def _sample_random(
        self, logits: torch.Tensor, params: list[SamplingParams], output_indices: list[int]
    ) -> torch.Tensor:
        """int64 ``[N]`` ids drawn from float32 ``logits`` (on their device, no host sync)."""
        device = logits.device
        temperature = _device_tensor([p.temperature for p in params], device, torch.float32).unsqueeze(1)
        sorted_logits, sorted_ids = torch.sort(logits / temperature, dim=-1, descending=True, stable=True)
        sorted_logits = _apply_top_k(sorted_logits, [p.top_k for p in params])
        probs = torch.softmax(sorted_logits, dim=-1)
        probs = _apply_top_p(probs, [p.top_p for p in params])
        probs = _apply_min_p(probs, [p.min_p for p in params])
        uniforms = self._uniforms(params, output_indices).to(device, non_blocking=True)
        cdf = probs.cumsum(dim=-1)
        positions = torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(1), right=True)
        positions = positions.clamp(max=logits.shape[1] - 1)
        return sorted_ids.gather(1, positions).squeeze(1)

    def _uniforms(self, params: list[SamplingParams], output_indices: list[int]) -> torch.Tensor:
        """float32 CPU ``[n]`` uniforms in [0, 1): per-token generators for seeded rows."""
        uniforms = torch.empty(len(params), dtype=torch.float32)
        for row, (p, index) in enumerate(zip(params, output_indices, strict=True)):
            if p.seed is None:
                generator = self._generator
            else:
                generator = torch.Generator(device="cpu")
                generator.manual_seed(mix_seed(p.seed, index))
            uniforms[row] = torch.rand((), generator=generator)
        return uniforms


def _device_tensor(
    values: Sequence[float] | Sequence[int], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """``values`` on ``device`` by an asynchronous copy (``torch.tensor(..., device=cuda)``
    would wait for the device's queued work: no overlap with a step in flight)."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def _token_matrix(histories: list[Sequence[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """float32 ``[len(histories), vocab_size]``: how often each token occurs in each row's history."""
    counts = torch.zeros(len(histories), vocab_size, dtype=torch.float32, device=device)
    rows = [r for r, history in enumerate(histories) for _ in history]
    if rows:
        ids = torch.tensor([t for history in histories for t in history], dtype=torch.int64, device=device)
        row_index = torch.tensor(rows, dtype=torch.int64, device=device)
        counts.index_put_((row_index, ids), torch.ones_like(ids, dtype=torch.float32), accumulate=True)
    return counts


def apply_penalties(logits: torch.Tensor, seqs: Sequence[SequenceInput]) -> torch.Tensor:
    """Repetition, presence and frequency penalties (see the module docstring).

    Args:
        logits: float32 ``[N, vocab_size]``.
        seqs: one input per row; rows without penalties are left as they are.

    Returns:
        A new float32 ``[N, vocab_size]`` tensor, or ``logits`` itself when no
        row has a penalty.
    """
    rows = [i for i, s in enumerate(seqs) if s.sampling.has_penalties]
    if not rows:
        return logits
    device = logits.device
    index = torch.tensor(rows, device=device)
    picked = logits[index]
    params = [seqs[i].sampling for i in rows]
    out_counts = _token_matrix([seqs[i].output_token_ids for i in rows], logits.shape[1], device)
    prompt_seen = _token_matrix([seqs[i].prompt_token_ids for i in rows], logits.shape[1], device) > 0
    seen = prompt_seen | (out_counts > 0)
    penalty = torch.tensor([p.repetition_penalty for p in params], device=device).unsqueeze(1)
    penalized = torch.where(picked < 0, picked * penalty, picked / penalty)
    picked = torch.where(seen, penalized, picked)
    frequency = torch.tensor([p.frequency_penalty for p in params], device=device).unsqueeze(1)
    presence = torch.tensor([p.presence_penalty for p in params], device=device).unsqueeze(1)
    picked = picked - out_counts * frequency - (out_counts > 0).float() * presence
    out = logits.clone()
    out[index] = picked
    return out


def compute_logprobs(logits: torch.Tensor, token_ids: list[int], num_top: list[int]) -> list[TokenLogprobs]:
    """Log-probabilities of the sampled tokens and of each row's most likely tokens.

    Args:
        logits: float32 ``[N, vocab_size]`` raw logits.
        token_ids: the token sampled in each row.
        num_top: how many most likely tokens to report per row (0 to 20).

    Returns:
        ``N`` entries; ``top_logprobs`` most likely first, ties by lowest id.
    """
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = (
        logprobs.gather(1, torch.tensor(token_ids, device=logits.device).unsqueeze(1)).squeeze(1).tolist()
    )
    k = min(max(num_top), logits.shape[1])
    sorted_values, sorted_ids = torch.sort(logprobs, dim=-1, descending=True, stable=True)
    top_values, top_ids = sorted_values[:, :k].tolist(), sorted_ids[:, :k].tolist()
    return [
        TokenLogprobs(token_ids[r], chosen[r], tuple(zip(top_ids[r][:n], top_values[r][:n], strict=True)))
        for r, n in enumerate(num_top)
    ]


def _apply_top_k(sorted_logits: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    """Mask every column at or past each row's ``top_k`` (0 keeps all) with ``-inf``."""
    vocab_size = sorted_logits.shape[1]
    if all(k == 0 or k >= vocab_size for k in top_k):
        return sorted_logits
    k = _device_tensor([k if k > 0 else vocab_size for k in top_k], sorted_logits.device, torch.int64)
    columns = torch.arange(vocab_size, device=sorted_logits.device)
    return sorted_logits.masked_fill(columns.unsqueeze(0) >= k.unsqueeze(1), float("-inf"))


def _apply_top_p(sorted_probs: torch.Tensor, top_p: list[float]) -> torch.Tensor:
    """Zero the tail of each row once the mass before a token reaches ``top_p`` (1.0 keeps all)."""
    if all(p >= 1.0 for p in top_p):
        return sorted_probs
    p = _device_tensor(top_p, sorted_probs.device, sorted_probs.dtype).unsqueeze(1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    return sorted_probs.masked_fill(mass_before >= p, 0.0)


def _apply_min_p(sorted_probs: torch.Tensor, min_p: list[float]) -> torch.Tensor:
    """Zero tokens less likely than ``min_p`` times the row's most likely one (0 keeps all).

    The most likely token is column 0 and always stays. Comparing against the
    top probability is scale-invariant, so the renormalization that
    transformers' ``MinPLogitsWarper`` does after top-k and top-p is not needed.
    """
    if all(p == 0.0 for p in min_p):
        return sorted_probs
    p = _device_tensor(min_p, sorted_probs.device, sorted_probs.dtype).unsqueeze(1)
    return sorted_probs.masked_fill(sorted_probs < p * sorted_probs[:, :1], 0.0)
