"""Text <-> token ids over a Hugging Face ``tokenizer.json`` (torch-free; the router uses it).

Only the ``tokenizers`` library is imported, so the router starts fast.
:meth:`Tokenizer.encode` adds special tokens exactly as ``transformers`` (>= 5)
``AutoTokenizer.__call__`` does when a ``tokenizer.json`` exists: through that
file's post-processor, ignoring ``add_bos_token``/``add_eos_token`` in
``tokenizer_config.json`` (transformers drops those keys in that case).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_content(token: Any) -> str | None:
    """A special token from tokenizer_config: a string or ``{"content": ...}``."""
    if isinstance(token, dict):
        return token.get("content")
    return token if isinstance(token, str) else None


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


class Tokenizer:
    """A loaded tokenizer.

    Args:
        backend: the ``tokenizers.Tokenizer``.
        bos_token_id: beginning-of-sequence id, or ``None``.
        eos_token_ids: ids that end generation (from the generation config, the
            model config and the tokenizer config, in that order, deduplicated).
    """

    def __init__(self, backend: _HFTokenizer, bos_token_id: int | None, eos_token_ids: Sequence[int]) -> None:
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(eos_token_ids))

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> Tokenizer:
        """Load ``tokenizer.json`` plus the optional ``tokenizer_config.json``,
        ``generation_config.json`` and ``config.json`` of ``model_dir``.

        Raises:
            FileNotFoundError: no ``tokenizer.json`` in ``model_dir``.
        """
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        backend = _HFTokenizer.from_file(str(path))
        tok_config = _read_json(model_dir / "tokenizer_config.json")
        model_config = _read_json(model_dir / "config.json")
        gen_config = _read_json(model_dir / "generation_config.json")

        bos = _token_content(tok_config.get("bos_token"))
        eos = _token_content(tok_config.get("eos_token"))
        bos_id = backend.token_to_id(bos) if bos is not None else model_config.get("bos_token_id")
        eos_ids = _as_id_list(gen_config.get("eos_token_id")) + _as_id_list(model_config.get("eos_token_id"))
        eos_id = backend.token_to_id(eos) if eos is not None else None
        if eos_id is not None:
            eos_ids.append(eos_id)
        return cls(backend, bos_id, eos_ids)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (ids are in ``[0, vocab_size)``)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; special tokens as ``tokenizer.json``'s post-processor adds them."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``token_ids`` (invalid UTF-8 becomes U+FFFD); no space clean-up."""
        return self.backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)
