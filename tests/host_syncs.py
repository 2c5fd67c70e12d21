"""Counting host syncs on CPU: `HostSyncs` records every operation that would make the host wait for a GPU, had
the tensors it touches been on one. CPU tests cannot use torch.cuda.set_sync_debug_mode, so the mode follows
which tensors would live on the device (those it is told of, and everything computed from them) and flags
reading their values on the host (.item(), .tolist(), bool(), .cpu(), ...) and operations whose output size
depends on their values (boolean indexing, nonzero, masked_select, unique). Host tensors (lengths, masks drawn
on the host before they are moved) are free to read.

    with HostSyncs(model.parameters(), audio) as syncs:
        loss = model(audio); loss.backward()
    assert not syncs.found, syncs.found     # [(operation, "file:line" of the project code that asked)]
"""
from __future__ import annotations

import os
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE_FROM_VALUES = {"aten.nonzero", "aten.masked_select", "aten._unique2", "aten.unique_dim", "aten.unique_consecutive",
                    "aten.bincount", "aten.repeat_interleave"}
READS = {"aten._local_scalar_dense", "aten.is_nonzero", "aten.equal"}  # a value read on the host
HOST_METHODS = ("tolist", "numpy", "cpu")


def _tensors(tree) -> list[torch.Tensor]:
    return [x for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]


class HostSyncs(TorchDispatchMode):
    def __init__(self, *device_tensors):
        super().__init__()
        self.ids, self.keep, self.found = set(), [], []
        self.tag(_tensors(list(device_tensors)))

    def tag(self, tensors) -> None:
        for tensor in tensors:
            self.ids.add(id(tensor))
            self.keep.append(tensor)  # alive, so that no other tensor takes its id

    def on_device(self, tensors) -> bool:
        return any(id(tensor) in self.ids for tensor in tensors)

    def record(self, what: str) -> None:
        frames = [f for f in traceback.extract_stack()[:-2]
                  if f.filename.startswith(ROOT) and not f.filename.endswith("host_syncs.py")]
        here = f"{os.path.relpath(frames[-1].filename, ROOT)}:{frames[-1].lineno}" if frames else "?"
        self.found.append((what, here))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = _tensors((args, kwargs))
        out = func(*args, **(kwargs or {}))
        if self.on_device(inputs):
            name = str(func.overloadpacket)
            bool_index = name in ("aten.index", "aten.index_put", "aten.index_put_") and any(
                x.dtype == torch.bool for x in _tensors(args[1]))
            if name in READS or name in SIZE_FROM_VALUES or bool_index:
                self.record(name + (" (boolean index)" if bool_index else ""))
            written = _tensors(args) if func._schema.is_mutable else []  # in place: the written tensors and their bases
            self.tag(_tensors(out) + written + [x._base for x in written if x._base is not None])
        return out

    def __enter__(self):
        self.patched = {name: getattr(torch.Tensor, name) for name in HOST_METHODS}
        for name, method in self.patched.items():
            setattr(torch.Tensor, name, self.host_read(name, method))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, method in self.patched.items():
            setattr(torch.Tensor, name, method)
        return super().__exit__(*exc)

    def host_read(self, name: str, method):
        def read(tensor, *args, **kwargs):
            if id(tensor) in self.ids:
                self.record(f"Tensor.{name}")
            return method(tensor, *args, **kwargs)
        return read
