#!/bin/sh
# Debian's Chromium, for the test that renders the HTML report in a headless browser and looks at it
# (tests/test_html_report.py). Does nothing when Chromium is already there; needs root for apt-get.
set -e
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "tools/install-chromium.sh: no chromium and no root apt-get here; the browser test will be skipped" \
         "(install Chromium yourself to run it)" >&2
    exit 0
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
chromium --version
