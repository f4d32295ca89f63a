#!/usr/bin/env bash
# run_all.sh - the whole study: every run of the grid below, then the tables and plots (summarize.py).
#
# usage: [RESULTS=./runs] [PYTHON=python] ./run_all.sh [--quick | --grid FILE] [--extensions] [--seeds 0,1,2] [--dry-run]
#          [[--gpus G] [--per-gpu N] | --slurm [--partition P] [--time T] [--account A] [--gres G]
#          [--max-parallel M]] [--tensorboard] [--summary-only] [-- FLAGS FOR EVERY RUN]
#
#   --quick           a tiny grid with short runs that still holds every kind of run (a smoke check
#                     of the whole pipeline); its seeds default to 0
#   --grid FILE       your own grid instead of the study's: FILE holds one run a line, a stage script by its
#                     name and its flags (e.g. `fedavg.py --nc 5 --j 4 --lr 0.001`; # comments, blank lines; a
#                     line may not set a flag given after --); each runs per seed like the study's runs
#                     (skipped when done, resumed, packed, SLURM, summary)
#   --extensions      add the FL algorithm comparison: every algorithm at each setting of its grid, from a
#                     zero head and from the step-0 head (dense and sparse), on an IID, an Nc and a Dirichlet
#                     split (python plan.py --grid-table; --dry-run says how many runs and how long it adds)
#   --seeds LIST      comma-separated seeds; every run of the grid runs once per seed (default: 0,1,2)
#   --dry-run         print the commands, then per stage the runs still to do, the images they will
#                     process (forward+backward and forward only) and the time they will take here
#                     with its spread, measured by a probe on the runs' device (seconds; a minute or two
#                     on a busy CPU); write nothing
#   --gpus G          use G GPUs, each run seeing one (CUDA_VISIBLE_DEVICES), from the visible ones
#                     (CUDA_VISIBLE_DEVICES if set, an empty one meaning none; else `nvidia-smi -L`);
#                     default: the runs' default device
#   --per-gpu N       N runs at once on each GPU (--gpus G: G x N at once; the CPU threads are divided
#                     among them). Default: one run per 32 streaming multiprocessors of the GPU, at most 4
#                     and at most one per 8 GiB of its memory (T4: 1, A100: 3, H100 SXM/H200: 4); 1 on the CPU
#   --slurm           submit one job array (a task per run) and a summary job instead of running here.
#                     sbatch reads SBATCH_PARTITION, SBATCH_TIMELIMIT, SBATCH_ACCOUNT, SBATCH_GRES, ...
#                     from the environment as always; these flags, when given, override them:
#     --partition P --time T --account A
#     --gres G        per task (default: gpu:1, or SBATCH_GRES if set; --gres '' for none)
#     --max-parallel M  at most M tasks at once (--array 0-N%M)
#                     Tasks run with --requeue --signal=B:USR1@120: two minutes before the time limit
#                     (or on preemption) the run checkpoints at its next step and the task requeues
#                     itself; the summary job runs after every task ended (afterany).
#   --tensorboard     every run also logs its metrics rows to RUN/tb/ as it goes: `tensorboard --logdir
#                     $RESULTS` shows the study while it runs (needs `pip install tensorboard`; not part of
#                     the study's settings: a study may be continued with or without it)
#   --summary-only    only rebuild the tables and plots (python summarize.py $RESULTS)
#   -- FLAGS          appended to every run, e.g. a CPU-only smoke test (3-6 minutes on a busy 2-core machine):
#                     ./run_all.sh --quick -- --dataset synthetic --arch test_vit --weights standin-sharp --img-size 32 --device cpu
#
# The grid: `python plan.py --grid-table` (plan.py defines the study); the layout of RESULTS and the SLURM
# details: README.md.
# Every run is `python SCRIPT GRID-FLAGS --results $RESULTS --seed S --resume --deterministic FLAGS`;
# seed by seed, the assignment's core runs first. No run reads another; a run whose result.json exists
# with the same flags (config.json) is skipped, any other resumes from its checkpoint: the same command
# continues an interrupted study. One study per RESULTS at a time. Logs: $RESULTS/logs/.
set -euo pipefail

