#!/usr/bin/env bash
# Record the two-layer family's universality row in sweeps/families.csv (chapter 01 shows it beside
# the default six-layer family, on the same number of held-out tokens). The two-layer family is no
# longer shipped: its weights are restored from the commit that last shipped them into a temporary
# folder (checked against their manifest when loaded), and the row is computed on N_TOKENS held-out
# tokens (default: the default preset's n_tokens, which is what chapter 01 uses).
#   scripts/record_two_layer.sh [N_TOKENS ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
REF=${TWO_LAYER_REF:-8f17c2f}   # the last commit whose weights/ held embedded-default
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
git archive "$REF" weights/embedded-default | tar -x -C "$TMP"
if [ $# -eq 0 ]; then
  set -- "$($PY -c 'from helpers.core.presets import load_preset; print(load_preset("default").n_tokens)')"
fi
for n in "$@"; do
  UNIVERSAL_NEURONS_WEIGHTS="$TMP/weights" $PY -m helpers.correlations.universality --preset two-layer --n-tokens "$n" \
    --command "scripts/record_two_layer.sh $n (weights of embedded-default at $REF)"
done
