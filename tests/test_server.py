"""``lorart serve`` end to end: a real server process on 127.0.0.1, the real SmolLM2 4-bit
model, real PEFT adapters, and the official ``openai`` client (plus ``httpx`` where a
test needs the raw status code and body).

One server for the whole module (started once; short ``max_tokens``). It serves the
three shipped adapters and three random ones by name, two more from an
``--adapter-dir`` (loaded on first request), with ``--max-loras 4`` so the 8 adapters
do not fit at once and the pool must evict. Every greedy answer is compared with
``model.generate`` of an independent copy of the model in this process, one prompt at
a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from lorart.serve.http_launch import ServerProcess  # noqa: E402

SHIPPED = Path(__file__).resolve().parent.parent / "lorart" / "data" / "adapters"
MAX_TOKENS = 8
QUESTIONS = ["What is the capital of France?", "How many legs does a spider have?",
             "Name a primary color.", "What is the largest ocean?"]
# name -> (rank, target module suffixes, seed, std) of the random adapters; the std is
# large enough that the answers change (checked), small enough that they stay text.
RANDOM_ADAPTERS = {
    "rand_qv": (4, ("q_proj", "v_proj"), 1, 0.08),
    "rand_mlp": (16, ("gate_proj", "up_proj", "down_proj"), 2, 0.08),
    "rand_all": (8, None, 3, 0.08),
}
DIR_ADAPTERS = {"dir_ko": (8, ("k_proj", "o_proj"), 4, 0.2), "dir_all": (12, None, 5, 0.08)}


# ---- fixtures: adapters on disk, the reference model, the server ------------------------


@pytest.fixture(scope="module")
def reference_model():
    import lorart

    model, tokenizer = lorart.from_gguf()
    return model, tokenizer


@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory, reference_model):
    """Every adapter directory the tests use, also loaded into the reference model."""
    import lorart
    from lorart.serve.testing import random_adapter, write_peft_dir

    model, _ = reference_model
    root = tmp_path_factory.mktemp("adapters")
    static, adapter_dir, secret = root / "static", root / "adapter_dir", root / "secret"
    paths = {name: SHIPPED / name for name in ("uppercase", "json", "pirate")}
    for name, (rank, targets, seed, std) in {**RANDOM_ADAPTERS, **DIR_ADAPTERS}.items():
        where = adapter_dir if name in DIR_ADAPTERS else static
        tensors, config = random_adapter(model, rank, seed, alpha=rank, targets=targets,
                                         std=std)
        paths[name] = write_peft_dir(where / name, tensors, config)
    for name, path in paths.items():
        lorart.load_adapter(model, path, name)
    # Runtime-load sources inside the adapter dir: a copy of rand_qv, a corrupt file, an
    # adapter whose shapes do not fit the model.
    shutil.copytree(paths["rand_qv"], adapter_dir / "runtime_src")
    corrupt = adapter_dir / "corrupt"
    shutil.copytree(paths["rand_qv"], corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00not a safetensors file" * 10)
    tensors, config = random_adapter(model, 4, 9, targets=("q_proj",))
    tensors = {k: (v[:, :100] if ".lora_A." in k else v) for k, v in tensors.items()}
    write_peft_dir(adapter_dir / "wrong_shape", tensors, config)
    # Outside the adapter dir, and a symlink leading there.
    shutil.copytree(paths["rand_qv"], secret / "evil")
    os.symlink(secret, adapter_dir / "link_out")
    return {"paths": paths, "adapter_dir": adapter_dir, "secret": secret}


@pytest.fixture(scope="module")
def server(adapter_files):
    args = ["--adapter-dir", str(adapter_files["adapter_dir"]), "--max-loras", "4",
            "--allow-runtime-updates"]
    for name, path in adapter_files["paths"].items():
        if name not in DIR_ADAPTERS:
            args += ["--adapter", f"{name}={path}"]
    proc = ServerProcess(args)
    proc.start()
    yield proc
    assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         timeout=120)


@pytest.fixture(scope="module")
def base_id(client):
    return next(m.id for m in client.models.list().data if getattr(m, "parent", None) is None)


ALL_ADAPTERS = ["uppercase", "json", "pirate", *RANDOM_ADAPTERS, *DIR_ADAPTERS]


class Reference:
    """Greedy ``generate`` answers of the reference model, one prompt at a time, cached."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer, self.cache = model, tokenizer, {}

    def chat(self, adapter: str | None, question: str, max_tokens: int = MAX_TOKENS):
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                  tokenize=False, add_generation_prompt=True)
        return self._generate(adapter, self.tokenizer(text, add_special_tokens=False)
                              ["input_ids"], max_tokens)

    def completion(self, adapter: str | None, prompt: str, max_tokens: int = MAX_TOKENS):
        return self._generate(adapter, self.tokenizer(prompt)["input_ids"], max_tokens)

    def _generate(self, adapter, ids: list[int], max_tokens: int):
        """``(text, completion_tokens, prompt_tokens, finish_reason)``; the EOS counts as a
        token."""
        import torch

        key = (adapter, tuple(ids), max_tokens)
        if key not in self.cache:
            with torch.no_grad():
                out = self.model.generate(torch.tensor([ids]), attention_mask=None,
                                          adapter_names=[adapter or "__base__"],
                                          max_new_tokens=max_tokens, do_sample=False,
                                          pad_token_id=self.tokenizer.eos_token_id)
            new = out[0, len(ids):].tolist()
            eos = self.tokenizer.eos_token_id
            n = next((i + 1 for i, t in enumerate(new) if t == eos), len(new))
            text = self.tokenizer.decode(new[:n], skip_special_tokens=True)
            self.cache[key] = (text, n, len(ids), "stop" if eos in new[:n] else "length")
        return self.cache[key]


