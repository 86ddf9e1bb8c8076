#!/bin/sh
# Installs what building, testing and running pickbox needs on Debian 12, and
# nothing that is already there. Run as root (or with sudo available).
set -eu

PACKAGES="build-essential autoconf automake autoconf-archive pkgconf \
libevent-dev libsqlite3-dev libjansson-dev libsystemd-dev libssl-dev check \
python3 systemd clang libclang-rt-14-dev valgrind git \
debhelper dpkg-dev lintian systemd-container mmdebstrap"

missing=""
for p in $PACKAGES; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $p"
    fi
done

if [ -z "$missing" ]; then
    echo "deps: all build and test packages are installed"
    exit 0
fi

echo "deps: installing:$missing"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# shellcheck disable=SC2086
$SUDO apt-get install -y -qq --no-install-recommends $missing
