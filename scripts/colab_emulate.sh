#!/usr/bin/env bash
# Run chapters as Colab runs them, on this machine, from the committed state of this repository.
#
#   scripts/colab_emulate.sh [CHAPTER ...]        (default: 00_seed_family; CPU runtime, default preset)
#
# What is the same as in Colab:
#   - a fresh Python environment that has only what Colab preinstalls and the chapters lean on
#     (torch, the Jupyter kernel), plus a `google.colab` module, so `IN_COLAB` is true;
#   - the chapter's set-up cell runs as written: `git clone --branch <published branch>` of the
#     repository's URL into /content, then `%pip install "/content/...[colab]"` (the package's
#     dependency *ranges*, not this repository's pins: what Colab resolves) and the SmolLM2 package;
#   - the notebook is the one Colab opens (notebooks/<chapter>.ipynb on the published branch,
#     `repository.branch` of _config.yml), run top to bottom with the default parameters.
# What differs: the clone's URL is redirected (git's url.<base>.insteadOf, for this process only) to
# a local copy of this repository whose published branch is this HEAD, because HEAD may not be
# pushed yet and nothing outside PyPI is reachable here; papermill drives the kernel (Colab's browser
# front end cannot run here); the Python version is this machine's.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3.11}
WORK=${COLAB_WORK:-$(mktemp -d /tmp/colab-emulate-XXXX)}
CONTENT=/content
CLONE=$CONTENT/universal-neurons-book
CHAPTERS=("${@:-00_seed_family}")

REF=$(sed -n 's/^  branch: //p' "$ROOT/_config.yml")
URL=$(sed -n 's/^  url: //p' "$ROOT/_config.yml")
[ -n "$REF" ] && [ -n "$URL" ] || { echo "error: no repository url or branch in _config.yml" >&2; exit 2; }
grep -q -- "--branch $REF $URL $CLONE" "$ROOT/notebooks/${CHAPTERS[0]}.py" || {
  echo "error: notebooks/${CHAPTERS[0]}.py does not clone $URL at $REF into $CLONE: the set-up cell and this script disagree" >&2; exit 2; }
if [ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no)" ]; then
  echo "note: uncommitted changes are not part of the emulation (it clones HEAD)" >&2
fi
if [ -e "$CLONE" ]; then
  echo "error: $CLONE exists (a previous emulation?): remove it first" >&2; exit 2
fi

echo "== branch $REF = HEAD $(git -C "$ROOT" rev-parse --short HEAD), served from $WORK/origin"
git clone -q --no-local "$ROOT" "$WORK/origin"
git -C "$WORK/origin" checkout -q -B "$REF"  # the published branch, at the HEAD that was cloned
# the redirect, for git processes started from here only (no global configuration is changed)
export GIT_CONFIG_COUNT=1 GIT_CONFIG_KEY_0="url.file://$WORK/origin.insteadOf" GIT_CONFIG_VALUE_0="$URL"

echo "== a fresh environment with Colab's preinstalled torch and kernel ($WORK/venv)"
"$PYTHON" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
quiet() { grep -v "^WARNING: Location 'file:" || true; }  # this machine's pip config lists local indexes
"$VPY" -m pip install -q --upgrade pip 2>&1 | quiet
"$VPY" -m pip install -q "torch==$(grep '^torch==' "$ROOT/constraints.txt" | cut -d= -f3)" ipykernel papermill 2>&1 | quiet
SITE=$("$VPY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
mkdir -p "$SITE/google/colab"
printf '"""Stand-in for Colab'"'"'s module: its presence is what the set-up cell tests."""\n' > "$SITE/google/colab/__init__.py"
touch "$SITE/google/__init__.py"
"$VPY" -m ipykernel install --prefix "$WORK/venv" --name colab-emulated >/dev/null
# Colab's kernel has imported google.colab before the first cell runs
export IPYTHONDIR="$WORK/ipython"
mkdir -p "$IPYTHONDIR/profile_default/startup"
echo "import google.colab" > "$IPYTHONDIR/profile_default/startup/00-colab.py"

mkdir -p "$CONTENT" "$WORK/out"
status=0
for ch in "${CHAPTERS[@]}"; do
  nb="$WORK/origin/notebooks/$ch.ipynb"
  [ -f "$nb" ] || { echo "error: no notebook $ch on $REF" >&2; exit 2; }
  echo "== $ch (Colab's working directory: $CONTENT)"
  start=$(date +%s)
  if (cd "$CONTENT" && env -u UNIVERSAL_NEURONS_ROOT JUPYTER_PATH="$WORK/venv/share/jupyter" \
        "$WORK/venv/bin/papermill" -k colab-emulated --cwd "$CONTENT" "$nb" "$WORK/out/$ch.ipynb" --log-output \
        > "$WORK/out/$ch.log" 2>&1); then
    echo "   passed in $(( $(date +%s) - start )) s ($WORK/out/$ch.ipynb)"
  else
    status=1
    echo "   FAILED after $(( $(date +%s) - start )) s: the last lines of $WORK/out/$ch.log:"
    tail -n 25 "$WORK/out/$ch.log"
  fi
done
"$VPY" -c "import helpers, torch; print('installed helpers from', helpers.__file__, '| torch', torch.__version__)"
echo "== clean-up: rm -rf $CLONE $WORK"
exit $status
