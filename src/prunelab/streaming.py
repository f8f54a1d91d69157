"""Models larger than memory: the model is built on the meta device, and its weights are read from the
safetensors shards when they are needed — a decoder block while it is pruned or evaluated, the modules
around the blocks (embeddings, final norm, LM head) while windows are embedded or scored — and dropped
again afterwards. The pruned blocks are written into the output's shards as they finish, so neither
the input nor the output model is ever whole in memory:

    skeleton = the model on the meta device (accelerate's init_empty_weights; buffers such as rotary
               frequencies are real, they are computed, not stored)
    for each block: materialise it from the input shards → prune it → write it as shard i → drop it
    the tensors outside the blocks are copied unchanged into the last shard; the index names every tensor

This is also sequential onloading: on a GPU (`--device cuda`) only the parts in use are on the device,
the rest stays on disk (and in the OS's file cache). Weights stay in the checkpoint's own dtype on disk;
what is in use is cast to the run's model dtype (float32 by default; what the model's class keeps in float32,
a router, stays float32 as `from_pretrained` keeps it). Zeroing a weight is exact in any
dtype; SparseGPT's and reconstruction's updated weights are rounded to the checkpoint's dtype when
written, as a loaded and saved model's would be.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path

import torch
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from .activations import (
    BlockStream,
    StandIn,
    as_block_returns,
    capture_block_inputs,
    check_finite,
    check_halves,
    probe_ids,
)
from .distributed import all_sum_float, is_main
from .errors import PrunelabError, PrunelabWarning
from .evaluate.perplexity import summed_nll
from .evaluate.sparsity import count_zeros
from .models.adapters import Adapter, find_adapter, first_output, tied_head
from .models.conv1d import held_weights
from .models.layout import (
    adopt_conversions,
    renamed_keys,
    saved_keys,
    stored_names,
    to_held_by_expert,
    to_stored,
    to_stored_by_expert,
)
from .models.loading import check_fits, empty_model, float_dtype_of, headers, held_dtypes

INDEX = "model.safetensors.index.json"


class Checkpoint:
    """Tensor names → the safetensors file holding each, in a (sharded or single-file) checkpoint folder; `key(name)`
    is what a tensor is stored (and written) under."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        if (self.folder / INDEX).is_file():
            weight_map = json.loads((self.folder / INDEX).read_text())["weight_map"]
            files = {name: self.folder / file for name, file in weight_map.items()}
        elif (self.folder / "model.safetensors").is_file():
            with safe_open(str(self.folder / "model.safetensors"), framework="pt") as f:
                files = {name: self.folder / "model.safetensors" for name in f.keys()}
        else:
            raise PrunelabError(f"{self.folder} has no model.safetensors or {INDEX}: a model larger than memory is "
                                "read from safetensors files")
        self.stored_files = files
        self.rename({})

    def rename(self, renamed: dict[str, str], saved: dict[str, str] | None = None) -> None:
        """Show the keys that `from_pretrained` renames ({checkpoint key: the model's name}, `layout.renamed_keys`)
        under the model's names; `saved`: {name: the key `save_pretrained` writes it under} where that is not the
        key it was read from (a prefix taken off on loading is not put back)."""
        self.renamed, self.saved = renamed, saved or {}
        self.keys = {renamed.get(key, key): key for key in self.stored_files}
        self.files = {renamed.get(key, key): file for key, file in self.stored_files.items()}

    def key(self, name: str) -> str:
        return self.keys.get(name, name)

    def saved_key(self, name: str) -> str:
        return self.saved.get(name, self.key(name))

    def drop(self, names: list[str]) -> None:
        """Leave tensors out, as if they were not stored."""
        for name in names:
            del self.keys[name], self.files[name]

    def tensors(self, names: list[str]):
        """(name, tensor) of `names`, one tensor in memory at a time if the caller lets each go, each file
        opened once."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        for file, in_file in by_file.items():
            with safe_open(str(file), framework="pt") as f:
                for name in in_file:
                    yield name, f.get_tensor(self.key(name))

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        return dict(self.tensors(names))

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape by name, from the files' headers (nothing is read)."""
        return {self.renamed.get(key, key): shape for file in set(self.files.values())
                for key, (shape, _) in headers(file).items()}

    def dtypes(self) -> dict[str, torch.dtype]:
        """Every tensor's stored dtype by name, from the files' headers (nothing is read)."""
        return {self.renamed.get(key, key): dtype for file in set(self.files.values())
                for key, (_, dtype) in headers(file).items()}

    def nbytes(self, dtype: torch.dtype | None = None) -> dict[str, int]:
        """Bytes of every tensor by name, in their stored dtype or in `dtype` (floating tensors only)."""
        sizes = {k: v for file in set(self.files.values()) for k, v in _file_sizes(file, dtype).items()}
        return {self.renamed.get(k, k): v for k, v in sizes.items()}

    @cached_property
    def dtype(self) -> torch.dtype:
        """The float dtype most of the weights are stored in (every shard's header read once)."""
        return float_dtype_of(set(self.files.values())) or torch.float32


