"""An attribution graph computed by 2 gloo ranks under torchrun (each computes every other batch of rows, all rows
reach every rank) equals the one-process graph: the same nodes, the same edges, the same capped rows, the same
influence-first order of visits."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

SCRIPT = textwrap.dedent(
    """
    import sys
    from circuit_helpers import tiny_transcoders
    from lmscope import Model
    from lmscope.circuits import AttributionConfig, attribute
    from lmscope.core.distributed import init_from_env, is_main, world_size
    from tiny_models import TINY, tiny_ids

    init_from_env("cpu")
    model = Model(TINY["llama"].build())
    tcs = tiny_transcoders(model)
    cfg = AttributionConfig(max_feature_nodes=14, max_edges_per_row=6, batch_size=3, update_every=2)
    graph = attribute(model, tcs, tiny_ids()[0][:10], cfg)
    if is_main():
        graph.meta["world"] = world_size()
        graph.save(sys.argv[1])
    """
)


def test_two_ranks_compute_the_one_process_graph(tmp_path: Path) -> None:
    from lmscope.circuits.graph import Graph

    script = tmp_path / "attr.py"
    script.write_text(SCRIPT)
    tests = str(Path(__file__).parent)
    path = os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one.safetensors")], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(tmp_path / "two.safetensors")], env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = Graph.load(tmp_path / "one.safetensors"), Graph.load(tmp_path / "two.safetensors")
    assert a.meta["world"] == 1 and b.meta["world"] == 2
    assert a.n_features == b.n_features == 14 and a.meta["n_visited_features"] == b.meta["n_visited_features"]
    assert np.array_equal(a.feat_id, b.feat_id) and np.array_equal(a.feat_layer, b.feat_layer)
    assert (a.adjacency != b.adjacency).nnz == 0 and a.adjacency.nnz > 0
    assert a.meta["dropped"] == b.meta["dropped"] and a.meta["dropped"]["rows_capped"] > 0
