# Prometheus for the deployment test: Debian's package in a locally made base image
# (prom/prometheus cannot be pulled here), laid out like the official image: config in
# /etc/prometheus (mounted by docker-compose.yml), data in /prometheus, runs as nobody.
ARG BASE_IMAGE=local/debian-prometheus:trixie
FROM ${BASE_IMAGE}
RUN mkdir -p /prometheus && chown nobody:nogroup /prometheus
USER nobody
WORKDIR /prometheus
VOLUME ["/prometheus"]
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
