# One image per executor, from the same project files:
#   docker build --build-arg EXECUTOR=clip_image_encoder -t clipseek/clip_image_encoder:0.1.0 .
#   docker build --build-arg EXECUTOR=clip_text_encoder  -t clipseek/clip_text_encoder:0.1.0 .
#   docker build --build-arg EXECUTOR=simple_indexer     -t clipseek/simple_indexer:0.1.0 .
#   docker build --build-arg EXECUTOR=shard_merger       -t clipseek/shard_merger:0.1.0 .
#   docker build --build-arg EXECUTOR=read_only_gateway  -t clipseek/read_only_gateway:0.1.0 .   (the search flow's gateway)
FROM python:3.11-slim
ARG EXECUTOR=simple_indexer
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY requirements.lock pyproject.toml README.md ./
RUN grep -v '^torch==' requirements.lock > /tmp/requirements.txt \
    && pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && pip install -r /tmp/requirements.txt
COPY executors ./executors
COPY flows ./flows
COPY clipseek ./clipseek
COPY data/models ./data/models
RUN pip install --no-deps -e . && cp executors/${EXECUTOR}.yml executors/config.yml
# jina runs `jina executor --uses config.yml` in the working directory
WORKDIR /app/executors
EXPOSE 8080
ENTRYPOINT ["jina"]
CMD ["executor", "--uses", "config.yml", "--port", "8080"]
