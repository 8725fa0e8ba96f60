# The appliance as a CPU container: `appliance serve` on a Unix socket in /run/appliance (mount it to
# reach the API from the host). No compiler and no builder extra in the runtime image; the home
# (generations, database, trusted root) is a volume. Provision it with the same commands as a host:
#   docker run --rm -v appliance:/var/lib/appliance -v /media/usb:/bundle:ro IMAGE trust init /bundle/root.json
#   docker run --rm -v appliance:/var/lib/appliance -v /media/usb:/bundle:ro IMAGE bundle install /bundle
#   docker run -d --network none -v appliance:/var/lib/appliance -v /run/appliance:/run/appliance IMAGE
#
# Base images are arguments: Docker Hub's python:3.11-slim-bookworm by default, or images made from
# Debian packages where no registry can be reached (`make image` makes them with mmdebstrap). The two
# must carry the same Python at the same path: the virtual environment is copied from one to the other.
ARG BUILD_BASE=python:3.11-slim-bookworm
ARG RUNTIME_BASE=python:3.11-slim-bookworm

FROM ${BUILD_BASE} AS build
RUN (command -v cmake && command -v g++) >/dev/null || (apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake && rm -rf /var/lib/apt/lists/*)
# The portable llama.cpp build (docs/architecture.md section 3): -march=native dies with SIGILL where AMX
# is reported but not granted.
ENV CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DLLAVA_BUILD=OFF"
RUN python3 -m venv /opt/appliance
# Offline: `make image` puts a wheelhouse (the appliance and every dependency, the llama-cpp-python
# wheel that `make deps` built with these same flags among them) and that build's llama-server in
# build/image-prebuilt/, and nothing is fetched. Without them (the bracket then matches nothing) both
# llama.cpp builds run here, about 11 minutes on 2 cores, and packages come from the index.
COPY pyproject.toml build/image-prebuil[t] /prebuilt/
COPY pyproject.toml README.md /src/
COPY appliance /src/appliance
COPY builder /src/builder
COPY tui /src/tui
# The appliance and its operator UI (`docker exec -it ... appliance tui`); no [builder] extra (no torch,
# transformers, peft, trl, mergekit).
RUN if [ -d /prebuilt/wheels ]; then \
      /opt/appliance/bin/pip install --no-cache-dir --no-index --find-links /prebuilt/wheels 'slm-appliance[tui]'; \
    else /opt/appliance/bin/pip install --no-cache-dir --upgrade pip wheel \
      && /opt/appliance/bin/pip install --no-cache-dir llama-cpp-python==0.3.36 \
      && /opt/appliance/bin/pip install --no-cache-dir '/src[tui]'; fi
# llama-server from the same sources and flags: the service's engine (continuous batching over slots).
RUN if [ -x /prebuilt/llama-server ]; then install -m 0755 /prebuilt/llama-server /opt/appliance/bin/llama-server; \
    else /opt/appliance/bin/pip download --no-cache-dir --no-deps --no-binary :all: -d /tmp/src llama-cpp-python==0.3.36 \
    && tar -xzf /tmp/src/llama_cpp_python-0.3.36.tar.gz -C /tmp/src \
    && cmake -S /tmp/src/llama_cpp_python-0.3.36/vendor/llama.cpp -B /tmp/server $CMAKE_ARGS -DLLAMA_CURL=OFF \
       -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
       -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DBUILD_SHARED_LIBS=OFF -DCMAKE_BUILD_TYPE=Release \
    && cmake --build /tmp/server --parallel --target llama-server \
    && install -m 0755 /tmp/server/bin/llama-server /opt/appliance/bin/llama-server && rm -rf /tmp/src /tmp/server; fi

FROM ${RUNTIME_BASE} AS runtime
RUN [ -e /usr/lib/x86_64-linux-gnu/libgomp.so.1 ] || (apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 && rm -rf /var/lib/apt/lists/*); \
    useradd --system --home-dir /var/lib/appliance --shell /usr/sbin/nologin appliance \
    && mkdir -p /var/lib/appliance /run/appliance && chown appliance:appliance /var/lib/appliance /run/appliance
COPY --from=build /opt/appliance /opt/appliance
ENV PATH=/opt/appliance/bin:$PATH APPLIANCE_HOME=/var/lib/appliance APPLIANCE_SOCKET=/run/appliance/api.sock \
    HF_HUB_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1
USER appliance
VOLUME ["/var/lib/appliance"]
ENTRYPOINT ["appliance"]
CMD ["serve"]
