"""The engine's paged, truly per-head KV cache.

One pool of 16-slot pages holds every (layer, sequence, KV head): ``k_pool``/``v_pool``
``[num_pages, P, D]``. Each head owns a page table row and a slot count, so a head that
compresses 8x takes an eighth of the pages and its attention reads an eighth of the bytes.
Page 0 is a null page that is never handed out (unallocated table entries point at it).

Per layer (layer-major, so one layer's tables are contiguous for the kernels):
``page_table [L, S+1, H, M]`` int32, ``lens [L, S+1, H]`` int32 slots, and the DMC window state:
for a bounded window a ring of the open group's last W-1 raw keys/values (cache dtype) and
importances (fp32), for an unbounded one the running sums (fp32); see
:mod:`dmc.kernels.reference`. Row S is a scratch row for the padding rows of a
CUDA-graph bucket.

FP8 pages (``kv_cache_dtype="fp8"``): the pools hold e4m3 (``torch.float8_e4m3fn``, 1 byte an element, so
the same memory holds twice the pages of bf16) with a k and a v scale per (layer, KV head) (``k_scale``,
``v_scale`` fp32 ``[L, H]``): 1.0 until :meth:`PagedKVCache.set_kv_scales` sets calibrated ones
(:meth:`dmc.engine.LLM.calibrate_kv_scales`). Only the stored slot is quantised, by the rule of
:func:`dmc.kernels.reference.quantise` / ``dequantise``; the window state and the delay ring stay in fp32 /
the model dtype, so merges sum exact values.

Delayed merging (``merge_delay`` w > 0): every head also keeps its last w tokens raw, outside the
pages, in a ring preallocated per row like the window state (``delay_kv``, ``delay_aw``,
``delay_rope``; counted in :meth:`CacheLayout.sequence_bytes`): what attention needs (the raw key,
rotated with the token's RoPE tables) and what the DMC update needs when the token is w old and
leaves (pre-RoPE k, v, α, ω). Those tokens count as slots (:meth:`PagedKVCache.slot_counts`); the
prefill view exposes the ring as the HF cache's ``pending`` window.

The allocator lives on the device: a stack of free page ids and its size ``free_top``.
Invariant between steps: page ``lens // P`` of every live head is allocated, so a decode step
can always write its slot; after the step one page is popped for each head whose page just
filled (an exclusive cumsum, no host sync). The host keeps ``free_top`` above the worst case of
one step (one page per live head) and frees a sequence's pages when it finishes.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import core
from ..hf.cache import DMCCache, SlotCacheLayer
from ..kernels.reference import dequantise, head_scales, quantise
from .pages import OutOfPages, chunk_pages, ensure_room  # noqa: F401 (OutOfPages: dmc.engine.cache's name too)


# --------------------------------------------------------------------------- cache operations
# Pure tensor functions over the cache's tensors (no host sync), shared by the cache, its prefill
# view, the decode step (the allocator) and the eviction baselines.
def ring_terms(ring_kv: torch.Tensor, ring_w: torch.Tensor) -> torch.Tensor:
    """The ring as weighted terms ``[..., R, 2D + 1]`` fp32: ``[ω k, ω v, ω]``."""
    w = ring_w.unsqueeze(-1)
    return torch.cat([w * ring_kv.float(), w], dim=-1)


def gather_slots(k_pool, v_pool, page_table, lens, seq_ids, layer: int, page_size: int,
                 num_slots: int | None = None):
    """Each row's slots as padded tensors: keys, values ``[B, H, S_max, D]`` and a visibility mask
    ``[B, H, S_max]`` (S_max = the longest head of the batch, one host sync; or ``num_slots`` when
    the caller knows a bound: no sync, as a CUDA graph needs). ``v_pool=None``: keys only (values
    None), for callers that only score the slots."""
    rows = seq_ids.long().clamp_min(0)
    length = lens[layer, rows].long() * (seq_ids >= 0)[:, None]  # [B, H]
    s_max = num_slots or max(int(length.max()) if length.numel() else 0, 1)
    slots = torch.arange(s_max, device=k_pool.device)
    pages = page_table[layer, rows][..., slots // page_size].long()  # [B, H, S_max]
    keys = k_pool[pages, slots % page_size]
    values = None if v_pool is None else v_pool[pages, slots % page_size]
    return keys, values, slots < length[..., None]


def allocate_pages(lens, page_table, seq_ids, free_pages, free_top, page_size: int) -> None:
    """Give a fresh page to every (layer, row, head) of the batch whose next slot's page is not
    allocated yet (its table entry is the null page 0).

    Keeps the invariant "page ``lens // P`` is allocated" after a step. ``free_pages``: the free
    stack (int32), ``free_top``: a one-element int64 tensor, its size. All on the device, no host
    sync: the count is taken with an exclusive cumsum. The caller keeps ``free_top`` above the
    worst case (one page per row and head and layer).
    """
    active = seq_ids >= 0
    # Skipped rows read and write back the cache's scratch row (the last one), never a real one.
    rows = torch.where(active, seq_ids.long(), lens.shape[1] - 1)
    length = lens[:, rows].long()  # [L, B, H]
    layers = torch.arange(lens.shape[0], device=lens.device)[:, None, None]
    heads = torch.arange(lens.shape[2], device=lens.device)[None, None, :]
    index = (layers, rows[None, :, None], heads, (length // page_size).clamp_max(page_table.shape[-1] - 1))
    current = page_table[index]
    need = (current == 0) & active[None, :, None]  # page 0 = not allocated (a merge keeps lens)
    flat = need.flatten()
    order = flat.long().cumsum(0) - 1  # index of this row among the needy
    take = (free_top - 1 - order).clamp(0, free_pages.shape[0] - 1)  # rows that need none read a dummy
    fresh = free_pages[take].view_as(need)
    page_table[index] = torch.where(need, fresh, current)
    free_top -= flat.sum()


@dataclass(frozen=True)
class CacheLayout:
    """Sizes of a paged cache."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_pages: int
    max_seqs: int
    max_model_len: int
    window: int | None = 12
    vanilla: bool = False
    page_size: int = 16
    merge_delay: int = 0

    @property
    def delay_width(self) -> int:
        """w: raw tokens each head holds outside its pages (delayed merging; 0 when off or vanilla)."""
        return 0 if self.vanilla else self.merge_delay

    @property
    def pages_per_head(self) -> int:
        """M: enough pages for max_model_len slots plus the one kept ready for the next slot."""
        return math.ceil(self.max_model_len / self.page_size) + 1

    @property
    def ring_width(self) -> int:
        """R: window entries kept per head (0 when nothing is kept: vanilla, or unbounded sums)."""
        if self.vanilla or self.window is None:
            return 0
        return max(self.window - 1, 1)

    @property
    def rows(self) -> int:
        return self.num_layers * self.num_kv_heads

    def page_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of one page of keys plus one of values, for pools of ``dtype`` (fp8: 1 byte an element)."""
        return 2 * self.page_size * self.head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def unbounded(self) -> bool:
        return self.window is None and not self.vanilla

    def sequence_bytes(self, dtype: torch.dtype) -> int:
        """Fixed bytes per sequence row: page table, lens, window state and the delayed-merging ring
        (per head w raw k, v and fp32 α, ω; per row w RoPE cos, sin). ``dtype``: the model dtype, which
        the rings keep whatever the pools' dtype."""
        size = torch.empty((), dtype=dtype).element_size()
        state = self.ring_width * (2 * self.head_dim * size + 4) + (4 * (2 * self.head_dim + 1) if self.unbounded else 0)
        state += self.delay_width * (2 * self.head_dim * size + 8)
        return self.rows * (4 * (self.pages_per_head + 1) + state) + self.delay_width * 2 * self.head_dim * size


    @classmethod
    def plan(cls, config, *, dtype: torch.dtype, device: torch.device, max_model_len: int, max_num_seqs: int,
             window: int | None, vanilla: bool, utilization: float, kv_bytes: int | None, prefill_chunk: int,
             slot_cap: int | None = None, row_extra_bytes=lambda layout: 0, merge_delay: int = 0,
             kv_dtype: torch.dtype | None = None) -> "CacheLayout":
        """The layout of an engine's cache for an HF model ``config``: as many pages as the memory
        left for them holds (MemoryError, naming the settings that help, when not one sequence fits).

        Args:
            kv_bytes: bytes for the page pool; None: on CUDA what ``utilization`` of the GPU leaves
                after weights and activations, on CPU what ``max_num_seqs`` sequences can use, at most
                ``CPU_KV_CACHE_FRACTION`` of the memory available and ``CPU_KV_CACHE_CAP`` bytes.
            slot_cap: the eviction budget (a head keeps at most that many slots), or None.
            row_extra_bytes: fixed bytes per sequence row beyond the tables (eviction's slot state).
            merge_delay: w of delayed merging (its raw ring is fixed per-row memory, counted in the tables).
            kv_dtype: the pools' dtype (None: ``dtype``; fp8 pages take half the bytes of bf16 ones).
        """
        shape = cls(config.num_hidden_layers, config.num_key_value_heads, head_dim(config), 0, max_num_seqs,
                    max_model_len, window, vanilla, merge_delay=merge_delay)
        device = torch.device(device)
        tables = (shape.sequence_bytes(dtype) + row_extra_bytes(shape)) * (max_num_seqs + 1)
        page_bytes = shape.page_bytes(dtype if kv_dtype is None else kv_dtype)
        one_sequence = shape.rows * shape.pages_per_head
        if slot_cap is not None:  # a prompt chunk beside the kept slots (the prefill's peak), a step's page
            peak = min(max_model_len, slot_cap + prefill_chunk)
            one_sequence = shape.rows * (math.ceil(peak / shape.page_size) + 2)
        kv_given = kv_bytes is not None
        if not kv_given:
            kv_bytes = _free_memory(config, device, max_num_seqs, utilization, prefill_chunk)
            if device.type != "cuda":  # no more than max_num_seqs sequences can use at once
                kv_bytes = min(kv_bytes, tables + (max_num_seqs * one_sequence + 1) * page_bytes)
        pages = (kv_bytes - tables) // page_bytes
        if pages < one_sequence + 1:
            raise MemoryError(
                f"not enough memory for the KV cache: one sequence of max_model_len={max_model_len} tokens "
                f"needs {_gib(one_sequence * page_bytes)} (plus {_gib(tables)} of tables for "
                f"max_num_seqs={max_num_seqs}), {_gib(max(kv_bytes, 0))} is available for the cache"
                f"{_pool_source(device, kv_given)}; at least {_gib((one_sequence + 1) * page_bytes + tables)} is "
                f"needed. {_memory_advice(device, kv_given, tables > one_sequence * page_bytes / 4)}")
        return dataclasses.replace(shape, num_pages=int(pages))


