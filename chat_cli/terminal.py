"""What the interactive front ends share about the terminal."""

from __future__ import annotations

from prompt_toolkit import PromptSession


def ctrl_c_keeps_prompting(prompt: PromptSession[str]) -> bool:
    """After Ctrl-C: True when it only discarded a half-typed line; False on an empty line, which exits like Ctrl-D."""
    return bool(prompt.default_buffer.text)
