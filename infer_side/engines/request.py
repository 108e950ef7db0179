"""One generation request inside the engine: its tokens, sampling state, KV bookkeeping, outputs.

A request is *waiting* (no KV; `row` is None) or *running* (a row in the request-to-token
table). Of its table row, positions [0, prefix_len) are slots owned by the prefix tree (the
request holds a lock on `node`), positions [prefix_len, held_len) are slots private to the
request, and positions [0, kv_len) already hold computed K/V.

Restarting after a retraction drops every output token the client has not seen: a
non-streaming request starts from scratch; a streaming one keeps what it already streamed
(nothing sent is ever taken back) and recomputes the KV for it. A weight swap under an
`in_place` pause keeps every token and recomputes the KV with the new weights instead, so
each token's recorded version is the one whose weights (all of them, prefix KV included)
produced it. This module knows nothing about the pool, the tree or the model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from rlsync.wire.protocol import (
    FinishReason,
    Generate,
    GenerateOutput,
    SamplingParams,
    version_spans,
)


def _random_seed() -> int:
    return int.from_bytes(os.urandom(8), "little") >> 1


@dataclass(eq=False)
class Request:
    """Engine-side state of one Generate."""

    rid: str
    prompt: list[int]
    params: SamplingParams
    stream: bool = False
    seed: int = field(default_factory=_random_seed)
    """`params.seed`, or a random one: every request draws from its own seeded stream."""
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    """Weight version that produced each output token."""
    finish_reason: FinishReason | None = None
    cached_tokens: int = 0
    """Prompt tokens served from the prefix cache at the latest admission."""
    sent: int = 0
    """Output tokens already emitted as stream chunks."""
    # KV bookkeeping while running (see module docstring)
    row: int | None = None
    node: Any = None
    epoch: int = -1
    prefix_len: int = 0
    held_len: int = 0
    kv_len: int = 0

    @classmethod
    def from_message(cls, msg: Generate) -> Request:
        params = msg.sampling
        seed = params.seed if params.seed is not None else _random_seed()
        return cls(
            rid=msg.request_id,
            prompt=list(msg.input_ids),
            params=params,
            stream=msg.stream,
            seed=seed,
        )

    @property
    def all_ids(self) -> list[int]:
        return self.prompt + self.output_ids

    def tokens_from(self, start: int) -> list[int]:
        """Tokens at positions [start, num_tokens) without building the whole sequence."""
        n = len(self.prompt)
        if start >= n:
            return self.output_ids[start - n :]
        return self.prompt[start:] + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output_ids)

    @property
    def remaining(self) -> int:
        """Output tokens this request may still produce."""
        return self.params.max_new_tokens - len(self.output_ids)

    def append_token(self, token: int, logprob: float, version: int) -> None:
        """Record a sampled token; sets finish_reason on a stop token (kept) or the length cap."""
        self.output_ids.append(token)
        self.logprobs.append(logprob)
        self.versions.append(version)
        if token in self.params.stop_token_ids:
            self.finish_reason = "stop"
        elif self.remaining <= 0:
            self.finish_reason = "length"

    def detach_kv(self) -> None:
        """Forget the KV bookkeeping (the scheduler has already freed or handed over the slots)."""
        self.row, self.node, self.epoch = None, None, -1
        self.prefix_len = self.held_len = self.kv_len = 0

    def restart(self) -> None:
        """After a retraction: keep only the output tokens the client has already seen."""
        assert self.row is None, "restart a request that still holds KV"
        del self.output_ids[self.sent :], self.logprobs[self.sent :], self.versions[self.sent :]

    def output(self, finished: bool, engine_version: int) -> GenerateOutput:
        """The next message for the client: a stream chunk (unsent tokens) or the final output.

        A non-streaming request's final output carries every token; a streaming one's chunks
        (the final included) carry only tokens not sent before, so they concatenate to it
        (and so do their `version_spans`).
        """
        start = self.sent if self.stream else 0
        self.sent = len(self.output_ids)
        versions = self.versions or [engine_version]
        return GenerateOutput(
            request_id=self.rid,
            output_ids=self.output_ids[start:],
            logprobs=self.logprobs[start:],
            finished=finished,
            finish_reason=self.finish_reason if finished else None,
            prompt_tokens=len(self.prompt),
            cached_tokens=self.cached_tokens,
            weight_version=versions[-1],
            min_weight_version=min(versions),
            version_spans=version_spans(self.versions[start:]),
        )


def error_output(request_id: str, message: str) -> GenerateOutput:
    """A Generate refused before it ran: finished, reason "abort", `error` says why."""
    return GenerateOutput(
        request_id=request_id, finished=True, finish_reason="abort", error=message
    )
