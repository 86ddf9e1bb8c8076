#!/bin/sh
# Configures and builds pickbox out of tree in DIR (default _build) with the
# given extra configure arguments. Reconfigures only when needed.
#   tests/scripts/build.sh [DIR] [configure args...]
set -eu
top=$(cd "$(dirname "$0")/../.." && pwd)
dir=${1:-_build}
[ $# -gt 0 ] && shift
cd "$top"
if [ ! -x configure ] || [ configure.ac -nt configure ] || [ Makefile.am -nt configure ]; then
    autoreconf -fi
fi
mkdir -p "$dir"
cd "$dir"
if [ ! -f Makefile ] || [ ../configure -nt Makefile ]; then
    ../configure --quiet "$@"
fi
make -j"$(nproc)" >/dev/null
echo "build: $top/$dir ready"
