# Two images from one file, both used by docker-compose.yml:
#   hub   the ZeroMQ hub: the package with its [zmq] extra, running `multilayer hub`;
#   test  the source tree with every backend and the test tools, running scripts/test.sh.
FROM python:3.11-slim AS hub
WORKDIR /src
COPY pyproject.toml README.md ./
COPY multilayer ./multilayer
RUN pip install --no-cache-dir '.[zmq]'
EXPOSE 5599
# --insecure: plaintext on compose's private network only; an exposed hub needs CURVE
# (docs/backends/zmq.md, "What an exposed deployment must configure").
CMD ["multilayer", "hub", "--bind", "tcp://0.0.0.0:5599", "--insecure"]

FROM python:3.11-slim AS test
# Debian's chromium for the browser test (Playwright drives it; it downloads no browser).
RUN apt-get update \
    && apt-get install -y --no-install-recommends chromium \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN pip install --no-cache-dir -e '.[all,test,plot]'
# The image has what the tests need: scripts/test.sh neither installs nor starts brokers.
ENV CI=true MULTILAYER_SKIP_INSTALL=1
CMD ["scripts/test.sh"]
