"""The Triton kernels against their PyTorch twins (dmc.kernels.reference, built from dmc.core).

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1), set only while this
module imports and runs them, so no other test module sees it.
"""

import contextlib
import dataclasses

import pytest
import torch

from dmc.engine.cache import allocate_pages as allocate_pages_ref
from dmc.engine.runner import decode_ops as get_kernels
from dmc.kernels.reference import decode_update_ref, paged_decode_attention_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
P = 16  # page size
LAYERS, HEADS = 2, 2
PAD_ROW = -1


@contextlib.contextmanager
def interpreter():
    """Run Triton kernels in its interpreter on a machine without CUDA, for as long as this module needs
    it; everything is restored afterwards, so other test modules see no trace of it.

    - TRITON_INTERPRET=1: triton reads it when a kernel is defined and while it runs.
    - triton.language's own @jit helpers (tl.sum, tl.sigmoid, ...) were defined when triton was first
      imported (by transformers, from conftest, before this module could set the variable), as compiled
      functions that an interpreted kernel cannot call: swap in interpreted twins.
    - The upstream fix for triton-lang/triton#9171: the 3.6 interpreter turns a loop bound read from
      memory into an int with ``int(array)``, which numpy >= 2.4 refuses for its one-element arrays.
    """
    if DEVICE == "cuda":
        yield
        return
    import triton.language as tl
    from triton.runtime import interpreter as interp
    from triton.runtime.jit import JITFunction

    patch_tensor = interp._patch_lang_tensor

    def patch_tensor_fixed(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    twins = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        for module in (tl, tl.standard):
            for name, value in list(vars(module).items()):
                if isinstance(value, JITFunction):
                    patch.setattr(module, name, twins.setdefault(id(value), interp.InterpretedFunction(value.fn)))
        patch.setattr(interp, "_patch_lang_tensor", patch_tensor_fixed)
        yield


pytest.importorskip("triton")
with interpreter():
    from dmc.kernels import triton_kernels


@pytest.fixture(autouse=True, scope="module")
def _interpreted():
    with interpreter():
        yield


# --------------------------------------------------------------------------- cache fixtures
@dataclasses.dataclass
class Cache:
    k_pool: torch.Tensor
    v_pool: torch.Tensor
    page_table: torch.Tensor
    lens: torch.Tensor
    ring: torch.Tensor
    ring_kv: torch.Tensor
    ring_w: torch.Tensor
    free_pages: torch.Tensor
    free_top: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The fields themselves (``dataclasses.astuple`` would copy them)."""
        return tuple(getattr(self, field.name) for field in dataclasses.fields(self))

    def clone(self) -> "Cache":
        return Cache(*(t.clone() for t in self.tensors()))

    def assert_close(self, other: "Cache", **tol) -> None:
        assert torch.equal(self.lens, other.lens)
        assert torch.equal(self.page_table, other.page_table)
        torch.testing.assert_close(self.ring, other.ring, rtol=1e-5, atol=1e-5)
        assert torch.equal(self.ring_kv, other.ring_kv)  # raw keys/values: copied, never rounded
        torch.testing.assert_close(self.ring_w, other.ring_w, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(self.k_pool, other.k_pool, **tol)
        torch.testing.assert_close(self.v_pool, other.v_pool, **tol)


def ragged_lengths(gen: torch.Generator, rows: int, choices: list[int]) -> torch.Tensor:
    """Slot counts ``[L, rows + 1, H]``, per head from ``choices``; the last sequence row is empty (a new
    sequence) and the last row is the cache's scratch row."""
    choices = torch.tensor(choices)
    lens = choices[torch.randint(len(choices), (LAYERS, rows + 1, HEADS), generator=gen)]
    lens[:, rows - 1:] = 0
    return lens.int()


def make_cache(lens: torch.Tensor, d: int, ring_width: int, dtype: torch.dtype, gen: torch.Generator,
               num_pages: int = 256, max_pages: int = 8) -> Cache:
    """Random pools and window rings. Page 0 is the null page (unallocated table entries); each head
    holds pages 0..lens//P (the allocator's invariant) taken in a shuffled order; the free stack holds
    the other pages below ``free_top``."""
    order = (torch.randperm(num_pages - 1, generator=gen) + 1).int()
    table = torch.zeros(*lens.shape, max_pages, dtype=torch.int32)
    used = 0
    for index in torch.cartesian_prod(*(torch.arange(n) for n in lens.shape)).tolist():
        count = int(lens[tuple(index)]) // P + 1
        table[tuple(index)][:count] = order[used:used + count]
        used += count
    weight = torch.rand(*lens.shape, ring_width, 1, generator=gen) * 0.9 + 0.1  # ω of earlier tokens
    if ring_width > 1:
        weight[..., :1, :] = 0  # one entry outside the open group
    terms = torch.randn(*lens.shape, ring_width, 2 * d, generator=gen).to(dtype)
    cache = Cache(k_pool=torch.randn(num_pages, P, d, generator=gen).to(dtype),
                  v_pool=torch.randn(num_pages, P, d, generator=gen).to(dtype),
                  page_table=table, lens=lens.clone(), ring=torch.cat([weight * terms.float(), weight], -1)[..., :1, :],
                  ring_kv=terms, ring_w=weight[..., 0],
                  free_pages=torch.cat([order[used:], order[:used]]), free_top=torch.tensor([num_pages - 1 - used]))
    return Cache(*(t.to(DEVICE) for t in cache.tensors()))


def batch_rows(rows: int) -> torch.Tensor:
    """A shuffled batch of every sequence row plus one padding row."""
    return torch.tensor([3, 0, PAD_ROW, rows - 1, 2, 1], dtype=torch.int32)


def rope_tables(pos: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HF-layout RoPE tables at each row's position ``[B, D]``."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    angles = pos.float()[:, None] * inv_freq[None]
    emb = torch.cat([angles, angles], -1)
    return emb.cos(), emb.sin()


def projections(gen: torch.Generator, b: int, groups: int, d: int, dtype: torch.dtype):
    """q, k, v as strided views of one fused projection output; q[D-1] and k[D-1] spread so that
    about 45% of the tokens merge (init_offset 0.5)."""
    hq = HEADS * groups
    qkv = torch.randn(b, hq + 2 * HEADS, d, generator=gen)
    qkv[:, :hq, -1] *= 2.0
    qkv[:, hq:hq + HEADS, -1] *= 3.0
    qkv = qkv.to(device=DEVICE, dtype=dtype).view(b, -1)
    return (qkv[:, :hq * d].view(b, hq, d), qkv[:, hq * d:(hq + HEADS) * d].view(b, HEADS, d),
            qkv[:, (hq + HEADS) * d:].view(b, HEADS, d))


def tolerance(dtype: torch.dtype) -> dict:
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)


# --------------------------------------------------------------------------- decode update
@pytest.mark.parametrize("d, groups, window, vanilla, forced_period, dtype", [
    pytest.param(16, 1, 4, False, 0, torch.float32, id="mha-window4"),
    pytest.param(32, 2, None, False, 0, torch.float32, id="gqa-unbounded"),
    pytest.param(16, 2, 12, False, 0, torch.float32, id="gqa-window12"),
    pytest.param(32, 1, 4, True, 0, torch.float32, id="vanilla"),
    pytest.param(16, 2, 4, False, 3, torch.float32, id="forced-period"),
    pytest.param(32, 2, 4, False, 0, torch.bfloat16, id="bf16"),
])
def test_decode_update_matches_twin(d, groups, window, vanilla, forced_period, dtype):
    """Four decode steps (alternating layers) over ragged heads: outputs and the whole cache agree."""
    gen = torch.Generator().manual_seed(d + groups + forced_period)
    rows = 5
    seq_ids = batch_rows(rows)
    lens = ragged_lengths(gen, rows, [0, 1, 15, 16, 17, 40])  # + 4 steps: pages 0..2 of 8
    ring_width = 1 if window is None else window - 1
    twin = make_cache(lens, d, ring_width, dtype, gen)
    cache = twin.clone()
    # Positions: at least the slots held; the empty sequence (row rows-1) starts at 0 (forced append).
    pos = lens.amax(dim=(0, 2))[seq_ids.clamp_min(0).long()] + torch.randint(0, 3, (len(seq_ids),), generator=gen)
    pos[seq_ids == rows - 1] = 0
    pos = pos.int()
    active = seq_ids >= 0
    options = dict(init_offset=0.5, window=window, vanilla=vanilla, page_size=P, forced_period=forced_period)
    alphas, positions = [], []
    for step in range(4):
        layer = step % LAYERS
        q, k, v = projections(gen, len(seq_ids), groups, d, dtype)
        cos, sin = (t.to(device=DEVICE, dtype=dtype) for t in rope_tables(pos, d))
        batch = (q, k, v, cos, sin, seq_ids.to(DEVICE), pos.to(DEVICE), layer)
        q_twin, alpha_twin = decode_update_ref(*batch, *twin.tensors()[:7], **options)
        q_rot, alpha = triton_kernels.decode_update(*batch, *cache.tensors()[:7], **options)
        assert torch.equal(alpha, alpha_twin)
        torch.testing.assert_close(q_rot, q_twin, **tolerance(dtype))
        cache.assert_close(twin, **tolerance(dtype))
        for c in (twin, cache):
            allocate_pages_ref(c.lens, c.page_table, seq_ids.to(DEVICE), c.free_pages, c.free_top, P)
        alphas.append(alpha.cpu())
        positions.append(pos.clone())
        pos += 1

    assert not torch.equal(cache.lens.cpu(), lens)  # the steps did write the cache
    alphas = torch.stack(alphas)  # [steps, B, H]
    assert (alphas[:, ~active] == 0).all()
    live = alphas[:, active]
    if vanilla:
        assert (live == 0).all()
    elif forced_period:
        expected = (torch.stack(positions) % forced_period != 0).float()[:, active, None]
        assert torch.equal(live, expected.expand_as(live))
    else:
        assert (live == 1).any() and (live == 0).any()


# --------------------------------------------------------------------------- paged attention
BF16_DOT = pytest.mark.skipif(DEVICE == "cpu", reason="Triton's interpreter multiplies bf16 dot operands as integers")


@pytest.mark.parametrize("d, groups, dtype, num_splits, use_dot", [
    pytest.param(16, 1, torch.float32, None, None, id="mha"),
    pytest.param(16, 1, torch.float32, 2, False, id="mha-cuda-core-sums"),
    pytest.param(16, 1, torch.float32, 2, "defer", id="mha-cuda-core-deferred-sums"),
    pytest.param(32, 1, torch.bfloat16, 1, "defer", id="mha-bf16-deferred-sums"),
    pytest.param(32, 2, torch.float32, 1, None, id="gqa-one-split"),
    pytest.param(16, 2, torch.float32, 3, None, id="gqa-three-splits"),
    pytest.param(32, 1, torch.bfloat16, 2, False, id="mha-bf16-sums"),
    pytest.param(32, 1, torch.bfloat16, 2, None, id="mha-bf16", marks=BF16_DOT),
    pytest.param(32, 2, torch.bfloat16, None, None, id="gqa-bf16", marks=BF16_DOT),
])
def test_paged_decode_attention_matches_twin(d, groups, dtype, num_splits, use_dot):
    """Ragged heads up to 8 pages (several iterations and splits), a padding row, an empty sequence."""
    gen = torch.Generator().manual_seed(10 * d + groups)
    rows = 5
    seq_ids = batch_rows(rows)
    cache = make_cache(ragged_lengths(gen, rows, [0, 1, 15, 16, 17, 40, 100, 127]), d, 1, dtype, gen)
    q = torch.randn(len(seq_ids), HEADS * groups, d, generator=gen).to(device=DEVICE, dtype=dtype)
    layer = 1
    args = (q, cache.k_pool, cache.v_pool, cache.page_table, cache.lens, seq_ids.to(DEVICE), layer, d ** -0.5, P)
    expected = paged_decode_attention_ref(*args)
    sums = dict(use_dot=False, defer_sums=True) if use_dot == "defer" else dict(use_dot=use_dot, defer_sums=False)
    out = triton_kernels.paged_decode_attention(*args, num_splits=num_splits, **sums)
    torch.testing.assert_close(out, expected, **tolerance(dtype))
    assert (out[seq_ids == PAD_ROW] == 0).all()  # the padding row
    assert (out[seq_ids == rows - 1] == 0).all()  # a sequence with no slot yet


def test_paged_decode_attention_sums_refuse_gqa():
    gen = torch.Generator().manual_seed(0)
    cache = make_cache(ragged_lengths(gen, 2, [3, 20]), 16, 1, torch.float32, gen)
    q = torch.randn(3, HEADS * 2, 16, generator=gen).to(DEVICE)
    with pytest.raises(ValueError, match="one query per KV head"):
        triton_kernels.paged_decode_attention(q, cache.k_pool, cache.v_pool, cache.page_table, cache.lens,
                                              batch_rows(2).to(DEVICE), 1, 0.25, P, use_dot=False)


def test_get_kernels_dispatch(monkeypatch):
    monkeypatch.delenv("DMC_FORCE_TRITON", raising=False)
    kernels = get_kernels("cpu")
    assert kernels.decode_update is decode_update_ref
    assert kernels.paged_decode_attention is paged_decode_attention_ref
    monkeypatch.setenv("DMC_FORCE_TRITON", "1")
    kernels = get_kernels("cpu")
    assert kernels.decode_update is triton_kernels.decode_update
    assert kernels.paged_decode_attention is triton_kernels.paged_decode_attention
    assert kernels.allocate_pages is allocate_pages_ref


# --------------------------------------------------------------------------- prefill pooling
@pytest.mark.parametrize("window, prefix_len, dtype", [
    pytest.param(4, 0, torch.float32, id="w4-first-chunk"),
    pytest.param(4, 3, torch.float32, id="w4-with-prefix"),
    pytest.param(12, 11, torch.float32, id="w12-with-prefix"),
    pytest.param(12, 0, torch.bfloat16, id="w12-bf16"),
])
def test_chunk_states_matches_twin(window, prefix_len, dtype):
    """Prefill pooling: merges across block boundaries and into the prefix, padding (ω = 0, α = 1)."""
    from dmc.kernels.reference import chunk_states_ref
    gen = torch.Generator().manual_seed(window + prefix_len)
    b, h, n, d = 2, 3, 45, 16
    k = torch.randn(b, n, h, d, generator=gen).transpose(1, 2)  # a strided view, like the model's
    k[..., -1] = 0
    v = torch.randn(b, n, h, d, generator=gen).transpose(1, 2)
    importance = torch.rand(b, h, n, generator=gen) + 0.1
    alpha = (torch.rand(b, h, n, generator=gen) < 0.6).float()
    importance[1, :, :5] = 0  # left padding of the second sequence
    alpha[1, :, :5] = 1
    if prefix_len == 0:
        alpha[:, :, 0] = 0
        alpha[1, :, 5] = 0
    prefix = torch.randn(b, h, prefix_len, 2 * d + 1, generator=gen).abs()
    pos = torch.arange(n, dtype=torch.float32)[:, None] * torch.linspace(0.01, 1, d // 2)[None, :]
    cos, sin = torch.cat([pos.cos()] * 2, -1)[None], torch.cat([pos.sin()] * 2, -1)[None]
    args = [x.to(DEVICE) for x in (k.to(dtype), v.to(dtype), importance, alpha, prefix, cos, sin)]
    expected = chunk_states_ref(*args, window)
    out = triton_kernels.chunk_states(*args, window, block_tokens=16)
    assert 0.3 < float(alpha.mean()) < 0.8
    for got, want in zip(out, expected):
        torch.testing.assert_close(got, want, **tolerance(dtype))