def _file_sizes(file: Path, dtype: torch.dtype | None = None) -> dict[str, int]:
    """Bytes of every tensor in one safetensors file, from its header: stored, or in `dtype` if floating."""
    sizes = {}
    for key, (shape, stored) in headers(file).items():
        as_dtype = dtype if dtype is not None and stored.is_floating_point else stored
        sizes[key] = math.prod(shape) * torch.empty((), dtype=as_dtype).element_size()
    return sizes


class StreamedModel:
    """A causal LM whose weights stay in `folder`'s safetensors files until a part of it is used."""

    def __init__(self, folder: Path, compute_dtype: torch.dtype, device: torch.device = torch.device("cpu")):
        self.source = Checkpoint(folder)
        self.compute_dtype, self.device = compute_dtype, device
        self.saved_dtype = self.source.dtype  # of the blocks written; the job may ask for another
        self.returns_tuple = False  # whether its blocks return a tuple, seen whenever they run (`_through_blocks`)
        self.model = empty_model(folder)
        self.transposed = held_weights(self.model)  # stored [in, out], held [out, in] (GPT-2's Conv1D)
        self.model.eval()
        self.model.config.use_cache = False
        for name, buffer in list(self.model.named_buffers()):  # computed ones (rotary frequencies), not stored
            set_module_tensor_to_device(self.model, name, device, value=buffer)
        adopt_conversions(self.model, list(self.source.files))  # as from_pretrained leaves them on a loaded model
        renamed = renamed_keys(self.model, list(self.source.files))
        self.source.rename(renamed, saved_keys(self.model, renamed))
        self.tied = self._tie()
        self.held = held_dtypes(self.model, compute_dtype)  # float32 for what the class keeps so (routers)
        self.adapter: Adapter = find_adapter(self.model)
        self.prefix = self.adapter.blocks_prefix
        held = {f"{self.prefix}.{i}.{k}": v for i, block in enumerate(self.adapter.blocks)
                for k, v in block.state_dict().items()}
        # the tensors the checkpoint stores in another layout (routed experts: a matrix per expert and projection),
        # by the model's name: the keys converted together into it when a block is read
        self.stored = {name: keys for name, keys in stored_names(self.model, held).items()
                       if keys != [name] and name not in self.source.files}  # (not a renamed one the source shows)
        self._ignore_unexpected(folder)
        self.block_names = [self._names(f"{self.prefix}.{i}.") for i in range(len(self.adapter.blocks))]
        in_blocks = {n for names in self.block_names for n in names}
        self.outer_names = [n for n in self.source.files if n not in in_blocks]
        head = self.model.get_output_embeddings()
        shared = {f"{n}.weight" for n, m in self.model.named_modules() if m is head} if self.tied else set()
        outer = set(self.model.state_dict()) - set(held) - shared  # a tied head is stored once, as the embedding
        missing = sorted({key for name in held for key in self.stored.get(name, [name])} - in_blocks) + sorted(
            outer - set(self.outer_names))
        if missing:
            raise PrunelabError(f"{folder}: the checkpoint's tensor names do not follow the model's module tree "
                                f"(no {missing[0]}); streaming needs a standard Hugging Face checkpoint")
        self._check_shapes(folder)

    def _ignore_unexpected(self, folder: Path) -> None:
        """Leave out, as `from_pretrained` does, stored tensors the model has no place for (an older checkpoint's
        rotary `inv_freq` or GPT-2's attention mask buffers), with a warning rather than a crash when read."""
        known = set(self.model.state_dict()) | {key for keys in self.stored.values() for key in keys}
        unexpected = [name for name in self.source.files if name not in known]
        if unexpected:
            message = (f"{folder}: {len(unexpected)} stored tensor(s) the model has no place for are ignored, as "
                       f"transformers ignores them (the first: {unexpected[0]})")
            warnings.warn(PrunelabWarning(message), stacklevel=2)
            self.source.drop(unexpected)

    def _check_shapes(self, folder: Path) -> None:
        """Refuse a checkpoint whose tensors do not have the shapes its config builds now, from the headers, not
        when the block holding one comes to be read."""
        stored = self.source.shapes()
        for name, tensor in self.model.state_dict().items():
            if name in stored:
                built = tuple(tensor.shape)[::-1] if name in self.transposed else tuple(tensor.shape)
                if stored[name] != built:
                    raise PrunelabError(f"{folder}: {self.source.key(name)} is stored with shape {list(stored[name])}, "
                                        f"but its config.json builds {list(built)}")

    def _tie(self) -> bool:
        """Tie the LM head to the input embedding as `from_pretrained` does (not done under init_empty_weights):
        where the config says so, unless the checkpoint stores both with different values, which transformers
        then keeps apart (with a warning)."""
        model, text = self.model, self.model.config.get_text_config()
        embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
        if head is not None and getattr(text, "tie_word_embeddings", False):
            names = [next(f"{n}.weight" for n, m in model.named_modules() if m is x) for x in (embedding, head)]
            if all(n in self.source.files for n in names) and not torch.equal(*self.source.read(names).values()):
                text.tie_word_embeddings = False  # for every later tie_weights() too, and in the saved config
        model.tie_weights()
        return tied_head(model)

    def keys_of(self, names: list[str], saved: bool = False) -> dict[str, list[str]]:
        """The checkpoint keys each named tensor is stored under (more than one: routed experts); `saved`: in the
        output written from it."""
        key = self.source.saved_key if saved else self.source.key
        return {name: self.stored.get(name, [key(name)]) for name in names}

    def checkpoint(self, folder: Path) -> Checkpoint:
        """The checkpoint in `folder` (the input, or an output written from it) with its tensors under the model's
        names where `from_pretrained` renames them."""
        checkpoint = Checkpoint(folder)
        checkpoint.rename(renamed_keys(self.model, list(checkpoint.files)))
        return checkpoint

    def _names(self, prefix: str) -> list[str]:
        """The stored tensors of the block at `prefix`: by its name, and the keys converted into its tensors, which
        may lie under another prefix (a multimodal Qwen 3.5-MoE's experts, `model.language_model.layers.N`)."""
        names = [n for n in self.source.files if n.startswith(prefix)]
        converted = {key for name, keys in self.stored.items() if name.startswith(prefix) for key in keys}
        return names + sorted(converted.intersection(self.source.files) - set(names))

    # --- parts in and out of memory ---------------------------------------------------------------
    def load_block(self, index: int, checkpoint: Checkpoint | None = None) -> nn.Module:
        """Block `index` with its weights from `checkpoint` (default: the input), in the compute dtype."""
        block = self.adapter.blocks[index]
        prefix = f"{self.prefix}.{index}."
        # the output of a streamed FLAP run has biases its input had not
        names = self.block_names[index] if checkpoint is None else [n for n in checkpoint.files if n.startswith(prefix)]
        source = checkpoint or self.source
        converted = {name: keys for name, keys in self.stored.items() if name.startswith(prefix)}
        in_conversions = {key for keys in converted.values() for key in keys}
        # one tensor at a time: a whole block in both dtypes would take 1.5× one block
        for name, tensor in source.tensors([n for n in names if n not in in_conversions]):
            tensor = tensor.t() if name in self.transposed else tensor  # held as `conv1d.hold` holds it: a view
            set_module_tensor_to_device(block, name[len(prefix):], self.device, value=tensor, dtype=self.held(name))
        for name, keys in converted.items():
            local = name[len(prefix):]
            held = self._converted(block.get_parameter(local).shape, name, keys, source)
            set_module_tensor_to_device(block, local, self.device, value=held, dtype=self.compute_dtype)
        return block

    def _converted(self, shape: torch.Size, name: str, keys: list[str], source: Checkpoint) -> torch.Tensor:
        """The held tensor `name` in the compute dtype, filled one expert at a time from its keys: converted all
        at once, a block's experts would be in memory as read, as stacked and as cast at the same time."""
        held = torch.empty(shape, dtype=self.compute_dtype, device=self.device)
        rows = 0
        for part in to_held_by_expert(self.model, name, keys, source.read, shape[0]):
            held[rows:rows + len(part)] = part
            rows += len(part)
        if rows != shape[0]:  # the conversion did not stack along the first dimension
            raise PrunelabError(f"{name}: {rows} rows from the checkpoint's {len(keys)} tensors, the model holds "
                                f"{shape[0]}")
        return held

    def check_adapter(self, *checks: Callable[[Adapter, BlockStream], None]) -> None:
        """`activations.checked_adapter` for the skeleton: block 0 read, run whole and as halves, and through
        `checks` (a method's own: `structured.check_width`), let go."""
        with self.outer("input") as model:
            stream = capture_block_inputs(model, self.adapter.blocks, probe_ids(model), None, 1, self.compute_dtype)
        try:
            self.load_block(0)
            check_halves(self.adapter, 0, stream)
            for check in checks:
                check(self.adapter, stream)
        finally:
            self.drop_block(0)

    def drop_block(self, index: int) -> None:
        block = self.adapter.blocks[index]
        for name, _ in list(block.named_parameters()):
            set_module_tensor_to_device(block, name, "meta")

    @contextmanager
    def outer(self, side: str):
        """The modules around the blocks, in memory for the duration: `input` all but the LM head, for
        embedding windows; `output` all but the input embedding, for scoring them (its forward is then given
        `inputs_embeds`). A tied embedding is both.

        The vocabulary matrices stay in the checkpoint's dtype (an 8B Llama's embedding and head take
        2.1 GB each in float32): an embedding lookup is exact in any dtype and its output is cast to the
        compute dtype (so that what follows, rotary tables included, is computed as in a loaded model);
        the head computes in the compute dtype a slice of the vocabulary at a time. The rest is cast."""
        model = self.model
        embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
        skip = head if side == "input" else embedding
        names = {id(m): {f"{n}.weight" for n, x in model.named_modules() if x is m} for m in (embedding, head)
                 if m is not None}
        skipped = set() if self.tied or skip is None else names[id(skip)]
        vocabulary = set().union(*names.values())
        for name, tensor in self.source.read([n for n in self.outer_names if n not in skipped]).items():
            dtype = tensor.dtype if name in vocabulary else self.held(name)
            set_module_tensor_to_device(model, name, self.device, value=tensor, dtype=dtype)
        model.tie_weights()
        cast = embedding.register_forward_hook(lambda module, args, out: out.to(self.compute_dtype))
        sliced = isinstance(head, nn.Linear) and head.weight.device.type != "meta"
        if sliced:
            head.forward = self._sliced_head(head)
        try:
            yield model
        finally:
            cast.remove()
            if sliced:
                del head.forward
            for name, param in list(model.named_parameters(remove_duplicate=False)):  # both names of a tied one
                if not name.startswith(self.prefix + ".") and param.device.type != "meta":
                    set_module_tensor_to_device(model, name, "meta")
            model.tie_weights()  # the skeleton stays what it was: one tensor under both names

    def _sliced_head(self, head: nn.Linear, rows: int = 16384):
        def forward(x: torch.Tensor) -> torch.Tensor:
            x = x.to(self.compute_dtype)
            bias = head.bias.to(self.compute_dtype) if head.bias is not None else None
            return torch.cat([nn.functional.linear(x, head.weight[start:start + rows].to(self.compute_dtype),
                                                   None if bias is None else bias[start:start + rows])
                              for start in range(0, head.out_features, rows)], dim=-1)
        return forward

    @property
    def saved_dtypes(self) -> Callable[[str], torch.dtype]:
        """The dtype each tensor is written in, by name: the saved dtype, or float32 for what the class keeps so."""
        return held_dtypes(self.model, self.saved_dtype)

    def block_state(self, index: int) -> dict[str, torch.Tensor]:
        """Block `index`'s tensors by checkpoint key, in the checkpoint's layout and the saved dtype: a converted
        tensor one at a time, so that a block's experts are never in both layouts at once."""
        dtypes = self.saved_dtypes

        def stored(name: str, tensor: torch.Tensor, copy: bool = False) -> torch.Tensor:
            check_fits(name, tensor, dtypes(name))
            dtype = dtypes(name) if tensor.is_floating_point() else tensor.dtype
            return tensor.to("cpu", dtype, copy=copy).contiguous()

        state, converted = {}, {}  # converted: the held tensors by the checkpoint keys they are stored under
        for key, value in self.adapter.blocks[index].state_dict().items():
            name = f"{self.prefix}.{index}.{key}"
            if name in self.stored:
                converted.setdefault(tuple(self.stored[name]), {})[name] = value
            else:
                state[name] = stored(name, value.t() if name in self.transposed else value)
        for keys, tensors in converted.items():
            if len(tensors) > 1:  # several held tensors stored as one (Param2MoE's q, k and v as query_key_value)
                state.update({k: stored(k, v) for k, v in to_stored(self.model, tensors).items()})
                continue
            (name, value), = tensors.items()
            for pieces in to_stored_by_expert(self.model, name, value, list(keys)):  # each piece copied:
                state.update({k: stored(k, v, copy=True) for k, v in pieces.items()})  # safetensors shares no memory
        return state


