#!/usr/bin/env bash
# The GPU check of the project in one call: every stage's training units at the navigation and D4RL sizes with 1
# and 10 vmapped seeds (bench/bench_stages.py; short runs extrapolated to the full schedules), and the whole
# navigation pipeline with 10 seeds at reduced schedules. Writes REPORT_DIR/device_check.md (and the raw JSON).
#   bash scripts/device_check.sh REPORT_DIR            # on the GPU machine, about 8 minutes
#   TINY=1 bash scripts/device_check.sh REPORT_DIR     # the same steps with tiny sizes (a CPU smoke test, ~2 min)
#
# The GPU machine may have no internet and only JAX (CUDA), flax, optax, chex, scikit-learn, matplotlib, h5py and
# tensorboard. What the project needs beyond those travels as wheels in the ignored folder .whl/ (11 MB), made
# beforehand on a machine with internet, for the GPU machine's Python (3.12, x86-64):
#   P="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#      --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $P -d .whl \
#     tyro==1.0.17 docstring_parser==0.18.0 typeguard==4.6.1 gymnasium==1.4.0 farama-notifications==0.0.6 \
#     minari==0.5.4 tensorboardX==2.6.5 mujoco==3.3.7 glfw==2.11.0 PyOpenGL==3.1.10
# (--no-deps: each need of those five that the GPU machine lacks is named; `unzip -p .whl/NAME-*.whl '*/METADATA'
# | grep ^Requires-Dist` lists them). This script installs them with pip install --no-index --target, so nothing
# is fetched. Where everything is installed already (this repository's requirements.txt), it installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash scripts/device_check.sh REPORT_DIR}
mkdir -p "$OUT"
if ! python3 -c "import tyro, gymnasium, minari, tensorboardX, mujoco" 2>/dev/null; then
  ls .whl/*.whl >/dev/null 2>&1 || { echo "error: tyro, gymnasium, minari, tensorboardX or mujoco is missing and" \
    "there are no wheels in .whl/ (see this script's header)"; exit 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 MUJOCO_GL=${MUJOCO_GL:-egl}
exec python3 scripts/device_check.py --out "$OUT" ${TINY:+--tiny}
