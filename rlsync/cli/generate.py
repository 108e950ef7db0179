"""`rlsync generate`: generate from token-id prompts on a running engine or a temporary one.

    rlsync generate --endpoint E --input-ids 1,2,3 --input-ids 4,5 --max-new-tokens 8 --json
    rlsync generate --model DIR --input-ids 1,2,3 --max-new-tokens 8 --temperature 1 --seed 0

For each prompt: output ids, logprobs, finish reason, cached prompt tokens and the weight
version that produced it (`version_spans`: [version, tokens] pairs, in order, when an update
landed mid-request). With --model a temporary engine process is started and stopped.
Exit codes: 0 ok, 1 the engine rejected a request, 2 bad usage or unreachable.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rlsync.wire.protocol import GenerateOutput

RECORD_FIELDS = (
    "output_ids",
    "logprobs",
    "finish_reason",
    "prompt_tokens",
    "cached_tokens",
    "weight_version",
    "min_weight_version",
    "error",
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate tokens from token-id prompts")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", help="checkpoint dir: start a temporary engine for this call")
    where.add_argument("--endpoint", help="endpoint of a running engine")
    p.add_argument(
        "--input-ids",
        action="append",
        required=True,
        type=_token_ids,
        help="one prompt as comma-separated token ids (repeat for more prompts)",
    )
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0: no top-k")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop-token-ids", type=_token_ids, default=[])
    p.add_argument("--kv-tokens", type=int, default=4096, help="KV pool of a --model engine")
    p.add_argument("--threads", type=int, default=None, help="torch threads of a --model engine")
    p.add_argument(
        "--auth-keys",
        default=None,
        metavar="DIR",
        help="CURVE key directory of an engine served with --auth-keys (rlsync.wire.auth)",
    )
    p.add_argument("--timeout", type=float, default=300.0, help="seconds for the whole batch")
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per prompt")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from infer_side.process.client import UNREACHABLE_ERRORS, connect, launch_engine
    from rlsync.wire.codec import ProtocolError

    try:
        sampling = _sampling(args)
        if args.model:
            engine = launch_engine(
                args.model,
                kv_tokens=args.kv_tokens,
                threads=args.threads,
                start_timeout_s=args.timeout,
                call_timeout_s=args.timeout,
            )
        else:
            engine = connect(args.endpoint, timeout_s=args.timeout, auth_keys=args.auth_keys)
        with engine:
            outputs = engine.generate(args.input_ids, sampling)
    except (ProtocolError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except UNREACHABLE_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    records = [output_record(ids, out) for ids, out in zip(args.input_ids, outputs, strict=True)]
    print(json.dumps(records, indent=2) if args.json else "\n".join(map(_line, records)))
    return 1 if any(r["error"] for r in records) else 0


def output_record(input_ids: list[int], out: GenerateOutput) -> dict[str, Any]:
    """What the CLI reports for one prompt (everything but the random request id)."""
    record = {name: getattr(out, name) for name in RECORD_FIELDS}
    record["version_spans"] = [[s.version, s.tokens] for s in out.version_spans]
    return {"input_ids": list(input_ids), **record}


def _sampling(args: argparse.Namespace) -> Any:
    """SamplingParams from the options, range-checked like a wire message."""
    from rlsync.wire.codec import decode, encode
    from rlsync.wire.protocol import Generate, SamplingParams

    sampling = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop_token_ids=args.stop_token_ids,
    )
    return decode(encode(Generate(request_id="check", sampling=sampling))).sampling


def _token_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers") from None
    if any(i < 0 for i in ids):
        raise argparse.ArgumentTypeError(f"{text!r}: token ids must be >= 0")
    return ids


def _line(record: dict[str, Any]) -> str:
    if record["error"]:
        return f"error: {record['error']}"
    return (
        f"{','.join(map(str, record['output_ids']))}  finish={record['finish_reason']} "
        f"cached={record['cached_tokens']} version={record['weight_version']}"
    )
