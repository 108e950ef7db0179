"""`rlsync bench generate`: generation throughput (tokens/s) of our engine next to Hugging Face
transformers' `generate` on the same small checkpoint, machine and prompts, in one run.

Per batch size: our `EngineCore` in-process (continuous batching; no socket measured), our
engine server process through its client (the socket included), and `model.generate`
(greedy, left-padded batch, exactly `max_new_tokens` each). One warm-up round, then
`repeat` rounds in which the paths run one after another (so a busy moment on a shared box
hits them alike); tokens/s of the best and the median round, and the ratio to HF. Ours and HF decode
greedily from the same weights, so the fraction of identical output tokens is reported too.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rlsync.wire.protocol import Generate, GenerateOutput, SamplingParams

SMALL = dict(
    vocab_size=1000,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)
"""The checkpoint's architecture (Llama): small enough that per-step overheads show."""
PAD = 0


def make_small_checkpoint(path: Path, seed: int = 0, **overrides: Any) -> Path:
    """A random Llama saved by transformers itself (`save_pretrained`, safetensors)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep the benchmark's stderr to its own lines
    torch.manual_seed(seed)
    config = LlamaConfig(
        **{**SMALL, **overrides},
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # wider than the default init, so greedy tokens vary
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 1.0 / p.shape[1] ** 0.5)
    model.save_pretrained(path, safe_serialization=True)
    return path


def make_prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """`n` prompts of 8..24 tokens (ids 1..vocab-1; 0 is the HF pad)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 25, (n,), generator=gen).tolist()
    return [torch.randint(1, vocab, (k,), generator=gen).tolist() for k in lengths]


# ---------------------------------------------------------------- the three runners


