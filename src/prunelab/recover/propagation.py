"""Propagation: what each submodel reads and what it is trained to produce.

    mode      the submodel reads                    its targets                          a second stream
    dense     the dense model's activations         dense submodel(inputs)               (the same one)
    sparse    the pruned model's activations        dense submodel(inputs)               no
    mixed     the pruned model's activations        the dense model's next activations   the dense model's

`dense` trains every submodel on inputs it will never see once upstream is pruned; `sparse` asks no
submodel to undo an upstream error; `mixed` (the default, measured best on SmolLM2) lets every
submodel correct what reaches it from upstream, at the price of a second stream of activations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Streams = dict[str, torch.Tensor]  # split ("train", "heldout") -> activations [windows, seqlen, hidden]


@dataclass(frozen=True)
class Propagation:
    mode: str

    @property
    def keeps_dense(self) -> bool:
        """Whether the dense model's own activations are tracked beside the pruned model's."""
        return self.mode != "sparse"

    @property
    def separate_dense(self) -> bool:
        """Whether the dense activations are a stream of their own (mixed); in `dense` they are the inputs."""
        return self.mode == "mixed"

    @property
    def targets_from_pruned(self) -> bool:
        """Whether the targets are the dense submodel applied to the pruned model's activations (sparse)."""
        return self.mode == "sparse"

    @property
    def reads_dense(self) -> bool:
        """Whether a submodel reads the dense model's activations rather than the pruned model's."""
        return self.mode == "dense"

    def inputs(self, pruned: Streams, dense: Streams | None) -> Streams:
        return dense if self.reads_dense else pruned

    def target_inputs(self, pruned: Streams, dense: Streams | None) -> Streams:
        """What the dense submodel is applied to for the targets."""
        return pruned if self.targets_from_pruned else dense

    def advance(self, outputs: Streams, targets: Streams) -> tuple[Streams, Streams | None]:
        """The (pruned, dense) streams entering the next submodel."""
        if self.mode == "dense":
            return targets, targets
        return outputs, (targets if self.separate_dense else None)
