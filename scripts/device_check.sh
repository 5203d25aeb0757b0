#!/usr/bin/env bash
# The GPU check of the project in one call of under 10 minutes (scripts/device_check.py's --budget, 550 s, plus
# the wheels): the README's main command with SEEDS=10 at the paper's full schedules (run_nav.sh's defaults), its
# wall time per stage and Table 1's EMPO row; then every stage's 8 training units at the navigation and D4RL sizes
# with 1 and 10 vmapped seeds (bench/bench_stages.py, the stage alone, FLOPs per call from docs/bench/flops_*.json
# so that no probe is compiled here); then 3 units with 100 seeds (the seeds scaling). Writes REPORT_DIR/
# device_check.md, device_check.json, device_check.log (every part's output) and the benchmarks' JSON: 8 files.
#   bash scripts/device_check.sh REPORT_DIR            # on the GPU machine, about 9.5 minutes
#   TINY=1 bash scripts/device_check.sh REPORT_DIR     # the same steps with tiny sizes (a CPU smoke test)
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
