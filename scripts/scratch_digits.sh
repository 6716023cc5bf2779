#!/usr/bin/env bash
# A text-to-image GAN trained from scratch on the offline digits testbed, then evaluated like the distilled students.
#   bash scripts/scratch_digits.sh [OUTPUT_DIR] [GENERATOR]
#     OUTPUT_DIR  default runs/scratch_digits; the dataset, latent cache, reference and teacher evaluation are made once
#     GENERATOR   gigagan (default) or stylegan_t (configs/scratch/digits_<GENERATOR>.yaml)
# Steps: digits train split as an imagefolder (captions: the five phrasings of each class) -> latents cached once with the
# digits VAE -> distill/train_gan.py (projected D on the digits classifier) -> distill/evaluate.py (prompt accuracy, FID vs
# held-out real digits in the classifier's features) for the generator and, once, for the teacher -> OUTPUT_DIR/report.txt.
# Extra --key value overrides: SCRATCH_TRAIN_ARGS (train_gan.py), SCRATCH_EVAL_ARGS (evaluate.py).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/scratch_digits}
GEN=${2:-gigagan}
[ -f "configs/scratch/digits_$GEN.yaml" ] || { echo "error: unknown generator $GEN: use gigagan or stylegan_t" >&2; exit 2; }
export HF_HUB_OFFLINE=1 OPENBLAS_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
# accelerate launch would set OMP_NUM_THREADS=1 for its one process: use every core instead.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
LAUNCH="accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no"
EVAL="python distill/evaluate.py --config configs/digits/eval.yaml --metrics prompt_accuracy,fid --reference $OUT/reference --grid_size 50"
mkdir -p "$OUT"
start=$(date +%s)

[ -d "$OUT/digits-train" ] || python -c "import sys; from data_gen.digits import save_digits_imagefolder as s; s(sys.argv[1])" "$OUT/digits-train"
[ -d "$OUT/reference" ] || python -c "import sys; from data_gen.digits import save_digits_reference as s; s(sys.argv[1])" "$OUT/reference"
$LAUNCH distill/cache_latents.py --dataset "$OUT/digits-train" --vae teachers/assets/digits-teacher --resolution 32 \
    --output_dir "$OUT/latents"
train_start=$(date +%s)
$LAUNCH distill/train_gan.py --config "configs/scratch/digits_$GEN.yaml" --dataset "$OUT/latents" --output_dir "$OUT/$GEN" \
    ${SCRATCH_TRAIN_ARGS:-}
train_seconds=$(( $(date +%s) - train_start ))
$EVAL --pipeline "$OUT/$GEN/pipeline" --output_dir "$OUT/eval-$GEN" ${SCRATCH_EVAL_ARGS:-}
[ -f "$OUT/eval-teacher/metrics.json" ] || $EVAL --pipeline teachers/assets/digits-teacher --output_dir "$OUT/eval-teacher" ${SCRATCH_EVAL_ARGS:-}
python scripts/scratch_report.py "$OUT" "$GEN" --train_seconds "$train_seconds" --total_seconds "$(( $(date +%s) - start ))"
