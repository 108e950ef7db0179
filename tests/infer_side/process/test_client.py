"""`generate_through_updates` against a fake engine client (the other side): requests an
in_place push refused are sent again, with their own sampling, until served or out of time."""

from __future__ import annotations

from infer_side.process import client as client_module
from infer_side.process.client import generate_through_updates
from rlsync.wire.protocol import WEIGHTS_INCOMPLETE, GenerateOutput, SamplingParams


class RefusingClient:
    """Refuses the prompts listed in `refusals` (one refusal each per entry), serves the rest
    with output_ids = prompt + [seed]; records every call."""

    def __init__(self, refusals: list[int]):
        self.refusals = list(refusals)
        self.calls: list[list[list[int]]] = []

    def generate(self, prompts, sampling, timeout_s=None):
        self.calls.append([list(p) for p in prompts])
        outs = []
        for p, s in zip(prompts, sampling, strict=True):
            if p[0] in self.refusals:
                self.refusals.remove(p[0])
                error = f"{WEIGHTS_INCOMPLETE}: update to version 3 in progress"
                outs.append(GenerateOutput(finish_reason="abort", error=error))
            else:
                outs.append(GenerateOutput(output_ids=[*p, s.seed], weight_version=3))
        return outs


def sampling(n: int) -> list[SamplingParams]:
    return [SamplingParams(seed=100 + i) for i in range(n)]


def test_refused_requests_are_sent_again_with_their_own_sampling(monkeypatch):
    monkeypatch.setattr(client_module, "RETRY_FIRST_S", 0.001)
    fake = RefusingClient(refusals=[2, 3, 3])
    outs = generate_through_updates(fake, [[1], [2], [3]], sampling(3), timeout_s=10)
    assert [o.output_ids for o in outs] == [[1, 100], [2, 101], [3, 102]]
    assert fake.calls == [[[1], [2], [3]], [[2], [3]], [[3]]]


def test_refusals_come_back_as_they_are_when_time_runs_out(monkeypatch):
    monkeypatch.setattr(client_module, "RETRY_FIRST_S", 0.05)
    fake = RefusingClient(refusals=[1] * 1000)
    (out,) = generate_through_updates(fake, [[1]], SamplingParams(), timeout_s=0.3)
    assert out.error.startswith(WEIGHTS_INCOMPLETE) and 2 <= len(fake.calls) <= 4
