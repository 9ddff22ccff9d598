#!/usr/bin/env bash
# The main job on toy data, CPU only: simulate muon isolation ntuples, train four models
# (particle-flow network, 18-cone network, best single cone, relative isolation), compare
# them, export the PFN to ONNX and score the NanoAOD-style files with ONNX Runtime.
# BSYM_DEMO_EVENTS (default 12000) and BSYM_DEMO_DIR (default demo/) change size and place.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-env.sh
export PATH="$PWD/.venv/bin:$PATH"
dir=${BSYM_DEMO_DIR:-demo}
events=${BSYM_DEMO_EVENTS:-12000}
models=(isolation_pfn isolation_cones isolation_cone_cut isolation_reliso)

echo "== simulate: $events dimuon events"
bsym simulate isolation --events "$events" --out "$dir/data" --seed 1

checkpoints=()
for model in "${models[@]}"; do
  echo "== train: $model"
  bsym train "bsym/configs/$model.yaml" --force \
    --set "data.train=[$dir/data/isolation_muons_*.root]" --set "output_dir=$dir/runs/$model"
  checkpoints+=(--model "$dir/runs/$model/checkpoint.pt")
done

echo "== evaluate on the held-out test muons"
bsym evaluate "${checkpoints[@]}" --out "$dir/evaluation"

echo "== export the PFN to ONNX (parity checked against torch)"
bsym export "$dir/runs/isolation_pfn/checkpoint.pt" --repository "$dir/model_repository" --force

echo "== score the analysis-layout files with ONNX Runtime"
bsym score "$dir/data/isolation_events_*.root" --model isolation_pfn \
  --repository "$dir/model_repository" --out "$dir/scores" --force
