#!/bin/sh
# Make sure the system packages some tests read are present (Debian):
#   python3.11-doc -> /usr/share/doc/python3.11/html/_sources/*.rst.txt (ptqkit.models.corpora.python_doc_texts)
#   chromium       -> the headless browser that renders report.html in tests/unit/eval/test_report_browser.py
# Installs what is missing with apt-get when we are root; otherwise prints a warning and exits 0
# (tests that need a missing package skip with the reason).
set -u
DOC_SOURCES=/usr/share/doc/python3.11/html/_sources
missing=""
[ -d "$DOC_SOURCES" ] || missing="$missing python3.11-doc"
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"

if [ -z "$missing" ]; then
    echo "ensure_system_data: python3.11-doc and chromium present"
    exit 0
fi
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_system_data: WARNING: missing:$missing (needs root and apt-get: 'sudo apt-get install$missing'); those tests will skip" >&2
    exit 0
fi
echo "ensure_system_data: installing$missing with apt-get"
# shellcheck disable=SC2086  # $missing is a word list on purpose
if ! (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing) >/tmp/ensure_system_data.log 2>&1; then
    echo "ensure_system_data: WARNING: apt-get failed (see /tmp/ensure_system_data.log); tests needing$missing will skip" >&2
    exit 0
fi
[ -d "$DOC_SOURCES" ] || echo "ensure_system_data: WARNING: python3.11-doc installed but $DOC_SOURCES is missing" >&2
command -v chromium >/dev/null 2>&1 || echo "ensure_system_data: WARNING: chromium installed but not on PATH" >&2
exit 0
