"""core/native.py: the C top-k, compiled on first use, against torch.topk; its fallbacks."""

from __future__ import annotations

import ctypes
import math
import platform
from pathlib import Path

import pytest
import torch

from lmscope.core import native
from lmscope.dictionaries import select
from lmscope.dictionaries.select import native_top_k, top_k

needs_cc = pytest.mark.skipif(native.compiler() is None, reason="no C compiler on this machine (lmscope falls back)")


def _check_top_k(x: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor, k: int) -> None:
    """vals/idx are a valid top k of each row of x: k distinct positions whose values are torch.topk's values."""
    ref = x.topk(k, dim=1, sorted=True).values  # NaN sorts as the largest, as lmscope's contract says
    got = vals.sort(dim=1, descending=True).values
    assert torch.equal(got.nan_to_num(nan=7e30), ref.nan_to_num(nan=7e30))
    assert torch.equal(x.gather(1, idx).nan_to_num(nan=7e30), vals.nan_to_num(nan=7e30))
    assert all(len(set(r)) == k for r in idx.tolist())


def _cases() -> list[tuple[str, torch.Tensor, int]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for width in (1, 7, 31, 32, 33, 100, 513, 4608, 16389):
        for k in (1, 5, 16, 17, 32, 64, 129, 200):
            if k <= width:
                out.append((f"randn w{width} k{k}", torch.randn(9, width, generator=g), k))
    ties = torch.randint(-3, 4, (40, 1000), generator=g).float()  # few distinct values: ties at the k-th
    out.append(("ties", ties, 37))
    coarse = (torch.randn(64, 4608, generator=g) * 10).round() / 10  # some ties among a few hundred candidates
    out.append(("coarse ties", coarse, 32))
    out.append(("coarse ties k 100", coarse, 100))
    special = torch.randn(12, 700, generator=g)
    special[0, 5] = special[1, 600] = float("nan")
    special[2] = float("nan")
    special[3, :] = float("-inf")
    special[4, ::7] = float("inf")
    special[5] = 0.0
    special[6, :10] = float("-inf")
    special[7, 699] = 1e30
    out.append(("nan inf constant", special, 32))
    lane = torch.randn(5, 4608, generator=g) - 10  # every large value in one lane of the running maxima (64 lanes)
    lane[:, torch.arange(72) * 64 + 5] = 100 + torch.arange(72.0)
    lane[3, 6] = 150.0
    out.append(("one lane", lane, 32))
    out.append(("one lane k 72", lane, 72))
    return out


@needs_cc
@pytest.mark.parametrize(
    "flags",
    [("-O3", "-march=native", "-fopenmp"), ("-O3", "-march=native"), ("-O2",)],
    ids=["native-cpu-openmp", "native-cpu", "portable"],
)
def test_the_c_top_k_equals_torch_topk(flags: tuple[str, ...]) -> None:
    if "-fopenmp" in flags and not native._loaded_gomp():
        pytest.skip("torch here does not run on GNU OpenMP, so lmscope does not build the kernels with it")
    lib = native.build(flags)
    assert lib is not None, "the kernels did not compile with the machine's C compiler"
    for name, x, k in _cases():
        vals, idx = native_top_k(lib, x.contiguous(), k)
        try:
            _check_top_k(x, vals, idx, k)
        except AssertionError as exc:
            raise AssertionError(f"{name} ({flags}): {exc}") from None


@needs_cc
def test_both_paths_of_the_kernel_are_built_where_the_cpu_has_them() -> None:
    """The -march=native build takes the AVX-512 path on a CPU with it; the portable one never does."""
    portable = native.build(("-O2",))
    assert portable is not None and portable.lmscope_topk_simd() == 0
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if platform.machine() in ("x86_64", "AMD64") and " avx512f" in flags:
        lib = native.build()
        assert lib is not None and lib.lmscope_topk_simd() == 1


@needs_cc
def test_top_k_uses_the_kernel_and_its_gradient_is_torch_topks(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(300, 4608, generator=torch.Generator().manual_seed(1))
    calls: list[int] = []
    real = select.native_top_k

    def counting(lib: ctypes.CDLL, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(k)
        return real(lib, rows, k)

    monkeypatch.setattr(select, "native_top_k", counting)
    a = x.clone().requires_grad_()
    vals, idx = top_k(a, 32)
    assert calls == [32]
    _check_top_k(x, vals.detach(), idx, 32)
    (vals * torch.arange(32.0)).sum().backward()
    b = x.clone().requires_grad_()
    ref_vals, ref_idx = b.topk(32, dim=1, sorted=False)
    # the same weights on the same positions: order the reference like lmscope's result
    pos = {(r, c): j for r, row in enumerate(idx.tolist()) for j, c in enumerate(row)}
    weights = torch.tensor([[float(pos[(r, c)]) for c in row] for r, row in enumerate(ref_idx.tolist())])
    (ref_vals * weights).sum().backward()
    assert torch.equal(a.grad, b.grad)
    three = top_k(x.reshape(3, 100, 4608), 8)  # leading dimensions kept
    assert three[0].shape == (3, 100, 8) and three[1].shape == (3, 100, 8)


def test_switched_off_or_without_a_compiler_top_k_takes_the_torch_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    x = torch.randn(64, 4608, generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(select, "native_top_k", lambda *a: pytest.fail("the C kernel ran"))
    monkeypatch.setenv("LMSCOPE_NATIVE", "0")
    assert native.library() is None
    _check_top_k(x, *top_k(x, 32), 32)
    monkeypatch.setenv("LMSCOPE_NATIVE", "1")
    monkeypatch.setenv("LMSCOPE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "/bin/false")  # a "compiler" that always fails
    assert native.library() is None
    assert not list(tmp_path.rglob("*.so"))  # nothing half-built left behind
    _check_top_k(x, *top_k(x, 32), 32)


@needs_cc
def test_the_library_is_cached_per_machine_and_written_whole(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LMSCOPE_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_loaded", {})
    assert native.build(("-O1",)) is not None
    built = list((tmp_path / "native").glob("kernels-*.so"))
    assert len(built) == 1 and not [p for p in (tmp_path / "native").iterdir() if p not in built]
    monkeypatch.setattr(native, "_loaded", {})  # a new process: the cached file is what loads, nothing compiles
    with monkeypatch.context() as m:
        m.setattr(native.subprocess, "run", lambda *a, **k: pytest.fail("compiled again"))
        assert native.build(("-O1",)) is not None
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "_cpu_key", lambda: "another cpu")  # another CPU gets its own build
    assert native.build(("-O1",)) is not None
    assert len(list((tmp_path / "native").glob("kernels-*.so"))) == 2


@needs_cc
def test_the_counting_sort_of_the_backward_equals_the_stable_argsort(monkeypatch: pytest.MonkeyPatch) -> None:
    from lmscope.dictionaries.sparse_decode import _ByLatent

    idx = torch.randint(0, 300, (500, 7), generator=torch.Generator().manual_seed(3))
    idx[:50, 0] = 5  # a latent many tokens share
    fast = _ByLatent(idx, 300)
    monkeypatch.setenv("LMSCOPE_NATIVE", "0")
    slow = _ByLatent(idx, 300)
    for name in ("order", "crow", "tokens"):
        assert torch.equal(getattr(fast, name), getattr(slow, name)), name
    monkeypatch.setenv("LMSCOPE_NATIVE", "1")
    bad = idx.clone()
    bad[3, 2] = 300
    with pytest.raises(ValueError, match=r"outside \[0, 300\)"):
        _ByLatent(bad, 300)


@needs_cc
@pytest.mark.parametrize(
    "flags",
    [("-O3", "-march=native", "-fopenmp"), ("-O3", "-march=native", "-fopenmp-simd"), ("-O2",)],
    ids=["native-cpu-openmp", "native-cpu", "portable"],
)
def test_the_c_projection_equals_torchs_and_returns_the_squared_norm(flags: tuple[str, ...]) -> None:
    if "-fopenmp" in flags and not native._loaded_gomp():
        pytest.skip("torch here does not run on GNU OpenMP, so lmscope does not build the kernels with it")
    lib = native.build(flags)
    assert lib is not None
    g0 = torch.Generator().manual_seed(4)
    for rows, width in ((1, 1), (3, 7), (64, 576), (257, 100)):
        w = torch.randn(rows, width, generator=g0) * 3
        w[0] = 0.0  # a zero row: |w|^2 clamped, the gradient unchanged
        g = torch.randn(rows, width, generator=g0)
        ref = g.clone()
        sq = torch.linalg.vector_norm(w, dim=1).square_().clamp_min_(1e-16)
        ref.addcmul_(w, (ref * w).sum(1).div_(sq).unsqueeze(1), value=-1)
        got = g.clone()
        total = lib.lmscope_project_rows(got.data_ptr(), w.data_ptr(), rows, width, 2)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        assert math.isclose(total, float(ref.double().square().sum()), rel_tol=1e-5)
        assert torch.equal(got[0], g[0])


@needs_cc
def test_remove_parallel_grad_takes_the_kernel_and_matches_the_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from lmscope.dictionaries import DictConfig, build

    d = build(DictConfig(arch="topk", d_in=48, d_sae=96, k=4), seed=0)
    grad = torch.randn(96, 48, generator=torch.Generator().manual_seed(5))
    d.W_dec.grad = grad.clone()
    sq = d.remove_parallel_grad()
    fast = d.W_dec.grad.clone()
    monkeypatch.setenv("LMSCOPE_NATIVE", "0")
    d.W_dec.grad = grad.clone()
    assert d.remove_parallel_grad() is None  # the torch path has no norm to hand on
    torch.testing.assert_close(fast, d.W_dec.grad, rtol=1e-5, atol=1e-6)
    assert sq is not None and math.isclose(sq, float(fast.double().square().sum()), rel_tol=1e-5)
    assert (fast * d.W_dec).sum(1).abs().max() < 1e-5


@needs_cc
def test_the_c_row_gather_copies_each_row_from_its_shard() -> None:
    lib = native.library()
    assert lib is not None
    g0 = torch.Generator().manual_seed(6)
    shards = [torch.randn(n, 5, generator=g0) for n in (7, 1, 30)]
    shards.append(torch.randint(0, 1000, (9, 3), generator=g0, dtype=torch.int32))  # any dtype: rows as bytes
    bases = torch.tensor([s.data_ptr() for s in shards[:3]])
    shard = torch.randint(0, 3, (200,), generator=g0)
    local = torch.tensor([int(torch.randint(0, len(shards[i]), (1,), generator=g0)) for i in shard.tolist()])
    out = torch.empty(200, 5)

    def gather(shards_of: torch.Tensor, into: torch.Tensor) -> int:
        return lib.lmscope_gather_rows(bases.data_ptr(), 3, shards_of.data_ptr(), local.data_ptr(), 200, 20,
                                       into.data_ptr(), 2)  # fmt: skip

    assert gather(shard, out) == 0
    assert torch.equal(out, torch.stack([shards[i][r] for i, r in zip(shard.tolist(), local.tolist(), strict=True)]))
    ints = torch.empty(4, 3, dtype=torch.int32)
    one = torch.zeros(4, dtype=torch.long)
    rows = torch.tensor([8, 0, 3, 8])
    ibase = torch.tensor([shards[3].data_ptr()])
    assert lib.lmscope_gather_rows(ibase.data_ptr(), 1, one.data_ptr(), rows.data_ptr(), 4, 12, ints.data_ptr(), 1) == 0
    assert torch.equal(ints, shards[3][rows])
    bad = shard.clone()
    bad[17] = 3  # no such shard: refused before anything is copied
    out2 = torch.full((200, 5), 9.0)
    assert gather(bad, out2) == -1
    assert bool((out2 == 9.0).all())
