"""`lmscope steer`: force dictionary features, MLP neurons or a raw direction on or off, and compare
baseline and steered generations from the same seeds."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.table import Table

from lmscope.cli.common import DeviceOpt, DtypeOpt, ModelArg, console, handles_errors
from lmscope.core.atomic import atomic_write_text
from lmscope.dictionaries.pretrained import open_dictionary
from lmscope.model.generation import SamplingConfig, prompt_ids
from lmscope.model.hooks import Writer
from lmscope.model.loading import load_model
from lmscope.steer.edits import (
    SteeringError,
    check_dictionary,
    combine_readouts,
    direction_readout,
    direction_writer,
    feature_readout,
    hook_width,
    latent_edit_writer,
    neuron_readout,
    neuron_writer,
    parse_edit,
)
from lmscope.steer.measure import SteeringResult, run_steering

EPILOG = """Examples:

  lmscope steer smollm2-135m --dict runs/demo/dict --feature 1234=clamp:20 --prompt "def add(a, b):"

  lmscope steer smollm2-135m --dict runs/demo/dict --feature 1234=add:8 --feature 99=ablate --samples 4 --measure

  lmscope steer smollm2-135m --dict runs/demo/train/DICT --atlas runs/demo/atlas.db --feature 2471=clamp:2x --prompt "x"

  lmscope steer smollm2-135m --neuron blocks.3.mlp_hidden:117=clamp:5 --prompt "The weather today"

  lmscope steer smollm2-135m --direction probe.safetensors --hook blocks.6.resid_post --direction-edit add:6

