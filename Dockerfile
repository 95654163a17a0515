# One image for every service of docker-compose.yml: receiver, workers, beat, Flower, migrate.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# The locked versions first, in a layer of their own: a code change rebuilds only the layers below.
COPY requirements/lock.txt ./requirements/lock.txt
RUN pip install --require-hashes -r requirements/lock.txt
COPY pyproject.toml README.md ./
COPY config ./config
COPY domain ./domain
COPY models ./models
COPY tasks ./tasks
COPY worker ./worker
# Not root: nothing here needs it. The only state on disk (beat's last-run times, Flower's
# task history) lives in volumes mounted under /var/lib/marketplace-worker.
RUN pip install --no-deps . \
 && useradd --system --uid 10001 --home-dir /var/lib/marketplace-worker --create-home worker \
 && install -d -o worker -g worker /var/lib/marketplace-worker/beat /var/lib/marketplace-worker/flower

USER worker
WORKDIR /var/lib/marketplace-worker

EXPOSE 8000 5555
CMD ["marketplace-worker", "webhook", "--host", "0.0.0.0", "--port", "8000"]
