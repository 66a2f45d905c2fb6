"""The activation store: hidden states of every calibration row at one block boundary, as one file.

Why it exists: the inputs of block i+1 are the outputs of the *quantized* block i; regenerating them
from the start would cost i block forwards and, after a crash, must give the same bits. So each block
boundary is one file in the work directory (a .npy, memory-mapped: host RAM holds only the pages in
use, and a store larger than RAM spills to disk by itself).

What must stay true:
- rows are written in order and the file is complete only after `finish()` (tmp → fsync → rename);
  its sha256 goes into the journal and is checked before a resumed run reads it;
- a row read back is bit-identical to the row written, in the dtype it was written in (bf16 is stored
  as its 16-bit pattern, numpy having no bf16).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from .atomic import fsync_dir, fsync_file

_STORED_AS = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}


class ActivationWriter:
    def __init__(self, path: Path, lengths: list[int], hidden: int, dtype: torch.dtype):
        self.path, self.lengths, self.dtype = Path(path), list(lengths), dtype
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.array = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=_STORED_AS[dtype],
                                               shape=(int(self.offsets[-1]), hidden))
        self.next_row = 0
        self._reserve_disk()

    def _reserve_disk(self) -> None:
        """A store into a memory-mapped page that the disk cannot back kills the process with SIGBUS; reserving
        the whole file first turns a full disk into an ordinary ENOSPC here, before anything is lost."""
        try:
            fd = os.open(self.tmp, os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
            finally:
                os.close(fd)
        except OSError:
            self.abandon()
            raise

    def write(self, row: torch.Tensor) -> None:
        """Append the next row, [length, hidden]."""
        i = self.next_row
        data = row.detach().to(device="cpu", dtype=self.dtype).contiguous()
        if self.dtype == torch.bfloat16:
            data = data.view(torch.int16)
        block = data.numpy().view(self.array.dtype)
        self.array[self.offsets[i]:self.offsets[i + 1]] = block
        self.next_row += 1

    def finish(self, durable: bool = True) -> str | None:
        """Completes the file; its sha256. `durable=False` is for files that live only inside one block (a kill
        restarts the block, which writes them anew): no fsync, no digest."""
        if self.next_row != len(self.lengths):
            raise RuntimeError(f"activation file {self.path.name}: {self.next_row} of {len(self.lengths)} rows written")
        self.array.flush()
        del self.array
        if not durable:
            os.replace(self.tmp, self.path)
            return None
        fsync_file(self.tmp)
        digest = file_sha256(self.tmp)
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)
        return digest

    def abandon(self) -> None:
        self.__dict__.pop("array", None)
        self.tmp.unlink(missing_ok=True)


class ActivationReader:
    def __init__(self, path: Path, lengths: list[int], dtype: torch.dtype):
        self.path, self.dtype = Path(path), dtype
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.array = np.load(self.path, mmap_mode="r")
        if self.array.shape[0] != self.offsets[-1] or self.array.dtype != _STORED_AS[dtype]:
            raise ValueError(f"activation file {self.path.name} does not match the calibration rows")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def row(self, i: int) -> torch.Tensor:
        block = torch.from_numpy(np.array(self.array[self.offsets[i]:self.offsets[i + 1]]))
        if self.dtype == torch.bfloat16:
            block = block.view(torch.bfloat16)
        return block

    def close(self) -> None:
        del self.array


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(chunk):
            h.update(data)
    return h.hexdigest()