class ShardWriter:
    """Writes a sharded Hugging Face checkpoint one block at a time: shard i+1 holds block i, the shards
    after the blocks the tensors outside them, copied from the input by `finish`, which also writes the index.

    A tensor outside the blocks that is larger than a block (a vocabulary matrix: 1 GB in an 8B Llama) gets
    a shard of its own and the small ones join the last of them, so that no more than one such tensor is
    in memory at a time."""

    def __init__(self, folder: Path, streamed: StreamedModel):
        self.folder, self.source, self.dtype = Path(folder), streamed.source, streamed.saved_dtype
        self.dtypes = streamed.saved_dtypes
        sizes = self.source.nbytes()
        block_bytes = largest_block(sizes)
        large = [[name] for name in streamed.outer_names if sizes[name] > block_bytes]
        small = [name for name in streamed.outer_names if sizes[name] <= block_bytes]
        self.outer = large or [[]]
        self.outer[-1].extend(small)
        self.count = len(streamed.block_names) + len(self.outer)
        self.weight_map: dict[str, str] = {}
        self.total = 0
        self.replaced: dict[str, torch.Tensor] = {}  # tensors outside the blocks written changed

    @property
    def recasts(self) -> bool:
        """Whether a float tensor outside the blocks is written in another dtype than the input stores it in (then
        rounded), known on every process from the input's headers alone."""
        stored = self.source.dtypes()
        return any(stored[n].is_floating_point and stored[n] != self.dtypes(n) for names in self.outer for n in names)

    def renumber(self, blocks: int) -> None:
        """Before the first write: the output has `blocks` blocks (layer removal)."""
        self.count = blocks + len(self.outer)

    def replace(self, tensors: dict[str, torch.Tensor]) -> None:
        """Write these instead of the input's tensors of the same names outside the blocks."""
        self.replaced.update(tensors)

    def _name(self, number: int) -> str:
        return f"model-{number + 1:05d}-of-{self.count:05d}.safetensors"

    def write(self, number: int, tensors: dict[str, torch.Tensor]) -> None:
        """Shard `number`: `tensors` by the model's names (or checkpoint keys), saved under the keys
        `save_pretrained` writes (the input's, but for a prefix its loading took off)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tensors = {self.source.saved_key(name): tensor for name, tensor in tensors.items()}
        save_file(tensors, self.folder / self._name(number), metadata={"format": "pt"})
        self._add(number, {k: t.numel() * t.element_size() for k, t in tensors.items()})

    def _add(self, number: int, sizes: dict[str, int]) -> None:
        self.weight_map.update(dict.fromkeys(sizes, self._name(number)))
        self.total += sum(sizes.values())

    def adopt(self, numbers: list[int]) -> None:
        """Count the shards of blocks `numbers` as written: a resumed run finds them where it left them."""
        for number in numbers:
            path = self.folder / self._name(number)
            if not path.is_file():
                raise PrunelabError(f"--resume: {path} is missing from the checkpoint; pass --overwrite to start over")
            self._add(number, _file_sizes(path))

    def move(self, folder: Path) -> None:
        """Put the shards written so far into `folder` as well and write there from now on. Hard links where
        the file system has them: the checkpoint keeps its own until the run has succeeded."""
        folder = Path(folder)
        if folder == self.folder:
            return
        for name in set(self.weight_map.values()):
            try:
                os.link(self.folder / name, folder / name)
            except OSError:
                shutil.copyfile(self.folder / name, folder / name)
        self.folder = folder

    def finish(self) -> None:
        for number, names in enumerate(self.outer, start=self.count - len(self.outer)):
            tensors = self.source.read([n for n in names if n not in self.replaced])  # unchanged
            tensors.update({n: self.replaced.pop(n) for n in names if n in self.replaced})
            for n, t in tensors.items():  # saved in the dtypes a model loaded whole is saved in
                if t.is_floating_point() and t.dtype != self.dtypes(n):
                    check_fits(n, t, self.dtypes(n))
                    tensors[n] = t.to(self.dtypes(n))
            self.write(number, tensors)
            del tensors  # a vocabulary matrix: 1 GB at 8B
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2))


class _Replay(StandIn):
    """In the model's own forward pass, a block that was already run: its input passes through, except
    at the last block, which returns the stored output of the whole stack for the current batch."""

    def __init__(self, block: nn.Module, last: bool, returns_tuple: bool):
        super().__init__(block)
        self.last, self.returns_tuple, self.output = last, returns_tuple, None

    def forward(self, hidden_states, *args, **kwargs):
        return as_block_returns(self.output if self.last else hidden_states, self.returns_tuple)


class StreamedPruning:
    """The pruning pass's view of a streamed model (see `prune_model`'s `visits`): block i is read from
    the input before it is pruned and written into the output's shard i afterwards."""

    def __init__(self, streamed: StreamedModel, writer: ShardWriter):
        self.streamed, self.writer = streamed, writer
        self.zeros_before: dict[str, int] = {}
        self.inside: set[int] = set()  # blocks in memory
        self.written: list[int] = []

    def state(self) -> dict:
        """What a checkpoint needs to resume (JSON); taken only while no block is in memory, so that every
        changed weight is in a written shard."""
        assert not self.inside, "a streamed checkpoint is taken between blocks"
        return {"zeros_before": self.zeros_before, "written": self.written}

    def resume(self, state: dict) -> None:
        self.zeros_before, self.written = state["zeros_before"], state["written"]
        self.writer.adopt(self.written)

    def embedding(self):
        return self.streamed.outer("input")

    def enter(self, index: int) -> None:
        self.inside.add(index)
        self.streamed.load_block(index)
        prefix = f"{self.streamed.prefix}.{index}."
        # by the model's names, fused experts whole, as a model in memory counts them
        self.zeros_before.update(count_zeros({n: w for n, w in self.streamed.adapter.prunable_weights().items()
                                              if n.startswith(prefix)}))

    def leave(self, index: int) -> None:
        if is_main():  # data parallel: every process holds the same weights, process 0 writes them
            self.writer.write(index, self.streamed.block_state(index))
        self.streamed.drop_block(index)
        self.inside.discard(index)
        self.written.append(index)


