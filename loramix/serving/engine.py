"""The batching engine: one worker thread runs the X-LoRA model for every request.

Continuous batching. Each submitted `Job` (one prompt, `n` choices) is prefilled on its own
(`(1, T)`, no padding; the `n` choices share the prefill), samples its first token, and then
joins the running batch of its kind at the next decode step: its cache is left-padded to the
batch's width and concatenated (see `loramix.serving.kv`). Every decode step feeds each running
sequence its last token with its own `position_ids` (the count of its real tokens), so a
sequence's positions, keys and mask are those it would have alone, and a batched greedy answer
equals the same request served alone (up to float rounding in the batched matmuls). A sequence
leaves the batch as soon as it ends (end of text, a stop string, `max_tokens`) or its client
goes away.

Requests run in batches of one kind ("group"), since one forward call of `XLoraModel` forms
its scalings one way for all its rows:

    granular       per-token scalings: both passes at every step
    frozen         scalings fixed per sequence after its prompt (each row its own mix),
                   scaling pass skipped; the prefill's `FreezePlan` forms them
    merged         one request per group: its fixed mix folded into the base weights while
                   that group steps (restored, bit for bit, before any other forward call)
    fixed mix      `fixed_expert_weights`: one group for all given mixes, each row its own
                   (`XLoraModel.fixed_scalings(..., per_sequence=True)`: one mix for all rows
                   is folded into B, different ones are per-sequence rank weights); no scaling
                   pass, no gate; the scalings mode does not apply

Each loop iteration admits waiting jobs (while fewer than `max_batch` sequences run), then
steps every group once. Events (tokens, finishes, errors) go back through each job's `sink`,
which the HTTP side makes thread-safe; the asyncio side never waits on the model.

Axis names: B batch (running sequences of a group), T tokens, W cache width, L adapted
modules, E experts, V vocabulary.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from loramix.cache import XLoraCache
from loramix.generation import FreezePlan, MergedWeights
from loramix.model import XLoraModel
from loramix.serving import kv

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------- events


@dataclass
class TokenEvent:
    """One generated token of one choice.

    Attributes:
        text: What the token adds to the choice's text (may be empty: held back while it
            could start a stop string or ends inside a multi-byte character).
        weights: `(E,)` the token's scalings averaged over the adapted modules.
    """

    choice: int
    token_id: int
    text: str
    weights: list[float]


@dataclass
class FinishEvent:
    """A choice has ended.

    Attributes:
        reason: "stop" (end of text or a stop string) or "length" (`max_tokens`).
        tokens: Generated tokens of the choice.
        layer_scalings: `(L, E)` the scalings averaged over the choice's generated tokens,
            when the job asked for them.
    """

    choice: int
    reason: str
    tokens: int
    layer_scalings: list[list[float]] | None = None


@dataclass
class ErrorEvent:
    message: str


Event = TokenEvent | FinishEvent | ErrorEvent


class EngineClosed(RuntimeError):
    """The engine is shutting down and takes no new jobs."""


# --------------------------------------------------------------------------- jobs


@dataclass
class Job:
    """One request for the engine: a tokenized prompt, `n` choices, how to sample.

    Attributes:
        prompt_ids: The prompt's token ids (already checked against the context length).
        max_tokens: Tokens to generate at most, per choice.
        temperature: 0 is greedy; otherwise softmax temperature.
        top_p: Nucleus sampling mass (with temperature > 0).
        seed: Seeds choice `i`'s sampler with `seed + i` (None: random).
        stop: Strings that end a choice (not included in its text).
        mode: "granular", "frozen" or "merged".
        fixed_weights: `(E,)` a fixed mix instead of the gate, or None.
        want_layers: Report each choice's `(L, E)` scalings averaged over its tokens.
        ignore_eos: Generate `max_tokens` tokens even past the end of text (load tests).
        sink: Receives the job's events (called from the worker thread).
    """

    prompt_ids: list[int]
    sink: Callable[[Event], None]
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    n: int = 1
    stop: tuple[str, ...] = ()
    mode: str = "granular"
    fixed_weights: tuple[float, ...] | None = None
    want_layers: bool = False
    ignore_eos: bool = False
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)

    def cancel(self) -> None:
        """Frees the job's sequences at the next step (thread-safe)."""
        self.cancelled.set()

    @property
    def group_key(self) -> tuple:
        if self.fixed_weights is not None:
            return ("fixed",)
        if self.mode == "merged":
            return ("merged", id(self))
        return (self.mode,)


