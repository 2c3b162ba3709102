"""Reading a Messages API request body: the prompt in cache order, the user turns, the
parent source and the wave size K that nightshift's prompt carries."""

from __future__ import annotations

import json
import re
from typing import Any

Body = dict[str, Any]
PARENT_RE = re.compile(r"<parent_source>\n(.*)\n</parent_source>", re.S)
WANTED_RE = re.compile(r"Propose exactly (\d+)")


def prompt_segments(body: Body) -> list[tuple[str, bool]]:
    """The prompt in cache order (tools, system, messages) as (text, is a cache breakpoint)."""
    segs: list[tuple[str, bool]] = [
        (json.dumps(t, sort_keys=True), "cache_control" in t) for t in body.get("tools", [])
    ]
    system = body.get("system", [])
    if isinstance(system, str):
        system = [{"type": "text", "text": system}]
    for block in system:
        segs.append((block.get("text", ""), "cache_control" in block))
    for msg in body.get("messages", []):
        content = msg["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        for block in content:
            text = (
                block.get("text")
                if block.get("type") == "text"
                else json.dumps(block, sort_keys=True)
            )
            segs.append((text or "", "cache_control" in block))
    return segs


def user_texts(body: Body) -> list[str]:
    """Every text of the user turns, tool_result contents included, in order."""
    out: list[str] = []
    for msg in body.get("messages", []):
        if msg.get("role") != "user":
            continue
        content = msg["content"]
        if isinstance(content, str):
            out.append(content)
            continue
        for block in content:
            if block.get("type") == "text":
                out.append(block["text"])
            elif block.get("type") == "tool_result":
                inner = block.get("content")
                out += (
                    [inner] if isinstance(inner, str) else [b.get("text", "") for b in inner or []]
                )
    return out


def request_text(body: Body) -> str:
    """The whole prompt as text (for assertions)."""
    return "\n".join(text for text, _ in prompt_segments(body))


def parent_source(body: Body) -> str | None:
    for text in user_texts(body):
        match = PARENT_RE.search(text)
        if match:
            return match.group(1)
    return None


def wanted(body: Body, default: int = 4) -> int:
    texts = user_texts(body)
    for text in reversed(texts):
        found = WANTED_RE.findall(text)
        if found:
            return int(found[-1])
    return default
