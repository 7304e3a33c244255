"""OpenAI wire format: request models (validated at the boundary) and error bodies.

Requests are strict: an unknown field is a 400, not silently ignored, so a typo in a
sampling parameter never goes unnoticed. Two extra fields select Parametric RAG
behaviour per request (the ``openai`` client sends them with ``extra_body=``):
``mode`` (overrides the mode implied by the model name) and ``top_k``.

Everything vLLM or the tokenizer would refuse later is refused here, as a 400: text that
is not valid Unicode (a lone UTF-16 surrogate, JSON ``"\\ud800"``), an empty stop string,
a seed outside 64 bits. The models are also the OpenAPI schema the server publishes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    WithJsonSchema,
    field_validator,
)

from prag_vllm.modes import MODES


def printable(text: str) -> str:
    """``text`` with any lone surrogate written as ``\\udXXX`` (so an error message can be UTF-8 encoded)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class OpenAIError(Exception):
    """An error answered as ``{"error": {...}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        message, param = printable(message), None if param is None else printable(param)
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_body(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return OpenAIError(status, message, type, param, code).body()


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The body of every 4xx/5xx answer (the OpenAI API's)."""

    error: ErrorDetail


def _unicode(text: str) -> str:
    """Refuse a lone UTF-16 surrogate: it cannot be encoded, so no tokenizer takes it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"text is not valid Unicode: lone surrogate {text[exc.start]!a} at position {exc.start}") \
            from None
    return text


Text = Annotated[StrictStr, AfterValidator(_unicode)]
"""A string that is valid Unicode (JSON allows the escape of a lone surrogate; UTF-8 and tokenizers do not)."""


def _stop(text: str) -> str:
    if not text:
        raise ValueError("a stop sequence must not be empty")
    return text


StopText = Annotated[Text, AfterValidator(_stop)]
MAX_STOP = 4
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None

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
    model: Text = Field(description="prag-<mode> (GET /v1/models), or the served model's name (the default mode)",
                        examples=["prag-parametric"])
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: Temperature = 1.0
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: StrictInt = Field(default=1, ge=1, le=1, description="only n=1 is served")
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: Annotated[StopText | list[StopText] | None, WithJsonSchema({"anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": MAX_STOP},
        {"type": "null"}], "title": "Stop", "description": f"up to {MAX_STOP} non-empty stop sequences"})] = None
    seed: StrictInt | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    user: Text | None = None
    # vLLM's own extensions (same names and meaning as its OpenAI server)
    ignore_eos: StrictBool = False
    """Keep generating after the end-of-sequence token (fixed-length outputs for benchmarks)."""
    min_tokens: StrictInt = Field(default=0, ge=0)
    """Tokens to generate before end-of-sequence or a stop string may end the output."""
    # Parametric RAG extensions
    mode: Annotated[Text | None, WithJsonSchema({"anyOf": [{"enum": list(MODES)}, {"type": "null"}], "title": "Mode",
                                                  "description": "overrides the mode implied by model"})] = None
    """Answering mode; overrides the one implied by ``model`` (checked by the service: 400 if unknown)."""
    top_k: StrictInt | None = Field(default=None, json_schema_extra={"minimum": 1},
                                    description="documents to retrieve, 1..the server's max_top_k")
    """Documents to retrieve (1..the server's max_top_k; the app checks the range)."""

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: Any) -> list[str] | None:
        if v is None:
            return None
        v = [v] if isinstance(v, str) else v
        if len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
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
    prompt: Text | list[Text]
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
