#!/usr/bin/env bash
# One-shot GPU acceptance check of diagode-dist: install, environment, GPU tests, probes, a
# LocalCUDACluster demo and the roofline benchmark; one JSON + Markdown report. About 5-8 min
# on one H100/H200; each step has a time limit (under 10 min together after the install).
#
# Usage (from the repository root):
#   bash benchmarks/gpu_check.sh [--out DIR] [--install MODE] [--dry-run]
#
#   --out DIR       where the report goes (default: gpu-check-out): report.json, report.md,
#                   gpu_check.log (every step's output), probes.json, roofline.md,
#                   pytest-gpu.xml, steps.tsv, meta.json
#   --install MODE  extra  (default) pip install -e ".[gpu,test,bench]": CuPy and dask-cuda for
#                          CUDA 12 from the gpu extra;
#                   wheels:DIR  an image that already has CuPy (any cupy-cudaXXx wheel) and torch
#                          but no Dask: install the wheels carried in DIR (dask, distributed,
#                          dask-cuda and what they need) with --no-deps, then the project with
#                          pip install --no-deps -e . (so the gpu extra's cupy-cuda12x is never
#                          pulled on top of the image's CuPy);
#                   none   use what is installed.
#   --dry-run       without a GPU: every step on the CPU at small sizes (a check of this script);
#                   the report says "no GPU". Without --dry-run and without a usable GPU the
#                   script stops after the environment step with "no GPU: <reason>", exit 2.
#
# Exit status: 0 every step passed; 1 a step failed (see the report); 2 no GPU; 64 usage.
set -uo pipefail

OUT=gpu-check-out
INSTALL=extra
DRY_RUN=0
while [[ $# -gt 0 ]]; do
    case $1 in
        --out) OUT=${2:?--out needs a folder}; shift 2 ;;
        --out=*) OUT=${1#--out=}; shift ;;
        --install) INSTALL=${2:?--install needs extra, wheels:DIR or none}; shift 2 ;;
        --install=*) INSTALL=${1#--install=}; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 64 ;;
    esac
done
case $INSTALL in
    extra|none|wheels:?*) ;;
    *) echo "gpu_check.sh: --install must be extra, wheels:DIR or none, got '$INSTALL'" >&2
       exit 64 ;;
esac

mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 64  # relative to the caller's folder
[[ $INSTALL == wheels:* ]] && INSTALL=wheels:$(cd "${INSTALL#wheels:}" 2>/dev/null && pwd || echo "${INSTALL#wheels:}")
cd "$(dirname "$0")/.." || exit 64
export PY=${PYTHON:-python3} INSTALL
rm -f "$OUT"/{report.json,report.md,gpu_check.log,probes.json,roofline.md,pytest-gpu.xml,steps.tsv,meta.json}
LOG=$OUT/gpu_check.log
STARTED=$(date +%s)
FAILED=0
export PYTHONUNBUFFERED=1

say() { printf '[gpu_check %(%H:%M:%S)T] %s\n' -1 "$*" | tee -a "$LOG" >&2; }

# step NAME LIMIT_S COMMAND...: run it with a time limit, its output into the log (and the
# terminal), its exit status and duration into steps.tsv.
step() {
    local name=$1 limit=$2 t0 rc
    shift 2
    say "== $name (limit ${limit} s): $*"
    t0=$(date +%s.%N)
    if declare -F "$1" >/dev/null; then  # a function of this script: in a bash of its own
        set -- bash -c "$(declare -f "$1"); $1"
    fi
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    [[ $rc -eq 124 || $rc -eq 137 ]] && say "$name: stopped after its limit of ${limit} s"
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(python3 -c "print(f'{$(date +%s.%N) - $t0:.1f}')")" \
        >>"$OUT/steps.tsv"
    [[ $rc -eq 0 ]] || FAILED=1
    say "$name: exit $rc"
    return "$rc"
}

skip_step() { printf '%s\tskipped: %s\t\n' "$1" "$2" >>"$OUT/steps.tsv"; say "$1: skipped: $2"; }

