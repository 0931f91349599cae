#!/usr/bin/env bash
# Creates benchmarks/.venv-anchors: a separate venv holding the "anchor" libraries (SAELens,
# EleutherAI sparsify, TransformerLens) that the benchmarks compare lmscope against. It is kept
# apart from .venv so nothing the anchors pull in can change lmscope's own environment.
#
# Reproducible and idempotent: versions are pinned, torch goes in FIRST (pinned, so pip takes
# the CPU wheel and never resolves an unpinned torch with GBs of CUDA packages), and every later
# install runs under a constraints file that holds torch at that version. Re-running only
# installs what is missing. benchmarks/anchors.lock.txt (a constraints file) holds every transitive
# version, so a rebuild resolves to the same set; ANCHORS_RELOCK=1 ignores and rewrites it.
# Usage: bash benchmarks/anchors_env.sh   (PYTHON=python3.11 to choose the interpreter,
#        ANCHORS_VENV=DIR to build elsewhere)
#
# Each anchor installs on its own (one failing does not stop the others); the final line of
# output is a JSON summary of what imports, and the same is written to .venv-anchors/status.json.
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${ANCHORS_VENV:-$HERE/.venv-anchors}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"
# Pins found to install against torch 2.13.0 (CPU) on Python 3.11; see docs/benchmarks.md.
SAE_LENS_VERSION="${SAE_LENS_VERSION:-6.54.12}"
SPARSIFY_VERSION="${SPARSIFY_VERSION:-1.3.3}"
TRANSFORMER_LENS_VERSION="${TRANSFORMER_LENS_VERSION:-3.9.0}"

test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV" || exit 1
PY="$VENV/bin/python"
CONSTRAINTS="$VENV/constraints.txt"
LOCK="$HERE/anchors.lock.txt"  # every transitive version, so a rebuild resolves to the same set
echo "torch==$TORCH_VERSION" >"$CONSTRAINTS"
if [ -f "$LOCK" ] && [ -z "${ANCHORS_RELOCK:-}" ]; then
    grep -v '^#' "$LOCK" >>"$CONSTRAINTS"
fi

"$PY" -m pip install -q --upgrade pip || exit 1
"$PY" -m pip install -q "torch==$TORCH_VERSION" || exit 1

install() {  # name spec: install one anchor under the torch constraint, log its outcome
    local name="$1" spec="$2"
    if "$PY" -m pip install -q -c "$CONSTRAINTS" "$spec" >"$VENV/install-$name.log" 2>&1; then
        echo "installed $spec"
    else
        echo "FAILED $spec (see $VENV/install-$name.log):" >&2
        tail -n 5 "$VENV/install-$name.log" >&2
    fi
}

install transformer-lens "transformer-lens==$TRANSFORMER_LENS_VERSION"
install sae-lens "sae-lens==$SAE_LENS_VERSION"
install eai-sparsify "eai-sparsify==$SPARSIFY_VERSION"

if [ -n "${ANCHORS_RELOCK:-}" ]; then
    { echo "# Full dependency set of benchmarks/.venv-anchors (pip freeze, torch left out: it is pinned by anchors_env.sh)."
      echo "# Used as a constraints file by benchmarks/anchors_env.sh; regenerate with ANCHORS_RELOCK=1 bash benchmarks/anchors_env.sh"
      "$PY" -m pip freeze 2>/dev/null | grep -v -i '^torch=='; } >"$LOCK.tmp" && mv "$LOCK.tmp" "$LOCK"
fi

"$PY" - "$VENV/status.json" <<'EOF'
import importlib, importlib.metadata as md, json, os, sys
out = {}
for dist, mod in [("torch", "torch"), ("transformer-lens", "transformer_lens"),
                  ("sae-lens", "sae_lens"), ("eai-sparsify", "sparsify")]:
    try:
        version = md.version(dist)
    except md.PackageNotFoundError:
        out[dist] = {"installed": False}
        continue
    try:
        importlib.import_module(mod)
        out[dist] = {"installed": True, "version": version, "imports": True}
    except Exception as exc:  # report, don't fail: the benchmarks read this
        out[dist] = {"installed": True, "version": version, "imports": False,
                     "error": f"{type(exc).__name__}: {exc}"[:500]}
tmp = sys.argv[1] + ".tmp"
with open(tmp, "w") as f:
    json.dump(out, f, indent=2)
os.replace(tmp, sys.argv[1])
print(json.dumps(out))
EOF
