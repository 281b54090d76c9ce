"""Bad adapters are refused with a clear error, and the model is left EXACTLY as it was."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

import lorart
from lorart.peft_io import CONFIG_NAME, WEIGHTS_NAME

P = "base_model.model."
Q0 = "model.layers.0.self_attn.q_proj"
V1 = "model.layers.1.self_attn.v_proj"


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def good_adapter():
    """(config, tensors) of a valid PEFT adapter on q_proj and v_proj, r=4."""
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
              "bias": "none", "use_rslora": False, "fan_in_fan_out": False}
    tensors = {}
    for layer in range(2):
        for proj, out_f in (("q_proj", 64), ("v_proj", 32)):
            key = f"{P}model.layers.{layer}.self_attn.{proj}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(4, 64)
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_f, 4)
    return config, tensors


def write(path, config, tensors, raw_config=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_NAME).write_text(raw_config if raw_config is not None else json.dumps(config))
    if tensors is not None:
        save_file(tensors, str(path / WEIGHTS_NAME))
    return path


def snapshot(model):
    """Everything load_adapter could change: tensors, module types, hooks, wrappers."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    types = [(n, type(m)) for n, m in model.named_modules()]
    layers = [m for _, m in model.named_modules() if isinstance(m, lorart.LoRALinear)]
    extra = (sorted(model.__dict__), len(model._forward_pre_hooks), len(model._forward_hooks),
             [(lyr.adapter_names, lyr.active_adapter) for lyr in layers],
             layers[0].registry.names[:] if layers else None)
    return state, types, extra


def assert_unchanged(model, snap):
    state, types, extra = snapshot(model)
    assert types == snap[1]
    assert extra == snap[2]
    assert state.keys() == snap[0].keys()
    for k in state:
        assert torch.equal(state[k], snap[0][k]), k


def _mutations():
    """name -> (function(config, tensors) -> (config, tensors, raw_config), error regex)."""
    def cfg(**kw):
        return lambda c, t: ({**c, **kw}, t, None)

    def drop(key):
        return lambda c, t: (c, {k: v for k, v in t.items() if k != key}, None)

    def add(key, value):
        return lambda c, t: (c, {**t, key: value}, None)

    return {
        "malformed json": (lambda c, t: (c, t, "{not json"), "malformed JSON"),
        "config not object": (lambda c, t: (c, t, "[1, 2]"), "JSON object"),
        "r not int": (cfg(r="four"), "r must be a positive integer"),
        "alpha not number": (cfg(lora_alpha=None), "lora_alpha must be a number"),
        "bad rank_pattern": (cfg(rank_pattern={"q_proj": -2}), "rank_pattern"),
        "use_dora": (cfg(use_dora=True), "DoRA"),
        "modules_to_save": (cfg(modules_to_save=["lm_head"]), "modules_to_save"),
        "lora bias": (cfg(bias="all"), "bias='all'"),
        "lora_bias flag": (cfg(lora_bias=True), "LoRA bias"),
        "not lora": (cfg(peft_type="IA3"), "peft_type 'IA3'"),
        "layers_to_transform": (cfg(layers_to_transform=[0]), "layers_to_transform"),
        "missing key": (drop(f"{P}{V1}.lora_B.weight"), "missing"),
        "extra key": (add(f"{P}model.layers.0.mlp.up_proj.lora_A.weight", torch.randn(4, 64)),
                      "unexpected weights"),
        "shape": (lambda c, t: (c, {**t, f"{P}{Q0}.lora_A.weight": torch.randn(5, 64)}, None),
                  r"shape \[5, 64\], expected \[4, 64\]"),
        "rank_pattern mismatch": (cfg(rank_pattern={"v_proj": 2}), "expected"),
        "module absent": (add(f"{P}model.layers.7.self_attn.q_proj.lora_A.weight",
                              torch.randn(4, 64)), "does not have"),
        "not linear": (add(f"{P}model.norm.lora_A.weight", torch.randn(4, 64)),
                       "only Linear/Conv1D"),
        "embedding lora": (add(f"{P}model.embed_tokens.lora_embedding_A", torch.randn(4, 101)),
                           "embedding LoRA"),
        "dora magnitude": (add(f"{P}{Q0}.lora_magnitude_vector", torch.randn(64)), "DoRA"),
        "bias tensor": (add(f"{P}{Q0}.lora_B.bias", torch.randn(64)), "LoRA bias"),
        "bad prefix": (lambda c, t: (c, {k.replace(P, "model."): v for k, v in t.items()}, None),
                       "unexpected key"),
        "nan weights": (lambda c, t: (c, {**t, f"{P}{Q0}.lora_B.weight":
                                          torch.full((64, 4), float("nan"))}, None), "finite"),
        "target regex hits norm": (cfg(target_modules=r".*norm"), "target_modules"),
    }


