"""Evaluation metrics on a tiny random Llama: exact identities, not just "runs without error"."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lmscope import Model
from lmscope.cli.eval_cmd import results_table
from lmscope.dictionaries import DictConfig, Dictionary, DictionaryError, build
from lmscope.training.evaluate import activation_metrics, evaluate, save_json, splice_metrics


@pytest.fixture(scope="module")
def model() -> Model:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=97,
    )  # fmt: skip
    return Model(LlamaForCausalLM(cfg))


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 97, (6, 12), generator=torch.Generator().manual_seed(1))


def identity_dictionary(width: int, hook: str) -> Dictionary:
    """ReLU with W_enc = [I, -I], W_dec = [I; -I]: reconstructs every input exactly."""
    d = build(DictConfig(arch="relu", d_in=width, d_sae=2 * width, hook=hook))
    eye = torch.eye(width)
    with torch.no_grad():
        d.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        d.W_dec.copy_(torch.cat([eye, -eye], dim=0))
    return d.eval()


def zero_dictionary(d_in: int, d_out: int, hook: str, hook_out: str | None = None) -> Dictionary:
    d = build(DictConfig(arch="topk", d_in=d_in, d_sae=16, d_out=d_out, k=2, hook=hook, hook_out=hook_out))
    with torch.no_grad():
        d.W_dec.zero_()
    return d.eval()


def test_activation_metrics_match_their_definitions() -> None:
    d = build(DictConfig(arch="topk", d_in=8, d_sae=32, k=3), seed=0).eval()
    x = torch.randn(500, 8) * 2 + 1
    m = activation_metrics(d, x, chunk=128)  # several chunks
    with torch.no_grad():
        recon, z = d(x)
    err = (x - recon).pow(2).sum()
    assert m["fvu"] == pytest.approx(float(err / (x - x.mean(0)).pow(2).sum()), rel=1e-4)
    assert m["mse"] == pytest.approx(float((x - recon).pow(2).mean()), rel=1e-4)
    assert m["l0"] == pytest.approx(float((z > 0).sum(-1).float().mean()), rel=1e-6)
    assert m["cosine"] == pytest.approx(float(torch.cosine_similarity(recon, x, dim=-1).mean()), rel=1e-4)
    assert m["rel_bias"] == pytest.approx(float(recon.pow(2).sum() / (recon * x).sum()), rel=1e-4)
    dead = int(((z > 0).sum(0) == 0).sum())
    assert m["dead_frac"] == pytest.approx(dead / 32)
    assert sum(m["density_hist"]["counts"]) + m["density_hist"]["dead"] == 32
    with pytest.raises(DictionaryError, match="maps 8 -> 8 dims but the activations are 5"):
        activation_metrics(d, torch.randn(3, 5))


def test_perfect_dictionary_recovers_everything(model: Model, ids: torch.Tensor, tmp_path: Path) -> None:
    d = identity_dictionary(32, "blocks.0.resid_post")
    r = evaluate(d, model, ids, batch=4)
    assert r["fvu"] == pytest.approx(0.0, abs=1e-6) and r["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert r["rel_bias"] == pytest.approx(1.0, abs=1e-5)
    assert r["ce_spliced"] == pytest.approx(r["ce_clean"], abs=1e-5)
    assert r["ce_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert r["kl_spliced"] == pytest.approx(0.0, abs=1e-6)
    assert r["ce_zero_ablate"] != pytest.approx(r["ce_clean"], abs=1e-3)  # the ablation matters (random model)
    save_json(r, tmp_path / "eval.json")
    assert json.loads((tmp_path / "eval.json").read_text())["hook"] == "blocks.0.resid_post"
    assert results_table(r).row_count == len(r)


def test_zero_dictionary_recovers_nothing_and_error_term_restores_clean(model: Model, ids: torch.Tensor) -> None:
    d = zero_dictionary(32, 32, "blocks.1.resid_pre")
    r = splice_metrics(model, d, ids)
    assert r["ce_spliced"] == pytest.approx(r["ce_zero_ablate"], abs=1e-5)
    assert r["ce_recovered"] == pytest.approx(0.0, abs=1e-4)
    assert r["kl_spliced"] > 0.0
    assert r["ce_spliced_with_error"] == pytest.approx(r["ce_clean"], abs=1e-4)
    assert r["kl_spliced_with_error"] == pytest.approx(0.0, abs=1e-5)


@pytest.fixture(scope="module")
def confident() -> tuple[Model, torch.Tensor, torch.Tensor]:
    """A random Llama whose predictions matter: its unembedding scaled up (confident next-token guesses) and its
    token ids sampled from its own distribution, so the clean run scores well below chance (ln 97 = 4.57) and
    zero-ablating the residual stream (uniform logits) loses all of that. On the `model` fixture, whose logits
    are nearly uniform, zero ablation scores *better* than the clean run and CE cannot order anything.
    Returns (model, eval ids, training ids)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=97,
    )  # fmt: skip
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        hf.lm_head.weight.mul_(30.0)

    def sample(n: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, 97, (n, 1), generator=g)
        with torch.no_grad():
            for _ in range(15):
                nxt = torch.multinomial(hf(ids).logits[:, -1].softmax(-1), 1, generator=g)
                ids = torch.cat([ids, nxt], 1)
        return ids

    return Model(hf), sample(16, 1), sample(256, 2)


