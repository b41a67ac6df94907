# rtprop node image (CPU). Weights are mounted at /models, never downloaded at build or run time.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends dcmtk dicom3tools && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/rtprop
COPY pyproject.toml README.md ./
COPY config config
COPY db db
COPY dicom_node dicom_node
COPY converters converters
COPY models models
COPY pipeline pipeline
COPY model_lifecycle model_lifecycle
COPY web web
COPY cli cli
# CPU torch wheels (the pins in pyproject.toml); sam2 without its CUDA extension
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1 \
 && SAM2_BUILD_CUDA=0 pip install --no-cache-dir --no-build-isolation sam2==1.1.0 \
 && pip install --no-cache-dir --no-build-isolation .
EXPOSE 11112
# the web app, when started with --http-port 8080 and web.host 0.0.0.0 (put HTTPS in front: docs/web.md)
EXPOSE 8080
VOLUME ["/data", "/models"]
CMD ["rtprop", "serve", "--storage", "/data"]
