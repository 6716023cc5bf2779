#!/usr/bin/env bash
# The whole method on the offline digits testbed: pairs -> one-step student -> evaluation of both.
#   bash distill/digits/quickstart.sh [--family unet|sd3] [OUTPUT_DIR] [STUDENT_CONFIG]
#     --family        the teacher: unet (default; teachers/assets/digits-teacher, SD1.x form, 25 DDIM steps)
#                     or sd3 (teachers/assets/digits-teacher-sd3, a rectified-flow MMDiT, 25 flow-Euler steps)
#     OUTPUT_DIR      default runs/quickstart (runs/quickstart-sd3); pairs, reference sets and the teacher's
#                     evaluation are made once there and reused by later runs with another student
#     STUDENT_CONFIG  default configs/digits/student.yaml (the UNet student); also
#                     configs/digits/student_gigagan.yaml, configs/digits/student_stylegan_t.yaml;
#                     with --family sd3: configs/digits/student_sd3.yaml (the transformer student)
# Extra --key value overrides per stage: QUICKSTART_PAIRS_ARGS, QUICKSTART_STUDENT_ARGS, QUICKSTART_EVAL_ARGS.
# A rerun of the same command resumes where a killed or timed-out one stopped: pairs by shard, training from its
# last checkpoint (one every 20 steps: at most a few minutes lost), evaluations from their cached samples. Each
# stage's time is kept in OUTPUT_DIR/stage_times.tsv and shown at the start of the next run.
set -euo pipefail
cd "$(dirname "$0")/../.."
FAMILY=unet
if [ "${1:-}" = "--family" ]; then FAMILY=${2:-}; shift 2 || shift $#; fi
case "$FAMILY" in
  unet) TEACHER=teachers/assets/digits-teacher; PAIRS_CONFIG=configs/digits/pairs.yaml
        DEFAULT_OUT=runs/quickstart; DEFAULT_STUDENT=configs/digits/student.yaml; TEACHER_ARGS="" ;;
  # The SD3 teacher's sampler: its own flow-matching Euler, and the 4 zero tokens in place of T5 it was trained with.
  sd3)  TEACHER=teachers/assets/digits-teacher-sd3; PAIRS_CONFIG=configs/digits/pairs_sd3.yaml
        DEFAULT_OUT=runs/quickstart-sd3; DEFAULT_STUDENT=configs/digits/student_sd3.yaml
        TEACHER_ARGS="--scheduler flow_euler --max_sequence_length 4" ;;
  *) echo "error: unknown --family '$FAMILY': choose unet or sd3" >&2; exit 2 ;;
esac
if [ ! -d "$TEACHER" ]; then  # the SD3-form digits teacher is not committed yet (docs/flow-matching-teachers.md)
  echo "error: no teacher at $TEACHER: train it with python distill/digits/train_teacher_sd3.py --config" \
       "configs/digits/teacher_sd3.yaml --output_dir runs/digits-teacher-sd3, then copy runs/digits-teacher-sd3/pipeline to $TEACHER" >&2
  exit 2
fi
OUT=${1:-$DEFAULT_OUT}
STUDENT_CONFIG=${2:-$DEFAULT_STUDENT}
NAME=$(basename "$STUDENT_CONFIG" .yaml)            # student, student_gigagan, ...
export HF_HUB_OFFLINE=1 OPENBLAS_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
# accelerate launch would set OMP_NUM_THREADS=1 for its one process: use every core instead.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
# -q: a user error's one line is the last thing printed, not followed by the launcher's traceback.
LAUNCH="accelerate launch -q --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no"
EVAL="python distill/evaluate.py --config configs/digits/eval.yaml --reference $OUT/reference --pairs $OUT/pairs
      --teacher_reference $OUT/teacher-reference/samples"
mkdir -p "$OUT"
start=$(date +%s)
TIMES="$OUT/stage_times.tsv"  # stage <TAB> seconds <TAB> when: each stage's last run here

if [ -s "$TIMES" ]; then
  echo "quickstart into $OUT; the stages took, last time here (a finished stage is only checked again):"
  awk -F'\t' '{ printf "  %-22s %6.1f min  (%s)\n", $1, $2 / 60, $3 }' "$TIMES"
else
  echo "quickstart into $OUT: expected about 13 min in all on 2 idle CPU cores (12.7 measured), up to 4x longer on a" \
       "busy machine; each stage's time is kept in $TIMES and shown here next time"
fi
echo "the student lands in $OUT/$NAME/pipeline (python -m distill.demo --pipeline $OUT/$NAME/pipeline)"

stage() {  # stage NAME COMMAND...: run it, then record how long it took
  local name=$1 t0
  shift
  t0=$(date +%s)
  echo "== $name ($(date +%H:%M:%S))"
  "$@"
  { [ -f "$TIMES" ] && awk -F'\t' -v n="$name" '$1 != n' "$TIMES"
    printf '%s\t%s\t%s\n' "$name" "$(( $(date +%s) - t0 ))" "$(date '+%Y-%m-%d %H:%M')"; } > "$TIMES.tmp"
  mv "$TIMES.tmp" "$TIMES"
}

[ -d "$OUT/reference" ] || stage reference python -c "import sys; from data_gen.digits import save_digits_reference as s; s(sys.argv[1])" "$OUT/reference"
stage pairs $LAUNCH distill/generate_pairs.py --config $PAIRS_CONFIG --output_dir "$OUT/pairs" ${QUICKSTART_PAIRS_ARGS:-}
# The teacher's samples with other noise (seed 2; the evaluations use seed 1): the reference for
# FID to the teacher, and, scored for the teacher itself, that FID's floor at this sample size.
stage teacher-reference $EVAL --pipeline $TEACHER $TEACHER_ARGS --metrics samples --seed 2 --output_dir "$OUT/teacher-reference" ${QUICKSTART_EVAL_ARGS:-}
# A checkpoint every 20 of the 220 steps: a rerun after a timeout loses little (QUICKSTART_STUDENT_ARGS may change it).
stage "training-$NAME" $LAUNCH distill/train_student.py --config "$STUDENT_CONFIG" --pairs "$OUT/pairs" --output_dir "$OUT/$NAME" \
  --checkpointing_steps 20 ${QUICKSTART_STUDENT_ARGS:-}
stage eval-teacher $EVAL --pipeline $TEACHER $TEACHER_ARGS --output_dir "$OUT/eval-teacher" ${QUICKSTART_EVAL_ARGS:-}
stage "eval-$NAME" $EVAL --pipeline "$OUT/$NAME/pipeline" --output_dir "$OUT/eval-$NAME" ${QUICKSTART_EVAL_ARGS:-}
python distill/digits/quickstart_report.py "$OUT" "$NAME"
echo "quickstart finished in $(( $(date +%s) - start )) s; results in $OUT; the student: $OUT/$NAME/pipeline"
