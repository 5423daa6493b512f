"""Incremental detokenization: turn a stream of token ids into a stream of text pieces.

Decoding token by token is wrong for byte-level tokenizers (a multi-byte UTF-8
character can span tokens) and for tokenizers whose decoder depends on
neighbouring tokens. The technique is the prefix/read-offset window used by
Hugging Face TGI and vLLM (the code here is Tandem's own): decode a small window
of recent tokens twice, without and with the new tokens, and emit the
difference. Text ending in U+FFFD (an incomplete character) is held back until a
later token completes it; :meth:`IncrementalDetokenizer.finish` flushes
whatever is left.

Three ways to move that window, chosen per tokenizer (the cost per token at
batch 64 dominated the ``LLM`` bookkeeping of ``bench/host_overhead.py``):

- a lone ``ByteLevel`` decoder (GPT-2-style byte-level BPE: Llama 3, Qwen,
  the bundled model) decodes ``ids`` to ``bytes(ids[0]) + bytes(ids[1]) + ...``
  read as UTF-8 (invalid bytes -> U+FFFD), so after a character boundary the
  text of the next tokens does not depend on earlier ones. A token whose own
  decode is whole characters is emitted from a per-tokenizer cache of
  ``decode([id])`` when nothing is held (one dict look-up); otherwise the held
  tokens are decoded alone, once;
- other ``tokenizers.Tokenizer``-backed tokenizers without ``ByteFallback``
  (Metaspace, ...): ``tokenizers.decoders.DecodeStream`` (``tokenizers`` >=
  0.21), the same window and hold rule in Rust, one call per token. A
  ``DecodeStream`` error (it refuses a window whose longer decode does not start
  with the shorter one) continues in Python on the same window;
- Python, for the rest. A ``ByteFallback`` decoder (SentencePiece-style
  tokenizers: Llama 2, Mistral, Gemma) turns a whole run of ``<0xNN>`` byte
  tokens into one U+FFFD per token when the run is not valid UTF-8, so a later
  stray byte rewrites characters the run already completed; text is therefore
  also held while the last decoded token is a byte token (until the run ends).

Contract: the concatenation of every piece returned by ``push`` and ``finish``
equals ``tokenizer.decode(output_ids, skip_special_tokens)`` for the output ids
pushed, exactly (``tests/engine/test_detokenizer_exact.py``: byte-level BPE,
byte-fallback SentencePiece BPE, Metaspace). It holds for decoders whose decode
of a window that ends at a character (and byte-run) boundary is a prefix of the
decode of any longer window; decoders that rewrite text across tokens
(WordPiece's clean-up of ``" ,"``, CTC's de-duplication) break it.
"""

from __future__ import annotations

import contextlib
import json
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

from engine.tokenizer import Tokenizer

_DecodeStream: Any
try:
    from tokenizers.decoders import DecodeStream as _DecodeStream
except ImportError:  # tokenizers < 0.21
    _DecodeStream = None

_REPLACEMENT_CHAR = "\ufffd"


@dataclass(frozen=True)
class _Decoding:
    """What the detokenizer knows about one tokenizer (computed once per tokenizer).

    Attributes:
        backend: the ``tokenizers.Tokenizer``, or ``None`` for another tokenizer type.
        byte_level: the decoder is a lone ``ByteLevel`` (context-free after a character boundary).
        byte_token_ids: ids of ``<0xNN>`` tokens when the decoder has ``ByteFallback``, else empty.
        special_ids: ids of special tokens (dropped by ``skip_special_tokens``).
        pieces: for ``byte_level``, per ``skip_special_tokens``: ``decode([id])`` when it is whole
            characters (no U+FFFD), else ``None``; filled as ids are seen.
    """

    backend: _HFTokenizer | None
    byte_level: bool = False
    byte_token_ids: frozenset[int] = frozenset()
    special_ids: frozenset[int] = frozenset()
    pieces: dict[bool, dict[int, str | None]] = field(default_factory=lambda: {True: {}, False: {}})


_DECODINGS: weakref.WeakKeyDictionary[Tokenizer, _Decoding] = weakref.WeakKeyDictionary()


def _decoder_json(backend: _HFTokenizer) -> Any:
    decoder = backend.decoder
    if decoder is None:
        return None
    try:
        return json.loads(decoder.__getstate__())
    except Exception:  # a tokenizers release without it: the whole tokenizer's JSON
        return json.loads(backend.to_str()).get("decoder")


