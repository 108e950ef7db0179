"""What the docs say about security matches the code.

The behaviour itself (an engine on tcp:// without keys is refused unless insecure; clients
without an allowed key get nothing through) is tested in `tests/reliability/test_auth.py`:
`test_serve_refuses_tcp_without_keys`,
`test_launch_engine_on_tcp_without_keys_refuses_to_start`,
`test_insecure_tcp_flag_lifts_the_refusal`,
`test_unauthenticated_client_cannot_generate_flush_or_push`.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from infer_side.process.server import add_arguments
from rlsync.wire import auth

DOCS = Path(__file__).resolve().parents[1] / "docs"


def section(text: str, heading: str) -> str:
    """The text under `heading` (a '#'-line) up to the next heading of any level."""
    parts = re.split(r"^#+ +(.+?)\s*$", text, flags=re.M)
    titles = dict(zip(parts[1::2], parts[2::2], strict=True))
    assert heading in titles, f"no '{heading}' heading; have {list(titles)}"
    return titles[heading]


def test_protocol_doc_says_tcp_is_curve_authenticated_unless_insecure() -> None:
    text = (DOCS / "PROTOCOL.md").read_text()
    security = section(text, "Authentication (tcp://)")
    for needed in (
        "CURVE",
        "--insecure-tcp",
        "insecure_tcp=True",
        "--auth-keys",
        "python -m rlsync.wire.auth",
        auth.SERVER_PUBLIC,
        auth.SERVER_SECRET,
        auth.CLIENT_SECRET,
        auth.ALLOWED_DIR,
        auth.ZAP_DOMAIN.decode(),
    ):
        assert needed in security, needed
    transport = " ".join(section(text, "Transport").split())
    assert "no authentication" not in transport and "CURVE authentication" in transport


def test_the_flags_the_doc_names_exist() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    options = {o for action in parser._actions for o in action.option_strings}
    assert {"--auth-keys", "--insecure-tcp"} <= options
