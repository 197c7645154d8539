"""Fine-tuning records: conversations or prompt/completion pairs, rendered as pieces that are trained or not.

A conversation (``{"messages": [{"role", "content"}, ...]}``) is rendered with a chat template: the
tokenizer's own (``chat_template`` in its tokenizer_config.json, a jinja2 template as Hugging Face writes
it) or a named default. Masks must be exact, so the rendering is cut into pieces: the text that message i
adds to the rendering of messages 0..i-1. An assistant message's piece is split at its content: the
template's header before it is masked, the content and the end of turn after it are trained (so the model
learns to stop). Everything else (system, user, headers) is masked. Each piece is tokenized on its own and
the tokens concatenated, so every token belongs to exactly one piece; at piece boundaries this can
tokenize differently from the whole string, the way Hugging Face's assistant masks do not.

A prompt/completion pair (``{"prompt", "completion"}``) is the prompt (masked) followed by the completion
(trained), or, with a chat template named, a user and an assistant message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from gptscale.data.inputs import _open_text
from gptscale.data.manifest import DataError

ROLES = ("system", "user", "assistant")
TRAINED_ROLE = "assistant"

TEMPLATES = {
    # OpenAI's ChatML, as Qwen and many fine-tunes use it.
    "chatml": "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    # Plain role prefixes, for tokenizers without special tokens.
    "plain": "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}",
}
DEFAULT_TEMPLATE = "chatml"
FORMATS = ("text", "chat", "prompt-completion")


@dataclass(frozen=True)
class Piece:
    text: str
    trained: bool


class ChatTemplate:
    """A jinja2 chat template, rendered the way transformers renders ``apply_chat_template``."""

    def __init__(self, source: str, name: str, special: Optional[dict] = None):
        def raise_exception(message):
            raise jinja2.TemplateError(message)

        environment = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        environment.globals["raise_exception"] = raise_exception
        try:
            self.template = environment.from_string(source)
        except jinja2.TemplateError as error:
            raise DataError(f"chat template {name}: not a jinja2 template ({error})") from error
        self.name = name
        self.special = dict(special or {})

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.special)

    def pieces(self, messages: list[dict], where: str) -> list[Piece]:
        """The conversation as masked and trained pieces; ``where`` (file:line) names it in errors."""
        pieces: list[Piece] = []
        previous = ""
        for count, message in enumerate(messages, start=1):
            try:
                text = self.render(messages[:count])
            except jinja2.TemplateError as error:
                raise DataError(f"{where}: chat template {self.name} refuses the conversation ({error})") from None
            if not text.startswith(previous):
                raise DataError(
                    f"{where}: chat template {self.name} renders message {count} by changing what "
                    "came before it, so trained tokens cannot be told apart; choose --chat-template"
                )
            added, previous = text[len(previous) :], text
            if message["role"] != TRAINED_ROLE:
                pieces.append(Piece(added, False))
                continue
            at = added.find(message["content"])
            if at < 0:
                raise DataError(
                    f"{where}: chat template {self.name} does not render message {count}'s content "
                    "verbatim, so its tokens cannot be found; choose --chat-template"
                )
            pieces += [Piece(added[:at], False), Piece(added[at:], True)]
        return [piece for piece in pieces if piece.text]


def load_template(choice: Optional[str], tokenizer: Optional[str | Path]) -> ChatTemplate:
    """``--chat-template`` (a name in TEMPLATES or a jinja2 file), else the tokenizer's own, else chatml."""
    config = _tokenizer_config(tokenizer)
    special = {name: _token_text(config.get(name)) for name in ("bos_token", "eos_token")}
    if choice is None:
        own = config.get("chat_template")
        if isinstance(own, list):  # several named templates: the default one
            own = next((entry["template"] for entry in own if entry.get("name") == "default"), None)
        if own:
            return ChatTemplate(own, f"of {tokenizer}", special)
        choice = DEFAULT_TEMPLATE
    if choice in TEMPLATES:
        return ChatTemplate(TEMPLATES[choice], choice, special)
    path = Path(choice)
    if not path.is_file():
        raise DataError(f"--chat-template {choice}: neither a file nor one of {sorted(TEMPLATES)}")
    return ChatTemplate(path.read_text(encoding="utf-8"), str(path), special)


def _tokenizer_config(tokenizer: Optional[str | Path]) -> dict:
    if tokenizer is None:
        return {}
    path = Path(tokenizer)
    file = (path if path.is_dir() else path.parent) / "tokenizer_config.json"
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except ValueError as error:
        raise DataError(f"{file}: not JSON ({error})") from None


def _token_text(token) -> str:
    if isinstance(token, dict):  # transformers' AddedToken serialisation
        return token.get("content", "")
    return token or ""


def check_messages(record, where: str) -> list[dict]:
    """The messages of a chat record, or a DataError naming ``where`` (file:line) and what is wrong."""
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        raise DataError(f'{where}: no \'messages\' list (a chat record is {{"messages": [{{"role", "content"}}]}})')
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: message {number} lacks a 'role' or a 'content' field")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise DataError(f"{where}: message {number} has unknown role {role!r} (known: {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise DataError(f"{where}: message {number}'s content is not a string")
        if role == TRAINED_ROLE and not content.strip():
            raise DataError(f"{where}: message {number} is an empty assistant turn")
    if not any(message["role"] == TRAINED_ROLE for message in messages):
        raise DataError(f"{where}: no assistant message, nothing to train on")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def check_pair(record, where: str) -> tuple[str, str]:
    """(prompt, completion) of a prompt-completion record, or a DataError naming ``where``."""
    for name in ("prompt", "completion"):
        if not isinstance(record, dict) or not isinstance(record.get(name), str):
            raise DataError(f'{where}: no string field {name!r} (a record is {{"prompt": ..., "completion": ...}})')
    if not record["completion"].strip():
        raise DataError(f"{where}: empty completion")
    return record["prompt"], record["completion"]


def _raise(message: str) -> None:
    raise DataError(message)


def read_records(
    path: Path, data_format: str, template: Optional[ChatTemplate], bad: Callable[[str], None] = _raise
) -> Iterator[list[Piece]]:
    """The records of one JSON-lines file as pieces, in file order. A bad record's message names file and line
    and goes to ``bad``, which raises it (the default) or counts it and lets the file go on (``--on-error skip``)."""
    with _open_text(path) as stream:
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                pieces = _record_pieces(line, f"{path}:{number}", data_format, template)
            except DataError as error:
                bad(str(error))
                continue
            yield pieces


def _record_pieces(line: str, where: str, data_format: str, template: Optional[ChatTemplate]) -> list[Piece]:
    try:
        record = json.loads(line)
    except ValueError as error:
        raise DataError(f"{where}: not JSON ({error})") from None
    if data_format == "chat":
        assert template is not None, "the chat format always has a template"
        return template.pieces(check_messages(record, where), where)
    prompt, completion = check_pair(record, where)
    if template is None:
        return [piece for piece in (Piece(prompt, False), Piece(completion, True)) if piece.text]
    return template.pieces([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], where)
