"""OpenAI's completions and chat completions, as the executor's Generate speaks them.

Pure mapping with no I/O: the API key check, the request bodies (JSON parsed here, then pydantic
models, so a bad field or value is a 400 naming it), a body to a ``GenerateRequest``, the
executor's chunks to OpenAI's responses and stream chunks, and a gRPC status to an HTTP status
with OpenAI's error body (``{"error": {"message", "type", "param", "code"}}``). The HTTP side is
``openai_http``.

Token counts are the executor's own (the last chunk's ``usage``): it tokenized the prompt, so
the gateway never counts tokens itself.
"""

from __future__ import annotations

import hmac
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Literal

import grpc
from pydantic import BaseModel, Field, ValidationError, field_validator

from swapmoe.v1 import executor_pb2 as epb

# The executor's ceiling (swapmoe.executor.server.MAX_NEW_TOKENS_LIMIT): a chat without max_tokens
# may go on until the context is full, and the executor stops there ("length").
CHAT_MAX_TOKENS = 4096
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# max_new_tokens, top_k and token ids are uint32 in GenerateRequest: a larger number fits no field.
MAX_UINT32 = 2**32 - 1
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")

FINISH_REASONS = {epb.FINISH_REASON_LENGTH: "length", epb.FINISH_REASON_CONTEXT_FULL: "length",
                  epb.FINISH_REASON_STOP: "stop", epb.FINISH_REASON_EOS: "stop"}


# -- errors ------------------------------------------------------------------------------------