@torch.no_grad()
def streamed_perplexity(streamed: StreamedModel, windows: torch.Tensor, batch_size: int,
                        checkpoint: Checkpoint | None = None, progress: bool = True, desc: str = "perplexity") -> dict:
    """`evaluate.perplexity` for a streamed model: all windows through one block at a time (blocks read
    from `checkpoint`, default the input), then the model's own head (final norm, LM head, any logit
    soft-capping) on the last block's outputs."""
    with streamed.outer("input") as model:
        stream = capture_block_inputs(model, streamed.adapter.blocks, windows, None, batch_size,
                                      streamed.compute_dtype)
    _through_blocks(streamed, [stream], checkpoint, progress, desc)
    nll, predicted = 0.0, 0
    with _head(streamed) as logits_of:
        for w in range(windows.shape[0]):  # one window's logits at a time: a large vocabulary's are big
            logits = logits_of(stream.hidden[w:w + 1])
            nll += summed_nll(logits, windows[w:w + 1].to(logits.device)).item()
            predicted += windows[w:w + 1, 1:].numel()
    nll, predicted = all_sum_float(nll), int(all_sum_float(predicted))  # data parallel: every process's windows
    mean_nll = nll / predicted
    return {"perplexity": math.exp(mean_nll), "nll": mean_nll, "predicted_tokens": predicted, "streamed": True}