def test_a_briefly_trained_dictionary_sits_between_clean_and_zero_ablation(confident) -> None:
    from lmscope.training import TensorSource, TrainConfig, Trainer

    model, ids, train_ids = confident
    hook = "blocks.0.resid_post"
    with model.capture([hook]) as acts:
        model(train_ids)
    x = acts[hook].reshape(-1, 32).float()
    cfg = DictConfig(arch="topk", d_in=32, d_sae=64, k=8, hook=hook)
    tc = TrainConfig(total_tokens=40 * 256, warmup_steps=1, log_every=1000)
    d = next(iter(Trainer([cfg], tc).fit(TensorSource(x, batch_size=256, epochs=3)).values())).eval()
    r = evaluate(d, model, ids)
    # a partial reconstruction: neither perfect nor useless, and exactly k latents per token
    assert 0.05 < r["fvu"] < 0.6 and r["l0"] == pytest.approx(8.0)
    assert r["ce_clean"] < 2.5 < 4.0 < r["ce_zero_ablate"]  # the ablation costs a lot: a meaningful scale
    assert r["ce_clean"] + 0.1 < r["ce_spliced"] < r["ce_zero_ablate"] - 0.1
    gap = r["ce_zero_ablate"] - r["ce_clean"]
    assert r["ce_recovered"] == pytest.approx((r["ce_zero_ablate"] - r["ce_spliced"]) / gap, rel=1e-9)
    assert 0.2 < r["ce_recovered"] < 0.95
    assert r["kl_spliced"] > 0.05 and r["kl_spliced_with_error"] == pytest.approx(0.0, abs=1e-4)
    # the same architecture untrained reconstructs worse, and the splice shows it
    untrained = build(cfg, seed=0).eval()
    u = evaluate(untrained, model, ids)
    assert u["fvu"] > r["fvu"] and u["kl_spliced"] > r["kl_spliced"] and u["ce_recovered"] < r["ce_recovered"]


def test_transcoder_splice(model: Model, ids: torch.Tensor) -> None:
    # a zero transcoder replaces mlp_out by b_dec = 0: exactly zero-ablating mlp_out
    d = zero_dictionary(32, 32, "blocks.0.mlp_in", "blocks.0.mlp_out")
    assert d.cfg.is_transcoder
    r = evaluate(d, model, ids)
    assert r["hook_out"] == "blocks.0.mlp_out"
    assert r["ce_spliced"] == pytest.approx(r["ce_zero_ablate"], abs=1e-5)
    assert r["ce_spliced_with_error"] == pytest.approx(r["ce_clean"], abs=1e-4)
    assert r["fvu"] == pytest.approx(1.0, abs=0.2)  # predicting 0 for a near-zero-mean target