@dataclass
class ApiError(Exception):
    """An answer other than 200, with OpenAI's error body."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# gRPC status -> (HTTP status, OpenAI error type). Anything else is a 500.
HTTP_OF_GRPC = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "conflict_error"),
    grpc.StatusCode.ABORTED: (409, "conflict_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "not_implemented_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}

# The executor names the GenerateRequest field it refused (``sampling.temperature: ...``,
# swapmoe.core.errors.InvalidField); the client knows the OpenAI parameter it sent.
PARAM_OF_FIELD = {"sampling.temperature": "temperature", "sampling.top_p": "top_p", "sampling.top_k": "top_k",
                  "sampling.seed": "seed", "max_new_tokens": "max_tokens", "stop": "stop"}
_FIELD = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")


def error_from_rpc(code: grpc.StatusCode, details: str | None, prompt_param: str = "prompt") -> ApiError:
    """The HTTP answer for a failed Generate; ``prompt_param`` is what the client sent the prompt as."""
    status, kind = HTTP_OF_GRPC.get(code, (500, "server_error"))
    param = None
    if match := _FIELD.match(details or ""):
        name = match.group(1)
        fields = {**PARAM_OF_FIELD, "prompt": prompt_param}
        param = next((p for f, p in fields.items() if name == f or name.startswith((f + ".", f + "["))), None)
    message = details or code.name
    if status == 401:
        message = f"the executor refused the gateway's credentials: {message}"
    return ApiError(status, message, kind, param, code.name.lower())


def key_error(authorization: str | None, key: str) -> ApiError | None:
    """The 401 for an ``Authorization`` header that does not carry ``Bearer <key>``; None when it does."""
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        return ApiError(401, "missing API key: send the header `Authorization: Bearer KEY`",
                        "authentication_error", code="invalid_api_key")
    if not hmac.compare_digest(given.strip().encode(), key.encode()):
        return ApiError(401, "incorrect API key provided", "authentication_error", code="invalid_api_key")
    return None


def parse_body(raw: bytes, kind: type[BaseModel]) -> BaseModel:
    """``raw`` as a ``kind`` (``CompletionBody``, ``ChatBody``), or a 400: not JSON (numbers of more
    than 4,300 digits and nesting past Python's recursion limit included), a string that is not
    Unicode text, or a field out of its bounds, naming it."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiError(400, f"the request body is not JSON: {error}") from None
    except ValueError:  # Python's own bound on int() of a decimal string
        raise ApiError(400, "the request body holds a number of more than 4300 digits") from None
    except RecursionError:
        raise ApiError(400, "the request body nests arrays or objects too deep") from None
    if _holds_lone_surrogate(data):
        param = next((k for k, v in data.items() if _holds_lone_surrogate([k, v])), None) \
            if isinstance(data, dict) else None
        param = None if param is None else param.encode("utf-8", "backslashreplace").decode()  # as the client spelt it
        raise ApiError(400, f"{param or 'the request body'}: holds a lone UTF-16 surrogate (a \\ud800-\\udfff "
                            "escape), which is not Unicode text", param=param)
    try:
        return kind.model_validate(data)
    except ValidationError as error:
        raise error_from_validation(error.errors()) from None


def _holds_lone_surrogate(data) -> bool:
    """Whether a string (or key) in parsed JSON holds a lone surrogate: JSON's ``\\ud800`` escape
    can spell one, but no UTF-8 text (the executor's, the tokenizer's) can hold it."""
    stack = [data]
    while stack:  # no recursion: JSON may nest as deep as the parser allows
        value = stack.pop()
        if isinstance(value, str):
            if _LONE_SURROGATE.search(value):
                return True
        elif isinstance(value, dict):
            stack += [*value, *value.values()]
        elif isinstance(value, list):
            stack += value
    return False


def error_from_validation(errors: list[dict]) -> ApiError:
    """A 400 for pydantic's first complaint about the body: ``param`` is the top-level field,
    the message gives the full path (``messages.0.content: ...``)."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request body"}
    loc = [str(p) for p in first.get("loc", ())]
    message = f"{'.'.join(loc)}: {first['msg']}" if loc else first["msg"]
    return ApiError(400, message, param=loc[0] if loc else None)


# -- request bodies -----------------------------------------------------------------------------

class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampled(BaseModel):
    """What both endpoints take. Unknown fields are ignored, as OpenAI's own server does."""

    # Clients may send null for any optional parameter: None means OpenAI's default.
    model: str
    max_tokens: int | None = Field(None, ge=1, le=MAX_UINT32)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)  # OpenAI's range; default 1, 0 is greedy
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=0, le=MAX_UINT32)  # an extension, as vLLM's server has it; 0 disables it
    seed: int | None = Field(None, ge=0, lt=1 << 64)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    logprobs: bool | int | None = None
    logit_bias: dict[str, float] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None

    def unsupported(self) -> ApiError | None:
        """A 400 for a parameter the executor cannot honour, rather than silently ignoring it."""
        checks = [("n", self.n not in (None, 1), "only n=1 is supported"),
                  ("logprobs", bool(self.logprobs), "log probabilities are not supported"),
                  ("logit_bias", bool(self.logit_bias), "logit_bias is not supported"),
                  ("presence_penalty", bool(self.presence_penalty), "penalties are not supported"),
                  ("frequency_penalty", bool(self.frequency_penalty), "penalties are not supported")]
        return next((ApiError(400, f"{p}: {why}", param=p) for p, bad, why in checks if bad), None)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionBody(_Sampled):
    prompt: str | list[str] | list[int]
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _token_ids_in_range(cls, prompt):
        """Token ids the request can carry (the executor checks them against its vocabulary)."""
        if isinstance(prompt, list):
            ids = (t for t in prompt if isinstance(t, int) and not isinstance(t, bool))
            if (bad := next((t for t in ids if not 0 <= t <= MAX_UINT32), None)) is not None:
                raise ValueError(f"{bad} is not a token id (0 to {MAX_UINT32})")
        return prompt

    def unsupported(self) -> ApiError | None:
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str) and len(self.prompt) > 1:
            return ApiError(400, "prompt: one prompt per request is supported", param="prompt")
        for p, bad in (("echo", self.echo), ("best_of", self.best_of not in (None, 1)), ("suffix", self.suffix)):
            if bad:
                return ApiError(400, f"{p}: not supported", param=p)
        return super().unsupported()


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None

    def for_template(self) -> dict:
        """As chat templates expect it: text content (parts joined)."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or ())
        return {"role": self.role, "content": text, **({"name": self.name} if self.name else {})}


class ChatBody(_Sampled):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_UINT32)


# -- bodies -> GenerateRequest --------------------------------------------------------------------

def generate_request(body: _Sampled, prompt: str | list[int], max_tokens: int, request_id: str) -> epb.GenerateRequest:
    """The executor's request for ``prompt`` (text, tokenized by the executor, or token ids)."""
    temperature = 1.0 if body.temperature is None else body.temperature
    sampling = epb.SamplingParams(temperature=temperature, top_p=body.top_p or 1.0, top_k=body.top_k or 0)
    if body.seed is not None:
        sampling.seed = body.seed
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or ())
    request = epb.GenerateRequest(max_new_tokens=max_tokens, sampling=sampling, stop=stop, request_id=request_id)
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.ids.extend(prompt)
    return request