die() { echo "run_all.sh: error: $*" >&2; exit 2; }
# A command as one shell-quoted line: printed, logged, read by Python (shlex) and by SLURM tasks, eval'ed.
# Single quotes, not printf %q: under LC_ALL=C, %q writes a non-ASCII byte as $'\303', which neither
# shlex nor dash reads. A word of only these ASCII characters needs no quotes (as %q leaves it).
quote() {
  local w out=()
  for w; do
    if [[ $w =~ ^[A-Za-z0-9_./=:+@%-]+$ ]]; then out+=("$w"); else out+=("'${w//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}

HERE=$(dirname "$0")
PY=${PYTHON:-python}
RESULTS=${RESULTS-./runs}  # set but empty is refused below, not taken for the default
while [[ $RESULTS == */ && $RESULTS != / ]]; do RESULTS=${RESULTS%/}; done
[[ $RESULTS != -* ]] || RESULTS=./$RESULTS  # the same folder, never taken for a flag by the scripts

# ----------------------------------------------------------------------------- flags

QUICK=0 GRID_FILE="" EXTENSIONS=0 TENSORBOARD=0 SEEDS="" GPUS="" PER_GPU="" SLURM=0 DRY=0 SUMMARY_ONLY=0 EXTRA=() SLURM_ONLY=""
PARTITION="" TIME="" ACCOUNT="" GRES="" GRES_GIVEN=0 MAX_PARALLEL=""
needs_value() { [[ $# -ge 2 && -n $2 && $2 != --* ]] || die "$1 needs a value"; }
# bounded NAME VALUE MAX: an integer from 1 to MAX (bash arithmetic wraps beyond 2^63: compare digits first)
bounded() { [[ $2 =~ ^[1-9][0-9]{0,9}$ ]] && (($2 <= $3)) || die "$1 wants an integer from 1 to $3, got '$2'"; }
while (($#)); do
  case $1 in
    --quick) QUICK=1 ;;
    --grid) needs_value "$@"; GRID_FILE=$2; shift ;;
    --extensions) EXTENSIONS=1 ;;
    --tensorboard) TENSORBOARD=1 ;;
    --seeds) needs_value "$@"; SEEDS=$2; shift ;;
    --gpus) needs_value "$@"; GPUS=$2; shift ;;
    --per-gpu) needs_value "$@"; PER_GPU=$2; shift ;;
    --slurm) SLURM=1 ;;
    --partition) needs_value "$@"; PARTITION=$2 SLURM_ONLY=$1; shift ;;
    --time) needs_value "$@"; TIME=$2 SLURM_ONLY=$1; shift ;;
    --account) needs_value "$@"; ACCOUNT=$2 SLURM_ONLY=$1; shift ;;
    --gres) [[ $# -ge 2 ]] || die "--gres needs a value ('' for none)"; GRES=$2 GRES_GIVEN=1 SLURM_ONLY=$1; shift ;;
    --max-parallel) needs_value "$@"; MAX_PARALLEL=$2 SLURM_ONLY=$1; shift ;;
    --dry-run) DRY=1 ;;
    --summary-only) SUMMARY_ONLY=1 ;;
    -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

((!TENSORBOARD)) || EXTRA+=(--tensorboard)  # every run's flag (the planner refuses it in one line without the package)
# The quick grid is a smoke check: one seed unless asked for more.
[[ -n $SEEDS ]] || { ((QUICK)) && SEEDS=0 || SEEDS=0,1,2; }
SEED_RE='(0|[1-9][0-9]*)'
[[ $SEEDS =~ ^$SEED_RE(,$SEED_RE)*$ ]] || die "--seeds wants comma-separated integers >= 0, got '$SEEDS'"
[[ -z $(tr , '\n' <<< "$SEEDS" | sort | uniq -d) ]] || die "--seeds lists a seed twice: $SEEDS"
(($(tr , '\n' <<< "$SEEDS" | wc -l) <= 100)) || die "--seeds lists more than 100 seeds"
[[ -n $RESULTS ]] || die "RESULTS is empty: give the results root, e.g. RESULTS=./runs (the default when unset)"
[[ $RESULTS != / ]] || die "RESULTS=/ is the filesystem's root: give a folder for the study, e.g. RESULTS=./runs"
[[ $RESULTS != *[$'\t\n']* ]] || die "RESULTS holds a tab or a newline: give a folder without them"
# Beyond these, no machine has the GPUs, a GPU the memory, SLURM the array slots (and each run is a process)
[[ -z $GPUS ]] || bounded --gpus "$GPUS" 1024
[[ -z $PER_GPU ]] || bounded --per-gpu "$PER_GPU" 64
[[ -z $MAX_PARALLEL ]] || bounded --max-parallel "$MAX_PARALLEL" 1000000
[[ -z $GRID_FILE ]] || ((!QUICK && !EXTENSIONS)) || die "--grid FILE is the whole study: it excludes --quick and --extensions"
# A FIFO's read would block the planner (plan.py refuses it too, for a grid file replaced meanwhile)
[[ -z $GRID_FILE || ! -e $GRID_FILE || -f $GRID_FILE ]] ||
  die "--grid $GRID_FILE is not a regular file (a FIFO, a folder, a device): give a grid file"
