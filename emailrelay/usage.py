"""Texts generated from the option table: --help, --version and the man page.

`help_text(verbose)`, `version_text(verbose)` and `man_page()` read
`options.OPTIONS`, so the help, the man page (written by `make man`) and
the parser cannot disagree; a test checks the committed man page.
"""

import sys

from . import __version__
from .options import GROUPS, OPTIONS

def _wrap(text, width, indent):
    import textwrap
    return textwrap.fill(text, width, initial_indent=indent, subsequent_indent=indent,
                         break_on_hyphens=False, break_long_words=False)


def _default_note(opt):
    if opt.name == "domain":
        return "this host's name"
    if opt.default is None or opt.kind in ("flag", "optional") or opt.multi:
        return None
    return str(opt.default)


def help_text(verbose):
    """The --help text: the basic options, or with `verbose` every option by group."""
    lines = ["usage: emailrelay [<option> [<option> ...]] [<config-file>]", ""]
    groups = GROUPS if verbose else GROUPS[:1]
    for group in groups:
        lines.append("%s options:" % group)
        for opt in OPTIONS:
            if opt.group != group:
                continue
            lines.append("  " + opt.synopsis())
            text = opt.help
            if not verbose:
                text = text.split(". ")[0].rstrip(".") + "."
            note = _default_note(opt)
            if verbose and note:
                text += " Default: %s." % note
            lines.append(_wrap(text, 79, "        "))
        lines.append("")
    if verbose:
        lines.append("A config file holds one option per line: the long name without "
                     "dashes, then")
        lines.append("the value after white space. '#' starts a comment line.")
    else:
        lines.append("For every option run \"emailrelay --help --verbose\".")
    return "\n".join(lines) + "\n"


def version_text(verbose):
    """The --version text; with `verbose`, what this build and host can do."""
    text = "emailrelay %s\n" % __version__
    if verbose:
        import importlib.util
        import ctypes.util
        tls = "available" if importlib.util.find_spec("ssl") else "not available"
        pam = "available" if ctypes.util.find_library("pam") else "not available"
        text += ("Python: %s\nTLS: %s\nPAM: %s\nDNSBL: not implemented\n"
                 % (sys.version.split()[0], tls, pam))
    return text


def _roff(text):
    """Escapes text for roff: backslashes, leading dots and quotes, hyphens."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    if text.startswith((".", "'")):
        text = "\\&" + text
    return text


def _example(lines):
    return [".nf", ".RS"] + [_roff(x) if x else "" for x in lines] + [".RE", ".fi"]


def _modes_section():
    """The man page's OPERATING MODES: inetd, socket activation, batched SMTP."""
    return ([
        ".SH OPERATING MODES",
        ".SS Run from inetd, xinetd or systemd with Accept=yes (\\-\\-inetd)",
        _roff("With --inetd the program serves one SMTP session on its standard input "
              "and output and exits. The client address is the peer of the socket on "
              "standard input; a pipe or a local socket has no address, so the session "
              "is refused unless --remote-clients is given, or --test-address [127.0.0.1] "
              "counts it as local. Logging goes to syslog or --log-file. An inetd.conf "
              "line:"),
    ] + _example([
        "smtp stream tcp nowait root /usr/local/sbin/emailrelay emailrelay --inetd "
        "--remote-clients --spool-dir /var/spool/emailrelay",
    ]) + [
        _roff("For systemd, etc/emailrelay.socket with Accept=yes starts an "
              "etc/emailrelay@.service instance (with StandardInput=socket) per "
              "connection."),
        ".SS systemd socket activation (Accept=no)",
        _roff("When systemd passes listening sockets (LISTEN_FDS and LISTEN_PID) the "
              "daemon serves them without --interface: each for the server its "
              "FileDescriptorName= names (smtp, pop or admin), SMTP otherwise. A socket "
              "unit emailrelay.socket that starts emailrelay.service:"),
    ] + _example([
        "[Socket]",
        "ListenStream=25",
        "Accept=no",
        "FileDescriptorName=smtp",
        "",
        "[Install]",
        "WantedBy=sockets.target",
    ]) + [
        ".SS Batched SMTP and policy tests (\\-\\-bsmtp, \\-\\-test\\-address)",
        _roff("With --bsmtp the program reads SMTP commands from its standard input "
              "without waiting for replies, writes the replies to its standard output, "
              "stores each accepted message in the spool, and exits with status 0 only "
              "when every command was accepted. A batch carried by another transport "
              "is stored with one command, and --test-address shows what the policy "
              "does for a client address, here that a remote client is refused "
              "without --remote-clients:"),
    ] + _example([
        "$ printf 'EHLO test\\r\\nQUIT\\r\\n' | emailrelay --bsmtp --test-address '[192.0.2.1]'",
        "554 5.7.1 no SMTP service for your address",
        "$ printf 'EHLO test\\r\\nMAIL FROM:<a@example.com>\\r\\nRCPT TO:<b@example.net>\\r\\n' \\",
        "    | emailrelay --bsmtp --remote-clients --test-address '[192.0.2.1]' \\",
        "    --address-verifier /usr/local/sbin/verify",
        "220 mail.example.com -- E-MailRelay V2.5.0 -- Service ready",
        "250-mail.example.com says hello",
        "...",
        "250 2.1.0 sender <a@example.com> OK",
        "550 5.1.1 relaying denied for 192.0.2.1",
        "$ echo $?",
        "1",
    ]))