# --------------------------------------------------------------------------- memory planning
# CPU page pool (no kv_cache_memory given): at most this share of MemAvailable and this many bytes.
CPU_KV_CACHE_FRACTION = 0.4
CPU_KV_CACHE_CAP = 4 * 2**30


def head_dim(config) -> int:
    """D of an HF config: ``config.head_dim`` where the family sets it (Qwen3), else hidden / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _free_memory(config, device: torch.device, max_num_seqs: int, utilization: float, prefill_chunk: int) -> int:
    if device.type != "cuda":
        return int(min(CPU_KV_CACHE_CAP, CPU_KV_CACHE_FRACTION * _available_host_memory()))
    free, total = torch.cuda.mem_get_info(device)
    used = total - free
    # Activations: a prefill chunk (hidden, MLP, fp32 pooling terms) and the decode logits.
    hidden, inter = config.hidden_size, config.intermediate_size
    heads, d = config.num_key_value_heads, head_dim(config)
    prefill = prefill_chunk * (24 * hidden + 4 * inter + 24 * heads * (2 * d + 1)) * 4
    decode = max_num_seqs * config.vocab_size * 4 * 6
    return int(total * utilization - used - 1.5 * (prefill + decode) - 2**30)


def _pool_source(device: torch.device, kv_given: bool) -> str:
    if kv_given:
        return " (kv_cache_memory, --kv-cache-memory-gib)"
    if device.type == "cuda":
        return " (gpu_memory_utilization, --gpu-memory-utilization, less weights and activations)"
    return (f" (on CPU: {CPU_KV_CACHE_FRACTION:.0%} of the memory available after loading the model, at "
            f"most {_gib(CPU_KV_CACHE_CAP)})")


def _memory_advice(device: torch.device, kv_given: bool, tables_matter: bool) -> str:
    fixes = ["lower max_model_len (--max-model-len)"]
    if tables_matter:
        fixes.append("max_num_seqs (--max-num-seqs)")
    if device.type == "cuda" and not kv_given:
        fixes.append("raise gpu_memory_utilization (--gpu-memory-utilization)")
    fixes.append("give the cache more memory with kv_cache_memory (--kv-cache-memory-gib)"
                 if device.type != "cuda" or kv_given
                 else "set kv_cache_memory (--kv-cache-memory-gib)")
    return "Either " + ", or ".join(fixes) + "."


def _available_host_memory() -> int:
    """MemAvailable of /proc/meminfo in bytes (free physical memory where that file is missing)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 256 * 2**20


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


