"""Prompt text a user (or an attacker) supplies: what is refused before it reaches a model or a file.

HTML, script tags, quotes and any printable Unicode are accepted: a prompt is data, stored JSON-escaped and
shown HTML-escaped. Control characters are refused: they are invisible, so a prompt containing them reads
differently in a terminal, a log or a report from what the model was given (bidirectional overrides can
even show the words in another order), and no tokenizer gives them a meaning.
"""

from __future__ import annotations

import unicodedata

from duo.errors import UserError

# Bidirectional embeddings, overrides and isolates, and the Unicode line/paragraph separators.
INVISIBLE = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u2028\u2029")


def bad_character(text: str) -> tuple[int, str] | None:
    """(position, character) of the first refused character, or None. Tab counts as a space."""
    for i, ch in enumerate(text):
        if ch in INVISIBLE or (unicodedata.category(ch) == "Cc" and ch != "\t"):
            return i, ch
    return None


def check_prompt(text: str, where: str) -> str:
    """The prompt unchanged, or a UserError naming where it came from, the character and the fix."""
    found = bad_character(text)
    if found is not None:
        i, ch = found
        name = unicodedata.name(ch, "control character")
        raise UserError(
            f"{where}: the prompt {text[:40]!r} has an invisible control character U+{ord(ch):04X} ({name}) at "
            f"position {i}; prompts must be plain text. Delete that character and rerun."
        )
    return text


def check_prompt_lengths(family, prompts: list[str], fix: str = "shorten it") -> None:
    """Refuse a prompt the text encoder would silently cut: the image would ignore its last words."""
    limit = family.max_prompt_tokens
    for p in prompts:
        n = family.token_count(p)
        if n > limit:
            raise UserError(
                f"the prompt {p[:60]!r}... takes {n} tokens, but this model's text encoder reads at most {limit} "
                f"(start and end tokens included); {fix}."
            )
