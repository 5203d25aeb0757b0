# Sourced by the run scripts (run_nav.sh, reproduce_*.sh). step NAME OUTPUT COMMAND... runs COMMAND unless OUTPUT
# exists (a finished step of an earlier run is kept as it is, so a rerun continues where it stopped) and reports
# its wall time as "=== NAME took N s".
step() {
  local name=$1 output=$2; shift 2
  if [ -f "$output" ]; then echo "=== $name: $output exists, skipped"; return; fi
  local t0=$SECONDS
  echo "=== $name: $*"
  "$@"
  echo "=== $name took $((SECONDS - t0)) s"
}
