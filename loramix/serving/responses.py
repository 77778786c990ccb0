"""OpenAI response bodies and stream chunks, built from the engine's events.

One `Answer` collects the events of one HTTP request (one or more prompts, `n` choices each);
choice `i` of prompt `p` has index `p * n + i`, as in OpenAI's API. Non-streaming requests
render it once with `body()`; streaming requests render each batch of events that arrived
together as one chunk per choice (`chunk()`), so every chunk carries the weights of exactly
the tokens whose text it carries.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from loramix.serving.engine import ErrorEvent, Event, FinishEvent, TokenEvent


@dataclass
class _Choice:
    weights: list[list[float]] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    finish: FinishEvent | None = None
    started: bool = False  # a chat stream sent this choice's role already


@dataclass
class Answer:
    """The choices of one request as its events arrive.

    Attributes:
        chat: Chat completion (messages, `delta`) or text completion (`text`).
        model: The model id echoed in every body.
        experts: Expert names (the E axis of the weights).
        adapted_modules: The L axis of `layer_scalings`.
        mode: The scalings mode the request ran in ("fixed" for a fixed mix).
        want_weights: `return_expert_weights` was asked for.
        want_layers: `return_layer_scalings` was asked for.
    """

    chat: bool
    model: str
    experts: list[str]
    adapted_modules: list[str]
    mode: str
    n_choices: int
    prompt_tokens: int
    want_weights: bool = False
    want_layers: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))
    choices: dict[int, _Choice] = field(default_factory=dict)
    error: str | None = None

    def __post_init__(self) -> None:
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + self.id
        self.choices = {i: _Choice() for i in range(self.n_choices)}

    @property
    def done(self) -> bool:
        return self.error is not None or all(c.finish is not None for c in self.choices.values())

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.weights) for c in self.choices.values())

    def add(self, index: int, event: Event) -> None:
        """Records one engine event for choice `index` (its index in the response)."""
        if isinstance(event, ErrorEvent):
            self.error = event.message
            return
        choice = self.choices[index]
        if isinstance(event, TokenEvent):
            choice.pieces.append(event.text)
            choice.weights.append(event.weights)
        elif isinstance(event, FinishEvent):
            choice.finish = event

    def usage(self) -> dict[str, int]:
        completion = self.completion_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }

    def _header(self, chunk: bool) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        header: dict[str, Any] = {
            "id": self.id,
            "object": kind + (".chunk" if chunk and self.chat else ""),
            "created": self.created,
            "model": self.model,
            "scalings_mode": self.mode,
        }
        if self.want_weights or self.want_layers:
            header["experts"] = self.experts
        if self.want_layers:
            header["adapted_modules"] = self.adapted_modules
        return header

    def _extensions(self, choice: _Choice, start: int, end: int) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.want_weights:
            extra["expert_weights"] = choice.weights[start:end]
            extra["expert_tokens"] = choice.pieces[start:end]
        if self.want_layers and choice.finish is not None:
            extra["layer_scalings"] = choice.finish.layer_scalings
        return extra

    def body(self) -> dict[str, Any]:
        """The whole (non-streaming) response."""
        choices = []
        for index, choice in self.choices.items():
            text = "".join(choice.pieces)
            reason = choice.finish.reason if choice.finish else None
            item: dict[str, Any] = {"index": index, "finish_reason": reason}
            if self.chat:
                item["message"] = {"role": "assistant", "content": text}
            else:
                item.update(text=text, logprobs=None)
            item.update(self._extensions(choice, 0, len(choice.weights)))
            choices.append(item)
        return {**self._header(False), "choices": choices, "usage": self.usage()}

    def chunk(self, marks: dict[int, int], finished: set[int]) -> dict[str, Any] | None:
        """One stream chunk with what each choice received since `marks` (token counts).

        Args:
            marks: Choice index -> tokens already sent; updated.
            finished: Choice indices whose finish was already sent; updated.
        """
        choices = []
        for index, choice in self.choices.items():
            start, end = marks.get(index, 0), len(choice.weights)
            ending = choice.finish is not None and index not in finished
            opening = self.chat and not choice.started
            if end == start and not ending and not opening:
                continue
            text = "".join(choice.pieces[start:end])
            item: dict[str, Any] = {"index": index}
            if self.chat:
                item["delta"] = {"content": text}
                if opening:
                    item["delta"] = {"role": "assistant", "content": text}
                    choice.started = True
            else:
                item.update(text=text, logprobs=None)
            item["finish_reason"] = choice.finish.reason if ending else None
            item.update(self._extensions(choice, start, end))
            if not ending:
                item.pop("layer_scalings", None)
            choices.append(item)
            marks[index] = end
            if ending:
                finished.add(index)
        if not choices:
            return None
        return {**self._header(True), "choices": choices}

    def usage_chunk(self) -> dict[str, Any]:
        return {**self._header(True), "choices": [], "usage": self.usage()}
