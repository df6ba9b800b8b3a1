#!/usr/bin/env bash
# Whether a GPU is visible here, in one line, before bench/gpu_check.sh's steps run: without one each GPU step
# failed with a reason of its own (a skipped test, "sees no CUDA device", an import error) and nothing said why.
#   bash bench/_gpu_visible.sh [PYTHON]    # exit 0: "GPU visible: ..."; exit 1: "NO GPU VISIBLE: ..."
# First `nvidia-smi -L` (the driver's list); where it is missing or lists nothing, whether torch (if PYTHON imports it)
# sees a CUDA device. Runs nothing else; a missing GPU does not stop the caller.
py=${1:-${PYTHON:-python3}}
why=
if command -v nvidia-smi > /dev/null 2>&1; then
  listed=$(timeout 30 nvidia-smi -L 2>&1)
  rc=$?
  gpus=$(printf '%s\n' "$listed" | grep -c '^GPU [0-9]')
  if [ "$rc" = 0 ] && [ "$gpus" -gt 0 ]; then
    echo "GPU visible: $gpus listed by nvidia-smi -L, the first: $(printf '%s\n' "$listed" | grep -m1 '^GPU [0-9]')"
    exit 0
  fi
  why="nvidia-smi -L lists none (exit $rc: $(printf '%s' "$listed" | head -n 1 | cut -c1-120))"
else
  why="no nvidia-smi on PATH"
fi
seen=$(timeout 60 "$py" -c "import torch; print(torch.cuda.is_available(), torch.__version__)" 2>/dev/null)
case $seen in
  True*) echo "GPU visible: torch ${seen#True } sees a CUDA device ($why)"; exit 0 ;;
  False*) why="$why; torch ${seen#False } sees no CUDA device" ;;
  *) why="$why; torch not importable by $py" ;;
esac
echo "NO GPU VISIBLE: $why. The GPU steps below will fail or skip (a CPU rehearsal only checks the script)"
exit 1
