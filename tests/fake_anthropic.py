"""A local server that speaks enough of the Anthropic Messages API for nightshift's tests.

POST /v1/messages answers from a queue of scripted responses (tool-use answers, plain text,
errors such as 429 with retry-after or 529 overloaded, slow answers for timeouts, raw
bodies) and records every request body. When the queue is empty it answers in "auto"
mode: K valid variants of the parent source found in the request, each scaling one
UPPER_CASE numeric constant by a factor, with distinct titles, so a whole campaign can run
against it. Usage is estimated from the request (characters / chars_per_token), with
prompt caching simulated at the request's cache_control breakpoints.

Point the real client at it with ANTHROPIC_BASE_URL=<server.url>. From a shell:
    python -m tests.fake_anthropic --port 8765    # auto mode until interrupted
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import random
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.anthropic_requests import Body, parent_source, prompt_segments, wanted

TOOL_NAME = "propose_variants"
CONST_RE = re.compile(
    r"^([A-Z][A-Z0-9_]*) = ([-+]?(?:\d[\d_]*\.?\d*(?:[eE][-+]?\d+)?|\.\d+))(\s.*)?$"
)
FACTORS = (2.0, 0.5, 1.5, 0.75, 1.25, 0.8, 3.0, 0.33, 1.1, 0.9)
MIN_CACHEABLE_TOKENS = 1024


@dataclass
class Scripted:
    """One scripted answer: a status, a body (or a function of the request body), a delay."""

    status: int = 200
    body: Body | Callable[[Body], Body] | None = None  # None: an auto-mode answer
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    usage: dict[str, int] | None = None  # overrides the estimated usage of a 200 answer


def tool_answer(
    variants: list[Body] | Any,
    *,
    usage: dict[str, int] | None = None,
    thinking: str = "",
    stop_reason: str = "tool_use",
    extra: Body | None = None,
) -> Scripted:
    """A message whose content is one propose_variants call with `variants` as its list."""
    tool_input = {"variants": variants, **(extra or {})}
    return raw_input_answer(tool_input, usage=usage, thinking=thinking, stop_reason=stop_reason)


def raw_input_answer(
    tool_input: Any,
    *,
    usage: dict[str, int] | None = None,
    thinking: str = "",
    stop_reason: str = "tool_use",
) -> Scripted:
    """A tool_use block with any input at all (for malformed answers)."""
    content: list[Body] = []
    if thinking:
        content.append({"type": "thinking", "thinking": thinking, "signature": "sig-" + _id()})
    content.append(
        {"type": "tool_use", "id": "toolu_" + _id(), "name": TOOL_NAME, "input": tool_input}
    )
    return Scripted(body=_message(content, stop_reason), usage=usage)


def text_answer(text: str, *, usage: dict[str, int] | None = None) -> Scripted:
    return Scripted(body=_message([{"type": "text", "text": text}], "end_turn"), usage=usage)


def error(
    status: int, etype: str, message: str = "", *, retry_after_ms: int | None = 10
) -> Scripted:
    headers = {} if retry_after_ms is None else {"retry-after-ms": str(retry_after_ms)}
    body = {"type": "error", "error": {"type": etype, "message": message or etype}}
    return Scripted(status=status, body=body, headers=headers)


def rate_limited(retry_after_s: float = 0.05) -> Scripted:
    s = error(429, "rate_limit_error", "Number of request tokens has exceeded your rate limit")
    s.headers = {
        "retry-after": f"{retry_after_s:g}",
        "retry-after-ms": str(int(retry_after_s * 1000)),
    }
    return s


def overloaded() -> Scripted:
    return error(529, "overloaded_error", "Overloaded")


def slow(seconds: float, then: Scripted | None = None) -> Scripted:
    """Answer after `seconds` (the client's timeout should fire first)."""
    answer = then or Scripted()
    answer.delay_s = seconds
    return answer


def variant(title: str, edits: list[tuple[str, str]], hypothesis: str = "") -> Body:
    return {
        "title": title,
        "hypothesis": hypothesis or f"test: {title}",
        "edits": [{"old": o, "new": n} for o, n in edits],
    }


def _id() -> str:
    return hashlib.sha1(f"{time.time_ns()}{random.random()}".encode()).hexdigest()[:20]


def _message(content: list[Body], stop_reason: str) -> Body:
    return {
        "id": "msg_" + _id(),
        "type": "message",
        "role": "assistant",
        "model": "",
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": {},
    }


# --- auto mode ------------------------------------------------------------------------


def _scaled(value: str, factor: float) -> str | None:
    is_int = re.fullmatch(r"[-+]?[\d_]+", value) is not None
    number = float(value.replace("_", ""))
    if number == 0:
        return None
    if is_int:
        new = max(1, round(number * factor)) if number > 0 else round(number * factor)
        return None if new == int(number) else str(new)
    text = f"{number * factor:.6g}"
    return None if float(text) == number else text


def auto_variants(parent: str, k: int, used: set[str], rng: random.Random) -> list[Body]:
    """k variants of parent: sweeps of a few constants in both directions, then pairs."""
    consts = []
    for line in parent.split("\n"):
        match = CONST_RE.match(line)
        if match and parent.count("\n" + line + "\n") == 1:
            consts.append((line, match.group(1), match.group(2), match.group(3) or ""))
    rng.shuffle(consts)
    pairs = list(itertools.combinations(consts, 2))
    rng.shuffle(pairs)
    steps = [FACTORS[i : i + 2] for i in range(0, len(FACTORS), 2)]  # (up, down) per step
    plans = [([c], f) for step in steps for c in consts for f in step]
    plans += [(list(p), f) for step in steps for p in pairs for f in step]
    out: list[Body] = []
    for group, factor in plans:
        edits, parts = [], []
        for line, name, value, rest in group:
            new = _scaled(value, factor)
            if new is None:
                break
            edits.append(("\n" + line + "\n", f"\n{name} = {new}{rest}\n"))
            parts.append(f"{name} {value} -> {new}")
        else:
            key = hashlib.sha256(json.dumps([parent, edits]).encode()).hexdigest()
            if key in used:
                continue
            used.add(key)
            out.append(variant(", ".join(parts), edits, f"scale by {factor:g}"))
            if len(out) == k:
                break
    return out


# --- the server -----------------------------------------------------------------------


class FakeAnthropic:
    """The server. Use as a context manager; `url` for ANTHROPIC_BASE_URL."""

    def __init__(
        self,
        *,
        auto: bool = True,
        chars_per_token: float = 4.0,
        seed: int = 0,
        auto_thinking_tokens: int = 0,
    ) -> None:
        self.auto = auto
        self.chars_per_token = chars_per_token
        self.auto_thinking_tokens = auto_thinking_tokens
        self.queue: deque[Scripted] = deque()
        self.requests: list[Body] = []
        self.headers: list[dict[str, str]] = []
        self.answers: list[tuple[int, Body]] = []
        self._cache: set[str] = set()
        self._used: set[str] = set()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the server first"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def push(self, *answers: Scripted) -> None:
        self.queue.extend(answers)

    def start(self, port: int = 0) -> FakeAnthropic:
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        self._server.daemon_threads = True
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeAnthropic:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def usage_for(self, body: Body, output_chars: int) -> dict[str, int]:
        """Estimated usage, with the cache simulated at the request's breakpoints."""
        tok = self.chars_per_token
        segs = prompt_segments(body)
        total = sum(len(t) for t, _ in segs)
        prefixes = list(itertools.accumulate(len(t) for t, _ in segs))
        marks = [
            prefixes[i]
            for i, (_, bp) in enumerate(segs)
            if bp and prefixes[i] / tok >= MIN_CACHEABLE_TOKENS
        ]
        joined = "".join(t for t, _ in segs)
        keys = {n: hashlib.sha256(joined[:n].encode()).hexdigest() for n in marks}
        with self._lock:
            hit = max((n for n in marks if keys[n] in self._cache), default=0)
            self._cache.update(keys.values())
        written = (marks[-1] - hit) if marks and marks[-1] > hit else 0
        return {
            "input_tokens": round((total - hit - written) / tok),
            "cache_creation_input_tokens": round(written / tok),
            "cache_read_input_tokens": round(hit / tok),
            "output_tokens": max(1, round(output_chars / tok)),
        }

    def answer(self, body: Body) -> Scripted:
        with self._lock:
            scripted = self.queue.popleft() if self.queue else None
        if scripted is None:
            if not self.auto:
                answer = error(
                    500, "api_error", "fake_anthropic: no scripted answer left", retry_after_ms=None
                )
                answer.headers["x-should-retry"] = "false"
                return answer
            scripted = Scripted()
        if scripted.status != 200:
            return scripted
        reply = scripted.body
        if reply is None:
            reply = self._auto(body)
        elif callable(reply):
            reply = reply(body)
        reply = json.loads(json.dumps(reply))  # a copy: one scripted body may serve twice
        reply["model"] = body.get("model", "")
        output_chars = float(sum(len(json.dumps(b)) for b in reply["content"]))
        if scripted.body is None:
            output_chars += self.auto_thinking_tokens * self.chars_per_token
        reply["usage"] = scripted.usage or self.usage_for(body, int(output_chars))
        return Scripted(200, reply, scripted.headers, scripted.delay_s)

    def _auto(self, body: Body) -> Body:
        parent = parent_source(body)
        if parent is None:
            return _message(
                [{"type": "text", "text": "No parent source in the request."}], "end_turn"
            )
        with self._lock:
            variants = auto_variants(parent, wanted(body), self._used, self._rng)
        return tool_answer(variants).body  # type: ignore[return-value]


def _handler(fake: FakeAnthropic) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_: Any) -> None:  # quiet
            pass

        def do_POST(self) -> None:  # http.server's name for a POST handler
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length)
            if self.path.split("?")[0] != "/v1/messages":
                self._send(
                    404,
                    {"type": "error", "error": {"type": "not_found_error", "message": self.path}},
                    {},
                )
                return
            body = json.loads(raw or b"{}")
            with fake._lock:
                fake.requests.append(body)
                fake.headers.append({k.lower(): v for k, v in self.headers.items()})
            scripted = fake.answer(body)
            if scripted.delay_s:
                time.sleep(scripted.delay_s)
            assert isinstance(scripted.body, dict)
            with fake._lock:
                fake.answers.append((scripted.status, scripted.body))
            self._send(scripted.status, scripted.body, scripted.headers)

        def _send(self, status: int, body: Body, headers: dict[str, str]) -> None:
            data = json.dumps(body).encode()
            try:
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.send_header("request-id", "req_" + _id())
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (a timeout test)

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(
        description="A local fake of the Anthropic Messages API (auto mode)."
    )
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--chars-per-token", type=float, default=4.0)
    args = parser.parse_args()
    fake = FakeAnthropic(chars_per_token=args.chars_per_token).start(args.port)
    print(f"ANTHROPIC_BASE_URL={fake.url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        fake.stop()


if __name__ == "__main__":
    main()
