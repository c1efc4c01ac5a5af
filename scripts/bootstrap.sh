#!/usr/bin/env bash
# Install what pacs2bids needs on a Debian machine, idempotently:
#   Debian: orthanc + orthanc-dicomweb (bundled PACS), dcmtk (comparisons), tesseract-ocr (burned-in text),
#           wamerican + wfrench (the leak scanner's common words, /usr/share/dict),
#           openssh-server (sshd: the SFTP server the storage tests start themselves, on loopback),
#           chromium (the QC report's tests open it in a headless browser),
#           postgresql (the Prefect server's production database; tests/test_prefect_server.py starts one)
#   PyPI:   the project in .venv, pinned by constraints.txt (prefect 3.8 needs fastapi < 0.151)
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
{ command -v Orthanc >/dev/null || [ -x /usr/sbin/Orthanc ]; } || need+=(orthanc)
ls /usr/share/orthanc/plugins/libOrthancDicomWeb.so >/dev/null 2>&1 || need+=(orthanc-dicomweb)
command -v getscu >/dev/null || need+=(dcmtk)
command -v tesseract >/dev/null || need+=(tesseract-ocr)
[ -f /usr/share/dict/american-english ] || need+=(wamerican)
[ -f /usr/share/dict/french ] || need+=(wfrench)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v chromium >/dev/null || need+=(chromium)
[ -x /usr/lib/postgresql/15/bin/postgres ] || ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need+=(postgresql)
python3 -c "import venv, ensurepip" 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  echo "bootstrap: installing Debian packages: ${need[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${need[@]}"
fi

stamp=".venv/.pacs2bids-installed"
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "bootstrap: installing Python packages into .venv (pinned by constraints.txt)"
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -c constraints.txt -e ".[test]"
  echo "$want" > "$stamp"
fi
