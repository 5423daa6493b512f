"""Choose the next token of each request from its logits.

Per row: greedy rows take the argmax (ties go to the lowest token id, as
``torch.argmax``). Other rows divide the logits by ``temperature``, keep the
``top_k`` most likely tokens, keep the smallest set of most likely tokens whose
probability mass reaches ``top_p`` (nucleus sampling: Holtzman et al., 2019,
"The Curious Case of Neural Text Degeneration", arXiv:1904.09751), and draw by
inverse transform: with ``u`` uniform in [0, 1), the token whose cumulative
probability interval (in descending-probability order, ties by lowest id)
contains ``u``.

Randomness: ``u`` is drawn on the CPU. For a request with ``seed`` its token
number ``i`` uses a ``torch.Generator`` seeded with :func:`mix_seed` ``(seed, i)``,
so the draw does not depend on the batch, the step or the device; unseeded
requests share one generator seeded from the worker seed.

Processing runs as a chain of steps on the sorted logits, so later filters
(min-p, penalties) and log-probabilities slot in beside the existing ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

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

    def sample(
        self, logits: torch.Tensor, params: Sequence[SamplingParams], output_indices: Sequence[int]
    ) -> list[int]:
        """Token ids, one per row.

        Args:
            logits: float32 ``[N, vocab_size]`` (any device).
            params: sampling parameters of each row.
            output_indices: index of each row's token among its request's
                generated tokens (seeds per-token generators).

        Returns:
            ``N`` token ids.
        """
        assert logits.shape[0] == len(params) == len(output_indices)
        tokens = [0] * len(params)
        greedy_rows = [i for i, p in enumerate(params) if p.greedy]
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if greedy_rows:
            rows = torch.tensor(greedy_rows, device=logits.device)
            for i, token in zip(greedy_rows, logits[rows].argmax(dim=-1).tolist(), strict=True):
                tokens[i] = token
        if random_rows:
            rows = torch.tensor(random_rows, device=logits.device)
            chosen = self._sample_random(
                logits[rows],
                [params[i] for i in random_rows],
                [output_indices[i] for i in random_rows],
            )
            for i, token in zip(random_rows, chosen, strict=True):
                tokens[i] = token
        return tokens

    def _sample_random(
        self, logits: torch.Tensor, params: list[SamplingParams], output_indices: list[int]
    ) -> list[int]:
        device = logits.device
        temperature = torch.tensor([p.temperature for p in params], device=device).unsqueeze(1)
        sorted_logits, sorted_ids = torch.sort(logits / temperature, dim=-1, descending=True, stable=True)
        sorted_logits = _apply_top_k(sorted_logits, [p.top_k for p in params])
        probs = torch.softmax(sorted_logits, dim=-1)
        probs = _apply_top_p(probs, [p.top_p for p in params])
        uniforms = self._uniforms(params, output_indices).to(device)
        cdf = probs.cumsum(dim=-1)
        positions = torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(1), right=True)
        positions = positions.clamp(max=logits.shape[1] - 1)
        return sorted_ids.gather(1, positions).squeeze(1).tolist()

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


def _apply_top_k(sorted_logits: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    """Mask every column at or past each row's ``top_k`` (0 keeps all) with ``-inf``."""
    vocab_size = sorted_logits.shape[1]
    if all(k == 0 or k >= vocab_size for k in top_k):
        return sorted_logits
    k = torch.tensor([k if k > 0 else vocab_size for k in top_k], device=sorted_logits.device)
    columns = torch.arange(vocab_size, device=sorted_logits.device)
    return sorted_logits.masked_fill(columns.unsqueeze(0) >= k.unsqueeze(1), float("-inf"))


def _apply_top_p(sorted_probs: torch.Tensor, top_p: list[float]) -> torch.Tensor:
    """Zero the tail of each row once the mass before a token reaches ``top_p`` (1.0 keeps all)."""
    if all(p >= 1.0 for p in top_p):
        return sorted_probs
    p = torch.tensor(top_p, device=sorted_probs.device, dtype=sorted_probs.dtype).unsqueeze(1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    return sorted_probs.masked_fill(mass_before >= p, 0.0)
