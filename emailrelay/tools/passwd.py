"""emailrelay-passwd: encodes a password for an emailrelay secrets file.

Reads one password (a prompt without echo when stdin is a terminal, else one
line of stdin; surrounding white space is trimmed) and prints its HMAC-MD5
state in base64, ready for an `md5` line, exactly as E-MailRelay's tool
does. Options as E-MailRelay's: `-H/--hash MD5|NONE` (NONE prints the
password xtext-encoded, for a `plain` line), `-b/--base64` (the input is
base64), `-d/--dotted` (the older dotted-decimal form), `-p/--password PWD`
(beware: visible in the process table), `-h/--help`.
"""

import base64
import binascii
import getpass
import sys

from ..auth import md5state
from ..util import xtext

USAGE = """usage: emailrelay-passwd [-H <function>] [-b] [-d] [-p <pwd>]

Reads a password from the standard input and prints its encoded form for an
emailrelay secrets file.

  -H, --hash <function>  MD5 (the default) or NONE (xtext encoding only)
  -b, --base64           the input password is base64 encoded
  -d, --dotted           print the older dotted-decimal MD5 form
  -p, --password <pwd>   the password (visible to other users: beware)
  -h, --help             show this help and exit
"""


class _Usage(Exception):
    pass


def _parse(argv):
    opts = {"hash": "MD5", "base64": False, "dotted": False, "password": None}
    args = list(argv)
    while args:
        arg = args.pop(0)
        name, eq, value = arg.partition("=")
        if arg in ("-h", "--help"):
            opts["help"] = True
        elif arg in ("-b", "--base64"):
            opts["base64"] = True
        elif arg in ("-d", "--dotted"):
            opts["dotted"] = True
        elif name in ("-H", "--hash", "-p", "--password"):
            if not eq:
                if not args:
                    raise _Usage("option %s needs a value" % name)
                value = args.pop(0)
            opts["hash" if name in ("-H", "--hash") else "password"] = value
        else:
            raise _Usage("unexpected argument %r (the password is read from the standard input)" % arg)
    return opts


def _read_password():
    if sys.stdin.isatty():
        return getpass.getpass("password: ")
    return sys.stdin.buffer.readline().decode("utf-8", "surrogateescape")


def run(argv=None):
    """Runs the tool with `argv` (default sys.argv[1:]); returns the exit status."""
    try:
        opts = _parse(sys.argv[1:] if argv is None else argv)
    except _Usage as e:
        sys.stderr.write("emailrelay-passwd: %s\n%s" % (e, USAGE))
        return 2
    if opts.get("help"):
        sys.stdout.write(USAGE)
        return 0
    function = opts["hash"].upper()
    if function not in ("MD5", "NONE"):
        sys.stderr.write("emailrelay-passwd: hash function %s is not available (MD5 or NONE)\n"
                         % opts["hash"])
        return 1
    text = opts["password"] if opts["password"] is not None else _read_password()
    text = text.strip(" \t\r\n")
    password = text.encode("utf-8", "surrogateescape")
    if opts["base64"]:
        try:
            password = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            sys.stderr.write("emailrelay-passwd: invalid base64 input\n")
            return 1
    if not password:
        sys.stderr.write("emailrelay-passwd: invalid password\n")
        return 1
    if function == "NONE":
        out = xtext.encode(password.decode("utf-8", "surrogateescape"))
    elif opts["dotted"]:
        out = md5state.encode_dotted(password)
    else:
        out = md5state.encode_state(password)
    sys.stdout.write(out + "\n")
    return 0