class PagedKVCache:
    """Pool, page tables, slot counts, window rings and the device-side allocator."""

    def __init__(self, layout: CacheLayout, dtype: torch.dtype, device: torch.device | str,
                 kv_dtype: torch.dtype | None = None) -> None:
        """``dtype``: the model's (window ring, delay ring); ``kv_dtype``: the pools' (None: ``dtype``, or
        ``torch.float8_e4m3fn``)."""
        if layout.window == 1 and not layout.vanilla:
            raise ValueError("the engine needs a DMC window of at least 2 (or None); window=1 would make a "
                             "merge replace the slot by the newest token")
        if layout.num_pages < 2:
            raise ValueError("the page pool needs at least 2 pages (page 0 is the null page)")
        self.layout = layout
        self.dtype = dtype
        self.kv_dtype = dtype if kv_dtype is None else kv_dtype
        self.device = torch.device(device)
        lay, rows, h = layout.num_layers, layout.max_seqs + 1, layout.num_kv_heads
        d, p = layout.head_dim, layout.page_size
        self.k_pool = torch.zeros(layout.num_pages, p, d, dtype=self.kv_dtype, device=self.device)
        self.v_pool = torch.zeros(layout.num_pages, p, d, dtype=self.kv_dtype, device=self.device)
        # Scales of fp8 pools per (layer, KV head): 1.0 until calibrated (set_kv_scales; e4m3 covers ±448, far
        # beyond the k, v of the models we run, but small heads fall into its subnormals). Kept for every dtype
        # (the kernels ignore them unless the pools are fp8). Updated in place: captured graphs read them.
        self.k_scale = torch.ones(lay, h, dtype=torch.float32, device=self.device)
        self.v_scale = torch.ones(lay, h, dtype=torch.float32, device=self.device)
        # Calibration (observe_kv): the largest |k|, |v| of the states prefill stores, per (layer, KV head).
        self.kv_amax: tuple[torch.Tensor, torch.Tensor] | None = None
        self.page_table = torch.zeros(lay, rows, h, layout.pages_per_head, dtype=torch.int32, device=self.device)
        self.lens = torch.zeros(lay, rows, h, dtype=torch.int32, device=self.device)
        # Window state (only what the mode needs; the kernels take all three tensors).
        sums_rows = rows if layout.unbounded else 1
        self.ring = torch.zeros(lay, sums_rows, h, 1, 2 * d + 1, dtype=torch.float32, device=self.device)
        width, ring_rows = max(layout.ring_width, 1), rows if layout.ring_width else 1
        self.ring_kv = torch.zeros(lay, ring_rows, h, width, 2 * d, dtype=dtype, device=self.device)
        self.ring_w = torch.zeros(lay, ring_rows, h, width, dtype=torch.float32, device=self.device)
        # Delayed merging (merge_delay w > 0): the last w tokens of every head, token t at index t % w, as
        # what the DMC update needs when it leaves: pre-RoPE k (channel D-1 zeroed) and v, fp32 α and ω;
        # and per row their RoPE tables (attention rotates the raw keys with them, as the HF path does).
        delay, delay_rows = max(layout.delay_width, 1), rows if layout.delay_width else 1
        self.delay_kv = torch.zeros(lay, delay_rows, h, delay, 2 * d, dtype=dtype, device=self.device)
        self.delay_aw = torch.zeros(lay, delay_rows, h, delay, 2, dtype=torch.float32, device=self.device)
        self.delay_rope = torch.zeros(delay_rows, delay, 2, d, dtype=dtype, device=self.device)
        # Free stack: ids 1..num_pages-1; free_top = how many are on it.
        self.free_pages = torch.arange(1, layout.num_pages, dtype=torch.int32, device=self.device)
        self.free_top = torch.tensor([layout.num_pages - 1], dtype=torch.int64, device=self.device)
        self._free_rows = list(range(layout.max_seqs))[::-1]
        self.scratch_row = layout.max_seqs
        # The prefill's Triton kernels run where the decode step's do (dmc.kernels.get_kernels).
        self.triton = self.device.type == "cuda" or os.environ.get("DMC_FORCE_TRITON") == "1"

    # ------------------------------------------------------------------ fp8 scales
    def set_kv_scales(self, scales) -> None:
        """Set the fp8 scales (a :class:`dmc.engine.kv_scales.KVScales`, checked finite and positive there) of
        this cache's ``[L, H]``. Only while no slot is stored: slots written with the old scales would be read
        with the new ones."""
        shape = list(self.k_scale.shape)
        if list(scales.k.shape) != shape:
            raise ValueError(f"the scales must be [num_layers, num_kv_heads] = {shape}, got {list(scales.k.shape)}")
        if bool(self.lens.any()):
            raise RuntimeError("fp8 scales can only change while the cache stores no slot: finish or abort every "
                               "request first")
        self.k_scale.copy_(scales.k.to(self.k_scale))
        self.v_scale.copy_(scales.v.to(self.v_scale))

    def observe_kv(self, on: bool) -> None:
        """Start (zeroed) or stop recording :attr:`kv_amax` from what prefill stores."""
        self.kv_amax = (torch.zeros_like(self.k_scale), torch.zeros_like(self.v_scale)) if on else None

    def store_states(self, layer: int, flat: torch.Tensor, k_states: torch.Tensor, v_states: torch.Tensor) -> None:
        """Write prefill's states ``[H, n, D]`` (head h's at the flat pool slots ``flat`` ``[H * n]``), fp8 pools
        quantised with the layer's per-head scales as the decode kernels do; record their range while observing."""
        d = k_states.shape[-1]
        if self.kv_amax is not None:
            for amax, states in zip(self.kv_amax, (k_states, v_states)):
                amax[layer] = torch.maximum(amax[layer], states.detach().abs().amax(dim=(1, 2)).float())
        self.k_pool.view(-1, d)[flat] = quantise(k_states, self.kv_dtype, self.k_scale[layer][:, None, None]).reshape(-1, d)
        self.v_pool.view(-1, d)[flat] = quantise(v_states, self.kv_dtype, self.v_scale[layer][:, None, None]).reshape(-1, d)

    def fused_commit(self) -> bool:
        """Whether a batched prefill's first chunks commit through the Triton kernel
        (:mod:`dmc.kernels.triton_commit`): on CUDA (or ``DMC_FORCE_TRITON=1``), for a bounded window, pools of the
        model dtype, no calibration recording and a power-of-two head dimension; else the tensor ops of
        :func:`commit_packed` do."""
        d = self.layout.head_dim  # the kernel's tiles span the head: a power of two, as the other kernels' do
        return (self.triton and self.layout.ring_width > 0 and not self.layout.vanilla and self.kv_dtype == self.dtype
                and self.kv_amax is None and d & (d - 1) == 0)

    # ------------------------------------------------------------------ accounting
    def free_page_count(self) -> int:
        return int(self.free_top.item())

    def free_row_count(self) -> int:
        return len(self._free_rows)

    def raw_held(self, seen: int) -> int:
        """Raw tokens each head of a row that has seen ``seen`` tokens holds in its delay ring (0 without
        delayed merging): they have not been merged or appended yet."""
        return min(seen, self.layout.delay_width)

    def slot_counts(self, row: int, seen: int) -> torch.Tensor:
        """Slots each head of a row keeps ``[L, H]`` (long): its pages' slots plus, with delayed merging,
        the raw tokens of its window (they count as slots, as in :meth:`dmc.hf.cache.DMCCache.slot_counts`)."""
        return self.lens[:, row].long() + self.raw_held(seen)

    # ------------------------------------------------------------------ rows
    def open_row(self) -> int:
        """Take a sequence row and give each of its heads its first page (raises OutOfPages)."""
        if not self._free_rows:
            raise RuntimeError("no free sequence row (the scheduler admits at most max_seqs sequences)")
        if self.free_page_count() < self.layout.rows:
            raise OutOfPages(f"{self.layout.rows} pages needed to open a sequence, {self.free_page_count()} free")
        row = self._free_rows.pop()
        self.lens[:, row] = 0
        if self.layout.unbounded:
            self.ring[:, row] = 0
        if self.layout.ring_width:
            self.ring_kv[:, row] = 0
            self.ring_w[:, row] = 0
        if self.layout.delay_width:
            self.delay_kv[:, row] = 0
            self.delay_aw[:, row] = 0
            self.delay_rope[row] = 0
        self.page_table[:, row] = 0
        # The ready page of every head: the decode step's allocator does exactly this.
        self.allocate(torch.full((1,), row, dtype=torch.int32, device=self.device))  # no host-to-device copy
        return row

    def fork_row(self, src: int) -> int:
        """A new row holding a copy of row ``src``: the contents of its pages (in pages of its own: a merge rewrites
        a head's last slot in place, so rows cannot share pages), its slot counts, window state and delay ring.
        The prompt of several choices (``n``) is prefilled once and forked. Raises OutOfPages (one host sync)."""
        if not self._free_rows:
            raise RuntimeError("no free sequence row (the scheduler admits at most max_seqs sequences)")
        held = self.lens[:, src].long() // self.layout.page_size + 1  # [L, H]: up to the ready page
        mask = torch.arange(self.layout.pages_per_head, device=self.device) < held[..., None]
        count, top = int(held.sum()), self.free_page_count()
        if top < count:
            raise OutOfPages(f"forking a sequence needs {count} pages, {top} free")
        row = self._free_rows.pop()
        pages = self.free_pages[top - count:top]
        self.free_top -= count
        source = self.page_table[:, src][mask]
        self.k_pool[pages] = self.k_pool[source]
        self.v_pool[pages] = self.v_pool[source]
        table = torch.zeros_like(self.page_table[:, row])
        table[mask] = pages
        self.page_table[:, row] = table
        self.lens[:, row] = self.lens[:, src]
        for state, per_row in ((self.ring, self.layout.unbounded), (self.ring_kv, self.layout.ring_width),
                               (self.ring_w, self.layout.ring_width), (self.delay_kv, self.layout.delay_width),
                               (self.delay_aw, self.layout.delay_width)):
            if per_row:
                state[:, row] = state[:, src]
        if self.layout.delay_width:
            self.delay_rope[row] = self.delay_rope[src]
        return row

    def row_pages(self, row: int) -> int:
        """Pages a row holds: every head's up to its ready page (what :meth:`fork_row` copies; one host sync)."""
        return int((self.lens[:, row].long() // self.layout.page_size + 1).sum())

    def allocate(self, seq_ids: torch.Tensor) -> None:
        """Top up pages after a decode step of rows ``seq_ids`` (-1: padding): :func:`allocate_pages`."""
        allocate_pages(self.lens, self.page_table, seq_ids, self.free_pages, self.free_top, self.layout.page_size)

    def close_row(self, row: int) -> None:
        """Give a finished (or preempted) sequence's pages back; the row becomes free."""
        held = self.lens[:, row].long() // self.layout.page_size + 1  # [L, H]
        m = torch.arange(self.layout.pages_per_head, device=self.device)
        self._give_back(self.page_table[:, row][m < held[..., None]])
        self.page_table[:, row] = 0
        self.lens[:, row] = 0
        self._free_rows.append(row)

    def step_worst_case(self, rows: list[int], slot_cap: int | None = None) -> int:
        """Pages the next decode step of these sequence rows may take: one for every head whose
        current page would fill with an append (one host sync). A head at ``slot_cap`` (an eviction
        budget) takes none: the step evicts back to the cap before pages are topped up."""
        lens = self.lens[:, torch.tensor(rows, device=self.device)]
        fills = (lens % self.layout.page_size) == self.layout.page_size - 1
        if slot_cap is not None:
            fills &= lens < slot_cap
        return int(fills.sum())

    def chunk_pages(self, tokens: int) -> int:
        """Pages a prefill chunk of ``tokens`` may take if nothing merges (:func:`dmc.engine.pages.chunk_pages`)."""
        return chunk_pages(self.layout.rows, self.layout.page_size, tokens)

    def check_room(self, sizes: list[int]) -> None:
        """Raise OutOfPages unless one forward's prefill chunks of ``sizes`` tokens fit even if nothing merges (one
        host sync per forward; the chunks then allocate on the device): :func:`dmc.engine.pages.ensure_room`."""
        ensure_room(self.free_page_count(), self.layout.rows, self.layout.page_size, sizes)

    def grow(self, layer: int, row: int | torch.Tensor, new_lens: torch.Tensor) -> None:
        """Allocate the pages that let the heads of a row hold ``new_lens`` [H] slots (keeping the
        ready page), on the device: no host sync (the caller checked the room with check_room). ``row`` may
        be a tensor of rows ``[S]`` with ``new_lens`` ``[S, H]``: the pages each would take, in that order."""
        self._take_pages((layer, row), new_lens)

    def _take_pages(self, index: tuple, slots: torch.Tensor) -> None:
        """Pop, on the device, the pages the heads ``self.lens[index]`` lack to hold ``slots`` slots each (which
        broadcasts against them), the ready page kept, into their page-table entries, in the heads' order."""
        p = self.layout.page_size
        have = self.lens[index].long() // p + 1
        want = slots.long() // p + 1
        m = torch.arange(self.layout.pages_per_head, device=self.device)
        needed = (m >= have[..., None]) & (m < want[..., None])
        order = needed.flatten().long().cumsum(0) - 1
        take = (self.free_top - 1 - order).clamp(0, self.free_pages.shape[0] - 1)
        table = self.page_table[index]
        self.page_table[index] = torch.where(needed, self.free_pages[take].view_as(table), table)
        self.free_top -= needed.sum()

    def _give_back(self, pages: torch.Tensor) -> None:
        """Push ``pages`` (page ids, one host sync for the stack's size) back on the free stack."""
        top = self.free_page_count()
        self.free_pages[top:top + pages.numel()] = pages
        self.free_top += pages.numel()

    def reserve(self, rows: torch.Tensor, slots: torch.Tensor) -> None:
        """Give the heads of ``rows`` ``[S]`` in every layer the pages for ``slots`` ``[S]`` slots each (beyond those
        they hold, keeping the ready page), on the device, in one pass over all the layers: a batched prefill of
        first chunks takes its worst case (every token a slot) before its layers run, instead of growing in each
        layer (about twenty host launches a layer). :meth:`trim` gives back what the layers did not fill."""
        self._take_pages((slice(None), rows), slots[None, :, None])

    def trim(self, rows: torch.Tensor) -> None:
        """Push back on the free stack every page of ``rows`` ``[S]`` (all layers) beyond each head's ready page
        ``lens // P``: what :meth:`reserve` took and the slots did not fill. One host sync (the forward's end, which
        the host is about to wait for anyway)."""
        p = self.layout.page_size
        table = self.page_table[:, rows]
        keep = self.lens[:, rows].long() // p + 1
        m = torch.arange(self.layout.pages_per_head, device=self.device)
        freed = (m >= keep[..., None]) & (table != 0)
        self._give_back(table[freed])
        self.page_table[:, rows] = table.masked_fill(freed, 0)

    def shrink(self, layer: int, row: int, new_lens: torch.Tensor) -> None:
        """Cut the heads of a row to ``new_lens`` [H] slots (the first ones stay) and push the pages
        beyond the ready page ``new_lens // P`` back on the free stack: the inverse of :meth:`grow`,
        for eviction after a prefill (one host sync)."""
        p = self.layout.page_size
        have = self.lens[layer, row].long() // p + 1
        keep = new_lens.long() // p + 1
        m = torch.arange(self.layout.pages_per_head, device=self.device)
        table = self.page_table[layer, row]
        freed = (m >= keep[:, None]) & (m < have[:, None])  # [H, M]
        self._give_back(table[freed])
        table.masked_fill_(freed, 0)
        self.lens[layer, row] = new_lens.to(torch.int32)

    # ------------------------------------------------------------------ window state
    def window_prefix(self, layer: int, row: int, seen: int) -> torch.Tensor:
        """A row's window state as chronological weighted terms ``[H, R, 2D + 1]`` fp32 (oldest
        first), or its running sums ``[H, 1, 2D + 1]`` for an unbounded window."""
        if self.layout.unbounded:
            return self.ring[layer, row]
        terms = ring_terms(self.ring_kv[layer, row], self.ring_w[layer, row])
        return terms.roll(-(seen % terms.shape[1]), dims=1)

    def set_window_state(self, layer: int, row: int, seen: int, state: torch.Tensor) -> None:
        """Store a chronological window state ``[H, R, 2D + 1]`` (weighted terms) after ``seen``
        tokens. Raw k, v come back as terms / ω, exact once cast to the cache dtype (bf16)."""
        if self.layout.vanilla:
            return
        if self.layout.unbounded:
            self.ring[layer, row] = state
            return
        self._store_ring(layer, row, state.roll(seen % state.shape[1], dims=1))

    def set_window_states(self, layer: int, rows: torch.Tensor, roll_index: torch.Tensor, state: torch.Tensor) -> None:
        """:meth:`set_window_state` for several rows ``[S]`` at once: ``state`` ``[S, H, R, 2D + 1]``, each
        row's ring entry j taking its entry ``roll_index[s, j]`` (the roll by its tokens seen)."""
        if self.layout.vanilla:
            return
        if self.layout.unbounded:
            self.ring[layer, rows] = state
            return
        index = roll_index[:, None, :, None].expand(-1, state.shape[1], -1, state.shape[-1])
        self._store_ring(layer, rows, state.gather(2, index))

    def _store_ring(self, layer: int, row, state: torch.Tensor) -> None:
        """The ring entries of ``row`` (an int or rows ``[S]``): weights and raw k, v (terms / ω)."""
        weight = state[..., -1]
        self.ring_w[layer, row] = weight
        self.ring_kv[layer, row] = (state[..., :-1] / torch.where(weight > 0, weight, 1.0)[..., None]).to(self.dtype)


class SequenceView(DMCCache):
    """One sequence of the paged cache seen through the HF model's cache interface, so that
    prefill runs the model's own DMC attention (exact chunked prefill, spec §7.4) and writes
    the slots straight into pages."""

    def __init__(self, cache: PagedKVCache, row: int, seen: int,
                 layer_factory: Callable[[int], SlotCacheLayer] | None = None) -> None:
        """``layer_factory(layer)`` builds each layer's view (default :class:`_LayerView`)."""
        if layer_factory is None:
            def layer_factory(layer: int) -> SlotCacheLayer:
                return _LayerView(cache, row, layer, seen)
        super().__init__(num_layers=cache.layout.num_layers, window=cache.layout.window, layer_factory=layer_factory)
        self.positions = torch.full((1,), seen, device=cache.device)  # a fill, not a copy: no host sync
        self.seen_tokens = seen


class _LayerView(SlotCacheLayer):
    """One layer of one sequence of the paged cache, as :class:`~dmc.hf.cache.SlotCacheLayer`."""

    def __init__(self, cache: PagedKVCache, row: int, layer: int, seen: int) -> None:
        self.cache, self.row, self.layer, self.seen = cache, row, layer, seen
        self.window = cache.layout.window
        # Delayed merging: of the ``seen`` tokens, the last ``held`` are raw (the delay ring) and the
        # ``committed`` ones went through DMC (the pages and the window state). Without it, committed = seen.
        self.held = cache.raw_held(seen)
        self.committed = seen - self.held
        self._pending: dict[str, torch.Tensor] | None = None  # the ring gathered once (the attention reads it often)

    @property
    def pending(self) -> dict[str, torch.Tensor] | None:
        """The delay ring as :attr:`dmc.hf.cache.DMCCacheLayer.pending` (batch of 1, oldest first; names
        and token dims in :data:`dmc.hf.cache.PENDING_DIMS`), or None when it holds nothing."""
        if self.held == 0:
            return None
        if self._pending is None:
            self._pending = self._gather_pending()
        return self._pending

    def _gather_pending(self) -> dict[str, torch.Tensor]:
        cache, d = self.cache, self.cache.layout.head_dim
        index = torch.arange(self.committed, self.committed + self.held, device=cache.device) % cache.layout.delay_width
        kv = cache.delay_kv[self.layer, self.row][:, index][None]  # [1, H, m, 2D]
        aw = cache.delay_aw[self.layer, self.row][:, index][None]  # [1, H, m, 2]
        rope = cache.delay_rope[self.row][index][None]  # [1, m, 2, D]
        return {"k": kv[..., :d], "v": kv[..., d:], "alpha": aw[..., 0], "importance": aw[..., 1],
                "valid": torch.ones(1, self.held, dtype=torch.bool, device=cache.device),
                "cos": rope[:, :, 0], "sin": rope[:, :, 1]}

    @pending.setter
    def pending(self, value: dict[str, torch.Tensor]) -> None:
        """Store the window left after a chunk: its tokens follow the ``committed`` ones (the DMC attention
        sets it after :meth:`commit`); a batch of 1 without padding (the engine never pads a prefill)."""
        cache = self.cache
        held = value["valid"].shape[1]
        index = torch.arange(self.committed, self.committed + held, device=cache.device) % cache.layout.delay_width
        cache.delay_kv[self.layer, self.row][:, index] = torch.cat([value["k"][0], value["v"][0]], -1).to(cache.dtype)
        cache.delay_aw[self.layer, self.row][:, index] = torch.stack(
            [value["alpha"][0], value["importance"][0]], -1).float()
        if self.layer == cache.layout.num_layers - 1:  # one table per row: earlier layers of this forward read it
            cache.delay_rope[self.row][index] = torch.stack([value["cos"][0], value["sin"][0]], 1).to(cache.dtype)
        self.held, self._pending = held, None

    def window_prefix(self, terms: torch.Tensor) -> torch.Tensor:
        if self.cache.layout.vanilla or self.committed == 0:
            return terms[..., :0, :]
        return self.cache.window_prefix(self.layer, self.row, self.committed)[None]

    def slot_lengths(self) -> torch.Tensor:
        return self.cache.lens[self.layer, self.row].long()[None]  # [1, H]

    def visible_slots(self, alpha: torch.Tensor, valid: torch.Tensor, like: torch.Tensor):
        cache, lens = self.cache, self.slot_lengths()
        # First chunk: no slot yet. Known on the host (a row's first token always appends, so no slot
        # means nothing committed): no sync, so the host can queue the layers ahead of the GPU.
        if self.committed == 0:
            empty = like.new_zeros(1, lens.shape[1], 0, like.shape[-1])
            return empty, empty, torch.zeros(1, lens.shape[1], 0, dtype=torch.bool, device=like.device)
        row = torch.tensor([self.row], dtype=torch.int32, device=like.device)
        keys, values, _ = gather_slots(cache.k_pool, cache.v_pool, cache.page_table, cache.lens, row, self.layer,
                                       cache.layout.page_size)
        slots = torch.arange(keys.shape[-2], device=like.device)
        base = lens - core.merges_into_last(alpha[..., 0], lens, valid[:, 0]).long()
        keys = dequantise(keys, head_scales(cache.k_scale, self.layer)).to(like.dtype)  # fp8: the stored values
        values = dequantise(values, head_scales(cache.v_scale, self.layer)).to(like.dtype)
        return keys, values, slots[None, None, :] < base[..., None]

    def commit(self, alpha, valid, k_bar, v_bar, prefix, terms, sums) -> None:
        """Scatter the chunk's kept states into pages (overwrite on merge, new slot on append)."""
        cache, p = self.cache, self.cache.layout.page_size
        n = alpha.shape[-1]
        _, kept, slot, new_lens = core.slot_writes(alpha, self.slot_lengths())
        kept, slot, new_lens = kept[0], slot[0].clamp_min(0), new_lens[0]  # [H, n], [H, n], [H]
        cache.grow(self.layer, self.row, new_lens)
        # Every token is scattered (a fixed-size write, no host sync): one that does not end a slot writes its
        # slot with the state of the token that does (the same bytes, so the duplicate writes agree). Sending
        # those to one dummy address instead piled ~3/4 of the chunk's writes onto it at CR 4 (the stores
        # serialise: most of the prefill's GPU time). Tokens with no slot end after them (trailing padding, never
        # in the engine) go to the null page (never read).
        end, found = core.slot_ends(kept)
        slot = slot.gather(1, end)
        page = cache.page_table[self.layer, self.row].gather(1, slot // p).long()
        flat = torch.where(found, page * p + slot % p, 0).flatten()
        rows = end[..., None].expand(-1, -1, k_bar.shape[-1])
        # fp8 pools: quantised as the decode kernels do (the window state below stays exact).
        cache.store_states(self.layer, flat, k_bar[0].gather(1, rows), v_bar[0].gather(1, rows))
        cache.lens[self.layer, self.row] = new_lens.to(torch.int32)
        if not cache.layout.vanilla:
            width = cache.layout.ring_width
            state = core.next_window_state(alpha, terms, self.window, _pad_prefix(prefix, width), sums)
            cache.set_window_state(self.layer, self.row, self.committed + n, state[0])
        self.committed += n


def window_tails(packed, alpha, importance, k, v, sums, window: int | None):
    """The window state each of several packed first chunks leaves, as :func:`dmc.core.next_window_state` takes it:
    ``(tail_alpha, tail_terms, tail_sums)``, its last W-1 terms (``packed.tail_index`` ``[S, W-1]`` into the tokens,
    ``packed.tail_real`` whether each lies in the chunk: α = 1 and terms 0 before it, the zero prefix of a first
    chunk), or for an unbounded window the running sums at its last token (``packed.last`` ``[S]``)."""
    index, real = packed.tail_index, packed.tail_real
    tail_alpha = alpha[..., index].masked_fill(~real, 1.0)
    tail_terms = core.weighted_terms(importance[..., index], k[..., index, :], v[..., index, :]) * real[..., None]
    tail_sums = None if sums is None or window is not None else sums[..., packed.last, None, :]
    return tail_alpha, tail_terms, tail_sums


def commit_packed(views: list[_LayerView], packed, alpha, k_bar, v_bar, importance, k, v, sums) -> None:
    """:meth:`_LayerView.commit` of several sequences' first chunks at once (one layer; the views' rows are
    empty), with a fixed number of tensor ops whatever the number of chunks: ``packed`` is the forward's
    :class:`dmc.hf.attention.PackedChunks`, ``alpha``, ``importance`` ``[1, H, n]``, the states ``k_bar``, ``v_bar``
    and the pre-RoPE ``k`` (channel D-1 zeroed), ``v`` ``[1, H, n, D]`` of all their tokens back to back, ``sums``
    their pooled sums (None on the fused pooling path; an unbounded window's state). The same slots, pages (taken
    in the chunks' order) and window states as committing each chunk alone: a chunk's first token appends, so the
    kept tokens (:func:`dmc.core.ends_slot`) and the slot ends never cross from one chunk into the next.

    Three forms: without merging (vanilla, pages reserved) only the writes; where the cache runs Triton
    (:attr:`PagedKVCache.fused_commit`) one kernel per layer (:func:`dmc.kernels.triton_commit.commit_first_chunks`);
    else these tensor ops, its twin."""
    cache, layer = views[0].cache, views[0].layer
    p, d = cache.layout.page_size, k_bar.shape[-1]
    if packed.vanilla_slots is not None:  # every token its own slot, the pages reserved: the writes only
        flat = packed.vanilla_slots[layer]
        cache.store_states(layer, flat, k_bar[0], v_bar[0])
        cache.lens[layer, packed.rows] = packed.vanilla_lens
    elif packed.reserved and cache.fused_commit():
        from ..kernels.triton_commit import commit_first_chunks  # here: triton is optional on a CPU
        commit_first_chunks(cache, layer, packed, alpha[0], k_bar[0], v_bar[0], importance[0], k[0], v[0])
    else:
        _commit_packed_ops(cache, layer, packed, alpha, k_bar, v_bar, importance, k, v, sums, p, d)
    for view, (lo, hi) in zip(views, packed.bounds):
        view.committed += hi - lo


def _commit_packed_ops(cache, layer, packed, alpha, k_bar, v_bar, importance, k, v, sums, p, d) -> None:
    """:func:`commit_packed` in tensor ops (the twin of the Triton kernel)."""
    kept = core.ends_slot(alpha[0])  # [H, n]
    count = kept.long().cumsum(-1)
    before = count.index_select(1, packed.first) - kept.index_select(1, packed.first).long()  # [H, S]
    slot = count - 1 - before.index_select(1, packed.segment_of_token)  # a kept token's slot in its row
    new_lens = count.index_select(1, packed.last) - before  # [H, S]
    if not packed.reserved:
        cache.grow(layer, packed.rows, new_lens.T)
    # As in _LayerView.commit: every token writes its slot with the state of the token that ends it.
    end, _ = core.slot_ends(kept)  # each chunk's last token ends a slot: the end never leaves the chunk
    slot = slot.gather(1, end)
    heads = torch.arange(slot.shape[0], device=slot.device)[:, None]
    page = cache.page_table[layer][packed.row_of_token[None, :], heads, slot // p].long()
    flat = (page * p + slot % p).flatten()
    rows = end[..., None].expand(-1, -1, d)
    cache.store_states(layer, flat, k_bar[0].gather(1, rows), v_bar[0].gather(1, rows))
    cache.lens[layer, packed.rows] = new_lens.T.to(torch.int32)
    if not cache.layout.vanilla:
        window = cache.layout.window
        tail_alpha, tail_terms, tail_sums = window_tails(packed, alpha, importance, k, v, sums, window)
        state = core.next_window_state(tail_alpha, tail_terms, window, tail_terms[..., :0, :], tail_sums)
        cache.set_window_states(layer, packed.rows, packed.roll_index, state[0].transpose(0, 1))


def reserve_packed(cache: PagedKVCache, packed) -> None:
    """Take the pages of a batched prefill's first chunks for all the layers at once, before they run (the worst
    case: every token a slot; :meth:`PagedKVCache.reserve`), so that each layer's :func:`commit_packed` only writes;
    :meth:`PagedKVCache.trim` gives back the rest after the forward. Without merging (vanilla) the slots are the
    tokens, so their pool addresses are computed here once for every layer (``packed.vanilla_slots``)."""
    packed.reserved = True
    if packed.leaving is not None:  # delayed merging: the tokens that leave the window commit within the same pages
        packed.leaving.reserved = True
    cache.reserve(packed.rows, packed.chunk_lens)
    if cache.layout.vanilla:
        p = cache.layout.page_size
        slot = packed.position_in_chunk  # [n]: a first chunk's token t is slot t
        # (index tensors apart: their dimension comes first) [n, L, H] -> [L, H * n], head-major as store_states takes it
        page = cache.page_table[:, packed.row_of_token, :, slot // p].long()
        packed.vanilla_slots = (page * p + (slot % p)[:, None, None]).permute(1, 2, 0).flatten(1)
        packed.vanilla_lens = packed.chunk_lens[:, None].to(torch.int32)


def hold_packed(views: list[_LayerView], packed, k, v, alpha, importance, cos, sin) -> None:
    """The delay ring after several sequences' first chunks (one layer, delayed merging): what
    :attr:`_LayerView.pending`'s setter stores after each chunk alone, its last min(n, w) tokens raw (token t at
    ring index t % w), in a fixed number of tensor ops whatever the number of chunks. ``packed`` is the forward's
    :class:`dmc.hf.attention.PackedChunks` (``hold_index``: those tokens among the packed ones, ``hold_rows``,
    ``hold_slots``: where each goes), ``k`` (channel D-1 zeroed, before RoPE) and ``v`` ``[1, H, n, D]``, ``alpha``,
    ``importance`` ``[1, H, n]``, ``cos``, ``sin`` ``[1, n, D]`` of all the packed tokens. Each (row, ring index)
    is written once: a chunk's raw tokens are at most w consecutive positions."""
    cache, layer = views[0].cache, views[0].layer
    index, rows, slots = packed.hold_index, packed.hold_rows, packed.hold_slots
    # [H, p, ·] -> [p, H, ·]: a slice between the two index tensors puts their dimension first
    cache.delay_kv[layer][rows, :, slots] = torch.cat([k[0], v[0]], -1)[:, index].transpose(0, 1).to(cache.dtype)
    cache.delay_aw[layer][rows, :, slots] = torch.stack([alpha[0], importance[0]], -1)[:, index].transpose(0, 1).float()
    if layer == cache.layout.num_layers - 1:  # one table per row, as the setter writes it
        cache.delay_rope[rows, slots] = torch.stack([cos[0, index], sin[0, index]], 1).to(cache.dtype)
    for view, held in zip(views, packed.held):
        view.held, view._pending = held, None


def _pad_prefix(prefix: torch.Tensor, width: int) -> torch.Tensor:
    """An empty prefix (first chunk) as ``width`` zero entries, so that the state has the ring's width."""
    if prefix.shape[-2] == width:
        return prefix
    return prefix.new_zeros(*prefix.shape[:-2], width, prefix.shape[-1])
