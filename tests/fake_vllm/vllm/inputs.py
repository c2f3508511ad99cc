"""vllm.inputs.TokensPrompt: a prompt given as token ids (a TypedDict, so a plain dict)."""

from typing import TypedDict


class TokensPrompt(TypedDict, total=False):
    prompt_token_ids: list[int]
