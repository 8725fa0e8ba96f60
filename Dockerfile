# The appliance as a CPU container: `appliance serve` on a Unix socket in /run/appliance (mount it to
# reach the API from the host). No compiler and no builder extra in the runtime image; the home
# (generations, database, trusted root) is a volume. Provision it with the same commands as a host:
#   docker run --rm -v appliance:/var/lib/appliance -v /media/usb:/bundle:ro IMAGE trust init /bundle/root.json
#   docker run --rm -v appliance:/var/lib/appliance -v /media/usb:/bundle:ro IMAGE bundle install /bundle
#   docker run -d --network none -v appliance:/var/lib/appliance -v /run/appliance:/run/appliance IMAGE
ARG PYTHON=python:3.11-slim-bookworm

FROM ${PYTHON} AS build
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*
# The portable llama.cpp build (DESIGN section 3): -march=native dies with SIGILL where AMX is reported
# but not granted.
ENV CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DLLAVA_BUILD=OFF"
RUN python -m venv /opt/appliance && /opt/appliance/bin/pip install --no-cache-dir --upgrade pip wheel
RUN /opt/appliance/bin/pip install --no-cache-dir llama-cpp-python==0.3.36
COPY pyproject.toml README.md /src/
COPY appliance /src/appliance
COPY builder /src/builder
COPY tui /src/tui
# The appliance only: no [builder] extra (no torch, transformers, peft, trl, mergekit).
RUN /opt/appliance/bin/pip install --no-cache-dir /src

FROM ${PYTHON} AS runtime
RUN useradd --system --home-dir /var/lib/appliance --shell /usr/sbin/nologin appliance \
    && mkdir -p /var/lib/appliance /run/appliance && chown appliance:appliance /var/lib/appliance /run/appliance
COPY --from=build /opt/appliance /opt/appliance
ENV PATH=/opt/appliance/bin:$PATH APPLIANCE_HOME=/var/lib/appliance HF_HUB_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1
USER appliance
VOLUME ["/var/lib/appliance"]
ENTRYPOINT ["appliance"]
CMD ["serve", "--socket", "/run/appliance/api.sock"]
