#!/bin/sh
# Make sure a headless Chromium and its WebDriver exist for the browser test (tests/serving/test_page.py).
# Idempotent: does nothing when both are on PATH. Otherwise installs Debian's chromium + chromium-driver
# when running as root with apt-get available. Never fails the build: the test skips without a browser.
if command -v chromedriver >/dev/null 2>&1 && { command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; }; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure_chromium: chromium/chromedriver missing and cannot install them (needs root and apt-get); the browser test will skip" >&2
  exit 0
fi
echo "ensure_chromium: installing chromium and chromium-driver with apt-get ..." >&2
export DEBIAN_FRONTEND=noninteractive
if { apt-get update -qq && apt-get install -y -qq chromium chromium-driver; } >/dev/null 2>&1; then
  echo "ensure_chromium: installed" >&2
else
  echo "ensure_chromium: apt-get install failed; the browser test will skip" >&2
fi
exit 0