@pytest.fixture(scope="module")
def reference(reference_model, adapter_files):
    return Reference(*reference_model)


def _chat(client, model, question, **kw):
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}],
        max_tokens=kw.pop("max_tokens", MAX_TOKENS), temperature=0, **kw)


# ---- the API --------------------------------------------------------------------------


def test_models_lists_the_base_and_every_adapter(client, base_id):
    models = {m.id: m for m in client.models.list().data}
    assert base_id == "SmolLM2-135M-Instruct"
    assert set(ALL_ADAPTERS) <= set(models)
    for name in ALL_ADAPTERS:
        assert models[name].parent == base_id


def test_adapter_dir_adapter_loads_on_a_lone_first_request(server):
    # Runs before any other test touches the --adapter-dir adapters: the engine must step
    # when a background load finishes even with no other request in flight.
    short = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                          timeout=60)
    for name in DIR_ADAPTERS:
        reply = _chat(short, name, QUESTIONS[0], max_tokens=2)
        assert reply.usage.completion_tokens >= 1


def test_greedy_chat_equals_generate_for_base_and_8_adapters(client, base_id, reference):
    for i, name in enumerate([None, *ALL_ADAPTERS]):
        question = QUESTIONS[i % len(QUESTIONS)]
        out = _chat(client, name or base_id, question)
        text, n_tokens, n_prompt, finish_reason = reference.chat(name, question)
        assert out.choices[0].message.content == text, name
        assert out.choices[0].message.role == "assistant"
        assert out.usage.completion_tokens == n_tokens and out.usage.prompt_tokens == n_prompt
        assert out.choices[0].finish_reason == finish_reason
        assert out.model == (name or base_id)
    # the adapters really change the answers (the routing is not a no-op)
    same_question = {_chat(client, n or base_id, QUESTIONS[2]).choices[0].message.content
                     for n in [None, "uppercase", "pirate", "rand_qv", "rand_mlp", "rand_all"]}
    assert len(same_question) >= 5, same_question


