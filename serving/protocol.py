"""OpenAI wire format: request models (validated at the boundary) and error bodies.

Requests are strict: an unknown field is a 400, not silently ignored, so a typo in a
sampling parameter never goes unnoticed. Two extra fields select Parametric RAG
behaviour per request (the ``openai`` client sends them with ``extra_body=``):
``mode`` (overrides the mode implied by the model name) and ``top_k``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator


class OpenAIError(Exception):
    """An error answered as ``{"error": {...}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_body(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return OpenAIError(status, message, type, param, code).body()


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class _Sampling(BaseModel):
    """Sampling fields shared by both endpoints."""

    model_config = ConfigDict(extra="forbid")
    model: StrictStr
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: Temperature = 1.0
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: StrictInt = Field(default=1, ge=1, le=1, description="only n=1 is served")
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    user: StrictStr | None = None
    # vLLM's own extensions (same names and meaning as its OpenAI server)
    ignore_eos: StrictBool = False
    """Keep generating after the end-of-sequence token (fixed-length outputs for benchmarks)."""
    min_tokens: StrictInt = Field(default=0, ge=0)
    """Tokens to generate before end-of-sequence or a stop string may end the output."""
    # Parametric RAG extensions
    mode: StrictStr | None = None
    """Answering mode; overrides the one implied by ``model``."""
    top_k: StrictInt | None = None
    """Documents to retrieve (1..the server's max_top_k)."""

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: Any) -> list[str] | None:
        if v is None:
            return None
        v = [v] if isinstance(v, str) else v
        if len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    logprobs: Literal[False] | None = None
    response_format: dict | None = None

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, v: dict | None) -> dict | None:
        if v is not None and v.get("type", "text") != "text":
            raise ValueError("only response_format type 'text' is served")
        return v

    def question(self) -> str:
        """The retrieval query and the question: the last user message."""
        for m in reversed(self.messages):
            if m.role == "user":
                text = m.text().strip()
                if text:
                    return text
                break
        raise OpenAIError(400, "the last user message is missing or empty", param="messages", code="missing_question")


class CompletionRequest(_Sampling):
    prompt: StrictStr | list[StrictStr]
    echo: StrictBool = False
    logprobs: None = None
    suffix: None = None

    def question(self) -> str:
        prompt = self.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise OpenAIError(400, "exactly one prompt per request is served", param="prompt")
            prompt = prompt[0]
        if not prompt.strip():
            raise OpenAIError(400, "prompt is empty", param="prompt")
        return prompt