((SLURM)) || [[ -z $SLURM_ONLY ]] || die "$SLURM_ONLY goes with --slurm"
((!SLURM)) || [[ -z $GPUS && -z $PER_GPU ]] || die "--gpus and --per-gpu exclude --slurm (it gives each task a GPU)"
[[ ! -e $RESULTS || -d $RESULTS ]] || die "RESULTS=$RESULTS is a file, not a directory"
for a in "${EXTRA[@]}"; do
  [[ $a != *$'\n'* ]] || die "a flag after -- holds a newline: $(quote "$a")"
  [[ $a == --?* ]] || continue
  for own in --out --seed --resume --results; do  # and any prefix of them, which argparse once took for them
    [[ $own != "${a%%=*}"* ]] || die "'$a' after -- is set by run_all.sh itself (use --seeds and RESULTS=)"
  done
done

# Asking for more GPUs than exist would hand out device numbers that do not exist, and those runs
# would silently fall back to the CPU (100x slower). An empty CUDA_VISIBLE_DEVICES hides every GPU.
DEVICES=()
if [[ -n $GPUS ]]; then
  if [[ -v CUDA_VISIBLE_DEVICES ]]; then
    IFS=, read -ra DEVICES <<< "$CUDA_VISIBLE_DEVICES"
  elif command -v nvidia-smi > /dev/null; then
    mapfile -t DEVICES < <(nvidia-smi -L 2> /dev/null | grep '^GPU' | awk '{print NR - 1}')
  fi
  ((${#DEVICES[@]} >= GPUS)) || die "--gpus $GPUS but only ${#DEVICES[@]} GPU(s) visible"
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

# A results root is shared data: nothing in it may steer a write elsewhere. Its own files are written
# only as regular files (through a temporary file made inside it, then renamed), its folders only as
# real folders; a link or anything else in their place is refused before anything is written.
root_files_are_plain() {
  local f
  for f in run_all.lock run_all.settings run_all.plan; do
    [[ ! -L $RESULTS/$f && (! -e $RESULTS/$f || -f $RESULTS/$f) ]] ||
      die "$RESULTS/$f is a link or not a regular file: move it away (run_all.sh writes only its own plain files there)"
  done
  for f in logs slurm; do
    [[ ! -L $RESULTS/$f && (! -e $RESULTS/$f || -d $RESULTS/$f) ]] ||
      die "$RESULTS/$f is a link or not a folder: move it away (run_all.sh writes only into its own folders there)"
  done
}
# write_file PATH: stdin into PATH, whole or not at all, never through a link at PATH (a temporary file
# made next to it, mktemp's own, then renamed over it).
write_file() {
  local tmp
  tmp=$(mktemp "$1.XXXXXX") || die "cannot write into $(dirname "$1")"
  cat > "$tmp" && chmod "$(printf '%o' $((0666 & ~0$(umask))))" "$tmp" && mv -f "$tmp" "$1" ||
    { rm -f "$tmp"; die "cannot write $1"; }
}
root_files_are_plain

# Until the runs start, a stop (Ctrl-C, SIGTERM) ends the child at work (the planner, the prefetch, the
# probe) and leaves no new results root behind. Children run with RUN_ALL_PID: they die with this shell.
export RUN_ALL_PID=$$
CHILD="" CREATED_ROOT=0
stop_early() {
  trap '' INT TERM
  set +e  # the child may be gone already, and its status is 143: neither may end this handler early
  [[ -z $CHILD ]] || { kill -TERM "$CHILD" 2> /dev/null; wait "$CHILD" 2> /dev/null; }
  echo "run_all.sh: stopped before the first run started: run the same command again to start" >&2
  forget_new_root
  exit 143
}
forget_new_root() {  # a root this study created and left empty but for its lock goes again
  if ((CREATED_ROOT)); then rm -f "$RESULTS/run_all.lock"; rmdir "$RESULTS" 2> /dev/null || true; fi
}
trap stop_early INT TERM
# read_child COMMAND...: run it as CHILD, its output lines into the array OUTPUT, its exit status returned.
# Read through a process substitution that is the command itself (exec), not $(...), which holds a stop's
# trap until the command has returned: mapfile lets the trap run at once, and the trap can stop CHILD.
read_child() {
  local fd status=0
  exec {fd}< <(exec "$@")
  CHILD=$!
  mapfile -t OUTPUT <&"$fd"
  exec {fd}<&-
  wait "$CHILD" || status=$?
  CHILD=""
  return "$status"
}

# ----------------------------------------------------------------------------- the grid

# The study is data in its planner (plan.py: families of runs over the mask rules and the splits). One
# Python call answers the study's name for the settings (full, quick, or the grid file's runs), then per
# run, seed by seed, the assignment's core first: its STAGE, SCRIPT and ARGS (shell-quoted, with the
# common flags), the opt-in GROUP that adds it (- for none) and, from the script's own parsed flags, its
# run directory, the images it will process, whether a finished run there is this one, and its config (a
# bad flag after -- stops here, before anything is written).
PLAN=(--runs --describe-runs --seeds "$SEEDS" --results "$RESULTS")
((!QUICK)) || PLAN+=(--quick)
((!EXTENSIONS)) || PLAN+=(--extensions)
[[ -z $GRID_FILE ]] || PLAN+=(--grid "$GRID_FILE")
read_child "$PY" "$HERE/plan.py" "${PLAN[@]}" -- "${EXTRA[@]}" || exit 2
GRID=${OUTPUT[0]-} ROWS=("${OUTPUT[@]:1}")

# Run directories do not encode --quick, the grid file or the flags after --, so one root holds one kind of
# study. The settings are recorded only once a run has succeeded: a typo after -- that fails every run must
# not lock the root, and a root with no finished run takes any settings.
# --tensorboard (a live view, not a result: plumbing.NON_RESULT_FLAGS) is left out of them.
KEPT=()
for a in "${EXTRA[@]}"; do [[ $a == --tensorboard ]] || KEPT+=("$a"); done
SETTINGS="grid=$GRID extra=$( ((${#KEPT[@]} == 0)) || quote "${KEPT[@]}")"
if [[ -f $RESULTS/run_all.settings && $(< "$RESULTS/run_all.settings") != "$SETTINGS" ]]; then
  die "RESULTS=$RESULTS holds a study with other settings ($(< "$RESULTS/run_all.settings")): use another RESULTS="
fi

STAGE=() SCRIPT=() ARGS=() GROUP=() OUT=() FWD_BWD=() FWD=() CONFIG=() TODO=() OTHER=()
for i in "${!ROWS[@]}"; do
  IFS=$'\t' read -r 'STAGE[i]' 'SCRIPT[i]' 'ARGS[i]' 'GROUP[i]' 'OUT[i]' 'FWD_BWD[i]' 'FWD[i]' state 'CONFIG[i]' <<< "${ROWS[i]}"
  case $state in
    done) echo "skip (done): ${OUT[i]}" ;;
    todo) TODO+=("$i") ;;
    *) echo "skip (other flags): ${OUT[i]} holds a finished run that $state: not this study's run," \
            "not counted as done; move it away to run this one"
       OTHER+=("$i") ;;
  esac
