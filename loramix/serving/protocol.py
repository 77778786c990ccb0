"""OpenAI request schemas, the X-LoRA extensions and OpenAI error objects.

Requests are validated here, before anything reaches the engine: every problem becomes an
`ApiError` that renders as OpenAI's error object,

    {"error": {"message": ..., "type": "invalid_request_error", "param": ..., "code": ...}}

with the HTTP status OpenAI uses (400 bad request, 404 unknown model, 503 shutting down).
As OpenAI does, a field the server does not recognise is refused ("Unrecognized request
argument supplied: max_token"), and every value must have its JSON type: booleans are JSON
booleans (`"stream": "yes"` is refused), integers JSON integers (`"max_tokens": "12"` and
`"n": 2.0` are refused), numbers JSON numbers (`"temperature": "0.5"` is refused,
`"temperature": 1` is a number). Accepted: the fields of the schemas below, OpenAI's metadata
fields that change no answer (`IGNORED`), and the OpenAI parameters it does not implement at
their defaults (`UNSUPPORTED`).

X-LoRA extensions (extra body fields; the `openai` client passes them with `extra_body`):

    return_expert_weights  bool: each choice carries `expert_weights` (one list of E floats per
                           generated token: its scalings averaged over the adapted modules) and
                           `expert_tokens` (the text each token added); the response names the
                           experts in a top-level `experts` list
    return_layer_scalings  bool: each choice carries `layer_scalings`, an L x E matrix (the
                           scalings averaged over its generated tokens; rows follow the
                           top-level `adapted_modules`), in the last chunk when streaming
    scalings_mode          "granular" | "frozen" | "merged" (default: the server's --mode)
    fixed_expert_weights   {expert name: weight}: a fixed mix instead of the gate (missing
                           experts weigh 0); the scalings mode then does not apply
    ignore_eos             bool (as in vLLM): generate `max_tokens` tokens even past the end of
                           text; for load tests with fixed lengths
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from loramix.modes import ScalingsMode
from loramix.serving.config import MODES

MAX_CHOICES = 16  # `n`; choice i samples with `seed + i`, so the seed leaves room for them

# OpenAI parameters this server does not implement: refused when set to a non-default value.
UNSUPPORTED = {
    "logprobs": (None, False),
    "top_logprobs": (None,),
    "logit_bias": (None, {}),
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
}

# OpenAI parameters that change no answer (who asks, what to bill or store): accepted, ignored.
IGNORED = (
    "user",
    "metadata",
    "store",
    "service_tier",
    "parallel_tool_calls",
    "prompt_cache_key",
    "safety_identifier",
)


class ApiError(Exception):
    """An error the API returns as an OpenAI error object."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.kind = (
            message,
            status,
            param,
            code,
            kind,
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


# The request models are strict: no value is converted to another JSON type (a string to a
# number, 1 to true, 2.0 to an integer); an integer is still a number, as in JSON.
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False
    include_obfuscation: bool = True  # OpenAI's padding against side channels; unused


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1 - MAX_CHOICES)
    return_expert_weights: bool = False
    return_layer_scalings: bool = False
    scalings_mode: ScalingsMode | None = None
    fixed_expert_weights: dict[str, float] | None = None
    ignore_eos: bool = False

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(
                "stop: give at most 4 non-empty strings", param="stop", code="invalid_value"
            )
        return tuple(stops)

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def token_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int]

    def token_budget(self) -> int | None:
        return self.max_tokens


def _request_path(data: Any, loc: tuple[Any, ...]) -> list[Any]:
    """The part of a pydantic error location that leads through the request itself: its
    field names and list indices, without the names of the types a union tried (`stop.str`,
    `messages.0.content.str` become `stop` and `messages.0.content`)."""
    path, value = [], data
    for part in loc:
        in_dict = isinstance(value, dict) and part in value
        in_list = isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value)
        if not (in_dict or in_list):
            break
        value = value[part]
        path.append(part)
    return path or list(loc[:1])


def parse(kind: type[_Request], data: Any) -> Any:
    """Validates a decoded JSON body; raises `ApiError` naming the first bad field."""
    if not isinstance(data, dict):
        raise ApiError("the request body must be a JSON object", code="invalid_body")
    unknown = sorted(set(data) - set(kind.model_fields) - set(UNSUPPORTED) - set(IGNORED))
    if unknown:
        raise ApiError(
            f"Unrecognized request argument supplied: {', '.join(unknown)}",
            param=unknown[0],
            code="unknown_parameter",
        )
    try:
        request = kind.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        missing = first["type"] == "missing"  # its location ends with the missing field
        loc = first["loc"] if missing else _request_path(data, first["loc"])
        param = ".".join(str(part) for part in loc) or None
        problem = "missing required parameter" if missing else first["msg"]
        raise ApiError(
            f"{param}: {problem}" + (f" (got {first['input']!r})" if "input" in first else ""),
            param=param,
            code="missing_required_parameter" if missing else "invalid_value",
        ) from None
    for name, defaults in UNSUPPORTED.items():
        # of the default's JSON type too: in Python `0 == False` and `True == 1`
        if name in data and not any(
            data[name] == value and type(data[name]) is type(value) for value in defaults
        ):
            raise ApiError(
                f"{name} is not supported by this server; leave it out",
                param=name,
                code="unsupported_parameter",
            )
    if request.scalings_mode is not None and request.scalings_mode not in MODES:
        raise ApiError(f"scalings_mode: use one of {', '.join(MODES)}", param="scalings_mode")
    return request


def fixed_weights(request: _Request, experts: list[str]) -> tuple[float, ...] | None:
    """`(E,)` the request's fixed mix in expert order, or None."""
    mix = request.fixed_expert_weights
    if mix is None:
        return None
    unknown = sorted(set(mix) - set(experts))
    if unknown:
        raise ApiError(
            f"fixed_expert_weights: unknown expert(s) {unknown}; the experts are {experts}",
            param="fixed_expert_weights",
            code="invalid_value",
        )
    weights = list(mix.values())
    if (
        not mix
        or not all(math.isfinite(w) and w >= 0 for w in weights)
        or not 0 < sum(weights) < math.inf
    ):
        raise ApiError(
            "fixed_expert_weights: give at least one expert with a weight > 0 and only finite, "
            'non-negative weights, e.g. {"' + experts[0] + '": 1.0}',
            param="fixed_expert_weights",
            code="invalid_value",
        )
    return tuple(float(mix.get(name, 0.0)) for name in experts)
