"""Incremental detokenization: turn a stream of token ids into a stream of text pieces.

Decoding token by token is wrong for byte-level tokenizers (a multi-byte UTF-8
character can span tokens) and for tokenizers whose decoder depends on
neighbouring tokens. The technique is the prefix/read-offset window used by
Hugging Face TGI and vLLM (the code here is Tandem's own): decode a small window
of recent tokens twice, without and with the new tokens, and emit the
difference. Text ending in U+FFFD (an incomplete character) is held back until a
later token completes it; :meth:`IncrementalDetokenizer.finish` flushes
whatever is left.

Contract: the concatenation of every piece returned by ``push`` and ``finish``
equals ``tokenizer.decode(output_ids, skip_special_tokens)`` for the output ids
pushed, exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.tokenizer import Tokenizer

_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Detokenizes one request's output tokens as they arrive. O(window) per push.

    Args:
        tokenizer: the model's tokenizer.
        prompt_token_ids: the request's prompt. Accepted for the serving layer's
            convenience but not decoded: by the contract above the text depends
            on the output tokens only (as ``decode(output_ids)`` does).
        skip_special_tokens: drop special tokens from the text.
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True
    ) -> None:
        self.tokenizer = tokenizer
        self.num_prompt_tokens = len(prompt_token_ids)
        self.skip_special_tokens = skip_special_tokens
        self.output_token_ids: list[int] = []
        self._prefix_offset = 0  # start of the decode window
        self._read_offset = 0  # tokens before this one have been emitted

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self.output_token_ids[start:end], self.skip_special_tokens)

    def _emit(self, hold_incomplete: bool) -> str:
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset, len(self.output_token_ids))
        if len(new_text) <= len(prefix_text) or (hold_incomplete and new_text.endswith(_REPLACEMENT_CHAR)):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.output_token_ids)
        return new_text[len(prefix_text) :]

    def push(self, token_ids: Sequence[int]) -> str:
        """Add generated tokens; return the text they complete (possibly ``""``)."""
        self.output_token_ids.extend(token_ids)
        return self._emit(hold_incomplete=True)

    def finish(self) -> str:
        """Return the text still held back (an incomplete character decodes as U+FFFD)."""
        return self._emit(hold_incomplete=False)
