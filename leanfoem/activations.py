"""The activation store: hidden states of every calibration row at one block boundary, as one file.

Why it exists: the inputs of block i+1 are the outputs of the *quantized* block i; regenerating them
from the start would cost i block forwards and, after a crash, must give the same bits. So each block
boundary is one file in the work directory (a .npy), and so are the few files that live inside one block
(kept inputs of an output linear, the hidden states between branches).

Rows go in with pwrite and come back with pread, not through a memory map: the data then lives in the
kernel's page cache, which holds it while RAM allows and writes it to disk when RAM is short, and the
process holds only the batch it works on. Through a map every page touched counted in the process's
resident set (SmolLM2-135M on the CPU: ~210 MB of a 0.97 GB peak were store pages), and closing a map
meant an msync.

Rows may be written by a background thread (`pending_bytes` > 0, background_io.Worker): the caller hands a row
over and computes the next batch while the row is copied into the page cache and hashed. Its bytes, their order
and the digest are those of a write in the caller's thread.

What must stay true:
- rows are written in order and the file is complete only after `finish()` (tmp → fsync → rename), or
  `complete()` then `commit()`: between the two the whole file can be read under its tmp name (the next block
  computes from it while another thread makes it durable); its sha256 (hashed as the rows are written, header
  first: the same digest as hashing the file) goes into the journal and is checked before a resumed run reads it;
- a file that lives only inside one block (`durable=False`) is neither hashed nor fsynced: a kill restarts the
  block, which writes it anew;
- a caller never modifies a row tensor after handing it to `write()` (a background write reads it later);
- a row read back is bit-identical to the row written, in the dtype it was written in (bf16 is stored
  as its 16-bit pattern, numpy having no bf16); the file is a valid .npy (`np.load` reads it).
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import torch

from .atomic import fsync_dir
from .background_io import Worker

_STORED_AS = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}


class ActivationWriter:
    def __init__(self, path: Path, lengths: list[int], hidden: int, dtype: torch.dtype, *, durable: bool = True,
                 pending_bytes: int = 0):
        """`pending_bytes` > 0: rows are written by a background thread, with at most that many bytes of rows
        handed over and not yet written (`write()` waits beyond); 0: in the caller's thread."""
        self.path, self.lengths, self.dtype, self.durable = Path(path), list(lengths), dtype, durable
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        stored = np.dtype(_STORED_AS[dtype])
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": np.lib.format.dtype_to_descr(stored),
                                                      "fortran_order": False, "shape": (sum(lengths), hidden)})
        self.header = header.getvalue()
        self.row_bytes = [n * hidden * stored.itemsize for n in self.lengths]
        self.offset = len(self.header)
        self.next_row = 0
        self.digest = hashlib.sha256(self.header) if durable else None
        self.worker = Worker(f"rows-{self.path.stem}", pending_bytes) if pending_bytes else None
        self.fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            self._reserve_disk(self.offset + sum(self.row_bytes))
            os.pwrite(self.fd, self.header, 0)
        except OSError:
            self.abandon()
            raise

    def _reserve_disk(self, size: int) -> None:
        """Reserving the whole file first turns a full disk into an ENOSPC here, before any row is computed."""
        os.posix_fallocate(self.fd, 0, size)

    def write(self, row: torch.Tensor) -> None:
        """Append the next row, [length, hidden]."""
        data = row.detach().to(device="cpu", dtype=self.dtype).contiguous()
        if self.dtype == torch.bfloat16:
            data = data.view(torch.int16)
        size = data.numel() * data.element_size()
        if size != self.row_bytes[self.next_row]:
            raise ValueError(f"activation file {self.path.name}: row {self.next_row} has {size} bytes, "
                             f"expected {self.row_bytes[self.next_row]}")
        if self.worker is None:
            self._put(data, self.offset)
        else:
            self.worker.submit(self._put, data, self.offset, size=size)
        self.offset += size
        self.next_row += 1

    def _put(self, data: torch.Tensor, offset: int) -> None:
        view = memoryview(data.numpy()).cast("B")
        written = 0
        while written < len(view):  # pwrite may write less than asked
            written += os.pwrite(self.fd, view[written:], offset + written)
        if self.digest is not None:
            self.digest.update(view)

    def complete(self) -> None:
        """Waits until every row is written: the whole file can be read under its tmp name (`self.tmp`)."""
        if self.next_row != len(self.lengths):
            raise RuntimeError(f"activation file {self.path.name}: {self.next_row} of {len(self.lengths)} rows written")
        if self.worker is not None:
            self.worker.drain()

    def commit(self) -> str | None:
        """After `complete()`: the file under its name, fsynced first when durable; its sha256 (None when not
        durable). Another thread may do this while the file is read under its tmp name."""
        if self.durable:
            os.fsync(self.fd)
        os.close(self.fd)
        self.fd = None
        os.replace(self.tmp, self.path)
        if not self.durable:
            return None
        fsync_dir(self.path.parent)
        return self.digest.hexdigest()

    def finish(self) -> str | None:
        """Completes the file: `complete()` then `commit()`."""
        self.complete()
        return self.commit()

    def abandon(self) -> None:
        if getattr(self, "worker", None) is not None:
            self.worker.cancel()  # a background write may be using the descriptor
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)
            self.fd = None
        self.tmp.unlink(missing_ok=True)


class ActivationReader:
    def __init__(self, path: Path, lengths: list[int], dtype: torch.dtype):
        self.path, self.dtype = Path(path), dtype
        self.stored = np.dtype(_STORED_AS[dtype])
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        with open(self.path, "rb") as f:
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}[np.lib.format.read_magic(f)]
            shape, fortran, stored = read_header(f)
            self.data_start = f.tell()
        if (shape[0] != self.offsets[-1] or len(shape) != 2 or fortran or stored != self.stored
                or os.path.getsize(self.path) < self.data_start + shape[0] * shape[1] * self.stored.itemsize):
            raise ValueError(f"activation file {self.path.name} does not match the calibration rows")
        self.hidden = shape[1]
        self.file = open(self.path, "rb", buffering=0)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def row(self, i: int) -> torch.Tensor:
        return self.rows(i, i + 1)

    def rows(self, i: int, j: int) -> torch.Tensor:
        """Rows i..j-1 (consecutive in the file) read in one piece: [length, hidden] for one row, else
        [j − i, length, hidden], which needs rows of one length."""
        tokens = int(self.offsets[j] - self.offsets[i])
        block = np.empty((tokens, self.hidden), dtype=self.stored)
        view = memoryview(block).cast("B")
        start, done = self.data_start + int(self.offsets[i]) * self.hidden * self.stored.itemsize, 0
        while done < len(view):
            got = os.preadv(self.file.fileno(), [view[done:]], start + done)
            if got == 0:
                raise ValueError(f"activation file {self.path.name} is shorter than its header says")
            done += got
        tensor = torch.from_numpy(block)
        if self.dtype == torch.bfloat16:
            tensor = tensor.view(torch.bfloat16)
        return tensor if j == i + 1 else tensor.view(j - i, -1, self.hidden)

    def close(self) -> None:
        self.file.close()


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(chunk):
            h.update(data)
    return h.hexdigest()
