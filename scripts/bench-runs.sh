# Sourced by the benchmark scripts (scripts/bench-*.sh): keeps the raw output of every run, with its
# exact command, so that each figure in docs/BENCHMARKS.md can be traced to what produced it.
#
#   . "$here/scripts/bench-runs.sh"
#   bench_runs_start "$0" "$@"              # docs/bench-runs/DATE-COMMIT/SCRIPT-HHMMSS/
#   gpuio=$(bench_runs_wrap "$gpuio")       # every gpuio run recorded
#   bench_runs_wrap_on_path fio             # every fio run recorded (a wrapper first on PATH)
#
# Layout of the directory ($runs_dir):
#   command.txt        the script's command line, the start time, the machine
#   output.txt         everything the script printed (standard output and error)
#   raw/N-NAME.cmd     the exact command line of one run of a wrapped program
#   raw/N-NAME.out     its standard output (the JSON the script parsed)
# N orders the runs by their start. DATE is `date -u +%F`, COMMIT `git rev-parse --short HEAD`, with
# `-dirty` when the work tree has changes (or `nogit` outside a git checkout).

bench_runs_start() { # SCRIPT ARGS...
  local script
  script=$(basename "$1" .sh)
  shift
  local date commit
  date=$(date -u +%F)
  commit=$(git -C "$here" rev-parse --short HEAD 2>/dev/null || echo nogit)
  if [ "$commit" != nogit ] && ! git -C "$here" diff --quiet HEAD -- 2>/dev/null; then
    commit="$commit-dirty"
  fi
  runs_dir="$here/docs/bench-runs/$date-$commit/$script-$(date -u +%H%M%S)"
  mkdir -p "$runs_dir/raw" "$runs_dir/bin"
  {
    printf 'command: scripts/%s.sh' "$script"
    printf ' %q' "$@"
    printf '\nstarted: %s\nmachine: %s, %s CPUs, kernel %s\n' "$(date -u +%FT%TZ)" \
      "$(uname -m)" "$(nproc)" "$(uname -r)"
    [ -n "${GPUIO_BENCH_ARGS:-}" ] && printf 'GPUIO_BENCH_ARGS=%q\n' "$GPUIO_BENCH_ARGS"
    [ -n "${GPUIO_BENCH_ALT:-}" ] && printf 'GPUIO_BENCH_ALT=%q\n' "$GPUIO_BENCH_ALT"
    true
  } >"$runs_dir/command.txt"
  exec > >(tee -a "$runs_dir/output.txt") 2>&1
  echo "raw outputs: $runs_dir"
}

bench_runs_wrap() { # PROGRAM [NAME] -> prints the path of a wrapper that records each run of PROGRAM
  local real=$1 name=${2:-$(basename "$1")}
  local w="$runs_dir/bin/$name"
  {
    echo '#!/usr/bin/env bash'
    echo "# Runs $name, keeping its command line and standard output (written by scripts/bench-runs.sh)."
    printf 'real=%q\nraw=%q\nname=%q\n' "$real" "$runs_dir/raw" "$name"
    cat <<'EOF'
n="$(date +%s%N)-$name-$$"
{ printf '%q' "$real"; printf ' %q' "$@"; echo; } >"$raw/$n.cmd"
"$real" "$@" | tee "$raw/$n.out"
exit "${PIPESTATUS[0]}"
EOF
  } >"$w"
  chmod +x "$w"
  echo "$w"
}

bench_runs_wrap_on_path() { # NAME: records every run of NAME found on PATH (if it is installed)
  local real
  real=$(command -v "$1") || return 0
  bench_runs_wrap "$real" "$1" >/dev/null
  case ":$PATH:" in
    *":$runs_dir/bin:"*) ;;
    *) export PATH="$runs_dir/bin:$PATH" ;;
  esac
}
