"""Data-parallel training: 2 gloo processes under torchrun take the same steps as 1 process, same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from lmscope.dictionaries import DictConfig
    from lmscope.training import RunSpec, TensorSource, TrainConfig, Trainer
    from lmscope.training import distributed

    device = distributed.init_from_env("cpu")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8192, 16, generator=g) @ torch.randn(16, 16, generator=g) + 1.0
    runs = [
        RunSpec(DictConfig(arch="topk", d_in=16, d_sae=64, k=4), lr=3e-3),
        RunSpec(DictConfig(arch="relu", d_in=16, d_sae=32), lr=3e-3),
    ]
    tc = TrainConfig(total_tokens=12 * 512, warmup_steps=3, progress_bar=False, dead_window_tokens=1024)
    Trainer(runs, tc, sys.argv[1], device=device).fit(TensorSource(x, batch_size=512))
    # one file per rank: printing from both ranks interleaves on the shared stdout
    with open(f"{sys.argv[1]}/rank{distributed.rank()}.txt", "w") as f:
        f.write(f"world {distributed.world_size()}")
    """
)


def test_two_gloo_ranks_match_one_process(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "one")], env=env, capture_output=True, text=True, timeout=300
    )
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
         str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    for rank in (0, 1):
        assert (tmp_path / "two" / f"rank{rank}.txt").read_text() == "world 2", (
            f"rank {rank} did not run in a world of 2"
        )
    assert (tmp_path / "one" / "rank0.txt").read_text() == "world 1"
    for name in ("topk-m64-k4", "relu-m32-l1_5"):
        a = load_file(str(tmp_path / "one" / name / "dictionary.safetensors"))
        b = load_file(str(tmp_path / "two" / name / "dictionary.safetensors"))
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=f"{name}/{key}")
        # and the runs really trained: weights moved away from their initialisation
        assert not torch.allclose(a["b_enc"], torch.zeros_like(a["b_enc"]))
