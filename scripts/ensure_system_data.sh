#!/bin/sh
# Make sure the system data the evaluation corpora read is present:
#   python3.11-doc (Debian) -> /usr/share/doc/python3.11/html/_sources/*.rst.txt (ptqkit.models.corpora.python_doc_texts)
# Installs it with apt-get when missing and we are root; otherwise prints a warning and exits 0
# (tests that need it skip with the reason).
set -u
DOC_SOURCES=/usr/share/doc/python3.11/html/_sources

if [ -d "$DOC_SOURCES" ]; then
    echo "ensure_system_data: python3.11-doc present ($DOC_SOURCES)"
    exit 0
fi
if [ "$(id -u)" != "0" ]; then
    echo "ensure_system_data: WARNING: $DOC_SOURCES missing and not root; run 'sudo apt-get install python3.11-doc'" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_system_data: WARNING: $DOC_SOURCES missing and apt-get is not available; install the Python 3.11 docs by hand" >&2
    exit 0
fi
echo "ensure_system_data: installing python3.11-doc with apt-get"
if ! (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11-doc) >/tmp/ensure_system_data.log 2>&1; then
    echo "ensure_system_data: WARNING: apt-get failed (see /tmp/ensure_system_data.log); Python-doc tests will skip" >&2
    exit 0
fi
if [ -d "$DOC_SOURCES" ]; then
    echo "ensure_system_data: installed python3.11-doc ($DOC_SOURCES)"
else
    echo "ensure_system_data: WARNING: python3.11-doc installed but $DOC_SOURCES is missing" >&2
fi
exit 0