def _decoding(tokenizer: Tokenizer) -> _Decoding:
    decoding = _DECODINGS.get(tokenizer)
    if decoding is not None:
        return decoding
    backend = getattr(tokenizer, "backend", None)
    if not isinstance(backend, _HFTokenizer):
        decoding = _Decoding(None)
    else:
        decoder = _decoder_json(backend)
        byte_ids: set[int] = set()
        if '"type": "ByteFallback"' in json.dumps(decoder):  # alone or in a Sequence
            for b in range(256):
                for name in (f"<0x{b:02X}>", f"<0x{b:02x}>"):
                    token_id = backend.token_to_id(name)
                    if token_id is not None:
                        byte_ids.add(token_id)
        added = backend.get_added_tokens_decoder()
        decoding = _Decoding(
            backend,
            byte_level=isinstance(decoder, dict) and decoder.get("type") == "ByteLevel",
            byte_token_ids=frozenset(byte_ids),
            special_ids=frozenset(i for i, token in added.items() if token.special),
        )
    with contextlib.suppress(TypeError):  # a tokenizer type without weak references: not cached
        _DECODINGS[tokenizer] = decoding
    return decoding


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
        decoding = self._decoding = _decoding(tokenizer)
        self._pieces = decoding.pieces[skip_special_tokens] if decoding.byte_level else None
        self._stream: Any = None
        if (
            _DecodeStream is not None
            and decoding.backend is not None
            and not decoding.byte_level
            and not decoding.byte_token_ids
        ):
            self._stream = _DecodeStream(skip_special_tokens=skip_special_tokens)

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self.output_token_ids[start:end], self.skip_special_tokens)

    def _in_byte_run(self) -> bool:
        """Whether the last token the decoder sees (after the read offset) is a byte token."""
        decoding = self._decoding
        backend = decoding.backend
        assert backend is not None  # byte tokens come from a tokenizers.Tokenizer
        ids = self.output_token_ids
        for i in range(len(ids) - 1, self._read_offset - 1, -1):
            token_id = ids[i]
            if token_id in decoding.byte_token_ids:
                return True
            if not (self.skip_special_tokens and token_id in decoding.special_ids) and (
                backend.id_to_token(token_id) is not None
            ):
                return False
            # else decode drops it: a byte run goes on across it
        return False

    def _emit(self, hold_incomplete: bool) -> str:
        if hold_incomplete and self._decoding.byte_token_ids and self._in_byte_run():
            return ""  # decoded once when the run ends: O(run length) per run, not per token
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset, len(self.output_token_ids))
        if len(new_text) <= len(prefix_text) or (hold_incomplete and new_text.endswith(_REPLACEMENT_CHAR)):
            return ""
        self._advance()
        return new_text[len(prefix_text) :]

    def _advance(self) -> None:
        """Everything pushed has been emitted: the next window starts at the old read offset."""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.output_token_ids)

    def _piece(self, token_id: int) -> str | None:
        piece = self.tokenizer.decode([token_id], self.skip_special_tokens)
        return None if _REPLACEMENT_CHAR in piece else piece

    def _push_byte_level(self, token_ids: Sequence[int]) -> str:
        pieces = self._pieces
        assert pieces is not None
        ids = self.output_token_ids
        text = ""
        for token_id in token_ids:
            held = self._read_offset < len(ids)
            ids.append(token_id)
            if not held:
                piece = pieces.get(token_id, _REPLACEMENT_CHAR)
                if piece == _REPLACEMENT_CHAR:  # not seen yet
                    piece = pieces[token_id] = self._piece(token_id)
                if piece is not None:
                    text += piece
                    self._advance()
                    continue
            held_text = self._decode(self._read_offset, len(ids))  # starts at a character boundary
            if not held_text.endswith(_REPLACEMENT_CHAR):
                text += held_text
                self._advance()
        return text

    def _push_stream(self, token_ids: Sequence[int]) -> str:
        stream, backend = self._stream, self._decoding.backend
        ids = self.output_token_ids
        text = ""
        for i, token_id in enumerate(token_ids):
            ids.append(token_id)
            try:
                piece = stream.step(backend, token_id)
            except Exception:  # DecodeStream's prefix check failed: go on with the same window in Python
                self._stream = None
                ids.extend(list(token_ids)[i + 1 :])
                return text + self._emit(hold_incomplete=True)
            if piece is not None:  # DecodeStream moved its window as _emit does
                text += piece
                self._advance()
        return text

    def push(self, token_ids: Sequence[int]) -> str:
        """Add generated tokens; return the text they complete (possibly ``""``)."""
        if self._pieces is not None:
            return self._push_byte_level(token_ids)
        if self._stream is not None:
            return self._push_stream(token_ids)
        self.output_token_ids.extend(token_ids)
        return self._emit(hold_incomplete=True)

    def finish(self) -> str:
        """Return the text still held back (an incomplete character decodes as U+FFFD)."""
        return self._emit(hold_incomplete=False)
