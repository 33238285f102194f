"""The frozen teacher's outputs on every training frame in each of its four flip states, computed
once and looked up by every distilled student of a study instead of a teacher forward per step.

In eval mode the teacher's output for a frame does not depend on the rest of its batch, and the
training augmentation is flips only, so a lookup is the forward it replaces (up to the summation
order of batched convolutions). Saved as one file that students load memory-mapped: concurrent
students share its pages.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from models.datasets import Split
from models.engine import Runtime, flip_state, to_input

FLIP_STATES = 4


class TeacherCache:
    def __init__(self, leaves: list[torch.Tensor], spec: pytree.TreeSpec):
        self.leaves, self.spec = leaves, spec  # leaf rows: frame * FLIP_STATES + flip state

    @classmethod
    @torch.no_grad()
    def build(cls, teacher: nn.Module, split: Split, rt: Runtime, batch_size: int) -> TeacherCache:
        teacher.eval()
        chunks, spec = [], None
        for start in rt.bar(range(0, len(split), batch_size), desc="teacher outputs", unit="batch"):
            x = to_input(split.x[start:start + batch_size], rt.device)
            states = []
            for state in range(FLIP_STATES):
                with rt.autocast():
                    leaves, spec = pytree.tree_flatten(teacher(flip_state(x, state)))
                states.append([t.float().cpu() for t in leaves])
            # frame-major: rows frame * FLIP_STATES + state
            chunks.append([torch.stack(per_leaf, 1).flatten(0, 1) for per_leaf in zip(*states)])
        return cls([torch.cat(per_leaf) for per_leaf in zip(*chunks)], spec)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.leaves)

    def lookup(self, idx: torch.Tensor, flips: torch.Tensor, device: torch.device):
        rows = idx * FLIP_STATES + flips
        return pytree.tree_unflatten([t[rows].to(device, non_blocking=True) for t in self.leaves], self.spec)

    def save(self, path: Path) -> None:
        torch.save({"leaves": self.leaves, "spec": self.spec}, path)

    @classmethod
    def load(cls, path: Path) -> TeacherCache:
        # Our own file, holding a TreeSpec (a pickled object), hence weights_only=False.
        state = torch.load(path, mmap=True, weights_only=False)
        return cls(state["leaves"], state["spec"])
