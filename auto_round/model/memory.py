"""Give memory freed between blocks back to the operating system.

Tuning allocates and frees many large tensors per block (activations, gradients, qdq temporaries). glibc's
malloc keeps freed heap memory for reuse, and across 30 blocks its heap fragments and grows: on SmolLM2 the
peak RSS of a SignRound run fell from 1576 to 1351 MiB by trimming the heap after each block (measured with
`/usr/bin/time`-style max RSS; the per-step time did not change). Forcing every large allocation through
mmap instead (M_MMAP_THRESHOLD) saves more but makes each step 1.8x slower from page faults, so it is not done.

The opposite, within a block: `freed_memory_reused` keeps what a tuning step frees in the heap for the next
step, instead of handing big blocks back to the OS on free and page-faulting them in again (see there).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import mmap
from contextlib import contextmanager
from functools import lru_cache
from typing import ContextManager, Iterator, Optional

import torch


@lru_cache(maxsize=None)
def _libc(symbol: str):
    """A C library function, or None where it does not exist (malloc_trim: glibc only; no libc on Windows)."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        return getattr(ctypes.CDLL(name, use_errno=True), symbol)
    except (OSError, AttributeError):
        return None


def _trim_heap() -> None:
    """Return the free heap memory to the OS (glibc's malloc_trim; nothing elsewhere)."""
    trim = _libc("malloc_trim")
    if trim is not None:
        trim(0)


def release_memory(device: str = "cpu", collect: bool = True) -> None:
    """Collect garbage (collect=False: skip it), return the freed heap to the OS (glibc), and empty the CUDA
    cache on CUDA devices.

    A full gc.collect walks every tracked Python object, ~0.2 s once transformers and a model are loaded
    (~400k objects): nothing beside a SignRound block's tuning, but a SmolLM2 RTN walk spent half its time
    there. Code that makes no reference cycles (RTN's qdq) passes collect=False."""
    if collect:
        gc.collect()
    _trim_heap()
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


# glibc's mallopt parameters (malloc.h), the largest mmap threshold it accepts on 64-bit (HEAP_MAX_SIZE / 2)
# and its default cap on the number of mmap-served blocks (DEFAULT_MMAP_MAX)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_MMAP_THRESHOLD_MAX = 32 << 20
_MMAP_MAX_DEFAULT = 65536
_TRIM_THRESHOLD_WHILE_REUSING = 1 << 30


def freed_memory_reused(enabled: bool = True) -> ContextManager[bool]:
    """While open, glibc's malloc keeps freed memory up to 32 MiB a block for reuse instead of returning it to
    the OS. Yields whether that took effect (False where disabled or the C library has no mallopt, e.g. not
    glibc). `large_blocks_reused` extends it to bigger blocks.

    Why: a tuning step allocates and frees the same large temporaries every iteration (an activation's qdq
    on SmolLM2's down_proj input: 12 MiB each). glibc serves a request above its mmap threshold (128 KiB at
    first, growing only as such blocks are freed) with a fresh mmap and unmaps it on free, and trims the top
    of the heap once more than its trim threshold is free: either way the next step's tensor page-faults all
    its pages in again (3.7 ms for an `abs` of 12 MiB against 0.2 ms for one of 4.7 MiB served from the heap,
    measured). Requests up to 32 MiB now come from the heap and freed memory is kept; `release_memory` still
    trims explicitly after each block, so the retained memory never outlives a block's working set.
    SignRound on SmolLM2 (2026-12-07, two threads, same results bit for bit): MXFP4 486.4 -> 438.1 s, peak RSS
    989 -> 981 MiB; W4A16 371.2 -> 355.3 s, 853 -> 852 MiB.
    On exit the trim threshold goes back to what glibc's own rule gives at that mmap threshold (twice it) and
    the heap is trimmed; the mmap threshold stays at 32 MiB, where glibc's dynamic one ends once a block of
    32 MiB or more has been freed (routine for torch).
    """
    while_open = {_M_MMAP_THRESHOLD: _MMAP_THRESHOLD_MAX, _M_TRIM_THRESHOLD: _TRIM_THRESHOLD_WHILE_REUSING}
    return _malloc_options(enabled, while_open, on_exit={_M_TRIM_THRESHOLD: 2 * _MMAP_THRESHOLD_MAX})


def large_blocks_reused(enabled: bool = True) -> ContextManager[bool]:
    """Inside `freed_memory_reused`: blocks above 32 MiB come from the heap too and are kept when freed (glibc
    gives no request its own mmap: M_MMAP_MAX 0; it still falls back to mmap where the heap cannot grow).
    Yields whether that took effect.

    The mmap threshold cannot be raised above 32 MiB, and bigger models' activations are bigger than that
    (hidden 2048 / intermediate 8192 at 8 x 256 tokens: 64 MiB each; Llama-3-8B at 8 x 2048: 940 MiB), so each
    step page-faulted them in again. Measured (2026-12-07, a random 2-layer model of that width, W4A16
    SignRound 50 iters, 32 x 256, two threads, same results): tuning 358.4 -> 271.5-282.1 s (-21-24 %), but
    peak RSS 3031 -> 3348-3457 MiB (+10-14 %: freed blocks of one size leave holes others cannot fill). So the
    walk opens this only when the memory plan leaves room for it (compressor_walk.py); `release_memory` trims after each
    block as before. On exit big requests get their own mmap again (glibc's default count).
    """
    return _malloc_options(enabled, {_M_MMAP_MAX: 0}, on_exit={_M_MMAP_MAX: _MMAP_MAX_DEFAULT})