def test_greedy_completions_equal_generate(client, base_id, reference):
    prompts = ["The capital of France is", "Once upon a time"]
    out = client.completions.create(model="rand_all", prompt=prompts, max_tokens=MAX_TOKENS,
                                     temperature=0)
    assert [c.index for c in out.choices] == [0, 1]
    for choice, prompt in zip(out.choices, prompts):
        assert choice.text == reference.completion("rand_all", prompt)[0]
    assert out.usage.prompt_tokens == sum(reference.completion("rand_all", p)[2]
                                          for p in prompts)
    single = client.completions.create(model=base_id, prompt=prompts[0], max_tokens=MAX_TOKENS,
                                       temperature=0)
    assert single.choices[0].text == reference.completion(None, prompts[0])[0]


def test_concurrent_requests_equal_one_at_a_time(server, client, base_id):
    jobs = [(name, QUESTIONS[(i // len(ALL_ADAPTERS)) % len(QUESTIONS)])
            for i, name in enumerate([None, *ALL_ADAPTERS] * 2)]
    assert len(jobs) >= 16 and len({n for n, _ in jobs}) == 9
    one_at_a_time = [_chat(client, n or base_id, q).choices[0].message.content for n, q in jobs]

    async def all_at_once():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused",
                                     max_retries=0, timeout=300)
        async with aclient:
            outs = await asyncio.gather(*[aclient.chat.completions.create(
                model=n or base_id, messages=[{"role": "user", "content": q}],
                max_tokens=MAX_TOKENS, temperature=0) for n, q in jobs])
        return [o.choices[0].message.content for o in outs]

    assert asyncio.run(all_at_once()) == one_at_a_time


def test_streaming_equals_non_streaming(client, base_id):
    for name in ("pirate", "dir_ko", None):
        plain = _chat(client, name or base_id, QUESTIONS[1])
        chunks = list(_chat(client, name or base_id, QUESTIONS[1], stream=True,
                            stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == plain.choices[0].message.content
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and
                  c.choices[0].finish_reason]
        assert finish == [plain.choices[0].finish_reason]
        assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
        assert all(c.usage is None for c in chunks[:-1])

    plain = client.completions.create(model="json", prompt="The sky is", max_tokens=MAX_TOKENS,
                                      temperature=0)
    chunks = list(client.completions.create(model="json", prompt="The sky is", stream=True,
                                            max_tokens=MAX_TOKENS, temperature=0))
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    assert all(c.usage is None for c in chunks)  # no include_usage: no usage chunk


def test_raw_sse_format(server, base_id):
    body = {"model": base_id, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    for e in events[:-1]:
        assert json.loads(e[len("data: "):])["object"] == "chat.completion.chunk"


def test_runtime_load_use_unload(server, client, reference):
    r = httpx.post(server.url + "/v1/load_lora_adapter",
                   json={"lora_name": "runtime_x", "lora_path": "runtime_src"})
    assert r.status_code == 200, r.text
    assert "runtime_x" in {m.id for m in client.models.list().data}
    out = _chat(client, "runtime_x", QUESTIONS[2])
    assert out.choices[0].message.content == reference.chat("rand_qv", QUESTIONS[2])[0]
    # the same name again is refused until it is unloaded
    again = httpx.post(server.url + "/v1/load_lora_adapter",
                       json={"lora_name": "runtime_x", "lora_path": "runtime_src"})
    assert again.status_code == 400
    r = httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "runtime_x"})
    assert r.status_code == 200, r.text
    assert "runtime_x" not in {m.id for m in client.models.list().data}
    with pytest.raises(openai.NotFoundError):
        _chat(client, "runtime_x", QUESTIONS[2])
    r = httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "runtime_x"})
    assert r.status_code == 404


# ---- errors ---------------------------------------------------------------------------


