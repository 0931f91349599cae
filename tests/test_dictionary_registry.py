"""The architecture registry: each architecture declares its own knowledge, and nothing else branches on it."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor

from lmscope.cli.train_cmds import sweep_configs
from lmscope.dictionaries import (
    DictConfig,
    Dictionary,
    DictionaryError,
    LossState,
    TrainOutput,
    architecture,
    architectures,
    build,
    register,
)
from lmscope.dictionaries import base as dictionaries_base
from lmscope.dictionaries.formats import dictionary_tensors, export_saelens, load_dictionary, save_dictionary
from lmscope.training import RunSpec, TensorSource, TrainConfig, Trainer, default_lr

SRC = Path(__file__).resolve().parents[1] / "src" / "lmscope"


class _Knows(Dictionary):
    """A complete architecture for the registration tests: a ReLU with a plain L1 and a scale tensor."""

    sparsity_param = "l1_coeff"
    run_tag = "l1_{l1_coeff:g}"
    loss_terms = ("mse", "l1")
    saelens_arch = None
    saelens_imports = ()

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        self.scale = torch.nn.Parameter(torch.ones(cfg.d_sae))

    @classmethod
    def default_lr(cls, cfg: DictConfig) -> float:
        return 1e-3

    @classmethod
    def extra_tensor_shapes(cls, cfg: DictConfig) -> dict[str, tuple[int, ...]]:
        return {"scale": (cfg.d_sae,)}

    @classmethod
    def validate_config(cls, cfg: DictConfig) -> None:
        if cfg.d_sae % 2:
            raise DictionaryError("test architecture: d_sae must be even")

    def activation(self, pre: Tensor) -> Tensor:
        return torch.relu(pre) * self.scale

    def training_loss(self, x: Tensor, target: Tensor, state: LossState) -> TrainOutput:
        z = self.encode(x)
        recon = self.decode(z)
        mse, l1 = self.mse(target, recon), z.sum(-1).mean()
        active = z > 0
        return TrainOutput(
            loss=mse + self.cfg.l1_coeff * 1e-3 * l1, recon=recon, fired=active.sum(0).float(),
            l0=active.sum(-1).float().mean().detach(), terms={"mse": mse.detach(), "l1": l1.detach()},
        )  # fmt: skip


@pytest.fixture
def scratch_arch() -> Iterator[str]:
    """Registers `_Knows` as a new architecture for one test, then removes it again."""
    name = "test-scratch"
    register(name)(_Knows)
    yield name
    dictionaries_base._REGISTRY.pop(name, None)


def test_duplicate_registration_raises() -> None:
    before = architecture("topk")
    with pytest.raises(DictionaryError, match="'topk' is already registered"):
        register("topk")(_Knows)
    assert architecture("topk") is before  # the original registration is untouched


@pytest.mark.parametrize("missing", ["sparsity_param", "run_tag", "loss_terms", "saelens_arch", "default_lr"])
def test_registration_refuses_an_architecture_without_its_knowledge(missing: str) -> None:
    attrs = {k: v for k, v in vars(_Knows).items() if k in Dictionary.REQUIRED_KNOWLEDGE or k == "default_lr"}
    del attrs[missing]
    partial = type("Partial", (Dictionary,), {**attrs, "activation": _Knows.activation,
                                              "training_loss": _Knows.training_loss})  # fmt: skip
    with pytest.raises(DictionaryError, match=f"does not declare {missing}"):
        register("test-partial")(partial)
    assert "test-partial" not in architectures()


def test_registration_checks_what_is_declared() -> None:
    bad_field = type("BadField", (_Knows,), {"sparsity_param": "lambda"})
    with pytest.raises(DictionaryError, match="not a DictConfig field"):
        register("test-bad-field")(bad_field)
    bad_tag = type("BadTag", (_Knows,), {"run_tag": "x{nope}"})
    with pytest.raises(DictionaryError, match="names fields DictConfig lacks"):
        register("test-bad-tag")(bad_tag)
    taken = type("Taken", (_Knows,), {"saelens_imports": ("standard",)})
    with pytest.raises(DictionaryError, match="'standard' already loads as 'relu'"):
        register("test-taken")(taken)
    assert not {"test-bad-field", "test-bad-tag", "test-taken"} & set(architectures())


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu", "matryoshka"])
def test_every_architecture_declares_its_knowledge(arch: str) -> None:
    cls = architecture(arch)
    cfg = DictConfig(arch=arch, d_in=8, d_sae=32, k=4)
    assert cls.arch == arch
    assert isinstance(getattr(cfg, cls.sparsity_param), int | float)
    assert cls.run_name_tag(cfg)
    assert math.isfinite(cls.default_lr(cfg)) and cls.default_lr(cfg) > 0
    assert cls.saelens_arch is None or isinstance(cls.saelens_arch, str)
    d = build(cfg, seed=0)
    x = torch.randn(64, 8)
    out = d.training_loss(x, x, LossState(progress=0.5, dead_mask=torch.arange(32) < 8))
    assert tuple(out.terms) == cls.loss_terms
    shapes = cls.tensor_shapes(cfg)
    assert {k: tuple(v.shape) for k, v in dictionary_tensors(d).items()} == shapes
    assert set(shapes) - {"W_enc", "b_enc", "W_dec", "b_dec"} == set(cls.extra_tensor_shapes(cfg))


def test_the_knowledge_keeps_the_published_figures() -> None:
    """The values the if-chains had: run names, default LRs, sweep axes and config checks."""
    cfgs = {a: DictConfig(arch=a, d_in=8, d_sae=2**14, k=32, l1_coeff=5.0, l0_coeff=1e-3) for a in architectures()}
    assert {a: RunSpec(c).resolved_name() for a, c in cfgs.items()} == {
        "topk": "topk-m16384-k32", "batchtopk": "batchtopk-m16384-k32", "relu": "relu-m16384-l1_5",
        "jumprelu": "jumprelu-m16384-l0_0.001", "matryoshka": "matryoshka-m16384-k32",
    }  # fmt: skip
    assert {a: default_lr(c) for a, c in cfgs.items()} == {
        "topk": 2e-4, "batchtopk": 2e-4, "relu": 5e-5, "jumprelu": 7e-5, "matryoshka": 2e-4
    }  # fmt: skip
    assert default_lr(DictConfig(arch="topk", d_in=8, d_sae=2**16)) == pytest.approx(1e-4)
    # k sweeps for topk; for relu and jumprelu it is one value, their TopK phase's k (a list: tests/test_topk_phase.py)
    swept = {
        a: [(c.k, c.l1_coeff, c.l0_coeff) for c in sweep_configs(a, ["h"], {"h": 8}, ks, [2], [1.0, 3.0], [0.1])]
        for a, ks in (("topk", [2, 4]), ("relu", [4]), ("jumprelu", [4]))
    }
    assert swept == {
        "topk": [(2, 5.0, 1e-3), (4, 5.0, 1e-3)],
        "relu": [(4, 1.0, 1e-3), (4, 3.0, 1e-3)],
        "jumprelu": [(4, 5.0, 0.1)],
    }
    assert all(isinstance(c.k, int) for c in sweep_configs("batchtopk", ["h"], {"h": 8}, [2], [2], [], []))
    for arch in ("topk", "batchtopk"):
        with pytest.raises(DictionaryError, match="k=9 exceeds d_sae=8"):
            DictConfig(arch=arch, d_in=4, d_sae=8, k=9)
    DictConfig(arch="relu", d_in=4, d_sae=8, k=9)  # k is only a TopK setting


def test_a_target_l0_replaces_the_coefficient_where_there_is_one() -> None:
    """relu and jumprelu declare the coefficient a target L0 controls; k-sparse ones are their own target."""
    assert {a: architecture(a).controlled_coeff for a in architectures()} == {
        "topk": None, "batchtopk": None, "relu": "l1_coeff", "jumprelu": "l0_coeff", "matryoshka": None
    }  # fmt: skip
    relu = DictConfig(arch="relu", d_in=8, d_sae=64, target_l0=12)
    assert RunSpec(relu).resolved_name() == "relu-m64-l0target_12"
    assert architecture("relu").target_l0(relu) == 12
    assert architecture("topk").target_l0(DictConfig("topk", 8, 64)) == 32
    assert architecture("relu").target_l0(DictConfig("relu", 8, 64)) is None
    with pytest.raises(DictionaryError, match=r"target_l0=4: a topk dictionary has no sparsity coefficient .* set k"):
        DictConfig(arch="topk", d_in=8, d_sae=64, target_l0=4)
    with pytest.raises(DictionaryError, match=r"target_l0=64 is out of range; it must be in \(0, d_sae=64\)"):
        DictConfig(arch="relu", d_in=8, d_sae=64, target_l0=64)
    swept = sweep_configs("jumprelu", ["h"], {"h": 8}, [4], [2], [], [], target_l0s=[2, 4])
    assert [(c.target_l0, c.l0_coeff) for c in swept] == [(2.0, 1e-3), (4.0, 1e-3)]  # the default coefficient to start
    with pytest.raises(DictionaryError, match="both --l1 and --target-l0 given"):
        sweep_configs("relu", ["h"], {"h": 8}, [4], [2], [3.0], [], target_l0s=[2])
    with pytest.raises(DictionaryError, match="--arch topk sets its L0 with --k"):
        sweep_configs("topk", ["h"], {"h": 8}, [4], [2], [], [], target_l0s=[2])
    assert [c.l1_coeff for c in sweep_configs("relu", ["h"], {"h": 8}, [4], [2], [], [])] == [5.0]  # the default


def test_no_module_outside_an_architecture_branches_on_its_name() -> None:
    """Adding an architecture means one module: the trainer, the formats and the CLI ask the class instead."""
    pattern = re.compile(r"""\barch\s*(==|!=|in|not in)\s*[("']""")
    for rel in ("training/trainer.py", "dictionaries/formats.py", "dictionaries/base.py", "cli/train_cmds.py"):
        hits = [line for line in (SRC / rel).read_text().splitlines() if pattern.search(line)]
        assert not hits, f"{rel} branches on an architecture name: {hits}"


def test_a_new_architecture_works_everywhere_from_its_own_module(scratch_arch: str, tmp_path: Path) -> None:
    cfg = DictConfig(arch=scratch_arch, d_in=8, d_sae=16, l1_coeff=2.0)
    with pytest.raises(DictionaryError, match="d_sae must be even"):
        DictConfig(arch=scratch_arch, d_in=8, d_sae=15)
    assert RunSpec(cfg).resolved_name() == f"{scratch_arch}-m16-l1_2" and default_lr(cfg) == 1e-3
    assert [c.l1_coeff for c in sweep_configs(scratch_arch, ["h"], {"h": 8}, [4], [2], [1.0, 2.0], [])] == [1.0, 2.0]
    x = torch.randn(1024, 8)
    tc = TrainConfig(total_tokens=512, warmup_steps=1)
    d = next(iter(Trainer([cfg], tc).fit(TensorSource(x, batch_size=128)).values()))
    save_dictionary(d, tmp_path / "d")
    back = load_dictionary(tmp_path / "d")
    assert back.arch == scratch_arch and torch.equal(back.scale, d.scale)
    with pytest.raises(DictionaryError, match="no SAELens counterpart"):
        export_saelens(d, tmp_path / "sl")