@torch.no_grad()
def streamed_loglikelihoods(streamed: StreamedModel, inputs: list[list[int]], targets: list[list[int]],
                            batch_size: int, progress: bool = True, positions: int = 128) -> list[tuple[float, bool]]:
    """For each token sequence of `inputs`, log p(targets) where the targets are the tokens its last
    len(targets) positions predict, and whether each is the most likely token (lm-eval's (logprob,
    is_greedy)). Batches are right-padded, which a causal model never attends to, and all of them go
    through one block at a time; only the scored positions reach the head."""
    batches = [list(range(start, min(start + batch_size, len(inputs)))) for start in range(0, len(inputs), batch_size)]
    with streamed.outer("input") as model:
        streams = []
        for rows in batches:
            length = max(len(inputs[r]) for r in rows)
            ids = torch.tensor([inputs[r] + [0] * (length - len(inputs[r])) for r in rows])
            streams.append(capture_block_inputs(model, streamed.adapter.blocks, ids, None, len(rows),
                                                streamed.compute_dtype))
    _through_blocks(streamed, streams, None, progress, "log-likelihoods")
    scores = []
    with _head(streamed) as logits_of:
        for rows, stream in zip(batches, streams):
            # the scored positions of the whole batch side by side (norm and head act on each position alone),
            # through the head `positions` at a time: the vocabulary matrix is converted once per call, and
            # only each position's target log-probability and greedy check are kept, not its logits
            scored = torch.cat([stream.hidden[offset, len(inputs[r]) - len(targets[r]):len(inputs[r])]
                                for offset, r in enumerate(rows)])
            wanted = torch.tensor([t for r in rows for t in targets[r]])
            picked, greedy = [], []
            for start in range(0, len(wanted), positions):
                logp = torch.log_softmax(logits_of(scored[None, start:start + positions])[0].float(), dim=-1).cpu()
                target = wanted[start:start + positions]
                picked.append(logp.gather(-1, target[:, None])[:, 0])
                greedy.append(logp.argmax(-1) == target)
            lengths = [len(targets[r]) for r in rows]
            for p, g in zip(torch.cat(picked).split(lengths), torch.cat(greedy).split(lengths)):
                scores.append((p.sum().item(), bool(g.all())))
    return scores


