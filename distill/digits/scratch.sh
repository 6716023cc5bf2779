#!/usr/bin/env bash
# A text-to-image GAN trained from scratch on the offline digits testbed, then evaluated like the distilled students.
#   bash distill/digits/scratch.sh [OUTPUT_DIR] [GENERATOR]
#     OUTPUT_DIR  default runs/scratch_digits; the dataset, latent cache, reference and teacher evaluation are made once
#     GENERATOR   gigagan (default), gigagan_projected or stylegan_t: the recipe configs/scratch/digits_<GENERATOR>.yaml
# Steps: digits train split as an imagefolder (captions: the five phrasings of each class) -> (space latent only: latents
# cached once with the digits VAE) -> distill/train_gan.py -> distill/evaluate.py (prompt accuracy, FID, precision / recall
# and within-digit diversity vs held-out real digits, all in the digits classifier's features) for the generator and,
# once, for the teacher -> OUTPUT_DIR/report-GENERATOR.txt.
# Extra --key value overrides: SCRATCH_TRAIN_ARGS (train_gan.py), SCRATCH_EVAL_ARGS (evaluate.py).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/scratch_digits}
GEN=${2:-gigagan}
[ -f "configs/scratch/digits_$GEN.yaml" ] || { echo "error: no configs/scratch/digits_$GEN.yaml: use gigagan, gigagan_projected or stylegan_t" >&2; exit 2; }
export HF_HUB_OFFLINE=1 OPENBLAS_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
# accelerate launch would set OMP_NUM_THREADS=1 for its one process: use every core instead.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
LAUNCH="accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no"
EVAL="python distill/evaluate.py --config configs/digits/eval.yaml --metrics prompt_accuracy,fid,precision_recall,diversity --reference $OUT/reference --grid_size 50"
SPACE=$(sed -n 's/^space: *\([a-z]*\).*/\1/p' "configs/scratch/digits_$GEN.yaml")
mkdir -p "$OUT"
start=$(date +%s)

[ -d "$OUT/digits-train" ] || python -c "import sys; from data_gen.digits import save_digits_imagefolder as s; s(sys.argv[1])" "$OUT/digits-train"
# The reference carries its labels (metadata.jsonl) for the within-digit diversity; an older one without them is made again.
[ -f "$OUT/reference/metadata.jsonl" ] || { rm -rf "$OUT/reference" "$OUT/eval-teacher"; }
[ -d "$OUT/reference" ] || python -c "import sys; from data_gen.digits import save_digits_reference as s; s(sys.argv[1])" "$OUT/reference"
DATA="$OUT/digits-train"
if [ "$SPACE" = latent ]; then
    $LAUNCH distill/cache_latents.py --dataset "$OUT/digits-train" --vae teachers/assets/digits-teacher --resolution 32 \
        --output_dir "$OUT/latents"
    DATA="$OUT/latents"
fi
train_start=$(date +%s)
$LAUNCH distill/train_gan.py --config "configs/scratch/digits_$GEN.yaml" --dataset "$DATA" --output_dir "$OUT/$GEN" \
    ${SCRATCH_TRAIN_ARGS:-}
train_seconds=$(( $(date +%s) - train_start ))
$EVAL --pipeline "$OUT/$GEN/pipeline" --output_dir "$OUT/eval-$GEN" ${SCRATCH_EVAL_ARGS:-}
grep -q '"recall"' "$OUT/eval-teacher/metrics.json" 2>/dev/null || $EVAL --pipeline teachers/assets/digits-teacher --output_dir "$OUT/eval-teacher" ${SCRATCH_EVAL_ARGS:-}
python distill/digits/scratch_report.py "$OUT" "$GEN" --train_seconds "$train_seconds" --total_seconds "$(( $(date +%s) - start ))"