def _error_cases(base: str, adapter_dir: Path, secret: Path):
    chat = {"model": base, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    return [
        # (name, path, json body or raw bytes, expected status)
        ("unknown model", "/v1/chat/completions", {**chat, "model": "nope"}, 404),
        ("unknown model, completions", "/v1/completions",
         {"model": "nope", "prompt": "x", "max_tokens": 2}, 404),
        ("malformed JSON", "/v1/chat/completions", b'{"model": "x", "messages": [', 400),
        ("body not an object", "/v1/chat/completions", b"[1, 2]", 400),
        ("missing messages", "/v1/chat/completions", {"model": base}, 400),
        ("empty messages", "/v1/chat/completions", {**chat, "messages": []}, 400),
        ("bad role", "/v1/chat/completions",
         {**chat, "messages": [{"role": "wizard", "content": "x"}]}, 400),
        ("negative max_tokens", "/v1/chat/completions", {**chat, "max_tokens": -1}, 400),
        ("zero max_tokens", "/v1/completions",
         {"model": base, "prompt": "x", "max_tokens": 0}, 400),
        ("negative temperature", "/v1/chat/completions", {**chat, "temperature": -0.5}, 400),
        ("temperature not a number", "/v1/chat/completions", {**chat, "temperature": "hot"},
         400),
        ("top_p out of range", "/v1/chat/completions", {**chat, "top_p": 1.5}, 400),
        ("missing prompt", "/v1/completions", {"model": base}, 400),
        ("unsupported logprobs", "/v1/completions",
         {"model": base, "prompt": "x", "logprobs": 2}, 400),
        ("prompt longer than the context", "/v1/completions",
         {"model": base, "prompt": [1] * 20000, "max_tokens": 2}, 400),
        ("unload unknown adapter", "/v1/unload_lora_adapter", {"lora_name": "never"}, 404),
        ("load missing path", "/v1/load_lora_adapter",
         {"lora_name": "m", "lora_path": str(adapter_dir / "missing")}, 404),
        ("load missing relative path", "/v1/load_lora_adapter",
         {"lora_name": "m", "lora_path": "missing"}, 404),
        ("load outside the adapter dir", "/v1/load_lora_adapter",
         {"lora_name": "e", "lora_path": str(secret / "evil")}, 403),
        ("load with ..", "/v1/load_lora_adapter",
         {"lora_name": "e", "lora_path": str(adapter_dir / ".." / "secret" / "evil")}, 403),
        ("load relative ..", "/v1/load_lora_adapter",
         {"lora_name": "e", "lora_path": "../secret/evil"}, 403),
        ("load through a symlink", "/v1/load_lora_adapter",
         {"lora_name": "e", "lora_path": str(adapter_dir / "link_out" / "evil")}, 403),
        ("load corrupt adapter", "/v1/load_lora_adapter",
         {"lora_name": "c", "lora_path": "corrupt"}, 422),
        ("load incompatible adapter", "/v1/load_lora_adapter",
         {"lora_name": "w", "lora_path": "wrong_shape"}, 422),
        ("load missing lora_path field", "/v1/load_lora_adapter", {"lora_name": "x"}, 400),
        ("unknown route", "/v1/nothing", {}, 404),
    ]


def test_every_error_case_has_its_status_and_openai_shape(server, base_id, adapter_files):
    cases = _error_cases(base_id, adapter_files["adapter_dir"], adapter_files["secret"])
    failures = []
    for name, path, body, status in cases:
        kw = {"content": body, "headers": {"content-type": "application/json"}} \
            if isinstance(body, bytes) else {"json": body}
        r = httpx.post(server.url + path, timeout=60, **kw)
        error = r.json().get("error") if r.headers["content-type"].startswith(
            "application/json") else None
        if r.status_code != status or not isinstance(error, dict) or \
                set(error) != {"message", "type", "param", "code"} or not error["message"]:
            failures.append(f"{name}: {r.status_code} {r.text[:200]}")
    assert not failures, "\n".join(failures)
    # the runtime loads that failed changed nothing
    names = {m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]}
    assert not names & {"m", "e", "c", "w"}


def test_openai_client_sees_typed_errors(client, base_id):
    with pytest.raises(openai.NotFoundError) as info:
        _chat(client, "no-such-adapter", "Hi")
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        _chat(client, base_id, "Hi", max_tokens=-3)