def streamed_scorer(streamed: StreamedModel, batch_size: int, tokens_per_pass: int, progress: bool = True):
    """`score(inputs, targets)` for `evaluate.zeroshot` on a streamed model: the requests, sorted by length
    (similar lengths share a padded batch), in groups of at most `tokens_per_pass` tokens, each group one
    pass over the model (`streamed_loglikelihoods`); the weights are read once per group."""
    def score(inputs: list[list[int]], targets: list[list[int]]) -> list[tuple[float, bool]]:
        order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]))
        groups, tokens = [[]], 0
        for i in order:
            if groups[-1] and tokens + len(inputs[i]) > tokens_per_pass:
                groups.append([])
                tokens = 0
            groups[-1].append(i)
            tokens += len(inputs[i])
        scores: list = [None] * len(inputs)
        for group in tqdm(groups, desc="passes over the model", disable=not progress or len(groups) < 2):
            found = streamed_loglikelihoods(streamed, [inputs[i] for i in group], [targets[i] for i in group],
                                            batch_size, progress)
            for i, found_score in zip(group, found):
                scores[i] = found_score
        return scores
    return score


def _through_blocks(streamed: StreamedModel, streams: list, checkpoint: Checkpoint | None, progress: bool,
                    desc: str) -> None:
    """Every stream's hidden states through every block, each block read once (from `checkpoint`, default
    the input): afterwards each stream holds the last block's outputs."""
    for index in tqdm(range(len(streamed.adapter.blocks)), desc=desc, unit="block", disable=not progress):
        block = streamed.load_block(index, checkpoint)
        for stream in streams:
            for b, rows in stream.batches():
                output = block(stream.hidden[rows], **stream.block_kwargs[index][b])
                streamed.returns_tuple = isinstance(output, (tuple, list))  # for the replays of `_head`
                stream.hidden[rows] = first_output(output)
            check_finite(stream.hidden, f"block {index}")
        streamed.drop_block(index)


