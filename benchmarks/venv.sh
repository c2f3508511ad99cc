# shellcheck shell=bash
# The benchmark venv the CPU benchmarks share (benchmarks/.venv-trl), sourced, not run:
#
#   HERE=benchmarks/ ROOT=the repository (both set by the caller)
#   source "$HERE/venv.sh"
#   bench_venv "torch, trl, peft, posttrain" peft     # modules that must import, then extra packages
#
# bench_venv creates the venv with $PYTHON (python3) if missing; when any of the modules does
# not import, it installs torch==2.13.0 (the CPU wheel, first, so nothing pulls CUDA), then
# $TRL_SPEC (trl) and the extra packages, then posttrain in editable mode, both under a torch
# constraint; it stops when the venv holds another torch. It leaves PY (the venv's python)
# and PIP (its quiet pip install) set.

VENV="$HERE/.venv-trl"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="torch==2.13.0"
TRL_SPEC="${TRL_SPEC:-trl}"

bench_venv() {
  local modules="$1"
  shift
  local extras=("$@")
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  PY="$VENV/bin/python"
  PIP=("$PY" -m pip install --quiet --disable-pip-version-check)

  if ! "$PY" -c "import $modules" >/dev/null 2>&1; then
    echo "[setup] installing $TORCH_SPEC, then $TRL_SPEC${extras[*]:+ and ${extras[*]}}, then posttrain (editable)"
    "${PIP[@]}" "$TORCH_SPEC"
    # The constraint keeps the requirements of trl, the extra packages and posttrain from
    # swapping the CPU wheel for a CUDA build.
    echo "$TORCH_SPEC" > "$VENV/torch-constraint.txt"
    "${PIP[@]}" -c "$VENV/torch-constraint.txt" "$TRL_SPEC" ${extras[@]+"${extras[@]}"}
    "${PIP[@]}" -c "$VENV/torch-constraint.txt" -e "$ROOT"
  fi
  local torch_version
  torch_version="$("$PY" -c 'import torch; print(torch.__version__)')"
  case "$torch_version" in
    2.13.0*) ;;
    *) echo "benchmark venv has torch $torch_version, expected 2.13.0 (delete $VENV and rerun)" >&2; exit 1 ;;
  esac
}
