#!/usr/bin/env bash
# Installs the system packages the suite uses when they are missing and we
# may install them (root with apt): the PostgreSQL server for the store tests,
# bubblewrap for the tool sandbox, and Node.js with npm for the generated-stub
# client test. Without root it only says what is missing.
set -euo pipefail
missing=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
command -v bwrap >/dev/null 2>&1 || missing+=(bubblewrap)
command -v node >/dev/null 2>&1 || missing+=(nodejs npm)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing system packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "missing system packages (tests needing them will say so): ${missing[*]}" >&2
fi
