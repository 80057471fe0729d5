"""
Request and response schemas (they are also the OpenAPI schema at /openapi.json), the limits they enforce, and
APIError, the one way a request is refused.
"""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

# Abuse limits (as nanochat's server)
MAX_MESSAGES_PER_REQUEST = 500
MAX_MESSAGE_LENGTH = 8000
MAX_TOTAL_CONVERSATION_LENGTH = 32000
MAX_TOP_K = 200
MAX_MAX_TOKENS = 4096
MAX_SAMPLES = 8  # OpenAI's `n`: rows decoded together from one prefill
MAX_SEED = 2**53 - 1  # the largest integer a JSON number (a float64) holds exactly: a larger bound is not one


class APIError(StarletteHTTPException):
    """An error answered as JSON. An HTTPException, so that FastAPI lets it through from reading the body."""

    def __init__(self, status, message, param=None, code=None, headers=None):
        super().__init__(status, message, headers)
        self.status, self.message, self.param, self.code = status, message, param, code


# -----------------------------------------------------------------------------
# Requests


def integral(value):
    """The request models are strict: the schema is the contract, so `"seed": false` or `"n": "2"` is refused rather
    than coerced. But 5.0 is an integer to JSON Schema (and to JavaScript), so integer fields take it."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["text"]
    text: str = Field(min_length=1, max_length=MAX_MESSAGE_LENGTH)


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True)
    role: Literal["system", "user", "assistant"]
    # OpenAI clients may send content as a list of text parts
    content: Annotated[str, Field(min_length=1, max_length=MAX_MESSAGE_LENGTH)] | Annotated[
        list[TextPart], Field(min_length=1)] = Field(
        description=f"text, or text parts that together have at most {MAX_MESSAGE_LENGTH} characters")

    def text(self):
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


MESSAGES_RULES = (
    f"At most {MAX_TOTAL_CONVERSATION_LENGTH} characters in all. Chat models: an optional system message, then "
    "user and assistant alternating, the last one from the user. The prompt must fit the model's context. "
    "JSON Schema cannot say these (sums, order, token counts): a request that breaks one gets 400 with `code` "
    "conversation_too_long, message_too_long, invalid_roles or context_length_exceeded.")


class ChatRequest(BaseModel):
    """nanochat's request. Unset sampling fields take the server's defaults."""
    model_config = ConfigDict(strict=True)
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES_PER_REQUEST, description=MESSAGES_RULES)
    model: str | None = Field(None, description="a served model id (GET /v1/models); default: the first one")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 is greedy")
    top_k: int | None = Field(None, ge=1, le=MAX_TOP_K)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1, le=MAX_MAX_TOKENS)
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="default: random")
    _integral = field_validator("top_k", "max_tokens", "seed", mode="before")(integral)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool = False


class OpenAIChatRequest(ChatRequest):
    """OpenAI's chat.completions request (the subset that applies; other fields are ignored)."""
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_MAX_TOKENS, description="alias of max_tokens")
    n: int = Field(1, ge=1, le=MAX_SAMPLES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    _integral_too = field_validator("max_completion_tokens", "n", mode="before")(integral)


def check_lengths(messages):
    """The length limits JSON Schema cannot say: the sum over messages, and text parts that add up."""
    total = sum(len(m.text()) for m in messages)
    if total > MAX_TOTAL_CONVERSATION_LENGTH:
        raise APIError(400, f"the conversation has {total} characters; at most {MAX_TOTAL_CONVERSATION_LENGTH} "
                       f"are allowed", "messages", "conversation_too_long")
    for i, m in enumerate(messages):
        if len(m.text()) > MAX_MESSAGE_LENGTH:
            raise APIError(400, f"message {i} has {len(m.text())} characters; at most {MAX_MESSAGE_LENGTH} "
                           f"are allowed per message", f"messages.{i}.content", "message_too_long")


# -----------------------------------------------------------------------------
# Responses


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def error_response(status, message, param=None, code=None, headers=None):
    """Every refusal in one format: {"error": {"message", "type", "param", "code"}}."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = ErrorResponse(error=ErrorDetail(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"] = Field(
        description="stop: the model ended its reply; length: max_tokens, the context or the server's time limit "
                    "(--max_generation_seconds) ran out")


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "nanochat"
    source: str = Field(description="checkpoint source: base models complete text, the others chat")
    model_type: str
    workers: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# The responses that routes declare besides their model, for /openapi.json
ERROR_RESPONSES = {"4XX": {"model": ErrorResponse,
                           "description": "invalid request or Host (400), a web page of another origin (403), unknown "
                                          "model or route (404), body too large (413)"}}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}
QUEUE_FULL_RESPONSE = {503: {"model": ErrorResponse, "description": "the queue is full", "headers": RETRY_AFTER}}
SSE_RESPONSE = {200: {"content": {"text/event-stream": {}}, "description": "server-sent events"}}