def run_core(core: Any, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    """Drive an in-process EngineCore until every prompt finished; output ids in order."""
    sampling = SamplingParams(max_new_tokens=max_new)
    rids = [f"g{i}-{os.urandom(4).hex()}" for i in range(len(prompts))]
    done: dict[str, list[int]] = {}
    for rid, prompt in zip(rids, prompts, strict=True):
        _collect(core.process(Generate(request_id=rid, input_ids=prompt, sampling=sampling)), done)
    for _ in range(100 * (max_new + len(prompts))):
        if len(done) == len(rids):
            break
        _collect(core.step(), done)
    if len(done) != len(rids):
        raise RuntimeError(f"engine core finished {len(done)} of {len(rids)} prompts")
    return [done[r] for r in rids]


def _collect(outputs: list[Any], done: dict[str, list[int]]) -> None:
    for out in outputs:
        if isinstance(out, GenerateOutput) and out.finished:
            if out.error:
                raise RuntimeError(f"engine core: {out.error}")
            done[out.request_id] = list(out.output_ids)


def run_hf(model: Any, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    """Greedy `generate` on a left-padded batch; the new ids of each prompt."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new,
            min_new_tokens=max_new,
            do_sample=False,
            pad_token_id=PAD,
            eos_token_id=None,
        )
    return out[:, width:].tolist()


def run_server(client: Any, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    outs = client.generate(prompts, SamplingParams(max_new_tokens=max_new))
    return [list(o.output_ids) for o in outs]


def interleaved(
    runs: dict[str, Callable[[], list[list[int]]]], repeat: int
) -> tuple[dict[str, list[float]], dict[str, list[list[int]]]]:
    """Tokens/s of every runner, `repeat` rounds after one warm-up round; within a round the
    runners go one after the other, so load that comes and goes hits them alike. Returns the
    rates and each runner's last outputs."""
    outs = {name: run() for name, run in runs.items()}
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, run in runs.items():
            t0 = time.perf_counter()
            outs[name] = run()
            rates[name].append(sum(len(o) for o in outs[name]) / (time.perf_counter() - t0))
    return rates, outs


def match_fraction(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for sa, sb in zip(a, b, strict=True) for x, y in zip(sa, sb, strict=False)]
    return sum(x == y for x, y in pairs) / len(pairs) if pairs else float("nan")


def summarize(rates: list[float]) -> dict[str, float]:
    return {"best": max(rates), "median": statistics.median(rates)}


# ---------------------------------------------------------------- the benchmark


def run_generate(
    batches: list[int],
    *,
    max_new: int = 64,
    repeat: int = 3,
    server: bool = True,
    work_dir: Path | None = None,
    threads: int | None = None,
    vllm: bool = False,
) -> dict[str, Any]:
    """Every path at every batch size, in one process and one run; JSON-ready result.

    `vllm`: also our engine server with the vLLM backend (`launch_engine(backend="vllm")`),
    through the same client, so the two engines differ only behind the protocol."""
    import tempfile

    from transformers import AutoModelForCausalLM

    from infer_side.engines.native.engine_core import EngineCore
    from rlsync.config import EngineConfig

    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="rlsync-genbench-", dir=work_dir) as tmp:
        ckpt = make_small_checkpoint(Path(tmp) / "ckpt")
        prompts = make_prompts(max(batches), SMALL["vocab_size"])
        kv = max(batches) * (24 + max_new) + 256
        core = EngineCore.from_checkpoint(
            ckpt, EngineConfig(kv_tokens=kv, max_running=max(batches), max_prefill_tokens=kv)
        )
        hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
        client = _launch(ckpt, kv, threads) if server or vllm else None
        vclient = _launch(ckpt, kv, threads, backend="vllm") if vllm else None
        try:
            rows = [
                _one_batch(b, prompts[:b], max_new, repeat, core, hf, client, vclient)
                for b in batches
            ]
        finally:
            for c in (client, vclient):
                if c is not None:
                    c.close()
    return {
        "threads": threads,
        "max_new_tokens": max_new,
        "repeat": repeat,
        "model": SMALL,
        "torch": torch.__version__,
        "vllm": vllm,
        "rows": rows,
    }


def _launch(ckpt: Path, kv: int, threads: int, backend: str = "rlsync") -> Any:
    from infer_side.process.client import launch_engine

    return launch_engine(
        ckpt,
        kv_tokens=kv,
        threads=threads,
        backend=backend,
        start_timeout_s=300.0,
        extra_args=["--max-running", "64"],
    )


def _one_batch(
    batch: int,
    prompts: list[list[int]],
    max_new: int,
    repeat: int,
    core: Any,
    hf: Any,
    client: Any,
    vclient: Any = None,
) -> dict[str, Any]:
    runs = {
        "ours": lambda: run_core(core, prompts, max_new),
        "hf": lambda: run_hf(hf, prompts, max_new),
    }
    if client is not None:
        runs["server"] = lambda: run_server(client, prompts, max_new)
    if vclient is not None:
        runs["vllm"] = lambda: run_server(vclient, prompts, max_new)
    rates, outs = interleaved(runs, repeat)
    row: dict[str, Any] = {
        "batch": batch,
        **{k: summarize(v) for k, v in rates.items()},
        "match": match_fraction(outs["ours"], outs["hf"]),
    }
    row["ratio"] = row["ours"]["best"] / row["hf"]["best"]
    row["ratio_median_paired"] = statistics.median(
        a / b for a, b in zip(rates["ours"], rates["hf"], strict=True)
    )
    if client is not None:
        row["server_ratio"] = row["server"]["best"] / row["hf"]["best"]
    if vclient is not None:
        row["vllm_vs_server"] = row["server"]["best"] / row["vllm"]["best"]
        row["vllm_vs_server_median_paired"] = paired_ratio(rates["server"], rates["vllm"])
        row["vllm_match_server"] = match_fraction(outs["vllm"], outs["server"])
        row["vllm_match_hf"] = match_fraction(outs["vllm"], outs["hf"])
    return row


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of a[i] / b[i]: rounds ran back to back, so load hits a pair alike."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def format_generate(result: dict[str, Any]) -> str:
    """Markdown table: tokens/s (best, median) per path and batch size, ratios to HF."""
    lines = [
        f"\ngeneration: {result['max_new_tokens']} new tokens per prompt, greedy, "
        f"{result['threads']} torch threads, best of {result['repeat']} (median)\n",
        "| batch | ours in-process tok/s | ours server tok/s | HF generate tok/s | "
        "ours / HF (best) | ours / HF (median of rounds) | server / HF | same tokens as HF |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        server = r.get("server")
        server_ratio = f"{r['server_ratio']:.2f}x" if server else "n/a"
        lines.append(
            f"| {r['batch']} | {_rate(r['ours'])} | {_rate(server) if server else 'n/a'} | "
            f"{_rate(r['hf'])} | {r['ratio']:.2f}x | {r['ratio_median_paired']:.2f}x | "
            f"{server_ratio} | {r['match'] * 100:.0f}% |"
        )
    return "\n".join(lines) + "\n"


def format_generate_vllm(result: dict[str, Any]) -> str:
    """Markdown table: our engine server vs the vLLM backend server (same client, protocol and
    checkpoint), tokens/s best (median), ratio ours/vLLM, and whether greedy tokens agree."""
    lines = [
        f"\ngeneration, our engine vs the vLLM backend: {result['max_new_tokens']} new tokens per "
        f"prompt, greedy, both as server processes behind the same client, "
        f"best of {result['repeat']} (median)\n",
        "| batch | ours server tok/s | vLLM backend tok/s | HF generate tok/s | "
        "ours / vLLM (best) | ours / vLLM (median of rounds) | vLLM tokens = ours | "
        "vLLM tokens = HF |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['batch']} | {_rate(r['server'])} | {_rate(r['vllm'])} | {_rate(r['hf'])} | "
            f"{r['vllm_vs_server']:.2f}x | {r['vllm_vs_server_median_paired']:.2f}x | "
            f"{r['vllm_match_server'] * 100:.0f}% | {r['vllm_match_hf'] * 100:.0f}% |"
        )
    return "\n".join(lines) + "\n"


def _rate(s: dict[str, float]) -> str:
    return f"{s['best']:.0f} ({s['median']:.0f})"