done
command_of() { echo "$(quote "$PY" "$HERE/${SCRIPT[$1]}") ${ARGS[$1]}"; }
# A run's log: logs/STAGE_NAME_seedS.log; where that is longer than a file name may be (255 bytes; NAME
# is up to 255 itself), its first 200 bytes and a checksum of the whole (a run's FAILED line names both).
log_of() {
  local rel=${OUT[$1]#"$RESULTS"/} log
  log=${rel//\//_}.log
  ((${#log} <= 255)) || log=${log:0:200}-$(cksum <<< "$rel" | cut -d' ' -f1).log
  echo "$RESULTS/logs/$log"
}
# Download CIFAR-100 and the weights once, before parallel runs or array tasks could all try.
PREFETCH=$(quote "$PY" "$HERE/plan.py" --prefetch -- "${EXTRA[@]}")

# ----------------------------------------------------------------------------- the estimate

# A probe of about 30 s measures the runs' device with their model, image size, precision and client
# batch, packed --per-gpu to a GPU as the runs will be (plan.py --estimate; it also picks the default
# --per-gpu). A run's time in its slot: its start-up plus its images (each script's image_passes) at the
# measured speed (the median of the probe's timed windows), and its spread (at the fastest and the slowest
# window's speed: COST_LO, COST_HI); the study's: the sum over its runs, divided among the runs at once.
SAY=() COST=() COST_LO=() COST_HI=() RUN_THREADS=""
estimate() {
  local tag value lo hi k=0 line runs=() input gpu_env=()
  [[ -z $GPUS ]] || gpu_env=(env CUDA_VISIBLE_DEVICES="${DEVICES[0]}")
  for i in "${TODO[@]}"; do runs+=("${SCRIPT[i]} ${ARGS[i]}"); done
  printf -v input '%s\n' "${runs[@]}"
  read_child "${gpu_env[@]}" "$PY" "$HERE/plan.py" --estimate --gpus "${GPUS:-0}" --per-gpu "${PER_GPU:-auto}" \
    <<< "$input" || return 2
  for line in "${OUTPUT[@]}"; do
    IFS=$'\t' read -r tag value <<< "$line"
    case $tag in
      per-gpu) PER_GPU=$value ;;
      threads) RUN_THREADS=$value ;;
      say) SAY+=("$value") ;;
      cost) IFS=$'\t' read -r value lo hi <<< "$value"  # the estimate, its least and most (if given)
            COST[TODO[k]]=$value COST_LO[TODO[k]]=${lo:-$value} COST_HI[TODO[k]]=${hi:-$value}; ((k += 1)) ;;
    esac
  done
}
in_background() {  # in_background COMMAND...: run it as CHILD, which a stop's trap can end; its status
  "$@" &
  CHILD=$!
  local status=0
  wait "$CHILD" || status=$?
  CHILD=""
  return "$status"
}
hms() {  # seconds as H:MM:SS, or in days beyond two
  if (($1 < 172800)); then printf '%d:%02d:%02d' $(($1 / 3600)) $(($1 % 3600 / 60)) $(($1 % 60))
  else printf '%d days' $((($1 + 43200) / 86400)); fi
}
print_estimate() {  # per stage and in total: runs still to do, their images and, if measured, their time
  local stage n fb f ms lo hi total_n=0 total_fb=0 total_f=0 total_ms=0 total_lo=0 total_hi=0 line
  echo "# runs still to do, the images they will process (an estimate: each script's image_passes) and their time here"
  for line in "${SAY[@]}"; do echo "# $line"; done
  for stage in centralized model_editing "fedavg dense" "fedavg sparse" "fedavg head"; do
    n=0 fb=0 f=0 ms=0 lo=0 hi=0
    for i in "${TODO[@]}"; do
      [[ ${STAGE[i]} == "$stage" ]] || continue
      ((n += 1, fb += FWD_BWD[i], f += FWD[i], ms += ${COST[i]:-0}, lo += ${COST_LO[i]:-0},
        hi += ${COST_HI[i]:-0})) || true
    done
    echo "stage $stage: $n runs, $fb images forward+backward, $f forward only$(time_of "$ms" "$lo" "$hi")"
    ((total_n += n, total_fb += fb, total_f += f, total_ms += ms, total_lo += lo, total_hi += hi)) || true
  done
  echo "total: $total_n runs, $total_fb images forward+backward, $total_f forward only$(
    time_of "$total_ms" "$total_lo" "$total_hi")$(((${#COST[@]} == 0)) || echo " with $SLOTS run(s) at once")"
  n=0 ms=0 lo=0 hi=0  # what the opt-in group adds (plan.py's GROUP of a run)
  for i in "${TODO[@]}"; do
    [[ ${GROUP[i]} != extensions ]] || ((n += 1, ms += ${COST[i]:-0}, lo += ${COST_LO[i]:-0}, hi += ${COST_HI[i]:-0})) || true
  done
  ((!EXTENSIONS)) || echo "of these, --extensions adds $n runs$(time_of "$ms" "$lo" "$hi")"
}
time_of() {  # ', about H:MM:SS (LEAST to MOST)' of runs whose times in their slots add up to $1 ms (at the
             # probe's median speed; $2, $3 at its fastest and slowest window's), when measured
  ((${#COST[@]} == 0)) && return
  echo ", about $(hms $(($1 / 1000 / SLOTS)))$(((($2 == $1 && $3 == $1))) ||
    echo " ($(hms $(($2 / 1000 / SLOTS))) to $(hms $(($3 / 1000 / SLOTS))))")"
}

if ((DRY)); then
  if ((${#TODO[@]})); then  # what the prefetch would fetch, looked at only: a dry run fetches and writes nothing
    echo "$PREFETCH"
    # What the study would stop on (no data or weights, and no network to get them) is a warning here:
    # the dry run goes on to list and estimate the runs.
    in_background "$PY" "$HERE/plan.py" --prefetch --no-download -- "${EXTRA[@]}" \
      2> >(sed 's/^error: /run_all.sh: warning: the study would stop at its prefetch: /' >&2) || true
  fi
  for i in "${TODO[@]}"; do command_of "$i"; done
  echo "$SUMMARY_CMD"
  if ((SLURM)); then SAY=("no time estimate: the runs go to SLURM nodes (run --dry-run on one to measure)")
  elif ((${#TODO[@]})); then estimate || exit 2
  fi
  SLOTS=$((${GPUS:-1} * ${PER_GPU:-1}))
  print_estimate
  exit 0
fi

# ----------------------------------------------------------------------------- before the first run

# One study per results root at a time: two would run the same runs and report each other's as failed.
# The lock (flock on $RESULTS/run_all.lock, which names the holder) is held by this shell and by the runs
# it starts, which inherit it: a study killed by SIGKILL holds it until its runs have saved and exited.
lock_study() {
  local pid lock=$RESULTS/run_all.lock
  [[ -d $RESULTS ]] || CREATED_ROOT=1
  mkdir -p "$RESULTS" || die "cannot create RESULTS=$RESULTS"
  if ! command -v flock > /dev/null; then
    echo "run_all.sh: warning: no flock command here, so a second study on $RESULTS is not refused" >&2
    return 0
  fi
  root_files_are_plain  # again, just before opening: the root may have changed since
  exec {LOCK_FD}<> "$lock"
  # The file opened must be the plain file at that path (not one a link put there meanwhile)
  [[ ! -L $lock && /proc/$$/fd/$LOCK_FD -ef $lock ]] || [[ ! -e /proc/$$/fd ]] ||
    die "$lock changed while it was opened (a link?): move it away"
  if ! flock -n "$LOCK_FD"; then
    pid=$(tr -dc 0-9 < "$lock")
    die "RESULTS=$RESULTS is in use by another run_all.sh (PID ${pid:-?}); wait for it to finish or stop it"
  fi
  # The holder's PID, written through the open file (never by its path), padded over an older, longer one
  printf '%-20s\n' $$ >&"$LOCK_FD"
}
give_up() {  # a check before the first run failed, and said why: leave no new results root behind
  forget_new_root
  exit 2
}
write_plan() {  # every run of this study, in run order, for summarize.py (what has not run yet); runs
                # planned earlier for other seeds of the same study stay
  local plan=$RESULTS/run_all.plan new old=""
  new=$(for i in "${!OUT[@]}"; do printf '%s\t%s\t%s\n' "${STAGE[i]}" "${OUT[i]#"$RESULTS"/}" "${CONFIG[i]}"; done)
  if [[ -f $RESULTS/run_all.settings && -f $plan ]]; then  # only well-formed lines: 'STAGE<tab>RUN<tab>{...}'
    old=$(awk -F'\t' -v stages="$PLAN_STAGES" -v ok="$PLAN_RUN_RE" '
      BEGIN { n = split(stages, s, ","); for (i = 1; i <= n; i++) stage[s[i]] }
      NR == FNR { mine[$2]; next }
      NF == 3 && ($1 in stage) && $2 ~ ok && $2 !~ /(^|\/)\.\.?(\/|$)/ && $3 ~ /^\{.*\}$/ && !($2 in mine)' \
      <(echo "$new") "$plan")
  fi
  printf '%s\n' "$new" ${old:+"$old"} | write_file "$plan"
}
PLAN_STAGES="centralized,model_editing,fedavg dense,fedavg sparse,fedavg head"
PLAN_RUN_RE='^[A-Za-z0-9_.=,+-]+(/[A-Za-z0-9_.=,+-]+)*$'  # a run's folder below the root, as the scripts name it

lock_study
if ((${#TODO[@]})); then  # first: if a check fails (no network, no data, no weights), nothing is written
  echo "prefetch: $PREFETCH"
  in_background "$PY" "$HERE/plan.py" --prefetch -- "${EXTRA[@]}" || give_up
  ((SLURM)) || estimate || give_up
fi
SLOTS=$((${GPUS:-1} * ${PER_GPU:-1}))
((SLURM || ${#TODO[@]} == 0)) || print_estimate
write_plan
mkdir -p "$RESULTS/logs"
# A log is appended to: one that is a link (or not a plain file) would steer the run's output elsewhere.
for i in "${TODO[@]}"; do
  log=$(log_of "$i")
  [[ ! -L $log && (! -e $log || -f $log) ]] || die "$log is a link or not a regular file: move it away"
done
record_settings() { [[ -f $RESULTS/run_all.settings ]] || echo "$SETTINGS" | write_file "$RESULTS/run_all.settings"; }

if ((SLURM)); then
  # sbatch passes the environment on: a job must not take this login shell for its run_all.sh (the
  # array's tasks set their own; the summary job has none)
  unset RUN_ALL_PID
  n=${#TODO[@]}
  ((n)) || { echo "nothing to run"; exit 0; }
  mkdir -p "$RESULTS/slurm"
  stamp=$(date +%Y%m%d-%H%M%S)-$$  # files of earlier submissions may still be read by their tasks
  cmds=$RESULTS/slurm/$stamp.cmds
  # The settings go to the tasks as a file: as one argument of sbatch, a big grid's (over 128 KiB)
  # would not fit (Argument list too long)
  settings=$RESULTS/slurm/$stamp.settings
  undo_submission() {  # sbatch refused the array: leave no file of it behind
    rm -f "$cmds" "$settings"
    ((!CREATED_ROOT)) || rm -f "$RESULTS/slurm/task.sh" "$RESULTS/run_all.plan"
    rmdir "$RESULTS/slurm" "$RESULTS/logs" 2> /dev/null || true
    forget_new_root
  }
  for i in "${TODO[@]}"; do echo "$(quote "$(log_of "$i")") $(command_of "$i")"; done | write_file "$cmds"
  echo "$SETTINGS" | write_file "$settings"
  task=$RESULTS/slurm/task.sh
  write_file "$task" << 'EOF'
#!/usr/bin/env bash
# One task of a run_all.sh job array: line SLURM_ARRAY_TASK_ID (from 0) of the file $1 is
# 'LOG COMMAND...'; the first run that succeeds copies the study's settings (the file $2) to the file $3.
# SLURM's warning signal (--signal=B:USR1@120) and a preemption's TERM reach this
# shell only: pass them to the run, which checkpoints at its next step and exits 143; then requeue the
# task, which resumes the run from that checkpoint.
set -uo pipefail
eval "words=($(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "$1"))"
if [[ -L ${words[0]} ]]; then echo "error: the log ${words[0]} is a link: move it away" >&2; exit 2; fi
export RUN_ALL_PID=$$  # the run dies with this shell, whatever kills it
pid=""
forward() { [[ -z $pid ]] || kill -USR1 "$pid" 2> /dev/null || true; }
trap forward USR1 TERM
echo "${words[*]:1}"
"${words[@]:1}" >> "${words[0]}" 2>&1 &
pid=$!
while :; do  # a trapped signal ends `wait` early; wait again until the run has saved and exited
  status=0
  wait "$pid" || status=$?
  ((status > 128)) && kill -0 "$pid" 2> /dev/null || break
done
if ((status == 0)) && [[ ! -f $3 && ! -L $3 ]]; then  # tasks may race here: each writes whole, same content
  # mktemp's own file (never a link), removed again if the settings cannot be read (a task of an array
  # that an older run_all.sh submitted, which passed them as words)
  tmp=$(mktemp "$3.XXXXXX") && { cat "$2" > "$tmp" && mv -f "$tmp" "$3" || rm -f "$tmp"; }
fi
if ((status == 143)); then
  scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
fi
exit "$status"
EOF
  chmod +x "$task"
  # Only what was given here goes on the command line; sbatch reads its SBATCH_* variables itself.
  opts=(--parsable --chdir "$PWD" ${PARTITION:+--partition "$PARTITION"} ${TIME:+--time "$TIME"}
        ${ACCOUNT:+--account "$ACCOUNT"})
  gres=() no_gres=()
  if ((GRES_GIVEN)) && [[ -z $GRES ]]; then no_gres=(env -u SBATCH_GRES)  # --gres '': none at all
  elif ((GRES_GIVEN)); then gres=(--gres "$GRES")
  elif [[ ! -v SBATCH_GRES ]]; then gres=(--gres gpu:1)
  fi
  status=0
  id=$("${no_gres[@]}" sbatch "${opts[@]}" "${gres[@]}" --array "0-$((n - 1))${MAX_PARALLEL:+%$MAX_PARALLEL}" \
    --requeue --signal=B:USR1@120 --job-name run_all --output "$RESULTS/logs/slurm-%A_%a.out" \
    "$task" "$cmds" "$settings" "$RESULTS/run_all.settings") || status=$?
  if ((status)); then
    undo_submission
    die "sbatch refused the job array (exit $status, its message above): nothing was submitted"
  fi
  id=${id%%;*}  # --parsable prints "jobid" or "jobid;cluster"
  echo "job array $id: $n runs ($cmds)"
  # afterany: summarize whatever finished, failed tasks included; a dependency that can never be met
  # (e.g. the array was cancelled before it existed) cancels the summary instead of leaving it pending.
  sid=$(env -u SBATCH_GRES sbatch "${opts[@]}" --dependency "afterany:$id" --kill-on-invalid-dep=yes \
    --job-name run_all-summary --output "$RESULTS/logs/slurm-summary-%j.out" --wrap "$SUMMARY_CMD") ||
    { echo "run_all.sh: error: sbatch refused the summary job: once the array $id has ended, run" \
           "./run_all.sh --summary-only" >&2; exit 1; }
  echo "summary: job ${sid%%;*}; tables and plots will be in $RESULTS/summary/ (logs in $RESULTS/logs/)"
  exit 0
fi

# Local: a pool of SLOTS = max(GPUS, 1) x PER_GPU slots; with --gpus, slot g runs on DEVICES[g / PER_GPU],
# so no GPU ever has more than PER_GPU runs. Runs side by side share the CPU cores (unless
# OMP_NUM_THREADS says otherwise): torch's default of one thread per core in every process
# oversubscribes the CPU and can slow all of them down many times. On a busy CPU even one run's threads
# wait for each other: there the probe measures one thread faster and the runs get one (RUN_THREADS).
THREADS=$(($(nproc) / SLOTS > 0 ? $(nproc) / SLOTS : 1))
[[ -z $RUN_THREADS ]] || THREADS=$RUN_THREADS  # the probe measured this many faster (a busy CPU: one)
SLOT_PID=() SLOT_RUN=() SLOT_T0=() FAILED=()
FINISHED=0 T_START=$SECONDS DONE_S=0 DONE_MS=0 LEFT_MS=0  # progress: seconds taken and estimated (ms)
for i in "${TODO[@]}"; do ((LEFT_MS += ${COST[i]:-0})) || true; done
for ((g = 0; g < SLOTS; g++)); do SLOT_PID[g]=""; done
# A run gets SIGTERM when this shell dies, even by SIGKILL (RUN_ALL_PID, exported above; see
# plumbing.die_with_parent): an orphan would go on writing while a rerun starts the same run again.

reap() {  # reap G: collect the finished run of slot G
  local g=$1 i=${SLOT_RUN[$1]} status=0
  wait "${SLOT_PID[g]}" || status=$?
  SLOT_PID[g]=""
  ((FINISHED += 1, LEFT_MS -= ${COST[i]:-0})) || true
  if ((status == 0)) && [[ -f ${OUT[i]}/result.json ]]; then
    echo "done ($((SECONDS - SLOT_T0[g]))s): ${OUT[i]}"
    ((DONE_S += SECONDS - SLOT_T0[g], DONE_MS += ${COST[i]:-0})) || true
    record_settings
  else
    echo "FAILED (exit $status): ${OUT[i]}; see $(log_of "$i")"
    FAILED+=("$i")
  fi
  progress
}

progress() {  # runs finished / to do, elapsed, and the estimate of the rest corrected by the runs that finished
  local left=""
  if ((${#COST[@]})); then
    ((DONE_MS == 0)) && left=$LEFT_MS || left=$((LEFT_MS * DONE_S * 1000 / DONE_MS))
    left=", about $(hms $((left / 1000 / SLOTS))) left"
  fi
  echo "progress: $FINISHED/${#TODO[@]} runs finished${FAILED[0]+ (${#FAILED[@]} failed)}," \
       "$(hms $((SECONDS - T_START))) elapsed$left"
}

free_slot() {  # sets FREE to an idle slot, waiting for a run to finish if there is none: it looks every
               # 0.05 s at first, then less often, up to every second (short runs go on at once, long
               # ones cost no CPU); `wait -n` would need bash 4.3, and its -p bash 5.1
  local g k=0 naps=(0.05 0.05 0.1 0.2 0.5 1)
  while true; do
    for ((g = 0; g < SLOTS; g++)); do
      if [[ -n ${SLOT_PID[g]} ]] && ! kill -0 "${SLOT_PID[g]}" 2> /dev/null; then reap "$g"; fi
      if [[ -z ${SLOT_PID[g]} ]]; then FREE=$g; return; fi
    done
    sleep "${naps[k]}"
    ((k < ${#naps[@]} - 1)) && ((k += 1)) || true
  done
}

interrupted() {  # the runs save a checkpoint at their next step and exit; wait for that. A second
                 # Ctrl-C or SIGTERM is passed on: a second one stops a run at once (with its last checkpoint)
  trap stop_runs INT TERM
  stop_runs
  until wait; do :; done  # a trapped signal ends `wait` early: wait again until every run has exited
  echo "interrupted: run the same command again to continue (finished runs are skipped)" >&2
  exit 130
}
stop_runs() {
  local g
  for ((g = 0; g < SLOTS; g++)); do
    [[ -z ${SLOT_PID[g]} ]] || kill -TERM "${SLOT_PID[g]}" 2> /dev/null || true
  done
}
trap interrupted INT TERM

echo "${#TODO[@]} runs to do"
for i in "${TODO[@]}"; do
  free_slot
  g=$FREE
  echo "run: $(command_of "$i")"
  (
    [[ -z $GPUS ]] || export CUDA_VISIBLE_DEVICES=${DEVICES[g / PER_GPU]}
    [[ -z $GPUS ]] && ((SLOTS == 1)) && [[ -z $RUN_THREADS ]] || export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$THREADS}
    eval "exec $(command_of "$i")"  # exec: the slot's pid is the run itself, a child of this shell
  ) >> "$(log_of "$i")" 2>&1 &
  SLOT_PID[g]=$! SLOT_RUN[g]=$i SLOT_T0[g]=$SECONDS
done
for ((g = 0; g < SLOTS; g++)); do [[ -z ${SLOT_PID[g]} ]] || reap "$g"; done

finished=("$RESULTS"/*/*/*/result.json)  # the root's name quoted: glob characters in it are its own
if [[ -e ${finished[0]} ]]; then  # summarize whatever finished
  echo "summary: $SUMMARY_CMD"
  "$PY" "$HERE/summarize.py" "$RESULTS" || { echo "summary FAILED" >&2; exit 1; }
fi
if ((${#FAILED[@]})); then
  echo "${#FAILED[@]} run(s) failed:" >&2
  for i in "${FAILED[@]}"; do echo "  ${OUT[i]}: see $(log_of "$i")" >&2; done
fi
if ((${#OTHER[@]})); then
  echo "${#OTHER[@]} run(s) not run: their directories hold finished runs with other flags (see above):" >&2
  for i in "${OTHER[@]}"; do echo "  ${OUT[i]}" >&2; done
fi
if ((${#FAILED[@]} + ${#OTHER[@]})); then
  echo "Fix the cause and run the same command again (finished runs are skipped)." >&2
  exit 1
fi
