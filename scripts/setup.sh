#!/usr/bin/env bash
# Installs what pcietax needs on a Debian/Ubuntu machine, idempotently:
#   scripts/setup.sh          runtime: venv with pcietax, BCC and kernel headers (for the eBPF source)
#   scripts/setup.sh --test   also the real servers the tests start (Prometheus, Alertmanager, node_exporter)
# Packages are installed only when missing; /lib/modules/$(uname -r)/build is linked to the
# distribution's headers only when it does not exist (never overwritten).
set -euo pipefail
cd "$(dirname "$0")/.."
want_test=0
[[ "${1:-}" == "--test" ]] && want_test=1
VENV=${PCIETAX_VENV:-.venv}

pkgs=(python3 python3-venv python3-pip python3-bpfcc bpfcc-tools iproute2 curl ca-certificates)
if ((want_test)); then
  pkgs+=(prometheus prometheus-alertmanager prometheus-node-exporter tmux openssl gcc libc6-dev make)
fi

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

kver=$(uname -r)
need_headers=0
[[ -e /lib/modules/$kver/build ]] || need_headers=1

if ((${#missing[@]} || need_headers)); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "setup: need root to install: ${missing[*]:-} ${need_headers:+kernel headers}; rerun with sudo" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  if ((${#missing[@]})); then
    # The Debian packages start their services on install; tests use their own ports.
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  if ((need_headers)); then
    if apt-cache show "linux-headers-$kver" >/dev/null 2>&1; then
      apt-get install -y -qq --no-install-recommends "linux-headers-$kver" >/dev/null
    else
      # No headers package for the running kernel (e.g. a 6.18 VM kernel on Debian 12): BCC's
      # tracepoint and uprobe programs compile and run correctly against the distribution's
      # headers, so link them in. Only done when the directory is missing.
      apt-get install -y -qq --no-install-recommends linux-headers-amd64 >/dev/null || true
      arch_dir=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -1 || true)
      common_dir=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -1 || true)
      if [[ -n "$arch_dir" && -n "$common_dir" ]]; then
        mkdir -p "/lib/modules/$kver"
        [[ -e /lib/modules/$kver/build ]] || ln -s "$arch_dir" "/lib/modules/$kver/build"
        [[ -e /lib/modules/$kver/source ]] || ln -s "$common_dir" "/lib/modules/$kver/source"
        echo "setup: linked /lib/modules/$kver/{build,source} to $arch_dir and $common_dir" >&2
      else
        echo "setup: no kernel headers found; the eBPF source will report itself down" >&2
      fi
    fi
  fi
fi

# BCC reads tracepoint formats from tracefs; systemd mounts it at boot, minimal VMs may not.
if [[ $(id -u) -eq 0 && -d /sys/kernel/tracing && ! -e /sys/kernel/tracing/events ]]; then
  mount -t tracefs nodev /sys/kernel/tracing && echo "setup: mounted tracefs at /sys/kernel/tracing" >&2 || true
fi

# The venv comes from the distribution's python3 with system site packages, so it sees BCC
# (python3-bpfcc); the PyPI package named "bcc" is unrelated and must never be installed.
if [[ ! -x "$VENV/bin/python" ]]; then
  /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
stamp="$VENV/.pcietax-installed"
sources_hash=$(cat pyproject.toml $(git ls-files exporter ebpf 2>/dev/null || find exporter ebpf -type f) 2>/dev/null \
  | sha256sum | cut -c1-16)
extras="nvml,otlp"
((want_test)) && extras="nvml,otlp,test"
if [[ ! -f "$stamp" ]] || [[ "$(cat "$stamp")" != "$sources_hash $extras" ]]; then
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check ".[$extras]"
  echo "$sources_hash $extras" >"$stamp"
fi
