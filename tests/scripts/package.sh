#!/bin/bash
# Builds the Debian package from a clean copy of the committed tree and runs
# lintian on it. Fails on any lintian error, or on a warning that is not
# listed (with its reason) in debian/lintian-accepted.
#   tests/scripts/package.sh [OUTDIR]      (default: _build-deb)
set -eu
top=$(cd "$(dirname "$0")/../.." && pwd)
out=${1:-$top/_build-deb}
rm -rf "$out"
mkdir -p "$out"
git -C "$top" archive --format=tar --prefix=pickbox/ HEAD | tar -x -C "$out"
cd "$out/pickbox"
# The test suite already ran in this CI run; the package build need not repeat it.
if ! DEB_BUILD_OPTIONS=nocheck dpkg-buildpackage -us -uc -b > "$out/build.log" 2>&1; then
    tail -60 "$out/build.log"
    echo "package: dpkg-buildpackage failed"
    exit 1
fi
cd "$out"
deb=$(ls pickbox_*_amd64.deb)
echo "package: built $deb"
lintian --tag-display-limit 0 pickbox_*.changes > lintian.out 2>&1 || true
cat lintian.out
bad=0
while IFS= read -r line; do
    case "$line" in
        E:*) bad=1 ;;
        W:*)
            tag=$(echo "$line" | awk '{print $3}')
            if ! grep -q "^$tag " "$top/debian/lintian-accepted"; then
                echo "package: unaccepted lintian warning: $tag"
                bad=1
            fi ;;
    esac
done < lintian.out
[ $bad -eq 0 ] && echo "package: lintian clean (accepted warnings: $(grep -c '^[a-z]' "$top/debian/lintian-accepted"))"
exit $bad
