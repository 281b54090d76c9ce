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
import os
import shutil
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
