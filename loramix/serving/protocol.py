"""OpenAI request schemas, the X-LoRA extensions and OpenAI error objects.

Requests are validated here, before anything reaches the engine: every problem becomes an
`ApiError` that renders as OpenAI's error object,

    {"error": {"message": ..., "type": "invalid_request_error", "param": ..., "code": ...}}

with the HTTP status OpenAI uses (400 bad request, 404 unknown model, 503 shutting down).
As OpenAI does, a field the server does not recognise is refused ("Unrecognized request
argument supplied: max_token", with a hint where a name it accepts is close: "(did you mean
max_tokens?)"), and every value must have its JSON type: booleans are JSON booleans
(`"stream": "yes"` is refused), integers JSON integers (`"max_tokens": "12"` and `"n": 2.0`
are refused), numbers JSON numbers (`"temperature": "0.5"` is refused, `"temperature": 1` is
a number). A bad value is named by its place in the request (`stop.0`,
`messages.0.content.0.text`). Accepted: the fields of the schemas below, OpenAI's metadata
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

import difflib
import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

from loramix.modes import ScalingsMode

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
    "modalities": (None, ["text"]),
    "reasoning_effort": (None, "none"),  # "none": no reasoning, as here; others think first
    "verbosity": (None, "medium"),  # OpenAI's default
    "audio": (None,),
    "prediction": (None,),
    "web_search_options": (None,),  # {} asks a search model to search
}

# OpenAI parameters that change no answer (who asks, what to bill or store): accepted with
# their JSON types (fields of `_Request`), ignored.
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
    # IGNORED: checked as OpenAI checks them, then unused
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

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


def _prompt_kind(prompt: Any) -> str:
    """Which of the prompt's types a value is meant as, read from its first item: so a bad
    item is named by its own place (`[[1], "a"]`: `prompt.1` is not a list), not as the
    first item not being of another type (`prompt.0` is not a string)."""
    if not isinstance(prompt, list):
        return "text"
    first = prompt[0] if prompt else ""
    if isinstance(first, list):
        return "token_lists"
    if isinstance(first, int | float) and not isinstance(first, bool):
        return "tokens"
    return "texts"


# a string, strings, token ids, or lists of token ids (a batch of tokenized prompts)
Prompt = Annotated[
    Annotated[str, Tag("text")]
    | Annotated[list[str], Tag("texts")]
    | Annotated[list[int], Tag("tokens")]
    | Annotated[list[list[int]], Tag("token_lists")],
    Discriminator(_prompt_kind),
]


class CompletionRequest(_Request):
    prompt: Prompt

    def token_budget(self) -> int | None:
        return self.max_tokens


def _request_path(data: Any, loc: tuple[Any, ...]) -> list[Any]:
    """The parts of a pydantic error location that index into the request: its field names
    and list indices, without the tags of the types a union tried or of a validator
    (`stop.list[str].0` becomes `stop.0`, `messages.0.content.str` becomes
    `messages.0.content`)."""
    path, value = [], data
    for part in loc:
        in_dict = isinstance(value, dict) and part in value
        in_list = isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value)
        if in_dict or in_list:
            value = value[part]
            path.append(part)
    return path


def _invalid(data: dict[str, Any], error: ValidationError) -> ApiError:
    """The error of the deepest of pydantic's errors. Of a field of several types pydantic
    reports each type it tried; the deepest error is the one inside the value sent: for
    `"stop": [1]` that `stop.0` is not a string, not that the list is not one."""
    found = []
    for problem in error.errors():
        loc = problem["loc"]
        if problem["type"] == "missing":  # its location ends with the missing field
            found.append((_request_path(data, loc[:-1]) + [loc[-1]], problem))
        else:
            found.append((_request_path(data, loc) or list(loc[:1]), problem))
    path, problem = max(found, key=lambda pair: len(pair[0]))  # ties: the first
    missing = problem["type"] == "missing"
    param = ".".join(str(part) for part in path) or None
    if problem["type"] == "extra_forbidden":  # a nested unknown field, as a top-level one
        return ApiError(
            f"Unrecognized request argument supplied: {param}",
            param=param,
            code="unknown_parameter",
        )
    message = f"{param}: " + ("missing required parameter" if missing else problem["msg"])
    return ApiError(
        message + (f" (got {problem['input']!r})" if "input" in problem else ""),
        param=param,
        code="missing_required_parameter" if missing else "invalid_value",
    )


def _unrecognized(data: dict[str, Any], unknown: list[str], accepted: set[str]) -> ApiError:
    """OpenAI's error for unknown fields, with the accepted names (not already sent) close to
    them. The cutoff lets typos through (max_token, temprature, stream_option), not names of
    other parameters one letter away (top_k is not top_p, min_tokens not max_tokens)."""
    candidates = accepted - set(data)
    hints = {
        name: close[0]
        for name in unknown
        if (close := difflib.get_close_matches(name, candidates, n=1, cutoff=0.85))
    }
    if len(unknown) == 1:
        hint = hints.get(unknown[0], "")
    else:
        hint = ", ".join(f"{close} for {name}" for name, close in hints.items())
    return ApiError(
        f"Unrecognized request argument supplied: {', '.join(unknown)}"
        + (f" (did you mean {hint}?)" if hint else ""),
        param=unknown[0],
        code="unknown_parameter",
    )


def parse(kind: type[_Request], data: Any) -> Any:
    """Validates a decoded JSON body; raises `ApiError` naming a bad field."""
    if not isinstance(data, dict):
        raise ApiError("the request body must be a JSON object", code="invalid_body")
    accepted = set(kind.model_fields) | set(UNSUPPORTED) | set(IGNORED)
    unknown = sorted(set(data) - accepted)
    if unknown:
        raise _unrecognized(data, unknown, accepted)
    try:
        # a bad scalings_mode is refused here, its message listing the modes
        request = kind.model_validate(data)
    except ValidationError as error:
        raise _invalid(data, error) from None
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
