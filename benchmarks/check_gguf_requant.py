"""Real K-quant GGUF files: SmolLM2 requantized by llama.cpp, loaded by lorart and transformers.

The shipped SmolLM2 GGUF is Q4_1 (plus a Q8_0 embedding). The files people download are
mostly Q4_K_M, Q5_K_M and Q8_0, so this script makes them with llama.cpp's own quantizer
(``llama_cpp.llama_model_quantize``, ``allow_requantize``: requantized from Q4_1, so the
*weights* are a little worse than a file quantized from bf16, but the *file format* is
exactly what llama.cpp writes), then for each file:

- lists its tensor types (Q4_K_M mixes Q4_K, Q5_0, Q6_K, Q8_0 with 576-wide rows);
- loads it with ``lorart.from_gguf`` and with transformers' GGUF loader (which dequantizes
  every tensor to float32), and compares next-token logits on two chat prompts
  (max |diff| / max |logit|, against the test suite's float32 tolerance x10, the bound
  ``tests/test_smollm2.py`` uses for the Q4_1 file) and their argmax;
- checks the tensors stay quantized in lorart: linear layers and embedding held packed,
  whole-model bytes against the file size;
- generates 8 greedy tokens with each and says whether they agree;
- with ``--decode-tokens N``: lorart's batch-1 greedy decode tok/s (median of 3 runs,
  one process, files one after another: compare them as ratios, on a quiet machine).

Not a test (it needs llama-cpp-python and writes ~100 MB a file); results go to
benchmarks/RESULTS.md by hand.

    PYTHONPATH=/tmp/decode_llamacpp LLAMA_CPP_LIB_PATH=/tmp/decode_llamacpp/lib \\
        python benchmarks/check_gguf_requant.py [--types Q4_K_M Q5_K_M Q8_0] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import lorart
from lorart import LoRALinear
from lorart.bench.tolerance import TOLERANCE
from lorart.model_io import model_nbytes
from lorart.models import default_gguf_path
from lorart.quant import QuantizedWeight

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gguf_model import decode_tok_s  # noqa: E402

PROMPTS = ["What is the capital of France?", "Write a haiku about rain."]
LOGIT_FACTOR = 10  # as tests/test_smollm2.py: 30 layers of float32, another op order


def requantize(src: Path, dst: Path, ftype_name: str) -> float:
    """Write ``dst`` = ``src`` requantized to ``LLAMA_FTYPE_MOSTLY_<ftype_name>``; seconds."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype_name}")
    params.allow_requantize = True
    params.nthread = 2
    t0 = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({ftype_name}) returned {rc}")
    return time.perf_counter() - t0


def tensor_types(path: Path) -> dict[str, int]:
    """``{GGML type name: tensor count}`` of a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return dict(collections.Counter(t.tensor_type.name for t in reader.tensors))


def packed_summary(model) -> dict:
    """How the lorart model holds its weights: packed linear layers by scheme, dense ones."""
    schemes = collections.Counter()
    dense = 0
    for module in model.modules():
        if isinstance(module, LoRALinear):
            if module.is_quantized:
                schemes[f"{module.scheme}-g{module.group_size}"] += 1
            else:
                dense += 1
    emb = model.model.embed_tokens
    emb_kind = (f"{emb.scheme}-g{emb.group_size}" if isinstance(getattr(emb, "base", None),
                                                                 QuantizedWeight) else "float")
    return {"linear_packed": dict(schemes), "linear_dense": dense, "embedding": emb_kind,
            "lm_head": type(model.lm_head).__name__}


def chat_batch(tok):
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                     add_generation_prompt=True) for p in PROMPTS]
    tok.padding_side = "left"
    return tok(texts, return_tensors="pt", padding=True)


def greedy(model, tok, batch, tokens: int) -> list[list[int]]:
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    return out[:, batch["input_ids"].shape[1]:].tolist()


def decode_rate(model, tok, tokens: int, runs: int = 3) -> float:
    """Median batch-1 greedy tok/s of ``model`` on one chat prompt (after a warm-up)."""
    ids = tok.apply_chat_template([{"role": "user", "content": "Tell me about Paris."}],
                                  add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    decode_tok_s(model, ids, 4)
    return statistics.median(decode_tok_s(model, ids, tokens) for _ in range(runs))


def check_file(path: Path, tokens: int, decode_tokens: int = 0) -> dict:
    from transformers import AutoModelForCausalLM

    row: dict = {"file": path.name, "file_mb": round(path.stat().st_size / 1e6, 1),
                 "tensor_types": tensor_types(path)}
    t0 = time.perf_counter()
    ours, tok = lorart.from_gguf(path)
    row["lorart_load_s"] = round(time.perf_counter() - t0, 1)
    row["lorart_mb"] = round(model_nbytes(ours) / 1e6, 1)
    row["bytes_vs_file"] = round(model_nbytes(ours) / path.stat().st_size, 3)
    row |= packed_summary(ours)
    if decode_tokens:
        try:
            row["lorart_decode_tok_s"] = round(decode_rate(ours, tok, decode_tokens), 2)
        except Exception as exc:  # report it, keep checking the file
            row["lorart_decode_error"] = f"{type(exc).__name__}: {exc}"[:300]
    batch = chat_batch(tok)
    with torch.no_grad():
        mine = ours(**batch).logits[:, -1]
    mine_tokens = greedy(ours, tok, batch, tokens)
    row["lorart_text"] = [tok.decode(t, skip_special_tokens=True) for t in mine_tokens]
    try:
        t0 = time.perf_counter()
        theirs = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
        theirs.eval()
        row["transformers_load_s"] = round(time.perf_counter() - t0, 1)
    except Exception as exc:  # say what transformers said, keep lorart's results
        row["transformers_error"] = f"{type(exc).__name__}: {exc}"[:400]
        return row
    with torch.no_grad():
        ref = theirs(**batch).logits[:, -1]
    scale = ref.abs().max()
    row["logits_rel_err"] = float((mine - ref).abs().max() / scale)
    row["logits_tol"] = TOLERANCE[torch.float32] * LOGIT_FACTOR
    row["logits_ok"] = row["logits_rel_err"] <= row["logits_tol"]
    row["argmax_equal"] = bool(torch.equal(mine.argmax(-1), ref.argmax(-1)))
    theirs_tokens = greedy(theirs, tok, batch, tokens)
    row["greedy_equal"] = mine_tokens == theirs_tokens
    row["transformers_mb"] = round(model_nbytes(theirs) / 1e6, 1)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--types", nargs="+", default=["Q4_K_M", "Q5_K_M", "Q8_0"])
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="where the requantized files go (default: a temporary dir)")
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--keep", action="store_true", help="keep the requantized files")
    parser.add_argument("--decode-tokens", type=int, default=0,
                        help="also time lorart's batch-1 greedy decode over this many tokens")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    src = default_gguf_path()
    tmp = None
    out_dir = args.out_dir
    if out_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="lorart-requant-")
        out_dir = Path(tmp.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    import llama_cpp
    import transformers

    print(json.dumps({"context": {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": transformers.__version__, "llama_cpp": llama_cpp.__version__,
        "source": src.name}}), flush=True)
    files = [src]
    for name in args.types:
        dst = out_dir / f"{src.stem.rsplit('.', 1)[0]}.{name}.gguf"
        seconds = requantize(src, dst, name)
        print(f"# requantized to {name} in {seconds:.1f} s: {dst}", flush=True)
        files.append(dst)
    for path in files:
        print(json.dumps(check_file(path, args.tokens, args.decode_tokens)), flush=True)
    if tmp is not None and not args.keep:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