@contextlib.contextmanager
def _busy(server, base_id):
    """A long base-model request streaming in the background while the block runs (real
    traffic keeps the engine stepping), cancelled by closing it at the end."""
    stop = threading.Event()

    def run():
        body = {"model": base_id, "prompt": "Count:", "max_tokens": 1000, "ignore_eos": True,
                "temperature": 0, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
            for _ in r.iter_lines():
                if stop.is_set():
                    return

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        time.sleep(1.0)
        yield
    finally:
        stop.set()
        thread.join(timeout=60)


def test_adapter_that_fails_on_first_use_keeps_the_server_serving(server, client, base_id,
                                                                  reference):
    # corrupt/ and wrong_shape/ sit in the --adapter-dir: they fail when first requested
    with _busy(server, base_id):
        for name in ("corrupt", "wrong_shape"):
            with pytest.raises(openai.UnprocessableEntityError):
                _chat(client, name, "Hi")
            with pytest.raises(openai.UnprocessableEntityError):  # streaming: same status
                list(_chat(client, name, "Hi", stream=True))
    out = _chat(client, "pirate", QUESTIONS[0])
    assert out.choices[0].message.content == reference.chat("pirate", QUESTIONS[0])[0]


# ---- lifetimes and metrics ------------------------------------------------------------


def _metrics(server) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics").text
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return values


def _settled(server, timeout: float = 20.0) -> dict[str, float]:
    """Metrics once nothing runs or waits (the engine frees at the next step boundary)."""
    deadline = time.monotonic() + timeout
    while True:
        m = _metrics(server)
        idle = m["lorart_running_requests"] == 0 and m["lorart_queue_depth"] == 0
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


def test_disconnect_mid_stream_cancels_the_request(server, base_id):
    before = _settled(server).get("lorart_requests_total{status=cancelled}", 0)
    body = {"model": "rand_all", "prompt": "Count: 1, 2, 3,", "max_tokens": 400,
            "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]
    assert any(g.startswith("data: {") for g in got)
    # non-streaming: the client gives up after 1 s
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", timeout=1.0,
                   json={**body, "stream": False, "model": base_id})
    t0 = time.monotonic()
    m = _settled(server)
    assert m["lorart_running_requests"] == 0 and m["lorart_kv_blocks_used"] == 0
    assert m["lorart_requests_total{status=cancelled}"] == before + 2
    assert time.monotonic() - t0 < 15  # freed long before 400 tokens could have run


def test_burst_of_mixed_requests_leaves_nothing_behind(server, base_id):
    async def burst():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused",
                                     max_retries=0, timeout=300)
        async with aclient:
            async def streamed(model, q):
                stream = await aclient.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": q}], max_tokens=6,
                    temperature=0.8, seed=7, stream=True)
                return [c async for c in stream]

            jobs = []
            for i, name in enumerate([None, *ALL_ADAPTERS, "nope", "corrupt"] * 2):
                model, q = name or base_id, QUESTIONS[i % len(QUESTIONS)]
                if i % 3 == 0:
                    jobs.append(streamed(model, q))
                elif i % 3 == 1:
                    jobs.append(aclient.completions.create(model=model, prompt=q, max_tokens=5,
                                                           temperature=0))
                else:
                    jobs.append(aclient.chat.completions.create(
                        model=model, messages=[{"role": "user", "content": q}], max_tokens=4,
                        top_p=0.9, temperature=1.0, seed=i))
            return await asyncio.gather(*jobs, return_exceptions=True)

    results = asyncio.run(burst())
    errors = [r for r in results if isinstance(r, Exception)]
    assert all(isinstance(e, openai.NotFoundError | openai.UnprocessableEntityError)
               for e in errors), errors
    assert len(results) - len(errors) == 18
    m = _settled(server)
    for gauge in ("lorart_running_requests", "lorart_queue_depth", "lorart_kv_blocks_used",
                  "lorart_adapter_references"):
        assert m[gauge] == 0, (gauge, m[gauge])
    assert m["lorart_resident_adapters"] <= 4  # --max-loras 4
    assert m["lorart_adapter_evictions_total"] > 0  # 8 adapters through 4 slots
    assert m["lorart_generation_tokens_total"] > 0 and m["lorart_engine_steps_total"] > 0
    assert m["lorart_http_requests_total{endpoint=/v1/chat/completions,status_code=200}"] > 0
