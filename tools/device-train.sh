#!/usr/bin/env bash
# Continue a resumable `nqe train` or `nqe teacher` run on a lent GPU machine (the `device`
# tool), within its limits: 64 MiB carried per call, nothing but the repo travels, 15 minutes
# of device time. The run's last.pt says which command resumes it.
#
# Here (the CPU machine), once:
#   tools/device-train.sh prepare runs/RUN      # CIFAR chunks + the run's last.pt into .device_carry/
# On the device, three consecutive calls while the machine stays warm (files outside the
# repo survive between them; each carries a part):
#   run "bash tools/device-train.sh stage"                carry [.device_carry/part1]
#   run "bash tools/device-train.sh stage"                carry [.device_carry/part2]
#   run "bash tools/device-train.sh start 480"            carry [.device_carry/part3]
#     (checks the data's sha256, starts training in the background (setsid), waits 480 s,
#      copies last.pt, snapshot.pt, best.pt, history.json and the log to $OUT)
#   run "bash tools/device-train.sh wait 300"             (optional: more epochs, the same copies)
# Here again, with the reply's files_at:
#   tools/device-train.sh collect FILES_AT runs/RUN      # then: nqe train|teacher --out runs/RUN --resume
#
# Why a script: one lost device call costs minutes of a 15-minute budget. The package is run
# from the repo copy with model/rtl/cosim linked under nqe/ (the device has torch, numpy and
# tqdm, not this project installed), from the repo root so the run's relative paths (teacher)
# resolve.
set -euo pipefail
cd "$(dirname "$0")/.."

CARRY=.device_carry
STAGED=/tmp/nqe-device          # outside the repo copy: survives between calls while warm
DATA_SOURCE=${NQE_DATA:-../shared/data}/cifar10
# sha256 of the chunks, from ../shared/data/cifar10/README.md
SUMS="029f57519463ed1a9aab5f7ca52a5f75273fd3ad94d4034212ee63a681eb1388  test.npz
f21720cb5eff130d85b509b4eb12be86a8caa44522ec4a970fa9bcc16384668b  train-0of5.npz
5007df4a1b038d6dd2f8753ae3add774bebb93010324056d05c71b0521163930  train-1of5.npz
c26ee246304d77e1d108afbda43e48a5d069dd1c96adb66b60d21172217fcf29  train-2of5.npz
c617a26054cba0c429bd659fed4f07d649558cecc0cd0b03d7f0a86c3c5cac01  train-3of5.npz
e7ea550248342d21d1b176821b36b0a6bb764a4751fef29f57e2558871263d2f  train-4of5.npz"
RUN_FILES="last.pt snapshot.pt best.pt history.json"

die() { echo "device-train.sh: $*" >&2; exit 2; }

prepare() {     # RUN_DIR
    local run=${1:?usage: prepare runs/RUN}
    [[ -f $run/last.pt ]] || die "$run/last.pt: no such file (the run to continue)"
    [[ -f $DATA_SOURCE/test.npz ]] || die "$DATA_SOURCE: no CIFAR-10 chunks (set NQE_DATA)"
    # Two chunks (54 MiB) a part, the run's files spread so that none, with the repo (~5 MiB),
    # comes near the 64 MiB a call carries.
    rm -rf "$CARRY" && mkdir -p "$CARRY"/part{1,2,3}/data "$CARRY"/part{2,3}/run
    cp "$DATA_SOURCE"/train-0of5.npz "$DATA_SOURCE"/train-1of5.npz "$CARRY"/part1/data/
    cp "$DATA_SOURCE"/train-2of5.npz "$DATA_SOURCE"/train-3of5.npz "$CARRY"/part2/data/
    cp "$DATA_SOURCE"/train-4of5.npz "$DATA_SOURCE"/test.npz "$CARRY"/part3/data/
    cp "$run"/last.pt "$CARRY"/part2/run/
    if [[ -f $run/best.pt ]]; then cp "$run"/best.pt "$CARRY"/part3/run/; fi
    du -sh "$CARRY"/part*
}

