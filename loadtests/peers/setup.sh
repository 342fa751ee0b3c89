#!/usr/bin/env bash
# Creates the peers' virtual environments for `make bench` (idempotent: a venv whose stamp
# matches its requirements file is left alone).
#
#   loadtests/peers/setup.sh [mlserver] [pytriton]      (default: both)
#
# Each peer gets its own venv beside this script, from requirements-<peer>.txt:
#   .venv-mlserver   Seldon MLServer 1.7.1 (+ uvloop 0.21.0)
#   .venv-pytriton   PyTriton 0.7.0 (Triton Inference Server + Python backend, CPU)
# They never share batchwire's .venv: MLServer and tritonclient pin their own grpcio,
# protobuf and numpy, and both register the protobuf package `inference`.
# PYTHON picks the interpreter (default python3); PyTriton's Python backend loads that
# interpreter's libpython, so it must be built with --enable-shared.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"
PEERS=("$@")
[ ${#PEERS[@]} -eq 0 ] && PEERS=(mlserver pytriton)

for peer in "${PEERS[@]}"; do
  reqs="$HERE/requirements-$peer.txt"
  venv="$HERE/.venv-$peer"
  [ -f "$reqs" ] || { echo "setup.sh: unknown peer '$peer' (no $reqs)" >&2; exit 2; }
  stamp="$venv/.installed"
  want="$(sha256sum "$reqs" | cut -d' ' -f1) $("$PYTHON" -c 'import sys; print(sys.version.split()[0])')"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
    echo "setup.sh: $peer: up to date ($venv)"
    continue
  fi
  echo "setup.sh: $peer: installing into $venv"
  rm -rf "$venv"
  "$PYTHON" -m venv "$venv"
  # NOTE: grep drops pip's noise about local index folders that do not exist; pip's own
  # exit status is the one that counts (pipefail).
  "$venv/bin/pip" install -q -r "$reqs" 2>&1 | { grep -v 'is ignored' || true; }
  echo "$want" > "$stamp"
done

if [[ " ${PEERS[*]} " == *" pytriton "* ]]; then
  shared="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_config_var("Py_ENABLE_SHARED"))')"
  if [ "$shared" != "1" ]; then
    echo "setup.sh: warning: $PYTHON has no shared libpython; PyTriton's backend will not load" >&2
  fi
fi