@dataclass
class _Row:
    """One running sequence (one choice of a job)."""

    job: Job
    choice: int
    generator: torch.Generator | None
    position: int  # position id of `last` (real tokens before it), once sampled
    last: int = -1  # the last generated token, fed at the next step
    ids: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of the decoded text already sent
    layer_sum: torch.Tensor | None = None  # (L, E) float32


@dataclass
class _Group:
    key: tuple
    rows: list[_Row]
    cache: XLoraCache
    mask: torch.Tensor  # (B, W)
    plan: FreezePlan | None = None


# ------------------------------------------------------------------------- engine


class Engine:
    """Runs jobs on an `XLoraModel` in one worker thread, batching them continuously.

    Args:
        model: The X-LoRA model (eval mode, on its device).
        tokenizer: Its tokenizer (decodes the text of each choice).
        max_batch: Sequences (choices) running at once, over all groups.
        metrics: Optional `loramix.serving.metrics.Metrics`.
    """

    def __init__(
        self, model: XLoraModel, tokenizer: Any, max_batch: int = 16, metrics: Any = None
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch}: use an int >= 1")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.metrics = metrics
        self.device = model.get_input_embeddings().weight.device
        self.eos_ids = _eos_ids(model, tokenizer)
        self._incoming: queue.Queue[Job] = queue.Queue()
        self._waiting: list[Job] = []
        self._admitting: list[Job] = []
        self._groups: dict[tuple, _Group] = {}
        self._closing = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.running = 0  # sequences in the batch (read by /health)
        self.waiting = 0  # jobs not yet admitted

    # ------------------------------------------------------------- public side

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="loramix-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queues a job; its events will reach `job.sink`. Thread-safe."""
        if self._closing:
            raise EngineClosed("the server is shutting down and takes no new requests")
        self._incoming.put(job)

    def close(self, timeout: float | None = None) -> None:
        """Takes no new jobs, lets the running and waiting ones finish, stops the thread."""
        self._closing = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def closing(self) -> bool:
        return self._closing

    # -------------------------------------------------------------- the loop

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            idle = not self._groups and not self._waiting
            if idle and self._stop.is_set() and self._incoming.empty():
                return
            try:
                block = idle and not self._stop.is_set()
                self._waiting.append(self._incoming.get(timeout=0.05 if block else 0))
                while True:
                    self._waiting.append(self._incoming.get_nowait())
            except queue.Empty:
                pass
            try:
                with torch.inference_mode():
                    self._admit()
                    for group in list(self._groups.values()):
                        start = time.perf_counter()
                        self._step(group)
                        self._count_seconds("decode", start)
            except Exception as error:  # a bug or out of memory: fail the jobs, keep serving
                logger.exception("engine step failed")
                self._fail_all(f"{type(error).__name__}: {error}")
            self._report()

    def _report(self) -> None:
        self.running = sum(len(g.rows) for g in self._groups.values())
        self.waiting = len(self._waiting) + self._incoming.qsize()
        if self.metrics is not None:
            self.metrics.running.set(self.running)
            self.metrics.queue_length.set(self.waiting)

    def _count_seconds(self, phase: str, start: float) -> None:
        if self.metrics is not None:
            self.metrics.forward_seconds.labels(phase).inc(time.perf_counter() - start)

    def _fail_all(self, message: str) -> None:
        jobs = {id(r.job): r.job for g in self._groups.values() for r in g.rows}
        jobs.update({id(j): j for j in self._waiting + self._admitting})
        for group in self._groups.values():
            if group.plan is not None:
                group.plan.close(group.cache)
        self._groups.clear()
        self._waiting.clear()
        self._admitting = []
        for job in jobs.values():
            job.sink(ErrorEvent(message))

    def _admit(self) -> None:
        """Prefills waiting jobs while there is room, one forward call per kind of job."""
        self._waiting = [job for job in self._waiting if not job.cancelled.is_set()]
        running = sum(len(g.rows) for g in self._groups.values())
        admitted: dict[tuple, list[Job]] = {}
        while self._waiting:
            job = self._waiting[0]
            if running > 0 and running + job.n > self.max_batch:
                break
            self._waiting.pop(0)
            admitted.setdefault(job.group_key, []).append(job)
            running += job.n
        for jobs in admitted.values():
            self._admitting = jobs  # failed along with the others if the prefill raises
            start = time.perf_counter()
            self._prefill(jobs)
            self._count_seconds("prefill", start)
        self._admitting = []

    # ------------------------------------------------------------- forward calls

    @contextmanager
    def _forward_context(self, group: _Group | None, jobs: list[Job]) -> Iterator:
        """Unmerges every other group's weights; sets the fixed mixes of a fixed-mix batch.

        Args:
            group: The group about to step (None for a prefill).
            jobs: The job of each row of the forward call.
        """
        for other in self._groups.values():
            if other is not group and other.plan is not None and other.plan.weights is not None:
                other.plan.weights.restore()
        if jobs[0].fixed_weights is None:
            yield
            return
        mixes = torch.tensor([job.fixed_weights for job in jobs], dtype=torch.float32)  # (B, E)
        with self.model.fixed_scalings(mixes, per_sequence=True):
            yield

    def _prefill(self, jobs: list[Job]) -> None:
        """Runs the prompts of `jobs` (one kind) together, samples, joins their group."""
        first = jobs[0]
        width = max(len(job.prompt_ids) for job in jobs)
        ids = torch.zeros(len(jobs), width, dtype=torch.long, device=self.device)  # (B, T)
        mask = torch.zeros_like(ids)
        for row, job in enumerate(jobs):  # left padding: every prompt ends at column T - 1
            ids[row, width - len(job.prompt_ids) :] = torch.tensor(job.prompt_ids)
            mask[row, width - len(job.prompt_ids) :] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # (B, T): each prompt from 0
        cache = self.model.new_cache()
        frozen = first.fixed_weights is None and first.mode in ("frozen", "merged")
        if frozen:  # averages each prompt's scalings over its real tokens
            cache.freeze_plan = FreezePlan(window_start=0, window_end=width)
        with self._forward_context(None, jobs):
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        cache.freeze_plan = None  # the fixed scalings stay in cache.sequence_state
        kv.check_joinable(cache)
        if frozen or first.fixed_weights is not None:
            cache.scaling_cache.reset()  # never read again: the scaling pass is skipped
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(sum(len(job.prompt_ids) for job in jobs))
        source = [row for row, job in enumerate(jobs) for _ in range(job.n)]  # n rows per job
        rows = [
            _Row(job=job, choice=i, generator=_generator(job, i), position=len(job.prompt_ids) - 1)
            for job in jobs
            for i in range(job.n)
        ]
        index = torch.tensor(source, device=self.device)
        logits = out.logits[:, -1].float()[index]  # (n rows, V)
        scalings = out.scalings[:, -1].float()[index]  # (n rows, L, E)
        finished = self._advance(rows, logits, scalings)
        keep = [source[i] for i in range(len(rows)) if i not in finished]
        rows = [row for i, row in enumerate(rows) if i not in finished]
        if not rows:
            return
        mask = kv.select(cache, mask, keep)  # also repeats the rows of jobs with n > 1
        group = self._groups.get(first.group_key)
        if group is None:
            group = _Group(first.group_key, rows, cache, mask)
            self._groups[first.group_key] = group
        else:
            group.mask = kv.join(group.cache, group.mask, cache, mask)
            group.rows += rows
        group.plan = self._new_plan(first, group.cache)  # a new plan whenever the rows change

    def _new_plan(self, job: Job, cache: XLoraCache) -> FreezePlan | None:
        """The frozen/merged plan of a group (a new one whenever its rows change)."""
        if job.fixed_weights is not None or job.mode == "granular":
            return None
        weights = MergedWeights(self.model) if job.mode == "merged" else None
        return FreezePlan(window_start=0, window_end=0, weights=weights)

    def _step(self, group: _Group) -> None:
        cancelled = [i for i, row in enumerate(group.rows) if row.job.cancelled.is_set()]
        if cancelled:
            self._remove(group, cancelled)
            if not group.rows:
                return
        rows = group.rows
        inputs = torch.tensor([[row.last] for row in rows], device=self.device)  # (B, 1)
        positions = torch.tensor([[row.position] for row in rows], device=self.device)  # (B, 1)
        mask = torch.cat([group.mask, torch.ones_like(inputs)], dim=1)  # (B, W + 1)
        group.cache.freeze_plan = group.plan
        try:
            with self._forward_context(group, [row.job for row in rows]):
                out = self.model(
                    input_ids=inputs,
                    attention_mask=mask,
                    position_ids=positions,
                    cache=group.cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
        finally:
            group.cache.freeze_plan = None
        group.mask = mask
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(rows))
        finished = self._advance(rows, out.logits[:, -1].float(), out.scalings[:, -1].float())
        if finished:
            self._remove(group, finished)
        elif group.plan is not None and group.plan.weights is not None and self._others(group):
            group.plan.weights.restore()  # other work waits: put the original weights back

    def _others(self, group: _Group) -> bool:
        return len(self._groups) > 1 or bool(self._waiting) or not self._incoming.empty()

    def _remove(self, group: _Group, indices: list[int]) -> None:
        keep = [i for i in range(len(group.rows)) if i not in set(indices)]
        if not keep:
            if group.plan is not None:
                group.plan.close(group.cache)
            del self._groups[group.key]
            group.rows = []
            return
        group.mask = kv.select(group.cache, group.mask, keep)
        group.rows = [group.rows[i] for i in keep]

    # ------------------------------------------------------------- sampling

    def _advance(self, rows: list[_Row], logits: torch.Tensor, scalings: torch.Tensor) -> set:
        """Samples one token per row, sends its event; returns the indices of ended rows.

        Args:
            logits: `(B, V)` float32.
            scalings: `(B, L, E)` float32, the scalings that wrote these tokens.
        """
        greedy = logits.argmax(dim=-1).tolist()  # (B,)
        weights = scalings.mean(dim=1).tolist()  # (B, E)
        finished = set()
        for index, row in enumerate(rows):
            job = row.job
            if job.temperature > 0:
                token = _sample(logits[index], job.temperature, job.top_p, row.generator)
            else:
                token = greedy[index]
            if job.want_layers:
                layer = scalings[index]
                row.layer_sum = layer.clone() if row.layer_sum is None else row.layer_sum + layer
            row.ids.append(token)
            row.last = token
            row.position += 1
            reason, text = self._text(row, token)
            job.sink(TokenEvent(row.choice, token, text, weights[index]))
            if reason is not None:
                finished.add(index)
                self._finish(row, reason)
        if self.metrics is not None:
            self.metrics.generated_tokens.inc(len(rows))
        return finished

    def _text(self, row: _Row, token: int) -> tuple[str | None, str]:
        """(finish reason or None, the text this token releases), stop strings held back."""
        job = row.job
        text = self.tokenizer.decode(row.ids, skip_special_tokens=True)
        reason = None
        end = len(text)
        for stop in job.stop:
            at = text.find(stop, max(0, row.emitted - len(stop) + 1))
            if at >= 0 and at < end:
                reason, end = "stop", at
        if reason is None and token in self.eos_ids and not job.ignore_eos:
            reason = "stop"
        elif reason is None and len(row.ids) >= job.max_tokens:
            reason = "length"
        if reason is None:  # hold back what may start a stop string or a character
            end -= _held_back(text, job.stop)
        piece = text[row.emitted : end] if end > row.emitted else ""
        row.emitted += len(piece)
        return reason, piece

    def _finish(self, row: _Row, reason: str) -> None:
        layers = None
        if row.layer_sum is not None:
            layers = (row.layer_sum / len(row.ids)).tolist()
        row.job.sink(FinishEvent(row.choice, reason, len(row.ids), layers))


# ------------------------------------------------------------------------ helpers


def _eos_ids(model: XLoraModel, tokenizer: Any) -> set[int]:
    ids = set()
    for value in (tokenizer.eos_token_id, model.generation_config.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return ids


def _generator(job: Job, choice: int) -> torch.Generator | None:
    if job.temperature == 0:
        return None
    generator = torch.Generator()
    if job.seed is None:
        generator.seed()
    else:
        generator.manual_seed(job.seed + choice)
    return generator


def _sample(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> int:
    """One token from `(V,)` logits with temperature and nucleus (top-p) filtering."""
    probs = torch.softmax(logits.cpu() / temperature, dim=-1)  # (V,)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass of the tokens ranked above
        sorted_probs[before >= top_p] = 0.0  # the top token always stays
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of `text` that may still become a stop string or a character."""
    if text.endswith("\ufffd"):
        return len(text) - len(text.rstrip("\ufffd"))
    held = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:size]):
                held = size
                break
    return held
