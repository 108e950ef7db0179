"""What the freeze tests check after every case, and how they freeze a process.

A frozen peer (SIGSTOP) is not a dead one: its sockets stay open, its messages queue, and
when it is thawed (SIGCONT) it goes on from where it stopped, late. After such a case an
engine must serve the checkpoint of the version it reports, bit for bit (fingerprints) and
token for token, or refuse with "weights incomplete"; `Checkpoints` knows each version's
tensors, fingerprints and reference tokens, `verdict` compares an engine with them.

Nothing here starts an engine or a pusher; the tests and `freeze_figures` do.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from infer_side.process.client import EngineClient
from rlsync.checkpoint_io import iter_checkpoint_tensors
from rlsync.plan.buckets import dtype_from_name, tensor_fingerprint
from rlsync.wire.protocol import WEIGHTS_INCOMPLETE, GetWeightsFingerprint, WeightFingerprints
from rlsync.wire.rpc import EngineDead, RpcError, RpcTimeout
from tests.e2e.sync_helpers import PROMPTS, greedy, trainer_weights

CALL_S = 10.0
"""How long one control call or one short generate may take before the engine counts as
not answering (a thawed engine answers within milliseconds; this is slack for a loaded box)."""

Reference = Callable[[dict[str, torch.Tensor]], list[list[int]]]
"""Greedy tokens (8 new, for each of PROMPTS) of a model holding exactly these tensors."""


class Checkpoints:
    """version -> trainer_weights(ckpt, version), its fingerprints in the engines' dtypes and
    the reference greedy tokens; each computed once. Version 0 is the checkpoint itself."""

    def __init__(self, ckpt: Path, dtypes: dict[str, str], reference: Reference):
        self.ckpt, self.dtypes, self.reference = ckpt, dtypes, reference
        self._tensors: dict[int, dict[str, torch.Tensor]] = {}
        self._prints: dict[int, dict[str, int]] = {}
        self._tokens: dict[int, list[list[int]]] = {}

    def tensors(self, version: int) -> dict[str, torch.Tensor]:
        if version not in self._tensors:
            self._tensors[version] = self._load(version)
        return self._tensors[version]

    def _load(self, version: int) -> dict[str, torch.Tensor]:
        if version == 0:
            return dict(iter_checkpoint_tensors(self.ckpt))
        return trainer_weights(self.ckpt, version)

    def fingerprints(self, version: int) -> dict[str, int]:
        if version not in self._prints:
            self._prints[version] = {
                n: tensor_fingerprint(t.to(dtype_from_name(self.dtypes[n])))
                for n, t in self.tensors(version).items()
            }
        return self._prints[version]

    def tokens(self, version: int) -> list[list[int]]:
        if version not in self._tokens:
            self._tokens[version] = self.reference(self.tensors(version))
        return self._tokens[version]

    def which(self, prints: dict[str, int]) -> int | str:
        """The version (among those built) whose fingerprints `prints` equals, else "none"
        (a mix of versions, or bytes no version had)."""
        for version in sorted(self._tensors):
            if self.fingerprints(version) == prints:
                return version
        return "none"


@dataclass
class Verdict:
    """What one engine holds and serves, against the checkpoints."""

    answers: bool
    version: int = -1
    holds: int | str = "none"
    """The checkpoint version its fingerprints equal ("none": a mix, or unknown bytes)."""
    incomplete: bool = False
    serves: str = ""
    """"tokens of vN", "refuses: weights incomplete", "other tokens", or an error."""
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.answers and not self.problems

    def short(self) -> str:
        if not self.answers:
            return "does not answer"
        if self.incomplete:
            return f"v{self.version} incomplete, {self.serves}"
        return f"reports v{self.version}, holds v{self.holds}, serves {self.serves}"


def verdict(client: EngineClient, checkpoints: Checkpoints) -> Verdict:
    """Compare what `client`'s engine reports, holds and generates with the checkpoints:
    consistent means it holds and serves exactly the version it reports, or it refuses to
    generate with "weights incomplete"."""
    try:
        state = state_of(client)
        outs = client.generate(PROMPTS, greedy(), timeout_s=CALL_S)
    except (RpcTimeout, EngineDead, RpcError, RuntimeError) as exc:
        return Verdict(answers=False, serves=f"{type(exc).__name__}: {exc}"[:200])
    out = Verdict(answers=True, version=state.weight_version, incomplete=state.weights_incomplete)
    if state.weights_incomplete:
        errors = {o.error.split(":")[0] for o in outs}
        out.serves = (
            "refuses: weights incomplete" if errors == {WEIGHTS_INCOMPLETE} else str(errors)
        )
        if errors != {WEIGHTS_INCOMPLETE}:
            out.problems.append(f"incomplete weights, but generate answered {errors}")
        return out
    out.holds = checkpoints.which(state.fingerprints)
    tokens = [o.output_ids for o in outs]
    if any(o.error for o in outs):
        out.serves = f"error: {outs[0].error[:120]}"
    elif isinstance(out.holds, int) and tokens == checkpoints.tokens(out.holds):
        out.serves = f"tokens of v{out.holds}"
    else:
        out.serves = "other tokens"
    if out.holds != out.version:
        out.problems.append(f"reports v{out.version} but its bytes are those of {out.holds}")
    if out.serves != f"tokens of v{out.version}":
        out.problems.append(f"reports v{out.version} but serves {out.serves}")
    return out


def state_of(client: EngineClient, names: list[str] | None = None) -> WeightFingerprints:
    """The engine's weight state (fingerprints of `names`, None: all), within CALL_S."""
    reply = client.rpc.call_ok(GetWeightsFingerprint(names=names), CALL_S)
    assert isinstance(reply, WeightFingerprints), reply
    return reply


def settle(client: EngineClient, bound_s: float) -> float:
    """Seconds until the engine has no update in flight (polled; every answer must come
    within CALL_S); `bound_s` plus a margin at most, then returns what it measured."""
    start = time.monotonic()
    while time.monotonic() - start < bound_s + 5.0:
        if not state_of(client, []).update_in_progress:
            break
        time.sleep(0.05)
    return time.monotonic() - start


def stopped(pid: int) -> bool:
    """Whether the kernel has `pid` stopped (state T)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t")


def freeze(pid: int) -> None:
    """SIGSTOP `pid` and wait until the kernel has it stopped."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5.0
    while not stopped(pid):
        if time.monotonic() > deadline:
            raise RuntimeError(f"pid {pid} did not stop within 5 s")
        time.sleep(0.005)


def thaw(pid: int) -> None:
    """SIGCONT `pid` (gone already: nothing to do)."""
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


@contextmanager
def frozen(pid: int) -> Iterator[None]:
    """`pid` stopped for the block; always continued after it (a test that fails while a
    process is stopped must not leave it stopped)."""
    freeze(pid)
    try:
        yield
    finally:
        thaw(pid)
