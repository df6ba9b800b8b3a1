#!/usr/bin/env bash
# Run HERE (a machine with network), before `bash bench/gpu_check.sh` on the GPU machine (no network there).
#   bash bench/gpu_prepare.sh
# Fills two git-ignored folders that the device call carries (run's carry: [".whl", ".peers"]):
#   .whl/    Python 3.12 wheels the GPU machine lacks: array-api-compat (the version installed here) and
#            traker 0.3.2 (its requirements torch, numpy, tqdm are there). Nothing the GPU image already has:
#            it holds transformers 5.17 and huggingface-hub 1.33 (/work/.library/device/KINDS.md, read 2026-11-17),
#            and a carried newer huggingface-hub would shadow them and fail to import (it needs httpx2, absent there).
#   .peers/  ../shared/peers (traker's fast_jl CUDA source + build_fast_jl.py): ../shared does not travel.
# gpu_check.sh installs .whl/*.whl into /tmp/site and builds fast_jl from .peers/fast_jl.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
peers_src=${PEERS_SRC:-$root/../shared/peers}

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
touch "$exclude"
for path in /.whl/ /.peers/; do
  grep -qxF "$path" "$exclude" || echo "$path" >> "$exclude"
done

compat=$(python3 -m pip show array-api-compat 2>/dev/null | sed -n 's/^Version: //p')
compat=${compat:-1.16.0}
rm -rf .whl
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "array-api-compat==$compat"
# traker publishes only an sdist; it is pure Python, so the wheel built here (py3-none-any) installs there.
python3 -m pip wheel -q --no-deps -w .whl traker==0.3.2
ls .whl/traker-0.3.2-py3-none-any.whl > /dev/null
echo "traker's requirements (the GPU image must have each):"
unzip -p .whl/traker-*.whl '*/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' | sed 's/^/  /'

rm -rf .peers
mkdir -p .peers
cp -r "$peers_src/fast_jl" "$peers_src/build_fast_jl.py" "$peers_src/README.md" .peers/
find .peers -name '__pycache__' -prune -exec rm -rf {} +

ls -l .whl
du -sh .whl .peers
total_kib=$(du -sk .whl .peers | awk '{s += $1} END {print s}')
if [ "$total_kib" -gt $((40 * 1024)) ]; then
  echo "carried folders hold ${total_kib} KiB, over the 40 MiB this check allows" >&2
  exit 1
fi
git check-ignore -q .whl/ && git check-ignore -q .peers/ || { echo ".whl/ or .peers/ is not ignored" >&2; exit 1; }
echo 'carry for the device call: [".whl", ".peers"]   command: bash bench/gpu_check.sh'
