#!/usr/bin/env bash
# run_all.sh - the whole study: centralized baseline -> model editing -> FedAvg -> summary.
#
# usage: [RESULTS=./runs] ./run_all.sh [--quick] [--seeds 0,1,2] [--gpus N | --slurm] [--dry-run]
#                                      [--summary-only] [-- FLAGS FOR EVERY PYTHON COMMAND]
#
#   --quick           a reduced grid with short runs (a smoke check of the whole pipeline)
#   --seeds LIST      comma-separated seeds; every experiment runs once per seed (default: 0)
#   --gpus N          N runs at once, one per GPU (CUDA_VISIBLE_DEVICES); default: one at a time
#   --slurm           submit one job array per stage to SLURM instead of running here
#     --partition P --time T --account A   sbatch options (default: $SLURM_PARTITION, $SLURM_TIME,
#                     $SLURM_ACCOUNT; unset: the cluster's defaults)
#     --gres G        GPUs per task (default: gpu:1; --gres '' asks for none)
#   --dry-run         print the commands (and skip lines) and do nothing else
#   --summary-only    only rebuild the tables and plots (python summarize.py $RESULTS)
#   -- FLAGS          appended last to every python command, e.g.
#                     -- --dataset synthetic --arch test_vit --no-pretrained --img-size 32 --device cpu
#
# Stages (each waits for the previous one): 1. centralized grid search + dense FedAvg (they need
# nothing), 2. model editing (reads the centralized result.json of its seed), 3. sparse FedAvg
# (reads the mask.pt of the default editing run of its seed). A run whose result.json exists is
# skipped; any other run is started with --resume, so an interrupted study continues where it
# stopped. Every run has its own directory under $RESULTS, its log in $RESULTS/logs/.
# $PYTHON picks the interpreter (default: python).
set -euo pipefail

die() { echo "run_all.sh: error: $*" >&2; exit 2; }
# A command as one shell-quoted line: printed, logged, written to SLURM command files, eval'ed.
quote() { local s; s=$(printf '%q ' "$@"); echo "${s% }"; }

HERE=$(dirname "$0")
PY=${PYTHON:-python}
RESULTS=${RESULTS:-./runs}
RESULTS=${RESULTS%/}

# ----------------------------------------------------------------------------- flags

QUICK=0 SEEDS=0 GPUS="" SLURM=0 DRY=0 SUMMARY_ONLY=0 EXTRA=()
PARTITION=${SLURM_PARTITION:-} TIME=${SLURM_TIME:-} ACCOUNT=${SLURM_ACCOUNT:-} GRES=gpu:1
needs_value() { [[ $# -ge 2 && $2 != --* ]] || die "$1 needs a value"; }
while (($#)); do
  case $1 in
    --quick) QUICK=1 ;;
    --seeds) needs_value "$@"; SEEDS=$2; shift ;;
    --gpus) needs_value "$@"; GPUS=$2; shift ;;
    --slurm) SLURM=1 ;;
    --partition) needs_value "$@"; PARTITION=$2; shift ;;
    --time) needs_value "$@"; TIME=$2; shift ;;
    --account) needs_value "$@"; ACCOUNT=$2; shift ;;
    --gres) [[ $# -ge 2 ]] || die "--gres needs a value"; GRES=$2; shift ;;
    --dry-run) DRY=1 ;;
    --summary-only) SUMMARY_ONLY=1 ;;
    -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

SEED_RE='(0|[1-9][0-9]*)'
[[ $SEEDS =~ ^$SEED_RE(,$SEED_RE)*$ ]] || die "--seeds wants comma-separated integers >= 0, got '$SEEDS'"
[[ -z $(tr , '\n' <<< "$SEEDS" | sort | uniq -d) ]] || die "--seeds lists a seed twice: $SEEDS"
[[ -z $GPUS || $GPUS =~ ^[1-9][0-9]*$ ]] || die "--gpus wants an integer >= 1, got '$GPUS'"
GPUS=${GPUS:-0}
((!(SLURM && GPUS))) || die "--gpus and --slurm exclude each other (SLURM gives each task its GPU)"
[[ ! -e $RESULTS || -d $RESULTS ]] || die "RESULTS=$RESULTS is a file, not a directory"
for a in "${EXTRA[@]}"; do
  case $a in
    --out|--out=*|--seed|--seed=*|--resume)
      die "'$a' after -- is set by run_all.sh itself (use --seeds and RESULTS=)" ;;
  esac
