"""An engine kept busy on purpose: long prompts generated with many tokens, sent from a
client of their own on a thread, so the test's own client can push and ask meanwhile.
`Busy.stop()` ends them early (a PauseGeneration "abort", then ContinueGeneration)."""

from __future__ import annotations

import threading
import time

from infer_side.process.client import EngineClient, connect
from rlsync.wire.protocol import GenerateOutput, SamplingParams


def long_prompts(n: int, length: int, vocab: int = 96) -> list[list[int]]:
    return [[(7 * i + 3 * j + 1) % vocab for j in range(length)] for i in range(n)]


class Busy:
    """`prompts` generating `new_tokens` greedy tokens each on the engine at `endpoint`."""

    def __init__(self, engine: EngineClient, prompts: list[list[int]], new_tokens: int):
        self.engine, self.prompts = engine, prompts
        self.sampling = SamplingParams(max_new_tokens=new_tokens)
        self.side = connect(engine.endpoint, timeout_s=300)
        self.outputs: list[GenerateOutput] = []
        self.error = ""
        self.thread = threading.Thread(target=self._run, name="busy", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.outputs = self.side.generate(self.prompts, self.sampling, timeout_s=300)
        except Exception as exc:  # the test reads it
            self.error = f"{type(exc).__name__}: {exc}"

    def wait_running(self, timeout_s: float = 30.0) -> None:
        """Until the engine decodes them (their prefill is done)."""
        deadline = time.monotonic() + timeout_s
        while self.engine.info().running < len(self.prompts):
            assert self.thread.is_alive() and time.monotonic() < deadline, "never got busy"
            time.sleep(0.01)

    def finish(self, timeout_s: float = 120.0) -> list[GenerateOutput]:
        """Their outputs, once all are done."""
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "the long requests did not finish"
        assert not self.error, self.error
        return self.outputs

    def stop(self) -> list[GenerateOutput]:
        """Abort them now (the engine's next update need not wait), then their outputs."""
        if self.thread.is_alive():
            self.engine.pause("abort")
            self.engine.continue_generation()
        return self.finish()

    def close(self) -> None:
        if self.thread.is_alive():
            self.stop()
        self.side.close()