Modes: add:VALUE (add VALUE x the decoder direction), clamp:VALUE (set the feature to VALUE, error term kept;
clamp:3x = 3 x its observed max, needs --atlas), ablate (set it to 0, error term kept)."""

_NEURON = re.compile(r"^(?P<hook>[\w.]+):(?P<edit>-?\d+=.+)$")


def _load_direction(path: Path) -> torch.Tensor:
    from safetensors import safe_open

    if not path.is_file():
        raise SteeringError(f"direction file not found: {path}")
    try:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
            key = "direction" if "direction" in keys else (keys[0] if len(keys) == 1 else None)
            if key is None:
                raise SteeringError(f"{path} holds {keys}; name the tensor 'direction' or keep a single tensor")
            return f.get_tensor(key)
    except SteeringError:
        raise
    except Exception as exc:
        raise SteeringError(f"{path} is not a readable safetensors file: {exc}") from exc


def _atlas_max_acts(path: Path, features: list[int]) -> dict[int, float]:
    """Observed max activations of `features`, read from an atlas (opened read-only)."""
    from lmscope.atlas.db import read
    from lmscope.atlas.db.schema import open_atlas

    conn = open_atlas(path, readonly=True)
    try:
        rows = read.max_acts(conn, features)
    finally:
        conn.close()
    missing = sorted(set(features) - set(rows))
    if missing:
        raise SteeringError(f"{path} has no features {missing}; is it the atlas of this dictionary?")
    return rows


def print_result(result: SteeringResult) -> None:
    for i, smp in enumerate(result.samples):
        where = f"seed {smp.seed}, row {i}" if result.batched else f"seed {smp.seed}"
        table = Table("baseline", "steered", title=f"{where} · {' '.join(result.edits)}", show_lines=True)
        table.add_row(result.prompt + smp.baseline, result.prompt + smp.steered)
        console.print(table)
    if result.measure:
        m = result.measure
        t = Table("measure", "baseline", "steered", title=f"effect over {m['samples']} sample(s)")
        for k in m["activation_baseline"]:
            t.add_row(
                f"mean activation: {k}", f"{m['activation_baseline'][k]:.3f}", f"{m['activation_steered'][k]:.3f}"
            )
        t.add_row(
            "perplexity under the unsteered model", f"{m['perplexity_baseline']:.2f}", f"{m['perplexity_steered']:.2f}"
        )
        t.add_row("KL(steered || baseline), first generated token", "", f"{m['kl_first_position']:.4f}")
        console.print(t)


def register(app: typer.Typer) -> None:
    @app.command(epilog=EPILOG)
    @handles_errors
    def steer(
        model: ModelArg,
        prompt: Annotated[str, typer.Option("--prompt", help="The text to continue.")],
        dict_dir: Annotated[
            Path | None,
            typer.Option("--dict", help="Dictionary for --feature edits (lmscope, SAELens, sparsify, Gemma Scope)."),
        ] = None,
        dict_hook: Annotated[
            str | None, typer.Option("--dict-hook", help="Its hook, if the file names none (any naming lmscope reads).")
        ] = None,
        feature: Annotated[
            list[str] | None, typer.Option("--feature", help="ID=MODE:VALUE on a dictionary feature; repeatable.")
        ] = None,
        neuron: Annotated[
            list[str] | None, typer.Option("--neuron", help="HOOK:INDEX=MODE:VALUE on one unit; repeatable.")
        ] = None,
        direction: Annotated[
            Path | None, typer.Option("--direction", help="A safetensors file holding a [d_model] direction.")
        ] = None,
        direction_edit: Annotated[str, typer.Option(help="MODE:VALUE for --direction, e.g. add:6.")] = "add:4",
        hook: Annotated[str | None, typer.Option(help="Hook for --direction (default: the dictionary's hook).")] = None,
        atlas: Annotated[
            Path | None, typer.Option(help="An atlas of this dictionary: its max activations give clamp:Nx.")
        ] = None,
        from_prompt_end: Annotated[
            bool, typer.Option(help="Edit only from the prompt's last token on, not the whole prompt.")
        ] = False,
        max_new_tokens: Annotated[int, typer.Option(min=1)] = 40,
        samples: Annotated[int, typer.Option(min=1, help="Generations per side, seeds SEED..SEED+S-1.")] = 1,
        batch: Annotated[
            bool,
            typer.Option(
                help="Draw the samples as the rows of one batched generation per side, seeded once with "
                "SEED: several times faster on a CPU, but row i is not what seed SEED+i gives."
            ),
        ] = False,
        seed: int = 0,
        temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 0.8,
        greedy: Annotated[bool, typer.Option(help="Greedy decoding instead of sampling.")] = False,
        chat: Annotated[bool, typer.Option(help="Wrap the prompt in the model's chat template.")] = False,
        measure: Annotated[bool, typer.Option(help="Report activation read-back, KL and perplexity.")] = False,
        json_out: Annotated[Path | None, typer.Option("--json", help="Also write the result as JSON here.")] = None,
        device: DeviceOpt = "auto",
        dtype: DtypeOpt = "auto",
    ) -> None:
        """Compare baseline and steered generations side by side, from the same seeds."""
        if not (feature or neuron or direction):
            raise SteeringError("nothing to steer: give --feature (with --dict), --neuron or --direction")
        if feature and dict_dir is None:
            raise SteeringError("--feature needs --dict DIR, the dictionary whose features are meant")
        sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, greedy=greedy)
        feature_edits = [parse_edit(f) for f in feature or []]
        neuron_edits = []
        for text in neuron or []:
            m = _NEURON.match(text)
            if not m:
                raise SteeringError(
                    f"cannot parse --neuron {text!r}; write HOOK:INDEX=MODE:VALUE, e.g. blocks.3.mlp_hidden:117=clamp:5"
                )
            neuron_edits.append((m.group("hook"), parse_edit(m.group("edit"))))
        direction_vec = _load_direction(direction) if direction else None
        d_edit = parse_edit(f"0={direction_edit}") if direction else None

        lm = load_model(model, device=device, dtype=dtype)
        dictionary = open_dictionary(dict_dir, device=lm.device, hook=dict_hook) if dict_dir else None
        writers: dict[str, list[Writer]] = {}
        readouts = []
        labels: list[str] = []
        if feature_edits:
            assert dictionary is not None
            dhook = check_dictionary(lm, dictionary)
            max_acts = _atlas_max_acts(atlas, [e.index for e in feature_edits if e.relative]) if atlas else None
            writers.setdefault(dhook, []).append(
                latent_edit_writer(dictionary, feature_edits, max_acts, from_prompt_end)
            )
            readouts.append(feature_readout(dictionary, dhook, [e.index for e in feature_edits]))
            labels += [
                f"feature {e.index}={e.mode}" + (f":{e.value:g}" if e.mode != "ablate" else "") for e in feature_edits
            ]
        for nhook, e in neuron_edits:
            lm.resolve(nhook)
            writers.setdefault(nhook, []).append(neuron_writer([e], hook_width(lm, nhook), from_prompt_end))
            readouts.append(neuron_readout(nhook, [e.index]))
            labels.append(f"{nhook}:{e.index}={e.mode}:{e.value:g}")
        if direction is not None and direction_vec is not None and d_edit is not None:
            dir_hook = hook or (dictionary.cfg.hook if dictionary else None)
            if not dir_hook:
                raise SteeringError("--direction needs --hook (or a --dict whose hook it shares)")
            lm.resolve(dir_hook)
            writers.setdefault(dir_hook, []).append(direction_writer(direction_vec, d_edit, from_prompt_end))
            readouts.append(direction_readout(dir_hook, direction_vec))
            labels.append(f"direction {direction.name}={direction_edit}")

        ids = prompt_ids(lm, prompt, chat=chat)
        result = run_steering(
            lm,
            writers,
            prompt,
            ids,
            labels,
            sampling,
            samples=samples,
            seed=seed,
            readout=combine_readouts(readouts) if measure else None,
            batch=batch,
        )
        print_result(result)
        if json_out:
            atomic_write_text(json_out, json.dumps(result.to_dict(), indent=2))
            console.print(f"wrote {json_out}")
