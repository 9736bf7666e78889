#!/usr/bin/env bash
# Debian's Chromium and its matching Selenium driver for tests/browser/, installed when missing
# (quick and silent when both are there). Needs root, as in CI; elsewhere it says what to run.
set -u

CHROMIUM=/usr/bin/chromium
DRIVER=/usr/bin/chromedriver

[ -x "$CHROMIUM" ] && [ -x "$DRIVER" ] && exit 0

if [ "$(id -u)" != 0 ]; then
  echo "tests/browser need Chromium: run 'sudo apt-get install -y chromium chromium-driver'" >&2
  exit 1
fi
echo "installing chromium and chromium-driver"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null
[ -x "$CHROMIUM" ] && [ -x "$DRIVER" ]
