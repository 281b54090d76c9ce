"""``lorart serve`` under its guards and limits: API key, runtime updates disabled, a
tiny queue (429 + Retry-After) and SIGTERM with requests in flight. A real server
process (a second one: these flags conflict with ``test_server.py``'s), the real model,
the official ``openai`` client."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from lorart.serve.http_launch import ServerProcess  # noqa: E402

KEY = "sk-test-7f3a"
UPPERCASE = Path(__file__).resolve().parent.parent / "lorart" / "data" / "adapters" / "uppercase"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    adapter_dir = tmp_path_factory.mktemp("adapter_dir")
    proc = ServerProcess(["--adapter", f"uppercase={UPPERCASE}", "--adapter-dir",
                          str(adapter_dir), "--api-key", KEY, "--max-num-seqs", "1",
                          "--max-queue", "1", "--shutdown-timeout", "5"])
    proc.start()
    yield proc
    proc.stop()


def _auth(key=KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_health_is_open_everything_else_needs_the_key(server):
    assert httpx.get(server.url + "/health").status_code == 200
    for method, path in [("GET", "/v1/models"), ("GET", "/metrics"),
                         ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                         ("POST", "/v1/load_lora_adapter"), ("GET", "/v1/nothing")]:
        for headers in ({}, _auth("wrong"), {"Authorization": KEY}):
            r = httpx.request(method, server.url + path, headers=headers, json={})
            assert r.status_code == 401, (method, path, headers, r.text)
            assert r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(server.url + "/v1/models", headers=_auth()).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong",
                      max_retries=0).models.list()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    out = client.chat.completions.create(model="uppercase", max_tokens=3, temperature=0,
                                         messages=[{"role": "user", "content": "Hi"}])
    assert out.usage.completion_tokens >= 1


def test_runtime_updates_are_forbidden_without_the_flag(server):
    r = httpx.post(server.url + "/v1/load_lora_adapter", headers=_auth(),
                   json={"lora_name": "x", "lora_path": str(UPPERCASE)})
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    r = httpx.post(server.url + "/v1/unload_lora_adapter", headers=_auth(),
                   json={"lora_name": "uppercase"})
    assert r.status_code == 403
    models = httpx.get(server.url + "/v1/models", headers=_auth()).json()["data"]
    assert "uppercase" in {m["id"] for m in models}


def test_full_queue_answers_429_with_retry_after(server):
    body = {"model": "uppercase", "prompt": "Count:", "max_tokens": 48, "ignore_eos": True,
            "temperature": 0}

    async def flood():
        async with httpx.AsyncClient(base_url=server.url, headers=_auth(), timeout=120) as c:
            return await asyncio.gather(*[c.post("/v1/completions", json=body)
                                          for _ in range(6)])

    responses = asyncio.run(flood())
    statuses = sorted(r.status_code for r in responses)
    # one running and one waiting fit; the rest are turned away at once
    assert statuses.count(200) >= 1 and statuses.count(429) >= 1, statuses
    assert set(statuses) <= {200, 429}
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["type"] == "rate_limit_error"
    with pytest.raises(openai.RateLimitError):  # the client's own view of it
        asyncio.run(_flood_with_openai(server, body))


async def _flood_with_openai(server, body):
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    async with client:
        await asyncio.gather(*[client.completions.create(
            model=body["model"], prompt=body["prompt"], max_tokens=body["max_tokens"],
            temperature=0, extra_body={"ignore_eos": True}) for _ in range(6)])


def _wait_idle(server, timeout: float = 60.0) -> None:
    """Until the engine has nothing running or waiting (earlier tests' cancellations)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = httpx.get(server.url + "/metrics", headers=_auth()).text
        if "lorart_running_requests 0.0" in text and "lorart_queue_depth 0.0" in text:
            return
        time.sleep(0.2)
    raise AssertionError("the engine did not become idle")


def test_sigterm_finishes_or_cancels_in_flight_then_exits_0(server):
    """SIGTERM with two requests in flight and --shutdown-timeout 5: the short one
    finishes normally, the long one is cut at the timeout; the process exits 0."""
    _wait_idle(server)
    results = {}
    short_started = threading.Event()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0,
                           timeout=120)

    def run(name, max_tokens):
        try:
            stream = client.completions.create(model="uppercase", prompt="Count:", stream=True,
                                               max_tokens=max_tokens, temperature=0,
                                               extra_body={"ignore_eos": True})
            reasons = []
            for chunk in stream:
                short_started.set()
                reasons += [c.finish_reason for c in chunk.choices]
            results[name] = reasons
        except Exception as exc:  # the cut stream: a dropped connection is the expected end
            results[name] = exc

    # --max-num-seqs 1: the short one runs first, the long one waits, then runs
    threads = [threading.Thread(target=run, args=("short", 3)),
               threading.Thread(target=run, args=("long", 5000))]
    threads[0].start()
    assert short_started.wait(60)
    threads[1].start()
    time.sleep(0.5)
    t0 = time.monotonic()
    assert server.stop(signal.SIGTERM, timeout=90) == 0, server.log()
    assert time.monotonic() - t0 < 5 + 30  # the graceful period, not 5000 tokens
    for t in threads:
        t.join(timeout=30)
    assert isinstance(results["short"], list) and results["short"][-1] == "length", results
    assert not isinstance(results["long"], list) or results["long"][-1] != "length", results
    with pytest.raises(httpx.ConnectError):  # no longer accepting
        httpx.get(server.url + "/health", timeout=5)
