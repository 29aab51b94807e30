#!/usr/bin/env bash
# Debian packages used by tests and the demo: Fashion-MNIST (IDX files) and nginx (HTTP range tests).
set -u
need=()
[ -d /usr/share/datasets/fashion-mnist ] || need+=(dataset-fashion-mnist)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "note: not root on Debian; install these yourself for the full test suite: ${need[*]}" >&2
  echo "      (tests that need them are skipped with a reason)" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
  || echo "warning: apt-get install ${need[*]} failed; dependent tests will be skipped" >&2
exit 0
