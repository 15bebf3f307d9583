#!/usr/bin/env bash
# `pip install .` keeps the user's torch: a fresh venv gets torch first (as a user's would
# hold their own build), then a plain `pip install .` of mupsweep, with no constraints file.
# Fails when torch's version changed, when any nvidia-* / triton package or torchvision came
# in, or when mupsweep does not import. Prints what it measured (sizes, seconds).
#
# usage: scripts/check_install.sh [PYTHON] [TORCH_VERSION]   (make check-install)
set -euo pipefail
python=${1:-python3}
torch_version=${2:-$(sed -n 's/^torch==//p' "$(dirname "$0")/../constraints.txt")}
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /tmp/mupsweep-install-check.XXXXXX)
trap 'rm -rf "$work"' EXIT

"$python" -m venv "$work/venv"
# pip, less the lines a machine's empty local index prints for every package it looks up
pip() { "$work/venv/bin/pip" "$@" 2> >(grep -v "is ignored: it is neither a file" >&2); }
pip install -q "torch==$torch_version"
before=$("$work/venv/bin/python" -c "import torch; print(torch.__version__)" 2>/dev/null)
pip freeze | sort > "$work/before.txt"
size_before=$(du -sm "$work/venv" | cut -f1)

start=$(date +%s)
pip install -q "$root"   # what a user types: no constraints, no extra index
seconds=$(( $(date +%s) - start ))
after=$("$work/venv/bin/python" -c "import torch; print(torch.__version__)" 2>/dev/null)
pip freeze | sort > "$work/after.txt"
size_after=$(du -sm "$work/venv" | cut -f1)
added=$(comm -13 "$work/before.txt" "$work/after.txt" | grep -v '^mupsweep' | wc -l)

echo "torch before: $before, after pip install .: $after"
echo "packages added: $added; venv $size_before MB -> $size_after MB; pip install . took ${seconds} s"
status=0
if [ "$before" != "$after" ]; then
    echo "FAIL: pip install . replaced torch $before with $after"; status=1
fi
if grep -iE '^(nvidia-|triton|torchvision)' "$work/after.txt"; then
    echo "FAIL: pip install . brought in the packages above"; status=1
fi
(cd "$work" && "$work/venv/bin/python" -c "import mupsweep.cli, mupsweep.parametrize") || {
    echo "FAIL: mupsweep does not import in that venv"; status=1; }
[ "$status" = 0 ] && echo "ok: the user's torch was kept"
exit "$status"
