"""Where the Anthropic API key comes from (without importing the SDK, which takes seconds):
the proposer reads it, the launcher keeps it and its file away from every run.

Only `ANTHROPIC_API_KEY`, or a secrets file (`NIGHTSHIFT_ANTHROPIC_KEY_FILE`, default
`~/.config/nightshift/anthropic_key`). The key never reaches a log, an event or a trainer.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from services.telemetry import get_logger

KEY_FILE = Path("~/.config/nightshift/anthropic_key")


def load_api_key(env: dict[str, str] | None = None) -> str | None:
    """ANTHROPIC_API_KEY, else the secrets file; None when neither holds a key."""
    env = dict(os.environ) if env is None else env
    key = env.get("ANTHROPIC_API_KEY", "").strip()
    if key:
        return key
    path = Path(env.get("NIGHTSHIFT_ANTHROPIC_KEY_FILE") or KEY_FILE).expanduser()
    try:
        key = path.read_text().strip()
    except OSError:
        return None
    log = get_logger(strategy="claude")
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("claude_key_file_readable_by_others", path=str(path), fix=f"chmod 600 {path}")
    return key or None