install() {
    case $INSTALL in
        extra) "$PY" -m pip install -q -e ".[gpu,test,bench]" ;;
        wheels:*)
            local dir=${INSTALL#wheels:}
            compgen -G "$dir/*.whl" >/dev/null || { echo "no wheels in $dir"; return 1; }
            "$PY" -m pip install -q --no-index --no-deps --no-compile "$dir"/*.whl || return
            # offline: no build isolation (it would download setuptools); without a usable
            # setuptools/wheel the checkout is used from PYTHONPATH instead (see below)
            "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . \
                || echo "pip install -e . failed: the project is used from the checkout" ;;
        none) echo "using the installed packages" ;;
    esac
}

environment() {
    echo "python: $("$PY" -V 2>&1) at $(command -v "$PY")"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
        --format=csv,noheader
    "$PY" - <<'EOF'
from importlib import metadata
for name in ("diagode-dist", "numpy", "scipy", "cupy", "cupy-cuda13x", "cupy-cuda12x", "dask",
             "distributed", "dask-cuda", "rmm", "rmm-cu12", "rmm-cu13", "torch", "torchdiffeq"):
    try:
        print(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(f"{name}: not installed")
try:
    import cupy
    cupy.show_config()
except Exception as exc:  # no CuPy, or no driver: the detect step says what follows
    print(f"cupy.show_config() unavailable: {type(exc).__name__}: {exc}")
EOF
}

if [[ $INSTALL == none ]]; then skip_step install "--install none"; else step install 300 install; fi
# Importable from anywhere, or else from the checkout (every step runs in its root; Dask's
# worker processes inherit the path).
if ! (cd / && "$PY" -c "import diagode_dist" 2>/dev/null); then
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    say "diagode_dist is not installed: using the checkout $PWD on PYTHONPATH"
fi
step environment 45 environment
GPU_LINE=$("$PY" -m benchmarks.gpu_probes detect 2>&1 | tail -n 1)
[[ $GPU_LINE == "GPU:"* || $GPU_LINE == "no GPU:"* ]] || GPU_LINE="no GPU: $GPU_LINE"
say "$GPU_LINE"

if [[ $GPU_LINE == "GPU:"* ]]; then
    MODE=gpu; DEVICE=cuda; SMALL=()
elif [[ $DRY_RUN -eq 1 ]]; then
    MODE="dry run on the CPU (${GPU_LINE})"; DEVICE=cpu; SMALL=(--small)
else
    MODE="no GPU"
fi
"$PY" - "$OUT/meta.json" "$MODE" "$GPU_LINE" "$(date -u +%Y-%m-%dT%H:%M:%SZ -d "@$STARTED")" <<'EOF'
import json, sys
path, mode, gpu, started = sys.argv[1:5]
json.dump({"mode": mode, "gpu": gpu, "started": started}, open(path, "w"))
EOF

finish() {
    local total=$(( $(date +%s) - STARTED ))
    "$PY" - "$OUT/meta.json" "$total" <<'EOF'
import json, sys
meta = json.load(open(sys.argv[1]))
meta["total_seconds"] = int(sys.argv[2])
json.dump(meta, open(sys.argv[1], "w"))
EOF
    "$PY" -m benchmarks.gpu_probes report "$OUT" >/dev/null 2>>"$LOG" || true
    say "report: $OUT/report.md and $OUT/report.json ($total s)"
}

if [[ $MODE == "no GPU" ]]; then
    for name in pytest-gpu probes demo roofline; do skip_step "$name" "$GPU_LINE"; done
    finish
    echo "gpu_check.sh: ${GPU_LINE} -- nothing to check (--dry-run runs the steps on the CPU)" >&2
    exit 2
fi

# The GPU tests (they skip, with reasons, without a GPU).
step pytest-gpu 170 "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider \
    --junitxml="$OUT/pytest-gpu.xml"
# Probes: CGS2 step memory and time, chunk stability, MSE with 40 observation times, the
# batched solve above 256.
step probes 120 "$PY" -m benchmarks.gpu_probes run --json "$OUT/probes.json" --device "$DEVICE" \
    "${SMALL[@]}" --probes env,cgs2_step,chunk,mse_obs,large_solve
# The demo problem on a one-worker LocalCUDACluster (a LocalCluster in a dry run).
step demo 90 "$PY" -m benchmarks.gpu_probes run --json "$OUT/probes.json" --device "$DEVICE" \
    "${SMALL[@]}" --probes demo
# The roofline benchmark (prints a skip line without a GPU).
if [[ $DEVICE == cuda ]]; then
    step roofline 150 bash -c "set -o pipefail; '$PY' -m benchmarks --cases none --gpu \
        --markdown --repeat 3 --peer-budget 45 | tee '$OUT/roofline.md'"
else
    step roofline 120 bash -c "set -o pipefail; '$PY' -m benchmarks --cases none --gpu \
        --markdown --quick | tee '$OUT/roofline.md'"
fi
finish
exit "$FAILED"
