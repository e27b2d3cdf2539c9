"""Tokenizer: a `tokenizers` object plus the chat template and special ids."""
from __future__ import annotations

from typing import Optional

import jinja2
import jinja2.sandbox


def _raise(message):
    raise jinja2.TemplateError(message)


class Tokenizer:
    def __init__(self, backend, eos_token_ids: list[int], bos_token_id: Optional[int] = None,
                 chat_template: Optional[str] = None, add_bos: bool = False):
        self.backend = backend  # tokenizers.Tokenizer
        self.eos_token_ids = list(eos_token_ids)
        self.bos_token_id = bos_token_id
        self.chat_template = chat_template
        self.add_bos = add_bos
        self._template = None
        if chat_template:
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            self._template = env.from_string(chat_template)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_text(self, token_id: int) -> Optional[str]:
        return self.backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise ValueError("this model has no chat template; use /v1/completions with a plain prompt")
        special = lambda i: self.backend.id_to_token(i) if i is not None else ""
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=special(self.bos_token_id),
                                     eos_token=special(self.eos_token_ids[0] if self.eos_token_ids else None))
