#!/bin/bash
# Installs what the test suite needs, when it is missing: pytest and
# pytest-timeout (for python3 and for pyenv's Python 3.8), vermin, flake8, and the
# Debian packages of the real peers. Quick when everything is present; any
# failure to install fails.
set -euo pipefail

missing=()
need() { # need COMMAND-OR-PATH PACKAGE
    if ! command -v "$1" >/dev/null 2>&1 && [ ! -e "$1" ]; then missing+=("$2"); fi
}
need man man-db
need swaks swaks
need smtp-sink postfix
need smtp-source postfix
need fetchmail fetchmail
need socat socat
need openssl openssl
need curl curl
need /usr/sbin/sshd openssh-server
need /usr/sbin/spamd spamd
need /usr/bin/spamassassin spamassassin
need /usr/sbin/dnsmasq dnsmasq-base
need haproxy haproxy
need unshare util-linux
need ip iproute2
need strace strace
need systemd-analyze systemd
need systemd-socket-activate systemd
need setpriv util-linux
need /etc/pam.d/common-auth libpam-runtime
for lib in /lib/*/security/pam_unix.so /usr/lib/*/security/pam_unix.so; do
    [ -e "$lib" ] && pam_ok=1
done
[ -n "${pam_ok:-}" ] || missing+=(libpam-modules)

if [ ${#missing[@]} -gt 0 ]; then
    packages=$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')
    echo "install-deps: installing $packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # shellcheck disable=SC2086
    apt-get install -y -q $packages
fi

pip_install() { # pip_install PYTHON MODULE PACKAGE
    if ! "$1" -c "import $2" >/dev/null 2>&1; then
        echo "install-deps: installing $3 for $1"
        "$1" -m pip install -q "$3"
    fi
}
pip_install python3 pytest pytest
pip_install python3 pytest_timeout pytest-timeout
pip_install python3 flake8 flake8
if ! command -v vermin >/dev/null 2>&1; then
    echo "install-deps: installing vermin"
    python3 -m pip install -q vermin
fi
if command -v pyenv >/dev/null 2>&1; then
    py38=$(pyenv prefix 3.8.18 2>/dev/null || pyenv prefix "$(pyenv versions --bare | grep '^3\.8\.' | sort -V | tail -1)")
    pip_install "$py38/bin/python3" pytest pytest
    pip_install "$py38/bin/python3" pytest_timeout pytest-timeout
fi