done
# With --gpus, run k uses the k-th visible GPU (the k-th entry of CUDA_VISIBLE_DEVICES if set).
if ((GPUS)); then
  IFS=, read -ra DEVICES <<< "${CUDA_VISIBLE_DEVICES:-$(seq -s, 0 $((GPUS - 1)))}"
  ((${#DEVICES[@]} >= GPUS)) || die "--gpus $GPUS but CUDA_VISIBLE_DEVICES lists ${#DEVICES[@]} GPUs"
fi
if ((SLURM && !DRY && !SUMMARY_ONLY)); then
  command -v sbatch > /dev/null || die "--slurm: sbatch is not on PATH (run this on a SLURM login node)"
fi

SUMMARY_CMD=$(quote "$PY" "$HERE/summarize.py" "$RESULTS")
if ((SUMMARY_ONLY)); then
  if ((DRY)); then echo "$SUMMARY_CMD"; exit 0; fi
  [[ -d $RESULTS ]] || die "RESULTS=$RESULTS does not exist: nothing to summarize"
  exec "$PY" "$HERE/summarize.py" "$RESULTS"
fi

# The directory names below do not encode --quick or the flags after --, so one results root
# holds one kind of study: the first real run records its settings, a later one must match.
GRID=full EXTRA_LINE=""
((QUICK == 0)) || GRID=quick
((${#EXTRA[@]} == 0)) || EXTRA_LINE=$(quote "${EXTRA[@]}")
SETTINGS="grid=$GRID extra=$EXTRA_LINE"
if [[ -f $RESULTS/run_all.settings && $(< "$RESULTS/run_all.settings") != "$SETTINGS" ]]; then
  die "RESULTS=$RESULTS holds a study with other settings ($(< "$RESULTS/run_all.settings")): use another RESULTS="
fi

# ----------------------------------------------------------------------------- the grid

RULES=(least-sensitive most-sensitive lowest-magnitude highest-magnitude random)
RULE_SPARSITY=0.9  # the 5 rules run at this sparsity and RULE_ROUNDS calibration rounds; this
                   # least-sensitive run is the "default editing run" whose mask sparse FedAvg uses
if ((QUICK)); then
  CENTRAL_ARGS=(--grid --compare-schedulers --epochs 2 --grid-lr 0.1,0.01 --grid-momentum 0.9 --grid-wd 0
                --schedulers cosine,constant)
  EDIT_ARGS=(--epochs 1 --warmup-epochs 2 --fisher-batches 1)
  RULE_ROUNDS=2 SPARSITIES=(0.5 0.9) ROUNDS=(1 2)
  SPLITS=(iid nc1) JS=(4 8) FED_ARGS=(--rounds 4 --eval-every 2)
else
  CENTRAL_ARGS=(--grid --compare-schedulers)  # 3 lr x 3 momentum x 2 wd, then all 5 schedulers
  EDIT_ARGS=()
  RULE_ROUNDS=4 SPARSITIES=(0.5 0.75 0.9 0.95 0.99) ROUNDS=(1 2 4 8)
  SPLITS=(iid nc1 nc5 nc10 nc50) JS=(4 8 16) FED_ARGS=()
fi
STAGE_NAMES=("" "centralized + dense FedAvg" "model editing (needs the centralized result)"
             "sparse FedAvg (needs the editing mask)")

RUN_STAGE=() RUN_DIR=() RUN_CMD=()
add_run() {  # add_run STAGE DIR SCRIPT ARGS...: one experiment for $seed
  local stage=$1 dir=$2 script=$3
  shift 3
  RUN_STAGE+=("$stage") RUN_DIR+=("$dir")
  RUN_CMD+=("$(quote "$PY" "$HERE/$script" "$@" --seed "$seed" --out "$dir" --resume "${EXTRA[@]}")")
}

add_fedavg() {  # add_fedavg STAGE DENSE|SPARSE-ARGS...
  local stage=$1 kind=$2 split j
  shift 2
  for split in "${SPLITS[@]}"; do
    for j in "${JS[@]}"; do
      local data=(--iid)
      [[ $split == iid ]] || data=(--nc "${split#nc}")
      add_run "$stage" "$RESULTS/fedavg/${split}_j${j}_$kind/seed$seed" fedavg.py \
        --k 100 --c 0.1 --j "$j" --scale-rounds "${data[@]}" "${FED_ARGS[@]}" "$@"
    done
  done
}

for seed in ${SEEDS//,/ }; do
  central=$RESULTS/centralized/seed$seed
  add_run 1 "$central" centralized.py "${CENTRAL_ARGS[@]}"
  add_fedavg 1 dense

  declare -A seen=()
  edits=()
  for rule in "${RULES[@]}"; do edits+=("$rule $RULE_SPARSITY $RULE_ROUNDS"); done
  for s in "${SPARSITIES[@]}"; do
    for r in "${ROUNDS[@]}"; do edits+=("least-sensitive $s $r"); done
  done
  for e in "${edits[@]}"; do
    read -r rule s r <<< "$e"
    dir=$RESULTS/editing/${rule}_s${s}_r${r}/seed$seed
    [[ -z ${seen[$dir]:-} ]] || continue  # least-sensitive at the rules' setting is in both lists
    seen[$dir]=1
    add_run 2 "$dir" model_editing.py --hparams "$central/result.json" --rule "$rule" --sparsity "$s" \
      --calib-rounds "$r" "${EDIT_ARGS[@]}"
  done

  default_edit=$RESULTS/editing/least-sensitive_s${RULE_SPARSITY}_r${RULE_ROUNDS}/seed$seed
  add_fedavg 3 sparse --sparse --mask "$default_edit/mask.pt"
done

# Finished runs are skipped: TODO lists (the indices of) the runs still to do.
TODO=()
for i in "${!RUN_DIR[@]}"; do
  if [[ -f ${RUN_DIR[i]}/result.json ]]; then echo "skip (done): ${RUN_DIR[i]}"; else TODO+=("$i"); fi
done
stage_todo() {  # stage_todo K: sets STAGE_TODO to the runs of stage K still to do
  local i
  STAGE_TODO=()
  for i in "${TODO[@]}"; do [[ ${RUN_STAGE[i]} != "$1" ]] || STAGE_TODO+=("$i"); done
}

# Download CIFAR-100 and the weights once, before parallel runs or array tasks could all try.
prefetch_cmd() {
  local dataset=cifar100 data_dir=./data arch="" hub=1 i
  for ((i = 0; i < ${#EXTRA[@]}; i++)); do
    case ${EXTRA[i]} in
      --dataset) dataset=${EXTRA[i + 1]:-} ;;  --dataset=*) dataset=${EXTRA[i]#*=} ;;
      --data-dir) data_dir=${EXTRA[i + 1]:-} ;;  --data-dir=*) data_dir=${EXTRA[i]#*=} ;;
      --arch) arch=${EXTRA[i + 1]:-} ;;  --arch=*) arch=${EXTRA[i]#*=} ;;
      --weights|--weights=*|--no-pretrained) hub=0 ;;
    esac
  done
  [[ $dataset != synthetic ]] || return 0
  if ((hub)); then
    quote "$PY" "$HERE/common.py" --data-dir "$data_dir" ${arch:+--arch "$arch"}
  else  # a local weights file or a random backbone: only the data
    quote "$PY" "$HERE/common.py" --data-dir "$data_dir" --data-only
  fi
}
PREFETCH=$( ((${#TODO[@]})) && prefetch_cmd || true)

if ((DRY)); then
  [[ -z $PREFETCH ]] || echo "$PREFETCH"
  for k in 1 2 3; do
    stage_todo $k
    echo "# stage $k/3: ${STAGE_NAMES[k]}: ${#STAGE_TODO[@]} to run"
    for i in "${STAGE_TODO[@]}"; do echo "${RUN_CMD[i]}"; done
  done
  echo "$SUMMARY_CMD"
  exit 0
fi

# ----------------------------------------------------------------------------- running

if [[ -n $PREFETCH ]]; then  # first: if it fails (no network, no data), nothing else is written
  echo "prefetch: $PREFETCH"
  eval "$PREFETCH"
fi
mkdir -p "$RESULTS/logs"
[[ -f $RESULTS/run_all.settings ]] || echo "$SETTINGS" > "$RESULTS/run_all.settings"
log_of() { local rel=${1#"$RESULTS"/}; echo "$RESULTS/logs/${rel//\//_}.log"; }

if ((SLURM)); then
  mkdir -p "$RESULTS/slurm"
  task=$RESULTS/slurm/task.sh
  cat > "$task.tmp" << 'EOF'
#!/usr/bin/env bash
# One task of a run_all.sh job array: runs line $SLURM_ARRAY_TASK_ID (counted from 0) of the file $1.
set -euo pipefail
cmd=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "$1")
echo "$cmd"
eval "$cmd"
EOF
  mv "$task.tmp" "$task"
  opts=(--parsable --chdir "$PWD" ${PARTITION:+--partition "$PARTITION"} ${TIME:+--time "$TIME"}
        ${ACCOUNT:+--account "$ACCOUNT"})
  stamp=$(date +%Y%m%d-%H%M%S)-$$  # command files of earlier submissions may still be read
  prev=""
  for k in 1 2 3; do
    stage_todo $k
    n=${#STAGE_TODO[@]}
    ((n)) || { echo "stage $k/3: nothing to run"; continue; }
    cmds=$RESULTS/slurm/$stamp-stage$k.cmds
    for i in "${STAGE_TODO[@]}"; do
      echo "${RUN_CMD[i]} >> $(quote "$(log_of "${RUN_DIR[i]}")") 2>&1"
    done > "$cmds.tmp"
    mv "$cmds.tmp" "$cmds"
    id=$(sbatch "${opts[@]}" ${GRES:+--gres "$GRES"} ${prev:+--dependency "afterok:$prev"} \
      --array "0-$((n - 1))" --job-name "run_all-stage$k" \
      --output "$RESULTS/logs/slurm-%A_%a.out" "$task" "$cmds")
    prev=${id%%;*}  # --parsable prints "jobid" or "jobid;cluster"
    echo "stage $k/3: ${STAGE_NAMES[k]}: job array $prev, $n tasks ($cmds)"
  done
  id=$(sbatch "${opts[@]}" ${prev:+--dependency "afterok:$prev"} --job-name run_all-summary \
    --output "$RESULTS/logs/slurm-summary-%j.out" --wrap "$SUMMARY_CMD")
  echo "summary: job ${id%%;*}; tables and plots will be in $RESULTS/summary/ (logs in $RESULTS/logs/)"
  exit 0
fi

# Local: a pool of max(GPUS, 1) slots; slot g runs on DEVICES[g]. Between stages, all runs finish.
# Runs side by side share the CPU cores (unless OMP_NUM_THREADS says otherwise): torch's default of
# one thread per core in every process oversubscribes the CPU and can slow all of them down many times.
SLOTS=$((GPUS > 0 ? GPUS : 1))
THREADS=$(($(nproc) / SLOTS > 0 ? $(nproc) / SLOTS : 1))
SLOT_PID=() SLOT_RUN=() SLOT_T0=() FAILED=()
for ((g = 0; g < SLOTS; g++)); do SLOT_PID[g]=""; done

reap() {  # reap G: collect the finished run of slot G
  local g=$1 i=${SLOT_RUN[$1]} status=0
  wait "${SLOT_PID[g]}" || status=$?
  SLOT_PID[g]=""
  if ((status == 0)) && [[ -f ${RUN_DIR[i]}/result.json ]]; then
    echo "done ($((SECONDS - SLOT_T0[g]))s): ${RUN_DIR[i]}"
  else
    echo "FAILED (exit $status): ${RUN_DIR[i]}; see $(log_of "${RUN_DIR[i]}")"
    FAILED+=("${RUN_DIR[i]}")
  fi
}

free_slot() {  # sets FREE to an idle slot, waiting for a run to finish if there is none
  local g
  while true; do
    for ((g = 0; g < SLOTS; g++)); do
      if [[ -n ${SLOT_PID[g]} ]] && ! kill -0 "${SLOT_PID[g]}" 2> /dev/null; then reap "$g"; fi
      if [[ -z ${SLOT_PID[g]} ]]; then FREE=$g; return; fi
    done
    sleep 0.2
  done
}

interrupted() {
  local g
  for ((g = 0; g < SLOTS; g++)); do
    [[ -z ${SLOT_PID[g]} ]] || kill -TERM "${SLOT_PID[g]}" 2> /dev/null || true
  done
  echo "interrupted: run the same command again to continue (finished runs are skipped)" >&2
  exit 130
}
trap interrupted INT TERM

for k in 1 2 3; do
  stage_todo $k
  echo "stage $k/3: ${STAGE_NAMES[k]}: ${#STAGE_TODO[@]} to run"
  for i in "${STAGE_TODO[@]}"; do
    free_slot
    g=$FREE
    echo "run: ${RUN_CMD[i]}"
    (
      ((GPUS == 0)) || export CUDA_VISIBLE_DEVICES=${DEVICES[g]} OMP_NUM_THREADS=${OMP_NUM_THREADS:-$THREADS}
      eval "exec ${RUN_CMD[i]}"  # exec: the slot's pid is the python process itself
    ) >> "$(log_of "${RUN_DIR[i]}")" 2>&1 &
    SLOT_PID[g]=$! SLOT_RUN[g]=$i SLOT_T0[g]=$SECONDS
  done
  for ((g = 0; g < SLOTS; g++)); do [[ -z ${SLOT_PID[g]} ]] || reap "$g"; done
  if ((${#FAILED[@]})); then
    echo "stopped after stage $k/3: ${#FAILED[@]} run(s) failed; the later stages need them." >&2
    echo "Fix the cause and run the same command again (finished runs are skipped)." >&2
    exit 1
  fi
done

echo "summary: $SUMMARY_CMD"
eval "$SUMMARY_CMD"