stage() {       # copy whatever this call carried to $STAGED
    mkdir -p "$STAGED"/data "$STAGED"/run
    local part
    for part in "$CARRY"/part*; do
        [[ -d $part/data ]] && cp -n "$part"/data/* "$STAGED"/data/ 2>/dev/null || true
        [[ -d $part/run ]] && cp -n "$part"/run/* "$STAGED"/run/ 2>/dev/null || true
    done
    ls -la "$STAGED"/data "$STAGED"/run
}

run_kind() {    # LAST_PT: "teacher" or "train", the nqe command that resumes it
    local python    # the device's python3 has torch; here, the project's venv has it
    for python in ${PYTHON:-} .venv/bin/python python3; do
        "$python" -c 'import torch' 2>/dev/null || continue
        "$python" -c 'import sys, torch
print(torch.load(sys.argv[1], map_location="cpu", weights_only=False).get("kind", "train"))' "$1"
        return
    done
    die "no python with torch to read $1 (set PYTHON)"
}

link_package() {
    local name
    for name in model rtl cosim; do [[ -e nqe/$name ]] || ln -s "../$name" "nqe/$name"; done
}

collect_out() {  # copy the run's files and the log's end to $OUT
    [[ -n ${OUT:-} ]] || die "\$OUT is not set (not on the device machine)"
    local name
    for name in $RUN_FILES; do [[ -f $STAGED/run/$name ]] && cp "$STAGED/run/$name" "$OUT/"; done
    tr '\r' '\n' < "$STAGED"/train.log | grep -v '%|' | tail -n 200 > "$OUT"/train.log || true
    [[ -f $STAGED/run/history.json ]] || { echo "no epoch finished yet"; return 0; }
    python3 - "$STAGED"/run/history.json <<'EOF' || true
import json, sys
rows = json.load(open(sys.argv[1]))
for r in rows[-3:]:
    val = "skipped" if r["val_acc"] is None else f"{r['val_acc']:.4f}"
    print(f"epoch {r['epoch']}: train {r['train_acc']:.4f} val {val} "
          f"{r.get('phase', 'teacher')} {r['seconds']:.1f} s on {r.get('device')}")
EOF
}

wait_and_collect() {    # SECONDS
    local seconds=${1:?seconds}
    sleep "$seconds"
    collect_out
    pgrep -f "nqe [a-z]* --out $STAGED/run" >/dev/null && echo "training still running" \
        || { echo "training process ended:"; tail -c 2000 "$STAGED"/train.log; }
}

start() {       # SECONDS
    stage
    (cd "$STAGED"/data && echo "$SUMS" | sha256sum --check --quiet) \
        || die "CIFAR-10 chunks missing or damaged in $STAGED/data"
    [[ -f $STAGED/run/last.pt ]] || die "$STAGED/run/last.pt missing (carry part2 before)"
    link_package
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
    local kind     # a teacher run's state says so; a student run's has no kind
    kind=$(run_kind "$STAGED"/run/last.pt)
    PYTHONUNBUFFERED=1 setsid nohup python3 -m nqe "$kind" --out "$STAGED"/run --resume \
        --data "$STAGED"/data --device "${NQE_DEVICE:-cuda}" --no-progress \
        > "$STAGED"/train.log 2>&1 < /dev/null &
    wait_and_collect "$1"
}

collect() {     # FILES_AT RUN_DIR
    local from=${1:?usage: collect FILES_AT runs/RUN} run=${2:?usage: collect FILES_AT runs/RUN}
    [[ -f $from/last.pt ]] || die "$from/last.pt: no such file"
    mkdir -p "$run"
    local name
    for name in $RUN_FILES; do
        [[ -f $from/$name ]] && install -m 644 "$from/$name" "$run/$name"
    done
    echo "continue with: nqe $(run_kind "$run"/last.pt) --out $run --resume --device cpu" \
        "--data ${NQE_DATA:-../shared/data}"
}

command=${1:-}; shift || true
case $command in
    prepare) prepare "$@" ;;
    stage) stage ;;
    start) start "$@" ;;
    wait) wait_and_collect "$@" ;;
    collect) collect "$@" ;;
    *) die "usage: $0 prepare RUN_DIR | stage | start SECONDS | wait SECONDS | collect FILES_AT RUN_DIR" ;;
esac
