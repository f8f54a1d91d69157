"""Data parallel over calibration windows with torch.distributed, launched by torchrun:

    torchrun --nproc-per-node N -m prunelab run ...        (NCCL on GPUs, gloo on CPU)

Every process loads the model and draws the same windows (same seed); each keeps a contiguous share
of them (`share`). Pruning statistics (Wanda's norms, SparseGPT's Hessians) are sums over tokens, so
each process accumulates its share and the sums are added across processes (`all_sum`) before the
criterion runs: every process then prunes the same weights the same way. Perplexity sums the negative
log-likelihoods of each process's evaluation windows the same way. Reconstruction draws one order of
all windows; each optimiser step takes the next `batch_size` of them, each process computes the loss
(summed over tokens, divided by the step's tokens over all processes) on those it holds, and the
gradients are summed: every process takes the same step as one process holding every window would,
to floating-point summation order. Held-out losses are sums too. Process 0 writes the output.

In one process (no torchrun) every function here is the identity.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import PrunelabError

WAIT = timedelta(hours=6)


def size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if size() > 1 else 0


def is_main() -> bool:
    return rank() == 0


def start(device: torch.device) -> None:
    """Join the process group torchrun describes in the environment (once); nothing without torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    if not dist.is_available():
        raise PrunelabError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(_own_gpu(device))
    # the others wait while process 0 alone writes the output or runs the zero-shot tasks: for a large
    # model that takes far longer than the default timeout (NCCL: 10 minutes)
    dist.init_process_group(backend=backend, timeout=WAIT)


def _own_gpu(device: torch.device) -> int:
    """This process's GPU: NCCL needs one GPU per process on a node, so a shared or missing one is refused
    here, in one line, rather than deep inside the first collective."""
    local, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    per_node = os.environ.get("LOCAL_WORLD_SIZE", "?")
    if device.index is not None:
        raise PrunelabError(f"--device {device} under torchrun would put all {per_node} processes of a node on "
                            f"one GPU; use --device cuda (each process takes cuda:LOCAL_RANK) or --device cpu")
    if local >= count:
        raise PrunelabError(f"torchrun started {per_node} processes on this node but it has {count} CUDA "
                            f"device(s): use --nproc-per-node {count} or fewer, or --device cpu (gloo)")
    return local


def device_for(device: torch.device) -> torch.device:
    """Each process's own GPU (cuda → cuda:LOCAL_RANK) under torchrun."""
    if device.type == "cuda" and device.index is None and size() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def check_same_config(values: dict) -> None:
    """Every process must run the same job: the config's hash is compared across processes."""
    if size() == 1:
        return
    digest = hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()
    digests: list = [None] * size()
    dist.all_gather_object(digests, digest)
    differing = [r for r, d in enumerate(digests) if d != digests[0]]
    if differing:
        raise PrunelabError(f"process {differing[0]} was started with a different config than process 0 "
                            "(every torchrun process must get the same command)")


def share(windows: int, what: str) -> slice:
    """This process's contiguous share of `windows` windows (the first processes take one more)."""
    count = size()
    if count > windows:
        raise PrunelabError(f"{count} processes but only {windows} {what} windows: each process needs at least one "
                            "(use more windows or fewer processes)")
    base, extra = divmod(windows, count)
    start = rank() * base + min(rank(), extra)
    return slice(start, start + base + (rank() < extra))


def from_main(value):
    """Process 0's `value`, in every process (any picklable value)."""
    if size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gathered(value) -> list:
    """Every process's `value` (any picklable value), in rank order, in every process."""
    if size() == 1:
        return [value]
    values = [None] * size()
    dist.all_gather_object(values, value)
    return values


def barrier() -> None:
    if size() > 1:
        dist.barrier()


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over processes, in place (a CPU tensor goes through the GPU under NCCL)."""
    if size() == 1:
        return tensor
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        tensor.copy_(all_sum(tensor.to(torch.device("cuda", torch.cuda.current_device()))))
    else:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_sum_float(value: float) -> float:
    if size() == 1:
        return value
    return float(all_sum(torch.tensor([value], dtype=torch.float64)).item())


def layout(local: int) -> tuple[int, int]:
    """(the index of this process's first window among all processes' windows, how many there are in all)."""
    if size() == 1:
        return 0, local
    counts: list = [None] * size()
    dist.all_gather_object(counts, local)
    return sum(counts[:rank()]), sum(counts)


def all_sum_grads(params: list[torch.nn.Parameter]) -> None:
    """Every process's gradients summed in place, one parameter at a time (no second copy of a whole model's
    gradients). A process without windows in the step, or whose windows reached none of a routed expert's
    tokens, takes part with zeros; a parameter that no process has a gradient for keeps none, so that AdamW
    skips it as it does in one process (a zero gradient would still move it: momentum and weight decay)."""
    if size() == 1:
        return
    holders = all_sum(torch.tensor([float(p.grad is not None) for p in params]))
    for p, held in zip(params, holders.tolist()):
        if held:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            all_sum(p.grad)
