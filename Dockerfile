# One image per role: `--target compiler` (torch + transformers + builder), `--target runtime`
# (serving and gateway: no torch/transformers), `--target runtime-cuda` (serving-cuda).
FROM python:3.11-slim AS base
WORKDIR /app
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY llamaship ./llamaship

FROM base AS runtime
RUN pip install "grpcio>=1.70" "grpcio-health-checking>=1.70" "grpcio-reflection>=1.70" "protobuf>=5.29" \
        "onnxruntime-genai>=0.18" "tokenizers>=0.21" "redis>=5" "hiredis>=3" "prometheus-client>=0.20" "numpy>=1.26" \
        "boto3>=1.35"
COPY serving_service ./serving_service
COPY gateway ./gateway

FROM runtime AS runtime-cuda
RUN pip uninstall -y onnxruntime-genai onnxruntime && pip install "onnxruntime-genai-cuda>=0.18"

FROM base AS compiler
ARG TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
RUN pip install $TORCH_SPEC
COPY compiler_service ./compiler_service
COPY serving_service ./serving_service
COPY gateway ./gateway
COPY scripts ./scripts
RUN pip install --no-deps . && pip install "transformers>=5,<6" "onnx>=1.17" "onnx-ir>=0.1" \
        "onnxruntime-genai>=0.18" "safetensors>=0.5" "tokenizers>=0.21" "grpcio>=1.70" \
        "grpcio-health-checking>=1.70" "grpcio-reflection>=1.70" "protobuf>=5.29" "redis>=5" \
        "prometheus-client>=0.20" "tqdm>=4.66" "numpy>=1.26" "psutil>=5.9" "boto3>=1.35"
