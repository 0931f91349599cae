"""BatchTopK's (and Matryoshka's) TopK phase: per-token selection first, the batch-level selection after, and the
inference threshold that the phases hand over."""

from __future__ import annotations

import pytest
import torch

from lmscope.dictionaries import DictConfig, DictionaryError, LossState, build
from lmscope.training import TensorSource, TrainConfig, Trainer


def _pre(n: int = 64, m: int = 48, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(n, 1, generator=g) * 3  # tokens of very different size, so the two selections differ
    return torch.randn(n, m, generator=g) * scale


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_topk_phase_then_batch_phase(arch: str) -> None:
    d = build(DictConfig(arch=arch, d_in=8, d_sae=48, k=4, token_topk_frac=0.5))
    pre = _pre()
    z = d.select(pre, LossState(progress=0.2))
    vals, idx = pre.topk(4, dim=-1)
    per_token = torch.zeros_like(pre).scatter_(-1, idx, torch.relu(vals))
    torch.testing.assert_close(z, per_token)  # exactly each token's top k, ReLU'd
    assert ((z > 0).sum(-1) <= 4).all()
    z = d.select(pre, LossState(progress=0.5))  # the batch phase starts at the fraction
    assert int((z > 0).sum()) == 4 * pre.shape[0]  # k per token on average, over the batch
    counts = (z > 0).sum(-1)
    assert counts.max() > 4 and counts.min() < 4  # big tokens take more, small ones fewer
    torch.testing.assert_close(z, d.batch_select(pre))


def test_threshold_is_estimated_in_the_topk_phase_and_restarted_by_the_batch_phase() -> None:
    d = build(DictConfig(arch="batchtopk", d_in=8, d_sae=48, k=4, token_topk_frac=0.75))
    for seed in range(3):
        d.select(_pre(seed=seed), LossState(progress=0.1))
    assert torch.isfinite(d.threshold) and float(d.threshold) > 0  # a run stopped now is still usable
    assert int(d.threshold_updates) == 0  # nothing counted yet for the batch phase's running mean
    pre = _pre(seed=9)
    z = d.select(pre, LossState(progress=0.8))
    assert float(d.threshold) == pytest.approx(float(z[z > 0].min()))  # the first batch-phase cut replaces it
    assert int(d.threshold_updates) == 1


def test_batch_selection_throughout_with_zero() -> None:
    d = build(DictConfig(arch="batchtopk", d_in=8, d_sae=48, k=4, token_topk_frac=0.0))
    pre = _pre()
    torch.testing.assert_close(d.select(pre, LossState(progress=0.0)), d.batch_select(pre))


def test_default_and_configs_written_before_the_phase_existed() -> None:
    assert DictConfig(arch="batchtopk", d_in=8, d_sae=16, k=2).token_topk_frac == 0.75
    old = DictConfig(arch="batchtopk", d_in=8, d_sae=16, k=2).to_dict()
    del old["token_topk_frac"]  # a file saved before: trained with batch selection only, and says so
    assert DictConfig.from_dict(old).token_topk_frac == 0.0


@pytest.mark.parametrize("frac", [1.0, 1.5, -0.1])
def test_out_of_range_fraction_is_one_clear_error(frac: float) -> None:
    with pytest.raises(DictionaryError, match=r"token_topk_frac=.*\[0, 1\)"):
        DictConfig(arch="batchtopk", d_in=8, d_sae=16, k=2, token_topk_frac=frac)


def test_a_run_that_ends_inside_the_topk_phase_still_has_a_threshold(tmp_path) -> None:
    """The source runs out before the batch phase: the saved dictionary encodes with the TopK-phase estimate."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 8, generator=g)
    cfg = DictConfig(arch="batchtopk", d_in=8, d_sae=32, k=2, token_topk_frac=0.9)
    tc = TrainConfig(total_tokens=8192, warmup_steps=1, log_every=1)
    with pytest.warns(UserWarning, match="ran out"):
        out = Trainer([cfg], tc, tmp_path).fit(TensorSource(x, batch_size=256), progress=False)
    d = next(iter(out.values()))
    assert torch.isfinite(d.threshold)
    z = d.encode(x)
    assert 0.5 < float((z > 0).sum(-1).float().mean()) < 8  # about k active per token


def test_train_command_sets_the_phase_and_refuses_it_elsewhere() -> None:
    from lmscope.cli.train_cmds import sweep_configs

    (cfg,) = sweep_configs("matryoshka", ["h"], {"h": 8}, [2], [2], [], [], token_topk_frac=0.5)
    assert cfg.token_topk_frac == 0.5
    (cfg,) = sweep_configs("batchtopk", ["h"], {"h": 8}, [2], [2], [], [])
    assert cfg.token_topk_frac == 0.75
    with pytest.raises(DictionaryError, match=r"--topk-phase .* --arch topk has none"):
        sweep_configs("topk", ["h"], {"h": 8}, [2], [2], [], [], token_topk_frac=0.5)
