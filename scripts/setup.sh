#!/usr/bin/env bash
# Set up rtprop on a fresh Debian machine with Python 3.11: DICOM peers from Debian, a venv with
# pinned Python packages. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

# DCMTK (storescu/storescp/echoscu/dcmdump), dicom3tools (dciodvfy), Orthanc: real peers for tests;
# Chromium: the real browser the web app tests drive (Playwright with executable_path, no browser download);
# PostgreSQL: the distributed mode's tests start throw-away servers of it on loopback (tests/pg_helpers.py).
need_apt=()
command -v storescu >/dev/null 2>&1 || need_apt+=(dcmtk)
command -v dciodvfy >/dev/null 2>&1 || need_apt+=(dicom3tools)
command -v Orthanc >/dev/null 2>&1 || need_apt+=(orthanc)
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need_apt+=(postgresql)
if [ ${#need_apt[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${need_apt[@]}"
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }

# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build from the network.
pip install torch==2.14.1 torchvision==0.29.1
# sam2 builds against the installed torch; SAM2_BUILD_CUDA=0 skips the optional CUDA extension.
if ! .venv/bin/python -c "import sam2" 2>/dev/null; then
  SAM2_BUILD_CUDA=0 pip install --no-build-isolation sam2==1.1.0
fi
pip install --no-build-isolation -e '.[test]'
.venv/bin/rtprop --version
