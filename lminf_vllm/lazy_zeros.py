"""Zero-filled CPU arrays that take memory only where they are written.

vLLM's worker sizes some per-request buffers by max_model_len: a row of token
ids per request slot, a row of block ids. Under lminf max_model_len may be
2^30, so such a buffer is reserved as address space (an anonymous mapping,
not counted against the commit limit) and a page becomes memory only when a
request writes into it: a row costs what its request holds, not what
max_model_len allows. `release_rows` hands a finished request's pages back;
they read as zeros again. Linux only (the platforms vLLM serves on).
"""

import math
import mmap

import numpy as np
import torch

MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Python < 3.13 lacks the name; 0x4000 on Linux
NUMPY_DTYPES = {torch.int32: np.int32, torch.int64: np.int64, torch.bool: np.bool_}


class LazyZeros:
    """A [rows, cols] array of zeros as a numpy array and a torch tensor sharing its memory."""

    def __init__(self, rows: int, cols: int, dtype: torch.dtype):
        np_dtype = np.dtype(NUMPY_DTYPES[dtype])
        self.row_bytes = cols * np_dtype.itemsize
        self._map = mmap.mmap(
            -1, max(rows * self.row_bytes, 1),
            flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
        )  # fmt: skip
        self.array = np.frombuffer(self._map, dtype=np_dtype, count=rows * cols).reshape(rows, cols)
        self.tensor = torch.from_numpy(self.array)

    def release_rows(self, rows, from_col: int = 0) -> None:
        """Return the pages wholly inside columns [from_col, end) of each of `rows` to the OS
        (they read as zeros after)."""
        itemsize = self.array.itemsize
        for row in rows:
            start = math.ceil((row * self.row_bytes + from_col * itemsize) / mmap.PAGESIZE) * mmap.PAGESIZE
            stop = (row + 1) * self.row_bytes // mmap.PAGESIZE * mmap.PAGESIZE
            if stop > start:
                self._map.madvise(mmap.MADV_DONTNEED, start, stop - start)
