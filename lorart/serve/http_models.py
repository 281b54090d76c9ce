"""Pydantic request models of the OpenAI-compatible endpoints, and the response bodies.

The models check *types* (a string where a string belongs, a list of messages...);
the *ranges* of sampling parameters (max_tokens >= 1, 0 <= temperature <= 2...) are
checked once, by the engine's ``SamplingParams.validate()``, so there is one
definition of what is valid. Unknown fields are ignored (clients send vendor
extensions); fields lorart cannot honour (logprobs, echo, suffix, penalties, tools)
are rejected with a 400 naming them rather than silently ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .http_errors import APIError


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _SamplingFields(BaseModel):
    """Fields shared by ``/v1/completions`` and ``/v1/chat/completions``."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # vLLM extension; 0 or -1: off
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # vLLM extension
    ignore_eos: bool = False  # vLLM extension
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Accepted only at their neutral values (see reject_unsupported).
    logprobs: Any = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    best_of: int | None = None

    def reject_unsupported(self) -> None:
        """400 for options lorart does not implement, named, instead of ignoring them."""
        unsupported = {
            "logprobs": self.logprobs not in (None, False, 0),
            "presence_penalty": self.presence_penalty not in (None, 0.0),
            "frequency_penalty": self.frequency_penalty not in (None, 0.0),
            "logit_bias": bool(self.logit_bias),
            "best_of": self.best_of not in (None, 1),
        }
        for name, bad in unsupported.items():
            if bad:
                raise APIError(400, f"{name} is not supported by lorart serve", param=name)

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``: one prompt (text or token ids) or a list of them."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    echo: bool = False
    suffix: str | None = None

    def reject_unsupported(self) -> None:
        super().reject_unsupported()
        if self.echo:
            raise APIError(400, "echo is not supported by lorart serve", param="echo")
        if self.suffix:
            raise APIError(400, "suffix is not supported by lorart serve", param="suffix")

    def prompts(self) -> list[dict]:
        """The prompts as ``engine.submit`` keyword arguments, one dict per prompt."""
        p = self.prompt
        if isinstance(p, str):
            return [{"prompt": p}]
        if not p:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [{"prompt_token_ids": list(p)}]
        if all(isinstance(x, str) for x in p):
            return [{"prompt": x} for x in p]
        if all(isinstance(x, list) for x in p):
            return [{"prompt_token_ids": list(x)} for x in p]
        raise APIError(400, "prompt must be a string, a list of strings, a list of token ids "
                            "or a list of lists of token ids", param="prompt")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self, index: int) -> str:
        """The message's text; content parts must all be ``{"type": "text"}``."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"messages[{index}].content: only text parts are supported "
                                    f"(got type {part.get('type')!r})",
                               param=f"messages.{index}.content")
            texts.append(part["text"])
        return "".join(texts)


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``: the chat template is applied by the engine."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    tools: list[Any] | None = None

    def reject_unsupported(self) -> None:
        super().reject_unsupported()
        if self.tools:
            raise APIError(400, "tools are not supported by lorart serve", param="tools")

    def message_dicts(self) -> list[dict]:
        # "developer" is OpenAI's newer name for the system role; chat templates know "system".
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text(i)}
                for i, m in enumerate(self.messages)]


class LoadLoraRequest(BaseModel):
    """``POST /v1/load_lora_adapter`` (vLLM's name and fields)."""

    model_config = ConfigDict(extra="ignore")
    lora_name: str = Field(min_length=1, max_length=128)
    lora_path: str = Field(min_length=1)


class UnloadLoraRequest(BaseModel):
    """``POST /v1/unload_lora_adapter`` (vLLM's name and fields)."""

    model_config = ConfigDict(extra="ignore")
    lora_name: str = Field(min_length=1)


# ---- response bodies ---------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_choice(index: int, text: str, finish_reason: str | None) -> dict:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def chat_choice(index: int, text: str, finish_reason: str | None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text},
            "logprobs": None, "finish_reason": finish_reason}


def chat_chunk_choice(index: int, delta: dict, finish_reason: str | None) -> dict:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
