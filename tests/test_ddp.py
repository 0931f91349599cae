"""Data-parallel training: 2 gloo processes under torchrun take the same steps as 1 process, same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file

SCRIPT = textwrap.dedent(
    """
    import faulthandler
    import sys
    import torch
    faulthandler.enable()  # a rank that aborts (SIGABRT, once seen in CI at exit) shows where, in the stderr tail
    from lmscope.dictionaries import DictConfig
    from lmscope.training import RunSpec, TensorSource, TrainConfig, Trainer
    from lmscope.training import distributed

    device = distributed.init_from_env("cpu")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8192, 16, generator=g) @ torch.randn(16, 16, generator=g) + 1.0
    runs = [
        RunSpec(DictConfig(arch="topk", d_in=16, d_sae=64, k=4), lr=3e-3),
        RunSpec(DictConfig(arch="relu", d_in=16, d_sae=32), lr=3e-3),
        # with their TopK phases (thresholds and the ReLU's bias shift from the batch cut, gathered over the ranks)
        RunSpec(DictConfig(arch="jumprelu", d_in=16, d_sae=32, k=4), lr=3e-3),
    ]
    tc = TrainConfig(total_tokens=12 * 512, warmup_steps=3, progress_bar=False, dead_window_tokens=1024)
    Trainer(runs, tc, sys.argv[1], device=device).fit(TensorSource(x, batch_size=512))
    # one file per rank: printing from both ranks interleaves on the shared stdout
    with open(f"{sys.argv[1]}/rank{distributed.rank()}.txt", "w") as f:
        f.write(f"world {distributed.world_size()}")
    """
)


def _one_and_two_ranks(script_text: str, tmp_path: Path) -> None:
    """Run the script as 1 process (out: tmp_path/one) and as 2 gloo ranks under torchrun (tmp_path/two)."""
    script = tmp_path / "train.py"
    script.write_text(script_text)
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
    assert ddp.returncode == 0, ddp.stderr[-8000:]  # the ranks' own output comes before torchrun's long report


def test_two_gloo_ranks_match_one_process(tmp_path: Path) -> None:
    _one_and_two_ranks(SCRIPT, tmp_path)
    for rank in (0, 1):
        assert (tmp_path / "two" / f"rank{rank}.txt").read_text() == "world 2", (
            f"rank {rank} did not run in a world of 2"
        )
    assert (tmp_path / "one" / "rank0.txt").read_text() == "world 1"
    for name in ("topk-m64-k4", "relu-m32-l1_5", "jumprelu-m32-l0_0.001"):
        a = load_file(str(tmp_path / "one" / name / "dictionary.safetensors"))
        b = load_file(str(tmp_path / "two" / name / "dictionary.safetensors"))
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=f"{name}/{key}")
        # and the runs really trained: weights moved away from their initialisation
        assert not torch.allclose(a["b_enc"], torch.zeros_like(a["b_enc"]))


DEAD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from lmscope.dictionaries import DictConfig
    from lmscope.training import RunSpec, TensorSource, TrainConfig, Trainer
    from lmscope.training import distributed

    device = distributed.init_from_env("cpu")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 8, generator=g)
    x[:, 0] = 0.0
    x.view(8, 512, 8)[:, 256:, 0] = 10.0  # the second half of every batch of 512: rank 1's slice under 2 ranks
    # a fixed ReLU dictionary (lr 0): latent 0 is relu(x0 - 1), which fires only on rank 1's rows; latent 1 is
    # relu(x1 - 1), on both ranks' rows; latents 2-7 never fire
    cfg = DictConfig(arch="relu", d_in=8, d_sae=8)
    tc = TrainConfig(total_tokens=8 * 512, warmup_steps=1, dead_window_tokens=1024, b_dec_init="zeros",
                     normalize=False, log_every=1, progress_bar=False)
    trainer = Trainer([RunSpec(cfg, name="relu", lr=0.0)], tc, sys.argv[1], device=device)
    d = trainer.runs[0].dictionary
    with torch.no_grad():
        d.W_enc.zero_()
        d.b_enc.fill_(-1.0)
        d.W_enc[0, 0] = 1.0
        d.W_enc[1, 1] = 1.0
    trainer.fit(TensorSource(x, batch_size=512))
    state = {k: v.tolist() for k, v in trainer.runs[0].dead.state().items()}
    state["world"] = distributed.world_size()
    with open(f"{sys.argv[1]}/dead_rank{distributed.rank()}.json", "w") as f:
        json.dump(state, f)
    """
)


def test_dead_latent_counts_are_summed_across_ranks(tmp_path: Path) -> None:
    """A latent that fires only on rank 1's slice of each batch is not dead on rank 0: every rank's tracker holds
    the counts of the whole global batch, exactly as one process does, and so do the checkpoint and the log."""
    _one_and_two_ranks(DEAD_SCRIPT, tmp_path)
    one = json.loads((tmp_path / "one" / "dead_rank0.json").read_text())
    assert one["world"] == 1
    assert one["fired_total"][:2] == [8 * 256, one["fired_total"][1]] and 0 < one["fired_total"][1] < 8 * 512
    assert one["fired_total"][2:] == [0.0] * 6 and one["tokens_total"] == 8 * 512
    assert one["since_fired"][:2] == [0, 0] and one["since_fired"][2:] == [8 * 512] * 6
    for rank in (0, 1):
        two = json.loads((tmp_path / "two" / f"dead_rank{rank}.json").read_text())
        assert two.pop("world") == 2
        assert two == {k: v for k, v in one.items() if k != "world"}, f"rank {rank}"
    # rank 0 writes the checkpoint and the log: latent 0 alive, 6 of 8 dead, as in one process
    for out in ("one", "two"):
        ckpt = load_file(str(tmp_path / out / "checkpoint.safetensors"))
        assert ckpt["relu/dead/fired_total"].tolist() == one["fired_total"], out
        assert ckpt["relu/dead/since_fired"].tolist() == one["since_fired"], out
        log = [json.loads(line) for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log] == list(range(1, 9)), out
        # dead after 1024 tokens (2 steps) without firing: none at step 1, latents 2-7 from step 2 on
        assert [r["dead_frac"] for r in log] == [0.0] + [0.75] * 7, out