@contextmanager
def _head(streamed: StreamedModel):
    """`logits_of(hidden)`: the model's own output side (final norm, LM head, any logit soft-capping) on
    last-block outputs, run as the model's forward with every block replaced by a replay of its result."""
    blocks = streamed.adapter.blocks
    originals = list(blocks)
    replays = [_Replay(block, i == len(blocks) - 1, streamed.returns_tuple) for i, block in enumerate(originals)]

    def logits_of(hidden: torch.Tensor) -> torch.Tensor:
        replays[-1].output = hidden
        # the embedding's width, which need not be the blocks' (OPT-350m projects 512 up to 1024)
        ignored = hidden.new_zeros(*hidden.shape[:-1], model.get_input_embeddings().embedding_dim)
        return model(inputs_embeds=ignored, use_cache=False).logits

    with streamed.outer("output") as model:
        try:
            for i, replay in enumerate(replays):
                blocks[i] = replay
            yield logits_of
        finally:
            for i, block in enumerate(originals):
                blocks[i] = block


def tokens_per_pass(streamed: StreamedModel, budget_gb: float) -> int:
    """How many tokens' hidden states a quarter of the memory budget holds: the requests scored in one pass
    over a streamed model (the rest of the budget is for a block and the head's vocabulary slice)."""
    per_token = streamed.model.config.get_text_config().hidden_size * torch.finfo(streamed.compute_dtype).bits // 8
    return max(1, int(0.25 * budget_gb * 1e9 / per_token))


def largest_block(sizes: dict[str, int]) -> int:
    """Bytes of the largest numbered group of tensors (`model.layers.7.`: a decoder block), from the names."""
    groups: dict[str, int] = {}
    for name, size in sizes.items():
        found = re.match(r"^(.*?\.\d+)\.", name)
        if found:
            groups[found.group(1)] = groups.get(found.group(1), 0) + size
    return max(groups.values(), default=0)