MUTATIONS = _mutations()


@pytest.fixture(params=["fresh", "patched"])
def model(request):
    m = tiny_llama()
    if request.param == "patched":  # already patched, 4-bit, with an adapter on other layers
        lorart.patch(m, ["q_proj", "o_proj"], quantize="int4", group_size=32)
        lorart.add_adapter(m, "other", r=2, init_lora_weights=False)
    return m


@pytest.mark.parametrize("case", sorted(MUTATIONS))
def test_bad_adapter_leaves_model_unchanged(model, case, tmp_path):
    mutate, error = MUTATIONS[case]
    config, tensors, raw = mutate(*good_adapter())
    path = write(tmp_path / "bad", config, tensors, raw)
    snap = snapshot(model)
    with pytest.raises((ValueError, TypeError), match=error):
        lorart.load_adapter(model, path, "new")
    assert_unchanged(model, snap)


def test_good_adapter_loads(model, tmp_path):
    """The unmutated adapter loads: so each failure above is caused by its mutation."""
    path = write(tmp_path / "good", *good_adapter())
    lorart.load_adapter(model, path, "new")
    assert model.model.layers[1].self_attn.v_proj.lora_A["new"].shape == (4, 64)


class _Boom:
    def __reduce__(self):
        return (exec, ("raise SystemExit('unpickled!')",))


def test_pickle_file_refused_never_unpickled(model, tmp_path):
    path = tmp_path / "pickled"
    path.mkdir()
    (path / CONFIG_NAME).write_text(json.dumps(good_adapter()[0]))
    (path / "adapter_model.bin").write_bytes(pickle.dumps(_Boom()))
    snap = snapshot(model)
    with pytest.raises(ValueError, match="refusing to load adapter_model.bin"):
        lorart.load_adapter(model, path, "new")
    assert_unchanged(model, snap)


def test_garbage_safetensors_and_missing_files(model, tmp_path):
    snap = snapshot(model)
    path = write(tmp_path / "garbage", good_adapter()[0], None)
    (path / WEIGHTS_NAME).write_bytes(b"\x00" * 40)
    with pytest.raises(ValueError, match="safetensors"):
        lorart.load_adapter(model, path, "new")
    with pytest.raises(FileNotFoundError):
        lorart.load_adapter(model, tmp_path / "nowhere", "new")
    no_cfg = tmp_path / "nocfg"
    no_cfg.mkdir()
    save_file(good_adapter()[1], str(no_cfg / WEIGHTS_NAME))
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        lorart.load_adapter(model, no_cfg, "new")
    assert_unchanged(model, snap)


def test_duplicate_name_and_bad_name(tmp_path):
    m = tiny_llama()
    path = write(tmp_path / "good", *good_adapter())
    lorart.load_adapter(m, path, "a")
    snap = snapshot(m)
    with pytest.raises(ValueError, match="already exists"):
        lorart.load_adapter(m, path, "a")
    for bad in ("", "a.b", "__base__"):
        with pytest.raises(ValueError, match="name"):
            lorart.load_adapter(m, path, bad)
    assert_unchanged(m, snap)
