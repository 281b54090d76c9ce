"""Tensor parallelism on ``torch.distributed`` (gloo on CPU, NCCL on GPU).

    torchrun --nproc-per-node 2 my_script.py            # or any dist.init_process_group
    import lorart, lorart.distributed as tp
    model = lorart.from_gguf()[0]  (or a transformers Llama, patched or not)
    tp.tensor_parallel(model)                           # every rank: its slice of each layer
    tp.load_adapter(model, "adapters/pirate", "pirate") # every rank reads only its slice
    model.generate(ids, adapter_names=["pirate", "__base__"])   # same tokens as one process

Files, one purpose each:

    shard.py        which slice of a weight / an adapter each rank holds (Megatron, S-LoRA)
    collectives.py  the autograd collectives (Megatron's f/g, LoRA all-gather/all-reduce)
    layers.py       ShardedLoRALinear: one rank's layer; what a forward communicates, and why
    model.py        tensor_parallel(model, group): checks everything, then shards
    adapter_io.py   load_adapter reading safetensors slices; save_adapter gathering them
    accounting.py   bytes communicated per layer per token (fully sharded vs replicated A)
    engine.py       the serving engine across ranks (rank 0 schedules, steps broadcast)
"""

from .accounting import comm_per_token
from .adapter_io import load_adapter, save_adapter
from .layers import ShardedLoRALinear
from .model import TensorParallelInfo, tensor_parallel, tp_info

__all__ = ["ShardedLoRALinear", "TensorParallelInfo", "comm_per_token", "load_adapter",
           "save_adapter", "tensor_parallel", "tp_info"]