def man_page():
    """The emailrelay(1) man page in roff, generated from the table."""
    out = [
        '.TH EMAILRELAY 1 "" "emailrelay %s" "User Commands"' % __version__,
        ".SH NAME",
        "emailrelay \\- store\\-and\\-forward SMTP relay, SMTP proxy and POP3 server",
        ".SH SYNOPSIS",
        ".B emailrelay",
        "[\\fIOPTIONS\\fR] [\\fIconfig\\-file\\fR]",
        ".br",
        ".B emailrelay \\-\\-as\\-server",
        ".br",
        ".B emailrelay \\-\\-as\\-client",
        "\\fIhost:port\\fR",
        ".br",
        ".B emailrelay \\-\\-as\\-proxy",
        "\\fIhost:port\\fR",
        ".SH DESCRIPTION",
        _roff("emailrelay stores the e-mail messages it receives over SMTP in a spool "
              "directory and forwards them to one fixed next-hop SMTP server, without "
              "routing. It runs as a storage daemon (--as-server), as a forwarding agent "
              "that sends the spool and exits (--as-client), or as a proxy that forwards "
              "each client's messages when it disconnects (--as-proxy). It can also serve "
              "the spool over POP3. It is a Python version of E-MailRelay with the same "
              "options, spool files and filter interface."),
        ".SH OPTIONS",
    ]
    for group in GROUPS:
        out.append(".SS %s options" % group)
        for opt in OPTIONS:
            if opt.group != group:
                continue
            out.append(".TP")
            out.append(".B " + _roff(opt.synopsis()))
            text = opt.help
            note = _default_note(opt)
            if note:
                text += " Default: %s." % note
            out.append(_roff(text))
    out += _modes_section()
    out += [
        ".SH CONFIG FILE",
        _roff("Options may also come from a config file, given as the one argument that "
              "is not an option. Each line holds one option: the long name without the "
              "dashes, white space, and the value; a flag is its name alone. Blank lines "
              "and lines starting with # are ignored. A file name may start with @app, "
              "which stands for the directory holding the program. For example:"),
        ".nf",
        ".RS",
        "spool\\-dir /var/spool/emailrelay",
        "port 587",
        "as\\-server",
        ".RE",
        ".fi",
        ".SH SIGNALS",
        _roff("SIGTERM and SIGINT stop the program cleanly: it stops listening, ends the "
              "sessions, leaves no spool file claimed or half written, and exits with "
              "status 0. SIGHUP reopens the log file (for logrotate) and re-reads the "
              "secrets files; E-MailRelay does neither."),
        ".SH EXIT STATUS",
        ".TP",
        ".B 0",
        _roff("Success; with --as-client, every message was forwarded."),
        ".TP",
        ".B 1",
        _roff("An error at start-up or run time, such as an unreadable secrets file, a "
              "port in use, or with --as-client a message that failed or a next-hop "
              "server that cannot be reached."),
        ".TP",
        ".B 2",
        _roff("A usage error: an unknown option, a missing or malformed value, or "
              "options that contradict each other. Nothing has been started."),
        ".SH FILES",
        ".TP",
        ".B /var/spool/emailrelay",
        _roff("The default spool directory."),
        ".TP",
        ".B /etc/emailrelay.conf",
        _roff("The usual config file (see etc/emailrelay.conf in the source tree)."),
        ".SH SEE ALSO",
        ".BR emailrelay\\-submit (1),",
        ".BR emailrelay\\-passwd (1),",
        ".BR emailrelay\\-resubmit (1),",
        ".BR emailrelay\\-filter\\-copy (1),",
        ".BR syslog (3)",
    ]
    return "\n".join(out) + "\n"
