"""Bytes communicated per decoder layer per token under tensor parallelism, two LoRA layouts.

Printed from ``lorart.distributed.accounting`` (the same accounting the 2-process test
checks against the bytes ``ShardedLoRALinear``'s collectives actually sent): fully sharded
(S-LoRA; what lorart runs) vs replicated A (vLLM's default), at Llama-2-7B and Llama-2-70B
shapes, fp16 activations, one adapter of rank r on all seven projections. Bytes are what
one rank sends (ring all-reduce 2·(P−1)/P·n, all-gather (P−1)·piece); "adapter/rank" is the
adapter bytes each rank holds (and reads every decode step) for one layer.

    python benchmarks/tp_comm_table.py            # markdown table on stdout
"""

from __future__ import annotations

from lorart.distributed.accounting import LAYOUTS, comm_per_token, llama_shapes

MODELS = {  # hidden, intermediate, heads, KV heads
    "Llama-2-7B": (4096, 11008, 32, 32),
    "Llama-2-70B": (8192, 28672, 64, 8),
}


def rows(worlds=(2, 4, 8), ranks=(16, 64), dtype_bytes: int = 2):
    for model, dims in MODELS.items():
        shapes = llama_shapes(*dims)
        for world in worlds:
            if dims[3] % world:
                continue
            for r in ranks:
                layer = {layout: comm_per_token(shapes, r, world, layout, dtype_bytes)
                         for layout in LAYOUTS}
                yield model, world, r, layer


def main() -> None:
    print("| model | P | r | base all-reduces | LoRA, fully sharded | LoRA, replicated A | "
          "fully sharded / replicated A, total bytes | adapter/rank fully sharded | "
          "adapter/rank replicated A |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model, world, r, layer in rows():
        full, rep = layer["fully_sharded"], layer["replicated_a"]
        print(f"| {model} | {world} | {r} | {full.base_bytes:,.0f} B | {full.lora_bytes:,.0f} B "
              f"| {rep.lora_bytes:,.0f} B | {full.total_bytes / rep.total_bytes:.4f} | "
              f"{full.adapter_bytes_per_rank / 1024:,.0f} KiB | "
              f"{rep.adapter_bytes_per_rank / 1024:,.0f} KiB |")


if __name__ == "__main__":
    main()