@contextmanager
def _malloc_options(enabled: bool, while_open: dict[int, int], on_exit: dict[int, int]) -> Iterator[bool]:
    """glibc mallopt `while_open` settings; on exit the `on_exit` ones, then the heap is trimmed. Yields whether
    every setting took effect (False where disabled or the C library has no mallopt)."""
    mallopt = _libc("mallopt") if enabled else None
    if mallopt is None:
        yield False
        return
    took = all([bool(mallopt(option, value)) for option, value in while_open.items()])
    try:
        yield took
    finally:
        for option, value in on_exit.items():
            mallopt(option, value)
        _trim_heap()


# ---- weights read through a memory map --------------------------------------------------------------
# transformers maps safetensors files into memory (private, copy-on-write) when no dtype conversion is
# needed. A page of such a mapping counts in the process's RSS once touched, and stays counted while the
# file is mapped, even after every tensor viewing it is gone: the mapping lives as long as any tensor of
# that file does (the embedding, say). Telling the kernel we no longer need the pages of a weight we drop
# lets it reclaim them; for a private file mapping that is always safe (a later read would see the file).
_MADV_DONTNEED = 4


@lru_cache(maxsize=1)
def _madvise():
    fn = _libc("madvise")
    if fn is not None:
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn


def _private_file_mapping(address: int) -> bool:
    """True when `address` lies in a private mapping of a regular file (per /proc/self/maps)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                low, high = (int(x, 16) for x in fields[0].split("-"))
                if low <= address < high:
                    return len(fields) >= 6 and fields[1].endswith("p") and fields[5].startswith("/") and fields[4] != "0"
    except OSError:
        return False
    return False


def _file_page_span(tensor: torch.Tensor) -> Optional[tuple[int, int]]:
    """[first, last) addresses of the whole pages inside a contiguous CPU tensor's bytes when they lie in a
    private file mapping; None otherwise (anonymous memory, empty, strided, not on the CPU)."""
    if tensor.device.type != "cpu" or tensor.numel() == 0 or not tensor.is_contiguous():
        return None
    start = tensor.data_ptr()
    if not _private_file_mapping(start):
        return None
    page = mmap.PAGESIZE
    first = -(-start // page) * page
    last = (start + tensor.numel() * tensor.element_size()) // page * page
    return (first, last) if last > first else None


def drop_file_backed_pages(tensor: torch.Tensor) -> int:
    """Let the OS reclaim the memory-mapped file pages of a CPU tensor that is about to be dropped.

    Only whole pages inside the tensor's bytes are released, and only when they belong to a private file
    mapping, so no other tensor's data and no anonymous memory is ever touched. Returns the bytes released
    (0 where the tensor is not file-backed or the platform has no madvise).
    """
    madvise, span = _madvise(), _file_page_span(tensor)
    if madvise is None or span is None or madvise(span[0], span[1] - span[0], _MADV_DONTNEED) != 0:
        return 0
    return span[1] - span[0]


_PAGE_PRESENT, _PAGE_FILE = 1 << 63, 1 << 61  # /proc/self/pagemap entry bits (Documentation/admin-guide/mm/pagemap)


def _pages_unmodified(first: int, last: int) -> bool:
    """True when no page in [first, last) of a private file mapping has been written (copy-on-write makes a
    written page anonymous: present without the file-page bit). False when pagemap cannot be read."""
    page = mmap.PAGESIZE
    count = (last - first) // page
    try:
        with open("/proc/self/pagemap", "rb") as pagemap:
            pagemap.seek(first // page * 8)
            raw = pagemap.read(count * 8)
    except OSError:
        return False
    if len(raw) != count * 8:
        return False
    entries = torch.frombuffer(bytearray(raw), dtype=torch.int64)
    present = (entries & _PAGE_PRESENT) != 0  # the sign bit: int64 & (1 << 63) wraps to the sign bit
    file_backed = (entries & _PAGE_FILE) != 0
    return bool((~present | file_backed).all())


def evict_clean_file_pages(tensor: torch.Tensor) -> int:
    """Let the OS reclaim the resident file pages of a memory-mapped CPU tensor that stays in use.

    A later read faults the pages back in from the page cache or the file, with the same bytes. Done only
    when no page of the tensor has been written since it was mapped (a written page of a private mapping is
    the only copy of the new values): then it is a pure memory saving. Returns the bytes released (0 when
    anything is doubtful: anonymous memory, written pages, no pagemap, no madvise).
    """
    madvise, span = _madvise(), _file_page_span(tensor)
    if madvise is None or span is None or not _pages_unmodified(*span) \
            or madvise(span[0], span[1] - span[0], _MADV_DONTNEED) != 0:
        return 0
    return span[1] - span[0]


def slices_handed_back(tensor: torch.Tensor, elements: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, flat slice of `elements`) over a contiguous tensor; each slice's clean file pages are handed back
    once the caller is done with it, and at the end the pages that straddle two slices. Stops early if the
    caller does (the rest is not read)."""
    flat = tensor.detach().view(-1)
    for start in range(0, flat.numel(), elements):
        piece = flat[start:start + elements]
        yield start, piece
        evict_clean_file_pages(piece)
    evict_clean_file_pages(tensor.detach())


def release_weight(module: torch.nn.Module) -> int:
    """Replace `module.weight` by a meta tensor of the same shape and dtype; returns file bytes released.

    For layers whose packed form has been kept (immediate packing): the weight is never read again, and
    the module still reports its shape (layer_shape works on meta tensors).
    """
    weight = module.weight
    released = drop_file_backed_pages(weight.detach())
    module.weight = torch.nn.Parameter(torch.empty(weight.shape, dtype=weight.dtype, device="meta"), requires_grad=False)
    return released