def completion_prompt(body: CompletionBody) -> str | list[int]:
    return body.prompt[0] if isinstance(body.prompt, list) and body.prompt and isinstance(body.prompt[0], str) \
        else body.prompt


def render_chat(tokenizer, model: str, messages: list[Message]) -> str:
    """The prompt text of a conversation, through the tokenizer's own chat template (as
    transformers renders it, so the gateway prompts the model exactly as its authors did)."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        why = "no tokenizer was given to the gateway (--tokenizer DIR)" if tokenizer is None else \
            "its tokenizer has no chat template"
        raise ApiError(400, f"model {model!r} has no chat template ({why}); use /v1/completions",
                       param="messages", code="no_chat_template")
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template([m.for_template() for m in messages], tokenize=False,
                                             add_generation_prompt=True)
    except TemplateError as error:  # e.g. the template's raise_exception on roles out of order
        raise ApiError(400, f"messages: the chat template refused them: {error}", param="messages") from None


# -- executor chunks -> responses -----------------------------------------------------------------

@dataclass
class Result:
    """What a generation produced, summed over its chunks."""

    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, chunk: epb.GenerateResponse) -> None:
        self.text += chunk.text
        if chunk.finish_reason:
            self.finish_reason = FINISH_REASONS.get(chunk.finish_reason, "stop")
            self.prompt_tokens, self.completion_tokens = chunk.usage.prompt_tokens, chunk.usage.completion_tokens

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


@dataclass(frozen=True)
class Endpoint:
    """What differs between /v1/completions and /v1/chat/completions."""

    id_prefix: str
    object: str
    chunk_object: str
    prompt_param: str
    chat: bool

    def choice(self, text: str, finish_reason: str | None) -> dict:
        content = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
        return {"index": 0, **content, "logprobs": None, "finish_reason": finish_reason}

    def delta(self, text: str, finish_reason: str | None, first: bool) -> dict:
        if not self.chat:
            return self.choice(text, finish_reason)
        delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text or first else {})
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


COMPLETIONS = Endpoint("cmpl", "text_completion", "text_completion", "prompt", chat=False)
CHAT = Endpoint("chatcmpl", "chat.completion", "chat.completion.chunk", "messages", chat=True)


@dataclass
class Reply:
    """One answer's identity, shared by its stream chunks."""

    endpoint: Endpoint
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.id = self.id or f"{self.endpoint.id_prefix}-{uuid.uuid4().hex}"

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, result: Result) -> dict:
        """The non-streaming response."""
        return {**self._head(self.endpoint.object), "choices": [self.endpoint.choice(result.text, result.finish_reason)],
                "usage": result.usage()}

    def chunk(self, text: str, finish_reason: str | None = None, first: bool = False) -> dict:
        return {**self._head(self.endpoint.chunk_object), "choices": [self.endpoint.delta(text, finish_reason, first)]}

    def usage_chunk(self, result: Result) -> dict:
        """The last chunk when ``stream_options.include_usage`` is set: no choices, the usage."""
        return {**self._head(self.endpoint.chunk_object), "choices": [], "usage": result.usage()}
