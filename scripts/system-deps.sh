#!/usr/bin/env bash
# Debian packages the tests start themselves: redis-server (shared rate budget), chromium (UI test),
# tinyproxy (the HTTPS proxy of the egress tests), postgresql (the metadata database of `make stack`).
# Installs only what is missing, only as root; elsewhere it says what to install and carries on.
set -u
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v tinyproxy >/dev/null 2>&1 || need+=(tinyproxy)
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || command -v postgres >/dev/null 2>&1 || need+=(postgresql)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian packages: ${need[*]}"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}") >/dev/null \
    || { echo "apt-get install ${need[*]} failed" >&2; [ "${CI:-}" = "true" ] && exit 1; }
else
  echo "note: ${need[*]} missing; install with: sudo apt-get install ${need[*]} (tests needing it will skip)"
fi
exit 0
