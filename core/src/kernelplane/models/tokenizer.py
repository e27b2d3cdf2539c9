"""Tokenizer: a `tokenizers` object plus the chat template and special ids.

Chat templates are Jinja run in a sandbox with the helpers Hugging Face
templates expect (``raise_exception``, ``strftime_now``, a ``tojson`` that
keeps non-ASCII text, loop controls), so a template renders the same text
here as in ``transformers``.
"""
from __future__ import annotations

import datetime
import json
from typing import Optional

import jinja2
import jinja2.ext
import jinja2.sandbox


class ChatTemplateError(ValueError):
    """The chat template refused the messages (its ``raise_exception``) or could not render."""


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def compile_chat_template(source: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


class Tokenizer:
    """Text <-> token ids for one model.

    ``add_bos`` prepends ``bos_token_id`` on ``encode`` for formats whose
    backend has no post-processor doing it (GGUF's ``add_bos_token``);
    Hugging Face ``tokenizer.json`` post-processors add their own specials.
    """

    def __init__(self, backend, eos_token_ids: list[int], bos_token_id: Optional[int] = None,
                 chat_template: Optional[str] = None, add_bos: bool = False,
                 bos_token: Optional[str] = None, eos_token: Optional[str] = None):
        self.backend = backend  # tokenizers.Tokenizer
        self.eos_token_ids = list(eos_token_ids)
        self.bos_token_id = bos_token_id
        self.chat_template = chat_template
        self.add_bos = add_bos
        self.bos_token = bos_token if bos_token is not None else self._token(bos_token_id)
        self.eos_token = eos_token if eos_token is not None else self._token(self.eos_token_ids[0] if self.eos_token_ids else None)
        self._template = compile_chat_template(chat_template) if chat_template else None

    def _token(self, token_id: Optional[int]) -> str:
        return (self.backend.id_to_token(token_id) or "") if token_id is not None else ""

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_text(self, token_id: int) -> Optional[str]:
        return self.backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise ChatTemplateError("this model has no chat template; send a plain prompt instead")
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except jinja2.exceptions.TemplateError as exc:
            raise ChatTemplateError(f"chat template: {exc}") from exc

    # The converted-weight cache stores a tokenizer as tokenizer.json + these fields.
    def metadata(self) -> dict:
        return {"eos_token_ids": self.eos_token_ids, "bos_token_id": self.bos_token_id,
                "chat_template": self.chat_template, "add_bos": self.add_bos,
                "bos_token": self.bos_token, "eos_token": self.eos_token}

    @classmethod
    def from_saved(cls, tokenizer_json: str, metadata: dict) -> "Tokenizer":
        from tokenizers import Tokenizer as Backend

        return cls(Backend.from_str(tokenizer_json), **metadata)
